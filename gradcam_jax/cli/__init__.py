"""The ``gradcam-jax`` command: explain a pretrained classifier's predictions on image files.

    gradcam-jax explain photo.jpg other.png --classes top3 --out explanations/
    gradcam-jax explain --demo
    gradcam-jax layers
    gradcam-jax explain-dir photos/ --out maps.zarr

One module per sub-command (:mod:`.explain`, :mod:`.explain_dir`, :mod:`.layers`), each with
``add_parser(subparsers)``, which sets ``func=run`` on the parsed arguments, and ``run(args)``,
which returns the exit status or raises :class:`~.common.UsageError`. What they share (the
program name, exit codes, argument syntax, progress bar) is in :mod:`.common`; the exit codes
are documented there, in every ``--help`` and in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..dataset.lock import OutputError
from . import explain, explain_dir, layers
from .common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    PROG,
    UsageError,
    enable_compilation_cache,
    error,
)

__all__ = ["main", "build_parser"]

#: The sub-commands, in the order ``--help`` lists them.
COMMANDS = (explain, explain_dir, layers)
#: The sub-commands that compile XLA programs (and so use the persistent compilation cache).
COMPILING = ("explain", "explain-dir")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser; a sub-command's parsed arguments carry ``func`` (its ``run``) and
    ``usage`` (its usage line, for errors found after parsing)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Grad-CAM and related visual explanations for pretrained JAX image "
        "classifiers, from the command line.",
        epilog=explain.EXAMPLES + "\n" + EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = command.add_parser(subparsers)
        sub.set_defaults(usage=sub.format_usage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some files failed, 2 usage, 3 the
    output cannot be used, 130 interrupted: see :mod:`.common`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command in COMPILING:
        enable_compilation_cache()
    try:
        return int(args.func(args))
    except UsageError as e:
        sys.stderr.write(args.usage())
        error(str(e))
        return EXIT_USAGE
    except OutputError as e:
        error(str(e))
        return EXIT_OUTPUT
    except KeyboardInterrupt:
        error("interrupted.")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `gradcam-jax layers | head`: stop writing, quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        return EXIT_OK
