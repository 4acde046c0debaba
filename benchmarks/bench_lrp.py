"""LRP's cost against one forward+backward pass, per composite, side by side with zennit.

Run from the peer environment (zennit and torchvision are installed there)::

    /work/bench-venv/bin/python -m benchmarks.bench_lrp --depth 50 --batch 8 --size 224  # issue 14's setting
    /work/bench-venv/bin/python -m benchmarks.bench_lrp --depth 18 --batch 2 --size 64

Same weights on both sides: a torchvision-layout ResNet with random weights and randomised
batch-norm statistics (``benchmarks.bench_attribution.build``), float32. Rows:

* ``jax.grad``: one forward+backward pass of the target scores (the issue's unit);
* ``gcj.lrp`` with each composite: time / the gradient's time, paired within rounds;
* zennit's ``Gradient`` attributor with the same composite (``ResNetCanonizer``), same unit.

Next to each jitted program its count of convolutions and matrix products in the compiled HLO
(what the cost comes down to: z+ needs a second forward copy of each layer by definition).
Times are medians of ``--rounds`` interleaved rounds on a shared CPU: noisy, so quote the load.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj

from . import harness
from .bench_attribution import build

COMPOSITES = ("epsilon", "epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1")


def hlo_products(jitted, x) -> int:
    """Convolutions plus matrix products in the compiled program."""
    text = jitted.lower(x).compile().as_text()
    return len(re.findall(r"= \S+ (?:convolution|dot)\(", text))


def zennit_call(torch, net, x, target, name: str, box):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat

    from .compare_lrp import exact_resnet_canonizer

    make = {  # zennit has no plain-epsilon composite (Captum's default): no row for it
        "epsilon_plus_flat": lambda c: EpsilonPlusFlat(canonizers=c),
        "epsilon_plus": lambda c: EpsilonPlus(canonizers=c),
        "epsilon_gamma_box": lambda c: EpsilonGammaBox(low=box[0], high=box[1], canonizers=c),
        "epsilon_alpha2_beta1": lambda c: EpsilonAlpha2Beta1(canonizers=c),
    }.get(name)
    if make is None:
        return None
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    composite = make([exact_resnet_canonizer()])

    def call():
        with Gradient(model=net, composite=composite) as attributor:
            out = net(xt).detach()
            onehot = torch.zeros_like(out)
            onehot[torch.arange(len(target)), torch.as_tensor(np.array(target))] = 1.0
            return attributor(xt, onehot * out)[1]

    return call


def run_lrp(fn, target, name: str, box, v):
    return gcj.lrp(fn, v, target, rules=name, box=box)


def rows(torch, net, fn, x, target, composites, rounds: int, zennit: list[str]):
    xs = jnp.asarray(x)
    box = (float(x.min()), float(x.max()))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(fn(v)[jnp.arange(len(target)), target])))
    calls: list[Callable[[], Any]] = [lambda: grad(xs)]
    labels = [("jax.grad (one fwd+bwd)", "")]
    counts: list[int | None] = [hlo_products(grad, xs)]
    for name in composites:
        lrp = jax.jit(functools.partial(run_lrp, fn, target, name, box))
        jax.block_until_ready(lrp(xs))
        calls.append(functools.partial(lrp, xs))
        labels.append(("gcj.lrp", name))
        counts.append(hlo_products(lrp, xs))
        theirs = zennit_call(torch, net, x, target, name, box) if name in zennit else None
        if theirs is not None:
            calls.append(theirs)
            labels.append(("zennit", name))
            counts.append(None)
    jax.block_until_ready(grad(xs))
    times = harness.time_round_robin(calls, rounds)
    out = []
    for (who, name), t, n in zip(labels, times, counts, strict=True):
        ratio = harness.paired_ratio(t, times[0])
        out.append([who, name, f"{harness.median(t):.3f}", f"{ratio:.2f}x", "" if n is None else str(n)])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--composites", nargs="+", default=list(COMPOSITES), choices=COMPOSITES)
    ap.add_argument(
        "--zennit", nargs="*", default=None, choices=COMPOSITES, help="composites zennit runs (default: all)"
    )
    args = ap.parse_args(argv)
    import torch

    net, fn = build(torch, args.depth)
    x = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    target = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1))
    print(
        f"ResNet-{args.depth}, batch {args.batch}, {args.size} px, float32, {jax.devices()[0].platform}, "
        f"torch {torch.get_num_threads()} threads; medians of {args.rounds} interleaved rounds on a shared "
        f"CPU (noisy); ratios = time / jax.grad's, paired within rounds"
    )
    head = ["method", "composite", "seconds", "ratio", "convs + dots (HLO)"]
    zennit = list(COMPOSITES) if args.zennit is None else args.zennit
    table = rows(torch, net, fn, x, target, args.composites, args.rounds, zennit)
    print(harness.table(head, table, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
