"""Ready-made runs on real data: the offline ELPV demo and the MVTec AD benchmark.

- :mod:`.elpv`: the ELPV solar-cell images (PyPI ``elpv-dataset``) written as image folders.
- :mod:`.demo`: ``padim-ooc demo``: fit, evaluate and report on ELPV with EfficientNet-Lite0 (or Lite1, Lite2).
- :mod:`.benchmark`: ``padim-ooc benchmark mvtec``: every class, a table beside the paper's numbers.
"""
