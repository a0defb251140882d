"""Budget and write-ahead ledger: fsync before return, refusal writes nothing, replay after
a crash never under-counts."""

from __future__ import annotations

import json
import os

import pytest

from lepton_ray.errors import BudgetExhaustedError, LedgerLockedError, PrivacyError, ResumeError
from lepton_ray.privacy import ledger as ledger_module
from lepton_ray.privacy.accountants import AccountantKind, RdpAccountant
from lepton_ray.privacy.budget import PrivacyBudget
from lepton_ray.privacy.events import Gaussian, Laplace, PoissonSampled, SelfComposed
from lepton_ray.privacy.ledger import (
    Ledger,
    LedgerLock,
    discard_ledger,
    read_discard_record,
    read_ledger,
)

ROUND = PoissonSampled(sampling_probability=0.1, event=Gaussian(noise_multiplier=1.0))
BUDGET = PrivacyBudget(epsilon=3.0, delta=1e-5)


def eps_of(n_rounds: int, delta: float = 1e-5) -> float:
    acc = RdpAccountant()
    for _ in range(n_rounds):
        acc.compose(ROUND)
    return acc.epsilon(delta)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "out" / "ledger.jsonl"


def charge_rounds(path, n, budget=BUDGET, start=0):
    with Ledger.open(path, budget=budget) as led:
        for r in range(start, start + n):
            led.charge(round=r, event=ROUND, note=f"round {r}")
        return led.spent_epsilon


@pytest.mark.parametrize(
    "e, d", [(0, 1e-5), (-1, 1e-5), (float("inf"), 1e-5), (1.0, 0), (1.0, 1.0), (1.0, -0.1)]
)
def test_budget_rejects_bad_values(e, d):
    with pytest.raises(PrivacyError):
        PrivacyBudget(epsilon=e, delta=d)


def test_charge_writes_one_fsynced_line_before_composing(path, monkeypatch):
    log: list[tuple[int, int, float]] = []
    real_fsync = os.fsync

    with Ledger.open(path, budget=BUDGET) as led:

        def recording_fsync(fd):
            real_fsync(fd)
            lines = [ln for ln in path.read_text().splitlines() if ln]
            # (lines on disk, rows in memory, spent in memory) at the moment of the fsync
            log.append((len(lines), len(led.rows), led.spent_epsilon))

        monkeypatch.setattr(ledger_module.os, "fsync", recording_fsync)
        eps1 = led.charge(round=0, event=ROUND, note="first")
        eps2 = led.charge(round=1, event=ROUND, note="second")
    # each fsync saw its line on disk while memory still held the previous state
    assert log == [(1, 0, 0.0), (2, 1, eps1)]
    assert eps1 == pytest.approx(eps_of(1))
    assert eps2 == pytest.approx(eps_of(2))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert list(rows[0]) == [
        "round",
        "event",
        "accountant",
        "delta",
        "epsilon_after",
        "note",
        "timestamp",
    ]
    assert rows[1]["epsilon_after"] == eps2
    assert rows[0]["accountant"] == "rdp" and rows[0]["delta"] == 1e-5
    assert rows[0]["event"] == ROUND.to_dict()


def test_budget_refusal_writes_nothing_and_changes_nothing(path):
    budget = PrivacyBudget(epsilon=eps_of(3) * 1.0001, delta=1e-5)
    with Ledger.open(path, budget=budget) as led:
        for r in range(3):
            led.charge(round=r, event=ROUND)
        before = path.read_bytes()
        spent = led.spent_epsilon
        assert led.epsilon_if_charged(ROUND) > budget.epsilon
        with pytest.raises(BudgetExhaustedError, match="round 3"):
            led.charge(round=3, event=ROUND)
        assert path.read_bytes() == before
        assert led.spent_epsilon == spent
        assert len(led.rows) == 3
        # a cheaper event still fits
        led.charge(round=3, event=Gaussian(noise_multiplier=1000.0))


def test_unsupported_event_is_refused_before_writing(path):
    with Ledger.open(path, budget=BUDGET) as led:
        with pytest.raises(PrivacyError, match="cannot account"):
            led.charge(
                round=0,
                event=PoissonSampled(sampling_probability=0.5, event=Laplace(noise_multiplier=1.0)),
            )
        with pytest.raises(PrivacyError, match="round"):
            led.charge(round=-1, event=ROUND)
    assert path.read_bytes() == b""


def test_replay_restores_spent_budget_and_double_charging_counts_twice(path):
    charge_rounds(path, 4)
    with Ledger.open(path, budget=BUDGET) as led:
        assert led.spent_epsilon == pytest.approx(eps_of(4))
        assert len(led.rows) == 4
        led.charge(round=3, event=ROUND, note="round 3 again after resume")
        assert led.spent_epsilon == pytest.approx(eps_of(5))
    rows = read_ledger(path)
    assert [r.round for r in rows] == [0, 1, 2, 3, 3]
    assert [r.epsilon_after for r in rows] == pytest.approx([eps_of(n) for n in range(1, 6)])


def test_spent_epsilon_never_decreases_on_reopen_with_the_tighter_accountant(path):
    charge_rounds(path, 5)  # RDP
    rdp_spent = read_ledger(path)[-1].epsilon_after
    with Ledger.open(path, budget=BUDGET, accountant=AccountantKind.PLD) as led:
        assert led.spent_epsilon == pytest.approx(rdp_spent)  # PLD alone would say less


def test_delta_mismatch_on_resume_is_refused(path):
    charge_rounds(path, 1)
    with pytest.raises(ResumeError, match="delta"):
        Ledger.open(path, budget=PrivacyBudget(epsilon=3.0, delta=1e-6))


def test_crash_at_every_byte_of_the_last_line_never_under_counts(tmp_path):
    """Truncate the last charge at every byte offset (a crash mid-write). A cut after its
    event closed is recovered and counted; a cut before refuses to open (nothing touched)
    until the operator discards it explicitly; the resumed ledger is whole again."""
    original = tmp_path / "original.jsonl"
    charge_rounds(original, 3)
    data = original.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    event_end = data.index(b', "accountant"', last_start)  # the event dict closes here
    for cut in range(last_start, len(data)):
        path = tmp_path / f"cut{cut}" / "ledger.jsonl"
        path.parent.mkdir()
        torn = data[:cut]
        path.write_bytes(torn)
        if last_start < cut < event_end:
            with pytest.raises(ResumeError, match="torn line"):
                Ledger.open(path, budget=BUDGET)
            assert path.read_bytes() == torn  # nothing touched
            led = Ledger.open(path, budget=BUDGET, discard_unparseable_tail=True)
            expected = 2
        else:
            led = Ledger.open(path, budget=BUDGET)
            expected = 2 if cut == last_start else 3
        with led:
            assert led.spent_epsilon >= eps_of(expected) * (1 - 1e-12), cut
            assert len(led.rows) == expected, cut
            led.charge(round=9, event=ROUND)
        rows = read_ledger(path)  # the repaired file is whole and has the new charge
        assert len(rows) == expected + 1, cut
        assert rows[-1].epsilon_after == pytest.approx(eps_of(expected + 1)), cut
        if expected == 3:
            assert rows[2].round == 2
            assert rows[2].recovered == (cut < len(data) - 1), cut


def test_lost_final_newline_keeps_the_charge(path):
    charge_rounds(path, 2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with Ledger.open(path, budget=BUDGET) as led:
        assert len(led.rows) == 2
        led.charge(round=2, event=ROUND)
    assert [r.round for r in read_ledger(path)] == [0, 1, 2]


def test_read_ledger_shows_a_recoverable_torn_line(path):
    charge_rounds(path, 2)
    data = path.read_bytes()
    cut = data.rfind(b'"accountant"')
    path.write_bytes(data[:cut])
    rows = read_ledger(path)
    assert len(rows) == 2 and rows[-1].recovered
    assert rows[-1].epsilon_after == pytest.approx(eps_of(2))


def test_corrupt_middle_line_is_never_skipped(path):
    charge_rounds(path, 3)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:20] + b"#garbage#" + lines[1][20:]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ResumeError, match="line 2"):
        Ledger.open(path, budget=BUDGET)
    with pytest.raises(ResumeError, match="line 2"):
        read_ledger(path)


def test_failed_write_makes_the_ledger_refuse_further_charges(path, monkeypatch):
    with Ledger.open(path, budget=BUDGET) as led:
        led.charge(round=0, event=ROUND)

        def broken_fsync(fd):
            raise OSError("disk gone")

        monkeypatch.setattr(ledger_module.os, "fsync", broken_fsync)
        with pytest.raises(OSError):
            led.charge(round=1, event=ROUND)
        assert led.spent_epsilon == pytest.approx(eps_of(1))  # not composed in memory
        monkeypatch.undo()
        with pytest.raises(PrivacyError, match="reopen"):
            led.charge(round=2, event=ROUND)
    with Ledger.open(path, budget=BUDGET) as led:  # the line did land: it counts
        assert led.spent_epsilon == pytest.approx(eps_of(2))


def test_read_ledger_missing_file(tmp_path):
    with pytest.raises(ResumeError, match="no privacy ledger"):
        read_ledger(tmp_path / "nope.jsonl")


def test_ledger_rows_round_trip_nested_events(path):
    event = SelfComposed(event=ROUND, count=7)
    with Ledger.open(path, budget=PrivacyBudget(epsilon=50.0, delta=1e-5)) as led:
        led.charge(round=0, event=event, note="seven local steps")
    (row,) = read_ledger(path)
    assert row.event == event and row.note == "seven local steps"
    assert row.accountant is AccountantKind.RDP


# ------------------------------------------------------------------ one job per ledger (lock)

_HOLD = """
import sys, time
from lepton_ray.privacy.ledger import LedgerLock
lock = LedgerLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_process_holds(path):
    """A separate process (a first driver) holding the ledger's lock; yields its pid."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_attack_two_writers_each_within_budget_is_refused(path):
    """Attack (issue 13, finding 3): two jobs on one ledger each check the budget against
    what they charged themselves; together they spend more than it. Before the lock, both
    opens succeeded and the file ended over budget; now the second open is refused."""
    budget = PrivacyBudget(epsilon=eps_of(6) * 1.0001, delta=1e-5)  # room for 6 rounds
    first = Ledger.open(path, budget=budget)
    try:
        with pytest.raises(LedgerLockedError, match=f"pid {os.getpid()}"):
            Ledger.open(path, budget=budget)
        for r in range(6):
            first.charge(round=r, event=ROUND)
    finally:
        first.close()
    with Ledger.open(path, budget=budget) as again:  # released on close: a resume works
        assert again.spent_epsilon <= budget.epsilon
        with pytest.raises(BudgetExhaustedError):
            again.charge(round=6, event=ROUND)


def test_lock_held_by_another_process_names_its_pid(path, other_process_holds):
    with pytest.raises(LedgerLockedError, match=f"pid {other_process_holds} on "):
        Ledger.open(path, budget=BUDGET)
    with pytest.raises(LedgerLockedError, match=f"pid {other_process_holds} on "):
        LedgerLock.acquire(path)
    assert not path.exists()  # refused before anything was created or read


def test_lock_dies_with_its_process(path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    proc.kill()  # a crashed driver: the kernel drops its flock
    proc.wait()
    with Ledger.open(path, budget=BUDGET) as led:
        led.charge(round=0, event=ROUND)


def test_caller_held_lock_spans_the_ledger_and_is_checked(path, tmp_path):
    with LedgerLock.acquire(path) as lock:
        led = Ledger.open(path, budget=BUDGET, lock=lock)
        led.charge(round=0, event=ROUND)
        led.close()  # the caller's lock outlives the ledger
        with pytest.raises(LedgerLockedError):
            Ledger.open(path, budget=BUDGET)
        with pytest.raises(PrivacyError, match="guards"):
            Ledger.open(tmp_path / "other.jsonl", budget=BUDGET, lock=lock)
        led = Ledger.open(path, budget=BUDGET, lock=lock)
    with pytest.raises(PrivacyError, match="released"):  # the job's lock is gone: no charge
        led.charge(round=1, event=ROUND)
    assert len(read_ledger(path)) == 1
    assert ledger_module.lock_path(path).read_text() == ""  # no stale pid once released


def test_a_failed_open_releases_its_lock(path):
    path.parent.mkdir(parents=True)
    path.write_text("not json\n{}\n")
    with pytest.raises(ResumeError):
        Ledger.open(path, budget=BUDGET)
    LedgerLock.acquire(path).release()


# ------------------------------------------------------------------ discarding a ledger


def test_discard_replaces_the_ledger_by_a_record_of_it(path):
    import hashlib

    charge_rounds(path, 3)
    old = path.read_bytes()
    with LedgerLock.acquire(path) as lock:
        record = discard_ledger(path, lock=lock)
    assert record.sha256 == hashlib.sha256(old).hexdigest() and record.bytes == len(old)
    assert record.charges == 3 and record.epsilon_spent == pytest.approx(eps_of(3))
    assert record.delta == 1e-5
    assert path.read_text().count("\n") == 1
    assert json.loads(path.read_text())["discarded_ledger"]["sha256"] == record.sha256
    assert read_discard_record(path) == record
    assert read_ledger(path) == ()
    with Ledger.open(path, budget=BUDGET) as led:  # a fresh budget after the record
        assert led.spent_epsilon == 0.0
        led.charge(round=0, event=ROUND)
    assert len(read_ledger(path)) == 1 and read_discard_record(path) == record


def test_discard_of_an_unreadable_ledger_still_records_its_hash(path):
    path.parent.mkdir(parents=True)
    path.write_text('{"round": 0, "ev')  # torn inside the event: cost unknown
    with LedgerLock.acquire(path) as lock:
        record = discard_ledger(path, lock=lock)
    assert record.charges is None and record.epsilon_spent is None and record.bytes == 16


def test_discard_needs_the_lock(path):
    charge_rounds(path, 1)
    with pytest.raises(PrivacyError, match="LedgerLock"):
        discard_ledger(path, lock=None)


def test_a_discard_record_anywhere_but_the_first_line_is_corruption(path):
    charge_rounds(path, 1)
    with LedgerLock.acquire(path) as lock:
        record = discard_ledger(path, lock=lock)
    charge_rounds(path, 1)
    with open(path, "a") as f:
        f.write(record.to_json() + "\n")
    with pytest.raises(ResumeError, match="line 3"):
        Ledger.open(path, budget=BUDGET)
