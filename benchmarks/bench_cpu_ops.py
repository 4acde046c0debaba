"""bench_cpu_ops: the convolutions of a forward pass, one by one, XLA:CPU against torch (op profile).

Every convolution of the model's forward pass (read from its jaxpr, traced with plain
``lax.conv_general_dilated``), grouped by shape, timed three ways in interleaved rounds:
XLA's convolution (the models before the CPU rewrites), ``gradcam_jax.models._convs``'
``conv_general_dilated`` (after: depthwise as taps, small maps as im2col), and torch's eager
``F.conv2d`` on the same shapes (NCHW, the layout torch's CPU kernels are written for). Each row
gives the median milliseconds and GFLOP/s (2 multiply-adds per weight per output position) and,
multiplied by how often the shape occurs, each kind's share of the forward pass.

    /work/bench-venv/bin/python -m benchmarks.bench_cpu_ops --model efficientnet_lite0 --size 224 --batch 8
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradcam_jax.models._convs import conv_general_dilated

from .bench_cpu import MODELS, before_rewrites, time_rounds
from .harness import table
from .peers.environment import Peers
from .peers.options import limit_xla_threads


def model_convs(pair, x):
    """``Counter`` of ``(lhs shape, rhs shape, strides, padding, groups)`` over the forward's convolutions."""
    with before_rewrites():
        jaxpr = jax.make_jaxpr(pair.module.apply)(pair.variables, x)
    found: collections.Counter = collections.Counter()

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                pads = tuple(map(tuple, p["padding"]))
                found[(lhs, rhs, tuple(p["window_strides"]), pads, p["feature_group_count"])] += 1
            for value in eqn.params.values():  # nested jaxprs (pjit, custom_jvp, ...)
                if hasattr(value, "eqns"):
                    walk(value)
                elif hasattr(getattr(value, "jaxpr", None), "eqns"):
                    walk(value.jaxpr)

    walk(jaxpr.jaxpr)
    return found


def kind(lhs, rhs, groups):
    kh, kw = rhs[0], rhs[1]
    if groups > 1:
        return f"depthwise {kh}x{kw}"
    if kh * kw == 1:
        return "pointwise 1x1"
    return f"dense {kh}x{kw}"


def op_calls(key, torch, rng):
    """The three timed calls of one convolution shape."""
    lhs, rhs, strides, padding, groups = key
    x = jnp.asarray(rng.standard_normal(lhs).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(rhs).astype(np.float32))
    dn = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
    kwargs = {"dimension_numbers": dn, "feature_group_count": groups}
    xla = (
        jax.jit(lambda x, w: lax.conv_general_dilated(x, w, strides, padding, **kwargs)).lower(x, w).compile()
    )
    ours = jax.jit(lambda x, w: conv_general_dilated(x, w, strides, padding, **kwargs)).lower(x, w).compile()
    calls = {"XLA conv": lambda: xla(x, w), "rewritten": lambda: ours(x, w)}
    if torch is not None:
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
        pads = [padding[1][0], padding[1][1], padding[0][0], padding[0][1]]  # F.pad: W then H
        f = torch.nn.functional

        def torch_conv():
            with torch.no_grad():
                return f.conv2d(f.pad(xt, pads), wt, stride=strides, groups=groups)

        calls["torch"] = torch_conv
    flops = 2 * int(np.prod(xla(x, w).shape)) * rhs[0] * rhs[1] * rhs[2]
    return calls, flops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0", choices=list(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    limit_xla_threads(args.threads)
    peers = Peers(disabled=True)
    if peers.torch is not None:
        peers.torch.set_num_threads(args.threads)
    pair = MODELS[args.model]("float32", peers, "cpu", 0)
    x = jnp.zeros((args.batch, args.size, args.size, 3), jnp.float32)
    convs = model_convs(pair, x)
    rng = np.random.default_rng(0)
    rows, totals = [], collections.defaultdict(lambda: collections.defaultdict(float))
    for key, count in sorted(convs.items(), key=lambda kv: (kind(kv[0][0], kv[0][1], kv[0][4]), kv[0][0])):
        calls, flops = op_calls(key, peers.torch, rng)
        for c in calls.values():
            jax.block_until_ready(c())
        med = {k: statistics.median(v) for k, v in time_rounds(calls, args.repeats).items()}
        lhs, rhs, strides, _, groups = key
        label = kind(lhs, rhs, groups)
        for k, v in med.items():
            totals[label][k] += v * count
        cells = [label, "x".join(map(str, lhs)), f"{rhs[2] * groups}->{rhs[3]}", strides[0], count]
        cells += [f"{med[k] * 1e3:.2f} ({flops / med[k] / 1e9:.1f})" for k in calls]
        rows.append(cells)
        print(" | ".join(map(str, cells)), flush=True)
    names = list(calls)
    head = ["kind", "input NHWC", "channels", "stride", "times", *(f"{n} ms (GFLOP/s)" for n in names)]
    summary = [[label, *(f"{t[n] * 1e3:.1f}" for n in names)] for label, t in totals.items()]
    all_ = [f"{sum(t[n] for t in totals.values()) * 1e3:.1f}" for n in names]
    summary.append(["all convolutions", *all_])
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {pair.label} {args.size} px batch "
        f"{args.batch}; {args.threads} threads; load average "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    out = [
        header,
        "",
        table(head, rows, markdown=True),
        "",
        "Per kind, times x occurrences (ms per forward pass):",
        "",
    ]
    out.append(table(["kind", *names], summary, markdown=True))
    print("\n".join(out))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
