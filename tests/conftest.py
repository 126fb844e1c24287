"""Shared fixtures: a running server, raw socket clients, an isolated HOME, the CLI as a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import chatctl

ROOT = Path(__file__).resolve().parent.parent
CHATCTL = [sys.executable, str(ROOT / "chatctl.py")]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_until_same(read, timeout: float = 10.0, interval: float = 0.05) -> list:
    """Poll ``read()`` (a list: one state per server, say) until all its items are equal; returns the
    list.  Fails after ``timeout``, showing the last states read."""
    deadline = time.monotonic() + timeout
    while True:
        states = read()
        if all(state == states[0] for state in states):
            return states
        if time.monotonic() >= deadline:
            raise AssertionError(f"still not the same after {timeout}s: {states!r}")
        time.sleep(interval)


def default_sigint() -> None:
    """A child's ``preexec_fn`` for the tests that send it Ctrl-C: the default SIGINT, even when the
    test run itself ignores it (nohup, CI runners) and children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_line(stream, timeout: float = 10.0) -> str:
    """One line from a subprocess pipe; fail after ``timeout`` (a bare readline() may wait forever)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise AssertionError(f"no line within {timeout}s")
    return got[0]


class RawClient:
    """A bare socket client, as the seed's scripts and netcat are."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""
        self.seen: list[str] = []  # every line read, skipped ones included

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data
        return True

    def line(self, timeout: float | None = None) -> str:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buffer:
            if not self._fill(deadline):
                raise AssertionError(f"no line within {timeout or self.timeout}s; buffer={self.buffer!r}")
        raw, self.buffer = self.buffer.split(b"\n", 1)
        text = raw.decode("utf-8")
        self.seen.append(text)
        return text

    def expect(self, prefix: str, timeout: float | None = None) -> str:
        """The next line starting with ``prefix``; lines before it (notices) are skipped."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            text = self.line(max(0.01, deadline - time.monotonic()))
            if text.startswith(prefix):
                return text

    def silent(self, within: float = 0.3) -> bool:
        """True if nothing at all arrives within ``within`` seconds."""
        return not self.buffer and not self._fill(time.monotonic() + within)

    def wait_closed(self, timeout: float = 5.0) -> list[str]:
        """Read until the server closes; returns the lines that came first."""
        deadline = time.monotonic() + timeout
        lines = []
        try:
            while time.monotonic() < deadline:
                while b"\n" in self.buffer:
                    lines.append(self.line())
                if not self._fill(deadline):
                    break
        except (EOFError, ConnectionResetError):
            lines.extend(self.buffer.decode("utf-8", "replace").splitlines())
            return lines
        raise AssertionError(f"connection still open after {timeout}s; lines={lines}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def _no_real_data_dir(tmp_path_factory, monkeypatch):
    """No test writes to the real user data or config directory (history.db lives there)."""
    base = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_DATA_HOME", str(base / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))


@pytest.fixture
def make_server(tmp_path):
    """Start ChatServer instances on free loopback ports; all are shut down afterwards.

    History is on, as it is by default, in a database of its own under tmp_path.
    """
    servers = []

    def factory(**overrides) -> chatctl.ChatServer:
        overrides.setdefault("db", str(tmp_path / f"history-{len(servers)}.db"))
        overrides.setdefault("port", 0)
        config = chatctl.ServerConfig(host="127.0.0.1", **overrides)
        server = chatctl.ChatServer(config).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.shutdown()


@pytest.fixture
def server(make_server) -> chatctl.ChatServer:
    return make_server()


@pytest.fixture
def connect(server):
    """Open raw clients to ``server``; closed at teardown."""
    clients = []

    def factory(port: int | None = None) -> RawClient:
        client = RawClient(port or server.port)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


@pytest.fixture
def user(connect):
    """A raw client registered under ``name`` (USER_OK already read)."""

    def factory(name: str, hello: bool | str = False) -> RawClient:
        """``hello``: say HELLO|chatctl/1 first; a string: with those options (``actions``, say)."""
        client = connect()
        if hello:
            client.send(b"HELLO|chatctl/1" + (f"|{hello}" if isinstance(hello, str) else "").encode() + b"\n")
            assert client.line().startswith("HELLO|chatctl/1|")
        client.send(f"USER|{name}\n".encode())
        assert client.line() == "USER_OK"
        return client

    return factory


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> dict[str, str]:
    """HOME, config and data directories under tmp_path, no CHATCTL_* variables, cwd in tmp_path.

    Returns the environment for CLI subprocesses.
    """
    home = tmp_path / "home"
    work = tmp_path / "work"
    for d in (home, work):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("NO_COLOR", "1")
    for var in list(os.environ):
        if var.startswith("CHATCTL_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(work)
    return dict(os.environ)


def run_cli(*args: str, env: dict[str, str], input: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run chatctl as a real subprocess in the current directory."""
    return subprocess.run([*CHATCTL, *args], env=env, input=input, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def spawn_join(isolated_home):
    """``join`` in a pty (pexpect) as ``name`` on ``port``, once its prompt is up; all closed afterwards."""
    children = []

    import pexpect

    def spawn(name: str, port: int, *args: str, color: bool = False) -> pexpect.spawn:
        env = {**isolated_home, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color"}
        if color:
            env.pop("NO_COLOR", None)
        child = pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", "-u", name, "-p", str(port), *args],
                              env=env, dimensions=(40, 140), encoding="utf-8",
                              codec_errors="replace", timeout=10)
        children.append(child)
        child.expect(f"connected to 127.0.0.1:{port} as")
        child.expect(r"#[a-z0-9_-]+>")  # the prompt: the current room
        return child

    yield spawn
    for child in children:
        child.close(force=True)


# --- real programs in tmux (IRC clients) ---------------------------------------------------


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: .ci/run installs it (apt-get install {name})")
        pytest.skip(f"no {name} on this machine (apt-get install {name})")
    return found


class Tmux:
    """A program in a detached tmux session of its own; the screen read with capture-pane."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]):
        self.name = f"chatctl-test-{name}-{os.getpid()}"
        self.env = env
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50",
                        subprocess.list2cmdline(command)], check=True, env=env)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True, env=self.env)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True, env=self.env).stdout

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        wait_until(lambda: text in self.screen(), timeout=timeout)
        assert text in self.screen(), self.screen()

    def close(self) -> None:
        # The test's own tmux server (TMUX_TMPDIR is the test's): all of it goes, whatever state it is in.
        subprocess.run(["tmux", "kill-server"], env=self.env, capture_output=True, timeout=10)


@pytest.fixture
def tmux_env(tmp_path):
    binary("tmux")
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "xterm-256color", "TMUX_TMPDIR": str(tmp_path)}
    env.pop("TMUX", None)
    return env


def register_many(port: int, names: list[str], hello: bool = False, timeout: float = 20) -> list[RawClient]:
    """Raw clients registered under ``names``, USER_OK read (and HELLO sent first if asked)."""
    clients = []
    for name in names:
        client = RawClient(port, timeout=timeout)
        client.send((b"HELLO|chatctl/1\n" if hello else b"") + f"USER|{name}\n".encode())
        client.expect("USER_OK")
        clients.append(client)
    return clients


def protected_name(port: int, name: str, password: str) -> None:
    """Protect ``name`` with ``password`` on the server at ``port``, then leave (the name is free again)."""
    owner = RawClient(port)
    owner.send(f"HELLO|chatctl/1\nUSER|{name}\nREGISTER|{password}\nQUIT\n".encode())
    lines = owner.wait_closed()
    assert f"REGISTER_OK|{name}" in lines, lines


def login(port: int, name: str, password: str | None = None, options: str = "|actions") -> RawClient:
    """``name`` (with its password, if given) logged in after ``HELLO|chatctl/1`` and ``options``."""
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1{options}\nUSER|{name}{'|' + password if password else ''}\n".encode())
    client.expect("USER_OK")
    return client


def chatctl_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("chatctl-")]


# --- Redis, for the cluster tests (serve --bus) ----------------------------------------------


class WsClient:
    """A bare WebSocket client of /ws (wsproto), as a script or another site's page would open it: its
    handshake's ``status`` (101, or the HTTP refusal's), then the server's events as JSON."""

    def __init__(self, port: int, cookie: str = "", origin: str | None = None, timeout: float = 5.0,
                 expect_answer: bool = True, host: str = ""):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"cookie", cookie.encode())] if cookie else []
        if origin:
            headers.append((b"origin", origin.encode()))
        handshake = Request(host=host or f"127.0.0.1:{port}", target="/ws", extra_headers=headers)
        self.sock.sendall(self.ws.send(handshake))
        self.status: int | None = None
        self.events: list[dict] = []
        self.ended = False
        self.close_code: int | None = None  # the server's close frame's code
        if expect_answer:
            self._until(lambda: self.status is not None)

    def _read(self, deadline: float) -> bool:
        from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, TextMessage

        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.ended:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            data = b""
        if not data:
            self.ended = True
        pieces = []
        try:
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.status = 101
                elif isinstance(event, RejectConnection):
                    self.status = event.status_code
                elif isinstance(event, TextMessage):
                    pieces.append(event.data)
                    if event.message_finished:
                        self.events.append(json.loads("".join(pieces)))
                        pieces = []
                elif isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.ended = True
                    self.close_code = event.code
        except Exception:  # not a WebSocket answer at all (an ERR line, say)
            self.ended = True
        return True

    def _until(self, done, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not done():
            if not self._read(deadline):
                raise AssertionError(f"not within {timeout or self.timeout}s; events={self.events}")

    def send(self, text: str) -> None:
        from wsproto.events import TextMessage

        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def event(self, timeout: float | None = None) -> dict:
        self._until(lambda: self.events, timeout)
        return self.events.pop(0)

    def expect(self, kind: str, timeout: float | None = None) -> dict:
        """The next event of type ``kind``; those before it are skipped."""
        while True:
            event = self.event(timeout)
            if event["type"] == kind:
                return event

    def closed(self, timeout: float | None = None) -> bool:
        """Read until the server closes (True), or the time is up (False)."""
        try:
            self._until(lambda: self.ended, timeout)
        except AssertionError:
            return False
        return True

    def refused_or_closed(self, timeout: float | None = None) -> bool:
        try:
            self._until(lambda: self.ended or (self.status not in (None, 101)), timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            tls: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with http.client (``tls``: HTTPS, the certificate unchecked): (status,
    headers with lower-case names, body)."""
    if tls:
        import ssl
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A real redis-server on a free loopback port, with its data in ``directory``; stop and start
    it again (same port, same data unless ``empty``) to play an outage."""

    def __init__(self, binary: str, directory: Path, appendonly: bool = True):
        self.binary, self.directory, self.appendonly = binary, directory, appendonly
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, empty: bool = False) -> RedisProcess:
        if empty:
            for f in self.directory.rglob("*"):
                if f.is_file():
                    f.unlink()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, timeout=10)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes its append-only file and exits
            self.proc.wait(10)
        self.proc = None


def redis_binary() -> str:
    """Debian's redis-server; the test is skipped where it is missing, except in CI (CI=true)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is missing in CI (.ci/run installs it with apt-get)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of our own on a free loopback port, stopped at teardown."""
    directory = tmp_path / "redis"
    directory.mkdir()
    redis = RedisProcess(redis_binary(), directory).start()
    yield redis
    redis.stop()


class Forwarder:
    """A TCP load balancer in one object: connections to ``port`` go to the backend port of the
    moment (``switch``), as HAProxy in ``mode tcp`` would send them."""

    def __init__(self, backend: int):
        self.backend = backend
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def switch(self, backend: int) -> None:
        self.backend = backend

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.backend), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
