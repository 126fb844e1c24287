"""The browser client: chatctl serve's page at /, driven in a real headless browser (Debian's chromium,
driven by Playwright), beside seed, chatctl/1 and join clients; and its HTTP and WebSocket side as an
outsider would poke it (foreign origins, stolen cookies, forms, floods)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import chatctl
from conftest import CHATCTL, RawClient, WsClient, free_port, protected_name, run_cli, wait_until
from conftest import http_request as request

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}


def chromium_binary() -> str:
    """Debian's chromium; where it is missing the test skips, except in CI, which installs it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    path = chromium_binary()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


class Tab:
    """One browser tab on the chat, with what a person sees of it; every dialog, script error and
    Content-Security-Policy violation it meets is recorded (the XSS tests want none)."""

    def __init__(self, page, port: int):
        self.page, self.port = page, port
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.add_init_script("window.__violations = [];"
                             "document.addEventListener('securitypolicyviolation', e => "
                             "window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));")
        page.set_default_timeout(10_000)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def open(self) -> Tab:
        self.page.goto(self.url)
        return self

    def login(self, name: str, password: str = "", server_password: str = "") -> Tab:
        self.open()
        self.page.wait_for_selector("#login:not([hidden])")
        self.page.fill("#login-name", name)
        self.page.fill("#login-password", password)
        if server_password:
            self.page.fill("#login-server-password", server_password)
        self.page.click("#login-button")
        self.online()
        return self

    def online(self) -> None:
        self.page.wait_for_selector("#status-dot.online")

    def say(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def sees(self, text: str, where: str = "#messages") -> None:
        self.page.locator(where).get_by_text(text, exact=False).first.wait_for()

    def switch(self, label: str) -> None:
        self.page.locator("#conversations .conv", has_text=re.compile(f"^{re.escape(label)}")).first.click()
        self.shows(label)

    def shows(self, title: str) -> None:
        """Wait until the conversation in view is ``title`` (#room, or a name)."""
        self.page.wait_for_function("t => document.querySelector('#conv-title').textContent === t", arg=title)

    def badge(self, label: str) -> str:
        """The badges beside a conversation in the sidebar, as text ('' for none)."""
        item = self.page.locator("#conversations .conv", has_text=re.compile(f"^{re.escape(label)}")).first
        return " ".join(item.locator(".badge").all_inner_texts())

    def wait_badge(self, label: str, expected: str) -> None:
        wait_until(lambda: self.badge(label) == expected, timeout=10)

    def clean(self) -> None:
        """Nothing ran that should not have."""
        assert self.dialogs == [], self.dialogs
        assert self.errors == [], self.errors
        assert self.page.evaluate("window.__violations") == []


@pytest.fixture
def tabs(browser):
    """New tabs, each in a browser context of its own (its own cookies) unless given one."""
    contexts = []

    def open_tab(port: int, context=None, viewport: dict | None = None) -> Tab:
        if context is None:
            context = browser.new_context(viewport=viewport or {"width": 1280, "height": 800})
            contexts.append(context)
        return Tab(context.new_page(), port)

    yield open_tab
    for context in contexts:
        context.close()


def login_cookie(port: int, name: str, password: str = "") -> str:
    payload = json.dumps({"name": name, "password": password}).encode()
    status, headers, body = request(port, "POST", "/api/login", payload, {"Content-Type": "application/json"})
    assert status == 200, body
    return headers["set-cookie"].split(";")[0]


# --- a person in the browser, with everyone else --------------------------------------------------


def test_a_person_logs_in_and_talks_in_two_rooms_with_a_seed_client_and_join(server, tabs, spawn_join):
    seed = RawClient(server.port)
    seed.send(b"USER|sam\n")
    assert seed.line() == "USER_OK"
    join = spawn_join("jo", server.port, "--room", "dev")
    ana = tabs(server.port).login("ana-k.1")  # (a name of every kind of character)
    ana.page.wait_for_selector("#member-list >> text=sam")

    ana.say("hello sam")
    seed.expect("ana-k.1: hello sam")
    seed.send(b"MSG|hi ana, welcome\nMSG|a second line from sam\n")
    ana.sees("a second line from sam")
    rows = ana.page.locator(".msg", has=ana.page.locator(".sender", has_text="sam"))
    assert rows.evaluate_all("rows => rows.map(r => r.classList.contains('more'))") == [False, True]

    ana.say("/join #dev")
    ana.shows("#dev")
    ana.page.wait_for_selector("#member-list >> text=jo")
    join.sendline("the build is green")
    ana.sees("the build is green")
    ana.say("thanks jo")
    join.expect("thanks jo")

    ana.switch("#main")  # now #dev is not in view: its lines count, a mention counts twice
    join.sendline("another line for nobody")
    ana.wait_badge("#dev", "1")
    join.sendline("ana-k.1, can you look?")
    ana.wait_badge("#dev", "@1 2")
    assert ana.page.title().startswith("(2) ")
    ana.switch("#dev")
    ana.wait_badge("#dev", "")
    assert ana.page.locator(".msg.mention", has_text="ana-k.1, can you look?").count() == 1
    ana.clean()


def test_direct_messages_both_ways_and_shift_enter_keeps_lines(server, tabs, user):
    bob = user("bob", hello=True)
    ana = tabs(server.port).login("ana")
    ana.say("/msg bob psst, a secret")
    assert bob.expect("DM|").endswith("|ana|bob|psst, a secret")
    ana.shows("bob")
    bob.send(b"DM|ana|line one\\nline two\n")
    ana.sees("line one")
    assert ana.page.locator(".msg .text", has_text="line one").inner_text() == "line one\nline two"

    ana.page.fill("#input", "first")
    ana.page.press("#input", "Shift+Enter")
    ana.page.type("#input", "second")
    ana.page.press("#input", "Enter")
    assert bob.expect("DM|").endswith("|ana|bob|first\\nsecond")
    ana.switch("#main")
    bob.send(b"DM|ana|are you there?\n")
    ana.wait_badge("bob", "1")
    ana.clean()


def test_reply_react_edit_and_delete_from_the_browser_and_what_others_do_shows_in_place(server, tabs, user):
    bob = user("bob", hello="actions")
    bob.send(b"MSG|deploy done\n")
    first = chatctl.parse_event(bob.expect("MSG_OK|")).id
    ana = tabs(server.port).login("ana")
    ana.sees("deploy done")
    row = ana.page.locator(f'.msg[data-id="{first}"]')

    row.hover()
    row.get_by_role("button", name="Reply").click()
    ana.sees("Replying to bob: deploy done", "#composing")
    ana.say("great work")
    reply = chatctl.parse_event(bob.expect("MSGX|")).message
    assert (reply.sender, reply.ref, reply.text) == ("ana", first, "great work")
    answer = ana.page.locator(".msg", has_text="great work")
    answer.locator(".quote", has_text="↳ bob: deploy done").wait_for()

    row.hover()
    row.get_by_role("button", name="React 👍").click()
    assert bob.expect("REACT|").split("|")[5:] == [str(first), "👍", "1"]
    bob.send(f"REACT|{first}|🎉\n".encode())
    row.locator(".reaction", has_text="👍 1").wait_for()
    row.locator(".reaction", has_text="🎉 1").wait_for()
    assert row.locator(".reaction.mine").inner_text() == "👍 1"  # ours is marked; a click takes it back
    row.locator(".reaction.mine").click()
    assert bob.expect("REACT|").split("|")[5:] == [str(first), "👍", "0"]
    wait_until(lambda: row.locator(".reaction").all_inner_texts() == ["🎉 1"])

    ana.say("the fix is in prod")
    mine = chatctl.parse_event(bob.expect("MSG|")).message.id
    ana.page.locator(f'.msg[data-id="{mine}"]').wait_for()  # (acknowledged: shown, with its number)
    ana.page.press("#input", "ArrowUp")  # Up on an empty box: our last message, to edit
    ana.sees("Editing your message", "#composing")
    assert ana.page.input_value("#input") == "the fix is in prod"
    ana.say("the fix is in staging")
    assert bob.expect("EDIT|").split("|")[5:] == [str(mine), "the fix is in staging"]
    ana.page.locator(".msg", has_text="the fix is in staging").locator(".edited").wait_for()

    bob.send(f"DELETE|{first}\n".encode())  # bob's message goes: the reply's quote says so
    row.locator(".gone", has_text="message deleted").wait_for()
    assert "deploy done" not in ana.page.locator("#messages").inner_text()
    ana.page.locator(".quote", has_text="↳ bob: message deleted").wait_for()
    ana.say(f"/delete {mine}")
    assert bob.expect("DELETE|").split("|")[5:] == [str(mine)]

    ana.page.reload()  # as the history keeps it
    ana.online()
    ana.page.locator(f'.msg[data-id="{first}"] .gone').wait_for()
    ana.page.locator(f'.msg[data-id="{mine}"] .gone').wait_for()
    ana.page.locator(".msg", has_text="great work").locator(".quote").wait_for()
    assert "the fix is in" not in ana.page.locator("#messages").inner_text()
    ana.clean()


def test_a_private_room_from_the_browser_and_a_kick_said_in_one_line(server, tabs, user):
    protected_name(server.port, "ana", "correct horse")
    protected_name(server.port, "bob", "battery staple")
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1|actions\nUSER|bob|battery staple\nJOIN|#ops\n")
    bob.expect("JOIN_OK|#ops")
    eve = user("eve", hello=True)
    ana = tabs(server.port).login("ana", "correct horse")
    ana.say("/join #hiring --private")
    ana.shows("#hiring")
    ana.say("/invite bob")
    ana.sees("ana invited bob to #hiring")
    eve.send(b"ROOMS\n")
    assert eve.expect("END|ROOMS") == "END|ROOMS|2"  # #main and #ops: not #hiring
    assert not [line for line in eve.seen if "hiring" in line]

    ana.say("/join #ops")
    ana.shows("#ops")
    bob.send(b"KICK|#ops|ana|wrong room\n")
    ana.sees("bob removed you from #ops: wrong room", "#messages")
    ana.shows("#main")  # out of it: back in #main, #ops no longer among the rooms
    wait_until(lambda: ana.page.locator("#conversations .conv", has_text="#ops").count() == 0)
    ana.clean()


def test_a_protected_name_logs_in_with_its_password_and_read_state_follows_its_other_device(server, tabs):
    protected_name(server.port, "ana", "correct horse")
    tab = tabs(server.port)
    tab.open()
    tab.page.fill("#login-name", "ana")
    tab.page.click("#login-button")
    tab.sees("protected", "#login-error")
    tab.page.fill("#login-password", "wrong password")
    tab.page.click("#login-button")
    tab.sees("wrong password", "#login-error")
    tab.page.fill("#login-password", "correct horse")
    tab.page.click("#login-button")
    tab.online()
    tab.say("/join #ops")
    tab.shows("#ops")
    tab.switch("#main")

    phone = RawClient(server.port)  # the account's other device
    phone.send(b"HELLO|chatctl/1\nUSER|ana|correct horse\n")
    phone.expect("USER_OK")
    other = RawClient(server.port)
    other.send(b"HELLO|chatctl/1\nUSER|cy\nJOIN|#ops\nMSG|#ops|deploy at noon\n")
    msg_ok = other.expect("MSG_OK|")
    tab.wait_badge("#ops", "1")
    phone.send(f"MARK|#ops|{msg_ok.split('|')[1]}\n".encode())  # read on the phone: read here too
    tab.wait_badge("#ops", "")
    cookie = tab.page.context.cookies()[0]
    _, _, body = request(server.port, "GET", "/api/session", headers={"Cookie": f"{cookie['name']}="
                                                                      f"{cookie['value']}"})
    assert json.loads(body)["protected"] is True
    phone.send(b"DEVICES\n")
    devices = [phone.expect("DEVICE|") for _ in range(2)]
    assert any("|web|" in d and "Chrome" in d for d in devices), devices
    tab.clean()


def test_a_free_name_is_protected_from_the_browser_and_the_browser_stays_logged_in(server, tabs):
    tab = tabs(server.port).login("ana")
    tab.say("/register")
    tab.page.fill("#protect-password", "short")
    tab.page.fill("#protect-again", "short")
    tab.page.click("#protect-form button")
    tab.sees("8 characters", "#protect-result")
    tab.page.fill("#protect-password", "correct horse")
    tab.page.fill("#protect-again", "correct horse")
    tab.page.click("#protect-form button")
    tab.sees("Your name is protected", "#protect-result")
    tab.page.wait_for_selector("#logout-others-form:not([hidden])")
    impostor = RawClient(server.port)
    impostor.send(b"HELLO|chatctl/1\nUSER|ana\n")
    assert impostor.expect("ERR|").startswith("ERR|name-protected")
    tab.page.reload()  # the browser's login proves the name now
    tab.online()
    cookie = tab.page.context.cookies()[0]
    session = json.loads(request(server.port, "GET", "/api/session",
                                 headers={"Cookie": f"{cookie['name']}={cookie['value']}"})[2])
    assert (session["name"], session["protected"]) == ("ana", True)
    tab.clean()


def test_a_name_online_from_its_most_devices_keeps_the_browser_logged_in_until_one_leaves(make_server, tabs):
    server = make_server(max_devices=1)
    protected_name(server.port, "ana", "correct horse")
    laptop = RawClient(server.port)
    laptop.send(b"HELLO|chatctl/1\nUSER|ana|correct horse\n")
    laptop.expect("USER_OK")
    tab = tabs(server.port).open()
    tab.page.fill("#login-name", "ana")
    tab.page.fill("#login-password", "correct horse")
    tab.page.click("#login-button")
    tab.sees("online from 1 devices", "#banner")
    assert tab.page.locator("#chat").is_visible()  # not thrown back to the login
    laptop.send(b"QUIT\n")
    laptop.wait_closed()
    tab.page.click("#banner-button")
    tab.online()
    tab.clean()


def test_a_reload_or_a_new_tab_keeps_the_login_and_a_free_names_new_tab_takes_it_back(server, tabs, user):
    first = tabs(server.port).login("ana")
    first.say("before the reload")
    first.page.reload()
    first.online()
    first.sees("before the reload")
    assert first.page.locator("#login").is_hidden()

    second = tabs(server.port, context=first.page.context).open()  # the same browser: the same cookie
    second.online()
    first.sees("open in another tab", "#banner")
    watcher = user("wat", hello=True)
    watcher.send(b"DIR\n")
    assert watcher.expect("USERS|").count("ana ") == 1  # one holder of the name: the new tab

    cookie = first.page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    stranger = tabs(server.port).open()  # another browser wants the name while the tab holds it
    stranger.page.fill("#login-name", "ana")
    stranger.page.click("#login-button")
    stranger.sees("in use", "#login-error")
    first.clean()


@pytest.mark.parametrize("protected", [False, True], ids=["free name", "protected name"])
def test_unread_badges_and_the_open_conversation_survive_a_reload(server, tabs, user, protected):
    if protected:
        protected_name(server.port, "ana", "correct horse")
    tab = tabs(server.port).login("ana", "correct horse" if protected else "")
    tab.say("/join #dev")
    tab.shows("#dev")
    tab.switch("#main")
    bob = user("bob", hello=True)
    bob.send(b"JOIN|#dev\nMSG|#dev|ana: a question for you\nMSG|#dev|and a second line\nDM|ana|psst\n")
    tab.wait_badge("#dev", "@1 2")
    tab.wait_badge("bob", "1")
    tab.page.reload()
    tab.online()
    tab.wait_badge("#dev", "@1 2")
    tab.wait_badge("bob", "1")
    tab.switch("#dev")
    tab.wait_badge("#dev", "")
    tab.page.reload()
    tab.online()
    tab.shows("#dev")
    tab.wait_badge("bob", "1")
    assert tab.badge("#dev") == ""
    tab.clean()


def test_the_server_restarting_leaves_the_tab_logged_in_and_the_gap_filled(make_server, tabs, tmp_path):
    port = free_port()
    db, accounts = str(tmp_path / "h.db"), str(tmp_path / "a.db")
    server = make_server(port=port, db=db, accounts_db=accounts)
    tab = tabs(port).login("ana")
    tab.say("before the restart")
    tab.sees("before the restart")
    server.shutdown()
    tab.page.wait_for_selector("#banner:not([hidden])")
    assert "Offline" in tab.page.inner_text("#banner") or "Reconnecting" in tab.page.inner_text("#banner")

    server = make_server(port=port, db=db, accounts_db=accounts)
    sam = RawClient(port)
    sam.send(b"USER|sam\nMSG|said while ana was away\n")  # before the tab is back: the gap
    sam.expect("MSG_OK")
    tab.page.click("#banner-button")
    tab.online()
    tab.sees("said while ana was away")
    assert tab.page.locator(".msg", has_text="before the restart").count() == 1  # nothing twice
    tab.clean()


def test_a_phone_sized_screen_has_the_conversations_behind_a_button(server, tabs, user, tmp_path):
    tab = tabs(server.port, viewport=PHONE).login("ana")
    assert tab.page.locator("#sidebar").bounding_box()["x"] < 0  # off screen until asked for
    tab.say("/join #dev")
    tab.shows("#dev")
    bob = user("bob", hello=True)
    bob.send(b"MSG|#main|ana: on the phone?\n")
    tab.page.wait_for_selector("#menu-badge:not([hidden])")
    tab.page.click("#menu-button")
    tab.page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
    tab.switch("#main")
    tab.sees("on the phone?")
    width = tab.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]  # nothing wider than the screen
    tab.clean()


def chat_history(server, *lines: str) -> None:
    """bob says ``lines`` (chatctl/1 requests: ``MSG|#dev|...``, ``JOIN|#dev``), and they are stored."""
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\n" + "".join(line + "\n" for line in lines).encode())
    messages = sum(line.startswith("MSG|") for line in lines)
    wait_until(lambda: server.history.count() >= messages, timeout=10)


def test_a_mention_in_a_hidden_tab_notifies_once_notifications_are_on(server, browser, user):
    context = browser.new_context()
    context.grant_permissions(["notifications"], origin=f"http://127.0.0.1:{server.port}")
    try:
        page = context.new_page()
        page.add_init_script("""(() => {  // every notification the page makes, recorded
            const Real = window.Notification;
            window.__notes = [];
            window.Notification = class extends Real {
                constructor(title, options) {
                    super(title, options);
                    window.__notes.push([title, options.body]);
                }
            };
        })();""")
        tab = Tab(page, server.port).login("ana")
        bob = user("bob", hello=True)
        hide = ("() => { Object.defineProperty(document, 'hidden', {value: true, configurable: true}); "
                "document.dispatchEvent(new Event('visibilitychange')); }")
        page.evaluate(hide)
        bob.send(b"MSG|#main|ana: off by default, so no notification\n")
        tab.sees("off by default")
        page.evaluate("() => Object.defineProperty(document, 'hidden', {value: false, configurable: true})")
        page.click("#settings-button")
        page.check("#notify-toggle")
        page.keyboard.press("Escape")
        page.evaluate(hide)
        bob.send(b"MSG|#main|just chatter\nMSG|#main|ana: the deploy is stuck\n")
        tab.sees("the deploy is stuck")
        wait_until(lambda: len(page.evaluate("window.__notes")) == 1)
        assert page.evaluate("window.__notes") == [["bob in #main", "ana: the deploy is stuck"]]
        tab.clean()
    finally:
        context.close()


def test_over_tls_the_page_the_cookie_and_the_websocket_are_secure(make_server, browser, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    chatctl.generate_certificate(cert, key)
    server = make_server(tls=True, tls_cert=str(cert), tls_key=str(key))
    context = browser.new_context(ignore_https_errors=True)  # (its own certificate, made on first start)
    try:
        tab = Tab(context.new_page(), server.port)
        tab.page.goto(f"https://127.0.0.1:{server.port}/")
        tab.page.fill("#login-name", "ana")
        tab.page.click("#login-button")
        tab.online()
        bob = RawClient(server.port)  # (plain text on the same port, as before)
        bob.send(b"USER|bob\nMSG|over TLS too\n")
        tab.sees("over TLS too")
        cookie = context.cookies()[0]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        tab.clean()
    finally:
        context.close()


def test_search_finds_a_message_in_any_room_and_jumps_to_it(make_server, tabs):
    server = make_server(rate=0, address_byte_rate=0)
    chat_history(server, "JOIN|#dev", *(f"MSG|#dev|filler {n}" for n in range(120)),
                 "MSG|#dev|the needle is here", "MSG|#main|another needle, in main",
                 *(f"MSG|#dev|more filler {n}" for n in range(120)))
    tab = tabs(server.port).login("ana")
    tab.say("/join #dev")
    tab.shows("#dev")
    tab.say("/search needle")  # from a room too: everywhere, unless narrowed
    tab.sees("2 messages", "#search-summary")
    tab.page.check("#search-here")
    tab.sees("1 message ", "#search-summary")
    tab.page.keyboard.press("Escape")
    tab.switch("#main")
    tab.page.click("#search-button")  # everywhere: #main, the direct messages and every room joined
    tab.page.uncheck("#search-here")
    tab.page.fill("#search-input", "needle")
    tab.page.press("#search-input", "Enter")
    tab.sees("2 messages", "#search-summary")
    tab.page.locator("#search-results li", has_text="the needle is here").click()
    tab.shows("#dev")
    tab.page.wait_for_selector(".msg.hit >> text=the needle is here")
    tab.page.wait_for_selector("#latest-button:not([hidden])")
    tab.page.click("#latest-button")
    tab.sees("more filler 119")
    tab.clean()


def test_scrolling_up_loads_older_history(make_server, tabs):
    server = make_server(rate=0, address_byte_rate=0)
    chat_history(server, *(f"MSG|#main|old message {n}" for n in range(150)))
    tab = tabs(server.port).login("ana")
    tab.sees("old message 149")
    assert tab.page.locator(".msg", has_text="old message 0").count() == 0
    for _ in range(50):  # scrolled to the top, again and again, as a reader would
        tab.page.evaluate("() => { document.querySelector('#messages').scrollTop = 0 }")
        if tab.page.locator("text=the start of #main").count():
            break
        time.sleep(0.2)
    assert tab.page.locator(".msg .text", has_text=re.compile("^old message 0$")).count() == 1
    tab.page.wait_for_selector("text=the start of #main")
    tab.clean()


def test_tab_completes_names_and_commands_and_keys_switch_and_bots_are_marked(server, tabs, user):
    user("bobby", hello=True)
    deploybot = RawClient(server.port)  # a bot's name, online
    deploybot.send(b"HELLO|chatctl/1\nUSER|deploybot\nREGISTER|bot password\nBOT\n")
    deploybot.expect("BOT_OK")
    tab = tabs(server.port).login("ana")
    tab.page.wait_for_selector("#member-list >> text=bobby")
    bot_entry = tab.page.locator("#member-list li", has_text="deploybot")
    assert bot_entry.locator(".tag").inner_text() == "bot"
    assert tab.page.locator("#member-list li", has_text="bobby").locator(".tag").count() == 0
    tab.page.type("#input", "hi @bo")
    tab.page.press("#input", "Tab")
    assert tab.page.input_value("#input") == "hi @bobby "
    tab.page.fill("#input", "/jo")
    tab.page.press("#input", "Tab")
    assert tab.page.input_value("#input") == "/join "
    tab.page.fill("#input", "")
    tab.say("/join #dev")
    tab.shows("#dev")
    tab.page.keyboard.press("Alt+1")
    tab.shows("#main")
    tab.page.keyboard.press("Control+k")
    tab.page.wait_for_selector("#switcher:not([hidden])")
    tab.page.keyboard.type("dev")
    tab.page.keyboard.press("Enter")
    tab.shows("#dev")
    tab.clean()


# --- what chat text can and cannot do -------------------------------------------------------------

XSS = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(2)</script>",
    "[click](javascript:alert(3)) javascript:alert(4)",
    "\u202eevil\u202c text with bidi controls",
    '"><svg onload=alert(5)>',
]


def test_chat_text_shows_as_text_and_runs_nothing(server, tabs, user):
    tab = tabs(server.port).login("ana")
    bob = user("bob", hello=True)
    for text in XSS:
        bob.send(f"MSG|#main|{text}\n".encode())
    bob.send(b"TOPIC|#main|<b>bold?</b><img src=x onerror=alert(6)>\n")
    bob.send(b"MSG|#main|see https://example.org/a?b=<c> and mailto:ops@example.org\n")
    tab.sees("see https://example.org")
    for text in XSS[:3] + XSS[4:]:
        assert tab.page.locator(".msg .text", has_text=text).count() == 1, text
    assert tab.page.locator(".msg .text", has_text="evil").inner_text() == "evil text with bidi controls"
    tab.page.wait_for_function("() => document.querySelector('#conv-topic').textContent"
                               ".includes('<b>bold?</b>')")
    assert tab.page.locator("#messages img, #messages script, #messages svg, #topbar img").count() == 0
    hrefs = tab.page.eval_on_selector_all("#messages a", "links => links.map(a => [a.href, a.rel])")
    assert hrefs == [["https://example.org/a?b=", "noopener noreferrer"],
                     ["mailto:ops@example.org", "noopener noreferrer"]], hrefs
    tab.clean()


def test_a_webhooks_payload_shows_as_text(server, tabs):
    owner = RawClient(server.port)
    server.config.operator_password = "operator secret"
    owner.send(b"HELLO|chatctl/1\nOPER|operator secret\nHOOK|ADD|#main|ci\n")
    token = owner.expect("HOOK_OK|").split("|")[2]
    tab = tabs(server.port).login("ana")
    payload = {"text": "<img src=x onerror=alert(7)> deployed", "username": "<script>alert(8)</script>"}
    status, _, _ = request(server.port, "POST", f"/hooks/{token}", json.dumps(payload).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200
    tab.sees("deployed")
    assert tab.page.locator(".msg .text").last.inner_text() == \
        "[<script>alert(8)</script>] <img src=x onerror=alert(7)> deployed"
    assert tab.page.locator("#messages img, #messages script").count() == 0
    tab.clean()


# --- the HTTP side, as an outsider pokes it --------------------------------------------------------


def test_every_answer_has_the_security_headers_and_the_client_is_small(server):
    status, headers, page = request(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["cache-control"] == "no-cache"  # asked again each time: it names this version's files
    folder = re.search(r'"(/static/[0-9a-f]{16})/app\.js"', page.decode()).group(1)
    files = [f"{folder}/{path.name}" for path in chatctl.web_folder().iterdir() if path.name != "index.html"]
    loaded = [request(server.port, "GET", path) for path in files]
    assert [answer[0] for answer in loaded] == [200] * len(files)
    assert {answer[1]["cache-control"] for answer in loaded} == {"public, max-age=31536000, immutable"}
    first_load = len(page) + sum(len(answer[2]) for answer in loaded)
    assert first_load < 200 * 1024, first_load  # the whole client, uncompressed
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    others = [request(server.port, "GET", "/static/" + "0" * 16 + "/app.js"),  # another version's
              request(server.port, "GET", "/api/session"), request(server.port, "GET", "/nowhere"),
              request(server.port, "GET", "/healthz"), request(server.port, "GET", "/ws"),
              request(server.port, "POST", "/api/login", b"name=ana", form)]
    assert [answer[0] for answer in others] == [404, 200, 404, 200, 426, 415]
    for _, answer_headers, _ in [(status, headers, page), *loaded, *others]:
        csp = answer_headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert answer_headers["x-content-type-options"] == "nosniff"
        assert answer_headers["x-frame-options"] == "DENY"
        assert answer_headers["referrer-policy"] == "no-referrer"
    everything = page + b"".join(answer[2] for answer in loaded)
    assert b"googleapis" not in everything and b"//cdn" not in everything and b"eval(" not in everything


def test_logins_refuse_forms_foreign_pages_and_wrong_passwords_and_issue_fresh_cookies(server):
    protected_name(server.port, "ana", "correct horse")
    form = request(server.port, "POST", "/api/login", b'{"name": "bo"}', {"Content-Type": "text/plain"})
    assert form[0] == 415
    foreign = request(server.port, "POST", "/api/login", b'{"name": "bo"}',
                   {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert foreign[0] == 403 and json.loads(foreign[2])["error"] == "foreign-origin"
    wrong = request(server.port, "POST", "/api/login", b'{"name": "ana", "password": "nope"}',
                 {"Content-Type": "application/json"})
    assert wrong[0] == 401 and json.loads(wrong[2])["error"] == "bad-password"
    bad_name = request(server.port, "POST", "/api/login", b'{"name": "<script>"}',
                       {"Content-Type": "application/json"})
    assert bad_name[0] == 400 and json.loads(bad_name[2])["error"] == "invalid-name"
    planted = "chatctl_session=chatctl_web_" + "A" * 43  # a session an attacker made up: never taken
    status, headers, body = request(server.port, "GET", "/api/session", headers={"Cookie": planted})
    assert json.loads(body)["name"] is None
    status, headers, _ = request(server.port, "POST", "/api/login",
                                 b'{"name": "ana", "password": "correct horse"}',
                              {"Content-Type": "application/json", "Cookie": planted})
    issued = headers["set-cookie"]
    assert status == 200 and planted.split("=", 1)[1] not in issued
    assert "HttpOnly" in issued and "SameSite=Strict" in issued and "Path=/" in issued


def test_the_websocket_refuses_other_sites_and_revoked_cookies(server, user):
    cookie = login_cookie(server.port, "ana")
    foreign = WsClient(server.port, cookie=cookie, origin="http://evil.example")
    assert foreign.status == 403
    nobody = WsClient(server.port)
    assert nobody.status == 401
    tab = WsClient(server.port, cookie=cookie, origin=f"http://127.0.0.1:{server.port}")
    assert tab.status == 101
    assert tab.event()["type"] == "Welcome" and tab.event()["type"] == "Registered"
    tab.send("MSG|#main|from a raw websocket")
    assert tab.expect("Acknowledged")["id"] > 0

    status, headers, _ = request(server.port, "POST", "/api/logout", b"{}",
                              {"Content-Type": "application/json", "Cookie": cookie})
    assert status == 200 and "Max-Age=0" in headers["set-cookie"]
    assert tab.expect("Goodbye")["reason"].startswith("logged out")
    stolen = WsClient(server.port, cookie=cookie)  # a copy of the cookie, used after the logout
    assert stolen.status == 401
    session = request(server.port, "GET", "/api/session", headers={"Cookie": cookie})
    assert json.loads(session[2])["name"] is None


def test_logout_others_ends_the_accounts_other_devices_with_its_password(server):
    protected_name(server.port, "ana", "correct horse")
    laptop = login_cookie(server.port, "ana", "correct horse")
    phone = login_cookie(server.port, "ana", "correct horse")
    phone_tab = WsClient(server.port, cookie=phone)
    phone_tab.expect("Registered")
    terminal = RawClient(server.port)
    terminal.send(b"HELLO|chatctl/1\nUSER|ana|correct horse\n")
    terminal.expect("USER_OK")
    refused = request(server.port, "POST", "/api/logout", json.dumps({"others": True}).encode(),
                   {"Content-Type": "application/json", "Cookie": laptop})
    assert refused[0] == 401  # the cookie alone is not enough
    ok = request(server.port, "POST", "/api/logout", json.dumps({"others": True, "password": "correct horse"})
              .encode(), {"Content-Type": "application/json", "Cookie": laptop})
    assert ok[0] == 200 and json.loads(ok[2])["ended"] == 2
    assert phone_tab.expect("Goodbye")["reason"].startswith("logged out")
    assert any(line.startswith("BYE|logged out") for line in terminal.wait_closed())
    assert WsClient(server.port, cookie=phone).status == 401
    assert WsClient(server.port, cookie=laptop).status == 101


def test_a_password_change_ends_the_browsers_logged_in_with_the_old_one_open_tabs_too(server):
    protected_name(server.port, "ana", "correct horse")
    cookie = login_cookie(server.port, "ana", "correct horse")
    tab = WsClient(server.port, cookie=cookie)
    tab.expect("Registered")
    laptop = RawClient(server.port)
    laptop.send(b"HELLO|chatctl/1\nUSER|ana|correct horse\nREGISTER|battery staple|correct horse\n")
    laptop.expect("REGISTER_OK")
    assert tab.expect("Goodbye")["reason"].startswith("logged out")
    assert tab.closed()
    session = request(server.port, "GET", "/api/session", headers={"Cookie": cookie})
    assert json.loads(session[2])["name"] is None
    assert WsClient(server.port, cookie=cookie).status == 401


def test_a_new_server_password_ends_the_browsers_logged_in_under_the_old_one(make_server):
    server = make_server(password="first secret")
    headers = {"Content-Type": "application/json"}
    refused = request(server.port, "POST", "/api/login", b'{"name": "bo"}', headers)
    assert refused[0] == 401 and json.loads(refused[2])["error"] == "password-required"
    status, answer, _ = request(server.port, "POST", "/api/login",
                                b'{"name": "bo", "server_password": "first secret"}', headers)
    cookie = answer["set-cookie"].split(";")[0]
    tab = WsClient(server.port, cookie=cookie)
    assert status == 200 and tab.status == 101
    tab.expect("Registered")
    server.reload(dataclasses.replace(server.config, password="second secret"))
    assert tab.expect("Goodbye")["reason"] == "logged out: the server's password changed"
    session = request(server.port, "GET", "/api/session", headers={"Cookie": cookie})
    assert json.loads(session[2])["name"] is None
    assert WsClient(server.port, cookie=cookie).status == 401


def test_only_names_of_this_server_get_the_client_no_dns_rebinding(make_server):
    server = make_server(http=chatctl.HttpConfig(hosts=("chat.example",)))
    body, json_type = b'{"name": "bo"}', {"Content-Type": "application/json"}
    for host in ("attacker.example", "chat.example.attacker.example"):
        rebound = {"Host": f"{host}:{server.port}", "Origin": f"http://{host}:{server.port}"}
        page = request(server.port, "GET", "/", headers=rebound)
        assert page[0] == 403 and json.loads(page[2])["error"] == "unknown-host"
        assert request(server.port, "POST", "/api/login", body, {**json_type, **rebound})[0] == 403
        tab = WsClient(server.port, cookie=login_cookie(server.port, f"bo{len(host)}"),
                       origin=rebound["Origin"], host=rebound["Host"])
        assert tab.status == 403
    for host in ("chat.example", "127.0.0.1", "localhost", "[::1]", "10.1.2.3"):
        assert request(server.port, "GET", "/", headers={"Host": f"{host}:{server.port}"})[0] == 200, host
    assert request(server.port, "GET", "/healthz", headers={"Host": "anything.example"})[0] == 200
    for host in ("localhost:80@attacker.example", "[::1]attacker.example", "localhost:abc"):
        assert request(server.port, "GET", "/", headers={"Host": host})[0] == 403, host
    absolute = request(server.port, "GET", "http://attacker.example/", headers={"Host": "127.0.0.1"})
    assert absolute[0] == 403  # (the target's authority is the host asked for)


def test_logins_cost_more_than_requests_and_the_sessions_kept_are_capped(make_server):
    server = make_server(http=chatctl.HttpConfig(request_rate=0.001, request_burst=100))
    json_type = {"Content-Type": "application/json"}
    statuses = [request(server.port, "POST", "/api/login", f'{{"name": "n{i}"}}'.encode(), json_type)[0]
                for i in range(8)]
    assert statuses[:4] == [200] * 4 and statuses[4:] == [429] * 4  # 1 + 20 requests' worth each
    capped = make_server(http=chatctl.HttpConfig(request_rate=0, max_sessions=100))
    for i in range(130):
        assert request(capped.port, "POST", "/api/login", f'{{"name": "m{i}"}}'.encode(), json_type)[0] == 200
    with sqlite3.connect(capped.local_accounts.path) as db:
        assert db.execute("SELECT count(*) FROM web_sessions").fetchone()[0] == 100


def test_pings_count_against_the_rate_limit_and_bad_frames_get_their_close_codes(make_server):
    server = make_server(rate=5.0, burst=10, flood_limit=5)
    pinger = WsClient(server.port, cookie=login_cookie(server.port, "pinger"))
    pinger.expect("Registered")
    from wsproto.events import Ping

    for _ in range(100):
        pinger.sock.sendall(pinger.ws.send(Ping(b"x")))
    assert pinger.closed()
    assert any(e["type"] == "Goodbye" and e["reason"] == "flooding" for e in pinger.events)
    bad = WsClient(server.port, cookie=login_cookie(server.port, "bad"))
    bad.expect("Registered")
    bad.sock.sendall(bytes((0x81, 0x82, 0, 0, 0, 0)) + b"\xff\xfe")  # a text frame that is not UTF-8
    assert bad.closed() and bad.close_code == 1007


def test_a_message_in_fragments_with_a_ping_between_and_frames_cut_anywhere_are_read(server):
    from wsproto.events import Message, Ping

    tab = WsClient(server.port, cookie=login_cookie(server.port, "ana"))
    tab.expect("Registered")
    pieces = [tab.ws.send(Message(data=part, message_finished=last))
              for part, last in (("MSG|#main|in ", False), ("three ", False), ("pieces", True))]
    tab.sock.sendall(pieces[0] + pieces[1] + tab.ws.send(Ping(b"between")) + pieces[2])
    assert tab.expect("Acknowledged")["id"] > 0
    whole = tab.ws.send(Message(data="MSG|#main|one byte at a time"))
    for i in range(len(whole)):  # every cut of a frame, its header too
        tab.sock.sendall(whole[i:i + 1])
    assert tab.expect("Acknowledged")["id"] > 0
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\nHISTORY|#main|LAST|5\n")
    assert bob.expect("MSG|#main|").endswith("|ana|in three pieces")
    assert bob.expect("MSG|#main|").endswith("|ana|one byte at a time")


def test_no_tab_opened_while_a_logout_runs_outlives_it(make_server):
    server = make_server(max_per_address=0)
    protected_name(server.port, "ana", "correct horse")
    cookie = login_cookie(server.port, "ana", "correct horse")
    opened: list[WsClient] = []
    stop = threading.Event()

    def thief() -> None:  # a copy of the cookie, opening tabs as fast as it can
        for _ in range(400):
            if stop.is_set():
                break
            opened.append(WsClient(server.port, cookie=cookie, expect_answer=False))
            time.sleep(0.003)

    worker = threading.Thread(target=thief)
    worker.start()
    try:
        time.sleep(0.3)
        owner = RawClient(server.port)
        # (as chatctl devices does: a quiet session, which needs no device slot of its own)
        owner.send(b"HELLO|chatctl/1|quiet\nUSER|ana|correct horse\nLOGOUT|others|correct horse\n")
        owner.expect("LOGOUT_OK")
        time.sleep(0.2)
    finally:
        stop.set()
        worker.join(10)
    for tab in opened:  # every tab that got in is ended, however its handshake and the logout interleaved
        assert tab.refused_or_closed(10) or tab.closed(10), tab.events
    assert all(tab.status in (101, 401, None) for tab in opened)
    assert not [s for s in server.registry.sessions() if s.web_login and s.leave_reason is None]


def test_a_flood_of_empty_fragments_is_a_flood(make_server):
    server = make_server(rate=5.0, burst=10, flood_limit=5)
    tab = WsClient(server.port, cookie=login_cookie(server.port, "ana"))
    tab.expect("Registered")
    start = bytes((0x01, 0x84, 0, 0, 0, 0)) + b"MSG|"  # a text message's first fragment
    tab.sock.sendall(start + bytes((0x00, 0x80, 0, 0, 0, 0)) * 500)  # then empty continuations
    assert tab.closed()
    assert any(e["type"] == "Goodbye" and e["reason"] == "flooding" for e in tab.events)


def test_a_tab_is_a_client_like_any_other_flooding_and_oversized_messages_end_it(make_server):
    server = make_server(rate=5.0, burst=10, flood_limit=5, max_frame=1024)
    cookie = login_cookie(server.port, "ana")
    big = WsClient(server.port, cookie=cookie)
    big.expect("Registered")
    big.send("MSG|#main|" + "x" * 2000)
    assert big.expect("ErrorReply")["code"] == "frame-too-long"
    assert big.closed()
    flood = WsClient(server.port, cookie=login_cookie(server.port, "bo"))
    flood.expect("Registered")
    for n in range(200):
        flood.send(f"MSG|#main|flood {n}")
    assert flood.expect("ErrorReply")["code"] == "rate-limited"
    assert flood.closed()
    wait_until(lambda: not any(s.name in ("ana", "bo") for s in server.registry.sessions()))
    assert server.history.count() <= 15


def test_tabs_count_against_the_connection_limits(make_server):
    server = make_server(max_per_address=3)
    cookie = login_cookie(server.port, "ana")
    wait_until(lambda: not server.registry.sessions())  # (the login's own connection is gone)
    open_tabs = [WsClient(server.port, cookie=cookie) for _ in range(3)]
    open_tabs[-1].expect("Registered")
    fourth = WsClient(server.port, cookie=cookie, expect_answer=False)
    assert fourth.refused_or_closed()
    assert fourth.status != 101


def test_the_client_can_be_turned_off_and_chatctl_web_is_retired(make_server, isolated_home):
    server = make_server(http=chatctl.HttpConfig(web=False))
    assert request(server.port, "GET", "/")[0] == 404
    assert request(server.port, "GET", "/api/session")[0] == 404
    assert request(server.port, "GET", "/healthz")[0] == 200
    result = run_cli("web", "--port", "8080", env=isolated_home)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("Error: chatctl web is retired: the browser client is served by "
                                            "chatctl serve")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_single_file_copy_says_where_the_client_is_missing(tmp_path, isolated_home):
    copy = tmp_path / "alone" / "chatctl.py"
    copy.parent.mkdir()
    shutil.copy(CHATCTL[1], copy)
    port = free_port()
    env = {**isolated_home, "PYTHONPATH": ""}
    command = [sys.executable, "-I", str(copy), "serve", "-H", "127.0.0.1", "-p", str(port), "--no-history"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or _answers(port), timeout=20)
        status, _, body = request(port, "GET", "/")
        assert status == 404 and b"web/ folder is missing" in body
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "this chatctl has no browser client: its web/ folder is missing" in err
    assert "Traceback" not in err


def _answers(port: int) -> bool:
    try:
        return request(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False
