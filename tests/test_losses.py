"""gcj.losses: values against NumPy on models whose gradients are known in closed form, and
gradients with respect to the parameters against central finite differences (in float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax import losses

RNG = np.random.default_rng(3)
B, H, W, C, K = 3, 4, 4, 2, 3
X = RNG.normal(size=(B, H, W, C))
Y = np.array([0, 2, 1])
MASK = np.zeros((B, H, W))
MASK[:, 1:3, 1:3] = 1.0
MASK[2, :, :2] = 1.0


def linear_logits(params, x):
    return x.reshape(x.shape[0], -1) @ params["v"] + params["b"]


def linear_params(dtype=np.float32):
    return {"v": RNG.normal(size=(H * W * C, K)).astype(dtype), "b": np.zeros(K, dtype)}


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("all_classes", [True, False])
@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_input_gradient_penalty_against_numpy(all_classes, wrap):
    params = linear_params()
    x = X.astype(np.float32)
    p = softmax(linear_logits(params, x))  # (B, K)
    v = params["v"]  # d logit_k / dx = v[:, k]
    # sum_k d log p_k / dx = sum_k v_k - K * sum_j p_j v_j;  d log p_y / dx = v_y - sum_j p_j v_j
    g = v.sum(1)[None] - K * p @ v.T if all_classes else v.T[Y] - p @ v.T
    outside = 1 - np.broadcast_to(MASK[..., None], x.shape).reshape(B, -1)
    want = ((outside * g) ** 2).sum() / B

    def fn(params, x):
        return losses.input_gradient_penalty(linear_logits, params, x, Y, MASK, all_classes=all_classes)

    np.testing.assert_allclose(wrap(fn)(params, x), want, rtol=1e-4)


def conv_apply(params, x, edit):
    """A tap: a ReLU feature map (B, H, W, C') from a 1x1 conv, pooled to K logits."""
    a = jax.nn.relu(jnp.einsum("bhwc,cd->bhwd", x, params["w"]) + params["c"])
    seen = a if edit is None else edit(a)
    return seen.mean(axis=(1, 2)) @ params["v"], a


def conv_params(dtype=np.float32):
    return {
        "w": RNG.normal(size=(C, 5)).astype(dtype),
        "c": RNG.normal(size=(5,)).astype(dtype) * 0.1,
        "v": RNG.normal(size=(5, K)).astype(dtype),
    }


def test_cam_alignment_against_numpy():
    params = conv_params()
    x = X.astype(np.float32)
    a = np.maximum(np.einsum("bhwc,cd->bhwd", x, params["w"]) + params["c"], 0)
    weights = params["v"][:, Y].T / (H * W)  # Grad-CAM: mean over positions of dy_c/dA = v[:, c] / HW
    cam = np.maximum(np.einsum("bk,bhwk->bhw", weights, a), 0)
    want = np.mean(1 - (MASK * cam).sum((1, 2)) / (cam.sum((1, 2)) + 1e-8))
    tap = gcj.Tap(conv_apply, params)
    np.testing.assert_allclose(losses.cam_alignment(tap, x, Y, MASK), want, rtol=1e-5)
    jitted = jax.jit(lambda p: losses.cam_alignment(tap.with_params(p), x, Y, MASK))
    np.testing.assert_allclose(jitted(params), want, rtol=1e-5)
    # HiResCAM on a flatten -> dense head: g = dy/dA = V[:, y] reshaped, different at every position.
    flat_v = RNG.normal(size=(H * W * 5, K)).astype(np.float32)

    def flat_apply(p, x, edit):
        _, a = conv_apply(p, x, None)
        seen = a if edit is None else edit(a)
        return seen.reshape(x.shape[0], -1) @ flat_v, a

    g = flat_v[:, Y].T.reshape(B, H, W, 5)
    hires = np.maximum((g * a).sum(-1), 0)
    hires_want = np.mean(1 - (MASK * hires).sum((1, 2)) / (hires.sum((1, 2)) + 1e-8))
    got = losses.cam_alignment(gcj.Tap(flat_apply, params), x, Y, MASK, method="hires_cam")
    np.testing.assert_allclose(got, hires_want, rtol=1e-5)
    with pytest.raises(ValueError, match="method must be one of"):
        losses.cam_alignment(tap, x, Y, MASK, method="score_cam")
    # A mask at twice the resolution: the map is upsampled bilinearly (half-pixel centres).
    big = np.kron(MASK, np.ones((2, 2)))
    assert 0 <= float(losses.cam_alignment(tap, x, Y, big)) <= 1


def finite_difference_check(loss, params, n_probe=6, eps=1e-5):
    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params)
    rng = np.random.default_rng(0)
    for name, value in params.items():
        flat = value.reshape(-1)
        for i in rng.choice(flat.size, size=min(n_probe, flat.size), replace=False):
            up, down = dict(params), dict(params)
            up[name] = flat.copy()
            up[name][i] += eps
            up[name] = up[name].reshape(value.shape)
            down[name] = flat.copy()
            down[name][i] -= eps
            down[name] = down[name].reshape(value.shape)
            fd = (float(loss(up)) - float(loss(down))) / (2 * eps)
            got = float(np.asarray(grads[name]).reshape(-1)[i])
            np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-8, err_msg=f"{name}[{i}]")


def test_gradients_in_the_params_match_finite_differences():
    with jax.enable_x64(True):
        x = X.astype(np.float64)
        lin = linear_params(np.float64)
        lin["b"] = RNG.normal(size=K)
        finite_difference_check(
            lambda p: losses.input_gradient_penalty(linear_logits, p, x, Y, MASK),
            lin,
        )
        conv = conv_params(np.float64)
        tap = gcj.Tap(conv_apply, conv)
        finite_difference_check(lambda p: losses.cam_alignment(tap.with_params(p), x, Y, MASK), conv)

        def rrr_conv(p):
            return losses.input_gradient_penalty(lambda q, xx: conv_apply(q, xx, None)[0], p, x, Y, MASK)

        finite_difference_check(rrr_conv, conv)


def test_outside_fraction():
    maps = np.array([[[0.0, 2.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = np.array([[1.0, 0.0], [1.0, 1.0]])
    # An all-zero map has no mass inside: 1, the worst score (not 0, which would reward it).
    np.testing.assert_allclose(losses.outside_fraction(maps, mask), [0.5, 1.0], atol=1e-7)


def test_bad_arguments():
    params = linear_params()
    x = X.astype(np.float32)
    with pytest.raises(ValueError, match=r"one int class label per example"):
        losses.input_gradient_penalty(linear_logits, params, x, Y[:2], MASK)
    with pytest.raises(ValueError, match=r"annotated region"):
        losses.input_gradient_penalty(linear_logits, params, x, Y, np.ones((3, 3)))
    tap = gcj.Tap(conv_apply, conv_params())
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        losses.cam_alignment(tap, x, Y, np.ones((2, H, W)))
