"""Classroom mode under a burst of page loads: kernels alive over time and their memory.

Starts ``diffwidget demo --classroom`` as a teacher would (the quickstart, the embedded UNet,
``--max-students N``), fires ``--loads`` page loads at once over HTTP (raw requests: the
pages never open their kernel connection, like a link preview or a laptop closed while the
page loads), optionally keeps ``--connected`` of them open with a kernel websocket, then
samples every ``--every`` seconds: the kernels alive (processes under the server) and each
one's resident (RSS), proportional (PSS) and private (USS) memory from
``/proc/PID/smaps_rollup``. It stops once only the connected kernels are left (or after
``--limit`` seconds), then stops the command with SIGTERM and checks nothing is left.
Linux only (``/proc``).

Usage::

    python bench/bench_classroom.py --loads 20 --max-students 10 --connected 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffwidget.cli.serve import process_tree  # noqa: E402

KERNEL_MARK = "ipykernel_launcher"
#: The URLs the command prints for students (Voila's own log line hides the token).
URL = re.compile(r"^    (http://\S+)$", re.MULTILINE)
KERNEL_ID = re.compile(r"kernelId[\"']?\s*[:=]\s*[\"']([0-9a-f-]{36})")
START_S = 120
LOAD_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb(pid: int) -> dict[str, float] | None:
    """RSS, PSS and USS of ``pid`` in MB, or ``None`` if it has exited."""
    fields: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": private}


def kernels(demo_pid: int) -> list[int]:
    found = []
    for pid in process_tree(demo_pid):
        try:
            if KERNEL_MARK in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(pid)
        except OSError:
            continue
    return found


def start(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        (work / name).mkdir()
        env[name] = str(work / name)
    port = free_port()
    command = [sys.executable, "-m", "diffwidget.cli", "demo", "--classroom", "--no-browser"]
    command += ["--port", str(port), "--dir", str(work / "room"), "--ip", args.ip]
    command += ["--max-students", str(args.max_students)]
    log = work / "demo.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        urls = URL.findall(log.read_text())
        try:
            socket.create_connection((args.ip, port), timeout=2).close()
        except OSError:
            time.sleep(0.5)
            continue
        if urls:
            return process, urls[0], log
    process.terminate()
    raise SystemExit(f"no server after {START_S} s:\n{log.read_text()[-3000:]}")


def load(url: str) -> tuple[int, str | None]:
    try:
        with urllib.request.urlopen(url, timeout=LOAD_TIMEOUT_S) as reply:
            match = KERNEL_ID.search(reply.read().decode())
            return reply.status, match[1] if match else None
    except urllib.error.HTTPError as error:
        return error.code, None


def keep_connected(url: str, kernel_ids: list[str], stop: threading.Event) -> None:
    """Open each kernel's websocket, as a student's page does, and hold it until ``stop``."""
    from tornado.websocket import websocket_connect

    base = url.split("?")[0].replace("http://", "ws://").rstrip("/")
    query = url.split("?", 1)[1] if "?" in url else ""

    async def hold() -> None:
        sockets = [
            await websocket_connect(f"{base}/api/kernels/{kid}/channels?{query}")
            for kid in kernel_ids
        ]
        while not stop.is_set():
            await asyncio.sleep(0.5)
        for ws in sockets:
            ws.close()

    asyncio.run(hold())


def sample(demo_pid: int, t0: float) -> dict[str, Any]:
    """The kernels alive now and their memory."""
    read = {pid: memory_mb(pid) for pid in kernels(demo_pid)}
    memory = [m for m in read.values() if m is not None]
    return {
        "t": round(time.monotonic() - t0, 1),
        "kernels": len(memory),
        **{f"{kind}_mb": [round(m[kind]) for m in memory] for kind in ("rss", "pss", "uss")},
    }


def measure(args: argparse.Namespace, demo_pid: int, url: str) -> dict[str, Any]:
    """Fire the loads, hold the connected pages, sample until only those are left."""
    results: list[tuple[int, str | None]] = []

    def burst() -> None:
        with ThreadPoolExecutor(args.loads) as pool:
            results.extend(pool.map(load, [url] * args.loads))

    t0 = time.monotonic()
    loader = threading.Thread(target=burst, daemon=True)
    loader.start()
    stop = threading.Event()
    holding = False
    samples: list[dict[str, Any]] = []
    answered_s = None
    try:
        while time.monotonic() - t0 < args.limit:
            now = sample(demo_pid, t0)
            samples.append(now)
            print(
                f"t={now['t']:6.1f}s kernels={now['kernels']:2d} "
                f"total RSS={sum(now['rss_mb']):6d} MB PSS={sum(now['pss_mb']):6d} MB "
                f"USS={sum(now['uss_mb']):6d} MB; RSS per kernel {now['rss_mb']}",
                flush=True,
            )
            if not loader.is_alive() and not holding:
                answered_s = now["t"]
                codes = Counter(code for code, _ in results)
                print(f"page loads answered after {answered_s} s: {dict(codes)}", flush=True)
                ids = [kid for code, kid in results if code == 200 and kid][: args.connected]
                threading.Thread(target=keep_connected, args=(url, ids, stop), daemon=True).start()
                holding = True
            elif holding and now["kernels"] <= args.connected:
                break
            time.sleep(args.every)
    finally:
        stop.set()
    return {
        "codes": dict(Counter(code for code, _ in results)),
        "answered_s": answered_s,
        "samples": samples,
    }


def stop_and_check(process: subprocess.Popen[bytes]) -> list[int]:
    """SIGTERM the command; the processes of its tree still running after it exited."""
    tree = process_tree(process.pid)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    time.sleep(1)
    return [pid for pid in tree if Path(f"/proc/{pid}").exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--max-students", type=int, default=10)
    parser.add_argument("--connected", type=int, default=1)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--limit", type=float, default=600.0)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-classroom-") as tmp:
        process, url, log = start(args, Path(tmp))
        print(f"server {url.split('?')[0]}, load average {os.getloadavg()}", flush=True)
        try:
            report = measure(args, process.pid, url)
        finally:
            left = stop_and_check(process)
        print(f"SIGTERM: command exited {process.returncode}; processes left: {left}")
        if args.json:
            report |= {"args": {k: v for k, v in vars(args).items() if k != "json"}}
            report |= {"left_after_sigterm": left, "log_tail": log.read_text()[-2000:]}
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
