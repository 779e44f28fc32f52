"""``apcm serve``: run the gRPC memory service."""

from __future__ import annotations

import argparse
import sys
import time

from ..config import add_settings_arguments, settings_from_args
from ..startup_log import configure_logging, stage


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
    started = time.monotonic()
    try:  # before the imports below, which take seconds: a typo fails at once
        settings = settings_from_args(args)
    except ValueError as e:  # contradictory flags or a malformed APCM_* variable
        print(f"apcm serve: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    with stage("loaded the server code (torch, gRPC, codecs, BM25)"):
        from ..api.app import serve
    return serve(settings, started=started)
