"""Shared fixtures: a real ApCM server on port 0 serving a small real codec.

The codec is a PCA fitted on scikit-learn's 8x8 digits (real data, fits in
milliseconds), saved through the real weights format; servers bind
127.0.0.1:0 and are reached through the real client.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from apcm.server.api.app import ApcmServer, build_server
from apcm.server.codecs.base import Codec, load_codec, save_codec
from apcm.server.codecs.pca import PCACodec
from apcm.server.config import Settings

DIGITS_SHAPE = (8, 8)

# OMP_NUM_THREADS is capped at the CPUs this process may use; set_num_threads is not,
# so float tolerances can be tried under the summation orders of a larger machine
if os.environ.get("APCM_TEST_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["APCM_TEST_TORCH_THREADS"]))


@pytest.fixture(scope="session")
def digits() -> np.ndarray:
    """sklearn's digits as float32 [1797, 8, 8], scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype(np.float32)


def _fit_and_save(digits: np.ndarray, path: Path, code_dtype: str, code_dim: int) -> Path:
    codec = PCACodec.fit(torch.from_numpy(digits[:1200]), code_dim, code_dtype,
                         name=f"digits-pca-{code_dtype}")
    save_codec(codec, path, {"data": "sklearn digits[:1200]"})
    return path


@pytest.fixture(scope="session")
def model_path(digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 PCA codec, m=8 (8:1 in bytes on 8x8 float32 items)."""
    return _fit_and_save(digits, tmp_path_factory.mktemp("models") / "pca.safetensors",
                         "float32", 8)


@pytest.fixture(scope="session")
def int8_model_path(digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 PCA codec, m=32 (also 8:1 in bytes)."""
    return _fit_and_save(digits, tmp_path_factory.mktemp("models") / "pca-int8.safetensors",
                         "int8", 32)


@pytest.fixture(scope="session")
def codec(model_path: Path) -> Codec:
    """The same codec the default test server serves, loaded in-process."""
    return load_codec(model_path)


TEXT_MODEL = Path(__file__).resolve().parents[1] / "model_weights" / "text-minilm.safetensors"


def server_settings(model_path: Path, data_dir: Path, **overrides: object) -> Settings:
    base = dict(
        # no metrics HTTP server unless a test scrapes it: stopping one costs ~0.5 s
        host="127.0.0.1", grpc_port=0, metrics_port=-1, metrics_host="127.0.0.1",
        model=str(model_path), device="cpu", data_dir=str(data_dir),
        snapshot_interval_s=0.0, default_bank_capacity=64, shutdown_grace_s=1.0,
        max_batch_size=512, browser="off",
    )
    base.update(overrides)
    return Settings(**base).validated()  # type: ignore[arg-type]


def start_text_server(data_dir: Path, registry: CollectorRegistry | None = None,
                      **overrides: object) -> ApcmServer:
    """A started server of the shipped text model (default bank of 256 unless told)."""
    settings = server_settings(TEXT_MODEL, data_dir, **{"default_bank_capacity": 256,
                                                        **overrides})
    srv, _ = build_server(settings, registry=registry or CollectorRegistry())
    return srv.start()


@pytest.fixture
def make_server(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ApcmServer]]:
    """Factory: start a real server with settings overrides; all are stopped afterwards."""
    started: list[ApcmServer] = []

    def make(**overrides: object) -> ApcmServer:
        data_dir = overrides.pop("data_dir", None) or tmp_path_factory.mktemp("data")
        model = overrides.pop("model", model_path)
        settings = server_settings(model, data_dir, **overrides)  # type: ignore[arg-type]
        server, _ = build_server(settings, registry=CollectorRegistry())
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop(grace=0.5)


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApcmServer]:
    """One running server per test module (float32 PCA on digits), metrics served."""
    settings = server_settings(model_path, tmp_path_factory.mktemp("data"), metrics_port=0)
    srv, _ = build_server(settings, registry=CollectorRegistry())
    srv.start()
    yield srv
    srv.stop(grace=0.5)


@pytest.fixture(scope="module")
def server_address(server: ApcmServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(server_address: str) -> Iterator[object]:
    from apcm.client import MemoryClient

    with MemoryClient(server_address, timeout=30.0) as c:
        yield c


@pytest.fixture
def file_size_limit() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with file_size_limit(n):`` writes past byte ``n`` of any file fail with EFBIG.

    A real kernel refusal (RLIMIT_FSIZE) that stands in for a full disk without
    filling one; SIGXFSZ is ignored meanwhile so the write fails instead of the process.
    """

    @contextlib.contextmanager
    def limit(n: int) -> Iterator[None]:
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)

    return limit
