"""The dashboard (swarm/dashboard): its HTTP routes over loopback (fast, one process), and the page in
headless Chromium: against a real swarm of ``swarm join`` processes (peer list and loss chart live and
matching the swarm), with hostile strings from the DHT (shown as text, never as HTML), and
reconnecting after its peer restarts.

Chromium is Debian's ``chromium`` (``.ci/run`` installs it), driven over the DevTools protocol with
aiohttp's websocket client; as root it runs with ``--no-sandbox``. It is killed by PID on teardown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import psutil
import pytest

from prometheus_client.parser import text_string_to_metric_families

from dht import get_dht_time
from swarm.dashboard.options import DEFAULT_PORT, OFF, PORT_FALLBACKS, parse_dashboard_port
from swarm.dashboard.server import DashboardError, StatusCache, start_dashboard, status_json
from swarm.metrics import Metrics
from swarm.progress import progress_key
from swarm.status import PeerView

from .dht_net import addr, net  # noqa: F401 - the fixture
from .processes import ProcessGroup, read_jsonl

STATUS_KEYS = {"version", "generated_at", "self", "runs", "peers", "progress", "history", "averaging", "stages",
               "bans"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---------------------------------------------------------------- HTTP routes (fast, in-process)

async def _dashboard(node, metrics: bool = False, **kwargs):
    view = PeerView(role="dht", state="serving")
    return await start_dashboard(node, view, Metrics(node, view, process=False) if metrics else None, port=0,
                                 **kwargs)


def _metric_names(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


async def _read_event(response: aiohttp.ClientResponse, timeout: float = 5.0) -> dict:
    """The next ``data:`` message of an event stream, parsed."""
    async def read() -> dict:
        while True:
            line = await response.content.readline()
            assert line, "the event stream ended"
            if line.startswith(b"data: "):
                return json.loads(line[6:])
    return await asyncio.wait_for(read(), timeout)


async def test_page_static_files_status_and_events(net):
    first, second = await net.many(2)
    server = await _dashboard(second, metrics=True)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url) as r:
                page = await r.text()
                assert r.status == 200 and r.content_type == "text/html"
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                assert r.headers["X-Content-Type-Options"] == "nosniff"
            for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
                assert f"/static/{name}" in page
                async with http.get(server.url + "static/" + name) as r:
                    assert r.status == 200 and r.content_type == kind and len(await r.read()) > 1000
            assert "<script>" not in page and "innerHTML" not in (await (await http.get(
                server.url + "static/dashboard.js")).text())  # no inline code, no HTML from strings
            for bad in ("static/nope.js", "static/..%2Fserver.py", "static/%2e%2e/server.py", "api/other"):
                async with http.get(server.url + bad) as r:
                    assert r.status == 404, bad

            async with http.get(server.url + "api/status") as r:
                assert r.status == 200 and r.content_type == "application/json"
                status = await r.json()
            assert set(status) == STATUS_KEYS and status["version"] == 1
            assert status["self"]["peer_id"] == str(second.peer_id) and status["self"]["role"] == "dht"
            assert status["self"]["addresses"] == [str(a) for a in second.p2p.get_visible_addresses()]
            assert abs(status["generated_at"] - time.time()) < 5

            async with http.get(server.url + "events") as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                one = await _read_event(r)
                two = await _read_event(r, timeout=3.0)  # one a second
            assert set(one) == STATUS_KEYS and two["generated_at"] > one["generated_at"]

            async with http.get(server.url + "metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                names = _metric_names(await r.text())
            assert {"swarm_dht_routing_table_peers", "swarm_dht_records", "swarm_bytes_sent"} <= names
    finally:
        await server.close()


async def test_a_flood_of_viewers_builds_the_status_once_a_second(net):
    node = (await net.many(1))[0]
    server = await _dashboard(node, max_sse_clients=4)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "metrics") as r:
                assert r.status == 404  # this one was given no metrics
            streams = [await http.get(server.url + "events") for _ in range(4)]
            async with http.get(server.url + "events") as r:  # one too many
                assert r.status == 503 and "too many dashboard viewers" in await r.text()
            started, builds = time.monotonic(), server.status.builds
            while time.monotonic() - started < 2.5:
                answers = await asyncio.gather(*(http.get(server.url + "api/status") for _ in range(20)))
                assert all(a.status == 200 for a in answers)
                for a in answers:
                    a.release()
            for s in streams:
                assert (await _read_event(s))["version"] == 1
            assert server.status.builds - builds <= 4  # 2.5 s: at most one build a second (plus one)
            streams[0].close()  # a viewer leaves: its slot frees at the stream's next message (1 s)
            deadline = time.monotonic() + 5
            while True:
                async with http.get(server.url + "events") as r:
                    if r.status == 200:
                        await _read_event(r)
                        break
                assert time.monotonic() < deadline, "the slot of the viewer that left was not freed"
                await asyncio.sleep(0.2)
            started = time.monotonic()
            await server.close()  # open streams do not hold the shutdown
            assert time.monotonic() - started < 3
            for s in streams[1:]:
                s.close()
    finally:
        await server.close()


async def test_other_host_names_are_refused_on_loopback(net):
    node = (await net.many(1))[0]
    server = await _dashboard(node)
    try:
        async with aiohttp.ClientSession() as http:
            for host, expected in ((f"localhost:{server.port}", 200), (f"127.0.0.1:{server.port}", 200),
                                   ("[::1]", 200), ("evil.example", 403), (f"attacker.test:{server.port}", 403)):
                async with http.get(server.url + "api/status", headers={"Host": host}) as r:
                    assert r.status == expected, host
    finally:
        await server.close()


async def test_ports_default_fallback_explicit_and_busy(net):
    node = (await net.many(1))[0]
    first = await start_dashboard(node, None, None)  # the default: 7780 or the next free one
    second = await start_dashboard(node, None, None)
    try:
        assert first.port != second.port
        for s in (first, second):
            assert DEFAULT_PORT <= s.port <= DEFAULT_PORT + PORT_FALLBACKS or s.port > 1024
        with pytest.raises(DashboardError, match=rf"127\.0\.0\.1:{first.port}.*--dashboard-port"):
            await start_dashboard(node, None, None, port=first.port)  # an explicit port is that port or nothing
        with pytest.raises(DashboardError, match="cannot serve the dashboard on 192.0.2.1"):
            await start_dashboard(node, None, None, host="192.0.2.1", port=0)  # not an address of this machine
    finally:
        await first.close()
        await second.close()
    assert parse_dashboard_port("off") == OFF and parse_dashboard_port("auto") is None
    assert parse_dashboard_port("0") == 0 and parse_dashboard_port("8080") == 8080
    for bad in ("-1", "65536", "x" * 1000, ""):
        with pytest.raises(ValueError, match="--dashboard-port must be"):
            parse_dashboard_port(bad)


async def test_status_cache_serves_the_last_good_status_and_null_for_nan():
    calls = []

    async def source() -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the DHT lookup failed")
        return {"version": 1, "loss": float("nan"), "t": (1.0, float("inf"))}

    now = [0.0]
    cache = StatusCache(source, interval=1.0, clock=lambda: now[0])
    first = await cache.get()
    assert json.loads(first) == {"version": 1, "loss": None, "t": [1.0, None]}
    assert await cache.get() is first and len(calls) == 1  # within the interval: cached
    now[0] = 1.5
    assert await cache.get() is first and len(calls) == 2  # the build failed: the last good one
    now[0] = 3.0
    assert await cache.get() == first and len(calls) == 3
    assert b"\n" not in status_json({"cause": "two\nlines"})  # an SSE data line stays one line

    async def failing() -> dict:
        raise RuntimeError("no DHT")

    with pytest.raises(DashboardError, match="no status yet"):
        await StatusCache(failing).get()


def test_dashboard_flags_of_join_and_dht():
    from swarm.cli import build_parser

    parser = build_parser()
    for command in (["dht"], ["join", "task.py"]):
        args = parser.parse_args(command)
        assert args.dashboard_port is None and args.dashboard_host == "127.0.0.1"
        args = parser.parse_args([*command, "--dashboard-port", "off", "--dashboard-host", "0.0.0.0"])
        assert args.dashboard_port == OFF and args.dashboard_host == "0.0.0.0"
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--dashboard-port", "lots"])


@pytest.mark.slow
def test_swarm_dht_serves_the_dashboard_and_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "swarm", "dht", "--host", "127.0.0.1", "--dashboard-port",
                                 str(port)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 6, result.stderr
        assert f"cannot serve the dashboard on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    with ProcessGroup(tmp_path) as group:
        group.spawn("dht", ["-m", "swarm", "dht", "--host", "127.0.0.1", "--dashboard-port", "0"])
        url = group.wait_for("dht", r"dashboard: (http://127\.0\.0\.1:\d+/)", timeout=30).group(1)
        status = json.loads(_get(url + "api/status"))
        assert status["self"]["role"] == "dht" and status["runs"] == [] and status["progress"]["run_id"] is None
        assert "swarm_dht_routing_table_peers" in _metric_names(_get(url + "metrics"))


def _get(url: str, timeout: float = 10.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
        return r.read().decode()


# ---------------------------------------------------------------- headless Chromium over DevTools

class Browser:
    """Headless Chromium driven over the DevTools protocol: ``open(url)``, ``evaluate(js)``,
    ``screenshot(path)``; ``errors`` collects the page's exceptions, console errors and CSP reports."""

    def __init__(self, proc: subprocess.Popen, http: aiohttp.ClientSession, ws, log: Path):
        self.proc, self.http, self.ws, self.log = proc, http, ws, log
        self.errors: list[str] = []
        self._next = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def launch(cls, directory: Path, width: int = 1400, height: int = 1100) -> "Browser":
        directory.mkdir(parents=True, exist_ok=True)
        profile, log = directory / "profile", directory / "chromium.log"
        args = [CHROMIUM, "--headless=new", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
                f"--window-size={width},{height}", "about:blank"]
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a reused profile: not an old port
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
        with open(log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        http = aiohttp.ClientSession()
        try:
            deadline = time.monotonic() + 60
            port_file = profile / "DevToolsActivePort"
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                assert proc.poll() is None, f"chromium exited ({proc.returncode}):\n{log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"chromium did not start:\n{log.read_text()[-2000:]}"
                await asyncio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json(content_type=None) if t.get("type") == "page"]
            ws = await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20)
            browser = cls(proc, http, ws, log)
            await browser.send("Runtime.enable")
            await browser.send("Log.enable")
            await browser.send("Page.enable")
            await browser.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                               deviceScaleFactor=1, mobile=False)
            return browser
        except BaseException:
            await http.close()
            _kill_tree(proc)
            raise

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(data["params"]["exceptionDetails"])[:1000])
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"].get("type") == "error":
                self.errors.append(json.dumps(data["params"].get("args"))[:1000])
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"].get("level") == "error":
                entry = data["params"]["entry"]
                if "/events" not in entry.get("url", "") and "ERR_CONNECTION_REFUSED" not in entry.get("text", ""):
                    self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}"[:1000])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the DevTools connection closed"))

    async def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, timeout)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && document.getElementById('peers-body') !== null",
                            timeout=30)

    async def wait_for(self, expression: str, timeout: float, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.evaluate(PAGE_STATE)
                raise AssertionError(f"the page did not show {what or expression} within {timeout} s: {state}; "
                                     f"errors: {self.errors}")
            await asyncio.sleep(0.25)

    async def screenshot(self, path: Path) -> bytes:
        height = await self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        await self.send("Emulation.setDeviceMetricsOverride", width=1400, height=min(int(height), 4000),
                        deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(0.5)  # the charts redraw at the new size
        png = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(png)
        return png

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        await self.http.close()
        _kill_tree(self.proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill chromium and the helper processes it started, each by its PID."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [proc, *children]:
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            os.kill(p.pid, 9)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def browser_session(directory: Path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    browser = await Browser.launch(directory)
    try:
        yield browser
    finally:
        await browser.close()


# What the page shows, read from the DOM and the canvases (the loss chart's pixels in its colour).
PAGE_STATE = """(() => {
  const rows = [...document.querySelectorAll('#peers-body tr')];
  const loss = document.getElementById('chart-loss');
  const px = loss.getContext('2d').getImageData(0, 0, loss.width, loss.height).data;
  let blue = 0;
  for (let i = 0; i < px.length; i += 4) if (Math.abs(px[i] - 47) < 30 && Math.abs(px[i + 1] - 111) < 30
      && Math.abs(px[i + 2] - 219) < 30 && px[i + 3] > 100) blue++;
  return {updates: Number(document.body.dataset.updates), connection: document.getElementById('connection').className,
          peerCount: document.getElementById('peer-count').textContent,
          peers: rows.map(r => ({id: r.dataset.peerId, state: r.dataset.state, text: r.cells[0].textContent,
                                 sps: r.cells[3].textContent})),
          epoch: document.getElementById('epoch').textContent, loss: document.getElementById('loss').textContent,
          lossPoints: Number(loss.dataset.points), lossLast: loss.dataset.last, lossPixels: blue,
          spsPoints: Number(document.getElementById('chart-sps').dataset.points),
          rounds: document.querySelectorAll('#rounds-body tr').length,
          images: document.querySelectorAll('img').length, title: document.title};
})()"""



def _page_shows(condition: str) -> str:
    """JS: the page state (PAGE_STATE) if ``condition`` (on ``s``, the state) holds, else null."""
    return f"(() => {{ const s = {PAGE_STATE}; return ({condition}) ? s : null; }})()"


# 64 samples an epoch in batches of 16, each batch 1.5 s to load: with two peers an epoch takes 3 s or
# more, so the page's epoch (up to ~3 s behind) is within one of the peers' own.
PACED_TASK = textwrap.dedent("""
    import time
    import torch
    from swarm import Task

    def data(shard, num_shards, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.arange(1.0, 5.0)
        while True:
            time.sleep(1.5)
            x = torch.randn(batch_size, 4, generator=g)
            yield x, x @ w + 0.1 * torch.randn(batch_size, generator=g)

    task = Task(name="paced", model=lambda: torch.nn.Linear(4, 1),
                optimizer=lambda p: torch.optim.Adam(p, lr=0.05), data=data,
                loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]).sum(-1), b[1]),
                batch_size=16, target_batch_size=64)
""")


def _max_epoch(paths: list[Path]) -> int:
    return max((r["epoch"] for p in paths for r in read_jsonl(p)), default=0)


@pytest.mark.slow
async def test_the_page_shows_a_live_swarm_in_chromium(tmp_path):
    task = tmp_path / "paced_task.py"
    task.write_text(PACED_TASK)
    metrics = [tmp_path / f"peer{i}.jsonl" for i in range(2)]
    with ProcessGroup(tmp_path / "logs") as group:
        group.spawn("bootstrap", ["-m", "swarm", "dht", "--host", "127.0.0.1", "--dashboard-port", "0"])
        bootstrap = await asyncio.to_thread(group.wait_for, "bootstrap", r"--initial-peers (/ip4/127\.0\.0\.1/\S+)", 30)
        for i in range(2):
            group.spawn(f"peer{i}", ["-m", "swarm", "join", str(task), "--host", "127.0.0.1", "--threads", "1",
                                     "--identity", str(tmp_path / f"peer{i}.key"), "--quiet", "--matchmaking-time",
                                     "0.5", "--metrics-file", str(metrics[i]), "--dashboard-port", "0",
                                     "--initial-peers", bootstrap.group(1)])
        peer_ids = set()
        for i in range(2):
            peer_ids.add((await asyncio.to_thread(group.wait_for, f"peer{i}", r"^peer (\S+)", 90)).group(1))
        url = (await asyncio.to_thread(group.wait_for, "peer0", r"^dashboard: (http://127\.0\.0\.1:\d+/)", 30)).group(1)
        started = time.monotonic()
        async with browser_session(tmp_path / "chromium") as browser:
            await browser.open(url)
            await browser.wait_for(_page_shows("s.peerCount === '2' && Number(s.epoch) >= 2 && s.lossPoints >= 3 "
                                               "&& s.lossPixels > 30 && s.rounds > 0"), timeout=120,
                                   what="2 peers, epoch 2, a loss curve and averaging rounds")
            before = _max_epoch(metrics)
            state = await browser.evaluate(PAGE_STATE)
            after = _max_epoch(metrics)
            # the swarm's real state: our two peers, online, at the epoch they wrote in their metrics files
            assert state["peerCount"] == "2"
            assert {p["id"] for p in state["peers"] if p["state"] != "left"} == peer_ids
            assert {p["text"] for p in state["peers"]} == peer_ids
            assert before - 1 <= int(state["epoch"]) <= after + 1, (state["epoch"], before, after)
            # the loss shown is the swarm's: within the range of the losses the peers wrote
            losses = [r["loss"] for p in metrics for r in read_jsonl(p) if r.get("loss") is not None]
            assert losses and min(losses) / 2 <= float(state["loss"]) <= max(losses) * 2, (state["loss"], losses)
            assert math.isfinite(float(state["lossLast"])) and float(state["lossLast"]) > 0
            assert state["connection"].endswith("live")
            # live: the charts grow while we watch
            await browser.wait_for(f"Number(document.getElementById('chart-loss').dataset.points) > "
                                   f"{state['lossPoints']} && Number(document.body.dataset.updates) > "
                                   f"{state['updates']}", timeout=10, what="new points")
            exported = await asyncio.to_thread(_get, url + "metrics")  # the peer's Prometheus text
            assert {"swarm_epoch", "swarm_loss", "swarm_averaging_rounds"} <= _metric_names(exported)
            png = await browser.screenshot(tmp_path / "dashboard.png")
            assert png.startswith(b"\x89PNG") and len(png) > 20_000
            assert browser.errors == []
        seconds = time.monotonic() - started
        # the bootstrap's dashboard covers the whole swarm
        url = (await asyncio.to_thread(group.wait_for, "bootstrap", r"^dashboard: (http://127\.0\.0\.1:\d+/)", 5)).group(1)
        status = json.loads(await asyncio.to_thread(_get, url + "api/status"))
        assert [(r["run_id"], r["peers"]) for r in status["runs"]] == [("paced", 2)]
        assert status["self"]["role"] == "dht"
    print(f"browser part: {seconds:.1f} s")


HOSTILE_ID = '<img src=x onerror="document.title=\'pwned\'">'
HOSTILE_CAUSE = "<script>document.title='pwned'</script><b>bold</b>"


async def test_the_page_shows_hostile_strings_as_text_and_reconnects(net, tmp_path):
    viewer, attacker = await net.many(2)
    # a peer's own signed progress record, with markup for its peer id
    record = {"peer_id": HOSTILE_ID, "epoch": 3, "samples": 10, "samples_per_second": 5.0, "loss": 0.5,
              "time": get_dht_time(), "client_mode": False}
    assert await attacker.store(progress_key("evil-run"), record, get_dht_time() + 60,
                                subkey=attacker.signature_validator.ownership_marker)
    rounds = [{"t": time.time(), "group_size": 3, "seconds": 1.5, "bytes_sent": 1000, "bytes_received": 900,
               "result": "failed", "cause": HOSTILE_CAUSE, "epoch": 3}]
    view = PeerView(role="trainer", run_id="evil-run", state="training", optimizer=SimpleNamespace(rounds=rounds))
    server = await start_dashboard(viewer, view, None, port=0)
    port = server.port
    try:
        async with browser_session(tmp_path / "chromium") as browser:
            await browser.open(server.url)
            state = await browser.wait_for(_page_shows("s.peers.length === 1 && s.rounds === 1"), timeout=30,
                                           what="the hostile peer")
            assert state["peers"][0]["text"] == HOSTILE_ID and state["peers"][0]["id"] == HOSTILE_ID
            cause = await browser.evaluate("document.querySelector('#rounds-body tr').cells[6].textContent")
            assert cause == HOSTILE_CAUSE
            assert state["images"] == 0 and state["title"] != "pwned"
            assert await browser.evaluate("document.querySelectorAll('#rounds-body b, #rounds-body script').length") == 0

            # the peer goes away: the page says so; it comes back on the same port: the page is live again
            await server.close()
            await browser.wait_for("document.getElementById('connection').classList.contains('down')", timeout=10,
                                   what="the lost connection")
            updates = await browser.evaluate("Number(document.body.dataset.updates)")
            server = await start_dashboard(viewer, view, None, port=port)
            await browser.wait_for(f"Number(document.body.dataset.updates) > {updates} && "
                                   "document.getElementById('connection').classList.contains('live')", timeout=15,
                                   what="updates after the restart")
            assert (await browser.evaluate("document.title")) != "pwned"

            # a new record in the DHT shows on the page within 5 s (the bound on the lag)
            assert await browser.evaluate("document.getElementById('epoch').textContent") == "3"
            stored = time.monotonic()
            assert await attacker.store(progress_key("evil-run"), dict(record, epoch=7, time=get_dht_time()),
                                        get_dht_time() + 60, subkey=attacker.signature_validator.ownership_marker)
            await browser.wait_for("document.getElementById('epoch').textContent === '7'", timeout=10,
                                   what="the new epoch")
            assert time.monotonic() - stored < 5
            assert browser.errors == []
    finally:
        await server.close()
