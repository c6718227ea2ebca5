"""The worker's contract with the train task: progress as protocol lines on stdout, the outcome as an exit code.

Stdout: one JSON object per line after a fixed prefix; everything else the worker, DeepSpeed or transformers
print is free-form log. Only rank 0 writes them:

  started      epochs, batches_per_epoch, total_batches, total_tokens, resumed_from (a tag or null),
               trainable_params, total_params (LoRA trains only its adapters)
  generations  batch, prompts, responses: before training (batch 0, not on resume) and after each checkpoint
  progress     epoch (1-based, current), epochs, batch (optimizer steps done), total_batches, tokens,
               total_tokens, loss (mean over the loss tokens of the steps since the last progress line),
               lr and grad_norm (of the last step), tokens_per_s (since the last progress line),
               elapsed_s (training seconds of the run so far, carried across resumes),
               peak_memory_mb (MiB: the most GPU memory allocated so far, or on CPU the process's peak RSS),
               mfu (estimated model FLOPs utilization, 0-1: tokens_per_s x (6N + 12 L d T) FLOPs per token over
               the devices' peak FLOP/s; null on CPU unless the spec sets peak_flops);
               DPO runs: loss is the mean over pairs, and reward_chosen, reward_rejected (beta x the log-ratio of
               policy to reference, means over pairs), reward_margin (their difference), reward_accuracy (the
               share of pairs whose chosen answer earns more)
  checkpoint   tag ("ep{E}-ba{B}", E = completed epochs), path, hf_path: written and complete
  pruned       batch, keep, removed (paths of the ep*-ba* folders and huggingface/ba* exports deleted): with
               save_top_k, right after a checkpoint line when older ones were removed
  eval         batch, loss (mean over eval_data_dir's loss tokens), tokens: when the spec has eval data, at
               each checkpoint (just before its checkpoint line), or every val_check_interval steps and at
               the end when that is set; DPO runs: loss and the rewards as in progress, over the eval pairs, and
               pairs instead of tokens
  stopped      batch, best_loss, best_batch, evals_without_improvement, reason (a sentence): early stopping
               ended the run before its planned end, after the final checkpoint at `batch`; `finished` follows
  diverged     batch, loss, grad_norm, reason (a phrase, e.g. "loss nan (not a number)"), checkpoint (the tag the
               latest link points at, or null): at a log point (or before a checkpoint) the loss or grad norm
               was not finite, or the loss was over spec.loss_spike_factor x the mean of the recent logged
               losses; the worker saves nothing more and exits with DIVERGED_EXIT
  finished     batch, hf_path of the final export

Tokens count every position of a row (rows x context length), padding included.

Exit code: 0 once `finished` is written; otherwise the last line on stderr is the reason (`say_why`, read back
by `why`): BAD_INPUT_EXIT for a spec or data the worker refuses, DIVERGED_EXIT after a `diverged` line (retrying
cannot help either), DISK_FULL_EXIT when the next checkpoint has no room (nor until space is freed), anything
else for a failure a retry may get past (killed, out of memory, a crash).
"""

import json
import sys
from pathlib import Path

PREFIX = "@@tessera "
BAD_INPUT_EXIT = 2
DIVERGED_EXIT = 3
DISK_FULL_EXIT = 4


def emit(kind: str, **fields) -> None:
    """Write one protocol line in a single write, so it cannot interleave with other output."""
    sys.stdout.write(PREFIX + json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def parse(line: str) -> dict | None:
    """The object on a protocol line, or None for a log line."""
    if not line.startswith(PREFIX):
        return None
    return json.loads(line[len(PREFIX) :])


def say_why(reason: str) -> None:
    """Make `reason` the worker's last line on stderr, on one line."""
    sys.stdout.flush()
    # One write: under `python -u` (the deepspeed launcher's) print's text and newline are two, and two ranks'
    # reasons could run into one line.
    sys.stderr.write(" ".join(reason.split()) + "\n")
    sys.stderr.flush()


def why(stderr_log: Path) -> str:
    """The worker's reason for exiting: the last line of its stderr."""
    lines = [line.strip() for line in stderr_log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output; see the worker log"


def seconds_left(progress: dict) -> float | None:
    """Training seconds still to go after a progress line: its elapsed time scaled by the share of the tokens (or
    batches) not yet trained; None before any."""
    if progress.get("total_tokens"):
        done = progress["tokens"] / progress["total_tokens"]
    else:
        done = progress["batch"] / progress["total_batches"]
    return progress["elapsed_s"] * (1 - done) / done if done > 0 else None
