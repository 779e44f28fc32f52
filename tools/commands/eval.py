"""``apcm eval``: codecs against the classical baselines at equal bytes, as markdown.

Without ``--budgets``/``--ratios``: one table per split for each ``--model``
against PCA / PQ / OPQ / bit-packing at that model's byte budget. With them:
rate–distortion curves: every baseline (PCA float32/float16/int8, FAISS PQ,
OPQ+PQ, SQ8/6/4, RaBitQ, water-filling transform coder, random rotation +
uniform SQ, bit-packing for binary data) at every budget, fitted on the
training split and (unless ``--no-in-domain``) on each evaluated split itself,
plus our codec fitted in domain and each ``--model`` at its own bytes, on every
split; summary and full tables, and with ``--plots DIR`` one PNG per metric
against bytes per code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command imports numpy and the server only when it runs
    import numpy as np

    from apcm.server.codecs.base import Codec

EPILOG = """Baselines are fitted on --train-key of --train-data (default: the 'train' tensor
of --data), the split the model was trained on; with --budgets also on each --splits
entry itself (in domain). One table per --splits entry.
Example: apcm eval --model model_weights/digits.safetensors
--data data/digits/digits.safetensors --splits train,test --image
Curves: apcm eval --model model_weights/text-minilm.safetensors
--data data/corpus/splits.safetensors --splits train,test,fortunes,licenses
--embeddings --budgets 48,96,192,384 --plots docs/bench --out docs/bench/rd-text.md"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a codec on held-out data against baselines",
        description=__doc__, epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", action="append", default=[],
                   help="codec weights file (.safetensors); repeat for several (one per "
                        "budget); optional with --budgets (baselines only)")
    p.add_argument("--data", required=True, help="evaluation data (.npy or .safetensors)")
    p.add_argument("--splits", default="test",
                   help="comma-separated tensors of --data to evaluate ('data' for a .npy)")
    p.add_argument("--train-data", default=None,
                   help="data the baselines are fitted on (default: --data)")
    p.add_argument("--train-key", default="train", help="tensor of --train-data to fit on")
    p.add_argument("--image", action="store_true", help="report PSNR (items are images)")
    p.add_argument("--data-range", type=float, default=None,
                   help="PSNR peak value (default: max - min of the training data)")
    p.add_argument("--embeddings", action="store_true",
                   help="report mean cosine and recall@10 of decoded neighbours")
    p.add_argument("--binary", choices=("auto", "yes", "no"), default="auto",
                   help="add lossless bit-packing (auto: when all training values are 0 or 1)")
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS PQ/OPQ baselines")
    p.add_argument("--max-items", type=int, default=5000,
                   help="evaluate at most this many items per split (see --subsample)")
    p.add_argument("--subsample", choices=("first", "random"), default="first",
                   help="which items --max-items keeps: the first ones, or a seeded (0) "
                        "random subset (for splits stored grouped by source)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the codec runs")
    p.add_argument("--budgets", default=None,
                   help="comma-separated bytes per code: draw rate-distortion curves")
    p.add_argument("--ratios", default=None,
                   help="comma-separated compression ratios vs float32 (instead of --budgets)")
    p.add_argument("--shape", default=None,
                   help="L,D of one item when no --model gives it (default 1,d)")
    p.add_argument("--no-opq", action="store_true", help="curves: skip OPQ+PQ (slowest fit)")
    p.add_argument("--no-rabitq", action="store_true", help="curves: skip RaBitQ")
    p.add_argument("--no-in-domain", action="store_true",
                   help="curves: fit the baselines on the training split only, not also on "
                        "each evaluated split (the searched database) itself")
    p.add_argument("--plots", default=None,
                   help="curves: folder for one PNG per metric (PREFIX.METRIC.png)")
    p.add_argument("--plot-prefix", default="rd", help="curves: file name prefix of the PNGs")
    p.add_argument("--plot-title", default=None,
                   help="curves: title of the plots (default: the --data file name)")
    p.add_argument("--timing-s", type=float, default=0.3,
                   help="seconds of repeated encode (decode) calls behind each items/s figure")
    p.add_argument("--json", default=None, help="curves: also write every row to this JSON file")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    p.set_defaults(func=run)


def _label(path: str, codec: Codec) -> tuple[str, str]:
    """(row name, curve family) of a codec file, from what any loaded codec has."""
    dtype, m = getattr(codec, "code_dtype", "?"), getattr(codec, "code_dim", "?")
    return (f"{Path(path).stem} ({codec.kind} {dtype} m={m}, this model)",
            f"{codec.kind} (model)")


def run(args: argparse.Namespace) -> int:
    if args.budgets or args.ratios:
        return run_curves(args)
    if not args.model:
        raise SystemExit("--model is required without --budgets/--ratios")
    texts = [run_one(args, model) for model in args.model]
    if args.out:
        Path(args.out).write_text("\n".join(texts))
    return 0


def _load_data(
    args: argparse.Namespace, d: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], bool, float | None]:
    import numpy as np

    from ..evaluation import datasets

    arrays = datasets.load_arrays(args.data)
    train_arrays = datasets.load_arrays(args.train_data) if args.train_data else arrays
    if args.train_key not in train_arrays:
        raise SystemExit(f"no tensor {args.train_key!r} to fit the baselines on; "
                         "pass --train-data/--train-key")
    x_train = train_arrays[args.train_key].reshape(-1, d).float().numpy()
    binary = args.binary == "yes" or (
        args.binary == "auto" and bool(np.isin(x_train, (0.0, 1.0)).all())
    )
    data_range = None
    if args.image:
        data_range = args.data_range or float(x_train.max() - x_train.min())
    splits = {}
    for split in args.splits.split(","):
        if split not in arrays:
            raise SystemExit(f"{args.data} has no tensor {split!r}; it has {sorted(arrays)}")
        x = arrays[split].reshape(-1, d).float().numpy()
        if args.subsample == "random" and len(x) > args.max_items:
            keep = np.sort(np.random.default_rng(0).permutation(len(x))[: args.max_items])
            x = x[keep]
        splits[split] = x[: args.max_items]
    return x_train, splits, binary, data_range


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(args.device)


def run_curves(args: argparse.Namespace) -> int:
    import json

    from apcm.server.codecs.base import load_codec
    from apcm.server.codecs.idrp.v2 import TransformCodec

    from ..evaluation import curves, datasets
    from ..evaluation.baselines import IN_DOMAIN_IDRP, CodecMethod

    models = []
    for path in args.model:
        codec = load_codec(path, _device(args))
        name, family = _label(path, codec)
        method = CodecMethod(name, codec)
        method.family = family
        models.append((Path(path).name, method, codec))
    if models:
        shape = models[0][2].input_shape
        if any(c.input_shape != shape for _, _, c in models):
            raise SystemExit("every --model must take the same input shape")
    elif args.shape:
        shape = datasets.parse_shape(args.shape)
    else:
        first = datasets.load_arrays(args.train_data or args.data)
        if args.train_key not in first:
            raise SystemExit(f"no tensor {args.train_key!r} to fit the baselines on")
        shape = (1, int(first[args.train_key][0].numel()))
    d = shape[0] * shape[1]
    try:
        budgets = curves.parse_budgets(args.budgets, args.ratios, 4 * d)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    x_train, splits, binary, data_range = _load_data(args, d)
    result = curves.run_curves(
        [(name, method) for name, method, _ in models], budgets, x_train, splits, shape,
        data_range=data_range, embeddings=args.embeddings, binary=binary,
        faiss=not args.no_faiss, opq=not args.no_opq, rabitq=not args.no_rabitq,
        in_domain=not args.no_in_domain,
        renorm={c.bytes_per_code: c.model.config.renorm for _, _, c in models
                if isinstance(c, TransformCodec)},
        timing_s=args.timing_s, log=lambda text: print(text, flush=True),
    )
    described = "; ".join(
        f"`{name}` ({c.kind}, hash {c.content_hash[:12]}, {c.bytes_per_code} B)"
        for name, _, c in models) or "none (baselines only)"
    header = (
        f"Rate–distortion at {', '.join(f'{b} B' for b in budgets)} per code "
        f"(input {shape[0]}x{shape[1]} float32 = {4 * d} B). Models: {described}. "
        "Every baseline is fitted on "
        f"`{args.train_key}` of `{Path(args.train_data or args.data).name}` "
        f"({x_train.shape[0]} items; rows \"(fit: train)\")"
        + ("" if args.no_in_domain else
           " and again on each split itself, the database being searched (rows \"(fit: in "
           "domain)\"), which is how FAISS, Qdrant or LanceDB users train a quantiser; "
           f"`{IN_DOMAIN_IDRP}` is our codec fitted the same way")
        + ". MSE is per value; recall@10: every item of a split queries the others, exact "
        "top-10 from the original vectors vs top-10 of the decoded ones (RaBitQ: FAISS' "
        "own search behind its random rotation, float queries)."
    )
    text = curves.to_markdown(result, header)
    if args.plots:
        written = curves.draw(result, args.plots, args.plot_prefix,
                              args.plot_title or Path(args.data).name)
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


def run_one(args: argparse.Namespace, model: str) -> str:
    from apcm.server.codecs.base import load_codec

    from ..evaluation import report
    from ..evaluation.baselines import CodecMethod

    codec = load_codec(model, _device(args))
    d = codec.input_dim
    x_train, splits, binary, data_range = _load_data(args, d)
    methods = [CodecMethod(f"{codec.kind.upper()} {codec.code_dtype} m={codec.code_dim} "
                           "(this model)", codec),
               *report.baselines(codec, x_train, binary=binary, faiss=not args.no_faiss)]
    sections = [
        f"Model `{Path(model).name}` ({codec.kind}, hash {codec.content_hash[:12]}), "
        f"input {codec.input_shape[0]}x{codec.input_shape[1]} float32 = {codec.input_bytes} "
        f"bytes; baselines fitted on `{args.train_key}` ({x_train.shape[0]} items)."
    ]
    for split, x in splits.items():
        rows = [report.evaluate(m, x, data_range, args.embeddings, timing_s=args.timing_s)
                for m in methods]
        sections.append(f"**{split}** ({x.shape[0]} items)\n\n{report.to_markdown(rows)}")
    text = "\n\n".join(sections) + "\n"
    print(text)
    return text
