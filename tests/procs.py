"""Run `meshq` CLI processes in tests: free ports, ready lines, cleanup by PID."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from meshq.testing.ports import free_port

MESHQ = [sys.executable, "-m", "meshq"]



def read_log(path: str) -> str:
    """The text of a child's log file ('' when it does not exist yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _time_scale() -> float:
    try:
        return max(1.0, float(os.environ.get("MESHQ_TEST_TIME_SCALE", "1")))
    except ValueError:
        return 1.0


# Deadlines of the process life-cycle waits: each wait returns as soon as its condition holds (a line is read, the
# process exits), so a deadline only matters when something is wrong. They are sized for a loaded 2-core CI machine
# running several test processes and nodes per core, where an idle one needs ~1 s to start a node and ~0.1 s to stop
# it. MESHQ_TEST_TIME_SCALE=N multiplies them for an even slower machine.
TIME_SCALE = _time_scale()
START_DEADLINE_S = 60.0 * TIME_SCALE  # `meshq node` started -> its ready line (imports, log recovery, binding)
# SIGTERM -> the process exited by itself. Longer than the 30 s `meshq node` gives its runtime thread
# (meshq.cli.commands._NODE_STOP_TIMEOUT_S), so a node whose runtime overran shows up as exit code 1 with its own log line.
STOP_DEADLINE_S = 60.0 * TIME_SCALE
REAP_DEADLINE_S = 30.0 * TIME_SCALE  # SIGKILL (or SIGABRT) -> reaped
DUMP_WAIT_S = 5.0 * TIME_SCALE  # SIGABRT -> the child's faulthandler wrote every thread's stack and it died


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child Python process: ``PYTHONFAULTHANDLER=1``, so that a child still running at its
    stop deadline can be made to write every thread's stack into its log (SIGABRT) before it is killed."""
    env = dict(os.environ if env is None else env)
    env["PYTHONFAULTHANDLER"] = "1"
    return env


@dataclass(frozen=True)
class Exit:
    """How a child we started ended (``end_process``)."""

    code: int | None  # exit code; negative: killed by that signal; None: it was never started
    after_s: float  # from our SIGTERM (or SIGKILL, or the start of the wait) until it was reaped
    deadline_s: float | None  # how long it was given to exit by itself; None: SIGKILLed right away
    hung: bool  # still running at the deadline: its stacks were dumped (SIGABRT), then it was killed
    how: str = "after SIGTERM"  # what it was given the deadline after

    @property
    def clean(self) -> bool:
        """It exited by itself, with code 0, within the deadline."""
        return self.code == 0 and not self.hung

    def __str__(self) -> str:
        if self.code is None:
            return "it was never started"
        if self.hung:
            return (f"still running {self.deadline_s:.0f} s {self.how} (a deadline sized for a loaded machine; a "
                    f"healthy node exits within a second or two): every thread's stack was dumped into its log "
                    f"(SIGABRT), then it was killed (exit code {self.code})")
        if self.deadline_s is None:
            return f"killed (exit code {self.code})"
        if self.how.startswith(("before", "by itself")):
            return f"exited with code {self.code} {self.how}"
        return f"exited with code {self.code} {self.after_s:.1f} s {self.how}"


def end_process(process: subprocess.Popen | None, timeout_s: float = STOP_DEADLINE_S, graceful: bool = True,
                close_stdout: bool = True, already_asked: bool = False) -> Exit:
    """End a child we started, by its PID. ``graceful``: SIGTERM (unless ``already_asked`` to stop some other way)
    and wait until it exits, at most ``timeout_s``; one still running then has its stacks dumped (SIGABRT: see
    ``child_env``) and is SIGKILLed. Not ``graceful``: SIGKILL right away. Reaps it and closes its stdout (unless a
    reader thread owns it)."""
    if process is None:
        return Exit(None, 0.0, None, False)
    started_s = time.monotonic()
    hung = False
    deadline_s: float | None = timeout_s if graceful else None
    how = "after it was asked to stop" if already_asked else "after SIGTERM"
    if process.poll() is not None:  # it had already ended by itself (crashed, or left the cluster)
        how = "before we waited for it" if already_asked else "by itself before SIGTERM"
    else:
        if graceful:
            if not already_asked:
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                hung = True
                _dump_stacks_then_kill(process)
        else:
            os.kill(process.pid, signal.SIGKILL)
    try:
        code = process.wait(REAP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process {process.pid} still not reaped {REAP_DEADLINE_S:.0f} s after SIGKILL") from None
    if close_stdout and process.stdout is not None:
        process.stdout.close()
    return Exit(code, time.monotonic() - started_s, deadline_s, hung, how)


def _dump_stacks_then_kill(process: subprocess.Popen) -> None:
    """SIGABRT (faulthandler writes every thread's stack to stderr, the child's log; no core file: RLIMIT_CORE is
    set to 0 first), then SIGKILL if it is somehow still there."""
    try:
        resource.prlimit(process.pid, resource.RLIMIT_CORE, (0, 0))
        os.kill(process.pid, signal.SIGABRT)
        process.wait(DUMP_WAIT_S)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)


def read_ready_line(process: subprocess.Popen, timeout_s: float) -> tuple[bytes, str]:
    """The first line the child writes on stdout (its ready line), waiting until one comes, the child exits or
    ``timeout_s`` passes; returns (line, why there is none: "" when there is one)."""
    assert process.stdout is not None
    started_s = time.monotonic()
    deadline = started_s + timeout_s
    while True:
        readable, _, _ = select.select([process.stdout], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if readable:
            line = process.stdout.readline()
            if line:
                return line, ""
            try:
                process.wait(REAP_DEADLINE_S)  # the end of its output: it is exiting
            except subprocess.TimeoutExpired:
                return b"", "it closed its output without a ready line"
        if process.poll() is not None:
            return b"", f"it exited with code {process.returncode} after {time.monotonic() - started_s:.1f} s"
        if time.monotonic() >= deadline:
            return b"", f"no ready line within {timeout_s:.0f} s (a deadline sized for a loaded machine)"


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

    def start(self, timeout_s: float = START_DEADLINE_S) -> NodeProcess:
        """Start the process and wait for its ready line (at most ``timeout_s``)."""
        discovery = ["--no-mdns"] if self.mdns_interface is None else ["--interface", self.mdns_interface]
        command = [*MESHQ, "node", "--data", self.data_dir, "--host", self.host, "--port", str(self.port),
                   "--cluster", self.cluster, *discovery, *self.extra]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                        env=child_env())
        line, problem = read_ready_line(self.process, timeout_s)
        if not line.startswith(b"{"):
            self.kill()
            raise RuntimeError(f"node did not become ready: {problem or repr(line)}; log:\n{self.log_text()}")
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

    def stop(self, timeout_s: float = STOP_DEADLINE_S) -> Exit:
        """SIGTERM and wait until the node exits by itself (at most ``timeout_s``); ``.clean`` on the result: it
        exited with code 0. One still running at the deadline has its stacks dumped into its log and is killed."""
        return self._reap(end_process(self.process, timeout_s))

    def wait_exit(self, timeout_s: float = STOP_DEADLINE_S) -> Exit:
        """Wait until the node exits by itself, without asking (e.g. after ``meshq leave``), as ``stop`` does."""
        return self._reap(end_process(self.process, timeout_s, already_asked=True))

    def _reap(self, result: Exit) -> Exit:
        if getattr(self, "_log", None) is not None:
            self._log.close()
        return result


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (and is ours: one of another user does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # reused by another user's process: not ours
        return False
    return True


def run_cli(*args: str, input_bytes: bytes | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """Run one `meshq ...` command to completion (killed by PID at the timeout)."""
    return subprocess.run([*MESHQ, *args], input=input_bytes, capture_output=True, timeout=timeout_s * TIME_SCALE)
