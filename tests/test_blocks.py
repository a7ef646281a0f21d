"""The memory plan: a fit that splits positions into blocks gives the statistics of the one-pass fit."""
from __future__ import annotations

import pytest

import padim_ooc as po
from padim_ooc.data import list_images
from padim_ooc.fit import memory_plan
from padim_ooc.memory import plan_memory
from padim_ooc.store import ModelStore

from conftest import exact_stats, fit_summary, rel


def test_plan_arithmetic():
    # WR50-Rd550 at 224 px: 3136 positions, d = 550 -> the accumulator is 7.6 GB
    big = plan_memory(3136, 550, batch_size=32, crop=224, budget=64 * 2**30)
    assert big.accumulator == 3136 * (550 * 550 + 550) * 8
    assert big.blocks == 1 and big.ranges() == [(0, 3136)]
    small = plan_memory(3136, 550, batch_size=32, crop=224, budget=big.working + big.accumulator // 3)
    assert small.blocks in (3, 4)
    ranges = small.ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == 3136
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # each block's accumulator fits beside the working memory
    per_position = (550 * 550 + 550) * 8
    assert small.block_positions * per_position + small.working <= small.budget
    assert "passes over the images" in small.describe()
    with pytest.raises(po.PadimError, match="too small"):
        plan_memory(3136, 550, batch_size=32, crop=224, budget=big.working)


@pytest.mark.parametrize("dims", [100, 550])
def test_plan_counts_the_float32_fold_buffers(dims):
    """The float32 fold's work space (float32 rows, and scratch matrices below SYRK_MIN_DIMS)
    is in the working memory: block positions times fold_row_bytes of that mode."""
    from padim_ooc.fit import fold_samples
    from padim_ooc.welford import fold_plan, fold_row_bytes

    samples = fold_samples(3136, dims, 32)
    plans = {fold: plan_memory(3136, dims, batch_size=32, crop=224, budget=2**40, fold_samples=samples, fold=fold)
             for fold in ("float64", "float32")}
    fixed = 32 * 224 * 224 * 256 + 2 * samples * 3136 * dims * 4
    for fold, plan in plans.items():
        block, lower = fold_plan(3136, dims, samples, fold=fold)
        assert plan.working == fixed + block * fold_row_bytes(dims, samples, fold, lower)
    assert plans["float32"].accumulator == plans["float64"].accumulator  # float64 statistics either way


def tiny_budget(extractor, batch_size, blocks):
    """A budget under which the fit needs ``blocks`` position blocks."""
    plan = memory_plan(extractor.config(), batch_size, 2**50)
    return plan.working + int(plan.accumulator / (blocks - 0.5))


def test_blocked_fit_equals_one_pass(tmp_path, image_dir, extractor, capfd):
    one = fit_summary([image_dir], tmp_path / "one.zarr", extractor, batch_size=8,
                    checkpoint_every=12, loader_workers=0, progress=False)
    budget = tiny_budget(extractor, 8, 3)
    three = fit_summary([image_dir], tmp_path / "three.zarr", extractor, batch_size=8,
                      checkpoint_every=12, loader_workers=0, progress=True, max_memory=budget)
    err = capfd.readouterr().err
    assert "memory plan: 3 passes over the images" in err
    assert one.blocks == 1 and three.blocks == 3
    assert three.added == 40 and three.n_images == 40 and three.checkpoints == 3  # 16 + 16 + 8 images
    a, b = po.open_model(tmp_path / "one.zarr"), po.open_model(tmp_path / "three.zarr")
    assert rel(b.mean, a.mean) <= 1e-12
    assert rel(b.covariance(), a.covariance()) <= 1e-12
    mean, cov = exact_stats(extractor, list_images([image_dir]), 8)  # independent numpy two-pass
    assert rel(b.mean, mean) <= 1e-9 and rel(b.covariance(), cov) <= 1e-9
    assert ModelStore.open(tmp_path / "three.zarr").ledger() == ModelStore.open(tmp_path / "one.zarr").ledger()


def test_blocked_incremental_fit_with_duplicates(tmp_path, image_dir, extractor):
    """Blocks on top of an existing model; a repeated file and already-seen images are skipped
    exactly as the one-pass fit skips them."""
    folder = tmp_path / "more"
    folder.mkdir()
    src = list_images([image_dir / "b"])
    for p in src[:9]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_copy.png").write_bytes(src[2].read_bytes())
    sources = [image_dir / "a", folder, image_dir / "b"]
    models = {}
    for name, budget in (("one", None), ("blocked", tiny_budget(extractor, 5, 4))):
        path = models[name] = tmp_path / f"{name}.zarr"
        fit_summary([image_dir / "a"], path, extractor, batch_size=5, loader_workers=0, progress=False)
        summary = fit_summary(sources, path, extractor, batch_size=5, checkpoint_every=5,
                            loader_workers=0, progress=False, max_memory=budget)
        assert summary.blocks == (1 if budget is None else 4)
        assert summary.added == 20 and summary.already_seen == 20 and summary.duplicates == 10
        assert summary.n_images == 40
    a, b = po.open_model(models["one"]), po.open_model(models["blocked"])
    assert rel(b.mean, a.mean) <= 1e-12
    assert rel(b.covariance(), a.covariance()) <= 1e-12
    # and close to the two-pass statistics of the same 40 images (batches differ: ~1e-6 features)
    mean, cov = exact_stats(extractor, list_images([image_dir]), 5)
    assert rel(b.mean, mean) <= 1e-5 and rel(b.covariance(), cov) <= 1e-5
    assert ModelStore.open(models["blocked"]).ledger() == ModelStore.open(models["one"]).ledger()


def test_cli_max_memory(tmp_path, image_dir, extractor):
    import json

    from typer.testing import CliRunner

    from padim_ooc.cli import app

    budget = tiny_budget(extractor, 10, 2)
    args = ["fit", str(image_dir / "a"), "--model", str(tmp_path / "m.zarr"), "--weights", "none",
            "--resize", "72", "--crop", "64", "--batch-size", "10", "--loader-workers", "0", "--device", "cpu",
            "--max-memory", f"{budget}B"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "memory plan: 2 passes over the images" in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["blocks"] == 2 and out["n_images"] == 20 and out["finalized"]
    one = po.fit([image_dir / "a"], tmp_path / "one.zarr", extractor=extractor, batch_size=10, loader_workers=0)
    assert rel(po.open_model(tmp_path / "m.zarr").covariance(), one.covariance()) <= 1e-12
    bad = CliRunner().invoke(app, [*args[:-1], "lots"])
    assert bad.exit_code == 2 and "error: --max-memory expects a size like 4GB" in bad.stderr


def test_allocator_tuning_starts_no_subprocess(monkeypatch):
    """tune_allocator runs at every fit and score: a subprocess there (``ctypes.util.find_library``
    starts ``ldconfig -p``) forked a process full of native thread pools and crashed the test run."""
    import platform
    import subprocess

    from padim_ooc.memory import tune_allocator

    def refuse(*args, **kwargs):
        raise AssertionError(f"tune_allocator started a subprocess: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    applied = tune_allocator.__wrapped__()  # the uncached body
    assert applied == (platform.libc_ver()[0] == "glibc")
