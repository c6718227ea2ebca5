"""Rendering runs for people: the event stream with a progress bar, and tables of runs."""

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import client as fm
from tasks.data.validation import DataValidation

console = Console()


def follow(run: "fm.TrainingRun | fm.Sweep | fm.Retraining | str") -> "fm.FineTuningEvent | None":
    """Print a run's or a sweep's events as they come, with a progress bar while a run trains; returns the last."""
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
            style = {"FAILED": "bold red", "CANCELED": "yellow", "WARNING": "yellow",
                     "COMPLETED": "bold green"}.get(event.type, "cyan")
            progress.console.print(f"[dim]{event.time:%H:%M:%S}[/dim] [{style}]{event.type:<17}[/{style}] {escape(event.message)}")
    return last


def runs_table(runs: "list[fm.TrainingRun]") -> Table:
    table = Table("name", "status", "model", "task", "duration", "created", "created by")
    for r in runs:
        table.add_row(r.name, r.status.display_name, r.model, r.task_type, r.training_duration,
                      f"{r.created_at:%Y-%m-%d %H:%M:%S}", r.created_by)
    return table


def sweeps_table(sweeps: "list[fm.Sweep]") -> Table:
    table = Table("name", "status", "trials", "searched", "strategy", "created", "created by")
    for s in sweeps:
        settings = s.config.sweep if s.config else None
        table.add_row(s.name, s.status.display_name, str(settings.trials) if settings else "?",
                      ", ".join(settings.space) if settings else "?", settings.strategy if settings else "?",
                      f"{s.created_at:%Y-%m-%d %H:%M:%S}", s.created_by)
    return table


def schedules_table(schedules: "list[fm.RetrainingSchedule]") -> Table:
    table = Table("registered model", "cron", "timezone", "active", "mode", "min improvement", "data")
    for s in schedules:
        table.add_row(s.registered_model, s.cron, s.timezone, "yes" if s.active else "paused", s.config.retrain.mode,
                      f"{s.config.retrain.min_improvement:g}", s.config.run.train_data_path)
    return table


def retrainings_table(retrainings: "list[fm.Retraining]") -> Table:
    table = Table("name", "registered model", "status", "outcome", "challenger", "created")
    for r in retrainings:
        table.add_row(r.name, r.registered_model, r.status.display_name, r.outcome or "", r.challenger or "",
                      f"{r.created_at:%Y-%m-%d %H:%M:%S}")
    return table


def data_summary(result: DataValidation) -> Group:
    """The report, token statistics, quality checks, warnings and cost estimate of a data check."""
    verdict = "[bold green]valid[/bold green]" if result.ok else "[bold red]not valid[/bold red]"
    parts: list = [f"{verdict}: {escape(result.report)}"]
    s = result.stats
    if s["num_examples"] or s["num_dropped"]:  # nothing was tokenized when the records were refused
        parts += _pair_tokens(s) if "pairs" in s else [_example_tokens(s)]
    if result.prepared is not None:
        p = result.prepared
        shape = f" of {p.row_length:,} tokens, each pair's two sides in one" if p.row_length != p.context_length else ""
        parts.append(f"packed into {p.num_rows:,} rows{shape} ({p.packing_efficiency:.1%} of each row is data)")
    if result.training_tokens is not None:
        parts.append(f"estimate: {result.training_duration} is {result.training_steps:,} optimizer steps, "
                     f"{result.training_tokens:,} token positions ({s['num_tokens']:,} data tokens per epoch)")
    checks = result.quality
    parts.append("quality checks (great-expectations): " + ("passed" if checks["success"] else "[red]failed[/red]"))
    parts += [f"  [red]x[/red] {escape(line)}" for line in checks["failed"]]
    parts += [f"[yellow]warning:[/yellow] {escape(w)}" for w in result.warnings]
    parts.append(f"[dim]evidence: {result.evidence} (report.txt, stats.json, quality.json, lengths.png)[/dim]")
    return Group(*parts)


def _lengths(length: dict) -> str:
    return f"{length['min']} / {length['p50']} / {length['p90']} / {length['max']}"


def _example_tokens(s: dict) -> Table:
    table = Table("examples", "tokens", "loss tokens", "length min / p50 / p90 / max", "truncated", "dropped",
                  title=f"tokens at context_length {s['context_length']:,}", title_justify="left")
    table.add_row(f"{s['num_examples']:,}", f"{s['num_tokens']:,}", f"{s['num_loss_tokens']:,}", _lengths(s["length"]),
                  f"{s['num_truncated']:,}", f"{s['num_dropped']:,}")
    return table


def _pair_tokens(s: dict) -> list:
    """The pairs' tokens per side, answers cut, and the histogram of sequence lengths (a prompt with one answer)."""
    pairs = s["pairs"]
    table = Table("pairs", "prompt tokens", "chosen tokens", "rejected tokens", "sequence min / p50 / p90 / max",
                  "truncated chosen / rejected", title=f"tokens at context_length {s['context_length']:,} (a sequence "
                  "is a prompt with one answer)", title_justify="left")
    table.add_row(f"{s['num_examples']:,}", f"{pairs['prompt_tokens']:,}", f"{pairs['chosen_tokens']:,}",
                  f"{pairs['rejected_tokens']:,}", _lengths(s["length"]),
                  f"{pairs['chosen_truncated']:,} / {pairs['rejected_truncated']:,}")
    most = max(b["count"] for b in pairs["histogram"]) or 1
    bars = [f"  {b['from']:>6,}-{b['to']:<6,} {'█' * round(24 * b['count'] / most):<24} {b['count']:,}"
            for b in pairs["histogram"]]
    return [table, "sequences by length in tokens:", *bars]
