"""Browser check (run on demand, not in the timed suite): both fleet pages during churn, as PNGs.

Starts a LocalCluster (worker processes) of two spot instances and one on-demand instance with a
replica each, sends a bounded stream of requests, then churns the fleet: a preemption with notice,
a new spot instance, a worker killed without notice. Meanwhile it serves the Streamlit monitor and
opens both pages, the Dask dashboard's ``/fleet`` and the monitor, in headless Chromium at 1280 px
wide over the DevTools protocol, and saves full-page screenshots into ``docs/screenshots/``.

Run:  python benchmarks/browser_check.py [--model PATH] [--out docs/screenshots] [--settle 25]

Needs Debian's chromium (``apt-get install -y chromium``). Every address is loopback; the load
loop is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster
from websockets.sync.client import connect

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import G4DN_12XLARGE_SPOT_USD_PER_HOUR as SPOT_PRICE
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.checkpoint import DEFAULT_MODEL

ON_DEMAND_PRICE = 3.912
WIDTH = 1280
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page target)."""

    def __init__(self, executable: str) -> None:
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="elastic-llm-chromium-")
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={WIDTH},900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{self.port}/json/version", 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as answer:  # noqa: S310
            page = next(t for t in json.load(answer) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=2**28, open_timeout=10)
        self._ids = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        self._ids += 1
        self.socket.send(json.dumps({"id": self._ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def screenshot(self, url: str, path: Path, settle_s: float, height: int) -> None:
        """Open `url` in a `WIDTH` x `height` window (Streamlit scrolls inside its own container,
        so the window must be as tall as the page), let it render `settle_s` s, save a PNG."""
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"saved {path} ({WIDTH} x {height} px) from {url}", flush=True)

    def close(self) -> None:
        """Stop the browser."""
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


def _load(llm: ServingClient, stop: threading.Event, max_requests: int, max_seconds: float) -> None:
    """A bounded stream of short requests (at most `max_requests`, for at most `max_seconds`)."""
    started, futures = time.monotonic(), []
    for i in range(max_requests):
        if stop.is_set() or time.monotonic() - started > max_seconds:
            break
        futures.append(llm.submit([1 + i % 50, 2, 3, 4, 5], max_new_tokens=32, ignore_eos=True))
        time.sleep(0.4)
    for future in futures:
        try:
            future.result(timeout=60)
        except Exception as exc:  # noqa: BLE001 - a failed request is visible on the pages; go on
            print(f"request failed: {exc}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or checkpoint directory")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--settle", type=float, default=20.0, help="seconds each page renders before its shot")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("chromium is not installed (apt-get install -y chromium)")
    if args.settle <= 0:
        parser.error("--settle must be > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        emulator = SpotEmulator(cluster, SpotTrace("browser-check", 0.0, ()), grace_s=4.0)
        emulator.acquire("spot-1", market="spot", price_per_hour=SPOT_PRICE)
        emulator.acquire("spot-2", market="spot", price_per_hour=SPOT_PRICE)
        emulator.acquire("on-demand-1", market="on-demand", price_per_hour=ON_DEMAND_PRICE)
        options = ReplicaOptions(model=args.model, max_batch_size=4, min_step_seconds=0.02)
        with ServingClient(client, model=args.model, replica=options, chat=False) as llm:
            llm.wait_for_replicas(3, timeout=300)
            stop = threading.Event()
            loader = threading.Thread(target=_load, args=(llm, stop, 150, 60.0), daemon=True)
            loader.start()
            time.sleep(6)
            print("churn: notice for spot-1", flush=True)
            emulator.preempt("spot-1", notice=True)
            emulator.acquire("spot-3", market="spot", price_per_hour=SPOT_PRICE)
            time.sleep(6)
            print("churn: spot-2 killed without notice", flush=True)
            emulator.preempt("spot-2", notice=False)
            time.sleep(6)
            _screenshots(cluster, out, args.settle)
            stop.set()
            loader.join(timeout=120)


def _screenshots(cluster: LocalCluster, out: Path, settle_s: float) -> None:
    dashboard = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    monitor = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboards" / "app.py"), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--", "--scheduler", cluster.scheduler_address],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60)
        browser = Browser(shutil.which("chromium") or "chromium")
        browser.screenshot(f"{dashboard}/fleet", out / "dask_fleet_page.png", settle_s, height=900)
        browser.screenshot(f"http://127.0.0.1:{port}/", out / "streamlit_monitor.png", settle_s, height=2700)
    finally:
        if browser is not None:
            browser.close()
        monitor.terminate()
        monitor.wait(timeout=20)


if __name__ == "__main__":
    main()
