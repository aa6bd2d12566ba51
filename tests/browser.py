"""A page opened in headless Chromium over the DevTools protocol, for tests of HTML output.

Chromium is Debian's `chromium` package (`.ci/run` installs it). The test talks to it over
its DevTools WebSocket with aiohttp (already a dependency of the relay): it collects
console errors, uncaught exceptions and every network request, counts the drawn marks of
each chart, and keeps a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1200,900"]
START_TIMEOUT = 30.0
LOAD_TIMEOUT = 30.0

# For every `figure.chart`: its marks (elements with an id "marks-...") that have a size.
COUNT_MARKS = """
JSON.stringify(Array.from(document.querySelectorAll('figure.chart'), (figure, i) => {
  const title = figure.previousElementSibling.previousElementSibling.textContent;
  const drawn = Array.from(figure.querySelectorAll('[id^="marks-"]')).filter(mark => {
    const box = mark.getBBox();
    return box.width > 0 || box.height > 0;
  });
  return [title, drawn.length];
}))
"""


@dataclass
class PageSeen:
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    charts: dict[str, int] = field(default_factory=dict)


def chromium() -> str:
    """The browser's path; skips the calling test, saying why, where there is none."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; "
                ".ci/run installs it): the report is not checked in a browser")


def open_in_chromium(page: Path, profile: Path, *, screenshot: Path) -> PageSeen:
    """Load `page` in a fresh profile and report what the browser saw."""
    binary = chromium()
    profile.mkdir()
    process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = _devtools_port(profile, process)
        return asyncio.run(_inspect(port, page, screenshot))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _devtools_port(profile: Path, process: subprocess.Popen[bytes]) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"chromium exited with status {process.returncode}"
        if marker.exists() and (lines := marker.read_text().splitlines()):
            return int(lines[0])
        time.sleep(0.05)
    raise AssertionError("chromium did not open its DevTools port")


class _Session:
    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket, self.next_id = socket, 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.socket.send_str(json.dumps({"id": self.next_id, "method": method,
                                               "params": params}))
        while True:
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return dict(message.get("result", {}))
            self.events.append(message)

    async def wait_for(self, method: str) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(json.loads((await self.socket.receive()).data))


async def _inspect(port: int, page: Path, screenshot: Path) -> PageSeen:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
            targets = await answer.json()
        target = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            session = _Session(socket)
            for domain in ("Page", "Runtime", "Log", "Network"):
                await session.call(f"{domain}.enable")
            await session.call("Page.navigate", url=page.as_uri())
            await asyncio.wait_for(session.wait_for("Page.loadEventFired"), LOAD_TIMEOUT)
            counted = await session.call("Runtime.evaluate", expression=COUNT_MARKS,
                                         returnByValue=True)
            shot = await session.call("Page.captureScreenshot", format="png",
                                      captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
    seen = PageSeen(charts=dict(json.loads(counted["result"]["value"])))
    for event in session.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            seen.errors.append(str(params["exceptionDetails"].get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            seen.errors.append(json.dumps(params.get("args")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            seen.errors.append(str(params["entry"].get("text")))
        elif method == "Network.requestWillBeSent":
            seen.requests.append(params["request"]["url"])
    return seen
