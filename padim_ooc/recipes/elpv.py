"""The ELPV solar-cell set (``elpv-dataset`` on PyPI) as PaDiM image folders.

ELPV holds 2,624 electroluminescence images of solar cells, 300 x 300, 8-bit
grayscale, each with a defect probability in {0, 1/3, 2/3, 1} and a cell type
('mono' or 'poly'). Normal = probability 0, defective = probability 1; the
uncertain 1/3 and 2/3 cells are left out. Licence CC BY-NC-SA 4.0: the images
are written under ``out_dir`` and never into this repository.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PadimError

__all__ = ["prepare_elpv"]

_MISSING = ('the demo needs the package elpv-dataset (the [demo] extra): from the padim_ooc clone, '
            'run pip install -e ".[demo]"')
_NAME = re.compile(r"^elpv_\d{5}\.png$")


def _count_cap(name: str, value: int | None) -> None:
    """Raise ValueError unless ``value`` is None or a non-negative integer."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")


def _sync_folder(folder: Path, images: np.ndarray, indices: np.ndarray) -> int:
    """Write ``images[i]`` as ``elpv_{i:05d}.png``; drop stale ``elpv_*.png``.

    A file already there with the right pixel size is kept as it is. Returns
    the number of files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"elpv_{int(i):05d}.png": int(i) for i in indices}
    for old in folder.iterdir():
        if _NAME.match(old.name) and old.name not in wanted:
            old.unlink()
    written = 0
    for name, i in wanted.items():
        path = folder / name
        img = images[i]
        if path.is_file():
            try:
                with Image.open(path) as have:
                    if have.size == (img.shape[1], img.shape[0]) and have.mode == "L":
                        continue
            except OSError:
                pass  # unreadable: write it again
        tmp = path.with_suffix(".tmp")
        pixels = np.ascontiguousarray(img, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)  # fast, ~+17 % size
        tmp.replace(path)
        written += 1
    return written


def prepare_elpv(out_dir, *, cell_type: str = "mono", seed: int = 0,
                 n_train: int | None = None, n_test_good: int | None = None,
                 n_test_defect: int | None = None) -> dict:
    """Write one ELPV cell type as ``train/good``, ``test/good``, ``test/defect``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Root folder; created if missing.
    cell_type : {'mono', 'poly'}
        Which cells to keep.
    seed : int
        Seed of ``numpy.random.default_rng`` for the split and the subsets.
    n_train : int, optional
        At most this many training normals (a seeded subset of those left
        after holding out the test normals). Default: all of them.
    n_test_good : int, optional
        Number of normals held out for testing. Default: 20 % of the normals
        (rounded). Must leave at least one normal for training.
    n_test_defect : int, optional
        At most this many defective (probability 1) cells, a seeded subset.
        Default: all of them.

    Returns
    -------
    dict
        ``root``, ``train_good``, ``test_good``, ``test_defect`` (Paths);
        ``n_train``, ``n_test_good``, ``n_test_defect`` (counts written as
        files); ``n_written`` (files written by this call, 0 on a rerun);
        ``indices`` (dict of sorted index lists into the ELPV arrays, by
        folder); ``cell_type`` and ``seed``.

    Notes
    -----
    File names are ``elpv_{index:05d}.png`` with the 0-based index into the
    arrays of ``elpv_dataset.utils.load_dataset()``. Files already present with
    the right size are not rewritten, and ``elpv_*.png`` files that are not in
    the current split are deleted, so a rerun with other arguments leaves
    exactly the new split.

    Raises
    ------
    PadimError
        If ``elpv-dataset`` is not installed (nothing is written then).
    ValueError
        On an unknown ``cell_type`` or a bad count.
    """
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise PadimError(_MISSING) from None
    if cell_type not in ("mono", "poly"):
        raise ValueError(f"cell_type must be 'mono' or 'poly', got {cell_type!r}")
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good),
                        ("n_test_defect", n_test_defect)):
        _count_cap(name, value)

    images, probs, types = load_dataset()
    probs = np.asarray(probs, dtype=np.float64)
    keep = np.asarray(types) == cell_type
    normal = np.flatnonzero(keep & np.isclose(probs, 0.0))
    defect = np.flatnonzero(keep & np.isclose(probs, 1.0))

    n_hold = int(round(0.2 * normal.size)) if n_test_good is None else int(n_test_good)
    if n_hold >= normal.size:
        raise ValueError(f"n_test_good={n_hold} leaves no training normals "
                         f"({normal.size} normal {cell_type} cells)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(normal)  # draw order: normals first, then defects
    test_good, train = perm[:n_hold], perm[n_hold:]
    if n_train is not None:
        train = train[:int(n_train)]
    if n_test_defect is not None and n_test_defect < defect.size:
        defect = rng.choice(defect, size=int(n_test_defect), replace=False)
    split = {"train_good": np.sort(train), "test_good": np.sort(test_good),
             "test_defect": np.sort(defect)}

    root = Path(out_dir)
    folders = {"train_good": root / "train" / "good", "test_good": root / "test" / "good",
               "test_defect": root / "test" / "defect"}
    written = sum(_sync_folder(folders[k], images, split[k]) for k in folders)
    return {"root": root, **folders,
            "n_train": int(split["train_good"].size),
            "n_test_good": int(split["test_good"].size),
            "n_test_defect": int(split["test_defect"].size),
            "n_written": written,
            "indices": {k: [int(i) for i in v] for k, v in split.items()},
            "cell_type": cell_type, "seed": int(seed)}
