#!/usr/bin/env python3
"""chat.py -- a terminal chat room in one file, standard library only.

    python3 chat.py server [--host H] [--port P] [limits...]   run a room
    python3 chat.py client [--name NICK] [--host H] [--port P] join it
    nc 127.0.0.1 9999                                          or join with netcat
    python3 chat.py bench [--clients N] [--senders S] ...      measure a server

The wire protocol, in short (docs/protocol.md has all of it): UTF-8 lines ending in
LF. The first line a connection sends is its nickname. After that a line is
a message to everyone, or a command: /me, /msg, /nick, /who, /help, /ping,
/quit. The server sends `<NICK> ` messages, `* NICK ` actions, `*NICK* `
private messages, `-> *NICK* ` echoes of your own, `*** ` notices and `!!! `
errors. Every broadcast reaches everyone in one and the same order. A
connection can be in several rooms (/open, /part); lines of a room that is
not its current one come marked with the room's name.

A room can speak TLS (--tls-cert/--tls-key), need a password (/pass before the
nickname) and have operators (/op, then /kick, /ban, /mute and the rest).

The file, top to bottom:
    Settings       every default and limit, with its unit; LIMITS and Limits
    Protocol       framing, telnet, cleaning text, nick and room rules,
                   FORMATS (every line the server sends, as a Line that also
                   knows its JSON form), ERRORS (every error, by name, with its
                   code), COMMAND_TABLE (every command), the codecs (text,
                   JSON: a Line to bytes, a client's line to a command),
                   parse_server_line and line_from_json (text and JSON back
                   to a Line, for the client)
    Plumbing       logging, selector bookkeeping, socket and TLS helpers
    Chat           Connection (with its phase, rooms and codec), Room,
                   SQLiteStore, LocalNetwork, Chat (with its parts
                   RoomCommands, AccountCommands, OperatorCommands): what a
                   line means; it reaches the loop only through the interface
                   ChatServer's docstring lists, and the other servers only
                   through its network
    Server loop    FanOut and Pass (each room's broadcasts, in one order,
                   rendered once per codec), Worker (a thread per lane of what
                   must not hold the loop), Listener, ChatServer (with its
                   parts Acceptor, Reading, NetworkFeed: accept, TLS, read,
                   write, slow readers, timers, the feed, shutdown)
    The web        --web: WebReader (HTTP, then WebSocket frames), the page
                   (WEB_PAGE), WebCodec; WebServing answers and upgrades
    IRC            --irc: IrcReader (IRC lines to the chat's commands), IrcCodec
    Several servers  RedisLink, RedisNetwork, RedisHistory: --redis, one
                   chat of several servers through one Redis stream
    Client         ClientSession (its decisions; parts ClientJson,
                   ClientReconnect, ClientRegistration) and ChatClient
                   (sockets, the keyboard thread, the terminal)
    Bench          `chat.py bench`, a load generator that reuses Protocol
    Command line   build_parser(), the run_* functions, main()
"""

import argparse
import calendar
import collections
import errno
import getpass
import hashlib
import heapq
import hmac
import itertools
import http
import json
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import unicodedata
import zlib

if sys.version_info < (3, 8):  # before anything newer is used: one line, not a traceback
    sys.exit("chat.py needs Python 3.8 or newer; this is Python %s" % sys.version.split()[0])

try:
    import resource  # Unix only: used to raise the open-files limit.
except ImportError:  # Windows
    resource = None
try:
    import fcntl     # Unix only: a server's lock on its database file.
except ImportError:  # Windows: two servers on one file are not refused there
    fcntl = None
try:
    import termios   # Unix only: the client restores the terminal's modes.
except ImportError:  # Windows
    termios = None
try:
    import ctypes    # to read readline's cursor position, which its module hides
except ImportError:  # a Python built without it: the cursor is taken to be at the end
    ctypes = None


# --- Settings -----------------------------------------------------------------
# Every default and limit, with its unit. The server's flags start from these.

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999

MAX_LINE_BYTES = 4096         # longest accepted line, line end not counted
RATE_LINES_PER_S = 10.0       # flood control: token refill rate (0 = off)
BURST_LINES = 20              # flood control: bucket size
BYTES_PER_EXTRA_TOKEN = 512   # a line costs one more token per full 512 bytes
MAX_SENDQ_BYTES = 262144      # unsent output at which a client counts as behind
MAX_BACKLOG_BYTES = 4194304   # one reader's backlog past which input waits (if it still reads)
MAX_OUTPUT_BYTES = 67108864   # everyone's backlog together past which input waits
MAX_LAG_S = 5.0               # the longest a reader may stay behind before it is evicted
MAX_CLIENTS = 10000           # connections, registered or not
MAX_PER_IP = 16               # connections from one address (0 = no limit)
REGISTER_TIMEOUT_S = 60.0     # from connect to an accepted nickname
MAX_JOINED_ROOMS = 20         # rooms one connection is in at once (/open)
MAX_NICK_CHARS = 24
DB_FILE = "chat.db"           # the store: a SQLite file in the working directory
KEEP_MESSAGES = 100000        # messages kept per room (0: all)
REPLAY_MESSAGES = 20          # messages replayed on joining a room (0: none)
HISTORY_DEFAULT = 20          # /history without N
ID_BLOCK = 10000              # message ids the file reserves ahead (see _reserve_ids)
HISTORY_MAX = 500             # /history N at most
SEARCH_RESULTS = 20           # /search answers with at most this many
TRIM_EVERY = 1000             # a room is trimmed to --keep after this many new messages
INDEX_BATCH = 500             # messages the search index takes per transaction (~8 ms)
INDEX_DELAY_S = 1.0           # new messages wait this long for the index: not in a burst
BUSY_TIMEOUT_S = 5.0          # a write waits this long for the other thread's
GUESS_ADDRESSES = 10000       # addresses whose guesses are remembered before old ones go
GUESS_INTERVAL_S = 1.0        # an address's guesses at any secret are checked this far apart...
WRONG_GUESSES_PER_MINUTE = 10 # ...and past this many wrong ones in a minute, refused unchecked
WRONG_PASSWORD_DELAY_S = 1.0  # a wrong password: answered (or closed) after this, to slow guessing
MIN_PASSWORD_CHARS = 8        # an account's password, at least
MAX_LOGIN_ATTEMPTS = 3        # wrong account passwords on one connection before it is closed
MAILBOX_MESSAGES = 100        # offline messages waiting for one account, at most
# Account passwords: salted scrypt (about 50 ms, 16 MiB), or PBKDF2 where
# hashlib has no scrypt (an OpenSSL without it); the stored hash says which.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
PBKDF2_ITERATIONS = 600000
SALT_BYTES = 16
MAX_OP_ATTEMPTS = 3           # wrong /op passwords before the connection is closed

# Loopback is exempt from the per-address limit: local tests, bots and
# tunnels all arrive from it.
EXEMPT_ADDRESSES = frozenset({"127.0.0.1", "::1"})

RECV_BYTES = 65536            # large reads: fewer system calls under load
PASS_BROADCAST_BYTES = 65536  # broadcast per loop pass before reads wait a pass
# Slow readers (docs/protocol.md, "Slow readers"). A member more than
# --max-sendq behind holds nobody: its lines wait in its backlog. Input waits
# (TCP slows the senders) only while a member that still reads is past
# --max-backlog, or all backlogs together are past --max-output. One behind
# that took nothing for STALL_S (by the kernel's count too) has stopped
# reading and is evicted; one still behind after --max-lag seconds reads too
# slowly to catch up and is evicted too.
STALL_S = 1.0
HELD_RECHECK_S = 0.05         # while someone is behind, judge at least this often
# The kernel's send buffer per client (Linux doubles it). Left alone, Linux
# grows it to 4 MB on loopback, where a client that stopped reading would
# hide megabytes before --max-sendq saw any; fixed, a stalled client is found
# after about a megabyte, while one that reads keeps room to lag a little.
SEND_BUFFER_BYTES = 262144
ACCEPTS_PER_PASS = 128        # accept in batches, but let others run too
LISTEN_BACKLOG = 1024
ORDINARY_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
LINGER_S = 2.0                # after our last byte, wait this long for the peer
SHUTDOWN_FLUSH_S = 2.0        # on SIGINT/SIGTERM, flush for at most this long
ACCEPT_PAUSE_S = 0.1          # out of file descriptors and no spare: wait

# TCP keepalive finds peers that vanished without a word: first probe after
# 5 minutes of silence, then 4 probes 30 s apart, so dropped within 7 minutes.
KEEPALIVE_IDLE_S = 300
KEEPALIVE_INTERVAL_S = 30
KEEPALIVE_PROBES = 4

TLS_MIN_VERSION = ssl.TLSVersion.TLSv1_2
TLS_RECORD_BYTES = 16384      # one TLS record: what one TLS send() carries
TLS_RECORDS_PER_FLUSH = 16    # a TLS flush writes at most this many records

class Limit(collections.namedtuple("Limit", "name kind default unit zero_ok help")):
    """One server limit: the field of Limits, the flag (--max-line for
    max_line), its type, default, unit, whether 0 is allowed, and its help."""


# Every limit of the server, declared once: Limits and the flags are built
# from this table.
LIMITS = (
    Limit("max_line", int, MAX_LINE_BYTES, "BYTES", False, "longest line accepted"),
    Limit("rate", float, RATE_LINES_PER_S, "LINES_PER_S", True,
          "lines per second per client; 0 = no flood control"),
    Limit("burst", int, BURST_LINES, "LINES", False, "lines a client may send at once"),
    Limit("max_sendq", int, MAX_SENDQ_BYTES, "BYTES", False,
          "unsent bytes at which a client is behind (it is evicted if it then takes "
          "nothing for a second). It also bounds a client's own replies, and a quarter of "
          "it (at most 64 KiB) is the broadcast one loop pass takes"),
    Limit("max_backlog", int, None, "BYTES", False,
          "the most held for one client before anyone waits: input pauses while a client "
          "that still reads is past it (default %d, or --max-sendq when that is larger)"
          % MAX_BACKLOG_BYTES),
    Limit("max_output", int, MAX_OUTPUT_BYTES, "BYTES", False,
          "every client's backlog together: input pauses while it is past this"),
    Limit("max_lag", float, MAX_LAG_S, "SECONDS", False,
          "the longest a reader may stay behind, reading, before it is evicted as too slow"),
    Limit("max_clients", int, MAX_CLIENTS, "N", False, "connections, registered or not"),
    Limit("max_per_ip", int, MAX_PER_IP, "N", True,
          "connections from one address, loopback exempt; 0 = no limit"),
    Limit("register_timeout", float, REGISTER_TIMEOUT_S, "SECONDS", False,
          "time to choose a nickname"),
    Limit("max_joined", int, MAX_JOINED_ROOMS, "N", False,
          "rooms one connection may be in at once (/open)"),
)


class Limits:
    """The server's limits (one attribute per row of LIMITS) and what follows
    from them."""

    def __init__(self, **values):
        for limit in LIMITS:
            setattr(self, limit.name, values.pop(limit.name, limit.default))
        if values:
            raise TypeError("unknown limits: %s" % ", ".join(sorted(values)))
        if self.max_backlog is None:
            self.max_backlog = max(MAX_BACKLOG_BYTES, self.max_sendq)
        elif self.max_backlog < self.max_sendq:
            raise ValueError("--max-backlog (%d) can't be below --max-sendq (%d)"
                             % (self.max_backlog, self.max_sendq))
        # Derived: a pass stops reading once this much broadcast is queued,
        # so no one is sent more in one pass than a client that reads can
        # take. (max_sendq itself is where a member counts as behind.)
        self.pass_budget = min(PASS_BROADCAST_BYTES, self.max_sendq // 4)


# The worker lanes: what must not hold the loop, in three threads, so that
# costly work of one kind never queues the others behind it: a flood of
# /search (a scan of a long history) delays no /history and no login, and a
# hundred logins (scrypt) delay no /history. Each connection has at most one
# job in flight (its input waits for the answer), so within a lane the
# connections take turns.
LANE_READS = "reads"       # /history, and reconnecting to Redis
LANE_SECRETS = "secrets"   # password hashes: /login, /register, /password...
LANE_SEARCH = "search"     # /search, and keeping its index


# Secrets come from a file or the environment, never from the command line,
# which other local users can read in `ps`.
PASSWORD_ENV = "CHAT_PASSWORD"
OP_PASSWORD_ENV = "CHAT_OP_PASSWORD"
ACCOUNT_PASSWORD_ENV = "CHAT_ACCOUNT_PASSWORD"
REDIS_PASSWORD_ENV = "CHAT_REDIS_PASSWORD"

# The web (--web PORT): HTTP and WebSocket in the same loop.
HTTP_HEAD_MAX = 8192          # bytes of a request's head (line and headers) at most: else 431
WS_PING_S = 30.0              # a WebSocket silent this long is pinged
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's, for Sec-WebSocket-Accept

CLIENT_CONNECT_TIMEOUT_S = 10.0
CLIENT_QUIT_WAIT_S = 10.0     # after /quit, wait this long for the server to close
CLIENT_GREETING_WAIT_S = 3.0  # a server silent this long is said to be so
CLIENT_FORMAT_WAIT_S = 2.0    # /format json unanswered this long: the server speaks text
CLIENT_ANSWER_WAIT_S = 10.0   # piped: a nickname unanswered this long ends the client
CLIENT_MAX_OUTBUF = 65536     # stop taking typed lines while this much is unsent
RECONNECT_FIRST_S = 1.0       # --reconnect: the first pause, doubled each time...
RECONNECT_MAX_S = 30.0        # ...up to this
CATCH_UP_TRIES = 3            # --reconnect: a refused "what did I miss" is asked this often...
CATCH_UP_RETRY_S = 1.0        # ...this long apart, then the user is told it can't be shown
RECONNECT_JITTER = 0.2        # each pause varies by this much either way, so that
                              # the clients of a restarted server don't all return at once


# Several servers, one chat (--redis): what they share in Redis, and how often.
REDIS_DEFAULT_PORT = 6379
REDIS_START_TIMEOUT_S = 8.0   # unreachable at start: said and exit 1 within 10 s
REDIS_PREFIX = "chat:"        # every key chat.py makes starts with this
REDIS_FEED_MAXLEN = 100000    # the feed (every room's lines, in one order), trimmed ~
REDIS_READ_BLOCK_MS = 1000    # an XREAD BLOCK waits this long for new entries
REDIS_READ_COUNT = 1000       # ...and takes at most this many at once
REDIS_HEARTBEAT_S = 3.0       # each server says it is alive this often...
REDIS_ALIVE_TTL_S = 10        # ...in a key that lives this long: a server that stops
                              # is found lost within TTL + one heartbeat (13 s < 15)
REDIS_ANSWER_S = 5.0          # a command unanswered this long (an XREAD: past its
                              # BLOCK): Redis is taken to be lost
REDIS_RETRY_S = 2.0           # Redis lost: try again this often (back within 10 s)
REDIS_RETRY_TIMEOUT_S = 3.0   # ...each try given this long



# --- Protocol -----------------------------------------------------------------
# The only code that knows what bytes on the wire look like: framing, telnet
# filtering, cleaning text, nickname rules, parsing a client's line, and the
# text of every line the server sends. Pure functions, no sockets.

ENCODING = "utf-8"
NOTICE = "*** "
ERROR = "!!! "

# Every line the server sends, in one table. Only encode_line() adds the LF.
FORMATS = {
    "message": "<{nick}> {text}",
    "action": "* {nick} {text}",
    "private": "*{nick}* {text}",
    "private_echo": "-> *{nick}* {text}",
    "joined": NOTICE + "{nick} joined ({count} online)",
    "joined_room": NOTICE + "{nick} joined {room} ({count} here)",
    "left": NOTICE + "{nick} left ({reason})",
    "renamed": NOTICE + "{old} is now known as {new}",
    "who": NOTICE + "{count} in {room}: {nicks}",
    "rooms": NOTICE + "{count} online in {rooms}: {list}",
    "topic": NOTICE + "topic of {room}: {text} (set by {nick})",
    "no_topic": NOTICE + "{room} has no topic",
    "topic_set": NOTICE + "{nick} set the topic: {text}",
    "topic_cleared": NOTICE + "{nick} cleared the topic",
    "history_last": NOTICE + "the last {messages} in {room} (times in UTC):",
    "history_search": NOTICE + '{messages} in {room} matching "{text}" (times in UTC):',
    "history_end": NOTICE + "end of history",
    "history": "[{time}] {line}",
    "no_history": NOTICE + "no messages in {room} yet",
    "no_match": NOTICE + 'no messages in {room} match "{text}"',
    "history_after": NOTICE + "{messages} in {room} after {after} (times in UTC):",
    "no_history_after": NOTICE + "no messages in {room} after {after}",
    "offline_start": NOTICE + "{messages} while you were away (times in UTC):",
    "offline_end": NOTICE + "end of messages",
    "pong": NOTICE + "pong {token}",
    "talking_in": NOTICE + "talking in {room} now",
    "no_room": NOTICE + "you are in no room: /join ROOM",
    "away_set": NOTICE + "you are marked away: {text}",
    "away_back": NOTICE + "you are back",
    "welcome": NOTICE + "welcome, {nick}",      # an IRC connection's registration
    "is_away": NOTICE + "{nick} is away: {text}",
    "kicked": NOTICE + "{nick} was kicked by {op} ({reason})",
    "banned": NOTICE + "{nick} was banned by {op} ({reason})",
    "opped": NOTICE + "{nick} is now an operator",
    "muted": NOTICE + "{nick} was muted by {op}",
    "unmuted": NOTICE + "{nick} was unmuted by {op}",
    "notice": NOTICE + "{text}",
    "error": ERROR + "{text}",
}

GREETING = (
    "welcome to chat.py ({count} online)",
    "choose a nickname: 1-24 letters, digits, _ or -",
)
PASSWORD_GREETING = "this room needs a password: send /pass SECRET, then a nickname"
ACCOUNT_MADE = "{nick} is now your account: next time, /login {nick} PASSWORD"
OPERATOR_NICK_KEPT = ("nickname {nick} is kept for an operator's account: "
                      "choose another nickname")
NICK_REGISTERED = "{nick} is registered: /login {nick} PASSWORD, or choose another nickname"
WRONG_LOGIN = "wrong nick or password"
LOGGED_IN_ELSEWHERE = "you logged in elsewhere"
LEFT_ELSEWHERE = "logged in elsewhere"
PASSWORD_TOO_SHORT = "a password needs at least %d characters" % MIN_PASSWORD_CHARS
PASSWORD_CHANGED = "password changed"
NO_LONGER_REGISTERED = "{nick} is no longer registered"
OFFLINE_KEPT = "{nick} is offline: they will get it when they log in"
MAILBOX_FULL = "{nick}'s mailbox is full"
PASSWORD_REQUIRED = "password required: send /pass SECRET first"
PASSWORD_ACCEPTED = "password accepted: choose a nickname"
WRONG_PASSWORD = "wrong password"
NOT_IN_ROOM = "you are not in {room}"
IN_NO_ROOM = "you are in no room: /join ROOM"
TOO_MANY_ROOMS = "you are in {rooms}: /part one first"
# Several servers (--redis): Redis away, and back.
NETWORK_DOWN = "the chat network is unreachable: reconnecting"
NETWORK_BACK = "the chat network is back"
NOT_SENT_NETWORK = "not sent: the chat network is unreachable"


class Command(collections.namedtuple("Command", "name usage help who network")):
    """One command of a registered client: its name; its usage (the form
    that `!!! usage: ...` names, or None); its /help lines (form, what it
    does); who may use it (MEMBERS, OPERATORS, or TO_BECOME_OPERATOR, for
    /op: offered where the server has operators, until one is); whether it
    needs the other servers or the store (refused while Redis is away).
    Its handler is the Chat's _cmd_NAME."""


MEMBERS, OPERATORS, TO_BECOME_OPERATOR = "members", "operators", "to become one"
IRC_CLIENTS = "irc clients"   # what IRC's verbs ask of the chat (no /help line; others: 421)

# Every command, in the order /help lists them. Adding one is a row here, a
# _cmd_ method of Chat, and the FORMATS and ERRORS of its answers.
COMMAND_TABLE = (
    Command("me", "/me TEXT", (("/me TEXT", "act: * NICK TEXT"),), MEMBERS, True),
    Command("msg", "/msg NICK TEXT", (("/msg NICK TEXT", "a private message to NICK"),),
            MEMBERS, False),  # (needs the network for a nick of another server: see Chat)
    Command("nick", "/nick NEW", (("/nick NEW", "change your nickname"),), MEMBERS, True),
    Command("who", None, (("/who [ROOM]", "who is in this room (or ROOM)"),), MEMBERS, True),
    Command("join", "/join ROOM", (("/join ROOM", "go to ROOM (#rust), made if new"),),
            MEMBERS, True),
    Command("open", "/open ROOM",
            (("/open ROOM", "be in ROOM too, and talk there (the others stay)"),
             ("/msg #ROOM TEXT", "say TEXT in ROOM, one of yours")), MEMBERS, True),
    Command("part", None, (("/part [ROOM]", "leave ROOM (this room if none is named)"),),
            MEMBERS, True),
    Command("away", None,
            (("/away [MESSAGE]", "say you are away (/msg to you answers it); alone: back"),),
            MEMBERS, True),
    Command("rooms", None, (("/rooms", "the rooms that have people in them"),), MEMBERS, True),
    Command("topic", None,
            (("/topic [TEXT]", "show the room's topic, or set it (- clears it)"),),
            MEMBERS, True),
    Command("history", "/history [N]",
            (("/history [#ROOM] [N]", "the room's last N messages (20; at most 500)"),),
            MEMBERS, True),
    Command("search", "/search TEXT",
            (("/search TEXT", "the room's last 20 messages that contain TEXT"),), MEMBERS, True),
    Command("register", "/register PASSWORD",
            (("/register PASSWORD", "make your nick an account, yours alone"),), MEMBERS, True),
    Command("login", "/login NICK PASSWORD",
            (("/login NICK PASSWORD", "use your account (from another connection too)"),),
            MEMBERS, True),
    Command("password", "/password OLD NEW",
            (("/password OLD NEW", "change your account's password"),), MEMBERS, True),
    Command("unregister", "/unregister PASSWORD",
            (("/unregister PASSWORD", "delete your account"),), MEMBERS, True),
    Command("ping", None, (("/ping [TOKEN]", "answered with: pong TOKEN"),), MEMBERS, False),
    Command("format", "/format json|text",
            (("/format json|text", "JSON objects, one a line, for programs; or text"),),
            MEMBERS, False),
    Command("help", None, (("/help", "this list"),), MEMBERS, False),
    Command("quit", None, (("/quit [REASON]", "leave"),), MEMBERS, False),
    Command("pass", None, (), MEMBERS, False),  # (before registering; after: a notice)
    Command("op", None, (("/op SECRET", "become an operator"),), TO_BECOME_OPERATOR, False),
    Command("kick", "/kick NICK [REASON]", (("/kick NICK [REASON]", "disconnect NICK"),),
            OPERATORS, False),
    Command("ban", "/ban NICK [REASON]",
            (("/ban NICK [REASON]", "disconnect NICK and refuse its address"),),
            OPERATORS, True),
    Command("unban", "/unban ADDRESS", (("/unban ADDRESS", "accept that address again"),),
            OPERATORS, True),
    Command("bans", None, (("/bans", "the banned addresses"),), OPERATORS, False),
    Command("mute", "/mute NICK", (("/mute NICK", "NICK's lines reach no one"),),
            OPERATORS, False),
    Command("unmute", "/unmute NICK", (("/unmute NICK", "undo /mute"),), OPERATORS, False),
    Command("chathistory", None, (), IRC_CLIENTS, True),
    Command("whois", None, (), IRC_CLIENTS, False),
    Command("in", None, (), IRC_CLIENTS, False),  # /in #ROOM /COMMAND: IRC names the room
)
COMMANDS = {command.name: command for command in COMMAND_TABLE}
USAGE = {command.name: command.usage for command in COMMAND_TABLE if command.usage}


def help_lines(who):
    """The /help lines of the commands for these users (a HELP_COLUMN wide form each)."""
    lines = ["TEXT" + " " * (HELP_COLUMN - 4) + "say TEXT to everyone (//TEXT says /TEXT)"
             ] if who == MEMBERS else []
    return tuple(lines + [form.ljust(HELP_COLUMN) + text for command in COMMAND_TABLE
                          if command.who == who for form, text in command.help])


HELP_COLUMN = 21
HELP = help_lines(MEMBERS)
HELP_OP = help_lines(TO_BECOME_OPERATOR)[0]
HELP_OPERATORS = help_lines(OPERATORS)
NO_REASON = "no reason given"
TOO_MANY_GUESSES = "too many wrong passwords from your address: try again in a minute"
NOT_STORED = "the {what} was not stored ({why}): it is gone at the next restart"
SHUTDOWN_NOTICE = "server shutting down"
LEFT_QUIT = "quit"
LEFT_CLOSED = "connection closed"
LEFT_TOO_SLOW = "too slow"
LEFT_WENT_TO = "went to {room}"
LEFT_PARTED = "parted"
AWAY_MARK = " (away)"              # after a nick in /who
LEFT_SERVER_LOST = "server lost"   # its server stopped heartbeating (--redis)
HISTORY_TIME = "%Y-%m-%d %H:%M"   # UTC, in a history block
TIMES_IN_UTC = "(times in UTC)"   # in a history block's header
TIMES_LOCAL = "(local times)"     # what the client shows instead, having converted them
# For the bench's observers, which must parse millions of lines: the start
# of a message ("<") and the end of an eviction (" left (too slow)"), as bytes.
MESSAGE_OPENING = FORMATS["message"].split("{nick}")[0].encode(ENCODING)
LEFT_TOO_SLOW_SUFFIX = FORMATS["left"].split("{nick}")[1].format(
    reason=LEFT_TOO_SLOW).encode(ENCODING)


class Line(str):
    """A line the server sends: its text, and what it was made of: its kind
    and fields (FORMATS), and facts only JSON mode shows (extra: an id, a
    room, when it was said). A str everywhere else."""

    def __new__(cls, text, kind, fields):
        line = super().__new__(cls, text)
        line.kind, line.fields, line.extra = kind, fields, {}
        return line

    def having(self, **extra):
        """This line, with facts for its JSON form."""
        self.extra.update(extra)
        return self

    def about_person(self, rooms):
        """Copies of this line, one per room (a line about a person, said in
        every room it is in): each knows its room, and all of them one id,
        by which a connection in several of those rooms gets only the first
        to reach it (see rendered())."""
        person = "%s.%d" % (PERSON_LINE_PREFIX, next(PERSON_LINE_NUMBERS))
        extra = {name: value for name, value in self.extra.items()
                 if name not in RENDERED_EXTRAS}
        return [(room, Line(self, self.kind, self.fields).having(
            **dict(extra, room=room.name, person=person))) for room in rooms]


# What a Line's extra caches of its renderings: never copied or sent on.
RENDERED_EXTRAS = frozenset({"json", "irc"})
# A line about a person has an id that is this process's alone (its copies go
# through Redis to other servers too).
PERSON_LINE_PREFIX = os.urandom(6).hex()
PERSON_LINE_NUMBERS = itertools.count(1)
PERSON_LINES_KEPT = 64   # per connection: the ids of the last ones it got


def format_line(kind, **fields):
    """Return one server line of the given kind (a Line: its text is the str)."""
    return Line(FORMATS[kind].format(**fields), kind, fields)


def history_line(row, room):
    """A stored message (id, time, nick, kind, text) of room, as a history line."""
    message_id, when, nick, kind, text = row
    return format_line("history", time=time.strftime(HISTORY_TIME, time.gmtime(when)),
                       line=format_line(kind, nick=nick, text=text)).having(
        id=message_id, room=room, nick=nick, kind=kind, text=text, when=when)


# Every error the server sends, by name: its JSON code (docs/protocol.md,
# "JSON mode") and its text. error(name, **fields) makes one; a rewording
# here changes no code.
ERRORS = {
    "usage": ("usage", "usage: {form}"),              # USAGE[command]
    "unknown_command": ("unknown_command", "unknown command /{command} (try /help)"),
    "not_registered": ("not_registered", "choose a nickname first"),
    "password_required": ("password_required", PASSWORD_REQUIRED),
    "wrong_password": ("wrong_password", WRONG_PASSWORD),
    "wrong_login": ("wrong_password", WRONG_LOGIN),
    "wrong_op_password": ("wrong_password", "wrong operator password"),
    "too_many_op_passwords": ("wrong_password", "too many wrong operator passwords"),
    "too_many_guesses": ("wrong_password", TOO_MANY_GUESSES),
    "nick_too_long": ("nick_invalid", "nickname too long (max {max} characters)"),
    "nick_characters": ("nick_invalid",
                        "invalid nickname {nick}: use letters, digits, _ and - (not first)"),
    "nick_scripts": ("nick_invalid",
                     "invalid nickname {nick}: it mixes Latin, Greek or Cyrillic letters"),
    "nick_taken": ("nick_taken", "nickname {nick} is taken"),
    "nick_kept": ("nick_taken", OPERATOR_NICK_KEPT),
    "nick_registered": ("nick_registered", NICK_REGISTERED),
    "already_nick": ("already", "you are already {nick}"),
    "already_in_room": ("already", "you are already in {room}"),
    "already_logged_in": ("already", "you are logged in to {nick} already"),
    "already_muted": ("already", "{nick} is muted already"),
    "already_unmuted": ("already", "{nick} is not muted already"),
    "no_such_user": ("no_such_user", "no such user: {nick}"),
    "muted": ("muted", "you are muted"),
    "operators_only": ("operators_only", "operators only"),
    "ban_yourself": ("operators_only", "you can't ban yourself"),
    "no_operators": ("no_operators", "this server has no operators"),
    "line_too_long": ("line_too_long", "line too long (max {max} bytes)"),
    "room_invalid": ("room_invalid",
                     "invalid room name: {room} (# and 1-{max} letters, digits, _ or -)"),
    "password_too_short": ("password_too_short", PASSWORD_TOO_SHORT),
    "mailbox_full": ("mailbox_full", MAILBOX_FULL),
    "banned": ("banned", "you are banned"),
    "server_full": ("server_full", "server full"),
    "too_many_connections": ("too_many_connections", "too many connections from your address"),
    "registration_timeout": ("registration_timeout", "registration timed out"),
    "logged_in_elsewhere": ("logged_in_elsewhere", LOGGED_IN_ELSEWHERE),
    "not_in_room": ("not_in_room", NOT_IN_ROOM),
    "in_no_room": ("not_in_room", IN_NO_ROOM),
    "too_many_rooms": ("too_many_rooms", TOO_MANY_ROOMS),
    "not_logged_in": ("not_logged_in", "you are not logged in to an account"),
    "not_banned": ("not_banned", "{address} is not banned"),
    "web_speaks_json": ("usage", "the web connection speaks JSON"),
    # Something failed: a store, a hash, the chat network.
    "network_down": ("not_sent", NOT_SENT_NETWORK),
    "message_not_stored": ("not_sent", "your message was not stored ({why})"),
    "change_not_stored": ("not_sent", NOT_STORED),
    "history_unreadable": ("not_sent", "the history can't be read now ({why})"),
    "account_not_made": ("not_sent", "{nick} was not registered"),
    "account_not_stored": ("not_sent", "{nick} was not registered ({why})"),
    "password_not_changed": ("not_sent", "the password was not changed"),
}
ERROR_CODE_ELSE = "not_sent"   # an error whose text matches none of the above


def _error_patterns():
    """Each error's text as a pattern, to find the code of a text line's error."""
    patterns = []
    for code, template in ERRORS.values():
        out = ""
        for literal, field, _, _ in string.Formatter().parse(template):
            out += re.escape(literal) + (".*" if field is not None else "")
        patterns.append((re.compile(out + r"\Z", re.DOTALL), code))
    return patterns


def error_code(text):
    """The JSON code of an error's text (a client reading a text line)."""
    for pattern, code in ERROR_PATTERNS:
        if pattern.match(text):
            return code
    return ERROR_CODE_ELSE


# Header lines a JSON block does without: its items say "history", then history_end.
JSON_SILENT = frozenset({"history_last", "history_search", "history_after", "offline_start",
                         "offline_end"})


def json_time(when):
    """UTC, ISO 8601 with milliseconds: 2026-12-01T14:03:05.123Z."""
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)),
                         int(when * 1000) % 1000)


def json_object(line, now=None):
    """The JSON object (a dict) for a line, or None for a line JSON mode
    does without."""
    kind, fields, extra = line.kind, line.fields, line.extra
    if kind in JSON_SILENT:
        return None
    obj = JSON_OBJECTS[kind](fields, extra)
    obj["time"] = json_time(extra.get("when", time.time() if now is None else now))
    return obj


def _json_history(fields, extra):
    if extra.get("offline"):
        return {"type": "private", "from": extra["from"], "to": extra["to"],
                "text": extra["text"], "offline": True}
    return {"type": extra["kind"], "id": extra["id"], "room": extra["room"],
            "nick": extra["nick"], "text": extra["text"], "history": True}


def _json_who(fields, extra):
    members = extra["members"]   # [(nick, op, away)], in the text line's order
    return {"type": "who", "room": fields["room"], "nicks": [m[0] for m in members],
            "operators": [m[0] for m in members if m[1]],
            "away": [m[0] for m in members if m[2]]}


def _json_notice(kind, **named):
    """A notice, with the fields a program wants from it (JSON name=field;
    a field the line lacks is null)."""
    def make(fields, extra):
        obj = {"type": "notice", "text": FORMATS[kind].format(**fields)[len(NOTICE):]}
        obj.update((name, fields.get(field)) for name, field in named.items())
        return obj
    make.notice_kind = kind
    return make


def _json_rooms(fields, extra):
    rooms = []
    for item in filter(None, fields["list"].split(", ")):
        name, _, count = item.rpartition(" (")
        rooms.append({"name": name, "count": int(count.rstrip(")"))})
    return {"type": "rooms", "count": int(fields["count"]), "rooms": rooms}


def _json_moderation(kind):
    def make(fields, extra):
        obj = {"type": kind, "nick": fields["nick"], "room": extra.get("room"),
               "by": fields.get("op", fields["nick"])}  # /op: the operator opped itself
        if fields.get("reason"):
            obj["reason"] = fields["reason"]
        return obj
    return make


JSON_OBJECTS = {
    "message": lambda f, x: {"type": "message", "id": x.get("id"), "room": x.get("room"),
                             "nick": f["nick"], "text": f["text"]},
    "action": lambda f, x: {"type": "action", "id": x.get("id"), "room": x.get("room"),
                            "nick": f["nick"], "text": f["text"]},
    "private": lambda f, x: {"type": "private", "from": f["nick"], "to": x.get("to"),
                             "text": f["text"]},
    "private_echo": lambda f, x: {"type": "private", "from": x.get("from"), "to": f["nick"],
                                  "text": f["text"]},
    "joined": lambda f, x: {"type": "joined", "nick": f["nick"], "room": x.get("room"),
                            "count": int(f["count"])},
    "joined_room": lambda f, x: {"type": "joined", "nick": f["nick"], "room": f["room"],
                                 "count": int(f["count"])},
    "left": lambda f, x: {"type": "left", "nick": f["nick"], "room": x.get("room"),
                          "reason": f["reason"]},
    "renamed": lambda f, x: {"type": "renamed", "old": f["old"], "new": f["new"],
                             "room": x.get("room")},
    "who": _json_who,
    "rooms": _json_rooms,
    "topic": lambda f, x: {"type": "topic", "room": f["room"], "text": f["text"],
                           "nick": f["nick"]},
    "no_topic": lambda f, x: {"type": "topic", "room": f["room"], "text": None, "nick": None},
    "topic_set": lambda f, x: {"type": "topic", "room": x.get("room"), "text": f["text"],
                               "nick": f["nick"]},
    "topic_cleared": lambda f, x: {"type": "topic", "room": x.get("room"), "text": None,
                                   "nick": f["nick"]},
    "pong": lambda f, x: {"type": "pong", "token": f["token"]},
    "talking_in": _json_notice("talking_in", room="room"),
    "no_room": _json_notice("no_room", room="room"),
    "away_set": _json_notice("away_set", away="text"),
    "away_back": _json_notice("away_back", away="text"),
    "is_away": _json_notice("is_away", nick="nick", away="text"),
    "kicked": _json_moderation("kicked"),
    "banned": _json_moderation("banned"),
    "muted": _json_moderation("muted"),
    "unmuted": _json_moderation("unmuted"),
    "opped": _json_moderation("opped"),
    "history": _json_history,
    "history_end": lambda f, x: {"type": "history_end", "room": x.get("room"),
                                 "count": x.get("count", 0)},
    "no_history": lambda f, x: {"type": "history_end", "room": f["room"], "count": 0},
    "no_match": lambda f, x: {"type": "history_end", "room": f["room"], "count": 0},
    "no_history_after": lambda f, x: {"type": "history_end", "room": f["room"], "count": 0},
    "notice": lambda f, x: {"type": "notice", "text": f["text"]},
    "error": lambda f, x: {"type": "error", "text": f["text"],
                           "code": x.get("code") or error_code(f["text"])},
}


def json_bytes(line):
    """A line as JSON mode sends it (b"" for one it does without); made once."""
    cached = line.extra.get("json")
    if cached is None:
        obj = json_object(line)
        cached = b"" if obj is None else (json.dumps(obj, ensure_ascii=False) + "\n").encode(
            ENCODING)
        line.extra["json"] = cached
    return cached


class TextCodec:
    """How a connection speaks: what a line it sent asks for, and the bytes
    each line the chat makes becomes for it. Text lines, as nc and telnet
    users see them. Codecs hold no state of their own (a connection's
    framing is its reader's): one of each serves every connection, and the
    fan-out encodes a pass once per codec, not once per member."""

    name = "text"
    switchable = True         # /format may change it
    http_first = False        # the chat greets it at once (a web one: once upgraded)
    per_member = False        # its bytes for a line are the same for everyone
    joins_lobby = True        # registering puts it in #lobby (an IRC one: in no room)
    greets = True             # greeted with prompts (an IRC client: its welcome, 001...)

    @staticmethod
    def reader(max_line):
        """What frames the bytes a client sends into lines (a WebSocket's
        frames, one day, are another)."""
        return LineReader(max_line)

    @staticmethod
    def command(line):
        """(command, argument) for a line (bytes) a client sent, or None for
        a blank one: (None, TEXT) is a message."""
        text = decode_line(line)
        return parse_line(text) if text.strip() else None

    @staticmethod
    def encode(line, conn=None):
        return encode_line(line)

    @staticmethod
    def encode_marked(line, room, conn=None):
        """A room's line for a connection whose current room is another."""
        return encode_line(room.name + " " + line)

    @staticmethod
    def replays(conn):
        """Whether joining a room sends conn the room's last messages."""
        return True

    @staticmethod
    def caps(conn):
        """The IRCv3 capabilities conn asked for (none but IRC's)."""
        return ()


class JsonCodec(TextCodec):
    """JSON mode (/format json): one object per line; commands stay text."""

    name = "json"

    @staticmethod
    def encode(line, conn=None):
        return json_bytes(line)

    @staticmethod
    def encode_marked(line, room, conn=None):
        return json_bytes(line)  # its object names its room


class WebCodec(JsonCodec):
    """A web connection (--web): HTTP first, then a WebSocket, each text
    frame a line in and a JSON object out. It stays JSON: /format text is
    refused."""

    name = "web"
    switchable = False
    http_first = True

    @staticmethod
    def reader(max_line):
        return WebReader(max_line)

    @staticmethod
    def encode(line, conn=None):
        return ws_frame(json_bytes(line)[:-1])  # (the object, without its line end)

    @staticmethod
    def encode_marked(line, room, conn=None):
        return ws_frame(json_bytes(line)[:-1])  # its object names its room


TEXT_CODEC, JSON_CODEC, WEB_CODEC = TextCodec(), JsonCodec(), WebCodec()
CODECS = {codec.name: codec for codec in (TEXT_CODEC, JSON_CODEC)}  # for /format


# What each field of a line may hold: nicks are letters, digits, _ and -;
# text, reasons, nick lists and tokens anything.
FIELD_PATTERNS = {"nick": r"[\w-]+", "old": r"[\w-]+", "new": r"[\w-]+", "op": r"[\w-]+",
                  "count": r"\d+", "room": r"#[\w-]+", "rooms": r"\d+ rooms?",
                  "messages": r"\d+ messages?", "time": r"\d{4}-\d\d-\d\d \d\d:\d\d",
                  "after": r"\d+"}


def _line_pattern(template):
    """Turn a FORMATS template into a regular expression with a group per field."""
    out = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        out += re.escape(literal)
        if field is not None:
            out += "(?P<%s>%s)" % (field, FIELD_PATTERNS.get(field, ".*"))
    return re.compile(out + r"\Z", re.DOTALL)


# The generic kinds last: "*** {text}" matches every notice.
LINE_PATTERNS = [(kind, _line_pattern(template)) for kind, template in FORMATS.items()
                 if kind not in ("notice", "error")] + [
                     (kind, _line_pattern(FORMATS[kind])) for kind in ("notice", "error")]


def parse_server_line(text):
    """Return (kind, fields) for a line the server sent: the FORMATS kind it
    was made from and its fields; ("other", {"text": text}) for none."""
    for kind, pattern in LINE_PATTERNS:
        match = pattern.match(text)
        if match:
            return kind, match.groupdict()
    return "other", {"text": text}


def line_parts(text):
    """(kind, fields) of a server line: a Line knows them (made here, or
    from a JSON object); a text line is parsed."""
    if isinstance(text, Line):
        return text.kind, text.fields
    return parse_server_line(text)


def _history_time(iso):
    """2026-12-01T14:03:05.123Z (a JSON time) as a history block writes it."""
    return "%s %s" % (iso[:10], iso[11:16])


def _said(obj, kind):
    line = format_line(kind, nick=obj["nick"], text=obj["text"])
    line.extra.update(id=obj.get("id"), room=obj.get("room"))
    return line


def _private_from_json(obj, me):
    if obj.get("offline"):
        return format_line("history", time=_history_time(obj["time"]),
                           line=format_line("private", nick=obj["from"], text=obj["text"]))
    if me and nick_key(obj["from"]) == nick_key(me):
        return format_line("private_echo", nick=obj["to"], text=obj["text"])
    return format_line("private", nick=obj["from"], text=obj["text"])


def _joined_from_json(obj, me):
    # One type for two lines: registering (count: online) lands in the lobby,
    # /join (count: here) anywhere; a /join back to the lobby reads as the first.
    if obj["room"] == LOBBY:
        return format_line("joined", nick=obj["nick"], count=obj["count"])
    return format_line("joined_room", nick=obj["nick"], room=obj["room"], count=obj["count"])


def _topic_from_json(obj, asked):
    if obj["text"] is None:
        if obj["nick"] is None:
            return format_line("no_topic", room=obj["room"])
        return format_line("topic_cleared", nick=obj["nick"])
    if asked:  # on joining, or an answer to /topic: the topic as it stands
        return format_line("topic", room=obj["room"], text=obj["text"], nick=obj["nick"])
    return format_line("topic_set", nick=obj["nick"], text=obj["text"])


def _moderation_from_json(obj, me):
    kind = obj["type"]
    if kind == "opped":
        return format_line("opped", nick=obj["nick"])
    fields = {"nick": obj["nick"], "op": obj["by"]}
    if kind in ("kicked", "banned"):
        fields["reason"] = obj.get("reason") or NO_REASON
    return format_line(kind, **fields)


def _who_from_json(obj, me):
    operators, away = set(obj["operators"]), set(obj.get("away", ()))
    nicks = [("@" if nick in operators else "") + nick + (AWAY_MARK if nick in away else "")
             for nick in obj["nicks"]]
    return format_line("who", count=len(nicks), room=obj["room"], nicks=", ".join(nicks))


def _rooms_from_json(obj, me):
    return format_line("rooms", count=obj["count"], rooms=plural(len(obj["rooms"]), "room"),
                       list=", ".join("%s (%d)" % (room["name"], room["count"])
                                      for room in obj["rooms"]))


# The inverse of JSON_OBJECTS: the text line an object stands for (topic and
# history_end need to know what was asked: see line_from_json).
LINES_FROM_JSON = {
    "message": lambda obj, me: _said(obj, "message"),
    "action": lambda obj, me: _said(obj, "action"),
    "private": _private_from_json,
    "joined": _joined_from_json,
    "left": lambda obj, me: format_line("left", nick=obj["nick"], reason=obj["reason"]),
    "renamed": lambda obj, me: format_line("renamed", old=obj["old"], new=obj["new"]),
    "who": _who_from_json,
    "rooms": _rooms_from_json,
    "pong": lambda obj, me: format_line("pong", token=obj["token"]),
    "kicked": _moderation_from_json,
    "banned": _moderation_from_json,
    "muted": _moderation_from_json,
    "unmuted": _moderation_from_json,
    "opped": _moderation_from_json,
    "notice": lambda obj, me: _notice_from_json(obj),
    "error": lambda obj, me: error_line(obj["text"]),
}
# Notices JSON mode sends with fields of their own: known again by their text.
JSON_NOTICES = frozenset(kind for kind, make in JSON_OBJECTS.items()
                         if getattr(make, "notice_kind", None))


def _notice_from_json(obj):
    line = notice(obj["text"])
    kind, fields = parse_server_line(line)
    return Line(line, kind, fields) if kind in JSON_NOTICES else line


def line_from_json(obj, me=None, topic_asked=False):
    """The text line (a Line) a JSON object from the server stands for, as
    text mode would have sent it (times in UTC); None for history_end and
    for what no line stands for. me: our nick (a private echo is ours);
    topic_asked: a topic object answers a join or /topic, not a change."""
    kind = obj.get("type")
    try:
        if kind == "topic":
            return _topic_from_json(obj, topic_asked)
        line = LINES_FROM_JSON[kind](obj, me)
        if obj.get("history") and kind in ("message", "action"):
            line = format_line("history", time=_history_time(obj["time"]), line=line).having(
                id=obj.get("id"), room=obj.get("room"))
        elif isinstance(obj.get("room"), str) and isinstance(line, Line):
            line.having(room=obj["room"])  # whose line it is (several rooms at once)
        return line
    except (KeyError, TypeError, ValueError):
        return None  # history_end (the caller's), an unknown type, a field missing


def help_commands(lines):
    """The commands a /help list names: the first word of each /... line."""
    return tuple(dict.fromkeys(line.split(" ", 1)[0] for line in lines if line.startswith("/")))


def is_nick_question(text):
    """Tell whether a notice's text asks for a nickname (the last greeting
    line; other servers of this protocol word it their own way)."""
    return "nickname" in text.lower() and text != PASSWORD_GREETING


def encode_line(text):
    """Return text as it goes on the wire: UTF-8 with the LF line end."""
    return (text + "\n").encode(ENCODING)


def notice(text):
    return format_line("notice", text=text)


def error(name, **fields):
    """The error line called name in ERRORS, with its code for JSON mode."""
    code, template = ERRORS[name]
    return format_line("error", text=template.format(**fields)).having(
        code=code, name=name, args=fields)  # (name and args: for an IRC numeric)


def error_line(text):
    """An error line from its text alone (the client's own, or one read)."""
    return format_line("error", text=text)


def usage(command):
    return error("usage", form=USAGE[command])


ERROR_PATTERNS = _error_patterns()


# Telnet: IAC (0xFF) starts a command. States of the filter below.
IAC, SB, SE, WILL, WONT, DO, DONT = 0xFF, 0xFA, 0xF0, 0xFB, 0xFC, 0xFD, 0xFE
# telnet sends DO TIMING-MARK after a byte it took for an interrupt (the 0x9C
# inside "Ü") and throws away all it receives until that is answered.
TIMING_MARK = 0x06
WONT_TIMING_MARK = bytes([IAC, WONT, TIMING_MARK])
# ...and it sends that byte as a command: GNU telnet takes 0x83, 0x8F, 0x9A
# and 0x9C for Ctrl-C, -O, -Z and -\ with the high bit set, so "Ü" (C3 9C)
# arrives as C3, IAC BRK. Such a command right after a byte past ASCII (in
# the middle of a UTF-8 character) is put back as the byte it replaced.
TELNET_MANGLED = {0xF4: 0x83, 0xF5: 0x8F, 0xED: 0x9A, 0xF3: 0x9C}  # IP, AO, SUSP, BRK
LF, CR = 0x0A, 0x0D
TELNET_DATA, TELNET_IAC, TELNET_OPTION, TELNET_SUB, TELNET_SUB_IAC = range(5)
# A subnegotiation ends at IAC SE or after this many bytes following its
# IAC SB, so a stray IAC SB can't swallow the rest of a connection.
TELNET_MAX_SUB_BYTES = 512
TELNET_START = (TELNET_DATA, 0, False)  # (state, the option's verb or the
                                        # subnegotiation's bytes, last data byte past ASCII)


def strip_telnet(data, state=TELNET_START, answers=None):
    """Drop telnet commands from a chunk of the byte stream.

    Returns (data without commands, state to pass with the next chunk): a
    command may be split across reads, down to one byte per read. What the
    peer must be answered (WONT TIMING-MARK) is added to answers.
    """
    mode, sub_bytes, high = state
    if mode == TELNET_DATA and IAC not in data:
        return data, (mode, sub_bytes, bool(data) and data[-1] >= 0x80 or (not data and high))
    out = bytearray()
    for byte in data:
        if mode == TELNET_DATA:
            if byte == IAC:
                mode = TELNET_IAC
            else:
                out.append(byte)
                high = byte >= 0x80
        elif mode == TELNET_IAC:
            if WILL <= byte <= DONT:
                mode, sub_bytes = TELNET_OPTION, byte  # the verb, until its option comes
            elif byte == SB:
                mode, sub_bytes = TELNET_SUB, 0
            else:
                if byte == LF:  # a lone IAC must not swallow the line end
                    out.append(byte)
                    high = False
                elif high and byte in TELNET_MANGLED:  # inside a UTF-8 character
                    out.append(TELNET_MANGLED[byte])  # (high stays: a 3-byte one goes on)
                mode = TELNET_DATA
        elif mode == TELNET_OPTION:
            if sub_bytes == DO and byte == TIMING_MARK and answers is not None:
                answers += WONT_TIMING_MARK
            mode, sub_bytes = TELNET_DATA, 0
        else:  # inside a subnegotiation: TELNET_SUB or TELNET_SUB_IAC
            sub_bytes += 1
            if mode == TELNET_SUB_IAC and byte == SE:
                mode = TELNET_DATA
            elif sub_bytes >= TELNET_MAX_SUB_BYTES:
                mode = TELNET_DATA  # too long to be one: the rest is data
            else:
                mode = TELNET_SUB_IAC if byte == IAC and mode == TELNET_SUB else TELNET_SUB
    return bytes(out), (mode, sub_bytes, high)


TOO_LONG = object()  # what LineReader.pop_line() returns for a refused line


class LineReader:
    """Frame a byte stream into lines, refusing overlong ones without keeping them.

    Invariant: an unfinished line is kept only while it could still be
    accepted (at most max_line bytes and a CR); past that it is dropped and
    the rest of it, up to its LF, is discarded as it arrives.
    """

    __slots__ = ("max_line", "buf", "pos", "discarding", "telnet", "answers")
    # What a web reader may have for the server after feed(); a line reader never does.
    request = None            # an HTTP request to answer
    finished = None           # why the peer is done (its close frame, a protocol error)

    @staticmethod
    def goodbye():
        """Bytes that end the connection politely (a WebSocket's close frame)."""
        return b""

    def __init__(self, max_line=MAX_LINE_BYTES):
        self.max_line = max_line
        self.buf = bytearray()
        self.pos = 0              # buf[:pos] has been handed out already
        self.discarding = False   # inside an overlong line, waiting for its LF
        self.telnet = TELNET_START
        self.answers = bytearray()  # telnet answers owed to the peer (see strip_telnet)

    def feed(self, data):
        """Add bytes as they came from the socket."""
        data, self.telnet = strip_telnet(data, self.telnet, self.answers)
        self.buf += data

    def pop_line(self):
        """Return the next line (bytes, no line end), TOO_LONG, or None for none yet."""
        buf = self.buf
        while True:
            start = self.pos
            end = buf.find(b"\n", start)
            if end < 0:
                return self._keep_unfinished()
            self.pos = end + 1
            if self.discarding:  # the end of a line already refused
                self.discarding = False
                continue
            if end > start and buf[end - 1] == CR:
                end -= 1
            if end - start > self.max_line:
                return TOO_LONG
            return bytes(buf[start:end])

    def _keep_unfinished(self):
        """Compact the buffer; refuse an unfinished line that is already too long."""
        buf = self.buf
        del buf[:self.pos]
        self.pos = 0
        if self.discarding:
            buf.clear()
            return None
        room = self.max_line + 1  # the line, and perhaps a CR before its LF
        if len(buf) > room or (len(buf) == room and buf[-1] != CR):
            buf.clear()
            self.discarding = True
            return TOO_LONG
        return None

    def has_line(self):
        """Tell whether a complete line is waiting."""
        return self.buf.find(b"\n", self.pos) >= 0


def _unsafe_characters():
    """Build the str.translate table that makes text safe for a terminal."""
    table = {code: None for code in range(0x20)}          # C0 controls
    table.update({code: None for code in range(0x7F, 0xA0)})  # DEL, C1
    for code in (0x061C, 0x200B, 0x200E, 0x200F, 0xFEFF):
        table[code] = None
    for first, last in ((0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x2069)):
        table.update({code: None for code in range(first, last + 1)})
    for code in (0x09, 0x2028, 0x2029):  # TAB and the Unicode line breaks
        table[code] = " "
    return table


UNSAFE_CHARACTERS = _unsafe_characters()


def clean_text(text):
    """Remove what could act on a terminal: controls and invisible reordering marks."""
    return text.translate(UNSAFE_CHARACTERS)


def clean_json(value):
    """A JSON value from a server, every string in it made safe (clean_text)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(item) for item in value]
    if isinstance(value, dict):
        return {clean_text(key): clean_json(item) for key, item in value.items()}
    return value


def decode_line(line):
    """Turn a received line into safe text without trailing whitespace."""
    return clean_text(line.decode(ENCODING, "replace")).rstrip()


HANGUL_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")
CONFUSABLE_SCRIPTS = frozenset({"LATIN", "GREEK", "CYRILLIC"})


def nick_key(nick):
    """Return the form in which two nicknames clash when equal."""
    return unicodedata.normalize("NFKC", nick).casefold()


def nick_problem(nick):
    """Return why nick is not a valid nickname (an error line), or None if it is."""
    if not nick:
        return usage("nick")
    if len(nick) > MAX_NICK_CHARS:
        return error("nick_too_long", max=MAX_NICK_CHARS)
    if nick.startswith("-") or any(
            not (ch.isalnum() or ch in "_-") or ch in HANGUL_FILLERS for ch in nick):
        return error("nick_characters", nick=nick)
    scripts = {unicodedata.name(ch, "").split(" ")[0] for ch in nick if ch.isalpha()}
    if len(scripts & CONFUSABLE_SCRIPTS) > 1:
        return error("nick_scripts", nick=nick)
    return None


MAX_ROOM_CHARS = 32
ROOM_PREFIX = "#"


def room_name(text):
    """The room a user means: `rust` is `#rust`."""
    return text if text.startswith(ROOM_PREFIX) else ROOM_PREFIX + text


def room_problem(name):
    """Return why name is not a valid room name (an error line), or None if it is."""
    body = name[len(ROOM_PREFIX):]
    if (not name.startswith(ROOM_PREFIX) or not 1 <= len(body) <= MAX_ROOM_CHARS
            or any(not (ch.isalnum() or ch in "_-") for ch in body)):
        return error("room_invalid", room=name, max=MAX_ROOM_CHARS)
    return None


DECIMAL = re.compile(r"[0-9]{1,20}")  # ASCII digits only: '²'.isdigit(), but int('²') fails
MAX_MESSAGE_ID = 2 ** 63 - 1           # SQLite's largest integer


def decimal_number(text, largest):
    """The number text spells in ASCII digits, if at most largest; else None."""
    if not DECIMAL.fullmatch(text):
        return None
    number = int(text)
    return number if number <= largest else None


def plural(count, noun):
    """A count as English writes it: 1 message, 2 messages."""
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def parse_line(text):
    """Split a client's line into (command, argument); command is None for a message.

    `//TEXT` is the message `/TEXT`. A command name is lower-cased; its
    argument is the rest of the line, stripped.
    """
    if not text.startswith("/") or text.startswith("//"):
        return None, text[1:] if text.startswith("//") else text
    name, _, arg = text[1:].partition(" ")
    return name.lower(), arg.strip()


def secrets_match(given, expected):
    """Compare two passwords in constant time (their digests: no length leak)."""
    digest = lambda text: hashlib.sha256(text.encode(ENCODING, "replace")).digest()
    return hmac.compare_digest(digest(given), digest(expected))


def hash_password(password):
    """Return a salted hash of an account's password, naming its method:
    scrypt$N$r$p$salt$hash, or pbkdf2_sha256$iterations$salt$hash. Slow on
    purpose (tens of milliseconds): call it off the server's loop."""
    salt = os.urandom(SALT_BYTES)
    secret = password.encode(ENCODING, "replace")
    if hasattr(hashlib, "scrypt"):
        digest = hashlib.scrypt(secret, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        return "scrypt$%d$%d$%d$%s$%s" % (SCRYPT_N, SCRYPT_R, SCRYPT_P, salt.hex(), digest.hex())
    digest = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS)
    return "pbkdf2_sha256$%d$%s$%s" % (PBKDF2_ITERATIONS, salt.hex(), digest.hex())


def password_matches(password, stored):
    """Tell, in constant time, whether password is the one stored hashed.
    Slow on purpose: call it off the server's loop."""
    method, *fields = stored.split("$")
    secret = password.encode(ENCODING, "replace")
    if method == "scrypt":
        n, r, p, salt, digest = fields
        seen = hashlib.scrypt(secret, salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    else:
        iterations, salt, digest = fields
        seen = hashlib.pbkdf2_hmac("sha256", secret, bytes.fromhex(salt), int(iterations))
    return hmac.compare_digest(seen, bytes.fromhex(digest))


FINGERPRINT_PREFIX = "SHA256:"
OPENSSL_FINGERPRINT_PREFIX = "sha256 fingerprint="  # what `openssl x509 -fingerprint` prints


def certificate_fingerprint(der):
    """Return a certificate's fingerprint as SHA256:AB:CD:... (what
    `openssl x509 -noout -fingerprint -sha256` prints after its '=')."""
    return format_fingerprint(hashlib.sha256(der).hexdigest())


def format_fingerprint(hex_digits):
    digits = hex_digits.upper()
    return FINGERPRINT_PREFIX + ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def normalize_fingerprint(text):
    """Return a fingerprint a user gave in the one form we compare: the
    SHA256: prefix (or openssl's `sha256 Fingerprint=`) and the colons
    optional, any case. ValueError if not one."""
    digits = text.strip()
    if digits.lower().startswith(OPENSSL_FINGERPRINT_PREFIX):
        digits = digits[len(OPENSSL_FINGERPRINT_PREFIX):]
    elif digits.upper().startswith(FINGERPRINT_PREFIX):
        digits = digits[len(FINGERPRINT_PREFIX):]
    digits = digits.replace(":", "")
    if len(digits) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
        raise ValueError("not a SHA-256 fingerprint: %s" % text)
    return format_fingerprint(digits)


# --- Plumbing shared by all three programs ------------------------------------
# Logging, addresses, selector bookkeeping, socket options, reads and writes
# that know TLS, and the TLS contexts: what the server, the client and the
# bench all need from sockets.

def log_to_stderr(text):
    """Write one timestamped log line to stderr."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        sys.stderr.write("%s %s\n" % (stamp, text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # a closed or broken stderr must not stop the room


def peer_ip(addr):
    """Return the IP address of a peer, IPv4 addresses unmapped from IPv6."""
    ip = addr[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:"):]
    return ip


def format_address(addr):
    """Return host:port, with brackets around an IPv6 host."""
    host, port = addr[0], addr[1]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def watch(selector, sock, old, new, data):
    """Make selector watch sock for the events `new` (0: not at all); return new.

    Registering, modifying and unregistering are three calls; this is one.
    """
    if new != old:
        if old == 0:
            selector.register(sock, new, data)
        elif new == 0:
            selector.unregister(sock)
        else:
            selector.modify(sock, new, data)
    return new


def raise_open_files_limit():
    """Raise the soft open-files limit to the hard one, so thousands of clients fit."""
    if resource is None:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                # macOS refuses "unlimited" past OPEN_MAX; settle for that.
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 10240), hard))
    except (ValueError, OSError):
        pass  # keep the limit we have: fewer clients fit, nothing breaks


SIOCOUTQ = 0x5411   # Linux: the bytes of a socket's send queue not yet acknowledged
SO_NWRITE = 0x1024  # macOS: the same, as a socket option


def kernel_unsent(sock):
    """Bytes the kernel still holds for sock (sent to the peer or not, not
    acknowledged), or None where the system can't say."""
    try:
        if sys.platform.startswith("linux") and fcntl is not None:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
        if sys.platform == "darwin":
            return sock.getsockopt(socket.SOL_SOCKET, SO_NWRITE)
    except (OSError, ValueError, struct.error):
        pass
    return None


def set_keepalive(sock):
    """Turn on TCP keepalive, with the idle time shortened where it can be set."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
    for option, value in ((idle, KEEPALIVE_IDLE_S),
                          (getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL_S),
                          (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES)):
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass  # the platform's default probing still applies


def receive_some(sock, tls):
    """One read (b"" at the end); for TLS also what OpenSSL already decrypted,
    which the selector can't see: the kernel's buffer is empty by then.

    Raises BlockingIOError, or for TLS ssl.SSLWantReadError, when there is
    nothing to read yet.
    """
    data = sock.recv(RECV_BYTES)
    if tls and data:
        while sock.pending():
            data += sock.recv(sock.pending())
    return data


def send_some(sock, buf, tls):
    """Send from the start of buf; return how many bytes went (0: full).

    For TLS, a record at a time: OpenSSL wants a write it refused retried
    with the same bytes, and the next call starts at the same place of buf,
    which only grows at its end.
    """
    if not tls:
        return sock.send(buf)
    sent = 0
    for _ in range(TLS_RECORDS_PER_FLUSH):
        if sent >= len(buf):
            break
        try:
            sent += sock.send(buf[sent:sent + TLS_RECORD_BYTES])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            break
    return sent


def looks_like_tls(data):
    """Whether bytes start like a TLS record: a handshake or an alert, version 3.x."""
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


def client_tls_context(cafile=None, pinned=False, insecure=False):
    """Return the client's SSLContext: verified against the system's CAs (or
    cafile) with the host name checked; with a pinned fingerprint or
    --insecure, not verified here (the pin is checked after the handshake)."""
    if pinned or insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = TLS_MIN_VERSION
    return context


def server_tls_context(cert_file, key_file):
    """Return (an SSLContext for the server, its certificate's fingerprint).

    Raises OSError or ssl.SSLError when the files can't be used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_MIN_VERSION
    context.load_cert_chain(cert_file, key_file)
    with open(cert_file, encoding="ascii", errors="replace") as f:
        pem = f.read()
    end = pem.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)  # the first certificate
    der = ssl.PEM_cert_to_DER_cert(pem[pem.index(ssl.PEM_HEADER):end])
    return context, certificate_fingerprint(der)



# RESP, Redis's wire protocol: a command is an array of bulk strings; a reply
# is a simple string (+), an error (-), an integer (:), a bulk string ($, -1:
# nil) or an array (*) of replies.

class RedisError(Exception):
    """An error reply (-ERR ...), or a Redis that can't be reached or used."""


def resp_command(*args):
    """One command as RESP bytes; str and int arguments are encoded."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode(ENCODING)
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class RespReader:
    """Replies parsed from a byte stream fed in pieces. An error reply is a
    RedisError instance among the values, not raised: it answers one command.
    Parsing resumes where it stopped, so a large reply that comes in many
    reads is parsed once, not again from its start at each read."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.arrays = []                   # arrays being filled: [items still due, items]

    def feed(self, data):
        self.buf += data

    def replies(self):
        """Every whole reply fed so far (the rest waits for more bytes)."""
        out = []
        while True:
            element = self._element()
            if element is None:
                break
            kind, value = element
            if kind == "array" and value > 0:
                self.arrays.append([value, []])
                continue
            if kind == "array":
                value = [] if value == 0 else None  # *0: empty; *-1: nil
            while self.arrays:  # an element completes its array, maybe several
                array = self.arrays[-1]
                array[1].append(value)
                array[0] -= 1
                if array[0]:
                    break
                value = self.arrays.pop()[1]
            else:
                out.append(value)
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        return out

    def _element(self):
        """("array", count) or ("value", value) for the next element, or None
        until it is all here."""
        buf, pos = self.buf, self.pos
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
        after = end + 2
        if kind == b"$":
            size = int(line)
            if size < 0:
                value = None
            elif len(buf) < after + size + 2:
                return None
            else:
                value, after = bytes(buf[after:after + size]), after + size + 2
        elif kind == b"*":
            self.pos = after
            return "array", int(line)
        elif kind == b"+":
            value = line.decode(ENCODING, "replace")
        elif kind == b"-":
            value = RedisError(line.decode(ENCODING, "replace"))
        elif kind == b":":
            value = int(line)
        else:
            raise RedisError("not a Redis reply: %r" % bytes(buf[pos:end]))
        self.pos = after
        return "value", value


class RedisAddress:
    """Where a Redis is and how to get in: from redis://[:PASSWORD@]HOST:PORT[/DB]
    (rediss:// for TLS, verified against the system's CAs or SSL_CERT_FILE)."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("%r is not redis://[:PASSWORD@]HOST:PORT[/DB] "
                             "(or rediss:// for TLS)" % url)
        try:
            self.port = parts.port or REDIS_DEFAULT_PORT
            self.db = int(parts.path.strip("/") or 0)
        except ValueError:
            raise ValueError("%r: the port and the database are whole numbers" % url)
        self.host = parts.hostname
        self.tls = parts.scheme == "rediss"
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.password = urllib.parse.unquote(parts.password) if parts.password else None
        self.where = format_address((self.host, self.port)) + ("/%d" % self.db if self.db else "")

    def hello(self):
        """The commands that open a connection: the password, the database."""
        out = b""
        if self.password is not None:
            out += resp_command(*(["AUTH"] + ([self.username] if self.username else [])
                                  + [self.password]))
        if self.db:
            out += resp_command("SELECT", self.db)
        return out

    def hello_replies(self):
        return (self.password is not None) + bool(self.db)

    def open(self, timeout):
        """A connected socket (TLS for rediss://), blocking with timeout. Raises OSError."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls:
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError):
                sock.close()
                raise
        return sock


class BlockingRedis:
    """A plain Redis connection for what may wait: the check at start, and
    the worker thread's reads (history, searches). Never used on the loop."""

    def __init__(self, address, timeout=REDIS_START_TIMEOUT_S):
        self.address = address
        self.timeout = timeout
        self.sock = None
        self.reader = RespReader()

    def connect(self):
        """Connect and get in; raise RedisError saying why not, in one line."""
        where = self.address.where
        started = time.monotonic()
        try:
            self.sock = self.address.open(self.timeout)
            self.sock.settimeout(max(0.1, self.timeout - (time.monotonic() - started)))
            replies = self._round_trip(self.address.hello() + resp_command("PING"),
                                       self.address.hello_replies() + 1)
        except socket.timeout:
            self.close()
            raise RedisError("Redis at %s did not answer in %.0f s" % (where, self.timeout))
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise RedisError("cannot verify Redis at %s: %s"
                             % (where, exc.verify_message or exc.reason))
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise RedisError("cannot reach Redis at %s: %s" % (where, describe_error(exc)))
        for reply in replies:
            if isinstance(reply, RedisError):
                self.close()
                raise RedisError("Redis at %s refused us: %s" % (where, reply))
        return self

    def call(self, *args):
        """One command's reply (an error reply raised). Raises RedisError, OSError."""
        if self.sock is None:
            self.connect()
        try:
            reply = self._round_trip(resp_command(*args), 1)[0]
        except OSError:
            self.close()  # the next call connects again
            raise
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def _round_trip(self, data, count):
        self.sock.sendall(data)
        replies = []
        while len(replies) < count:
            chunk = self.sock.recv(RECV_BYTES)
            if not chunk:
                raise ConnectionResetError("Redis closed the connection")
            self.reader.feed(chunk)
            replies += self.reader.replies()
        return replies

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def detach(self):
        """The connected socket, given up (to a RedisLink)."""
        sock, self.sock = self.sock, None
        return sock


# --- Chat ---------------------------------------------------------------------
# What a line means and who gets which line: registration, commands, nicks,
# operators, bans, rooms and their history. No sockets: the chat reaches the
# loop only through the narrow interface the loop gives it (see ChatServer's
# docstring), so tests can drive it in-process.

# A connection's phase, in the order it goes through them. The line handler
# is chosen by phase (Chat.LINE_HANDLERS): a phase can't disagree with a flag.
HANDSHAKE = "handshake"   # TLS under way: the chat has not seen it yet
PASSWORD = "password"     # the room has a password: /pass before anything else
NICKNAME = "nickname"     # choosing a nickname
MEMBER = "member"         # registered, in the room
CLOSING = "closing"       # its last lines are written; what it sends is discarded
CLOSED = "closed"
LOBBY = "#lobby"          # the room (version 2 adds others)


class Connection:
    """The server's record of one client socket: what the loop needs (socket,
    buffers, read gates, timers) and what the chat needs (phase, nick, room,
    operator state)."""

    __slots__ = ("sock", "addr", "ip", "name", "phase", "nick", "key", "room", "rooms",
                 "focus", "joined", "away", "seen_people", "reader",
                 "outbuf", "tokens", "refilled", "paused", "held", "full", "counted",
                 "behind_since", "waiting", "events", "drained_at", "tls", "handshake_wait",
                 "close_at", "op", "muted", "op_attempts", "account", "login_failures", "codec",
                 "timers", "peer_done", "sent_total", "on_written", "counted_backlog",
                 "kernel_unsent", "__weakref__")

    def __init__(self, sock, addr, limits, now, codec=None):
        self.sock = sock
        self.addr = addr
        self.ip = peer_ip(addr)
        self.name = format_address(addr)   # for the log until it has a nick
        self.phase = HANDSHAKE
        self.nick = None                   # set once registered
        self.key = None                    # nick_key(nick)
        self.room = None                   # its current room, once registered (None: none)
        self.rooms = []                    # the Rooms it is in, in the order it entered them
        self.away = None                   # /away MESSAGE, until it is back
        # The loop's view, which follows the chat's in the rooms' order:
        self.joined = []                   # the Rooms whose lines it gets (FanOut)
        self.focus = None                  # the room whose lines are not marked #ROOM
        self.seen_people = None            # ids of the last lines about a person it got
        self.codec = codec or TEXT_CODEC    # how it speaks: text lines, or JSON (/format)
        self.reader = self.codec.reader(limits.max_line)
        self.outbuf = bytearray()
        # The loop's read gates: any one of them stops reading this socket.
        self.paused = False                # out of flood-control tokens
        self.held = False                  # a member is behind: input waits for it
        self.full = False                  # its own unread output is past max_sendq
        self.waiting = False               # its last command is answered off the loop
        self.tokens = float(limits.burst)  # flood control bucket
        self.refilled = now
        self.behind_since = None           # when its backlog went past max_sendq
        self.drained_at = now              # when a send last took some of its bytes
        self.tls = False                   # sock is an SSLSocket
        self.handshake_wait = 0            # while the TLS handshake runs: the event it waits for
        self.close_at = 0.0                # CLOSING: not before; None once the write side is shut
        self.peer_done = False             # the peer sent its last byte (it may still read)
        self.sent_total = 0                # bytes that have left through the socket
        self.counted_backlog = 0           # len(outbuf) in the server's backlog total
        self.kernel_unsent = None          # behind: bytes the kernel held at our last look
        self.on_written = []               # (sent_total to reach, action): see when_written
        self.op = False                    # an operator
        self.muted = False                 # its lines reach no one
        self.op_attempts = 0               # wrong /op passwords so far
        self.account = None                # the key of the account it is logged in to
        self.login_failures = 0            # wrong account passwords so far
        self.counted = False               # in the max-clients and per-IP counts
        self.events = 0                    # what the selector watches for it
        self.timers = []                   # its pending timers, cancelled when it closes


class Room:
    """One room: its name (as first given), its members by nick key, its
    topic, and its last messages for the replay on joining. Only the FanOut
    changes members, so that who gets a room's lines and in which order is
    decided in one place."""

    __slots__ = ("name", "key", "members", "people", "topic", "topic_nick", "recent")

    def __init__(self, name, topic=None, topic_nick=None, recent=(), replay=REPLAY_MESSAGES):
        self.name = name
        self.key = nick_key(name)          # room names clash as nicks do
        self.members = {}
        self.people = 0                    # connections here whose rooms it is (the chat's
                                           # view: one arriving through Redis is not a member yet)
        self.topic = topic
        self.topic_nick = topic_nick
        self.recent = collections.deque(recent, maxlen=replay)  # (id, time, nick, kind, text)


class StoreError(Exception):
    """The database can't be used: said in one line."""


NOT_ALL_ASCII = "*[^\x01-\x7f]*"  # GLOB: text with a character past ASCII


def add_fold_function(db):
    """fold(text) in SQL: str.casefold, as the search index holds text
    (so that STRASSE finds Straße, through the index as without it)."""
    try:
        db.create_function("fold", 1, str.casefold, deterministic=True)
    except sqlite3.NotSupportedError:  # an SQLite before 3.8.3
        db.create_function("fold", 1, str.casefold)


class SQLiteStore:
    """What the chat keeps beyond one connection, in one SQLite file (or
    `:memory:`): every message and action, the rooms with their spelling and
    topic, and the bans. Version 2's Redis store stands beside it with the
    same methods.

    Writes are batched: append() only queues a message (its id is given at
    once), and flush() writes what is queued in one transaction. The loop
    flushes before it writes any broadcast to a socket, so a line that has
    been relayed is in the file, even if the process is killed right after.
    """

    SCHEMA_VERSION = 4  # 1: rooms, messages, bans; 2: the search index; 3: accounts;
    #                     4: the index holds case-folded text (made again from version 2 or 3)
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS rooms (key TEXT PRIMARY KEY, name TEXT NOT NULL,"
        " topic TEXT, topic_nick TEXT)",
        "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, room TEXT NOT NULL,"
        " time REAL NOT NULL, nick TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id)",
        "CREATE TABLE IF NOT EXISTS bans (ip TEXT PRIMARY KEY, nick TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT OR IGNORE INTO meta VALUES ('indexed_upto', 0)",
        "INSERT OR IGNORE INTO meta VALUES ('ids_reserved', 0)",
        "CREATE TABLE IF NOT EXISTS accounts (key TEXT PRIMARY KEY, nick TEXT NOT NULL,"
        " hash TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS mailbox (id INTEGER PRIMARY KEY, account TEXT NOT NULL,"
        " time REAL NOT NULL, sender TEXT NOT NULL, text TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS mailbox_by_account ON mailbox (account, id)",
    )
    # /search on a file: trigrams of every message's text, without the text
    # itself. Kept up by the worker thread (index_some()), never by the loop;
    # what it has not reached yet is searched row by row. Where SQLite has no
    # FTS5 trigram tokenizer (before 3.34), every search reads row by row.
    SEARCH_INDEX = ("CREATE VIRTUAL TABLE IF NOT EXISTS search USING"
                    " fts5(text, content='', tokenize='trigram')")
    # What SCHEMA makes: a table of these names with other columns is another
    # program's (CREATE TABLE IF NOT EXISTS would keep it, and fail later).
    COLUMNS = {"rooms": ["key", "name", "topic", "topic_nick"],
               "messages": ["id", "room", "time", "nick", "kind", "text"],
               "bans": ["ip", "nick"], "meta": ["key", "value"],
               "accounts": ["key", "nick", "hash"],
               "mailbox": ["id", "account", "time", "sender", "text"]}

    def __init__(self, path=":memory:", keep=KEEP_MESSAGES, exclusive=False):
        self.path = path
        self.lock_fd = None                # exclusive: held while this server runs
        self.file_id = None                # (device, inode) of the file, to notice it gone
        self.keep = keep                   # messages kept per room; 0: all
        self.batch = []                    # (id, room key, time, nick, kind, text) not yet written
        self.appended = {}                 # room key -> messages since its last trim
        self.failure = None                # why the last flush failed
        self._readers = threading.local()  # reader(): one view per thread
        self.stored = self.transactions = 0  # what flush() wrote, for the log
        self.write_s = 0.0
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            add_fold_function(self.db)
            if exclusive:
                self._lock()
            self._open()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(describe_error(exc))
        except StoreError:
            self.close()
            raise

    def _lock(self):
        """One server per file: two would hand out the same ids (and fail on
        every message). A lock of our own, flock, beside SQLite's (fcntl
        locks, which it takes and drops as it writes); `chat.py account` takes
        none, so an administrator can work on the file of a running server.
        The descriptor stays open until close(): closing any descriptor of
        the file would drop SQLite's own locks."""
        if fcntl is None or self.path == ":memory:":
            return
        self.lock_fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError("another chat.py server is using it (one file, one server: give "
                             "this one its own --db; several servers are one chat with --redis)")

    def _open(self):
        """Check the file, make or migrate its schema, and find the next id."""
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > self.SCHEMA_VERSION:
            raise StoreError("its schema is version %d, newer than this chat.py's %d"
                             % (version, self.SCHEMA_VERSION))
        if self.path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses nothing
        db.execute("PRAGMA busy_timeout=%d" % (BUSY_TIMEOUT_S * 1000))  # the worker's writes
        damage = [row[0] for row in db.execute("PRAGMA quick_check")]
        if damage != ["ok"]:
            said = [line.strip() for line in damage[0].split("\n")
                    if line.strip() and not line.startswith("***")]
            raise StoreError("the file is damaged (%s): restore it from a backup, or start "
                             "afresh with another --db" % (said or damage)[0])
        db.execute("BEGIN IMMEDIATE")  # fails at once on a read-only file
        for statement in self.SCHEMA:
            db.execute(statement)
        for table, columns in self.COLUMNS.items():
            found = [row[1] for row in db.execute("PRAGMA table_info(%s)" % table)]
            if found != columns:
                db.execute("ROLLBACK")
                raise StoreError("its table %s is not chat.py's (columns %s): another "
                                 "program's database? Give chat.py its own --db"
                                 % (table, ", ".join(found)))
        if 2 <= version < 4:  # an index of text as it was said: made again, folded
            db.execute("DROP TABLE IF EXISTS search")
            db.execute("UPDATE meta SET value = 0 WHERE key = 'indexed_upto'")
        self.indexed = self.path != ":memory:" and self._make_search_index()
        db.execute("PRAGMA user_version=%d" % self.SCHEMA_VERSION)
        newest = db.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0
        reserved = db.execute("SELECT value FROM meta WHERE key = 'ids_reserved'").fetchone()[0]
        self.next_id = max(newest, reserved) + 1
        ceiling = self._reserve_ids()
        db.execute("COMMIT")
        self.ids_reserved = ceiling
        if self.path != ":memory:":
            stat = os.stat(self.path)
            self.file_id = (stat.st_dev, stat.st_ino)

    def _make_search_index(self):
        """Make the search index where SQLite can; tell whether there is one."""
        try:
            self.db.execute(self.SEARCH_INDEX)
            return True
        except sqlite3.OperationalError:  # no FTS5, or no trigram tokenizer
            return False

    def close(self):
        if getattr(self, "db", None) is not None:
            self.db.close()
        if self.lock_fd is not None:  # after the database: see _lock()
            os.close(self.lock_fd)
            self.lock_fd = None

    @property
    def reads_apart(self):
        """Whether other threads can read it with connections of their own
        (a file can; `:memory:` is this connection's alone)."""
        return self.path != ":memory:"

    def close_reader(self):
        """Close the calling thread's views (reader() and the index's)."""
        for view in list(self._readers.__dict__.values()):
            view.db.close()
        self._readers.__dict__.clear()

    def reader(self):
        """A read-only view of the same file for the calling thread (made
        once per thread): WAL lets it read while the loop writes."""
        return self._thread_view("reader", writable=False)

    def _thread_view(self, name, writable):
        local = self._readers.__dict__
        if name not in local:
            view = object.__new__(SQLiteStore)
            view.path, view.batch, view.indexed = self.path, [], self.indexed
            uri = "file:%s?mode=%s" % (urllib.parse.quote(self.path), "rw" if writable else "ro")
            view.db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                      check_same_thread=False)
            view.db.execute("PRAGMA busy_timeout=%d" % (BUSY_TIMEOUT_S * 1000))
            add_fold_function(view.db)
            local[name] = view
        return local[name]

    # -- messages --

    def append(self, room, nick, kind, text, when):
        """Queue a message of room (its key); return its id."""
        message_id = self.next_id
        self.next_id += 1
        self.batch.append((message_id, room, when, nick, kind, text))
        self.appended[room] = self.appended.get(room, 0) + 1
        return message_id

    def flush(self):
        """Write the queued messages in one transaction; on failure return
        them (and forget them: they were relayed, not stored), else []."""
        if not self.batch:
            return []
        batch, self.batch = self.batch, []
        if self._file_gone():
            self.failure = ("the database file %s was deleted or replaced while the server "
                            "ran" % self.path)
            return batch
        started = time.perf_counter()
        try:
            self.db.execute("BEGIN IMMEDIATE")  # waits out a write of the worker's
            self.db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", batch)
            self._trim()
            ceiling = (self._reserve_ids() if self.next_id > self.ids_reserved - ID_BLOCK // 2
                       else self.ids_reserved)
            self.db.execute("COMMIT")
            self.ids_reserved = ceiling  # (only once it is in the file)
        except sqlite3.Error as exc:
            self._rollback()
            self.failure = describe_error(exc)
            return batch
        self.stored += len(batch)
        self.transactions += 1
        self.write_s += time.perf_counter() - started
        return []

    def _reserve_ids(self):
        """Ids never go back: messages that were relayed but not stored (a
        full disk) had ids, which a restart must not hand out again. So the
        file keeps a ceiling ahead of the ids in use, and a restart starts
        above it (a gap of up to ID_BLOCK ids; a message is its id, not its
        place). Called inside a transaction; returns the new ceiling."""
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'ids_reserved'",
                        (self.next_id + ID_BLOCK,))
        return self.next_id + ID_BLOCK

    def _file_gone(self):
        """Whether the file we write is no longer the one at path (deleted,
        or another put in its place): SQLite writes on into the unlinked
        file, and all of it would be lost at the restart."""
        if self.file_id is None:
            return False
        try:
            stat = os.stat(self.path)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self.file_id

    def usage(self):
        """What the store cost, in a line for the log."""
        return ("%s stored in %s, %.3f s writing"
                % (plural(self.stored, "message"), plural(self.transactions, "transaction"),
                   self.write_s))

    def _trim(self):
        """Keep the newest `keep` messages of each room that grew by
        TRIM_EVERY since it was last trimmed."""
        if not self.keep:
            return
        for room, count in list(self.appended.items()):
            if count < min(TRIM_EVERY, self.keep):
                continue
            self.appended[room] = 0
            old = ("FROM messages WHERE room = ? AND id <= (SELECT id FROM messages"
                   " WHERE room = ? ORDER BY id DESC LIMIT 1 OFFSET ?)")
            if self.indexed:  # out of the index first: it needs their text to forget them
                self.db.execute(
                    "INSERT INTO search (search, rowid, text) SELECT 'delete', id, fold(text) "
                    + old + " AND id <= (SELECT value FROM meta WHERE key = 'indexed_upto')",
                    (room, room, self.keep))
            self.db.execute("DELETE " + old, (room, room, self.keep))

    def _rollback(self):
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction was open

    def recent(self, room, count):
        """The last count messages of room, oldest first: (id, time, nick,
        kind, text). Of what is written: flush() first."""
        rows = self.db.execute(
            "SELECT id, time, nick, kind, text FROM messages WHERE room = ?"
            " ORDER BY id DESC LIMIT ?", (room, count)).fetchall()
        return rows[::-1]

    def after(self, room, after, count):
        """The oldest count messages of room with ids above after, oldest first."""
        return self.db.execute(
            "SELECT id, time, nick, kind, text FROM messages WHERE room = ? AND id > ?"
            " ORDER BY id LIMIT ?", (room, after, count)).fetchall()

    def window(self, room, low, high, count, newest):
        """At most count messages of room with ids above low and below high
        (None: no bound), oldest first: the newest of them, or the oldest."""
        if count <= 0:
            return []
        rows = self.db.execute(
            "SELECT id, time, nick, kind, text FROM messages WHERE room = ? AND id > ?"
            " AND id < ? ORDER BY id %s LIMIT ?" % ("DESC" if newest else ""),
            (room, low, MAX_MESSAGE_ID if high is None else high, count)).fetchall()
        return rows[::-1] if newest else rows

    def id_before(self, room, when):
        """The id of room's newest message said before when (0: none): read
        newest first, as the times asked for are mostly recent ones."""
        row = self.db.execute("SELECT id FROM messages WHERE room = ? AND time < ?"
                              " ORDER BY id DESC LIMIT 1", (room, when)).fetchone()
        return row[0] if row else 0

    def search(self, room, text, count):
        """The last count messages of room whose text contains text, in any
        case, oldest first. Of what is written: flush() first."""
        needle = text.casefold()
        self.db.execute("BEGIN")  # one snapshot: the index and the rows agree
        try:
            upto = 0
            if self.indexed and len(needle) >= 3:  # a trigram index finds 3 characters
                upto = self.db.execute(
                    "SELECT value FROM meta WHERE key = 'indexed_upto'").fetchone()[0]
            found = self._scan(room, needle, upto, count)
            if len(found) < count and upto:
                found += self._indexed(room, text, needle, upto, count - len(found))
        finally:
            self.db.execute("COMMIT")
        return found[::-1]

    def _scan(self, room, needle, after, count):
        """Newest first, row by row: the messages with ids above after."""
        query = ("SELECT id, time, nick, kind, text FROM messages WHERE room = ? AND id > ?%s"
                 " ORDER BY id DESC")
        if needle.isascii():
            # LIKE ignores ASCII case itself: the database filters the rows
            # that are all ASCII. One with any other character is left to
            # _matching: folded, it may match (Straße holds "strasse").
            pattern = "%" + re.sub(r"([%_\\])", r"\\\1", needle) + "%"
            rows = self.db.execute(
                query % " AND (text LIKE ? ESCAPE '\\' OR text GLOB ?)",
                (room, after, pattern, NOT_ALL_ASCII))
        else:
            rows = self.db.execute(query % "", (room, after))
        return self._matching(rows, needle, count)

    def _indexed(self, room, text, needle, upto, count):
        """Newest first, through the index: the messages with ids up to upto."""
        phrase = '"%s"' % needle.replace('"', '""')  # as indexed: case-folded
        ids = self.db.execute("SELECT rowid FROM search WHERE search MATCH ? AND rowid <= ?"
                              " ORDER BY rowid DESC", (phrase, upto))
        rows = (self.db.execute("SELECT id, time, nick, kind, text FROM messages"
                                " WHERE id = ? AND room = ?", (found_id, room)).fetchone()
                for (found_id,) in ids)
        return self._matching((row for row in rows if row), needle, count)

    @staticmethod
    def _matching(rows, needle, count):
        found = []
        for row in rows:
            if needle in row[4].casefold():
                found.append(row)
                if len(found) == count:
                    break
        return found

    def index_some(self, most=INDEX_BATCH):
        """In the worker thread, with a connection of its own: add up to most
        messages to the search index; return whether more wait."""
        db = self._thread_view("maintainer", writable=True).db
        db.execute("BEGIN IMMEDIATE")
        try:
            upto = db.execute("SELECT value FROM meta WHERE key = 'indexed_upto'").fetchone()[0]
            rows = db.execute("SELECT id, text FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                              (upto, most)).fetchall()
            if rows:
                db.executemany("INSERT INTO search (rowid, text) VALUES (?, ?)",
                               [(row_id, text.casefold()) for row_id, text in rows])
                db.execute("UPDATE meta SET value = ? WHERE key = 'indexed_upto'",
                           (rows[-1][0],))
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise
        return len(rows) == most

    # -- rooms and topics --

    def room(self, key):
        """(name as first given, topic, who set it) of a room, or None."""
        return self.db.execute("SELECT name, topic, topic_nick FROM rooms WHERE key = ?",
                               (key,)).fetchone()

    def add_room(self, key, name):
        self._write("INSERT OR IGNORE INTO rooms (key, name) VALUES (?, ?)", (key, name))

    def set_topic(self, key, text, nick):
        self._write("UPDATE rooms SET topic = ?, topic_nick = ? WHERE key = ?",
                    (text, nick, key))

    # -- accounts and their mailboxes --

    def account(self, key):
        """(nick as registered, password hash) of an account, or None."""
        return self.db.execute("SELECT nick, hash FROM accounts WHERE key = ?",
                               (key,)).fetchone()

    def account_nicks(self):
        """Every account's nick, for chat.py account list."""
        return [row[0] for row in self.db.execute("SELECT nick FROM accounts ORDER BY key")]

    def add_account(self, key, nick, password_hash):
        """Make an account; return False if the nick is one already."""
        return self._write("INSERT OR IGNORE INTO accounts VALUES (?, ?, ?)",
                           (key, nick, password_hash)) > 0

    def set_password(self, key, password_hash):
        self._write("UPDATE accounts SET hash = ? WHERE key = ?", (password_hash, key))

    def remove_account(self, key):
        """Delete an account and the messages waiting for it."""
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM mailbox WHERE account = ?", (key,))
                self.db.execute("DELETE FROM accounts WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            raise StoreError(describe_error(exc))

    def mail(self, key, sender, text, when):
        """Keep a private message for an account; return False if its
        mailbox is full."""
        waiting = self.db.execute("SELECT COUNT(*) FROM mailbox WHERE account = ?",
                                  (key,)).fetchone()[0]
        if waiting >= MAILBOX_MESSAGES:
            return False
        self._write("INSERT INTO mailbox (account, time, sender, text) VALUES (?, ?, ?, ?)",
                    (key, when, sender, text))
        return True

    def read_mail(self, key):
        """The messages waiting for an account, oldest first: (id, time,
        sender, text). They stay until drop_mail(): only what reached the
        account's connection is deleted."""
        return self.db.execute("SELECT id, time, sender, text FROM mailbox WHERE account = ?"
                               " ORDER BY id", (key,)).fetchall()

    def drop_mail(self, key, rows):
        """Delete messages read_mail() gave (they were written to the account)."""
        self._write("DELETE FROM mailbox WHERE account = ? AND id <= ?", (key, rows[-1][0]))

    # -- bans --

    def add_ban(self, ip, nick):
        self._write("INSERT OR REPLACE INTO bans VALUES (?, ?)", (ip, nick))

    def remove_ban(self, ip):
        """Unban ip; return whether it was banned."""
        return self._write("DELETE FROM bans WHERE ip = ?", (ip,)) > 0

    def is_banned(self, ip):
        return self.db.execute("SELECT 1 FROM bans WHERE ip = ?", (ip,)).fetchone() is not None

    def bans(self):
        """[(ip, nick)], sorted by address."""
        return self.db.execute("SELECT ip, nick FROM bans ORDER BY ip").fetchall()

    def _write(self, statement, args):
        """One statement in its own transaction; return the rows it changed.
        Raises StoreError."""
        try:
            return self.db.execute(statement, args).rowcount
        except sqlite3.Error as exc:
            raise StoreError(describe_error(exc))


class GuessLimit:
    """What guessing secrets (the room's password, the operators', an
    account's) costs an address: its guesses are checked one at a time,
    GUESS_INTERVAL_S apart, however many connections it opens; past
    WRONG_GUESSES_PER_MINUTE wrong ones in a minute, the next are refused
    unchecked until the minute is over. (Whoever shares the address, behind
    one NAT, shares the count.)"""

    WINDOW_S = 60.0

    def __init__(self):
        self.by_ip = {}                    # ip -> [next turn, window start, wrong in it]

    def turn(self, ip, now=None):
        """Seconds until ip's next guess may be checked (its place in line)."""
        now = time.monotonic() if now is None else now
        state = self.by_ip.get(ip)
        if state is None:
            if len(self.by_ip) >= GUESS_ADDRESSES:
                self._forget_old(now)
            state = self.by_ip[ip] = [now, now, 0]
        at = max(now, state[0])
        state[0] = at + GUESS_INTERVAL_S
        return at - now

    def spent(self, ip, now=None):
        """Whether ip's wrong guesses this minute are all used up."""
        now = time.monotonic() if now is None else now
        state = self.by_ip.get(ip)
        if state is None:
            return False
        if now - state[1] >= self.WINDOW_S:
            state[1], state[2] = now, 0
        return state[2] >= WRONG_GUESSES_PER_MINUTE

    def wrong(self, ip):
        state = self.by_ip.get(ip)
        if state is not None:
            state[2] += 1

    def _forget_old(self, now):
        """Keep the table small: addresses quiet for a window are forgotten."""
        for ip in [ip for ip, (turn, start, _) in self.by_ip.items()
                   if now - max(turn, start) >= self.WINDOW_S]:
            del self.by_ip[ip]


class LocalNetwork:
    """The network, for a chat of one server: what Chat asks of the other
    servers (RedisNetwork, with --redis) has a plain answer here. Nobody is
    elsewhere, a free nick is claimed at once, a room and its history come
    from the store, and every answer comes before the call returns."""

    down = False                           # (it can't go away)

    def __init__(self, store, replay=REPLAY_MESSAGES, log=log_to_stderr):
        self.store = store
        self.replay = replay
        self.log = log                     # for a store that fails
        self.elsewhere = {}                # the other servers' users: none

    # -- who is where --

    def claim(self, key, user, answer, force=False):
        answer(False, None)  # free here (Chat checked) is free

    def release(self, key):
        pass

    def place(self, conn):
        pass

    def in_room(self, room_key):
        return []

    def room_counts(self):
        return {}

    def tell(self, kind, **fields):
        pass

    def take_over(self, key):
        """A login takes key over from another server: never here."""
        return False

    def moderate_elsewhere(self, key, **fields):
        """An operator acts on a user of another server: never here."""
        return False

    # -- rooms and their history --

    def open_room(self, key, name, before_reading):
        """The Room for key, from the store (made there if new);
        before_reading() first stores what this pass said."""
        try:
            stored = self.store.room(key)
            if stored is None:
                self.store.add_room(key, name)
        except (StoreError, sqlite3.Error) as exc:
            self.log("database error: %s" % describe_error(exc))
            stored = None
        before_reading()  # its history must include what this pass said
        recent = self.store.recent(key, self.replay) if self.replay else ()
        return Room(*(stored or (name, None, None)), recent=recent, replay=self.replay)

    def known_name(self, key, name):
        """A room's name as first given (name for a new one)."""
        try:
            stored = self.store.room(key)
        except (StoreError, sqlite3.Error):
            stored = None
        return stored[0] if stored else name

    def when_watched(self, key, callback):
        callback()  # its last messages were read with it

    def unwatch(self, key):
        pass

    def keep_topic(self, key, text, nick):
        pass  # (the chat stores it)

    def stamp(self, room, kind, nick, text, when):
        """Store a message now; return its id (several servers: the feed
        gives it, and this returns None)."""
        message_id = self.store.append(room.key, nick, kind, text, when)
        room.recent.append((message_id, when, nick, kind, text))
        return message_id

    def history_reader(self):
        """What reads history off the loop (None: read it on the loop)."""
        return self.store.reader if self.store.reads_apart else None

    def close_reader(self):
        """(The store's readers are the store's to close.)"""

    # -- mailboxes --

    def mail(self, key, sender, text, when, answer):
        """Keep a private message for an account: answer(kept?), or the
        StoreError that kept it from being stored."""
        try:
            kept = self.store.mail(key, sender, text, when)
        except StoreError as exc:
            kept = exc
        answer(kept)

    def read_mail(self, key, answer):
        try:
            rows = self.store.read_mail(key)
        except (StoreError, sqlite3.Error) as exc:
            self.log("database error: %s" % describe_error(exc))
            rows = []
        answer(rows)

    def drop_mail(self, key, rows):
        self.store.drop_mail(key, rows)


class RoomCommands:
    """Part of Chat: rooms and their history. A member is in rooms (0 to
    --max-joined), one of them current; /join, /open and /part move it,
    /who, /rooms, /topic, /history and /search read them (docs/protocol.md,
    "Rooms" and "Several rooms at once")."""

    def _cmd_who(self, conn, arg):
        if arg:
            name = room_name(arg)
            problem = room_problem(name)
            if problem:
                self.io.send(conn, problem)
                return
            room = self.rooms.get(nick_key(name))
            if room is None:  # nobody is in it here (maybe elsewhere)
                room = Room(self._known_name(name))
        else:
            room = self._current(conn)
            if room is None:
                return
        keyed = [(m.key, (m.nick, m.op, m.away is not None)) for m in room.members.values()]
        keyed += [(nick_key(member[0]), member) for member in self.network.in_room(room.key)]
        keyed.sort(key=lambda item: item[0])  # (by the keys it has: a big room's /who,
        here = [member for _, member in keyed]  # an IRC JOIN's names, is not slow)
        nicks = [("@" if op else "") + nick + (AWAY_MARK if away else "")
                 for nick, op, away in here]
        line = format_line("who", count=len(nicks), room=room.name, nicks=", ".join(nicks))
        self.io.send(conn, Line(line.rstrip(), "who", line.fields).having(members=here))

    # -- rooms, topics, history --

    def _room(self, name):
        """The Room called name (as nicks clash), from memory, the store, or new."""
        key = nick_key(name)
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = self.network.open_room(key, name, self.commit)
        return room

    def _known_name(self, name):
        """A room's name as it was first given (name, for a new room)."""
        return self.network.known_name(nick_key(name), name)

    def forget_if_empty(self, room):
        """A room nobody is in need not be kept in memory (the store keeps it)."""
        if not room.members and not room.people and room is not self.lobby:
            self.rooms.pop(room.key, None)
            self.network.unwatch(room.key)

    def _welcome(self, conn, room):
        """Just in room: its topic, then its last messages (IRC: and its names)."""
        if conn.codec.per_member:
            self._cmd_who(conn, room.name)
        if room.topic is not None:
            self.io.send(conn, format_line("topic", room=room.name, text=room.topic,
                                           nick=room.topic_nick))
        if room.recent and conn.codec.replays(conn):
            self._history_block(conn, room, format_line(
                "history_last", messages=plural(len(room.recent), "message"), room=room.name),
                room.recent)

    def _history_block(self, conn, room, header, rows):
        """A header, the messages, the end (in JSON: the messages, marked as
        history, and history_end with their count)."""
        self.io.send(conn, header)
        for row in rows:
            self.io.send(conn, history_line(row, room.name))
        self.io.send(conn, format_line("history_end").having(room=room.name, count=len(rows)))

    def _cmd_chathistory(self, conn, arg):
        """IRC's CHATHISTORY SUBCOMMAND TARGET REFERENCE [REFERENCE] LIMIT
        (draft/chathistory): one batch of a room's messages, oldest first.
        A nick's is empty: private messages are not kept."""
        words = arg.split()
        sub = words[0].upper() if words else "*"
        wanted = 5 if sub == "BETWEEN" else 4
        if sub not in CHATHISTORY_SUBCOMMANDS and words:
            self.io.send(conn, irc_fail("CHATHISTORY", "UNKNOWN_COMMAND", sub, "Unknown command"))
            return
        if len(words) < wanted:
            self.io.send(conn, irc_fail("CHATHISTORY", "NEED_MORE_PARAMS", sub,
                                        "Missing parameters"))
            return
        target, limit = words[1], decimal_number(words[wanted - 1], MAX_MESSAGE_ID)
        refs = [None if word == "*" and sub == "LATEST" else chathistory_ref(word)
                for word in words[2:wanted - 1]]
        if not limit or any(ref is None and not (word == "*" and sub == "LATEST")
                            for ref, word in zip(refs, words[2:])):
            self.io.send(conn, irc_fail("CHATHISTORY", "INVALID_PARAMS", sub,
                                        "Invalid reference or limit"))
            return
        if not target.startswith("#"):
            self.io.send(conn, irc_line("chathistory", target=target, rows=()))
            return
        room = self._one_of_its_rooms(conn, target)
        if room is None:
            self.io.send(conn, irc_fail("CHATHISTORY", "INVALID_TARGET", sub + " " + target,
                                        "You are not in that channel"))
            return
        limit = min(limit, HISTORY_MAX)
        self._read_history(
            conn, lambda store: chathistory_rows(store, room.key, sub, refs, limit),
            lambda rows: self.io.send(conn, irc_line("chathistory", target=room.name,
                                                     rows=rows)))

    def _room_named(self, conn, arg, command):
        """The name of the room arg names (#rust, or rust), or None after
        telling conn why not."""
        if not arg:
            self.io.send(conn, usage(command))
            return None
        name = room_name(arg)
        problem = room_problem(name)
        if problem:
            self.io.send(conn, problem)
            return None
        return name

    def _cmd_join(self, conn, arg):
        """Leave the current room for another (v2's one room at a time)."""
        name = self._room_named(conn, arg, "join")
        if name is None:
            return
        old = conn.room
        if old is not None and nick_key(name) == old.key:
            self.io.send(conn, error("already_in_room", room=old.name))
            return
        other = self._one_of_its_rooms(conn, name)
        room = other or self._room(name)
        if old is not None:
            self._leave_room(conn, old, LEFT_WENT_TO.format(room=room.name))
        if other is not None:  # in it already: it only becomes current
            self._talk_in(conn, other)
        else:
            self._enter(conn, room)

    def _cmd_open(self, conn, arg):
        """Enter a room and stay in the others; it becomes current."""
        name = self._room_named(conn, arg, "open")
        if name is None:
            return
        room = self._one_of_its_rooms(conn, name)
        if room is not None:
            self._talk_in(conn, room)
        elif len(conn.rooms) >= self.limits.max_joined:
            self.io.send(conn, error("too_many_rooms", rooms=plural(len(conn.rooms), "room")))
        else:
            self._enter(conn, self._room(name))

    def _cmd_part(self, conn, arg):
        """Leave a room (the current one if none is named)."""
        if arg:
            problem = room_problem(room_name(arg))
            room = None if problem else self._one_of_its_rooms(conn, arg)
            if room is None:
                self.io.send(conn, problem or error("not_in_room", room=room_name(arg)))
                return
        else:
            room = self._current(conn)
            if room is None:
                return
        self._leave_room(conn, room, LEFT_PARTED)
        if conn.room is None:
            self._place(conn)
            self.io.focus(conn, None)
            self.io.send(conn, format_line("no_room"))
        else:
            self._talk_in(conn, conn.room)

    def _talk_in(self, conn, room):
        """room, one of conn's, is its current room now: conn is told."""
        conn.room = room
        self._place(conn)
        self.io.focus(conn, room)
        self.io.send(conn, format_line("talking_in", room=room.name))

    def _leave_room(self, conn, room, reason):
        """conn leaves one room, whose members are told why (conn too, when
        it parted); the current room becomes the one entered most recently."""
        if reason == LEFT_PARTED:  # said before it leaves: it sees its own part
            self.io.broadcast(room, format_line("left", nick=conn.nick, reason=reason)
                              .having(room=room.name))
            self.io.leave(room, conn)
        else:
            self.io.leave(room, conn)
            self.io.broadcast(room, format_line("left", nick=conn.nick, reason=reason)
                              .having(room=room.name))
        conn.rooms.remove(room)
        room.people -= 1
        if conn.room is room:
            conn.room = conn.rooms[-1] if conn.rooms else None
        self.forget_if_empty(room)

    def _enter(self, conn, room):
        """conn enters a room it is not in; it becomes current."""
        here = room.people + 1 + len(self.network.in_room(room.key))
        self._arrive(conn, room, format_line("joined_room", nick=conn.nick, room=room.name,
                                             count=here))

    def _cmd_rooms(self, conn, arg):
        counts = {room.key: [room.name, len(room.members)] for room in self.rooms.values()
                  if room.members}
        for key, (name, count) in self.network.room_counts().items():
            counts.setdefault(key, [name, 0])[1] += count
        rooms = sorted(counts.items(), key=lambda item: (-item[1][1], item[0]))
        self.io.send(conn, format_line(
            "rooms", count=self.online(), rooms=plural(len(rooms), "room"),
            list=", ".join("%s (%d)" % (name, count) for _, (name, count) in rooms)))

    def _cmd_topic(self, conn, arg):
        room = self._current(conn)
        if room is None:
            return
        if not arg:
            if room.topic is None:
                self.io.send(conn, format_line("no_topic", room=room.name))
            else:
                self.io.send(conn, format_line("topic", room=room.name, text=room.topic,
                                               nick=room.topic_nick))
            return
        if not self._allowed_to_speak(conn):
            return
        if arg == "-":
            room.topic = room.topic_nick = None
            line = format_line("topic_cleared", nick=conn.nick)
        else:
            room.topic, room.topic_nick = arg, conn.nick
            line = format_line("topic_set", nick=conn.nick, text=arg)
        self.network.keep_topic(room.key, room.topic, room.topic_nick)
        self.io.broadcast(room, line.having(room=room.name))
        self._store_or_tell(conn, "topic", self.store.set_topic, room.key, room.topic,
                            room.topic_nick)

    def _cmd_history(self, conn, arg):
        """/history [#ROOM] [N], /history [#ROOM] after ID."""
        words = arg.split()
        if words and words[0].startswith("#"):  # one of its rooms, current or not
            room = self._one_of_its_rooms(conn, words[0])
            if room is None:
                self.io.send(conn, error("not_in_room", room=room_name(words[0])))
                return
            words = words[1:]
        else:
            room = self._current(conn)
            if room is None:
                return
        if words and words[0].lower() == "after":
            self._history_after(conn, room, words[1:])
            return
        count = HISTORY_DEFAULT if not words else (
            decimal_number(words[0], HISTORY_MAX) if len(words) == 1 else None)
        if count is None or not 1 <= count <= HISTORY_MAX:
            self.io.send(conn, usage("history"))
            return

        def answer(rows):
            if not rows:
                self.io.send(conn, format_line("no_history", room=room.name))
            else:
                self._history_block(conn, room, format_line(
                    "history_last", messages=plural(len(rows), "message"), room=room.name),
                    rows)
        self._read_history(conn, lambda store: store.recent(room.key, count), answer)

    def _history_after(self, conn, room, rest):
        """/history after ID: the oldest HISTORY_MAX messages after ID."""
        after = decimal_number(rest[0] if len(rest) == 1 else "", MAX_MESSAGE_ID)
        if after is None:
            self.io.send(conn, error("usage", form="/history after ID"))
            return

        def answer(rows):
            if not rows:
                self.io.send(conn, format_line("no_history_after", room=room.name, after=after))
            else:
                self._history_block(conn, room, format_line(
                    "history_after", messages=plural(len(rows), "message"), room=room.name,
                    after=after), rows)
        self._read_history(conn, lambda store: store.after(room.key, after, HISTORY_MAX),
                           answer)

    def _read_history(self, conn, read, answer, lane=LANE_READS):
        """Read what is stored (all that was relayed: committed first), off
        the loop where the store can (a file: a long history can take a
        while), and answer conn with it."""
        self.commit()
        reader = self.network.history_reader()
        if reader is None:  # (one server whose store reads as fast here)
            answer(read(self.store))
            return

        def answered(result):
            if isinstance(result, Exception):
                self.io.send(conn, error("history_unreadable", why=describe_error(result)))
            else:
                answer(result)
        self.io.off_loop(conn, lambda: read(reader()), answered, lane)

    def _cmd_search(self, conn, arg):
        if not arg:
            self.io.send(conn, usage("search"))
            return
        room = self._current(conn)
        if room is None:
            return

        def answer(rows):
            if not rows:
                self.io.send(conn, format_line("no_match", room=room.name, text=arg))
            else:
                self._history_block(conn, room, format_line(
                    "history_search", messages=plural(len(rows), "message"),
                    room=room.name, text=arg), rows)
        self._read_history(conn, lambda store: store.search(room.key, arg, SEARCH_RESULTS),
                           answer, LANE_SEARCH)


class AccountCommands:
    """Part of Chat: accounts and the mailboxes of offline messages, and
    the pacing of every guess at a secret (docs/protocol.md, "Accounts")."""

    def _account(self, key):
        """(nick, hash) of an account, or None; a store that fails is logged."""
        try:
            return self.store.account(key)
        except sqlite3.Error as exc:
            self.io.log("database error: %s" % describe_error(exc), always=True)
            return None

    def _mail(self, conn, target_nick, text):
        """A private message to someone offline: kept if they have an account."""
        key = nick_key(target_nick)
        account = self._account(key)
        if account is None:
            self.io.send(conn, error("no_such_user", nick=target_nick))
            return
        if not self._allowed_to_speak(conn):
            return
        nick = account[0]

        def answer(kept):
            if kept is None:
                self.io.send(conn, error("network_down"))
            elif isinstance(kept, Exception):
                self.io.send(conn, error("message_not_stored", why=kept))
            elif not kept:
                self.io.send(conn, error("mailbox_full", nick=nick))
            else:
                self.io.send(conn, format_line("private_echo", nick=nick, text=text).having(
                    **{"from": conn.nick}))
                self.io.send(conn, notice(OFFLINE_KEPT.format(nick=nick)))
        self._ask_network(conn, lambda answered: self.network.mail(
            key, conn.nick, text, time.time(), answered), answer)

    # -- accounts (docs/protocol.md, "Accounts") --

    def _cmd_register(self, conn, arg):
        if not arg:
            self.io.send(conn, usage("register"))
        elif conn.account == conn.key:
            self.io.send(conn, error("already_logged_in", nick=conn.nick))
        elif len(arg) < MIN_PASSWORD_CHARS:
            self.io.send(conn, error("password_too_short"))
        else:
            nick, key = conn.nick, conn.key

            def hashed(password_hash):
                if isinstance(password_hash, Exception) or conn.key != key:
                    self.io.send(conn, error("account_not_made", nick=nick))
                    return
                try:
                    made = self.store.add_account(key, nick, password_hash)
                except StoreError as exc:
                    self.io.send(conn, error("account_not_stored", nick=nick, why=exc))
                    return
                if not made:
                    self.io.send(conn, error("nick_registered", nick=nick))
                    return
                conn.account = key
                self.io.log("%s registered an account" % nick)
                self.io.send(conn, notice(ACCOUNT_MADE.format(nick=nick)))
                self._op_if_listed(conn)
            self.io.off_loop(conn, lambda: hash_password(arg), hashed, LANE_SECRETS)

    def _cmd_login(self, conn, arg):
        parts = arg.split(None, 1)
        if len(parts) < 2:
            self.io.send(conn, usage("login"))
            return
        key = nick_key(parts[0])
        if conn.account == key and conn.key == key:
            self.io.send(conn, error("already_logged_in", nick=conn.nick))
            return
        account = self._account(key)
        self._check_account(conn, account, parts[1],
                            lambda: self._logged_in(conn, key, account[0]), login=True)

    def _check_account(self, conn, account, password, then, login=False):
        """Check password against account (None: no such account) off the
        loop, in the address's turn; then() if right, else the wrong-password
        answer a second later."""
        self._paced(conn, lambda: self._check_account_now(conn, account, password, then,
                                                          login))

    def _check_account_now(self, conn, account, password, then, login):
        def check():  # in the worker thread
            return password_matches(password, account[1] if account is not None
                                    else self._decoy_hash())

        def checked(right):
            # The account as it is now: /unregister or /password may have
            # changed it while the password was checked against what it was.
            if right is True and account is not None and self._account(
                    nick_key(account[0])) == account:
                then()
            else:
                self._wrong_password(conn, "wrong_login" if login else "wrong_password")
        self.io.off_loop(conn, check, checked, LANE_SECRETS)

    def _decoy_hash(self):
        """A hash to check a password against when there is no account, so
        that a wrong nick costs the same time as a wrong password (made once,
        in the worker thread)."""
        if self.decoy is None:
            self.decoy = hash_password(os.urandom(SALT_BYTES).hex())
        return self.decoy

    def _paced(self, conn, check):
        """A guess at a secret: check() in its address's turn (at most one a
        second), or refused unchecked past the address's wrong guesses for
        the minute. Its input waits meanwhile, so its answers stay in order."""
        def in_turn(conn=conn):
            if self.guesses.spent(conn.ip):  # (its guesses before this one, all wrong)
                self.io.log("%s: too many wrong passwords from %s" % (conn.name, conn.ip))
                self.io.send(conn, error("too_many_guesses"))
            else:
                check()
        if conn.phase in (CLOSING, CLOSED):
            return
        delay = self.guesses.turn(conn.ip)
        if delay <= 0:
            in_turn()
            return
        self.io.pause_input(conn)

        def later(conn):
            self.io.resume_input(conn)
            in_turn(conn)
        self.io.call_later(delay, later, conn)

    def _wrong_password(self, conn, name):
        """A second later (the room goes on): the answer; the third closes."""
        conn.login_failures += 1
        self.guesses.wrong(conn.ip)
        self.io.log("%s: a wrong account password" % conn.name)
        self.io.pause_input(conn)

        def answer(conn):
            self.io.send(conn, error(name))
            if conn.login_failures >= MAX_LOGIN_ATTEMPTS:
                self.disconnected(conn, LEFT_CLOSED)
                self.io.close(conn)
            else:
                self.io.resume_input(conn)
        self.io.call_later(WRONG_PASSWORD_DELAY_S, answer, conn)

    def _logged_in(self, conn, key, nick):
        """Right password: conn becomes nick, taking it from another connection
        (on another server: that server is told to let it go)."""
        if self.network.take_over(key):  # from another server
            if conn.phase != MEMBER:
                conn.account = key
                self.io.log("%s logged in (taking the nick over from another server)" % nick)
                self._register(conn, nick, then=lambda: (self._op_if_listed(conn),
                                                         self._deliver_mail(conn)), force=True)
                return
        old = self.members.get(key)
        if old is not None and old is not conn:
            self.io.send(old, error("logged_in_elsewhere"))
            self.disconnected(old, LEFT_ELSEWHERE)
            self.io.close(old)
        conn.account = key
        self.io.log("%s logged in" % nick)

        def welcome_back():
            self._op_if_listed(conn)
            self._deliver_mail(conn)
        if conn.phase == MEMBER:
            self._rename(conn, nick)
            welcome_back()
        else:
            self._register(conn, nick, then=welcome_back)

    def _deliver_mail(self, conn):
        self.network.read_mail(conn.account, lambda rows: self._mail_block(conn, rows))

    def _mail_block(self, conn, rows):
        """The messages that waited for conn, as one block (none: nothing).
        They are deleted once written to its socket: a connection that goes
        (evicted as too slow, say) before that leaves them waiting."""
        if not rows or conn.phase != MEMBER:
            return
        account = conn.account
        self.io.send(conn, format_line("offline_start",
                                       messages=plural(len(rows), "message")))
        for _, when, sender, text in rows:
            self.io.send(conn, format_line(
                "history", time=time.strftime(HISTORY_TIME, time.gmtime(when)),
                line=format_line("private", nick=sender, text=text)).having(
                    offline=True, to=conn.nick, text=text, when=when, **{"from": sender}))
        self.io.send(conn, format_line("offline_end"))
        self.io.when_written(conn, lambda: self._store(self.network.drop_mail, account, rows))

    def _cmd_password(self, conn, arg):
        parts = arg.split()
        if len(parts) != 2:
            self.io.send(conn, usage("password"))
        elif conn.account is None:
            self.io.send(conn, error("not_logged_in"))
        elif len(parts[1]) < MIN_PASSWORD_CHARS:
            self.io.send(conn, error("password_too_short"))
        else:
            key, new = conn.account, parts[1]

            def change():
                def hashed(password_hash):
                    if isinstance(password_hash, Exception):
                        self.io.send(conn, error("password_not_changed"))
                    elif self._store(self.store.set_password, key, password_hash):
                        self.io.send(conn, notice(PASSWORD_CHANGED))
                    else:
                        self.io.send(conn, error("password_not_changed"))
                self.io.off_loop(conn, lambda: hash_password(new), hashed, LANE_SECRETS)
            self._check_account(conn, self._account(key), parts[0], change)

    def _cmd_unregister(self, conn, arg):
        if not arg:
            self.io.send(conn, usage("unregister"))
        elif conn.account is None:
            self.io.send(conn, error("not_logged_in"))
        else:
            key = conn.account
            account = self._account(key)

            def remove():
                if self._store(self.store.remove_account, key):
                    conn.account = None
                    self.io.log("%s unregistered" % account[0])
                    self.io.send(conn, notice(NO_LONGER_REGISTERED.format(nick=account[0])))
            self._check_account(conn, account, arg, remove)


class OperatorCommands:
    """Part of Chat: operators, and what they do to other members (kick,
    ban, mute), here or, through the network, on another server."""

    def _now_operator(self, conn):
        """conn is an operator: its rooms are told (itself, in none)."""
        conn.op = True
        self._place(conn)  # for /who on a server started later
        line = format_line("opped", nick=conn.nick)
        if conn.rooms:
            self._tell_about(conn.rooms, line)
        else:
            self.io.send(conn, line)

    def _op_if_listed(self, conn):
        if conn.account in self.operators and not conn.op:
            self._now_operator(conn)

    # -- operators --

    def _cmd_op(self, conn, arg):
        if self.op_password is None:
            self.io.send(conn, error("no_operators"))
        elif conn.op:
            self.io.send(conn, notice("you are an operator already"))
        else:
            self._paced(conn, lambda: self._check_op_password(conn, arg))

    def _check_op_password(self, conn, arg):
        if conn.phase != MEMBER or conn.op:
            return
        if secrets_match(arg, self.op_password):
            self.io.log("%s is now an operator" % conn.nick)
            self._now_operator(conn)
        else:
            conn.op_attempts += 1
            self.guesses.wrong(conn.ip)
            self.io.log("%s: wrong operator password" % conn.nick)
            self.io.send(conn, error("wrong_op_password"))
            if conn.op_attempts >= MAX_OP_ATTEMPTS:
                self.io.send(conn, error("too_many_op_passwords"))
                self.disconnected(conn, LEFT_CLOSED)
                self.io.close(conn)

    def _operator_target(self, conn, command, arg):
        """For an operator command: return (target member, rest of arg), or
        (None, None) after telling conn why not. (Only operators get here:
        see COMMAND_TABLE.)"""
        parts = arg.split(None, 1)
        if not parts:
            self.io.send(conn, usage(command))
            return None, None
        target = self.members.get(nick_key(parts[0]))
        reason = parts[1] if len(parts) > 1 else ""
        if target is None and self.network.moderate_elsewhere(
                nick_key(parts[0]), command=command, by=conn.nick, ip=conn.ip, reason=reason):
            return None, None  # on another server: that server acts, and tells its rooms
        if target is None:
            self.io.send(conn, error("no_such_user", nick=parts[0]))
            return None, None
        return target, reason

    def _moderate(self, conn, target, line):
        """A moderation line goes to target's rooms (each member once; to
        target alone when it is in none), and to the operator who acted if it
        is in none of them (conn None: on another server)."""
        line.having(room=target.room.name if target.room else None)
        if target.rooms:
            self._tell_about(target.rooms, line)
        else:
            self.io.send(target, line)
        if conn is not None and conn is not target and not set(conn.rooms) & set(target.rooms):
            self.io.send(conn, line)

    def asked_elsewhere(self, kind, fields):
        """Another server asks: let go of a nick logged in to there, or
        moderate one of our users as its operator asked."""
        target = self.members.get(fields["key"])
        if target is None or target.phase != MEMBER:
            return
        if kind == "takeover":  # (its room was told by the server it logged in to)
            self.io.send(target, error("logged_in_elsewhere"))
            self.disconnected(target, None)
            self.io.close(target)
            return
        by, command = fields["by"], fields["command"]
        reason = fields.get("reason") or NO_REASON
        self.io.log("%s (on another server) %s %s" % (by, command, target.nick))
        if command == "kick":
            self._remove(None, target, format_line("kicked", nick=target.nick, op=by,
                                                   reason=reason))
        elif command == "ban" and target.ip != fields.get("ip"):  # not the operator's own
            self._store(self.store.add_ban, target.ip, target.nick)
            self._remove(None, target, format_line("banned", nick=target.nick, op=by,
                                                   reason=reason))
        elif command in ("mute", "unmute") and target.muted != (command == "mute"):
            target.muted = command == "mute"
            self._moderate(None, target, format_line(command + "d", nick=target.nick, op=by))

    def _remove(self, conn, target, line):
        """Tell target's room (target included) line, then disconnect target."""
        self._moderate(conn, target, line)
        self.disconnected(target, None)
        self.io.close(target)

    def _cmd_kick(self, conn, arg):
        target, reason = self._operator_target(conn, "kick", arg)
        if target is not None:
            self.io.log("%s kicked %s" % (conn.nick, target.nick))
            self._remove(conn, target, format_line("kicked", nick=target.nick, op=conn.nick,
                                             reason=reason or NO_REASON))

    def _cmd_ban(self, conn, arg):
        target, reason = self._operator_target(conn, "ban", arg)
        if target is conn:  # it would lock out the operator's own address
            self.io.send(conn, error("ban_yourself"))
        elif target is not None:
            self.io.log("%s banned %s (%s)" % (conn.nick, target.nick, target.ip))
            self._remove(conn, target, format_line("banned", nick=target.nick, op=conn.nick,
                                             reason=reason or NO_REASON))
            self._store_or_tell(conn, "ban", self.store.add_ban, target.ip, target.nick)

    def _cmd_unban(self, conn, arg):
        if not arg:
            self.io.send(conn, usage("unban"))
        elif not self._store_answer(self.store.remove_ban, arg):
            self.io.send(conn, error("not_banned", address=arg))
        else:
            self.io.log("%s unbanned %s" % (conn.nick, arg))
            self.io.send(conn, notice("%s is no longer banned" % arg))

    def _cmd_bans(self, conn, arg):
        bans = self.store.bans()
        if not bans:
            self.io.send(conn, notice("no address is banned"))
        else:
            self.io.send(conn, notice("banned: " + ", ".join(
                "%s (%s)" % (ip, nick) for ip, nick in bans)))

    def _cmd_mute(self, conn, arg):
        self._set_muted(conn, "mute", arg, True)

    def _cmd_unmute(self, conn, arg):
        self._set_muted(conn, "unmute", arg, False)

    def _set_muted(self, conn, command, arg, muted):
        target, _ = self._operator_target(conn, command, arg)
        if target is None:
            return
        if target.muted == muted:
            self.io.send(conn, error("already_muted" if muted else "already_unmuted",
                                     nick=target.nick))
            return
        target.muted = muted
        self.io.log("%s %sd %s" % (conn.nick, command, target.nick))
        self._moderate(conn, target, format_line("muted" if muted else "unmuted",
                                                 nick=target.nick, op=conn.nick))


class Chat(RoomCommands, AccountCommands, OperatorCommands):
    """The chat's rules. Called by the loop (connected, handle_line,
    registration_expired, disconnected, refusal); calls the loop through io,
    and the other servers through network (a LocalNetwork when there are
    none). Three of its parts are classes of their own, above: RoomCommands,
    AccountCommands, OperatorCommands; here are registration, the phases,
    messages, nicks and the rest."""

    def __init__(self, io, limits, password=None, op_password=None, store=None,
                 replay=REPLAY_MESSAGES, operators=(), network=None, motd=()):
        self.io = io
        self.motd = tuple(motd)            # --motd-file's lines, said after the greeting
        self.limits = limits
        self.password = password           # the room's, or None
        self.op_password = op_password     # for /op, or None: no operators
        self.store = store if store is not None else SQLiteStore(":memory:")
        # The other servers: a RedisNetwork, or (one server) a LocalNetwork.
        self.network = network or LocalNetwork(
            self.store, replay, lambda text: io.log(text, always=True))
        self.replay = replay               # messages replayed on joining a room
        self.operators = {nick_key(nick) for nick in operators}  # accounts that are operators
        self.decoy = None                  # see _decoy_hash()
        self.guesses = GuessLimit()        # per address: how fast secrets may be guessed
        self.members = {}                  # nick key -> registered Connection, every room
        self.rooms = {}                    # room key -> Room, those in use
        self.senders = {}                  # message id -> its sender, until it is stored
        self.indexing = False              # the search index's catching up is due or under way
        self.lobby = self._room(LOBBY)

    # -- called by the loop --

    def refusal(self, conn):
        """Return why a new connection may not stay (an error line), or None."""
        return error("banned") if self.store.is_banned(conn.ip) else None

    def connected(self, conn):
        """A connection the chat may talk to: greet it."""
        conn.phase = NICKNAME if self.password is None else PASSWORD
        if not conn.codec.greets:
            return
        greeting = [text.format(count=self.online()) for text in GREETING]
        greeting[1:1] = self.motd
        if conn.phase == PASSWORD:
            greeting.insert(-1, PASSWORD_GREETING)  # the last line still asks for a nick
        for text in greeting:
            self.io.send(conn, notice(text))

    def handle_line(self, conn, line):
        """Handle one line (bytes) from conn, as its phase says."""
        asked = conn.codec.command(line)
        if asked is not None:
            command, arg = asked
            if command == "format" and conn.phase != CLOSING:
                self._cmd_format(conn, arg)  # at any time, registered or not
            else:
                self.LINE_HANDLERS[conn.phase](self, conn, command, arg)

    def _cmd_format(self, conn, arg):
        if isinstance(conn.codec, IrcCodec):  # (IRC it stays)
            self.io.send(conn, error("unknown_command", command="format"))
            return
        codec = CODECS.get(arg.lower())
        if codec is None:
            self.io.send(conn, usage("format"))
            return
        if not conn.codec.switchable:
            if codec is not JSON_CODEC:
                self.io.send(conn, error("web_speaks_json"))
            else:
                self.io.send(conn, notice("format: json"))
            return
        conn.codec = codec
        self.io.send(conn, notice("format: " + codec.name))

    def commit(self):
        """Store what was said; the loop calls this before it writes any of
        it to a socket. A message that could not be stored is still relayed,
        and its sender is told."""
        if self.store.batch and self.store.indexed and not self.indexing:
            self.indexing = True  # the index catches up a little later, off the loop
            self.io.call_later(INDEX_DELAY_S, self._index)
        failed = self.store.flush()
        senders, self.senders = self.senders, {}
        if not failed:
            return
        self.io.log("database error: %s; %s not stored"
                    % (self.store.failure, plural(len(failed), "message")), always=True)
        for row in failed:
            conn = senders.get(row[0])
            if conn is not None and conn.phase != CLOSED:
                self.io.send(conn, error("message_not_stored", why=self.store.failure))

    def close(self):
        self.commit()
        self.io.log("database: %s" % self.store.usage(), always=True)
        self.store.close()

    def close_readers(self):
        """A worker thread ends: what it read the history with is closed."""
        self.store.close_reader()
        self.network.close_reader()

    def _index(self):
        """Let the worker bring the search index up to date, a batch per job."""
        def indexed(more):
            if isinstance(more, Exception):
                self.io.log("database error: the search index: %s" % describe_error(more),
                            always=True)
                more = False
            if more:
                self.io.off_loop(None, self.store.index_some, indexed, LANE_SEARCH)
            else:
                self.indexing = False
        self.io.off_loop(None, self.store.index_some, indexed, LANE_SEARCH)

    def registration_expired(self, conn):
        self.io.send(conn, error("registration_timeout"))
        self.io.log("%s: registration timed out" % conn.name)
        self.io.close(conn)

    def online(self):
        """How many are registered, on every server of the chat."""
        return len(self.members) + len(self.network.elsewhere)

    def disconnected(self, conn, reason):
        """conn's connection ended (or is ending): it leaves, and its rooms
        are told why, each of their members once (reason None: told already)."""
        if conn.phase != MEMBER or self.members.get(conn.key) is not conn:
            return
        rooms, conn.rooms, conn.room = conn.rooms, [], None  # the loop closes it next
        for room in rooms:
            room.people -= 1
        del self.members[conn.key]
        line = format_line("left", nick=conn.nick, reason=reason or "")
        self.network.release(conn.key)
        if self.network.down and reason is not None:  # told to the others once back
            self.network.left_meanwhile.extend(line.about_person(rooms))
        for room in rooms:
            if room.members.get(conn.key) is conn:  # (not yet, while arriving over the network)
                self.io.leave(room, conn)
        if not rooms:  # (the other servers learn it from its rooms, else)
            self.network.tell("roomless", what="left", nick=conn.nick, reason=reason or "")
        if reason is not None:
            self._tell_about(rooms, line)
            self.io.log("%s left (%s)" % (conn.nick, reason))
        for room in rooms:
            self.forget_if_empty(room)

    def _tell_about(self, rooms, line):
        """A line about a person (a rename, a leave of the chat, a kick...)
        to each of its rooms: each of their members gets it once."""
        for room, copy in line.about_person(rooms):
            self.io.broadcast(room, copy)

    def _place(self, conn):
        """The other servers learn where conn is now, and as whom."""
        self.network.place(conn)

    def _current(self, conn):
        """conn's current room; None (and conn told so) when it is in none."""
        if conn.room is None:
            self.io.send(conn, error("in_no_room"))
        return conn.room

    @staticmethod
    def _one_of_its_rooms(conn, name):
        """The room called name (as nicks clash) if conn is in it, else None."""
        key = nick_key(room_name(name))
        return next((room for room in conn.rooms if room.key == key), None)

    # -- lines by phase --

    def _password_line(self, conn, command, arg):
        """The room has a password: /pass first; /quit is allowed."""
        if command == "quit":
            self.io.close(conn)
        elif command == "pass":
            self._check_password(conn, arg)
        else:
            self.io.send(conn, error("password_required"))
            if conn.codec.per_member:  # (IRC: a missing password closes, as a wrong one)
                self.io.close(conn)

    def _nickname_line(self, conn, command, arg):
        """A nickname (a line, or /nick); /quit is allowed."""
        if command == "quit":
            self.io.close(conn)
        elif command == "pass":
            self.io.send(conn, notice("no password needed now: choose a nickname"))
        elif self.network.down and command in (None, "nick", "login"):
            self.io.send(conn, error("network_down"))
        elif command is None:
            self._register(conn, arg.strip())
        elif command == "nick":
            self._register(conn, arg)
        elif command == "login":
            self._cmd_login(conn, arg)
        else:
            self.io.send(conn, error("not_registered"))

    def _member_line(self, conn, command, arg):
        """A message to the room, or a command."""
        if self.network.down and self._needs_network(command, arg):
            self.io.send(conn, error("network_down"))
            return
        if command is None:
            self._say(conn, "message", arg)
            return
        known = COMMANDS.get(command)
        if known is None or (known.who == IRC_CLIENTS and not isinstance(conn.codec, IrcCodec)):
            self.io.send(conn, error("unknown_command", command=command))
        elif known.who == OPERATORS and not conn.op:  # (before the store is read: a
            self.io.send(conn, error("operators_only", command=command))  # non-operator
            # costs it nothing)
        else:
            getattr(self, "_cmd_" + command)(conn, arg)

    def _needs_network(self, command, arg):
        """Whether a member's line needs the other servers (or the store):
        everything but commands about this connection and /msg to one of ours."""
        if command == "msg":
            return nick_key(arg.split(" ", 1)[0]) not in self.members
        return command is None or (command in COMMANDS and COMMANDS[command].network)

    def _closing_line(self, conn, command, arg):
        """Its last lines are on their way: what it says now is dropped."""

    # -- registration --

    def _check_password(self, conn, secret):
        self._paced(conn, lambda: self._check_room_password(conn, secret))

    def _check_room_password(self, conn, secret):
        if conn.phase != PASSWORD:
            return  # (gone while its guess waited its turn)
        if secrets_match(secret, self.password):
            conn.phase = NICKNAME
            self.io.send(conn, notice(PASSWORD_ACCEPTED))
            return
        self.io.log("%s: wrong password" % conn.name)
        self.guesses.wrong(conn.ip)
        self.io.send(conn, error("wrong_password"))
        self.io.close(conn, delay=WRONG_PASSWORD_DELAY_S)  # a guess costs a second

    def _register(self, conn, nick, then=None, force=False):
        """conn becomes nick, in the lobby; then() follows. force: a login
        taking the nick over from another server."""
        problem = nick_problem(nick) if force else self._nick_problem(nick, conn)
        if problem:
            self.io.send(conn, problem)
            return

        def claimed(taken, online):  # several servers: the nick is claimed in Redis first
            if conn.phase not in (NICKNAME, PASSWORD):
                if taken is False:
                    self.network.release(nick_key(nick))  # gone meanwhile
            elif taken is None:
                self.io.send(conn, error("network_down"))
            elif taken:
                self.io.send(conn, error("nick_taken", nick=nick))
            else:
                self._registered(conn, nick, then, online)
        self._ask_network(conn, lambda answer: self.network.claim(
            nick_key(nick), RemoteUser(nick, [self.lobby.key] if conn.codec.joins_lobby else []),
            answer, force), claimed)

    def _ask_network(self, conn, ask, answered):
        """ask(answer): a question to the network, answered(...) with what it
        says. conn's input waits for the answer, unless it came at once (one
        server): then nothing waits, and reading goes on in this pass."""
        state = []

        def answer(*result):
            if state:  # it waited
                self.io.resume_input(conn)
            state.append(True)
            answered(*result)
        ask(answer)
        if not state:
            state.append(False)
            self.io.pause_input(conn)

    def _registered(self, conn, nick, then=None, online=None):
        """online: how many Redis counted with the claim (several servers),
        not our copy of who is where, which can lag the feed: someone who
        joined on another server a moment ago may not be in it yet."""
        conn.nick, conn.key, conn.phase = nick, nick_key(nick), MEMBER
        self.members[conn.key] = conn
        self.io.log("%s joined from %s" % (nick, conn.name))
        conn.name = nick
        count = self.online() if online is None else online
        if conn.codec.joins_lobby:
            self._arrive(conn, self.lobby, format_line("joined", nick=nick, count=count)
                         .having(room=self.lobby.name))
        else:  # (IRC: in no room, announced by the channels it joins)
            self._place(conn)
            self.network.tell("roomless", what="joined", nick=nick, count=0)  # (see there)
            self.io.send(conn, format_line("welcome", nick=nick).having(
                motd=self.motd, max_joined=self.limits.max_joined))
        if then is not None:
            then()

    def _arrive(self, conn, room, line):
        """conn enters room, its current room now: its join line to everyone
        there, then the topic and the replay to conn. On several servers the
        line goes through the feed, and conn enters when it comes back: the
        replay is what was said before it, and conn gets live what comes
        after, none missed or twice."""
        conn.rooms.append(room)
        room.people += 1
        conn.room = room
        self.io.focus(conn, room)
        self._place(conn)
        if conn.away is not None:  # (for IRC's away-notify)
            line.having(away=conn.away)
        self.io.broadcast(room, line)

        def arrive(answer):
            def arrived():  # (entered first: it is owed none of what the room had before)
                if conn.phase == MEMBER and room in conn.rooms:
                    self.io.enter(room, conn)
                    self.io.send(conn, line)
                    self.network.when_watched(room.key, answer)
            self.io.then(arrived)
        self._ask_network(conn, arrive, lambda: self._welcomed(conn, room))

    def _welcomed(self, conn, room):
        if conn.phase == MEMBER and room in conn.rooms:
            self._welcome(conn, room)

    def _nick_problem(self, nick, conn=None):
        """Return why nick can't be taken (by conn, if renaming), or None."""
        problem = nick_problem(nick)
        if problem:
            return problem
        key = nick_key(nick)
        if conn is None or conn.account != key:  # an account's owner, online or not: /login
            account = self._account(key)
            if account is not None:
                return error("nick_registered", nick=account[0])
            if key in self.operators:  # --operators NICK before its account is made:
                return error("nick_kept", nick=nick)  # whoever took it would be one
        holder = self.members.get(key)
        if (holder is not None and holder is not conn) or key in self.network.elsewhere:
            return error("nick_taken", nick=nick)
        return None

    # -- commands of members --

    def _allowed_to_speak(self, conn):
        """A muted member's lines reach no one; it is told so."""
        if conn.muted:
            self.io.send(conn, error("muted"))
        return not conn.muted

    def _say(self, conn, kind, text, room=None):
        """A message or an action: to room (conn's current room if None),
        and into its history."""
        room = room or self._current(conn)
        if room is None or not self._allowed_to_speak(conn):
            return
        now = time.time()
        line = format_line(kind, nick=conn.nick, text=text).having(room=room.name, when=now)
        message_id = self.network.stamp(room, kind, conn.nick, text, now)
        if message_id is not None:  # (several servers: given with the feed's entry)
            self.senders[message_id] = conn  # told if it is not stored after all
            line.having(id=message_id)
        self.io.broadcast(room, line)

    def _cmd_me(self, conn, arg):
        if not arg:
            self.io.send(conn, usage("me"))
        else:
            self._say(conn, "action", arg)

    def _cmd_msg(self, conn, arg):
        parts = arg.split(None, 1)
        if len(parts) < 2:
            self.io.send(conn, usage("msg"))
            return
        target_nick, text = parts
        if target_nick.startswith("#"):  # /msg #ROOM: said in one of its rooms
            room = self._one_of_its_rooms(conn, target_nick)
            if room is None:
                self.io.send(conn, error("not_in_room", room=room_name(target_nick),
                                         sending=True))  # (IRC: 404, cannot send there)
            else:
                self._say(conn, "message", text, room)
            return
        target = self.members.get(nick_key(target_nick))
        elsewhere = self.network.elsewhere.get(nick_key(target_nick))
        if target is None and elsewhere is not None:
            if self._allowed_to_speak(conn):  # through the feed, to its server
                self.network.publish("", "", format_line("private", nick=conn.nick, text=text)
                                     .having(to=elsewhere.nick))
                self._private_echo(conn, elsewhere.nick, text, elsewhere.away)
            return
        if target is None:
            self._mail(conn, target_nick, text)
            return
        if not self._allowed_to_speak(conn):
            return
        self.io.send(target, format_line("private", nick=conn.nick, text=text).having(
            to=target.nick))
        self._private_echo(conn, target.nick, text, target.away)

    def _private_echo(self, conn, nick, text, away=None):
        """What the sender of a private message sees: the echo, and whether
        the one it went to is away."""
        self.io.send(conn, format_line("private_echo", nick=nick, text=text).having(
            **{"from": conn.nick}))
        if away is not None:
            self.io.send(conn, format_line("is_away", nick=nick, text=away))

    def _cmd_nick(self, conn, arg):
        if not arg:
            self.io.send(conn, usage("nick"))
            return
        if arg == conn.nick:
            self.io.send(conn, error("already_nick", nick=arg))
            return
        if not self._allowed_to_speak(conn):
            return  # a rename is seen by everyone: muted means that too
        problem = self._nick_problem(arg, conn)
        if problem:
            self.io.send(conn, problem)
            return
        if nick_key(arg) == conn.key:  # its own, in another case
            self._rename(conn, arg)
            return

        def claimed(taken, online):
            if conn.phase != MEMBER:
                if taken is False:
                    self.network.release(nick_key(arg))
            elif taken is None:
                self.io.send(conn, error("network_down"))
            elif taken:
                self.io.send(conn, error("nick_taken", nick=arg))
            else:
                self._rename(conn, arg)
        self._ask_network(conn, lambda answer: self.network.claim(
            nick_key(arg), RemoteUser(arg, [room.key for room in conn.rooms]), answer), claimed)

    def _rename(self, conn, arg):
        """conn is now arg: its rooms are told."""
        old, old_key = conn.nick, conn.key
        self.network.release(conn.key)  # (the new one is claimed already, or an account's)
        del self.members[conn.key]
        conn.nick, conn.key, conn.name = arg, nick_key(arg), arg
        self.members[conn.key] = conn
        self._place(conn)
        for room in conn.rooms:
            self.io.rekey(room, conn, old_key)  # now, not in order: queued actions use conn.key
        self.io.log("%s is now known as %s" % (old, arg))
        line = format_line("renamed", old=old, new=arg)
        if conn.rooms:
            self._tell_about(conn.rooms, line)
        else:
            self.io.send(conn, line)  # in no room: only itself (and the other servers)
            self.network.tell("roomless", what="renamed", old=old, new=arg)

    def _store_answer(self, write, *args):
        """_store() for a write whose answer matters (False on failure)."""
        try:
            return write(*args)
        except StoreError as exc:
            self.io.log("database error: %s" % exc, always=True)
            return False

    def _store(self, write, *args):
        """A write other than a message (a room, a topic, a ban): a failure
        is logged, and the chat goes on without it."""
        try:
            write(*args)
            return True
        except StoreError as exc:
            self.io.log("database error: %s" % exc, always=True)
            return False

    def _store_or_tell(self, conn, what, write, *args):
        """_store() for a change someone made (a topic, a ban): if it could
        not be stored (a full disk), they are told it will not last."""
        try:
            write(*args)
            return True
        except StoreError as exc:
            self.io.log("database error: %s" % exc, always=True)
            self.io.send(conn, error("change_not_stored", what=what, why=exc))
            return False

    def _cmd_away(self, conn, arg):
        conn.away = arg or None
        self._place(conn)
        self.network.tell("away", key=conn.key, away=conn.away)
        if conn.away is None:
            self.io.send(conn, format_line("away_back", text=None))
        else:
            self.io.send(conn, format_line("away_set", text=arg))
        self.away_changed(conn.nick, conn.away, [room.key for room in conn.rooms], conn)

    def away_changed(self, nick, away, room_keys, skip=None):
        """nick went away (or came back: away None): IRC clients with
        away-notify in one of its rooms are told, each once (the others see
        it in /who)."""
        told, line = {skip}, irc_line("away_changed", nick=nick, text=away)
        for key in room_keys:
            room = self.rooms.get(key)
            for member in list(room.members.values()) if room is not None else ():
                if member not in told and "away-notify" in member.codec.caps(member):
                    told.add(member)
                    self.io.send(member, line)

    def _cmd_whois(self, conn, arg):
        """IRC's WHOIS NICK: where NICK is, and whether away or an operator."""
        nick = arg.split()[-1].split(",")[0] if arg.split() else ""
        key = nick_key(nick)
        member, remote = self.members.get(key), self.network.elsewhere.get(key)
        if member is not None:
            found = dict(nick=member.nick, rooms=[room.name for room in member.rooms],
                         op=member.op, away=member.away, account=member.account is not None,
                         user=getattr(member.reader, "username", None),  # (IRC's USER)
                         real=getattr(member.reader, "realname", None))
        elif remote is not None:  # (whether it is logged in, its server alone knows)
            found = dict(nick=remote.nick, op=remote.op, away=remote.away, account=False,
                         rooms=[self.network.known_name(room, room) for room in remote.rooms])
        else:
            found = None
        self.io.send(conn, irc_line("whois", nick=nick or "*", found=found))

    def _cmd_in(self, conn, arg):
        """/in #ROOM /COMMAND ...: the command in one of conn's rooms (IRC
        names the channel in each verb; the chat acts on the current room)."""
        name, _, rest = arg.partition(" ")
        room = self._one_of_its_rooms(conn, name) if name else None
        if room is None:
            self.io.send(conn, error("not_in_room", room=room_name(name or "#"), sending=(
                rest.startswith("/me ") or not rest.startswith("/"))))
            return
        if conn.room is not room:
            self._talk_in(conn, room)
        command, arg = parse_line(rest.strip())
        self._member_line(conn, command, arg)

    def _cmd_help(self, conn, arg):
        lines = list(HELP)
        if self.op_password is not None and not conn.op:
            lines.append(HELP_OP)
        if conn.op:
            lines.extend(HELP_OPERATORS)
        for text in lines:
            self.io.send(conn, notice(text))

    def _cmd_ping(self, conn, arg):
        line = format_line("pong", token=arg)
        self.io.send(conn, Line(line.rstrip(), "pong", line.fields))  # no space without a token

    def _cmd_pass(self, conn, arg):
        self.io.send(conn, notice("you are in already"))

    def _cmd_quit(self, conn, arg):
        self.disconnected(conn, arg or LEFT_QUIT)
        self.io.close(conn)

    LINE_HANDLERS = {
        PASSWORD: _password_line,
        NICKNAME: _nickname_line,
        MEMBER: _member_line,
        CLOSING: _closing_line,
    }


# --- Server loop --------------------------------------------------------------
# One selectors loop, non-blocking sockets. Each pass: read the ready
# sockets, hand each room's broadcasts of the pass to its members at once,
# then write each connection with output once. It knows sockets and bytes,
# not commands: lines go to the Chat, and the Chat comes back through the
# narrow interface below. Nothing a client sends can raise out of it.

class FanOut:
    """The pass's broadcasts, per room, and the one rule of their order:
    every member of a room gets the room's lines in the order they were
    accepted; one who entered during the pass gets only what came after; one
    who leaves gets what was queued before.

    What a member gets of a line depends on it (rendered()): text or JSON, a
    text line of a room that is not its current one marked `#ROOM `, a line
    about a person that is in several of its rooms only the first copy to
    reach it. A pass is encoded once per rendering that members share, not
    once per member."""

    def __init__(self):
        self.pending = {}                  # room -> this pass's broadcasts (text, bytearray)
        self.lines = {}                    # room -> [(offset in pending, Line)]
        self.late = {}                     # room -> {conn: offset in pending at entry}
        self.size = 0                      # bytes pending, every room
        self.about_people = set()          # rooms whose pending lines have one about a person

    def broadcast(self, room, data, line):
        pending = self.pending.setdefault(room, bytearray())
        self.lines.setdefault(room, []).append((len(pending), line))
        pending.extend(data)
        self.size += len(data)
        if "person" in line.extra:
            self.about_people.add(room)

    def owed(self, room, offset, conn):
        """What conn gets of room's pending lines from offset on."""
        if conn.codec is TEXT_CODEC and conn.focus is room and room not in self.about_people:
            return bytes(self.pending.get(room, b"")[offset:])  # as said: most often
        return b"".join(rendered(room, line, conn) for start, line in self.lines.get(room, ())
                        if start >= offset)

    def enter(self, room, conn):
        room.members[conn.key] = conn
        conn.joined.append(room)
        pending = self.pending.get(room)
        if pending:  # it missed this pass's earlier lines: it was not in the room yet
            self.late.setdefault(room, {})[conn] = len(pending)

    def leave(self, room, conn):
        """Take conn out of room; return the bytes it is owed of this pass."""
        owed = self.owed(room, self.late.get(room, {}).pop(conn, 0), conn)
        if room.members.get(conn.key) is conn:  # (its nick may be someone else's by now)
            del room.members[conn.key]
        if room in conn.joined:
            conn.joined.remove(room)
        return owed

    def rekey(self, room, conn, old_key):
        """conn, a member of room, was renamed: it is found by its new key.
        Nothing else changes (what it is owed is kept by connection)."""
        if room.members.get(old_key) is conn:
            del room.members[old_key]
            room.members[conn.key] = conn

    def catch_up(self, room, conn):
        """Return the bytes of room's pending lines conn is owed so far; it
        is owed only what comes after them at delivery. (A line to one
        member then follows what was said before it, without handing the
        pass's lines to every member at once.)"""
        pending = self.pending.get(room)
        if not pending:
            return b""
        late = self.late.setdefault(room, {})
        offset = late.get(conn, 0)
        late[conn] = len(pending)
        return self.owed(room, offset, conn)

    def take(self, room):
        """Return (a Pass of room's pending lines, {latecomer: offset}) and
        forget them."""
        data = bytes(self.pending.pop(room, b""))
        self.size -= len(data)
        self.about_people.discard(room)
        return Pass(room, data, self.lines.pop(room, [])), self.late.pop(room, {})


def rendered(room, line, conn):
    """The bytes conn gets for line, one of room's broadcasts."""
    person = line.extra.get("person")
    if person is not None:  # about a person: the first copy to reach conn, unmarked
        seen = conn.seen_people
        if seen is None:
            seen = conn.seen_people = collections.deque(maxlen=PERSON_LINES_KEPT)
        if person in seen:
            return b""
        seen.append(person)
        return conn.codec.encode(line, conn)
    if conn.focus is not room:
        return conn.codec.encode_marked(line, room, conn)
    return conn.codec.encode(line, conn)


class Pass:
    """One room's broadcasts of one loop pass, in each rendering members
    share (made when first needed): per codec, as said and marked with the
    room's name (text as said is the bytes already made)."""

    __slots__ = ("room", "data", "lines", "about_person", "renderings", "speakers")

    def __init__(self, room, data, lines):
        self.room = room
        self.data = data
        self.lines = lines
        self.about_person = any("person" in line.extra for _, line in lines)
        self.renderings = {}
        self.speakers = False              # (see said_by(): not yet known)

    def said_by(self, kinds):
        """The nicks whose lines these are, if every line is of these kinds
        (else None): what a codec that renders per member (IRC) may share."""
        if self.speakers is False:
            self.speakers = None if any(line.kind not in kinds for _, line in self.lines) else {
                line.fields.get("nick") for _, line in self.lines}
        return self.speakers

    def for_member(self, conn, offset):
        """What conn gets of it, from offset on (a latecomer). (The most
        common case, text in its current room, _deliver takes itself.)"""
        current, codec = conn.focus is self.room, conn.codec
        group = codec.pass_group(conn, self) if codec.per_member else ()
        if self.about_person or group is None or offset and not (
                current and codec is TEXT_CODEC):
            return b"".join(rendered(self.room, line, conn) for start, line in self.lines
                            if start >= offset)  # its own: rare
        if current and codec is TEXT_CODEC:
            return self.data[offset:] if offset else self.data
        shared = (codec, current, group)
        chunk = self.renderings.get(shared)
        if chunk is None:
            chunk = self.renderings[shared] = b"".join(
                rendered(self.room, line, conn) for _, line in self.lines)
        return chunk


class Worker:
    """One thread for one lane of what must not hold the loop: it runs its
    work in order, and wakes the loop when each is done."""

    def __init__(self, wake, at_exit=None, name="worker"):
        self.wake = wake
        self.at_exit = at_exit             # run in the thread as it ends
        self.jobs = queue.Queue()
        self.results = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, work, done, conn):
        self.jobs.put((work, done, conn))

    def stop(self):
        self.jobs.put(None)
        self.thread.join(SHUTDOWN_FLUSH_S)

    def finished(self):
        """Yield (done, conn, result) for the work finished so far."""
        while True:
            try:
                yield self.results.get_nowait()
            except queue.Empty:
                return

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                if self.at_exit is not None:
                    self.at_exit()
                return
            work, done, conn = job
            try:
                result = work()
            except Exception as exc:  # deliberately broad: the answer says what failed
                result = exc
            self.results.put((done, conn, result))
            self.wake()


class Listener:
    """One address the server accepts connections on: whether they speak
    TLS, and the codec a new connection starts with (a web or IRC listener
    is one more of these)."""

    __slots__ = ("host", "port", "tls_context", "codec", "sock", "address")

    def __init__(self, host, port, tls_context=None, codec=TEXT_CODEC):
        self.host = host
        self.port = port
        self.tls_context = tls_context     # None: plain TCP
        self.codec = codec
        self.sock = None
        self.address = None                # (host, port) actually bound

    def bind(self):
        """Create the listening socket; `::` listens on IPv4 too where it can.
        Raises OSError (socket.gaierror: a bad host)."""
        infos = socket.getaddrinfo(self.host or None, self.port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        dualstack = (family == socket.AF_INET6 and sockaddr[0] == "::"
                     and socket.has_dualstack_ipv6())
        sock = socket.create_server(sockaddr, family=family, backlog=LISTEN_BACKLOG,
                                    dualstack_ipv6=dualstack)
        sock.setblocking(False)
        self.sock = sock
        self.address = sock.getsockname()[:2]


class Acceptor:
    """Part of ChatServer: accepting connections on its listeners, the TLS
    handshake, and refusing what its limits do not allow (a full server, an
    address with too many, no file descriptor left, registration too slow)."""

    def _accept_on_every_listener(self):
        for listener in self.listeners:
            self.selector.register(listener.sock, selectors.EVENT_READ,
                                   lambda listener=listener: self._accept(listener))

    # -- accepting --

    def _accept(self, listener):
        """Accept waiting connections, a batch at a time."""
        for _ in range(ACCEPTS_PER_PASS):
            try:
                sock, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while waiting: nothing to do
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._refuse_without_descriptors(listener)
                else:
                    self.log("accept failed: %s" % exc, always=True)
                return
            self._admit(sock, addr, listener)

    def _admit(self, sock, addr, listener):
        """Set up a new connection: refuse it past a limit, else hand it to the chat."""
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            set_keepalive(sock)
        except OSError as exc:  # the peer is already gone
            self.log("%s: %s" % (format_address(addr), exc))
            sock.close()
            return
        conn = Connection(sock, addr, self.limits, time.monotonic(), listener.codec)
        if listener.tls_context is not None:
            self._start_tls(conn, listener.tls_context)
        self.conns.add(conn)
        self._watch(conn)
        refusal = self.chat.refusal(conn) or self._refusal(conn)
        if refusal:
            self.log("%s refused: %s" % (conn.name, refusal.fields["text"]))
            self.send(conn, refusal)
            self.close(conn)
            return
        self._count(conn)
        self.log("%s connected" % conn.name)
        self.call_later(self.limits.register_timeout, self._expire_registration, conn)
        if not conn.handshake_wait and not conn.codec.http_first:
            self.chat.connected(conn)

    def _start_tls(self, conn, context):
        """Wrap the socket; the handshake runs in the loop like any other I/O.

        A refusal queued before it completes waits in outbuf. The
        registration timeout bounds it.
        """
        conn.sock = context.wrap_socket(conn.sock, server_side=True,
                                        do_handshake_on_connect=False)
        conn.tls = True
        conn.handshake_wait = selectors.EVENT_READ  # the client speaks first

    def _continue_handshake(self, conn):
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.handshake_wait = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            conn.handshake_wait = selectors.EVENT_WRITE
        except (ssl.SSLError, OSError) as exc:  # plain text, or a peer that gave up
            self.log("%s: TLS handshake failed: %s"
                     % (conn.name, getattr(exc, "reason", None) or exc))
            self._drop(conn, LEFT_CLOSED)
            return
        else:
            conn.handshake_wait = 0
            self.log("%s: %s established" % (conn.name, conn.sock.version()))
            if conn.phase == HANDSHAKE and not conn.codec.http_first:
                self.chat.connected(conn)
            self.dirty.add(conn)  # what was queued meanwhile goes now
        self._watch(conn)

    def _refusal(self, conn):
        """Return why a new connection can't stay by the loop's limits, or None."""
        limits = self.limits
        if self.counted >= limits.max_clients:
            return error("server_full")
        if (limits.max_per_ip and conn.ip not in EXEMPT_ADDRESSES
                and self.per_ip.get(conn.ip, 0) >= limits.max_per_ip):
            return error("too_many_connections")
        return None

    def _open_spare_fd(self):
        try:
            self.spare_fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self.spare_fd = None

    def _refuse_without_descriptors(self, listener):
        """Out of descriptors: free the spare to accept one peer and refuse it.

        Without this the listener stays readable and the loop would spin on
        EMFILE. With no spare to give, stop watching the listener briefly.
        """
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                sock, addr = listener.sock.accept()
                try:
                    sock.send(listener.codec.encode(error("server_full")))
                except OSError:
                    pass  # refused either way
                sock.close()
                self.log("%s refused: out of file descriptors" % format_address(addr))
            except OSError:
                pass  # nobody waiting after all, or no descriptor even now
            self._open_spare_fd()
        if self.spare_fd is None:
            for every in self.listeners:
                self.selector.unregister(every.sock)
            self.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self):
        if self.spare_fd is None:
            self._open_spare_fd()
        self._accept_on_every_listener()

    def _expire_registration(self, conn):
        if conn.phase == HANDSHAKE:
            self.log("%s: %s timed out" % (conn.name, "the HTTP request" if (
                conn.codec.http_first and not conn.handshake_wait) else "TLS handshake"))
            self._forget(conn)
        elif conn.phase in (PASSWORD, NICKNAME):
            self.chat.registration_expired(conn)

    def _count(self, conn):
        conn.counted = True
        self.counted += 1
        self.per_ip[conn.ip] = self.per_ip.get(conn.ip, 0) + 1

    def _uncount(self, conn):
        """Stop counting a connection that is leaving toward the limits."""
        if not conn.counted:
            return
        conn.counted = False
        self.counted -= 1
        count = self.per_ip.pop(conn.ip)
        if count > 1:
            self.per_ip[conn.ip] = count - 1


class NetworkFeed:
    """Part of ChatServer: several servers (--redis). A room's lines go out
    through Redis and are delivered when they come back in the feed; what
    the chat does meanwhile waits in order behind them (sequence). Redis
    lost, and back."""

    def _not_sent(self, number):
        """One of our messages did not come back from the feed (refused, or
        Redis went away first): its sender is told, once."""
        sender = self.unconfirmed.pop(number, None)
        if sender is not None:
            self._send_now(sender, error("network_down"))

    # -- several servers: the feed --

    def _in_order(self, action, *args):
        """Do it now, or (several servers) after our lines still on their way."""
        waiting = self.inserting if self.inserting is not None else self.sequence
        if waiting:
            waiting.append((action, args))
        else:
            action(*args)

    def _from_feed(self, entry):
        """An entry of the feed (any server's, ours too): deliver its line to
        our members of its room (or, a private message, to its addressee)."""
        network = self.network
        network.heard(entry)
        kind, fields, room_key = entry["k"], entry["f"], entry["r"]
        if kind in CONTROL_KINDS:
            if entry["o"] != network.server_id and kind in ("moderate", "takeover"):
                self.chat.asked_elsewhere(kind, fields)
            elif kind == "away" and fields["key"] in network.elsewhere:
                user = network.elsewhere[fields["key"]]
                self.chat.away_changed(user.nick, user.away, user.rooms)
            return
        line = format_line(kind, **fields).having(**entry["x"])
        if entry["id"]:
            line.having(id=entry["id"])
        ours = entry["o"] == network.server_id
        if not room_key:  # a private message from another server
            target = self.chat.members.get(nick_key(entry["x"].get("to", "")))
            if target is not None and not ours:
                self._send_now(target, line)
        else:
            room = self.chat.rooms.get(room_key)
            if room is not None and not ours and kind in ("topic_set", "topic_cleared"):
                room.topic, room.topic_nick = network.topics[room_key]
                if room.topic is None:
                    room.topic_nick = None
            if room is not None and room.members:
                self.fanout.broadcast(room, encode_line(line), line)
                self.stats[line.kind] += 1
        if ours and room_key:
            self._delivered(entry["s"])

    def _delivered(self, number):
        """One of our entries is back: what waited for it is done, in order.
        (The sequence starts with a marker whenever it is not empty; an entry
        of ours that nothing waited for, such as a private message, has none.)"""
        self.unconfirmed.pop(number, None)  # delivered: its sender has its echo
        if self.sequence and self.sequence[0] == (None, number):
            self.sequence.popleft()
        while self.sequence and self.sequence[0][0] is not None:
            self._run_waiting(self.sequence.popleft())

    def _run_waiting(self, item):
        """Run a waiting action; what it queues goes before what waited after it."""
        action, args = item
        self.inserting = []
        try:
            action(*args)
        finally:
            queued, self.inserting = self.inserting, None
            self.sequence.extendleft(reversed(queued))

    def _heartbeat(self):
        network = self.network
        if not network.down:
            now = time.monotonic()
            if (network.commands.waited(now) > REDIS_ANSWER_S or network.feed.waited(now)
                    > REDIS_READ_BLOCK_MS / 1000 + REDIS_ANSWER_S):
                self._network_lost("Redis did not answer in %g s" % REDIS_ANSWER_S)
            else:
                network.heartbeat()
        self.call_later(REDIS_HEARTBEAT_S, self._heartbeat)

    def _network_lost(self, why):
        """Redis went away: our users are told once, what waited for the feed
        is done, and we try again every REDIS_RETRY_S seconds."""
        if self.network.down:
            return
        self.log("the chat network is unreachable (%s): reconnecting" % why, always=True)
        for link in (self.network.commands, self.network.feed):
            try:
                self.selector.unregister(link.sock)
            except (KeyError, ValueError, OSError):
                pass
        self.network.lost()  # (what was unanswered is answered "not sent")
        for number in list(self.unconfirmed):  # accepted by Redis, not back: maybe lost
            self._not_sent(number)
        waiting, self.sequence = self.sequence, collections.deque()
        for action, args in waiting:
            if action is not None:
                self._run_waiting((action, args))
        for conn in self.chat.members.values():
            self._send_now(conn, notice(NETWORK_DOWN))
        self.call_later(REDIS_RETRY_S, self._reconnect_network)

    def _reconnect_network(self):
        if self.stopping:
            return
        self.off_loop(None, lambda: self.network.open_sockets(REDIS_RETRY_TIMEOUT_S),
                      self._network_answered)

    def _network_answered(self, sockets):
        if isinstance(sockets, Exception):
            self.call_later(REDIS_RETRY_S, self._reconnect_network)
            return
        for link in self.network.connect(self._network_lost, sockets):
            link.events = selectors.EVENT_READ
            self.selector.register(link.sock, link.events, link.on_ready)
        self.network.back(list(self.chat.members.values()))
        self.network.read_feed(self._from_feed)  # from where it stopped
        self.log("the chat network is back", always=True)
        for conn in self.chat.members.values():
            self._send_now(conn, notice(NETWORK_BACK))

    def _flush_network(self):
        for link in (self.network.commands, self.network.feed):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.flush() else 0)
            if link.alive and events != link.events:
                link.events = events
                self.selector.modify(link.sock, events, link.on_ready)


class Reading:
    """Part of ChatServer: reading, and the read gates: flood control,
    the pass's budget, and the slow-reader rules (docs/protocol.md, "Slow
    readers"): who is behind, when input waits, who is evicted."""

    # -- reading --

    def _read(self, conn):
        """Handle lines left from an earlier pass; then read more and handle those."""
        if conn.reader.has_line():
            self._handle_lines(conn)
            if conn.reader.has_line() or conn.phase == CLOSING:
                return  # the pass's budget is spent: the rest waits
        try:
            data = receive_some(conn.sock, conn.tls)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            return  # nothing yet (for TLS: no whole record yet)
        except OSError as exc:
            self._log_socket_error(conn, exc)
            self._drop(conn, LEFT_CLOSED)
            return
        if not data:
            self._peer_closed(conn)
            return
        if conn.phase == CLOSING:
            return  # a closing connection's input is discarded
        reader = conn.reader
        reader.feed(data)
        if reader.answers:  # telnet's (a web one's: pongs, refusals), out of band
            conn.outbuf += reader.answers
            reader.answers.clear()
            self.dirty.add(conn)
        if reader.request is not None:  # (web: an HTTP request)
            self._web_request(conn, reader)
        if reader.finished is not None:  # (web: closed by the peer, or refused)
            self._web_finished(conn, reader.finished)
            return
        self._handle_lines(conn)

    def _handle_lines(self, conn):
        """Hand complete lines to the chat while the read gates allow."""
        reader = conn.reader
        rate = self.limits.rate
        while conn.phase not in (CLOSING, CLOSED) and not conn.waiting:
            if self.throttled:
                self._hold(conn)  # a member is behind: the rest when it has caught up
                return
            if self.fanout.size >= self.limits.pass_budget:
                self.deferred[conn] = None  # the rest in a later pass
                return
            if len(conn.outbuf) > self.limits.max_sendq:
                # Its own back-pressure: the replies it asked for are not
                # read yet. The rest of its input waits until they are.
                conn.full = True
                self._watch(conn)
                return
            if rate and not self._take_token(conn):
                return
            line = reader.pop_line()
            if line is None:
                return
            if line is TOO_LONG:
                self.send(conn, error("line_too_long", max=self.limits.max_line))
                continue
            if rate:
                conn.tokens -= 1 + len(line) // BYTES_PER_EXTRA_TOKEN
            self.chat.handle_line(conn, line)

    def _take_token(self, conn):
        """Refill the bucket; if it is empty and a line waits, pause reading.

        Pausing is TCP back-pressure: the peer's kernel stops sending once our
        receive buffer fills, so a fast sender is slowed and nothing is lost.
        """
        now = time.monotonic()
        limits = self.limits
        conn.tokens = min(float(limits.burst),
                          conn.tokens + (now - conn.refilled) * limits.rate)
        conn.refilled = now
        if conn.tokens >= 1 or not conn.reader.has_line():
            return True
        if not conn.paused:
            conn.paused = True
            self._watch(conn)
            self.call_later((1 - conn.tokens) / limits.rate, self._resume_reading, conn)
        return False

    def _resume_reading(self, conn):
        conn.paused = False
        self._handle_lines(conn)
        if conn.phase != CLOSED:
            self._watch(conn)

    def _read_deferred(self):
        """First in a pass: the reads an earlier pass put off, oldest first."""
        deferred, self.deferred = self.deferred, {}
        for conn in deferred:
            if conn.phase != CLOSED and not conn.paused:
                self._on_event_guarded(conn, selectors.EVENT_READ)

    # -- slow readers (docs/protocol.md, "Slow readers") --

    def _input_must_wait(self):
        """Evict the readers that stopped or stayed behind too long; then tell
        whether input must wait: while a reader that still reads is past
        max_backlog, or everyone's backlog together is past max_output. A
        reader merely behind holds nobody: its lines wait in its backlog."""
        if self.behind:
            now = time.monotonic()
            for conn in [conn for conn in self.behind if self._too_slow(conn, now)]:
                self.log("%s evicted: %d bytes unsent" % (conn.name, len(conn.outbuf)))
                self.stats["evictions"] += 1
                self._drop(conn, LEFT_TOO_SLOW)
        if self.backlog > self.limits.max_output:
            return True
        if not self.behind:
            return False
        now = time.monotonic()
        max_backlog = self.limits.max_backlog
        return any(len(conn.outbuf) > max_backlog and now - conn.drained_at < STALL_S
                   for conn in self.behind)

    def _too_slow(self, conn, now):
        """Behind, and either took nothing for STALL_S or behind for max_lag.

        "Took nothing" is judged by the kernel where it can say: a socket
        whose send buffer is full is reported writable only once a third of
        it is free, which at 250 KB/s can take a second, while the reader
        reads all along (the bytes the kernel still holds go down)."""
        if now - conn.behind_since >= self.limits.max_lag:
            return True
        if now - conn.drained_at < STALL_S:
            return False
        unsent = kernel_unsent(conn.sock)
        if unsent is not None and conn.kernel_unsent is not None and (
                unsent < conn.kernel_unsent):
            conn.kernel_unsent = unsent  # it took some: still reading
            conn.drained_at = now
            return False
        return True

    def _hold(self, conn):
        """Stop reading conn until the members behind have caught up."""
        if not conn.held:
            conn.held = True
            self.held.append(conn)
            self._watch(conn)

    def _release_held(self):
        held, self.held = self.held, []
        for conn in held:
            conn.held = False
            if conn.phase != CLOSED:
                self._watch(conn)
                self.deferred[conn] = None  # lines may wait in its reader

    def _note_backlog(self, conn):
        """After conn's outbuf changed: keep self.behind current, and let
        conn's own input go on once its backlog is back within max_sendq.

        A member is behind from when its backlog passes max_sendq until it
        has caught up, all of it: so the --max-lag clock is not reset by a
        reader that trickles just under the threshold and back.
        """
        self.backlog += len(conn.outbuf) - conn.counted_backlog
        conn.counted_backlog = len(conn.outbuf)
        over = len(conn.outbuf) > self.limits.max_sendq
        if conn.behind_since is None:
            if over and conn.joined:
                conn.behind_since = time.monotonic()
                conn.kernel_unsent = kernel_unsent(conn.sock)
                self.behind.add(conn)
        elif not conn.outbuf:
            conn.behind_since = None
            self.behind.discard(conn)
        if conn.full and not over:
            conn.full = False
            self.deferred[conn] = None  # its lines waiting in the reader, then reads


class WebServing:
    """Part of ChatServer: the web (--web). An HTTP request is answered (the
    page, /health, /metrics) and closed, or upgraded to a WebSocket, which is
    then a chat connection like any other (docs/protocol.md, "The web")."""

    def _web_request(self, conn, reader):
        request, reader.request = reader.request, None
        if request.method not in ("GET", "HEAD"):
            self._web_answer(conn, http_answer(405, "Method Not Allowed\n"))
        elif request.path == "/ws" and request.method == "GET":
            self._upgrade(conn, reader, request)
        else:
            head_only = request.method == "HEAD"
            if request.path == "/":
                host = re.sub(r"[^A-Za-z0-9.:\[\]-]", "", request.headers.get("host", ""))
                answer = http_answer(200, WEB_PAGE, "text/html; charset=utf-8", head_only,
                                     WEB_PAGE_CSP.format(ws="ws://%s wss://%s" % (host, host)
                                                         if host else ""))
            elif request.path == "/health":
                answer = http_answer(200, "ok", head_only=head_only)
            elif request.path == "/metrics" and conn.ip not in EXEMPT_ADDRESSES:
                answer = http_answer(403, "Forbidden: /metrics is for this machine only\n")
            elif request.path == "/metrics":
                answer = http_answer(200, self._metrics(), "text/plain; version=0.0.4",
                                     head_only)
            else:
                answer = http_answer(404, "Not Found\n", head_only=head_only)
            self._web_answer(conn, answer)

    def _web_answer(self, conn, answer):
        """An HTTP answer, then the connection is closed (it never was the chat's)."""
        conn.outbuf += answer
        self.dirty.add(conn)
        self.close(conn)

    def _upgrade(self, conn, reader, request):
        headers = request.headers
        key = headers.get("sec-websocket-key")
        if (headers.get("upgrade", "").lower() != "websocket" or not key
                or "upgrade" not in headers.get("connection", "").lower()
                or headers.get("sec-websocket-version") != "13"):
            self._web_answer(conn, http_answer(400, "Bad Request: a WebSocket handshake "
                                                    "(RFC 6455, version 13) is expected\n"))
            return
        if not origin_allowed(headers.get("origin"), headers.get("host", ""),
                              self.web_origins):
            self.log("%s: a WebSocket from the page of %s refused"
                     % (conn.name, headers.get("origin")))
            self._web_answer(conn, http_answer(403, "Forbidden: a page of another site\n"))
            return
        offered = [name.strip().lower()
                   for name in headers.get("sec-websocket-protocol", "").split(",")]
        irc = WS_IRC_SUBPROTOCOL in offered  # a web IRC client: IRC lines, not JSON
        conn.outbuf += ws_handshake_answer(key, WS_IRC_SUBPROTOCOL if irc else None)
        self.dirty.add(conn)
        reader.start_websocket()
        if irc:  # (frames that came with the handshake are IRC lines: translated now)
            conn.codec, conn.reader = WEB_IRC_CODEC, WebIrcReader(reader)
            conn.reader.feed(b"")
        self.chat.connected(conn)  # greeted now, in JSON objects (or IRC lines)
        if conn.reader.answers:  # (frames that came with the handshake)
            conn.outbuf += conn.reader.answers
            conn.reader.answers.clear()
        self.call_later(WS_PING_S, self._ws_ping, conn)

    def _web_finished(self, conn, why):
        """The peer closed its WebSocket, or sent what is refused: it leaves."""
        if conn.phase in (CLOSING, CLOSED):
            return
        self.log("%s: %s" % (conn.name, why))
        self.chat.disconnected(conn, LEFT_CLOSED)
        self.close(conn)

    def _ws_ping(self, conn):
        """Ping a WebSocket silent for WS_PING_S (a proxy between may drop it)."""
        if conn.phase in (CLOSING, CLOSED):
            return
        silent = time.monotonic() - conn.reader.heard_at
        if silent >= WS_PING_S:
            conn.outbuf += ws_frame(b"", WS_PING)
            self.dirty.add(conn)
            silent = 0.0
        self.call_later(WS_PING_S - silent, self._ws_ping, conn)

    def _metrics(self):
        """What an operator graphs, in Prometheus's text format."""
        kinds = collections.Counter(conn.codec.name for conn in self.conns
                                    if conn.phase not in (CLOSING, CLOSED))
        store = self.chat.store
        rows = [("chat_connections", "gauge", "Open connections, by how they speak.",
                 [('{kind="%s"}' % kind, kinds[kind]) for kind in ("text", "json", "web")]),
                ("chat_users", "gauge", "Registered users on this server.",
                 [("", len(self.chat.members))]),
                ("chat_rooms", "gauge", "Rooms with members on this server.",
                 [("", sum(1 for room in self.chat.rooms.values() if room.members))]),
                ("chat_messages_relayed_total", "counter",
                 "Messages and actions relayed to this server's members since start.",
                 [("", self.stats["message"] + self.stats["action"])]),
                ("chat_bytes_sent_total", "counter", "Bytes written to clients since start.",
                 [("", self.stats["bytes"])]),
                ("chat_evictions_total", "counter", "Clients evicted as too slow since start.",
                 [("", self.stats["evictions"])]),
                ("chat_store_write_seconds_total", "counter",
                 "Time spent writing history to the store since start.",
                 [("", round(getattr(store, "write_s", 0.0), 6))])]
        out = []
        for name, kind, text, samples in rows:
            out += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            out += ["%s%s %s" % (name, labels, value) for labels, value in samples]
        return "\n".join(out) + "\n"


class ChatServer(Acceptor, Reading, NetworkFeed, WebServing):
    """The server: a selectors loop that owns the sockets, and a Chat that
    owns the meaning of lines.

    Called from outside: bind(), start(), serve_forever(), shutdown().
    Called by the Chat (its whole view of the loop): send(), broadcast(),
    then(), enter(), leave(), rekey(), focus(), close(), when_written(), log(),
    call_later(), off_loop(), pause_input(), resume_input().
    Everything else is the loop's own: accepting, TLS, reading, writing,
    back-pressure and slow readers, timers, and the two ways out: close()
    (the chat's: write what is owed, then close) and _drop() (the peer is
    gone or too slow: now).
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, limits=None,
                 log=log_to_stderr, verbose=True, tls_context=None, password=None,
                 op_password=None, store=None, replay=REPLAY_MESSAGES, operators=(),
                 network=None, motd=(), listeners=(), web_origins=()):
        self.limits = limits or Limits()
        # The chat's own port first (its address is the server's), then any others.
        self.listeners = [Listener(host, port, tls_context)] + list(listeners)
        self.logger = log                  # None: silent
        self.verbose = verbose             # False (-q): no per-client lines
        self.chat = Chat(self, self.limits, password, op_password, store, replay, operators,
                         network, motd)
        self.fanout = FanOut()
        # Several servers: a room's lines go out through Redis and are delivered
        # when they come back. What the chat does meanwhile waits in sequence,
        # behind (None, number) for each of our entries not back yet.
        self.network = network
        self.sequence = collections.deque()
        self.inserting = None              # while a waiting action runs: what it queues
        self.unconfirmed = {}              # our messages not back from the feed: number -> sender
        self.selector = None
        self.address = None                # (host, port) the first listener bound
        self.conns = set()                 # every open socket but the listener
        self.per_ip = {}                   # ip -> connections counted
        self.counted = 0                   # connections counted, all addresses
        self.dirty = set()                 # connections with output to write
        self.deferred = {}                 # conns to read next pass (a dict: ordered, unique)
        self.behind = set()                # members more than max_sendq behind
        self.held = []                     # conns not read while a member is behind
        self.throttled = False             # must input wait for readers (this pass)?
        self.backlog = 0                   # every connection's unsent bytes, together
        self.timers = []                   # heap of [when, seq, function, conn]
        self.timer_seq = 0
        self.cancelled_timers = 0          # entries in timers whose function is None
        self.spare_fd = None               # given up to accept-and-refuse at EMFILE
        self.wake_r = self.wake_w = None
        self.workers = {}                  # lane -> its Worker, made when first needed
        self.stopping = False
        self.stats = collections.Counter()  # since start: lines by kind, bytes, evictions
        self.web_origins = frozenset(web_origins)  # --web-origin: pages elsewhere allowed

    # -- lifecycle --

    def bind(self):
        """Create the listening sockets. Raises OSError (socket.gaierror: a
        bad host), having closed those it made."""
        try:
            for listener in self.listeners:
                if listener.sock is None:
                    failing = listener
                    listener.bind()
        except OSError as exc:
            exc.where = (failing.host, failing.port)  # which one, for the one-line answer
            for listener in self.listeners:
                if listener.sock is not None:
                    listener.sock.close()
                    listener.sock = None
            raise
        self.address = self.listeners[0].address

    def start(self):
        """Bind (unless bind() did) and listen; return the (host, port) bound.
        Raises OSError."""
        self.bind()
        self.selector = selectors.DefaultSelector()
        self._accept_on_every_listener()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        if self.network is not None:
            for link in self.network.connect(self._network_lost):
                link.events = selectors.EVENT_READ
                self.selector.register(link.sock, link.events, link.on_ready)
            self.network.read_feed(self._from_feed)
            self._heartbeat()
        self._open_spare_fd()
        for listener in self.listeners:
            if listener.codec is WEB_CODEC:
                self.log("the web page: %s://%s/" % (
                    "https" if listener.tls_context else "http",
                    format_address(listener.address)), always=True)
            else:
                self.log("listening on %s%s" % (format_address(listener.address), "" if (
                    listener.codec is TEXT_CODEC) else " (%s)" % listener.codec.name),
                         always=True)
        return self.address

    def serve_forever(self):
        """Run the loop until shutdown(); then say goodbye, flush, close."""
        try:
            while not self.stopping:
                self._run_pass(self._next_timeout())
            self._say_goodbye()
        finally:
            self._close_everything()

    def shutdown(self):
        """Ask the loop to stop; safe from another thread or a signal handler."""
        self.stopping = True
        self.wake()

    def _run_pass(self, timeout):
        """One loop pass: dispatch ready sockets, fire timers, write output."""
        events = self.selector.select(timeout)
        self.throttled = self._input_must_wait()
        if self.held and not self.throttled:
            self._release_held()
        self._read_deferred()
        for key, mask in events:
            if isinstance(key.data, Connection):
                self._on_event_guarded(key.data, mask)
            else:
                key.data()
        self._fire_timers()
        self._write_output()

    def _next_timeout(self):
        """Sleep until the next timer, or not at all while work is waiting."""
        if (self.fanout.size or self.dirty or self.deferred
                or (self.held and not self.throttled)
                or (self.network is not None and self.network.unsent())):
            return 0
        timeout = HELD_RECHECK_S if self.behind else None  # judge the slow readers
        if self.timers:
            due = max(0.0, self.timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _on_wake(self):
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass  # drained
        for worker in list(self.workers.values()):
            for done, conn, result in worker.finished():
                self._answered(done, conn, result)

    def _answered(self, done, conn, result):
        """Work done off the loop: its answer, then conn's input goes on."""
        if conn is None:
            done(result)
            return
        conn.waiting = False
        if conn.phase == CLOSED:
            return
        try:
            done(result)
        except Exception:  # deliberately broad: the room must outlive a bug
            self.log("internal error on %s, dropped:\n%s"
                     % (conn.name, traceback.format_exc().rstrip()), always=True)
            self._drop(conn, LEFT_CLOSED)
            return
        self.deferred[conn] = None  # the lines that waited in its reader
        self._watch(conn)

    def wake(self):
        """Wake the loop from another thread (or a signal handler)."""
        try:
            self.wake_w.send(b"x")
        except (OSError, AttributeError):
            pass  # the loop is already awake, finished, or never started

    def _say_goodbye(self):
        """Tell every connection the server is going; flush for a while."""
        self.log("shutting down", always=True)
        for room in list(self.fanout.pending):
            self._deliver(room)
        if self.network is not None:
            self.network.goodbye(list(self.chat.members.values()))
        line = notice(SHUTDOWN_NOTICE)
        for conn in self.conns:
            if conn.phase not in (CLOSING, CLOSED) and not conn.handshake_wait:
                conn.outbuf += conn.codec.encode(line, conn)
                self.dirty.add(conn)
        deadline = time.monotonic() + SHUTDOWN_FLUSH_S
        while True:
            for conn in list(self.conns):
                if conn.outbuf:
                    self._flush(conn)
            if not any(conn.outbuf and not conn.handshake_wait for conn in self.conns):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)  # a bounded wait for slow readers, not a sync
        for conn in self.conns:
            if not conn.handshake_wait:
                self._send_close_notify(conn)
            self._discard_input(conn)

    def _discard_input(self, conn):
        """Read and forget what the peer sent: closing with unread input
        resets the connection, which can destroy our last lines in flight."""
        try:
            while conn.sock.recv(RECV_BYTES):
                pass
        except OSError:
            pass  # drained, or the peer is gone: either way, done

    def _close_everything(self):
        for worker in self.workers.values():
            worker.stop()
        if self.network is not None:
            self.network.close()
        self.chat.close()
        for conn in list(self.conns):
            self._forget(conn)
        for sock in [listener.sock for listener in self.listeners] + [self.wake_r, self.wake_w]:
            if sock is not None:
                sock.close()
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        if self.selector is not None:
            self.selector.close()

    # -- the Chat's view of the loop --

    def send(self, conn, text):
        """Queue a line for one connection, after the broadcasts it is owed."""
        self._in_order(self._send_now, conn, text)

    def when_written(self, conn, action):
        """Call action() once what conn was sent so far has left through its
        socket (never, if conn goes before that)."""
        self._in_order(self._when_written_now, conn, action)

    def _when_written_now(self, conn, action):
        if conn.phase == CLOSED:
            return
        conn.on_written.append((conn.sent_total + len(conn.outbuf), action))
        self._written(conn)

    def _written(self, conn):
        while conn.on_written and conn.on_written[0][0] <= conn.sent_total:
            conn.on_written.pop(0)[1]()

    def _send_now(self, conn, text):
        if conn.phase == CLOSED:
            return
        self._catch_up(conn)
        conn.outbuf += conn.codec.encode(text, conn)
        self.dirty.add(conn)

    def _catch_up(self, conn):
        """Give conn the pass's lines of its rooms so far (before a line to
        it alone, or before its current room changes): each room's order kept."""
        for room in conn.joined:
            if room in self.fanout.pending:
                self.chat.commit()  # nothing reaches a socket before it is stored
                conn.outbuf += self.fanout.catch_up(room, conn)

    def focus(self, conn, room):
        """conn's current room is now room: lines of its other rooms are
        marked with their room's name from here on (text mode)."""
        self._in_order(self._focus_now, conn, room)

    def _focus_now(self, conn, room):
        if conn.phase != CLOSED and conn.focus is not room:
            self._catch_up(conn)
            conn.focus = room
            self.dirty.add(conn)

    def broadcast(self, room, text):
        """Queue a line for every member of room, in the one order all of them
        see (several servers: the feed's, once it comes back from Redis)."""
        if self.network is None or self.network.down:
            self.fanout.broadcast(room, encode_line(text), text)  # (down: ours only)
            self.stats[text.kind] += 1
            return
        failed, sender, published = None, None, []
        if text.kind in ("message", "action"):  # refused, or never back: its sender is told
            sender = self.chat.members.get(nick_key(text.fields["nick"]))
            failed = sender and (lambda: self._not_sent(published[0]))  # (called later)
        number = self.network.publish(room.key, room.name, text, failed)
        published.append(number)
        if sender is not None:
            self.unconfirmed[number] = sender
        (self.inserting if self.inserting is not None else self.sequence).append((None, number))

    def then(self, action):
        """Call action() once the lines broadcast so far are delivered."""
        self._in_order(action)

    def enter(self, room, conn):
        """conn is now a member of room: it gets the room's lines from here on."""
        self._in_order(self.fanout.enter, room, conn)

    def rekey(self, room, conn, old_key):
        """conn was renamed: the room finds it by its new key from now on."""
        self.fanout.rekey(room, conn, old_key)

    def leave(self, room, conn):
        """conn leaves room: it still gets what the room was sent before."""
        self._in_order(self._leave_now, room, conn)

    def _leave_now(self, room, conn):
        owed = self.fanout.leave(room, conn)
        if owed:
            conn.outbuf += owed
            self.dirty.add(conn)
        self.behind.discard(conn)
        conn.behind_since = None
        if not room.members:  # (several servers: the leave waited behind the feed)
            self.chat.forget_if_empty(room)

    def close(self, conn, delay=0.0):
        """Stop handling conn's input; close it once its output is written,
        and not before delay seconds."""
        if self.sequence or self.inserting:
            conn.waiting = True  # no more of its lines meanwhile
        self._in_order(self._close_now, conn, delay)

    def _close_now(self, conn, delay):
        if conn.phase in (CLOSING, CLOSED):
            return
        self.chat.disconnected(conn, LEFT_QUIT)  # a member still in the room leaves
        self._uncount(conn)
        conn.outbuf += conn.reader.goodbye()  # (a WebSocket's close frame)
        conn.phase = CLOSING
        conn.paused = conn.held = conn.full = False  # read on, to notice the peer's close
        conn.close_at = time.monotonic() + delay
        self.dirty.add(conn)
        if delay:
            self.call_later(delay, self._flush, conn)  # it may have nothing more to write
        self.call_later(delay + LINGER_S, self._forget, conn)

    def log(self, text, always=False):
        if self.logger is not None and (always or self.verbose):
            self.logger(text)

    @property
    def worker(self):
        """The reads lane's worker (None before it is first needed)."""
        return self.workers.get(LANE_READS)

    def off_loop(self, conn, work, done, lane=LANE_READS):
        """Run work() in the lane's worker thread, then done(its result) in
        the loop; conn's input (if conn is not None) waits meanwhile, so that
        its answers stay in order."""
        worker = self.workers.get(lane)
        if worker is None:
            worker = self.workers[lane] = Worker(
                self.wake, at_exit=self.chat.close_readers, name="worker-" + lane)
        if conn is not None:
            conn.waiting = True
            self._watch(conn)
        worker.submit(work, done, conn)

    def pause_input(self, conn):
        """Stop handling conn's input until resume_input(conn)."""
        conn.waiting = True
        self._watch(conn)

    def resume_input(self, conn):
        conn.waiting = False
        if conn.phase != CLOSED:
            self.deferred[conn] = None  # the lines that waited in its reader
            self._watch(conn)

    def call_later(self, delay, function, conn=None):
        """Call function(conn) (or function()) after delay seconds.

        A connection's timers are cancelled when it closes, so that a closed
        connection is not kept in memory until they fire.
        """
        self.timer_seq += 1
        timer = [time.monotonic() + delay, self.timer_seq, function, conn]
        heapq.heappush(self.timers, timer)
        if conn is not None:
            conn.timers.append(timer)

    # -- timers --

    def _cancel_timers(self, conn):
        for timer in conn.timers:
            timer[2] = timer[3] = None
        self.cancelled_timers += len(conn.timers)
        conn.timers.clear()
        # Rebuild the heap once it is mostly cancelled entries: they are small,
        # but a churn of connections would pile them up for a minute.
        if self.cancelled_timers > 64 and self.cancelled_timers * 2 > len(self.timers):
            self.timers = [timer for timer in self.timers if timer[2] is not None]
            heapq.heapify(self.timers)
            self.cancelled_timers = 0

    def _fire_timers(self):
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            timer = heapq.heappop(self.timers)
            _, _, function, conn = timer
            if function is None:
                self.cancelled_timers -= 1
            elif conn is None:
                function()
            else:
                conn.timers.remove(timer)
                function(conn)

    # -- the selector's view of a connection --

    def _watch(self, conn):
        """Make the selector watch conn for exactly what it needs now.

        Reading unless a read gate is shut (a closing connection reads on, to
        notice the peer's close); writing only while outbuf holds bytes (it is
        called after a send, so: bytes the send left).
        """
        if conn.handshake_wait:
            want = conn.handshake_wait
        else:
            reading = not conn.peer_done and (conn.phase == CLOSING or not (
                conn.paused or conn.held or conn.full or conn.waiting))
            want = selectors.EVENT_READ if reading else 0
            if conn.outbuf:
                want |= selectors.EVENT_WRITE
        if conn.phase != CLOSED:
            conn.events = watch(self.selector, conn.sock, conn.events, want, conn)

    def _on_event_guarded(self, conn, mask):
        """Handle an event; a bug here costs one connection, never the room."""
        try:
            self._on_event(conn, mask)
        except Exception:  # deliberately broad: the room must outlive a bug
            self.log("internal error on %s, dropped:\n%s"
                     % (conn.name, traceback.format_exc().rstrip()), always=True)
            self._drop(conn, LEFT_CLOSED)

    def _on_event(self, conn, mask):
        if conn.phase == CLOSED:
            return
        if conn.handshake_wait:
            self._continue_handshake(conn)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.phase != CLOSED:
            if self.throttled:
                self._hold(conn)
            elif self.fanout.size >= self.limits.pass_budget:
                self.deferred[conn] = None  # read in a later pass, in this order
            else:
                self._read(conn)

    # -- writing --

    def _deliver(self, room, write=False):
        """Hand room's broadcasts queued so far to its members, in one piece.

        With write (at the end of a pass), a member with nothing else queued
        is sent the shared bytes at once: no copy per member, one send each.
        Otherwise, or for what a send leaves, they are appended to outbuf.
        """
        self.chat.commit()  # nothing reaches a socket before it is stored
        this_pass, late = self.fanout.take(room)
        data = this_pass.data
        if not data:
            return
        plain = not this_pass.about_person  # (else each member is checked: see rendered())
        # IRC members share the pass by capabilities (see IrcCodec.pass_group),
        # checked here inline: this loop runs once per member per pass.
        speakers = this_pass.said_by(IRC_SHARED_KINDS) if plain else None
        irc_chunks = {}
        failed = []
        for conn in room.members.values():
            if conn.phase == CLOSED:
                continue  # closed while its leave waits behind the feed (several servers)
            offset = late.get(conn, 0) if late else 0
            if plain and conn.codec is TEXT_CODEC and conn.focus is room:
                chunk = data[offset:] if offset else data  # as said: most members, most passes
            elif (speakers is not None and conn.codec is IRC_CODEC and not offset
                  and conn.nick not in speakers and not conn.reader.nickserv
                  and not conn.reader.sasl and conn.reader.held is None):
                chunk = irc_chunks.get(conn.reader.caps_key)
                if chunk is None:
                    chunk = irc_chunks[conn.reader.caps_key] = this_pass.for_member(conn, 0)
            else:
                chunk = this_pass.for_member(conn, offset)
            if not chunk:
                continue
            if (write and not conn.outbuf and not conn.tls
                    and not conn.events & selectors.EVENT_WRITE):
                try:
                    sent = conn.sock.send(chunk)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    failed.append((conn, exc))
                    continue
                if sent:
                    conn.drained_at = time.monotonic()
                    conn.sent_total += sent
                    self.stats["bytes"] += sent
                    if conn.on_written:
                        self._written(conn)
                if sent == len(chunk):
                    continue
                chunk = memoryview(chunk)[sent:]
            conn.outbuf += chunk
            self.dirty.add(conn)
        for conn, exc in failed:  # dropped after the loop: it changes members
            self._log_socket_error(conn, exc)
            self._drop(conn, LEFT_CLOSED)

    def _write_output(self):
        """Deliver the pass's broadcasts; write each connection with output
        once; note who is behind."""
        for room in list(self.fanout.pending):
            self._deliver(room, write=True)
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:
            if conn.phase == CLOSED:
                continue
            if not conn.events & selectors.EVENT_WRITE:
                self._flush(conn)  # else: the socket is full; the selector tells us
            if conn.phase != CLOSED:
                self._note_backlog(conn)
        for room in list(self.fanout.pending):
            self._deliver(room)  # leave notices from drops: sent next pass
        if self.network is not None:
            self._flush_network()

    def _flush(self, conn):
        """Send as much of outbuf as the socket takes, in one call (TLS: a few)."""
        if conn.handshake_wait or conn.phase == CLOSED:
            return  # outbuf waits for the handshake
        if conn.outbuf:
            try:
                sent = send_some(conn.sock, conn.outbuf, conn.tls)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._log_socket_error(conn, exc)
                self._drop(conn, LEFT_CLOSED)
                return
            if sent:
                del conn.outbuf[:sent]
                conn.drained_at = time.monotonic()
                conn.sent_total += sent
                self.stats["bytes"] += sent
                if conn.behind_since is not None:
                    conn.kernel_unsent = kernel_unsent(conn.sock)
                if conn.on_written:
                    self._written(conn)
                self._note_backlog(conn)
        if (conn.phase == CLOSING and not conn.outbuf and conn.close_at is not None
                and time.monotonic() >= conn.close_at):
            self._shut_write(conn)
        else:
            self._watch(conn)

    # -- ways out --

    def _log_socket_error(self, conn, exc):
        """A peer that closed while lines were on their way to it is an
        ordinary leave (its left line is logged); anything else is worth a line."""
        if not isinstance(exc, ORDINARY_DISCONNECTS):
            self.log("%s: %s" % (conn.name, exc))

    @staticmethod
    def _send_close_notify(conn):
        """TLS: end with a close_notify, so the peer can tell our close from
        a connection cut short (openssl s_client: "unexpected eof")."""
        if not conn.tls:
            return
        try:
            conn.sock.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # ours went; the peer's answer is not waited for
        except (ssl.SSLError, OSError, ValueError):
            pass  # the peer is gone: nothing to tell

    def _peer_closed(self, conn):
        """The peer sent its last byte: a close, or a half-close (nc after
        its input ends, shutdown(SHUT_WR)) from a peer that still reads.
        It leaves now; what it is owed is written before the socket closes:
        replies still on their way (several servers: behind the feed) too."""
        conn.peer_done = True
        if conn.phase == CLOSING:
            if conn.close_at is None or not conn.outbuf:
                self._forget(conn)  # nothing more for it, or it has all of it
            else:
                self._watch(conn)  # writing on; no more reading
            return
        if conn.phase in (HANDSHAKE, PASSWORD, NICKNAME):
            self.log("%s disconnected" % conn.name)
        self.chat.disconnected(conn, LEFT_CLOSED)
        self.close(conn)

    def _shut_write(self, conn):
        """Everything is written: say we are done, and wait for the peer's close.

        Closing at once would reset the connection if the peer's late bytes
        arrive, and a reset can destroy our last lines before it reads them.
        """
        if conn.peer_done:
            self._forget(conn)  # its close came already
            return
        conn.close_at = None
        self._send_close_notify(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._forget(conn)
            return
        self._watch(conn)

    def _drop(self, conn, reason):
        """The peer is gone (or too slow): it leaves its room, closed now."""
        if conn.phase == CLOSED:
            return
        if conn.phase in (HANDSHAKE, PASSWORD, NICKNAME):
            self.log("%s disconnected" % conn.name)
        self.chat.disconnected(conn, reason)
        self._forget(conn)

    def _forget(self, conn):
        """Close the socket and forget everything about conn."""
        if conn.phase == CLOSED:
            return
        if conn.phase == MEMBER:  # its rooms must not keep a closed socket
            self.chat.disconnected(conn, None)
        self._uncount(conn)
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.sock.close()
        self._cancel_timers(conn)
        conn.phase = CLOSED
        conn.events = 0
        conn.outbuf.clear()
        self.backlog -= conn.counted_backlog
        conn.counted_backlog = 0
        self.conns.discard(conn)
        self.dirty.discard(conn)
        self.behind.discard(conn)


# --- The web ------------------------------------------------------------------
# --web PORT: HTTP and WebSocket (RFC 6455) in the same loop, standard
# library only. A web connection's reader reads an HTTP request first; the
# server answers it (the page, /health, /metrics) or upgrades it to a
# WebSocket, after which each text frame is a line, and the WebCodec sends
# each Line as a JSON object in a text frame. The page is WEB_PAGE, below.

WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_NORMAL, WS_GOING_AWAY, WS_PROTOCOL_ERROR, WS_UNSUPPORTED = 1000, 1001, 1002, 1003


def ws_frame(payload, opcode=WS_TEXT):
    """One unmasked, unfragmented frame (the server's)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 126)) + struct.pack(">H", size)
    else:
        head = bytes((0x80 | opcode, 127)) + struct.pack(">Q", size)
    return head + payload


def ws_close_frame(code, reason=""):
    return ws_frame(struct.pack(">H", code) + reason.encode(ENCODING)[:123], WS_CLOSE)


def ws_unmask(data, mask):
    """A client frame's payload, unmasked (XOR with the 4-byte key, repeated)."""
    size = len(data)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def ws_accept(key):
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    import base64  # (only the web needs it)
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode()


class HttpRequest:
    """An HTTP request's head: method, path, version, headers (names lower-cased)."""

    __slots__ = ("method", "path", "version", "headers")

    def __init__(self, method, path, version, headers):
        self.method, self.path, self.version, self.headers = method, path, version, headers

    @classmethod
    def parse(cls, head):
        """The request in head (bytes up to the blank line), or None if it is
        not HTTP/1.x."""
        try:
            lines = head.decode("iso-8859-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except (UnicodeDecodeError, ValueError):
            return None
        if not version.startswith("HTTP/1."):
            return None
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                name = name.strip().lower()
                value = value.strip()
                headers[name] = headers[name] + ", " + value if name in headers else value
        path = urllib.parse.urlsplit(target).path or "/"
        return cls(method, path, version, headers)


class WebReader:
    """A web connection's input, with LineReader's interface (feed, pop_line,
    has_line, answers): an HTTP request's head first (request, for the server
    to answer: it calls start_websocket() to upgrade), then WebSocket frames,
    each text message one line. finished says why the peer is done (its close,
    or a frame this server refuses), once the answers are written."""

    __slots__ = ("max_line", "buf", "answers", "request", "websocket", "lines", "message",
                 "too_long", "skip", "finished", "heard_at", "closing")

    def __init__(self, max_line=MAX_LINE_BYTES):
        self.max_line = max_line
        self.buf = bytearray()
        self.answers = bytearray()         # HTTP errors, pongs, close frames: out of band
        self.request = None                # a request the server has not answered yet
        self.websocket = False             # upgraded
        self.lines = collections.deque()   # complete lines (bytes), or TOO_LONG
        self.message = bytearray()         # a fragmented message so far
        self.too_long = False              # ...which is past max_line: discarded
        self.skip = 0                      # payload bytes still to drop (a frame too long)
        self.finished = None
        self.heard_at = time.monotonic()   # when a frame last came (for the pings)
        self.closing = False               # a close frame is sent

    def feed(self, data):
        self.heard_at = time.monotonic()
        if self.finished is not None:
            return
        self.buf += data
        if self.websocket:
            self._frames()
        elif self.request is None:
            self._head()

    def _head(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > HTTP_HEAD_MAX:
                self.refuse(431)
            return
        if end > HTTP_HEAD_MAX:
            self.refuse(431)
            return
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        self.request = HttpRequest.parse(head)
        if self.request is None:
            self.refuse(400)

    def refuse(self, status):
        """Answer with an error status and be done."""
        self.answers += http_answer(status, http.HTTPStatus(status).phrase + "\n")
        self.finished = "HTTP %d" % status
        self.buf.clear()

    def start_websocket(self):
        """The request was an accepted WebSocket handshake: frames from now on."""
        self.request = None
        self.websocket = True
        self._frames()

    def goodbye(self):
        if self.websocket and not self.closing:
            self.closing = True
            return ws_close_frame(WS_NORMAL)
        return b""

    def pop_line(self):
        return self.lines.popleft() if self.lines else None

    def has_line(self):
        return bool(self.lines)

    def _fail(self, code, why):
        """A frame this server refuses: close with code, take nothing more."""
        if not self.closing:
            self.closing = True
            self.answers += ws_close_frame(code)
        self.finished = why
        self.buf.clear()

    def _frames(self):
        """Take every whole frame buf holds (a long payload as it comes)."""
        buf = self.buf
        while self.finished is None:
            if self.skip:  # the rest of a payload too long to keep
                dropped = min(self.skip, len(buf))
                del buf[:dropped]
                self.skip -= dropped
                if self.skip:
                    return
                continue
            if len(buf) < 2:
                return
            first, second = buf[0], buf[1]
            fin, opcode, size = first & 0x80, first & 0x0F, second & 0x7F
            start = 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, start = struct.unpack(">H", buf[2:4])[0], 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, start = struct.unpack(">Q", buf[2:10])[0], 10
            if first & 0x70 or not second & 0x80:  # reserved bits, or a frame not masked
                self._fail(WS_PROTOCOL_ERROR, "a frame not masked, or with reserved bits")
                return
            if opcode >= WS_CLOSE and (size > 125 or not fin):
                self._fail(WS_PROTOCOL_ERROR, "a control frame too long or fragmented")
                return
            if opcode == WS_BINARY or opcode not in (WS_CONTINUATION, WS_TEXT, WS_CLOSE,
                                                     WS_PING, WS_PONG):
                self._fail(WS_UNSUPPORTED, "a binary frame")
                return
            mask = bytes(buf[start:start + 4])
            start += 4
            if opcode < WS_CLOSE and len(self.message) + size > self.max_line:
                if len(buf) < start:
                    return
                del buf[:start]  # too long: its payload is dropped as it comes, not kept
                self.too_long = True
                self.skip = size
                if fin:
                    self._message_end()
                continue
            if len(buf) < start + size:
                return
            payload = ws_unmask(bytes(buf[start:start + size]), mask)
            del buf[:start + size]
            self._frame(fin, opcode, payload)

    def _frame(self, fin, opcode, payload):
        if opcode == WS_PING:
            self.answers += ws_frame(payload, WS_PONG)
        elif opcode == WS_CLOSE:
            if not self.closing:
                self.closing = True
                code = payload[:2] if len(payload) >= 2 else struct.pack(">H", WS_NORMAL)
                self.answers += ws_frame(code, WS_CLOSE)
            self.finished = "closed by the browser"
        elif opcode in (WS_TEXT, WS_CONTINUATION):
            self.message += payload
            if fin:
                self._message_end()

    def _message_end(self):
        self.lines.append(TOO_LONG if self.too_long else bytes(self.message))
        self.message.clear()
        self.too_long = False


# The web client (GET /): one page, its style and script inline and nothing
# fetched from elsewhere. Text from the chat is only ever set as textContent.
WEB_STYLE = r''':root{color-scheme:light dark;--bg:#fbfaf7;--fg:#1f2328;--dim:#6b7280;--line:#e5e2da;--side:#f2efe8;--acc:#2f6f5e;--mark:#fff3c4}
@media (prefers-color-scheme:dark){:root{--bg:#16181b;--fg:#e6e6e3;--dim:#9aa0a6;--line:#2c3035;--side:#1d2024;--acc:#7cc4ac;--mark:#4a4120}}
*{box-sizing:border-box}
html,body{margin:0;height:100%;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif}
button,input{font:inherit;color:inherit}
#login{max-width:22rem;margin:12vh auto;padding:1.5rem}
#login h1{font-size:1.4rem;margin:0 0 1rem}
#login label{display:block;margin:.7rem 0 .2rem;color:var(--dim);font-size:.9rem}
#login input{width:100%;padding:.5rem .6rem;border:1px solid var(--line);border-radius:6px;background:var(--bg)}
#login button{margin-top:1rem;width:100%;padding:.55rem;border:0;border-radius:6px;background:var(--acc);color:var(--bg);cursor:pointer}
#login .why{color:#c0392b;min-height:1.3em;margin-top:.6rem}
#app{display:none;height:100%;grid-template-columns:14rem minmax(0,1fr);grid-template-rows:minmax(0,1fr)}
#app.on{display:grid}
nav{background:var(--side);border-right:1px solid var(--line);overflow-y:auto;padding:.6rem}
nav h2{font-size:.75rem;text-transform:uppercase;letter-spacing:.06em;color:var(--dim);margin:.8rem .3rem .3rem}
nav ul{list-style:none;margin:0;padding:0}
nav button{display:flex;width:100%;justify-content:space-between;gap:.4rem;border:0;background:none;padding:.3rem .5rem;border-radius:5px;cursor:pointer;text-align:left;overflow-wrap:anywhere}
nav button[aria-current=true]{background:var(--bg);font-weight:600}
nav .n{background:var(--acc);color:var(--bg);border-radius:9px;padding:0 .45rem;font-size:.8rem}
main{display:grid;grid-template-rows:auto minmax(0,1fr) auto;min-width:0}
header{padding:.5rem .9rem;border-bottom:1px solid var(--line);min-width:0}
header h2{margin:0;font-size:1.05rem}
#topic,#who{color:var(--dim);font-size:.85rem;overflow-wrap:anywhere}
#log{overflow-y:auto;padding:.5rem .9rem;margin:0;list-style:none;min-width:0}
#log li{padding:.1rem 0;overflow-wrap:anywhere;white-space:pre-wrap}
#log time{color:var(--dim);font-size:.8rem;margin-right:.45rem;font-variant-numeric:tabular-nums}
#log .nick{font-weight:600;margin-right:.35rem}
#log .notice,#log .history{color:var(--dim)}
#log .error{color:#c0392b}
#log .mention{background:var(--mark)}
#log .earlier{font-size:.75rem;border:1px solid var(--line);border-radius:4px;padding:0 .25rem;margin-right:.35rem}
form#say{display:flex;gap:.4rem;padding:.5rem .9rem;border-top:1px solid var(--line)}
form#say input{flex:1;min-width:0;padding:.5rem .6rem;border:1px solid var(--line);border-radius:6px;background:var(--bg)}
#state{color:var(--dim);font-size:.85rem;padding:0 .9rem}
@media (max-width:640px){#app{grid-template-columns:minmax(0,1fr);grid-template-rows:auto minmax(0,1fr)}nav{border-right:0;border-bottom:1px solid var(--line);max-height:30vh}}'''
WEB_SCRIPT = r'''"use strict";
const $ = (id) => document.getElementById(id);
const S = {ws: null, nick: "", password: "", roomPassword: "", registered: false, leaving: false,
  rooms: new Map(), order: [], current: null, view: null, privates: new Map(), others: [],
  lastIds: {}, resuming: false, catching: [], held: [], backoff: 1000, sent: [], recall: -1,
  tried: false, roomsAsked: 0};
// The other rooms, for the side bar: asked again now and then, unseen.
setInterval(() => { if (S.registered) send("/rooms"); }, 20000);
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function room(name) { if (!S.rooms.has(name)) S.rooms.set(name, {name, lines: [], unread: 0, topic: null, who: []}); return S.rooms.get(name); }
function priv(nick) { const key = "@" + nick.toLowerCase(); if (!S.privates.has(key)) S.privates.set(key, {name: nick, lines: [], unread: 0, key}); return S.privates.get(key); }
function send(line) { if (S.ws && S.ws.readyState === 1) S.ws.send(line); }
function when(iso) { const d = iso ? new Date(iso) : new Date(); return d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}); }
function add(target, obj, parts, cls) {
  target.lines.push({obj, parts, cls});
  if (target.lines.length > 2000) target.lines.shift();
  if (S.view === target) draw(); else if (!obj.history && cls !== "notice") { target.unread++; side(); }
}
function line(item) {
  const li = el("li", undefined, item.cls || "");
  li.appendChild(el("time", when(item.obj.time)));
  if (item.obj.history) li.appendChild(el("span", "earlier", "earlier"));
  for (const [text, c] of item.parts) li.appendChild(el("span", text, c));
  return li;
}
function draw() {
  const log = $("log"), view = S.view; log.replaceChildren();
  if (!view) return;
  view.unread = 0;
  const frag = document.createDocumentFragment();
  for (const item of view.lines) frag.appendChild(line(item));
  log.appendChild(frag); log.scrollTop = log.scrollHeight;
  $("title").textContent = view.key ? "private: " + view.name : view.name;
  $("topic").textContent = view.key ? "" : (view.topic ? "topic: " + view.topic : "no topic");
  $("who").textContent = view.key ? "" : (view.who.length ? view.who.length + " here: " + view.who.join(", ") : "");
  side();
}
function entry(label, count, current, onclick) {
  const b = el("button"); b.appendChild(el("span", label));
  if (count) b.appendChild(el("span", String(count), "n"));
  b.setAttribute("aria-current", current ? "true" : "false");
  if (count) b.setAttribute("aria-label", label + ", " + count + " unread");
  b.onclick = onclick; const li = el("li"); li.appendChild(b); return li;
}
function side() {
  const mine = $("mine"), others = $("others"), privs = $("privs");
  mine.replaceChildren(); others.replaceChildren(); privs.replaceChildren();
  for (const name of S.order) { const r = room(name); mine.appendChild(entry(name, r.unread, S.view === r, () => openRoom(name))); }
  for (const name of S.others) if (!S.order.includes(name)) others.appendChild(entry(name, 0, false, () => send("/open " + name)));
  for (const p of S.privates.values()) privs.appendChild(entry(p.name, p.unread, S.view === p, () => { S.view = p; draw(); $("message").focus(); }));
}
function openRoom(name) { S.view = room(name); draw(); if (S.current !== name) send("/open " + name); $("message").focus(); }
function sayNotice(text, cls) { const t = S.view || room(S.current || "#lobby"); add(t, {time: null}, [[text]], cls || "notice"); }
function saw(obj) { if (typeof obj.id === "number" && obj.room && !(obj.id <= (S.lastIds[obj.room] || 0))) S.lastIds[obj.room] = obj.id; }
function said(obj) {
  const r = room(obj.room), mine = obj.nick === S.nick;
  const mention = !mine && S.nick && obj.text.toLowerCase().includes(S.nick.toLowerCase());
  const parts = obj.type === "action" ? [["* " + obj.nick + " ", "nick"], [obj.text]] : [[obj.nick, "nick"], [obj.text]];
  add(r, obj, parts, (obj.history ? "history" : "") + (mention ? " mention" : ""));
  saw(obj);
}
function joined(name) { if (!S.order.includes(name)) S.order.push(name); S.current = name; S.view = room(name); send("/who " + name); draw(); }
function handle(obj) {
  const t = obj.type;
  if (!S.registered) return unregistered(obj);
  if ((t === "message" || t === "action") && obj.history && S.resuming) return;
  if ((t === "message" || t === "action") && !obj.history && (S.resuming || S.catching.length)) { S.held.push(obj); return; }
  if (t === "message" || t === "action") {
    return said(obj);
  }
  if (t === "history_end") {
    if (S.catching.length && obj.room === S.catching[0]) { S.catching.shift(); nextCatchUp(); }
    return;
  }
  if (t === "private") {
    const other = obj.from === S.nick ? obj.to : obj.from, p = priv(other);
    add(p, obj, [[obj.from, "nick"], [obj.text]], obj.offline ? "history" : "");
    if (!S.view) { S.view = p; draw(); }
    return;
  }
  if (t === "joined") {
    if (obj.nick === S.nick && obj.room) return joined(obj.room);
    const r = room(obj.room); if (!r.who.includes(obj.nick)) r.who.push(obj.nick);
    add(r, obj, [[obj.nick + " joined" + (obj.room === "#lobby" ? " (" + obj.count + " online)" : " (" + obj.count + " here)")]], "notice");
    return;
  }
  if (t === "left") {
    const r = room(obj.room); r.who = r.who.filter((n) => n !== obj.nick);
    if (obj.nick === S.nick) { S.order = S.order.filter((n) => n !== obj.room); side(); }
    add(r, obj, [[obj.nick + " left (" + obj.reason + ")"]], "notice");
    return;
  }
  if (t === "renamed") {
    if (obj.old === S.nick) S.nick = obj.new;
    for (const r of S.rooms.values()) r.who = r.who.map((n) => n === obj.old ? obj.new : n);
    add(room(obj.room), obj, [[obj.old + " is now known as " + obj.new]], "notice");
    return;
  }
  if (t === "topic") { const r = room(obj.room); r.topic = obj.text; add(r, obj, [[obj.text === null ? (obj.nick ? obj.nick + " cleared the topic" : "no topic") : "topic: " + obj.text + (obj.nick ? " (set by " + obj.nick + ")" : "")]], "notice"); return; }
  if (t === "who") { const r = room(obj.room); r.who = obj.nicks.map((n) => (obj.operators.includes(n) ? "@" : "") + n + (obj.away && obj.away.includes(n) ? " (away)" : "")); if (S.view === r) draw(); return; }
  if (t === "rooms") {
    S.others = obj.rooms.map((r) => r.name); side();
    if (S.roomsAsked > 0) { S.roomsAsked--; sayNotice(obj.count + " online in " + obj.rooms.map((r) => r.name + " (" + r.count + ")").join(", ")); }
    return;
  }
  if (t === "pong") { if (obj.token === "web-resume") resumed(); return; }
  if (t === "notice" && obj.room !== undefined) { if (obj.room) { S.current = obj.room; S.view = room(obj.room); draw(); } else S.current = null; }
  if (t === "error") return sayNotice("!!! " + obj.text, "error");
  if (t === "kicked" || t === "banned" || t === "muted" || t === "unmuted" || t === "opped") {
    const what = {kicked: " was kicked by ", banned: " was banned by ", muted: " was muted by ", unmuted: " was unmuted by "}[t];
    return add(room(obj.room || S.current), obj, [[what ? obj.nick + what + obj.by + (obj.reason ? " (" + obj.reason + ")" : "") : obj.nick + " is now an operator"]], "notice");
  }
  if (t === "notice") return sayNotice(obj.text);
}
function unregistered(obj) {
  if (obj.type === "notice" && /needs a password/.test(obj.text)) { if (S.roomPassword) send("/pass " + S.roomPassword); return; }
  if (obj.type === "notice" && /nickname/.test(obj.text) && !S.tried) { S.tried = true; send(S.nick); return; }
  if (obj.type === "error") {
    if (obj.code === "nick_registered" && S.password) { S.viaLogin = true; send("/login " + S.nick + " " + S.password); return; }
    $("why").textContent = obj.text; S.leaving = true; S.ws.close(); showLogin(); return;
  }
  if (obj.type === "joined" && obj.nick.toLowerCase() === S.nick.toLowerCase()) {
    S.registered = true; S.nick = obj.nick; S.backoff = 1000; $("state").textContent = "";
    $("login").style.display = "none"; $("app").classList.add("on");
    const back = S.order.length > 0, rooms = S.order.slice(), current = S.current;
    if (!back) { joined(obj.room); if (S.password && !S.viaLogin) send("/register " + S.password); send("/rooms"); return; }
    S.resuming = true;
    if (!rooms.includes("#lobby")) send("/part #lobby");
    for (const name of rooms) if (name !== "#lobby") send("/open " + name);
    if (current && current !== rooms[rooms.length - 1]) send("/open " + current);
    S.order = rooms; send("/ping web-resume");
  }
}
function resumed() { S.resuming = false; S.catching = S.order.filter((n) => S.lastIds[n]); nextCatchUp(); }
function nextCatchUp() {
  if (S.catching.length) { const n = S.catching[0]; send("/history " + n + " after " + S.lastIds[n]); return; }
  const held = S.held; S.held = [];
  for (const obj of held) if (!(obj.id <= (S.lastIds[obj.room] || 0))) said(obj);
}
function connect() {
  S.tried = false; S.registered = false;
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  S.ws = ws;
  ws.onmessage = (ev) => { try { handle(JSON.parse(ev.data)); } catch (e) { console.error(e); } };
  ws.onclose = () => {
    if (S.leaving) return;
    $("state").textContent = "disconnected: reconnecting…";
    if (!S.order.length) { showLogin(); $("why").textContent = "could not connect"; return; }
    setTimeout(connect, S.backoff); S.backoff = Math.min(S.backoff * 2, 30000);
  };
}
function showLogin() { $("app").classList.remove("on"); $("login").style.display = "block"; }
$("enter").onsubmit = (ev) => {
  ev.preventDefault();
  S.nick = $("nickname").value.trim(); S.password = $("password").value; S.roomPassword = $("roompassword").value;
  if (!S.nick) { $("why").textContent = "choose a nickname"; return; }
  $("why").textContent = ""; S.leaving = false; connect();
};
$("say").onsubmit = (ev) => {
  ev.preventDefault();
  const box = $("message"), text = box.value;
  if (!text.trim()) return;
  S.sent.push(text); S.recall = S.sent.length; box.value = "";
  if (S.view && S.view.key && !text.startsWith("/")) send("/msg " + S.view.name + " " + text);
  else { if (/^\/quit\b/i.test(text)) S.leaving = true; if (/^\/rooms\s*$/i.test(text)) S.roomsAsked++; send(text); }
};
$("message").onkeydown = (ev) => {
  if (ev.key === "ArrowUp" && S.recall > 0) { S.recall--; ev.target.value = S.sent[S.recall]; ev.preventDefault(); }
  else if (ev.key === "ArrowDown" && S.recall < S.sent.length) { S.recall++; ev.target.value = S.sent[S.recall] || ""; ev.preventDefault(); }
};'''
WEB_PAGE = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat.py</title>
<style>{style}</style>
</head>
<body>
<section id="login">
<h1>chat.py</h1>
<form id="enter">
<label for="nickname">nickname</label>
<input id="nickname" name="nickname" autocomplete="username" maxlength="24" required autofocus>
<label for="password">password (your account's: optional)</label>
<input id="password" name="password" type="password" aria-label="password" autocomplete="current-password">
<label for="roompassword">room password (if the server has one)</label>
<input id="roompassword" name="roompassword" type="password" aria-label="room password">
<button type="submit">join</button>
<div class="why" id="why" role="alert"></div>
</form>
</section>
<div id="app">
<nav aria-label="rooms">
<h2 id="mine-h">your rooms</h2><ul id="mine" aria-labelledby="mine-h"></ul>
<h2 id="others-h">other rooms</h2><ul id="others" aria-labelledby="others-h"></ul>
<h2 id="privs-h">private</h2><ul id="privs" aria-labelledby="privs-h"></ul>
</nav>
<main>
<header><h2 id="title">#lobby</h2><div id="topic"></div><div id="who" aria-live="off"></div></header>
<ol id="log" aria-live="polite" aria-label="messages"></ol>
<div>
<div id="state" role="status"></div>
<form id="say"><label for="message" hidden>message</label><input id="message" aria-label="message" autocomplete="off" placeholder="message, or /help"></form>
</div>
</main>
</div>
<script>{script}</script>
</body>
</html>'''.replace("{style}", WEB_STYLE).replace("{script}", WEB_SCRIPT)


def _csp_hash(text):
    import base64  # (only the web needs it)
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode(ENCODING)).digest()).decode()


# The page may run only its own script and style, and talk only to its server.
WEB_PAGE_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self' {ws}; "
                "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                % (_csp_hash(WEB_SCRIPT), _csp_hash(WEB_STYLE)))


# Every web answer has these (docs/protocol.md, "The web"): the page may load
# nothing from elsewhere, and its script and style are its own, inline.
def http_answer(status, body=b"", content_type="text/plain; charset=utf-8", head_only=False,
                csp="default-src 'none'"):
    """A whole HTTP/1.1 answer, after which the server closes."""
    if isinstance(body, str):
        body = body.encode(ENCODING)
    head = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase),
            "Content-Type: " + content_type,
            "Content-Length: %d" % len(body),
            "Cache-Control: no-store",
            "Connection: close",
            "X-Content-Type-Options: nosniff",
            "Referrer-Policy: no-referrer",
            "Content-Security-Policy: " + csp]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def ws_handshake_answer(key, subprotocol=None):
    return ("HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n%s"
            "X-Content-Type-Options: nosniff\r\n"
            "Referrer-Policy: no-referrer\r\n"
            "Content-Security-Policy: default-src 'none'\r\n\r\n" % (
                ws_accept(key), "Sec-WebSocket-Protocol: %s\r\n" % subprotocol
                if subprotocol else "")).encode("ascii")


def origin_allowed(origin, host, allowed=()):
    """Whether a WebSocket handshake's Origin names the host it came to (or
    one of --web-origin's): a page elsewhere can't talk for its visitor."""
    if origin is None:
        return True  # not a browser's
    if origin in allowed:
        return True
    try:
        parts = urllib.parse.urlsplit(origin)
        came_to = urllib.parse.urlsplit("//" + host)
        default = 443 if parts.scheme == "https" else 80
        return (parts.scheme in ("http", "https") and parts.hostname is not None
                and parts.hostname == came_to.hostname
                and (parts.port or default) == (came_to.port or default))
    except ValueError:  # a port that is not a number
        return False


# --- IRC ----------------------------------------------------------------------
# --irc PORT: IRC clients (irssi, WeeChat, bots) in the same chat. The
# IrcReader turns each IRC line into the chat's own commands (JOIN #a is
# /open #a, PRIVMSG #a :hi is /msg #a hi...), and the IrcCodec renders each
# Line as IRC lines for its connection (numerics name the recipient, and a
# message is not echoed to its sender). A channel is a room. A first part:
# registration, the welcome and the MOTD, channels, messages, topics,
# names, list, away, quit, kick, oper; no IRCv3 capabilities yet.

IRC_SERVER = "chat.py"
IRC_HOST = "chat.py"                  # the host part of every user's prefix
IRC_BODY_BYTES = 510                  # an IRC line without its tags and CRLF, at most
IRC_TAGS_BYTES = 8191                 # its tags (with the @), at most
IRC_LINE_BYTES = IRC_TAGS_BYTES + 1 + IRC_BODY_BYTES
# The IRCv3 capabilities served (CAP LS).
IRC_CAPS = ("server-time", "message-tags", "echo-message", "batch", "multi-prefix", "sasl",
            "away-notify", "userhost-in-names", "draft/chathistory")
IRC_CAP_VALUES = {"sasl": "PLAIN"}    # (shown in CAP LS 302 as sasl=PLAIN)
IRC_BATCHES = itertools.count(1)      # a chathistory batch's reference tag: h1, h2...
IRC_HELD_MAX = 64 * 1024              # held for CAP END after a SASL login, at most
CHATHISTORY_SUBCOMMANDS = ("LATEST", "BEFORE", "AFTER", "AROUND", "BETWEEN")
CHATHISTORY_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,3}))?Z?")


def irc_line(kind, **fields):
    """A line only IRC connections are sent (it has no text of its own)."""
    return Line("", kind, fields)


def irc_fail(command, code, context, text):
    """An IRCv3 standard reply: FAIL COMMAND CODE CONTEXT :TEXT."""
    return irc_line("fail", command=command, code=code, context=context, text=text)


def chathistory_ref(word):
    """A CHATHISTORY reference, msgid=ID or timestamp=2026-12-01T14:03:05.123Z:
    ("msgid", ID) or ("timestamp", milliseconds since 1970); None if neither."""
    name, _, value = word.partition("=")
    if name == "msgid":
        number = decimal_number(value, MAX_MESSAGE_ID)
        return None if number is None else ("msgid", number)
    found = CHATHISTORY_TIMESTAMP.fullmatch(value) if name == "timestamp" else None
    if found is None:
        return None
    try:
        seconds = calendar.timegm(time.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # (a month 13...)
        return None
    return "timestamp", seconds * 1000 + int((found.group(2) or "0").ljust(3, "0"))


def chathistory_rows(store, room, sub, refs, limit):
    """The messages (rows, oldest first) a CHATHISTORY subcommand asks of a
    room's history. A timestamp is turned into ids by the messages' times,
    to the millisecond that server-time shows: "after" it is from the next
    millisecond on, "before" it below it."""
    def after(ref):  # the id the messages after ref are above
        kind, value = ref
        return value if kind == "msgid" else store.id_before(room, (value + 1) / 1000)

    def before(ref):  # the id the messages before ref are below
        kind, value = ref
        return value if kind == "msgid" else store.id_before(room, value / 1000) + 1

    if sub == "LATEST":
        return store.window(room, 0 if refs[0] is None else after(refs[0]), None, limit, True)
    if sub == "BEFORE":
        return store.window(room, 0, before(refs[0]), limit, True)
    if sub == "AFTER":
        return store.window(room, after(refs[0]), None, limit, False)
    if sub == "AROUND":  # half before it, the rest from it on (a msgid's own message too)
        edge = before(refs[0])
        earlier = store.window(room, 0, edge, limit // 2, True)
        return earlier + store.window(room, edge - 1, None, limit - len(earlier), False)
    first, second = refs  # BETWEEN: counted from the first, either way
    if before(first) <= before(second):
        return store.window(room, after(first), before(second), limit, False)
    return store.window(room, after(second), before(first), limit, True)


# IRC's formatting (bold, colours with their numbers, italics...): taken out
# whole, as the chat's cleaning would leave a colour's digits ("04red").
IRC_FORMATTING = re.compile("\x03(?:[0-9]{1,2}(?:,[0-9]{1,2})?)?"
                            "|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
                            "|[\x02\x0f\x11\x16\x1d\x1e\x1f]")


def irc_parse(line):
    """(verb, [params]) of an IRC line (bytes), tags, prefix and formatting
    dropped; None if empty."""
    text = IRC_FORMATTING.sub("", line.decode(ENCODING, "replace"))  # (cleaned as the
    # chat's lines, once translated)
    if text.startswith("@"):
        text = text.partition(" ")[2]
    if text.startswith(":"):
        text = text.partition(" ")[2]
    text = text.lstrip(" ")
    if not text:
        return None
    head, colon, trailing = text.partition(" :")
    params = head.split()
    if colon:
        params.append(trailing)
    elif text.endswith(" :"):
        params.append("")
    return params[0].upper(), params[1:]


class IrcReader(LineReader):
    """An IRC connection's input: IRC lines in, the chat's lines out (what
    pop_line() gives); what IRC answers at once (PONG, CAP) goes to answers."""

    __slots__ = ("out", "nick", "user", "capping", "registered", "caps", "nickserv", "whos",
                 "sasl", "kicking", "chat_max", "caps_key", "held", "username", "realname",
                 "wanted", "who_nicks")

    def __init__(self, max_line=MAX_LINE_BYTES):
        super().__init__(max(max_line, IRC_LINE_BYTES))
        self.chat_max = max_line  # (a message's text is held to the chat's limit)
        self.out = collections.deque()
        self.nick = None          # NICK given before USER: sent once registering may go on
        self.user = False         # USER given
        self.capping = False      # CAP LS without CAP END yet: registering waits
        self.registered = False   # the nick went to the chat
        self.caps = set()         # the capabilities acknowledged (CAP REQ)
        self.caps_key = frozenset()  # ...the same, to key renderings by
        self.nickserv = 0         # NickServ questions whose answers are still to come
        self.whos = 0             # WHO #channel asked: its /who answer is a WHO reply
        self.sasl = None          # "mechanism" (PLAIN asked), or "login" (sent: answer due)
        self.kicking = None       # the channel of the last KICK
        self.held = None          # logged in by SASL before CAP END: what waits for it
        self.username = self.realname = None  # USER's, for WHOIS
        self.wanted = None        # the first NICK it gave (IDENTIFY PASSWORD logs in to it)
        self.who_nicks = 0        # WHO NICK asked: its /whois answer is a WHO reply

    def feed(self, data):
        """Take what came (no telnet filtering: IRC clients send none), and
        translate its whole lines now: what IRC answers at once (PONG, CAP)
        goes out with this read."""
        self.buf += data
        while True:
            line = super().pop_line()
            if line is None:
                return
            self._take(line)

    def _take(self, line):
        """One IRC line (bytes, without its line end), translated; one over
        IRC's limits (510 bytes and the tags' 8191) is refused: 417."""
        if line is TOO_LONG:
            self.out.append(TOO_LONG)
            return
        tags, body = (line.split(b" ", 1) + [b""])[:2] if line.startswith(b"@") else (b"", line)
        if len(tags) > IRC_TAGS_BYTES or len(body.lstrip(b" ")) > IRC_BODY_BYTES:
            self.out.append(TOO_LONG)
            return
        parsed = irc_parse(line)
        if parsed is not None:
            self._translate(*parsed)

    def has_line(self):
        return bool(self.out)

    def pop_line(self):
        return self.out.popleft() if self.out else None

    def _say(self, text):
        """A line for the chat, which it takes only up to --max-line, as anyone's."""
        line = text.encode(ENCODING)
        self.out.append(TOO_LONG if len(line) > self.chat_max else line)

    def _answer(self, text):
        self.answers += (text + "\r\n").encode(ENCODING)

    def _release(self, data):
        """IRC lines (bytes) held back, out now."""
        self.answers += data

    def _need_more(self, verb, params):
        """A verb without what it needs: 461; PRIVMSG and NOTICE say which (411,
        412). (NOTICE is never answered with an error, as IRC has it.)"""
        if verb == "NOTICE":
            return
        nick = self.nick or "*"
        if verb == "PRIVMSG":
            self._answer(":%s %s %s :%s" % (IRC_SERVER, "412", nick, "No text to send")
                         if params and params[0] else ":%s 411 %s :No recipient given (PRIVMSG)" % (
                             IRC_SERVER, nick))
        else:
            self._answer(":%s 461 %s %s :Not enough parameters" % (IRC_SERVER, nick, verb))

    def _register_if_ready(self):
        if self.nick and self.user and not self.capping and not self.registered:
            self.registered = True
            self._say("/nick " + self.nick)

    def _authenticate(self, data):
        """SASL PLAIN: the account's nick and password log in (the chat's
        /login); its answer is 903, or 904 (then NICK registers as usual)."""
        nick = self.nick or "*"
        if "sasl" not in self.caps or self.registered:
            self._answer(":%s 904 %s :SASL authentication failed" % (IRC_SERVER, nick))
        elif self.sasl is None:
            if data.upper() == "PLAIN":
                self.sasl = "mechanism"
                self._answer("AUTHENTICATE +")
            else:
                self._answer(":%s 908 %s PLAIN :are available SASL mechanisms" % (IRC_SERVER, nick))
                self._answer(":%s 904 %s :SASL authentication failed" % (IRC_SERVER, nick))
        elif data == "*":
            self.sasl = None
            self._answer(":%s 906 %s :SASL authentication aborted" % (IRC_SERVER, nick))
        else:
            import base64  # (only SASL needs it)
            try:
                _, account, password = base64.b64decode(data).decode(ENCODING).split("\0")
            except ValueError:  # (binascii.Error and UnicodeDecodeError are ValueErrors)
                self.sasl = None
                self._answer(":%s 904 %s :SASL authentication failed" % (IRC_SERVER, nick))
                return
            self.sasl = "login"
            self.registered = True  # (by the login: NICK waits for its answer)
            self._say("/login %s %s" % (account, password))

    def sasl_failed(self):
        """The login was refused: registering goes on with NICK, at CAP END."""
        self.sasl = None
        self.registered = False
        if not self.capping:
            self._register_if_ready()

    def _nickserv(self, text):
        """Accounts the IRC way: PRIVMSG NickServ :REGISTER|IDENTIFY|HELP."""
        words = text.split()
        command = words[0].upper() if words else "HELP"
        if command == "REGISTER" and len(words) >= 2:
            self.nickserv += 1
            self._say("/register " + words[-1])
        elif command == "IDENTIFY" and len(words) >= 2:
            self.nickserv += 1  # (the nick it registered with: 433 may have made it NICK_)
            nick = words[1] if len(words) >= 3 else (self.wanted or self.nick or "")
            self._say("/login %s %s" % (nick, words[-1]))
        else:
            for line in NICKSERV_HELP:
                self._answer(":NickServ!NickServ@%s NOTICE %s :%s" % (
                    IRC_HOST, self.nick or "*", line))

    def _translate(self, verb, params):
        first = params[0] if params else ""
        rest = params[1] if len(params) > 1 else ""
        if verb == "CAP":
            sub = first.upper()
            if sub == "LS":
                self.capping = self.capping or not self.registered
                self._answer(":%s CAP %s LS :%s" % (IRC_SERVER, self.nick or "*", " ".join(
                    cap + ("=" + IRC_CAP_VALUES[cap] if cap in IRC_CAP_VALUES and params[1:2] == ["302"]
                           else "") for cap in IRC_CAPS)))
            elif sub == "LIST":
                self._answer(":%s CAP %s LIST :%s" % (IRC_SERVER, self.nick or "*",
                                                      " ".join(sorted(self.caps))))
            elif sub == "REQ":
                self.capping = self.capping or not self.registered
                asked = rest.split()
                wanted = [cap.lstrip("-") for cap in asked]
                if all(cap in IRC_CAPS for cap in wanted):  # all of them, or none
                    for cap in asked:
                        (self.caps.discard if cap.startswith("-") else self.caps.add)(
                            cap.lstrip("-"))
                    self.caps_key = frozenset(self.caps)
                    self._answer(":%s CAP %s ACK :%s" % (IRC_SERVER, self.nick or "*", rest))
                else:
                    self._answer(":%s CAP %s NAK :%s" % (IRC_SERVER, self.nick or "*", rest))
            elif sub != "END":
                self._answer(":%s 410 %s %s :Invalid CAP command" % (
                    IRC_SERVER, self.nick or "*", first or "*"))
            else:
                self.capping = False
                if self.held is not None:  # the welcome, and what followed it
                    self._release(bytes(self.held))
                    self.held = None
                self._register_if_ready()
        elif verb == "PASS":
            self._say("/pass " + first)
        elif verb == "AUTHENTICATE":
            self._authenticate(first)
        elif verb == "NICK":
            if self.registered and self.user and not self.capping:
                self._say("/nick " + first)
            elif not self.registered:
                self.nick = first
                self.wanted = self.wanted or first
                self._register_if_ready()
            # (else logged in by SASL while registering: the account's nick it is)
        elif verb == "USER":
            if not self.user and len(params) >= 4:  # (WHOIS shows them)
                self.username, self.realname = clean_text(first)[:MAX_NICK_CHARS], clean_text(
                    params[3])[:MAX_NICK_CHARS * 4]
            self.user = True
            self._register_if_ready()
        elif (verb in ("PING", "TOPIC", "KICK", "OPER") and not params) or (
                verb in ("PRIVMSG", "NOTICE") and not (params[1:] and params[1])):
            self._need_more(verb, params)
        elif verb == "PING":
            self._answer(":%s PONG %s :%s" % (IRC_SERVER, IRC_SERVER, first))
        elif verb == "PONG":
            pass
        elif verb == "JOIN":
            for channel in filter(None, first.split(",")):
                self._say("/open " + channel)
        elif verb == "PART":
            for channel in filter(None, first.split(",")):
                self._say("/part " + channel)
        elif verb in ("PRIVMSG", "NOTICE"):
            for target in filter(None, first.split(",")):
                if rest.startswith("\x01ACTION ") and target.startswith("#"):
                    self._say("/in %s /me %s" % (target, rest[len("\x01ACTION "):].rstrip("\x01")))
                elif target.lower() == "nickserv" and verb == "PRIVMSG":
                    self._nickserv(rest)
                elif not rest.startswith("\x01"):  # (other CTCP: not answered)
                    self._say("/msg %s %s" % (target, rest))
        elif verb == "QUIT":
            self._say("/quit " + first)
        elif verb == "TOPIC":
            self._say("/in %s /topic%s" % (first, "" if len(params) < 2 else " " + (rest or "-")))
        elif verb == "NAMES":
            for channel in filter(None, first.split(",")):
                self._say("/who " + channel)
        elif verb == "LIST":
            self._say("/rooms")
        elif verb == "AWAY":
            self._say("/away " + first)
        elif verb == "KICK":
            self.kicking = first  # (a refusal names the channel: 482)
            self._say("/kick %s %s" % (rest, params[2] if len(params) > 2 else ""))
        elif verb == "OPER":
            self._say("/op " + rest)
        elif verb == "MODE":
            nick = self.nick or "*"
            if first.startswith("#"):
                self._answer(":%s 324 %s %s +n" % (IRC_SERVER, nick, first))
            else:
                self._answer(":%s 221 %s +" % (IRC_SERVER, nick))
        elif verb in ("NICKSERV", "NS"):  # (the shortcut many clients and users have)
            self._nickserv(" ".join(params))
        elif verb == "CHATHISTORY":
            self._say("/chathistory " + " ".join(params))
        elif verb == "WHO" and first.startswith("#"):
            self.whos += 1
            self._say("/who " + first)
        elif verb == "WHOIS" and not params:
            self._answer(":%s 431 %s :No nickname given" % (IRC_SERVER, self.nick or "*"))
        elif verb == "WHOIS":
            self._say("/whois " + " ".join(params))
        elif verb == "WHO" and first and "*" not in first:  # WHO NICK: its whois, as a 352
            self.who_nicks += 1
            self._say("/whois " + first)
        elif verb == "WHO":  # (masks: nobody matches)
            self._answer(":%s 315 %s %s :End of /WHO list" % (IRC_SERVER, self.nick or "*", first))
        elif verb == "FORMAT":  # (an IRC connection speaks IRC)
            self._answer(":%s 421 %s FORMAT :Unknown command" % (IRC_SERVER, self.nick or "*"))
        else:  # BAN, UNBAN, MUTE, UNMUTE, BANS are chat.py's own, and any command of
            self._say("/%s %s" % (verb.lower(), " ".join(params)))  # the chat's; else 421


NICKSERV_HELP = ("NickServ keeps chat.py accounts:",
                 "REGISTER PASSWORD           make your nick an account",
                 "IDENTIFY [NICK] PASSWORD    log in to your account")


def _irc_user(nick):
    return "%s!%s@%s" % (nick, nick, IRC_HOST)


# Errors that IRC has a numeric for: (numeric, what goes between the nick and the text).
IRC_ERRORS = {"nick_taken": ("433", "{nick}"), "nick_kept": ("433", "{nick}"),
              "nick_registered": ("433", "{nick}"), "nick_too_long": ("432", "*"),
              "nick_characters": ("432", "{nick}"), "nick_scripts": ("432", "{nick}"),
              "unknown_command": ("421", "{command}"), "not_registered": ("451", ""),
              "password_required": ("464", ""), "wrong_password": ("464", ""),
              "not_in_room": ("442", "{room}"), "no_such_user": ("401", "{nick}"),
              "muted": ("404", "*"), "operators_only": ("481", ""), "banned": ("465", ""),
              "room_invalid": ("403", "{room}"), "line_too_long": ("417", ""),
              "usage": ("461", "*"), "in_no_room": ("442", "*")}


class IrcCodec(TextCodec):
    """An IRC connection (--irc). Renders for one connection: not shared."""

    name = "irc"
    switchable = False
    per_member = True
    joins_lobby = False       # an IRC connection is in the channels it JOINs
    greets = False

    @staticmethod
    def reader(max_line):
        return IrcReader(max_line)

    @staticmethod
    def encode(line, conn=None):
        caps = conn.reader.caps if conn is not None else ()
        holding = conn is not None and conn.reader.held is not None  # (SASL: until CAP END)
        shared = conn is not None and line.kind in IRC_SHARED_KINDS and not (
            conn.reader.nickserv or conn.reader.sasl)
        if shared and not holding:  # a room's line: the same bytes for every
            key = (conn.reader.caps_key, line.fields.get("nick") == conn.nick)  # member with
            cache = line.extra.setdefault("irc", {})  # these caps and echo
            if key in cache:
                return cache[key]
        tags = _irc_tags(line, caps)
        data = b"".join((tags + text + "\r\n").encode(ENCODING)
                        for text in irc_lines(line, conn, caps))
        if shared and not holding:
            cache[key] = data
        if holding:
            reader = conn.reader
            reader.held += data
            if len(reader.held) > IRC_HELD_MAX:  # (no CAP END coming): out it goes
                data, reader.held = bytes(reader.held), None
                return data
            return b""
        return data

    @staticmethod
    def encode_marked(line, room, conn=None):
        return IrcCodec.encode(line, conn)

    @staticmethod
    def replays(conn):
        """A client with draft/chathistory asks for what it wants instead."""
        return "draft/chathistory" not in conn.reader.caps

    @staticmethod
    def caps(conn):
        return conn.reader.caps

    @staticmethod
    def pass_group(conn, room_pass):
        """Which members get the same bytes of a room's pass as conn: those
        with its capabilities, when the pass is only room lines none of which
        is conn's own (echo) and no NickServ or SASL answer is due; else None
        (rendered for conn alone)."""
        reader = conn.reader
        speakers = room_pass.said_by(IRC_SHARED_KINDS)
        if (speakers is None or conn.nick in speakers or reader.nickserv or reader.sasl
                or reader.held is not None):
            return None
        return reader.caps_key


# A room's broadcasts: what irc_lines makes of them depends only on the
# connection's capabilities and whether it said the line (IrcCodec caches it).
IRC_SHARED_KINDS = frozenset({"message", "action", "joined", "joined_room", "left",
                              "topic_set", "topic_cleared", "kicked", "banned"})


def _irc_tags(line, caps):
    """A line's IRCv3 tags for a connection with these capabilities ("" or "@...; ")."""
    tags = []
    when = line.extra.get("when")
    if "server-time" in caps and when is not None and line.kind in (
            "message", "action", "private", "history", "joined", "joined_room", "left",
            "renamed", "topic_set", "topic_cleared"):
        tags.append("time=" + json_time(when))
    if "message-tags" in caps and isinstance(line.extra.get("id"), int):
        tags.append("msgid=%d" % line.extra["id"])
    if "batch" in caps and "batch" in line.extra:
        tags.append("batch=" + line.extra["batch"])  # (a CHATHISTORY answer's)
    elif "batch" in caps and "server-time" in caps and line.kind == "history" and not (
            line.extra.get("offline")):
        tags.append("batch=history")  # (a replay: inside its BATCH)
    return "@%s " % ";".join(tags) if tags else ""


def irc_lines(line, conn, caps=()):
    """The IRC lines (str) a Line is for one connection ([]: none)."""
    kind, f, x = line.kind, line.fields, line.extra
    me = (conn.nick if conn is not None else None) or "*"
    server = ":" + IRC_SERVER
    reader = conn.reader if conn is not None else None
    if reader is not None and conn.nick is not None:
        reader.nick = conn.nick  # (what the reader answers itself names it so)
    if reader is not None and reader.sasl == "login" and kind == "error":
        reader.sasl_failed()
        return ["%s 904 %s :SASL authentication failed" % (server, me)]
    if reader is not None and reader.nickserv and kind in ("notice", "error"):
        reader.nickserv -= 1  # the answer to a NickServ question: from NickServ
        text = f["text"]
        return [":NickServ!NickServ@%s NOTICE %s :%s" % (IRC_HOST, me, text)]
    if kind in ("message", "action"):
        if f["nick"] == me and "echo-message" not in caps:
            return []  # (the sender shows its own)
        text = f["text"] if kind == "message" else "\x01ACTION %s\x01" % f["text"]
        return [":%s PRIVMSG %s :%s" % (_irc_user(f["nick"]), x.get("room"), text)]
    if kind == "private":
        return [":%s PRIVMSG %s :%s" % (_irc_user(f["nick"]), me, f["text"])]
    if kind == "welcome":
        motd = x.get("motd") or ()
        lines, held = [], False
        if reader is not None and reader.sasl == "login":
            reader.sasl = None
            lines = ["%s 900 %s %s %s :You are now logged in as %s" % (
                         server, me, _irc_user(me), me, me),
                     "%s 903 %s :SASL authentication successful" % (server, me)]
            held = reader.capping  # the welcome waits for CAP END (these go out now)
        lines += ["%s 001 %s :Welcome to the chat.py network, %s" % (server, me, me),
                 "%s 002 %s :Your host is %s" % (server, me, IRC_SERVER),
                 "%s 003 %s :This server speaks the chat.py protocol too" % (server, me),
                 "%s 004 %s %s chat.py-3 o n" % (server, me, IRC_SERVER),
                 "%s 005 %s CASEMAPPING=rfc8265 CHANTYPES=# NICKLEN=%d CHANNELLEN=%d "
                 "TOPICLEN=%d CHANLIMIT=#:%s NETWORK=chat.py CHATHISTORY=%d "
                 "MSGREFTYPES=msgid,timestamp :are supported by this server"
                 % (server, me, MAX_NICK_CHARS, MAX_ROOM_CHARS + 1, MAX_LINE_BYTES,
                    x.get("max_joined", ""), HISTORY_MAX)]
        if not motd:
            lines.append("%s 422 %s :MOTD File is missing" % (server, me))
        else:
            lines += ["%s 375 %s :- %s Message of the day -" % (server, me, IRC_SERVER)] + [
                "%s 372 %s :- %s" % (server, me, text) for text in motd] + [
                "%s 376 %s :End of /MOTD command" % (server, me)]
        if held:
            reader.held = bytearray("".join(text + "\r\n" for text in lines[2:]).encode(
                ENCODING))
            return lines[:2]
        return lines
    if kind in ("joined", "joined_room"):
        lines = [":%s JOIN %s" % (_irc_user(f["nick"]), f.get("room") or x.get("room"))]
        if x.get("away") is not None and "away-notify" in caps:
            lines.append(":%s AWAY :%s" % (_irc_user(f["nick"]), x["away"]))
        return lines
    if kind == "away_changed":
        return [":%s AWAY%s" % (_irc_user(f["nick"]), "" if f["text"] is None
                                else " :" + f["text"])]
    if kind == "whois" and reader is not None and reader.who_nicks:
        reader.who_nicks -= 1  # the answer to WHO NICK: its 352 (if it is here), then 315
        found = f["found"]
        lines = [] if found is None else ["%s 352 %s %s %s %s %s %s %s%s :0 %s" % (
            server, me, (found["rooms"] or ["*"])[0], found.get("user") or found["nick"],
            IRC_HOST, IRC_SERVER, found["nick"], "G" if found["away"] is not None else "H",
            "*" if found["op"] else "", found.get("real") or found["nick"])]
        return lines + ["%s 315 %s %s :End of /WHO list" % (server, me, f["nick"])]
    if kind == "whois":
        return whois_lines(server, me, f["nick"], f["found"])
    if kind == "left":
        if "person" in x:
            return [":%s QUIT :%s" % (_irc_user(f["nick"]), f["reason"])]
        return [":%s PART %s :%s" % (_irc_user(f["nick"]), x.get("room"), f["reason"])]
    if kind == "renamed":
        lines = [":%s NICK :%s" % (_irc_user(f["old"]), f["new"])] if (
            f["old"] != f["new"]) else []
        if reader is not None and reader.nickserv and f["new"] == me:
            reader.nickserv -= 1  # IDENTIFY answered: logged in
            lines.append(":NickServ!NickServ@%s NOTICE %s :You are now identified for %s"
                         % (IRC_HOST, me, me))
        return lines
    if kind == "topic":
        return ["%s 332 %s %s :%s" % (server, me, f["room"], f["text"])]
    if kind == "no_topic":
        return ["%s 331 %s %s :No topic is set" % (server, me, f["room"])]
    if kind in ("topic_set", "topic_cleared"):
        return [":%s TOPIC %s :%s" % (_irc_user(f["nick"]), x.get("room"), f.get("text", ""))]
    if kind == "who" and reader is not None and reader.whos:
        reader.whos -= 1  # the answer to WHO #channel: one 352 each, then 315
        return ["%s 352 %s %s %s %s %s %s %s%s :0 %s" % (
            server, me, f["room"], nick, IRC_HOST, IRC_SERVER, nick, "G" if away else "H",
            "@" if op else "", nick) for nick, op, away in x.get("members", [])] + [
            "%s 315 %s %s :End of /WHO list" % (server, me, f["room"])]
    if kind == "who":  # 353s of at most IRC_BODY_BYTES each, then 366
        head = "%s 353 %s = %s :" % (server, me, f["room"])
        lines, names, size = [], [], len(head.encode(ENCODING))
        full = "userhost-in-names" in caps
        for nick, op, away in x.get("members", []):
            name = ("@" if op else "") + (_irc_user(nick) if full else nick)
            if names and size + 1 + len(name.encode(ENCODING)) > IRC_BODY_BYTES:
                lines.append(head + " ".join(names))
                names, size = [], len(head.encode(ENCODING))
            names.append(name)
            size += len(name.encode(ENCODING)) + 1
        return lines + [head + " ".join(names),
                        "%s 366 %s %s :End of /NAMES list" % (server, me, f["room"])]
    if kind == "rooms":
        rooms = [item.rpartition(" (") for item in filter(None, f["list"].split(", "))]
        return (["%s 321 %s Channel :Users  Name" % (server, me)]
                + ["%s 322 %s %s %s :" % (server, me, name, count.rstrip(")"))
                   for name, _, count in rooms]
                + ["%s 323 %s :End of /LIST" % (server, me)])
    if kind in ("kicked", "banned"):
        return [":%s KICK %s %s :%s" % (_irc_user(f["op"]), x.get("room"), f["nick"],
                                        f.get("reason", ""))]
    if kind == "pong":
        return ["%s PONG %s :%s" % (server, IRC_SERVER, f["token"])]
    if kind == "away_set":
        return ["%s 306 %s :You have been marked as being away" % (server, me)]
    if kind == "away_back":
        return ["%s 305 %s :You are no longer marked as being away" % (server, me)]
    if kind == "is_away":
        return ["%s 301 %s %s :%s" % (server, me, f["nick"], f["text"])]
    if kind == "chathistory":  # its messages in a batch, each with its own tags
        batch = "h%d" % next(IRC_BATCHES)
        lines = ["%s BATCH +%s chathistory %s" % (server, batch, f["target"])] if (
            "batch" in caps) else []
        for row in f["rows"]:
            message = history_line(row, f["target"]).having(batch=batch)
            lines += [_irc_tags(message, caps) + text for text in irc_lines(message, conn, caps)]
        return lines + (["%s BATCH -%s" % (server, batch)] if "batch" in caps else [])
    if kind == "fail":
        return ["FAIL %s %s %s :%s" % (f["command"], f["code"], f["context"], f["text"])]
    if kind == "history" and ("server-time" in caps or "batch" in x) and not x.get("offline"):
        text = x["text"] if x.get("kind") == "message" else "\x01ACTION %s\x01" % x["text"]
        return [":%s PRIVMSG %s :%s" % (_irc_user(x["nick"]), x.get("room"), text)]
    if kind == "history" and "server-time" in caps:  # an offline message, while away
        return [":%s PRIVMSG %s :%s" % (_irc_user(x["from"]), me, x["text"])]
    if kind == "history":  # a replay, in the v2 history-line form
        return ["%s NOTICE %s :%s" % (server, x.get("room") or me, line)]
    if kind in ("history_last", "history_after", "history_search") and "batch" in caps:
        return ["%s BATCH +history chathistory %s" % (server, f["room"])]
    if kind == "history_end" and "batch" in caps and x.get("count"):
        return ["%s BATCH -history" % server]
    if kind in ("talking_in", "no_room", "private_echo", "history_end", "history_last",
                "history_after", "history_search", "no_history", "no_history_after",
                "no_match", "offline_start", "offline_end"):
        return []
    if kind == "error" and x.get("args", {}).get("command") == "kick" and reader is not None:
        return ["%s 482 %s %s :You're not channel operator (chat.py operators only)" % (
            server, me, reader.kicking or "*")]
    if kind == "error" and x.get("name") == "not_in_room" and x["args"].get("sending"):
        return ["%s 404 %s %s :Cannot send to channel (you are not in it)" % (
            server, me, x["args"]["room"])]
    if kind == "error" and x.get("name") == "nick_registered":  # (IRC's ways to log in)
        nick = x["args"]["nick"]
        return ["%s 433 %s %s :%s is registered: log in by SASL, or /msg NickServ IDENTIFY "
                "%s PASSWORD" % (server, me, nick, nick, nick)]
    if kind == "error" and x.get("name") == "unknown_command":  # (as IRC says it)
        return ["%s 421 %s %s :Unknown command" % (server, me, x["args"]["command"].upper())]
    if kind == "error":
        numeric = IRC_ERRORS.get(x.get("name"))
        if numeric is not None:
            middle = numeric[1].format(**x.get("args", {})) if numeric[1] else ""
            return ["%s %s %s%s :%s" % (server, numeric[0], me, " " + middle if middle else "",
                                        f["text"])]
    text = line[len(ERROR):] if kind == "error" else line[len(NOTICE):] if line.startswith(
        NOTICE) else str(line)
    return ["%s NOTICE %s :%s" % (server, me, text)]


class WebIrcReader(IrcReader):
    """A WebSocket that speaks IRC (the text.ircv3.net subprotocol): its web
    reader unframes the messages, each an IRC line, which this translates;
    what IRC answers at once goes back framed."""

    __slots__ = ("web",)

    def __init__(self, web):
        super().__init__(web.max_line)
        web.max_line = max(web.max_line, IRC_LINE_BYTES)
        self.web = web

    def feed(self, data):
        web = self.web
        web.feed(data)
        while True:
            line = web.pop_line()
            if line is None:
                break
            for text in [line] if line is TOO_LONG else line.split(b"\n"):
                self._take(text if text is TOO_LONG else text.rstrip(b"\r"))  # (one a
                # message; a line end is forgiven)
        self.answers += web.answers  # (pongs and close frames)
        web.answers.clear()

    def _answer(self, text):
        self.answers += ws_frame(text.encode(ENCODING))

    def _release(self, data):
        for line in data.split(b"\r\n"):
            if line:
                self.answers += ws_frame(line)

    def goodbye(self):
        return self.web.goodbye()

    @property
    def finished(self):
        return self.web.finished

    @property
    def heard_at(self):
        return self.web.heard_at


class WebIrcCodec(IrcCodec):
    """A web IRC client's WebSocket (text.ircv3.net): each IRC line a frame."""

    name = "webirc"

    @staticmethod
    def encode(line, conn=None):
        return b"".join(ws_frame(text) for text in IrcCodec.encode(line, conn).split(b"\r\n")
                        if text)

    @staticmethod
    def encode_marked(line, room, conn=None):
        return WebIrcCodec.encode(line, conn)


IRC_CODEC, WEB_IRC_CODEC = IrcCodec(), WebIrcCodec()
WS_IRC_SUBPROTOCOL = "text.ircv3.net"


def whois_lines(server, me, nick, found):
    """WHOIS NICK's answer: 311, 319, 312, 301, 313, 330, then 318 (401 if unknown)."""
    if found is None:
        return ["%s 401 %s %s :No such nick" % (server, me, nick),
                "%s 318 %s %s :End of /WHOIS list" % (server, me, nick)]
    nick = found["nick"]
    lines = ["%s 311 %s %s %s %s * :%s" % (server, me, nick, found.get("user") or nick,
                                             IRC_HOST, found.get("real") or nick)]
    if found["rooms"]:
        lines.append("%s 319 %s %s :%s" % (server, me, nick, " ".join(
            ("@" if found["op"] else "") + room for room in found["rooms"])))
    lines.append("%s 312 %s %s %s :chat.py" % (server, me, nick, IRC_SERVER))
    if found["away"] is not None:
        lines.append("%s 301 %s %s :%s" % (server, me, nick, found["away"]))
    if found["op"]:
        lines.append("%s 313 %s %s :is a chat.py operator" % (server, me, nick))
    if found["account"]:
        lines.append("%s 330 %s %s %s :is logged in as" % (server, me, nick, nick))
    return lines + ["%s 318 %s %s :End of /WHOIS list" % (server, me, nick)]


# --- Several servers, one chat (Redis) ----------------------------------------
# Every line a room is sent goes through one Redis stream, the feed: a server
# adds it there (a Lua script, which also gives a message its id and keeps it
# in the room's own stream, the history) and delivers it to its own members
# only when it reads it back, as every other server does. The feed's order is
# the one order everyone sees. Who is online where is a hash, each nick
# claimed in it atomically (HSETNX); each server also keeps a copy, kept
# current by the feed, for /who, /rooms and /msg; accounts and bans the same
# way, so the loop reads copies and never waits for Redis. Entries that are
# not a room's line (CONTROL_KINDS) tell the servers what changed.

REDIS_FEED = REDIS_PREFIX + "feed"            # every room's lines, in one order
REDIS_IDS = REDIS_PREFIX + "ids"              # the last message id given
REDIS_PRESENCE = REDIS_PREFIX + "presence"    # nick key -> a RemoteUser, as JSON
REDIS_ROOMS = REDIS_PREFIX + "rooms"          # room key -> its name
REDIS_TOPICS = REDIS_PREFIX + "topics"        # room key -> {text, nick}
REDIS_HISTORY = REDIS_PREFIX + "room:"        # + room key: its messages, id-0 each
REDIS_SERVERS = REDIS_PREFIX + "servers"      # the servers of the chat (their ids)
REDIS_ALIVE = REDIS_PREFIX + "alive:"         # + server id: there while it heartbeats
REDIS_ACCOUNTS = REDIS_PREFIX + "accounts"    # nick key -> {nick, hash}
REDIS_BANS = REDIS_PREFIX + "bans"            # address -> the nick banned
REDIS_MAIL = REDIS_PREFIX + "mail:"           # + account key: its waiting messages
# Feed entries for the servers, not a room: a changed account or ban (every
# server's copy), a moderation or a login that the target's server carries out.
# (And "away": a user's /away, for every server's copy of who is online.)
CONTROL_KINDS = frozenset({"account", "ban", "moderate", "takeover", "away", "roomless"})

# KEYS: the presence hash; ARGV: a nick key, a server. The nick is freed only
# if that server holds it (a login elsewhere may have taken it over).
RELEASE_SCRIPT = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held and cjson.decode(held)['server'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: the id counter; ARGV: the newest id this server has seen. A Redis
# that came back without its data starts ids at 1 again: they never go back
# (/history after ID would skip what is said later). 1 if it was behind.
RAISE_IDS_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: the presence hash; ARGV: a nick key, its value, "force" (a login takes
# the nick even if someone has it). 0 if someone has it; else how many hold a
# nick now, this one included: what its join line says is online, counted here
# because each server's copy of presence follows the feed, and may lag it.
CLAIM_SCRIPT = """
if ARGV[3] == 'force' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
return redis.call('HLEN', KEYS[1])
"""

# KEYS: a mailbox; ARGV: its limit, the message. 1 if kept, 0 if it is full.
MAIL_SCRIPT = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"""
# KEYS: a mailbox. Its messages, taken out.

# KEYS: the servers, the alive prefix. The servers whose alive key is gone are
# taken out, and returned: to one caller only, which announces their users.
LOST_SCRIPT = """
local lost = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', KEYS[2] .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
    table.insert(lost, id)
  end
end
return lost
"""

# KEYS: feed, ids, the room's history; ARGV: feed length, --keep, then for a
# message or an action its nick, kind, text and time ("" for other lines),
# and the entry. Returns the message's id (0 for other lines).
PUBLISH_SCRIPT = """
local id = 0
if ARGV[3] ~= '' then
  id = redis.call('INCR', KEYS[2])
  local fields = {'n', ARGV[3], 'k', ARGV[4], 't', ARGV[5], 'w', ARGV[6]}
  if tonumber(ARGV[2]) > 0 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], id .. '-0', unpack(fields))
  else
    redis.call('XADD', KEYS[3], id .. '-0', unpack(fields))
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'i', id, 'e', ARGV[7])
return id
"""


def _text(value):
    return value.decode(ENCODING, "replace") if isinstance(value, bytes) else value


def _pairs(flat):
    """A Redis reply [k1, v1, k2, v2...] as a dict of str."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat or ()), 2)}


class RemoteUser:
    """Someone online in the chat, as every server knows them: kept whole in
    Redis (presence) and in each server's copy, so that a change of one part
    (a room, /away, operator) loses none of the others."""

    __slots__ = ("nick", "rooms", "server", "op", "away")

    def __init__(self, nick, rooms, server=None, op=False, away=None):
        self.nick = nick
        self.rooms = list(rooms)           # room keys, in the order entered
        self.server = server               # the id of the server it is connected to
        self.op = op
        self.away = away                   # its /away message, or None

    def to_json(self):
        return json.dumps({"nick": self.nick, "rooms": self.rooms, "server": self.server,
                           "op": self.op, "away": self.away}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text):
        user = json.loads(text)
        rooms = user.get("rooms", [user["room"]] if user.get("room") else [])  # (before v3)
        return cls(user["nick"], rooms, user["server"], user.get("op", False),
                   user.get("away"))


class RedisLink:
    """A non-blocking Redis connection inside the server's loop: commands
    are queued (pipelined) with a callback for each reply, called in order."""

    def __init__(self, sock, tls, on_lost):
        sock.setblocking(False)
        self.sock, self.tls, self.on_lost = sock, tls, on_lost
        self.outbuf = bytearray()
        self.callbacks = collections.deque()
        self.asked_at = collections.deque()  # when each command still unanswered went
        self.reader = RespReader()
        self.alive = True

    def call(self, callback, *args):
        """Queue a command; callback(reply) (None: no interest) once it answers."""
        if self.alive:
            self.outbuf += resp_command(*args)
            self.callbacks.append(callback)
            self.asked_at.append(time.monotonic())

    def waited(self, now):
        """How long the oldest unanswered command has waited (0: none)."""
        return now - self.asked_at[0] if self.asked_at else 0.0

    def flush(self):
        """Write what the socket takes; return whether anything is left."""
        if self.outbuf and self.alive:
            try:
                sent = send_some(self.sock, self.outbuf, self.tls)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                sent = 0
            except OSError as exc:
                self._lost(describe_error(exc))
                return False
            del self.outbuf[:sent]
        return bool(self.outbuf) and self.alive

    def on_ready(self):
        """The selector says the socket is ready: read replies, write more."""
        try:
            data = receive_some(self.sock, self.tls)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            data = None
        except OSError as exc:
            self._lost(describe_error(exc))
            return
        if data == b"":
            self._lost("Redis closed the connection")
            return
        if data:
            self.reader.feed(data)
            try:
                replies = self.reader.replies()
            except (RedisError, ValueError) as exc:  # not RESP: nothing after it is either
                self._lost("Redis sent what is not a reply (%s)" % exc)
                return
            for reply in replies:
                if not self.callbacks:
                    self._lost("Redis answered a command it was not sent")
                    return
                self.asked_at.popleft()
                callback = self.callbacks.popleft()
                if isinstance(reply, RedisError) and str(reply).startswith("NOSCRIPT"):
                    # Redis forgot our scripts (SCRIPT FLUSH, a restart without
                    # them): as good as lost; coming back loads them again.
                    self.callbacks.appendleft(callback)
                    self._lost("Redis lost chat.py's scripts (%s)" % reply)
                    return
                if callback is not None:
                    try:
                        callback(reply)
                    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                        # A reply of the wrong shape (an unasked +OK taken
                        # for an XREAD's answer): this link can't be trusted.
                        self._lost("Redis answered what was not asked (%s: %s)"
                                   % (type(exc).__name__, exc))
                        return
                if not self.alive:
                    return  # a callback found the link gone
        self.flush()

    def _lost(self, why):
        """Gone: the owner is told, then each command still unanswered."""
        if self.alive:
            self.alive = False
            self.on_lost(why)
            self._fail_unanswered(why)

    def _fail_unanswered(self, why):
        """Each command still unanswered gets an error as its reply: a
        publish's sender is told its line was not sent, never left guessing."""
        callbacks, self.callbacks = self.callbacks, collections.deque()
        self.asked_at.clear()
        for callback in callbacks:
            if callback is not None:
                callback(RedisError(why))

    def close(self, why="the connection to Redis was closed"):
        self.alive = False
        self.sock.close()
        self._fail_unanswered(why)


class RedisNetwork:
    """This server's part in a chat of several: the feed it adds to and reads,
    the claims on nicks, and what it knows of the other servers' users."""

    def __init__(self, address, keep=KEEP_MESSAGES, replay=REPLAY_MESSAGES):
        self.address = address
        self.keep = keep
        self.replay = replay
        self.server_id = os.urandom(6).hex()  # this process, for its entries and claims
        self.script = None
        self.last = "0-0"                  # the feed entry read last
        self.commands = self.feed = None   # the two RedisLinks, once started
        self.history = threading.local()   # each worker thread's RedisHistory
        self.seq = 0                       # this server's entries, numbered
        self.elsewhere = {}                # nick key -> RemoteUser, the other servers' users
        self.recents = {}                  # room key -> its last messages (rooms watched here)
        self.loading = {}                  # room key -> (heard meanwhile, waiting, its deque)
        self.topics = {}                   # room key -> (text, nick)
        self.names = {}                    # room key -> its name
        self.down = False                  # Redis is away: coming back
        self.accounts = {}                 # nick key -> (nick, password hash)
        self.banned = {}                   # address -> the nick banned
        self.left_meanwhile = []           # (room key, name, line): said once back
        self.check_lost_after = 0.0        # back from an outage: others get time first
        self.newest_id = 0                 # the newest message id seen: ids never go back
        self.said_data_gone = False        # ...and a Redis without its data is logged once

    def load(self):
        """What is there at start (blocking, before the loop): the script,
        where the feed is, who is online, each room's last messages and topic.
        Raises RedisError."""
        redis = BlockingRedis(self.address).connect()
        try:
            self.load_scripts(redis)
            self.newest_id = int(redis.call("GET", REDIS_IDS) or 0)
            for key, value in _pairs(redis.call("HGETALL", REDIS_ACCOUNTS)).items():
                account = json.loads(value)
                self.accounts[key] = (account["nick"], account["hash"])
            self.banned = _pairs(redis.call("HGETALL", REDIS_BANS))
            last = redis.call("XREVRANGE", REDIS_FEED, "+", "-", "COUNT", 1)
            self.last = _text(last[0][0]) if last else "0-0"
            for key, value in _pairs(redis.call("HGETALL", REDIS_PRESENCE)).items():
                self.elsewhere[key] = RemoteUser.from_json(value)
            redis.call("HSETNX", REDIS_ROOMS, nick_key(LOBBY), LOBBY)
            self.names = _pairs(redis.call("HGETALL", REDIS_ROOMS))
            for key, value in _pairs(redis.call("HGETALL", REDIS_TOPICS)).items():
                topic = json.loads(value)
                self.topics[key] = (topic["text"], topic["nick"])
            # The lobby's last messages now (the chat starts with it); any other
            # room's when it gets a member here (watch()): memory follows the
            # people online, not the rooms that ever were.
            lobby = nick_key(LOBBY)
            rows = history_rows(redis.call("XREVRANGE", REDIS_HISTORY + lobby, "+", "-",
                                           "COUNT", self.replay)) if self.replay else []
            self.recents[lobby] = collections.deque(reversed(rows), maxlen=self.replay)
        except (OSError, ValueError, KeyError) as exc:
            raise RedisError("Redis at %s: %s" % (self.address.where, describe_error(exc)))
        finally:
            redis.close()

    def connect(self, on_lost, sockets=None):
        """The two links for the loop: commands, and the feed's blocking reads
        (on sockets opened by open_sockets(), or opened now)."""
        sockets = sockets or self.open_sockets()
        self.commands, self.feed = links = [
            RedisLink(sock, self.address.tls, on_lost) for sock in sockets]
        return links

    def open_sockets(self, timeout=REDIS_START_TIMEOUT_S):
        """Two connections, in (blocking: at start, or in the worker thread).
        The scripts are loaded again: a restarted Redis has forgotten them."""
        sockets = []
        try:
            for _ in range(2):
                sockets.append(BlockingRedis(self.address, timeout).connect().detach())
            redis = BlockingRedis(self.address, timeout).connect()
            try:
                self.load_scripts(redis)
            finally:
                redis.close()
        except (RedisError, OSError):
            for sock in sockets:
                sock.close()
            raise
        return sockets

    def load_scripts(self, redis):
        self.script = _text(redis.call("SCRIPT", "LOAD", PUBLISH_SCRIPT))
        self.lost_script = _text(redis.call("SCRIPT", "LOAD", LOST_SCRIPT))
        self.mail_script = _text(redis.call("SCRIPT", "LOAD", MAIL_SCRIPT))
        self.release_script = _text(redis.call("SCRIPT", "LOAD", RELEASE_SCRIPT))
        self.claim_script = _text(redis.call("SCRIPT", "LOAD", CLAIM_SCRIPT))
        self.raise_ids_script = _text(redis.call("SCRIPT", "LOAD", RAISE_IDS_SCRIPT))

    # -- accounts, mailboxes and bans: in Redis, read from copies the feed keeps current --

    def change(self, kind, key, **fields):
        """An account or a ban changed here: in Redis, in our copy now, and
        in the others' copies through the feed (None fields: removed)."""
        for command in self.change_commands(kind, key, fields):
            self.commands.call(None, *command)
        self._changed(kind, key, fields)

    def change_commands(self, kind, key, fields):
        """The Redis commands of a change (see change()): also what `chat.py
        account` sends, so that running servers hear of it as of any other."""
        hash_name = REDIS_ACCOUNTS if kind == "account" else REDIS_BANS
        value = fields.get("nick")
        if value is None:
            commands = [("HDEL", hash_name, key)]
            if kind == "account":
                commands.append(("DEL", REDIS_MAIL + key))
        else:
            commands = [("HSET", hash_name, key, json.dumps(fields)
                         if kind == "account" else value)]
        return commands + [self._publish_command("", "", Line("", kind, dict(fields, key=key)))]

    def _changed(self, kind, key, fields):
        copy = self.accounts if kind == "account" else self.banned
        if fields.get("nick") is None:
            copy.pop(key, None)
        else:
            copy[key] = ((fields["nick"], fields["hash"]) if kind == "account"
                         else fields["nick"])

    def mail(self, key, sender, text, when, answer):
        """Keep a private message for an account: answer(kept?), or
        answer(None) when Redis could not say."""
        self.commands.call(lambda reply: answer(None if isinstance(reply, RedisError)
                                                else reply == 1),
                           "EVALSHA", self.mail_script, 1, REDIS_MAIL + key, MAILBOX_MESSAGES,
                           json.dumps([when, sender, text]))

    def read_mail(self, key, answer):
        """The messages waiting for an account: answer([(number, time, sender,
        text)]). They stay until drop_mail()."""
        self.commands.call(lambda reply: answer(
            [] if isinstance(reply, RedisError) else [(number,) + tuple(json.loads(item))
                                                      for number, item in enumerate(reply or ())]),
            "LRANGE", REDIS_MAIL + key, 0, -1)

    def drop_mail(self, key, rows):
        """Delete the first messages read_mail() gave (they were written):
        what was kept meanwhile came after them."""
        self.commands.call(None, "LTRIM", REDIS_MAIL + key, len(rows), -1)

    def lost(self):
        """Redis went away: the links are dropped (the caller retries)."""
        self.down = True
        for link in (self.commands, self.feed):
            if link is not None:
                link.close()

    def back(self, members):
        """Connected again: our users are where they are (a restarted Redis
        may have forgotten), those who left meanwhile are said to have, and
        the others get time to come back before anyone is found lost."""
        self.down = False
        self.check_lost_after = time.monotonic() + REDIS_ALIVE_TTL_S
        self.commands.call(self._ids_checked, "EVALSHA", self.raise_ids_script, 1, REDIS_IDS,
                           self.newest_id)  # first: before anything of ours gets an id
        for conn in members:
            self.place(conn)
        left, self.left_meanwhile = self.left_meanwhile, []
        for room, line in left:
            self.commands.call(None, *self._publish_command(room.key, room.name, line))
            self.release(nick_key(line.fields["nick"]))

    def _ids_checked(self, raised):
        if raised == 1 and not self.said_data_gone:
            self.said_data_gone = True
            log_to_stderr("!!! Redis came back WITHOUT THE CHAT'S DATA (its message counter "
                          "was below %d, the newest id seen here): ids go on after it, but "
                          "history, accounts, bans and waiting messages kept in Redis before "
                          "are gone unless Redis is restored (persistence: appendonly yes)"
                          % self.newest_id)

    def read_feed(self, entries_read):
        """Wait (on the feed link) for entries after the last one read."""
        def got(reply):
            if self.down:
                return  # read again, from self.last, once back
            if isinstance(reply, RedisError):
                log_to_stderr("reading the chat network's feed: %s" % reply)
                reply = None
            for _, entries in reply or ():
                for entry_id, flat in entries:
                    self.last = _text(entry_id)
                    try:
                        fields = _pairs(flat)
                        entry = json.loads(fields["e"])
                        entry["id"] = int(fields["i"])
                        entries_read(entry)
                    except Exception:  # deliberately broad: one bad entry, not the room
                        log_to_stderr("a feed entry %s was not delivered:\n%s"
                                      % (self.last, traceback.format_exc().rstrip()))
            self.read_feed(entries_read)
        self.feed.call(got, "XREAD", "COUNT", REDIS_READ_COUNT, "BLOCK", REDIS_READ_BLOCK_MS,
                       "STREAMS", REDIS_FEED, self.last)

    def publish(self, room_key, room_name, line, failed=None):
        """Add a room's line to the feed (a message or an action also to the
        room's history, with a new id); return its number among ours.
        failed() is called if Redis refuses it or the connection breaks first."""
        answered = None if failed is None else (
            lambda reply: failed() if isinstance(reply, RedisError) else None)
        self.commands.call(answered, *self._publish_command(room_key, room_name, line))
        return self.seq

    def _publish_command(self, room_key, room_name, line):
        self.seq += 1
        extra = {name: value for name, value in line.extra.items()
                 if name not in RENDERED_EXTRAS}
        entry = json.dumps({"o": self.server_id, "s": self.seq, "r": room_key,
                            "m": room_name, "k": line.kind, "f": line.fields, "x": extra},
                           ensure_ascii=False)
        said = ((line.fields["nick"], line.kind, line.fields["text"], extra.get("when", 0))
                if line.kind in ("message", "action") and room_key else ("", "", "", ""))
        return ("EVALSHA", self.script, 3, REDIS_FEED, REDIS_IDS,
                REDIS_HISTORY + (room_key or ""), REDIS_FEED_MAXLEN, self.keep) + said + (entry,)

    def goodbye(self, members):
        """At shutdown (the loop is over: this may block): our users leave
        the rooms of the other servers, and their nicks are free."""
        commands = [self._publish_command(room.key, room.name, line)
                    for conn in members for room, line in format_line(
                        "left", nick=conn.nick, reason=SHUTDOWN_NOTICE).about_person(conn.rooms)]
        commands += [("HDEL", REDIS_PRESENCE, conn.key) for conn in members]
        commands += [("SREM", REDIS_SERVERS, self.server_id),
                     ("DEL", REDIS_ALIVE + self.server_id)]
        redis = BlockingRedis(self.address, timeout=SHUTDOWN_FLUSH_S)
        try:
            redis.connect()._round_trip(b"".join(resp_command(*c) for c in commands),
                                        len(commands))
        except (RedisError, OSError) as exc:
            log_to_stderr("could not tell the chat network we are going: %s"
                          % describe_error(exc))
        finally:
            redis.close()

    def close(self):
        self.down = True  # at shutdown: what was asked is not waited for, nor said
        for link in (self.commands, self.feed):
            if link is not None:
                link.close()

    def heartbeat(self):
        """Say we are alive; find the servers that are not, and announce
        their users as lost (the one server that took each out does)."""
        self.commands.call(None, "SET", REDIS_ALIVE + self.server_id, 1, "EX",
                           REDIS_ALIVE_TTL_S)
        self.commands.call(None, "SADD", REDIS_SERVERS, self.server_id)
        if time.monotonic() >= self.check_lost_after:
            self.commands.call(self._found_lost, "EVALSHA", self.lost_script, 2,
                               REDIS_SERVERS, REDIS_ALIVE)

    def _found_lost(self, lost):
        if isinstance(lost, RedisError) or not lost:
            return
        lost = {_text(server) for server in lost}

        def announce(presence):
            if isinstance(presence, RedisError):
                return
            for key, value in _pairs(presence).items():
                user = RemoteUser.from_json(value)
                if user.server not in lost:
                    continue
                self.say_about(user, format_line("left", nick=user.nick,
                                                 reason=LEFT_SERVER_LOST))
                if not user.rooms:
                    self.tell("roomless", what="left", nick=user.nick, reason=LEFT_SERVER_LOST)
                self.commands.call(None, "HDEL", REDIS_PRESENCE, key)
        self.commands.call(announce, "HGETALL", REDIS_PRESENCE)

    def take_over(self, key):
        """A login here takes key's nick from another server, if it is
        there: its rooms are told here (its server may be dead, and then
        never announces it lost: the nick is ours in Redis now), and its
        server lets it go. Return whether it was."""
        user = self.elsewhere.pop(key, None)
        if user is None:
            return False
        self.say_about(user, format_line("left", nick=user.nick, reason=LEFT_ELSEWHERE))
        self.tell("takeover", key=key)
        return True

    def moderate_elsewhere(self, key, **fields):
        """An operator here acts on a user of another server: that server
        carries it out. Return whether the user is elsewhere."""
        if key not in self.elsewhere:
            return False
        self.tell("moderate", key=key, **fields)
        return True

    def say_about(self, user, line):
        """A line about another server's user (a RemoteUser) to each of its
        rooms, its members each getting it once."""
        rooms = [Room(self.names.get(key, key)) for key in user.rooms]
        for room, copy in line.about_person(rooms):
            self.commands.call(None, *self._publish_command(room.key, room.name, copy))

    def claim(self, key, user, answer, force=False):
        """Take user's nick (a RemoteUser) for one of ours, unless someone
        anywhere has it (force: a login, which takes it anyway):
        answer(taken?, how many are online with it), or answer(None, None)
        when Redis could not say."""
        user.server = self.server_id
        value = user.to_json()

        def claimed(reply):
            if isinstance(reply, RedisError):
                answer(None, None)
            else:
                answer(reply == 0, reply)
        self.commands.call(claimed, "EVALSHA", self.claim_script, 1, REDIS_PRESENCE, key,
                           value, "force" if force else "")

    def place(self, conn):
        """One of ours, as it is now (its rooms, nick, operator, away)."""
        if conn.key is not None:
            value = RemoteUser(conn.nick, [room.key for room in conn.rooms], self.server_id,
                               conn.op, conn.away).to_json()
            self.commands.call(None, "HSET", REDIS_PRESENCE, conn.key, value)

    def release(self, key):
        """Free a nick of ours (unless a login on another server took it over)."""
        if not self.down:
            self.commands.call(None, "EVALSHA", self.release_script, 1, REDIS_PRESENCE, key,
                               self.server_id)

    def tell(self, kind, **fields):
        """A control entry for the other servers (see CONTROL_KINDS)."""
        self.commands.call(None, *self._publish_command("", "", Line("", kind, fields)))

    def remember_room(self, key, name):
        if key not in self.names:
            self.names[key] = name
            self.commands.call(None, "HSETNX", REDIS_ROOMS, key, name)  # (the lobby: load())

    def keep_topic(self, key, text, nick):
        if text is None:
            self.commands.call(None, "HDEL", REDIS_TOPICS, key)
        else:
            self.commands.call(None, "HSET", REDIS_TOPICS, key,
                               json.dumps({"text": text, "nick": nick}))

    def unsent(self):
        """Whether commands wait to be written (queued since the pass's writes)."""
        return any(link.outbuf and link.events == selectors.EVENT_READ
                   for link in (self.commands, self.feed) if link.alive)

    def heard(self, entry):
        """Keep the copy of who is where, and each room's last messages and
        topic, current from an entry of the feed (every server's, ours too)."""
        kind, fields, room = entry["k"], entry["f"], entry["r"]
        if kind in CONTROL_KINDS:
            if kind in ("account", "ban") and entry["o"] != self.server_id:
                self._changed(kind, fields["key"], fields)
            elif kind == "away" and fields["key"] in self.elsewhere:
                self.elsewhere[fields["key"]].away = fields["away"]
            elif kind == "roomless" and entry["o"] != self.server_id:
                about = dict(fields)  # a user in no room arrived, was renamed or left
                self._heard_of_user(about.pop("what"), about, None, entry["o"],
                                    {"person": "roomless"})
            return
        if room and room not in self.names:
            self.names[room] = entry["m"]  # its spelling, for /rooms
        if kind in ("message", "action"):
            self.newest_id = max(self.newest_id, entry["id"])
            item = (entry["id"], entry["x"].get("when", 0), fields["nick"], kind,
                    fields["text"])
            if room in self.loading:
                self.loading[room][0].append(item)  # merged with what is being read
            elif room in self.recents:
                recent = self.recents[room]
                # (A room's ids only grow: one its history read had already
                # got, when the feed runs behind that read, is not kept twice.)
                if not recent or item[0] > recent[-1][0]:
                    recent.append(item)
        elif kind in ("topic_set", "topic_cleared"):
            self.topics[room] = (fields.get("text"), fields["nick"])
        self._heard_of_user(kind, fields, room, entry["o"], entry["x"])

    def _heard_of_user(self, kind, fields, room, server, extra):
        """Keep the copy of the other servers' users current from a line of
        the feed (said by server)."""
        if kind in ("joined", "joined_room"):
            if server == self.server_id:
                return  # (ours are Chat.members)
            key = nick_key(fields["nick"])
            user = self.elsewhere.get(key)
            if user is None or user.server != server:  # new (or a login took it over)
                user = self.elsewhere[key] = RemoteUser(fields["nick"], [], server)
            if room is not None and room not in user.rooms:  # (None: it is in no room)
                user.rooms.append(room)
        elif kind == "renamed":
            user = self.elsewhere.pop(nick_key(fields["old"]), None)
            if user is not None:  # (said in each of its rooms: the first moves it)
                user.nick = fields["new"]
                self.elsewhere[nick_key(fields["new"])] = user
        elif kind == "left" and "person" not in extra:  # /part, /join: of one room
            user = self.elsewhere.get(nick_key(fields["nick"]))
            if user is not None and room in user.rooms:
                user.rooms.remove(room)
        elif kind == "opped" and nick_key(fields["nick"]) in self.elsewhere:
            self.elsewhere[nick_key(fields["nick"])].op = True
        elif kind in ("kicked", "banned", "left"):
            user = self.elsewhere.get(nick_key(fields["nick"]))
            # Said by the user's own server (or of a lost one): a login
            # elsewhere may have taken the nick over in between.
            if user is not None and (user.server == server
                                     or fields.get("reason") == LEFT_SERVER_LOST):
                del self.elsewhere[nick_key(fields["nick"])]

    def watch(self, key):
        """A room gets a member here: from now on its last messages are kept
        (read from its history in Redis, then from the feed); return the
        deque that holds them."""
        recent = self.recents.get(key)
        if recent is not None:
            return recent
        recent = self.recents[key] = collections.deque(maxlen=self.replay)
        if not self.replay or self.down or self.commands is None:
            return recent
        self.loading[key] = ([], [], recent)

        def read(reply):
            heard, waiting, deque = self.loading.get(key, (None, None, None))
            if deque is not recent:
                return  # forgotten and watched again meanwhile: that read's answer counts
            del self.loading[key]
            rows = [] if isinstance(reply, RedisError) else history_rows(reply)[::-1]
            recent.extend(rows)
            newest = rows[-1][0] if rows else 0
            recent.extend(item for item in heard if item[0] > newest)
            for callback in waiting:
                callback()
        self.commands.call(read, "XREVRANGE", REDIS_HISTORY + key, "+", "-",
                           "COUNT", self.replay)
        return recent

    def when_watched(self, key, callback):
        """callback() once the room's last messages are read (at once if they
        are). Its read went to Redis before the join line that calls this
        came back through the feed, so its answer is already here, or very
        nearly: read what the commands link has, first."""
        if key in self.loading and self.commands is not None and self.commands.alive:
            self.commands.on_ready()
        if key in self.loading:
            self.loading[key][1].append(callback)
        else:
            callback()

    def unwatch(self, key):
        """No member here any more: its last messages are not kept."""
        self.recents.pop(key, None)
        self.loading.pop(key, None)

    def room_counts(self):
        """{room key: [its name, how many of the other servers' users are in it]}."""
        counts = {}
        for user in self.elsewhere.values():
            for key in user.rooms:
                counts.setdefault(key, [self.names.get(key, key), 0])[1] += 1
        return counts

    def open_room(self, key, name, before_reading):
        """The Room for key, from what the feed has told us of it; its last
        messages kept from now on (see watch())."""
        self.remember_room(key, name)
        topic, topic_nick = self.topics.get(key, (None, None))
        room = Room(self.names.get(key, name), topic, topic_nick, replay=self.replay)
        room.recent = self.watch(key)
        return room

    def known_name(self, key, name):
        return self.names.get(key, name)

    def stamp(self, room, kind, nick, text, when):
        return None  # stored, and given its id, with the feed's entry

    def history_reader(self):
        return self.reader

    def in_room(self, room_key):
        """The other servers' users in a room: [(nick, op, away?)]."""
        return [(user.nick, user.op, user.away is not None)
                for user in self.elsewhere.values() if room_key in user.rooms]

    def reader(self):
        """The calling worker thread's connection, for history and searches
        (one per thread: the lanes run at once; made when first needed)."""
        history = getattr(self.history, "reader", None)
        if history is None:
            history = self.history.reader = RedisHistory(self.address)
        return history

    def close_reader(self):
        """The calling worker thread's connection, if it made one, is closed."""
        history = getattr(self.history, "reader", None)
        if history is not None:
            history.redis.close()
            self.history.reader = None


class RedisStore:
    """The store with --redis: accounts and bans in Redis, read from the
    copies the feed keeps current (the loop never waits for Redis); what a
    single server keeps in SQLite and several servers do not share goes on
    to the local store. Mailboxes are asked for with a callback (Chat)."""

    # What stays this server's own, in its SQLite file (writing a batch,
    # the search index's upkeep, a topic's copy): nothing the chat shares.
    LOCAL = frozenset({"batch", "indexed", "failure", "flush", "usage", "close", "index_some",
                       "set_topic", "reads_apart", "reader", "close_reader", "db", "write_s"})

    def __init__(self, network, local):
        self.network = network
        self.local = local

    def __getattr__(self, name):
        if name in self.LOCAL:
            return getattr(self.local, name)
        # Anything else would be one server's alone, silently: say so instead.
        raise AttributeError("with --redis, the store has no %s of its own" % name)

    def account(self, key):
        return self.network.accounts.get(key)

    def add_account(self, key, nick, password_hash):
        if key in self.network.accounts:
            return False
        self.network.change("account", key, nick=nick, hash=password_hash)
        return True

    def set_password(self, key, password_hash):
        nick = self.network.accounts[key][0]
        self.network.change("account", key, nick=nick, hash=password_hash)

    def remove_account(self, key):
        self.network.change("account", key, nick=None)

    def add_ban(self, ip, nick):
        self.network.change("ban", ip, nick=nick)

    def remove_ban(self, ip):
        was = ip in self.network.banned
        self.network.change("ban", ip, nick=None)
        return was

    def is_banned(self, ip):
        return ip in self.network.banned

    def bans(self):
        return sorted(self.network.banned.items())


def history_rows(entries):
    """Stream entries of a room's history as (id, time, nick, kind, text)."""
    rows = []
    for entry_id, flat in entries or ():
        fields = _pairs(flat)
        rows.append((int(_text(entry_id).split("-")[0]), float(fields["w"]), fields["n"],
                     fields["k"], fields["t"]))
    return rows


class RedisHistory:
    """The store's history reads (recent, after, search), from the rooms'
    streams in Redis; in the worker thread, never the loop."""

    def __init__(self, address):
        self.redis = BlockingRedis(address)

    def _call(self, *args):
        """One command; a connection that broke since the last one (Redis
        went away and came back in between) is made again, once."""
        try:
            return self.redis.call(*args)
        except OSError:
            return self.redis.call(*args)  # (call() connects again)

    def recent(self, room, count):
        return history_rows(self._call("XREVRANGE", REDIS_HISTORY + room, "+", "-",
                                            "COUNT", count))[::-1]

    def after(self, room, after, count):
        return history_rows(self._call("XRANGE", REDIS_HISTORY + room,
                                            "%d-0" % (after + 1), "+", "COUNT", count))

    def window(self, room, low, high, count, newest):
        """As SQLiteStore.window: the stream's ids are the messages' ids."""
        first, last = "%d-0" % (low + 1), "+" if high is None else "%d-0" % (high - 1)
        if count <= 0 or (high is not None and high - 1 < low + 1):
            return []
        if newest:
            return history_rows(self._call("XREVRANGE", REDIS_HISTORY + room, last, first,
                                           "COUNT", count))[::-1]
        return history_rows(self._call("XRANGE", REDIS_HISTORY + room, first, last,
                                       "COUNT", count))

    def id_before(self, room, when):
        """As SQLiteStore.id_before: the stream read newest first, a
        thousand at a time, until a message older than when."""
        upper = "+"
        while True:
            rows = history_rows(self._call("XREVRANGE", REDIS_HISTORY + room, upper, "-",
                                           "COUNT", 1000))
            for row in rows:
                if row[1] < when:
                    return row[0]
            if len(rows) < 1000:
                return 0
            upper = "%d-0" % (rows[-1][0] - 1)

    def search(self, room, text, count):
        """The last count messages whose text holds text (case ignored):
        the stream read newest first, a thousand at a time."""
        needle, found, upper = text.casefold(), [], "+"
        while len(found) < count:
            rows = history_rows(self._call("XREVRANGE", REDIS_HISTORY + room, upper, "-",
                                                "COUNT", 1000))
            found += [row for row in rows if needle in row[4].casefold()][:count - len(found)]
            if len(rows) < 1000:
                break
            upper = "%d-0" % (rows[-1][0] - 1)
        return found[::-1]


# --- Client -------------------------------------------------------------------
# The threaded pipe-socket client: a thread reads the keyboard and hands each
# line through a socket pair to the network loop, which selects on that socket
# and the server's. Stdin is never selected on, so the loop works on Windows.

PROMPT = "{room}> "             # the room you are in: #lobby>
NO_ROOM = "(no room)"         # ...in the prompt, after /part of the last one
NICK_PROMPT = "nickname: "
PASSWORD_PROMPT = "room password: "
ACCOUNT_PROMPT = "password for {nick}: "
# Typed lines that carry an account's password: never kept in the Up-arrow
# history, and shown with the password masked.
SECRET_COMMANDS = ("/login", "/register", "/password", "/unregister", "/op")
BELL = "\a"
# Nick colours: the terminal's six colours and their bright forms (not black
# or white, one of which is the background). A nick's colour comes from a
# stable hash of its clash key, so it is the same in every session.
NICK_COLORS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)
STYLES = {
    "notice": "2",        # dim
    "error": "31",        # red
    "private": "1;35",    # bold magenta, both ways
    "mention": "1;7",     # bold reverse: your nick in someone's line
    "own": "1",           # bold: your own nick
    "time": "2",
    "room": "36",         # cyan: the room of a line not of the current room
}
# Typed commands the client handles itself; the rest go to the server.
CLIENT_HELP = (
    "/reply TEXT          answer the last private message (this client)",
    "/timestamps          HH:MM before each line, on or off (this client)",
)
CLIENT_COMMANDS = help_commands(CLIENT_HELP)
CLIENT_ONLY = ("/reply", "/timestamps", "/format")  # answered by the client, never sent
# Tab offers these until the server's /help says which it has for this user.
SERVER_COMMANDS = help_commands(HELP)
OPERATOR_COMMANDS = help_commands(HELP_OPERATORS)
ALL_HELP = frozenset(HELP + (HELP_OP,) + HELP_OPERATORS)
# Pings the client sends by itself: their pongs mark where an answer ends.
SETUP_TOKEN = "chat.py-client-setup"
HELP_TOKEN = "chat.py-client-help"
JOIN_TOKEN = "chat.py-client-join"
RESUME_TOKEN = "chat.py-client-resume"   # back after a reconnect: the replays are over
NEWEST_TOKEN = "chat.py-client-newest"   # in a new room: the next block is the newest id
CLIENT_TOKENS = frozenset({SETUP_TOKEN, HELP_TOKEN, JOIN_TOKEN, RESUME_TOKEN, NEWEST_TOKEN})
HIDE = "hide"                  # an awaited answer the user did not ask for: not shown


class Awaited(collections.namedtuple("Awaited", "kind what")):
    """An answer the client waits for (ClientSession.awaited): its kind (a
    line's kind; "block" for a history block; "move" for our own join, part
    or "talking in"), and what it was asked for (HIDE, a pong's token, a
    block's question, a move's (command, the room current then))."""
NOT_CONNECTED_YET = "not connected: that goes once reconnected"
CAUGHT_UP = "{messages} in {room} while you were away (times in UTC):"
# JSON types that are a room's lines (the others are about a person, or ours).
ROOM_LINE_TYPES = frozenset({"message", "action", "joined", "left", "topic"})
# Typed commands whose answer moves us (the prompt waits for it).
MOVING_COMMANDS = ("/join", "/open", "/part")
# Commands followed by a room's name (Tab completes rooms there).
ROOM_COMMANDS = ("/join", "/open", "/part", "/who", "/history")
CATCH_UP_FAILED = "what was said in {room} while you were away can't be shown: {reason}"
# The server's answer to the /format json the client starts with.
FORMAT_JSON_ANSWER = "format: json"
# What a server without JSON mode answers /format with: the client stays in text.
NO_JSON_CODES = frozenset({"unknown_command", "nick_invalid", "usage", "not_registered"})
# The keyboard thread's records: a tag byte for what was asked for.
TYPED_TAGS = {"nick": b"N", "secret": b"P", "account": b"A", "line": b"L"}
TYPED_KINDS = {tag: kind for kind, tag in TYPED_TAGS.items()}
# OpenSSL's words for a plain-text answer to a TLS hello.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST",
                             "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})
CLIENT_MAX_LINE = 65536       # a longer line from the server is not shown


def styled(code, text):
    """Wrap text in an SGR colour code and a reset."""
    return "\x1b[%sm%s\x1b[0m" % (code, text)


def nick_color(nick):
    return NICK_COLORS[zlib.crc32(nick_key(nick).encode(ENCODING)) % len(NICK_COLORS)]


def mentions(text, nick):
    """Tell whether text names nick as a word, in any case."""
    if not nick:
        return False
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(nick), text,
                     re.IGNORECASE) is not None


def render_line(text, me=None, color=False):
    """Return the line as shown: nick colours, your nick highlighted, notices
    dim, errors red, private messages distinct. text is already clean."""
    if not color:
        return text
    kind, fields = line_parts(text)
    if kind in ("private", "private_echo"):
        return styled(STYLES["private"], text)
    if kind == "error":
        return styled(STYLES["error"], text)
    if kind == "other":
        return text
    if kind not in ("message", "action"):
        return styled(STYLES["notice"], text)  # every kind of notice, and history
    nick, rest = fields["nick"], fields["text"]
    shown_nick = styled(nick_color(nick), nick)
    if me and nick_key(nick) == nick_key(me):
        shown_nick = styled(STYLES["own"], shown_nick)
    elif mentions(rest, me):
        rest = styled(STYLES["mention"], rest)
    return format_line(kind, nick=shown_nick, text=rest)


def wants_bell(text, me):
    """A private message, or someone else's line that names you."""
    kind, fields = line_parts(text)
    if kind == "private":
        return True
    return (kind in ("message", "action") and bool(me)
            and nick_key(fields["nick"]) != nick_key(me) and mentions(fields["text"], me))


def track_nicks(nicks, text):
    """Keep nicks (clash key -> nick) current from a line from the server."""
    kind, fields = line_parts(text)
    if kind in ("message", "action", "private", "joined"):
        nicks[nick_key(fields["nick"])] = fields["nick"]
    elif kind in ("left", "kicked", "banned"):
        nicks.pop(nick_key(fields["nick"]), None)
    elif kind == "renamed":
        nicks.pop(nick_key(fields["old"]), None)
        nicks[nick_key(fields["new"])] = fields["new"]
    elif kind == "who":
        nicks.clear()
        for nick in filter(None, fields["nicks"].split(", ")):
            nick = nick.lstrip("@")
            if nick.endswith(AWAY_MARK):
                nick = nick[:-len(AWAY_MARK)]
            nicks[nick_key(nick)] = nick


def completions(word, before, nicks, commands=CLIENT_COMMANDS + SERVER_COMMANDS, rooms=()):
    """Return what Tab may turn word into: a command if it is the line's first
    word and starts with /, a room after /join (/open, /part...) or for a
    word that starts with #, else a nick (case ignored). before is what the
    line holds before word."""
    if not before.strip() and word.startswith("/"):
        return sorted(c for c in commands if c.startswith(word.lower()))
    if before.strip().lower() in ROOM_COMMANDS or word.startswith("#"):
        folded = room_name(word).casefold()
        return sorted((r for r in rooms if r.casefold().startswith(folded)), key=str.casefold)
    folded = word.casefold()
    return sorted((n for n in nicks.values() if n.casefold().startswith(folded)),
                  key=str.casefold)


def local_history_line(text):
    """A history line with its time (UTC from the server) in local time."""
    kind, fields = line_parts(text)
    if kind != "history":
        return text.replace(TIMES_IN_UTC, TIMES_LOCAL)
    when = calendar.timegm(time.strptime(fields["time"], HISTORY_TIME))
    return format_line("history", time=time.strftime(HISTORY_TIME, time.localtime(when)),
                       line=fields["line"])


def use_color(mode, out, environ=os.environ):
    """--color: always, never, or auto: on a terminal unless NO_COLOR is set
    (and on Windows only in a terminal known to take escape codes)."""
    if mode != "auto":
        return mode == "always"
    if environ.get("NO_COLOR") or not out.isatty():
        return False
    return os.name != "nt" or "WT_SESSION" in environ or "TERM" in environ


def display_width(text):
    """Return how many terminal columns text takes: wide 2, combining 0."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
    return width


READLINE_MAX_BYTES = 1 << 20   # more than any line typed; bounds a torn read
TYPEAHEAD_WAIT_S = 0.2          # a line to show waits at most this long for a paste


class ReadlineView:
    """readline's own variables, read and set through ctypes: what is typed,
    where its cursor is, whether the line is finished; None where they can't
    be reached (libedit, no ctypes).

    The readline module has get_line_buffer(), but it decodes rl_line_buffer
    in C while the keyboard thread's readline may be changing it without the
    GIL, and glibc aborts the process when the string is torn mid-decode
    (seen under a paste). Copying rl_end bytes and decoding them here can
    at worst show a torn line for an instant. rl_point, rl_done and
    rl_already_prompted are not exposed at all.
    """

    NAMES = ("rl_end", "rl_point", "rl_done", "rl_already_prompted")

    @classmethod
    def open(cls, readline_module):
        if readline_module is None or ctypes is None:
            return None
        try:
            library = ctypes.CDLL(readline_module.__file__)
            buffer = ctypes.c_void_p.in_dll(library, "rl_line_buffer")
            ints = [ctypes.c_int.in_dll(library, name) for name in cls.NAMES]
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        return cls(buffer, *ints)

    def __init__(self, buffer, end, point, done, already_prompted):
        self.buffer, self.end, self.point = buffer, end, point
        self.done, self.already_prompted = done, already_prompted

    def typed(self):
        """Return (the typed line as bytes, the cursor's byte offset in it)."""
        address, size = self.buffer.value, min(max(self.end.value, 0), READLINE_MAX_BYTES)
        typed = ctypes.string_at(address, size) if address and size else b""
        return typed, min(max(self.point.value, 0), len(typed))

    def start_line(self):
        """Before input(), in the keyboard thread while readline is idle: an
        empty line, not finished, and a prompt that we print ourselves (so
        that it is never on the screen without the Terminal knowing)."""
        self.end.value = self.point.value = self.done.value = 0
        self.already_prompted.value = 1

    def finished(self):
        """The line was accepted: readline is ending it (its CR LF)."""
        return self.done.value != 0


def typeahead(fd):
    """How many typed bytes wait unread (a paste in progress); 0 where unknown."""
    if termios is None or not hasattr(termios, "FIONREAD"):
        return 0
    try:
        import fcntl  # Unix only, like termios
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ImportError, struct.error):
        return 0


class Terminal:
    """Where the client's lines go. On a terminal, a line that arrives while
    the user types is printed above the input line, which is then redrawn as
    it was, cursor included. Widths are display columns: a wide character
    takes two, a combining mark none; the input may span several rows.

    Two threads write to the screen: readline's (the keyboard thread) and
    show()'s (the loop). Where readline's variables can be reached, the
    prompt is printed here under the lock, and a line to show waits for a
    paste to be read and for a finished line to be ended (both take
    milliseconds), so that the redraw never races readline's own echo."""

    def __init__(self, out, interactive, readline_module=None, stdin_fd=0):
        self.out = out
        self.interactive = interactive
        self.readline = readline_module
        self.view = ReadlineView.open(readline_module)
        self.stdin_fd = stdin_fd
        self.prompt = None            # None: no input line is on the screen
        self.lock = threading.Lock()  # show() runs in the loop, input in its thread

    def show(self, text):
        """Print one line without tearing what the user is typing."""
        if self.interactive and self.view is not None:
            self._wait_for_readline()
        with self.lock:
            if self.interactive and self.prompt is not None:
                typed, point = self._input()
                self._write(self._erase(typed, point) + text + "\n"
                            + self._redraw(typed, point))
            else:
                self._write(text + "\n")

    def finish(self):
        """Erase the input line, leaving the shell a clean one."""
        with self.lock:
            if self.interactive and self.prompt is not None:
                self._write(self._erase(*self._input()))
            self.prompt = None

    def _forget_secret(self, text):
        """A typed line that carries a password: out of the Up-arrow history.
        Called with the lock held."""
        if self.readline is not None:
            length = self.readline.get_current_history_length()
            if length and self.readline.get_history_item(length) == text:
                self.readline.remove_history_item(length - 1)

    def _clear_sent(self, prompt, text):
        """Take a sent line off the screen, as irssi does: what it says comes
        back as the server's echo (or its answer), so it is not shown twice,
        and a password in it is not left on the screen at all. The cursor is
        on the row after it; it ends where the line began. Called with the
        lock held."""
        rows = display_width(prompt + text) // self._columns() + 1
        self._write("\x1b[%dA\r\x1b[J" % rows)

    def end_of_input(self):
        """At Ctrl-D readline leaves the cursor after the prompt: clear that
        line, so that what follows (and the shell) starts on a clean one."""
        with self.lock:
            if self.interactive:
                self._write("\r\x1b[K")

    def read_line(self, prompt):
        """Read a typed line (str) showing prompt; EOFError at the end of input."""
        if self.view is not None:
            with self.lock:  # readline will not print it: on the screen and known at once
                self.view.start_line()
                self._write(prompt)
                self.prompt = prompt
        elif self.readline:
            # The hook runs once readline has shown the prompt: from then on
            # an incoming line must redraw it.
            self.readline.set_pre_input_hook(lambda: setattr(self, "prompt", prompt))
        else:
            self.prompt = prompt
        text = None
        try:
            text = input(prompt)
            return text
        finally:
            with self.lock:  # before any line is shown after it
                if text is not None and text.split(" ", 1)[0].lower() in SECRET_COMMANDS:
                    self._forget_secret(text)
                if text is not None and self.interactive:
                    self._clear_sent(prompt, text)
                self.prompt = None

    def _wait_for_readline(self):
        """Wait, briefly, while keys wait unread (a paste: readline echoes them
        later, all at once) or readline is ending an accepted line."""
        deadline = time.monotonic() + TYPEAHEAD_WAIT_S
        while ((typeahead(self.stdin_fd) or (self.prompt is not None and self.view.finished()))
               and time.monotonic() < deadline):
            time.sleep(0.001)  # readline's thread is mid-way; bounded by the deadline

    def _input(self):
        """Return (what is typed, the cursor's index in it)."""
        if self.view is not None:
            typed, point = self.view.typed()
            return (typed.decode(ENCODING, "replace"),
                    len(typed[:point].decode(ENCODING, "ignore")))
        typed = self.readline.get_line_buffer() if self.readline else ""
        return typed, len(typed)

    @staticmethod
    def _columns():
        return shutil.get_terminal_size().columns or 80

    def _erase(self, typed, point):
        """Escape codes that move to the start of the input and clear to the
        end of the screen. Like readline, a cursor that reached the right
        margin is on the next row."""
        rows = display_width(self.prompt + typed[:point]) // self._columns()
        return "\r" + ("\x1b[%dA" % rows if rows else "") + "\x1b[J"

    def _redraw(self, typed, point):
        """The prompt and input again, then the cursor back where it was."""
        columns = self._columns()
        end = display_width(self.prompt + typed)
        here = display_width(self.prompt + typed[:point])
        out = self.prompt + typed
        if end and end % columns == 0:
            out += " \r"  # readline's way past the right margin: onto the next row
        if here != end:
            rows = end // columns - here // columns
            out += ("\x1b[%dA" % rows if rows else "") + "\r"
            out += "\x1b[%dC" % (here % columns) if here % columns else ""
        return out

    def write_now(self, text):
        """Write text as it is (a prompt of our own), under the display's lock."""
        with self.lock:
            self._write(text)

    def _write(self, text):
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed stdout (a pipe's reader gone) ends nothing here


class ClientJson:
    """Part of ClientSession: JSON mode. The server's objects shown as the
    text lines they stand for, blocks gathered until their end, each room's
    newest id noted (what a reconnect asks what was said after); --json
    passes them on as they are."""

    # -- JSON mode: objects, shown as the text lines they stand for --

    def _lines_from_json(self, text):
        """The lines to show for one object, in order (none while a block,
        the offline messages or a catch-up gathers)."""
        try:
            obj = clean_json(json.loads(text))
        except ValueError:
            return [text]
        if not isinstance(obj, dict):
            return [text]
        kind = obj.get("type")
        if self.format_asked and kind == "notice" and obj.get("text") == FORMAT_JSON_ANSWER:
            self._json_on()
            return []
        offline = kind == "private" and obj.get("offline")
        lines = [] if offline else self._mail_block()
        if offline:
            self.mail.append(line_from_json(obj))
        elif obj.get("history"):
            self.block.append((obj.get("id"), line_from_json(obj)))
        elif kind == "history_end":
            lines += self._history_end(obj)
        elif kind in ("message", "action") and (self.resuming or self.catching_up):
            self.held.append(obj)  # said after what the catch-up will show
        elif kind == "error" and self.catching_up:
            lines += self._catch_up_refused(obj)  # the answer to /history after
        else:
            lines += self._live_line(obj, kind)
        return [line for line in lines if line is not None]

    def _json_on(self):
        """The server speaks JSON: learn the newest id of the room (which a
        reconnect asks what was said after), unless a reconnect is on it."""
        self.format_asked = False
        self.json_now = self.speaks_json = True
        if self.registered and self.resume is None:
            self._expect("block", HIDE)
            self.io.send(b"/history 1\n")
        if self.wants_line():
            self.io.ask("line")  # typing waited for the answer

    def _live_line(self, obj, kind):
        topic_asked = False
        if kind == "topic":  # the standing topic: on joining, or a typed /topic's answer
            topic_asked = self.just_joined or bool(self._answered("topic"))
        else:
            self.just_joined = kind == "joined" and (
                not self.registered or nick_key(obj.get("nick", "")) == nick_key(self.nick))
        if kind in ("message", "action"):
            self._saw_id(obj)
        line = line_from_json(obj, self.nick, topic_asked)
        if kind == "joined" and self.registered and line is not None and nick_key(
                obj.get("nick", "")) == nick_key(self.nick or ""):  # /join or /open #lobby
            line = format_line("joined_room", nick=obj["nick"], room=obj["room"],
                               count=obj["count"]).having(room=obj["room"])
        if kind == "private" and line is not None and nick_key(obj["from"]) == nick_key(
                obj["to"]) == nick_key(self.nick):
            # To ourselves: the server sends what we got, then the echo of what we sent.
            self.to_self = not self.to_self
            if self.to_self:
                line = format_line("private", nick=obj["from"], text=obj["text"])
        if line is not None and self._of_another_room(obj, kind):
            line.having(marked=obj["room"])  # shown as text mode would: "#rust <bob> hi"
        return [line]

    def _of_another_room(self, obj, kind):
        """Whether an object is a line of a room that is not our current one
        (a line about a person, such as a rename, is of none)."""
        room = obj.get("room")
        if not isinstance(room, str) or room == self.room or kind not in ROOM_LINE_TYPES:
            return False
        if kind == "joined" and nick_key(obj.get("nick", "")) == nick_key(self.nick or ""):
            return False  # ours: that room is current from here on
        reason = obj.get("reason")
        return kind != "left" or reason == LEFT_PARTED or (
            isinstance(reason, str) and reason.startswith(LEFT_WENT_TO.format(room="")))

    def _saw_id(self, obj):
        message_id, room = obj.get("id"), obj.get("room")
        if isinstance(room, str) and isinstance(message_id, int) and (
                message_id > self.last_ids.get(room, 0)):
            self.last_ids[room] = message_id

    def _mail_block(self):
        """The offline messages gathered, as the text block that holds them."""
        if not self.mail:
            return []
        mail, self.mail = self.mail, []
        return ([format_line("offline_start", messages=plural(len(mail), "message"))]
                + mail + [format_line("offline_end")])

    def _history_end(self, obj):
        """A block is complete: its lines as text mode has them (a header,
        the items, the end), or what a reconnect has not seen of it."""
        items, self.block = self.block, []
        if self.resuming:
            return []  # a replay on coming back: the catch-up shows what was missed
        if self.catching_up:
            return self._caught_up(items)
        asked = self._answered_block()
        if asked is not None and asked.what == HIDE:
            for message_id, line in items:
                self._saw_id(dict(room=obj.get("room"), id=message_id))
            if isinstance(obj.get("room"), str):  # empty when we came: all of it is new
                self.last_ids.setdefault(obj["room"], 0)
            return []
        room = obj.get("room", self.room)
        for message_id, line in items:
            self._saw_id(dict(room=room, id=message_id))
        ask = asked.what if asked is not None else ("last", None)  # (else a replay)
        if not items:
            return [format_line({"last": "no_history", "search": "no_match",
                                 "after": "no_history_after"}[ask[0]], room=room,
                                text=ask[1], after=ask[1])]
        messages = plural(len(items), "message")
        header = {"last": format_line("history_last", messages=messages, room=room),
                  "search": format_line("history_search", messages=messages, room=room,
                                        text=ask[1]),
                  "after": format_line("history_after", messages=messages, room=room,
                                       after=ask[1])}[ask[0]]
        return [header] + [line for _, line in items] + [format_line("history_end")]

    def _json_line(self, text):
        """--json: pass the server's objects on as they are (a text line sent
        before /format json was read becomes a notice object); watch for our
        join and for a refusal."""
        if not text.startswith("{"):
            kind, fields = parse_server_line(text)
            if kind == "notice" and fields["text"] == "format: text":
                return
            text = json.dumps(json_object(format_line(kind, **fields) if kind in (
                "notice", "error") else notice(text)), ensure_ascii=False)
        try:
            obj = json.loads(text)
        except ValueError:
            return  # not from a chat.py server: nothing a program could use
        self.io.show(text)
        if self.registered:
            return
        if obj.get("type") == "joined":
            self.registered = self.was_in = True
            self.nick_sent = False
            self.answer_deadline = None
            self.nick = obj.get("nick", self.nick)
            if self.reconnecting:
                self.reconnecting = False
                self.backoff = RECONNECT_FIRST_S
                self._send_unsent()
            self.io.ask("line")
        elif obj.get("type") == "notice" and is_nick_question(obj.get("text", "")):
            self._greeted()
        elif obj.get("type") == "error" and self.nick_sent:
            self.answer_deadline = None
            self.io.finish(1)  # nobody to ask: the refusal is on stdout


class ClientReconnect:
    """Part of ClientSession: --reconnect. Back after a lost connection: into
    every room it was in, each caught up from the last id seen there, the
    live lines held meanwhile shown after, nothing twice, nothing missed."""

    # -- coming back after a reconnect: what was missed, once, in order --

    def _resume(self):
        """Registered again (in the lobby): back into each room we were in,
        the current one last; the replays that come are dropped, and what
        was said in each since the last id we saw there is asked for once
        they are over (RESUME_TOKEN)."""
        rooms, current, last_ids = self.resume
        self.resuming = True
        commands = [encode_line("/part " + LOBBY)] if LOBBY not in rooms else []
        commands += [encode_line("/open " + room) for room in rooms if room != LOBBY]
        if current is not None and rooms and current != rooms[-1]:
            commands.append(encode_line("/open " + current))
        self.io.send(b"".join(commands) + encode_line("/ping " + RESUME_TOKEN))

    def _resumed(self):
        """The replays are over: ask for what was missed in each room (one
        with no id seen has nothing to ask after); return the lines to show."""
        self.resuming = False
        rooms, current, last_ids = self.resume
        self.last_ids.update(last_ids)
        self.to_catch_up = [(room, last_ids[room]) for room in rooms if room in last_ids]
        return self._next_catch_up()

    def _next_catch_up(self):
        """Ask about the next room, or end the catch-up."""
        if not self.to_catch_up:
            return self._end_catch_up()
        self.catching_up = True
        self.catch_up_refusals = 0
        self._ask_catch_up()
        return []

    def _ask_catch_up(self):
        room, last_id = self.to_catch_up[0]
        named = "" if room == self.room else room + " "  # (as a v2 server understands it)
        self.io.send(encode_line("/history %safter %d" % (named, self.last_ids.get(
            room, last_id))))

    def _caught_up(self, items):
        """A page of /history #ROOM after: show what was not seen; ask for the
        next page if it was full; else the next room, and at last the lines
        that waited, then what was typed while away."""
        room = self.to_catch_up[0][0]
        lines = []
        for message_id, line in items:
            if message_id > self.last_ids.get(room, 0):
                lines.append(line)
                self.last_ids[room] = message_id
        if lines:
            lines = ([format_line("notice", text=CAUGHT_UP.format(
                messages=plural(len(lines), "message"), room=room))]
                     + lines + [format_line("history_end")])
        if len(items) >= HISTORY_MAX:
            self._ask_catch_up()
            return lines
        self.to_catch_up.pop(0)
        return lines + self._next_catch_up()

    def _catch_up_refused(self, obj):
        """/history after was answered with an error (the history can't be
        read just now): ask again a little later, a few times; then say what
        can't be shown and go on, so the user is never left frozen."""
        self.catch_up_refusals += 1
        if self.catch_up_refusals < CATCH_UP_TRIES:
            self.catch_up_retry_at = time.monotonic() + CATCH_UP_RETRY_S
            return []
        room = self.to_catch_up.pop(0)[0]
        return [format_line("notice", text=CATCH_UP_FAILED.format(
            room=room, reason=obj.get("text", "refused")))] + self._next_catch_up()

    def _retry_catch_up(self):
        self.catch_up_retry_at = None
        if self.online and self.catching_up and self.to_catch_up:
            self._ask_catch_up()

    def _end_catch_up(self):
        """Caught up (or given up): the live lines that waited, then what
        was typed while away."""
        lines = []
        self.catching_up = False
        self.catch_up_retry_at = None
        held, self.held = self.held, []
        for obj in held:
            if obj.get("id", 0) > self.last_ids.get(obj.get("room"), 0):
                lines += self._live_line(obj, obj["type"])
        self.resume = None
        self._send_unsent()
        return lines

    # -- --reconnect --

    def _lose_connection(self):
        self.io.disconnect()
        self.online = False
        if self.registered and self.resume is None:  # where to come back to
            self.resume = (list(self.joined), self.room, dict(self.last_ids))
        self.registered = False

    def _schedule_reconnect(self, why):
        """The next attempt, later each time; why (None: say nothing) is shown."""
        delay = self.backoff * random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)
        self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)
        self.io.reconnect_at(time.monotonic() + delay)
        if why is not None:
            self.notice("%s; reconnecting in %.0f s (Ctrl-C to stop)" % (why, delay))

    def _back_in(self):
        """Registered again after a reconnect: say so, send what waited."""
        self.reconnecting = False
        self.backoff = RECONNECT_FIRST_S
        self.notice("reconnected")
        if self.resume is not None and self.json_now:
            self._resume()  # what was typed meanwhile goes once caught up
            return
        if self.resume is not None and self.resume[1] not in (LOBBY, None):
            self.io.send(encode_line("/join " + self.resume[1]))  # its replay says the rest
        self.resume = None
        self._send_unsent()


class ClientRegistration:
    """Part of ClientSession: registering. The room's password, the nickname
    or the account's login, asked again where a person can answer; and the
    account to log in to again after a reconnect."""

    # -- registering --

    def _greeted(self):
        """The server asked for a nickname (or said nothing for a while)."""
        if not (self.nick_sent or self.registered):
            self._ask_for_registration()

    def _ask_for_registration(self):
        """Ask the user for the next thing registering needs: the room's
        password (on a terminal) before the nickname."""
        if self.needs_password and self.password is None and self.interactive:
            self.io.ask("secret")
        elif self._awaiting_account_password():
            self.io.ask("account")  # typed() sends /login NICK PASSWORD
        elif self.nick and not self.nick_sent:
            self._send_nick()
        else:
            self.io.ask("nick")

    def _awaiting_account_password(self):
        """--login at a terminal, its password not typed yet: the bare nick
        must not go (the server would refuse it as someone's account)."""
        return self.login and self.account_password is None and self.interactive

    def _send_nick(self):
        """The nick, or /login NICK PASSWORD when the nick is our account."""
        self.nick_sent = True
        if not self.interactive and not self.reconnecting:
            self.answer_deadline = time.monotonic() + CLIENT_ANSWER_WAIT_S
        if self.login and self.account_password is not None:
            self.io.send(encode_line("/login %s %s" % (self.nick, self.account_password)))
        else:
            self.io.send(self.nick.encode(ENCODING) + b"\n")

    def _send_password(self):
        self.pass_sent = True
        self.io.send(b"/pass " + self.password.encode(ENCODING) + b"\n")

    def _unregistered_line(self, text):
        """Before the join line: watch for the greeting, the answer to our
        nick and the password's; show what the user needs to see."""
        kind, fields = line_parts(text)
        if kind == "joined":
            self._joined(fields["nick"], text)
        elif kind == "notice" and fields["text"] == PASSWORD_GREETING:
            self.needs_password = True  # asked for below, or sent already
            if self.nick_sent and self.password is None and self.interactive:
                self.io.ask("secret")
        elif kind == "notice" and fields["text"] == PASSWORD_ACCEPTED:
            if not self.nick_sent:
                self._ask_for_registration()  # the nickname, now
        elif kind == "notice" and is_nick_question(fields["text"]):
            if not self.nick_sent and not self._awaiting_account_password():
                self._show_server_line(text)  # the user is about to answer it
            self._greeted()
        elif kind == "error":
            self._refused(fields["text"], text)
        elif not self.reconnecting:  # (coming back: the welcome and its news are old)
            self._show_server_line(text)

    def _refused(self, reason, text):
        """An error before registering: ask again where a person can answer."""
        if reason == PASSWORD_REQUIRED and self.interactive and not self.pass_sent:
            self.needs_password = True  # the nick went too early: the password first
            self.nick_sent = False
            self._ask_for_registration()
            return
        if reason == PASSWORD_REQUIRED and self.pass_sent:
            return  # the answer to a nick sent before the password: it goes again
        if reason == WRONG_LOGIN:
            self.pending_account = None
        self._show_server_line(text)
        if reason == WRONG_LOGIN and self.login and self.interactive and not self.reconnecting:
            self.nick_sent = False
            self.account_password = None
            self.answer_deadline = None
            self.io.ask("account")  # --login: the password again, the nick kept
            return
        self.answer_deadline = None
        if self.reconnecting:
            self._lose_connection()  # the old session may linger on the server: later
            self._schedule_reconnect("could not register again")
        elif reason == WRONG_PASSWORD and self.interactive:
            self.password = None  # the server closes; a new connection asks again
            self.retry_password = True
        elif self.interactive:
            self.nick_sent = False
            self.nick = None  # refused: the next one is typed
            self.io.ask("nick")
        else:
            self.io.finish(1)  # nobody to ask: the reason is shown

    def _joined(self, nick, text):
        """Our join line: in the room."""
        if self.pending_account is not None and nick_key(nick) == nick_key(
                self.pending_account[0] or nick):
            self._account_confirmed(nick)
        self.registered = self.was_in = True
        self.nick_sent = False
        self.answer_deadline = None
        self.nick = nick
        self.room = LOBBY
        self.joined = [LOBBY]
        self.last_ids = {}
        self._show_server_line(text)
        if not (self.format_asked or self.json_now or self.json_pipe):
            self.format_asked = True
            self.format_deadline = time.monotonic() + CLIENT_FORMAT_WAIT_S
            self.io.send(b"/format json\n")
        if self.interactive:
            self._learn_the_room()
        if self.reconnecting:
            self._back_in()
        if self.wants_line():
            self.io.ask("line")  # (else once /format json is answered)

    def _learn_the_room(self):
        """Ask, without showing the answers, who is here (for Tab) and which
        commands this server offers this user (no operator commands where
        it has no operators)."""
        for kind, what in (("who", HIDE), ("rooms", HIDE), ("pong", SETUP_TOKEN)):
            self._expect(kind, what)
        self.io.send(b"/who\n/rooms\n/help\n/ping " + SETUP_TOKEN.encode(ENCODING) + b"\n")

    def _note_account(self, text):
        """A typed /login or /register: its account is logged in to again
        after a reconnect (the server's answer confirms it, or forgets it)."""
        word, _, arg = text.partition(" ")
        if word.lower() == "/login":
            nick, _, password = arg.strip().partition(" ")
            self.pending_account = (nick, password.strip())
        else:
            self.pending_account = (None, arg.strip())  # the nick we have then

    def _note_account_answer(self, kind, fields):
        if self.pending_account is None:
            return
        wanted = self.pending_account[0]
        if kind == "renamed" and wanted and nick_key(fields["new"]) == nick_key(wanted):
            self._account_confirmed(fields["new"])
        elif kind == "notice" and fields["text"] == ACCOUNT_MADE.format(nick=self.nick):
            self._account_confirmed(self.nick)
        elif kind == "error" and fields["text"] in (WRONG_LOGIN, PASSWORD_TOO_SHORT):
            self.pending_account = None

    def _account_confirmed(self, nick):
        if self.pending_account is not None:
            self.login, self.nick = True, nick
            self.account_password = self.pending_account[1]
            self.pending_account = None


class ClientSession(ClientJson, ClientReconnect, ClientRegistration):
    """The client's decisions, without sockets, threads or a terminal: what to
    send, what to show, what to ask the user, when to come back and when to
    leave. ChatClient feeds it events and does what it says through io:
    send(bytes), show(text), ask(kind), finish(code), fail(message),
    disconnect(), reconnect_at(when), erase_input().
    """

    def __init__(self, io, where, nick=None, password=None, interactive=False,
                 color=False, timestamps=False, bell=False, reconnect=False, tls=False,
                 login=False, account_password=None, json_pipe=False):
        self.io = io
        self.where = where                 # host:port, for what is said about the server
        self.tls = tls
        self.nick = nick                   # the nick to register, then the one registered
        self.password = password           # the room's, sent with /pass before the nick
        self.interactive = interactive     # a person at a terminal can be asked again
        self.color = color                 # colour the lines (see render_line)
        self.timestamps = timestamps       # HH:MM before each line (/timestamps)
        self.bell = bell                   # \a on a private message or a mention
        self.reconnect = reconnect         # come back after a lost connection
        self.nicks = {}                    # who is in the room, for Tab: key -> nick
        self.commands = CLIENT_COMMANDS + SERVER_COMMANDS  # for Tab; /help tells the rest
        self.room = LOBBY                  # our current room (the prompt shows it), or None
        self.joined = [LOBBY]              # the rooms we are in, in the order entered
        self.rooms = {LOBBY}               # rooms heard of, for Tab after /join
        self.last_private = None           # who sent the last private message (/reply)
        self.online = False                # a connection is open
        self.was_in = False                # registered at least once: reconnecting makes sense
        self.reconnecting = False          # connected again, not registered again yet
        self.waiting_for_server = False    # --reconnect: not reached once yet
        self.backoff = RECONNECT_FIRST_S
        self.unsent = bytearray()          # typed while disconnected: sent once back
        self.retry_password = False        # a wrong password: ask again on a new connection
        self.login = login                 # register by logging in to the account nick
        self.json_pipe = json_pipe         # --json: JSON objects out, as the server sends them
        self.account_password = account_password  # its password: /login again on reconnecting
        self.quitting = False              # /quit sent: the server's close is expected
        self.leave_when_back = False       # piped input ended while disconnected
        self.pending_account = None        # a typed /login or /register awaiting its answer
        self.quit_deadline = None
        self.last_ids = {}                 # room -> the newest message id seen there
        self.speaks_json = False           # the server answered /format json in JSON
        self.resume = None                 # (rooms, current, last ids) to come back to
        self._new_connection_state()

    def _new_connection_state(self):
        """What each connection starts without."""
        self.registered = False
        self.heard_server = False          # has any line come from the server?
        self.needs_password = False        # the server said so
        self.pass_sent = False             # /pass went on this connection
        self.nick_sent = False             # a nick went and awaits its answer
        # What the client waits to hear back, in the order it asked (the
        # server answers a connection's lines in order): Awaited(kind, what).
        self.awaited = []
        self.silence_deadline = time.monotonic() + CLIENT_GREETING_WAIT_S
        self.answer_deadline = None        # piped: the nickname's answer is due
        # JSON mode: the client asks for it, and shows each object as its text line.
        self.format_asked = False          # /format json sent, not answered yet
        self.format_deadline = None        # ...and typing waits for the answer until then
        self.json_now = False              # ...and answered in JSON, on this connection
        self.to_self = False               # a private message to ourselves: its echo is next
        self.just_joined = False           # the last object was our join: a topic is its
        self.block = []                    # a history block's items, until history_end
        self.mail = []                     # offline messages, until something else comes
        self.resuming = False              # back in: replays are dropped until RESUME_TOKEN
        self.catching_up = False           # /history #ROOM after ID asked: live lines wait
        self.to_catch_up = []              # ...(room, last id) for each room, in turn
        self.catch_up_refusals = 0         # ...answered by an error so often
        self.catch_up_retry_at = None      # ...and asked again at this time
        self.held = []                     # ...here

    # -- events from ChatClient --

    def connected(self):
        """A new connection: send what is known (password, nick); what is
        not is asked for once the server has asked for a nickname."""
        self._new_connection_state()
        self.online = True
        if self.waiting_for_server:
            self.waiting_for_server = False
            self.backoff = RECONNECT_FIRST_S
        self.reconnecting = self.reconnecting or self.was_in
        if self.json_pipe or self.speaks_json:
            # Objects, not screen text. A new client registers in text first
            # (the first line a v1 server reads is a nickname); coming back
            # to a server known to speak JSON, it asks at once, so that all it
            # is sent again carries ids.
            self.io.send(b"/format json\n")
            self.format_asked = not self.json_pipe
        if self.password is not None:
            self._send_password()
        if self.nick and (not self.login or self.account_password is not None):
            self._send_nick()
        # (--login without its password: asked for once the server has
        # greeted, so that the prompt is not mixed with the greeting)

    def server_line(self, text):
        self.heard_server = True
        if self.json_pipe:
            self._json_line(text)
            return
        if text.startswith("{"):
            for line in self._lines_from_json(text):
                self._server_text(line)
            return
        if self.format_asked and text.startswith(ERROR) and error_code(
                text[len(ERROR):]) in NO_JSON_CODES:
            self.format_asked = False  # a server without JSON mode: text lines it is
            if self.wants_line():
                self.io.ask("line")
            return
        self._server_text(text)

    def received_all(self):
        """The end of what arrived at once: offline messages are shown as a
        block even if nothing follows them."""
        for line in self._mail_block():
            self._server_text(line)

    def _server_text(self, text):
        """A line from the server (a Line made from a JSON object, or text)."""
        if not self.registered:
            self._unregistered_line(text)
            return
        if self.quitting:
            self._note_quit_progress(text)
        if not self._hidden(text):
            self._show_server_line(text)

    def server_closed(self):
        if self.quitting:
            self.io.finish(0)
        elif self.retry_password:
            self.retry_password = False
            self._lose_connection()
            self.io.reconnect_at(time.monotonic())  # at once: the user waits to type it again
        elif self.reconnect and self.was_in:
            self._lose_connection()
            self._schedule_reconnect("disconnected from server")
        elif not self.heard_server:
            self.notice("disconnected from server before it said anything"
                        + ("" if self.tls else " (does it need --tls?)"))
            self.io.finish(1)
        else:
            self.notice("disconnected from server")
            self.io.finish(1)

    def reconnect_failed(self, problem):
        if self.waiting_for_server:
            self._schedule_reconnect(None)  # said once already
        elif not self.was_in:  # a new password's connection: nothing to come back to
            self.notice(problem)
            self.io.finish(1)
        else:
            self._schedule_reconnect(problem)

    def unreachable_at_start(self, problem):
        """--reconnect, and the server can't be reached yet: keep trying,
        saying so once."""
        self.waiting_for_server = True
        self.notice("%s; trying again until it answers (Ctrl-C to stop)" % problem)
        self._schedule_reconnect(None)

    def typed(self, kind, text):
        """What the keyboard thread read, as it was asked for."""
        if kind == "account":
            self.account_password = text
            if not (self.needs_password and self.password is None):
                self._send_nick()  # else it goes once the room's password is typed
        elif kind == "secret":
            self.password = text
            self._send_password()
            if self.nick and not self._awaiting_account_password():
                self._send_nick()  # again: one sent before the password was refused
            # else the nickname is asked for once the server accepts the password
        elif kind == "nick":
            nick = clean_text(text).strip()
            if nick.lower().startswith("/login "):
                self._note_account(nick)
                self.nick_sent = True
                self.io.send(encode_line(nick))
                return
            if nick:
                self.nick = nick
            self._ask_for_registration()
        elif not self.online or self.reconnecting or self.resume is not None:
            word = text.split(" ", 1)[0].lower()
            # Sent once we are back, and caught up (the client's own commands now).
            self.unsent += self._client_command(text) if word in CLIENT_ONLY else encode_line(text)
            if self.interactive and not (self.online and not self.reconnecting):
                self.notice(NOT_CONNECTED_YET)  # (the typed line is off the screen)
            self.io.ask("line")
        else:
            if self.json_pipe and text.split(" ", 1)[0].lower() == "/format":
                self.notice("--json keeps the connection in JSON mode")
                data = b""
            else:
                data = encode_line(text) if self.json_pipe else self._client_command(text)
            if data.lower().split(b" ")[0].rstrip(b"\n") == b"/quit":
                self._quitting()
            self.io.send(data)

    def end_of_input(self):
        """Ctrl-D, the end of piped input, or Ctrl-C: leave."""
        if not self.online:  # disconnected, waiting to reconnect
            if (self.unsent and self.reconnect and not self.interactive
                    and not self.leave_when_back):
                self.leave_when_back = True  # piped: what it sent goes first, then /quit
                return
            self.io.finish(0)  # (a second time, or at a terminal: just leave)
            return
        if self.quit_deadline is not None:
            return
        if (self.reconnecting or self.resume is not None) and not self.interactive:
            self.leave_when_back = True  # going back in: what was typed goes first
            return
        if self.interactive:
            self.io.erase_input()  # a half-typed line is dropped
            self.notice("leaving...")
        self._quitting()
        self.io.send(b"/quit\n")

    def wants_line(self):
        """Whether the next typed line may be asked for (the output waiting
        for the server permitting)."""
        # Not while /format json awaits its answer: a line typed meanwhile
        # (a /join) would be answered between it and the hidden /history 1
        # that follows it, and that answer taken for the hidden one.
        return (self.registered and not self.quitting and not self._awaits("pong", JOIN_TOKEN)
                and not self.format_asked)

    def next_deadline(self):
        deadlines = [when for when in (self.quit_deadline, self.answer_deadline,
                                       self.catch_up_retry_at,
                                       self.format_deadline if self.format_asked else None)
                     if when is not None]
        if self.online and not self.heard_server and self.silence_deadline:
            deadlines.append(self.silence_deadline)
        return min(deadlines) if deadlines else None

    def check_deadlines(self, now):
        if self.catch_up_retry_at is not None and now >= self.catch_up_retry_at:
            self._retry_catch_up()
        if self.format_asked and self.format_deadline is not None and (
                now >= self.format_deadline):
            self.format_asked = False  # a server that never answers it: text, and typing
            if self.wants_line():
                self.io.ask("line")
        if self.quit_deadline is not None and now >= self.quit_deadline:
            self.io.finish(0)  # the server never closed: leave anyway
        elif self.answer_deadline is not None and now >= self.answer_deadline:
            self.io.fail("the server at %s did not answer the nickname in %.0f s%s"
                         % (self.where, CLIENT_ANSWER_WAIT_S, self._tls_hint()))
        elif (self.online and not self.heard_server and self.silence_deadline
              and now >= self.silence_deadline):
            self.silence_deadline = None  # said once
            self.notice("the server at %s has said nothing in %.0f s (is it a chat server?%s)"
                        % (self.where, CLIENT_GREETING_WAIT_S,
                           "" if self.tls else " one that needs --tls?"))
            self._greeted()  # ask for what it never asked for

    def _tls_hint(self):
        """A server that never spoke to a plain client may be waiting for TLS."""
        return "" if self.tls or self.heard_server else " (does it need --tls?)"

    def speaks_tls(self):
        """The first bytes from the server are a TLS record (its alert at our
        plain text): there is no chat to have without TLS."""
        self.io.fail("the server at %s speaks TLS: add --tls (or --cafile, --fingerprint)"
                     % self.where)

    # -- what is shown --

    def _expect(self, kind, what=None):
        """The server will answer something the client sent with a line of
        this kind (a block: its history_end; a pong: with what as its token)."""
        self.awaited.append(Awaited(kind, what))

    def _answered(self, kind, what=None):
        """The first awaited answer of this kind (and what, if given), now
        taken as come; None if none is awaited."""
        for i, awaited in enumerate(self.awaited):
            if awaited.kind == kind and (what is None or awaited.what == what):
                return self.awaited.pop(i)
        return None

    def _answered_block(self):
        """The awaited block a history_end ends, taken as come; None for a
        replay (one comes before the pong that goes before /history 1 in a
        room just entered, and none was asked for)."""
        for i, awaited in enumerate(self.awaited):
            if awaited == ("pong", NEWEST_TOKEN):
                return None
            if awaited.kind == "block":
                return self.awaited.pop(i)
        return None

    def _awaits(self, kind, what=None):
        return any(a.kind == kind and (what is None or a.what == what) for a in self.awaited)

    def _hidden(self, text):
        """Answers to what the client asked by itself are not shown; the
        client's own commands follow the answer to a typed /help."""
        kind, fields = line_parts(text)
        if kind in ("who", "rooms") and self._answered(kind, HIDE):
            track_nicks(self.nicks, text)
            self._note_rooms(kind, fields)
            return True
        if kind == "notice" and fields["text"] in ALL_HELP and self._awaits(
                "pong", SETUP_TOKEN):
            self._offer(help_commands([fields["text"]]))  # the silent /help on joining
            return True
        if self.resuming and (kind == "talking_in" or (
                kind == "left" and fields["nick"] == self.nick)):
            self._note_moves(kind, fields, getattr(text, "extra", {}).get("room"))
            return True  # going back into our rooms: not news to the user
        if kind == "pong" and fields["token"] in CLIENT_TOKENS:
            if self._answered("pong", fields["token"]) or fields["token"] == RESUME_TOKEN:
                self._pong(fields["token"])
            return True
        if kind == "opped" and fields["nick"] == self.nick:
            self._offer(OPERATOR_COMMANDS)
        return False

    def _pong(self, token):
        """A ping of the client's own is answered: what it marked is over."""
        if token == RESUME_TOKEN and self.resuming:
            for line in self._resumed():
                self._server_text(line)
        elif token == JOIN_TOKEN and self.wants_line():
            self.io.ask("line")
        elif token == HELP_TOKEN:
            for line in CLIENT_HELP:
                self._show_server_line(notice(line))

    def _moved_to(self, room):
        """In another room now (and current): its people are learnt afresh,
        and its newest id (what a reconnect asks what was said after)."""
        if room not in self.joined:
            self.joined.append(room)
        self.room = room
        if self.json_now and not self.resuming:
            # After the replay that may follow the join line (the pong
            # says it is over): the room's newest message, not shown.
            self._expect("pong", NEWEST_TOKEN)
            self._expect("block", HIDE)
            self.io.send(encode_line("/ping " + NEWEST_TOKEN) + b"/history 1\n")
        self.nicks.clear()
        self.nicks[nick_key(self.nick)] = self.nick
        if self.interactive:
            self._expect("who", HIDE)
            self.io.send(b"/who\n")

    def _note_rooms(self, kind, fields):
        """Remember room names, for Tab after /join."""
        if kind in ("joined_room", "who"):
            self.rooms.add(fields["room"])
        elif kind == "rooms" and fields["list"]:
            self.rooms.update(item.rsplit(" (", 1)[0] for item in fields["list"].split(", "))
        elif kind == "left" and fields["reason"].startswith(LEFT_WENT_TO.format(room="")):
            self.rooms.add(fields["reason"][len(LEFT_WENT_TO.format(room="")):])

    def _note_moves(self, kind, fields, room):
        """Our own moves between rooms, from the server's answers: the rooms
        we are in, and which is current (room: the line's, if known)."""
        own_join = kind == "joined_room" and fields["nick"] == self.nick
        move = (own_join or kind in ("talking_in", "no_room", "error")) and self._answered("move")
        if move:  # the answer to the oldest typed move
            command, before = move.what
            now = fields["room"] if kind != "no_room" and kind != "error" else None
            if command == "/join" and now and before in self.joined and before != now:
                self.joined.remove(before)  # /join left it (only its others are told)
        if kind == "talking_in":
            self.room = fields["room"]
        elif kind == "no_room":
            self.room = None
        elif kind == "left" and fields["nick"] == self.nick and room in self.joined and (
                fields["reason"] == LEFT_PARTED
                or fields["reason"].startswith(LEFT_WENT_TO.format(room=""))):
            self.joined.remove(room)

    def prompt(self):
        return PROMPT.format(room=self.room or NO_ROOM)

    def _offer(self, commands):
        """Tab offers these server commands too."""
        offered = set(self.commands[len(CLIENT_COMMANDS):]) | set(commands)
        self.commands = CLIENT_COMMANDS + tuple(sorted(offered))

    def _show_server_line(self, text):
        """Show a line as the options say; keep nicks and /reply current."""
        track_nicks(self.nicks, text)
        kind, fields = line_parts(text)
        self._note_account_answer(kind, fields)
        dated = kind == "history"  # a history line has its own time
        if kind == "private":
            self.last_private = fields["nick"]
        elif dated and line_parts(fields["line"])[0] == "private":
            self.last_private = line_parts(fields["line"])[1]["nick"]  # sent while away
        elif kind == "renamed" and fields["old"] == self.nick:
            self.nick = fields["new"]  # renamed: mentions follow the new nick
        elif kind == "joined_room" and fields["nick"] == self.nick:
            self._moved_to(fields["room"])
        self._note_moves(kind, fields, getattr(text, "extra", {}).get("room"))
        self._note_rooms(kind, fields)
        if kind in ("history", "history_last", "history_search", "history_after",
                    "offline_start", "notice"):
            text = local_history_line(text)
        if kind == "history" and line_parts(fields["line"])[0] == "private":
            shown = styled(STYLES["private"], text) if self.color else text  # while away
        else:
            shown = render_line(text, self.nick if self.registered else None, self.color)
        marked = getattr(text, "extra", {}).get("marked")
        if marked:  # a line of another of our rooms
            shown = (styled(STYLES["room"], marked) if self.color else marked) + " " + shown
        if self.bell and self.registered and wants_bell(text, self.nick):
            shown += BELL
        self.show(shown, dated)

    def notice(self, text):
        """A notice of the client's own."""
        if self.json_pipe:
            self.io.show(json.dumps(json_object(notice(text)), ensure_ascii=False))
        else:
            self.show(render_line(notice(text), color=self.color))

    def show(self, shown, dated=False):
        if self.timestamps and not dated:
            stamp = time.strftime("%H:%M")
            shown = (styled(STYLES["time"], stamp) if self.color else stamp) + " " + shown
        self.io.show(shown)

    # -- typed lines --

    def _send_unsent(self):
        """Back, and caught up: what was typed meanwhile goes (then /quit, if
        piped input ended meanwhile)."""
        if self.unsent:
            self.io.send(bytes(self.unsent))
            self.unsent.clear()
        if self.leave_when_back:
            self.leave_when_back = False
            self._quitting()
            self.io.send(b"/quit\n")

    def _client_command(self, text):
        """Handle /reply, /timestamps and /format here; return what goes to
        the server."""
        word, _, arg = text.partition(" ")
        word = word.lower()
        if word == "/format":  # the client speaks JSON with the server, and shows text
            self.notice("this client shows text; for JSON objects, run it with --json")
            return b""
        if word == "/timestamps":
            self.timestamps = not self.timestamps
            self.notice("timestamps %s" % ("on" if self.timestamps else "off"))
            return b""
        if word == "/reply":
            if not arg.strip():
                self.show(render_line(error_line("usage: /reply TEXT"), color=self.color))
            elif self.last_private is None:
                self.show(render_line(error_line("no private message to reply to"),
                                      color=self.color))
            else:
                return encode_line("/msg %s %s" % (self.last_private, arg.strip()))
            return b""
        if word == "/help":  # the server's list, then the client's own commands
            self._expect("pong", HELP_TOKEN)
            return encode_line(text) + encode_line("/ping " + HELP_TOKEN)
        if word in ("/login", "/register"):
            self._note_account(text)
        self._note_question(word, arg.strip())
        if word in MOVING_COMMANDS:
            # The next line is asked for once the server has answered, so that
            # its prompt names the room we are then in, and what the client
            # asks about the room it entered is asked while it is current.
            self._expect("move", (word, self.room))
            self._expect("pong", JOIN_TOKEN)
            return encode_line(text) + encode_line("/ping " + JOIN_TOKEN)
        return encode_line(text)

    def _note_question(self, word, arg):
        """A typed /history, /search or /topic: its answer (a JSON object)
        is shown as the text line for what was asked."""
        if word == "/history":
            words = arg.split()
            if words and words[0].startswith("#"):
                words = words[1:]  # (one of our rooms: its block names it)
            self._expect("block", ("after", words[1]) if len(words) == 2
                         and words[0].lower() == "after" else ("last", None))
        elif word == "/search":
            self._expect("block", ("search", arg))
        elif word == "/topic" and not arg:
            self._expect("topic")

    def _quitting(self):
        self.quitting = True
        self.quit_deadline = time.monotonic() + CLIENT_QUIT_WAIT_S

    def _note_quit_progress(self, text):
        """While leaving: the server is still busy with our own lines (their
        echoes come back) and it is worth waiting for; others' chatter is not."""
        kind, fields = line_parts(text)
        if (kind in ("message", "action") and fields["nick"] == self.nick) or kind in (
                "private_echo", "error"):
            self.quit_deadline = time.monotonic() + CLIENT_QUIT_WAIT_S


class ChatClient:
    """The client's I/O shell around a ClientSession: the connection, the
    keyboard thread, the socket pair between them, Ctrl-C, the terminal.

    The keyboard thread is a plain reader: it waits to be asked for
    something (a nickname, a password, a chat line), reads it, and hands it
    back through the socket pair as a tagged record. The loop here owns the
    sockets; the session owns every decision.
    """

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, nick=None,
                 stdin_fd=0, out=None, interactive=None, tls_context=None,
                 fingerprint=None, password=None, color=False, timestamps=False,
                 bell=True, reconnect=False, login=False, account_password=None,
                 json_pipe=False):
        self.host = host
        self.port = port
        self.tls_context = tls_context     # None: plain TCP
        self.tls = tls_context is not None
        self.fingerprint = fingerprint     # pinned SHA256:..., checked after the handshake
        self.stdin_fd = stdin_fd
        out = out or sys.stdout
        if interactive is None:
            interactive = os.isatty(stdin_fd) and out.isatty()
        self.interactive = interactive
        self.session = ClientSession(self, format_address((host, port)), nick, password,
                                     interactive, color, timestamps, bell and interactive,
                                     reconnect, self.tls, login, account_password,
                                     json_pipe)
        self.readline = self._load_readline() if interactive else None
        if self.readline is not None:
            self._set_up_completion()
        self.terminal = Terminal(out, interactive, self.readline, stdin_fd)
        self.sock = None
        self.selector = None
        self.typed_r = self.typed_w = None
        self.requests = queue.Queue()      # what the keyboard thread is to read next
        self.asked = None                  # what it was asked for and has not answered
        self.reading = None                # the keyboard thread's own: what it reads now
        self.records = bytearray()         # from the keyboard thread, not yet a whole record
        self.reader = LineReader(CLIENT_MAX_LINE)
        self.outbuf = bytearray()
        self.reconnect_when = None         # when the next attempt is due
        self.connecting = False            # in a blocking connect: Ctrl-C interrupts it
        self.result = None                 # the exit code, once known
        self.saved_tty = None              # terminal modes to restore at exit
        self.wake_r = self.wake_w = None   # the SIGINT handler wakes the loop
        self.interrupts = 0                # Ctrl-C presses

    @staticmethod
    def _load_readline():
        """Line editing and history where the readline module exists (not Windows).

        Imported only for a terminal: importing it can write escape codes.
        """
        try:
            import readline
        except ImportError:
            return None
        return readline

    def _set_up_completion(self):
        """Tab completes nicks, and commands at the start of a line."""
        self.readline.set_completer(self._complete)
        self.readline.set_completer_delims(" \t")
        if "libedit" in (self.readline.__doc__ or ""):  # macOS's readline
            self.readline.parse_and_bind("bind ^I rl_complete")
        else:
            self.readline.parse_and_bind("tab: complete")

    def _complete(self, text, state):
        """readline's completer (it runs in the keyboard thread: nicks is copied).

        Python's readline appends nothing to a completion; the space typed
        after a word is added here.
        """
        if state == 0:
            before = self.readline.get_line_buffer()[:self.readline.get_begidx()]
            session = self.session
            self.matches = [match + " " for match in completions(
                text, before, dict(session.nicks), session.commands, set(session.rooms))]
        return self.matches[state] if state < len(self.matches) else None

    # -- what the session asks of the shell --

    def send(self, data):
        """Queue bytes for the server."""
        self.outbuf += data
        if self.sock is not None:
            self._flush()

    def show(self, text):
        self.terminal.show(text)

    def ask(self, kind):
        """Ask the keyboard thread for a nick, a secret or a chat line (once at a time)."""
        if self.asked is None:
            self.asked = kind
            self.requests.put(kind)

    def finish(self, code):
        self.result = code

    def fail(self, message):
        sys.stderr.write("chat.py: %s\n" % message)
        self.result = 1

    def disconnect(self):
        """Forget the connection; typed lines wait until there is a new one."""
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None

    def reconnect_at(self, when):
        self.reconnect_when = when

    def erase_input(self):
        self.terminal.finish()

    # -- running --

    def run(self):
        """Connect and chat until stdin ends or the server goes; return the exit code."""
        previous_handler = self._catch_interrupts()
        try:
            return self._connect_and_chat()
        except KeyboardInterrupt:  # Ctrl-C while connecting: nothing to leave
            return 0
        finally:
            if previous_handler is not None:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGINT, previous_handler)
            self._close()

    def _connect_and_chat(self):
        problem = self._connect()
        if problem and not self.session.reconnect:
            sys.stderr.write("chat.py: %s\n" % problem)
            return 1
        self.selector = selectors.DefaultSelector()
        self.typed_r, self.typed_w = socket.socketpair()
        self.typed_r.setblocking(False)
        self.selector.register(self.typed_r, selectors.EVENT_READ, self._on_typed)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.selector.register(wake_r, selectors.EVENT_READ, self._on_interrupt)
        self.wake_r, self.wake_w = wake_r, wake_w  # from now on Ctrl-C wakes the loop
        if threading.current_thread() is threading.main_thread():
            # The signal may land in the keyboard thread, which leaves the loop's
            # select asleep; the wake-up fd is written whichever thread gets it.
            signal.set_wakeup_fd(wake_w.fileno())
        if self.interrupts:
            return 0
        self._save_terminal_modes()
        threading.Thread(target=self._read_keyboard, name="keyboard", daemon=True).start()
        if problem:
            self.session.unreachable_at_start(problem)  # --reconnect: it keeps trying
        else:
            self.selector.register(self.sock, selectors.EVENT_READ, self._on_server)
            self.session.connected()
        while self.result is None:
            self._run_pass()
        return self.result

    def _connect(self):
        """Open the connection, TLS and all (blocking, with a timeout that
        Ctrl-C cuts short); return why it failed, in one line, or None."""
        where = format_address((self.host, self.port))
        self.connecting = True
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=CLIENT_CONNECT_TIMEOUT_S)
            if self.tls:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            return "cannot verify the server at %s: %s" % (where, exc.verify_message or exc.reason)
        except ssl.SSLError as exc:
            if exc.reason in NOT_TLS_REASONS:
                return "the server at %s does not speak TLS (drop --tls?)" % where
            return "TLS with %s failed: %s" % (where, exc.reason or describe_error(exc))
        except OSError as exc:
            return "cannot connect to %s: %s" % (where, describe_error(exc))
        finally:
            self.connecting = False
        if self.fingerprint is not None:
            seen = certificate_fingerprint(sock.getpeercert(binary_form=True))
            if not hmac.compare_digest(seen, self.fingerprint):
                sock.close()
                return ("the server at %s shows the certificate %s, not the pinned %s"
                        % (where, seen, self.fingerprint))
        sock.setblocking(False)
        self.sock = sock
        self.reader = LineReader(CLIENT_MAX_LINE)
        self.outbuf = bytearray()
        return None

    def _try_reconnect(self):
        self.reconnect_when = None
        problem = self._connect()
        if problem:
            self.session.reconnect_failed(problem)
            return
        self.selector.register(self.sock, selectors.EVENT_READ, self._on_server)
        self.session.connected()

    def _run_pass(self):
        for key, mask in self.selector.select(self._next_timeout()):
            key.data(mask)
            if self.result is not None:
                return
        now = time.monotonic()
        if self.reconnect_when is not None and now >= self.reconnect_when:
            self._try_reconnect()
        else:
            self.session.check_deadlines(now)

    def _next_timeout(self):
        deadlines = [when for when in (self.reconnect_when, self.session.next_deadline())
                     if when is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _close(self):
        self.requests.put(None)  # the keyboard thread, if it waits for a request, ends
        for sock in (self.sock, self.typed_r, self.wake_r, self.wake_w):
            if sock is not None:
                sock.close()
        if self.selector is not None:
            self.selector.close()
        self.terminal.finish()
        self._restore_terminal_modes()

    def _save_terminal_modes(self):
        if self.interactive and termios is not None:
            try:
                self.saved_tty = termios.tcgetattr(self.stdin_fd)
            except termios.error:
                self.saved_tty = None

    def _restore_terminal_modes(self):
        """Put back the modes readline changed: the keyboard thread may still be
        inside readline, which would leave the shell without echo."""
        if self.saved_tty is not None:
            try:
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self.saved_tty)
            except termios.error:
                pass  # the terminal is gone: nothing to restore

    # -- Ctrl-C --

    def _catch_interrupts(self):
        """Handle Ctrl-C in the loop, not as an exception wherever it lands."""
        if threading.current_thread() is not threading.main_thread():
            return None  # signals only reach the main thread
        return signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, signum, frame):
        self.interrupts += 1
        if self.selector is None or self.connecting:
            raise KeyboardInterrupt  # still connecting: give up on it
        if self.wake_w is not None:  # else the loop checks self.interrupts first
            try:
                self.wake_w.send(b"\0")
            except OSError:
                pass  # already awake, or closed: either way nothing to do

    def _on_interrupt(self, mask):
        """Ctrl-C: leave as on Ctrl-D; a second one leaves at once."""
        try:
            self.wake_r.recv(4096)
        except OSError:
            pass
        if self.interrupts > 1 or self.sock is None:  # twice, or nothing to leave
            self.result = 0
        else:
            self.session.end_of_input()

    # -- the server's side --

    def _on_server(self, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and self.result is None and self.sock is not None:
            self._receive()

    def _receive(self):
        try:
            data = receive_some(self.sock, self.tls)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        if not data:
            self.session.server_closed()
            return
        if not self.tls and not self.session.heard_server and looks_like_tls(data):
            self.session.speaks_tls()
            return
        self.reader.feed(data)
        sock = self.sock
        while self.result is None and self.sock is sock:  # not lost meanwhile
            line = self.reader.pop_line()
            if line is None:
                break
            if line is not TOO_LONG:
                self.session.server_line(decode_line(line))
        if self.result is None and self.sock is sock:
            self.session.received_all()

    def _flush(self):
        try:
            sent = send_some(self.sock, self.outbuf, self.tls)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.session.server_closed()
            return
        del self.outbuf[:sent]
        self._watch()

    def _watch(self):
        """Watch the server for writing only while output waits; ask for the
        next typed line only while little is unsent (typing then waits)."""
        if self.sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.selector.modify(self.sock, events, self._on_server)
        if self.session.wants_line() and len(self.outbuf) <= CLIENT_MAX_OUTBUF:
            self.ask("line")

    # -- the keyboard's side --

    def _on_typed(self, mask):
        """A record from the keyboard thread: a tag byte, the text, LF; or
        the end of the socket pair: the end of input."""
        try:
            data = self.typed_r.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.session.end_of_input()
            return
        self.records += data
        while b"\n" in self.records and self.result is None:
            record, _, rest = bytes(self.records).partition(b"\n")
            self.records = bytearray(rest)
            self.asked = None
            kind = TYPED_KINDS[record[:1]]
            self.session.typed(kind, record[1:].decode(ENCODING, "replace"))

    def _read_keyboard(self):
        """The keyboard thread: read what the loop asks for, hand it back."""
        lines = self._typed_lines()
        try:
            while True:
                kind = self.requests.get()
                if kind is None:
                    break
                self.reading = kind
                if kind == "secret":
                    text = self._read_password(PASSWORD_PROMPT)
                elif kind == "account":
                    text = self._read_password(ACCOUNT_PROMPT.format(nick=self.session.nick))
                else:
                    text = next(lines, None)
                if text is None:
                    break  # the end of input
                record = TYPED_TAGS[kind] + text.replace(b"\n", b" ") + b"\n"
                self.typed_w.sendall(record)
        except OSError:
            pass  # the loop has finished and closed its end
        finally:
            try:
                self.typed_w.close()  # the loop reads this as the end of input
            except OSError:
                pass


    def _read_password(self, prompt):
        """Ask for a password without echoing it (this thread owns the
        keyboard); None at the end of input."""
        if termios is None:  # Windows: getpass reads the console itself
            try:
                return getpass.getpass(prompt).encode(ENCODING, "replace")
            except (EOFError, KeyboardInterrupt):
                return None
        fd = self.stdin_fd
        modes = termios.tcgetattr(fd)
        quiet = modes[:3] + [modes[3] & ~termios.ECHO] + modes[4:]
        # TCSADRAIN, not getpass's TCSAFLUSH: keys typed ahead are kept. And
        # os.read, not sys.stdin: nothing is left in a buffer for later.
        termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
        try:
            self.terminal.write_now(prompt)
            typed = b""
            while not typed.endswith(b"\n"):
                chunk = os.read(fd, 1024)
                if not chunk:
                    return None  # Ctrl-D: no password, and no more input
                typed += chunk
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, modes)
            self.terminal.write_now("\n")
        return typed.rstrip(b"\r\n")

    def _typed_lines(self):
        """Yield typed lines as bytes, without their line ends."""
        if self.interactive:
            while True:
                prompt = self.session.prompt() if self.reading == "line" else NICK_PROMPT
                try:
                    text = self.terminal.read_line(prompt)
                except (EOFError, KeyboardInterrupt):
                    self.terminal.end_of_input()
                    return
                yield text.encode(ENCODING, "replace")
        else:
            # os.read, not sys.stdin: a daemon thread blocked inside a buffered
            # stream's lock makes the interpreter abort at exit.
            pending = b""
            while True:
                try:
                    chunk = os.read(self.stdin_fd, RECV_BYTES)
                except OSError:
                    chunk = b""
                if not chunk:
                    if pending:
                        yield pending
                    return
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.rstrip(b"\r")


# --- Bench --------------------------------------------------------------------
# `chat.py bench`: a load generator in one process, to answer "how many people
# can my machine take?". It speaks only registration and broadcast, so it can
# measure any server of this protocol. It must not be the bottleneck it
# measures: one selectors loop, large reads, and most receivers only count
# line ends in bulk; a few observers parse every line for latency and order.

BENCH_OBSERVERS = 3           # clients that parse every line they receive
BENCH_RECV_BYTES = 1 << 18
BENCH_SEND_CHUNK = 1 << 16    # flood senders build lines in chunks of this much
BENCH_CONCURRENCY = 100       # connects in flight (connected, not yet registered)
BENCH_EVICTION_WAIT_S = 3.0   # after the run: how long a stopped reader's eviction is awaited
BENCH_STALL_S = 15.0          # a phase with no progress this long has failed
BENCH_SERVER_START_S = 10.0
BENCH_PROGRESS_S = 1.0
BENCH_SWEEP_BATCH = 32        # rate mode: counting receivers read per loop pass
BENCH_SWEEP_WAIT_S = 0.005    # rate mode: the loop passes at least this often
BENCH_NICK = "b%d"
BENCH_WORDS = "rust python chat server client room history quick brown fox lazy dog"
BENCH_ABSENT = "zebra"         # said in no --history message: a search reads them all
BENCH_QUERY_RUNS = 5           # --history: each query this many times, the median kept
BENCH_PING_EVERY_S = 0.002     # --history: how often the other client pings
BENCH_SPARE_CLIENTS = 10       # room on the started server beyond --clients (queries)
BENCH_SENDERS = 10                 # --senders, where there are that many clients
BENCH_ACCOUNT_PASSWORD = "bench account password"  # --logins: the account they try
BENCH_ROOM = "#bench%d"        # --rooms: client i talks in room i % K
# Each run tags its messages, so that only its own lines are counted on a
# server that has other users: tag, sender index, sequence number, send time.
BENCH_MESSAGE = "%s %d %d %.6f"
BENCH_SLOW_READ_STEP_S = 0.1  # --slow-read: a slow client reads this often
BENCH_BURST_PAUSE_S = 0.5     # --bursty: the pause after each read
# --irc: the numerics that refuse a registration or a JOIN (422, no MOTD, does not).
BENCH_IRC_REFUSALS = frozenset(b"403 405 432 433 436 451 461 464 465 471 473 474 475".split())


# --web: a WebSocket handshake (its key need not be secret: the server's
# answer is checked only for its status).
BENCH_WEB_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Key: Y2hhdC5weSBiZW5jaCBrZXk=\r\n"
                       b"Sec-WebSocket-Version: 13\r\n\r\n")


def ws_server_frames(buf):
    """[(payload, end offset)] of the whole unmasked text frames at buf's
    start, and where the whole frames end."""
    frames, pos = [], 0
    while len(buf) - pos >= 2:
        size, start = buf[pos + 1] & 0x7F, pos + 2
        if size == 126:
            if len(buf) - pos < 4:
                break
            size, start = struct.unpack(">H", buf[pos + 2:pos + 4])[0], pos + 4
        elif size == 127:
            if len(buf) - pos < 10:
                break
            size, start = struct.unpack(">Q", buf[pos + 2:pos + 10])[0], pos + 10
        if len(buf) < start + size:
            break
        if buf[pos] & 0x0F == WS_TEXT:
            frames.append((bytes(buf[start:start + size]), start + size))
        pos = start + size
    return frames, pos


class BenchError(Exception):
    """A bench run that can't go on: said in one line, exit code 1."""


class BenchClient:
    """One simulated user: its socket and what it has seen."""

    __slots__ = ("index", "nick", "room", "sock", "sender", "slow", "bursty", "observer",
                 "state", "inbuf", "rank", "lines", "messages", "tail", "outbuf", "seq",
                 "next_send", "next_read", "events", "order", "drained", "json", "kind")

    def __init__(self, index, sender, slow, bursty, observer, room=LOBBY):
        self.index = index
        self.nick = BENCH_NICK % index
        self.room = room           # the room it talks and listens in
        self.sock = None
        self.sender = sender
        self.slow = slow           # reads never, or at --slow-read bytes/s
        self.bursty = bursty       # reads what has come, then pauses
        self.observer = observer
        self.state = "new"         # new, connecting, registering, in, closed
        self.inbuf = b""           # parsed lines' unfinished tail (observers, registering)
        self.rank = 0              # N in its own "joined (N online)"
        self.lines = 0             # lines received after its own join line
        self.messages = 0          # the run's own messages received
        self.tail = b""            # the last bytes read: a tag split between reads
        self.outbuf = bytearray()
        self.seq = 0               # messages sent
        self.next_send = 0.0       # rate mode: when the next message is due
        self.next_read = 0.0       # slow and bursty readers: when they read next
        self.events = 0
        self.order = []            # observers: (sender, seq) of each message seen
        self.drained = False       # has had the answer to its ping after registering
        self.json = False          # --json-share: in JSON mode once registered
        self.kind = "text"         # how it speaks: text, json (once registered), irc


class Bench:
    """Runs one workload against a server and collects the numbers."""

    def __init__(self, args, host, port, server=None):
        self.args = args
        self.host = host
        self.port = port
        # Several servers of one chat (--hosts): client i connects to the i-th, in turn.
        self.addresses = args.hosts or [(host, port)]
        self.server = server       # the subprocess when the bench started it
        self.selector = selectors.DefaultSelector()
        count = args.clients
        # Observers spread over the join order: a server that writes to its
        # members in turn reaches the first one early and the last one late.
        readers = count - args.slow
        steady = readers - args.bursty  # the bursty ones come last before the slow ones
        observers = {i * (steady - 1) // max(1, BENCH_OBSERVERS - 1)
                     for i in range(min(BENCH_OBSERVERS, steady))}
        self.clients = [BenchClient(i, i < args.senders, i >= readers,
                                    steady <= i < readers, i in observers,
                                    BENCH_ROOM % (i % args.rooms) if args.rooms > 1 else LOBBY)
                        for i in range(count)]
        for client in self.clients:  # --json-share: spread evenly (0.5: every other one)
            client.json = args.web or int((client.index + 1) * args.json_share) > int(
                client.index * args.json_share)  # (a WebSocket speaks JSON)
            if args.mix:  # --mix text,json,irc: client i speaks the (i mod 3)th
                client.json = args.mix[client.index % len(args.mix)] == "json"
            client.kind = "irc" if args.irc or (
                args.mix and args.mix[client.index % len(args.mix)] == "irc") else (
                "json" if client.json else "text")
        self.irc_address = getattr(server, "irc_address", None) or self.addresses[0]
        self.tag = "bench-%06x" % random.randrange(1 << 24)
        # In each of its messages, as text and as JSON mode sends them.
        self.markers = {"text": ("> %s " % self.tag).encode(ENCODING),
                        "json": ('"text": "%s ' % self.tag).encode(ENCODING),
                        "irc": (" :%s " % self.tag).encode(ENCODING)}
        # After registering, each client pings; its pong says everything sent
        # to it before (the joins) has arrived.
        self.pongs = {"text": format_line("pong", token=self.tag).encode(ENCODING),
                      "json": ('"type": "pong", "token": "%s"' % self.tag).encode(ENCODING),
                      "irc": (" :%s\r\n" % self.tag).encode(ENCODING)}
        self.irc_nicks = {client.nick.encode(ENCODING) for client in self.clients
                          if client.kind == "irc"}
        senders = collections.Counter(c.room for c in self.clients if c.sender)
        self.expected = {room: senders[room] * args.messages for room in
                         {c.room for c in self.clients}}  # messages each member gets
        # (IRC has no echo: a sender of IRC gets the others' messages alone)
        self.pausing = []              # slow and bursty readers, read on a schedule
        self.by_nick = {client.nick: client for client in self.clients}
        self.recv_buffer = bytearray(BENCH_RECV_BYTES)
        self.swept = []                # receivers read in sweeps (rate mode)
        self.sweep_next = 0            # where the next sweep starts in swept
        self.waiting = list(reversed(self.clients))   # not yet connecting
        self.in_flight = 0
        self.registered = 0
        self.latencies = []
        self.evicted = set()
        self.closed_early = set()
        self.phase = "register"
        self.progress_at = 0.0
        self.last_progress = time.monotonic()
        self.result = {}

    # -- the run --

    def run(self):
        """Register every client, then send the messages; return the results."""
        started = time.monotonic()
        try:
            self._loop(self._registration_done)
            registered_at = time.monotonic()
            self.phase = "drain"
            if len(self.addresses) > 1:
                self._say_barrier()
            elif self._drained_by_ping():
                self._ping_all()
            self._loop(self._joins_drained)
            self.phase = "messages"
            self._start_senders()
            messages_started = time.monotonic()
            self._loop(self._messages_done)
            finished = time.monotonic()
            self._await_evictions()
        finally:
            self._progress(force=True, end=True)
        self._collect(started, registered_at, messages_started, finished)
        return self.result

    def close(self):
        for client in self.clients:
            if client.sock is not None:
                client.sock.close()
        self.selector.close()

    def _loop(self, done):
        """Run passes until done() or a stall longer than the timeout."""
        self.last_progress = time.monotonic()
        while not done():
            self._check_server()
            self._connect_more()
            now = time.monotonic()
            if now - self.last_progress > self.args.timeout:
                if self.phase == "messages" and self.closed_early:
                    return  # readers were evicted: what they miss never comes; report
                raise BenchError("no progress for %.0f s in the %s phase (%s)"
                                 % (self.args.timeout, self.phase, self._status()))
            for key, mask in self.selector.select(self._timeout(now)):
                self._on_event(key.data, mask)
            if self.phase == "messages" and self.args.rate:
                self._send_due(time.monotonic())
                if self.swept:
                    self._sweep()
            if self.pausing:
                self._read_paused()
            self._progress()

    def _timeout(self, now):
        """Wait no longer than the next message due, the next sweep step, or
        the next slow or bursty read."""
        if self.pausing:
            return max(0.0, min(min(c.next_read for c in self.pausing) - now,
                                self._rate_timeout(now)))
        return self._rate_timeout(now)

    def _rate_timeout(self, now):
        if self.phase != "messages" or not self.args.rate:
            return 0.1
        longest = BENCH_SWEEP_WAIT_S if self.swept else 0.1
        due = [c.next_send for c in self.clients if c.sender and c.seq < self.args.messages
               and c.state == "in"]
        return max(0.0, min(min(due) - now, longest)) if due else longest

    def _check_server(self):
        if self.server is not None and self.server.poll() is not None:
            raise BenchError("the server exited with code %d during the %s phase"
                             % (self.server.returncode, self.phase))

    # -- phase 1: connect and register, a bounded number in flight --

    def _connect_more(self):
        while self.waiting and self.in_flight < self.args.concurrency:
            client = self.waiting.pop()
            self._connect(client)

    def _connect(self, client):
        host, port = self.irc_address if client.kind == "irc" else self.addresses[
            client.index % len(self.addresses)]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        client.sock = sock
        client.state = "connecting"
        self.in_flight += 1
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise BenchError("cannot connect to %s: %s"
                             % (format_address((host, port)), os.strerror(err)))
        self._watch(client, selectors.EVENT_WRITE)

    def _watch(self, client, events):
        client.events = watch(self.selector, client.sock, client.events, events, client)

    def _on_event(self, client, mask):
        if client.state == "connecting":
            self._connected(client)
            return
        if mask & selectors.EVENT_READ:
            self._receive(client)
        if mask & selectors.EVENT_WRITE and client.state == "in":
            if self.args.rate:
                self._flush(client)
            else:
                self._send_flood(client)

    def _connected(self, client):
        err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise BenchError("cannot connect to %s: %s"
                             % (format_address((self.host, self.port)), os.strerror(err)))
        client.state = "registering"
        if client.kind == "irc":  # (JOIN right behind, as a bot sends it: one round trip)
            client.sock.sendall(("NICK %s\r\nUSER %s 0 * :%s\r\n" % (
                client.nick, client.nick, client.nick)).encode(ENCODING)
                + self._wire("/join " + client.room, client))
        elif self.args.web:  # the handshake, and the nickname right behind it
            client.sock.sendall(BENCH_WEB_HANDSHAKE % self.host.encode()
                                + self._wire(client.nick, client))
        else:
            client.sock.sendall(encode_line(client.nick))  # a fresh socket takes a few bytes
        self._watch(client, selectors.EVENT_READ)

    def _receive(self, client):
        """Read into one reused buffer: a fresh 256 KiB object per read would
        be a new memory mapping each time, and its page faults cost more than
        the read. Counting clients never copy what they read."""
        try:
            size = client.sock.recv_into(self.recv_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if not size:
            self._closed(client)
            return
        self.last_progress = time.monotonic()
        if client.state == "in" and not client.observer:
            self._count(client, size)
            if client.bursty and self.phase == "messages":
                self._pause(client, self.args.burst_pause)
            return
        data = bytes(memoryview(self.recv_buffer)[:size])
        if client.state == "registering":
            self._registering(client, data)
        else:
            self._receive_data(client, data)

    def _registering(self, client, data):
        """Before its own join line, parse; after it, count like everyone else."""
        if client.kind == "irc":
            self._registering_irc(client, data)
            return
        if self.args.web:
            self._registering_web(client, data)
            return
        lines = (client.inbuf + data).split(b"\n")
        client.inbuf = lines.pop()
        for i, line in enumerate(lines):
            text = line.decode(ENCODING, "replace")
            kind, fields = parse_server_line(text)
            if kind == "error":
                raise BenchError("%s was refused: %s" % (client.nick, text))
            if kind == "joined" and fields["nick"] == client.nick and client.room != LOBBY:
                client.sock.sendall(self._wire("/join " + client.room, client))  # on to its room
                continue
            if (kind == "joined" and fields["nick"] == client.nick) or (
                    kind == "joined_room" and fields["nick"] == client.nick):
                client.rank = int(fields["count"])
                if client.json and not self.args.web:
                    client.sock.sendall(b"/format json\n")  # what comes after: JSON
                rest = b"\n".join(lines[i + 1:] + [client.inbuf])
                client.inbuf = b""
                self._now_in(client, rest)
                return

    def _now_in(self, client, rest):
        """client's own join came back: it is in, and what came after it is
        read as everyone's is."""
        client.state = "in"
        self.in_flight -= 1
        self.registered += 1
        if client.slow:
            self._watch(client, 0)  # a slow client never reads again, or slowly
            if self.args.slow_read:
                self._pause(client, BENCH_SLOW_READ_STEP_S)
        elif rest:
            self._receive_data(client, rest)

    def _registering_web(self, client, data):
        """--web: the handshake's answer, then frames of JSON objects, up to its
        own join's; the bytes after it are counted as everyone's are."""
        buf = client.inbuf + data
        if buf.startswith(b"HTTP/"):
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                client.inbuf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise BenchError("%s's WebSocket was refused: %s" % (
                    client.nick, buf.split(b"\r\n", 1)[0].decode("iso-8859-1")))
            buf = buf[end + 4:]
        frames, consumed = ws_server_frames(buf)
        for payload, end in frames:
            obj = json.loads(payload)
            if obj.get("type") == "error":
                raise BenchError("%s was refused: %s" % (client.nick, obj.get("text")))
            if obj.get("type") == "joined" and obj.get("nick") == client.nick:
                if client.room != LOBBY and obj.get("room") != client.room:
                    client.sock.sendall(self._wire("/join " + client.room, client))
                    continue
                client.rank = int(obj["count"])
                client.inbuf = b""
                self._now_in(client, buf[end:])
                return
        client.inbuf = buf[consumed:]

    def _registering_irc(self, client, data):
        """IRC: NICK, USER and JOIN went; its own JOIN coming back makes it
        in (an IRC user is in no room before: on chat.py, and on any IRC
        server)."""
        lines = (client.inbuf + data).split(b"\n")
        client.inbuf = lines.pop()
        nick = client.nick.encode(ENCODING)
        for i, line in enumerate(lines):
            words = line.rstrip(b"\r").split(b" ", 3)
            if words[0] == b"ERROR" or (len(words) > 2 and words[1] in BENCH_IRC_REFUSALS):
                raise BenchError("%s was refused: %s" % (
                    client.nick, line.decode(ENCODING, "replace").strip()))
            if words[0] == b"PING":
                client.sock.sendall(b"PONG " + b" ".join(words[1:]) + b"\r\n")
            elif len(words) > 2 and words[1] == b"JOIN" and words[0][1:].split(b"!")[0] == nick:
                rest = b"\n".join(lines[i + 1:] + [client.inbuf])
                client.inbuf = b""
                self._now_in(client, rest)
                return

    def _receive_data(self, client, data):
        if client.observer:
            self._observe(client, data)
        else:
            self.recv_buffer[:len(data)] = data
            self._count(client, len(data))

    def _count(self, client, size):
        """Count what a counting client read into recv_buffer: lines, and the
        run's own messages (by their tag, which a read may split)."""
        buffer, marker = self.recv_buffer, self.markers[client.kind]
        client.lines += buffer.count(b"\n", 0, size)
        if self.phase == "drain":
            pong = self.pongs[client.kind]
            edge = len(pong) - 1
            client.drained = client.drained or pong in client.tail + buffer[:size]
            client.tail = bytes((client.tail + buffer[max(0, size - edge):size])[-edge:])
            return
        if self.phase != "messages":
            return
        edge = len(marker) - 1
        client.messages += buffer.count(marker, 0, size)
        if client.tail:
            client.messages += (client.tail + buffer[:min(size, edge)]).count(marker)
        client.tail = bytes((client.tail + buffer[max(0, size - edge):size])[-edge:])

    def _pause(self, client, seconds):
        """Stop reading client for a while: a slow or bursty reader."""
        self._watch(client, 0)
        client.next_read = time.monotonic() + seconds
        self.pausing.append(client)

    def _read_paused(self):
        """Slow readers take their few bytes; bursty readers whose pause is
        over read again when there is something."""
        now = time.monotonic()
        due = [c for c in self.pausing if c.next_read <= now and c.state == "in"]
        if not due:
            return
        self.pausing = [c for c in self.pausing if c.next_read > now and c.state == "in"]
        for client in due:
            if client.bursty:
                self._watch(client, selectors.EVENT_READ)
                continue
            self._read_slowly(client)

    def _read_slowly(self, client):
        step = max(1, int(self.args.slow_read * BENCH_SLOW_READ_STEP_S))
        try:
            size = client.sock.recv_into(self.recv_buffer, min(step, BENCH_RECV_BYTES))
        except (BlockingIOError, InterruptedError):
            size = None
        except OSError:
            size = 0
        if size == 0:
            self._closed(client)
            return
        if size:
            client.lines += self.recv_buffer.count(b"\n", 0, size)
        self._pause(client, BENCH_SLOW_READ_STEP_S)

    def _observe(self, client, data):
        """Parse every line: latency and order of messages, notices counted."""
        now = time.monotonic()
        if self.args.web and client.kind != "irc":  # frames: each payload one JSON object
            buf = client.inbuf + data
            frames, consumed = ws_server_frames(buf)
            lines = [payload for payload, _ in frames]
            client.inbuf = buf[consumed:]
        else:
            lines = (client.inbuf + data).split(b"\n")
            client.inbuf = lines.pop()
        client.lines += len(lines)
        if self.phase == "drain":  # the pong, or (several servers) the line after the joins
            pong = self.pongs[client.kind]  # (IRC's ends with its line end)
            client.drained = client.drained or any(pong in line + b"\n" for line in lines)
            return
        if self.phase not in ("messages", "evictions"):
            return
        tag = self.tag.encode(ENCODING)
        for line in lines:
            if client.json:
                line = self._json_as_text(line)
            elif client.kind == "irc":
                line = self._irc_as_text(line)
            if line.startswith(MESSAGE_OPENING):
                fields = line.split(b" ", 5)
                try:
                    if fields[1] != tag:
                        continue  # not this run's
                    sender, seq, sent = int(fields[2]), int(fields[3]), float(fields[4])
                except (IndexError, ValueError):
                    continue
                client.messages += 1
                client.order.append((sender, seq))
                self.latencies.append(now - sent)
            elif line.startswith(NOTICE.encode()) and line.endswith(LEFT_TOO_SLOW_SUFFIX):
                self.evicted.add(line[len(NOTICE):].split(b" ", 1)[0].decode(ENCODING))

    @staticmethod
    def _json_as_text(line):
        """An observer in JSON mode: its messages and leaves as text lines."""
        if not line.startswith((b'{"type": "message"', b'{"type": "left"')):
            return b""
        try:
            obj = json.loads(line)
        except ValueError:
            return b""
        if obj["type"] == "left":
            return encode_line(format_line("left", nick=obj["nick"], reason=obj["reason"]))[:-1]
        return encode_line(format_line("message", nick=obj["nick"], text=obj["text"]))[:-1]

    def _irc_as_text(self, line):
        """An observer of IRC: its messages and leaves as text lines (a PING
        from the server answered)."""
        source, _, rest = line.rstrip(b"\r").partition(b" ")
        nick = source[1:].split(b"!")[0]
        if rest.startswith(b"PRIVMSG "):
            return b"<" + nick + b"> " + rest.split(b" :", 1)[-1]
        if rest.startswith((b"QUIT ", b"PART ")) and rest.endswith(b":" + LEFT_TOO_SLOW.encode()):
            return NOTICE.encode() + nick + LEFT_TOO_SLOW_SUFFIX
        return b""

    def _closed(self, client):
        if client.state == "registering":
            raise BenchError("the server closed %s's connection before it registered"
                             % client.nick)
        client.state = "closed"
        self._watch(client, 0)
        self.closed_early.add(client.nick)
        if not any(c.state == "in" and not c.slow for c in self.clients):
            raise BenchError("the server closed every connection during the %s phase"
                             % self.phase)

    def _registration_done(self):
        return self.registered == len(self.clients)

    def _ping_all(self):
        for client in self.clients:
            if client.state == "in" and not client.slow:
                client.sock.sendall(self._wire("/ping " + self.tag, client))  # a few bytes

    def _say_barrier(self):
        """Several servers: a pong says nothing of the other servers' joins,
        but a message does. Every client is in once its own join came back
        through the chat's one order, so a line said now comes after every
        join, everywhere: one client in each room says it."""
        self.pongs = {"text": ("> drained %s" % self.tag).encode(ENCODING),
                      "json": ('"text": "drained %s"' % self.tag).encode(ENCODING)}
        for room in {c.room for c in self.clients}:
            speaker = next(c for c in self.clients if c.room == room and not c.slow)
            speaker.sock.sendall(self._wire("drained " + self.tag, speaker))

    def _joins_drained(self):
        """Every reading client has had all join lines: with rooms, its pong
        has come (several servers: the line said after the joins); else (any
        server of the protocol, /ping or not) it has had the joins after its
        own, up to the last one's."""
        readers = [c for c in self.clients if not c.slow and c.state == "in"]
        if self._drained_by_ping() or len(self.addresses) > 1:
            return all(c.drained for c in readers)
        last = max(c.rank for c in self.clients)
        return all(c.lines >= last - c.rank + c.json for c in readers)  # (+ format: json)

    def _drained_by_ping(self):
        """Whether each reader's pong says when it has had the joins (with
        rooms, the web, or IRC, whose joins say no count)."""
        return self.args.rooms > 1 or self.args.web or any(
            c.kind == "irc" for c in self.clients)

    def _expected(self, client):
        """The run's messages client gets: its room's (IRC: not its own)."""
        own = self.args.messages if client.sender and client.kind == "irc" else 0
        return self.expected[client.room] - own

    # -- phase 2: the messages --

    def _start_senders(self):
        for client in self.clients:
            client.tail = b""  # a pong's tail is no message's
        now = time.monotonic()
        if self.args.rate:
            self._sweep_counters()
        senders = [c for c in self.clients if c.sender]
        for i, client in enumerate(senders):
            if self.args.rate:  # spread the senders evenly over one interval
                client.next_send = now + i / (len(senders) * self.args.rate)
            else:
                self._watch(client, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _sweep_counters(self):
        """At a steady rate, counting receivers are read in sweeps, not
        watched: one wake-up per message per receiver would make the bench
        itself the slowest part, and its latency numbers its own."""
        self.swept = [c for c in self.clients if c.state == "in" and not c.slow
                      and not c.observer and not c.sender and not c.bursty]
        for client in self.swept:
            self._watch(client, 0)

    def _sweep(self):
        """Read the next few swept receivers: a short step per loop pass, so
        that the observers' reads (the latency) are never held up long."""
        start = self.sweep_next % len(self.swept)
        batch = self.swept[start:start + BENCH_SWEEP_BATCH]
        self.sweep_next = start + len(batch)
        for client in batch:
            if client.state != "in":
                continue
            try:
                while True:
                    size = client.sock.recv_into(self.recv_buffer)
                    if not size:
                        self._closed(client)
                        break
                    self._count(client, size)
                    self.last_progress = time.monotonic()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._closed(client)

    def _message(self, client, now):
        text = BENCH_MESSAGE % (self.tag, client.index, client.seq, now)
        if len(text) < self.args.size:
            text += " " + "x" * (self.args.size - len(text) - 1)
        client.seq += 1
        return self._wire(text, client)

    def _wire(self, text, client):
        """A line as this run's client sends it: a text line, an IRC one, or
        (--web) a masked WebSocket frame (the mask all zeros: masked, and free)."""
        if client.kind == "irc":
            command, arg = parse_line(text)
            return ("JOIN %s\r\n" % arg if command == "join" else "PING :%s\r\n" % arg
                    if command == "ping" else "PRIVMSG %s :%s\r\n" % (client.room, arg)
                    ).encode(ENCODING)
        if not self.args.web:
            return encode_line(text)
        payload = text.encode(ENCODING)
        frame = ws_frame(payload)
        return frame[:1] + bytes((frame[1] | 0x80,)) + frame[2:len(frame) - len(payload)] + (
            b"\0\0\0\0" + payload)

    def _send_flood(self, client):
        """Keep a flood sender's socket full, building lines only as it drains."""
        if len(client.outbuf) < BENCH_SEND_CHUNK // 2 and client.seq < self.args.messages:
            now = time.monotonic()
            while len(client.outbuf) < BENCH_SEND_CHUNK and client.seq < self.args.messages:
                client.outbuf += self._message(client, now)
        self._flush(client)

    def _send_due(self, now):
        interval = 1.0 / self.args.rate
        for client in self.clients:
            if (client.sender and client.state == "in" and client.seq < self.args.messages
                    and client.next_send <= now):
                client.outbuf += self._message(client, now)
                client.next_send += interval
                self._flush(client)

    def _flush(self, client):
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._closed(client)
                return
            del client.outbuf[:sent]
            self.last_progress = time.monotonic()
        more = client.outbuf or (not self.args.rate and client.seq < self.args.messages)
        self._watch(client, selectors.EVENT_READ | (selectors.EVENT_WRITE if more else 0))

    def _await_evictions(self):
        """A reader that stopped is evicted a second after it stopped taking
        anything, and one too slow after --max-lag behind, which may be after
        the run (it holds nobody meanwhile): wait for that, a little, so that
        the report can say it."""
        stopped = [c for c in self.clients if c.slow]  # (--slow-read: past --max-lag)
        deadline = time.monotonic() + BENCH_EVICTION_WAIT_S
        self.phase = "evictions"
        while stopped and time.monotonic() < deadline and not all(
                c.nick in self.evicted or c.state == "closed" for c in stopped):
            for key, mask in self.selector.select(0.05):
                self._on_event(key.data, mask)

    def _messages_done(self):
        if any(c.seq < self.args.messages or c.outbuf for c in self.clients
               if c.sender and c.state == "in"):
            return False
        return all(c.messages >= self._expected(c) for c in self.clients
                   if not c.slow and c.state == "in")

    # -- reporting --

    def _status(self):
        if self.phase == "register":
            return "%d/%d registered" % (self.registered, len(self.clients))
        receivers = [c for c in self.clients if not c.slow and c.state == "in"]
        if self.phase == "drain":
            return "%d/%d settled" % (sum(c.drained for c in receivers), len(receivers))
        got = sum(c.messages for c in receivers)
        return "%d/%d delivered" % (got, sum(self._expected(c) for c in receivers))

    def _progress(self, force=False, end=False):
        now = time.monotonic()
        if not force and now - self.progress_at < BENCH_PROGRESS_S:
            return
        self.progress_at = now
        if self.args.json and not sys.stderr.isatty():
            return
        line = "bench: %s" % self._status()
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K" + line + ("\n" if end else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _collect(self, started, registered_at, messages_started, finished):
        args = self.args
        receivers = [c for c in self.clients if not c.slow and c.nick not in self.closed_early]
        expected = sum(self._expected(c) for c in self.clients if not c.slow)
        received = sum(c.messages for c in receivers)
        observers = [c for c in self.clients if c.observer and c.state == "in"]
        orders = {}  # room -> the orders its observers saw
        unechoed = {c.index for c in observers if c.sender and c.kind == "irc"}  # (IRC: its
        for client in observers:  # own are not sent back: the others' orders are compared)
            orders.setdefault(client.room, []).append(
                [item for item in client.order if item[0] not in unechoed])
        latencies = sorted(self.latencies)
        register_s = max(registered_at - started, 1e-9)
        message_s = max(finished - messages_started, 1e-9)
        self.result = {
            "clients": len(self.clients),
            "registered": self.registered,
            "registrations_per_s": round(self.registered / register_s, 1),
            "register_s": round(register_s, 3),
            "senders": args.senders,
            "messages": args.messages,
            "mode": "flood" if not args.rate else "%g/s" % args.rate,
            "deliveries_expected": expected,
            "deliveries_received": received,
            "deliveries_per_s": round(received / message_s, 1),
            "message_s": round(message_s, 3),
            "latency_ms": {name: round(percentile(latencies, q) * 1000, 2)
                           for name, q in (("p50", 50), ("p90", 90), ("p99", 99),
                                           ("max", 100))} if latencies else None,
            "same_order": all(order == seen[0] for seen in orders.values() for order in seen)
                          if observers else None,
            "observers": len(observers),
            "rooms": args.rooms,
            "json_clients": sum(c.json for c in self.clients),
            "irc_clients": sum(c.kind == "irc" for c in self.clients),
            "web": args.web,
            "history_size": args.history,
            "slow": args.slow,
            "slow_read": args.slow_read,
            "bursty": args.bursty,
            "slow_evicted": len([c for c in self.clients if c.slow and c.nick in self.evicted]),
            "others_evicted": sorted(nick for nick in self.evicted | self.closed_early
                                     if nick in self.by_nick and not self.by_nick[nick].slow),
        }


def percentile(sorted_values, q):
    """Return the q-th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def start_bench_server(clients, db, keep_all=False, web=False, irc=False):
    """Start `chat.py server --port 0 --rate 0 --db DB` as a child; return
    (process, port) (web: its --web port; irc: its --irc address is the
    process's irc_address)."""
    command = [sys.executable, os.path.abspath(__file__), "server", "--host", DEFAULT_HOST,
               "--port", "0", "--rate", "0", "-q", "--db", db,
               "--max-clients", str(max(MAX_CLIENTS, clients + BENCH_SPARE_CLIENTS)),
               "--max-per-ip", "0"]
    if keep_all:
        command += ["--keep", "0"]  # a filled history is measured, not trimmed
    if web:
        command += ["--web", "0"]
    if irc:
        command += ["--irc", "0"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + BENCH_SERVER_START_S
    lines, port = [], None
    while True:
        line = proc.stderr.readline().decode(ENCODING, "replace")  # bounded: see below
        if not line or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise BenchError("the server did not start: %s"
                             % ("".join(lines[-3:]).strip() or "no output"))
        lines.append(line)
        if "listening on " in line and line.rstrip().endswith(" (irc)"):
            proc.irc_address = (DEFAULT_HOST, int(line.split()[-2].rsplit(":", 1)[1]))
        elif "listening on " in line and not web:
            port = int(line.rsplit(":", 1)[1])
        elif "the web page: " in line and web:
            port = int(line.rstrip().rstrip("/").rsplit(":", 1)[1])
        if port is not None and (not irc or hasattr(proc, "irc_address")):
            break
    # Keep reading its stderr so that its log can never fill the pipe and block it;
    # its last lines say what the store cost.
    proc.log = collections.deque(maxlen=20)
    proc.log_reader = threading.Thread(
        target=lambda: proc.log.extend(iter(proc.stderr.readline, b"")), daemon=True)
    proc.log_reader.start()
    return proc, port


def server_store_usage(proc):
    """The store's cost, as the bench-started server logged it at the end."""
    proc.log_reader.join(SHUTDOWN_FLUSH_S)
    for line in reversed(proc.log):
        text = line.decode(ENCODING, "replace").strip()
        if "database: " in text:
            return text.split("database: ", 1)[1]
    return None


def fill_history(db, count):
    """Write count messages of some words each into #lobby of a new database."""
    store = SQLiteStore(db, keep=0)
    store.add_room(nick_key(LOBBY), LOBBY)
    words = BENCH_WORDS.split()
    now = time.time()
    rows = ((i, nick_key(LOBBY), now, BENCH_NICK % (i % 100), "message",
             " ".join(random.choice(words) for _ in range(10))) for i in range(1, count + 1))
    store.db.execute("BEGIN")
    store.db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
    store.db.execute("COMMIT")
    while store.indexed and store.index_some(count):
        pass  # a server that ran a while has indexed all of it
    store.close_reader()
    store.close()


def time_history_queries(host, port, timeout):
    """Time /history 500 and /search (a word said often, one never said) on
    the server's #lobby, each BENCH_QUERY_RUNS times, while another client
    pings: its slowest answer is the longest the loop was held. Return the
    medians and that, in ms."""
    asker = BlockingPeer(host, port, "hq", timeout)
    result = {}
    with LoopWatch(host, port, timeout, "hp") as watch:
        for name, query in (("history_500", "/history 500"),
                            ("search_found", "/search " + BENCH_WORDS.split()[0]),
                            ("search_absent", "/search " + BENCH_ABSENT)):
            times = sorted(asker.round_trip(query + "\n/ping q", "*** pong q")
                           for _ in range(BENCH_QUERY_RUNS))
            result[name + "_ms"] = round(percentile(times, 50) * 1000, 1)
    asker.close()
    result["loop_held_ms"] = watch.held_ms()
    return result


class LoopWatch:
    """While in a with block, a client pings every BENCH_PING_EVERY_S: its
    slowest answer is the longest the server's loop was held."""

    def __init__(self, host, port, timeout, nick):
        self.pinger = BlockingPeer(host, port, nick, timeout)
        self.timeout = timeout
        self.times = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._ping, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(self.timeout)
        self.pinger.close()

    def _ping(self):
        while not self.stop.is_set():
            self.times.append(self.pinger.round_trip("/ping p", "*** pong p"))
            self.stop.wait(BENCH_PING_EVERY_S)

    def held_ms(self):
        return round(max(self.times) * 1000, 1) if self.times else None


def connect_from_many(host, port, number, timeout):
    """Connect as if from the number-th of many addresses: on a loopback
    server, from 127.0.0.(2 + number % 250) where the system has them all
    (Linux), so that each guesses as an address of its own (the server paces
    an address's guesses); else from wherever the system picks."""
    if host.startswith("127."):
        try:
            return socket.create_connection(
                (host, port), timeout=timeout,
                source_address=("127.0.0.%d" % (2 + number % 250), 0))
        except OSError:
            pass  # (macOS: only 127.0.0.1)
    return socket.create_connection((host, port), timeout=timeout)


def time_logins(host, port, count, timeout):
    """count connections log in at once (with a wrong password: each costs
    the server a full password check, and none takes another's place) while
    another client pings every BENCH_PING_EVERY_S: return how long until all
    were answered, and the slowest ping (how long the loop was held), in ms."""
    owner = BlockingPeer(host, port, "acct", timeout)
    owner.round_trip("/register " + BENCH_ACCOUNT_PASSWORD, NOTICE + "acct is now your account")
    socks = [connect_from_many(host, port, number, timeout) for number in range(count)]
    try:
        with LoopWatch(host, port, timeout, "lp") as watch:
            started = time.monotonic()
            for sock in socks:
                sock.sendall(encode_line("/login acct not-the-password"))
            wrong = encode_line(error("wrong_login"))
            for sock in socks:
                data = b""
                while wrong not in data:
                    chunk = sock.recv(BENCH_RECV_BYTES)
                    if not chunk:
                        raise BenchError("the server closed a login's connection")
                    data += chunk
            answered = time.monotonic() - started
    finally:
        for sock in socks + [owner.sock]:
            sock.close()
    return {"count": count, "all_answered_ms": round(answered * 1000, 1),
            "loop_held_ms": watch.held_ms()}


class BlockingPeer:
    """A plain blocking client, for timing one request at a time."""

    def __init__(self, host, port, nick, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.inbuf = b""
        self.round_trip(nick, NOTICE + nick + " joined")
        self.round_trip("/ping ready", "*** pong ready")  # past its replay

    def round_trip(self, request, answer):
        """Send request; return the seconds until a line starting with answer."""
        started = time.monotonic()
        self.sock.sendall(encode_line(request))
        wanted = answer.encode(ENCODING)
        while True:
            while b"\n" not in self.inbuf:
                data = self.sock.recv(BENCH_RECV_BYTES)
                if not data:
                    raise BenchError("the server closed a history query's connection")
                self.inbuf += data
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.startswith(wanted):
                return time.monotonic() - started

    def close(self):
        self.sock.close()


def server_usage(proc):
    """Return (CPU seconds, peak RSS bytes) of a running server child, Linux /proc."""
    try:
        with open("/proc/%d/stat" % proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open("/proc/%d/status" % proc.pid) as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return cpu, peak
    except (OSError, ValueError, IndexError, StopIteration):
        return None, None


def stop_bench_server(proc):
    """SIGTERM the server; return its (CPU seconds, peak RSS bytes) from getrusage."""
    proc.terminate()
    try:
        proc.wait(SHUTDOWN_FLUSH_S + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if resource is None:
        return None, None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes there, KiB here
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale


def format_bench_table(result):
    """The human-readable report: one row per number."""
    latency = result["latency_ms"]
    rows = [
        ("server", result["server"]),
        ("workload", "%d clients in %s, %d senders x %d messages (%s), %d slow (%s), "
         "%d bursty, %s"
         % (result["clients"], plural(result["rooms"], "room"), result["senders"],
            result["messages"], result["mode"],
            result["slow"], "reading %d B/s" % result["slow_read"] if result["slow_read"]
            else "never reading", result["bursty"], "lines padded to %d bytes" % result["size"]
            if result["size"] else "short lines")
         + (", WebSocket clients" if result.get("web") else ", %d in JSON mode"
            % result["json_clients"] if result.get("json_clients") else "")),
        ("clients registered", "%d / %d" % (result["registered"], result["clients"])),
        ("registrations/s", "%.0f  (%.2f s)" % (result["registrations_per_s"],
                                                result["register_s"])),
        ("deliveries", "%d received / %d expected" % (result["deliveries_received"],
                                                      result["deliveries_expected"])),
        ("deliveries/s", "%.0f  (%.2f s)" % (result["deliveries_per_s"], result["message_s"])),
        ("latency ms", "p50 %(p50).2f  p90 %(p90).2f  p99 %(p99).2f  max %(max).2f" % latency
         if latency else "n/a"),
        ("same order", {True: "yes", False: "NO", None: "n/a"}[result["same_order"]]
         + " (%d observers)" % result["observers"]),
        ("slow evicted", "%d / %d" % (result["slow_evicted"], result["slow"])),
        ("others evicted", ", ".join(result["others_evicted"]) or "none"),
        ("server CPU s", "%.2f" % result["server_cpu_s"] if result["server_cpu_s"] is not None
         else "n/a (not started by the bench)"),
        ("server peak RSS MB", "%.1f" % (result["server_peak_rss"] / 1e6)
         if result["server_peak_rss"] else "n/a (not started by the bench)"),
        ("server store", result["server_store"] or "n/a (not started by the bench)"),
        ("logins at once", "%(count)d answered in %(all_answered_ms).0f ms; loop held at most "
         "%(loop_held_ms)s ms" % result["logins"] if result.get("logins") else "n/a (--logins)"),
        ("history queries", "on %(messages)s: /history 500 %(history_500_ms).1f ms, /search "
         "(found) %(search_found_ms).1f ms, /search (absent) %(search_absent_ms).1f ms; loop "
         "held at most %(loop_held_ms)s ms" % dict(result["history"], messages=plural(
             result["history_size"], "message")) if result.get("history") else "n/a (--history)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join("%-*s  %s" % (width, name, value) for name, value in rows)


def bench_complete(result):
    """Tell whether the run delivered everything it should have."""
    return (result["registered"] == result["clients"]
            and result["deliveries_received"] >= result["deliveries_expected"]
            and result["same_order"] is not False and not result["others_evicted"])


# --- Command line -------------------------------------------------------------

def describe_error(exc):
    """Return the words of an OSError without its errno number."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def bind_error_text(exc):
    """The words for a failed bind: the system's own, without the address
    that socket.create_server() appends to them (we say it once, ourselves)."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return describe_error(exc)
    return os.strerror(exc.errno)


def number_argument(convert, text, what):
    """Convert a flag's value, or say in plain words what was expected."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError("expected %s, not %r" % (what, text))
    return value


def host_list(text):
    """H:P,H:P (a bare P: 127.0.0.1) as [(host, port)...]."""
    addresses = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        addresses.append((host.strip("[]") or DEFAULT_HOST, port_number(port)))
    return addresses


def port_number(text):
    value = number_argument(int, text, "a port number from 0 to 65535")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("expected a port number from 0 to 65535, not %s" % text)
    return value


def positive_int(text):
    value = number_argument(int, text, "a whole number, 1 or more")
    if value < 1:
        raise argparse.ArgumentTypeError("expected a whole number, 1 or more, not %s" % text)
    return value


def non_negative_int(text):
    value = number_argument(int, text, "a whole number, 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError("expected a whole number, 0 or more, not %s" % text)
    return value


def non_negative_float(text):
    value = number_argument(float, text, "a number, 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError("expected a number, 0 or more, not %s" % text)
    return value


def share_argument(text):
    share = number_argument(float, text, "a share")
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError("a share is from 0 to 1, not %s" % text)
    return share


def positive_float(text):
    value = number_argument(float, text, "a number more than 0")
    if value <= 0:
        raise argparse.ArgumentTypeError("expected a number more than 0, not %s" % text)
    return value


def number_type(limit):
    """The argparse type of a limit's flag."""
    if limit.kind is int:
        return non_negative_int if limit.zero_ok else positive_int
    return non_negative_float if limit.zero_ok else positive_float


def nick_list(text):
    """--operators: nicks separated by commas."""
    nicks = [nick.strip() for nick in text.split(",") if nick.strip()]
    for nick in nicks:
        problem = nick_problem(nick)
        if problem:
            raise argparse.ArgumentTypeError(problem.fields["text"])
    return tuple(nicks)


def fingerprint_argument(text):
    try:
        return normalize_fingerprint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="chat.py", description="A terminal chat room in one file.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    server = commands.add_parser("server", help="run a chat room")
    server.set_defaults(run=run_server, parser=server)
    server.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s; "
                             "0.0.0.0 or :: for every interface)")
    server.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="TCP port (default %(default)s; 0 picks a free one)")
    for limit in LIMITS:
        server.add_argument("--" + limit.name.replace("_", "-"), type=number_type(limit),
                            default=limit.default, metavar=limit.unit,
                            help=limit.help + (" (default %(default)s)"
                                               if limit.default is not None else ""))
    server.add_argument("--db", default=DB_FILE, metavar="FILE",
                        help="the SQLite file that keeps history, rooms, topics, bans, "
                             "accounts and their waiting messages "
                             "(default %(default)s in the working directory; :memory: keeps "
                             "nothing past a restart)")
    server.add_argument("--redis", metavar="URL",
                        help="redis://[:PASSWORD@]HOST:PORT[/DB] (rediss:// for TLS): "
                             "every server given the same Redis database is one chat")
    server.add_argument("--redis-password-file", metavar="FILE",
                        help="Redis's password, kept out of the URL (which ps shows); or "
                             "the environment variable %s" % REDIS_PASSWORD_ENV)
    server.add_argument("--keep", type=non_negative_int, default=KEEP_MESSAGES, metavar="N",
                        help="messages kept per room, the oldest going first; 0 keeps all "
                             "(default %(default)s)")
    server.add_argument("--replay", type=non_negative_int, default=REPLAY_MESSAGES,
                        metavar="N", help="messages shown to whoever joins a room; 0: none "
                                          "(default %(default)s)")
    server.add_argument("--tls-cert", metavar="FILE",
                        help="TLS certificate (PEM); with --tls-key, clients must use TLS")
    server.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    server.add_argument("--password-file", metavar="FILE",
                        help="the room's password, the file's first line (or the "
                             "environment variable %s); clients send /pass first" % PASSWORD_ENV)
    server.add_argument("--op-password-file", metavar="FILE",
                        help="the operators' password for /op (or the environment "
                             "variable %s)" % OP_PASSWORD_ENV)
    server.add_argument("--operators", type=nick_list, default=(), metavar="NICK,NICK",
                        help="accounts that are operators whenever they are logged in")
    server.add_argument("--web", type=port_number, metavar="PORT",
                        help="also serve the web client and its WebSocket on PORT (HTTPS "
                             "with --tls-cert and --tls-key)")
    server.add_argument("--web-host", metavar="HOST",
                        help="the address --web listens on (default: --host)")
    server.add_argument("--web-origin", type=lambda text: tuple(
        item.strip() for item in text.split(",") if item.strip()), default=(),
                        metavar="ORIGIN,ORIGIN",
                        help="pages of these origins may open a WebSocket too "
                             "(https://example.org); by default only the page's own")
    server.add_argument("--irc", type=port_number, metavar="PORT",
                        help="also let IRC clients (irssi, WeeChat, bots) in on PORT")
    server.add_argument("--ircs", type=port_number, metavar="PORT",
                        help="the same over TLS (needs --tls-cert and --tls-key)")
    server.add_argument("--irc-host", metavar="HOST",
                        help="the address --irc and --ircs listen on (default: --host)")
    server.add_argument("--motd-file", metavar="FILE",
                        help="the message of the day: its lines are said to each "
                             "connection after the greeting")
    server.add_argument("-q", "--quiet", action="store_true",
                        help="log only start, stop and errors")

    client = commands.add_parser("client", help="join a chat room")
    client.set_defaults(run=run_client, parser=client)
    client.add_argument("--name", metavar="NICK", help="your nickname (asked if not given)")
    client.add_argument("--host", default=DEFAULT_HOST,
                        help="server address (default %(default)s)")
    client.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="server port (default %(default)s)")
    client.add_argument("--tls", action="store_true",
                        help="use TLS, verifying the server against the system's CAs")
    client.add_argument("--cafile", metavar="FILE",
                        help="verify the server against this CA file instead (implies --tls)")
    client.add_argument("--fingerprint", type=fingerprint_argument, metavar="SHA256:...",
                        help="trust exactly the certificate with this fingerprint, "
                             "as the server logs it (implies --tls)")
    client.add_argument("--insecure", action="store_true",
                        help="use TLS without checking the certificate (implies --tls)")
    client.add_argument("--password-file", metavar="FILE",
                        help="the room's password, the file's first line (or the "
                             "environment variable %s; asked for if the room needs one)"
                             % PASSWORD_ENV)
    client.add_argument("--login", action="store_true",
                        help="--name is your account: log in to it (and again after a "
                             "reconnect); its password from --account-password-file, "
                             "%s, or asked for" % ACCOUNT_PASSWORD_ENV)
    client.add_argument("--account-password-file", metavar="FILE",
                        help="your account's password, the file's first line (or the "
                             "environment variable %s)" % ACCOUNT_PASSWORD_ENV)
    client.add_argument("--json", action="store_true",
                        help="a pipe for programs: the server's JSON objects on stdout, one a "
                             "line; lines and commands from stdin; no terminal handling")
    client.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour nicks and lines: auto = on a terminal, unless "
                             "NO_COLOR is set (default auto)")
    client.add_argument("--timestamps", action="store_true",
                        help="show the local time (HH:MM) before each line; "
                             "/timestamps toggles it")
    client.add_argument("--no-bell", action="store_true",
                        help="no bell on a private message or a line that names you")
    client.add_argument("--reconnect", action="store_true",
                        help="when the connection drops, connect again (pauses from 1 s "
                             "doubling to 30 s) and register the same nick; Ctrl-C stops it")
    account = commands.add_parser(
        "account", help="make accounts, reset their passwords, delete and list them",
        description="An administrator's tool: the accounts of a chat, in its SQLite file "
                    "(--db) or in Redis (--redis; running servers are told at once).")
    account.set_defaults(run=run_account, parser=account)
    account.add_argument("action", choices=("add", "password", "delete", "list"),
                         help="add NAME, password NAME (a new one), delete NAME, or list")
    account.add_argument("name", nargs="?", metavar="NAME", help="the account's nick")
    account.add_argument("--db", default=DB_FILE, metavar="FILE",
                         help="the server's SQLite file (default %(default)s)")
    account.add_argument("--redis", metavar="URL",
                         help="the chat's Redis, as the servers are given it")
    account.add_argument("--redis-password-file", metavar="FILE",
                         help="Redis's password; or the environment variable %s"
                              % REDIS_PASSWORD_ENV)
    account.add_argument("--password-file", metavar="FILE",
                         help="the new password: the file's first line (- : standard "
                              "input); else it is asked for twice on the terminal")

    bench = commands.add_parser(
        "bench", help="measure a server: registrations, deliveries, latency",
        description="Start a chat.py server (or use --host/--port), run one workload, "
                    "report. Clients register, then senders send their messages.")
    bench.set_defaults(run=run_bench, parser=bench)
    bench.add_argument("--host", help="measure the server at this address instead of "
                                      "starting one")
    bench.add_argument("--port", type=port_number, help="its port (with --host, or alone "
                                                        "for 127.0.0.1)")
    bench.add_argument("--hosts", type=host_list, metavar="H:P,H:P",
                       help="several servers of one chat (--redis): the clients are spread "
                            "over them in turn")
    bench.add_argument("--clients", type=positive_int, default=100, metavar="N",
                       help="clients that connect and register (default %(default)s)")
    bench.add_argument("--senders", type=positive_int, default=None, metavar="S",
                       help="of them, how many send (default %d, or all the clients "
                            "there are)" % BENCH_SENDERS)
    bench.add_argument("--messages", type=positive_int, default=100, metavar="M",
                       help="lines each sender sends (default %(default)s)")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--flood", action="store_true",
                      help="send as fast as the server takes them (the default)")
    mode.add_argument("--rate", type=positive_float, metavar="R",
                      help="send R lines per second per sender")
    bench.add_argument("--duration", type=positive_float, metavar="SECONDS",
                       help="with --rate: send for this long (sets --messages)")
    bench.add_argument("--slow", type=non_negative_int, default=0, metavar="K",
                       help="clients that register and never read, or read slowly "
                            "(--slow-read) (default %(default)s)")
    bench.add_argument("--slow-read", type=non_negative_int, default=0, metavar="BYTES_PER_S",
                       help="the slow clients read this many bytes a second; 0 = never "
                            "(default %(default)s)")
    bench.add_argument("--bursty", type=non_negative_int, default=0, metavar="K",
                       help="readers that read what has come, then pause --burst-pause "
                            "seconds, and must still get everything (default %(default)s)")
    bench.add_argument("--burst-pause", type=positive_float, default=BENCH_BURST_PAUSE_S,
                       metavar="SECONDS", help="the bursty readers' pause "
                                               "(default %(default)s)")
    bench.add_argument("--size", type=non_negative_int, default=0, metavar="B",
                       help="pad each message to B bytes (default: no padding)")
    bench.add_argument("--web", action="store_true",
                       help="the clients are WebSockets (a started server serves --web; with "
                            "--port, that is the server's web port)")
    bench.add_argument("--irc", action="store_true",
                       help="the clients speak IRC (to the started server's --irc port, "
                            "or to --port: any IRC server, such as ngIRCd)")
    bench.add_argument("--mix", type=mix_argument, default=(), metavar="K,K,...",
                       help="client i speaks the (i mod n)th of these: text, json, irc "
                            "(text,json,irc: a third each)")
    bench.add_argument("--json-share", type=share_argument, default=0.0, metavar="F",
                       help="this share of the clients (0 to 1; 0.5: every other one) "
                            "switch to JSON mode after registering (default 0)")
    bench.add_argument("--rooms", type=positive_int, default=1, metavar="K",
                       help="spread the clients, senders too, over K rooms (client i in "
                            "#bench{i mod K}); 1 = all in #lobby (default %(default)s)")
    bench.add_argument("--history", type=non_negative_int, default=0, metavar="N",
                       help="first fill the started server's #lobby with N messages (each "
                            "joining client gets a replay), and at the end time /history 500 "
                            "and /search on it, and how long they hold the loop")
    bench.add_argument("--logins", type=non_negative_int, default=0, metavar="N",
                       help="at the end, N connections log in at once (wrong passwords: a full "
                            "check each), timed with how long they hold the loop")
    bench.add_argument("--concurrency", type=positive_int, default=BENCH_CONCURRENCY,
                       metavar="C", help="connections in flight while registering "
                                         "(default %(default)s)")
    bench.add_argument("--timeout", type=positive_float, default=BENCH_STALL_S,
                       metavar="SECONDS", help="fail a phase that makes no progress "
                                               "this long (default %(default)s)")
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


def run_bench(args):
    """Run one bench workload; print the table (or JSON); return the exit code."""
    problem = bench_flags_problem(args)
    if problem:
        sys.stderr.write("chat.py bench: %s\n" % problem)
        return 2
    raise_open_files_limit()
    server = None
    folder = tempfile.mkdtemp(prefix="chat-bench-")
    try:
        if args.host is None and args.port is None and not args.hosts:
            # The store on, as a server runs by default, in a file of its own.
            db = os.path.join(folder, DB_FILE)
            if args.history:
                fill_history(db, args.history)
            server, port = start_bench_server(args.clients, db, keep_all=bool(args.history),
                                              web=args.web, irc=args.irc or "irc" in args.mix)
            host, label = DEFAULT_HOST, "chat.py server (started by the bench)"
        elif args.hosts:
            host, port = args.hosts[0]
            label = ", ".join(format_address(address) for address in args.hosts)
        else:
            host, port = args.host or DEFAULT_HOST, args.port or DEFAULT_PORT
            label = format_address((host, port))
        bench = Bench(args, host, port, server)
        cpu = peak = None
        try:
            result = bench.run()
            if args.history:
                result["history"] = time_history_queries(host, port, args.timeout)
            if args.logins:
                result["logins"] = time_logins(host, port, args.logins, args.timeout)
            if server is not None:
                cpu, peak = server_usage(server)  # before the teardown adds to them
        finally:
            if server is not None:
                stopped = stop_bench_server(server)
                if cpu is None:
                    cpu, peak = stopped
            bench.close()
    except BenchError as exc:
        sys.stderr.write("chat.py bench: %s\n" % exc)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result.update(server=label, size=args.size, server_cpu_s=cpu, server_peak_rss=peak,
                  server_store=server_store_usage(server) if server is not None else None)
    print(json.dumps(result) if args.json else format_bench_table(result))
    return 0 if bench_complete(result) else 1


def mix_argument(text):
    """--mix: a list of text, json and irc."""
    kinds = tuple(text.split(","))
    if not kinds or any(kind not in ("text", "json", "irc") for kind in kinds):
        raise argparse.ArgumentTypeError("a list of text, json and irc: %r" % text)
    return kinds


def bench_flags_problem(args):
    """Return what is wrong with the bench's flags, or None."""
    if (args.irc or args.mix) and (args.web or args.hosts or (
            args.mix and (args.host is not None or args.port is not None))):
        return ("--irc and --mix are not for --web or --hosts (and --mix measures the "
                "server the bench starts)")
    if args.history and (args.host is not None or args.port is not None or args.hosts):
        return ("--history fills the server the bench starts: not with --host, --port "
                "or --hosts")
    if args.hosts and (args.host is not None or args.port is not None):
        return "--hosts names every server: not with --host or --port"
    if args.duration is not None:
        if not args.rate:
            return "--duration needs --rate"
        args.messages = max(1, int(round(args.rate * args.duration)))
    if args.senders is None:  # the default: as many as there are clients for
        args.senders = max(1, min(BENCH_SENDERS, args.clients - args.slow - args.bursty))
    if args.senders + args.slow + args.bursty > args.clients:
        return ("--senders (%d), --slow (%d) and --bursty (%d) need that many --clients (%d)"
                % (args.senders, args.slow, args.bursty, args.clients))
    return None


def check_utf8(text, what):
    """Raise ValueError if text from the command line or the environment is
    not valid UTF-8 (Python keeps such bytes as lone surrogates, which fail
    only later, when the text is sent)."""
    if text is not None:
        try:
            text.encode(ENCODING)
        except UnicodeEncodeError:
            raise ValueError("%s is not valid UTF-8" % what) from None


def read_secret(path, env_name, what):
    """Return a password from the file at path (its first line), else from
    the environment variable, else None. Raises ValueError saying what is wrong."""
    if path:
        try:
            with open(path, encoding=ENCODING) as f:
                secret = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError("cannot read the %s file %s: %s"
                             % (what, path, describe_error(exc)))
        if not secret:
            raise ValueError("the %s file %s is empty" % (what, path))
        return secret
    secret = os.environ.get(env_name, "").strip() if env_name else ""
    check_utf8(secret, "the %s in %s" % (what, env_name))
    return secret or None


def read_motd(path):
    """--motd-file's lines, as notices say them (cleaned: no escape sequences
    reach a terminal). Raises OSError, or ValueError for a file not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode(ENCODING)
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text")
    return [clean_text(ANSI_SEQUENCE.sub("", line)).rstrip() for line in text.splitlines()]


# A terminal's escape sequence (colours, cursor moves), taken out whole.
ANSI_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")


def run_server(args):
    raise_open_files_limit()
    try:
        limits = Limits(**{limit.name: getattr(args, limit.name) for limit in LIMITS})
    except ValueError as exc:
        sys.stderr.write("chat.py: %s\n" % exc)
        return 2
    tls_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            sys.stderr.write("chat.py: --tls-cert and --tls-key go together\n")
            return 2
        try:
            tls_context, fingerprint = server_tls_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError, ssl.SSLError) as exc:
            sys.stderr.write("chat.py: cannot use %s and %s for TLS: %s\n"
                             % (args.tls_cert, args.tls_key, describe_error(exc)))
            return 2
    try:
        check_utf8(args.host, "--host")
        password = read_secret(args.password_file, PASSWORD_ENV, "password")
        op_password = read_secret(args.op_password_file, OP_PASSWORD_ENV, "operator password")
    except ValueError as exc:
        sys.stderr.write("chat.py: %s\n" % exc)
        return 2
    motd = ()
    if args.motd_file is not None:
        try:
            motd = read_motd(args.motd_file)
        except (OSError, ValueError) as exc:
            sys.stderr.write("chat.py: cannot read the message of the day %s: %s\n"
                             % (args.motd_file, describe_error(exc)))
            return 1
    network = None
    if args.redis:
        try:
            redis = RedisAddress(args.redis)
            redis.password = read_secret(args.redis_password_file, REDIS_PASSWORD_ENV,
                                         "Redis password") or redis.password
        except ValueError as exc:
            sys.stderr.write("chat.py: --redis: %s\n" % exc)
            return 2
        network = RedisNetwork(redis, args.keep, args.replay)
        try:
            network.load()
        except RedisError as exc:
            sys.stderr.write("chat.py: %s\n" % exc)
            return 1
    try:
        store = SQLiteStore(args.db, args.keep, exclusive=True)
    except StoreError as exc:
        sys.stderr.write("chat.py: cannot use the database %s: %s\n" % (args.db, exc))
        return 1
    if network is not None:
        store = RedisStore(network, store)
    listeners = []
    if args.web is not None:
        listeners.append(Listener(args.web_host or args.host, args.web, tls_context, WEB_CODEC))
    if args.irc is not None:
        listeners.append(Listener(args.irc_host or args.host, args.irc, None, IRC_CODEC))
    if args.ircs is not None:
        if tls_context is None:
            sys.stderr.write("chat.py: --ircs needs --tls-cert and --tls-key\n")
            store.close()
            return 2
        listeners.append(Listener(args.irc_host or args.host, args.ircs, tls_context, IRC_CODEC))
    server = ChatServer(args.host, args.port, limits, verbose=not args.quiet,
                        tls_context=tls_context, password=password, op_password=op_password,
                        store=store, replay=args.replay, operators=args.operators,
                        network=network, motd=motd, listeners=listeners,
                        web_origins=args.web_origin)
    try:
        server.bind()
    except OSError as exc:  # socket.gaierror is one too: a bad host
        sys.stderr.write("chat.py: cannot listen on %s: %s\n" % (format_address(
            getattr(exc, "where", (args.host, args.port))), bind_error_text(exc)))
        store.close()
        return 2
    log_to_stderr("chat.py server starting (pid %d, Python %s)"
                  % (os.getpid(), sys.version.split()[0]))
    if network is not None:
        log_to_stderr("one chat with every server on Redis at %s (this one: %s); history, "
                      "accounts and bans there too" % (network.address.where, network.server_id))
    else:
        log_to_stderr("history and rooms in %s" % (
            "memory only (--db :memory:)" if args.db == ":memory:" else os.path.abspath(args.db)))
    if tls_context is not None:
        log_to_stderr("TLS on; the certificate's fingerprint is %s" % fingerprint)
    if password is not None:
        log_to_stderr("the room needs a password")
    if op_password is not None:
        log_to_stderr("operators: /op with the operator password")
    for nick in args.operators:
        if store.account(nick_key(nick)) is None:  # whoever registered it would be one
            log_to_stderr("warning: --operators %s: there is no account %s yet, and nobody "
                          "can take that nick until it is made: chat.py account add %s%s"
                          % (nick, nick, nick, "" if network is None else " --redis URL"))
    if threading.current_thread() is threading.main_thread():
        # Before start(): a signal that comes once "listening on" is logged
        # must already mean a clean shutdown.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: server.shutdown())
    server.start()
    server.serve_forever()
    return 0


class SQLiteAccounts:
    """chat.py account on a server's SQLite file (a running server sees the
    change at its next login: it reads accounts from the file)."""

    def __init__(self, path):
        self.store = SQLiteStore(path)
        self.where = path

    def get(self, key):
        return self.store.account(key)

    def add(self, key, nick, password_hash):
        self.store.add_account(key, nick, password_hash)

    def set_password(self, key, nick, password_hash):
        self.store.set_password(key, password_hash)

    def delete(self, key):
        self.store.remove_account(key)

    def nicks(self):
        return self.store.account_nicks()

    def close(self):
        self.store.close()


class RedisAccounts:
    """chat.py account on a chat of several servers: the accounts in Redis,
    and the running servers told through the feed, as a server tells the others."""

    def __init__(self, address):
        self.network = RedisNetwork(address)
        self.redis = BlockingRedis(address).connect()
        self.network.load_scripts(self.redis)
        self.where = address.where

    def get(self, key):
        value = self.redis.call("HGET", REDIS_ACCOUNTS, key)
        if value is None:
            return None
        account = json.loads(value)
        return account["nick"], account["hash"]

    def add(self, key, nick, password_hash):
        self._change(key, nick=nick, hash=password_hash)

    def set_password(self, key, nick, password_hash):
        self._change(key, nick=nick, hash=password_hash)

    def delete(self, key):
        self._change(key, nick=None)

    def _change(self, key, **fields):
        for command in self.network.change_commands("account", key, fields):
            self.redis.call(*command)

    def nicks(self):
        accounts = [json.loads(value) for value in _pairs(
            self.redis.call("HGETALL", REDIS_ACCOUNTS)).values()]
        return [account["nick"] for account in sorted(accounts,
                                                      key=lambda a: nick_key(a["nick"]))]

    def close(self):
        self.redis.close()


def open_accounts(args):
    """The accounts chat.py account works on: --redis's, else --db's."""
    if args.redis:
        address = RedisAddress(args.redis)  # ValueError: a bad address
        address.password = read_secret(args.redis_password_file, REDIS_PASSWORD_ENV,
                                       "Redis password") or address.password
        return RedisAccounts(address)
    if not os.path.exists(args.db):  # the wrong folder: a new empty file no server reads
        raise ValueError("there is no database %s: give the server's with --db (chat.py "
                         "account makes none)" % args.db)
    return SQLiteAccounts(args.db)


def new_account_password(args):
    """The password to set: --password-file's first line ('-': standard
    input), else typed twice on the terminal. Raises ValueError saying why not."""
    if args.password_file == "-":
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password_file:
        password = read_secret(args.password_file, None, "password")
    elif sys.stdin.isatty():
        password = getpass.getpass("password for %s: " % args.name)
        if getpass.getpass("the same again: ") != password:
            raise ValueError("the two passwords differ; nothing changed")
    else:
        raise ValueError("no terminal to ask the password on: give --password-file FILE "
                         "(or - for standard input)")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(PASSWORD_TOO_SHORT)
    return password


def run_account(args):
    """chat.py account add|password|delete|list: an administrator's tool."""
    if args.action != "list" and not args.name:
        args.parser.error("%s needs the account's NAME" % args.action)
    if args.action == "add" and nick_problem(args.name):
        sys.stderr.write("chat.py: %s\n" % nick_problem(args.name).fields["text"])
        return 2
    try:
        accounts = open_accounts(args)
    except (ValueError, RedisError, StoreError) as exc:
        sys.stderr.write("chat.py: %s\n" % exc)
        return 1
    try:
        return manage_account(args, accounts)
    except (RedisError, StoreError, OSError) as exc:
        sys.stderr.write("chat.py: %s: %s\n" % (accounts.where, describe_error(exc)))
        return 1
    finally:
        accounts.close()


def manage_account(args, accounts):
    """Do args.action; return the exit code, having said what happened."""
    if args.action == "list":
        for nick in accounts.nicks():
            print(nick)
        return 0
    key = nick_key(args.name)
    account = accounts.get(key)
    if args.action == "add" and account is not None:
        sys.stderr.write("chat.py: %s is an account already (to reset its password: "
                         "chat.py account password %s)\n" % (account[0], account[0]))
        return 1
    if args.action != "add" and account is None:
        sys.stderr.write("chat.py: no account %s\n" % args.name)
        return 1
    if args.action == "delete":
        accounts.delete(key)
        print("%s deleted, with any messages that waited for it" % account[0])
        return 0
    try:
        password_hash = hash_password(new_account_password(args))
    except ValueError as exc:
        sys.stderr.write("chat.py: %s\n" % exc)
        return 1
    if args.action == "add":
        accounts.add(key, args.name, password_hash)
        print("%s is an account now: /login %s PASSWORD" % (args.name, args.name))
    else:
        accounts.set_password(key, account[0], password_hash)
        print("the password of %s is changed" % account[0])
    return 0


def run_client(args):
    tls_context = None
    if args.tls or args.cafile or args.fingerprint or args.insecure:
        if args.insecure:
            sys.stderr.write("chat.py: warning: --insecure: the server's certificate is not "
                             "checked; anyone on the way can read and change this chat\n")
        try:
            tls_context = client_tls_context(args.cafile, args.fingerprint is not None,
                                             args.insecure)
        except (OSError, ssl.SSLError) as exc:
            sys.stderr.write("chat.py: cannot use %s: %s\n" % (args.cafile, describe_error(exc)))
            return 1
    try:
        check_utf8(args.name, "--name")
        check_utf8(args.host, "--host")
        password = read_secret(args.password_file, PASSWORD_ENV, "password")
        account_password = read_secret(args.account_password_file, ACCOUNT_PASSWORD_ENV,
                                       "account password")
    except ValueError as exc:
        sys.stderr.write("chat.py: %s\n" % exc)
        return 1
    if args.login and not args.name:
        sys.stderr.write("chat.py: --login needs --name (your account)\n")
        return 2
    return ChatClient(args.host, args.port, args.name, tls_context=tls_context,
                      interactive=False if args.json else None, json_pipe=args.json,
                      fingerprint=args.fingerprint, password=password,
                      color=use_color(args.color, sys.stdout), timestamps=args.timestamps,
                      bell=not args.no_bell, reconnect=args.reconnect,
                      login=args.login or bool(account_password and args.name),
                      account_password=account_password).run()


def main(argv=None):
    """Run the subcommand named in argv; return the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said with the subcommand's usage, not the top level's
        args.parser.error("unrecognized arguments: %s" % " ".join(extra))
    return args.run(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # stdout's reader left (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
