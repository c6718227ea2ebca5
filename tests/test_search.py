"""A sweep's config: the space's value forms, its rules, every value checked by the config's own rules, and the
trials' configs and Optuna distributions it makes."""

from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tasks.errors import InvalidInputError
from tasks.search import configure_sweep, distributions, grid, trial_config

SWEEP = Path(__file__).parents[1] / "examples" / "recipes" / "sweep.yaml"


def sweep(**space) -> dict:
    return {"sweep.space": space}


def test_the_example_sweep_and_its_trials():
    config = configure_sweep(SWEEP)
    assert (config.sweep.strategy, config.sweep.trials, config.sweep.max_parallel, config.sweep.prune) == (
        "tpe", 6, 2, True)
    assert distributions(config.sweep) == {
        "learning_rate": FloatDistribution(1e-4, 1e-3, log=True),
        "training_config.model.peft.lora_tuning.alpha": CategoricalDistribution((32, 64, 128)),
    }
    trial = trial_config(config, {"learning_rate": 5e-4, "training_config.model.peft.lora_tuning.alpha": 64})
    assert (trial.training_config.model.optim.lr, trial.training_config.model.peft.lora_tuning.alpha) == (5e-4, 64)
    assert trial.training_config.trainer.max_steps == 24 and "sweep" not in trial.to_recipe()
    assert configure_sweep(config.to_recipe()) == config  # round trip, as a run's config


def test_value_forms_and_a_grids_size():
    config = configure_sweep(SWEEP, overrides=sweep(
        learning_rate={"uniform": [1e-4, 1e-3]}, **{"training_config.trainer.max_steps": {"int": [2, 8]}},
        training_duration=["2ba", "3ba"]))
    space = distributions(config.sweep)
    assert space["learning_rate"] == FloatDistribution(1e-4, 1e-3)
    assert space["training_config.trainer.max_steps"] == IntDistribution(2, 8)
    assert trial_config(config, {"training_duration": "3ba"}).duration.value == 3  # an argument, as create() has it
    grid_config = configure_sweep(SWEEP, overrides={**sweep(learning_rate=[1e-4, 1e-3], training_duration=["1ep", "2ep"]),
                                                    "sweep.strategy": "grid", "sweep.max_trials": 10})
    assert grid_config.sweep.trials == 4 and len(grid(grid_config.sweep)) == 4


def test_a_dpo_sweep_searches_beta_and_the_learning_rate():
    dpo = {"run.task_type": "DPO", "run.train_data_path": "pairs.jsonl"}
    config = configure_sweep(SWEEP, overrides={**dpo, **sweep(beta={"loguniform": [0.01, 0.1]},
                                                               learning_rate=[1e-4, 5e-4])})
    assert distributions(config.sweep) == {"beta": FloatDistribution(0.01, 0.1, log=True),
                                           "learning_rate": CategoricalDistribution((1e-4, 5e-4))}
    trial = trial_config(config, {"beta": 0.05, "learning_rate": 5e-4})
    assert (trial.training_config.model.dpo_cfg.beta, trial.training_config.model.optim.lr) == (0.05, 5e-4)
    assert "beta" not in trial.to_recipe()["training_config"]  # set at its path, as any setting
    by_path = configure_sweep(SWEEP, overrides={**dpo, **sweep(**{"training_config.model.dpo_cfg.beta": [0.02]})})
    assert trial_config(by_path, {"training_config.model.dpo_cfg.beta": 0.02}).training_config.model.dpo_cfg.beta == 0.02
    grid_config = configure_sweep(SWEEP, overrides={**dpo, **sweep(beta=[0.01, 0.1], learning_rate=[1e-4, 5e-4]),
                                                    "sweep.strategy": "grid"})
    assert grid_config.sweep.trials == 4 and {"beta": 0.1, "learning_rate": 1e-4} in grid(grid_config.sweep)
    with pytest.raises(InvalidInputError, match="sweep.space.beta value 0.5 cannot be trained: "
                                                "training_config.model.dpo_cfg.beta 0.5 must be at most 0.1"):
        configure_sweep(SWEEP, overrides={**dpo, **sweep(beta=[0.05, 0.5])})


@pytest.mark.parametrize("overrides, said", [
    (sweep(beta=[0.05]), "sweep.space.beta: beta (training_config.model.dpo_cfg.beta) is a DPO setting, and "
                         "run.task_type is CHAT_COMPLETION, whose runs do not read it"),
    (sweep(**{"training_config.model.dpo_cfg.beta": {"uniform": [0.01, 0.1]}}),
     "sweep.space.training_config.model.dpo_cfg.beta: training_config.model.dpo_cfg.beta is a DPO setting"),
    (sweep(betas=[0.05]), "sweep.space.betas is not a setting: use a create() argument (model, "),
    (sweep(learning_rate=[1e-2]), "sweep.space.learning_rate value 0.01 cannot be trained: learning_rate 0.01 must be "
                                  "at most 0.001"),
    (sweep(**{"training_config.model.peft.lora_tuning.alpha": [48]}),
     "value 48 cannot be trained: training_config.model.peft.lora_tuning.alpha 48 must be 32, 64"),
    (sweep(training_duration=["2 epochs"]), "training_duration '2 epochs' is not a duration"),
    (sweep(**{"training_config.nope": [1]}), "sweep.space.training_config.nope is not a setting"),
    (sweep(**{"training_config.model": [1]}), "sweep.space.training_config.model is not a setting"),
    (sweep(learning_rate={"uniform": [1e-3, 1e-4]}), "sweep.space.learning_rate: the bounds [0.001, 0.0001] must go"),
    (sweep(learning_rate={"loguniform": [0, 1e-3]}), "loguniform bounds must be above 0"),
    (sweep(learning_rate={"normal": [0, 1]}), "sweep.space.learning_rate {'normal': [0, 1]} is not valid"),
    (sweep(learning_rate=[]), "is not valid"),
    (sweep(), "sweep.space {} must have at least 1 item(s)"),
    ({"sweep.strategy": "grid"}, "sweep.space.learning_rate: a grid takes lists of values only"),
    ({"sweep.strategy": "bayes"}, "sweep.strategy 'bayes' must be 'grid', 'random' or 'tpe'"),
    ({"sweep.max_parallel": 0}, "sweep.max_parallel 0 must be at least 1"),
    ({"run.eval_data_path": None, "training_config.trainer.val_check_interval": None},
     "sweep.metric eval_loss needs run.eval_data_path"),
])
def test_a_bad_sweep_is_refused_naming_the_setting(overrides, said):
    with pytest.raises(InvalidInputError) as error:
        configure_sweep(SWEEP, overrides=overrides)
    assert said in str(error.value)
