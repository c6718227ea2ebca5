"""custom_weights_path: which paths name a checkpoint, and how the latest link is followed, without loading one."""

import pytest

from tasks.custom_weights import check_custom_weights, fetch_custom_weights
from tasks.errors import InvalidInputError
from tasks.training.checkpoint_names import LATEST


@pytest.mark.parametrize("states", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"])
def test_a_checkpoint_folder_of_any_zero_stage_and_its_latest_link(tmp_path, states):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "ep1-ba4").mkdir(parents=True)
    (checkpoints / "ep1-ba4" / states).touch()
    (checkpoints / LATEST).symlink_to("ep1-ba4")  # in a run's folder
    marker = tmp_path / "store" / LATEST  # in a local artifact store: a file naming the folder
    marker.parent.mkdir()
    marker.write_text("ep1-ba4\n")
    (tmp_path / "store" / "ep1-ba4").symlink_to(checkpoints / "ep1-ba4")
    for given in (checkpoints / "ep1-ba4", checkpoints / LATEST, marker, (checkpoints / "ep1-ba4").as_uri()):
        check_custom_weights(str(given))
        assert fetch_custom_weights(str(given), tmp_path / "unused").resolve() == (checkpoints / "ep1-ba4").resolve()


def test_paths_that_are_not_checkpoints_are_refused_with_the_fix(tmp_path):
    with pytest.raises(InvalidInputError, match=f"{tmp_path}/ep9-ba9 does not exist: pass a checkpoint as "
                                                "get_checkpoints"):
        check_custom_weights(str(tmp_path / "ep9-ba9"))
    with pytest.raises(InvalidInputError, match="is not a DeepSpeed checkpoint \\(no mp_rank_00_model_states.pt\\)"):
        check_custom_weights(str(tmp_path))
