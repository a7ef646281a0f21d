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
from .errors import PadimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PaDiM anomaly detection, fitted out of core. Run `padim-ooc COMMAND --help`.")
log = logging.getLogger("padim_ooc")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def command(func):
    """Register a command that turns library errors into one line on stderr."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
        try:
            return func(*args, **kwargs)
        except PadimError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:  # a bug, not a user error: still one line unless debugging
            if os.environ.get("PADIM_OOC_DEBUG"):
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            _fail(f"internal error: {type(err).__name__}: {first} (set PADIM_OOC_DEBUG=1 for the traceback)", 3)
    return app.command()(wrapper)


def _layers(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _weights(text: Optional[str]) -> Optional[str]:
    return None if text is None else ("none" if text.lower() == "none" else text)


DataArg = typer.Argument(..., help="Image folders (recursive), image files, or .txt lists of paths.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")
BatchOpt = typer.Option(32, "--batch-size", min=1, help="Images per forward pass.")
LoaderOpt = typer.Option(None, "--loader-workers", min=0, help="Image decoding processes (default: cores, up to 8).")
OnErrorOpt = typer.Option("skip", "--on-error", help="skip (warn and count) or fail (stop) on an unreadable image.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")


@command
def fit(
    data: List[str] = DataArg,
    model: str = typer.Option(..., "--model", help="Model store (Zarr); created or extended."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="torchvision model name or efficientnet_lite0 [resnet18]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layer names [first three stages]."),
    dims: Optional[int] = typer.Option(None, "--dims", min=1, help="Random channels kept [100 for resnet18, 550 for wide_resnet50_2]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the channel draw and of random weights [0]."),
    weights: Optional[str] = typer.Option(None, "--weights", help="default (pretrained), a state-dict file, or none (random) [default]."),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help="Square resize in pixels [256]."),
    crop: Optional[int] = typer.Option(None, "--crop", min=1, help="Centre crop in pixels [224]."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", min=1, help="Images between checkpoints."),
    no_finalize: bool = typer.Option(False, "--no-finalize", help="Leave the model unfinalized (add more images later)."),
    eps: float = typer.Option(0.01, "--eps", help="Added to the covariance diagonal at finalize."),
    loader_workers: Optional[int] = LoaderOpt,
    on_error: str = OnErrorOpt,
    quiet: bool = QuietOpt,
):
    """Fit a model on normal images (or add unseen images to an existing one)."""
    from .extractor import Extractor
    from .finalize import finalize as run_finalize
    from .fit import fit_store
    from .store import ModelStore, store_exists

    from .data import list_images

    paths = list_images(data)  # bad input fails before any model is built
    given = {"backbone": backbone, "layers": _layers(layers), "seed": seed, "resize": resize, "crop": crop}
    extractor = None
    if store_exists(model):
        stored = ModelStore.open(model).attrs
        for key, value in given.items():
            if value is not None and value != stored[key]:
                raise PadimError(f"the model {model} was fitted with {key}={stored[key]!r}, not {value!r}; "
                                 "use a new --model path for a different configuration")
        if dims is not None and dims != stored["dims"]:
            raise PadimError(f"the model {model} was fitted with dims={stored['dims']}, not {dims}")
    else:
        resize_v = resize or 256
        extractor = Extractor(backbone or "resnet18", layers=given["layers"], dims=dims, seed=seed or 0,
                              weights=_weights(weights) if weights else "default", resize=resize_v,
                              crop=crop or min(224, resize_v), device=device)
    summary = fit_store(paths, model, extractor=extractor, batch_size=batch_size,
                        checkpoint_every=checkpoint_every, loader_workers=loader_workers,
                        on_error=on_error, progress=not quiet, device=device, weights=_weights(weights))
    store = ModelStore.open(model, writable=True)
    if not no_finalize and not store.attrs["finalized"]:
        run_finalize(store, eps=eps)
    out = summary.as_dict() | {"finalized": not no_finalize}
    typer.echo(json.dumps(out))


@command
def finalize(
    model: str = typer.Argument(..., help="Model store."),
    eps: float = typer.Option(0.01, "--eps", help="Added to the covariance diagonal."),
):
    """Compute the precision matrices of a fitted model (covariance + eps I, Cholesky)."""
    from .finalize import finalize as run_finalize
    from .store import ModelStore

    store = ModelStore.open(model, writable=True)
    run_finalize(store, eps=eps)
    typer.echo(json.dumps({"model": model, "finalized": True, "eps": eps, "n_images": store.n_images}))


@command
def score(
    model: str = typer.Argument(..., help="Model store (finalized)."),
    data: List[str] = DataArg,
    out: Path = typer.Option(..., "--out", help="Output folder: scores.csv (and maps.zarr with --maps)."),
    maps: bool = typer.Option(False, "--maps", help="Also write the anomaly maps to OUT/maps.zarr (N, H, W) float16."),
    sigma: float = typer.Option(4.0, "--sigma", min=0.0, help="Gaussian blur of the maps (pixels); 0 = none."),
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file, if the model was fitted with one."),
    loader_workers: Optional[int] = LoaderOpt,
    on_error: str = OnErrorOpt,
    quiet: bool = QuietOpt,
):
    """Score images: OUT/scores.csv with one row `path,score` per image, in input order."""
    from .api import open_model
    from .data import list_images
    from .outputs import ScoreWriter
    from .progress import bar
    from .score import score_paths

    m = open_model(model, device=device, weights=_weights(weights))
    m.store.final_arrays()  # a clear error before reading any image
    paths = list_images(data)
    with ScoreWriter(out, paths, crop=m.store.attrs["crop"], maps=maps) as writer, \
            bar(f"score {Path(model).name}", len(paths), enabled=not quiet) as advance:
        def on_batch(indices, scores, batch_maps):
            writer.add(indices, scores, batch_maps)
            advance(len(indices))

        bad = score_paths(m, paths, batch_size=batch_size, sigma=sigma, loader_workers=loader_workers,
                          on_error=on_error, on_batch=on_batch)
        for i, err in bad:
            log.warning("skipped %s: %s", writer.name(i), err)
    typer.echo(json.dumps({"scored": writer.count, "skipped": len(bad), "out": str(out)}))


@command
def info(model: str = typer.Argument(..., help="Model store.")):
    """Print the model's attributes as JSON."""
    from .store import ModelStore

    attrs = ModelStore.open(model).attrs
    typer.echo(json.dumps(attrs, indent=2))


@command
def version():
    """Print the version."""
    typer.echo(__version__)


def main() -> None:  # console script entry point
    app()


__all__ = ["app", "main"]
