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
import functools
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
@functools.lru_cache(maxsize=32)
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
    # int32 is exact: weights < 2**15 summing to about 2**precision <= 2**22, samples <= 255
    x = np.ascontiguousarray(np.moveaxis(a, axis, 0)).astype(np.int32)  # (n_in, rest...)
    w = w.astype(np.int32)
    acc = np.full((n_out,) + x.shape[1:], 1 << (precision - 1), np.int32)
    shape = (-1,) + (1,) * (x.ndim - 1)
    for k in range(index.shape[1]):
        acc += w[:, k].reshape(shape) * x[index[:, k]]
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


# ---- metadata -----------------------------------------------------------------------------
HASHED_BYTES = 512 * 2**20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(meta: dict) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True,
                      separators=(",", ":")).encode()


def write_metadata(folder, meta: dict) -> None:
    """Write ``folder/metadata.json`` with its ``digest`` (SHA-256 of the rest, canonical JSON)."""
    meta = dict(meta)
    meta["digest"] = hashlib.sha256(_canonical(meta)).hexdigest()
    (Path(folder) / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def is_export(path) -> bool:
    """Whether ``path`` is (or looks like) an export folder: metadata.json, or the graph or the
    runtime without it (a damaged export, which :func:`read_metadata` then refuses)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (METADATA, "model.onnx", "model.xml", RUNTIME_FILE))


def read_metadata(folder) -> dict:
    """The checked metadata of the export in ``folder``.

    Raises
    ------
    ExportError
        One line: no metadata.json, not JSON, another format or version, edited (its digest),
        or a file it lists missing or of another size (or SHA-256, for files up to 512 MiB).
    """
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise ExportError(f"{folder} is not a padim_ooc export: it has no {METADATA} "
                          "(make one with `padim-ooc export MODEL --out DIR`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{path} is damaged (not JSON: {str(err).splitlines()[0]}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not the metadata of a padim_ooc export (format {FORMAT!r} expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} has format version {meta.get('format_version')!r}; this runtime reads "
                          f"version {FORMAT_VERSION}: export the model again with this padim_ooc")
    if meta.get("digest") != hashlib.sha256(_canonical(meta)).hexdigest():
        raise ExportError(f"{path} was changed after the export (its digest does not match its content); "
                          "export the model again instead of editing it")
    for name, record in meta["files"].items():
        file = folder / name
        if not file.is_file():
            raise ExportError(f"the export {folder} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise ExportError(f"the export {folder} is damaged: {name} has {size} bytes, "
                              f"{record['bytes']} were written")
        if "sha256" in record and sha256_file(file) != record["sha256"]:
            raise ExportError(f"the export {folder} is damaged: {name} is not the file that was written "
                              "(SHA-256 differs)")
    return meta


# ---- scoring ------------------------------------------------------------------------------
class Scorer:
    """An exported model, ready to score.

    Parameters
    ----------
    folder : path
        The export (metadata.json and the files it lists).
    threads : int, optional
        Intra-op threads of the inference engine [its default: all cores].
    engine : ``"onnxruntime"`` or ``"openvino"``, optional
        [the export's backend: onnxruntime for an ONNX export, openvino for an OpenVINO one;
        an OpenVINO export also has the ONNX graph, so it runs on onnxruntime too].
    """

    def __init__(self, folder, *, threads: int | None = None, engine: str | None = None):
        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        self.preprocess_record = self.meta["preprocess"]
        self.crop = int(self.preprocess_record["crop"])
        self.outputs = list(self.meta["outputs"])
        self.calibration = self.meta.get("calibration")
        engine = engine or ("openvino" if self.meta["backend"] == "openvino" else "onnxruntime")
        if engine == "openvino":
            self._run = self._openvino(threads)
        elif engine == "onnxruntime":
            self._run = self._onnxruntime(threads)
        else:
            raise ExportError(f"unknown engine {engine!r}: use onnxruntime or openvino")
        self.engine = engine

    def _onnxruntime(self, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("scoring an ONNX export needs onnxruntime: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        path = self.folder / "model.onnx"
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ExportError(f"cannot load {path}: {_first_line(err)}") from None
        shape = session.get_inputs()[0].shape
        if list(shape[1:]) != [3, self.crop, self.crop]:
            raise ExportError(f"the graph {path} takes images of shape {shape}, metadata.json says crop "
                              f"{self.crop}: the export is mismatched, export the model again")
        return lambda x: session.run(self.outputs, {"images": x})

    def _openvino(self, threads):
        try:
            import openvino as ov
        except ImportError:
            raise ExportError("scoring an OpenVINO export needs openvino: pip install openvino") from None
        path = self.folder / "model.xml"
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16/f16 arithmetic on CPUs that have it
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(path))
            shape = model.inputs[0].get_partial_shape()
            compiled = core.compile_model(model, "CPU", config)
        except Exception as err:
            raise ExportError(f"cannot load {path}: {_first_line(err)}") from None
        if [str(s) for s in list(shape)[1:]] != ["3", str(self.crop), str(self.crop)]:
            raise ExportError(f"the graph {path} takes images of shape {shape}, metadata.json says crop "
                              f"{self.crop}: the export is mismatched, export the model again")
        request = compiled.create_infer_request()

        def run(x):
            res = request.infer({0: x})
            return [np.asarray(res[compiled.output(i)]) for i in range(len(self.outputs))]
        return run

    def preprocess(self, image) -> np.ndarray:
        """A PIL image or (H, W, 3) uint8 array -> float32 (3, crop, crop), exactly as the model did."""
        return preprocess(image, self.preprocess_record)

    def score_arrays(self, batch: np.ndarray) -> dict:
        """Score a preprocessed batch (N, 3, crop, crop) float32.

        Returns
        -------
        dict with ``scores`` (N,) float32, ``maps`` (N, crop, crop) float32 and, for a
        calibrated model, ``p_values`` (N,) float64 and ``labels`` (N,) of "anomalous"/"normal".
        """
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.crop, self.crop):
            raise ExportError(f"expected a batch of shape (N, 3, {self.crop}, {self.crop}), got {tuple(batch.shape)}")
        if not len(batch):  # the engines refuse an empty batch
            empty = {"scores": np.zeros(0, np.float32), "maps": np.zeros((0, self.crop, self.crop), np.float32)}
            if self.calibration is not None:
                empty |= {"p_values": np.zeros(0), "labels": np.zeros(0, "<U9")}
            return empty
        res = dict(zip(self.outputs, self._run(np.ascontiguousarray(batch, np.float32))))
        out = {"scores": np.asarray(res["scores"], np.float32), "maps": np.asarray(res["maps"], np.float32)}
        if "p_values" in res:
            out["p_values"] = np.asarray(res["p_values"], np.float64)
            out["labels"] = np.where(np.asarray(res["anomalous"], bool), "anomalous", "normal")
        return out

    def score(self, images, *, batch_size: int = 32) -> dict:
        """Score PIL images, uint8 (H, W, 3) arrays or image files (paths); as :meth:`score_arrays`.

        A file that cannot be read is an :class:`ExportError` (use :meth:`score_files` to skip them).
        """
        items = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                im, reason = read_image(im)
                if reason:
                    raise ExportError(f"bad image: {reason}")
            items.append(im)
        parts = [self.score_arrays(np.stack([self.preprocess(im) for im in items[i:i + batch_size]]))
                 for i in range(0, len(items), batch_size)]
        if not parts:
            return self.score_arrays(np.zeros((0, 3, self.crop, self.crop), np.float32))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def score_files(self, paths, *, batch_size: int = 32):
        """Score files in input order, streaming: yields ``(indices, result, errors)`` per batch,
        ``result`` as :meth:`score_arrays` for the files that could be read (None if none),
        ``errors`` a list of ``(index, reason)``."""
        paths = list(paths)
        for start in range(0, len(paths), batch_size):
            kept, arrays, errors = [], [], []
            for i in range(start, min(len(paths), start + batch_size)):
                image, reason = read_image(paths[i])
                if reason:
                    errors.append((i, reason))
                    continue
                kept.append(i)
                arrays.append(self.preprocess(image))
            yield kept, (self.score_arrays(np.stack(arrays)) if arrays else None), errors


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)


def list_images(sources) -> list[Path]:
    """Folders (recursive, sorted), image files, and .txt/.lst/.list files of paths, in order, de-duplicated."""
    out, seen = [], set()
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise ExportError(f"input not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        elif path.suffix.lower() in (".txt", ".lst", ".list"):
            lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
            found = [Path(s) if Path(s).is_absolute() else path.parent / s
                     for s in lines if s and not s.startswith("#")]
        else:
            found = [path]
        for p in found:
            if p not in seen:
                seen.add(p)
                out.append(p)
    if not out:
        raise ExportError("no input images given")
    return out


def write_scores_csv(path, names, scores, p_values=None, labels=None) -> None:
    """``path,score`` rows (``path,score,p_value,label`` with a calibration), scores as Python reprs."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "score"] + (["p_value", "label"] if p_values is not None else []))
        for k, name in enumerate(names):
            row = [name, repr(float(scores[k]))]
            if p_values is not None:
                row += [repr(float(p_values[k])), str(labels[k])]
            w.writerow(row)


def main(argv=None) -> int:
    """``python padim_runtime.py EXPORT DATA... --out OUT [--maps]``: OUT/scores.csv (and maps.npy)."""
    ap = argparse.ArgumentParser(prog="padim_runtime", description="Score images with a padim_ooc export.")
    ap.add_argument("export")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--maps", action="store_true", help="also write OUT/maps.npy (N, H, W) float16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--engine", choices=["onnxruntime", "openvino"], default=None)
    args = ap.parse_args(argv)
    try:
        scorer = Scorer(args.export, threads=args.threads, engine=args.engine)
        paths = list_images(args.data)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        names, parts = [], []
        maps = None
        for indices, res, errors in scorer.score_files(paths, batch_size=args.batch_size):
            for i, reason in errors:
                print(f"warning: skipped {paths[i]}: {reason}", file=sys.stderr)
            if res is None:
                continue
            names += [str(paths[i]) for i in indices]
            parts.append(res)
            if args.maps:
                maps = res["maps"].astype(np.float16) if maps is None else np.concatenate(
                    [maps, res["maps"].astype(np.float16)])
        if not parts:
            raise ExportError(f"no image could be read: nothing was scored ({len(paths)} given)")
        res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "maps"}
        write_scores_csv(out / "scores.csv", names, res["scores"], res.get("p_values"), res.get("labels"))
        if maps is not None:
            np.save(out / "maps.npy", maps)
        print(json.dumps({"scored": len(names), "skipped": len(paths) - len(names), "out": str(out)}))
        return 0
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
