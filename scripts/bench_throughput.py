"""Images per second of fit and score against the backbone-only forward pass, side by side.

The backbone-only pass runs the same truncated model (cut after the last layer
PaDiM needs), with the same data loading, batch size, threads, device and
allocator settings; only the PaDiM work (channel selection, statistics,
Mahalanobis, maps) is missing. It is also run once first with glibc's default
allocator settings (as in a plain PyTorch process), for reference.
Phases are interleaved (backbone, fit, score, backbone, ...) and the ratios are
taken per round, so a noisy machine affects both sides of a ratio alike.

Two rates per phase: the whole call on N images (with its fixed costs: a fit
creates the store, zero-fills the accumulator and writes a checkpoint), and the
streaming rate, the marginal rate between calls on N/4 and N images (what a
fit over millions of images runs at). For the fit, the marginal rate is taken
over its streaming part (first batch's features to the checkpoint write: store
creation, zero-filling a 7.6 GB accumulator and the write vary by seconds with
the page cache), then charged for the periodic checkpoints of the default
spacing (every 1000 images, at least 50 write-times apart) at the separately
measured cost of one checkpoint.

    python scripts/bench_throughput.py --preset r18-rd100 --n 256
    python scripts/bench_throughput.py --preset wr50-rd550 --n 64 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _bench_common import emit, write_images
from padim_ooc.config import DEFAULT_EMBEDDING, EMBEDDINGS
from padim_ooc.data import ImageFiles, loader
from padim_ooc.extractor import Extractor
from padim_ooc.finalize import finalize
from padim_ooc.fit import AUTO_CHECKPOINT_IMAGES, CHECKPOINT_SPACING, run_fit
from padim_ooc.memory import tune_allocator
from padim_ooc.options import FitOptions, ScoreOptions
from padim_ooc.score import Model, score_images
from padim_ooc.store import ModelStore

PRESETS = {"r18-rd100": ("resnet18", 100), "wr50-rd550": ("wide_resnet50_2", 550)}


def backbone_only(ex: Extractor, paths, batch_size: int, workers: int | None) -> float:
    """Seconds to run the truncated backbone over ``paths`` (loading included)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, _, batch, _, _ in loader(ImageFiles(paths, ex.preprocess), batch_size, workers=workers,
                                        device=ex.device.type):
            x = batch.to(ex.device, non_blocking=True)
            if ex.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            out = ex._module(x)
        if ex.device.type == "cuda":
            torch.cuda.synchronize()
            del out
    return time.perf_counter() - t0


def fit_seconds(ex: Extractor, paths, store_path: Path, batch_size: int, workers: int | None) -> tuple[float, float]:
    """(seconds of one ``run_fit`` call on a new store, without finalize, seconds of its streaming part).

    The streaming part runs from the first batch's features to the start of the
    checkpoint write: it leaves out creating the store and zero-filling the
    accumulator (for a 7.6 GB wr50-rd550 state their time varies by seconds
    with the page cache) and the write itself (timed apart).
    """
    shutil.rmtree(store_path, ignore_errors=True)
    marks = {}
    embed, checkpoint = ex.embed_patches, ModelStore.checkpoint

    def first_embed(*args, **kwargs):
        marks.setdefault("first", time.perf_counter())
        return embed(*args, **kwargs)

    def timed_checkpoint(store, *args, **kwargs):
        marks.setdefault("checkpoint", time.perf_counter())
        return checkpoint(store, *args, **kwargs)

    ex.embed_patches, ModelStore.checkpoint = first_embed, timed_checkpoint
    try:
        t0 = time.perf_counter()
        options = FitOptions(batch_size=batch_size, checkpoint_every=10**9, loader_workers=workers, finalize=False)
        summary, _ = run_fit(paths, store_path, options, extractor=ex)
        total = time.perf_counter() - t0
    finally:
        del ex.embed_patches
        ModelStore.checkpoint = checkpoint
    if summary.added != len(paths):
        raise SystemExit(f"the fit added {summary.added} of {len(paths)} images: the benchmark images must differ")
    return total, marks["checkpoint"] - marks["first"]


def checkpoint_seconds(store_path: Path) -> float:
    """Seconds to write one checkpoint of the store's state (as a long fit does periodically)."""
    store = ModelStore.open(store_path, writable=True)
    moments = store.load_moments()
    t0 = time.perf_counter()
    store.checkpoint(moments, [])
    return time.perf_counter() - t0


def score_seconds(model: Model, paths, batch_size: int, workers: int | None) -> float:
    t0 = time.perf_counter()
    score_images(model, paths, ScoreOptions(batch_size=batch_size, loader_workers=workers), lambda *a: None)
    if model.extractor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def rates(n_small: int, n: int, small_s: float, full_s: float) -> tuple[float, float]:
    """(images/s of the whole call on n images, streaming images/s: the marginal rate between
    the calls on n_small and n images, without the fixed costs of a call)."""
    return n / full_s, (n - n_small) / max(full_s - small_s, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="r18-rd100")
    ap.add_argument("--n", type=int, default=256, help="images per phase")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--loader-workers", type=int, default=None)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "padim_bench_images")
    ap.add_argument("--embedding", choices=EMBEDDINGS, default=DEFAULT_EMBEDDING,
                    help="the dims kept: a channel subset (PaDiM) or a semi-orthogonal projection")
    ap.add_argument("--markdown", default=None, help="append a table to this file")
    args = ap.parse_args()

    backbone, dims = PRESETS[args.preset]
    paths = write_images(args.data, args.n)
    ex = Extractor(backbone, dims=dims, weights=None, device=args.device, embedding=args.embedding)
    work = Path(tempfile.mkdtemp(prefix="padim_bench_"))
    store_path = work / "m.zarr"
    try:
        ex.embed(torch.zeros(2, 3, 224, 224))  # warm-up
        # the backbone in a process with glibc's default allocator settings, for reference; then
        # every phase runs with padim_ooc's (fit and score set them: memory.tune_allocator)
        plain = backbone_only(ex, paths, args.batch_size, args.loader_workers)
        plain = len(paths) / plain
        print(f"backbone, default allocator: {plain:.2f} img/s", flush=True)
        tune_allocator()
        rounds = []
        small = paths[:max(args.batch_size, args.n // 4)]
        for r in range(args.rounds):
            b_whole, b_stream = rates(len(small), args.n, backbone_only(ex, small, args.batch_size, args.loader_workers),
                                      backbone_only(ex, paths, args.batch_size, args.loader_workers))
            _, small_stream = fit_seconds(ex, small, store_path, args.batch_size, args.loader_workers)
            full_s, full_stream = fit_seconds(ex, paths, store_path, args.batch_size, args.loader_workers)
            f_whole = args.n / full_s
            _, f_stream = rates(len(small), args.n, small_stream, full_stream)
            ckpt = checkpoint_seconds(store_path)
            # a long fit with the default (auto) checkpoints: one every AUTO_CHECKPOINT_IMAGES images,
            # but at least CHECKPOINT_SPACING write-times apart; their cost spread over the images
            between = max(AUTO_CHECKPOINT_IMAGES, CHECKPOINT_SPACING * ckpt * f_stream)
            f_long = 1 / (1 / f_stream + ckpt / between)
            if r == 0:  # the scored model: this round's fit, finalized, kept beside the next fits
                scored = work / "scored.zarr"
                store_path.rename(scored)
                t0 = time.perf_counter()
                finalize(ModelStore.open(scored, writable=True))
                finalize_s = time.perf_counter() - t0
            model = Model(ModelStore.open(scored), extractor=ex)
            model._statistics()  # loaded before the clock starts, as in a scoring service
            s_whole, s_stream = rates(len(small), args.n, score_seconds(model, small, args.batch_size, args.loader_workers),
                                      score_seconds(model, paths, args.batch_size, args.loader_workers))
            del model  # free the precision matrices (3.8 GB for wr50-rd550) before the next fit
            rounds.append({"backbone": b_whole, "fit": f_whole, "score": s_whole, "checkpoint_s": ckpt,
                           "backbone_stream": b_stream, "fit_stream": f_stream, "fit_long": f_long,
                           "score_stream": s_stream,
                           "fit_ratio": f_whole / b_whole, "score_ratio": s_whole / b_whole,
                           "fit_long_ratio": f_long / b_stream, "score_stream_ratio": s_stream / b_stream})
            print(f"round {r}: whole calls of {args.n} images: backbone {b_whole:.2f} img/s, fit {f_whole:.2f} "
                  f"({f_whole / b_whole:.3f}), score {s_whole:.2f} ({s_whole / b_whole:.3f}) | streaming: backbone "
                  f"{b_stream:.2f}, fit with default checkpoints {f_long:.2f} ({f_long / b_stream:.3f}; checkpoint "
                  f"{ckpt:.2f} s), score {s_stream:.2f} ({s_stream / b_stream:.3f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    record = {"bench": "throughput", "preset": args.preset, "embedding": args.embedding, "device": str(ex.device),
              "n": args.n,
              "n_small": len(small), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              **{k: round(v, 4) for k, v in med.items()}, "finalize_s": round(finalize_s, 2),
              "backbone_default_allocator": round(plain, 4), "rounds": rounds}
    table = ("| preset | device | N | batch | backbone img/s | fit img/s | score img/s | fit / backbone "
             "| score / backbone | streaming: fit / backbone (default checkpoints) | streaming: score / backbone |\n"
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
             f"| {args.preset}{'' if args.embedding == 'random' else ' (orthogonal)'} | {ex.device} | {args.n} | {args.batch_size} | {med['backbone']:.2f} | {med['fit']:.2f} | "
             f"{med['score']:.2f} | {med['fit_ratio']:.3f} | {med['score_ratio']:.3f} | {med['fit_long_ratio']:.3f} | "
             f"{med['score_stream_ratio']:.3f} |")
    emit(record, args.markdown, table)


if __name__ == "__main__":
    main()
