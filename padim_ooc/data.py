"""Image files in, preprocessed tensors out.

Finds images (folders, single files, text lists of paths), decodes them
robustly to RGB, resizes and centre-crops them, and serves them through a
torch ``DataLoader`` whose worker processes also hash the file bytes (the
ledger's identity of an image) and skip images that were already accumulated.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from . import sources as _sources
from .errors import PadimError
from .options import DEFAULT_MAX_IMAGE_BYTES

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pbm"}
)
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGEST_SIZE = 16
_KIND = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class ImageList(list):
    """Image paths as :func:`list_images` expanded them; expanding them again changes nothing."""


def list_images(sources: Iterable[str | os.PathLike]) -> ImageList:
    """Expand sources into a sorted, de-duplicated list of image paths.

    A folder contributes every file below it with an image suffix, in any
    case (recursively; a sub-folder with an image-like name such as ``x.jpg``
    is a folder), a ``.txt``/``.lst``/``.list`` file contributes the paths it
    lists one per line (blank lines and lines starting with ``#`` ignored;
    relative paths are taken relative to the list's folder, not the working
    directory; each is taken as an image file, so a listed folder or missing
    file is skipped later with a warning), any other file is taken as one
    image. URLs (``s3://bucket/prefix/``, any fsspec protocol) and ``.tar``
    shards are listed by :mod:`padim_ooc.sources` (a list may name them too).
    Order: a folder's images sorted by path, a list's in its order,
    sources in the order given; a path given twice is kept once (where it
    first appears). The result (an :class:`ImageList`) is returned as is if
    passed again.

    Raises
    ------
    PadimError
        If a source does not exist or no image is found in it.
    """
    if isinstance(sources, ImageList):
        return sources
    out = ImageList()
    seen: set[Path] = set()
    for src in sources:
        if _sources.claims(src):  # URLs (s3://bucket/prefix/, ...) and .tar shards: padim_ooc.sources
            found = _sources.expand(src, IMAGE_SUFFIXES, LIST_SUFFIXES)
            for p in found:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
            continue
        path = Path(os.fsdecode(src))
        if not path.exists() and not path.is_symlink():
            raise PadimError(f"input not found: {path}")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
            )
            if not found:
                raise PadimError(
                    f"no images found in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
        elif path.suffix.lower() in LIST_SUFFIXES:
            found = _read_list(path)
        else:
            found = [path]
        for p in found:
            if p not in seen:
                seen.add(p)
                out.append(p)
    if not out:
        raise PadimError("no input images given")
    return out


def _read_list(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    paths = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _sources.is_url(line) or line.lower().endswith(_sources.TAR_SUFFIX):  # URLs, tar shards
            paths.extend(_sources.list_line(line if _sources.is_url(line) else os.fspath(path.parent / line)))
            continue
        p = Path(line)
        paths.append(p if p.is_absolute() else path.parent / p)
    if not paths:
        raise PadimError(f"the list {path} names no images")
    return paths


def display_path(path: str | os.PathLike) -> str:
    """A path as one printable line: bytes that are not UTF-8 as ``\\xff``, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image (:func:`to_rgb` of the decoded image).

    Multi-frame files give their first frame.

    Raises
    ------
    PIL.UnidentifiedImageError, OSError, ValueError, ...
        Whatever PIL raises for bad bytes; :func:`read_image` turns any of
        them into a one-line reason.
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a PIL image of any mode.

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images are
    converted; 16-bit and 32-bit integer images are scaled to 8 bit by their
    type's range, float images by their own range. The same for a decoded
    file and for a PIL image handed in directly (:class:`Preprocess`).
    """
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
    elif img.mode in ("La", "RGBa"):  # premultiplied alpha: undo it first
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def read_image(path: Path, data: bytes | None = None, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
    """Read and decode one image file.

    Returns
    -------
    (image, None) or (None, reason)
        ``reason`` is one line saying why the file is not a usable image
        (missing, a folder, empty, unknown format, truncated, too large, ...).
        Images over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)
        are refused before they are decoded.
    """
    if data is None:
        data, reason = read_bytes(path, max_bytes)
        if reason:
            return None, reason
    return decode_checked(data, decode_rgb)


def decode_checked(data: bytes, decode=None):
    """``(decode(data), None)``, or ``(None, reason)`` for bytes that are no usable image.

    ``decode`` (default: open and load with PIL) runs under PIL's decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``, its warning made an error): an image over
    it is refused before its pixels are decoded. Any decoder failure is a reason.
    """
    if not data:
        return None, "empty file (0 bytes)"
    decode = decode or open_loaded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode(data), None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        return None, f"image too large ({_pixels(err)} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} pixels)"
    except Image.UnidentifiedImageError:
        return None, "not an image (unknown or damaged format)"
    except MemoryError:
        return None, "cannot decode: out of memory"
    except Exception as err:  # any decoder failure on these bytes is a bad file, not a bug
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "truncated" in text.lower():
            return None, f"truncated or damaged image ({text})"
        return None, f"cannot decode: {type(err).__name__}: {text}"


def open_loaded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _pixels(err: Exception) -> str:
    digits = [w for w in str(err).replace("(", " ").split() if w.isdigit()]
    return digits[0] if digits else "too many"


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes | None, str | None]:
    """The bytes of a regular file (a link to one is followed), of a URL or a tar member, or (None, reason).

    A local path that is anything else (a FIFO, a device such as ``/dev/zero``, a
    socket, a folder) is refused without reading it: it is opened non-blocking (a
    FIFO without a writer does not hang) and checked with ``fstat``. A file over
    ``max_bytes`` is refused before it is read, and at most ``max_bytes + 1`` bytes
    are ever read (a file that grows meanwhile is refused too). A URL or tar member
    (:mod:`padim_ooc.sources`) is refused after it is read if it is over ``max_bytes``.
    """
    if _sources.is_url(path):
        return over_limit(*_sources.read_bytes(path), max_bytes)
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        return None, "a folder, not an image file"
    except FileNotFoundError:
        if os.path.islink(path):
            return None, f"broken symbolic link (to {display_path(os.readlink(path))})"
        return None, "file not found (removed after it was listed?)"
    except (OSError, ValueError) as err:
        return None, f"cannot read: {getattr(err, 'strerror', None) or err}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KIND.get(stat.S_IFMT(info.st_mode), "not a regular file")
            return None, f"{kind}, not an image file"
        if info.st_size > max_bytes:
            return None, (f"file too large ({info.st_size} bytes, over the limit of {max_bytes}; "
                          "raise it with --max-image-bytes)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            return None, f"file too large (grew over the limit of {max_bytes} bytes while read)"
        return b"".join(chunks), None
    except (OSError, ValueError, MemoryError) as err:
        return None, f"cannot read: {getattr(err, 'strerror', None) or err}"
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Preprocess:
    """Resize (square), centre crop, scale to [0, 1], normalise.

    Calling it on a PIL image of any mode (made 8-bit RGB by :func:`to_rgb`,
    as a decoded file is) gives a float32 tensor of shape (3, crop, crop).
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        t = TF.pil_to_tensor(to_rgb(image))
        t = TF.resize(t, [self.resize, self.resize], antialias=True)
        t = TF.center_crop(t, [self.crop, self.crop])
        t = TF.to_dtype(t, torch.float32, scale=True)
        return TF.normalize(t, list(self.mean), list(self.std))


def digest(data: bytes) -> bytes:
    """The ledger's identity of an image: a 16-byte BLAKE2b hash of its file bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def over_limit(data: bytes | None, reason: str | None, max_bytes: int) -> tuple[bytes | None, str | None]:
    """``(data, reason)``, or a refusal if ``data`` is longer than ``max_bytes`` (an object read whole)."""
    if data is not None and len(data) > max_bytes:
        return None, (f"file too large ({len(data)} bytes, over the limit of {max_bytes}; "
                      "raise it with --max-image-bytes)")
    return data, reason


class ImageFiles(torch.utils.data.Dataset):
    """Images as ``(index, digest, tensor or None, error or None)`` items.

    ``skip`` holds digests already accumulated: those images are hashed but not
    decoded, and come back with ``tensor=None, error=None``.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, skip: frozenset = frozenset(),
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.skip = skip
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self._item(i, *read_bytes(self.paths[i], self.max_bytes))

    def __getitems__(self, indices: list[int]):
        """A batch of items (the DataLoader asks for whole batches): URLs and tar members
        read together (:func:`padim_ooc.sources.read_many`, concurrently), files one by one."""
        remote = [i for i in indices if _sources.is_url(self.paths[i])]
        read = dict(zip(remote, _sources.read_many([self.paths[i] for i in remote]))) if remote else {}
        return [self._item(i, *(over_limit(*read[i], self.max_bytes) if i in read else
                                read_bytes(self.paths[i], self.max_bytes))) for i in indices]

    def _item(self, i: int, data: bytes | None, reason: str | None):
        path = self.paths[i]
        if reason:
            return i, None, None, reason
        key = digest(data)
        if key in self.skip:
            return i, key, None, None
        image, reason = read_image(path, data)
        if reason:
            return i, key, None, reason
        try:
            tensor = self.preprocess(image)
        except Exception as err:  # pragma: no cover - a decoded RGB image always resizes
            return i, key, None, f"cannot preprocess: {type(err).__name__}: {err}"
        return i, key, tensor, None


def collate(items):
    """Batch of ``ImageFiles`` items -> (indices, digests, tensor (b, 3, H, W) or None, errors)."""
    indices = [it[0] for it in items]
    digests = [it[1] for it in items]
    tensors = [it[2] for it in items if it[2] is not None]
    ok = [it[2] is not None for it in items]
    errors = [it[3] for it in items]
    batch = torch.stack(tensors) if tensors else None
    return indices, digests, batch, ok, errors


def default_workers(device: str = "cpu") -> int:
    """Loader worker processes (0 = decode in-process).

    For a GPU: the cores we may use, up to 8 (the device waits on decoding).
    On the CPU the backbone already runs on every core, and decoding processes
    beside it only time-share the same cores: one worker per 4 cores there (0 on
    2 or 3 cores). Measured: docs/design.md ("Decoding in-process on small CPUs").
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    if str(device).startswith("cpu"):
        return min(8, cores // 4)
    return min(8, cores)


def loader(dataset: ImageFiles, batch_size: int, *, workers: int | None = None,
           device: str = "cpu") -> torch.utils.data.DataLoader:
    """A DataLoader in input order, with worker processes and prefetch, for ``device``
    (``workers`` None: :func:`default_workers`; memory pinned for CUDA)."""
    pin_memory = str(device).startswith("cuda")
    workers = default_workers(device) if workers is None else workers
    extra = {"prefetch_factor": 4, "persistent_workers": False} if workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate, pin_memory=pin_memory, **extra,
    )
