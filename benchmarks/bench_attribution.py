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


def with_heap_peak(call, peaks: list, slot: int):
    """``call`` whose every run records its peak live-heap growth (bytes) in ``peaks[slot]``."""

    def run():
        with harness.HeapPeak(interval=0.005) as heap:
            out = jax.block_until_ready(call())
        peaks[slot] = max(peaks[slot], heap.growth)
        return out

    return run


def ig_rows(torch, net, fn, x, target, steps: int, chunk: int, rounds: int):
    import captum.attr as captum_attr

    b = x.shape[0]
    xs = jnp.asarray(x)
    # called as a user would (no outer jit): on CPU the chunks run from Python over one jitted
    # chunk kernel; chunk_loop="device" is the same in one lax.scan inside one kernel

    def ig(v):
        return gcj.integrated_gradients(fn, v, target, steps=steps, chunk_size=chunk)

    def ig_scan(v):
        return gcj.integrated_gradients(fn, v, target, steps=steps, chunk_size=chunk, chunk_loop="device")

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
    tt = torch.as_tensor(np.array(target))
    cig = captum_attr.IntegratedGradients(net)
    # Captum's internal batch (images per forward+backward) tuned over a few sizes, none above
    # ours: a larger one only holds more activations (steps x B at once would not fit at 224 px).
    candidates = sorted({max(b, per * b // 2), per * b})
    tuning = []
    for ibs in candidates:

        def captum_call(ibs=ibs):
            return cig.attribute(xt, target=tt, n_steps=steps, internal_batch_size=ibs)

        tuning.append((harness.median(harness.time_round_robin([captum_call], 1)[0]), ibs))
    best_ibs = min(tuning)[1]
    print(
        "Captum internal_batch_size tuning (one call each, seconds): "
        + ", ".join(f"{i}: {t:.1f}" for t, i in tuning)
    )

    def captum_best():
        return cig.attribute(xt, target=tt, n_steps=steps, internal_batch_size=best_ibs)

    jax.block_until_ready((ig(xs), ig_scan(xs)))
    jax.block_until_ready(floor())
    peaks = [0.0, 0.0, 0.0, 0.0]
    runs = [floor, lambda: ig(xs), lambda: ig_scan(xs), captum_best]
    calls = [with_heap_peak(c, peaks, i) for i, c in enumerate(runs)]
    times = harness.time_round_robin(calls, rounds)
    secs = [harness.median(t) for t in times]
    gib = [f"{p / 2**30:.2f}" for p in peaks]
    rows = [
        (f"{steps} fwd+bwd (floor)", f"chunks of {per * b}"),
        ("gcj.integrated_gradients", f"chunk_size={chunk} (chunks from Python)"),
        ("gcj.integrated_gradients", f"chunk_size={chunk}, chunk_loop='device' (lax.scan)"),
        ("Captum IntegratedGradients", f"internal_batch_size={best_ibs}"),
    ]
    return [
        [name, setting, f"{secs[i]:.2f}", f"{harness.paired_ratio(times[0], times[i]):.2f}", gib[i]]
        for i, (name, setting) in enumerate(rows)
    ]


def scan_rows(fn, x, target, steps: int, chunk: int, rounds: int):
    """The same chunked forward+backward passes called from Python and inside one ``lax.scan``.

    IG's chunks run in a ``lax.scan`` (one compiled model, memory set by the chunk); on XLA:CPU
    the scan's body runs slower than the same program called once per chunk, and this measures
    by how much, with nothing of IG in it.
    """
    b = x.shape[0]
    per = max(1, chunk // b)
    xs = jnp.asarray(x)
    tgt = np.concatenate([target] * per)
    alphas = jnp.linspace(0.0, 1.0, per * -(-steps // per)).reshape(-1, per)

    def grads(a):
        points = (a[:, None, None, None, None] * xs[None]).reshape((-1,) + xs.shape[1:])
        return jax.grad(lambda u: jnp.sum(fn(u)[jnp.arange(len(tgt)), tgt]))(points)

    one = jax.jit(grads)
    shape = jax.eval_shape(grads, alphas[0])

    def scan(al, unroll):
        zeros = jnp.zeros(shape.shape, shape.dtype)
        return jax.lax.scan(lambda t, a: (t + grads(a), None), zeros, al, unroll=unroll)[0]

    scanned = jax.jit(functools.partial(scan, unroll=1))
    unrolled = jax.jit(functools.partial(scan, unroll=True))  # no while loop left: one long program

    def python_loop():
        return [one(a) for a in alphas]

    jax.block_until_ready((python_loop(), scanned(alphas), unrolled(alphas)))
    times = harness.time_round_robin([python_loop, lambda: scanned(alphas), lambda: unrolled(alphas)], rounds)
    return [
        [
            f"{len(alphas)} jitted calls from Python",
            f"chunks of {per * b}",
            f"{harness.median(times[0]):.2f}",
            "1.00",
        ],
        [
            "the same inside one lax.scan",
            f"chunks of {per * b}",
            f"{harness.median(times[1]):.2f}",
            f"{harness.paired_ratio(times[0], times[1]):.2f}",
        ],
        [
            "the same lax.scan, unroll=True",
            f"chunks of {per * b}",
            f"{harness.median(times[2]):.2f}",
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
    ap.add_argument(
        "--only",
        default="ig,lrp,xrai",
        help="comma-separated sections to run (ig, lrp, xrai, scan); default ig,lrp,xrai",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
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
    if "ig" in only:
        print(
            f"\nIntegrated Gradients, {args.steps} steps (ratio: floor time / this time = throughput "
            f"relative to the floor; peak heap: the live heap's peak growth during one call, GiB)"
        )
        rows = ig_rows(torch, net, fn, x, target, args.steps, args.chunk, args.rounds)
        print(harness.table([*head, "peak heap GiB"], rows, markdown=True))
    if "scan" in only:
        print(
            "\nThe same forward+backward chunks from Python and in one lax.scan "
            "(ratio: Python time / scan time)"
        )
        print(
            harness.table(head, scan_rows(fn, x, target, args.steps, args.chunk, args.rounds), markdown=True)
        )
    if "lrp" in only:
        print("\nLRP")
        print(harness.table(head, lrp_rows(torch, net, fn, x, target, args.rounds), markdown=True))
    if "xrai" in only:
        print("\nXRAI, one image (segmentation included on both sides)")
        print(harness.table(head, xrai_rows(fn, x, target, args.xrai_steps), markdown=True))
    print(f"\nprocess peak RSS: {harness.peak_memory()[0] / 2**30:.1f} GiB (all sections together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
