"""The head's tokenizer: loading it, the model's context length, and a request's prompt ids.

``tokenize`` turns a validated request into token ids (the chat template with the generation prompt for
``messages``); a template that refuses the messages is the client's error (``invalid_request``), any other
tokenizer failure an ``internal`` one. The head tokenizes texts up to ``INLINE_TOKENIZE_CHARS`` on its event
loop and longer ones in a thread (``text_chars``).
"""

from __future__ import annotations

import json
from typing import Any

from jinja2.exceptions import TemplateError

from hexgen.config import ModelConfig, preset
from hexgen.head.tool_prompt import render, tool_format
from hexgen.head.validation import ParsedRequest
from hexgen.model.tokenizer import load_tokenizer
from hexgen.wire.protocol import InternalError, InvalidRequest
from hexgen.wire.settings import Settings

INLINE_TOKENIZE_CHARS = 16384  # shorter texts are tokenized on the event loop (about 1 ms); longer in a thread
TOKENIZER_ERRORS = (ValueError, TypeError, KeyError, IndexError, RuntimeError)


def load_head_tokenizer(settings: Settings) -> Any:
    """The model's Hugging Face tokenizer (``model.tokenizer``, defaulting to ``model.path``)."""
    return load_tokenizer(settings.model.tokenizer, local_only=False)


def model_context_len(settings: Settings) -> int:
    """Tokens a sequence may hold: ``model.max_model_len`` or the model's max_position_embeddings."""
    if settings.model.max_model_len:
        return settings.model.max_model_len
    if settings.model.preset:
        return preset(settings.model.preset).max_position_embeddings
    return ModelConfig.from_dir(settings.model.path).max_position_embeddings


def tokenize(tokenizer: Any, parsed: ParsedRequest) -> list[int]:
    """Token ids of the prompt, or of the chat-templated messages with the generation prompt appended; a
    request's own ``prompt_ids`` as they are (each must be in the tokenizer's vocabulary)."""
    if parsed.prompt_ids is not None:
        check_token_ids("prompt_ids", parsed.prompt_ids, len(tokenizer))
        return list(parsed.prompt_ids)
    try:
        if parsed.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidRequest("messages: this model's tokenizer has no chat template; send prompt instead")
            messages, extra = list(parsed.messages), dict[str, Any]()
            s = parsed.structured
            if s is not None and s.renders_tools or any("tool_calls" in m for m in messages):
                tools = list(s.tools) if s is not None and s.renders_tools else []
                messages, extra = render(messages, tools, tool_format(tokenizer.chat_template))
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(parsed.prompt, add_special_tokens=True)["input_ids"]
    except TemplateError as e:  # the model's chat template refuses these messages (e.g. role order)
        raise InvalidRequest(f"messages: the model's chat template rejected them: {e}") from e
    except TOKENIZER_ERRORS as e:
        field = "messages" if parsed.messages is not None else "prompt"
        raise InternalError(f"{field}: tokenizing failed: {type(e).__name__}: {e}") from e
    return [int(i) for i in ids]


def check_token_ids(name: str, ids: Any, vocab: int) -> None:
    """InvalidRequest naming ``name`` when an id is not below the vocabulary size ``vocab``."""
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise InvalidRequest(f"{name}: token id {bad} is out of range; allowed: [0, {vocab - 1}]")


def check_param_ids(tokenizer: Any, parsed: ParsedRequest) -> None:
    """The token ids in ``logit_bias`` and ``stop_token_ids`` must be in the vocabulary."""
    if not parsed.params.logit_bias and not parsed.params.stop_token_ids:
        return
    vocab = len(tokenizer)
    check_token_ids("logit_bias", [t for t, _ in parsed.params.logit_bias], vocab)
    check_token_ids("stop_token_ids", parsed.params.stop_token_ids, vocab)


def text_chars(parsed: ParsedRequest) -> int:
    if parsed.prompt is not None:
        return len(parsed.prompt)
    if parsed.prompt_ids is not None:
        return 0
    return sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for m in parsed.messages or () for v in m.values())
