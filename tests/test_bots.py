"""Bots: names registered as a bot's, and their tokens (made, used from send and IRC, listed, revoked)."""

from __future__ import annotations

import json

import pytest
from test_irc import IrcClient

import chatctl
from conftest import RawClient, run_cli

PASSWORD = "ci-password-1"


def bot_with_token(port: int, env: dict, label: str = "gha") -> str:
    """Register ``ci`` as a bot's name and make it a token (through the CLI); the token."""
    made = run_cli("register", "-p", str(port), "-u", "ci", "--bot", input=PASSWORD + "\n", env=env)
    assert made.returncode == 0, made.stderr
    token = run_cli("token", "create", "-p", str(port), "-u", "ci", "--name", label,
                    env={**env, "CHATCTL_USER_PASSWORD": PASSWORD})
    assert token.returncode == 0, token.stderr
    assert "shown this once" in token.stderr
    return token.stdout.strip()


def online_as(port: int, name: str, secret: str | None = None) -> RawClient:
    """A chatctl/1 client online as ``name``, proved with ``secret`` (a password or a token) if given."""
    client = RawClient(port)
    client.send(f"HELLO|chatctl/1\nUSER|{name}{'' if secret is None else '|' + secret}\n".encode())
    client.expect("USER_OK")
    return client


def test_a_bot_posts_with_its_token_until_it_is_revoked(make_server, isolated_home):
    server = make_server(auth_delay=0)
    ana = RawClient(server.port)
    ana.send(b"HELLO|chatctl/1\nUSER|ana\n")
    ana.expect("USER_OK")
    token = bot_with_token(server.port, isolated_home)
    assert token.startswith(chatctl.TOKEN_PREFIX) and len(token) > 40
    sent = run_cli("send", "-p", str(server.port), "-u", "ci", "build 42 is green",
                   env={**isolated_home, "CHATCTL_TOKEN": token})
    assert sent.returncode == 0, sent.stderr
    assert ana.expect("MSG|#main|").endswith("|ci|build 42 is green")
    flag = run_cli("send", "-p", str(server.port), "-u", "ci", "--token", token, "and with the flag",
                   env=isolated_home)
    assert flag.returncode == 0, flag.stderr
    assert ana.expect("MSG|#main|").endswith("|ci|and with the flag")

    owner = {**isolated_home, "CHATCTL_USER_PASSWORD": PASSWORD}
    listed = run_cli("token", "list", "-p", str(server.port), "-u", "ci", "--json", env=owner)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "gha" and entry["used"] is not None  # it has been used
    assert token not in listed.stdout and token[len(chatctl.TOKEN_PREFIX):] not in listed.stdout

    revoked = run_cli("token", "revoke", "-p", str(server.port), "-u", "ci", "gha", env=owner)
    assert revoked.returncode == 0, revoked.stderr
    refused = run_cli("send", "-p", str(server.port), "-u", "ci", "after the revoke",
                      env={**isolated_home, "CHATCTL_TOKEN": token})
    assert refused.returncode == chatctl.EXIT_REJECTED
    assert refused.stderr.count("\n") == 1 and "wrong token for 'ci'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_token_cannot_change_the_password_the_protection_or_the_tokens(make_server, isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    bot = online_as(server.port, "ci", token)
    for frame in (b"REGISTER|a-new-password\n", b"UNREGISTER\n", b"TOKEN|CREATE|another\n", b"TOKEN|LIST\n",
                  b"TOKEN|REVOKE|gha\n", b"BOT\n"):
        bot.send(frame)
        reply = bot.expect("ERR|")
        assert reply.split("|")[1] in ("token-login", "not-owner"), (frame, reply)
    bot.send(b"MSG|still a bot\n")
    assert bot.expect("MSG_OK").startswith("MSG_OK")
    assert server.accounts.password_hash(chatctl.confusable_key("ci")) is not None  # still protected
    again = run_cli("send", "-p", str(server.port), "-u", "ci", "the token still works",
                    env={**isolated_home, "CHATCTL_TOKEN": token})
    assert again.returncode == 0, again.stderr


def test_an_irc_bot_logs_in_with_its_token_as_the_sasl_password(make_server, isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    listener = RawClient(server.port)
    listener.send(b"HELLO|chatctl/1\nUSER|ana\n")
    listener.expect("USER_OK")
    irc = IrcClient(server.port)
    try:
        irc.register("ci", caps="sasl", sasl=("ci", token))
        irc.send("PRIVMSG #main :posted over IRC")
        assert listener.expect("MSG|#main|").endswith("|ci|posted over IRC")
    finally:
        irc.close()


def test_tokens_are_capped_named_once_and_only_for_protected_names(make_server, isolated_home):
    server = make_server(auth_delay=0, tokens_per_account=2)
    bot_with_token(server.port, isolated_home, "one")
    owner = online_as(server.port, "ci", PASSWORD)
    owner.send(b"TOKEN|CREATE|one\n")
    assert owner.expect("ERR|").startswith("ERR|bad-argument|ci has a token named 'one'")
    owner.send(b"TOKEN|CREATE|two\n")
    assert owner.expect("TOKEN_OK|").startswith("TOKEN_OK|two|chatctl_")
    owner.send(b"TOKEN|CREATE|three\n")
    assert owner.expect("ERR|").startswith("ERR|too-many-tokens|")
    owner.send(b"TOKEN|CREATE|bad name!\nTOKEN|REVOKE|nosuch\nTOKEN|FROB\n")
    assert owner.expect("ERR|").startswith("ERR|bad-argument|a token's name is")
    assert owner.expect("ERR|").startswith("ERR|unknown-token|")
    assert owner.expect("ERR|").startswith("ERR|bad-argument|TOKEN|CREATE")
    plain = RawClient(server.port)
    plain.send(b"HELLO|chatctl/1\nUSER|ana\nTOKEN|CREATE|mine\nBOT\n")
    assert plain.expect("ERR|").startswith("ERR|not-owner|")
    assert plain.expect("ERR|").startswith("ERR|not-owner|")


@pytest.mark.parametrize("command", [["token", "create"], ["token", "list"], ["token", "revoke", "x"]])
def test_token_commands_need_a_name(command, isolated_home):
    result = run_cli(*command, "-p", "1", env=isolated_home)
    assert result.returncode == chatctl.EXIT_USAGE and "no user name" in result.stderr


def test_with_a_bus_tokens_are_refused_in_one_line(redis_server, make_server, isolated_home):
    server = make_server(auth_delay=0, bus=redis_server.url, server_id="a")
    owner = RawClient(server.port)
    owner.send(f"HELLO|chatctl/1\nUSER|ci\nREGISTER|{PASSWORD}\n".encode())
    owner.expect("REGISTER_OK")
    owner.send(b"TOKEN|CREATE|gha\nBOT\n")
    assert owner.expect("ERR|").startswith("ERR|no-tokens|bot names and tokens are not shared across")
    assert owner.expect("ERR|").startswith("ERR|no-tokens|")


def test_irc_shows_a_bot_as_a_bot(make_server, isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    bot = online_as(server.port, "ci", token)
    irc = IrcClient(server.port)
    try:
        irc.send("CAP LS 302", "NICK wee", "USER wee 0 * :wee", "CAP REQ :message-tags", "CAP END")
        assert "BOT=B" in irc.expect(r" 005 wee .*BOT=B").group(0)
        irc.expect(r" 366 wee #main ")
        irc.send("WHO #main")
        assert irc.expect(r" 352 wee #main ci \S+ \S+ ci (\S+) ").group(1) == "HB"
        irc.send("WHO ci")
        assert irc.expect(r" 352 wee \* ci \S+ \S+ ci (\S+) ").group(1) == "HB"
        irc.send("WHOIS ci")
        irc.expect(r" 335 wee ci :is a bot")
        irc.send("WHOIS wee")
        irc.expect(r" 318 wee wee ")
        assert not any(" 335 " in line for line in irc.seen[-6:])  # a person is no bot
        bot.send(b"MSG|deployed\n")
        tags = irc.expect(r"^@(\S+) :ci!\S+ PRIVMSG #main :deployed").group(1).split(";")
        assert "bot" in tags
    finally:
        irc.close()


def test_our_lists_mark_bots_for_clients_that_ask_and_older_clients_get_three_fields(make_server,
                                                                                      isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    bot = RawClient(server.port)
    bot.send(f"HELLO|chatctl/1\nUSER|ci|{token}\nJOIN|#deploys\n".encode())
    bot.expect("JOIN_OK")
    new = RawClient(server.port)
    new.send(b"HELLO|chatctl/1|bots\nUSER|ana\nDIR\nNAMES|#deploys\n")
    assert " bot" in next(e for e in new.expect("USERS|").split("|")[1:] if e.startswith("ci "))
    names = chatctl.parse_event(new.expect("NAMES|"))
    assert [(u.name, u.bot) for u in names.users] == [("ci", True)]
    old = RawClient(server.port)  # a chatctl of before: its parser takes exactly three fields
    old.send(b"HELLO|chatctl/1\nUSER|bob\nDIR\n")
    assert all(len(entry.split(" ")) == 3 for entry in old.expect("USERS|").split("|")[1:])
    who = run_cli("who", "-p", str(server.port), "--json", env=isolated_home)
    assert who.returncode == 0, who.stderr
    assert {u["name"]: u["bot"] for u in json.loads(who.stdout)} == {"ci": True, "ana": False, "bob": False}
    table = run_cli("who", "-p", str(server.port), env=isolated_home)
    assert "ci (bot)" in table.stdout and "ana (bot)" not in table.stdout


def test_tui_marks_a_bot_among_the_members(make_server, isolated_home):
    from test_tui import client_config, connected, run, until

    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    bot = online_as(server.port, "ci", token)

    async def scenario(app, pilot):
        await connected(app, pilot)
        await until(pilot, lambda: "ci (bot)" in str(app.query_one("#members").content), "ci is marked")
        assert "ana (bot)" not in str(app.query_one("#members").content)

    run(scenario, client_config(server.port))
    bot.close()


def test_a_revoked_or_dropped_token_holds_the_name_no_longer(make_server, isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    held = online_as(server.port, "ci", token)
    owner = {**isolated_home, "CHATCTL_USER_PASSWORD": PASSWORD}
    assert run_cli("token", "revoke", "-p", str(server.port), "-u", "ci", "gha", env=owner).returncode == 0
    assert held.expect("BYE|") == "BYE|the token 'gha' was revoked"

    second = run_cli("token", "create", "-p", str(server.port), "-u", "ci", "--name", "spare", env=owner)
    squatter = RawClient(server.port)
    squatter.send(f"HELLO|chatctl/1\nUSER|ci|{second.stdout.strip()}\n".encode())
    squatter.expect("USER_OK")
    dropped = run_cli("register", "-p", str(server.port), "-u", "ci", "--drop", env=owner)
    assert dropped.returncode == 0, dropped.stderr
    assert squatter.expect("BYE|") == "BYE|the name's protection was dropped"
    again = run_cli("register", "-p", str(server.port), "-u", "ci", input=PASSWORD + "\n", env=isolated_home)
    assert again.returncode == 0, again.stderr  # the owner has the name back


def test_tokens_are_for_bots_names_only(make_server, isolated_home):
    server = make_server(auth_delay=0)
    person = RawClient(server.port)
    person.send(f"HELLO|chatctl/1\nUSER|anna\nREGISTER|{PASSWORD}\nTOKEN|CREATE|phone\n".encode())
    person.expect("REGISTER_OK")
    assert person.expect("ERR|").startswith("ERR|not-a-bot|anna is not a bot's name")


def test_a_secret_with_a_line_break_is_refused_not_sent_as_a_second_frame(make_server, isolated_home):
    server = make_server(auth_delay=0)
    bot_with_token(server.port, isolated_home)
    env = {**isolated_home, "CHATCTL_USER_PASSWORD": PASSWORD + "\nTOKEN|CREATE|injected"}
    sent = run_cli("send", "-p", str(server.port), "-u", "ci", "x", env=env)
    assert sent.returncode == chatctl.EXIT_CONFIG and "line break" in sent.stderr
    assert sent.stderr.count("\n") == 1
    assert [label for label, *_ in server.local_accounts.tokens(chatctl.confusable_key("ci"))] == ["gha"]


def test_a_bad_token_name_is_a_usage_error(isolated_home):
    result = run_cli("token", "create", "-p", "1", "-u", "ci", "--name", "bad name!", env=isolated_home)
    assert result.returncode == chatctl.EXIT_USAGE and "a token's name is 1 to 40" in result.stderr


def test_history_marks_a_bots_messages(make_server, isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    person = online_as(server.port, "ana")
    person.send(b"MSG|a person's line\n")
    person.expect("MSG_OK")
    sent = run_cli("send", "-p", str(server.port), "-u", "ci", "a bot's line",
                   env={**isolated_home, "CHATCTL_TOKEN": token})
    assert sent.returncode == 0, sent.stderr
    listed = run_cli("history", "-p", str(server.port), "--json", env=isolated_home)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["from"], r["bot"]) for r in rows] == [("ana", False), ("ci", True)]
    table = run_cli("history", "-p", str(server.port), env=isolated_home)
    assert "ci (bot)" in table.stdout and "ana (bot)" not in table.stdout


def test_a_token_given_for_a_name_nobody_protects_is_refused(make_server, isolated_home):
    server = make_server(auth_delay=0)
    token = bot_with_token(server.port, isolated_home)
    typo = run_cli("send", "-p", str(server.port), "-u", "cii", "build 43",
                   env={**isolated_home, "CHATCTL_TOKEN": token})
    assert typo.returncode == chatctl.EXIT_REJECTED
    assert "a token was given, but 'cii' is no bot's name" in typo.stderr
    assert not [m for m in server.history.recent(None, 10)[0] if m.sender == "cii"]
