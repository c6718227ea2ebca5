"""Retraining a DPO model: champion and challenger judged on held-out pairs by preference accuracy and DPO loss,
both against the base model's log-probabilities.

In process, on the tiny model: the judge's figures (tasks/scoring.py) against each side computed alone, and the rule
that decides. Through the real services: a DPO model under a live schedule, its first retraining promoted, then one
trained on the pairs turned around, judged worse on the held-out pairs and rejected.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config import DpoCfg
from tasks.data.prepare import prepare_dataset
from tasks.judge import Verdict
from tasks.training.preference import REFERENCE_DIR
from tasks.training.rows import PackedRows
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
