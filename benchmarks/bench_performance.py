#!/usr/bin/env python3
"""The performance targets of chatctl serve, each measured against a baseline in the same run.

    python benchmarks/bench_performance.py all            # everything below, about 4 minutes
    python benchmarks/bench_performance.py fanout         # deliveries/s against the naive server
    python benchmarks/bench_performance.py latency        # p99 at 100 clients, 10 senders, 1000 msg/s
    python benchmarks/bench_performance.py scale          # 2000 connections, memory per idle one
    python benchmarks/bench_performance.py slow-reader    # one stalled client among 100
    python benchmarks/bench_performance.py history        # history on against off
    python benchmarks/bench_performance.py startup        # chatctl send against python -c 'import socket'
    python benchmarks/bench_performance.py agreement      # chatctl bench against the C generator
    python benchmarks/bench_performance.py presence       # 4096 join, then leave, at once (vs a revision)
    python benchmarks/bench_performance.py rooms          # 1000 clients in 100 rooms of 10, all sending
    python benchmarks/bench_performance.py room-scale     # 10,000 connections, each in two rooms

The server runs on core 0 and the load on core 1 (taskset), with the abuse
limits off and a 64 MiB SendQ, as load tests run.  The load is chatload, the C
generator in ../shared/chatbench (built to /tmp/chatload if missing), and the
baseline is its naive_seed_server.py.  Figures are medians of --rounds runs,
servers alternating.  Loopback only; every run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHATBENCH = ROOT.parent / "shared" / "chatbench"
CHATLOAD = Path("/tmp/chatload")
LOAD_CONFIG = """[server]
sendq = 67108864
idle_timeout = 0.0
register_timeout = 0.0
max_connections = 0
max_per_address = 0
rate = 0
log_level = "warning"
"""
FANOUT_ROWS = [(10, 10, 3000), (100, 10, 300), (100, 100, 30), (1000, 1, 300)]  # N, S, M for the naive server


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() >= 2 else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@contextmanager
def chatctl_server(workdir: Path, history: bool = False, sendq: int = 64 << 20, script: Path | None = None,
                   extra: str = "", env: dict[str, str] | None = None, db: Path | None = None):
    """``chatctl serve`` (``script``: another revision's chatctl.py) on a free port, pinned to core 0,
    with LOAD_CONFIG and ``extra`` (more [server] keys, then other sections) and ``env``, on history
    database ``db`` (a new one if None); yields (pid, port)."""
    conf = workdir / "load.toml"
    conf.write_text(LOAD_CONFIG.replace("sendq = 67108864", f"sendq = {sendq}") + extra)
    db = db or workdir / f"history-{time.monotonic_ns()}.db"
    # (a data directory of its own: each server starts with no accounts, as with no history)
    env = {**os.environ, "XDG_DATA_HOME": str(workdir / f"data-{time.monotonic_ns()}"), **(env or {})}
    log = workdir / f"serve-{time.monotonic_ns()}.log"  # a file, not a pipe: logging never waits for us
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [*pinned(0), sys.executable, str(script or ROOT / "chatctl.py"), "serve", "-H", "127.0.0.1",
             "-p", "0", "--config", str(conf), "--db", str(db), "--history" if history else "--no-history",
             "--log-level", "info"], stderr=log_file, env=env, cwd=workdir)
    try:
        yield proc.pid, listening_port(proc, log)
    finally:
        proc.terminate()
        proc.wait(60)


def listening_port(proc: subprocess.Popen, log: Path, limit: float = 30) -> int:
    """The port ``chatctl serve`` says it listens on, in its log; exits if it does not start."""
    deadline = time.monotonic() + limit
    while not (match := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("chatctl serve did not start: " + log.read_text()[-500:])
        time.sleep(0.05)
    return int(match.group(1))


@contextmanager
def naive_server():
    port = free_port()
    proc = subprocess.Popen([*pinned(0), sys.executable, str(CHATBENCH / "naive_seed_server.py"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(15)


RUNS = iter(range(1, 1 << 30))


def chatload(pid: int, port: int, n: int, s: int, m: int, *extra: str) -> dict:
    prefix = f"cb{next(RUNS)}x"  # names of a run that just ended may still be leaving
    out = subprocess.run([*pinned(1), str(CHATLOAD), "--proto", "seed", "--port", str(port), "-n", str(n),
                          "-s", str(s), "-m", str(m), "--server-pid", str(pid), "--time-limit", "120",
                          "--name-prefix", prefix, *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def chatctl_bench(port: int, n: int, s: int, m: int, *extra: str) -> dict:
    out = subprocess.run([*pinned(1), sys.executable, str(ROOT / "chatctl.py"), "bench", "--yes",
                          "-p", str(port), "-n", str(n), "-s", str(s), "-m", str(m), "--json", *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def machine_line(*also: str) -> str:
    """What a run's figures were measured on: cores, CPU, Python (and ``also``), the date."""
    with open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    return ", ".join([f"# {os.cpu_count()} cores ({cpu})", f"Python {sys.version.split()[0]}", *also,
                      time.strftime("%Y-%m-%d")])


def median(values) -> float:
    return statistics.median(values)


def mega(x: float) -> str:
    return f"{x / 1e6:.2f} M"


# --- the targets ------------------------------------------------------------------------------


def fanout(args, workdir: Path) -> None:
    print(f"\n## Fan-out: deliveries/s, medians of {args.rounds} rounds (chatctl runs 5x the messages)")
    print("| N / S | naive | chatctl | ratio | lost | disconnects | chatctl p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, s, m in FANOUT_ROWS:
        naive, ours, trouble, p99 = [], [], [0, 0], []
        for _ in range(args.rounds):
            with naive_server() as (pid, port):
                naive.append(chatload(pid, port, n, s, m)["deliveries_per_s"])
            with chatctl_server(workdir) as (pid, port):
                result = chatload(pid, port, n, s, m * 5)
            ours.append(result["deliveries_per_s"])
            trouble[0] += result["lost"]
            trouble[1] += result["disconnects"]
            p99.append(result["latency_us"]["p99"] / 1000)
        print(f"| {n} / {s} | {mega(median(naive))} | {mega(median(ours))} | "
              f"{median(ours) / median(naive):.1f}x | {trouble[0]} | {trouble[1]} | {median(p99):.1f} ms |",
              flush=True)


def latency(args, workdir: Path) -> None:
    print(f"\n## Latency at 100 clients, 10 senders, 1000 messages/s offered (medians of {args.rounds})")
    rows = []
    for _ in range(args.rounds):
        with chatctl_server(workdir) as (pid, port):
            r = chatload(pid, port, 100, 10, 500, "-r", "1000")
            rows.append((r["latency_us"]["p50"], r["latency_us"]["p99"], r["latency_us"]["max"],
                         r["deliveries_per_s"], r["lost"]))
    p50, p99, worst, rate, lost = (median(c) for c in zip(*rows, strict=True))
    print(f"p50 {p50 / 1000:.2f} ms, p99 {p99 / 1000:.2f} ms, max {worst / 1000:.2f} ms, "
          f"{rate:,.0f} deliveries/s, lost {lost:.0f}")


def scale(args, workdir: Path) -> None:
    import resource

    clients = args.connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, clients + 100)), hard))
    print(f"\n## Scale: {clients} connections held by one server")
    with chatctl_server(workdir) as (pid, port):
        time.sleep(0.5)
        before = rss_kib(pid)
        socks = []
        for i in range(clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"USER|idle{i}\n".encode())
            socks.append(sock)
        pending = set(socks)
        sel = selectors.DefaultSelector()
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        buffers = {sock: b"" for sock in socks}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                data = key.fileobj.recv(1 << 16)
                buffers[key.fileobj] += data
                if b"USER_OK" in buffers[key.fileobj]:
                    pending.discard(key.fileobj)
        time.sleep(1)
        after = rss_kib(pid)
        per = (after - before) / clients
        print(f"registered {clients - len(pending)} of {clients}; server RSS {before} KiB idle, {after} KiB "
              f"with them: {per:.1f} KiB per idle connection")
        for sock in socks:
            buffers[sock] = b""
        for k in range(10):
            socks[0].setblocking(True)
            socks[0].sendall(f"MSG|scale check {k}\n".encode())
        got = {sock: 0 for sock in socks[1:]}
        deadline = time.monotonic() + 60
        while any(v < 10 for v in got.values()) and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                if key.fileobj is socks[0]:
                    key.fileobj.recv(1 << 16)
                    continue
                got[key.fileobj] += key.fileobj.recv(1 << 16).count(b"scale check")
        complete = sum(v == 10 for v in got.values())
        print(f"10 messages from one client: {complete} of {clients - 1} others got all 10")
        for sock in socks:
            sock.close()


def slow_reader(args, workdir: Path) -> None:
    print("\n## A stalled client among 100 (100 clients, 10 senders, default 1 MiB SendQ; "
          f"{args.rounds * 2} rounds, alternating which comes first)")
    free, stalled, dropped = [], [], []
    for round_ in range(args.rounds * 2):
        with chatctl_server(workdir, sendq=1 << 20) as (pid, port):
            chatload(pid, port, 100, 10, 300)  # a warm-up, not counted
            for with_staller in ((False, True) if round_ % 2 else (True, False)):
                staller = None
                if with_staller:  # registered, and never reads a byte
                    staller = socket.create_connection(("127.0.0.1", port))
                    staller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    staller.sendall(f"USER|staller{round_}\n".encode())
                    time.sleep(0.3)
                result = chatload(pid, port, 100, 10, 1000)
                (stalled if with_staller else free).append(result["deliveries_per_s"])
                dropped.append(result["lost"])
                if staller is not None:
                    staller.close()
    print(f"without: {mega(median(free))}, with one stalled client: {mega(median(stalled))} "
          f"deliveries/s; ratio {median(stalled) / median(free):.2f}; lost {sum(dropped)}")


def history(args, workdir: Path) -> None:
    print(f"\n## History on against off (10 clients, 10 senders, 3000 messages each; {args.rounds} rounds)")
    off, on = [], []
    for _ in range(args.rounds):
        for flag, into in ((False, off), (True, on)):
            with chatctl_server(workdir, history=flag) as (pid, port):
                into.append(chatload(pid, port, 10, 10, 3000)["messages_per_s"])
    print(f"off {median(off):,.0f} msg/s, on {median(on):,.0f} msg/s: ratio {median(on) / median(off):.2f}")


def startup(args, workdir: Path) -> None:
    script = Path(sys.executable).parent / "chatctl"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "chatctl"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as users run it
    env["XDG_CONFIG_HOME"] = str(workdir / "config")
    subprocess.run([sys.executable, "-c", "import chatctl"], env=env, check=True, cwd=ROOT)  # the .pyc
    print(f"\n## chatctl send start-up: {' '.join(command)} send ..., median of {args.runs} runs each")
    with chatctl_server(workdir) as (_, port):
        bare, send = [], []
        for i in range(args.runs):
            for argv, into in (([sys.executable, "-c", "import socket"], bare),
                               ([*command, "send", "-p", str(port), "-u", f"s{i}", "hi"], send)):
                started = time.perf_counter()
                subprocess.run(argv, env=env, check=True, capture_output=True)
                into.append(time.perf_counter() - started)
    print(f"python3 -c 'import socket': {median(bare) * 1000:.1f} ms; chatctl send: "
          f"{median(send) * 1000:.1f} ms; ratio {median(send) / median(bare):.2f}")


def agreement(args, workdir: Path) -> None:
    print(f"\n## chatctl bench against chatload on the same server (100 / 10 / 1000; {args.rounds} rounds)")
    ours, theirs = [], []
    with chatctl_server(workdir) as (pid, port):
        for _ in range(args.rounds):
            theirs.append(chatload(pid, port, 100, 10, 1000)["deliveries_per_s"])
            ours.append(chatctl_bench(port, 100, 10, 1000)["deliveries_per_s"])
    print(f"chatload {mega(median(theirs))}, chatctl bench {mega(median(ours))} deliveries/s: "
          f"ratio {median(ours) / median(theirs):.2f}")


def mass_presence(port: int, n: int, time_limit: float = 120.0) -> tuple[float, float]:
    """``n`` clients (HELLO, USER) registering at once, then all closing at once.

    Returns the seconds until every one had its USER_OK, and the seconds from
    the mass close until a newcomer's message is acknowledged.  The clients
    read and drop whatever comes (the JOIN notices), as a client would.
    """
    selector = selectors.DefaultSelector()
    socks = []
    started = time.monotonic()
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"HELLO|chatctl/1\nUSER|p{i}x{os.getpid()}\n".encode())
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, [b"", False])
        socks.append(sock)
    waiting = n
    deadline = started + time_limit
    while waiting and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            state = key.data
            try:
                data = key.fileobj.recv(1 << 16)
            except BlockingIOError:
                continue
            if not state[1]:
                seen = state[0] + data
                if b"USER_OK\n" in seen:
                    state[1] = True
                    waiting -= 1
                state[0] = seen[-16:]  # USER_OK may straddle two reads
    joined = time.monotonic() - started
    selector.close()
    return (joined if not waiting else float("inf")), close_all_then_ask(port, socks, time_limit)


def close_all_then_ask(port: int, socks: list[socket.socket], time_limit: float = 120.0) -> float:
    """Close every one of ``socks`` at once; the seconds until a newcomer's message is acknowledged."""
    for sock in socks:
        sock.close()
    left = time.monotonic()
    newcomer = socket.create_connection(("127.0.0.1", port), timeout=time_limit)
    newcomer.sendall(b"USER|late\nMSG|anyone?\n")
    received = b""
    while b"MSG_OK" not in received:
        chunk = newcomer.recv(4096)
        if not chunk:
            break
        received += chunk
    newcomer.close()
    return time.monotonic() - left


def presence(args, workdir: Path) -> None:
    old = workdir / "baseline" / "chatctl.py"
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:chatctl.py"],
                                   capture_output=True, check=True).stdout)
    n = args.presence_clients
    print(f"\n## presence: {n} clients joining at once, then leaving at once "
          f"(this tree against {args.baseline}; medians of {args.rounds})")
    results: dict[str, list[tuple[float, float]]] = {"baseline": [], "chatctl": []}
    for _ in range(args.rounds):
        for label, script in (("baseline", old), ("chatctl", None)):
            with chatctl_server(workdir, sendq=1 << 20, script=script) as (_pid, port):
                results[label].append(mass_presence(port, n))
    print("| server | all joined | newcomer answered after the mass leave |\n|---|---:|---:|")
    for label, runs in results.items():
        print(f"| {label} | {median(r[0] for r in runs):.2f} s | {median(r[1] for r in runs):.2f} s |")


_PROBE = re.compile(rb"~P(\d+)\.")


def room_load(port: int, clients: int, room_size: int, messages: int, window: int = 8,
              time_limit: float = 120.0) -> dict:
    """``clients`` connections (HELLO, USER, JOIN #rK, K = index // room_size), each sending
    ``messages`` messages to its room, at most ``window`` of them not yet acknowledged; every client
    reads everything.  Deliveries are counted by a marker (bytes.count, so the generator keeps up);
    one message in 8 carries its send time, for the latency."""
    selector = selectors.DefaultSelector()
    tag = f"{os.getpid()}x{time.monotonic_ns() % 100000}"
    state = []
    for i in range(clients):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        room = f"r{i // room_size}"
        sock.sendall(f"HELLO|chatctl/1\nUSER|rl{i}x{tag}\nJOIN|#{room}\n".encode())
        sock.setblocking(False)
        entry = {"sock": sock, "room": room.encode(), "tail": b"", "joined": False, "sent": 0, "acked": 0,
                 "got": 0}
        selector.register(sock, selectors.EVENT_READ, entry)
        state.append(entry)
    deadline = time.monotonic() + time_limit
    waiting = clients
    while waiting and time.monotonic() < deadline:  # everyone in their room before anyone sends
        for key, _ in selector.select(1.0):
            entry = key.data
            data = entry["tail"] + key.fileobj.recv(1 << 16)
            if not entry["joined"] and b"JOIN_OK|" in data:
                entry["joined"] = True
                waiting -= 1
            entry["tail"] = data[-32:]
    if waiting:
        raise SystemExit(f"{waiting} clients never got their JOIN_OK")

    def send_more(entry: dict) -> None:
        frames = []
        while entry["sent"] < messages and entry["sent"] - entry["acked"] < window:
            seq = entry["sent"]
            probe = f"~P{time.monotonic_ns()}." if seq % 8 == 0 else ""
            frames.append(b"MSG|#" + entry["room"] + f"|~B{seq}.{probe}{'x' * 48}\n".encode())
            entry["sent"] += 1
        if frames:
            entry["sock"].sendall(b"".join(frames))  # a few hundred bytes: the socket buffer takes it

    latencies: list[int] = []
    started = time.monotonic()
    for entry in state:
        send_more(entry)
    expected = clients * messages * (room_size - 1)
    received, last_progress = 0, time.monotonic()
    while received < expected and time.monotonic() - last_progress < 3.0 and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            entry = key.data
            try:
                data = key.fileobj.recv(1 << 18)
            except BlockingIOError:
                continue
            data = entry["tail"] + data
            cut = data.rfind(b"\n") + 1
            whole, entry["tail"] = data[:cut], data[cut:]
            got = whole.count(b"|~B")
            acks = whole.count(b"MSG_OK|")
            if got:
                received += got
                now = time.monotonic_ns()
                latencies.extend(now - int(ns) for ns in _PROBE.findall(whole))
                last_progress = time.monotonic()
            if acks:
                entry["acked"] += acks
                send_more(entry)
    elapsed = (last_progress if received < expected else time.monotonic()) - started
    for entry in state:
        entry["sock"].close()
    selector.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] / 1e6 if latencies else float("nan")
    return {"deliveries_per_s": received / elapsed, "p99_ms": p99, "lost": expected - received,
            "seconds": elapsed}


def rooms(args, workdir: Path) -> None:
    print(f"\n## Rooms: 1000 clients in 100 rooms of 10, every client sending, history on "
          f"(medians of {args.rounds}); beside it the same generator on 10 clients in one room")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    rows: dict[str, list[dict]] = {"1000 in 100 rooms of 10": [], "10 in 1 room": []}
    for _ in range(args.rounds):
        with chatctl_server(workdir, history=True) as (_pid, port):
            rows["10 in 1 room"].append(room_load(port, 10, 10, 3000))
        with chatctl_server(workdir, history=True) as (_pid, port):
            rows["1000 in 100 rooms of 10"].append(room_load(port, 1000, 10, 40))
    print("| load | deliveries/s | p99 | lost |\n|---|---:|---:|---:|")
    for label, runs in rows.items():
        print(f"| {label} | {mega(median(r['deliveries_per_s'] for r in runs))} | "
              f"{median(r['p99_ms'] for r in runs):.1f} ms | {sum(r['lost'] for r in runs)} |", flush=True)


def room_scale(args, workdir: Path) -> None:
    """``--connections`` clients (10,000 by default here), each HELLO, USER and JOIN of a second room
    (#main is the first): the time until all are in, RSS per idle connection, one message per room
    reaching every member, then the time until a newcomer is answered after they all leave at once."""
    import resource

    n = args.connections if args.connections != 2000 else 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 200)), hard))
    print(f"\n## Room scale: {n} connections, each registered and in #main and one of {n // 100} rooms")
    conf_sendq = 1 << 20
    with chatctl_server(workdir, sendq=conf_sendq) as (pid, port):
        time.sleep(0.5)
        before = rss_kib(pid)
        selector = selectors.DefaultSelector()
        socks = []
        started = time.monotonic()
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(f"HELLO|chatctl/1\nUSER|sc{i}\nJOIN|#s{i % (n // 100)}\n".encode())
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, {"tail": b"", "in": False, "got": 0, "i": i})
            socks.append(sock)
        waiting, deadline = n, time.monotonic() + 300
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                entry = key.data
                try:
                    data = entry["tail"] + key.fileobj.recv(1 << 18)
                except BlockingIOError:
                    continue
                if not entry["in"] and b"JOIN_OK|" in data:
                    entry["in"] = True
                    waiting -= 1
                entry["tail"] = data[-32:]
        joined = time.monotonic() - started
        settle = time.monotonic() + 60  # drain the JOIN and ENTER notices until quiet
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2.0 and time.monotonic() < settle:
            for key, _ in selector.select(0.5):
                try:
                    key.fileobj.recv(1 << 18)
                    quiet_since = time.monotonic()
                except BlockingIOError:
                    pass
        after = rss_kib(pid)
        print(f"all {n - waiting} of {n} registered and in their second room after {joined:.1f} s; "
              f"notices drained after {time.monotonic() - started:.1f} s")
        print(f"server RSS {before} KiB idle, {after} KiB with them: {(after - before) / n:.1f} KiB per "
              "connection")
        for r in range(n // 100):  # the first member of each room speaks once
            socks[r].sendall(f"MSG|#s{r}|scale check\n".encode())
        got, deadline = 0, time.monotonic() + 60
        expected = n - n // 100  # the others of each room
        while got < expected and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                try:
                    got += key.fileobj.recv(1 << 18).count(b"|scale check")
                except BlockingIOError:
                    pass
        print(f"one message in each room: {got} of {expected} deliveries arrived")
        selector.close()
        answered = close_all_then_ask(port, socks)
        print(f"all {n} closed at once: a newcomer was answered {answered:.2f} s later")


TARGETS = {"fanout": fanout, "latency": latency, "scale": scale, "slow-reader": slow_reader,
           "history": history, "startup": startup, "agreement": agreement,
           "presence": presence, "rooms": rooms, "room-scale": room_scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", choices=[*TARGETS, "all"], metavar="TARGET",
                    help=f"{', '.join(TARGETS)} or all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=21, help="start-up runs of each command")
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--presence-clients", type=int, default=4096)
    ap.add_argument("--baseline", default="88fe70d", help="the revision presence compares against")
    args = ap.parse_args()
    if not CHATLOAD.exists():
        subprocess.run(["sh", str(CHATBENCH / "build.sh"), str(CHATLOAD)], check=True)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="chatctl-bench-") as tmp:
        for name, run in TARGETS.items():
            if name in args.targets or "all" in args.targets:
                run(args, Path(tmp))


if __name__ == "__main__":
    main()
