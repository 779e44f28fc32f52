"""Rate–distortion curves: codec files and every baseline at several byte budgets.

:func:`run_curves` fits every baseline of :func:`report.budget_baselines` once per
budget on the training split and once on each evaluated split (in domain),
evaluates them and the given codecs (each at its own bytes per code) on every
split, and returns the rows; :func:`to_markdown`
and :func:`draw` turn them into tables and one PNG per metric.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import baselines, metrics, plots, report
from .baselines import Method

#: metric key -> (axis label, log y-axis, better is higher)
METRICS = {
    "cosine": ("mean cosine(decoded, original)", False, True),
    "psnr": ("PSNR dB", False, True),
    "mse": ("MSE per value", True, False),
    "recall10": ("recall@10 (decoded neighbours vs exact)", False, True),
}


def parse_budgets(budgets: str | None, ratios: str | None, input_bytes: int) -> list[int]:
    """``--budgets 48,96`` (bytes per code) or ``--ratios 32,16`` (float32 bytes / code bytes)."""
    if budgets:
        out = [int(b) for b in budgets.split(",") if b.strip()]
    elif ratios:
        out = []
        for r in (float(r) for r in ratios.split(",") if r.strip()):
            b = input_bytes / r
            if b != int(b):
                raise ValueError(f"ratio {r:g} of {input_bytes} bytes is not a whole byte count")
            out.append(int(b))
    else:
        return []
    if any(b < 1 for b in out):
        raise ValueError("budgets must be positive byte counts")
    return sorted(set(out))


#: ``fit`` of a row: the codec files' own points, and the two ways a baseline is fitted
FIT_MODEL, FIT_TRAIN, FIT_IN_DOMAIN = "model", "train", "in domain"


def _fitted_on(method: Method, fit: str) -> Method:
    method.name += f" (fit: {fit})"
    method.family += f" (fit: {fit})"
    return method


def run_curves(
    models: Sequence[tuple[str, Method]],
    budgets: Sequence[int],
    x_train: np.ndarray,
    splits: dict[str, np.ndarray],
    input_shape: tuple[int, int],
    *,
    data_range: float | None = None,
    embeddings: bool = False,
    binary: bool = False,
    faiss: bool = True,
    opq: bool = True,
    rabitq: bool = True,
    in_domain: bool = True,
    renorm: dict[int, bool] | None = None,
    timing_s: float = 0.3,
    log: Any = print,
) -> dict[str, Any]:
    """Rows for every (split, method), methods = models + the baselines at each budget.

    Every baseline is fitted twice: once on ``x_train`` (the split the models were
    trained on: "other text" for every other split) and, with ``in_domain``, once on
    each evaluated split itself, the database being searched, as a FAISS, Qdrant or
    LanceDB user trains a quantiser on their own vectors. The in-domain fits also
    include our codec fitted on the split (:func:`baselines.in_domain_codec`, with
    ``renorm[budget]``, the shipped model's setting at that budget, where given).

    Args:
        models: (file name, method) of each codec file; each is one point at its bytes.
        x_train: [N, d] training split.
        splits: name -> [n, d] items to evaluate.
    Returns a JSON-ready dict: ``rows`` (one dict per split x method, with ``split``,
    ``budget`` and ``fit``: "model", "train" or "in domain"), ``skipped`` (baselines
    not applicable at a budget) and ``fit_s`` (seconds per "fit/budget", in-domain
    fits per "in domain/split/budget").
    """
    trained: list[tuple[int, str, Method]] = [
        (m.bytes_per_code, FIT_MODEL, m) for _, m in models]
    skipped: list[str] = []
    fit_s: dict[str, float] = {}

    def fit_all(x: np.ndarray, fit: str, key: str) -> list[tuple[int, str, Method]]:
        out = []
        for budget in budgets:
            t0 = time.perf_counter()
            found, why = report.budget_baselines(budget, x, input_shape, binary=binary,
                                                 faiss=faiss, opq=opq, rabitq=rabitq)
            if fit == FIT_IN_DOMAIN and budget <= x.shape[1]:
                found.append(baselines.in_domain_codec(
                    x, budget, input_shape, (renorm or {}).get(budget)))
            fit_s[f"{key}/{budget}"] = round(time.perf_counter() - t0, 1)
            log(f"fitted {len(found)} methods on {key} at {budget} B "
                f"in {fit_s[f'{key}/{budget}']} s")
            out += [(budget, fit, m if m.family == baselines.IN_DOMAIN_IDRP
                     else _fitted_on(m, fit)) for m in found]
            skipped.extend(f"[fit: {key}] {w}" for w in why)
        return out

    trained += fit_all(x_train, FIT_TRAIN, FIT_TRAIN)
    rows: list[dict[str, Any]] = []
    for split, x in splits.items():
        methods = trained + (fit_all(x, FIT_IN_DOMAIN, f"{FIT_IN_DOMAIN}/{split}")
                             if in_domain else [])
        exact = metrics.top_k_cosine(x, x, 10) if embeddings else None
        for budget, fit, method in methods:
            row = report.evaluate(method, x, data_range, embeddings, exact, timing_s)
            rows.append({"split": split, "budget": budget, "n_items": int(x.shape[0]),
                         "fit": fit, **dataclasses.asdict(row)})
        log(f"evaluated {len(methods)} methods on {split} ({x.shape[0]} items)")
    return {"rows": rows, "skipped": skipped, "fit_s": fit_s,
            "models": [name for name, _ in models], "budgets": list(budgets),
            "n_train": int(x_train.shape[0]),
            "fits": [FIT_TRAIN, *([FIT_IN_DOMAIN] if in_domain else [])]}


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in METRICS if any(r.get(k) is not None for r in rows)]


def summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Families x byte budget for one split and metric; the best value per column in bold.

    A method whose code is smaller than the budget (RaBitQ) sits in its budget's column.
    """
    budgets = sorted({r["budget"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    higher = METRICS[metric][2]
    cell: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.get(metric) is not None:
            cell[(r["family"], r["budget"])] = r[metric]
    best = {}
    for b in budgets:
        vals = [v for (f, bb), v in cell.items() if bb == b]
        if vals:
            best[b] = max(vals) if higher else min(vals)
    spec = ".4g" if metric == "mse" else ".4f" if metric == "cosine" else ".3f" \
        if metric == "recall10" else ".2f"
    lines = ["| method | " + " | ".join(f"{b} B" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for fam in families:
        cells = []
        for b in budgets:
            v = cell.get((fam, b))
            text = "" if v is None else format(v, spec)
            if v is not None and v == best.get(b):
                text = f"**{text}**"
            cells.append(text)
        if any(cells):
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(result: dict[str, Any], header: str) -> str:
    """Per split: one summary table per metric (methods x bytes), then the full rows."""
    rows = result["rows"]
    parts = [header]
    for split in dict.fromkeys(r["split"] for r in rows):
        srows = [r for r in rows if r["split"] == split]
        parts.append(f"### {split} ({srows[0]['n_items']} items)")
        for metric in _metric_keys(srows):
            parts.append(f"**{METRICS[metric][0]}** (best per column in bold; empty: n/a)"
                         f"\n\n{summary_table(srows, metric)}")
        for budget in sorted({r["budget"] for r in srows}):
            brows = [report.Row(**{k: v for k, v in r.items()
                                   if k not in ("split", "budget", "n_items", "fit")})
                     for r in srows if r["budget"] == budget]
            parts.append(f"{split}, {budget} B per code:\n\n{report.to_markdown(brows)}")
    if result["skipped"]:
        parts.append("Not applicable:\n\n" + "\n".join(f"- {s}" for s in result["skipped"]))
    return "\n\n".join(parts) + "\n"


def draw(result: dict[str, Any], folder: str | Path, prefix: str, title: str) -> list[Path]:
    """One PNG per metric (``PREFIX.METRIC.png``), one panel per split; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    by_split: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(r)
    written = []
    for metric in _metric_keys(rows):
        label, log_y, _ = METRICS[metric]
        path = folder / f"{prefix}.{metric}.png"
        if plots.rate_distortion(by_split, metric, label, path, f"{title}: {label}",
                                 log_y=log_y):
            written.append(path)
    return written
