"""Guided Backprop and Guided Grad-CAM throughput next to the forward+backward floor.

    python -m benchmarks.bench_guided --batch 8 --size 224 --model resnet50

In one run, every function jit-compiled, compilation and a warm-up call excluded, the median
of ``--repeats`` timed rounds (the rows interleaved, one call each per round):

  forward+backward  jax.jit(jax.grad of the class score w.r.t. the input)   -- the floor
  guided_backprop   gcj.guided_backprop (every ReLU swapped by the jaxpr rewrite)
  guided_grad_cam   gcj.guided_grad_cam at stage4
  grad_cam          gcj.grad_cam at stage4, for reference

With ``--captum`` (and torch + captum importable) Captum's ``GuidedBackprop`` and
``GuidedGradCam`` run on the same architecture (a hand-written torchvision-layout ResNet),
same batch and size, and their images/s are printed beside ours with the ratio (each timed on
its own after a warm-up call, not interleaved with ours).
Target: Guided Grad-CAM at most 1.1x Guided Backprop alone.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import gradcam_jax as gcj

from .harness import (
    DTYPES,
    RESNETS,
    compile_and_warm,
    median,
    peak_memory,
    table,
    time_round_robin,
    timed_call,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--model", choices=sorted(RESNETS), default="resnet50")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--captum", action="store_true", help="also time Captum on a torch ResNet (needs torch, captum)"
    )
    return p.parse_args(argv)


def time_alone(call, repeats):
    """Median seconds of ``repeats`` calls after a warm-up call, not interleaved with anything."""
    timed_call(call)
    return median(time_round_robin([call], repeats)[0])


def captum_rows(args, target):
    try:
        import torch
        from captum.attr import GuidedBackprop, GuidedGradCam

        from .peers.torch_resnet import ResNet  # imports torch: only when Captum is measured
    except ImportError as e:
        print(f"(Captum not measured: {e})")
        return []
    depth = int(args.model.replace("resnet", ""))
    net = ResNet(depth).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, requires_grad=True)
    t = torch.full((args.batch,), int(target))
    gb = GuidedBackprop(net)
    ggc = GuidedGradCam(net, net.layer4)
    return [
        ("captum GuidedBackprop", time_alone(lambda: gb.attribute(x, target=t), args.repeats)),
        ("captum GuidedGradCam", time_alone(lambda: ggc.attribute(x, target=t), args.repeats)),
    ]


def our_rows(args, target):
    """(name, median seconds) of the floor and our three explainers, timed interleaved."""
    model = RESNETS[args.model](dtype=DTYPES[args.dtype])
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    tap = gcj.linen_tap(model, variables, "stage4")

    def apply(v, x):
        return model.apply(v, x)

    floor = jax.jit(lambda v, x: jax.grad(lambda x: apply(v, x)[:, target].astype(jnp.float32).sum())(x))
    guided_bp = jax.jit(lambda v, x: gcj.guided_backprop(lambda x: apply(v, x), x, target))
    ggc = jax.jit(lambda t, x: gcj.guided_grad_cam(t, x, target))
    cam = jax.jit(lambda t, x: gcj.grad_cam(t, x, target))
    named = (
        ("forward+backward (floor)", floor, (variables, x)),
        ("guided_backprop", guided_bp, (variables, x)),
        ("guided_grad_cam", ggc, (tap, x)),
        ("grad_cam", cam, (tap, x)),
    )
    calls = [functools.partial(compile_and_warm(fn, fargs)[0], *fargs) for _, fn, fargs in named]
    times = time_round_robin(calls, args.repeats)  # interleaved: load hits every row alike
    return [(name, median(t)) for (name, _, _), t in zip(named, times, strict=True)]


def main(argv=None):
    args = parse_args(argv)
    target = 7
    rows = our_rows(args, target)
    if args.captum:
        rows += captum_rows(args, target)

    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, model {args.model}, "
        f"batch {args.batch}, size {args.size}, dtype {args.dtype}, median of {args.repeats}"
    )
    base = rows[0][1]
    seconds = dict(rows)
    gb_time = seconds["guided_backprop"]
    cells = [
        (name, f"{args.batch / sec:.1f}", f"{sec * 1e3:.1f}", f"{sec / base:.2f}", f"{sec / gb_time:.2f}")
        for name, sec in rows
    ]
    print(table(("method", "img/s", "ms/batch", "x floor", "x GB"), cells, align="lrrrr"))
    if "captum GuidedGradCam" in seconds:
        print(
            f"guided_grad_cam speed-up over Captum GuidedGradCam: "
            f"{seconds['captum GuidedGradCam'] / seconds['guided_grad_cam']:.2f}x"
        )
    mem, what = peak_memory()
    print(f"peak memory: {mem / 2**20:.0f} MiB ({what})")
    ratio = seconds["guided_grad_cam"] / gb_time
    print(f"guided_grad_cam / guided_backprop = {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
