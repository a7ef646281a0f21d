"""Shared fixtures: small real image files on disk, a random-weight backbone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


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
