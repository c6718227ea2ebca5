"""`make demo`: fine-tune the bundled SmolLM2-135M-Instruct to know Tessera, on the embedded default.

Starts the local Prefect server, its work pool's worker and MLflow UI if they are not running, submits one run through
the public API, streams its events, then shows the answers before and after and the registered model.
"""

import time
from pathlib import Path

from rich.table import Table

from api import service as http_api
from cli.console import console, follow
from deployments import services
from flows import foundation_model as fm
from tasks import tracking

DATA = Path(__file__).parent / "data"


def main() -> int:
    started = time.monotonic()
    with console.status("starting the embedded Prefect server, worker, MLflow UI and HTTP API"):
        api_url = http_api.ensure_serving()
    console.print(f"services up in {time.monotonic() - started:.0f}s: Prefect UI {services.prefect_ui_url()}, "
                  f"MLflow UI {services.mlflow_ui_url()}, HTTP API {api_url}")

    prompts = (DATA / "eval_prompts.txt").read_text().splitlines()
    run = fm.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        train_data_path=str(DATA / "tessera_chat.jsonl"),
        eval_data_path=str(DATA / "tessera_chat_eval.jsonl"),
        register_to="main.demo",
        training_duration="2ep",
        learning_rate=3e-4,  # at 1e-4 only the house style sticks; 3e-4 makes the facts stick too
        context_length=256,  # the conversations are short; small rows keep a CPU step quick
        eval_prompts=prompts,
    )
    console.print(f"created run [bold]{run.name}[/bold]; Prefect flow run {services.prefect_ui_url()}/runs/flow-run/{run.flow_run_id}")
    last = follow(run)
    run.refresh()
    if last is None or last.type != "COMPLETED":
        console.print(f"[bold red]run ended {run.status.display_name}[/bold red]: {run.details or (last and last.message)}")
        return 1

    answers = tracking.client().load_table(run.experiment_id, "eval_generations.json", run_ids=[run.run_id])
    first, final = answers["batch"].min(), answers["batch"].max()
    table = Table("prompt", f"before (batch {first})", f"after (batch {final})", show_lines=True)
    for prompt in prompts:
        rows = answers[answers["prompt"] == prompt]
        table.add_row(prompt, rows[rows["batch"] == first]["response"].iloc[0],
                      rows[rows["batch"] == final]["response"].iloc[0])
    console.print(table)

    registered = last.payload["registered_model"]
    console.print(f"registered model: [bold]{registered}[/bold] version {last.payload['version']} "
                  f"(alias @candidate); load it with mlflow.transformers.load_model('models:/{registered}@candidate')")
    console.print(f"checkpoints: {', '.join(fm.get_checkpoints(run))}")
    console.print(f"Prefect UI: {services.prefect_ui_url()}   MLflow UI: {services.mlflow_ui_url()}   "
                  f"HTTP API: {api_url} (DATABRICKS_HOST for the databricks-genai SDK; "
                  f"{api_url}/v1 is base_url for OpenAI's client, which chats with {registered})   "
                  f"(stop them with `.venv/bin/tessera server stop`)")
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
