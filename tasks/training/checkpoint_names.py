"""The names in a run's checkpoint folder that code without torch needs too (the API, the upload, the checks)."""

LATEST = "latest-sharded-rank0.symlink"  # -> the newest complete ep*-ba* folder
# Rank 0's model-states file, in every DeepSpeed checkpoint folder; it also holds the client state (ours under
# "tessera"). ZeRO 0-2 name it for the model-parallel rank, ZeRO-3 for the data-parallel rank as well.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
