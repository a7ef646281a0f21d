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

from .api import fit
from .errors import PadimError
from .evaluate import evaluate
from .extractor import Extractor
from .layouts import find_classes, find_layout
from .presets import PAPER_MVTEC_MEAN

METRICS = ("image_auroc", "pixel_auroc", "pro")
HEADERS = ("image AUROC", "pixel AUROC", "PRO")


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
        ``mean`` (metrics averaged over the classes that have them), ``paper``
        (the published means in percent, or None), ``preset``, ``model``.
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
        ev.write(out / folder.name)
        m = ev.metrics
        row = {"class": folder.name, **{k: m[k] for k in METRICS}, "n_train": model.n_images,
               "n_test": m["n_images"], "fit_s": round(t_fit, 2), "evaluate_s": m["timings"]["total_s"]}
        rows.append(row)
        if on_class is not None:
            on_class(row)
    mean = {}
    for k in METRICS:
        vals = [r[k] for r in rows if r[k] is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    result = {"root": os.fsdecode(root), "preset": preset, "model": extractor.config() | {"channels": None},
              "rows": rows, "mean": mean, "paper": PAPER_MVTEC_MEAN.get(preset) if preset else None}
    write_table(result, out)
    return result


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(result: dict) -> str:
    """The benchmark as a Markdown table, in percent like the paper."""
    lines = ["| class | " + " | ".join(HEADERS) + " | train | test | fit s | evaluate s |",
             "| --- | " + " | ".join("---:" for _ in HEADERS) + " | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['class']} | " + " | ".join(_pct(r[k]) for k in METRICS)
                     + f" | {r['n_train']} | {r['n_test']} | {r['fit_s']:.1f} | {r['evaluate_s']:.1f} |")
    lines.append(f"| **mean ({len(result['rows'])} classes)** | "
                 + " | ".join(_pct(result["mean"][k]) for k in METRICS) + " | | | | |")
    paper = result.get("paper")
    if result.get("preset"):
        if paper and any(v is not None for v in paper.values()):
            cells = " | ".join("-" if paper[k] is None else f"{paper[k]:.1f}" for k in METRICS)
        else:
            cells = " | ".join("-" for _ in METRICS)
        lines.append(f"| paper, PaDiM {result['preset']} (MVTec AD mean, 15 classes) | {cells} | | | | |")
    return "\n".join(lines)


def write_table(result: dict, out: Path) -> None:
    """benchmark.md, benchmark.csv and benchmark.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(markdown_table(result) + "\n", encoding="utf-8")
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with open(out / "benchmark.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class", *METRICS, "n_train", "n_test", "fit_s", "evaluate_s"])
        for r in result["rows"]:
            w.writerow([r["class"], *("" if r[k] is None else r[k] for k in METRICS),
                        r["n_train"], r["n_test"], r["fit_s"], r["evaluate_s"]])
        w.writerow(["mean", *("" if result["mean"][k] is None else result["mean"][k] for k in METRICS),
                    "", "", "", ""])
        if result.get("paper"):
            w.writerow([f"paper:{result['preset']}",
                        *("" if result["paper"][k] is None else result["paper"][k] / 100 for k in METRICS),
                        "", "", "", ""])
