"""A node's DeepSpeed launch, as DeepSpeed's own runner reads it: every node in the same order with its ranks, and on a
GPU machine this node's ranks on the GPUs it holds. The launch itself runs in tests/test_shared_services.py."""

from pathlib import Path

import pytest
from deepspeed.launcher.runner import fetch_hostfile, parse_args, parse_inclusion_exclusion

from tasks.errors import InvalidInputError
from tasks.nodes import launcher_command
from tasks.training.spec import TrainSpec


def _launch(command: list[str]) -> tuple[dict, object]:
    """DeepSpeed's view of a launcher command: the ranks of each node, and its arguments."""
    args = parse_args(command[command.index("deepspeed.launcher.runner") + 1:])
    return parse_inclusion_exclusion(fetch_hostfile(args.hostfile), args.include, args.exclude), args


def test_each_node_launches_its_part_of_the_same_world(tmp_path: Path):
    spec = TrainSpec.model_construct(run_name="run-1", processes=1)
    heads = launcher_command(spec, tmp_path / "spec.json", ["a", "b"], 0, "10.0.0.1", 29500, [])
    other = launcher_command(spec, tmp_path / "spec.json", ["a", "b"], 1, "10.0.0.1", 29500, [])
    (world, args), (world_b, args_b) = _launch(heads), _launch(other)
    assert dict(world) == dict(world_b) == {"a": [0], "b": [0]}
    assert (args.no_ssh, args.node_rank, args_b.node_rank) == (True, 0, 1)
    assert (args.master_addr, args.master_port, args.module) == ("10.0.0.1", 29500, True)
    assert args.user_script == "tasks.training.worker" and args.user_args[-4:] == [
        "--run-name", "run-1", "--spec", str(tmp_path / "spec.json")]


def test_on_gpus_a_node_runs_on_those_it_holds_and_counts_the_others(tmp_path: Path):
    spec = TrainSpec.model_construct(run_name="run-1", processes=2)
    world, _ = _launch(launcher_command(spec, tmp_path / "spec.json", ["a", "b"], 1, "10.0.0.1", 29500, ["4", "6"]))
    assert list(world.items()) == [("a", [0, 1]), ("b", [4, 6])]


def test_the_embedded_default_refuses_a_run_over_several_machines(tiny_model_dir, chat_file):
    from flows import foundation_model as fm

    with pytest.raises(InvalidInputError) as error:  # before any service is asked: this session has none running
        fm.create(model=str(tiny_model_dir), train_data_path=str(chat_file), register_to="main.nodes",
                  overrides={"training_config.deepspeed.nodes": 2, "training_config.deepspeed.processes": 1})
    assert str(error.value).startswith("training_config.deepspeed.nodes 2: the embedded default trains on this machine")
