"""The GPU part of issue 13 that a CPU cannot check: run by ``scripts/gpu_check.sh``.

Writes one JSON record: the device, the CUDA tests' outcome, ``bench_throughput.py`` for
r18-rd100 and wr50-rd550 on the device, and a synthetic fit of ``--images`` images (100,000 on
an H200) with its peak host RSS and peak GPU memory (``torch.cuda.max_memory_allocated``).
``--device cpu`` with small sizes is the same run on a machine without a GPU (a dry run of the
script itself).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def step(cmd: list[str], limit: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=HERE.parent)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = "timeout", (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


def synthetic_fit(n: int, device: str, batch_size: int, workers: int) -> dict:
    """Fit r18-rd100 (random weights) on n small synthetic images in this process; peak memory."""
    import torch

    sys.path.insert(0, str(HERE))
    from _bench_common import write_images

    import padim_ooc as po

    data = Path(tempfile.gettempdir()) / f"gpu_check_images_{n}"
    t0 = time.perf_counter()
    write_images(data, n, size=64, seed=7)  # small files: decoding is not what is measured
    write_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = Path(tempfile.mkdtemp()) / "m.zarr"
    t0 = time.perf_counter()
    fitted = po.fit([data], model, extractor=po.Extractor("resnet18", dims=100, weights="none", device=device),
                    batch_size=batch_size, loader_workers=workers, progress=False)
    fit_s = time.perf_counter() - t0
    return {"images": fitted.n_images, "write_s": round(write_s, 1), "fit_s": round(fit_s, 1),
            "images_per_s": round(fitted.n_images / fit_s, 1),
            "peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--bench-n", type=int, default=512, help="images per bench_throughput phase")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = ap.parse_args()
    import torch

    record = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    record["cuda_tests"] = step([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider"], 150)
    record["throughput"] = {}
    bench_batch = min(args.batch_size, 64)
    # the marginal (streaming) rate is taken between N/4 and N images: N/4 must hold a whole batch
    for preset, n in (("r18-rd100", max(4 * bench_batch, args.bench_n)),
                      ("wr50-rd550", max(4 * bench_batch, args.bench_n // 4))):
        record["throughput"][preset] = step(
            [sys.executable, str(HERE / "bench_throughput.py"), "--preset", preset, "--n", str(n), "--rounds", "1",
             "--device", args.device, "--batch-size", str(bench_batch),
             "--loader-workers", str(args.loader_workers)], 180)
    record["synthetic_fit"] = synthetic_fit(args.images, args.device, args.batch_size, args.loader_workers)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: (v if k != "throughput" else {p: r["tail"][-600:] for p, r in v.items()})
                      for k, v in record.items()}, indent=1)[-6000:])


if __name__ == "__main__":
    main()
