"""A deployment from the command lines: `dask scheduler`, a `dask worker` process that
announces its market and price through the `elastic_llm.cluster.instance` preload, and
`elastic-llm serve --scheduler-file` serving through the endpoint; then SIGTERM drains the
running stream (it finishes whole) and the server exits 0. All on 127.0.0.1."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from distributed import Client

from elastic_llm.cluster.instance import get_fleet_info

from .conftest import MODEL_NAME

PYTHON = sys.executable
DASK = str(Path(sys.executable).with_name("dask"))
ROOT = Path(__file__).resolve().parents[2]


class Process:
    """A child process whose output lines are read on a thread (so waiting is bounded)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed within {timeout} s:\n" + "".join(self.seen[-30:]))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)


@pytest.fixture()
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.mark.timeout(180)
def test_dask_cli_cluster_serves_and_sigterm_drains(processes: list[Process], chat_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    scheduler_file = str(tmp_path / "scheduler.json")
    processes.append(Process([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                              "--scheduler-file", scheduler_file], env))
    processes[-1].wait_for("Scheduler at", 60)
    worker_env = {**env, "ELASTIC_LLM_MARKET": "spot", "ELASTIC_LLM_PRICE_PER_HOUR": "1.9",
                  "ELASTIC_LLM_INSTANCE_ID": "spot-1", "ELASTIC_LLM_MEMORY_BYTES": str(2**30)}
    processes.append(Process([DASK, "worker", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
                              "--nthreads", "1", "--no-dashboard", "--name", "spot-1",
                              "--preload", "elastic_llm.cluster.instance"], worker_env))
    processes[-1].wait_for("Registered to", 60)
    with Client(scheduler_file=scheduler_file, timeout=30) as client:
        fleet = {info.instance_id: (info.market, info.price_per_hour, info.memory_bytes)
                 for info in get_fleet_info(client).values()}
    assert fleet == {"spot-1": ("spot", 1.9, 2**30)}

    server = Process([PYTHON, "-m", "elastic_llm.cli", "serve", "--scheduler-file", scheduler_file,
                      "--model", str(chat_checkpoint), "--served-model-name", MODEL_NAME, "--port", "0",
                      "--min-step-seconds", "0.03", "--drain-timeout", "60", "--log-level", "warning"], env)
    processes.append(server)
    url = server.wait_for("serving", 120).split(" on ")[-1].strip()
    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    reply = api.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens >= 1

    stream = api.completions.create(model=MODEL_NAME, prompt="Count to ten:", max_tokens=120, temperature=0,
                                    stream=True, stream_options={"include_usage": True},
                                    extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    server.popen.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish whole
    rest = list(chunks)
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 120
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert first.choices[0].text or rest
    assert server.popen.wait(timeout=60) == 0
    server.wait_for("stopped", 10)
    with pytest.raises(openai.APIConnectionError):
        api.models.list()
