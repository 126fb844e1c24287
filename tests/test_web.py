"""chatctl web: chatctl tui served to a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import CHATCTL, RawClient, free_port, wait_until

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_binary() -> str:
    """Debian's chromium; where it is missing the test skips, except in CI, which installs it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_web(server, env: dict) -> tuple[subprocess.Popen, str]:
    """``chatctl web`` as a real process serving the tui for ``server``, once it listens; and its URL."""
    port = free_port()
    web = subprocess.Popen([*CHATCTL, "web", "--port", str(port), "--server", f"127.0.0.1:{server.port}"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: listening(port) or web.poll() is not None, timeout=20)
    assert web.poll() is None, web.stdout.read().decode(errors="replace")
    return web, f"http://127.0.0.1:{port}/"


@pytest.fixture
def web_page(server, isolated_home):
    """``chatctl web`` as a real process, serving the tui for ``server``; yields its URL."""
    web, url = start_web(server, isolated_home)
    try:
        yield url
    finally:
        os.killpg(web.pid, signal.SIGTERM)  # the page's tui processes too
        try:
            web.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(web.pid, signal.SIGKILL)
            web.wait(5)


# What the page's terminal is sent, as text: the terminal draws on a canvas, so the test reads the stream.
KEEP_WHAT_IS_DRAWN = """
(() => {
  const Native = window.WebSocket, decoder = new TextDecoder();
  window.drawn = "";
  window.WebSocket = function (...args) {
    const socket = new Native(...args);
    socket.addEventListener("message", (event) => {
      if (event.data instanceof ArrayBuffer)
        window.drawn = (window.drawn + decoder.decode(event.data, {stream: true})).slice(-100000);
    });
    return socket;
  };
  window.WebSocket.prototype = Native.prototype;
})();
"""


def joined(server, name: str, timeout: float) -> bool:
    """Whether ``name`` is online at ``server`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s.name == name for s in server.registry.sessions()):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def page_as(server, url: str, name: str):
    """A headless browser on ``url`` whose person picked ``name``; yields the page, and always closes
    the browser (a Playwright left open makes the next test's Playwright refuse to start)."""
    browser_path = chromium_binary()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-test.txt")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.add_init_script(KEEP_WHAT_IS_DRAWN)
            page.goto(url)
            page.wait_for_selector("#terminal .xterm", timeout=30_000)
            # Keys that come before the name dialog is drawn are lost: a person waits to see it too.
            page.wait_for_function("window.drawn.includes('Your name in the chat')", timeout=60_000)
            page.click("#terminal")  # the keyboard goes to the terminal
            for attempt in range(4):
                if attempt:  # keys lost on a slow start: empty the field and type again
                    page.keyboard.press("End")
                    page.keyboard.press("Control+u")
                page.keyboard.type(name)
                page.keyboard.press("Enter")
                if joined(server, name, timeout=15):
                    break
            else:
                online = [s.name for s in server.registry.sessions()]
                raise AssertionError(f"the browser's person never joined as {name} (online: {online})")
            yield page
        finally:
            browser.close()


def test_stopping_web_ends_its_pages_at_once(server, isolated_home):
    web, url = start_web(server, isolated_home)
    try:
        with page_as(server, url, "dora"):
            web.send_signal(signal.SIGTERM)  # the command alone, as a service manager stops it
            started = time.monotonic()
            web.wait(15)
            wait_until(lambda: not any(s.name == "dora" for s in server.registry.sessions()), timeout=10)
            assert time.monotonic() - started < 8  # not the 20 s of waiting for each page's websocket
    finally:
        if web.poll() is None:
            os.killpg(web.pid, signal.SIGKILL)
            web.wait(5)


def test_the_page_asks_nothing_of_the_internet(web_page):
    import urllib.request

    with urllib.request.urlopen(web_page, timeout=10) as reply:
        html = reply.read().decode()
    assert "textual.js" in html and "googleapis" not in html


def test_a_person_in_the_browser_picks_a_name_and_talks(server, web_page):
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\n")
    bob.expect("USER_OK")
    with page_as(server, web_page, "carol") as page:
        assert bob.expect("JOIN|").endswith("|carol")
        page.keyboard.type("hello from the browser")
        page.keyboard.press("Enter")
        assert bob.expect("MSG|#main|", timeout=15).endswith("|carol|hello from the browser")
    bob.close()


def test_without_textual_serve_web_says_what_to_install(tmp_path, isolated_home):
    shadow = tmp_path / "shadow" / "textual_serve"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**isolated_home, "PYTHONPATH": str(tmp_path / "shadow")}
    result = subprocess.run([*CHATCTL, "web", "--port", str(free_port())], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: chatctl web needs textual-serve: pip install 'chatctl[web]'"


def test_a_bad_public_url_is_a_usage_error(isolated_home):
    result = subprocess.run([*CHATCTL, "web", "--public-url", "javascript:alert(1)//"], env=isolated_home,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "is not an http:// or https:// address" in result.stderr
