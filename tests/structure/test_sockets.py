"""Every ZeroMQ socket meshq opens is made by ``meshq.io.sockets.new_socket`` (SPEC §3.6): that is
where ``ZMQ_MAXMSGSIZE`` (and every other per-socket safeguard) is set, so a socket made anywhere
else would take frames of any size from any peer. The benchmarks (``meshq/bench``, baselines
that measure raw ZeroMQ) are exempt."""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "meshq")
# new_socket, and the PAIR that reads a DEALER's monitor events (meshq.io.dropwatch): an inproc socket that
# only libzmq itself writes to, never a peer (pyzmq's get_monitor_socket makes the same PAIR)
ALLOWED = {("meshq/io/sockets.py", "new_socket"), ("meshq/io/dropwatch.py", "__init__")}


def socket_calls(path: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of every ``<something>.socket(...)`` call that is not ``socket.socket``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "socket"
                    and not (isinstance(child.func.value, ast.Name) and child.func.value.id == "socket")):
                found.append((function, child.lineno))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_every_zmq_socket_is_made_by_new_socket():
    offenders = []
    for root, _dirs, files in os.walk(PACKAGE):
        rel_root = os.path.relpath(root, REPO)
        if rel_root.startswith(os.path.join("meshq", "bench")):
            continue
        for name in files:
            if name.endswith(".py"):
                rel = os.path.join(rel_root, name)
                for function, line in socket_calls(os.path.join(REPO, rel)):
                    if (rel, function) not in ALLOWED:
                        offenders.append(f"{rel}:{line} (in {function})")
    assert not offenders, ("ZeroMQ sockets made outside meshq.io.sockets.new_socket (no MAXMSGSIZE): "
                           f"{offenders}; make them with new_socket")


def test_the_check_finds_a_socket_made_elsewhere(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import socket\n\ndef f(ctx):\n    s = ctx.socket(1)\n    u = socket.socket()\n")
    assert socket_calls(str(source)) == [("f", 4)]
