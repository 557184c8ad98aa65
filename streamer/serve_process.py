"""`sparrow-stream serve` as a child process: started on a free 127.0.0.1 port, watched, stopped.

    with ServeProcess(["--max-caption-tokens", "8"]) as server:
        async with CaptionClient(server.target) as client: ...
        server.rss_bytes()

Used where the server must be a process of its own: to read its memory (the soak), or to survive a
client that freezes it (the fuzz suite kills it with SIGKILL and starts another).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

_LISTENING = re.compile(r"listening on (\S+)")


def serve_command() -> list[str]:
    """The `sparrow-stream` console script beside this interpreter, or the module when it is not installed."""
    script = Path(sys.executable).parent / "sparrow-stream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamer.cli"]


class ServeProcess:
    """A `sparrow-stream serve --address 127.0.0.1:0 --http-address off ...` child; `extra_args` add flags."""

    def __init__(self, extra_args: Sequence[str] = (), start_timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.args = [*serve_command(), "serve", "--address", "127.0.0.1:0", "--http-address", "off",
                     "--log-level", "WARNING", *extra_args]
        self.start_timeout_s = start_timeout_s
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.stderr: list[str] = []  # the server's log lines, as they come

    def start(self) -> ServeProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        found: list[str] = []

        def read_listening() -> None:
            for line in self.proc.stdout:
                match = _LISTENING.search(line)
                if match:
                    found.append(match.group(1))
                    return

        reader = threading.Thread(target=read_listening, daemon=True)
        reader.start()
        reader.join(self.start_timeout_s)
        if not found:
            self.kill()
            raise RuntimeError(f"sparrow-stream serve did not start: {''.join(self.stderr)[-2000:]}")
        self.target = found[0]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """The server's resident set size now (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it has not exited within timeout_s; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
