"""chatctl tui: the Textual app under its own test harness (App.run_test and its Pilot), against real
servers on loopback; and chatctl tui as a real process in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import sys
import time

import pexpect
import pytest

import chatctl
from conftest import CHATCTL, ROOT, RawClient, protected_name, run_cli, wait_until

pytest.importorskip("textual", reason="chatctl tui needs Textual (pip install -r requirements-test.txt)")


def client_config(port: int, **keys) -> chatctl.ClientConfig:
    return chatctl.ClientConfig(host="127.0.0.1", port=port, **keys)


def run(scenario, config: chatctl.ClientConfig, name: str = "ana", room: str = "main",
        size: tuple[int, int] = (120, 36)):
    """Run ``scenario(app, pilot)`` in the real app; returns the app after it has stopped."""
    app = chatctl.tui_app()(config, name, "mentions", room)

    async def main():
        async with app.run_test(size=size) as pilot:
            await scenario(app, pilot)
            await pilot.press("ctrl+q")
            await until(pilot, lambda: not app.is_running, "the app quits on Ctrl-q")

    asyncio.run(main())
    return app


async def until(pilot, predicate, what: str, timeout: float = 20.0):
    """Let the app run until ``predicate()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting until {what}")


def showing(app, screen: str) -> bool:
    """The dialog ``screen`` is up, composed and mounted (its widgets mount one by one)."""
    return type(app.screen).__name__ == screen and app.screen.is_mounted


def log_text(app) -> str:
    return "\n".join(strip.text for strip in app.query_one("#log").lines)


def room_list(app) -> list[str]:
    rooms = app.query_one("#rooms")
    return [str(rooms.get_option_at_index(i).prompt) for i in range(rooms.option_count)]


async def connected(app, pilot):
    await until(pilot, lambda: app.chat_on and app.chat.session.connected, "connected")


async def type_line(pilot, text: str):
    await pilot.press(*text)
    await pilot.press("enter")


def raw_user(port: int, name: str, *rooms: str) -> RawClient:
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1\nUSER|{name}\n".encode())
    client.expect("USER_OK")
    if rooms:
        client.send(("JOIN|" + "|".join(f"#{r}" for r in rooms) + "\n").encode())
        for _ in rooms:
            client.expect("JOIN_OK")
    return client


def test_messages_land_in_their_room_with_unread_counts_and_switching_clears_them(server):
    bob = raw_user(server.port, "bob", "deploys")

    async def scenario(app, pilot):
        await connected(app, pilot)
        await type_line(pilot, "/join #deploys")
        await until(pilot, lambda: app.chat.model.current == "deploys", "ana is in #deploys")
        bob.send(b"MSG|#main|in main while ana looks elsewhere\nMSG|#deploys|in deploys\n")
        await until(pilot, lambda: "in deploys" in log_text(app), "the #deploys line is shown")
        assert "in main while" not in log_text(app)  # not in the room on screen
        await until(pilot, lambda: room_list(app)[:2] == ["1 #main 1", "2 #deploys"], "#main counts 1 unread")
        await pilot.press("alt+1")
        await until(pilot, lambda: "in main while ana looks elsewhere" in log_text(app), "#main is shown")
        assert room_list(app)[:2] == ["1 #main", "2 #deploys"]  # read now
        assert app.query_one("#topic").render().plain.startswith("#main")
        await pilot.press("ctrl+n")
        await until(pilot, lambda: app.chat.model.current == "deploys", "Ctrl-n goes to the next room")

    run(scenario, client_config(server.port))
    bob.close()


def test_mentions_stand_out_and_count_and_dms_get_a_conversation(server):
    bob = raw_user(server.port, "bob", "deploys")

    async def scenario(app, pilot):
        await connected(app, pilot)
        bob.send(b"MSG|#main|ana: can you look?\nDM|ana|psst\n")
        await until(pilot, lambda: "psst" not in log_text(app) and "can you look" in log_text(app), "mention")
        assert "! <bob> ana: can you look?" in log_text(app)  # marked in monochrome too
        await until(pilot, lambda: any(r.startswith("2 @bob 1") for r in room_list(app)), "a DM conversation")
        await pilot.press("alt+a")  # the conversation with activity
        await until(pilot, lambda: app.chat.model.current == "@bob", "Alt-a goes to @bob")
        await until(pilot, lambda: "[DM] <bob> psst" in log_text(app), "the DM is shown there")
        await type_line(pilot, "and back to you")  # plain text in a DM conversation is a DM
        line = bob.expect("DM|")
        assert line.endswith("|ana|bob|and back to you")

    run(scenario, client_config(server.port))
    bob.close()


def test_markup_and_control_characters_are_shown_literally(server):
    bob = raw_user(server.port, "bob")
    hostile = "[bold red]not markup[/] \u202eevil"

    async def scenario(app, pilot):
        await connected(app, pilot)
        bob.send(f"MSG|#main|{hostile}\n".encode())
        await until(pilot, lambda: "not markup" in log_text(app), "the line is shown")
        assert "<bob> [bold red]not markup[/] evil" in log_text(app)  # (the server drops U+202E)

    run(scenario, client_config(server.port))
    bob.close()
    # What a hostile server might still send: controls and bidi marks become U+FFFD, markup stays text.
    msg = chatctl.ChatMessage(1, 0.0, "bo\x1bb", "x\x1b[2J\u202e[red]y[/red]\nfake <eve> line")
    text = chatctl.tui_line_text(chatctl.TuiLine(msg), 80)
    assert text.plain.endswith("<bo\ufffdb> x\ufffd[2J\ufffd[red]y[/red]\n      │ fake <eve> line")
    assert "\x1b" not in text.plain and not text.spans[-1].style.startswith("red")


def test_scrolling_past_the_top_loads_older_history_and_memory_stays_bounded(make_server):
    server = make_server(rate=0)
    bob = raw_user(server.port, "bob")
    bob.send(b"".join(f"MSG|#main|old line {i}\n".encode() for i in range(1, 351)))
    for _ in range(350):
        bob.expect("MSG_OK")

    async def scenario(app, pilot):
        await connected(app, pilot)
        conversation = app.conversation("main")
        await until(pilot, lambda: "old line 350" in log_text(app), "the backlog is shown")
        for _ in range(40):
            if "old line 1\n" in log_text(app) + "\n":
                break
            await pilot.press("pageup")
            await pilot.pause(0.05)
        assert "old line 1\n" in log_text(app) + "\n", "PageUp past the top reaches the oldest message"
        assert len(conversation.lines) <= 200  # the window (lines = 200) let the newest go
        assert conversation.newer_cut
        assert "old line 350" not in log_text(app)
        for _ in range(40):  # PageDown past the end: the newest are fetched again
            if "old line 350" in log_text(app):
                break
            await pilot.press("pagedown")
            await pilot.pause(0.05)
        assert "old line 350" in log_text(app)
        assert not conversation.newer_cut

    run(scenario, client_config(server.port, backlog=20, lines=200))
    bob.close()


def test_a_burst_keeps_each_room_within_its_bound(make_server):
    server = make_server(rate=0)
    bob = raw_user(server.port, "bob")

    async def scenario(app, pilot):
        await connected(app, pilot)
        bob.send(b"".join(f"MSG|#main|burst {i}\n".encode() for i in range(1000)))
        await until(pilot, lambda: "burst 999" in log_text(app), "the whole burst arrives", timeout=30)
        assert len(app.conversation("main").lines) == 300
        await type_line(pilot, "still typing")
        await until(pilot, lambda: "<ana> still typing" in log_text(app), "our own line after the burst")

    run(scenario, client_config(server.port, backlog=0, lines=300))
    bob.close()


def test_a_reconnect_fills_the_gap_in_each_room(make_server):
    first = make_server()
    port, db = first.port, first.config.db
    state = {}

    async def scenario(app, pilot):
        await connected(app, pilot)
        await type_line(pilot, "/join #deploys")
        await until(pilot, lambda: app.chat.model.current == "deploys", "in #deploys")
        first.shutdown()
        await until(pilot, lambda: not app.chat.session.connected, "the link is down")
        second = chatctl.ChatServer(chatctl.ServerConfig(host="127.0.0.1", port=port, db=db, auth_delay=0))
        state["second"] = second.start()
        bob = raw_user(port, "bob", "deploys")
        bob.send(b"MSG|#deploys|deploys while ana was away\nMSG|#main|main while she was away\n")
        bob.expect("MSG_OK")
        bob.expect("MSG_OK")
        await until(pilot, lambda: app.chat.session.connected, "reconnected", timeout=20)
        await until(pilot, lambda: "deploys while ana was away" in log_text(app), "#deploys's gap is filled")
        assert "main while she was away" not in log_text(app)
        assert app.chat.model.unread()["main"] == (1, 0)
        await pilot.press("alt+1")
        await until(pilot, lambda: "main while she was away" in log_text(app), "the #main gap is filled")
        bob.close()

    try:
        run(scenario, client_config(port))
    finally:
        if "second" in state:
            state["second"].shutdown()


def test_help_screen_lists_keys_and_commands(server):
    async def scenario(app, pilot):
        await connected(app, pilot)
        await pilot.press("f1")
        await until(pilot, lambda: showing(app, "HelpScreen"), "F1 opens the help")
        shown = " ".join(str(w.content) for w in app.screen.query("Static"))
        assert "Ctrl-k" in shown and "/search" in shown and "/join" in shown
        help_text = app.screen.query_one("#help")
        await pilot.press("pagedown")  # taller than the screen: it scrolls
        assert help_text.max_scroll_y > 0 and help_text.scroll_y > 0
        await pilot.press("escape")
        await until(pilot, lambda: type(app.screen).__name__ != "HelpScreen", "Escape closes it")
        await pilot.press("question_mark")  # ? on an empty input line is help too
        await until(pilot, lambda: showing(app, "HelpScreen"), "? opens the help")
        await pilot.press("escape")

    run(scenario, client_config(server.port))


def test_tab_completes_commands_rooms_and_names(server):
    bob = raw_user(server.port, "bob", "deploys")

    async def scenario(app, pilot):
        await connected(app, pilot)
        field = app.query_one("#input")
        await pilot.press("/", "j", "o", "tab")
        assert field.value == "/join "
        await pilot.press("#", "d", "e", "tab")
        assert field.value == "/join #deploys "
        field.value = ""
        await pilot.press("b", "o", "tab")
        assert field.value == "bob: "

    run(scenario, client_config(server.port))
    bob.close()


def test_tab_knows_a_room_made_after_connecting_at_the_first_press(server):
    async def scenario(app, pilot):
        await connected(app, pilot)
        app.chat.rooms_learned = time.monotonic() - chatctl.ROOM_LIST_FRESH - 1  # the list is old now
        state["bob"] = raw_user(server.port, "bob", "freshroom")
        field = app.query_one("#input")
        await pilot.press("/", "j", "o", "i", "n", "space", "#", "f", "r", "tab")
        await until(pilot, lambda: field.value == "/join #freshroom ", "one Tab completes it")

    state = {}
    run(scenario, client_config(server.port))
    state["bob"].close()


def test_tab_completes_a_new_room_when_the_list_comes_back_before_it_looks(server, monkeypatch):
    # The reader thread may take the room list in between Tab asking for it and Tab looking whether
    # it is still to come: here it always does.
    asked = chatctl.ChatClient.completions

    def completions_then_reply(chat, text):
        found = asked(chat, text)
        wait_until(lambda: not chat.rooms_pending, timeout=10)
        return found

    monkeypatch.setattr(chatctl.ChatClient, "completions", completions_then_reply)

    async def scenario(app, pilot):
        await connected(app, pilot)
        app.chat.rooms_learned = time.monotonic() - chatctl.ROOM_LIST_FRESH - 1
        state["bob"] = raw_user(server.port, "bob", "freshroom")
        field = app.query_one("#input")
        await pilot.press("/", "j", "o", "i", "n", "space", "#", "f", "r", "tab")
        await until(pilot, lambda: field.value == "/join #freshroom ", "one Tab completes it", timeout=5)

    state = {}
    run(scenario, client_config(server.port))
    state["bob"].close()


def test_scrolled_back_what_you_send_comes_into_view(make_server):
    server = make_server(rate=0)
    bob = raw_user(server.port, "bob")
    bob.send(b"".join(f"MSG|#main|line {i}\n".encode() for i in range(200)))
    for _ in range(200):
        bob.expect("MSG_OK")

    async def scenario(app, pilot):
        await connected(app, pilot)
        await until(pilot, lambda: "line 199" in log_text(app), "the newest page")
        log = app.query_one("#log")
        await pilot.press("pageup", "pageup")
        assert log.scroll_y < log.max_scroll_y
        await type_line(pilot, "/rooms")
        await until(pilot, lambda: "rooms (* current" in log_text(app), "the answer")
        await until(pilot, lambda: log.scroll_y >= log.max_scroll_y - 1, "at the end, where the answer is",
                    timeout=5)
        assert "end of history" not in log_text(app)  # join's backlog notices are not tui's

    run(scenario, client_config(server.port))
    bob.close()


def test_search_shows_matches_and_jumps_to_one_in_context(make_server):
    server = make_server(rate=0)
    bob = raw_user(server.port, "bob")
    lines = [f"filler {i}" if i != 40 else "the deploy key is rotated" for i in range(1, 121)]
    bob.send(b"".join(f"MSG|#main|{text}\n".encode() for text in lines))
    for _ in lines:
        bob.expect("MSG_OK")

    async def scenario(app, pilot):
        await connected(app, pilot)
        await type_line(pilot, "/search deploy key")
        await until(pilot, lambda: showing(app, "PickScreen"), "the results panel")
        await pilot.press("enter")
        await until(pilot, lambda: "filler 39" in log_text(app) and "filler 41" in log_text(app),
                    "the hit in context")
        assert "▶ <bob> the deploy key is rotated" in log_text(app)  # the hit, marked
        assert "! " not in log_text(app)  # and no mention where there is none
        assert "filler 120" not in log_text(app)  # the window is around the hit, not at the end

    run(scenario, client_config(server.port, backlog=10))
    bob.close()


def test_a_protected_name_asks_for_its_password_in_a_dialog(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", "anapass123")

    async def scenario(app, pilot):
        await until(pilot, lambda: showing(app, "AskScreen"), "the password dialog")
        assert app.screen.query_one("Input").password  # hidden as typed
        await pilot.press(*"anapass123", "enter")
        await connected(app, pilot)

    run(scenario, client_config(server.port))


def test_a_new_tls_certificate_is_asked_about_first(make_server):
    server = make_server(tls=True)

    async def refuse(app, pilot):
        await until(pilot, lambda: showing(app, "TrustScreen"), "the first-use dialog")
        assert "SHA256:" in " ".join(str(w.render()) for w in app.screen.query("Label"))
        app.screen.query_one("#cancel").press()
        await until(pilot, lambda: not app.is_running, "refusing ends the app")

    app = chatctl.tui_app()(client_config(server.port, tls=True), "ana", "mentions", "main")

    async def main():
        async with app.run_test(size=(120, 36)) as pilot:
            await refuse(app, pilot)

    asyncio.run(main())
    assert isinstance(app.error, chatctl.TlsError)

    async def trust(app, pilot):
        await until(pilot, lambda: showing(app, "TrustScreen"), "the first-use dialog")
        app.screen.query_one("#trust").press()
        await connected(app, pilot)

    run(trust, client_config(server.port, tls=True))
    run(connected, client_config(server.port, tls=True))  # pinned now: no question


def test_a_name_is_asked_when_none_is_given_and_a_taken_one_asks_again(server):
    bob = raw_user(server.port, "bob")

    async def scenario(app, pilot):
        await until(pilot, lambda: showing(app, "AskScreen"), "the name dialog")
        await pilot.press(*"bob", "enter")
        await until(pilot, lambda: "taken" in " ".join(str(w.render()) for w in app.screen.query("Label")),
                    "a taken name is said in the dialog")
        await pilot.press(*"ana", "enter")
        await connected(app, pilot)
        assert app.chat.name == "ana"

    run(scenario, client_config(server.port), name="")
    bob.close()


def test_a_server_that_is_down_is_one_line_on_exit(isolated_home):
    from conftest import free_port

    result = run_cli("tui", "-u", "ana", "-p", str(free_port()), env=isolated_home)
    assert result.returncode == 2 and "needs a terminal" in result.stderr  # stdin is not a terminal here
    app = run_tui_expecting_exit(client_config(free_port()))
    assert isinstance(app.error, chatctl.ClientError)


def run_tui_expecting_exit(config):
    app = chatctl.tui_app()(config, "ana", "mentions", "main")

    async def main():
        async with app.run_test() as pilot:
            await until(pilot, lambda: not app.is_running, "the app gives up")

    asyncio.run(main())
    return app


def test_send_and_who_do_not_import_textual(server, isolated_home):
    import subprocess

    code = ("import sys, chatctl\n"
            "try:\n    chatctl.main(['who', '-p', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print('textual' in sys.modules)")
    env = {**isolated_home, "PYTHONPATH": str(ROOT)}  # this checkout's chatctl, installed or not
    result = subprocess.run([sys.executable, "-c", code, str(server.port)], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.stdout.strip().endswith("False"), result.stdout + result.stderr


def test_chatctl_tui_in_a_real_terminal(server, isolated_home):
    env = {**isolated_home, "TERM": "xterm-256color"}
    tui = pexpect.spawn(sys.executable, [*CHATCTL[1:], "tui", "-u", "ana", "-p", str(server.port)],
                        env=env, dimensions=(30, 110), encoding="utf-8", codec_errors="replace", timeout=15)
    try:
        tui.expect("connected to 127.0.0.1")
        bob = raw_user(server.port, "bob", "deploys")
        bob.send(b"TOPIC|#deploys|ship it carefully\n")
        bob.expect("TOPIC|#deploys|")
        bob.send(b"MSG|#main|hello from a raw client\n")
        tui.expect("hello from a raw client")
        tui.send("hi bob\r")
        assert bob.expect("MSG|#main|").endswith("|ana|hi bob")
        tui.send("/join #deploys\r")
        wait_until(lambda: any(s.name == "ana" and "deploys" in s.rooms for s in server.registry.sessions()))
        tui.expect("ship it carefully")  # #deploys is on screen (its topic is shown nowhere else)
        bob.send(b"MSG|#main|said while you were away\n")  # into #main's log, not on screen yet
        bob.expect("MSG_OK")
        tui.send("\x1b1")  # Alt-1 as terminals send it: back to conversation 1, #main
        tui.expect("said while you were away")  # #main's log is on screen again
        tui.send("back in main\r")
        assert bob.expect("MSG|#main|").endswith("|ana|back in main")
        tui.send("bo\tsee this\r")  # typed in one burst: Tab completes what came before it
        assert bob.expect("MSG|#main|").endswith("|ana|bob: see this")
        tui.send("\x1b[200~pasted once\x1b[201~\r")  # a bracketed paste, as terminals send it
        assert bob.expect("MSG|#main|").endswith("|ana|pasted once")
        tui.send("\x1b[200~first\rsecond\x1b[201~")  # lines end in CR in a terminal's paste
        tui.expect("Send these 2 pasted lines")
        tui.send("\r")
        assert bob.expect("MSG|#main|").endswith("|ana|first\\nsecond")
        tui.sendcontrol("q")
        tui.expect(pexpect.EOF)
        tui.close()
        assert tui.exitstatus == 0
        bob.close()
    finally:
        tui.close(force=True)


def test_direct_messages_from_many_names_keep_a_bounded_list_and_say_what_went(make_server):
    server = make_server(rate=0, max_per_address=0)
    senders = [raw_user(server.port, f"spammer{i}") for i in range(chatctl.MAX_DM_CONVERSATIONS + 10)]

    async def scenario(app, pilot):
        await connected(app, pilot)
        for sender in senders:
            sender.send(b"DM|ana|hi\n")
            await pilot.pause(0.01)
        await until(pilot, lambda: app.chat.model.has("@spammer59"), "the last DM arrives")
        talks = [n for n in app.chat.model.conversations() if n.startswith("@")]
        assert len(talks) == chatctl.MAX_DM_CONVERSATIONS
        assert "@spammer0" not in talks  # the quietest went (all are unread)
        assert len(app.conversations) <= chatctl.MAX_DM_CONVERSATIONS + 1
        await until(pilot, lambda: "closed the conversation with spammer0 and its 1 unread" in log_text(app),
                    "the closing is said")

    run(scenario, client_config(server.port))
    for sender in senders:
        sender.close()


def test_logged_out_from_another_device_ends_the_app_with_the_reason(make_server):
    server = make_server(auth_delay=0)
    protected_name(server.port, "ana", "anapass123")
    app = chatctl.tui_app()(client_config(server.port, user_password="anapass123"), "ana", "mentions", "main")

    async def main():
        async with app.run_test() as pilot:
            await connected(app, pilot)
            phone = RawClient(server.port)  # the owner, on another device, logs this one out
            phone.send(b"HELLO|chatctl/1\nUSER|ana|anapass123\nLOGOUT|others|anapass123\n")
            phone.expect("LOGOUT_OK|1")
            await until(pilot, lambda: not app.is_running, "the app ends")
            phone.close()

    asyncio.run(main())
    assert isinstance(app.error, chatctl.ClientError) and "logged out by ana's device" in str(app.error)


def test_the_hand_over_queue_is_bounded_and_a_full_one_makes_the_reader_wait():
    import threading

    woken = []
    front = chatctl.QueuedFrontEnd(lambda: woken.append(1), most=3)
    for i in range(3):
        front.notice(f"n{i}")
    waiting = threading.Thread(target=front.notice, args=("fourth",), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # the reader waits: nothing piles up in memory
    items, more = front.take(2)
    assert [i[1] for i in items] == ["n0", "n1"] and more
    waiting.join(2)
    assert not waiting.is_alive()
    assert [i[1] for i in front.take(10)[0]] == ["n2", "fourth"]
    front.close()
    front.notice("after the end")  # dropped, never waits
    assert front.take(10)[0] == []


def test_a_flood_on_screen_keeps_the_log_bounded_and_ctrl_end_returns_to_the_newest(make_server):
    server = make_server(rate=0, address_byte_rate=0)
    bob = raw_user(server.port, "bob")

    async def scenario(app, pilot):
        await connected(app, pilot)
        log = app.query_one("#log")
        bob.send(b"".join(f"MSG|#main|flood {i}\n".encode() for i in range(3000)))
        await until(pilot, lambda: "flood 2999" in log_text(app), "the flood is on screen", timeout=60)
        assert len(log.lines) <= 300 * chatctl.TUI_ROWS_PER_LINE
        assert len(app.conversation("main").lines) <= 300
        for _ in range(10):
            app.load_older()
            await pilot.pause(0.2)
        assert app.conversation("main").newer_cut
        await pilot.press("ctrl+end")
        await until(pilot, lambda: "flood 2999" in log_text(app) and not app.conversation("main").newer_cut,
                    "Ctrl-End shows the newest at once")

    run(scenario, client_config(server.port, lines=300))
    bob.close()


def test_long_names_are_cut_on_one_row_not_wrapped_into_other_names(server):
    spoofers = [raw_user(server.port, "z" * 21 + "pat"), raw_user(server.port, "y" * 21 + "admin")]

    async def scenario(app, pilot):
        await connected(app, pilot)
        await until(pilot, lambda: "zzz" in str(app.query_one("#members").content), "the members are listed")
        rows = str(app.query_one("#members").content).split("\n")
        assert "pat" not in rows and "admin" not in rows
        assert any(row.startswith("zzzz") and row.endswith("…") for row in rows)

    run(scenario, client_config(server.port), name="watcher")
    for spoofer in spoofers:
        spoofer.close()


def test_a_changed_certificate_on_reconnect_exits_6(make_server, tmp_path):
    pairs = []
    for n in (1, 2):
        cert, key = tmp_path / f"cert{n}.pem", tmp_path / f"key{n}.pem"
        chatctl.generate_certificate(cert, key)
        pairs.append((str(cert), str(key)))
    first = make_server(tls=True, tls_cert=pairs[0][0], tls_key=pairs[0][1])
    port, db = first.port, first.config.db
    state = {}
    app = chatctl.tui_app()(client_config(port, tls=True, tls_fingerprint=first.tls_fingerprint), "ana",
                            "mentions", "main")

    async def main():
        async with app.run_test() as pilot:
            await connected(app, pilot)
            first.shutdown()
            config = chatctl.ServerConfig(host="127.0.0.1", port=port, db=db, tls=True, tls_cert=pairs[1][0],
                                          tls_key=pairs[1][1])
            state["second"] = chatctl.ChatServer(config).start()
            await until(pilot, lambda: not app.is_running, "the app ends", timeout=30)

    try:
        asyncio.run(main())
    finally:
        if "second" in state:
            state["second"].shutdown()
    assert app.error is not None and app.error.exit_code == chatctl.EXIT_TLS


def test_a_multi_line_paste_asks_then_goes_as_one_message(server):
    from textual import events

    bob = raw_user(server.port, "bob")

    async def scenario(app, pilot):
        await connected(app, pilot)
        app.query_one("#input").post_message(events.Paste("first line\nsecond line\n[red]third[/red]"))
        await until(pilot, lambda: showing(app, "PasteScreen"), "the paste is asked about")
        preview = str(app.screen.query_one("#preview").render())
        assert preview == "first line\nsecond line\n[red]third[/red]"  # every line, as written
        app.screen.query_one("#send").press()
        await until(pilot, lambda: "second line" in log_text(app), "our own lines are shown")
        assert bob.expect("MSG|#main|").endswith("|ana|first line\\nsecond line\\n[red]third[/red]")
        field = app.query_one("#input")
        await pilot.press("up")  # on an empty line: our last message, to edit
        assert field.value == "/edit 1 first line⏎second line⏎[red]third[/red]"
        await pilot.press("up")  # then what was typed, recalled on the one-line input, its breaks marked
        assert field.value == "first line⏎second line⏎[red]third[/red]"
        await pilot.press("enter")
        assert bob.expect("MSG|#main|").endswith("|ana|first line\\nsecond line\\n[red]third[/red]")
        field.post_message(events.Paste("\n".join(f"log {i}" for i in range(8))))
        await until(pilot, lambda: showing(app, "PasteScreen"), "the long paste is asked about")
        preview = str(app.screen.query_one("#preview").render())
        assert preview == "log 0\nlog 1\nlog 2\nlog 3\nlog 4\n… and 3 more"
        app.screen.query_one("#cancel").press()

    run(scenario, client_config(server.port))
    bob.close()


def test_what_is_typed_while_connecting_is_kept(server, monkeypatch):
    # A person types as soon as the name is in; the connection (held here) comes a moment later.
    import threading

    go = threading.Event()
    start = chatctl.ChatClient.start

    def held_start(chat, hint=""):
        go.wait(10)
        return start(chat, hint)

    monkeypatch.setattr(chatctl.ChatClient, "start", held_start)
    bob = raw_user(server.port, "bob")

    async def main():
        async with app.run_test() as pilot:
            await until(pilot, lambda: showing(app, "AskScreen"), "the name dialog")
            await type_line(pilot, "ana")
            await type_line(pilot, "hello already")  # Enter while connecting: it goes once connected
            await pilot.press(*"and more")
            go.set()
            await connected(app, pilot)
            assert bob.expect("MSG|#main|").endswith("|ana|hello already")
            await until(pilot, lambda: app.query_one("#input").value == "and more", "the rest is kept")
            await pilot.press("ctrl+q")
            await until(pilot, lambda: not app.is_running, "the app quits on Ctrl-q")

    app = chatctl.tui_app()(client_config(server.port), "", "mentions", "main")
    asyncio.run(main())
    bob.close()


def burst(app, keys: str) -> None:
    """``keys`` as one read from the terminal brings them (a fast typist over ssh, tmux send-keys,
    a browser): every key reaches the app before the first is handled.  A newline is Enter."""
    from textual import events

    for char in keys:
        key = {"\n": "enter", " ": "space"}.get(char, char)
        app.post_message(events.Key(key, "\r" if char == "\n" else char))


def test_lines_typed_in_one_burst_are_sent_apart_and_in_order(server):
    bob = raw_user(server.port, "bob")

    async def scenario(app, pilot):
        await connected(app, pilot)
        burst(app, "first line\nsecond line\nthird")
        await until(pilot, lambda: app.query_one("#input").value == "third", "the rest waits in the input")
        assert [bob.expect("MSG|#main|").split("|")[-1] for _ in range(2)] == ["first line", "second line"]

    run(scenario, client_config(server.port))
    bob.close()


def test_recall_the_switcher_and_register_take_keys_in_bursts(server):
    async def scenario(app, pilot):
        await connected(app, pilot)
        field = app.query_one("#input")
        burst(app, "/join #deploys\none\n")
        await until(pilot, lambda: app.chat.model.has("deploys") and not field.value, "joined, sent")
        await pilot.press("up")
        assert field.value == "one"
        await pilot.press("up", "up", "down")
        assert field.value == "one"
        field.value = ""
        await pilot.press("ctrl+k")
        await until(pilot, lambda: showing(app, "PickScreen"), "the switcher")
        burst(app, "mai\n")
        await until(pilot, lambda: app.chat.model.current == "main", "the switcher's filter and Enter")
        burst(app, "/register\n")
        await until(pilot, lambda: showing(app, "NewPasswordScreen"), "the new password dialog")
        burst(app, "burst pass 1\nburst pass 1\n")
        await until(pilot, lambda: server.accounts.password_hash("ana") is not None, "the name protected")

    run(scenario, client_config(server.port))


def test_the_name_and_a_first_line_typed_in_one_burst(server):
    bob = raw_user(server.port, "bob")

    async def main():
        async with app.run_test() as pilot:
            await until(pilot, lambda: showing(app, "AskScreen"), "the name dialog")
            burst(app, "ana\nhello from the start")
            await connected(app, pilot)
            assert app.chat.name == "ana"
            await until(pilot, lambda: app.query_one("#input").value == "hello from the start",
                        "the line typed behind the name is in the input")
            await pilot.press("enter")
            assert bob.expect("MSG|#main|").endswith("|ana|hello from the start")
            await pilot.press("ctrl+q")
            await until(pilot, lambda: not app.is_running, "the app quits on Ctrl-q")

    app = chatctl.tui_app()(client_config(server.port), "", "mentions", "main")
    asyncio.run(main())
    bob.close()


def test_ctrl_c_at_a_question_before_the_chat_is_interrupted(server):
    async def scenario(app, pilot):
        await until(pilot, lambda: showing(app, "AskScreen"), "the name dialog")
        await pilot.press("ctrl+c")
        await until(pilot, lambda: not app.is_running, "the app ends")

    app = chatctl.tui_app()(client_config(server.port), "", "mentions", "main")

    async def main():
        async with app.run_test() as pilot:
            await scenario(app, pilot)

    asyncio.run(main())
    assert app.error is not None and app.error.exit_code == chatctl.EXIT_INTERRUPTED


def test_escape_at_the_name_dialog_ends_it_saying_so(server):
    app = chatctl.tui_app()(client_config(server.port), "", "mentions", "main")

    async def main():
        async with app.run_test() as pilot:
            await until(pilot, lambda: showing(app, "AskScreen"), "the name dialog")
            await pilot.press("escape")
            await until(pilot, lambda: not app.is_running, "the app ends")

    asyncio.run(main())
    assert app.error is not None and "no name" in str(app.error) and app.error.exit_code != 0


def test_register_refuses_a_short_password_in_its_dialog(server):
    async def scenario(app, pilot):
        await connected(app, pilot)
        await type_line(pilot, "/register")
        await until(pilot, lambda: showing(app, "NewPasswordScreen"), "the new password dialog")
        burst(app, "short\nshort\n")
        await until(pilot, lambda: "at least" in str(app.screen.query_one("#problem").content), "a reason")
        assert showing(app, "NewPasswordScreen")  # still asking

    run(scenario, client_config(server.port))


def test_in_a_browser_the_reason_the_chat_ends_is_shown_before_it_ends(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("TEXTUAL_DRIVER", "textual.drivers.web_driver:WebDriver")  # as chatctl web runs it
    app = chatctl.tui_app()(client_config(free_port()), "ana", "mentions", "main")

    async def main():
        async with app.run_test() as pilot:
            await until(pilot, lambda: showing(app, "TellScreen"), "the reason, in a dialog")
            said = " ".join(str(label.content) for label in app.screen.query("Label"))
            assert "cannot connect" in said
            app.screen.query_one("#close").press()
            await until(pilot, lambda: not app.is_running, "Close ends it")

    asyncio.run(main())
    assert isinstance(app.error, chatctl.ClientError)


def test_a_join_in_main_is_said_in_main_while_another_room_is_on_screen(server):
    async def scenario(app, pilot):
        await connected(app, pilot)
        await until(pilot, lambda: app.chat.model.current == "deploys", "started in #deploys")
        carol = raw_user(server.port, "carol")  # joins #main only
        await until(pilot, lambda: any("carol joined" in (line.markup or "")
                                       for line in app.conversation("main").lines), "said in #main's window")
        assert "carol joined" not in log_text(app)  # #deploys is on screen: not said here
        await pilot.press("alt+1")
        await until(pilot, lambda: "carol joined" in log_text(app), "said in #main")
        carol.close()

    run(scenario, client_config(server.port), room="deploys")


def test_a_line_missed_while_out_of_a_room_is_shown_once_on_coming_back(server):
    bob = raw_user(server.port, "bob", "deploys")
    bob.send(b"TOPIC|#deploys|release 41\nMSG|#deploys|before\n")
    bob.expect("MSG_OK")

    async def scenario(app, pilot):
        await connected(app, pilot)
        await type_line(pilot, "/join #deploys")
        await until(pilot, lambda: app.chat.model.current == "deploys", "ana is in #deploys")
        await type_line(pilot, "/part")
        await until(pilot, lambda: "deploys" not in app.chat.model.joined(), "ana left #deploys")
        bob.send(b"MSG|#deploys|said while ana is out\n")
        bob.expect("MSG_OK")
        await type_line(pilot, "/join #deploys")
        await until(pilot, lambda: "said while ana is out" in log_text(app), "the missed line is shown")
        await until(pilot, lambda: app.chat.model.current == "deploys", "ana is back in #deploys")
        bob.send(b"MSG|#deploys|and now\n")  # behind the answers to what ana asked on coming back
        await until(pilot, lambda: "and now" in log_text(app), "the next line is shown")
        assert log_text(app).count("said while ana is out") == 1, log_text(app)

    run(scenario, client_config(server.port))
    bob.close()


def test_reply_react_edit_and_delete_and_what_others_do_changes_the_line_in_place(server):
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1|actions\nUSER|bob\n")
    bob.expect("USER_OK")

    async def scenario(app, pilot):
        await connected(app, pilot)
        bob.send(b"MSG|#main|deploy done\n")
        first = chatctl.parse_event(bob.expect("MSG_OK|")).id
        await until(pilot, lambda: f"#{first} <bob> deploy done" in log_text(app), "bob's line, numbered")
        await type_line(pilot, f"/re {first} great work")
        reply = chatctl.parse_event(bob.expect("MSGX|")).message
        assert (reply.ref, reply.text) == (first, "great work")
        await until(pilot, lambda: "(↳ bob: deploy done) great work" in log_text(app), "the reply quotes")
        app.query_one("#input").value = f"/react {first} 👍"  # (the harness types no emoji: it is pasted)
        await pilot.press("enter")
        assert bob.expect("REACT|").split("|")[5:] == [str(first), "👍", "1"]
        bob.send(f"REACT|{first}|🎉\nEDIT|{first}|deploy done (v2)\n".encode())
        await until(pilot, lambda: f"#{first} <bob> deploy done (v2) (edited)" in log_text(app)
                    and "👍 1  🎉 1" in log_text(app), "bob's edit and both reactions, on bob's line")
        assert log_text(app).count("deploy done") == 2  # changed in place (and quoted once), not again
        await pilot.press("up")  # on an empty line: our last message, to edit
        assert app.query_one("#input").value == f"/edit {reply.id} great work"
        await pilot.press(*" indeed", "enter")
        assert bob.expect("EDIT|").endswith(f"|ana|{reply.id}|great work indeed")
        await until(pilot, lambda: "great work indeed (edited)" in log_text(app), "our edit, marked")
        bob.send(f"DELETE|{first}\n".encode())
        await until(pilot, lambda: f"#{first} <bob> (message deleted)" in log_text(app), "bob's deletion")
        assert "deploy done (v2)" not in log_text(app)
        await type_line(pilot, f"/delete {first}")  # not ours, and gone anyway
        await until(pilot, lambda: "was deleted (message-deleted)" in log_text(app), "refused, in one line")

    run(scenario, client_config(server.port))
    bob.close()
