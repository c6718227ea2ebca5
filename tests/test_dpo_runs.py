"""A DPO run through the real embedded services, as a user starts one: fm.create(task_type="DPO") on preference
pairs, to the registered model, with the rewards in MLflow and in TRAIN_UPDATED events."""

import json
import re

import pytest

from tasks.tracking import client
from conftest import wait_for
from test_worker_dpo import pair

pytestmark = pytest.mark.e2e


def test_a_dpo_run_trains_on_pairs_and_reports_its_rewards(fm, tiny_model_dir, tmp_path):
    for split, numbers in (("train", range(16)), ("eval", range(16, 20))):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in numbers))
    run = fm.create(model=str(tiny_model_dir), train_data_path=str(tmp_path / "train.jsonl"),
                    eval_data_path=str(tmp_path / "eval.jsonl"), register_to="main.test", task_type="DPO",
                    training_duration="2ep", learning_rate=1e-3, context_length=32,
                    recipe={"training_config": {"global_batch_size": 4, "micro_batch_size": 2,
                                                "model": {"dpo_cfg": {"beta": 0.1}}}})
    assert re.fullmatch(r"ift-tiny-llama\d*-[a-z0-9]{6}", run.name)
    run = wait_for(run, {fm.RunStatus.COMPLETED, fm.RunStatus.FAILED})
    assert run.status == fm.RunStatus.COMPLETED, run.details

    events = list(fm.get_events(run, follow=True))
    (validated,) = [e for e in events if e.type == "DATA_VALIDATED"]
    assert validated.payload["num_examples"] == 16
    # A pair's two sides share a row twice the context long, and the steps are planned on it, as the worker plans.
    assert f"in {validated.payload['num_rows']} rows of 64 " in validated.message
    assert validated.payload["training_tokens"] == 8 * 4 * 64, validated.message
    updates = [e for e in events if e.type == "TRAIN_UPDATED"]
    assert updates and all(re.fullmatch(r"\[epoch=\d/2\]\[batch=\d/8\]\[ETA=\S+\] Train loss: \d\.\d\d, "
                                        r"reward accuracy: \d\.\d\d, margin: -?\d\.\d{3}", e.message)
                           for e in updates), [e.message for e in updates]
    last = updates[-1].payload
    assert last["batch"] == 8 and last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0

    store = client()
    history = {name: [m.value for m in sorted(store.get_metric_history(run.run_id, name), key=lambda m: m.step)]
               for name in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
                            "eval_loss", "eval_reward_margin", "eval_reward_accuracy")}
    assert len(history["loss"]) == 8 and history["loss"][0] == pytest.approx(0.6931, abs=1e-3)
    assert history["loss"][-1] < history["loss"][0] and history["reward_margin"][-1] > history["reward_margin"][0]
    assert history["reward_accuracy"][-1] == 1.0
    assert len(history["eval_loss"]) == 2 and history["eval_reward_margin"][1] > history["eval_reward_margin"][0]
    # The reference log-probabilities travel with the checkpoints; the registered model is a plain causal LM.
    artifacts = [a.path for a in store.list_artifacts(run.run_id, f"{run.name}/checkpoints/reference")]
    assert sorted(p.rsplit("/", 1)[1] for p in artifacts) == ["eval.npy", "train.npy"]
    assert store.get_model_version_by_alias(f"main.test.{run.name}", "candidate").tags["tessera.run_name"] == run.name
