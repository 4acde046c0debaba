"""Adapters: build a :class:`~gradcam_jax.Tap` from Flax Linen and Equinox models (NNX: ``_nnx``).

None of them edits the user's model. Framework imports happen inside the functions, so
``import gradcam_jax`` needs neither Flax nor Equinox. Every adapter takes ``output=`` (which
part of the model's output holds the scores) and ``activation_layout=`` (the tapped layer's
layout, e.g. ``"NCHW"``) and ends with :func:`~gradcam_jax._tap.adapt_tap`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._callables import ByIdentity, KeyedFunction, hashable
from ._layerset import LayerSet, Recorder, glob_regex, is_pattern, layer_set
from ._layout import Layout
from ._nnx import nnx_layers as nnx_layers
from ._nnx import nnx_tap as nnx_tap
from ._tap import Edit, Tap, adapt_tap, map_layers

__all__ = ["linen_tap", "equinox_tap", "equinox_layers", "linen_layers", "nnx_tap", "nnx_layers", "Output"]

#: What ``output=`` takes: a field or key name, an index, a callable ``output -> scores``, or ``None``.
Output = str | int | Callable | None


def _check_array_output(out, where: str) -> None:
    if not isinstance(out, jax.Array) and not hasattr(out, "shape"):
        raise TypeError(
            f"The layer {where} returns {type(out).__name__}, not an array. Tap a layer whose "
            f"output is a single array (for example a sub-layer of this one)."
        )


def _list_layers(paths: list[str]) -> str:
    shown = ", ".join(p or "<root>" for p in paths[:60])
    more = f", ... ({len(paths) - 60} more)" if len(paths) > 60 else ""
    return shown + more


# --------------------------------------------------------------------------------------------
# Flax Linen
# --------------------------------------------------------------------------------------------


def _linen_scores(out, apply_kwargs):
    # apply(..., mutable=[...]) returns (output, updated_state): the scores are the output.
    if apply_kwargs.get("mutable", False) not in (False, None):
        return out[0]
    return out


def linen_layers(module, variables, x, **apply_kwargs) -> list[str]:
    """The module paths of every layer called on ``x``, in call order (repeats kept).

    Use it to find the ``layer=`` for :func:`linen_tap`.
    """
    import flax.linen as nn

    paths = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            paths.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            module.apply(variables, x, **apply_kwargs)
        return None

    jax.eval_shape(run, variables, x)
    return [p for p in paths if p]


def linen_tap(
    module,
    variables,
    layer: str | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    call: int | None = None,
    layer_method: str = "__call__",
    output: Output = None,
    activation_layout: str | Layout | None = None,
    **apply_kwargs,
) -> Tap:
    """Split a Flax Linen module at the layer whose module path is ``layer``.

    The layer is found with ``flax.linen.intercept_methods``: the model is not edited and no
    state is kept. ``layer`` is the module path joined with ``"/"``, e.g. ``"stage4/block2"``
    or ``"Conv_3"`` (see :func:`linen_layers` for the list).

    Args:
      module: the ``flax.linen.Module``.
      variables: its variables, as passed to ``module.apply``.
      layer: the module path of the layer to tap.
      layers: instead of ``layer``, several layers from one forward pass: module paths and glob
        patterns over them (``"encoder/layer_*/attention"``: ``*`` stays within a path segment,
        ``**`` crosses them). The tap then returns ``(scores, {path: A})`` in call order, and
        :func:`gradcam_jax.activations_and_grads` dicts of activations and gradients;
        ``tap.select(path)`` is a single-layer tap on one of them.
      call: which call of the layer to tap when the layer is called more than once (0 is the
        first; with ``layers``, the same call of every layer). By default a layer called twice
        is an error.
      layer_method: the layer's method whose output is tapped (``"__call__"``).
      output: where the scores are in the model's output: ``None`` (an array as is, else its
        ``.logits`` / ``["logits"]``), a field or key name, an index, or a callable
        ``output -> scores``.
      activation_layout: the tapped activation's layout when it is not channels-last (for
        example ``"NCHW"``); the tap returns it channels-last, as the methods expect.
      **apply_kwargs: passed to ``module.apply`` (``train=False``, ``method=...`` to run
        another method of the model, ``mutable=...``; with ``mutable`` the scores are the first
        output).

    Layers inside ``nn.remat`` / ``nn.scan`` lifted transforms cannot be tapped from outside
    (their outputs live in an inner trace): tap the enclosing module instead.

    Returns:
      A :class:`~gradcam_jax.Tap`; its parameters are ``variables``.

    Raises (when the tap is first run or traced):
      ValueError: the layer was not called (the message lists the layers that were, in order),
        or it was called several times and ``call`` was not given; with ``layers``, a name was
        not called or a pattern matched no layer called.
    """
    chosen = _linen_layer_choice(layer, layers)
    apply = _linen_apply(module, chosen, call, layer_method, apply_kwargs)
    key = (
        "linen",
        ByIdentity(module),
        chosen,
        call,
        layer_method,
        tuple(sorted((k, hashable(v)) for k, v in apply_kwargs.items())),
    )
    entries = chosen.entries if isinstance(chosen, LayerSet) else None
    tap = Tap(KeyedFunction(apply, key), variables, ", ".join(entries) if entries else chosen, entries)
    return adapt_tap(tap, output=output, activation_layout=activation_layout)


def _linen_layer_choice(layer, layers) -> Any:
    """``layer`` (a checked path) or ``layers`` (a :class:`LayerSet`): exactly one of them."""
    if layers is not None:
        if layer is not None:
            raise TypeError("linen_tap: give layer='path' (one layer) or layers=[...] (several), not both.")
        return layer_set(layers, "linen_tap", "/", strip="/")
    if not isinstance(layer, str):
        raise TypeError(f"linen_tap: layer must be a module path string like 'stage4/block2'; got {layer!r}.")
    layer = layer.strip("/")
    if not layer:
        raise ValueError(
            "linen_tap: layer is empty; give the module path of a layer inside the model, like "
            "'stage4/block2' (gcj.linen_layers(module, variables, x) lists them)."
        )
    return layer


def _linen_apply(module, layer: str | LayerSet, call: int | None, layer_method: str, apply_kwargs: dict):
    """The tap's ``apply(variables, x, edit) -> (scores, activation)`` for :func:`linen_tap`."""
    import flax.linen as nn

    def check(name, out):
        _check_array_output(out, repr(name))

    def apply(variables, x, edit):
        rec = Recorder("linen_tap", "layer", layer, call, edit, check)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != layer_method:
                return next_fun(*args, **kwargs)
            path = "/".join(context.module.path)
            # Recorded in the order layers are entered, as linen_layers lists them.
            tapped = rec.enter(path)
            out = next_fun(*args, **kwargs)
            return rec.output(path, out) if tapped else out

        with nn.intercept_methods(interceptor):
            scores = _linen_scores(module.apply(variables, x, **apply_kwargs), apply_kwargs)
        listing = f"Layers called, in order: {_list_layers([p for p in rec.called if p])}."
        return scores, rec.activations(listing)

    return apply


# --------------------------------------------------------------------------------------------
# Equinox
# --------------------------------------------------------------------------------------------


class _ChannelAxis:
    """Moves the channel axis of images (and activations) between the library's channels-last
    layout and a channels-first model's; arrays of lower rank pass unchanged."""

    def __init__(self, batched: bool, channels_first: bool, activations: bool = True):
        self.rank = 4 if batched else 3  # an image, with the batch axis when the model takes it
        self.axis = 1 if batched else 0
        self.channels_first = channels_first
        self.activations = channels_first and activations  # False: activation_layout= handles them

    def to_model(self, x):
        """``(…, H, W, C)`` -> ``(…, C, H, W)``: the input."""
        return jnp.moveaxis(x, -1, self.axis) if self.channels_first and x.ndim >= self.rank else x

    def edit_to_model(self, v):
        """An edit's value, channels-last -> the model's activation layout."""
        return jnp.moveaxis(v, -1, self.axis) if self.activations and v.ndim >= self.rank else v

    def to_library(self, a):
        """``(…, C, H, W)`` -> ``(…, H, W, C)``: the tapped activation."""
        return jnp.moveaxis(a, self.axis, -1) if self.activations and a.ndim >= self.rank else a


def equinox_tap(
    model,
    where: Callable[[Any], Any] | None = None,
    *,
    layers: Sequence[Callable[[Any], Any]] | Mapping[str, Callable[[Any], Any]] | None = None,
    call: int | None = None,
    batched: bool = False,
    channels_first: bool = True,
    output: Output = None,
    activation_layout: str | Layout | None = None,
) -> Tap:
    """Split an Equinox model at the submodule that ``where`` picks (as in ``eqx.tree_at``).

    Args:
      model: an ``eqx.Module``; called on one example unless ``batched=True``.
      where: picks the submodule, e.g. ``lambda m: m.layers[-3]``.
      layers: instead of ``where``, several submodules from one forward pass: a list of such
        callables (each layer named by its path in the model's pytree, e.g. ``"blocks.1"``),
        of those paths and glob patterns over them (``"blocks.*"``: ``*`` stays within a
        ``.`` segment, ``**`` crosses them; :func:`equinox_layers` lists the paths), or a dict
        ``{name: where}``. The tap returns ``(scores, {name: A})`` in call order;
        ``tap.select(name)`` is a single-layer tap on one of them.
      call: which call to tap when the submodule is called more than once (0 is the first; with
        ``layers``, the same call of every submodule). By default that is an error.
      batched: the model takes the whole batch. By default (Equinox's convention) it takes one
        example and the tap ``vmap``\\ s it over the batch.
      channels_first: a shorthand for models that take and return channels-first images, as
        ``eqx.nn.Conv2d`` does: the tap transposes the library's ``(B, H, W, C)`` input to
        ``(B, C, H, W)``, and an image-shaped activation back to channels-last (as
        ``activation_layout="NCHW"`` would). Use ``False`` for a model that is channels-last,
        or when the input is already channels-first (explainers called with ``layout="NCHW"``)
        together with ``activation_layout="NCHW"``.
      output: as in :func:`linen_tap` (``None``: an array of scores, or its ``.logits``).
      activation_layout: the layout of the tapped activation, batch axis included (``"NCHW"``,
        ``"NCL"``, ``"NCDHW"``, ...), when it is not channels-last. The general form of
        ``channels_first``'s activation half: when given, ``channels_first`` only decides
        whether the input is transposed.

    Returns:
      A :class:`~gradcam_jax.Tap`; its parameters are the model's arrays.
    """
    # long-function: the docstring documents every option and example; the body is short.
    import equinox as eqx

    if layers is None:
        if not callable(where):
            raise TypeError(
                "equinox_tap: where must be a callable picking the submodule, e.g. lambda m: m.layers[2]."
            )
        entries: tuple[str, ...] = ()
        wheres = {_module_path(model, where) or "picked by where": where}
    elif where is not None:
        raise TypeError("equinox_tap: give where= (one submodule) or layers=[...] (several), not both.")
    else:
        wheres, entries = _equinox_layers(model, layers)
    multi = layers is not None
    layer: str | LayerSet = LayerSet(entries, ".") if multi else next(iter(wheres))
    axes = _ChannelAxis(batched, channels_first, activations=activation_layout is None)
    # Deepest first, so a submodule inside another tapped one is wrapped before its parent.
    depth = {name: len(_key_path(model, w) or ()) for name, w in wheres.items()}
    one = _equinox_one(dict(sorted(wheres.items(), key=lambda item: -depth[item[0]])), axes, call, layer)
    # Only the arrays are the tap's parameters (traced by jit); activations functions, flags and
    # other static fields of the model stay Python values.
    params, static = eqx.partition(model, eqx.is_array)

    def apply(params, x, edit):
        model = eqx.combine(params, static)
        if batched:
            return one(model, x, edit)
        if edit is None:
            return jax.vmap(lambda xi: one(model, xi, None))(x)
        kind = edit.kind
        return jax.vmap(lambda xi, vi: one(model, xi, Edit(kind, vi)))(x, edit.value)

    chosen = tuple((name, hashable(w)) for name, w in wheres.items())
    key = (
        "equinox",
        ByIdentity(model),
        chosen,
        layer,
        call,
        batched,
        channels_first,
        activation_layout is None,
    )
    tap = Tap(
        KeyedFunction(apply, key),
        params,
        ", ".join(entries) if multi else "equinox",
        entries if multi else None,
    )
    return adapt_tap(tap, output=output, activation_layout=activation_layout)


def _key_path(model, where: Callable) -> tuple | None:
    """The key path of the submodule ``where`` picks in the model's pytree, if found."""
    sub = where(model)
    found = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda n: n is sub)[0]
    return next((path for path, leaf in found if leaf is sub), None)


def _module_path(model, where: Callable) -> str | None:
    """The path of the submodule ``where`` picks in the model's pytree (``"blocks.1"``), if found."""
    path = _key_path(model, where)
    return None if path is None else jax.tree_util.keystr(path, simple=True, separator=".")


def equinox_layers(model) -> list[str]:
    """The paths of every Equinox submodule of ``model`` in its pytree, parents first
    (``"blocks.1"``, ``"blocks.1.conv"``): the names :func:`equinox_tap`'s ``layers=`` matches.

    Examples:
      >>> import equinox as eqx, jax, gradcam_jax as gcj
      >>> mlp = eqx.nn.MLP(3, 2, width_size=4, depth=1, key=jax.random.key(0))
      >>> gcj.equinox_layers(mlp)
      ['layers.0', 'layers.1']
    """
    return [path for path, _ in _equinox_submodules(model)]


def _equinox_submodules(model) -> list[tuple[str, _KeyPathGetter]]:
    import equinox as eqx

    found: list[tuple[str, _KeyPathGetter]] = []

    def walk(node, prefix: tuple) -> None:
        inner = lambda n: n is not node and isinstance(n, eqx.Module)  # noqa: E731
        for path, leaf in jax.tree_util.tree_flatten_with_path(node, is_leaf=inner)[0]:
            if inner(leaf):
                full = prefix + tuple(path)
                found.append((jax.tree_util.keystr(full, simple=True, separator="."), _KeyPathGetter(full)))
                walk(leaf, full)

    walk(model, ())
    return found


@dataclasses.dataclass(frozen=True)
class _KeyPathGetter:
    """``where`` for a submodule found by its key path (hashable: taps built alike share kernels)."""

    path: tuple

    def __call__(self, model):
        for key in self.path:
            if isinstance(key, jax.tree_util.GetAttrKey):
                model = getattr(model, key.name)
            elif isinstance(key, jax.tree_util.SequenceKey):
                model = model[key.idx]
            else:
                model = model[key.key]
        return model


def _equinox_layers(model, layers) -> tuple[dict[str, Callable], tuple[str, ...]]:
    """``layers=`` of :func:`equinox_tap`: ``{name: where}`` and the entries as given."""
    if isinstance(layers, Mapping):
        items = [(str(k), v) for k, v in layers.items()]
        entries = [name for name, _ in items]
    elif isinstance(layers, (str, Sequence)) and layers:
        items, entries = [], []
        for i, entry in enumerate([layers] if isinstance(layers, str) else layers):
            if not isinstance(entry, str):
                name = _module_path(model, entry) if callable(entry) else None
                items.append((name or f"where{i}", entry))
                entries.append(name or f"where{i}")
                continue
            rx = glob_regex(entry, ".") if is_pattern(entry) else None
            hits = [(p, g) for p, g in _equinox_submodules(model) if (rx.match(p) if rx else p == entry)]
            if not hits:
                raise ValueError(
                    f"equinox_tap: {'pattern' if rx else 'layer'} {entry!r} matches no submodule. The "
                    f"model's submodules: {_list_layers(equinox_layers(model))}."
                )
            items.extend(hits)
            entries.append(entry)
    else:
        items = []
    if not items or not all(callable(w) for _, w in items):
        raise TypeError(
            "equinox_tap: layers must be a non-empty list of callables picking submodules "
            "([lambda m: m.blocks[1], lambda m: m.blocks[2]]), submodule paths or glob patterns "
            f"('blocks.*'; gcj.equinox_layers lists them), or a dict {{name: callable}}; got {layers!r}."
        )
    return dict(items), tuple(dict.fromkeys(entries))


def _check_eqx_output(name: str, out) -> None:
    _check_array_output(out, f"{name!r}" if name != "picked by where" else "picked by where")


def _equinox_one(
    wheres: dict[str, Callable], axes: _ChannelAxis, call: int | None, layer: str | LayerSet
) -> Callable:
    """``one(model, x, edit) -> (scores, A)``: the model on what it takes (one example, or a batch)."""
    import equinox as eqx

    class _EqxRecorder(eqx.Module):
        inner: Any
        name: str = eqx.field(static=True)
        rec: Any = eqx.field(static=True)

        def __call__(self, *args, **kwargs):
            self.rec.enter(self.name)
            return self.rec.output(self.name, self.inner(*args, **kwargs))

    multi = isinstance(layer, LayerSet)
    not_called = (
        None if multi else "equinox_tap: the submodule picked by `where` was not called by the model."
    )

    def one(model, x, edit):
        if edit is not None:
            edit = Edit(edit.kind, map_layers(axes.edit_to_model, edit.value))
        rec = Recorder("equinox_tap", "submodule", layer, call, edit, _check_eqx_output)
        for name in wheres:  # deepest first: see equinox_tap
            model = eqx.tree_at(
                wheres[name], model, replace_fn=lambda sub, name=name: _EqxRecorder(sub, name, rec)
            )
        scores = model(axes.to_model(x))
        acts = rec.activations(f"The model's submodules: {_list_layers(equinox_layers(model))}.", not_called)
        return scores, map_layers(axes.to_library, acts)

    return one
