"""LRP and DeepLIFT over the jaxpr: Captum's LRP (default rules) and DeepLift with the same
weights in float64, zennit's rules written out in NumPy for a small MLP, a batch norm folded by
hand, and the axioms (conservation, summation-to-delta)."""

import captum.attr as captum_attr  # the test extras install torch==2.13.0 and captum
import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
import torch

import gradcam_jax as gcj
from gradcam_jax.attribution.rules import AlphaBeta, Epsilon, Flat, Gamma, ZBox, ZPlus
from gradcam_jax.models._convs import NHWC as CPU_NHWC
from gradcam_jax.models._convs import conv_general_dilated as cpu_conv

W = nets.weights(4, c2=8)
X = np.random.default_rng(12).normal(size=(2, 8, 8, 3)).astype(np.float32)
T = np.array([2, 0])
NHWC = ("NHWC", "HWIO", "NHWC")


def jax_net(x):
    features, head = nets.split_functions(W)
    return head(features(x))


def nchw(a):
    return torch.from_numpy(np.asarray(a, np.float64).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def close(got, expected, tol=1e-4):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    err = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert err <= tol, f"max relative difference {err:.2e} > {tol}"


def torch_pooled_net():
    """nets.torch_model with its global mean as an AdaptiveAvgPool2d module (Captum's LRP needs modules)."""
    base = nets.torch_model(W, dtype=torch.float64)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.pool = base, torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            b = self.base
            x = b.relu3(b.conv3(b.relu2(b.conv2(b.relu1(b.conv1(x))))))
            return b.fc(self.pool(x).flatten(1))

    return Net().eval()


def test_lrp_epsilon_matches_captum_lrp():
    expected = captum_attr.LRP(torch_pooled_net()).attribute(nchw(X), target=torch.as_tensor(T))
    close(gcj.lrp(jax_net, X, T, rules="epsilon"), nhwc(expected))


def test_deeplift_matches_captum_and_sums_to_delta():
    baseline = np.full_like(X, 0.2)
    net = nets.torch_model(W, dtype=torch.float64)
    expected = captum_attr.DeepLift(net).attribute(nchw(X), nchw(baseline), target=torch.as_tensor(T))
    got = gcj.deeplift(jax_net, X, T, baseline=baseline)
    close(got, nhwc(expected))
    delta = np.asarray(jax_net(X) - jax_net(jnp.asarray(baseline)))[np.arange(2), T]
    np.testing.assert_allclose(np.asarray(got).sum((1, 2, 3)), delta, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ zennit's rules in NumPy

R = np.random.default_rng(3)
W1, B1 = R.normal(size=(6, 5)), R.normal(size=5) * 0.3
W2, B2 = R.normal(size=(5, 3)), R.normal(size=3) * 0.3
XM = R.normal(size=(4, 6))


def mlp(x):
    h = jax.nn.relu(x @ jnp.asarray(W1, x.dtype) + jnp.asarray(B1, x.dtype))
    return h @ jnp.asarray(W2, x.dtype) + jnp.asarray(B2, x.dtype)


def stab(z, eps=1e-6):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def np_layer(rule, x, w, b, r):
    """One layer's input relevance under a zennit rule (its BasicHook written out)."""
    p, n = np.maximum, np.minimum
    xp, xn, wp, wn = p(x, 0), n(x, 0), p(w, 0), n(w, 0)
    if rule == "epsilon":
        return x * ((r / stab(x @ w + b, 0.25)) @ w.T)
    if rule == "zplus":
        s = r / stab(xp @ wp + p(b, 0) + xn @ wn)
        return xp * (s @ wp.T) + xn * (s @ wn.T)
    if rule == "alphabeta":
        sa = r / stab(xp @ wp + p(b, 0) + xn @ wn)
        sb = r / stab(xp @ wn + n(b, 0) + xn @ wp)
        return 2 * (xp * (sa @ wp.T) + xn * (sa @ wn.T)) - (xp * (sb @ wn.T) + xn * (sb @ wp.T))
    if rule == "gamma":
        g, y = 0.25, x @ w + b
        up_w, dn_w = w + g * wp, w + g * wn
        s_up = np.where(y > 0, r, 0) / stab(xp @ up_w + b + g * p(b, 0) + xn @ dn_w)
        s_dn = np.where(y < 0, r, 0) / stab(xp @ dn_w + b + g * n(b, 0) + xn @ up_w)
        return xp * (s_up @ up_w.T) + xn * (s_up @ dn_w.T) + xp * (s_dn @ dn_w.T) + xn * (s_dn @ up_w.T)
    if rule == "flat":
        ones = np.ones_like(w)
        return (r / stab(np.ones_like(x) @ ones)) @ ones.T
    lo, hi = -3.0 * np.ones_like(x), 3.0 * np.ones_like(x)
    s = r / stab(x @ w + b - (lo @ wp + p(b, 0)) - (hi @ wn + n(b, 0)))
    return x * (s @ w.T) - lo * (s @ wp.T) - hi * (s @ wn.T)


RULES = {
    "epsilon": Epsilon(0.25),
    "zplus": ZPlus(),
    "alphabeta": AlphaBeta(2, 1),
    "gamma": Gamma(0.25),
    "flat": Flat(),
    "zbox": ZBox(-3.0, 3.0),
}


@pytest.mark.parametrize("first", list(RULES))
def test_first_layer_rule_matches_numpy(first):
    h = np.maximum(XM @ W1 + B1, 0)
    y = h @ W2 + B2
    r_top = np.zeros_like(y)
    r_top[np.arange(4), 1] = y[np.arange(4), 1]
    r_h = np_layer("epsilon", h, W2, B2, r_top)
    expected = np_layer(first, XM, W1, B1, r_h)
    rules = {"first": RULES[first], "dense": Epsilon(0.25)}
    close(gcj.lrp(mlp, jnp.asarray(XM, jnp.float32), 1, rules=rules), expected, 2e-4)


def test_batch_norm_folds_into_its_conv():
    # conv -> batch norm (a negative scale included) -> relu -> mean -> dense, against the
    # same net with the batch norm folded into the conv by hand: z+ must see the folded weights.
    k = R.normal(size=(3, 3, 3, 4)).astype(np.float32)
    scale = np.array([1.5, -0.7, 0.3, 2.0], np.float32)
    shift, mean, var = (R.normal(size=4).astype(np.float32) for _ in range(3))
    var = np.abs(var) + 0.5
    fc = R.normal(size=(4, 3)).astype(np.float32)

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def with_bn(x):
        z = (conv(x, k) - mean) / jnp.sqrt(var + 1e-5) * scale + shift
        return jax.nn.relu(z).mean((1, 2)) @ fc

    a = scale / np.sqrt(var + 1e-5)

    def folded(x):
        return jax.nn.relu(conv(x, k * a) + (shift - mean * a)).mean((1, 2)) @ fc

    for rules in ("epsilon_plus", "epsilon_alpha2_beta1"):
        close(gcj.lrp(with_bn, X, 1, rules=rules), gcj.lrp(folded, X, 1, rules=rules), 1e-5)


@pytest.mark.parametrize("rules", [{"conv": Epsilon(1e-9), "dense": Epsilon(1e-9)}, "zplus"])
def test_conservation_on_a_bias_free_relu_net(rules):
    k1 = R.normal(size=(3, 3, 3, 6)).astype(np.float32)
    w2 = np.abs(R.normal(size=(6, 4))).astype(np.float32)

    def net(x):
        h = jax.nn.relu(
            jax.lax.conv_general_dilated(x, k1, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        )
        return h.mean((1, 2)) @ w2

    x = np.abs(X)
    score = np.asarray(net(x))[:, 3]
    rel = np.asarray(gcj.lrp(net, x, 3, rules=rules)).sum((1, 2, 3))
    np.testing.assert_allclose(rel, score, rtol=1e-4)


R6 = R.normal(size=(6, 6))


def test_k_targets_and_residual_sums():
    def resnet(x):
        h = jax.nn.relu(x @ jnp.asarray(R6, jnp.float32))
        return (h + x) @ jnp.asarray(np.abs(W1[:6, :3]), jnp.float32)

    x = jnp.asarray(np.abs(XM), jnp.float32)
    both = gcj.lrp(resnet, x, [0, 2], rules={"dense": Epsilon(1e-9), "add": Epsilon(1e-9)})
    assert both.shape == (4, 2, 6)
    close(both[:, 1], gcj.lrp(resnet, x, 2, rules={"dense": Epsilon(1e-9), "add": Epsilon(1e-9)}), 1e-6)
    np.testing.assert_allclose(np.asarray(both).sum(-1), np.asarray(resnet(x))[:, [0, 2]], rtol=1e-4)


def test_unsupported_operations_are_listed():
    def gated(x):
        return (x * jax.nn.sigmoid(x)).sum(-1, keepdims=True) * jnp.ones((1, 2))

    with pytest.raises(NotImplementedError, match=r"mul \(x"):
        gcj.lrp(gated, jnp.ones((2, 3)), 0)
    with pytest.raises(ValueError, match="box=\\(low, high\\)"):
        gcj.lrp(jax_net, X, 0, rules="epsilon_gamma_box")
    with pytest.raises(ValueError, match="unknown rule keys"):
        gcj.lrp(jax_net, X, 0, rules={"last": Epsilon()})


def test_platform_dependent_convolutions_match_captum_lrp():
    # A 2x2 map under 3x3 kernels: the zoo's CPU convolution is an im2col inside
    # lax.platform_dependent; lrp keeps it (the fast path) and still gives Captum's relevance.
    x2 = X[:, :2, :2]

    def platform_net(x):
        h = x
        for name in ("block1", "block2", "block3"):
            k, b = W[name]
            h = jax.nn.relu(cpu_conv(h, k, (1, 1), [(1, 1), (1, 1)], dimension_numbers=CPU_NHWC) + b)
        return h.mean((1, 2)) @ W["fc"][0] + W["fc"][1]

    assert "platform_index" in str(jax.make_jaxpr(platform_net)(x2))
    expected = captum_attr.LRP(torch_pooled_net()).attribute(nchw(x2), target=torch.as_tensor(T))
    close(gcj.lrp(platform_net, x2, T, rules="epsilon"), nhwc(expected))


@pytest.mark.parametrize("rule", ["zplus", "alphabeta", "gamma"])
def test_rules_after_a_relu_with_a_folded_scale_match_numpy(rule):
    # The second layer's input is a ReLU's output (x >= 0: lrp skips the x- half) and its
    # output is scaled per feature, a negative scale included (folded into the weights).
    a = np.array([1.5, -0.7, 0.4])
    c = np.array([0.2, -0.1, 0.3])

    def scaled(x):
        h = jax.nn.relu(x @ jnp.asarray(W1, x.dtype) + jnp.asarray(B1, x.dtype))
        return (h @ jnp.asarray(W2, x.dtype)) * jnp.asarray(a, x.dtype) + jnp.asarray(c, x.dtype)

    h = np.maximum(XM @ W1 + B1, 0)
    y = (h @ W2) * a + c
    r_top = np.zeros_like(y)
    r_top[np.arange(4), 1] = y[np.arange(4), 1]
    expected = np_layer("epsilon", XM, W1, B1, np_layer(rule, h, W2 * a, c, r_top))
    rules = {"first": Epsilon(0.25), "dense": RULES[rule]}
    close(gcj.lrp(scaled, jnp.asarray(XM, jnp.float32), 1, rules=rules), expected, 2e-4)


def test_deeplift_through_max_pooling_matches_captum():
    # conv-relu, 2x2 max pool, conv-relu, global mean, dense. Captum 0.9's DeepLift calls its
    # maxpool hook here, yet its result is the gradient through the pool (so it does not sum to
    # the score's delta exactly); gcj.deeplift takes the gradient there too and must agree.
    rng = np.random.default_rng(5)
    k1, k2 = rng.normal(size=(3, 3, 3, 6)) * 0.5, rng.normal(size=(3, 3, 6, 6)) * 0.3
    b1, b2, fc, bf = (
        rng.normal(size=6) * 0.1,
        rng.normal(size=6) * 0.1,
        rng.normal(size=(6, 4)),
        rng.normal(size=4),
    )

    def net(x):
        def conv(h, k, b):
            return jax.nn.relu(jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=NHWC) + b)

        h = jax.lax.reduce_window(conv(x, k1, b1), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return conv(h, k2, b2).mean((1, 2)) @ fc + bf

    tnet = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(6, 4),
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        for i, (k, b) in {0: (k1, b1), 3: (k2, b2)}.items():
            tnet[i].weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            tnet[i].bias.copy_(torch.from_numpy(b))
        tnet[7].weight.copy_(torch.from_numpy(fc.T.copy()))
        tnet[7].bias.copy_(torch.from_numpy(bf))
    x = rng.normal(size=(2, 8, 8, 3))
    baseline = rng.normal(size=(2, 8, 8, 3)) * 0.5
    target = np.array([1, 3])
    expected = captum_attr.DeepLift(tnet).attribute(nchw(x), nchw(baseline), target=torch.as_tensor(target))
    got = gcj.deeplift(net, jnp.asarray(x, jnp.float32), target, baseline=jnp.asarray(baseline, jnp.float32))
    close(got, nhwc(expected))


@pytest.mark.parametrize("pick", [0, 1])
def test_lrp_follows_a_cond_whose_index_is_not_the_image(pick):
    # The second layer sits in a lax.cond on a flag that is traced but does not depend on the
    # image: relevance goes through the selected branch (zennit's rules in NumPy as reference).
    w2b = W2[::-1].copy()

    def gated(x, flag):
        h = jax.nn.relu(x @ jnp.asarray(W1, x.dtype) + jnp.asarray(B1, x.dtype))
        dense = [lambda v, w=w: v @ jnp.asarray(w, x.dtype) + jnp.asarray(B2, x.dtype) for w in (W2, w2b)]
        return jax.lax.switch(flag, dense, h)

    w = (W2, w2b)[pick]
    h = np.maximum(XM @ W1 + B1, 0)
    y = h @ w + B2
    r_top = np.zeros_like(y)
    r_top[np.arange(4), 2] = y[np.arange(4), 2]
    expected = np_layer("epsilon", XM, W1, B1, np_layer("zplus", h, w, B2, r_top))
    rules = {"first": Epsilon(0.25), "dense": ZPlus()}
    run = jax.jit(lambda x, flag: gcj.lrp(lambda v: gated(v, flag), x, 2, rules=rules))
    close(run(jnp.asarray(XM, jnp.float32), jnp.int32(pick)), expected, 2e-4)
