"""Serve Tessera from a Prefect work pool instead of the embedded runner, when one box is not enough:

    prefect work-pool create tessera --type process
    python -m deployments.deploy --pool tessera       # registers Tessera's deployments, run from this checkout
    tessera worker --pool tessera                     # on each machine that trains (with this checkout installed)

then point clients at the same server: export PREFECT_API_URL=http://<server>:4200/api. README "When one machine is
not enough" has the whole topology.
"""

import argparse
from pathlib import Path

from deployments.serve import deployments, ensure_concurrency_limits

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="tessera", help="the work pool whose workers run them (default: tessera)")
    parser.add_argument("--source", default=str(REPO), help="where workers find this repository (default: here)")
    parser.add_argument("--name", default="default", help="the deployments' name (default: default)")
    args = parser.parse_args(argv)
    ensure_concurrency_limits()
    ids = []
    for flow, entrypoint, options in deployments():
        remote = flow.from_source(source=args.source, entrypoint=entrypoint)
        ids.append(str(remote.deploy(**{**options, "name": args.name}, work_pool_name=args.pool,
                                     print_next_steps=False)))
    return ids


if __name__ == "__main__":
    print("\n".join(main()))
