"""bench_cpu_ops: the convolutions of a forward pass, one by one, XLA:CPU against torch (op profile).

Every convolution of the model's forward pass (read from its jaxpr, traced with plain
``lax.conv_general_dilated``), grouped by shape, timed three ways in interleaved rounds:
XLA's convolution (the models before the CPU rewrites), ``gradcam_jax.models._convs``'
``conv_general_dilated`` (after: depthwise as taps, small maps as im2col), and torch's eager
``F.conv2d`` on the same shapes (NCHW, the layout torch's CPU kernels are written for). Each row
gives the median milliseconds and GFLOP/s (2 multiply-adds per weight per output position) and,
multiplied by how often the shape occurs, each kind's share of the forward pass.

    /work/bench-venv/bin/python -m benchmarks.bench_cpu_ops --model efficientnet_lite0 --size 224 --batch 8

``--backward`` times the depthwise convolutions' input gradients instead (what Guided Backprop
and every gradient method pull through the model): the rewrite's forward pass, its input
gradient as ``jax.grad`` transposes the plain tap sum (``_depthwise.tap_sum``, the code before
``depthwise_taps`` had its own rule), the same with the rule (the polyphase tap sum), and
torch's forward and ``autograd.grad`` input gradient, with each side's backward / forward ratio.
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
from gradcam_jax.models._depthwise import depthwise_taps, tap_sum

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


def backward_calls(key, torch, rng):
    """The timed calls of one depthwise shape's forward pass and input gradient, ours and torch's."""
    lhs, rhs, strides, padding, groups = key
    x = jnp.asarray(rng.standard_normal(lhs).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(rhs).astype(np.float32))
    ct = jnp.asarray(rng.standard_normal(tap_sum(x, w, strides, padding).shape).astype(np.float32))
    fwd = jax.jit(lambda x, w: depthwise_taps(x, w, strides, padding)).lower(x, w).compile()

    def input_grad(conv):
        fn = jax.jit(lambda x, w, ct: jax.vjp(lambda x: conv(x, w, strides, padding), x)[1](ct))
        return fn.lower(x, w, ct).compile()

    before, after = input_grad(tap_sum), input_grad(depthwise_taps)
    calls = {"fwd": lambda: fwd(x, w)}
    calls.update({"dx before": lambda: before(x, w, ct), "dx after": lambda: after(x, w, ct)})
    if torch is not None:
        f = torch.nn.functional
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
        ctt = torch.from_numpy(np.asarray(ct).transpose(0, 3, 1, 2).copy())
        pads = [padding[1][0], padding[1][1], padding[0][0], padding[0][1]]

        def torch_fwd():
            with torch.no_grad():
                return f.conv2d(f.pad(xt, pads), wt, stride=strides, groups=groups)

        def torch_dx():
            y = f.conv2d(f.pad(xt, pads), wt, stride=strides, groups=groups)
            return torch.autograd.grad(y, xt, ctt)[0]

        calls.update({"torch fwd": torch_fwd, "torch dx": torch_dx})
    return calls


def backward_rows(convs, torch, repeats, rng):
    """Rows of :func:`backward_calls` per depthwise shape, and the per-forward-pass totals."""
    rows, totals = [], collections.defaultdict(float)
    for key, count in sorted(convs.items(), key=lambda kv: kv[0][0]):
        lhs, rhs, strides, _, groups = key
        if groups == 1:
            continue
        calls = backward_calls(key, torch, rng)
        for c in calls.values():
            jax.block_until_ready(c())
        med = {k: statistics.median(v) for k, v in time_rounds(calls, repeats).items()}
        for k, v in med.items():
            totals[k] += v * count
        cells = [f"{rhs[0]}x{rhs[1]}", "x".join(map(str, lhs)), strides[0], count]
        cells += [f"{med[k] * 1e3:.2f}" for k in calls]
        cells += [f"{med['dx before'] / med['fwd']:.2f}", f"{med['dx after'] / med['fwd']:.2f}"]
        if "torch dx" in med:
            cells.append(f"{med['torch dx'] / med['torch fwd']:.2f}")
        rows.append(cells)
        print(" | ".join(map(str, cells)), flush=True)
    names = list(calls)
    head = ["kernel", "input NHWC", "stride", "times", *(f"{n} ms" for n in names)]
    head += ["dx before / fwd", "dx after / fwd", *(["torch dx / fwd"] if "torch dx" in names else [])]
    summary = [f"{totals[n] * 1e3:.1f}" for n in names]
    return head, rows, names, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0", choices=list(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="depthwise input gradients (see the module)")
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
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {pair.label} {args.size} px batch "
        f"{args.batch}; {args.threads} threads; load average "
        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    if args.backward:
        head, rows, names, summary = backward_rows(convs, peers.torch, args.repeats, rng)
        out = [header, "", table(head, rows, markdown=True), ""]
        out.append("Depthwise layers, times x occurrences (ms):")
        out += ["", table(names, [summary], markdown=True)]
        print("\n".join(out))
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write("\n".join(out) + "\n")
        return
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
