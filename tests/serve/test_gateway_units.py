"""Millisecond checks of the gateway's pure pieces: text deltas under re-commits, admission,
settings and the request schema."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from elastic_llm.cluster.text_deltas import TextDeltas
from elastic_llm.control.requests import ClientEvent
from elastic_llm.errors import InvalidRequestError
from elastic_llm.serve.errors import APIError
from elastic_llm.serve.generation import Admission
from elastic_llm.serve.protocol import ChatCompletionRequest, CompletionRequest, unsupported_fields
from elastic_llm.serve.settings import GatewaySettings

WORDS = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\xe9"}


class Letters:
    """A decoder whose token 7 is half a character (decoded alone as U+FFFD)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        text = "".join(WORDS.get(t, "") for t in token_ids if t != 7)
        return text + ("\ufffd" if token_ids and token_ids[-1] == 7 else "")


def tokens(start: int, ids: tuple[int, ...]) -> ClientEvent:
    return ClientEvent(0, "r", "tokens", start, ids)


def test_re_committed_tokens_reach_the_client_once() -> None:
    deltas = TextDeltas(Letters())
    pieces = [deltas.add(tokens(0, (1, 2))), deltas.add(tokens(2, (3,))),
              deltas.add(tokens(0, (1, 2, 3))),  # a recompute re-commits from the start
              deltas.add(tokens(1, (2, 3, 4))), deltas.finish("Hello world")]
    assert pieces == ["Hello", " wor", "", "ld", ""]
    assert "".join(pieces) == "Hello world"


def test_half_characters_and_stop_string_starts_are_held_back() -> None:
    half = TextDeltas(Letters())
    assert half.add(tokens(0, (1, 7))) == ""              # "Hel" + half a character: wait
    assert half.add(tokens(1, (2,))) == "Hello"           # the character was replaced by "lo"
    deltas = TextDeltas(Letters(), stop=("ld!",))
    assert deltas.add(tokens(0, (1, 2, 3, 4))) == "Hello wor"  # the last 2 may start "ld!"
    assert deltas.finish("Hello wor") == ""               # the final text cut the stop string off
    assert TextDeltas(None).add(tokens(0, (1,))) == ""    # no tokenizer: no text


def test_admission_is_bounded_and_all_or_nothing() -> None:
    admission = Admission(5)
    admission.reserve(4)
    with pytest.raises(APIError) as full:
        admission.reserve(2)
    assert full.value.status == 429 and admission.pending == 4 and full.value.headers["Retry-After"]
    admission.release(4)
    admission.reserve(5)
    assert admission.pending == 5


@pytest.mark.parametrize("field, value", [("max_pending", 0), ("max_body_bytes", -1), ("max_n", True),
                                          ("drain_timeout_s", 0.0), ("api_key", "  "), ("model_name", "")])
def test_bad_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        GatewaySettings(**{"model_name": "m", field: value})  # type: ignore[arg-type]


def test_schema_is_strict_and_unsupported_fields_are_named() -> None:
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"model": "m", "prompt": "a", "max_tokens": "3"})
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "robot", "content": "a"}]})
    assert unsupported_fields(CompletionRequest.model_validate({"model": "m", "prompt": "a", "echo": True})) == "echo"
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "a"}],
                                                 "tools": [{"type": "function"}]})
    assert unsupported_fields(chat) == "tools"
    assert unsupported_fields(CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]})) is None


@pytest.mark.parametrize("argv", [["--max-pending", "0"], ["--port", "70000"], ["--drain-timeout", "-1"],
                                  ["--policy", "best"], ["--scheduler", "a", "--scheduler-file", "b"],
                                  ["--max-body-bytes", "x"], ["--request-scheduler", "lifo"]])
def test_serve_cli_exits_2_on_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from elastic_llm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2 and "error" in capsys.readouterr().err


def test_cluster_options_take_a_request_scheduler_by_name() -> None:
    from elastic_llm.errors import InvalidRequestError
    from elastic_llm.serve.server import ClusterOptions

    assert ClusterOptions(request_scheduler="las-predicted").request_scheduler == "las-predicted"
    with pytest.raises(InvalidRequestError, match="--request-scheduler"):
        ClusterOptions(request_scheduler="lifo")
