"""A disk that fills during a run: the checkpoint that does not fit is refused before it is written, the run fails
saying which folder and how much room it needs, and the last complete checkpoint stays intact and loadable.
Nothing half-written is ever taken for a checkpoint."""

import os
import subprocess

import pytest

from tasks.training.checkpoint_names import LATEST, complete_checkpoints
from tasks.training.checkpoints import load_weights
from tasks.training.protocol import DISK_FULL_EXIT
from test_worker import make_spec, write_rows
from test_worker_runs import Worker


@pytest.fixture
def small_disk(tmp_path):
    """A 90 MiB tmpfs: the tiny model's first checkpoint and export (about 50 MiB) fit, a second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=90m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_the_run_and_keeps_its_last_checkpoint(tiny_model_dir, tmp_path, small_disk):
    rows = write_rows(tmp_path / "train", rows=8, context_length=64, repeated=True)
    spec = make_spec("filled", tiny_model_dir, rows, small_disk / "checkpoints", duration="4ba",
                     settings={"micro_batch_size": 2, "global_batch_size": 2, "save_steps": 1})
    worker = Worker(spec, tmp_path, "filled")
    lines = worker.finish(returncode=DISK_FULL_EXIT)

    out = spec.output_dir
    saved = [m["tag"] for m in lines if m["kind"] == "checkpoint"]
    assert saved == ["ep0-ba1"], saved
    reason = worker.stderr.read_text().strip().splitlines()[-1]
    assert reason.startswith(f"the disk holding {out} is full: the next checkpoint needs about "), reason
    assert f"the latest complete checkpoint, {out / 'ep0-ba1'}, is intact: free space, then train on from it" in reason
    assert os.readlink(out / LATEST) == "ep0-ba1"
    assert complete_checkpoints(out) == [out / "ep0-ba1"]
    assert sorted(p.name for p in out.iterdir()) == ["ep0-ba1", "huggingface", LATEST]  # nothing half-written
    assert [p.name for p in (out / "huggingface").iterdir()] == ["ba1"]
    assert load_weights(out / "ep0-ba1")  # intact and loadable


def test_a_save_that_never_finished_is_not_a_checkpoint(tmp_path):
    """A run killed in the middle of writing ep1-ba6: the latest link still names ep0-ba3, so only that one counts
    (for get_checkpoints, the upload, and resume)."""
    for tag in ("ep0-ba3", "ep1-ba6"):
        (tmp_path / tag).mkdir()
    (tmp_path / LATEST).symlink_to("ep0-ba3")
    assert complete_checkpoints(tmp_path) == [tmp_path / "ep0-ba3"]
    assert complete_checkpoints(tmp_path / "none") == []
