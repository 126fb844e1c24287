#!/usr/bin/env python3
"""A private room's fan-out beside a public room's, in one run.

    .venv/bin/python benchmarks/bench_private.py [--rounds 3] [--messages 1000]

Each round starts a fresh ``chatctl serve`` (history on, abuse limits off, pinned to core 0) per row,
with 100 protected accounts; they all join ``#bench`` (the first one makes it, private in the
private row, and invites the other 99), and 10 of them send --messages messages each to it, every
one reaching the 99 others.  The load is chatctl's own (``LoadGenerator``, as ``chatctl bench``, in
this process on core 1).  Prints deliveries per second and p99 latency for each row, medians of the
rounds, and private / public: the target is that a private room costs what a public one does.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_devices import DeviceLoad, run_rows

import chatctl

ROOM = "bench"


class RoomLoad(DeviceLoad):
    """DeviceLoad's accounts (one device each), all in #bench, which ``private`` makes invite-only."""

    def __init__(self, config: chatctl.ClientConfig, clients: int, senders: int, messages: int,
                 private: bool):
        super().__init__(config, clients, senders, messages, clients)
        self.private = private

    def registered(self, i: int, conn: chatctl.ChatConnection) -> None:
        if i == 0:  # the room's owner makes it, and (private) lets the others in
            conn.send("JOIN", f"#{ROOM}", *(["+i"] if self.private else []))
            for j in range(1, self.result.clients):
                if self.private:
                    conn.send("INVITE", f"#{ROOM}", self.name(j))
            time.sleep(0.5)
        else:
            conn.send("JOIN", f"#{ROOM}")

    def _message(self, sender: int, seq: int) -> bytes:
        return f"MSG|#{ROOM}|".encode() + super()._message(sender, seq)[4:]


ROWS = [("public room", False), ("private room", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1000, help="messages per sender")
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--senders", type=int, default=10)
    args = parser.parse_args()
    print(f"# {args.members} members of #{ROOM}, {args.senders} senders, {args.messages} messages a sender; "
          f"deliveries/s, medians of {args.rounds}; chatctl with history on")
    rate = run_rows({label: functools.partial(RoomLoad, clients=args.members, senders=args.senders,
                                              messages=args.messages, private=private)
                     for label, private in ROWS}, args.rounds)
    print(f"private / public: {rate['private room'] / rate['public room']:.2f}")


if __name__ == "__main__":
    main()
