"""How one method is measured: ours against each peer, interleaved, with memory from the first call."""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np

from ..harness import HeapPeak, time_round_robin, xla_working_bytes
from .common import cuda_live


class Impl:
    """One implementation of one method: ``call() -> output``, made ready with ``sync``."""

    def __init__(
        self,
        name,
        call,
        *,
        sync=None,
        to_numpy=None,
        setup=None,
        teardown=None,
        torch=None,
        compiled=None,
        compile_s=None,
    ):
        self.name, self.call = name, call
        self.sync = sync or (lambda out: out)
        self.to_numpy = to_numpy or np.asarray
        self.setup, self.teardown = setup, teardown
        self.torch = torch  # the torch module, for torch implementations
        self.compiled = compiled  # the XLA executable, for ours
        self.compile_s = compile_s

    def run(self):
        return self.sync(self.call())


class Measure:
    def __init__(self, name):
        self.name = name
        self.times = []
        self.peak_bytes = float("nan")
        self.compile_s = None
        self.error = None
        self.output = None
        self.ratio = None  # peer time / ours time (same rounds)
        self.x_floor = None  # time / our forward's time (same rounds)
        self.floor_times = []


def first_call(impl, on_gpu, interval=0.001):
    """Run once (the warm-up; or the only, timed call when slow) measuring peak memory.

    Returns (output, seconds, peak bytes): the memory the call needs above what was already
    resident (the weights, the inputs). GPU: torch's allocator peak during the call minus what
    was allocated before it; for ours XLA's buffer plan of the compiled call (outputs +
    temporaries; the arguments are resident). CPU: the growth of the process's live heap
    during the call (see ``harness.HeapPeak``).
    """
    if on_gpu and impl.torch is not None and cuda_live(impl.torch):
        torch = impl.torch
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = impl.run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return out, dt, float(torch.cuda.max_memory_allocated() - before)
    if on_gpu and impl.compiled is not None:
        t = time.perf_counter()
        out = impl.run()
        dt = time.perf_counter() - t
        return out, dt, xla_working_bytes(impl.compiled)
    with HeapPeak(interval) as mem:
        t = time.perf_counter()
        out = impl.run()
        dt = time.perf_counter() - t
    return out, dt, float(mem.growth)


def keep_first(arr, keep):
    """The first ``keep`` images of an output, as a float32 copy (for the agreement table)."""
    return np.asarray(arr)[:keep].astype(np.float32, copy=True)


def rounds(floor, ours, peer, repeats):
    """``repeats`` rounds of (floor, ours, peer) calls, each call of a round after the other; the
    floor and the peer may be None. Returns their lists of seconds ([] for a None)."""
    impls = (floor, ours, peer)
    times = iter(time_round_robin([i.run for i in impls if i is not None], repeats))
    return [next(times) if i is not None else [] for i in impls]


def measure_peer(peer, ours, m, floor, repeats, on_gpu, slow, keep, interval):
    """The peer's Measure, timed in rounds with ours (whose times go into ``m``)."""
    pm = Measure(peer.name)
    mine = floors = None
    try:
        if peer.setup:
            peer.setup()
        out, dt, pm.peak_bytes = first_call(peer, on_gpu, interval)
        pm.output = keep_first(peer.to_numpy(out), keep)
        if slow:
            pm.times.append(dt)
            mine = m.times[:1]
        else:
            floors, mine, pm.times = rounds(floor, ours, peer, repeats)
            m.times.extend(mine)
            m.floor_times.extend(floors)
    except Exception as e:
        pm.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        if peer.teardown:
            with contextlib.suppress(Exception):
                peer.teardown()
        if peer.torch is not None and cuda_live(peer.torch):
            peer.torch.cuda.empty_cache()
    if pm.times and mine:
        pm.ratio = statistics.median(pm.times) / statistics.median(mine)
        if floors:
            pm.x_floor = statistics.median(pm.times) / statistics.median(floors)
    return pm


def measure_method(ours, peers, repeats, on_gpu, slow, keep, floor=None):
    """Time ``ours`` against each peer, interleaved round by round; memory from the first call.

    Each round calls the floor (our jit forward of the same batch, when given), ours, then the
    peer, so that load from other processes hits them alike; ``x_floor`` and the peer's ratio
    to ours come from the same rounds. ``slow``: the first call is also the only timed one
    (Score-CAM: seconds to minutes per call), with no floor. ``keep``: number of leading
    images whose outputs are kept for the agreement table.
    """
    # A slow call is timed while its memory is sampled: sample rarely (its working set is steady).
    interval = 0.02 if slow else 0.001
    m = Measure(ours.name)
    m.compile_s = ours.compile_s
    try:
        out, dt, m.peak_bytes = first_call(ours, on_gpu, interval)
        m.output = keep_first(ours.to_numpy(out), keep)
        if slow:
            m.times.append(dt)
    except Exception as e:
        m.error = f"{type(e).__name__}: {e}"
        return {ours.name: m}
    results = {ours.name: m}
    for peer in peers:
        results[peer.name] = measure_peer(peer, ours, m, floor, repeats, on_gpu, slow, keep, interval)
    if not m.times:
        floors, mine, _ = rounds(floor, ours, None, repeats)
        m.times.extend(mine)
        m.floor_times.extend(floors)
    if m.floor_times:
        m.x_floor = statistics.median(m.times) / statistics.median(m.floor_times)
    return results
