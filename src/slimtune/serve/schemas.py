"""Request bodies of the OpenAI-compatible routes, and the responses and stream chunks they get.

Fields a client may send that this server does not implement (log-probabilities, penalties, tools,
several choices ...) are refused with a 400 when set to anything but their neutral value, rather than
silently ignored; other unknown fields are ignored, as OpenAI's API does for ones it does not use.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slimtune.serve.errors import APIError

# field -> the values that mean "not used", which are the only ones accepted.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
    "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's default when absent: 1.0
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what a torch.Generator accepts
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says

    def check_supported(self) -> None:
        """400 for a field this server does not implement, set to a value that would change the result."""
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name, None) if name in type(self).model_fields else (self.model_extra or {}).get(name)
            if value not in neutral:
                raise APIError(400, f"'{name}' = {value!r} is not supported by this server: leave it out", param=name)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        """The message's text; parts must all be text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content holds a {part.get('type')!r} part: this server "
                                    "takes text only", param=f"messages.{index}.content")
            texts.append(part["text"])
        return "".join(texts)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as slimtune's chat renderer takes them ('developer' is OpenAI's new 'system')."""
        out = []
        for index, message in enumerate(self.messages):
            if message.role not in _ROLES:
                raise APIError(400, f"messages[{index}].role {message.role!r} is not supported: use system, user or "
                                    "assistant", param=f"messages.{index}.role")
            out.append({"role": _ROLES[message.role], "content": message.text(index)})
        return out

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    # A string, a list of strings (one choice each), a list of token ids, or a list of such lists.
    prompt: str | list[str] | list[int] | list[list[int]]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class LoadAdapterRequest(BaseModel):
    """vLLM's body for /v1/load_lora_adapter."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """vLLM's body for /v1/unload_lora_adapter."""

    lora_name: str
    lora_int_id: int | None = None


# --- responses ---------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": use}


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: dict, reason: str | None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def text_completion(request_id: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": use}


def text_chunk(request_id: str, model: str, created: int, index: int, text: str, reason: str | None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(request_id: str, model: str, created: int, obj: str, use: dict) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
