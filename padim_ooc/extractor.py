"""The embedding: backbone maps of a few layers, upsampled (nearest) to the first layer's
grid and concatenated (F channels), of which d are kept: a seeded random channel subset
(PaDiM), or d seeded orthonormal directions that the F channels are projected on (the
semi-orthogonal embedding of Kim et al. 2021; the subset is its special case of identity
columns)."""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import backbones
from .config import ModelConfig, weights_source
from .data import Preprocess
from .errors import PadimError


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N a GPU index)"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N``.

    On a numbered Dask worker, ``auto`` and ``cuda`` (no index) are the worker's
    own GPU, round-robin over the visible ones
    (:func:`padim_ooc.parallel.devices.worker_gpu`); ``cuda:N`` is kept.

    Raises
    ------
    PadimError
        For any other value, or a CUDA device that this machine does not have.
    """
    text = str(device).strip()
    if text in ("auto", "cuda") and torch.cuda.is_available():
        from .parallel.devices import worker_gpu

        mine = worker_gpu(torch.cuda.device_count())
        if mine is not None:
            return torch.device("cuda", mine[0])
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise PadimError(f"unknown device {text!r}: use {DEVICE_CHOICES}")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PadimError(f"--device {text} was asked for but no CUDA GPU is available (use cpu or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise PadimError(f"--device {text}: there is no such GPU (this machine has cuda:0 to cuda:{count - 1})")
    return dev


@contextmanager
def float32_precision() -> Iterator[None]:
    """Full float32 arithmetic inside: no TF32 for cuDNN convolutions or cuBLAS matrix
    products, no reduced precision for oneDNN's; the settings are restored on exit.

    These are process-wide flags, so nested and concurrent uses (threads) share
    one count: the settings the first entrant found are put back when the last
    one leaves. torch >= 2.9: the per-operation ``fp32_precision`` settings
    (cuDNN conv, cuBLAS and oneDNN matmul, oneDNN conv) and the float32 matmul
    precision; older torch: ``cudnn.allow_tf32`` and the matmul precision.
    (``torch.backends.cudnn.flags`` is not used: it reads the cuDNN-wide TF32
    flag, which torch refuses to read after a conv-only ``fp32_precision``.)
    """
    global _float32_users, _float32_saved
    with _float32_lock:
        if _float32_users == 0:
            _float32_saved = _precision_settings()
            _set_precision_settings({k: v for k, v in _FULL_FLOAT32.items() if k in _float32_saved})
        _float32_users += 1
    try:
        yield
    finally:
        with _float32_lock:
            _float32_users -= 1
            if _float32_users == 0:
                _set_precision_settings(_float32_saved)


_float32_lock = threading.Lock()
_float32_users = 0
_float32_saved: dict[str, Any] = {}
_NEW_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.mkldnn, "conv")
# (what, setting) pairs; "matmul" (the legacy float32 matmul precision) is applied first
# because it also writes the per-backend matmul settings that follow it
_FULL_FLOAT32 = ({"matmul": "highest", "cudnn.conv": "ieee", "cuda.matmul": "ieee",
                  "mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"}
                 if _NEW_API else {"matmul": "highest", "cudnn.allow_tf32": False})


def _precision_settings() -> dict[str, Any]:
    """The current values of the settings :func:`float32_precision` changes.

    The legacy matmul precision is left out where torch refuses to read it
    (after per-backend settings that it cannot express, e.g. only
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``): the
    per-backend settings alone are then changed and restored, which keeps
    torch's check that the two agree satisfied inside.
    """
    b = torch.backends
    try:
        out = {"matmul": torch.get_float32_matmul_precision()}
    except RuntimeError:
        out = {}
    if not _NEW_API:  # torch < 2.9
        return out | {"cudnn.allow_tf32": b.cudnn.allow_tf32}
    return out | {"cudnn.conv": b.cudnn.conv.fp32_precision, "cuda.matmul": b.cuda.matmul.fp32_precision,
                  "mkldnn.conv": b.mkldnn.conv.fp32_precision,
                  "mkldnn.matmul": b.mkldnn.matmul.fp32_precision}


def _set_precision_settings(values: dict[str, Any]) -> None:
    b = torch.backends
    for key, value in values.items():
        if key == "matmul":
            torch.set_float32_matmul_precision(value)
        elif key == "cudnn.allow_tf32":
            b.cudnn.allow_tf32 = value
        else:
            backend, op = key.split(".")
            getattr(getattr(b, backend), op).fp32_precision = value


def draw_channels(total: int, dims: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``dims`` of ``total`` channel indices, sorted."""
    if dims is None or dims == total:
        return list(range(total))
    if not 1 <= dims <= total:
        raise PadimError(f"dims {dims} is out of range (1 to {total} for this backbone and layers)")
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=gen)[:dims].tolist())


def draw_projection(total: int, dims: int | None, seed: int) -> np.ndarray:
    """A seeded semi-orthogonal projection: ndarray of shape (total, dims), float64, W.T @ W = I.

    The Q factor of the QR decomposition of a (total, dims) standard Gaussian matrix drawn
    with ``numpy.random.default_rng(seed)``, each column multiplied by the sign of R's
    diagonal entry, so that the draw is unique (uniform on the Stiefel manifold) and the
    same seed gives the same matrix. ``dims`` None: all channels (a rotation).
    """
    dims = total if dims is None else dims
    if not 1 <= dims <= total:
        raise PadimError(f"dims {dims} is out of range (1 to {total} for this backbone and layers)")
    gauss = np.random.default_rng(seed).standard_normal((total, dims))
    q, r = np.linalg.qr(gauss)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return np.ascontiguousarray(q * signs, dtype=np.float64)


def projection_digest(projection: np.ndarray) -> str:
    """``sha256:<hex>`` of a (F, d) projection (its shape and little-endian float64 bytes):
    what the configuration records, so that models with other projections are refused."""
    w = np.ascontiguousarray(projection, dtype="<f8")
    h = hashlib.sha256(f"{w.shape[0]}x{w.shape[1]}:".encode())
    h.update(w.tobytes())
    return "sha256:" + h.hexdigest()


class Extractor:
    """PaDiM patch embeddings of preprocessed images.

    Built from a :class:`~padim_ooc.config.ModelConfig` (``Extractor(config=...)``,
    or :meth:`from_config` for a fitted model's record), or from its fields
    given as keywords; what is not given takes the record's defaults
    (:meth:`ModelConfig.with_defaults <padim_ooc.config.ModelConfig.with_defaults>`).

    Parameters
    ----------
    backbone : str, optional
        A torchvision classification model name (``resnet18``,
        ``wide_resnet50_2``, ...) or ``efficientnet_lite0`` / ``_lite1`` /
        ``_lite2`` [resnet18].
    layers : list of str, optional
        Node names whose maps are concatenated [the first three stages].
    embedding : str, optional
        ``random`` (a seeded random subset of ``dims`` channels) or
        ``orthogonal`` (the F concatenated channels projected on ``dims``
        seeded orthonormal directions, :func:`draw_projection`) [random].
    dims : int, optional
        Dimension d of an embedding [100 for resnet18, 550 for
        wide_resnet50_2, all channels otherwise].
    seed : int, optional
        Seed of the channel or projection draw and of random weights [0].
    weights : str or None
        ``"default"`` (pretrained, torchvision's weights API), ``torchvision:NAME``,
        a state-dict file path, or ``None``/``"none"`` (random init, seeded).
    resize, crop : int, optional
        Square resize, then centre crop (pixels) [256; 224 or the resize if smaller].
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    channels : list of int, optional
        The channel indices to keep (instead of the seeded draw of ``dims``;
        a fitted model's record has them).
    mean, std : tuple of 3 floats, optional
        Input normalisation [what the backbone's weights expect].
    projection : ndarray of shape (F, dims), optional
        The projection of an orthogonal embedding (instead of the seeded draw; a
        fitted model's store has it, ``embedding/projection``). Its digest must be
        the configuration's ``projection_digest`` where that is given.
    config : ModelConfig, optional
        The whole configuration at once (the keywords above then must not be given).

    Notes
    -----
    The backbone runs in float32 on every device (on CUDA with TF32 off, see
    :func:`float32_precision`), so :meth:`embed` gives the features the
    statistics were computed from. CPU and GPU features agree to float32
    rounding, not bit for bit.
    """

    def __init__(self, backbone: str | None = None, *, layers: list[str] | None = None,
                 dims: int | None = None, seed: int | None = None, weights: str | None = "default",
                 resize: int | None = None, crop: int | None = None, device: str = "auto",
                 channels: list[int] | None = None, mean: tuple | None = None, std: tuple | None = None,
                 embedding: str | None = None, projection: np.ndarray | None = None,
                 config: ModelConfig | None = None):
        if config is None:
            config = ModelConfig(backbone=backbone, layers=layers, embedding=embedding, dims=dims, seed=seed,
                                 weights="none" if weights is None else weights, resize=resize, crop=crop,
                                 normalize_mean=mean, normalize_std=std, channels=channels)
        cfg = config.with_defaults()
        crop, resize = cfg.crop, cfg.resize
        if crop > resize:
            raise PadimError(f"crop {crop} is larger than resize {resize}")
        if crop < 32:
            raise PadimError(f"crop {crop} is too small (at least 32 pixels)")
        self.backbone = cfg.backbone
        self.layers = list(cfg.layers)
        self.seed = int(cfg.seed)
        self.device = resolve_device(device)
        self.preprocess = Preprocess(resize, crop, tuple(cfg.normalize_mean), tuple(cfg.normalize_std))
        module, self.weights_id = backbones.build(self.backbone, self.layers, cfg.weights, self.seed)
        self.weights_digest = backbones.state_digest(module)
        self._module = module.to(self.device)
        if self.device.type == "cpu":
            self._module = self._module.to(memory_format=torch.channels_last)
        with torch.inference_mode(), float32_precision():
            probe = self._module(torch.zeros(1, 3, crop, crop, device=self.device))
        self.layer_channels = [int(probe[layer].shape[1]) for layer in self.layers]
        self.grid = tuple(int(s) for s in probe[self.layers[0]].shape[-2:])
        self._nearest = [self._nearest_index(tuple(probe[layer].shape[-2:])) for layer in self.layers]
        total = sum(self.layer_channels)
        self.embedding = cfg.embedding
        dims = cfg.dims
        if dims is None and self.backbone in backbones.DEFAULT_DIMS:
            dims = min(backbones.DEFAULT_DIMS[self.backbone], total)
        self.projection = None  # (F, d) float64 of an orthogonal embedding
        if self.embedding == "orthogonal":
            if cfg.channels is not None:
                raise PadimError("channel indices were given for an orthogonal embedding (it keeps no subset; "
                                 "use embedding='random' to choose channels)")
            self.channels = None
            self.projection = self._projection(projection, total, dims, cfg.projection_digest)
            self._per_layer = self._split_channels(list(range(total)))
            w = torch.from_numpy(self.projection).to(self.device, torch.float32)
            self._weights_per_layer = list(torch.split(w, self.layer_channels))  # (C_l, d) each
            return
        if projection is not None:
            raise PadimError("a projection was given for a random embedding (use embedding='orthogonal')")
        channels = cfg.channels
        if channels is None:
            channels = draw_channels(total, dims, self.seed)
        elif any(not 0 <= c < total for c in channels):
            raise PadimError(f"stored channel indices are out of range (0 to {total - 1})")
        self.channels = list(channels)
        self._per_layer = self._split_channels(self.channels)
        self._weights_per_layer = None

    def _projection(self, given: np.ndarray | None, total: int, dims: int | None,
                    digest: str | None) -> np.ndarray:
        """The (F, d) float64 projection: ``given`` (checked) or the seeded draw; its digest
        must be ``digest`` where one is recorded."""
        if given is None:
            w = draw_projection(total, dims, self.seed)
        else:
            w = np.asarray(given, dtype=np.float64)
            if w.ndim != 2 or w.shape[0] != total or (dims is not None and w.shape[1] != dims):
                raise PadimError(f"the projection has shape {w.shape}, expected ({total}, "
                                 f"{dims if dims is not None else 'd'}) for this backbone and layers")
            w = np.ascontiguousarray(w)
        if digest is not None and projection_digest(w) != digest:
            raise PadimError(f"the projection differs from the one the model was fitted with (digest "
                             f"{projection_digest(w)} != stored {digest}); rebuild the extractor from the "
                             "model's store (its embedding/projection array)")
        return w

    def _split_channels(self, channels: list[int]) -> list[torch.Tensor]:
        out, offset = [], 0
        for count in self.layer_channels:
            idx = [c - offset for c in channels if offset <= c < offset + count]
            out.append(torch.tensor(idx, dtype=torch.long, device=self.device))
            offset += count
        return out

    def _nearest_index(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Source row and column of every grid cell under nearest upsampling from ``size``.

        Taken from ``F.interpolate`` itself (applied to index ramps), so the
        mapping is torch's own to the last rounding.
        """
        def ramp(n_in: int, n_out: int) -> torch.Tensor:
            src = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
            return F.interpolate(src, size=n_out, mode="nearest").view(-1).long().to(self.device)

        return ramp(size[0], self.grid[0]), ramp(size[1], self.grid[1])

    @property
    def dims(self) -> int:
        """Dimension d of a patch embedding."""
        return self.projection.shape[1] if self.projection is not None else len(self.channels)

    @property
    def positions(self) -> int:
        """P = h * w patch positions."""
        return self.grid[0] * self.grid[1]

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Patch embeddings of a preprocessed batch.

        Parameters
        ----------
        batch : Tensor of shape (B, 3, crop, crop)
            Images from :meth:`preprocess`.

        Returns
        -------
        Tensor of shape (B, d, h, w), float32, on the extractor's device
        (a view of :meth:`embed_patches`' result).
        """
        patches = self.embed_patches(batch)
        return patches.permute(1, 2, 0).reshape(batch.shape[0], self.dims, *self.grid)

    def embed_patches(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings in the layout the statistics use.

        ``out``: an optional float32 (P, B, d) tensor on the device to write
        them into (e.g. a view of the fit's fold buffer; rows may be strided).

        Returns
        -------
        Tensor of shape (P, B, d), float32 (``out`` if given, else a new
        contiguous tensor): position-major, the
        same values as :meth:`embed`. The selected channels of each layer are
        written straight into place, upsampling (nearest) included, without
        the intermediate (B, d, h, w) copies. An orthogonal embedding projects
        each layer at its own resolution (its rows of W, (C_l, d)) and sums the
        upsampled parts: nearest upsampling commutes with a per-position linear
        map, so this is W.T applied to the (F, h, w) concatenation, at a
        fraction of the products.
        """
        expected = self.preprocess.crop
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[-2:]) != (expected, expected):
            raise PadimError(f"expected a batch of shape (B, 3, {expected}, {expected}), got {tuple(batch.shape)}")
        b, (h, w) = batch.shape[0], self.grid
        with torch.inference_mode():
            x = batch.to(self.device, torch.float32, non_blocking=True)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with float32_precision():
                maps = self._module(x)
            if out is None:
                out = torch.empty(h * w, b, self.dims, device=self.device)
            elif tuple(out.shape) != (h * w, b, self.dims) or out.dtype != torch.float32:
                raise ValueError(f"out must be float32 of shape {(h * w, b, self.dims)}, got {tuple(out.shape)}")
            patches, out = out, out.view(h, w, b, self.dims)
            if self._weights_per_layer is not None:
                self._project_into(maps, out)
                return patches
            offset = 0
            for layer, idx, (rows, cols) in zip(self.layers, self._per_layer, self._nearest):
                c = idx.numel()
                if c == 0:
                    continue
                part = maps[layer].permute(2, 3, 0, 1).index_select(3, idx)  # (h', w', B, c)
                hh, ww = part.shape[:2]
                if (hh, ww) == (h, w):
                    out[..., offset:offset + c] = part
                elif h % hh == 0 and w % ww == 0:  # integer factor: nearest = repeat, by broadcasting
                    view = out.view(hh, h // hh, ww, w // ww, b, self.dims)
                    view[..., offset:offset + c] = part[:, None, :, None]
                else:
                    out[..., offset:offset + c] = part[rows][:, cols]
                offset += c
            return patches

    def _project_into(self, maps: dict, out: torch.Tensor) -> None:
        """``out`` (h, w, B, d) = sum over layers of the upsampled (h', w', B, C_l) @ W_l."""
        h, w, b, _ = out.shape
        for k, (layer, wl, (rows, cols)) in enumerate(zip(self.layers, self._weights_per_layer, self._nearest)):
            with float32_precision():
                part = torch.matmul(maps[layer].permute(2, 3, 0, 1), wl)  # (h', w', B, d)
            hh, ww = part.shape[:2]
            if (hh, ww) == (h, w):
                target, part = out, part
            elif h % hh == 0 and w % ww == 0:  # integer factor: nearest = repeat, by broadcasting
                target, part = out.view(hh, h // hh, ww, w // ww, b, self.dims), part[:, None, :, None]
            else:
                target, part = out, part[rows][:, cols]
            if k == 0:
                target.copy_(part)  # broadcasts, as the assignment of the random embedding
            else:
                target += part

    def config(self) -> ModelConfig:
        """The record of this extractor: what the store keeps, and all it takes to rebuild it."""
        return ModelConfig(backbone=self.backbone, layers=tuple(self.layers), embedding=self.embedding,
                           dims=self.dims, seed=self.seed,
                           weights=self.weights_id, resize=self.preprocess.resize, crop=self.preprocess.crop,
                           normalize_mean=tuple(self.preprocess.mean), normalize_std=tuple(self.preprocess.std),
                           layer_channels=tuple(self.layer_channels),
                           channels=None if self.channels is None else tuple(self.channels),
                           grid=tuple(self.grid), weights_digest=self.weights_digest,
                           projection_digest=None if self.projection is None else projection_digest(self.projection))

    @classmethod
    def from_config(cls, cfg: ModelConfig | dict[str, Any], *, device: str = "auto",
                    weights: str | None = None, projection: np.ndarray | None = None) -> "Extractor":
        """Rebuild the extractor a model was fitted with (its record ``cfg``) and check its weights.

        ``weights``: where to load them from, e.g. the local path of the file whose
        hash is stored; by default what the record's identity names
        (:func:`padim_ooc.config.weights_source`). The rebuilt backbone's digest
        must be the stored one. ``projection``: the (F, d) array of an orthogonal
        model (:meth:`padim_ooc.store.ModelStore.projection`); without it the seeded
        draw, whose digest must then be the stored one.
        """
        cfg = ModelConfig.of(cfg)
        ex = cls(config=dataclasses.replace(cfg, weights=weights_source(cfg, weights)), device=device,
                 projection=projection)
        if ex.weights_digest != cfg.weights_digest:
            raise PadimError(f"the backbone weights differ from those the model was fitted with "
                             f"(digest {ex.weights_digest} != stored {cfg.weights_digest}; "
                             f"stored weights: {cfg.weights})")
        return ex
