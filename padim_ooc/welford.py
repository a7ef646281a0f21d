"""Per-position Gaussian statistics as mergeable states (pure maths, no I/O).

A state is ``(n, mean, m2)`` for every patch position: ``mean`` of shape
(P, d) and ``m2`` of shape (P, d, d), the sum of outer products of deviations
from the mean (Welford's M2). Two states merge exactly with Chan et al.'s
formula::

    n = na + nb;  delta = mean_b - mean_a
    mean = mean_a + delta * nb / n
    m2 = m2_a + m2_b + delta delta^T * na * nb / n

A batch is folded in by computing its own moments centred on the batch mean
(so no cancellation, whatever the offset of the data) and merging.

Two fold modes (:data:`FOLDS`): ``float64`` (the default) forms the batch's
scatter in float64, exact to about 1e-10 relative; ``float32`` forms it with a
float32 matrix product of the centred samples (half the arithmetic and memory
traffic of float64 on a CPU) and keeps the batch mean, the centring, the Chan
correction and the accumulators in float64: about 1e-7 relative against
two-pass float64 statistics of the same features (see docs/design.md).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import PadimError

# how a batch's scatter is formed (see update_); float64 is the default
FOLDS = ("float64", "float32")
DEFAULT_FOLD = "float64"
# the float32 fold sums at most this many samples in one float32 product before the result
# goes into float64: its rounding error grows about linearly with the samples summed
# (measured at d = 140, offset 1000: 7e-8 relative for 32, 1.5e-7 for 64, 3e-7 for 128,
# 3.7e-7 for 300); 96 keeps a fit's folds (77 images at wr50-rd550) in one product
FOLD32_RANK = 96


def check_fold(fold: str) -> str:
    """``fold`` if it is one of :data:`FOLDS`, else a one-line :class:`PadimError`."""
    if fold not in FOLDS:
        raise PadimError(f"--fold must be float64 or float32, not {fold!r}")
    return fold


@dataclass
class Moments:
    """Mergeable per-position statistics.

    Attributes
    ----------
    n : int
        Number of samples folded in.
    mean : Tensor of shape (P, d)
    m2 : Tensor of shape (P, d, d)
        Sum over samples of ``(x - mean)(x - mean)^T``.
    """

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def zeros(cls, positions: int, dims: int, *, dtype=torch.float64, device="cpu") -> "Moments":
        """An empty state (n = 0) for ``positions`` positions of ``dims`` dimensions."""
        return cls(
            0,
            torch.zeros(positions, dims, dtype=dtype, device=device),
            torch.zeros(positions, dims, dims, dtype=dtype, device=device),
        )

    @classmethod
    def from_batch(cls, x: torch.Tensor, *, dtype=torch.float64) -> "Moments":
        """Two-pass moments of one batch.

        Parameters
        ----------
        x : Tensor of shape (P, B, d)
            B samples for each of P positions.
        """
        x = x.to(dtype)
        mean = x.mean(dim=1)
        centred = x - mean.unsqueeze(1)
        return cls(x.shape[1], mean, torch.bmm(centred.transpose(1, 2), centred))

    def covariance(self) -> torch.Tensor:
        """Sample covariance ``m2 / (n - 1)`` of shape (P, d, d), without regularisation."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, this state has {self.n}")
        return self.m2 / (self.n - 1)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan's merge of two states into a new one (neither input is changed)."""
    if a.n == 0:
        return Moments(b.n, b.mean.clone(), b.m2.clone())
    if b.n == 0:
        return Moments(a.n, a.mean.clone(), a.m2.clone())
    out = Moments(a.n, a.mean.clone(), a.m2.clone())
    merge_(out, b)
    return out


def merge_(acc: Moments, b: Moments) -> Moments:
    """Chan's merge of ``b`` into ``acc`` in place; returns ``acc``."""
    if b.n == 0:
        return acc
    if acc.n == 0:
        acc.n, acc.mean, acc.m2 = b.n, b.mean.clone(), b.m2.clone()
        return acc
    n = acc.n + b.n
    delta = b.mean.to(acc.mean.dtype) - acc.mean
    weight = acc.n * b.n / n
    acc.m2 += b.m2.to(acc.m2.dtype)
    acc.m2.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=weight)
    acc.mean.add_(delta, alpha=b.n / n)
    acc.n = n
    return acc


def update_(acc: Moments, x: torch.Tensor, *, start: int = 0, stop: int | None = None,
            work: torch.Tensor | None = None, lower_only: bool = False, fold: str = DEFAULT_FOLD,
            work32: torch.Tensor | None = None) -> None:
    """Fold a batch into positions ``start:stop`` of ``acc`` in place.

    The batch mean is taken and the samples are centred on it in float64 (no
    cancellation, whatever the offset of the data). With ``fold="float64"``
    the batch's scatter and the Chan correction term are added to ``m2`` by
    one float64 batched matrix product: the centred samples get one extra row
    ``sqrt(na nb / n) * delta``. With ``fold="float32"`` the centred samples
    are rounded to float32 and their scatter is formed by a float32 product
    (into a float32 scratch matrix, then added to the float64 ``m2``); the
    Chan correction ``delta delta^T na nb / n`` and the mean update stay in
    float64. The count ``acc.n`` is *not* changed (the caller updates every
    position block, then calls :func:`advance`).

    Parameters
    ----------
    acc : Moments
        Running state (float64); its ``mean`` and ``m2`` are updated for ``start:stop``.
    x : Tensor of shape (p, B, d)
        The batch for those ``p = stop - start`` positions.
    work : Tensor, optional
        Scratch space of at least ``p (B + 1) d`` elements of ``acc``'s dtype
        and device (reused across calls: no allocation per call).
    lower_only : bool
        Update only the lower triangle of each ``m2`` matrix (CPU only: BLAS
        ``dsyrk``, or ``ssyrk`` for the float32 fold, half the arithmetic); the
        upper triangle is left stale until :func:`symmetrize_`.
    fold : {'float64', 'float32'}
        How the batch's scatter is formed (see :data:`FOLDS`).
    work32 : Tensor, optional
        For ``fold="float32"``: float32 scratch space of at least
        ``p B d + p d d`` elements (``p B d`` with ``lower_only``) on ``acc``'s device.
    """
    check_fold(fold)
    stop = acc.mean.shape[0] if stop is None else stop
    mean_a = acc.mean[start:stop]
    p, nb, d = x.shape
    # one float64 buffer: nb centred rows, then (float64 fold) the Chan correction row
    extra = int(acc.n > 0 and fold == "float64")
    shape = (p, nb + extra, d)
    if work is None:
        work = torch.empty(shape, dtype=acc.mean.dtype, device=acc.mean.device)
    rows = work.view(-1)[:shape[0] * shape[1] * shape[2]].view(shape)
    samples = rows[:, :nb]
    samples.copy_(x)
    mean_b = samples.mean(dim=1)
    samples.sub_(mean_b.unsqueeze(1))
    correction = None
    if acc.n > 0:
        n = acc.n + nb
        delta = mean_b.sub_(mean_a)  # mean_b is not needed any more
        weight = acc.n * nb / n
        if extra:
            torch.mul(delta, weight ** 0.5, out=rows[:, nb])
        else:
            correction = (delta, weight)
        mean_a.add_(delta, alpha=nb / n)
    else:
        mean_a.copy_(mean_b)
    m2 = acc.m2[start:stop]
    if fold == "float32":
        _scatter32_(m2, samples, correction, lower_only=lower_only, work32=work32)
    elif lower_only:
        _syrk_lower_(m2, rows)
    else:
        m2.baddbmm_(rows.transpose(1, 2), rows)


def _scatter32_(m2: torch.Tensor, centred: torch.Tensor, correction: tuple[torch.Tensor, float] | None, *,
                lower_only: bool, work32: torch.Tensor | None) -> None:
    """``m2[i] += c[i]^T c[i] + weight delta[i] delta[i]^T``: the scatter of the centred samples
    ``c`` (p, B, d) by a float32 product, the correction (``delta`` (p, d) float64) in float64.

    With ``lower_only`` (CPU): per position one BLAS ``ssyrk`` into a (d, d) float32
    scratch matrix whose upper triangle stays zero, added to ``m2[i]`` while it is in
    the cache, then one ``dsyr`` for the correction: the lower triangle only.
    Otherwise one float32 ``bmm`` over the block (full float32 arithmetic on a GPU:
    no TF32), added to ``m2``, and a float64 rank-1 ``baddbmm_``. Either way the
    samples go in equal groups of at most :data:`FOLD32_RANK` per float32 product.
    """
    p, nb, d = centred.shape
    size = p * nb * d + (0 if lower_only else p * d * d)
    if work32 is None or work32.numel() < size:
        work32 = torch.empty(size, dtype=torch.float32, device=m2.device)
    flat = work32.view(-1)
    rows = flat[:p * nb * d].view(p, nb, d)
    rows.copy_(centred)
    if lower_only:
        _syrk32_lower_(m2, rows, correction)
        return
    scratch = flat[p * nb * d:size].view(p, d, d)
    if m2.device.type == "cuda":
        from .extractor import float32_precision

        guard = float32_precision()
    else:
        guard = nullcontext()
    with guard:
        for lo, hi in _rank_groups(nb):
            part = rows[:, lo:hi]
            torch.bmm(part.transpose(1, 2), part, out=scratch)
            m2.add_(scratch)
    if correction is not None:
        delta, weight = correction
        m2.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=weight)


def _rank_groups(nb: int) -> list[tuple[int, int]]:
    """``nb`` samples as equal (lo, hi) groups of at most :data:`FOLD32_RANK`."""
    groups = -(-nb // FOLD32_RANK)
    edges = [nb * k // groups for k in range(groups + 1)]
    return list(zip(edges[:-1], edges[1:]))


@functools.cache
def _blas_threads():
    """threadpoolctl's controller of the BLAS libraries loaded, made once: ``threadpool_limits``
    scans the process's libraries at every call (1.2 ms here), once per fold block."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _syrk32_lower_(m2: torch.Tensor, rows: torch.Tensor, correction: tuple[torch.Tensor, float] | None) -> None:
    """The lower triangle of ``m2[i] += rows[i]^T rows[i] + weight delta[i] delta[i]^T`` per
    position: float32 BLAS ``ssyrk`` of the (B, d) float32 ``rows[i]``, float64 ``dsyr``
    of ``delta[i]`` (C-ordered matrices as Fortran transposes, see :func:`_syrk_lower_`)."""
    from scipy.linalg.blas import dsyr, ssyrk

    if m2.dtype != torch.float64 or m2.device.type != "cpu" or not (m2.is_contiguous() and rows.is_contiguous()):
        raise ValueError("one-triangle updates need contiguous float64 CPU tensors")
    d = m2.shape[1]
    out, a = m2.numpy(), rows.numpy()
    scratch = torch.zeros(d, d, dtype=torch.float32).numpy()  # ssyrk writes its lower triangle only
    delta = weight = None
    if correction is not None:
        delta, weight = correction[0].contiguous().numpy(), float(correction[1])
    groups = _rank_groups(a.shape[1])
    # one BLAS thread: these small ssyrk calls alternate with single-threaded adds, and a
    # second OpenBLAS thread made the loop 1.8x slower at d = 550 (docs/benchmarks.md)
    with _blas_threads().limit(limits=1, user_api="blas"):
        for i in range(out.shape[0]):
            for lo, hi in groups:
                ssyrk(1.0, a[i, lo:hi].T, beta=0.0, c=scratch.T, trans=0, lower=0, overwrite_c=1)
                out[i] += scratch
            if delta is not None:
                dsyr(weight, delta[i], lower=0, a=out[i].T, overwrite_a=1)


def _syrk_lower_(m2: torch.Tensor, rows: torch.Tensor) -> None:
    """``m2[i] += rows[i]^T rows[i]`` on the lower triangle, one BLAS ``dsyrk`` per position.

    A C-ordered (d, d) matrix is its transpose in Fortran order, so updating
    the upper triangle of the Fortran view updates the lower one of ``m2[i]``.
    """
    from scipy.linalg.blas import dsyrk

    if m2.dtype != torch.float64 or m2.device.type != "cpu" or not (m2.is_contiguous() and rows.is_contiguous()):
        raise ValueError("one-triangle updates need contiguous float64 CPU tensors")
    out, a = m2.numpy(), rows.numpy()
    for i in range(out.shape[0]):
        dsyrk(1.0, a[i].T, beta=1.0, c=out[i].T, trans=0, lower=0, overwrite_c=1)


def symmetrize_(m2: torch.Tensor, *, block: int = 16) -> None:
    """Copy the lower triangle of every (d, d) matrix of ``m2`` onto its upper one, in place."""
    for start in range(0, m2.shape[0], block):
        part = m2[start:start + block]
        part.copy_(part.tril() + part.tril(-1).transpose(1, 2))


def advance(acc: Moments, nb: int) -> None:
    """Count a batch of ``nb`` samples once all its position blocks were folded in."""
    acc.n += nb


# CPU folds with batched products work on position blocks whose float64 rows fit in the caches
FOLD_BLOCK_BYTES = 6 * 2**20
# syrk folds and GPU folds: large blocks. Between torch's parallel operations (the centring)
# and BLAS syrk calls, torch's idle OpenMP threads spin for milliseconds and slow syrk down
# 2.5x if the two alternate per small block; on a GPU, few kernel launches.
FOLD_BLOCK_BYTES_LARGE = 256 * 2**20
# from this dimension on, BLAS syrk (one triangle) beats a full batched product on the CPU
SYRK_MIN_DIMS = 128


def fold_row_bytes(dims: int, max_samples: int, fold: str = DEFAULT_FOLD, lower_only: bool = False) -> int:
    """Bytes of fold work space per position for folds of up to ``max_samples`` samples: the
    float64 rows ``(max_samples + 1) dims 8``, and for the float32 fold its float32 rows
    ``max_samples dims 4`` and (without ``lower_only``) a float32 scratch matrix ``dims^2 4``."""
    out = (max_samples + 1) * dims * 8
    if fold == "float32":
        out += max_samples * dims * 4 + (0 if lower_only else dims * dims * 4)
    return out


def fold_plan(positions: int, dims: int, max_samples: int, device: str = "cpu",
              fold: str = DEFAULT_FOLD) -> tuple[int, bool]:
    """(positions per fold block, whether one triangle is updated with syrk) for folds of up
    to ``max_samples`` samples; the block's work space takes ``block`` times
    :func:`fold_row_bytes` bytes."""
    check_fold(fold)
    cpu = str(device).startswith("cpu")
    lower_only = cpu and dims >= SYRK_MIN_DIMS
    budget = FOLD_BLOCK_BYTES if cpu and not lower_only else FOLD_BLOCK_BYTES_LARGE
    per_position = fold_row_bytes(dims, max_samples, fold, lower_only)
    return max(1, min(positions, budget // per_position)), lower_only


class Folder:
    """Folds samples into a state in large groups, block of positions by block.

    A rank-``m`` update of a (d, d) matrix costs the same memory traffic for
    any ``m``; folding one batch of 32 at a time leaves the update memory-bound.
    ``Folder`` keeps up to ``max_samples`` samples (the caller bounds that by
    bytes) and folds them in one go; :meth:`flush` before reading ``acc``.

    Samples go in with :meth:`add`, or are written straight into the buffer:
    ``view = folder.reserve(b)``, fill ``view``, then ``folder.commit(b)``
    (not committing drops them).

    Parameters
    ----------
    acc : Moments
        The running state (changed in place).
    max_samples : int
        Samples buffered before they are folded in.
    block : int, optional
        Positions per update. Default (:func:`fold_plan`): for batched
        products on the CPU, as many as keep the float64 work rows within
        about FOLD_BLOCK_BYTES (cache-sized, see docs/design.md: faster than large blocks at
        d = 100); for syrk and on a GPU, within FOLD_BLOCK_BYTES_LARGE.
    lower_only : bool, optional
        Update one triangle with BLAS syrk and mirror it in :meth:`flush`.
        Default: on the CPU from SYRK_MIN_DIMS dimensions (see docs/design.md).
    fold : {'float64', 'float32'}
        How each fold forms the scatter of its samples (:func:`update_`); the
        accumulator stays float64 either way.
    """

    def __init__(self, acc: Moments, *, max_samples: int, block: int | None = None,
                 lower_only: bool | None = None, fold: str = DEFAULT_FOLD):
        self.acc = acc
        self.fold = check_fold(fold)
        self.max_samples = max(1, max_samples)
        positions, dims = acc.mean.shape
        auto_block, auto_lower = fold_plan(positions, dims, self.max_samples, acc.m2.device.type, fold)
        if lower_only is None:
            lower_only = auto_lower and acc.m2.dtype == torch.float64
        self.lower_only = bool(lower_only)
        self.block = max(1, min(block or auto_block, positions))
        self._stale_upper = False
        self._buffer: torch.Tensor | None = None  # (P, max_samples, d), allocated once
        self._direct: torch.Tensor | None = None  # a batch larger than the buffer
        self._work: torch.Tensor | None = None
        self._work32: torch.Tensor | None = None  # float32 rows and scratch of the float32 fold
        self._count = 0

    def reserve(self, b: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (P, b, d) view to write the next ``b`` samples into; :meth:`commit` keeps them."""
        positions, dims = self.acc.mean.shape
        if b > self.max_samples:  # larger than the buffer: folded on its own
            self._direct = torch.empty(positions, b, dims, dtype=dtype, device=self.acc.mean.device)
            return self._direct
        self._direct = None
        if self._count + b > self.max_samples or (self._buffer is not None and self._buffer.dtype != dtype):
            self._fold_buffer()  # before the buffer is refilled (or replaced: another dtype)
        if self._buffer is None or self._buffer.dtype != dtype:
            # zeros, not empty: the memory is committed now, not by a later batch
            self._buffer = torch.zeros(positions, self.max_samples, dims, dtype=dtype, device=self.acc.mean.device)
        return self._buffer[:, self._count:self._count + b]

    def commit(self, b: int) -> None:
        """Keep the ``b`` samples written into the last :meth:`reserve` view."""
        if self._direct is not None:
            direct, self._direct = self._direct, None
            self._fold_buffer()  # the buffered samples first: same order as they came
            self._fold(direct, b)
            return
        self._count += b
        if self._count == self.max_samples:
            self._fold_buffer()

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of shape (P, b, d) (copied: the caller may reuse ``x``)."""
        b = x.shape[1]
        self.reserve(b, x.dtype).copy_(x)
        self.commit(b)

    def flush(self) -> None:
        """Fold every buffered sample into ``acc`` and leave its ``m2`` complete."""
        self._fold_buffer()
        if self._stale_upper:
            symmetrize_(self.acc.m2)
            self._stale_upper = False

    def _fold_buffer(self) -> None:
        if self._count:
            count, self._count = self._count, 0
            self._fold(self._buffer[:, :count], count)

    def _fold(self, x: torch.Tensor, count: int) -> None:
        size = self.block * (count + 1) * x.shape[2]
        if self._work is None or self._work.numel() < size:
            self._work = torch.empty(size, dtype=self.acc.m2.dtype, device=self.acc.m2.device)
        if self.fold == "float32":
            d = x.shape[2]
            size32 = self.block * count * d + (0 if self.lower_only else self.block * d * d)
            if self._work32 is None or self._work32.numel() < size32:
                self._work32 = torch.empty(size32, dtype=torch.float32, device=self.acc.m2.device)
        for start in range(0, x.shape[0], self.block):
            update_(self.acc, x[start:start + self.block], start=start, stop=start + self.block,
                    work=self._work, lower_only=self.lower_only, fold=self.fold, work32=self._work32)
        self._stale_upper |= self.lower_only
        advance(self.acc, count)
