"""The gradcam-jax command: argument handling in-process, and one end-to-end run in a
subprocess (the demo picture, more images, a damaged file and a missing one)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cli_model  # tests/cli_model.py
import jax
import numpy as np
import pytest
import vit_models  # tests/vit_models.py
from PIL import Image

import gradcam_jax as gcj
from gradcam_jax import cli, zoo
from gradcam_jax.cli import explain_job
from gradcam_jax.cli.common import Progress, UsageError, parse_classes, parse_methods
from gradcam_jax.dataset import open_results

REPO = Path(__file__).resolve().parents[1]


def needs_weights(fn):
    """Marks tests on the real checkpoint (a required dependency: never skipped)."""
    return fn


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_cache")


@pytest.fixture
def env(monkeypatch, cache):
    # In-process runs must not switch on JAX's persistent cache for the whole test session.
    monkeypatch.setenv("GRADCAM_JAX_NO_XLA_CACHE", "1")
    monkeypatch.setenv("GRADCAM_JAX_CACHE", str(cache))


def _subprocess_env(cache):
    env = dict(os.environ)
    env["GRADCAM_JAX_CACHE"] = str(cache)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_parse_classes():
    assert parse_classes("top3") == 3
    assert parse_classes(" TOP-1 ") == 1
    assert parse_classes("285,967") == [285, 967]
    assert parse_classes("tabby, espresso ,7") == ["tabby", "espresso", 7]
    with pytest.raises(UsageError):
        parse_classes(" , ")
    with pytest.raises(UsageError):
        parse_classes("top0")


def test_parse_methods():
    names = gcj.method_names("gradient")
    assert parse_methods("grad_cam,Grad-CAM-Plus-Plus,grad_cam", names) == [
        "grad_cam",
        "grad_cam_plus_plus",
        "grad_cam",
    ]
    with pytest.raises(UsageError, match="unknown method.*Sorcery; available: cam, "):
        parse_methods("grad_cam,Sorcery", names)
    with pytest.raises(UsageError, match="--methods is empty"):
        parse_methods(" , ", names)


def test_explain_methods_are_the_gradient_methods_and_the_guided_ones():
    guided = {"guided_backprop", "guided_grad_cam"}
    assert set(explain_job.METHODS) == set(gcj.method_names("gradient")) | guided
    assert set(explain_job.DEFAULT_METHODS.split(",")) <= set(explain_job.METHODS)


def test_help_lists_the_zoo_models_and_the_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", "--help"])
    assert exc.value.code == 0
    assert f"available: {', '.join(zoo.MODELS)})" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"gradcam-jax {gcj.__version__}"


def test_progress_bar_lines():
    out = io.StringIO()
    bar = Progress(5, enabled=True, stream=out)
    for _ in range(5):
        bar.update(1, "x.jpg")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("[" + "#" * 28 + "] 5/5 images")
    quiet = io.StringIO()
    small = Progress(3, enabled=True, stream=quiet)  # a few images: no bar
    small.update(3)
    assert quiet.getvalue() == ""


def test_usage_errors(env, capsys, tmp_path):
    assert cli.main([]) == 2
    assert "explain" in capsys.readouterr().err
    assert cli.main(["explain"]) == 2
    assert "no images given" in capsys.readouterr().err
    assert cli.main(["explain", "x.jpg", "--methods", "sorcery"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gradcam-jax explain ") and "gradcam-jax: error: unknown method" in err
    assert cli.main(["explain", "x.jpg", "--cmap", "no-such-map"]) == 2
    assert "colormap" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", "x.jpg", "--batch-size", "0"])
    assert exc.value.code == 2


@needs_weights
def test_usage_errors_that_need_the_model(env, capsys, tmp_path):
    assert cli.main(["explain", "x.jpg", "--classes", "unicorn", "--out", str(tmp_path)]) == 2
    assert "no class named 'unicorn'" in capsys.readouterr().err
    assert cli.main(["explain", "x.jpg", "--classes", "1000", "--out", str(tmp_path)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["explain", "x.jpg", "--layer", "blocks_99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a layer" in err and "blocks_15" in err and "head" in err
    assert cli.main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "head" in out and "(7, 7, 1280)" in out and "<- default" in out


def test_help_in_a_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "gradcam_jax", "explain", "--help"],
        capture_output=True,
        text=True,
        env=_subprocess_env(Path("/nonexistent")),
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0
    for word in ("--demo", "--classes", "--methods", "--layer", "--out", "top3", "examples:"):
        assert word in r.stdout


@needs_weights
def test_end_to_end(tmp_path, cache):
    demo = Image.open(zoo.DEMO_IMAGE).convert("RGB")
    demo.crop((0, 0, 300, 300)).save(tmp_path / "cat.png")
    demo.crop((332, 0, 632, 300)).convert("L").save(tmp_path / "cup.jpg")  # grayscale is fine
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    out = tmp_path / "out"
    args = [
        "--demo",
        "cat.png",
        "broken.jpg",
        "missing.png",
        "cup.jpg",
        "--classes",
        "top2",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--save-maps",
        "--dpi",
        "80",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "gradcam_jax", "explain", *args],
        capture_output=True,
        text=True,
        env=_subprocess_env(cache),
        cwd=tmp_path,
        timeout=600,
    )
    print(r.stderr)
    assert r.returncode == 1, r.stderr  # some files failed ...
    assert "cannot read 'broken.jpg'" in r.stderr
    assert "cannot read 'missing.png': no such file" in r.stderr
    for name in ("demo", "cat", "cup"):  # ... the others were written
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 600 and im.height > 150
    assert "5/5 images" in r.stderr  # the progress bar, past 3 images

    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "efficientnet_lite0" and res["layer"] == "head"
    assert res["methods"][0] == "grad_cam"
    assert [e["path"] for e in res["errors"]] == ["broken.jpg", "missing.png"]
    assert [Path(i["path"]).name for i in res["images"]] == ["demo.jpg", "cat.png", "cup.jpg"]
    demo_rec = res["images"][0]
    assert {c["index"] for c in demo_rec["explained"]} == {285, 967}  # one class per object
    assert demo_rec["top"][0]["index"] in (285, 967) and 0 < demo_rec["top"][0]["prob"] < 1
    assert (demo_rec["width"], demo_rec["height"]) == (632, 300)
    names = ("demo.png", "demo.npz", "cat.png", "cat.npz", "cup.png", "cup.npz")
    assert sorted(res["files"]) == sorted(str(out / f) for f in names)

    maps = cli_model.read_npz(out / "demo.npz")
    assert maps["grad_cam"].shape == (2, 224, 224)
    left, right = maps["grad_cam"][..., :112].sum(-1).sum(-1), maps["grad_cam"][..., 112:].sum(-1).sum(-1)
    cat_row = list(maps["classes"]).index(285)
    assert left[cat_row] > right[cat_row] and right[1 - cat_row] > left[1 - cat_row]
    for name in ("guided_backprop", "guided_grad_cam"):
        if name in res["methods"]:
            assert maps[name].shape == (2, 224, 224, 3)


def test_import_gradcam_jax_leaves_the_command_out():
    code = "import gradcam_jax, sys; print(sorted(m for m in sys.modules if m.startswith('gradcam_jax.cli')))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_subprocess_env(Path("/nonexistent")),
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def test_explain_dir_is_a_subcommand(env, tmp_path, capsys):
    assert "explain-dir" in cli.build_parser().format_help()
    store, missing = str(tmp_path / "s.zarr"), str(tmp_path / "no-such-folder")
    assert cli.main(["explain-dir", missing, "--out", store]) == 2
    assert capsys.readouterr().err == f"gradcam-jax explain-dir: error: {missing!r} is not a folder.\n"
    assert cli.main(["explain-dir", str(tmp_path), "--out", store, "--model", "no_such_module:f"]) == 2
    assert "--model 'no_such_module:f': cannot import 'no_such_module'" in capsys.readouterr().err
    assert cli.main(["explain-dir", str(tmp_path), "--out", store, "--model", "cli_model:nothing"]) == 2
    assert "'cli_model' has no 'nothing'" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "explain-dir",
                str(tmp_path),
                "--out",
                store,
                "--model",
                "cli_model:tiny_tap",
                "--methods",
                "grad_cam,score_cam",
            ]
        )
        == 2
    )
    assert "unknown method(s) score_cam" in capsys.readouterr().err


def test_explain_dir_with_a_model_from_a_module(env, tmp_path):
    """``--model MODULE:FUNCTION`` (tests/cli_model.py, importable by name): a bare tap."""
    images = tmp_path / "images"
    images.mkdir()
    r = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(r.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"not a PNG")
    store = tmp_path / "maps.zarr"
    model = ["--model", "cli_model:tiny_tap", "--size", "16", "--classes", "top2", "--methods", "Grad-CAM"]
    args = ["explain-dir", str(images), "--out", str(store), *model, "--batch-size", "4", "-q"]
    assert cli.main(args) == 1  # one unreadable file, recorded in the store

    res = open_results(store)
    assert list(res["files"][:]) == ["broken.png", "img0.png", "img1.png", "img2.png"]
    assert [f for f, _ in res.failures()] == ["broken.png"]
    assert res.config["methods"] == ["grad_cam"] and res.config["summary"]["explained"] == 3
    maps, targets = np.asarray(res["maps"][1:], np.float32), np.asarray(res["targets"][1:])
    assert maps.shape == (3, 2, 16, 16)
    tap = cli_model.tiny_tap()
    x = np.stack([np.asarray(Image.open(images / f"img{i}.png"), np.float32) for i in range(3)])
    scores = np.asarray(tap(x)[0])
    np.testing.assert_array_equal(targets, np.argsort(-scores, axis=-1, kind="stable")[:, :2])
    expected = np.asarray(gcj.grad_cam(tap, x, target=targets, upsample=False))
    np.testing.assert_allclose(maps, expected, atol=2e-3)  # the store keeps float16 maps


# --------------------------------------------------------------------------------------------
# Your own model: --model MODULE:FACTORY (tests/cli_model.py) or FILE.py:FACTORY
# --------------------------------------------------------------------------------------------


def _images(folder, sizes):
    folder.mkdir(exist_ok=True)
    r = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return [str(p) for p in paths]


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im)


def _format(path):
    with Image.open(path) as im:
        return im.format


def test_explain_with_a_factory_model(env, tmp_path):
    """``explain --model cli_model:tiny_model``: the factory's class names, layer and maps."""
    paths = _images(tmp_path / "images", [(16, 16), (20, 24)])
    out = tmp_path / "out"
    common = ["--model", "cli_model:tiny_model", "--methods", "grad_cam", "--dpi", "40", "-q", "--save-maps"]
    assert cli.main(["explain", *paths, *common, "--classes", "top2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "tiny_fruit_net" and res["layer"] == "block2" and res["input_size"] == 16
    model = cli_model.tiny_model()
    for path, rec in zip(paths, res["images"], strict=True):
        assert _format(out / f"{Path(path).stem}.png") == "PNG"
        x = model.preprocess(_read(path))
        probs = np.asarray(jax.nn.softmax(model.logits(x), axis=-1))[0]
        top2 = np.argsort(-probs)[:2]
        assert [c["index"] for c in rec["explained"]] == top2.tolist()
        assert [c["name"] for c in rec["explained"]] == [cli_model.FRUITS[c] for c in top2]
        assert [c["name"] for c in rec["top"]] == [cli_model.FRUITS[c] for c in np.argsort(-probs)]
        maps = cli_model.read_npz(out / f"{Path(path).stem}.npz")["grad_cam"]
        np.testing.assert_allclose(maps, gcj.grad_cam(model.tap, x, target=top2[None])[0], atol=1e-5)

    # --layer goes through tap_at; a class by name
    assert (
        cli.main(
            ["explain", paths[0], *common, "--layer", "block1", "--classes", "Cherry", "--out", str(out)]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["layer"] == "block1" and res["images"][0]["explained"][0]["name"] == "cherry"
    x = model.preprocess(_read(paths[0]))
    expected = gcj.grad_cam(model.tap_at("block1"), x, target=np.array([[2]]))[0]
    np.testing.assert_allclose(cli_model.read_npz(out / "img0.npz")["grad_cam"], expected, atol=1e-5)


def test_factory_model_usage_errors(env, tmp_path, capsys):
    """A factory returning an incomplete model: exit status 2 and a message naming what is missing."""
    paths = _images(tmp_path / "images", [(16, 16)])
    out = ["--out", str(tmp_path / "out"), "-q"]
    assert cli.main(["explain", *paths, "--model", "cli_model:without_preprocess", *out]) == 2
    err = capsys.readouterr().err
    assert "returned a _NoPreprocess that lacks preprocess (preprocess(images) -> model input)" in err
    assert "ExplainableModel" in err
    store = ["--out", str(tmp_path / "s.zarr"), "-q"]
    assert (
        cli.main(["explain-dir", str(tmp_path / "images"), "--model", "cli_model:without_preprocess", *store])
        == 2
    )
    assert "lacks preprocess" in capsys.readouterr().err

    bad = tmp_path / "my_models.py"  # the FILE.py:FACTORY form
    bad.write_text("class Net:\n    class_names = None\n\n\ndef factory():\n    return Net()\n")
    assert cli.main(["explain", *paths, "--model", f"{bad}:factory", *out]) == 2
    assert "returned a Net that lacks preprocess, tap, logits (" in capsys.readouterr().err

    assert (
        cli.main(["explain", *paths, "--model", "cli_model:without_tap_at", "--layer", "block1", *out]) == 2
    )
    assert "has no tap_at(layer) method" in capsys.readouterr().err
    assert cli.main(["explain", *paths, "--model", "cli_model:tiny_model", "--layer", "block9", *out]) == 2
    assert "Top-level layers: block1, block2, block3, fc" in capsys.readouterr().err
    assert cli.main(["explain", *paths, "--model", "cli_model:tiny_tap", *out]) == 2
    assert "returned a tap; this command needs a whole model" in capsys.readouterr().err
    assert cli.main(["layers", "--model", "cli_model:without_tap_at"]) == 2
    assert "does not list its layers" in capsys.readouterr().err


def test_layers_of_a_factory_model(env, capsys):
    assert cli.main(["layers", "--model", "cli_model:tiny_model"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# tiny_fruit_net: layer paths") and "16 x 16 input" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(lines) == ["block1", "block2", "block3", "fc"]
    assert "(16, 16, 8)" in lines["block1"] and lines["block2"].endswith("<- default")


def test_explain_dir_with_a_factory_model(env, tmp_path):
    """``explain-dir --model cli_model:tiny_model``: the factory's preprocessing, size and tap_at."""
    paths = _images(tmp_path / "images", [(16, 16), (16, 16), (16, 16)])
    store = tmp_path / "maps.zarr"
    model = ["--model", "cli_model:tiny_model", "--layer", "block1", "--classes", "top2"]
    assert cli.main(["explain-dir", str(tmp_path / "images"), "--out", str(store), *model, "-q"]) == 0
    res = open_results(store)
    assert list(res["files"][:]) == ["img0.png", "img1.png", "img2.png"]
    m = cli_model.tiny_model()
    x = m.preprocess(np.stack([_read(p) for p in paths]))
    targets = np.asarray(res["targets"][:])
    np.testing.assert_array_equal(
        targets, np.argsort(-np.asarray(m.logits(x)), axis=-1, kind="stable")[:, :2]
    )
    expected = np.asarray(gcj.grad_cam(m.tap_at("block1"), x, target=targets, upsample=False))
    np.testing.assert_allclose(np.asarray(res["maps"][:], np.float32), expected, atol=2e-3)
    assert res.class_names == list(cli_model.FRUITS)  # the factory's class names reach the store
    assert res.config["layer"] == "block1"


# --------------------------------------------------------------------------------------------
# Issue 19: exit codes, one decoder, bounded figures
# --------------------------------------------------------------------------------------------


def test_help_documents_the_exit_codes(capsys):
    for command in (["explain", "--help"], ["explain-dir", "--help"], ["--help"]):
        with pytest.raises(SystemExit):
            cli.main(command)
        text = capsys.readouterr().out
        assert "exit status:" in text and "  3    the output cannot be used" in text, command
        assert "  130  interrupted" in text


def test_negative_class_is_out_of_range(env, tmp_path, capsys):
    paths = _images(tmp_path / "images", [(16, 16)])
    args = ["--model", "cli_model:tiny_model", "--classes", "-1", "-q"]
    assert cli.main(["explain", *paths, *args, "--out", str(tmp_path / "out")]) == 2
    assert "class index -1 is out of range; tiny_fruit_net has 5 classes (0-4)" in capsys.readouterr().err
    assert cli.main(["explain-dir", str(tmp_path / "images"), *args, "--out", str(tmp_path / "s")]) == 2
    assert "--classes: class -1 is out of range; the model has 5 classes." in capsys.readouterr().err


def test_a_1x1_image_is_refused_alike_by_both_commands(env, tmp_path):
    folder = tmp_path / "images"
    _images(folder, [(16, 16)])
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "dot.png")
    model = ["--model", "cli_model:tiny_model", "--methods", "grad_cam", "-q"]
    out = tmp_path / "out"
    assert (
        cli.main(["explain", str(folder / "img0.png"), str(folder / "dot.png"), *model, "--out", str(out)])
        == 1
    )
    errors = json.loads((out / "results.json").read_text())["errors"]
    store = tmp_path / "s.zarr"
    assert cli.main(["explain-dir", str(folder), *model, "--out", str(store)]) == 1
    message = "image is only 1 x 1 pixels; at least 2 x 2 are needed"
    assert errors == [{"path": str(folder / "dot.png"), "error": message}]
    assert open_results(store).failures() == [("dot.png", message)]


def test_figures_hold_at_most_figure_rows_classes(env, tmp_path, monkeypatch, capsys):
    """``--classes top1000`` drew a 307,593 px tall figure: figures (and --save-maps) now hold
    FIGURE_ROWS classes (here 2, the tiny model having 5), results.json all of them, with a note."""
    from gradcam_jax.cli import explain

    monkeypatch.setattr(explain, "FIGURE_ROWS", 2)
    paths = _images(tmp_path / "images", [(16, 16)])
    common = ["--model", "cli_model:tiny_model", "--methods", "grad_cam", "--dpi", "40", "--save-maps"]
    assert cli.main(["explain", *paths, *common, "--classes", "top5", "--out", str(tmp_path / "a")]) == 0
    note = (
        "--classes top5: figures (and --save-maps) hold each image's first 2 of its 5 classes; "
        "results.json lists all 5."
    )
    err = capsys.readouterr().err
    assert f"gradcam-jax: note: {note}" in err and " and 3 more -> " in err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    explained = [c["index"] for c in res["images"][0]["explained"]]
    assert res["note"] == note and res["figure_rows"] == 2 and len(explained) == 5
    saved = cli_model.read_npz(tmp_path / "a" / "img0.npz")
    assert saved["classes"].tolist() == explained[:2] and saved["grad_cam"].shape == (2, 16, 16)
    assert (
        cli.main(["explain", *paths, *common, "--classes", "top2", "--out", str(tmp_path / "b"), "-q"]) == 0
    )
    assert "note" not in json.loads((tmp_path / "b" / "results.json").read_text())
    with Image.open(tmp_path / "a" / "img0.png") as a, Image.open(tmp_path / "b" / "img0.png") as b:
        assert a.size == b.size


def test_large_photos_are_drawn_at_a_bounded_size(env, tmp_path, monkeypatch):
    from gradcam_jax import viz
    from gradcam_jax.cli.explain import FIGURE_MAX_SIDE, figure_image

    assert FIGURE_MAX_SIDE == 2048
    assert figure_image(np.zeros((3000, 5000, 3), np.uint8)).shape == (1229, 2048, 3)
    small = np.zeros((30, 50, 3), np.uint8)
    assert figure_image(small) is small
    drawn = []
    original = viz.figure_grid

    def spy(image, *args, **kwargs):
        drawn.append(np.shape(image))
        return original(image, *args, **kwargs)

    monkeypatch.setattr(viz, "figure_grid", spy)
    big = np.random.default_rng(3).integers(0, 256, (2100, 3300, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=70)
    model = ["--model", "cli_model:tiny_model", "--methods", "grad_cam", "--dpi", "40", "-q"]
    assert cli.main(["explain", str(tmp_path / "big.jpg"), *model, "--out", str(tmp_path / "out")]) == 0
    assert drawn == [(1303, 2048, 3)]
    rec = json.loads((tmp_path / "out" / "results.json").read_text())["images"][0]
    assert (rec["width"], rec["height"]) == (3300, 2100)


def test_explain_a_transformer_with_attention_methods(env, tmp_path, capsys):
    """``explain --methods attention_rollout,generic_attention,legrad`` on a ViT from ``--model``:
    the maps are the library's for the explained classes; a model without attention is refused."""
    paths = _images(tmp_path / "images", [(32, 32)])
    out = tmp_path / "out"
    methods = "attention_rollout,generic_attention,legrad"
    common = ["--classes", "top2", "--dpi", "40", "-q", "--save-maps", "--out", str(out)]
    assert cli.main(["explain", *paths, "--model", "vit_models:cli_vit", "--methods", methods, *common]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == methods.split(",")
    model = vit_models.cli_vit()
    x = model.preprocess(_read(paths[0]))
    top2 = np.argsort(-np.asarray(model.logits(x))[0])[:2][None]
    saved = cli_model.read_npz(out / "img0.npz")
    rollout = np.asarray(gcj.attention_rollout(model.logits, x))[0]
    np.testing.assert_allclose(saved["attention_rollout"], np.stack([rollout, rollout]), atol=1e-5)
    generic = gcj.generic_attention(model.logits, x, top2)[0]
    np.testing.assert_allclose(saved["generic_attention"], generic, atol=1e-5)
    legrad = gcj.legrad(model.logits, x, top2, head=model.attention_head)[0]
    np.testing.assert_allclose(saved["legrad"], legrad, atol=1e-5)

    capsys.readouterr()
    cnn = ["explain", *paths, "--model", "cli_model:tiny_model", "--methods", "generic_attention", *common]
    assert cli.main(cnn) == 2
    assert "no attention block" in capsys.readouterr().err
