"""``apcm bench report``: benchmark JSON files -> ``docs/BENCHMARKS.md`` plus PNG plots.

Reads every ``*.json`` in ``--dir`` (what ``apcm bench NAME --json DIR/NAME.json``
wrote), renders one section per benchmark with the machine it ran on, a table
of every row, a plot where one helps, and the issue's goals as measured. An
optional hand-written ``NOTES.md`` in the same folder (the analysis: why a goal
is or is not met) is appended verbatim. Nothing here measures anything.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import describe_machine, fmt, markdown_table

ORDER = ("rpc", "concurrency", "recall", "read", "durability", "cluster", "codec")
READ_COLUMNS = [
    ("slots", "slots"), ("batch", "Q"), ("ours_p50_ms", "ApCM p50 ms"),
    ("ours_p99_ms", "ApCM p99 ms"), ("faiss_p50_ms", "FAISS p50 ms"),
    ("faiss_p99_ms", "FAISS p99 ms"), ("ratio_p50", "ApCM / FAISS p50"),
    ("top1_agreement", "top-1 agreement"), ("bank_bytes_per_slot", "bank bytes/slot"),
    ("faiss_bytes_per_slot", "FAISS bytes/slot"),
]
COMMANDS = """\
Regenerate everything with `make bench` (`apcm bench all`: every benchmark with its
defaults, then this report), or one benchmark at a time, then the report:

<!-- doc-test: skip — each benchmark runs for minutes; `make bench` runs them all -->
```sh
apcm bench rpc --json docs/bench/rpc.json
apcm bench concurrency --json docs/bench/concurrency.json
apcm bench recall --json docs/bench/recall.json
apcm bench read --json docs/bench/read.json
apcm bench durability --json docs/bench/durability.json
apcm bench cluster --json docs/bench/cluster.json
apcm bench codec --json docs/bench/codec.json
apcm bench report
```
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="docs/bench",
                        help="folder of benchmark JSON files; plots are written here too")
    parser.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown report to write")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Benchmark name -> its JSON result, for every ``*.json`` with a ``benchmark`` field."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "benchmark" in data:
            data["_file"] = path.name
            found[data["benchmark"]] = data
    return found


def machine_line(result: dict[str, Any]) -> str:
    m = result.get("machine")
    if isinstance(m, dict) and "cpu" in m:
        return describe_machine(m) + (f"; run {m['date_utc']}" if m.get("date_utc") else "")
    parts = [f"{k} {result[k]}" for k in ("cpu", "threads", "torch", "faiss") if k in result]
    return ", ".join(parts) or "not recorded"


def generic_tables(result: dict[str, Any]) -> str:
    """Every list of row dicts in a result, as tables with all their keys."""
    out = []
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            columns = [(k, k) for k in value[0] if not isinstance(value[0][k], (list, dict))]
            out.append(f"**{key}**\n\n{markdown_table(value, columns)}")
    return "\n\n".join(out)


def goals_table(goals: list[dict[str, Any]]) -> str:
    rows = [{"goal": g["goal"], "measured": g["measured"], "met": "met" if g["met"] else
             "**not met**"} for g in goals]
    return markdown_table(rows, [("goal", "goal"), ("measured", "measured"), ("met", "")])


# -- plots -----------------------------------------------------------------------------
def _figure(ncols: int = 1) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    return plt, fig, axes[0]


def plot_rpc(result: dict[str, Any], path: Path) -> None:
    plt, fig, axes = _figure(2)
    for ax, op in zip(axes, ("Compress", "Decompress"), strict=True):
        rows = [r for r in result["rows"] if r["op"] == op]
        b = [r["batch"] for r in rows]
        ax.plot(b, [r["inproc_vps"] for r in rows], "o-", label="in-process codec")
        ax.plot(b, [r["rpc_vps"] for r in rows], "s-", label="gRPC (loopback)")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="vectors/s", title=op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_concurrency(result: dict[str, Any], path: Path) -> None:
    plt, fig, axes = _figure(2)
    for batching, style in ((False, "o--"), (True, "s-")):
        rows = [r for r in result["rows"] if r["batching"] is batching]
        c = [r["clients"] for r in rows]
        label = "batching on" if batching else "batching off"
        axes[0].plot(c, [r["rps"] for r in rows], style, label=label)
        axes[1].plot(c, [r["p99_ms"] for r in rows], style, label=label)
    axes[0].set(xscale="log", xlabel="concurrent clients", ylabel="requests/s",
                title="single-vector Compress throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 ms",
                title="p99 latency")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(result: dict[str, Any], path: Path) -> None:
    plt, fig, axes = _figure(1)
    rows = result["rows"][::-1]
    labels = [textwrap.fill((f"{r['set']}: " if "set" in r else "")
                            + f"{r['method']} ({r['bytes_per_vector']} B/vector)", 48)
              for r in rows]
    axes[0].barh(range(len(rows)), [r["recall_at_10"] for r in rows], color="tab:blue")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=7)
    axes[0].set(xlim=(0, 1), xlabel="recall@10 vs exact float32 cosine",
                title="recall from memory (held-out queries)")
    axes[0].grid(True, axis="x", alpha=0.3)
    fig.set_size_inches(9, 0.7 * len(rows) + 1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_read(result: dict[str, Any], path: Path) -> None:
    plt, fig, axes = _figure(1)
    for batch in sorted({r["batch"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["batch"] == batch]
        n = [r["slots"] for r in rows]
        line = axes[0].plot(n, [r["ours_p50_ms"] for r in rows], "o-", label=f"ApCM Q={batch}")
        axes[0].plot(n, [r["faiss_p50_ms"] for r in rows], "s--", color=line[0].get_color(),
                     label=f"FAISS flat Q={batch}")
    axes[0].set(xscale="log", yscale="log", xlabel="bank size (slots)", ylabel="p50 ms",
                title="Read latency vs bank size")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "rpc": plot_rpc, "concurrency": plot_concurrency, "recall": plot_recall, "read": plot_read,
}


# -- sections --------------------------------------------------------------------------
def section(name: str, result: dict[str, Any], folder: Path, out: Path) -> str:
    title = result.get("title", name)
    lines = [f"## {title}", "", f"Source: `{folder.name}/{result['_file']}`. "
             f"Machine: {machine_line(result)}.", ""]
    model = result.get("model")
    if isinstance(model, dict):
        lines += ["Model: " + ", ".join(f"{k} `{v}`" for k, v in model.items()) + ".", ""]
    elif model:
        lines += [f"Model: {model}.", ""]
    for key in ("inputs", "data", "params", "memory"):
        if result.get(key):
            value = result[key]
            text = ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) if isinstance(
                value, dict) else value
            lines += [f"{key.capitalize()}: {text}.", ""]
    if "columns" in result:
        lines += [markdown_table(result["rows"], [tuple(c) for c in result["columns"]]), ""]
    elif name == "read":
        lines += [markdown_table(result["rows"], READ_COLUMNS), ""]
    else:
        lines += [generic_tables(result), ""]
    if name in PLOTS:
        png = folder / f"{name}.png"
        PLOTS[name](result, png)
        rel = png.relative_to(out.parent) if png.is_relative_to(out.parent) else png
        lines += [f"![{title}]({rel.as_posix()})", ""]
    if result.get("goals"):
        lines += ["Goals:", "", goals_table(result["goals"]), ""]
    return "\n".join(lines)


def render(results: dict[str, dict[str, Any]], folder: Path, out: Path) -> str:
    names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
    goals = [g for n in names for g in results[n].get("goals", [])]
    parts = ["# Benchmarks", "",
             "Measured numbers only, generated by `apcm bench report` from the JSON files in "
             f"`{folder.as_posix()}/`; each section names the machine it ran on. Ratios are "
             "measured side by side in one run, so they hold better than absolute numbers on "
             "a shared machine.", "", COMMANDS]
    if goals:
        parts += ["## Goals (issues 6 and 11), as measured", "", goals_table(goals), ""]
    parts += [section(n, results[n], folder, out) for n in names]
    notes = folder / "NOTES.md"
    if notes.exists():
        parts += [notes.read_text().strip(), ""]
    return "\n".join(parts).rstrip() + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder, out = Path(args.dir), Path(args.out)
    results = load_results(folder)
    if not results:
        raise SystemExit(f"no benchmark JSON files in {folder}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, folder, out))
    print(f"wrote {out} from {', '.join(sorted(results))}")
    return {"benchmark": "report", "sources": sorted(results)}
