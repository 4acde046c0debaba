"""Throughput of the perturbation CAMs next to the forward passes they cannot avoid.

Score-CAM needs one forward pass of the whole model per (image, channel); Ablation-CAM one pass
of the layers above the tap per (image, channel); Grad-CAM one forward and a partial backward.
For each method this prints images/s and the *floor*: the same number of plain jit-compiled
passes, chunked the same way, with nothing else (no masks, no upsampling, no selection):

- Score-CAM floor: 1 + N full forward passes per image (N = channels used, ``--channels``);
- Ablation-CAM floor: 1 full forward + C head passes per image (C = the layer's channels);
- Grad-CAM floor: 1 full forward per image.

``time / floor`` near 1 means the method costs what its forwards cost. Each time is the median
of ``--repeats`` runs after a compile run. pytorch-grad-cam columns appear only when
``pytorch_grad_cam`` and ``torchvision`` are importable.

Usage::

    python benchmarks/bench_perturbation.py --quick
    python benchmarks/bench_perturbation.py --batch 4 --size 96 --channels 32 --chunk-size 16
    XLA_FLAGS=... python benchmarks/bench_perturbation.py ...   # XLA options apply as usual

On XLA:CPU keep ResNet-50 inputs at 96 px or more. At 64 px the last stage is 2 x 2, smaller
than its 3 x 3 kernels; XLA's algebraic simplifier then swaps the convolution's operands, and the
swapped convolution (``rhs_reversal``, ``dim_labels=01fb_o01i->f01b`` in the optimised HLO) is
taken by neither YNNPACK nor Eigen: it runs as a naive loop at ~1 GFLOP/s and makes a 64 px
forward slower than a 96 px one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gradcam_jax as gcj  # noqa: E402
from gradcam_jax.perturbation import _chunked_map, _per_step, ablation_cam, score_cam  # noqa: E402


def build_model(name: str, size: int, dtype, num_classes: int = 1000):
    """A Flax Linen model, its variables and the default layer to tap."""
    if name == "resnet50":
        from gradcam_jax.models import init_resnet, resnet50

        model = resnet50(num_classes=num_classes, dtype=dtype)
        return model, init_resnet(model, jax.random.key(0), size), "stage4"
    import flax.linen as nn

    class SmallNet(nn.Module):
        """Four 3x3 conv blocks (32-64-128-256 channels, /8), global pool, dense."""

        @nn.compact
        def __call__(self, x):
            for i, width in enumerate((32, 64, 128, 256)):
                x = nn.relu(nn.Conv(width, (3, 3), strides=(1 if i == 0 else 2,) * 2, dtype=dtype,
                                    name=f"block{i}")(x))
            return nn.Dense(num_classes, name="head")(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))

    model = SmallNet()
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3))), "block3"


def time_call(fn, repeats: int):
    """(compile-run seconds, median seconds of ``repeats`` further runs)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def floors(tap, per_step: int):
    """Jitted plain-pass baselines; ``scale`` differs per pass so XLA cannot hoist them."""

    @jax.jit
    def forward(tap, x):
        return tap(x)[0]

    @jax.jit
    def forwards(tap, x, scales):
        extra = _chunked_map(lambda s: jnp.max(tap(x * s)[0], axis=-1), scales, per_step)
        return tap(x)[0], extra

    @jax.jit
    def heads(tap, x, scales):
        scores, a = tap(x)
        extra = _chunked_map(lambda s: jnp.max(tap.head(x, a * s), axis=-1), scales, per_step)
        return scores, extra

    return forward, forwards, heads


def pytorch_grad_cam_times(args, n_score: int, repeats: int):
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet50", "small"), default=None,
                   help="default: resnet50 when gradcam_jax.models exists, else a small conv net")
    p.add_argument("--layer", default=None, help="layer to tap (default: the model's last stage)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=96,
                   help="image side in pixels (ResNet-50 below 96 px hits a slow XLA:CPU convolution: "
                        "see the module docstring)")
    p.add_argument("--channels", type=int, default=32,
                   help="Score-CAM channels used per image (top_n); 0 = all of the layer's channels")
    p.add_argument("--chunk-size", type=int, default=64, help="perturbed images per step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the model's computation dtype (parameters stay float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="score_cam,ablation_cam,grad_cam")
    p.add_argument("--quick", action="store_true", help="batch 2, 32 px, 16 channels, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.channels, args.repeats = 2, 32, 16, 3
    if args.model is None:
        try:
            import gradcam_jax.models  # noqa: F401
            args.model = "resnet50"
        except ImportError:
            args.model = "small"
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    model, variables, default_layer = build_model(args.model, args.size, dtype)
    layer = args.layer or default_layer
    tap = gcj.linen_tap(model, variables, layer)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3), jnp.float32)
    _, act = jax.eval_shape(lambda t, x: t(x), tap, x)
    c = act.shape[-1]
    n = c if args.channels in (0, None) or args.channels >= c else args.channels
    per_step = _per_step(args.chunk_size, args.batch)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"# {args.model} {args.dtype}, layer {layer!r} {tuple(act.shape[1:])}, batch {args.batch}, "
          f"{args.size}px, chunk_size {args.chunk_size} ({per_step} channel(s) x batch per step), "
          f"Score-CAM channels {n}/{c}, median of {args.repeats}")

    forward, forwards, heads = floors(tap, per_step)
    scales = lambda k: 1.0 + jnp.arange(k, dtype=jnp.float32) / k  # noqa: E731
    torch_times = pytorch_grad_cam_times(args, n, args.repeats) if args.model == "resnet50" else None
    header = f"{'method':<13} {'passes/img':>16} {'img/s':>9} {'floor img/s':>12} {'time/floor':>11} {'1st run s':>10}"
    if torch_times:
        header += f" {'pytorch-grad-cam img/s':>23}"
    print(header, flush=True)
    plans = {
        "score_cam": (f"1+{n} fwd", lambda: score_cam(tap, x, chunk_size=args.chunk_size, top_n=None if n == c else n),
                      lambda: forwards(tap, x, scales(n))),
        "ablation_cam": (f"1 fwd+{c} head", lambda: ablation_cam(tap, x, chunk_size=args.chunk_size),
                         lambda: heads(tap, x, scales(c))),
        # A 1x1 layer (ResNet-50 below 64 px) has no map to normalise: time the raw map there.
        "grad_cam": ("1 fwd+bwd", lambda: gcj.grad_cam(tap, x, normalize=tuple(act.shape[1:3]) != (1, 1)),
                     lambda: forward(tap, x)),
    }
    for name in methods:
        passes, run, floor = plans[name]
        compile_s, t = time_call(run, args.repeats)
        _, t_floor = time_call(floor, args.repeats)
        line = (f"{name:<13} {passes:>16} {args.batch / t:>9.3f} {args.batch / t_floor:>12.3f} "
                f"{t / t_floor:>11.2f} {compile_s:>10.1f}")
        if torch_times:
            line += f" {args.batch / torch_times[name]:>23.3f}"
        print(line, flush=True)
    if torch_times:
        print(f"# {torch_times['note']}")
    elif args.model == "resnet50":
        print("# pytorch-grad-cam: not installed (pip install grad-cam torchvision to add its columns)")


if __name__ == "__main__":
    main()
