"""The wheel built from this checkout is complete: installed outside the checkout, it runs
``gradcam-jax explain --demo`` from its own package data.

The build runs offline (``pip wheel --no-build-isolation``, with the setuptools the ``test``
extra installs) on a copy of the files a source distribution needs, so no ``build/`` or
``*.egg-info`` directory is written into the checkout. The installed wheel has no dependencies
of its own: they come from this environment.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")
PIP = [sys.executable, "-m", "pip"]
PACKAGE_DATA = ("py.typed", "assets/demo.jpg", "assets/imagenet_classes.txt")


def run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(map(str, args))}` exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "gradcam_jax",
        source / "gradcam_jax",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    dist = root / "dist"
    run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), source])
    (built,) = dist.glob("gradcam_jax-*.whl")
    return built


def test_wheel_holds_package_data_and_licence(wheel):
    from gradcam_jax import __version__

    assert wheel.name.startswith(f"gradcam_jax-{__version__}-"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"gradcam_jax-{__version__}.dist-info/entry_points.txt").decode()
    missing = [f for f in PACKAGE_DATA if f"gradcam_jax/{f}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert "gradcam-jax = " in entry_points, entry_points


def test_installed_wheel_explains_the_demo(wheel, tmp_path):
    target = tmp_path / "site"
    run([*PIP, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)])
    workdir = tmp_path / "elsewhere"  # outside the checkout, so the checkout is not on sys.path
    workdir.mkdir()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu", GRADCAM_JAX_CACHE=str(tmp_path / "cache"))

    check = "import gradcam_jax; print(gradcam_jax.__file__)"
    where = run([sys.executable, "-c", check], cwd=workdir, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(target.resolve()), f"imported {where}, not the wheel"

    run([sys.executable, "-m", "gradcam_jax", "explain", "--demo", "--out", str(out)], cwd=workdir, env=env)
    assert (out / "demo.png").stat().st_size > 0
    results = (out / "results.json").read_text()
    assert json.loads(results), "results.json is empty"
    # The demo picture is the wheel's own package data, not the checkout's.
    assert str(target / "gradcam_jax" / "assets" / "demo.jpg") in results, results[:2000]
