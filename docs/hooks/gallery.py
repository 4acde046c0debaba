"""MkDocs hook: the method gallery, drawn at build time from the package's own method lists.

Every method is run on the bundled demo picture (a cat and an espresso cup, side by side) with
the pretrained EfficientNet-Lite0 at its 224 x 224 input, for both of the picture's classes
(``Egyptian cat`` 285 and ``espresso`` 967: one row each), and drawn with ``viz.figure_grid``.
The figures are generated files of the build (``gallery/<method>.png``); nothing is committed.

Which methods: every entry of ``gcj.METHODS`` (aliases of one function drawn once) and every
other explainer the package exports at the top level — a function whose first parameters are
``(fn | tap | model, x)`` and that takes ``target``. A new method therefore appears by itself;
``ABOUT`` adds its paper, cost and use (else the docstring's first line and its ``References:``
are shown) and ``OPTIONS`` any keyword it needs. A method that cannot be drawn on this model
(a transformer method) is listed in ``NOT_DRAWN`` with the reason; an explainer that fails and
is not listed there is a build error, so the gallery never drops a method silently.

``GCJ_DOCS_NO_GALLERY=1`` skips the drawing while editing text (``mkdocs serve``); it is a
warning, so a strict build never passes without the gallery.

The page ``docs/gallery.md`` holds the text; its line ``<!-- gallery -->`` becomes the figures.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import time
from dataclasses import dataclass

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from mkdocs.structure.files import File

import gradcam_jax as gcj
from gradcam_jax import viz, zoo
from gradcam_jax.fullgrad import linen_biases

log = logging.getLogger("mkdocs.hooks.gallery")

MARKER = "<!-- gallery -->"
CLASSES = (285, 967)  # Egyptian cat, espresso: the demo picture's two objects
NOT_EXPLAINERS = {"activations_and_grads", "cam", "grad_cam"}  # the table's methods come through cam

LOW_LAYER = "blocks_10"  # 14 x 14 x 112: for methods that run one pass per channel (and per draw)


def grid_segments(x, cells: int = 7):
    """``(B, H, W)`` integer labels of a ``cells x cells`` grid: superpixels without scikit-image."""
    h, w = x.shape[1:3]
    rows = np.minimum(np.arange(h) * cells // h, cells - 1)
    cols = np.minimum(np.arange(w) * cells // w, cells - 1)
    return np.broadcast_to(rows[:, None] * cells + cols[None, :], (x.shape[0], h, w)).astype(np.int32)


def fullgrad_setup(m, x):
    """FullGrad's multi-layer tap over every batch norm (each one's inference bias) and the biases."""
    stats = flax.traverse_util.flatten_dict(m.variables["batch_stats"], sep="/")
    layers = sorted({path.rsplit("/", 1)[0] for path in stats})
    biases = linen_biases(m.variables, layers)
    return gcj.linen_tap(m.module, m.variables, layers=layers), {"biases": biases}


# Settings the gallery passes, cheaper than the defaults (each is said on the page): keyword
# arguments, or a function (model, x) -> (what to explain, keyword arguments).
OPTIONS = {
    "score_cam": {"top_n": 16},
    "ss_cam": lambda m, x: (m.tap_at(LOW_LAYER), {"n_noise": 2}),
    "is_cam": lambda m, x: (m.tap_at(LOW_LAYER), {"steps": 2}),
    "fullgrad": fullgrad_setup,
    "smooth_grad": {"n_samples": 8},
    "occlusion": {"window": 56, "stride": 28},
    "integrated_gradients": {"steps": 8},
    "expected_gradients": lambda m, x: (None, {"baselines": jnp.zeros((2, *x.shape[1:])), "n_samples": 4}),
    "blur_ig": {"steps": 8},
    "guided_ig": {"steps": 8},
    "xrai": lambda m, x: (None, {"steps": 8, "segments": grid_segments(x, 16)}),
    "rise": {"n_masks": 256},
    "kernel_shap": lambda m, x: (None, {"segments": grid_segments(x), "n_samples": 128}),
}
SETTINGS = {  # the same, as the page states them
    "score_cam": "`top_n=16`",
    "ss_cam": f"at `{LOW_LAYER}` (112 channels), `n_noise=2`",
    "is_cam": f"at `{LOW_LAYER}` (112 channels), `steps=2`",
    "fullgrad": "every batch norm's bias (`fullgrad.linen_biases`), one multi-layer tap",
    "smooth_grad": "`n_samples=8`",
    "occlusion": "`window=56, stride=28` (7 x 7 = 49 positions)",
    "integrated_gradients": "`steps=8`",
    "expected_gradients": "two black baselines, `n_samples=4`",
    "blur_ig": "`steps=8`",
    "guided_ig": "`steps=8`; both classes in one call (one adaptive path per class, vmapped)",
    "xrai": "`steps=8`, a 16 x 16 grid of segments (Felzenszwalb's need scikit-image), one call per class",
    "rise": "`n_masks=256`",
    "kernel_shap": "a 7 x 7 grid of superpixels, `n_samples=128`",
    "noise_tunnel": "`gcj.noise_tunnel(gcj.grad_cam, tap, ...)`, `n_samples=8`",
}

# Where a figure's explanation is computed, when it is not the default layer or the input.
WHERE = {
    "ss_cam": f"layer {LOW_LAYER}",
    "is_cam": f"layer {LOW_LAYER}",
    "fullgrad": "the input and every batch norm",
    "noise_tunnel": "Grad-CAM at layer head",
    "guided_grad_cam": "the input's pixels x layer head",
}

# Explainers that explain one target per example: called once per class.
PER_CLASS = {"xrai"}

# Explainers that take another explainer first, with how the gallery calls them.
WRAPPERS = {
    "noise_tunnel": lambda gcj_fn, m, x, t, key: gcj_fn(gcj.grad_cam, m.tap, x, t, key=key, n_samples=8)
}

# Methods that need another kind of model than a CNN classifier: name -> why, where to look.
NOT_DRAWN: dict[str, str] = {
    name: "it reads a transformer's attention; see [Vision transformers](how-to/vits.md)."
    for name in ("attention_rollout", "attention_sites", "generic_attention", "legrad")
}

# name -> (paper, passes per image, when to use it). Links are the papers' arXiv pages.
ABOUT = {
    "grad_cam": (
        "Selvaraju et al., ICCV 2017, [arXiv 1610.02391](https://arxiv.org/abs/1610.02391)",
        "1 forward + 1 backward down to the layer, for any number of classes",
        "The default: class-discriminative, cheap, passes the randomisation sanity check.",
    ),
    "cam": (
        "Zhou et al., CVPR 2016, [arXiv 1512.04150](https://arxiv.org/abs/1512.04150)",
        "1 forward + 1 backward down to the layer",
        "Summed instead of averaged gradients: the original CAM for global-average-pool + dense "
        "heads, and the same map as Grad-CAM there once normalised.",
    ),
    "grad_cam_plus_plus": (
        "Chattopadhay et al., WACV 2018, [arXiv 1710.11063](https://arxiv.org/abs/1710.11063)",
        "1 forward + 1 backward down to the layer",
        "Several instances of the class in one image: positive gradients weighted per position.",
    ),
    "xgrad_cam": (
        "Fu et al., BMVC 2020, [arXiv 2008.02312](https://arxiv.org/abs/2008.02312)",
        "1 forward + 1 backward down to the layer",
        "Grad-CAM with weights derived from two axioms (sensitivity, conservation).",
    ),
    "hires_cam": (
        "Draelos & Carin, 2020, [arXiv 2011.08891](https://arxiv.org/abs/2011.08891)",
        "1 forward + 1 backward down to the layer",
        "Element-wise gradient x activation: provably reflects the positions the score uses.",
    ),
    "layer_cam": (
        "Jiang et al., IEEE TIP 2021, [doi 10.1109/TIP.2021.3089943](https://doi.org/10.1109/TIP.2021.3089943)",
        "1 forward + 1 backward down to the layer",
        "Earlier, finer layers: positive gradients per position keep fine detail.",
    ),
    "eigen_cam": (
        "Muhammad & Yeasin, IJCNN 2020, [arXiv 2008.00299](https://arxiv.org/abs/2008.00299)",
        "1 forward (no gradient)",
        "Class-agnostic: the principal component of the activations, the same map for every class.",
    ),
    "eigen_grad_cam": (
        "after Muhammad & Yeasin 2020, on gradient x activation",
        "1 forward + 1 backward down to the layer",
        "Eigen-CAM made class-discriminative: a smoother map than Grad-CAM.",
    ),
    "score_cam": (
        "Wang et al., CVPR-W 2020, [arXiv 1910.01279](https://arxiv.org/abs/1910.01279)",
        "1 + C forwards (C channels, or the `top_n` most varied)",
        "Gradient-free: saturated or noisy gradients; costs a forward per channel.",
    ),
    "ablation_cam": (
        "Desai & Ramaswamy, WACV 2020, [doi 10.1109/WACV45572.2020.9093360]"
        "(https://doi.org/10.1109/WACV45572.2020.9093360)",
        "1 forward + C passes of the layers above the tap",
        "Gradient-free; cheap when the part above the layer is small (a pooled head).",
    ),
    "gradients": (
        "Simonyan et al., ICLR-W 2014, [arXiv 1312.6034](https://arxiv.org/abs/1312.6034)",
        "1 forward + 1 full backward",
        "The plain saliency map: pixel resolution, noisy; the baseline of sanity checks.",
    ),
    "guided_backprop": (
        "Springenberg et al., ICLR-W 2015, [arXiv 1412.6806](https://arxiv.org/abs/1412.6806)",
        "1 forward + 1 full backward",
        "Sharp edges, but hardly class-discriminative and fails the randomisation test.",
    ),
    "deconvnet": (
        "Zeiler & Fergus, ECCV 2014, [arXiv 1311.2901](https://arxiv.org/abs/1311.2901)",
        "1 forward + 1 full backward",
        "Historical: what the network's filters respond to, not what the class depends on.",
    ),
    "smooth_grad": (
        "Smilkov et al., 2017, [arXiv 1706.03825](https://arxiv.org/abs/1706.03825)",
        "n forwards + n backwards (`n_samples`, 25 by default)",
        "Less noisy pixel gradients, at n times the cost.",
    ),
    "guided_grad_cam": (
        "Selvaraju et al., ICCV 2017, [arXiv 1610.02391](https://arxiv.org/abs/1610.02391)",
        "2 forwards + 2 backwards (Guided Backprop and Grad-CAM)",
        "Pixel-sharp and class-discriminative; inherits Guided Backprop's insensitivity.",
    ),
    "occlusion": (
        "Zeiler & Fergus, ECCV 2014, [arXiv 1311.2901](https://arxiv.org/abs/1311.2901)",
        "1 forward per window position",
        "Model-agnostic ground truth for faithfulness; slow at fine strides.",
    ),
    # The methods of issues 15 and 16: a paper of None is read from the docstring's References.
    "grad_cam_elementwise": (None, "1 forward + 1 backward down to the layer", None),
    "kpca_cam": (None, "1 forward + 1 backward down to the layer", None),
    "ss_cam": (
        "Wang et al., 2020, [arXiv 2006.14255](https://arxiv.org/abs/2006.14255)",
        "1 + C x n_noise forwards",
        "Score-CAM averaged over noisy masks: smoother, at n_noise times Score-CAM's cost.",
    ),
    "is_cam": (
        "Naidu et al., 2020, [arXiv 2010.03023](https://arxiv.org/abs/2010.03023)",
        "1 + C x steps forwards",
        "Score-CAM integrated along a path of mask strengths: less noisy than Score-CAM.",
    ),
    "shapley_cam": (None, "1 forward + 1 backward + 1 Hessian-vector product", None),
    "finer_cam": (None, "1 forward + 1 backward (the class and its comparison classes)", None),
    "random_cam": (
        "pytorch-grad-cam's baseline",
        "1 forward + 1 backward down to the layer",
        "A baseline for metrics: random channel weights; any method should beat it.",
    ),
    "fullgrad": (
        "Srinivas & Fleuret, NeurIPS 2019, [arXiv 1905.00780](https://arxiv.org/abs/1905.00780)",
        "1 forward + 1 full backward (to the input and every biased layer)",
        "Complete: the input-gradient and every bias's contribution, from all layers at once.",
    ),
    "integrated_gradients": (
        "Sundararajan et al., ICML 2017, [arXiv 1703.01365](https://arxiv.org/abs/1703.01365)",
        "`steps` forwards + backwards (50 by default)",
        "Pixel attributions that add up to the score's change from a baseline (completeness).",
    ),
    "expected_gradients": (
        "Erion et al., 2021, [arXiv 1906.10670](https://arxiv.org/abs/1906.10670)",
        "`n_samples` forwards + backwards",
        "Integrated Gradients averaged over a background set instead of one baseline.",
    ),
    "input_x_gradient": (
        "Shrikumar et al., 2016, [arXiv 1605.01713](https://arxiv.org/abs/1605.01713)",
        "1 forward + 1 full backward",
        "The cheapest attribution in input units; exact for linear models.",
    ),
    "noise_tunnel": (
        "Smilkov et al., 2017, [arXiv 1706.03825](https://arxiv.org/abs/1706.03825); Adebayo et al. 2018",
        "`n_samples` times the wrapped explainer",
        "SmoothGrad, SmoothGrad-squared or VarGrad around any explainer (here Grad-CAM).",
    ),
    "deeplift": (
        "Shrikumar et al., ICML 2017, [arXiv 1704.02685](https://arxiv.org/abs/1704.02685)",
        "2 forwards (input and baseline) + 1 backward",
        "Attributions that sum to the score's change from a baseline, in one backward pass.",
    ),
    "lrp": (
        "Bach et al., PLOS ONE 2015; Montavon et al. 2019 (zennit's composites)",
        "1 forward + 1 backward",
        "Conservative relevance per pixel, with layer-specific rules.",
    ),
    "blur_ig": (
        "Xu et al., CVPR 2020, [arXiv 2004.03383](https://arxiv.org/abs/2004.03383)",
        "`steps` forwards + backwards (100 by default)",
        "Integrated Gradients along a blur path: no baseline to choose.",
    ),
    "guided_ig": (
        "Kapishnikov et al., CVPR 2021, [arXiv 2106.09788](https://arxiv.org/abs/2106.09788)",
        "`steps` forwards + backwards (200 by default), one target at a time",
        "Integrated Gradients along an adaptive path: less noise off the object.",
    ),
    "xrai": (
        "Kapishnikov et al., ICCV 2019, [arXiv 1906.02825](https://arxiv.org/abs/1906.02825)",
        "Integrated Gradients from two baselines + a ranking of segments, one target at a time",
        "Regions instead of pixels: which segments matter most.",
    ),
    "rise": (
        "Petsiuk et al., BMVC 2018, [arXiv 1806.07421](https://arxiv.org/abs/1806.07421)",
        "`n_masks` forwards (4000 by default)",
        "Black-box: random masks, no gradients, any model.",
    ),
    "kernel_shap": (
        "Lundberg & Lee, NeurIPS 2017, [arXiv 1705.07874](https://arxiv.org/abs/1705.07874)",
        "`n_samples` forwards (coalitions of superpixels)",
        "Black-box Shapley values of superpixels.",
    ),
}


@dataclass(frozen=True)
class Entry:
    """One gallery figure: the method's name, other names for it, how to call it, its kind."""

    name: str
    aliases: tuple[str, ...]
    call: object
    kind: str


def entries() -> list[Entry]:
    """Every method of the package: the CAM table first, then the other explainers."""
    by_fn: dict[int, list[str]] = {}
    for name, method in gcj.METHODS.items():
        by_fn.setdefault(id(method.fn), []).append(name)
    found = [
        Entry(
            names[0],
            tuple(names[1:]),
            functools.partial(gcj.cam, method=names[0]),
            gcj.METHODS[names[0]].kind,
        )
        for names in by_fn.values()
    ]
    table_fns = {id(m.fn) for m in gcj.METHODS.values()}
    for name in gcj.__all__:
        obj = getattr(gcj, name)
        if name in NOT_EXPLAINERS or id(obj) in table_fns:
            continue
        if not (is_explainer(obj) or name in WRAPPERS or name in NOT_DRAWN):
            continue
        found.append(Entry(name, (), obj, "explainer"))
    return found


def is_explainer(obj) -> bool:
    """A function ``f(fn | tap | model, x, ..., target=...)``: it explains a model on an input."""
    if not callable(obj) or isinstance(obj, type):
        return False
    try:
        params = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return False
    return (
        len(params) >= 2 and params[0] in ("fn", "tap", "model") and params[1] == "x" and "target" in params
    )


def about(entry: Entry) -> tuple[str, str, str]:
    """(paper, cost, use) from ``ABOUT``, else from the function's docstring."""
    fn = gcj.METHODS[entry.name].fn if entry.name in gcj.METHODS else entry.call
    doc = inspect.getdoc(fn) or ""
    refs = re.search(r"References:\n((?:[ \t]+\S.*\n?)+)", doc)
    paper = " ".join(refs.group(1).split()) if refs else "see its docstring"
    cost = "1 forward + 1 backward down to the layer" if entry.kind == "gradient" else "see its docstring"
    found = (paper, cost, (doc.splitlines() or [""])[0])
    known = ABOUT.get(entry.name, (None, None, None))
    return tuple(k if k is not None else f for k, f in zip(known, found, strict=True))


def compute(entry: Entry, m, x, grads) -> np.ndarray:
    """The entry's output for the demo picture: ``(K, H, W)`` maps or ``(K, H, W, C)`` gradients.

    A gradient method of the table is drawn from ``grads`` (``gcj.activations_and_grads`` run
    once for all of them, as ``gcj.cam`` does for each: one forward pass, one pullback per
    class), through its formula and the finishing ``gcj.cam`` applies by default (ReLU,
    bilinear upsampling to the input, normalisation to [0, 1]); every other method is called.
    """
    if entry.kind == "gradient":
        raw = jnp.stack([gcj.METHODS[entry.name].fn(grads.activation, g) for g in grads.grads], axis=1)
        maps = gcj.postprocess.upsample_to(jax.nn.relu(raw), x.shape[1:3])
        return np.asarray(gcj.postprocess.normalize_maps(maps))[0]
    if entry.name in WRAPPERS:
        return np.asarray(WRAPPERS[entry.name](entry.call, m, x, list(CLASSES), jax.random.key(0)))[0]
    fn = gcj.METHODS[entry.name].fn if entry.name in gcj.METHODS else entry.call
    params = inspect.signature(fn).parameters
    model = m.tap if next(iter(params)) == "tap" else functools.partial(m.module.apply, m.variables)
    options = OPTIONS.get(entry.name, {})
    if callable(options):
        chosen, options = options(m, x)
        model = model if chosen is None else chosen
    options = dict(options)
    if "key" in params:
        options.setdefault("key", jax.random.key(0))
    if entry.name in PER_CLASS:
        return np.stack([np.asarray(entry.call(model, x, c, **options))[0] for c in CLASSES])
    return np.asarray(entry.call(model, x, list(CLASSES), **options))[0]


def check_shared_pass(m, x, grads) -> None:
    """The shared pass draws what ``gcj.cam`` returns (checked on Grad-CAM at every build)."""
    shared = compute(Entry("grad_cam", (), gcj.cam, "gradient"), m, x, grads)
    direct = np.asarray(gcj.grad_cam(m.tap, x, list(CLASSES)))[0]
    if not np.allclose(shared, direct, atol=1e-5):
        gap = np.abs(shared - direct).max()
        log.warning(f"gallery: the shared pass differs from gcj.grad_cam by {gap:.2e}")


def figure_png(entry: Entry, out, image, m, probs) -> bytes:
    fn = gcj.METHODS[entry.name].fn if entry.name in gcj.METHODS else getattr(entry.call, "func", entry.call)
    at_layer = entry.kind == "gradient" or next(iter(inspect.signature(fn).parameters)) == "tap"
    where = WHERE.get(entry.name) or (f"layer {m.default_layer}" if at_layer else "the input's pixels")
    title = f"{viz.METHOD_TITLES.get(entry.name, entry.name)}  ·  EfficientNet-Lite0, {where}"
    fig = viz.figure_grid(
        image,
        {entry.name: out},
        list(CLASSES),
        class_names=m.class_names,
        probs=probs,
        title=title,
        panel_width=2.2,
        dpi=90,
    )
    return viz.png_bytes(fig)


def section(entry: Entry, seconds: float) -> str:
    paper, cost, use = about(entry)
    title = viz.METHOD_TITLES.get(entry.name, entry.name)
    if entry.kind == "explainer":
        call = f"`gcj.{entry.name}(...)`"
    else:
        call = f'`gcj.cam(tap, x, target, method="{entry.name}")`'
    if entry.aliases:
        call += " (also " + ", ".join(f'`"{a}"`' for a in entry.aliases) + ")"
    return "\n".join(
        [
            f"## {title} {{#{entry.name}}}",
            "",
            f"{call} — {use}",
            "",
            f"- **Paper:** {paper}",
            f"- **Cost:** {cost}",
            *([f"- **Settings here:** {SETTINGS[entry.name]}"] if entry.name in SETTINGS else []),
            f"- **Here:** {seconds:.1f} s for the first call, compilation included.",
            "",
            f"![{title} on the demo picture, for the cat and the espresso](gallery/{entry.name}.png)",
            "",
        ]
    )


def summary(rows: list[tuple[Entry, float]]) -> str:
    lines = ["| method | kind | passes per image | first call here (s) |", "|---|---|---|---|"]
    for entry, seconds in rows:
        title = viz.METHOD_TITLES.get(entry.name, entry.name)
        lines.append(f"| [{title}](#{entry.name}) | {entry.kind} | {about(entry)[1]} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


# The page's generated Markdown, from on_files to on_page_markdown.
GENERATED: dict[str, str] = {}


def on_files(files, config, **kwargs):
    if os.environ.get("GCJ_DOCS_NO_GALLERY"):  # for editing text with mkdocs serve; a strict build fails
        log.warning("gallery: not drawn because GCJ_DOCS_NO_GALLERY is set")
        GENERATED["text"] = "*The gallery was not drawn in this build.*\n"
        return files
    start = time.perf_counter()
    m = zoo.efficientnet_lite0()
    image = zoo.demo_image()
    x = m.preprocess(image)
    probs = np.asarray(m.probs(x))[0]
    grads = gcj.activations_and_grads(m.tap, x, list(CLASSES))
    check_shared_pass(m, x, grads)
    rows, parts = [], []
    for entry in entries():
        if entry.name in NOT_DRAWN:
            parts.append(f"## {entry.name}\n\nNot drawn on this model: {NOT_DRAWN[entry.name]}\n")
            continue
        t0 = time.perf_counter()
        try:
            out = compute(entry, m, x, grads)
        except Exception as error:  # a method the gallery cannot draw must be listed, not dropped
            log.warning(
                f"gallery: {entry.name} failed on the demo picture ({type(error).__name__}: {error}); "
                f"give it keyword arguments in OPTIONS or a reason in NOT_DRAWN (docs/hooks/gallery.py)"
            )
            continue
        seconds = time.perf_counter() - t0
        png = figure_png(entry, out, image, m, probs)
        files.append(File.generated(config, f"gallery/{entry.name}.png", content=png))
        rows.append((entry, seconds))
        parts.append(section(entry, seconds))
    total = time.perf_counter() - start
    GENERATED["text"] = (
        summary(rows)
        + f"\nAll {len(rows)} figures were drawn by this build in {total:.0f} s.\n\n"
        + "\n".join(parts)
    )
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, GENERATED["text"])
