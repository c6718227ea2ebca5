"""The training worker and what it stands on: the spec it reads, the rows it trains on, its checkpoints.

`python -m tasks.training.worker` trains one run (see worker.py); `python -m tasks.training.prebuild`
compiles DeepSpeed's CPU comm op ahead of the first run.
"""
