"""Rooms over the wire: join, part, topics, names, unread markers, the seed's clients kept in #main."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

import chatctl
from conftest import RawClient, run_cli, wait_until


def join(client: RawClient, *rooms: str) -> list[str]:
    """JOIN rooms; the lines of the reply up to the last JOIN_OK."""
    client.send(("JOIN|" + "|".join(rooms) + "\n").encode())
    lines = []
    for room in rooms:
        while True:
            line = client.line()
            lines.append(line)
            if line == f"JOIN_OK|#{room.lstrip('#').lower()}":
                break
    return lines


def rooms_of(client: RawClient) -> dict[str, chatctl.RoomInfo]:
    client.send(b"ROOMS\n")
    found = {}
    while True:
        event = chatctl.parse_event(client.line())
        if isinstance(event, chatctl.EndOfList):
            assert event.kind == "ROOMS" and event.count == len(found)
            return found
        if isinstance(event, chatctl.RoomInfo):
            found[event.name] = event


def test_room_messages_reach_only_the_rooms_members(user):
    ana, bob, cat = (user(n, hello=True) for n in ("ana", "bob", "cat"))
    join(ana, "#deploys")
    join(bob, "#Deploys")  # names are case-insensitive
    ana.send(b"MSG|#deploys|build 42 is green\n")
    mid = ana.expect("MSG_OK|").split("|")[1]
    line = bob.expect("MSG|")
    assert line.startswith(f"MSG|#deploys|{mid}|") and line.endswith("|ana|build 42 is green")
    cat.send(b"PING|x\n")
    assert cat.expect("PONG") == "PONG|x"
    assert not any(line.startswith("MSG|") for line in cat.seen)  # cat is not in #deploys
    ana.send(b"MSG|for everyone\n")  # no room: #main
    assert cat.expect("MSG|").startswith("MSG|#main|")


def test_the_seed_clients_live_in_main_and_see_nothing_of_other_rooms(user, connect):
    ana = user("ana", hello=True)
    join(ana, "#ops")
    seed = connect()
    seed.send(b"USER|old")  # one frame per write, no newline: the seed's socket scripts
    assert seed.line() == "USER_OK"
    ana.send(b"MSG|#ops|secret ops talk\nME|#ops|deploys\n")
    ana.expect("MSG_OK|")
    ana.expect("MSG_OK|")
    ana.send(b"MSG|hello main\n")
    ana.expect("MSG_OK|")
    assert seed.line() == "ana: hello main"  # the #ops lines never came, so this is the first
    seed.send(b"MSG|#ops|not a room to me")
    assert seed.line() == "MSG_OK"
    assert ana.expect("MSG|").endswith("|old|#ops|not a room to me")  # all of it text, in #main
    seed.send(b"DIR")
    assert seed.line() == "Users logged in: ana, old"
    seed.send(b"JOIN|#ops")
    assert seed.line().startswith("ERR|hello-required|")


def test_join_shows_topic_and_names_and_members_hear_it(user):
    ana, bob = user("ana", hello=True), user("bob", hello=True)
    join(ana, "#deploys")
    ana.send(b"TOPIC|#deploys|builds and releases\n")
    topic = chatctl.parse_event(ana.expect("TOPIC|"))
    assert (topic.room, topic.setter, topic.text) == ("deploys", "ana", "builds and releases")
    lines = join(bob, "#deploys")
    assert chatctl.parse_event(lines[0]).text == "builds and releases"
    names = chatctl.parse_event(lines[1])
    assert isinstance(names, chatctl.RoomNames) and [u.name for u in names.users] == ["ana", "bob"]
    entered = chatctl.parse_event(ana.expect("ENTER|"))
    assert (entered.room, entered.name) == ("deploys", "bob")
    bob.send(b"TOPIC|#deploys|now with rollbacks\n")
    assert chatctl.parse_event(ana.expect("TOPIC|")).text == "now with rollbacks"
    bob.send(b"PART|#deploys|lunch\n")
    assert bob.expect("PART_OK") == "PART_OK|#deploys"
    exited = chatctl.parse_event(ana.expect("EXIT|"))
    assert (exited.name, exited.reason) == ("bob", "lunch")
    bob.send(b"MSG|#deploys|still here?\n")
    assert bob.expect("ERR|").startswith("ERR|not-in-room|")


@pytest.mark.parametrize("frame, code", [
    (b"JOIN|#Bad Room\n", "invalid-room"),
    (b"JOIN|#-dash\n", "invalid-room"),
    (b"JOIN|#" + b"x" * 31 + b"\n", "invalid-room"),
    (b"JOIN|#caf\xc3\xa9\n", "invalid-room"),
    (b"JOIN\n", "missing-argument"),
    (b"PART|#nowhere\n", "not-in-room"),
    (b"NAMES|#nowhere\n", "unknown-room"),
    (b"TOPIC|#nowhere\n", "unknown-room"),
    (b"HISTORY|#nowhere|LAST|5\n", "unknown-room"),
    (b"MSG|#nowhere|hi\n", "unknown-room"),
    (b"MARK|#main|x\n", "bad-argument"),
    (b"CLOSE|#main\n", "not-allowed"),
])
def test_bad_room_requests_get_a_stable_code_and_the_connection_goes_on(user, frame, code):
    ana = user("ana", hello=True)
    ana.send(frame)
    assert ana.expect("ERR|").split("|")[1] == code
    ana.send(b"PING|still\n")
    assert ana.expect("PONG") == "PONG|still"


def test_room_limits_per_user_and_per_server(make_server):
    server = make_server(max_rooms_per_user=3, max_rooms=4, auth_delay=0)  # #main counts in both
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana\nREGISTER|anapass12\n")
    ana.expect("REGISTER_OK")
    join(ana, "#a", "#b")
    ana.send(b"MSG|#a|kept\nMSG|#b|kept\n")  # a room with a message is kept when it empties
    ana.expect("MSG_OK|")
    ana.expect("MSG_OK|")
    ana.send(b"JOIN|#c\n")
    assert ana.expect("ERR|").startswith("ERR|too-many-rooms|you are in 3 rooms")
    ana.send(b"PART|#a\n")
    ana.expect("PART_OK")
    join(ana, "#c")  # #main, #a, #b, #c: the server's four
    ana.send(b"TOPIC|#c|kept too\nPART|#c\nJOIN|#d\n")
    ana.expect("PART_OK")
    assert ana.expect("ERR|").startswith("ERR|too-many-rooms|the server has 4 rooms")
    ana.send(b"CLOSE|#c\n")  # empty now, and ana made it
    assert ana.expect("CLOSE_OK") == "CLOSE_OK|#c"
    join(ana, "#d")
    ana.close()


def test_only_the_creator_or_an_operator_closes_and_only_an_empty_room(make_server):
    server = make_server(operator_password="opensesame", auth_delay=0)
    ana, bob, root = (RawClient(server.port) for _ in range(3))
    for client, frame in ((ana, b"USER|ana\nREGISTER|anapass12"), (bob, b"USER|bob"),
                          (root, b"USER|root\nOPER|opensesame")):
        client.send(b"HELLO|chatctl/1\n" + frame + b"\n")
        client.expect("USER_OK")
    join(ana, "#tmp")
    ana.send(b"MSG|#tmp|history to keep\nCLOSE|#tmp\n")
    assert ana.expect("ERR|").startswith("ERR|room-not-empty|")
    ana.send(b"PART|#tmp\n")
    ana.expect("PART_OK")
    bob.send(b"CLOSE|#tmp\n")
    assert bob.expect("ERR|").startswith("ERR|not-allowed|")
    root.send(b"CLOSE|#tmp\n")
    assert root.expect("CLOSE_OK") == "CLOSE_OK|#tmp"
    assert "tmp" not in rooms_of(bob)


def test_a_quiet_script_posts_to_an_existing_room_without_joining(user, connect):
    ana = user("ana", hello=True)
    join(ana, "#deploys")
    bot = connect()
    bot.send(b"HELLO|chatctl/1|quiet\nUSER|ci\nMSG|#deploys|build 7 ok\nMSG|#nope|x\n")
    bot.expect("MSG_OK|")
    assert bot.expect("ERR|").startswith("ERR|unknown-room|")
    assert ana.expect("MSG|").endswith("|ci|build 7 ok")


def test_history_and_search_per_room(user):
    ana = user("ana", hello=True)
    join(ana, "#deploys")
    ana.send(b"MSG|main talk about deploys\nMSG|#deploys|deploys talk\n")
    ana.expect("MSG_OK|")
    ana.expect("MSG_OK|")
    ana.send(b"HISTORY|#deploys|LAST|10\n")
    first = chatctl.parse_event(ana.expect("MSG|"))
    assert (first.message.room, first.message.text) == ("deploys", "deploys talk")
    assert ana.expect("END|") == "END|HISTORY|1"
    ana.send(b"HISTORY|LAST|10\n")  # no room: #main (and your direct messages)
    assert chatctl.parse_event(ana.expect("MSG|")).message.text == "main talk about deploys"
    assert ana.expect("END|") == "END|HISTORY|1"
    ana.send(b"SEARCH|#deploys|10|talk\n")
    assert chatctl.parse_event(ana.expect("MSG|")).message.room == "deploys"
    assert ana.expect("END|") == "END|SEARCH|1"


def test_rooms_list_counts_unread_and_mentions_from_the_marker(user):
    ana, bob = user("ana", hello=True), user("bob", hello=True)
    join(ana, "#deploys")
    join(bob, "#deploys")
    for text in (b"one", b"two for ana", b"three"):
        bob.send(b"MSG|#deploys|" + text + b"\n")
        bob.expect("MSG_OK|")
    last = [chatctl.parse_event(ana.expect("MSG|")).message.id for _ in range(3)]
    info = rooms_of(ana)
    assert (info["deploys"].unread, info["deploys"].mentions, info["deploys"].messages) == (3, 1, 3)
    assert info["deploys"].joined and info["deploys"].online == 2 and info["main"].unread == 0
    ana.send(f"MARK|#deploys|{last[1]}\n".encode())
    assert ana.expect("MARK_OK") == f"MARK_OK|#deploys|{last[1]}"
    assert (rooms_of(ana)["deploys"].unread, rooms_of(ana)["deploys"].mentions) == (1, 0)


def test_unread_of_a_protected_name_survives_a_reconnect_and_a_restart(make_server, tmp_path):
    db, accounts = str(tmp_path / "h.db"), str(tmp_path / "a.db")
    server = make_server(db=db, accounts_db=accounts)
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana\nREGISTER|anapass123\n")
    ana.expect("REGISTER_OK")
    join(ana, "#deploys")
    ana.send(b"QUIT\n")
    ana.wait_closed()
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\n")
    bob.expect("USER_OK")
    join(bob, "#deploys")
    for text in (b"ana: look", b"two"):
        bob.send(b"MSG|#deploys|" + text + b"\n")
        bob.expect("MSG_OK|")
    bob.close()
    server.shutdown()

    again = make_server(db=db, accounts_db=accounts)
    ana = RawClient(again.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana|anapass123\n")
    ana.expect("USER_OK")
    info = rooms_of(ana)["deploys"]
    assert (info.unread, info.mentions, info.joined, info.messages) == (2, 1, False, 2)
    ana.close()


def test_a_database_from_before_rooms_keeps_every_message_in_main(tmp_path):
    path = tmp_path / "v3.db"
    db = sqlite3.connect(path)
    db.create_function("casefold", 1, lambda s: s.casefold() if s is not None else None)
    db.create_function("name_key", 1, lambda s: chatctl.confusable_key(s) if s is not None else None)
    for version in (1, 2, 3):
        db.executescript(chatctl.MIGRATIONS[version])
    db.execute("INSERT INTO messages (id, ts, sender, text, kind) "
               "VALUES (1, 1700000000.0, 'ana', 'old', 'msg')")
    db.execute("INSERT INTO messages (id, ts, sender, sender_key, recipient, recipient_key, text, kind) "
               "VALUES (2, 1700000001.0, 'ana', 'ana', 'bob', 'bob', 'psst', 'dm')")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    store = chatctl.HistoryStore(path)
    assert [(m.text, m.room) for m in store.recent(None, 10, room="main")[0]] == [("old", "main")]
    assert [m.text for m in store.recent("bob", 10)[0]] == ["old", "psst"]
    assert [(r.name, r.messages) for r in store.rooms()] == [("main", 1)]
    store.close()
    server = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=0, db=str(path)))
    try:
        assert server.registry.rooms["main"].messages == 1
    finally:
        server.shutdown()


def test_configured_rooms_exist_at_start_with_their_topics(make_server):
    server = make_server(rooms=chatctl.parse_room_specs(("#deploys: builds and releases", "random")))
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana\n")
    ana.expect("USER_OK")
    info = rooms_of(ana)
    assert set(info) == {"main", "deploys", "random"}
    assert info["deploys"].topic == "builds and releases" and not info["deploys"].joined
    ana.close()


def test_a_dm_goes_to_the_session_addressed_when_it_was_accepted(server, user):
    """The DM-after-rename race: the recipient leaves, a newcomer takes the name before the commit."""
    ana, bob = user("ana", hello=True), user("bob", hello=True)
    gate = threading.Event()
    real_insert = server.history.insert

    def held_insert(batch):  # hold the commit until the name has changed hands
        gate.wait(5)
        real_insert(batch)

    server.history.insert = held_insert
    accepted = server.log.last_id
    ana.send(b"DM|bob|for the old bob only\n")
    wait_until(lambda: server.log.last_id > accepted)  # addressed and numbered; its commit is held
    bob.send(b"QUIT\n")
    bob.wait_closed()
    wait_until(lambda: server.registry.holder(chatctl.confusable_key("bob")) is None)
    newcomer = user("bob", hello=True)
    gate.set()
    ana.expect("MSG_OK|")
    newcomer.send(b"PING|after\n")
    assert newcomer.expect("PONG") == "PONG|after"
    assert not any(line.startswith("DM|") for line in newcomer.seen)


# --- the commands ---------------------------------------------------------------------------

def test_send_history_who_and_rooms_take_a_room(isolated_home, server, user):
    ana = user("ana", hello=True)
    join(ana, "#deploys")
    ana.send(b"TOPIC|#deploys|builds\n")
    ana.expect("TOPIC|")
    port = str(server.port)
    sent = run_cli("send", "-p", port, "-u", "ci", "--room", "#deploys", "--json", "build 42 is green",
                   env=isolated_home)
    assert sent.returncode == 0, sent.stderr
    line = ana.expect("MSG|")
    assert line.startswith(f"MSG|#deploys|{json.loads(sent.stdout)['id']}|")
    assert run_cli("send", "-p", port, "-u", "ci", "main talk", env=isolated_home).returncode == 0
    listing = run_cli("history", "-p", port, "-r", "deploys", "--json", env=isolated_home)
    rows = [json.loads(x) for x in listing.stdout.splitlines()]
    assert [(r["room"], r["text"]) for r in rows] == [("#deploys", "build 42 is green")]
    members = run_cli("who", "-p", port, "--room", "deploys", "--json", env=isolated_home)
    assert [u["name"] for u in json.loads(members.stdout)] == ["ana"]
    rooms = run_cli("rooms", "-p", port, "--json", env=isolated_home)
    found = {r["room"]: r for r in json.loads(rooms.stdout)}
    assert found["#deploys"]["topic"] == "builds" and found["#deploys"]["messages"] == 1
    assert found["#deploys"]["online"] == 1 and found["#main"]["messages"] == 1
    table = run_cli("rooms", "-p", port, env=isolated_home)
    assert "#deploys" in table.stdout and "builds" in table.stdout


@pytest.mark.parametrize("args, code, message", [
    (["send", "-u", "ci", "--room", "nowhere", "hi"], 5, "no room #nowhere"),
    (["send", "-u", "ci", "--room", "Bad Room", "hi"], 2, "is not a room name"),
    (["send", "-u", "ci", "--room", "deploys", "--to", "bob", "hi"], 2, "do not combine"),
    (["history", "--room", "nowhere"], 5, "no room #nowhere"),
    (["who", "--room", "nowhere"], 5, "no room #nowhere"),
])
def test_room_errors_are_one_line_with_an_exit_code(isolated_home, server, args, code, message):
    result = run_cli(*args, "-p", str(server.port), env=isolated_home)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or code == 2


# --- what the attack run found ---------------------------------------------------------------

def test_a_closed_room_keeps_none_of_its_messages_not_even_those_in_flight(server, user, connect):
    ana = user("ana", hello=True)
    ana.send(b"REGISTER|anapass12\n")  # a protected creator may close the room
    ana.expect("REGISTER_OK")
    join(ana, "#tmp")
    ana.send(b"TOPIC|#tmp|temporary\nPART|#tmp\n")
    ana.expect("PART_OK")
    gate = threading.Event()
    real_insert = server.history.insert
    server.history.insert = lambda batch: (gate.wait(5), real_insert(batch))
    bot = connect()
    bot.send(b"HELLO|chatctl/1|quiet\nUSER|bot\n")
    bot.expect("USER_OK")
    accepted = server.log.last_id
    bot.send(b"MSG|#tmp|confidential\n")
    wait_until(lambda: server.log.last_id > accepted)  # accepted; its commit is held
    ana.send(b"CLOSE|#tmp\n")
    threading.Timer(0.3, gate.set).start()
    assert ana.expect("CLOSE_OK", timeout=10) == "CLOSE_OK|#tmp"
    eve = user("eve", hello=True)
    join(eve, "#tmp")  # a new room of the old name
    eve.send(b"HISTORY|#tmp|LAST|50\n")
    assert eve.expect("END|") == "END|HISTORY|0"


def test_presence_lines_keep_the_order_of_the_frames_behind_them(user, connect):
    ana = user("ana", hello=True)
    join(ana, "#x")
    bob = connect()
    bob.send(b"HELLO|chatctl/1\nUSER|bob\nJOIN|#x\nMSG|#x|hi\nTOPIC|#x|new\nPART|#x\nJOIN|#x\nQUIT\n")
    bob.wait_closed()
    wanted = ("JOIN|", "ENTER|", "MSG|", "TOPIC|", "EXIT|", "LEAVE|")
    seen = []
    while not seen or seen[-1] != "LEAVE":
        line = ana.line()
        if line.startswith(wanted):
            seen.append(line.split("|")[0])
    # bob's EXIT and second ENTER may be dropped as stale: LEAVE means out of every room
    assert [x for x in seen if x != "EXIT"] == ["JOIN", "ENTER", "MSG", "TOPIC", "LEAVE"]
    assert seen[-2:] == ["EXIT", "LEAVE"] or "EXIT" not in seen
    assert ana.silent(0.3)


def test_operator_rights_come_from_the_operator_password_not_a_name(make_server):
    server = make_server(operator_password="opensesame", auth_delay=0)
    ana, root = RawClient(server.port), RawClient(server.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana\nJOIN|#anas\nTOPIC|#anas|kept\nPART|#anas\n")
    ana.expect("PART_OK")
    root.send(b"HELLO|chatctl/1\nUSER|root\nREGISTER|rootpass1\nCLOSE|#anas\n")
    root.expect("REGISTER_OK")
    assert root.expect("ERR|").startswith("ERR|not-allowed|")  # a protected name is no operator
    root.send(b"OPER|guess\n")
    assert root.expect("ERR|").startswith("ERR|bad-password|")
    root.send(b"OPER|opensesame\nCLOSE|#anas\n")
    assert root.expect("OPER_OK") == "OPER_OK"
    assert root.expect("CLOSE_OK") == "CLOSE_OK|#anas"


def test_only_a_protected_creator_may_close_their_room(make_server):
    server = make_server(auth_delay=0)
    dave = RawClient(server.port)
    dave.send(b"HELLO|chatctl/1\nUSER|dave\nJOIN|#daves\nTOPIC|#daves|mine\nPART|#daves\n")
    dave.expect("PART_OK")
    dave.send(b"CLOSE|#daves\n")  # unprotected: anyone could take the name and do this
    assert dave.expect("ERR|").startswith("ERR|not-allowed|")
    dave.send(b"REGISTER|davepass1\nJOIN|#protected\nTOPIC|#protected|x\nPART|#protected\nCLOSE|#protected\n")
    assert dave.expect("CLOSE_OK") == "CLOSE_OK|#protected"


def test_one_address_cannot_fill_the_server_with_rooms(make_server):
    server = make_server(room_creations=5)
    squatter = RawClient(server.port)
    squatter.send(b"HELLO|chatctl/1\nUSER|sq\n")
    squatter.expect("USER_OK")
    join(squatter, *(f"#sq{i}" for i in range(5)))
    squatter.send(b"JOIN|#sq5\n")
    assert squatter.expect("ERR|").startswith("ERR|rate-limited|")
    for i in range(5):  # a room nobody used (no message, no topic) is forgotten when it empties
        squatter.send(f"PART|#sq{i}\n".encode())
        squatter.expect("PART_OK")
    assert not any(name.startswith("sq") for name in rooms_of(squatter))


def test_the_rooms_reply_is_paged_to_fit_the_sendq(make_server):
    server = make_server(sendq=16384, rate=0)
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana\n")
    ana.expect("USER_OK")
    topic = "t" * 300
    for i in range(40):
        ana.send(f"JOIN|#r{i:02}\nTOPIC|#r{i:02}|{topic}\nPART|#r{i:02}\n".encode())
        ana.expect("PART_OK")
    ana.send(b"ROOMS\n")
    size, names = 0, []
    while not (line := ana.line()).startswith("END|"):
        size += len(line) + 1
        names.append(chatctl.parse_event(line).name)
    assert line.startswith("END|ROOMS|") and line.endswith("|more") and size <= 16384 // 4
    ana.send(f"ROOMS|#{names[-1]}\n".encode())
    assert chatctl.parse_event(ana.line()).name > names[-1]
    everything = chatctl.ChatConnection("127.0.0.1", server.port)
    everything.hello()
    assert len(everything.rooms()) == 41  # the client pages through: every room, #main included
    everything.close()


def test_a_room_name_is_ascii_before_it_is_lower_case(user):
    ana = user("ana", hello=True)
    ana.send("JOIN|#\u212a\n".encode())  # the Kelvin sign lower-cases to k
    assert ana.expect("ERR|").startswith("ERR|invalid-room|")


def test_a_crowd_entering_at_once_hears_each_entry_once_after_its_own_names(make_server):
    """Each member hears the ENTER of those after it, never of those already in its NAMES."""
    from conftest import register_many

    server = make_server(max_per_address=0, rate=0)
    crowd = [f"c{i}" for i in range(120)]
    clients = register_many(server.port, crowd, hello=True, timeout=30)
    for client in clients:  # all at once: their ENTERs go out together
        client.send(b"JOIN|#crowd\n")
    names: dict[str, set[str]] = {}
    for name, client in zip(crowd, clients, strict=True):
        while not (line := client.line()).startswith("JOIN_OK|"):
            event = chatctl.parse_event(line)
            if isinstance(event, chatctl.RoomNames) and event.room == "crowd":
                names[name] = {u.name for u in event.users}
    late = register_many(server.port, ["late"], hello=True)[0]
    join(late, "#crowd")  # its ENTER comes after every other: the end of each member's presence lines
    for name, client in zip(crowd, clients, strict=True):
        heard = []
        while True:
            event = chatctl.parse_event(client.line(timeout=10))
            if isinstance(event, chatctl.Entered) and event.room == "crowd":
                if event.name == "late":
                    break
                heard.append(event.name)
        assert not names[name] & set(heard), (name, sorted(names[name] & set(heard)))
        assert len(heard) == len(set(heard)) and names[name] | set(heard) == set(crowd), name


def test_a_name_that_left_and_came_back_within_one_batch_stays_in_a_joiners_list(make_server, monkeypatch):
    monkeypatch.setattr(chatctl, "PRESENCE_INTERVAL", 0.5)  # all of it in one batch of presence lines
    server = make_server(max_per_address=0, rate=0)
    stays = chatctl_user_in(server.port, "yy", "#reuse")
    first = chatctl_user_in(server.port, "xx", "#reuse")
    joiner = chatctl_user_in(server.port, "jj")
    first.send(b"QUIT|back soon\n")
    first.wait_closed()
    again = chatctl_user_in(server.port, "xx", "#reuse")  # the name again, at once (as a reconnect)
    view: set[str] = set()
    for line in join(joiner, "#reuse"):
        event = chatctl.parse_event(line)
        if isinstance(event, chatctl.RoomNames):
            view = {u.name for u in event.users}
    assert view == {"yy", "xx", "jj"}
    late = chatctl_user_in(server.port, "late", "#reuse")  # its ENTER comes after the rest of the batch
    while True:
        event = chatctl.parse_event(joiner.line(timeout=10))
        if isinstance(event, chatctl.Left):
            view.discard(event.name)
        elif isinstance(event, chatctl.Entered) and event.room == "reuse":
            view.add(event.name)
            if event.name == "late":
                break
        elif isinstance(event, chatctl.Exited) and event.room == "reuse":
            view.discard(event.name)
    assert view == {"yy", "xx", "jj", "late"}
    for client in (stays, again, late, joiner):
        client.close()


def chatctl_user_in(port: int, name: str, *rooms: str) -> RawClient:
    """A chatctl/1 client registered as ``name``, in ``rooms``."""
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1\nUSER|{name}\n".encode())
    client.expect("USER_OK")
    if rooms:
        join(client, *rooms)
    return client
