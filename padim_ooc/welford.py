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


def update_(acc: Moments, x: torch.Tensor, *, start: int = 0, stop: int | None = None) -> None:
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
    """
    stop = acc.mean.shape[0] if stop is None else stop
    mean_a = acc.mean[start:stop]
    p, nb, d = x.shape
    # one float64 buffer: nb centred rows, then the Chan correction row
    rows = torch.empty(p, nb + (acc.n > 0), d, dtype=acc.mean.dtype, device=acc.mean.device)
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
    acc.m2[start:stop].baddbmm_(rows.transpose(1, 2), rows)


def advance(acc: Moments, nb: int) -> None:
    """Count a batch of ``nb`` samples once all its position blocks were folded in."""
    acc.n += nb


class Folder:
    """Folds samples into a state in large groups, block of positions by block.

    A rank-``m`` update of a (d, d) matrix costs the same memory traffic for
    any ``m``; folding one batch of 32 at a time leaves the update memory-bound.
    ``Folder`` keeps up to ``max_samples`` samples (the caller bounds that by
    bytes) and folds them in one go; :meth:`flush` before reading ``acc``.

    Parameters
    ----------
    acc : Moments
        The running state (changed in place).
    block : int
        Positions per update (bounds the float64 temporaries).
    max_samples : int
        Samples buffered before they are folded in.
    """

    def __init__(self, acc: Moments, *, block: int, max_samples: int):
        self.acc = acc
        self.block = block
        self.max_samples = max(1, max_samples)
        self._buffer: torch.Tensor | None = None  # (P, max_samples, d), allocated once
        self._count = 0

    def add(self, x: torch.Tensor) -> None:
        """Buffer a batch of shape (P, b, d) (copied: the caller may reuse ``x``)."""
        b = x.shape[1]
        if b > self.max_samples:  # larger than the buffer: fold it directly
            self.flush()
            self._fold(x, b)
            return
        if self._count + b > self.max_samples:
            self.flush()
        if self._buffer is None:  # zeros, not empty: the memory is committed now, not by a later batch
            self._buffer = torch.zeros(x.shape[0], self.max_samples, x.shape[2], dtype=x.dtype, device=x.device)
        self._buffer[:, self._count:self._count + b] = x
        self._count += b
        if self._count == self.max_samples:
            self.flush()

    def flush(self) -> None:
        """Fold every buffered sample into ``acc``."""
        if self._count:
            count, self._count = self._count, 0
            self._fold(self._buffer[:, :count], count)

    def _fold(self, x: torch.Tensor, count: int) -> None:
        for start in range(0, x.shape[0], self.block):
            update_(self.acc, x[start:start + self.block], start=start, stop=start + self.block)
        advance(self.acc, count)
