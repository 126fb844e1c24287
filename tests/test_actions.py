"""Replies, reactions, edits and deletions: on the wire (chatctl/1 with and without ``actions``, the
seed's form), in the history and its search, in backups, after a restart, and as an outsider would try
them (other rooms' and other people's messages by id, someone else's message, reaction floods)."""

from __future__ import annotations

import base64
import json
import sqlite3

import chatctl
from conftest import RawClient, run_cli, wait_until


def event(client: RawClient, prefix: str):
    return chatctl.parse_event(client.expect(prefix))


def sent(client: RawClient, line: str) -> int:
    """Send a request that makes a message; its id."""
    client.send(line.encode() + b"\n")
    return event(client, "MSG_OK|").id


def test_each_action_reaches_every_kind_of_client_in_its_own_form(server, user):
    ana = user("ana", hello="actions")
    bob = user("bob", hello="actions")
    old = user("old", hello=True)   # chatctl/1 without actions: plain forms
    seed = user("seed")             # never said HELLO: the seed's lines
    first = sent(ana, "MSG|deploy done")
    for client in (bob, old):
        client.expect("MSG|#main|")
    seed.expect("ana: deploy done")

    reply = sent(bob, f"REPLY|{first}|great work")
    msg = event(ana, "MSGX|").message
    assert (msg.id, msg.sender, msg.ref, msg.text, msg.kind, msg.room) == (reply, "bob", first, "great work",
                                                                            "msg", "main")
    assert old.expect("MSG|#main|").endswith("|bob|great work")  # a reply is a message to the rest
    seed.expect("bob: great work")

    sent(bob, f"REACT|{first}|👍")
    react = event(ana, "REACT|").message
    assert (react.kind, react.ref, react.text, react.sender) == ("react", first, "👍", "bob")
    assert old.expect("ME|#main|").endswith('|bob|reacted 👍 to ana\'s "deploy done"')
    seed.expect('* bob reacted 👍 to ana\'s "deploy done"')

    sent(ana, f"EDIT|{first}|deploy done (v2)")
    edit = event(bob, "EDIT|").message
    assert (edit.kind, edit.ref, edit.text) == ("edit", first, "deploy done (v2)")
    assert old.expect("MSG|#main|").endswith("|ana|(edited) deploy done (v2)")
    seed.expect("ana: (edited) deploy done (v2)")

    sent(bob, f"REACT|{first}|👍")  # the same again: taken back
    assert event(ana, "REACT|").message.kind == "unreact"
    assert old.expect("ME|#main|").endswith('|bob|took back 👍 from ana\'s "deploy done (v2)"')

    sent(ana, f"DELETE|{first}")
    assert event(bob, "DELETE|").message.ref == first
    assert old.expect("ME|#main|").endswith("|ana|deleted a message")
    seed.expect("* ana deleted a message")

    ana.send(b"HISTORY|LAST|10\n")  # the history: messages as they are now, no actions among them
    page = [event(ana, "MSG")]
    while not isinstance(page[-1], chatctl.EndOfList):
        page.append(chatctl.parse_event(ana.line()))
    shown = [e.message for e in page[:-1]]
    assert [(m.id, m.text, bool(m.deleted), m.ref) for m in shown] == [(first, "", True, 0),
                                                                        (reply, "great work", False, first)]
    old.send(b"HISTORY|LAST|10\n")
    assert old.expect("MSG|#main|").endswith("|ana|(message deleted)")


def test_a_message_keeps_its_latest_text_reactions_and_when_it_changed_after_a_restart(make_server, tmp_path):
    db = str(tmp_path / "kept.db")
    server = make_server(db=db)
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1|actions\nUSER|ana\n")
    ana.expect("USER_OK")
    first = sent(ana, "MSG|tpyo")
    sent(ana, f"EDIT|{first}|typo")
    for reaction in ("👍", "🎉", "+1"):
        sent(ana, f"REACT|{first}|{reaction}")
    sent(ana, f"REACT|{first}|🎉")  # taken back
    ana.close()
    server.shutdown()

    server = make_server(db=db)
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1|actions\nUSER|bob\nHISTORY|LAST|5\n")
    msg = event(bob, "MSGX|").message
    assert (msg.id, msg.text, msg.reactions) == (first, "typo", (("👍", ("ana",)), ("+1", ("ana",))))
    assert msg.edited >= msg.ts
    bob.expect("END|HISTORY|1")
    bob.send(f"HISTORY|AFTER|{first}|10\n".encode())  # a page on replays what was done, in order
    kinds = []
    while not (line := bob.line()).startswith("END|"):
        kinds.append(chatctl.parse_event(line).message.kind)
    assert kinds == ["edit", "react", "react", "react", "unreact"]


def test_history_json_lists_replies_reactions_edits_and_deletions(server, user, isolated_home):
    ana = user("ana", hello="actions")
    first = sent(ana, "MSG|the build is red")
    reply = sent(ana, f"REPLY|{first}|fixed in 1f3a")
    sent(ana, f"REACT|{reply}|✅")
    sent(ana, f"EDIT|{reply}|fixed in 1f3b")
    sent(ana, f"DELETE|{first}")
    out = run_cli("history", "-p", str(server.port), "--json", env=isolated_home)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["id"], r["text"], r["reply_to"], r["reactions"], r["edited"] is not None,
             r["deleted"] is not None) for r in rows] == [(first, "", None, {}, False, True),
                               (reply, "fixed in 1f3b", first, {"✅": ["ana"]}, True, False)]
    table = run_cli("history", "-p", str(server.port), env=isolated_home).stdout
    assert "(message deleted)" in table and "(edited)" in table and "✅ 1" in table
    assert "the build is red" not in table


def test_a_deleted_message_leaves_search_the_index_and_backups_made_afterwards(make_server, isolated_home):
    server = make_server(operator_password="op-secret-1")
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1|actions\nUSER|ana\n")
    ana.expect("USER_OK")
    leak = sent(ana, "MSG|the db password is zebracorn42")
    edited = sent(ana, "MSG|deploy note alpha")
    sent(ana, f"EDIT|{edited}|deploy note bravo")
    wait_until(lambda: server.history.index_step() is not None and server.history.index_lag == 0)

    def search(words: str) -> list[int]:
        ana.send(f"SEARCH|10|{words}\n".encode())
        found = []
        while not (line := ana.line()).startswith("END|"):
            found.append(chatctl.parse_event(line).message.id)
        return found

    assert search("zebracorn42") == [leak]
    assert search("alpha") == [] and search("bravo") == [edited]  # the index follows an edit
    sent(ana, f"DELETE|{leak}")
    assert search("zebracorn42") == []
    files = [server.history.path, server.history.path.with_name(server.history.path.name + "-wal")]
    wait_until(lambda: not any(b"zebracorn42" in f.read_bytes() for f in files if f.exists()), timeout=10,
               interval=0.2)  # the live files too, once the upkeep has merged the index
    ana.send(b"OPER|op-secret-1\nBACKUP|history\n")
    ana.expect("OPER_OK")
    data = b""
    while not (line := ana.line()).startswith("END|BACKUP"):
        data += base64.b64decode(line.split("|", 1)[1])
    assert b"zebracorn42" not in data  # not in a row, an edit, the index or a free page
    assert b"deploy note bravo" in data
    export = run_cli("export", "-p", str(server.port), env=isolated_home)
    assert export.returncode == 0 and "deploy note bravo" in export.stdout
    assert "zebracorn42" not in export.stdout
    path = server.history.path.with_name("copy.db")
    path.write_bytes(data)
    with sqlite3.connect(path) as copy:
        assert copy.execute("SELECT text, deleted IS NOT NULL FROM messages WHERE id = ?",
                            (leak,)).fetchone() == ("", 1)


def test_nobody_acts_on_what_they_cannot_see_or_on_someone_elses_message(server, user):
    ana = user("ana", hello="actions")
    bob = user("bob", hello="actions")
    eve = user("eve", hello="actions")
    ana.send(b"JOIN|#hiring\n")
    ana.expect("JOIN_OK")
    hidden = sent(ana, "MSG|#hiring|offer for carl")
    private = sent(ana, "DM|bob|just between us")
    bob.expect("DM|")
    public = sent(ana, "MSG|lunch?")
    eve.expect("MSG|#main|")
    nothing = public + 1000
    for target in (hidden, private, nothing):  # another room's, someone else's DM, none: one answer
        for line in (f"REPLY|{target}|x", f"REACT|{target}|👍", f"EDIT|{target}|x", f"DELETE|{target}"):
            eve.send(line.encode() + b"\n")
            assert eve.expect("ERR|") == (f"ERR|unknown-message|no message {target} in your rooms or direct "
                                          "messages")
    eve.send(f"EDIT|{public}|eve was here\n".encode())
    assert eve.expect("ERR|").startswith("ERR|not-author|")
    eve.send(f"DELETE|{public}\n".encode())
    assert eve.expect("ERR|").startswith("ERR|not-author|")
    sent(bob, f"REACT|{private}|👍")  # the DM's other party may react to it (and ana hears it)
    assert event(ana, "REACT|").message.ref == private
    bob.send(f"EDIT|{private}|x\n".encode())
    assert bob.expect("ERR|").startswith("ERR|not-author|")
    sent(ana, f"DELETE|{private}")
    bob.send(f"REACT|{private}|🎉\n".encode())
    assert bob.expect("ERR|").startswith("ERR|message-deleted|")
    assert eve.silent(0.2)  # and eve heard nothing of any of it


def test_reactions_are_bounded_and_checked_and_edits_can_be_limited_in_time(make_server):
    server = make_server(max_reactions=3, edit_window=1e-6, operator_password="op-secret-1")
    ana, bob = RawClient(server.port), RawClient(server.port)
    for client, name in ((ana, "ana"), (bob, "bob")):
        client.send(f"HELLO|chatctl/1|actions\nUSER|{name}\n".encode())
        client.expect("USER_OK")
    first = sent(ana, "MSG|vote")
    for reaction in ("a", "b", "c"):
        sent(bob, f"REACT|{first}|{reaction}")
    bob.send(f"REACT|{first}|d\n".encode())
    assert bob.expect("ERR|").startswith("ERR|too-many-reactions|")
    sent(bob, f"REACT|{first}|a")  # one already given may still be given (or taken back)
    for bad in ("two words", "x" * 17, "a|b", "a,b", "\x1b[31m", ""):
        bob.send(f"REACT|{first}|{bad}\n".encode())
        assert bob.expect("ERR|").split("|")[1] in ("bad-argument", "missing-argument")
    ana.send(f"EDIT|{first}|changed\n".encode())
    assert ana.expect("ERR|").startswith("ERR|too-late|")
    bob.send(b"OPER|op-secret-1\n")
    bob.expect("OPER_OK")
    sent(bob, f"DELETE|{first}")  # an operator deletes any message, at any time


def test_actions_on_a_direct_message_reach_both_parties_devices(server, user):
    ana = user("ana", hello="actions")
    bob = user("bob", hello="actions")
    first = sent(ana, "DM|bob|see you at 3")
    bob.expect("DM|")
    reply = sent(bob, f"REPLY|{first}|make it 4")
    msg = event(ana, "MSGX|").message
    assert (msg.id, msg.kind, msg.recipient, msg.ref) == (reply, "dm", "ana", first)
    sent(ana, f"EDIT|{first}|see you at 4")
    assert event(bob, "EDIT|").message.recipient == "bob"
    bob.close()  # the other party gone: an action still goes through, to who is there
    wait_until(lambda: "bob" not in [u.name for u in server.users()])
    sent(ana, f"DELETE|{first}")
