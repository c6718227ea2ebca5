"""Rendering runs for people: the event stream with a progress bar, and tables of runs."""

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flows import foundation_model as fm

console = Console()


def follow(run: "fm.TrainingRun | str") -> "fm.FineTuningEvent | None":
    """Print the run's events as they come, with a progress bar while it trains; returns the last event."""
    last = None
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        bar = None
        for event in fm.get_events(run, follow=True):
            last = event
            p = event.payload
            if event.type == "TRAIN_UPDATED" and "total_batches" in p:
                if bar is None:
                    bar = progress.add_task("training", total=p["total_batches"], loss="")
                progress.update(bar, completed=p["batch"], loss=f"loss {p['loss']:.3f}")
                continue
            style = {"FAILED": "bold red", "CANCELED": "yellow", "COMPLETED": "bold green"}.get(event.type, "cyan")
            progress.console.print(f"[dim]{event.time:%H:%M:%S}[/dim] [{style}]{event.type:<17}[/{style}] {escape(event.message)}")
    return last


def runs_table(runs: "list[fm.TrainingRun]") -> Table:
    table = Table("name", "status", "model", "task", "duration", "created", "created by")
    for r in runs:
        table.add_row(r.name, r.status.display_name, r.model, r.task_type, r.training_duration,
                      f"{r.created_at:%Y-%m-%d %H:%M:%S}", r.created_by)
    return table
