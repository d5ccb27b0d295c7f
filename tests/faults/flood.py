"""``python -m tests.faults.flood ADDRESS BYTES_PER_S``: UDP datagrams of 1,000 bytes to ADDRESS port 9 (discard)
at that rate until killed — the other traffic of a saturated link, run inside a namespace by the ``slow`` fault
(``tests.faults.run``). Paced by sleeping, so it costs little CPU; errors (a full queue: ENOBUFS) are ignored."""

from __future__ import annotations

import socket
import sys
import time

SIZE = 1000


def main() -> None:
    address, rate = sys.argv[1], float(sys.argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\0" * SIZE
    interval = SIZE / rate
    next_s = time.monotonic()
    while True:
        try:
            sock.sendto(payload, (address, 9))
        except OSError:
            pass
        next_s += interval
        delay = next_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_s = time.monotonic()


if __name__ == "__main__":
    main()
