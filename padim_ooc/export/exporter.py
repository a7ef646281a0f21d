"""Export a fitted model to one scorer graph (ONNX, or OpenVINO converted from it) and metadata.json.

The graph takes a preprocessed batch (N, 3, crop, crop) float32 and gives ``scores`` (N,) and
``maps`` (N, crop, crop), plus ``p_values`` (N,) and ``anomalous`` (N,) bool when the model has
a calibration: the backbone up to its last layer, the stored channel selection (or, for an
orthogonal embedding, the stored projection as one 1x1 convolution per layer) and nearest
upsampling, the Mahalanobis distance against the stored mean and precision, the map operators
of :func:`padim_ooc.score.map_operator` (bilinear upsampling and blur as two constant matrices),
the max. The mean and precision are initializers; above the 2 GB protobuf limit (or with
``external_data=True``) they are one external-data file, ``statistics.bin``, streamed from the
store chunk by chunk (the exporter never holds them whole).
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import PadimError
from ..extractor import Extractor
from ..options import DEFAULT_SIGMA
from ..score import map_operator
from ..store import ModelStore, read_array
from . import runtime

FORMATS = ("onnx", "openvino")
OPSET = 17
GRAPH = "model.onnx"
STATISTICS = "statistics.bin"
OPENVINO_XML = "model.xml"
# statistics inline up to this size (the whole graph must stay under protobuf's 2 GiB; the
# backbone's weights share it)
INLINE_LIMIT = 2**31 - 256 * 2**20


class ScorerGraph(torch.nn.Module):
    """The scorer as one torch module (what is exported): images (N, 3, crop, crop) -> outputs.

    ``mean`` (P, d) and ``precision`` (P, d, d) are forward *inputs* here: the export makes them
    initializers afterwards (:func:`_attach_statistics`), so their bytes never pass through the
    tracer or a protobuf in memory.
    """

    def __init__(self, extractor: Extractor, sigma: float, calibration: dict | None):
        super().__init__()
        self.backbone = copy.deepcopy(extractor._module).to(memory_format=torch.contiguous_format).eval()
        self.layers = list(extractor.layers)
        self.grid = tuple(extractor.grid)
        # (layer, selected channels, needs nearest upsampling) decided here, not in the trace
        self.parts = []
        for k, (idx, (rows, cols)) in enumerate(zip(extractor._per_layer, extractor._nearest)):
            if idx.numel():
                self.parts.append((k, self.layers[k], len(rows) != self.grid[0] or len(cols) != self.grid[1]
                                   or bool((rows != torch.arange(len(rows))).any() or (cols != torch.arange(len(cols))).any())))
            self.register_buffer(f"channels{k}", idx.cpu().clone())
            self.register_buffer(f"rows{k}", rows.cpu().clone())
            self.register_buffer(f"cols{k}", cols.cpu().clone())
        # an orthogonal embedding: layer k's rows of W (C_k, d) as the weight (d, C_k, 1, 1) of a
        # 1x1 convolution, applied before the upsampling (they commute); the parts are summed
        self.projected = extractor.projection is not None
        if self.projected:
            for k, wk in enumerate(extractor._weights_per_layer):
                self.register_buffer(f"projection{k}", wk.detach().cpu().T.contiguous()[:, :, None, None].clone())
        crop = extractor.preprocess.crop
        h, w = self.grid
        self.register_buffer("map_rows", map_operator(h, crop, sigma, torch.float32, "cpu").clone())
        self.register_buffer("map_cols_t", map_operator(w, crop, sigma, torch.float32, "cpu").T.contiguous())
        self.calibrated = calibration is not None
        if self.calibrated:
            # float32 constants that decide exactly as float64 would for float32 scores s:
            # s > t  <=>  s > (t rounded down), and c >= s  <=>  (c rounded up) >= s
            thr = _round32(calibration["threshold"], down=True)
            cal = np.array([_round32(c, down=False) for c in calibration["scores"]], np.float32)
            self.register_buffer("threshold", torch.tensor(thr, dtype=torch.float32))
            self.register_buffer("calibration_scores", torch.from_numpy(cal).view(1, -1))
            self.n_calibration = len(cal)

    def forward(self, images, mean, precision):
        feats = self.backbone(images)
        h, w = self.grid
        parts = []
        for k, layer, upsample in self.parts:
            if self.projected:
                f = torch.nn.functional.conv2d(feats[layer], getattr(self, f"projection{k}"))
            else:
                f = feats[layer].index_select(1, getattr(self, f"channels{k}"))
            if upsample:
                f = f.index_select(2, getattr(self, f"rows{k}")).index_select(3, getattr(self, f"cols{k}"))
            parts.append(f)
        f = sum(parts[1:], parts[0]) if self.projected else torch.cat(parts, 1)  # (N, d, h, w)
        n = f.shape[0]
        patches = f.flatten(2).permute(2, 0, 1)  # (P, N, d)
        diff = patches - mean.unsqueeze(1)
        prod = torch.matmul(diff, precision.float())  # precision symmetric, as in score.py
        dist = (prod * diff).sum(2).clamp_min(0).sqrt()  # (P, N)
        dist = dist.transpose(0, 1).reshape(n, h, w)
        maps = torch.matmul(torch.matmul(self.map_rows, dist), self.map_cols_t)
        scores = maps.flatten(1).amax(1)
        if not self.calibrated:
            return scores, maps
        at_least = (self.calibration_scores >= scores.unsqueeze(1)).float().sum(1)
        p_values = (at_least + 1.0) / float(self.n_calibration + 1)
        return scores, maps, p_values, scores > self.threshold


def _round32(value: float, *, down: bool) -> float:
    v = np.float32(value)
    if down and float(v) > value:
        v = np.nextafter(v, np.float32(-np.inf))
    elif not down and float(v) < value:
        v = np.nextafter(v, np.float32(np.inf))
    return float(v)


def export_model(model: str | os.PathLike, out: str | os.PathLike, *, format: str = "onnx",
                 float16: bool = False, sigma: float = DEFAULT_SIGMA, weights: str | None = None,
                 external_data: bool | None = None, opset: int = OPSET, exporter: str = "torchscript") -> dict:
    """Export the finalized model at ``model`` to the folder ``out`` (created; must be new or empty).

    Parameters
    ----------
    format : ``"onnx"`` or ``"openvino"``
        OpenVINO is converted from the ONNX graph by ``openvino.convert_model`` (the ONNX files
        are kept beside it).
    float16 : bool
        Store the precision matrices in float16 (half the size); the graph casts them back to
        float32. docs/benchmarks.md gives the score error this costs.
    sigma : float
        Blur of the maps, baked into the graph (as ``padim-ooc score --sigma``).
    external_data : bool or None
        Statistics in ``statistics.bin`` (ONNX external data); None: only when the graph would
        pass the 2 GB protobuf limit.

    Returns
    -------
    dict : the metadata written to ``out/metadata.json``.
    """
    if exporter not in ("torchscript", "dynamo"):
        raise PadimError(f"unknown exporter {exporter!r}: use torchscript or dynamo")
    if format not in FORMATS:
        raise PadimError(f"unknown export format {format!r}: use onnx or openvino")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PadimError(f"the export folder {out} exists and is not empty: give a new folder")
    store = ModelStore.open(model)
    mean_arr, prec_arr = store.final_arrays()  # a clear error if not finalized
    attrs = dict(store.attrs)
    calibration = _calibration(attrs)
    extractor = Extractor.from_config(store.config, device="cpu", weights=weights, projection=store.projection())
    p, d = int(prec_arr.shape[0]), int(prec_arr.shape[1])
    crop = extractor.preprocess.crop
    stat_dtype = np.float16 if float16 else np.float32
    stat_bytes = p * d * 4 + p * d * d * np.dtype(stat_dtype).itemsize
    if external_data is None:
        external_data = stat_bytes > INLINE_LIMIT
    out.mkdir(parents=True, exist_ok=True)
    try:
        graph = ScorerGraph(extractor, sigma, calibration)
        names = ["scores", "maps"] + (["p_values", "anomalous"] if calibration else [])
        _trace(graph, out / GRAPH, crop, p, d, stat_dtype, names, opset, exporter == "dynamo")
        digest = _attach_statistics(out / GRAPH, mean_arr, prec_arr, stat_dtype, external_data)
        files = [GRAPH] + ([STATISTICS] if external_data else [])
        if format == "openvino":
            files = _to_openvino(out) + files
        shutil.copyfile(runtime.__file__, out / runtime.RUNTIME_FILE)
        meta = {
            "format": runtime.FORMAT, "format_version": runtime.FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_by": f"padim_ooc {__version__}, torch {torch.__version__}",
            "backend": format, "graph": OPENVINO_XML if format == "openvino" else GRAPH,
            "inputs": {"images": ["N", 3, crop, crop]}, "outputs": names, "opset": opset,
            "precision_dtype": np.dtype(stat_dtype).name, "external_data": bool(external_data),
            "preprocess": {
                "decode": "first frame, 8-bit RGB (padim_ooc.data.to_rgb)",
                "resize": extractor.preprocess.resize, "crop": crop,
                "interpolation": "bilinear, antialias=True, on uint8 (torchvision.transforms.v2.functional."
                                 "resize: int16 fixed-point weights, width pass then height pass, each rounded to uint8)",
                "crop_anchor": "int(round((resize - crop) / 2))",
                "scale": "float32(x) * float32(1 / 255)",
                "mean": list(extractor.preprocess.mean), "std": list(extractor.preprocess.std),
                "layout": "NCHW float32, RGB"},
            "grid": list(extractor.grid), "positions": p, "dims": d, "sigma": float(sigma),
            "map_size": [crop, crop], "calibration": calibration,
            "model": {"path": os.fspath(model), "config": store.config.to_attrs(),
                      "n_images": int(attrs["n_images"]), "eps": attrs.get("eps"),
                      "final": attrs.get("final"), "statistics_digest": digest},
            "files": {name: _file_record(out / name) for name in files},
        }
        runtime.write_metadata(out, meta)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return meta


def _calibration(attrs: dict) -> dict | None:
    cal = attrs.get("calibration")
    if cal is None:
        return None
    from ..calibration import Calibration

    record = Calibration.from_attrs(cal).to_attrs()
    if record.get("stale"):
        import logging

        logging.getLogger("padim_ooc").warning(
            "the model's calibration is stale (the statistics changed after it); it is exported as it is")
    return record


def _trace(graph: ScorerGraph, path: Path, crop: int, p: int, d: int, stat_dtype, names, opset,
           dynamo: bool) -> None:
    """torch's ONNX exporter on the scorer; the TorchScript-based one (``dynamo=False``) by default:
    the graph is fixed (no data-dependent control flow), traced in about a second
    (docs/design.md, "Export")."""
    images = torch.zeros(2, 3, crop, crop)
    mean = torch.zeros(p, d)
    prec = torch.zeros(1, d, d, dtype=torch.float16 if stat_dtype == np.float16 else torch.float32).expand(p, d, d)
    axes = {"images": {0: "N"}, "scores": {0: "N"}, "maps": {0: "N"}}
    axes |= {n: {0: "N"} for n in names[2:]}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes
        if dynamo:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                program = torch.onnx.export(
                    graph, (images, mean, prec.contiguous()), dynamo=True, opset_version=max(opset, 18),
                    input_names=["images", "mean", "precision"], output_names=names,
                    dynamic_shapes=({0: torch.export.Dim("N")}, None, None))
                program.save(str(path))
        else:
            torch.onnx.export(graph, (images, mean, prec), str(path), dynamo=False, opset_version=opset,
                              input_names=["images", "mean", "precision"], output_names=names,
                              dynamic_axes=axes, do_constant_folding=True)


def _attach_statistics(path: Path, mean_arr, prec_arr, stat_dtype, external: bool) -> str:
    """Turn the graph inputs ``mean`` and ``precision`` into initializers holding the store's
    arrays (inline, or in ``statistics.bin`` beside the graph, written chunk by chunk).

    Returns the statistics digest: BLAKE2b-128 of the float32 mean and precision bytes as stored.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    kept = [i for i in g.input if i.name not in ("mean", "precision")]
    del g.input[:]
    g.input.extend(kept)
    h = hashlib.blake2b(digest_size=16)
    p = prec_arr.shape[0]
    step = max(1, int(prec_arr.chunks[0]))
    if external:
        offset = 0
        with open(path.parent / STATISTICS, "wb") as f:
            tensors = []
            for name, arr, dtype in (("mean", mean_arr, np.float32), ("precision", prec_arr, stat_dtype)):
                start_offset = offset
                for start in range(0, p, step):
                    block = read_array(arr, slice(start, min(p, start + step)))
                    h.update(np.ascontiguousarray(block, np.float32).tobytes())
                    data = np.ascontiguousarray(block.astype(dtype)).astype(np.dtype(dtype).newbyteorder("<"))
                    f.write(data.tobytes())
                    offset += data.nbytes
                t = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                dims=list(arr.shape))
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", STATISTICS), ("offset", str(start_offset)),
                                   ("length", str(offset - start_offset))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                tensors.append(t)
                pad = (-offset) % 4096  # aligned starts (mmap-friendly)
                f.write(b"\0" * pad)
                offset += pad
        g.initializer.extend(tensors)
    else:
        mean = read_array(mean_arr)
        prec = read_array(prec_arr)
        h.update(np.ascontiguousarray(mean, np.float32).tobytes())
        h.update(np.ascontiguousarray(prec, np.float32).tobytes())
        g.initializer.extend([numpy_helper.from_array(mean.astype(np.float32), "mean"),
                              numpy_helper.from_array(prec.astype(stat_dtype), "precision")])
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return h.hexdigest()


def _to_openvino(out: Path) -> list[str]:
    """Convert the ONNX graph with OpenVINO's own converter; weights kept in float32
    (``save_model`` would compress them to float16 by default)."""
    try:
        import openvino as ov
    except ImportError:
        raise PadimError("--format openvino needs the openvino package: pip install 'padim_ooc[export]'") from None
    ov_model = ov.convert_model(str(out / GRAPH))
    ov.save_model(ov_model, str(out / OPENVINO_XML), compress_to_fp16=False)
    return [OPENVINO_XML, "model.bin"]


def _file_record(path: Path) -> dict:
    """Size, and the SHA-256 of files up to 512 MiB (checked on every load; the larger ones by size)."""
    size = path.stat().st_size
    record = {"bytes": size}
    if size <= runtime.HASHED_BYTES:
        record["sha256"] = runtime.sha256_file(path)
    return record


__all__ = ["export_model", "ScorerGraph", "FORMATS"]
