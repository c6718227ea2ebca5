"""Sweeps through the real services: trials as finetune runs of the tiny model, searched and pruned by Optuna.

Each trial trains a few steps (a run takes ~20 s here, most of it starting processes), so the sweeps are small:
a grid of 4 (2 at a time) that prunes its hopeless trials, a random sweep cancelled mid-way, and a TPE sweep
whose flow is killed and resumed.
"""

import json
import os
import signal
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from tasks.errors import InvalidInputError
from tasks.search import storage_url
from conftest import PAIRS, wait_for, worker_pids

pytestmark = pytest.mark.e2e


def base(tiny_model_dir, chat_file, **changes) -> dict:
    """A recipe of the tiny model on the chat data, evaluated every 2 steps, with a sweep section."""
    recipe = {
        "run": {"model_name_or_path": str(tiny_model_dir), "train_data_path": chat_file, "eval_data_path": chat_file,
                "register_to": "main.sweep"},
        "training_config": {"max_length": 64, "global_batch_size": 4, "micro_batch_size": 2, "save_steps": 100,
                            "trainer": {"max_steps": 4, "val_check_interval": 2}},
        "sweep": {"space": {"learning_rate": [1e-4, 1e-3]}, "max_parallel": 2},
    }
    for section, values in changes.items():
        recipe[section] = {**recipe[section], **values}
    return recipe


def _registry() -> MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{os.environ['TESSERA_HOME']}/mlflow/mlflow.db")
    return MlflowClient()


def test_a_bad_space_is_refused_before_anything_runs(fm, tiny_model_dir, chat_file):
    before = len(fm.list_sweeps())
    recipe = base(tiny_model_dir, chat_file)
    for space, said in (({"learning_rate": [1e-2]}, "sweep.space.learning_rate value 0.01 cannot be trained: "
                                                    "learning_rate 0.01 must be at most 0.001"),
                        ({"training_config.nope": [1]}, "sweep.space.training_config.nope is not a setting"),
                        ({"learning_rate": {"uniform": [1e-3, 1e-4]}}, "must go from low to high")):
        with pytest.raises(InvalidInputError, match=said):
            fm.sweep(space=space, recipe=recipe)
    with pytest.raises(InvalidInputError, match="sweep.space.beta: beta .training_config.model.dpo_cfg.beta. is a DPO "
                                                "setting, and run.task_type is CHAT_COMPLETION"):
        fm.sweep(space={"beta": [0.01, 0.1]}, recipe=recipe)
    no_eval = base(tiny_model_dir, chat_file, run={"eval_data_path": None}, training_config={"trainer": {}})
    with pytest.raises(InvalidInputError, match="sweep.metric eval_loss needs run.eval_data_path"):
        fm.sweep(recipe=no_eval)
    assert len(fm.list_sweeps()) == before


@pytest.mark.slow
def test_a_grid_sweep_two_at_a_time_prunes_what_falls_behind_and_registers_only_the_best(fm, tiny_model_dir,
                                                                                        chat_file):
    """A grid of a good and a hopeless learning rate by 4 or 20 steps, in order: the good ones first, then the
    hopeless ones, judged at each eval (every 2 steps) against the others. The hopeless 20-step trial is pruned
    long before its end (the 4-step one may end first)."""
    space = {"learning_rate": [1e-3, 1e-6], "training_duration": ["4ba", "20ba"]}
    recipe = base(tiny_model_dir, chat_file, training_config={"model": {"optim": {"sched": {"warmup_steps": 1}}}})
    sweep = wait_for(fm.sweep(space=space, strategy="grid", max_trials=8, prune=True, recipe=recipe), timeout=600)
    assert sweep.status == fm.RunStatus.COMPLETED, sweep.details
    trials = sweep.trials
    assert [(t.learning_rate, t.training_duration) for t in trials] == [
        (lr, d) for lr in (1e-3, 1e-6) for d in ("4ba", "20ba")]  # every combination, once (the grid has 4)
    assert [t.status for t in trials[:2]] == [fm.RunStatus.COMPLETED] * 2
    assert trials[2].status in (fm.RunStatus.COMPLETED, fm.RunStatus.STOPPED) and trials[3].status == fm.RunStatus.STOPPED
    pruned = next(e for e in fm.get_events(trials[3], follow=True) if e.type == "PRUNED")
    assert f"pruned by sweep {sweep.name} at batch" in pruned.message and "behind the median" in pruned.message
    assert pruned.payload["batch"] < 20
    # Never more than max_parallel=2 trials at once: at any trial's start, at most one other is under way.
    for trial in trials:
        overlapping = [o for o in trials if o is not trial and o.started_at < trial.started_at < o.completed_at]
        assert len(overlapping) <= 1, [(o.name, o.started_at, o.completed_at) for o in trials]

    best = sweep.best
    registry = _registry()
    assert best.name == trials[1].name  # the good learning rate, for longer
    version = registry.get_model_version_by_alias(f"main.sweep.{best.name}", "challenger")
    assert version.tags["tessera.sweep"] == sweep.name and float(version.tags["tessera.sweep_eval_loss"]) > 0
    registered = [m.name for m in registry.search_registered_models(filter_string="name LIKE 'main.sweep.%'")]
    assert registered == [f"main.sweep.{best.name}"]  # the other trials keep their runs, not registry entries

    parent = registry.get_run(sweep.run_id)
    assert parent.data.tags["tessera.best_run"] == best.name
    artifacts = {a.path for a in registry.list_artifacts(sweep.run_id, "sweep")}
    assert {"sweep/trials.json", "sweep/sweep.json", "sweep/metric_by_setting.png"} <= artifacts
    for trial in trials:  # each trial's MLflow run is nested under the sweep's, and its flow run a subflow
        assert registry.get_run(trial.run_id).data.tags["mlflow.parentRunId"] == sweep.run_id
    from prefect import get_client

    from deployments import services

    with services.connected(), get_client(sync_client=True) as prefect:  # not an ephemeral server of its own
        assert all(prefect.read_flow_run(t.flow_run_id).parent_task_run_id for t in trials)
    events = [e for e in sweep.get_events(follow=True)]
    assert events[-1].type == "COMPLETED" and f"registered main.sweep.{best.name}" in events[-1].message
    assert [e.type for e in events].count("TRIAL_FINISHED") == 4


def _sweep_process(flow_run_id: str) -> int | None:
    """The pid of the process running a flow run (the runner gives it PREFECT__FLOW_RUN_ID)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ.read_bytes().split(b"\0"):
                return int(environ.parent.name)
        except OSError:
            continue
    return None


def test_cancelling_a_sweep_stops_all_its_trials(fm, tiny_model_dir, chat_file):
    recipe = base(tiny_model_dir, chat_file, training_config={"trainer": {"max_steps": 100_000,
                                                                         "val_check_interval": 1000}})
    sweep = fm.sweep(strategy="random", max_trials=4, recipe=recipe)
    deadline = time.monotonic() + 240
    while not (len(trials := sweep.trials) == 2 and all(worker_pids(t.name) for t in trials)):
        assert time.monotonic() < deadline, [(t.name, t.status) for t in trials]
        time.sleep(1)
    assert fm.cancel(sweep) == 2
    sweep = wait_for(sweep, timeout=120)
    assert sweep.status == fm.RunStatus.STOPPED
    deadline = time.monotonic() + 60
    while any(worker_pids(t.name) for t in trials) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(worker_pids(t.name) for t in trials), "no training process may outlive a cancelled sweep"
    # The runner marks a run cancelled once its flow process is gone and its hook has run: slow under load.
    deadline = time.monotonic() + 180
    while not all(t.refresh().status == fm.RunStatus.STOPPED for t in trials):
        assert time.monotonic() < deadline, [(t.name, t.status) for t in trials]
        time.sleep(2)
    assert len(sweep.trials) == 2  # nothing started after the cancel


@pytest.mark.slow
def test_a_crashed_sweep_continues_its_study_when_run_again(fm, tiny_model_dir, chat_file):
    """One trial at a time; the sweep's own process is killed while its second trial trains. Run again, it keeps
    the first trial and watches the second, which trained on, to its end: two trials, none twice."""
    recipe = base(tiny_model_dir, chat_file, sweep={"space": {"learning_rate": {"loguniform": [1e-4, 1e-3]}},
                                                    "max_parallel": 1, "max_trials": 2})
    sweep = fm.sweep(recipe=recipe)
    deadline = time.monotonic() + 300
    while len(trials := sweep.trials) < 2:
        assert time.monotonic() < deadline and not sweep.refresh().status.is_terminal(), sweep.status
        time.sleep(0.5)
    os.kill(_sweep_process(sweep.refresh().flow_run_id), signal.SIGKILL)
    crashed = wait_for(sweep, timeout=120)
    assert crashed.status == fm.RunStatus.FAILED
    failed = list(fm.get_events(sweep.name, follow=True))[-1]  # the server stores events a few s late
    assert failed.type == "FAILED" and f"fm.resume_sweep('{sweep.name}') continues it" in failed.message

    resumed = fm.resume_sweep(sweep.name)
    followed = [e.type for e in fm.get_events(sweep.name, follow=True)]  # past the crash's FAILED, to the end
    assert followed[-1] == "COMPLETED" and "FAILED" in followed, followed
    resumed = wait_for(resumed, timeout=600)
    assert resumed.status == fm.RunStatus.COMPLETED, resumed.details
    assert resumed.get_events()[-1].type == "COMPLETED"
    assert [(t.name, t.flow_run_id) for t in resumed.trials] == [(t.name, t.flow_run_id) for t in trials]
    assert all(t.status == fm.RunStatus.COMPLETED for t in resumed.trials)
    study = optuna.load_study(study_name=sweep.name, storage=storage_url())
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert resumed.best.name in [t.name for t in trials]


@pytest.mark.slow
def test_a_dpo_sweep_searches_beta_and_the_learning_rate(fm, tiny_model_dir, tmp_path):
    """A grid of two betas by two learning rates over preference pairs; each trial trains with its own beta."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    recipe = base(tiny_model_dir, str(pairs), run={"task_type": "DPO", "eval_data_path": str(pairs)})
    space = {"beta": [0.01, 0.1], "learning_rate": [1e-4, 1e-3]}
    sweep = wait_for(fm.sweep(space=space, strategy="grid", recipe=recipe), timeout=600)
    assert sweep.status == fm.RunStatus.COMPLETED, sweep.details
    assert [(t.config.training_config.model.dpo_cfg.beta, t.learning_rate) for t in sweep.trials] == [
        (beta, lr) for beta in (0.01, 0.1) for lr in (1e-4, 1e-3)]
    assert all(t.task_type == "DPO" for t in sweep.trials) and sweep.best is not None
    params = _registry().get_run(sweep.best.run_id).data.params
    assert float(params["training_config.model.dpo_cfg.beta"]) == sweep.best.config.training_config.model.dpo_cfg.beta
