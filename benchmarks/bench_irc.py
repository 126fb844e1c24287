#!/usr/bin/env python3
"""The IRC gateway under load: chatctl serve --irc with IRC clients, beside chatctl's own protocol and
ngircd (a C IRC server) in the same run.

    .venv/bin/python benchmarks/bench_irc.py [--rounds 3]

The load is ``chatload`` (../shared/chatbench, built to /tmp/chatload if
missing): N clients in one channel, S of them sending M messages each, every
client reading everything; ``--proto irc`` registers with NICK/USER, joins
#bench and sends PRIVMSG, ``--proto seed`` speaks chatctl's seed protocol.
Each server is pinned to core 0 and the load to core 1; chatctl has history
on (as it runs by default) and its abuse limits off, as load tests run.
ngircd (Debian's) gets the configuration ../shared/chatbench/run_all.sh
gives it.  Figures are medians of --rounds runs, servers alternating.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_performance import (
    CHATBENCH,
    CHATLOAD,
    LOAD_CONFIG,
    ROOT,
    free_port,
    listening_port,
    machine_line,
    median,
    mega,
    pinned,
)

ROWS = [(10, 10, 2000), (100, 10, 200), (100, 100, 20)]  # N, S, M
NGIRCD_CONFIG = """[Global]
Name = chatbench.local
Info = chatbench reference server
Listen = 127.0.0.1
Ports = {port}
MotdPhrase = "chatbench"
AdminInfo1 = chatbench
AdminInfo2 = loopback only
AdminEMail = nobody@chatbench.local
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxPenaltyTime = 0
PingTimeout = 600
PongTimeout = 120
[Options]
DNS = no
Ident = no
PAM = no
"""


def wait_listening(port: int, proc: subprocess.Popen, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the server on port {port} did not start")


@contextmanager
def chatctl_irc(workdir: Path):
    conf = workdir / "irc.toml"
    conf.write_text(LOAD_CONFIG.replace("[server]\n", "[server]\nirc = true\n"))
    log = workdir / f"serve-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        db = workdir / f"h{time.monotonic_ns()}.db"
        command = [*pinned(0), sys.executable, str(ROOT / "chatctl.py"), "serve", "-H", "127.0.0.1",
                   "-p", "0", "--config", str(conf), "--db", str(db), "--log-level", "info"]
        proc = subprocess.Popen(command, stderr=out, env={**os.environ, "XDG_DATA_HOME": str(workdir)})
    try:
        yield proc.pid, listening_port(proc, log)
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def ngircd(workdir: Path):
    port = free_port()
    conf = workdir / "ngircd.conf"
    conf.write_text(NGIRCD_CONFIG.format(port=port))
    proc = subprocess.Popen([*pinned(0), "ngircd", "--nodaemon", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(15)


def load(proto: str, pid: int, port: int, n: int, s: int, m: int, run: int) -> dict:
    import json

    out = subprocess.run([*pinned(1), str(CHATLOAD), "--proto", proto, "--port", str(port), "-n", str(n),
                          "-s", str(s), "-m", str(m), "--server-pid", str(pid), "--time-limit", "120",
                          "--name-prefix", f"b{run}x"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not CHATLOAD.exists():
        subprocess.run([str(CHATBENCH / "build.sh"), str(CHATLOAD)], check=True)
    setups = [("chatctl, its own protocol", "seed", chatctl_irc),
              ("chatctl --irc, IRC clients", "irc", chatctl_irc)]
    if shutil.which("ngircd"):
        setups.append(("ngircd (C), IRC clients", "irc", ngircd))
    results: dict[tuple[str, int, int], list[dict]] = {}
    run = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for label, proto, server in setups:
                for n, s, m in ROWS:
                    run += 1
                    with server(Path(tmp)) as (pid, port):
                        results.setdefault((label, n, s), []).append(load(proto, pid, port, n, s, m, run))
    print(machine_line())
    print(f"# deliveries/s, medians of {args.rounds}; chatctl with history on; lost/dup summed over all runs")
    print(f"{'':30} {'N/S':>8} {'deliveries/s':>13} {'p99 ms':>8} {'server CPU':>11} {'lost':>5} {'dup':>4}")
    rate = {key: median(r["deliveries_per_s"] for r in rows) for key, rows in results.items()}
    for label, _, _ in setups:
        for n, s, _ in ROWS:
            rows = results[(label, n, s)]
            p99 = median(r["latency_us"]["p99"] for r in rows) / 1000
            cpu = median(r.get("server_cpu_util", 0) for r in rows)
            print(f"{label:30} {f'{n}/{s}':>8} {mega(rate[(label, n, s)]):>13} {p99:8.1f} {cpu:11.2f} "
                  f"{sum(r['lost'] for r in rows):5} {sum(r['duplicates'] for r in rows):4}")
    ours, irc = setups[0][0], setups[1][0]
    for n, s, _ in ROWS:
        line = f"{n}/{s}: IRC / own protocol {rate[(irc, n, s)] / rate[(ours, n, s)]:.2f}"
        if len(setups) > 2:
            line += f", IRC / ngircd {rate[(irc, n, s)] / rate[(setups[2][0], n, s)]:.2f}"
        print(line)


if __name__ == "__main__":
    main()
