"""Dataset row formats -> a list of chat messages `[{"role", "content"}, ...]`.

- Alpaca: `instruction`, optional `input`, `output`, optional `system` and `history` (a list of
  `[user, assistant]` pairs before this turn). `instruction` and `input` are joined by a newline into
  one user message, as LLaMA-Factory does; `output` is the assistant message.
- ShareGPT: `conversations: [{"from": "human"|"gpt"|"system", "value": ...}]`.
- OpenAI messages: `messages: [{"role": "system"|"user"|"assistant", "content": ...}]`; `content` may
  be a list of text and image parts (`data/images.py`).
- Either conversational form with LLaMA-Factory's `<image>` placeholders and an `images` list.
"""

from __future__ import annotations

from typing import Any, Literal

from slimtune.data.images import expand_placeholders, parse_parts
from slimtune.data.reader import Row
from slimtune.errors import DataError

Format = Literal["alpaca", "sharegpt", "messages"]
Message = dict[str, Any]  # content: a string, or text/image parts (data/images.py)

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}


def detect_format(row: Row) -> Format:
    """Guess the format from a row's keys."""
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    raise DataError(
        f"{row.source}: cannot tell the format from keys {sorted(keys)}: expected 'instruction'/'output' "
        "(Alpaca), 'conversations' (ShareGPT) or 'messages' (OpenAI); or set data.format"
    )


def _text(row: Row, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{row.source}: {what} must be a string, got {type(value).__name__} {value!r:.60}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may escape half of a UTF-16 pair ("\ud800"); no tokenizer takes it
        raise DataError(f"{row.source}: {what} holds a lone surrogate {value[exc.start]!r} at character {exc.start}, "
                        "half of a UTF-16 pair that is no character; fix the escape sequence in the file") from None
    return value


def _optional_text(row: Row, data: dict[str, Any], key: str) -> str:
    """An optional string field: absent or null is empty, anything else must be a string."""
    value = data.get(key)
    return "" if value is None else _text(row, value, f"'{key}'")


def _choice(row: Row, value: Any, what: str, choices) -> Any:
    """A role-like field: a string that is one of `choices` (dict keys or a set)."""
    if not isinstance(value, str) or value not in choices:
        shown = f"{type(value).__name__} {value!r:.60}" if not isinstance(value, str) else repr(value)
        *most, last = choices
        raise DataError(f"{row.source}: {what} is {shown}; use one of {', '.join(most)} or {last}")
    return value


def _alpaca(row: Row) -> list[Message]:
    data = row.data
    for key in ("instruction", "output"):
        if key not in data:
            raise DataError(f"{row.source}: Alpaca row needs '{key}' (a string); the row has keys {sorted(data)}")
    messages: list[Message] = []
    system = _optional_text(row, data, "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = data.get("history")
    history = [] if history is None else history
    if not isinstance(history, list):
        raise DataError(f"{row.source}: 'history' must be a list of [user, assistant] pairs, got "
                        f"{type(history).__name__} {history!r:.60}")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise DataError(f"{row.source}: each 'history' entry must be a [user, assistant] pair, got {turn!r:.60}")
        messages.append({"role": "user", "content": _text(row, turn[0], "a history user turn")})
        messages.append({"role": "assistant", "content": _text(row, turn[1], "a history assistant turn")})
    prompt = _text(row, data["instruction"], "'instruction'")
    extra = _optional_text(row, data, "input")
    if extra:
        prompt = f"{prompt}\n{extra}" if prompt else extra
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(row, data["output"], "'output'")})
    return messages


def _sharegpt(row: Row) -> list[Message]:
    turns = row.data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.source}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{row.source}: conversations[{index}] must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES[_choice(row, turn["from"], f"conversations[{index}].from", _SHAREGPT_ROLES)]
        messages.append({"role": role, "content": _text(row, turn["value"], f"conversations[{index}].value")})
    return messages


def _messages(row: Row) -> list[Message]:
    turns = row.data.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.source}: 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{row.source}: messages[{index}] must be an object with 'role' and 'content'")
        _choice(row, turn["role"], f"messages[{index}].role", ("system", "user", "assistant"))
        content = turn["content"]
        where = f"messages[{index}].content"
        content = parse_parts(content, row.source, where) if isinstance(content, list) else _text(row, content, where)
        messages.append({"role": turn["role"], "content": content})
    return messages


_PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def to_messages(row: Row, fmt: Format) -> list[Message]:
    """Normalise one row; checks that the conversation ends with an assistant turn to learn from."""
    messages = _PARSERS[fmt](row)
    if "images" in row.data:
        messages = expand_placeholders(messages, row.data["images"], row.source)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.source}: the conversation has no assistant turn, so there is nothing to learn")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{row.source}: the conversation must end with an assistant turn (it ends with {messages[-1]['role']!r})")
    return messages
