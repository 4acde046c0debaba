"""Attention sites found by operations (what counts, what does not, what is refused), and the
attention methods' options (head fusion, discarding, K targets, selection, layouts, jit) on a
tiny hand-written transformer, against NumPy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JIT_OR_NOT
from jax.extend import core as jcore

import gradcam_jax as gcj

B, SIDE, P, D, H = 2, 8, 4, 8, 2
N = 1 + (SIDE // P) ** 2  # 4 patches + a class token
R = np.random.default_rng(0)
SHAPES = dict(embed=(P * P * 3, D), cls=(1, 1, D), q=(D, D), k=(D, D), v=(D, D), o=(D, D), out=(D, 3))
W = {k: jnp.asarray(R.normal(size=s) * 0.5, jnp.float32) for k, s in SHAPES.items()}
X = jnp.asarray(R.normal(size=(B, SIDE, SIDE, 3)), jnp.float32)


def embed(x, w=W):
    b = x.shape[0]
    g = SIDE // P
    t = x.reshape(b, g, P, g, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1) @ w["embed"]
    return jnp.concatenate([jnp.broadcast_to(w["cls"], (b, 1, D)), t], axis=1)


def qkv(z, w=W):
    b = z.shape[0]
    return [(z @ w[n]).reshape(b, N, H, D // H) for n in ("q", "k", "v")]


def handwritten(z, w=W):  # (B, H, N, N) probabilities, batch first
    q, k, v = qkv(z, w)
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // H), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(z.shape[0], N, D) @ w["o"]


def fused_xla(z):  # jax.nn.dot_product_attention, XLA implementation
    q, k, v = qkv(z)
    return jax.nn.dot_product_attention(q, k, v, implementation="xla").reshape(z.shape[0], N, D) @ W["o"]


def merged(z):  # PyTorch style: heads folded into the batch axis, (B * H, N, N)
    q, k, v = (t.transpose(0, 2, 1, 3).reshape(-1, N, D // H) for t in qkv(z))
    a = jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2) / math.sqrt(D // H), axis=-1)
    o = (a @ v).reshape(z.shape[0], H, N, D // H).transpose(0, 2, 1, 3)
    return o.reshape(z.shape[0], N, D) @ W["o"]


def model(attention, layers=2):
    def fn(x):
        z = embed(x)
        for _ in range(layers):
            z = z + attention(z)
        return z[:, 0] @ W["out"]

    return fn


def np_attention(x, layers=2):
    """The blocks' probabilities, by hand in NumPy (float64)."""
    w = {k: np.asarray(v, np.float64) for k, v in W.items()}
    z = np.asarray(embed(X if x is None else x), np.float64)
    out = []
    for _ in range(layers):
        q, k, v = [(z @ w[n]).reshape(B, N, H, D // H) for n in ("q", "k", "v")]
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // H)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out.append(a)
        z = z + np.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, N, D) @ w["o"]
    return out


def np_rollout(attentions, fusion="mean", discard=0.0):
    r = None
    for a in attentions:
        f = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](a, axis=1)
        if discard:
            flat = f.reshape(B, -1).copy()
            for b in range(B):
                lowest = np.argsort(flat[b], kind="stable")[: int(discard * N * N)]
                flat[b, lowest[lowest != 0]] = 0.0  # never the class token's own entry
            f = flat.reshape(f.shape)
        f = 0.5 * f + 0.5 * np.eye(N)
        f = f / f.sum(-1, keepdims=True)
        r = f if r is None else f @ r
    return r[:, 0, 1:].reshape(B, 2, 2)


# ------------------------------------------------------------------ what is a site


@pytest.mark.parametrize("attention", [handwritten, fused_xla, merged], ids=["handwritten", "xla", "merged"])
def test_every_form_of_attention_is_found_and_read_alike(attention):
    fn = model(attention)
    sites = gcj.attention_sites(fn, X)
    assert len(sites) == 2 and all(s.shape == (B, H, N, N) for s in sites)
    got = gcj.attention_rollout(fn, X, upsample=False, normalize=False)
    np.testing.assert_allclose(np.asarray(got), np_rollout(np_attention(X)), atol=1e-6)


def test_a_softmax_that_is_not_attention_is_not_a_site():
    def classifier(x):  # softmax over classes, and a softmax used as a gate (multiplied, not contracted)
        z = embed(x)
        gate = jax.nn.softmax(z, axis=-1)
        return jax.nn.softmax((z * gate)[:, 0] @ W["out"], axis=-1)

    with pytest.raises(ValueError, match="no attention block"):
        gcj.attention_sites(classifier, X)
    with pytest.raises(ValueError, match="generic_attention: the model has no attention block"):
        gcj.generic_attention(classifier, X)


def test_attention_that_does_not_depend_on_the_input_is_left_out():
    fixed = jax.nn.softmax(jnp.asarray(R.normal(size=(N, N)), jnp.float32), axis=-1)

    def fn(x):
        z = embed(x)
        z = z + jnp.einsum("qk,bkd->bqd", fixed, z)  # a constant mixing matrix: not the input's
        return (z + handwritten(z))[:, 0] @ W["out"]

    assert len(gcj.attention_sites(fn, X)) == 1


def test_sites_inside_jit_remat_and_scan():
    def fn(x):
        def step(z, _):
            return z + handwritten(z), None

        z, _ = jax.lax.scan(jax.checkpoint(step), embed(x), None, length=3)
        return z[:, 0] @ W["out"]

    sites = gcj.attention_sites(jax.jit(fn), X)
    assert [s.scan_index for s in sites] == [(0,), (1,), (2,)]
    got = gcj.attention_rollout(jax.jit(fn), X, upsample=False, normalize=False)
    np.testing.assert_allclose(np.asarray(got), np_rollout(np_attention(X, 3)), atol=1e-6)


def test_attention_inside_a_while_loop_is_refused():
    def fn(x):
        _, z = jax.lax.while_loop(
            lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] + handwritten(c[1])), (0, embed(x))
        )
        return z[:, 0] @ W["out"]

    with pytest.raises(ValueError, match="inside lax.while.*Unroll"):
        gcj.attention_sites(fn, X)


def test_a_fused_attention_kernel_is_refused_with_the_fix():
    fused_p = jcore.Primitive("dot_product_attention_fwd")  # the name of cuDNN's fused attention
    fused_p.def_abstract_eval(lambda q: jax.core.ShapedArray(q.shape, q.dtype))
    fused_p.def_impl(lambda q: q)

    def fn(x):
        z = embed(x)
        return (z + fused_p.bind(z))[:, 0] @ W["out"]

    with pytest.raises(ValueError, match='fused kernel.*implementation="xla"'):
        gcj.attention_sites(fn, X)


def test_attention_picks_blocks_by_name_index_or_callable():
    fn = model(handwritten, layers=3)

    def named(x):
        z = embed(x)
        for i in range(3):
            with jax.named_scope(f"block{i}"):
                z = z + handwritten(z)
        return z[:, 0] @ W["out"]

    assert [s.name for s in gcj.attention_sites(named, X, attention="block[02]")] == ["block0", "block2"]
    assert len(gcj.attention_sites(fn, X, attention=[0, 2])) == 2
    assert gcj.attention_sites(fn, X, attention=[-1]) == gcj.attention_sites(fn, X, attention=2)
    assert len(gcj.attention_sites(fn, X, attention=lambda s: s.scan_index == ())) == 3
    with pytest.raises(ValueError, match="picks none of the model's 3 attention blocks"):
        gcj.attention_sites(named, X, attention="encoder/*")
    got = gcj.attention_rollout(fn, X, attention=[0, 1], upsample=False, normalize=False)
    np.testing.assert_allclose(np.asarray(got), np_rollout(np_attention(X)), atol=1e-6)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("fusion,discard", [("max", 0.0), ("min", 0.0), ("mean", 0.3)])
def test_rollout_head_fusion_and_discard_ratio(fusion, discard):
    got = gcj.attention_rollout(
        model(handwritten), X, head_fusion=fusion, discard_ratio=discard, upsample=False, normalize=False
    )
    np.testing.assert_allclose(np.asarray(got), np_rollout(np_attention(X), fusion, discard), atol=1e-6)


def test_k_targets_are_the_single_targets_stacked():
    fn = model(handwritten)
    head = lambda z: z[:, 0] @ W["out"]  # noqa: E731
    for explain, kw in ((gcj.generic_attention, {}), (gcj.legrad, {"head": head})):
        both = explain(fn, X, [2, 0], **kw)
        assert both.shape == (B, 2, SIDE, SIDE)
        for k, c in enumerate((2, 0)):
            np.testing.assert_allclose(np.asarray(both[:, k]), np.asarray(explain(fn, X, c, **kw)), atol=1e-6)
        assert float(both.min()) >= 0.0 and float(both.max()) == pytest.approx(1.0)


@JIT_OR_NOT
def test_a_traced_per_example_target(wrap):
    fn = model(handwritten)
    got = wrap(lambda x, t: gcj.generic_attention(fn, x, t, upsample=False))(X, jnp.array([0, 2]))
    for b, c in enumerate((0, 2)):
        np.testing.assert_allclose(
            np.asarray(got[b]), np.asarray(gcj.generic_attention(fn, X, c, upsample=False)[b]), atol=1e-6
        )


def test_channels_first_and_pytree_inputs():
    fn = model(handwritten)
    nchw = gcj.attention_rollout(lambda x: fn(jnp.transpose(x, (0, 2, 3, 1))), jnp.transpose(X, (0, 3, 1, 2)),
                                 layout="NCHW")  # fmt: skip
    tree = gcj.generic_attention(
        lambda d: fn(d["image"]), {"image": X, "age": jnp.ones((B,))}, 1, input="image"
    )
    np.testing.assert_allclose(np.asarray(nchw), np.asarray(gcj.attention_rollout(fn, X)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(tree), np.asarray(gcj.generic_attention(fn, X, 1)), atol=1e-6)


def test_bad_arguments_are_refused_with_the_fix():
    fn = model(handwritten)
    with pytest.raises(ValueError, match="head_fusion='median'"):
        gcj.attention_rollout(fn, X, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        gcj.attention_rollout(fn, X, discard_ratio=1.0)
    with pytest.raises(ValueError, match="token=9 must index one of the 5 tokens"):
        gcj.attention_rollout(fn, X, token=9)
    with pytest.raises(ValueError, match="drop_tokens"):
        gcj.attention_rollout(fn, X, drop_tokens=0)
    with pytest.raises(ValueError, match="out of range: the model has 3 classes"):
        gcj.generic_attention(fn, X, 7)
    with pytest.raises(TypeError, match="head must be a callable"):
        gcj.legrad(fn, X, head=None)


def test_legrad_refuses_a_model_without_a_residual_stream():
    def no_residual(x):
        z = embed(x)
        for _ in range(2):
            z = handwritten(z)
        return z[:, 0] @ W["out"]

    with pytest.raises(ValueError, match="residual stream"):
        gcj.legrad(no_residual, X, head=lambda z: z[:, 0] @ W["out"])


def test_a_nan_input_gives_nan_maps_not_zeros():
    x = X.at[0, 0, 0, 0].set(jnp.nan)
    maps = gcj.generic_attention(model(handwritten), x, 1)
    assert bool(jnp.all(jnp.isnan(maps[0]))) and not bool(jnp.any(jnp.isnan(maps[1])))


def test_weights_bound_with_partial_are_traced_in_the_kernel():
    """Concrete weights fold some operations away when the wrapper traces the model (the class
    token's broadcast here); inside the kernel they are traced: the sites are found again there."""

    def apply(w, x):
        z = embed(x, w)
        for _ in range(2):
            z = z + handwritten(z, w)
        return z[:, 0] @ w["out"]

    fn = functools.partial(apply, W)
    got = gcj.attention_rollout(fn, X, upsample=False, normalize=False)
    np.testing.assert_allclose(np.asarray(got), np_rollout(np_attention(X)), atol=1e-6)
    head = lambda z: z[:, 0] @ W["out"]  # noqa: E731
    first = gcj.legrad(fn, X, 1, head=head, attention=[0], upsample=False)
    np.testing.assert_allclose(
        np.asarray(first), np.asarray(gcj.legrad(model(handwritten), X, 1, head=head, attention=[0],
                                                 upsample=False)), atol=1e-6
    )  # fmt: skip
