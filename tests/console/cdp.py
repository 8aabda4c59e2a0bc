"""Headless Chromium driven over the DevTools protocol with aiohttp's websocket client.

`chromium()` starts Debian's /usr/bin/chromium with `--remote-debugging-port=0`,
reads the port it picked from DevToolsActivePort in its profile directory, and
yields a `Page` connected to its first tab. `Page.send` is one CDP command and
its result; `Page.eval` runs JavaScript in the page and returns its value.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import eventually

CHROMIUM = "/usr/bin/chromium"


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.console_errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(data["params"]["exceptionDetails"]))
            elif data.get("method") == "Log.entryAdded":
                entry = data["params"]["entry"]
                if entry.get("level") == "error":
                    self.console_errors.append(entry.get("text", ""))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer["result"]  # type: ignore[no-any-return]

    async def eval(self, script: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{script}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        """Navigate and wait until the console drew its first document."""
        await self.send("Page.navigate", url=url)

        async def drawn() -> bool:
            return bool(await self.eval("document.body && document.body.dataset.loaded || ''"))

        await eventually(drawn, f"{url} to draw the console", 20, every=0.1)

    async def next_draw(self) -> None:
        """Wait for the page's next poll to be drawn."""
        before = await self.eval("document.body.dataset.loaded")

        async def redrawn() -> bool:
            return bool(await self.eval("document.body.dataset.loaded") != before)

        await eventually(redrawn, "the console to redraw", 10, every=0.1)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element, as a person's."""
        box = await self.eval(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()"""
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def screenshot(self, path: Path, *, width: int, dark: bool = False) -> None:
        await self.send(
            "Emulation.setEmulatedMedia",
            features=[{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}],
        )
        # A short viewport first, so the page's height is its content's, not the window's.
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=400,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        await self.eval("window.scrollTo(0, 0)")
        height = await self.eval("document.documentElement.scrollHeight")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=int(height),
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    assert shutil.which(CHROMIUM), "Debian's chromium is missing (apt-get install chromium)"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in a container: the sandbox needs user namespaces
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        await eventually(
            lambda: active.exists() and active.read_text().count("\n") >= 1,
            "chromium to write DevToolsActivePort",
            30,
            every=0.05,
        )
        port = int(active.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                tabs = [t for t in await r.json() if t["type"] == "page"]
            async with session.ws_connect(
                tabs[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024
            ) as ws:
                page = Page(ws)
                try:
                    await page.send("Page.enable")
                    await page.send("Runtime.enable")
                    await page.send("Log.enable")
                    yield page
                finally:
                    await page.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
