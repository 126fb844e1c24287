#!/usr/bin/env python3
"""Webhook posts per second beside the chat's own traffic, and a /metrics scrape with 10,000 connections.

    .venv/bin/python benchmarks/bench_http.py [--rounds 3] [--seconds 5]

In one run, each row a fresh ``chatctl serve`` (history on, abuse limits off, pinned to core 0; the
load from this process and ``chatctl bench`` on core 1):

- posts/s of incoming webhook posts alone, from 8 keep-alive connections (http.client), each post
  answered 200 ``ok`` once stored;
- the same messages posted over the chat protocol (one chatctl/1 connection, 16 in flight) and by
  ``chatctl send`` processes (one process per message, as a script without webhooks would);
- 100 clients chatting, 10 of them sending (chatbench's ``chatload`` where /tmp/chatload is built,
  else ``chatctl bench``), alone and while webhook posts come at each of ``--post-rates`` (1,000
  and 500/s): the chat's deliveries/s, and the posts/s meanwhile;
- the time of a /metrics scrape (median of 20) with 10,000 connections open.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_performance import CHATLOAD, ROOT, chatctl_server, machine_line, median, pinned

import chatctl

OPERATOR = "bench-operator"
POSTERS = 8


@contextmanager
def server(workdir: Path):
    """This benchmark's server: history on, its limits off."""
    extra = "[http]\nrequest_rate = 0.0\nhook_rate = 0.0\n"
    operator = {"CHATCTL_OPERATOR_PASSWORD": OPERATOR}
    with chatctl_server(workdir, history=True, extra=extra, env=operator) as (_, port):
        yield port


def add_hook(port: int) -> str:
    with chatctl.ChatConnection("127.0.0.1", port) as conn:
        conn.hello(quiet=True)
        conn.oper(OPERATOR)
        return conn.add_hook("deploys", "ci")[1]


def post_for(port: int, token: str, until: float, counts: list[int], index: int, rate: float) -> None:
    """Post until ``until``, at ``rate`` posts/s (0: as fast as the answers come)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    next_at = time.monotonic()
    body = json.dumps({"text": "build 42 is green: all 504 tests passed"}).encode()
    headers = {"Content-Type": "application/json"}
    while time.monotonic() < until:
        if rate:
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        conn.request("POST", f"/hooks/{token}", body=body, headers=headers)
        response = conn.getresponse()
        if response.read() != b"ok":
            raise SystemExit(f"a post was refused: {response.status}")
        counts[index] += 1
    conn.close()


def webhook_posts(port: int, token: str, seconds: float, rate: float = 0.0) -> float:
    """Posts/s from POSTERS keep-alive connections for ``seconds``, offered at ``rate`` (0: flat out)."""
    counts = [0] * POSTERS
    until = time.monotonic() + seconds
    start = time.monotonic()
    threads = [threading.Thread(target=post_for, args=(port, token, until, counts, i, rate / POSTERS))
               for i in range(POSTERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def chat_protocol(port: int, messages: int) -> float:
    """Messages/s over one chatctl/1 connection, 16 in flight."""
    conn = chatctl.ChatConnection("127.0.0.1", port, timeout=30)
    conn.hello(quiet=True)
    conn.register(f"poster{time.monotonic_ns() % 100000}")
    start, sent, acked = time.monotonic(), 0, 0
    while acked < messages:
        while sent < messages and sent - acked < 16:
            conn.send("MSG", "#deploys", "build 42 is green: all 504 tests passed")
            sent += 1
        if isinstance(conn.read_event(), chatctl.Acknowledged):
            acked += 1
    conn.close()
    return messages / (time.monotonic() - start)


def send_processes(port: int, messages: int) -> float:
    start = time.monotonic()
    for _ in range(messages):
        subprocess.run([*pinned(1), sys.executable, str(ROOT / "chatctl.py"), "send", "-p", str(port), "-u",
                        "ci-script", "--room", "deploys", "build 42 is green"], check=True,
                       capture_output=True)
    return messages / (time.monotonic() - start)


def chat_bench(port: int, messages: int) -> subprocess.Popen:
    """100 clients chatting, 10 sending: chatbench's chatload (C, so the load is not the limit) where it
    is built, else ``chatctl bench``."""
    if CHATLOAD.exists():
        command = [str(CHATLOAD), "--proto", "seed", "--host", "127.0.0.1", "--port", str(port), "-n", "100",
                   "-s", "10", "-m", str(messages)]
    else:
        command = [sys.executable, str(ROOT / "chatctl.py"), "bench", "-p", str(port), "-n", "100",
                   "-s", "10", "-m", str(messages), "--json", "--yes"]
    return subprocess.Popen([*pinned(1), *command], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def deliveries(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate(timeout=600)
    result = json.loads(out.strip().splitlines()[-1])
    return result.get("deliveries_per_s")


def scrape_with_connections(port: int, connections: int) -> float:
    """Median milliseconds of 20 /metrics scrapes with ``connections`` open (100 of them named)."""
    socks = []
    for i in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        if i < 100:
            s.sendall(f"USER|idle{i}\n".encode())
        socks.append(s)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def scrape() -> bytes:
        conn.request("GET", "/metrics")
        return conn.getresponse().read()

    deadline = time.monotonic() + 60
    while f'chatctl_connections{{protocol="seed"}} {float(connections)}'.encode() not in scrape():
        if time.monotonic() > deadline:
            raise SystemExit("the server did not count every connection in time")
        time.sleep(0.2)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        scrape()
        times.append((time.perf_counter() - start) * 1000)
    conn.close()
    for s in socks:
        s.close()
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of webhook posts per row")
    parser.add_argument("--messages", type=int, default=20000,
                        help="chat messages per sender (a few seconds)")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--post-rates", default="1000,500",
                        help="webhook posts/s offered beside the chat, one row each (0: flat out)")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {1})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for _ in range(args.rounds):
            with server(workdir) as port:
                token = add_hook(port)
                rows.setdefault("webhook posts/s alone (8 keep-alive connections)", []).append(
                    webhook_posts(port, token, args.seconds))
                rows.setdefault("chat protocol messages/s (1 connection, 16 in flight)", []).append(
                    chat_protocol(port, 5000))
                rows.setdefault("chatctl send messages/s (a process each)", []).append(
                    send_processes(port, 20))
            with server(workdir) as port:
                rows.setdefault("chat deliveries/s, 100 clients, alone", []).append(
                    deliveries(chat_bench(port, args.messages)))
            for rate in (float(r) for r in args.post_rates.split(",")):
                with server(workdir) as port:
                    token = add_hook(port)
                    bench = chat_bench(port, args.messages)
                    posted: list[float] = []
                    poster = threading.Thread(target=lambda p=port, t=token, r=rate, out=posted: out.append(
                        webhook_posts(p, t, args.seconds, r)))
                    poster.start()
                    chat = deliveries(bench)
                    poster.join()
                    rows.setdefault(f"chat deliveries/s, 100 clients, with {rate:,.0f} posts/s offered",
                                    []).append(chat)
                    rows.setdefault(f"webhook posts/s made meanwhile ({rate:,.0f} offered)",
                                    []).append(posted[0])
        with server(workdir) as port:
            scrape_ms = scrape_with_connections(port, args.connections)
    print(machine_line())
    print(f"\n| row | median of {args.rounds} |\n|---|---:|")
    for label, values in rows.items():
        print(f"| {label} | {median(values):,.0f} |")
    alone = median(rows["chat deliveries/s, 100 clients, alone"])
    for rate in (float(r) for r in args.post_rates.split(",")):
        mixed = median(rows[f"chat deliveries/s, 100 clients, with {rate:,.0f} posts/s offered"])
        print(f"\nchat throughput with {rate:,.0f} webhook posts/s: {mixed / alone:.2f} of without", end="")
    print()
    print(f"/metrics scrape with {args.connections:,} connections open: {scrape_ms:.1f} ms (median of 20)")


if __name__ == "__main__":
    main()
