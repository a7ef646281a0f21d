"""Evaluation end to end on a generated MVTec AD class: metrics against sklearn and an
exact sort-based PRO, the bounded-memory (binned) path, the outputs, the CLI."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

import padim_ooc as po
from padim_ooc.evaluation.evaluate import evaluate
from padim_ooc.evaluation.layouts import find_layout
from padim_ooc.evaluation.metrics import PixelMetrics, PixelRocAccumulator

from PIL import Image

from conftest import make_mvtec_class, nearest_resize_crop, run_cli as run

SMALL = ["--weights", "none", "--resize", "72", "--crop", "64", "--loader-workers", "0", "-q"]


def exact_pro(masks, maps, fpr_limit=0.3):
    """PRO with every distinct score as a threshold (sorting, no bins): regions are the
    8-connected components of each image's mask, each region pixel weighs 1/region size."""
    weights = np.zeros(masks.shape)
    n_regions = 0
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        sizes = np.bincount(lab.ravel())
        weights[i][lab > 0] = 1.0 / sizes[lab[lab > 0]]
        n_regions += n
    s = maps.ravel().astype(np.float64)
    order = np.argsort(-s, kind="stable")
    normal = (~masks).ravel()[order]
    fpr = np.cumsum(normal) / normal.sum()
    pro = np.cumsum(weights.ravel()[order]) / n_regions
    last = np.r_[s[order][1:] != s[order][:-1], True]  # end of each group of tied scores
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    k = np.searchsorted(fpr, fpr_limit, side="right")
    x = np.r_[fpr[:k], fpr_limit]
    y = np.r_[pro[:k], np.interp(fpr_limit, fpr, pro)]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


@pytest.fixture(scope="module")
def case(tmp_path_factory, extractor):
    root = make_mvtec_class(tmp_path_factory.mktemp("mvtec") / "bottle")
    model = po.fit([root / "train" / "good"], root.parent / "m.zarr", extractor=extractor,
                   batch_size=8, loader_workers=0)
    layout = find_layout(root)
    paths = [it.path for it in layout.test]
    scores, maps = model.score(paths, batch_size=8)
    masks = np.stack([nearest_resize_crop(np.asarray(Image.open(it.mask)) > 0, 72, 64) if it.mask
                      else np.zeros((64, 64), bool) for it in layout.test])
    labels = np.array([it.defect_type != "good" for it in layout.test])
    return root, model, layout, scores, maps, masks, labels


def test_metrics_equal_independent_computations(case):
    root, model, layout, scores, maps, masks, labels = case
    ev = evaluate(model, root, batch_size=8, loader_workers=0)
    m = ev.metrics
    np.testing.assert_allclose(ev.scores, scores, rtol=1e-5)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["pixel_metrics"]["method"] == "exact"
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert m["pro"] == pytest.approx(exact_pro(masks, maps), abs=1e-12)  # exact: every score a threshold
    assert m["pixel_metrics"]["n_pixels"] == masks.size
    assert m["pixel_metrics"]["n_defect_pixels"] == int(masks.sum())
    assert 0.5 < m["pixel_auroc"] < 1.0 and 0.0 < m["pro"] < 1.0  # a real, imperfect signal
    assert m["counts"] == {"good": 6, "scratch": 5, "spot": 5}


def test_binned_path_is_close_to_exact(case):
    """Past max_exact_pixels the pixel metrics stream into bins whose range widens as
    higher scores arrive; measured error vs the exact values."""
    root, model, layout, scores, maps, masks, labels = case
    ev = evaluate(model, root, batch_size=3, loader_workers=0, max_exact_pixels=2 * 64 * 64)
    m = ev.metrics
    assert m["pixel_metrics"]["method"] == "binned"
    auc_err = abs(m["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel()))
    pro_err = abs(m["pro"] - exact_pro(masks, maps))
    assert auc_err < 2e-5 and pro_err < 2e-4, (auc_err, pro_err)


def realistic(seed, n=12, size=64, scale=1.0):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 3, 3))
    maps = 10 + 2 * noise / noise.std()
    masks = np.zeros(maps.shape, bool)
    for i in range(n // 2):
        y, x = rng.integers(0, size - 12, 2)
        masks[i, y:y + rng.integers(3, 12), x:x + rng.integers(3, 12)] = True
    maps += rng.uniform(2, 8, (n, 1, 1)) * ndimage.gaussian_filter(masks.astype(float), (0, 2, 2))
    return masks, (maps * scale).astype(np.float32)


def test_widening_the_range_is_an_exact_rebinning():
    rng = np.random.default_rng(0)
    first = rng.uniform(0.0, 1.0, (2, 16, 16))
    later = rng.uniform(-1.5, 3.5, (3, 16, 16))
    masks = rng.random((5, 16, 16)) < 0.2
    grown = PixelRocAccumulator(0.0, 1.0, n_bins=1024).update(masks[:2], first)
    grown.cover(later.min(), later.max()).update(masks[2:], later)
    assert (grown.lo, grown.hi) == (-4.0, 4.0)  # [0, 1] -> [0, 2] -> [0, 4] -> [-4, 4]
    direct = PixelRocAccumulator(-4.0, 4.0, n_bins=1024)
    direct.update(masks, np.concatenate([first, later]))
    np.testing.assert_array_equal(grown.pos_hist_, direct.pos_hist_)
    np.testing.assert_array_equal(grown.neg_hist_, direct.neg_hist_)


def test_pixel_metrics_stream_in_bounded_memory():
    masks, maps = zip(*(realistic(s, scale=1 + s) for s in range(4)))  # later batches score higher
    masks, maps = np.concatenate(masks), np.concatenate(maps)
    pm = PixelMetrics(max_exact_pixels=10 * 64 * 64)
    for i in range(0, len(masks), 6):
        pm.update(masks[i:i + 6], maps[i:i + 6])
    assert not pm.exact and pm._kept is None  # nothing of the images is kept past the limit
    res = pm.result()
    assert res["method"] == "binned" and res["n_pixels"] == masks.size
    assert abs(res["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < 2e-5
    assert abs(res["pro"] - exact_pro(masks, maps)) < 2e-4
    exact = PixelMetrics()
    for i in range(0, len(masks), 6):
        exact.update(masks[i:i + 6], maps[i:i + 6])
    res = exact.result()
    assert res["method"] == "exact"
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_outputs_and_report(case, tmp_path):
    root, model, layout, scores, maps, masks, labels = case
    ev = evaluate(model, root, batch_size=8, loader_workers=0, examples=2)
    report = ev.write(tmp_path / "out")
    out = tmp_path / "out"
    m = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "counts", "timings", "per_type", "threshold"):
        assert key in m
    assert m["timings"]["score_s"] > 0 and m["n_images"] == 16
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(it.path) for it in layout.test]
    s = np.array([float(r["score"]) for r in rows])
    types = np.array([r["defect_type"] for r in rows])
    for row in m["per_type"]:
        sel = types == row["defect_type"]
        assert row["images"] == sel.sum() and row["score_median"] == pytest.approx(np.median(s[sel]))
        if row["defect_type"] != "good":
            both = sel | (types == "good")
            assert row["image_auroc"] == pytest.approx(roc_auc_score(types[both] != "good", s[both]))
        assert row["flagged"] == pytest.approx(np.mean(s[sel] >= m["threshold"]["value"]))
    page = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 1 + 4 * 2 and all((out / src).is_file() for src in srcs)
    strip = Image.open(out / "top-01.png")
    assert strip.size == (4 * 64 + 3 * 6, 64)  # image | map | overlay | ground truth
    assert page.count("<svg") == 2 and "<td>scratch</td>" in page and "<td>spot</td>" in page
    top = ev.sections[0][3]
    assert [e.score for e in top] == sorted(scores, reverse=True)[:2]


def test_report_panels_show_the_right_image_map_and_mask(case, tmp_path):
    """Each example strip shows the map and the mask of the image its caption names:
    checked against model.score's map and the independently resized mask."""
    from scipy.stats import spearmanr

    root, model, layout, scores, maps, masks, labels = case
    ev = evaluate(model, root, batch_size=8, loader_workers=0, examples=1)
    page = ev.write(tmp_path / "out").read_text()
    index = {"/".join(it.path.parts[-3:]): i for i, it in enumerate(layout.test)}
    shown = re.findall(r'<code>([^<]+)</code></div><div class="heads"[^>]*>.*?<img src="([^"]+)"', page)
    assert {src for _, src in shown} == {"top-01.png", "bottom-01.png", "false-alarm-01.png", "miss-01.png"}
    for rel, src in shown:
        i = index[rel]
        strip = np.asarray(Image.open(tmp_path / "out" / src).convert("RGB")).astype(int)
        view, heat, _, truth = (strip[:, k * 70:k * 70 + 64] for k in range(4))  # 64 px + 6 px gap
        brightness = heat.sum(axis=2).ravel()  # the colour scale brightens monotonically
        assert spearmanr(brightness, maps[i].ravel())[0] > 0.99, src
        others = [spearmanr(brightness, maps[j].ravel())[0] for j in range(len(maps)) if j != i]
        assert max(others) < 0.9, src  # and it is not another image's map
        np.testing.assert_array_equal((truth != view).any(axis=2), masks[i])  # red exactly on the mask
    top = [i for rel, src in shown if src == "top-01.png" for i in [index[rel]]][0]
    assert top == int(np.argmax(scores)) and masks[top].any()
    ex = ev.sections[0][3][0]
    np.testing.assert_allclose(ex.amap, maps[top], rtol=1e-5)
    np.testing.assert_array_equal(ex.mask, masks[top])


def test_image_only_layout(tmp_path, extractor, case):
    model = case[1]
    from conftest import write_images

    write_images(tmp_path / "good", 5, seed=7)
    write_images(tmp_path / "defect", 4, seed=8)
    ev = evaluate(model, tmp_path, batch_size=8, loader_workers=0)
    assert ev.metrics["pixel_auroc"] is None and ev.metrics["pro"] is None
    assert ev.metrics["pixel_metrics"] is None and ev.pixel_roc is None
    page = ev.write(tmp_path / "out").read_text()
    assert "Not computed: this data set has no ground-truth masks" in page
    assert Image.open(tmp_path / "out" / "top-01.png").size == (3 * 64 + 2 * 6, 64)


def one_line_error(proc, text):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], \
        proc.stderr


def test_cli_evaluate(case, tmp_path, extractor):
    root, model = case[0], case[1]
    res = json.loads(run("evaluate", model.store.path, root, "--out", tmp_path / "o", "--loader-workers", "0",
                         "-q").stdout)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert res["image_auroc"] == m["image_auroc"] and res["counts"] == m["counts"]
    assert (tmp_path / "o" / "report.html").is_file()
    po.fit([root / "train" / "good"], tmp_path / "u.zarr", extractor=extractor, finalize=False, loader_workers=0)
    one_line_error(run("evaluate", tmp_path / "u.zarr", root, "--out", tmp_path / "p", ok=False),
                   "not finalized")


def test_cli_benchmark(tmp_path, extractor):
    from padim_ooc.recipes.benchmark import benchmark_mvtec
    from padim_ooc.errors import PadimError

    make_mvtec_class(tmp_path / "mv" / "bottle", seed=0, n_train=12, n_good=4, n_defect=3)
    make_mvtec_class(tmp_path / "mv" / "cable", seed=5, n_train=12, n_good=4, n_defect=3, masks=False)
    out = tmp_path / "bench"
    proc = run("benchmark", "mvtec", tmp_path / "mv", "--out", out, "--preset", "r18-rd100", *SMALL)
    table = proc.stdout
    assert "| bottle |" in table and "| cable |" in table
    res = json.loads((out / "benchmark.json").read_text())
    # the mean row says how many classes each mean is over (cable has no masks)
    mean_row = next(line for line in table.splitlines() if line.startswith("| **mean of 2 classes** |"))
    cells = [c.strip() for c in mean_row.split("|")[2:5]]
    assert cells == [f"{100 * res['mean']['image_auroc']:.1f}", f"{100 * res['mean']['pixel_auroc']:.1f} (1 of 2)",
                     f"{100 * res['mean']['pro']:.1f} (1 of 2)"]
    assert re.search(r"\| paper, PaDiM r18-rd100: mean of the 15 MVTec AD classes \| - \| 96\.7 \| 91\.7 \|", table)
    assert "over 2 of the 15 MVTec AD classes" in table
    assert ("Not the r18-rd100 preset's configuration: resize 72 (preset: 256); crop 64 (preset: 224); "
            "random weights (preset: ImageNet).") in table
    with open(out / "benchmark.csv", newline="") as f:
        csv_rows = {r[0]: r[1:] for r in csv.reader(f)}
    assert csv_rows["paper:r18-rd100 (mean of 15 classes)"][:3] == ["", "0.967", "0.917"]  # no float noise
    assert csv_rows["classes in the mean"][:3] == ["2", "1", "1"]
    assert all(len(v.split(".")[-1]) <= 6 for v in csv_rows["mean of 2 classes"][:3])
    per = {c: json.loads((out / c / "metrics.json").read_text()) for c in ("bottle", "cable")}
    for row in res["rows"]:
        for k in ("image_auroc", "pixel_auroc", "pro"):
            assert row[k] == per[row["class"]][k]
    assert res["mean"]["image_auroc"] == pytest.approx(np.mean([per[c]["image_auroc"] for c in per]))
    assert res["mean"]["pixel_auroc"] == pytest.approx(per["bottle"]["pixel_auroc"])  # cable has no masks
    assert per["cable"]["pixel_auroc"] is None
    assert (out / "benchmark.md").read_text().strip() == table.strip()
    attrs = po.open_model(out / "bottle" / "model.zarr").attrs
    assert attrs["backbone"] == "resnet18" and attrs["dims"] == 100 and attrs["n_images"] == 12
    # a rerun reuses the fitted model (same configuration): nothing is added twice
    again = benchmark_mvtec(tmp_path / "mv", out, extractor, classes=["bottle"], loader_workers=0)
    assert again["rows"][0]["n_train"] == 12 and again["rows"][0]["image_auroc"] == per["bottle"]["image_auroc"]
    with pytest.raises(PadimError, match="class 'nut' not found"):
        benchmark_mvtec(tmp_path / "mv", out, extractor, classes=["nut"])


def test_benchmark_table_notes_without_a_run():
    from padim_ooc.recipes.benchmark import markdown_table

    row = {"class": "bottle", "image_auroc": 0.9, "pixel_auroc": 0.95, "pro": 0.8, "n_train": 5, "n_test": 4,
           "fit_s": 1.0, "evaluate_s": 1.0}
    base = {"rows": [row], "mean": {k: row[k] for k in ("image_auroc", "pixel_auroc", "pro")},
            "mean_counts": {"image_auroc": 1, "pixel_auroc": 1, "pro": 1}, "overrides": []}
    lite = markdown_table(base | {"preset": "lite0", "paper": {"image_auroc": None, "pixel_auroc": None,
                                                                "pro": None}})
    assert "| paper, PaDiM lite0: mean of the 15 MVTec AD classes | - | - | - |" in lite
    assert "no EfficientNet-Lite0 results" in lite and "preset's configuration" not in lite
    assert "| **mean of 1 class** | 90.0 | 95.0 | 80.0 |" in lite
