"""`workflows/spot_replay.py` refuses bad options with exit status 2 and a message, before any cluster."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[2] / "workflows" / "spot_replay.py"


def _workflow() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spot_replay_workflow", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("options", "message"), [
    (["--policies", "foo"], "unknown policy 'foo'"),
    (["--trace", "X"], "unknown trace 'X'"),
    (["--max-instances", "1"], "the smallest cap is 4"),
    (["--parallel", "a,b"], "--parallel must be"),
    (["--parallel", "3"], "parallel must be (P, M)"),
    (["--requests", "0"], "requests, max_new_tokens and max_instances must be >= 1"),
    (["--time-scale", "0"], "time scale must be > 0"),
])
def test_bad_options_exit_2_with_a_message(options: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    workflow = _workflow()
    monkeypatch.setattr(workflow, "run_policy", lambda *a, **k: pytest.fail("a replay started"))
    monkeypatch.setattr(sys, "argv", ["spot_replay.py", *options])
    with pytest.raises(SystemExit) as exited:
        workflow.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
