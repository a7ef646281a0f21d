"""How a run goes (not what it fits): the options of a fit and of a score, checked once.

Each record is built where options enter (the command line or the API) and checked
there, in ``__post_init__``; the pipelines take it whole and trust it. What decides
the features is not here: that is :class:`padim_ooc.config.ModelConfig`.
"""
from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from .errors import PadimError
from .welford import DEFAULT_FOLD, FOLDS, check_fold

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
"""Largest image (or mask) file read, in bytes [256 MiB]: a file is checked against it before
it is read, so a huge file or a device cannot exhaust the memory. Raise it with
``--max-image-bytes`` (:attr:`RunOptions.max_image_bytes`)."""
DEFAULT_EPS = 0.01
DEFAULT_SHRINKAGE = "none"
SHRINKAGES = ("none", "oas")
DEFAULT_SIGMA = 4.0
ON_ERROR = ("skip", "fail")
DEFAULT_FPR = 0.01
OVERLAYS = ("all", "anomalous")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_eps(eps: float) -> float:
    """``eps`` if it is a finite number >= 0, else a one-line :class:`PadimError`."""
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise PadimError(f"eps must be a finite number >= 0 (e.g. 0.01), got {eps!r}")
    return eps


def check_fpr(alpha, option: str = "--fpr") -> float:
    """``alpha`` if it is a number strictly between 0 and 1, else a one-line :class:`PadimError`
    (the false-alarm rate asked of a conformal calibration, see :mod:`padim_ooc.calibration`)."""
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
            and 0 < alpha < 1):
        raise PadimError(f"{option} must be a false-alarm rate between 0 and 1 (exclusive), e.g. 0.01; "
                         f"got {alpha!r}")
    return float(alpha)


def eps_for(stored: dict, eps: float | None) -> float:
    """The eps to finalize with: ``eps`` if given, else the model's current eps
    (``stored["eps"]``), else :data:`DEFAULT_EPS` (0.01) for a model never finalized.
    What ``fit``, ``merge`` and ``finalize`` all use."""
    if eps is not None:
        return eps
    return DEFAULT_EPS if stored.get("eps") is None else stored["eps"]


def check_shrinkage(shrinkage: str) -> str:
    """``shrinkage`` if it is one of :data:`SHRINKAGES`, else a one-line :class:`PadimError`."""
    if shrinkage not in SHRINKAGES:
        raise PadimError(f"--shrinkage must be none or oas, not {shrinkage!r}")
    return shrinkage


def shrinkage_for(stored: dict, shrinkage: str | None) -> str:
    """The shrinkage to finalize with: ``shrinkage`` if given, else the model's current one
    (``stored["shrinkage"]``; a model finalized before shrinkage existed: ``none``)."""
    if shrinkage is not None:
        return shrinkage
    return stored.get("shrinkage") or DEFAULT_SHRINKAGE


DEFAULT_DASHBOARD = "127.0.0.1:0"
"""Where a local cluster's dashboard listens: this machine only, a free port."""
TLS_FILES = ("tls_ca_file", "tls_cert", "tls_key")


@dataclass(frozen=True)
class Cluster:
    """Where the parallel part of a run goes: this process (the default), a local Dask
    cluster of ``workers`` processes, an existing scheduler, or a ``distributed.Client``;
    ``shards``: how many shards a sharded fit makes (default: one per worker).

    A ``tls://`` scheduler is reached with ``distributed.Security``: the PEM files
    ``tls_ca_file`` (the certificate authority that signed the cluster's
    certificates), ``tls_cert`` and ``tls_key`` (this client's certificate and key),
    all three or none; none: Dask's own configuration (``distributed.comm.tls.*``).
    ``dashboard``: the address of a local cluster's dashboard (default
    ``127.0.0.1:0``, this machine only; ``:0`` for every interface).
    """

    workers: int | None = None
    scheduler: str | None = None
    client: Any = field(default=None, compare=False)
    shards: int | None = None
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    dashboard: str = DEFAULT_DASHBOARD

    def __post_init__(self):
        given = [name for name in TLS_FILES if getattr(self, name) is not None]
        if given:
            if len(given) != 3:
                missing = ", ".join("--" + n.replace("_", "-") for n in TLS_FILES if n not in given)
                raise PadimError(f"TLS needs all three of --tls-ca-file, --tls-cert and --tls-key; missing {missing}")
            if not (self.scheduler or "").startswith("tls://"):
                raise PadimError("TLS certificates are for a scheduler reached at tls://HOST:PORT; give "
                                 f"--scheduler tls://..., not {self.scheduler or 'no scheduler'}")
            import os

            for name in given:
                path = getattr(self, name)
                if not os.path.isfile(path):
                    raise PadimError(f"--{name.replace('_', '-')}: no such file {path}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise PadimError(f"--workers must be at least 1, got {self.workers}")
        if self.workers is not None and self.workers > 1 and self.scheduler:
            raise PadimError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
        if self.shards is not None and self.shards < 1:
            raise PadimError(f"shards must be at least 1, got {self.shards}")
        if self.scheduler and "://" not in self.scheduler:
            raise PadimError(f"--scheduler expects an address like tcp://HOST:8786, got {self.scheduler!r}")

    @property
    def wanted(self) -> bool:
        """Whether a Dask cluster is asked for (``workers=1`` alone runs in this process)."""
        return bool(self.scheduler) or (self.workers or 0) > 1 or self.client is not None

    def open(self, *paths: str):
        """A context manager giving the ``distributed.Client`` of the run, or None.

        ``paths`` (stores and outputs the workers will use) are checked first: a
        ``memory://`` path, which workers cannot reach, is refused before a cluster starts.
        """
        if not self.wanted:
            return nullcontext(None)
        from .store import check_shareable, shared_path

        check_shareable(*(shared_path(p) for p in paths))
        if self.client is not None:
            return nullcontext(self.client)
        from .parallel.client import open_client

        return open_client(self.workers, self.scheduler, dashboard=self.dashboard, security=self.security())

    def security(self):
        """The ``distributed.Security`` of a ``tls://`` scheduler (None for other addresses):
        from the certificate files if given, else from Dask's configuration; a one-line
        error if neither names a certificate authority and a client certificate."""
        if not (self.scheduler or "").startswith("tls://"):
            return None
        from distributed.security import Security

        if self.tls_ca_file is not None:
            return Security(tls_ca_file=self.tls_ca_file, tls_client_cert=self.tls_cert,
                            tls_client_key=self.tls_key, require_encryption=True)
        sec = Security()  # distributed.comm.tls.ca-file, .client.cert, .client.key
        if not (sec.tls_ca_file and sec.tls_client_cert):
            raise PadimError(f"{self.scheduler} is a TLS address but no certificates are given: pass "
                             "--tls-ca-file, --tls-cert and --tls-key, or set distributed.comm.tls.ca-file and "
                             "distributed.comm.tls.client.cert/.key in Dask's configuration")
        return sec


@dataclass(frozen=True)
class RunOptions:
    """Options of every run that reads images.

    Parameters
    ----------
    batch_size : int
        Images per forward pass (>= 1).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether the GPU exists is checked
        where the backbone is built: a cluster's workers may have one).
    loader_workers : int, optional
        Decoding processes (None: :func:`padim_ooc.data.default_workers`).
    on_error : {'skip', 'fail'}
        An unreadable image is skipped (warned and counted) or stops the run.
    progress : bool
        Progress bars and plan lines on stderr.
    cluster : Cluster
        Where the parallel part runs.
    max_image_bytes : int
        Largest image file read, in bytes (checked before reading; default
        :data:`padim_ooc.data.DEFAULT_MAX_IMAGE_BYTES`, 256 MiB); a larger one is a
        counted skip with its reason (or the error with ``on_error='fail'``).
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    loader_workers: int | None = None
    on_error: str = "skip"
    progress: bool = False
    cluster: Cluster = field(default_factory=Cluster)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PadimError(f"batch size must be at least 1, got {self.batch_size}")
        if not _DEVICE.fullmatch(str(self.device).strip()):
            raise PadimError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N (N a GPU index)")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise PadimError(f"loader workers must be 0 or more, got {self.loader_workers}")
        if self.on_error not in ON_ERROR:
            raise PadimError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if isinstance(self.max_image_bytes, bool) or not isinstance(self.max_image_bytes, int) \
                or self.max_image_bytes < 1:
            raise PadimError(f"--max-image-bytes must be a positive number of bytes, got {self.max_image_bytes!r}")


@dataclass(frozen=True)
class FitOptions(RunOptions):
    """Options of a fit (:class:`RunOptions`, and):

    Parameters
    ----------
    checkpoint_every : int, optional
        Images between checkpoints (None: every 1000 images, spaced so that
        writing them takes at most 2 % of the time).
    max_memory : int, optional
        Memory budget in bytes of each fitting process (None: the available
        memory with a margin); positions are fitted in blocks if needed.
    finalize : bool
        Compute the precision matrices at the end.
    eps : float, optional
        Added to the covariance diagonal at finalize (None: the model's eps,
        0.01 for a model never finalized).
    shrinkage : {'none', 'oas'}, optional
        How finalize estimates the covariances (None: the model's, ``none`` for a
        model never finalized); see :mod:`padim_ooc.finalize`.
    holdout : float
        Share of the images, in [0, 1), held out of the statistics for calibration, chosen by
        content hash (:func:`padim_ooc.calibration.holdout_selected`); 0: none.
    fpr : float, optional
        The false-alarm rate of the calibration made after the fit on the held-out images
        (None: the model's alpha, else :data:`DEFAULT_FPR`).
    fold : {'float64', 'float32'}
        How each batch's scatter is formed before its Chan merge into the float64
        statistics (:mod:`padim_ooc.welford`): ``float64`` (default, ~1e-10 relative to
        two-pass float64), or ``float32`` (float32 products, less of the fold's time
        on a CPU, see docs/benchmarks.md; ~1e-7 relative, below the float32 noise of
        the features).
    """

    checkpoint_every: int | None = None
    max_memory: int | None = None
    finalize: bool = True
    eps: float | None = None
    shrinkage: str | None = None
    holdout: float = 0.0
    fpr: float | None = None
    fold: str = DEFAULT_FOLD

    def __post_init__(self):
        super().__post_init__()
        check_fold(self.fold)
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise PadimError(f"checkpoint interval must be at least 1 image, got {self.checkpoint_every}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise PadimError(f"the memory budget must be positive, got {self.max_memory}")
        if self.eps is not None:
            check_eps(self.eps)
        if self.shrinkage is not None:
            check_shrinkage(self.shrinkage)
        if not (isinstance(self.holdout, (int, float)) and not isinstance(self.holdout, bool)
                and math.isfinite(self.holdout) and 0 <= self.holdout < 1):
            raise PadimError(f"--holdout must be a share of the images in [0, 1), e.g. 0.2; got {self.holdout!r}")
        if self.fpr is not None:
            check_fpr(self.fpr)


@dataclass(frozen=True)
class ScoreOptions(RunOptions):
    """Options of a score (:class:`RunOptions`, and):

    Parameters
    ----------
    sigma : float
        Gaussian blur of the maps in pixels (4 as in the paper; 0: none).
    maps : bool
        Whether the maps are wanted (written, or returned).
    masks : bool
        Binary PNG masks of the anomalous images (a calibrated model).
    overlays : {None, 'all', 'anomalous'}
        PNG overlays (heatmap over the image, mask contour) of every image or of the anomalous ones.
    """

    sigma: float = DEFAULT_SIGMA
    maps: bool = False
    masks: bool = False
    overlays: str | None = None

    @property
    def wants_maps(self) -> bool:
        """Whether the scoring must hand maps on: asked, or needed for masks or overlays."""
        return bool(self.maps or self.masks or self.overlays)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise PadimError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        if self.overlays not in (None, *OVERLAYS):
            raise PadimError(f"--overlays must be all or anomalous, not {self.overlays!r}")


__all__ = ["Cluster", "RunOptions", "FitOptions", "ScoreOptions", "check_eps", "check_fpr", "eps_for", "check_shrinkage",
           "shrinkage_for", "DEFAULT_BATCH_SIZE", "DEFAULT_DASHBOARD", "DEFAULT_EPS", "DEFAULT_FPR",
           "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_SHRINKAGE", "DEFAULT_SIGMA", "OVERLAYS", "SHRINKAGES", "FOLDS",
           "DEFAULT_FOLD"]
