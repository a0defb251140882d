"""The SecAgg+ neighbour graph and the automatic choice of its degree k.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS,
§3-4) replace the complete graph of Bonawitz et al. 2017 by a random sparse graph: a party
masks with, and secret-shares to, only its k neighbours, and k = O(log n) suffices for the
same guarantees with high probability. The complete graph (k = n - 1) is classic SecAgg.

**Graph.** A random k-regular graph on the round's participants, derived deterministically
from a public per-round seed (:class:`~lepton_ray.crypto.prg.PublicRandom`), so every party and
the server build the same one with no communication. For k <= (n-1)/2 it is a random
Hamiltonian cycle (connected by construction) plus a random (k-2)-regular graph sampled by the
pairing method of Steger & Wormald 1999 ("Generating random regular graphs quickly"); for
larger k it is the complement of a random (n-1-k)-regular graph (minimum degree >= (n-1)/2,
hence connected). When n*k is odd, or the pairing gets stuck, a few parties have degree k-1
("near-regular").

**Threshold against a malicious server** (:func:`secure_threshold`). A party's secrets are
shared among its *neighbourhood*: its k neighbours plus itself, k + 1 holders. Every honest
holder reveals, for each owner, the share of its self-mask seed *or* of its recovery key,
never both, according to the survivor set it was shown; a corrupt holder reveals both. An
actively malicious server that shows different survivor sets to different holders ("split
view", Bonawitz et al. 2017 §4 and Thm 6.5; Bell et al. 2020 §4) gets both secrets of a victim
(its input then falls out of its masked input) iff h1 + c >= t and h2 + c >= t, where c is the
number of corrupt holders and h1 + h2 <= k + 1 - c the honest ones split between the two
views. So both cannot happen iff

    2t > k + 1 + c,   i.e.   t = floor((k + 1 + c) / 2) + 1,

which also gives t > c (the coalition alone never holds t shares). With c = 0 this is
t = floor((k+1)/2) + 1: for odd k one more than the semi-honest majority k//2 + 1 (with that
threshold and odd k, (k+1)/2 holders on each side unmasked the victim). The consistency
round (signed survivor sets, :mod:`lepton_ray.secagg.party`) is a second, independent layer:
an honest holder reveals nothing unless t of its neighbourhood signed the same survivor set.
c is bounded per neighbourhood by :func:`corrupt_neighbour_bound`: with a fraction gamma of
corrupt parties (``secure_aggregation.corrupt_fraction``), the smallest c with
n * P[Bin(k, gamma) > c] <= 2^-sigma (union bound over the n neighbourhoods; Bell et al.
Lemma 4.5 assume, as we do, that corruption is fixed before the graph seed is known).

**Choice of k** (:func:`choose_neighbours`). With dropout rate delta, corrupt fraction gamma,
statistical security sigma and correctness eta (bits), k is the smallest value with
t = :func:`secure_threshold` (k, c) such that, by union bounds over the n parties with exact
binomial tails:

1. secrecy (sigma): c is the bound above, so 2t > k + 1 + c holds for every neighbourhood;
2. no isolation (sigma): n * (delta + gamma)^k <= 2^-sigma - no honest survivor loses every
   neighbour (Bell et al. §4, connectivity lemma);
3. correctness (eta): n(1-delta) P[Bin(k, delta+gamma) >= k-t+2] + n delta P[Bin(k,
   delta+gamma) >= k-t+1] <= 2^-eta - every survivor keeps t live honest holders of its
   self-mask seed (its own share included) and every dropped party keeps t of its recovery
   key (corrupt holders may withhold shares, so they count as lost).

Defaults (delta = 0.1, gamma = 0, sigma = 40, eta = 10) give k = 18 at n = 100, 22 at
n = 1000, 26 at n = 10^4. gamma = 0 is a malicious server colluding with no party; gamma =
0.01 gives k = 41 at n = 100 and 56 at n = 10^4 (2x the masking work). If no k < n - 1 meets
the bounds (small n, or delta + gamma near 1/2) the complete graph is used, with
t = floor((n + c) / 2) + 1 (Bonawitz et al.'s t > 2n/3 for c < n/3 is the same inequality).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property, lru_cache

from lepton_ray.crypto.prg import PublicRandom
from lepton_ray.errors import ConfigError

MIN_SPARSE_DEGREE = 2
_MAX_RESTARTS = 200


class GraphTopology(Enum):
    """Ask for a topology by name instead of a degree."""

    COMPLETE = "complete"


COMPLETE_GRAPH = GraphTopology.COMPLETE
"""Pass as ``neighbours=`` to get the complete graph (classic SecAgg, k = n - 1)."""


def secure_threshold(neighbours: int, corrupt: int = 0) -> int:
    """The smallest t with 2t > k + 1 + c (see the module docstring): no split view of the
    survivor set gives a malicious server both secrets of one party."""
    return (neighbours + 1 + corrupt) // 2 + 1


def default_threshold(neighbours: int) -> int:
    """:func:`secure_threshold` with no corrupt neighbour: t = floor((k + 1) / 2) + 1."""
    return secure_threshold(neighbours, 0)


def corrupt_neighbour_bound(n: int, k: int, corrupt_rate: float,
                            security_bits: float = 40.0) -> int:
    """The smallest c with n * P[Bin(k, gamma) > c] <= 2^-sigma: with probability at least
    1 - 2^-sigma no neighbourhood of the n holds more than c corrupt neighbours (0 if gamma
    is 0; k if no smaller c meets the bound)."""
    if corrupt_rate <= 0.0:
        return 0
    target = 2.0 ** -security_bits
    for c in range(k + 1):
        if n * _binomial_tail(k, corrupt_rate, c + 1) <= target:
            return c
    return k


@dataclass(frozen=True, kw_only=True)
class NeighbourPolicy:
    """Rates and security levels from which :func:`choose_neighbours` picks k."""

    dropout_rate: float = 0.1
    corrupt_rate: float = 0.0
    security_bits: float = 40.0
    correctness_bits: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("dropout_rate", "corrupt_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                problems.append(f"secagg.{name}: must be in [0, 1), got {value!r}")
        if not problems and self.dropout_rate + self.corrupt_rate >= 1.0:
            problems.append("secagg.dropout_rate + corrupt_rate: must be below 1, got "
                            f"{self.dropout_rate + self.corrupt_rate}")
        for name in ("security_bits", "correctness_bits"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                problems.append(f"secagg.{name}: must be positive, got {value!r}")
        if problems:
            raise ConfigError(problems)


def _binomial_tail(k: int, p: float, m: int) -> float:
    """P[Bin(k, p) >= m], summed in log space."""
    if m <= 0:
        return 1.0
    if m > k or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lk = math.lgamma(k + 1)
    return min(1.0, sum(
        math.exp(lk - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * log_p + (k - i) * log_q)
        for i in range(m, k + 1)))


DEFAULT_POLICY = NeighbourPolicy()


def choose_neighbours(n: int, policy: NeighbourPolicy = DEFAULT_POLICY) -> int:
    """The smallest degree k meeting conditions (1)-(3) of the module docstring, or n - 1."""
    if not isinstance(n, int) or n < 2:
        raise ConfigError([f"secagg.parties: need at least 2 parties, got {n!r}"])
    delta, gamma = policy.dropout_rate, policy.corrupt_rate
    lost = delta + gamma
    secrecy = 2.0 ** -policy.security_bits
    correctness = 2.0 ** -policy.correctness_bits
    if lost >= 0.5:
        return n - 1
    for k in range(MIN_SPARSE_DEGREE + 1, n - 1):
        t = secure_threshold(k, corrupt_neighbour_bound(n, k, gamma, policy.security_bits))
        if t > k + 1:
            continue
        if n * lost**k > secrecy:
            continue
        fail = (n * (1 - delta) * _binomial_tail(k, lost, k - t + 2)
                + n * delta * _binomial_tail(k, lost, k - t + 1))
        if fail > correctness:
            continue
        return k
    return n - 1


@dataclass(frozen=True)
class NeighbourGraph:
    """An undirected graph on the round's participants (party ids), public to everyone.

    ``adjacency[i]`` lists the neighbours of ``participants[i]`` (sorted); ``degree`` is the
    nominal k. A party's Shamir x-coordinate is its position in ``participants`` plus one.
    """

    def __getstate__(self) -> dict:
        """Only the fields travel: cached hashes are always recomputed by the receiver."""
        return {f: self.__dict__[f] for f in self.__dataclass_fields__}

    participants: tuple[int, ...]
    adjacency: tuple[tuple[int, ...], ...]
    degree: int

    @cached_property
    def _position(self) -> dict[int, int]:
        return {party: i for i, party in enumerate(self.participants)}

    @property
    def n(self) -> int:
        return len(self.participants)

    @property
    def complete(self) -> bool:
        return self.degree >= self.n - 1

    @property
    def min_degree(self) -> int:
        return min(len(a) for a in self.adjacency)

    def __contains__(self, party: object) -> bool:
        return party in self._position

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of (degree, participants, every adjacency list): the graph in a transcript."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(b"lepton-ray/v2/graph")
        h.update(np.array([self.degree, self.n], dtype="<i8").tobytes())
        h.update(np.asarray(self.participants, dtype="<i8").tobytes())
        h.update(np.array([len(a) for a in self.adjacency], dtype="<i8").tobytes())
        h.update(np.fromiter((j for a in self.adjacency for j in a), dtype="<i8").tobytes())
        return h.digest()

    def position(self, party: int) -> int:
        return self._position[party]

    def x_coordinate(self, party: int) -> int:
        """Shamir evaluation point of ``party`` (1-based, never 0: f(0) is the secret)."""
        return self._position[party] + 1

    def neighbours_of(self, party: int) -> tuple[int, ...]:
        return self.adjacency[self._position[party]]


def build_graph(participants: Sequence[int], neighbours: int | GraphTopology,
                seed: bytes) -> NeighbourGraph:
    """The public neighbour graph for ``participants`` with degree ``neighbours`` (clamped to
    n - 1, the complete graph), derived from the public ``seed``. A pure function of its
    arguments, so the last few graphs are remembered: a job whose participants stay the same
    plans every round on the same graph (0.5 s to build for 10,000 parties)."""
    if not (neighbours is GraphTopology.COMPLETE or (
            isinstance(neighbours, int) and not isinstance(neighbours, bool) and neighbours >= 1)):
        raise ConfigError([(f"secagg.neighbours: must be a positive int or COMPLETE_GRAPH, got "
                           f"{neighbours!r}")])
    if isinstance(seed, (bytearray, memoryview)):  # the cache needs a hashable seed
        seed = bytes(seed)
    return _build_graph(tuple(sorted(participants)), neighbours, seed)


@lru_cache(maxsize=4)
def _build_graph(ids: tuple[int, ...], neighbours: int | GraphTopology,
                 seed: bytes) -> NeighbourGraph:
    n = len(ids)
    if n < 2:
        raise ConfigError([f"secagg.participants: need at least 2 parties, got {n}"])
    if len(set(ids)) != n:
        raise ConfigError(["secagg.participants: party ids must be distinct"])
    k = n - 1 if neighbours is GraphTopology.COMPLETE else min(neighbours, n - 1)
    if k == n - 1:
        adjacency = tuple(ids[:i] + ids[i + 1:] for i in range(n))
        return NeighbourGraph(ids, adjacency, k)
    if k < MIN_SPARSE_DEGREE:
        raise ConfigError([f"secagg.neighbours: k={k} cannot connect {n} parties; use k >= 2"])
    rng = PublicRandom(seed, "neighbour-graph", n, k)
    if 2 * k > n - 1:
        sparse = _random_regular(n, n - 1 - k, rng, with_cycle=False)
        sets = [set(range(n)) - sparse[v] - {v} for v in range(n)]
    else:
        sets = _random_regular(n, k, rng, with_cycle=True)
    adjacency = tuple(tuple(ids[u] for u in sorted(s)) for s in sets)
    return NeighbourGraph(ids, adjacency, k)


def _random_regular(n: int, k: int, rng: PublicRandom, *, with_cycle: bool) -> list[set[int]]:
    best: list[set[int]] = []
    best_left = -1
    for _ in range(_MAX_RESTARTS):
        adj: list[set[int]] = [set() for _ in range(n)]
        need = [k] * n
        if with_cycle and k >= 2:
            order = list(range(n))
            rng.shuffle(order)
            for i in range(n):
                u, v = order[i], order[(i + 1) % n]
                adj[u].add(v)
                adj[v].add(u)
                need[u] -= 1
                need[v] -= 1
        points = [v for v in range(n) for _ in range(need[v])]
        left = _pair_points(points, adj, rng)
        if left <= 1:
            return adj
        if best_left < 0 or left < best_left:
            best, best_left = adj, left
    return best  # near-regular: a few vertices short of degree k


def _pair_points(points: list[int], adj: list[set[int]], rng: PublicRandom) -> int:
    """Steger-Wormald pairing: join random pairs of free points whose vertices are distinct
    and not yet adjacent. Returns the number of points left unpaired."""

    def take(index: int) -> int:
        value = points[index]
        points[index] = points[-1]
        points.pop()
        return value

    while len(points) >= 2:
        for _ in range(64):
            a, b = rng.below(len(points)), rng.below(len(points))
            u, v = points[a], points[b]
            if u != v and v not in adj[u]:
                break
        else:
            verts = sorted(set(points))
            candidates = [(u, v) for i, u in enumerate(verts) for v in verts[i + 1:]
                          if v not in adj[u]]
            if not candidates:
                return len(points)
            u, v = candidates[rng.below(len(candidates))]
            a, b = points.index(u), points.index(v)
        for index in sorted((a, b), reverse=True):
            take(index)
        adj[u].add(v)
        adj[v].add(u)
    return len(points)
