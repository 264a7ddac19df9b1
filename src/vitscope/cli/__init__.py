"""The ``vitscope`` command line: one module per subcommand in this package.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed arguments, returning an exit code). A subcommand is listed here
once its module exists, so the subsystems can land independently.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

COMMANDS = (
    "models", "probe", "train", "hessian", "landscape", "robustness", "demo", "report", "reproduce",
    "attention", "compare",
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a value that is not a number, a missing option) are one line, exit code 2; the
    usage stays in ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vitscope",
        description="Build, train and dissect Vision Transformers and CNNs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"vitscope.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vitscope.cli.{name}":
                continue  # subcommand not shipped in this version
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from vitscope.cli._checks import check_args
    from vitscope.runtime import keep_freed_memory

    keep_freed_memory()  # our own process: reuse freed activations' memory (see vitscope.runtime)
    try:
        check_args(args)  # every number in range and --out writable, before any work
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except (CLIError, ValueError, FileNotFoundError, KeyError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vitscope {args.command}: error: {msg}", file=sys.stderr)
        return 2
