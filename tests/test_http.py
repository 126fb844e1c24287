"""HTTP on the chat port: Slack-compatible webhooks, outgoing hooks, /healthz, /readyz, /metrics.

Spoken to with curl and Python's http.client, as the tools a team already has would; Alertmanager
and Prometheus (Debian's) are started on loopback ports and pointed at the server.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

import chatctl
from conftest import CHATCTL, RawClient, binary, free_port, run_cli, wait_until
from conftest import http_request as request

OPERATOR = "operator-pw-1"


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("curl"), "-sS", "--max-time", "10", *args], capture_output=True, text=True,
                          timeout=20)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            got += chunk
        return got


def room_member(port: int, name: str, room: str = "deploys") -> RawClient:
    client = RawClient(port)
    client.send(b"HELLO|chatctl/1\n")
    client.expect("HELLO|")
    client.send(f"USER|{name}\nJOIN|#{room}\n".encode())
    client.expect("JOIN_OK")
    return client


def add_hook(server, room: str = "deploys", name: str = "ci", url: str | None = None,
             trigger: str = "") -> tuple[int, str]:
    with chatctl.ChatConnection("127.0.0.1", server.port) as conn:
        conn.hello(quiet=True)
        conn.oper(OPERATOR)
        return conn.add_hook(room, name, url, trigger)


@pytest.fixture
def hook_server(make_server):
    def factory(**http) -> chatctl.ChatServer:
        return make_server(operator_password=OPERATOR, http=chatctl.HttpConfig(**http))
    return factory


# --- health, readiness, errors --------------------------------------------------------------------


def test_healthz_and_readyz_answer_json_on_the_chat_port(server):
    result = curl("-i", f"http://127.0.0.1:{server.port}/healthz")
    assert result.stdout.startswith("HTTP/1.1 200 OK")
    body = json.loads(result.stdout.split("\n\n", 1)[1])  # (text mode: the CR LFs are LFs)
    assert body["status"] == "ok" and body["version"] == chatctl.__version__
    status, headers, body = request(server.port, "GET", "/readyz")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ready", "checks": {"listening": True, "commits": True,
                                                              "history": True}}
    status, headers, body = request(server.port, "HEAD", "/healthz")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_unknown_paths_and_methods_get_json_errors_with_stable_codes(server):
    status, _, body = request(server.port, "GET", "/nope")
    assert status == 404 and json.loads(body)["error"] == "not-found"
    status, headers, body = request(server.port, "POST", "/healthz", body=b"{}")
    assert status == 405 and json.loads(body)["error"] == "method-not-allowed"
    assert headers["allow"] == "GET, HEAD"
    assert b"Traceback" not in raw_exchange(server.port, b"GET /\x00\x01 HTTP/1.1\r\nHost: x\r\n\r\n")


def test_readyz_says_503_while_the_bus_is_away(make_server, redis_server):
    server = make_server(bus=redis_server.url)
    status, _, body = request(server.port, "GET", "/readyz")
    assert status == 200 and json.loads(body)["checks"]["bus"] is True
    redis_server.stop()
    wait_until(lambda: request(server.port, "GET", "/readyz")[0] == 503, timeout=15)
    body = json.loads(request(server.port, "GET", "/readyz")[2])
    assert body["status"] == "not-ready" and body["checks"]["bus"] is False
    assert request(server.port, "GET", "/healthz")[0] == 200  # alive all the same


def test_https_through_the_same_tls_detection(make_server, tls_files):
    cert, key = tls_files[0]
    server = make_server(tls=True, tls_cert=str(cert), tls_key=str(key))
    result = curl("-k", f"https://127.0.0.1:{server.port}/healthz")
    assert json.loads(result.stdout)["status"] == "ok"
    assert request(server.port, "GET", "/readyz", tls=True)[0] == 200


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    chatctl.generate_certificate(cert, key)
    return [(cert, key)]


def test_http_port_of_its_own(make_server):
    port = free_port()
    server = make_server(http=chatctl.HttpConfig(enabled=False, port=port))
    assert request(port, "GET", "/healthz")[0] == 200
    # off on the chat port: an HTTP line there is a chat client's unknown command
    reply = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=1.0)
    assert reply.startswith(b"ERR|unknown-command")


# --- metrics ------------------------------------------------------------------------------------


def metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = request(port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_metrics_count_connections_messages_and_commits(server, user):
    ana, bob = user("ana"), user("bob", hello=True)
    before = metrics(server.port)
    assert before["chatctl_connections{protocol=seed}"] == 1
    assert before["chatctl_connections{protocol=chatctl}"] == 1
    assert before["chatctl_accounts_online"] == 2
    ana.send(b"MSG|hello\n")
    assert ana.line() == "MSG_OK"
    bob.send(b"JOIN|#nope nope\n")
    bob.expect("ERR|invalid-room")
    after = metrics(server.port)
    assert after["chatctl_messages_accepted_total{kind=msg}"] == 1
    assert after["chatctl_deliveries_total"] >= 2
    assert after["chatctl_refused_total{reason=invalid-room}"] == 1
    assert after["chatctl_commit_batch_messages_count"] >= 1
    assert after["chatctl_commit_latency_seconds_count"] >= 1
    assert after["chatctl_history_messages"] == 1
    assert "process_resident_memory_bytes" in after


def test_metrics_are_for_the_allowed_addresses_only(make_server):
    server = make_server(http=chatctl.HttpConfig(metrics_allow=("10.0.0.0/8",)))
    status, _, body = request(server.port, "GET", "/metrics")
    assert status == 403 and json.loads(body)["error"] == "forbidden"
    assert request(server.port, "GET", "/healthz")[0] == 200


# --- incoming webhooks --------------------------------------------------------------------------


def test_hook_cli_prints_a_url_that_curl_posts_to(hook_server, isolated_home):
    server = hook_server()
    env = {**isolated_home, "CHATCTL_OPERATOR_PASSWORD": OPERATOR}
    made = run_cli("hook", "add", "-p", str(server.port), "--room", "deploys", "--name", "ci", env=env)
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{server.port}/hooks/chatctl_hook_")
    watcher = room_member(server.port, "ana")
    posted = curl("-H", "Content-Type: application/json", "-d", json.dumps({"text": "build 42 is green\n"
                  "all 504 tests passed", "username": "GitHub Actions"}), url)
    assert posted.stdout == "ok"
    line = watcher.expect("MSG|#deploys|")
    assert line.endswith("|ci|[GitHub Actions] build 42 is green\\nall 504 tests passed")
    listed = run_cli("hook", "list", "-p", str(server.port), "--json", env=env)
    hooks = json.loads(listed.stdout)
    assert hooks[0]["name"] == "ci" and hooks[0]["room"] == "#deploys" and hooks[0]["posts"] == 1
    assert url.rsplit("/", 1)[1] not in listed.stdout  # never the token
    removed = run_cli("hook", "rm", "-p", str(server.port), str(hooks[0]["id"]), env=env)
    assert removed.returncode == 0
    assert curl("-o", "/dev/null", "-w", "%{http_code}", "-d", '{"text": "x"}', url).stdout == "404"
    # the hook's messages are stored and marked as a bot's
    history = run_cli("history", "-p", str(server.port), "--room", "deploys", "--json", env=env)
    assert json.loads(history.stdout.splitlines()[0])["bot"] is True


def test_hook_needs_the_operator_password(hook_server, isolated_home):
    server = hook_server()
    wrong = run_cli("hook", "list", "-p", str(server.port),
                    env={**isolated_home, "CHATCTL_OPERATOR_PASSWORD": "nope-nope"})
    assert wrong.returncode == chatctl.EXIT_REJECTED
    assert wrong.stderr.strip().count("\n") == 0 and "wrong operator password" in wrong.stderr
    none = run_cli("hook", "list", "-p", str(server.port), env=isolated_home)
    assert none.returncode != 0 and "CHATCTL_OPERATOR_PASSWORD" in none.stderr


def test_slack_payloads_become_readable_text(hook_server):
    server = hook_server()
    _, token = add_hook(server)
    watcher = room_member(server.port, "ana")
    path = f"/hooks/{token}"
    payloads = [
        ({"text": "see <https://ci.example/42|build 42> &amp; <!here>"},
         "see build 42 (https://ci.example/42) & @here"),
        ({"attachments": [{"fallback": "fb", "pretext": "Deploy", "title": "prod", "title_link": "https://x",
                           "text": "done", "fields": [{"title": "by", "value": "ana"}]}]},
         "Deploy\\nprod (https://x)\\ndone\\nby: ana"),
        ({"attachments": [{"fallback": "only the fallback"}]}, "only the fallback"),
        ({"text": "notification", "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "Alert"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "*CPU* high"},
             "fields": [{"type": "mrkdwn", "text": "host: db1"}]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "ops"}]}]},
         "Alert\\n*CPU* high\\nhost: db1\\nops"),
        ({"text": "<script>alert(1)</script> \x1b[31mred\x07"},
         "<script>alert(1)</script> \ufffd[31mred\ufffd"),
    ]
    for payload, shown in payloads:
        status, _, body = request(server.port, "POST", path, json.dumps(payload).encode(),
                                  {"Content-Type": "application/json"})
        assert (status, body) == (200, b"ok")
        assert watcher.expect("MSG|#deploys|").endswith(f"|ci|{shown}")
    form = "payload=" + urllib.parse.quote(json.dumps({"text": "from a form"}))
    status, _, _ = request(server.port, "POST", path, form.encode(),
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and watcher.expect("MSG|#deploys|").endswith("|ci|from a form")


def test_bad_payloads_get_400_with_the_reason_and_post_nothing(hook_server):
    server = hook_server()
    _, token = add_hook(server)
    watcher = room_member(server.port, "ana")
    for body, reason in ((b"{not json", "not JSON"), (b"[1, 2]", "not a JSON object"),
                         (b'{"text": ""}', "no text"), (b'{"text": "x", "channel": "#ops"}', "#deploys only"),
                         (b"\xff\xfe", "not UTF-8")):
        status, _, answer = request(server.port, "POST", f"/hooks/{token}", body,
                                    {"Content-Type": "application/json"})
        assert status == 400 and json.loads(answer)["error"] == "invalid-payload"
        assert reason in json.loads(answer)["message"]
    assert watcher.silent(0.3)


def test_a_wrong_token_is_a_plain_404(hook_server):
    server = hook_server()
    _, token = add_hook(server)
    unknown = request(server.port, "POST", "/nowhere", b"{}")
    for guess in (token[:-1] + ("A" if token[-1] != "A" else "B"), "chatctl_hook_", "x" * 5000):
        status, _, body = request(server.port, "POST", f"/hooks/{guess}", b'{"text": "hi"}')
        assert (status, body) == (404, unknown[2])


def test_a_hook_is_rate_limited_with_429(hook_server):
    server = hook_server(hook_rate=0.1, hook_burst=2)
    _, token = add_hook(server)
    codes = [request(server.port, "POST", f"/hooks/{token}", b'{"text": "alert"}')[0] for _ in range(4)]
    assert codes == [200, 200, 429, 429]


def test_a_hook_name_that_is_a_person_is_refused(hook_server):
    server = hook_server()
    ana = RawClient(server.port)
    ana.send(b"USER|ana\n")
    assert ana.line() == "USER_OK"
    with pytest.raises(chatctl.RejectedError, match="online"):
        add_hook(server, name="ana")


# --- the HTTP side's limits ---------------------------------------------------------------------


def test_keep_alive_and_pipelined_requests_are_answered_in_order(hook_server):
    server = hook_server()
    _, token = add_hook(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/healthz")
        assert conn.getresponse().read().startswith(b'{"status":"ok"')
    conn.close()
    post = (f"POST /hooks/{token} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 13\r\n\r\n{\"text\":\"hi\"}").encode()
    last = b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(server.port, post + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + last)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200", b"200", b"404"]
    assert reply.index(b"\r\n\r\nok") < reply.index(b'"status":"ok"')


def test_huge_and_endless_bodies_are_refused_and_closed(hook_server):
    server = hook_server(max_body=4096)
    _, token = add_hook(server)
    reply = raw_exchange(server.port, f"POST /hooks/{token} HTTP/1.1\r\nHost: x\r\n"
                         "Content-Length: 999999999\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in reply
    chunked = f"POST /hooks/{token} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunked += b"1000\r\n" + b"a" * 4096 + b"\r\n" + b"1000\r\n" + b"a" * 4096 + b"\r\n"
    assert raw_exchange(server.port, chunked).startswith(b"HTTP/1.1 413 ")
    assert request(server.port, "GET", "/healthz")[0] == 200


def test_header_floods_and_smuggling_are_refused(hook_server):
    server = hook_server(max_header=2048)
    flood = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 50)
                                                             for i in range(100)) + b"\r\n"
    assert raw_exchange(server.port, flood).startswith(b"HTTP/1.1 431 ")
    both = (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = raw_exchange(server.port, both)
    assert reply.startswith(b"HTTP/1.1 400 ") and reply.count(b"HTTP/1.1") == 1
    # a chat line after a request on the same connection is never a chat client's
    reply = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nUSER|mallory\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and b"USER_OK" not in reply and b"HTTP/1.1 400 " in reply
    assert "mallory" not in [u.name for u in server.users()]


def test_a_slow_request_gets_408_and_a_silent_kept_alive_one_is_closed(hook_server):
    server = hook_server(request_timeout=0.5, keepalive_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        start = time.monotonic()
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408 ") and time.monotonic() - start < 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: sock.recv(4096) == b"", timeout=5)
    wait_until(lambda: not any(s.raw for s in server.registry.sessions()), timeout=5)


# --- outgoing hooks -------------------------------------------------------------------------------


class BotServer:
    """A bot on loopback, as a team would run one: records what it is posted and answers."""

    def __init__(self, answer: dict | None = None, delay: float = 0.0):
        self.posts: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append(json.loads(body))
                time.sleep(delay)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/chat"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_outgoing_hook_answers_its_trigger_in_the_room(hook_server, isolated_home):
    server = hook_server()
    bot = BotServer({"text": "deploying *main* to prod"})
    try:
        env = {**isolated_home, "CHATCTL_OPERATOR_PASSWORD": OPERATOR}
        made = run_cli("hook", "add", "-p", str(server.port), "--room", "deploys", "--name", "deploybot",
                       "--outgoing", bot.url, "--trigger", "!deploy", env=env)
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        ana = room_member(server.port, "ana")
        ana.send(b"MSG|#deploys|not a trigger: !deploy\n")
        ana.expect("MSG_OK")
        ana.send(b"MSG|#deploys|!deploy main\n")
        ana.expect("MSG_OK")
        line = ana.expect("MSG|#deploys|", timeout=10)
        assert line.endswith("|deploybot|deploying *main* to prod")
        assert len(bot.posts) == 1
        post = bot.posts[0]
        assert post["token"] == secret and post["channel_name"] == "deploys"
        assert post["user_name"] == "ana" and post["text"] == "!deploy main"
        assert post["trigger_word"] == "!deploy" and post["post_id"].isdigit() and post["timestamp"] > 0
        ana.silent(0.5)  # the bot's own answer triggers nothing
        assert len(bot.posts) == 1
    finally:
        bot.close()


def test_an_outgoing_hook_that_hangs_never_slows_the_chat(hook_server):
    server = hook_server(outgoing_timeout=1.0, outgoing_retries=1)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        hook_id, _ = add_hook(server, name="hangbot", url=f"http://127.0.0.1:{silent.getsockname()[1]}/",
                              trigger="!hang")
        ana, bob = room_member(server.port, "ana"), room_member(server.port, "bob")
        for i in range(20):
            ana.send(f"MSG|#deploys|!hang {i}\n".encode())
        start = time.monotonic()
        for i in range(20):
            assert bob.expect("MSG|#deploys|").endswith(f"|ana|!hang {i}")
        assert time.monotonic() - start < 2
        wait_until(lambda: server.hooks.figures()[hook_id][2] >= 1, timeout=15)
    finally:
        silent.close()


def test_an_outgoing_hook_may_not_point_at_the_server_itself(hook_server, isolated_home):
    server = hook_server()
    env = {**isolated_home, "CHATCTL_OPERATOR_PASSWORD": OPERATOR}
    for host in ("127.0.0.1", "localhost"):
        made = run_cli("hook", "add", "-p", str(server.port), "--room", "deploys", "--name", "loop",
                       "--outgoing", f"http://{host}:{server.port}/hooks/x", env=env)
        assert made.returncode == chatctl.EXIT_REJECTED and "this chat server" in made.stderr
    bad = run_cli("hook", "add", "-p", str(server.port), "--room", "deploys", "--name", "loop",
                  "--outgoing", "file:///etc/passwd", env=env)
    assert bad.returncode == chatctl.EXIT_REJECTED and "bad-url" in bad.stderr


# --- operating it ------------------------------------------------------------------------------


def test_backup_copies_the_history_and_accounts_while_the_chat_goes_on(hook_server, isolated_home,
                                                                      tmp_path):
    server = hook_server()
    ana = RawClient(server.port)
    ana.send(b"USER|ana\n" + b"".join(f"MSG|line {i}\n".encode() for i in range(50)))
    for _ in range(50):
        ana.expect("MSG_OK")
    env = {**isolated_home, "CHATCTL_OPERATOR_PASSWORD": OPERATOR}
    done = run_cli("backup", "-p", str(server.port), str(tmp_path / "copy"), env=env)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "copy" / "history.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 50
    with sqlite3.connect(tmp_path / "copy" / "accounts.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not list((tmp_path / "copy").glob("*.partial"))


def test_export_writes_json_lines_of_a_room_since_a_date(server, user, isolated_home):
    ana = room_member(server.port, "ana", "ops")
    ana.send(b"MSG|#ops|first\nMSG|#ops|second\nMSG|hello main\n")
    for _ in range(3):
        ana.expect("MSG_OK")
    out = run_cli("export", "-p", str(server.port), "--room", "ops", env=isolated_home)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [m["text"] for m in lines] == ["first", "second"] and lines[0]["room"] == "#ops"
    everything = run_cli("export", "-p", str(server.port), env=isolated_home)
    assert len(everything.stdout.splitlines()) == 3
    future = run_cli("export", "-p", str(server.port), "--since", "2999-01-01", env=isolated_home)
    assert future.stdout == "" and "0 message(s)" in future.stderr
    bad = run_cli("export", "-p", str(server.port), "--since", "yesterday", env=isolated_home)
    assert bad.returncode == chatctl.EXIT_USAGE


def test_sighup_reloads_limits_and_says_what_needs_a_restart(isolated_home, tmp_path):
    port = free_port()
    config = tmp_path / "chatctl.toml"
    config.write_text(f'[server]\nport = {port}\nhost = "127.0.0.1"\nmotd = "old"\n')
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*CHATCTL, "serve", "--config", str(config), "--db", str(tmp_path / "h.db")],
                            env=isolated_home, stderr=log, stdout=log)
    try:
        wait_until(lambda: "listening on" in (tmp_path / "serve.log").read_text(), timeout=15)
        assert request(port, "GET", "/metrics")[0] == 200
        held = RawClient(port)
        held.send(b"USER|ana\n")
        assert held.line() == "USER_OK"
        config.write_text(f'[server]\nport = {port + 1}\nhost = "127.0.0.1"\nmotd = "new"\n'
                          '[http]\nmetrics_allow = ["10.0.0.0/8"]\n')
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "only a restart changes port" in (tmp_path / "serve.log").read_text(), timeout=10)
        assert request(port, "GET", "/metrics")[0] == 403
        held.send(b"MSG|still here\n")
        assert held.line() == "MSG_OK"  # nobody was dropped
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
        log.close()


# --- real programs that speak Slack and scrape metrics ------------------------------------------


def wait_http(url: str, timeout: float = 30.0) -> None:
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return False
    wait_until(answers, timeout=timeout, interval=0.2)


def test_alertmanager_alerts_land_in_the_room(hook_server, tmp_path):
    alertmanager = binary("prometheus-alertmanager")
    server = hook_server()
    _, token = add_hook(server, name="alertmanager")
    watcher = room_member(server.port, "ana")
    port = free_port()
    (tmp_path / "am.yml").write_text(f"""
route:
  receiver: chat
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
- name: chat
  slack_configs:
  - api_url: http://127.0.0.1:{server.port}/hooks/{token}
    channel: '#deploys'
    send_resolved: true
""")
    proc = subprocess.Popen([alertmanager, f"--config.file={tmp_path / 'am.yml'}",
                             f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")
        alert = [{"labels": {"alertname": "DiskFull", "severity": "page", "instance": "db1"},
                  "annotations": {"summary": "disk full on db1"}}]
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v2/alerts", data=json.dumps(alert).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=5).close()
        line = watcher.expect("MSG|#deploys|", timeout=30)
        assert "|alertmanager|[FIRING:1]" in line and "DiskFull db1 page" in line
    finally:
        proc.terminate()
        proc.wait(10)


def test_prometheus_scrapes_the_server(server, tmp_path):
    prometheus = binary("prometheus")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
- job_name: chatctl
  static_configs:
  - targets: ['127.0.0.1:{server.port}']
""")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")

        def target_up() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as r:
                targets = json.load(r)["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        wait_until(target_up, timeout=30, interval=0.5)

        def series() -> list:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=chatctl_info",
                                        timeout=2) as r:
                return json.load(r)["data"]["result"]

        wait_until(lambda: bool(series()), timeout=30, interval=0.5)
        assert series()[0]["metric"]["version"] == chatctl.__version__
    finally:
        proc.terminate()
        proc.wait(10)



def test_a_reload_gives_every_hook_its_new_rate_limit(hook_server):
    server = hook_server(hook_rate=0.01, hook_burst=1)
    _, token = add_hook(server)
    post = lambda: request(server.port, "POST", f"/hooks/{token}", b'{"text": "alert"}')[0]  # noqa: E731
    assert [post(), post()] == [200, 429]
    config = chatctl.ServerConfig(**{**vars(server.config), "http": chatctl.HttpConfig(hook_rate=0.01,
                                                                                      hook_burst=3)})
    server.reload(config)
    assert [post(), post(), post(), post()] == [200, 200, 200, 429]


def test_a_removed_hooks_number_is_never_reused(hook_server):
    server = hook_server()
    first, _ = add_hook(server, name="one")
    second, _ = add_hook(server, name="two")
    with chatctl.ChatConnection("127.0.0.1", server.port) as conn:
        conn.hello(quiet=True)
        conn.oper(OPERATOR)
        conn.remove_hook(second)
    third, _ = add_hook(server, name="three")
    assert first < second < third


def test_a_form_without_payload_or_text_says_so(hook_server):
    server = hook_server()
    _, token = add_hook(server)
    for body in (b"notjson", b"[1, 2]"):
        status, _, answer = request(server.port, "POST", f"/hooks/{token}", body,
                                    {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 400
        assert json.loads(answer)["message"] in ("the body is not JSON (nor a form with payload=)",
                                                 "the payload is not a JSON object")
    status, _, _ = request(server.port, "POST", f"/hooks/{token}", b"text=plain+fields",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200


# --- what the attack run found ------------------------------------------------------------------------


class TricklingServer:
    """A hook's server that reads the POST, then answers one byte a second (headers included)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.closed = False
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._trickle, args=(sock,), daemon=True).start()

    def _trickle(self, sock: socket.socket) -> None:
        with sock:
            sock.recv(65536)
            for byte in b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"text": "too late"}':
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(1)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_a_trickling_hook_is_cut_off_in_time_and_holds_no_other_hook(hook_server):
    server = hook_server(outgoing_timeout=1.0, outgoing_retries=0)
    slow, bot = TricklingServer(), BotServer({"text": "on it"})
    try:
        slow_id, _ = add_hook(server, name="slowbot", url=slow.url, trigger="!slow")
        add_hook(server, name="goodbot", url=bot.url, trigger="!good")
        ana = room_member(server.port, "ana")
        for _ in range(6):  # more than the workers: each would hold one, if a hook could take several
            ana.send(b"MSG|#deploys|!slow now\n")
        ana.send(b"MSG|#deploys|!good now\n")
        start = time.monotonic()
        assert ana.expect("MSG|#deploys|", timeout=5).endswith("|goodbot|on it")
        assert time.monotonic() - start < 3
        wait_until(lambda: server.hooks.figures()[slow_id][2] >= 1, timeout=4)  # one try: cut at 1 s
    finally:
        slow.close()
        bot.close()


def test_an_outgoing_hook_url_that_is_the_server_in_disguise_is_refused(hook_server):
    server = hook_server()
    for host in ("[::ffff:127.0.0.1]", "%31%32%37.0.0.1", "127.0.0.1%00", "0.0.0.0"):
        with pytest.raises(chatctl.RejectedError, match=r"bad-url|this chat server"):
            add_hook(server, name="loop", url=f"http://{host}:{server.port}/hooks/x", trigger="!x")


def test_backups_are_private_and_need_the_password_before_a_folder_is_made(hook_server, isolated_home,
                                                                          tmp_path):
    server = hook_server()
    wrong = run_cli("backup", "-p", str(server.port), str(tmp_path / "nope"),
                    env={**isolated_home, "CHATCTL_OPERATOR_PASSWORD": "wrong-wrong"})
    assert wrong.returncode == chatctl.EXIT_REJECTED and not (tmp_path / "nope").exists()
    done = run_cli("backup", "-p", str(server.port), str(tmp_path / "copy"),
                   env={**isolated_home, "CHATCTL_OPERATOR_PASSWORD": OPERATOR})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o700
    for name in ("history.db", "accounts.db"):
        assert (tmp_path / "copy" / name).stat().st_mode & 0o777 == 0o600


def test_an_http_line_after_a_chat_line_is_an_unknown_command_not_an_internal_error(server, caplog):
    client = RawClient(server.port)
    client.send(b"PING\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.line() == "PONG"
    assert client.line().startswith("ERR|unknown-command")
    client.send(b"USER|ana\n")
    assert client.expect("USER_OK")
    assert "internal error" not in caplog.text


def test_a_hook_url_says_the_same_to_every_method_whether_its_token_is_right_or_not(hook_server):
    server = hook_server()
    _, token = add_hook(server)
    for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS"):
        right = request(server.port, method, f"/hooks/{token}")
        wrong = request(server.port, method, "/hooks/chatctl_hook_nope")
        assert right[0] == wrong[0] == 405 and right[2] == wrong[2]


def test_a_body_in_a_thousand_tiny_chunks_and_huge_trailers_are_refused(hook_server):
    server = hook_server(max_header=2048)
    _, token = add_hook(server)
    head = f"POST /hooks/{token} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    reply = raw_exchange(server.port, head + b"1\r\na\r\n" * 5000 + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"more than 1024 chunks" in reply
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"y" * 50) for i in range(100))
    reply = raw_exchange(server.port, head + b'd\r\n{"text":"hi"}\r\n0\r\n' + trailers + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_hook_list_hides_the_secrets_in_an_outgoing_url(hook_server, isolated_home):
    server = hook_server()
    for i, url in enumerate(("http://admin:S3cretPW@127.0.0.1:9/x?apikey=TOPSECRET",
                             "http://SECRETUSER@127.0.0.1:9/x;SECRETPARAM?SECRETQ#SECRETFRAG")):
        add_hook(server, name=f"keyed{i}", url=url, trigger="!k")
    listed = run_cli("hook", "list", "-p", str(server.port), "--json",
                     env={**isolated_home, "CHATCTL_OPERATOR_PASSWORD": OPERATOR})
    assert "SECRET" not in listed.stdout.upper().replace("SECRETS", "") and "S3cretPW" not in listed.stdout
    assert [h["url"] for h in json.loads(listed.stdout)] == ["http://***@127.0.0.1:9/x?***",
                                                             "http://***@127.0.0.1:9/x;***?***#***"]


# --- what the second attack run found -------------------------------------------------------------


def test_a_lone_surrogate_is_shown_as_a_replacement_and_storage_goes_on(hook_server):
    server = hook_server()
    bot = BotServer({"text": "only \ud800 text", "username": "\udfff"})
    try:
        add_hook(server, name="tbot", url=bot.url, trigger="!t")
        _, token = add_hook(server)
        ana = room_member(server.port, "ana")
        ana.send(b"MSG|#deploys|!t a\n")
        ana.expect("MSG_OK")
        assert ana.expect("MSG|#deploys|", timeout=10).endswith("|tbot|[\ufffd] only \ufffd text")
        status, _, body = request(server.port, "POST", f"/hooks/{token}",
                                  b'{"text": "hi \\udfff", "username": "\\ud800"}')
        assert (status, body) == (200, b"ok")
        assert ana.expect("MSG|#deploys|").endswith("|ci|[\ufffd] hi \ufffd")
        ana.send(b"MSG|#deploys|still stored\n")
        assert ana.expect("MSG_OK|")
        assert json.loads(request(server.port, "GET", "/readyz")[2])["status"] == "ready"
    finally:
        bot.close()


def test_slow_and_dead_hooks_never_hold_up_a_working_one(hook_server):
    server = hook_server(outgoing_timeout=1.0, outgoing_retries=3)
    slow, bot = TricklingServer(), BotServer({"text": "on it"})
    dead = socket.create_server(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/"
    dead.close()  # refused: tried again after 1, 2 and 4 s
    try:
        for i in range(5):
            add_hook(server, name=f"slow{i}", url=slow.url, trigger="!go")
            add_hook(server, name=f"dead{i}", url=dead_url, trigger="!go")
        add_hook(server, name="goodbot", url=bot.url, trigger="!good")
        ana = room_member(server.port, "ana")
        ana.send(b"MSG|#deploys|!go\n")
        ana.expect("MSG_OK")
        wait_until(lambda: slow.accepted >= 4, timeout=5)  # every worker busy with a slow hook, or more
        ana.send(b"MSG|#deploys|!good now\n")
        start = time.monotonic()
        assert ana.expect("MSG|#deploys|", timeout=10).endswith("|goodbot|on it")
        assert time.monotonic() - start < 2.5
    finally:
        slow.close()
        bot.close()


def test_a_body_nobody_would_read_is_refused_at_once(hook_server):
    server = hook_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = time.monotonic()
        assert sock.recv(4096).startswith(b"HTTP/1.1 405 ") and time.monotonic() - start < 1


def test_the_absolute_form_of_a_request_is_understood(server):
    reply = raw_exchange(server.port, b"GET http://chat.lan:7001/healthz HTTP/1.1\r\nHost: chat.lan\r\n"
                         b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in reply


def test_a_refused_connection_to_the_http_port_gets_an_http_answer(make_server):
    port = free_port()
    make_server(max_per_address=2, http=chatctl.HttpConfig(port=port))
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        reply = raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ") and b'"error":"too-many-connections"' in reply
    finally:
        for sock in held:
            sock.close()
