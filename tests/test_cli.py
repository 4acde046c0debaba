"""The gradcam-jax command: argument handling in-process, and one end-to-end run in a
subprocess (the demo picture, more images, a damaged file and a missing one)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_jax import cli

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
    assert cli.parse_classes("top3") == ("top", 3)
    assert cli.parse_classes(" TOP-1 ") == ("top", 1)
    assert cli.parse_classes("285,967") == ("list", [285, 967])
    assert cli.parse_classes("tabby, espresso ,7") == ("list", ["tabby", "espresso", 7])
    with pytest.raises(cli.UsageError):
        cli.parse_classes(" , ")
    with pytest.raises(cli.UsageError):
        cli.parse_classes("top0")


def test_parse_methods():
    assert cli.parse_methods("grad_cam,Grad-CAM-Plus-Plus,grad_cam") == ["grad_cam", "grad_cam_plus_plus"]
    default = cli.parse_methods(None)
    assert default[0] == "grad_cam" and set(default) <= {"grad_cam", "guided_backprop", "guided_grad_cam"}
    with pytest.raises(cli.UsageError, match="unknown method.*available"):
        cli.parse_methods("grad_cam,sorcery")


def test_model_names_match_the_zoo():
    from gradcam_jax import zoo

    assert sorted(cli.MODEL_NAMES) == sorted(zoo.MODELS)


def test_progress_bar_lines():
    out = io.StringIO()
    bar = cli.Progress(5, enabled=True, stream=out)
    for _ in range(5):
        bar.update(1, "x.jpg")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("[" + "#" * 28 + "] 5/5 images")
    quiet = io.StringIO()
    small = cli.Progress(3, enabled=True, stream=quiet)  # a few images: no bar
    small.update(3)
    assert quiet.getvalue() == ""


def test_usage_errors(env, capsys, tmp_path):
    assert cli.main([]) == 2
    assert "explain" in capsys.readouterr().err
    assert cli.main(["explain"]) == 2
    assert "no images given" in capsys.readouterr().err
    assert cli.main(["explain", "x.jpg", "--methods", "sorcery"]) == 2
    assert "unknown method" in capsys.readouterr().err
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
    r = subprocess.run([sys.executable, "-m", "gradcam_jax", "explain", "--help"], capture_output=True,
                       text=True, env=_subprocess_env(Path("/nonexistent")), cwd=REPO, timeout=120)
    assert r.returncode == 0
    for word in ("--demo", "--classes", "--methods", "--layer", "--out", "top3", "examples:"):
        assert word in r.stdout


@needs_weights
def test_end_to_end(tmp_path, cache):
    demo = Image.open(cli.DEMO_IMAGE).convert("RGB")
    demo.crop((0, 0, 300, 300)).save(tmp_path / "cat.png")
    demo.crop((332, 0, 632, 300)).convert("L").save(tmp_path / "cup.jpg")  # grayscale is fine
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    out = tmp_path / "out"
    args = ["--demo", "cat.png", "broken.jpg", "missing.png", "cup.jpg", "--classes", "top2",
            "--out", str(out), "--batch-size", "2", "--save-maps", "--dpi", "80"]
    r = subprocess.run([sys.executable, "-m", "gradcam_jax", "explain", *args], capture_output=True,
                       text=True, env=_subprocess_env(cache), cwd=tmp_path, timeout=600)
    print(r.stderr)
    assert r.returncode == 1, r.stderr                       # some files failed ...
    assert "cannot read 'broken.jpg'" in r.stderr
    assert "cannot read 'missing.png': no such file" in r.stderr
    for name in ("demo", "cat", "cup"):                      # ... the others were written
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 600 and im.height > 150
    assert "5/5 images" in r.stderr                          # the progress bar, past 3 images

    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "efficientnet_lite0" and res["layer"] == "head"
    assert res["methods"][0] == "grad_cam"
    assert [e["path"] for e in res["errors"]] == ["broken.jpg", "missing.png"]
    assert [Path(i["path"]).name for i in res["images"]] == ["demo.jpg", "cat.png", "cup.jpg"]
    demo_rec = res["images"][0]
    assert {c["index"] for c in demo_rec["explained"]} == {285, 967}   # one class per object
    assert demo_rec["top"][0]["index"] in (285, 967) and 0 < demo_rec["top"][0]["prob"] < 1
    assert (demo_rec["width"], demo_rec["height"]) == (632, 300)
    assert sorted(res["files"]) == sorted(str(out / f) for f in
                                          ("demo.png", "demo.npz", "cat.png", "cat.npz", "cup.png", "cup.npz"))

    maps = np.load(out / "demo.npz")
    assert maps["grad_cam"].shape == (2, 224, 224)
    left, right = maps["grad_cam"][..., :112].sum(-1).sum(-1), maps["grad_cam"][..., 112:].sum(-1).sum(-1)
    cat_row = list(maps["classes"]).index(285)
    assert left[cat_row] > right[cat_row] and right[1 - cat_row] > left[1 - cat_row]
    for name in ("guided_backprop", "guided_grad_cam"):
        if name in res["methods"]:
            assert maps[name].shape == (2, 224, 224, 3)


def test_explain_dir_is_dispatched_when_present(env, tmp_path, capsys):
    assert cli._explain_dir_registrar() is not None
    assert "explain-dir" in cli.build_parser().format_help()
    assert cli.main(["explain-dir", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "s.zarr")]) == 2
    assert "not a folder" in capsys.readouterr().err
