"""The documentation site (issue 17): it builds strictly, it covers the API, its code runs.

``mkdocs build --strict`` runs once per session into a temporary folder (the same command the
README gives); the checks below read what it wrote. Every ``python`` and ``bash`` block of the
pages under ``docs/`` runs too, page by page, in a fresh temporary folder: a page's Python blocks
run in order in one interpreter (a later block may use an earlier one's names, as a reader
would), its shell blocks with ``bash -e`` after them. Blocks in other languages (``console`` for
install commands, ``pycon``, ``text``) are not run.
"""

from __future__ import annotations

import html
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gradcam_jax as gcj

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)

# Runs a page's Python blocks in one namespace and says which block failed.
DRIVER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, code in enumerate(blocks):
    try:
        exec(compile(code, f"<block {i}>", "exec"), namespace)
    except BaseException:
        print(f"BLOCK {i} FAILED:\\n{code}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def env():
    # The interpreter's folder first on PATH, so `gradcam-jax` in a shell block is this install's.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    problems = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, f"mkdocs build --strict failed after {seconds:.0f} s:\n" + "\n".join(
        problems or log.splitlines()[-40:]
    )
    print(f"mkdocs build --strict: {seconds:.0f} s")
    return out


def anchors(page: Path) -> set[str]:
    return {html.unescape(a) for a in re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8"))}


def public_modules() -> list[str]:
    found = pkgutil.walk_packages(gcj.__path__, prefix="gradcam_jax.")
    names = [m.name for m in found if not any(p.startswith("_") for p in m.name.split("."))]
    return ["gradcam_jax", *sorted(names)]


def documented_at(module_name: str, name: str) -> list[str]:
    """Where ``module.name`` may be documented: under it, or under a package above that exports it."""
    obj = getattr(importlib.import_module(module_name), name)
    parts = module_name.split(".")
    places = [f"{module_name}.{name}"]
    for i in range(1, len(parts)):
        package = importlib.import_module(".".join(parts[:i]))
        if name in getattr(package, "__all__", ()) and getattr(package, name) is obj:
            places.append(f"{package.__name__}.{name}")
    if isinstance(obj, type(gcj)):
        places.append(obj.__name__)  # a module in __all__: its own page
    return places


def test_every_public_name_is_in_the_api_reference(site):
    ids = set().union(*(anchors(p) for p in (site / "api").glob("*.html")))
    modules = public_modules()
    assert {"gradcam_jax", "gradcam_jax.metrics", "gradcam_jax.zoo"} <= set(modules)
    missing, checked = [], 0
    for module_name in modules:
        for name in getattr(importlib.import_module(module_name), "__all__", ()):
            checked += 1
            if not ids & set(documented_at(module_name, name)):
                missing.append(f"{module_name}.{name}")
    assert checked >= len(gcj.__all__) > 40
    assert not missing, f"{len(missing)} public names are not in the API reference: {missing}"


def test_docstring_roles_are_links(site):
    page = (site / "api" / "gradcam_jax.html").read_text(encoding="utf-8")
    assert ":func:" not in page and ":class:" not in page
    # grad_cam's docstring refers to linen_tap; the reference links it.
    assert 'href="#gradcam_jax.linen_tap"' in page


def test_gallery_draws_every_method(site):
    page = (site / "gallery.html").read_text(encoding="utf-8")
    drawn = set(re.findall(r'src="gallery/(\w+)\.png"', page))
    names = set(gcj.method_names())
    aliases = {name for name in names if f'"{name}"' in html.unescape(page) and name not in drawn}
    assert names - drawn - aliases == set(), f"methods with no figure: {sorted(names - drawn - aliases)}"
    pixel = {"gradients", "guided_backprop", "deconvnet", "smooth_grad", "guided_grad_cam", "occlusion"}
    assert pixel <= drawn
    for name in drawn:
        png = (site / "gallery" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb")))
def test_notebook_page_has_its_outputs(site, name):
    # The build executes every notebook top to bottom (mkdocs-jupyter, execute: true,
    # allow_errors: false), so a notebook that raises fails the build; this checks what it drew.
    page = (site / "notebooks" / f"{name}.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64") >= 1, name
    assert "Traceback (most recent call last)" not in html.unescape(page), name
    if name == "quickstart":
        assert page.count("data:image/png;base64") >= 2
        assert "Egyptian cat" in page


def test_benchmark_pages_include_the_repository_files(site):
    for source, built in [
        ("benchmarks/README.md", "benchmarks/index.html"),
        ("benchmarks/RESULTS.md", "benchmarks/results.html"),
        ("CHANGELOG.md", "changelog.html"),
    ]:
        first_heading = re.search(r"^#+ (.+)$", (REPO / source).read_text(encoding="utf-8"), re.M).group(1)
        text = html.unescape(re.sub(r"<[^>]+>", "", (site / built).read_text(encoding="utf-8")))
        assert first_heading.replace("`", "") in text, (source, first_heading)
    included = [p for p in DOCS.rglob("*.md") if "<!-- include:" in p.read_text(encoding="utf-8")]
    assert len(included) >= 3


def test_site_has_search_and_navigation(site):
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    titles = {doc["title"] for doc in index["docs"]}
    assert {"Getting started", "Concepts", "Method gallery"} <= titles
    page = (site / "index.html").read_text(encoding="utf-8")
    for target in ["getting-started.html", "gallery.html", "how-to/index.html", "api/index.html"]:
        assert f'href="{target}"' in page, target


def blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text(encoding="utf-8")) if lang == language]


PAGES = sorted(p for p in DOCS.rglob("*.md") if blocks(p, "python") or blocks(p, "bash"))


def test_pages_with_code_are_found():
    assert len(PAGES) >= 8
    assert DOCS / "getting-started.md" in PAGES


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_code_runs(page, tmp_path):
    python = blocks(page, "python")
    if python:
        (tmp_path / "blocks.json").write_text(json.dumps(python))
        (tmp_path / "driver.py").write_text(DRIVER)
        out = subprocess.run(
            [sys.executable, "driver.py", "blocks.json"],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, f"{page.relative_to(REPO)}:\n{out.stderr[-4000:]}"
    for i, code in enumerate(blocks(page, "bash")):
        out = subprocess.run(
            ["bash", "-e", "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900
        )
        where = f"{page.relative_to(REPO)}, shell block {i}"
        assert out.returncode == 0, f"{where}:\n{code}\n{out.stderr[-4000:]}"
