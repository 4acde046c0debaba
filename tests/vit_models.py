"""Small vision transformers for tests/test_attention*.py: random init, 32 x 32 images, patch 8
(16 patches + a class token = 17 tokens), width 32, 2 heads, 2 pre-norm blocks, 5 classes.

Each model comes as ``(fn, head, reference)``: ``fn(x)`` the scores of NHWC images, ``head(tokens)``
the model's own final norm + classifier (LeGrad's head), and ``reference(x, deltas)`` the
same model run with ``deltas[l]`` added to block ``l``'s attention probabilities, returning
``(scores, [A_l], [z_l])`` — probabilities and block outputs captured *another way* than the
library does (never from its jaxpr walker):

- Hugging Face ``FlaxViTForImageClassification`` / ``FlaxCLIPModel`` and the Flax Linen / NNX
  models: their attention-weights function (``dot_product_attention_weights``) is wrapped
  (:func:`injected`) to record its result and add the delta; block outputs from
  ``output_hidden_states`` or the models' own ``tokens=True`` output;
- the Equinox model and the scanned pure-JAX model: a hand-written forward
  (:func:`pure_forward`) from the model's parameters, checked against the model itself.
"""

from __future__ import annotations

import contextlib
import math
import types

import jax
import jax.numpy as jnp
import numpy as np

SIZE, PATCH, DIM, HEADS, LAYERS, MLP, CLASSES = 32, 8, 32, 2, 2, 64, 5
GRID = SIZE // PATCH
TOKENS = 1 + GRID * GRID


def images(batch: int = 2, seed: int = 0):
    return jax.random.normal(jax.random.key(seed), (batch, SIZE, SIZE, 3), jnp.float32)


def patches(x):
    """(B, 32, 32, 3) -> (B, 16, 8 * 8 * 3), row-major patches."""
    b = x.shape[0]
    x = x.reshape(b, GRID, PATCH, GRID, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, GRID * GRID, PATCH * PATCH * 3)


@contextlib.contextmanager
def injected(owner, name: str = "dot_product_attention_weights"):
    """``owner.name`` (a function returning attention weights) wrapped: each call over
    :data:`TOKENS` keys appends its weights to ``state.weights`` and adds ``state.deltas[i]``."""
    original = getattr(owner, name)
    state = types.SimpleNamespace(deltas=None, weights=[])

    def wrapper(*args, **kwargs):
        w = original(*args, **kwargs)
        if w.shape[-1] != TOKENS:  # another tower (CLIP's text)
            return w
        i = len(state.weights)
        state.weights.append(w)
        return w if state.deltas is None else w + state.deltas[i]

    setattr(owner, name, wrapper)
    try:
        yield state
    finally:
        setattr(owner, name, original)


def handwritten_attention(state):
    """A stand-in for ``jax.nn.dot_product_attention`` (B, N, H, D) written out by hand: records
    its weights in ``state.weights`` and adds ``state.deltas[i]``."""

    def attention(query, key, value, bias=None, mask=None, *, is_causal=False, **kwargs):
        assert bias is None and mask is None and not is_causal
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
        w = jax.nn.softmax(logits, axis=-1)
        i = len(state.weights)
        state.weights.append(w)
        seen = w if state.deltas is None else w + state.deltas[i]
        return jnp.einsum("bhqk,bkhd->bqhd", seen, value)

    return attention


@contextlib.contextmanager
def injected_sdpa():
    """``jax.nn.dot_product_attention`` replaced by :func:`handwritten_attention`."""
    state = types.SimpleNamespace(deltas=None, weights=[])
    original = jax.nn.dot_product_attention
    jax.nn.dot_product_attention = handwritten_attention(state)
    try:
        yield state
    finally:
        jax.nn.dot_product_attention = original


def with_injection(owner, forward):
    """``reference(x, deltas)`` from ``forward(x) -> (scores, tokens)`` run under :func:`injected`
    (``owner=None``: under :func:`injected_sdpa`)."""

    def reference(x, deltas):
        with injected(owner) if owner is not None else injected_sdpa() as state:
            state.deltas = deltas
            scores, tokens = forward(x)
            return scores, list(state.weights), list(tokens)

    return reference


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------


def hf_vit():
    import flax.linen as nn
    import transformers.models.vit.modeling_flax_vit as hf_module
    from transformers import FlaxViTForImageClassification, ViTConfig

    cfg = ViTConfig(
        image_size=SIZE, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=MLP, num_labels=CLASSES, initializer_range=0.3,
    )  # fmt: skip
    model = FlaxViTForImageClassification(cfg, seed=0)
    params = model.params

    def fn(x):
        return model(pixel_values=jnp.transpose(x, (0, 3, 1, 2)), params=params).logits

    def head(tokens):
        z = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": params["vit"]["layernorm"]}, tokens)
        return nn.Dense(CLASSES).apply({"params": params["classifier"]}, z[:, 0])

    def forward(x):
        out = model(pixel_values=jnp.transpose(x, (0, 3, 1, 2)), params=params, output_hidden_states=True)
        return out.logits, out.hidden_states[1:]

    return fn, head, with_injection(hf_module, forward)


def hf_clip(prompts: int = 3):
    """CLIP explained through its image: ``fn(x)`` is the image-text similarity ``(B, prompts)``."""
    import flax.linen as nn
    import transformers.models.clip.modeling_flax_clip as hf_module
    from transformers import CLIPConfig, FlaxCLIPModel

    vision = dict(image_size=SIZE, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=MLP, initializer_range=0.3)  # fmt: skip
    text = dict(vocab_size=64, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=MLP, max_position_embeddings=16, initializer_range=0.3)  # fmt: skip
    model = FlaxCLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16), seed=0)
    params = model.params
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 63, (prompts, 7)), jnp.int32)
    text_emb = model.get_text_features(ids, params=params)
    text_emb = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    scale = jnp.exp(params["logit_scale"])

    def fn(x):
        return model(
            input_ids=ids, pixel_values=jnp.transpose(x, (0, 3, 1, 2)), params=params
        ).logits_per_image

    def head(tokens):
        eps = model.config.vision_config.layer_norm_eps
        z = nn.LayerNorm(epsilon=eps).apply(
            {"params": params["vision_model"]["post_layernorm"]}, tokens[:, 0]
        )
        z = nn.Dense(16, use_bias=False).apply({"params": params["visual_projection"]}, z)
        return scale * (z / jnp.linalg.norm(z, axis=-1, keepdims=True)) @ text_emb.T

    def forward(x):
        out = model(
            input_ids=ids,
            pixel_values=jnp.transpose(x, (0, 3, 1, 2)),
            params=params,
            output_hidden_states=True,
        )
        return out.logits_per_image, out.vision_model_output.hidden_states[1:]

    return fn, head, with_injection(hf_module, forward)


# --------------------------------------------------------------------------------------------
# Flax Linen and NNX
# --------------------------------------------------------------------------------------------


def linen_vit():
    import flax.linen as nn
    import flax.linen.attention as owner

    class Block(nn.Module):
        @nn.compact
        def __call__(self, z):
            z = z + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM)(nn.LayerNorm()(z))
            h = nn.Dense(MLP)(nn.LayerNorm()(z))
            return z + nn.Dense(DIM)(nn.gelu(h))

    class ViT(nn.Module):
        @nn.compact
        def __call__(self, x, tokens: bool = False):
            z = nn.Dense(DIM)(patches(x))
            cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, DIM))
            z = jnp.concatenate([jnp.broadcast_to(cls, (z.shape[0], 1, DIM)), z], axis=1)
            z = z + self.param("pos", nn.initializers.normal(0.5), (1, TOKENS, DIM))
            outs = []
            for _ in range(LAYERS):
                z = Block()(z)
                outs.append(z)
            scores = Head()(z)
            return (scores, outs) if tokens else scores

    class Head(nn.Module):
        @nn.compact
        def __call__(self, z):
            return nn.Dense(CLASSES)(nn.LayerNorm()(z)[:, 0])

    module = ViT()
    variables = jax.jit(module.init)(jax.random.key(0), images(1))

    def fn(x):
        return module.apply(variables, x)

    def head(tokens):
        return Head().apply({"params": variables["params"]["Head_0"]}, tokens)

    return fn, head, with_injection(owner, lambda x: module.apply(variables, x, tokens=True))


def nnx_vit():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
            self.fc1, self.fc2 = nnx.Linear(DIM, MLP, rngs=rngs), nnx.Linear(MLP, DIM, rngs=rngs)

        def __call__(self, z):
            z = z + self.attn(self.ln1(z))
            return z + self.fc2(nnx.gelu(self.fc1(self.ln2(z))))

    class ViT(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(PATCH * PATCH * 3, DIM, rngs=rngs)
            self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, DIM)))
            self.pos = nnx.Param(0.5 * jax.random.normal(rngs.params(), (1, TOKENS, DIM)))
            self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
            self.norm, self.out = nnx.LayerNorm(DIM, rngs=rngs), nnx.Linear(DIM, CLASSES, rngs=rngs)

        def head(self, z):
            return self.out(self.norm(z)[:, 0])

        def __call__(self, x, tokens: bool = False):
            z = self.embed(patches(x))
            z = (
                jnp.concatenate([jnp.broadcast_to(self.cls[...], (z.shape[0], 1, DIM)), z], axis=1)
                + self.pos[...]
            )
            outs = []
            for block in self.blocks:
                z = block(z)
                outs.append(z)
            return (self.head(z), outs) if tokens else self.head(z)

    graphdef, state = nnx.split(ViT(nnx.Rngs(0)))

    def fn(x):
        return nnx.merge(graphdef, state)(x)

    def head(tokens):
        return nnx.merge(graphdef, state).head(tokens)

    # nnx attention without dropout calls jax.nn.dot_product_attention: the reference replaces it.
    return fn, head, with_injection(None, lambda x: nnx.merge(graphdef, state)(x, tokens=True))


# --------------------------------------------------------------------------------------------
# A hand-written ViT (the Equinox model's and the scanned model's reference)
# --------------------------------------------------------------------------------------------


def layer_norm(z, scale, bias, eps):
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) / jnp.sqrt(var + eps) * scale + bias


def pure_block(p, z, delta=None, eps=1e-5):
    """One pre-norm block; returns ``(z_out, attention (B, H, N, N))``."""
    b, n, _ = z.shape
    h = layer_norm(z, p["ln1_s"], p["ln1_b"], eps)
    q, k, v = (jnp.einsum("bnd,de->bne", h, p[w]).reshape(b, n, HEADS, -1) for w in ("wq", "wk", "wv"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    a = jax.nn.softmax(logits, axis=-1)
    seen = a if delta is None else a + delta
    o = jnp.einsum("bhqk,bkhd->bqhd", seen, v).reshape(b, n, -1)
    z = z + o @ p["wo"]
    h = layer_norm(z, p["ln2_s"], p["ln2_b"], eps)
    return z + jax.nn.gelu(h @ p["fc1_w"] + p["fc1_b"]) @ p["fc2_w"] + p["fc2_b"], a


def pure_embed(p, x):
    z = patches(x) @ p["embed_w"] + p["embed_b"]
    z = jnp.concatenate([jnp.broadcast_to(p["cls"], (z.shape[0], 1, DIM)), z], axis=1)
    return z + p["pos"]


def pure_head(p, z, eps=1e-5):
    return layer_norm(z, p["norm_s"], p["norm_b"], eps)[:, 0] @ p["out_w"] + p["out_b"]


def pure_forward(p, x, deltas=None):
    """The hand-written ViT, unrolled: ``(scores, [A_l], [z_l])``."""
    z = pure_embed(p, x)
    weights, outs = [], []
    for i, block in enumerate(p["blocks"]):
        z, a = pure_block(block, z, None if deltas is None else deltas[i])
        weights.append(a)
        outs.append(z)
    return pure_head(p, z), weights, outs


def pure_params(seed: int = 1):
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def w(*shape, s=0.3):
        return s * jax.random.normal(next(keys), shape)

    def block():
        return dict(
            ln1_s=1 + w(DIM, s=0.1), ln1_b=w(DIM, s=0.1), wq=w(DIM, DIM), wk=w(DIM, DIM),
            wv=w(DIM, DIM), wo=w(DIM, DIM), ln2_s=1 + w(DIM, s=0.1), ln2_b=w(DIM, s=0.1),
            fc1_w=w(DIM, MLP), fc1_b=w(MLP, s=0.1), fc2_w=w(MLP, DIM), fc2_b=w(DIM, s=0.1),
        )  # fmt: skip

    return dict(
        embed_w=w(PATCH * PATCH * 3, DIM, s=0.1), embed_b=w(DIM, s=0.1), cls=w(1, 1, DIM, s=1.0),
        pos=w(1, TOKENS, DIM, s=0.5), blocks=[block() for _ in range(LAYERS)], norm_s=1 + w(DIM, s=0.1),
        norm_b=w(DIM, s=0.1), out_w=w(DIM, CLASSES), out_b=w(CLASSES, s=0.1),
    )  # fmt: skip


def scan_vit():
    """The hand-written ViT with its blocks stacked and run by ``lax.scan`` over ``remat``-ed
    blocks, all under ``jax.jit``."""
    p = pure_params()
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *p["blocks"])

    @jax.jit
    def fn(x):
        def step(z, block):
            return pure_block(block, z)[0], None

        z, _ = jax.lax.scan(jax.checkpoint(step), pure_embed(p, x), stacked)
        return pure_head(p, z)

    def reference(x, deltas):
        return pure_forward(p, x, deltas)

    return fn, lambda z: pure_head(p, z), reference


def equinox_vit():
    import equinox as eqx

    keys = iter(jax.random.split(jax.random.key(2), 32))

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self):
            self.ln1, self.ln2 = eqx.nn.LayerNorm(DIM), eqx.nn.LayerNorm(DIM)
            self.attn = eqx.nn.MultiheadAttention(HEADS, DIM, key=next(keys))
            self.fc1, self.fc2 = (
                eqx.nn.Linear(DIM, MLP, key=next(keys)),
                eqx.nn.Linear(MLP, DIM, key=next(keys)),
            )

        def __call__(self, z):  # one example: (N, D)
            h = jax.vmap(self.ln1)(z)
            z = z + self.attn(h, h, h)
            h = jax.vmap(self.ln2)(z)
            return z + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(h)))

    class ViT(eqx.Module):
        embed: eqx.nn.Linear
        cls: jax.Array
        pos: jax.Array
        blocks: list
        norm: eqx.nn.LayerNorm
        out: eqx.nn.Linear

        def __init__(self):
            self.embed = eqx.nn.Linear(PATCH * PATCH * 3, DIM, key=next(keys))
            self.cls = jax.random.normal(next(keys), (1, 1, DIM))
            self.pos = 0.5 * jax.random.normal(next(keys), (1, TOKENS, DIM))
            self.blocks = [Block() for _ in range(LAYERS)]
            self.norm, self.out = eqx.nn.LayerNorm(DIM), eqx.nn.Linear(DIM, CLASSES, key=next(keys))

        def __call__(self, x):  # a batch: each block vmapped over examples
            z = jax.vmap(jax.vmap(self.embed))(patches(x))
            z = jnp.concatenate([jnp.broadcast_to(self.cls, (z.shape[0], 1, DIM)), z], axis=1) + self.pos
            for block in self.blocks:
                z = jax.vmap(block)(z)
            return jax.vmap(self.out)(jax.vmap(jax.vmap(self.norm))(z)[:, 0])

    model = ViT()
    p = _equinox_params(model)
    return model, (lambda z: pure_head(p, z)), (lambda x, deltas: pure_forward(p, x, deltas))


def _equinox_params(m):
    """The Equinox model's weights in :func:`pure_forward`'s layout (Linear weights are (out, in))."""

    def block(b):
        a = b.attn
        return dict(
            ln1_s=b.ln1.weight, ln1_b=b.ln1.bias, wq=a.query_proj.weight.T, wk=a.key_proj.weight.T,
            wv=a.value_proj.weight.T, wo=a.output_proj.weight.T, ln2_s=b.ln2.weight, ln2_b=b.ln2.bias,
            fc1_w=b.fc1.weight.T, fc1_b=b.fc1.bias, fc2_w=b.fc2.weight.T, fc2_b=b.fc2.bias,
        )  # fmt: skip

    return dict(
        embed_w=m.embed.weight.T, embed_b=m.embed.bias, cls=m.cls, pos=m.pos,
        blocks=[block(b) for b in m.blocks], norm_s=m.norm.weight, norm_b=m.norm.bias,
        out_w=m.out.weight.T, out_b=m.out.bias,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# A model for the command line (gradcam-jax explain --model vit_models:cli_vit)
# --------------------------------------------------------------------------------------------


class CliViT:
    """The hand-written ViT as an ``ExplainableModel``: 5 classes, 32 x 32 input, its default tap
    on the last block's input (the patch tokens, for token Grad-CAM) and its attention head."""

    name = "tiny_vit"
    class_names = ("ant", "bee", "cicada", "dragonfly", "earwig")
    input_size = SIZE
    default_layer = "block1_input"
    drop_tokens = 1

    def __init__(self):
        self.p = pure_params()
        self.logits = jax.jit(lambda x: pure_forward(self.p, x)[0])

    def preprocess(self, images):
        x = jnp.asarray(images, jnp.float32)
        x = x[None] if x.ndim == 3 else x
        if x.shape[1:3] != (SIZE, SIZE):
            x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), method="bilinear")
        return x / 127.5 - 1.0

    def attention_head(self, tokens):
        return pure_head(self.p, tokens)

    def tap(self, x, delta):
        """The patch tokens entering the last block (B, 16, D), ``delta`` added there."""
        z = pure_block(self.p["blocks"][0], pure_embed(self.p, x))[0]
        seen = z.at[:, 1:].add(delta)
        return pure_head(self.p, pure_block(self.p["blocks"][1], seen)[0]), z[:, 1:]


def cli_vit():
    return CliViT()
