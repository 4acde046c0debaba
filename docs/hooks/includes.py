"""MkDocs hook: pages that include a file of the repository instead of a copy of it.

A page line ``<!-- include: benchmarks/README.md -->`` is replaced, at build time, by that
file's Markdown (the path is relative to the repository root); ``<!-- include:
README.md#Measuring explanations -->`` by one section of it (from that heading to the next
heading of the same or a higher level; a missing heading is an error). Relative links inside the
included file are rewritten for the page that includes it:

- a link to another included Markdown file goes to the page that includes it;
- a link to an image (``results/sanity_checks.png``) goes to a copy of the image the build adds
  to the site (under ``repo/``, never committed to ``docs/``);
- a link to any other file of the repository (a script) becomes its path in code, since the
  site does not serve source files.

A missing included file or a link to a repository file that does not exist is an error, so the
strict build catches a renamed file.

The notebooks of ``notebooks/`` are added to the site the same way, as ``notebooks/<name>.ipynb``
(before mkdocs-jupyter looks at the files, which then executes and renders each one), and listed
under "Notebooks" in the navigation, titled by their first heading.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- include: ([^#\n]+?)(?:#([^\n]+?))? -->$", re.M)
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")
COPIES = "repo"
NOTEBOOKS = "Notebooks"

log = logging.getLogger("mkdocs.hooks.includes")

# repository Markdown file -> the page that includes it; filled by on_files.
INCLUDED: dict[str, str] = {}


def read_repo_file(path: str) -> str:
    full = REPO / path
    if not full.is_file():
        raise PluginError(f"include: {path} does not exist in the repository")
    return full.read_text(encoding="utf-8")


def section(text: str, heading: str, path: str) -> str:
    """The part of ``text`` under the heading ``heading`` (headings inside code fences ignored)."""
    lines, start, level, fenced = text.splitlines(), None, 0, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        found = None if fenced else re.match(r"^(#+) (.+?)\s*$", line)
        if found and start is None and found.group(2) == heading:
            start, level = i, len(found.group(1))
        elif found and start is not None and len(found.group(1)) <= level:
            return "\n".join(lines[start:i]) + "\n"
    if start is None:
        raise PluginError(f"include: {path} has no heading {heading!r}")
    return "\n".join(lines[start:]) + "\n"


def is_relative(url: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", url)


def linked_repo_files(text: str, source: str) -> list[str]:
    """Repository paths of the relative links in ``text`` (a file at repository path ``source``)."""
    paths = []
    for match in LINK.finditer(text):
        url = match.group(3)
        if is_relative(url):
            paths.append(posixpath.normpath(posixpath.join(posixpath.dirname(source), url.split("#")[0])))
    return paths


def rewrite_links(text: str, source: str, page: str) -> str:
    """``text`` from repository file ``source``, its relative links made to work from ``page``."""

    def replace(match: re.Match) -> str:
        bang, label, url = match.groups()
        if not is_relative(url):
            return match.group(0)
        path, _, anchor = url.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if not (REPO / repo_path).exists():
            raise PluginError(f"{source}: the link {url!r} points to {repo_path}, which does not exist")
        here = posixpath.dirname(page)
        if repo_path in INCLUDED:
            target = posixpath.relpath(INCLUDED[repo_path], here) + (f"#{anchor}" if anchor else "")
            return f"{bang}[{label}]({target})"
        if repo_path.lower().endswith(IMAGE_SUFFIXES):
            return f"{bang}[{label}]({posixpath.relpath(f'{COPIES}/{repo_path}', here)})"
        return f"{label} (`{repo_path}`)" if label.strip("`") != repo_path else f"`{repo_path}`"

    return LINK.sub(replace, text)


def notebooks() -> list[Path]:
    return sorted((REPO / "notebooks").glob("*.ipynb"))


def notebook_title(path: Path) -> str:
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        heading = re.search(r"^# (.+)$", "".join(cell["source"]), re.M)
        if cell["cell_type"] == "markdown" and heading:
            return heading.group(1).strip()
    return path.stem


def on_config(config, **kwargs):
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and NOTEBOOKS in entry:
            config["nav"][i] = {NOTEBOOKS: [{notebook_title(p): f"notebooks/{p.name}"} for p in notebooks()]}
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which claims the notebooks
def on_files(files, config, **kwargs):
    for path in notebooks():
        # A plain File rooted at the repository (not File.generated, whose source path
        # mkdocs-jupyter's wrapper cannot see): notebooks/<name>.ipynb of the checkout.
        nb = File(f"notebooks/{path.name}", str(REPO), config["site_dir"], config["use_directory_urls"])
        files.append(nb)
    INCLUDED.clear()
    pages = [f for f in files if f.src_uri.endswith(".md") and f.abs_src_path]
    includes = []
    for f in pages:
        for path, heading in MARKER.findall(Path(f.abs_src_path).read_text(encoding="utf-8")):
            if not heading:
                INCLUDED[path] = f.src_uri
            includes.append(path)
    images = sorted({p for path in includes for p in linked_repo_files(read_repo_file(path), path)})
    for path in images:
        if path.lower().endswith(IMAGE_SUFFIXES) and (REPO / path).is_file():
            files.append(File.generated(config, f"{COPIES}/{path}", abs_src_path=str(REPO / path)))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    def include(match: re.Match) -> str:
        path, heading = match.groups()
        text = read_repo_file(path)
        if heading:
            text = section(text, heading, path)
        return rewrite_links(text, path, page.file.src_uri)

    return MARKER.sub(include, markdown)
