"""Export (ONNX, OpenVINO) and the torch-free runtime: the same scores as the PyTorch model, from the
same image files through the real preprocessing; damaged exports are one-line errors."""
from __future__ import annotations

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CROP, RESIZE, cli_error, cli_json, rel, write_images
from padim_ooc.export import runtime
from padim_ooc.export.runtime import ExportError, Scorer

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOL = 1e-4  # relative, the bound; measured 1e-6 to 3e-6 (docs/benchmarks.md)


def _export(model, out, **kw):
    from padim_ooc.export.exporter import export_model

    export_model(model, out, **kw)
    return out


@pytest.fixture(scope="module")
def lite0_fitted(tmp_path_factory, image_dir):
    """A lite0 model (random weights, all 176 channels, crop 64) of image_dir/a."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import padim_ooc as po

    ex = po.Extractor("efficientnet_lite0", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu")
    path = tmp_path_factory.mktemp("lite0") / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=ex, batch_size=10, loader_workers=0)
    return path


@pytest.fixture(scope="module")
def orthogonal_fitted(tmp_path_factory, image_dir):
    """A resnet18 model with the semi-orthogonal embedding (random weights, d 100, crop 64) of image_dir/a."""
    import padim_ooc as po

    ex = po.Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu",
                      embedding="orthogonal")
    path = tmp_path_factory.mktemp("orthogonal") / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=ex, batch_size=10, loader_workers=0)
    return path


@pytest.fixture(scope="module")
def test_files(image_dir):
    return sorted((image_dir / "b").glob("*.png"))


def _torch_scores(model_path, paths):
    import padim_ooc as po

    return po.open_model(model_path, device="cpu").score(paths, batch_size=8)


# ---- preprocessing: bit for bit -------------------------------------------------------------
@pytest.mark.parametrize("shape,size", [((80, 80), 72), ((300, 300), 256), ((100, 37), 72), ((50, 61), 256),
                                        ((257, 255), 224), ((9, 400), 64)])
def test_resize_is_torchvision_bit_for_bit(shape, size):
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(sum(shape) + size)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for a in (rng.integers(0, 256, shape + (3,), dtype=np.uint8),
              (127 + 100 * np.sin(xx[..., None] / 7 + yy[..., None] / 5 + np.arange(3))).astype(np.uint8)):
        ref = TF.resize(torch.from_numpy(a).permute(2, 0, 1), [size, size], antialias=True).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(runtime.resize_uint8(a, size, size), ref)


def test_preprocess_equals_the_models_on_real_images(image_dir):
    """The runtime's preprocessing of real files (ELPV solar cells where installed, and the test
    PNGs) is the model's Preprocess exactly (0 difference), for several resize/crop pairs."""
    from padim_ooc.data import Preprocess, read_image

    images = [read_image(p)[0] for p in sorted((image_dir / "a").glob("*.png"))[:3]]
    try:
        from elpv_dataset.utils import load_dataset

        cells = load_dataset()[0][:4]
        images += [Image.fromarray(np.asarray(c)) for c in cells]  # 300x300 grayscale
    except ImportError:
        pass
    for resize, crop in ((72, 64), (256, 224), (255, 224), (320, 320)):
        pre = Preprocess(resize, crop)
        record = {"resize": resize, "crop": crop, "mean": pre.mean, "std": pre.std}
        for im in images:
            np.testing.assert_array_equal(runtime.preprocess(im, record), pre(im).numpy())


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "F", "I"])
def test_to_rgb_is_the_models(mode):
    from padim_ooc.data import to_rgb

    rng = np.random.default_rng(0)
    if mode in ("I;16", "I", "F"):
        arr = rng.integers(0, 60000, (20, 30)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        img = Image.fromarray(arr)
    else:
        img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
    np.testing.assert_array_equal(np.asarray(runtime.to_rgb(img)), np.asarray(to_rgb(img)))


def test_runtime_imports_no_torch():
    """The runtime module imports only the standard library, numpy, Pillow (and the engines lazily)."""
    tree = ast.parse(Path(runtime.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert names - set(sys.stdlib_module_names) == {"numpy", "PIL", "onnxruntime", "openvino"}


# ---- agreement with PyTorch -----------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["resnet18", "lite0", "orthogonal"])
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_scores_like_pytorch(request, tmp_path, backbone, fmt, test_files):
    """Scores and maps from the same files: onnxruntime and OpenVINO (CPU) equal PyTorch to 1e-4
    (``orthogonal``: resnet18 with the semi-orthogonal embedding, the projection in the graph)."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    model = request.getfixturevalue({"resnet18": "fitted", "lite0": "lite0_fitted",
                                     "orthogonal": "orthogonal_fitted"}[backbone])
    folder = _export(model, tmp_path / "x", format=fmt)
    s0, m0 = _torch_scores(model, test_files)
    engines = ["onnxruntime", "openvino"] if fmt == "openvino" else ["onnxruntime"]
    for engine in engines:
        res = Scorer(folder, engine=engine, threads=2).score(test_files, batch_size=7)
        assert res["scores"].shape == s0.shape and res["maps"].shape == m0.shape
        assert rel(res["scores"], s0) <= TOL, (engine, rel(res["scores"], s0))
        assert rel(res["maps"], m0) <= TOL, (engine, rel(res["maps"], m0))
        assert np.abs(res["scores"] - s0).max() / np.abs(s0).min() <= TOL  # elementwise too
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["preprocess"]["resize"] == RESIZE and meta["preprocess"]["crop"] == CROP
    config = meta["model"]["config"]
    if backbone == "orthogonal":
        assert config["embedding"] == "orthogonal" and config["projection_digest"].startswith("sha256:")
    else:
        assert config["channels"] and len(meta["model"]["statistics_digest"]) == 32


def test_scores_arrays_and_pil_images(fitted, tmp_path, test_files):
    from padim_ooc.data import read_image

    folder = _export(fitted, tmp_path / "x")
    sc = Scorer(folder)
    images = [read_image(p)[0] for p in test_files[:3]]
    a = sc.score(images)
    b = sc.score([np.asarray(im) for im in images])
    c = sc.score_arrays(np.stack([sc.preprocess(im) for im in images]))
    np.testing.assert_array_equal(a["scores"], b["scores"])
    np.testing.assert_array_equal(a["maps"], c["maps"])
    assert sc.score([])["scores"].shape == (0,)


def test_cli_export_and_score_match_the_model(capsys, fitted, tmp_path, image_dir):
    import zarr

    cli_json(capsys, "score", fitted, image_dir / "b", "--out", tmp_path / "ref", "--maps", "--device", "cpu", "-q")
    for fmt in ("onnx", "openvino"):
        out = cli_json(capsys, "export", fitted, "--format", fmt, "--out", tmp_path / fmt)
        assert out["format"] == fmt and not out["calibrated"]
        res = cli_json(capsys, "score", tmp_path / fmt, image_dir / "b", "--out", tmp_path / f"s-{fmt}", "--maps")
        assert res["scored"] == 20 and res["engine"] == ("openvino" if fmt == "openvino" else "onnxruntime")
        ref = list(csv.reader(open(tmp_path / "ref" / "scores.csv")))
        got = list(csv.reader(open(tmp_path / f"s-{fmt}" / "scores.csv")))
        assert got[0] == ref[0] == ["path", "score"] and [r[0] for r in got] == [r[0] for r in ref]
        assert rel([float(r[1]) for r in got[1:]], [float(r[1]) for r in ref[1:]]) <= TOL
        m_ref = zarr.open_array(str(tmp_path / "ref" / "maps.zarr"))[:]
        m_got = zarr.open_array(str(tmp_path / f"s-{fmt}" / "maps.zarr"))[:]
        assert m_got.shape == m_ref.shape and rel(m_got, m_ref) <= 2e-3  # both rounded to float16
    # the standalone copy of the runtime, as a deployment runs it
    proc = subprocess.run([sys.executable, tmp_path / "onnx" / "padim_runtime.py", tmp_path / "onnx",
                           image_dir / "b", "--out", tmp_path / "alone", "--maps"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = list(csv.reader(open(tmp_path / "alone" / "scores.csv")))
    assert rel([float(r[1]) for r in got[1:]], [float(r[1]) for r in ref[1:]]) <= TOL
    assert np.load(tmp_path / "alone" / "maps.npy").shape == (20, CROP, CROP)


def test_calibrated_export_gives_p_values_and_labels(capsys, fitted, tmp_path, image_dir, test_files):
    """A calibration in the store travels into the graph: p-values and labels equal the
    Calibration's own on the PyTorch scores."""
    from padim_ooc.calibration import Calibration, calibrate_normal
    from padim_ooc.store import ModelStore

    model = tmp_path / "cal.zarr"
    shutil.copytree(fitted, model)
    s_cal, _ = _torch_scores(model, test_files)
    cal = calibrate_normal(s_cal.astype(np.float64), 0.1)
    store = ModelStore.open(model, writable=True)
    store._write_attrs(calibration=cal.to_attrs())
    store.close()
    train = sorted((image_dir / "a").glob("*.png"))
    s0, _ = _torch_scores(model, train)
    for fmt in ("onnx", "openvino"):
        folder = _export(model, tmp_path / fmt, format=fmt)
        assert Calibration.from_attrs(json.loads((folder / "metadata.json").read_text())["calibration"]) == cal
        res = Scorer(folder).score(train)
        np.testing.assert_array_equal(res["p_values"], cal.p_values(s0))
        np.testing.assert_array_equal(res["labels"], cal.labels(s0))
    cli_json(capsys, "score", tmp_path / "onnx", image_dir / "a", "--out", tmp_path / "out")
    rows = list(csv.reader(open(tmp_path / "out" / "scores.csv")))
    assert rows[0] == ["path", "score", "p_value", "label"]
    assert [float(r[2]) for r in rows[1:]] == list(cal.p_values(s0))
    assert [r[3] for r in rows[1:]] == list(cal.labels(s0))


def test_threshold_and_calibration_scores_are_rounded_safely():
    from padim_ooc.export.exporter import _round32

    t = 1.0 + 1e-9  # between float32 1.0 and the next float32
    assert _round32(t, down=True) == 1.0 and _round32(t, down=False) == float(np.nextafter(np.float32(1), 2))
    assert _round32(0.5, down=True) == _round32(0.5, down=False) == 0.5


def test_float16_precision_halves_the_size(fitted, tmp_path, test_files):
    a = _export(fitted, tmp_path / "f32", external_data=True)
    b = _export(fitted, tmp_path / "f16", external_data=True, float16=True)
    size = lambda f: (f / "statistics.bin").stat().st_size
    assert size(b) < 0.52 * size(a)
    s0, m0 = _torch_scores(fitted, test_files)
    res = Scorer(b).score(test_files)
    err = rel(res["scores"], s0)
    assert 1e-7 < err <= 1e-2, err  # measured: docs/benchmarks.md
    assert json.loads((b / "metadata.json").read_text())["precision_dtype"] == "float16"


def test_dynamo_exporter_gives_the_same_graph(fitted, tmp_path, test_files):
    pytest.importorskip("onnxscript")
    a = Scorer(_export(fitted, tmp_path / "ts")).score(test_files[:4])
    b = Scorer(_export(fitted, tmp_path / "dy", exporter="dynamo")).score(test_files[:4])
    assert rel(b["scores"], a["scores"]) <= 1e-5 and rel(b["maps"], a["maps"]) <= 1e-5


# ---- damaged or mismatched exports: one line ------------------------------------------------
@pytest.fixture(scope="module")
def good_export(tmp_path_factory, fitted):
    return _export(fitted, tmp_path_factory.mktemp("good") / "x", external_data=True)


def _damaged(good_export, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(good_export, folder)
    return folder


def _edit(folder, change, *, redigest=False):
    meta = json.loads((folder / "metadata.json").read_text())
    change(meta)
    if redigest:
        runtime.write_metadata(folder, meta)
    else:
        (folder / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,text", [
    (lambda f: (f / "metadata.json").unlink(), "has no metadata.json"),
    (lambda f: (f / "metadata.json").write_text("{not json"), "not JSON"),
    (lambda f: _edit(f, lambda m: m["preprocess"].update(resize=80)), "changed after the export"),
    (lambda f: _edit(f, lambda m: m.update(format_version=99), redigest=True), "format version 99"),
    (lambda f: (f / "statistics.bin").unlink(), "statistics.bin is missing"),
    (lambda f: os.truncate(f / "statistics.bin", 1000), "statistics.bin has 1000 bytes"),
    (lambda f: (f / "model.onnx").write_bytes(b"x" * (f / "model.onnx").stat().st_size), "SHA-256 differs"),
    (lambda f: _edit(f, lambda m: m["preprocess"].update(crop=48), redigest=True), "mismatched"),
])
def test_damaged_export_is_one_line(capsys, good_export, tmp_path, image_dir, damage, text):
    folder = _damaged(good_export, tmp_path)
    damage(folder)
    with pytest.raises(ExportError, match=text):
        Scorer(folder)
    cli_error(capsys, "score", folder, image_dir / "b", "--out", tmp_path / "out", text=text)
    assert not (tmp_path / "out").exists()


def test_missing_metadata_says_what_an_export_is(tmp_path):
    with pytest.raises(ExportError, match="has no metadata.json"):
        Scorer(tmp_path)


def test_wrong_input_size_and_options_are_one_line(capsys, good_export, tmp_path, image_dir):
    sc = Scorer(good_export)
    with pytest.raises(ExportError, match=r"expected a batch of shape \(N, 3, 64, 64\), got \(2, 3, 72, 72\)"):
        sc.score_arrays(np.zeros((2, 3, 72, 72), np.float32))
    with pytest.raises(ExportError, match="uint8 of shape"):
        sc.preprocess(np.zeros((10, 10), np.uint8))
    cli_error(capsys, "score", good_export, image_dir / "b", "--out", tmp_path / "o", "--sigma", "2",
              text="sigma 4.0")
    cli_error(capsys, "score", good_export, image_dir / "b", "--out", tmp_path / "o", "--workers", "2",
              text="--workers")
    cli_error(capsys, "score", good_export, image_dir / "b", "--out", tmp_path / "o", "--device", "cuda",
              text="scores on the CPU")
    cli_error(capsys, "export", good_export, "--out", tmp_path / "e", text="model")
    cli_error(capsys, "export", tmp_path / "nothing", "--out", tmp_path / "e", text="model not found")


def test_export_refuses_a_full_folder_and_bad_format(capsys, fitted, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cli_error(capsys, "export", fitted, "--out", tmp_path / "full", text="not empty")
    cli_error(capsys, "export", fitted, "--out", tmp_path / "y", "--format", "tflite", text="unknown export format")
    assert not (tmp_path / "y").exists()


def test_bad_images_are_skipped_or_fail(capsys, good_export, tmp_path, image_dir):
    data = tmp_path / "data"
    shutil.copytree(image_dir / "b", data)
    (data / "zz.png").write_bytes(b"not a png")
    res = cli_json(capsys, "score", good_export, data, "--out", tmp_path / "o1")
    assert res["scored"] == 20 and res["skipped"] == 1
    cli_error(capsys, "score", good_export, data, "--out", tmp_path / "o2", "--on-error", "fail", text="zz.png")


# ---- above the 2 GB protobuf limit ----------------------------------------------------------
@pytest.mark.slow
def test_export_above_2gb_writes_loads_and_scores(tmp_path, image_dir):
    """A synthetic store whose precision is 2.2 GB (resnet18 at crop 224: 3136 positions, d = 420)
    exports with external data, loads and scores like PyTorch (40 s here, 19 s of it the export;
    peak RSS 3.4 GB, 4.4 GB of disk)."""
    import padim_ooc as po
    from padim_ooc.store import ModelStore

    ex = po.Extractor("resnet18", weights=None, seed=0, dims=420, resize=256, crop=224, device="cpu")
    p, d = ex.positions, ex.dims
    assert p * d * d * 4 > 2**31
    model = tmp_path / "big.zarr"
    store = ModelStore.create(model, ex.config())
    store._write_attrs(state="state-000001", seq=1, n_images=100)  # statistics never written: only the final arrays are read
    name, mean, prec = store.begin_final(0.01)
    step = int(store.attrs["chunk_positions"])
    rng = np.random.default_rng(0)
    for start in range(0, p, step):
        k = min(step, p - start)
        mean[start:start + k] = rng.normal(0, 0.1, (k, d)).astype(np.float32)
        prec[start:start + k] = np.broadcast_to(np.eye(d, dtype=np.float32) * 2, (k, d, d))
    store.commit_final(name, 0.01)
    store.close()
    t = time.time()
    folder = _export(model, tmp_path / "x")
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["external_data"] and (folder / "statistics.bin").stat().st_size > 2**31
    assert (folder / "model.onnx").stat().st_size < 100 * 2**20
    export_s = time.time() - t
    files = sorted((image_dir / "b").glob("*.png"))[:3]
    s0, m0 = _torch_scores(model, files)
    res = Scorer(folder, threads=2).score(files)
    assert rel(res["scores"], s0) <= TOL and rel(res["maps"], m0) <= TOL
    print(f"export {export_s:.0f} s")


# ---- the done-when: a CLI-fitted model scores the same where torch is not ---------------------
@pytest.mark.slow
def test_runtime_in_a_fresh_venv_without_torch(tmp_path, image_dir):
    from conftest import run_cli

    run_cli("fit", image_dir / "a", "--model", tmp_path / "m.zarr", "--weights", "none", "--resize", RESIZE,
            "--crop", CROP, "--device", "cpu", "--loader-workers", "0", "-q", timeout=600)
    run_cli("score", tmp_path / "m.zarr", image_dir / "b", "--out", tmp_path / "ref", "--device", "cpu", "-q")
    run_cli("export", tmp_path / "m.zarr", "--out", tmp_path / "x")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    py = venv / "bin" / "python"
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "onnxruntime", "numpy", "pillow"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install into a venv here: {pip.stderr.strip().splitlines()[-1:]}")
    no_torch = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    shutil.copytree(tmp_path / "x", tmp_path / "deployed")  # the export alone, away from the repository
    proc = subprocess.run([py, tmp_path / "deployed" / "padim_runtime.py", tmp_path / "deployed", image_dir / "b",
                           "--out", tmp_path / "out"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    ref = list(csv.reader(open(tmp_path / "ref" / "scores.csv")))
    got = list(csv.reader(open(tmp_path / "out" / "scores.csv")))
    assert [r[0].rsplit("/", 1)[-1] for r in got] == [r[0].rsplit("/", 1)[-1] for r in ref]
    assert rel([float(r[1]) for r in got[1:]], [float(r[1]) for r in ref[1:]]) <= TOL
