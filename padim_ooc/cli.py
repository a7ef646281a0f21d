"""The ``padim-ooc`` command line: a thin Typer layer over the library."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .config import DEFAULT_BACKBONE, DEFAULT_CROP, DEFAULT_RESIZE, DEFAULT_SEED, DEFAULT_WEIGHTS
from .errors import PadimError, os_message
from .options import DEFAULT_BATCH_SIZE, DEFAULT_EPS, DEFAULT_FOLD, DEFAULT_FPR, DEFAULT_SIGMA

# rich_markup_mode=None: plain help (Rich markup would eat the "[default]" brackets of the help texts)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="PaDiM anomaly detection, fitted out of core. Run `padim-ooc COMMAND --help`.")
log = logging.getLogger("padim_ooc")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class _LevelFormatter(logging.Formatter):
    """``warning: message``, ``info: message``: the record's own level, in lower case."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.message}"


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LevelFormatter())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def _out_of_gpu_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch's out-of-memory error of an accelerator (torch is not
    imported here for it: an error of torch's means torch is loaded already)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(err, oom)


def command(func, target: Optional[typer.Typer] = None):
    """Register a command (on ``target``, default the main app) that turns library
    errors into one line on stderr."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return func(*args, **kwargs)
        except PadimError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (typer.Exit, typer.Abort):
            raise
        except OSError as err:  # full disk, permissions, ...: the system's reason and the file
            if os.environ.get("PADIM_OOC_DEBUG"):
                raise
            _fail(os_message(err))
        except Exception as err:  # a bug, not a user error: still one line unless debugging
            if os.environ.get("PADIM_OOC_DEBUG"):
                raise
            if _out_of_gpu_memory(err):
                _fail(f"the GPU ran out of memory ({str(err).splitlines()[0] if str(err) else 'no detail'}): "
                      "lower --batch-size (a fit: also --max-memory), or run on --device cpu")
            first = str(err).splitlines()[0] if str(err) else ""
            _fail(f"internal error: {type(err).__name__}: {first} (set PADIM_OOC_DEBUG=1 for the traceback)", 3)
    return (target or app).command()(wrapper)


def _layers(text: Optional[str], option: str = "--layers") -> Optional[list[str]]:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise PadimError(f"{option} names nothing ({text!r}): give comma-separated names, e.g. layer1,layer2")
    return names


def _weights(text: Optional[str]) -> Optional[str]:
    return None if text is None else ("none" if text.lower() == "none" else text)


DataArg = typer.Argument(None, show_default=False,
                         help="Image folders (recursive), image files, or .txt lists of paths.")


def _need_data(data: Optional[List[str]], example: str) -> List[str]:
    if not data:
        raise PadimError(f"no images given: name image folders, image files or .txt lists of paths, "
                         f"e.g. `{example}`")
    return data


DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")
BatchOpt = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass.")
LoaderOpt = typer.Option(None, "--loader-workers", min=0,
                         help="Image decoding processes (default: on a GPU the cores, up to 8; on the CPU one per 4 cores).")
SigmaOpt = typer.Option(DEFAULT_SIGMA, "--sigma", min=0.0, help="Gaussian blur of the maps (pixels); 0 = none.")
ModelWeightsOpt = typer.Option(None, "--weights", help="Local weights file, if the model was fitted with one.")
ShrinkageOpt = typer.Option(None, "--shrinkage", help="Covariance estimate at finalize: none (PaDiM's sample "
                            "covariance) or oas (Oracle Approximating Shrinkage) [the model's, none for a new one]; "
                            "another one finalizes again, without reading images.")
OnErrorOpt = typer.Option("skip", "--on-error", help="skip (warn and count) or fail (stop) on an unreadable image.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
WorkersOpt = typer.Option(None, "--workers", min=1, help="Run on a local Dask cluster of N worker processes "
                          "(one thread each); its dashboard address is printed.")
SchedulerOpt = typer.Option(None, "--scheduler", help="Run on an existing Dask cluster: tcp://HOST:PORT, or "
                            "tls://HOST:PORT with certificates (its workers must reach the model and the images).")
TlsCaOpt = typer.Option(None, "--tls-ca-file", help="tls:// scheduler: PEM file of the certificate authority "
                        "[Dask's distributed.comm.tls.ca-file].")
TlsCertOpt = typer.Option(None, "--tls-cert", help="tls:// scheduler: this client's PEM certificate "
                          "[distributed.comm.tls.client.cert].")
TlsKeyOpt = typer.Option(None, "--tls-key", help="tls:// scheduler: this client's PEM key "
                         "[distributed.comm.tls.client.key].")


def _cluster(workers, scheduler, tls_ca_file, tls_cert, tls_key):
    from .options import Cluster

    return Cluster(workers, scheduler, tls_ca_file=tls_ca_file, tls_cert=tls_cert, tls_key=tls_key)


def _bytes(text: Optional[str], option: str = "--max-memory") -> Optional[int]:
    if text is None:
        return None
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise PadimError(f"{option} expects a size like 4GB or 512MiB, got {text!r}") from None
    if value <= 0:
        raise PadimError(f"{option} must be positive, got {text!r}")
    return value


MaxImageOpt = typer.Option(None, "--max-image-bytes", help="Largest image (or mask) file read, e.g. 1GB "
                           "[256MiB]; a larger file is skipped with its reason (checked before it is read).")


OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in OUT "
                            "(refused without it); other files there are left alone.")


def _image_bytes(text: Optional[str]) -> dict:
    """``max_image_bytes=...`` for a RunOptions record, or nothing (its default)."""
    value = _bytes(text, "--max-image-bytes")
    return {} if value is None else {"max_image_bytes": value}
PresetOpt = typer.Option(None, "--preset", help="r18-rd100 (resnet18, 100 channels), wr50-rd550 "
                         "(wide_resnet50_2, 550), lite0 / lite1 (efficientnet_lite0 / 1, all 176) or lite2 "
                         "(efficientnet_lite2, all 192); explicit options override it.")


@command
def fit(
    data: List[str] = DataArg,
    model: str = typer.Option(..., "--model", help="Model store (Zarr); created or extended."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help=f"torchvision model name or efficientnet_lite0, _lite1, _lite2 [{DEFAULT_BACKBONE}]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layer names [first three stages]."),
    embedding: Optional[str] = typer.Option(None, "--embedding", help="random (keep --dims seeded random channels, PaDiM) or orthogonal (project the channels on --dims seeded orthonormal directions, Kim et al. 2021) [random]."),
    dims: Optional[int] = typer.Option(None, "--dims", min=1, help="Dimension of a patch embedding [100 for resnet18, 550 for wide_resnet50_2, else all channels]."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seed of the channel or projection draw and of random weights [{DEFAULT_SEED}]."),
    weights: Optional[str] = typer.Option(None, "--weights", help=f"default (pretrained), a state-dict file, or none (random) [{DEFAULT_WEIGHTS}]."),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help=f"Square resize in pixels [{DEFAULT_RESIZE}]."),
    crop: Optional[int] = typer.Option(None, "--crop", min=1, help=f"Centre crop in pixels [{DEFAULT_CROP}]."),
    preset: Optional[str] = PresetOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=1, help="Images between checkpoints [auto: every 1000 images, spaced so that writing them takes at most 2 % of the time]."),
    no_finalize: bool = typer.Option(False, "--no-finalize", help="Leave the model unfinalized (add more images later)."),
    eps: Optional[float] = typer.Option(None, "--eps", show_default=False, help="Added to the covariance "
                                        f"diagonal at finalize [the model's eps, {DEFAULT_EPS} for a new model]; a finalized "
                                        "model with another eps is finalized again."),
    shrinkage: Optional[str] = ShrinkageOpt,
    loader_workers: Optional[int] = LoaderOpt,
    on_error: str = OnErrorOpt,
    quiet: bool = QuietOpt,
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    tls_ca_file: Optional[str] = TlsCaOpt,
    tls_cert: Optional[str] = TlsCertOpt,
    tls_key: Optional[str] = TlsKeyOpt,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget of each fitting "
                                             "process, e.g. 6GB [available memory x 0.8]; when the statistics do "
                                             "not fit, positions are fitted in blocks, one pass over the images each."),
    holdout: float = typer.Option(0.0, "--holdout", help="Share of the images held out of the statistics "
                                  "(chosen by content hash) to calibrate the model on after finalizing, e.g. 0.2."),
    fpr: Optional[float] = typer.Option(None, "--fpr", show_default=False, help="False-alarm rate of the "
                                        f"calibration on the held-out images [the model's, {DEFAULT_FPR}]."),
    max_image_bytes: Optional[str] = MaxImageOpt,
    fold: str = typer.Option(DEFAULT_FOLD, "--fold", help="float64 or float32: how each batch is folded into "
                             "the float64 statistics. float32 forms the batch's scatter with float32 products "
                             "(0.6x the fold's time at d=100, 0.9x at d=550 on 2 CPU cores) for ~1e-7 relative error instead of ~1e-15."),
):
    """Fit a model on normal images (or add unseen images to an existing one)."""
    from .config import ModelConfig
    from .fit import run_fit
    from .options import FitOptions

    # every option is checked before anything is built (a backbone may download its weights)
    options = FitOptions(batch_size=batch_size, device=device, loader_workers=loader_workers,
                         on_error=on_error, progress=not quiet,
                         cluster=_cluster(workers, scheduler, tls_ca_file, tls_cert, tls_key),
                         checkpoint_every=checkpoint_every, max_memory=_bytes(max_memory),
                         finalize=not no_finalize, eps=eps, shrinkage=shrinkage, holdout=holdout, fpr=fpr,
                         fold=fold, **_image_bytes(max_image_bytes))
    asked = ModelConfig(backbone=backbone, layers=_layers(layers), embedding=embedding, dims=dims, seed=seed,
                        weights=weights, resize=resize, crop=crop)
    if preset is not None:  # the preset's fields, overridden by those given explicitly
        from .presets import resolve

        asked = resolve(preset, backbone=backbone, dims=dims, resize=resize, crop=crop, weights=asked.weights).merged(
            ModelConfig(layers=asked.layers, seed=seed, embedding=embedding))
    data = _need_data(data, "padim-ooc fit data/train/good --model model.zarr")
    summary, finalized = run_fit(data, model, options, config=asked)
    typer.echo(json.dumps(summary.as_dict() | {"finalized": finalized}))


@command
def finalize(
    model: str = typer.Argument(..., help="Model store."),
    eps: Optional[float] = typer.Option(None, "--eps", show_default=False, help="Added to the covariance "
                                        "diagonal [the model's eps, 0.01 for a model never finalized]."),
    shrinkage: Optional[str] = ShrinkageOpt,
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    tls_ca_file: Optional[str] = TlsCaOpt,
    tls_cert: Optional[str] = TlsCertOpt,
    tls_key: Optional[str] = TlsKeyOpt,
):
    """Compute the precision matrices of a fitted model (covariance + eps I, Cholesky)."""
    from .api import finalize_model

    m = finalize_model(model, eps=eps, shrinkage=shrinkage,
                       cluster=_cluster(workers, scheduler, tls_ca_file, tls_cert, tls_key))
    cal = m.store.calibration()
    typer.echo(json.dumps({"model": model, "finalized": True, "eps": m.attrs["eps"],
                           "shrinkage": m.attrs.get("shrinkage") or "none", "n_images": m.n_images}
                          | ({} if cal is None else {"calibration_stale": cal.stale})))


@command
def merge(
    parts: List[str] = typer.Argument(..., metavar="PARTS", help="Model stores fitted on disjoint image sets, same configuration."),
    model: str = typer.Option(..., "--model", help="Output store: created, or extended if it exists."),
    no_finalize: bool = typer.Option(False, "--no-finalize", help="Leave the merged model unfinalized."),
    eps: Optional[float] = typer.Option(None, "--eps", show_default=False, help="Added to the covariance "
                                        "diagonal at finalize [the model's eps, 0.01 for a new model]."),
    shrinkage: Optional[str] = ShrinkageOpt,
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    tls_ca_file: Optional[str] = TlsCaOpt,
    tls_cert: Optional[str] = TlsCertOpt,
    tls_key: Optional[str] = TlsKeyOpt,
):
    """Merge model stores fitted elsewhere into one model (Chan's formula, chunk by chunk)."""
    from .api import merge as merge_parts

    result = merge_parts(parts, model, finalize=not no_finalize, eps=eps, shrinkage=shrinkage,
                         cluster=_cluster(workers, scheduler, tls_ca_file, tls_cert, tls_key))
    typer.echo(json.dumps(result))


@command
def score(
    model: str = typer.Argument(..., help="Model store (finalized)."),
    data: List[str] = DataArg,
    out: str = typer.Option(..., "--out", help="Output folder or fsspec URL: scores.csv (and maps.zarr with --maps)."),
    maps: bool = typer.Option(False, "--maps", help="Also write the anomaly maps to OUT/maps.zarr (N, H, W) float16."),
    masks: bool = typer.Option(False, "--masks", help="A calibrated model: a binary PNG mask (map above the "
                               "pixel threshold) per anomalous image in OUT/masks/."),
    overlays: Optional[str] = typer.Option(None, "--overlays", metavar="all|anomalous", help="A calibrated model: "
                                           "a PNG per image (all) or per anomalous image, heatmap over the image "
                                           "with the mask's contour, in OUT/overlays/."),
    sigma: float = SigmaOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    weights: Optional[str] = ModelWeightsOpt,
    loader_workers: Optional[int] = LoaderOpt,
    on_error: str = OnErrorOpt,
    quiet: bool = QuietOpt,
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
    tls_ca_file: Optional[str] = TlsCaOpt,
    tls_cert: Optional[str] = TlsCertOpt,
    tls_key: Optional[str] = TlsKeyOpt,
    max_image_bytes: Optional[str] = MaxImageOpt,
    overwrite: bool = OverwriteOpt,
):
    """Score images: OUT/scores.csv with one row per image, in input order: `path,score`, and on a
    calibrated model `path,score,p_value,label` (label anomalous or normal).

    MODEL may also be an export folder (`padim-ooc export`): it is then scored by the
    torch-free runtime (onnxruntime or OpenVINO), with the same outputs."""
    from .export.runtime import is_export

    if is_export(model):
        if workers is not None or scheduler is not None or weights is not None:
            raise PadimError("an export is scored in this process: --workers, --scheduler and --weights "
                             "do not apply to it")
        if device not in ("auto", "cpu"):
            raise PadimError(f"an export scores on the CPU (onnxruntime or OpenVINO), not --device {device}: "
                             "leave --device out, or score the model store itself")
        return _score_export(model, _need_data(data, f"padim-ooc score {model} data/test --out out"), out,
                             maps=maps, sigma=sigma, batch_size=batch_size, on_error=on_error, masks=masks,
                             overlays=overlays, overwrite=overwrite, **_image_bytes(max_image_bytes))
    from .api import run_score
    from .data import list_images
    from .options import ScoreOptions
    from .outputs import ScoreWriter
    from .store import ModelStore

    options = ScoreOptions(batch_size=batch_size, device=device, loader_workers=loader_workers,
                           on_error=on_error, progress=not quiet,
                           cluster=_cluster(workers, scheduler, tls_ca_file, tls_cert, tls_key), sigma=sigma,
                           maps=maps, masks=masks, overlays=overlays, **_image_bytes(max_image_bytes))
    data = _need_data(data, f"padim-ooc score {model} data/test --out out")
    store = ModelStore.open(model)
    store.final_arrays()  # a clear error before reading any image
    calibration = store.calibration()
    if calibration is None and (masks or overlays):
        raise PadimError(f"--{'masks' if masks else 'overlays'} needs a calibrated model (a threshold): run "
                         f"`padim-ooc calibrate {model} NORMAL_IMAGES...` or fit with --holdout first")
    if calibration is not None and calibration.stale:
        log.warning("the calibration of %s is stale: the statistics changed after it, so its threshold and "
                    "p-values belong to the old model; re-calibrate (padim-ooc calibrate %s ...)", model, model)
    paths = list_images(data)
    with ScoreWriter(out, paths, crop=store.attrs["crop"], maps=maps, calibration=calibration,
                     resize=store.attrs["resize"], masks=masks, overlays=overlays, overwrite=overwrite) as writer:
        bad = run_score(store, paths, options, writer, weights=_weights(weights))
        for i, err in bad:
            log.warning("skipped %s: %s", writer.name(i), err)
    result = {"scored": writer.count, "skipped": len(bad), "out": str(out)}
    if calibration is not None:
        result |= {"anomalous": writer.anomalous, "threshold": calibration.threshold,
                   "pixel_threshold": calibration.pixel_threshold, "rule": calibration.rule,
                   "alpha": calibration.alpha, "calibration_stale": calibration.stale}
    typer.echo(json.dumps(result))


@command
def calibrate(
    model: str = typer.Argument(..., help="Model store (finalized)."),
    data: List[str] = typer.Argument(None, show_default=False, help="Normal images the fit did not see "
                                     "(folders, files, .txt lists); with --labelled one class folder (MVTec AD "
                                     "or good/ + defect/); none: the model's held-out images (fit --holdout)."),
    fpr: Optional[float] = typer.Option(None, "--fpr", show_default=False, help="Normal images: the false-alarm "
                                        f"rate allowed on new normal images (split-conformal threshold) [{DEFAULT_FPR}; "
                                        "without DATA: the model's]."),
    labelled: bool = typer.Option(False, "--labelled", help="DATA is a labelled class folder: the threshold by --rule."),
    rule: str = typer.Option("f1", "--rule", help="With --labelled: f1 (F1-max), youden, or recall:R (the "
                             "highest threshold that finds a share R of the defects, e.g. recall:1.0)."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    weights: Optional[str] = ModelWeightsOpt,
    loader_workers: Optional[int] = LoaderOpt,
    quiet: bool = QuietOpt,
    workers: Optional[int] = WorkersOpt,
    scheduler: Optional[str] = SchedulerOpt,
):
    """Calibrate a model: the threshold (and p-values) `score` decides with, stored in the model."""
    from .api import calibrate_model

    result = calibrate_model(model, data or None, fpr=fpr, labelled=labelled, rule=rule, batch_size=batch_size,
                             device=device, weights=_weights(weights), loader_workers=loader_workers,
                             progress=not quiet, workers=workers, scheduler=scheduler)
    typer.echo(json.dumps({"model": model} | result))


def _score_export(folder: str, data: List[str], out: str, *, maps: bool, sigma: float, batch_size: int,
                  on_error: str, masks: bool = False, overlays: Optional[str] = None, overwrite: bool = False,
                  **image_bytes) -> None:
    """``padim-ooc score EXPORT ...``: the runtime's scores written as a model's are (the same
    ScoreWriter, with the export's calibration: p-values, labels, masks, overlays)."""
    from .calibration import Calibration
    from .data import list_images
    from .export.runtime import ExportError, Scorer
    from .options import ScoreOptions
    from .outputs import ScoreWriter

    ScoreOptions(batch_size=batch_size, on_error=on_error, sigma=sigma, maps=maps, masks=masks, overlays=overlays,
                 **image_bytes)
    try:
        scorer = Scorer(folder)
        if float(sigma) != float(scorer.meta["sigma"]):
            raise PadimError(f"the export {folder} has its maps blurred with sigma {scorer.meta['sigma']} (part "
                             f"of the graph), not {sigma}: leave --sigma out, or export again with --sigma {sigma}")
        calibration = None if scorer.calibration is None else Calibration.from_attrs(scorer.calibration)
        if calibration is None and (masks or overlays):
            raise PadimError(f"--{'masks' if masks else 'overlays'} needs a calibrated model (a threshold): the "
                             f"export {folder} was made from a model without a calibration")
        paths = list_images(data)
        skipped = 0
        with ScoreWriter(out, paths, crop=scorer.crop, maps=maps, calibration=calibration, overwrite=overwrite,
                         resize=int(scorer.preprocess_record["resize"]), masks=masks, overlays=overlays) as writer:
            for indices, res, errors in scorer.score_files(paths, batch_size=batch_size):
                for i, err in errors:
                    if on_error == "fail":
                        raise PadimError(f"bad image {writer.name(i)}: {err}")
                    log.warning("skipped %s: %s", writer.name(i), err)
                skipped += len(errors)
                if res is not None:
                    writer.add(indices, res["scores"], res["maps"])
    except ExportError as err:
        raise PadimError(str(err)) from None
    result = {"scored": writer.count, "skipped": skipped, "out": str(out), "engine": scorer.engine}
    if calibration is not None:
        result |= {"anomalous": writer.anomalous, "threshold": calibration.threshold}
    typer.echo(json.dumps(result))


@command
def export(
    model: str = typer.Argument(..., help="Model store (finalized)."),
    out: str = typer.Option(..., "--out", help="Export folder (new or empty): the graph, metadata.json, padim_runtime.py."),
    format: str = typer.Option("onnx", "--format", help="onnx or openvino (converted from the ONNX graph)."),
    float16: bool = typer.Option(False, "--float16", help="Precision matrices stored in float16 (half the size; "
                                 "see docs/benchmarks.md for the score error)."),
    sigma: float = SigmaOpt,
    weights: Optional[str] = ModelWeightsOpt,
    external_data: bool = typer.Option(False, "--external-data", help="Statistics in statistics.bin even below "
                                       "the 2 GB protobuf limit (above it they always are)."),
):
    """Export a model to one scorer graph (ONNX or OpenVINO) that runs without torch."""
    from .export.exporter import export_model

    meta = export_model(model, out, format=format, float16=float16, sigma=sigma, weights=_weights(weights),
                        external_data=True if external_data else None)
    sizes = {name: rec["bytes"] for name, rec in meta["files"].items()}
    typer.echo(json.dumps({"export": str(out), "format": format, "files": sizes,
                           "calibrated": meta["calibration"] is not None}))


@command
def compact(
    model: str = typer.Argument(..., help="Model store (finalized)."),
    out: str = typer.Option(..., "--out", help="The scorer's folder (new): a store with only what scoring reads."),
    float16: bool = typer.Option(False, "--float16", help="Precision matrices stored in float16 (half their "
                                 "size; scores change by about 1e-4 relative, see README)."),
):
    """Write a scoring-only model (no running statistics, no ledger): score, evaluate and calibrate
    open it; fit, merge and finalize refuse it."""
    from .compact import compact as run_compact

    typer.echo(json.dumps(run_compact(model, out, float16=float16)))


@command
def evaluate(
    model: str = typer.Argument(..., help="Model store (finalized)."),
    data: Path = typer.Argument(..., help="Class folder: MVTec AD layout (train/good, test/<type>, "
                                "ground_truth/<type>) or good/ + defect/."),
    out: Path = typer.Option(..., "--out", help="Output folder: metrics.json, scores.csv, report.html."),
    sigma: float = SigmaOpt,
    examples: int = typer.Option(4, "--examples", min=0, help="Images shown per report section."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    weights: Optional[str] = ModelWeightsOpt,
    loader_workers: Optional[int] = LoaderOpt,
    on_error: str = OnErrorOpt,
    quiet: bool = QuietOpt,
    max_image_bytes: Optional[str] = MaxImageOpt,
    overwrite: bool = OverwriteOpt,
):
    """Score a labelled test split: image AUROC, pixel AUROC, PRO, and an HTML report."""
    from .api import open_model
    from .evaluation.evaluate import check_outputs, evaluate as run_evaluate
    from .evaluation.layouts import find_layout

    layout = find_layout(data)
    check_outputs(out, overwrite=overwrite)  # before anything is scored
    m = open_model(model, device=device, weights=_weights(weights))
    ev = run_evaluate(m, layout, batch_size=batch_size, sigma=sigma, loader_workers=loader_workers,
                      examples=examples, progress=not quiet, on_error=on_error, **_image_bytes(max_image_bytes))
    report = ev.write(out, overwrite=overwrite)
    keys = ("image_auroc", "pixel_auroc", "pro", "n_images", "n_skipped", "counts", "decision")
    typer.echo(json.dumps({k: ev.metrics.get(k) for k in keys} | {"report": str(report)}))


benchmark_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Fit and evaluate on a benchmark data set.")
app.add_typer(benchmark_app, name="benchmark")


@functools.partial(command, target=benchmark_app)
def mvtec(
    root: Path = typer.Argument(..., help="MVTec AD root (one folder per class) or one class folder."),
    out: Path = typer.Option(..., "--out", help="Output folder: <class>/ (model, report), benchmark.md/.csv/.json."),
    preset: Optional[str] = typer.Option("r18-rd100", "--preset", help="r18-rd100, wr50-rd550, lite0, lite1 or lite2."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names [all found]."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Override the preset's backbone."),
    dims: Optional[int] = typer.Option(None, "--dims", min=1, help="Override the preset's channel count."),
    seed: int = typer.Option(0, "--seed", help="Seed of the channel draw (and of random weights)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="default, a state-dict file, or none [preset's]."),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help="Override the preset's resize [256]."),
    crop: Optional[int] = typer.Option(None, "--crop", min=1, help="Override the preset's crop [224]."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    loader_workers: Optional[int] = LoaderOpt,
    quiet: bool = QuietOpt,
):
    """MVTec AD: fit + evaluate every class, a table beside the paper's numbers."""
    import dataclasses

    from .extractor import Extractor
    from .recipes.benchmark import benchmark_mvtec, markdown_table
    from .presets import resolve

    asked = resolve(preset, backbone=backbone, dims=dims, resize=resize, crop=crop, weights=_weights(weights))
    extractor = Extractor(config=dataclasses.replace(asked, seed=seed), device=device)
    result = benchmark_mvtec(root, out, extractor, preset=preset, classes=_layers(classes, "--classes"),
                             batch_size=batch_size, loader_workers=loader_workers, progress=not quiet)
    typer.echo(markdown_table(result))


@command
def demo(
    out: Path = typer.Option(Path("padim_ooc_demo"), "--out", help="Working folder: images, model, report/."),
    full: bool = typer.Option(False, "--full", help="The whole split instead of the quick subset."),
    cell_type: str = typer.Option("mono", "--cell-type", help="mono or poly solar cells."),
    preset: str = typer.Option("lite0", "--preset", help="lite0, lite1 or lite2: the EfficientNet-Lite "
                               "backbone (input 224, 240 or 256, the whole cell)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    loader_workers: Optional[int] = LoaderOpt,
    quiet: bool = QuietOpt,
):
    """Offline demo: ELPV solar cells, EfficientNet-Lite0 (or Lite1, Lite2), image AUROC and a report."""
    from .recipes.demo import run_demo

    if cell_type not in ("mono", "poly"):
        raise PadimError(f"--cell-type must be mono or poly, not {cell_type!r}")
    ev, info = run_demo(out, full=full, cell_type=cell_type, preset=preset, seed=seed, batch_size=batch_size,
                        device=device, loader_workers=loader_workers, progress=not quiet)
    s = info["split"]
    backbone = "" if preset == "lite0" else f" with {preset}"  # the default's line as the README quotes it
    typer.echo(f"image AUROC {ev.metrics['image_auroc']:.4f} on ELPV {cell_type} cells{backbone} "
               f"({s['n_test_good']} good + {s['n_test_defect']} defective test cells, fitted on "
               f"{info['n_fitted']} good cells) in {info['total_s']:.0f} s")
    d = ev.metrics.get("decision")
    if d:
        pv = ", ".join(f"{float(a):g}: {v:.3f}" for a, v in d["p_value_calibration"].items())
        typer.echo(f"calibrated on {d['n_calibration']} held-out good cells at alpha {d['alpha']:g}: threshold "
                   f"{d['threshold']:.4g}, false-alarm rate {d['false_alarm_rate']:.3f} and recall {d['recall']:.3f} "
                   f"on the test split; share of good test cells with p <= alpha ({pv})")
    typer.echo(f"report: {info['report']}")


@command
def info(model: str = typer.Argument(..., help="Model store.")):
    """Print the model's attributes as JSON (the calibration's scores and hold-out images as counts)."""
    from .calibrate import describe
    from .store import ModelStore

    store = ModelStore.open(model)
    attrs = dict(store.attrs)
    attrs["embedding"] = store.config.embedding  # a store written before it was a choice: random
    attrs["kind"] = attrs.get("kind") or "model"  # a store written before scorers existed: a model
    if store.is_scorer:
        attrs["scorer"] = ("scoring-only (padim-ooc compact): final mean and precision "
                           f"({attrs.get('precision_dtype') or 'float32'}), no statistics to fit, merge or finalize")
    attrs.pop("holdout", None)
    if attrs.get("calibration") is not None or store.attrs.get("holdout"):
        attrs["calibration"] = describe(store)
    typer.echo(json.dumps(attrs, indent=2))


@command
def version():
    """Print the version."""
    typer.echo(__version__)


def main(args: Optional[List[str]] = None) -> None:
    """The console script: run the app, every usage error on one line of stderr.

    Exit codes: 0 success, 2 bad input (usage errors and library errors),
    3 internal error, 130 interrupted.
    """
    try:
        code = app(args=args, standalone_mode=False)
    except typer.TyperException as err:  # Typer's click: unknown or missing option, value out of range, ...
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":  # `padim-ooc` (or a group) alone: its help
            typer.echo(ctx.get_help())
            sys.exit(0)
        message = " ".join(err.format_message().split())
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"error: {message}{hint}", err=True)
        code = 2
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 1
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
