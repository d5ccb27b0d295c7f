"""One node per data directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from meshq.errors import DataDirLockedError
from meshq.log import DataDirLock, FileStorage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def locked_message(data_dir, pid: int) -> str:
    return (
        f"data directory {os.path.abspath(data_dir)} is already used by another meshq node "
        f"(pid {pid}); stop that node or choose another --data directory"
    )


def test_second_storage_in_the_same_process_is_refused(tmp_path):
    first = FileStorage(tmp_path)
    with pytest.raises(DataDirLockedError) as caught:
        FileStorage(tmp_path)
    assert str(caught.value) == locked_message(tmp_path, os.getpid())
    first.close()
    FileStorage(tmp_path).close()  # released on close


def test_lock_file_holds_the_pid(tmp_path):
    with DataDirLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / "meshq.lock").read_text() == f"{os.getpid()}\n"
    assert not lock.held
    lock.release()  # idempotent


def test_lock_held_by_another_process(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {REPO_ROOT!r})
        from meshq.log import DataDirLock
        lock = DataDirLock({str(tmp_path)!r})
        print("locked", flush=True)
        sys.stdin.readline()
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(DataDirLockedError) as caught:
            FileStorage(tmp_path)
        assert str(caught.value) == locked_message(tmp_path, child.pid)
    finally:
        child.kill()  # a dead holder's lock is dropped by the kernel
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    FileStorage(tmp_path).close()
