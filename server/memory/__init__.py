"""Memory banks: slots of codes with counters (``bank``), every bank of a server
with its lock order and sequence numbers (``store``), eviction policies and names.

May import torch, numpy and the shared modules; never ``codecs``, grpc or
``apcm.v1``.
"""
