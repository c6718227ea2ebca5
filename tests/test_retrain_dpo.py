"""Retraining a DPO model: champion and challenger judged on held-out pairs by preference accuracy and DPO loss,
both against the base model's log-probabilities.

In process, on the tiny model: the judge's figures (tasks/scoring.py) against each side computed alone, and the rule
that decides. Through the real services: a DPO model under a live schedule, its first retraining promoted, then one
trained on the pairs turned around, judged worse on the held-out pairs and rejected (slow: make test-all).
"""

import json
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config import DpoCfg
from tasks.data.prepare import prepare_dataset
from tasks.judge import Verdict
from tasks.training.preference import REFERENCE_DIR
from tasks.training.rows import IGNORE, PackedRows
from test_worker_dpo import pair, side_logps_alone


@pytest.fixture(scope="module")
def eval_pairs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-pairs")
    (folder / "eval.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in range(8)))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TESSERA_CACHE", str(folder / "cache"))
        return prepare_dataset(str(folder / "eval.jsonl"), tiny_model_dir, "DPO", 32).path


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's architecture and tokenizer with other weights: a policy that prefers differently."""
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("other-tiny")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    model.save_pretrained(target)
    return target


def test_pairs_are_judged_against_the_base_models_log_probabilities(tiny_model_dir, other_model_dir, eval_pairs,
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.scoring import base_logps, preference_figures

    rows, cpu, settings = PackedRows(eval_pairs, "eval pairs"), torch.device("cpu"), DpoCfg(beta=0.1)
    reference = base_logps(str(tiny_model_dir), rows, 3, cpu, tmp_path)  # 3 rows a batch: one batch is short
    base, policy = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
                    for d in (tiny_model_dir, other_model_dir))
    expected_reference = side_logps_alone(base, eval_pairs, range(8))
    assert reference.numpy() == pytest.approx(expected_reference, rel=1e-4)
    assert np.load(tmp_path / REFERENCE_DIR / "eval.npy") == pytest.approx(expected_reference, rel=1e-4)

    alone = side_logps_alone(policy, eval_pairs, range(8))
    h = torch.tensor((alone[:, 0] - alone[:, 1]) - (expected_reference[:, 0] - expected_reference[:, 1]))
    figures = preference_figures(policy, rows, reference, settings, 3, cpu)
    assert figures["eval_accuracy"] == pytest.approx(float((h > 0).float().mean()))
    assert 0 < figures["eval_accuracy"] < 1  # other weights: some pairs preferred more than the base does, not all
    assert figures["eval_loss"] == pytest.approx(float(-F.logsigmoid(0.1 * h).mean()), rel=1e-4)
    # The base against itself: no pair preferred more than it prefers it, and DPO's starting loss, log 2.
    assert preference_figures(base, rows, reference, settings, 3, cpu) == pytest.approx(
        {"eval_loss": np.log(2), "eval_accuracy": 0.0}, abs=1e-5)
    # SimPO's judge has no reference: a pair is won when its chosen answer's mean token log-probability is higher.
    averaged = alone / answer_tokens(eval_pairs, range(8))
    figures = preference_figures(policy, rows, None, DpoCfg(beta=2.0, loss_type="simpo"), 3, cpu)
    assert figures["eval_accuracy"] == pytest.approx(float((averaged[:, 0] > averaged[:, 1]).mean()))
    assert figures["eval_loss"] == pytest.approx(float(
        -F.logsigmoid(torch.tensor(2.0 * (averaged[:, 0] - averaged[:, 1]) - 0.5)).mean()), rel=1e-4)


def answer_tokens(data_dir, pair_numbers) -> np.ndarray:
    """Each pair's chosen and rejected answers' token counts (the tokens their log-probabilities sum over)."""
    rows = PackedRows(data_dir, "data_dir")
    return np.array([[(rows.labels[rows.sequence_ids == 2 * number + side][1:] != IGNORE).sum() for side in (0, 1)]
                     for number in pair_numbers])


@pytest.mark.parametrize("challenger, champion, margin, verdict", [
    ({"eval_loss": 0.60, "eval_accuracy": 0.75}, {"eval_loss": 0.50, "eval_accuracy": 0.50}, 0.0,
     (True, "preference accuracy")),  # accuracy decides, whatever the loss
    ({"eval_loss": 0.40, "eval_accuracy": 0.50}, {"eval_loss": 0.60, "eval_accuracy": 0.75}, 0.0,
     (False, "preference accuracy")),
    ({"eval_loss": 0.60, "eval_accuracy": 0.75}, {"eval_loss": 0.60, "eval_accuracy": 0.50}, 0.25,
     (False, "preference accuracy")),  # not by more than min_improvement
    ({"eval_loss": 0.55, "eval_accuracy": 1.0}, {"eval_loss": 0.60, "eval_accuracy": 1.0}, 0.0,
     (True, "DPO loss, the accuracies tied")),
    ({"eval_loss": 0.55, "eval_accuracy": 1.0}, {"eval_loss": 0.60, "eval_accuracy": 1.0}, 0.1,
     (False, "DPO loss, the accuracies tied")),
    ({"eval_loss": 1.2}, {"eval_loss": 1.5}, 0.0, (True, "")),  # not DPO: the eval loss alone
])
def test_the_challenger_wins_on_accuracy_and_on_loss_where_accuracy_ties(challenger, champion, margin, verdict):
    judged = Verdict(challenger, champion)
    assert judged.beats(margin) == verdict
    assert judged.figures()["champion_eval_loss"] == champion["eval_loss"]
    assert Verdict(challenger, None).figures()["champion_eval_loss"] is None


def turned(record: dict) -> dict:
    """The pair with its answers swapped: training on it teaches the opposite preference."""
    return {**record, "chosen": record["rejected"], "rejected": record["chosen"]}


def lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.e2e
@pytest.mark.slow  # two DPO challengers and the services: 5.7 min on the loaded 2-core machine
def test_a_dpo_model_is_retrained_on_its_schedule_and_judged_on_held_out_pairs(fm, tiny_model_dir, tmp_path):
    from test_retraining import _registry, _verdict, wait_for_coming_runs
    from conftest import wait_for

    model, incoming = "main.retrain.preferences", tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "week1.jsonl").write_text(lines(pair(i) for i in range(16)))
    (tmp_path / "held_out.jsonl").write_text(lines(pair(i) for i in range(16, 24)))
    hour = (datetime.now(timezone.utc).hour + 12) % 24  # live all along (UTC), not due during the test
    fm.schedule_retraining(model, str(incoming), str(tmp_path / "held_out.jsonl"), cron=f"0 {hour} * * *",
                           model=str(tiny_model_dir), task_type="DPO", training_duration="2ep", learning_rate=1e-3,
                           context_length=32, recipe={"training_config": {"global_batch_size": 4,
                                                                          "micro_batch_size": 2}})
    wait_for_coming_runs(model)

    # The first retraining: no champion, so the challenger is promoted; its figures against the base model.
    first = wait_for(fm.retrain_now(model), timeout=600)
    assert (first.status, first.outcome) == (fm.RunStatus.COMPLETED, "promoted"), first.details
    promoted = _verdict(first).payload
    assert promoted["challenger_eval_accuracy"] == 1.0 and promoted["challenger_eval_loss"] < np.log(2)
    assert promoted["champion_eval_accuracy"] is None and promoted["champion_eval_loss"] is None

    # The pairs turned around, twice over, trained from the champion: it prefers the held-out pairs' rejected answers
    # more than the base does, so it is rejected on accuracy; both figures in the event, the tags and the metrics.
    (incoming / "week2.jsonl").write_text(lines(turned(pair(i)) for i in [*range(16), *range(16)]))
    second = wait_for(fm.retrain_now(model), timeout=600)
    assert (second.status, second.outcome) == (fm.RunStatus.COMPLETED, "rejected"), second.details
    rejected = _verdict(second)
    figures = {key: rejected.payload[key] for key in ("challenger_eval_accuracy", "champion_eval_accuracy",
                                                      "challenger_eval_loss", "champion_eval_loss")}
    assert figures["champion_eval_accuracy"] == promoted["challenger_eval_accuracy"]  # the same footing: the base
    assert figures["champion_eval_loss"] == pytest.approx(promoted["challenger_eval_loss"], rel=1e-5)
    assert figures["challenger_eval_accuracy"] < figures["champion_eval_accuracy"]
    assert figures["challenger_eval_loss"] > figures["champion_eval_loss"]
    assert "on preference accuracy" in rejected.message and "the champion stays" in rejected.message
    registry = _registry()
    assert int(registry.get_model_version_by_alias(model, "champion").version) == 1
    tags = registry.get_model_version(model, "2").tags
    assert tags["tessera.retrain"] == "rejected"
    assert float(tags["tessera.eval_accuracy"]) == figures["challenger_eval_accuracy"]
    assert float(tags["tessera.champion_eval_accuracy"]) == figures["champion_eval_accuracy"]
    assert float(tags["tessera.eval_loss"]) == pytest.approx(figures["challenger_eval_loss"])
    run = registry.get_run(registry.get_run(fm.get(second.challenger).run_id).data.tags["mlflow.parentRunId"])
    assert run.data.metrics == pytest.approx(figures)
    fm.unschedule_retraining(model)
