"""Griffe extension: the package's docstrings made ready for mkdocstrings' Google parser.

Three rewrites, before anything is rendered:

1. Sphinx roles (``:func:`~gradcam_jax.linen_tap```) become links (below);
2. an ``Args:`` entry naming several parameters (``alpha, cmap: overlay settings``, the names
   possibly wrapped over two lines) becomes one entry per parameter, so each is checked
   against the signature;
3. a ``>>>`` example outside an ``Examples:`` section is fenced as a ``pycon`` block, so its
   output (``['slice 1', 'slice 3']``) is not read as Markdown.

Roles:

The package's docstrings cross-reference each other with Sphinx roles, which Markdown does not
know. Before mkdocstrings renders anything, every role is resolved against the package as
Python would resolve the name from the docstring's scope (the class, the module, the packages
above it, then the package root):

- a name the API reference renders becomes a link to it (``[`linen_tap`][gradcam_jax.linen_tap]``);
- a name that exists but is private (a helper in an underscore module) becomes inline code;
- a name outside the package that imports (``pickle``, ``jax.Array``) becomes inline code;
- a name that resolves to nothing, in a docstring the reference renders, is a warning, so
  ``mkdocs build --strict`` fails on it and the message says which docstring holds it (in a
  private helper's docstring, which the site does not show, it is only logged at debug level).

``~name`` shows only the last component, as in Sphinx.
"""

from __future__ import annotations

import importlib.util
import logging
import re

import griffe

PACKAGE = "gradcam_jax"
ARGS_HEADER = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters):\s*$"
)
GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):\s?(.*)$")
WRAPPED_NAMES = re.compile(r"^\s+\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*\s*,\s*$")
GROUP_TAIL = re.compile(r"^\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*:(?:\s|$)")
ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|attr|meth|obj|exc|const):`(~?)([^`<>]+?)`")

log = logging.getLogger("mkdocs.hooks.sphinx_roles")

# Docstrings that do not parse as Google style, made to (object path -> (text, replacement)).
# Each is reported to its owner; the fix belongs in the docstring, and then the entry goes.
TOLERATED: dict[str, tuple[str, str]] = {}


def member(obj, name: str):
    """``obj.members[name]`` through aliases, or None when it does not resolve."""
    try:
        return obj.members.get(name)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def lookup(root, path: str):
    """The object at an absolute dotted ``path`` under ``root``, or None."""
    parts = path.split(".")
    if parts[0] != root.name:
        return None
    obj = root
    for part in parts[1:]:
        obj = member(obj, part)
        if obj is None:
            return None
    return obj


def target_of(obj):
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def is_public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


def public_paths(root) -> dict[str, str]:
    """Canonical path -> the path the API reference renders it at.

    Rendered: every public module, every name of a public module's ``__all__``, and the public
    members of rendered classes. The shortest public path wins (the top-level re-export).
    """
    found: dict[str, str] = {}

    def add(obj, path: str) -> None:
        target = target_of(obj)
        if target is None:
            return
        known = found.get(target.path)
        if known is None or len(path) < len(known):
            found[target.path] = path
        if target.is_class:
            for name, child in target.members.items():
                if not name.startswith("_"):
                    add(child, f"{path}.{name}")

    def visit(module) -> None:
        add(module, module.path)
        for name in module.exports or ():
            child = member(module, str(name))
            if child is not None:
                add(child, f"{module.path}.{name}")
        for name, child in module.modules.items():
            if not name.startswith("_"):
                visit(child)

    visit(root)
    return found


def scopes(obj) -> list[str]:
    """Where a name in ``obj``'s docstring is looked up, innermost first."""
    paths = []
    node = obj
    while node is not None:
        if node.is_class or node.is_module:
            paths.append(node.path)
        node = node.parent
    return paths


def is_external(path: str) -> bool:
    top = path.split(".")[0]
    if top == PACKAGE:
        return False
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def rewrite(obj, root, rendered: dict[str, str]) -> None:
    def replace(match: re.Match) -> str:
        short, name = match.group(1) == "~", match.group(2).lstrip(".")
        label = name.rsplit(".", 1)[-1] if short else name
        candidates = [name] + [f"{scope}.{name}" for scope in scopes(obj)]
        for path in candidates:
            found = lookup(root, path)
            target = target_of(found) if found is not None else None
            if target is not None:
                public = rendered.get(target.path)
                return f"[`{label}`][{public}]" if public else f"`{label}`"
        if is_external(name):
            return f"`{label}`"
        where = f"{obj.filepath}:{obj.lineno}" if obj.lineno else str(obj.filepath)
        # A docstring the reference renders must not point nowhere; one it does not render
        # (a private helper's) is shown nowhere, so its dangling role is not the site's problem.
        report = log.warning if obj.path in rendered else log.debug
        report(f"{where}: {match.group(0)} in the docstring of {obj.path} names nothing in {PACKAGE}")
        return f"`{label}`"

    if obj.docstring is not None:
        text = obj.docstring.value
        if obj.path in TOLERATED:
            old, new = TOLERATED[obj.path]
            if old not in text:
                log.warning(f"docs/hooks/sphinx_roles.py: TOLERATED[{obj.path!r}] no longer matches; drop it")
            text = text.replace(old, new)
        text = fence_bare_examples(split_grouped_args(text))
        obj.docstring.value = ROLE.sub(replace, text)


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def join_wrapped_names(lines: list[str]) -> list[str]:
    """``a, b,`` / ``c: text`` (a list of names wrapped over two lines) -> ``a, b, c: text``."""
    out: list[str] = []
    for line in lines:
        if out and WRAPPED_NAMES.match(out[-1]) and GROUP_TAIL.match(line.strip()):
            out[-1] = f"{out[-1].rstrip()} {line.strip()}"
        else:
            out.append(line)
    return out


def split_grouped_args(text: str) -> str:
    """``a, b: text`` inside an arguments section -> ``a: text`` and ``b: text``."""
    lines, out, i = join_wrapped_names(text.splitlines()), [], 0
    in_args, header_indent = False, 0
    while i < len(lines):
        line = lines[i]
        header = ARGS_HEADER.match(line)
        if header:
            in_args, header_indent = True, len(header.group(1))
        elif line.strip() and indent_of(line) <= header_indent:
            in_args = False
        grouped = GROUPED.match(line) if in_args else None
        if not grouped:
            out.append(line)
            i += 1
            continue
        indent, names, first = grouped.groups()
        body = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or indent_of(lines[i]) > len(indent)):
            if not lines[i].strip() and (i + 1 >= len(lines) or indent_of(lines[i + 1]) <= len(indent)):
                break
            body.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out += [f"{indent}{name}: {first}", *body]
    return "\n".join(out)


def fence_bare_examples(text: str) -> str:
    """Runs of ``>>>`` lines (with their output) at the docstring's own indentation, fenced."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        out.append("```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append("```")
    return "\n".join(out)


def walk(obj):
    yield obj
    for child in obj.members.values():
        if not child.is_alias:
            yield from walk(child)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring in the package once it is loaded."""

    def on_package(self, *, pkg, loader, **kwargs) -> None:
        if pkg.name != PACKAGE:
            return
        rendered = public_paths(pkg)
        for obj in walk(pkg):
            rewrite(obj, pkg, rendered)
