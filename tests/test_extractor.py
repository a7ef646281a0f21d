"""Backbones, channel selection, weights loading (local files only), preprocessing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights, get_model

import padim_ooc as po
from padim_ooc.data import decode_rgb
from padim_ooc.extractor import draw_channels

from conftest import cli_json, run_cli


def test_resnet18_shapes_and_seeded_channels(extractor):
    assert extractor.layer_channels == [64, 128, 256]
    assert extractor.grid == (16, 16)  # stride 4 at a 64-pixel crop
    assert extractor.dims == 100 and len(set(extractor.channels)) == 100
    assert extractor.channels == draw_channels(448, 100, 0)
    assert draw_channels(448, 100, 1) != extractor.channels
    feats = extractor.embed(torch.randn(3, 3, 64, 64))
    assert feats.shape == (3, 100, 16, 16) and feats.dtype == torch.float32


def test_channels_are_the_selected_backbone_maps(extractor):
    """The embedding is layer maps, nearest-upsampled, at the drawn channel indices."""
    x = torch.randn(2, 3, 64, 64)
    maps = extractor._module(x)
    full = torch.cat([torch.nn.functional.interpolate(maps[k], size=(16, 16), mode="nearest")
                      for k in ("layer1", "layer2", "layer3")], dim=1)
    assert torch.equal(extractor.embed(x), full[:, extractor.channels])


def test_wide_resnet50_defaults():
    ex = po.Extractor("wide_resnet50_2", weights=None, resize=64, crop=64, device="cpu")
    assert ex.layer_channels == [256, 512, 1024] and ex.dims == 550
    assert ex.embed(torch.randn(1, 3, 64, 64)).shape == (1, 550, 16, 16)


def test_bad_options_are_clear():
    with pytest.raises(po.PadimError, match=r"dims 500 is out of range \(1 to 448"):
        po.Extractor("resnet18", weights=None, dims=500, crop=64, resize=64, device="cpu")
    with pytest.raises(po.PadimError, match="unknown backbone 'resnet7'"):
        po.Extractor("resnet7", weights=None)
    with pytest.raises(po.PadimError, match="layer 'layer9' not found"):
        po.Extractor("resnet18", weights=None, layers=["layer1", "layer9"], crop=64, resize=64)
    with pytest.raises(po.PadimError, match="weights file not found"):
        po.Extractor("resnet18", weights="/nonexistent.pth", crop=64, resize=64)


def test_local_weights_file(tmp_path):
    torch.manual_seed(123)
    net = get_model("resnet18", weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    ex = po.Extractor("resnet18", weights=str(path), crop=64, resize=64, device="cpu")
    assert ex.weights_id.startswith("file:")
    assert torch.equal(ex._module.conv1.weight, net.conv1.weight)
    # reopening needs the same file; another file is refused by the digest check
    assert po.Extractor.from_config(ex.config(), weights=str(path)).weights_digest == ex.weights_digest
    with pytest.raises(po.PadimError, match="pass the same file"):
        po.Extractor.from_config(ex.config())
    torch.save(get_model("resnet18", weights=None).state_dict(), tmp_path / "other.pth")
    with pytest.raises(po.PadimError, match="weights differ"):
        po.Extractor.from_config(ex.config(), weights=str(tmp_path / "other.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(po.PadimError, match="cannot load weights"):
        po.Extractor("resnet18", weights=str(tmp_path / "bad.pth"), crop=64, resize=64)


def test_torchvision_default_weights_from_the_cache(tmp_path, monkeypatch):
    """`--weights default` goes through torchvision's weights API and the torch cache."""
    torch.manual_seed(7)
    net = get_model("resnet18", weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ex = po.Extractor("resnet18", weights="default", crop=64, resize=64, device="cpu")
    assert ex.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(ex._module.conv1.weight, net.conv1.weight)
    again = po.Extractor.from_config(ex.config())
    assert again.weights_digest == ex.weights_digest


def test_random_weights_are_seeded():
    a = po.Extractor("resnet18", weights=None, seed=5, crop=64, resize=64)
    b = po.Extractor("resnet18", weights=None, seed=5, crop=64, resize=64)
    c = po.Extractor("resnet18", weights=None, seed=6, crop=64, resize=64)
    assert a.weights_digest == b.weights_digest != c.weights_digest


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "RGB"])
def test_decode_modes_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = decode_rgb(path.read_bytes())
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode in ("L", "I;16"):
        np.testing.assert_array_equal(np.asarray(out)[..., 0], np.asarray(rgb.convert("L")))


def test_preprocess_shape(extractor):
    img = Image.fromarray(np.zeros((100, 50, 3), np.uint8))
    t = extractor.preprocess(img)
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    np.testing.assert_allclose(t[:, 0, 0].numpy(), -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]), rtol=1e-5)


def _precision_snapshot() -> dict:
    """Every TF32 / reduced-precision setting torch has, read back as it stands."""
    b = torch.backends
    out = {f"{name}.{op}": getattr(getattr(b, name), op).fp32_precision
           for name, ops in (("cudnn", ("conv", "rnn")), ("cuda", ("matmul",)), ("mkldnn", ("conv", "matmul", "rnn")))
           for op in ops}
    out |= {"cudnn": b.cudnn.fp32_precision, "mkldnn": b.mkldnn.fp32_precision, "generic": b.fp32_precision}
    for key, read in (("legacy.matmul", torch.get_float32_matmul_precision),
                      ("legacy.cudnn", lambda: b.cudnn.allow_tf32),
                      ("legacy.cublas", lambda: b.cuda.matmul.allow_tf32)):
        try:
            out[key] = read()
        except RuntimeError:  # torch refuses to read a legacy flag after some new-API settings
            out[key] = "unreadable"
    return out


def _reset_precision() -> None:
    """torch's start-up settings (checked against a snapshot taken before any change)."""
    b = torch.backends
    b.fp32_precision = "none"  # the generic setting, which also writes every backend's
    b.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("highest")
    b.cuda.matmul.fp32_precision = b.mkldnn.matmul.fp32_precision = b.mkldnn.conv.fp32_precision = "none"


PRIOR_SETTINGS = {
    "torch defaults": lambda: None,
    "matmul high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul medium": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy cudnn tf32 off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "new-API cuda matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "new-API mkldnn bf16": lambda: setattr(torch.backends.mkldnn, "fp32_precision", "bf16"),
}


@pytest.mark.parametrize("prior", list(PRIOR_SETTINGS))
def test_float32_precision_turns_tf32_off_and_restores_the_settings(prior):
    """Inside: TF32 off for cuDNN convs and cuBLAS matmuls, full float32 for oneDNN, and
    torch's own consistency checks pass; after: every setting exactly as it was, also
    when nested and entered from several threads at once."""
    import threading

    from padim_ooc.extractor import float32_precision

    pristine = _precision_snapshot()
    try:
        PRIOR_SETTINGS[prior]()
        before = _precision_snapshot()
        inside = []
        with float32_precision():
            with float32_precision():
                inside.append(_precision_snapshot())
            inside.append(_precision_snapshot())
        barrier = threading.Barrier(3)

        def use():
            with float32_precision():
                barrier.wait()  # all three inside at once
                inside.append(_precision_snapshot())
        threads = [threading.Thread(target=use) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _precision_snapshot() == before
        assert len(inside) == 5
        for snap in inside:
            assert snap["cudnn.conv"] == snap["cuda.matmul"] == "ieee"
            assert snap["mkldnn.conv"] == snap["mkldnn.matmul"] == "ieee"
            assert snap["legacy.cublas"] is False  # read through torch's legacy/new consistency check
    finally:
        _reset_precision()
    assert _precision_snapshot() == pristine


def test_backbone_runs_in_full_float32(extractor):
    """While the backbone runs: no autocast, TF32 off (as on CUDA), float32 in; the
    features equal a float64 run of the same network to float32 rounding."""
    seen = []

    def record(module, args):
        seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"),
                     torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
    before = _precision_snapshot()
    handle = extractor._module.register_forward_pre_hook(record)
    try:
        x = torch.randn(2, 3, 64, 64)
        feats = extractor.embed(x)
    finally:
        handle.remove()
    assert seen == [(torch.float32, False, False, "ieee", "ieee")]
    assert _precision_snapshot() == before
    double = copy.deepcopy(extractor._module).double().eval()  # (a deep copy of a GraphModule trains)
    maps = double(x.double())
    full = torch.cat([torch.nn.functional.interpolate(maps[k], size=extractor.grid, mode="nearest")
                      for k in extractor.layers], dim=1)[:, extractor.channels]
    assert feats.dtype == torch.float32
    assert float((feats.double() - full).abs().max() / full.abs().max()) < 1e-5  # bfloat16: ~1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_features_equal_cpu_features_to_float32_rounding(extractor):
    """float32 with TF32 off on the GPU: the CPU's features to float32 rounding (not bit for bit),
    and the same features every time for the same batch."""
    gpu = po.Extractor.from_config(extractor.config(), device="cuda")
    x = torch.randn(4, 3, 64, 64)
    a, b = gpu.embed(x), gpu.embed(x)
    assert a.dtype == torch.float32 and a.device.type == "cuda"
    assert torch.equal(a, b)
    cpu = extractor.embed(x)
    assert float((a.cpu() - cpu).abs().max() / cpu.abs().max()) < 1e-5  # TF32 rounds inputs to 10 mantissa bits


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cpu,cuda", ""])
def test_unknown_device_is_one_clear_error(device):
    with pytest.raises(po.PadimError, match=r"unknown device .*: use auto, cpu, cuda or cuda:N"):
        po.Extractor("resnet18", weights=None, resize=64, crop=64, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error():
    for device in ("cuda", "cuda:1"):
        with pytest.raises(po.PadimError, match=f"--device {device} was asked for but no CUDA GPU"):
            po.Extractor("resnet18", weights=None, resize=64, crop=64, device=device)


def test_bad_device_on_the_command_line(tmp_path, image_dir):
    """A user error (exit 2, one line naming the valid values), not an internal error."""
    bad = run_cli("fit", image_dir / "a", "--model", tmp_path / "m.zarr", "--weights", "none",
                  "--device", "tpu", ok=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown device 'tpu': use auto, cpu, cuda or cuda:N (N a GPU index)"
    if not torch.cuda.is_available():
        bad = run_cli("fit", image_dir / "a", "--model", tmp_path / "m.zarr", "--weights", "none",
                      "--device", "cuda", ok=False)
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines() == [
            "error: --device cuda was asked for but no CUDA GPU is available (use cpu or auto)"]
    assert not (tmp_path / "m.zarr").exists()


def test_presets_name_the_papers_v1_weights():
    """The paper's configurations use torchvision's original ImageNet weights (V1), while
    `--weights default` stays torchvision's current default (V2 for wide_resnet50_2)."""
    from torchvision.models import Wide_ResNet50_2_Weights

    from padim_ooc.backbones import torchvision_weights
    from padim_ooc.presets import preset, resolve

    assert torchvision_weights("wide_resnet50_2", preset("wr50-rd550").weights) is \
        Wide_ResNet50_2_Weights.IMAGENET1K_V1
    assert torchvision_weights("resnet18", resolve("r18-rd100").weights) is ResNet18_Weights.IMAGENET1K_V1
    assert torchvision_weights("wide_resnet50_2", "default") is Wide_ResNet50_2_Weights.IMAGENET1K_V2
    assert resolve(None).weights == "default"
    assert resolve("wr50-rd550", weights="none").weights == "none"  # given explicitly: overrides
    assert torchvision_weights("resnet18", "torchvision:IMAGENET1K_V1") is ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(po.PadimError, match=r"unknown weights .*IMAGENET1K_V3.* one of IMAGENET1K_V1"):
        torchvision_weights("resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V3")
    with pytest.raises(po.PadimError, match="unknown weights 'torchvision:ResNet50_Weights.IMAGENET1K_V1'"):
        po.Extractor("resnet18", weights="torchvision:ResNet50_Weights.IMAGENET1K_V1", resize=64, crop=64)


def test_a_preset_with_another_backbone_carries_its_weights_over():
    """`--preset` with `--backbone` and no `--weights`: the preset's torchvision member for that
    backbone if it has one (the ResNet presets' V1), else `default`; given weights always win."""
    from torchvision.models import ResNet34_Weights, Wide_ResNet50_2_Weights

    from padim_ooc.backbones import torchvision_weights
    from padim_ooc.presets import resolve

    got = resolve("r18-rd100", backbone="wide_resnet50_2")
    assert got.weights == "torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"
    assert torchvision_weights("wide_resnet50_2", got.weights) is Wide_ResNet50_2_Weights.IMAGENET1K_V1
    got = resolve("wr50-rd550", backbone="resnet34")
    assert torchvision_weights("resnet34", got.weights) is ResNet34_Weights.IMAGENET1K_V1
    assert resolve("wr50-rd550", backbone="resnet18").weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert resolve("r18-rd100", backbone="efficientnet_lite0").weights == "default"  # not torchvision
    assert resolve("lite0", backbone="resnet18").weights == "default"
    assert resolve("r18-rd100", backbone="resnet18").weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert resolve("r18-rd100", backbone="wide_resnet50_2", weights="default").weights == "default"
    assert resolve(None, backbone="wide_resnet50_2").weights == "default"


def test_preset_backbone_override_and_the_benchmarks_weights_note(tmp_path, monkeypatch, capsys):
    """`fit --preset r18-rd100 --backbone mobilenet_v2` loads mobilenet_v2's V1 weights (not
    ResNet18's: refused before), and the benchmark's notes flag weights other than the preset's
    (V2 from `default`). Random state dicts in the torch cache under V1's and V2's file names."""
    from torchvision.models import MobileNet_V2_Weights as W

    from padim_ooc.recipes.benchmark import overrides

    from conftest import write_images

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    nets = {}
    for seed, member in enumerate((W.IMAGENET1K_V1, W.IMAGENET1K_V2)):
        torch.manual_seed(seed)
        nets[member] = get_model("mobilenet_v2", weights=None)
        torch.save(nets[member].state_dict(), cache / member.url.rsplit("/", 1)[1])
    write_images(tmp_path / "imgs", 3, seed=13)
    model = tmp_path / "m.zarr"
    layers = ["features.3", "features.6"]
    cli_json(capsys, "fit", tmp_path / "imgs", "--model", model, "--preset", "r18-rd100", "--backbone",
             "mobilenet_v2", "--layers", ",".join(layers), "--dims", "10", "--resize", "72", "--crop", "64",
             "--loader-workers", "0", "-q", "--no-finalize")
    info = cli_json(capsys, "info", model)
    assert info["weights"] == "torchvision:MobileNet_V2_Weights.IMAGENET1K_V1" and info["backbone"] == "mobilenet_v2"
    ex = po.open_model(model).extractor
    assert torch.equal(ex._module.state_dict()["features.0.0.weight"], nets[W.IMAGENET1K_V1].features[0][0].weight)
    # the benchmark's notes: V1 is what the preset gives mobilenet_v2, V2 (`default`) is flagged
    assert not [n for n in overrides(ex, "r18-rd100") if "weights" in n]
    v2 = po.Extractor("mobilenet_v2", layers=layers, dims=10, weights="default", resize=72, crop=64, device="cpu")
    assert v2.weights_id == "torchvision:MobileNet_V2_Weights.IMAGENET1K_V2"
    notes = overrides(v2, "r18-rd100")
    assert "weights MobileNet_V2_Weights.IMAGENET1K_V2 (preset: MobileNet_V2_Weights.IMAGENET1K_V1)" in notes
    assert "backbone mobilenet_v2 (preset: resnet18)" in notes


@pytest.mark.parametrize("crop", [64, 100])
def test_patch_layout_equals_interpolated_concat(crop):
    """embed_patches writes the nearest-upsampled channels in place: the same values as
    F.interpolate + concat + select, also when the grid is not a multiple (crop 100: 25, 13, 7)."""
    ex = po.Extractor("resnet18", weights=None, resize=crop, crop=crop, device="cpu")
    x = torch.randn(2, 3, crop, crop)
    maps = ex._module(x.contiguous(memory_format=torch.channels_last))
    full = torch.cat([torch.nn.functional.interpolate(maps[k], size=ex.grid, mode="nearest")
                      for k in ex.layers], dim=1)[:, ex.channels]
    patches = ex.embed_patches(x)
    assert patches.shape == (ex.positions, 2, 100) and patches.is_contiguous()
    assert torch.equal(patches, full.flatten(2).permute(2, 0, 1))
    assert torch.equal(ex.embed(x), full)
    # written into a strided view (the fit's fold buffer): the same values, the rest untouched
    buffer = torch.full((ex.positions, 5, 100), -7.0)
    into = ex.embed_patches(x, out=buffer[:, 1:3])
    assert into.data_ptr() == buffer[:, 1:3].data_ptr()
    assert torch.equal(buffer[:, 1:3], patches)
    assert bool((buffer[:, [0, 3, 4]] == -7).all())
    with pytest.raises(ValueError, match="out must be float32"):
        ex.embed_patches(x, out=buffer[:, :1])
