"""Images in object storage against the same files on disk, and incremental fits over many files.

1. Incremental fit: a model that holds N_OLD files, extended with N_NEW new ones (the folder
   holds all of them): with the cache of identities (path, size, mtime) against without it
   (every old file read and hashed again, as padim_ooc did before the cache).
2. Fit throughput: images/s of ``padim_ooc.fit`` reading N_FIT images from a local S3 server
   (moto's server mode, in its own process on 127.0.0.1) against the same files on disk, same
   torch threads, no loader workers.
3. Listing and hashing per image: ``list_images`` of a prefix of N_LIST objects, and reading and
   hashing each image (``ImageFiles`` with every image already known: no decoding), S3 vs disk.

    PYTHONPATH=. python scripts/bench_s3.py [--old 20000] [--new 64] [--fit 128] [--list 1000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_images  # noqa: E402

import padim_ooc as po  # noqa: E402
from padim_ooc import sources  # noqa: E402
from padim_ooc.data import ImageFiles, Preprocess, digest, list_images  # noqa: E402
from padim_ooc.fit import run_fit  # noqa: E402
from padim_ooc.options import FitOptions  # noqa: E402
from padim_ooc.store import ModelStore  # noqa: E402


def small_files(folder: Path, count: int, size: int = 4096) -> list[Path]:
    """``count`` files of ``size`` random bytes named like images (old images are only hashed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        p = folder / f"old{i:06d}.png"
        p.write_bytes(rng.bytes(size))
        paths.append(p)
    return paths


def incremental(root: Path, n_old: int, n_new: int, extractor) -> dict:
    data = root / "inc"
    old = small_files(data / "old", n_old)
    write_images(data / "new", n_new, seed=1, size=(80, 80))
    model = root / "inc.zarr"
    opts = FitOptions(batch_size=32, loader_workers=0, finalize=False, progress=False)
    run_fit([data / "new" / "img0000.png", data / "new" / "img0001.png"], model, opts, extractor=extractor)
    (data / "new" / "img0000.png").unlink()  # n_new - 1 new images, plus these two held already
    (data / "new" / "img0001.png").unlink()
    write_images(data / "new", 2, seed=2, size=(80, 80), start=n_new)
    st = ModelStore.open(model, writable=True)  # the ledger and the identities a fit of the old files leaves
    digests = [digest(p.read_bytes()) for p in old]
    st.checkpoint(st.load_moments(), digests, [sources.identity(p) + d for p, d in zip(old, digests)])
    st.close()
    bare = root / "inc-nocache.zarr"
    shutil.copytree(model, bare)
    st = ModelStore.open(bare, writable=True)
    attrs = dict(st.attrs)
    attrs.pop("seen")
    st.group.attrs["padim_ooc"] = attrs  # a store without the cache: every old file is read again
    st.close()
    out = {}
    for name, path in (("without cache (read + hash all)", bare), ("with cache (path, size, mtime)", model)):
        shutil.copytree(path, root / "run.zarr")
        t = time.perf_counter()
        summary, _ = run_fit([data], root / "run.zarr", opts, extractor=extractor)
        out[name] = (time.perf_counter() - t, summary.added, summary.already_seen)
        shutil.rmtree(root / "run.zarr")
    return out


def moto(port: int):
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("moto server did not start")


def throughput(root: Path, n_fit: int, n_list: int, extractor, fs) -> dict:
    imgs = write_images(root / "fit", n_fit, seed=3, size=(256, 256))
    fs.mkdir("bench")
    fs.put([str(p) for p in imgs], [f"bench/fit/{p.name}" for p in imgs])
    out = {}
    opts = FitOptions(batch_size=32, loader_workers=0, finalize=False, progress=False)
    for name, src, model in (("disk", root / "fit", root / "d.zarr"), ("S3 (moto, loopback)", "s3://bench/fit/",
                                                                       "s3://bench/m.zarr")):
        t = time.perf_counter()
        run_fit([src], model, opts, extractor=extractor)
        out[f"fit from {name}"] = n_fit / (time.perf_counter() - t)
    small = small_files(root / "list", n_list)
    fs.put([str(p) for p in small], [f"bench/list/{p.name}" for p in small])
    for name, src in (("disk", root / "list"), ("S3", "s3://bench/list/")):
        t = time.perf_counter()
        items = list_images([src])
        listed = time.perf_counter() - t
        pre = Preprocess(72, 64)
        known = frozenset(digest(p.read_bytes()) for p in small)
        ds = ImageFiles(items, pre, skip=known)
        t = time.perf_counter()
        for i in range(0, len(items), 32):
            ds.__getitems__(list(range(i, min(i + 32, len(items)))))
        hashed = time.perf_counter() - t
        t = time.perf_counter()
        for it in items:
            sources.identity(it)
        ident = time.perf_counter() - t
        out[f"list {name}"] = (listed / len(items), hashed / len(items), ident / len(items))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=int, default=20000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--fit", type=int, default=128)
    ap.add_argument("--list", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    extractor = po.Extractor("resnet18", weights=None, seed=0, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="x",
                      AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    server = moto(port)
    root = Path(tempfile.mkdtemp(prefix="bench_s3_"))
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        for name, (wall, added, seen) in incremental(root, args.old, args.new, extractor).items():
            print(f"| incremental, {args.old} held + {args.new} new, {name} | {wall:.2f} s | added {added}, "
                  f"already seen {seen} |", flush=True)
        for name, value in throughput(root, args.fit, args.list, extractor, fs).items():
            if name.startswith("fit"):
                print(f"| {name}, {args.fit} images 256x256 PNG, resnet18 at 224 | {value:.1f} images/s | |")
            else:
                listed, hashed, ident = value
                print(f"| {name}: {args.list} objects of 4 KiB | list {listed * 1e6:.0f} us/image | read+hash "
                      f"{hashed * 1e6:.0f} us/image, identity {ident * 1e6:.1f} us/image |")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
