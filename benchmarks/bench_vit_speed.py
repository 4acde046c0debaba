"""Attention rollout, generic attention and LeGrad next to one forward (and forward+backward) of a ViT.

    python -m benchmarks.bench_vit_speed --config b16 --batch 8 --size 224

A Hugging Face ``FlaxViTForImageClassification`` with random weights (speed does not depend on
their values; the weights are arguments of every compiled program, not constants), its config
by ``--config`` (``b16``: ViT-B/16, 12 blocks of width 768; ``s16``: ViT-S/16, 12 blocks of
width 384; ``tiny``: 4 blocks of width 64). In one run, every function jit-compiled, compilation
and a warm-up call excluded, rows interleaved (one call each per round), the median of
``--repeats`` rounds:

  forward            jax.jit(logits)
  forward+backward   jax.jit(jax.grad of the top class score w.r.t. the input)
  attention_rollout  gcj.attention_rollout                  target: <= 1.1x forward
  generic_attention  gcj.generic_attention (top class)      target: <= 1.3x forward+backward
  legrad             gcj.legrad (top class)                 target: <= 1.3x forward+backward

``ratio`` is the median over rounds of the row's time over its baseline's in the same round;
``XLA GFLOP`` is XLA's own operation count of the compiled program (it does not move with the
machine's load); ``softmax blocks`` counts the attention softmaxes in each program's jaxpr (found
by :func:`gcj.attention_sites` on the program itself): the same as the forward's means every
block's attention came from one forward pass.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

import gradcam_jax as gcj
from gradcam_jax.attention.patterns import softmax_axis

from .harness import compile_and_warm, paired_ratio, peak_memory, table, time_round_robin, xla_gflop

CONFIGS = {
    "b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128),
}


def build(config: str, size: int):
    """``(apply(params, x), head(params, tokens), params)`` of a random-weight HF ViT, NHWC input."""
    import flax.linen as nn
    from transformers import FlaxViTForImageClassification, ViTConfig

    cfg = ViTConfig(image_size=size, patch_size=16, num_labels=1000, **CONFIGS[config])
    model = FlaxViTForImageClassification(cfg, _do_init=False)
    shapes = jax.eval_shape(lambda k: model.init_weights(k, (1, size, size, 3)), jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    )

    def apply(params, x):
        return model(pixel_values=jnp.transpose(x, (0, 3, 1, 2)), params=params).logits

    def head(params, tokens):
        z = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": params["vit"]["layernorm"]}, tokens)
        return nn.Dense(1000).apply({"params": params["classifier"]}, z[:, 0])

    return apply, head, params


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jcore.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield v


def _count_softmaxes(jaxpr) -> int:
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    n = sum(softmax_axis(eqn, producers) is not None for eqn in jaxpr.eqns)
    return n + sum(_count_softmaxes(sub) for eqn in jaxpr.eqns for sub in _sub_jaxprs(eqn))


def softmax_blocks(fn, *args) -> int:
    """How many softmaxes (``exp(s) / sum(exp(s))``) the program ``fn`` evaluates, in its jaxpr."""
    return _count_softmaxes(jax.make_jaxpr(fn)(*args).jaxpr)


def main(argv=None) -> None:
    # long-function: one benchmark, set up, timed and reported in order.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="b16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)

    apply, head_apply, params = build(args.config, args.size)
    x = jax.random.uniform(jax.random.key(1), (args.batch, args.size, args.size, 3))

    def top_score(params, x):
        s = apply(params, x)
        return jnp.sum(jnp.take_along_axis(s, jnp.argmax(jax.lax.stop_gradient(s), -1)[:, None], -1))

    # The weights are arguments of every program (bound with functools.partial inside: traced).
    def rollout(p, x):
        return gcj.attention_rollout(functools.partial(apply, p), x)

    def generic(p, x):
        return gcj.generic_attention(functools.partial(apply, p), x)

    def legrad(p, x):
        return gcj.legrad(functools.partial(apply, p), x, head=functools.partial(head_apply, p))

    programs = {
        name: (jax.jit(f), (params, x))
        for name, f in [
            ("forward", apply),
            ("forward+backward", jax.grad(top_score, argnums=1)),
            ("attention_rollout", rollout),
            ("generic_attention", generic),
            ("legrad", legrad),
        ]
    }
    compiled, compile_s = {}, {}
    for name, (f, a) in programs.items():
        compiled[name], compile_s[name] = compile_and_warm(f, a)
    calls = [functools.partial(compiled[n], *programs[n][1]) for n in programs]
    times = dict(zip(programs, time_round_robin(calls, args.repeats), strict=True))
    base = {
        "attention_rollout": "forward",
        "generic_attention": "forward+backward",
        "legrad": "forward+backward",
    }
    target = {"attention_rollout": 1.1, "generic_attention": 1.3, "legrad": 1.3}
    rows = []
    for name in programs:
        t = sorted(times[name])[len(times[name]) // 2]
        b = base.get(name)
        ratio = f"{paired_ratio(times[name], times[b]):.2f}x {b}" if b else ""
        goal = f"<= {target[name]}x" if b else ""
        gflop = xla_gflop(compiled[name])
        blocks = softmax_blocks(programs[name][0], *programs[name][1])
        rows.append([name, f"{1000 * t:.0f}", f"{args.batch / t:.2f}", ratio, goal, f"{gflop:.2f}", blocks,
                     f"{compile_s[name]:.1f}"])  # fmt: skip
    print(
        f"ViT {args.config} (HF FlaxViTForImageClassification, random weights), batch {args.batch}, "
        f"{args.size} px, {jax.devices()[0].platform}; median of {args.repeats} interleaved rounds"
    )
    head_row = ["program", "ms", "images/s", "ratio", "target", "XLA GFLOP", "softmax blocks", "compile s"]
    print(table(head_row, rows, align="lrrrrrrr", markdown=args.markdown))
    peak, how = peak_memory()
    print(f"peak memory {peak / 2**20:.0f} MiB ({how})")


if __name__ == "__main__":
    main()
