"""Banks sharded over several servers (a Kubernetes StatefulSet), at the gRPC edge.

- ``placement``: which shard owns a bank (rendezvous hashing over blake2b) and
  the shard map from settings (peer list or pattern, ordinal from $HOSTNAME).
- ``router``: a server interceptor that forwards bank-scoped calls to the owner
  as raw bytes and fans ListBanks and snapshot calls out to every shard.
- ``gates``: pauses a bank's writes while it moves; hides a bank being imported.
- ``transfer`` and ``servicer``: ``apcm.v1.ClusterService`` (shard map, bank
  export / import / move).
- ``rebalance``: ``apcm cluster rebalance``, moving every misplaced bank.

Sits beside ``api`` (imports ``rpc``, ``domain`` and ``persistence.bankfile``, never
``api``; nothing imports it but ``api.app``). Membership comes from Kubernetes: no
gossip, no consensus.
"""
