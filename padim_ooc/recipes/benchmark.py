"""MVTec AD benchmark: fit and evaluate every class under a root, one table beside the paper.

For each class folder ``ROOT/<class>`` (MVTec AD layout) the model is fitted
on ``train/good`` into ``OUT/<class>/model.zarr`` and evaluated on ``test/``
into ``OUT/<class>/`` (metrics.json, scores.csv, report.html). A rerun reuses
a model that already holds the class's training images (the fit adds only
unseen images). The table goes to ``OUT/benchmark.md``, ``.csv`` and ``.json``.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..api import fit
from ..backbones import file_hash, torchvision_weights
from ..errors import PadimError
from ..evaluation.evaluate import evaluate
from ..extractor import Extractor
from ..evaluation.layouts import find_classes, find_layout
from ..lite import is_lite, lite_weights_path
from ..presets import PAPER_MVTEC_MEAN, PRESETS, weights_for

METRICS = ("image_auroc", "pixel_auroc", "pro")
HEADERS = ("image AUROC", "pixel AUROC", "PRO")
MVTEC_CLASSES = 15  # the paper's means are over the 15 MVTec AD classes
NO_PAPER_NUMBERS = {name: f"The paper published no EfficientNet-Lite{name[-1]} results (its EfficientNet "
                          "row is B5, image AUROC 97.9 only): nothing to compare with."
                    for name in ("lite0", "lite1", "lite2")}


def benchmark_mvtec(root: str | os.PathLike, out: str | os.PathLike, extractor: Extractor, *,
                    preset: str | None = None, classes: Sequence[str] | None = None, batch_size: int = 32,
                    loader_workers: int | None = None, progress: bool = False,
                    on_class=None) -> dict:
    """Fit and evaluate every MVTec AD class under ``root``.

    Parameters
    ----------
    extractor : Extractor
        Built once and used for every class.
    preset : str, optional
        Name of the preset, to put the paper's numbers for it beside ours.
    classes : sequence of str, optional
        Only these class folders (by name).
    on_class : callable, optional
        Called with each class row as it is done.

    Returns
    -------
    dict
        ``rows`` (one dict per class: class, metrics in [0, 1], counts, seconds),
        ``mean`` (metrics averaged over the classes that have them),
        ``mean_counts`` (how many classes each mean is over), ``paper`` (the
        published means in percent, or None), ``preset``, ``overrides``
        (how the model differs from the preset: the paper's numbers are
        then for another configuration), ``model``.
    """
    folders = find_classes(root)
    if classes:
        names = {p.name: p for p in folders}
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise PadimError(f"class {unknown[0]!r} not found under {root}; found: {', '.join(names)}")
        folders = [names[c] for c in classes]
    out = Path(out)
    rows = []
    for folder in folders:
        layout = find_layout(folder)
        t0 = time.perf_counter()
        model = fit([*layout.train], out / folder.name / "model.zarr", extractor=extractor,
                    batch_size=batch_size, loader_workers=loader_workers, progress=progress)
        t_fit = time.perf_counter() - t0
        ev = evaluate(model, layout, batch_size=batch_size, loader_workers=loader_workers, progress=progress)
        ev.write(out / folder.name, overwrite=True)  # the benchmark's own folder: its report is replaced
        m = ev.metrics
        row = {"class": folder.name, **{k: m[k] for k in METRICS}, "n_train": model.n_images,
               "n_test": m["n_images"], "fit_s": round(t_fit, 2), "evaluate_s": m["timings"]["total_s"]}
        rows.append(row)
        if on_class is not None:
            on_class(row)
    mean, counts = {}, {}
    for k in METRICS:
        vals = [r[k] for r in rows if r[k] is not None]
        mean[k], counts[k] = (float(np.mean(vals)) if vals else None), len(vals)
    result = {"root": os.fsdecode(root), "preset": preset, "model": extractor.config().to_attrs() | {"channels": None},
              "rows": rows, "mean": mean, "mean_counts": counts,
              "paper": PAPER_MVTEC_MEAN.get(preset) if preset else None,
              "overrides": overrides(extractor, preset) if preset else []}
    write_table(result, out)
    return result


def overrides(extractor: Extractor, preset: str) -> list[str]:
    """How ``extractor`` differs from ``preset`` (empty: the paper's configuration)."""
    want = PRESETS.get(preset)
    if want is None:
        return []
    out = []
    if extractor.backbone != want.backbone:
        out.append(f"backbone {extractor.backbone} (preset: {want.backbone})")
    paper_dims = want.dims or sum(extractor.layer_channels)
    if extractor.dims != paper_dims:
        out.append(f"{extractor.dims} channels (preset: {paper_dims})")
    for name in ("resize", "crop"):
        if getattr(extractor.preprocess, name) != getattr(want, name):
            out.append(f"{name} {getattr(extractor.preprocess, name)} (preset: {getattr(want, name)})")
    note = _weights_override(extractor, weights_for(want, extractor.backbone))
    if note:
        out.append(note)
    return out


def _weights_override(extractor: Extractor, preset_weights: str) -> str | None:
    """How the extractor's weights differ from ``preset_weights`` (the preset's for
    its backbone), or None. torchvision weights are compared as enum members, the
    EfficientNet-Lite file by hash; nothing is downloaded."""
    wid, backbone = extractor.weights_id, extractor.backbone
    if wid.startswith("random:"):
        return "random weights (preset: ImageNet)"
    if is_lite(backbone):
        try:
            installed = "file:" + file_hash(lite_weights_path(backbone))
        except (PadimError, OSError):  # the weights package is not installed: these are another file
            installed = None
        if preset_weights == "default" and wid == installed:
            return None
        return f"weights from a file (preset: the installed EfficientNet-Lite{backbone[-1]} ImageNet weights)"
    want = torchvision_weights(backbone, preset_weights)
    if wid.startswith("file:"):
        return f"weights from a file (preset: {want})"
    have = torchvision_weights(backbone, wid)
    return None if have is want else f"weights {have} (preset: {want})"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(result: dict) -> str:
    """The benchmark as a Markdown table in percent like the paper, with notes below it."""
    rows, n = result["rows"], len(result["rows"])
    counts = result.get("mean_counts") or {k: n for k in METRICS}
    lines = ["| class | " + " | ".join(HEADERS) + " | train | test | fit s | evaluate s |",
             "| --- | " + " | ".join("---:" for _ in HEADERS) + " | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['class']} | " + " | ".join(_pct(r[k]) for k in METRICS)
                     + f" | {r['n_train']} | {r['n_test']} | {r['fit_s']:.1f} | {r['evaluate_s']:.1f} |")
    cells = [_pct(result["mean"][k]) + ("" if counts[k] in (0, n) else f" ({counts[k]} of {n})")
             for k in METRICS]
    lines.append(f"| **mean of {n} class{'es' if n != 1 else ''}** | " + " | ".join(cells) + " | | | | |")
    paper, preset = result.get("paper"), result.get("preset")
    notes = []
    if preset:
        cells = " | ".join("-" if not paper or paper[k] is None else f"{paper[k]:.1f}" for k in METRICS)
        lines.append(f"| paper, PaDiM {preset}: mean of the {MVTEC_CLASSES} MVTec AD classes | {cells} | | | | |")
        if n < MVTEC_CLASSES:
            notes.append(f"Our mean is over {n} of the {MVTEC_CLASSES} MVTec AD classes, the paper's over all "
                         f"{MVTEC_CLASSES}: not directly comparable.")
        if result.get("overrides"):
            notes.append(f"Not the {preset} preset's configuration: " + "; ".join(result["overrides"])
                         + ". The paper's numbers are for the preset's configuration, not this model.")
        if preset in NO_PAPER_NUMBERS:
            notes.append(NO_PAPER_NUMBERS[preset])
        elif paper and any(paper[k] is None for k in METRICS):
            notes.append("-: the paper gives no number for this metric and configuration.")
    partial = [f"{HEADERS[i]} over {counts[k]}" for i, k in enumerate(METRICS) if 0 < counts[k] < n]
    if partial:
        notes.append("Only classes with ground-truth masks have pixel metrics: the mean "
                     + ", ".join(partial) + f" of the {n} classes.")
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else []))


def _round(value, digits: int = 6):
    return "" if value is None else round(float(value), digits)


def write_table(result: dict, out: Path) -> None:
    """benchmark.md, benchmark.csv (metrics in [0, 1], 6 decimals) and benchmark.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(markdown_table(result) + "\n", encoding="utf-8")
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with open(out / "benchmark.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class", *METRICS, "n_train", "n_test", "fit_s", "evaluate_s"])
        for r in result["rows"]:
            w.writerow([r["class"], *(_round(r[k]) for k in METRICS),
                        r["n_train"], r["n_test"], r["fit_s"], r["evaluate_s"]])
        counts = result.get("mean_counts", {})
        w.writerow([f"mean of {len(result['rows'])} classes", *(_round(result["mean"][k]) for k in METRICS),
                    "", "", "", ""])
        w.writerow(["classes in the mean", *(counts.get(k, "") for k in METRICS), "", "", "", ""])
        if result.get("paper"):
            w.writerow([f"paper:{result['preset']} (mean of {MVTEC_CLASSES} classes)",
                        *(_round(None if result["paper"][k] is None else result["paper"][k] / 100)
                          for k in METRICS), "", "", "", ""])
