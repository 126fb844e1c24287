"""Several servers sharing one chat through a real redis-server (serve --bus)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest

import chatctl
from conftest import (
    CHATCTL,
    Forwarder,
    RawClient,
    free_port,
    redis_binary,
    run_cli,
    wait_until,
    wait_until_same,
)


@pytest.fixture
def node(redis_server, make_server, tmp_path):  # in this order: the servers stop before their Redis
    """Servers on one bus: ``node("a")`` starts one named a."""

    def factory(server_id: str, **overrides) -> chatctl.ChatServer:
        overrides.setdefault("accounts_db", str(tmp_path / f"accounts-{server_id}.db"))  # as on its own host
        return make_server(bus=redis_server.url, server_id=server_id, **overrides)

    return factory


def member(port: int, name: str, password: str | None = None, options: str = "") -> RawClient:
    """An extended client (HELLO, with ``options``) registered as ``name``."""
    client = RawClient(port, timeout=10)
    client.send(f"HELLO|chatctl/1{options}\n".encode()
                + f"USER|{name}{'|' + password if password else ''}\n".encode())
    client.expect("USER_OK")
    return client


def messages(client: RawClient, count: int, timeout: float = 10) -> list[list[str]]:
    """The next ``count`` MSG/DM lines, split into fields."""
    return [client.expect(("MSG|", "DM|", "ME|"), timeout).split("|") for _ in range(count)]


def names_on(port: int) -> list[str]:
    client = RawClient(port)
    client.send(b"HELLO|chatctl/1|quiet\nDIR\n")
    line = client.expect("USERS")
    client.close()
    return sorted(entry.split(" ")[0] for entry in line.split("|")[1:] if entry)


def test_a_message_from_a_reaches_b_and_c_in_one_order(node):
    a, b, c = node("a"), node("b"), node("c")
    ana, bob, cat = member(a.port, "ana"), member(b.port, "bob"), member(c.port, "cat")
    for i in range(30):  # two senders on two servers at once: every server must show one order
        ana.send(f"MSG|from a {i}\n".encode())
        bob.send(f"MSG|from b {i}\n".encode())
    seen = {}
    for name, client in (("ana", ana), ("bob", bob), ("cat", cat)):
        got = []
        while len(got) < 60:
            line = client.expect(("MSG|", "MSG_OK|"))
            if line.startswith("MSG_OK|"):
                got.append(int(line.split("|")[1]))  # one's own message, by its id
            else:
                got.append(int(line.split("|")[2]))
        seen[name] = got
    assert seen["ana"] == seen["bob"] == seen["cat"]
    assert seen["cat"] == sorted(seen["cat"]) and len(set(seen["cat"])) == 60  # ids unique, increasing
    with_ids = {int(f[2]): f[5] for f in (line.split("|") for line in cat.seen if line.startswith("MSG|"))}
    assert [with_ids[i] for i in seen["cat"] if with_ids[i].startswith("from a")] == \
        [f"from a {i}" for i in range(30)]  # each sender's messages in the order sent


def test_replies_reactions_edits_and_deletions_reach_and_change_every_servers_history(node, caplog):
    a, b = node("a"), node("b")
    ana, bob = member(a.port, "ana", options="|actions"), member(b.port, "bob", options="|actions")
    ana.send(b"MSG|the key is hunter2\n")
    first = int(ana.expect("MSG_OK|").split("|")[1])
    bob.expect("MSG|#main|")
    bob.send(f"REPLY|{first}|careful\nREACT|{first}|👀\n".encode())
    assert chatctl.parse_event(ana.expect("MSGX|")).message.ref == first
    assert ana.expect("REACT|").split("|")[4:] == ["bob", str(first), "👀", "1"]
    bob.send(f"REACT|{first}|👀\n".encode())  # the toggle is decided alike on both servers
    assert ana.expect("REACT|").split("|")[4:] == ["bob", str(first), "👀", "0"]
    ana.send(f"DELETE|{first}\n".encode())
    assert bob.expect("DELETE|").endswith(f"|ana|{first}")
    for history in (a.history, b.history):  # each server's own history took every action
        wait_until(lambda h=history: (found := h.find(first)) is not None and found.deleted)
        assert history.find(first).text == "" and history.find(first).reactions == ()
        assert history.search(None, "hunter2", 10)[0] == []
    log = a.bus.keys[1]  # and the shared log in Redis: the message and its reactions (which quote it) are out
    wait_until(lambda: not any(b"hunter2" in b"".join(f.values()) for _, f in a.bus.redis.xrange(log)))
    late = node("c")  # a server reading the log from its start takes the hole for no gap, and has it deleted
    wait_until(lambda: (found := late.history.find(first)) is None or found.deleted)
    assert "a gap" not in caplog.text


def test_a_private_room_is_private_on_every_server_and_a_ban_on_one_reaches_the_others(node):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    for name in ("ana", "bob"):
        protect = member(a.port, name)
        protect.send(f"REGISTER|password-{name}\n".encode())
        protect.expect("REGISTER_OK|")
        protect.close()
    wait_until(lambda: names_on(b.port) == [])
    ana = member(a.port, "ana", "password-ana")
    bob, eve = member(b.port, "bob", "password-bob"), member(b.port, "eve")
    ana.send(b"JOIN|#hiring|+i\nMSG|#hiring|offer for carl\n")
    ana.expect("MSG_OK|")
    eve.send(b"ROOMS\nNAMES|#hiring\nHISTORY|#hiring|LAST|5\nJOIN|#hiring\n")
    assert eve.expect("END|ROOMS") == "END|ROOMS|1"  # #main alone
    assert eve.expect("ERR|") == "ERR|unknown-room|there is no room #hiring"
    assert eve.expect("ERR|") == "ERR|unknown-room|there is no room #hiring"
    assert eve.expect("ERR|").startswith("ERR|invite-only|")
    ana.send(b"INVITE|#hiring|bob\n")  # on server a: bob, on server b, may join now
    bob.expect("MODERATED|")
    wait_until(lambda: bob.send(b"JOIN|#hiring\n") or bob.expect(("JOIN_OK|", "ERR|")).startswith("JOIN_OK"),
               interval=0.2)
    bob.send(b"HISTORY|#hiring|LAST|5\n")
    assert bob.expect("MSG|#hiring|").endswith("|ana|offer for carl")
    ana.send(b"MODE|#hiring|+b|bob|1h|left the company\n")  # a ban on a puts bob out on b
    bob.expect("PART_OK|#hiring")
    bob.send(b"JOIN|#hiring\n")
    assert bob.expect("ERR|").startswith("ERR|banned|banned from #hiring until ")
    ana.send(b"JOIN|#open\n")  # a public room with someone on the other server becomes private
    ana.expect("JOIN_OK|#open")
    wait_until(lambda: "open" in b.registry.rooms)
    eve.send(b"JOIN|#open\n")
    eve.expect("JOIN_OK|#open")
    wait_until(lambda: len(a.registry.rooms["open"].members) == 2)
    ana.send(b"MODE|#open|+i\n")
    assert ana.expect("ERR|").startswith("ERR|not-allowed|#open has members without a protected name")
    eve.send(b"PART|#open\n")
    eve.expect("PART_OK|#open")
    wait_until(lambda: ana.send(b"MODE|#open|+i\n")
               or ana.expect(("MODERATED|", "ERR|")).startswith("MODERATED"), interval=0.2)


def test_direct_messages_both_ways_across_servers(node):
    a, b = node("a"), node("b")
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    wait_until(lambda: names_on(a.port) == ["ana", "bob"])
    ana.send(b"DM|bob|psst from a\n")
    ana.expect("MSG_OK|")
    assert bob.expect("DM|").split("|")[3:] == ["ana", "bob", "psst from a"]
    bob.send(b"DM|Ana|and back\n")  # any spelling of the name that passes for it
    bob.expect("MSG_OK|")
    assert ana.expect("DM|").split("|")[3:] == ["bob", "ana", "and back"]
    bob.send(b"DM|nobody|hello?\n")
    assert bob.expect("ERR|").startswith("ERR|unknown-user|")


def test_a_name_is_one_session_across_servers(node):
    a, b = node("a"), node("b")
    cop = member(a.port, "cop")
    for attempt in ("cop", "COP", "сор"):  # the last is all Cyrillic
        other = RawClient(b.port)
        other.send(f"USER|{attempt}\n".encode())
        assert other.expect("ERR|").startswith("ERR|name-taken|"), attempt
        other.close()
    cop.send(b"QUIT\n")
    cop.wait_closed()
    wait_until(lambda: names_on(b.port) == [])
    cop_on_b = member(b.port, "cop")  # free again once its holder left; held, since a dropped client leaves
    wait_until(lambda: names_on(a.port) == ["cop"])  # a hears of it through the bus
    assert names_on(b.port) == names_on(a.port) == ["cop"]
    cop_on_b.close()


def test_everyone_online_is_listed_on_every_server(node, isolated_home):
    a, b = node("a"), node("b")
    clients = [member(a.port, "ana"), member(b.port, "bob")]  # held: a client that is collected leaves
    seed = RawClient(b.port)
    seed.send(b"USER|sam\n")
    seed.expect("USER_OK")
    wait_until(lambda: names_on(a.port) == ["ana", "bob", "sam"])
    seed.send(b"DIR\n")
    assert seed.expect("Users logged in: ") == "Users logged in: ana, bob, sam"
    who = run_cli("who", "--json", "-p", str(a.port), env=isolated_home)
    assert who.returncode == 0, who.stderr
    assert sorted(u["name"] for u in json.loads(who.stdout)) == ["ana", "bob", "sam"]

    listing = run_cli("cluster", "--json", "-p", str(b.port), env=isolated_home)
    assert listing.returncode == 0, listing.stderr
    servers = {s["server"]: s for s in json.loads(listing.stdout)}
    assert set(servers) == {"a", "b"} and servers["b"]["answered"] and servers["b"]["users"] == 2
    assert servers["a"]["heartbeat_age"] < 10 and servers["a"]["lag"] == 0
    assert len(clients) == 2


def test_rooms_topics_and_members_are_shared(node, isolated_home):
    a, b = node("a"), node("b")
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    ana.send(b"JOIN|#deploys\n")
    ana.expect("JOIN_OK|#deploys")
    ana.send(b"TOPIC|#deploys|release at five\n")
    ana.expect("TOPIC|#deploys|")
    wait_until(lambda: "deploys" in b.registry.rooms and b.registry.rooms["deploys"].topic)
    bob.send(b"JOIN|#deploys\n")
    assert bob.expect("TOPIC|#deploys|").endswith("|ana|release at five")
    assert bob.expect("NAMES|#deploys|").count("|") == 3  # ana (on a) and bob
    assert ana.expect("ENTER|#deploys|").endswith("|bob")
    bob.send(b"MSG|#deploys|shipping\n")
    assert ana.expect("MSG|#deploys|").endswith("|bob|shipping")
    rooms = run_cli("rooms", "--json", "-p", str(a.port), env=isolated_home)
    deploys = next(r for r in json.loads(rooms.stdout) if r["room"] == "#deploys")
    assert deploys["online"] == 2 and deploys["messages"] == 1 and deploys["topic"] == "release at five"


def test_protected_names_and_devices_across_servers(node):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    ana = member(a.port, "ana")
    ana.send(b"REGISTER|correct horse\n")
    ana.expect("REGISTER_OK|ana")
    thief = RawClient(b.port)
    thief.send(b"USER|ana\n")
    assert thief.expect("ERR|").startswith("ERR|name-protected|")
    thief.send(b"USER|ana|wrong password\n")
    assert thief.expect("ERR|").startswith("ERR|bad-password|")
    owner = member(b.port, "ana", "correct horse")  # one more device of hers, on the other server
    assert ana.silent(0.3), ana.buffer  # nobody was taken over
    wait_until(lambda: names_on(a.port) == ["ana"] and names_on(b.port) == ["ana"])
    owner.send(b"MSG|it is me\n")
    owner.expect("MSG_OK|")
    assert ana.expect("MSG|").endswith("|ana|it is me")  # her own line, on her other device


def test_an_account_on_two_servers_is_one_member_with_its_rooms_dms_and_read_state(node):
    a, b = node("a", auth_delay=0, max_devices=3), node("b", auth_delay=0, max_devices=3)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    bob = member(a.port, "bob")
    laptop = member(a.port, "ana", "anapass123")
    assert bob.expect("JOIN|").endswith("|ana")
    heard = len(bob.seen)
    phone = member(b.port, "ana", "anapass123")  # the same account, through the other server
    wait_until(lambda: len(a.registry.devices("ana")) == 2 and len(b.registry.devices("ana")) == 2)
    laptop.send(b"JOIN|#ops\n")
    laptop.expect("JOIN_OK|#ops")
    assert phone.expect("JOIN_OK|#ops")  # told on b, unasked
    phone.send(b"MSG|#ops|from the phone\n")
    assert laptop.expect("MSG|#ops|").endswith("|ana|from the phone")
    bob.send(b"DM|ana|to both servers\n")
    assert laptop.expect("DM|").endswith("|bob|ana|to both servers")
    assert phone.expect("DM|").endswith("|bob|ana|to both servers")
    phone.send(b"DM|bob|from b\n")
    assert laptop.expect("DM|").endswith("|ana|bob|from b")  # her own DM, on her device on a
    mid = int(bob.expect("DM|").split("|")[1])
    laptop.send(f"MARK|@bob|{mid}\n".encode())
    assert phone.expect("MARK_OK|") == f"MARK_OK|@bob|{mid}"  # read on a: read on b
    tablet = member(b.port, "ana", "anapass123")
    fourth = RawClient(a.port)  # the cap counts the devices on every server
    fourth.send(b"USER|ana|anapass123\n")
    assert fourth.expect("ERR|").startswith("ERR|too-many-devices|")
    tablet.send(b"QUIT\n")
    tablet.wait_closed()
    phone.send(b"QUIT\n")
    phone.wait_closed()
    wait_until(lambda: len(a.registry.devices("ana")) == 1)
    bob.send(b"PING|x\n")
    bob.expect("PONG|x")
    assert not any(line.startswith(("JOIN|", "LEAVE|")) for line in bob.seen[heard:])  # devices: unheard
    laptop.send(b"QUIT\n")
    assert bob.expect("LEAVE|").split("|")[2] == "ana"  # the last device, anywhere: ana left
    wait_until(lambda: names_on(b.port) == ["bob"])


def test_logging_out_reaches_a_device_on_another_server(node):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    laptop = member(a.port, "ana", "anapass123")
    phone = member(b.port, "ana", "anapass123")
    wait_until(lambda: len(a.registry.devices("ana")) == 2)
    laptop.send(b"DEVICES\n")
    kinds = sorted(laptop.expect("DEVICE|").split("|")[2] for _ in range(2))
    assert kinds == ["chatctl", "elsewhere"]
    laptop.send(b"LOGOUT|others|anapass123\n")
    assert laptop.expect("LOGOUT_OK|") == "LOGOUT_OK|1"
    assert phone.wait_closed()[-1].startswith("BYE|logged out by ana's device")
    wait_until(lambda: len(a.registry.devices("ana")) == 1 and len(b.registry.devices("ana")) == 1)


def test_a_killed_server_s_users_leave_the_others_and_nothing_acknowledged_is_lost(
        node, redis_server, tmp_path, isolated_home):
    a = node("a")
    with server_process(redis_server, tmp_path, isolated_home) as (proc, port):
        ana = member(a.port, "ana")
        cat = member(port, "cat")
        assert ana.expect("JOIN|").endswith("|cat")
        acked = []
        for i in range(20):
            cat.send(f"MSG|last words {i}\n".encode())
            acked.append(int(cat.expect("MSG_OK|").split("|")[1]))
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        leave = ana.expect("LEAVE|", timeout=20)
        assert leave.split("|")[2] == "cat" and "stopped answering" in leave
        assert time.monotonic() - killed < 15
        member(a.port, "cat")  # the name is free again
        client = RawClient(a.port)
        client.send(b"HELLO|chatctl/1|quiet\nHISTORY|LAST|50\n")
        stored = {int(line.split("|")[2]) for line in _until_end(client) if line.startswith("MSG|")}
        assert set(acked) <= stored


def test_a_killed_server_takes_only_its_own_devices_of_an_account(node, redis_server, tmp_path,
                                                                  isolated_home):
    a = node("a", auth_delay=0)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    env = {**isolated_home, "CHATCTL_AUTH_DELAY": "0"}
    with server_process(redis_server, tmp_path, env) as (proc, port):
        bob = member(a.port, "bob")
        laptop = member(a.port, "ana", "anapass123")
        phone = member(port, "ana", "anapass123")  # noqa: F841 (online on c until c dies)
        wait_until(lambda: len(a.registry.devices("ana")) == 2)
        os.kill(proc.pid, signal.SIGKILL)
        wait_until(lambda: len(a.registry.devices("ana")) == 1, timeout=20)  # c's device, reaped
        laptop.send(b"MSG|still here\n")
        assert bob.expect("MSG|").endswith("|ana|still here")
        assert not any(line.startswith("LEAVE|") for line in bob.seen)  # ana never left
        assert names_on(a.port) == ["ana", "bob"]


@contextlib.contextmanager
def server_process(redis_server, tmp_path, env: dict[str, str]):
    """``chatctl serve`` as a process of its own (server id c) on the bus, to kill: (process, port)."""
    port = free_port()
    proc = subprocess.Popen([*CHATCTL, "serve", "--host", "127.0.0.1", "-p", str(port),
                             "--bus", redis_server.url, "--db", str(tmp_path / "c.db")],
                            env={**env, "CHATCTL_SERVER_ID": "c"}, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listening(port), timeout=15)
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


def _listening(port: int) -> bool:
    try:
        RawClient(port, timeout=0.5).close()
        return True
    except OSError:
        return False


def _until_end(client: RawClient) -> list[str]:
    lines = []
    while not (line := client.line()).startswith("END|"):
        lines.append(line)
    return lines


def test_redis_stopped_and_restarted_mid_traffic_loses_and_repeats_nothing(node, redis_server):
    a, b = node("a"), node("b")
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    acked, refused = [], []
    stop = threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            ana.send(f"MSG|n{i}\n".encode())
            reply = ana.expect(("MSG_OK|", "ERR|"))
            (acked if reply.startswith("MSG_OK|") else refused).append(f"n{i}")
            i += 1
            time.sleep(0.005)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_until(lambda: len(acked) >= 20)
        redis_server.stop()
        wait_until(lambda: len(refused) >= 5)  # told, not left waiting
        redis_server.start()
        count = len(acked)
        wait_until(lambda: len(acked) >= count + 20, timeout=20)  # back on its own
    finally:
        stop.set()
        sender.join(20)
    got = []
    while True:  # everything bob got, until it has been quiet a while
        try:
            line = bob.expect("MSG|", timeout=2)
        except AssertionError:
            break
        got.append(line.split("|")[5])
    assert refused and all(r not in got for r in refused[1:-1])  # nothing refused was sent (the edges may be)
    assert sorted(set(acked) - set(got)) == []  # every acknowledged message arrived
    assert len(got) == len(set(got))  # and none twice


def test_redis_restarted_empty_ids_keep_increasing(node, redis_server):
    a, b = node("a"), node("b")
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    ana.send(b"MSG|before\n")
    first = int(ana.expect("MSG_OK|").split("|")[1])
    assert bob.expect("MSG|").endswith("|ana|before")
    redis_server.stop()
    redis_server.start(empty=True)

    def sent() -> int | None:
        ana.send(b"MSG|after\n")
        reply = ana.expect(("MSG_OK|", "ERR|"))
        return int(reply.split("|")[1]) if reply.startswith("MSG_OK|") else None

    later = wait_until(sent, timeout=20, interval=0.2)
    assert later > first
    assert bob.expect("MSG|").endswith("|ana|after")
    wait_until(lambda: names_on(b.port) == ["ana", "bob"])  # each server claimed its names again
    intruder = RawClient(b.port)
    intruder.send(b"USER|ana\n")
    assert intruder.expect("ERR|").startswith("ERR|name-taken|")


def test_a_client_moving_to_another_server_fills_its_gap(node, spawn_join):
    a, b = node("a"), node("b")
    balancer = Forwarder(a.port)
    try:
        bob = member(b.port, "bob")
        bob.send(b"JOIN|#ops\n")
        bob.expect("JOIN_OK|#ops")
        ana = spawn_join("ana", balancer.port, "--room", "ops")
        bob.send(b"MSG|#ops|seen before\n")
        ana.expect("<bob> seen before")
        balancer.switch(b.port)  # the load balancer sends the next connection to b
        a.shutdown()
        ana.expect("reconnecting")
        bob.send(b"MSG|#ops|while you moved 1\nMSG|#main|while you moved 2\n")
        ana.expect("reconnected to", timeout=20)
        shown = ""
        for line in ("while you moved 1", "while you moved 2"):
            ana.expect(line)
            shown += ana.before + ana.after
        bob.send(b"MSG|#ops|live again\n")
        ana.expect("<bob> live again")
        shown += ana.before
        assert "seen before" not in shown and shown.count("while you moved 1") == 1, shown
    finally:
        balancer.close()


def test_a_seed_client_on_b_talks_with_join_on_a(node, spawn_join):
    a, b = node("a"), node("b")
    ana = spawn_join("ana", a.port)
    seed = RawClient(b.port)
    seed.send(b"USER|sam")  # one frame per write, no line end, as the seed's client does
    assert seed.line() == "USER_OK"
    seed.send(b"MSG|hi from b")
    assert seed.line() == "MSG_OK"
    ana.expect("<sam> hi from b")
    ana.send("hello sam\r")
    assert seed.expect("ana: ") == "ana: hello sam"
    seed.send(b"DIR")
    assert seed.expect("Users logged in: ") == "Users logged in: ana, sam"


def test_servers_without_a_bus_list_themselves(server, isolated_home):
    listing = run_cli("cluster", "--json", "-p", str(server.port), env=isolated_home)
    assert listing.returncode == 0, listing.stderr
    assert [s["server"] for s in json.loads(listing.stdout)] == ["standalone"]


def test_serve_with_an_unreachable_bus_says_so_in_one_line(isolated_home):
    dead = free_port()
    result = run_cli("serve", "-p", "0", "--bus", f"redis://127.0.0.1:{dead}/0", env=isolated_home)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "cannot reach the bus at redis://127.0.0.1:" in lines[-1] and "Traceback" not in result.stderr


def test_a_bad_bus_url_is_a_config_error(isolated_home):
    result = run_cli("serve", "-p", "0", "--bus", "http://example.invalid", env=isolated_home)
    assert result.returncode == chatctl.EXIT_CONFIG
    assert "redis://" in result.stderr and "Traceback" not in result.stderr


def test_rediss_with_a_password_in_the_url(tmp_path, make_server, isolated_home):
    binary = redis_binary()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    chatctl.generate_certificate(cert, key)  # self-signed, for 127.0.0.1: its own CA
    port = free_port()
    redis = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                              "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                              "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                              "--requirepass", "s3cret:@", "--save", "", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"rediss://:s3cret%3A%40@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        a = wait_until(lambda: _started(make_server, url, "a"), timeout=10, interval=0.2)
        b = make_server(bus=url, server_id="b")
        ana, bob = member(a.port, "ana"), member(b.port, "bob")
        ana.send(b"MSG|over tls\n")
        assert bob.expect("MSG|").endswith("|ana|over tls")
        wrong = run_cli("serve", "-p", "0", env={**isolated_home,
                                                 "CHATCTL_BUS": url.replace("s3cret%3A%40", "guess")})
        assert wrong.returncode == 1 and "cannot reach the bus" in wrong.stderr
        assert "guess" not in wrong.stderr and "Traceback" not in wrong.stderr  # the password is not shown
    finally:
        redis.kill()
        redis.wait(10)


def _started(make_server, url: str, server_id: str):
    try:
        return make_server(bus=url, server_id=server_id)
    except chatctl.BusError:  # redis-server is still starting
        return None


def test_a_server_joining_late_copies_the_log_but_delivers_only_what_is_new(node):
    a = node("a", rate=0)
    ana = member(a.port, "ana")
    ana.send(b"".join(f"MSG|old {i}\n".encode() for i in range(3000)))  # enough for a catch-up that lasts
    for _ in range(3000):
        ana.expect("MSG_OK|")
    b = node("b")  # a new server, an empty history: it copies the log, but those are not news
    bob = member(b.port, "bob")
    ana.send(b"MSG|new\n")
    assert bob.expect("MSG|").endswith("|ana|new")
    client = RawClient(b.port)
    client.send(b"HELLO|chatctl/1|quiet\nHISTORY|LAST|3\n")
    stored = [line.split("|")[5] for line in _until_end(client) if line.startswith("MSG|")]
    assert stored == ["old 2998", "old 2999", "new"]


def rooms_of(client: RawClient) -> dict[str, chatctl.RoomInfo]:
    client.send(b"ROOMS\n")
    found = {}
    while not (line := client.line()).startswith("END|ROOMS"):
        if line.startswith("ROOM|"):
            info = chatctl.parse_event(line)
            found[info.name] = info
    return found


def test_read_markers_of_a_protected_name_follow_it_to_another_server(node):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    ana = member(a.port, "ana")
    ana.send(b"REGISTER|anapass123\nJOIN|#deploys\n")
    ana.expect("REGISTER_OK")
    ana.expect("JOIN_OK|#deploys")
    bob = member(b.port, "bob")
    bob.send(b"JOIN|#deploys\n")
    bob.expect("JOIN_OK")
    for text in (b"one", b"ana: two", b"three"):
        bob.send(b"MSG|#deploys|" + text + b"\n")
        bob.expect("MSG_OK|")
    ids = [int(ana.expect("MSG|#deploys|").split("|")[2]) for _ in range(3)]
    ana.send(f"MARK|#deploys|{ids[0]}\nQUIT\n".encode())
    ana.expect("MARK_OK")
    ana.wait_closed()
    again = member(b.port, "ana", "anapass123")  # the same person, on the other server
    info = rooms_of(again)["deploys"]
    assert (info.unread, info.mentions, info.messages) == (2, 1, 3)


def test_a_server_behind_a_trimmed_log_logs_the_gap_with_the_ids(node, redis_server, tmp_path, caplog):
    import redis

    a = node("a")
    b = node("b", db=str(tmp_path / "b.db"))
    ana = member(a.port, "ana")
    ana.send(b"MSG|both have this\n")
    first = int(ana.expect("MSG_OK|").split("|")[1])
    wait_until(lambda: b.log.last_id == first)
    b.shutdown()
    for text in (b"one", b"two", b"three"):
        ana.send(b"MSG|" + text + b"\n")
        ana.expect("MSG_OK|")
    ana.send(b"MSG|kept\n")
    kept = int(ana.expect("MSG_OK|").split("|")[1])
    log_key = "chatctl:{chatctl}:log"
    client = redis.Redis.from_url(redis_server.url)
    client.xtrim(log_key, minid=f"{kept}-0", approximate=False)  # as bus_log_length would, while b was away
    client.close()
    with caplog.at_level("ERROR", logger="chatctl"):
        again = node("b", db=str(tmp_path / "b.db"))
        wait_until(lambda: again.log.last_id == kept)
    assert f"messages {first + 1} to {kept - 1} are not in the log" in caplog.text


def test_a_start_that_cannot_reach_the_bus_leaves_the_history_free(tmp_path):
    db = str(tmp_path / "h.db")
    config = chatctl.ServerConfig(host="127.0.0.1", port=0, db=db, bus=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(chatctl.BusError):
        chatctl.ChatServer(config).start()
    chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=0, db=db)).start().shutdown()  # not locked


def test_presence_comes_before_a_newcomer_s_messages_on_every_server(node):
    a, b = node("a", rate=0), node("b")
    watcher = member(b.port, "watcher")
    watcher.send(b"JOIN|#ops\n")
    watcher.expect("JOIN_OK|#ops")
    for i in range(5):  # a newcomer on a: joins, talks, enters #ops, talks there, quits
        newcomer = RawClient(a.port)
        newcomer.send(b"HELLO|chatctl/1\n" + f"USER|new{i}\n".encode())
        newcomer.expect("USER_OK")
        newcomer.send(b"MSG|hello\n")
        newcomer.expect("MSG_OK|")
        newcomer.send(b"JOIN|#ops\n")
        newcomer.expect("JOIN_OK|#ops")
        newcomer.send(b"MSG|#ops|in ops\nQUIT\n")
        newcomer.wait_closed()
    seen: dict[str, list[str]] = {}
    while sum(len(v) for v in seen.values()) < 25:
        fields = watcher.expect(("JOIN|", "ENTER|", "MSG|", "LEAVE|")).split("|")
        who = {"JOIN": fields[-1], "LEAVE": fields[2], "ENTER": fields[-1]}.get(fields[0], fields[-2])
        seen.setdefault(who, []).append(fields[0] if fields[0] != "MSG" else f"MSG{fields[1]}")
    assert all(events == ["JOIN", "MSG#main", "ENTER", "MSG#ops", "LEAVE"] for events in seen.values()), seen


def test_what_redis_was_too_frozen_to_take_in_time_is_refused_and_stays_undone(node, redis_server):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    ana.send(b"REGISTER|anapass123\nMSG|before\n")  # the connections to Redis are open before it hangs
    ana.expect("REGISTER_OK")
    ana.expect("MSG_OK|")
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # Redis hangs: calls wait, then time out
    try:
        ana.send(b"MSG|sent while frozen\n")
        assert ana.expect(("MSG_OK", "ERR|"), timeout=15).startswith("ERR|bus-unavailable|")
        ana.send(b"UNREGISTER|anapass123\n")
        assert ana.expect(("UNREGISTER_OK", "ERR|"), timeout=15).startswith("ERR|bus-unavailable|")
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)

    def sent() -> bool:
        ana.send(b"MSG|after the thaw\n")
        return ana.expect(("MSG_OK|", "ERR|"), timeout=15).startswith("MSG_OK|")

    wait_until(sent, timeout=30, interval=0.5)
    texts = []
    while (line := bob.expect("MSG|", timeout=10)).split("|")[5] != "after the thaw":
        texts.append(line.split("|")[5])
    assert "sent while frozen" not in texts  # refused means not sent, even once Redis woke up
    intruder = RawClient(b.port)
    intruder.send(b"USER|ana\n")
    assert intruder.expect("ERR|").split("|")[1] in ("name-protected", "name-taken")  # still protected
    ana.send(b"QUIT\n")
    ana.wait_closed()
    wait_until(lambda: names_on(b.port) == ["bob"])
    intruder.send(b"USER|ana\n")
    assert intruder.expect("ERR|").startswith("ERR|name-protected|")


def test_protected_names_survive_redis_losing_its_data(node, redis_server):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    ana = member(a.port, "ana")
    ana.send(b"REGISTER|anapass123\nJOIN|#ops\nTOPIC|#ops|kept across\nQUIT\n")
    ana.wait_closed()
    redis_server.stop()
    redis_server.start(empty=True)
    fresh = node("c", auth_delay=0)  # even a server that starts after the loss

    def refused_on(port: int) -> str:
        client = RawClient(port)
        client.send(b"USER|ana\n")
        reply = client.expect(("USER_OK", "ERR|"))
        client.close()
        return reply

    for server in (a, b, fresh):
        assert wait_until(lambda s=server: refused_on(s.port).startswith("ERR|name-protected|"),
                          timeout=20, interval=0.3)
    owner = member(fresh.port, "ana", "anapass123")
    owner.send(b"TOPIC|#ops\n")
    assert owner.expect("TOPIC|#ops|").endswith("|ana|kept across")


def test_an_account_s_devices_stay_when_redis_comes_back_empty(node, redis_server):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    laptop, phone = member(a.port, "ana", "anapass123"), member(b.port, "ana", "anapass123")
    wait_until(lambda: len(a.registry.devices("ana")) == 2 and len(b.registry.devices("ana")) == 2)
    redis_server.stop()
    redis_server.start(empty=True)  # the protection is given back from the servers' copies
    wait_until(lambda: a.bus._up.is_set() and b.bus._up.is_set(), timeout=20)
    wait_until(lambda: len(a.registry.devices("ana")) == 2 and len(b.registry.devices("ana")) == 2,
               timeout=20)
    for device in (laptop, phone):  # they proved that very password: nobody was dropped
        device.send(b"PING|still\n")
        assert device.expect(("PONG|", "BYE|")) == "PONG|still"


def test_dropping_the_protection_and_logging_out_reach_the_other_server(node):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    for _ in range(3):  # two devices on two servers logging each other out at once: one stays
        one, two = member(a.port, "ana", "anapass123"), member(b.port, "ana", "anapass123")
        wait_until(lambda: len(a.registry.devices("ana")) == 2 and len(b.registry.devices("ana")) == 2)
        one.send(b"LOGOUT|others|anapass123\n"), two.send(b"LOGOUT|others|anapass123\n")
        ended = [client for client in (one, two) if got_bye(client)]
        assert len(ended) == 1  # the other was not logged out
        survivor = two if ended == [one] else one
        survivor.send(b"PING|alive\n")
        assert survivor.expect(("PONG|", "BYE|")) == "PONG|alive"
        assert len(a.registry.devices("ana")) == len(b.registry.devices("ana")) == 1
        one.close(), two.close()
        wait_until(lambda: not a.registry.devices("ana") and not b.registry.devices("ana"))
    laptop, phone = member(a.port, "ana", "anapass123"), member(b.port, "ana", "anapass123")
    wait_until(lambda: len(a.registry.devices("ana")) == 2)
    laptop.send(b"UNREGISTER|anapass123\n")
    assert laptop.expect(("UNREGISTER_OK|", "ERR|", "BYE|")) == "UNREGISTER_OK|ana"
    assert phone.wait_closed()[-1].startswith("BYE|logged out: the name's protection was dropped")


def got_bye(client: RawClient, within: float = 3.0) -> bool:
    """Whether ``client`` is sent BYE (or closed) within ``within`` seconds."""
    try:
        client.expect("BYE|", timeout=within)
        return True
    except EOFError:
        return True
    except AssertionError:  # no BYE in time
        return False


def test_right_passwords_at_once_on_a_bus_server_all_get_in(node):
    a = node("a", auth_delay=0, auth_max_failures=3)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    clients = [RawClient(a.port) for _ in range(8)]
    for client in clients:
        client.send(b"USER|ana|anapass123\n")
    assert [client.expect(("USER_OK", "ERR|")) for client in clients] == ["USER_OK"] * 8


def test_a_named_irc_device_catches_up_through_another_server(node):
    from test_irc import IrcClient

    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    setup = member(a.port, "ana")
    setup.send(b"REGISTER|anapass123\nQUIT\n")
    setup.wait_closed()
    phone = IrcClient(b.port)
    phone.register("ana", caps="sasl server-time", sasl=("ana@phone", "anapass123"))
    phone.send("QUIT :pocket")
    wait_until(lambda: not a.registry.devices("ana") and not b.registry.devices("ana"))
    carol = member(a.port, "carol")
    for n in range(3):
        carol.send(f"MSG|missed {n}\n".encode())
        carol.expect("MSG_OK|")
    phone = IrcClient(a.port)  # back, through the other server
    phone.register("ana", caps="sasl server-time", sasl=("ana@phone", "anapass123"))
    phone.expect(r"NOTICE ana :#main: 3 line\(s\) you missed on this device")
    assert [line.rsplit(":", 1)[1] for line in phone.seen if " PRIVMSG #main " in line] == \
        ["missed 0", "missed 1", "missed 2"]
    phone.close()


def test_a_short_redis_outage_keeps_everyone_online_and_the_next_call_works(node, redis_server):
    a, b = node("a"), node("b")
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    bob.send(b"JOIN|#ops\n")
    bob.expect("JOIN_OK")
    wait_until(lambda: names_on(a.port) == ["ana", "bob"])
    time.sleep(0.5)
    for client in (ana, bob):
        lines_until_pong(client)
    redis_server.stop()
    time.sleep(8)  # under BUS_SERVER_TIMEOUT: nobody's server stopped answering
    redis_server.start()
    wait_until(lambda: a.bus._up.is_set() and b.bus._up.is_set(), timeout=20)
    time.sleep(3)  # the pool's connections now idle past a heartbeat, and dead since the restart
    bob.send(b"TOPIC|#ops|right after\n")
    assert bob.expect(("TOPIC|", "ERR|")).endswith("|bob|right after")
    time.sleep(12)  # past BUS_SERVER_TIMEOUT since the outage: still nobody reaped
    assert names_on(a.port) == names_on(b.port) == ["ana", "bob"]
    for client in (ana, bob):
        lines = lines_until_pong(client)
        assert not [line for line in lines if line.startswith(("LEAVE|", "JOIN|"))], lines


def lines_until_pong(client: RawClient) -> list[str]:
    """What the client was sent so far (a PING's PONG marks the end)."""
    client.send(b"PING|end\n")
    lines = []
    while not (line := client.line()).startswith("PONG"):
        lines.append(line)
    return lines


def test_a_second_server_with_the_same_id_is_refused(node):
    a = node("a")
    ana = member(a.port, "ana")
    with pytest.raises(chatctl.BusError, match="already on this bus"):
        node("a")
    assert names_on(a.port) == ["ana"]
    ana.send(b"MSG|still here\n")
    ana.expect("MSG_OK|")


def test_topics_set_at_once_on_two_servers_end_the_same_everywhere(node):
    a, b, c = node("a"), node("b"), node("c")
    ana, bob = member(a.port, "ana"), member(b.port, "bob")
    rooms = [f"#t{i}" for i in range(8)]
    for client in (ana, bob):
        client.send(("JOIN|" + ",".join(rooms) + "\n").encode())
        for _ in rooms:
            client.expect("JOIN_OK|")
    wait_until(lambda: all(r[1:] in c.registry.rooms and len(c.registry.rooms[r[1:]].members) == 2
                           for r in rooms))
    ana.send(b"".join(f"TOPIC|{r}|from a\n".encode() for r in rooms) + b"MSG|#t7|topics sent\n")
    bob.send(b"".join(f"TOPIC|{r}|from b\n".encode() for r in rooms) + b"MSG|#t7|topics sent\n")
    for client in (ana, bob):
        client.expect("MSG_OK|")  # after its topics in the shared log: once read, they were too
    wait_until(lambda: all(s.registry.rooms["t7"].messages == 2 for s in (a, b, c)), timeout=10)
    topics = wait_until_same(lambda: [{r: s.registry.rooms[r[1:]].topic for r in rooms} for s in (a, b, c)])
    assert set(topics[0].values()) <= {"from a", "from b"}, topics  # one of the two, in every room


def test_closing_a_room_while_someone_joins_it_elsewhere_ends_the_same_everywhere(node):
    a, b = node("a", auth_delay=0), node("b")
    ana = member(a.port, "ana", None)
    ana.send(b"REGISTER|anapass123\n")
    ana.expect("REGISTER_OK")
    bob = member(b.port, "bob")
    for i in range(5):
        room = f"#race{i}"
        ana.send(f"JOIN|{room}\nMSG|{room}|old secret\nPART|{room}\n".encode())
        ana.expect(f"PART_OK|{room}")
        wait_until(lambda r=room: r[1:] in b.registry.rooms and b.registry.rooms[r[1:]].messages)
        ana.send(f"CLOSE|{room}\n".encode())
        bob.send(f"JOIN|{room}\n".encode())
        ana.expect(("CLOSE_OK", "ERR|"))
        bob.expect(("JOIN_OK", "ERR|"))

        def kept(room=room) -> list[str]:
            answers = []
            for server in (a, b):
                client = RawClient(server.port)
                client.send(f"HELLO|chatctl/1|quiet\nHISTORY|{room}|LAST|5\n".encode())
                reply = client.expect(("END|", "ERR|"))
                answers.append(reply if reply.startswith("ERR|") else reply.split("|")[2])
                client.close()
            return answers

        wait_until_same(kept)  # both kept the history, or neither did (once each has heard of the other)


def test_a_message_racing_the_close_of_its_room_is_kept_nowhere_or_everywhere(node):
    # (max_errors: when the close lands early, more than 20 of the 200 are refused in a row, and the
    # script would be dropped for it before it read every answer)
    a, b, c = node("a", auth_delay=0), node("b", rate=0, max_errors=1000), node("c")
    ana = member(a.port, "ana")
    ana.send(b"REGISTER|anapass123\n")
    ana.expect("REGISTER_OK")
    for i in range(3):
        room = f"#inflight{i}"
        ana.send(f"JOIN|{room}\nMSG|{room}|first\nPART|{room}\n".encode())
        ana.expect(f"PART_OK|{room}")
        wait_until(lambda r=room: b.registry.rooms.get(r[1:]) is not None)
        script = RawClient(b.port)
        script.send(b"HELLO|chatctl/1|quiet\nUSER|bot\n")
        script.expect("USER_OK")
        script.send(b"".join(f"MSG|{room}|m{n}\n".encode() for n in range(200)))
        ana.send(f"CLOSE|{room}\n".encode())
        ana.expect(("CLOSE_OK", "ERR|"))
        for _ in range(200):  # each message stored in the shared log (MSG_OK) or refused
            script.expect(("MSG_OK", "ERR|"))
        ana.send(f"MSG|#main|after {room}\n".encode())  # in the log after all of them
        marker = int(ana.expect("MSG_OK|").split("|")[1])

        wait_until(lambda m=marker: all(s.history._read_rows("SELECT id FROM messages WHERE id = :id",
                                                             {"id": m}) for s in (a, b, c)),
                   timeout=10)  # every server has read that far

        def stored(room=room) -> list[list[int]]:
            return [sorted(r[0] for r in s.history._read_rows("SELECT id FROM messages WHERE room = :room",
                                                               {"room": room[1:]})) for s in (a, b, c)]

        wait_until_same(stored)
        script.close()


def test_a_room_forgotten_everywhere_does_not_come_back_with_a_restarted_server(node, tmp_path):
    a = node("a")
    c = node("c", db=str(tmp_path / "c.db"))
    cat = member(c.port, "cat")
    cat.send(b"JOIN|#passing\n")
    cat.expect("JOIN_OK|#passing")
    wait_until(lambda: "passing" in a.registry.rooms)
    cat.send(b"PART|#passing\n")  # nobody used it: forgotten
    cat.expect("PART_OK")
    wait_until(lambda: "passing" not in a.registry.rooms)
    c.shutdown()
    again = node("c", db=str(tmp_path / "c.db"))
    assert "passing" not in again.registry.rooms and "passing" not in a.registry.rooms
    script = RawClient(again.port)
    script.send(b"HELLO|chatctl/1|quiet\nUSER|bot\nMSG|#passing|typo\n")
    assert script.expect("ERR|").startswith("ERR|unknown-room|")


def test_password_guesses_are_counted_across_servers(node):
    a, b = node("a", auth_delay=0), node("b", auth_delay=0)
    owner = member(a.port, "ana")
    owner.send(b"REGISTER|anapass123\n")
    owner.expect("REGISTER_OK")
    replies = []
    for i in range(8):  # 5 tries a window per address (auth_max_failures), spread over two servers
        guesser = RawClient((a, b)[i % 2].port)
        guesser.send(f"USER|ana|guess{i}\n".encode())
        replies.append(guesser.expect("ERR|").split("|")[1])
        guesser.close()
    assert replies[:5] == ["bad-password"] * 5 and set(replies[5:]) == {"auth-locked"}, replies


def test_a_server_started_later_lists_people_since_they_joined(node):
    a = node("a")
    ana = member(a.port, "ana")
    time.sleep(2.2)
    b = node("b")  # it learns of ana from the shared names

    def since(port: int) -> dict[str, tuple[str, int]]:
        client = RawClient(port)
        client.send(b"HELLO|chatctl/1|quiet\nDIR\n")
        entries = client.expect("USERS").split("|")[1:]
        client.close()
        return {e.split(" ")[0]: (e.split(" ")[1], int(e.split(" ")[2])) for e in entries}

    on_a, on_b = since(a.port), since(b.port)
    assert on_b["ana"][0] == on_a["ana"][0]  # the same "online since" on both
    assert on_b["ana"][1] >= 2  # idle at least since it joined, not since b started
    assert ana


def test_a_room_closed_while_a_server_was_down_is_gone_there_too(node, tmp_path):
    a = node("a", operator_password="operpass1", auth_delay=0)
    b = node("b", db=str(tmp_path / "b.db"))
    ana = member(a.port, "ana")
    ana.send(b"JOIN|#old\nMSG|#old|before the close\nPART|#old\n")
    ana.expect("PART_OK|#old")
    wait_until(lambda: "old" in b.registry.rooms and b.registry.rooms["old"].messages == 1)
    b.shutdown()
    ana.send(b"OPER|operpass1\nCLOSE|#old\n")
    ana.expect("OPER_OK")
    ana.expect("CLOSE_OK|#old")
    again = node("b", db=str(tmp_path / "b.db"))
    assert "old" not in again.registry.rooms
    client = RawClient(again.port)
    client.send(b"HELLO|chatctl/1|quiet\nHISTORY|#old|LAST|5\n")
    assert client.expect("ERR|").startswith("ERR|unknown-room|")
    assert not again.history._read_rows("SELECT id FROM messages WHERE room = 'old'", {})


def test_a_name_taken_while_redis_had_lost_its_protection_goes_back_to_its_owner(
        node, redis_server, make_server, tmp_path):
    link = Forwarder(redis_server.port)  # a reaches Redis through this, so the test decides when a is back
    try:
        a = make_server(bus=f"redis://127.0.0.1:{link.port}/0", server_id="a", auth_delay=0,
                        accounts_db=str(tmp_path / "accounts-a.db"))
        owner = member(a.port, "ana")
        owner.send(b"REGISTER|anapass123\nQUIT\n")
        assert "REGISTER_OK|ana" in owner.wait_closed()
        link.switch(free_port())  # nothing listens there: a stays cut off until switched back
        redis_server.stop()
        wait_until(lambda: not a.bus._up.is_set(), timeout=10)  # a has seen Redis go
        redis_server.start(empty=True)
        d = node("d", auth_delay=0)  # a new server, while a is away: it knows nothing of ana's protection
        impostor = RawClient(d.port)
        impostor.send(b"HELLO|chatctl/1\nUSER|ana\n")
        assert impostor.expect(("USER_OK", "ERR|")) == "USER_OK"  # the window before a is back: it is free
        impostor.send(b"REGISTER|evilpass123\n")
        impostor.expect("REGISTER_OK|ana")  # and even protected with a password of the impostor's
        link.switch(redis_server.port)  # a is back, and gives Redis the protection it kept
        lines = impostor.wait_closed(timeout=20)
        assert any(line.startswith("BYE|this name's protection was restored") for line in lines), lines
        for server in (a, d):
            wait_until(lambda s=server: s.bus._up.is_set(), timeout=20)
            wrong = RawClient(server.port)
            wrong.send(b"USER|ana|evilpass123\n")
            assert wrong.expect("ERR|").split("|")[1] in ("bad-password", "name-taken")
            member(server.port, "ana", "anapass123").send(b"QUIT\n")
    finally:
        link.close()


def test_a_burst_of_registrations_neither_trips_the_bus_nor_wedges_it(node):
    a, b = node("a", rate=0, max_per_address=0), node("b")
    clients = [RawClient(a.port, timeout=30) for _ in range(400)]
    for i, client in enumerate(clients):  # all at once: the reader threads claim names in parallel
        client.send(f"HELLO|chatctl/1\nUSER|burst{i}\n".encode())
    replies = [client.expect(("USER_OK", "ERR|"), timeout=30) for client in clients]
    assert replies == ["USER_OK"] * 400, sorted(set(replies))
    clients[0].send(b"MSG|still working\n")
    assert clients[0].expect(("MSG_OK|", "ERR|")).startswith("MSG_OK|")
    wait_until(lambda: len(names_on(b.port)) == 400, timeout=20)
    for client in clients:
        client.close()


def test_the_shared_log_is_bounded_in_bytes_as_well_as_entries(node, redis_server):
    import redis

    cap = 1_000_000
    a = node("a", bus_log_bytes=cap, rate=0, address_byte_rate=0)
    ana = member(a.port, "ana")
    text = "x" * 8000
    for n in range(0, 300, 10):  # 2.4 MB of messages: more than twice the cap, far under bus_log_length
        ana.send(b"".join(f"MSG|{n + i} {text}\n".encode() for i in range(10)))
        for _ in range(10):  # (in steps: a server further behind than the log holds would see a gap)
            ana.expect("MSG_OK|", timeout=20)
    client = redis.Redis.from_url(redis_server.url)
    try:
        entries = client.xrange("chatctl:{chatctl}:log")
        stored = sum(len(k) + len(v) for _, fields in entries for k, v in fields.items())
        assert stored <= cap, (stored, len(entries))
        assert stored >= cap // 2  # trimmed to the cap, not emptied
        newest = entries[-1][1][b"m"].decode()
        assert f"299 {text}" in newest  # the newest are the ones kept
    finally:
        client.close()
