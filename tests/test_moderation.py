"""Private rooms and moderation: a private room is nothing to a non-member however it asks (our protocol,
the CLI, IRC, a webhook, after a restart, a look-alike name); owners, operators and server operators kick,
ban, mute, lock topics and delete, each kept in the audit log; nobody reaches the owner."""

from __future__ import annotations

import json

import pytest
from test_irc import IrcClient

import chatctl
from conftest import RawClient, http_request, login, protected_name, run_cli, wait_until

OPERATOR = "op-secret-77"


@pytest.fixture
def moderated(make_server):
    """A server with an operator password, no password delays, and protected ana, bob and carl."""
    server = make_server(operator_password=OPERATOR, auth_delay=0, irc=True)
    for name in ("ana", "bob", "carl"):
        protected_name(server.port, name, f"password-{name}")
    return server


def account(port: int, name: str) -> RawClient:
    """``name`` logged in with its password (``password-<name>``)."""
    return login(port, name, f"password-{name}")


def guest(port: int, name: str) -> RawClient:
    """A free name."""
    return login(port, name)


def answer(client: RawClient, line: str) -> str:
    """The first line a request gets that is not someone's presence or message, or news of moderation."""
    client.send(line.encode() + b"\n")
    while True:
        got = client.line()
        if not got.startswith(("JOIN|", "LEAVE|", "ENTER|", "EXIT|", "MODERATED|", "MSG|", "ME|", "DM|")):
            return got


def acted(client: RawClient, line: str, action: str) -> list[str]:
    """Send a moderation request; once done, its MODERATED line (fields after the room) comes back to its
    sender (a member of the room): returns those fields."""
    client.send(line.encode() + b"\n")
    while (fields := client.expect("MODERATED|").split("|"))[4] != action:
        pass
    return fields[3:]


def joined(client: RawClient, room: str) -> bool:
    """Ask to join ``room``: whether it worked (its reply read to its end)."""
    client.send(f"JOIN|#{room}\n".encode())
    return client.expect(("JOIN_OK|", "ERR|")).startswith("JOIN_OK|")


def test_a_private_room_is_nothing_to_a_non_member_however_it_asks(moderated, isolated_home):
    port = moderated.port
    ana, eve = account(port, "ana"), guest(port, "eve")
    ana.send(b"JOIN|#hiring|+i\nTOPIC|#hiring|offers and interviews\n")
    ana.expect("JOIN_OK|#hiring")
    ana.send(b"MSG|#hiring|the offer for carl is 100k\n")
    ana.expect("MSG_OK|")
    nothing = "ERR|unknown-room|there is no room #hiring"
    for line in ("NAMES|#hiring", "TOPIC|#hiring", "HISTORY|#hiring|LAST|10", "SEARCH|#hiring|10|offer",
                 "MSG|#hiring|hello?", "MARK|#hiring|1", "MODE|#hiring", "CLOSE|#hiring",
                 "KICK|#hiring|ana", "INVITE|#hiring|eve", f"REACT|{1}|👍"):
        got = answer(eve, line)
        no_message = "ERR|unknown-message|no message 1 in your rooms or direct messages"
        assert got in (nothing, no_message), (line, got)
    assert answer(eve, "ROOMS").startswith("ROOM|#main|") and eve.expect("END|ROOMS") == "END|ROOMS|1"
    assert answer(eve, "JOIN|#hiring") == "ERR|invite-only|#hiring is invite-only: a member can /invite you"
    assert answer(eve, "SEARCH|10|offer") == "END|SEARCH|0"  # not among #main's and eve's own

    env = isolated_home  # the command line asks the same server
    assert "hiring" not in run_cli("rooms", "-p", str(port), "--json", env=env).stdout
    for args in (("history", "--room", "hiring"), ("who", "--room", "hiring"),
                 ("send", "-u", "mallory", "--room", "hiring", "psst")):
        out = run_cli(*args, "-p", str(port), env=env)
        assert out.returncode == chatctl.EXIT_REJECTED and "there is no room #hiring" in out.stderr, args
        assert "offer" not in out.stdout + out.stderr

    irc = IrcClient(port)  # IRC's ways in
    irc.register("ircuser")
    irc.send("LIST", "NAMES #hiring", "WHO #hiring", "CHATHISTORY LATEST #hiring * 10", "WHOIS ana",
             "JOIN #hiring", "TOPIC #hiring", "MODE #hiring", "PRIVMSG #hiring :hi")
    irc.expect(r" 473 ircuser #hiring ")
    irc.send("PING :done")
    irc.expect("PONG")
    assert not any("hiring" in line and any(mark in line for mark in (" 322 ", " 319 ", "offer", " 352 "))
                   for line in irc.seen)
    assert [line for line in irc.seen if " 403 " in line]
    irc.close()


def test_members_are_accounts_invited_kept_across_restarts_and_removed_for_good(make_server, tmp_path):
    db, accounts = str(tmp_path / "h.db"), str(tmp_path / "a.db")
    server = make_server(db=db, accounts_db=accounts, auth_delay=0)
    for name in ("ana", "bob"):
        protected_name(server.port, name, f"password-{name}")
    ana, bob = account(server.port, "ana"), account(server.port, "bob")
    free = guest(server.port, "freddy")
    assert answer(free, "JOIN|#solo|+i").startswith("ERR|not-owner|only a protected name can make a private")
    ana.send(b"JOIN|#hiring|+i\nMSG|#hiring|first round on monday\n")
    ana.expect("MSG_OK|")
    assert answer(ana, "INVITE|#hiring|freddy").startswith("ERR|not-owner|")  # members are accounts
    ana.send(b"INVITE|#hiring|bob\n")
    assert bob.expect("MODERATED|").split("|")[3:6] == ["ana", "invite", "bob"]
    assert joined(bob, "hiring")
    bob.close()
    ana.close()
    server.shutdown()

    server = make_server(db=db, accounts_db=accounts, auth_delay=0)  # kept: the room, its flag, its members
    bob, eve = account(server.port, "bob"), guest(server.port, "eve")
    bob.send(b"JOIN|#hiring\nHISTORY|#hiring|LAST|5\n")
    assert bob.expect("MSG|#hiring|").endswith("|ana|first round on monday")
    bob.expect("END|HISTORY|")
    assert answer(eve, "NAMES|#hiring") == "ERR|unknown-room|there is no room #hiring"
    assert answer(bob, "FORGET|#hiring") == "PART_OK|#hiring"  # for good: no longer a member
    bob.expect("FORGET_OK|#hiring")
    assert answer(bob, "HISTORY|#hiring|LAST|5") == "ERR|unknown-room|there is no room #hiring"
    assert answer(bob, "JOIN|#hiring").startswith("ERR|invite-only|")


def test_a_look_alike_name_is_not_a_member(moderated):
    ana = account(moderated.port, "ana")
    ana.send(b"JOIN|#hiring|+i\nINVITE|#hiring|bob\n")
    ana.expect("MODERATED|")
    fake = RawClient(moderated.port)  # all Cyrillic: looks like bob, and bob's name is protected
    fake.send("HELLO|chatctl/1\nUSER|ЬоЬ\n".encode())
    assert fake.expect("ERR|").startswith("ERR|name-protected|")
    imposter = RawClient(moderated.port)  # a zero for an o: the same
    imposter.send(b"HELLO|chatctl/1\nUSER|B0B\n")
    assert imposter.expect("ERR|").startswith("ERR|name-protected|")
    other = guest(moderated.port, "bobby")  # a name of its own: not bob's membership
    assert answer(other, "JOIN|#hiring").startswith("ERR|invite-only|")


def test_operators_kick_ban_mute_and_lock_and_every_action_is_audited(moderated, isolated_home):
    port = moderated.port
    ana, bob, carl = account(port, "ana"), account(port, "bob"), account(port, "carl")
    spam1, spam2 = guest(port, "spammer1"), guest(port, "spammer2")
    for client in (ana, bob, carl, spam1, spam2):
        client.send(b"JOIN|#ops\n")
        client.expect("JOIN_OK|#ops")
    assert answer(bob, "KICK|#ops|spammer1").startswith("ERR|not-allowed|only an operator of #ops")
    acted(ana, "MODE|#ops|+o|bob", "op")
    names = chatctl.parse_event(answer(carl, "NAMES|#ops")).users  # who is who, for all to see
    assert {u.name: u.role for u in names} == {"ana": "owner", "bob": "op", "carl": "", "spammer1": "",
                                               "spammer2": ""}
    irc = IrcClient(port)
    irc.register("watcher")
    irc.send("NAMES #ops")
    shown = set(irc.expect(r" 353 watcher = #ops :(.*)$").group(1).split())
    assert shown == {"@ana", "@bob", "carl", "spammer1", "spammer2"}
    irc.close()
    assert answer(bob, "KICK|#ops|ana|coup").startswith("ERR|not-allowed|the owner of #ops is out of")
    assert answer(bob, "MODE|#ops|+b|an*").startswith("ERR|not-allowed|'an*' would ban the owner")
    assert acted(bob, "MODE|#ops|-o|bob", "deop")[:3] == ["bob", "deop", "bob"]  # (one may step down)
    acted(ana, "MODE|#ops|+o|bob", "op")

    bob.send(b"KICK|#ops|spammer1|buy cheap watches\n")  # told why, in one line, and out
    while (line := spam1.expect("MODERATED|")).split("|")[4] != "kick":
        pass
    assert line.split("|")[3:] == ["bob", "kick", "spammer1", "", "buy cheap watches"]
    spam1.expect("PART_OK|#ops")
    acted(bob, "MODE|#ops|+b|spammer*|1s|spam", "ban")  # a pattern, for a second: spammer2 is out too
    spam2.expect("PART_OK|#ops")
    assert answer(spam1, "JOIN|#ops").startswith("ERR|banned|banned from #ops until ")
    wait_until(lambda: joined(spam1, "ops"), timeout=5, interval=0.3)  # the ban runs out

    acted(bob, "MUTE|#ops|carl|1h", "mute")
    assert answer(carl, "MSG|#ops|hello?").startswith("ERR|muted|you are muted in #ops until ")
    acted(bob, "UNMUTE|#ops|carl", "unmute")
    assert answer(carl, "MSG|#ops|thanks").startswith("MSG_OK|")
    acted(ana, "MODE|#ops|+t", "mode")
    assert answer(carl, "TOPIC|#ops|mine now").startswith("ERR|not-allowed|the topic of #ops is locked")
    acted(ana, "MODE|#ops|+m", "mode")
    acted(ana, "MODE|#ops|+v|carl", "voice")
    assert answer(spam1, "MSG|#ops|hi").startswith("ERR|muted|#ops is moderated")
    assert answer(carl, "MSG|#ops|I have a voice").startswith("MSG_OK|")
    assert answer(ana, "MODE|#ops") == "MODE_OK|#ops|+mt"

    carl.send(b"MSG|#ops|my password is hunter2\n")  # a leaked password, deleted by an operator
    leak = chatctl.parse_event(carl.expect("MSG_OK|")).id
    assert answer(bob, f"DELETE|{leak}").startswith("MSG_OK|")

    out = run_cli("audit", "-p", str(port), "--room", "ops", "--json", env={**isolated_home,
                  "CHATCTL_OPERATOR_PASSWORD": OPERATOR})
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    did = [(r["actor"], r["action"], r["target"]) for r in rows]
    assert did == [("ana", "op", "bob"), ("bob", "deop", "bob"), ("ana", "op", "bob"),
                   ("bob", "kick", "spammer1"), ("bob", "ban", "spammer*"), ("bob", "mute", "carl"),
                   ("bob", "unmute", "carl"), ("ana", "mode", "+t"), ("ana", "mode", "+m"),
                   ("ana", "voice", "carl"), ("bob", "delete", f"message {leak} of carl")]
    assert rows[3]["reason"] == "buy cheap watches" and rows[4]["until"] is not None
    assert all(r["room"] == "#ops" for r in rows)
    guesser = run_cli("audit", "-p", str(port), env={**isolated_home, "CHATCTL_OPERATOR_PASSWORD": "nope"})
    assert guesser.returncode == chatctl.EXIT_REJECTED and "rows" not in guesser.stdout


def test_a_kick_from_main_ends_the_connection_and_server_bans_keep_names_and_addresses_out(moderated):
    port = moderated.port
    oper, spam = guest(port, "oper"), guest(port, "spammer")
    oper.send(f"OPER|{OPERATOR}\n".encode())
    oper.expect("OPER_OK")
    oper.send(b"KICK|#main|spammer|flooding\n")
    assert spam.wait_closed()[-1] == "BYE|removed from #main: kicked by oper: flooding"
    oper.send(b"BAN|spam*|1h|spam wave\n")
    oper.expect("BAN_OK|spam*")
    late = RawClient(port)
    late.send(b"HELLO|chatctl/1\nUSER|spambot\n")
    assert late.expect("ERR|").startswith("ERR|banned|banned from this server until ")
    oper.send(b"BAN|127.0.0.0/8|2s|everyone here\n")  # an address: even the operator's own address's
    oper.expect("BAN_OK|")                             # other connections go (not the operator)
    refused = RawClient(port)
    refused.send(b"HELLO|chatctl/1\nUSER|innocent\n")
    assert refused.expect("ERR|").startswith("ERR|banned|")
    wait_until(lambda: (c := RawClient(port)).send(b"HELLO|chatctl/1\nUSER|innocent2\n")
               or c.expect(("USER_OK", "ERR|")) == "USER_OK", timeout=8, interval=0.5)
    oper.send(b"UNBAN|spam*\nBAN\n")
    oper.expect("UNBAN_OK|spam*")
    assert oper.expect("END|BANS") == "END|BANS|0"  # the address's ban ran out, spam*'s was lifted


def test_a_webhooks_posts_to_a_private_room_reach_its_members_alone(moderated):
    ana, eve = account(moderated.port, "ana"), guest(moderated.port, "eve")
    ana.send(b"JOIN|#incident-42|+i\n")
    ana.expect("JOIN_OK|#incident-42")
    with chatctl.ChatConnection("127.0.0.1", moderated.port) as conn:  # the operator makes the hook
        conn.hello(quiet=True)
        conn.oper(OPERATOR)
        _, token = conn.add_hook("incident-42", "alertbot")
    status, _, _ = http_request(moderated.port, "POST", f"/hooks/{token}", b'{"text": "db01 disk 95%"}',
                                {"Content-Type": "application/json"})
    assert status == 200
    assert ana.expect("MSG|#incident-42|").endswith("|alertbot|db01 disk 95%")
    assert eve.silent(0.3)  # nothing of it reached anyone else
    assert answer(eve, "HISTORY|#incident-42|LAST|5") == "ERR|unknown-room|there is no room #incident-42"


# --- what an attack run found (each seen failing before its fix) ------------------------------------


def test_a_dropped_name_takes_none_of_its_rooms_to_whoever_protects_it_next(moderated):
    port = moderated.port
    protected_name(port, "dropme", "password-dropme")
    ana, dropme = account(port, "ana"), account(port, "dropme")
    dropme.send(b"JOIN|#own|+i\n")
    dropme.expect("JOIN_OK|#own")
    ana.send(b"JOIN|#secret|+i\nINVITE|#secret|dropme\nMSG|#secret|the secret plan\n")
    ana.expect("MSG_OK|")
    dropme.send(b"UNREGISTER|password-dropme\n")
    dropme.expect("UNREGISTER_OK|dropme")
    dropme.close()
    wait_until(lambda: "dropme" not in [u.name for u in moderated.users()])  # (the name is free)
    newcomer = guest(port, "dropme")
    assert answer(newcomer, "REGISTER|attacker-password").startswith("REGISTER_OK|")
    for line in ("HISTORY|#secret|LAST|5", "HISTORY|#own|LAST|5", "NAMES|#own"):
        assert answer(newcomer, line).startswith("ERR|unknown-room|"), line
    assert answer(newcomer, "JOIN|#secret").startswith("ERR|invite-only|")
    assert answer(newcomer, "JOIN|#own").startswith("ERR|invite-only|")  # and no owner's way in


def test_operators_remove_absent_members_and_bans_shut_the_door_on_members_and_operators(moderated):
    port = moderated.port
    ana, bob, carl = account(port, "ana"), account(port, "bob"), account(port, "carl")
    ana.send(b"JOIN|#secret|+i\n")
    ana.expect("JOIN_OK|#secret")
    acted(ana, "INVITE|#secret|bob", "invite")
    acted(ana, "INVITE|#secret|carl", "invite")
    assert joined(bob, "secret") and joined(carl, "secret")
    bob.close()  # away: removed all the same, a member no more
    wait_until(lambda: "bob" not in [u.name for u in moderated.users()])
    acted(ana, "KICK|#secret|bob|left the team", "kick")
    bob = account(port, "bob")
    assert answer(bob, "HISTORY|#secret|LAST|5").startswith("ERR|unknown-room|")
    acted(ana, "MODE|#secret|+b|carl|1h", "ban")  # a banned member reads nothing either
    carl.expect("PART_OK|#secret")
    ana.send(b"MSG|#secret|after the ban\n")
    ana.expect("MSG_OK|")
    for line in ("HISTORY|#secret|LAST|5", "SEARCH|#secret|5|ban", "TOPIC|#secret", "NAMES|#secret"):
        assert answer(carl, line).startswith("ERR|unknown-room|"), line

    assert joined(ana, "ops") and joined(bob, "ops") and joined(carl, "ops")  # (ana's: she made it)
    acted(ana, "MODE|#ops|+o|bob", "op")
    acted(ana, "MODE|#ops|+o|carl", "op")
    assert answer(bob, "MODE|#ops|+b|car?").startswith("ERR|not-allowed|'car?' would ban an operator")
    acted(ana, "MODE|#ops|+b|carl|1h", "ban")  # the owner may; a banned operator is one no more
    carl.expect("PART_OK|#ops")
    assert answer(carl, "MODE|#ops|+b|bob*").startswith("ERR|not-allowed|only an operator of #ops")


def test_odd_values_are_refused_in_one_line(moderated):
    port = moderated.port
    ana, oper = account(port, "ana"), guest(port, "oper")
    ana.send(b"JOIN|#r\n")
    ana.expect("JOIN_OK|#r")
    for line in ("MODE|#r|+b|spam3|0s", "MODE|#r|+b|spam3|١h", "MUTE|#r|carl|0m"):
        assert answer(ana, line).startswith("ERR|bad-argument|"), line
    for reaction in ("\ufe0f", "\u0301" * 7, "\u200b", "\u3164", "\u2800", "👍\u200d", "👨\u200d\u200d👩"):
        ana.send(b"MSG|#r|vote\n")
        mid = chatctl.parse_event(ana.expect("MSG_OK|")).id
        assert answer(ana, f"REACT|{mid}|{reaction}").startswith("ERR|bad-argument|"), repr(reaction)
    assert answer(ana, "MSG|#r|\u200b\u200d").startswith("ERR|empty-message|")
    oper.send(f"OPER|{OPERATOR}\n".encode())
    oper.expect("OPER_OK")
    for network in ("0.0.0.0/0", "::/0", "10.0.0.0/4"):
        assert answer(oper, f"BAN|{network}|1m").startswith("ERR|bad-argument|"), network
    irc = IrcClient(port)
    irc.register("modes")
    irc.send("JOIN #r", "MODE #r " + "q" * 400, "PING :end")
    irc.expect("PONG")
    assert len([line for line in irc.seen if " 472 " in line]) == 1
    irc.close()


def test_pipelined_reactions_stay_within_the_limit(make_server):
    server = make_server(max_reactions=5, rate=0)
    ana = login(server.port, "ana")
    ana.send(b"MSG|vote\n")
    mid = chatctl.parse_event(ana.expect("MSG_OK|")).id
    ana.send(b"".join(f"REACT|{mid}|r{i}\n".encode() for i in range(30)))  # all before any is stored
    for _ in range(30):
        ana.expect(("MSG_OK|", "ERR|"))
    wait_until(lambda: server.history.find(mid) is not None)
    assert len(server.history.find(mid).reactions) == 5
