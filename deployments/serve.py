"""The local runner: serves `finetune/default` from this machine. Started by the embedded default.

`deployment_options` is the deployment's one definition, shared with deployments/deploy.py (work pools).
"""

from prefect import serve
from prefect.deployments.runner import EntrypointType

from flows.finetune import finetune
from flows.services import max_active_runs


def deployment_options() -> dict:
    return dict(
        name="default",
        description="One Tessera fine-tuning run, from validation to a registered model.",
        tags=["tessera"],
        # Runs past the limit wait in AwaitingConcurrencySlot (QUEUED) instead of overloading the box.
        concurrency_limit=max_active_runs(),
    )


def main() -> None:
    # Importable from any working directory.
    deployment = finetune.to_deployment(**deployment_options(), entrypoint_type=EntrypointType.MODULE_PATH)
    serve(deployment, limit=max_active_runs(), print_starting_message=False)


if __name__ == "__main__":
    main()
