"""Make docs/tui.svg (Textual's own screenshot of chatctl tui in a real session) and docs/web-desktop.png
and docs/web-phone.png (the browser client in Debian's chromium, driven by Playwright).

A real server on a free loopback port (history in a temporary directory), people talking through raw
protocol clients, and ana in chatctl tui under Textual's test harness, then in a browser.  Run from the
repository: python docs/screenshot.py [tui|web]
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


def shoot_web(port: int) -> None:
    from playwright.sync_api import sync_playwright

    socks = [say(port, "bob", "TOPIC|#deploys|builds and releases: say when you deploy",
                 "MSG|#deploys|build 412 is green, deploying to staging",
                 "MSG|#deploys|the dashboard: https://grafana.example/d/api",
                 "MSG|#deploys|ana: can you watch the error rate?"),
             say(port, "carol", "JOIN|#random", "MSG|#main|lunch at noon?",
                 "MSG|#random|the coffee machine is fixed", "DM|ana|the release notes are in the doc",
                 "MSG|#deploys|staging looks good; p99 is 41 ms")]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu"])
        for name, viewport in (("web-desktop.png", {"width": 1200, "height": 640}),
                               ("web-phone.png", {"width": 390, "height": 760})):
            page = browser.new_page(viewport=viewport, device_scale_factor=1)
            page.on("pageerror", lambda e: print("PAGEERROR", e))
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#login-name", "ana" if name == "web-desktop.png" else "ana-phone")
            page.click("#login-button")
            page.wait_for_selector("#status-dot.online")
            page.fill("#input", "/join #deploys #random")
            page.press("#input", "Enter")
            page.wait_for_selector("#conv-title:text-is('#deploys')")
            page.get_by_text("p99 is 41 ms").wait_for()
            if name == "web-desktop.png":
                page.fill("#input", "on it, the graphs are flat")
                page.press("#input", "Enter")
                socks[1].sendall(b"MSG|#random|ana: cake in the kitchen\nDM|ana|and thanks for the review\n")
                page.locator(".conv .badge").first.wait_for()
            page.wait_for_timeout(300)  # (the last paint)
            page.screenshot(path=str(ROOT / "docs" / name))
            page.close()
        browser.close()
    for sock in socks:
        sock.close()


def main() -> None:
    which = sys.argv[1:] or ["tui", "web"]
    with tempfile.TemporaryDirectory() as tmp:
        server = chatctl.ChatServer(chatctl.ServerConfig(
            host="127.0.0.1", port=0, db=str(Path(tmp) / "history.db"),
            accounts_db=str(Path(tmp) / "accounts.db"))).start()
        try:
            if "tui" in which:
                asyncio.run(shoot(server.port, ROOT / "docs" / "tui.svg"))
                print("wrote docs/tui.svg")
            if "web" in which:
                shoot_web(server.port)
                print("wrote docs/web-desktop.png and docs/web-phone.png")
        finally:
            server.shutdown()


if __name__ == "__main__":
    main()
