"""``apcm serve``: run the gRPC memory service."""

from __future__ import annotations

import argparse
import sys

from ..config import add_settings_arguments, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the gRPC memory service",
        description="Serve a codec and its memory banks over gRPC, with Prometheus metrics on "
        "their own port. Every flag can also be set by the APCM_* environment variable named "
        "in its help; flags win over the environment.",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api.app import serve

    try:
        settings = settings_from_args(args)
    except ValueError as e:  # contradictory flags or a malformed APCM_* variable
        print(f"apcm serve: error: {e}", file=sys.stderr)
        return 2
    return serve(settings)
