"""Data layouts (MVTec AD class folders, good/defect folders) and mask preprocessing."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from conftest import make_mvtec_class, nearest_resize_crop, write_images
from padim_ooc.errors import PadimError
from padim_ooc.evaluation.layouts import find_classes, find_layout, load_mask, load_view


def test_mvtec_layout_with_masks(tmp_path):
    root = make_mvtec_class(tmp_path / "bottle")
    layout = find_layout(root)
    assert layout.kind == "mvtec" and layout.name == "bottle" and layout.has_masks
    assert len(layout.train) == 20
    assert layout.counts() == {"good": 6, "scratch": 5, "spot": 5}
    assert [it.defect_type for it in layout.test][:6] == ["good"] * 6
    for it in layout.test:
        if it.defect_type == "good":
            assert it.mask is None and it.label == 0
        else:
            assert it.label == 1
            assert it.mask == root / "ground_truth" / it.defect_type / f"{it.path.stem}_mask.png"
            assert it.mask.is_file()


def test_masks_are_optional_but_not_partial(tmp_path):
    root = make_mvtec_class(tmp_path / "c", masks=False)
    layout = find_layout(root)
    assert not layout.has_masks and all(it.mask is None for it in layout.test)
    root = make_mvtec_class(tmp_path / "d")
    missing = root / "ground_truth" / "spot" / "img0002_mask.png"
    missing.unlink()
    with pytest.raises(PadimError, match="1 of 10 defective test images have no mask.*img0002_mask.png"):
        find_layout(root)


def test_masks_named_otherwise_are_refused_not_dropped(tmp_path):
    root = make_mvtec_class(tmp_path / "e")
    for mask in sorted((root / "ground_truth").rglob("*_mask.png")):
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))  # e.g. img0000.png
    expected = root / "ground_truth" / "scratch" / "img0000_mask.png"
    with pytest.raises(PadimError, match=r"10 of 10 defective test images have no mask, e\.g\. "
                       + re.escape(str(expected)) + r" \(found e\.g\. .*img0000\.png\)"):
        find_layout(root)


def test_good_defect_layout(tmp_path):
    write_images(tmp_path / "good", 4, seed=1)
    write_images(tmp_path / "defect", 2, seed=2)
    write_images(tmp_path / "defect" / "crack", 3, seed=3, start=10)
    layout = find_layout(tmp_path)
    assert layout.kind == "good-defect" and layout.train == [] and not layout.has_masks
    assert layout.counts() == {"good": 4, "crack": 3, "defect": 2}
    assert sum(it.label for it in layout.test) == 5


def test_bad_layouts_are_clear(tmp_path):
    with pytest.raises(PadimError, match="data folder not found"):
        find_layout(tmp_path / "nope")
    write_images(tmp_path / "x" / "images", 2, seed=1)
    with pytest.raises(PadimError, match="neither the MVTec AD layout"):
        find_layout(tmp_path / "x")
    write_images(tmp_path / "y" / "good", 2, seed=1)
    (tmp_path / "y" / "defect").mkdir()
    with pytest.raises(PadimError, match="no defective test images"):
        find_layout(tmp_path / "y")
    with pytest.raises(PadimError, match="no MVTec AD class folders"):
        find_classes(tmp_path)


def test_find_classes(tmp_path):
    make_mvtec_class(tmp_path / "b", n_train=2, n_good=1, n_defect=1)
    make_mvtec_class(tmp_path / "a", n_train=2, n_good=1, n_defect=1)
    (tmp_path / "notes").mkdir()
    assert [p.name for p in find_classes(tmp_path)] == ["a", "b"]
    assert find_classes(tmp_path / "a") == [tmp_path / "a"]


@pytest.mark.parametrize("shape,resize,crop", [((90, 70), 72, 64), ((300, 300), 256, 224), ((50, 50), 64, 64)])
def test_mask_follows_the_image_resize_and_crop(tmp_path, shape, resize, crop):
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 10)
        mask[y:y + rng.integers(3, 20), x:x + rng.integers(3, 20)] = 255
    mask[0, :] = 255  # a border line: cropped away or kept exactly as the reference says
    Image.fromarray(mask).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", resize, crop)
    assert got.dtype == bool and got.shape == (crop, crop)
    np.testing.assert_array_equal(got, nearest_resize_crop(mask > 0, resize, crop))
    # and it lands where the image's defect lands: the same rectangle painted white
    # on a black image, through the image path (bilinear, antialiased)
    img = np.repeat((mask > 0)[..., None] * np.uint8(255), 3, axis=2)
    Image.fromarray(img).save(tmp_path / "i.png")
    view = load_view(tmp_path / "i.png", resize, crop)[..., 0] > 127
    inter, union = (view & got).sum(), (view | got).sum()
    assert inter / union > 0.85


def test_missing_mask_file_is_all_normal_and_bad_file_is_clear(tmp_path):
    assert not load_mask(None, 72, 64).any()
    (tmp_path / "bad_mask.png").write_bytes(b"not a png")
    with pytest.raises(PadimError, match="cannot read the mask"):
        load_mask(tmp_path / "bad_mask.png", 72, 64)
