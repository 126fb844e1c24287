#!/usr/bin/env python3
"""Accounts with several devices under load, beside the same number of connections as plain names.

    .venv/bin/python benchmarks/bench_devices.py [--rounds 3] [--messages 1000]

Rows, in one run, servers alternating round after round (each a fresh ``chatctl serve``, history on,
abuse limits off, pinned to core 0; the load in this process on core 1):

- 300 plain names, 10 senders (each message reaches the 299 others);
- 100 protected accounts with 3 devices each, 10 senders (a device each of 10 accounts): the same 300
  connections, and each message reaches the 299 others too (the sender's own two other devices among
  them), so a delivery to an account should cost one delivery per device and nothing more;
- 100 plain names and 100 protected accounts with one device each, 10 senders: run_all.sh's 100/10
  row, to see that being an account costs a delivery nothing.

The load is chatctl's own (``LoadGenerator``, as ``chatctl bench``), connecting each client as its
account's device with the password.
"""

from __future__ import annotations

import argparse
import functools
import os
import selectors
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_performance import chatctl_server, machine_line, median, mega

import chatctl

PASSWORD = "bench-password"


class DeviceLoad(chatctl.LoadGenerator):
    """``clients`` connections as ``accounts`` names, each proved with PASSWORD (``accounts`` = 0: plain
    names, one each); client i is a device of name i % accounts, so the first ``senders`` clients are
    devices of different accounts."""

    def __init__(self, config: chatctl.ClientConfig, clients: int, senders: int, messages: int,
                 accounts: int):
        super().__init__(config, clients, senders, messages)
        self.accounts = accounts

    def name(self, i: int) -> str:
        return f"{self.prefix}{i % self.accounts if self.accounts else i}"

    def protect(self) -> None:
        for i in range(self.accounts):
            with chatctl.connect(self.config, quiet=True) as conn:
                conn.register(self.name(i))
                conn.protect(PASSWORD)

    def connect(self, progress=None) -> list:
        clients = []
        for i in range(self.result.clients):
            conn = chatctl.ChatConnection(self.config.host, self.config.port, self.config.timeout)
            clients.append(conn)
            conn.hello()
            conn.register(self.name(i), PASSWORD if self.accounts else None)
            self.registered(i, conn)
        return self._settle([chatctl._BenchClient(i, conn) for i, conn in enumerate(clients)])

    def registered(self, i: int, conn: chatctl.ChatConnection) -> None:
        """A hook: client ``i`` has its name (a subclass joins rooms here)."""

    def _settle(self, clients: list) -> list:
        """Read what registering brought (JOIN lines) until every connection has been quiet for a while."""
        selector = selectors.DefaultSelector()
        for c in clients:
            selector.register(c.sock, selectors.EVENT_READ, c)
        quiet_since, deadline = time.monotonic(), time.monotonic() + 60
        while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                if self._read(key.data):
                    quiet_since = time.monotonic()
        selector.close()
        for c in clients:
            c.lines = 0
        return clients


@contextmanager
def server(workdir: Path):
    """This benchmark's server: history on, its limits off."""
    extra = "auth_delay = 0.0\nregister_per_hour = 0\n"
    with chatctl_server(workdir, history=True, extra=extra) as (_, port):
        yield port


ROWS = [  # label, clients, senders, accounts
    ("300 plain names", 300, 10, 0),
    ("100 accounts x 3 devices", 300, 10, 100),
    ("100 plain names", 100, 10, 0),
    ("100 accounts x 1 device", 100, 10, 100),
]


def run_rows(loads: dict[str, Callable[[chatctl.ClientConfig], DeviceLoad]], rounds: int) -> dict[str, float]:
    """Each row's load (made by its function for a fresh server), ``rounds`` times, rows alternating so the
    machine's moods fall on all alike; prints every row's medians; returns their deliveries per second."""
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {1})
    results: dict[str, list[chatctl.BenchResult]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for label, make in loads.items():
                with server(Path(tmp)) as port:
                    load = make(chatctl.ClientConfig(host="127.0.0.1", port=port, timeout=30.0))
                    load.protect()
                    results.setdefault(label, []).append(load.run())
    print(machine_line())
    print(f"{'':26} {'deliveries/s':>13} {'p99 ms':>8} {'lost':>5} {'dup':>4}")
    rate = {}
    for label, rows in results.items():
        rate[label] = median(r.deliveries_per_s for r in rows)
        p99 = median(r.latency_ms.get("p99", 0.0) for r in rows)
        print(f"{label:26} {mega(rate[label]):>13} {p99:8.1f} {sum(r.lost for r in rows):5} "
              f"{sum(r.duplicates for r in rows):4}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1000, help="messages per sender")
    args = parser.parse_args()
    print(f"# deliveries/s, medians of {args.rounds}; chatctl with history on; "
          f"{args.messages} messages a sender")
    rate = run_rows({label: functools.partial(DeviceLoad, clients=clients, senders=senders,
                                              messages=args.messages, accounts=accounts)
                     for label, clients, senders, accounts in ROWS}, args.rounds)
    print(f"300 connections: 100 accounts x 3 devices / 300 plain names "
          f"{rate['100 accounts x 3 devices'] / rate['300 plain names']:.2f}")
    print(f"100 connections: 100 accounts x 1 device / 100 plain names "
          f"{rate['100 accounts x 1 device'] / rate['100 plain names']:.2f}")


if __name__ == "__main__":
    main()
