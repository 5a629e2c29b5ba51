"""Progress of long work in the log: a start line, a line every few seconds, and how long it took.

Long one-off steps (the first GGUF conversion, the fused-kernel build, replica start-up) would
otherwise be a minute of silence. `progress` logs through the caller's logger at WARNING, the level
Python shows by default, so a script without logging set up still sees it on stderr.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(log: logging.Logger, what: str, every_s: float = 10.0, after_s: float = 0.0,
             detail: Callable[[], str] | None = None) -> Iterator[None]:
    """Log "<what> ..." once the block has run `after_s` seconds (0: at once), then "still <what>, N s
    so far (detail)" every `every_s` seconds, and "<what>: done in N s" (or "failed after N s") at
    the end; a block shorter than `after_s` logs nothing. `detail` may say how far it got (it is
    called from a timer thread; an exception there is ignored)."""
    started = time.monotonic()
    stop = threading.Event()
    shown = threading.Event()

    def line(text: str) -> None:
        extra = ""
        if detail is not None:
            try:
                extra = f" ({detail()})"
            except Exception:  # noqa: BLE001 - a progress line must never break the work
                extra = ""
        log.warning("%s%s", text, extra)

    def announce() -> None:
        log.warning("%s ...", what)
        shown.set()

    def beat() -> None:
        if not shown.is_set():
            if stop.wait(after_s):
                return
            announce()
        while not stop.wait(every_s):
            line(f"still {what}, {time.monotonic() - started:.0f} s so far")

    if after_s <= 0:
        announce()
    ticker = threading.Thread(target=beat, name="elastic-llm-progress", daemon=True)
    ticker.start()
    try:
        yield
    except BaseException:
        stop.set()
        ticker.join(timeout=1.0)
        if shown.is_set():
            log.warning("%s: failed after %.1f s", what, time.monotonic() - started)
        raise
    stop.set()
    ticker.join(timeout=1.0)
    if shown.is_set():
        log.warning("%s: done in %.1f s", what, time.monotonic() - started)

