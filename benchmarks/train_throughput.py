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
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import TrainerCallback

from tasks.data.pack import RowBlock, pack_best_fit
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
    docs_per_micro_batch: int  # the padding systems' micro batch, in documents
    zero_stage: int  # Tessera's; the DeepSpeed peer runs ZeRO-2
    offload_optimizer: bool  # Tessera's ZeRO-Offload: how a full 8B fine-tune fits one 80 GB card
    model_dir: str
    docs_path: str  # .npz: tokens, offsets, prompt lengths
    work_dir: str

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


def main() -> None:
    """Build the model and corpus, measure each system in a subprocess, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    # A peer's measured run re-enters this script in a subprocess with these.
    parser.add_argument("--peer", choices=[s for s in SYSTEMS if s != "tessera"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        run_peer(args.peer, Setup(**json.loads(args.setup.read_text())), args.result)
        return
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown system(s) {', '.join(sorted(unknown))}: choose from {', '.join(SYSTEMS)}")
    if args.batch_rows % args.micro_batch_rows:
        parser.error("--batch-rows must be a multiple of --micro-batch-rows")

    config = SHAPES[args.size]
    model_dir = build_model(args.size)
    with tempfile.TemporaryDirectory(prefix="tessera-train-bench-") as tmp:
        work = Path(tmp)
        docs = synthetic_documents(args.context_length, (args.warmup_steps + args.steps) * args.batch_rows,
                                   config["vocab_size"])
        rows = write_rows(docs, work / "rows", args.context_length)
        row_count = len(rows.num_tokens)
        save_documents(docs, work / "docs.npz")
        setup = Setup(
            args.size, args.method, args.context_length, args.steps, args.warmup_steps, args.batch_rows,
            args.micro_batch_rows, max(1, round(len(docs) / row_count * args.micro_batch_rows)), args.zero_stage,
            args.offload_optimizer, str(model_dir),
            str(work / "docs.npz"), tmp,
        )
        console.print(f"corpus: {len(docs):,} documents, {sum(map(len, docs)):,} tokens, {row_count:,} packed rows; "
                      f"padding systems: {setup.docs_per_micro_batch} documents per micro batch")
        gpu = gpu_name()
        results = []
        for system in systems:
            console.print(f"{system}: training ...")
            result = run_tessera(setup, rows) if system == "tessera" else measure_peer(system, setup)
            results.append(with_mfu(result, model_dir, args.context_length) if gpu else result)
    print_table(results, setup, gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": [asdict(r) for r in results],
        "gpu": gpu,
        "commit": commit(),
        "context_length": args.context_length, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "batch_rows": args.batch_rows, "micro_batch_rows": args.micro_batch_rows,
        "zero_stage": args.zero_stage, "offload_optimizer": args.offload_optimizer,
    }, indent=2) + "\n")
    console.print(f"wrote {args.out}")


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


def run_tessera(setup: Setup, rows: RowBlock) -> Result:
    """Tessera: the train task's own worker command on a TrainSpec, timed from its progress lines."""
    work = Path(setup.work_dir)
    lora = {"model.peft.peft_scheme": "lora", "model.peft.lora_tuning.rank": LORA["r"],
            "model.peft.lora_tuning.alpha": LORA["lora_alpha"],
            "model.peft.lora_tuning.target_modules": LORA["target_modules"]} if setup.method == "lora" else {}
    config = configure(
        shorthands=dict(model=setup.model_dir, train_data_path=str(work / "rows"), register_to="bench.tessera",
                        training_duration=f"{setup.total_steps}ba", learning_rate=LEARNING_RATE,
                        context_length=setup.context_length),
        overrides={f"training_config.{path}": value for path, value in {
            "micro_batch_size": setup.micro_batch_rows, "global_batch_size": setup.batch_rows, "seed": SEED,
            "model.optim.sched.name": "constant", "model.optim.sched.warmup_steps": 1,  # 1: the peak from step 0
            "deepspeed.zero_stage": setup.zero_stage, "deepspeed.offload_optimizer": setup.offload_optimizer,
            **lora}.items()},
    )
    spec = TrainSpec.build("bench", config, Path(setup.model_dir), work / "rows", work / "tessera-out",
                           loss_spike_factor=None)  # random data: only a non-finite loss may stop the measurement
    spec.save(work / "spec.json")
    # The worker counts every position of its rows; the useful tokens are the real ones in the rows it reads at
    # each step, which follow from its own row order.
    order = epoch_order(len(rows.num_tokens), SEED, 0)
    step_tokens = [int(rows.num_tokens[order[s * setup.batch_rows : (s + 1) * setup.batch_rows]].sum())
                   for s in range(setup.total_steps)]
    progress: dict[int, dict] = {}
    with open(work / "tessera.log", "w+") as log:
        process = subprocess.Popen(
            worker_command(spec, str(work / "spec.json")),  # the train task's own command line
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
    start = progress[setup.warmup_steps]["elapsed_s"] if setup.warmup_steps else 0.0
    seconds = progress[setup.total_steps]["elapsed_s"] - start
    useful = sum(step_tokens[setup.warmup_steps :])
    return Result("tessera", setup.size, setup.method, useful / seconds, useful, seconds,
                  peak_memory_mb=progress[setup.total_steps]["peak_memory_mb"])


def measure_peer(system: str, setup: Setup) -> Result:
    """Run one peer in a fresh subprocess; its result, or a row that says why it has none."""
    work = Path(setup.work_dir)
    (work / "setup.json").write_text(json.dumps(asdict(setup)))
    result_file = work / f"{system}.json"
    with open(work / f"{system}.log", "w+") as log:
        process = subprocess.run(
            [sys.executable, __file__, "--peer", system, "--setup", str(work / "setup.json"), "--result",
             str(result_file)], stdout=log, stderr=log, env=child_env(),
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
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

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
    data = np.load(setup.docs_path)
    starts, ends = data["offsets"][:-1], data["offsets"][1:]
    input_ids = [data["tokens"][a:b].tolist() for a, b in zip(starts, ends)]
    labels = [[IGNORE] * p + ids[p:] for ids, p in zip(input_ids, data["prompt_lengths"].tolist())]
    dataset = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    accumulation = setup.batch_rows // setup.micro_batch_rows
    common = dict(
        output_dir=str(Path(setup.work_dir) / f"{system}-out"), max_steps=setup.total_steps,
        gradient_accumulation_steps=accumulation, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        bf16=cuda, logging_steps=10**6, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
    )
    if system == "trl-sft":
        from trl import SFTConfig, SFTTrainer

        # Packing best-fit decreasing into padding-free rows of at most max_length; the labels column is kept.
        args = SFTConfig(per_device_train_batch_size=setup.micro_batch_rows, packing=True,
                         max_length=setup.context_length, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[clock])
    else:
        deepspeed = {
            "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        } if system == "hf-deepspeed" else None
        args = TrainingArguments(per_device_train_batch_size=setup.docs_per_micro_batch, deepspeed=deepspeed, **common)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock],
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))
    trainer.train()
    useful = clock.end_tokens - clock.start_tokens
    seconds = clock.end_time - clock.start_time
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    result_file.write_text(json.dumps(dict(
        tokens_per_s=useful / seconds, useful_tokens=useful, seconds=seconds, peak_memory_mb=peak_mb,
    )))


class StepClock(TrainerCallback):
    """Counts the real tokens of every forward and reads the clock when the timed steps start and end.

    A forward pre-hook sees what the model gets: with an attention mask (padding) its sum, without one
    (TRL's padding-free rows) every position. The count stays on the device until a mark, so counting adds no sync.
    """

    def __init__(self, model: torch.nn.Module, setup: Setup, cuda: bool):
        self.setup, self.cuda = setup, cuda
        self.tokens: torch.Tensor | int = 0
        self.start_time = self.end_time = 0.0
        self.start_tokens = self.end_tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.setup.warmup_steps:
            self.start_time, self.start_tokens = self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.setup.total_steps:
            self.end_time, self.end_tokens = self._mark()

    def _count(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.tokens = self.tokens + (mask.sum() if mask is not None else kwargs["input_ids"].numel())

    def _mark(self) -> tuple[float, int]:
        if self.cuda:
            torch.cuda.synchronize()  # the clock reads when the queued work is done
        return time.perf_counter(), int(self.tokens)


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


def print_table(results: list[Result], setup: Setup, gpu: str | None) -> None:
    """One row per system."""
    table = Table(title=f"Training throughput: {setup.size} {setup.method}, context {setup.context_length}, "
                        f"{setup.batch_rows} x {setup.context_length} tokens per step, {setup.steps} steps timed "
                        f"after {setup.warmup_steps}, on {gpu or 'CPU'}")
    for column in ("system", "model", "useful tokens/s", "MFU (989T)", "MFU (790T)", "peak memory MiB"):
        table.add_column(column, justify="left" if column in ("system", "model") else "right")
    for r in results:
        model = f"{r.size} {r.method}"
        if r.error:
            table.add_row(SYSTEMS[r.system], model, f"failed: {r.error}", "", "", "")
            continue
        mfu = (f"{r.mfu:.1%}", f"{r.mfu_of_ceiling:.1%}") if r.mfu is not None else ("n/a", "n/a")
        table.add_row(SYSTEMS[r.system], model, f"{r.tokens_per_s:,.0f}", *mfu, f"{r.peak_memory_mb:,.0f}")
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
