"""Bad commands get one clear line and a non-zero exit code; damaged stores are recognised.

Runs the real command line in-process (Typer's runner: the same code path as
`padim-ooc`, without paying for a new Python and `import torch` per case) on
real stores damaged the way disks and people damage them: a chunk deleted or
cut short, a ledger segment gone, garbage attributes, a newer schema. Also
non-finite features (NaN weights) and a merge of stores fitted differently.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

import padim_ooc as po
from padim_ooc.cli import app
from padim_ooc.store import ModelStore

SMALL = ["--weights", "none", "--resize", "72", "--crop", "64", "--loader-workers", "0", "-q"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, text: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert text in lines[0], lines[0]
    assert "Traceback" not in res.output
    return lines[0]


def copy(model: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "copy.zarr"
    shutil.copytree(model, out)
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["padim_ooc"]
    return out, attrs


def test_score_a_model_that_is_not_finalized_or_without_images(tmp_path, image_dir, extractor):
    path = tmp_path / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=extractor, batch_size=10, loader_workers=0, finalize=False)
    one_line_error(cli("score", path, image_dir / "b", "--out", tmp_path / "o"),
                   f"the model {path} is not finalized: run `padim-ooc finalize {path}` first")
    one_line_error(cli("score", path, "--out", tmp_path / "o"), "no images given")
    one_line_error(cli("fit", "--model", path, *SMALL), "no images given")
    one_line_error(cli("score", path, image_dir / "b", "--out", tmp_path / "o", "--on-error", "ignore"),
                   "--on-error must be skip or fail, not 'ignore'")
    assert not (tmp_path / "o").exists()


def test_newer_schema_and_garbage_attributes(tmp_path, image_dir, fitted):
    path, _ = copy(fitted, tmp_path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["padim_ooc"]["schema_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    for args in (["score", path, image_dir / "b", "--out", tmp_path / "o"], ["info", path],
                 ["fit", image_dir / "b", "--model", path, *SMALL], ["finalize", path]):
        one_line_error(cli(*args), "model schema version 99 is newer than this padim_ooc")
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')  # cut short
    one_line_error(cli("score", path, image_dir / "b", "--out", tmp_path / "o"), f"cannot open the model {path}")


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_chunks_are_reported_not_read_as_zeros(tmp_path, image_dir, fitted, damage):
    path, attrs = copy(fitted, tmp_path)
    final, state = attrs["final"], attrs["state"]
    for array in (f"{final}/precision", f"{final}/mean", f"{state}/m2", f"{state}/mean",
                  f"ledger/{attrs['ledger'][0]}"):
        chunk = next(p for p in sorted((path / array / "c").rglob("*")) if p.is_file())
        saved = chunk.read_bytes()
        if damage == "delete":
            chunk.unlink()
            text = f"the model {path} is damaged: 1 of 1 chunks of {array} are missing"
        else:
            chunk.write_bytes(saved[: len(saved) // 3])
            text = (f"the model {path} is damaged: chunk {chunk.relative_to(path / array)} of {array} "
                    f"has {len(saved) // 3} bytes instead of {len(saved)}")
        if array.startswith("final"):  # scoring reads the precision
            one_line_error(cli("score", path, image_dir / "b", "--out", tmp_path / "o"), text)
        elif array.startswith("state"):  # finalize and a resumed fit read m2 and mean
            one_line_error(cli("finalize", path), text)
            one_line_error(cli("fit", image_dir / "b", "--model", path, *SMALL), text)
        else:  # the ledger: what has been counted
            one_line_error(cli("fit", image_dir / "b", "--model", path, *SMALL), text)
        chunk.write_bytes(saved)
    shutil.rmtree(path / "ledger" / attrs["ledger"][0])
    one_line_error(cli("fit", image_dir / "b", "--model", path, *SMALL),
                   f"the model {path} is damaged: ledger/{attrs['ledger'][0]} is missing")
    assert ModelStore.open(path).n_images == 20  # nothing was changed by the refused commands


def test_damaged_array_metadata_is_one_line(tmp_path, image_dir, fitted):
    path, attrs = copy(fitted, tmp_path)
    final, state, segment = attrs["final"], attrs["state"], f"ledger/{attrs['ledger'][0]}"
    for array in (f"{final}/precision", f"{final}/mean", f"{state}/m2", f"{state}/mean", segment):
        meta = path / array / "zarr.json"
        saved = meta.read_bytes()
        meta.write_bytes(saved[:20])  # cut short: not JSON
        text = f"the model {path} is damaged: cannot read {array} (JSONDecodeError"
        if array.startswith("final"):
            one_line_error(cli("score", path, image_dir / "b", "--out", tmp_path / "o"), text)
        else:
            if array.startswith("state"):
                one_line_error(cli("finalize", path), text)
            one_line_error(cli("fit", image_dir / "b", "--model", path, *SMALL), text)
        meta.write_bytes(saved)
    assert ModelStore.open(path).n_images == 20


def test_fit_on_a_model_whose_root_is_damaged(tmp_path, image_dir, fitted):
    path, _ = copy(fitted, tmp_path)
    (path / "zarr.json").write_bytes((path / "zarr.json").read_bytes()[:20])
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    one_line_error(cli("fit", image_dir / "b", "--model", path, *SMALL),
                   f"cannot open the model {path}: JSONDecodeError")  # not "... is not a padim_ooc model"
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


def test_a_model_whose_first_chunk_is_all_zero_is_not_damaged(tmp_path, image_dir, extractor):
    # one image: m2 is all zeros; every chunk is still stored, so nothing reads as missing
    path = tmp_path / "one.zarr"
    po.fit([sorted((image_dir / "a").iterdir())[0]], path, extractor=extractor, loader_workers=0, finalize=False)
    st = ModelStore.open(path)
    assert st.n_images == 1 and not st.m2_array()[...].any()
    assert st.m2_array().nchunks_initialized == st.m2_array().nchunks


def nan_weights(tmp_path: Path) -> Path:
    model = torchvision.models.resnet18(weights=None)
    state = model.state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    return path


def test_nan_weights_are_refused_before_anything_is_written(tmp_path, image_dir):
    path = tmp_path / "m.zarr"
    args = ["fit", image_dir / "a", "--model", path, "--weights", nan_weights(tmp_path), "--resize", "72",
            "--crop", "64", "--loader-workers", "0", "-q"]
    one_line_error(cli(*args), "the backbone gave non-finite features (NaN or infinity) for 20 of 20 images")
    assert not path.exists()


def test_non_finite_features_never_reach_an_existing_model(tmp_path, image_dir):
    ex = po.Extractor("resnet18", weights=None, seed=0, resize=72, crop=64, device="cpu")
    path = tmp_path / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=ex, batch_size=8, loader_workers=0, finalize=True)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with torch.no_grad():  # the weights go bad after the model was built (its digest still matches)
        next(ex._module.parameters())[0, 0, 0, 0] = float("inf")
    with pytest.raises(po.PadimError, match=r"non-finite features .* for 8 of 8 images of a batch, first "
                                            r".*img0020\.png.*nothing of this batch was added"):
        po.fit([image_dir / "b"], path, extractor=ex, batch_size=8, loader_workers=0)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    m = po.open_model(path)
    assert m.n_images == 20 and np.isfinite(m.covariance()).all()


def test_merge_of_differently_configured_stores(tmp_path, image_dir, fitted, extractor):
    other = tmp_path / "other.zarr"
    ex2 = po.Extractor("resnet18", weights=None, seed=1, resize=72, crop=64, device="cpu")
    po.fit([image_dir / "b"], other, extractor=ex2, batch_size=10, loader_workers=0, finalize=False)
    out = tmp_path / "merged.zarr"
    one_line_error(cli("merge", fitted, other, "--model", out),
                   f"cannot merge {other} with {fitted}: their channels differs")
    assert not out.exists()
