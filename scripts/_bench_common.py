"""Helpers shared by the benchmark scripts: synthetic images on disk, peak RSS, output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


def write_images(folder: Path, count: int, *, size: int = 256, seed: int = 0, start: int = 0) -> list[Path]:
    """Synthetic JPEGs (smooth pattern + noise), written once and reused.

    Image ``i`` is drawn from its own seed ``(seed, i)``, so an image is the same
    whichever call writes it and no two images are alike (the ledger would
    count a repeated file once).
    """
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(start, start + count):
        path = folder / f"img{i:07d}.jpg"
        if not path.exists():
            rng = np.random.default_rng([seed, i])
            base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)),
                             np.sin(4 * (xx + yy) + rng.uniform(0, 6))], axis=-1)
            img = 127 + 60 * base + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class PeakRSS:
    """Samples the RSS of a process tree (the process and its children) every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.main = 0
        self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                kids = sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except psutil.Error:
                break
            self.main = max(self.main, main)
            self.tree = max(self.tree, main + kids)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; return its wall time, exit code and peak RSS (main process and tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    with PeakRSS(proc.pid) as rss:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall_s": wall, "peak_rss_main_mb": rss.main / 2**20, "peak_rss_tree_mb": rss.tree / 2**20,
            "stdout": out}


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.processor() or platform.machine()}, {cores} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def emit(record: dict, markdown: str | None, table: str) -> None:
    """Print one JSON line; append a markdown table (with command, machine, date) if asked."""
    record = {**record, "machine": machine(), "date": date.today().isoformat()}
    print(json.dumps(record))
    if markdown:
        cmd = "python " + " ".join(sys.argv)
        with open(markdown, "a", encoding="utf-8") as f:
            f.write(f"\n`{cmd}`  \n{record['machine']}, {record['date']}\n\n{table}\n")
