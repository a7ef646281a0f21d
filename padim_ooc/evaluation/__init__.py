"""Evaluation on labelled test sets: metrics, test-set layouts, the evaluate run and its report.

- :mod:`.layouts`: MVTec AD class folders and the plain good/ + defect/ layout.
- :mod:`.metrics`: image AUROC, pixel AUROC and PRO (exact, then bounded-memory), built on
  :mod:`.binned` (fixed-bin histograms) and :mod:`.pro` (per-region overlap).
- :mod:`.evaluate`: score a layout's test split, streaming, into metrics and report material.
- :mod:`.report`: report.html with its SVG charts and PNG heatmap overlays.
"""
