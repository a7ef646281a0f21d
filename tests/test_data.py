"""Image discovery (folders, lists, single files) and PIL images given directly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import padim_ooc as po
from padim_ooc.data import ImageList, decode_rgb, list_images, to_rgb

from conftest import write_images


def touch(root: Path, *names: str) -> None:
    """Files with the given relative names (list_images reads names, not contents)."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not read by list_images")


def test_folder_is_read_recursively_with_image_suffixes_in_any_case(tmp_path):
    root = tmp_path / "imgs"
    touch(root, "b.png", "a.PNG", "c.JpEg", "d.tif", "sub/z.bmp", "sub/deeper/y.webp",
          "sub/k.jpg/m.png",  # a folder with an image-like name is a folder
          "notes.txt", "data.csv", "README", "sub/x.npy", "sub/deeper/.png.bak")
    expected = [root / "a.PNG", root / "b.png", root / "c.JpEg", root / "d.tif",
                root / "sub/deeper/y.webp", root / "sub/k.jpg/m.png", root / "sub/z.bmp"]
    found = list_images([root])
    assert found == expected
    assert list_images([str(root)]) == expected  # str or Path
    assert isinstance(found, ImageList) and list_images(found) is found  # already expanded


def test_list_file_paths_are_relative_to_the_list_and_comments_are_skipped(tmp_path, monkeypatch):
    touch(tmp_path, "imgs/b.png", "lists/sub/one.png", "abs.png")
    listing = tmp_path / "lists" / "set.txt"
    listing.write_text("# training images\n"
                       "\n"
                       "  ../imgs/b.png  \n"
                       "sub/one.png\n"
                       "   # an indented comment\n"
                       f"{tmp_path / 'abs.png'}\n"
                       "missing.png\n"  # kept: a listed path is skipped later, with a warning, if unreadable
                       "./sub/one.png\n")  # the same path again: kept once
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the list's folder, not to the working directory
    expected = [tmp_path / "lists/../imgs/b.png", tmp_path / "lists/sub/one.png", tmp_path / "abs.png",
                tmp_path / "lists/missing.png"]  # the list's own order, not sorted
    assert list_images([listing]) == expected
    upper = tmp_path / "lists" / "SET.LST"  # list suffixes in any case
    upper.write_text("sub/one.png\n")
    assert list_images([upper]) == [tmp_path / "lists/sub/one.png"]


def test_several_sources_in_order_without_duplicates(tmp_path):
    touch(tmp_path, "a/2.png", "a/1.png", "b/9.jpg", "b/8.jpg", "scan.dat", "c/5.png")
    listing = tmp_path / "pick.txt"
    listing.write_text("c/5.png\na/1.png\n")
    sources = [tmp_path / "b", tmp_path / "scan.dat", listing, tmp_path / "a", tmp_path / "b"]
    expected = [tmp_path / "b/8.jpg", tmp_path / "b/9.jpg",  # the folder, sorted
                tmp_path / "scan.dat",  # a single file is taken as an image whatever its suffix
                tmp_path / "c/5.png", tmp_path / "a/1.png",  # the list, in its order
                tmp_path / "a/2.png"]  # a/1.png was already listed; b given twice
    assert list_images(sources) == expected
    assert list_images(sources) == expected  # deterministic


def test_discovery_errors_are_one_line(tmp_path):
    touch(tmp_path, "empty/notes.txt", "comments.txt")
    (tmp_path / "comments.txt").write_text("# nothing\n\n  # still nothing\n")
    with pytest.raises(po.PadimError, match="input not found: .*nope"):
        list_images([tmp_path / "nope"])
    with pytest.raises(po.PadimError, match="no images found in .*empty"):
        list_images([tmp_path / "empty"])
    with pytest.raises(po.PadimError, match="the list .*comments.txt names no images"):
        list_images([tmp_path / "comments.txt"])
    with pytest.raises(po.PadimError, match="no input images given"):
        list_images([])


def pil_images() -> dict[str, Image.Image]:
    """A 16-bit, a palette and an RGBA image, as a user might hold them in memory."""
    rng = np.random.default_rng(3)
    gray16 = rng.integers(0, 65536, (70, 90), dtype=np.uint16)
    rgb = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    rgba = np.dstack([np.asarray(rgb), rng.integers(0, 256, (70, 90), dtype=np.uint8)])
    return {"I;16": Image.fromarray(gray16), "P": rgb.quantize(64), "RGBA": Image.fromarray(rgba)}


@pytest.mark.parametrize("mode", ["I;16", "P", "RGBA"])
def test_pil_image_preprocesses_like_its_file(tmp_path, extractor, mode):
    image = pil_images()[mode]
    assert image.mode == mode
    path = tmp_path / "x.png"
    image.save(path)
    from_file = extractor.preprocess(decode_rgb(path.read_bytes()))
    assert torch.equal(extractor.preprocess(image), from_file)
    assert torch.equal(extractor.preprocess(Image.open(path)), from_file)  # opened, not decoded by us
    if mode == "I;16":  # scaled by the 16-bit range (65535 -> 255), not clipped at 255
        expected = np.round(np.asarray(image).astype(np.float64) * 255 / 65535).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.dstack([expected] * 3))


def test_score_of_pil_images_equals_score_of_their_files(tmp_path, extractor):
    """Model.score takes PIL images through the same conversion as files."""
    write_images(tmp_path / "train", 8, seed=5)
    model = po.fit([tmp_path / "train"], tmp_path / "m.zarr", extractor=extractor, batch_size=8, loader_workers=0)
    images = pil_images()
    paths = []
    for mode, image in images.items():
        paths.append(tmp_path / f"{mode.replace(';', '')}.png")
        image.save(paths[-1])
    from_pil, _ = model.score(list(images.values()))
    from_files, _ = model.score(paths)
    np.testing.assert_array_equal(from_pil, from_files)
