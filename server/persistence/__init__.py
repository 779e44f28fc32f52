"""Durability: safetensors snapshots of every bank and a write-ahead log of mutations.

``wal`` appends every acknowledged mutation (group commit) to the segment files
of ``walsegments``, which ``walreplay`` reads back at start-up; ``snapshot`` writes
and verifies checksummed safetensors files, and ``manager`` ties them to the
store: start-up recovery (``recovery``), periodic and on-demand snapshots
(``snapshotting``), restore, shutdown.
"""
