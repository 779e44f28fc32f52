"""Reproduce the shipped models: train every code dtype at 8:1, keep the best on validation.

For each model, ``apcm train`` runs once per code dtype (float32 m=d/8,
float16 m=d/4, int8 m=d/2, all 8:1 in bytes) into ``data/models/``; the one
with the lowest validation MSE is copied to ``model_weights/NAME.safetensors``
with its PNGs, ``model_weights/NAME.selection.md`` records every candidate, and
``apcm eval`` writes ``model_weights/NAME.eval.md`` (train vs held-out tables).

Usage (after the ``prepare_*.py`` scripts):
``.venv/bin/python scripts/train_models.py [digits gravel-binary text-minilm-v1]``

The IDRP v2 models (the default ``text-minilm`` and its siblings) come from
``scripts/train_v2_models.py``; this script reproduces the v1 ones only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from apcm.server.cli import main as apcm
from apcm.server.codecs.base import load_codec

COMMON = ["--ratio", "8", "--device", "cpu", "--seed", "0", "--threads", "1"]
MODELS: dict[str, dict[str, list[str]]] = {
    "digits": {
        "train": ["--data", "data/digits/digits.safetensors", "--shape", "8,8", "--image",
                  "--blocks", "4", "--hidden", "128", "--aux-hidden", "256", "--dropout", "0.1",
                  "--noise", "0.05", "--weight-decay", "1e-3", "--batch-size", "128",
                  "--epochs", "80", "--patience", "15", "--qat-epochs", "15"],
        "eval": ["--data", "data/digits/digits.safetensors", "--splits", "train,test",
                 "--image"],
    },
    "gravel-binary": {
        "train": ["--data", "data/gravel/gravel.safetensors", "--shape", "16,16", "--image",
                  "--blocks", "4", "--hidden", "128", "--aux-hidden", "256", "--dropout", "0.1",
                  "--noise", "0.05", "--weight-decay", "1e-3", "--lr", "3e-4",
                  "--batch-size", "512", "--epochs", "6", "--patience", "3", "--qat-epochs", "2"],
        "eval": ["--data", "data/gravel/gravel.safetensors", "--splits", "train,test",
                 "--image", "--data-range", "1"],
    },
    "text-minilm-v1": {
        "train": ["--data", "data/text/minilm.safetensors", "--shape", "1,384",
                  "--blocks", "4", "--hidden", "128", "--aux-hidden", "256", "--dropout", "0.1",
                  "--noise", "0.05", "--weight-decay", "1e-3", "--epochs", "16",
                  "--patience", "4", "--qat-epochs", "4"],
        "eval": ["--data", "data/text/minilm.safetensors", "--splits", "train,test,ood",
                 "--embeddings"],
    },
}
DTYPES = ("float32", "float16", "int8")


def train_and_select(name: str) -> None:
    spec = MODELS[name]
    work = Path("data/models")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in DTYPES:
        out = work / f"{name}-{dtype}.safetensors"
        apcm(["train", *spec["train"], *COMMON, "--code-dtype", dtype, "--name", name,
              "--out", str(out)])
        metrics = json.loads(load_codec(out).extra_metadata["apcm.meta.metrics"])
        rows.append((metrics["val_mse_idrp"], dtype, metrics, out))
    rows.sort(key=lambda r: r[0])
    best = rows[0]
    dest = Path("model_weights")
    shutil.copy(best[3], dest / f"{name}.safetensors")
    for suffix in (".loss.png", ".recon.png"):
        src = best[3].parent / f"{best[3].stem}{suffix}"
        if src.exists():
            shutil.copy(src, dest / f"{name}{suffix}")
    lines = [
        f"Code dtype selection for `{name}` (8:1 in bytes; lowest validation MSE wins).",
        "",
        "| code dtype | m | val MSE IDRP | val MSE PCA same m | best epoch | fallback to init |",
        "|---|---|---|---|---|---|",
    ]
    for val, dtype, metrics, out in sorted(rows, key=lambda r: DTYPES.index(r[1])):
        m = load_codec(out).code_dim
        lines.append(
            f"| {dtype}{' (chosen)' if dtype == best[1] else ''} | {m} | {val:.4g} | "
            f"{metrics['val_mse_pca_same_m']:.4g} | {metrics['best_epoch']} | "
            f"{metrics['fallback_to_init']} |"
        )
    (dest / f"{name}.selection.md").write_text("\n".join(lines) + "\n")
    apcm(["eval", "--model", str(dest / f"{name}.safetensors"), *spec["eval"],
          "--out", str(dest / f"{name}.eval.md")])


if __name__ == "__main__":
    for model_name in sys.argv[1:] or list(MODELS):
        train_and_select(model_name)
