"""The local runner: serves `finetune/default` from this machine. Started by the embedded default."""

import os

from prefect import serve
from prefect.deployments.runner import EntrypointType

from flows.finetune import finetune

MAX_ACTIVE_RUNS = int(os.environ.get("TESSERA_MAX_ACTIVE_RUNS", "10"))


def main() -> None:
    deployment = finetune.to_deployment(
        name="default",
        description="One Tessera fine-tuning run, from validation to a registered model.",
        tags=["tessera"],
        # Runs past the limit wait in AwaitingConcurrencySlot (QUEUED) instead of overloading the box.
        concurrency_limit=MAX_ACTIVE_RUNS,
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any working directory
    )
    serve(deployment, limit=MAX_ACTIVE_RUNS, print_starting_message=False)


if __name__ == "__main__":
    main()
