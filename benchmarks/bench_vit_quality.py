"""How well do the transformer methods localise? A small ViT trained with optax on exact boxes.

    python -m benchmarks.bench_vit_quality            # trains once (cached), then evaluates
    python -m benchmarks.bench_vit_quality --quick    # a smoke test: few steps, few images

Task: the package's synthetic boxes (``gradcam_jax.metrics.boxes_dataset``): 32 x 32 grey noise
with one coloured rectangle whose colour is its class (3 classes) and whose box is exact.

Model: a pre-norm ViT written with Flax Linen (``nn.MultiHeadDotProductAttention``): patch 4
(64 patch tokens + a class token), width 64, 4 blocks of 4 heads, MLP 128, the class token's
final LayerNorm + Dense as the head. Trained with ``optax.adamw`` (``--steps`` steps of batch 64
on 4,096 training images) from a fixed seed; the weights are cached in the gradcam_jax cache
folder (``~/.cache/gradcam_jax/bench_vit_quality/``, or ``$GRADCAM_JAX_CACHE``), never committed.

Methods, each explaining the true class of ``--images`` held-out images (maps upsampled to
32 x 32 and min-max normalised):

- ``attention_rollout`` (Abnar & Zuidema 2020; class-agnostic), ``generic_attention`` (Chefer et
  al. 2021), ``legrad`` (Bousselham et al. 2024; the model's own head on every block's tokens,
  averaged over all blocks, and over the last two only: ``attention=[-2, -1]``);
- ``token grad_cam``: Grad-CAM on the last block's pre-norm (``block3/LayerNorm_0``, tokens
  without the class token as an 8 x 8 grid);
- ``random``: uniform noise on the 8 x 8 token grid, upsampled bilinearly.

Metrics (``gradcam_jax.metrics``): pointing game (the map's maximum on the rectangle, no
tolerance), box IoU of the largest segment above 15% of the maximum (Grad-CAM §4.1),
deletion AUC (most salient pixels first to the background grey 0.3; lower is better) and
insertion AUC (most salient pixels first onto a plain grey 0.3 canvas — a blurred copy would
keep the rectangle's colour, which is all the class is; higher is better), ``--steps-removal``
steps. A figure of a
few examples goes to ``--figure`` (default ``benchmarks/results/vit_quality.png``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import gradcam_jax as gcj
from gradcam_jax import metrics

from .harness import table

SIZE, PATCH, DIM, DEPTH, HEADS, MLP, CLASSES = 32, 4, 64, 4, 4, 128, 3
GRID = SIZE // PATCH
TOKENS = 1 + GRID * GRID


class Block(nn.Module):
    @nn.compact
    def __call__(self, z):
        z = z + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM)(nn.LayerNorm()(z))
        return z + nn.Dense(DIM)(nn.gelu(nn.Dense(MLP)(nn.LayerNorm()(z))))


class Head(nn.Module):
    @nn.compact
    def __call__(self, z):
        return nn.Dense(CLASSES)(nn.LayerNorm()(z)[:, 0])


class ViT(nn.Module):
    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        p = x.reshape(b, GRID, PATCH, GRID, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, GRID * GRID, -1)
        z = nn.Dense(DIM, name="embed")(p)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, DIM))
        z = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, DIM)), z], axis=1)
        z = z + self.param("pos", nn.initializers.normal(0.02), (1, TOKENS, DIM))
        for i in range(DEPTH):
            z = Block(name=f"block{i}")(z)
        return Head(name="head")(z)


def cache_file(steps: int) -> Path:
    root = Path(os.environ.get("GRADCAM_JAX_CACHE") or Path.home() / ".cache" / "gradcam_jax")
    tag = hashlib.sha256(
        json.dumps([SIZE, PATCH, DIM, DEPTH, HEADS, MLP, CLASSES, steps]).encode()
    ).hexdigest()
    return root / "bench_vit_quality" / f"vit-{steps}-{tag[:12]}.msgpack"


def train(steps: int, log_every: int = 250):
    """The ViT's variables after ``steps`` adamw steps (loaded from the cache when there)."""
    module = ViT()
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    path = cache_file(steps)
    if path.exists():
        print(f"weights: {path} (cached)")
        return module, serialization.from_bytes(variables, path.read_bytes())
    data = metrics.boxes_dataset(0, 4096, SIZE, n_classes=CLASSES)
    opt = optax.adamw(optax.cosine_decay_schedule(1e-3, steps), weight_decay=1e-4)
    state = opt.init(variables)

    @jax.jit
    def step(variables, state, x, y):
        def loss(v):
            return optax.softmax_cross_entropy_with_integer_labels(module.apply(v, x), y).mean()

        value, grads = jax.value_and_grad(loss)(variables)
        updates, state = opt.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, value

    r = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = r.integers(0, 4096, 64)
        variables, state, value = step(variables, state, data.images[idx], data.labels[idx])
        if (i + 1) % log_every == 0 or i + 1 == steps:
            print(f"  step {i + 1}/{steps}: loss {float(value):.4f} ({time.perf_counter() - t0:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(variables))
    print(f"weights: trained in {time.perf_counter() - t0:.0f} s, cached at {path}")
    return module, variables


def explain_all(module, variables, data) -> dict[str, jax.Array]:
    fn = functools.partial(module.apply, variables)

    def head(tokens):
        return Head().apply({"params": variables["params"]["head"]}, tokens)

    x, y = data.images, data.labels
    tap = gcj.linen_tap(module, variables, f"block{DEPTH - 1}/LayerNorm_0")
    noise = jax.random.uniform(jax.random.key(7), (x.shape[0], GRID, GRID))
    return {
        "attention_rollout": gcj.attention_rollout(fn, x),
        "generic_attention": gcj.generic_attention(fn, x, y),
        "legrad": gcj.legrad(fn, x, y, head=head),  # the last two blocks, the authors' default
        "legrad (all blocks)": gcj.legrad(fn, x, y, head=head, attention=lambda site: True),
        "token grad_cam": gcj.grad_cam(tap, x, y, drop_tokens=1),
        "random": gcj.postprocess.normalize_maps(
            jax.image.resize(noise, (x.shape[0], SIZE, SIZE), "bilinear")
        ),
    }


def score(fn, data, maps, n_steps: int) -> list[str]:
    pointing = float(jnp.mean(metrics.pointing_game(maps, data.masks)))
    iou = float(jnp.mean(metrics.box_iou(metrics.localization_box(maps, 0.15), data.boxes)))
    dele = float(
        jnp.mean(metrics.deletion(fn, data.images, maps, data.labels, n_steps=n_steps, baseline=0.3).auc)
    )
    inserted = metrics.insertion(fn, data.images, maps, data.labels, n_steps=n_steps, canvas=0.3).auc
    ins = float(jnp.mean(inserted))
    return [f"{pointing:.3f}", f"{iou:.3f}", f"{dele:.3f}", f"{ins:.3f}"]


def figure(data, maps: dict, path: Path, n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(n, 1 + len(maps), figsize=(1.6 * (1 + len(maps)), 1.6 * n), squeeze=False)
    for i in range(n):
        image = np.clip(np.asarray(data.images[i]), 0, 1)
        y0, x0, y1, x1 = np.asarray(data.boxes[i]).tolist()
        for j, (name, m) in enumerate([("image", None), *maps.items()]):
            ax = axes[i, j]  # the maps alone (an overlay would mix the rectangle's colour in)
            ax.imshow(image if m is None else np.asarray(m[i]), cmap="inferno", vmin=0, vmax=1)
            ax.add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec="white", lw=1)
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    print(f"figure: {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps (batch 64)")
    p.add_argument("--images", type=int, default=256, help="held-out images explained")
    p.add_argument("--steps-removal", type=int, default=16, help="deletion / insertion steps")
    p.add_argument("--figure", default="benchmarks/results/vit_quality.png")
    p.add_argument("--quick", action="store_true", help="60 training steps, 16 images (a smoke test)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.images = 60, 16
    module, variables = train(args.steps)
    fn = functools.partial(module.apply, variables)
    data = metrics.boxes_dataset(1, args.images, SIZE, n_classes=CLASSES)
    accuracy = float(jnp.mean(jnp.argmax(fn(data.images), -1) == data.labels))
    t0 = time.perf_counter()
    maps = explain_all(module, variables, data)
    print(
        f"held-out accuracy {accuracy:.3f} on {args.images} images; maps in {time.perf_counter() - t0:.0f} s"
    )
    rows = [[name, *score(fn, data, m, args.steps_removal)] for name, m in maps.items()]
    head = ["method", "pointing game", "box IoU (15%)", "deletion AUC (lower)", "insertion AUC (higher)"]
    print(table(head, rows, align="lrrrr", markdown=args.markdown))
    if args.figure:
        figure(data, maps, Path(args.figure))


if __name__ == "__main__":
    main()
