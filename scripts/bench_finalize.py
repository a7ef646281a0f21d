"""Finalize benchmark at the WR50-Rd550 shape: peak memory and time of padim_ooc's finalize
against a plain in-memory batched torch Cholesky, on the same synthetic SPD statistics.

    python scripts/bench_finalize.py [--positions 3136 --dims 550] [--markdown table.md]

1. Writes a model store whose ``m2`` (positions x d x d float64: 7.6 GB at 3136 x 550 x 550)
   holds synthetic SPD matrices, chunk by chunk (the writing process never holds more than one
   chunk), under ``--dir`` (default: the system's temporary folder).
2. Runs ``padim_ooc.finalize.finalize`` on it in a child process and reads that child's peak
   RSS from the kernel (``os.wait4`` -> ``ru_maxrss``), and its wall time.
3. Checks the stored float32 precision against numpy's float64 inverse of
   ``m2 / (n - 1) + eps I`` at sampled positions.
4. Runs the plain approach in another child: read the first K positions of ``m2`` into memory,
   ``torch.linalg.cholesky`` + ``torch.cholesky_inverse`` on the whole batch (K: as many as fit in
   half the available memory, at about 36 bytes per matrix element; ``--baseline-positions``).
5. Prints one JSON line; ``--markdown PATH`` also writes a table. The store is removed at the end
   (``--keep`` keeps it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date

import numpy as np

BASELINE_BYTES_PER_ELEMENT = 36  # m2 float64 + covariance + factor + inverse (8 each) + float32 copy


def config(positions: int, dims: int) -> dict:
    side = int(round(positions ** 0.5))
    grid = [side, positions // side] if side * (positions // side) == positions else [1, positions]
    return {"backbone": "wide_resnet50_2", "layers": ["layer1", "layer2", "layer3"],
            "layer_channels": [256, 512, 1024], "channels": list(range(dims)), "dims": dims, "seed": 0,
            "weights": "synthetic", "weights_digest": "synthetic", "resize": 256, "crop": 224,
            "normalize_mean": [0.485, 0.456, 0.406], "normalize_std": [0.229, 0.224, 0.225], "grid": grid}


def spd_chunk(start: int, stop: int, dims: int, n: int, seed: int):
    """m2 of positions start:stop: (n - 1) x a Wishart-like SPD covariance (eigenvalues ~0.002-3.7)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
    k = dims + dims // 10 + 1
    a = torch.randn(stop - start, dims, k, generator=gen, dtype=torch.float64)
    return (torch.bmm(a, a.transpose(1, 2)) * ((n - 1) / k)).numpy()


def write_store(path: str, positions: int, dims: int, n: int, seed: int) -> float:
    from padim_ooc.store import ModelStore

    t0 = time.perf_counter()
    store = ModelStore.create(path, config(positions, dims))
    name, mean, m2 = store.begin_state()
    cp = store.attrs["chunk_positions"]
    rng = np.random.default_rng(seed)
    for start in range(0, positions, cp):
        stop = min(start + cp, positions)
        m2[start:stop] = spd_chunk(start, stop, dims, n, seed)
        mean[start:stop] = rng.normal(size=(stop - start, dims))
    store.commit_state(name, n, np.zeros((0, 16), np.uint8))
    store.close()
    return time.perf_counter() - t0


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; returns (its JSON output, its peak RSS in bytes)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"child {args[:2]} failed with exit code {proc.returncode}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1]), usage.ru_maxrss * 1024


def child_finalize(path: str, eps: float) -> dict:
    import resource

    from padim_ooc.finalize import finalize
    from padim_ooc.store import ModelStore

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store = ModelStore.open(path, writable=True)
    t0 = time.perf_counter()
    finalize(store, eps=eps)
    seconds = time.perf_counter() - t0
    store.close()
    return {"seconds": seconds, "rss_after_imports": base}


def child_baseline(path: str, positions: int, eps: float, threads: int) -> dict:
    import resource

    import torch

    from padim_ooc.store import ModelStore

    if threads:
        torch.set_num_threads(threads)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store = ModelStore.open(path)
    n = store.n_images
    t0 = time.perf_counter()
    m2 = store.m2_array()[:positions]
    t1 = time.perf_counter()
    cov = torch.from_numpy(m2) / (n - 1) + eps * torch.eye(m2.shape[1], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    precision = torch.cholesky_inverse(chol).to(torch.float32)
    t2 = time.perf_counter()
    return {"load_seconds": t1 - t0, "seconds": t2 - t1, "positions": positions,
            "threads": torch.get_num_threads(), "rss_after_imports": base, "check": float(precision[0, 0, 0])}


def check(path: str, samples: int, eps: float, seed: int) -> float:
    """Largest |precision - numpy inverse| / max|inverse| over sampled positions."""
    from padim_ooc.store import ModelStore

    store = ModelStore.open(path)
    _, prec = store.final_arrays()
    m2 = store.m2_array()
    positions, n = m2.shape[0], store.n_images
    rng = np.random.default_rng(seed + 1)
    picks = sorted({0, positions - 1, *rng.choice(positions, size=min(samples, positions), replace=False).tolist()})
    worst = 0.0
    for p in picks:
        ref = np.linalg.inv(m2[p] / (n - 1) + eps * np.eye(m2.shape[1]))
        worst = max(worst, float(np.abs(prec[p].astype(np.float64) - ref).max() / np.abs(ref).max()))
    return worst


def machine() -> str:
    import psutil

    return f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}"


def markdown(r: dict) -> str:
    gib = 2**30
    ratios = ", ".join(f"{t:.2f} (against {b['torch_threads']} torch thread(s))"
                       for t, b in zip(r["time_ratio"], r["baselines"]))
    return "\n".join([
        "| | positions | time (s) | ms / position | peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| padim_ooc finalize (Dask over {r['chunk_positions']}-position chunks, from the store, "
        f"writes back) | {r['positions']} | {r['finalize_s']:.1f} | {r['finalize_ms_per_position']:.2f} | "
        f"{r['finalize_peak_rss'] / gib:.2f} |",
        *[f"| plain torch in memory, {b['torch_threads']} torch thread(s) (batched cholesky + "
          f"cholesky_inverse; loading {b['load_s']:.1f} s not timed) | {r['baseline_positions']} | "
          f"{b['seconds']:.1f} | {b['ms_per_position']:.2f} | {b['peak_rss'] / gib:.2f} |" for b in r["baselines"]],
        "",
        f"m2 on disk: {r['m2_bytes'] / 1e9:.1f} GB float64 ({r['positions']} x {r['dims']} x {r['dims']}); "
        f"time per position, padim_ooc / plain: "
        f"{ratios}; "
        f"largest relative error of the "
        f"precision against numpy's inverse at {r['sampled']} sampled positions: {r['max_rel_err']:.1e}; "
        f"RSS of a child after its imports: {r['finalize_rss_after_imports'] / gib:.2f} GiB; "
        f"the plain approach at all {r['positions']} positions would need about "
        f"{r['baseline_full_bytes'] / 1e9:.0f} GB.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=3136)
    ap.add_argument("--dims", type=int, default=550)
    ap.add_argument("--images", type=int, default=1000, help="n of the synthetic statistics")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=8, help="positions checked against numpy")
    ap.add_argument("--baseline-positions", type=int, default=None,
                    help="positions of the in-memory run [as many as fit in half the available memory]")
    ap.add_argument("--dir", default=None, help="where the store is written [system temporary folder]")
    ap.add_argument("--markdown", default=None, help="also write a markdown table here")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    args = ap.parse_args()

    import psutil

    from padim_ooc.store import positions_per_chunk

    folder = tempfile.mkdtemp(prefix="bench_finalize_", dir=args.dir)
    path = os.path.join(folder, "m.zarr")
    try:
        write_s = write_store(path, args.positions, args.dims, args.images, args.seed)
        fin, fin_rss = run_child(["--child", "finalize", path, str(args.eps)])
        err = check(path, args.samples, args.eps, args.seed)
        per_matrix = BASELINE_BYTES_PER_ELEMENT * args.dims ** 2
        k = args.baseline_positions or int(0.5 * psutil.virtual_memory().available // per_matrix)
        k = max(1, min(args.positions, k))
        baselines = [run_child(["--child", "baseline", path, str(k), str(args.eps), str(t)]) for t in (0, 1)]
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result = {
        "benchmark": "finalize", "positions": args.positions, "dims": args.dims,
        "chunk_positions": positions_per_chunk(args.dims),
        "m2_bytes": args.positions * args.dims ** 2 * 8, "write_s": round(write_s, 1),
        "finalize_s": fin["seconds"], "finalize_ms_per_position": 1e3 * fin["seconds"] / args.positions,
        "finalize_peak_rss": fin_rss, "finalize_rss_after_imports": fin["rss_after_imports"],
        "max_rel_err": err, "sampled": args.samples + 2,
        "baseline_positions": k, "baseline_full_bytes": per_matrix * args.positions,
        "baselines": [{"torch_threads": b["threads"], "load_s": b["load_seconds"], "seconds": b["seconds"],
                       "ms_per_position": 1e3 * b["seconds"] / k, "peak_rss": rss} for b, rss in baselines],
        "machine": machine(), "date": date.today().isoformat(),
    }
    result["time_ratio"] = [result["finalize_ms_per_position"] / b["ms_per_position"] for b in result["baselines"]]
    print(json.dumps(result))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(result) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, path, *rest = sys.argv[2:]
        if kind == "finalize":
            out = child_finalize(path, float(rest[0]))
        else:
            out = child_baseline(path, int(rest[0]), float(rest[1]), int(rest[2]))
        print(json.dumps(out))
    else:
        main()
