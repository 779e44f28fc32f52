"""The gRPC edge: server lifecycle, servicer, interceptors, auth and TLS.

Owns: proto <-> domain translation and status codes. May import ``rpc``, ``domain``
(and, for building the server, ``codecs.base.load_codec`` and ``cluster.node``),
``wire``, ``apcm.v1`` and the shared modules; never ``memory`` or ``persistence``
directly.
"""
