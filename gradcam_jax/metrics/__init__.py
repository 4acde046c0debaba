"""Measuring explanations: localisation, pointing game, deletion / insertion, confidence drop,
ROAD, faithfulness and sanity checks — pure, jittable, batched on device.

Every metric is a function of arrays — maps ``(B, H, W)``, images ``(B, H, W, C)``, and, for
the metrics that query the model, a scores function ``images -> (B, classes)`` — that returns
one value per image, so results can be aggregated over any number of batches
(:class:`Report`). Docstrings give each definition and its reference.

Signals ``(B, T, C)`` and volumes or videos ``(B, D, H, W, C)`` (maps ``(B, T)``,
``(B, D, H, W)``) work with every metric that makes sense for them: deletion, insertion (the
canvas blurred along every spatial axis), confidence change, the pointing game, faithfulness,
the correlations and the sanity checks; the model's input may be channels-first
(``layout=``) or a pytree (``input=``), as for the explainers. SSIM, the localisation boxes,
their connected components and ROAD's imputation are 2-D and refuse other ranks with a message.

======================================  ===================================================
where the map points                    :func:`localization_box` (15% threshold, largest
                                        connected segment, its box), :func:`box_iou`,
                                        :func:`localization_errors` (top-1 / top-5),
                                        :func:`pointing_game`
what the model needs                    :func:`deletion`, :func:`insertion` (RISE),
                                        :func:`confidence_change` (Average Drop, Increase
                                        in Confidence), :func:`road` (MoRF / LeRF with
                                        :func:`noisy_linear_imputation`)
agreement between maps                  :func:`faithfulness` (rank correlation with the
                                        occlusion map), :func:`spearman`, :func:`ssim`
does the map depend on the model?       :func:`sanity_check` (cascading randomisation,
                                        :func:`cascading_randomization`)
aggregation                             :class:`Report`, :func:`evaluate`
test data                               :func:`boxes_dataset`, :func:`colour_detector`
======================================  ===================================================

>>> import jax.numpy as jnp
>>> from gradcam_jax import metrics
>>> m = jnp.zeros((1, 8, 8)).at[0, 2:4, 3:6].set(1.0)
>>> metrics.localization_box(m).tolist()
[[2, 3, 3, 5]]
>>> metrics.pointing_game(m, jnp.array([[0, 0, 2, 3]])).tolist()
[True]
"""

from ._blur import gaussian_blur
from ._saliency import pixel_saliency, saliency_order, saliency_ranks
from .localization import (
    EMPTY_BOX,
    Localization,
    box_iou,
    boxes_to_masks,
    connected_components,
    largest_component,
    localization_box,
    localization_correct,
    localization_errors,
)
from .pointing import pointing_game
from .removal import ConfidenceChange, Curve, confidence_change, deletion, insertion
from .report import METRICS, MetricInfo, Report, evaluate
from .road import ROAD, noisy_linear_imputation, road
from .sanity import SIMILARITIES, Sanity, cascading_randomization, randomize_layers, sanity_check
from .similarity import faithfulness, pearson, rankdata, spearman, ssim
from .synthetic import SyntheticBoxes, boxes_dataset, colour_detector

__all__ = [
    # localisation
    "localization_box",
    "connected_components",
    "largest_component",
    "box_iou",
    "boxes_to_masks",
    "localization_correct",
    "localization_errors",
    "Localization",
    "EMPTY_BOX",
    "pointing_game",
    # removal
    "deletion",
    "insertion",
    "Curve",
    "confidence_change",
    "ConfidenceChange",
    "road",
    "ROAD",
    "noisy_linear_imputation",
    # similarity
    "faithfulness",
    "spearman",
    "pearson",
    "rankdata",
    "ssim",
    # sanity
    "sanity_check",
    "Sanity",
    "cascading_randomization",
    "randomize_layers",
    "SIMILARITIES",
    # aggregation
    "Report",
    "evaluate",
    "METRICS",
    "MetricInfo",
    # helpers
    "saliency_order",
    "saliency_ranks",
    "pixel_saliency",
    "gaussian_blur",
    "boxes_dataset",
    "colour_detector",
    "SyntheticBoxes",
]
