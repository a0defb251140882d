"""``lepton-ray``: the command line, a thin edge over the library and the runtime.

Every deliberate error (a :class:`~lepton_ray.errors.LeptonError`) is printed as a short
message naming what is wrong, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lepton_ray.errors import LeptonError

EXIT_USAGE = 2


def _overrides(pairs: list[str]) -> dict[str, Any]:
    from lepton_ray.config import parse_assignment

    out = {}
    for text in pairs or []:
        key, value = parse_assignment(text)
        out[key.replace(".", "__")] = value
    return out


def _load(args) -> Any:
    from lepton_ray.config import load_spec

    return load_spec(args.spec, **_overrides(args.set))


def cmd_validate(args) -> int:
    from lepton_ray.learning.data import load_federated

    spec = _load(args)
    data = load_federated(spec.data, spec.parties.count, spec.seed)
    sizes = data.party_sizes
    print(
        f"ok: {args.spec}: {spec.parties.count} parties ({spec.data.source.value}, "
        f"{spec.data.partition.kind.value}; rows per party {sizes.min()}..{sizes.max()}), "
        f"{data.n_features} features, {data.n_classes} classes, {len(data.y_test)} test rows; "
        f"model {spec.model.kind.value}, {spec.rounds} rounds, "
        f"secure aggregation {spec.secure_aggregation.mode.value}"
    )
    return 0


def cmd_simulate(args) -> int:
    import dataclasses

    from actors.driver import run_job

    spec = _load(args)
    if args.quiet:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, progress=False))
    result = run_job(spec, overwrite=args.overwrite, num_cpus=args.num_cpus)
    s = result.summary
    final = s["final"]
    print(
        f"{s['name']}: {s['status']}, {s['rounds_completed']} rounds, {s['parties']} parties on "
        f"{s['hosts']} hosts; test accuracy {final['test_accuracy']:.4f}, macro F1 "
        f"{final['test_f1']:.4f}, loss {final['test_loss']:.4f}; "
        f"{s['seconds_per_round']:.3f} s/round; outputs in {result.output_dir}"
    )
    return 0


def cmd_plot(args) -> int:
    from lepton_ray.plotting import plot_history

    path = plot_history(Path(args.out))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lepton-ray", description="Privacy-preserving federated learning on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_spec(p):
        p.add_argument("spec", help="job spec (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a spec field (repeatable), e.g. --set training.lr=0.05")
        return p

    p = with_spec(sub.add_parser("simulate", help="run a job on an embedded local Ray"))
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in output.dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray")
    p.set_defaults(func=cmd_simulate)

    p = with_spec(sub.add_parser("validate", help="check a job spec and its data"))
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plot", help="write OUT/history.png (accuracy and loss per round)")
    p.add_argument("out", help="a job's output directory")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LeptonError as exc:
        print(f"lepton-ray {args.command}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _message(exc: BaseException) -> str:
    """The user-facing text of an error, unwrapping Ray's task-error wrapper if present."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LeptonError):
        return str(cause)
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
