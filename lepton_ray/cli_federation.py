"""``lepton-ray provision``: the federation commands (see README "Federation across
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
