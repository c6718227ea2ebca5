"""The warm-start server: a child forked from the preloaded stack is a process of its own (session, title, exit
code), runs without paying the imports, hands back its value or exception, and work it will not start runs cold."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import warm_start
from tasks.devices import gpu_count


@pytest.fixture(scope="module")
def server():
    """A server beside this test process, as the runner keeps one; its address only in this module's tests."""
    before = os.environ.get(warm_start.ADDRESS)
    warm_start.start_server()
    address = os.environ[warm_start.ADDRESS]
    if before is None:
        del os.environ[warm_start.ADDRESS]
    else:
        os.environ[warm_start.ADDRESS] = before
    warm_start.wait_until_listening(Path(address))
    return address


@pytest.fixture
def served(server, monkeypatch):
    monkeypatch.setenv(warm_start.ADDRESS, server)


def test_a_warm_child_is_a_process_of_its_own_named_like_a_cold_worker(served, tmp_path):
    title = "python -m tasks.training.worker --run-name warm-start-test --spec /nowhere"
    with open(tmp_path / "out", "w") as out:
        child = warm_start.start("time:sleep", (60,), title=title, stdout=out.fileno(), stderr=out.fileno())
    assert os.getpgid(child.pid) == child.pid  # its own session: one signal stops it and all it starts
    found = subprocess.run(["pgrep", "-f", "tasks.training.worker --run-name warm-start-test"],
                           capture_output=True, text=True)
    assert found.stdout.split() == [str(child.pid)]
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def test_a_warm_child_pays_no_imports_and_hands_back_its_value_or_its_exception(served, tmp_path):
    # process_time counts from the fork: a cold `import torch, deepspeed, transformers` alone is seconds
    assert warm_start.run(time.process_time) < 0.5
    assert warm_start.run(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        warm_start.run(int, "twelve")
    read, write = os.pipe()
    child = warm_start.start("subprocess:call", ("echo from the child; exit 3",), {"shell": True}, title="x",
                             stdout=write, stderr=write)
    os.close(write)
    with open(read) as out:
        assert out.read() == "from the child\n"
    assert child.wait() == 3 and child.result() == 3


def test_work_the_server_will_not_start_runs_cold(server, served, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    with pytest.raises(warm_start.Refused, match="HF_HUB_OFFLINE differ"):  # read when transformers is imported
        warm_start.start("os:getpid", title="x", stdout=1, stderr=2)
    assert warm_start.run(os.getpid) == os.getpid()  # cold: here
    monkeypatch.delenv(warm_start.ADDRESS)
    assert warm_start.run(os.getpid) == os.getpid()


def test_gpus_are_counted_from_the_driver_less_those_cuda_hides(tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.devices.NVIDIA_GPUS", str(tmp_path / "gpus"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_count() == 0  # no driver
    for address in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (tmp_path / "gpus" / address).mkdir(parents=True)
    assert gpu_count() == 3
    for mask, count in (("1,2", 2), ("", 0), ("-1", 0), ("0,-1,2", 1), ("0,1,2,3", 3)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
        assert gpu_count() == count, mask


def test_the_server_leaves_with_the_process_that_started_it_and_its_children_run_on(tmp_path, monkeypatch):
    """Killed outright with its worker, it leaves no process or socket behind; a child it started runs on, and the
    process waiting for that child goes on waiting for it, not for the server (a flow's training is ended by the
    flow, tasks/process_group.py exit_with_parent)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, time; from tasks import warm_start; warm_start.start_server(); "
                               "print(os.environ[warm_start.ADDRESS], flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    address = Path(parent.stdout.readline().strip())
    warm_start.wait_until_listening(address)
    monkeypatch.setenv(warm_start.ADDRESS, str(address))
    child = warm_start.start("time:sleep", (60,), title="a training worker", stdout=1, stderr=2)
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5 * warm_start.PARENT_CHECK_S
    while address.parent.exists() or subprocess.run(["pgrep", "-f", f"tasks.warm_start --socket {address}"],
                                                    capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the server outlived its parent"
        time.sleep(0.1)
    assert child.poll() is None  # the server's gone, its child is not
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
