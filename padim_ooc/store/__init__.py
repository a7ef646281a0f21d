"""The model store: where the statistics live, and how they are kept whole.

- :mod:`.model`: :class:`ModelStore`, the Zarr group of one model (configuration, running
  statistics, ledger, finalizations) with its crash-safe checkpoint switch.
- :mod:`.chunks`: chunk-level reads and writes, and the checks that a chunk read is real
  (a missing chunk is damage, never zeros).
- :mod:`.lock`: one writer at a time (a lock file in the store folder; at a URL, a lock object
  written with a conditional put: :mod:`.url_lock`).
- :mod:`.paths`: paths as other processes see them (absolute; ``memory://`` refused for workers).
"""
from .chunks import ATTR_KEY, COMPLETE_KEY, PAUSE_ENV, pause_point, read_array, write_array
from .paths import check_shareable, is_url, shared_path
from .model import CHUNK_TARGET_BYTES, SCHEMA_VERSION, ModelStore, positions_per_chunk, store_exists, zarr_options

__all__ = ["ModelStore", "store_exists", "read_array", "write_array", "shared_path", "check_shareable", "is_url",
           "zarr_options", "positions_per_chunk", "pause_point", "ATTR_KEY", "COMPLETE_KEY", "PAUSE_ENV",
           "SCHEMA_VERSION", "CHUNK_TARGET_BYTES"]
