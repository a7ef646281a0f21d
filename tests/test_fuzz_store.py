"""A fuzz test of the model store: a good small model, damaged every way we can name.

Every root attribute removed, retyped and set out of range; every array reshaped,
retyped, truncated and filled with NaN. On each damaged copy ``info``, ``score``,
``merge``, ``fit`` (extend) and ``finalize`` run in this process
(:func:`padim_ooc.cli.main`). Each must end with a one-line error and exit 2, or
succeed with a correct result; never an internal error (exit 3) or a traceback,
and never change a file outside the store (and the outputs it was asked to write).
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import write_images
from padim_ooc import cli
from padim_ooc.store.chunks import ATTR_KEY, COMPLETE_KEY

DROP = object()
FIT = ["--backbone", "resnet18", "--weights", "none", "--layers", "layer1", "--dims", "4", "--resize", "32",
       "--crop", "32"]
RUN = ["-q", "--loader-workers", "0", "--batch-size", "4"]


def _retypes(value):
    """Values of other JSON types than ``value``'s."""
    if isinstance(value, bool):
        return ["true", 1.5, None]
    if isinstance(value, (int, float)):
        return [str(value), [value], {"v": value}] + ([None] if value is not None else [])
    if isinstance(value, str):
        return [7, [value], None]
    if isinstance(value, list):
        return ["x", {"v": 1}, [str(v) for v in value] or [None]] + [None]
    return ["x", 1]


def _out_of_range(key, value):
    if isinstance(value, bool):
        return [2]
    if isinstance(value, int):
        return [-1, 0, 10**18] if key not in ("seed",) else []
    if isinstance(value, float):
        return [-1.0, math.nan, math.inf]
    if isinstance(value, str):
        return ["", "../../outside", "x" * 5000]
    if isinstance(value, list):
        return [[], value + value[:1] if value else ["000009"], [-1] * len(value), [10**9] * len(value)]
    return []


def attribute_cases(attrs):
    """(label, changes) for every attribute: removed, retyped, out of range."""
    cases = []
    for key in list(attrs) + ["calibration"]:
        value = attrs.get(key)
        cases.append((f"{key} removed", {key: DROP}))
        for v in _retypes(value):
            cases.append((f"{key} = {v!r:.30}", {key: v}))
        for v in _out_of_range(key, value):
            cases.append((f"{key} = {v!r:.30}", {key: v}))
    cases.append(("calibration = bad record", {"calibration": {"alpha": 2}}))
    cases.append(("unknown extra key", {"from_the_future": {"x": 1}}))
    return cases


def array_cases(attrs):
    arrays = [f"{attrs['state']}/mean", f"{attrs['state']}/m2", f"{attrs['final']}/mean",
              f"{attrs['final']}/precision", f"ledger/{attrs['ledger'][0]}"]
    cases = []
    for name in arrays:
        for how in ("reshaped+", "reshaped-", "retyped", "truncated", "nan"):
            if how == "nan" and name.startswith("ledger"):
                continue
            cases.append((f"{name} {how}", (name, how)))
    return cases


def damage_attrs(path: Path, changes: dict) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    attrs = meta["attributes"][ATTR_KEY]
    for key, value in changes.items():
        if value is DROP:
            attrs.pop(key, None)
        else:
            attrs[key] = value
    (path / "zarr.json").write_text(json.dumps(meta))


def damage_array(path: Path, name: str, how: str) -> None:
    arr = zarr.open_array(str(path / name), mode="r")
    data = arr[...]
    if how == "truncated":
        chunk = next(p for p in (path / name / "c").rglob("*") if p.is_file())
        chunk.write_bytes(chunk.read_bytes()[: max(1, chunk.stat().st_size // 2)])
        return
    if how == "nan":
        data = data.copy()
        data.flat[len(data.flat) // 2] = np.nan
    elif how == "retyped":
        data = data.astype(np.float32 if data.dtype != np.float32 else np.float64)
    elif how == "reshaped+":
        data = np.concatenate([data, data[:1]])
    elif how == "reshaped-":
        data = data[:-1] if len(data) > 1 else data.reshape(data.shape + (1,))
    shutil.rmtree(path / name)
    new = zarr.create_array(str(path / name), shape=data.shape, dtype=data.dtype, chunks=data.shape or None,
                            compressors=None, fill_value=0, attributes={COMPLETE_KEY: True},
                            config={"write_empty_chunks": True})
    new[...] = data


def snapshot(root: Path, skip: set[Path]) -> dict:
    """Every file under ``root`` but those under ``skip``: (size, mtime, first bytes)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for f in files:
            p = here / f
            st = p.lstat()
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    got = capsys.readouterr()
    return exc.value.code, got.out, got.err


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good small model (resnet18 layer1, random weights, 4 channels, an 8 x 8 grid),
    its images, a second image set for extending it, and its baseline scores."""
    root = tmp_path_factory.mktemp("fuzz")
    write_images(root / "imgs", 4, seed=1, size=(40, 40))
    write_images(root / "more", 2, seed=2, size=(40, 40), start=10)
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", str(root / "imgs"), "--model", str(root / "good.zarr"), *FIT, *RUN])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["score", str(root / "good.zarr"), str(root / "imgs"), "--out", str(root / "base"), *RUN])
    assert exc.value.code == 0
    return root


def _scores(folder: Path) -> dict:
    lines = (folder / "scores.csv").read_text().splitlines()[1:]
    return {line.rsplit(",", 1)[0]: float(line.rsplit(",", 1)[1]) for line in lines}


# fields whose valid values change the scores (the model says how to preprocess): compared with the
# good model's scores only when they are left as they were
SCORING_FIELDS = ("normalize_mean", "normalize_std")


@pytest.fixture()
def one_backbone(monkeypatch):
    """Build each configuration's backbone once (the fuzz test runs hundreds of commands)."""
    from padim_ooc.extractor import Extractor

    built = {}
    real = Extractor.from_config.__func__

    def cached(cls, config, **kw):
        key = (config, tuple(sorted(kw.items())))
        if key not in built:
            built[key] = real(cls, config, **kw)
        return built[key]

    monkeypatch.setattr(Extractor, "from_config", classmethod(cached))


def test_fuzz_the_store(good, tmp_path, capsys, one_backbone):
    base = json.loads((good / "good.zarr" / "zarr.json").read_text())["attributes"][ATTR_KEY]
    baseline = _scores(good / "base")
    cases = [(label, "attrs", c) for label, c in attribute_cases(base)]
    cases += [(label, "array", c) for label, c in array_cases(base)]
    outcomes = collections.Counter()
    problems = []
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    for k, (label, kind, change) in enumerate(cases):
        case = tmp_path / f"case{k:03d}"
        store = case / "m.zarr"
        shutil.copytree(good / "good.zarr", store)
        if kind == "attrs":
            damage_attrs(store, change)
        else:
            damage_array(store, *change)
        outputs = {case / "out", case / "merged.zarr", case / "merged.zarr.parts"}
        before = snapshot(tmp_path, {store, *outputs} | {tmp_path / f"case{j:03d}" for j in range(k)})
        n0 = None
        for command in ("info", "score", "merge", "fit", "finalize"):
            args = {"info": ["info", store],
                    "score": ["score", store, good / "imgs", "--out", case / "out", "--overwrite", *RUN],
                    "merge": ["merge", store, "--model", case / "merged.zarr"],
                    "fit": ["fit", good / "more", "--model", store, *RUN],
                    "finalize": ["finalize", store]}[command]
            shutil.rmtree(case / "merged.zarr", ignore_errors=True)
            code, out, err = run(capsys, *args)
            lines = [line for line in err.splitlines() if line.strip()]
            if code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                outcomes[(command, "error")] += 1
            elif code == 0 and "Traceback" not in err:
                outcomes[(command, "ok")] += 1
                if command == "info":
                    n0 = json.loads(out)["n_images"]
                if command == "score" and not label.startswith(SCORING_FIELDS):  # the good model's scores
                    got = _scores(case / "out")
                    if got.keys() != baseline.keys() or not all(
                            math.isclose(got[p], baseline[p], rel_tol=1e-4) for p in got):
                        problems.append((label, command, "scores differ from the good model's"))
                if command == "fit" and n0 is not None:
                    code2, out2, _ = run(capsys, "info", store)
                    if code2 != 0 or json.loads(out2)["n_images"] != n0 + 2:
                        problems.append((label, command, f"extended store unreadable or wrong count ({code2})"))
            else:
                problems.append((label, command, f"exit {code}: {err.strip()[-300:]}"))
            after = snapshot(tmp_path, {store, *outputs} | {tmp_path / f"case{j:03d}" for j in range(k)})
            if after != before:
                changed = sorted(str(p) for p in set(after) ^ set(before)) or sorted(
                    str(p) for p in after if after[p] != before.get(p))
                problems.append((label, command, f"changed outside the store: {changed[:3]}"))
                before = after
        shutil.rmtree(case)
    total = sum(outcomes.values())
    summary = {f"{c} {o}": n for (c, o), n in sorted(outcomes.items())}
    print(f"\nfuzz: {len(cases)} damaged stores, {total} runs: {json.dumps(summary)}")
    assert not problems, "\n".join(f"{label} / {command}: {what}" for label, command, what in problems[:20])
    assert len(cases) > 150
