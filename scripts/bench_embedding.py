"""Image AUROC of PaDiM's random channel subset against the semi-orthogonal embedding, each with and
without OAS shrinkage, on the demo's ELPV split, over seeds of the draw.

    python scripts/bench_embedding.py [--backbones lite0 resnet18] [--seeds 0 1 2] [--k 100]
        [--cells mono poly] [--dir DIR] [--markdown table.md]

For each cell type the split is prepared once (``prepare_elpv``, split seed 0, the whole split as
``demo --full`` uses it: 20 % of the normals held out, every defective cell), so only the draw
varies with ``--seeds``. For each backbone, embedding and draw seed: one fit of the training
normals (k features: ``dims=k`` random channels, or the F x k orthonormal projection), then the
test images scored with ``eps`` only and again after re-finalizing the same statistics with
``shrinkage="oas"`` (no image read twice for the fit). AUROC from ``sklearn.metrics.roc_auc_score``
on the image scores. Backbones: ``lite0``/``lite1``/``lite2`` with their ImageNet weights (the
``[demo]`` extra), ``resnet18`` with random weights (the control). Input: 224 x 224, the whole
cell (as the demo). Prints one JSON line per run and a mean/spread table at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import emit  # noqa: E402

import padim_ooc as po  # noqa: E402
from padim_ooc.data import list_images  # noqa: E402
from padim_ooc.extractor import Extractor  # noqa: E402
from padim_ooc.recipes.elpv import prepare_elpv  # noqa: E402

BACKBONES = {"lite0": ("efficientnet_lite0", "default"), "lite1": ("efficientnet_lite1", "default"),
             "lite2": ("efficientnet_lite2", "default"), "resnet18": ("resnet18", "none")}


def auroc(model, good: list[Path], defect: list[Path], batch_size: int) -> float:
    scores, _ = model.score(good + defect, batch_size=batch_size)
    return float(roc_auc_score([0] * len(good) + [1] * len(defect), scores))


def run(name: str, embedding: str, seed: int, k: int, split: dict, work: Path, batch_size: int) -> dict:
    backbone, weights = BACKBONES[name]
    extractor = Extractor(backbone, dims=k, weights=weights, resize=224, crop=224, seed=seed,
                          embedding=embedding, device="cpu")
    path = work / f"{split['root'].name}-{name}-{embedding}-{seed}.zarr"
    if path.exists():  # a fresh fit: an existing store would be extended
        shutil.rmtree(path)
    t0 = time.perf_counter()
    model = po.fit([split["train_good"]], path, extractor=extractor, batch_size=batch_size, loader_workers=0)
    fit_s = time.perf_counter() - t0
    good, defect = list_images([split["test_good"]]), list_images([split["test_defect"]])
    plain = auroc(model, good, defect, batch_size)
    oas = auroc(po.finalize_model(path, shrinkage="oas"), good, defect, batch_size)
    return {"backbone": name, "embedding": embedding, "seed": seed, "k": k, "F": sum(extractor.layer_channels),
            "n_train": model.n_images, "auroc": plain, "auroc_oas": oas, "fit_s": round(fit_s, 1)}


def table(rows: list[dict]) -> str:
    out = ["| cells | backbone | F -> k | embedding | AUROC (eps) | AUROC (OAS) | seeds |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["cells"], r["backbone"], r["embedding"]) for r in rows},
                  key=lambda t: (t[0], list(BACKBONES).index(t[1]), t[2]))
    for cells, name, emb in keys:
        group = [r for r in rows if (r["cells"], r["backbone"], r["embedding"]) == (cells, name, emb)]

        def cell(field):
            values = [r[field] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {spread:.4f}"
        out.append(f"| {cells} | {name} | {group[0]['F']} -> {group[0]['k']} | {emb} | {cell('auroc')} | "
                   f"{cell('auroc_oas')} | {len(group)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["lite0", "resnet18"], choices=list(BACKBONES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=100, help="features kept (random) or projected to (orthogonal)")
    ap.add_argument("--cells", nargs="+", default=["mono", "poly"], choices=["mono", "poly"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=None, help="where the split and models go (default: a temp dir)")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    rows = []
    for cells in args.cells:
        split = prepare_elpv(work / f"elpv-{cells}", cell_type=cells, seed=0)
        for name in args.backbones:
            for embedding in ("random", "orthogonal"):
                for seed in args.seeds:
                    row = {"cells": cells, **run(name, embedding, seed, args.k, split, work / "models", args.batch_size)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    emit({"runs": rows}, args.markdown, table(rows))


if __name__ == "__main__":
    main()
