"""Throughput of deletion / insertion against the plain forward pass of the same model.

    python -m benchmarks.bench_metrics                       # 1,000 images x 50 steps, 32 x 32
    python -m benchmarks.bench_metrics --images 200 --steps 20 --repeats 1    # quicker

Deletion and insertion (Petsiuk et al. 2018) evaluate the model on ``images x (steps + 1)``
perturbed images. ``gradcam_jax.metrics`` builds every perturbed image on device inside the
loop that evaluates it, ``--chunk`` images per forward pass, so the cost should be that of the
forward passes alone. This script measures it, on a small random-weight CNN (3 conv layers,
32 -> 64 -> 128 channels, global average pool, 10 classes; about 20 MFLOP per 32 x 32 image):

  forward      jit: the model over the ``--images`` images, in ``lax.map`` chunks of ``--chunk``
               images -- the floor: images/s of plain forward passes
  deletion     ``metrics.deletion(fn, x, maps, target, n_steps=--steps, chunk_size=--chunk)``
  insertion    ``metrics.insertion(...)`` (its blurred canvas included)

Throughput counts forward-pass images: ``images`` for the forward, ``images x (steps + 1)``
for the curves. ``ratio = curve throughput / forward throughput`` (the target is >= 0.7).
Compilation and one warm-up call are excluded; each time is the median of ``--repeats``
rounds, the three measurements interleaved in each round so machine load hits them alike (a
call shorter than 2 s is repeated for at least 2 s within its round and timed per call).
Runs unchanged on CPU or GPU (whatever ``jax.devices()[0]`` is).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from gradcam_jax import metrics

from .harness import compile_and_warm, median, table, time_round_robin


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="deletion / insertion steps (default 50)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--chunk", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def small_cnn(key, classes=10):
    """Random-weight CNN: conv3x3(3->32) ReLU, conv3x3/2(32->64) ReLU, conv3x3/2(64->128) ReLU,
    global average pool, dense(128->classes). He-normal weights."""
    shapes = [(3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128)]
    keys = jax.random.split(key, len(shapes) + 1)
    params = {
        "convs": [
            jax.random.normal(k, s) * np.sqrt(2.0 / (9 * s[2]))
            for k, s in zip(keys[:-1], shapes, strict=True)
        ],
        "dense": jax.random.normal(keys[-1], (128, classes)) / np.sqrt(128),
    }
    strides = (1, 2, 2)

    def fn(x):
        for w, s in zip(params["convs"], strides, strict=True):
            x = jax.nn.relu(
                jax.lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            )
        return jnp.mean(x, axis=(1, 2)) @ params["dense"]

    return fn


def build_rows(args, fn, x, maps, target):
    """(name, jitted function, arguments, forward-pass images per call) per measurement."""
    n = args.images
    calls = -(-n // args.chunk)
    per = -(-n // calls)
    pad = calls * per - n

    @jax.jit
    def forward(x):  # the floor: the same chunked loop with nothing but the model in it
        xp = jnp.concatenate([x, x[:pad]]) if pad else x
        out = jax.lax.map(fn, xp.reshape((calls, per) + x.shape[1:]))
        return out.reshape(calls * per, -1)[:n]

    def curve(metric):
        return jax.jit(lambda x, m, t: metric(fn, x, m, t, n_steps=args.steps, chunk_size=args.chunk).auc)

    return [
        ("forward (floor)", forward, (x,), n),
        ("deletion", curve(metrics.deletion), (x, maps, target), n * (args.steps + 1)),
        ("insertion", curve(metrics.insertion), (x, maps, target), n * (args.steps + 1)),
    ]


def main(argv=None):
    args = parse_args(argv)
    if min(args.images, args.steps, args.chunk, args.repeats, args.size) < 1:
        raise SystemExit("all sizes must be positive")
    device = jax.devices()[0]
    kx, km, kp = jax.random.split(jax.random.key(args.seed), 3)
    fn = small_cnn(kp)
    n, s = args.images, args.size
    x = jax.random.normal(kx, (n, s, s, 3), jnp.float32)
    maps = jax.random.uniform(km, (n, s, s), jnp.float32)
    target = jnp.argmax(jax.jit(fn)(x), axis=-1)
    rows = build_rows(args, fn, x, maps, target)

    print(
        f"device: {device.platform} / {device.device_kind}; host: {platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}"
    )
    print(
        f"model: small CNN (3 conv + dense, random weights), {n} images of {s}x{s}x3, {args.steps} steps "
        f"({args.steps + 1} points per curve), chunk {args.chunk} images per forward, "
        f"{args.repeats} rounds (median; compile + 1 warm-up excluded)"
    )
    print()
    calls = []
    for name, f, fargs, _ in rows:
        t0 = time.perf_counter()
        compiled, _ = compile_and_warm(f, fargs)
        calls.append(functools.partial(compiled, *fargs))
        print(f"  compiled + warmed {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    # Short calls (the floor) are repeated for at least 2 s per round, so that timer resolution and
    # brief hiccups do not decide the ratio; the time kept is per call.
    times = time_round_robin(calls, args.repeats, min_seconds=2.0)
    print()
    floor_ips = rows[0][3] / median(times[0])
    ratios, cells = {}, []
    for (name, _, _, count), t in zip(rows, times, strict=True):
        med = median(t)
        ips = count / med
        ratios[name] = ips / floor_ips
        cells.append((name, f"{count:,}", f"{med:.2f}", f"{ips:,.0f}", f"{ratios[name]:.2f}"))
    print(
        table(
            ("measurement", "forward images", "seconds", "images/s", "ratio to forward"),
            cells,
            align="lrrrr",
            markdown=True,
        )
    )
    print()
    worst = min(ratios["deletion"], ratios["insertion"])
    print(
        f"deletion / insertion throughput = {worst:.2f}x the plain forward's (target >= 0.70): "
        f"{'PASS' if worst >= 0.7 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
