"""Throughput of Grad-CAM against the bare forward pass, on a random-weight Flax ResNet.

    python benchmarks/bench_throughput.py --batch 8 --size 224 --model resnet50 --dtype float32

Measures, in one run, each function jit-compiled, compilation and a warm-up call excluded,
the median over ``--repeats`` timed calls (the methods interleaved, one call of each per
round, so that load from other processes hits them alike):

  forward        jax.jit(lambda v, x: model.apply(v, x))        -- the floor
  forward + A    jax.jit(lambda t, x: t(x))                     -- also returns the activation
  grad_cam       jax.jit(lambda t, x: gcj.grad_cam(t, x))       -- top class, tap at stage4
  grad_cam K=..  the same with target=list(range(K))            -- K maps per image

and prints img/s, ms/batch, the ratio to the forward (also paired per round), XLA's FLOP count
and scratch memory per call, the K-class cost relative to one class, and the peak memory: the
accelerator's peak bytes in use when the device reports them, else the process's peak RSS.
Runs unchanged on CPU or GPU (whatever ``jax.devices()[0]`` is).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time

from pathlib import Path

import jax
import jax.numpy as jnp

try:
    import gradcam_jax as gcj
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import gradcam_jax as gcj
from gradcam_jax import models

MODELS = {name: getattr(models, name) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype; parameters stay float32 (default float32)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per method (default 10)")
    p.add_argument("--classes", type=int, default=10, help="K for the K-class measurement (default 10)")
    p.add_argument("--layer", default="stage4", help="tapped layer (default stage4)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def compile_and_warm(fn, args):
    """AOT-compile ``fn`` for ``args`` and run it once. Returns (compiled, compile seconds)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up: first-call allocations, thread pools
    return compiled, compile_s


def time_round_robin(calls, repeats):
    """Time ``repeats`` rounds of every ``(compiled, args)``, interleaved.

    Interleaving makes a slow spell (another process on a shared machine, clock changes) hit
    every method alike instead of whichever happened to run during it, so the ratios, which
    are what the benchmark is about, stay fair. Returns one list of seconds per call.
    """
    times = [[] for _ in calls]
    for _ in range(repeats):
        for i, (compiled, args) in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[i].append(time.perf_counter() - t)
    return times


def temp_mib(compiled):
    """XLA's scratch memory for one call of a compiled function (MiB), when it says."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # not every backend/version implements it
        return float("nan")


def xla_gflop(compiled):
    """XLA's own count of floating-point operations per call (GFLOP), when it says.

    Unlike wall time this does not move with machine load, so its ratio to the forward's says
    how much work Grad-CAM adds, even where the timings are noisy.
    """
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost["flops"] / 1e9
    except Exception:
        return float("nan")


def peak_memory():
    """(bytes, what was measured)."""
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


def main(argv=None):
    args = parse_args(argv)
    if args.repeats < 1 or args.classes < 1 or args.batch < 1:
        raise SystemExit("--repeats, --classes and --batch must be positive.")
    if args.classes > 1000:
        raise SystemExit("--classes must be at most the number of classes (1000).")
    dtype = DTYPES[args.dtype]
    device = jax.devices()[0]

    model = MODELS[args.model](num_classes=1000, dtype=dtype)
    kp, kx = jax.random.split(jax.random.key(args.seed))
    variables = models.init_resnet(model, kp, image_size=args.size)
    x = jax.random.normal(kx, (args.batch, args.size, args.size, 3), jnp.float32)
    tap = gcj.linen_tap(model, variables, args.layer)
    k = args.classes
    targets = list(range(k))

    # The tap is a pytree holding the variables, so passing it as an argument keeps the weights
    # jit arguments exactly as in the forward floor (not constants baked into the program).
    rows = [
        ("forward (floor)", jax.jit(lambda v, x: model.apply(v, x)), (variables, x)),
        # Diagnostic: the forward that also returns the tapped activation, no gradient. Every
        # CAM method must materialise A; XLA:CPU may otherwise fuse the network's tail (last
        # blocks + pooling + head) into one kernel, which moves the plain forward's time.
        (f"forward + A at {args.layer}", jax.jit(lambda t, x: t(x)), (tap, x)),
        ("grad_cam, top class", jax.jit(lambda t, x: gcj.grad_cam(t, x)), (tap, x)),
        (f"grad_cam, K={k} classes", jax.jit(lambda t, x: gcj.grad_cam(t, x, target=targets)), (tap, x)),
    ]

    print(f"device: {device.platform} / {device.device_kind} ({jax.device_count()} device(s)); "
          f"host: {platform.machine()}, jax {jax.__version__}")
    print(f"model: {args.model}, tap: {args.layer!r}, batch {args.batch}, size {args.size}x{args.size}, "
          f"dtype {args.dtype} (params float32), repeats {args.repeats} (median, interleaved; compile + 1 warm-up excluded)")
    print()

    compiled = [compile_and_warm(fn, fn_args) for _, fn, fn_args in rows]
    all_times = time_round_robin([(c, fn_args) for (c, _), (_, _, fn_args) in zip(compiled, rows)],
                                 args.repeats)
    results = [(name, statistics.median(times), times, compile_s, xla_gflop(c), temp_mib(c))
               for (name, _, _), (c, compile_s), times in zip(rows, compiled, all_times)]

    floor, floor_times, floor_flop = results[0][1], results[0][2], results[0][4]
    header = (f"{'method':<24} | {'img/s':>7} | {'ms/batch':>9} | {'ratio to floor':>14} | "
              f"{'paired ratio':>12} | {'min..max ms':>15} | {'XLA GFLOP':>9} | {'FLOP ratio':>10} | "
              f"{'XLA temp MiB':>12} | {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for name, med, times, compile_s, gflop, temp in results:
        spread = f"{min(times) * 1e3:.1f}..{max(times) * 1e3:.1f}"
        # Median over rounds of (this call / the forward call of the same round): the two ran
        # back to back, so a slow spell mostly cancels out.
        paired = statistics.median(t / f for t, f in zip(times, floor_times))
        print(f"{name:<24} | {args.batch / med:>7.2f} | {med * 1e3:>9.2f} | {med / floor:>13.3f}x | "
              f"{paired:>11.3f}x | {spread:>15} | {gflop:>9.2f} | {gflop / floor_flop:>9.4f}x | "
              f"{temp:>12.1f} | {compile_s:>9.1f}")
    print()
    with_a, one, many = results[1][1], results[2][1], results[3][1]
    print(f"grad_cam (top class) vs forward + A: {one / with_a:.3f}x -- the backward to the layer and "
          f"the map, without XLA's fusion choices for the plain forward")
    print(f"K={k} classes vs 1 class: {many / one:.3f}x the time for {k}x the maps "
          f"({k * args.batch / many:.1f} maps/s vs {args.batch / one:.1f} maps/s)")
    peak, what = peak_memory()
    print(f"peak memory: {peak / 2**20:.0f} MiB -- {what}")


if __name__ == "__main__":
    main()
