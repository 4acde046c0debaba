"""Throughput of the perturbation CAMs next to the forward passes they cannot avoid.

Score-CAM needs one forward pass of the whole model per (image, channel); Ablation-CAM one pass
of the layers above the tap per (image, channel); Grad-CAM one forward and a partial backward.
For each method this prints images/s and the *floor*: the same number of plain jit-compiled
passes, chunked the same way, with nothing else (no masks, no upsampling, no selection):

- Score-CAM floor: 1 + N full forward passes per image (N = channels used, ``--channels``);
- Ablation-CAM floor: 1 full forward + C head passes per image (C = the layer's channels);
- Grad-CAM floor: 1 full forward per image.

``time / floor`` near 1 means the method costs what its forwards cost. Each time is the median
of ``--repeats`` runs after a compile run (the method's runs, then its floor's). pytorch-grad-cam
columns appear only when ``pytorch_grad_cam`` and ``torchvision`` are importable.

Usage::

    python -m benchmarks.bench_perturbation --quick
    python -m benchmarks.bench_perturbation --batch 4 --size 96 --channels 32 --chunk-size 16
    XLA_FLAGS=... python -m benchmarks.bench_perturbation ...   # XLA options apply as usual

On XLA:CPU keep ResNet-50 inputs at 96 px or more. At 64 px the last stage is 2 x 2, smaller
than its 3 x 3 kernels; XLA's algebraic simplifier then swaps the convolution's operands, and the
swapped convolution (``rhs_reversal``, ``dim_labels=01fb_o01i->f01b`` in the optimised HLO) is
taken by neither YNNPACK nor Eigen: it runs as a naive loop at ~1 GFLOP/s and makes a 64 px
forward slower than a 96 px one.
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

import gradcam_jax as gcj
from gradcam_jax import models
from gradcam_jax._chunking import chunked_vmap, perturbations_per_step
from gradcam_jax.perturbation import ablation_cam, score_cam

from .harness import median, table, time_round_robin, timed_call


class SmallNet(nn.Module):
    """Four 3x3 conv blocks (32-64-128-256 channels, /8), global pool, dense."""

    num_classes: int = 1000
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((32, 64, 128, 256)):
            x = nn.relu(
                nn.Conv(width, (3, 3), strides=(1 if i == 0 else 2,) * 2, dtype=self.dtype, name=f"block{i}")(
                    x
                )
            )
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))


def build_model(name: str, size: int, dtype, num_classes: int = 1000):
    """A Flax Linen model, its variables and the default layer to tap."""
    if name == "resnet50":
        model = models.resnet50(num_classes=num_classes, dtype=dtype)
        return model, models.init_resnet(model, jax.random.key(0), size), "stage4"
    model = SmallNet(num_classes, dtype)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3))), "block3"


def time_call(fn, repeats: int):
    """(compile-run seconds, median seconds of ``repeats`` further runs)."""
    _, first = timed_call(fn)
    return first, median(time_round_robin([fn], repeats)[0])


def floors(tap, per_step: int):
    """Jitted plain-pass baselines; ``scale`` differs per pass so XLA cannot hoist them."""

    @jax.jit
    def forward(tap, x):
        return tap(x)[0]

    @jax.jit
    def forwards(tap, x, scales):
        extra = chunked_vmap(lambda s: jnp.max(tap(x * s)[0], axis=-1), scales, per_step)
        return tap(x)[0], extra

    @jax.jit
    def heads(tap, x, scales):
        scores, a = tap(x)
        extra = chunked_vmap(lambda s: jnp.max(tap.head(x, a * s), axis=-1), scales, per_step)
        return scores, extra

    return forward, forwards, heads


def pytorch_grad_cam_times(args, repeats: int):
    """pytorch-grad-cam on torchvision's ResNet-50 (CPU), or None when it is not installed."""
    try:
        import torch
        import torchvision
        from pytorch_grad_cam import AblationCAM, GradCAM, ScoreCAM
    except ImportError:
        return None
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    out = {}
    for name, cls in (("score_cam", ScoreCAM), ("ablation_cam", AblationCAM), ("grad_cam", GradCAM)):
        cam = cls(model=model, target_layers=[model.layer4[-1]])
        if hasattr(cam, "batch_size"):
            cam.batch_size = args.chunk_size
        out[name] = time_call(lambda cam=cam: cam(input_tensor=x, targets=None), repeats)[1]
    out["note"] = "pytorch-grad-cam ScoreCAM always uses all channels (no top_n)"
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=("resnet50", "small"),
        default="resnet50",
        help="resnet50 (default) or a small conv net",
    )
    p.add_argument("--layer", default=None, help="layer to tap (default: the model's last stage)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--size",
        type=int,
        default=96,
        help="image side in pixels (ResNet-50 below 96 px hits a slow XLA:CPU convolution: "
        "see the module docstring)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=32,
        help="Score-CAM channels used per image (top_n); 0 = all of the layer's channels",
    )
    p.add_argument("--chunk-size", type=int, default=64, help="perturbed images per step")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the model's computation dtype (parameters stay float32)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="score_cam,ablation_cam,grad_cam")
    p.add_argument("--quick", action="store_true", help="batch 2, 32 px, 16 channels, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.channels, args.repeats = 2, 32, 16, 3
    return args


def plans(args, tap, x, act_shape, per_step):
    """Per method: (passes per image, the method's call, its floor's call)."""
    forward, forwards, heads = floors(tap, per_step)
    c = act_shape[-1]
    n = c if args.channels in (0, None) or args.channels >= c else args.channels

    def scales(k):
        return 1.0 + jnp.arange(k, dtype=jnp.float32) / k

    top_n = None if n == c else n
    return {
        "score_cam": (
            f"1+{n} fwd",
            lambda: score_cam(tap, x, chunk_size=args.chunk_size, top_n=top_n),
            lambda: forwards(tap, x, scales(n)),
        ),
        "ablation_cam": (
            f"1 fwd+{c} head",
            lambda: ablation_cam(tap, x, chunk_size=args.chunk_size),
            lambda: heads(tap, x, scales(c)),
        ),
        # A 1x1 layer (ResNet-50 below 64 px) has no map to normalise: time the raw map there.
        "grad_cam": (
            "1 fwd+bwd",
            lambda: gcj.grad_cam(tap, x, normalize=tuple(act_shape[1:3]) != (1, 1)),
            lambda: forward(tap, x),
        ),
    }, n


def main(argv=None):
    args = parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model, variables, default_layer = build_model(args.model, args.size, dtype)
    layer = args.layer or default_layer
    tap = gcj.linen_tap(model, variables, layer)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3), jnp.float32)
    _, act = jax.eval_shape(lambda t, x: t(x), tap, x)
    per_step = perturbations_per_step(args.chunk_size, args.batch)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    by_method, n = plans(args, tap, x, act.shape, per_step)

    print(
        f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(
        f"# {args.model} {args.dtype}, layer {layer!r} {tuple(act.shape[1:])}, batch {args.batch}, "
        f"{args.size}px, chunk_size {args.chunk_size} ({per_step} channel(s) x batch per step), "
        f"Score-CAM channels {n}/{act.shape[-1]}, median of {args.repeats}",
        flush=True,
    )
    torch_times = pytorch_grad_cam_times(args, args.repeats) if args.model == "resnet50" else None
    head = ["method", "passes/img", "img/s", "floor img/s", "time/floor", "1st run s"]
    head += ["pytorch-grad-cam img/s"] if torch_times else []
    rows = []
    for name in methods:
        passes, run, floor = by_method[name]
        compile_s, t = time_call(run, args.repeats)
        _, t_floor = time_call(floor, args.repeats)
        row = [
            name,
            passes,
            f"{args.batch / t:.3f}",
            f"{args.batch / t_floor:.3f}",
            f"{t / t_floor:.2f}",
            f"{compile_s:.1f}",
        ]
        rows.append(row + ([f"{args.batch / torch_times[name]:.3f}"] if torch_times else []))
        print(f"  {name}: measured", file=sys.stderr, flush=True)
    print(table(head, rows, align="lrrrrrr"))
    if torch_times:
        print(f"# {torch_times['note']}")
    elif args.model == "resnet50":
        print("# pytorch-grad-cam: not installed (pip install grad-cam torchvision to add its columns)")


if __name__ == "__main__":
    main()
