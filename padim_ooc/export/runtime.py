"""Score images with an exported padim_ooc model: numpy, Pillow and onnxruntime only (no torch).

This file is self-contained (it imports nothing from padim_ooc) and every export carries a copy
of it as ``padim_runtime.py``, so a machine with ``pip install onnxruntime numpy pillow`` scores
with ``python EXPORT/padim_runtime.py EXPORT DATA... --out OUT``. OpenVINO exports need
``openvino`` instead of (or beside) onnxruntime.

What it reproduces exactly (docs/design.md, "Export"):

- decoding: the first frame, made 8-bit RGB as ``padim_ooc.data.to_rgb`` does;
- the resize: torchvision's antialiased bilinear resize of a uint8 image (``TF.resize(...,
  antialias=True)`` on a uint8 tensor), whose CPU kernel computes int16 fixed-point weights and
  rounds to uint8 after each of its two passes (width, then height). Pillow's own bilinear
  resize uses other fixed-point weights and differs by one grey level on 1-25 % of the pixels,
  so the kernel is re-implemented here (:func:`resize_uint8`), bit for bit;
- the centre crop (torchvision's anchor: ``int(round((size - crop) / 2))``), the scaling
  ``x * float32(1 / 255)`` and the normalisation ``(x - mean) / std`` in float32.

Then the graph does the rest (backbone, channel selection, Mahalanobis, maps, max, calibration).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "padim_ooc-export"
FORMAT_VERSION = 1
METADATA = "metadata.json"
RUNTIME_FILE = "padim_runtime.py"
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pbm"})


class ExportError(Exception):
    """A damaged, mismatched or misused export: the message is one line saying what and how to fix it."""


# ---- preprocessing ------------------------------------------------------------------------
def _aa_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased bilinear weights for one axis, as its uint8 kernel rounds them.

    Returns (index (n_out, K) int64, weights (n_out, K) int64, precision bits): output sample
    j is ``(sum_k weights[j, k] * x[index[j, k]] + 2**(precision-1)) >> precision``, clamped to
    0..255 (aten/src/ATen/native/cpu/UpSampleKernel.cpp, ``_compute_index_ranges_int16_weights``).
    """
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0  # interp_size 2 for bilinear, times scale when reducing
    size = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    index = np.zeros((n_out, size), np.int64)
    weights = np.zeros((n_out, size), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), n_in) - xmin, 0), size)
        x = (np.arange(xsize) + xmin - center + 0.5) * invscale
        w = np.maximum(0.0, 1.0 - np.abs(x))
        total = w.sum()
        if total != 0.0:
            w = w / total
        weights[i, :xsize] = w
        index[i, :xsize] = np.arange(xmin, xmin + xsize)
    wt_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = weights * (1 << precision)
    fixed = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
    return index, fixed, precision


def _resize_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    index, w, precision = _aa_weights(n_in, n_out)
    x = np.moveaxis(a, axis, 0).astype(np.int64)  # (n_in, rest...)
    acc = np.full((n_out,) + x.shape[1:], 1 << (precision - 1), np.int64)
    for k in range(index.shape[1]):
        acc += w[:, k].reshape((-1,) + (1,) * (x.ndim - 1)) * x[index[:, k]]
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's ``resize(antialias=True)`` (bilinear) of an (H, W, C) uint8 image, bit for bit:
    the width pass, rounded to uint8, then the height pass."""
    return _resize_axis(_resize_axis(image, width, 1), height, 0)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a PIL image of any mode (``padim_ooc.data.to_rgb``, copied)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 2**32 - 1
        arr = np.clip(arr.astype(np.float64) * (255.0 / scale), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr)
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif img.mode in ("La", "RGBa"):
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def read_image(path) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, one-line reason), as ``padim_ooc.data.read_image``."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        return None, "a folder, not an image file"
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, ValueError) as err:
        return None, f"cannot read: {getattr(err, 'strerror', None) or err}"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            return to_rgb(img), None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, f"image too large (over the limit of {Image.MAX_IMAGE_PIXELS} pixels)"
    except Image.UnidentifiedImageError:
        return None, "not an image (unknown or damaged format)"
    except Exception as err:  # any decoder failure on these bytes is a bad file
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, f"cannot decode: {type(err).__name__}: {text}"


def preprocess(image, pre: dict) -> np.ndarray:
    """A PIL image (any mode) or an (H, W, 3) uint8 array -> float32 (3, crop, crop), as the model did.

    ``pre``: the ``preprocess`` record of metadata.json (resize, crop, mean, std).
    """
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ExportError(f"an image array must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}")
    size, crop = int(pre["resize"]), int(pre["crop"])
    a = resize_uint8(image, size, size)
    top, left = int(round((size - crop) / 2.0)), int(round((size - crop) / 2.0))
    a = a[top:top + crop, left:left + crop]
    x = a.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255)
    mean = np.asarray(pre["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(3, 1, 1)
    return (x - mean) / std
