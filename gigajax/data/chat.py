"""Chat templates: `messages` records rendered by the tokenizer's own Jinja template (`--chat`).

A Hugging Face tokenizer directory carries its template in `chat_template.jinja` or under
`chat_template` in `tokenizer_config.json`; it is rendered as `transformers` renders it (a
sandboxed Jinja environment with trim_blocks and lstrip_blocks, `raise_exception`, `tojson`,
and the special tokens' strings as `bos_token`, `eos_token`, ...). A tokenizer without one
(the byte tokenizer, SentencePiece, a bare tokenizer.json) is refused with --chat; plain
`--sft` keeps its simple built-in "role: content" template for them (`readers.py`).

Which tokens are trained: the text of assistant turn i is what the template adds between
rendering messages[:i] with the generation prompt and rendering messages[:i+1], i.e. the
content and the template's end-of-turn tokens, but not the role header; that is the loss mask.
A template whose renderings of a conversation's prefixes are not prefixes of each other is
refused, since its turns have no stable text.

Specials: each message's content is encoded as plain text (a message that writes
"<|im_end|>" cannot forge a turn boundary, as for every document), the template's own text
with its special tokens parsed. To tell them apart the template is rendered with a marker in
place of each content; a template that rewrites the content itself (strips it, cuts it) does
not render the real conversation to the marked one with the contents put back, and is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gigajax.data.readers import BadRecord, Chat
from gigajax.data.tokenizer import HFTokenizer, Tokenizer
from gigajax.errors import DataError

Piece = tuple[str, bool, bool]  # (text, is_target, is_template_text: its specials are parsed)
_MARK = re.compile("\x00(\\d+)\x00")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template and the variables it is rendered with."""

    source: str
    variables: tuple[tuple[str, str], ...]

    def fingerprint(self) -> str:
        """sha256 of the template and its variables (part of `prepare`'s fingerprint)."""
        return hashlib.sha256(json.dumps([self.source, self.variables]).encode()).hexdigest()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text of `messages`."""
        return _compile(self.source).render(messages=messages, **dict(self.variables),
                                            add_generation_prompt=add_generation_prompt)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(tok: Tokenizer) -> ChatTemplate:
    """The chat template of `tok`'s directory; a DataError saying what to do when none."""
    where = Path(tok.spec).parent if isinstance(tok, HFTokenizer) else None
    config: dict[str, Any] = {}
    if where is not None and (where / "tokenizer_config.json").is_file():
        try:
            config = json.loads((where / "tokenizer_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where / 'tokenizer_config.json'} is unreadable ({e}).") from None
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if where is not None and (where / "chat_template.jinja").is_file():
        source = (where / "chat_template.jinja").read_text()
    if not isinstance(source, str) or not source:
        raise DataError(f"--chat renders messages with the tokenizer's chat template, and "
                        f"{tok.spec!r} has none (chat_template.jinja, or chat_template in "
                        "tokenizer_config.json, next to tokenizer.json); add one, or use --sft "
                        "for the built-in 'role: content' template.")
    variables = tuple((k, t) for k in _SPECIAL_KEYS if (t := _token_text(config.get(k))))
    return ChatTemplate(source, variables)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """The template compiled in a sandbox, as transformers compiles chat templates."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                              indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def chat_pieces(template: ChatTemplate, chat: Chat, index: int,
                add_generation_prompt: bool = False) -> list[Piece]:
    """The rendered conversation as pieces (text, is_target, is_template_text) whose texts
    join to the template's rendering (with the assistant's turn opened after it when
    `add_generation_prompt`, for generation); BadRecord(index) when the template refuses it or
    is not prefix-stable or rewrites contents (module doc)."""
    from jinja2 import TemplateError

    real = [{"role": r, "content": c} for r, c in chat.messages]
    marked = [{"role": r, "content": f"\x00{i}\x00"} for i, (r, _) in enumerate(chat.messages)]
    try:
        full = template.render(marked, add_generation_prompt)
        target = [False] * len(full)
        for i, (role, _) in enumerate(chat.messages):
            if role != "assistant":
                continue
            head = template.render(marked[:i], add_generation_prompt=True)
            upto = template.render(marked[:i + 1])
            if not (full.startswith(upto) and upto.startswith(head)):
                raise BadRecord(index, f"the chat template does not render message {i} after "
                                "the ones before it (its renderings of the conversation's "
                                "prefixes are not prefixes of each other), so the assistant "
                                "turns have no stable tokens to train; use --sft instead.")
            target[len(head):len(upto)] = [True] * (len(upto) - len(head))
        rendered = template.render(real, add_generation_prompt)
    except (TemplateError, ValueError, TypeError) as e:
        raise BadRecord(index, f"the chat template refused the messages "
                        f"({type(e).__name__}: {e}).") from None
    pieces: list[Piece] = []
    pos = 0
    for m in [*_MARK.finditer(full), None]:
        stop = m.start() if m else len(full)
        pieces += _split_by_target(full[pos:stop], target[pos:stop])
        if m:
            pieces.append((chat.messages[int(m.group(1))][1], target[m.start()], False))
            pos = m.end()
    if "".join(text for text, _, _ in pieces) != rendered:
        raise BadRecord(index, "the chat template changes the message contents it renders "
                        "(strips or cuts them), so they cannot be encoded apart from its "
                        "special tokens; use --sft instead.")
    return [p for p in pieces if p[0]]


def encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str | np.ndarray, bool, bool]]
                  ) -> list[np.ndarray]:
    """The ids of each piece: documents' text as plain text, a template's own text with its
    specials parsed, ids as they are; one batch call of each kind."""
    out: list[np.ndarray | None] = [p if isinstance(p, np.ndarray) else None for p, _, _ in pieces]
    for specials in (False, True):
        where = [k for k, (p, _, s) in enumerate(pieces) if isinstance(p, str) and s == specials]
        if not where:
            continue
        texts = [pieces[k][0] for k in where]
        encode = tokenizer.encode_batch_with_specials if specials else tokenizer.encode_batch
        for k, ids in zip(where, encode(texts), strict=True):
            out[k] = ids
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> np.ndarray:
    """A generation prompt: `messages` ({"role", "content"} dicts) rendered by the tokenizer's
    chat template with the assistant's turn opened, encoded as training encodes chats."""
    template = load_chat_template(tokenizer)
    try:
        chat = Chat(tuple((str(m["role"]), str(m["content"])) for m in messages))
        pieces = chat_pieces(template, chat, 0, add_generation_prompt=True)
    except (KeyError, TypeError):
        raise DataError("--chat: each message is a {\"role\": ..., \"content\": ...} "
                        "object.") from None
    except BadRecord as e:
        raise DataError(f"--chat: {e.message}") from None
    ids = encode_pieces(tokenizer, pieces)
    return np.concatenate(ids).astype(np.int32) if ids else np.zeros((0,), np.int32)


def _split_by_target(text: str, target: list[bool]) -> list[Piece]:
    """Template text cut where its target flag changes."""
    pieces, start = [], 0
    for k in range(1, len(text) + 1):
        if k == len(text) or target[k] != target[start]:
            pieces.append((text[start:k], target[start], True))
            start = k
    return pieces
