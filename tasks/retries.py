"""When a failed task is worth another try."""

from tasks.errors import InvalidInputError


def unless_bad_input(task, task_run, state) -> bool:
    """Retry crashes, dead workers and flaky stores; never bad input, which fails the same way again."""
    return not isinstance(state.result(raise_on_failure=False), InvalidInputError)
