"""padim_ooc against anomalib's PaDiM on the same images: peak RSS, wall time, score agreement.

Both sides get the same features: one seeded random-init torchvision resnet18
state dict (padim_ooc: ``--weights PATH``; anomalib: loaded into its timm
backbone), the same 100 channel indices (padim_ooc's, read from ``padim-ooc
info``, written over anomalib's ``idx`` buffer), the same input tensors
(padim_ooc's preprocessing: square resize 256, centre crop 224, ImageNet
normalisation) and the same regularisation (anomalib adds 0.01 I in
``MultiVariateGaussian.forward`` and another 1e-5 I before inverting, so
padim_ooc runs with ``--eps 0.01001``).

anomalib runs in its own virtual environment (never the system python), as a
subprocess driving its torch model the way its Lightning training does: one
epoch of ``model(batch)`` in train mode (embeddings appended to its memory
bank), ``model.fit()`` (``torch.vstack`` + ``MultiVariateGaussian.fit``), then
``model.eval()`` and ``model(test_batch)``. padim_ooc runs as ``padim-ooc fit``
and ``padim-ooc score`` subprocesses. Each subprocess's peak RSS (process tree,
sampled every 50 ms) and wall time are measured.

    python -m venv /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    python scripts/bench_vs_anomalib.py --n 200 800 1600 3200 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch

from _bench_common import emit, run_measured, write_images
from padim_ooc.data import decode_rgb
from padim_ooc.extractor import Extractor
from padim_ooc.score import anomaly_maps, mahalanobis
from padim_ooc.store import ModelStore, read_array

DEFAULT_PYTHON = "/tmp/anomalib-venv/bin/python"
LAYERS = ["layer1", "layer2", "layer3"]
DIMS = 100
POSITIONS = 56 * 56
BASE_GIB = 1.5  # anomalib's process besides its memory bank: 1.4-1.5 GiB at N = 40-80 (an upper bound at larger N)

# Written to a temp folder at run time and run with anomalib's python.
DRIVER = r'''
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
import torch
import anomalib
from anomalib.models.image.padim.torch_model import PadimModel

a = json.loads(sys.argv[1])
t_import = time.perf_counter() - t0


def batches(path, count):
    """Preprocessed (count, 3, 224, 224) float32 from a raw file, read batch by batch (no mmap)."""
    buf = np.empty((a["batch_size"], 3, a["crop"], a["crop"]), np.float32)
    with open(path, "rb") as f:
        for start in range(0, count, a["batch_size"]):
            b = min(a["batch_size"], count - start)
            f.readinto(memoryview(buf[:b]).cast("B"))
            yield torch.from_numpy(buf[:b])


t1 = time.perf_counter()
model = PadimModel(backbone="resnet18", layers=a["layers"], pre_trained=False, n_features=len(a["channels"]))
backbone = model.feature_extractor.feature_extractor
res = backbone.load_state_dict(torch.load(a["weights"], map_location="cpu", weights_only=True), strict=False)
assert not res.missing_keys, res.missing_keys
assert all(k.split(".")[0] in ("layer4", "fc") for k in res.unexpected_keys), res.unexpected_keys
model.idx = torch.tensor(a["channels"], dtype=torch.long)  # padim_ooc's channels over its random draw
t_build = time.perf_counter() - t1

t1 = time.perf_counter()
model.train()  # one training epoch: training_step calls model(batch.image), which appends to memory_bank
for batch in batches(a["train"], a["n"]):
    model(batch)
t_train = time.perf_counter() - t1
t1 = time.perf_counter()
model.fit()  # what on_train_epoch_end / on_validation_start call: vstack + gaussian.fit
t_gauss = time.perf_counter() - t1

t1 = time.perf_counter()
model.eval()
test = torch.cat([b.clone() for b in batches(a["test"], a["n_test"])])
with torch.no_grad():
    out = model(test)
t_test = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

with torch.no_grad():  # for the comparison only, after everything measured
    emb = model.generate_embedding(model.feature_extractor(test))
np.save(a["out"] + "/scores.npy", out.pred_score.numpy())
np.save(a["out"] + "/maps.npy", out.anomaly_map[:, 0].numpy())
np.save(a["out"] + "/embeddings.npy", emb.numpy())
np.save(a["out"] + "/mean.npy", model.gaussian.mean.numpy())
np.save(a["out"] + "/inv_covariance.npy", model.gaussian.inv_covariance.numpy())
print(json.dumps({"anomalib_version": anomalib.__version__, "torch_version": torch.__version__,
                  "threads": torch.get_num_threads(), "import_s": t_import, "build_s": t_build,
                  "train_epoch_s": t_train, "gaussian_fit_s": t_gauss, "test_s": t_test,
                  "ru_maxrss_mb": peak / 2**20}))
'''


def predicted_anomalib_gib(n: int) -> float:
    """anomalib's peak: its memory bank (a list of batch embeddings) and the vstack copy of it."""
    return BASE_GIB + 2 * n * DIMS * POSITIONS * 4 / 2**30


def padim(*args: str) -> list[str]:
    return [sys.executable, "-m", "padim_ooc", *args]


def save_weights(path: Path, seed: int) -> None:
    """A seeded random-init torchvision resnet18 state dict (the same one for both sides)."""
    from torchvision.models import get_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(get_model("resnet18", weights=None).state_dict(), path)


def write_tensors(paths: list[Path], ex: Extractor, out: Path) -> None:
    """padim_ooc's preprocessing of ``paths`` as raw float32 (N, 3, crop, crop), image by image."""
    with open(out, "wb") as f:
        for p in paths:
            f.write(ex.preprocess(decode_rgb(p.read_bytes())).numpy().tobytes())


def read_tensors(path: Path, count: int, crop: int) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, np.float32, count * 3 * crop * crop).reshape(count, 3, crop, crop))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to the largest |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare(ano: Path, store_path: Path, cli_scores: np.ndarray, ex: Extractor, test: torch.Tensor) -> dict:
    """Where the two sides differ: features, statistics, scores, maps."""
    store = ModelStore.open(store_path)
    mean32, prec = (read_array(a) for a in store.final_arrays())  # (P, d), (P, d, d) float32
    feats = ex.embed(test).numpy()  # (B, d, h, w)
    a_emb = np.load(ano / "embeddings.npy")
    a_mean = np.load(ano / "mean.npy").T  # anomalib: (d, P)
    a_prec = np.load(ano / "inv_covariance.npy")
    a_scores, a_maps = np.load(ano / "scores.npy").reshape(-1), np.load(ano / "maps.npy")  # (B,), (B, H, W)
    with torch.inference_mode():
        dist = mahalanobis(torch.from_numpy(feats), torch.from_numpy(mean32), torch.from_numpy(prec))
        maps = anomaly_maps(dist, ex.preprocess.crop).numpy()  # padim_ooc's float32 maps, no float16 rounding
        # anomalib's statistics through padim_ooc's distance + upsampling + blur: the post-processing alone
        a_dist = mahalanobis(torch.from_numpy(a_emb), torch.from_numpy(a_mean), torch.from_numpy(a_prec))
        maps_a_stats = anomaly_maps(a_dist, ex.preprocess.crop).numpy()
    prec_rel = np.linalg.norm(a_prec - prec, axis=(1, 2)) / np.linalg.norm(prec, axis=(1, 2))
    return {
        "embedding_max_rel_diff": rel(a_emb, feats),
        "mean_max_rel_diff": rel(a_mean, mean32),
        "precision_max_rel_diff": float(prec_rel.max()),  # per position, Frobenius norm
        "precision_median_rel_diff": float(np.median(prec_rel)),
        "score_max_abs_diff": float(np.abs(a_scores - cli_scores).max()),
        "score_max_rel_diff": float((np.abs(a_scores - cli_scores) / np.abs(cli_scores)).max()),
        "score_range": [float(cli_scores.min()), float(cli_scores.max())],
        "map_max_rel_diff": rel(a_maps, maps),
        "postprocess_map_max_rel_diff": rel(a_maps, maps_a_stats),
        "cli_vs_api_score_max_abs_diff": float(np.abs(cli_scores - maps.max(axis=(1, 2))).max()),
    }


def mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def row(r: dict) -> str:
    p, a = r["padim_ooc"], r["anomalib"]
    left = (f"| {r['n']} | {mib(p['fit']['peak_rss_tree_mb'])} ({mib(p['fit']['peak_rss_main_mb'])}) | "
            f"{p['fit']['wall_s']:.0f} | {mib(p['score']['peak_rss_tree_mb'])} | {p['score']['wall_s']:.0f} | ")
    if "skipped" in a:
        return left + f"not run: {a['skipped']} | | | | |"
    c = r["diff"]
    return left + (f"{mib(a['peak_rss_main_mb'])} ({mib(a['ru_maxrss_mb'])}) | {a['wall_s']:.0f} "
                   f"({a['train_epoch_s']:.0f} + {a['gaussian_fit_s']:.0f} + {a['test_s']:.0f}) | "
                   f"{a['peak_rss_main_mb'] / p['fit']['peak_rss_tree_mb']:.1f} | "
                   f"{c['score_max_abs_diff']:.2g} ({c['score_max_rel_diff']:.1e}) | {c['map_max_rel_diff']:.1e} |")


TABLE_HEAD = (
    "| N | padim_ooc fit peak RSS, tree (main) | fit s | padim_ooc score peak RSS | score s "
    "| anomalib peak RSS, sampled (ru_maxrss) | anomalib s (epoch + Gaussian + test) | RSS anomalib / padim_ooc fit "
    "| max abs score diff (rel) | max map diff / map max |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 800, 1600], help="training set sizes")
    ap.add_argument("--test", type=int, default=20, help="common test images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the channel draw")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eps", type=float, default=0.01001, help="padim_ooc's eps (anomalib: 0.01 + 1e-5)")
    ap.add_argument("--anomalib-python", default=DEFAULT_PYTHON, help="python of anomalib's virtual environment")
    ap.add_argument("--max-anomalib-gib", type=float, default=None,
                    help="skip anomalib where its predicted peak RSS exceeds this [60%% of the machine's memory]")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "padim_bench_vs_anomalib")
    ap.add_argument("--markdown", default=None, help="append a table to this file")
    args = ap.parse_args()

    if not Path(args.anomalib_python).is_file():
        raise SystemExit(f"anomalib's python not found at {args.anomalib_python}: create it with `python -m venv "
                         "/tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib` or pass --anomalib-python")
    probe = subprocess.run([args.anomalib_python, "-c", "import anomalib; print(anomalib.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"{args.anomalib_python} cannot import anomalib: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    version = probe.stdout.strip()
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    commit = git.stdout.strip() or "?"
    limit = args.max_anomalib_gib or 0.6 * psutil.virtual_memory().total / 2**30
    sizes = sorted(set(args.n))

    work = Path(tempfile.mkdtemp(prefix="padim_vs_anomalib_"))
    try:
        train = write_images(args.data / "train", sizes[-1])
        test = write_images(args.data / f"test{args.test}", args.test, seed=10**6)
        weights = work / "resnet18_random.pt"
        save_weights(weights, args.seed)
        ex = Extractor("resnet18", layers=LAYERS, dims=DIMS, seed=args.seed, weights=str(weights), device="cpu")
        write_tensors(train, ex, work / "train.f32")
        write_tensors(test, ex, work / "test.f32")
        test_tensors = read_tensors(work / "test.f32", len(test), ex.preprocess.crop)
        driver = work / "anomalib_driver.py"
        driver.write_text(DRIVER)
        rows = []
        for i, n in enumerate(sizes):
            listing = work / f"train_{n}.txt"
            listing.write_text("".join(f"{p}\n" for p in train[:n]))
            store = work / f"m{n}.zarr"
            fit = run_measured(padim("fit", str(listing), "--model", str(store), "--weights", str(weights),
                                     "--dims", str(DIMS), "--seed", str(args.seed), "--eps", str(args.eps),
                                     "--batch-size", str(args.batch_size), "--device", "cpu", "--quiet"))
            info = json.loads(subprocess.run(padim("info", str(store)), capture_output=True, text=True,
                                             check=True).stdout)
            if info["channels"] != ex.channels:
                raise SystemExit("padim_ooc's stored channels differ from this script's extractor's")
            out = work / f"scores{n}"
            score = run_measured(padim("score", str(store), str(args.data / f"test{args.test}"), "--out", str(out),
                                       "--weights", str(weights), "--batch-size", str(args.batch_size),
                                       "--device", "cpu", "--quiet"))
            with open(out / "scores.csv", newline="", encoding="utf-8") as f:
                by_path = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
            cli_scores = np.array([by_path[str(p)] for p in test])
            record = {"bench": "vs_anomalib", "n": n, "n_test": len(test), "eps": args.eps, "padim_ooc_commit": commit,
                      "padim_ooc": {k: {m: round(v, 2) for m, v in r.items() if m != "stdout"}
                                    for k, r in (("fit", fit), ("score", score))}}
            need = predicted_anomalib_gib(n)
            if need > limit:
                record["anomalib"] = {"skipped": f"predicted {need:.1f} GiB > limit {limit:.1f} GiB",
                                      "predicted_gib": round(need, 1)}
            else:
                ano = work / f"anomalib{n}"
                ano.mkdir()
                spec = {"train": str(work / "train.f32"), "test": str(work / "test.f32"), "n": n,
                        "n_test": len(test), "batch_size": args.batch_size, "crop": ex.preprocess.crop,
                        "layers": LAYERS, "channels": info["channels"], "weights": str(weights), "out": str(ano)}
                try:
                    res = run_measured([args.anomalib_python, str(driver), json.dumps(spec)])
                except SystemExit as err:  # e.g. killed for memory: record it, go on
                    record["anomalib"] = {"skipped": "failed: " + str(err).splitlines()[0][:200]}
                else:
                    inner = json.loads(res.pop("stdout").strip().splitlines()[-1])
                    record["anomalib"] = {**{k: round(v, 2) if isinstance(v, float) else v for k, v in inner.items()},
                                          **{k: round(v, 2) for k, v in res.items()},
                                          "predicted_gib": round(need, 1)}
                    record["diff"] = compare(ano, store, cli_scores, ex, test_tensors)
                shutil.rmtree(ano, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
            rows.append(record)
            note = (f"anomalib {version} in its own venv, padim_ooc {commit}, --eps {args.eps}; resnet18 random "
                    f"weights (seed {args.seed}), d = {DIMS}, 224 x 224 crop, batch {args.batch_size}, "
                    f"{len(test)} test images; times in s.\n\n")
            last = i == len(sizes) - 1  # one table with every row, appended once
            emit(record, args.markdown if last else None, note + TABLE_HEAD + "\n".join(row(r) for r in rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
