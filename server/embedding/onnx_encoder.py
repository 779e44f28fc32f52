"""The transformer of an embedder's package in ONNX Runtime, exported once and cached.

On first use the package's safetensors weights are exported with
``torch.onnx.export`` into ``<cache_dir>/<package>-<fingerprint>.onnx`` (the
fingerprint hashes the weights, config and tokenizer, so new weights get a new
file); later starts load that file without loading the torch model. The export
is checked against the torch model on probe sentences before it is written,
and the file carries those probes' reference embeddings, so a file that no
longer reproduces them is exported again rather than served.

On a 2-core CPU this ran a one-sentence query 1.8x and FAQ paragraphs 1.8x
faster than the same model in torch, with cosine >= 0.9999998 to it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError
from ..fsutil import atomic_write
from .package import ModelFiles
from .tokens import Tokens, mean_pool

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the exported graph changes
OPSET = 17
PROBES = ("The user's favourite colour is teal.",
          "How do I restore a snapshot after the server restarted in another zone?")
PROBE_KEY = "apcm.probe_embeddings"
MIN_PROBE_COSINE = 0.9999
_export_lock = threading.Lock()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/apcm/embedders``, else ``~/.cache/apcm/embedders``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apcm" / "embedders"


class OnnxEncoder:
    """An ONNX Runtime session of the package's transformer on the CPU.

    Args:
        files: the package's model folder.
        package: its distribution name (names the cached file).
        cache_dir: where exported models are kept.
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
    """

    # on a 2-core CPU, runs of 128-256 tokens embedded FAQ paragraphs 5x faster than
    # padded batches of 64 and 1.2-1.7x faster than runs of 1,024-2,048 tokens
    run_tokens = 256

    def __init__(self, files: ModelFiles, package: str, cache_dir: Path,
                 threads: int = 0) -> None:
        self.path = cache_dir / f"{package}-{files.fingerprint()}-v{EXPORT_VERSION}.onnx"
        self._files = files
        self._threads = threads
        with _export_lock:
            self._session = self._open_checked()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Token ids and mask [b, L] int64 -> last hidden states [b, L, d] float32."""
        return np.asarray(self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0])

    def _open_checked(self) -> Any:
        if self.path.is_file():
            try:
                session = self._session_of(self.path)
                if _probe_cosine(session, self._files) >= MIN_PROBE_COSINE:
                    return session
                log.warning("%s no longer reproduces its probe embeddings; exporting again",
                            self.path)
            except Exception as e:  # a torn or foreign file: export it again
                log.warning("cannot use %s (%s); exporting again", self.path, e)
        export(self._files, self.path)
        return self._session_of(self.path)

    def _session_of(self, path: Path) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # idle spinning threads take a shared core from the gRPC threads and the scan
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export(files: ModelFiles, path: Path) -> None:
    """Export the package's transformer to ONNX at ``path`` (atomically), after checking
    it reproduces the torch model on the probes.

    Raises:
        ModelFileError: the export failed or its outputs differ from torch's.
    """
    import onnx
    import onnxruntime as ort

    from .torch_encoder import TorchEncoder

    reference = TorchEncoder(files.directory)
    tokens = Tokens(files.directory / "tokenizer.json", files.max_seq_length)
    expected = _embed(reference, tokens, files.normalize)
    (rows, ids, mask), = tokens.runs(["export", "an example of two"], run_tokens=1 << 20)
    staged = path.with_name(f".{path.name}.staged-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # the tracer's notes on Python branches it fixed: the probes, of other
            # lengths and batch sizes than the traced input, check the graph instead
            warnings.simplefilter("ignore")
            _trace(reference.model, ids, mask, staged)
        model = onnx.load(str(staged))
        entry = model.metadata_props.add()
        entry.key, entry.value = PROBE_KEY, json.dumps(expected.tolist())
        onnx.save(model, str(staged))
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        cosine = _probe_cosine(session, files)
        if cosine < MIN_PROBE_COSINE:
            raise ModelFileError(f"the ONNX export of {files.directory} reproduces the torch "
                                 f"model only to cosine {cosine:.6f}; use --embedder-backend "
                                 "torch")
        atomic_write(path, lambda tmp: os.replace(staged, tmp))
    except ModelFileError:
        raise
    except Exception as e:
        raise ModelFileError(f"exporting the embedder to ONNX at {path} failed: {e}; use "
                             "--embedder-backend torch") from e
    finally:
        staged.unlink(missing_ok=True)
    log.info("exported the embedder to %s", path)


def _trace(model: Any, ids: np.ndarray, mask: np.ndarray, path: Path) -> None:
    import torch

    torch.onnx.export(
        _HiddenStates(model), (torch.from_numpy(ids), torch.from_numpy(mask)), str(path),
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        opset_version=OPSET, dynamo=False,
        dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                      "attention_mask": {0: "batch", 1: "tokens"},
                      "last_hidden_state": {0: "batch", 1: "tokens"}})


def _HiddenStates(model: Any) -> Any:  # noqa: N802 (a module class, built lazily)
    """``model`` as a ``torch.nn.Module`` of (input_ids, attention_mask) -> token states."""
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids))[0]

    return HiddenStates().eval()


def _embed(encoder: Any, tokens: Tokens, normalize: bool) -> np.ndarray:
    """The probes' embeddings [len(PROBES), d] through ``encoder(ids, mask)``."""
    parts = {}
    for rows, ids, mask in tokens.runs(PROBES, run_tokens=1 << 20):
        for r, v in zip(rows, mean_pool(encoder(ids, mask), mask, normalize), strict=True):
            parts[int(r)] = v
    return np.stack([parts[i] for i in range(len(PROBES))])


def _probe_cosine(session: Any, files: ModelFiles) -> float:
    """Smallest cosine between the session's probe embeddings and the stored ones."""
    raw = session.get_modelmeta().custom_metadata_map.get(PROBE_KEY)
    if raw is None:
        return -1.0
    expected = np.asarray(json.loads(raw), dtype=np.float32)
    tokens = Tokens(files.directory / "tokenizer.json", files.max_seq_length)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"input_ids": ids, "attention_mask": mask})[0])

    got = _embed(run, tokens, normalize=True)
    want = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    return float((got * want).sum(axis=1).min())
