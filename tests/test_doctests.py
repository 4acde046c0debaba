"""Every ``>>>`` example in the package runs, one test per module.

The examples are found with :class:`doctest.DocTestFinder` (module, class, function and method
docstrings, jitted functions included through ``__wrapped__``) and run in a temporary working
directory, so an example that writes files leaves nothing in the checkout.
"""

import doctest
import importlib
import io
import pkgutil
import re
from pathlib import Path

import pytest

import gradcam_jax

OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

# A floor on the examples that run across the package, so that a broken finder (or every docstring
# losing its examples) cannot pass by running nothing. Raise it as examples are added.
MIN_EXAMPLES = 40

_PROMPT = re.compile(r"^\s*>>> ", re.MULTILINE)


def _raise(name):
    raise ImportError(f"cannot import {name} while collecting the package's modules")


def module_names():
    """The package and every module below it, except ``__main__`` entry points."""
    found = pkgutil.walk_packages(gradcam_jax.__path__, prefix="gradcam_jax.", onerror=_raise)
    names = [info.name for info in found if info.name.rsplit(".", 1)[-1] != "__main__"]
    return ["gradcam_jax", *sorted(names)]


MODULES = module_names()


def find_examples(module):
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module.__name__)
    return sorted(tests, key=lambda t: (t.lineno or 0, t.name))


def is_skipped(example):
    return bool(example.options.get(doctest.SKIP))


def test_every_module_is_collected():
    for expected in ("gradcam_jax.methods", "gradcam_jax.metrics", "gradcam_jax.zoo"):
        assert expected in MODULES, f"{expected} is missing from {MODULES}"
    assert not [name for name in MODULES if name.endswith("__main__")]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    tests = find_examples(module)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}:\n" + (
        report.getvalue()
    )
    # Every prompt in the file must belong to an example the finder saw (a docstring the finder
    # cannot reach, such as one on a wrapped object without __wrapped__, would silently not run).
    source = Path(module.__file__).read_text(encoding="utf-8")
    found = sum(len(t.examples) for t in tests)
    assert found >= len(_PROMPT.findall(source)), (
        f"{name}: {len(_PROMPT.findall(source))} '>>>' prompts in the source but only {found} examples "
        "reachable by doctest"
    )


def test_enough_examples_run():
    modules = [importlib.import_module(name) for name in MODULES]
    examples = [e for module in modules for t in find_examples(module) for e in t.examples]
    run = [e for e in examples if not is_skipped(e)]
    assert len(run) >= MIN_EXAMPLES, f"only {len(run)} doctest examples run, expected {MIN_EXAMPLES} or more"


def test_no_example_is_skipped():
    """Issue 11: every ``>>>`` example runs; an example that needs files builds them first."""
    skipped = [
        f"{t.name} (line {(t.lineno or 0) + e.lineno + 1}): {e.source.strip()}"
        for name in MODULES
        for t in find_examples(importlib.import_module(name))
        for e in t.examples
        if is_skipped(e)
    ]
    assert not skipped, f"{len(skipped)} examples are marked +SKIP:\n" + "\n".join(skipped)
