"""`tessera`: the command line over the same API as `from flows import foundation_model as fm`."""

import sys
import warnings
from typing import Annotated, Any, Literal

import yaml
from cyclopts import App, Parameter
from rich.markup import escape
from rich.table import Table
from ruamel.yaml import YAMLError

import client as fm
from api import service as http_api
from cli.console import (
    console,
    data_summary,
    follow,
    retrainings_table,
    runs_table,
    schedules_table,
    sweeps_table,
)
from cli.options import with_arguments
from deployments import services
from tasks.arguments import setting_default
from tasks.errors import InvalidInputError, TesseraError
from tasks.nova import AmazonOnlyKeys
from tasks.recipe import read_yaml

app = App(name="tessera", help="Self-hosted fine-tuning of foundation language models.")
server = App(name="server", help="The embedded Prefect server, its work pool's worker, MLflow UI and HTTP API.")
app.command(server)
retrain = App(name="retrain", help="Scheduled retraining: keep a registered model's @champion current.")
app.command(retrain)


@app.command
@with_arguments()
def create(
    *,
    recipe: str | None = None,
    settings: Annotated[list[str] | None, Parameter(name="--set")] = None,
    follow_events: Annotated[bool, Parameter(name="--follow")] = False,
    arguments: dict[str, Any],
):
    """Start a fine-tuning run (from arguments, a recipe, or both); with --follow, stream its events until it ends.

    Parameters
    ----------
    recipe
        a YAML recipe laid out like Nova's SFT recipes (examples/recipes/); the other options override it
    settings
        PATH=VALUE: any setting by its path in the recipe, e.g. --set training_config.trainer.max_steps=40
        (the value is read as YAML); repeatable
    """
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", AmazonOnlyKeys)
        run = fm.create(**arguments, recipe=recipe, overrides=dict(map(_path_value, settings or [])))
    for w in said:  # the recipe's ignored keys, said as a line; any other warning as Python would have shown it
        if issubclass(w.category, AmazonOnlyKeys):
            console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", soft_wrap=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    console.print(f"created [bold]{run.name}[/bold] ({run.status.display_name}); follow it with "
                  f"`tessera events {run.name} --follow`")
    if follow_events:
        last = follow(run)
        return 0 if last is not None and last.type == "COMPLETED" else 1


def _path_value(setting: str) -> tuple[str, object]:
    """`training_config.trainer.max_steps=40` -> ("training_config.trainer.max_steps", 40), the value read as YAML."""
    path, sep, value = setting.partition("=")
    if not sep or not path.strip():
        raise InvalidInputError(
            f"--set {setting!r} is not PATH=VALUE: write e.g. --set training_config.trainer.max_steps=40"
        )
    try:
        return path.strip(), read_yaml(value)
    except YAMLError as e:
        raise InvalidInputError(f"--set {setting!r}: the value is not valid YAML: {e}") from None


@app.command(name="sweep")
def start_sweep(
    *,
    recipe: str | None = None,
    resume: str | None = None,
    settings: Annotated[list[str] | None, Parameter(name="--set")] = None,
    follow_events: Annotated[bool, Parameter(name="--follow")] = False,
):
    """Start a hyperparameter sweep from a recipe with a `sweep:` section, or resume one; with --follow, stream its
    events (each trial started and finished, the best) until it ends.

    Parameters
    ----------
    recipe
        a YAML recipe with a sweep: section (examples/recipes/sweep.yaml)
    resume
        the name of a sweep whose flow crashed, failed or was stopped: its study continues
    settings
        PATH=VALUE: any setting by its path, e.g. --set sweep.max_trials=4; repeatable
    """
    if (recipe is None) == (resume is None):
        raise InvalidInputError("give --recipe FILE to start a sweep, or --resume NAME to continue one")
    sweep = fm.resume_sweep(resume) if resume else fm.sweep(recipe=recipe,
                                                          overrides=dict(map(_path_value, settings or [])))
    console.print(f"{'resumed' if resume else 'created'} sweep [bold]{sweep.name}[/bold]; follow it with "
                  f"`tessera events {sweep.name} --follow`")
    if follow_events:
        last = follow(sweep)
        return 0 if last is not None and last.type == "COMPLETED" else 1


@app.command
def sweeps(*, status: list[str] | None = None, limit: int = 100):
    """List sweeps, newest first."""
    console.print(sweeps_table(fm.list_sweeps(statuses=status, limit=limit)))


@retrain.command(name="schedule")
def retrain_schedule(
    registered_model: str,
    *,
    cron: str,
    timezone: str = "UTC",
    train_data_path: str | None = None,
    eval_data_path: str | None = None,
    mode: Literal["continue", "from_base"] | None = None,
    min_improvement: float | None = None,
    model: str | None = None,
    recipe: str | None = None,
    settings: Annotated[list[str] | None, Parameter(name="--set")] = None,
):
    """Retrain a registered model on a cron schedule (the deployment retrain/<model>); again, replace it.

    Parameters
    ----------
    registered_model
        catalog.schema.model: the model whose @champion this maintains
    cron
        five cron fields, e.g. "0 3 * * *" (03:00 every day, in --timezone)
    train_data_path
        a folder or S3 prefix of .jsonl files, or a Delta table, that grows
    eval_data_path
        the frozen set champion and challenger are judged on
    mode
        continue (from the champion's checkpoint, on what is new; default) or from_base (the base model, on all)
    min_improvement
        how far the challenger's eval loss must fall below the champion's to be promoted (default 0)
    model
        the base model (default: the one the champion was trained from)
    recipe
        a YAML recipe with a retrain: section (examples/recipes/retrain.yaml); the other options override it
    settings
        PATH=VALUE: any setting by its path, e.g. --set training_config.trainer.max_steps=40; repeatable
    """
    schedule = fm.schedule_retraining(
        registered_model, train_data_path, eval_data_path, cron=cron, timezone=timezone, mode=mode,
        min_improvement=min_improvement, model=model, recipe=recipe, overrides=dict(map(_path_value, settings or [])))
    console.print(schedules_table([schedule]))
    console.print(f"deployment retrain/{registered_model}: run it now with `tessera retrain now {registered_model}` "
                  f"or `prefect deployment run 'retrain/{registered_model}'`; pause it with `tessera retrain pause "
                  f"{registered_model}` or in the Prefect UI ({services.prefect_ui_url()}/deployments)")


@retrain.command(name="now")
def retrain_now(
    registered_model: str,
    *,
    recipe: str | None = None,
    settings: Annotated[list[str] | None, Parameter(name="--set")] = None,
    follow_events: Annotated[bool, Parameter(name="--follow")] = False,
):
    """Retrain a registered model now, with the settings of its schedule (or of --recipe and --set).

    Parameters
    ----------
    registered_model
        catalog.schema.model
    recipe
        a YAML recipe with a retrain: section, instead of the schedule's settings
    settings
        PATH=VALUE: any setting by its path; repeatable
    """
    retraining = fm.retrain_now(registered_model, recipe=recipe,
                                overrides=dict(map(_path_value, settings or [])) or None)
    console.print(f"started retraining [bold]{retraining.name}[/bold]; follow it with "
                  f"`tessera events {retraining.name} --follow`")
    if follow_events:
        last = follow(retraining)
        return 0 if last is not None and last.type == "COMPLETED" else 1


@retrain.command(name="list")
def retrain_list(registered_model: str | None = None, *, limit: int = 100):
    """The retraining schedules, and the retrainings so far (of one model, when given), newest first."""
    schedules = fm.list_retraining_schedules()
    console.print(schedules_table([s for s in schedules if registered_model in (None, s.registered_model)]))
    console.print(retrainings_table(fm.list_retrainings(registered_model, limit=limit)))


@retrain.command(name="pause")
def retrain_pause(registered_model: str):
    """Pause a model's retraining schedule."""
    console.print(schedules_table([fm.pause_retraining(registered_model)]))


@retrain.command(name="resume")
def retrain_resume(registered_model: str):
    """Resume a model's paused retraining schedule."""
    console.print(schedules_table([fm.pause_retraining(registered_model, paused=False)]))


@retrain.command(name="unschedule")
def retrain_unschedule(registered_model: str):
    """Remove a model's retraining schedule and its deployment; its retrainings so far and its champion stay."""
    fm.unschedule_retraining(registered_model)
    console.print(f"{registered_model} is no longer retrained on a schedule")


@app.command
def promote(registered_model: str, version: int):
    """Move a registered model's @champion to a version by hand (a rollback)."""
    before = fm.promote(registered_model, version)
    console.print(f"{registered_model}@champion: version {version}" + (f" (was {before})" if before else ""))


@app.command
@with_arguments("model", "task_type", "training_duration", "context_length", "allow_percentage_invalid_samples",
                defaults=fm.validate_data, positional=False)
def validate(
    data_path: str,
    *,
    global_batch_size: int = setting_default("training_config.global_batch_size"),
    arguments: dict[str, Any],
):
    """Check a data set as a run would, before any run: the report, token statistics and the cost estimate.

    Exits 0 when the data is fit to train on, 1 when it is not (2 for bad arguments). The model's tokenizer and chat
    template count the tokens; training_duration and global_batch_size make the estimate. A passing check leaves
    the prepared rows in the cache, so a run on the same data and settings starts from them.

    Parameters
    ----------
    data_path
        a .jsonl file, s3://, dbfs:/Volumes/..., an HF dataset org/name/split, a Delta table cat.schema.table
    global_batch_size
        rows per optimizer step, for the estimate
    """
    result = fm.validate_data(data_path, **arguments, global_batch_size=global_batch_size)
    console.print(data_summary(result))
    return 0 if result.ok else 1


@app.command
def get(name: str):
    """Show one run, and its config as a recipe (which `tessera create --recipe` runs again)."""
    run = fm.get(name)
    table = Table(show_header=False)
    for key, value in run.__dict__.items():
        if key != "config":
            table.add_row(key, str(value))
    console.print(table)
    if run.config is not None:
        console.print(escape(yaml.safe_dump(run.config.to_recipe(), sort_keys=False)), end="")


@app.command(name="list")
def list_runs(*, status: list[str] | None = None, limit: int = 100):
    """List runs, newest first."""
    console.print(runs_table(fm.list(statuses=status, limit=limit)))


@app.command
def cancel(names: list[str]):
    """Cancel runs or sweeps (a sweep with all its trials) by name."""
    console.print(f"cancelled {sum(fm.cancel(name) for name in names)} run(s)")


@app.command
def events(name: str, *, follow_events: Annotated[bool, Parameter(name="--follow")] = False):
    """Print a run's events; with --follow, until it ends."""
    if follow_events:
        follow(name)
        return
    for event in fm.get_events(name):
        console.print(f"[dim]{event.time:%H:%M:%S}[/dim] {event.type:<17} {escape(event.message)}")


@app.command
def checkpoints(name: str):
    """Print a run's checkpoint URIs."""
    for uri in fm.get_checkpoints(name):
        console.print(uri)


@app.command
def models():
    """The model catalog."""
    table = Table("name", "display name", "max context", "available here")
    for m in fm.get_models():
        table.add_row(m.name, m.display_name, str(m.max_context_length), "yes" if m.available else "no")
    console.print(table)


@app.command
def serve(*, host: str = "127.0.0.1", port: int = http_api.HTTP_API.default_port):
    """Serve Tessera over HTTP: the databricks-genai SDK's API (DATABRICKS_HOST=http://HOST:PORT) and OpenAI's
    files, fine-tuning and inference API (base_url=http://HOST:PORT/v1), for the keys in TESSERA_API_KEYS. The
    embedded default runs one once `tessera server start` started it (tessera server status)."""
    from api.app import (
        serve as serve_http,  # FastAPI and ariadne: only this command needs them
    )

    serve_http(host, port)


@app.command
def worker(*, pool: str = services.LOCAL_POOL, gpus: int | None = None, name: str | None = None,
           addr: str | None = None):
    """Start a Prefect worker of the work pool on this machine, taking the runs that fit it: those that ask for at
    most `gpus` processes (default: the GPUs it sees, 1 without any), those that ask for none, and the nodes of runs
    over several machines sent to it by name (default: the host name). `addr` is where the other machines reach this
    one (a run over several machines needs it on the one that heads it). Prefect's
    `prefect worker start --pool POOL --name NAME --work-queue ...`, with the queues deployments/queues.py names.
    Without PREFECT_API_URL it serves the embedded default's local server (whose own worker runs already)."""
    from deployments import worker as pool_worker

    with services.connected():  # the embedded services started; a shared server's refusal of the credentials said
        pool_worker.start(pool, gpus, name, addr)


@server.command(name="start")
def server_start():
    """Start the local Prefect server, its work pool's worker, MLflow UI and HTTP API (those not running)."""
    http_api.ensure_serving()
    server_status()


@server.command(name="stop")
def server_stop():
    """Stop them; runs in progress stop uncancelled and resume from their latest checkpoint at the next start."""
    stopped = services.stop()
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@server.command(name="status")
def server_status():
    """Show whether each embedded service runs, and where."""
    for name, state in services.status(above={http_api.HTTP_API: http_api.url()}).items():
        console.print(f"{name:<15} {state}")


def main() -> None:
    try:
        result = app(sys.argv[1:])
    except (TesseraError, OSError) as e:  # OSError: the machine's (a full disk, a folder taken away), not a bug
        # Unwrapped and unmarked: a path in the message stays whole and copyable, brackets stay literal.
        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
