"""Attribution throughput: Integrated Gradients against its floor and Captum, LRP against one
forward+backward and zennit, XRAI against PAIR ``saliency``.

Run from the peer environment (Captum, zennit and PAIR ``saliency`` installed there)::

    /work/bench-venv/bin/python -m benchmarks.bench_attribution [--depth 50] [--batch 8] [--size 224]

Same weights on every side: a torchvision-layout ResNet (``benchmarks.peers.torch_resnet``,
random weights, batch-norm statistics randomised) ported to ``gradcam_jax.models.ResNet``.
Rows (times are medians of ``--rounds`` interleaved rounds on a shared CPU — noisy; the ratios
are paired within rounds):

* ``floor``: ``steps`` batched forward+backward passes (one jitted ``vjp`` over ``steps x B``
  images, in the same chunks as IG) — what IG cannot beat;
* ``gcj.integrated_gradients``: the same steps, ratio = floor time / IG time (throughput);
* Captum ``IntegratedGradients`` with ``internal_batch_size`` tuned (the best of a few);
* ``gcj.lrp`` (``epsilon_plus_flat``) against one forward+backward, and zennit's
  ``EpsilonPlusFlat`` (ResNetCanonizer);
* ``gcj.xrai`` against PAIR's ``XRAI`` (its IG steps one call at a time), per image.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax.models.resnet import resnet_for_torch, torch_state_dict_to_flax

from . import harness


def build(torch, depth: int):
    from .peers.torch_resnet import ResNet, randomize_bn

    torch.manual_seed(0)
    net = randomize_bn(ResNet(depth)).eval()
    module = resnet_for_torch(net)
    variables = jax.tree_util.tree_map(jnp.asarray, torch_state_dict_to_flax(net))
    # A partial, not a closure: the weights are traced arguments of every jitted call, not constants.
    return net, functools.partial(apply_resnet, module, variables)


def apply_resnet(module, variables, x):
    return module.apply(variables, x)


def ig_rows(torch, net, fn, x, target, steps: int, chunk: int, rounds: int):
    import captum.attr as captum_attr

    b = x.shape[0]
    xs = jnp.asarray(x)
    ig = jax.jit(lambda v: gcj.integrated_gradients(fn, v, target, steps=steps, chunk_size=chunk))
    per = max(1, chunk // b)
    big = jnp.concatenate([xs] * per)
    tgt = np.concatenate([target] * per)

    def floor_chunk(v):
        return jax.grad(lambda u: jnp.sum(fn(u)[jnp.arange(len(tgt)), tgt]))(v)

    floor_fn = jax.jit(floor_chunk)
    calls_per_ig = -(-steps // per)

    def floor():
        return [floor_fn(big) for _ in range(calls_per_ig)]

    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    cig = captum_attr.IntegratedGradients(net)
    best, best_ibs = None, None
    for ibs in sorted({b * 8, b * 16, b * steps}):

        def captum_call(ibs=ibs):
            return cig.attribute(xt, target=torch.as_tensor(target), n_steps=steps, internal_batch_size=ibs)

        t = harness.median(harness.time_round_robin([captum_call], 1)[0])
        if best is None or t < best:
            best, best_ibs = t, ibs

    def captum_best():
        return cig.attribute(xt, target=torch.as_tensor(target), n_steps=steps, internal_batch_size=best_ibs)

    jax.block_until_ready(ig(xs))
    jax.block_until_ready(floor())
    times = harness.time_round_robin([floor, lambda: ig(xs), captum_best], rounds)
    t_floor, t_ig, t_cap = (harness.median(t) for t in times)
    return [
        [f"{steps} fwd+bwd (floor)", f"chunks of {per * b}", f"{t_floor:.2f}", "1.00"],
        [
            "gcj.integrated_gradients",
            f"chunk_size={chunk}",
            f"{t_ig:.2f}",
            f"{harness.paired_ratio(times[0], times[1]):.2f}",
        ],
        [
            "Captum IntegratedGradients",
            f"internal_batch_size={best_ibs}",
            f"{t_cap:.2f}",
            f"{harness.paired_ratio(times[0], times[2]):.2f}",
        ],
    ]


def lrp_rows(torch, net, fn, x, target, rounds: int):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    xs = jnp.asarray(x)
    lrp = jax.jit(lambda v: gcj.lrp(fn, v, target, rules="epsilon_plus_flat"))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(fn(v)[jnp.arange(len(target)), target])))
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)

    def zennit():
        with Gradient(model=net, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
            out = net(xt).detach()
            onehot = torch.zeros_like(out)
            onehot[torch.arange(len(target)), torch.as_tensor(np.array(target))] = 1.0
            return attributor(xt, onehot * out)[1]

    jax.block_until_ready((lrp(xs), grad(xs)))
    times = harness.time_round_robin([lambda: grad(xs), lambda: lrp(xs), zennit], rounds)
    t_grad, t_lrp, t_z = (harness.median(t) for t in times)
    return [
        ["one fwd+bwd (jax.grad)", "", f"{t_grad:.3f}", "1.00"],
        [
            "gcj.lrp",
            "epsilon_plus_flat",
            f"{t_lrp:.3f}",
            f"{harness.paired_ratio(times[1], times[0]):.2f}x the fwd+bwd",
        ],
        [
            "zennit",
            "EpsilonPlusFlat",
            f"{t_z:.3f}",
            f"{harness.paired_ratio(times[2], times[0]):.2f}x the fwd+bwd",
        ],
    ]


def xrai_rows(fn, x, target, steps: int):
    import saliency.core as pair

    grad = jax.jit(lambda v, c: jax.grad(lambda u: jnp.sum(fn(u)[:, c]))(v))

    def call_model(c):
        def call(xb, call_model_args=None, expected_keys=None):
            return {pair.base.INPUT_OUTPUT_GRADIENTS: np.asarray(grad(jnp.asarray(xb, jnp.float32), c))}

        return call

    img = np.asarray(x[:1])
    params = pair.XRAIParameters(steps=steps)

    def ours():
        return gcj.xrai(fn, img, target[:1], steps=steps)

    def theirs():
        return pair.XRAI().GetMask(img[0], call_model(int(target[0])), extra_parameters=params)

    jax.block_until_ready(ours())
    theirs()
    times = harness.time_round_robin([ours, theirs], 1)
    return [
        ["gcj.xrai", f"IG {steps} steps x 2 baselines", f"{times[0][0]:.2f}", "1.00"],
        [
            "PAIR XRAI",
            f"IG {steps} steps x 2 baselines",
            f"{times[1][0]:.2f}",
            f"{times[1][0] / times[0][0]:.2f}x gcj",
        ],
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, help="IG chunk_size (images per step)")
    ap.add_argument("--xrai-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, fn = build(torch, args.depth)
    x = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    target = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1))
    print(
        f"ResNet-{args.depth}, batch {args.batch}, {args.size} px, float32, {jax.devices()[0].platform}; "
        f"medians of {args.rounds} interleaved rounds on a shared CPU (noisy); ratios paired within rounds"
    )
    head = ["method", "setting", "seconds", "ratio"]
    print("\nIntegrated Gradients (ratio: floor time / this time = throughput relative to the floor)")
    print(
        harness.table(
            head, ig_rows(torch, net, fn, x, target, args.steps, args.chunk, args.rounds), markdown=True
        )
    )
    print("\nLRP")
    print(harness.table(head, lrp_rows(torch, net, fn, x, target, args.rounds), markdown=True))
    print("\nXRAI, one image (segmentation included on both sides)")
    print(harness.table(head, xrai_rows(fn, x, target, args.xrai_steps), markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
