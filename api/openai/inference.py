"""Inference with the catalog's base models and everything Tessera registered, as OpenAI's API: /v1/models,
/v1/chat/completions (also streamed as server-sent events) and /v1/completions.

A model is named as /v1/models lists it: a catalog name whose weights are on this machine, a registered model
(`main.openai.ift-...`: its newest version) or one of its aliases (`main.demo.assistant@champion`). Chat prompts use
the model's own chat template. Transformers' `generate` on this machine's CPU (a GPU when one is visible); models load
on first use and the TESSERA_SERVE_MODELS (default 2) most recently used stay loaded. Generation is one request at a
time: a CPU gains nothing from two.
"""

import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api import access
from api.openai.errors import OpenAIError
from tasks.errors import InvalidInputError
from tasks.models import get_models, resolve_model
from tasks.tracking import client, load_components

router = APIRouter(prefix="/v1")
GENERATING = threading.Lock()  # one generation at a time; it also keeps a request's seed its own
_LOADED: "OrderedDict[tuple[str, str], Loaded]" = OrderedDict()
_LOADING = threading.Lock()


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: object


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        """The content as text: a list of parts is joined (text parts only; Tessera's models read text)."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise OpenAIError(400, "only text content parts can be answered by these models", "messages",
                              "invalid_value")
        return "".join(part.get("text", "") for part in self.content)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the client's other options (user, logit_bias, ...) change nothing here
    model: str
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
    stream: bool = False
    stream_options: "StreamOptions | None" = None


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage and no choices


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


@router.get("/models")
def list_models() -> dict:
    """Catalog models whose weights are here, every registered model and each of its aliases."""
    return {"object": "list", "data": [_model(name, created, owner) for name, created, owner in _names()]}


@router.get("/models/{model:path}")
def retrieve_model(model: str) -> dict:
    found = next((m for m in _names() if m[0] == model), None)
    if found is None:
        raise _unknown(model)
    return _model(*found)


@router.post("/chat/completions")
def chat(request: ChatRequest):
    """Answer a conversation with the model's chat template."""
    loaded = _load(request.model)
    if not loaded.tokenizer.chat_template:
        raise OpenAIError(400, f"{request.model} has no chat template: use /v1/completions", "model",
                          "invalid_value")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]
    inputs = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
    return _answer(request, loaded, inputs, "chat.completion")


@router.post("/completions")
def complete(request: CompletionRequest):
    """Continue a prompt as it is, with no template."""
    loaded = _load(request.model)
    return _answer(request, loaded, loaded.tokenizer(request.prompt, return_tensors="pt"), "text_completion")


def _answer(request: Sampling, loaded: Loaded, inputs, kind: str):
    completion_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}"
    settings = _settings(request, loaded)
    prompt_tokens = inputs["input_ids"].shape[1]
    _fit(request, loaded, prompt_tokens, settings, "messages" if kind == "chat.completion" else "prompt")
    inputs = inputs.to(loaded.device)
    if request.stream:
        if request.n > 1:
            raise OpenAIError(400, "stream=true answers one choice: set n=1", "n", "invalid_value")
        return StreamingResponse(_stream(request, loaded, inputs, settings, completion_id, kind),
                                 media_type="text/event-stream")
    with GENERATING:
        _seed(request.seed)
        output = loaded.model.generate(**inputs, **settings, num_return_sequences=request.n)
    choices, generated = [], 0
    for index, row in enumerate(output[:, prompt_tokens:]):
        text, reason, count = _finish(loaded.tokenizer, row, request, settings)
        generated += count
        choices.append({"index": index, "finish_reason": reason, "logprobs": None} | (
            {"message": {"role": "assistant", "content": text}} if kind == "chat.completion" else {"text": text}))
    return {"id": completion_id, "object": kind, "created": int(time.time()), "model": request.model,
            "choices": choices, "system_fingerprint": None, "usage": _usage(prompt_tokens, generated)}


def _fit(request: Sampling, loaded: Loaded, prompt_tokens: int, settings: dict, param: str) -> None:
    """Refuse a prompt and completion longer than the model's context, in OpenAI's words, before generate() runs;
    a completion whose length the request left open gets what the context leaves."""
    context = _context_length(loaded)
    if context is None:
        return
    asked = request.max_completion_tokens or request.max_tokens
    said = f"This model's maximum context length is {context} tokens. However, "
    if asked is not None and prompt_tokens + asked > context:
        raise OpenAIError(400, f"{said}you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the {param}, "
                               f"{asked} in the completion). Please reduce the length of the {param} or completion.",
                          param, "context_length_exceeded")
    if prompt_tokens >= context:
        raise OpenAIError(400, f"{said}your {param} resulted in {prompt_tokens} tokens. Please reduce the length of "
                               f"the {param}.", param, "context_length_exceeded")
    settings["max_new_tokens"] = min(settings["max_new_tokens"], context - prompt_tokens)


def _context_length(loaded: Loaded) -> int | None:
    """The most tokens the model reads, prompt and completion together: its config's positions, else its tokenizer's
    limit where it states one (transformers' placeholder for none is 1e30)."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if positions:
        return positions
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    return limit if limit and limit < 10**9 else None


def _stream(request: Sampling, loaded: Loaded, inputs, settings: dict, completion_id: str,
            kind: str) -> Iterator[str]:
    """OpenAI's chunks as server-sent events, a piece of text each, then the finish reason and [DONE]."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result, gone = {}, threading.Event()  # gone: the client left, so stop generating for it

    def generate():
        with GENERATING:
            _seed(request.seed)
            stop = StoppingCriteriaList([lambda *_, **__: gone.is_set()])
            result["output"] = loaded.model.generate(**inputs, **settings, streamer=streamer, stopping_criteria=stop)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    chunk = {"id": completion_id, "object": "chat.completion.chunk" if kind == "chat.completion" else kind,
             "created": int(time.time()), "model": request.model, "system_fingerprint": None}

    def event(text: str | None, reason: str | None, first: bool = False) -> str:
        if kind == "chat.completion":
            delta = ({"role": "assistant", "content": ""} if first else {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return f"data: {json.dumps(chunk | {'choices': [choice]})}\n\n"

    try:
        if kind == "chat.completion":
            yield event(None, None, first=True)
        sent, stops = "", _stops(request)
        for piece in streamer:
            cut = min((i for i in ((sent + piece).find(s) for s in stops) if i >= 0), default=None)
            if cut is not None:
                piece = (sent + piece)[len(sent):cut] if cut > len(sent) else ""
            if piece:
                sent += piece
                yield event(piece, None)
            if cut is not None:
                break
        worker.join()
        prompt_tokens = inputs["input_ids"].shape[1]
        _, reason, generated = _finish(loaded.tokenizer, result["output"][0, prompt_tokens:], request, settings)
        yield event(None, reason)
        if request.stream_options and request.stream_options.include_usage:
            yield f"data: {json.dumps(chunk | {'choices': [], 'usage': _usage(prompt_tokens, generated)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        gone.set()


def _usage(prompt_tokens: int, generated: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def _settings(request: Sampling, loaded: Loaded) -> dict:
    """generate()'s settings for the request: greedy at temperature 0, OpenAI's defaults otherwise."""
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"max_new_tokens": request.max_completion_tokens or request.max_tokens or 256, "pad_token_id": pad}
    if request.temperature == 0:
        settings["do_sample"] = False
        if request.n > 1:
            raise OpenAIError(400, "temperature 0 gives one answer: set n=1 or a temperature above 0", "n",
                              "invalid_value")
    else:
        settings.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
    if stops := _stops(request):
        settings.update(stop_strings=stops, tokenizer=tokenizer)
    return settings


def _stops(request: Sampling) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else [s for s in request.stop or [] if s]


def _finish(tokenizer, row, request: Sampling, settings: dict) -> tuple[str, str, int]:
    """The text of one generated row, cut before any stop string; why it ended; how many tokens it has."""
    ids, eos = row.tolist(), tokenizer.eos_token_id
    if eos in ids:  # what follows the end of an answer is padding (n > 1 pads the shorter ones)
        ids = ids[: ids.index(eos) + 1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in _stops(request) if s in text]
    if cuts:
        return text[:min(cuts)], "stop", len(ids)
    return text, "stop" if eos in ids or len(ids) < settings["max_new_tokens"] else "length", len(ids)


def _seed(seed: int | None) -> None:
    import torch

    torch.manual_seed(seed if seed is not None else secrets.randbits(63))


def _load(name: str) -> Loaded:
    """The model `name` names, loaded once and kept while it is among the most recently used."""
    source, key = _source(name)
    with _LOADING:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(source, str):  # a registered version, as MLflow logged it
            parts = load_components(source)
            model, tokenizer = parts["model"], parts["tokenizer"]
        else:
            model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
        model = model.to(device).eval()
        _LOADED[key] = Loaded(model, tokenizer, device)
        while len(_LOADED) > int(os.environ.get("TESSERA_SERVE_MODELS", "2")):
            _LOADED.popitem(last=False)
        return _LOADED[key]


def registered_version(name: str):
    """The MLflow model version `name` names, `catalog.schema.model` (its newest version) or `...@alias`, if the caller
    may use that model (api/access.py); else None."""
    registered, _, alias = name.partition("@")
    if registered.count(".") != 2 or "/" in registered or not access.may_use_model(registered):
        return None
    registry = client()
    try:
        if alias:
            return registry.get_model_version_by_alias(registered, alias)
        versions = registry.search_model_versions(f"name = '{registered}'")
    except Exception:  # MLflow's RESOURCE_DOES_NOT_EXIST, or a name it cannot parse
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


def _source(name: str):
    """What to load for `name` and the cache key of exactly those weights: a models:/ URI of one registered version,
    or a catalog model's local folder."""
    if (version := registered_version(name)) is not None:
        return f"models:/{version.name}/{version.version}", (version.name, str(version.version))
    if name in {m.name for m in get_models() if m.available}:
        try:
            return resolve_model(name), (name, "catalog")
        except InvalidInputError as e:
            raise OpenAIError(404, str(e), "model", "model_not_found") from None
    raise _unknown(name)


def _names() -> list[tuple[str, int, str]]:
    """(id, created, owner) of every model /v1 answers with."""
    found = [(m.name, 0, "tessera") for m in get_models() if m.available]
    for registered in client().search_registered_models():
        if not access.may_use_model(registered.name, registered.tags):
            continue
        created = int(registered.creation_timestamp / 1000)
        found.append((registered.name, created, registered.tags.get("tessera.run_name", "tessera")))
        found += [(f"{registered.name}@{alias}", created, "tessera") for alias in registered.aliases]
    return found


def _model(name: str, created: int, owner: str) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


def _unknown(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist: GET /v1/models lists the models this server answers "
                            "with (catalog models on this machine, registered models and their @aliases)",
                       "model", "model_not_found")
