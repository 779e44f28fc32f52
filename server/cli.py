"""The ``apcm`` command line: serve, train, eval, bench, fit-pca, cluster.

``serve`` and ``cluster`` live in ``apcm.server``; the others are tools for ML
engineers and operators (``apcm.tools.commands``), installed with a checkout
but not with the serving image. Each module registers its own parser; heavy
imports happen inside the command, so ``apcm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": "apcm.server.commands.serve",
    "train": "apcm.tools.commands.train",
    "eval": "apcm.tools.commands.eval",
    "bench": "apcm.tools.commands.bench",
    "fit_pca": "apcm.tools.commands.fit_pca",
    "mcp": "apcm.client.agent_mcp",
    "cluster": "apcm.server.cluster.command",
}


def _register(sub: argparse._SubParsersAction, name: str) -> None:
    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("apcm.tools"):
            raise
        # the serving image ships without the tools; say so instead of a traceback
        sub.add_parser(name.replace("_", "-"), help="(not installed: needs the apcm.tools "
                       "package of a source checkout)").set_defaults(func=_missing_tools)
        return
    module.register(sub)


def _missing_tools(args: argparse.Namespace) -> int:
    print(f"apcm {args.command}: this install has no apcm.tools (the serving image leaves "
          "training, evaluation and benchmarks out); run it from a source checkout "
          "(`make install`).", file=sys.stderr)
    return 2


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that sub-command's (so ``apcm serve``
    never imports the training or benchmark code)."""
    parser = argparse.ArgumentParser(
        prog="apcm",
        description="ApCM: a gRPC memory store for LLM agents, backed by an IDRP compressor.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        _register(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0].replace("-", "_") if argv else None
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
