"""Neighbour graph: automatic k = O(log n), regular, symmetric, connected, reproducible."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.errors import ConfigError
from lepton_ray.secagg import (
    COMPLETE_GRAPH,
    NeighbourPolicy,
    build_graph,
    choose_neighbours,
    default_threshold,
    plan_round,
)


def _connected(graph) -> bool:
    seen, todo = {graph.participants[0]}, [graph.participants[0]]
    while todo:
        for j in graph.neighbours_of(todo.pop()):
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == graph.n


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), data=st.data())
def test_graph_is_near_regular_symmetric_connected(n, data):
    k = data.draw(st.integers(2 if n > 2 else 1, n - 1))
    seed = data.draw(st.binary(min_size=32, max_size=32))
    graph = build_graph(range(100, 100 + n), k, seed)
    degrees = [len(a) for a in graph.adjacency]
    assert max(degrees) <= k + 1 and min(degrees) >= k - 2
    assert sum(1 for d in degrees if d != k) <= 2
    for p in graph.participants:
        assert p not in graph.neighbours_of(p)
        for q in graph.neighbours_of(p):
            assert p in graph.neighbours_of(q)
    assert _connected(graph)
    assert build_graph(range(100, 100 + n), k, seed) == graph  # reproducible from the seed
    assert sorted(graph.x_coordinate(p) for p in graph.participants) == list(range(1, n + 1))


def test_different_seeds_give_different_graphs():
    a = build_graph(range(50), 6, b"a" * 32)
    b = build_graph(range(50), 6, b"b" * 32)
    assert a != b
    # remembered graphs are the graphs themselves; a bytes-like seed gives the same graph
    assert build_graph(range(50), 6, b"a" * 32) == a
    assert build_graph(list(range(50))[::-1], 6, bytearray(b"a" * 32)) == a


def test_complete_graph_and_errors():
    graph = build_graph(range(5), COMPLETE_GRAPH, b"x" * 32)
    assert graph.complete and all(len(a) == 4 for a in graph.adjacency)
    assert build_graph(range(5), 99, b"x" * 32) == graph
    with pytest.raises(ConfigError, match="k=1"):
        build_graph(range(5), 1, b"x" * 32)
    with pytest.raises(ConfigError, match="at least 2"):
        build_graph([3], 1, b"x" * 32)
    with pytest.raises(ConfigError, match="neighbours"):
        build_graph(range(5), "all", b"x" * 32)


def test_choose_neighbours_grows_like_log_n():
    ks = {n: choose_neighbours(n) for n in (100, 1000, 10_000, 100_000)}
    assert ks[100] <= 20 and ks[1000] <= 24
    assert all(ks[a] <= ks[b] for a, b in ((100, 1000), (1000, 10_000), (10_000, 100_000)))
    # O(log n): a decade more parties adds a bounded number of neighbours
    assert ks[100_000] - ks[100] <= 4 * math.log2(1000)
    assert choose_neighbours(10) == 9  # small n: the complete graph
    assert choose_neighbours(100, NeighbourPolicy(dropout_rate=0.6)) == 99
    more_secure = NeighbourPolicy(corrupt_rate=0.05)
    assert choose_neighbours(100, more_secure) > choose_neighbours(100)
    with pytest.raises(ConfigError, match="dropout_rate"):
        NeighbourPolicy(dropout_rate=1.5)
    with pytest.raises(ConfigError):
        choose_neighbours(1)


def test_plan_round_defaults_and_validation():
    roster = Roster.of(IdentityKey.generate() for _ in range(30))
    config = plan_round(job_id="j", round_=2, roster=roster, dim=10, graph_seed=b"s" * 32,
                        neighbours=8)
    assert config.neighbours == 8 and config.threshold == default_threshold(8) == 5
    with pytest.raises(ConfigError, match="threshold"):
        plan_round(job_id="j", round_=2, roster=roster, dim=10, graph_seed=b"s" * 32,
                   neighbours=8, threshold=10)
    with pytest.raises(ConfigError) as err:
        plan_round(job_id="", round_=-1, roster=roster, dim=0, graph_seed=b"s" * 32,
                   modulus_bits=16)
    assert len(err.value.problems) == 4  # every problem reported at once
    with pytest.raises(ConfigError, match="not in the roster"):
        plan_round(job_id="j", round_=0, roster=roster, dim=1, graph_seed=b"s" * 32,
                   participants=[0, 1, 99])
