"""Tessera's Prefect flows: a run (finetune), a sweep, a retraining and one node of a run over several machines,
with the life cycle they share (lifecycle.py). `flows.foundation_model` is the client's documented name."""
