"""Durability: safetensors snapshots of every bank and a write-ahead log of mutations.

``wal`` appends every acknowledged mutation (group commit), ``snapshot`` writes
and verifies checksummed safetensors files, and ``manager`` ties them to the
store: start-up recovery, periodic and on-demand snapshots, restore, shutdown.
"""
