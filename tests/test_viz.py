"""Overlays, gradient images, figure grids and PNG output (no model needed)."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from gradcam_jax import viz


@pytest.fixture
def image(rng):
    return rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)


def test_overlay_single_and_batch(image, rng):
    heat = rng.random((7, 7)).astype(np.float32)  # any size: resized to the image
    out = viz.overlay(image, heat)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8

    batch = np.stack([image, image[::-1]])
    heats = rng.random((2, 30, 40))
    out_b = viz.overlay(batch, heats, alpha=0.3, cmap="inferno")
    assert out_b.shape == (2, 30, 40, 3)
    np.testing.assert_array_equal(out_b[0], viz.overlay(image, heats[0], alpha=0.3, cmap="inferno"))

    # (K, h, w) maps of one image: K overlays.
    assert viz.overlay(image, rng.random((3, 7, 7))).shape == (3, 30, 40, 3)
    assert viz.overlay(batch, rng.random((2, 3, 7, 7))).shape == (2, 3, 30, 40, 3)


def test_overlay_blend_ends(image):
    heat = np.linspace(0, 1, 30 * 40).reshape(30, 40)
    np.testing.assert_array_equal(viz.overlay(image, heat, alpha=0.0), image)
    colours = (matplotlib.colormaps["jet"](heat)[..., :3] * 255 + 0.5).astype(np.uint8)
    diff = np.abs(viz.overlay(image, heat, alpha=1.0).astype(int) - colours.astype(int))
    assert diff.max() <= 1  # float32 blending vs float64 colours: at most one level of rounding
    # Float images in [0, 1] are accepted; values outside [0, 1] in the map are clipped.
    out = viz.overlay(image / 255.0, heat * 3 - 1, alpha=1.0)
    assert out.dtype == np.uint8


def test_overlay_errors(image):
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="heatmap"):
        viz.overlay(np.stack([image] * 2), np.zeros((3, 4, 4)))


def test_gradient_image(rng):
    g = rng.normal(size=(2, 16, 16, 3))
    out = viz.gradient_image(g)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert abs(float(out.mean()) - 128) < 3  # centred on grey
    zero = viz.gradient_image(np.zeros((8, 8, 3)))
    assert (zero == 128).all()  # an all-zero gradient is plain grey, no NaN
    # Scale invariant: each map by its own standard deviation.
    np.testing.assert_array_equal(viz.gradient_image(g[0] * 1e-6), viz.gradient_image(g[0]))


def _axes_grid(fig):
    return sorted(fig.axes, key=lambda ax: (-round(ax.get_position().y0, 6), ax.get_position().x0))


def test_figure_grid_layout_titles_and_labels(image, rng):
    maps = {
        "grad_cam": rng.random((2, 7, 7)),
        "guided_backprop": rng.normal(size=(2, 24, 24, 3)),
        "guided_grad_cam": rng.normal(size=(2, 24, 24, 3)),
    }
    probs = np.zeros(1000)
    probs[[285, 967]] = [0.25, 0.125]
    names = [f"class{i}" for i in range(1000)]
    names[285], names[967] = "Egyptian cat", "espresso"
    fig = viz.figure_grid(image, maps, [285, 967], class_names=names, probs=probs, title="demo.jpg")
    axes = _axes_grid(fig)
    assert len(axes) == 2 * 4
    assert [ax.get_title() for ax in axes[:4]] == ["Image", "Grad-CAM", "Guided Backprop", "Guided Grad-CAM"]
    assert all(ax.get_title() == "" for ax in axes[4:])
    labels = [ax.get_ylabel() for ax in axes if ax.get_ylabel()]
    assert len(labels) == 2
    assert "Egyptian cat" in labels[0] and "25.0%" in labels[0]
    assert "espresso" in labels[1] and "12.5%" in labels[1]
    assert any(t.get_text() == "demo.jpg" for t in fig.texts)
    # Panels keep the image's aspect ratio.
    pos = axes[0].get_position()
    w_in, h_in = pos.width * fig.get_figwidth(), pos.height * fig.get_figheight()
    assert abs(w_in / h_in - 40 / 30) < 1e-6


def test_figure_grid_batch_and_shared_maps(image, rng):
    batch = np.stack([image, image])
    figs = viz.figure_grid(
        batch,
        {
            "grad_cam": rng.random((2, 3, 7, 7)),
            "guided_backprop": rng.normal(size=(2, 24, 24, 3)),
        },  # one per image
        classes=np.array([[1, 2, 3], [4, 5, 6]]),
        probs=rng.random((2, 10)),
    )
    assert isinstance(figs, list) and len(figs) == 2
    assert all(len(f.axes) == 3 * 3 for f in figs)
    # Without classes: rows from the maps, no labels.
    fig = viz.figure_grid(image, {"grad_cam": rng.random((7, 7))}, show_image=False)
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="row"):
        viz.figure_grid(image, {"grad_cam": rng.random((3, 7, 7))}, classes=[1, 2])
    with pytest.raises(ValueError, match="probs"):
        viz.figure_grid(image, {"grad_cam": rng.random((2, 7, 7))}, classes=[1, 7], probs=[0.5, 0.2, 0.1])


def test_save_png_and_bytes(tmp_path, image, rng):
    fig = viz.figure_grid(image, {"grad_cam": rng.random((1, 7, 7))}, [3], probs=[0.5], dpi=80)
    path = viz.save_png(fig, tmp_path / "sub" / "fig.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height > 50
    data = viz.png_bytes(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    arr_path = viz.save_png(viz.overlay(image, rng.random((7, 7))), tmp_path / "overlay.png")
    with Image.open(arr_path) as im:
        assert im.size == (40, 30)
    with pytest.raises(ValueError, match="batch"):
        viz.save_png(np.stack([image, image]), tmp_path / "bad.png")


def test_no_pyplot_state(image, rng):
    # Figures are drawn on the Agg canvas directly: nothing is registered with pyplot.
    viz.figure_grid(image, {"grad_cam": rng.random((7, 7))})
    import sys

    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
