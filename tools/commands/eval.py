"""``apcm eval``: a codec against PCA / PQ / OPQ / bit-packing at equal bytes, as markdown."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """Baselines are fitted on --train-key of --train-data (default: the 'train' tensor
of --data), the split the model was trained on. One table per --splits entry.
Example: apcm eval --model model_weights/digits.safetensors
--data data/digits/digits.safetensors --splits train,test --image"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a codec on held-out data against baselines",
        description=__doc__, epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="codec weights file (.safetensors)")
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
                   help="evaluate at most this many items per split (first ones)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where the codec runs")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from apcm.server.codecs.base import load_codec
    from apcm.tools.evaluation import datasets, report
    from apcm.tools.evaluation.baselines import CodecMethod

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_codec(args.model, device)
    d = codec.input_dim
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
    methods = [CodecMethod(f"IDRP {codec.code_dtype} m={codec.code_dim} (this model)", codec),
               *report.baselines(codec, x_train, binary=binary, faiss=not args.no_faiss)]
    sections = [
        f"Model `{Path(args.model).name}` ({codec.kind}, hash {codec.content_hash[:12]}), "
        f"input {codec.input_shape[0]}x{codec.input_shape[1]} float32 = {codec.input_bytes} "
        f"bytes; baselines fitted on `{args.train_key}` ({x_train.shape[0]} items)."
    ]
    for split in args.splits.split(","):
        if split not in arrays:
            raise SystemExit(f"{args.data} has no tensor {split!r}; it has {sorted(arrays)}")
        x = arrays[split].reshape(-1, d).float().numpy()[: args.max_items]
        rows = [report.evaluate(m, x, data_range, args.embeddings) for m in methods]
        sections.append(f"**{split}** ({x.shape[0]} items)\n\n{report.to_markdown(rows)}")
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
