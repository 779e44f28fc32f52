"""Cluster mode: banks replicated over pods through NATS JetStream (``--cluster``).

- ``natslink``: the one NATS connection (asyncio in a thread), streams and buckets.
- ``shardmap``: members, leases, rendezvous ranking: who should hold and own a shard.
- ``shardlog``: the owner's fenced, group-committed log appends (a ``MutationLog``).
- ``replica``: one shard's store, kept in step with its stream; promote / demote.
- ``snapshots``: shard snapshots in the object store; the stream trimmed below them.
- ``shardstore``: the service's store: each bank's shard's store.
- ``node``: the control loop (heartbeats, leases, hand-over, failover, snapshots).
- ``router`` and ``servicer``: the gRPC edge (forwarding, fan-out, ``GetClusterInfo``).

Sits beside ``api`` (imports ``rpc``, ``memory``, ``persistence``, never ``api``
or ``domain``; ``api.app`` builds the node and hands it to the service).
Consensus, replication and failover of the logs are JetStream's (Raft); this
package only decides which pod applies and appends to which stream.
"""
