"""Shared helpers for mechkit benchmarks: peak-RSS sampling, tables, machine description.

Import from a benchmark script run as ``python benchmarks/<script>.py`` (its folder is on
``sys.path``), or add this folder to ``sys.path`` first::

    from _common import PeakRSS, machine_description, print_table
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import threading
import time
from collections.abc import Sequence

import psutil

MIB = 2**20
_NUMBER = re.compile(r"^[-+]?[0-9][0-9,]*(\.[0-9]+)?\s*[x%]?$")


def trim_heap() -> None:
    """``gc.collect()``, then hand freed C-heap memory back to the OS (glibc ``malloc_trim``).

    Without the trim, memory freed by an earlier measurement stays in the process (glibc keeps
    it for reuse), which raises the next baseline and hides that measurement's real need.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class PeakRSS:
    """Context manager: peak resident memory above the level at entry, sampled in a thread.

    :func:`trim_heap` (``gc.collect()`` and glibc ``malloc_trim``) runs before the baseline is
    read. Samples every ``interval`` seconds
    (default 5 ms); the readings are in bytes (``baseline``, ``peak``, ``extra``) and in
    MiB (``extra_mib``).

    Example:
        >>> with PeakRSS() as rss:
        ...     data = bytearray(50 * 2**20)
        >>> rss.extra_mib > 40
        True
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        trim_heap()
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.baseline

    @property
    def extra_mib(self) -> float:
        return self.extra / MIB


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description() -> str:
    """One line: CPU model, cores, RAM, Python, torch version and threads."""
    import torch

    logical = os.cpu_count()
    physical = psutil.cpu_count(logical=False)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = logical
    ram = psutil.virtual_memory().total / 2**30
    return (
        f"CPU: {cpu_model()} | cores: {usable} usable ({physical} physical, {logical} logical) | "
        f"RAM: {ram:.1f} GiB | Python {platform.python_version()} | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    numeric = [all(_NUMBER.match(row[i]) or row[i] in ("", "-") for row in cells[1:]) for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(format_table(headers, rows), flush=True)


class Timer:
    """Context manager measuring wall time with ``time.perf_counter`` (``seconds``)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
