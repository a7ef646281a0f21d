"""Scores against an independent Mahalanobis (scipy), maps, and the finalize step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

import padim_ooc as po
from padim_ooc.data import decode_rgb, list_images
from padim_ooc.finalize import precision_block
from padim_ooc.score import anomaly_maps, mahalanobis


def test_mahalanobis_equals_scipy(fitted_model, image_dir, extractor):
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in list_images([image_dir / "b"])[:3]])
    feats = extractor.embed(x)
    mean, prec = fitted_model._statistics()
    dist = mahalanobis(feats, mean, prec).numpy()  # (B, h, w)
    cov = fitted_model.covariance()
    mu = fitted_model.mean
    eps = fitted_model.attrs["eps"]
    h, w = extractor.grid
    f = feats.double().numpy()
    for pos in (0, 17, h * w // 2, h * w - 1):
        i, j = divmod(pos, w)
        vi = np.linalg.inv(cov[pos] + eps * np.eye(cov.shape[1]))
        for b in range(3):
            ref = scipy_mahalanobis(f[b, :, i, j], mu[pos], vi)
            assert dist[b, i, j] == pytest.approx(ref, rel=2e-4)


def test_maps_are_upsampled_blurred_distances(fitted_model, image_dir, extractor):
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in list_images([image_dir / "b"])[:2]])
    scores, maps = fitted_model.score(x)
    assert maps.shape == (2, 64, 64)
    np.testing.assert_allclose(scores, maps.reshape(2, -1).max(axis=1))
    mean, prec = fitted_model._statistics()
    dist = mahalanobis(extractor.embed(x), mean, prec)
    up = torch.nn.functional.interpolate(dist.unsqueeze(1), size=(64, 64), mode="bilinear",
                                         align_corners=False).squeeze(1).numpy()
    # independent blur: scipy's gaussian_filter with symmetric-reflect edges differs only at borders
    ref = np.stack([gaussian_filter(u, sigma=4, mode="mirror", truncate=4.0) for u in up])
    np.testing.assert_allclose(maps[:, 20:44, 20:44], ref[:, 20:44, 20:44], rtol=1e-4)


def test_score_from_paths_equals_tensor(fitted_model, image_dir, extractor):
    paths = list_images([image_dir / "b"])[:3]
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in paths])
    s_paths, _ = fitted_model.score(paths)
    s_tensor, _ = fitted_model.score(x)
    np.testing.assert_allclose(s_paths, s_tensor, rtol=1e-6)


def test_precision_block_is_the_inverse():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 160, 200))  # d > 150: the batched-LU trap on this stack
    m2 = a @ a.transpose(0, 2, 1)
    prec = precision_block(m2, 201, 0.01)
    for p in range(4):
        ref = np.linalg.inv(m2[p] / 200 + 0.01 * np.eye(160))
        np.testing.assert_allclose(prec[p], ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())


def test_unfinalized_model_cannot_score(tmp_path, image_dir, extractor):
    model = po.fit([image_dir / "a"], tmp_path / "m.zarr", extractor=extractor, loader_workers=0, finalize=False)
    with pytest.raises(po.PadimError, match="not finalized"):
        model.score(torch.zeros(1, 3, 64, 64))


def test_separable_blur_equals_torchvision_2d():
    from torchvision.transforms.v2 import functional as TF

    from padim_ooc.score import gaussian_blur

    x = torch.rand(3, 1, 70, 50)
    for sigma in (1.0, 4.0):
        k = 2 * int(4 * sigma + 0.5) + 1
        np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), TF.gaussian_blur(x, [k, k], [sigma, sigma]).numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, size, sigma", [((3, 56, 56), 224, 4.0), ((2, 7, 13), 100, 1.5), ((2, 8, 8), 32, 0.0)])
def test_map_operator_equals_interpolate_then_blur(shape, size, sigma):
    """Maps as two matrix products equal torch's bilinear upsampling then torchvision's
    2-D Gaussian blur (reflect edges), borders included."""
    from torchvision.transforms.v2 import functional as TF

    dist = torch.rand(*shape) * 10
    ref = torch.nn.functional.interpolate(dist.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        k = 2 * int(4 * sigma + 0.5) + 1
        ref = TF.gaussian_blur(ref, [k, k], [sigma, sigma])
    got = anomaly_maps(dist, size, sigma)
    assert got.shape == (shape[0], size, size)
    np.testing.assert_allclose(got.numpy(), ref.squeeze(1).numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_blocked_mahalanobis_equals_direct():
    """Cache-sized position blocks (here several, with a short last one) == one direct product."""
    g = torch.Generator().manual_seed(0)
    p, b, d = 1100, 32, 64
    patches, mean = torch.randn(p, b, d, generator=g), torch.randn(p, d, generator=g)
    a = torch.randn(p, d, d, generator=g)
    prec = a @ a.transpose(1, 2) / d
    from padim_ooc.score import MAHALANOBIS_BLOCK_BYTES, mahalanobis_patches

    assert MAHALANOBIS_BLOCK_BYTES // (b * d * 4) < p
    diff = patches - mean.unsqueeze(1)
    ref = torch.einsum("pbi,pij,pbj->pb", diff.double(), prec.double(), diff.double()).sqrt()
    np.testing.assert_allclose(mahalanobis_patches(patches, mean, prec).numpy(), ref.numpy(), rtol=1e-4)


def test_score_writer_to_an_fsspec_url():
    """scores.csv and maps.zarr go to any URL fsspec and zarr accept (here memory://)."""
    import csv
    import io
    from pathlib import Path

    import fsspec
    import zarr

    from padim_ooc.outputs import ScoreWriter

    paths = [Path("a.png"), Path("b.png"), Path("c.png")]
    maps = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    with ScoreWriter("memory://padim_out/run1", paths, crop=4, maps=True) as w:
        w.add([2], np.array([3.5]), maps[2:3])
        w.add([0], np.array([1.5]), maps[0:1])  # b.png was skipped
    with fsspec.open("memory://padim_out/run1/scores.csv", "r") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    assert rows == [["path", "score"], ["a.png", "1.5"], ["c.png", "3.5"]]
    stored = zarr.open_array("memory://padim_out/run1/maps.zarr", mode="r")
    assert stored.shape == (2, 4, 4) and stored.attrs["paths"] == ["a.png", "c.png"]
    np.testing.assert_array_equal(stored[...], maps[[0, 2]].astype(np.float16))


def test_score_writer_to_a_file_url(tmp_path):
    """maps.zarr under a file:// URL: zarr must be told to create its folders (it was an error)."""
    import zarr

    from padim_ooc.outputs import ScoreWriter

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    url = f"file://{tmp_path}/deep/run"
    with ScoreWriter(url, paths, crop=4, maps=True) as w:
        w.add([1, 0], np.array([2.0, 1.0]), maps[[1, 0]])
    assert (tmp_path / "deep/run/scores.csv").read_text().splitlines()[1:] == [f"{paths[0]},1.0", f"{paths[1]},2.0"]
    stored = zarr.open_array(str(tmp_path / "deep/run/maps.zarr"), mode="r")
    np.testing.assert_array_equal(stored[...], maps.astype(np.float16))


def test_score_writer_compacts_maps_after_skipped_images(tmp_path, monkeypatch):
    """Skipped images at the start, in the middle (runs of 1 and 3) and at the end, batches out of
    order, and copies cut into slices of 2 maps: maps.zarr holds exactly the kept maps, in order."""
    from pathlib import Path

    import zarr

    import padim_ooc.outputs as outputs

    monkeypatch.setattr(outputs, "COPY_BYTES", 2 * 4 * 4 * 2)  # 2 float16 (4, 4) maps per copy
    n = 23
    maps = np.random.default_rng(1).random((n, 4, 4)).astype(np.float32)
    skipped = {0, 5, 9, 10, 11, 22}
    kept = [i for i in range(n) if i not in skipped]
    paths = [Path(f"{i:02d}.png") for i in range(n)]
    writes = []
    original = zarr.Array.__setitem__
    monkeypatch.setattr(zarr.Array, "__setitem__", lambda arr, sel, v: (writes.append(sel), original(arr, sel, v)))
    with outputs.ScoreWriter(tmp_path / "out", paths, crop=4, maps=True) as w:
        for batch in (kept[8:13], kept[:3], kept[3:8], kept[13:]):
            w.add(batch, maps[batch].max(axis=(1, 2)), maps[batch])
    # one write per run of consecutive images (6 runs in the 4 batches), then runs 1-4, 6-8 and
    # 12-21 moved in slices of 2 (2 + 2 + 5): not one write per map (17 + 17)
    assert len(writes) == 6 + 9, writes
    stored = zarr.open_array(str(tmp_path / "out" / "maps.zarr"), mode="r")
    assert stored.shape == (len(kept), 4, 4) and stored.attrs["paths"] == [f"{i:02d}.png" for i in kept]
    np.testing.assert_array_equal(stored[...], maps[kept].astype(np.float16))


def test_score_cli_maps_with_a_bad_image_in_the_middle(fitted_model, tmp_path, image_dir):
    """`score --maps` with an unreadable file between good ones: maps.zarr holds the maps of the
    readable images, as scoring them alone gives, in input order."""
    import zarr
    from typer.testing import CliRunner

    from padim_ooc.cli import app

    good = list_images([image_dir / "b"])[:7]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    files = [*good[:3], bad, *good[3:]]
    result = CliRunner().invoke(app, ["score", str(fitted_model.store.path), *map(str, files), "--out", str(tmp_path / "o"),
                                      "--maps", "--batch-size", "3", "--device", "cpu", "--loader-workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    stored = zarr.open_array(str(tmp_path / "o" / "maps.zarr"), mode="r")
    assert stored.attrs["paths"] == [str(p) for p in good]
    _, ref = fitted_model.score(good)
    np.testing.assert_allclose(stored[...].astype(np.float32), ref, rtol=2e-3, atol=1e-3 * float(np.abs(ref).max()))


def test_score_cli_every_image_bad_or_on_error_fail(fitted_model, tmp_path, image_dir):
    """Nothing scored is an error (as in fit), and a failed run leaves no output folder behind."""
    from typer.testing import CliRunner

    from padim_ooc.cli import app

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    model = str(fitted_model.store.path)
    runner = CliRunner()
    result = runner.invoke(app, ["score", model, str(bad / "zero.png"), str(bad / "text.png"),
                                 "--out", str(tmp_path / "o4"), "--device", "cpu", "-q"])
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: no image could be read: nothing was scored (2 given)"], result.stderr
    assert not (tmp_path / "o4").exists()
    result = runner.invoke(app, ["score", model, str(image_dir / "b"), str(bad), "--out", str(tmp_path / "o2"),
                                 "--maps", "--on-error", "fail", "--device", "cpu", "--loader-workers", "0", "-q"])
    assert result.exit_code == 2 and result.stderr.startswith("error: bad image "), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    # an existing output folder is kept (only what the failed run wrote goes)
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["score", model, str(bad), "--out", str(tmp_path / "o3"), "--maps",
                                 "--device", "cpu", "-q"])
    assert result.exit_code == 2 and sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["notes.txt"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_budget_is_capped_by_free_gpu_memory():
    from padim_ooc.memory import MEMORY_MARGIN, default_budget

    """With --device cuda the accumulator lives on the GPU: the plan's budget fits its free memory."""
    budget = default_budget("cuda")
    free, _ = torch.cuda.mem_get_info()
    assert 0 < budget <= free * MEMORY_MARGIN * 1.01  # 1 %: free memory moves a little between the calls


def test_score_path_runs_in_full_float32_whatever_the_process_set(fitted_model, image_dir, extractor):
    """Every product and convolution of a score (the Mahalanobis bmm, the map products, the blur
    that builds the cached map operator) sees full float32, though the process asked for TF32
    ("high" matmuls, TF32 cuDNN convolutions): read at each op by a dispatch mode, so it is
    checked on the CPU too (the flags are what CUDA would obey)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from padim_ooc import score as score_module
    from padim_ooc.extractor import _precision_settings, _set_precision_settings

    watched = {"bmm", "mm", "matmul", "convolution", "addmm", "baddbmm"}
    seen = []

    class Flags(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in watched:
                seen.append((name, torch.get_float32_matmul_precision(), _precision_settings().get("cudnn.conv")))
            return func(*args, **(kwargs or {}))

    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in list_images([image_dir / "b"])[:2]])
    fitted_model._statistics()
    patches = fitted_model.extractor.embed_patches(x)  # the backbone's own guard is tested in test_extractor
    saved = _precision_settings()
    score_module.map_operator.cache_clear()
    try:
        torch.set_float32_matmul_precision("high")
        if "cudnn.conv" in saved:
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        fitted_model.extractor.embed_patches = lambda batch: patches
        with Flags():
            fitted_model.score_batch(x)
    finally:
        del fitted_model.extractor.embed_patches
        _set_precision_settings(saved)
        score_module.map_operator.cache_clear()
    names = {name for name, _, _ in seen}
    assert {"bmm", "convolution"} <= names, seen
    assert all(matmul == "highest" for _, matmul, _ in seen), seen
    assert all(conv in (None, "ieee") for _, _, conv in seen), seen


def test_gpu_out_of_memory_is_one_line_naming_what_to_lower(fitted_model, tmp_path, image_dir, capsys, monkeypatch):
    """torch's OutOfMemoryError (raised here as CUDA raises it: no GPU on CI) is a one-line error
    that says which option to lower, not an internal error (exit 3)."""
    from conftest import cli_error
    from padim_ooc.score import Model

    def out_of_memory(self, batch, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.80 GiB (GPU 0; 1.2 GiB free)")

    monkeypatch.setattr(Model, "score_batch", out_of_memory)
    line = cli_error(capsys, "score", fitted_model.store.path, image_dir / "b", "--out", tmp_path / "o", "-q",
                     text="the GPU ran out of memory")
    assert "--batch-size" in line and "Tried to allocate 1.80 GiB" in line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scores_and_maps_equal_cpu_ones_with_tf32_asked_for(fitted, image_dir):
    """Scores and maps on CUDA equal the CPU's to float32 rounding although the process asked for TF32
    (which would move them by ~1e-3): the score path's float32 guard, on the device it is for."""
    from padim_ooc.extractor import _precision_settings, _set_precision_settings

    paths = list_images([image_dir / "b"])[:8]
    cpu_scores, cpu_maps = po.open_model(fitted, device="cpu").score(paths, batch_size=4)
    saved = _precision_settings()
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        gpu_scores, gpu_maps = po.open_model(fitted, device="cuda").score(paths, batch_size=4)
    finally:
        _set_precision_settings(saved)
    assert rel_max(gpu_scores, cpu_scores) < 1e-4 and rel_max(gpu_maps, cpu_maps) < 1e-4


def rel_max(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
