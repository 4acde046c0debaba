"""Adapter: build a :class:`~gradcam_jax.Tap` from a Flax NNX model.

Each run merges a fresh copy of the model (``nnx.merge`` of the state split once) and gives
every submodule of the copy a subclass of its own class whose ``__call__`` reports to the run
in progress: it records the paths called, in order, and edits the tapped layer's output. The
copy's modules keep their attributes, and the user's model is never touched. Flax is imported
inside the functions, so ``import gradcam_jax`` does not need it.
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._callables import ByIdentity, KeyedFunction, hashable
from ._layerset import LayerSet, Recorder, is_pattern, layer_set
from ._layout import Layout
from ._tap import Tap, adapt_tap

__all__ = ["nnx_tap", "nnx_layers"]


def _shown(paths: list[str]) -> str:
    more = f", ... ({len(paths) - 60} more)" if len(paths) > 60 else ""
    return (", ".join(paths[:60]) + more) or "(none)"


_NNX_RUN: contextvars.ContextVar[_NnxRun | None] = contextvars.ContextVar("gradcam_jax_nnx_run", default=None)


def _check_output(name: str, out) -> None:
    if not hasattr(out, "shape"):
        raise TypeError(
            f"nnx_tap: the layer {name!r} returns {type(out).__name__}, not an array. Tap a "
            f"layer whose output is a single array (for example a sub-layer of this one)."
        )


class _NnxRun:
    """One forward pass of an instrumented copy: the paths called, and the tapped layers' outputs
    (kept by ``recorder``, a :class:`~gradcam_jax._layerset.Recorder`; ``None`` only lists)."""

    def __init__(self, recorder: Recorder | None = None):
        self.paths: dict[int, str] = {}  # id of each submodule of the copy -> its dotted path
        self.called: list[str] = []  # paths in the order the submodules were entered
        self.names: dict[int, str] = {}  # id -> the name it is tapped under, where not its path
        self.recorder = recorder

    def enter(self, module, method, args, kwargs):
        path = self.paths.get(id(module))
        if path is None:  # a module made inside the forward pass (for example by nnx.scan)
            return method(module, *args, **kwargs)
        self.called.append(path)
        rec = self.recorder
        name = self.names.get(id(module), path)
        tapped = rec is not None and rec.enter(name)
        out = method(module, *args, **kwargs)
        return rec.output(name, out) if tapped else out

    def forward(self, m, x):
        token = _NNX_RUN.set(self)
        try:
            return m(x)
        finally:
            _NNX_RUN.reset(token)


_REPORTING: dict[type, type] = {}


def _reporting_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that reports to the run in progress (one per class)."""
    if cls in _REPORTING:
        return _REPORTING[cls]
    method = cls.__call__

    def __call__(self, *args, **kwargs):
        run = _NNX_RUN.get()
        return method(self, *args, **kwargs) if run is None else run.enter(self, method, args, kwargs)

    # nnx passes pytree= to __init_subclass__; keep the parent's choice.
    kwds = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
    body = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    _REPORTING[cls] = types.new_class(cls.__name__, (cls,), kwds, lambda ns: ns.update(body))
    return _REPORTING[cls]


def _nnx_submodules(model) -> list[tuple[str, Any]]:
    """``(dotted path, module)`` for every callable submodule of ``model`` (each object once),
    parents before their children, in the order the model holds them."""
    from flax import nnx

    modules = [(path, node) for path, node in nnx.iter_graph(model) if path and isinstance(node, nnx.Module)]
    first: dict[tuple, int] = {}  # iter_graph lists children first: a subtree's position is its first entry
    for i, (path, _) in enumerate(modules):
        for k in range(1, len(path) + 1):
            first.setdefault(path[:k], i)
    modules.sort(key=lambda item: tuple(first[item[0][:k]] for k in range(1, len(item[0]) + 1)))
    return [(".".join(str(p) for p in path), node) for path, node in modules if callable(node)]


def _instrument(m, run: _NnxRun) -> None:
    """Give every submodule of ``m`` (a fresh copy) a reporting class, and register its path."""
    for path, node in _nnx_submodules(m):
        run.paths[id(node)] = path
        object.__setattr__(node, "__class__", _reporting_class(type(node)))


def nnx_layers(model, x) -> list[str]:
    """The dotted paths of the submodules called on ``x``, in call order (repeats kept).

    Only submodules are listed (no methods, functions or other attributes). Use it to find the
    ``layer=`` for :func:`nnx_tap`. The model runs abstractly (``jax.eval_shape``): nothing is
    computed and the model is not edited.

    Args:
      model: an ``nnx.Module``; ``model(x) -> scores``.
      x: an input batch (or a ``jax.ShapeDtypeStruct``).

    Returns:
      The paths, e.g. ``["conv1", "conv2", "linear1", "linear2"]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from gradcam_jax._nnx import nnx_layers
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)  # called twice
      ...         self.fc = nnx.Linear(3, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         x = nnx.relu(self.conv(nnx.relu(self.conv(x))))
      ...         return self.fc(x.mean(axis=(1, 2)))
      >>> nnx_layers(Net(nnx.Rngs(0)), jnp.ones((1, 8, 8, 3)))
      ['conv', 'conv', 'fc']
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    run = _NnxRun()

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        _instrument(m, run)
        run.forward(m, x)

    jax.eval_shape(forward, state, x)
    return run.called


def _resolve_path(root, path: str):
    obj = root
    for part in path.split("."):
        if part.isdigit() or (part.startswith("-") and part[1:].isdigit()):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ValueError(
                f"nnx_tap: {type(obj).__name__} has no submodule {part!r} (in layer path {path!r}). The "
                f"model's submodules: {_shown([p for p, _ in _nnx_submodules(root)])}."
            )
    return obj


def _canonical_path(model, module, label: str) -> str:
    """The dotted path under which ``module`` (picked from ``model``) is called."""
    for path, node in _nnx_submodules(model):
        if node is module:
            return path
    raise ValueError(f"nnx_tap: the layer {label!r} is not a submodule reachable from the model.")


def _nnx_layer_set(model, layers) -> LayerSet:
    """``layers=`` of :func:`nnx_tap` as a :class:`LayerSet` of canonical paths and patterns."""
    entries = [layers] if isinstance(layers, str) or callable(layers) else layers
    if not isinstance(entries, Sequence) or not entries:
        raise TypeError(
            f"nnx_tap: layers must be a list of dotted paths, glob patterns ('blocks.*') or callables "
            f"picking submodules; got {layers!r}."
        )
    names = []
    for entry in entries:
        if callable(entry):
            names.append(_canonical_path(model, entry(model), getattr(entry, "__name__", "layer")))
        elif isinstance(entry, str) and entry and not is_pattern(entry):
            names.append(_canonical_path(model, _resolve_path(model, entry), entry))
        else:
            names.append(entry)
    return layer_set(names, "nnx_tap", ".")


def nnx_tap(
    model,
    layer: str | Callable[[Any], Any] | None = None,
    *,
    layers: str | Sequence[str | Callable[[Any], Any]] | None = None,
    call: int | None = None,
    output: str | int | Callable | None = None,
    activation_layout: str | Layout | None = None,
) -> Tap:
    """Split a Flax NNX model at a submodule.

    Args:
      model: an ``nnx.Module``; ``model(x) -> scores``.
      layer: a dotted attribute path (``"backbone.stage4"``, list items by index:
        ``"layers.3"``; see :func:`nnx_layers`) or a callable picking the submodule
        (``lambda m: m.backbone.stage4``).
      layers: instead of ``layer``, several layers from one forward pass: dotted paths, glob
        patterns over them (``"blocks.*"``: ``*`` stays within a path segment, ``**`` crosses
        them) and callables. The tap returns ``(scores, {path: A})`` in call order, keyed by
        each submodule's dotted path; ``tap.select(path)`` is a single-layer tap on one.
      call: which call of the layer to tap when it is called more than once in a forward pass
        (0 is the first; with ``layers``, the same call of every layer). By default a layer
        called twice is an error.
      output, activation_layout: as in :func:`linen_tap`.

    The model is split once with ``nnx.split``; each run merges a fresh copy whose submodules
    report their calls, so the user's model is never edited. The tap's parameters are the
    model's state (a pytree), so explainers can be jitted and differentiated with respect to
    them. Layers inside ``nnx.scan`` / ``nnx.vmap`` bodies cannot be tapped from outside.

    Returns:
      A :class:`~gradcam_jax.Tap`; its parameters are the model's state.

    Raises (when the tap is first run or traced):
      ValueError: the layer was not called (the message lists the layers that were, in order),
        or it was called several times and ``call`` was not given.

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
      ...                        lambda a: a.mean(axis=(1, 2)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> tap = gcj.nnx_tap(model, "layers.0")
      >>> gcj.grad_cam(tap, jnp.ones((1, 8, 8, 3)), 1).shape
      (1, 8, 8)
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    if layers is not None:
        if layer is not None:
            raise TypeError("nnx_tap: give layer= (one layer) or layers=[...] (several), not both.")
        return _nnx_multi_tap(
            model, graphdef, state, _nnx_layer_set(model, layers), call, output, activation_layout
        )
    pick: Callable[[Any], Any]
    if isinstance(layer, str):
        label = layer
        pick = functools.partial(_resolve_path, path=layer)
    elif callable(layer):
        label = getattr(layer, "__name__", "layer")
        pick = layer
    else:
        raise TypeError(f"nnx_tap: layer must be a dotted path or a callable; got {layer!r}.")
    pick(model)  # fail early on a bad path

    def apply(state, x, edit):
        m = nnx.merge(graphdef, state)
        run = _NnxRun(Recorder("nnx_tap", "layer", label, call, edit, _check_output))
        _instrument(m, run)
        target = id(pick(m))
        if target not in run.paths:
            raise ValueError(f"nnx_tap: the layer {label!r} is not a submodule reachable from the model.")
        run.names[target] = label
        scores = run.forward(m, x)
        return scores, run.recorder.activations(f"Layers called, in order: {_shown(run.called)}.")

    tap = Tap(KeyedFunction(apply, ("nnx", ByIdentity(model), hashable(layer), call)), state, label)
    return adapt_tap(tap, output=output, activation_layout=activation_layout)


def _nnx_multi_tap(model, graphdef, state, chosen: LayerSet, call, output, activation_layout) -> Tap:
    """:func:`nnx_tap` with ``layers=``: the layers matched by their dotted paths."""
    from flax import nnx

    def apply(state, x, edit):
        m = nnx.merge(graphdef, state)
        run = _NnxRun(Recorder("nnx_tap", "layer", chosen, call, edit, _check_output))
        _instrument(m, run)
        scores = run.forward(m, x)
        return scores, run.recorder.activations(f"Layers called, in order: {_shown(run.called)}.")

    key = ("nnx", ByIdentity(model), chosen, call)
    tap = Tap(KeyedFunction(apply, key), state, ", ".join(chosen.entries), chosen.entries)
    return adapt_tap(tap, output=output, activation_layout=activation_layout)
