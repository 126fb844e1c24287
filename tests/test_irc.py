"""serve --irc: IRC clients in the same rooms as chatctl's own, over raw sockets (the protocol's details),
the Python ``irc`` library, and real irssi and weechat in tmux."""

from __future__ import annotations

import re
import socket
import ssl
import time

import pytest

import chatctl
from conftest import RawClient, Tmux, binary, free_port, protected_name, wait_until


class IrcClient:
    """A raw IRC connection: send lines, wait (bounded) for a line that matches."""

    def __init__(self, port: int, tls: bool = False):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        self.sock = sock
        self.buffer = b""
        self.seen: list[str] = []

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def line(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within {timeout} s; last lines: {self.seen[-8:]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"connection closed; last lines: {self.seen[-8:]}")
            self.buffer += data
        raw, self.buffer = self.buffer.split(b"\r\n", 1)
        line = raw.decode("utf-8")
        self.seen.append(line)
        return line

    def expect(self, pattern: str, timeout: float = 5.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            line = self.line(max(0.05, deadline - time.monotonic()))
            if match := re.search(pattern, line):
                return match

    def register(self, nick: str, caps: str = "", sasl: tuple[str, str] | None = None) -> None:
        self.send("CAP LS 302", f"NICK {nick}", f"USER {nick} 0 * :{nick}")
        self.expect(r"CAP \* LS")
        if caps:
            self.send(f"CAP REQ :{caps}")
            self.expect(r"CAP \S+ ACK")
        if sasl is not None:
            import base64

            self.send("AUTHENTICATE PLAIN")
            self.expect(r"^AUTHENTICATE \+")
            self.send("AUTHENTICATE " + base64.b64encode(f"\0{sasl[0]}\0{sasl[1]}".encode()).decode())
            self.expect(r" 903 ")
        self.send("CAP END")
        self.expect(r" 001 ")
        self.expect(rf" 366 {re.escape(nick)} #main ")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def irc_server(make_server):
    return make_server(irc=True, auth_delay=0)


@pytest.fixture
def irc(irc_server):
    clients = []

    def connect(nick: str | None = None, caps: str = "", port: int | None = None, **kw) -> IrcClient:
        client = IrcClient(port or irc_server.port, **kw)
        clients.append(client)
        if nick:
            client.register(nick, caps)
        return client

    yield connect
    for client in clients:
        client.close()


def chatctl_user(port: int, name: str, *rooms: str, options: str = "") -> RawClient:
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1{options}\nUSER|{name}\n".encode())
    client.expect("USER_OK")
    for room in rooms:
        client.send(f"JOIN|#{room}\n".encode())
        client.expect("JOIN_OK")
    return client


def test_registration_speaks_the_welcome_isupport_and_motd(make_server):
    server = make_server(irc=True, motd="be kind\nship often")
    client = IrcClient(server.port)
    client.send("CAP LS 302", "NICK wee", "USER wee 0 * :Wee")
    assert "sasl=PLAIN" in client.expect(r"CAP \* LS :(.*)").group(1)
    client.send("CAP END")
    client.expect(r"^:chatctl 001 wee ")
    isupport = client.expect(r" 005 wee (.*)").group(1)
    for token in ("CHANTYPES=#", "CASEMAPPING=", "NICKLEN=32", "CHANNELLEN=", "CHATHISTORY="):
        assert token in isupport
    client.expect(r" 372 wee :- be kind")
    client.expect(r" 376 wee ")
    client.expect(r"^:wee!wee@chatctl JOIN #main")
    client.send("PING :token1")
    client.expect(r"PONG chatctl :token1")
    client.send("FROB x")
    client.expect(r" 421 wee FROB ")
    client.close()
    plain = IrcClient(make_server(irc=True).port)
    plain.send("NICK other", "USER other 0 * :O")
    plain.expect(r" 422 other :MOTD File is missing")
    plain.send("WHOIS nobody")
    plain.expect(r" 401 other nobody ")
    plain.close()


def test_before_registration_only_registration_commands_work(irc):
    client = irc()
    client.send("NICK bad!nick")
    client.expect(r" 432 \* bad!nick ")
    client.send("JOIN #main")  # no name yet
    client.expect(r" 451 \* :You have not registered")


def test_irc_join_and_seed_users_talk_in_two_rooms_and_dm_both_ways(irc_server, irc):
    port = irc_server.port
    bob = chatctl_user(port, "bob", "deploys")
    seed = RawClient(port)  # the seed's client: one frame per write, no newline, no HELLO
    seed.send(b"USER|sam")
    assert seed.line() == "USER_OK"
    wee = irc("wee")
    wee.send("JOIN #deploys")
    wee.expect(r"^:wee!wee@chatctl JOIN #deploys")
    names = wee.expect(r" 353 wee = #deploys :(.*)").group(1).split()
    assert sorted(names) == ["bob", "wee"]
    wee.send("PRIVMSG #main :hello from irc")
    assert bob.expect("MSG|#main|").endswith("|wee|hello from irc")
    assert seed.expect("wee: ") == "wee: hello from irc"
    bob.send(b"MSG|#deploys|deploy is out\nMSG|#main|and main\n")
    wee.expect(r"^@?.*:bob!bob@chatctl PRIVMSG #deploys :deploy is out$")
    wee.expect(r":bob!bob@chatctl PRIVMSG #main :and main$")
    time.sleep(0.3)
    seed.send(b"MSG|from the seed")
    wee.expect(r":sam!sam@chatctl PRIVMSG #main :from the seed$")
    wee.send("PRIVMSG bob :psst")
    assert bob.expect("DM|").endswith("|wee|bob|psst")
    bob.send(b"DM|wee|psst back\n")
    wee.expect(r":bob!bob@chatctl PRIVMSG wee :psst back$")
    wee.send("PRIVMSG #deploys :\x01ACTION ships it\x01")
    assert bob.expect("ME|#deploys|").endswith("|wee|ships it")
    wee.send("PRIVMSG nobody :hi")
    wee.expect(r" 401 wee nobody ")
    bob.close()
    seed.close()


def test_topic_names_who_list_and_whois(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob", "deploys")
    wee = irc("wee")
    wee.send("JOIN #deploys", "TOPIC #deploys :release day")
    wee.expect(r":wee!wee@chatctl TOPIC #deploys :release day")
    assert chatctl.parse_event(bob.expect("TOPIC|")).text == "release day"
    bob.send(b"TOPIC|#deploys|release night\n")
    wee.expect(r":bob!bob@chatctl TOPIC #deploys :release night")
    wee.send("TOPIC #deploys")
    wee.expect(r" 332 wee #deploys :release night")
    wee.send("NAMES #deploys")
    wee.expect(r" 353 wee = #deploys :")
    wee.expect(r" 366 wee #deploys ")
    wee.send("WHO #deploys")
    wee.expect(r" 352 wee #deploys \w+ chatctl chatctl \w+ H :0")
    wee.expect(r" 315 wee #deploys ")
    wee.send("LIST")
    wee.expect(r" 322 wee #deploys 2 :release night")
    wee.expect(r" 323 wee ")
    wee.send("WHOIS bob")
    wee.expect(r" 311 wee bob bob chatctl \* :bob")
    wee.expect(r" 319 wee bob :.*#deploys")
    wee.expect(r" 318 wee bob ")
    wee.send("MODE #deploys", "MODE wee +i", "AWAY :lunch", "AWAY")
    wee.expect(r" 324 wee #deploys :\+n$")  # (+t only where operators locked the topic)
    wee.expect(r"MODE wee :\+i")
    wee.expect(r" 306 wee ")
    wee.expect(r" 305 wee ")
    wee.send("JOIN #ops")
    wee.expect(r" 366 wee #ops ")
    bob.send(b"JOIN|#ops\nPART|#ops\n")  # no reason: no empty one either (irssi shows "[]")
    assert wee.expect(r":bob!bob@chatctl PART #ops.*").group(0).endswith("PART #ops")
    wee.send("PART #deploys :done here")
    wee.expect(r":wee!wee@chatctl PART #deploys")
    assert chatctl.parse_event(bob.expect("EXIT|")).name == "wee"
    bob.close()


def test_the_server_password_is_pass(make_server):
    server = make_server(irc=True, password="letmein", auth_delay=0)
    wrong = IrcClient(server.port)
    wrong.send("PASS nope", "NICK wee", "USER wee 0 * :W")
    wrong.expect(r" 464 ")
    wrong.expect(r"^ERROR ")
    wrong.close()
    none = IrcClient(server.port)
    none.send("NICK wee", "USER wee 0 * :W")
    none.expect(r" 464 ")
    none.close()
    right = IrcClient(server.port)
    right.send("PASS letmein", "NICK wee", "USER wee 0 * :W")
    right.expect(r" 001 wee ")
    right.close()


def test_a_protected_name_needs_sasl(irc_server, irc):
    protected_name(irc_server.port, "ana", "anapass123")
    impostor = irc()
    impostor.send("NICK ana", "USER ana 0 * :A")
    impostor.expect(r" 433 \* ana :.*protected")
    impostor.send("NICK ana2")
    impostor.expect(r" 001 ana2 ")
    guesser = irc()
    guesser.send("CAP LS 302", "NICK ana", "USER ana 0 * :A", "CAP REQ :sasl")
    guesser.expect(r"ACK :sasl")
    import base64

    guesser.send("AUTHENTICATE PLAIN")
    guesser.expect(r"AUTHENTICATE \+")
    guesser.send("AUTHENTICATE " + base64.b64encode(b"\0ana\0wrongpass").decode())
    guesser.expect(r" 904 ")
    real = irc()
    real.register("ana", "sasl", sasl=("ana", "anapass123"))
    assert any(s.name == "ana" and s.owner for s in irc_server.registry.sessions())


def test_history_replays_on_join_with_server_time_and_chathistory_pages_back(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob", "deploys")
    bob.send(b"".join(f"MSG|#deploys|old {i}\n".encode() for i in range(1, 31)))
    acks = [bob.expect("MSG_OK|") for _ in range(30)]
    first_ts = acks[0].split("|")[2]
    plain = irc("plain", caps="server-time")
    plain.send("JOIN #deploys")
    replayed = plain.expect(r"^@time=(\S+) :bob!bob@chatctl PRIVMSG #deploys :old 11$")
    assert replayed.group(1)[:16] == first_ts[:16]  # the message's own time, not now
    plain.expect(r"PRIVMSG #deploys :old 30$")
    pager = irc("pager", caps="server-time message-tags batch draft/chathistory")
    pager.send("JOIN #deploys")
    pager.expect(r" 366 pager #deploys ")
    pager.send("CHATHISTORY LATEST #deploys * 5")
    batch = pager.expect(r"^BATCH \+(\S+) chathistory #deploys").group(1)
    ids = [int(pager.expect(rf"^@batch={batch};time=\S+;msgid=(\d+) :bob\S* PRIVMSG #deploys :old").group(1))
           for _ in range(5)]
    pager.expect(rf"^BATCH -{batch}")
    pager.send(f"CHATHISTORY BEFORE #deploys msgid={ids[0]} 3")
    batch = pager.expect(r"^BATCH \+(\S+) chathistory").group(1)
    older = [pager.expect(r"PRIVMSG #deploys :(old \d+)").group(1) for _ in range(3)]
    assert older == ["old 23", "old 24", "old 25"]
    pager.expect(rf"^BATCH -{batch}")
    bob.close()


def test_a_long_message_is_split_for_irc_and_a_multiline_one_is_several_lines(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    wee = irc("wee", caps="message-tags")
    long_text = " ".join(f"word{i:04d}" for i in range(220))  # about 2,000 bytes
    bob.send(f"MSG|#main|{long_text}\n".encode())
    pieces, raw_lengths = [], []
    while sum(map(len, pieces)) < len(long_text):
        line = wee.expect(r":bob!bob@chatctl PRIVMSG #main :(.*)$")
        raw_lengths.append(len(line.string.split(" ", 1)[1].encode()) + 2)  # tags apart, CR LF counted
        pieces.append(line.group(1))
    assert "".join(pieces) == long_text  # cut after spaces, nothing lost
    assert len(pieces) >= 4 and max(raw_lengths) <= 512
    bob.send(b"MSG|#main|first line\\nsecond line\n")
    one = wee.expect(r"msgid=(\d+) :bob!bob@chatctl PRIVMSG #main :first line$").group(1)
    assert wee.expect(r"msgid=(\S+) :bob!bob@chatctl PRIVMSG #main :second line$").group(1).startswith(one)
    bob.close()


def test_irc_formatting_is_stripped_for_everyone_else(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    wee = irc("wee")
    wee.send("PRIVMSG #main :\x02bold\x02 and \x0304,01red\x03 and \x1ditalic\x1d\x0f")
    assert bob.expect("MSG|#main|").endswith("|wee|bold and red and italic")
    bob.close()


def test_echo_message_gives_the_sender_its_line_with_its_id(irc_server, irc):
    wee = irc("wee", caps="echo-message message-tags")
    wee.send("PRIVMSG #main :echoed")
    msgid = wee.expect(r"msgid=(\d+) :wee!wee@chatctl PRIVMSG #main :echoed$").group(1)
    assert irc_server.history.recent(None, 1)[0][0].id == int(msgid)


def test_a_flood_is_throttled(make_server):
    server = make_server(irc=True, rate=5, burst=10, flood_limit=50)
    flood = IrcClient(server.port)
    flood.register("flood")
    flood.send(*[f"PRIVMSG #main :spam {i}" for i in range(200)])
    flood.expect(r"NOTICE flood :.*too many", timeout=10)
    flood.expect(r"^ERROR :Closing link", timeout=10)
    assert server.history.count() <= 20
    flood.close()


def test_tls_on_the_same_port_with_the_pinned_certificate(make_server):
    server = make_server(irc=True, tls=True)
    client = IrcClient(server.port, tls=True)
    der = client.sock.getpeercert(binary_form=True)
    assert chatctl.certificate_fingerprint(der) == server.tls_fingerprint
    client.register("secure")
    client.close()


def test_an_irc_port_of_its_own(make_server):
    server = make_server(irc=False, irc_port=free_port())
    assert server.gateway_port("irc") and server.gateway_port("irc") != server.port
    client = IrcClient(server.gateway_port("irc"))
    client.register("wee")
    ours = RawClient(server.port)  # the main port still speaks our protocol only
    ours.send(b"NICK wee2\n")
    assert ours.line().startswith("ERR|unknown-command|")
    client.close()
    ours.close()


def test_irc_is_on_by_default(server):
    client = IrcClient(server.port)
    client.register("wee")
    client.close()


def test_without_irc_an_irc_client_gets_our_error(make_server):
    client = RawClient(make_server(irc=False).port)
    client.send(b"NICK wee\r\n")
    assert client.line().startswith("ERR|unknown-command|")
    client.close()


def test_the_python_irc_library_talks_with_a_chatctl_user(irc_server):
    irclib = pytest.importorskip("irc.client", reason="pip install -r requirements-test.txt")
    reactor = irclib.Reactor()
    heard: list[tuple[str, str, str]] = []
    connection = reactor.server().connect("127.0.0.1", irc_server.port, "libuser")
    def hear(conn, event):
        heard.append((event.type, event.source.nick, event.arguments[0]))

    for kind in ("pubmsg", "privmsg"):
        connection.add_global_handler(kind, hear)

    def pump(until, seconds=5.0):
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            reactor.process_once(0.05)
        assert until()

    pump(lambda: any(s.name == "libuser" for s in irc_server.registry.sessions()))
    connection.join("#deploys")
    pump(lambda: any(s.name == "libuser" and "deploys" in s.rooms for s in irc_server.registry.sessions()))
    bob = chatctl_user(irc_server.port, "bob", "deploys")
    bob.send(b"MSG|#deploys|hello library\nDM|libuser|and privately\n")
    pump(lambda: len(heard) >= 2)
    assert ("pubmsg", "bob", "hello library") in heard and ("privmsg", "bob", "and privately") in heard
    connection.privmsg("#deploys", "hello bob")
    assert bob.expect("MSG|#deploys|").endswith("|libuser|hello bob")
    connection.disconnect("bye")
    bob.close()


# --- replies, reactions, edits and deletions --------------------------------------------------------


def test_replies_reactions_edits_and_deletions_as_tags_for_who_asks_and_notices_for_the_rest(irc_server, irc):
    tagged = irc("tagged", "message-tags draft/message-redaction echo-message")
    plain = irc("plain")
    bob = chatctl_user(irc_server.port, "bob", options="|actions")
    bob.send(b"MSG|deploy done\n")
    first = chatctl.parse_event(bob.expect("MSG_OK|")).id
    tagged.expect(rf"msgid={first} :bob!\S+ PRIVMSG #main :deploy done")

    tagged.send(f"@+draft/reply={first} PRIVMSG #main :great work")  # a reply, as Halloy or Goguma sends it
    reply = chatctl.parse_event(bob.expect("MSGX|")).message
    assert (reply.sender, reply.ref, reply.text) == ("tagged", first, "great work")
    plain.expect(r":tagged!\S+ PRIVMSG #main :great work$")
    tagged.send(f"@+draft/react=👍;+draft/reply={first} TAGMSG #main")
    assert bob.expect("REACT|").split("|")[4:] == ["tagged", str(first), "👍", "1"]
    plain.expect(r":tagged!\S+ NOTICE #main :reacted 👍 to bob's \"deploy done\"$")
    tagged.send(f"@+draft/unreact=👍;+draft/reply={first} TAGMSG #main")
    assert bob.expect("REACT|").split("|")[4:] == ["tagged", str(first), "👍", "0"]
    tagged.send(f"@+draft/unreact=👍;+draft/reply={first} TAGMSG #main")  # not given: nothing to take back
    assert bob.silent(0.2)

    bob.send(f"REACT|{first}|🎉\nEDIT|{first}|deploy done (v2)\nREPLY|{reply.id}|thanks\n".encode())
    tagged.expect(rf"\+draft/react=🎉;\+draft/reply={first}\b.* :bob!\S+ TAGMSG #main$")
    tagged.expect(rf"\+draft/reply={first}\b.* :bob!\S+ NOTICE #main :\(edited\) deploy done \(v2\)$")
    tagged.expect(rf"\+draft/reply={reply.id}\b.* :bob!\S+ PRIVMSG #main :thanks$")
    plain.expect(r":bob!\S+ NOTICE #main :reacted 🎉 to bob's \"deploy done\"$")
    plain.expect(r":bob!\S+ NOTICE #main :\(edited\) deploy done \(v2\)$")

    tagged.send(f"REDACT #main {first} :not yours")
    tagged.expect(rf"FAIL REDACT REDACT_FORBIDDEN #main {first} :")
    plain.send(f"EDIT #main {reply.id} :great work!")  # chatctl's own command: not plain's message
    plain.expect(r"FAIL EDIT NOT_AUTHOR ")
    tagged.send(f"EDIT #main {reply.id} :great work!")
    assert bob.expect("EDIT|").endswith(f"|tagged|{reply.id}|great work!")
    tagged.send(f"REDACT #main {reply.id}")
    assert bob.expect("DELETE|").endswith(f"|tagged|{reply.id}")
    tagged.expect(rf":tagged!\S+ REDACT #main {reply.id}$")
    plain.expect(r":tagged!\S+ NOTICE #main :deleted a message$")
    plain.send("CHATHISTORY LATEST #main * 10")  # the history says so too
    plain.expect(r":tagged!\S+ PRIVMSG #main :\(message deleted\)$")
    bob.close()


# --- real IRC clients in tmux ------------------------------------------------------------


def sessions_named(server, name: str, room: str = "main") -> bool:
    return any(s.name == name and room in s.rooms for s in server.registry.sessions())


def test_irssi_and_weechat_talk_with_join_users(irc_server, tmux_env, tmp_path):
    port = irc_server.port
    irssi = Tmux("irssi", [binary("irssi"), f"--home={tmp_path / 'irssi'}", "-c", "127.0.0.1",
                           "-p", str(port), "-n", "irssiuser"], tmux_env)
    weechat_home = tmp_path / "weechat"
    weechat = Tmux("weechat", [binary("weechat"), "-t", "-d", str(weechat_home),
                               "-r", f"/server add team 127.0.0.1/{port} -notls -nicks=weeuser;"
                                     "/set irc.server.team.autojoin #deploys;/connect team"], tmux_env)
    try:
        wait_until(lambda: sessions_named(irc_server, "irssiuser"), timeout=20)
        wait_until(lambda: sessions_named(irc_server, "weeuser", "deploys"), timeout=20)
        irssi.keys("/join #deploys", "Enter")
        wait_until(lambda: sessions_named(irc_server, "irssiuser", "deploys"), timeout=10)
        weechat.wait_for("#main")  # the server put it in #main after its autojoin: back to #deploys
        weechat.keys("/buffer #deploys", "Enter")
        bob = chatctl_user(port, "bob", "deploys")
        bob.send(b"MSG|#deploys|hello both of you\n")
        irssi.wait_for("hello both of you")
        weechat.wait_for("hello both of you")
        irssi.keys("hi from irssi", "Enter")
        assert bob.expect("MSG|#deploys|").endswith("|irssiuser|hi from irssi")
        weechat.wait_for("hi from irssi")
        weechat.keys("hi from weechat", "Enter")
        assert bob.expect("MSG|#deploys|").endswith("|weeuser|hi from weechat")
        irssi.wait_for("hi from weechat")
        irssi.keys("/msg bob a private word", "Enter")
        assert bob.expect("DM|").endswith("|irssiuser|bob|a private word")
        bob.close()
    finally:
        irssi.close()
        weechat.close()


def test_irssi_edits_and_deletes_its_message_and_sees_what_others_do_to_it(irc_server, tmux_env, tmp_path):
    irssi = Tmux("irssi", [binary("irssi"), f"--home={tmp_path / 'irssi'}", "-c", "127.0.0.1",
                           "-p", str(irc_server.port), "-n", "irssiuser"], tmux_env)
    try:
        wait_until(lambda: sessions_named(irc_server, "irssiuser"), timeout=20)
        bob = chatctl_user(irc_server.port, "bob", options="|actions")
        irssi.keys("/join #main", "Enter")
        irssi.keys("the deploy is done", "Enter")
        mine = chatctl.parse_event(bob.expect("MSG|#main|")).message.id
        bob.send(f"REACT|{mine}|👍\nREPLY|{mine}|nice\n".encode())
        irssi.wait_for("reacted 👍 to irssiuser's \"the deploy is done\"")
        irssi.wait_for("nice")
        irssi.keys(f"/quote EDIT #main {mine} :the deploy is done (v2)", "Enter")
        assert bob.expect("EDIT|").endswith(f"|irssiuser|{mine}|the deploy is done (v2)")
        irssi.wait_for("(edited) the deploy is done (v2)")
        irssi.keys(f"/quote REDACT #main {mine}", "Enter")
        assert bob.expect("DELETE|").endswith(f"|irssiuser|{mine}")
        irssi.wait_for("deleted a message")
        bob.close()
    finally:
        irssi.close()


def test_the_server_pings_a_quiet_irc_client_and_its_pong_keeps_it(make_server):
    server = make_server(irc=True, idle_timeout=2.0)
    client = IrcClient(server.port)
    client.register("quiet")
    client.expect(r"^PING :chatctl", timeout=5)
    client.send("PONG :chatctl")
    client.expect(r"^PING :chatctl", timeout=5)  # asked again after another quiet spell: still connected
    assert any(s.name == "quiet" for s in server.registry.sessions())
    client.close()


def test_whois_shows_away(irc_server, irc):
    away = irc("lunching")
    away.send("AWAY :at lunch")
    away.expect(r" 306 ")
    asker = irc("asker")
    asker.send("WHOIS lunching")
    asker.expect(r" 301 asker lunching :at lunch")
    asker.send("WHOIS gone", "WHOWAS gone")  # irssi asks WHOWAS after a WHOIS of someone offline
    asker.expect(r" 401 asker gone :No such nick")
    asker.expect(r" 406 asker gone :There was no such nickname")
    asker.expect(r" 369 asker gone :End of WHOWAS")


def test_a_target_with_a_pipe_is_no_nick(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    wee = irc("wee")
    bob.expect("JOIN|")
    wee.send("PRIVMSG bob|extra :text")
    wee.expect(r" 401 wee bob\|extra ")
    assert bob.silent()  # no DM reached bob with "extra|text" as its text
    bob.close()


def test_people_coming_and_going_are_join_and_quit(irc_server, irc):
    wee = irc("wee")

    def names_in_main() -> list[str]:
        wee.send("NAMES #main")
        names = wee.expect(r" 353 wee = #main :(.*)$").group(1).split()
        wee.expect(r" 366 wee #main ")
        return [name.lstrip("~&@%+") for name in names]

    for name in ("bob", "cat"):
        visitor = chatctl_user(irc_server.port, name)
        wee.expect(rf"^(@\S+ )?:{name}!{name}@chatctl JOIN #main$")
        assert name in names_in_main()
        visitor.send(b"QUIT|lunch\n")
        wee.expect(rf"^(@\S+ )?:{name}!{name}@chatctl QUIT :Quit: lunch$")
        visitor.close()
    assert names_in_main() == ["wee"]  # both gone from the channel, not only announced as gone
    assert not [line for line in wee.seen if re.search(r" (PART|KICK) ", line)], wee.seen  # quit, not part


def test_chathistory_with_a_nick_is_that_conversation_only(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    ana = irc("ana", caps="batch draft/chathistory message-tags")
    bob.send(b"MSG|#main|for everyone\nDM|ana|for ana only\n")
    ana.expect(r"PRIVMSG ana :for ana only")
    ana.send("PRIVMSG bob :and back")
    bob.expect("DM|")
    time.sleep(0.2)
    ana.send("CHATHISTORY LATEST bob * 10")
    batch = ana.expect(r"^BATCH \+(\S+) chathistory bob").group(1)
    texts = []
    while not (line := ana.line()).startswith("BATCH -"):
        texts.append(line.split(" :", 2)[-1])
    assert texts == ["for ana only", "and back"]
    assert line == f"BATCH -{batch}"
    bob.close()


def test_joining_shows_join_topic_names_then_the_replay_and_main_has_its_topic(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob", "deploys")
    bob.send(b"TOPIC|#main|the main topic\nTOPIC|#deploys|ship it\nMSG|#deploys|before you came\n")
    bob.expect("MSG_OK")
    wee = IrcClient(irc_server.port)
    wee.send("CAP LS 302", "NICK wee", "USER wee 0 * :W", "CAP REQ :server-time", "CAP END")
    wee.expect(r":wee!wee@chatctl JOIN #main$")
    wee.expect(r" 332 wee #main :the main topic")
    wee.send("JOIN #deploys")
    order = [wee.expect(r"JOIN #deploys|332 wee #deploys|366 wee #deploys|PRIVMSG #deploys").group(0)
             for _ in range(4)]
    assert order == ["JOIN #deploys", "332 wee #deploys", "366 wee #deploys", "PRIVMSG #deploys"]
    wee.close()
    bob.close()


def test_user_after_sasl_is_not_a_reregistration(irc_server):
    import base64

    protected_name(irc_server.port, "ana", "anapass123")
    client = IrcClient(irc_server.port)
    client.send("CAP LS 302", "NICK ana", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
    client.expect(r"^AUTHENTICATE \+")
    client.send("AUTHENTICATE " + base64.b64encode(b"\0ana\0anapass123").decode())
    client.expect(r" 903 ")
    client.send("USER ana 0 * :A", "CAP END")  # irssi's order
    client.expect(r" 001 ana ")
    assert not any(" 462 " in line for line in client.seen), client.seen
    client.close()


def test_what_an_irc_user_sends_others_is_cleaned_echo_and_away_too(irc_server, irc):
    evil = irc("evil", caps="echo-message")
    evil.send("AWAY :brb\r:joiner!joiner@chatctl PRIVMSG victim :hi\x1b[31m")
    evil.expect(r" 306 ")
    evil.send("PRIVMSG #main :esc\x1b[2J\x07bell")
    echoed = evil.expect(r":evil!evil@chatctl PRIVMSG #main :(.*)$").group(1)
    assert "\x1b" not in echoed and "\x07" not in echoed and echoed.startswith("esc")
    asker = irc("asker")
    asker.send("WHOIS evil")
    away = asker.expect(r" 301 asker evil :(.*)$").group(1)
    assert "\r" not in away and "\x1b" not in away


def test_without_server_time_there_is_no_replay_a_bot_would_take_for_live(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    bob.send(b"MSG|#main|!deploy prod\n")
    bob.expect("MSG_OK")
    bot = irc("bot")  # no capabilities, as the irc library's bots
    bot.send("PING :probe")
    bot.expect(r"PONG chatctl :probe")
    assert not any("!deploy prod" in line for line in bot.seen)
    bob.close()


def test_many_targets_are_capped_deduplicated_and_each_costs_a_rate_token(make_server):
    server = make_server(irc=True, rate=0.001, burst=12)  # nearly no refill: the burst is all there is
    nina = IrcClient(server.port)
    nina.register("nina")
    spam = IrcClient(server.port)
    spam.register("spam")  # 4 frames: 8 tokens left
    spam.send("PRIVMSG " + ",".join(["nina"] * 1500) + " :amp")  # one target after all: 1 token
    nina.expect(r":spam!spam@chatctl PRIVMSG nina :amp$")
    spam.send("PRIVMSG a,b,c,d,e :too many")  # 407, and a token
    spam.expect(r" 407 spam ")
    for _ in range(3):  # 3 targets, 3 tokens a line: the second takes the last, the third is refused
        spam.send("PRIVMSG nina,spam,#main :x")
    spam.expect(r"NOTICE spam :too many frames too fast")
    spam.send("PRIVMSG nina :probe")  # refused too: the bucket is empty
    time.sleep(0.5)
    nina.send("PING :done")
    nina.expect(r"PONG chatctl :done")
    assert sum(line.endswith("PRIVMSG nina :x") for line in nina.seen) == 2
    assert sum(line.endswith(":amp") for line in nina.seen) == 1
    nina.close()
    spam.close()


def test_sasl_data_comes_in_pieces_of_400(make_server):
    import base64

    server = make_server(irc=True, auth_delay=0)
    password = "p" * 500
    protected_name(server.port, "longpw", password)
    client = IrcClient(server.port)
    client.send("CAP LS 302", "NICK longpw", "USER longpw 0 * :L", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
    client.expect(r"^AUTHENTICATE \+")
    data = base64.b64encode(f"\0longpw\0{password}".encode()).decode()
    pieces = [data[i:i + 400] for i in range(0, len(data), 400)]
    last = ["AUTHENTICATE +"] if len(pieces[-1]) == 400 else []  # a full last piece: + ends the data
    client.send(*[f"AUTHENTICATE {p}" for p in pieces], *last)
    client.expect(r" 903 ")
    client.close()


def test_chathistory_refuses_bad_references(irc_server, irc):
    pager = irc("pager", caps="batch draft/chathistory")
    for bad in ("BEFORE #main msgid=abc 5", "AFTER #main msgid=-1 5", "BEFORE #main timestamp=garbage 5",
                "LATEST #main * 0", "LATEST #main * -1", "BEFORE #main msgid=\u0661 5"):
        pager.send(f"CHATHISTORY {bad}")
        pager.expect(r"^FAIL CHATHISTORY INVALID_PARAMS ")


def test_room_refusals_name_the_room_and_the_rest_of_the_line_goes_on(irc_server, irc):
    wee = irc("wee")
    wee.send("JOIN #one,,#two")
    wee.expect(r":wee!wee@chatctl JOIN #one$")
    wee.expect(r":wee!wee@chatctl JOIN #two$")
    wee.send("PART #one :see you", "PART #nothere", "TOPIC #nothere :x")
    wee.expect(r":wee!wee@chatctl PART #one :see you$")
    wee.expect(r" (403|442) wee #nothere ")
    wee.expect(r" (403|442) wee #nothere ")
    assert not any(" * :" in line and (" 403 " in line or " 442 " in line) for line in wee.seen)


def test_one_channel_written_three_ways_is_one_target(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    wee = irc("wee")
    wee.send("PRIVMSG #main,#MAIN,#Main,BOB,bob :once", "PING :done")
    wee.expect(r"PONG")
    assert bob.expect("MSG|#main|").endswith("|wee|once")
    assert bob.expect("DM|").endswith("|once")
    assert bob.silent(0.5)  # no second copy of either


@pytest.mark.parametrize("account", ["alice", "ceo"])  # protected (a wrong password), or nobody's
def test_a_failed_sasl_login_keeps_the_nick_the_client_asked_for(irc_server, irc, account):
    import base64

    protected_name(irc_server.port, "alice", "alicepass123")
    mallory = irc()
    mallory.send("CAP LS 302", "NICK mallory", "USER mallory 0 * :M", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
    mallory.expect(r"^AUTHENTICATE \+")
    mallory.send("AUTHENTICATE " + base64.b64encode(f"\0{account}\0wrongpass".encode()).decode())
    mallory.expect(r" 904 ")
    mallory.send("CAP END")
    mallory.expect(r" 001 mallory ")
    assert not [line for line in mallory.seen if re.search(r" (433|900|903) ", line)], mallory.seen


# --- text that looks like our protocol is text (the gateway encodes events; it parses nothing) ----------

FORGED = "ops END|HISTORY|0"


def test_a_topic_that_looks_like_our_protocol_leaves_join_and_list_whole(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob", "ops")
    bob.send(f"TOPIC|#ops|{FORGED}\n".encode())
    bob.expect("TOPIC|#ops|")
    wee = irc("wee")
    wee.send("JOIN #ops")
    wee.expect(r"^:wee!wee@chatctl JOIN #ops$")
    assert wee.expect(r" 332 wee #ops :(.*)$").group(1) == FORGED
    wee.expect(r" 353 wee = #ops :.*bob")
    wee.expect(r" 366 wee #ops ")
    wee.send("LIST")
    assert wee.expect(r" 322 wee #ops \d+ :(.*)$").group(1) == FORGED
    wee.expect(r" 323 wee ")


def test_quit_and_part_reasons_that_look_like_our_protocol_reach_irc(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob", "ops")
    wee = irc("wee")
    wee.send("JOIN #ops")
    wee.expect(r" 366 wee #ops ")
    bob.send(f"PART|#ops|{FORGED}\n".encode())
    assert wee.expect(r":bob!bob@chatctl PART #ops :(.*)$").group(1) == FORGED
    bob.send(f"QUIT|{FORGED}\n".encode())
    assert wee.expect(r":bob!bob@chatctl QUIT :(.*)$").group(1) == f"Quit: {FORGED}"
    wee.send("NAMES #main")
    assert "bob" not in wee.expect(r" 353 wee = #main :(.*)$").group(1).split()


def test_echo_message_stays_in_step_beside_text_that_looks_like_our_protocol(make_server, irc):
    server = make_server(irc=True, rate=0)
    bob = chatctl_user(server.port, "bob")
    wee = irc("wee", caps="echo-message", port=server.port)
    for round_ in range(3):  # wee's messages and bob's forged ones in the same fan-out batches
        wee.send(*(f"PRIVMSG #main :a{round_}.{i}" for i in range(30)))
        bob.send(b"".join(f"MSG|{FORGED} b{round_}.{i}\n".encode() for i in range(30)))
        for _ in range(30):
            bob.expect("MSG_OK|")  # (so each is on its way to wee before wee's PING below)
        echoes = [wee.expect(r":wee!wee@chatctl PRIVMSG #main :(a\S+)$").group(1) for _ in range(30)]
        assert echoes == [f"a{round_}.{i}" for i in range(30)]
    wee.send("PING :end")
    wee.expect("PONG")
    forged = [line for line in wee.seen if ":bob!bob@chatctl PRIVMSG #main :" in line]
    assert len(forged) == 90 and all(FORGED in line for line in forged)


def test_a_chathistory_answer_is_one_batch_beside_live_lines_that_look_like_one(irc_server, irc):
    bob = chatctl_user(irc_server.port, "bob")
    ana = irc("ana", caps="batch draft/chathistory message-tags server-time")
    bob.send(b"".join(f"MSG|{FORGED} {i}\n".encode() for i in range(20)))
    for _ in range(20):
        bob.expect("MSG_OK|")
    for _ in range(5):
        bob.send(f"MSG|live {FORGED}\n".encode())
        bob.expect("MSG_OK|")  # on its way to ana: a live line, before the answer below
        ana.send("CHATHISTORY LATEST #main * 5")
        ana.expect(r"BATCH \+(\S+) chathistory #main")
        inside = []
        while not (line := ana.line()).startswith("BATCH -"):
            inside.append(line)
        assert len(inside) == 5, inside
        assert all("PRIVMSG #main" in line and "batch=" in line for line in inside), inside
    ana.send("PING :end")
    ana.expect("PONG")
    live = [line for line in ana.seen if ":live " in line and "batch=" not in line]
    assert len(live) == 5


def test_a_replay_or_a_history_page_of_many_line_messages_never_drops_the_irc_client(make_server, irc):
    """A room's last messages can be thousands of short lines each: in IRC form (a PRIVMSG with its
    tags per line) they are bounded like any reply, so asking for them never overflows the SendQ."""
    server = make_server(irc=True, rate=0, address_byte_rate=0)
    bob = chatctl_user(server.port, "b" * 32)
    text = "\\n".join("a" for _ in range(1500))
    for _ in range(20):
        bob.send(f"MSG|#main|{text}\n".encode())
        bob.expect("MSG_OK|", timeout=10)
    for caps in ("server-time", "server-time message-tags",
                 "batch draft/chathistory message-tags server-time"):
        wee = irc(None, port=server.port)
        wee.register("wee", caps)
        if "chathistory" in caps:
            wee.send("CHATHISTORY LATEST #main * 100")
            wee.expect(r"BATCH -", timeout=20)
        wee.send("PING :alive")
        wee.expect(r"PONG .*:alive", timeout=20)
        assert not any("sendq exceeded" in line for line in wee.seen)
        wee.send("QUIT")
        wait_until(lambda: not any(s.name == "wee" for s in server.registry.sessions()))


def test_irc_readers_get_no_more_than_the_address_byte_budget(make_server, irc):
    burst, rate = 100_000, 50_000
    server = make_server(irc=True, address_byte_rate=rate, address_byte_burst=burst, rate=10_000,
                         burst=10_000)
    wee = irc("wee", caps="server-time message-tags", port=server.port)
    bob = chatctl_user(server.port, "b" * 32)
    start = time.monotonic()
    text = "\\n".join("x" for _ in range(200))
    for _ in range(40):
        bob.send(f"MSG|#main|{text}\n".encode())
    bob.send(b"PING|end\n")
    bob.expect("PONG|end", timeout=20)
    elapsed = time.monotonic() - start
    wee.send("PING :end")
    wee.expect(r"PONG .*:end", timeout=20)
    received = sum(len(line) + 2 for line in wee.seen if " PRIVMSG #main :" in line)
    assert 0 < received <= burst + rate * elapsed + 2000, (received, elapsed)



@pytest.mark.parametrize("name", ["NickServ", "nickserv", "ChanServ", "chatctl", "CHATCTL"])
def test_service_names_cannot_be_taken(irc_server, irc, name):
    ours = RawClient(irc_server.port)
    ours.send(f"USER|{name}\n".encode())
    assert ours.line().startswith("ERR|invalid-name|")
    wee = irc()
    wee.send(f"NICK {name}", "USER x 0 * :X")
    wee.expect(rf" 432 \* {name} ")


def test_list_pages_through_every_room(make_server, irc):
    topic = "t" * 290
    server = make_server(irc=True, rooms=[f"r{i:03d}: {topic}" for i in range(900)])
    wee = irc("wee", port=server.port)
    wee.send("LIST")
    wee.expect(r" 323 wee ", timeout=20)
    listed = [line for line in wee.seen if " 322 wee #" in line]
    assert len(listed) == 901 and sum(" 323 " in line for line in wee.seen) == 1
