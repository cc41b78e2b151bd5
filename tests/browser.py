"""Open a local HTML file in headless Chromium with networking off and report what the page did.

Chromium (Debian's ``chromium``) starts with a proxy that leads nowhere and every host name
mapped to "not found", so nothing can leave the machine even if the page asked. Over the
DevTools protocol (``websockets``) the page is loaded from ``file://`` and this records every
request it made, every console error and uncaught exception, and each image's decoded size,
then takes a screenshot.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PageVisit", "visit"]


@dataclass
class PageVisit:
    """What a page did when loaded.

    Args:
        requests: URLs requested other than the page itself and ``data:`` URIs.
        errors: console errors, uncaught exceptions and error log entries.
        images: ``(id, complete, natural width, natural height)`` per ``<img>``.
        screenshot: where the PNG screenshot was written.
    """

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    images: list[tuple[str, bool, int, int]] = field(default_factory=list)
    screenshot: Path | None = None


class _Cdp:
    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self._ws = connect(url, max_size=64 << 20, open_timeout=20)
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            self.events.append(msg)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout_s: float = 30.0) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(method)

    def close(self) -> None:
        self._ws.close()


def visit(page: Path, workdir: Path, screenshot: Path) -> PageVisit:
    """Load ``page`` in headless Chromium without network; record what it did.

    Raises:
        AssertionError: chromium is not installed (``make test`` installs it).
    """
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed (apt-get install chromium; make test installs it)"
    profile = workdir / "chromium-profile"
    log_path = workdir / "chromium.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1200,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log_path.read_text(errors="replace")):
                port = int(m.group(1))
            elif proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}: {log_path.read_text(errors='replace')}")
            else:
                time.sleep(0.1)
        assert port is not None, "chromium did not open its DevTools port within 60 s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=20) as resp:
            targets = json.load(resp)
        target = next(t for t in targets if t.get("type") == "page")
        cdp = _Cdp(target["webSocketDebuggerUrl"])
        try:
            for domain in ("Page", "Network", "Runtime", "Log"):
                cdp.call(f"{domain}.enable")
            url = page.resolve().as_uri()
            cdp.call("Page.navigate", url=url)
            cdp.wait_event("Page.loadEventFired", timeout_s=60)
            images = cdp.call(
                "Runtime.evaluate",
                expression="JSON.stringify(Array.from(document.images).map("
                "i => [i.id, i.complete, i.naturalWidth, i.naturalHeight]))",
                returnByValue=True,
            )
            shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, timeout_s=60)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            visit = PageVisit(screenshot=screenshot)
            visit.images = [tuple(i) for i in json.loads(images["result"]["value"])]  # type: ignore[misc]
            for e in cdp.events:
                method, params = e.get("method"), e.get("params", {})
                if method == "Network.requestWillBeSent":
                    requested = params["request"]["url"]
                    if requested != url and not requested.startswith("data:"):
                        visit.requests.append(requested)
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    visit.errors.append(json.dumps(params.get("args")))
                elif method == "Runtime.exceptionThrown":
                    visit.errors.append(json.dumps(params.get("exceptionDetails")))
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    visit.errors.append(params["entry"].get("text", ""))
            return visit
        finally:
            cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
