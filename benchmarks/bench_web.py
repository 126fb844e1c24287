#!/usr/bin/env python3
"""The browser client's figures: WebSocket fan-out beside chatctl/1's, memory per tab, the first page load.

    .venv/bin/python benchmarks/bench_web.py [--rounds 3] [--messages 300] [--tabs 1000]

In one run, each row a fresh ``chatctl serve`` (history on, abuse limits off, pinned to core 0; the
clients in this process on the other cores):

- fan-out: 100 clients in #main, 10 of them sending ``--messages`` each (20 in flight per sender),
  every client counting what it gets: all chatctl/1, all WebSocket (the browser's protocol: a
  logged-in tab each, events as JSON), and half and half in the same room; deliveries/s, medians of
  ``--rounds`` rounds, and the WebSocket's rate as a share of chatctl/1's;
- memory: the server's RSS growth per connection with ``--tabs`` idle tabs open and registered
  (each with its cookie, its WebSocket and its name), beside the same number of chatctl/1 clients;
- the first page load: the bytes of / and every file it names, and the time from asking for / to
  the login form on screen in Debian's chromium (a fresh profile each time: nothing cached), median
  of 10.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import selectors
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_performance import chatctl_server, machine_line, median, rss_kib

MARK = b"bench-payload"
WINDOW = 20


@contextmanager
def server(workdir: Path):
    """This benchmark's server: history on, its limits off."""
    extra = "address_byte_rate = 0\n[http]\nrequest_rate = 0.0\n"
    with chatctl_server(workdir, history=True, extra=extra) as (pid, port):
        yield (pid, port)


# --- clients of both protocols, on plain sockets ------------------------------------------------------


def login(port: int, name: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/api/login", json.dumps({"name": name}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"login of {name} failed: {response.status}")
    return response.getheader("Set-Cookie").split(";")[0]


def ws_frame(text: bytes) -> bytes:
    """A client's text frame (masked with a zero key, as RFC 6455 allows: the server unmasks all the same)."""
    size = len(text)
    head = bytes((0x81, 0x80 | size)) if size < 126 else bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    return head + b"\0\0\0\0" + text


class Client:
    """One connection of either protocol, registered; ``wire`` makes a request's bytes."""

    def __init__(self, port: int, name: str, web: bool):
        self.web = web
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tail = b""
        self.count = 0       # deliveries seen (MARK)
        self.acks = 0
        if web:
            cookie = login(port, name)
            self.sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Key: YmVuY2hiZW5jaGJlbmNoIQ==\r\n"
                              f"Sec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n".encode())
            self._until(b'"Registered"')
        else:
            self.sock.sendall(f"HELLO|chatctl/1\nUSER|{name}\n".encode())
            self._until(b"USER_OK")

    def _until(self, marker: bytes) -> None:
        data = b""
        while marker not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit(f"the server closed a connection: {data[-300:]!r}")
            data += chunk

    def wire(self, text: str) -> bytes:
        return ws_frame(f"MSG|#main|{text}".encode()) if self.web else f"MSG|#main|{text}\n".encode()

    def feed(self, data: bytes) -> None:
        # a marker cut in two by the reads is counted once: matches wholly inside the old tail were
        # counted with the read before
        ack = b'"Acknowledged"' if self.web else b"MSG_OK"
        both = self.tail + data
        self.count += both.count(MARK) - self.tail.count(MARK)
        self.acks += both.count(ack) - self.tail.count(ack)
        self.tail = both[-max(len(MARK), len(ack)) + 1:]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fanout(port: int, clients: int, senders: int, messages: int, web_share: float,
           pid: int = 0) -> dict[str, float]:
    """Deliveries/s to each protocol's clients, from the first send to the last delivery; and, with
    ``pid``, the server's CPU time per 1,000 deliveries (``cpu``, ms)."""
    webs = round(clients * web_share)
    group = [Client(port, f"{'w' if i < webs else 'c'}{i}-{time.monotonic_ns() % 100000}", i < webs)
             for i in range(clients)]
    # senders from both protocols in proportion
    sending = [c for c in group if c.web][:round(senders * web_share)]
    sending += [c for c in group if not c.web][:senders - len(sending)]
    expected = senders * messages * (clients - 1)
    payload = "x" * 20 + MARK.decode()
    selector = selectors.DefaultSelector()
    for c in group:
        c.sock.setblocking(False)
        selector.register(c.sock, selectors.EVENT_READ, c)
    sent = {id(c): 0 for c in sending}
    cpu_before = cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    done_at: dict[bool, float] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for c in sending:  # keep WINDOW in flight per sender
            while sent[id(c)] < messages and sent[id(c)] - c.acks < WINDOW:
                c.sock.setblocking(True)
                c.sock.sendall(c.wire(payload))
                c.sock.setblocking(False)
                sent[id(c)] += 1
        for key, _ in selector.select(0.5):
            try:
                data = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("the server closed a connection during the run")
            key.data.feed(data)
        for web in (True, False):
            members = [c for c in group if c.web == web]
            if members and web not in done_at:
                want = sum(senders * messages - (sent[id(c)] if id(c) in sent else 0) for c in members)
                if sum(c.count for c in members) >= want:
                    done_at[web] = time.perf_counter()
        if len(done_at) == len({c.web for c in group}):
            break
    else:
        raise SystemExit("the fan-out did not finish in 300 s")
    cpu = (cpu_seconds(pid) - cpu_before) * 1000 / (expected / 1000) if pid else 0.0
    got = sum(c.count for c in group)
    if got != expected:
        raise SystemExit(f"deliveries lost: {got} of {expected}")
    for c in group:
        selector.unregister(c.sock)
        c.sock.close()
    rates = {}
    for web, at in done_at.items():
        members = [c for c in group if c.web == web]
        rates["web" if web else "chatctl/1"] = sum(c.count for c in members) / (at - start)
    rates["cpu"] = cpu
    return rates


def memory_per_connection(pid: int, port: int, count: int, web: bool) -> float:
    """The server's RSS growth per registered connection, in KiB."""
    before = rss_kib(pid)
    group = [Client(port, f"{'m' if web else 'n'}{i}", web) for i in range(count)]
    time.sleep(1.0)  # (the last registrations' presence lines are out)
    after = rss_kib(pid)
    for c in group:
        c.sock.close()
    return (after - before) / count


def page_bytes(port: int) -> tuple[int, int, float]:
    """The bytes of / and of every file it names, headers included, asked for one after the other on
    one connection: (files, bytes, ms)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read()
    total = len(page) + sum(len(k) + len(v) + 4 for k, v in response.getheaders())
    paths = sorted(set(re.findall(r'"(/static/[0-9a-f]+/[a-z.]+)"', page.decode())))
    for path in paths:
        conn.request("GET", path)
        response = conn.getresponse()
        total += len(response.read()) + sum(len(k) + len(v) + 4 for k, v in response.getheaders())
    conn.close()
    return len(paths) + 1, total, (time.perf_counter() - started) * 1000


def login_times(port: int, loads: int) -> list[float]:
    """ms from asking for / to the login form on screen, in chromium, nothing cached: the page's own
    clock (its navigation's start to the mark app.js makes once the form is up)."""
    from playwright.sync_api import sync_playwright

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        return []
    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(loads + 1):
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#login:not([hidden])")
            times.append(page.evaluate("() => performance.getEntriesByName('chatctl-login')[0].startTime"))
            context.close()
        browser.close()
    return times[1:]  # (the first warms the browser itself up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--tabs", type=int, default=1000)
    args = parser.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        workdir = Path(tmp)
        print(f"\n## Fan-out: 100 clients in #main, 10 senders x {args.messages} messages, deliveries/s "
              f"(median of {args.rounds})")
        print("| clients | chatctl/1 | WebSocket (JSON) | WebSocket / chatctl/1 | server CPU per 1,000 "
              "deliveries, ms (chatctl/1, WebSocket) |\n|---|---|---|---|---|")
        separate: dict[str, list[float]] = {"web": [], "chatctl/1": [], "cpu web": [], "cpu chatctl/1": []}
        mixed: dict[str, list[float]] = {"web": [], "chatctl/1": [], "cpu": []}
        for _ in range(args.rounds):  # the rows' runs interleaved, each on a fresh server
            for web in (False, True):
                with server(workdir) as (pid, port):
                    figures = fanout(port, 100, 10, args.messages, 1.0 if web else 0.0, pid)
                kind = "web" if web else "chatctl/1"
                separate[kind].append(figures[kind])
                separate[f"cpu {kind}"].append(figures["cpu"])
            with server(workdir) as (pid, port):
                figures = fanout(port, 100, 10, args.messages, 0.5, pid)
            for key in mixed:
                mixed[key].append(figures[key])
        ours, web = median(separate["chatctl/1"]), median(separate["web"])
        print(f"| all chatctl/1, then all WebSocket | {ours:,.0f} | {web:,.0f} | {web / ours:.2f} | "
              f"{median(separate['cpu chatctl/1']):.1f}, {median(separate['cpu web']):.1f} |")
        ours, web = median(mixed["chatctl/1"]), median(mixed["web"])
        print(f"| half and half, one room | {ours:,.0f} | {web:,.0f} | {web / ours:.2f} | "
              f"{median(mixed['cpu']):.1f} (both) |")

        print(f"\n## Memory: the server's RSS growth per connection, {args.tabs} idle connections, KiB")
        with server(workdir) as (pid, port):
            tab = memory_per_connection(pid, port, args.tabs, True)
        with server(workdir) as (pid, port):
            line = memory_per_connection(pid, port, args.tabs, False)
        print(f"| a browser tab (WebSocket) | {tab:.1f} |\n| a chatctl/1 client | {line:.1f} |")

        print("\n## The first page load, loopback (medians of 10)")
        with server(workdir) as (_, port):
            loads = [page_bytes(port) for _ in range(11)][1:]
            times = login_times(port, 10)
        files, size = loads[0][:2]
        served = median([load[2] for load in loads])
        print("| files | bytes, headers included | all of them over one connection, ms "
              "| to the login form in chromium, ms |\n|---|---|---|---|")
        print(f"| {files} | {size:,} | {served:.1f} | {median(times):.0f} |" if times else
              f"| {files} | {size:,} | {served:.1f} | (no chromium) |")


if __name__ == "__main__":
    main()
