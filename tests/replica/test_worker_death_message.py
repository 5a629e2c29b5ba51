"""A worker that dies names the likeliest cause: a script without a main guard."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from elastic_llm.engine.replica.process import died_message, unguarded_main_script


class _Dead:
    name = "w3"

    def __init__(self, code: int) -> None:
        self.process = types.SimpleNamespace(exitcode=code)

    def exit_text(self) -> str:
        return f"exit code {self.process.exitcode}"


def _main(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    module: Any = types.ModuleType("__main__")
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, "__main__", module)


def test_a_script_without_a_main_guard_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "serve.py"
    script.write_text("from elastic_llm import LLMEngine\nLLMEngine('m', parallel=(3, 2))\n")
    _main(monkeypatch, script)
    assert unguarded_main_script() == str(script)
    message = died_message(_Dead(1), "start")  # type: ignore[arg-type]
    assert message.startswith("worker w3 died during 'start' (exit code 1); ")
    assert str(script) in message and 'if __name__ == "__main__":' in message
    assert "guard" not in died_message(_Dead(-9), "start")  # killed by a signal: another cause


def test_a_guarded_script_or_no_script_gets_the_plain_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "serve.py"
    script.write_text("if __name__ == '__main__':\n    pass\n")
    _main(monkeypatch, script)
    assert unguarded_main_script() is None
    assert died_message(_Dead(1), "start") == "worker w3 died during 'start' (exit code 1)"
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a REPL: no __file__
    assert unguarded_main_script() is None


def test_parallel_config_is_exported_from_the_package() -> None:
    import elastic_llm
    from elastic_llm.planning.config import ParallelConfig

    assert elastic_llm.ParallelConfig is ParallelConfig and "ParallelConfig" in elastic_llm.__all__
