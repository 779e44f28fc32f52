"""``apcm train``: fit an IDRP codec on real data and write its weights, curves and grids."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command imports torch and the server only when it runs
    import torch

    from apcm.server.codecs.idrp.codec import IDRPCodec
    from apcm.server.codecs.idrp.model import IDRP
    from apcm.server.codecs.quant import CodeQuantizer

EPILOG = """Data: a .safetensors file with tensors 'train' and 'val' (and optionally 'test',
reported as held-out) or one array (.npy / single tensor) split by --val-fraction.
Example: apcm train --data data/digits/digits.safetensors --shape 8,8 --ratio 8
--code-dtype int8 --out model_weights/digits.safetensors --image"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train an IDRP codec", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="training data (.npy or .safetensors)")
    p.add_argument("--shape", required=True, help="item shape L,D (flattened d = L*D)")
    p.add_argument("--ratio", type=float, default=8.0,
                   help="compression ratio in bytes against float32 input; sets m")
    p.add_argument("--code-dtype", choices=("float32", "float16", "int8"), default="float32",
                   help="stored code dtype (int8: per-dimension scales from training latents)")
    p.add_argument("--out", required=True, help="output weights file (.safetensors)")
    p.add_argument("--name", default=None, help="model name served to clients (default: file stem)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation share when the data has no 'val' tensor")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that validation split")
    p.add_argument("--blocks", type=int, default=4, help="affine coupling blocks")
    p.add_argument("--hidden", type=int, default=128, help="coupling subnet width")
    p.add_argument("--n-res", type=int, default=1, help="residual SwiGLU blocks per subnet")
    p.add_argument("--aux-hidden", type=int, default=256, help="aux predictor width")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in subnets and predictor")
    p.add_argument("--scale-clamp", type=float, default=1.0, help="soft clamp c of coupling scales")
    p.add_argument("--no-whiten", action="store_true",
                   help="do not divide PCA coefficients by their standard deviations")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs (float phase)")
    p.add_argument("--qat-epochs", type=int, default=0,
                   help="int8 quantisation-aware fine-tuning epochs (straight-through)")
    p.add_argument("--batch-size", type=int, default=256, help="mini-batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--noise", type=float, default=0.0,
                   help="input noise std, relative to each input dim's std (training only)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--patience", type=int, default=15,
                   help="stop after this many epochs without a better validation MSE")
    p.add_argument("--seed", type=int, default=0, help="seed of init, permutations and batches")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (auto: cuda when present)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--image", action="store_true",
                   help="items are L x D images: also write an original/IDRP/PCA PNG grid")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=run)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from apcm.server.codecs.base import save_codec
    from apcm.server.codecs.idrp.codec import IDRPCodec
    from apcm.server.codecs.idrp.model import IDRP, IDRPConfig
    from apcm.server.codecs.pca import PCACodec

    from ..evaluation import datasets, plots
    from ..training.idrp import (
        TrainConfig,
        code_dim_for_ratio,
        coded_mse,
        fit_quantizer,
        train_idrp,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = datasets.parse_shape(args.shape)
    arrays = datasets.load_arrays(args.data)
    if "train" in arrays and "val" in arrays:
        x_train, x_val = arrays["train"], arrays["val"]
        split_note = "file splits 'train'/'val'"
    else:
        if len(arrays) != 1 and "train" not in arrays:
            raise SystemExit(f"{args.data}: expected 'train'/'val' tensors or a single array")
        x_all = arrays.get("train", next(iter(arrays.values())))
        x_train, x_val = datasets.split(x_all, args.val_fraction, args.split_seed)
        split_note = f"random {args.val_fraction:.0%} validation, seed {args.split_seed}"
    x_train = datasets.as_items(x_train, shape).reshape(x_train.shape[0], -1)
    x_val = datasets.as_items(x_val, shape).reshape(x_val.shape[0], -1)
    x_test = None
    if "test" in arrays:
        x_test = datasets.as_items(arrays["test"], shape).reshape(arrays["test"].shape[0], -1)
    d = shape[0] * shape[1]
    try:
        m = code_dim_for_ratio(d, args.ratio, args.code_dtype)
    except ValueError as e:
        raise SystemExit(f"apcm train: {e}") from e
    model_cfg = IDRPConfig(
        dim=d, code_dim=m, n_blocks=args.blocks, hidden=args.hidden, n_res=args.n_res,
        aux_hidden=args.aux_hidden, dropout=args.dropout, scale_clamp=args.scale_clamp,
        whiten=not args.no_whiten, seed=args.seed,
    )
    train_cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, noise_std=args.noise, grad_clip=args.grad_clip,
        patience=args.patience, qat_epochs=args.qat_epochs if args.code_dtype == "int8" else 0,
        seed=args.seed,
    )
    device = _device(args.device)
    print(f"IDRP d={d} m={m} {args.code_dtype} ({args.ratio:g}:1 in bytes), "
          f"train {x_train.shape[0]}, val {x_val.shape[0]}, device {device}")
    bar = tqdm(total=train_cfg.epochs + train_cfg.qat_epochs, unit="epoch")

    def on_epoch(rec: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(train=f"{rec['train_loss']:.4g}", val=f"{rec['val_mse']:.4g}",
                        phase="qat" if rec["phase"] else "float")

    result = train_idrp(x_train, x_val, model_cfg, args.code_dtype, train_cfg, device, on_epoch)
    bar.close()
    model = result.model.cpu()
    quantizer = result.quantizer.to(torch.device("cpu"))
    pca = IDRP.from_data(x_train.double(), model_cfg).eval()
    pca_q = fit_quantizer(pca, x_train, args.code_dtype)
    metrics: dict[str, Any] = {**result.summary()}
    splits = {"train": x_train, "val": x_val, **({"test": x_test} if x_test is not None else {})}
    for split_name, x in splits.items():
        metrics[f"{split_name}_mse_idrp"] = coded_mse(model, quantizer, x)
        metrics[f"{split_name}_mse_pca_same_m"] = coded_mse(pca, pca_q, x)
    name = args.name or Path(args.out).stem
    pca_codec = PCACodec.fit(x_train.reshape(-1, *shape), m, args.code_dtype)
    codec = IDRPCodec(name, shape, model, quantizer)
    extra = {
        "data": str(args.data),
        "data_sha256": datasets.file_sha256(args.data),
        "split": split_note,
        "train_config": json.dumps(train_cfg.to_dict(), sort_keys=True),
        "metrics": json.dumps(metrics, sort_keys=True),
        "fallback_to_init": str(result.fallback_to_init).lower(),
        "history": json.dumps(result.history),
    }
    if pca_codec.quantizer.scale is not None:
        # lets tests rebuild the equal-bytes PCA baseline from this file alone
        extra["pca_int8_scale"] = json.dumps(pca_codec.quantizer.scale.tolist())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_codec(codec, out, extra)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    if result.fallback_to_init:
        print("no epoch beat the PCA init on validation: shipped the init (exact PCA-m)")
    print(f"wrote {out} (hash {digest[:16]}…)")
    if not args.no_plots:
        stem = out.with_suffix("")
        plots.loss_curve(result.history, result.init_val_mse, f"{stem}.loss.png",
                         f"{name}: m={m} {args.code_dtype}")
        if args.image:
            _image_grid(codec, pca, pca_q, x_test if x_test is not None else x_val, shape,
                        f"{stem}.recon.png", name)
        print(f"wrote {stem}.loss.png" + (f" and {stem}.recon.png" if args.image else ""))
    return 0


def _image_grid(codec: IDRPCodec, pca: IDRP, pca_q: CodeQuantizer, x: torch.Tensor,
                shape: tuple[int, int], path: str, name: str) -> None:
    import torch

    from ..evaluation import plots

    items = x[:12]
    with torch.inference_mode():
        idrp = codec.decompress(codec.compress(items.reshape(-1, *shape)))
        pca_rec = pca.decompress(pca_q.dequantize(pca_q.quantize(pca.compress(items))))
    plots.reconstruction_grid(
        {"original": items.reshape(-1, *shape).numpy(),
         "IDRP": idrp.reshape(-1, *shape).numpy(),
         "PCA same m": pca_rec.reshape(-1, *shape).numpy()},
        path, f"{name}: held-out items, original / IDRP / PCA at {codec.compression_ratio:g}:1",
    )
