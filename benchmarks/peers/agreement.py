"""How far our maps are from each peer's: per-image correlation, and the conventions each row compares.

Every row names the conventions it compares and points to a note (:data:`NOTES`) that explains
it; rows whose conventions differ are followed, where possible, by a row where the convention
is matched (or by evidence for the note).
"""

from __future__ import annotations

import numpy as np

from .cam_family import FAMILY_NOTES, family_rows, is_family
from .common import CAPTUM, PGC


def compare(a, b, scale=None):
    """Per-image Pearson correlation (worst and mean) and max |a - b| (and max |b|)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if scale == "maxabs":
        a = a / per_image_max(np.abs(a))
        b = b / per_image_max(np.abs(b))
    corrs = []
    for ai, bi in zip(a.reshape(len(a), -1), b.reshape(len(b), -1), strict=True):
        sa, sb = ai.std(), bi.std()
        if sa == 0 or sb == 0:
            corrs.append(1.0 if np.allclose(ai, bi) else 0.0)
        else:
            corrs.append(float(np.mean((ai - ai.mean()) * (bi - bi.mean())) / (sa * sb)))
    return {
        "corr_min": min(corrs),
        "corr_mean": float(np.mean(corrs)),
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "max_abs_ref": float(np.max(np.abs(b))),
    }


def per_image_max(v):
    """Each image's maximum (1 where it is not positive), keeping the dimensions."""
    s = np.max(v, axis=tuple(range(1, v.ndim)), keepdims=True)
    return np.where(s > 0, s, 1.0)


# Every agreement row names the conventions it compares; each note explains one.
NOTES = {
    "same": "Same convention on both sides: ReLU, bilinear upsampling with half-pixel centres, per-map "
    "min-max to [0, 1]. pytorch-grad-cam min-max normalises at the layer's resolution, resizes "
    "with cv2.resize (bilinear, half-pixel) and normalises again; bilinear resizing commutes "
    "with a per-map affine map, so this equals resize-then-normalise, our order.",
    "captum_matched": "Captum with our conventions: LayerGradCam(relu_attributions=True), "
    "LayerAttribution.interpolate(..., 'bilinear') (F.interpolate, half-pixel) and a "
    "per-map min-max on the torch side. This is the Captum pipeline timed below.",
    "captum_defaults": "Captum's defaults against ours: LayerGradCam returns the map without the final "
    "ReLU and LayerAttribution.interpolate upsamples with 'nearest' (ours: ReLU, "
    "bilinear, min-max). Blocky, signed maps: a convention difference, not an error.",
    "gpp_eps": "pytorch-grad-cam adds 1e-6 to the Grad-CAM++ denominator 2 g^2 + sum(A) g^3 (ours: no "
    "epsilon, alpha = 0 where the denominator is 0). At the last layer g is small (about the "
    "class's fc weight / the number of positions), so g^2 is not large against 1e-6 and the "
    "epsilon shrinks some channels' alpha more than others: the maps differ slightly.",
    "gpp_matched": "Evidence for the previous note: our Grad-CAM++ (gcj.cam with a method function) with "
    "pytorch-grad-cam's epsilon 1e-6 added to the denominator, against its output.",
    "gb_raw": "Raw input gradients on both sides (no normalisation). pytorch-grad-cam's "
    "GuidedBackpropReLUModel explains output[0] of its input only, so it runs once per image.",
    "relu6": "Both peers swap only nn.ReLU modules (Captum hooks them; pytorch-grad-cam replaces them); "
    "EfficientNet-Lite's activations are nn.ReLU6, so with their defaults they return plain "
    "gradients there (see the 'peer vs plain gradient' rows), while gradcam_jax applies the guided "
    "rule to every ReLU6. 'matched' rows give the peers the same network with each ReLU6 written "
    "as nn.ReLU followed by a clip at 6 (same function), so that their guided rule applies too.",
    "plain": "Evidence for the ReLU6 note: the peer's output against the plain input gradient "
    "(torch autograd).",
    "ggc_pgc": "pytorch-grad-cam's Guided Grad-CAM recipe (its cam.py): the normalised Grad-CAM map "
    "(bilinear) times guided backprop; ours: GB x ReLU(map) upsampled bilinearly, divided by "
    "its max |value|. Both scaled to max |value| = 1 per image before comparing; they differ "
    "only where a map's minimum is above 0 (min-max subtracts it).",
    "ggc_recipe": "Evidence for the previous note: pytorch-grad-cam's recipe applied to our own Grad-CAM map "
    "(min-max) and our guided backprop, from the rows above, against its output: the "
    "implementations agree; only the recipe differs from our Guided Grad-CAM.",
    "ggc_captum": "Captum's GuidedGradCam with interpolate_mode='bilinear' (the pipeline timed below); "
    "ours divides by the max |value| per image, so both are scaled to max |value| = 1.",
    "ggc_captum_defaults": "Captum's GuidedGradCam default interpolate_mode='nearest' against our bilinear "
    "upsampling: blocky cells in the product; a convention difference.",
    "score_masks": "pytorch-grad-cam upsamples the Score-CAM masks with nn.UpsamplingBilinear2d, i.e. "
    "align_corners=True; ours (and its resize of the final map) use half-pixel centres. At a "
    "coarse layer the masks differ and so do the channel weights.",
    "score_matched": "pytorch-grad-cam's ScoreCAM with its mask upsampler swapped for half-pixel bilinear "
    "(F.interpolate, align_corners=False): the only change, and the maps agree.",
}


NOTES.update(FAMILY_NOTES)


class Rows:
    """The agreement rows of one method: ``(peer, conventions, note, stats)``."""

    def __init__(self):
        self.rows = []

    def add(self, peer, conv, note, a, b, scale=None):
        try:
            self.rows.append((peer, conv, note, compare(a, b, scale)))
        except Exception as e:
            self.rows.append((peer, conv, note, {"error": f"{type(e).__name__}: {e}"}))


def grad_cam_rows(r: Rows, ours, pgc, cap, ex, lite, ours_other):
    if pgc is not None:
        r.add(PGC, "defaults (same convention)", "same", ours, pgc)
    if cap is not None:
        r.add(CAPTUM, "matched: ReLU, bilinear, min-max", "captum_matched", ours, cap)
    if (CAPTUM, "defaults") in ex:
        r.add(CAPTUM, "defaults: no ReLU, nearest", "captum_defaults", ours, ex[(CAPTUM, "defaults")])


def grad_cam_plus_plus_rows(r: Rows, ours, pgc, cap, ex, lite, ours_other):
    if pgc is not None:
        r.add(PGC, "defaults (eps 1e-6 in its denominator)", "gpp_eps", ours, pgc)
        if ("ours", "eps") in ex:
            r.add(PGC, "matched: ours with its eps 1e-6", "gpp_matched", ex[("ours", "eps")], pgc)


def guided_backprop_rows(r: Rows, ours, pgc, cap, ex, lite, ours_other):
    for peer, out in ((PGC, pgc), (CAPTUM, cap)):
        if out is None:
            continue
        if lite:
            r.add(peer, "defaults (ReLU6 not swapped)", "relu6", ours, out)
            if (peer, "matched") in ex:
                r.add(peer, "matched: ReLU6 as ReLU + clip", "relu6", ours, ex[(peer, "matched")])
            if ("torch", "plain_gradient") in ex:
                r.add(peer, "peer vs plain gradient", "plain", out, ex[("torch", "plain_gradient")])
        else:
            r.add(peer, "defaults (raw gradients)", "gb_raw", ours, out)


def guided_grad_cam_rows(r: Rows, ours, pgc, cap, ex, lite, ours_other):
    relu6 = " (ReLU6 not swapped)" if lite else ""
    if pgc is not None:
        note = "relu6" if lite else "ggc_pgc"
        r.add(PGC, "its recipe: min-max CAM x GB" + relu6, note, ours, pgc, "maxabs")
        recipe = ex.get((PGC, "matched")) if lite else pgc
        if lite and recipe is not None:
            r.add(PGC, "recipe, ReLU6 as ReLU + clip", "ggc_pgc", ours, recipe, "maxabs")
        if (
            recipe is not None
            and ours_other.get("grad_cam") is not None
            and ours_other.get("guided_backprop") is not None
        ):
            ours_recipe = ours_other["grad_cam"][..., None] * ours_other["guided_backprop"]
            r.add(
                PGC, "its recipe on our Grad-CAM and GB outputs", "ggc_recipe", ours_recipe, recipe, "maxabs"
            )
    if cap is not None:
        r.add(CAPTUM, "bilinear" + relu6, "relu6" if lite else "ggc_captum", ours, cap, "maxabs")
        if lite and (CAPTUM, "matched") in ex:
            matched = ex[(CAPTUM, "matched")]
            r.add(CAPTUM, "bilinear, ReLU6 as ReLU + clip", "ggc_captum", ours, matched, "maxabs")
    if (CAPTUM, "defaults") in ex:
        defaults = ex[(CAPTUM, "defaults")]
        r.add(CAPTUM, "defaults: nearest", "ggc_captum_defaults", ours, defaults, "maxabs")


def score_cam_rows(r: Rows, ours, pgc, cap, ex, lite, ours_other):
    if pgc is not None:
        r.add(PGC, "defaults (align_corners=True masks)", "score_masks", ours, pgc)
    if (PGC, "half_pixel_masks") in ex:
        r.add(PGC, "matched: half-pixel masks", "score_matched", ours, ex[(PGC, "half_pixel_masks")])


ROWS = {
    "grad_cam": grad_cam_rows,
    "grad_cam_plus_plus": grad_cam_plus_plus_rows,
    "guided_backprop": guided_backprop_rows,
    "guided_grad_cam": guided_grad_cam_rows,
    "score_cam": score_cam_rows,
}


def agreement_rows(method, pair, ours_out, measures, extras, ours_other):
    """(peer, conventions, note, stats) rows for one method on one model.

    ``measures``: the timed runs by implementation name (their kept outputs); ``extras``:
    ``(peer, kind, output)`` of the agreement-only runs; ``ours_other``: our kept outputs of the
    methods measured before (Guided Grad-CAM's recipe row uses Grad-CAM's and Guided Backprop's).
    """
    outputs = []
    for name in (PGC, CAPTUM):
        m = measures.get(name)
        outputs.append(m.output if m is not None and m.error is None else None)
    ex = {(peer, kind): out for peer, kind, out in extras}
    lite = pair.torch_matched is not None  # EfficientNet-Lite0: ReLU6 conventions apply
    r = Rows()
    if is_family(method):
        family_rows(method, r, ours_out, outputs[0], ex)
    else:
        ROWS[method](r, ours_out, *outputs, ex, lite, ours_other)
    return r.rows
