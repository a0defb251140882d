"""``lepton-ray provision``, ``party`` and ``coordinator``: the federation commands (see README "Federation across
organisations"). Registered on the main parser by :func:`register`."""

from __future__ import annotations


def cmd_provision(args) -> int:
    from lepton_ray.federation.provision import FederationSpec, load_kit, provision

    spec = FederationSpec.load(args.federation)
    kits = provision(spec, args.out)
    roster = load_kit(kits["coordinator"]).roster
    print(f"federation {spec.name}: CA in {kits['coordinator'].parent / 'ca'} (keep it offline; "
          f"it is not part of any kit)")
    print(f"roster {roster.roster_hash} ({len(roster.parties)} parties, signed by the CA)")
    for site, path in kits.items():
        kit = load_kit(path)
        who = "coordinator" if kit.index is None else f"party {kit.index}"
        print(f"  {path}  {who:<12} cert sha256 {kit.fingerprint[:16]}...")
    return 0


def register(sub) -> None:
    p = sub.add_parser("provision", help="write the federation's CA and one startup kit per site")
    p.add_argument("federation", help="federation file (YAML: name, coordinator, parties)")
    p.add_argument("--out", required=True, metavar="KITS", help="directory for the kits (new)")
    p.set_defaults(func=cmd_provision)
    register_processes(sub)


def cmd_party(args) -> int:
    from lepton_ray.federation.party_process import run_party

    return run_party(kit=args.kit, data=args.data, policy=args.policy, state=args.state,
                     record=args.record, connect=args.connect,
                     exit_after_job=args.exit_after_job, address=args.address)


def cmd_coordinator(args) -> int:
    from lepton_ray.config import parse_assignment
    from lepton_ray.federation.coordinator_process import run_coordinator

    overrides = {}
    for text in args.set or []:
        key, value = parse_assignment(text)
        overrides[key.replace(".", "__")] = value
    return run_coordinator(kit=args.kit, job=args.spec, min_parties=args.min_parties,
                           wait_s=args.wait_s, out=args.out, overwrite=args.overwrite,
                           listen=args.listen, record=args.record, overrides=overrides,
                           resume=args.resume, address=args.address)


def register_processes(sub) -> None:
    p = sub.add_parser("party", help="run this organisation's site: dial out to the "
                                     "coordinator, train on its own data, take part in SecAgg+")
    p.add_argument("--kit", required=True, metavar="KITS/<party>", help="this site's kit")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="this site's CSV or Parquet file (with the job's label column)")
    p.add_argument("--policy", metavar="POLICY.yaml", default=None,
                   help="the site's policy (default: secure aggregation required)")
    p.add_argument("--state", metavar="DIR", default=None,
                   help="participation log and privacy ledger (default: KIT/state)")
    p.add_argument("--record", metavar="DIR", default=None,
                   help="test mode: write each round's ring input to DIR")
    p.add_argument("--connect", metavar="HOST:PORT", default=None,
                   help="the coordinator's address (default: the kit's)")
    p.add_argument("--address", metavar="RAY_ADDRESS", default=None,
                   help="join this organisation's own Ray cluster (default: start an embedded "
                        "local Ray for the site's PartyHost and training tasks)")
    p.add_argument("--exit-after-job", action="store_true",
                   help="exit when the coordinator ends a job (default: serve until stopped)")
    p.set_defaults(func=cmd_party)

    p = sub.add_parser("coordinator", help="run a job across the federation's sites")
    p.add_argument("spec", help="job spec (YAML; data.source party_files with test_path)")
    p.add_argument("--kit", required=True, metavar="KITS/coordinator")
    p.add_argument("--min-parties", type=int, default=None, metavar="N",
                   help="sites to wait for before starting (default: every site in the roster)")
    p.add_argument("--wait-s", type=float, default=300.0, metavar="S",
                   help="how long to wait for them (default 300)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (output.dir)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")
    p.add_argument("--resume", action="store_true",
                   help="continue the job in DIR from its checkpoint (a fresh job id: sites "
                        "are offered it again; re-run rounds are new executions)")
    p.add_argument("--address", metavar="RAY_ADDRESS", default=None,
                   help="run the driver's actors on this Ray cluster (default: embedded local)")
    p.add_argument("--listen", metavar="[HOST:]PORT", default=None,
                   help="listen address (default: all interfaces, the kit's port)")
    p.add_argument("--record", metavar="DIR", default=None,
                   help="test mode: write each round's unmasked ring sum to DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field (repeatable)")
    p.set_defaults(func=cmd_coordinator)
