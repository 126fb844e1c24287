"""chatctl web: chatctl tui served to a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
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


def test_a_page_whose_host_is_killed_outright_leaves_the_chat(server, isolated_home):
    web, url = start_web(server, isolated_home)
    pages = []
    try:
        with page_as(server, url, "erin"):
            pages = chatctl_descendants(web.pid)
            web.kill()  # kill -9, the OOM killer: the host cannot end its pages
            web.wait(5)
            wait_until(lambda: not any(s.name == "erin" for s in server.registry.sessions()), timeout=15)
    finally:
        for pid in pages:  # (left behind by a failure)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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


# --- the page's websocket, as a browser (or a hostile page in one) would open it -----------------


def open_page_socket(url: str, origin: str | None = None, query: str = "", wait_for: str = "",
                     timeout: float = 30) -> tuple[int, str]:
    """Open ``url``'s websocket (``/ws``) with ``origin``; the handshake's status (101: opened) and,
    with ``wait_for``, what the page's terminal was sent until that text came (or ``timeout``)."""
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")

    async def visit() -> tuple[int, str]:
        headers = {"Origin": origin} if origin else {}
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(url.rstrip("/") + "/ws" + query, headers=headers)
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status, ""
            drawn = ""
            try:
                deadline = time.monotonic() + timeout
                while wait_for and wait_for not in drawn and time.monotonic() < deadline:
                    try:
                        message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                    except TimeoutError:
                        break
                    if message.type == aiohttp.WSMsgType.BINARY:
                        drawn += message.data.decode("utf-8", "replace")
                    elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                          aiohttp.WSMsgType.ERROR):
                        break
            finally:
                await ws.close()
            return 101, drawn

    return asyncio.run(visit())


def test_a_page_never_chats_as_the_web_hosts_own_name(server, isolated_home, tmp_path):
    from conftest import protected_name

    protected_name(server.port, "boss", "bosspass123")
    config = tmp_path / "chatctl.toml"
    config.write_text('[client]\nuser = "boss"\nuser_password = "bosspass123"\n')
    env = {**isolated_home, "CHATCTL_CONFIG": str(config), "CHATCTL_USER": "boss",
           "CHATCTL_USER_PASSWORD": "bosspass123"}
    web, url = start_web(server, env)
    try:
        status, drawn = open_page_socket(url, wait_for="Your name in the chat", timeout=45)
        assert status == 101
        assert "Your name in the chat" in drawn  # the page asks, like any other
        assert not any(s.name == "boss" for s in server.registry.sessions())
        for pid in chatctl_descendants(web.pid):  # nor do they hold it in their environment
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            assert b"bosspass123" not in environ and b"CHATCTL_USER=" not in environ
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(15)


def test_a_frame_the_page_never_sends_closes_that_page_quietly(server, isolated_home):
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    web, url = start_web(server, isolated_home)

    async def send_garbage() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "ws")
            await ws.send_str("not json at all")
            await ws.receive(timeout=10)  # closed by the server
            await ws.close()

    try:
        asyncio.run(send_garbage())
        assert open_page_socket(url)[0] == 101  # the next page still opens
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        output = web.communicate(timeout=15)[0].decode(errors="replace")
    assert "Traceback" not in output, output


def test_a_page_opened_from_another_site_is_refused(web_page):
    port = web_page.rsplit(":", 1)[1].rstrip("/")
    assert open_page_socket(web_page, origin="http://evil.example")[0] == 403
    assert open_page_socket(web_page, origin=f"http://127.0.0.1:{port}.evil.example")[0] == 403
    assert open_page_socket(web_page, origin=f"http://127.0.0.1:{port}")[0] == 101


def test_pages_are_capped_and_their_size_bounded(server, isolated_home, tmp_path):
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    config = tmp_path / "chatctl.toml"
    config.write_text("[client]\nweb_pages = 2\nweb_columns = 300\nweb_rows = 100\n")
    web, url = start_web(server, {**isolated_home, "CHATCTL_CONFIG": str(config)})

    def page_sizes() -> list[tuple[str, str]]:
        """The terminal size of each page's tui process (not the shell that textual-serve starts it with)."""
        sizes = []
        for pid in chatctl_descendants(web.pid):
            try:
                if open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode() != sys.executable:
                    continue
                environ = dict(item.split("=", 1) for item in
                               open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace").split("\0")
                               if "=" in item)
            except OSError:
                continue
            if "COLUMNS" in environ and "TEXTUAL_DRIVER" in environ:
                sizes.append((environ["COLUMNS"], environ["ROWS"]))
        return sizes

    async def three_pages() -> list[int]:
        async with aiohttp.ClientSession() as session:
            opened, statuses = [], []
            for _ in range(3):
                try:
                    opened.append(await session.ws_connect(url + "ws?width=100000&height=100000"))
                    statuses.append(101)
                except aiohttp.WSServerHandshakeError as exc:
                    statuses.append(exc.status)
            wait_until(lambda: len(page_sizes()) == 2, timeout=20)
            statuses.append(page_sizes())
            for ws in opened:
                await ws.close()
            return statuses

    try:
        *statuses, sizes = asyncio.run(three_pages())
        assert statuses == [101, 101, 503]
        assert sizes == [("300", "100"), ("300", "100")]
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(15)


def chatctl_descendants(pid: int) -> list[int]:
    import chatctl

    return chatctl.descendants(pid)


def test_a_page_size_or_origin_is_checked_before_it_is_used():
    import chatctl

    assert chatctl.bounded("100000", 80, 300) == 300
    assert chatctl.bounded("9" * 5000, 80, 300) == 300
    assert chatctl.bounded("-5", 80, 300) == 1
    assert chatctl.bounded({"x": 1}, 80, 300) == 80
    assert chatctl.same_origin(None, "127.0.0.1:8080", "127.0.0.1", 8080, None)
    assert chatctl.same_origin("http://localhost:8080", "localhost:8080", "127.0.0.1", 8080, None)
    assert not chatctl.same_origin("http://evil.example", "127.0.0.1:8080", "127.0.0.1", 8080, None)
    # DNS rebinding: a name of another site pointed at this address is not this server's
    assert not chatctl.same_origin("http://evil.example:8080", "evil.example:8080", "0.0.0.0", 8080, None)
    assert chatctl.same_origin("http://192.168.1.5:8080", "192.168.1.5:8080", "0.0.0.0", 8080, None)
    assert chatctl.same_origin("https://chat.example.org", "chat.example.org", "127.0.0.1", 8080,
                               "https://chat.example.org/")
