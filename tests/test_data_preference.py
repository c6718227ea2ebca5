"""Preference pairs (task_type DPO) through the pipeline a run uses (sources.fetch, prepare.prepare_dataset, the shard
workers, preference.pair_problems): each format becomes the same tokenized, cached form; each bad pair gets its own
message naming file, line and field; `tessera validate` reports pairs, tokens per side, truncation and the lengths.
Fixtures: tests/data/preference/ holds the same three pairs in each format, bad/ one bad pair per file (line 2)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from transformers import AutoTokenizer

from tasks.data.prepare import PreparedDataset, prepare_dataset
from tasks.data.tokenize import IGNORE
from tasks.data.validation import validate_data

DATA = Path(__file__).parent / "data" / "preference"
BAD = DATA / "bad"
DPO = "DPO"
CONTEXT = 64
FORMATS = ("openai.jsonl", "trl_explicit.jsonl", "trl_implicit.jsonl", "nova.jsonl")
# The fixtures' pairs: (chosen, rejected) answers, in file order.
ANSWERS = [("Paris.", "I think it might be Lyon, or perhaps Marseille."), ("4.", "5."), ("Blue.", "Green.")]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TESSERA_TABLES_ROOT", str(tmp_path / "tables"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def arrays(prepared: PreparedDataset) -> dict[str, np.ndarray]:
    return {name: np.load(prepared.path / f"{name}.npy")
            for name in ("input_ids", "labels", "position_ids", "sequence_ids")}


def sides(prepared: PreparedDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each sequence as (input_ids, labels), in sequence id order: pair 0 chosen, pair 0 rejected, pair 1 chosen..."""
    a = arrays(prepared)
    found = {}
    for row in range(prepared.num_rows):
        for sequence in np.unique(a["sequence_ids"][row][a["sequence_ids"][row] >= 0]):
            at = a["sequence_ids"][row] == sequence
            found[int(sequence)] = (a["input_ids"][row][at], a["labels"][row][at])
    assert sorted(found) == list(range(2 * prepared.num_examples))
    return [found[s] for s in sorted(found)]


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_becomes_the_same_pairs_on_disk(name, tiny_model_dir, tokenizer):
    prepared = prepare_dataset(str(DATA / name), tiny_model_dir, DPO, CONTEXT)
    assert (prepared.num_records, prepared.num_examples, prepared.num_invalid) == (3, 3, 0)
    assert (prepared.context_length, prepared.row_length, prepared.task_type) == (CONTEXT, 2 * CONTEXT, DPO)
    a = arrays(prepared)
    assert {x.shape for x in a.values()} == {(prepared.num_rows, 2 * CONTEXT)}
    assert {x.dtype for x in a.values()} == {np.dtype(np.int32)}
    assert (a["sequence_ids"] == -1).sum() == prepared.num_rows * 2 * CONTEXT - prepared.num_tokens  # padding
    pairs = sides(prepared)
    for (chosen_ids, chosen_labels), (rejected_ids, rejected_labels), (chosen, rejected) in zip(
            pairs[::2], pairs[1::2], ANSWERS):
        prompt = int((chosen_labels == IGNORE).sum())
        assert prompt == int((rejected_labels == IGNORE).sum()) > 0
        assert (chosen_ids[:prompt] == rejected_ids[:prompt]).all()  # one prompt, tokenized once
        assert (chosen_labels[prompt:] != IGNORE).all() and (rejected_labels[prompt:] != IGNORE).all()
        assert tokenizer.decode(chosen_labels[prompt:]) == f"{chosen}<|im_end|>"
        assert tokenizer.decode(rejected_labels[prompt:]) == f"{rejected}<|im_end|>"
        assert tokenizer.decode(chosen_ids[:prompt]).endswith("<|im_start|>assistant\n")
    # The pairs of every format are the same sequences: one form, whichever way the data was written.
    reference = sides(prepare_dataset(str(DATA / FORMATS[0]), tiny_model_dir, DPO, CONTEXT))
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(pairs, reference))


def test_a_pairs_sides_share_a_row_and_restart_their_positions(tiny_model_dir):
    prepared = prepare_dataset(str(DATA / "openai.jsonl"), tiny_model_dir, DPO, CONTEXT)
    a = arrays(prepared)
    for row in range(prepared.num_rows):
        ids = a["sequence_ids"][row]
        for pair in set(ids[ids >= 0] // 2):
            assert {2 * pair, 2 * pair + 1} <= set(ids)  # both sides in this row: one forward computes both
        starts = np.flatnonzero(np.diff(ids, prepend=-2) != 0)  # where each sequence (or the padding) begins
        assert (a["position_ids"][row][starts] == 0).all()
        assert (a["labels"][row][ids == -1] == IGNORE).all()


def test_plain_string_pairs_are_tokenized_untemplated(tiny_model_dir, tokenizer):
    prepared = prepare_dataset(str(DATA / "trl_text.jsonl"), tiny_model_dir, DPO, CONTEXT)
    (chosen_ids, chosen_labels), (_, rejected_labels) = sides(prepared)[:2]
    prompt = int((chosen_labels == IGNORE).sum())
    assert tokenizer.decode(chosen_ids[:prompt]) == "The capital of France is"
    assert tokenizer.decode(chosen_labels[prompt:]) == f" Paris.{tokenizer.eos_token}"
    assert tokenizer.decode(rejected_labels[prompt:]) == f" Lyon.{tokenizer.eos_token}"


def test_answers_are_cut_to_fit_never_the_prompt(tiny_model_dir, tokenizer):
    # Pair 1 (SmolLM2's template adds its long default system prompt) is 41 tokens a side; the others fit in 40.
    whole = sides(prepare_dataset(str(DATA / "openai.jsonl"), tiny_model_dir, DPO, 64))
    prepared = prepare_dataset(str(DATA / "openai.jsonl"), tiny_model_dir, DPO, 40)
    assert (prepared.num_examples, prepared.num_truncated) == (3, 1)
    cut = sides(prepared)
    for side in (2, 3):
        ids, labels = cut[side]
        prompt = int((labels == IGNORE).sum())
        assert len(ids) == 40 and (ids[:prompt] == whole[side][0][:prompt]).all()  # the prompt whole
        assert tokenizer.decode(labels[prompt:]) == ANSWERS[1][side - 2]  # the answer without its end of turn
    assert all((x[0] == y[0]).all() for i, (x, y) in enumerate(zip(cut, whole)) if i not in (2, 3))
    stats = json.loads((prepared.path / "stats.json").read_text())
    assert (stats["pairs"]["chosen_truncated"], stats["pairs"]["rejected_truncated"]) == (1, 1)
    assert any("1 of 3 pairs have an answer longer than fits" in w for w in stats["warnings"])


def test_a_delta_table_of_pairs_becomes_the_same_rows(tiny_model_dir, tmp_path):
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    records = [json.loads(line) for line in (DATA / "trl_explicit.jsonl").read_text().splitlines()]
    write_deltalake(str(tmp_path / "tables" / "main" / "prefs" / "pairs"), pa.table(
        {key: pa.array([r[key] for r in records], pa.list_(message)) for key in ("prompt", "chosen", "rejected")}))
    from_table = prepare_dataset("main.prefs.pairs", tiny_model_dir, DPO, CONTEXT)
    from_file = prepare_dataset(str(DATA / "trl_explicit.jsonl"), tiny_model_dir, DPO, CONTEXT)
    assert from_table.num_examples == 3
    assert all((arrays(from_table)[n] == arrays(from_file)[n]).all() for n in ("input_ids", "labels"))


BAD_PAIRS = [
    ("missing_side.jsonl", "missing_side.jsonl line 2, field non_preferred_output: found nothing; add "
     "'non_preferred_output', the worse answer: a pair needs both answers"),
    ("no_answer.jsonl", "no_answer.jsonl line 2, field non_preferred_output: found 0 messages; give exactly one "
     "assistant message"),
    ("empty_answer.jsonl", "empty_answer.jsonl line 2, field rejected[0].content: found ' '; write the message's text"),
    ("identical.jsonl", "identical.jsonl line 2, field rejected: found the same answer as chosen; give two different "
     "answers"),
    ("two_preferred.jsonl", "two_preferred.jsonl line 2, field messages[1].candidates: found 2 candidates labelled "
     "'preferred'; label one candidate 'preferred' and the other 'non-preferred': a pair has one of each"),
    ("prompt_ends_with_answer.jsonl", "prompt_ends_with_answer.jsonl line 2, field prompt[1].role: found 'assistant'; "
     "end the prompt with the user's message (or a tool result): the answers begin where it ends"),
    ("implicit_differ_early.jsonl", "implicit_differ_early.jsonl line 2, field rejected[1]: found a message that is "
     "not chosen[1]; make both conversations the same up to their last message"),
    ("implicit_strings.jsonl", "implicit_strings.jsonl line 2, field prompt: found nothing; add 'prompt', the text "
     "both answers follow"),
    ("mixed_kinds.jsonl", "mixed_kinds.jsonl line 2, field chosen: found a list while prompt is a string; give prompt, "
     "chosen and rejected all as strings or all as lists of {role, content} messages"),
    ("not_a_pair.jsonl", "not_a_pair.jsonl line 2, field messages[1]: found no candidates; give the last turn the "
     "assistant's two answers"),
    ("prompt_fills_context.jsonl", "prompt_fills_context.jsonl line 2, field prompt: found a prompt of 156 tokens, "
     "which leaves no room for an answer within context_length=64; shorten the prompt or raise context_length"),
    ("tools_unrendered.jsonl", "tools_unrendered.jsonl line 2, field input.tools: found tool definitions; remove "
     "them, or use a model whose chat template renders tool definitions"),
]


@pytest.mark.parametrize("name, message", BAD_PAIRS, ids=[name for name, _ in BAD_PAIRS])
def test_each_bad_pair_is_refused_with_file_line_field_and_fix(name, message, tiny_model_dir):
    result = validate_data(str(BAD / name), task_type=DPO, model=str(tiny_model_dir), context_length=CONTEXT)
    assert not result.ok and result.prepared is None
    assert result.report.startswith(f"{BAD / name}: 1 of 2 records are not valid DPO")
    assert message in result.report.replace(f"{BAD}/", ""), result.report
    assert "Traceback" not in result.report


def test_allow_percentage_invalid_samples_skips_bad_pairs(tiny_model_dir, tmp_path):
    # Ten pairs, one refused by its format, one whose prompt alone fills the context: 20% are bad.
    good = (DATA / "openai.jsonl").read_text().splitlines()
    bad = [(BAD / name).read_text().splitlines()[1] for name in ("two_preferred.jsonl", "prompt_fills_context.jsonl")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([*good * 2, bad[0], *good[:2], bad[1]]) + "\n")
    refused = validate_data(str(data), task_type=DPO, model=str(tiny_model_dir), context_length=CONTEXT,
                            allow_percentage_invalid_samples=10)
    assert not refused.ok
    assert refused.report.startswith(f"{data}: 2 of 10 records are not valid DPO (20%, more than "
                                     "allow_percentage_invalid=10 allows)")
    skipped = validate_data(str(data), task_type=DPO, model=str(tiny_model_dir), context_length=CONTEXT,
                            allow_percentage_invalid_samples=20)
    assert skipped.ok and skipped.report.startswith(f"{data}: skipped 2 of 10 records (20%)")
    assert "pairs.jsonl line 10, field prompt: found a prompt of 156 tokens" in skipped.report
    assert (skipped.prepared.num_examples, skipped.prepared.num_invalid) == (8, 2)


# `tessera validate`, through the console script the package installs

TESSERA = Path(sys.executable).with_name("tessera")


@pytest.fixture(scope="module")
def validated(tiny_model_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`tessera validate --task-type DPO` on good and bad pairs, run side by side: each takes seconds to start."""
    env = {**os.environ, "COLUMNS": "200", "TESSERA_CACHE": str(tmp_path_factory.mktemp("cache"))}
    settings = ["--task-type", DPO, "--model", str(tiny_model_dir), "--context-length", "40", "--global-batch-size",
                "1", "--training-duration", "2ep"]
    started = {name: subprocess.Popen([TESSERA, "validate", str(path), *settings], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, path in (("good", DATA / "nova.jsonl"), ("bad", BAD / "two_preferred.jsonl"))}
    return {name: subprocess.CompletedProcess(p.args, p.wait(timeout=180), p.stdout.read(), p.stderr.read())
            for name, p in started.items()}


def test_validate_reports_pairs_tokens_per_side_truncation_and_lengths(validated):
    good = validated["good"]
    out = good.stdout
    assert good.returncode == 0, out + good.stderr
    assert f"valid: {DATA / 'nova.jsonl'}: 3 valid DPO records" in out
    assert "tokens at context_length 40 (a sequence is a prompt with one answer)" in out
    row = re.search(r"│ 3 +│ ([\d,]+) +│ ([\d,]+) +│ ([\d,]+) +│ (\d+) / (\d+) / (\d+) / (\d+) +│ 1 / 1 +│", out)
    assert row, out
    prompt, chosen, rejected = (int(row[i].replace(",", "")) for i in (1, 2, 3))
    assert 0 < chosen < rejected < prompt and int(row[7]) == 40  # the longest sequences are cut to the context
    bars = re.findall(r"^ +(\d+)-(\d+) +█* +(\d+)$", out, re.MULTILINE)
    assert "sequences by length in tokens:" in out and sum(int(count) for *_, count in bars) == 6
    rows = int(re.search(r"packed into (\d+) rows of 80 tokens, each pair's two sides in one", out)[1])
    assert f"estimate: 2ep is {2 * rows} optimizer steps, {2 * rows * 80:,} token positions" in out
    assert "quality checks (great-expectations): passed" in out
    assert "1 of 3 pairs have an answer longer than fits after its prompt" in " ".join(out.split())
    assert "Traceback" not in out + good.stderr


def test_validate_names_the_bad_pair(validated):
    bad = validated["bad"]
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"not valid: {BAD / 'two_preferred.jsonl'}: 1 of 2 records are not valid DPO" in bad.stdout
    assert "two_preferred.jsonl line 2, field messages[1].candidates: found 2 candidates labelled 'preferred'" in \
        " ".join(bad.stdout.split())
    assert "Traceback" not in bad.stdout + bad.stderr
