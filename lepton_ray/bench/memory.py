"""Peak memory of a whole run: the driver and every process it started (Ray's GCS, raylet,
workers), sampled in a background thread. Proportional set size (PSS) where Linux offers it,
so pages shared between processes (the object store) are not counted once per process."""

from __future__ import annotations

import threading

import psutil


def tree_memory_mb(root: psutil.Process) -> float:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total / 2**20


class PeakMemory:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_mb = 0.0
        self.last_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._root = psutil.Process()

    def sample(self) -> float:
        self.last_mb = tree_memory_mb(self._root)
        self.peak_mb = max(self.peak_mb, self.last_mb)
        return self.last_mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
