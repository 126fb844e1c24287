"""The server over real loopback sockets: seed compatibility, extensions, errors, limits."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import chatctl
from conftest import RawClient, chatctl_threads, register_many, wait_until

# --- the seed's protocol, byte for byte ------------------------------------------------


def test_seed_replies_are_byte_exact(connect):
    ana, bob = connect(), connect()
    ana.send(b"USER|ana\n")
    assert ana.sock.recv(100) == b"USER_OK\n"
    bob.send(b"USER|bob\n")
    assert bob.line() == "USER_OK"
    ana.send(b"DIR\n")
    assert ana.expect("Users") == "Users logged in: ana, bob"
    bob.send(b"MSG|hello\n")
    assert bob.line() == "MSG_OK"


def test_unframed_seed_script_works_unchanged(connect):
    """The seed's clients: one frame per sendall(), no line end, then wait for the reply."""
    ana = connect()
    ana.send(b"USER|ana")
    assert ana.line() == "USER_OK"
    ana.send(b"DIR")
    assert ana.line() == "Users logged in: ana"
    listener = connect()
    listener.send(b"USER|lis")
    assert listener.line() == "USER_OK"
    ana.send(b"MSG|hello from a script")
    assert ana.expect("MSG_OK") == "MSG_OK"
    assert listener.line() == "ana: hello from a script"  # the seed server's own delivery form


def test_netcat_style_session(connect):
    """A person at nc: lines end in \\n (or \\r\\n), commands in any case, blank lines ignored."""
    ana, bob = connect(), connect()
    ana.send(b"user|ana\r\n")
    assert ana.line() == "USER_OK"
    bob.send(b"USER|bob\n\n")
    assert bob.line() == "USER_OK"
    ana.send(b"msg|hi bob, a | is fine\r\n")
    assert ana.line() == "MSG_OK"  # no JOIN line before it: ana never said HELLO
    assert bob.line() == "ana: hi bob, a | is fine"
    bob.send(b"QUIT\n")
    assert bob.wait_closed() == ["BYE|goodbye"]
    ana.send(b"DIR\n")
    assert ana.line() == "Users logged in: ana"  # no LEAVE line before it either


def test_dir_before_user_does_not_list_the_asker(connect, user):
    user("ana")
    asker = connect()
    asker.send(b"DIR\n")
    assert asker.line() == "Users logged in: ana"


# --- extensions ---------------------------------------------------------------------------


def test_hello_gets_ids_in_acks_and_structured_user_lists(user):
    ana = user("ana", hello=True)
    bob = user("bob", hello=True)
    ana.send(b"MSG|one\n")
    ack = ana.expect("MSG_OK")
    _, mid, ts = ack.split("|")
    delivered = bob.expect("MSG|")
    assert delivered.startswith(f"MSG|#main|{mid}|{ts}|ana|one")
    ana.send(b"DIR\n")
    users = chatctl.parse_event(ana.expect("USERS|"))
    assert [u.name for u in users.users] == ["ana", "bob"]
    assert all(u.since > 0 for u in users.users)


def test_direct_message_reaches_only_its_recipient(user):
    ana, bob, eve = user("ana"), user("bob", hello=True), user("eve", hello=True)
    ana.send(b"DM|BOB|for your eyes only\n")
    assert ana.expect("MSG_OK") == "MSG_OK"
    line = bob.expect("DM|")
    assert line.endswith("|ana|bob|for your eyes only")
    eve.send(b"PING|sync\n")
    assert eve.expect("PONG") == "PONG|sync"
    assert not any("eyes" in seen for seen in eve.seen)


def test_action_messages(user):
    ana, bob = user("ana"), user("bob", hello=True)
    ana.send(b"ME|waves\n")
    assert ana.expect("MSG_OK") == "MSG_OK"
    assert bob.expect("ME|").endswith("|ana|waves")


def test_newline_and_pipes_survive_and_controls_do_not(user):
    ana, bob = user("ana"), user("bob", hello=True)
    ana.send(b"MSG|line one\\nline | two \x1b[2J\x07 \xe2\x80\xaeevil\n")
    event = chatctl.parse_event(bob.expect("MSG|"))
    assert event.message.text == "line one\nline | two \ufffd[2J\ufffd evil"


def test_ping_pong_and_quit_with_reason(user):
    ana, bob = user("ana"), user("bob", hello=True)
    ana.send(b"PING\n")
    assert ana.expect("PONG") == "PONG"
    ana.send(b"QUIT|lunch\n")
    assert "BYE|goodbye" in ana.wait_closed()
    assert bob.expect("LEAVE|").endswith("|ana|quit: lunch")


# --- every error code ----------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "code"), [
    (b"MSG|hi\n", "not-registered"),
    (b"DM|bob|hi\n", "not-registered"),
    (b"USER|two words\n", "invalid-name"),
    (b"USER|\n", "invalid-name"),
    (b"USER\n", "missing-argument"),
    (b"USER|x\nUSER|y\n", "already-registered"),
    (b"FROB|x\n", "unknown-command"),
    (b"USER|x\nDM|nobody|hi\n", "unknown-user"),
    (b"USER|x\nDM|nobody\n", "missing-argument"),
    (b"USER|x\nMSG|   \n", "empty-message"),
    (b"MSG|\xff\xfe\n", "bad-encoding"),
])
def test_error_codes(connect, frames, code):
    client = connect()
    client.send(frames)
    line = client.expect("ERR|")
    assert line.startswith(f"ERR|{code}|")
    assert len(line.split("|")) >= 3
    client.send(b"PING\n")  # the connection goes on
    assert client.expect("PONG") == "PONG"


def test_names_are_unique_regardless_of_case(user, connect):
    user("Ana")
    other = connect()
    other.send(b"USER|aNA\n")
    assert other.line().startswith("ERR|name-taken|")
    other.send(b"USER|ana2\n")
    assert other.line() == "USER_OK"


def test_name_is_free_again_after_its_owner_leaves(user, connect, server):
    ana = user("ana")
    ana.send(b"QUIT\n")
    ana.wait_closed()
    again = connect()
    wait_until(lambda: not server.users())
    again.send(b"USER|ana\n")
    assert again.line() == "USER_OK"


def test_over_long_frame_gets_err_and_the_connection_goes_on(make_server):
    server = make_server(max_frame=1024)
    client = RawClient(server.port)
    client.send(b"USER|ana\n")
    assert client.line() == "USER_OK"
    client.send(b"MSG|" + b"x" * 200_000)  # no line end: the server must not buffer it
    assert client.line().startswith("ERR|frame-too-long|")
    client.send(b"x" * 200_000 + b"\nMSG|after\n")
    assert client.expect("MSG_OK") == "MSG_OK"
    client.close()


def test_garbage_closes_after_too_many_errors_and_others_are_untouched(make_server):
    server = make_server(max_errors=5)
    ana, bob = RawClient(server.port), RawClient(server.port)
    ana.send(b"USER|ana\n")
    assert ana.line() == "USER_OK"
    bob.send(b"HELLO|chatctl/1\nUSER|bob\n")
    assert bob.expect("USER_OK") == "USER_OK"
    junk = RawClient(server.port)
    junk.send(bytes(range(256)) * 4 + b"\n" + b"\x00\x01\n" * 10)
    lines = junk.wait_closed()
    assert lines[-1] == "BYE|too many errors"
    assert all(line.startswith(("ERR|", "BYE|")) for line in lines)
    ana.send(b"MSG|still here\n")
    assert bob.expect("MSG|").endswith("|ana|still here")
    for c in (ana, bob, junk):
        c.close()


def test_abrupt_disconnect_is_a_leave(user, server):
    ana, bob = user("ana", hello=True), user("bob")
    bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    bob.close()  # RST
    assert ana.expect("LEAVE|").split("|")[2] == "bob"
    ana.send(b"MSG|anyone?\n")
    assert ana.expect("MSG_OK").startswith("MSG_OK|")
    assert [u.name for u in server.users()] == ["ana"]


def test_idle_and_registration_timeouts(make_server):
    server = make_server(idle_timeout=1.5, register_timeout=1.0)
    lurker = RawClient(server.port)
    assert lurker.wait_closed(timeout=5) == ["ERR|register-timeout|no USER in time",
                                              "BYE|register timeout"]
    idle = RawClient(server.port)
    idle.send(b"USER|sleepy\n")
    assert idle.line() == "USER_OK"
    assert idle.wait_closed(timeout=5)[-1] == "BYE|idle timeout"
    for c in (lurker, idle):
        c.close()


# --- many clients, slow clients --------------------------------------------------------------


def test_fifty_clients_get_every_message_exactly_once_in_order(server):
    n, per_sender = 50, 20
    clients = register_many(server.port, [f"u{i}" for i in range(n)], hello=True)
    wait_until(lambda: len(server.users()) == n)

    def blast(i):
        c = clients[i]
        for k in range(per_sender):
            c.send(f"MSG|{i}:{k}\n".encode())

    threads = [threading.Thread(target=blast, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a sender is still sending"

    expected_each = (n - 1) * per_sender
    for i, c in enumerate(clients):
        got: dict[int, list[int]] = {}
        received = acks = 0
        deadline = time.monotonic() + 30
        while (received < expected_each or acks < per_sender) and time.monotonic() < deadline:
            line = c.line(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("MSG_OK|"):
                acks += 1
            elif line.startswith("MSG|"):
                sender, seq = line.split("|", 5)[5].split(":")
                got.setdefault(int(sender), []).append(int(seq))
                received += 1
        assert acks == per_sender
        assert sorted(got) == [j for j in range(n) if j != i]
        assert all(seqs == list(range(per_sender)) for seqs in got.values()), f"client {i}"
        assert c.silent(0.05)  # and nothing twice
    for c in clients:
        c.close()


def test_a_client_that_never_reads_is_dropped_and_others_get_everything(make_server, caplog):
    server = make_server(sendq=64 * 1024, rate=0)
    stalled = RawClient(server.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.send(b"USER|stalled\n")
    assert stalled.line() == "USER_OK"
    sender, reader = RawClient(server.port, timeout=20), RawClient(server.port, timeout=20)
    for c, name in ((sender, "sender"), (reader, "reader")):
        c.send(f"HELLO|chatctl/1\nUSER|{name}\n".encode())
        assert c.expect("USER_OK") == "USER_OK"
    payload = "x" * 4000
    count = 2500  # 10 MB: far past the stalled client's queue and socket buffers
    received = 0

    def read_all():
        nonlocal received
        while received < count:
            if reader.expect("MSG|").endswith(payload):
                received += 1

    t = threading.Thread(target=read_all)
    t.start()
    for k in range(count):
        wait_until(lambda k=k: received >= k - 8, timeout=20, interval=0.001)  # stay a few ahead
        sender.send(f"MSG|{payload}\n".encode())
    t.join(30)
    assert not t.is_alive() and received == count
    leave = [line for line in reader.seen if line.startswith("LEAVE|")] or [reader.expect("LEAVE|")]
    assert leave[0].split("|")[2:] == ["stalled", "sendq exceeded"]
    assert "stalled" not in [u.name for u in server.users()]
    assert any("sendq exceeded" in r.getMessage() for r in caplog.records)
    for c in (stalled, sender, reader):
        c.close()


# --- life cycle ---------------------------------------------------------------------------------


def test_shutdown_tells_clients_and_ends_every_thread():
    server = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=0)).start()
    clients = [RawClient(server.port) for _ in range(5)]
    for i, c in enumerate(clients):
        c.send(f"USER|c{i}\n".encode())
        assert c.line() == "USER_OK"
    half = RawClient(server.port)
    half.send(b"USER|half")  # mid-frame, unframed
    wait_until(lambda: len(chatctl_threads()) >= 3 + 6)
    server.shutdown()
    for c in clients:
        assert c.wait_closed()[-1] == "BYE|server shutting down"
    wait_until(lambda: not chatctl_threads(), timeout=5)
    with pytest.raises(OSError):
        RawClient(server.port, timeout=1)
    server.shutdown()  # idempotent


def test_port_in_use_is_a_clear_error(server):
    with pytest.raises(chatctl.ServerError, match=r"cannot listen on 127\.0\.0\.1"):
        chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=server.port))


def test_a_server_that_never_started_shuts_down_cleanly(tmp_path):
    server = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=0, db=str(tmp_path / "h.db")))
    port = server.port
    server.shutdown()
    with pytest.raises(OSError):
        RawClient(port, timeout=1)
    again = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=0, db=str(tmp_path / "h.db")))
    again.shutdown()  # the history lock was released


# --- issue 10: what the attack run and a newcomer found -------------------------------------------------


def test_seed_clients_get_the_seed_servers_delivery_form_and_no_presence_lines(user):
    ana, seed = user("ana"), user("seed")
    user("bob", hello=True).send(b"QUIT\n")  # someone comes and goes: a seed client hears nothing of it
    ana.send(b"MSG|two\\nlines\nME|waves\nDM|seed|psst\n")
    assert [seed.line() for _ in range(4)] == ["ana: two", "ana: lines", "* ana waves", "[DM] ana: psst"]
    assert seed.silent(0.3)


def test_line_separators_are_line_breaks(user):
    ana, bob = user("ana"), user("bob", hello=True)
    ana.send("MSG|forged\u2028<admin> line\u2029end\n".encode())
    assert chatctl.parse_event(bob.expect("MSG|")).message.text == "forged\n<admin> line\nend"
    ana.send("QUIT|bye\u2028LEAVE|x\n".encode())
    assert bob.expect("LEAVE|").endswith("|ana|quit: bye LEAVE|x")  # one line, in the log too


@pytest.mark.parametrize("frames", [b"USER|x\nMSG|hi\n", b"USER|x\nMSG|hi"])
def test_a_client_that_half_closes_gets_every_reply(server, frames):
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(frames)
        sock.shutdown(socket.SHUT_WR)  # what `nc -N` and many scripts do after their last frame
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        sock.close()
        assert received == b"USER_OK\nMSG_OK\n"


def test_one_burst_of_big_messages_drops_no_reader(make_server):
    server = make_server()  # the default 1 MiB SendQ, history on
    writer = register_many(server.port, ["writer"])[0]
    readers = register_many(server.port, ["r1", "r2"], hello=True, timeout=30)
    burst = b"".join(b"MSG|" + b"\x01" * 8000 + b"\n" for _ in range(98))  # each byte shows as 3 (U+FFFD)
    writer.send(burst)
    replies = [writer.line(30) for _ in range(98)]
    accepted = replies.count("MSG_OK")
    assert accepted >= 5  # the rest is over the address's byte budget: refused, not sent on
    assert all(r == "MSG_OK" or r.startswith("ERR|rate-limited|") for r in replies)
    for reader in readers:
        for _ in range(accepted):
            reader.expect("MSG|", timeout=30)
    assert {"r1", "r2"} <= {u.name for u in server.users()}
    # and a reader's own catch-up comes in pages that fit its SendQ
    conn = chatctl.ChatConnection("127.0.0.1", server.port)
    conn.hello()
    missed, more = conn.missed_since(0)
    assert len(missed) == accepted and not more
    conn.close()


def test_history_replies_are_paged_in_bytes(make_server):
    server = make_server(sendq=256 * 1024, rate=0)
    writer = register_many(server.port, ["writer"])[0]
    writer.send(b"".join(b"MSG|" + b"y" * 7000 + b"\n" for _ in range(60)))
    for _ in range(60):
        writer.expect("MSG_OK")
    asker = register_many(server.port, ["asker"], hello=True)[0]
    asker.send(b"HISTORY|LAST|500\n")
    end = asker.expect("END|HISTORY|")
    count = int(end.split("|")[2])
    assert end.endswith("|more") and 0 < count < 60
    assert count * 7000 <= 256 * 1024 // 4
    assert "asker" in [u.name for u in server.users()]


def test_mass_join_sends_presence_in_batches(make_server, monkeypatch):
    server = make_server(max_per_address=0, rate=0)
    sends = 0
    real = chatctl.Writer._send

    def counting(sock, data):
        nonlocal sends
        sends += 1
        return real(sock, data)

    monkeypatch.setattr(chatctl.Writer, "_send", staticmethod(counting))
    n = 300
    clients = register_many(server.port, [f"m{i}" for i in range(n)], hello=True, timeout=30)
    wait_until(lambda: len(server.users()) == n)
    clients[0].send(b"PING|sync\n")
    clients[0].expect("PONG|sync", timeout=30)
    # one JOIN to every member at a time would be n * n / 2 = 45,000 writes
    assert sends < n * n / 10, sends
    for c in clients:
        c.close()
    wait_until(lambda: not server.users(), timeout=30)
    newcomer = register_many(server.port, ["late"], hello=True)[0]
    newcomer.send(b"MSG|anyone?\n")
    assert newcomer.expect("MSG_OK|", timeout=2).startswith("MSG_OK|")


def test_readers_are_kept_for_the_next_connection(server):
    for i in range(30):  # one after another: each new client gets the reader the last one left
        client = RawClient(server.port)
        client.send(f"USER|c{i}\nQUIT\n".encode())
        assert client.wait_closed()[-1] == "BYE|goodbye"
        client.close()
        wait_until(lambda: not server.registry.sessions())
    readers = [t for t in chatctl_threads() if t.name.startswith("chatctl-reader-")]
    assert 1 <= len(readers) <= 3


def test_the_port_accepts_only_once_the_server_is_ready(make_server, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    chatctl.generate_certificate(cert, key)
    config = chatctl.ServerConfig(host="127.0.0.1", port=0, db=str(tmp_path / "h.db"),
                                  accounts_db=str(tmp_path / "a.db"), tls=True, tls_cert=str(cert),
                                  tls_key=str(key))
    server = chatctl.ChatServer(config)  # bound, with history, accounts and certificate open
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)
        server.start()
        client = RawClient(server.port)
        client.send(b"USER|ana\n")
        assert client.line() == "USER_OK"
        client.close()
    finally:
        server.shutdown()


def test_one_bye_and_one_leave_when_three_threads_end_a_session_at_once(server, user, monkeypatch):
    watcher, victim = user("watcher", hello=True), user("victim")
    session = next(s for s in server.registry.sessions() if s.name == "victim")
    meet = threading.Barrier(3, timeout=5)
    racing = threading.local()  # only the three racers wait; the server's own threads pass straight on
    real_end = session.end
    taken = []

    def end(reason):  # leave() asks end() first: the three racers meet there and ask at the same moment
        if not getattr(racing, "on", False):
            return real_end(reason)
        racing.on = False
        meet.wait()
        taken.append(real_end(reason))
        return taken[-1]

    def disconnect(reason):
        racing.on = True
        session.disconnect(reason)

    monkeypatch.setattr(session, "end", end)  # this session's alone
    threads = [threading.Thread(target=disconnect, args=(r,)) for r in ("reader", "reaper", "shutdown")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(taken) == [False, False, True]  # all three asked; one of them ended the session
    assert sum(line.startswith("BYE|") for line in victim.wait_closed()) == 1
    watcher.expect("LEAVE|")
    watcher.send(b"PING|after\n")
    watcher.expect("PONG|after")
    assert sum(line.startswith("LEAVE|") for line in watcher.seen) == 1


def test_once_a_client_has_its_bye_nobody_lists_it(make_server):
    server = make_server(rate=0)
    ana = register_many(server.port, ["ana"])[0]
    for n in range(200):  # the race was lost in about 2 of 30 tries on a quiet server
        bob = RawClient(server.port)
        bob.send(f"USER|bob{n}\n".encode())
        assert bob.line() == "USER_OK"
        bob.send(b"QUIT\n")
        assert bob.wait_closed()[-1] == "BYE|goodbye"
        ana.send(b"DIR\n")
        assert ana.expect("Users logged in:") == "Users logged in: ana"


def test_the_last_words_before_quit_come_before_the_leave(server, user):
    reader = user("reader", hello=True)
    for i in range(5):  # it was every time; five are enough to see it
        quitter = user(f"q{i}", hello=True)
        quitter.send(f"MSG|last words {i}\nQUIT|bye\n".encode())  # one write
        leave = reader.expect("LEAVE|")
        assert leave.split("|")[2] == f"q{i}"
        assert any(line.endswith(f"|q{i}|last words {i}") for line in reader.seen), reader.seen[-5:]
        quitter.close()
