"""chatctl web: chatctl tui served to a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

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


@pytest.fixture
def web_page(server, isolated_home):
    """``chatctl web`` as a real process, serving the tui for ``server``; yields its URL."""
    port = free_port()
    web = subprocess.Popen([*CHATCTL, "web", "--port", str(port), "--server", f"127.0.0.1:{server.port}"],
                           env=isolated_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        wait_until(lambda: listening(port) or web.poll() is not None, timeout=20)
        assert web.poll() is None, web.stdout.read().decode(errors="replace")
        yield f"http://127.0.0.1:{port}/"
    finally:
        os.killpg(web.pid, signal.SIGTERM)  # the page's tui processes too
        try:
            web.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(web.pid, signal.SIGKILL)
            web.wait(5)


def open_page_as(server, url: str, name: str, playwright, browser_path: str):
    """A browser on ``url`` whose person picked ``name``; returns (context manager, browser)."""
    manager = playwright.sync_playwright()
    p = manager.__enter__()
    browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(url)
    page.wait_for_selector("#terminal .xterm", timeout=20_000)
    page.click("#terminal")  # the keyboard goes to the terminal
    deadline = time.monotonic() + 40
    while not any(s.name == name for s in server.registry.sessions()):  # once the dialog is up
        assert time.monotonic() < deadline, "the browser's person never joined"
        page.keyboard.press("Control+a")
        page.keyboard.press("Delete")
        page.keyboard.type(name)
        page.keyboard.press("Enter")
        wait_until(lambda: any(s.name == name for s in server.registry.sessions()), timeout=10)
    return manager, browser, page


def test_stopping_web_ends_its_pages_at_once(server, isolated_home):
    browser_path = chromium_binary()
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-test.txt")
    port = free_port()
    web = subprocess.Popen([*CHATCTL, "web", "--port", str(port), "--server", f"127.0.0.1:{server.port}"],
                           env=isolated_home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    manager = None
    try:
        wait_until(lambda: listening(port), timeout=20)
        url = f"http://127.0.0.1:{port}/"
        manager, browser, _ = open_page_as(server, url, "dora", playwright, browser_path)
        web.send_signal(signal.SIGTERM)  # the command alone, as a service manager stops it
        started = time.monotonic()
        web.wait(15)
        wait_until(lambda: not any(s.name == "dora" for s in server.registry.sessions()), timeout=10)
        assert time.monotonic() - started < 8  # not the 20 s of waiting for each page's websocket
        browser.close()
    finally:
        if manager is not None:
            manager.__exit__(None, None, None)
        if web.poll() is None:
            os.killpg(web.pid, signal.SIGKILL)
            web.wait(5)


def test_the_page_asks_nothing_of_the_internet(web_page):
    import urllib.request

    with urllib.request.urlopen(web_page, timeout=10) as reply:
        html = reply.read().decode()
    assert "textual.js" in html and "googleapis" not in html


def test_a_person_in_the_browser_picks_a_name_and_talks(server, web_page):
    browser_path = chromium_binary()
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-test.txt")
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\n")
    bob.expect("USER_OK")
    manager, browser, page = open_page_as(server, web_page, "carol", playwright, browser_path)
    try:
        assert bob.expect("JOIN|").endswith("|carol")
        page.keyboard.type("hello from the browser")
        page.keyboard.press("Enter")
        assert bob.expect("MSG|#main|").endswith("|carol|hello from the browser")
    finally:
        browser.close()
        manager.__exit__(None, None, None)
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
