"""Placement, shard-map settings and the router's field reader, without servers."""

from __future__ import annotations

import numpy as np
import pytest

from apcm.server.cluster.placement import ClusterConfig, ordinal_of, owner_of
from apcm.server.cluster.router import bank_fields
from apcm.server.cluster.wire import string_field
from apcm.server.config import Settings
from apcm.v1 import memory_pb2
from apcm.wire.tensors import to_proto

NAMES = [f"bank-{i}" for i in range(20_000)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_growing_n_to_n_plus_1_moves_about_one_in_n_plus_1_and_only_to_the_new_shard(
        n: int) -> None:
    before = [owner_of(b, n) for b in NAMES]
    after = [owner_of(b, n + 1) for b in NAMES]
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(b == n for _, b in moved), "a bank moved between two old shards"
    fraction = len(moved) / len(NAMES)
    # binomial(20000, 1/(n+1)): 5 standard deviations is under 0.018 for every n here
    assert abs(fraction - 1 / (n + 1)) < 0.02, fraction


def test_placement_is_balanced_and_stable() -> None:
    counts = np.bincount([owner_of(b, 4) for b in NAMES], minlength=4)
    assert counts.min() > 0.23 * len(NAMES), counts
    # fixed function of the name: the same on every server and across versions
    assert [owner_of(f"bank-{i}", 3) for i in range(8)] == \
        [owner_of(f"bank-{i}", 3) for i in range(8)]
    assert owner_of("anything", 1) == 0


def test_ordinal_from_hostname() -> None:
    assert ordinal_of("apcm-2") == 2
    assert ordinal_of("apcm-12.apcm-headless.ns.svc.cluster.local") == 12
    assert ordinal_of("laptop") is None


def test_cluster_config_from_settings() -> None:
    assert ClusterConfig.from_settings(Settings(), env={}) is None  # single server as before
    c = ClusterConfig.from_settings(Settings(peers="a:1, b:2,c:3"), env={"HOSTNAME": "apcm-1"})
    assert c is not None and c.shard_id == 1 and c.peers == ("a:1", "b:2", "c:3")
    assert c.describe(2) == "shard 2 (c:3)"
    c = ClusterConfig.from_settings(
        Settings(shard_count=3, peer_pattern="apcm-{i}.apcm-headless:50051", shard_id=0), env={})
    assert c is not None and c.peers[2] == "apcm-2.apcm-headless:50051"
    env = Settings.from_env({"APCM_PEERS": "x:1,y:2", "APCM_SHARD_ID": "1",
                             "APCM_PREVIOUS_SHARD_COUNT": "1"})
    c = ClusterConfig.from_settings(env, env={})
    assert c is not None and c.shard_id == 1 and c.previous_shard_count == 1
    moved = next(b for b in NAMES if owner_of(b, 2) == 1)
    assert c.previous_owner(moved) == 0 and c.previous_owner(
        next(b for b in NAMES if owner_of(b, 2) == 0)) is None
    for bad in (dict(peers="a:1", shard_id=1), dict(peers="a:1,b:2", shard_count=3, shard_id=0),
                dict(shard_count=2, shard_id=0), dict(peers="a:1")):
        with pytest.raises(ValueError):
            ClusterConfig.from_settings(Settings(**bad), env={"HOSTNAME": "laptop"})


def test_a_shrinking_cluster_keeps_the_draining_pods_as_peers() -> None:
    pattern = "apcm-{i}.apcm-headless:50051"
    c = ClusterConfig.from_settings(
        Settings(shard_count=3, previous_shard_count=4, peer_pattern=pattern, shard_id=3), env={})
    assert c is not None and (c.shard_count, c.pods, c.draining) == (3, 4, True)
    assert c.peers[3] == "apcm-3.apcm-headless:50051"
    # banks are placed over the 3 remaining shards; pod 3's old ones have it as previous owner
    leaving = [b for b in NAMES if owner_of(b, 4) == 3]
    assert {c.owner(b) for b in NAMES} == {0, 1, 2}
    assert all(c.previous_owner(b) == 3 for b in leaving)
    same = ClusterConfig.from_settings(Settings(peers=",".join(c.peers), shard_count=3,
                                                previous_shard_count=4, shard_id=0), env={})
    assert same is not None and (same.shard_count, same.pods) == (3, 4)
    # extra peers only while shrinking from exactly that many
    with pytest.raises(ValueError, match="shrinking"):
        ClusterConfig.from_settings(Settings(peers="a:1,b:2,c:3", shard_count=2, shard_id=0),
                                    env={})


def test_bank_field_lookup_is_generic_by_method() -> None:
    fields = bank_fields()
    assert set(fields) == {"Write", "Read", "CreateBank", "DescribeBank", "DeleteSlots",
                           "ClearBank", "DropBank"}
    # a request's bank is found in its bytes without decoding the tensors
    x = np.random.default_rng(0).standard_normal((64, 8, 8)).astype(np.float32)
    raw = memory_pb2.WriteRequest(bank="notes", inputs=to_proto(x), keys=["a"] * 64,
                                  payloads=[b"p"] * 64).SerializeToString()
    assert string_field(raw, fields["Write"]) == "notes"
    raw = memory_pb2.CreateBankRequest(name="n", capacity=5, exist_ok=True).SerializeToString()
    assert string_field(raw, fields["CreateBank"]) == "n"
    assert string_field(memory_pb2.ReadRequest().SerializeToString(), fields["Read"]) is None
    assert string_field(b"\xff\xff\xff", 1) is None  # garbage: the deserializer reports it
