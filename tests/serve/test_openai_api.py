"""The gateway through the official `openai` package and raw HTTP, on a real uvicorn server on
127.0.0.1 over one in-process worker holding a one-layer model with SmolLM2's tokenizer."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from elastic_llm.serve.server import GatewayServer

from .conftest import API_KEY, MODEL_NAME

pytestmark = pytest.mark.timeout(120)
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def api(gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30) as client:
        yield client


def raw(gateway: GatewayServer, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One HTTP request with exactly these bytes; (status, parsed JSON body)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {API_KEY}",
                                                             "Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def test_models_and_unknown_model(api: openai.OpenAI) -> None:
    assert [m.id for m in api.models.list().data] == [MODEL_NAME]
    assert api.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="gpt-nope", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_chat_whole_and_streamed_agree_with_usage(api: openai.OpenAI, gateway: GatewayServer) -> None:
    whole = api.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_completion_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    llm = gateway.app.state.gateway.llm
    prompt_ids = llm.tokenizer.chat_messages_ids([("user", "Say hello.")])
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 12
    direct = llm.submit(list(prompt_ids), chat=False, max_new_tokens=12, ignore_eos=True).result(timeout=30)
    assert choice.message.content == direct.text  # the gateway serves what the ServingClient does

    chunks = list(api.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_n_seed_stop_and_multi_turn(api: openai.OpenAI) -> None:
    def sample() -> list[str]:
        reply = api.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, n=3,
                                       temperature=0.9, top_p=0.95, seed=7, extra_body={"ignore_eos": True})
        assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 30
        return [c.text for c in reply.choices]

    first = sample()
    assert sample() == first and len(set(first)) > 1  # seeded: repeatable; seed + i per choice
    greedy = api.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy.strip().split()[1]
    cut = api.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0,
                                 stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and greedy.startswith(cut.text) and stop not in cut.text
    chat = api.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": "Again"}]}])
    assert chat.usage.prompt_tokens > 15 and chat.choices[0].message.content is not None


def test_error_shapes(api: openai.OpenAI, gateway: GatewayServer) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0) as bad_key:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad_key.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert raw(gateway, "GET", "/v1/models", headers={"Authorization": ""})[0] == 401
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=MODEL_NAME, messages=HELLO, temperature=-1)
    assert "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as long:
        api.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=10_000)
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError) as typed:
        api.chat.completions.create(model=MODEL_NAME, messages=HELLO, extra_body={"n": "2"})
    assert typed.value.body["param"] == "n"
    with pytest.raises(openai.APIStatusError) as big:
        api.completions.create(model=MODEL_NAME, prompt="x" * 100_000)
    assert big.value.status_code == 413 and big.value.body["type"] == "invalid_request_error"
    status, body = raw(gateway, "GET", "/v2/nothing")
    assert status == 404 and body["error"]["message"]


BAD_BODIES = {
    "malformed JSON": (b'{"model": "tiny-chat", "prompt": ', 400),
    "raw NUL byte": (b'{"model": "tiny-chat", "prompt": "a\x00b"}', 400),
    "escaped NUL": (b'{"model": "tiny-chat", "prompt": "a\\u0000b"}', 400),
    "NUL in a message": (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\u0000"}]}', 400),
    "not UTF-8": (b'{"model": "tiny-chat", "prompt": "\xff\xfe"}', 400),
    "NaN": (b'{"model": "tiny-chat", "prompt": "a", "temperature": NaN}', 400),
    "top-level array": (b'[1, 2]', 422),
    "prompt of wrong type": (b'{"model": "tiny-chat", "prompt": {"a": 1}}', 422),
    "bool as max_tokens": (b'{"model": "tiny-chat", "prompt": "a", "max_tokens": true}', 422),
    "unknown field": (b'{"model": "tiny-chat", "prompt": "a", "temprature": 0}', 422),
    "huge n": (b'{"model": "tiny-chat", "prompt": "a", "n": 100000000}', 400),
    "huge seed": (b'{"model": "tiny-chat", "prompt": "a", "seed": 1e400}', 422),
    "token id out of range": (b'{"model": "tiny-chat", "prompt": [1, 99999999]}', 400),
    "blank prompt": (b'{"model": "tiny-chat", "prompt": "   "}', 400),
    "1 MB prompt": (json.dumps({"model": "tiny-chat", "prompt": "word " * 200_000}).encode(), 413),
    "unsupported logprobs": (b'{"model": "tiny-chat", "prompt": "a", "logprobs": 2}', 400),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_http_input_gets_a_4xx_with_a_message(gateway: GatewayServer, name: str) -> None:
    body, expected = BAD_BODIES[name]
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    started = time.monotonic()
    status, reply = raw(gateway, "POST", path, body)
    assert status == expected, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    assert time.monotonic() - started < 10
    assert gateway.app.state.gateway.admission.pending == 0


def test_serving_continues_after_bad_input(api: openai.OpenAI, gateway: GatewayServer) -> None:
    for body, _ in BAD_BODIES.values():
        raw(gateway, "POST", "/v1/completions", body)
    reply = api.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1
    status, health = raw(gateway, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["pending"] == 0


def test_full_queue_429_and_disconnect_cancels(api: openai.OpenAI, gateway: GatewayServer) -> None:
    state = gateway.app.state.gateway  # max_pending=6
    stream = api.completions.create(model=MODEL_NAME, prompt="Count:", max_tokens=200, n=4, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    assert state.admission.pending == 4
    with pytest.raises(openai.RateLimitError) as full:
        api.completions.create(model=MODEL_NAME, prompt="more", max_tokens=2, n=3)
    assert full.value.body["code"] == "rate_limit_exceeded"
    stream.close()  # the client goes away: its four generations are cancelled on the cluster
    deadline = time.monotonic() + 15
    while (state.admission.pending or state.llm.status()["running"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    status = state.llm.status()
    assert state.admission.pending == 0 and status["running"] == 0 and status["queued"] == 0
    metrics = raw_text(gateway, "/metrics")
    assert "elastic_llm_gateway_client_disconnects_total 1.0" in metrics
    assert 'elastic_llm_gateway_responses_total{code="429",route="/v1/completions"} 1.0' in metrics
    assert "elastic_llm_requests_finished" in metrics  # the controller's figures too


def raw_text(gateway: GatewayServer, path: str) -> str:
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()
