"""Serve Tessera from a Prefect work pool instead of the embedded runner, when one box is not enough:

    prefect work-pool create tessera --type process
    python -m deployments.deploy --pool tessera       # registers finetune/default, run from this checkout
    prefect worker start --pool tessera               # on each machine that trains (with this checkout installed)

then point clients at the same server: export PREFECT_API_URL=http://<server>:4200/api.
"""

import argparse
from pathlib import Path

from flows.finetune import finetune
from deployments.serve import deployment_options

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="tessera", help="the work pool whose workers run it (default: tessera)")
    parser.add_argument("--source", default=str(REPO), help="where workers find this repository (default: here)")
    parser.add_argument("--name", default="default", help="the deployment's name (default: default)")
    args = parser.parse_args(argv)
    flow = finetune.from_source(source=args.source, entrypoint="flows/finetune.py:finetune")
    options = {**deployment_options(), "name": args.name}
    deployment_id = flow.deploy(**options, work_pool_name=args.pool, print_next_steps=False)
    return str(deployment_id)


if __name__ == "__main__":
    print(main())
