"""MkDocs hook: the API reference, one page per public module, generated from ``__all__``.

A module is public when no part of its dotted name starts with an underscore. Its page renders
the module's docstring and then every name of its ``__all__`` with mkdocstrings, in ``__all__``
order, except names a package above it re-exports (those are rendered once, on the package's
page, and the submodule's page links there). A name added to any ``__all__`` therefore appears
in the reference at the next build; ``tests/test_docs.py`` checks that every one did.

Nothing is written to ``docs/``: the pages are generated files of the build.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import types

from mkdocs.structure.files import File

PACKAGE = "gradcam_jax"
API_DIR = "api"
NAV_TITLE = "API reference"


def public_modules(package: str = PACKAGE) -> list[str]:
    """The package and its modules whose dotted names have no underscore part, in walk order."""
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, prefix=package + ".")]
    public = [n for n in names if not any(part.startswith("_") for part in n.split("."))]
    return [package, *sorted(public)]


def exported(module_name: str) -> list[str]:
    """The names of a module's ``__all__`` (empty when it has none)."""
    return list(getattr(importlib.import_module(module_name), "__all__", ()))


def owner(module_name: str, name: str) -> str:
    """The highest package above ``module_name`` that re-exports the same object as ``name``.

    That is the page the object is rendered on; ``module_name`` itself when no package above
    it exports the name.
    """
    obj = getattr(importlib.import_module(module_name), name)
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        if name in exported(package) and getattr(importlib.import_module(package), name) is obj:
            return package
    return module_name


def plain_docstring(doc: str | None) -> str:
    """A docstring as Markdown without mkdocstrings: roles as inline code."""
    text = inspect.cleandoc(doc or "")
    return re.sub(r":[a-z]+:`~?\.?([^`]+)`", r"`\1`", text)


def shadowed(module_name: str) -> bool:
    """Whether the package above exports another object under this module's name."""
    package, _, name = module_name.rpartition(".")
    if not package or name not in exported(package):
        return False
    return getattr(importlib.import_module(package), name) is not importlib.import_module(module_name)


def page_path(module_name: str) -> str:
    return f"{API_DIR}/{module_name}.md"


def page_text(module_name: str) -> str:
    """The Markdown of one module's page: its docstring, then each name it owns or a link."""
    module = importlib.import_module(module_name)
    if shadowed(module_name):
        # ``gradcam_jax.guided`` is both this module and the function the package re-exports
        # under that name; the function keeps the identifier (one anchor per name), so the
        # module's docstring is shown as text under a plain title.
        lines = [f"# {module_name} (module)", "", plain_docstring(module.__doc__), ""]
    else:
        lines = [f"::: {module_name}", "    options:", "      members: false", "      heading_level: 1", ""]
    for name in exported(module_name):
        obj = getattr(module, name)
        home = owner(module_name, name)
        if isinstance(obj, types.ModuleType):
            lines += [f"- [`{module_name}.{name}`][{obj.__name__}]: the module's own page.", ""]
        elif home != module_name:
            lines += [f"- [`{name}`][{home}.{name}]: documented under `{home}`.", ""]
        else:
            lines += [f"::: {module_name}.{name}", ""]
    return "\n".join(lines)


def index_text(modules: list[str]) -> str:
    rows = "\n".join(
        f"| [`{m}`]({m}.md) | {first_line(importlib.import_module(m).__doc__)} |" for m in modules
    )
    return (
        "# API reference\n\n"
        "Every public name of the package, generated from the docstrings at build time: each "
        "public module's `__all__`, in order. Names a package re-exports are documented on the "
        "package's page (`gcj.grad_cam` under `gradcam_jax`, `metrics.box_iou` under "
        "`gradcam_jax.metrics`).\n\n"
        "| module | what it holds |\n|---|---|\n" + rows + "\n"
    )


def first_line(doc: str | None) -> str:
    text = plain_docstring(doc).splitlines()
    return text[0].replace("|", "\\|") if text else ""


def nav_entries(modules: list[str]) -> list:
    """Nested nav: top-level modules in order; a subpackage's modules in a section of their own."""
    entries: list = [f"{API_DIR}/index.md", {PACKAGE: page_path(PACKAGE)}]
    sections: dict[str, list] = {}
    for m in modules[1:]:
        top = ".".join(m.split(".")[:2])
        sections.setdefault(top, []).append({m: page_path(m)})
    for top, pages in sections.items():
        entries.append(pages[0] if len(pages) == 1 else {top: pages})
    return entries


def on_config(config, **kwargs):
    modules = public_modules()
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and NAV_TITLE in entry:
            config["nav"][i] = {NAV_TITLE: nav_entries(modules)}
    return config


def on_files(files, config, **kwargs):
    modules = public_modules()
    files.append(File.generated(config, f"{API_DIR}/index.md", content=index_text(modules)))
    for m in modules:
        files.append(File.generated(config, page_path(m), content=page_text(m)))
    return files
