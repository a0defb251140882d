"""``lepton-ray submit | status | logs | decrypt``: the cluster and at-rest edge of the CLI.

``submit`` sends ``python -m jobs.run SPEC ...`` (see :mod:`jobs.run`) to a Ray cluster's job
server through :class:`ray.job_submission.JobSubmissionClient`, uploading this project as
the job's ``working_dir``. The spec and the overrides are checked here first, so a bad spec
fails in a second with exit code 2 instead of on the cluster.

The job server's address comes from ``--address`` (e.g. ``http://HEAD:8265``), else from
``RAY_API_SERVER_ADDRESS``, else from ``RAY_ADDRESS``. An explicit ``--address`` wins over both
variables (Ray's client alone would let the variables win). Without any of them we refuse
rather than let Ray auto-detect whatever local cluster happens to run on this machine.

Clusters with token authentication (Ray's default for ``ray start`` when a token exists)
need ``RAY_AUTH_MODE=token`` on this side too, with the token in ``~/.ray/auth_token``,
``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``, exactly as for ``ray job submit``.

Everything Ray raises about the cluster (unreachable, refused, unknown job) becomes a
:class:`~lepton_ray.errors.LeptonError`, so the CLI prints one message and exits 2.
Ray is imported only inside these commands: ``lepton-ray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lepton_ray.errors import DataError, LeptonError

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

#: Never uploaded with the working directory (gitignore syntax, as Ray's ``excludes``).
UPLOAD_EXCLUDES = (
    "runs/", ".git/", "__pycache__/", "*.pyc", ".pytest_cache/", ".hypothesis/",
    ".ruff_cache/", ".benchmarks/", "*.egg-info/", ".venv/", "build/", "dist/",
)

EXIT_FAILED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``status``, ``logs`` and ``decrypt`` to ``lepton-ray``'s subcommands."""

    def with_address(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", default=None, metavar="URL",
                       help="the cluster's job server, e.g. http://HEAD:8265 (default: "
                            "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
        return p

    p = with_address(subparsers.add_parser(
        "submit", help="run a job on a Ray cluster (Ray Jobs); prints the job id"))
    p.add_argument("spec", help="job spec (YAML) inside the working directory")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                   help="override spec fields, e.g. --set rounds=5 training.lr=0.05")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in output.dir")
    p.add_argument("--discard-privacy-ledger", action="store_true",
                   help="with --overwrite: also replace the privacy ledger; the new ledger's "
                        "first line records the discard")
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs until it ends; exit 0 if it succeeded, 1 if not")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="directory uploaded as the job's working_dir (default: this project's "
                        "root, the directory holding pyproject.toml)")
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="a directory whose packages and modules the spec's "
                        "'package.module:function' references import from (repeatable): on "
                        "sys.path here, uploaded with the job (Ray runtime_env py_modules)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="install a pip requirement for the job (repeatable); not needed on "
                        "clusters built from cluster.yaml, which install the project")
    p.add_argument("--submission-id", default=None, help="choose the job id (default: Ray's)")
    p.set_defaults(func=cmd_submit)

    p = with_address(subparsers.add_parser("status", help="a submitted job's status"))
    p.add_argument("job", help="job (submission) id, as printed by submit")
    p.set_defaults(func=cmd_status)

    p = with_address(subparsers.add_parser("logs", help="a submitted job's logs"))
    p.add_argument("job", help="job (submission) id, as printed by submit")
    p.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser(
        "decrypt", help="restore the plaintext of a file encrypted at rest (AES-256-GCM)")
    p.add_argument("file", help="the encrypted file (usually NAME.enc)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--key-file", metavar="PATH",
                        help="file holding the key: 32 raw bytes, 64 hex digits or base64")
    source.add_argument("--key-env", metavar="VAR",
                        help="environment variable holding the key (64 hex digits or base64)")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="where to write the plaintext ('-' for stdout; default: FILE without .enc)")
    p.add_argument("--associated", default=None, metavar="TEXT",
                   help="the associated data the file was sealed with (default: the file's name "
                        "without .enc, which is what a job binds to model.pt.enc and "
                        "checkpoint.pt.enc)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_decrypt)


# --------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    from lepton_ray.cli import _overrides, add_paths
    from lepton_ray.config import load_spec

    modules = path_modules(add_paths(args.path))
    root = _working_dir(args.working_dir)
    spec_path = _spec_inside(root, Path(args.spec))
    spec = load_spec(spec_path, **_overrides(args.set))  # a bad spec fails here, not remotely
    entrypoint = job_entrypoint(spec_path.relative_to(root).as_posix(), args.set,
                                overwrite=args.overwrite,
                                discard_privacy_ledger=args.discard_privacy_ledger)
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(UPLOAD_EXCLUDES)}
    if modules:
        runtime_env["py_modules"] = modules
    if args.pip:
        runtime_env["pip"] = list(args.pip)
    if not Path(spec.output.dir).is_absolute():
        _note(args, f"output.dir {spec.output.dir!r} is relative: the outputs land in the job's "
                    "copy of the working directory on the head node, which Ray deletes later; "
                    "use an absolute path on lasting storage to keep them")
    client, address = _client(args.address)
    with _ray_errors(f"cannot submit to {address}"):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   submission_id=args.submission_id)
    print(job_id, flush=True)
    if not args.wait:
        _note(args, f"submitted {job_id}; follow it with: lepton-ray logs {job_id} --follow "
                    f"--address {address}")
        return 0
    _stream_logs(client, job_id)
    return _final_status(args, client, job_id)


def path_modules(dirs: list[Path]) -> list[str]:
    """What ``submit --path DIR`` uploads: every package (a directory holding ``__init__.py``)
    and every ``.py`` module directly in each DIR, as Ray ``py_modules`` entries; on every
    node of the job they are importable by the same names as here (a directory on
    ``sys.path`` is not itself something Ray can ship)."""
    out: list[str] = []
    for d in dirs:
        found = sorted(str(c) for c in d.iterdir()
                       if not c.name.startswith((".", "_"))
                       and ((c.is_dir() and (c / "__init__.py").is_file())
                            or (c.is_file() and c.suffix == ".py")))
        if not found:
            raise LeptonError(f"--path {d}: holds no Python package (a directory with "
                              "__init__.py) or .py module to upload")
        out += found
    return out


def job_entrypoint(spec: str, overrides: list[str], *, overwrite: bool = False,
                   discard_privacy_ledger: bool = False) -> str:
    """The shell command a job runs, e.g. ``python -m jobs.run jobs/digits.yaml --set rounds=1``."""
    argv = ["python", "-m", "jobs.run", spec]
    if overrides:
        argv += ["--set", *overrides]
    if overwrite:
        argv.append("--overwrite")
    if discard_privacy_ledger:
        argv.append("--discard-privacy-ledger")
    return shlex.join(argv)


def project_root() -> Path | None:
    """The source tree this package runs from, if it is one (editable install / checkout)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "jobs").is_dir() else None


def _working_dir(given: str | None) -> Path:
    if given is not None:
        root = Path(given).resolve()
        if not root.is_dir():
            raise LeptonError(f"--working-dir {given}: not a directory")
        return root
    root = project_root()
    if root is None:
        raise LeptonError("this Lepton-Ray is not installed from a source tree; pass "
                          "--working-dir DIR (a checkout holding pyproject.toml and jobs/)")
    return root


def _spec_inside(root: Path, spec: Path) -> Path:
    path = spec.resolve()
    if not path.is_file():
        raise LeptonError(f"job spec not found: {spec}")
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise LeptonError(f"job spec {spec} lies outside the working directory {root} that is "
                          "uploaded to the cluster; move it there or pass --working-dir") from None
    top = rel.parts[0] + "/"
    if top in UPLOAD_EXCLUDES:
        raise LeptonError(f"job spec {spec} lies in {top}, which is not uploaded to the cluster")
    return path


# --------------------------------------------------------------------------- status, logs


def cmd_status(args: argparse.Namespace) -> int:
    client, address = _client(args.address)
    with _ray_errors(f"cannot get job {args.job} from {address}"):
        info = client.get_job_info(args.job)
    print(f"{args.job}: {info.status}")
    for label, value in (("entrypoint", info.entrypoint), ("message", info.message),
                         ("started", _when(info.start_time)), ("ended", _when(info.end_time))):
        if value:
            print(f"  {label}: {value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client, address = _client(args.address)
    if args.follow:
        with _ray_errors(f"cannot get job {args.job} from {address}"):
            client.get_job_status(args.job)  # an unknown id fails cleanly before streaming
        _stream_logs(client, args.job)
        return 0
    with _ray_errors(f"cannot get the logs of job {args.job} from {address}"):
        text = client.get_job_logs(args.job)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------- decrypt


def cmd_decrypt(args: argparse.Namespace) -> int:
    from lepton_ray.crypto.at_rest import decrypted_name, load_key, read_encrypted
    from lepton_ray.outputs import atomic_write_bytes

    source = Path(args.file)
    to_stdout = args.output == "-"
    out = None if to_stdout else Path(args.output) if args.output else decrypted_name(source)
    if out is not None:
        if out.exists() and out.resolve() == source.resolve():
            raise DataError(f"{out}: refusing to write the plaintext over the encrypted file")
        if out.exists() and not args.overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it or -o OUT")
    key = load_key(key_file=args.key_file, key_env=args.key_env)
    associated = args.associated if args.associated is not None else source.name.removesuffix(".enc")
    plaintext = read_encrypted(source, key, associated=associated.encode())
    if to_stdout:
        sys.stdout.buffer.write(plaintext)
        sys.stdout.buffer.flush()
        return 0
    atomic_write_bytes(out, plaintext)
    print(f"wrote {out} ({len(plaintext)} bytes)")
    return 0


# --------------------------------------------------------------------------- Ray plumbing


def resolve_address(explicit: str | None) -> str:
    """``--address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``."""
    for value in (explicit, *(os.environ.get(v) for v in ADDRESS_VARIABLES)):
        if value and value.strip():
            return value.strip()
    raise LeptonError("no cluster address: pass --address http://HEAD:8265 or set "
                      "RAY_API_SERVER_ADDRESS (or RAY_ADDRESS)")


def _client(explicit: str | None):
    """A connected JobSubmissionClient and the address it talks to."""
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # not Ray's upload/websocket chatter
    address = resolve_address(explicit)
    hidden = ADDRESS_VARIABLES if explicit else ()
    with _ray_errors(f"cannot reach the Ray job server at {address}", address=address), \
            _hidden_env(hidden):
        client = JobSubmissionClient(address)
    return client, address


@contextmanager
def _hidden_env(names) -> Iterator[None]:
    """Hide variables while Ray's client resolves its address (it lets them override ours)."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _ray_errors(what: str, *, address: str | None = None) -> Iterator[None]:
    """Ray's client errors -> LeptonError with the same text (no traceback at the CLI)."""
    from ray.exceptions import AuthenticationError, RayError

    try:
        yield
    except AuthenticationError as exc:
        raise LeptonError(
            f"{what}: the cluster requires its authentication token; set RAY_AUTH_MODE=token "
            "and provide the token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN). "
            f"Ray says: {_first_line(exc)}") from None
    except (RayError, ConnectionError, RuntimeError, ValueError, TypeError, OSError) as exc:
        hint = ""
        if address is not None and "://" not in address:
            hint = (" (an address without http:// is taken as the cluster's GCS address, "
                    "HEAD:6379; the job server is http://HEAD:8265)")
        raise LeptonError(f"{what}: {_first_line(exc)}{hint}") from None


def _stream_logs(client, job_id: str) -> None:
    """Print the job's logs as they come (Ray's websocket tail) until the job ends."""
    import asyncio

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(follow())
    except Exception as exc:  # noqa: BLE001 - aiohttp/websocket errors: fall back to polling
        print(f"(log stream interrupted: {_first_line(exc)}; waiting for the job to end)",
              file=sys.stderr)


def _final_status(args: argparse.Namespace, client, job_id: str, poll_s: float = 0.5) -> int:
    with _ray_errors(f"cannot get job {job_id}"):
        while not (info := client.get_job_info(job_id)).status.is_terminal():
            time.sleep(poll_s)
    status = str(info.status)
    line = f"job {job_id} {status}"
    if status != "SUCCEEDED" and info.message:
        line += f": {_first_line(info.message).split(', last available logs')[0]}"
    _note(args, line)
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def _note(args: argparse.Namespace, text: str) -> None:
    print(f"lepton-ray {args.command}: {text}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _when(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
