#!/usr/bin/env python3
"""What deleting (and editing, and reacting to) a message costs in a history of a million messages.

Builds a history of --messages messages (one per second of a made-up past, a few words each, every one
in the full-text index), starts `chatctl serve` on it pinned to one core, and times, from a client on
loopback, each request until its MSG_OK: DELETE, EDIT and REACT on messages picked at random across the
whole history, and a plain MSG beside them in the same run.  Prints every median and 95th percentile.

    python benchmarks/bench_actions.py                   # 1,000,000 messages, 200 of each request
    python benchmarks/bench_actions.py --messages 100000 --requests 50

The target (issue 24): deleting a message from a history of a million messages takes under 50 ms.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_performance import chatctl_server  # noqa: E402

import chatctl  # noqa: E402

WORDS = ("deploy build green red staging prod rollback fix merge review ticket alert disk cpu lunch "
         "coffee standup retro release hotfix").split()


def build_history(path: Path, count: int) -> float:
    """``count`` messages from ana in #main, indexed; returns the seconds it took."""
    started = time.monotonic()
    store = chatctl.HistoryStore(path)
    rng = random.Random(24)
    start = time.time() - count
    batch = []
    for i in range(1, count + 1):
        text = " ".join(rng.choice(WORDS) for _ in range(6)) + f" #{i}"
        batch.append(chatctl.PendingMessage(chatctl.ChatMessage(i, start + i, "ana", text), None))
        if len(batch) == chatctl.HISTORY_BATCH_MAX:
            store.insert(batch)
            batch = []
    if batch:
        store.insert(batch)
    while store.index_lag:
        store.index_step()
    store.close()
    return time.monotonic() - started


class Client:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        self.send("HELLO|chatctl/1|actions\nUSER|ana\n")
        self.until("USER_OK")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def until(self, prefix: str) -> str:
        while True:
            while b"\n" not in self.buffer:
                self.buffer += self.sock.recv(65536)
            line, self.buffer = self.buffer.split(b"\n", 1)
            text = line.decode()
            if text.startswith(prefix):
                return text
            if text.startswith("ERR|"):
                raise SystemExit(f"refused: {text}")

    def timed(self, request: str) -> float:
        started = time.perf_counter()
        self.send(request + "\n")
        self.until("MSG_OK|")
        return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-actions-") as folder:
        workdir = Path(folder)
        db = workdir / "million.db"
        took = build_history(db, args.messages)
        print(f"history: {args.messages:,} messages, indexed, in {took:.0f} s "
              f"({db.stat().st_size / 1e6:.0f} MB)")
        with chatctl_server(workdir, history=True, db=db) as (_, port):
            client = Client(port)
            rng = random.Random(7)
            targets = rng.sample(range(1, args.messages + 1), 3 * args.requests)
            times: dict[str, list[float]] = {"MSG": [], "REACT": [], "EDIT": [], "DELETE": []}
            for n in range(args.requests):  # interleaved, so the machine's moods fall on all alike
                times["MSG"].append(client.timed(f"MSG|a plain message {n}"))
                times["REACT"].append(client.timed(f"REACT|{targets[3 * n]}|👍"))
                times["EDIT"].append(client.timed(f"EDIT|{targets[3 * n + 1]}|edited {n}"))
                times["DELETE"].append(client.timed(f"DELETE|{targets[3 * n + 2]}"))
        print(f"{'request':<8} {'median ms':>10} {'p95 ms':>8}")
        for verb, values in times.items():
            values.sort()
            print(f"{verb:<8} {statistics.median(values):>10.2f} {values[int(len(values) * 0.95)]:>8.2f}")
        print(f"DELETE median {statistics.median(times['DELETE']):.2f} ms against the 50 ms target; "
              f"{statistics.median(times['DELETE']) / statistics.median(times['MSG']):.2f} x a plain message")


if __name__ == "__main__":
    main()
