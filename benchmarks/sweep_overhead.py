"""What a sweep adds to each trial: create -> first training step of a plain run against a sweep's trial.

    .venv/bin/python benchmarks/sweep_overhead.py [--repeats 3]

Both train the same tiny model (2 layers, 64 wide, SmolLM2's tokenizer) on the same 24 conversations, through the
embedded services started in a temporary TESSERA_HOME. A plain run is timed from create() to its first
TRAIN_UPDATED event; a trial from the sweep's create (fm.sweep) and from the sweep's "trial started" event to the
trial's first TRAIN_UPDATED. Runs go one at a time, so the figures are not contended by each other.
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

CHAT = [{"messages": [{"role": "user", "content": f"What is fact number {i}?"},
                      {"role": "assistant", "content": f"Fact {i} is that Tessera fine-tunes models."}]}
        for i in range(24)]


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with the bundled SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.models import tokenizer_folder

    for file in tokenizer_folder("HuggingFaceTB/SmolLM2-135M-Instruct").iterdir():
        shutil.copy(file, folder / file.name)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=2)).save_pretrained(folder)
    return folder


def first_step_s(events, since) -> float:
    """Seconds from `since` (a datetime) to the first TRAIN_UPDATED event."""
    return next((e.time - since).total_seconds() for e in events if e.type == "TRAIN_UPDATED")


@contextmanager
def tiny_services(prefix: str) -> Iterator[tuple[object, dict]]:
    """The API over embedded services started in a temporary TESSERA_HOME, and a recipe of the tiny model on the 24
    conversations, 2 steps; the services stopped and the folder removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["TESSERA_HOME"] = str(work / "home")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # Imported once the environment says where the services live: Prefect reads its settings at import.
    from flows import foundation_model as fm
    from deployments import services

    (work / "model").mkdir()
    model = tiny_model(work / "model")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    recipe = {"run": {"model_name_or_path": str(model), "train_data_path": str(data), "eval_data_path": str(data),
                      "register_to": "main.bench"},
              "training_config": {"max_length": 64, "global_batch_size": 4, "micro_batch_size": 2,
                                  "trainer": {"max_steps": 2}}}
    services.ensure_started()
    try:
        yield fm, recipe
    finally:
        services.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plain, trial, trial_from_ask = [], [], []
    with tiny_services("tessera-sweep-bench-") as (fm, base):
        # Warm, and finished before timing starts: the first run of a fresh worker pays one-time costs.
        list(fm.get_events(fm.create(recipe=base), follow=True))
        for _ in range(args.repeats):
            run = fm.create(recipe=base)
            plain.append(first_step_s(fm.get_events(run, follow=True), run.created_at))
            sweep = fm.sweep(space={"learning_rate": [1e-4]}, max_trials=1, max_parallel=1, recipe=base)
            sweep_events = list(sweep.get_events(follow=True))
            started = next(e for e in sweep_events if e.type == "TRAIN_UPDATED" and "trial" in e.payload)
            trial_events = list(fm.get_events(started.payload["run"], follow=True))
            trial.append(first_step_s(trial_events, sweep.created_at))
            trial_from_ask.append(first_step_s(trial_events, started.time))
    table = Table("path", "create -> first step (s), median", "each", title=f"{args.repeats} runs each")
    for label, values in (("plain run: fm.create", plain), ("sweep trial: fm.sweep", trial),
                          ("sweep trial: from the sweep asking for it", trial_from_ask)):
        table.add_row(label, f"{statistics.median(values):.1f}", ", ".join(f"{v:.1f}" for v in values))
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
