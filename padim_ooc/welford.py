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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
            work: torch.Tensor | None = None, lower_only: bool = False) -> None:
    """Fold a batch into positions ``start:stop`` of ``acc`` in place.

    The batch's own moments (centred on the batch mean) and the Chan
    correction term are added to ``m2`` by one batched matrix product: the
    centred samples get one extra row ``sqrt(na nb / n) * delta``.
    The count ``acc.n`` is *not* changed (the caller updates every position
    block, then calls :func:`advance`).

    Parameters
    ----------
    acc : Moments
        Running state; its ``mean`` and ``m2`` are updated for ``start:stop``.
    x : Tensor of shape (p, B, d)
        The batch for those ``p = stop - start`` positions.
    work : Tensor, optional
        Scratch space of at least ``p (B + 1) d`` elements of ``acc``'s dtype
        and device (reused across calls: no allocation per call).
    lower_only : bool
        Update only the lower triangle of each ``m2`` matrix (CPU only: BLAS
        ``syrk``, half the arithmetic); the upper triangle is left stale
        until :func:`symmetrize_`.
    """
    stop = acc.mean.shape[0] if stop is None else stop
    mean_a = acc.mean[start:stop]
    p, nb, d = x.shape
    # one float64 buffer: nb centred rows, then the Chan correction row
    shape = (p, nb + (acc.n > 0), d)
    if work is None:
        work = torch.empty(shape, dtype=acc.mean.dtype, device=acc.mean.device)
    rows = work.view(-1)[:shape[0] * shape[1] * shape[2]].view(shape)
    samples = rows[:, :nb]
    samples.copy_(x)
    mean_b = samples.mean(dim=1)
    samples.sub_(mean_b.unsqueeze(1))
    if acc.n > 0:
        n = acc.n + nb
        delta = mean_b.sub_(mean_a)  # mean_b is not needed any more
        torch.mul(delta, (acc.n * nb / n) ** 0.5, out=rows[:, nb])
        mean_a.add_(delta, alpha=nb / n)
    else:
        mean_a.copy_(mean_b)
    m2 = acc.m2[start:stop]
    if lower_only:
        _syrk_lower_(m2, rows)
    else:
        m2.baddbmm_(rows.transpose(1, 2), rows)


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


def fold_plan(positions: int, dims: int, max_samples: int, device: str = "cpu") -> tuple[int, bool]:
    """(positions per fold block, whether one triangle is updated with syrk) for folds of up
    to ``max_samples`` samples; the block's float64 work rows take ``block (max_samples + 1) dims 8`` bytes."""
    cpu = str(device).startswith("cpu")
    lower_only = cpu and dims >= SYRK_MIN_DIMS
    budget = FOLD_BLOCK_BYTES if cpu and not lower_only else FOLD_BLOCK_BYTES_LARGE
    return max(1, min(positions, budget // ((max_samples + 1) * dims * 8))), lower_only


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
    """

    def __init__(self, acc: Moments, *, max_samples: int, block: int | None = None,
                 lower_only: bool | None = None):
        self.acc = acc
        self.max_samples = max(1, max_samples)
        positions, dims = acc.mean.shape
        auto_block, auto_lower = fold_plan(positions, dims, self.max_samples, acc.m2.device.type)
        if lower_only is None:
            lower_only = auto_lower and acc.m2.dtype == torch.float64
        self.lower_only = bool(lower_only)
        self.block = max(1, min(block or auto_block, positions))
        self._stale_upper = False
        self._buffer: torch.Tensor | None = None  # (P, max_samples, d), allocated once
        self._direct: torch.Tensor | None = None  # a batch larger than the buffer
        self._work: torch.Tensor | None = None
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
        for start in range(0, x.shape[0], self.block):
            update_(self.acc, x[start:start + self.block], start=start, stop=start + self.block,
                    work=self._work, lower_only=self.lower_only)
        self._stale_upper |= self.lower_only
        advance(self.acc, count)
