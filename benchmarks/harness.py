"""What every benchmark script measures with: timing, compilation, memory, XLA's own figures, tables.

Timing. Every timed call is waited for (``jax.block_until_ready`` on its result; a torch
implementation's call synchronises its own device). :func:`time_round_robin` times several
calls interleaved — one call of each per round — so that a slow spell on a shared machine
(another process, a clock change) hits them alike instead of whichever ran during it; the
ratios, which are what the benchmarks are about, stay fair. Report the :func:`median` of the
rounds, and :func:`paired_ratio` for the median over rounds of one call's time to another's in
the same round. A single call timed over and over is ``time_round_robin([call], n)``.

Compilation. :func:`compile_and_warm` compiles a jitted function ahead of time for its arguments
and runs it once, so neither compilation nor first-call allocations land in the timings.

Memory. :func:`peak_memory`: the process's peak so far (the accelerator's peak bytes in use when
the device reports them, else the peak resident set size). :class:`HeapPeak`: the growth of the
live heap during one block, sampled from a thread — the working memory of one call on a CPU,
the same measure for jax and torch. :func:`xla_working_bytes`, :func:`xla_temp_mib`: XLA's
buffer plan of a compiled call; :func:`xla_gflop`: XLA's count of floating-point operations.

Tables. :func:`table` lays rows out side by side, as text or Markdown.

Shared choices: :data:`RESNETS` (the ``--model`` choices of the ResNet benchmarks) and
:data:`DTYPES` (``--dtype``).
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gradcam_jax import models

__all__ = [
    "RESNETS",
    "DTYPES",
    "compile_and_warm",
    "timed_call",
    "time_round_robin",
    "median",
    "paired_ratio",
    "xla_gflop",
    "xla_temp_mib",
    "xla_working_bytes",
    "peak_memory",
    "HeapPeak",
    "live_heap_reader",
    "table",
]


#: The package's Flax ResNets by name (random weights: speed does not depend on the values).
RESNETS = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
    "resnet152": models.resnet152,
}
#: Compute dtypes; parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def compile_and_warm(fn, args: Sequence) -> tuple[Any, float]:
    """AOT-compile the jitted ``fn`` for ``args`` and run it once: (compiled, compile seconds)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up: first-call allocations, thread pools
    return compiled, compile_s


def timed_call(call: Callable[[], Any]) -> tuple[Any, float]:
    """``(result, seconds)`` of one call of ``call()``, its result waited for."""
    t = time.perf_counter()
    out = jax.block_until_ready(call())
    return out, time.perf_counter() - t


def time_round_robin(
    calls: Sequence[Callable[[], Any]], repeats: int, *, min_seconds: float = 0.0
) -> list[list[float]]:
    """Seconds per call of every ``call()``: ``repeats`` rounds, one call of each per round.

    ``min_seconds``: within its round, a call is repeated until that much time has passed, and
    the time kept is per call (for calls so short that timer resolution and brief hiccups would
    decide a ratio). Returns one list of ``repeats`` times per call, in the order given.
    """
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            n, t0 = 0, time.perf_counter()
            while True:
                jax.block_until_ready(call())
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds:
                    break
            times[i].append(elapsed / n)
    return times


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def paired_ratio(times: Sequence[float], base_times: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / base_times[i]``: the two ran back to back in round ``i``,
    so a slow spell mostly cancels out."""
    return statistics.median(t / b for t, b in zip(times, base_times, strict=True))


# --------------------------------------------------------------------------------------------
# XLA's own figures for a compiled call
# --------------------------------------------------------------------------------------------


def xla_gflop(compiled) -> float:
    """XLA's count of floating-point operations per call (GFLOP), NaN where the backend does not say.

    Unlike wall time this does not move with machine load, so its ratio to a baseline's says how
    much work a method adds, even where the timings are noisy.
    """
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return cost["flops"] / 1e9
    except Exception:  # not every backend/version implements it
        return float("nan")


def xla_temp_mib(compiled) -> float:
    """XLA's scratch memory for one call (MiB), NaN where the backend does not say."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:
        return float("nan")


def xla_working_bytes(compiled) -> float:
    """What one call allocates by XLA's buffer plan: outputs + temporaries (the arguments are resident)."""
    try:
        m = compiled.memory_analysis()
        return float(m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:
        return float("nan")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def peak_memory() -> tuple[int, str]:
    """The process's peak memory so far: (bytes, what was measured)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], f"peak bytes in use on {device.device_kind} (device.memory_stats)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = rss if sys.platform == "darwin" else rss * 1024
    return rss, "process peak RSS (resource.getrusage; host memory, includes the Python process)"


@functools.cache
def live_heap_reader() -> tuple[Callable[[], int] | None, str]:
    """(a function returning the live heap in bytes, or None; the name of what it reads).

    Live heap = glibc's ``mallinfo2()`` bytes in use (``uordblks + hblkhd``): torch's CPU
    allocator and XLA's CPU buffers both come from malloc, and unlike the resident set size
    this does not keep memory that a previous call freed. Falls back to the resident set size
    (``/proc/self/statm``) where ``mallinfo2`` is missing (not glibc, or glibc < 2.33).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        libc.mallinfo2.restype = MallInfo2

        def mallinfo() -> int:
            m = libc.mallinfo2()
            return m.uordblks + m.hblkhd

        mallinfo()
        return mallinfo, "live heap (glibc mallinfo2)"
    except Exception:
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

        def statm() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        try:
            statm()
        except OSError:
            return None, "unavailable"
        return statm, "resident set size (/proc/self/statm)"


class HeapPeak:
    """Peak growth of the live heap (:func:`live_heap_reader`) while the block runs, in bytes
    (``.growth``, NaN where nothing can be read), sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.read = live_heap_reader()[0]
        self.growth = float("nan")

    def __enter__(self):
        self.base = self.peak = self.read() if self.read else None
        if self.base is None:
            return self
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.read())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.base is None:
            return False
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        self.growth = self.peak - self.base
        return False


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def table(
    head: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    align: str = "",
    markdown: bool = False,
    group_first: bool = False,
) -> str:
    """Rows side by side, every column as wide as its widest cell.

    Args:
      head: the column names.
      rows: the cells (formatted already; anything else goes through ``str``).
      align: one letter per column, ``"l"`` or ``"r"``; missing letters mean ``"l"``.
      markdown: a Markdown table (``| a | b |``, a ``|---|`` rule; ``|`` in cells escaped)
        instead of text (``a | b``, a ``-+-`` rule).
      group_first: leave the first cell blank where it repeats the row above's.
    """
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    if markdown:
        cells = [[c.replace("|", "\\|") for c in r] for r in cells]
    if group_first:
        shown = [cells[0]]
        prev = None
        for r in cells[1:]:
            shown.append([""] + r[1:] if r[0] == prev else r)
            prev = r[0]
        cells = shown
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r):
        padded = [
            f"{c:>{w}}" if align[i : i + 1] == "r" else f"{c:<{w}}"
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |" if markdown else " | ".join(padded)

    rule = (
        "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        if markdown
        else "-+-".join("-" * w for w in widths)
    )
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
