"""Adapter: build a :class:`~gradcam_jax.Tap` from a Keras 3 model on the JAX backend.

The tap runs the model statelessly, ``model.stateless_call(trainable, non_trainable, x,
training=False)``, with the variable values as its parameters (traced by ``jit``,
differentiable). Keras 3 has no forward hooks, so the layer is tapped by shadowing its ``call``
method **on that layer object only, for the duration of one traced call**: ``Layer.__call__``
looks ``self.call`` up at every call, so an instance attribute holding a wrapper (the original
bound method, then the edit, then a record of the output) is seen by Sequential, Functional and
subclassed models alike, nested sub-models included. The instance attribute is removed (or the
user's own one put back) in a ``finally`` block, so the model is unchanged after each call.

Why not a functional sub-graph (``keras.Model(model.inputs, [layer.output, model.output])``)?
It returns ``A`` but cannot replace it on its way up, it needs two graphs for the two halves,
which breaks on skip connections that jump past the layer, and subclassed models have no graph.

Concurrency: the shadowing happens under one process-wide re-entrant lock, so two traces of
Keras taps never overlap, and the wrapper edits and records only in the thread that installed
it; another thread that calls the same model directly meanwhile gets the layer's plain output.
Keras is imported inside the functions, so ``import gradcam_jax`` does not need it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._callables import ByIdentity, KeyedFunction
from ._layerset import LayerSet, Recorder, glob_regex, is_pattern
from ._layout import Layout
from ._tap import Tap, adapt_tap

__all__ = ["keras_tap", "keras_layers"]

# Held while a layer's ``call`` is shadowed (re-entrant: a trace may nest another).
_SHADOW_LOCK = threading.RLock()


def _keras():
    """The ``keras`` module, checked to run on the JAX backend."""
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            f"keras_tap needs Keras on the JAX backend, but Keras runs on {backend!r}. Set the "
            f"environment variable KERAS_BACKEND=jax before importing keras (e.g. "
            f"os.environ['KERAS_BACKEND'] = 'jax' at the top of the script)."
        )
    return keras


def _walk(layer, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for every layer reachable through ``.layers`` (sub-models recursively)."""
    from keras.layers import InputLayer

    for sub in getattr(layer, "layers", None) or ():
        if isinstance(sub, InputLayer):  # never called: its tensor is the model's input
            continue
        path = prefix + sub.name
        yield path, sub
        yield from _walk(sub, path + "/")


def keras_layers(model) -> list[str]:
    """The names of a Keras model's layers, sub-models' layers included as ``"outer/inner"``.

    The order is the model's: call order for Sequential and Functional models (their graph),
    the order the layers were assigned in a subclassed model. Use it to find the ``layer=``
    for :func:`keras_tap`; layers a custom ``Layer`` holds internally are not listed (pass
    them to :func:`keras_tap` as objects).

    Args:
      model: a Keras 3 model.

    Returns:
      The layer names (input layers left out).

    Examples:
      >>> import os
      >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")  # before importing keras
      >>> import keras, gradcam_jax as gcj
      >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"),
      ...                           keras.layers.GlobalAveragePooling2D(name="pool")])
      >>> gcj.keras_layers(model)
      ['conv', 'pool']
    """
    return [path for path, _ in _walk(model)]


def _find_layer(model, layer) -> tuple[Any, str]:
    """The layer object and its label, from a name, an ``"outer/inner"`` path or the object."""
    found = list(_walk(model))
    if not isinstance(layer, str):
        if not callable(getattr(layer, "call", None)):
            raise TypeError(f"keras_tap: layer must be a layer name or a Keras layer; got {layer!r}.")
        if layer is model:
            raise ValueError("keras_tap: the layer is the model itself; tap one of its layers.")
        return layer, next((p for p, sub in found if sub is layer), layer.name)
    matches = {id(sub): (sub, p) for p, sub in found if layer in (p, sub.name)}
    if not matches:
        names = [p for p, _ in found]
        shown = ", ".join(names[:80]) + (f", ... ({len(names) - 80} more)" if len(names) > 80 else "")
        raise ValueError(
            f"keras_tap: the model has no layer {layer!r}. Its layers, in order: {shown or '(none)'}."
        )
    if len(matches) > 1:
        paths = ", ".join(p for _, p in matches.values())
        raise ValueError(
            f"keras_tap: {len(matches)} layers are named {layer!r} ({paths}); pass the path "
            f"'outer/inner' or the layer object."
        )
    sub, path = next(iter(matches.values()))
    return sub, path


@contextlib.contextmanager
def _shadowed(layer, record: Callable, enter: Callable | None = None) -> Iterator[None]:
    """``layer.call`` (``quantized_call`` for a quantized layer) wrapped by ``record`` (and
    ``enter``, called before the layer runs) on this object only, in this thread only, until the
    block ends."""
    attr = "quantized_call" if getattr(layer, "quantization_mode", None) is not None else "call"
    with _SHADOW_LOCK:
        own = vars(layer)
        had, saved = attr in own, own.get(attr)
        original = getattr(layer, attr)
        owner = threading.get_ident()

        def wrapper(*args, **kwargs):
            mine = threading.get_ident() == owner
            if mine and enter is not None:
                enter()
            out = original(*args, **kwargs)
            return record(out) if mine else out

        # object.__setattr__: a plain instance attribute, kept out of Keras' attribute tracking.
        object.__setattr__(layer, attr, wrapper)
        try:
            yield
        finally:
            if had:
                object.__setattr__(layer, attr, saved)
            else:
                object.__delattr__(layer, attr)


def _check_output(label: str, out) -> None:
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ValueError(
            f"keras_tap: the layer {label!r} returns {type(out).__name__}, not an array. Tap a "
            f"layer whose output is a single array."
        )


def _find_layers(model, layers) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``layers=`` of :func:`keras_tap`: ``{path: layer object}`` (in the model's order) and the
    entries as given (names, paths and glob patterns; a layer object by its path)."""
    entries = [layers] if isinstance(layers, str) or not isinstance(layers, Sequence) else list(layers)
    if not entries:
        raise TypeError("keras_tap: layers must hold at least one layer name, glob pattern or layer.")
    found = list(_walk(model))
    chosen: dict[str, Any] = {}
    given: list[str] = []
    for entry in entries:
        if not (isinstance(entry, str) and is_pattern(entry)):
            sub, path = _find_layer(model, entry)
            chosen.setdefault(path, sub)
            given.append(path)
            continue
        rx = glob_regex(entry, "/")
        hits = [(path, sub) for path, sub in found if rx.match(path) or rx.match(sub.name)]
        if not hits:
            raise ValueError(
                f"keras_tap: pattern {entry!r} matches no layer. Layers of the model, in order: "
                f"{', '.join(p for p, _ in found) or '(none)'}."
            )
        for path, sub in hits:
            chosen.setdefault(path, sub)
        given.append(entry)
    order = {path: i for i, (path, _) in enumerate(found)}
    chosen = dict(sorted(chosen.items(), key=lambda item: order.get(item[0], len(order))))
    return chosen, tuple(dict.fromkeys(given))


def _takes_training(model) -> bool:
    """Whether ``model.call`` accepts ``training=`` (``stateless_call`` passes it on as is)."""
    try:
        params = inspect.signature(model.call).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "training" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def keras_tap(
    model,
    layer=None,
    *,
    layers=None,
    call: int | None = None,
    output: str | int | Callable | None = None,
    activation_layout: str | Layout | None = None,
) -> Tap:
    """Split a Keras 3 model (JAX backend) at one of its layers.

    Args:
      model: a built Keras model (Sequential, Functional or subclassed).
      layer: the layer's name (as :func:`keras_layers` lists it; ``"outer/inner"`` for a layer
        of a sub-model) or the layer object.
      layers: instead of ``layer``, several layers from one forward pass: names, paths, layer
        objects and glob patterns over the paths (``"conv*"``, ``"block_*/conv"``; ``*`` stays
        within a ``/`` segment, ``**`` crosses them). The tap returns ``(scores, {path: A})``
        in call order; ``tap.select(path)`` is a single-layer tap on one of them.
      call: which call of the layer to tap when it is called more than once (0 is the first;
        with ``layers``, the same call of every layer). By default a layer called twice is an
        error.
      output: how to read the scores from the model's output (a field name, an index or a
        callable; by default an array as is, or its ``.logits``).
      activation_layout: the layer's output layout when it is not channels-last, e.g.
        ``"NCHW"`` for a ``data_format="channels_first"`` convolution (pass ``layout="NCHW"``
        to the explainers for the input too).

    Returns:
      A :class:`~gradcam_jax.Tap` whose parameters are ``(trainable values, non-trainable
      values)``, two lists of arrays read from the model's variables now (build a new tap after
      training). The model runs with ``training=False``; its state updates are dropped.

    Raises:
      RuntimeError: Keras does not run on the JAX backend (set ``KERAS_BACKEND=jax``).
      ValueError: no layer has that name (the message lists the layers), the model is not
        built, or, when the tap is first run or traced, the layer was not called, was called
        several times without ``call``, or returned something other than an array.

    Layers under Keras rematerialisation (``RematScope``) cannot be tapped (their outputs live
    in an inner trace).

    Examples:
      >>> import os
      >>> _ = os.environ.setdefault("KERAS_BACKEND", "jax")  # before importing keras
      >>> import keras, numpy as np, gradcam_jax as gcj
      >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"),
      ...                           keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
      >>> tap = gcj.keras_tap(model, "conv")
      >>> [a.shape for a in tap(np.ones((1, 8, 8, 3), np.float32))]
      [(1, 2), (1, 6, 6, 4)]
    """
    # long-function: the docstring documents every option and example; the body is short.
    _keras()
    if not getattr(model, "built", False) or not callable(getattr(model, "stateless_call", None)):
        raise ValueError(
            f"keras_tap: the model ({type(model).__name__}) must be a built Keras model: call it on a "
            f"batch or model.build(input_shape) first."
        )
    if (layer is None) == (layers is None):
        raise TypeError("keras_tap: give layer= (one layer) or layers=[...] (several), not both.")
    chosen: str | LayerSet
    entries: tuple[str, ...] | None = None
    if layers is None:
        target, label = _find_layer(model, layer)
        targets, chosen = {label: target}, label
    else:
        targets, entries = _find_layers(model, layers)
        chosen, label = LayerSet(tuple(targets)), ", ".join(entries)
    params = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    kwargs = {"training": False} if _takes_training(model) else {}

    def apply(params, x, edit):
        trainable, non_trainable = params
        rec = Recorder("keras_tap", "the layer", chosen, call, edit, _check_output)
        with contextlib.ExitStack() as stack:
            for path, sub in targets.items():
                record = functools.partial(rec.output, path)
                stack.enter_context(_shadowed(sub, record, functools.partial(rec.enter, path)))
            out, _ = model.stateless_call(list(trainable), list(non_trainable), x, **kwargs)
        listing = f"Layers of the model, in order: {', '.join(keras_layers(model)) or '(none)'}."
        not_called = f"keras_tap: the layer {label!r} was not called by the model's forward pass. {listing}"
        return out, rec.activations(listing, not_called)

    key = ("keras", ByIdentity(model), tuple(ByIdentity(t) for t in targets.values()), call)
    return adapt_tap(
        Tap(KeyedFunction(apply, key), params, label, entries),
        output=output,
        activation_layout=activation_layout,
    )
