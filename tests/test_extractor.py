"""Backbones, channel selection, weights loading (local files only), preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights, get_model

import padim_ooc as po
from padim_ooc.data import decode_rgb
from padim_ooc.extractor import draw_channels


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


def test_autocast_backbone_gives_float32_features_close_to_exact(extractor):
    """The bfloat16 path (default on CUDA) exercised on the CPU: float32 out, ~1e-2 relative."""
    amp = po.Extractor("resnet18", weights=None, seed=0, resize=72, crop=64, device="cpu", amp=True)
    assert amp.amp and not extractor.amp
    x = torch.randn(2, 3, 64, 64)
    a, b = amp.embed(x), extractor.embed(x)
    assert a.dtype == torch.float32
    assert float((a - b).abs().max() / b.abs().max()) < 0.1
    assert not torch.equal(a, b)


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
