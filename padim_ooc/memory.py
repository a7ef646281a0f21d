"""The memory plan of a fit: one pass over the images, or one pass per block of positions.

The float64 accumulator of PaDiM's statistics takes ``P (d^2 + d) 8`` bytes
(WR50-Rd550 at 224 px: 7.6 GB). When it does not fit the memory budget beside
one batch in flight, the positions are split into the fewest equal blocks
that do, and the fit does one pass over the images per block (positions are
independent, so the statistics are the same as in one pass).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from .errors import PadimError
from .welford import DEFAULT_FOLD, fold_plan, fold_row_bytes

# share of the available memory a fit plans to use when no budget is given
MEMORY_MARGIN = 0.8
# allowance for the backbone's activations, bytes per input pixel of one image (an estimate:
# a ResNet's float32 activations up to layer3 peak well below this)
ACTIVATION_BYTES_PER_PIXEL = 256


# glibc mallopt parameters, and the size from which blocks are mapped (and unmapped when freed)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 << 20


@functools.cache
def tune_allocator() -> bool:
    """Fix glibc's allocator thresholds for a long run of equal batches (glibc only; else a no-op).

    Both the mmap and the trim threshold are set to :data:`MMAP_THRESHOLD`: each
    batch's activations are then reused from the heap batch after batch (no page
    faults, the same footprint every batch), the large buffers allocated once (the
    accumulator, the fold buffer) are mapped, and freed heap beyond the threshold
    goes back to the system. With glibc's dynamic default every activation block
    over 32 MB is mapped afresh (page faults) and smaller blocks fragment the heap
    (peak memory creeps up with the number of images). The measurements behind the
    choice: docs/design.md ("Allocator thresholds") and docs/benchmarks.md.
    Returns whether the setting was applied.

    Done once a process: ``mallopt`` is looked up among the libraries this
    process already runs on (``dlopen(NULL)``), never through
    ``ctypes.util.find_library``, which starts ``ldconfig -p`` in a subprocess:
    a fork at every fit and score, in a process whose native thread pools
    (torch, onnxruntime, OpenVINO) are running, crashed the test process with a
    segmentation fault (exit 139; see docs/reliability.md).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD))


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """How a fit spends its memory budget.

    Attributes
    ----------
    budget : int
        Bytes allowed for the statistics and one batch in flight.
    accumulator : int
        Bytes of the float64 mean (P, d) and m2 (P, d, d) of all P positions.
    working : int
        Estimated bytes of one batch in flight (activations, buffered
        features, float64 temporaries of one update).
    positions : int
        P.
    block_positions : int
        Positions accumulated per pass over the images (P: one pass).
    """

    budget: int
    accumulator: int
    working: int
    positions: int
    block_positions: int

    @property
    def blocks(self) -> int:
        """Passes over the images."""
        return -(-self.positions // self.block_positions)

    def ranges(self) -> list[tuple[int, int]]:
        """(start, stop) of every position block."""
        step = self.block_positions
        return [(s, min(s + step, self.positions)) for s in range(0, self.positions, step)]

    def describe(self) -> str:
        """One line for the progress output."""
        sizes = (f"accumulator {_gib(self.accumulator)} + working memory {_gib(self.working)}, "
                 f"budget {_gib(self.budget)}")
        if self.blocks == 1:
            return f"memory plan: one pass over the images ({sizes})"
        return (f"memory plan: {self.blocks} passes over the images, {self.block_positions} of "
                f"{self.positions} positions each; features are extracted again in every pass ({sizes})")


def plan_memory(positions: int, dims: int, *, batch_size: int, crop: int, budget: int,
                fold_samples: int | None = None, fold: str = DEFAULT_FOLD) -> MemoryPlan:
    """Choose between one pass and position blocks for a memory ``budget`` (bytes).

    The accumulator takes ``P (d^2 + d) 8`` bytes; one batch in flight about
    ``batch_size crop^2 ACTIVATION_BYTES_PER_PIXEL`` for the backbone, twice
    the buffered float32 features (``fold_samples P d 4``) and the work space
    of one fold block (:func:`padim_ooc.welford.fold_plan`: float64 rows, and for
    the ``float32`` fold its float32 rows and scratch matrices). When
    both do not fit, the positions are split into the fewest equal blocks
    whose accumulators fit beside the working memory.
    """
    per_position = (dims * dims + dims) * 8
    accumulator = positions * per_position
    samples = max(batch_size, fold_samples or batch_size)
    block, lower_only = fold_plan(positions, dims, samples, fold=fold)
    working = (batch_size * crop * crop * ACTIVATION_BYTES_PER_PIXEL
               + 2 * samples * positions * dims * 4
               + block * fold_row_bytes(dims, samples, fold, lower_only))
    if accumulator + working <= budget:
        return MemoryPlan(budget, accumulator, working, positions, positions)
    room = budget - working
    if room < per_position:
        raise PadimError(f"the memory budget {_gib(budget)} is too small: one batch needs about "
                         f"{_gib(working)} plus {per_position / 2**20:.2f} MiB per position block; "
                         "raise --max-memory or lower --batch-size")
    blocks = -(-accumulator // room)
    return MemoryPlan(budget, accumulator, working, positions, -(-positions // blocks))


def default_budget(device=None) -> int:
    """Available memory with a margin (and within the Dask worker's limit, on a worker).

    Parameters
    ----------
    device : str or torch.device, optional
        Where the accumulator and the fold buffer live. On a CUDA device the
        budget is also capped by the GPU memory free now
        (``torch.cuda.mem_get_info``) and, on a Dask worker that shares its GPU
        with others of its host, by its share of the GPU's total, with the same
        margin; ``auto`` means CUDA when one is available. ``None`` or ``cpu``:
        host memory only.
    """
    import psutil

    available = psutil.virtual_memory().available
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    if limit:
        available = min(available, int(limit) - psutil.Process().memory_info().rss)
    gpu = _cuda_device(device)
    if gpu is not None:
        import torch

        free, total = torch.cuda.mem_get_info(gpu)
        available = min(available, int(free), int(total) // _gpu_sharers())
    return max(0, int(available * MEMORY_MARGIN))


def _gpu_sharers() -> int:
    """How many workers of this host share this process's GPU (1 outside a Dask worker): each
    budgets its share of the GPU's memory, so the budgets add up (parallel/devices.py)."""
    import torch

    from .parallel.devices import worker_gpu

    mine = worker_gpu(torch.cuda.device_count())
    return mine[1] if mine else 1


def _cuda_device(device):
    """The CUDA ``torch.device`` a fit on ``device`` uses, or None (CPU, or no device given)."""
    if device is None:
        return None
    from .extractor import resolve_device

    resolved = resolve_device(device)
    return resolved if resolved.type == "cuda" else None


__all__ = ["MemoryPlan", "plan_memory", "default_budget", "MEMORY_MARGIN", "ACTIVATION_BYTES_PER_PIXEL"]
