"""A bank's state as plain arrays and back: snapshots, moves and restores.

``export_copy`` copies what a snapshot needs under the bank lock (memcpy and arena
views); ``BankCopy.pack`` turns it into (config, numpy arrays) outside the lock;
``from_export`` rebuilds a bank from them, checking every array's shape and dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FailedPrecondition
from . import indexing
from .bank import MemoryBank
from .codecstage import CodecFitter, OwnCodec
from .columns import ByteColumn
from .eviction import make_policy
from .ivf import IndexConfig, InvertedLists, IvfIndex
from .scoring import WIRE_LAYOUT, CodeScorer
from .slots import SLOT_TENSORS

log = logging.getLogger(__name__)


def export(bank: MemoryBank) -> tuple[dict, dict[str, np.ndarray]]:
    """A consistent copy as (config, arrays) of plain Python / numpy values (bank
    lock held exclusively)."""
    return export_copy(bank).pack()


def _config(bank: MemoryBank) -> dict[str, Any]:
    return {
        "name": bank.name, "capacity": bank.capacity, "policy": bank.policy.name,
        "half_life": bank.policy.half_life, "code_dim": bank.code_dim,
        "code_dtype": bank.code_dtype, "evictions_total": bank.evictions_total,
        "writes_total": bank.writes_total, "reads_total": bank.reads_total,
        "write_clock": bank.write_clock, "applied_seq": bank.applied_seq,
        "context": bank.context, "code_layout": bank.code_layout,
        **_codec_config(bank),
    }


def _codec_config(bank: MemoryBank) -> dict[str, Any]:
    own = bank.own_codec
    if own is None:  # absent: the served model's codes (older snapshots too)
        return {}
    return {"codec": {"config": own.codec.state()[0], "fitted_on": own.fitted_on,
                      "fitted_at": own.fitted_at, "held_out_mse": own.held_out_mse,
                      "replaced_mse": own.replaced_mse, "generation": bank.codec_generation,
                      "declined": bank.codec_declined}}


def _codec_arrays(bank: MemoryBank) -> dict[str, np.ndarray]:
    """The bank's own codec's arrays (``codec.*``) and its staged items (``staged_*``)."""
    out = {}
    if bank.own_codec is not None:
        out = {f"codec.{k}": v for k, v in bank.own_codec.codec.state()[1].items()}
    if bank.staging is not None:
        out.update(bank.staging.export(bank.occupied, bank.sequences))
    return out


def export_copy(bank: MemoryBank, frozen: bool = False) -> BankCopy:
    """What ``export`` needs, copied under the bank lock (held exclusively): the
    per-slot tensors up to the last occupied slot (memcpy), and views of the key,
    payload and metadata arenas (compacted first if they hold dead bytes).

    ``frozen``: the caller keeps every mutation of the bank out until it is done
    with the copy (a move pauses its writes), so only the access counters, which
    reads change, are copied; the other tensors are views.
    """
    config = _config(bank)
    n = _slot_end(bank)
    tensors = {name: getattr(bank, name)[:n].cpu() for name in SLOT_TENSORS}
    for name in tensors:
        if not frozen or name in ("counts", "count_clock"):
            tensors[name] = tensors[name].clone()
    tensors["occupied"] = tensors["occupied"].to(torch.uint8)
    if bank.index is not None:  # optional arrays: older readers ignore them
        config["ivf_trained_at"] = bank.index.trained_at
        tensors["ivf_centroids"] = bank.index.centroids.cpu().clone()
        tensors["ivf_assign"] = torch.from_numpy(bank.index.lists.assign[:n].copy())
    for name, array in _codec_arrays(bank).items():
        tensors[name] = torch.from_numpy(np.array(array))
    columns = {prefix: col.packed(n) for prefix, col in (
        ("payload", bank.payloads), ("key", bank.keys), ("metadata", bank.metadata))}
    return BankCopy(config, tensors, columns)


def _slot_end(bank: MemoryBank) -> int:
    """One past the last occupied slot (numpy: torch.nonzero lists every slot)."""
    occupied = bank.occupied[:bank.high].cpu().numpy()
    return int(occupied.size - np.argmax(occupied[::-1])) if occupied.any() else 0


def export_counters(bank: MemoryBank, counters: bool) -> BankCopy:
    """Like ``export_copy`` for a bank whose slots have not changed since an earlier
    copy: only the config and (if ``counters``) the access counters."""
    config = _config(bank)
    tensors = {}
    if counters:
        occupied = torch.nonzero(bank.occupied).flatten()
        n = int(occupied[-1]) + 1 if occupied.numel() else 0
        tensors = {name: getattr(bank, name)[:n].cpu().clone()
                   for name in ("counts", "count_clock")}
    return BankCopy(config, tensors, {})


def from_export(
    config: dict,
    arrays: dict[str, np.ndarray],
    *,
    scale: torch.Tensor | None,
    device: torch.device,
    max_payload_bytes: int,
    max_key_length: int,
    metric: torch.Tensor | None = None,
    scorer: CodeScorer | None = None,
    adopt_arrays: bool = False,
    index_config: IndexConfig | None = None,
    fitter: CodecFitter | None = None,
) -> MemoryBank:
    """Rebuilds a bank from ``export()`` output (e.g. a snapshot).

    An index stored with it (``ivf_*`` arrays) is loaded (see ``_stored_index``);
    without one, a bank above the index threshold is indexed once the caller
    starts it (``indexing.maybe_start``).

    Arrays cover slots ``[0, n)`` with ``n <= capacity`` (older snapshots: all of
    ``capacity``); trailing free slots are not kept, later writes grow the bank.
    ``adopt_arrays``: the arrays are the caller's to give away (a bank received
    in a move): writable ones of the right dtype become the bank's storage
    without a copy. A bank with a codec of its own (``codec`` in the config) needs
    ``fitter`` to load it; staged items (``staged_*``) are the caller's to restore.
    """
    own = _own_codec(config, arrays, fitter)
    if own is not None:
        scorer = own.codec.scorer
    capacity = int(config["capacity"])
    policy = make_policy(str(config["policy"]), float(config["half_life"]))
    bank = MemoryBank(str(config["name"]), capacity, code_dim=int(config["code_dim"]),
                      code_dtype=str(config["code_dtype"]), scale=scale, device=device,
                      policy=policy, max_payload_bytes=max_payload_bytes,
                      max_key_length=max_key_length, metric=metric, scorer=scorer,
                      index_config=index_config)
    bank.context = int(config.get("context", 0))  # absent from older snapshots
    if own is not None:
        bank.own_codec = own
        bank.codec_generation = int(config["codec"].get("generation", 1))
        bank.codec_declined = int(config["codec"].get("declined", 0))
    for name in ("occupied", "payload_data", "key_data"):
        if name not in arrays:
            raise FailedPrecondition(f"bank {bank.name!r}: array {name} is missing")
    n = int(arrays["occupied"].shape[0])
    if n > capacity:
        raise FailedPrecondition(f"bank {bank.name!r}: {n} slots exceed its capacity "
                                 f"{capacity}")
    expected: dict[str, tuple[int, ...]] = {"codes": (n, bank.code_dim)}
    for name in ("occupied", "counts", "count_clock", "sequences", "inv_norms"):
        expected[name] = (n,)
    for name in ("payload_offsets", "key_offsets"):
        expected[name] = (n + 1,)
    if "metadata_data" in arrays and "metadata_offsets" in arrays:  # older: none
        expected["metadata_offsets"] = (n + 1,)
    for name, shape in expected.items():
        if name not in arrays:
            raise FailedPrecondition(f"bank {bank.name!r}: array {name} is missing")
        if tuple(arrays[name].shape) != shape:
            raise FailedPrecondition(
                f"bank {bank.name!r}: array {name} has shape {arrays[name].shape}, "
                f"expected {shape}")
    if arrays["codes"].dtype != np.dtype(bank.code_dtype):
        raise FailedPrecondition(
            f"bank {bank.name!r}: codes are {arrays['codes'].dtype}, expected "
            f"{bank.code_dtype}")
    occupied = np.flatnonzero(arrays["occupied"])
    keep = int(occupied[-1]) + 1 if occupied.size else 0  # trailing free slots go
    dtypes = {"occupied": bool, "counts": np.float64, "count_clock": np.int64,
              "sequences": np.int64, "inv_norms": np.float32}
    fits = keep <= bank.rows
    for name in SLOT_TENSORS:
        # np.array copies: snapshot arrays may be read-only views of a mapped file
        src = arrays[name][:keep]
        if not (adopt_arrays and src.flags.writeable and src.flags.aligned
                and src.dtype == np.dtype(dtypes.get(name, src.dtype))):
            src = np.array(src, dtype=dtypes.get(name))
        t = torch.from_numpy(src).to(device=bank.device)
        if name == "codes":
            # absent from snapshots older than stored layouts: those hold wire codes
            t = bank.stored_codes(t.to(bank.torch_dtype),
                                  str(config.get("code_layout", WIRE_LAYOUT)))
        if fits:
            getattr(bank, name)[:keep] = t
        else:
            setattr(bank, name, t)
    rows = bank.rows
    metadata = None
    if "metadata_offsets" in expected:
        metadata = ByteColumn.from_packed(arrays["metadata_data"],
                                          arrays["metadata_offsets"][:keep + 1], rows)
    bank.restore_columns(
        ByteColumn.from_packed(arrays["key_data"], arrays["key_offsets"][:keep + 1], rows),
        ByteColumn.from_packed(arrays["payload_data"], arrays["payload_offsets"][:keep + 1],
                               rows),
        metadata, occupied=int(occupied.size), high=keep)
    bank.index = _stored_index(bank, config, arrays, occupied, keep)
    for attr in ("evictions_total", "writes_total", "reads_total", "write_clock"):
        setattr(bank, attr, int(config[attr]))
    # snapshots older than per-bank sequences were consistent at one store-wide
    # sequence, which the store's replay rule already covers
    bank.applied_seq = int(config.get("applied_seq", 0))
    return bank


def _own_codec(config: dict, arrays: dict[str, np.ndarray],
               fitter: CodecFitter | None) -> OwnCodec | None:
    spec = config.get("codec")
    if spec is None:
        return None
    name = config.get("name")
    if fitter is None:
        raise FailedPrecondition(
            f"bank {name!r} has a codec of its own, but this server fits none (serve it "
            "with bank codecs on)")
    tensors = {k[len("codec."):]: v for k, v in arrays.items() if k.startswith("codec.")}
    try:
        codec = fitter.load(dict(spec["config"]), tensors)
        return OwnCodec(codec, int(spec["fitted_on"]), float(spec["fitted_at"]),
                        float(spec.get("held_out_mse", 0.0)),
                        float(spec.get("replaced_mse", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"bank {name!r}: its own codec does not load: {e}") from e


def _stored_index(bank: MemoryBank, config: dict, arrays: dict[str, np.ndarray],
                  occupied: np.ndarray, keep: int) -> IvfIndex | None:
    """The index a snapshot holds, if any (occupied: the occupied slot ids; the bank's
    slots are loaded). Centroids that do not fit the bank's search space are dropped,
    not an error: the bank is re-indexed from its codes in the background. Lists that
    do not match the slots are rebuilt from the centroids, each slot to its nearest
    one: seconds where k-means would take minutes, and reads stay indexed."""
    centroids = arrays.get("ivf_centroids")
    if centroids is None or "ivf_trained_at" not in config:
        return None
    d = bank.scorer.search_dim if bank.scorer is not None else bank.code_dim
    if centroids.ndim != 2 or centroids.shape[1] != d or centroids.shape[0] < 1:
        log.warning("bank %r: stored index centroids of shape %s do not fit search rows of "
                    "%d dims; it is re-indexed", bank.name, tuple(centroids.shape), d)
        return None
    k = int(centroids.shape[0])
    c = torch.from_numpy(np.array(centroids, dtype=np.float32))
    assign = _stored_assignment(arrays.get("ivf_assign"), k, occupied, keep)
    if assign is None:
        log.info("bank %r: stored index lists do not match its slots; assigning %d slots "
                 "to the stored %d centroids", bank.name, occupied.size, k)
        assign = indexing.assign_slots(bank, bank.codes[:keep], bank.inv_norms[:keep],
                                       occupied, c)
    lists = InvertedLists.from_assignment(assign, k, bank.rows)
    return IvfIndex(c, lists, int(config["ivf_trained_at"]))


def _stored_assignment(assign: np.ndarray | None, k: int, occupied: np.ndarray,
                       keep: int) -> np.ndarray | None:
    """A stored per-slot list assignment as int32 [keep] if it lists exactly the
    occupied slots, each in one of ``k`` lists; else None."""
    if assign is None or assign.ndim != 1 or assign.shape[0] < keep:
        return None
    assign = np.array(assign[:keep], dtype=np.int32)
    listed = np.flatnonzero(assign >= 0)
    if assign.size and (int(assign.max()) >= k or not np.array_equal(listed, occupied)):
        return None
    return assign


@dataclass
class BankCopy:
    """A bank's state copied under its lock: per-slot tensors [n] and, per column
    ("payload", "key", "metadata"), (uint8 data, int64 offsets [n + 1])."""

    config: dict
    tensors: dict[str, torch.Tensor]
    columns: dict[str, tuple[np.ndarray, np.ndarray]]

    def pack(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays = {name: t.numpy() for name, t in self.tensors.items()}
        for prefix, (data, offsets) in self.columns.items():
            arrays[f"{prefix}_data"], arrays[f"{prefix}_offsets"] = data, offsets
        return self.config, arrays
