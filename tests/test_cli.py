"""The command line end to end, as a user runs it (real subprocesses, real files)."""
from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from scipy import ndimage

import padim_ooc
from padim_ooc import cli
from padim_ooc.store import ModelStore, read_array

from conftest import cli_error, cli_json, CONFIG, main_exit, run_cli as run, synthetic, write_images

SMALL = ["--weights", "none", "--resize", "72", "--crop", "64", "--loader-workers", "0", "-q"]


def assert_one_line_error(proc, text):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and text in lines[0]


def test_fit_info_score(tmp_path, image_dir):
    model = tmp_path / "m.zarr"
    out = json.loads(run("fit", image_dir / "a", "--model", model, *SMALL, "--batch-size", "8",
                         "--checkpoint-every", "5").stdout)
    assert out["added"] == 20 and out["n_images"] == 20 and out["finalized"]
    info = json.loads(run("info", model).stdout)
    assert info["backbone"] == "resnet18" and info["dims"] == 100 and info["grid"] == [16, 16]
    assert info["n_images"] == 20 and info["finalized"] is True and len(info["channels"]) == 100
    # incremental: only the 20 new images are added
    out = json.loads(run("fit", image_dir, "--model", model, "--loader-workers", "0", "-q").stdout)
    assert out["added"] == 20 and out["already_seen"] == 20 and out["n_images"] == 40
    res = json.loads(run("score", model, image_dir / "b", "--out", tmp_path / "out", "--maps",
                         "--loader-workers", "0", "-q").stdout)
    assert res["scored"] == 20
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "score"]
    # input order = the names written by the fixture, in order (img0020 ... img0039)
    assert [r[0] for r in rows[1:]] == [str(image_dir / "b" / f"img{i:04d}.png") for i in range(20, 40)]
    scores = np.array([float(r[1]) for r in rows[1:]])
    assert np.isfinite(scores).all() and (scores > 0).all()
    maps = zarr.open_array(str(tmp_path / "out" / "maps.zarr"), mode="r")
    assert maps.shape == (20, 64, 64) and maps.dtype == np.float16
    np.testing.assert_allclose(maps[...].reshape(20, -1).max(axis=1), scores, rtol=2e-3)


def test_missing_and_empty_inputs(tmp_path):
    assert_one_line_error(run("fit", tmp_path / "nope", "--model", tmp_path / "m.zarr", *SMALL, ok=False),
                          "input not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("fit", tmp_path / "empty", "--model", tmp_path / "m.zarr", *SMALL, ok=False),
                          "no images found")
    assert not (tmp_path / "m.zarr").exists()
    assert_one_line_error(run("info", tmp_path / "nope.zarr", ok=False), "model not found")


def test_different_configuration_refused(tmp_path, image_dir):
    model = tmp_path / "m.zarr"
    run("fit", image_dir / "a", "--model", model, *SMALL, "--no-finalize")
    assert_one_line_error(run("fit", image_dir / "b", "--model", model, *SMALL, "--seed", "3", ok=False),
                          "seed")
    proc = run("score", model, image_dir / "b", "--out", tmp_path / "o", ok=False)
    assert_one_line_error(proc, "not finalized")


def test_help():  # a real process: exit 0 (the other commands' help: test_help_exits_0, in-process)
    out = run("fit", "--help").stdout
    assert "Usage" in out


# ---- usage errors: one line, exit 2 (in-process through the console script's main) ----

@pytest.mark.parametrize("args, text", [
    (["fit", "x"], "Missing option '--model'"),
    (["fit", "x", "--model", "m.zarr", "--dims", "0"], "--dims"),
    (["fit", "x", "--model", "m.zarr", "--batch-size", "0"], "--batch-size"),
    (["fit", "x", "--model", "m.zarr", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["fit", "x", "--model", "m.zarr", "--dimz", "3"], "--dimz"),
    (["fit", "x", "--model", "m.zarr", "--workers", "0"], "--workers"),
    (["score", "m.zarr", "x", "--out", "o", "--sigma", "-1"], "--sigma"),
    (["merge", "--model", "mm.zarr"], "Missing argument 'PARTS'"),
    (["nosuch"], "No such command"),
])
def test_usage_errors_are_one_line(capsys, args, text):
    code, out, err = main_exit(capsys, *args)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err
    assert "{" not in lines[0] and "─" not in err  # no Rich box, no odd placeholder


def test_usage_error_exit_code_of_the_process(tmp_path):
    proc = run("fit", tmp_path, ok=False)
    assert proc.returncode == 2
    assert_one_line_error(proc, "Missing option '--model'")


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["benchmark", "mvtec", "--help"], []])
def test_help_exits_0(capsys, args):
    code, out, err = main_exit(capsys, *args)
    assert code == 0 and "Usage" in out and err == ""


def test_fit_help_shows_defaults(capsys):
    _, out, _ = main_exit(capsys, "fit", "--help")
    text = " ".join(out.split())  # the help is wrapped
    for default in ("[resnet18]", "[first three stages]", "[default]", "[256]", "[224]",
                    "[available memory x 0.8]", "at most 2 % of the time"):
        assert default in text, default
    _, out, _ = main_exit(capsys, "benchmark", "mvtec", "--help")
    assert "[preset's]" in " ".join(out.split())


def test_log_records_carry_their_level():
    fmt = cli._LevelFormatter()
    for level, name in ((logging.INFO, "info"), (logging.WARNING, "warning"), (logging.ERROR, "error")):
        record = logging.LogRecord("distributed", level, __file__, 1, "hello %s", ("you",), None)
        assert fmt.format(record) == f"{name}: hello you"


# ---- fit / finalize / score on real files ----

def stored_precision(model) -> np.ndarray:
    _, prec = ModelStore.open(model).final_arrays()
    return read_array(prec)


def assert_precision(model, eps, positions=(0, 77, 255)):
    """The stored float32 precision equals numpy's inv(cov + eps I) (float64) at ``positions``."""
    cov = padim_ooc.open_model(model).covariance()
    prec = stored_precision(model)
    for p in positions:
        expected = np.linalg.inv(cov[p] + eps * np.eye(cov.shape[1]))
        np.testing.assert_allclose(prec[p], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_eps_before_fit_and_refinalize(tmp_path, image_dir, fitted, capsys):
    model = tmp_path / "m.zarr"
    shutil.copytree(fitted, model)
    # a bad eps fails before any image is read: nothing added
    cli_error(capsys, "fit", image_dir / "b", "--model", model, "-q", "--eps", "-1", text="eps")
    assert ModelStore.open(model).n_images == 20
    # nothing new, another eps: finalized again with it
    out = cli_json(capsys, "fit", image_dir / "a", "--model", model, "-q", "--eps", "0.3")
    assert out["added"] == 0 and out["finalized"] is True
    assert cli_json(capsys, "info", model)["eps"] == 0.3
    assert_precision(model, 0.3)
    # --no-finalize with nothing new: the store stays finalized, and says so
    out = cli_json(capsys, "fit", image_dir / "a", "--model", model, "-q", "--no-finalize")
    assert out["finalized"] is True
    # finalize --eps
    assert cli_json(capsys, "finalize", model, "--eps", "0.5")["eps"] == 0.5
    info = cli_json(capsys, "info", model)
    assert info["eps"] == 0.5 and info["finalized"] is True
    assert_precision(model, 0.5)


def test_weights_and_options_checked_before_building(tmp_path, image_dir, fitted, capsys):
    # a random-weight model and --weights default: refused up front, naming both (no download)
    err = cli_error(capsys, "fit", image_dir / "b", "--model", fitted, "--weights", "default", "-q",
                    text="random:seed=0")
    assert "'default'" in err and "Downloading" not in err
    assert ModelStore.open(fitted).n_images == 20
    # a bad --max-memory on a new model with pretrained weights: refused before they are loaded
    err = cli_error(capsys, "fit", image_dir / "a", "--model", tmp_path / "new.zarr", "--max-memory", "0", "-q",
                    text="--max-memory")
    assert "Downloading" not in err and not (tmp_path / "new.zarr").exists()


def test_one_image_fit_says_the_statistics_are_saved(tmp_path, capsys):
    write_images(tmp_path / "one", 1, seed=7)
    cli_error(capsys, "fit", tmp_path / "one", "--model", tmp_path / "m.zarr", *SMALL,
              text="statistics of 1 image are saved")
    info = cli_json(capsys, "info", tmp_path / "m.zarr")
    assert info["n_images"] == 1 and info["finalized"] is False


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling (align_corners=False, like torch) of (B, h, w) to (B, size, size), float64."""
    def weights(n):
        src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n - 1)
        hi = np.minimum(lo + 1, n - 1)
        a = np.zeros((size, n))
        a[np.arange(size), lo] += 1 - (src - lo)
        a[np.arange(size), hi] += src - lo
        return a
    rows, cols = weights(grid.shape[1]), weights(grid.shape[2])
    return np.einsum("ih,bhw,jw->bij", rows, grid, cols)


def test_score_sigma_against_numpy(tmp_path, image_dir, fitted, capsys):
    files = [image_dir / "b" / f"img{i:04d}.png" for i in range(20, 25)]
    scores = {}
    for sigma in ("0", "4"):
        cli_json(capsys, "score", fitted, *files, "--out", tmp_path / sigma, "--sigma", sigma,
                 "--loader-workers", "0", "-q")
        with open(tmp_path / sigma / "scores.csv", newline="") as f:
            scores[sigma] = np.array([float(r[1]) for r in list(csv.reader(f))[1:]])
    # independent: features from the model's extractor, distances in float64 from mean and covariance
    model = padim_ooc.open_model(fitted, device="cpu")
    ex = model.extractor
    batch = torch.stack([ex.preprocess(Image.open(p).convert("RGB")) for p in files])
    feats = ex.embed(batch).double().numpy()  # (B, d, h, w)
    b, d, h, w = feats.shape
    diff = feats.reshape(b, d, h * w).transpose(2, 0, 1) - model.mean[:, None, :]  # (P, B, d)
    prec = np.linalg.inv(model.covariance() + 0.01 * np.eye(d))
    dist = np.sqrt(np.einsum("pbi,pij,pbj->bp", diff, prec, diff)).reshape(b, h, w)
    maps = upsample(dist, 64)
    np.testing.assert_allclose(scores["0"], maps.max(axis=(1, 2)), rtol=1e-4)
    blurred = np.stack([ndimage.gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(scores["4"], blurred.max(axis=(1, 2)), rtol=1e-4)
    assert (scores["4"] < scores["0"]).all()


def test_layers_dims_backbone(tmp_path, capsys):
    write_images(tmp_path / "imgs", 4, seed=3)
    model = tmp_path / "m.zarr"
    cli_json(capsys, "fit", tmp_path / "imgs", "--model", model, *SMALL, "--backbone", "resnet34",
             "--layers", "layer1,layer2", "--dims", "50", "--no-finalize")
    info = cli_json(capsys, "info", model)
    assert info["backbone"] == "resnet34" and info["layers"] == ["layer1", "layer2"]
    assert info["layer_channels"] == [64, 128] and info["dims"] == 50 and info["grid"] == [16, 16]
    assert len(set(info["channels"])) == 50 and all(0 <= c < 192 for c in info["channels"])
    assert ModelStore.open(model).mean_array().shape == (256, 50)


def test_api_weights_file_and_finalize_model(tmp_path, capsys):
    import torchvision

    torch.manual_seed(5)
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    write_images(tmp_path / "a", 3, seed=11)
    write_images(tmp_path / "b", 3, seed=12, start=3)
    model = tmp_path / "m.zarr"
    cli_json(capsys, "fit", tmp_path / "a", "--model", model, "--weights", weights, "--resize", "72",
             "--crop", "64", "--loader-workers", "0", "-q", "--no-finalize")
    m = padim_ooc.fit(tmp_path / "b", model, weights=str(weights), finalize=False, loader_workers=0)
    assert m.n_images == 6 and not m.finalized
    m = padim_ooc.finalize_model(model, eps=0.2)
    assert m.finalized and m.attrs["eps"] == 0.2
    assert_precision(model, 0.2, positions=(0, 100))
    with pytest.raises(padim_ooc.PadimError, match="eps"):
        padim_ooc.finalize_model(model, eps=-1)


def test_fit_preset_uses_the_paper_weights(tmp_path, monkeypatch, capsys):
    """`fit --preset wr50-rd550` loads torchvision's V1 weights (the paper's), not `default` (V2):
    a state dict placed in the torch cache under V1's file name is the one loaded, offline."""
    import torchvision
    from torchvision.models import Wide_ResNet50_2_Weights as W

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(7)
    net = torchvision.models.wide_resnet50_2()
    torch.save(net.state_dict(), cache / W.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    write_images(tmp_path / "imgs", 3, seed=13)
    model = tmp_path / "m.zarr"
    cli_json(capsys, "fit", tmp_path / "imgs", "--model", model, "--preset", "wr50-rd550", "--resize", "72",
             "--crop", "64", "--loader-workers", "0", "-q", "--no-finalize")
    info = cli_json(capsys, "info", model)
    assert info["weights"].endswith("IMAGENET1K_V1") and info["dims"] == 550
    # the features are those of the cached state dict
    m = padim_ooc.open_model(model)
    reference = torchvision.models.feature_extraction.create_feature_extractor(
        net.eval(), return_nodes=["layer1"])
    x = torch.zeros(1, 3, 64, 64)
    with torch.inference_mode():
        mine = m.extractor.embed(x)
        first = reference(x)["layer1"]
    layer1 = [c for c in info["channels"] if c < 256]
    np.testing.assert_allclose(mine[0, :len(layer1)].numpy(), first[0, layer1].numpy(), rtol=1e-4, atol=1e-5)


# ---- eps: one meaning in fit, merge and finalize (given, else the model's, else 0.01) ----

def assert_precision_of(model, x, eps, positions=(0, 7, 14)):
    """The stored float32 precision equals numpy's inv(cov(x[p]) + eps I) (float64); x (P, n, d)."""
    prec = stored_precision(model)
    for p in positions:
        expected = np.linalg.inv(np.cov(x[p], rowvar=False) + eps * np.eye(x.shape[2]))
        np.testing.assert_allclose(prec[p], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_merge_and_finalize_keep_the_models_eps(tmp_path, capsys):

    x = 3 + np.random.default_rng(8).normal(size=(15, 11, 4))  # (P, n, d)
    synthetic(tmp_path / "a.zarr", x[:, :6], [bytes([i]) * 16 for i in range(6)])
    synthetic(tmp_path / "b.zarr", x[:, 6:], [bytes([i]) * 16 for i in range(6, 11)])
    model = tmp_path / "m.zarr"
    assert cli_json(capsys, "merge", tmp_path / "a.zarr", "--model", model)["finalized"]
    assert cli_json(capsys, "info", model)["eps"] == 0.01  # a new model: 0.01
    cli_json(capsys, "finalize", model, "--eps", "0.3")
    # finalize without --eps: the model's 0.3, not 0.01
    assert cli_json(capsys, "finalize", model)["eps"] == 0.3
    assert_precision_of(model, x[:, :6], 0.3)
    # merge into a model finalized at 0.3: finalized again at 0.3
    out = cli_json(capsys, "merge", tmp_path / "b.zarr", "--model", model)
    assert out["n_images"] == 11 and out["finalized"]
    assert cli_json(capsys, "info", model)["eps"] == 0.3
    assert_precision_of(model, x, 0.3)
    # the API, the same rule
    assert padim_ooc.finalize_model(model).attrs["eps"] == 0.3
    assert_precision_of(model, x, 0.3)


# ---- weights: `default` and `torchvision:...` are the enum member of the model's backbone ----

def test_weights_check_compares_the_enum_members(tmp_path, image_dir, monkeypatch, capsys):
    from padim_ooc.config import check_weights

    r18 = {"backbone": "resnet18", "weights": "torchvision:ResNet18_Weights.IMAGENET1K_V1"}
    wr50 = {"backbone": "wide_resnet50_2", "weights": "torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"}
    # the same member name of another model's weights: refused
    with pytest.raises(padim_ooc.PadimError, match="unknown weights .*Wide_ResNet50_2_Weights.* for resnet18"):
        check_weights(r18, "torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1", "m.zarr")
    # `default` is V2 for wide_resnet50_2: not the V1 a wr50-rd550 model was fitted with
    with pytest.raises(padim_ooc.PadimError, match=r"IMAGENET1K_V1, not 'default' \(Wide_ResNet50_2_Weights"
                                                   r"\.IMAGENET1K_V2\)"):
        check_weights(wr50, "default", "m.zarr")
    for same in ("torchvision:IMAGENET1K_V1", "torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"):
        check_weights(wr50, same, "m.zarr")
    check_weights(r18, "default", "m.zarr")  # V1 is resnet18's default
    # the command line: one line, before any backbone is built (nothing downloaded), nothing added
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    model = tmp_path / "wr50.zarr"
    x = np.random.default_rng(9).normal(size=(15, 3, 4))
    synthetic(model, x, [bytes([i]) * 16 for i in range(3)], dict(CONFIG, **wr50))
    err = cli_error(capsys, "fit", image_dir / "a", "--model", model, "--weights", "default", "-q",
                    text="not 'default' (Wide_ResNet50_2_Weights.IMAGENET1K_V2)")
    assert "Downloading" not in err and ModelStore.open(model).n_images == 3


# ---- a writer refused by the lock starts no Dask cluster ----

HOLD_LOCKS = ("import sys; from padim_ooc.store.lock import acquire\n"
              "for path in sys.argv[1:]: acquire(path, 'padim-ooc fit (test holder)')\n"
              "print('held', flush=True); sys.stdin.read()")


def test_a_refused_writer_starts_no_cluster(tmp_path, image_dir, fitted, capsys):
    import subprocess
    import sys


    x = np.random.default_rng(10).normal(size=(15, 6, 4))
    synthetic(tmp_path / "part.zarr", x[:, :3], [bytes([i]) * 16 for i in range(3)])
    synthetic(tmp_path / "m.zarr", x[:, 3:], [bytes([i]) * 16 for i in range(3, 6)])
    shutil.copytree(fitted, tmp_path / "f.zarr")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCKS, str(tmp_path / "m.zarr"), str(tmp_path / "f.zarr")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["merge", tmp_path / "part.zarr", "--model", tmp_path / "m.zarr"],
                     ["fit", image_dir / "b", "--model", tmp_path / "f.zarr", "-q"],
                     ["finalize", tmp_path / "f.zarr"]):
            err = cli_error(capsys, *args, "--workers", "2", text="is being written by `padim-ooc fit (test holder)`")
            assert "dashboard" not in err, (args[0], err)  # cli_error: that one line only
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert ModelStore.open(tmp_path / "m.zarr").n_images == 3 and ModelStore.open(tmp_path / "f.zarr").n_images == 20


def test_layers_naming_nothing_is_an_error(tmp_path, capsys):
    write_images(tmp_path / "imgs", 2, seed=4)
    cli_error(capsys, "fit", tmp_path / "imgs", "--model", tmp_path / "m.zarr", "--weights", "none",
              "--layers", " , ", text="--layers names nothing")
    assert not (tmp_path / "m.zarr").exists()


def test_memory_store_with_workers_is_refused_before_a_cluster_starts(tmp_path, capsys):
    write_images(tmp_path / "imgs", 2, seed=5)
    err = cli_error(capsys, "fit", tmp_path / "imgs", "--model", "memory://q.zarr", "--weights", "none",
                    "--workers", "2", text="lives in this process's memory")
    assert "dashboard" not in err
