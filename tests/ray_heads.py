"""Shared by the tests that start their own Ray head (``ray start --head`` in its own process
group and its own ``--temp-dir``): find that session's processes and end them all, never any
other Ray instance on the machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def session_processes(temp_dir: str, root: psutil.Process | None) -> list[psutil.Process]:
    """Processes of the Ray session under ``temp_dir``: descendants of the head's ``ray start``
    and anything whose command line or working directory names the temp dir (fake nodes,
    workers, job drivers), with their descendants."""
    found: dict[int, psutil.Process] = {}
    if root is not None:
        try:
            found[root.pid] = root
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if p.pid == os.getpid():
            continue
        cmd = " ".join(p.info.get("cmdline") or [])
        if temp_dir in cmd or (p.info.get("cwd") or "").startswith(temp_dir):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def stop_session(head: subprocess.Popen, temp_dir: str) -> list[str]:
    """End the head's process group (TERM, then KILL), then every leftover process of its
    session; return a description of whatever is still alive afterwards (should be nothing)."""
    try:
        root = psutil.Process(head.pid)
    except psutil.NoSuchProcess:
        root = None
    procs = session_processes(temp_dir, root)  # snapshot before orphans lose their parent
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(head.pid, signal.SIGKILL)  # the rest of the group, if the leader went first
    except ProcessLookupError:
        pass
    procs += session_processes(temp_dir, None)
    swept = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                swept.append(f"{p.name()} (pgid {os.getpgid(p.pid)})")
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    print(f"\nteardown: {len(swept)} process(es) of the session outlived its process group: "
          f"{', '.join(swept)}")
    for p in procs:
        try:
            p.kill()  # psutil checks the start time: a reused pid is never hit
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [f"{p.pid} {' '.join(p.cmdline())[:80]}"
            for p in session_processes(temp_dir, None) if p.is_running()]
