"""The codec interface the server serves, and its safetensors file format.

A codec maps items ``x`` [B, L, D] float32 to codes [B, m] in its code dtype and
back. Two kinds exist: ``pca`` (``apcm.server.codecs.pca``) and ``idrp``: version 1
(``apcm.server.codecs.idrp.codec``, the paper's float/int8 ``z_comp``) and version 2
(``apcm.server.codecs.idrp.v2``, config ``"version": 2``: a transform code of
``m`` packed ``uint8`` bytes). A weights file is one safetensors file whose
metadata names the kind, carries the full config as JSON and a content hash
over config and tensors; loading re-computes the hash and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelFileError
from ..fsutil import atomic_write
from .quant import CodeQuantizer, Quantizer

SCHEMA_VERSION = "1"
_KINDS = {
    "pca": "apcm.server.codecs.pca:PCACodec",
    "idrp": "apcm.server.codecs.idrp.codec:IDRPCodec",
}
# (kind, config "version") -> class, for versions after the first
_VERSIONS = {("idrp", 2): "apcm.server.codecs.idrp.v2:TransformCodec"}


@dataclass
class ItemChecks:
    """What a codec says about each item it encodes (arrays of length B).

    Attributes:
        in_domain_percentile: the item's negative log-likelihood as a percentile of
            the validation set's (0.5 typical, near 1 far from the training data).
        flagged: out of domain (percentile above the model's threshold, or norm off).
        norm_off: the input's norm is not what the model expects (e.g. not unit norm).
        reconstruction_error: ||x - x_hat||^2 over the item (exact, from its code).
    """

    in_domain_percentile: np.ndarray
    flagged: np.ndarray
    norm_off: np.ndarray
    reconstruction_error: np.ndarray


class Codec(ABC):
    """Base class: subclasses define the latent map, this class the code bytes.

    Args:
        name: model name shown to clients.
        input_shape: (L, D) of one item.
        quantizer: how latents are stored.
    """

    kind: str = ""

    def __init__(self, name: str, input_shape: tuple[int, int], quantizer: Quantizer) -> None:
        self.name = name
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        self.quantizer = quantizer
        self.device = torch.device("cpu")
        self.extra_metadata: dict[str, str] = {}
        self._hash: str | None = None

    # -- what a subclass provides -------------------------------------------------
    @property
    @abstractmethod
    def code_dim(self) -> int:
        """m, the dimension of z_comp."""

    @abstractmethod
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L*D] float32 -> z_comp [B, m] float32."""

    @abstractmethod
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z_comp [B, m] float32 -> [B, L*D] float32."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable config that, with ``tensors()``, rebuilds the codec."""

    @abstractmethod
    def model_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors of the latent map (quantiser tensors are added by the base)."""

    @classmethod
    @abstractmethod
    def from_file_parts(
        cls,
        name: str,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        quantizer: CodeQuantizer,
    ) -> Codec:
        """Rebuild from a weights file's config, ``model.*`` tensors (prefix removed)
        and quantiser."""

    @abstractmethod
    def _move(self, device: torch.device) -> None:
        """Move the latent map's tensors/modules to ``device``."""

    # -- shared behaviour ------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        """Width of ``encode_latent``'s output (= ``code_dim`` unless codes are packed)."""
        return self.code_dim

    @property
    def scorer(self) -> Any:
        """How banks score latents against stored codes (None: cosine of dequantised
        codes); see ``apcm.server.memory.scoring.CodeScorer``."""
        return None

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, m] -> latents [B, latent_dim] float32 that ``decode_latent`` reads."""
        return self.quantizer.dequantize(codes.to(self.device))

    def check_items(self, x: torch.Tensor,
                    codes: torch.Tensor | None = None) -> ItemChecks | None:
        """In-domain score and reconstruction error of items [B, L, D] (None: the
        codec has no density model); ``codes`` are their codes if already computed."""
        return None

    @property
    def input_dim(self) -> int:
        return self.input_shape[0] * self.input_shape[1]

    @property
    def code_dtype(self) -> str:
        return self.quantizer.code_dtype

    @property
    def bytes_per_code(self) -> int:
        return self.code_dim * self.quantizer.itemsize

    @property
    def input_bytes(self) -> int:
        return self.input_dim * 4

    @property
    def compression_ratio(self) -> float:
        return self.input_bytes / self.bytes_per_code

    @property
    def similarity_weights(self) -> torch.Tensor | None:
        """Per-dimension weights [m] under which cosine of latents best tracks cosine
        of the inputs (None: compare latents as they are). Banks search with them."""
        return None

    def to(self, device: torch.device | str) -> Codec:
        self.device = torch.device(device)
        self._move(self.device)
        self.quantizer.to(self.device)
        return self

    @torch.inference_mode()
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] float32 -> codes [B, m] in the code dtype."""
        z = self.encode_latent(x.to(self.device, torch.float32).reshape(x.shape[0], -1))
        return self.quantizer.quantize(z)

    @torch.inference_mode()
    def decompress(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, m] -> [B, L, D] float32."""
        x = self.decode_latent(self.codes_to_latent(codes.to(self.device)))
        return x.reshape(codes.shape[0], *self.input_shape)

    def all_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model_tensors().items()}
        tensors.update(self.quantizer.tensors())
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def full_config(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "code_dim": self.code_dim,
            "code_dtype": self.code_dtype,
            **self.config(),
        }

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = content_hash(self.kind, self.full_config(), self.all_tensors())
        return self._hash


def content_hash(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over kind, canonical config JSON and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_codec(codec: Codec, path: str | Path, extra: dict[str, str] | None = None) -> str:
    """Write ``codec`` to ``path`` atomically; returns its content hash.

    ``extra`` metadata (provenance, metrics) is stored but not hashed, so a
    model card can be amended without changing the model's identity.
    """
    tensors = codec.all_tensors()
    config = codec.full_config()
    digest = content_hash(codec.kind, config, tensors)
    metadata = {
        "apcm.schema_version": SCHEMA_VERSION,
        "apcm.kind": codec.kind,
        "apcm.name": codec.name,
        "apcm.config": json.dumps(config, sort_keys=True),
        "apcm.content_hash": digest,
        "apcm.created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in {**codec.extra_metadata, **(extra or {})}.items():
        metadata[key if key.startswith("apcm.") else f"apcm.meta.{key}"] = str(value)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return digest


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a weights file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError as e:
        raise ModelFileError(f"model file {path} does not exist") from e
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"model file {path} is not a readable safetensors file: {e}") from e


def load_codec(
    path: str | Path, device: torch.device | str = "cpu", expected_hash: str | None = None
) -> Codec:
    """Load and verify a codec from a safetensors weights file.

    Raises:
        ModelFileError: unreadable file, unknown kind, schema or hash mismatch.
    """
    meta = read_metadata(path)
    kind = meta.get("apcm.kind")
    if kind not in _KINDS:
        raise ModelFileError(f"model file {path} has unknown codec kind {kind!r}")
    if meta.get("apcm.schema_version") != SCHEMA_VERSION:
        raise ModelFileError(
            f"model file {path} has schema {meta.get('apcm.schema_version')!r}, "
            f"this server reads {SCHEMA_VERSION!r}"
        )
    try:
        config = json.loads(meta["apcm.config"])
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except Exception as e:
        raise ModelFileError(f"model file {path} is corrupt: {e}") from e
    digest = content_hash(kind, config, tensors)
    if digest != meta.get("apcm.content_hash"):
        raise ModelFileError(
            f"model file {path} fails its content hash check: stored "
            f"{meta.get('apcm.content_hash')}, computed {digest}; the file was altered or torn"
        )
    if expected_hash is not None and digest != expected_hash:
        raise ModelFileError(f"model file {path} has hash {digest}, expected {expected_hash}")
    version = config.get("version", 1) if isinstance(config, dict) else 1
    target = _KINDS[kind] if version == 1 else _VERSIONS.get((kind, version))
    if target is None:
        raise ModelFileError(f"model file {path}: {kind} version {version!r} is not known to "
                             "this server; upgrade the server")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:  # packed (version 2) codecs build their quantiser from the model tensors
        quantizer: Any = CodeQuantizer(config["code_dtype"], tensors.get("quant.scale")) \
            if version == 1 else None
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"model file {path}: bad code dtype: {e}") from e
    codec: Codec = cls.from_file_parts(
        meta.get("apcm.name", Path(path).stem), config, model, quantizer
    )
    codec.extra_metadata = {k: v for k, v in meta.items() if k.startswith("apcm.meta.")}
    codec._hash = digest
    if codec.full_config() != config:
        raise ModelFileError(f"model file {path}: config does not describe the stored tensors")
    return codec.to(device)
