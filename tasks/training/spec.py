"""What the train task hands the worker: the run's config, and what was resolved at run time.

The train task writes a TrainSpec to the run folder as spec.json and starts
`python -m tasks.training.worker --run-name <run> --spec spec.json`; the worker reads it back, checked by the
same types. Every setting a user can choose lives in `config` (tasks.config); the rest is found at run time:
where the model and the prepared rows are, how many steps the duration makes, how many processes train.
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.config import RunConfig
from tasks.errors import InvalidInputError
from tasks.training.rows import PackedRows
from tasks.training.schedule import Plan, default_warmup, plan_duration


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: str = Field(pattern=r"^[^\n]+$")
    config: RunConfig  # its training_config.max_length resolved
    model_dir: Path  # a Hugging Face model folder (config.json, weights, tokenizer)
    data_dir: Path  # prepared rows: input_ids.npy, labels.npy, position_ids.npy, meta.json
    eval_data_dir: Path | None = None  # the same for run.eval_data_path
    output_dir: Path  # checkpoints root: ep{E}-ba{B}/, huggingface/ba{B}/, latest-sharded-rank0.symlink
    init_from: Path | None = None  # an ep*-ba* folder (or the latest link) to take the weights from
    plan: Plan  # the run's optimizer steps, from its duration and the rows of data_dir
    warmup_steps: int = Field(ge=0)  # sched.warmup_steps, or its default for this many steps
    processes: int = Field(1, ge=1)  # ranks on this machine: above 1 the worker starts through the deepspeed launcher
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    # The engine's own knobs, which no recipe sets:
    chunked_loss: bool = True  # the LM head's loss a chunk of rows at a time where that computes the same
    # Divergence guard, checked at each log point: a non-finite loss or grad norm always stops the run; so does a
    # logged loss over loss_spike_factor x the mean of the recent logged losses (after a few); None: no spike check.
    loss_spike_factor: float | None = Field(10.0, ge=1, allow_inf_nan=False)
    peak_flops: float | None = Field(None, gt=0, allow_inf_nan=False)  # one device's, for the MFU; None: H100 bf16

    @classmethod
    def build(cls, run_name: str, config: RunConfig, model_dir: Path, data_dir: Path, output_dir: Path,
              **runtime) -> "TrainSpec":
        """The spec for training `config` on the prepared rows in `data_dir`: its plan and warmup worked out."""
        rows = PackedRows(Path(data_dir), "data_dir")  # refused in words, before the worker starts
        training = config.training_config
        plan = plan_duration(config.duration, rows.rows, rows.context_length, training.global_batch_size)
        warmup = training.model.optim.sched.warmup_steps or default_warmup(plan.total_batches)
        return cls(run_name=run_name, config=config, model_dir=model_dir, data_dir=data_dir, output_dir=output_dir,
                   plan=plan, warmup_steps=warmup, **runtime)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainSpec":
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValidationError) as e:
            raise InvalidInputError(f"cannot read the training spec {path}: {e}") from e
