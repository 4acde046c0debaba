"""Several layers in one pass: layer names and glob patterns, and the record of one forward pass.

Every adapter names layers its own way (Linen and Hugging Face module paths ``"stage4/block2"``,
NNX dotted paths ``"layers.3"``, Haiku module names ``"mlp/~/linear_0"``, Keras layer names,
:func:`marked_tap`'s marks). ``layers=`` takes a list of such names and glob patterns over them:
``*`` matches within one path segment (not across the separator, ``"/"`` or ``"."``), ``**``
across segments, ``?`` one character, ``[abc]`` / ``[!abc]`` one of a set. A layer matched by
several entries is tapped once; a pattern that matches nothing is an error listing the layers.

:class:`Recorder` is what the adapters share: one forward pass's record of which layers were
entered (in order, for messages), how often each tapped layer was called, the outputs taken,
and the edit applied to them. Its :meth:`Recorder.activations` returns one array for a
single-layer tap and a dict ``{layer: A}`` in entry order for a multi-layer tap, after the
call-count checks (a layer called twice needs ``call=``, for every tapped layer alike).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._callables import KeyedFunction, hashable
from ._tap import Edit, LayerDict, Tap

__all__ = [
    "LayerSet",
    "layer_set",
    "is_pattern",
    "glob_regex",
    "Recorder",
    "check_calls",
    "shown",
    "marked_tap",
    "marked_layers",
]


def is_pattern(entry: str) -> bool:
    """Whether a ``layers=`` entry is a glob pattern (holds ``*``, ``?`` or ``[``)."""
    return any(c in entry for c in "*?[")


def glob_regex(pattern: str, sep: str = "/") -> re.Pattern:
    """A compiled regex for a glob over layer paths whose segments are separated by ``sep``.

    Examples:
      >>> from gradcam_jax._layerset import glob_regex
      >>> [bool(glob_regex("encoder/layer_*/attention").match(p)) for p in
      ...  ("encoder/layer_0/attention", "encoder/layer_0/x/attention", "encoder/layer_1/mlp")]
      [True, False, False]
      >>> bool(glob_regex("encoder/**/attention").match("encoder/layer_0/x/attention"))
      True
    """
    one = f"[^{re.escape(sep)}]"
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(one + "*")
        elif c == "?":
            out.append(one)
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclasses.dataclass(frozen=True)
class LayerSet:
    """The layers a multi-layer tap records: names and glob patterns, as given, and the separator
    of the adapter's paths. Hashable (part of the tap's compilation key)."""

    entries: tuple[str, ...]
    sep: str = "/"

    def __post_init__(self):
        regexes = tuple(glob_regex(e, self.sep) if is_pattern(e) else None for e in self.entries)
        object.__setattr__(self, "regexes", regexes)

    def entry_matches(self, i: int, name: str) -> bool:
        rx = self.regexes[i]  # type: ignore[attr-defined]
        return name == self.entries[i] if rx is None else rx.match(name) is not None

    def matches(self, name: str) -> bool:
        """Whether ``name`` is one of the names or matches one of the patterns."""
        return any(self.entry_matches(i, name) for i in range(len(self.entries)))

    def unmatched(self, names) -> list[str]:
        """The entries that match none of ``names``."""
        names = list(names)
        return [e for i, e in enumerate(self.entries) if not any(self.entry_matches(i, n) for n in names)]

    def missing_message(self, adapter: str, kind: str, names, listing: str) -> str | None:
        """The error for entries matching none of ``names`` (the layers called), or ``None``."""
        missing = self.unmatched(names)
        if not missing:
            return None
        what = "; ".join(
            f"pattern {e!r} matched no {kind} called" if is_pattern(e) else f"{kind} {e!r} was not called"
            for e in missing
        )
        return f"{adapter}: {what} (layers={list(self.entries)!r}). {listing}"


def layer_set(layers, who: str, sep: str = "/", strip: str = "") -> LayerSet:
    """``layers=`` (a name or pattern, or a sequence of them) as a :class:`LayerSet`, checked."""
    entries = (layers,) if isinstance(layers, str) else layers
    if not isinstance(entries, Sequence) or not entries or not all(isinstance(e, str) for e in entries):
        raise TypeError(
            f"{who}: layers must be a layer name or glob pattern, or a non-empty list of them, e.g. "
            f"layers=['stage3', 'stage4'] or layers='encoder/layer_*/attention'; got {layers!r}."
        )
    cleaned = tuple(dict.fromkeys(e.strip(strip) if strip else e for e in entries))
    if not all(cleaned):
        raise ValueError(f"{who}: layers holds an empty name; got {layers!r}.")
    return LayerSet(cleaned, sep)


def shown(names: list[str], limit: int = 60) -> str:
    """A list of layer names for a message (the first ``limit``, then how many more)."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "(none)"


class Recorder:
    """One forward pass's record of the tapped layer(s) of an adapter.

    The adapter calls :meth:`enter` when a layer is entered (every layer, so messages can list
    them) and, for a tapped layer, :meth:`output` with its output, which returns what the
    layers above must see. :meth:`activations` then checks the calls and returns the result.

    Args:
      adapter: the adapter's name, for messages (``"linen_tap"``).
      kind: what it calls a layer (``"layer"``, ``"module"``).
      layer: the one layer's name (single-layer tap) or a :class:`LayerSet` (multi-layer tap).
      call: which call of a layer called several times to tap (the same for every layer).
      edit: the tap's :class:`~gradcam_jax.Edit` (dict-valued for a multi-layer tap) or ``None``.
      check_output: ``(name, out) -> None``, raising for an output that is not one array.
    """

    def __init__(
        self,
        adapter: str,
        kind: str,
        layer: str | LayerSet,
        call: int | None,
        edit: Edit | None,
        check_output: Callable[[str, Any], None] | None = None,
    ):
        self.adapter, self.kind, self.layer, self.call, self.edit = adapter, kind, layer, call, edit
        self.check_output = check_output
        self.multi = isinstance(layer, LayerSet)
        self.called: list[str] = []  # every layer entered, in order (repeats kept)
        self.order: dict[str, int] = {}  # tapped layers, by first entry
        self.hits: dict[str, int] = {}
        self.taken: dict[str, Any] = {}

    def wants(self, name: str) -> bool:
        """Whether the layer ``name`` is tapped."""
        if not name:  # the model itself (Linen's root module) is not a layer
            return False
        return self.layer.matches(name) if isinstance(self.layer, LayerSet) else name == self.layer

    def enter(self, name: str) -> bool:
        """Record that ``name`` was entered; whether it is tapped."""
        self.called.append(name)
        wanted = self.wants(name)
        if wanted:
            self.order.setdefault(name, len(self.order))
        return wanted

    def output(self, name: str, out):
        """Count a call of the tapped layer ``name``; take and edit its output if it is the one."""
        index = self.hits.get(name, 0)
        self.hits[name] = index + 1
        self.order.setdefault(name, len(self.order))
        if self.call is not None and self.call != index:
            return out
        if self.check_output is not None:
            self.check_output(name, out)
        self.taken.setdefault(name, out)
        edit = self.edit.at(name) if self.multi and self.edit is not None else self.edit
        return out if edit is None else edit(out)

    def activations(self, listing: str, not_called: str | None = None):
        """After the forward pass: ``A`` (single layer) or ``{layer: A}`` in entry order.

        ``listing`` names the layers that exist (``"Layers called, in order: ..."``);
        ``not_called`` overrides the single-layer "was not called" message.
        """
        what = f"{self.kind} {{!r}}"
        if not isinstance(self.layer, LayerSet):
            message = not_called or f"{self.adapter}: {what.format(self.layer)} was not called. {listing}"
            hits = self.hits.get(self.layer, 0)
            check_calls(
                self.adapter, what.format(self.layer), hits, self.call, self.layer in self.taken, message
            )
            return self.taken[self.layer]
        missing = self.layer.missing_message(self.adapter, self.kind, self.hits, listing)
        if missing:
            raise ValueError(missing)
        for name in self.order:
            check_calls(self.adapter, what.format(name), self.hits[name], self.call, name in self.taken, "")
        acts = LayerDict((name, self.taken[name]) for name in sorted(self.order, key=self.order.__getitem__))
        unknown = [k for k in (self.edit.value if self.edit is not None else ()) if k not in acts]
        if unknown:  # a misspelt layer in a delta or replacement would otherwise be ignored
            raise ValueError(
                f"{self.adapter}: the tap's edit names layer(s) {', '.join(map(repr, unknown))} that it does "
                f"not record; its layers, in call order: {', '.join(acts)}."
            )
        return acts


def check_calls(adapter: str, what: str, hits: int, call: int | None, taken: bool, not_called: str) -> None:
    """After a forward pass through an adapter's model: the tapped layer was called, once, or
    ``call`` picks one of its calls. ``what`` names it (``"layer 'stage4'"``); ``not_called`` is
    the adapter's message for a layer never called (it lists what was)."""
    if not hits:
        raise ValueError(not_called)
    if call is None and hits > 1:
        kind = what.split()[-2]  # "layer" / "module"
        raise ValueError(
            f"{adapter}: {what} was called {hits} times in one forward pass (a shared or recurrent "
            f"{kind}). Pick one call with {adapter}(..., call=i), 0 <= i < {hits}."
        )
    if call is not None and not taken:
        raise ValueError(
            f"{adapter}: call={call} asked for, but {what} was called only {hits} time(s); "
            f"use 0 <= call < {hits}."
        )


def _check_array(adapter: str) -> Callable[[str, Any], None]:
    def check(name, out):
        if not hasattr(out, "shape") or not hasattr(out, "dtype"):
            raise TypeError(
                f"{adapter}: the layer {name!r} is {type(out).__name__}, not an array. Mark (or tap) a "
                f"single array."
            )

    return check


def marked_tap(
    forward: Callable,
    layer: str | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    call: int | None = None,
) -> Tap:
    """A tap from a plain function that marks its layers: ``forward(x, mark) -> scores``.

    Inside ``forward``, ``h = mark("stage3", h)`` names an intermediate array; ``mark`` returns
    it unchanged for a plain run, and edited (``A + delta``, or a replacement) for the marked
    layers the tap records. This is :func:`~gradcam_jax.split_tap`'s counterpart for several
    layers, or for a layer inside a network whose parts cannot be split into two functions
    (skip connections past the layer). ``forward`` must be a JAX-traceable function.

    Args:
      forward: ``forward(x, mark) -> scores``; ``mark(name, array) -> array``.
      layer: tap this one marked layer (``tap(x) -> (scores, A)``).
      layers: tap several: names or glob patterns (``"stage*"``, segments separated by ``"/"``);
        ``tap(x) -> (scores, {layer: A})`` in call order. Give ``layer`` or ``layers``.
      call: which call to tap when a name is marked several times (0 is the first); by default
        that is an error.

    Returns:
      A :class:`~gradcam_jax.Tap` (no parameters of its own: arrays ``forward`` closes over are
      constants; bind them with ``functools.partial`` to trace them).

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> def forward(x, mark):
      ...     h = mark("stage1", jnp.tanh(x))
      ...     h = mark("stage2", h * 2.0)
      ...     return h.mean(axis=(1, 2))
      >>> tap = gcj.marked_tap(forward, layers=["stage1", "stage2"])
      >>> out = gcj.activations_and_grads(tap, jnp.ones((1, 4, 4, 3)), target=0)
      >>> {k: v.shape for k, v in out.grads.items()}
      {'stage1': (1, 4, 4, 3), 'stage2': (1, 4, 4, 3)}
    """
    if not callable(forward):
        raise TypeError(
            f"marked_tap: forward must be a function forward(x, mark) -> scores; got {forward!r}."
        )
    if (layer is None) == (layers is None):
        raise TypeError("marked_tap: give layer='name' (one layer) or layers=[...] (several), not both.")
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise TypeError(f"marked_tap: layer must be a non-empty name; got {layer!r}.")
    chosen: str | LayerSet = layer if layers is None else layer_set(layers, "marked_tap")  # type: ignore[assignment]

    def apply(params, x, edit):
        rec = Recorder("marked_tap", "layer", chosen, call, edit, _check_array("marked_tap"))

        def mark(name, a):
            return rec.output(name, a) if rec.enter(name) else a

        scores = forward(x, mark)
        return scores, rec.activations(f"Layers marked, in order: {shown(rec.called)}.")

    key = ("marked", hashable(forward), chosen, call)
    entries = None if isinstance(chosen, str) else chosen.entries
    name = chosen if isinstance(chosen, str) else ", ".join(chosen.entries)
    return Tap(KeyedFunction(apply, key), (), name, entries)


def marked_layers(forward: Callable, x) -> list[str]:
    """The names ``forward(x, mark)`` marks on ``x``, in call order (traced, not run).

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> gcj.marked_layers(lambda x, mark: mark("b", mark("a", x) + 1.0).sum(), jnp.ones((2, 3)))
      ['a', 'b']
    """
    names: list[str] = []

    def mark(name, a):
        names.append(name)
        return a

    jax.eval_shape(lambda x: forward(x, mark), x)
    return names
