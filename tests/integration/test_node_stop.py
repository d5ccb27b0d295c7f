"""Stopping `meshq node` with SIGTERM, and the test harness's check of it (``tests.procs.end_process``).

The multinode and netns tests assert that every node exits by itself with code 0 after SIGTERM. The wait is
condition-based with a deadline sized for a loaded CI machine; these tests pin that the check can still fail: a
process that does not exit is reported with the time it was given, and its stacks land in its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.procs import child_env, end_process, read_log, read_ready_line

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_makes_a_node_exit_by_itself_with_code_0(node_processes, signum):
    node = node_processes("n1")
    assert node.process is not None
    os.kill(node.process.pid, signum)
    stopped = node.wait_exit()
    assert stopped.clean, f"{stopped}\n{node.log_text()[-2000:]}"
    assert "stopped in" in node.log_text(), node.log_text()[-2000:]


def test_a_process_still_running_at_the_stop_deadline_fails_the_check_and_says_how_long(tmp_path):
    # a stand-in for a node whose shutdown hangs: ready line, then SIGTERM is ignored
    script = ("import json, signal, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "print(json.dumps({'event': 'ready'}), flush=True)\n"
              "time.sleep(600)\n")
    log_path = str(tmp_path / "hung.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=log,
                                   stdin=subprocess.DEVNULL, env=child_env(), cwd=str(tmp_path))
    try:
        line, problem = read_ready_line(process, 60)
        assert line.startswith(b"{"), problem
        ended = end_process(process, timeout_s=2.0)
    finally:
        end_process(process, graceful=False)
    assert not ended.clean and ended.hung
    assert ended.code is not None and ended.code < 0, ended  # killed by a signal: it did not exit by itself
    assert "still running 2 s after SIGTERM" in str(ended), str(ended)
    assert ended.after_s >= 2.0
    text = read_log(log_path)
    assert "Fatal Python error: Aborted" in text and 'File "<string>", line 4' in text, text  # where it hung
    assert not [name for name in os.listdir(tmp_path) if name.startswith("core")], "no core file may be left"


def test_a_child_that_exits_with_an_error_is_not_clean(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.2); sys.exit(3)"],
                               stdout=subprocess.PIPE, env=child_env())
    ended = end_process(process, already_asked=True)
    assert not ended.clean and not ended.hung and ended.code == 3
    assert str(ended).startswith("exited with code 3 "), str(ended)


def test_node_stop_leaves_storage_open_while_its_runtime_thread_still_runs(tmp_path, monkeypatch, caplog):
    # A runtime thread that outlives stop()'s timeout may still write its logs: stop() must not
    # close them under it. Simulated by a runtime whose stop returns at once while the thread runs.
    import meshq
    from meshq.io.runtime import Runtime

    node = meshq.Node(cluster="stop", data_dir=tmp_path / "d", mdns=False).start()
    runtime, storage = node.runtime, node.storage
    closed: list[bool] = []
    monkeypatch.setattr(storage, "close", lambda: closed.append(True))
    real_stop = Runtime.stop
    monkeypatch.setattr(runtime, "stop", lambda timeout=None: None)
    with caplog.at_level("ERROR", logger="meshq.node"):
        node.stop(timeout=0.1)
    assert not closed and "did not stop within" in caplog.text
    real_stop(runtime, 10.0)  # clean up: the thread really stops now
    monkeypatch.undo()
    storage.close()
