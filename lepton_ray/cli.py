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

from lepton_ray import cli_cluster, cli_federation
from lepton_ray.errors import LeptonError, user_message

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

    add_paths(getattr(args, "path", None) or [])
    return load_spec(args.spec, **_overrides(args.set))


def add_paths(paths: list[str]) -> list[Path]:
    """``--path DIR`` (repeatable): put each directory first on ``sys.path`` (the first given
    first), so that ``model.factory``, ``data.loader``, ``training.loss`` and ``training.loop``
    references like ``"package.module:function"`` resolve from it; and first on
    ``PYTHONPATH``, which the processes of an embedded local Ray (``simulate``) inherit, so
    the hosts and training tasks resolve them too. A Ray cluster's nodes do not see this
    machine's directories: ``submit --path`` uploads them with the job instead
    (:func:`lepton_ray.cli_cluster.path_modules`)."""
    import os

    dirs = []
    for given in paths:
        d = Path(given).expanduser().resolve()
        if not d.is_dir():
            raise LeptonError(f"--path {given}: not a directory")
        dirs.append(d)
    for d in reversed(dirs):
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
    if dirs:
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([*map(str, dirs), *([old] if old else [])])
    return dirs


def cmd_validate(args) -> int:
    from lepton_ray.learning.data import load_federated

    spec = _load(args)
    _check_gpus(spec)
    if spec.parties.deploy:  # the parties' files live on their own nodes: check the test file
        from lepton_ray.learning.data import load_server_data

        data = load_server_data(spec.data)
        print(f"ok: {args.spec}: deployment of {spec.parties.count} parties "
              f"({', '.join(d.id for d in spec.parties.deploy)}); test file {data.n_features} "
              f"features, {data.n_classes} classes, {len(data.y_test)} rows")
        return 0
    data = load_federated(spec.data, spec.parties.count, spec.seed)
    from lepton_ray.learning.custom import validate as check_model  # a custom model against the data
    from lepton_ray.learning.models import build_model

    path = check_model(spec, data, build_model(spec.model, data.n_features, data.n_classes, seed=spec.seed))
    sizes = data.party_sizes
    held = ""
    if spec.evaluation.federated:  # every party needs a non-empty held-out split
        from lepton_ray.learning.fed_eval import check_holdout, holdout_rows

        check_holdout(sizes, spec.evaluation.holdout)
        held = (f"; federated evaluation on {holdout_rows(int(sizes.min()), spec.evaluation.holdout)}"
                f"..{holdout_rows(int(sizes.max()), spec.evaluation.holdout)} held-out rows per party")
    print(
        f"ok: {args.spec}: {spec.parties.count} parties ({spec.data.source.value}, "
        f"{spec.data.partition.kind.value}; rows per party {sizes.min()}..{sizes.max()}), "
        f"{data.n_features} features, {data.n_classes} classes, {len(data.y_test)} test rows; "
        f"model {spec.model.kind.value}, {spec.rounds} rounds, "
        f"secure aggregation {spec.secure_aggregation.mode.value}; training {path}{held}"
    )
    return 0


def _check_gpus(spec) -> None:
    """The GPUs a job asks for against the machine ``simulate`` would run it on (an embedded
    local Ray); on a cluster (``RAY_ADDRESS``) they are checked when the job starts."""
    import os

    from lepton_ray.config import Device

    asks = spec.training.gpus_per_party > 0 or any((d.gpus or 0) > 0 for d in spec.parties.deploy)
    if not asks and spec.training.device is not Device.CUDA:
        return
    if os.environ.get("RAY_ADDRESS"):
        print("note: GPUs are checked against the cluster when the job starts", file=sys.stderr)
        return
    from actors.resources import check_local, local_gpu_count

    check_local(spec, local_gpu_count(), say=lambda m: print(f"note: {m}", file=sys.stderr))


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def summary_line(s: dict, output_dir: Any) -> str:
    """The one line ``simulate`` prints at the end (metrics a job never reached: ``n/a``)."""
    final = s.get("final") or {}
    privacy = s.get("privacy") or {}
    return (
        f"{s['name']}: {s['status']}, {s['rounds_completed']} rounds, {s['parties']} parties on "
        f"{s['hosts']} hosts; test accuracy {_fmt(final.get('test_accuracy'))}, macro F1 "
        f"{_fmt(final.get('test_f1'))}, loss {_fmt(final.get('test_loss'))}; "
        f"{_fmt(s.get('seconds_per_round'), '.3f')} s/round; outputs in {output_dir}"
        + (f"; epsilon {privacy['epsilon_spent']:.3f} of {privacy['epsilon_budget']:g}"
           if privacy.get("epsilon_spent") is not None else "")
        + (f"; stopped: {s['reason']}" if s.get("reason") else "")
    )


def cmd_simulate(args) -> int:
    import dataclasses

    from actors.driver import run_job

    spec = _load(args)
    if args.resume:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, dir=args.resume))
    if args.quiet:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, progress=False))
    result = run_job(spec, overwrite=args.overwrite, resume=bool(args.resume),
                     num_cpus=args.num_cpus, dashboard=args.dashboard,
                     discard_privacy_ledger=args.discard_privacy_ledger)
    print(summary_line(result.summary, result.output_dir))
    return 0


def _skellam_args(args) -> dict:
    missing = [f"--{n.replace('_', '-')}" for n in ("bits", "parties", "dim")
               if getattr(args, n) is None]
    if missing:
        raise LeptonError(f"--mechanism skellam needs {', '.join(missing)}")
    if args.accountant != "rdp":
        raise LeptonError("--mechanism skellam is accounted with RDP only (--accountant rdp)")
    survivors = args.min_survivors if args.min_survivors is not None else args.parties
    return dict(bits=args.bits, dim=args.dim, clip_norm=args.clip_norm, parties=args.parties,
                min_survivors=survivors, colluding=args.colluding)


def _discrete_rdp_only(args) -> None:
    if args.accountant != "rdp":
        raise LeptonError("--mechanism discrete_gaussian is accounted with RDP only (--accountant rdp)")


def cmd_epsilon(args) -> int:
    from lepton_ray.privacy.accountants import AccountantKind
    from lepton_ray.privacy.calibration import compute_epsilon

    if args.mechanism == "skellam":
        from lepton_ray.privacy.skellam import skellam_epsilon, skellam_params

        kw = _skellam_args(args)
        eps = skellam_epsilon(sampling_rate=args.sampling_rate, steps=args.steps, delta=args.delta,
                              noise_multiplier=args.noise_multiplier, **kw)
        p = skellam_params(noise_multiplier=args.noise_multiplier, **kw)
        if args.json:
            print(json.dumps({"epsilon": eps, "gamma": p.gamma,
                              "wraparound_probability": p.wraparound_probability}))
        else:
            print(f"epsilon = {eps:.6g} at delta = {args.delta:g} (distributed Skellam, {args.bits} "
                  f"bits, {kw['min_survivors']} of {args.parties} parties surviving, "
                  f"{kw['colluding']} of them colluding; scale gamma = "
                  f"{p.gamma:.4g}, wrap-around probability <= {p.wraparound_probability:.2g})")
        return 0
    if args.mechanism == "discrete_gaussian":
        from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon

        _discrete_rdp_only(args)
        eps = discrete_gaussian_epsilon(sampling_rate=args.sampling_rate, steps=args.steps,
                                        noise_multiplier=args.noise_multiplier, delta=args.delta)
    else:
        eps = compute_epsilon(sampling_rate=args.sampling_rate, noise_multiplier=args.noise_multiplier,
                              steps=args.steps, delta=args.delta,
                              accountant=AccountantKind(args.accountant))
    print(json.dumps({"epsilon": eps}) if args.json else
          f"epsilon = {eps:.6g} at delta = {args.delta:g} ({args.accountant.upper()}; q = "
          f"{args.sampling_rate:g}, z = {args.noise_multiplier:g}, {args.steps} steps)")
    return 0


def cmd_calibrate(args) -> int:
    from lepton_ray.privacy.accountants import AccountantKind
    from lepton_ray.privacy.calibration import calibrate_noise

    if args.mechanism == "skellam":
        from lepton_ray.privacy.skellam import calibrate_skellam

        p = calibrate_skellam(target_epsilon=args.epsilon, delta=args.delta,
                              sampling_rate=args.sampling_rate, steps=args.steps, **_skellam_args(args))
        if args.json:
            print(json.dumps({"noise_multiplier": p.noise_multiplier, "gamma": p.gamma,
                              "wraparound_probability": p.wraparound_probability}))
        else:
            print(f"noise multiplier = {p.noise_multiplier:.6g} (distributed Skellam, {args.bits} bits; "
                  f"gamma = {p.gamma:.4g}, wrap-around probability <= {p.wraparound_probability:.2g})")
        return 0
    if args.mechanism == "discrete_gaussian":
        from lepton_ray.privacy.discrete_gaussian import calibrate_discrete_gaussian

        _discrete_rdp_only(args)
        z = calibrate_discrete_gaussian(target_epsilon=args.epsilon, delta=args.delta,
                                        sampling_rate=args.sampling_rate, steps=args.steps)
    else:
        z = calibrate_noise(target_epsilon=args.epsilon, delta=args.delta,
                            sampling_rate=args.sampling_rate, steps=args.steps,
                            accountant=AccountantKind(args.accountant))
    print(json.dumps({"noise_multiplier": z}) if args.json else
          f"noise multiplier = {z:.6g}: the smallest whose epsilon <= {args.epsilon:g} at delta = "
          f"{args.delta:g} ({args.accountant.upper()}; q = {args.sampling_rate:g}, {args.steps} steps)")
    return 0


def cmd_ledger(args) -> int:
    from lepton_ray.outputs import LEDGER
    from lepton_ray.privacy.ledger import read_discard_record, read_ledger

    path = Path(args.out) / LEDGER
    if not path.exists():
        raise LeptonError(f"{args.out}: no {LEDGER} here (did the job run with privacy on?)")
    rows = read_ledger(path)
    if args.json:
        print(json.dumps([json.loads(r.to_json()) for r in rows]))
        return 0
    discarded = read_discard_record(path)
    if discarded is not None:
        print(f"(replaced a discarded ledger on {discarded.discarded_at}: {discarded.charges} "
              f"charges, epsilon {discarded.epsilon_spent}, sha256 {discarded.sha256})")
    print(f"{'round':>5}  {'epsilon':>9}  {'delta':>7}  {'acct':4}  event")
    for r in rows:
        flag = "  (recovered after a crash)" if r.recovered else ""
        print(f"{r.round:>5}  {r.epsilon_after:>9.4f}  {r.delta:>7.0e}  {r.accountant.value:4}  "
              f"{_describe(r.event)}{flag}")
    return 0


def _describe(event) -> str:
    d = event.to_dict()
    return ", ".join(f"{k}={v}" for k, v in _flatten(d).items())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = f"{v:.4g}" if isinstance(v, float) else v
    return out


def cmd_audit(args) -> int:
    from lepton_ray.audit import write_report

    print(f"wrote {write_report(Path(args.out))}")
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
        p.add_argument("--path", action="append", default=[], metavar="DIR",
                       help="prepend DIR to sys.path (repeatable) so that "
                            "'package.module:function' references in the spec import from it")
        return p

    p = with_spec(sub.add_parser("simulate", help="run a job on an embedded local Ray"))
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in output.dir")
    p.add_argument("--discard-privacy-ledger", action="store_true",
                   help="with --overwrite: also replace the privacy ledger (the budget already "
                        "spent); the new ledger's first line records the discard")
    p.add_argument("--resume", metavar="OUT", default=None,
                   help="continue the job whose outputs are in OUT from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray")
    p.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard with the embedded Ray and print its URL")
    p.set_defaults(func=cmd_simulate)

    p = with_spec(sub.add_parser("validate", help="check a job spec and its data"))
    p.set_defaults(func=cmd_validate)

    def privacy_args(p):
        p.add_argument("--delta", type=float, required=True)
        p.add_argument("--sampling-rate", type=float, required=True, metavar="Q")
        p.add_argument("--steps", type=int, required=True, metavar="T")
        p.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
        p.add_argument("--json", action="store_true")
        g = p.add_argument_group("distributed DP (--mechanism skellam)")
        g.add_argument("--mechanism", choices=["gaussian", "discrete_gaussian", "skellam"],
                       default="gaussian",
                       help="gaussian: the continuous reference; discrete_gaussian: the central "
                            "noise jobs add (the bound their ledger charges) and record-level "
                            "DP-SGD's per-step noise; skellam: "
                            "distributed noise inside SecAgg")
        g.add_argument("--bits", type=int, help="bit width of the Skellam ring")
        g.add_argument("--parties", type=int, help="parties per round")
        g.add_argument("--min-survivors", type=int, help="parties that must survive (default: all)")
        g.add_argument("--dim", type=int, help="model dimension")
        g.add_argument("--colluding", type=int, default=0, metavar="C",
                       help="survivors that may collude with the server and subtract their "
                            "shares; shares are sized for the other n_min - C (default 0; a "
                            "job's default is 10%% of the sampled parties, at least 1)")
        g.add_argument("--clip-norm", type=float, default=1.0)

    p = sub.add_parser("epsilon", help="epsilon of T steps of the Poisson-sampled Gaussian")
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="Z")
    privacy_args(p)
    p.set_defaults(func=cmd_epsilon)

    p = sub.add_parser("calibrate", help="smallest noise multiplier within an epsilon budget")
    p.add_argument("--epsilon", type=float, required=True)
    privacy_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ledger", help="print a job's privacy ledger with the running epsilon")
    p.add_argument("out", help="a job's output directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("audit", help="write OUT/audit.md, the job's compliance report")
    p.add_argument("out", help="a job's output directory")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("plot", help="write OUT/history.png (accuracy and loss per round)")
    p.add_argument("out", help="a job's output directory")
    p.set_defaults(func=cmd_plot)
    cli_cluster.register(sub)  # submit, status, logs, decrypt
    cli_federation.register(sub)  # provision, party, coordinator
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LeptonError as exc:
        print(f"lepton-ray {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
