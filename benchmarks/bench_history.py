#!/usr/bin/env python3
"""Message throughput of chatctl serve with history on and off, in one run.

Starts `chatctl serve` pinned to one core (history off, then on, alternating,
each with a fresh database), drives it with the C load generator chatload
(../shared/chatbench, `seed` adapter) pinned to the other core, and prints
every run, the medians, and the ratio on/off.

    python benchmarks/bench_history.py              # 10 clients, 10 senders, 3000 messages each, 5 rounds
    python benchmarks/bench_history.py -n 100 -s 10 -m 1000 --rounds 3

Loopback only; every run stops by itself (chatload's --time-limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHATBENCH = ROOT.parent / "shared" / "chatbench"


def build_chatload(path: Path) -> Path:
    if not path.exists():
        subprocess.run(["sh", str(CHATBENCH / "build.sh"), str(path)], check=True)
    return path


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and os.cpu_count() >= 2 else []


def run_once(chatload: Path, history: bool, args, workdir: Path) -> dict:
    db = workdir / f"bench-{os.getpid()}.db"
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    conf = workdir / "bench.toml"
    # load tests raise the limits that protect people: no idle or frame surprises
    conf.write_text("[server]\nsendq = 67108864\nidle_timeout = 0.0\nlog_level = \"warning\"\n")
    server = subprocess.Popen(
        [*pinned(0), sys.executable, str(ROOT / "chatctl.py"), "serve", "-H", "127.0.0.1", "-p", "0",
         "--config", str(conf), "--db", str(db), "--history" if history else "--no-history",
         "--log-level", "info"],
        stderr=subprocess.PIPE, text=True, cwd=workdir)
    try:
        port = None
        for _ in range(5):
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", server.stderr.readline())
            if match:
                port = int(match.group(1))
                break
        if port is None:
            raise SystemExit("the server did not start")
        out = subprocess.run(
            [*pinned(1), str(chatload), "--proto", "seed", "--port", str(port), "-n", str(args.clients),
             "-s", str(args.senders), "-m", str(args.messages), "-b", str(args.payload),
             "--server-pid", str(server.pid), "--time-limit", "120"],
            capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--clients", type=int, default=10)
    ap.add_argument("-s", "--senders", type=int, default=10)
    ap.add_argument("-m", "--messages", type=int, default=3000)
    ap.add_argument("-b", "--payload", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chatload", type=Path, default=Path(tempfile.gettempdir()) / "chatload")
    args = ap.parse_args()
    chatload = build_chatload(args.chatload)
    results: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for history in (False, True) if r % 2 == 0 else (True, False):
                d = run_once(chatload, history, args, Path(tmp))
                results[history].append(d)
                print(f"round {r + 1} history={'on ' if history else 'off'} "
                      f"messages/s={d['messages_per_s']:>9.0f} deliveries/s={d['deliveries_per_s']:>10.0f} "
                      f"p99={d['latency_us']['p99'] / 1000:6.2f} ms lost={d['lost']} dup={d['duplicates']} "
                      f"server_cpu={d['server_cpu_util']:.2f} gen_cpu={d['gen_cpu_util']:.2f}", flush=True)
    med = {h: statistics.median(d["messages_per_s"] for d in runs) for h, runs in results.items()}
    print(f"\nN={args.clients} S={args.senders} M={args.messages} payload={args.payload} "
          f"rounds={args.rounds}, medians:")
    print(f"  history off: {med[False]:>9.0f} messages/s")
    print(f"  history on : {med[True]:>9.0f} messages/s")
    print(f"  ratio on/off: {med[True] / med[False]:.2f}  (target >= 0.80)")
    losses = sum(d["lost"] + d["duplicates"] for runs in results.values() for d in runs)
    print(f"  lost or duplicated deliveries in all runs: {losses}")


if __name__ == "__main__":
    main()
