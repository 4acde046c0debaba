"""Throughput of Grad-CAM against the bare forward pass, on a random-weight Flax ResNet.

    python -m benchmarks.bench_throughput --batch 8 --size 224 --model resnet50 --dtype float32

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
import functools
import platform

import jax
import jax.numpy as jnp

import gradcam_jax as gcj
from gradcam_jax import models

from .harness import (
    DTYPES,
    RESNETS,
    compile_and_warm,
    median,
    paired_ratio,
    peak_memory,
    table,
    time_round_robin,
    xla_gflop,
    xla_temp_mib,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--model", choices=sorted(RESNETS), default="resnet50")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="compute dtype; parameters stay float32 (default float32)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed calls per method (default 10)")
    p.add_argument("--classes", type=int, default=10, help="K for the K-class measurement (default 10)")
    p.add_argument("--layer", default="stage4", help="tapped layer (default stage4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.classes < 1 or args.batch < 1:
        raise SystemExit("--repeats, --classes and --batch must be positive.")
    if args.classes > 1000:
        raise SystemExit("--classes must be at most the number of classes (1000).")
    return args


def build_rows(args):
    """(name, jitted function, arguments) per row; the first row is the floor."""
    model = RESNETS[args.model](num_classes=1000, dtype=DTYPES[args.dtype])
    kp, kx = jax.random.split(jax.random.key(args.seed))
    variables = models.init_resnet(model, kp, image_size=args.size)
    x = jax.random.normal(kx, (args.batch, args.size, args.size, 3), jnp.float32)
    tap = gcj.linen_tap(model, variables, args.layer)
    targets = list(range(args.classes))
    # The tap is a pytree holding the variables, so passing it as an argument keeps the weights
    # jit arguments exactly as in the forward floor (not constants baked into the program).
    return [
        ("forward (floor)", jax.jit(lambda v, x: model.apply(v, x)), (variables, x)),
        # Diagnostic: the forward that also returns the tapped activation, no gradient. Every
        # CAM method must materialise A; XLA:CPU may otherwise fuse the network's tail (last
        # blocks + pooling + head) into one kernel, which moves the plain forward's time.
        (f"forward + A at {args.layer}", jax.jit(lambda t, x: t(x)), (tap, x)),
        ("grad_cam, top class", jax.jit(lambda t, x: gcj.grad_cam(t, x)), (tap, x)),
        (
            f"grad_cam, K={args.classes} classes",
            jax.jit(lambda t, x: gcj.grad_cam(t, x, target=targets)),
            (tap, x),
        ),
    ]


def measure(rows, repeats):
    """Per row: (name, times, compile seconds, XLA GFLOP, XLA temp MiB), timed interleaved."""
    compiled = [compile_and_warm(fn, fn_args) for _, fn, fn_args in rows]
    calls = [functools.partial(c, *fn_args) for (c, _), (_, _, fn_args) in zip(compiled, rows, strict=True)]
    all_times = time_round_robin(calls, repeats)
    return [
        (name, times, compile_s, xla_gflop(c), xla_temp_mib(c))
        for (name, _, _), (c, compile_s), times in zip(rows, compiled, all_times, strict=True)
    ]


def report(args, results):
    _, floor_times, _, floor_flop, _ = results[0]
    floor = median(floor_times)
    head = (
        "method",
        "img/s",
        "ms/batch",
        "ratio to floor",
        "paired ratio",
        "min..max ms",
        "XLA GFLOP",
        "FLOP ratio",
        "XLA temp MiB",
        "compile s",
    )
    rows = []
    for name, times, compile_s, gflop, temp in results:
        med = median(times)
        # paired: the median over rounds of (this call / the forward call of the same round).
        rows.append(
            (
                name,
                f"{args.batch / med:.2f}",
                f"{med * 1e3:.2f}",
                f"{med / floor:.3f}x",
                f"{paired_ratio(times, floor_times):.3f}x",
                f"{min(times) * 1e3:.1f}..{max(times) * 1e3:.1f}",
                f"{gflop:.2f}",
                f"{gflop / floor_flop:.4f}x",
                f"{temp:.1f}",
                f"{compile_s:.1f}",
            )
        )
    print(table(head, rows, align="lrrrrrrrrr"))
    print()
    with_a, one, many = (median(r[1]) for r in results[1:4])
    k = args.classes
    print(
        f"grad_cam (top class) vs forward + A: {one / with_a:.3f}x -- the backward to the layer and "
        f"the map, without XLA's fusion choices for the plain forward"
    )
    print(
        f"K={k} classes vs 1 class: {many / one:.3f}x the time for {k}x the maps "
        f"({k * args.batch / many:.1f} maps/s vs {args.batch / one:.1f} maps/s)"
    )
    peak, what = peak_memory()
    print(f"peak memory: {peak / 2**20:.0f} MiB -- {what}")


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    rows = build_rows(args)
    print(
        f"device: {device.platform} / {device.device_kind} ({jax.device_count()} device(s)); "
        f"host: {platform.machine()}, jax {jax.__version__}"
    )
    print(
        f"model: {args.model}, tap: {args.layer!r}, batch {args.batch}, size {args.size}x{args.size}, "
        f"dtype {args.dtype} (params float32), repeats {args.repeats} (median, interleaved; "
        f"compile + 1 warm-up excluded)"
    )
    print()
    report(args, measure(rows, args.repeats))


if __name__ == "__main__":
    main()
