"""When a failed task is worth another try."""


def retryable(task, task_run, state) -> bool:
    """Retry crashes, dead workers and flaky stores; never an error that says a retry cannot help (bad input)."""
    return getattr(state.result(raise_on_failure=False), "retryable", True)
