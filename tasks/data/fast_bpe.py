"""A tiktoken twin of a Hugging Face byte-level BPE tokenizer, for speed.

Splitting text into words with the GPT-2 regex is most of what a Hugging Face tokenizer spends; tiktoken
does the same work about 3x faster. The two agree when the vocabulary is a trained BPE's (each merge makes a
new token, numbered in merge order), the pre-tokenizer is one regex, and nothing normalises the text. The twin
is built only then, and only if it encodes every vocabulary entry and a probe text exactly as the original
does; callers still compare the two on a sample of the real data (Encoder.verify)."""

import json
from functools import lru_cache
from typing import TYPE_CHECKING

import tiktoken

if TYPE_CHECKING:  # a run's flow process imports this module and needs no transformers: its tokenizer's callers do
    from transformers import PreTrainedTokenizerBase

# What ByteLevel(use_regex=True) splits on: the GPT-2 pattern.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PROBE = "Héllo wörld!  Ünïcödé 東京 🙂\n\n\tcode:  x = [1, 2]\r\n it's 12345 — don't\u00a0stop  \n"


def tiktoken_twin(tokenizer: "PreTrainedTokenizerBase") -> tiktoken.Encoding | None:
    """The twin, or None where it could encode differently."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pattern = _split_pattern(spec)
    model = spec.get("model") or {}
    if (pattern is None or spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout")
            or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None  # added tokens that swallow neighbouring spaces: tiktoken has no such thing
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    merged_ids = [vocab.get(a + b) for a, b in merges]
    if None in merged_ids or merged_ids != sorted(merged_ids):
        return None  # not numbered in merge order: tiktoken's rank would not be the merge's priority
    to_byte = _byte_decoder()
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    except KeyError:
        return None  # a token outside the byte-level alphabet
    twin = tiktoken.Encoding(f"twin-{tokenizer.name_or_path}", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={t["content"]: t["id"] for t in added})
    if not _agrees(twin, tokenizer, list(vocab)):
        return None
    return twin


def encode(twin: tiktoken.Encoding, texts: list[str]) -> list[list[int]]:
    # One call per text: encode_batch hands every text to a thread pool, which costs more than short texts take.
    return [twin.encode(text, allowed_special="all") for text in texts]


def _split_pattern(spec: dict) -> str | None:
    """The regex the pre-tokenizer splits on, if it is just a regex split then bytes to characters."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, level = steps
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and "Regex" in (split.get("pattern") or {}) and level.get("type") == "ByteLevel"
                and not level.get("use_regex", True) and not level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    return None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


def _agrees(twin: tiktoken.Encoding, tokenizer: "PreTrainedTokenizerBase", vocab_tokens: list[str]) -> bool:
    """Every vocabulary entry (as the text it stands for) and the probe encode the same both ways."""
    to_byte = _byte_decoder()
    texts = [_PROBE]
    for token in vocab_tokens:
        try:
            texts.append(bytes(to_byte[c] for c in token).decode("utf-8"))
        except (KeyError, UnicodeDecodeError):
            continue  # a piece of a multi-byte character, or an added token (encoded as itself below)
    texts += [t.content for t in tokenizer.added_tokens_decoder.values()]
    ours = encode(twin, texts)
    theirs = [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return ours == theirs
