"""who, send and serve as real subprocesses: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import chatctl
from conftest import CHATCTL, RawClient, default_sigint, read_line, run_cli, wait_until


def test_who_lists_users_as_a_table_and_as_json(isolated_home, server, user):
    user("ana")
    user("bob")
    table = run_cli("who", "-p", str(server.port), env=isolated_home)
    assert table.returncode == 0, table.stderr
    assert "2 online" in table.stdout
    assert re.search(r"ana .*\d\d:\d\d", table.stdout) and "bob" in table.stdout
    assert "\x1b[" not in table.stdout  # not a terminal: no colour
    data = json.loads(run_cli("who", "-p", str(server.port), "--json", env=isolated_home).stdout)
    assert [u["name"] for u in data] == ["ana", "bob"]
    assert all(u["since"].endswith("Z") and u["idle"] >= 0 for u in data)


def test_who_with_nobody_online(isolated_home, server):
    result = run_cli("who", "-p", str(server.port), env=isolated_home)
    assert result.returncode == 0
    assert "No one is online" in result.stderr
    assert result.stdout == ""


def test_send_delivers_and_exits_zero(isolated_home, server, user):
    bob = user("bob", hello=True)
    result = run_cli("send", "-p", str(server.port), "-u", "deploybot", "build 42 is green",
                     env=isolated_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert bob.line().endswith("|deploybot|build 42 is green")  # the message, and no JOIN before it
    assert bob.silent(0.3)  # nor a LEAVE after it: a script posts without presence notices


def test_send_reads_a_multi_line_message_from_stdin(isolated_home, server, user):
    bob = user("bob", hello=True)
    result = run_cli("send", "-p", str(server.port), "-u", "ci", "--json", "-",
                     input="line one\r\nline | two\n", env=isolated_home)
    assert result.returncode == 0, result.stderr
    ack = json.loads(result.stdout)
    event = chatctl.parse_event(bob.expect("MSG|"))
    assert event.message.text == "line one\nline | two"
    assert event.message.id == ack["id"]


def test_send_direct_message_and_user_from_environment(isolated_home, server, user):
    bob, eve = user("bob", hello=True), user("eve")
    env = {**isolated_home, "CHATCTL_USER": "ana", "CHATCTL_PORT": str(server.port)}
    result = run_cli("send", "--to", "bob", "just", "for", "you", env=env)
    assert result.returncode == 0, result.stderr
    assert bob.expect("DM|").endswith("|ana|bob|just for you")
    eve.send(b"PING\n")
    eve.expect("PONG")
    assert not any("just for you" in line for line in eve.seen)


def test_send_failures_have_exit_codes_and_one_line(isolated_home, server, user):
    user("taken")
    cases = [
        (("send", "-p", "1", "-u", "x", "hi"), chatctl.EXIT_CONNECT, "cannot connect to 127.0.0.1:1"),
        (("send", "-p", str(server.port), "-u", "taken", "hi"), chatctl.EXIT_REJECTED, "name-taken"),
        (("send", "-p", str(server.port), "-u", "bad name", "hi"), chatctl.EXIT_REJECTED, "invalid-name"),
        (("send", "-p", str(server.port), "-u", "x", "--to", "ghost", "hi"), chatctl.EXIT_REJECTED,
         "unknown-user"),
        (("send", "-p", str(server.port), "hi"), chatctl.EXIT_USAGE, "no user name"),
        (("send", "-p", str(server.port), "-u", "x", "  "), chatctl.EXIT_USAGE, "the message is empty"),
    ]
    for args, code, text in cases:
        result = run_cli(*args, env=isolated_home)
        assert result.returncode == code, (args, result.stderr)
        assert text in result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and text in errors[0]
        if code != chatctl.EXIT_USAGE:  # click shows usage lines before a usage error
            assert result.stderr == errors[0] + "\n"


def test_send_to_a_silent_server_times_out(isolated_home):
    import socket

    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        env = {**isolated_home, "CHATCTL_TIMEOUT": "0.5"}
        result = run_cli("send", "-p", str(port), "-u", "x", "hi", env=env)
    assert result.returncode == chatctl.EXIT_CONNECT
    assert "no answer from" in result.stderr


def test_help_lists_each_commands_own_exit_codes(isolated_home):
    send = run_cli("send", "--help", env=isolated_home)
    assert send.returncode == 0
    assert "Exit codes:" in send.stdout and "5   the server refused" in send.stdout
    serve = run_cli("serve", "--help", env=isolated_home)
    assert "1   cannot listen" in serve.stdout
    assert "the server refused" not in serve.stdout and "TLS certificate" not in serve.stdout


def start_serve(env, *args):
    # (SIGINT as a shell gives it, even if this run ignores it: test_serve_stops_cleanly_on_ctrl_c)
    proc = subprocess.Popen([*CHATCTL, "serve", "--host", "127.0.0.1", "--port", "0", *args],
                            env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    line = ""
    try:
        for _ in range(5):  # the history line comes first
            line = read_line(proc.stderr)
            if "listening" in line:
                break
    finally:
        if "listening" not in line:
            proc.kill()
    match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(config: (.*)\)", line)
    assert match, line
    proc.config_shown = match.group(2)
    return proc, int(match.group(1))


def test_serve_stops_cleanly_on_sigterm(isolated_home):
    proc, port = start_serve(isolated_home)
    try:
        assert proc.config_shown == "none, built-in defaults"
        client = RawClient(port)
        client.send(b"USER|ana\n")
        assert client.line() == "USER_OK"
        proc.send_signal(signal.SIGTERM)
        assert client.wait_closed()[-1] == "BYE|server shutting down"
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err
        assert "shutting down" in err and "stopped" in err
        assert "ana joined from 127.0.0.1" in err
    finally:
        proc.kill()


def test_serve_stops_cleanly_on_ctrl_c(isolated_home):
    proc, port = start_serve(isolated_home, "--log-level", "debug")
    try:
        client = RawClient(port)
        client.send(b"USER|x")  # connected, mid-frame
        wait_until(lambda: "connection from 127.0.0.1" in read_line(proc.stderr))  # the server has it
        proc.send_signal(signal.SIGINT)
        client.wait_closed()
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "stopped" in err
    finally:
        proc.kill()


def test_serve_reports_its_config_files(isolated_home, tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text("[server]\nmax_frame = 4096\n")
    proc, _ = start_serve(isolated_home, "--config", str(conf))
    try:
        assert proc.config_shown == str(conf)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_serve_on_a_busy_port_is_one_line(isolated_home, server):
    result = run_cli("serve", "--host", "127.0.0.1", "--port", str(server.port), env=isolated_home)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{server.port}: Address already in use"


def test_runs_as_python_module_file_too(isolated_home):
    result = subprocess.run([*CHATCTL, "--version"], capture_output=True, text=True, env=isolated_home)
    assert result.returncode == 0 and chatctl.__version__ in result.stdout


def test_display_text_is_literal():
    shown = chatctl.display_text("[bold red]x[/bold red] \x1b[2J\x07")
    assert "\x1b" not in shown and "\x07" not in shown
    from rich.console import Console

    console = Console(record=True, width=80, color_system=None)
    console.print(shown)
    assert console.export_text().strip() == "[bold red]x[/bold red] \ufffd[2J\ufffd"


def test_bench_counts_every_delivery_and_reports_json(make_server, isolated_home):
    server = make_server(rate=0, max_per_address=0, history=False)
    result = run_cli("bench", "--yes", "-p", str(server.port), "-n", "6", "-s", "3", "-m", "200", "--json",
                     env=isolated_home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sent"] == 600
    assert report["expected"] == report["received"] == 600 * 5
    assert (report["lost"], report["duplicates"], report["disconnects"]) == (0, 0, 0)
    assert report["deliveries_per_s"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert server.users() == []  # the load's clients are gone


def test_bench_paced_run_and_table(make_server, isolated_home):
    server = make_server(rate=0, max_per_address=0)
    started = time.monotonic()
    result = run_cli("bench", "--yes", "-p", str(server.port), "-n", "4", "-s", "2", "-m", "20",
                     "--rate", "40",
                     env=isolated_home)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 0.9  # 40 messages at 40 a second
    assert "deliveries/s" in result.stdout and "120 of 120" in result.stdout


def test_bench_against_default_limits_says_it_was_rate_limited(server, isolated_home):
    result = run_cli("bench", "--yes", "-p", str(server.port), "-n", "2", "-s", "1", "-m", "150",
                     env=isolated_home)
    assert result.returncode == 0, result.stdout  # refused is not lost
    assert "rate-limited" in result.stdout and "rate = 0" in result.stdout
    refused = int(re.search(r"refused\s+│\s+(\d+) message", result.stdout).group(1))
    lost = int(re.search(r"lost\s+│\s+(\d+)", result.stdout).group(1))
    assert refused > 0 and lost == 0


def test_bench_asks_before_posting_to_a_server_with_people_on_it(server, user, isolated_home):
    bob = user("bob", hello=True)
    result = run_cli("bench", "-p", str(server.port), "-n", "2", "-s", "1", "-m", "5", env=isolated_home)
    assert result.returncode == 2
    assert "reach the 1 people online" in result.stderr and "--yes" in result.stderr
    assert bob.silent(0.3)  # nothing was posted


# --- issue 10: small ones --------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "text"), [
    (("send", "-p", "99999", "-u", "x", "hi"), "99999 is not in the range"),
    (("who", "--tls-fingerprint", "SHA256:nope"), "not a SHA-256 fingerprint"),
    (("send", "-u", "x", "--me", "--to", "bob", "waves"), "--me and --to do not combine"),
])
def test_bad_flags_are_usage_errors(isolated_home, args, text):
    result = run_cli(*args, env=isolated_home)
    assert result.returncode == chatctl.EXIT_USAGE
    assert text in result.stderr and "Traceback" not in result.stderr


def test_a_string_where_the_config_wants_a_number_is_an_error(isolated_home):
    (Path.cwd() / "chatctl.toml").write_text('[client]\nport = "17001"\n')
    result = run_cli("who", env=isolated_home)
    assert result.returncode == chatctl.EXIT_CONFIG
    assert "[client] port: expected a whole number, got '17001'" in result.stderr


def test_history_as_a_protected_name_while_its_owner_is_online(make_server, isolated_home):
    server = make_server(auth_delay=0)
    bob = RawClient(server.port)
    bob.send(b"HELLO|chatctl/1\nUSER|bob\nREGISTER|correct horse\n")
    bob.expect("REGISTER_OK")
    ana = RawClient(server.port)
    ana.send(b"USER|ana\nDM|bob|for bob\n")
    ana.expect("MSG_OK")
    env = {**isolated_home, "CHATCTL_USER_PASSWORD": "correct horse"}
    result = run_cli("history", "-p", str(server.port), "-u", "bob", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["text"] == "for bob"
    assert [u.name for u in server.users()] == ["bob", "ana"]  # bob stayed online, nobody saw a JOIN
    assert not [line for line in bob.seen if line.startswith(("JOIN|", "LEAVE|", "BYE|"))]
    taken = run_cli("history", "-p", str(server.port), "-u", "ana", env=isolated_home)  # not protected
    assert taken.returncode == chatctl.EXIT_REJECTED
    assert "in use; a script can use a name that is online only if the name is protected" in taken.stderr


def test_an_older_python_gets_one_line(isolated_home):
    import glob
    import shutil

    found = [p for p in (shutil.which("python3.10"), *glob.glob("/root/.pyenv/versions/3.10*/bin/python3.10"))
             if p and subprocess.run([p, "-c", ""], capture_output=True).returncode == 0]
    if not found:
        pytest.skip("no working python3.10 on this machine")
    old = found[0]
    result = subprocess.run([old, str(CHATCTL[1]), "who"], capture_output=True, text=True, env=isolated_home)
    assert result.returncode == 1
    assert result.stderr.strip() == f"chatctl needs Python 3.11 or newer; this is {result.stderr.split()[-1]}"


def test_tables_piped_to_another_program_keep_whole_lines(isolated_home, server, user):
    ana = user("ana")
    long_text = "deploy " + "-".join(f"step{i}" for i in range(40))  # about 300 characters
    ana.send(f"MSG|{long_text}\n".encode())
    ana.expect("MSG_OK")
    for args in (["history", "-p", str(server.port)], ["who", "-p", str(server.port)],
                 ["rooms", "-p", str(server.port)]):
        result = run_cli(*args, env=isolated_home)  # stdout is a pipe, as in `chatctl history | grep x`
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines and not [line for line in lines if line != line.rstrip()], lines[:3]
        if args[0] == "history":
            assert any(long_text in line for line in lines), lines  # one row, not wrapped at 80 columns
