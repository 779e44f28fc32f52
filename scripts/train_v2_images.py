"""IDRP v2 image models at 8:1: ``digits-v2`` (8x8 digits, 32 B) and ``gravel-grey``
(grey 16x16 gravel patches, 128 B), with ``apcm eval`` tables.

Needs ``scripts/prepare_digits.py`` and ``scripts/prepare_gravel.py --grey`` first.
The untrained v2 model (PCA + exact bit allocation + fitted uniform quantisers) is
what is shipped; renormalisation is off (pixels are not unit-norm vectors).

Usage: ``.venv/bin/python scripts/train_v2_images.py [digits-v2 gravel-grey]``
"""

from __future__ import annotations

import sys

from safetensors.torch import load_file

from apcm.server.cli import main as apcm
from apcm.server.codecs.base import save_codec
from apcm.server.codecs.idrp.v2 import TransformCodec

MODELS = {
    "digits-v2": ("data/digits/digits.safetensors", 32, 16.0),
    "gravel-grey": ("data/gravel/gravel-grey.safetensors", 128, 255.0),
}


def build(name: str) -> None:
    path, budget, peak = MODELS[name]
    data = load_file(path)
    codec = TransformCodec.fit(data["train"].float(), budget, val=data["val"].float(),
                               name=name, renorm=False)
    out = f"model_weights/{name}.safetensors"
    save_codec(codec, out, extra={"data": path, "split": "file splits 'train'/'val'/'test'",
                                  "fallback_to_init": "true"})
    print(name, "bits", codec.model.bits.bincount(minlength=9).tolist(), flush=True)
    apcm(["eval", "--model", out, "--data", path, "--splits", "train,test", "--image",
          "--data-range", str(peak), "--binary", "no", "--out", f"model_weights/{name}.eval.md"])


if __name__ == "__main__":
    for model_name in sys.argv[1:] or list(MODELS):
        build(model_name)
