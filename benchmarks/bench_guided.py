"""Guided Backprop and Guided Grad-CAM throughput next to the forward+backward floor.

    python benchmarks/bench_guided.py --batch 8 --size 224 --model resnet50

In one run, every function jit-compiled, compilation and a warm-up call excluded, the median
of ``--repeats`` timed rounds (the rows interleaved, one call each per round):

  forward+backward  jax.jit(jax.grad of the class score w.r.t. the input)   -- the floor
  guided_backprop   gcj.guided_backprop (every ReLU swapped by the jaxpr rewrite)
  guided_grad_cam   gcj.guided_grad_cam at stage4
  grad_cam          gcj.grad_cam at stage4, for reference

With ``--captum`` (and torch + captum importable) Captum's ``GuidedBackprop`` and
``GuidedGradCam`` run on the same architecture (a hand-written torchvision-layout ResNet),
same batch and size, and their images/s are printed beside ours with the ratio.
Target: Guided Grad-CAM at most 1.1x Guided Backprop alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import gradcam_jax as gcj
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(HERE.parent))
    import gradcam_jax as gcj
from bench_throughput import DTYPES, MODELS, compile_and_warm, peak_memory, time_round_robin  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--captum", action="store_true", help="also time Captum on a torch ResNet (needs torch, captum)")
    return p.parse_args(argv)


def time_torch(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def captum_rows(args, target):
    try:
        import torch
        from captum.attr import GuidedBackprop, GuidedGradCam
        from torch_resnet import ResNet
    except ImportError as e:
        print(f"(Captum not measured: {e})")
        return []
    depth = int(args.model.replace("resnet", ""))
    net = ResNet(depth).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, requires_grad=True)
    t = torch.full((args.batch,), int(target))
    gb = GuidedBackprop(net)
    ggc = GuidedGradCam(net, net.layer4)
    rows = [("captum GuidedBackprop", time_torch(lambda: gb.attribute(x, target=t), args.repeats)),
            ("captum GuidedGradCam", time_torch(lambda: ggc.attribute(x, target=t), args.repeats))]
    return rows


def main(argv=None):
    args = parse_args(argv)
    model = MODELS[args.model](dtype=DTYPES[args.dtype])
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    tap = gcj.linen_tap(model, variables, "stage4")
    target = 7

    def apply(v, x):
        return model.apply(v, x)

    floor = jax.jit(lambda v, x: jax.grad(lambda x: apply(v, x)[:, target].astype(jnp.float32).sum())(x))
    guided_bp = jax.jit(lambda v, x: gcj.guided_backprop(lambda x: apply(v, x), x, target))
    ggc = jax.jit(lambda t, x: gcj.guided_grad_cam(t, x, target))
    cam = jax.jit(lambda t, x: gcj.grad_cam(t, x, target))

    named = (("forward+backward (floor)", floor, (variables, x)),
             ("guided_backprop", guided_bp, (variables, x)),
             ("guided_grad_cam", ggc, (tap, x)),
             ("grad_cam", cam, (tap, x)))
    calls = [(compile_and_warm(fn, fargs)[0], fargs) for _, fn, fargs in named]
    times = time_round_robin(calls, args.repeats)  # interleaved: load hits every row alike
    rows = [(name, statistics.median(t)) for (name, _, _), t in zip(named, times)]
    if args.captum:
        rows += captum_rows(args, target)

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, model {args.model}, "
          f"batch {args.batch}, size {args.size}, dtype {args.dtype}, median of {args.repeats}")
    base = rows[0][1]
    gb_time = dict(rows)["guided_backprop"]
    print(f"{'method':28s} {'img/s':>10s} {'ms/batch':>10s} {'x floor':>8s} {'x GB':>6s}")
    for name, sec in rows:
        print(f"{name:28s} {args.batch / sec:10.1f} {sec * 1e3:10.1f} {sec / base:8.2f} {sec / gb_time:6.2f}")
    ours = dict(rows)
    if "captum GuidedGradCam" in ours:
        print(f"guided_grad_cam speed-up over Captum GuidedGradCam: "
              f"{ours['captum GuidedGradCam'] / ours['guided_grad_cam']:.2f}x")
    mem, what = peak_memory()
    print(f"peak memory: {mem / 2**20:.0f} MiB ({what})")
    print(f"guided_grad_cam / guided_backprop = {ours['guided_grad_cam'] / gb_time:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
