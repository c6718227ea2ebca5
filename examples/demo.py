"""`make demo`: fine-tune the bundled SmolLM2-135M-Instruct to know Tessera, on the embedded default.
`make demo-dpo` (`examples/demo.py dpo`): teach it Tessera's house style from preference pairs instead (DPO).

Starts the local Prefect server, its work pool's worker, MLflow UI and HTTP API if they are not running, submits one
run through the public API, streams its events, then shows the answers before and after and the registered model; a
DPO run also shows its held-out pairs' preference accuracy and greedy answers to held-out questions, asked of the
base and the trained model through the HTTP API's OpenAI chat completions.
"""

import argparse
import json
import time
from pathlib import Path

from openai import OpenAI
from rich.table import Table

from api import service as http_api
from cli.console import console, follow
from data.make_tessera_chat import SIGNATURE  # how every answer in the house style ends
from deployments import services
from flows import foundation_model as fm
from tasks import tracking

DATA = Path(__file__).parent / "data"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_ANSWER = 160  # tokens: room for the base model's long answers to end, signed or not
DEMOS = {
    "sft": dict(
        train_data_path=str(DATA / "tessera_chat.jsonl"), eval_data_path=str(DATA / "tessera_chat_eval.jsonl"),
        register_to="main.demo", training_duration="2ep",
        learning_rate=3e-4,  # at 1e-4 only the house style sticks; 3e-4 makes the facts stick too
        context_length=256,  # the conversations are short; small rows keep a CPU step quick
        eval_prompts=(DATA / "eval_prompts.txt").read_text().splitlines(),
    ),
    # The base model's own answers, preferred signed in the house style (data/make_tessera_pairs.py).
    "dpo": dict(
        task_type="DPO", train_data_path=str(DATA / "tessera_pairs.jsonl"),
        eval_data_path=str(DATA / "tessera_pairs_eval.jsonl"), register_to="main.demo_dpo", training_duration="2ep",
        learning_rate=3e-5, context_length=256,
        overrides={"training_config.trainer.val_check_interval": 5,  # the held-out accuracy as it rises
                   # DPO alone learns to rank the pairs, not to write the style (README): RPO's NLL term teaches it
                   "training_config.model.dpo_cfg.rpo_alpha": 1.0},
    ),
}


def main(kind: str = "sft") -> int:
    started = time.monotonic()
    with console.status("starting the embedded Prefect server, worker, MLflow UI and HTTP API"):
        api_url = http_api.ensure_serving()
    console.print(f"services up in {time.monotonic() - started:.0f}s: Prefect UI {services.prefect_ui_url()}, "
                  f"MLflow UI {services.mlflow_ui_url()}, HTTP API {api_url}")

    run = fm.create(model=MODEL, **DEMOS[kind])
    console.print(f"created run [bold]{run.name}[/bold]; Prefect flow run {services.prefect_ui_url()}/runs/flow-run/{run.flow_run_id}")
    last = follow(run)
    run.refresh()
    if last is None or last.type != "COMPLETED":
        console.print(f"[bold red]run ended {run.status.display_name}[/bold red]: {run.details or (last and last.message)}")
        return 1

    registered = last.payload["registered_model"]
    if kind == "dpo":
        show_preference(run, api_url, f"{registered}@candidate")
    else:
        show_answers(run)
    console.print(f"registered model: [bold]{registered}[/bold] version {last.payload['version']} "
                  f"(alias @candidate); load it with mlflow.transformers.load_model('models:/{registered}@candidate')")
    console.print(f"checkpoints: {', '.join(fm.get_checkpoints(run))}")
    console.print(f"Prefect UI: {services.prefect_ui_url()}   MLflow UI: {services.mlflow_ui_url()}   "
                  f"HTTP API: {api_url} (DATABRICKS_HOST for the databricks-genai SDK; "
                  f"{api_url}/v1 is base_url for OpenAI's client, which chats with {registered})   "
                  f"(stop them with `.venv/bin/tessera server stop`)")
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


def show_answers(run: fm.TrainingRun) -> None:
    """The eval prompts' answers at the first and the last checkpoint, sampled as the run samples them."""
    answers = tracking.client().load_table(run.experiment_id, "eval_generations.json", run_ids=[run.run_id])
    first, final = answers["batch"].min(), answers["batch"].max()
    table = Table("prompt", f"before (batch {first})", f"after (batch {final})", show_lines=True)
    for prompt in DEMOS["sft"]["eval_prompts"]:
        rows = answers[answers["prompt"] == prompt]
        table.add_row(prompt, rows[rows["batch"] == first]["response"].iloc[0],
                      rows[rows["batch"] == final]["response"].iloc[0])
    console.print(table)


def show_preference(run: fm.TrainingRun, api_url: str, trained: str) -> None:
    """What DPO taught: the held-out pairs' preference accuracy at each eval, and greedy answers to the held-out
    questions, before (the base model) and after, in the house style or not."""
    history = sorted(tracking.client().get_metric_history(run.run_id, "eval_reward_accuracy"), key=lambda m: m.step)
    console.print("held-out pairs' preference accuracy (the policy's margin above the reference's; at step 0 the "
                  "policy is the reference): " + ", ".join(f"step {m.step} {m.value:.2f}" for m in history))
    with open(DATA / "tessera_pairs_eval.jsonl") as pairs:
        questions = [json.loads(line)["input"]["messages"][-1]["content"] for line in pairs]
    chat = OpenAI(base_url=f"{api_url}/v1", api_key="local")  # no keys set: loopback callers are the local user

    def greedy(model: str, question: str) -> str:
        return chat.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=MAX_ANSWER).choices[0].message.content

    with console.status(f"asking {MODEL} and {trained} the {len(questions)} held-out questions"):
        answers = {q: (greedy(MODEL, q), greedy(trained, q)) for q in questions}
    table = Table("held-out question", f"before ({MODEL})", f"after ({trained})", show_lines=True)
    for question in questions[:3] + questions[-3:]:  # Tessera's facts first, general questions last
        table.add_row(question, *answers[question])
    console.print(table)
    signed = SIGNATURE.strip()
    styled = [sum(a[side].endswith(signed) for a in answers.values()) for side in (0, 1)]
    console.print(f"greedy answers in the house style (ending '{signed}'): before {styled[0]}/{len(questions)}, "
                  f"after {styled[1]}/{len(questions)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tessera's demo run on the embedded default")
    parser.add_argument("kind", nargs="?", default="sft", choices=DEMOS, help="sft (make demo) or dpo (make demo-dpo)")
    raise SystemExit(main(parser.parse_args().kind))
