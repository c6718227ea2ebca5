"""Training throughput: Tessera's worker against HF Trainer, TRL's SFTTrainer and HF Trainer + DeepSpeed, in one run.

Every system trains the same random-init model (saved once with save_pretrained) on the same synthetic corpus for
`--warmup-steps` + `--steps` optimizer steps; only the last `--steps` are timed. Documents have a prompt (no loss) and
a response, lengths log-normal around ~600 tokens clipped to [32, min(4096, context)], random token ids.
The table (and `--out`, JSON) gives per system: useful tokens/s (real document tokens, padding excluded, counted the
same way for every system), MFU ((6N + 12 L d T) FLOPs per useful token, over 989 TFLOP/s and over the measured
~790 TFLOP/s bf16 matmul ceiling of an H100) and peak memory (torch.cuda.max_memory_allocated; peak RSS on CPU).

    .venv/bin/python benchmarks/train_throughput.py --size 1b                   # on one H100
    .venv/bin/python benchmarks/train_throughput.py --size 8b --method lora
    .venv/bin/python benchmarks/train_throughput.py --size tiny --steps 3 --warmup-steps 1 --context-length 256
    .venv/bin/python benchmarks/train_throughput.py --mode dpo --size tiny --context-length 512 --repeats 3

`--mode dpo` compares Tessera's DPO (its reference pass, then packed pair rows) with TRL's DPOTrainer (its defaults,
and with precompute_ref_log_probs) on the same preference pairs; a pair's useful tokens are prompt + chosen and
prompt + rejected, padding excluded, and the reference log-probabilities' time counts towards each system's.

Global batch, matched in tokens: Tessera and TRL train on `--batch-rows` packed rows of `--context-length` per step,
`--micro-batch-rows` per forward (the rest is gradient accumulation). The padding systems (HF Trainer, with and
without DeepSpeed) keep the same accumulation steps, each micro batch holding as many documents as
`--micro-batch-rows` of Tessera's packed rows hold on average, so a step sees the same number of documents (and
useful tokens) on average; padding makes their tensors longer. Each system runs in a fresh subprocess; a system
that fails (out of memory, or unable to run on CPU) gets a row saying why instead of numbers.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import TrainerCallback

from tasks.data.pack import RowBlock, pack_best_fit
from tasks.data.prepare import prepare_dataset
from tasks.data.tokenize import IGNORE, Example
from tasks.home import cache_dir
from tasks.recipe import configure
from tasks.train import worker_command
from tasks.training import protocol
from tasks.training.data import epoch_order
from tasks.training.spec import TrainSpec
from tasks.training.metrics import H100_BF16_FLOPS, flops_per_token

SYSTEMS = {  # name in the JSON -> name in the table
    "tessera": "Tessera",
    "hf-trainer": "HF Trainer (padding)",
    "trl-sft": "TRL SFTTrainer (packing)",
    "hf-deepspeed": "HF Trainer + DeepSpeed ZeRO-2",
    "trl-dpo": "TRL DPOTrainer (defaults)",
    "trl-dpo-precompute": "TRL DPOTrainer (precompute ref)",
    "trl-dpo-precompute-nockpt": "TRL DPOTrainer (precompute ref, no grad ckpt)",
}
MODE_SYSTEMS = {  # the systems each mode compares; Tessera first
    "sft": ("tessera", "hf-trainer", "trl-sft", "hf-deepspeed"),
    "dpo": ("tessera", "trl-dpo", "trl-dpo-precompute", "trl-dpo-precompute-nockpt"),
}
LLAMA = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
             max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SHAPES = {
    "tiny": dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True),
    "8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False),
}
MODEL_VERSION = 1  # bump when a shape or the saved folder changes, so a cached model is not reused
MATMUL_CEILING_FLOPS = 790e12  # bf16 matmul throughput measured on one H100 (shared/DESIGN.md section 4)
MEAN_TOKENS, LENGTH_SIGMA, MIN_TOKENS, MAX_TOKENS = 600, 0.6, 32, 4096
PROMPT_SHARE = (0.1, 0.4)  # of each document, uniform: the prompt part, which carries no loss
FIRST_TOKEN = 3  # ids below are the tokenizer's pad, bos and eos
SEED = 1234
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
LEARNING_RATE = 1e-5
# DPO pairs: prompt and each answer log-normal (sigma LENGTH_SIGMA) around these means, cut so that a prompt with
# either answer and its EOS fits the context (nothing is truncated by either system).
PAIR_PROMPT_MEAN, PAIR_ANSWER_MEAN, PAIR_MIN_TOKENS = 150, 200, 8
REFERENCE_LINE = re.compile(r"reference log-probabilities of \d+ pairs computed in ([\d.]+) s")

# Piped output gets rich's 80 columns, which would cut the table's headers short.
console = Console(width=None if sys.stdout.isatty() else 130)


@dataclass
class Setup:
    """What every system's run needs; written to JSON for the peer subprocesses."""

    size: str
    method: str  # full | lora
    context_length: int
    steps: int
    warmup_steps: int
    batch_rows: int
    micro_batch_rows: int
    docs_per_micro_batch: int  # the padding systems' micro batch, in documents (DPO: TRL's, in pairs)
    zero_stage: int  # Tessera's; the DeepSpeed peer runs ZeRO-2
    offload_optimizer: bool  # Tessera's ZeRO-Offload: how a full 8B fine-tune fits one 80 GB card
    model_dir: str
    docs_path: str  # .npz: tokens, offsets, prompt lengths (SFT)
    work_dir: str
    mode: str = "sft"  # sft | dpo
    data_dir: str = ""  # Tessera's prepared rows
    pairs_path: str = ""  # DPO: the pairs as TRL's string format, {"prompt", "chosen", "rejected"} per line
    dataset_tokens: int = 0  # DPO: useful tokens of every pair, what a reference pass reads

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


@dataclass
class Result:
    system: str
    size: str
    method: str
    tokens_per_s: float | None = None  # useful tokens per second over the timed steps
    useful_tokens: int | None = None
    seconds: float | None = None
    mfu: float | None = None  # against 989 TFLOP/s
    mfu_of_ceiling: float | None = None  # against the measured ~790 TFLOP/s
    peak_memory_mb: float | None = None
    error: str | None = None  # why the system has no numbers
    # DPO: reference seconds within `seconds` (an up-front pass: its share for the timed tokens; TRL's defaults: the
    # reference model's forwards in the timed steps) and the whole up-front pass (None when in the loop).
    ref_seconds: float | None = None
    ref_pass_seconds: float | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODE_SYSTEMS, default="sft", help="sft: packed documents; dpo: pairs")
    parser.add_argument("--size", choices=SHAPES, default="1b")
    parser.add_argument("--method", choices=("full", "lora"), default="full", help="lora: r=16 on all linear layers")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=25, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--batch-rows", type=int, default=8, help="packed rows of context-length per step")
    parser.add_argument("--micro-batch-rows", type=int, default=1, help="packed rows per forward")
    parser.add_argument("--zero-stage", type=int, default=0, choices=range(4), help="Tessera's ZeRO stage")
    parser.add_argument("--offload-optimizer", action="store_true",
                        help="Tessera's optimizer states on the CPU (needs --zero-stage 1-3), e.g. for --size 8b full")
    parser.add_argument("--systems", help="comma-separated (default: the mode's), of " + ", ".join(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each system, alternating; medians reported")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/train_throughput[_dpo].json")
    # A peer's measured run re-enters this script in a subprocess with these.
    parser.add_argument("--peer", choices=[s for s in SYSTEMS if s != "tessera"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.systems = args.systems.split(",") if args.systems else list(MODE_SYSTEMS[args.mode])
    if unknown := set(args.systems) - set(MODE_SYSTEMS[args.mode]):
        parser.error(f"system(s) {', '.join(sorted(unknown))} not in {args.mode} mode's "
                     f"{', '.join(MODE_SYSTEMS[args.mode])}")
    if args.batch_rows % args.micro_batch_rows:
        parser.error("--batch-rows must be a multiple of --micro-batch-rows")
    suffix = "" if args.mode == "sft" else f"_{args.mode}"
    args.out = args.out or Path(__file__).parent / "results" / f"train_throughput{suffix}.json"
    return args


def main() -> None:
    """Build the model and data, measure each system in a subprocess, print the table, write the JSON."""
    args = parse_args()
    if args.peer:
        run_peer(args.peer, Setup(**json.loads(args.setup.read_text())), args.result)
        return
    model_dir = build_model(args.size)
    with tempfile.TemporaryDirectory(prefix="tessera-train-bench-") as tmp:
        prepare = prepare_sft if args.mode == "sft" else prepare_dpo
        setup, row_tokens = prepare(args, model_dir, Path(tmp))
        gpu = gpu_name()
        runs, loads = measure_all(args.systems, setup, row_tokens, args.repeats)
        results = [with_mfu(r, model_dir, args.context_length) if gpu else r for r in map(median_result, runs)]
    print_table(results, runs, setup, gpu, loads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": [asdict(r) for r in results],
        "runs": {system: [asdict(r) for r in each] for system, each in zip(args.systems, runs)},
        "gpu": gpu,
        "commit": commit(),
        "load_average_1min": loads,
        "mode": args.mode, "context_length": args.context_length, "steps": args.steps,
        "warmup_steps": args.warmup_steps, "batch_rows": args.batch_rows, "micro_batch_rows": args.micro_batch_rows,
        "zero_stage": args.zero_stage, "offload_optimizer": args.offload_optimizer, "repeats": args.repeats,
    }, indent=2) + "\n")
    console.print(f"wrote {args.out}")


def base_setup(args: argparse.Namespace, model_dir: Path, work: Path, docs_per_row: float, **mode) -> Setup:
    """The Setup of a run; `docs_per_row`: documents (DPO: pairs) per Tessera row, which sizes the peers' micro batch."""
    return Setup(args.size, args.method, args.context_length, args.steps, args.warmup_steps, args.batch_rows,
                 args.micro_batch_rows, max(1, round(docs_per_row * args.micro_batch_rows)), args.zero_stage,
                 args.offload_optimizer, str(model_dir), str(work / "docs.npz"), str(work), **mode)


def prepare_sft(args: argparse.Namespace, model_dir: Path, work: Path) -> tuple[Setup, np.ndarray]:
    """Synthetic documents, packed by Tessera and saved whole for the peers; the Setup and each row's real tokens."""
    docs = synthetic_documents(args.context_length, (args.warmup_steps + args.steps) * args.batch_rows,
                               SHAPES[args.size]["vocab_size"])
    rows = write_rows(docs, work / "rows", args.context_length)
    row_count = len(rows.num_tokens)
    save_documents(docs, work / "docs.npz")
    setup = base_setup(args, model_dir, work, len(docs) / row_count, data_dir=str(work / "rows"))
    console.print(f"corpus: {len(docs):,} documents, {sum(map(len, docs)):,} tokens, {row_count:,} packed rows; "
                  f"padding systems: {setup.docs_per_micro_batch} documents per micro batch")
    return setup, rows.num_tokens


def prepare_dpo(args: argparse.Namespace, model_dir: Path, work: Path) -> tuple[Setup, np.ndarray]:
    """Synthetic pairs as TRL's string format, prepared by Tessera's own data path; the Setup and each row's tokens."""
    model_dir = word_model(model_dir, work / "model", SHAPES[args.size]["vocab_size"])
    rows_wanted = (args.warmup_steps + args.steps) * args.batch_rows
    pairs, dataset_tokens = synthetic_pairs(args.context_length, rows_wanted, SHAPES[args.size]["vocab_size"])
    pairs_path = work / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    prepared = prepare_dataset(str(pairs_path), model_dir, "DPO", args.context_length)
    row_tokens = (np.load(prepared.path / "sequence_ids.npy") >= 0).sum(axis=1)
    setup = base_setup(args, model_dir, work, len(pairs) / prepared.num_rows, mode="dpo", data_dir=str(prepared.path),
                       pairs_path=str(pairs_path), dataset_tokens=dataset_tokens)
    console.print(f"pairs: {len(pairs):,}, {dataset_tokens:,} tokens (prompt + chosen + prompt + rejected); Tessera: "
                  f"{prepared.num_rows:,} rows of {prepared.row_length}, {prepared.num_tokens:,} tokens; TRL: "
                  f"{setup.docs_per_micro_batch} pairs per micro batch")
    if prepared.num_tokens != dataset_tokens:
        console.print(f"[red]Tessera's rows hold {prepared.num_tokens:,} tokens, not {dataset_tokens:,}[/red]")
    return setup, row_tokens


def measure_all(systems: list[str], setup: Setup, row_tokens: np.ndarray,
                repeats: int) -> tuple[list[list[Result]], list[float]]:
    """Each system `repeats` times, alternating, so all see the same load; the runs and the 1-minute load
    averages read before each run and at the end."""
    runs: list[list[Result]] = [[] for _ in systems]
    loads = []
    for repeat in range(repeats):
        for system, each in zip(systems, runs):
            loads.append(os.getloadavg()[0])
            console.print(f"{system}: training (run {repeat + 1} of {repeats}, load {loads[-1]:.1f}) ...")
            each.append(run_tessera(setup, row_tokens) if system == "tessera" else measure_peer(system, setup))
    loads.append(os.getloadavg()[0])
    return runs, loads


def median_result(runs: list[Result]) -> Result:
    """The median of each figure over a system's runs that have numbers; the last error if none has."""
    good = [r for r in runs if r.error is None]
    if not good:
        return runs[-1]
    first = good[0]
    figures = {f.name: float(np.median([getattr(r, f.name) for r in good]))
               for f in fields(Result) if isinstance(getattr(first, f.name), (int, float))
               and not isinstance(getattr(first, f.name), bool)}
    return Result(first.system, first.size, first.method, **figures)


def build_model(size: str) -> Path:
    """A random-init Llama of this shape, saved in bf16 with a small local tokenizer, cached under the Tessera cache."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = cache_dir() / "bench" / f"llama-{size}-random-v{MODEL_VERSION}"
    if (path / "config.json").is_file():
        console.print(f"model: {path} (cached)")
        return path
    console.print(f"model: building the {size} shape into {path}")
    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    # bf16 halves the 8B's 32 GB; every system loads it at the precision it trains in.
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[size]))
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(partial)
    # Training never decodes text: a word-level tokenizer with just the special tokens is enough for the worker's
    # AutoTokenizer and for the peers' padding, and needs no download.
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": FIRST_TOKEN}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(partial)
    partial.rename(path)  # a model under its final name is complete
    return path


def synthetic_documents(context_length: int, rows: int, vocab_size: int) -> list[Example]:
    """Seeded prompt + response documents, enough to fill at least `rows` rows when packed."""
    rng = np.random.default_rng(SEED)
    mu = np.log(MEAN_TOKENS) - LENGTH_SIGMA**2 / 2  # so the log-normal's mean is MEAN_TOKENS before clipping
    longest = min(MAX_TOKENS, context_length)
    docs: list[Example] = []
    total = 0
    while total < rows * context_length:
        length = int(np.clip(rng.lognormal(mu, LENGTH_SIGMA), MIN_TOKENS, longest))
        tokens = rng.integers(FIRST_TOKEN + 1, vocab_size, size=length, dtype=np.int32)
        labels = tokens.copy()
        labels[: max(1, int(length * rng.uniform(*PROMPT_SHARE)))] = IGNORE
        docs.append(Example(tokens, labels))
        total += length
    return docs


def word_model(model_dir: Path, folder: Path, vocab_size: int) -> Path:
    """The cached model's weights (linked) with a word-level tokenizer over its whole vocabulary, word `w<id>` being
    token <id>: pairs are text that both systems tokenize, each to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    for file in model_dir.iterdir():
        if not file.name.startswith(("tokenizer", "special_tokens")):
            (folder / file.name).symlink_to(file)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": FIRST_TOKEN} | {f"w{i}": i for i in range(FIRST_TOKEN + 1,
                                                                                             vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def synthetic_pairs(context_length: int, rows: int, vocab_size: int) -> tuple[list[dict], int]:
    """Seeded {"prompt", "chosen", "rejected"} string pairs, enough to fill at least `rows` rows of two contexts when
    packed, and their useful tokens: prompt + chosen and prompt + rejected, each answer with its EOS."""
    rng = np.random.default_rng(SEED)

    def length(mean: int, most: int) -> int:
        mu = np.log(mean) - LENGTH_SIGMA**2 / 2  # so the log-normal's mean is `mean` before clipping
        return int(np.clip(rng.lognormal(mu, LENGTH_SIGMA), PAIR_MIN_TOKENS, most))

    def words(count: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(FIRST_TOKEN + 1, vocab_size, size=count))

    pairs, total = [], 0
    while total < rows * 2 * context_length:
        prompt = length(PAIR_PROMPT_MEAN, context_length // 2)
        chosen, rejected = (length(PAIR_ANSWER_MEAN, context_length - prompt - 1) for _ in range(2))
        pairs.append({"prompt": words(prompt), "chosen": " " + words(chosen), "rejected": " " + words(rejected)})
        total += 2 * prompt + chosen + rejected + 2  # + each answer's EOS
    return pairs, total


def write_rows(docs: list[Example], folder: Path, context_length: int) -> RowBlock:
    """Tessera's packing (best-fit decreasing, position ids restarting per document) into a prepared dataset folder."""
    rows = RowBlock.of(pack_best_fit(docs, context_length, pad_id=0), context_length)
    folder.mkdir(parents=True)
    for name in ("input_ids", "labels", "position_ids"):
        np.save(folder / f"{name}.npy", getattr(rows, name))
    (folder / "meta.json").write_text(json.dumps({"rows": len(rows.num_tokens), "context_length": context_length}))
    return rows


def save_documents(docs: list[Example], path: Path) -> None:
    """The documents for the peers: tokens end to end, where each starts, and how long its prompt is."""
    lengths = np.array([len(d) for d in docs])
    np.savez(path, tokens=np.concatenate([d.input_ids for d in docs]), offsets=np.append(0, np.cumsum(lengths)),
             prompt_lengths=np.array([int((d.labels == IGNORE).sum()) for d in docs]))


def tessera_spec(setup: Setup) -> Path:
    """A TrainSpec built from a config as a run's is, saved where the worker reads it."""
    work = Path(setup.work_dir)
    lora = {"model.peft.peft_scheme": "lora", "model.peft.lora_tuning.rank": LORA["r"],
            "model.peft.lora_tuning.alpha": LORA["lora_alpha"],
            "model.peft.lora_tuning.target_modules": LORA["target_modules"]} if setup.method == "lora" else {}
    config = configure(
        shorthands=dict(model=setup.model_dir, train_data_path=setup.data_dir, register_to="bench.tessera",
                        training_duration=f"{setup.total_steps}ba", learning_rate=LEARNING_RATE,
                        context_length=setup.context_length, task_type=setup.mode.upper()),
        overrides={f"training_config.{path}": value for path, value in {
            "micro_batch_size": setup.micro_batch_rows, "global_batch_size": setup.batch_rows, "seed": SEED,
            "model.optim.sched.name": "constant", "model.optim.sched.warmup_steps": 1,  # 1: the peak from step 0
            "deepspeed.zero_stage": setup.zero_stage, "deepspeed.offload_optimizer": setup.offload_optimizer,
            **lora}.items()},
    )
    spec = TrainSpec.build("bench", config, Path(setup.model_dir), Path(setup.data_dir), work / "tessera-out",
                           loss_spike_factor=None)  # random data: only a non-finite loss may stop the measurement
    spec.save(work / "spec.json")
    return work / "spec.json"


def run_tessera(setup: Setup, row_tokens: np.ndarray) -> Result:
    """Tessera: the train task's own worker command on a TrainSpec, timed from its progress lines."""
    work = Path(setup.work_dir)
    spec_path = tessera_spec(setup)
    shutil.rmtree(work / "tessera-out", ignore_errors=True)  # a repeat starts fresh: no checkpoint, no reference kept
    # The worker counts every position of its rows; the useful tokens are the real ones in the rows it reads at
    # each step, which follow from its own row order.
    order = epoch_order(len(row_tokens), SEED, 0)
    step_tokens = [int(row_tokens[order[s * setup.batch_rows : (s + 1) * setup.batch_rows]].sum())
                   for s in range(setup.total_steps)]
    progress: dict[int, dict] = {}
    with open(work / "tessera.log", "w+") as log:
        process = subprocess.Popen(
            worker_command(TrainSpec.load(spec_path), str(spec_path)),  # the train task's own command line
            stdout=subprocess.PIPE, stderr=log, text=True, env=child_env(), start_new_session=True,
        )
        for line in process.stdout:
            message = protocol.parse(line)
            if message and message["kind"] == "progress":
                progress[message["batch"]] = message
                if message["batch"] == setup.total_steps:
                    # The measurement is complete; the final checkpoint and export it would now write are not
                    # training (and an 8B one needs ~100 GB of disk).
                    os.killpg(process.pid, signal.SIGTERM)
                    break
            else:
                log.write(line)
        process.wait()
        if setup.total_steps not in progress:
            return Result("tessera", setup.size, setup.method, error=last_line(log))
        log.seek(0)
        reference = REFERENCE_LINE.search(log.read())
    start = progress[setup.warmup_steps]["elapsed_s"] if setup.warmup_steps else 0.0
    seconds = progress[setup.total_steps]["elapsed_s"] - start
    useful = sum(step_tokens[setup.warmup_steps :])
    result = Result("tessera", setup.size, setup.method, peak_memory_mb=progress[setup.total_steps]["peak_memory_mb"])
    return timed(result, useful, seconds, float(reference.group(1)) if reference else None, setup)


def timed(result: Result, useful: int, train_seconds: float, ref_pass_seconds: float | None,
          setup: Setup) -> Result:
    """The result's throughput; an up-front reference pass (over every pair) counts for the timed tokens' share."""
    ref_share = ref_pass_seconds * useful / setup.dataset_tokens if ref_pass_seconds is not None else 0.0
    result.useful_tokens, result.seconds = useful, train_seconds + ref_share
    result.tokens_per_s = useful / result.seconds
    result.ref_pass_seconds = ref_pass_seconds
    if result.ref_seconds is None and ref_pass_seconds is not None:
        result.ref_seconds = ref_share
    return result


def measure_peer(system: str, setup: Setup) -> Result:
    """Run one peer in a fresh subprocess; its result, or a row that says why it has none."""
    work = Path(setup.work_dir)
    (work / "setup.json").write_text(json.dumps(asdict(setup)))
    result_file = work / f"{system}.json"
    result_file.unlink(missing_ok=True)
    # An empty datasets cache for each run: TRL would otherwise read back an earlier run's reference log-probabilities.
    env = dict(child_env(), HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="datasets-", dir=work))
    with open(work / f"{system}.log", "w+") as log:
        process = subprocess.run(
            [sys.executable, __file__, "--peer", system, "--setup", str(work / "setup.json"), "--result",
             str(result_file)], stdout=log, stderr=log, env=env,
        )
        if process.returncode != 0 or not result_file.is_file():
            return Result(system, setup.size, setup.method, error=last_line(log))
    return Result(system, setup.size, setup.method, **json.loads(result_file.read_text()))


def child_env() -> dict[str, str]:
    """The measured processes' environment: offline, and a lone rank 0 for DeepSpeed on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def last_line(log) -> str:
    """The last non-empty line of a log file open for reading and writing: why a run failed."""
    log.flush()
    log.seek(0)
    lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no output"


def run_peer(system: str, setup: Setup, result_file: Path) -> None:
    """In the measured subprocess: train with one peer and write its figures as JSON."""
    # Imported here so that one system's imports do not count towards another's memory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    lora = setup.method == "lora"
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    # Full fine-tuning: fp32 weights and bf16 autocast (Trainer's bf16=True). LoRA: the frozen base in bf16.
    dtype = torch.bfloat16 if lora and cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    clock = StepClock(model, setup, cuda)
    common = dict(
        output_dir=str(Path(setup.work_dir) / f"{system}-out"), max_steps=setup.total_steps,
        gradient_accumulation_steps=setup.batch_rows // setup.micro_batch_rows, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", bf16=cuda, logging_steps=10**6, save_strategy="no", report_to="none", seed=SEED,
        disable_tqdm=True,
    )
    build = dpo_peer if system.startswith("trl-dpo") else sft_peer
    build(system, model, tokenizer, setup, common, clock).train()
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    in_loop = clock.end_ref - clock.start_ref if clock.ref_pass_seconds is None and setup.mode == "dpo" else None
    result = timed(Result(system, setup.size, setup.method, peak_memory_mb=peak_mb, ref_seconds=in_loop),
                   clock.end_tokens - clock.start_tokens, clock.end_time - clock.start_time, clock.ref_pass_seconds,
                   setup)
    figures = {k: v for k, v in asdict(result).items() if k not in ("system", "size", "method")}
    result_file.write_text(json.dumps(figures))


def sft_peer(system: str, model, tokenizer, setup: Setup, common: dict, clock: "StepClock"):
    """HF Trainer (padding, with or without DeepSpeed ZeRO-2) or TRL's SFTTrainer (packing) on the documents."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = np.load(setup.docs_path)
    starts, ends = data["offsets"][:-1], data["offsets"][1:]
    input_ids = [data["tokens"][a:b].tolist() for a, b in zip(starts, ends)]
    labels = [[IGNORE] * p + ids[p:] for ids, p in zip(input_ids, data["prompt_lengths"].tolist())]
    dataset = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    if system == "trl-sft":
        from trl import SFTConfig, SFTTrainer

        # Packing best-fit decreasing into padding-free rows of at most max_length; the labels column is kept.
        args = SFTConfig(per_device_train_batch_size=setup.micro_batch_rows, packing=True,
                         max_length=setup.context_length, **common)
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    deepspeed = {
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    } if system == "hf-deepspeed" else None
    args = TrainingArguments(per_device_train_batch_size=setup.docs_per_micro_batch, deepspeed=deepspeed, **common)
    return Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock],
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))


def dpo_peer(system: str, model, tokenizer, setup: Setup, common: dict, clock: "StepClock"):
    """TRL's DPOTrainer on the pairs file, DPOConfig's defaults but for the batch, steps, learning rate, schedule and
    precision every system shares: a reference model beside the policy and gradient checkpointing (trl-dpo);
    precomputed reference log-probabilities (trl-dpo-precompute); and those without gradient checkpointing, which
    Tessera does not use either (trl-dpo-precompute-nockpt)."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    precompute = system != "trl-dpo"
    extra = {"gradient_checkpointing": False} if system.endswith("nockpt") else {}
    args = DPOConfig(per_device_train_batch_size=setup.docs_per_micro_batch, max_length=setup.context_length,
                     precompute_ref_log_probs=precompute, **extra, **common)
    dataset = load_dataset("json", data_files=setup.pairs_path, split="train")
    if precompute:  # TRL's constructor runs the pass: timed around it
        original = DPOTrainer._precompute_ref_logps

        def timed_pass(trainer, *args, **kwargs):
            started = clock.now()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                clock.ref_pass_seconds = (clock.ref_pass_seconds or 0.0) + clock.now() - started

        DPOTrainer._precompute_ref_logps = timed_pass
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    if trainer.ref_model is not None:
        clock.time_forwards(trainer.ref_model)
    return trainer


class StepClock(TrainerCallback):
    """Counts the real tokens of every forward and reads the clock when the timed steps start and end.

    A forward pre-hook sees what the model gets: with an attention mask (padding) its sum, without one
    (TRL's padding-free rows) every position. The count stays on the device until a mark, so counting adds no sync.
    DPO: time_forwards adds up the seconds of a reference model's forwards; ref_pass_seconds is an up-front pass's.
    """

    def __init__(self, model: torch.nn.Module, setup: Setup, cuda: bool):
        self.setup, self.cuda = setup, cuda
        self.tokens: torch.Tensor | int = 0
        self.start_time = self.end_time = 0.0
        self.start_tokens = self.end_tokens = 0
        self.ref_time = self.start_ref = self.end_ref = 0.0
        self.ref_pass_seconds: float | None = None
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.setup.warmup_steps:
            self.start_time, self.start_tokens, self.start_ref = self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.setup.total_steps:
            self.end_time, self.end_tokens, self.end_ref = self._mark()

    def time_forwards(self, module: torch.nn.Module) -> None:
        """Add the wall time of each of `module`'s forwards to ref_time (synchronizing the GPU around each)."""
        started = [0.0]

        def begin(*_):
            started[0] = self.now()

        def end(*_):
            self.ref_time += self.now() - started[0]

        module.register_forward_pre_hook(begin)
        module.register_forward_hook(end)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # the clock reads when the queued work is done
        return time.perf_counter()

    def _count(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else kwargs["input_ids"].numel())

    def _mark(self) -> tuple[float, int, float]:
        return self.now(), int(self.tokens), self.ref_time


def gpu_name() -> str | None:
    """The GPU's name from nvidia-smi, None without one. Not through torch: a CUDA context in this process would
    hold GPU memory while the systems are measured."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return names[0].strip() or None


def with_mfu(result: Result, model_dir: Path, context_length: int) -> Result:
    """The result with MFU filled in: the worker's FLOPs per token (6N + 12 L d T) over the two peaks."""
    if result.tokens_per_s is None:
        return result
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # counts parameters without allocating them
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    # 6N + 12LdT for every system and method, as the issue defines MFU (trainable = all: a LoRA row's MFU counts
    # weight gradients it does not compute, so it compares systems, not LoRA with full fine-tuning).
    flops = result.tokens_per_s * flops_per_token(
        params, params, config.num_hidden_layers, config.hidden_size, context_length
    )
    result.mfu, result.mfu_of_ceiling = flops / H100_BF16_FLOPS, flops / MATMUL_CEILING_FLOPS
    return result


def print_table(results: list[Result], runs: list[list[Result]], setup: Setup, gpu: str | None,
                loads: list[float]) -> None:
    """One row per system: medians over its runs, each run's tokens/s, and Tessera's figure over this one's."""
    unit = "2 x " if setup.mode == "dpo" else ""
    table = Table(title=f"Training throughput ({setup.mode}): {setup.size} {setup.method}, context "
                        f"{setup.context_length}, {setup.batch_rows} x {unit}{setup.context_length} tokens per step, "
                        f"{setup.steps} steps timed after {setup.warmup_steps}, on {gpu or 'CPU'}; medians of "
                        f"{len(runs[0])}; 1-min load {min(loads):.1f}-{max(loads):.1f}")
    columns = ["system", "model", "useful tokens/s", "each", "MFU (989T)", "MFU (790T)", "peak memory MiB",
               "Tessera / this"] + (["ref s in time", "ref pass s"] if setup.mode == "dpo" else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("system", "model", "each") else "right")
    ours = results[0].tokens_per_s if results[0].system == "tessera" else None
    for r, each in zip(results, runs):
        model = f"{r.size} {r.method}"
        if r.error:
            table.add_row(SYSTEMS[r.system], model, f"failed: {r.error}", *[""] * (len(columns) - 3))
            continue
        mfu = (f"{r.mfu:.1%}", f"{r.mfu_of_ceiling:.1%}") if r.mfu is not None else ("n/a", "n/a")
        ratio = f"{ours / r.tokens_per_s:.2f}x" if ours else "n/a"
        runs_text = ", ".join(f"{x.tokens_per_s:,.0f}" if x.error is None else "failed" for x in each)
        ref = [f"{r.ref_seconds:.2f}" if r.ref_seconds is not None else "",
               f"{r.ref_pass_seconds:.2f}" if r.ref_pass_seconds is not None else "in loop"]
        table.add_row(SYSTEMS[r.system], model, f"{r.tokens_per_s:,.0f}", runs_text, *mfu, f"{r.peak_memory_mb:,.0f}",
                      ratio, *(ref if setup.mode == "dpo" else []))
    console.print(table)


def commit() -> str | None:
    """The checked-out commit, marked +dirty when the working tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


if __name__ == "__main__":
    main()
