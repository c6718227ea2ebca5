"""What a model's chat template can render, found by rendering small probe conversations with it.

Templates disagree on the optional roles: Mistral's and Gemma's raise on a system message, some drop it silently,
many have no tool role. Validation asks the template itself rather than a list of model names, which goes stale."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.errors import InvalidInputError

if TYPE_CHECKING:  # formats imports this module in worker processes that need no transformers
    from transformers import PreTrainedTokenizerBase

# Markers no template writes by itself: finding one in the rendered text shows the template kept that message.
_SYSTEM, _TOOL = "TesseraProbeSystem", "TesseraProbeTool"
_USER = {"role": "user", "content": "TesseraProbeUser"}
_ASSISTANT = {"role": "assistant", "content": "TesseraProbeAssistant"}


@dataclass(frozen=True)
class TemplateSupport:
    """Which optional roles the chat template of `model` renders; validation refuses the others."""

    model: str
    system: bool
    tool: bool


def probe(tokenizer: "PreTrainedTokenizerBase") -> TemplateSupport:
    """Render a plain, a system and a tool conversation with the tokenizer's chat template and see what it keeps."""
    model = tokenizer.name_or_path
    if tokenizer.chat_template is None:
        raise InvalidInputError(
            f"{model} has no chat template: use an instruct model for CHAT_COMPLETION, "
            "or give prompt/response records with INSTRUCTION_FINETUNE"
        )
    if _render(tokenizer, [_USER, _ASSISTANT]) is None:
        raise InvalidInputError(
            f"the chat template of {model} fails on a plain user/assistant conversation: "
            "use a model whose chat template renders one"
        )
    system = [{"role": "system", "content": _SYSTEM}, _USER, _ASSISTANT]
    tool = [_USER, _ASSISTANT, {"role": "tool", "content": _TOOL}, _ASSISTANT]
    return TemplateSupport(model, system=_SYSTEM in (_render(tokenizer, system) or ""),
                           tool=_TOOL in (_render(tokenizer, tool) or ""))


def _render(tokenizer: "PreTrainedTokenizerBase", conversation: list[dict[str, Any]]) -> str | None:
    """The rendered conversation, or None where the template refuses it."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template is user-supplied code: whatever it raises (TemplateError, TypeError...) is a no
        return None
