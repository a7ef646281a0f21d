"""Shared fixtures and helpers: small real image files on disk, a random-weight backbone, a
fitted model, independent numpy references, synthetic stores, the CLI in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim_ooc.data import decode_rgb
from padim_ooc.store import ModelStore
from padim_ooc.welford import Moments


# the command line, as a user runs it (a subprocess: its exit code and stderr are what a user sees)
CLI = [sys.executable, "-m", "padim_ooc"]


def run_cli(*args, ok=True, timeout=300):
    """Run ``padim-ooc ARGS...`` in a subprocess; with ``ok``, assert it exited 0."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


torch.set_num_threads(min(2, os.cpu_count() or 1))

CROP = 64
RESIZE = 72


def write_images(folder: Path, count: int, *, seed: int, size=(80, 80), start: int = 0) -> list[Path]:
    """Write ``count`` smooth random RGB PNGs (with a little structure, like real photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    paths = []
    for i in range(count):
        base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)),
                         np.sin(4 * (xx + yy))], axis=-1)
        img = 127 + 60 * base + rng.normal(0, 20, size + (3,))
        path = folder / f"img{start + i:04d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """40 images: 20 in ``a/``, 20 in ``b/``."""
    root = tmp_path_factory.mktemp("images")
    write_images(root / "a", 20, seed=1)
    write_images(root / "b", 20, seed=2, start=20)
    return root


@pytest.fixture(scope="session")
def extractor():
    from padim_ooc import Extractor

    return Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu")


def fit_summary(sources, model, extractor=None, *, client=None, shards=None, **options):
    """The fit pipeline (``run_fit``) without finalize unless asked: its :class:`FitSummary`.

    ``options`` are :class:`padim_ooc.options.FitOptions` fields; ``client`` and
    ``shards`` go to its :class:`~padim_ooc.options.Cluster`.
    """
    from padim_ooc.fit import run_fit
    from padim_ooc.options import Cluster, FitOptions

    options.setdefault("finalize", False)
    opts = FitOptions(cluster=Cluster(client=client, shards=shards), **options)
    return run_fit(sources, model, opts, extractor=extractor)[0]


def score_options(**fields):
    """:class:`padim_ooc.options.ScoreOptions` with ``fields``."""
    from padim_ooc.options import ScoreOptions

    return ScoreOptions(**fields)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, image_dir, extractor) -> Path:
    """A finalized model of ``image_dir/a`` (20 images; the ``extractor`` fixture's resnet18,
    random weights, Rd100, crop 64; batches of 10), made once per test module: a module's
    tests may change it (finalize it again, extend it)."""
    import padim_ooc as po

    path = tmp_path_factory.mktemp("fitted") / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=extractor, batch_size=10, loader_workers=0)
    return path


@pytest.fixture(scope="module")
def fitted_model(fitted):
    """:func:`fitted`, opened (a :class:`padim_ooc.Model` on the CPU)."""
    import padim_ooc as po

    return po.open_model(fitted, device="cpu")


# ---- shared helpers: independent references, synthetic stores, the CLI in this process ----

def exact_stats(extractor, paths, batch_size):
    """Two-pass float64 mean and covariance of the extractor's own features, numpy only.

    The features are computed with the same batch composition as the fit
    (oneDNN convolutions on the CPU differ by ~1e-6 with the batch size).
    """
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in paths])
    feats = torch.cat([extractor.embed(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    f = feats.flatten(2).permute(2, 0, 1).double().numpy()  # (P, N, d)
    mean = f.mean(axis=1)
    c = f - mean[:, None, :]
    cov = np.einsum("pni,pnj->pij", c, c) / (f.shape[1] - 1)
    return mean, cov


def rel(a, b) -> float:
    """Largest absolute difference relative to the largest value of the reference ``b`` (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


CONFIG = {"backbone": "resnet18", "layers": ["layer1"], "layer_channels": [64], "channels": list(range(4)),
          "dims": 4, "seed": 0, "weights": "random:seed=0", "weights_digest": "x", "resize": 64, "crop": 64,
          "normalize_mean": [0.5] * 3, "normalize_std": [0.5] * 3, "grid": [3, 5]}


def moments(n, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(15, n, 4)))
    return Moments.from_batch(x)


def synthetic(path, x, digests, config=CONFIG):
    """A store holding the statistics of samples ``x`` (P, n, d) with ledger ``digests``."""
    store = ModelStore.create(path, config)
    store.checkpoint(Moments.from_batch(torch.from_numpy(x)), digests)
    return store


def two_pass(x):
    mean = x.mean(axis=1)
    c = x - mean[:, None, :]
    return mean, np.einsum("pni,pnj->pij", c, c)


def make_mvtec_class(root: Path, *, seed: int = 0, n_train: int = 20, n_good: int = 6,
                     types=("scratch", "spot"), n_defect: int = 5, masks: bool = True,
                     size=(80, 80)) -> Path:
    """A small MVTec AD class: smooth random images; defects are dark or bright
    rectangles, the mask (0/255 PNG, same size as the image) marks exactly them."""
    write_images(root / "train" / "good", n_train, seed=seed, size=size)
    write_images(root / "test" / "good", n_good, seed=seed + 1, size=size)
    rng = np.random.default_rng(seed + 2)
    for k, name in enumerate(types):
        for path in write_images(root / "test" / name, n_defect, seed=seed + 3 + k, size=size):
            img = np.asarray(Image.open(path)).copy()
            mask = np.zeros(img.shape[:2], np.uint8)
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(4, size[0] - 20), rng.integers(4, size[1] - 16)
                mask[y:y + rng.integers(6, 16), x:x + rng.integers(5, 12)] = 255
            img[mask > 0] = 0 if k % 2 == 0 else 255
            Image.fromarray(img).save(path)
            if masks:
                (root / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / name / f"{path.stem}_mask.png")
    return root


def nearest_resize_crop(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Reference: nearest neighbour at pixel centres (src = floor((dst + 0.5) * in / out)),
    then a centre crop starting at round((resize - crop) / 2)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(resize) + 0.5) * h / resize).astype(int), h - 1)
    cols = np.minimum(((np.arange(resize) + 0.5) * w / resize).astype(int), w - 1)
    big = mask[np.ix_(rows, cols)]
    top = int(round((resize - crop) / 2))
    return big[top:top + crop, top:top + crop]


def main_exit(capsys, *args):
    """Run ``cli.main(args)`` in this process (no interpreter start-up: fast); returns
    (exit code, stdout, stderr)."""
    from padim_ooc import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def cli_json(capsys, *args):
    """``cli.main(args)`` in this process, exit 0; its JSON output."""
    code, out, err = main_exit(capsys, *args)
    assert code == 0, err
    return json.loads(out)


def cli_error(capsys, *args, text):
    """``cli.main(args)`` in this process: one ``error: ...`` line holding ``text``, exit 2; that line."""
    code, out, err = main_exit(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err
    return err
