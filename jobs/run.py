"""The entrypoint a Ray job runs: ``python -m jobs.run SPEC [--set KEY.PATH=VALUE ...] [--overwrite]``.

``lepton-ray submit`` (and a plain ``ray job submit --working-dir . -- python -m jobs.run ...``)
runs this on the cluster's head node, inside Ray's copy of the working directory, with
``RAY_ADDRESS`` set by the job supervisor: :func:`actors.driver.run_job` then joins that
cluster instead of starting an embedded one. Relative paths (the spec, ``data.path``,
``output.dir``) resolve against that copy; give ``output.dir`` as an absolute path on
storage that outlives the job to keep its outputs.

A :class:`~lepton_ray.errors.LeptonError` (a bad spec, unreadable data, an output directory
that already holds outputs) ends the job with a one-paragraph message and exit code 2, so
the job shows as FAILED with the reason at the end of its logs and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from lepton_ray.errors import LeptonError, user_message

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.run",
        description="Run one Lepton-Ray job on the Ray cluster this process can reach "
                    "(RAY_ADDRESS), or on an embedded local Ray.")
    parser.add_argument("spec", help="job spec (YAML), relative to the working directory")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                        help="override spec fields, e.g. --set rounds=5 training.lr=0.05")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs already in output.dir")
    parser.add_argument("--discard-privacy-ledger", action="store_true",
                        help="with --overwrite: also replace the privacy ledger; the new "
                             "ledger's first line records the discard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LeptonError as exc:
        print(f"jobs.run: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from lepton_ray.cli import _overrides
    from lepton_ray.config import load_spec

    spec = load_spec(args.spec, **_overrides(args.set))
    if args.quiet:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, progress=False))
    from actors.driver import run_job  # lazy: Ray loads only once the spec is known good

    result = run_job(spec, overwrite=args.overwrite,
                     discard_privacy_ledger=args.discard_privacy_ledger)
    s = result.summary
    final = s.get("final") or {}
    metrics = ", ".join(f"{k.removeprefix('test_')} {final[k]:.4f}"
                        for k in ("test_accuracy", "test_f1", "test_loss")
                        if isinstance(final.get(k), (int, float)))
    print(f"{s.get('name', spec.name)}: {s.get('status')}, {s.get('rounds_completed')} rounds, "
          f"{s.get('parties')} parties on {s.get('hosts')} hosts; {metrics}; "
          f"outputs in {result.output_dir.resolve()}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
