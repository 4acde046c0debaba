"""The one jaxpr walker (gradcam_jax._engine): its rule-table API against hand computations, and
that Guided Backprop and LRP both run on it (no other evaluator of jaxprs in the package)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax import _engine
from gradcam_jax._engine import Rule, RuleSet, evaluate, inline_call, rerun_cond, rerun_scan, rerun_while


def _double_sin(frame, eqn, invals):
    return [2.0 * jnp.sin(invals[0])]


def test_rule_table_replaces_one_primitive_and_binds_the_rest():
    """sin -> 2 sin, mul -> add; literals and constants pass through; by hand in NumPy."""
    w = jnp.asarray([0.5, -1.5, 2.0], jnp.float32)
    rules = RuleSet("t", {"sin": _double_sin, "mul": lambda fr, eqn, v: [v[0] + v[1]]})
    closed = jax.make_jaxpr(lambda x: jnp.sin(x) * w + 3.0)(jnp.zeros(3, jnp.float32))
    x = np.asarray([0.1, 0.7, -2.0], np.float32)
    (out,) = evaluate(rules, closed, [jnp.asarray(x)])
    np.testing.assert_allclose(np.asarray(out), 2 * np.sin(x) + np.asarray(w) + 3.0, rtol=1e-6)


def test_values_can_be_anything_and_hooks_see_every_equation():
    """A symbolic rule set (values are strings): literal / const / fallback / enter / after hooks."""
    seen: list[str] = []
    rules = RuleSet(
        "sym",
        fallback=lambda fr, eqn, v: [f"{eqn.primitive.name}({', '.join(v)})"],
        literal=lambda fr, val: repr(float(val)),
        const=lambda fr, val: "W",
        enter=lambda fr: seen.append("enter"),
        after=lambda fr, eqn, outs: seen.append(eqn.primitive.name),
    )
    w = jnp.ones((2,), jnp.float32)
    closed = jax.make_jaxpr(lambda x: jnp.tanh(x * w) - 2.0)(jnp.zeros(2, jnp.float32))
    assert evaluate(rules, closed, ["x"]) == ["sub(tanh(mul(x, W)), 2.0)"]
    assert seen == ["enter", "mul", "tanh", "sub"]


def _sin_rules() -> RuleSet:
    """sin -> 2 sin everywhere, entering jit / custom_jvp calls, scans and conds."""
    table: dict[str, Rule] = {
        "sin": _double_sin,
        "scan": rerun_scan,
        "cond": rerun_cond,
        "while": rerun_while,
    }
    table.update({name: inline_call for name in _engine.CALLS})
    return RuleSet("sin", table)


def test_sub_jaxprs_are_walked_under_the_same_rules():
    """jit, custom_jvp, remat, scan, while and cond bodies: every sin doubled, against NumPy."""

    @jax.custom_jvp
    def f_custom(x):
        return jnp.sin(x) + 1.0

    f_custom.defjvp(lambda p, t: (f_custom(p[0]), t[0]))

    def f(x, flag):
        def step(c, _):
            return jax.jit(jnp.sin)(c) * 0.5 + c, None

        c, _ = jax.lax.scan(step, x, None, length=3)
        c = jax.lax.cond(flag > 0, lambda v: jnp.sin(v), lambda v: -v, c)
        _, c = jax.lax.while_loop(
            lambda s: s[0] < flag + 1, lambda s: (s[0] + 1, jax.checkpoint(jnp.sin)(s[1])), (0, c)
        )
        return f_custom(c)

    x = np.asarray([0.3, -1.2], np.float32)
    closed = jax.make_jaxpr(f)(jnp.zeros(2, jnp.float32), 1)
    for flag in (1, 0):
        (out,) = evaluate(_sin_rules(), closed, [jnp.asarray(x), jnp.asarray(flag)])
        c = x.astype(np.float64)
        for _ in range(3):
            c = 2 * np.sin(c) * 0.5 + c
        c = 2 * np.sin(c) if flag else -c
        for _ in range(flag + 1):
            c = 2 * np.sin(c)
        np.testing.assert_allclose(np.asarray(out), 2 * np.sin(c) + 1.0, rtol=1e-5)


def signature(jaxpr) -> tuple[str, ...]:
    return tuple(e.primitive.name for e in jaxpr.eqns)


def test_guided_and_lrp_both_run_on_the_engine(monkeypatch):
    """Guided Backprop (ReLUs inside scan + cond + a custom_jvp relu) and LRP (a jit-ed layer, a
    cond, a custom_jvp relu) evaluate their jaxprs, sub-jaxprs included, through _engine.evaluate."""
    walked: dict[str, set[tuple[str, ...]]] = {}
    enter = _engine.Frame.__init__

    def spy(self, rules, jaxpr, consts, ctx, extra):
        walked.setdefault(rules.name, set()).add(signature(jaxpr))
        enter(self, rules, jaxpr, consts, ctx, extra)

    monkeypatch.setattr(_engine.Frame, "__init__", spy)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)

    def guided_model(x):
        h, _ = jax.lax.scan(lambda c, _: (jax.nn.relu(c @ w), None), x, None, length=2)
        h = jax.lax.cond(jnp.sum(x) > -1e9, lambda v: jax.nn.relu(v @ w), lambda v: v, h)
        return h @ w

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4)), jnp.float32)
    closed = jax.make_jaxpr(guided_model)(x)
    eqns = closed.jaxpr.eqns
    bodies = {signature(e.params["jaxpr"].jaxpr) for e in eqns if e.primitive.name == "scan"}
    bodies |= {signature(b.jaxpr) for e in eqns if e.primitive.name == "cond" for b in e.params["branches"]}
    g = jax.grad(lambda v: gcj.guided(guided_model)(v)[0, 0])(x)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bodies and bodies <= walked["guided"] and bodies <= walked["relu-sites"]

    def lrp_model(v):
        h = jax.nn.relu(jax.jit(lambda a: a @ w + 0.1)(v.reshape(1, -1)[:, :4]))
        return jax.lax.cond(jnp.asarray(True), lambda a: a @ w, lambda a: a @ (2 * w), h)

    image = jnp.asarray(np.random.default_rng(2).uniform(size=(1, 4)), jnp.float32)
    rel = gcj.lrp(lrp_model, image, 0)
    layer = jax.make_jaxpr(lambda a: a @ w + 0.1)(image).jaxpr
    assert rel.shape == image.shape and signature(layer) in walked["record"] and len(walked["record"]) >= 4
