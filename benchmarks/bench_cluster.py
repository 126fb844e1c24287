#!/usr/bin/env python3
"""The cluster targets of chatctl serve --bus, each measured against a baseline in the same run.

    python benchmarks/bench_cluster.py all                # everything below, about 3 minutes
    python benchmarks/bench_cluster.py bus-vs-standalone  # one server on the bus against it alone
    python benchmarks/bench_cluster.py two-servers        # two servers on one Redis: cross-server latency

Run it with the Python that has redis-py (.venv/bin/python): the servers are
started with this interpreter.  Each Redis is a redis-server of our own
(``--save ""``, append-only file off unless a row says otherwise) on a free
loopback port, in a temporary directory; each set of servers gets a cluster
name of its own, so no server reads an earlier run's log.  In bus-vs-standalone
the server runs on core 0, the load and Redis on core 1 (taskset): the
server's core is its own, as in bench_performance.py, with Redis beside the
load (a cluster's Redis is another process, usually on another host).  The
abuse limits are off and the SendQ is 64 MiB, as in bench_performance.py,
and history is on everywhere (a server on the bus keeps its own).

bus-vs-standalone drives one server with chatload (../shared/chatbench, the seed
protocol; built to /tmp/chatload if missing).  two-servers needs clients on two
ports, so its load is the Python generator below (HELLO clients, every message
carrying its send time), which is measured against one standalone server too:
that row is the generator's own floor.  Two servers, Redis and the generator
share two cores: server a and the generator run on core 0, server b and Redis
on core 1 (of the placements tried, the one whose p99 repeated best; both
servers on core 0 put it at 90% busy).  Figures are medians of --rounds runs,
setups alternating.  Loopback only; every wait has a time limit, every process
is stopped in a finally block and the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from contextlib import ExitStack, contextmanager
from itertools import count
from pathlib import Path

from bench_performance import (
    CHATBENCH,
    CHATLOAD,
    LOAD_CONFIG,
    ROOT,
    chatload,
    free_port,
    listening_port,
    machine_line,
    median,
    mega,
    pinned,
)

TICK = os.sysconf("SC_CLK_TCK")
CLUSTERS = count(1)  # a cluster name per set of servers: a fresh server with a fresh history reads the
#                      log from its start, so it must not find an earlier run's there
LOG_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
TROUBLE: list[str] = []  # warnings and errors from the servers' logs, printed after each target


# --- processes ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (its name may hold spaces: split after the last ')')."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(workdir: Path, core: int, aof: bool = False):
    """A redis-server of our own on a free loopback port, pinned to ``core``; yields (pid, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))
    port = free_port()
    with open(directory / "redis.log", "w") as log_file:
        proc = subprocess.Popen(
            [*pinned(core), binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--save", "", "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec",
             "--protected-mode", "no", "--daemonize", "no"], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not pings(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                log = (directory / "redis.log").read_text()
                raise SystemExit(f"redis-server did not start: {log[-500:]}")
            time.sleep(0.05)
        yield proc.pid, f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc, 10)


@contextmanager
def chatctl_node(workdir: Path, core: int = 0, bus: str = "", server_id: str = "", cluster: str = ""):
    """``chatctl serve --history`` on a free port, pinned to ``core``, as bench_performance's
    chatctl_server; with ``bus``, on that Redis as ``server_id`` (CHATCTL_SERVER_ID) in ``cluster``
    (CHATCTL_CLUSTER).  Yields (pid, port); warnings and errors in its log go to TROUBLE when it stops."""
    conf = workdir / "load.toml"
    conf.write_text(LOAD_CONFIG)
    stamp = time.monotonic_ns()
    db = workdir / f"history-{server_id or 'alone'}-{stamp}.db"
    env = {**os.environ, "XDG_DATA_HOME": str(workdir / "data")}
    bus_args: list[str] = []
    if bus:
        env.update(CHATCTL_SERVER_ID=server_id, CHATCTL_CLUSTER=cluster)
        bus_args = ["--bus", bus]
    log = workdir / f"serve-{server_id or 'alone'}-{stamp}.log"  # a file: logging never waits for us
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [*pinned(core), sys.executable, str(ROOT / "chatctl.py"), "serve", "-H", "127.0.0.1", "-p", "0",
             "--config", str(conf), "--db", str(db), "--history", "--log-level", "info", *bus_args],
            stderr=log_file, env=env, cwd=workdir)
    try:
        yield proc.pid, listening_port(proc, log)
    finally:
        stop(proc, 30)
        label = f"server {server_id}" if bus else "standalone server"
        TROUBLE.extend(f"{label}: {ln}" for ln in log.read_text().splitlines() if LOG_TROUBLE.search(ln))
        if proc.returncode not in (0, -15):
            TROUBLE.append(f"{label}: exit status {proc.returncode}")


@contextmanager
def on_core(core: int):
    """This process (the Python load generator) on ``core`` while inside; children started in here inherit
    it, so start the servers first."""
    before = os.sched_getaffinity(0)
    if pinned(core):
        os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def report_trouble() -> None:
    if not TROUBLE:
        print("server logs: no warning or error")
        return
    print(f"server logs: {len(TROUBLE)} warning/error line(s), the first ones:")
    for line in TROUBLE[:8]:
        print(f"    {line}")
    TROUBLE.clear()


# --- the two-port load generator -------------------------------------------------------------------

_PROBE = re.compile(rb"~S(\d+)\.(\d+)\.P(\d+)\.")
PAYLOAD = 64  # characters of message text, as chatload's default


class Client:
    __slots__ = ("acked", "index", "last", "sender", "sent", "server", "sock", "tail")

    def __init__(self, sock: socket.socket, server: int, index: int, senders: int):
        self.sock, self.server, self.index = sock, server, index
        self.sender = -1  # its sender number, if it sends
        self.tail = b""
        self.sent = self.acked = 0
        self.last = [-1] * senders  # the last sequence number seen from each sender (order check)


def percentiles(values: array) -> tuple[float, float, float]:
    """p50, p99, max in ms."""
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    return (ordered[len(ordered) // 2] / 1e6, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
            ordered[-1] / 1e6)


def cluster_load(ports: list[int], per_server: int, senders_per_server: int, rate: float, seconds: float,
                 window: int = 16, probe_every: int = 1, drain: float = 2.0,
                 watch: dict[str, int] | None = None, time_limit: float = 60.0) -> dict:
    """``per_server`` HELLO clients on each of ``ports``, the first ``senders_per_server`` of each sending
    to #main for ``seconds``: paced at ``rate`` messages/s in all (open loop, round robin over the
    senders), or with ``rate`` 0 as fast as acknowledgements allow, ``window`` in flight per sender.
    Every client reads everything; a delivery is a ``MSG|#main|...|~S...`` line (one's own MSG_OK is
    not one).  One message in ``probe_every`` carries its send time (perf_counter_ns; one process, so
    one clock) for the latency, split by whether sender and reader are on the same server, and its
    sender's sequence number for the order check.  Stops ``drain`` seconds after the last delivery
    once sending is over; what did not come is lost.  ``watch``: name -> pid whose CPU use is reported
    over the same window, as is this generator's."""
    selector = selectors.DefaultSelector()
    tag = f"{os.getpid()}x{time.monotonic_ns() % 1000000}"
    total_senders = senders_per_server * len(ports)
    clients: list[Client] = []
    senders: list[Client] = []
    deadline = time.monotonic() + time_limit
    try:
        for server, port in enumerate(ports):
            for i in range(per_server):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(f"HELLO|chatctl/1\nUSER|w{server}n{i}x{tag}\n".encode())
                sock.setblocking(False)
                client = Client(sock, server, len(clients), total_senders)
                if i < senders_per_server:
                    client.sender = len(senders)
                    senders.append(client)
                selector.register(sock, selectors.EVENT_READ, client)
                clients.append(client)
        sender_server = [c.server for c in senders]
        waiting = {c.index for c in clients}
        quiet_since = time.monotonic()
        settle_by = min(deadline, quiet_since + 30)
        while time.monotonic() < settle_by:  # all registered, then 0.3 s of quiet (the JOIN notices)
            if not waiting and time.monotonic() - quiet_since > 0.3:
                break
            for key, _ in selector.select(0.1):
                client = key.data
                try:
                    data = client.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                if not data:
                    raise SystemExit(f"client {client.index} was closed while registering")
                quiet_since = time.monotonic()
                if client.index in waiting and b"USER_OK" in client.tail + data:
                    waiting.discard(client.index)
                client.tail = data[-16:]
        if waiting:
            raise SystemExit(f"{len(waiting)} clients never got their USER_OK")
        for client in clients:
            client.tail = b""

        same, cross = array("q"), array("q")
        counters = dict(received=0, disorder=0, self_deliveries=0, disconnects=0, errors=0)
        pad = "x" * PAYLOAD

        def frame(sender: Client) -> bytes:
            seq = sender.sent
            sender.sent += 1
            probe = f"P{time.perf_counter_ns()}." if seq % probe_every == 0 else ""
            text = f"~S{sender.sender}.{seq}.{probe}"
            return f"MSG|{text}{pad[len(text):]}\n".encode()

        def send(sender: Client, frames: list[bytes]) -> None:
            try:
                sender.sock.sendall(b"".join(frames))  # a few hundred bytes: the socket buffer takes them
            except BlockingIOError:
                counters["errors"] += 1

        def send_window(sender: Client) -> None:
            frames = []
            while sender.sent - sender.acked < window:
                frames.append(frame(sender))
            if frames:
                send(sender, frames)

        watch = watch or {}
        cpu_before = {name: cpu_seconds(pid) for name, pid in watch.items()}
        own_before = own_cpu_seconds()
        started = time.monotonic()
        t0 = time.perf_counter()
        stop_sending = started + seconds
        sent_total, behind = 0, 0.0
        if not rate:
            for sender in senders:
                send_window(sender)
        last_progress = time.monotonic()
        sending = True
        readers = len(clients) - 1  # everyone but the sender
        while True:
            now = time.monotonic()
            if sending and now >= stop_sending:
                sending = False
                sent_total = sum(s.sent for s in senders)
                last_progress = now  # the drain counts from here
            if sending:
                if rate:
                    due = min(int((time.perf_counter() - t0) * rate) + 1, int(seconds * rate))
                    batch: dict[int, list[bytes]] = {}
                    while sent_total < due:
                        batch.setdefault(sent_total % total_senders, []).append(
                            frame(senders[sent_total % total_senders]))
                        sent_total += 1
                    for k, frames in batch.items():
                        send(senders[k], frames)
                    behind = max(behind, time.perf_counter() - t0 - (sent_total - 1) / rate)
                    timeout = max(0.0, t0 + sent_total / rate - time.perf_counter())
                else:
                    sent_total = sum(s.sent for s in senders)
                    timeout = 0.05
            else:
                if (counters["received"] >= sent_total * readers or now - last_progress > drain
                        or now > deadline):
                    break
                timeout = 0.1
            for key, _ in selector.select(min(timeout, 0.05)):
                client = key.data
                try:
                    data = client.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    counters["disconnects"] += 1
                    selector.unregister(client.sock)
                    continue
                data = client.tail + data
                cut = data.rfind(b"\n") + 1
                whole, client.tail = data[:cut], data[cut:]
                got = whole.count(b"|~S")
                if got:
                    counters["received"] += got
                    last_progress = time.monotonic()
                    arrived = time.perf_counter_ns()
                    last = client.last
                    for sender_b, seq_b, sent_ns in _PROBE.findall(whole):
                        k, seq = int(sender_b), int(seq_b)
                        (same if sender_server[k] == client.server else cross).append(arrived - int(sent_ns))
                        if seq <= last[k]:
                            counters["disorder"] += 1
                        last[k] = seq
                        if k == client.sender:
                            counters["self_deliveries"] += 1
                if b"ERR|" in whole:
                    counters["errors"] += whole.count(b"ERR|")
                if client.sender >= 0:
                    acks = whole.count(b"MSG_OK|")
                    if acks:
                        client.acked += acks
                        if not rate and sending:
                            send_window(client)
        elapsed = (last_progress if counters["received"] else time.monotonic()) - started
        window_s = time.monotonic() - started
        cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / window_s * 100 for name, pid in watch.items()}
        cpu["generator"] = (own_cpu_seconds() - own_before) / window_s * 100
        return {"messages": sent_total, "acked": sum(s.acked for s in senders),
                "deliveries_per_s": counters["received"] / elapsed,
                "lost": sent_total * readers - counters["received"],
                "same_ms": percentiles(same), "cross_ms": percentiles(cross), "behind_ms": behind * 1000,
                "cpu_pct": cpu, **counters}
    finally:
        for client in clients:
            client.sock.close()
        selector.close()


# --- the targets ------------------------------------------------------------------------------


def bus_vs_standalone(args, workdir: Path) -> None:
    n, s, m = 100, 10, 10000
    print(f"\n## One server on the bus against the same server alone: chatload {n} clients / {s} senders "
          f"/ {m} messages each, history on (medians of {args.rounds})")
    print("Redis is pinned to core 1 with the load; its CPU time is over the whole chatload run.")
    setups = ["standalone", "bus, Redis without persistence", "bus, Redis AOF everysec"]
    runs: dict[str, list[dict]] = {label: [] for label in setups}
    with ExitStack() as stack:
        plain = stack.enter_context(redis_server(workdir, 1))
        aof = stack.enter_context(redis_server(workdir, 1, aof=True))
        for round_ in range(args.rounds):
            for label in setups if round_ % 2 == 0 else setups[::-1]:
                redis = {setups[1]: plain, setups[2]: aof}.get(label)
                bus = dict(bus=redis[1], server_id="a", cluster=f"bench{next(CLUSTERS)}") if redis else {}
                with chatctl_node(workdir, 0, **bus) as (pid, port):
                    before = cpu_seconds(redis[0]) if redis else 0.0
                    result = chatload(pid, port, n, s, m)
                    result["redis_cpu_s"] = cpu_seconds(redis[0]) - before if redis else float("nan")
                runs[label].append(result)
    base = median(r["deliveries_per_s"] for r in runs["standalone"])
    print("| server | deliveries/s | ratio to standalone | p99 | lost | disconnects | server CPU | "
          "Redis CPU (per message) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, results in runs.items():
        rate = median(r["deliveries_per_s"] for r in results)
        redis_cpu = median(r["redis_cpu_s"] for r in results)
        redis_text = "-" if label == "standalone" else \
            f"{redis_cpu:.2f} s ({redis_cpu / (s * m) * 1e6:.1f} µs)"
        print(f"| {label} | {mega(rate)} | {rate / base:.2f} | "
              f"{median(r['latency_us']['p99'] for r in results) / 1000:.1f} ms | "
              f"{sum(r['lost'] for r in results)} | {sum(r['disconnects'] for r in results)} | "
              f"{median(r['server_cpu_util'] for r in results) * 100:.0f}% | {redis_text} |", flush=True)
    ratio = median(r["deliveries_per_s"] for r in runs[setups[1]]) / base
    print(f"bus/standalone {ratio:.2f} (target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")
    report_trouble()


def two_servers(args, workdir: Path) -> None:
    rate, seconds, fast_seconds = 1000, 10.0, 5.0
    print(f"\n## Two servers on one Redis (a and b, 50 clients each, 5 senders each) against one server "
          f"alone with all 100 (10 senders); the Python generator, HELLO clients (medians of {args.rounds})")
    print("Alone: the server on core 0, the generator on core 1. On the bus: a and the generator on core 0, "
          "b and Redis on core 1.")
    print(f"Paced: {rate:,} messages/s offered for {seconds:.0f} s, each carrying its send time; unpaced: "
          f"{fast_seconds:.0f} s, 16 in flight per sender, one message in 8 timed.")
    setups = ["one server alone", "two servers on the bus"]
    rows: dict[tuple[str, bool], list[dict]] = {(label, paced): [] for paced in (True, False)
                                                for label in setups}
    with redis_server(workdir, 1) as (redis_pid, url):
        for round_ in range(args.rounds):
            for label in setups if round_ % 2 == 0 else setups[::-1]:
                with ExitStack() as stack:
                    if label == setups[0]:
                        pid, port = stack.enter_context(chatctl_node(workdir, 0))
                        ports, per_server, senders, watch, load_core = [port], 100, 10, {"server": pid}, 1
                    else:
                        cluster = f"bench{next(CLUSTERS)}"
                        a = stack.enter_context(chatctl_node(workdir, 0, url, "a", cluster))
                        b = stack.enter_context(chatctl_node(workdir, 1, url, "b", cluster))
                        ports, per_server, senders, load_core = [a[1], b[1]], 50, 5, 0
                        watch = {"a": a[0], "b": b[0], "redis": redis_pid}
                    time.sleep(0.3)  # b's presence reaches a through the log
                    with on_core(load_core):
                        for paced in (True, False):
                            rows[label, paced].append(cluster_load(
                                ports, per_server, senders, rate if paced else 0,
                                seconds if paced else fast_seconds, probe_every=1 if paced else 8,
                                watch=watch))
    print("| setup | load | deliveries/s | same-server p50 / p99 / max | cross-server p50 / p99 / max | "
          "lost | disorder / self / ERR / closed | CPU % (median) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for (label, paced), results in rows.items():
        def lat(key: str, results=results) -> str:
            p50, p99, worst = (median(r[key][i] for r in results) for i in range(3))
            return "-" if p50 != p50 else f"{p50:.2f} / {p99:.2f} / {worst:.1f} ms"

        load = f"paced {rate:,}/s" if paced else "unpaced"
        behind = median(r["behind_ms"] for r in results)
        if paced and behind > 5:
            load += f" (generator up to {behind:.0f} ms behind)"
        oddities = " / ".join(str(sum(r[k] for r in results))
                              for k in ("disorder", "self_deliveries", "errors", "disconnects"))
        cpu = ", ".join(f"{name} {median(r['cpu_pct'][name] for r in results):.0f}"
                        for name in results[0]["cpu_pct"])
        print(f"| {label} | {load} | {mega(median(r['deliveries_per_s'] for r in results))} | "
              f"{lat('same_ms')} | {lat('cross_ms')} | {sum(r['lost'] for r in results)} | {oddities} | "
              f"{cpu} |", flush=True)
    cross_p99 = median(r["cross_ms"][1] for r in rows[setups[1], True])
    print(f"cross-server p99 at {rate:,} messages/s: {cross_p99:.2f} ms "
          f"(target < 10 ms: {'met' if cross_p99 < 10 else 'NOT met'})")
    report_trouble()


TARGETS = {"bus-vs-standalone": bus_vs_standalone, "two-servers": two_servers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", choices=[*TARGETS, "all"], metavar="TARGET",
                    help=f"{', '.join(TARGETS)} or all")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    try:
        import redis  # noqa: F401  (the servers need it; they run on this interpreter)
    except ImportError:
        raise SystemExit(f"{sys.executable} has no redis-py: run this with the dev venv's python") from None
    if not CHATLOAD.exists():
        subprocess.run(["sh", str(CHATBENCH / "build.sh"), str(CHATLOAD)], check=True)
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    print(machine_line(" ".join(version[:3])))
    with tempfile.TemporaryDirectory(prefix="chatctl-bench-cluster-") as tmp:
        for name, run in TARGETS.items():
            if name in args.targets or "all" in args.targets:
                run(args, Path(tmp))


if __name__ == "__main__":
    main()
