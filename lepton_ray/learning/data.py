"""Data sources: built-in scikit-learn sets, synthetic data, a user's CSV/Parquet, per-party files.

Everything here is numpy and pandas; no torch, no Ray. A source yields a :class:`FederatedData`:
one ``(X, y)`` per party plus the server's held-out test split, with labels encoded as
``0..C-1`` (the original labels kept in ``classes``).

Standardisation (``data.standardize``) fits mean and scale on the training rows. In a
simulation that is the union of the parties' data, a convenience; the statistics travel with
the model so that ``predict`` takes raw features. With ``party_files`` (deployments) the
statistics come from the server's test file, so no party's data is pooled.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton_ray.config import DataSource, DataSpec, PartitionKind
from lepton_ray.errors import DataError
from lepton_ray.learning.partition import (
    check_party_sizes,
    group_codes,
    partition_column,
    partition_dirichlet,
    partition_iid,
)


@dataclass(frozen=True, kw_only=True)
class Table:
    """Features, encoded labels and (optionally) a grouping column, before any split."""

    X: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    feature_names: tuple[str, ...]
    groups: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class FederatedData:
    parties: tuple[tuple[np.ndarray, np.ndarray], ...]
    X_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray
    feature_names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray

    @property
    def n_features(self) -> int:
        """Features per row (the product of :attr:`feature_shape` for image-like data)."""
        return int(np.prod(self.X_test.shape[1:]))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.X_test.shape[1:])

    @property
    def n_classes(self) -> int:
        return int(len(self.classes))

    @property
    def party_sizes(self) -> np.ndarray:
        """Rows per party held here (simulation). Empty for a deployment's server data: a
        deployed party's size never leaves its node."""
        return np.array([len(y) for _, y in self.parties], dtype=np.int64)


def load_federated(spec: DataSpec, n_parties: int, seed: int) -> FederatedData:
    """Load ``spec``'s source, hold out the test split, partition the rest over ``n_parties``."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng([seed, 0xDA7A])
    if spec.source is DataSource.PARTY_FILES:
        return _load_party_files(spec)
    if spec.source is DataSource.CUSTOM:
        from lepton_ray.learning.custom import load_custom_federated

        return load_custom_federated(spec, n_parties, seed)
    table = load_table(spec, seed)
    if len(table.y) < 2:
        raise DataError(f"data: the source '{spec.source.value}' has {len(table.y)} row(s); "
                        "need at least 2 (one to train on, one to test on)")
    part = spec.partition
    if part.kind is PartitionKind.COLUMN:
        # one party per value, split *within* each party: every party keeps
        # n - floor(n * test_fraction) >= 1 of its n rows whatever the seed
        groups, names = group_codes(table.groups, column=part.column or "")
        train_idx, test_idx = _split_within_groups(table.y, groups, spec.test_fraction, seed)
    else:
        idx = np.arange(len(table.y))
        stratify = table.y if np.min(np.bincount(table.y)) >= 2 else None
        try:
            train_idx, test_idx = train_test_split(
                idx, test_size=spec.test_fraction, random_state=seed, stratify=stratify
            )
        except ValueError as exc:  # too few rows for the split sklearn was asked for
            raise DataError(f"data.test_fraction: cannot hold out {spec.test_fraction:g} of "
                            f"{len(idx)} rows: {exc}") from None
    if len(test_idx) == 0:
        raise DataError(f"data.test_fraction: {spec.test_fraction:g} of {len(table.y)} rows "
                        "leaves no test rows; raise it or add rows")
    if part.kind is not PartitionKind.COLUMN and len(train_idx) < n_parties * part.min_size:
        need = ("each party needs at least one row" if part.min_size == 1 else
                f"{n_parties} parties x data.partition.min_size {part.min_size} need "
                f"{n_parties * part.min_size}")
        raise DataError(
            f"parties.count: {n_parties} parties but only {len(train_idx)} training rows "
            f"in data.source '{spec.source.value}' ({need})"
        )
    X_train, y_train = table.X[train_idx], table.y[train_idx]
    mean, scale = _standardisation(X_train, spec.standardize)
    X_train = (X_train - mean) / scale
    X_test = (table.X[test_idx] - mean) / scale
    if part.kind is PartitionKind.IID:
        shards = partition_iid(len(y_train), n_parties, rng)
    elif part.kind is PartitionKind.DIRICHLET:
        shards = partition_dirichlet(y_train, n_parties, part.alpha, rng, min_size=part.min_size)
    else:
        shards = partition_column(groups[train_idx], n_parties, column=part.column or "",
                                  names=names)
    check_party_sizes([len(s) for s in shards], part.min_size,
                      names=names if part.kind is PartitionKind.COLUMN else None,
                      column=part.column)
    return FederatedData(
        parties=tuple((X_train[s], y_train[s]) for s in shards),
        X_test=X_test.astype(np.float32),
        y_test=table.y[test_idx],
        classes=table.classes,
        feature_names=table.feature_names,
        mean=mean,
        scale=scale,
    )


def _split_within_groups(y: np.ndarray, groups: np.ndarray, test_fraction: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split of a column partition, taken inside each party: of a party's n rows,
    floor(n * test_fraction) go to the test split (stratified by label where the party's
    classes allow it), the rest stay with the party. So every party keeps at least one
    row, and how many it keeps depends only on n, never on the seed."""
    from sklearn.model_selection import train_test_split

    train, test = [], []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        rows = np.flatnonzero(groups == g)
        n_test = int(np.floor(len(rows) * test_fraction))
        if n_test == 0:
            train.append(rows)
            continue
        labels = y[rows]
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        stratify = labels if counts.min() >= 2 and n_test >= len(counts) \
            and len(rows) - n_test >= len(counts) else None
        tr, te = train_test_split(rows, test_size=n_test, random_state=seed, stratify=stratify)
        train.append(tr)
        test.append(te)
    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    return cat(train), cat(test)


def load_table(spec: DataSpec, seed: int) -> Table:
    """Read the whole source named by ``spec`` (not ``party_files``) as a :class:`Table`."""
    if spec.source is DataSource.SYNTHETIC:
        from sklearn.datasets import make_classification

        s = spec.synthetic
        X, y = make_classification(
            n_samples=s.samples,
            n_features=s.features,
            n_informative=s.informative,
            n_redundant=min(2, s.features - s.informative),
            n_classes=s.classes,
            class_sep=s.class_sep,
            random_state=seed,
        )
        names = tuple(f"x{i}" for i in range(s.features))
        return _encode(X, y, names)
    if spec.source in (DataSource.DIGITS, DataSource.BREAST_CANCER, DataSource.WINE):
        from sklearn import datasets

        loader = getattr(datasets, f"load_{spec.source.value}")
        bunch = loader()
        names = tuple(str(n) for n in getattr(bunch, "feature_names", range(bunch.data.shape[1])))
        return _encode(bunch.data, bunch.target, names)
    frame = read_frame(Path(spec.path or ""), spec.source, field="data.path")
    group_column = spec.partition.column if spec.partition.kind is PartitionKind.COLUMN else None
    return table_from_frame(frame, spec, group_column=group_column, where=f"data.path '{spec.path}'")


def read_frame(path: Path, source: DataSource, *, field: str):
    import pandas as pd

    if not path.exists():
        raise DataError(f"{field}: file not found: {path}")
    kind = source
    if source is DataSource.PARTY_FILES:
        kind = DataSource.PARQUET if path.suffix.lower() in (".parquet", ".pq") else DataSource.CSV
    try:
        if kind is DataSource.PARQUET:
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # pandas raises many types; name the file and the cause
        raise DataError(f"{field}: cannot read {path} as {kind.value}: {exc}") from None


def table_from_frame(frame, spec: DataSpec, *, group_column: str | None, where: str,
                     classes: np.ndarray | None = None) -> Table:
    """Split a DataFrame into features/labels, checking columns and types with clear errors."""
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if len(frame) == 0:
        raise DataError(f"{where}: no data rows (columns: {', '.join(columns) or 'none'})")
    label = spec.label or ""
    if label not in columns:
        raise DataError(f"data.label: column '{label}' not in {where} (columns: {', '.join(columns)})")
    excluded = {label} | ({group_column} if group_column else set())
    if group_column and group_column not in columns:
        raise DataError(
            f"data.partition.column: column '{group_column}' not in {where} "
            f"(columns: {', '.join(columns)})"
        )
    if spec.features:
        missing = [f for f in spec.features if f not in columns]
        if missing:
            raise DataError(f"data.features: {', '.join(missing)} not in {where}")
        features = list(spec.features)
    else:
        features = [c for c in columns if c not in excluded]
    if not features:
        raise DataError(f"data.features: {where} has no feature columns besides the label")
    bad = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise DataError(
            f"data.features: non-numeric feature column(s) {', '.join(bad)} in {where}; "
            f"encode them as numbers or list numeric columns in data.features"
        )
    X = frame[features].to_numpy(dtype=np.float64)
    if not np.isfinite(X).all():
        rows = np.where(~np.isfinite(X).all(axis=1))[0][:5]
        raise DataError(f"{where}: missing or non-finite feature values in rows {rows.tolist()}")
    y_raw = frame[label].to_numpy()
    if pd.isna(frame[label]).any():
        raise DataError(f"data.label: column '{label}' has missing values in {where}")
    groups = None
    if group_column:
        empty = np.flatnonzero(pd.isna(frame[group_column]).to_numpy())
        if len(empty):
            shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
            raise DataError(
                f"data.partition.column: column '{group_column}' has {len(empty)} missing "
                f"value(s) in {where}, rows {shown} (0-based data rows, header not counted); "
                "every row must name its party"
            )
        groups = frame[group_column].to_numpy()
    return _encode(X, y_raw, tuple(features), groups=groups, classes=classes, where=where)


def _encode(X, y, names, *, groups=None, classes=None, where="data") -> Table:
    if classes is None:
        classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"data.label: {where} has a single class ({classes.tolist()}); need >= 2")
    encoded = np.searchsorted(classes, y)
    encoded = np.clip(encoded, 0, len(classes) - 1)
    unknown = classes[encoded] != y
    if np.any(unknown):
        raise DataError(f"data.label: {where} has labels not seen in the test file: "
                        f"{np.unique(y[unknown]).tolist()[:5]}")
    return Table(
        X=np.asarray(X, dtype=np.float64),
        y=encoded.astype(np.int64),
        classes=np.asarray(classes),
        feature_names=tuple(names),
        groups=groups,
    )


def _standardisation(X: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    if not enabled:
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale


def load_server_data(spec: DataSpec) -> FederatedData:
    """Deployments: only the server's test file (its statistics standardise every party);
    the parties' data stays on their nodes (:func:`load_party_file`, run there)."""
    return _load_party_files(spec, paths=())


def load_party_file(spec: DataSpec, path: str, server: FederatedData, *, field: str):
    """One party's ``(X, y)`` from its own file, encoded and standardised like the server's
    test data; run by the party's host on the party's node."""
    t = table_from_frame(
        read_frame(Path(path), spec.source, field=field), spec, group_column=None,
        where=f"{field} '{path}'", classes=server.classes,
    )
    if t.feature_names != server.feature_names:
        raise DataError(f"{field}: columns {list(t.feature_names)} differ from the test file's "
                        f"{list(server.feature_names)}")
    return (t.X - server.mean) / server.scale, t.y


def _load_party_files(spec: DataSpec, paths=None) -> FederatedData:
    test = table_from_frame(
        read_frame(Path(spec.test_path or ""), spec.source, field="data.test_path"),
        spec, group_column=None, where=f"data.test_path '{spec.test_path}'",
    )
    mean, scale = _standardisation(test.X, spec.standardize)
    server = FederatedData(parties=(), X_test=((test.X - mean) / scale).astype(np.float32),
                           y_test=test.y, classes=test.classes, feature_names=test.feature_names,
                           mean=mean, scale=scale)
    if paths is not None and not paths:
        return server
    # read raw (mean 0, scale 1), then standardise with the pooled training rows' statistics,
    # as every other source does and as a federation computes them by a secure sum of the
    # sites' moments (lepton_ray.federation.stats): simulate and a federation of the same
    # spec on the same files train on the same features
    raw = dataclasses.replace(server, mean=np.zeros_like(mean), scale=np.ones_like(scale))
    parties = [load_party_file(spec, p, raw, field=f"data.party_paths[{i}]")
               for i, p in enumerate(spec.party_paths or ())]
    if spec.standardize and parties:
        mean, scale = _standardisation(np.concatenate([X for X, _ in parties]), True)
        parties = [((X - mean) / scale, y) for X, y in parties]
    return FederatedData(
        parties=tuple(parties),
        X_test=((test.X - mean) / scale).astype(np.float32),
        y_test=test.y,
        classes=test.classes,
        feature_names=test.feature_names,
        mean=mean,
        scale=scale,
    )


def as_float32(parties):
    """Contiguous float32 features and int64 labels, ready for torch."""
    return tuple(
        (np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64))
        for X, y in parties
    )
