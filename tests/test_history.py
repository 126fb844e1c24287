"""Persistent history: durability, privacy, paging, search, retention, migrations, failures."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import pytest

import chatctl
from conftest import CHATCTL, RawClient, read_line, register_many, run_cli, wait_until


def post_all(client: RawClient, texts) -> None:
    """Send each text as a message and wait for its MSG_OK, one at a time."""
    for text in texts:
        client.send(f"MSG|{text}\n".encode())
        client.expect("MSG_OK")


def history_of(client: RawClient, request: bytes) -> tuple[list[chatctl.ChatMessage], str]:
    """Send a HISTORY or SEARCH request; the messages of the reply and its END line."""
    client.send(request)
    messages = []
    while True:
        line = client.line()
        if line.startswith("END|"):
            return messages, line
        event = chatctl.parse_event(line)
        if isinstance(event, chatctl.Delivered):
            messages.append(event.message)


def test_history_pages_and_ends_with_a_marker(server, user):
    ana = user("ana")
    post_all(ana, (f"m{i}" for i in range(1, 31)))
    messages, end = history_of(ana, b"HISTORY|LAST|10\n")
    assert [m.text for m in messages] == [f"m{i}" for i in range(21, 31)]
    assert end == "END|HISTORY|10"
    ids = [m.id for m in messages]
    assert ids == sorted(ids) and len(set(ids)) == 10
    older, _ = history_of(ana, f"HISTORY|BEFORE|{ids[0]}|10\n".encode())
    assert [m.text for m in older] == [f"m{i}" for i in range(11, 21)]
    newer, end = history_of(ana, f"HISTORY|AFTER|{ids[4]}|100\n".encode())
    assert [m.text for m in newer] == [f"m{i}" for i in range(26, 31)]
    assert end == "END|HISTORY|5"
    ana.send(b"HISTORY|SIDEWAYS|3\n")
    assert ana.line().startswith("ERR|bad-argument|")
    ana.send(b"HISTORY|LAST|lots\n")
    assert ana.line().startswith("ERR|bad-argument|")


def test_history_uses_the_live_format_with_escapes(server, user):
    ana = user("ana")
    ana.send(b"MSG|two\\nlines | and a pipe\nME|waves\n")
    ana.expect("MSG_OK")
    ana.expect("MSG_OK")
    messages, _ = history_of(ana, b"HISTORY|LAST|2\n")
    assert [(m.kind, m.sender, m.text) for m in messages] == [
        ("msg", "ana", "two\nlines | and a pipe"), ("me", "ana", "waves")]


def test_direct_messages_are_visible_only_to_their_two_parties(server, user, connect):
    ana, bob, eve = user("ana"), user("bob"), user("eve")
    ana.send(b"MSG|public words\n")
    ana.expect("MSG_OK")
    ana.send(b"DM|bob|secret plans\n")
    ana.expect("MSG_OK")
    for client, sees in ((ana, True), (bob, True), (eve, False)):
        messages, _ = history_of(client, b"HISTORY|LAST|50\n")
        assert ("secret plans" in [m.text for m in messages]) is sees
        found, end = history_of(client, b"SEARCH|10|secret\n")
        assert (len(found) == 1) is sees, end
    stranger = connect()  # not registered: broadcasts only
    messages, _ = history_of(stranger, b"HISTORY|LAST|50\n")
    assert [m.text for m in messages] == ["public words"]


def test_search_matches_words_and_survives_odd_queries(server, user):
    ana = user("ana")
    post_all(ana, ("deploy failed on web1", "deploy ok", "lunch?", "web1 is back"))
    found, end = history_of(ana, b"SEARCH|10|deploy web1\n")
    assert [m.text for m in found] == ["deploy failed on web1"]
    found, end = history_of(ana, b'SEARCH|10|"unbalanced AND (\n')
    assert end == "END|SEARCH|0"
    found, _ = history_of(ana, b"SEARCH|1|web1\n")
    assert [m.text for m in found] == ["web1 is back"]  # the newest


def test_a_new_client_gets_no_replay_unless_it_asks(server, user, connect):
    ana = user("ana")
    ana.send(b"MSG|before you came\n")
    ana.expect("MSG_OK")
    late = connect()
    late.send(b"USER|late\n")
    assert late.line() == "USER_OK"
    assert late.silent(0.3)


def test_history_off(make_server):
    server = make_server(history=False)
    client = RawClient(server.port)
    client.send(b"HISTORY|LAST|5\n")
    assert client.line().startswith("ERR|history-off|")
    client.close()


def test_fifty_concurrent_senders_no_loss_no_duplicates_ids_in_commit_order(server):
    n, per_sender = 50, 20
    clients = register_many(server.port, [f"s{i}" for i in range(n)], hello=True)
    acks: dict[int, list[int]] = {}

    def send_all(i):
        c = clients[i]
        c.send(b"".join(f"MSG|{i}:{k}\n".encode() for k in range(per_sender)))
        acks[i] = [int(c.expect("MSG_OK|").split("|")[1]) for _ in range(per_sender)]

    threads = [threading.Thread(target=send_all, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a sender is still waiting for its acknowledgements"
    all_acked = sorted(i for ids in acks.values() for i in ids)
    assert len(all_acked) == n * per_sender == len(set(all_acked))
    stored, _ = server.history.recent(None, 5000)
    assert [m.id for m in stored] == all_acked  # every acknowledged message, once, in id order
    for i in range(n):
        mine = [m for m in stored if m.sender == f"s{i}"]
        assert [m.text for m in mine] == [f"{i}:{k}" for k in range(per_sender)]
    # every reader saw ids strictly increasing: the live stream is in commit order
    reader = clients[0]
    while sum(line.startswith("MSG|") for line in reader.seen) < (n - 1) * per_sender:
        reader.line()
    seen = [int(line.split("|")[2]) for line in reader.seen if line.startswith("MSG|")]
    assert seen == sorted(seen)
    for c in clients:
        c.close()


def test_retention_keeps_the_newest_messages(make_server, monkeypatch):
    monkeypatch.setattr(chatctl, "PRUNE_INTERVAL", 0.2)
    server = make_server(history_max_messages=10)
    [ana] = register_many(server.port, ["ana"])
    post_all(ana, (f"m{i}" for i in range(25)))
    wait_until(lambda: server.history.count() == 10)
    messages, _ = history_of(ana, b"HISTORY|LAST|50\n")
    assert [m.text for m in messages] == [f"m{i}" for i in range(15, 25)]
    found, _ = history_of(ana, b"SEARCH|50|m3\n")
    assert found == []  # the search index forgets pruned messages too
    ana.close()


def test_retention_by_age(tmp_path):
    store = chatctl.HistoryStore(tmp_path / "h.db", max_days=1)
    import time

    now = time.time()
    store.insert([chatctl.PendingMessage(chatctl.ChatMessage(i + 1, now - age * 86400, "a", f"m{i}"), None)
                  for i, age in enumerate([3, 2, 0.5, 0])])
    assert store.count() == 4
    assert store.prune() == 2
    assert [m.text for m in store.recent(None, 10)[0]] == ["m2", "m3"]
    store.close()


def test_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(chatctl.MIGRATIONS[1] + """
        INSERT INTO messages VALUES (1, 1700000000.0, 'Ana', NULL, 'old news');
        INSERT INTO messages VALUES (2, 1700000001.0, 'Ana', 'Bob', 'old secret');
        PRAGMA user_version = 1;
    """)
    db.close()
    store = chatctl.HistoryStore(path)
    assert store._writer.execute("PRAGMA user_version").fetchone()[0] == chatctl.SCHEMA_VERSION
    assert store.last_id == 2
    bobs = store.recent("bob", 10)[0]
    assert [(m.kind, m.text) for m in bobs] == [("msg", "old news"), ("dm", "old secret")]
    assert [m.text for m in store.recent("eve", 10)[0]] == ["old news"]
    assert [m.text for m in store.search("BOB", "secret", 10)[0]] == ["old secret"]
    store.close()


def test_refuses_a_database_from_a_newer_chatctl(tmp_path):
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute("PRAGMA user_version = 99").connection.close()
    with pytest.raises(chatctl.StorageError, match="schema version 99 is newer"):
        chatctl.HistoryStore(path)


# --- failures: clear, and nothing lost ---------------------------------------------------------


def test_a_second_server_on_the_same_database_is_refused(make_server, tmp_path, isolated_home):
    db = tmp_path / "shared.db"
    make_server(db=str(db))
    in_use = f"in use by another chatctl server \\(pid {os.getpid()}\\)"
    with pytest.raises(chatctl.StorageError, match=in_use):
        make_server(db=str(db))
    result = run_cli("serve", "-H", "127.0.0.1", "-p", "0", "--db", str(db), env=isolated_home)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {db} is in use by another chatctl server (pid {os.getpid()})"


@pytest.mark.parametrize("kind", ["garbage", "unwritable", "not-a-directory"])
def test_unusable_database_is_a_one_line_error_at_start(tmp_path, isolated_home, kind):
    if kind == "garbage":
        db = tmp_path / "garbage.db"
        db.write_bytes(os.urandom(8192))
    elif kind == "unwritable":
        db = "/proc/chatctl-test.db"  # not writable, even for root
    else:
        (tmp_path / "file").write_text("x")
        db = tmp_path / "file" / "h.db"
    result = run_cli("serve", "-H", "127.0.0.1", "-p", "0", "--db", str(db), env=isolated_home)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"Error: {db}")
    assert "Traceback" not in result.stderr


def test_a_failing_write_refuses_the_message_and_the_server_goes_on(server, user):
    ana, bob = user("ana"), user("bob", hello=True)
    ana.send(b"MSG|fits\n")
    ana.expect("MSG_OK")
    writer = server.history._writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")  # as good as a full disk
    ana.send(b"MSG|" + b"x" * 6000 + b"\n")
    assert ana.line() == f"ERR|storage-failed|{chatctl.ERROR_CODES['storage-failed']}"
    writer.execute("PRAGMA max_page_count = 1073741823")
    ana.send(b"MSG|after the disk was freed\n")
    assert ana.expect("MSG_OK") == "MSG_OK"
    lines = [bob.expect("MSG|") for _ in range(2)]
    assert [line.split("|", 5)[5] for line in lines] == ["fits", "after the disk was freed"]
    messages, _ = history_of(bob, b"HISTORY|LAST|10\n")
    assert [m.text for m in messages] == ["fits", "after the disk was freed"]


# --- durability: kill -9 ----------------------------------------------------------------------


def start_server_process(env, db):
    """``chatctl serve`` without a rate limit: the tests here pipeline hundreds of messages."""
    proc = subprocess.Popen([*CHATCTL, "serve", "-H", "127.0.0.1", "-p", "0", "--db", str(db)],
                            env={**env, "CHATCTL_RATE": "0"}, stderr=subprocess.PIPE, text=True)
    for _ in range(5):
        try:
            line = read_line(proc.stderr)
        except AssertionError:
            break
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise AssertionError("server did not start")


def test_every_acknowledged_message_survives_kill_9(tmp_path, isolated_home):
    db = tmp_path / "durable.db"
    proc, port = start_server_process(isolated_home, db)
    try:
        client = RawClient(port, timeout=20)
        client.send(b"HELLO|chatctl/1\nUSER|ana\n")
        client.expect("USER_OK")
        n = 500
        client.send(b"".join(f"MSG|durable {i}\n".encode() for i in range(n)))
        acked = [int(client.expect("MSG_OK|").split("|")[1]) for _ in range(n)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        client.close()
    finally:
        proc.kill()
    proc, port = start_server_process(isolated_home, db)
    try:
        result = run_cli("history", "-p", str(port), "-n", "500", "--json", env=isolated_home)
        assert result.returncode == 0, result.stderr
        stored = [json.loads(line) for line in result.stdout.splitlines()]
        assert [m["id"] for m in stored] == acked
        assert [m["text"] for m in stored] == [f"durable {i}" for i in range(n)]
        # ids go on after the restart, never reused
        client = RawClient(port)
        client.send(b"HELLO|chatctl/1\nUSER|ana\nMSG|after restart\n")
        assert int(client.expect("MSG_OK|").split("|")[1]) > acked[-1]
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# --- the CLI and join -----------------------------------------------------------------------------


def test_history_command_table_json_search_and_paging(server, user, isolated_home):
    ana = user("ana")
    bob = user("bob")
    post_all(ana, ("first [bold]not bold[/bold]", "second", "third deploy"))
    bob.send(b"DM|ana|private note\n")
    bob.expect("MSG_OK")
    port = str(server.port)
    table = run_cli("history", "-p", port, env=isolated_home)
    assert table.returncode == 0, table.stderr
    assert "[bold]not bold[/bold]" in table.stdout and "third deploy" in table.stdout
    assert "private note" not in table.stdout
    listing = run_cli("history", "-p", port, "--json", env=isolated_home)
    rows = [json.loads(x) for x in listing.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["first [bold]not bold[/bold]", "second", "third deploy"]
    assert set(rows[0]) == {"id", "ts", "kind", "from", "bot", "to", "room", "text", "reply_to", "reactions",
                            "edited", "deleted"}
    assert rows[0]["room"] == "#main" and rows[0]["bot"] is False
    older = run_cli("history", "-p", port, "--json", "--before", str(rows[2]["id"]), "-n", "1",
                    env=isolated_home)
    assert [json.loads(x)["text"] for x in older.stdout.splitlines()] == ["second"]
    found = run_cli("history", "-p", port, "--json", "--search", "deploy", env=isolated_home)
    assert [json.loads(x)["text"] for x in found.stdout.splitlines()] == ["third deploy"]
    ana.send(b"QUIT\n")
    ana.wait_closed()
    wait_until(lambda: "ana" not in [u.name for u in server.users()])
    mine = run_cli("history", "-p", port, "--json", "-u", "ana", env=isolated_home)
    assert "private note" in [json.loads(x)["text"] for x in mine.stdout.splitlines()]
    both = run_cli("history", "-p", port, "--before", "3", "--search", "x", env=isolated_home)
    assert both.returncode == chatctl.EXIT_USAGE


def test_search_covers_indexed_and_not_yet_indexed_messages(make_server, monkeypatch):
    monkeypatch.setattr(chatctl, "FTS_CHUNK", 5)
    server = make_server()
    [ana] = register_many(server.port, ["ana"])
    post_all(ana, (f"needle {i} haystack" for i in range(12)))
    wait_until(lambda: server.history.fts_upto == server.history.last_id)  # indexed by the upkeep thread
    ana.send(b"MSG|needle late\n")  # in the tail, not yet indexed
    ana.expect("MSG_OK")
    found, _ = history_of(ana, b"SEARCH|50|NEEDLE\n")
    assert [m.text for m in found] == [f"needle {i} haystack" for i in range(12)] + ["needle late"]
    found, _ = history_of(ana, b"SEARCH|2|needle\n")
    assert [m.text for m in found] == ["needle 11 haystack", "needle late"]
    ana.close()


def test_batched_fan_out_mixes_broadcasts_and_direct_messages_correctly(server):
    n, per_sender = 10, 40
    clients = register_many(server.port, [f"u{i}" for i in range(n)], hello=True)
    wait_until(lambda: len(server.users()) == n)

    def frames(i):  # even: to everyone; odd: a DM to the next client
        return b"".join((f"MSG|{i}:{k}\n" if k % 2 == 0 else f"DM|u{(i + 1) % n}|{i}:{k}\n").encode()
                        for k in range(per_sender))

    threads = [threading.Thread(target=clients[i].send, args=(frames(i),)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a sender is still sending"
    for i, c in enumerate(clients):
        expected_in = {f"{j}:{k}" for j in range(n) if j != i for k in range(0, per_sender, 2)}
        expected_in |= {f"{(i - 1) % n}:{k}" for k in range(1, per_sender, 2)}
        got, acks, ids = [], 0, []
        while len(got) < len(expected_in) or acks < per_sender:
            event = chatctl.parse_event(c.line())
            if isinstance(event, chatctl.Acknowledged):
                acks += 1
                ids.append(event.id)
            elif isinstance(event, chatctl.Delivered):
                got.append(event.message.text)
                ids.append(event.message.id)
        assert sorted(got) == sorted(expected_in) and len(got) == len(set(got))
        assert ids == sorted(ids)  # one stream, in id order, acks included
        assert c.silent(0.1)
    for c in clients:
        c.close()


# --- issue 10 ----------------------------------------------------------------------------------------


def test_numbers_past_sqlite_integers_are_a_bad_argument(server):
    [ana] = register_many(server.port, ["ana"], hello=True)
    ana.send(b"HISTORY|BEFORE|9223372036854775808|5\n")
    assert ana.line().startswith("ERR|bad-argument|")
    ana.send(b"PING\n")
    assert ana.line() == "PONG"  # the connection goes on


def test_search_takes_snake_case_words_zero_and_caps_the_unindexed_tail(server):
    [ana] = register_many(server.port, ["ana"], hello=True)
    post_all(ana, [f"fix snake_case number {i}" for i in range(40)])
    messages, end = history_of(ana, b"SEARCH|5|snake_case\n")
    assert [m.text for m in messages] == [f"fix snake_case number {i}" for i in range(35, 40)]
    messages, end = history_of(ana, b"SEARCH|0|snake\n")
    assert messages == [] and end == "END|SEARCH|0"


def test_data_files_are_private_and_lock_files_go_at_a_clean_stop(isolated_home, tmp_path):
    proc = subprocess.Popen([*CHATCTL, "serve", "-H", "127.0.0.1", "-p", "0", "--tls"],
                            env=isolated_home, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for _ in range(8):
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", read_line(proc.stderr)):
                port = match.group(1)
                break
        assert port, "the server did not start"
        assert run_cli("send", "--tls", "-p", port, "-u", "ana", "hi", env=isolated_home).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    data = Path(isolated_home["XDG_DATA_HOME"]) / "chatctl"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("history.db", "accounts.db", "server-key.pem"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert not list(data.glob("*.lock"))


def test_a_database_in_a_missing_directory_is_an_error_not_a_new_directory(isolated_home, tmp_path):
    db = tmp_path / "nonexistent" / "dir" / "x.db"
    result = run_cli("serve", "-H", "127.0.0.1", "-p", "0", "--db", str(db), env=isolated_home)
    assert result.returncode == 1
    assert "does not exist" in result.stderr and not (tmp_path / "nonexistent").exists()
