"""Export benchmark: agreement with PyTorch, CPU images/s of onnxruntime and OpenVINO against
PyTorch on the same images and threads, export sizes, and the float16 error.

Fits small random-weight models (resnet18 Rd100 and efficientnet_lite0, 256/224) on synthetic
images, exports each to ONNX (float32, float16) and OpenVINO, and scores the same files.

    PYTHONPATH=. python scripts/bench_export.py [--threads 2] [--images 32] [--out /tmp/bench_export]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def rate(fn, n, repeat=3):
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeat))
    return n / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="/tmp/bench_export")
    ap.add_argument("--only-preprocess", action="store_true", help="just the preprocessing rates")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import padim_ooc as po
    from conftest import write_images
    from padim_ooc.export.exporter import export_model
    from padim_ooc.export.runtime import Scorer

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train = write_images(out / "train", 40, seed=1, size=(256, 256))
    test = write_images(out / "test", args.images, seed=2, size=(256, 256))
    # the preprocessing from 300x300 files (ELPV's size): the resize really runs
    from padim_ooc.data import Preprocess, read_image as model_read
    from padim_ooc.export.runtime import preprocess as rt_preprocess, read_image as rt_read

    files = write_images(out / "pre", args.images, seed=3, size=(300, 300))
    pre = Preprocess(256, 224)
    record = {"resize": 256, "crop": 224, "mean": pre.mean, "std": pre.std}
    rows = [{"model": "any", "export": "preprocess 300x300 -> 256/224", "engine": "numpy",
             "images_per_s": rate(lambda: [rt_preprocess(rt_read(p)[0], record) for p in files], len(files)),
             "torch_images_per_s": rate(lambda: [pre(model_read(p)[0]) for p in files], len(files))}]
    print(json.dumps(rows[0]))
    if args.only_preprocess:
        return
    for name, backbone in (("r18-rd100", "resnet18"), ("lite0", "efficientnet_lite0")):
        ex = po.Extractor(backbone, weights=None, seed=0, resize=256, crop=224, device="cpu")
        model = out / f"{name}.zarr"
        po.fit(train, model, extractor=ex, batch_size=10, loader_workers=0)
        m = po.open_model(model, device="cpu")
        from padim_ooc.data import read_image

        batch = torch.stack([ex.preprocess(read_image(p)[0]) for p in test])
        s0, m0 = m.score(batch, batch_size=args.batch)
        torch_rate = rate(lambda: m.score(batch, batch_size=args.batch), len(test))
        x = batch.numpy()
        exports = {}
        for label, kw in (("onnx", {}), ("onnx-float16", {"float16": True}), ("openvino", {"format": "openvino"})):
            folder = out / f"{name}-{label}"
            t = time.perf_counter()
            export_model(model, folder, **kw)
            export_s = time.perf_counter() - t
            size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".bin", ".xml"))
            exports[label] = (folder, export_s, size)
        for label, engine in (("onnx", "onnxruntime"), ("onnx-float16", "onnxruntime"), ("openvino", "openvino")):
            folder, export_s, size = exports[label]
            sc = Scorer(folder, threads=args.threads, engine=engine)

            def run():
                return [sc.score_arrays(x[i:i + args.batch]) for i in range(0, len(x), args.batch)]

            parts = run()
            s = np.concatenate([p["scores"] for p in parts])
            mp = np.concatenate([p["maps"] for p in parts])
            files = sc.score(test, batch_size=args.batch)  # through the runtime's own preprocessing
            rows.append({"model": name, "export": label, "engine": engine, "score_rel": rel(s, s0),
                         "map_rel": rel(mp, m0), "files_score_rel": rel(files["scores"], s0),
                         "images_per_s": rate(run, len(test)), "torch_images_per_s": torch_rate,
                         "export_s": export_s, "bytes": size})
        for r in rows[-3:]:
            print(json.dumps(r))
    (out / "bench_export.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
