"""Server settings: one frozen dataclass; defaults, then ``APCM_*`` env, then CLI flags.

Every field documents itself (``help`` metadata), and the ``apcm serve`` parser
is generated from these fields, so a flag, its env variable and its default
cannot drift apart. The port variable is ``APCM_GRPC_PORT`` (not ``APCM_PORT``,
which Kubernetes service links would inject as ``tcp://…``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "model_weights/text-minilm.safetensors"
# Share of the container's (or machine's) memory the banks may hold by default: the
# rest is for the codec, Python, gRPC buffers and in-flight requests.
MEMORY_LIMIT_FRACTION = 0.8
_CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max",  # cgroup v2
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v1


def detected_memory_bytes() -> int:
    """The cgroup memory limit if one is set, else the machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMIT_FILES:
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < physical:  # "max" or a huge v1 value: none
            return int(raw)
    return int(physical)


def _f(
    default: Any, help: str, choices: tuple[str, ...] | None = None, alias: str | None = None
) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "alias": alias})


@dataclass(frozen=True)
class Settings:
    host: str = _f("[::]", "address to bind the gRPC server to")
    grpc_port: int = _f(50051, "gRPC port (0 picks a free port)", alias="--port")
    metrics_port: int = _f(9090, "Prometheus metrics HTTP port (0 picks a free port, -1 disables)")
    metrics_host: str = _f(
        "127.0.0.1", "address to bind the metrics HTTP server to: loopback by default (the "
        "page has no authentication and names banks); 0.0.0.0 for a Prometheus in another "
        "container or pod, as deploy/ sets it"
    )
    browser: str = _f(
        "auto", "the memory browser, a web page to see, search and clean the banks: auto "
        "(on when --browser-host is loopback), on, off", ("auto", "on", "off"))
    browser_host: str = _f(
        "127.0.0.1", "address of the memory browser: loopback by default; another address "
        "needs --browser on (and API keys, which the browser asks for)")
    browser_port: int = _f(8765, "memory browser HTTP port (0 picks a free port)")
    model: str = _f(DEFAULT_MODEL, "codec weights file (.safetensors) to serve")
    device: str = _f("auto", "where the codec and banks live", ("auto", "cpu", "cuda"))
    embedder: str = _f(
        "auto", "text embedder: auto (the one the model file names, if any), none (serve "
        "vectors only), or an embedder JSON object like the model file's apcm.meta.embedder"
    )
    embedder_backend: str = _f(
        "auto", "what runs the text embedder: onnx (ONNX Runtime, exported once from the "
        "packaged weights into --embedder-cache-dir; fastest on a CPU), torch, "
        "sentence-transformers (as before), or auto (onnx on a CPU, torch on CUDA). All "
        "give the same embeddings to cosine >= 0.9999",
        ("auto", "onnx", "torch", "sentence-transformers"))
    embedder_cache_dir: str = _f(
        "", "where the ONNX export of the embedder is kept (empty: "
        "$XDG_CACHE_HOME/apcm/embedders, else ~/.cache/apcm/embedders)")
    query_cache_size: int = _f(
        1024, "recent query texts whose embeddings are kept, so a repeated recall skips "
        "the embedder (0 disables)")
    max_workers: int = _f(
        64, "gRPC handler threads (micro-batches only form from requests handled at once)"
    )
    max_concurrent_rpcs: int = _f(
        256, "RPCs admitted at once; more are refused with RESOURCE_EXHAUSTED"
    )
    max_message_bytes: int = _f(64 * 1024 * 1024, "largest request/response message, bytes")
    max_batch_size: int = _f(8192, "largest batch (items or queries) in one request")
    max_bank_capacity: int = _f(4_194_304, "largest capacity a bank may be created with")
    default_bank: str = _f("default", "name of the bank that exists at start-up")
    default_bank_capacity: int = _f(10_000, "slots of the default bank")
    default_policy: str = _f("lfu_decay", "eviction policy of new banks", ("lfu", "lfu_decay"))
    default_half_life: float = _f(
        1000.0, "half-life of access counts under lfu_decay, in writes to the bank"
    )
    max_payload_bytes: int = _f(65_536, "largest payload per memory, bytes")
    memory_limit_bytes: int = _f(
        0, "bytes all banks together may hold (codes, slot metadata, keys, metadata, "
        "payloads, IVF lists and lexical indexes); CreateBank and writes beyond it are "
        "refused with RESOURCE_EXHAUSTED. "
        f"0 = {MEMORY_LIMIT_FRACTION:g} x the cgroup memory limit "
        "(/sys/fs/cgroup/memory.max or memory.limit_in_bytes), or x physical RAM if none"
    )
    max_banks: int = _f(1024, "most banks that may exist at once")
    max_key_length: int = _f(256, "longest memory key, characters")
    data_dir: str = _f("var", "directory for snapshots and the write-ahead log")
    snapshot_interval_s: float = _f(300.0, "seconds between automatic snapshots (0 disables)")
    snapshot_wal_bytes: int = _f(
        256 * 1024 * 1024, "also snapshot once the write-ahead log has grown by this many "
        "bytes since the last snapshot, which bounds replay at start-up (0 disables)"
    )
    snapshot_keep: int = _f(5, "snapshots kept on disk; older ones are deleted")
    snapshot_bank_file_bytes: int = _f(
        16 * 1024 * 1024, "a bank whose slot arrays hold at least this many bytes is kept "
        "in a file of its own under snapshots/banks, which every snapshot in which its "
        "slots are unchanged shares: such snapshots write only its access counters "
        "(0: every bank inside each snapshot file)")
    wal_mode: str = _f(
        "fsync", "write-ahead log durability: fsync per acknowledged write (group commit), "
        "interval, or off", ("fsync", "interval", "off")
    )
    wal_interval_s: float = _f(0.1, "fsync period of the write-ahead log in interval mode")
    allow_empty_start: bool = _f(
        False, "start even though data is known to be lost (no valid snapshot, or "
        "write-ahead-log segments missing)"
    )
    index_threshold: int = _f(
        50_000, "occupied slots from which a bank builds an approximate (IVF) index that "
        "reads search instead of scanning every slot (0: never index); see docs/banks.md"
    )
    bank_codec_threshold: int = _f(
        4096, "memories a bank stages as floats (1.5 KB each at 384-d, counted in the "
        "memory limit) before it fits a codec of its own to them, as an IVF or PQ index "
        "trains on its data; smaller banks keep the served model (0: every bank does); "
        "see docs/banks.md"
    )
    index_nprobe: int = _f(
        64, "inverted lists an indexed read probes by default (a request's nprobe "
        "overrides it): more is slower and closer to the exact scan"
    )
    bm25_k1: float = _f(
        0.9, "BM25 term saturation of text recall (documents: 1.2-2; short memories: "
        "lower); see docs/agent-memory.md"
    )
    bm25_b: float = _f(
        0.4, "BM25 length normalisation of text recall, 0..1 (documents: 0.75)"
    )
    max_request_text_bytes: int = _f(
        1024 * 1024, "most UTF-8 bytes of text one request may send to be embedded (Write "
        "and Read texts together); more is refused with RESOURCE_EXHAUSTED"
    )
    torch_threads: int = _f(
        0, "intra-op threads of the model and the text embedder (0 = one per core)"
    )
    batching: bool = _f(True, "gather concurrent small requests into one model call")
    batch_max_size: int = _f(256, "largest micro-batch, in items")
    batch_max_wait_us: int = _f(500, "longest a request waits for a micro-batch to fill, us")
    read_lanes: int = _f(
        0, "reads of one bank (same parameters) that run at once before later ones batch "
        "behind them (0 = one per core the process may use)"
    )
    tls_cert: str = _f("", "PEM server certificate; enables TLS with --tls-key")
    tls_key: str = _f("", "PEM private key of the server certificate")
    tls_client_ca: str = _f("", "PEM CA bundle; when set, clients must present a certificate")
    api_keys: str = _f(
        "", "comma-separated read-write API keys (empty: no auth). A key given as a flag "
        "is visible in ps to every local user: prefer --api-keys-file or the APCM_API_KEYS "
        "environment variable"
    )
    read_only_api_keys: str = _f(
        "", "comma-separated read-only API keys (visible in ps as a flag: prefer "
        "--api-keys-file or APCM_READ_ONLY_API_KEYS)"
    )
    reflection_without_key: bool = _f(
        False, "with API keys on, answer server reflection (v1 and v1alpha) without a key; "
        "by default it needs one like every call but health Check, since it describes the "
        "whole API"
    )
    api_keys_file: str = _f(
        "", "file with one key per line, 'rw:KEY' or 'ro:KEY' (never logged); the preferred "
        "way to give keys (mode 0600)"
    )
    shutdown_grace_s: float = _f(10.0, "seconds in-flight RPCs get to finish on shutdown")
    log_level: str = _f("INFO", "logging level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    # -- cluster mode (docs/cluster.md); no --cluster: one process, local WAL, as before
    cluster: str = _f(
        "", "comma-separated nats://host:port URLs of a NATS JetStream cluster: banks are "
        "replicated through it (empty: the single-process embedded mode)"
    )
    cluster_shards: int = _f(
        16, "number of shards banks hash to (fixed for the cluster's life; many more than pods)"
    )
    cluster_replicas: int = _f(2, "pods that hold each shard: its owner and hot standbys")
    cluster_stream_replicas: int = _f(
        3, "NATS servers that store each shard's log stream, lease and snapshot (JetStream R)"
    )
    cluster_lease_s: float = _f(
        2.0, "seconds a shard owner's lease lasts unrenewed before a standby takes over"
    )
    cluster_snapshot_messages: int = _f(
        5000, "log messages after which a shard owner snapshots the shard to the object store"
    )
    node_id: str = _f(
        "", "this pod's name in the cluster (letters, digits, - and _; default: $HOSTNAME)"
    )
    advertise_address: str = _f(
        "", "host:port other pods reach this one at (default: $HOSTNAME and the gRPC port)"
    )
    forward_timeout_s: float = _f(
        30.0, "deadline of a call forwarded to another shard when the caller set none"
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by ``APCM_<FIELD>`` variables, then by ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def validated(self) -> Settings:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                value = getattr(self, f.name)
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
        for name in ("max_workers", "max_concurrent_rpcs", "max_message_bytes", "max_batch_size",
                     "max_bank_capacity", "default_bank_capacity", "batch_max_size",
                     "max_banks", "max_request_text_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_bank_capacity > self.max_bank_capacity:
            raise ValueError("default_bank_capacity exceeds max_bank_capacity")
        if self.read_lanes < 0:
            raise ValueError(f"read_lanes must be >= 0, got {self.read_lanes}")
        if self.query_cache_size < 0:
            raise ValueError(f"query_cache_size must be >= 0, got {self.query_cache_size}")
        if self.index_threshold < 0:
            raise ValueError(f"index_threshold must be >= 0, got {self.index_threshold}")
        if self.bank_codec_threshold < 0:
            raise ValueError(
                f"bank_codec_threshold must be >= 0, got {self.bank_codec_threshold}")
        if self.index_nprobe < 1:
            raise ValueError(f"index_nprobe must be >= 1, got {self.index_nprobe}")
        if not (self.bm25_k1 > 0 and 0 <= self.bm25_b <= 1):
            raise ValueError(f"bm25_k1 must be > 0 and bm25_b in [0, 1], got "
                             f"{self.bm25_k1}, {self.bm25_b}")
        if self.memory_limit_bytes < 0:
            raise ValueError(f"memory_limit_bytes must be >= 0, got {self.memory_limit_bytes}")
        if self.snapshot_bank_file_bytes < 0:
            raise ValueError("snapshot_bank_file_bytes must be >= 0, got "
                             f"{self.snapshot_bank_file_bytes}")
        if self.cluster:
            for name in ("cluster_shards", "cluster_replicas", "cluster_stream_replicas"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.cluster_lease_s <= 0:
                raise ValueError(f"cluster_lease_s must be > 0, got {self.cluster_lease_s}")
            bad = [u for u in self.cluster.split(",") if u.strip() and
                   not u.strip().startswith(("nats://", "tls://"))]
            if bad:
                raise ValueError(f"cluster takes nats://host:port URLs, got {bad[0]!r}")
            if self.node_id and not all(c.isalnum() or c in "-_" for c in self.node_id):
                raise ValueError(f"node_id may hold letters, digits, - and _ only, got "
                                 f"{self.node_id!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("cert", "key") if self.tls_cert else ("key", "cert")
            raise ValueError(f"--tls-{given} needs --tls-{missing} (TLS takes both)")
        return self

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validated()

    @property
    def effective_memory_limit_bytes(self) -> int:
        """``memory_limit_bytes``, or the default derived from the cgroup / RAM."""
        if self.memory_limit_bytes:
            return self.memory_limit_bytes
        return int(detected_memory_bytes() * MEMORY_LIMIT_FRACTION)


def env_name(field_name: str) -> str:
    return f"APCM_{field_name.upper()}"


def _parse(f: dataclasses.Field, raw: str) -> Any:
    if f.type in ("bool", bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env_name(f.name)} must be a boolean, got {raw!r}")
    if f.type in ("int", int):
        return int(raw)
    if f.type in ("float", float):
        return float(raw)
    return raw


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per settings field; help names the env variable and default."""
    for f in fields(Settings):
        flags = ["--" + f.name.replace("_", "-")]
        if f.metadata.get("alias"):
            flags.append(f.metadata["alias"])
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]"
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, dest=f.name, default=None, type=kind,
                                choices=f.metadata.get("choices"), help=help_text)


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.from_env(env, **overrides)
