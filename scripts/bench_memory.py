"""Peak RSS of a whole `padim-ooc fit` process at several numbers of images.

Memory must not grow with N: the statistics are a fixed-size accumulator and the
images stream through. The fit runs as a subprocess (resnet18 Rd100 at 224,
random weights, finalize), its process
tree's RSS sampled every 50 ms, a checkpoint every 1000 images. The ratio peak(N_max) / peak(N_min) is the claim.

    python scripts/bench_memory.py --n 250 1000 4000 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _bench_common import emit, run_measured, write_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[250, 1000, 4000])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--checkpoint-every", type=int, default=1000,
                    help="explicit, so that a larger N also means more checkpoints")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "padim_bench_images")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()

    paths = write_images(args.data, max(args.n))
    work = Path(tempfile.mkdtemp(prefix="padim_mem_"))
    rows = []
    try:
        for n in args.n:
            listing = work / f"list_{n}.txt"
            listing.write_text("\n".join(str(p) for p in paths[:n]) + "\n")
            model = work / f"m_{n}.zarr"
            res = run_measured([sys.executable, "-m", "padim_ooc", "fit", str(listing), "--model", str(model),
                                "--weights", "none", "--batch-size", str(args.batch_size),
                                "--checkpoint-every", str(args.checkpoint_every), "-q"])
            out = json.loads(res["stdout"].strip().splitlines()[-1])
            assert out["n_images"] == n, out
            rows.append({"n": n, "wall_s": round(res["wall_s"], 1),
                         "peak_rss_main_mb": round(res["peak_rss_main_mb"]),
                         "peak_rss_tree_mb": round(res["peak_rss_tree_mb"])})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(model, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, last = rows[0], rows[-1]
    ratio_main = last["peak_rss_main_mb"] / first["peak_rss_main_mb"]
    ratio_tree = last["peak_rss_tree_mb"] / first["peak_rss_tree_mb"]
    lines = ["| N images | wall s | peak RSS, fit process (MB) | peak RSS, with loader workers (MB) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['n']} | {r['wall_s']} | {r['peak_rss_main_mb']} | {r['peak_rss_tree_mb']} |" for r in rows]
    lines.append(f"\nRatio peak RSS at N={last['n']} / N={first['n']}: {ratio_main:.3f} (fit process), "
                 f"{ratio_tree:.3f} (with loader workers).")
    emit({"bench": "memory", "rows": rows, "ratio_main": round(ratio_main, 4), "ratio_tree": round(ratio_tree, 4)},
         args.markdown, "\n".join(lines))


if __name__ == "__main__":
    main()
