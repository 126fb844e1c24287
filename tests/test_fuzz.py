"""Hostile input in every protocol: huge, negative, non-ASCII and empty arguments to every verb.

Whatever one connection sends, the server answers it (or drops it) with one line, keeps serving
everyone else, and gives the connection's slot back when it ends.
"""

from __future__ import annotations

import itertools
import socket

import pytest

import chatctl
from conftest import RawClient, wait_until

HUGE = "9" * 5000                      # int() refuses more than 4,300 digits with a ValueError
ARGUMENTS = ["", HUGE, "-1", "-" + HUGE, "٣", "1_0", "+2", " 2", "1e999", "nan", "0" * 5000 + "1",
             "\u202e\u0000", "#" + "x" * 9000, "|||", "#main|" + HUGE, "#main|LAST|" + HUGE,
             "LAST|" + HUGE, "BEFORE|" + HUGE + "|5", "AFTER|1|" + HUGE, "#main|AFTER|-1|1"]

OUR_VERBS = sorted(chatctl.COMMAND_HANDLERS)
IRC_VERBS = sorted(chatctl.IRC_COMMANDS)


def slots_free(server: chatctl.ChatServer) -> bool:
    """No connection is counted any more: every ended one gave its slot back."""
    return not server.registry._per_address


def innocent_gets_in(port: int) -> None:
    client = RawClient(port)
    client.send(b"USER|innocent\n")
    assert client.line() == "USER_OK"
    client.send(b"QUIT\n")
    client.wait_closed()


@pytest.mark.parametrize("verb", ["HISTORY|LAST|", "SEARCH|x|", "MARK|#main|", "HISTORY|#main|BEFORE|"])
def test_a_number_of_thousands_of_digits_is_refused_in_one_line_and_leaks_no_slot(make_server, verb):
    server = make_server(max_per_address=2)
    for _ in range(3):  # more than the address's slots: a leaked slot would lock the address out
        attacker = RawClient(server.port)
        attacker.send(b"HELLO|chatctl/1\n" + verb.encode() + HUGE.encode() + b"\n")
        reply = attacker.expect("ERR|")
        assert reply.startswith(("ERR|bad-argument|", "ERR|not-registered|")), reply[:200]
        assert len(reply) < 300
        attacker.close()
        wait_until(lambda: slots_free(server))  # (its slot back before the next one comes)
    innocent_gets_in(server.port)


def test_irc_numbers_of_thousands_of_digits_are_refused_and_leak_no_slot(make_server):
    server = make_server(max_per_address=2)
    for line in (f"CHATHISTORY LATEST #main * {HUGE}", f"CHATHISTORY BEFORE #main msgid={HUGE} 10",
                 f"CHATHISTORY AFTER #main msgid={HUGE[:3000]}.{HUGE[:3000]} 10"):
        irc = RawClient(server.port)
        irc.send(f"NICK zed\r\nUSER zed 0 * :Zed\r\n{line}\r\nPING :done\r\n".encode())
        irc.expect(":chatctl PONG")  # the line after it was still handled: the session lives on
        assert any("FAIL CHATHISTORY" in seen for seen in irc.seen), irc.seen
        irc.close()
        wait_until(lambda: slots_free(server))  # (its slot back before the next one comes)
    innocent_gets_in(server.port)


def test_a_fault_inside_a_turn_ends_that_connection_cleanly(make_server, monkeypatch, caplog):
    """Whatever goes wrong in one reader turn (here a handler that raises), the connection gets a BYE,
    the server logs one line, the slot comes back and everyone else goes on."""
    server = make_server(max_per_address=1)
    witness = RawClient(server.port, timeout=5)  # from the same address as the faulty one: one slot each
    monkeypatch.setitem(chatctl.COMMAND_HANDLERS, "PING", lambda session, arg: 1 / 0)
    server.config.max_per_address = 2
    faulty = RawClient(server.port)
    faulty.send(b"USER|faulty\nPING\n")
    assert faulty.line() == "USER_OK"
    lines = faulty.wait_closed()
    assert lines and lines[-1] == "BYE|internal error", lines
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "internal error" in r.getMessage()]
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0].getMessage()
    wait_until(lambda: server.registry._per_address.get("127.0.0.1") == 1)
    witness.send(b"USER|witness\nDIR\n")
    assert witness.line() == "USER_OK"
    assert witness.line() == "Users logged in: witness"


def fuzz_frames() -> list[bytes]:
    frames = []
    for verb, arg in itertools.product(OUR_VERBS, ARGUMENTS):
        frames.append(f"{verb}|{arg}".encode())
    return frames


def test_every_verb_of_ours_with_hostile_arguments(make_server):
    # (no password throttle: REGISTER, UNREGISTER and LOGOUT check passwords, and hostile ones are wrong)
    server = make_server(rate=0, max_errors=1000, auth_max_failures=0, auth_delay=0)
    watcher = RawClient(server.port)
    watcher.send(b"HELLO|chatctl/1\nUSER|watcher\n")
    watcher.expect("USER_OK")
    for registered in (False, True):
        client = RawClient(server.port, timeout=10)
        client.send(b"HELLO|chatctl/1\n" + (b"USER|fuzzer\n" if registered else b""))
        for frame in fuzz_frames():
            if frame.startswith((b"QUIT", b"USER", b"HELLO", b"PASS")):
                continue  # they end or restart the session; sent alone below
            client.send(frame + b"\nPING|mark\n")
            reply = client.expect("PONG|mark", timeout=10)  # answered, and the session went on
            assert reply == "PONG|mark"
        assert not [line for line in client.seen if len(line) > 9000]
        client.close()
    for verb in ("QUIT", "USER", "HELLO", "PASS"):
        for arg in ARGUMENTS:
            client = RawClient(server.port)
            try:
                client.send(f"{verb}|{arg}\nPING|mark\nQUIT\n".encode())
                client.wait_closed(timeout=10)
            except (BrokenPipeError, ConnectionResetError):
                pass
            client.close()
    wait_until(lambda: list(server.registry._per_address.values()) == [1], timeout=10)  # the watcher's
    watcher.send(b"DIR\n")
    watcher.expect("USERS|")


def test_every_irc_verb_with_hostile_arguments(make_server):
    server = make_server(rate=0, max_errors=1000)
    irc = RawClient(server.port, timeout=10)
    irc.send(b"CAP LS 302\r\nNICK fuzz\r\nUSER fuzz 0 * :Fuzz\r\nCAP END\r\n")
    irc.expect(":chatctl 001 fuzz")
    for n, (verb, arg) in enumerate(itertools.product(IRC_VERBS, ARGUMENTS)):
        if verb == "QUIT":
            continue
        words = arg.replace("|", " ")
        irc.send(f"{verb} {words}\r\n{verb} {words} :{arg}\r\nPING :m{n}\r\n".encode())
        irc.expect(f":chatctl PONG chatctl :m{n}", timeout=10)
    irc.close()
    wait_until(lambda: slots_free(server))
    innocent_gets_in(server.port)


def test_a_flood_of_bad_first_lines_from_many_connections_leaks_nothing(make_server):
    server = make_server(max_per_address=8)
    for _ in range(3):
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(8)]
        for n, sock in enumerate(socks):
            sock.sendall(f"HISTORY|LAST|{HUGE}\nSEARCH|{n}|{HUGE}\r\n"
                         f"CHATHISTORY LATEST x * {HUGE}\n".encode())
        for sock in socks:
            assert sock.recv(100).startswith(b"ERR|")  # (counted by the server: it answered)
            sock.close()
        wait_until(lambda: slots_free(server))
    innocent_gets_in(server.port)
