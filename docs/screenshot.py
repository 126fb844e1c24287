"""Make docs/tui.svg: Textual's own screenshot of chatctl tui in a real session.

A real server on a free loopback port (history in a temporary directory), three
people talking through raw protocol clients, and ana in chatctl tui under Textual's
test harness.  Run from the repository: python docs/screenshot.py
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import chatctl  # noqa: E402


def say(port: int, name: str, *lines: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"HELLO|chatctl/1\nUSER|{name}\nJOIN|#deploys\n".encode())
    for line in lines:
        sock.sendall(line.encode() + b"\n")
        time.sleep(0.05)
    return sock


async def shoot(port: int, path: Path) -> None:
    config = chatctl.ClientConfig(host="127.0.0.1", port=port)
    app = chatctl.tui_app()(config, "ana", "mentions", "deploys")
    async with app.run_test(size=(110, 28)) as pilot:
        for _ in range(200):
            if app.chat_on and app.chat.session.connected:
                break
            await pilot.pause(0.05)
        socks = [say(port, "bob", "TOPIC|#deploys|builds and releases: say when you deploy",
                     "MSG|#deploys|build 412 is green, deploying to staging",
                     "MSG|#deploys|ana: can you watch the error rate?"),
                 say(port, "carol", "MSG|#main|lunch at noon?", "DM|ana|the release notes are in the doc",
                     "MSG|#deploys|staging looks good; p99 is 41 ms")]
        await pilot.pause(1.0)
        for key in "on it, the graphs are flat":
            await pilot.press(key)
        await pilot.press("enter")
        await pilot.pause(1.0)
        app.save_screenshot(filename=path.name, path=str(path.parent))
        for sock in socks:
            sock.close()
        await pilot.press("ctrl+q")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = chatctl.ChatServer(chatctl.ServerConfig(
            host="127.0.0.1", port=0, db=str(Path(tmp) / "history.db"),
            accounts_db=str(Path(tmp) / "accounts.db"))).start()
        try:
            asyncio.run(shoot(server.port, ROOT / "docs" / "tui.svg"))
        finally:
            server.shutdown()
    print("wrote docs/tui.svg")


if __name__ == "__main__":
    main()
