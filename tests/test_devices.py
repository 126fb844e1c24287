"""Accounts on several devices at once: one member to the others, its rooms, messages, DMs and read
state shared by its devices, the device cap, DEVICES and LOGOUT."""

from __future__ import annotations

import json
import re

from test_irc import IrcClient

import chatctl
from conftest import RawClient, Tmux, binary, protected_name, run_cli, wait_until

PASSWORD = "correct horse"


def device(port: int, name: str = "ana", password: str = PASSWORD, options: str = "") -> RawClient:
    """One more connection of ``name``, proved with its password (USER_OK read)."""
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1{options}\nUSER|{name}|{password}\n".encode())
    client.expect("USER_OK")
    return client


def member(port: int, name: str) -> RawClient:
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1|bots\nUSER|{name}\n".encode())
    client.expect("USER_OK")
    return client


def test_an_account_on_two_devices_is_one_member_to_the_others(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    bob = member(server.port, "bob")
    laptop = device(server.port)
    assert bob.expect("JOIN|").endswith("|ana")
    heard = len(bob.seen)
    phone = device(server.port)
    bob.send(b"DIR\nNAMES|#main\n")
    users = bob.expect("USERS|")
    assert [entry.split(" ")[0] for entry in users.split("|")[1:]] == ["bob", "ana"]
    assert users.split("|")[2].endswith(" devices=2")  # (a client that asked for marks hears how many)
    names = bob.expect("NAMES|")
    assert [entry.split(" ")[0] for entry in names.split("|")[2:]] == ["bob", "ana"]
    phone.send(b"QUIT\n")
    phone.wait_closed()
    bob.send(b"PING|after the phone\n")
    bob.expect("PONG|after the phone")
    assert not any(line.startswith(("JOIN|", "LEAVE|")) for line in bob.seen[heard:])  # the phone: unheard
    laptop.send(b"QUIT\n")
    assert bob.expect("LEAVE|").split("|")[2] == "ana"  # the last device gone: ana left


def test_what_one_device_sends_shows_on_the_others_and_a_dm_reaches_every_device(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop, phone = device(server.port), device(server.port)
    bob = member(server.port, "bob")
    laptop.send(b"MSG|from the laptop\n")
    assert laptop.expect("MSG_OK|")
    assert phone.expect("MSG|").endswith("|ana|from the laptop")  # ana's own message, on her phone
    assert bob.expect("MSG|").endswith("|ana|from the laptop")
    bob.send(b"DM|ana|to every device\n")
    assert laptop.expect("DM|").endswith("|bob|ana|to every device")
    assert phone.expect("DM|").endswith("|bob|ana|to every device")
    phone.send(b"DM|bob|sent from the phone\n")
    assert phone.expect("MSG_OK|")
    assert laptop.expect("DM|").endswith("|ana|bob|sent from the phone")  # her DM, on her laptop too
    assert bob.expect("DM|").endswith("|ana|bob|sent from the phone")
    bob.send(b"PING|done\n")
    bob.expect("PONG|done")
    assert sum(line.endswith("to every device") or line.endswith("from the laptop") for line in bob.seen) == 1


def test_rooms_are_the_accounts_and_each_device_is_told(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    bob = member(server.port, "bob")
    bob.send(b"JOIN|#ops\n")
    bob.expect("JOIN_OK|#ops")
    laptop, phone = device(server.port), device(server.port)
    laptop.send(b"JOIN|#ops\n")
    assert laptop.expect("NAMES|#ops|")
    laptop.expect("JOIN_OK|#ops")
    names = phone.expect("NAMES|#ops|")  # the phone did not ask: it is told, as if it had
    assert [entry.split(" ")[0] for entry in names.split("|")[2:]] == ["bob", "ana"]
    phone.expect("JOIN_OK|#ops")
    assert bob.expect("ENTER|#ops|").endswith("|ana")
    tablet = device(server.port)  # a device that comes later is in the account's rooms at once
    tablet.expect("JOIN_OK|#ops")
    phone.send(b"MSG|#ops|from the phone\n")
    assert laptop.expect("MSG|#ops|").endswith("|ana|from the phone")
    assert tablet.expect("MSG|#ops|").endswith("|ana|from the phone")
    phone.send(b"PART|#ops\n")
    phone.expect("PART_OK|#ops")
    laptop.expect("PART_OK|#ops")
    tablet.expect("PART_OK|#ops")
    assert bob.expect("EXIT|#ops|").split("|")[3] == "ana"
    bob.send(b"MSG|#ops|anyone?\nPING|x\n")
    bob.expect("PONG|x")
    assert sum(line.startswith(("ENTER|", "EXIT|")) for line in bob.seen) == 2  # once each, not per device
    laptop.send(b"PING|y\n")
    laptop.expect("PONG|y")
    assert not any("anyone?" in line for line in laptop.seen)  # out of #ops on every device


def test_reading_on_one_device_clears_the_unread_count_on_the_others(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop, phone = device(server.port), device(server.port)
    bob = member(server.port, "bob")
    for n in range(3):
        bob.send(f"MSG|ana: news {n}\n".encode())
        bob.expect("MSG_OK|")
    last = int(phone.expect("MSG|#main|").split("|")[2])
    last = max(last, *(int(phone.expect("MSG|#main|").split("|")[2]) for _ in range(2)))
    phone.send(b"ROOMS\n")
    assert phone.expect("ROOM|#main|").split("|")[5:7] == ["3", "3"]  # unread, mentions
    laptop.send(f"MARK|#main|{last}\n".encode())
    assert laptop.expect("MARK_OK|") == f"MARK_OK|#main|{last}"
    assert phone.expect("MARK_OK|") == f"MARK_OK|#main|{last}"  # told at once, unasked
    phone.send(b"ROOMS\n")
    assert phone.expect("ROOM|#main|").split("|")[5:7] == ["0", "0"]


def test_the_device_cap_refuses_the_next_device_and_a_free_name_stays_one_connection(make_server):
    server = make_server(auth_delay=0, max_devices=2)
    protected_name(server.port, "ana", PASSWORD)
    online = [device(server.port), device(server.port)]  # (kept: a socket collected would leave)
    third = RawClient(server.port)
    third.send(f"HELLO|chatctl/1\nUSER|ana|{PASSWORD}\n".encode())
    error = third.expect("ERR|")
    assert error.startswith("ERR|too-many-devices|ana is online from 2 devices")
    online[1].send(b"QUIT\n")
    online[1].wait_closed()
    third.send(f"USER|ana|{PASSWORD}\n".encode())  # a place is free again
    assert third.expect(("USER_OK", "ERR|")) == "USER_OK"
    bob = member(server.port, "bob")  # noqa: F841 (online: a name nobody protects)
    again = RawClient(server.port)
    again.send(b"USER|bob\n")
    assert again.expect("ERR|").startswith("ERR|name-taken|")


def test_devices_lists_them_and_logout_needs_the_password(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop = device(server.port, options="|client=join")
    phone = device(server.port, options="|client=tui")
    laptop.send(b"DEVICES\n")
    rows = [laptop.expect("DEVICE|"), laptop.expect("DEVICE|")]
    assert laptop.expect("END|") == "END|DEVICES|2"
    assert [row.split("|")[2:4] for row in rows] == [["join", "127.0.0.1"], ["tui", "127.0.0.1"]]
    assert [row.split("|")[6] for row in rows] == ["1", "0"]  # which one asked
    phone_number = rows[1].split("|")[1]
    bob = member(server.port, "bob")
    bob.send(b"DEVICES\n")
    assert bob.expect("ERR|").startswith("ERR|not-owner|")  # nobody else's devices are shown
    bob.send(f"LOGOUT|{phone_number}|{PASSWORD}\n".encode())
    assert bob.expect("ERR|").startswith("ERR|not-owner|")
    laptop.send(f"LOGOUT|{phone_number}|wrong password\n".encode())
    assert laptop.expect("ERR|").startswith("ERR|bad-password|")
    laptop.send(f"LOGOUT|99999|{PASSWORD}\n".encode())
    assert laptop.expect("ERR|").startswith("ERR|unknown-device|")
    laptop.send(f"LOGOUT|{phone_number}|{PASSWORD}\n".encode())
    assert laptop.expect("LOGOUT_OK|") == "LOGOUT_OK|1"
    assert phone.wait_closed()[-1].startswith("BYE|logged out by ana's device")
    laptop.send(b"DEVICES\n")
    assert laptop.expect("END|") == "END|DEVICES|1"


def test_chatctl_devices_lists_an_accounts_devices_for_its_owner(make_server, isolated_home):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    phone = device(server.port, options="|client=tui")  # noqa: F841 (online while the CLI asks)
    env = {**isolated_home, "CHATCTL_USER_PASSWORD": PASSWORD}
    listed = run_cli("devices", "-p", str(server.port), "-u", "ana", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["kind"], row["address"]) for row in rows] == [("tui", "127.0.0.1")]
    table = run_cli("devices", "-p", str(server.port), "-u", "ana", env=env)
    assert "tui" in table.stdout and "127.0.0.1" in table.stdout
    wrong = run_cli("devices", "-p", str(server.port), "-u", "ana",
                    env={**isolated_home, "CHATCTL_USER_PASSWORD": "not it at all"})
    assert wrong.returncode == chatctl.EXIT_REJECTED
    assert "wrong password" in wrong.stderr and "Traceback" not in wrong.stderr
    who = run_cli("who", "-p", str(server.port), "--json", env=isolated_home)
    assert [(u["name"], u["devices"]) for u in json.loads(who.stdout)] == [("ana", 1)]
    laptop = device(server.port)  # noqa: F841 (a second device)
    who = run_cli("who", "-p", str(server.port), "--json", env=isolated_home)
    assert [(u["name"], u["devices"]) for u in json.loads(who.stdout)] == [("ana", 2)]
    assert "ana (2 devices)" in run_cli("who", "-p", str(server.port), env=isolated_home).stdout
    ended = run_cli("devices", "-p", str(server.port), "-u", "ana", "--logout", "others", env=env)
    assert ended.returncode == 0, ended.stderr
    assert "logged out 2 device(s) of ana" in ended.stderr  # (the CLI's own connection is no device)
    wait_until(lambda: not server.registry.devices("ana"))
    bad = run_cli("devices", "-p", str(server.port), "-u", "ana", "--logout", "phone", env=env)
    assert bad.returncode == chatctl.EXIT_USAGE and "'others'" in bad.stderr


def test_an_irc_device_gets_the_accounts_rooms_and_its_messages_as_its_own(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop = device(server.port)
    laptop.send(b"JOIN|#ops\n")
    laptop.expect("JOIN_OK|#ops")
    irc = IrcClient(server.port)
    try:
        irc.register("ana", caps="sasl", sasl=("ana", PASSWORD))
        irc.expect(r"^:ana!\S+ JOIN #ops$")  # the account's room, joined for it
        irc.expect(r" 366 ana #ops ")
        laptop.send(b"MSG|#ops|typed on the laptop\n")
        irc.expect(r"^:ana!\S+ PRIVMSG #ops :typed on the laptop$")  # its own message, echo or not
        irc.send("PRIVMSG #ops :typed on the phone")
        assert laptop.expect("MSG|#ops|").endswith("|ana|typed on the phone")
        irc.send("PART #ops")
        irc.expect(r"^:ana!\S+ PART #ops")
        laptop.expect("PART_OK|#ops")
        bob = member(server.port, "bob")
        bob.send(b"DM|ana|hi both\n")
        irc.expect(r"^:bob!\S+ PRIVMSG ana :hi both$")
        assert laptop.expect("DM|").endswith("|bob|ana|hi both")
        laptop.send(b"DEVICES\n")
        kinds = {laptop.expect("DEVICE|").split("|")[2] for _ in range(2)}
        assert kinds == {"chatctl", "irc"}
    finally:
        irc.close()


def test_dropping_the_protection_ends_the_other_devices(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop, phone = device(server.port), device(server.port)
    laptop.send(f"UNREGISTER|{PASSWORD}\n".encode())
    laptop.expect("UNREGISTER_OK|ana")
    assert phone.wait_closed()[-1].startswith("BYE|logged out")
    wait_until(lambda: [u.devices for u in server.users()] == [1])
    assert re.fullmatch(r"ana", server.users()[0].name)


def test_one_person_on_join_tui_and_irssi_at_once(make_server, spawn_join, isolated_home, tmux_env, tmp_path):
    """ana on a laptop (join), in tmux (tui) and on a phone's IRC app (irssi, with SASL) at once."""
    from test_tui import client_config, connected, room_list, run, until

    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    bob = member(server.port, "bob")
    irssi = Tmux("irssi-ana", [binary("irssi"), f"--home={tmp_path / 'irssi'}"], tmux_env)
    try:
        irssi.wait_for("Irssi")
        irssi.keys(f"/network add -sasl_username ana -sasl_password '{PASSWORD}' -sasl_mechanism plain team",
                   "Enter")
        irssi.keys(f"/server add -network team 127.0.0.1 {server.port}", "Enter")
        irssi.keys("/connect team", "Enter")
        wait_until(lambda: len(server.registry.devices("ana")) == 1, timeout=20)
        isolated_home["CHATCTL_USER_PASSWORD"] = PASSWORD
        laptop = spawn_join("ana", server.port)

        async def scenario(app, pilot):
            await connected(app, pilot)
            assert len(server.registry.devices("ana")) == 3
            bob.send(b"PING|all three\n")
            bob.expect("PONG|all three")
            assert [line for line in bob.seen if line.startswith("JOIN|")] == [bob.seen[2]]  # one JOIN
            assert bob.seen[2].endswith("|ana")

            irssi.keys("/window goto #main", "Enter")
            laptop.sendline("hello from the laptop")
            assert bob.expect("MSG|").endswith("|ana|hello from the laptop")
            irssi.wait_for("hello from the laptop")
            await until(pilot, lambda: "hello from the laptop" in "\n".join(
                strip.text for strip in app.query_one("#log").lines), "the laptop's line in tui")

            bob.send(b"DM|ana|psst, all of you\n")
            laptop.expect("psst, all of you")
            wait_until(lambda: irssi.keys("/window goto bob", "Enter") or "psst, all" in irssi.screen())
            await until(pilot, lambda: any("@bob" in r for r in room_list(app)), "a conversation with bob")

            await pilot.press(*"/join #ops", "enter")  # joined on the tui: on every device
            laptop.expect("in #ops: ")
            wait_until(lambda: all("ops" in d.rooms for d in server.registry.devices("ana")))
            await until(pilot, lambda: app.chat.model.current == "ops", "tui in #ops")
            laptop.sendline("/join #ops")  # (in #ops already, from the tui: it switches there)
            laptop.expect("now in #ops")
            bob.send(b"MSG|ana: are you there?\n")
            await until(pilot, lambda: app.chat.model.unread().get("main", (0, 0)) == (1, 1), "unread in tui")
            laptop.sendline("/join #main")  # read on the laptop, so read on every device
            laptop.expect("are you there")
            await until(pilot, lambda: app.chat.model.unread().get("main", (0, 0)) == (0, 0),
                        "tui's unread cleared by the laptop's reading", timeout=10)

            laptop.sendline("/devices")
            laptop.expect(r"ana is online from 3 device\(s\)")
            laptop.expect("irc")
            laptop.expect("join")
            laptop.expect("tui")
            laptop.sendline("/logout others")
            laptop.expect("to log out your other devices, the password of ana:")  # asked again, hidden
            laptop.sendline(PASSWORD)
            laptop.expect(r"logged out 2 device\(s\)")
            await until(pilot, lambda: app.chat.session.ended, "tui logged out")
            assert "logged out by ana's device" in str(app.chat.session.end_error)
            assert app.chat.session.end_error.exit_code == chatctl.EXIT_REJECTED
            wait_until(lambda: len(server.registry.devices("ana")) == 1)
            assert server.registry.devices("ana")[0].client_kind == "join"

        run(scenario, client_config(server.port, user_password=PASSWORD))
        assert [line for line in bob.seen if line.startswith("LEAVE|")] == []  # ana never left
    finally:
        irssi.close()


def irc_device(port: int, login: str, caps: str = "sasl server-time") -> IrcClient:
    client = IrcClient(port)
    client.register("ana", caps=caps, sasl=(login, PASSWORD))
    return client


def test_a_named_irc_device_gets_exactly_what_it_missed_across_a_restart(make_server, tmp_path):
    db, accounts = str(tmp_path / "history.db"), str(tmp_path / "accounts.db")
    server = make_server(auth_delay=0, db=db, accounts_db=accounts)
    protected_name(server.port, "ana", PASSWORD)
    bob = member(server.port, "bob")
    bob.send(b"MSG|before the phone left\n")
    bob.expect("MSG_OK|")
    laptop = device(server.port)  # (online, so that a direct message to ana is taken)
    phone = irc_device(server.port, "ana@phone")
    phone.send("QUIT :pocket")
    wait_until(lambda: len(server.registry.devices("ana")) == 1)
    for n in range(5):
        bob.send(f"MSG|missed {n}\n".encode())
        bob.expect("MSG_OK|")
    bob.send(b"DM|ana|missed dm\n")
    bob.expect("MSG_OK|")
    bob.close()
    laptop.close()
    server.shutdown()
    server = make_server(auth_delay=0, db=db, accounts_db=accounts)
    bob = member(server.port, "bob")
    for n in range(5, 9):
        bob.send(f"MSG|missed {n}\n".encode())
        bob.expect("MSG_OK|")
    phone = irc_device(server.port, "ana@phone")
    notice = phone.expect(r"NOTICE ana :#main: (\d+) line\(s\) and 1 direct message\(s\) you missed on this "
                          r"device \(the first at \d\d:\d\d UTC\)").group(1)
    got = [line for line in phone.seen if " PRIVMSG " in line]
    assert [line.rsplit(":", 1)[1] for line in got] == [*(f"missed {n}" for n in range(5)), "missed dm",
                                                         *(f"missed {n}" for n in range(5, 9))]
    assert notice == "9" and all(line.startswith("@time=") for line in got)
    phone.close()
    other = irc_device(server.port, "ana/tablet")  # a device never here before: the last lines, as anyone
    other.send("PING :x")
    other.expect(r"PONG")
    assert not any("you missed" in line for line in other.seen)
    other.close()


def test_irc_read_markers_follow_the_account(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop = device(server.port)
    bob = member(server.port, "bob")
    bob.send(b"MSG|read me\n")
    mid = int(bob.expect("MSG_OK|").split("|")[1])
    phone = irc_device(server.port, "ana@phone", caps="sasl server-time message-tags draft/read-marker")
    assert "MARKREAD #main timestamp=" in "\n".join(phone.seen)  # told on joining
    laptop.send(f"MARK|#main|{mid}\n".encode())
    stamp = phone.expect(r"MARKREAD #main timestamp=(\S+)").group(1)
    assert stamp.endswith("Z")
    bob.send(b"MSG|and me\n")
    phone.expect(r"PRIVMSG #main :and me")
    newer = phone.seen[-1].split("time=")[1].split(";")[0].split(" ")[0]
    phone.send(f"MARKREAD #main timestamp={newer}")
    assert phone.expect(r"MARKREAD #main timestamp=(\S+)").group(1) == newer
    assert laptop.expect("MARK_OK|").startswith("MARK_OK|#main|")  # set on the phone: the laptop is told
    phone.send("MARKREAD #nowhere")
    phone.expect(r"FAIL MARKREAD INVALID_PARAMS #nowhere")
    phone.close()


def test_reading_a_conversation_on_one_device_marks_it_read_on_the_others(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop, phone = device(server.port), device(server.port)
    bob = member(server.port, "bob")
    bob.send(b"DM|ana|are you free?\n")
    mid = int(bob.expect("MSG_OK|").split("|")[1])
    laptop.expect("DM|")
    laptop.send(f"MARK|@bob|{mid}\n".encode())
    assert laptop.expect("MARK_OK|") == f"MARK_OK|@bob|{mid}"
    assert phone.expect("MARK_OK|") == f"MARK_OK|@bob|{mid}"
    laptop.send(b"MARK|@not a name|1\n")
    assert laptop.expect("ERR|").startswith("ERR|invalid-name|")


def test_a_conversation_read_on_another_device_has_no_unread_lines_left():
    model = chatctl.RoomsModel()
    model.arrived("@bob", 41, mention=True, create=True)
    model.arrived("@bob", 42, mention=True, create=True)
    assert model.unread()["@bob"] == (2, 2)
    model.read_upto("@bob", 41)  # not all of it: still unread (how many is not known: kept)
    assert model.unread()["@bob"] == (2, 2)
    model.read_upto("@bob", 42)
    assert model.unread()["@bob"] == (0, 0)


def test_a_tui_that_comes_later_shows_the_rooms_the_account_is_in(make_server):
    from test_tui import client_config, connected, room_list, run, until

    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop = device(server.port)
    laptop.send(b"JOIN|#ops\nTOPIC|#ops|the ops room\n")
    laptop.expect("JOIN_OK|#ops")

    async def scenario(app, pilot):
        await connected(app, pilot)
        await until(pilot, lambda: any("#ops" in r for r in room_list(app)), "#ops in the room list")
        assert app.chat.model.topic("ops") == "the ops room"
        laptop.send(b"PART|#ops\n")
        await until(pilot, lambda: not any("#ops" in r for r in room_list(app)), "#ops gone from the list")

    run(scenario, client_config(server.port, user_password=PASSWORD))


def test_rooms_count_people_not_devices_and_a_script_of_the_name_sees_its_rooms(make_server, isolated_home):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop, phone = device(server.port), device(server.port)  # noqa: F841 (both online)
    laptop.send(b"JOIN|#ops\n")
    laptop.expect("JOIN_OK|#ops")
    bob = member(server.port, "bob")
    bob.send(b"ROOMS\n")
    rows = {bob.expect("ROOM|").split("|")[1]: None for _ in range(2)}
    bob.send(b"ROOMS\n")
    online = {line.split("|")[1]: line.split("|")[3] for line in (bob.expect("ROOM|"), bob.expect("ROOM|"))}
    assert set(rows) == {"#main", "#ops"} and online == {"#main": "2", "#ops": "1"}
    env = {**isolated_home, "CHATCTL_USER_PASSWORD": PASSWORD}
    listed = run_cli("rooms", "-p", str(server.port), "-u", "ana", "--json", env=env)
    assert {r["room"]: r["joined"] for r in json.loads(listed.stdout)} == {"#main": True, "#ops": True}


def test_a_device_left_logged_in_cannot_take_the_account_over(make_server):
    """Someone who finds one of ana's devices logged in cannot change her password, drop its
    protection, or end her other devices without knowing the password."""
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    found, hers = device(server.port), device(server.port)
    found.send(b"REGISTER|stolen-pass-99\n")
    assert found.expect("ERR|").startswith("ERR|missing-argument|your name is protected")
    found.send(b"REGISTER|stolen-pass-99|a guess at it\n")
    assert found.expect("ERR|").startswith("ERR|bad-password|")
    found.send(b"UNREGISTER\n")
    assert found.expect("ERR|").startswith("ERR|missing-argument|")
    found.send(b"UNREGISTER|another guess\n")
    assert found.expect("ERR|").startswith("ERR|bad-password|")
    found.send(b"LOGOUT|others|stolen-pass-99\n")
    assert found.expect("ERR|").startswith("ERR|bad-password|")
    hers.send(b"PING|still mine\n")
    assert hers.expect("PONG|") == "PONG|still mine"
    hers.send(f"REGISTER|a-new-password|{PASSWORD}\n".encode())  # the owner, who knows it, can
    assert hers.expect(("REGISTER_OK|", "ERR|")) == "REGISTER_OK|ana"
    again = RawClient(server.port)
    again.send(b"USER|ana|a-new-password\n")
    assert again.expect(("USER_OK", "ERR|")) == "USER_OK"


def test_devices_logging_in_at_once_are_not_locked_out(make_server):
    """The password limit counts wrong passwords: ten right ones at once (a phone, a laptop and a
    tmux reconnecting together after a restart, behind one address) all get in."""
    server = make_server(auth_delay=0, auth_max_failures=3)
    protected_name(server.port, "ana", PASSWORD)
    clients = [RawClient(server.port) for _ in range(8)]
    for client in clients:
        client.send(f"USER|ana|{PASSWORD}\n".encode())
    answers = [client.expect(("USER_OK", "ERR|")) for client in clients]
    assert answers == ["USER_OK"] * 8
    assert len(server.registry.devices("ana")) == 8


def test_a_named_device_back_after_many_lines_gets_the_newest_and_is_told_of_the_rest(make_server):
    server = make_server(auth_delay=0, rate=0)
    protected_name(server.port, "ana", PASSWORD)
    phone = irc_device(server.port, "ana@phone")
    phone.send("QUIT :pocket")
    wait_until(lambda: not server.registry.devices("ana"))
    dan = member(server.port, "dan")
    dan.send(b"JOIN|#deploys\n")
    dan.expect("JOIN_OK|#deploys")
    ids = []
    for n in range(150):
        dan.send(f"MSG|line {n}\n".encode())
        ids.append(int(dan.expect("MSG_OK|").split("|")[1]))
    for n in range(30):
        dan.send(f"MSG|#deploys|deploy {n}\n".encode())
        dan.expect("MSG_OK|")
    phone = irc_device(server.port, "ana@phone")
    notice = phone.expect(r"NOTICE ana :#main: the last (\d+) line\(s\) you missed on this device "
                          r"\(the first at \S+ UTC\); more came before them "
                          r"\(chatctl history --before (\d+)\)")
    got = [line.rsplit(":", 1)[1] for line in phone.seen if " PRIVMSG #main " in line]
    assert got == [f"line {n}" for n in range(150 - len(got), 150)] and len(got) == int(notice.group(1))
    assert int(notice.group(2)) == ids[150 - len(got)]  # the history has the ones before, from there on
    phone.send("JOIN #deploys")  # no other device of ana was online: she joins it herself
    phone.expect(r"NOTICE ana :#deploys: 30 line\(s\) you missed on this device")
    assert [line.rsplit(":", 1)[1] for line in phone.seen if " PRIVMSG #deploys " in line] == \
        [f"deploy {n}" for n in range(30)]
    phone.close()


def test_a_client_of_the_seeds_protocol_as_a_device_gets_only_what_it_understands(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    seed = RawClient(server.port)
    seed.send(f"USER|ana|{PASSWORD}\n".encode())
    assert seed.line() == "USER_OK"
    laptop = device(server.port)
    bob = member(server.port, "bob")
    laptop.send(b"JOIN|#deploys\nMSG|#deploys|in deploys\nDM|bob|a word\nMARK|#main|1\nPART|#deploys\n")
    laptop.expect("PART_OK|#deploys")
    bob.send(b"MSG|hello ana\n")
    assert seed.line() == "bob: hello ana"  # the seed's form, of #main's lines only
    assert seed.silent(0.3)


def test_the_others_hear_only_that_a_device_was_logged_out(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    laptop = device(server.port)
    bob = member(server.port, "bob")
    script = RawClient(server.port)  # the owner's chatctl devices --logout others, from elsewhere
    script.send(f"HELLO|chatctl/1|quiet\nUSER|ana|{PASSWORD}\nLOGOUT|others|{PASSWORD}\n".encode())
    assert script.expect("LOGOUT_OK|") == "LOGOUT_OK|1"
    assert laptop.wait_closed()[-1] == "BYE|logged out by ana (chatctl devices at 127.0.0.1)"
    assert bob.expect("LEAVE|").split("|")[2:] == ["ana", "logged out"]


def test_two_devices_logging_each_other_out_at_once_leave_one(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)

    def outcome(client: RawClient) -> str:
        try:
            return client.expect(("LOGOUT_OK|", "BYE|"))[:3]
        except EOFError:
            return "BYE"

    for _ in range(5):
        one, two = device(server.port), device(server.port)
        frame = f"LOGOUT|others|{PASSWORD}\n".encode()
        one.send(frame), two.send(frame)
        outcomes = sorted([outcome(one), outcome(two)])
        assert outcomes == ["BYE", "LOG"]  # one was logged out, the other was told it did it
        survivor = one if outcome_of(one) else two
        assert survivor.silent(0.5)  # and the other's LOGOUT, checked meanwhile, did not end it
        assert len(server.registry.devices("ana")) == 1
        one.close(), two.close()
        wait_until(lambda: not server.registry.devices("ana"))


def outcome_of(client: RawClient) -> bool:
    """Whether ``client`` got LOGOUT_OK (it is the one still connected)."""
    return any(line.startswith("LOGOUT_OK|") for line in client.seen)


def test_join_asks_for_the_password_again_to_change_or_drop_it(make_server, spawn_join, isolated_home):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    isolated_home["CHATCTL_USER_PASSWORD"] = PASSWORD
    laptop = spawn_join("ana", server.port)
    laptop.sendline("/register")
    laptop.expect("current password for ana:")
    laptop.sendline("not the password")
    laptop.expect("new password for your name:")
    laptop.sendline("a-new-password")
    laptop.expect("the same again:")
    laptop.sendline("a-new-password")
    laptop.expect(r"wrong password for 'ana' \(bad-password\)")
    laptop.sendline("/unregister")
    laptop.expect("to drop the protection of your name, the password of ana:")
    laptop.sendline(PASSWORD)
    laptop.expect("no longer protected")


def test_chatctl_register_at_a_terminal_asks_the_current_password_first(make_server, isolated_home):
    import sys

    import pexpect

    from conftest import CHATCTL

    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", PASSWORD)
    child = pexpect.spawn(sys.executable, [*CHATCTL[1:], "register", "-u", "ana", "-p", str(server.port)],
                          env=isolated_home, encoding="utf-8", timeout=15)
    try:
        child.expect("Current password for ana")
        child.sendline(PASSWORD)
        child.expect("New password for ana")
        child.sendline("a-new-password")
        child.expect("Repeat for confirmation")
        child.sendline("a-new-password")
        child.expect("ana is now protected")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    again = RawClient(server.port)
    again.send(b"USER|ana|a-new-password\n")
    assert again.expect(("USER_OK", "ERR|")) == "USER_OK"
