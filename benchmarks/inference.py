"""Inference through `tessera serve` (OpenAI's client, streamed) against transformers' generate in-process.

    .venv/bin/python benchmarks/inference.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--tokens 128]

The same model, prompts and settings (greedy, `--tokens` new tokens, the model's chat template) both ways. For each
prompt: time to first token (the first streamed piece of text) and decode speed (the tokens generated after the
first, over the time after it; the server counts them in its usage chunk). The server is started here, without
keys, in a temporary TESSERA_HOME; its first request loads the model (timed apart as the cold start). The peer is
what the server runs, minus HTTP and the OpenAI chunk format.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROMPTS = ["What is fine-tuning?", "Name three uses of a language model.", "Write a haiku about the sea.",
           "Explain gradient descent to a child.", "What does a tokenizer do?"]


def through_server(url: str, model: str, tokens: int) -> tuple[float, list[tuple[float, float]]]:
    """(cold start s, [(ttft s, tokens/s)] per prompt) through the OpenAI client, streamed."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    started = time.perf_counter()
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                   temperature=0)
    cold = time.perf_counter() - started
    figures = []
    for prompt in PROMPTS:
        started, first, generated = time.perf_counter(), None, 0
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=tokens, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
            if chunk.usage:
                generated = chunk.usage.completion_tokens
        ended = time.perf_counter()
        figures.append((first - started, (generated - 1) / (ended - first)))
    return cold, figures


def in_process(model: str, tokens: int) -> tuple[float, list[tuple[float, float]]]:
    """The same with transformers' generate and TextIteratorStreamer, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from tasks.models import resolve_model

    started = time.perf_counter()
    folder = resolve_model(model)
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    cold = time.perf_counter() - started
    figures = []
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        output = {}

        def generate():
            with torch.no_grad():
                output["ids"] = lm.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=streamer,
                                            pad_token_id=tokenizer.eos_token_id)

        started, first = time.perf_counter(), None
        worker = threading.Thread(target=generate)
        worker.start()
        for piece in streamer:
            first = first or (time.perf_counter() if piece else None)
        worker.join()
        ended = time.perf_counter()
        generated = output["ids"].shape[1] - inputs["input_ids"].shape[1]
        figures.append((first - started, (generated - 1) / (ended - first)))
    return cold, figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    from tasks.ports import free_port

    port, home = free_port(), tempfile.mkdtemp(prefix="tessera-inference-bench-")
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
                              env={**os.environ, "TESSERA_HOME": home, "TESSERA_API_KEYS": ""},
                              cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while subprocess.run(["curl", "-s", "-o", "/dev/null", f"{url}/docs"]).returncode:
            assert server.poll() is None, "tessera serve did not start"
            time.sleep(0.5)
        results = {"tessera serve (OpenAI client, streamed)": through_server(url, args.model, args.tokens)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    results["transformers generate, in-process"] = in_process(args.model, args.tokens)

    table = Table("path", "cold start s", "time to first token s (median)", "tokens/s after it (median)",
                  title=f"{args.model}, greedy, {args.tokens} new tokens, {len(PROMPTS)} prompts, "
                        f"{os.cpu_count()} CPU cores")
    for path, (cold, figures) in results.items():
        table.add_row(path, f"{cold:.1f}", f"{statistics.median(f[0] for f in figures):.3f}",
                      f"{statistics.median(f[1] for f in figures):.1f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
