"""`progress`: a start line, heartbeats while the work runs, the time it took; quiet when short."""

from __future__ import annotations

import logging
import time

import pytest

from elastic_llm.progress import progress

log = logging.getLogger("elastic_llm.test_progress")


def test_long_work_logs_a_start_heartbeats_and_its_duration(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=log.name), \
            progress(log, "building kernels", every_s=0.05, detail=lambda: "3 of 5 files"):
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "building kernels ..."
    assert any(m.startswith("still building kernels") and m.endswith("(3 of 5 files)") for m in lines[1:-1])
    assert lines[-1].startswith("building kernels: done in 0.")


def test_short_work_under_after_s_is_silent_and_a_failure_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=log.name):
        with progress(log, "waiting for replicas", after_s=5.0):
            pass
        assert not caplog.records
        with pytest.raises(RuntimeError), progress(log, "converting", every_s=10.0):
            raise RuntimeError("broken file")
    assert [r.getMessage().split(" after")[0] for r in caplog.records] == ["converting ...", "converting: failed"]
