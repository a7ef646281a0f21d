"""The model store: round trip, atomic switch leftovers, versions, damage."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
import zarr

import padim_ooc as po
from padim_ooc.store import ATTR_KEY, ModelStore, positions_per_chunk
from padim_ooc.welford import Moments

from conftest import CONFIG, moments

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


@pytest.mark.parametrize("version", [None, "1", 1.0, True, 0, -1])
def test_missing_or_invalid_schema_version(tmp_path, version):
    st = ModelStore.create(tmp_path / "m.zarr", CONFIG)
    attrs = dict(st.attrs)
    attrs.pop("schema_version")
    if version is not None:
        attrs["schema_version"] = version
    st.group.attrs[ATTR_KEY] = attrs
    with pytest.raises(po.PadimError, match=r"is damaged or not a padim_ooc model: attribute 'schema_version' "
                                            r"is .*, expected an integer >= 1 and <= 1$"):
        ModelStore.open(tmp_path / "m.zarr")


def test_a_damaged_root_is_a_store_that_cannot_be_opened(tmp_path):
    path = tmp_path / "m.zarr"
    ModelStore.create(path, CONFIG).checkpoint(moments(4), [])
    assert po.store.store_exists(path) and not po.store.store_exists(tmp_path / "none.zarr")
    (path / "zarr.json").write_bytes((path / "zarr.json").read_bytes()[:20])
    assert po.store.store_exists(path)  # not a free path: fit must not take it for one
    with pytest.raises(po.PadimError, match=f"cannot open the model {path}: JSONDecodeError"):
        ModelStore.open(path, writable=True)
    assert not po.store.lock.held(path)


class CountReads:
    """Counts the reads of each key through zarr's local store (the real store underneath)."""

    def __init__(self, monkeypatch):
        self.keys: dict[str, int] = {}
        original = zarr.storage.LocalStore.get

        async def get(store, key, *args, **kwargs):
            self.keys[key] = self.keys.get(key, 0) + 1
            return await original(store, key, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "get", get)


def test_reading_the_ledger_reads_the_root_once_not_once_per_segment(tmp_path, monkeypatch):
    """The root zarr.json lists every segment: reading it per segment made the ledger O(segments^2)."""
    for segments in (3, 24):
        path = tmp_path / f"m{segments}.zarr"
        st = ModelStore.create(path, CONFIG)
        m = moments(3)
        for k in range(segments):
            st.checkpoint(m, [bytes([k, j]) * 8 for j in range(2)])
        reader = ModelStore.open(path)
        with monkeypatch.context() as mp:
            reads = CountReads(mp)
            ledger, digests = reader.ledger(), reader.ledger_digests()
        want = [bytes([k, j]) * 8 for k in range(segments) for j in range(2)]
        assert ledger == set(want) and [bytes(r) for r in digests] == want
        assert reads.keys["zarr.json"] == 2, (segments, reads.keys["zarr.json"])  # one per call


def test_the_ledger_still_refuses_a_state_replaced_while_it_is_read(tmp_path):
    path = tmp_path / "m.zarr"
    st = ModelStore.create(path, CONFIG)
    st.checkpoint(moments(3), [b"a" * 16])
    st.checkpoint(moments(3), [b"b" * 16])
    reader = ModelStore.open(path)
    segments = [reader._array("ledger", name) for name in reader.attrs["ledger"]]
    st._write_attrs(ledger=st.attrs["ledger"][:1])  # a writer now lists another set of segments
    with pytest.raises(po.PadimError, match="changed while it was being read"):
        reader.ledger()
    assert len(segments) == 2


def test_an_array_without_the_complete_marker_reads_a_missing_chunk_as_zeros(tmp_path):
    """Arrays written without write_empty_chunks (no COMPLETE_KEY) legitimately lack all-zero chunks."""
    path = tmp_path / "m.zarr"
    st = ModelStore.create(path, CONFIG)
    st._write_attrs(chunk_positions=4)
    st.checkpoint(moments(5), [b"a" * 16])
    m2 = po.store.read_array(st.m2_array())
    m2[4:8] = 0  # the second chunk all zero: zarr does not store it
    legacy = st.group.create_array("state-000001/m2", shape=m2.shape, chunks=(4, 4, 4), dtype="float64",
                                   compressors=None, fill_value=0, overwrite=True,
                                   config={"write_empty_chunks": False})
    legacy[...] = m2
    assert not (path / "state-000001" / "m2" / "c" / "1").exists()
    arr = ModelStore.open(path).m2_array()
    np.testing.assert_array_equal(po.store.read_array(arr), m2)
    np.testing.assert_array_equal(arr[4:8], np.zeros((4, 4, 4)))  # a plain zarr read too (Dask tasks)
    # the marked arrays of the same store still refuse a missing chunk
    os.unlink(path / "state-000001" / "mean" / "c" / "1" / "0")
    with pytest.raises(po.PadimError, match="1 of 4 chunks of state-000001/mean are missing"):
        ModelStore.open(path).mean_array()


def inverse(m2, n, eps):
    """numpy float64: inv(m2 / (n - 1) + eps I), per position."""
    return np.linalg.inv(m2 / (n - 1) + eps * np.eye(m2.shape[-1]))


def test_refinalizing_never_reuses_a_folder_name(tmp_path):
    """final-N -> final-Nb -> final-N let a reader of the first finalization read the third."""
    from padim_ooc.finalize import finalize

    path = tmp_path / "m.zarr"
    x = np.random.default_rng(2).normal(size=(15, 6, 4))
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(Moments.from_batch(torch.from_numpy(x)), [bytes([i]) * 16 for i in range(6)])
        finalize(st, eps=0.01)
        first = ModelStore.open(path)
        _, prec = first.final_arrays()
        names = [st.attrs["final"]]
        for eps in (0.1, 0.5):
            finalize(st, eps=eps)
            names.append(st.attrs["final"])
    assert len(set(names)) == 3 and names[0] == "final-000001-1", names
    with pytest.raises(po.PadimError, match="changed while it was being read"):
        po.store.read_array(prec)
    m2 = np.einsum("pni,pnj->pij", x - x.mean(1, keepdims=True), x - x.mean(1, keepdims=True))
    np.testing.assert_allclose(ModelStore.open(path).final_arrays()[1][...], inverse(m2, 6, 0.5), rtol=1e-5)
    assert sorted(os.listdir(path)) == ["final-000001-3", "ledger", "state-000001", "zarr.json"]


def test_a_store_finalized_under_an_old_name_reads_and_refinalizes(tmp_path):
    """Stores written before the counter have final-<seq> (or final-<seq>b) and no 'finals'."""
    from padim_ooc.finalize import finalize

    path = tmp_path / "m.zarr"
    with ModelStore.create(path, CONFIG) as st:
        st.checkpoint(moments(6), [bytes([i]) * 16 for i in range(6)])
        finalize(st, eps=0.01)
        os.rename(path / "final-000001-1", path / "final-000001")
        attrs = dict(st.attrs, final="final-000001")
        attrs.pop("finals")
        st.group.attrs[ATTR_KEY] = attrs
    before = ModelStore.open(path).final_arrays()[1][...]
    with ModelStore.open(path, writable=True) as st:
        finalize(st, eps=0.01)
    assert ModelStore.open(path).attrs["final"] == "final-000001-1"
    np.testing.assert_array_equal(ModelStore.open(path).final_arrays()[1][...], before)
    assert sorted(os.listdir(path)) == ["final-000001-1", "ledger", "state-000001", "zarr.json"]


@pytest.mark.parametrize("key", ["final-000001-2/mean/zarr.json", "final-000001-2/precision/zarr.json",
                                 "final-000001-2/precision/c/1/0/0", "final-000001-2/mean/c/2/0", "zarr.json"])
def test_a_failed_finalize_says_the_previous_state_is_intact_and_leaves_nothing(tmp_path, monkeypatch, key):
    """ENOSPC at a write of a re-finalization: one line naming the store, the new folder gone at
    once (not at the next writable open), the previous finalization still the live one."""
    from padim_ooc.finalize import finalize

    path = tmp_path / "m.zarr"
    x = np.random.default_rng(3).normal(size=(15, 7, 4))
    with ModelStore.create(path, CONFIG) as st:
        st._write_attrs(chunk_positions=4)  # 4 chunks
        st.checkpoint(Moments.from_batch(torch.from_numpy(x)), [bytes([i]) * 16 for i in range(7)])
        finalize(st, eps=0.01)
        original = zarr.storage.LocalStore.set

        async def full_disk(store, k, value):
            if k == key:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return await original(store, k, value)

        with monkeypatch.context() as mp:
            mp.setattr(zarr.storage.LocalStore, "set", full_disk)
            with pytest.raises(po.PadimError) as err:
                finalize(st, eps=0.5)
        assert str(err.value) == (f"cannot write the model store {path}: No space left on device; "
                                  "the previous checkpoint (7 images) is intact")
        assert sorted(set(os.listdir(path)) - {po.store.lock.LOCK_NAME}) == ["final-000001-1", "ledger", "state-000001",
                                                                       "zarr.json"]
        back = ModelStore.open(path)
        assert back.attrs["final"] == "final-000001-1" and back.attrs["eps"] == 0.01 and back.attrs["finalized"]
        m2 = np.einsum("pni,pnj->pij", x - x.mean(1, keepdims=True), x - x.mean(1, keepdims=True))
        np.testing.assert_allclose(back.final_arrays()[1][...], inverse(m2, 7, 0.01), rtol=1e-5)
        finalize(st, eps=0.5)  # the next try succeeds
    np.testing.assert_allclose(ModelStore.open(path).final_arrays()[1][...], inverse(m2, 7, 0.5), rtol=1e-5)


def test_a_failed_finalize_removes_chunks_written_late_by_other_tasks(tmp_path, monkeypatch):
    """One chunk write fails while another chunk's task is still computing: the error comes only
    after that task has written, so the removal of the new folder is final (it was re-created by
    the late write before compute waited for the running tasks)."""
    import time

    import padim_ooc.finalize as fz

    path = tmp_path / "m.zarr"
    x = np.random.default_rng(3).normal(size=(15, 7, 4))
    with ModelStore.create(path, CONFIG) as st:
        st._write_attrs(chunk_positions=4)  # chunks of 4, 4, 4 and 3 positions
        st.checkpoint(Moments.from_batch(torch.from_numpy(x)), [bytes([i]) * 16 for i in range(7)])
        fz.finalize(st, eps=0.01)
        original_set, original_block = zarr.storage.LocalStore.set, fz.precision_block

        async def full_disk(store, k, value):
            if k == "final-000001-2/precision/c/1/0/0":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return await original_set(store, k, value)

        def slow_last_block(m2, n, eps, *rest):
            if m2.shape[0] == 3:
                time.sleep(0.5)
            return original_block(m2, n, eps, *rest)

        with monkeypatch.context() as mp:
            mp.setattr(zarr.storage.LocalStore, "set", full_disk)
            mp.setattr(fz, "precision_block", slow_last_block)
            with pytest.raises(po.PadimError, match="No space left on device"):
                fz.finalize(st, eps=0.5)
            right_after = sorted(set(os.listdir(path)) - {po.store.lock.LOCK_NAME})
            time.sleep(1.0)
            later = sorted(set(os.listdir(path)) - {po.store.lock.LOCK_NAME})
    expected = ["final-000001-1", "ledger", "state-000001", "zarr.json"]
    assert right_after == expected and later == expected, (right_after, later)
    assert ModelStore.open(path).attrs["eps"] == 0.01
