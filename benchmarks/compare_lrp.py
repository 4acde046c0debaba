"""gcj.lrp against zennit's composites, same weights, float64 on both sides.

Run from the peer environment (zennit needs torchvision)::

    /work/bench-venv/bin/python -m benchmarks.compare_lrp [--size 64] [--models vgg resnet18 resnet50]

For each model and composite (``EpsilonPlusFlat``, ``EpsilonGammaBox``) it prints the largest
difference between the two relevance maps relative to zennit's largest magnitude, and each
side's time (median of a few rounds; the machine is shared, so times are noisy — the agreement
column is the point). zennit runs on the torch module with its canonizers (batch norms merged
into the convolutions, ResNet's residual sums as ``Sum`` modules); gcj.lrp reads the Flax
model's jaxpr (a batch norm after a conv is part of that conv's layer; a residual add is split
in proportion). The relevance starts at the target's score on both sides (zennit's
``attr_output`` = one-hot * output). Exit status 1 when a difference exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import numpy as np

from . import harness

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import gradcam_jax as gcj  # noqa: E402
from gradcam_jax.models.resnet import resnet_for_torch, torch_state_dict_to_flax  # noqa: E402

TOL = 1e-4
NHWC = ("NHWC", "HWIO", "NHWC")


def vgg_pair(torch, seed: int):
    """A VGG-style net (conv-relu x2, max pool, conv-relu, global average pool, dense-relu-dense)."""
    torch.manual_seed(seed)
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
    ).double().eval()  # fmt: skip
    p = {k: v.detach().numpy() for k, v in net.state_dict().items()}

    def conv(x, i):
        y = jax.lax.conv_general_dilated(
            x, p[f"{i}.weight"].transpose(2, 3, 1, 0), (1, 1), "SAME", dimension_numbers=NHWC
        )
        return jax.nn.relu(y + p[f"{i}.bias"])

    def fn(x):
        h = conv(conv(x, 0), 2)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = conv(h, 5).mean((1, 2))
        h = jax.nn.relu(h @ p["9.weight"].T + p["9.bias"])
        return h @ p["11.weight"].T + p["11.bias"]

    return net, fn, []


def exact_resnet_canonizer():
    """zennit's ``ResNetCanonizer`` with each merged batch norm an exact identity.

    zennit 0.5.1's ``MergeBatchNorm`` folds a batch norm into the convolution before it and then
    means to leave the batch norm as the identity, but it only resets ``running_var`` to 1 and
    keeps ``eps``: the batch norm still divides by ``sqrt(1 + eps)`` (1 - 5e-6 for eps = 1e-5).
    The scale compounds over a ResNet's 20-53 batch norms and the relevance maps move by 3e-4 -
    6e-4 of their largest value. zennit's fix (chr5tphr/zennit pull request 240) sets the
    variance and ``eps`` to 0.5 each, so the batch norm is ``x / sqrt(1)``: done here.
    """
    from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    class ExactMergeBatchNorm(SequentialMergeBatchNorm):
        def register(self, linears, batch_norm):
            self.eps = batch_norm.eps
            super().register(linears, batch_norm)
            batch_norm.running_var.data = torch_full_like(batch_norm.running_var.data, 0.5)
            batch_norm.eps = 0.5

        def remove(self):
            super().remove()
            self.batch_norm.eps = self.eps

    def torch_full_like(t, v):
        return t.new_full(t.shape, v)

    return CompositeCanonizer(
        (ExactMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer())
    )


def resnet_pair(torch, torchvision, depth: int, seed: int):
    from .peers.torch_resnet import randomize_bn

    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    randomize_bn(net, seed=seed)
    net = net.double().eval()
    module = resnet_for_torch(net, dtype=jnp.float64)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), torch_state_dict_to_flax(net))
    # A partial, not a closure: the weights are traced, not constants for XLA to fold.
    return net, functools.partial(apply_flax, module, variables), [exact_resnet_canonizer()]


def apply_flax(module, variables, x):
    return module.apply(variables, x)


def zennit_lrp(torch, net, x_nhwc, target, composite):
    from zennit.attribution import Gradient

    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    with Gradient(model=net, composite=composite) as attributor:
        out = net(x).detach()
        onehot = torch.zeros_like(out)
        onehot[torch.arange(len(target)), torch.as_tensor(np.array(target))] = 1.0
        _, rel = attributor(x, onehot * out)
    return rel.detach().numpy().transpose(0, 2, 3, 1)


def compare(torch, net, fn, x, target, ours: str, composite, box, rounds: int):
    """``(max relative difference, gcj.lrp ms, zennit ms)`` for one model and composite."""
    ref = zennit_lrp(torch, net, x, target, composite)
    run = jax.jit(lambda v: gcj.lrp(fn, v, target, rules=ours, box=box))
    got = np.asarray(run(jnp.asarray(x)))
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    times = harness.time_round_robin(
        [lambda: run(jnp.asarray(x)), lambda: zennit_lrp(torch, net, x, target, composite)], rounds
    )
    return err, harness.median(times[0]) * 1e3, harness.median(times[1]) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["vgg", "resnet18", "resnet50"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    import torchvision
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 3))
    low, high = float(x.min()), float(x.max())
    rows, worst = [], 0.0
    for name in args.models:
        if name == "vgg":
            net, fn, canon = vgg_pair(torch, 0)
        else:
            net, fn, canon = resnet_pair(torch, torchvision, int(name.removeprefix("resnet")), 0)
        target = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1))
        composites = (
            ("EpsilonPlusFlat", "epsilon_plus_flat", EpsilonPlusFlat(canonizers=canon)),
            ("EpsilonGammaBox", "epsilon_gamma_box", EpsilonGammaBox(low=low, high=high, canonizers=canon)),
        )
        for label, ours, theirs in composites:
            err, ms_ours, ms_theirs = compare(
                torch, net, fn, x, target, ours, theirs, (low, high), args.rounds
            )
            worst = max(worst, err)
            rows.append([name, label, f"{err:.1e}", f"{ms_ours:.0f}", f"{ms_theirs:.0f}"])
    head = ["model", "composite", "max rel. diff", "gcj.lrp ms", "zennit ms"]
    print(f"float64, batch {args.batch}, {args.size} px; medians of {args.rounds} rounds, shared CPU (noisy)")
    print(harness.table(head, rows, align="llrrr", markdown=True))
    return 1 if worst > TOL else 0


if __name__ == "__main__":
    sys.exit(main())
