"""Attention rollout, generic attention and LeGrad on six real transformers (Hugging Face ViT and
CLIP, Flax Linen, Flax NNX, Equinox, a scanned + remat-ed + jitted hand-written ViT) against NumPy
transcriptions of the papers' formulas, fed with attention probabilities, gradients and block
outputs captured another way (tests/vit_models.py: the libraries' own attention-weights
functions wrapped, or a hand-written forward; never the library's jaxpr walker)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vit_models as vm

import gradcam_jax as gcj

MODELS = ["hf_vit", "hf_clip", "linen_vit", "nnx_vit", "equinox_vit", "scan_vit"]


# ------------------------------------------------------------------ the papers' formulas (NumPy)


def np_rollout(attentions, fusion="mean", token=0):
    """Abnar & Zuidema 2020: rownorm(0.5 A + 0.5 I) per block, multiplied, the token's row."""
    r = None
    for a in attentions:
        f = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](a, axis=1)
        f = 0.5 * f + 0.5 * np.eye(f.shape[-1])
        f = f / f.sum(-1, keepdims=True)
        r = f if r is None else f @ r
    return r[:, token]


def np_generic(attentions, grads, token=0):
    """Chefer et al. 2021, Eq. (self-attention rule): R = I; R += mean_h((dA * A)+) @ R."""
    b, _, n, _ = attentions[0].shape
    r = np.tile(np.eye(n), (b, 1, 1))
    for a, g in zip(attentions, grads, strict=True):
        r = r + np.maximum(g * a, 0).mean(axis=1) @ r
    return r[:, token]


def np_legrad(per_layer_grads):
    """Bousselham et al. 2024: mean over layers, heads and query rows of ReLU(dA_l)."""
    return np.mean([np.maximum(g, 0).mean(axis=(1, 2)) for g in per_layer_grads], axis=0)


def grid(relevance):
    return relevance[:, 1:].reshape(-1, vm.GRID, vm.GRID)  # the class token dropped


# ------------------------------------------------------------------ references, captured another way


def references(reference, head, x, target):
    """A, dA (of the target score) and LeGrad's per-layer dA, in float64, from ``reference``."""
    _, a0, _ = reference(x, None)
    zeros = [jnp.zeros_like(a) for a in a0]
    t = jnp.asarray(target)[:, None]

    @jax.jit
    def run(x):
        def objective(deltas):
            scores, a, _ = reference(x, deltas)
            return jnp.take_along_axis(scores, t, 1)[:, 0], a

        sel, pullback, a = jax.vjp(objective, zeros, has_aux=True)
        (g,) = pullback(jnp.ones_like(sel))
        per_layer = []
        for layer in range(len(zeros)):

            def own(d, layer=layer):  # only this layer's attention moves; its tokens through the head
                deltas = [d if i == layer else z for i, z in enumerate(zeros)]
                return jnp.take_along_axis(head(reference(x, deltas)[2][layer]), t, 1)[:, 0]

            s, pb = jax.vjp(own, zeros[layer])
            per_layer.append(pb(jnp.ones_like(s))[0])
        return a, g, per_layer

    a, g, per_layer = run(x)
    f64 = lambda xs: [np.asarray(v, np.float64) for v in xs]  # noqa: E731
    return f64(a), f64(g), f64(per_layer)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    fn, head, reference = getattr(vm, request.param)()
    x = vm.images(2)
    scores, _, _ = jax.jit(lambda x: reference(x, None))(x)
    np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(scores), atol=2e-5)  # the reference is the model
    target = np.argsort(-np.asarray(scores), axis=-1)[:, 1]  # each example's second class
    return request.param, fn, head, x, target, references(reference, head, x, target)


def check(got, relevance):
    """Raw maps within 1e-5, and within 1e-4 of their scale (some models' maps are small)."""
    expected = grid(relevance)
    got = np.asarray(got, np.float64)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, atol=min(1e-5, 1e-4 * scale), rtol=0)


def test_attention_sites_are_the_model_blocks(model):
    name, fn, _, x, _, _ = model
    sites = gcj.attention_sites(fn, x)
    assert len(sites) == vm.LAYERS  # CLIP: the text tower does not depend on the image
    assert all(s.shape == (2, vm.HEADS, vm.TOKENS, vm.TOKENS) for s in sites)
    if name == "scan_vit":
        assert [s.scan_index for s in sites] == [(0,), (1,)]
    by_hand = {"hf_vit": "vit/encoder/layer/1/*", "linen_vit": "Block_1/*", "hf_clip": "*/layers/1/*"}
    if name in by_hand:  # named as the adapters name layers (hf_layers, linen_layers)
        assert gcj.attention_sites(fn, x, attention=by_hand[name]) == sites[1:]


def test_rollout_matches_the_formula(model):
    _, fn, _, x, _, (a, _, _) = model
    got = gcj.attention_rollout(fn, x, upsample=False, normalize=False)
    check(got, np_rollout(a))


def test_generic_attention_matches_the_formula(model):
    _, fn, _, x, target, (a, g, _) = model
    raw = gcj.generic_attention(fn, x, target, upsample=False, normalize=False)
    check(raw, np_generic(a, g))


def test_legrad_matches_the_formula(model):
    _, fn, head, x, target, (_, _, per_layer) = model
    raw = gcj.legrad(fn, x, target, head=head, upsample=False, normalize=False)
    check(raw, np_legrad(per_layer))
