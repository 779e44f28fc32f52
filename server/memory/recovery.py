"""The store's state as copies (snapshots) and back, and replay of logged mutations.

Snapshots copy one bank at a time (``export_state``); replay (``apply_record``)
skips what a copy already holds, so a copy plus the log is exactly the live state.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..errors import (
    FailedPrecondition,
)
from . import bankcodec, indexing
from .bank import MemoryBank
from .codecstage import OwnCodec
from .export import export_copy, export_counters, from_export
from .metadata import decode_metadata
from .storebase import StoreBase, StoreState


class StoreRecovery(StoreBase):
    """Copies of the whole store and their replay (see the module docstring)."""

    def export_state(self, earlier: dict[str, tuple[int, int, int]] | None = None
                     ) -> StoreState:
        """A copy of every bank that, with the log after ``last_seq``, is the live state.

        Banks are copied one at a time under their own lock (see the module
        docstring), so a snapshot never stalls the banks it is not copying.

        Args:
            earlier: stamps of an earlier copy the caller still has (a snapshot file).
                A bank whose slots are unchanged since (same identity and version) is
                copied without its slot arrays: only its config, and its access
                counters if reads changed them; it is listed in ``partial``.
        """
        with self.lock, self.seq_lock:
            banks, last_seq = sorted(self._banks.items()), self.last_seq
        copies: list[tuple[str, Any, list[int] | None]] = []
        stamps, partial = {}, set()
        for name, bank in banks:
            # a bank dropped since is still copied whole: its drop record follows S
            with bank.lock:
                stamp = bank.stamp()
                old = (earlier or {}).get(name)
                if old is not None and old[:2] == stamp[:2]:
                    # unchanged slots, so unchanged text marks: both come from the file
                    copies.append((name, export_counters(bank, old[2] != stamp[2]), None))
                    partial.add(name)
                else:
                    copies.append((name, export_copy(bank), self.texts.of(bank).text_slots()))
            stamps[name] = stamp
        out = {}
        for name, copy, text_slots in copies:
            config, arrays = copy.pack()
            if text_slots is not None:
                # slot arrays end at the last occupied slot; text slots are occupied
                flags = np.zeros(len(arrays["occupied"]), dtype=np.uint8)
                flags[text_slots] = 1
                arrays = {**arrays, "text_flags": flags}
            out[name] = (config, arrays)
        return StoreState(last_seq, out, stamps, partial)

    def stamps(self) -> dict[str, tuple[int, int, int]]:
        """``MemoryBank.stamp()`` of every bank (no locks: a change in flight may be
        missed, never invented)."""
        return {name: bank.stamp() for name, bank in self._banks.items()}

    def load_state(self, state: StoreState, adopt_arrays: bool = False
                   ) -> dict[str, tuple[int, int, int]]:
        """Replaces every bank with ``state`` (restore / recovery); returns the stamps
        of the banks as loaded, before anything changed them.

        ``adopt_arrays``: the state's arrays are the caller's to give away (read from a
        file for this load only), so writable ones become the banks' storage uncopied.

        ``last_seq`` becomes the larger of the current and the state's, so sequence
        numbers stay monotonic across a restore. Writers that were waiting for a
        replaced bank's lock retry on the new bank.

        Raises:
            FailedPrecondition: the state's codes do not match this store's codec.
        """
        banks = {}
        for name, (config, arrays) in state.banks.items():
            if int(config["code_dim"]) != self.code_dim or config["code_dtype"] != self.code_dtype:
                raise FailedPrecondition(
                    f"bank {name!r} holds {config['code_dtype']} codes of dim "
                    f"{config['code_dim']}; the served codec uses {self.code_dtype} of dim "
                    f"{self.code_dim}")
            banks[name] = from_export(
                config, arrays, scale=self.scale, device=self.device,
                max_payload_bytes=self.max_payload_bytes, max_key_length=self.max_key_length,
                metric=self.metric, scorer=self.scorer, index_config=self.index_config,
                adopt_arrays=adopt_arrays, fitter=self.fitter)
            self.start_staging(banks[name], arrays)
            self.texts.load(banks[name], arrays.get("text_flags"))  # older: derived
        with self._all_locked() as old, self.seq_lock:
            for _, bank in old:
                bank.retired = True
            self._banks = banks
            # never backwards: mutations that finished while this waited for their bank
            # locks used numbers above a last_seq the caller may have read earlier
            self.last_seq = max(self.last_seq, int(state.last_seq))
            loaded = {name: bank.stamp() for name, bank in banks.items()}
        for bank in banks.values():  # banks restored without a stored index
            with bank.lock:
                indexing.maybe_start(bank, self.index_built)
        return loaded

    def apply_record(self, seq: int, kind: str, bank: str, fields: dict[str, Any]) -> None:
        """Re-applies one logged mutation (WAL replay): deterministic, never logged.

        Records the state already reflects are skipped: those with ``seq <= last_seq``
        (the snapshot's sequence) and those a bank's own copy holds
        (``seq <= bank.applied_seq``), so replaying a log over a snapshot that
        overlaps it is safe.

        Raises:
            FailedPrecondition: the record does not fit the current state (corrupt log).
        """
        with self.lock:
            if seq <= self.last_seq:
                return
            if kind == "create_bank":
                if bank in self._banks:
                    raise FailedPrecondition(f"replay: bank {bank!r} already exists")
                new = self._new_bank(
                    bank, int(fields["capacity"]), str(fields["policy"]),
                    float(fields["half_life"]) or self.default_half_life)
                new.context = int(fields.get("context", 0))  # absent from older records
                new.applied_seq = seq
                self._banks = {**self._banks, bank: new}
                with self.seq_lock:
                    self.last_seq = seq
                return
            if kind not in ("drop_bank", "write", "delete", "clear", "metadata", "codec"):
                raise FailedPrecondition(f"replay: unknown record kind {kind!r}")
            b = self._banks.get(bank)
            if b is None:
                raise FailedPrecondition(f"replay: {kind} on missing bank {bank!r}")
        # the bank lock is taken with no store lock held (the documented order)
        with b.lock:
            applied = seq > b.applied_seq
            if applied:
                self._replay(b, kind, fields)
                b.applied_seq = seq
            with self.lock, self.seq_lock:
                if applied and kind == "drop_bank":
                    self._banks = {n: x for n, x in self._banks.items() if n != bank}
                    b.retired = True
                self.last_seq = max(self.last_seq, seq)

    def _replay(self, b: MemoryBank, kind: str, fields: dict[str, Any]) -> None:
        if kind == "write":
            sequences = np.asarray(fields["sequences"], dtype=np.int64)
            # a merged run of write records may start inside what the bank's copy holds
            new = np.flatnonzero(sequences > b.applied_seq)
            if new.size == 0:
                return
            codes = torch.from_numpy(np.array(fields["codes"])[new])  # copy: may be read-only
            if codes.dtype != b.torch_dtype or tuple(codes.shape[1:]) != (b.code_dim,):
                raise FailedPrecondition("replay: write record codes do not match the bank")
            keys, payloads = fields["keys"], fields["payloads"]
            metas = fields.get("metadata")
            slots = [int(fields["slots"][i]) for i in new]
            kept = [bytes(payloads[i]) or None for i in new]
            b.apply_write(slots, codes, [keys[i] or None for i in new], kept,
                          sequences[new].tolist(),
                          [decode_metadata(metas[i]) for i in new] if metas else None)
            text = fields.get("text")  # absent from older records
            self.texts.written(b, slots, kept,
                               [bool(text[i]) for i in new] if text is not None else None)
            items = fields.get("items")  # staged for the bank's own codec
            if items is not None and b.staging is not None:
                # the record's items each staged one (a merged run says which)
                rows = np.asarray(fields.get("item_rows", np.arange(len(items))))
                where = {int(p): j for j, p in enumerate(new)}
                keep = [i for i, p in enumerate(rows.tolist()) if p in where]
                b.staging.add([slots[where[int(rows[i])]] for i in keep],
                              sequences[rows[keep]].tolist(), np.asarray(items)[keep])
            indexing.maybe_start(b, self.index_built)
        elif kind == "codec":
            self._replay_codec(b, fields)
        elif kind == "delete":
            freed = [int(s) for s in fields["slots"]]
            b.free(freed)
            self.texts.of(b).remove(freed)
        elif kind == "clear":
            b.clear()
            self.texts.of(b).clear()
        elif kind == "metadata":
            for slot, raw in zip(fields["slots"], fields["metadata"], strict=True):
                b.replace_metadata(int(slot), decode_metadata(bytes(raw)))

    def _replay_codec(self, b: MemoryBank, fields: dict[str, Any]) -> None:
        if self.fitter is None:
            raise FailedPrecondition(
                f"replay: bank {b.name!r} has a codec of its own, but this server fits "
                "none (serve the model it was written with, bank codecs on)")
        arrays = {k[len("codec."):]: np.asarray(v) for k, v in fields.items()
                  if k.startswith("codec.")}
        codec = self.fitter.load(json.loads(str(fields["config"])), arrays)
        own = OwnCodec(codec, int(fields["fitted_on"]), float(fields["fitted_at"]),
                       float(fields.get("held_out_mse", 0.0)),
                       float(fields.get("replaced_mse", 0.0)))
        codes = torch.from_numpy(np.array(fields["codes"]))
        if codes.dtype != b.torch_dtype or tuple(codes.shape[1:]) != (b.code_dim,):
            raise FailedPrecondition("replay: codec record codes do not match the bank")
        try:
            bankcodec.install(b, own, np.asarray(fields["slots"], dtype=np.int64), codes)
        except ValueError as e:
            raise FailedPrecondition(f"replay: codec record of bank {b.name!r}: {e}") from e
        self.start_staging(b)
        indexing.maybe_start(b, self.index_built)

    # defined last: inside the class body, the name ``list`` shadows the builtin
