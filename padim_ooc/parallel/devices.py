"""Which GPU a Dask worker uses, and what share of it: round-robin over the visible devices.

Without this, every worker of a machine resolved ``--device auto`` (or ``cuda``) to
``cuda:0`` and budgeted 80 % of that GPU's free memory for itself: four workers
over-committed one GPU while the others idled. The client numbers the workers of
each host (addresses sorted) when it registers :class:`WorkerSetup`; worker ``r`` of
``n`` on a host takes ``cuda:(r mod G)`` of its G visible GPUs and budgets
``1 / s`` of that GPU, ``s`` the number of that host's workers that share it.
An explicit ``cuda:N`` is kept as given.
"""
from __future__ import annotations

import zlib

# (rank among this host's workers, workers on this host), set in a worker by WorkerSetup
_slot: tuple[int, int] | None = None


def assign_slots(workers: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{address: (rank, n)}`` for workers ``{address: host}``: ranks 0..n-1 per host, by address."""
    by_host: dict[str, list[str]] = {}
    for address, host in workers.items():
        by_host.setdefault(host, []).append(address)
    slots = {}
    for addresses in by_host.values():
        for rank, address in enumerate(sorted(addresses)):
            slots[address] = (rank, len(addresses))
    return slots


def gpu_share(rank: int, n: int, gpus: int) -> tuple[int, int]:
    """(GPU index, workers sharing that GPU) for worker ``rank`` of ``n`` on a host with ``gpus`` GPUs."""
    index = rank % gpus
    return index, len(range(index, n, gpus)) if n > index else 1


def set_slot(slot: tuple[int, int] | None) -> None:
    """Record this process's worker slot (None: not a numbered worker)."""
    global _slot
    _slot = slot


def worker_gpu(gpus: int) -> tuple[int, int] | None:
    """(GPU index, sharers) of this process if it is a numbered Dask worker and ``gpus`` > 0, else None."""
    if _slot is None or gpus <= 0:
        return None
    return gpu_share(*_slot, gpus)


def fallback_slot(address: str, known: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """A slot for a worker the client did not number (it joined later): a rank from its address
    (stable across calls), and the host's known worker count plus one."""
    n = 1 + max((m for _, m in known.values()), default=0)
    return zlib.crc32(address.encode()) % n, n


def _plugin_class():
    from distributed import WorkerPlugin

    from .client import TORCH_THREADS_PER_WORKER

    class WorkerSetup(WorkerPlugin):
        """In every worker (also restarted ones): torch's intra-op threads, and the worker's slot
        for the round-robin GPU choice (:func:`worker_gpu`)."""

        name = "padim-ooc-worker-setup"

        def __init__(self, slots: dict[str, tuple[int, int]], threads: int = TORCH_THREADS_PER_WORKER):
            self.slots = slots
            self.threads = threads

        def setup(self, worker) -> None:
            import torch

            torch.set_num_threads(self.threads)
            set_slot(self.slots.get(worker.address) or fallback_slot(worker.address, self.slots))

    return WorkerSetup


def register(client) -> dict[str, tuple[int, int]]:
    """Number the client's workers per host and register :class:`WorkerSetup`; returns the slots."""
    info = client.scheduler_info()["workers"]
    slots = assign_slots({address: w.get("host", address) for address, w in info.items()})
    client.register_plugin(_plugin_class()(slots))
    return slots


__all__ = ["assign_slots", "gpu_share", "worker_gpu", "register"]
