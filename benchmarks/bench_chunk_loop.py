"""bench_chunk_loop: the chunked explainers' two chunk loops (``chunk_loop=``) timed side by side.

For each method on EfficientNet-Lite0 (``gcj.zoo`` weights), in interleaved rounds: the call
compiled under ``jit`` with ``chunk_loop="device"`` (one program, the chunks in a ``lax.map`` /
``lax.scan``), the same called eagerly, and the eager call with ``chunk_loop="host"`` (the
chunks from Python over one jitted chunk kernel). The table gives medians and the paired ratio
(median over rounds of device time / host time: above 1, the host loop is faster) — the
measurement behind each method's ``Stages.auto_host`` (whether ``"auto"`` picks the host loop
on a CPU)::

    python -m benchmarks.bench_chunk_loop --threads 1
    python -m benchmarks.bench_chunk_loop --threads 1 --methods score_cam --top-n 256 --rounds 7
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj

from .harness import median, paired_ratio, table, time_round_robin
from .peers.environment import Peers
from .peers.models import build_lite0, make_images
from .peers.options import limit_xla_threads

METHODS = ["score_cam", "ablation_cam", "occlusion", "rise", "integrated_gradients"]


def explain(method, args, loop, tap, variables, x, t):
    """``method`` with ``chunk_loop=loop`` (the model's weights passed in, never baked in)."""
    kw = {"chunk_size": args.chunk, "chunk_loop": loop}
    if method == "score_cam":
        return gcj.score_cam(tap, x, t, top_n=args.top_n, **kw)
    if method == "ablation_cam":
        return gcj.ablation_cam(tap, x, t, **kw)
    # A partial, not a closure: the explainers see its weights as leaves (a closure's would be
    # baked into the eager calls' programs as constants, unlike the jitted call's).
    model = functools.partial(args.module.apply, variables)

    if method == "occlusion":
        return gcj.occlusion(model, x, t, window=16, stride=8, **kw)
    if method == "rise":
        return gcj.rise(model, x, t, key=jax.random.key(0), n_masks=args.steps, **kw)
    kw["chunk_size"] = args.ig_chunk
    return gcj.integrated_gradients(model, x, t, steps=args.steps, **kw)


def measure(method, pair, x, t, args):
    """Times ``[device jit, device eager, host eager]``, their paired ratios to the first, and the
    host result's largest difference from the device one (relative to its largest value)."""
    inputs = (pair.tap, pair.variables, x, t)
    with jax.default_matmul_precision("highest"):
        device = jax.jit(functools.partial(explain, method, args, "device")).lower(*inputs).compile()
        calls = [
            lambda: device(*inputs),
            lambda: explain(method, args, "device", *inputs),
            lambda: explain(method, args, "host", *inputs),
        ]
        outs = [np.asarray(jax.block_until_ready(c())) for c in calls]  # compile, warm up
        times = time_round_robin(calls, args.rounds)
    diff = float(np.abs(outs[2] - outs[0]).max() / max(np.abs(outs[0]).max(), 1e-30))
    return times, [paired_ratio(times[0], ts) for ts in times], diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64, help="chunk_size of the perturbation methods")
    p.add_argument("--ig-chunk", type=int, default=16, help="chunk_size of integrated_gradients")
    p.add_argument("--steps", type=int, default=32, help="IG steps, RISE masks")
    p.add_argument("--top-n", type=int, default=256, help="Score-CAM's channels (Lite0 has 1280)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="XLA:CPU threads (PJRT_NPROC)")
    args = p.parse_args(argv)
    limit_xla_threads(args.threads)
    pair = build_lite0("float32", Peers(disabled=True), "cpu", 0)
    args.module = pair.module
    x = jnp.asarray(pair.preprocess(make_images(args.batch, args.size, 0)))
    t = jnp.asarray(np.asarray(jax.jit(pair.module.apply)(pair.variables, x)).argmax(-1).astype(np.int32))
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__}, {args.threads} "
        f"XLA thread(s); EfficientNet-Lite0 {args.size} px, batch {args.batch}; load average "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    rows = []
    for method in args.methods.split(","):
        times, ratios, diff = measure(method, pair, x, t, args)
        rows.append(
            [method, *(f"{median(ts) * 1e3:.1f}" for ts in times), f"{ratios[2]:.2f}x", f"{diff:.1e}"]
        )
        print(" | ".join(rows[-1]), f"(load {os.getloadavg()[0]:.1f})", flush=True)
    head = [
        "method",
        "device, jit ms",
        "device, eager ms",
        "host, eager ms",
        "host speed-up",
        "max rel. diff",
    ]
    print(table(head, rows, markdown=True))


if __name__ == "__main__":
    main()
