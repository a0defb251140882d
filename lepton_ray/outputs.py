"""What a job writes, written so that no failure loses or corrupts what is already there.

* whole files (summary, checkpoint, model) are written to a temporary file in the same
  directory, fsynced, then renamed over the target (atomic on POSIX);
* ``history.csv`` is append-only: one row per round, flushed and fsynced.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HISTORY_COLUMNS = (
    "round",
    "status",
    "parties_sampled",
    "parties_completed",
    "parties_clipped",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "test_precision",
    "test_recall",
    "test_f1",
    "round_seconds",
    "epsilon",
    # federated evaluation (evaluation.federated): the global model the round started from,
    # on the evaluating parties' held-out rows, from the secure sum's totals; blank otherwise
    "fed_loss",
    "fed_accuracy",
    "fed_f1",
    "fed_examples",
)

HISTORY = "history.csv"
LEDGER = "ledger.jsonl"
AUDIT = "audit.jsonl"
SUMMARY = "summary.json"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
PARTICIPANTS = "participants.jsonl"

PARTICIPANTS_BANNER = {
    "confidential": True,
    "warning": "CONFIDENTIAL: who was sampled, completed and dropped in each round. Under "
               "differential privacy the guarantee relies on this staying secret (amplification "
               "by sampling); never publish this file or store it with the released outputs.",
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_path(out_dir: Path, name: str, *, encrypted: bool) -> Path:
    """Where ``name`` (a checkpoint or model) lives: ``name.enc`` when it is encrypted."""
    return Path(out_dir) / (name + ".enc" if encrypted else name)


def write_output(out_dir: Path, name: str, data: bytes, key: bytes | None) -> None:
    """Atomic write of a checkpoint or model; with ``key`` sealed with AES-256-GCM as
    ``name.enc``, the file name bound as associated data (so sealed files cannot be swapped)."""
    if key is None:
        atomic_write_bytes(output_path(out_dir, name, encrypted=False), data)
        return
    from lepton_ray.crypto.at_rest import write_encrypted

    write_encrypted(output_path(out_dir, name, encrypted=True), data, key, associated=name.encode())


def read_output(out_dir: Path, name: str, key: bytes | None) -> bytes:
    """What :func:`write_output` wrote; a wrong key is a clear ``LeptonError``."""
    if key is None:
        return output_path(out_dir, name, encrypted=False).read_bytes()
    from lepton_ray.crypto.at_rest import read_encrypted

    return read_encrypted(output_path(out_dir, name, encrypted=True), key, associated=name.encode())


class HistoryWriter:
    """Appends one fsynced CSV row per round to ``history.csv`` (header written once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append(",".join(HISTORY_COLUMNS) + "\n")
        else:
            self._upgrade_header()

    def _upgrade_header(self) -> None:
        """A history written before columns were added (a resumed job) gets today's header;
        its old rows, shorter, read back with the new columns blank."""
        text = self.path.read_text(encoding="utf-8")
        head, _, rest = text.partition("\n")
        old = head.split(",")
        if old == list(HISTORY_COLUMNS) or old != list(HISTORY_COLUMNS[: len(old)]):
            return
        atomic_write_bytes(self.path, (",".join(HISTORY_COLUMNS) + "\n" + rest).encode("utf-8"))

    def write(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(HISTORY_COLUMNS)
        if unknown:
            raise ValueError(f"unknown history columns: {sorted(unknown)}")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in HISTORY_COLUMNS])
        self._append(buf.getvalue())

    def _append(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


class AuditLog:
    """Append-only ``audit.jsonl``: one fsynced JSON object per event (job start, every round,
    job end) from which ``lepton-ray audit`` builds the compliance report."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """A last line without its newline is a write that never returned (the process died
        inside it): cut it, so that the next record does not glue onto it and corrupt the
        log. Such a record was never acted on: a ``round_start`` is written before its round
        samples anyone."""
        if not self.path.exists():
            return
        with open(self.path, "r+b") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())

    def write(self, kind: str, **fields: Any) -> None:
        import datetime

        record = {"event": kind, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  **fields}
        line = json.dumps(record, default=_json_default, sort_keys=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class ParticipantsLog:
    """``participants.jsonl`` (``output.record_participants``): a first line marking the file
    confidential, then one fsynced JSON object per round with the party ids sampled,
    completed and dropped. Kept out of every released file (history, summary, audit, model)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append(PARTICIPANTS_BANNER)

    def write(self, round_: int, *, sampled, completed, dropped) -> None:
        self._append({"round": round_, "sampled": sorted(map(int, sampled)),
                      "completed": sorted(map(int, completed)), "dropped": sorted(map(int, dropped))})

    def _append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(self.path, 0o600)  # confidential: the job's user only


def read_audit(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / AUDIT
    if not path.exists():
        from lepton_ray.errors import LeptonError

        raise LeptonError(f"{out_dir}: no {AUDIT} here (is this a job's output directory?)")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break  # a torn last line from a crash: everything before it is intact
            from lepton_ray.errors import LeptonError

            raise LeptonError(f"{path}: line {i} is not valid JSON (the log is corrupted)") from None
    return rows


def truncate_history(out_dir: Path, last_round: int) -> int:
    """Keep only the header and rows with ``round <= last_round`` (atomic rewrite); returns
    how many rows were dropped. Used on resume: rounds after the checkpoint run again."""
    path = Path(out_dir) / HISTORY
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep, dropped = lines[:1], 0
    for line in lines[1:]:
        head = line.split(",", 1)[0]
        if head.isdigit() and int(head) <= last_round and line.endswith("\n"):
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(keep).encode("utf-8"))
    return dropped


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_history(out_dir: Path):
    import pandas as pd

    path = Path(out_dir) / HISTORY
    if not path.exists():
        from lepton_ray.errors import LeptonError

        raise LeptonError(f"{out_dir}: no {HISTORY} here (is this a job's output directory?)")
    return pd.read_csv(path)
