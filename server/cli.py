"""The ``apcm`` command line: serve, train, eval, bench, fit-pca.

Each sub-command lives in ``apcm.server.commands.<name>`` and registers its own
parser; heavy imports happen inside the command, so ``apcm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("serve", "train", "eval", "bench", "fit_pca")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that sub-command's (so ``apcm serve``
    never imports the training or benchmark code)."""
    parser = argparse.ArgumentParser(
        prog="apcm",
        description="ApCM: a gRPC memory store for LLM agents, backed by an IDRP compressor.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"apcm.server.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0].replace("-", "_") if argv else None
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
