"""Partitioners: which training rows each party holds. Pure numpy, RNG passed in.

Each returns a list of index arrays, one per party, that together cover the training rows
exactly once.
"""

from __future__ import annotations

import numpy as np

from lepton_ray.errors import DataError


def partition_iid(n_rows: int, n_parties: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the rows and deal them into ``n_parties`` shards whose sizes differ by <= 1."""
    if n_rows < n_parties:
        raise DataError(f"parties.count: {n_parties} parties but only {n_rows} training rows")
    return [np.sort(s) for s in np.array_split(rng.permutation(n_rows), n_parties)]


def partition_dirichlet(
    labels: np.ndarray,
    n_parties: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: for each class draw party proportions from Dirichlet(alpha) and split that
    class's rows accordingly (Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification"). Small alpha -> few classes per
    party. Redraws until every party holds ``min_size`` rows; if that cannot happen in
    ``max_tries`` draws, the smallest parties take rows from the largest (documented
    fallback, still a disjoint cover)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < n_parties * min_size:
        raise DataError(
            f"parties.count: {n_parties} parties x data.partition.min_size {min_size} "
            f"exceeds the {n} training rows"
        )
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    shards: list[list[np.ndarray]] = []
    for _ in range(max_tries):
        shards = [[] for _ in range(n_parties)]
        for rows in by_class:
            p = rng.dirichlet(np.full(n_parties, alpha))
            cuts = (np.cumsum(p)[:-1] * len(rows)).astype(int)
            for party, part in enumerate(np.split(rows, cuts)):
                shards[party].append(part)
        sizes = [sum(len(x) for x in s) for s in shards]
        if min(sizes) >= min_size:
            break
    out = [np.concatenate(s) if s else np.empty(0, dtype=np.int64) for s in shards]
    _rebalance(out, min_size)
    return [np.sort(s.astype(np.int64)) for s in out]


def _rebalance(shards: list[np.ndarray], min_size: int) -> None:
    while True:
        sizes = np.array([len(s) for s in shards])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return
        big = int(np.argmax(sizes))
        shards[small] = np.concatenate([shards[small], shards[big][-1:]])
        shards[big] = shards[big][:-1]


def group_codes(groups: np.ndarray, *, column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Party index per row for a column partition: the distinct values of ``column`` in
    sorted order (numbers numerically, anything else by its text, so a column that mixes
    types still has one order) and each row's index into them. Missing values are refused
    where the file is read (``table_from_frame``), naming the rows."""
    values = np.asarray(groups)
    try:
        names, codes = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types (e.g. 3 and "north") have no order: sort by their text
        names, codes = np.unique(values.astype(str), return_inverse=True)
    if len(values) == 0:
        raise DataError(f"data.partition.column: column '{column}' has no rows")
    return codes.reshape(-1).astype(np.int64), tuple(str(v) for v in names)


def partition_column(groups: np.ndarray, n_parties: int, *, column: str,
                     names: tuple[str, ...] | None = None) -> list[np.ndarray]:
    """Natural split: one party per distinct value of ``column`` (e.g. ``hospital``), in
    sorted order of the values. The number of distinct values must equal ``parties.count``.
    ``groups`` holds the values, or with ``names`` their indices (:func:`group_codes`)."""
    if names is None:
        groups, names = group_codes(groups, column=column)
    if len(names) != n_parties:
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise DataError(
            f"parties.count: is {n_parties} but data.partition.column '{column}' has "
            f"{len(names)} distinct values ({shown})"
        )
    return [np.flatnonzero(groups == v) for v in range(len(names))]


def check_party_sizes(sizes, min_size: int, *, names: tuple[str, ...] | None = None,
                      column: str | None = None) -> None:
    """The minimum party size rule: after the test split, every party holds at least
    ``data.partition.min_size`` training rows (default 1: no party is empty). Checked for
    every partition kind; the message names each party that falls short."""
    short = [(p, int(n)) for p, n in enumerate(sizes) if n < min_size]
    if not short:
        return
    def who(p: int) -> str:
        return f"party {p} ({column} = '{names[p]}')" if names is not None else f"party {p}"
    shown = "; ".join(f"{who(p)} has {n} training row(s)" for p, n in short[:5])
    more = f" (and {len(short) - 5} more)" if len(short) > 5 else ""
    raise DataError(
        f"data.partition.min_size: every party needs at least {min_size} training row(s) "
        f"after the test split; {shown}{more}"
    )
