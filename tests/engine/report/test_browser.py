"""The report opened in headless Chromium, driven through the DevTools protocol.

Checks: no console errors or uncaught exceptions, every ``<img>`` decoded with a natural
width > 0, no network request leaves the file, and a screenshot is written to
``tests/_output/report.png`` (gitignored) for a human to look at.

The DevTools client is a minimal stdlib WebSocket (RFC 6455) client: enough for text
frames of any size, masking on send, and continuation frames on receive.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.report import write_report

from ._synthetic import build_store

CHROMIUM = "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parents[3] / "tests" / "_output"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is not installed (make setup-test installs it)")


class DevTools:
    """A blocking WebSocket connection to one DevTools target."""

    def __init__(self, ws_url: str, timeout: float = 60.0) -> None:
        assert ws_url.startswith("ws://")
        hostport, _, path = ws_url[5:].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, status
        self.buf = head.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        head = bytes([0x81])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = (np.frombuffer(payload, np.uint8)
                  ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(head + mask + masked)

    def _recv_message(self) -> dict[str, Any]:
        data = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools sent a close frame")
            if opcode in (0x9, 0xA):  # ping/pong: not expected from Chromium; ignore
                continue
            data += payload
            if b0 & 0x80:
                return json.loads(data)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command; collect events until its answer arrives."""
        self.next_id += 1
        my_id = self.next_id
        self._send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = self._recv_message()
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            for ev in self.events[seen:]:
                if ev["method"] == method:
                    return ev
            seen = len(self.events)
            self.events.append(self._recv_message())
        raise TimeoutError(f"no {method} within {timeout} s")

    def close(self) -> None:
        self.sock.close()


def _http_json(port: int, path: str, method: str = "GET") -> Any:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path)
    body = conn.getresponse().read()
    conn.close()
    return json.loads(body)


@pytest.fixture()
def chromium(tmp_path):
    profile = tmp_path / "profile"
    profile.mkdir()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
         "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split("\n")[0])
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_in_chromium(port: int, page: Path, probes: dict[str, str]) -> dict[str, Any]:
    """Load ``page`` in the running Chromium; evaluate each probe (a JS expression).

    Returns ``events`` (every DevTools event seen), ``images`` (``[complete, naturalWidth,
    naturalHeight]`` per ``<img>``), ``png`` (a full-page screenshot) and each probe's value.
    """
    pages = [t for t in _http_json(port, "/json/list") if t.get("type") == "page"]
    assert pages, "chromium exposes no page target"
    dt = DevTools(pages[0]["webSocketDebuggerUrl"])
    out: dict[str, Any] = {}
    try:
        for domain in ("Runtime", "Log", "Page", "Network"):
            dt.call(f"{domain}.enable")
        dt.call("Page.navigate", url=page.resolve().as_uri())
        dt.wait_event("Page.loadEventFired")
        out["images"] = dt.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, "
            "i.naturalHeight])"))["result"]["value"]
        for name, expression in probes.items():
            out[name] = dt.call("Runtime.evaluate", returnByValue=True,
                                expression=expression)["result"].get("value")
        metrics = dt.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = dt.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                       clip={"x": 0, "y": 0, "width": size["width"],
                             "height": min(size["height"], 12000), "scale": 1})
        dt.call("Runtime.evaluate", expression="1")  # drain events queued so far
    finally:
        dt.close()
    out["png"] = base64.b64decode(shot["data"])
    out["events"] = dt.events
    return out


def check_clean_load(result: dict[str, Any], page: Path) -> None:
    """No error, no request leaving the file, every image decoded."""
    assert result["png"][:8] == b"\x89PNG\r\n\x1a\n"
    events = result["events"]
    errors = [e for e in events
              if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled"
                  and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded"
                  and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    requests = [e["params"]["request"]["url"] for e in events
                if e["method"] == "Network.requestWillBeSent"]
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    images = result["images"]
    assert len(images) == page.read_text().count("<img ")
    assert all(complete and w > 0 and h > 0 for complete, w, h in images), images


#: Top and height (CSS px, from the top of the page) of the headline figure's image.
HEADLINE_BOX = ("(() => { const r = document.querySelector('#fig-sa_depth img')"
                ".getBoundingClientRect(); return [r.top + window.scrollY, r.height]; })()")


def test_report_in_headless_chromium(tmp_path, chromium):
    n = 6
    store = build_store(tmp_path, n_cases=n, estimates={"paper": np.linspace(0.3, 0.9, n)},
                        validation={"paper": {"pearson": 0.4, "spearman": 0.5, "n": n}})
    report = write_report(store, tmp_path / "report")
    result = open_in_chromium(chromium, report, {
        "headline": HEADLINE_BOX,
        "first_section": "document.querySelector('main section').id",
        "run_open": "document.querySelector('#run details').open",
        "last_section": "Array.from(document.querySelectorAll('main section')).pop().id",
    })
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "report.png").write_bytes(result["png"])
    shutil.copy(report, OUTPUT / "report.html")
    check_clean_load(result, report)
    assert len(result["images"]) >= 5
    # the answer first: the SA-against-depth figure starts on the first screen (1,000 px),
    # and is drawn at a readable size; configuration and provenance last, closed
    top, height = result["headline"]
    assert 0 < top < 1000, result["headline"]
    assert height > 200, result["headline"]
    assert result["first_section"] == "summary"
    assert result["last_section"] == "run" and result["run_open"] is False
