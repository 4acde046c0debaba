"""Aggregating metrics over images and methods, and printing the table.

:class:`Report` collects per-image values (arrays over the batch, added batch after batch) for
each method and prints one row per method and one column per metric, with the direction in
which each metric improves. :func:`evaluate` computes every metric that the available ground
truth allows for one method's maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._layout import Layout
from .._tap import scores_fn
from ._common import check_inputs, nan_examples
from .localization import box_iou, localization_box
from .pointing import pointing_game
from .removal import confidence_change, deletion, insertion
from .road import road
from .similarity import faithfulness

__all__ = ["MetricInfo", "METRICS", "Report", "evaluate"]


class MetricInfo(NamedTuple):
    """How a metric reads: ``higher`` is better or not; per-image values are multiplied by
    ``scale`` when shown (1 or 100 for percentages); ``label`` names the column."""

    higher: bool
    scale: float
    label: str
    description: str


METRICS: dict[str, MetricInfo] = {
    "loc_error": MetricInfo(
        False,
        100.0,
        "loc err top-1 %",
        "top-1 localisation error (Grad-CAM §4.1): wrong class or box IoU < 0.5",
    ),
    "loc_error_top5": MetricInfo(
        False, 100.0, "loc err top-5 %", "top-5 localisation error: none of the 5 (class, box) guesses right"
    ),
    "iou": MetricInfo(True, 1.0, "box IoU", "IoU of the 15%-threshold box with the ground-truth box"),
    "pointing": MetricInfo(True, 100.0, "pointing %", "pointing game hit rate, no tolerance"),
    "pointing_15": MetricInfo(True, 100.0, "pointing@15 %", "pointing game hit rate, 15-pixel tolerance"),
    "deletion": MetricInfo(False, 1.0, "deletion AUC", "deletion AUC (RISE)"),
    "insertion": MetricInfo(True, 1.0, "insertion AUC", "insertion AUC (RISE)"),
    "avg_drop": MetricInfo(False, 1.0, "avg drop %", "Average Drop % (Grad-CAM++)"),
    "increase": MetricInfo(True, 100.0, "increase %", "Increase in Confidence % (Grad-CAM++)"),
    "road_morf": MetricInfo(
        False, 1.0, "ROAD MoRF", "ROAD, most relevant first: mean probability over fractions"
    ),
    "road_lerf": MetricInfo(
        True, 1.0, "ROAD LeRF", "ROAD, least relevant first: mean probability over fractions"
    ),
    "road_gap": MetricInfo(True, 1.0, "ROAD LeRF-MoRF", "ROAD: LeRF minus MoRF, mean over fractions"),
    "faithfulness": MetricInfo(True, 1.0, "faithfulness", "Spearman correlation with the occlusion map"),
}


def _info(name: str) -> MetricInfo:
    return METRICS.get(name, MetricInfo(True, 1.0, name, name))


class Report:
    """Per-image metric values for several methods, and their table.

    >>> r = Report("toy")
    >>> r.add("grad_cam", deletion=[0.1, 0.2], pointing=[True, True])
    >>> r.add("random", deletion=[0.4, 0.5], pointing=[False, True])
    >>> r.mean("grad_cam", "pointing")
    100.0
    >>> r.better("grad_cam", "random")
    {'pointing': True, 'deletion': True}

    Values added for the same method and metric in several calls are concatenated (one call per
    batch). Means are over images, shown multiplied by the metric's scale (percentages for
    rates); ``better(a, b)`` compares means in each metric's direction (:data:`METRICS`;
    unknown metrics count higher as better).

    NaN values (an example whose map or score was NaN: :func:`evaluate` gives NaN for every
    metric of it) are left out of the means and counted (:meth:`nan_count`); the table's
    footnote lists them, so a run with broken examples never reads as a clean one.
    """

    def __init__(self, title: str | None = None):
        self.title = title
        self._values: dict[str, dict[str, list]] = {}

    def add(self, method: str, **metrics) -> None:
        """Append per-image values (arrays ``(B,)``, lists, scalars) of ``method``."""
        row = self._values.setdefault(str(method), {})
        for name, value in metrics.items():
            if value is None:
                continue
            arr = np.asarray(jax.device_get(value), np.float64).reshape(-1)
            row.setdefault(name, []).append(arr)

    @property
    def methods(self):
        return list(self._values)

    @property
    def metrics(self):
        seen = []
        for row in self._values.values():
            for k in row:
                if k not in seen:
                    seen.append(k)
        known = [k for k in METRICS if k in seen]
        return known + [k for k in seen if k not in METRICS]

    def values(self, method: str, metric: str) -> np.ndarray:
        return np.concatenate(self._values[method][metric])

    def nan_count(self, method: str, metric: str | None = None) -> int:
        """How many values of ``method`` (for one ``metric``, or the most over its metrics) are NaN."""
        row = self._values.get(method, {})
        names = list(row) if metric is None else [metric] if metric in row else []
        return max((int(np.isnan(self.values(method, k)).sum()) for k in names), default=0)

    def _finite(self, method: str, metric: str) -> np.ndarray:
        v = self.values(method, metric)
        return v[~np.isnan(v)]

    def mean(self, method: str, metric: str) -> float:
        """The mean over images (NaN values left out, see :meth:`nan_count`), scaled."""
        if metric not in self._values.get(method, {}):
            return float("nan")
        v = self._finite(method, metric)
        return float(np.mean(v) * _info(metric).scale) if v.size else float("nan")

    def sem(self, method: str, metric: str) -> float:
        """Standard error of the mean (scaled like the mean)."""
        if metric not in self._values.get(method, {}):
            return float("nan")
        v = self._finite(method, metric)
        if v.size < 2:
            return float("nan")
        return float(np.std(v, ddof=1) / math.sqrt(v.size) * _info(metric).scale)

    def means(self) -> dict[str, dict[str, float]]:
        return {m: {k: self.mean(m, k) for k in self.metrics} for m in self.methods}

    def better(self, a: str, b: str) -> dict[str, bool]:
        """For each metric both methods have: is ``a``'s mean strictly better than ``b``'s?"""
        out = {}
        for k in self.metrics:
            ma, mb = self.mean(a, k), self.mean(b, k)
            if math.isnan(ma) or math.isnan(mb):
                continue
            out[k] = ma > mb if _info(k).higher else ma < mb
        return out

    def table(self, metrics: Sequence[str] | None = None, *, sem: bool = False, digits: int = 3) -> str:
        """A Markdown table: one row per method, one column per metric (mean over images)."""
        metrics = self.metrics if metrics is None else list(metrics)
        heads = [f"{_info(k).label} {'↑' if _info(k).higher else '↓'}" for k in metrics]
        rows = []
        for m in self.methods:
            cells = []
            for k in metrics:
                mu = self.mean(m, k)
                if math.isnan(mu):
                    cells.append("–")
                    continue
                d = 1 if _info(k).scale == 100.0 or k == "avg_drop" else digits
                cell = f"{mu:.{d}f}"
                if sem:
                    s = self.sem(m, k)
                    if not math.isnan(s):
                        cell += f" ± {s:.{d}f}"
                cells.append(cell)
            rows.append([m] + cells)
        head = ["method"] + heads
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

        def fmt(r):
            cells = (
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            return "| " + " | ".join(cells) + " |"

        lines = []
        if self.title:
            lines.append(self.title)
            lines.append("")
        lines.append(fmt(head))
        lines.append(
            "|"
            + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths))
            + "|"
        )
        lines += [fmt(r) for r in rows]
        n = {
            m: max((sum(a.size for a in v) for v in self._values[m].values()), default=0)
            for m in self.methods
        }
        lines.append("")
        lines.append(
            "means over images (n = " + ", ".join(f"{m}: {c}" for m, c in n.items()) + "); "
            "↑ higher is better, ↓ lower is better"
        )
        nans = {m: self.nan_count(m) for m in self.methods}
        if any(nans.values()):
            lines.append(
                "NaN (a NaN map or score; left out of the means): "
                + ", ".join(f"{m}: {c}" for m, c in nans.items() if c)
            )
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"Report({self.title!r}, methods={self.methods}, metrics={self.metrics})"


def evaluate(
    fn,
    images,
    maps,
    target=None,
    *,
    key=None,
    boxes=None,
    labels=None,
    masks=None,
    occlusion_maps=None,
    n_steps: int = 50,
    blur_sigma: float = 5.0,
    baseline=0.0,
    road_fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    road_noise: float = 0.01,
    chunk_size: int = 64,
    threshold: float = 0.15,
    tolerance: float = 15.0,
    softmax: bool = True,
    layout: str | Layout | None = None,
    input: Any = None,
) -> dict[str, jax.Array]:
    """Every metric the given ground truth allows, per image, for one method's maps.

    Always: ``deletion``, ``insertion`` (:func:`deletion`, :func:`insertion`), ``avg_drop``,
    ``increase`` (:func:`confidence_change`) and, when ``key`` is given, ``road_morf``,
    ``road_lerf``, ``road_gap`` (:func:`road`: the mean over ``road_fractions``). With ``boxes``
    (``(B, 4)`` inclusive, one object per image): ``iou`` and ``loc_error`` (1 when the box IoU is
    below 0.5, or, with ``labels``, when the explained class is not the label) and the pointing
    game on the boxes; with ``masks`` (shaped like the maps) the pointing game on the masks instead
    (``pointing`` with no tolerance, ``pointing_15`` with ``tolerance``). With
    ``occlusion_maps``: ``faithfulness``.

    ``maps`` are ``(B, *spatial)`` in [0, 1] (:func:`confidence_change` uses them as a mask). The
    result feeds :meth:`Report.add` directly: ``report.add("grad_cam", **evaluate(...))``. Every
    value is a ``float32`` array ``(B,)`` (rates as 0/1), NaN for an example whose map holds a
    NaN or whose explained score is NaN.

    Signals ``(B, T, C)`` and volumes ``(B, D, H, W, C)`` (maps ``(B, T)``, ``(B, D, H, W)``;
    ``layout=`` and ``input=`` as for the explainers) get deletion, insertion, the confidence
    change, the pointing game on ``masks`` and faithfulness; boxes and ROAD are 2-D and are
    refused for them with a message.
    """
    # long-function: the docstring documents every option; the body is a list of metrics.
    view = check_inputs(images, layout, input, "evaluate")
    if view.spatial_rank != 2 and boxes is not None:
        raise ValueError(
            "evaluate: boxes (and the localisation error) are 2-D, for images; for signals and volumes "
            "pass masks= (the pointing game) instead."
        )
    out: dict[str, jax.Array] = {}
    if target is None:  # resolve once, so that every metric explains the same class
        target = jnp.argmax(scores_fn(fn)(images), axis=-1).astype(jnp.int32)
    common: dict[str, Any] = {"chunk_size": chunk_size, "softmax": softmax, "layout": layout, "input": input}
    out["deletion"] = deletion(fn, images, maps, target, n_steps=n_steps, baseline=baseline, **common).auc
    out["insertion"] = insertion(
        fn, images, maps, target, n_steps=n_steps, blur_sigma=blur_sigma, **common
    ).auc
    cc = confidence_change(fn, images, maps, target, baseline=baseline, **common)
    out["avg_drop"] = cc.drop
    out["increase"] = cc.increase
    if key is not None:
        rd = road(fn, images, maps, target, key=key, fractions=road_fractions, noise=road_noise, **common)
        out["road_morf"] = jnp.mean(rd.morf, axis=-1)
        out["road_lerf"] = jnp.mean(rd.lerf, axis=-1)
        out["road_gap"] = rd.gap
    if boxes is not None:
        boxes = jnp.asarray(boxes, jnp.int32)
        iou = box_iou(localization_box(maps, threshold), boxes)
        ok = iou >= 0.5
        if labels is not None:
            ok = ok & (jnp.asarray(target) == jnp.asarray(labels))
        out["iou"] = iou
        out["loc_error"] = ~ok
        if masks is None:
            out["pointing"] = pointing_game(maps, boxes)
            out["pointing_15"] = pointing_game(maps, boxes, tolerance)
    if masks is not None:
        out["pointing"] = pointing_game(maps, masks)
        out["pointing_15"] = pointing_game(maps, masks, tolerance)
    if occlusion_maps is not None:
        out["faithfulness"] = faithfulness(maps, occlusion_maps)
    # An example whose map or explained score is NaN has no metric: NaN in every one (bools
    # become 0/1 floats), which Report leaves out of its means and counts.
    bad = nan_examples(jnp.asarray(maps)) | jnp.isnan(cc.clean)
    return {k: jnp.where(bad, jnp.nan, v.astype(jnp.float32)) for k, v in out.items()}
