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
    with claim_gpus(1, available=3) as first, claim_gpus(2, available=3) as second:
        assert first == [0] and second == [1, 2]
    with claim_gpus(3, available=3) as again:
        assert again == [0, 1, 2]
    with claim_gpus(1, available=0) as none:
        assert none == []


def test_a_run_waits_for_a_gpu_another_run_holds():
    got = []

    def wait_for_one():
        with claim_gpus(1, available=2) as gpus:
            got.extend(gpus)

    with claim_gpus(2, available=2):
        waiting = threading.Thread(target=wait_for_one)
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive() and got == []  # both GPUs are held
    waiting.join(timeout=5)
    assert got == [0]


def test_the_worker_sees_only_its_gpus():
    class Spec:
        run_name, processes = "r", 2

    command = worker_command(Spec, "spec.json", [2, 3])
    assert command[command.index("--include") + 1] == "localhost:2,3" and "--num_gpus" not in command
    Spec.processes = 1
    assert worker_command(Spec, "spec.json", [1])[:3] == [sys.executable, "-m", "tasks.training.worker"]
    assert worker_env([1])["CUDA_VISIBLE_DEVICES"] == "1" and worker_env([]) is None
