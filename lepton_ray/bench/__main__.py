from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("simulate", "secagg", "federation")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m lepton_ray.bench {{{'|'.join(commands)}}} [options]", file=sys.stderr)
        return 2
    if argv[0] == "simulate":
        from lepton_ray.bench.simulate import main as run
    elif argv[0] == "secagg":
        from lepton_ray.bench.secagg import main as run
    else:
        from lepton_ray.bench.federation import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
