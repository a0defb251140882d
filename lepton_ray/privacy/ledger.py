"""Write-ahead privacy ledger: one fsynced JSON line per charge, replayed on resume.

File format (``ledger.jsonl``), one object per line, keys in this order::

    {"round": 7, "event": {...}, "accountant": "rdp", "delta": 1e-05,
     "epsilon_after": 1.23, "note": "round 7", "timestamp": "2025-...+00:00"}

A recovered charge (see below) also has ``"recovered": true``.

Promises (DESIGN.md, "One round", step 1): *a crash can over-count, never under-count.*

* :meth:`Ledger.charge` dry-runs the composition; over budget -> :class:`BudgetExhaustedError`
  and nothing is written. Otherwise the line is written, flushed and ``os.fsync``-ed
  *before* the accountant in memory is updated and before ``charge`` returns; the caller
  releases noised output only after ``charge`` returns.
* :meth:`Ledger.open` replays every line, so a resumed job starts from everything ever
  charged. Spent epsilon never decreases: it is the max of the replayed accountant's
  epsilon and every recorded ``epsilon_after`` (a newer dp_accounting, or reopening with the
  other accountant kind, can only move it up).
* Charging a round twice (a resumed job re-running the round it crashed in) is counted
  twice. An idempotency key (skip a second charge for the same round) would be safe only
  if the re-run released nothing new; but a resumed round draws fresh noise and releases
  again, and the first run's output may already have left. Skipping would under-count, so
  we over-count that one round instead.

Torn tail after a crash (the last line has no newline). By the write-ahead order a torn
line's ``charge`` never returned (its fsync had not completed), so nothing should have been
released for it; but we do not bet the guarantee on every writer having followed that order:

* it parses as a whole row: a complete charge whose newline was lost; it counts, and
  ``open`` appends the newline.
* it starts ``{"round": N, "event": {...}`` with a whole event: counted conservatively (an
  over-count is always safe); ``open`` rewrites the file atomically (temp file, fsync,
  rename, fsync directory) with that line completed and marked ``"recovered": true``.
* otherwise (cut inside the round or the event, so we cannot tell what it cost):
  :class:`ResumeError`, unless the operator passes ``discard_unparseable_tail=True`` - an
  explicit decision, justified by the write-ahead order above, never a silent one.

A corrupt line *before* the last one is never skipped: :class:`ResumeError`.

Single writer, enforced (:class:`LedgerLock`). Two jobs charging one ledger would each check
the budget against what *they* charged and together spend more than it; a ``--resume`` started
while the first job still runs is exactly that. So a ledger is only ever opened under an
exclusive ``fcntl.flock`` on ``ledger.jsonl.lock`` beside it, held for the job's whole
lifetime (the driver takes it before it touches the output directory and releases it when
the job has ended, also on failure; the kernel drops it if the process dies). A second
opener gets :class:`~lepton_ray.errors.LedgerLockedError` naming the holder's pid, which the
holder writes into the lock file. The lock is on a separate file, never on the ledger
itself, because the ledger is replaced by rename (torn-tail recovery, :func:`discard_ledger`)
and a lock on a replaced inode would exclude no one; the lock file is never deleted for the
same reason. flock needs a local file system (or one whose flock is cluster-wide).

A ledger is never deleted silently: :func:`discard_ledger` (what ``--overwrite
--discard-privacy-ledger`` calls) atomically replaces it by a ledger whose first line is a
:class:`DiscardRecord` - when, how many charges, the epsilon spent (if readable) and the
SHA-256 of the discarded file - so the trail of every budget ever spent in that directory
survives, hash-chained through successive discards::

    {"discarded_ledger": {"discarded_at": "...", "sha256": "...", "bytes": 812,
                          "charges": 3, "epsilon_spent": 1.23, "delta": 1e-05}}
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import socket
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lepton_ray.errors import BudgetExhaustedError, LedgerLockedError, PrivacyError, ResumeError
from lepton_ray.privacy.accountants import Accountant, AccountantKind, make_accountant
from lepton_ray.privacy.budget import PrivacyBudget
from lepton_ray.privacy.events import Event, event_from_dict

__all__ = [
    "DiscardRecord",
    "Ledger",
    "LedgerLock",
    "LedgerRow",
    "discard_ledger",
    "lock_path",
    "read_discard_record",
    "read_ledger",
]

_TORN_PREFIX = re.compile(r'\{"round": (\d+), "event": ')


@dataclass(frozen=True, kw_only=True)
class LedgerRow:
    """One charge as written to (or read from) the ledger; ``epsilon_after`` is the
    running epsilon at ``delta`` after this charge."""

    round: int
    event: Event
    accountant: AccountantKind
    delta: float
    epsilon_after: float
    note: str
    timestamp: str
    recovered: bool = False

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "round": self.round,
            "event": self.event.to_dict(),
            "accountant": self.accountant.value,
            "delta": self.delta,
            "epsilon_after": self.epsilon_after,
            "note": self.note,
            "timestamp": self.timestamp,
        }
        if self.recovered:
            obj["recovered"] = True
        return json.dumps(obj, allow_nan=False)

    @classmethod
    def from_obj(cls, obj: Any) -> LedgerRow:
        """Parse one decoded line; raises :class:`PrivacyError` naming what is wrong."""
        if not isinstance(obj, dict):
            raise PrivacyError(f"a ledger row must be a JSON object, got {obj!r}")
        try:
            rnd, delta, eps = obj["round"], obj["delta"], obj["epsilon_after"]
            kind = AccountantKind(obj["accountant"])
            event = event_from_dict(obj["event"])
            note, stamp = obj["note"], obj["timestamp"]
        except KeyError as missing:
            raise PrivacyError(f"ledger row is missing field {missing}") from None
        except ValueError as bad:
            raise PrivacyError(f"ledger row has a bad accountant kind: {bad}") from None
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise PrivacyError(f"ledger row round must be an integer >= 0, got {rnd!r}")
        for name, value in (("delta", delta), ("epsilon_after", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PrivacyError(f"ledger row {name} must be a number, got {value!r}")
        return cls(
            round=rnd,
            event=event,
            accountant=kind,
            delta=float(delta),
            epsilon_after=float(eps),
            note=str(note),
            timestamp=str(stamp),
            recovered=bool(obj.get("recovered", False)),
        )


@dataclass(frozen=True, kw_only=True)
class _Tail:
    """The last line of a file that does not end in a newline."""

    offset: int  # byte offset where the line starts
    row: LedgerRow | None  # it was a whole row (only the newline is missing)
    round: int | None  # else: what could be recovered from the fragment
    event: Event | None


# ---------------------------------------------------------------------------- the lock


def lock_path(ledger_path: str | os.PathLike[str]) -> Path:
    """``<ledger>.lock``: the file whose flock guards ``ledger_path``."""
    p = Path(ledger_path)
    return p.with_name(p.name + ".lock")


class LedgerLock:
    """An exclusive, non-blocking ``fcntl.flock`` on :func:`lock_path` of a ledger (see the
    module docstring). Build it with :meth:`acquire`; it is held until :meth:`release` (or
    until the process exits: the kernel drops flocks with the last descriptor)."""

    def __init__(self, ledger_path: Path, fd: int) -> None:
        self._ledger = ledger_path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, ledger_path: str | os.PathLike[str]) -> LedgerLock:
        """Take the lock or raise :class:`LedgerLockedError` naming the holder's pid."""
        ledger_path = Path(ledger_path)
        path = lock_path(ledger_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LedgerLockedError(
                f"privacy ledger {ledger_path} is locked by another job ({holder}); a second "
                f"job on the same ledger would spend the budget twice. Wait for it to end (or "
                f"stop it), then run again or --resume"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        return cls(ledger_path, fd)

    @property
    def ledger_path(self) -> Path:
        return self._ledger

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays: see the module docstring."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no stale pid for the next reader
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> LedgerLock:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(info['pid'])} on {info.get('host', '?')} since {info.get('since', '?')}"
    except (ValueError, KeyError, TypeError, OSError):
        return "pid unknown: it has not written it yet"


# ---------------------------------------------------------------------------- discarding


@dataclass(frozen=True, kw_only=True)
class DiscardRecord:
    """The first line of a ledger that replaced a discarded one (module docstring).
    ``charges``, ``epsilon_spent`` and ``delta`` are None when the old file was unreadable."""

    discarded_at: str
    sha256: str
    bytes: int
    charges: int | None
    epsilon_spent: float | None
    delta: float | None

    def to_json(self) -> str:
        return json.dumps({"discarded_ledger": {
            "discarded_at": self.discarded_at, "sha256": self.sha256, "bytes": self.bytes,
            "charges": self.charges, "epsilon_spent": self.epsilon_spent, "delta": self.delta,
        }}, allow_nan=False)

    @classmethod
    def from_obj(cls, obj: Any) -> DiscardRecord:
        try:
            d = obj["discarded_ledger"]
            return cls(discarded_at=str(d["discarded_at"]), sha256=str(d["sha256"]),
                       bytes=int(d["bytes"]),
                       charges=None if d["charges"] is None else int(d["charges"]),
                       epsilon_spent=None if d["epsilon_spent"] is None else float(d["epsilon_spent"]),
                       delta=None if d["delta"] is None else float(d["delta"]))
        except (KeyError, TypeError, ValueError) as err:
            raise PrivacyError(f"bad discarded_ledger record: {err!r}") from None


def discard_ledger(path: str | os.PathLike[str], *, lock: LedgerLock) -> DiscardRecord:
    """Replace the ledger at ``path`` (atomically: temp file, fsync, rename, fsync directory)
    by one holding only a :class:`DiscardRecord` of it; ``lock`` must hold ``path``. The
    old file's epsilon is taken from its rows if they can be read (else None: the hash still
    identifies it)."""
    path = Path(path)
    _check_lock(lock, path)
    data = path.read_bytes()
    try:
        rows = read_ledger(path)
        charges: int | None = len(rows)
        eps = rows[-1].epsilon_after if rows else 0.0
        delta = rows[-1].delta if rows else None
    except (ResumeError, PrivacyError):
        charges, eps, delta = None, None, None
    record = DiscardRecord(discarded_at=_now(), sha256=hashlib.sha256(data).hexdigest(),
                           bytes=len(data), charges=charges, epsilon_spent=eps, delta=delta)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write((record.to_json() + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return record


def _check_lock(lock: object, path: Path) -> None:
    if not isinstance(lock, LedgerLock) or not lock.held:
        raise PrivacyError(f"ledger {path}: a held LedgerLock is required")
    if lock.ledger_path.resolve() != path.resolve():
        raise PrivacyError(f"the lock given guards {lock.ledger_path}, not {path}")


def read_discard_record(path: str | os.PathLike[str]) -> DiscardRecord | None:
    """The :class:`DiscardRecord` a ledger starts with, or None."""
    path = Path(path)
    with open(path, "rb") as f:
        first = f.readline()
    try:
        obj = json.loads(first.decode("utf-8"))
    except ValueError:
        return None
    if isinstance(obj, dict) and "discarded_ledger" in obj:
        return DiscardRecord.from_obj(obj)
    return None


def _scan(path: Path) -> tuple[list[LedgerRow], _Tail | None]:
    data = path.read_bytes()
    rows: list[LedgerRow] = []
    lines = data.split(b"\n")
    tail_bytes = lines.pop()  # b"" when the file ends in a newline
    offset = 0
    for lineno, raw in enumerate(lines, start=1):
        if raw.strip():
            try:
                obj = json.loads(raw.decode("utf-8"))
                if lineno == 1 and isinstance(obj, dict) and "discarded_ledger" in obj:
                    DiscardRecord.from_obj(obj)  # validated; not a charge
                else:
                    rows.append(LedgerRow.from_obj(obj))
            except (ValueError, PrivacyError) as err:
                raise ResumeError(
                    f"ledger {path} line {lineno} is corrupt ({err}); refusing to guess what "
                    f"was charged - inspect it by hand"
                ) from None
        offset += len(raw) + 1
    if not tail_bytes.strip():
        return rows, None
    text = tail_bytes.decode("utf-8", errors="replace")
    try:
        whole: LedgerRow | None = LedgerRow.from_obj(json.loads(text))
    except (ValueError, PrivacyError):
        whole = None
    if whole is not None:
        return rows + [whole], _Tail(offset=offset, row=whole, round=None, event=None)
    match = _TORN_PREFIX.match(text)
    if match is None:
        return rows, _Tail(offset=offset, row=None, round=None, event=None)
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, match.end())
        event = event_from_dict(obj)
    except (ValueError, PrivacyError):
        return rows, _Tail(offset=offset, row=None, round=int(match.group(1)), event=None)
    return rows, _Tail(offset=offset, row=None, round=int(match.group(1)), event=event)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _replay(rows: list[LedgerRow], kind: AccountantKind) -> Accountant:
    acc = make_accountant(kind)
    for row in rows:
        acc.compose(row.event)
    return acc


class Ledger:
    """The budget's bookkeeper over one ``ledger.jsonl``; build it with :meth:`open`."""

    def __init__(
        self,
        *,
        path: Path,
        budget: PrivacyBudget,
        accountant: Accountant,
        rows: list[LedgerRow],
        spent_epsilon: float,
        lock: LedgerLock,
        own_lock: bool,
    ) -> None:
        self._path = path
        self._budget = budget
        self._acc = accountant
        self._rows = rows
        self._spent = spent_epsilon
        self._lock = lock
        self._own_lock = own_lock
        self._file = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._broken = False

    # ---------------------------------------------------------------- opening / replay

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        budget: PrivacyBudget,
        accountant: AccountantKind = AccountantKind.RDP,
        discard_unparseable_tail: bool = False,
        lock: LedgerLock | None = None,
    ) -> Ledger:
        """Open (creating if absent) and replay a ledger; see the module docstring for the
        torn-tail policy. Raises :class:`ResumeError` for a corrupt file or a file written
        with a different delta than ``budget.delta``.

        ``lock``: a held :class:`LedgerLock` on ``path`` that the caller keeps (and releases)
        beyond this ledger, e.g. for the whole job; without it the ledger takes its own, held
        until :meth:`close`. Either way, :class:`LedgerLockedError` if another process holds
        it - before anything is read."""
        path = Path(path)
        if not isinstance(budget, PrivacyBudget):
            raise PrivacyError(f"budget must be a PrivacyBudget, got {budget!r}")
        if not isinstance(accountant, AccountantKind):
            raise PrivacyError(f"accountant must be an AccountantKind, got {accountant!r}")
        if lock is not None:
            _check_lock(lock, path)
            return cls._open_locked(path, budget, accountant, discard_unparseable_tail, lock,
                                    own_lock=False)
        own = LedgerLock.acquire(path)
        try:
            return cls._open_locked(path, budget, accountant, discard_unparseable_tail, own,
                                    own_lock=True)
        except BaseException:
            own.release()
            raise

    @classmethod
    def _open_locked(cls, path: Path, budget: PrivacyBudget, accountant: AccountantKind,
                     discard_unparseable_tail: bool, lock: LedgerLock, *,
                     own_lock: bool) -> Ledger:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                os.fsync(f.fileno())
            _fsync_dir(path.parent)
            return cls(
                path=path,
                budget=budget,
                accountant=make_accountant(accountant),
                rows=[],
                spent_epsilon=0.0,
                lock=lock,
                own_lock=own_lock,
            )

        rows, tail = _scan(path)
        for i, row in enumerate(rows, start=1):
            if not math.isclose(row.delta, budget.delta, rel_tol=1e-12, abs_tol=0.0):
                raise ResumeError(
                    f"ledger {path} row {i} was charged at delta={row.delta}, but the budget "
                    f"has delta={budget.delta}; epsilons at different deltas do not add up"
                )
        acc = _replay(rows, accountant)
        spent = max([acc.epsilon(budget.delta)] + [r.epsilon_after for r in rows])

        if tail is not None and tail.row is not None:  # whole row, newline lost
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        elif tail is not None and tail.event is not None and tail.round is not None:
            acc.compose(tail.event)  # may or may not have been released: count it
            spent = max(spent, acc.epsilon(budget.delta))
            row = LedgerRow(
                round=tail.round,
                event=tail.event,
                accountant=accountant,
                delta=budget.delta,
                epsilon_after=spent,
                note="recovered from a torn line after a crash",
                timestamp=_now(),
                recovered=True,
            )
            rows.append(row)
            cls._rewrite(path, keep=tail.offset, extra=row.to_json() + "\n")
        elif tail is not None:
            if not discard_unparseable_tail:
                raise ResumeError(
                    f"ledger {path} ends in a torn line at byte {tail.offset} whose event "
                    f"cannot be read. By the write-ahead order its charge never returned, so "
                    f"nothing was released for it; reopen with discard_unparseable_tail=True "
                    f"to drop it"
                )
            cls._rewrite(path, keep=tail.offset, extra="")
        return cls(path=path, budget=budget, accountant=acc, rows=rows, spent_epsilon=spent,
                   lock=lock, own_lock=own_lock)

    @staticmethod
    def _rewrite(path: Path, *, keep: int, extra: str) -> None:
        """Atomically replace ``path`` by its first ``keep`` bytes plus ``extra``."""
        with open(path, "rb") as f:
            head = f.read(keep)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(head + extra.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    # ---------------------------------------------------------------- state

    @property
    def path(self) -> Path:
        return self._path

    @property
    def budget(self) -> PrivacyBudget:
        return self._budget

    @property
    def accountant_kind(self) -> AccountantKind:
        return self._acc.kind

    @property
    def spent_epsilon(self) -> float:
        """Epsilon spent so far at ``budget.delta`` (never decreases)."""
        return self._spent

    @property
    def remaining_epsilon(self) -> float:
        return max(0.0, self._budget.epsilon - self._spent)

    @property
    def rows(self) -> tuple[LedgerRow, ...]:
        return tuple(self._rows)

    def epsilon_if_charged(self, event: Event) -> float:
        """Epsilon after charging ``event``, without charging it (nothing is written)."""
        if not isinstance(event, Event):
            raise PrivacyError(f"event must be a privacy Event, got {event!r}")
        return max(self._spent, self._acc.composed(event).epsilon(self._budget.delta))

    # ---------------------------------------------------------------- charging

    def charge(self, *, round: int, event: Event, note: str = "") -> float:
        """Charge ``event`` for ``round``; return the epsilon spent after it.

        Over budget -> :class:`BudgetExhaustedError`, nothing written, nothing composed.
        Otherwise the line is on disk (flush + fsync) before this returns.
        """
        if self._broken:
            raise PrivacyError(
                f"ledger {self._path} had a failed write; reopen it with Ledger.open"
            )
        if not self._lock.held:
            raise PrivacyError(f"ledger {self._path}: its lock was released; nothing charged")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise PrivacyError(f"round must be an integer >= 0, got {round!r}")
        if not isinstance(note, str):
            raise PrivacyError(f"note must be a string, got {note!r}")
        if not isinstance(event, Event):
            raise PrivacyError(f"event must be a privacy Event, got {event!r}")
        candidate = self._acc.composed(event)  # dry run; PrivacyError if unsupported
        eps = max(self._spent, candidate.epsilon(self._budget.delta))
        if eps > self._budget.epsilon:
            raise BudgetExhaustedError(
                f"charging round {round} would spend epsilon={eps:.6g} at "
                f"delta={self._budget.delta:g}, over the budget epsilon={self._budget.epsilon:g} "
                f"(spent so far {self._spent:.6g}); nothing was charged"
            )
        row = LedgerRow(
            round=round,
            event=event,
            accountant=self._acc.kind,
            delta=self._budget.delta,
            epsilon_after=eps,
            note=note,
            timestamp=_now(),
        )
        try:
            self._file.write((row.to_json() + "\n").encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self._broken = True  # the file may now end in a torn line: reopen to recover
            raise
        self._acc = candidate  # only now, after the fsync
        self._spent = eps
        self._rows.append(row)
        return eps

    def close(self) -> None:
        """Close the file; release the lock if this ledger took it itself."""
        self._file.close()
        if self._own_lock:
            self._lock.release()

    def __enter__(self) -> Ledger:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ledger(path: str | os.PathLike[str]) -> tuple[LedgerRow, ...]:
    """The rows of a ledger with their running epsilon (``epsilon_after``), for display.

    Read-only. A torn tail whose event can be read is shown as a ``recovered`` row, its
    epsilon recomputed by replay with the previous rows' accountant and delta (as
    :meth:`Ledger.open` would count it); an unreadable torn tail raises
    :class:`ResumeError` rather than hide a possible charge.
    """
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"no privacy ledger at {path}")
    rows, tail = _scan(path)
    if tail is None or tail.row is not None:
        return tuple(rows)
    if tail.event is None or tail.round is None or not rows:
        raise ResumeError(
            f"ledger {path} ends in a torn line at byte {tail.offset} that cannot be shown "
            f"as a charge; open it with Ledger.open to recover or discard it"
        )
    last = rows[-1]
    acc = _replay(rows, last.accountant)
    acc.compose(tail.event)
    eps = max(last.epsilon_after, acc.epsilon(last.delta))
    recovered = replace(
        last,
        round=tail.round,
        event=tail.event,
        epsilon_after=eps,
        note="torn line (not yet recovered by Ledger.open)",
        timestamp="",
        recovered=True,
    )
    return tuple(rows) + (recovered,)
