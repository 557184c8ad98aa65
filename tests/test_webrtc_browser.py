"""The live-captioning page in a real browser: headless Debian chromium with a fake camera playing a world
clip (.y4m) opens the page on 127.0.0.1, clicks Start, and final captions appear in the page's DOM.

Chromium is driven over the DevTools protocol with aiohttp's websocket client (no extra dependency).
Without a chromium binary the test is skipped, with the reason (`.ci/run` installs it with apt).
A screenshot is saved in the test's tmp dir and copied to out/webrtc-page.png.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from service_support import run_with_server
from streamer.server import SparrowServer
from streamer.webrtc import WebRTCOptions

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CLIP_SECONDS = 8.0
CLIP_FPS = 10.0
FIRST_FINAL_WITHIN_S = 45.0  # page load + camera + ICE/DTLS + a 4 s segment + the caption, on a shared 2-core CPU
OUT_DIR = Path(__file__).resolve().parents[1] / "out"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary: apt-get install chromium (the browser test needs it)"
)


def world_y4m(path: Path, seed: int = 5, size: int = 160) -> Path:
    """A world clip as YUV4MPEG2 for chromium's fake camera (which loops it)."""
    from sparrow_core.world.episode import iter_segments
    from sparrow_core.world.video_io import write_y4m

    frames = (f for seg in iter_segments(seed, CLIP_SECONDS, CLIP_FPS, size) for f in seg.frames)
    write_y4m(path, frames, fps=CLIP_FPS)
    return path


class DevTools:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.console: list[str] = []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            if msg.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in msg["params"]["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


async def launch(tmp: Path, y4m: Path) -> tuple[asyncio.subprocess.Process, int]:
    profile = tmp / "profile"
    profile.mkdir()
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-quic", "--mute-audio", "--no-default-browser-check", f"--user-data-dir={profile}",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={y4m}",
        "--allow-loopback-in-peer-connection",  # ICE host candidates on 127.0.0.1, like the server's
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1280,860",
        "about:blank",
    ]
    log = open(tmp / "chromium.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log, env={**os.environ, "LANG": "C"})
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.is_file() and port_file.read_text().strip()):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"chromium did not start: {(tmp / 'chromium.log').read_text()[-2000:]}")
        await asyncio.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


def test_page_in_headless_chromium_shows_live_captions(engine, tmp_path) -> None:
    y4m = world_y4m(tmp_path / "camera.y4m")
    shot = tmp_path / "webrtc-page.png"

    async def body(server: SparrowServer, target: str) -> None:
        url = f"http://127.0.0.1:{server.http_port}/"
        proc, devtools_port = await launch(tmp_path, y4m)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
                    page = next(t for t in await r.json() if t["type"] == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    cdp = DevTools(ws)
                    await cdp.call("Runtime.enable")
                    await cdp.call("Page.enable")
                    await cdp.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1,
                                   mobile=False)
                    await cdp.call("Page.navigate", url=url)
                    await until(cdp, "document.readyState === 'complete' && "
                                "document.getElementById('model').textContent !== ''", 20, "the page to load")
                    t0 = time.monotonic()
                    await cdp.js("document.getElementById('start').click()")
                    await until(cdp, "document.getElementById('state').textContent === 'connected'", 20,
                                "the connection")
                    await until(cdp, "document.querySelectorAll('#transcript li.final').length >= 2",
                                FIRST_FINAL_WITHIN_S + 5, "two final captions in the DOM")
                    first_two_s = time.monotonic() - t0
                    assert server.streams_open == 1
                    page_state = await cdp.js("""({
                        finals: [...document.querySelectorAll('#transcript li.final span')].map(e => e.textContent),
                        times: [...document.querySelectorAll('#transcript li.final time')].map(e => e.textContent),
                        overlay: document.getElementById('final-line').textContent,
                        overlayColour: getComputedStyle(document.getElementById('final-line')).color,
                        interimColour: getComputedStyle(document.getElementById('interim-line')).color,
                        lag: document.getElementById('stat-lag').textContent,
                        tau: document.getElementById('stat-tau').textContent,
                        video: document.getElementById('video').videoWidth,
                    })""")
                    # let the video element paint a frame, then take the picture
                    await asyncio.sleep(0.5)
                    png = await cdp.call("Page.captureScreenshot", format="png")
                    shot.write_bytes(base64.b64decode(png["data"]))
                    # Stop: the pending caption, the stream's end, then the connection closes
                    await cdp.js("document.getElementById('start').click()")
                    await until(cdp, "document.getElementById('state').textContent === 'idle'", 20, "stop")
                    await wait_for(lambda: server.streams_open == 0 and not server.webrtc.sessions, 15,
                                   "the stream to be freed")
                    # closing the tab with a stream open ends that stream too
                    await cdp.js("document.getElementById('start').click()")
                    await until(cdp, "document.getElementById('state').textContent === 'connected'", 20,
                                "the second connection")
                    assert server.streams_open == 1
                    await cdp.call("Page.navigate", url="about:blank")
                    await wait_for(lambda: server.streams_open == 0 and not server.webrtc.sessions, 40,
                                   "the stream to be freed after the tab went away")
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

        print(f"first two finals after {first_two_s:.1f}s: {page_state}")
        assert len(page_state["finals"]) >= 2 and page_state["overlay"] == page_state["finals"][-1]
        assert page_state["overlayColour"] == "rgb(255, 255, 255)"  # finals in white
        assert page_state["interimColour"] != page_state["overlayColour"]  # interims in grey
        assert page_state["lag"].endswith(" s") and page_state["video"] > 0
        assert first_two_s < FIRST_FINAL_WITHIN_S + 5

    try:
        run_with_server(engine, body, http=WebRTCOptions(address="127.0.0.1:0", ice_hosts=("127.0.0.1",)))
    except BaseException:
        log = tmp_path / "chromium.log"
        if log.is_file():
            print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        if shot.is_file():
            OUT_DIR.mkdir(exist_ok=True)
            shutil.copy(shot, OUT_DIR / shot.name)


async def until(cdp: DevTools, expression: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cdp.js(expression):
        if time.monotonic() > deadline:
            message = await cdp.js("document.getElementById('message')?.textContent")
            raise AssertionError(f"timed out waiting for {what}; page says {message!r}; console: {cdp.console[-10:]}")
        await asyncio.sleep(0.2)


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
