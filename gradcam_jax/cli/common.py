"""What the commands share: the program name, exit codes, argument types, the ``--classes`` and
``--methods`` syntax, usage errors, the progress bar and the compilation cache.

Exit codes, the same for every command (:data:`EXIT_STATUS_HELP` puts them in ``--help``):

====  ========================================================================================
0     every input explained
1     some inputs could not be read: reported (``results.json``, the store's ``errors``) and
      skipped; the others were explained
2     usage: bad arguments, reported before any work
3     the output cannot be used: not writable, a store another run holds (the message names
      the process and the lock file), a file or a folder that is not a store, or a store of
      another job; reported before the model is loaded, nothing written
130   interrupted (Ctrl-C); ``explain-dir`` continues where it stopped when run again
====  ========================================================================================
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Collection
from typing import TextIO

import jax

from .. import zoo
from .._cam import canonical_method_name

__all__ = [
    "PROG",
    "EXIT_OK",
    "EXIT_FAILED_FILES",
    "EXIT_USAGE",
    "EXIT_OUTPUT",
    "EXIT_INTERRUPTED",
    "EXIT_STATUS_HELP",
    "UsageError",
    "positive_int",
    "nonnegative_int",
    "parse_classes",
    "parse_methods",
    "load_zoo_model",
    "error",
    "Progress",
    "enable_compilation_cache",
]

PROG = "gradcam-jax"

EXIT_OK = 0
EXIT_FAILED_FILES = 1  # some input files could not be read (reported and skipped)
EXIT_USAGE = 2  # bad arguments (argparse uses 2 as well)
EXIT_OUTPUT = 3  # the output cannot be used: not writable, locked by another run, not a store
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

#: The exit codes, as every command's ``--help`` ends.
EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}    every input explained
  {EXIT_FAILED_FILES}    some inputs could not be read (reported and skipped); the others explained
  {EXIT_USAGE}    bad arguments (reported before any work)
  {EXIT_OUTPUT}    the output cannot be used: not writable, a store another run holds (its lock
       file is named), a file or a folder that is not a store, or a store of another job
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); explain-dir continues where it stopped when run again
"""

_TOP_K = re.compile(r"top[-_ ]?(\d+)", flags=re.IGNORECASE)


class UsageError(Exception):
    """Bad arguments: the command reports them and exits with :data:`EXIT_USAGE`."""


def error(message: str, prog: str = PROG) -> None:
    """Print ``PROG: error: message`` on stderr."""
    print(f"{prog}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Argument types and syntax
# --------------------------------------------------------------------------------------------


def _int_at_least(text: str, lowest: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def parse_classes(spec: str) -> int | list[int | str]:
    """``--classes``: ``"top3"`` -> ``3`` (each image's 3 most probable classes);
    ``"285, espresso"`` -> ``[285, "espresso"]`` (class indices and names; a negative number
    is an index, which the commands refuse as out of range)."""
    text = spec.strip()
    m = _TOP_K.fullmatch(text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise UsageError("--classes topK needs K >= 1.")
        return k
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--classes {spec!r}: give topK or a comma-separated list of classes.")
    return [int(t) if re.fullmatch(r"[-+]?\d+", t) else t for t in items]


def parse_methods(spec: str, available: Collection[str]) -> list[str]:
    """``"grad_cam,Layer-CAM"`` -> ``["grad_cam", "layer_cam"]``: canonical names, in the given
    order (repeats kept), each one of ``available``."""
    items = [m.strip() for m in spec.split(",") if m.strip()]
    if not items:
        raise UsageError("--methods is empty.")
    names = [canonical_method_name(m) for m in items]
    unknown = [m for m, name in zip(items, names, strict=True) if name not in available]
    if unknown:
        shown = ", ".join(sorted(available))
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; available: {shown}.")
    return names


def load_zoo_model(name: str, prefix: str = "") -> zoo.Pretrained:
    """``zoo.load(name)``; an unknown name is a :class:`UsageError` (its message after ``prefix``)."""
    try:
        return zoo.load(name)
    except ValueError as e:
        raise UsageError(f"{prefix}{e}") from None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class Progress:
    """A small stderr progress bar (``\\r``-redrawn on a terminal, plain lines otherwise)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 3
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def update(self, n: int = 1, label: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 28
        fill = int(width * self.done / max(self.total, 1))
        bar = "#" * fill + "-" * (width - fill)
        text = f"[{bar}] {self.done}/{self.total} images  {elapsed:5.1f}s  eta {eta:4.0f}s"
        if self.tty:
            self.stream.write("\r" + text + (" " + label[:30] if label else "").ljust(32))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + (f"  {label}" if label else "") + "\n")
        self.stream.flush()


def enable_compilation_cache() -> None:
    """Keep XLA's compiled programs between runs (in the zoo's cache folder).

    The commands compile the same few programs every time (the model's forward pass, Grad-CAM,
    the guided transforms): JAX's persistent compilation cache turns those compilations into
    file reads on later runs. Skipped when the user configured a cache of their own (the
    ``JAX_COMPILATION_CACHE_DIR`` variable) or set ``GRADCAM_JAX_NO_XLA_CACHE=1``.
    """
    if os.environ.get("GRADCAM_JAX_NO_XLA_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    if jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]  # a dynamic flag
        return
    path = zoo.cache_dir() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache folder: run without
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
