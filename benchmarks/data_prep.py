"""Data preparation throughput: Tessera's prepare_dataset against TRL's SFT dataset preparation, in one run.

Builds (once, cached) a synthetic chat corpus, then validates, templates, tokenizes and packs it with each system in
a fresh subprocess, timing it and sampling the memory of its whole process tree. The last line printed is
`data_prep: tessera_tokens_per_s=N peer_tokens_per_s=M peak_rss_mb=R`, R being Tessera's peak.

    .venv/bin/python benchmarks/data_prep.py [--conversations 100000] [--context-length 4096]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from tasks.data.prepare import prepare_dataset
from tasks.home import cache_dir
from tasks.models import tokenizer_folder

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED = 1234
CORPUS_VERSION = 1  # bump when the generator changes, so a cached corpus is not reused
MEAN_TOKENS = 500  # per conversation, chat template included: 100k conversations make ~50M tokens
LENGTH_SIGMA = 0.6  # log-normal spread of conversation lengths
TOKENS_PER_WORD = 1.16  # measured on this generator's text: most words are one token, plus punctuation
FRAME_TOKENS = 5  # '<|im_start|>role\n' ... '<|im_end|>\n' around each message
DEFAULT_SYSTEM_TOKENS = 20  # SmolLM2's template adds its own system prompt when a conversation has none
SAMPLE_SECONDS = 0.05  # how often the process tree's RSS is read

# Piped output gets rich's 80 columns, which would cut the table's headers short.
console = Console(width=None if sys.stdout.isatty() else 110)


@dataclass(frozen=True)
class Result:
    system: str
    conversations: int
    tokens: int  # real tokens in the packed rows, padding excluded
    rows: int
    seconds: float
    packing_efficiency: float  # tokens / (rows * context_length)
    peak_rss_mb: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def main() -> None:
    """Build or reuse the corpus, measure both systems, print the table and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--context-length", type=int, default=4096)
    # A measured run re-enters this script in a subprocess with these.
    parser.add_argument("--worker", choices=("tessera", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.corpus, args.model_dir, args.context_length, args.result)
        return

    model_dir = tokenizer_folder(MODEL)  # before TESSERA_CACHE is redirected, so the extracted tokenizer is reused
    corpus = build_corpus(args.conversations, model_dir)
    results = [measure(system, corpus, model_dir, args.context_length, args.conversations)
               for system in ("tessera", "peer")]
    print_table(results, args.context_length)
    tessera, peer = results
    print(f"data_prep: tessera_tokens_per_s={tessera.tokens_per_s:.0f} peer_tokens_per_s={peer.tokens_per_s:.0f} "
          f"peak_rss_mb={tessera.peak_rss_mb:.0f}")


def build_corpus(conversations: int, model_dir: Path) -> Path:
    """The seeded chat corpus as JSONL under the Tessera cache, generated on first use."""
    path = cache_dir() / "bench" / f"chat-{conversations}-seed{SEED}-v{CORPUS_VERSION}.jsonl"
    if path.is_file():
        console.print(f"corpus: {path} (cached)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"corpus: generating {conversations:,} conversations into {path}")
    words, cdf = vocabulary_words(model_dir)
    rng = np.random.default_rng(SEED)
    partial = path.with_suffix(".partial")
    with partial.open("w") as f:
        for _ in range(conversations):
            f.write(json.dumps({"messages": conversation(rng, words, cdf)}) + "\n")
    partial.rename(path)  # a corpus under its final name is complete
    return path


def vocabulary_words(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The tokenizer's whole-word tokens ('Ġword') and the cumulative Zipf distribution to draw them from.

    Drawing from the tokenizer's own words makes the text tokenize like English (about one token a word); random
    letters would split into many tokens each. BPE merges frequent strings first, so a lower id is a likelier word."""
    vocab = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    ranked = sorted((i, token[1:]) for token, i in vocab.items()
                    if token.startswith("Ġ") and token[1:].isascii() and token[1:].isalpha()
                    and token[1:].islower() and any(vowel in token for vowel in "aeiouy")
                    and (len(token) > 2 or token == "Ġa"))
    words = np.array([word for _, word in ranked], dtype=object)
    # Zipf over the id order, flattened at the head: the earliest merges are fragments like 'Ġre' as often as
    # common words like 'Ġthe'.
    weights = 1.0 / (np.arange(len(words)) + 10.0)
    cdf = np.cumsum(weights)
    return words, cdf / cdf[-1]


def conversation(rng: np.random.Generator, words: np.ndarray, cdf: np.ndarray) -> list[dict[str, str]]:
    """An optional system message (30%), then 1-3 user/assistant turns, ~MEAN_TOKENS tokens long in all."""
    turns = int(rng.integers(1, 4))
    has_system = rng.random() < 0.3
    mu = np.log(MEAN_TOKENS) - LENGTH_SIGMA ** 2 / 2  # so the log-normal's mean is MEAN_TOKENS
    overhead = FRAME_TOKENS * (2 * turns + has_system) + (0 if has_system else DEFAULT_SYSTEM_TOKENS)
    system_words = int(rng.integers(15, 40)) if has_system else 0
    budget = max(rng.lognormal(mu, LENGTH_SIGMA) - overhead, 4 * turns) / TOKENS_PER_WORD - system_words
    # Users ask briefly and assistants answer at length: a quarter of the words to the users' side.
    shares = rng.dirichlet(np.ones(2 * turns)) * np.tile([0.5, 1.5], turns)
    counts = np.maximum((budget * shares / shares.sum()).astype(int), 3)
    messages = [{"role": "system", "content": text(rng, words, cdf, system_words, "system")}] if has_system else []
    for i, count in enumerate(counts):
        role = ("user", "assistant")[i % 2]
        messages.append({"role": role, "content": text(rng, words, cdf, int(count), role)})
    return messages


def text(rng: np.random.Generator, words: np.ndarray, cdf: np.ndarray, count: int, role: str) -> str:
    """`count` Zipf-drawn words as capitalised sentences with commas, full stops and, for users, questions."""
    picked = words[np.searchsorted(cdf, rng.random(count))].tolist()
    # Random draws a message at a time, not a word or sentence at a time: generating 50M words takes a while.
    ends = np.cumsum(rng.integers(5, 21, size=count // 5 + 1))
    ends = np.append(ends[ends < count], count)
    starts = np.append(0, ends[:-1])
    commas = starts + (rng.random(len(ends)) * (ends - starts)).astype(int)
    questions = rng.random(len(ends)) < (0.6 if role == "user" else 0.0)
    breaks = rng.random(len(ends)) < (0.2 if role == "assistant" else 0.0)  # assistants write paragraphs
    for start, end, comma in zip(starts.tolist(), ends.tolist(), commas.tolist()):
        picked[start] = picked[start].capitalize()
        if start + 2 < comma < end - 2:
            picked[comma] += ","
    pieces = []
    for start, end, question, paragraph in zip(starts.tolist(), ends.tolist(), questions, breaks):
        pieces.append(" ".join(picked[start:end]) + ("?" if question else "."))
        pieces.append("\n\n" if paragraph else " ")
    return "".join(pieces[:-1])


def measure(system: str, corpus: Path, model_dir: Path, context_length: int, conversations: int) -> Result:
    """Run one system in a fresh subprocess with empty caches, sampling its process tree's RSS."""
    console.print(f"{system}: preparing ...")
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        # Empty caches, so neither system returns a result prepared by an earlier run.
        env = dict(os.environ, TESSERA_CACHE=f"{tmp}/tessera", HF_DATASETS_CACHE=f"{tmp}/datasets",
                   HF_HUB_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
        command = [sys.executable, __file__, "--worker", system, "--corpus", str(corpus), "--model-dir",
                   str(model_dir), "--context-length", str(context_length), "--result", str(result_file)]
        with open(Path(tmp) / "stderr.log", "w+") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            sampled = 0
            tree = psutil.Process(process.pid)
            while process.poll() is None:
                sampled = max(sampled, tree_rss(tree))
                time.sleep(SAMPLE_SECONDS)
            if process.returncode != 0:
                log.seek(0)
                sys.exit(f"{system} failed (exit {process.returncode}):\n{log.read()[-4000:]}")
        fields = json.loads(result_file.read_text())
    # Sampling can miss a short spike; the largest single process's own peak (ru_maxrss) bounds it from below.
    peak = max(sampled, fields.pop("maxrss_bytes"))
    return Result(system, conversations, **fields, peak_rss_mb=peak / 2**20)


def tree_rss(process: psutil.Process) -> int:
    """Bytes resident in a process and all its descendants now (pages shared after fork count in each)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def worker(system: str, corpus: Path, model_dir: Path, context_length: int, result_file: Path) -> None:
    """In the measured subprocess: prepare the corpus with one system and write its figures as JSON."""
    prepare = prepare_tessera if system == "tessera" else prepare_peer
    fields = prepare(corpus, model_dir, context_length)
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN covers the worker processes this one has waited for.
    maxrss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    result_file.write_text(json.dumps(dict(fields, maxrss_bytes=maxrss * 1024)))


def prepare_tessera(corpus: Path, model_dir: Path, context_length: int) -> dict[str, int | float]:
    """Tessera: prepare_dataset validates, templates, tokenizes (loss on replies), packs and writes .npy rows."""
    start = time.perf_counter()
    prepared = prepare_dataset(str(corpus), model_dir, "CHAT_COMPLETION", context_length)
    seconds = time.perf_counter() - start
    return dict(tokens=prepared.num_tokens, rows=prepared.num_rows, seconds=seconds,
                packing_efficiency=prepared.packing_efficiency)


def prepare_peer(corpus: Path, model_dir: Path, context_length: int) -> dict[str, int | float]:
    """TRL: load the JSONL with datasets, then SFTTrainer's own dataset preparation with packing, on 2 processes."""
    # Imported here so that trl and its imports do not count towards Tessera's memory.
    import pyarrow.compute as pc
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    dataset = load_dataset("json", data_files=str(corpus), split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # bf16 (SFTConfig's default) refuses to configure without a GPU; it plays no part in data preparation.
    args = SFTConfig(output_dir=os.environ["HF_DATASETS_CACHE"], packing=True, max_length=context_length,
                     dataset_num_proc=2, bf16=False, report_to="none")
    # SFTTrainer.__init__ calls _prepare_dataset after loading a model, which data preparation does not need. The
    # method reads only these attributes, set as __init__ sets them for this config: no assistant_only_loss, so
    # no training chat template; a "messages" dataset, so no completion-only loss.
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=False)
    packed = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, args.packing, None, "train")
    seconds = time.perf_counter() - start
    # Packed rows are padding-free (each as long as the documents in it), so every id is a real token.
    tokens = pc.sum(pc.list_value_length(packed.with_format("arrow")["input_ids"])).as_py()
    return dict(tokens=tokens, rows=len(packed), seconds=seconds,
                packing_efficiency=round(tokens / (len(packed) * context_length), 4))


def print_table(results: list[Result], context_length: int) -> None:
    """One row per system."""
    table = Table(title=f"Data preparation, context_length={context_length}, {os.cpu_count()} cores")
    for column in ("system", "conversations", "tokens", "rows", "seconds", "tokens/s", "packing efficiency",
                   "peak RSS MB"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for r in results:
        table.add_row(r.system, f"{r.conversations:,}", f"{r.tokens:,}", f"{r.rows:,}", f"{r.seconds:.1f}",
                      f"{r.tokens_per_s:,.0f}", f"{r.packing_efficiency:.2%}", f"{r.peak_rss_mb:,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
