"""Float32 noise of the features across torch thread counts and batch compositions, and how far
it carries into the float64 statistics, the stored float32 arrays and the scores (the figures
behind the NOISE_* bounds of tests/conftest.py; table in docs/benchmarks.md).

Run:  python scripts/measure_feature_noise.py [--threads 1,2,3]
      ONEDNN_MAX_CPU_ISA=AVX python scripts/measure_feature_noise.py   (other convolution kernels)

Everything runs in this one process; the thread count is switched with torch.set_num_threads
(which is what the Dask worker plugin and conftest.py do too). Images: the conftest image_dir
(40 images, 20 in a/ seed 1, 20 in b/ seed 2). Extractor: the conftest `extractor` fixture
(resnet18, weights=None, seed 0, resize 72, crop 64, cpu).

rel(a, b) = max|a - b| / max|b|          (the tests' own measure, tests/test_fit.py::rel)
elem(a, b) = max |a - b| / |b|            (what an assert_allclose(rtol=...) sees, atol=0)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import CROP, RESIZE, write_images  # noqa: E402  (sets threads; reset below)

import padim_ooc as po  # noqa: E402
from padim_ooc.data import decode_rgb, list_images  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def elem(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nz = b != 0
    return float((np.abs(a - b)[nz] / np.abs(b)[nz]).max())


def allclose_ok(a, b, rtol, atol) -> bool:
    return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol))


def two_pass(feats: torch.Tensor):
    """tests/test_fit.py::exact_stats on given features (B, d, h, w)."""
    f = feats.flatten(2).permute(2, 0, 1).double().numpy()  # (P, N, d)
    mean = f.mean(axis=1)
    c = f - mean[:, None, :]
    cov = np.einsum("pni,pnj->pij", c, c) / (f.shape[1] - 1)
    return mean, cov


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2,3")
    ap.add_argument("--batches", default="1,7,32")
    ap.add_argument("--out", default=str(Path(__file__).with_name("noise_results.json")))
    ap.add_argument("--dump", help="also save features, statistics and scores to this .npz (see --compare)")
    ap.add_argument("--compare", nargs=2, metavar=("A.npz", "B.npz"),
                    help="compare two dumps (e.g. one run with ONEDNN_MAX_CPU_ISA=AVX) and exit")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    configs = list(itertools.product(threads, batches))
    ref_cfg = (min(2, max(threads)), max(batches))  # conftest's thread count, the largest batch

    tmp = Path(tempfile.mkdtemp(prefix="padim-noise-"))
    image_dir = tmp / "images"
    write_images(image_dir / "a", 20, seed=1)
    write_images(image_dir / "b", 20, seed=2, start=20)
    paths = list_images([image_dir])
    b_paths = list_images([image_dir / "b"])
    ex = po.Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu")
    pre = {}
    for t in threads:  # preprocessing (uint8 antialiased resize, normalize) under each thread count
        torch.set_num_threads(t)
        pre[t] = torch.stack([ex.preprocess(decode_rgb(p.read_bytes())) for p in paths])
    preprocess_identical = all(torch.equal(pre[t], pre[threads[0]]) for t in threads)
    x = pre[threads[0]]

    # 1. features and their two-pass float64 statistics
    feats, stats = {}, {}
    for t, b in configs:
        torch.set_num_threads(t)
        feats[t, b] = torch.cat([ex.embed(x[i:i + b]) for i in range(0, len(x), b)])
        stats[t, b] = two_pass(feats[t, b])
        again = torch.cat([ex.embed(x[i:i + b]) for i in range(0, len(x), b)])
        assert torch.equal(again, feats[t, b]), f"not repeatable at threads {t} batch {b}"

    # 2. po.fit with each configuration; scores of the b/ images
    models, fit_stats = {}, {}
    for t, b in configs:
        torch.set_num_threads(t)
        path = tmp / f"fit-t{t}-b{b}.zarr"
        m = po.fit([image_dir], path, extractor=ex, batch_size=b, loader_workers=0)
        mean32, prec = m.store.final_arrays()
        models[t, b] = path
        fit_stats[t, b] = (m.mean, m.covariance(), np.asarray(mean32[...]), np.asarray(prec[...]))
    # 2a. the reference model scored under each configuration (noise of the scoring features only)
    score_cfg, scores_by_model = {}, {}
    for t, b in configs:
        torch.set_num_threads(t)
        model = po.open_model(models[ref_cfg], device="cpu")
        score_cfg[t, b] = model.score(b_paths, batch_size=b)
    # 2b. each fitted model scored under the reference configuration (noise of the statistics only)
    torch.set_num_threads(ref_cfg[0])
    for cfg in configs:
        scores_by_model[cfg] = po.open_model(models[cfg], device="cpu").score(b_paths, batch_size=ref_cfg[1])

    rows = []
    for cfg in configs:
        f_ref, (m_ref, c_ref) = feats[ref_cfg], stats[ref_cfg]
        fm_ref, fc_ref, m32_ref, p_ref = fit_stats[ref_cfg]
        fm, fc, m32, p = fit_stats[cfg]
        s_ref, maps_ref = score_cfg[ref_cfg]
        s, maps = score_cfg[cfg]
        s2, maps2 = scores_by_model[cfg]
        rows.append({
            "threads": cfg[0], "batch": cfg[1],
            "features_rel": rel(feats[cfg], f_ref), "features_elem": elem(feats[cfg], f_ref),
            "features_bit_identical": bool(torch.equal(feats[cfg], f_ref)),
            "twopass_mean_rel": rel(stats[cfg][0], m_ref), "twopass_cov_rel": rel(stats[cfg][1], c_ref),
            "fit_mean_rel": rel(fm, fm_ref), "fit_cov_rel": rel(fc, fc_ref),
            "fit_vs_own_twopass_mean_rel": rel(fm, stats[cfg][0]),
            "fit_vs_own_twopass_cov_rel": rel(fc, stats[cfg][1]),
            "stored_mean32_elem": elem(m32, m32_ref), "stored_prec_rel": rel(p, p_ref),
            "stored_prec_elem": elem(p, p_ref),
            "scores_elem(scoring cfg)": elem(s, s_ref), "maps_rel(scoring cfg)": rel(maps, maps_ref),
            "scores_elem(fit cfg)": elem(s2, scores_by_model[ref_cfg][0]),
            "maps_rel(fit cfg)": rel(maps2, scores_by_model[ref_cfg][1]),
        })

    # the pairs the tests care about: threads t1 vs t2 at one batch size, batch b1 vs b2 at one thread count
    pairs = []
    for (c1, c2) in itertools.combinations(configs, 2):
        pairs.append({"a": c1, "b": c2,
                      "features_rel": rel(feats[c1], feats[c2]),
                      "twopass_mean_rel": rel(stats[c1][0], stats[c2][0]),
                      "twopass_cov_rel": rel(stats[c1][1], stats[c2][1]),
                      "fit_mean_rel": rel(fit_stats[c1][0], fit_stats[c2][0]),
                      "fit_cov_rel": rel(fit_stats[c1][1], fit_stats[c2][1]),
                      "stored_prec_rel": rel(fit_stats[c1][3], fit_stats[c2][3]),
                      "scores_elem(scoring cfg)": elem(score_cfg[c1][0], score_cfg[c2][0]),
                      "scores_elem(fit cfg)": elem(scores_by_model[c1][0], scores_by_model[c2][0]),
                      # the bounds some tests use, applied to this pair (True: that assertion would pass)
                      "cov rel<=1e-10": rel(fit_stats[c1][1], fit_stats[c2][1]) <= 1e-10,
                      "cov rel<=1e-9": rel(fit_stats[c1][1], fit_stats[c2][1]) <= 1e-9,
                      "cov rel<=1e-5": rel(fit_stats[c1][1], fit_stats[c2][1]) <= 1e-5,
                      "mean rel<=1e-6": rel(fit_stats[c1][0], fit_stats[c2][0]) <= 1e-6,
                      "cov allclose(rtol=1e-6,atol=1e-9)": allclose_ok(fit_stats[c1][1], fit_stats[c2][1], 1e-6, 1e-9),
                      "prec allclose(rtol=1e-4,atol=1e-5)": allclose_ok(fit_stats[c1][3], fit_stats[c2][3], 1e-4, 1e-5),
                      "prec allclose(rtol=1e-5,atol=1e-6*max)": allclose_ok(
                          fit_stats[c1][3], fit_stats[c2][3], 1e-5, 1e-6 * float(np.abs(fit_stats[c2][3]).max())),
                      "scores allclose(rtol=1e-6)(scoring cfg)": allclose_ok(score_cfg[c1][0], score_cfg[c2][0], 1e-6, 0),
                      "scores allclose(rtol=1e-6)(fit cfg)": allclose_ok(scores_by_model[c1][0],
                                                                         scores_by_model[c2][0], 1e-6, 0),
                      "maps allclose(rtol=2e-3,atol=1e-3*max)": allclose_ok(
                          score_cfg[c1][1], score_cfg[c2][1], 2e-3, 1e-3 * float(np.abs(score_cfg[c2][1]).max()))})
    # features only: which batch sizes give other features than batch 32 (per thread count)
    scan = {}
    for t in threads:
        torch.set_num_threads(t)
        for b in (1, 2, 3, 4, 5, 6, 8, 10, 16, 20, 40):
            f = torch.cat([ex.embed(x[i:i + b]) for i in range(0, len(x), b)])
            scan[f"t{t}-b{b}"] = rel(f, feats[ref_cfg])
    info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": torch.backends.mkldnn.is_available(), "reference": ref_cfg,
            "preprocess_bit_identical_across_threads": preprocess_identical}
    Path(args.out).write_text(json.dumps({"info": info, "vs_reference": rows, "pairs": pairs,
                                          "feature_batch_scan_rel_vs_reference": scan}, indent=1))

    print("features rel vs reference, by threads/batch size:", json.dumps({k: f"{v:.1e}" for k, v in scan.items()}))
    if args.dump:
        arrays = {}
        for (t, b) in configs:
            arrays[f"features-t{t}-b{b}"] = feats[t, b].numpy()
            arrays[f"fit_mean-t{t}-b{b}"], arrays[f"fit_cov-t{t}-b{b}"] = fit_stats[t, b][:2]
            arrays[f"prec32-t{t}-b{b}"] = fit_stats[t, b][3]
            arrays[f"scores-t{t}-b{b}"] = scores_by_model[t, b][0]  # own model, scored at the reference cfg
        np.savez(args.dump, **arrays)
    keys = [k for k in rows[0] if k not in ("threads", "batch")]
    print(json.dumps(info))
    print(f"vs reference threads={ref_cfg[0]} batch={ref_cfg[1]}")
    print("threads batch " + " ".join(keys))
    for r in rows:
        print(f"{r['threads']:>7} {r['batch']:>5} " + " ".join(
            str(r[k]) if isinstance(r[k], bool) else f"{r[k]:.2e}" for k in keys))
    worst = {k: max(p[k] for p in pairs) for k in pairs[0] if k not in ("a", "b") and not isinstance(pairs[0][k], bool)}
    print("pairs that differ, and which test bounds they would pass:")
    for p in pairs:
        if p["features_rel"] > 0:
            print(f"  {p['a']} vs {p['b']}: " + ", ".join(f"{k}={v}" for k, v in p.items() if isinstance(v, bool)))
    print("max over all pairs:", json.dumps({k: f"{v:.2e}" for k, v in worst.items()}))
    for label, sel in (("threads only (same batch)", lambda p: p["a"][1] == p["b"][1]),
                       ("batch only (same threads)", lambda p: p["a"][0] == p["b"][0])):
        sub = [p for p in pairs if sel(p)]
        print(f"max over pairs, {label}:",
              json.dumps({k: f"{max(p[k] for p in sub):.2e}" for k in worst}))


def compare(a_path: str, b_path: str) -> None:
    """rel (and elementwise for scores) of every array two dumps share."""
    a, b = np.load(a_path), np.load(b_path)
    print(f"{a_path} vs {b_path}")
    for key in sorted(set(a.files) & set(b.files)):
        extra = f"  elem {elem(a[key], b[key]):.2e}" if key.startswith("scores") else ""
        print(f"  {key:24s} rel {rel(a[key], b[key]):.2e}{extra}")


if __name__ == "__main__":
    main()
