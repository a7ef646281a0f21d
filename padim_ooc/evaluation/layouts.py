"""Evaluation data sets on disk: the MVTec AD class layout and a plain good/defect layout.

MVTec AD class layout (one class folder)::

    CLASS/train/good/*.png                 normal images for fitting
    CLASS/test/good/*.png                  normal test images
    CLASS/test/<type>/*.png                defective test images, one folder per defect type
    CLASS/ground_truth/<type>/<name>_mask.png   optional pixel masks (nonzero = defect)

Without ``ground_truth/`` only image-level metrics are computed. With it, every
defective test image needs its mask: a partial set would bias the pixel
metrics, and a set named otherwise would silently drop them, so both are
refused with the name of the first missing mask.

Plain layout (no training split: the model is fitted elsewhere)::

    DIR/good/*.png                         normal test images
    DIR/defect/*.png                       defective test images (subfolders: defect types)

Masks go through the same square resize and centre crop as their images
(nearest-neighbour interpolation, so they stay binary).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data import IMAGE_SUFFIXES, open_loaded, decode_checked, display_path, read_bytes
from ..options import DEFAULT_MAX_IMAGE_BYTES
from ..errors import PadimError

GOOD = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class TestImage:
    """One test image: its file, defect type (``good`` for normal), label, mask file."""

    path: Path
    defect_type: str
    mask: Path | None = None

    @property
    def label(self) -> int:
        """0 for a good image, 1 for a defective one."""
        return 0 if self.defect_type == GOOD else 1


@dataclass
class Layout:
    """A class folder found on disk.

    Attributes
    ----------
    root : Path
    kind : {'mvtec', 'good-defect'}
    train : list of Path
        Normal training images (empty for the plain layout).
    test : list of TestImage
        Sorted by defect type (``good`` first), then by path.
    has_masks : bool
        Pixel masks exist for every defective test image.
    """

    root: Path
    kind: str
    train: list[Path] = field(default_factory=list)
    test: list[TestImage] = field(default_factory=list)
    has_masks: bool = False

    @property
    def name(self) -> str:
        return self.root.name

    def counts(self) -> dict[str, int]:
        """Test images per defect type, ``good`` first."""
        out: dict[str, int] = {}
        for item in self.test:
            out[item.defect_type] = out.get(item.defect_type, 0) + 1
        return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_mvtec_class(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` has the MVTec AD class layout (``train/good`` and ``test/``)."""
    folder = Path(folder)
    return (folder / "train" / GOOD).is_dir() and (folder / "test").is_dir()


def find_layout(folder: str | os.PathLike) -> Layout:
    """Read a class folder in the MVTec AD layout or the plain good/defect layout.

    Raises
    ------
    PadimError
        If the folder is missing, has neither layout, has no good or no
        defective test image, or has masks for only some defective images.
    """
    root = Path(os.fsdecode(folder))
    if not root.is_dir():
        raise PadimError(f"data folder not found: {root}")
    if is_mvtec_class(root):
        layout = _mvtec(root)
    elif (root / GOOD).is_dir() and (root / "defect").is_dir():
        layout = _good_defect(root)
    else:
        raise PadimError(f"{root} has neither the MVTec AD layout (train/good/, test/<type>/) "
                         "nor the plain layout (good/, defect/)")
    types = layout.counts()
    if not types.get(GOOD):
        raise PadimError(f"no good test images in {root} (expected images in "
                         f"{'test/good' if layout.kind == 'mvtec' else 'good'}/)")
    if len(types) < 2:
        raise PadimError(f"no defective test images in {root}: image AUROC needs both good and defective images")
    return layout


def _mvtec(root: Path) -> Layout:
    train = _images(root / "train" / GOOD)
    if not train:
        raise PadimError(f"no training images in {root / 'train' / GOOD}")
    gt = root / "ground_truth"
    test: list[TestImage] = []
    missing: list[Path] = []
    type_dirs = _subdirs(root / "test")
    type_dirs.sort(key=lambda p: (p.name != GOOD, p.name))
    for tdir in type_dirs:
        for path in _images(tdir):
            rel = path.relative_to(tdir)
            mask = None
            if tdir.name != GOOD and gt.is_dir():
                mask = gt / tdir.name / rel.parent / f"{path.stem}{MASK_SUFFIX}.png"
                if not mask.is_file():
                    missing.append(mask)
            test.append(TestImage(path, tdir.name, mask))
    n_defect = sum(item.label for item in test)
    if gt.is_dir() and missing:
        found = next((p for p in sorted(gt.rglob("*")) if p.is_file()), None)
        seen = f" (found e.g. {found})" if found is not None and len(missing) == n_defect else ""
        raise PadimError(f"{len(missing)} of {n_defect} defective test images have no mask, e.g. "
                         f"{missing[0]}{seen}; masks are named <image name>{MASK_SUFFIX}.png: rename or "
                         "add them, or move ground_truth/ away for image-level metrics only")
    has_masks = gt.is_dir() and n_defect > 0
    return Layout(root, "mvtec", train, test, has_masks)


def _good_defect(root: Path) -> Layout:
    test = [TestImage(p, GOOD) for p in _images(root / GOOD)]
    defect = root / "defect"
    for path in _images(defect):
        rel = path.relative_to(defect)
        test.append(TestImage(path, rel.parts[0] if len(rel.parts) > 1 else "defect"))
    test.sort(key=lambda it: (it.defect_type != GOOD, it.defect_type, str(it.path)))
    return Layout(root, "good-defect", [], test, False)


def find_classes(root: str | os.PathLike) -> list[Path]:
    """The MVTec AD class folders directly under ``root`` (or ``root`` itself if it is one)."""
    root = Path(os.fsdecode(root))
    if not root.is_dir():
        raise PadimError(f"data folder not found: {root}")
    if is_mvtec_class(root):
        return [root]
    classes = [p for p in _subdirs(root) if is_mvtec_class(p)]
    if not classes:
        raise PadimError(f"no MVTec AD class folders under {root} (each needs train/good/ and test/)")
    return classes


def load_mask(path: Path | None, resize: int, crop: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """A ground-truth mask resized and cropped like its image.

    Parameters
    ----------
    path : Path or None
        Mask file (nonzero pixels are defect); None gives an all-normal mask.
    resize, crop : int
        The model's square resize and centre crop.
    max_bytes : int
        Largest mask file read (checked before reading); like an image, a mask
        is a regular file decoded under PIL's pixel limit.

    Returns
    -------
    ndarray of shape (crop, crop), bool

    Raises
    ------
    PadimError
        ``cannot read the mask PATH: reason`` for a mask that cannot be used.
    """
    if path is None:
        return np.zeros((crop, crop), dtype=bool)
    data, reason = read_bytes(Path(path), max_bytes)  # a regular file, bounded, before it is read
    if reason is None:
        arr, reason = decode_checked(data, lambda b: np.asarray(open_loaded(b).convert("L")))
    if reason is not None:
        raise PadimError(f"cannot read the mask {display_path(path)}: {reason}")
    t = torch.from_numpy(np.ascontiguousarray(arr > 0)).to(torch.uint8).unsqueeze(0)
    t = TF.resize(t, [resize, resize], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    t = TF.center_crop(t, [crop, crop])
    return t[0].numpy().astype(bool)


def load_view(path: Path, resize: int, crop: int) -> np.ndarray:
    """The image as the model sees it (resized, cropped), before normalisation.

    Returns
    -------
    ndarray of shape (crop, crop, 3), uint8
    """
    from ..data import decode_rgb

    data, reason = read_bytes(Path(path))
    image, reason = (None, reason) if reason else decode_checked(data, decode_rgb)
    if reason:
        raise PadimError(f"bad image {display_path(path)}: {reason}")
    t = TF.pil_to_tensor(image)
    t = TF.resize(t, [resize, resize], antialias=True)
    t = TF.center_crop(t, [crop, crop])
    return t.permute(1, 2, 0).numpy()
