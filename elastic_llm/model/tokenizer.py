"""Tokenizer of a checkpoint directory, read from local files only.

Uses the `tokenizers` library on ``tokenizer.json`` directly (fast to load) and renders the chat
template with a sandboxed jinja2 environment, as transformers does. Checkpoints without a
``tokenizer.json`` fall back to transformers' `AutoTokenizer`.
"""

from __future__ import annotations

import json
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
        """Token ids of raw `text` (no chat formatting, no special tokens added)."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens dropped."""
        text = str(self._backend.decode(list(token_ids), skip_special_tokens=True))
        if self._cleanup:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        """Text of a one-turn chat prompt ending where the assistant's answer starts."""
        if self._template is None:
            return user_message
        messages = [{"role": "user", "content": user_message}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        specials = {k: _content(self._config.get(k)) for k in ("bos_token", "eos_token")}
        return self._template.render(messages=messages, add_generation_prompt=True, **specials)

    def chat_prompt_ids(self, user_message: str, system: str | None = None) -> list[int]:
        """Token ids of `chat_prompt`."""
        return self.encode(self.chat_prompt(user_message, system))


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


def _load_backend(checkpoint_dir: Path) -> Any:
    tokenizer_file = checkpoint_dir / "tokenizer.json"
    try:
        if tokenizer_file.is_file():
            from tokenizers import Tokenizer as FastTokenizer

            return FastTokenizer.from_file(str(tokenizer_file))
        from transformers import AutoTokenizer

        return _TransformersBackend(AutoTokenizer.from_pretrained(str(checkpoint_dir),
                                                                  local_files_only=True))
    except Exception as exc:  # tokenizers/transformers raise many types for bad files
        raise ModelLoadError(f"cannot load the tokenizer from {checkpoint_dir}: {exc}") from exc


class _TransformersBackend:
    """Adapts a transformers tokenizer to the small `tokenizers.Tokenizer` surface used above."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

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
