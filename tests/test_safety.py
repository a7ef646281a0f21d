"""Untrusted input stays harmless: model stores, image files, output folders, the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import padim_ooc as po
from padim_ooc.store import ModelStore
from padim_ooc.store.chunks import ATTR_KEY

from conftest import CONFIG, cli_error, cli_json, main_exit, moments, synthetic


def _store(tmp_path, n=6, finalize=True):
    from padim_ooc.finalize import finalize as fin

    path = tmp_path / "m.zarr"
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(moments(n), [bytes([i]) * 16 for i in range(n)])
        if finalize:
            fin(st, eps=0.01)
    return path


def _set_attrs(path, **changes):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][ATTR_KEY].update(changes)
    for key, value in list(changes.items()):
        if value is _DROP:
            del meta["attributes"][ATTR_KEY][key]
    (path / "zarr.json").write_text(json.dumps(meta))


_DROP = "__drop__"


# ---- the schema, checked on open --------------------------------------------------------
@pytest.mark.parametrize("key,value,text", [
    ("schema_version", 0, "'schema_version' is 0, expected an integer >= 1"),
    ("schema_version", -3, "'schema_version' is -3"),
    ("dims", "<script>alert(1)</script>", "attribute 'dims' is '<script>"),
    ("grid", [3, 5, 1], "attribute 'grid'"),
    ("n_images", -1, "attribute 'n_images' is -1"),
    ("eps", float("nan"), "attribute 'eps' is nan"),
    ("channels", [0, 0, 1, 2], "attribute 'channels'"),
    ("state", "../../etc", "attribute 'state' is '../../etc'"),
    ("ledger", ["../x"], "attribute 'ledger'"),
    ("crop", 65, "attribute 'crop' is 65"),
    ("calibration", {"alpha": "x"}, "attribute 'calibration'"),
    ("n_images", _DROP, "attribute 'n_images' is missing"),
])
def test_every_attribute_is_checked_on_open(tmp_path, capsys, key, value, text):
    path = _store(tmp_path)
    _set_attrs(path, **{key: value})
    with pytest.raises(po.PadimError, match="damaged"):
        ModelStore.open(path)
    cli_error(capsys, "info", path, text=text)  # one line naming the field, exit 2 (was exit 3 or accepted)


def test_a_valid_calibration_and_unknown_keys_are_accepted(tmp_path):
    from padim_ooc.calibration import calibrate_normal

    path = _store(tmp_path)
    _set_attrs(path, calibration=calibrate_normal(np.linspace(0, 1, 30), 0.1).to_attrs(), a_later_key={"x": 1})
    assert ModelStore.open(path).n_images == 6
    _set_attrs(path, calibration=None)
    assert ModelStore.open(path).n_images == 6


def test_final_arrays_with_more_positions_than_the_grid_are_refused(tmp_path, capsys):
    path = _store(tmp_path)
    _set_attrs(path, grid=[3, 4])  # 12 positions; the arrays hold 15 (were cut silently)
    err = cli_error(capsys, "score", path, tmp_path, "--out", tmp_path / "o", text="has shape (15, 4")
    assert "expected (12, 4" in err


# ---- links inside a store: refused, never followed -----------------------------------
@pytest.mark.parametrize("inside", ["ledger", "state-000001", "state-000001/m2", "zarr.json"])
def test_links_inside_a_store_are_refused_and_nothing_outside_changes(tmp_path, capsys, inside):
    path = _store(tmp_path / "s", finalize=False)
    outside = tmp_path / "outside"
    target = path / inside
    os.rename(target, outside)  # the real data now lies outside, the store only links to it
    os.symlink(outside, target)
    (tmp_path / "outside-sibling").write_text("keep")
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in outside.rglob("*")) \
        if outside.is_dir() else outside.stat().st_mtime_ns
    for args in (["info", path], ["finalize", path]):
        cli_error(capsys, *args, text=f"holds a symbolic link ({inside})")
    with pytest.raises(po.PadimError, match="symbolic link"):
        ModelStore.open(path, writable=True)
    after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in outside.rglob("*")) \
        if outside.is_dir() else outside.stat().st_mtime_ns
    assert after == before and (tmp_path / "outside-sibling").read_text() == "keep"


def test_the_store_path_itself_may_be_a_link(tmp_path):
    path = _store(tmp_path / "s")
    os.symlink(path, tmp_path / "alias.zarr")
    assert ModelStore.open(tmp_path / "alias.zarr").n_images == 6


def test_a_damaged_old_state_does_not_break_a_checkpoint(tmp_path):
    path = _store(tmp_path, finalize=False)
    (path / "state-000001" / "zarr.json").write_text("{not json")
    with ModelStore.open(path, writable=True) as st:
        st.checkpoint(moments(8, seed=1), [bytes([100 + i]) * 16 for i in range(2)])
    st = ModelStore.open(path)
    assert st.attrs["state"] == "state-000002" and not (path / "state-000001").exists()
