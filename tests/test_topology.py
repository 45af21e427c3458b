"""The Sentinel topology fixture itself: it starts settled, fails over, and heals."""

from __future__ import annotations

from tests.topology import SentinelTopology, client, info


def test_sentinel_topology_fails_over_and_takes_the_old_primary_back(
    sentinel_topology: SentinelTopology,
) -> None:
    topo = sentinel_topology
    assert topo.url.startswith("redis+sentinel://127.0.0.1:")
    assert topo.url.endswith(f"/{topo.service}")
    first = topo.primary
    assert first is topo.nodes[0]
    with client(topo.address(first)) as c:
        c.set("k", "v")
    topo.wait_replicated()
    for replica in topo.replicas:
        with client(topo.address(replica)) as c:
            assert c.get("k") == b"v"

    killed = topo.kill_primary()
    assert not killed.running
    new = topo.wait_for_new_primary(topo.address(killed))
    assert new is not killed and new in topo.nodes
    with client(topo.address(new)) as c:
        assert c.get("k") == b"v"  # it was replicated before the kill
        c.set("k2", "v2")

    back = topo.restart(killed)
    topo.wait_ready()
    assert info(topo.address(back))["role"] == "slave"
    with client(topo.address(back)) as c:
        assert c.get("k2") == b"v2"


def test_a_restarted_sentinel_rejoins() -> None:
    with SentinelTopology(replicas=1) as topo:
        s = topo.sentinels[0]
        s.kill()
        back = topo.restart(s)
        assert back.port == s.port
        topo.wait_ready()
