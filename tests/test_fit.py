"""The streaming fit equals the exact two-pass float64 statistics of the extractor's features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import padim_ooc as po
from padim_ooc.data import decode_rgb, list_images
from padim_ooc.store import ModelStore

from conftest import exact_stats, rel


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_fit_equals_two_pass(tmp_path, image_dir, extractor, batch_size):
    model = po.fit([image_dir], tmp_path / "m.zarr", extractor=extractor, batch_size=batch_size,
                   checkpoint_every=9, loader_workers=0)
    paths = list_images([image_dir])
    mean, cov = exact_stats(extractor, paths, batch_size)
    assert model.n_images == 40
    assert model.finalized
    assert model.mean.shape == (extractor.positions, 100)
    assert rel(model.mean, mean) <= 1e-9
    assert rel(model.covariance(), cov) <= 1e-9
    # several checkpoints were written and only the last state is left
    groups = sorted(ModelStore.open(tmp_path / "m.zarr").group.group_keys())
    states = [g for g in groups if g.startswith("state-")]
    assert len(states) == 1 and int(states[0].split("-")[1]) >= 2


def test_incremental_equals_one_shot(tmp_path, image_dir, extractor):
    # batch compositions line up (20 = 2 x 10), so the features are bit-identical
    one = po.fit([image_dir], tmp_path / "one.zarr", extractor=extractor, batch_size=10, loader_workers=0)
    two_path = tmp_path / "two.zarr"
    po.fit([image_dir / "a"], two_path, extractor=extractor, batch_size=10, loader_workers=0)
    assert po.open_model(two_path).n_images == 20
    two = po.fit([image_dir], two_path, extractor=extractor, batch_size=10, loader_workers=0)
    assert two.n_images == 40
    assert rel(two.mean, one.mean) <= 1e-12
    assert rel(two.covariance(), one.covariance()) <= 1e-12
    batch = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes()))
                         for p in list_images([image_dir / "b"])[:6]])
    s1, m1 = one.score(batch)
    s2, m2 = two.score(batch)
    # Not bit for bit: the float64 statistics agree to ~1e-15 (the merges run in another order),
    # so a few entries of the stored float32 mean and precision round the other way (measured:
    # 4 of 25,600 and 2 of 2,560,000), and over all 40 images 15 map pixels of 163,840 differ by
    # one float32 rounding (8e-8 relative). So: a few float32 roundings, 1e-6 relative.
    np.testing.assert_allclose(s2, s1, rtol=1e-6, atol=0)
    np.testing.assert_allclose(m2, m1, rtol=0, atol=1e-6 * float(np.abs(m1).max()))


def test_refit_same_images_adds_nothing(tmp_path, image_dir, extractor):
    path = tmp_path / "m.zarr"
    first = po.fit([image_dir / "a"], path, extractor=extractor, batch_size=8, loader_workers=0)
    mean = first.mean
    again = po.fit([image_dir / "a"], path, extractor=extractor, batch_size=8, loader_workers=0)
    assert again.n_images == 20
    assert np.array_equal(again.mean, mean)


def test_duplicate_file_counted_once(tmp_path, image_dir, extractor):
    src = list_images([image_dir / "a"])
    folder = tmp_path / "dup"
    folder.mkdir()
    for p in src[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "copy.png").write_bytes(src[0].read_bytes())
    model = po.fit([folder], tmp_path / "m.zarr", extractor=extractor, batch_size=4, loader_workers=0)
    assert model.n_images == 5


def test_incompatible_config_is_refused(tmp_path, image_dir, extractor):
    path = tmp_path / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=extractor, batch_size=8, loader_workers=0, finalize=False)
    other = po.Extractor("resnet18", weights=None, seed=1, resize=72, crop=64, device="cpu")
    with pytest.raises(po.PadimError, match="channels"):
        po.fit([image_dir / "b"], path, extractor=other, loader_workers=0)


def test_loader_workers_give_same_statistics(tmp_path, image_dir, extractor):
    a = po.fit([image_dir / "a"], tmp_path / "a.zarr", extractor=extractor, batch_size=8,
               loader_workers=0, finalize=False)
    b = po.fit([image_dir / "a"], tmp_path / "b.zarr", extractor=extractor, batch_size=8,
               loader_workers=2, finalize=False)
    assert rel(b.covariance(), a.covariance()) <= 1e-12


def test_reopened_extractor_gives_the_same_features(tmp_path, image_dir, extractor):
    model = po.fit([image_dir / "a"], tmp_path / "m.zarr", extractor=extractor, batch_size=8, loader_workers=0)
    reopened = po.open_model(tmp_path / "m.zarr", device="cpu")
    x = torch.stack([extractor.preprocess(decode_rgb(p.read_bytes())) for p in list_images([image_dir / "b"])[:4]])
    assert torch.equal(reopened.extractor.embed(x), extractor.embed(x))
    assert reopened.extractor.channels == extractor.channels
    assert model.attrs["channels"] == extractor.channels


def test_checkpoint_clock_spaces_automatic_checkpoints():
    import time

    from padim_ooc.fit import AUTO_CHECKPOINT_IMAGES, CHECKPOINT_SPACING, CheckpointClock

    explicit = CheckpointClock(5)
    assert not explicit(4) and explicit(5)
    with explicit.timing():
        time.sleep(0.05)
    assert explicit(5)  # an explicit interval is kept whatever the write costs
    auto = CheckpointClock(None)
    assert not auto(AUTO_CHECKPOINT_IMAGES - 1) and auto(AUTO_CHECKPOINT_IMAGES)
    with auto.timing():
        time.sleep(0.02)
    assert not auto(10 * AUTO_CHECKPOINT_IMAGES)  # too soon after a 20 ms write (needs SPACING x 20 ms)
    time.sleep(CHECKPOINT_SPACING * 0.02 + 0.3)
    assert auto(AUTO_CHECKPOINT_IMAGES)


def test_float32_fold_fit_is_within_1e6_of_two_pass(tmp_path, image_dir, extractor):
    """``fit(fold="float32")``: the same features, statistics within 1e-6 relative of their
    two-pass float64 statistics (the float64 fold stays within 1e-9 above)."""
    model = po.fit([image_dir], tmp_path / "m.zarr", extractor=extractor, batch_size=7, loader_workers=0,
                   fold="float32")
    mean, cov = exact_stats(extractor, list_images([image_dir]), 7)
    assert model.n_images == 40 and model.finalized
    assert rel(model.mean, mean) <= 1e-6
    assert rel(model.covariance(), cov) <= 1e-6


SMALL = ["--weights", "none", "--resize", "40", "--crop", "32", "--batch-size", "8", "--loader-workers", "0", "-q"]


def test_cli_fit_with_the_float32_fold_opens_and_scores(tmp_path, image_dir, capsys):
    from conftest import cli_json

    model = tmp_path / "m.zarr"
    out = cli_json(capsys, "fit", image_dir / "a", "--model", model, *SMALL, "--fold", "float32")
    assert out["added"] == 20 and out["finalized"]
    opened = po.open_model(model, device="cpu")
    assert opened.n_images == 20 and np.isfinite(opened.covariance()).all()
    scored = cli_json(capsys, "score", model, image_dir / "b", "--out", tmp_path / "out", "--loader-workers", "0", "-q")
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert scored and len(rows) == 21 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])


def test_unknown_fold_is_a_one_line_cli_error(tmp_path, image_dir, capsys):
    from conftest import cli_error

    cli_error(capsys, "fit", image_dir / "a", "--model", tmp_path / "m.zarr", *SMALL, "--fold", "float16",
              text="--fold must be float64 or float32, not 'float16'")
    assert not (tmp_path / "m.zarr").exists()
    with pytest.raises(po.PadimError, match="--fold must be float64 or float32"):
        po.fit([image_dir / "a"], tmp_path / "m.zarr", weights="none", fold="fp32")
