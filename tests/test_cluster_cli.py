"""`sparrow-stream cluster` as a process of its own, one replica on a local Ray: SIGTERM to its process group
(what `timeout`, `kill -- -PGID` or a supervisor sends) stops it with status 0 and leaves none of the Ray
processes it started. Before streamer/cluster/session.py, the group's SIGTERM killed the GCS and the raylet
too, and the driver waited ~60 s for the GCS, then exited 1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

from service_support import model_dir
from streamer.serve_process import serve_command

HANG_GUARD_S = 180.0  # start, and then the stop: only a hang guard, each takes seconds


def process_table() -> dict[int, tuple[str, str, int, int]]:
    """pid -> (name, state, parent pid, start time in clock ticks), from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (name, fields[0], int(fields[1]), int(fields[19]))
    return table


def descendants(root: int) -> dict[int, tuple[str, int]]:
    """Every live process under root: pid -> (name, start time)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (_, _, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        name, state, _, started = table[pid]
        if state != "Z":
            found[pid] = (name, started)
        todo += children.get(pid, [])
    return found


def still_running(processes: dict[int, tuple[str, int]]) -> dict[int, str]:
    """Those of processes not yet exited (a zombie has exited; a reused pid is another process)."""
    table = process_table()
    return {pid: name for pid, (name, started) in processes.items()
            if pid in table and table[pid][3] == started and table[pid][1] != "Z"}


def test_sigterm_to_the_cluster_commands_group_exits_0_and_stops_its_ray(tmp_path) -> None:
    proc = subprocess.Popen(
        [*serve_command(), "cluster", "--replicas", "1", "--address", "127.0.0.1:0", "--model",
         str(model_dir(tmp_path)), "--no-drafter", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # a group of its own, as a shell's job: the group's signal is the test's to send
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    listening: list[str] = []

    def read_listening() -> None:
        for line in proc.stdout:
            if re.search(r"listening on \S+", line):
                listening.append(line)
                return

    ray_processes: dict[int, tuple[str, int]] = {}
    try:
        reader = threading.Thread(target=read_listening, daemon=True)
        reader.start()
        reader.join(HANG_GUARD_S)
        assert listening, f"the cluster did not start: {''.join(stderr)[-3000:]}"
        ray_processes = descendants(proc.pid)
        names = {name for name, _ in ray_processes.values()}
        assert {"gcs_server", "raylet"} <= names, names  # the Ray it started is under it
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_S) == 0, "".join(stderr)[-3000:]
        deadline = time.monotonic() + HANG_GUARD_S  # ray.shutdown has stopped them; the last may take a moment
        while still_running(ray_processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not still_running(ray_processes), (still_running(ray_processes), "".join(stderr)[-3000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in still_running(ray_processes):  # a failed run must not leave its Ray to the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
