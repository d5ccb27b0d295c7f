"""An attacker's host: fake meshq mDNS records, and a listener that speaks garbage (``tests/netns/test_spoof.py``).

Run inside a namespace of the lab::

    python -m tests.netns.spoof --interface 10.77.9.4 --record '{"name": "evil-1", "cluster": "...", ...}' \\
        [--garbage-port 7200 ...]

Each ``--record`` is one ``_meshq._tcp.local.`` service, crafted like ``meshq.io.discovery`` announces a node:
``name`` (the instance name), then the TXT fields ``cluster``, ``node_id``, ``proto``, ``role``, ``port``,
``pub_port``, ``incarnation`` and (optional) ``key``; the address is ``--interface`` (zeroconf is pinned to it, never
every interface). The records are announced again every second (changed ``incarnation``: every browser sees an
update and resolves them again). Each ``--garbage-port`` accepts TCP connections there and answers each one with
random bytes. Prints ``{"ready": true}`` once registered; stops (unregistering) at the end of stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading


def garbage_listener(address: str, port: int, stop: threading.Event) -> threading.Thread:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(16)
    server.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _peer = server.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(0.5)
                conn.sendall(os.urandom(4096))
                try:
                    conn.recv(65536)
                except OSError:
                    pass
            except OSError:
                pass
            finally:
                conn.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True, name=f"garbage-{port}")
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    from meshq.io.discovery import SERVICE_TYPE

    parser = argparse.ArgumentParser(prog="python -m tests.netns.spoof")
    parser.add_argument("--interface", required=True)
    parser.add_argument("--record", action="append", default=[], help="JSON: name and TXT fields")
    parser.add_argument("--garbage-port", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    stop = threading.Event()
    threads = [garbage_listener(args.interface, port, stop) for port in args.garbage_port]
    zeroconf = Zeroconf(interfaces=[args.interface], ip_version=IPVersion.V4Only)
    records = [json.loads(text) for text in args.record]

    def info_of(record: dict, bump: int) -> ServiceInfo:
        properties = {k: str(v) for k, v in record.items() if k != "name"}
        properties["incarnation"] = str(int(properties["incarnation"]) + bump)
        return ServiceInfo(SERVICE_TYPE, f"{record['name']}.{SERVICE_TYPE}",
                           addresses=[socket.inet_aton(args.interface)], port=int(properties["port"]),
                           properties=properties, server=f"{record['name']}.local.")

    infos = [info_of(r, 0) for r in records]
    for info in infos:
        zeroconf.register_service(info, cooperating_responders=True)  # an attacker does not probe for conflicts
    print(json.dumps({"ready": True}), flush=True)
    reader = threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True)
    reader.start()
    bump = 0
    while not stop.wait(1.0):
        bump += 1
        infos = [info_of(r, bump) for r in records]
        for info in infos:
            zeroconf.update_service(info)
    for info in infos:
        zeroconf.unregister_service(info)
    zeroconf.close()
    for thread in threads:
        thread.join(2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
