"""Overlays, gradient images, figure grids, signal and volume figures, PNG output (no model needed)."""

import io

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
    viz.signal_figure(rng.random((20, 2)), rng.random(20))
    viz.volume_figure(rng.random((4, 6, 6)), rng.random((4, 6, 6)))
    import sys

    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


# --------------------------------------------------------------------------------------------
# Signals (1-D) and volumes / videos (3-D)
# --------------------------------------------------------------------------------------------


def _png_size(fig):
    with Image.open(io.BytesIO(viz.png_bytes(fig))) as im:
        return im.size


def _expected_size(fig):
    return tuple(int(round(v * fig.dpi)) for v in fig.get_size_inches())


def _pixel(fig, ax, x, y):
    """The RGB colour drawn at data point ``(x, y)`` of ``ax``."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return buf[int(buf.shape[0] - py), int(px), :3].astype(int)


def _cmap_rgb(value, cmap="jet"):
    return np.round(np.asarray(matplotlib.colormaps[cmap](value)[:3]) * 255).astype(int)


@pytest.fixture
def signal(rng):
    return np.cumsum(rng.normal(size=(40, 3)), axis=0).astype(np.float32)  # (T, C)


def test_signal_figure_renders_with_one_strip_per_map(signal, rng):
    maps = {"grad_cam": rng.random(40), "layer_cam": rng.random(10), "mine": rng.random(5)}
    fig = viz.signal_figure(signal, maps, names=["x", "y", "z"], title="demo", dpi=72)
    assert type(fig).__name__ == "Figure" and len(fig.axes) == 1 + 3
    assert len(fig.axes[0].lines) == 3  # one line per channel
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["x", "y", "z"]
    assert [ax.get_ylabel() for ax in fig.axes[1:]] == ["Grad-CAM", "LayerCAM", "mine"]
    assert _png_size(fig) == _expected_size(fig)
    # (T,) signals, (K, t) maps and titles; the band style has one panel per map.
    fig = viz.signal_figure(signal[:, 0], rng.random((2, 20)), titles=["cat", "dog"])
    assert len(fig.axes) == 3 and [ax.get_ylabel() for ax in fig.axes[1:]] == ["cat", "dog"]
    assert len(fig.axes[0].lines) == 1
    band = viz.signal_figure(signal, rng.random((2, 20)), style="band", dpi=60)
    assert len(band.axes) == 2 and all(len(ax.lines) == 3 and ax.images for ax in band.axes)
    assert _png_size(band) == _expected_size(band)


def test_signal_strip_colours_follow_the_map(signal):
    heat = np.full(40, 0.3)
    heat[13], heat[29] = 1.0, 0.0
    fig = viz.signal_figure(signal, heat, cmap="viridis", dpi=100)
    strip = fig.axes[1]
    np.testing.assert_allclose(_pixel(fig, strip, 13, 0.5), _cmap_rgb(1.0, "viridis"), atol=1)
    np.testing.assert_allclose(_pixel(fig, strip, 29, 0.5), _cmap_rgb(0.0, "viridis"), atol=1)
    np.testing.assert_allclose(_pixel(fig, strip, 5, 0.5), _cmap_rgb(0.3, "viridis"), atol=1)
    # A shorter map is stretched over the signal: a peak in the 2nd of 4 cells colours steps 10-19.
    fig = viz.signal_figure(signal, np.array([0.0, 1.0, 0.0, 0.0]), dpi=100)
    drawn = np.asarray(fig.axes[1].images[0].get_array())[0]
    assert drawn.shape == (40,) and int(np.argmax(drawn)) in range(10, 20)
    np.testing.assert_allclose(_pixel(fig, fig.axes[1], 0, 0.5), _cmap_rgb(0.0), atol=1)
    # Values outside [0, 1] are clipped, like overlay.
    fig = viz.signal_figure(signal, np.linspace(-1, 2, 40))
    drawn = np.asarray(fig.axes[1].images[0].get_array())
    assert drawn.min() == 0.0 and drawn.max() == 1.0


def test_signal_maps_resize_like_upsample_to(rng):
    import jax

    from gradcam_jax.viz._images import resize_linear
    from gradcam_jax.viz._signal import signal_maps

    m = rng.random(7).astype(np.float32)
    [(label, got)] = signal_maps(m, 30)
    want = np.asarray(jax.image.resize(m, (30,), "linear"))
    assert label == "map"
    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)
    v = rng.random((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        resize_linear(v, (6, 9, 10)), np.asarray(jax.image.resize(v, (2, 6, 9, 10), "linear")), atol=1e-6
    )


def test_signal_figure_batch(signal, rng):
    batch = np.stack([signal, -signal])
    figs = viz.signal_figure(batch, rng.random((2, 10)), title=["a", "b"])
    assert isinstance(figs, list) and len(figs) == 2 and all(len(f.axes) == 2 for f in figs)
    assert [f.texts[0].get_text() for f in figs] == ["a", "b"]
    figs = viz.signal_figure(batch, {"grad_cam": rng.random((2, 10)), "cam": rng.random((2, 40))})
    assert all(len(f.axes) == 3 for f in figs)
    assert len(viz.signal_figure(batch, rng.random((2, 3, 10)))[1].axes) == 4  # (B, K, t): K strips


def test_signal_figure_errors(signal, rng):
    with pytest.raises(ValueError, match=r"\(T,\) or \(T, C\)"):
        viz.signal_figure(rng.random((2, 3, 4, 5)), rng.random(4))
    with pytest.raises(ValueError, match="channels-first"):
        viz.signal_figure(signal.T, rng.random(40))  # (C, T): the map is longer than the "signal"
    with pytest.raises(ValueError, match=r"each map must be \(t,\)"):
        viz.signal_figure(signal, {"grad_cam": rng.random((4, 4))})
    with pytest.raises(ValueError, match="names"):
        viz.signal_figure(signal, rng.random(40), names=["x"])
    with pytest.raises(ValueError, match="titles"):
        viz.signal_figure(signal, rng.random(40), titles=["a", "b"])
    with pytest.raises(ValueError, match="style"):
        viz.signal_figure(signal, rng.random(40), style="bars")
    with pytest.raises(ValueError, match="no maps"):
        viz.signal_figure(signal, {})
    with pytest.raises(ValueError, match="leading axis of 2"):
        viz.signal_figure(np.stack([signal, signal]), rng.random(40))


@pytest.fixture
def volume(rng):
    return rng.random((6, 10, 8)).astype(np.float32)  # (D, H, W)


def _panel(ax):
    return np.asarray(ax.images[0].get_array())


def test_volume_figure_one_axes_per_slice(volume, rng):
    heat = rng.random((6, 10, 8))
    fig = viz.volume_figure(volume, heat, title="vol", dpi=72)
    assert len(fig.axes) == 6  # fewer slices than max_slices: all of them
    assert [ax.get_title() for ax in fig.axes] == [f"slice {i}" for i in range(6)]
    assert _png_size(fig) == _expected_size(fig)
    fig = viz.volume_figure(volume, heat, max_slices=3, ncols=2)
    assert [ax.get_title() for ax in fig.axes] == ["slice 1", "slice 3", "slice 5"]
    rows = {round(ax.get_position().y0, 6) for ax in fig.axes}
    assert len(rows) == 2  # 3 panels, 2 a row
    fig = viz.volume_figure(volume, heat, slices=[4, -1, 0])
    assert [ax.get_title() for ax in fig.axes] == ["slice 4", "slice 5", "slice 0"]
    # Each panel is overlay() of that slice.
    vol_rgb = viz.overlay(volume[4], heat[4], alpha=0.3, cmap="magma")
    fig = viz.volume_figure(volume, heat, slices=[4], alpha=0.3, cmap="magma")
    np.testing.assert_array_equal(_panel(fig.axes[0]), vol_rgb)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_volume_slices_along_each_axis(volume, rng, axis):
    heat = rng.random(volume.shape)
    fig = viz.volume_figure(volume, heat, axis=axis, slices=[2, 3])
    shown = [_panel(ax) for ax in fig.axes]
    for i, panel in zip([2, 3], shown, strict=True):
        want = viz.overlay(np.take(volume, i, axis), np.take(heat, i, axis))
        np.testing.assert_array_equal(panel, want)
    plane = [s for a, s in enumerate(volume.shape) if a != axis % 3]
    assert shown[0].shape == (*plane, 3)


def test_volume_heatmap_resized_and_intensities_scaled(rng):
    import jax

    ct = rng.normal(size=(8, 12, 10)).astype(np.float32) * 400 - 100  # any range: min-max scaled
    small = rng.random((4, 3, 5)).astype(np.float32)
    fig = viz.volume_figure(ct, small, slices=[3], alpha=1.0)
    big = np.asarray(jax.image.resize(small, ct.shape, "linear"))  # trilinear, half-pixel centres
    colours = (matplotlib.colormaps["jet"](np.clip(big[3], 0, 1))[..., :3] * 255 + 0.5).astype(int)
    assert np.abs(_panel(fig.axes[0]).astype(int) - colours).max() <= 1
    plain = viz.volume_figure(ct, np.zeros((1, 1, 1)), slices=[0, 7], alpha=0.0)
    both = np.stack([_panel(ax) for ax in plain.axes])
    assert both.min() >= 0 and both.max() <= 255 and both.max() > 200 and both.min() < 55
    scaled = (ct - ct.min()) / (ct.max() - ct.min())
    np.testing.assert_array_equal(both[0][..., 0], np.clip(scaled[0] * 255 + 0.5, 0, 255).astype(np.uint8))


def test_volume_figure_video_and_batch(rng):
    video = rng.integers(0, 256, size=(2, 5, 12, 16, 3), dtype=np.uint8)  # (B, T, H, W, C)
    figs = viz.volume_figure(video, rng.random((2, 5, 6, 8)), slice_label="frame", title=["a", "b"])
    assert isinstance(figs, list) and len(figs) == 2
    assert [ax.get_title() for ax in figs[0].axes] == [f"frame {i}" for i in range(5)]
    assert [f.texts[0].get_text() for f in figs] == ["a", "b"]
    one = viz.volume_figure(video[1], rng.random((5, 12, 16)), slices=[2], alpha=0.0)
    np.testing.assert_array_equal(_panel(one.axes[0]), video[1, 2])  # uint8 frames shown as they are
    assert _png_size(one) == _expected_size(one)


def test_volume_figure_errors(volume, rng):
    heat = rng.random(volume.shape)
    with pytest.raises(ValueError, match=r"\(d, h, w\)"):
        viz.volume_figure(volume, heat[0])
    with pytest.raises(ValueError, match=r"heatmap\[k\]"):
        viz.volume_figure(volume, rng.random((3, 6, 10, 8)))  # K maps for one volume
    with pytest.raises(ValueError, match="C in 1, 3"):
        viz.volume_figure(rng.random((6, 10, 8, 5)), heat)
    with pytest.raises(ValueError, match="larger than the volume"):
        viz.volume_figure(volume, rng.random((6, 12, 8)))
    with pytest.raises(ValueError, match="axis"):
        viz.volume_figure(volume, heat, axis=3)
    with pytest.raises(ValueError, match="out of range"):
        viz.volume_figure(volume, heat, slices=[0, 6])
    with pytest.raises(ValueError, match="max_slices"):
        viz.volume_figure(volume, heat, max_slices=0)


def test_image_functions_point_to_signal_and_volume_figures(image, signal, volume, rng):
    with pytest.raises(ValueError, match="signal_figure"):
        viz.overlay(signal, rng.random(40))
    with pytest.raises(ValueError, match="signal_figure"):
        viz.overlay(image, rng.random(40))
    with pytest.raises(ValueError, match="volume_figure"):
        viz.overlay(np.stack([volume] * 2)[..., None], rng.random((2, 6, 10, 8)))
    with pytest.raises(ValueError, match="volume_figure"):
        viz.overlay(volume[..., None], rng.random((3, 5, 4)))  # a smaller depth than the volume
    with pytest.raises(ValueError, match="signal_figure"):
        viz.figure_grid(signal[:, 0], {"grad_cam": rng.random(40)})
    with pytest.raises(ValueError, match="signal_figure"):
        viz.figure_grid(image, {"grad_cam": rng.random(40)})
    with pytest.raises(ValueError, match="volume_figure"):
        viz.figure_grid(rng.random((2, 6, 10, 8, 3)), {"grad_cam": rng.random((2, 6, 10, 8))})
    with pytest.raises(ValueError, match="signal_figure"):
        viz.figure_grid(signal, {"grad_cam": rng.random(40)})  # (T, C) with its (T,) map
