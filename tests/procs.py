"""Run `meshq` CLI processes in tests: free ports, ready lines, cleanup by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

MESHQ = [sys.executable, "-m", "meshq"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_log(path: str) -> str:
    """The text of a child's log file ('' when it does not exist yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def end_process(process: subprocess.Popen | None, timeout_s: float = 10.0, graceful: bool = True,
                close_stdout: bool = True) -> int | None:
    """Stop a child we started, by its PID: SIGTERM and wait ``timeout_s`` (``graceful``), SIGKILL
    otherwise or as a last resort; reap it and close its stdout (unless a reader thread owns it).
    Returns the exit code."""
    if process is None:
        return None
    if process.poll() is None:
        if graceful:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        else:
            os.kill(process.pid, signal.SIGKILL)
    code = process.wait(10)
    if close_stdout and process.stdout is not None:
        process.stdout.close()
    return code


class NodeProcess:
    """One `meshq node` child process; `stop`/`kill` act on its PID only."""

    def __init__(self, data_dir: str, port: int | None = None, cluster: str = "test", extra: list[str] | None = None,
                 log_path: str | None = None, mdns_interface: str | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.cluster = cluster
        self.extra = extra or []
        self.mdns_interface = mdns_interface  # None: --no-mdns; else mDNS pinned to this address
        self.host = host
        self.log_path = log_path or os.path.join(os.path.dirname(data_dir.rstrip("/")) or ".",
                                                 f"node-{os.path.basename(data_dir)}-{self.port}.log")
        self.process: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}

    @property
    def seed(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> NodeProcess:
        discovery = ["--no-mdns"] if self.mdns_interface is None else ["--interface", self.mdns_interface]
        command = [*MESHQ, "node", "--data", self.data_dir, "--host", self.host, "--port", str(self.port),
                   "--cluster", self.cluster, *discovery, *self.extra]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        line = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line or self.process.poll() is not None:
                break
        if not line.startswith(b"{"):
            self.kill()
            raise RuntimeError(f"node did not become ready: {line!r}; log:\n{self.log_text()}")
        self.ready = json.loads(line)
        return self

    def log_text(self) -> str:
        return read_log(self.log_path)

    def kill(self) -> None:
        """SIGKILL (kill -9) the process and reap it."""
        self._reap(end_process(self.process, graceful=False))

    def pause(self) -> None:
        """SIGSTOP the process (it keeps its sockets and state; peers just stop hearing from it)."""
        assert self.process is not None and self.process.poll() is None, "pause needs a running node"
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process (harmless if it is not paused)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL as a last resort; returns the exit code."""
        return self._reap(end_process(self.process, timeout_s))

    def _reap(self, code: int | None) -> int | None:
        if getattr(self, "_log", None) is not None:
            self._log.close()
        return code


def run_cli(*args: str, input_bytes: bytes | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """Run one `meshq ...` command to completion (killed by PID at the timeout)."""
    return subprocess.run([*MESHQ, *args], input=input_bytes, capture_output=True, timeout=timeout_s)
