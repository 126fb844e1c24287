#!/usr/bin/env python3
"""Does typing in chatctl tui lag?  How long the app's event loop is busy (no key can be handled
meanwhile), in one run: an empty room, a room with 5,000 lines on screen, and that room while a burst
of 1,000 messages arrives.

    .venv/bin/python benchmarks/bench_tui.py [--rounds 3] [--keys 40]

The server is a ``chatctl serve`` subprocess (abuse limits off) on a free
loopback port, pinned to core 1; the app runs in this process under
Textual's own harness (headless, 120x40), pinned to core 0.  A probe on the
app's event loop asks to wake every 5 ms; how late it wakes is how long a key
pressed then would wait (Textual handles keys on that loop).  Keys are typed
meanwhile (one every 20 ms), so their handling counts too.
The 5,000 lines are real history the app loaded by scrolling back
(``[client] lines`` is 6,000 for this run, so the burst fits too; the default
bound is 2,000).
Figures are medians over --rounds; the ratios compare rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_performance import listening_port, machine_line  # noqa: E402

import chatctl  # noqa: E402

HISTORY = 5000
BURST = 1000


def raw_client(port: int, name: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"HELLO|chatctl/1\nUSER|{name}\n".encode())
    return sock


def post_and_wait(sock: socket.socket, lines: list[str]) -> None:
    """Send every line as one write, then read until each has its MSG_OK (bounded by the timeout)."""
    sock.sendall("".join(f"MSG|#main|{text}\n" for text in lines).encode())
    acked, buffer = 0, b""
    while acked < len(lines):
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise SystemExit("the server closed the connection")
        buffer += chunk
        *done, buffer = buffer.split(b"\n")
        acked += sum(line.startswith(b"MSG_OK") for line in done)


async def loop_lag(pilot, seconds: float) -> list[float]:
    """Type a key every 20 ms for ``seconds``; returns how late (ms) each 5 ms wake-up of the loop was."""
    lags: list[float] = []

    async def probe():
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(max(0.0, (time.perf_counter() - started - 0.005) * 1000))

    task = asyncio.create_task(probe())
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        pilot.app.query_one("#input").insert_text_at_cursor("abcdefghij"[n % 10])
        n += 1
        await asyncio.sleep(0.02)
    task.cancel()
    pilot.app.query_one("#input").value = ""
    return lags


def log_has(app, text: str) -> bool:
    return any(text in strip.text for strip in app.query_one("#log").lines[-50:])


async def one_round(port: int, seconds: float, tag: int) -> dict[str, list[float] | float]:
    config = chatctl.ClientConfig(host="127.0.0.1", port=port, backlog=20, lines=HISTORY + BURST)
    app = chatctl.tui_app()(config, "ana", "off", "main")
    figures: dict[str, list[float] | float] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(400):
            if app.chat_on and app.chat.session.connected:
                break
            await pilot.pause(0.05)
        await pilot.press("ctrl+n")  # an empty room first: #quiet
        app.chat.handle_line("/join #quiet")
        for _ in range(200):
            if app.chat.model.current == "quiet":
                break
            await pilot.pause(0.02)
        figures["empty room"] = await loop_lag(pilot, seconds)
        app.chat.switch("main", quiet=True)
        conversation = app.conversation("main")
        for _ in range(HISTORY // chatctl.TUI_PAGE + 20):  # scroll back until all 5,000 are loaded
            if len(conversation.lines) >= HISTORY or conversation.complete:
                break
            app.load_older()  # what PageUp at the top does
            for _ in range(500):
                if not conversation.fetching:
                    break
                await pilot.pause(0.01)
        figures["lines"] = float(sum(line.msg is not None for line in conversation.lines))
        await pilot.press("pagedown")
        app.query_one("#log").scroll_end(animate=False, immediate=True)
        figures["5,000 lines"] = await loop_lag(pilot, seconds)
        sender = raw_client(port, "burst")
        started = time.perf_counter()
        lines = [f"burst{tag} {i}" for i in range(BURST)]
        burst = threading.Thread(target=post_and_wait, args=(sender, lines))
        burst.start()
        shown = asyncio.Event()

        async def watch():
            for _ in range(3000):
                if log_has(app, f"burst{tag} {BURST - 1}"):
                    figures["burst shown"] = (time.perf_counter() - started) * 1000
                    shown.set()
                    return
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        figures["5,000 lines + burst of 1,000"] = await loop_lag(pilot, seconds)
        await asyncio.wait_for(shown.wait(), 30)
        await watcher
        burst.join(30)
        sender.close()
        figures["kept"] = float(len(conversation.lines))
        await pilot.press("ctrl+q")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each row is measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        env = {**os.environ, "CHATCTL_RATE": "0", "CHATCTL_ADDRESS_BYTE_RATE": "0",
               "CHATCTL_SENDQ": "67108864"}
        with open(log, "w") as out:
            command = ["taskset", "-c", "1", sys.executable, str(ROOT / "chatctl.py"), "serve",
                       "--host", "127.0.0.1", "--port", "0", "--db", str(Path(tmp) / "h.db")]
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            port = listening_port(server, log)
            filler = raw_client(port, "filler")
            post_and_wait(filler, [f"history line {i}" for i in range(HISTORY)])
            filler.close()
            os.sched_setaffinity(0, {0})
            rounds = [asyncio.run(one_round(port, args.seconds, tag)) for tag in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(10)
    print(machine_line(f"Textual {__import__('textual').__version__}"))
    print(f"# event-loop lag: how late a 5 ms wake-up comes, typing a key every 20 ms; "
          f"{args.seconds:g} s x {args.rounds} rounds")
    rows = ["empty room", "5,000 lines", "5,000 lines + burst of 1,000"]
    base = statistics.median(t for r in rounds for t in r["empty room"])
    print(f"{'':30} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for row in rows:
        lags = sorted(t for r in rounds for t in r[row])
        print(f"{row:30} {statistics.median(lags):10.2f} {lags[int(len(lags) * 0.99) - 1]:8.2f} "
              f"{lags[-1]:8.2f}")
    burst = statistics.median(t for r in rounds for t in r["5,000 lines + burst of 1,000"])
    print(f"median lag during the burst / in an empty room: {burst / base:.2f}x")
    print(f"messages loaded by scrolling back: {statistics.median(r['lines'] for r in rounds):,.0f}")
    shown = statistics.median(r["burst shown"] for r in rounds)
    kept = statistics.median(r["kept"] for r in rounds)
    print(f"burst of {BURST:,} on screen after: {shown:,.0f} ms (median); lines kept in the room: "
          f"{kept:,.0f} (bound {HISTORY + BURST:,})")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
