"""``apcm fit-pca``: fit a PCA codec (the paper's baseline) and save it as a weights file."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "fit-pca",
        help="fit a PCA codec from data and save it (servable like an IDRP model)",
        description="Fit PCA on items of shape L x D and save a codec the server can load.",
    )
    parser.add_argument("--data", required=True,
                        help="training items: .npy (numeric, no pickle) or .safetensors "
                        "(tensor 'x' or the only tensor), shape [N, L, D] or [N, L*D]")
    parser.add_argument("--shape", required=True, help="item shape L,D, e.g. 1,384")
    parser.add_argument("--ratio", type=float, default=8.0,
                        help="compression ratio in bytes against float32 input (default 8)")
    parser.add_argument("--code-dtype", choices=("float32", "float16", "int8"), default="float32",
                        help="stored code element type (default float32)")
    parser.add_argument("--name", default=None, help="model name (default: output file stem)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.set_defaults(func=run)


def code_dim_for_ratio(input_dim: int, ratio: float, itemsize: int) -> int:
    """m such that m * itemsize bytes is input_dim * 4 / ratio (floored, at least 1)."""
    return max(1, int(input_dim * 4 / ratio) // itemsize)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from apcm.server.codecs.base import save_codec
    from apcm.server.codecs.pca import PCACodec

    from ..datafiles import load_items

    length, width = (int(v) for v in args.shape.split(","))
    x = load_items(args.data, (length, width))
    itemsize = {"float32": 4, "float16": 2, "int8": 1}[args.code_dtype]
    m = code_dim_for_ratio(length * width, args.ratio, itemsize)
    name = args.name or Path(args.out).stem
    codec = PCACodec.fit(torch.from_numpy(x), m, args.code_dtype, name=name)
    digest = save_codec(codec, args.out, {"data": str(args.data), "n_train": str(len(x))})
    print(f"saved {args.out}: pca m={m} {args.code_dtype} ratio={codec.compression_ratio:g} "
          f"hash={digest[:16]}")
    return 0
