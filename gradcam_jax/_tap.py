"""Taps: a model split at one layer, or at several layers at once.

A tap is the only thing the explainers need from a model. Called as ``tap(x, delta)`` it runs
the model once and returns ``(scores, activation)``, where the chosen layer's output ``A`` was
replaced by ``A + delta`` on its way to the rest of the network. Differentiating the scores
with respect to ``delta`` at ``delta = 0`` gives ``dA`` — so one ``jax.vjp`` yields both
tensors every class-activation method needs.

Internally a tap is ``apply(params, x, edit) -> (scores, A)``, where ``edit`` maps the layer's
output to what the rest of the network sees (``None``: unchanged). Two edits are used:
``A -> A + delta`` (gradients) and ``A -> A_new`` (perturbation methods, which rerun only the
part above the layer: under ``jit`` everything below the replaced layer is dead code).

A :class:`Tap` is a pytree whose leaves are the model's parameters, so explainers can be
jitted with the tap as an argument and differentiated with respect to the parameters.

Multi-layer taps (internal API, relied on by the fusion methods and the attention methods)
------------------------------------------------------------------------------------------
An adapter called with ``layers=[...]`` (names or glob patterns; :mod:`gradcam_jax._layerset`)
returns a tap whose ``tap.layers`` is the tuple of entries as given (``None`` for a single-layer
tap; test with :attr:`Tap.multi`). Everything else is the same ``Tap`` class, with dicts where a
single-layer tap has arrays:

- ``apply(params, x, edit) -> (scores, {layer: A})``: one forward pass; the dict (a
  :class:`LayerDict`, which keeps its order through ``jit`` and ``vmap``) is keyed by
  the layers' full names (patterns expanded), in the order the layers were first entered (the
  order the adapter's ``*_layers`` lister prints). Which names a pattern matched is only known
  when the model is traced: read them from ``tap_shapes(tap, x)[1].keys()`` (``_grads``).
- ``edit`` is ``None`` or one :class:`Edit` whose ``value`` is a dict ``{layer: array}``; a
  layer missing from the dict is left unchanged. Adapters read their layer's part with
  :meth:`Edit.at`.
- ``tap(x, deltas)`` takes ``deltas`` as a dict ``{layer: delta}`` (``tap(x)``: no change) and
  returns ``(scores, {layer: A})``; ``tap.head(x, {layer: A_new})`` replaces some layers.
- ``tap.select(layer)`` (a name, or an int position in call order) is a single-layer tap on
  one of the layers: every single-layer explainer works on it. Single-layer explainers refuse a
  multi-layer tap with a message pointing at ``select`` (``_grads.check_tap_target``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._callables import KeyedFunction, hashable
from ._layout import Layout, from_channels_last, parse_layout, to_channels_last
from ._outputs import pick_output


@jax.tree_util.register_pytree_node_class
class Edit:
    """What the layers above the tap see: ``A + value`` (``"add"``) or ``value`` (``"replace"``).

    A pytree whose only leaf is ``value`` (``kind`` is static), so edits pass through ``vmap``,
    ``remat`` and ``scan`` inside a model.
    """

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value):
        if kind not in ("add", "replace"):
            raise ValueError(f"Edit kind must be 'add' or 'replace'; got {kind!r}.")
        self.kind = kind
        self.value = value

    def at(self, layer: str) -> Edit | None:
        """A multi-layer edit's part for one layer (``None``: that layer is left unchanged)."""
        if not isinstance(self.value, Mapping):
            raise TypeError(
                f"A multi-layer tap needs its delta (or replacement) as a dict {{layer: array}}; got "
                f"{type(self.value).__name__}."
            )
        value = self.value.get(layer)
        return None if value is None else Edit(self.kind, value)

    def __call__(self, a):
        if isinstance(self.value, Mapping):
            raise TypeError(
                "A dict of deltas was given to a single-layer tap; pass one array (the dict form is for "
                "taps built with layers=[...])."
            )
        if self.value.shape != a.shape:
            raise ValueError(
                f"The tap's {'delta' if self.kind == 'add' else 'replacement activation'} has shape "
                f"{self.value.shape}, but the layer's output has shape {a.shape}."
            )
        v = self.value.astype(a.dtype)
        return a + v if self.kind == "add" else v

    def tree_flatten(self):
        return (self.value,), self.kind

    @classmethod
    def tree_unflatten(cls, kind, children):
        return cls(kind, children[0])


ApplyFn = Callable[[Any, jax.Array, "Edit | None"], "tuple[Any, jax.Array]"]

#: What a plain-callable tap receives as ``delta`` for "no change".
NO_DELTA = 0.0

__all__ = [
    "Edit",
    "Tap",
    "as_tap",
    "split_tap",
    "scores_fn",
    "adapt_tap",
    "map_layers",
    "LayerDict",
]


class LayerDict(dict):
    """``{layer: array}`` in call order: a multi-layer tap's activations (and their gradients).

    A ``dict`` registered as a pytree that keeps its insertion order through ``jit``, ``vmap``
    and ``vjp`` (JAX sorts a plain dict's keys when it rebuilds one).
    """


jax.tree_util.register_pytree_with_keys(
    LayerDict,
    lambda d: ([(jax.tree_util.DictKey(k), v) for k, v in d.items()], tuple(d)),
    lambda keys, values: LayerDict(zip(keys, values, strict=True)),
    lambda d: (list(d.values()), tuple(d)),
)


def map_layers(fn: Callable, a):
    """``fn`` applied to an activation, or to each activation of a multi-layer tap's dict."""
    if isinstance(a, Mapping):
        return LayerDict((k, fn(v)) for k, v in a.items())
    return fn(a)


def _as_edit_value(tap_layers, value, what: str):
    if tap_layers is None:
        return jnp.asarray(value)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"This tap records several layers ({', '.join(tap_layers)}): pass its {what} as a dict "
            f"{{layer: array}}, or pick one layer with tap.select(layer)."
        )
    return {k: jnp.asarray(v) for k, v in value.items()}


@jax.tree_util.register_pytree_node_class
class Tap:
    """A model split at one layer, ``tap(x, delta) -> (scores, activation)``, or at several.

    Args:
      apply: ``apply(params, x, edit) -> (scores, activation)``. ``activation`` is the layer's
        output before ``edit``; ``edit`` (an :class:`Edit`, or ``None``) maps it to what the
        layers above see.
      params: a pytree of arrays passed to ``apply`` (the model's parameters). Keeping them
        here rather than in a closure lets ``jax.jit`` take them as arguments.
      name: a label for messages and figures (for example the layer path).
      layers: for a multi-layer tap, the layer names and patterns it was built with (``apply``
        then returns ``(scores, {layer: A})`` and takes dict edits; see the module docstring);
        ``None`` for a single-layer tap.

    Build taps with :func:`split_tap`, :func:`gradcam_jax.linen_tap`,
    :func:`gradcam_jax.nnx_tap` or :func:`gradcam_jax.equinox_tap` rather than by hand.
    """

    def __init__(
        self, apply: ApplyFn, params: Any = (), name: str | None = None, layers: tuple[str, ...] | None = None
    ):
        if not callable(apply):
            raise TypeError(f"Tap needs a callable apply(params, x, edit); got {type(apply).__name__}.")
        self.apply = apply
        self.params = params
        self.name = name
        self.layers = None if layers is None else tuple(layers)

    @property
    def multi(self) -> bool:
        """Whether the tap records several layers (``tap(x)[1]`` is a dict ``{layer: A}``)."""
        return self.layers is not None

    def __call__(self, x, delta=None):
        """Run the model; the layer's output ``A`` is replaced by ``A + delta``.

        For a multi-layer tap ``delta`` is a dict ``{layer: delta}`` (layers left out are
        unchanged) and the activations come back as a dict ``{layer: A}`` in call order.
        """
        if delta is None:
            return self.apply(self.params, x, None)
        return self.apply(self.params, x, Edit("add", _as_edit_value(self.layers, delta, "delta")))

    def head(self, x, activation):
        """Scores with the layer's output replaced by ``activation`` (the part above the layer).

        Under ``jax.jit`` the layers below the tap are dead code and are not computed, unless
        the network reuses their outputs elsewhere (skip connections past the layer), in which
        case those are computed as the model requires.
        """
        value = _as_edit_value(self.layers, activation, "activation")
        return self.apply(self.params, x, Edit("replace", value))[0]

    def with_params(self, params) -> Tap:
        """The same split with other parameters (for example randomised ones)."""
        return Tap(self.apply, params, self.name, self.layers)

    def select(self, layer: str | int) -> Tap:
        """One layer of a multi-layer tap, as a single-layer tap (same model, same parameters).

        Args:
          layer: the layer's full name (a key of ``tap(x)[1]``), or its position in call order
            (``-1``: the last layer entered).

        Returns:
          A :class:`Tap` whose call returns ``(scores, A)`` for that layer only: every
          single-layer explainer (``grad_cam``, ``cam``, ``score_cam``, ...) accepts it.

        Examples:
          >>> import jax.numpy as jnp, gradcam_jax as gcj
          >>> def forward(x, mark):
          ...     h = mark("stage1", jnp.tanh(x))
          ...     return mark("stage2", 2.0 * h).mean(axis=(1, 2))
          >>> tap = gcj.marked_tap(forward, layers="stage*")
          >>> list(tap(jnp.ones((1, 4, 4, 3)))[1])
          ['stage1', 'stage2']
          >>> tap.select("stage2")(jnp.ones((1, 4, 4, 3)))[1].shape
          (1, 4, 4, 3)
        """
        if not self.multi:
            raise ValueError(
                f"select picks one layer of a multi-layer tap (built with layers=[...]); this tap "
                f"({self.name or 'a single layer'}) already has one layer."
            )
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise TypeError(f"select: layer must be a layer name or an int position; got {layer!r}.")
        inner = self.apply

        def apply(params, x, edit):
            key = layer if isinstance(layer, str) else _layer_at(inner, params, x, layer)
            sub = None if edit is None else Edit(edit.kind, {key: edit.value})
            scores, acts = inner(params, x, sub)
            if key not in acts:
                raise ValueError(
                    f"select: the tap recorded no layer {key!r}; its layers, in call order: "
                    f"{', '.join(acts)}."
                )
            return scores, acts[key]

        name = layer if isinstance(layer, str) else f"{self.name}[{layer}]"
        return Tap(KeyedFunction(apply, ("select", hashable(inner), layer)), self.params, name)

    def tree_flatten(self):
        return (self.params,), (self.apply, self.name, self.layers)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.apply, obj.name, obj.layers = aux
        (obj.params,) = children
        return obj

    def __repr__(self):
        label = f" {self.name!r}" if self.name else ""
        return f"Tap{label}"


def _layer_at(apply: Callable, params, x, index: int) -> str:
    """The name of the ``index``-th layer (call order) a multi-layer tap records (traced, not run)."""
    names = list(jax.eval_shape(lambda p, x: apply(p, x, None)[1], params, x))
    if not -len(names) <= index < len(names):
        raise ValueError(
            f"select({index}): the tap records {len(names)} layer(s) ({', '.join(names)}); use "
            f"{-len(names)} <= layer < {len(names)} or a name."
        )
    return names[index]


def split_tap(features_fn: Callable, head_fn: Callable, name: str | None = None) -> Tap:
    """A tap from two plain functions: ``features_fn: x -> A`` and ``head_fn: A -> scores``.

    The model is ``head_fn(features_fn(x))``; the tap sits between the two.

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> tap = gcj.split_tap(lambda x: x * 2.0, lambda a: a.mean(axis=(1, 2)))
      >>> scores, act = tap(jnp.ones((1, 4, 4, 3)))
      >>> scores.shape, act.shape
      ((1, 3), (1, 4, 4, 3))
    """
    if not callable(features_fn) or not callable(head_fn):
        raise TypeError("split_tap(features_fn, head_fn) needs two callables: x -> A and A -> scores.")

    def apply(params, x, edit):
        a = features_fn(x)
        seen = edit(a) if edit is not None else a
        return head_fn(seen), a

    # Keyed like the framework adapters' taps: the same two functions give the same compiled kernel.
    return Tap(KeyedFunction(apply, ("split", hashable(features_fn), hashable(head_fn))), (), name)


@jax.tree_util.register_pytree_node_class
class CallableTap(Tap):
    """A user's own ``tap(x, delta) -> (scores, activation)`` function, wrapped.

    ``delta`` is added to the layer's output; "no change" is passed as the scalar ``0.0`` (so a
    tap written as ``a + delta`` works as it is).
    """

    def __init__(self, fn: Callable):
        def apply(params, x, edit):
            if edit is None:
                return fn(x, NO_DELTA)
            if edit.kind == "add":
                return fn(x, edit.value)
            # A plain callable only understands additive deltas: express a replacement as one.
            # This costs an extra forward pass; build a Tap with split_tap or an adapter to avoid it.
            _, a = fn(x, NO_DELTA)
            a = jax.lax.stop_gradient(a)
            scores, _ = fn(x, edit.value - a)
            return scores, a

        super().__init__(apply, (), getattr(fn, "__name__", None))
        self.fn = fn

    def __call__(self, x, delta=None):
        return self.fn(x, NO_DELTA if delta is None else delta)

    def tree_flatten(self):
        return (), (self.fn,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0])


def as_tap(tap) -> Tap:
    """Accept a :class:`Tap` or any callable ``tap(x, delta) -> (scores, activation)``."""
    if isinstance(tap, Tap):
        return tap
    if not callable(tap):
        raise TypeError(
            f"Expected a tap (from gcj.linen_tap, nnx_tap, equinox_tap or split_tap) or a callable "
            f"tap(x, delta) -> (scores, activation); got {type(tap).__name__}."
        )
    return CallableTap(tap)


def scores_fn(model: Callable) -> Callable:
    """``x -> scores`` for a model, or for a tap (whose call returns ``(scores, activation)``)."""
    if isinstance(model, Tap):
        return lambda x: model(x)[0]
    return model


def adapt_tap(
    tap: Tap, *, output: str | int | Callable | None = None, activation_layout: str | Layout | None = None
) -> Tap:
    """``tap`` with its scores picked by ``output=`` and its activation brought to channels-last.

    ``activation_layout`` is the tapped layer's layout in the model (``"NCHW"`` for a
    channels-first convolution): the tap returns the activation channels-last, as every method
    expects, and converts an edit back to the model's layout before the layers above see it.
    Every adapter ends with this.
    """
    layout = None if activation_layout is None else parse_layout(activation_layout)
    if output is None and (layout is None or not layout.channels_first):
        return _with_output_check(tap)
    inner = tap.apply

    def apply(params, x, edit):
        if edit is not None and layout is not None:
            edit = Edit(edit.kind, map_layers(lambda v: from_channels_last(v, layout), edit.value))
        scores, a = inner(params, x, edit)
        if layout is not None:
            a = map_layers(lambda v: to_channels_last(_check_rank(v, layout), layout), a)
        return pick_output(scores, output), a

    key = ("adapted", hashable(inner), hashable(output), None if layout is None else layout.name)
    return Tap(KeyedFunction(apply, key), tap.params, tap.name, tap.layers)


def _check_rank(a, layout: Layout):
    if a.ndim != layout.ndim:
        raise ValueError(
            f"activation_layout={layout.name!r} describes {layout.ndim}-D activations, but the tapped layer "
            f"outputs shape {a.shape}."
        )
    return a


def _with_output_check(tap: Tap) -> Tap:
    """``tap`` whose non-array outputs go through :func:`pick_output` (``.logits``, or an error)."""
    inner = tap.apply

    def apply(params, x, edit):
        scores, a = inner(params, x, edit)
        return pick_output(scores), a

    return Tap(KeyedFunction(apply, ("output", hashable(inner))), tap.params, tap.name, tap.layers)
