"""The memory domain behind the RPCs: ``MemoryService`` (validation, pooling,
batching, device placement, request limits) and ``Engine`` (codec calls).

May import ``memory``, ``persistence``, ``codecs`` and the shared modules;
never grpc or ``apcm.v1``.
"""
