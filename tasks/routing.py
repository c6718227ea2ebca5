"""Where runs go: the deployments' names and the work queues by GPU count, so that a run lands only on a machine it
fits (Prefect's routing, no scheduler of ours). Defined by deployments/, used by whoever starts a run: the client,
the flows that start runs (a sweep's trials, a retraining's challenger) and a run's head node.

A run that asks for `training_config.deepspeed.processes: n` goes to the queue `gpus-<n>`; one that leaves it unset
(one process per GPU of whichever machine takes it) to `default`. A worker on a machine with G GPUs takes `default`
and `gpus-1` ... `gpus-<G>` (deployments/queues.py); the embedded default's worker every queue up to its device
slots.
"""

RUN = "finetune/default"
SWEEP = "sweep/default"
RETRAIN = "retrain/default"
NODE = "train-node/default"  # one node of a run over several machines (tasks/nodes.py)
DEFAULT_QUEUE = "default"


def model_retrain(registered_model: str) -> str:
    """The model's scheduled retraining: a twin of retrain/default with the model's settings as its parameters."""
    return f"retrain/{registered_model}"


def queue_for(processes: int | None) -> str:
    """The queue of a run that asks for `processes` processes on one machine (None: as many as it has GPUs)."""
    return DEFAULT_QUEUE if processes is None else f"gpus-{processes}"
