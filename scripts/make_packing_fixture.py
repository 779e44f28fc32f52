"""Pins the IDRP v2 code bytes: writes ``tests/fixtures/v2_packing.safetensors``.

Generated once, with the packing as of commit c9d0f9a (before it was vectorised),
so ``tests/test_v2_packing.py`` can prove that faster packing keeps every stored
code and snapshot readable. For each shipped v2 model it stores the bit allocation
and steps (what the code bytes depend on), latents ``y`` (held-out items through
the model, plus synthetic extremes that hit the clamps and every width's end
cells), and the cells and packed codes the old implementation produced. For the
default model it also stores ``compress`` codes of held-out items with the
model's content hash (that comparison only applies while the file is unchanged).

Rerunning this script with a changed implementation would re-pin whatever that
implementation does: do not, unless the code format itself is meant to change.

Usage: ``.venv/bin/python scripts/make_packing_fixture.py``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from apcm.server.codecs.base import load_codec

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "v2_packing.safetensors"
MODELS = {
    "text_minilm": ("text-minilm", "text_v2_heldout.safetensors", "test"),
    "text_minilm_4x": ("text-minilm-4x", "text_v2_heldout.safetensors", "test"),
    "text_minilm_16x": ("text-minilm-16x", "text_v2_heldout.safetensors", "test"),
    "text_minilm_32x": ("text-minilm-32x", "text_v2_heldout.safetensors", "test"),
    "text_minilm_flow": ("text-minilm-flow", "text_v2_heldout.safetensors", "fortunes"),
    "digits_v2": ("digits-v2", "digits_heldout.safetensors", "test"),
    "gravel_grey": ("gravel-grey", "gravel_grey_heldout.safetensors", "test"),
}
N_REAL, N_SYNTH = 24, 16


def synthetic_latents(step: torch.Tensor, bits: torch.Tensor, n: int) -> torch.Tensor:
    """[n, d]: zeros, far beyond both clamps, exact cell edges, and wide noise."""
    gen = torch.Generator().manual_seed(0)
    half = (1 << bits).float() / 2 * step
    rows = [torch.zeros_like(step), 10 * half + 1, -10 * half - 1, half, -half,
            half - step / 2, -half + step / 2]
    while len(rows) < n:
        rows.append(torch.randn(step.shape, generator=gen) * half * 1.3)
    return torch.stack(rows[:n])


def main() -> None:
    tensors: dict[str, np.ndarray] = {}
    for key, (model, fixture, split) in MODELS.items():
        codec = load_codec(ROOT / "model_weights" / f"{model}.safetensors")
        m = codec.model  # type: ignore[attr-defined]
        x = torch.from_numpy(load_file(str(ROOT / "tests" / "fixtures" / fixture))[split])
        x = x[:N_REAL].reshape(N_REAL, *codec.input_shape).float()
        with torch.inference_mode():
            y_real = codec.encode_latent(x.reshape(N_REAL, -1))
            y = torch.cat([y_real, synthetic_latents(m.step, m.bits, N_SYNTH)])
            cells = m.cells(y)
            codes = m.pack(y)
        tensors[f"{key}.bits"] = m.bits.numpy().astype(np.int64)
        tensors[f"{key}.step"] = m.step.numpy().astype(np.float32)
        tensors[f"{key}.y"] = y.numpy().astype(np.float32)
        tensors[f"{key}.cells"] = cells.numpy().astype(np.uint8)
        tensors[f"{key}.codes"] = codes.numpy()
        if key == "text_minilm":
            with torch.inference_mode():
                tensors["text_minilm.compress_codes"] = codec.compress(x).numpy()
            hash_bytes = np.frombuffer(codec.content_hash.encode(), dtype=np.uint8)
            tensors["text_minilm.content_hash"] = hash_bytes.copy()
        print(f"{key}: {int((m.bits > 0).sum())} coded dims, widths "
              f"{sorted(set(m.bits[m.bits > 0].tolist()))}, {codes.shape[1]} B")
    save_file(tensors, str(OUT), metadata={"generated_by": "scripts/make_packing_fixture.py",
                                           "implementation": "c9d0f9a"})
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
