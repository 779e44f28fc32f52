"""Embeds the scripted conversations of ``tools/evaluation/dialogs.py`` into a file
``apcm bench recall --data`` reads: one tensor ``dialogs`` [N, 1, 384] float32 of
every turn (with the date prefix an agent writes), in a seeded random order, by the
shipped text model's embedder. A set of the kind agents store, none of it in any
model's training data.

Usage: python scripts/embed_dialogs.py [--out data/dialogs/splits.safetensors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from apcm.server.codecs.base import load_codec
from apcm.server.config import DEFAULT_MODEL
from apcm.server.embedding.embedder import Embedder, resolve_spec
from apcm.tools.evaluation.dialogs import dialogs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/dialogs/splits.safetensors")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = resolve_spec("auto", load_codec(DEFAULT_MODEL, "cpu").extra_metadata)
    assert spec is not None, "the shipped model names its embedder"
    turns = [t["text"] for c in dialogs(args.conversations, seed=args.seed)["conversations"]
             for t in c["turns"]]
    vectors = np.concatenate([Embedder(spec, "cpu").embed(turns[i:i + 256])
                              for i in range(0, len(turns), 256)]).astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(vectors))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"dialogs": np.ascontiguousarray(vectors[order].reshape(-1, 1, vectors.shape[1]))},
              str(out))
    print(f"{len(turns)} turns of {args.conversations} conversations -> {out}")


if __name__ == "__main__":
    main()
