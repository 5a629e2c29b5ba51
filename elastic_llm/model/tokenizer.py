"""Tokenizer of a checkpoint directory, read from local files only.

Uses the `tokenizers` library on ``tokenizer.json`` directly (fast to load) and renders the chat
template with a sandboxed jinja2 environment, as transformers does. Checkpoints without a
``tokenizer.json`` fall back to transformers' `AutoTokenizer`.

Text that comes from a user never yields special tokens: "<|im_start|>" typed in a message is
encoded as the plain characters it is, so a user cannot forge a chat-role marker or an end of
sequence. Only the chat template's own markers are encoded as special tokens.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from elastic_llm.errors import ModelLoadError

# transformers' clean_up_tokenization: spaces before punctuation and contractions
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Text <-> token ids, chat formatting and the ids that end generation."""

    def __init__(self, checkpoint_dir: Path, extra_eos_ids: Sequence[int] = ()) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        self._config = _read_json(checkpoint_dir / "tokenizer_config.json")
        self._template = _chat_template(checkpoint_dir, self._config)
        self._cleanup = bool(self._config.get("clean_up_tokenization_spaces", False))
        self._backend = _load_backend(checkpoint_dir)
        #: special tokens' text -> id, longest first (what a template's own markers may be)
        self._specials = _special_tokens(self._backend)
        self._special_re = (re.compile("|".join(re.escape(t) for t in self._specials))
                            if self._specials else None)
        eos = {int(i) for i in extra_eos_ids}
        eos_id = self.token_id(self._config.get("eos_token"))
        if eos_id is not None:
            eos.add(eos_id)
        #: token ids that end a generation unless `ignore_eos` is set
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    def token_id(self, token: str | dict[str, Any] | None) -> int | None:
        """Id of a special token given as text or as tokenizer_config's {"content": ...} form."""
        if isinstance(token, dict):
            token = token.get("content")
        if not token:
            return None
        return self._backend.token_to_id(token)

    @property
    def has_chat_template(self) -> bool:
        """Whether the checkpoint ships a chat template (instruct models do)."""
        return self._template is not None

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids the tokenizer can produce."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of a user's raw `text`: no chat formatting, no special tokens added, and
        special tokens' text inside it ("<|im_start|>") encoded as plain text."""
        return list(self._backend.encode_text(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens dropped."""
        text = str(self._backend.decode(list(token_ids), skip_special_tokens=True))
        if self._cleanup:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        """Text of a one-turn chat prompt ending where the assistant's answer starts."""
        return self.chat_messages_prompt(_one_turn(user_message, system))

    def chat_messages_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        """Text of a chat of `messages` ((role, content) pairs: "system", "user", "assistant"),
        ending where the assistant's next answer starts. Without a template: the contents joined
        by blank lines."""
        if self._template is None:
            return "\n\n".join(content for _, content in messages)
        turns = [{"role": role, "content": content} for role, content in messages]
        specials = {k: _content(self._config.get(k)) for k in ("bos_token", "eos_token")}
        return self._template.render(messages=turns, add_generation_prompt=True, **specials)

    def chat_prompt_ids(self, user_message: str, system: str | None = None) -> list[int]:
        """Token ids of `chat_prompt` (see `chat_messages_ids`)."""
        return self.chat_messages_ids(_one_turn(user_message, system))

    def chat_messages_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of `chat_messages_prompt`: the template's markers as special tokens, the
        messages' text as plain text (a marker typed in a message stays text).

        The template is rendered with a placeholder for each message, so the messages' spans are
        known exactly; each message is inserted verbatim where the template puts it.
        """
        if self._template is None:
            return self.encode(self.chat_messages_prompt(messages))
        holders = [f"\x00{uuid.uuid4().hex}\x00" for _ in messages]
        contents = {holder: content for holder, (_, content) in zip(holders, messages, strict=True)}
        template = self.chat_messages_prompt([(role, holder) for holder, (role, _) in
                                              zip(holders, messages, strict=True)])
        ids: list[int] = []
        text = ""
        for piece in re.split("(" + "|".join(holders) + ")", template) if holders else [template]:
            if piece in contents:
                text += contents[piece]
                continue
            for part in self._split_specials(piece):
                if isinstance(part, str):
                    text += part
                else:
                    ids += self.encode(text) if text else []
                    text = ""
                    ids.append(part)
        return ids + (self.encode(text) if text else [])

    def _split_specials(self, template_text: str) -> list[str | int]:
        """`template_text` as plain text pieces and special token ids, in order."""
        if self._special_re is None:
            return [template_text]
        parts: list[str | int] = []
        start = 0
        for match in self._special_re.finditer(template_text):
            parts += [template_text[start:match.start()], self._specials[match.group()]]
            start = match.end()
        return [*parts, template_text[start:]]


def _one_turn(user_message: str, system: str | None) -> list[tuple[str, str]]:
    """The (role, content) messages of a one-turn chat."""
    return ([("system", system)] if system is not None else []) + [("user", user_message)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise ModelLoadError(f"corrupt {path}: {exc}") from None


def _content(token: Any) -> str:
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return "" if token is None else str(token)


def _chat_template(checkpoint_dir: Path, config: dict[str, Any]) -> Any:
    source = config.get("chat_template")
    jinja_file = checkpoint_dir / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text()
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in source}
        source = named.get("default") or next(iter(named.values()), None)
    if not source:
        return None
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _special_tokens(backend: Any) -> dict[str, int]:
    """{text: id} of the backend's special added tokens, longest text first."""
    found = {token.content: int(i) for i, token in backend.get_added_tokens_decoder().items()
             if token.special and token.content}
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))


def _load_backend(checkpoint_dir: Path) -> Any:
    tokenizer_file = checkpoint_dir / "tokenizer.json"
    try:
        if tokenizer_file.is_file():
            return _FastBackend(tokenizer_file)
        from transformers import AutoTokenizer

        return _TransformersBackend(AutoTokenizer.from_pretrained(str(checkpoint_dir),
                                                                  local_files_only=True))
    except Exception as exc:  # tokenizers/transformers raise many types for bad files
        raise ModelLoadError(f"cannot load the tokenizer from {checkpoint_dir}: {exc}") from exc


class _FastBackend:
    """A `tokenizers.Tokenizer` plus a second copy that reads special tokens' text as text (a
    copy, rather than toggling the flag, so that concurrent encodes cannot race)."""

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self._tok = FastTokenizer.from_file(str(tokenizer_file))
        self._plain = FastTokenizer.from_file(str(tokenizer_file))
        self._plain.encode_special_tokens = True

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)  # type: ignore[no-any-return]

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=with_added_tokens))

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return dict(self._tok.get_added_tokens_decoder())

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with special tokens' text read as plain text."""
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))


class _TransformersBackend:
    """Adapts a transformers tokenizer to the small `tokenizers.Tokenizer` surface used above."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return dict(self._tok.added_tokens_decoder)

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with special tokens' text read as plain text."""
        return list(self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def token_to_id(self, token: str) -> int | None:
        return self._tok.convert_tokens_to_ids(token)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self._tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        class _Encoding:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return _Encoding()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))
