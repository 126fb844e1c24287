"""The codec on its own: bytes in, dataclasses out, no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chatctl
from chatctl import (
    ChatMessage,
    FrameDecoder,
    ProtocolError,
    decode_request,
    encode_message,
    escape_text,
    parse_event,
    sanitise_text,
    unescape_text,
    validate_name,
)

# --- escaping ----------------------------------------------------------------------


@given(st.text())
def test_escape_round_trips_any_text(text):
    escaped = escape_text(text)
    assert "\n" not in escaped
    assert unescape_text(escaped) == text


@pytest.mark.parametrize(("wire", "text"), [
    (r"two\nlines", "two\nlines"),
    (r"a\\nb", "a\\nb"),           # an escaped backslash, then a plain n
    (r"C:\temp", "C:\\temp"),       # an unknown escape stays literal
    ("trailing\\", "trailing\\"),
    ("pipes | stay", "pipes | stay"),
])
def test_unescape_cases(wire, text):
    assert unescape_text(wire) == text


def test_sanitise_neutralises_controls_and_bidi_but_keeps_newlines():
    assert sanitise_text("a\x1b[2Jb") == "a\ufffd[2Jb"
    assert sanitise_text("bell\x07") == "bell\ufffd"
    assert sanitise_text("c1\x9bx") == "c1\ufffdx"
    assert sanitise_text("tab\there") == "tab here"
    assert sanitise_text("crlf\r\nnext") == "crlf\nnext"
    assert sanitise_text("abc\u202edcba") == "abcdcba"
    assert sanitise_text("plain text") == "plain text"


@given(st.text())
def test_sanitised_text_has_no_controls_but_newline(text):
    for ch in sanitise_text(text):
        assert ch == "\n" or (ord(ch) >= 0x20 and not 0x7F <= ord(ch) < 0xA0)
        assert ch not in chatctl._BIDI_CONTROLS


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ana", "Bob_2", "zoë", "deploy-bot", "a.b", "名前"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "two words", "a|b", "a,b", "a:b", "x\x1b", "evil\u202e",
                                  "zero\u200bwidth", "[bold]x", "n" * 33])
def test_invalid_names(name):
    with pytest.raises(ProtocolError) as info:
        validate_name(name)
    assert info.value.code == "invalid-name"


# --- requests ------------------------------------------------------------------------


def test_decode_request_keeps_pipes_in_the_argument():
    assert decode_request(b"MSG|a|b|c") == chatctl.Request("MSG", "a|b|c")
    assert decode_request(b"dir") == chatctl.Request("DIR", None)
    assert decode_request(b"MSG|") == chatctl.Request("MSG", "")


def test_decode_request_refuses_invalid_utf8():
    with pytest.raises(ProtocolError) as info:
        decode_request(b"MSG|\xff\xfe")
    assert info.value.code == "bad-encoding"


# --- framing -------------------------------------------------------------------------


def test_frames_split_on_newline_and_crlf():
    d = FrameDecoder()
    assert d.feed(b"USER|ana\r\nMSG|hi\nDIR") == [b"USER|ana", b"MSG|hi"]
    assert d.mode == FrameDecoder.FRAMED
    assert d.feed(b"\n") == [b"DIR"]
    assert d.end_of_write() == []  # a framed connection never ends frames on a pause


def test_unframed_frames_end_at_a_pause():
    d = FrameDecoder()
    assert d.feed(b"USER|ana") == []
    assert d.waiting_for_pause
    assert d.end_of_write() == [b"USER|ana"]
    assert d.mode == FrameDecoder.UNFRAMED
    assert d.feed(b"MSG|hello") == []
    assert d.end_of_write() == [b"MSG|hello"]


def test_over_long_frame_is_reported_once_and_the_next_frame_survives():
    d = FrameDecoder(max_frame=64)
    out = d.feed(b"MSG|" + b"x" * 100)
    assert len(out) == 1 and out[0].code == "frame-too-long"
    assert d.feed(b"y" * 10_000) == []          # still the same frame: no second error
    assert d.feed(b"zzz\nMSG|ok\n") == [b"MSG|ok"]


def test_exactly_max_frame_is_accepted_with_crlf():
    d = FrameDecoder(max_frame=64)
    frame = b"M" * 64
    assert d.feed(frame[:30]) == []
    assert d.feed(frame[30:] + b"\r") == []
    assert d.feed(b"\n") == [frame]
    assert d.feed(b"N" * 65 + b"\n")[0].code == "frame-too-long"


@given(st.lists(st.binary(max_size=200).filter(lambda b: b"\n" not in b), max_size=20),
       st.lists(st.integers(min_value=0, max_value=5000), max_size=10))
def test_any_split_of_a_stream_gives_the_same_frames(frames, cuts):
    stream = b"".join(f + b"\n" for f in frames)
    expected = [f.removesuffix(b"\r") for f in frames if f.removesuffix(b"\r")]
    positions = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    d = FrameDecoder(max_frame=256)
    got = []
    for a, b in itertools.pairwise(positions):
        got.extend(d.feed(stream[a:b]))
    assert got == expected


@given(st.lists(st.binary(max_size=3000), max_size=30))
def test_decoder_never_holds_more_than_the_limit_and_only_raises_protocol_errors(chunks):
    d = FrameDecoder(max_frame=512)
    for chunk in chunks:
        for item in d.feed(chunk) + (d.end_of_write() if len(chunk) % 3 == 0 else []):
            if isinstance(item, ProtocolError):
                assert item.code == "frame-too-long"
            else:
                assert len(item) <= 512
                try:
                    decode_request(item)
                except ProtocolError as exc:
                    assert exc.code == "bad-encoding"
        assert len(d._partial) <= 513


# --- server lines ----------------------------------------------------------------------


@given(st.text(), st.sampled_from(["msg", "me", "dm"]))
def test_message_lines_round_trip(text, kind):
    msg = ChatMessage(42, 1_764_000_000.0, "ana", text, kind, "bob" if kind == "dm" else None)
    line = encode_message(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_event(line[:-1].decode()) == chatctl.Delivered(msg)


def test_message_line_is_readable_at_netcat():
    msg = ChatMessage(7, 1_764_000_000.0, "ana", "hi | there\nsecond line")
    assert encode_message(msg) == b"MSG|#main|7|2025-11-24T16:00:00Z|ana|hi | there\\nsecond line\n"


def test_seed_user_list_is_byte_exact():
    users = [chatctl.UserInfo("alice", 0, 0), chatctl.UserInfo("bob", 0, 0)]
    assert chatctl.encode_users(users, structured=False) == b"Users logged in: alice, bob\n"
    assert chatctl.encode_users([], structured=False) == b"Users logged in: \n"


def test_structured_user_list_round_trips():
    users = (chatctl.UserInfo("alice", 1_764_000_000.0, 3), chatctl.UserInfo("bob", 1_764_000_100.0, 0))
    line = chatctl.encode_users(users, structured=True)
    assert parse_event(line.decode().rstrip("\n")) == chatctl.UserList(users)
    seed = chatctl.encode_users(users, structured=False).decode().rstrip("\n")
    assert [u.name for u in parse_event(seed).users] == ["alice", "bob"]


@pytest.mark.parametrize(("line", "event"), [
    ("USER_OK", chatctl.Registered()),
    ("MSG_OK", chatctl.Acknowledged()),
    ("MSG_OK|5|2025-11-24T16:00:00Z", chatctl.Acknowledged(5, 1_764_000_000.0)),
    ("ERR|name-taken|the name 'ana' is in use", chatctl.ErrorReply("name-taken", "the name 'ana' is in use")),
    ("JOIN|2025-11-24T16:00:00Z|ana", chatctl.Joined(1_764_000_000.0, "ana")),
    ("LEAVE|2025-11-24T16:00:00Z|ana|quit: bye", chatctl.Left(1_764_000_000.0, "ana", "quit: bye")),
    ("BYE|server shutting down", chatctl.Goodbye("server shutting down")),
    ("PONG|x", chatctl.Pong("x")),
    ("HELLO|chatctl/1|chatctl 0.1.0", chatctl.Welcome("chatctl/1", "chatctl 0.1.0")),
    ("MSG|notanumber|x|y|z", chatctl.UnknownLine("MSG|notanumber|x|y|z")),
    ("ana: hello", chatctl.UnknownLine("ana: hello")),
])
def test_parse_event(line, event):
    assert parse_event(line) == event


def test_every_event_our_server_makes_reads_back_as_the_same_event():
    """The server's events in chatctl/1 (the encoder) and our clients' parser agree, event by event."""
    ts = 1_796_000_000.0
    users = (chatctl.UserInfo("ana", ts, 3), chatctl.UserInfo("bob", ts, 0))
    msg = chatctl.ChatMessage(42, ts, "ana", "two\nlines | with a pipe", "msg", None, "deploys")
    events = [
        chatctl.Delivered(msg),
        chatctl.Delivered(chatctl.ChatMessage(43, ts, "ana", "psst", "dm", "bob")),
        chatctl.Acknowledged(42, ts), chatctl.Acknowledged(), chatctl.Registered(),
        chatctl.Welcome("chatctl/1", "chatctl 0.1.0"), chatctl.UserList(users),
        chatctl.Joined(ts, "ana"), chatctl.Left(ts, "ana", "quit: lunch"),
        chatctl.ErrorReply("name-taken", "the name 'ana' is in use"), chatctl.Pong("x"),
        chatctl.Goodbye("idle timeout"), chatctl.EndOfList("HISTORY", 2, True),
        chatctl.Confirmed("JOIN", "#deploys"), chatctl.Confirmed("PASS"),
        chatctl.RoomInfo("deploys", True, 2, 41, 3, 1, ts, "builds | releases"),
        chatctl.ServerStatus("a", "host:7001", 3, 0.5, 0, True),
        chatctl.TokenInfo("github-actions", ts, ts + 60), chatctl.TokenInfo("spare", ts, 0.0),
        chatctl.Confirmed("TOKEN", "gha|chatctl_abc"), chatctl.Confirmed("BOT", "ci"),
        chatctl.BotNames(("ci", "deploybot")), chatctl.BotNames(()),
        chatctl.RoomNames("deploys", users), chatctl.Topic("deploys", ts, "ana", "builds"),
        chatctl.Entered("deploys", ts, "bob"), chatctl.Exited("deploys", ts, "bob", "lunch"),
    ]
    encoding = chatctl.CHATCTL_LINES
    for event in events:
        line = encoding.event(event)
        assert line.endswith(b"\n") and line.count(b"\n") == 1, line
        assert chatctl.parse_event(line[:-1].decode()) == event, line
    page = chatctl.HistoryPage("HISTORY", (msg,), more=True)
    lines = encoding.event(page).decode().splitlines()
    assert [chatctl.parse_event(line) for line in lines] == [chatctl.Delivered(msg),
                                                             chatctl.EndOfList("HISTORY", 1, True)]
