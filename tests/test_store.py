"""The model store: round trip, atomic switch leftovers, versions, damage."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

import padim_ooc as po
from padim_ooc.store import ATTR_KEY, ModelStore, positions_per_chunk
from padim_ooc.welford import Moments

CONFIG = {"backbone": "resnet18", "layers": ["layer1"], "layer_channels": [64], "channels": list(range(4)),
          "dims": 4, "seed": 0, "weights": "random:seed=0", "weights_digest": "x", "resize": 64, "crop": 64,
          "normalize_mean": [0.5] * 3, "normalize_std": [0.5] * 3, "grid": [3, 5]}


def moments(n, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(15, n, 4)))
    return Moments.from_batch(x)


def test_checkpoint_round_trip_and_ledger(tmp_path):
    st = ModelStore.create(tmp_path / "m.zarr", CONFIG)
    m = moments(10)
    st.checkpoint(m, [bytes([i]) * 16 for i in range(10)])
    st.checkpoint(m, [bytes([i]) * 16 for i in range(10, 12)])
    again = ModelStore.open(tmp_path / "m.zarr")
    back = again.load_moments()
    assert back.n == 10 and torch.equal(back.mean, m.mean) and torch.equal(back.m2, m.m2)
    assert again.ledger() == {bytes([i]) * 16 for i in range(12)}
    assert sorted(again.group.group_keys()) == ["ledger", "state-000002"]


def test_chunks_along_positions_only(tmp_path):
    st = ModelStore.create(tmp_path / "m.zarr", CONFIG)
    st.checkpoint(moments(3), [])
    arr = st.m2_array()
    assert arr.chunks[1:] == (4, 4) and arr.chunks[0] == min(15, positions_per_chunk(4))
    assert positions_per_chunk(550) * 550 * 550 * 8 <= 32 * 2**20 < (positions_per_chunk(550) + 1) * 550 * 550 * 8


def test_leftovers_of_an_interrupted_checkpoint_are_removed(tmp_path):
    st = ModelStore.create(tmp_path / "m.zarr", CONFIG)
    st.checkpoint(moments(5), [b"a" * 16])
    # a process that died after writing the next state but before switching to it
    st._new_array("state-000009/m2", np.ones((15, 4, 4)), (15, 4, 4), "float64", 8)
    st._new_array("ledger/000009", np.ones((1, 16), np.uint8), (1, 16), "uint8", 8)
    assert ModelStore.open(tmp_path / "m.zarr").load_moments().n == 5  # readers ignore them
    ModelStore.open(tmp_path / "m.zarr", writable=True)
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    assert sorted(group.group_keys()) == ["ledger", "state-000001"]
    assert list(group["ledger"].array_keys()) == ["000001"]


def test_newer_schema_refused(tmp_path):
    st = ModelStore.create(tmp_path / "m.zarr", CONFIG)
    st._write_attrs(schema_version=99)
    with pytest.raises(po.PadimError, match="schema version 99 is newer"):
        ModelStore.open(tmp_path / "m.zarr")


def test_foreign_and_missing(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(po.PadimError, match="not a padim_ooc model"):
        ModelStore.open(tmp_path / "other.zarr")
    with pytest.raises(po.PadimError, match="model not found"):
        ModelStore.open(tmp_path / "none.zarr")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(po.PadimError, match="not a padim_ooc model"):
        ModelStore.create(tmp_path / "full", CONFIG)


def test_attributes_are_one_json_object(tmp_path):
    ModelStore.create(tmp_path / "m.zarr", CONFIG).checkpoint(moments(4), [])
    meta = json.loads((tmp_path / "m.zarr" / "zarr.json").read_text())
    attrs = meta["attributes"][ATTR_KEY]
    assert attrs["n_images"] == 4 and attrs["state"] == "state-000001" and attrs["grid"] == [3, 5]
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path / "m.zarr"))


def test_a_chunk_deleted_after_opening_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "m.zarr"
    st = ModelStore.create(path, CONFIG)
    st._write_attrs(chunk_positions=4)
    st.checkpoint(moments(5), [b"a" * 16])
    reader = ModelStore.open(path)
    m2 = reader.m2_array()  # opened: every chunk was there
    assert np.abs(po.store.read_array(m2)).max() > 0
    os.unlink(path / "state-000001" / "m2" / "c" / "2" / "0" / "0")
    with pytest.raises(po.PadimError, match=f"the model {path} is damaged: chunk c/2/0/0 of "
                                            "state-000001/m2 is missing"):
        po.store.read_array(m2)
    with pytest.raises(po.PadimError, match="chunk c/2/0/0 of state-000001/m2 is missing"):
        m2[8:12]  # also a plain zarr read (what Dask tasks do on workers)
    assert np.abs(po.store.read_array(m2, slice(0, 8))).max() > 0  # the chunks still there read fine


def test_a_state_replaced_while_it_is_read_is_an_error(tmp_path):
    path = tmp_path / "m.zarr"
    writer = ModelStore.create(path, CONFIG)
    writer.checkpoint(moments(5), [b"a" * 16])
    mean = ModelStore.open(path).mean_array()
    writer.checkpoint(moments(7, seed=1), [b"b" * 16])  # switches and removes state-000001
    with pytest.raises(po.PadimError, match=f"the model {path} changed while it was being read "
                                            r"\(a writer replaced its state\): run the command again"):
        po.store.read_array(mean)


def test_a_chunk_deleted_from_a_url_store_is_an_error(tmp_path):
    url = f"file://{tmp_path}/u.zarr"
    st = ModelStore.create(url, CONFIG)
    st.checkpoint(moments(5), [b"a" * 16])
    mean = ModelStore.open(url).mean_array()
    os.unlink(tmp_path / "u.zarr" / "state-000001" / "mean" / "c" / "0" / "0")
    with pytest.raises(po.PadimError, match="chunk c/0/0 of state-000001/mean is missing"):
        po.store.read_array(mean)
    with pytest.raises(po.PadimError, match="1 of 1 chunks of state-000001/mean are missing"):
        ModelStore.open(url).mean_array()


def test_a_stray_file_does_not_hide_a_missing_chunk(tmp_path):
    path = tmp_path / "m.zarr"
    st = ModelStore.create(path, CONFIG)
    st._write_attrs(chunk_positions=4)  # 15 positions: 4 chunks
    st.checkpoint(moments(5), [b"a" * 16])
    chunks = path / "state-000001" / "m2" / "c"
    os.unlink(chunks / "1" / "0" / "0")
    (chunks / "9" / "0").mkdir(parents=True)
    (chunks / "9" / "0" / "0").write_bytes((chunks / "0" / "0" / "0").read_bytes())  # same count, same size
    with pytest.raises(po.PadimError, match="1 of 4 chunks of state-000001/m2 are missing"):
        ModelStore.open(path).m2_array()


@pytest.mark.parametrize("version", [None, "1", 1.0, True])
def test_missing_or_invalid_schema_version(tmp_path, version):
    st = ModelStore.create(tmp_path / "m.zarr", CONFIG)
    attrs = dict(st.attrs)
    attrs.pop("schema_version")
    if version is not None:
        attrs["schema_version"] = version
    st.group.attrs[ATTR_KEY] = attrs
    with pytest.raises(po.PadimError, match=r"has a missing or invalid schema_version \(.*\): it is damaged, "
                                            "or not a padim_ooc model"):
        ModelStore.open(tmp_path / "m.zarr")


def test_a_damaged_root_is_a_store_that_cannot_be_opened(tmp_path):
    path = tmp_path / "m.zarr"
    ModelStore.create(path, CONFIG).checkpoint(moments(4), [])
    assert po.store.store_exists(path) and not po.store.store_exists(tmp_path / "none.zarr")
    (path / "zarr.json").write_bytes((path / "zarr.json").read_bytes()[:20])
    assert po.store.store_exists(path)  # not a free path: fit must not take it for one
    with pytest.raises(po.PadimError, match=f"cannot open the model {path}: JSONDecodeError"):
        ModelStore.open(path, writable=True)
    assert not po.lock.held(path)
