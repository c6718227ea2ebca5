"""GPUs held by runs: two runs never hold the same GPU, a finished run's are free again, and the worker is pointed
at the ones its run holds (no GPU here: the machine's count is given)."""

import sys
import threading

import pytest

from tasks.devices import claim_gpus
from tasks.train import worker_command, worker_env


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path))


def test_runs_hold_different_gpus_and_free_them():
    visible = ["4", "5", "6"]  # CUDA_VISIBLE_DEVICES=4,5,6: ids are the machine's
    with claim_gpus(1, visible) as first, claim_gpus(2, visible) as second:
        assert first == ["4"] and second == ["5", "6"]
    with claim_gpus(3, visible) as again:
        assert again == visible
    with claim_gpus(1, []) as none:
        assert none == []


def test_a_run_waits_for_a_gpu_another_run_holds():
    got = []

    def wait_for_one():
        with claim_gpus(1, ["0", "1"]) as gpus:
            got.extend(gpus)

    with claim_gpus(2, ["0", "1"]):
        waiting = threading.Thread(target=wait_for_one)
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive() and got == []  # both GPUs are held
    waiting.join(timeout=5)
    assert got in (["0"], ["1"])  # whichever the release freed first, once both were free


def test_the_worker_sees_only_its_gpus():
    class Spec:
        run_name, processes = "r", 2

    # Given no resource arguments, the launcher starts one rank per GPU that CUDA_VISIBLE_DEVICES shows.
    assert "--num_gpus" not in worker_command(Spec, "spec.json", ["2", "3"])
    assert worker_env(["2", "3"])["CUDA_VISIBLE_DEVICES"] == "2,3" and worker_env([]) is None
    assert worker_command(Spec, "spec.json", [])[3:5] == ["--num_gpus", "2"]  # on the CPU: how many
    Spec.processes = 1
    assert worker_command(Spec, "spec.json", ["1"])[:3] == [sys.executable, "-m", "tasks.training.worker"]
