"""A chat room over ephemeral pub/sub: each person runs this on their own machine.

    meshq node --data ./data --port 7450                      # somewhere on the LAN
    python examples/chat.py --name alice --room lobby --seed 10.0.0.5:7450
    python examples/chat.py --name bob --room lobby --interface 10.0.0.7   # or mDNS on that interface

Each line typed is published to ``chat.<room>.<name>``; everyone subscribes to
``chat.<room>.*`` and sees the others' lines (not their own). Nothing is stored: who is not
in the room when a line is said does not see it. ``--say TEXT`` (repeatable) says lines
without reading stdin, ``--listen S`` stops after S seconds, ``--count N`` after N lines heard.
"""

from __future__ import annotations

import sys
import threading
import time

from _connect import connection_args, node_options

import meshq


def main() -> None:
    parser = connection_args("a chat room on meshq pub/sub")
    parser.add_argument("--name", required=True, help="your name (one token: letters, digits, -, _)")
    parser.add_argument("--room", default="lobby")
    parser.add_argument("--say", action="append", default=None, metavar="TEXT", help="say this instead of reading stdin")
    parser.add_argument("--listen", type=float, default=None, metavar="S", help="stop after S seconds")
    parser.add_argument("--count", type=int, default=None, metavar="N", help="stop after hearing N lines")
    parser.add_argument("--wait-for-others", type=float, default=10.0, metavar="S",
                        help="before --say, wait up to S seconds for someone else to be in the room")
    args = parser.parse_args()
    subject = f"chat.{args.room}.{args.name}"
    with meshq.Node(role="client", **node_options(args)) as node:
        node.wait_ready(timeout=10)
        room = node.subscribe(f"chat.{args.room}.*")
        heard = threading.Event()
        count = 0

        def listen() -> None:
            nonlocal count
            for message in room:
                if message.subject == subject:
                    continue  # our own line
                print(f"{message.subject.rsplit('.', 1)[1]}: {message.data.decode(errors='replace')}", flush=True)
                count += 1
                if args.count is not None and count >= args.count:
                    heard.set()
                    return

        threading.Thread(target=listen, daemon=True).start()
        print(f"[{args.name} joined {args.room}]", file=sys.stderr, flush=True)
        if args.say is not None:
            deadline = time.monotonic() + args.wait_for_others
            # someone else subscribed to the room: our subject reaches another node
            while not node.core.pubsub.route(subject).remote and time.monotonic() < deadline:
                time.sleep(0.05)
            for line in args.say:
                node.publish(subject, line.encode())
        elif args.listen is None and args.count is None:
            for line in sys.stdin:
                node.publish(subject, line.rstrip("\n").encode())
        heard.wait(args.listen)
        room.close()


if __name__ == "__main__":
    main()
