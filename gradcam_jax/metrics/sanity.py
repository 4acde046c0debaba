"""Sanity checks for saliency maps (Adebayo et al. 2018): cascading parameter randomisation.

An explanation that explains the *model* must change when the model's learned weights are
destroyed. Re-initialise the layers one at a time from the top (the logits) down, keeping the
earlier re-initialisations (cascading), explain the same images after each step, and compare
with the explanation of the trained model. Gradients and Grad-CAM decorrelate quickly (they
pass); Guided Backprop and Guided Grad-CAM stay almost the same down to the lowest layers
(they fail: they behave like edge detectors of the input).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._inputs import InputView
from .._layout import Layout
from ._common import SPATIAL_AXES, check_inputs
from ._saliency import pixel_saliency
from .similarity import spearman, ssim

__all__ = ["randomize_layers", "cascading_randomization", "Sanity", "sanity_check", "SIMILARITIES"]


def _as_dict(tree):
    try:
        from flax.core import unfreeze

        return unfreeze(tree)
    except Exception:  # plain dicts, or Flax not installed
        return tree


def _get_path(tree, parts):
    node = tree
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _set_path(tree, parts, value):
    """A copy of nested dict ``tree`` with ``tree[parts...] = value`` (copies along the path only)."""
    if not parts:
        return value
    out = dict(tree)
    out[parts[0]] = _set_path(tree[parts[0]], parts[1:], value)
    return out


def _layer_parts(layer: str) -> list[str]:
    parts = [p for p in str(layer).replace(".", "/").split("/") if p]
    if not parts:
        raise ValueError(f"randomize_layers: empty layer name {layer!r}.")
    return parts


@jax.jit
def _permute(key, leaf):
    return jax.random.permutation(key, leaf.reshape(-1)).reshape(leaf.shape)


def _shuffle_leaf(key, leaf):
    """A random permutation of the leaf's entries: same values, learned arrangement gone."""
    leaf = jnp.asarray(leaf)
    if leaf.size <= 1 or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf
    return _permute(key, leaf)


def randomize_layers(
    variables,
    layers: Sequence[str],
    *,
    key=None,
    random_variables=None,
    collections: Sequence[str] | None = None,
):
    """The same variables with the given layers re-initialised (all of them at once).

    Args:
      variables: a Flax Linen variables pytree, ``{"params": {...}, "batch_stats": {...}}``.
      layers: module paths such as ``"fc"``, ``"blocks_15"`` or ``"blocks_15/project"``
        (``"/"``- or ``"."``-separated), looked up in each collection.
      random_variables: freshly initialised variables of the same module (``module.init(key,
        x)``): a layer is re-initialised by taking its subtree from here — the model's own
        initialisers, as in Adebayo et al. Recommended.
      key: without ``random_variables``, every floating leaf of the layer is replaced by a random
        permutation of its own entries (its distribution of values kept, the learned structure
        destroyed), drawn from ``key``.
      collections: the collections to re-initialise (default: every collection in which the
        layer exists, e.g. ``params`` and BatchNorm's ``batch_stats``).

    Returns:
      a new variables pytree (the input is not modified).

    Raises:
      ValueError: a layer exists in none of the collections (the message lists the top-level
        names that exist).
    """
    if random_variables is None and key is None:
        raise ValueError("randomize_layers: pass random_variables= (module.init with a new key) or key=.")
    out = _as_dict(variables)
    rand = None if random_variables is None else _as_dict(random_variables)
    cols = list(out.keys()) if collections is None else list(collections)
    for i, layer in enumerate(layers):
        parts = _layer_parts(layer)
        found = False
        for c, col in enumerate(cols):
            if col not in out:
                raise ValueError(
                    f"randomize_layers: no collection {col!r}; the variables hold {sorted(out)}."
                )
            sub = _get_path(out[col], parts)
            if sub is None:
                continue
            found = True
            if rand is not None:
                new = _get_path(rand.get(col, {}), parts)
                if new is None:
                    raise ValueError(
                        f"randomize_layers: random_variables has no {col}/{'/'.join(parts)}; "
                        f"initialise the same module."
                    )
            else:
                leaves, treedef = jax.tree_util.tree_flatten(sub)
                keys = jax.random.split(
                    jax.random.fold_in(jax.random.fold_in(key, i), c), max(len(leaves), 1)
                )
                new = jax.tree_util.tree_unflatten(
                    treedef, [_shuffle_leaf(k, leaf) for k, leaf in zip(keys, leaves, strict=True)]
                )
            out = dict(out)
            out[col] = _set_path(out[col], parts, new)
        if not found:
            names = sorted({k for col in cols if isinstance(out.get(col), Mapping) for k in out[col]})
            raise ValueError(
                f"randomize_layers: layer {layer!r} is in none of the collections {cols}. "
                f"Top-level layers: {', '.join(names[:60])}."
            )
    return out


def cascading_randomization(
    variables, layers: Sequence[str], *, key=None, random_variables=None, collections=None
) -> list[tuple[str, object]]:
    """The cascade: ``[("original", variables), (layers[0], ...), (layers[1], ...), ...]``.

    Step ``i`` has ``layers[0] ... layers[i]`` re-initialised (:func:`randomize_layers`), so
    ``layers`` should run from the top of the network (the logits) down. Without
    ``random_variables``, step ``i`` uses ``fold_in(key, i)`` for its permutations (each layer
    is permuted once; later steps keep the earlier layers' permutations).
    """
    steps = [("original", variables)]
    current = variables
    for i, layer in enumerate(layers):
        current = randomize_layers(
            current,
            [layer],
            key=None if key is None else jax.random.fold_in(key, i),
            random_variables=random_variables,
            collections=collections,
        )
        steps.append((str(layer), current))
    return steps


def _as_maps(m, reduce, view: InputView):
    """``explain``'s output as maps ``(B, *spatial)``: maps as they are, attributions with
    channels (in the input's layout) collapsed by :func:`pixel_saliency`."""
    m = jnp.asarray(m, jnp.float32)
    rank = view.spatial_rank
    if m.ndim == rank + 2:
        m = pixel_saliency(m, reduce, layout=view.layout)
    if m.ndim != rank + 1:
        axes = SPATIAL_AXES[rank]
        raise ValueError(
            f"sanity_check: explain must return (B, {axes}) maps or (B, {axes}, C) attributions (in "
            f"the images' layout); got {m.shape}."
        )
    return m


def _unit(m):
    """|m| scaled by its maximum to [0, 1] per map (0 stays 0): the maps SSIM compares."""
    a = jnp.abs(m)
    top = jnp.max(a, axis=tuple(range(1, m.ndim)), keepdims=True)
    return jnp.where(top > 0, a / jnp.where(top > 0, top, 1.0), 0.0)


SIMILARITIES: dict[str, Callable] = {
    "spearman": lambda a, b: spearman(a, b),
    "spearman_abs": lambda a, b: spearman(a, b, absolute=True),
    "ssim": lambda a, b: ssim(_unit(a), _unit(b), data_range=1.0),
}


def _similarity_names(names: Sequence[str] | None, rank: int) -> tuple[str, ...]:
    """The similarities to compute: ``names``, checked, or the default for maps of ``rank``."""
    if names is None:
        return ("spearman", "spearman_abs") + (("ssim",) if rank == 2 else ())
    for name in names:
        if name not in SIMILARITIES:
            raise ValueError(
                f"sanity_check: unknown similarity {name!r}; available: {', '.join(SIMILARITIES)}."
            )
    if "ssim" in names and rank != 2:
        raise ValueError(
            f"sanity_check: SSIM is a 2-D image measure; these inputs have {rank} spatial axes. Use "
            f"similarities=('spearman', 'spearman_abs')."
        )
    return tuple(names)


class Sanity(NamedTuple):
    """Result of :func:`sanity_check`.

    ``steps``: ``("original", layer_0, layer_1, ...)``; ``similarity``: metric name ->
    ``(len(steps), B)`` similarity of each image's map at each step to its original map (step 0
    compares the original with itself); ``maps``: the maps at every step, ``(len(steps), B,
    *spatial)``, when kept.
    """

    steps: tuple[str, ...]
    similarity: dict[str, np.ndarray]
    maps: jax.Array | None = None

    def mean(self, name: str = "spearman_abs") -> np.ndarray:
        """The mean similarity over images at each step ``(len(steps),)``."""
        return np.asarray(self.similarity[name]).mean(axis=1)

    def table(self, names: Sequence[str] | None = None, fmt: str = "{:.3f}") -> str:
        names = list(self.similarity) if names is None else list(names)
        width = max(len(s) for s in self.steps + ("step",))
        lines = [f"{'step':<{width}} | " + " | ".join(f"{n:>12}" for n in names)]
        lines.append("-" * len(lines[0]))
        for i, step in enumerate(self.steps):
            lines.append(
                f"{step:<{width}} | " + " | ".join(f"{fmt.format(self.mean(n)[i]):>12}" for n in names)
            )
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def sanity_check(
    explain: Callable,
    variables,
    layers: Sequence[str],
    images,
    *,
    key=None,
    random_variables=None,
    collections=None,
    similarities: Sequence[str] | None = None,
    reduce: str = "abs_sum",
    keep_maps: bool = False,
    layout: str | Layout | None = None,
    input: Any = None,
) -> Sanity:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018).

    For the trained ``variables`` and after each step of :func:`cascading_randomization` (the
    ``layers`` re-initialised cumulatively, top to bottom), ``explain(variables, images)``
    gives maps, which are compared with the trained model's maps image by image:

    - ``"spearman"``: Spearman rank correlation of the maps (:func:`spearman`);
    - ``"spearman_abs"``: the same on absolute values;
    - ``"ssim"``: SSIM (:func:`ssim`) of the absolute maps scaled to [0, 1] by their maximum.

    Signals and volumes (maps ``(B, T)``, ``(B, D, H, W)``) get the correlations only: SSIM is
    2-D, so the default similarities are all three for images and the two Spearman ones
    otherwise (``"ssim"`` is refused there). Attributions with channels (Guided Backprop's
    ``(B, H, W, C)``; ``(B, C, H, W)`` with ``layout="NCHW"``) are first collapsed to maps by
    :func:`pixel_saliency` (``reduce``, default the sum of absolute values over channels).

    A method passes when the similarity falls as layers are randomised. Keep the explained
    class fixed across steps (pass the trained model's classes as the target inside
    ``explain``): otherwise a randomised model's top class is explained instead.

    Args:
      explain: ``explain(variables, images) -> maps``. Build taps once and swap parameters,
        e.g. ``lambda v, x: gcj.grad_cam(tap.with_params(v), x, target=labels)`` with
        ``tap = gcj.linen_tap(module, variables, "head")``, so each step reuses the compiled
        explainer.
      variables: the trained Flax Linen variables.
      layers: module paths, from the top of the network down (``["fc", "head", "blocks_15",
        ...]``).
      images: ``explain``'s inputs, as for :func:`gradcam_jax.cam` (only their shapes are read).
      key, random_variables, collections: see :func:`randomize_layers`.
      similarities: names in :data:`SIMILARITIES` (default: see above).
      reduce: how channel attributions are collapsed.
      keep_maps: also return every step's maps.
      layout, input: the image of ``images`` and its layout, as for :func:`gradcam_jax.cam`.

    Returns:
      a :class:`Sanity` (``.mean("spearman")``, ``.table()``).

    References:
      Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps",
      NeurIPS 2018, §3.1 and Fig. 2, https://arxiv.org/abs/1810.03292.
    """
    view = check_inputs(images, layout, input, "sanity_check")
    similarities = _similarity_names(similarities, view.spatial_rank)
    cascade = cascading_randomization(
        variables, layers, key=key, random_variables=random_variables, collections=collections
    )
    base = None
    sims: dict[str, list] = {n: [] for n in similarities}
    kept = []
    for _, v in cascade:
        m = _as_maps(explain(v, images), reduce, view)
        if base is None:
            base = m
        for n in similarities:
            sims[n].append(np.asarray(SIMILARITIES[n](base, m)))
        if keep_maps:
            kept.append(m)
    return Sanity(
        tuple(s for s, _ in cascade),
        {n: np.stack(v) for n, v in sims.items()},
        jnp.stack(kept) if keep_maps else None,
    )
