"""A fresh lambda with the same code and captured values reuses the compiled kernel (issue 12, item 7).

Compilations are counted from JAX's own log (``jax.log_compiles``): each test uses an input
shape of its own, so kernels compiled by other tests do not hide or add compilations here.
"""

import functools

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
from compiles import compilations

import gradcam_jax as gcj
from gradcam_jax._callables import (
    ByIdentity,
    StableFunction,
    combine_callable,
    function_key,
    hashable,
    partition_callable,
)


def image_tap(size, seed=0):
    w = nets.weights(seed)
    x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
    return gcj.split_tap(*nets.split_functions(w)), x


# ------------------------------------------------------------------ function_key


def make(k):
    return lambda s: s[:, k]


def test_same_code_and_captured_values_give_equal_keys():
    assert function_key(make(3)) == function_key(make(3))
    assert hash(function_key(make(3))) == hash(function_key(make(3)))
    assert function_key(make(3)) != function_key(make(4))
    fresh = [lambda s: s[:, 3] for _ in range(2)]
    assert fresh[0] is not fresh[1] and function_key(fresh[0]) == function_key(fresh[1])
    # Written elsewhere: another code object, even if it reads the same.
    assert function_key(lambda s: s[:, 3]) != function_key(fresh[0])


def test_captured_values_are_compared_with_their_type_and_sign():
    def scale(c):
        return lambda s: s * c

    assert function_key(scale(1)) != function_key(scale(1.0))
    assert function_key(scale(True)) != function_key(scale(1))
    assert function_key(scale(0.0)) != function_key(scale(-0.0))
    assert function_key(scale(np.float32(2))) != function_key(scale(2.0))
    assert function_key(scale(float("nan"))) == function_key(scale(float("nan")))
    assert function_key(scale((1, "a"))) == function_key(scale((1, "a")))
    assert function_key(scale((1, make(2)))) == function_key(scale((1, make(2))))
    assert function_key(scale((1, make(2)))) != function_key(scale((1, make(3))))


def test_unhashable_captures_and_arrays_are_keyed_by_identity():
    def reads(obj):
        return lambda s: s * obj["w"] if isinstance(obj, dict) else s * obj

    params = {"w": 2.0}
    assert function_key(reads(params)) == function_key(reads(params))
    assert function_key(reads(params)) != function_key(reads({"w": 2.0}))
    a = jnp.ones(3)
    assert function_key(reads(a)) == function_key(reads(a))
    assert function_key(reads(a)) != function_key(reads(jnp.ones(3)))  # bind arrays with partial instead


def test_defaults_closures_of_functions_and_recursion():
    def with_default(k):
        def fn(s, j=k, *, m=k):
            return s[:, j + m]

        return fn

    assert function_key(with_default(1)) == function_key(with_default(1))
    assert function_key(with_default(1)) != function_key(with_default(2))

    def recursive(n):
        def walk(i):
            return i if i >= n else walk(i + 1)

        return walk

    assert function_key(recursive(3)) == function_key(recursive(3))
    assert function_key(recursive(3)) != function_key(recursive(4))
    assert recursive(3)(0) == 3


def test_stable_function_and_hashable():
    f, g = make(2), make(2)
    sf, sg = StableFunction(f), StableFunction(g)
    assert sf == sg and hash(sf) == hash(sg) and sf != StableFunction(make(1))
    assert StableFunction(sf).fn is f
    s = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(sf(s), s[:, 2])
    assert isinstance(hashable(f), StableFunction) and hashable(f) == hashable(g)
    assert hashable(3) == 3 and isinstance(hashable([1]), ByIdentity)
    # Through partition/combine the user's own function comes back.
    arrays, static = partition_callable(f)
    assert combine_callable(arrays, static) is f
    assert partition_callable(g)[1] == static and hash(partition_callable(g)[1]) == hash(static)


def test_stable_function_as_a_static_jit_argument(caplog):
    """What ``method=`` callables get: a static argument keyed by what the function computes."""

    @functools.partial(jax.jit, static_argnames="fn")
    def apply_stable(x, fn):
        return fn(x)

    x = jnp.arange(6.0)
    with compilations(caplog, "apply_stable") as compiled:
        for _ in range(3):
            apply_stable(x, fn=StableFunction(lambda v: v * 2))
        np.testing.assert_array_equal(apply_stable(x, fn=StableFunction(lambda v: v * 3)), x * 3)
    assert len(compiled) == 2, compiled


# ------------------------------------------------------------------ through the explainers


def test_fresh_lambda_method_compiles_once(caplog):
    tap, x = image_tap(13)
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        maps = [
            np.asarray(gcj.cam(tap, x, 2, method=lambda a, g: (g * a).sum(-1)))  # HiResCAM, written inline
            for _ in range(3)
        ]
    assert len(compiled) == 1, compiled
    np.testing.assert_allclose(maps[2], np.asarray(gcj.cam(tap, x, 2, "hires_cam")), rtol=1e-6, atol=1e-7)


def test_fresh_lambda_target_compiles_once(caplog):
    tap, x = image_tap(17)
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        maps = [np.asarray(gcj.grad_cam(tap, x, target=lambda s: s[:, 3])) for _ in range(3)]
    assert len(compiled) == 1, compiled
    np.testing.assert_allclose(maps[2], np.asarray(gcj.grad_cam(tap, x, 3)), rtol=1e-6, atol=1e-7)


def test_a_lambda_capturing_another_value_compiles_anew(caplog):
    tap, x = image_tap(18)
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        maps = {k: np.asarray(gcj.grad_cam(tap, x, target=make(k))) for k in (1, 4, 1)}
    assert len(compiled) == 2, compiled  # k = 1, k = 4; the second k = 1 reuses the first
    for k in (1, 4):
        np.testing.assert_allclose(maps[k], np.asarray(gcj.grad_cam(tap, x, k)), rtol=1e-6, atol=1e-7)
    assert not np.allclose(maps[1], maps[4])


def test_partial_with_new_masks_compiles_once(caplog):
    tap, x = image_tap(19)

    def masked(mask, scores):
        return (scores * mask).sum(-1)

    with compilations(caplog, "gradient_cam_kernel") as compiled:
        maps = [
            np.asarray(gcj.grad_cam(tap, x, target=functools.partial(masked, jnp.asarray(np.eye(5)[k]))))
            for k in (0, 2, 4)
        ]
    assert len(compiled) == 1, compiled
    for k, got in zip((0, 2, 4), maps, strict=True):
        np.testing.assert_allclose(got, np.asarray(gcj.grad_cam(tap, x, k)), rtol=1e-5, atol=1e-6)


def test_fresh_model_lambdas_and_split_taps_compile_once(caplog):
    w = nets.weights(1)
    features, head = nets.split_functions(w)
    x = np.random.default_rng(1).normal(size=(2, 20, 20, 3)).astype(np.float32)
    with compilations(caplog, "input_grads_kernel") as compiled:
        for _ in range(3):
            gcj.gradients(lambda x: head(features(x)), x, 0)
    assert len(compiled) == 1, compiled
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        for _ in range(3):
            gcj.grad_cam(gcj.split_tap(lambda x: features(x), lambda a: head(a)), x, 0)
    assert len(compiled) == 1, compiled


def test_a_closure_over_a_new_array_recompiles(caplog):
    tap, x = image_tap(21)
    masks = [jnp.asarray(np.eye(5)[k]) for k in (0, 1)]
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        for m in masks:
            gcj.grad_cam(tap, x, target=lambda s, m=m: (s * m).sum(-1))
    assert len(compiled) == 2, compiled  # documented: arrays in closures are constants of the program


@pytest.mark.parametrize("explainer", [gcj.guided_backprop, gcj.gradients])
def test_callable_target_through_the_pixel_explainers(explainer, caplog):
    w = nets.weights(2)
    module, variables = nets.linen(w)
    x = np.random.default_rng(2).normal(size=(2, 22, 22, 3)).astype(np.float32)
    with compilations(caplog, "input_grads_kernel") as compiled:
        out = [
            np.asarray(explainer(lambda x: module.apply(variables, x), x, lambda s: s[:, 1]))
            for _ in range(3)
        ]
    assert len(compiled) == 1, compiled
    np.testing.assert_allclose(
        out[2], np.asarray(explainer(lambda x: module.apply(variables, x), x, 1)), rtol=1e-6
    )


def test_rebuilt_multi_layer_taps_and_their_selections_compile_once(caplog):
    """A multi-layer tap's key holds its layer names and patterns: the same tap built again (or
    the same layer selected again) reuses the compiled kernel; another selection compiles anew."""
    w = nets.weights(0, c2=8)
    module, variables = nets.linen(w)
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype(np.float32)  # a shape of its own
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        for _ in range(3):
            tap = gcj.linen_tap(module, variables, layers=["block*", "fc"])
            gcj.grad_cam(tap.select("block2"), x, 1)
    assert len(compiled) == 1, compiled
    with compilations(caplog, "gradient_cam_kernel") as compiled:
        gcj.grad_cam(gcj.linen_tap(module, variables, layers=["block*", "fc"]).select("block3"), x, 1)
    assert len(compiled) == 1, compiled
