"""Adapter: build a :class:`~gradcam_jax.Tap` from a Haiku transformed function.

The layer is found with ``haiku.intercept_methods``: every module's ``__call__`` passes through
an interceptor for the duration of one ``apply``, which records the module names called and
returns the chosen module's output edited (``A -> A + delta`` or ``A -> A_new``). The user's
function, its modules and its parameters are not edited. Haiku is imported inside the functions,
so ``import gradcam_jax`` does not need it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._callables import KeyedFunction, hashable
from ._layerset import LayerSet, Recorder, layer_set
from ._layout import Layout
from ._tap import Tap, adapt_tap

__all__ = ["haiku_tap", "haiku_layers"]


def _list_layers(names: list[str]) -> str:
    shown = ", ".join(names[:60])
    more = f", ... ({len(names) - 60} more)" if len(names) > 60 else ""
    return (shown + more) or "(none)"


def _kind(transformed) -> tuple[bool, bool]:
    """``(with_state, takes_rng)`` for a Haiku transformed function, or a TypeError."""
    import haiku as hk

    if isinstance(transformed, hk.TransformedWithState):
        with_state = True
    elif isinstance(transformed, hk.Transformed):
        with_state = False
    else:
        raise TypeError(
            f"haiku_tap: expected the result of hk.transform or hk.transform_with_state (optionally "
            f"wrapped in hk.without_apply_rng); got {type(transformed).__name__}."
        )
    try:
        names = list(inspect.signature(transformed.apply).parameters)
    except (TypeError, ValueError):  # no signature: Haiku's own apply takes an rng
        return with_state, True
    slot = 2 if with_state else 1
    # hk.without_apply_rng drops the rng parameter from apply's signature.
    return with_state, len(names) > slot and names[slot] == "rng"


def _runner(transformed, state: Any, apply_kwargs: dict) -> tuple[Callable, bool]:
    """``(run(tap_params, x) -> output, with_state)``: how the tap calls ``transformed.apply``."""
    with_state, takes_rng = _kind(transformed)
    kwargs = dict(apply_kwargs)
    rng = kwargs.pop("rng", None)
    if rng is not None and not takes_rng:
        raise TypeError(
            "haiku_tap: rng= was given, but this transform was wrapped in hk.without_apply_rng and its "
            "apply takes no rng. Drop rng=, or pass the transform without hk.without_apply_rng."
        )
    if state is not None and not with_state:
        raise TypeError(
            "haiku_tap: state= was given, but the model was built with hk.transform, which has no state; "
            "use hk.transform_with_state (or drop state=)."
        )

    def run(tap_params, x):
        lead = tuple(tap_params) if with_state else (tap_params,)
        if takes_rng:
            lead = (*lead, rng)
        out = transformed.apply(*lead, x, **kwargs)
        return out[0] if with_state else out  # with state, apply returns (output, new_state)

    return run, with_state


def _tap_params(params, state, with_state: bool):
    """The tap's parameters: ``params``, or ``(params, state)`` for ``hk.transform_with_state``."""
    return (params, {} if state is None else state) if with_state else params


def haiku_layers(transformed, params, x, *, state=None, **apply_kwargs) -> list[str]:
    """The names of the Haiku modules called on ``x``, in call order (repeats kept).

    Only modules' ``__call__`` counts (not their other methods). Use it to find the ``layer=``
    for :func:`haiku_tap`.

    Args:
      transformed: the result of ``hk.transform`` / ``hk.transform_with_state`` (optionally
        wrapped in ``hk.without_apply_rng``).
      params: the parameters from ``transformed.init``.
      x: an input batch (only its shape and dtype are used: the model is traced, not run).
      state: the state from ``init``, for ``hk.transform_with_state``.
      **apply_kwargs: passed to ``apply`` (``rng=`` for a transform that takes one; the rest
        go to the model function, e.g. ``is_training=False``).

    Returns:
      The module names, e.g. ``["mlp", "mlp/~/linear_0", "mlp/~/linear_1"]``.

    Examples:
      >>> import haiku as hk, jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([4, 2])(x)))
      >>> params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
      >>> gcj.haiku_layers(net, params, jnp.ones((1, 3)))
      ['mlp', 'mlp/~/linear_0', 'mlp/~/linear_1']
    """
    import haiku as hk

    run, with_state = _runner(transformed, state, apply_kwargs)
    names: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            names.append(context.module.module_name)
        return next_fun(*args, **kwargs)

    def trace(p, x):
        with hk.intercept_methods(interceptor):
            run(p, x)

    jax.eval_shape(trace, _tap_params(params, state, with_state), x)
    return names


def haiku_tap(
    transformed,
    params,
    layer: str | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    state=None,
    call: int | None = None,
    output: str | int | Callable | None = None,
    activation_layout: str | Layout | None = None,
    **apply_kwargs,
) -> Tap:
    """Split a Haiku model at the module named ``layer``.

    Args:
      transformed: the result of ``hk.transform`` / ``hk.transform_with_state``, optionally
        wrapped in ``hk.without_apply_rng``.
      params: the parameters from ``transformed.init``.
      layer: the Haiku module name, e.g. ``"res_net18/~/block_group_3"`` (see
        :func:`haiku_layers` for the list).
      layers: instead of ``layer``, several modules from one forward pass: names and glob
        patterns over them (``"mlp/~/linear_*"``: ``*`` stays within a ``/`` segment, ``**``
        crosses them). The tap returns ``(output, {name: A})`` in call order;
        ``tap.select(name)`` is a single-layer tap on one of them.
      state: the state from ``init``, for ``hk.transform_with_state`` (``None``: an empty
        state). The scores are the model's output; the updated state is dropped.
      call: which call of the module to tap when it is called more than once (0 is the first;
        with ``layers``, the same call of every module). By default a module called twice is an
        error.
      output: how to read the scores from the model's output (a field name, an index or a
        callable; by default an array as is, or its ``.logits``).
      activation_layout: the module's output layout when it is not channels-last (``"NCHW"``).
      **apply_kwargs: passed to ``apply``: ``rng=`` (a PRNG key) for a transform that takes
        one (``None`` is passed otherwise); the rest go to the model function
        (``is_training=False``). Arrays among them are kept by identity: pass the same key
        object to reuse a compiled explainer.

    Returns:
      A :class:`~gradcam_jax.Tap` whose parameters are ``params``, or ``(params, state)`` with
      ``state=`` or ``hk.transform_with_state``: they are traced by ``jit`` and can be
      differentiated.

    Raises (when the tap is first run or traced):
      ValueError: the module was not called (the message lists the modules that were, in
        order), it was called several times and ``call`` was not given, or its output is not
        a single array.

    Modules inside Haiku's lifted transforms (``hk.remat``, ``hk.vmap``, ``hk.scan``) cannot be
    tapped from outside (their outputs live in an inner trace): tap the enclosing module.

    Examples:
      >>> import haiku as hk, jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> def f(x):
      ...     h = jax.nn.relu(hk.Conv2D(4, 3, name="conv")(x))
      ...     return hk.Linear(2, name="head")(h.mean(axis=(1, 2)))
      >>> net = hk.transform(f)
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> tap = gcj.haiku_tap(net, net.init(jax.random.PRNGKey(0), x), "conv")
      >>> [a.shape for a in tap(x)]
      [(1, 2), (1, 8, 8, 4)]
    """
    # long-function: the docstring documents every option and example; the body is short.
    chosen: str | LayerSet
    if layers is not None:
        if layer is not None:
            raise TypeError("haiku_tap: give layer= (one module) or layers=[...] (several), not both.")
        chosen = layer_set(layers, "haiku_tap", "/")
    elif not isinstance(layer, str):
        raise TypeError(
            f"haiku_tap: layer must be a module name like 'res_net18/~/block_group_3'; got {layer!r}."
        )
    else:
        chosen = layer
    run, with_state = _runner(transformed, state, apply_kwargs)
    apply = _haiku_apply(run, chosen, call)
    key = (
        "haiku",
        hashable(transformed),
        chosen,
        call,
        with_state,
        tuple(sorted((k, hashable(v)) for k, v in apply_kwargs.items())),
    )
    entries = chosen.entries if isinstance(chosen, LayerSet) else None
    name = ", ".join(chosen.entries) if isinstance(chosen, LayerSet) else chosen
    tap = Tap(KeyedFunction(apply, key), _tap_params(params, state, with_state), name, entries)
    return adapt_tap(tap, output=output, activation_layout=activation_layout)


def _check_output(name: str, out) -> None:
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ValueError(
            f"haiku_tap: the module {name!r} returns {type(out).__name__}, not an array. Tap a "
            f"module whose output is a single array (for example one of its submodules)."
        )


def _haiku_apply(run: Callable, layer: str | LayerSet, call: int | None) -> Callable:
    """The tap's ``apply(tap_params, x, edit) -> (output, activation)`` for :func:`haiku_tap`."""
    import haiku as hk

    def apply(tap_params, x, edit):
        rec = Recorder("haiku_tap", "module", layer, call, edit, _check_output)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            name = context.module.module_name
            # Recorded in the order modules are entered, as haiku_layers lists them.
            tapped = rec.enter(name)
            out = next_fun(*args, **kwargs)
            return rec.output(name, out) if tapped else out

        with hk.intercept_methods(interceptor):
            out = run(tap_params, x)
        return out, rec.activations(f"Modules called, in order: {_list_layers(rec.called)}.")

    return apply
