"""``apcm bench all``: run every benchmark with its defaults, then write the report.

Each benchmark's JSON goes to ``OUT/NAME.json``; then ``report`` turns the
folder into ``docs/BENCHMARKS.md`` with plots. A benchmark that fails is
reported and the others still run; the exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

SUITE = ("rpc", "concurrency", "recall", "read", "durability", "cluster", "codec")
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="docs/bench",
                        help="folder for the JSON results and plots (default docs/bench)")
    parser.add_argument("--report", default="docs/BENCHMARKS.md",
                        help="markdown report to write (default docs/BENCHMARKS.md)")
    parser.add_argument("--only", default=",".join(SUITE),
                        help=f"comma-separated subset of {', '.join(SUITE)}")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)


def _defaults(name: str, json_path: Path) -> argparse.Namespace:
    """The benchmark's own defaults, as its ``apcm bench NAME`` parser would give them."""
    module = importlib.import_module(f"apcm.tools.bench.{name}")
    parser = argparse.ArgumentParser(prog=f"apcm bench {name}")
    module.add_arguments(parser)
    if not any(a.dest == "json" for a in parser._actions):
        parser.add_argument("--json", default=None)
    return parser.parse_args(["--json", str(json_path)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        print(f"\n=== apcm bench {name}", flush=True)
        path = out / f"{name}.json"
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(f"apcm.tools.bench.{name}").run(
                _defaults(name, path))
        except Exception as e:  # one broken benchmark must not cost the others' numbers
            log.exception("benchmark %s failed", name)
            status[name] = f"failed: {e}"
            continue
        path.write_text(json.dumps(result, indent=2, default=str))
        status[name] = f"ok in {time.perf_counter() - t0:.0f} s -> {path}"
    from . import report

    report.run(argparse.Namespace(dir=str(out), out=args.report))
    for name, text in status.items():
        print(f"{name}: {text}")
    if any(text.startswith("failed") for text in status.values()):
        raise SystemExit(1)
    return {"benchmark": "all", "status": status}
