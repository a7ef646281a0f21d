"""Bad image files: each is read correctly or skipped with a warning that names it and counted.

Real files on disk: empty, truncated PNG and JPEG, text named .png, a folder
named x.jpg, 16-bit, palette, RGBA, CMYK JPEG, 1x1, over the
decompression-bomb limit, a broken symbolic link, a name that is not UTF-8.
Expected pixels are computed here with numpy from what was written.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from padim_ooc.cli import app
from padim_ooc.data import ImageFiles, Preprocess, display_path, list_images, read_image
from padim_ooc.store import ModelStore

from conftest import CLI

SMALL = ["--weights", "none", "--resize", "32", "--crop", "32", "--batch-size", "4", "--loader-workers", "0", "-q"]
BAD_NAME = b"bad\xffname.png"  # not valid UTF-8

# file -> a words its skip reason must contain (None: read correctly)
CASES = {
    "a_good0.png": None, "a_good1.png": None, "a_good2.png": None,
    "zero.png": "empty file (0 bytes)",
    "trunc.png": "truncated",
    "trunc.jpg": "truncated",
    "text.png": "not an image",
    "gray16.png": None,
    "palette.png": None,
    "rgba.png": None,
    "cmyk.jpg": None,
    "one.png": None,
    "bomb.png": "image too large (144000000 pixels",
    "bomb2.png": "image too large (400000000 pixels",
    "broken.png": "broken symbolic link",
    BAD_NAME: None,
}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _claims_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(_png(Image.new("RGB", (1, 1), (9, 9, 9))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def make_bad_folder(root: Path) -> dict:
    """Write every case into ``root``; returns the arrays the readable ones were made from."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:40]
    smooth = np.stack([4 * xx + 40, 4 * yy + 30, 2 * (xx + yy) + 50], axis=-1).astype(np.uint8)
    made = {}
    for i in range(3):
        arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"a_good{i}.png")
    (root / "zero.png").write_bytes(b"")
    full = _png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (root / "trunc.png").write_bytes(full[: len(full) // 2])
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "text.png").write_text("this is a text file, not a picture\n")
    (root / "x.jpg").mkdir()  # a folder with an image name (and nothing in it)
    made["gray16"] = rng.integers(0, 65536, (40, 40), dtype=np.uint16)
    Image.fromarray(made["gray16"]).save(root / "gray16.png")
    pal = Image.fromarray(smooth).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(root / "palette.png")
    made["palette"] = (np.asarray(pal), np.array(pal.getpalette()[: 16 * 3]).reshape(16, 3))
    made["rgba"] = np.dstack([smooth, rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)])
    Image.fromarray(made["rgba"]).save(root / "rgba.png")
    made["cmyk"] = smooth
    Image.fromarray(smooth).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    made["one"] = np.array([[[200, 10, 90]]], dtype=np.uint8)
    Image.fromarray(made["one"]).save(root / "one.png")
    (root / "bomb.png").write_bytes(_claims_size(12000, 12000))  # over the limit: warning level
    (root / "bomb2.png").write_bytes(_claims_size(20000, 20000))  # over twice the limit: error level
    os.symlink(root / "gone.png", root / "broken.png")
    made["bad_name"] = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    with open(os.path.join(os.fsencode(root), BAD_NAME), "wb") as f:
        f.write(_png(Image.fromarray(made["bad_name"])))
    return made


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "images"
    made = make_bad_folder(root)
    (root.parent / "list.txt").write_text(f"{root / 'x.jpg'}\n{root / 'a_good0.png'}\n")
    return root, made


def path_of(root: Path, name) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(root), name))) if isinstance(name, bytes) else root / name


def test_each_case_is_read_correctly_or_refused_with_a_reason(bad_folder):
    root, made = bad_folder
    for name, reason in CASES.items():
        image, why = read_image(path_of(root, name))
        if reason is None:
            assert why is None and image.mode == "RGB", (name, why)
        else:
            assert image is None and reason in why and "\n" not in why, (name, why)
    got = lambda name: np.asarray(read_image(root / name)[0])  # noqa: E731
    g16 = np.round(made["gray16"].astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(got("gray16.png"), np.repeat(g16[..., None], 3, axis=2))
    index, palette = made["palette"]
    assert np.array_equal(got("palette.png"), palette[index].astype(np.uint8))
    assert np.array_equal(got("rgba.png"), made["rgba"][..., :3])  # alpha dropped, colours kept
    cmyk = got("cmyk.jpg").astype(np.float64)  # lossy, but not inverted or shifted
    assert np.abs(cmyk - made["cmyk"]).mean() < 4
    assert np.array_equal(got("one.png"), made["one"])
    name = path_of(root, BAD_NAME)
    assert np.array_equal(np.asarray(read_image(name)[0]), made["bad_name"])
    assert display_path(name).endswith("bad\\xffname.png")
    # the folder named x.jpg: not an image when named directly (e.g. in a list)
    assert read_image(root / "x.jpg") == (None, "a folder, not an image file")


def test_tiny_and_odd_images_preprocess_to_the_right_values(bad_folder):
    root, made = bad_folder
    pre = Preprocess(resize=32, crop=32)
    t = pre(read_image(root / "one.png")[0])
    expected = (made["one"][0, 0] / 255.0 - np.array(pre.mean)) / np.array(pre.std)
    assert t.shape == (3, 32, 32)
    np.testing.assert_allclose(t.numpy(), np.broadcast_to(expected[:, None, None], (3, 32, 32)), rtol=1e-6)
    items = ImageFiles(list_images([root]), pre)
    out = [items[i] for i in range(len(items))]
    assert all((tensor is None) != (err is None) for _, _, tensor, err in out)


def file_digest(path: Path) -> bytes:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()


def test_fit_skips_bad_files_with_one_warning_each_and_never_counts_them(bad_folder, tmp_path):
    root, _ = bad_folder
    model = tmp_path / "m.zarr"
    proc = subprocess.run([*CLI, "fit", str(root), str(root.parent / "list.txt"), "--model", str(model), *SMALL],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    bad = {n: r for n, r in CASES.items() if r is not None} | {"x.jpg": "a folder, not an image file"}
    good = [n for n, r in CASES.items() if r is None]
    assert out["skipped"] == len(bad) == 8 and out["added"] == out["n_images"] == len(good) == 9
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipped ")]
    assert len(warnings) == len(bad)
    for name, reason in bad.items():
        [line] = [w for w in warnings if w.startswith(f"warning: skipped {root / name}: ")]
        assert reason in line
    # the ledger holds exactly the images that were read, nothing skipped
    st = ModelStore.open(model)
    ledger = {bytes(d) for d in st.ledger_digests()}
    assert ledger == {file_digest(path_of(root, n)) for n in good} and st.n_images == 9

    # and the same files scored: the readable ones get a score, the others are counted
    res = CliRunner().invoke(app, ["score", str(model), str(root), "--out", str(tmp_path / "o"),
                                   "--loader-workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"scored": 9, "skipped": 7, "out": str(tmp_path / "o")}
    rows = (tmp_path / "o" / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 10 and sum(r.startswith(f"{root}/bad\\xffname.png,") for r in rows) == 1


def test_on_error_fail_stops_at_the_first_bad_file(bad_folder, tmp_path):
    root, _ = bad_folder
    model = tmp_path / "m.zarr"
    proc = subprocess.run([*CLI, "fit", str(root), "--model", str(model), *SMALL, "--on-error", "fail"],
                          capture_output=True, text=True, timeout=600)
    first_bad = min(n for n, r in CASES.items() if r is not None and isinstance(n, str))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: bad image {root / first_bad}: {CASES[first_bad]}")
    assert "warning" not in proc.stderr and not model.exists()  # a failed first fit leaves no model


@pytest.mark.parametrize("cores, cpu, cuda", [(1, 0, 1), (2, 0, 2), (4, 1, 4), (16, 4, 8), (64, 8, 8)])
def test_default_loader_workers(monkeypatch, cores, cpu, cuda):
    """On the CPU, decoding processes would time-share the cores the backbone runs on: one per
    4 cores; for a GPU, the cores up to 8."""
    from padim_ooc.data import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers("cpu") == cpu and default_workers("cuda") == cuda
