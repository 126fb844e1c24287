"""TLS on the shared port, certificate pinning, the server password, protected names, abuse limits."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import ssl
import stat
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatctl
from conftest import RawClient, register_many, run_cli, wait_until


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A certificate and key made the way the server makes its own, and a second, different pair."""
    base = tmp_path_factory.mktemp("tls")
    pairs = []
    for n in (1, 2):
        cert, key = base / f"cert{n}.pem", base / f"key{n}.pem"
        chatctl.generate_certificate(cert, key)
        pairs.append((cert, key))
    return pairs


@pytest.fixture
def tls_server(make_server, tls_files):
    def factory(**overrides):
        cert, key = tls_files[0]
        return make_server(tls=True, tls_cert=str(cert), tls_key=str(key), **overrides)

    return factory


class TlsClient(RawClient):
    """RawClient over TLS, verifying nothing: what a pinned client sees, one thread at a time."""

    def __init__(self, port: int, timeout: float = 5.0):
        super().__init__(port, timeout)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def fingerprint(self) -> str:
        return chatctl.certificate_fingerprint(self.sock.getpeercert(binary_form=True))


# --- TLS --------------------------------------------------------------------------------------


def test_tls_and_plain_clients_share_one_port(tls_server, tls_files):
    server = tls_server()
    secure, plain = TlsClient(server.port), RawClient(server.port)
    secure.send(b"HELLO|chatctl/1\nUSER|ana\n")
    assert secure.expect("USER_OK") == "USER_OK"
    assert secure.fingerprint() == server.tls_fingerprint
    plain.send(b"USER|bob")  # the seed's client, unchanged: one frame per write, no newline
    assert plain.line() == "USER_OK"
    secure.send(b"MSG|over tls\n")
    assert plain.expect("ana: ") == "ana: over tls"
    plain.send(b"MSG|in the clear")
    assert secure.expect("MSG|").endswith("|bob|in the clear")
    big = "x" * 6000  # several TLS records, and a batch the writer encrypts in one go
    carl = register_many(server.port, ["carl"])[0]
    carl.send(f"MSG|{big}\n".encode() * 20)
    for _ in range(20):
        assert secure.expect("MSG|").endswith(big)


def test_tls_required_refuses_plain_text_with_one_err(tls_server):
    server = tls_server(tls_required=True)
    plain = RawClient(server.port)
    plain.send(b"USER|bob\n")
    lines = plain.wait_closed()
    assert lines[0].startswith("ERR|tls-required|")
    assert all(not line.startswith("USER_OK") for line in lines)
    secure = TlsClient(server.port)
    secure.send(b"USER|ana\n")
    assert secure.line() == "USER_OK"


def test_garbage_handshake_is_refused_and_others_are_served(tls_server, caplog):
    server = tls_server()
    good = TlsClient(server.port)
    good.send(b"USER|ana\n")
    assert good.line() == "USER_OK"
    with caplog.at_level(logging.WARNING, logger="chatctl"):
        for garbage in (b"\x16\x03\x01\x02\x00" + os.urandom(600), b"\x16" + b"\xff" * 5000):
            bad = RawClient(server.port)
            bad.send(garbage)
            bad.wait_closed()
        wait_until(lambda: "TLS from 127.0.0.1" in caplog.text)
    good.send(b"MSG|still here\n")
    assert good.line().startswith("MSG_OK")  # the very next line: accepted, not refused
    other = TlsClient(server.port)
    other.send(b"USER|bob\n")
    assert other.line() == "USER_OK"


def test_first_start_makes_a_certificate_with_a_private_key(make_server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    server = make_server(tls=True)
    cert = tmp_path / "data" / "chatctl" / chatctl.CERT_FILE
    key = tmp_path / "data" / "chatctl" / chatctl.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert server.tls_fingerprint == chatctl.certificate_fingerprint(der)
    assert TlsClient(server.port).fingerprint() == server.tls_fingerprint
    again = make_server(tls=True)  # the second start reuses it
    assert again.tls_fingerprint == server.tls_fingerprint


def test_cli_pins_on_first_use_and_refuses_a_changed_certificate(tls_server, tls_files, isolated_home):
    server = tls_server()
    port = str(server.port)
    first = run_cli("send", "--tls", "-p", port, "-u", "bot", "hello", env=isolated_home)
    assert first.returncode == 0, first.stderr
    assert f"recorded the certificate of 127.0.0.1:{port} ({server.tls_fingerprint})" in first.stderr
    known = chatctl.KnownServers()
    assert known.lookup(f"127.0.0.1:{port}") == (server.tls_fingerprint, 1)
    second = run_cli("who", "--tls", "-p", port, "--json", env=isolated_home)
    assert (second.returncode, second.stdout.strip(), second.stderr) == (0, "[]", "")

    # The server's certificate changes (or someone sits in between).
    server.shutdown()
    cert, key = tls_files[1]
    imposter = chatctl.ChatServer(chatctl.ServerConfig(
        host="127.0.0.1", port=int(port), tls=True, tls_cert=str(cert), tls_key=str(key),
        history=False)).start()
    try:
        refused = run_cli("send", "--tls", "-p", port, "-u", "bot", "secret", env=isolated_home)
        assert refused.returncode == chatctl.EXIT_TLS
        assert "HAS CHANGED" in refused.stderr
        assert server.tls_fingerprint in refused.stderr and imposter.tls_fingerprint in refused.stderr
        assert "Traceback" not in refused.stderr
        assert imposter.users() == []  # nothing was sent to it
        # Accepting the new certificate on purpose: pin it once.
        accepted = run_cli("send", "-p", port, "-u", "bot", "hi", "--tls-fingerprint",
                           imposter.tls_fingerprint, env=isolated_home)
        assert accepted.returncode == 0, accepted.stderr
        assert known.lookup(f"127.0.0.1:{port}") == (imposter.tls_fingerprint, 1)
        wrong_pin = run_cli("who", "-p", port, "--tls-fingerprint", server.tls_fingerprint, env=isolated_home)
        assert wrong_pin.returncode == chatctl.EXIT_TLS
        assert "not the pinned" in wrong_pin.stderr
    finally:
        imposter.shutdown()


def test_cli_verifies_against_a_ca_file(tls_server, tls_files, isolated_home):
    server = tls_server()
    ok = run_cli("who", "-p", str(server.port), "--cafile", str(tls_files[0][0]), "--json", env=isolated_home)
    assert ok.returncode == 0, ok.stderr
    assert not chatctl.KnownServers().path.exists()  # a CA needs no pin
    wrong = run_cli("who", "-p", str(server.port), "--cafile", str(tls_files[1][0]), env=isolated_home)
    assert wrong.returncode == chatctl.EXIT_TLS
    assert "failed verification" in wrong.stderr


def test_tls_client_against_a_plain_server_is_one_clear_error(server, isolated_home):
    result = run_cli("who", "--tls", "-p", str(server.port), env=isolated_home)
    assert result.returncode == chatctl.EXIT_CONNECT
    assert "TLS with 127.0.0.1" in result.stderr and "--tls" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_live_session_over_tls_reads_and_writes_from_two_threads(tls_server):
    server = tls_server(rate=0)
    events = []
    config = chatctl.ClientConfig(port=server.port, tls=True, backlog=0)
    session = chatctl.LiveSession(config, "ana", events.append, lambda text, users: None)
    session.start()
    session.run()
    bob = register_many(server.port, ["bob"], hello=True)[0]
    for i in range(200):  # ana writes while her reader thread reads bob's messages
        assert session.send("MSG", f"from ana {i}")
        bob.send(f"MSG|from bob {i}\n".encode())
    for i in range(200):
        assert bob.expect("MSG|").endswith(f"|ana|from ana {i}")
    wait_until(lambda: sum(isinstance(e, chatctl.Delivered) for e in events) == 200)
    texts = [e.message.text for e in events if isinstance(e, chatctl.Delivered)]
    assert texts == [f"from bob {i}" for i in range(200)]
    session.close()


# --- the server password ------------------------------------------------------------------------


def test_server_password_is_required_before_user(make_server, caplog):
    server = make_server(password="letmein-please", auth_delay=0)
    missing = RawClient(server.port)
    missing.send(b"USER|ana\n")
    assert missing.wait_closed()[0].startswith("ERR|password-required|")
    with caplog.at_level(logging.WARNING, logger="chatctl"):
        wrong = RawClient(server.port)
        wrong.send(b"PASS|guess\nUSER|ana\n")
        lines = wrong.wait_closed()
    assert lines[0].startswith("ERR|bad-password|") and "USER_OK" not in lines
    assert "authentication failed from 127.0.0.1:" in caplog.text
    right = RawClient(server.port)
    right.send(b"PASS|letmein-please\nUSER|ana\n")
    assert right.line() == "PASS_OK"
    assert right.line() == "USER_OK"
    assert not chatctl.same_secret("letmein", "letmein-please") and chatctl.same_secret("a|b", "a|b")


def test_cli_takes_the_server_password_from_the_environment(make_server, isolated_home):
    server = make_server(password="letmein-please", auth_delay=0)
    refused = run_cli("send", "-p", str(server.port), "-u", "ci", "hi", env=isolated_home)
    assert refused.returncode == chatctl.EXIT_REJECTED
    assert "CHATCTL_PASSWORD" in refused.stderr
    env = {**isolated_home, "CHATCTL_PASSWORD": "letmein-please"}
    assert run_cli("send", "-p", str(server.port), "-u", "ci", "hi", env=env).returncode == 0
    assert run_cli("who", "-p", str(server.port), "--json", env=env).stdout.strip() == "[]"


# --- protected names ------------------------------------------------------------------------------


def protect(port: int, name: str, password: str) -> RawClient:
    owner = register_many(port, [name], hello=True)[0]
    owner.send(f"REGISTER|{password}\n".encode())
    # An earlier owner's QUIT may still be on its way: its LEAVE can come first.
    assert owner.expect(("REGISTER_OK|", "ERR|")) == f"REGISTER_OK|{name}"
    return owner


def test_a_protected_name_needs_its_password_even_while_its_owner_is_away(make_server, tmp_path):
    server = make_server(auth_delay=0, accounts_db=str(tmp_path / "accounts.db"))
    owner = protect(server.port, "ana", "correct horse")
    owner.send(b"QUIT\n")
    owner.wait_closed()
    mallory = RawClient(server.port)
    mallory.send(b"USER|ana\n")
    assert mallory.line().startswith("ERR|name-protected|")
    mallory.send(b"USER|ANA|battery staple\n")  # names are matched without case
    assert mallory.line().startswith("ERR|bad-password|")
    assert server.users() == []
    back = RawClient(server.port)
    back.send(b"USER|ana|correct horse\n")
    assert back.line() == "USER_OK"
    stored = sqlite3.connect(tmp_path / "accounts.db").execute("SELECT key, hash FROM accounts").fetchall()
    assert stored[0][0] == "ana" and stored[0][1].startswith("scrypt$")
    assert b"correct horse" not in (tmp_path / "accounts.db").read_bytes()


def test_protection_survives_a_restart_and_can_be_dropped(make_server, tmp_path):
    accounts = str(tmp_path / "accounts.db")
    first = make_server(accounts_db=accounts)
    protect(first.port, "ana", "correct horse").send(b"QUIT\n")
    first.shutdown()
    second = make_server(accounts_db=accounts)
    client = RawClient(second.port)
    client.send(b"USER|ana\n")
    assert client.line().startswith("ERR|name-protected|")
    client.send(b"USER|ana|correct horse\nREGISTER|short|correct horse\nUNREGISTER|correct horse\n")
    assert client.line() == "USER_OK"
    assert client.line().startswith("ERR|weak-password|")
    assert client.line() == "UNREGISTER_OK|ana"
    client.send(b"QUIT\n")
    client.wait_closed()
    anyone = RawClient(second.port)
    anyone.send(b"USER|ana\n")
    assert anyone.line() == "USER_OK"


def test_impersonating_an_online_owner_fails_and_the_owner_logs_a_stale_device_out(make_server):
    server = make_server(auth_delay=0)
    stale = protect(server.port, "ana", "correct horse")  # her laptop dropped off; the server does not know
    watcher = register_many(server.port, ["bob"], hello=True)[0]
    stale.expect("JOIN|")
    mallory = RawClient(server.port)
    mallory.send(b"USER|ana\nUSER|ana|guess one\n")
    assert mallory.line().startswith("ERR|name-protected|")
    assert mallory.line().startswith("ERR|bad-password|")
    assert stale.silent(0.2)  # the owner was not disturbed
    again = RawClient(server.port)
    again.send(b"USER|ana|correct horse\n")
    assert again.line() == "USER_OK"  # one more device of hers: nobody was taken over
    assert stale.silent(0.2) and watcher.silent(0.3)  # and nobody heard ana leave or come
    again.send(b"LOGOUT|others|guess two\n")
    assert again.line().startswith("ERR|bad-password|")
    again.send(b"LOGOUT|others|correct horse\n")
    assert again.line() == "LOGOUT_OK|1"
    assert stale.wait_closed()[-1].startswith("BYE|logged out by ana's device")
    again.send(b"MSG|it is me\n")
    assert watcher.expect("MSG|").endswith("|ana|it is me")
    assert [u.name for u in server.users()] == ["ana", "bob"]  # ana still from her first login on
    assert [line for line in watcher.seen if line.startswith(("LEAVE|", "JOIN|"))] == []


def test_failed_passwords_are_slowed_down_and_then_locked_out(make_server, caplog):
    server = make_server(auth_delay=0.2, auth_max_failures=3, auth_lockout=60)
    protect(server.port, "ana", "correct horse").send(b"QUIT\n")
    client = RawClient(server.port)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="chatctl"):
        for attempt in range(3):
            client.send(f"USER|ana|guess {attempt}\n".encode())
            assert client.line().startswith("ERR|bad-password|")
    assert time.monotonic() - started >= 0.6  # each failure waited auth_delay
    assert caplog.text.count("authentication failed from 127.0.0.1:") == 3
    other = RawClient(server.port)  # a new connection from the same address is locked out too
    other.send(b"USER|ana|correct horse\n")
    assert other.wait_closed()[0].startswith("ERR|auth-locked|")


def test_live_session_logged_out_from_another_device_does_not_come_back(make_server):
    server = make_server(auth_delay=0)
    protect(server.port, "ana", "correct horse").send(b"QUIT\n")
    statuses = []
    config = chatctl.ClientConfig(port=server.port, user_password="correct horse", backlog=0)
    session = chatctl.LiveSession(config, "ana", lambda e: None, lambda text, users: statuses.append(text))
    session.start()
    session.run()
    laptop = RawClient(server.port)
    laptop.send(b"USER|ana|correct horse\nLOGOUT|others|correct horse\n")
    assert laptop.line() == "USER_OK"
    assert laptop.line() == "LOGOUT_OK|1"
    wait_until(lambda: session.ended)
    assert "not reconnecting" in statuses[-1]
    assert laptop.silent(chatctl.RECONNECT_MIN * 3)  # nobody took the name back
    session.close()


def test_cli_register_then_send_needs_the_password(make_server, isolated_home):
    server = make_server(auth_delay=0)
    port = str(server.port)
    made = run_cli("register", "-p", port, "-u", "deploybot", input="s3cret-pass\n", env=isolated_home)
    assert made.returncode == 0, made.stderr
    refused = run_cli("send", "-p", port, "-u", "deploybot", "hi", env=isolated_home)
    assert refused.returncode == chatctl.EXIT_REJECTED
    assert "CHATCTL_USER_PASSWORD" in refused.stderr
    env = {**isolated_home, "CHATCTL_USER_PASSWORD": "s3cret-pass"}
    assert run_cli("send", "-p", port, "-u", "deploybot", "build green", env=env).returncode == 0
    wrong = run_cli("send", "-p", port, "-u", "deploybot", "hi",
                    env={**isolated_home, "CHATCTL_USER_PASSWORD": "nope-nope"})
    assert wrong.returncode == chatctl.EXIT_REJECTED and "wrong password" in wrong.stderr


# --- abuse limits -----------------------------------------------------------------------------------


def test_connections_per_address_and_in_total_are_limited(make_server):
    server = make_server(max_per_address=2)
    first, _second = RawClient(server.port), RawClient(server.port)
    wait_until(lambda: len(server.registry.sessions()) == 2)
    third = RawClient(server.port)
    assert third.wait_closed()[0].startswith("ERR|too-many-connections|too many connections from 127.0.0.1")
    first.close()
    wait_until(lambda: len(server.registry.sessions()) == 1)
    fourth = RawClient(server.port)
    fourth.send(b"USER|ana\n")
    assert fourth.line() == "USER_OK"

    full = make_server(max_connections=1, max_per_address=0)
    one = RawClient(full.port)
    one.send(b"USER|one\n")
    assert one.line() == "USER_OK"
    assert RawClient(full.port).wait_closed()[0].startswith("ERR|too-many-connections|the server is full")


def test_default_rate_limit_lets_a_pasted_burst_through(server):
    client = register_many(server.port, ["paster"])[0]
    client.send(b"".join(f"MSG|line {i}\n".encode() for i in range(99)))
    for _ in range(99):
        assert client.line() == "MSG_OK"


def test_excess_frames_get_rate_limited_and_a_flood_is_dropped(make_server):
    rate, burst = 5, 10
    server = make_server(rate=rate, burst=burst, flood_limit=50)
    started = time.monotonic()  # before the connection: its bucket fills from later than this
    client, watcher = register_many(server.port, ["fast", "watch"])
    client.send(b"".join(f"MSG|m{i}\n".encode() for i in range(30)))
    replies = [client.line() for _ in range(30)]
    elapsed = time.monotonic() - started
    accepted = replies.count("MSG_OK")
    assert replies[:accepted] == ["MSG_OK"] * accepted  # replies keep the order of the frames
    # the burst (less the token USER took) always; beyond it only what refilled at `rate` meanwhile
    assert burst - 1 <= accepted <= burst - 1 + int(rate * elapsed), (accepted, elapsed)
    assert replies.count("ERR|rate-limited|" + chatctl.ERROR_CODES["rate-limited"]) == 30 - accepted
    time.sleep(0.5)  # tokens come back at the configured rate
    client.send(b"MSG|later\n")
    assert client.line() == "MSG_OK"
    client.send(b"MSG|flood\n" * 200)
    assert client.wait_closed()[-1] == "BYE|flooding"
    watcher.send(b"MSG|unaffected\n")
    watcher.expect("MSG_OK")
    assert not [line for line in watcher.seen if line.startswith("ERR|")]  # never refused anything


# --- hostile clients -----------------------------------------------------------------------------------


def resident_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_hostile_clients_do_not_hurt_two_well_behaved_ones(make_server, tls_files):
    cert, key = tls_files[0]
    server = make_server(tls=True, tls_cert=str(cert), tls_key=str(key), sendq=256 * 1024,
                         max_per_address=0)
    ana, bob = register_many(server.port, ["ana", "bob"], timeout=30)
    before = resident_kib()
    stop = threading.Event()
    rng = __import__("random").Random(5)

    def hostile(kind: int) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            if kind == 5:  # registers, then asks for everything and never reads
                sock.sendall(f"USER|sink{rng.randrange(10**6)}\n".encode())
            while not stop.is_set():
                if kind == 0:
                    sock.sendall(os.urandom(rng.randrange(1, 4096)))
                elif kind == 1:
                    sock.sendall(b"MSG|half a fra")
                    stop.wait(0.05)
                elif kind == 2:
                    sock.sendall(b"A" * 65536)  # a frame that never ends
                elif kind == 3:
                    for byte in b"USER|slow\nDIR\n":
                        sock.send(bytes([byte]))
                elif kind == 4:
                    sock.sendall(b"\x16\x03\x01" + os.urandom(300))
                else:
                    sock.sendall(b"DIR\nHISTORY|LAST|500\n" * 50)
        except OSError:
            pass  # dropped by the server, as it should be

    threads = [threading.Thread(target=hostile, args=(i % 6,), daemon=True) for i in range(48)]
    for t in threads:
        t.start()
    try:
        for i in range(60):
            ana.send(f"MSG|ana {i}\n".encode())
            bob.send(f"MSG|bob {i}\n".encode())
        for i in range(60):
            assert bob.expect("ana: ") == f"ana: ana {i}"
            assert ana.expect("bob: ") == f"bob: bob {i}"
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not [t for t in threads if t.is_alive()], "a hostile client is still running"
    grown = resident_kib() - before
    print(f"\nresident memory: {before} KiB before, grew by {grown} KiB under 48 hostile connections")
    assert grown < 150 * 1024
    ana.send(b"DIR\n")
    assert {"ana", "bob"} <= set(ana.expect("Users logged in: ").split(": ", 1)[1].split(", "))


# --- fuzzing the decoder and the dispatcher ------------------------------------------------------------

VERBS = [*chatctl.COMMAND_HANDLERS, "NOPE", "user", ""]
frame_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda verb, arg, end: f"{verb}|{arg}".encode("utf-8", "surrogatepass") + end,
              st.sampled_from(VERBS), st.text(max_size=120), st.sampled_from([b"\n", b"\r\n", b""])),
    st.builds(lambda verb, end: verb.encode() + end, st.sampled_from(VERBS), st.sampled_from([b"\n", b""])),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    server = chatctl.ChatServer(chatctl.ServerConfig(
        host="127.0.0.1", port=0, db=str(base / "history.db"), accounts_db=str(base / "accounts.db"),
        max_frame=256, rate=0, auth_delay=0, password="", max_per_address=0)).start()  # sessions end async
    yield server
    server.shutdown()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frame_bytes, max_size=25), st.data())
def test_dispatcher_survives_any_bytes_split_anywhere(fuzz_server, frames, data):
    """Whatever arrives, in whatever pieces, the session handles it: no exception escapes process()."""
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    ours, theirs = socket.socketpair()
    session = chatctl.ClientSession(fuzz_server, ours, ("127.0.0.1", 9))
    assert fuzz_server.registry.connect(session) is None
    fuzz_server.writer.adopt(session)
    try:
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            session.process(session.decoder.feed(stream[start:end]))
            if session.leave_reason is not None:
                break
        session.process(session.decoder.end_of_write())
        assert len(session.decoder._partial) <= fuzz_server.config.max_frame + 1
    finally:
        fuzz_server.release(session)
        theirs.close()


# --- issue 10: look-alike names -------------------------------------------------------------------------


def raw_from(port: int, source: str) -> RawClient:
    """A raw client whose address is ``source`` (another loopback address: another host, to the server)."""
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    client.timeout, client.buffer, client.seen = 5.0, b"", []
    return client


@pytest.mark.parametrize("lookalike", ["ANA", "ａｎａ", "𝐚𝐧𝐚", "ᴀna"])
def test_a_name_that_looks_like_one_online_is_taken(user, connect, lookalike):
    user("ana")
    impostor = connect()
    impostor.send(f"USER|{lookalike}\n".encode())
    assert impostor.line().startswith("ERR|name-taken|")


@pytest.mark.parametrize(("name", "why"), [
    ("аna", "mix scripts"),            # Cyrillic а among Latin letters
    ("αna", "mix scripts"),            # Greek α
    ("ana\u3164", "U+3164"),          # a Hangul filler: shows nothing
    ("ana\u1160", "U+1160"),
    ("\u115f\u3164", "U+115F"),       # a name of fillers alone is invisible
    ("ana\uffa0", "U+FFA0"),
])
def test_mixed_scripts_and_invisible_letters_are_refused(connect, name, why):
    client = connect()
    client.send(f"USER|{name}\n".encode())
    line = client.line()
    assert line.startswith("ERR|invalid-name|") and why in line


def test_a_name_that_looks_like_a_protected_one_needs_its_password(make_server):
    server = make_server(auth_delay=0)
    protect(server.port, "fana", "correct horse").send(b"QUIT\n")
    for lookalike in ("ſana", "FANA", "ｆａｎａ"):
        client = RawClient(server.port)
        client.send(f"USER|{lookalike}\n".encode())
        assert client.line().startswith("ERR|name-protected|"), lookalike


@pytest.mark.parametrize("name", ["Аня", "山田たろう", "김철수", "josé", "dj_x-1.2"])
def test_names_in_one_script_are_welcome(connect, name):
    client = connect()
    client.send(f"USER|{name}\n".encode())
    assert client.line() == "USER_OK"


# --- issue 10: guessing passwords ------------------------------------------------------------------------


def test_a_success_on_another_name_does_not_reset_the_count(make_server):
    server = make_server(auth_delay=0, auth_max_failures=3, auth_lockout=60)
    protect(server.port, "ana", "correct horse").send(b"QUIT\n")
    protect(server.port, "mallory", "mallory's own").send(b"QUIT\n")
    replies = []
    for attempt in range(6):  # a wrong guess at ana, then a right login as mallory, again and again
        guess = RawClient(server.port)
        guess.send(f"USER|ana|guess {attempt}\n".encode())
        replies.append(guess.line().split("|")[1])
        own = RawClient(server.port)
        own.send(b"USER|mallory|mallory's own\nQUIT\n")
        own.wait_closed()
    assert replies[:3] == ["bad-password"] * 3
    assert replies[3:] == ["auth-locked"] * 3


def test_parallel_guesses_take_their_turn_before_the_hash(make_server):
    server = make_server(auth_delay=0, auth_max_failures=3, auth_lockout=60)
    protect(server.port, "ana", "correct horse").send(b"QUIT\n")
    guessers = [RawClient(server.port, timeout=20) for _ in range(12)]
    for i, g in enumerate(guessers):
        g.send(f"USER|ana|guess {i}\n".encode())
    codes = [g.line(20).split("|")[1] for g in guessers]
    assert codes.count("bad-password") == 3
    assert codes.count("auth-locked") == 9


def test_many_addresses_get_no_more_guesses_but_the_owner_still_gets_in(make_server):
    server = make_server(auth_delay=0, auth_max_failures=5, auth_target_failures=4, auth_lockout=60)
    owner = protect(server.port, "ana", "correct horse")
    owner.send(b"QUIT\n")
    back = raw_from(server.port, "127.0.0.1")  # the owner has logged in from here: a known address
    back.send(b"USER|ana|correct horse\nQUIT\n")
    assert back.line() == "USER_OK"
    codes = []
    for n in range(2, 10):  # a guesser with eight addresses, one guess each
        guesser = raw_from(server.port, f"127.0.0.{n}")
        guesser.send(b"USER|ana|guess\n")
        codes.append(guesser.line().split("|")[1])
    assert codes == ["bad-password"] * 4 + ["auth-locked"] * 4
    owner = raw_from(server.port, "127.0.0.1")
    owner.send(b"USER|ana|correct horse\n")
    assert owner.line() == "USER_OK"


def test_wrong_server_passwords_hold_an_address_for_one_refill_not_the_window(make_server):
    # the office behind one NAT address: a colleague's typos cost the others seconds
    server = make_server(password="letmein-please", auth_delay=0, auth_max_failures=2, auth_lockout=3)
    for _ in range(2):
        typo = RawClient(server.port)
        typo.send(b"PASS|letmein-pleas\n")
        assert typo.wait_closed()[0].startswith("ERR|bad-password|")
    locked = RawClient(server.port)
    locked.send(b"PASS|letmein-please\n")
    assert locked.wait_closed()[0].startswith("ERR|auth-locked|")
    time.sleep(1.6)  # one failure's worth refills in auth_lockout / auth_max_failures = 1.5 s
    colleague = RawClient(server.port)
    colleague.send(b"PASS|letmein-please\n")
    assert colleague.line() == "PASS_OK"


def test_password_hashes_run_one_at_a_time_and_a_crowd_is_refused(make_server, monkeypatch):
    server = make_server(auth_delay=0, auth_max_failures=0)
    protect(server.port, "ana", "correct horse").send(b"QUIT\n")
    running, most = 0, 0
    lock = threading.Lock()
    real = chatctl.verify_password

    def counting(password, stored):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real(password, stored)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(chatctl, "verify_password", counting)
    crowd = [RawClient(server.port, timeout=30) for _ in range(40)]
    for i, c in enumerate(crowd):
        c.send(f"USER|ana|guess {i}\n".encode())
    codes = [c.line(30).split("|")[1] for c in crowd]
    assert most == server.config.password_hashes == 1
    assert "server-busy" in codes and set(codes) <= {"bad-password", "server-busy"}


def test_register_is_rate_limited(server):
    client = register_many(server.port, ["ana"])[0]
    client.send(b"REGISTER|correct horse\nREGISTER|battery staple|correct horse\n")
    assert client.line() == "REGISTER_OK|ana"
    assert client.line().startswith("ERR|rate-limited|one REGISTER per")


# --- issue 10: a TLS client that never reads ----------------------------------------------------------------


def fill_history(port: int, count: int, size: int) -> None:
    """``count`` messages of ``size`` bytes from one client, each acknowledged (rate limits off)."""
    poster = register_many(port, ["poster"])[0]
    poster.send(b"".join(b"MSG|" + b"y" * size + b"\n" for _ in range(count)))
    for _ in range(count):
        poster.expect("MSG_OK")
    poster.close()


def ask_over_tls_and_never_read(server, requests: bytes, seconds: float = 20) -> None:
    """A TLS client named sink sends ``requests`` every 50 ms and never reads; it must be dropped
    at its SendQ within ``seconds``."""
    sink = TlsClient(server.port)
    sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.send(b"HELLO|chatctl/1\nUSER|sink\n")
    wait_until(lambda: "sink" in [u.name for u in server.users()])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and "sink" in [u.name for u in server.users()]:
        try:
            sink.send(requests)
        except (OSError, ssl.SSLError):
            break
        time.sleep(0.05)
    assert "sink" not in [u.name for u in server.users()], "a TLS client that never reads was not dropped"


def test_a_tls_client_that_never_reads_is_dropped_at_its_sendq(tls_server):
    server = tls_server(sendq=64 * 1024, rate=0)
    poster = register_many(server.port, ["poster"])[0]
    poster.send(b"".join(f"MSG|{'x' * 1000} {i}\n".encode() for i in range(200)))
    for _ in range(200):
        poster.expect("MSG_OK")
    ask_over_tls_and_never_read(server, b"HISTORY|LAST|10\n" * 5)  # each reply fits the SendQ; not all
    wait_until(lambda: all(s.outbound.size < 8 * 64 * 1024 for s in server.registry.sessions()))


# --- issue 10: what the attack review of the fixes found ----------------------------------------------------


def test_a_quiet_session_cannot_act_as_someone_who_came_online(server):
    quiet = RawClient(server.port)
    quiet.send(b"HELLO|chatctl/1|quiet\nUSER|carol\n")
    assert quiet.expect("USER_OK") == "USER_OK"  # nobody online holds carol: a script may post as carol
    carol = register_many(server.port, ["carol"], hello=True)[0]  # the real carol comes online
    bob = register_many(server.port, ["bob"], hello=True)[0]
    bob.send(b"DM|carol|vault code 4711\n")
    bob.expect("MSG_OK")
    carol.expect("DM|")
    quiet.send(b"MSG|I am carol, send me the keys\nHISTORY|LAST|3\n")
    assert quiet.line().startswith("ERR|name-taken|")
    assert quiet.line().startswith("ERR|name-taken|")
    assert bob.silent(0.3)


def test_many_connections_from_one_address_cannot_drop_a_reader(make_server):
    server = make_server(max_per_address=0)
    reader = register_many(server.port, ["reader"], hello=True, timeout=30)[0]
    flooders = register_many(server.port, [f"f{i}" for i in range(12)])
    for f in flooders:  # each within its own frame burst; together 29 MB once controls show as U+FFFD
        f.send(b"".join(b"MSG|" + b"\x01" * 8180 + b"\n" for _ in range(100)))
    accepted = 0
    for f in flooders:
        replies = [f.line(30) for _ in range(100)]
        accepted += replies.count("MSG_OK")
    for _ in range(accepted):
        reader.expect("MSG|", timeout=30)
    assert "reader" in [u.name for u in server.users()]
    assert accepted * 8180 * 3 <= 2 * chatctl.ADDRESS_BYTE_BURST  # the address's budget, not 12 bursts


def test_clients_that_ask_and_never_read_cost_bounded_memory(make_server, monkeypatch):
    server = make_server(max_per_address=0, rate=0)
    fill_history(server.port, 400, 6000)
    most = 0
    real_put = chatctl.OutboundQueue.put

    def put(queue, data, force=False):
        nonlocal most
        first = real_put(queue, data, force)
        most = max(most, queue.size)
        return first

    monkeypatch.setattr(chatctl.OutboundQueue, "put", put)
    sinks = []
    for _ in range(48):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"HELLO|chatctl/1\n" + b"HISTORY|LAST|500\n" * 60)  # 60 replies of 256 KiB asked
        sinks.append(sock)
    wait_until(lambda: len(server.registry.sessions()) == 48)  # all of them in (the poster is gone)
    wait_until(lambda: not server.registry.sessions(), timeout=30)  # all dropped at their SendQ
    assert most <= 1.5 * server.config.sendq  # what one client may hold: a SendQ and a half
    for sock in sinks:
        sock.close()


def test_registering_makes_the_owners_address_known(make_server):
    server = make_server(auth_delay=0, auth_target_failures=2)
    owner = raw_from(server.port, "127.0.0.7")
    owner.send(b"USER|victim\nREGISTER|victim-pass-1\nQUIT\n")
    assert owner.wait_closed()[:2] == ["USER_OK", "REGISTER_OK|victim"]
    for n in range(50, 54):
        guesser = raw_from(server.port, f"127.0.0.{n}")
        guesser.send(b"USER|victim|guess\n")
        guesser.line()
    back = raw_from(server.port, "127.0.0.7")
    back.send(b"USER|victim|victim-pass-1\n")
    assert back.line() == "USER_OK"


@pytest.mark.parametrize(("online", "lookalike"), [
    ("a-b", "a一b"), ("a-b", "aーb"), ("a-b", "aㅡb"), ("bob", "bㅇb"), ("lo", "丨o"), ("ana", "ana丶"),
    ("ana", "anạ"), ("ana", "aná"), ("zoe", "zoé"),
])
def test_look_alikes_the_review_found_are_refused(user, connect, online, lookalike):
    user(online)
    impostor = connect()
    impostor.send(f"USER|{lookalike}\n".encode())
    assert impostor.line().startswith(("ERR|name-taken|", "ERR|invalid-name|"))


def test_a_name_that_nfkc_turns_into_words_is_refused(connect):
    client = connect()
    client.send("USER|ﷺﷺﷺ\n".encode())
    assert client.line().startswith("ERR|invalid-name|")


def test_a_ping_token_stays_on_one_line(connect):
    client = connect()
    client.send("PING|a\u2028MSG|1|2026|admin|fake\n".encode())
    assert client.line() == "PONG|a MSG|1|2026|admin|fake"
    assert client.silent(0.2)


@pytest.mark.parametrize("number", ["٣", "５", "1_0", "+2", " 2"])
def test_numbers_are_ascii_digits(server, number):
    client = register_many(server.port, ["ana"], hello=True)[0]
    client.send(f"HISTORY|LAST|{number}\n".encode())
    assert client.line().startswith("ERR|bad-argument|")


def test_the_certificate_is_not_writable_by_others_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        chatctl.generate_certificate(tmp_path / "c.pem", tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


# --- issue 10: the second attack review -----------------------------------------------------------------


def test_long_quit_reasons_from_one_address_drop_no_reader(make_server):
    server = make_server(max_per_address=0)
    reader = register_many(server.port, ["reader"], hello=True, timeout=30)[0]
    for i in range(200):  # join and leave with the longest reason a frame holds, again and again
        quitter = RawClient(server.port)
        quitter.send(f"USER|q{i}\nQUIT|".encode() + b"\x01" * 8180 + b"\n")
        quitter.wait_closed()
        quitter.close()
    reader.expect("LEAVE|", timeout=30)
    while "|q199|" not in reader.seen[-1]:  # they come in order; the last one ends the flood
        reader.expect("LEAVE|", timeout=30)
    leaves = [line for line in reader.seen if line.startswith("LEAVE|")]
    assert leaves and all(len(line) < 1000 for line in leaves)  # each reason cut to 200 characters
    assert "reader" in [u.name for u in server.users()]


@pytest.mark.parametrize(("online", "lookalike"), [
    ("tim", "TIM"), ("alice", "ALICE"), ("mix", "ΜΙΧ"), ("ian", "lan"), ("io", "ΙΟ"),
])
def test_capital_look_alikes_are_the_same_name(user, connect, online, lookalike):
    user(online)
    impostor = connect()
    impostor.send(f"USER|{lookalike}\n".encode())
    assert impostor.line().startswith("ERR|name-taken|")


def test_a_protected_name_in_capitals_needs_its_password(make_server):
    server = make_server(auth_delay=0)
    protect(server.port, "tina", "correct horse")  # online
    for lookalike in ("TINA", "TlNA"):
        client = RawClient(server.port)
        client.send(f"USER|{lookalike}\n".encode())
        assert client.line().startswith("ERR|name-protected|"), lookalike


def test_a_tls_client_that_never_reads_holds_little_ciphertext(tls_server, monkeypatch):
    server = tls_server(rate=0)
    fill_history(server.port, 200, 8000)
    most = 0
    real_seal = chatctl.TlsChannel.seal

    def seal(channel, plain):
        nonlocal most
        most = max(most, len(plain))
        return real_seal(channel, plain)

    monkeypatch.setattr(chatctl.TlsChannel, "seal", seal)
    ask_over_tls_and_never_read(server, b"HISTORY|LAST|500\n" * 2)
    assert most <= server.reply_bytes + chatctl.TLS_SEAL_BYTES  # never the whole queue at once


def test_a_flood_waits_for_its_commits_instead_of_queueing_without_end(make_server):
    """With the rate limit off, one connection may still have only max_in_flight messages waiting."""
    server = make_server(rate=0, max_in_flight=8)
    gate = threading.Event()
    real_insert = server.history.insert
    server.history.insert = lambda batch: (gate.wait(5), real_insert(batch))
    flooder, other = register_many(server.port, ["flooder", "other"])
    before = server.log.last_id
    flooder.send(b"".join(f"MSG|flood {i}\n".encode() for i in range(50)))
    wait_until(lambda: server.log.last_id - before >= 8)
    other.send(b"PING|still here\n")  # another connection is served meanwhile
    assert other.expect("PONG") == "PONG|still here"
    assert server.log.last_id - before <= 9  # 8 waiting, and one being committed at most
    gate.set()
    assert [flooder.expect("MSG_OK") for _ in range(50)] == ["MSG_OK"] * 50


def test_joining_and_parting_are_charged_to_the_address_byte_budget(make_server):
    """ENTER and EXIT lines and PART reasons reach every member like messages do, so they cost the
    same budget: a JOIN/PART loop from one address cannot send a member more than the budget allows."""
    burst, rate = 20_000, 2_000
    server = make_server(address_byte_rate=rate, address_byte_burst=burst, rate=10_000, burst=10_000)
    rooms = [f"#r{i}" for i in range(10)]
    watcher = RawClient(server.port, timeout=10)
    watcher.send(b"HELLO|chatctl/1\nUSER|watcher\nJOIN|" + ",".join(rooms).encode() + b"\n")
    for _ in rooms:
        watcher.expect("JOIN_OK|")
    start = time.monotonic()
    looper = RawClient(server.port, timeout=10)
    looper.send(b"HELLO|chatctl/1\nUSER|looper\n")
    looper.expect("USER_OK")
    reason = "x" * 200
    for n in range(40):
        loop = b"".join(f"JOIN|{r}\nPART|{r}|{reason}\n".encode() for r in rooms)
        looper.send(loop + f"PING|{n}\n".encode())
        looper.expect(f"PONG|{n}")
    looper.send(b"PING|end\n")
    looper.expect("PONG|end")
    elapsed = time.monotonic() - start
    for _ in range(100):  # presence lines go out together, within PRESENCE_MAX_DELAY: read until quiet
        if watcher.silent(chatctl.PRESENCE_MAX_DELAY + 0.5):
            break
        while b"\n" in watcher.buffer:
            watcher.line()
    received = sum(len(line) + 1 for line in watcher.seen if line.startswith(("ENTER|", "EXIT|")))
    assert 0 < received <= burst + rate * elapsed + 1000, (received, elapsed)
    refused = [line for line in looper.seen if line.startswith("ERR|rate-limited|")]
    assert refused  # the loop was told, not silently cut


def test_a_quiet_session_cannot_protect_a_name_someone_online_holds(make_server):
    server = make_server(auth_delay=0)
    squatter = RawClient(server.port)
    squatter.send(b"HELLO|chatctl/1|quiet\nUSER|erin\n")
    squatter.expect("USER_OK")
    erin = RawClient(server.port)
    erin.send(b"HELLO|chatctl/1\nUSER|erin\n")
    erin.expect("USER_OK")
    squatter.send(b"REGISTER|attackerpw123\n")
    assert squatter.expect("ERR|").startswith("ERR|name-taken|")
    thief = RawClient(server.port)
    thief.send(b"USER|erin|attackerpw123\n")
    assert thief.line().startswith("ERR|name-taken|")
    erin.send(b"PING|still here\n")
    assert erin.expect("PONG|") == "PONG|still here"  # not taken over


def test_one_address_may_protect_only_so_many_names_an_hour(make_server):
    """Each REGISTER costs a password hash: many connections from one address must not keep the
    hashing busy (everyone's logins wait on it) or fill the accounts without end."""
    server = make_server(auth_delay=0, register_per_hour=3)
    replies = []
    for n in range(5):
        client = RawClient(server.port)
        client.send(f"HELLO|chatctl/1\nUSER|squat{n}\nREGISTER|password{n}xyz\n".encode())
        replies.append(client.expect(("REGISTER_OK", "ERR|")).split("|")[:2])
        client.close()
    assert replies[:3] == [["REGISTER_OK", f"squat{n}"] for n in range(3)]
    assert replies[3:] == [["ERR", "rate-limited"]] * 2
