"""ApCM server. Layers, outermost first; a layer imports only the ones below it:

- ``api``: the gRPC edge (servicer, interceptors, auth, TLS, server lifecycle).
  Translates proto <-> domain objects and maps domain errors to status codes.
- ``rpc``: what ``api`` and ``cluster`` share (the one errors -> status mapping,
  the domain -> proto conversions both send), so neither imports the other.
- ``domain``: ``MemoryService``, the one place requests are validated, pooled,
  batched, placed on the device and bounded; ``Engine`` runs the codec.
- ``memory``: banks, the store of banks, eviction policies, names.
- ``persistence``: write-ahead log, snapshots, recovery (imports ``memory``).
- ``codecs``: the served codecs and their file format (never imports grpc).
- ``embedding``: the text embedder a text model is bound to (loaded lazily).
- ``cluster``: cluster mode on NATS JetStream (shard streams, leases, replicas,
  forwarding); beside ``api`` (above ``rpc``), imported only by ``api.app``, which
  hands the node to the domain (``domain.stores.Replication``).

Shared by every layer: ``config``, ``errors``, ``metrics``, ``fsutil``.
``tests/test_layering.py`` holds this order as one table (``LAYERS``) and checks
every import against it, with no cycle between modules or packages.
"""
