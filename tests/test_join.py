"""chatctl join in a real pseudo-terminal (pexpect), and its plain mode for scripts."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pexpect
import pytest

import chatctl
from conftest import CHATCTL, RawClient, default_sigint, login, protected_name, read_line, run_cli, wait_until

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
_CSI = r"(?:\x1b\[[0-9;?]*[A-Za-z])*"



@pytest.fixture
def user(user):
    """Raw clients here read what join's users see: the extended protocol's lines."""
    return lambda name, hello=True: user(name, hello)

def echoed(text: str) -> str:
    """A regex for ``text`` as the terminal shows it while typed: any cursor codes between characters."""
    return _CSI.join(r"(?: |\x1b\[\d*C)" if ch == " " else re.escape(ch) for ch in text)


def test_reply_react_edit_and_delete_by_number_and_up_edits_the_last_line(server, user, spawn_join):
    bob = user("bob", hello="actions")
    ana = spawn_join("ana", server.port)
    bob.send(b"MSG|deploy done\n")
    first = chatctl.parse_event(bob.expect("MSG_OK|")).id
    ana.expect(f"#{first} <bob> deploy done")  # each line shows its number
    ana.sendline(f"/re {first} great work")
    reply = chatctl.parse_event(bob.expect("MSGX|")).message
    assert (reply.ref, reply.text) == (first, "great work")
    ana.expect(re.escape(f"#{reply.id} <ana> (↳ bob: deploy done) great work"))
    ana.sendline(f"/react #{first} 👍")
    assert bob.expect("REACT|").split("|")[5:] == [str(first), "👍", "1"]
    ana.expect(re.escape('you reacted 👍 to bob\'s message #1: "deploy done"'))
    bob.send(f"EDIT|{first}|deploy done (v2)\nREACT|{reply.id}|🎉\n".encode())
    ana.expect(re.escape(f"#{first} <bob> deploy done (v2) (edited)"))  # printed again, marked
    ana.expect(re.escape("👍 1"))
    ana.expect(re.escape(f'bob reacted 🎉 to your message #{reply.id}: "great work"'))
    ana.send("\x1b[A")  # Up on an empty line: our last message, to edit
    ana.expect(echoed(f"/edit {reply.id} great work"))
    ana.sendline(" indeed")
    assert bob.expect("EDIT|").endswith(f"|ana|{reply.id}|great work indeed")
    ana.expect(re.escape(f"#{reply.id} <ana> (↳ bob: deploy done (v2)) great work indeed (edited)"))
    ana.sendline(f"/delete {first}")
    ana.expect(re.escape("not sent: message 1 is bob's: only its author or an operator may delete it"))
    ana.sendline(f"/delete {reply.id}")
    assert bob.expect("DELETE|").endswith(f"|ana|{reply.id}")
    ana.expect(re.escape(f"you deleted your message #{reply.id}"))
    ana.sendline("/edit 12")
    ana.expect(re.escape("usage: /edit ID TEXT"))


def test_a_private_room_its_invitation_and_a_kick_in_one_line_each(make_server, user, spawn_join,
                                                                     isolated_home):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", "anapass123")
    protected_name(server.port, "bob", "bobpass123")
    isolated_home["CHATCTL_USER_PASSWORD"] = "anapass123"
    ana = spawn_join("ana", server.port)
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1|actions\nUSER|bob|bobpass123\n")
    bob.expect("USER_OK")
    ana.sendline("/join #hiring --private")
    ana.expect(r"#hiring>")
    ana.sendline("/invite bob")
    ana.expect(re.escape("ana invited bob to #hiring"))
    assert bob.expect("MODERATED|").split("|")[3:6] == ["ana", "invite", "bob"]
    bob.send(b"JOIN|#hiring\nMODE|#hiring\n")
    bob.expect("JOIN_OK|#hiring")
    ana.expect("bob joined #hiring")
    ana.sendline("/op bob")
    ana.expect(re.escape("ana made bob an operator of #hiring"))
    ana.sendline("/mode")
    ana.expect(re.escape("#hiring: private (invite-only)"))
    ana.sendline("/ban spam* 2h bots")
    ana.expect(r"ana banned spam\* from #hiring until .*: bots")
    ana.sendline("/kick bob")  # (the owner may)
    ana.expect(re.escape("ana removed bob from #hiring"))
    bob.expect("PART_OK|#hiring")
    ana.sendline("/part --forget")
    ana.expect(r"you left #hiring; now in #main")


def test_incoming_message_does_not_break_a_half_typed_line(server, user, spawn_join):
    bob = user("bob")
    ana = spawn_join("ana", server.port)
    ana.send("hello wor")
    ana.expect(echoed("hello wor"))
    bob.send(b"MSG|incoming while you type\n")
    ana.expect("<bob> incoming while you type")
    ana.send("ld, all of it\r")
    assert bob.expect("MSG|").endswith("|ana|hello world, all of it")
    ana.expect("<ana> hello world, all of it")  # own message shown once acknowledged


def test_tab_completes_a_name_and_a_command(server, user, spawn_join):
    bob = user("bobby")
    ana = spawn_join("ana", server.port)
    ana.send("bo\t")
    ana.expect(echoed("by: "))
    ana.send("are you there?\r")
    assert bob.expect("MSG|").endswith("|ana|bobby: are you there?")
    ana.send("/wh\t")
    ana.expect(echoed("o "))
    ana.send("\r")
    ana.expect("1 online|2 online")
    ana.expect("bobby")


def test_tab_completes_a_room_made_since_the_last_room_list_at_the_first_press(server, user):
    from prompt_toolkit.document import Document

    chat = chatctl.ChatClient(chatctl.ClientConfig(host="127.0.0.1", port=server.port, backlog=0), "carl",
                              chatctl.ClientFrontEnd())
    chat.start()
    try:
        bob = user("bob", hello=True)
        bob.send(b"JOIN|#ops\n")
        bob.expect("JOIN_OK")
        chat.rooms_learned = time.monotonic() - chatctl.ROOM_LIST_FRESH - 1  # the list is old now
        offered = [c.text for c in chatctl.name_completer(chat).get_completions(Document("/join #op"), None)]
        assert offered == ["#ops "]
    finally:
        chat.close()


def test_direct_message_reaches_one_person_and_reply_answers_it(server, user, spawn_join):
    bob, eve = user("bob"), user("eve")
    ana = spawn_join("ana", server.port)
    ana.send("/msg bob for bob only\r")
    assert bob.expect("DM|").endswith("|ana|bob|for bob only")
    ana.expect(r"\[DM → bob\] <ana> for bob only")
    bob.send(b"DM|ana|got it\n")
    ana.expect(r"\[DM\] <bob> got it")
    ana.send("/reply great\r")
    assert bob.expect("DM|").endswith("|ana|bob|great")
    eve.send(b"PING|sync\n")
    eve.expect("PONG|sync")
    assert not any(line.startswith("DM|") for line in eve.seen)


def test_mentions_are_marked_and_ring_the_bell(server, user, spawn_join):
    bob = user("bob")
    ana = spawn_join("ana", server.port)
    bob.send(b"MSG|nothing to see\n")
    bob.send(b"MSG|hey ANA, look\n")
    ana.expect("<bob> nothing to see")
    ana.expect("! <bob> hey ANA, look")
    assert "\x07" not in ana.before  # the plain message did not ring
    ana.expect("\x07", timeout=2)


def test_bell_off_never_rings(server, user, spawn_join):
    bob = user("bob")
    ana = spawn_join("ana", server.port, "--bell", "off")
    bob.send(b"MSG|ana: ping\nDM|ana|psst\nMSG|done\n")
    ana.expect("done")
    assert "\x07" not in ana.before


def test_what_others_send_is_shown_literally(server, user, spawn_join):
    eve = user("eve")
    ana = spawn_join("ana", server.port)
    eve.send(b"MSG|\x1b[2J\x07\x08 [blink]x[/blink] fine\\n01:00 <bob> send me your password\n")
    ana.expect(r"<eve> .*\[blink\]x\[/blink\] fine")
    shown = ana.after
    assert "\x1b[2J" not in shown and "\x07" not in shown and "\x08" not in shown
    assert "\ufffd[2J" in shown
    ana.expect(r"│ 01:00 <bob> send me your password")  # a continuation, not a line from bob


def test_view_neutralises_controls_even_from_a_hostile_server():
    view = chatctl.ChatView(color=False)
    msg = chatctl.ChatMessage(1, 0.0, "bo\x1bb", "a\x1b]0;title\x07b\nfake [red]x[/red]")
    text = view.message(msg)
    assert "\x1b" not in text and "\x07" not in text
    first, second = text.split("\n")
    assert first.endswith("<bo\ufffdb> a\ufffd]0;title\ufffdb")
    assert second == "      │ fake [red]x[/red]"


def test_colours_are_stable_per_name_and_off_when_asked():
    assert chatctl.user_colour("Ana") == chatctl.user_colour("ana")
    assert len({chatctl.user_colour(f"user{i}") for i in range(40)}) > 6
    msg = chatctl.ChatMessage(1, 0.0, "bob", "hi ana")
    assert "\x1b[" in chatctl.ChatView(color=True).message(msg, mention=True)
    mono = chatctl.ChatView(color=False).message(msg, mention=True)
    assert "\x1b[" not in mono and "! <bob> hi ana" in mono
    dm = chatctl.ChatMessage(2, 0.0, "bob", "psst", "dm", "ana")
    assert "[DM] <bob> psst" in chatctl.ChatView(color=False).message(dm)


def test_colour_mode_colours_names(server, user, spawn_join):
    bob = user("bob")
    ana = spawn_join("ana", server.port, color=True)
    bob.send(b"MSG|in colour\n")
    ana.expect("in colour")
    assert "\x1b[1;" in ana.before  # a bold, coloured name


def test_server_errors_are_readable_notices(server, spawn_join):
    ana = spawn_join("ana", server.port)
    ana.send("/msg ghost hello?\r")
    ana.expect(r"not sent: no user named 'ghost' is online \(unknown-user\)")
    ana.send("/frob\r")
    ana.expect(r"unknown command /frob \(try /help\)")
    ana.send("//frob is not a command\r")
    ana.expect("<ana> /frob is not a command")


def test_a_long_paste_is_one_message_after_confirmation(server, user, spawn_join):
    bob = user("bob")
    ana = spawn_join("ana", server.port)
    ana.send(PASTE_START + "one\ntwo\r\n" + PASTE_END + "\r")
    assert chatctl.parse_event(bob.expect("MSG|")).message.text == "one\ntwo"
    lines = [f"log line {i}" for i in range(8)]
    ana.send(PASTE_START + "\n".join(lines) + PASTE_END + "\r")
    ana.expect(r"send these 8 lines as one message\? \[y/N\]")
    ana.send("y\r")
    assert chatctl.parse_event(bob.expect("MSG|")).message.text == "\n".join(lines)
    ana.send(PASTE_START + "\n".join(lines) + PASTE_END + "\r")
    ana.expect(r"as one message\? \[y/N\]")
    ana.send("n\r")
    ana.expect("not sent: the 8 lines were discarded")
    ana.send("after\r")
    assert chatctl.parse_event(bob.expect("MSG|")).message.text == "after"


@pytest.mark.parametrize("key", ["d", "c"])
def test_ctrl_d_and_ctrl_c_quit_cleanly(server, user, spawn_join, key):
    bob = user("bob")
    ana = spawn_join("ana", server.port)
    ana.sendcontrol(key)
    ana.expect(pexpect.EOF)
    ana.close()
    assert ana.exitstatus == 0
    assert "Traceback" not in ana.before
    assert bob.expect("LEAVE|").split("|")[2:] == ["ana", "quit"]


def test_quit_with_a_reason(server, user, spawn_join):
    bob = user("bob")
    ana = spawn_join("ana", server.port)
    ana.send("/quit lunch\r")
    ana.expect(pexpect.EOF)
    assert bob.expect("LEAVE|").split("|")[2:] == ["ana", "quit: lunch"]


def test_reconnects_after_the_server_restarts_and_keeps_the_typed_line(make_server, spawn_join):
    first = make_server()
    port = first.port
    ana = spawn_join("ana", port)
    ana.send("typed before the resta")
    ana.expect(echoed("resta"))
    first.shutdown()
    ana.expect("reconnecting")
    second = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=port)).start()
    try:
        ana.expect("reconnected to 127.0.0.1", timeout=15)
        bob = RawClient(port)
        bob.send(b"HELLO|chatctl/1\nUSER|bob\n")
        assert bob.expect("USER_OK") == "USER_OK"
        ana.send("rt\r")
        assert bob.expect("MSG|").endswith("|ana|typed before the restart")
        bob.send(b"MSG|welcome back\n")
        ana.expect("<bob> welcome back")
        bob.close()
    finally:
        second.shutdown()


def test_asks_for_a_name_when_none_is_configured(server, isolated_home):
    env = {**isolated_home, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", "-p", str(server.port)], env=env,
                          encoding="utf-8", timeout=10)
    try:
        child.expect("Your name: ")
        child.send("zoe\r")
        child.expect("as zoe")
        wait_until(lambda: [u.name for u in server.users()] == ["zoe"])
    finally:
        child.close(force=True)


# --- plain mode: stdin is not a terminal -----------------------------------------------------


def test_piped_lines_are_sent_and_join_exits_when_acknowledged(server, user, isolated_home):
    bob = user("bob")
    result = run_cli("join", "-u", "bot", "-p", str(server.port), input="hi\nbye\n", env=isolated_home)
    assert result.returncode == 0, result.stderr
    assert bob.expect("MSG|").endswith("|bot|hi")
    assert bob.expect("MSG|").endswith("|bot|bye")
    assert bob.expect("LEAVE|").split("|")[2] == "bot"
    assert "Traceback" not in result.stderr


def test_piped_lines_after_a_join_go_to_that_room(server, isolated_home):
    result = run_cli("join", "-u", "bot", "-p", str(server.port),
                     input="in main\n/join #deploys\ndeploy 42 started\n/join #main\nback in main\n",
                     env=isolated_home)
    assert result.returncode == 0, result.stderr
    stored = [(m.room, m.text) for m in server.history.recent(None, 50)[0] if m.sender == "bot"]
    assert stored == [("main", "in main"), ("main", "back in main")]
    in_deploys = [m.text for m in server.history.recent(None, 50, room="deploys")[0]]
    assert in_deploys == ["deploy 42 started"]


def test_piped_lines_after_a_refused_join_go_nowhere_and_the_exit_code_says_so(make_server, isolated_home):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", "anapass123")
    ana = login(server.port, "ana", "anapass123")
    ana.send(b"JOIN|#hiring|+i\n")
    ana.expect("JOIN_OK|#hiring")
    result = run_cli("join", "-u", "bot", "-p", str(server.port),
                     input="/join #hiring\nthe build log, for #hiring only\n", env=isolated_home)
    assert result.returncode == chatctl.EXIT_REJECTED
    assert "invite-only" in result.stderr and "the rest of the input was not sent" in result.stderr
    assert [m.text for m in server.history.recent(None, 50)[0] if m.sender == "bot"] == []  # not in #main


def test_a_long_pipe_is_paced_under_the_rate_limit_and_nothing_is_lost(server, isolated_home):
    lines = "".join(f"step {i}\n" for i in range(250))  # past the default burst (100) at 20 a second
    result = run_cli("join", "-u", "bot", "-p", str(server.port), input=lines, env=isolated_home, timeout=60)
    assert result.returncode == 0, result.stderr
    stored = [m.text for m in server.history.recent(None, 500)[0] if m.sender == "bot"]
    assert stored == [f"step {i}" for i in range(250)]


def test_plain_mode_prints_incoming_messages_as_plain_lines(server, user, isolated_home):
    bob = user("bob")
    proc = subprocess.Popen([*CHATCTL, "join", "-u", "bot", "-p", str(server.port)], env=isolated_home,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        proc.stdin.write("first\n")
        proc.stdin.flush()
        assert bob.expect("MSG|").endswith("|bot|first")
        bob.send(b"MSG|two\\nlines\n")
        assert read_line(proc.stdout).rstrip("\n").endswith(" <bob> two")
        assert read_line(proc.stdout).rstrip("\n") == "      │ lines"
        proc.stdin.close()
        assert proc.wait(10) == 0
        assert "\x1b" not in proc.stdout.read()
    finally:
        proc.kill()


def test_plain_mode_survives_invalid_utf8_input(server, user, isolated_home):
    bob = user("bob")
    result = subprocess.run([*CHATCTL, "join", "-u", "bot", "-p", str(server.port)], env=isolated_home,
                            input=b"ok \xff\xfe bytes\n", capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert bob.expect("MSG|").endswith("|bot|ok \ufffd\ufffd bytes")


def test_plain_mode_failures_have_exit_codes(server, user, isolated_home):
    user("taken")
    result = run_cli("join", "-u", "taken", "-p", str(server.port), input="hi\n", env=isolated_home)
    assert result.returncode == chatctl.EXIT_REJECTED
    assert result.stderr.strip().endswith("(name-taken)")
    result = run_cli("join", "-u", "bot", "-p", str(server.port), input="/msg ghost hi\n", env=isolated_home)
    assert result.returncode == chatctl.EXIT_REJECTED
    assert "not sent" in result.stderr and "unknown-user" in result.stderr
    result = run_cli("join", "-p", str(server.port), input="hi\n", env=isolated_home)
    assert result.returncode == chatctl.EXIT_USAGE


def test_parse_input():
    p = chatctl.parse_input
    assert p("hello /there") == chatctl.InputCommand("msg", text="hello /there")
    assert p("//etc/passwd") == chatctl.InputCommand("msg", text="/etc/passwd")
    assert p("/msg bob hi there") == chatctl.InputCommand("msg-to", "bob", "hi there")
    assert p("/MSG bob") == chatctl.InputCommand("usage", text=chatctl.JOIN_COMMANDS["/msg"])
    assert p("/me waves") == chatctl.InputCommand("me", text="waves")
    assert p("/ignore") == chatctl.InputCommand("ignore", None)
    assert p("/ignore eve") == chatctl.InputCommand("ignore", "eve")
    assert p("/quit gone fishing") == chatctl.InputCommand("quit", text="gone fishing")
    assert p("/nope x") == chatctl.InputCommand("unknown", text="/nope")


def test_ignore_hides_a_user(server, user, spawn_join):
    eve, bob = user("eve"), user("bob")
    ana = spawn_join("ana", server.port)
    ana.send("/ignore eve\r")
    ana.expect("ignoring eve")
    eve.send(b"MSG|spam spam\n")
    eve.expect("MSG_OK")  # queued for ana before anything sent from now on: ana sees it first
    bob.send(b"MSG|real news\n")
    ana.expect("real news")
    assert "spam spam" not in ana.before


# --- history in join -----------------------------------------------------------------------------


def test_join_shows_the_backlog_when_it_enters(server, user, spawn_join):
    bob = user("bob")
    for i in range(25):
        bob.send(f"MSG|old {i}\n".encode())
        bob.expect("MSG_OK")
    ana = spawn_join("ana", server.port)
    shown = ana.before  # between "connected" and the prompt
    assert re.search(r"the last 20 message\(s\) from the history:.*<bob> old 5\r\n.*<bob> old 24\r\n"
                     r".*end of history", shown, re.S), shown
    assert "old 4\r" not in shown
    bob.send(b"MSG|live now\n")
    ana.expect("<bob> live now")


def test_after_a_reconnect_join_shows_exactly_what_it_missed(make_server, spawn_join):
    first = make_server()
    port, db = first.port, first.config.db
    bob = RawClient(port)
    bob.send(b"USER|bob\nMSG|seen before\n")
    bob.expect("MSG_OK")
    ana = spawn_join("ana", port)
    assert "<bob> seen before" in ana.before  # the backlog
    bob.close()
    first.shutdown()
    ana.expect("reconnecting")
    second = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=port, db=db)).start()
    try:
        carol = RawClient(port)  # ana's first retry is 0.5 s away: these two land before it
        carol.send(b"USER|carol\nMSG|while you were away 1\nMSG|while you were away 2\n")
        carol.expect("MSG_OK")
        carol.expect("MSG_OK")
        ana.expect("reconnected to 127.0.0.1", timeout=15)
        shown = ""  # everything since the reconnect
        for line in (r"missed while away: 2 message\(s\)", "<carol> while you were away 1",
                     "<carol> while you were away 2"):
            ana.expect(line)
            shown += ana.before + ana.after
        carol.send(b"MSG|live again\n")
        ana.expect("<carol> live again")
        shown += ana.before
        assert "seen before" not in shown and shown.count("while you were away 1") == 1, shown  # none twice
        carol.close()
    finally:
        second.shutdown()


def test_join_with_backlog_off(make_server, user, spawn_join, isolated_home):
    server = make_server(history=False)
    bob = RawClient(server.port)
    bob.send(b"USER|bob\nMSG|not kept\n")
    bob.expect("MSG_OK")
    ana = spawn_join("ana", server.port)
    shown = ana.before  # between "connected" and the prompt, where a backlog would be
    bob.send(b"MSG|live\n")
    ana.expect("<bob> live")
    shown += ana.before
    assert "not kept" not in shown and "history" not in shown, shown
    bob.close()


def spawn_raw_join(env: dict, *args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", *args],
                         env={**env, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color"},
                         dimensions=(40, 140), encoding="utf-8", codec_errors="replace", timeout=10)


def test_first_tls_connection_shows_the_fingerprint_and_asks(make_server, isolated_home, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    chatctl.generate_certificate(cert, key)
    server = make_server(tls=True, tls_cert=str(cert), tls_key=str(key))
    refused = spawn_raw_join(isolated_home, "-u", "ana", "-p", str(server.port), "--tls")
    refused.expect("presents a certificate not seen before")
    refused.expect(re.escape(server.tls_fingerprint))
    refused.expect(r"Trust it and remember it\? \[y/N\]")
    refused.sendline("n")
    refused.expect("did not trust")
    refused.expect(pexpect.EOF)
    assert not chatctl.KnownServers().path.exists()
    child = spawn_raw_join(isolated_home, "-u", "ana", "-p", str(server.port), "--tls")
    child.expect(r"Trust it and remember it\?")
    child.sendline("y")
    child.expect(f"connected to 127.0.0.1:{server.port} as")
    child.expect("#main>")
    assert chatctl.KnownServers().lookup(f"127.0.0.1:{server.port}")[0] == server.tls_fingerprint
    bob = RawClient(server.port)
    bob.send(b"USER|bob\nMSG|hi over the wire\n")
    child.expect("<bob> hi over the wire")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


def test_register_protects_the_name_and_join_asks_for_its_password(make_server, isolated_home):
    server = make_server(auth_delay=0)
    child = spawn_raw_join(isolated_home, "-u", "ana", "-p", str(server.port))
    child.expect("#main>")
    child.send("/register\r")
    child.expect("new password for your name:")
    child.send("correct horse\r")
    child.expect("the same again:")
    assert "correct horse" not in child.before  # typed hidden, never echoed
    child.send("correct horse\r")
    child.expect("now protected by your password")
    child.send("seen again")  # the prompt shows what is typed once more
    child.expect("seen again")
    child.sendcontrol("u")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)

    impostor = RawClient(server.port)
    impostor.send(b"USER|ana\n")
    assert impostor.line().startswith("ERR|name-protected|")
    again = spawn_raw_join(isolated_home, "-u", "ana", "-p", str(server.port))
    again.expect("Password for ana:")
    again.sendline("correct horse")
    again.expect(f"connected to 127.0.0.1:{server.port} as")
    again.expect("#main>")
    again.sendcontrol("d")
    again.expect(pexpect.EOF)


# --- issue 10 ----------------------------------------------------------------------------------------


def test_a_message_padded_to_the_width_cannot_pass_for_a_line_of_its_own(server, user, spawn_join):
    ana = spawn_join("ana", server.port)  # a 140-column terminal
    bob = user("bob")
    bob.send(b"MSG|hello" + b" " * 300 + b"<admin> DM me your password\n")
    ana.expect("DM me your password")
    row = ana.before.replace("\r", "").split("\n")[-1]
    assert re.match(r"^ *│ +<admin> $", row), repr(row)  # its own row, marked as a continuation


def test_a_taken_name_is_said_once_and_nick_picks_another(make_server, spawn_join):
    first = make_server()
    port = first.port
    bob = spawn_join("bob", port)
    first.shutdown()
    bob.expect("reconnecting")
    second = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=port, history=False)).start()
    try:
        thief = RawClient(port)
        thief.send(b"USER|bob\n")
        assert thief.line() == "USER_OK"
        bob.expect("the name bob is taken by someone else", timeout=15)
        with pytest.raises(pexpect.TIMEOUT):
            bob.expect(["taken by someone else", "reconnected to"], timeout=3)  # said once, no loop
        protected_name(port, "boss", "bosspass123")
        bob.send("/nick boss\r")  # a protected name: refused, and bob picks another
        bob.expect("boss.*/nick another name", timeout=10)
        bob.send("/nick bob2\r")
        bob.expect("reconnected to 127.0.0.1:\\d+ as bob2", timeout=10)
        assert "bob2" in [u.name for u in second.users()]
    finally:
        second.shutdown()


def test_piped_join_prints_no_backlog_unless_asked(server, user, isolated_home):
    ana = user("ana")
    for i in range(3):
        ana.send(f"MSG|old {i}\n".encode())
        ana.expect("MSG_OK")
    quiet = run_cli("join", "-u", "bot", "-p", str(server.port), input="", env=isolated_home)
    assert quiet.returncode == 0 and "old" not in quiet.stdout
    asked = run_cli("join", "-u", "bot", "-p", str(server.port), "--backlog", "2", input="",
                    env=isolated_home)
    assert asked.returncode == 0 and "old 1" in asked.stdout and "old 2" in asked.stdout
    assert "old 0" not in asked.stdout


def test_a_wrong_password_asks_again(make_server, isolated_home):
    server = make_server(auth_delay=0)
    owner = RawClient(server.port)
    owner.send(b"USER|ana\nREGISTER|correct horse\nQUIT\n")
    assert owner.wait_closed()[:2] == ["USER_OK", "REGISTER_OK|ana"]
    env = {**isolated_home, "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", "-u", "ana", "-p", str(server.port)],
                          env=env, encoding="utf-8", timeout=10)
    child.expect("Password for ana")
    child.sendline("wrong one")
    child.expect("wrong password")
    child.expect("Password for ana")  # asked again, not the end
    child.sendline("correct horse")
    child.expect("connected to 127.0.0.1")
    child.expect("#main>")
    child.send("/quit\r")
    child.expect(pexpect.EOF)


def asleep(pid: int) -> bool:
    """The process sleeps (state S): after its prompt, in the read of the terminal.  (A Ctrl-C that
    comes between the prompt and that read is taken only once the read returns, at the next key.)"""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "S"


def test_ctrl_c_at_a_prompt_exits_130(server, isolated_home):
    child = pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", "-p", str(server.port)],
                          env=isolated_home, encoding="utf-8", timeout=10,
                          preexec_fn=default_sigint)  # as a shell starts it, even if this run ignores SIGINT
    child.expect("Your name: ")
    wait_until(lambda: asleep(child.pid))  # blocked reading the terminal, as when a person presses it
    child.sendcontrol("c")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Aborted" not in child.before


def test_rooms_in_join_prompt_tags_next_topic_and_part(server, spawn_join, user):
    bob = user("bob")
    bob.send(b"JOIN|#deploys|#random\n")
    bob.expect("JOIN_OK|#random")
    ana = spawn_join("ana", server.port, "--room", "deploys")
    assert ana.after == "#deploys>"  # the prompt names the current room
    assert chatctl.parse_event(bob.expect("ENTER|")).name == "ana"
    ana.send("hello deploys\r")
    assert bob.expect("MSG|").startswith("MSG|#deploys|") and bob.seen[-1].endswith("|ana|hello deploys")
    bob.send(b"MSG|#main|over in main\n")
    ana.expect(re.escape("[#main]") + r".*<bob> over in main")  # another room's line says its room
    ana.send("/next\r")
    ana.expect("now in #main")
    ana.expect_exact("#main>")
    ana.send("/join #ra\t")  # Tab knows the rooms on the server, not only those seen
    ana.expect(echoed("#random"))  # (redrawn as it completes: cursor codes may come between)
    ana.send("\r")
    ana.expect("now in #random")
    ana.send("/topic\r")
    ana.expect("#random has no topic")
    ana.send("/topic random things\r")
    assert chatctl.parse_event(bob.expect("TOPIC|")).text == "random things"
    ana.send("/rooms\r")
    ana.expect(r"\+ #deploys")  # sorted by name; + joined, * current
    ana.expect(r"\* #random")
    ana.send("/part\r")
    ana.expect("you left #random; now in #main")
    assert chatctl.parse_event(bob.expect("EXIT|")).room == "random"
    ana.send("/part #deploys\r")
    ana.expect("you left #deploys")
    ana.send("/part\r")  # #main is the last room left
    ana.expect("the only room you are in")
    ana.send("/join #bad!room\r")
    ana.expect("is not a room name")
    ana.sendcontrol("d")
    ana.expect(pexpect.EOF)


def test_join_rejoins_its_rooms_after_a_restart_and_fills_each_gap(make_server, spawn_join):
    first = make_server()
    port, db = first.port, first.config.db
    ana = spawn_join("ana", port, "--room", "deploys")
    assert ana.after == "#deploys>"
    first.shutdown()
    ana.expect("reconnecting")
    second = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=port, db=db, auth_delay=0))
    second.start()
    try:
        bob = RawClient(port)
        bob.send(b"HELLO|chatctl/1\nUSER|bob\nJOIN|#deploys\nMSG|#deploys|while ana was away\n")
        bob.expect("MSG_OK|")
        ana.expect("reconnected to 127.0.0.1", timeout=15)
        ana.expect("while ana was away")
        seen = ana.before
        wait_until(lambda: any(s.name == "ana" and "deploys" in s.rooms for s in second.registry.sessions()))
        bob.send(b"MSG|#deploys|live again\n")
        ana.expect("<bob> live again")
        seen += ana.before
        ana.sendline("/who")
        ana.expect("online")  # (a marker: everything the reconnect brought is on screen by now)
        seen += ana.before
        assert "in #deploys:" not in seen and "in #main:" not in seen  # a rejoin lists nobody
        bob.close()
    finally:
        second.shutdown()


def test_the_rooms_model_counts_what_came_elsewhere_and_next_takes_the_oldest():
    model = chatctl.RoomsModel()
    for room in ("deploys", "random"):
        model.entered(room)
    lines = [chatctl.ChatMessage(i, 0.0, "bob", "x", "msg", None, room)
             for i, room in ((5, "random"), (6, "deploys"), (7, "main"), (8, "random"))]
    assert [model.arrived(m.room, m.id, mention=m.id == 8) for m in lines] == [False, False, True, False]
    assert model.unread() == {"main": (0, 0), "deploys": (1, 0), "random": (2, 1)}
    assert model.next_unread() == "random"  # its oldest unread line (5) is the oldest of all
    assert model.switch("random") == 8
    assert model.next_unread() == "deploys"
    assert model.left("random") == "main"


def test_the_topic_that_comes_with_a_join_is_the_room_s_topic(server, user, spawn_join):
    model = chatctl.RoomsModel()
    model.set_topic("ops", "ops room")  # a JOIN's TOPIC line comes before its JOIN_OK
    model.entered("ops")
    assert model.topic("ops") == "ops room"
    xena = user("xena", hello=True)
    xena.send(b"JOIN|#ops\nTOPIC|#ops|ops room\n")
    xena.expect("TOPIC|#ops|")
    ana = spawn_join("ana", server.port)
    ana.sendline("/join #ops")
    ana.expect("now in #ops")
    ana.sendline("/topic")
    ana.expect(r"#ops topic: ops room")


def test_the_backlog_shown_on_entering_counts_as_read(make_server, spawn_join, isolated_home):
    server = make_server(auth_delay=0)
    ana = RawClient(server.port)  # a protected name: its read markers are kept between sessions
    ana.send(b"HELLO|chatctl/1\nUSER|ana\nREGISTER|anapass123\nJOIN|#deploys\nQUIT\n")
    ana.wait_closed()
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\nJOIN|#deploys\n")
    bob.expect("JOIN_OK")
    bob.send(b"MSG|#deploys|shown on entering\n")
    bob.expect("MSG_OK|")
    isolated_home["CHATCTL_USER_PASSWORD"] = "anapass123"
    ana = spawn_join("ana", server.port, "--room", "deploys")
    assert "shown on entering" in ana.before  # the backlog, before the prompt
    time.sleep(1.5)  # its MARK has gone out
    ana.sendline("/rooms")
    ana.expect(r"#deploys +\d+ online *([^\r\n]*)")
    assert "unread" not in ana.match.group(1), ana.match.group(0)
    bob.close()


def test_in_a_big_room_comings_and_goings_of_the_silent_are_hidden(server, user, isolated_home):
    """weechat's smart filter: past [client] quiet_joins members, the joined and left lines of people
    who have not spoken lately are left out; someone who spoke is still seen to leave."""
    crowd = [user(f"crowd{i}") for i in range(4)]
    env = {**isolated_home, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm-256color",
           "CHATCTL_QUIET_JOINS": "3"}
    ana = pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", "-u", "ana", "-p", str(server.port)], env=env,
                        dimensions=(40, 140), encoding="utf-8", codec_errors="replace", timeout=10)
    try:
        ana.expect(r"#main>")
        passer = user("passer")
        passer.send(b"QUIT\n")
        passer.wait_closed()
        talker = user("talker")
        talker.send(b"MSG|hello all\n")
        ana.expect("hello all")
        assert "passer" not in ana.before and "talker joined" not in ana.before
        talker.send(b"QUIT|lunch\n")
        ana.expect(r"talker left \(quit: lunch\)")
        assert "passer" not in ana.before
        small = pexpect.spawn(sys.executable, [*CHATCTL[1:], "join", "-u", "bea", "-p", str(server.port)],
                              env={**env, "CHATCTL_QUIET_JOINS": "0"}, dimensions=(40, 140), encoding="utf-8",
                              codec_errors="replace", timeout=10)
        try:
            small.expect(r"#main>")
            user("walker").send(b"QUIT\n")
            small.expect("walker joined")  # 0: every line shown
            small.expect(r"walker left")
        finally:
            small.close(force=True)
    finally:
        ana.close(force=True)
        for client in crowd:
            client.close()


def test_help_shows_every_argument(server, spawn_join):
    ana = spawn_join("ana", server.port)
    ana.send("/help\r")
    ana.expect(re.escape("/part [#ROOM]"))
    ana.expect(re.escape("/quit [REASON]"))


def test_joining_a_room_says_its_topic_once(server, spawn_join, user):
    bob = user("bob")
    bob.send(b"JOIN|#deploys\nTOPIC|#deploys|deploy status goes here\n")
    bob.expect("TOPIC|#deploys|")
    ana = spawn_join("ana", server.port)
    ana.send("/join #deploys\r")
    ana.expect("now in #deploys: deploy status goes here")
    said = ana.before
    ana.expect_exact("#deploys>")
    assert "topic: deploy status" not in said + ana.before
    ana.send("/rooms\r")
    ana.expect(r"rooms \(\* current, \+ joined\):\s+\* #deploys  (\s*)2 online")
    ana.expect(r"\+ #main     (\s*)2 online")  # the columns line up


def test_joining_a_room_shows_its_last_lines(server, spawn_join, user):
    bob = user("bob", hello=True)
    bob.send(b"JOIN|#deploys\nMSG|#deploys|build 41 went out\n")
    bob.expect("MSG_OK")
    ana = spawn_join("ana", server.port)
    ana.send("/join #deploys\r")
    ana.expect("now in #deploys")
    ana.expect("build 41 went out")  # from the history, as on entering the first room
    ana.send("/part\r")
    ana.expect("you left #deploys")
    bob.send(b"MSG|#deploys|build 42 while ana was out\n")
    bob.expect("MSG_OK")
    ana.send("/join #deploys\r")
    ana.expect("build 42 while ana was out")
    said = ana.before
    ana.expect_exact("#deploys>")
    assert "build 41" not in said + ana.before  # what was shown is not shown again
