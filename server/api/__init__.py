"""The gRPC edge: server lifecycle, servicer, interceptors, auth and TLS.

Owns: proto <-> domain translation and status codes. May import ``domain``
(and, for building the server, ``codecs.base.load_codec``), ``wire``, ``apcm.v1``
and the shared modules; never ``memory`` or ``persistence`` directly.
"""
