"""Tests for chat.py: the protocol in PROTOCOL (README.md), made executable.

    python3 -m unittest -v test_chat

From cheapest to dearest: pure protocol functions, the server with raw
socket peers, the client as a subprocess, the command line. Servers listen
on port 0; every wait is bounded by a timeout.
"""

import ast
import calendar
import random
import re
import collections
import contextlib
import hashlib
import io
import errno
import gc
import glob
import json
import os
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import string
import struct
import subprocess
import ssl
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import weakref
from unittest import mock

import chat

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_PY = os.path.join(HERE, "chat.py")
TIMEOUT = 10.0       # the longest any single expected line may take
QUIET = 0.3          # how long "nothing arrives" is watched for


# A self-signed certificate for localhost, 127.0.0.1 and ::1, valid until 2126,
# made once with: openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1
#   -nodes -days 36500 -subj /CN=localhost
#   -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBrjCCAVSgAwIBAgIUIF/AQk48HSgY1ceXwso6U5/EAWUwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNzE2MzkyNFoYDzIxMjYxMTAz
MTYzOTI0WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAS4XfkN08clHsWomIXCOjIJ3RLC7fpLdO3lRqeBClBb8rBGzUDReHxI
VF6Q4BgVVSaVcT86Rb1HoLfWkS9OylPyo4GBMH8wHQYDVR0OBBYEFPNPKjS3rhy6
vfaG3TFFJg2/cu9vMB8GA1UdIwQYMBaAFPNPKjS3rhy6vfaG3TFFJg2/cu9vMA8G
A1UdEwEB/wQFMAMBAf8wLAYDVR0RBCUwI4IJbG9jYWxob3N0hwR/AAABhxAAAAAA
AAAAAAAAAAAAAAABMAoGCCqGSM49BAMCA0gAMEUCIQC/gO+paz2e+Zy8pBdXHgFP
8XLZQlwmimIQ/8jpRU+rzAIgSilZAmAQFvltVn/G3zgTQvByZmcfikPdYRN/nG9I
mYY=
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrFpUy3tTorFW7uxs
Ws+UaOWnrRk6TaznUuM2Ur3JAuuhRANCAAS4XfkN08clHsWomIXCOjIJ3RLC7fpL
dO3lRqeBClBb8rBGzUDReHxIVF6Q4BgVVSaVcT86Rb1HoLfWkS9OylPy
-----END PRIVATE KEY-----
"""
# What `openssl x509 -noout -fingerprint -sha256` prints for it.
TEST_FINGERPRINT = ("SHA256:12:74:C3:62:9F:23:A0:28:91:F8:7A:03:73:C4:70:98:43:88:"
                    "4E:F7:38:F4:CB:57:FF:B6:5F:41:2A:3D:7D:3D")


def write_file(case, name, text):
    """Write text to a file in a temporary folder removed after the test."""
    folder = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, folder)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# --- helpers --------------------------------------------------------------------

def serve_in_thread(case, port=0, limits=None, **options):
    """Start a ChatServer in a thread (port 0: a free one, which the test may
    listen on again: see free_port()), stopped and joined when the test
    ends; return it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        server = chat.ChatServer("127.0.0.1", port or free_port(), limits or chat.Limits(),
                                 log=None, **options)
        try:
            server.start()
            break
        except OSError as exc:
            # A free port taken since: another. The same port again: the
            # stopped server's thread may not have closed it yet.
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            if port:
                time.sleep(0.05)  # waiting for the old listener to close, bounded
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    case.addCleanup(thread.join, 5)
    case.addCleanup(server.shutdown)
    return server


def shorten(case, **values):
    """Patch chat's constants (waits, mostly) for the rest of the test."""
    for name, value in values.items():
        patcher = mock.patch.object(chat, name, value)
        patcher.start()
        case.addCleanup(patcher.stop)


def setUpModule():
    """Subprocesses run in a temporary folder: a server's default chat.db goes there."""
    global WORK_DIR
    WORK_DIR = tempfile.mkdtemp(prefix="chat-test-")


def tearDownModule():
    shutil.rmtree(WORK_DIR, ignore_errors=True)


WORK_DIR = None


def start_process(case, args, **popen):
    """Start a subprocess that is killed (if still running) and reaped when
    the test ends, its pipes closed."""
    popen.setdefault("cwd", WORK_DIR)
    proc = subprocess.Popen(args, **popen)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            case.addCleanup(stream.close)
    case.addCleanup(lambda: proc.poll() is None and proc.kill() or proc.wait())
    return proc


def wait_until_listening(case, stream):
    """Read a server's log until `listening on`; return (its port, the log)."""
    log = []
    while True:
        line = stream.readline().decode()
        case.assertTrue(line, "the server exited: %r" % log)
        log.append(line)
        if "listening on " in line:
            return int(line.rsplit(":", 1)[1]), "".join(log)


class Peer:
    """A raw-socket client, as netcat would be."""

    def __init__(self, port, host="127.0.0.1", source=None, rcvbuf=None, tls=None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if rcvbuf:  # before connecting, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((host, port))
        if tls is not None:  # an SSLContext that trusts the server
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        self.buf = b""                      # an unfinished line
        self.lines = collections.deque()    # complete lines not yet read
        self.seen = []                      # every line read, for failure messages

    def close(self):
        self.sock.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_line(self, text):
        self.sock.sendall(text.encode("utf-8") + b"\n")

    def read_line(self, timeout=TIMEOUT):
        """Return the next line (str, no LF); None if the server closed."""
        deadline = time.monotonic() + timeout
        while not self.lines:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no line within %.1fs; lines so far: %r"
                                     % (timeout, self.seen[-10:]))
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except (ConnectionResetError, ssl.SSLEOFError):
                data = b""
            if not data:
                return None
            *complete, self.buf = (self.buf + data).split(b"\n")
            self.lines.extend(complete)
        text = self.lines.popleft().decode("utf-8")
        self.seen.append(text)
        return text

    def expect(self, *lines):
        """The next lines must be exactly these."""
        for line in lines:
            got = self.read_line()
            if got != line:
                raise AssertionError("expected %r, got %r; before it: %r"
                                     % (line, got, self.seen[-10:-1]))

    def wait_for(self, line):
        """Skip lines until this one; return the ones skipped."""
        skipped = []
        while True:
            got = self.read_line()
            if got is None:
                raise AssertionError("closed before %r; got %r" % (line, skipped))
            if got == line:
                return skipped
            skipped.append(got)

    def expect_closed(self):
        """Read to the end; return the lines that came before it."""
        lines = []
        while True:
            got = self.read_line()
            if got is None:
                return lines
            lines.append(got)

    def wait_for_kind(self, kind, **fields):
        """Skip lines until one of this kind with these fields (as the
        server's FORMATS make it, wherever the wording changes); return it."""
        while True:
            got = self.read_line()
            if got is None:
                raise AssertionError("closed before a %s line %r" % (kind, fields))
            parsed_kind, parsed = chat.parse_server_line(got)
            if parsed_kind == kind and all(parsed.get(name) == str(value)
                                           for name, value in fields.items()):
                return got

    def expect_nothing(self, quiet=QUIET):
        """Nothing may arrive for a moment (used only where absence is the point)."""
        if self.lines:
            raise AssertionError("expected nothing, got %r" % list(self.lines))
        self.sock.settimeout(quiet)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        raise AssertionError("expected nothing, got %r" % (self.buf + data))

    def sync(self, token="sync"):
        """Barrier: every line sent before has been handled; return lines before it."""
        self.send_line("/ping " + token)
        return self.wait_for("*** pong " + token)


class ServerTestCase(unittest.TestCase):
    """Starts a server in a thread on port 0; connects peers to it."""

    peer_options = {}  # passed to every Peer (tls=...)

    def start_server(self, tls=False, password=None, op_password=None, replay=None,
                     store=None, operators=(), motd=(), **limits):
        context = None
        if tls:
            context, _ = chat.server_tls_context(write_file(self, "cert.pem", TEST_CERT),
                                                 write_file(self, "key.pem", TEST_KEY))
            client_context = ssl.create_default_context(cadata=TEST_CERT)
            self.peer_options = {"tls": client_context}
        options = {"replay": replay} if replay is not None else {}
        server = serve_in_thread(self, limits=chat.Limits(**limits), tls_context=context,
                                 password=password, op_password=op_password, store=store,
                                 operators=operators, motd=motd, **options)
        self.server = server
        self.port = server.address[1]
        return server

    def connect(self, **kwargs):
        peer = Peer(self.port, **dict(self.peer_options, **kwargs))
        self.addCleanup(peer.close)
        return peer

    def greeted(self, **kwargs):
        """A connected peer that has read the greeting."""

        peer = self.connect(**kwargs)
        line = ""
        while not line.startswith("*** choose a nickname"):
            line = peer.read_line()
            self.assertTrue(line and line.startswith("*** "), line)
        return peer

    def join(self, nick, **kwargs):
        """A registered peer; its own join line has been read."""
        peer = self.greeted(**kwargs)
        peer.send_line(nick)
        line = peer.read_line()
        self.assertRegex(line, r"^\*\*\* %s joined \(\d+ online\)$" % nick)
        return peer

    def join_all(self, *nicks):
        """Register several peers; each has read every join line up to the last."""
        peers = []
        for nick in nicks:
            peers.append(self.join(nick))
            for earlier in peers[:-1]:
                earlier.wait_for("*** %s joined (%d online)" % (nick, len(peers)))
        return peers


def run_chat(*args, stdin=b"", timeout=TIMEOUT, env=None):
    """Run chat.py as a subprocess; return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, CHAT_PY] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, env=env, cwd=WORK_DIR)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


# --- Protocol: pure functions ---------------------------------------------------

class TelnetTest(unittest.TestCase):

    def strip(self, *chunks):
        state, out = chat.TELNET_START, b""
        for chunk in chunks:
            data, state = chat.strip_telnet(chunk, state)
            out += data
        return out

    def test_plain_bytes_pass_through(self):
        self.assertEqual(self.strip(b"hello\r\n"), b"hello\r\n")

    def test_option_negotiation_drops_three_bytes(self):
        for verb in (0xFB, 0xFC, 0xFD, 0xFE):
            self.assertEqual(self.strip(b"a\xff" + bytes([verb]) + b"\x01b"), b"ab")

    def test_subnegotiation_is_dropped_whole(self):
        self.assertEqual(self.strip(b"a\xff\xfa\x18\x00xterm\xff\xf0b"), b"ab")

    def test_a_subnegotiation_ends_after_512_bytes(self):
        endless = b"\xff\xfa" + b"x" * 511
        self.assertEqual(self.strip(endless + b"yhello\n"), b"hello\n")
        self.assertEqual(self.strip(*[bytes([b]) for b in endless + b"yhi\n"]), b"hi\n")
        self.assertEqual(self.strip(b"\xff\xfa" + b"x" * 509 + b"\xff\xf0ok\n"), b"ok\n")

    def test_other_commands_drop_two_bytes(self):
        self.assertEqual(self.strip(b"a\xff\xf4b\xff\xffc"), b"abc")

    def test_iac_before_lf_keeps_the_line_end(self):
        self.assertEqual(self.strip(b"a\xff\nb"), b"a\nb")

    def test_ctrl_c_sequence_vanishes_even_one_byte_at_a_time(self):
        data = b"hi\xff\xf4\xff\xfd\x06 there\n"
        self.assertEqual(self.strip(data), b"hi there\n")
        self.assertEqual(self.strip(*[bytes([b]) for b in data]), b"hi there\n")


    def test_do_timing_mark_is_answered_wont_and_nothing_else_is(self):
        # telnet after the 0x9C of "Ü": deaf until answered (docs/protocol.md, "Transport")
        for chunks in ([b"\xc3\x9c\xff\xfd\x06!\n"], [bytes([b]) for b in
                                                         b"\xc3\x9c\xff\xfd\x06!\n"]):
            state, out, answers = chat.TELNET_START, b"", bytearray()
            for chunk in chunks:
                data, state = chat.strip_telnet(chunk, state, answers)
                out += data
            self.assertEqual((out, bytes(answers)), ("Ü!\n".encode(), b"\xff\xfc\x06"))
        answers = bytearray()
        chat.strip_telnet(b"\xff\xfb\x06\xff\xfd\x01\xff\xfa\x06\xff\xf0", answers=answers)
        self.assertEqual(answers, b"")  # WILL TM, DO ECHO, a subnegotiation: no answer

class LineReaderTest(unittest.TestCase):

    def lines(self, reader):
        out = []
        while True:
            line = reader.pop_line()
            if line is None:
                return out
            out.append("TOO_LONG" if line is chat.TOO_LONG else line)

    def test_frames_lf_crlf_and_partial_lines(self):
        reader = chat.LineReader(100)
        reader.feed(b"one\r\ntwo\nthr")
        self.assertEqual(self.lines(reader), [b"one", b"two"])
        reader.feed(b"ee\n")
        self.assertEqual(self.lines(reader), [b"three"])

    def test_a_line_of_exactly_the_limit_is_accepted_with_either_line_end(self):
        reader = chat.LineReader(10)
        reader.feed(b"x" * 10 + b"\r\n" + b"y" * 10 + b"\n")
        self.assertEqual(self.lines(reader), [b"x" * 10, b"y" * 10])

    def test_a_line_over_the_limit_is_refused_once_and_discarded(self):
        reader = chat.LineReader(10)
        reader.feed(b"x" * 11 + b"\nok\n")
        self.assertEqual(self.lines(reader), ["TOO_LONG", b"ok"])

    def test_an_unfinished_overlong_line_is_not_kept(self):
        reader = chat.LineReader(10)
        reader.feed(b"x" * 12)
        self.assertEqual(self.lines(reader), ["TOO_LONG"])
        for _ in range(100):
            reader.feed(b"x" * 1000)
            self.assertEqual(self.lines(reader), [])
            self.assertEqual(len(reader.buf), 0)
        reader.feed(b"xx\nafter\n")
        self.assertEqual(self.lines(reader), [b"after"])

    def test_a_lone_cr_inside_a_line_is_kept_for_cleaning(self):
        reader = chat.LineReader(100)
        reader.feed(b"a\rb\n")
        self.assertEqual(self.lines(reader), [b"a\rb"])


class CleanTextTest(unittest.TestCase):

    def test_controls_and_invisible_marks_are_removed(self):
        for ch in ["\x00", "\x07", "\x1b", "\r", "\x7f", "\x85", "\x9b", "\u061c",
                   "\u200b", "\u200e", "\u200f", "\u202a", "\u202e", "\u2060",
                   "\u2064", "\u2066", "\u2069", "\ufeff"]:
            self.assertEqual(chat.clean_text("a%sb" % ch), "ab", repr(ch))

    def test_tab_and_unicode_line_breaks_become_spaces(self):
        self.assertEqual(chat.clean_text("a\tb\u2028c\u2029d"), "a b c d")

    def test_joiners_and_ordinary_text_stay(self):
        for text in ["👨\u200d👩\u200d👧", "क्\u200dष", "naïve café", "日本語"]:
            self.assertEqual(chat.clean_text(text), text)

    def test_decode_line_replaces_each_invalid_sequence(self):
        self.assertEqual(chat.decode_line(b"a\xffb\xc3(c\xe2\x82  "), "a\ufffdb\ufffd(c\ufffd")


class NickTest(unittest.TestCase):

    def test_valid_nicknames(self):
        for nick in ["bob", "B0b_-x", "Zoë", "日本", "Ωμέγα", "Андрей", "x" * 24, "a-"]:
            self.assertIsNone(chat.nick_problem(nick), nick)

    def test_invalid_nicknames(self):
        for nick in ["", "x" * 25, "-bob", "bob smith", "bob!", "b/b", "аlice",
                     "Ωmega", "a\u3164", "\u115fbob", "\uffa0"]:
            self.assertIsNotNone(chat.nick_problem(nick), nick)

    def test_clash_key_folds_case_and_width(self):
        self.assertEqual(chat.nick_key("Bob"), chat.nick_key("bob"))
        self.assertEqual(chat.nick_key("Ｂob"), chat.nick_key("bob"))
        self.assertNotEqual(chat.nick_key("bob"), chat.nick_key("bob2"))


class ParseLineTest(unittest.TestCase):

    def test_parse(self):
        self.assertEqual(chat.parse_line("hello"), (None, "hello"))
        self.assertEqual(chat.parse_line("//etc"), (None, "/etc"))
        self.assertEqual(chat.parse_line("/ME  waves "), ("me", "waves"))
        self.assertEqual(chat.parse_line("/nick two words"), ("nick", "two words"))
        self.assertEqual(chat.parse_line("/who"), ("who", ""))

    def test_every_server_line_kind_has_its_prefix(self):
        f = chat.format_line
        self.assertEqual(f("message", nick="a", text="t"), "<a> t")
        self.assertEqual(f("action", nick="a", text="t"), "* a t")
        self.assertEqual(f("private", nick="a", text="t"), "*a* t")
        self.assertEqual(f("private_echo", nick="a", text="t"), "-> *a* t")
        self.assertEqual(chat.encode_line("é"), "é\n".encode("utf-8"))


class JsonToTextTest(unittest.TestCase):
    """line_from_json undoes json_object: the client shows, from JSON, the
    very line text mode would have sent."""

    WHEN = calendar.timegm((2026, 12, 1, 14, 3, 5, 0, 0, 0))

    def round_trip(self, line, me="al", topic_asked=False):
        obj = json.loads(chat.json_bytes(line).decode())
        return chat.line_from_json(obj, me, topic_asked)

    def test_every_kind_comes_back_as_its_text_line(self):
        f = chat.format_line
        cases = [
            f("message", nick="bob", text="hi {there}").having(id=3, room="#lobby"),
            f("action", nick="bob", text="waves").having(id=4, room="#lobby"),
            f("private", nick="bob", text="psst").having(to="al"),
            f("private_echo", nick="bob", text="hey").having(**{"from": "al"}),
            f("joined", nick="bob", count=2).having(room="#lobby"),
            f("joined_room", nick="bob", room="#rust", count=1),
            f("left", nick="bob", reason="went to #rust").having(room="#lobby"),
            f("renamed", old="bob", new="rob").having(room="#lobby"),
            f("who", count=2, room="#lobby", nicks="@al, bob").having(
                members=[("al", True, False), ("bob", False, False)]),
            f("who", count=3, room="#lobby", nicks="@al (away), bob, cy (away)").having(
                members=[("al", True, True), ("bob", False, False), ("cy", False, True)]),
            f("who", count=0, room="#empty", nicks="").having(members=[]),
            f("talking_in", room="#rust"),
            f("no_room"),
            f("away_set", text="lunch, back at 2"),
            f("away_back"),
            f("is_away", nick="bob", text="lunch"),
            f("rooms", count=3, rooms="2 rooms", list="#lobby (2), #rust (1)"),
            f("topic_set", nick="bob", text="rust!").having(room="#rust"),
            f("topic_cleared", nick="bob").having(room="#rust"),
            f("pong", token="abc def"),
            f("kicked", nick="bob", op="al", reason="no reason given").having(room="#lobby"),
            f("banned", nick="bob", op="al", reason="spam").having(room="#lobby"),
            f("muted", nick="bob", op="al").having(room="#lobby"),
            f("unmuted", nick="bob", op="al").having(room="#lobby"),
            f("opped", nick="al").having(room="#lobby"),
            chat.notice("welcome to chat.py (1 online)"),
            chat.error("nick_taken", nick="bob"),
            f("history", time="2026-12-01 14:03",
              line=f("message", nick="bob", text="old")).having(
                  id=9, room="#lobby", nick="bob", kind="message", text="old", when=self.WHEN),
            f("history", time="2026-12-01 14:03",
              line=f("private", nick="bob", text="while away")).having(
                  offline=True, to="al", text="while away", when=self.WHEN, **{"from": "bob"}),
        ]
        for line in cases:
            with self.subTest(line=str(line)):
                back = self.round_trip(line)
                self.assertEqual(str(back), str(line))
                self.assertEqual(back.kind, line.kind)  # known, not parsed again

    def test_every_error_is_made_by_name_and_its_code_is_known_from_its_text(self):
        for name, (code, template) in chat.ERRORS.items():
            fields = {field: "x1" for _, field, _, _ in string.Formatter().parse(template)
                      if field}
            line = chat.error(name, **fields)
            with self.subTest(name=name):
                self.assertTrue(line.startswith("!!! "))
                self.assertEqual(json.loads(chat.json_bytes(line))["code"], code)
                self.assertEqual(chat.error_code(line[len("!!! "):]), code)  # a text line's
        self.assertEqual(chat.error_code("something else went wrong"), "not_sent")

    def test_a_topic_is_the_standing_one_when_asked_for_and_a_change_when_not(self):
        asked = chat.format_line("topic", room="#rust", text="rust!", nick="bob")
        self.assertEqual(str(self.round_trip(asked, topic_asked=True)), str(asked))
        none = chat.format_line("no_topic", room="#rust")
        self.assertEqual(str(self.round_trip(none, topic_asked=True)), str(none))
        self.assertEqual(str(self.round_trip(asked)), "*** bob set the topic: rust!")

    def test_strings_from_a_server_are_cleaned_and_junk_is_no_line(self):
        obj = chat.clean_json(json.loads(json.dumps({
            "type": "message", "id": 1, "room": "#lobby", "nick": "bob",
            "text": "\x1b[2Jx\x9b2J"})))
        self.assertNotIn("\x1b", str(chat.line_from_json(obj)))
        for junk in ({}, {"type": "nonsense"}, {"type": "message"}, {"type": "history_end"}):
            self.assertIsNone(chat.line_from_json(junk))


class ClientDisplayTest(unittest.TestCase):
    """What the client makes of a line: colours, bell, nicks, completion."""

    class FakeOut:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    def test_colour_rules(self):
        tty, pipe = self.FakeOut(True), self.FakeOut(False)
        self.assertTrue(chat.use_color("auto", tty, {"TERM": "xterm"}))
        self.assertFalse(chat.use_color("auto", tty, {"TERM": "xterm", "NO_COLOR": "1"}))
        self.assertTrue(chat.use_color("auto", tty, {"TERM": "xterm", "NO_COLOR": ""}))
        self.assertFalse(chat.use_color("auto", pipe, {"TERM": "xterm"}))
        self.assertTrue(chat.use_color("always", pipe, {"NO_COLOR": "1"}))
        self.assertFalse(chat.use_color("never", tty, {}))

    def test_rendering(self):
        render = chat.render_line
        self.assertEqual(render("<bob> hi", "al", color=False), "<bob> hi")
        coloured = render("<bob> hi", "al", color=True)
        self.assertEqual(coloured, "<\x1b[%dmbob\x1b[0m> hi" % chat.nick_color("bob"))
        self.assertEqual(chat.nick_color("Bob"), chat.nick_color("bob"))  # stable, by key
        self.assertIn("\x1b[1m", render("<al> me", "al", color=True))   # your own nick
        self.assertIn("\x1b[1;7mhey AL!", render("<bob> hey AL!", "al", color=True))
        self.assertEqual(render("*** x", "al", color=True), "\x1b[2m*** x\x1b[0m")
        self.assertEqual(render("!!! x", "al", color=True), "\x1b[31m!!! x\x1b[0m")
        self.assertEqual(render("*bob* psst", "al", color=True), "\x1b[1;35m*bob* psst\x1b[0m")
        self.assertEqual(render("-> *bob* psst", "al", color=True),
                         "\x1b[1;35m-> *bob* psst\x1b[0m")

    def test_bell_on_a_private_message_or_a_mention_by_someone_else(self):
        self.assertTrue(chat.wants_bell("*bob* psst", "al"))
        self.assertTrue(chat.wants_bell("<bob> al: look", "al"))
        self.assertTrue(chat.wants_bell("* bob pokes Al", "al"))
        self.assertFalse(chat.wants_bell("<bob> alice is here", "al"))  # not the word
        self.assertFalse(chat.wants_bell("<al> al says", "al"))        # yourself
        self.assertFalse(chat.wants_bell("*** al joined (2 online)", "al"))

    def test_nicks_follow_joins_leaves_renames_and_who(self):
        nicks = {}
        for line in ["*** 3 in #lobby: @alice, bob, Carol", "*** dave joined (4 online)",
                     "*** bob left (quit)", "*** Carol is now known as Caz",
                     "*** dave was kicked by alice (spam)", "<eve> hi"]:
            chat.track_nicks(nicks, line)
        self.assertEqual(sorted(nicks.values(), key=str.casefold), ["alice", "Caz", "eve"])

    def test_completion_candidates(self):
        nicks = {chat.nick_key(n): n for n in ["alice", "Alfred", "bob"]}
        rooms = {"#lobby", "#rust", "#Ruby"}
        complete = chat.completions
        self.assertEqual(complete("al", "hi ", nicks), ["Alfred", "alice"])
        self.assertEqual(complete("AL", "", nicks), ["Alfred", "alice"])
        self.assertEqual(complete("/m", "", nicks), ["/me", "/msg"])
        self.assertEqual(complete("/r", "", nicks), ["/register", "/reply", "/rooms"])
        self.assertEqual(complete("/m", "say ", nicks), [])
        self.assertEqual(complete("r", "/join ", nicks, rooms=rooms), ["#Ruby", "#rust"])
        self.assertEqual(complete("#l", "/JOIN ", nicks, rooms=rooms), ["#lobby"])

    def test_a_line_is_parsed_into_its_kind_and_fields(self):
        parse = chat.parse_server_line
        self.assertEqual(parse("<bob> <x> y"), ("message", {"nick": "bob", "text": "<x> y"}))
        self.assertEqual(parse("* bob waves"), ("action", {"nick": "bob", "text": "waves"}))
        self.assertEqual(parse("*bob* hi"), ("private", {"nick": "bob", "text": "hi"}))
        self.assertEqual(parse("-> *bob* hi"), ("private_echo", {"nick": "bob", "text": "hi"}))
        self.assertEqual(parse("*** x"), ("notice", {"text": "x"}))
        self.assertEqual(parse("!!! x"), ("error", {"text": "x"}))
        self.assertEqual(parse("<not a nick> x")[0], "other")

    def test_every_line_the_server_writes_parses_back_to_its_kind_and_fields(self):
        # One table both ways: a wording changed in FORMATS changes both.
        samples = {"nick": "bob", "old": "bob", "new": "Bob2", "op": "alice", "count": "3",
                   "text": "hi there", "reason": "no reason given", "nicks": "@alice, bob",
                   "token": "t1", "room": "#rust", "rooms": "2 rooms",
                   "list": "#lobby (2), #rust (1)", "messages": "1 message",
                   "time": "2026-12-01 14:03", "line": "<bob> hi", "after": "42"}
        for kind, template in chat.FORMATS.items():
            names = [field for _, field, _, _ in string.Formatter().parse(template) if field]
            fields = {name: samples[name] for name in names}
            self.assertEqual(chat.parse_server_line(chat.format_line(kind, **fields)),
                             (kind, fields))

    def test_the_clients_commands_come_from_the_servers_help(self):
        self.assertEqual(set(chat.SERVER_COMMANDS + chat.OPERATOR_COMMANDS + ("/op",)),
                         {"/" + name for name, command in chat.COMMANDS.items()
                          if name != "pass" and command.who != chat.IRC_CLIENTS})
        for name in chat.COMMANDS:  # each row of the table has its handler
            self.assertTrue(callable(getattr(chat.Chat, "_cmd_" + name, None)), name)


# --- Chat: in-process, no sockets ------------------------------------------------

class FakeLoop:
    """What the Chat sees of the server loop (every method of the interface
    ChatServer's docstring lists), recording what it is asked to do."""

    def __init__(self):
        self.fanout = chat.FanOut()
        self.sent = collections.defaultdict(list)   # conn -> its lines (text)
        self.closed = []

    def send(self, conn, text):
        self.sent[conn].append(text)

    def broadcast(self, room, text):
        for member in room.members.values():
            self.sent[member].append(text)

    def enter(self, room, conn):
        self.fanout.enter(room, conn)

    def leave(self, room, conn):
        self.fanout.leave(room, conn)

    def rekey(self, room, conn, old_key):
        self.fanout.rekey(room, conn, old_key)

    def focus(self, conn, room):
        conn.focus = room

    def then(self, action):
        action()

    def off_loop(self, conn, work, done, lane=None):
        try:
            result = work()
        except Exception as exc:  # as the worker thread hands it back
            result = exc
        done(result)

    def pause_input(self, conn):
        pass

    def resume_input(self, conn):
        pass

    def when_written(self, conn, action):
        action()

    def close(self, conn, delay=0.0):
        conn.phase = chat.CLOSING
        self.closed.append((conn, delay))

    def log(self, text, always=False):
        pass

    def call_later(self, delay, function, conn=None):
        pass


class ChatInProcessTest(unittest.TestCase):
    """Registration and commands driven straight into Chat: no loop, no sockets."""

    def setUp(self):
        self.loop = FakeLoop()
        self.chat = chat.Chat(self.loop, chat.Limits(), op_password="0p")
        self.port = 40000

    def connect(self):
        self.port += 1
        conn = chat.Connection(None, ("127.0.0.1", self.port), self.chat.limits, 0.0)
        self.chat.connected(conn)
        return conn

    def say(self, conn, text):
        """Send a line as conn; return what conn got for it."""
        before = len(self.loop.sent[conn])
        self.chat.handle_line(conn, text.encode("utf-8"))
        return self.loop.sent[conn][before:]

    def test_phases_from_nickname_to_member(self):
        conn = self.connect()
        self.assertEqual(conn.phase, chat.NICKNAME)
        self.assertEqual(self.loop.sent[conn][-1],
                         "*** choose a nickname: 1-24 letters, digits, _ or -")
        self.assertEqual(self.say(conn, "/who"), ["!!! choose a nickname first"])
        self.assertEqual(self.say(conn, "alice"), ["*** alice joined (1 online)"])
        self.assertEqual(conn.phase, chat.MEMBER)
        self.assertIs(conn.room, self.chat.lobby)

    def test_a_password_room_starts_in_the_password_phase(self):
        self.chat.password = "s3cret"
        conn = self.connect()
        self.assertEqual(conn.phase, chat.PASSWORD)
        self.assertEqual(self.say(conn, "alice"), ["!!! " + chat.PASSWORD_REQUIRED])
        self.assertEqual(self.say(conn, "/pass nope"), ["!!! wrong password"])
        self.assertEqual(self.loop.closed, [(conn, chat.WRONG_PASSWORD_DELAY_S)])
        self.assertEqual(self.say(conn, "/pass s3cret"), [])  # closing: nothing handled

    def test_commands_reach_the_room_or_the_sender(self):
        alice, bob = self.connect(), self.connect()
        self.say(alice, "alice")
        self.say(bob, "bob")
        self.assertEqual(self.say(alice, "/msg BOB hi"), ["-> *bob* hi"])
        self.assertEqual(self.loop.sent[bob][-1], "*alice* hi")
        self.assertEqual(self.say(bob, "/nick Robert"), ["*** bob is now known as Robert"])
        self.assertEqual(self.loop.sent[alice][-1], "*** bob is now known as Robert")
        self.assertEqual(self.say(alice, "/who"), ["*** 2 in #lobby: alice, Robert"])
        self.assertEqual(self.say(alice, "/op 0p"), ["*** alice is now an operator"])
        self.assertEqual(self.say(alice, "/ban robert"),
                         ["*** Robert was banned by alice (no reason given)"])
        self.assertEqual(self.chat.store.bans(), [("127.0.0.1", "Robert")])
        self.assertEqual(self.chat.refusal(self.connect()), "!!! you are banned")
        self.assertEqual(self.say(alice, "/who"), ["*** 1 in #lobby: @alice"])


# --- Server: registration ---------------------------------------------------------

class RegistrationTest(ServerTestCase):

    def setUp(self):
        self.start_server()

    def test_greeting_asks_for_a_nickname_and_join_counts_the_newcomer(self):
        alice = self.join("alice")
        bob = self.greeted()
        bob.send_line("bob")
        bob.expect("*** bob joined (2 online)")
        alice.expect("*** bob joined (2 online)")

    def test_unregistered_connection_gets_no_chat_and_is_not_counted(self):
        alice = self.join("alice")
        lurker = self.greeted()
        alice.send_line("secret")
        alice.expect("<alice> secret")
        alice.send_line("/who")
        alice.expect("*** 1 in #lobby: alice")
        lurker.expect_nothing()

    def test_nickname_is_cleaned_and_trimmed_blank_lines_ignored(self):
        peer = self.greeted()
        peer.send_raw(b"\n   \n\x1b\n  bob\x1b  \n")
        peer.expect("*** bob joined (1 online)")

    def test_nick_command_registers(self):
        peer = self.greeted()
        peer.send_line("/NICK carol")
        peer.expect("*** carol joined (1 online)")

    def test_commands_before_registration(self):
        peer = self.greeted()
        peer.send_line("/who")
        peer.expect("!!! choose a nickname first")
        peer.send_line("/nick")
        self.assertTrue(peer.read_line().startswith("!!! usage: /nick"))
        peer.send_line("/quit")
        self.assertEqual(peer.expect_closed(), [])

    def test_invalid_nickname_gets_an_error_and_another_try(self):
        peer = self.greeted()
        for bad in ["-x", "x" * 25, "two words", "аlice", "bob\u3164"]:
            peer.send_line(bad)
            line = peer.read_line()
            self.assertTrue(line.startswith("!!! "), (bad, line))
        peer.send_line("good")
        peer.expect("*** good joined (1 online)")

    def test_taken_nickname_ignores_case_and_width(self):
        self.join("Bob")
        peer = self.greeted()
        for same in ["bob", "BOB", "Ｂob"]:
            peer.send_line(same)
            line = peer.read_line()
            self.assertTrue(line.startswith("!!! ") and "taken" in line, line)
        peer.send_line("bob2")
        peer.expect("*** bob2 joined (2 online)")


# --- Server: every row of the table of client lines -------------------------------

class CommandTest(ServerTestCase):

    def setUp(self):
        self.start_server()
        self.alice, self.bob = self.join_all("alice", "bob")

    def test_message_reaches_everyone_sender_included(self):
        self.alice.send_line("hello there")
        self.alice.expect("<alice> hello there")
        self.bob.expect("<alice> hello there")

    def test_double_slash_sends_a_slash(self):
        self.alice.send_line("//etc/passwd is a file")
        self.bob.expect("<alice> /etc/passwd is a file")

    def test_me(self):
        self.alice.send_line("/me waves")
        self.bob.expect("* alice waves")
        self.alice.expect("* alice waves")
        self.alice.send_line("/ME")
        self.alice.expect("!!! usage: /me TEXT")

    def test_msg(self):
        self.alice.send_line("/msg BOB psst, hi")
        self.bob.expect("*alice* psst, hi")
        self.alice.expect("-> *bob* psst, hi")
        self.alice.send_line("/msg nobody hi")
        self.alice.expect("!!! no such user: nobody")
        self.alice.send_line("/msg bob")
        self.alice.expect("!!! usage: /msg NICK TEXT")
        self.assertEqual(self.bob.sync(), [])

    def test_nick(self):
        self.alice.send_line("/nick Alicia")
        self.alice.expect("*** alice is now known as Alicia")
        self.bob.expect("*** alice is now known as Alicia")
        self.alice.send_line("/nick ALICIA")  # only the case differs: allowed
        self.bob.expect("*** Alicia is now known as ALICIA")
        self.alice.wait_for("*** Alicia is now known as ALICIA")
        self.alice.send_line("/nick Bob")
        self.assertIn("taken", self.alice.read_line())
        self.alice.send_line("/nick two words")
        self.assertTrue(self.alice.read_line().startswith("!!! invalid nickname"))
        self.alice.send_line("/nick")
        self.alice.expect("!!! usage: /nick NEW")
        self.bob.send_line("hi")
        self.alice.expect("<bob> hi")
        self.bob.send_line("/msg alicia x")
        self.alice.expect("*bob* x")

    def test_who_is_sorted_without_regard_to_case(self):
        self.join("Carol")
        self.alice.send_line("/who")
        self.alice.wait_for("*** 3 in #lobby: alice, bob, Carol")

    def test_help_is_notices_only(self):
        self.alice.send_line("/help")
        lines = self.alice.sync()
        self.assertGreaterEqual(len(lines), 7)
        self.assertTrue(all(line.startswith("*** ") for line in lines), lines)
        text = "\n".join(lines)
        for command in ["/me", "/msg", "/nick", "/who", "/ping", "/quit", "/help"]:
            self.assertIn(command, text)

    def test_ping_answers_with_the_token(self):
        self.alice.send_line("/ping abc 123")
        self.alice.expect("*** pong abc 123")
        self.alice.send_line("/ping")
        self.alice.expect("*** pong")

    def test_quit_with_and_without_reason(self):
        self.alice.send_line("/quit gone fishing")
        self.assertEqual(self.alice.expect_closed(), [])
        self.bob.expect("*** alice left (gone fishing)")
        carol = self.join("carol")
        self.bob.expect("*** carol joined (2 online)")
        carol.send_line("/QUIT")
        carol.expect_closed()
        self.bob.expect("*** carol left (quit)")

    def test_closing_without_quit_is_announced(self):
        self.alice.close()
        self.bob.expect("*** alice left (connection closed)")

    def test_unknown_command(self):
        self.alice.send_line("/frobnicate now")
        self.alice.expect("!!! unknown command /frobnicate (try /help)")

    def test_empty_and_blank_lines_do_nothing(self):
        self.alice.send_raw(b"\n \r\n\t\n\x1b\n")
        self.assertEqual(self.alice.sync(), [])
        self.assertEqual(self.bob.sync(), [])

    def test_trailing_whitespace_removed_leading_kept(self):
        self.alice.send_line("   indented   ")
        self.bob.expect("<alice>    indented")


# --- Server: bad input ------------------------------------------------------------

class BadInputTest(ServerTestCase):

    def setUp(self):
        self.start_server()
        self.alice, self.bob = self.join_all("alice", "bob")

    def test_escape_sequences_and_lone_cr_never_reach_a_terminal(self):
        self.alice.send_raw("\x1b[2J\x1b]0;owned\x07red\x9b31m\rfake\u202eabc\u200dz\n"
                            .encode("utf-8"))
        line = self.bob.read_line()
        self.assertEqual(line, "<alice> [2J]0;ownedred31mfakeabc\u200dz")

    def test_invalid_utf8_becomes_replacement_characters(self):
        self.alice.send_raw(b"caf\xe9 \xfe\xfd ok \xed\xa0\x80 \xc3\n")
        self.bob.expect("<alice> caf\ufffd \ufffd\ufffd ok \ufffd\ufffd\ufffd \ufffd")

    def test_bytes_one_at_a_time(self):
        for byte in "slow é\r\n".encode("utf-8"):
            self.alice.send_raw(bytes([byte]))
        self.bob.expect("<alice> slow é")

    def test_telnet_commands_are_dropped(self):
        self.alice.send_raw(b"\xff\xfb\x01\xff\xfd\x03hel\xff\xf4\xff\xfd\x06lo\r\n")
        self.bob.expect("<alice> hello")

    def test_binary_junk_disturbs_nobody(self):
        junk = bytes(range(256)) * 8 + bytes(reversed(range(256))) * 8
        self.alice.send_raw(junk.replace(b"\xff", b"") + b"\n")
        line = self.bob.read_line()
        self.assertTrue(line.startswith("<alice> "))
        self.assertFalse(any(ord(ch) < 32 or 0x7f <= ord(ch) < 0xa0 for ch in line))
        self.alice.send_line("still here")
        self.bob.wait_for("<alice> still here")
        self.assertEqual(self.bob.sync(), [])

    def test_identity_cannot_be_spoofed(self):
        self.alice.send_raw(b"<bob> I owe alice money\r*** bob left (quit)\n")
        self.bob.expect("<alice> <bob> I owe alice money*** bob left (quit)")
        self.alice.send_raw(b"hi\n<bob> fake\n")
        self.bob.expect("<alice> hi", "<alice> <bob> fake")

    def test_line_too_long_is_refused_and_the_connection_stays(self):
        self.alice.send_raw(b"x" * 4096 + b"\r\n")
        self.bob.expect("<alice> " + "x" * 4096)
        self.alice.send_raw(b"y" * 4097 + b"\n")
        self.alice.wait_for("!!! line too long (max 4096 bytes)")
        self.alice.send_line("after")
        self.bob.expect("<alice> after")

    def test_an_endless_line_is_not_buffered(self):
        for _ in range(64):
            self.alice.send_raw(b"z" * 8192)
        self.alice.wait_for("!!! line too long (max 4096 bytes)")
        self.alice.send_raw(b"\n")
        self.alice.sync()
        held = [len(conn.reader.buf) for conn in list(self.server.conns)]
        self.assertLessEqual(max(held), 4097)
        self.bob.expect_nothing()


# --- Server: the guarantees -------------------------------------------------------

STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] "   # a history line's time


class TelnetUserTest(ServerTestCase):

    def test_a_telnet_user_typing_u_umlaut_keeps_seeing_the_chat(self):
        self.start_server()
        al, bob = self.join("al"), self.join("bob")
        al.wait_for("*** bob joined (2 online)")
        # What GNU telnet (Debian's) sends for "Über Ü": 0x9C as IAC BRK, then
        # DO TIMING-MARK; and for "у я Ú ă" likewise with IP, AO, SUSP.
        al.send_raw(b"\xc3\xff\xf3\xff\xfd\x06ber \xc3\xff\xf3\xff\xfd\x06\r\n")
        reply = al.sock.recv(6)
        self.assertEqual(reply, b"\xff\xfc\x06" * 2)  # WONT TIMING-MARK, at once
        bob.wait_for("<al> Über Ü")
        al.wait_for("<al> Über Ü")
        al.send_raw(b"\xd1\xff\xf4\xff\xfd\x06 \xd1\xff\xf5\xff\xfd\x06 \xc3\xff\xed"
                    b"\xff\xfd\x06 \xc4\xff\xf4\xff\xfd\x06 \xe3\xff\xf4\xff\xf4\r\n")
        bob.wait_for("<al> у я Ú ă ッ")  # (ッ is E3 83 83: both 0x83 sent as IAC IP)


class RoomTest(ServerTestCase):
    """docs/protocol.md, "Rooms"."""

    def setUp(self):
        self.start_server(op_password="0p")
        self.alice, self.bob, self.carol = self.join_all("alice", "bob", "carol")

    def test_join_tells_the_old_room_the_new_room_and_the_joiner(self):
        self.bob.send_line("/join rust")
        self.bob.expect("*** bob joined #rust (1 here)")
        self.alice.expect("*** bob left (went to #rust)")
        self.carol.expect("*** bob left (went to #rust)")
        self.alice.send_line("/JOIN #Rust")
        self.alice.expect("*** alice joined #rust (2 here)")  # the first spelling stays
        self.bob.expect("*** alice joined #rust (2 here)")
        self.carol.expect("*** alice left (went to #rust)")

    def test_join_refusals(self):
        self.bob.send_line("/join")
        self.bob.expect("!!! usage: /join ROOM")
        self.bob.send_line("/join #no spaces")
        self.bob.expect("!!! invalid room name: #no spaces (# and 1-32 letters, digits, _ or -)")
        self.bob.send_line("/join #" + "x" * 33)
        self.assertTrue(self.bob.read_line().startswith("!!! invalid room name: "))
        self.bob.send_line("/join #LOBBY")
        self.bob.expect("!!! you are already in #lobby")
        self.assertEqual(self.alice.sync(), [])

    def test_lines_stay_in_their_room_private_messages_do_not(self):
        self.bob.send_line("/join #rust")
        self.bob.expect("*** bob joined #rust (1 here)")
        self.bob.send_line("hello rust")
        self.bob.expect("<bob> hello rust")
        self.bob.send_line("/me waves")
        self.bob.expect("* bob waves")
        self.bob.send_line("/nick robert")
        self.bob.expect("*** bob is now known as robert")
        self.bob.send_line("/msg alice psst")
        self.bob.expect("-> *alice* psst")
        self.assertEqual(self.alice.sync(), ["*** bob left (went to #rust)", "*robert* psst"])
        self.bob.close()
        self.assertEqual(self.alice.sync("2"), [])  # leaving #rust is told to #rust

    def test_rooms_and_who(self):
        self.alice.send_line("/rooms")
        self.alice.expect("*** 3 online in 1 room: #lobby (3)")
        self.bob.send_line("/join #rust")
        self.carol.send_line("/join #Ada")
        self.carol.wait_for("*** carol joined #Ada (1 here)")
        self.bob.wait_for("*** bob joined #rust (1 here)")
        self.alice.send_line("/op 0p")
        self.alice.send_line("/join #rust")
        self.alice.wait_for("*** alice joined #rust (2 here)")
        self.alice.send_line("/rooms")
        self.alice.expect("*** 3 online in 2 rooms: #rust (2), #Ada (1)")
        self.alice.send_line("/who")
        self.alice.expect("*** 2 in #rust: @alice, bob")

    def test_topic_set_shown_on_joining_and_cleared(self):
        self.alice.send_line("/topic")
        self.alice.expect("*** #lobby has no topic")
        self.alice.send_line("/topic all things chat")
        for peer in (self.alice, self.bob, self.carol):
            peer.wait_for("*** alice set the topic: all things chat")
        self.bob.send_line("/topic")
        self.bob.expect("*** topic of #lobby: all things chat (set by alice)")
        self.bob.send_line("/join #rust")
        self.bob.expect("*** bob joined #rust (1 here)")
        self.bob.send_line("/join #lobby")
        self.bob.expect("*** bob joined #lobby (3 here)",
                        "*** topic of #lobby: all things chat (set by alice)")
        self.carol.send_line("/topic -")
        self.carol.wait_for("*** carol cleared the topic")
        self.carol.send_line("/topic")
        self.carol.expect("*** #lobby has no topic")

    def test_muted_members_cannot_set_the_topic(self):
        self.alice.send_line("/op 0p")
        self.alice.send_line("/mute bob")
        self.bob.wait_for("*** bob was muted by alice")
        self.bob.send_line("/topic mine now")
        self.bob.expect("!!! you are muted")

    def test_moderation_goes_to_the_targets_room_and_the_operator(self):
        self.bob.send_line("/join #rust")
        self.bob.expect("*** bob joined #rust (1 here)")
        self.alice.send_line("/op 0p")
        self.alice.wait_for("*** alice is now an operator")
        self.alice.send_line("/mute bob")
        self.alice.expect("*** bob was muted by alice")
        self.bob.expect("*** bob was muted by alice")
        self.alice.send_line("/kick bob bye")
        self.alice.expect("*** bob was kicked by alice (bye)")
        self.assertEqual(self.bob.expect_closed(), ["*** bob was kicked by alice (bye)"])
        self.assertEqual([line for line in self.carol.sync() if "bob was" in line], [])


class HistoryTest(ServerTestCase):
    """docs/protocol.md, "History"."""

    def test_joining_replays_the_last_messages_then_lines_go_on(self):
        self.start_server(rate=0, replay=3)
        alice = self.join("alice")
        for text in ["one", "two", "/me waves", "four"]:
            alice.send_line(text)
        alice.sync()
        bob = self.greeted()
        bob.send_line("bob")
        bob.expect("*** bob joined (2 online)", "*** the last 3 messages in #lobby (times in UTC):")
        self.assertRegex(bob.read_line(), "^" + STAMP + "<alice> two$")
        self.assertRegex(bob.read_line(), "^" + STAMP + r"\* alice waves$")
        self.assertRegex(bob.read_line(), "^" + STAMP + "<alice> four$")
        bob.expect("*** end of history")
        alice.send_line("five")
        bob.expect("<alice> five")

    def test_odd_numbers_get_the_usage_line(self):
        server = self.start_server()
        alice = self.join("alice")
        for arg in ("²", "after ²", "after 99999999999999999999999999", "-1", "0", "501"):
            alice.send_line("/history " + arg)
            alice.expect("!!! usage: /history after ID" if arg.startswith("after")
                         else "!!! usage: /history [N]")
        alice.send_line("/history after 9223372036854775807")
        alice.expect("*** no messages in #lobby after 9223372036854775807")

    def test_an_empty_room_replays_nothing_and_one_message_is_singular(self):
        self.start_server()
        alice = self.join("alice")
        alice.send_line("/join #quiet")
        alice.expect("*** alice joined #quiet (1 here)")
        alice.send_line("/history")
        alice.expect("*** no messages in #quiet yet")
        alice.send_line("hush")
        alice.expect("<alice> hush")
        alice.send_line("/join #lobby")
        alice.send_line("/join #quiet")
        alice.wait_for("*** alice joined #quiet (1 here)")
        alice.expect("*** the last 1 message in #quiet (times in UTC):")

    def test_replay_zero_turns_it_off(self):
        self.start_server(replay=0)
        alice = self.join("alice")
        alice.send_line("said")
        alice.sync()
        bob = self.join("bob")
        self.assertEqual(bob.sync(), [])

    def test_nothing_twice_and_nothing_missed_around_the_replay(self):
        self.start_server(rate=200, burst=20, replay=20)  # a steady stream
        alice = self.join("alice")
        stop = threading.Event()

        def talk():  # numbered lines, on and on, while bob joins
            i = 0
            while not stop.is_set():
                alice.send_line("n %d" % i)
                i += 1

        talking = threading.Event()

        def drain():  # alice reads her echoes, so that she is never behind
            line = ""
            while not stop.is_set() and line is not None:
                line = alice.read_line()
                if line == "<alice> n 30":
                    talking.set()
        threads = [threading.Thread(target=talk), threading.Thread(target=drain)]
        for thread in threads:
            thread.start()
            self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        self.assertTrue(talking.wait(TIMEOUT))
        bob = self.greeted()
        bob.send_line("bob")
        numbers = []
        while len(numbers) < 60:
            line = bob.read_line()
            if "<alice> n " in line:
                numbers.append(int(line.rsplit(" ", 1)[1]))
        stop.set()
        self.assertEqual(numbers, list(range(numbers[0], numbers[0] + 60)))
        self.assertGreater(numbers[0], 0)  # the replay held some of them

    def test_history_and_its_usage(self):
        self.start_server()
        alice = self.join("alice")
        for i in range(25):
            alice.send_line("m%d" % i)
        alice.sync()
        alice.send_line("/history 2")
        alice.expect("*** the last 2 messages in #lobby (times in UTC):")
        self.assertRegex(alice.read_line(), "^" + STAMP + "<alice> m23$")
        self.assertRegex(alice.read_line(), "^" + STAMP + "<alice> m24$")
        alice.expect("*** end of history")
        alice.send_line("/history")
        lines = alice.sync()
        self.assertEqual(lines[0], "*** the last 20 messages in #lobby (times in UTC):")
        self.assertEqual(len(lines), 22)
        for bad in ("0", "501", "x", "2 3"):
            alice.send_line("/history " + bad)
            alice.expect("!!! usage: /history [N]")

    def test_search_ignores_case_and_nicks_and_other_rooms(self):
        self.start_server()
        alice = self.join("alice")
        for text in ["I like Rust", "rusty nails", "python", "/me RUSTLES", "ÉCOLE"]:
            alice.send_line(text)
        alice.send_line("/join #other")
        alice.send_line("rust elsewhere")
        alice.send_line("/join #lobby")
        alice.sync()
        alice.send_line("/search rust")
        lines = alice.sync()
        self.assertEqual(lines[0], '*** 3 messages in #lobby matching "rust" (times in UTC):')
        self.assertEqual([re.sub(STAMP, "", line) for line in lines[1:]],
                         ["<alice> I like Rust", "<alice> rusty nails", "* alice RUSTLES",
                          "*** end of history"])
        alice.send_line("/search école")
        self.assertEqual(len(alice.sync()), 3)
        alice.send_line("/search alice")
        alice.expect('*** no messages in #lobby match "alice"')
        alice.send_line("/search")
        alice.expect("!!! usage: /search TEXT")

    def test_a_file_store_answers_off_the_loop_and_in_order(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        server = self.start_server(store=chat.SQLiteStore(os.path.join(folder, "chat.db")))
        alice = self.join("alice")
        alice.send_raw(b"one\ntwo\n/history 2\n/search ONE\n/ping after\n")
        lines = [re.sub(STAMP, "", line) for line in alice.wait_for("*** pong after")]
        self.assertEqual(lines, ["<alice> one", "<alice> two",
                                 "*** the last 2 messages in #lobby (times in UTC):",
                                 "<alice> one", "<alice> two", "*** end of history",
                                 '*** 1 message in #lobby matching "ONE" (times in UTC):',
                                 "<alice> one", "*** end of history"])
        self.assertIsNotNone(server.worker)  # read by the worker thread, not the loop

    def test_a_store_that_fails_tells_the_sender_and_the_room_goes_on(self):
        server = self.start_server()
        alice, bob = self.join_all("alice", "bob")
        server.chat.store.db.close()  # as a disk that stopped taking writes would
        alice.send_line("lost")
        alice.expect("<alice> lost")
        self.assertTrue(alice.read_line().startswith("!!! your message was not stored ("))
        bob.expect("<alice> lost")


class BansTest(ServerTestCase):

    def test_bans_asks_the_store_only_for_an_operator(self):
        server = self.start_server()
        al = self.join("al")
        server.chat.store.db.close()  # any read of it would fail now
        al.send_line("/bans")
        al.expect("!!! operators only")


class FairWorkTest(ServerTestCase):
    """Costly work of one kind never queues the others behind it."""

    def test_searches_that_take_long_hold_no_history_and_no_login(self):
        folder = tempfile.mkdtemp(prefix="chat-fair-", dir=WORK_DIR)
        store = chat.SQLiteStore(os.path.join(folder, "chat.db"))
        store.add_account("alice", "alice", chat.hash_password("correct horse"))
        released = threading.Event()
        self.addCleanup(released.set)
        search = chat.SQLiteStore.search

        def slow_search(store, room, text, count):  # in a worker: a scan of a long history
            released.wait(TIMEOUT)
            return search(store, room, text, count)
        patcher = mock.patch.object(chat.SQLiteStore, "search", slow_search)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.start_server(store=store, rate=0)
        searchers = [self.join("s%d" % number) for number in range(5)]
        for peer in searchers:
            peer.send_line("/search ä")
        innocent = self.join("innocent")
        innocent.send_line("said")
        innocent.send_line("/history 5")
        innocent.wait_for("*** end of history")  # while every search still waits
        login = self.greeted()
        login.send_line("/login alice correct horse")
        login.wait_for("*** alice joined (7 online)")
        released.set()
        for peer in searchers:
            peer.wait_for('*** no messages in #lobby match "ä"')


class AccountTest(ServerTestCase):
    """docs/protocol.md, "Accounts" and "Offline messages"."""

    def setUp(self):
        self.start_server(operators=("boss",))
        shorten(self, GUESS_INTERVAL_S=0.01)  # (GuessTest measures it)
        if "a_second_later" not in self._testMethodName:  # that one measures it
            shorten(self, WRONG_PASSWORD_DELAY_S=0.05)

    def registered(self, nick, password="correct horse"):
        peer = self.join(nick)
        peer.send_line("/register " + password)
        peer.expect("*** %s is now your account: next time, /login %s PASSWORD" % (nick, nick))
        return peer

    def test_register_and_the_nick_is_kept(self):
        alice = self.join("alice")
        alice.send_line("/register short")
        alice.expect("!!! a password needs at least 8 characters")
        alice.send_line("/register correct horse")
        alice.expect("*** alice is now your account: next time, /login alice PASSWORD")
        online = self.greeted()  # the same answer while its owner is online
        online.send_line("alice")
        online.expect("!!! alice is registered: /login alice PASSWORD, or choose another nickname")
        alice.close()
        other = self.greeted()
        other.send_line("ALICE")
        other.expect("!!! alice is registered: /login alice PASSWORD, or choose another nickname")
        other.send_line("bob")
        other.wait_for("*** bob joined (1 online)")
        other.send_line("/nick Alice")
        other.expect("!!! alice is registered: /login alice PASSWORD, or choose another nickname")

    def test_login_before_registering_and_a_wrong_password_a_second_later(self):
        self.registered("alice").close()
        peer = self.greeted()
        started = time.monotonic()
        peer.send_line("/login alice wrong one")
        peer.send_line("/ping")  # waits behind the answer
        peer.expect("!!! wrong nick or password")
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        peer.expect("!!! choose a nickname first")
        peer.send_line("/login ALICE correct horse")
        peer.expect("*** alice joined (1 online)")

    def test_three_wrong_passwords_close_the_connection(self):
        self.registered("alice").close()
        peer = self.greeted()
        for _ in range(3):
            peer.send_line("/login alice nope nope")
        self.assertEqual(peer.expect_closed(), ["!!! wrong nick or password"] * 3)

    def test_login_takes_the_nick_over_from_another_connection(self):
        alice = self.registered("alice")
        bob = self.join("bob")
        alice.wait_for("*** bob joined (2 online)")
        again = self.greeted()
        again.send_line("/login alice correct horse")
        again.expect("*** alice joined (2 online)")
        self.assertEqual(alice.expect_closed(), ["!!! you logged in elsewhere"])
        bob.expect("*** alice left (logged in elsewhere)", "*** alice joined (2 online)")

    def test_login_after_registering_renames(self):
        self.registered("alice").close()
        peer = self.join("guest")
        peer.send_line("/login alice correct horse")
        peer.expect("*** guest is now known as alice")
        peer.send_line("/login alice correct horse")
        peer.expect("!!! you are logged in to alice already")

    def test_password_and_unregister(self):
        alice = self.registered("alice", "correct-horse")
        alice.send_line("/password wrong-one newpassword")
        alice.expect("!!! wrong password")
        alice.send_line("/password correct-horse short")
        alice.expect("!!! a password needs at least 8 characters")
        alice.send_line("/password correct-horse newpassword")
        alice.expect("*** password changed")
        alice.send_line("/password")
        alice.expect("!!! usage: /password OLD NEW")
        alice.close()
        again = self.greeted()
        again.send_line("/login alice newpassword")
        again.expect("*** alice joined (1 online)")
        again.send_line("/unregister nope")
        again.expect("!!! wrong password")
        again.send_line("/unregister newpassword")
        again.expect("*** alice is no longer registered")
        again.close()
        anyone = self.greeted()
        anyone.send_line("alice")
        anyone.expect("*** alice joined (1 online)")

    def test_operators_are_opped_on_login_and_their_nick_kept_until_the_account_exists(self):
        squatter = self.greeted()
        squatter.send_line("boss")  # would become an operator by /register
        squatter.expect("!!! " + chat.OPERATOR_NICK_KEPT.format(nick="boss"))
        squatter.send_line("squatter")
        squatter.wait_for("*** squatter joined (1 online)")
        squatter.send_line("/nick BOSS")
        squatter.expect("!!! " + chat.OPERATOR_NICK_KEPT.format(nick="BOSS"))
        self.server.chat.store.add_account("boss", "boss", chat.hash_password("correct horse"))
        other = self.join("other")
        boss = self.greeted()
        boss.send_line("/login boss correct horse")
        boss.wait_for("*** boss is now an operator")
        other.wait_for("*** boss is now an operator")

    def test_a_login_racing_unregister_does_not_end_in_a_deleted_account(self):
        checked = chat.password_matches

        def slowly(password, stored):  # in the worker: each check takes a while
            time.sleep(0.2)
            return checked(password, stored)
        patcher = mock.patch.object(chat, "password_matches", slowly)
        patcher.start()
        self.addCleanup(patcher.stop)
        alice = self.registered("alice")
        other = self.greeted()
        alice.send_line("/unregister correct horse")
        other.send_line("/login alice correct horse")  # read before, checked after it
        alice.expect("*** alice is no longer registered")
        other.expect("!!! wrong nick or password")

    def test_offline_messages_wait_for_the_login(self):
        self.registered("alice").close()
        bob = self.join("bob")
        bob.send_line("/msg ALICE are you there?")
        bob.expect("-> *alice* are you there?",
                   "*** alice is offline: they will get it when they log in")
        bob.send_line("/msg nobody hi")
        bob.expect("!!! no such user: nobody")
        alice = self.greeted()
        alice.send_line("/login alice correct horse")
        alice.expect("*** alice joined (2 online)")
        lines = alice.sync()
        self.assertEqual(lines[-3], "*** 1 message while you were away (times in UTC):")
        self.assertRegex(lines[-2], "^" + STAMP + r"\*bob\* are you there\?$")
        self.assertEqual(lines[-1], "*** end of messages")
        alice.close()
        again = self.greeted()
        again.send_line("/login alice correct horse")
        again.expect("*** alice joined (2 online)")
        self.assertNotIn("*** end of messages", again.sync())  # delivered ones are gone

    def test_a_full_mailbox(self):
        self.assertEqual(chat.MAILBOX_MESSAGES, 100)  # the protocol's; a smaller box below
        patcher = mock.patch.object(chat, "MAILBOX_MESSAGES", 5)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.registered("alice").close()
        bob = self.join("bob")
        for i in range(chat.MAILBOX_MESSAGES):
            bob.send_line("/msg alice %d" % i)
        bob.sync()
        bob.send_line("/msg alice one too many")
        bob.expect("!!! alice's mailbox is full")


ISO_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


class MailboxTest(ServerTestCase):

    def test_a_login_evicted_before_its_mail_is_written_leaves_it_waiting(self):
        shorten(self, SEND_BUFFER_BYTES=8192)  # the mail waits in the server, not the kernel
        server = self.start_server(rate=0, max_sendq=65536)
        server.chat.store.add_account("alice", "alice", chat.hash_password("correct horse"))
        bob = self.join("bob")
        texts = ["%03d %s" % (number, "m" * 3000) for number in range(chat.MAILBOX_MESSAGES)]
        for text in texts:
            bob.send_line("/msg alice " + text)
        bob.sync()
        stalled = self.greeted(rcvbuf=4096)  # logs in, then never reads
        stalled.send_line("/login alice correct horse")
        bob.wait_for("*** alice left (too slow)")
        got_first = [line for line in stalled.expect_closed() if line.endswith("m" * 3000)]
        alice = self.greeted()
        alice.send_line("/login alice correct horse")
        alice.wait_for("*** alice joined (2 online)")
        lines = alice.sync()
        got_then = [line for line in lines if line.endswith("m" * 3000)]
        self.assertTrue(got_then, "the mailbox was emptied by the evicted login")
        said = {line.split("*bob* ")[1] for line in got_first + got_then}
        self.assertEqual(said, set(texts))  # every one reached alice, at least once
        alice.send_line("/quit")
        alice.expect_closed()
        again = self.greeted()
        again.send_line("/login alice correct horse")
        again.wait_for("*** alice joined (2 online)")
        self.assertFalse([line for line in again.sync() if "while you were away" in line])


class AccountCommandTest(unittest.TestCase):
    """chat.py account: an administrator makes accounts, resets passwords,
    deletes and lists them, on the server's file."""

    def test_add_list_password_delete_and_a_server_that_uses_them(self):
        db = os.path.join(tempfile.mkdtemp(prefix="chat-accounts-", dir=WORK_DIR), "chat.db")
        self.addCleanup(shutil.rmtree, os.path.dirname(db), True)
        code, out, err = run_chat("account", "list", "--db", db)  # no server made it yet
        self.assertEqual((code, err), (1, "chat.py: there is no database %s: give the server's "
                                          "with --db (chat.py account makes none)\n" % db))
        chat.SQLiteStore(db).close()  # as a server would have
        code, out, err = run_chat("account", "add", "boss", "--db", db, "--password-file", "-",
                                  stdin=b"correct horse\n")
        self.assertEqual((code, out, err), (0, "boss is an account now: /login boss PASSWORD\n",
                                            ""))
        code, out, err = run_chat("account", "add", "Boss", "--db", db, "--password-file", "-",
                                  stdin=b"correct horse\n")
        self.assertEqual((code, err), (1, "chat.py: boss is an account already (to reset its "
                                          "password: chat.py account password boss)\n"))
        code, out, err = run_chat("account", "password", "boss", "--db", db,
                                  "--password-file", "-", stdin=b"short\n")
        self.assertEqual((code, err), (1, "chat.py: a password needs at least 8 characters\n"))
        code, out, err = run_chat("account", "password", "boss", "--db", db,
                                  "--password-file", "-", stdin=b"battery staple\n")
        self.assertEqual((code, out), (0, "the password of boss is changed\n"))
        code, out, err = run_chat("account", "add", "temp", "--db", db, "--password-file",
                                  write_file(self, "pw.txt", "temporary pw\n"))
        self.assertEqual(code, 0, err)
        self.assertEqual(run_chat("account", "list", "--db", db)[1], "boss\ntemp\n")
        self.assertEqual(run_chat("account", "delete", "temp", "--db", db)[:2],
                         (0, "temp deleted, with any messages that waited for it\n"))
        self.assertEqual(run_chat("account", "delete", "temp", "--db", db)[::2],
                         (1, "chat.py: no account temp\n"))
        code, out, err = run_chat("account", "add", "nobody", "--db", db, stdin=b"")
        self.assertEqual((code, err), (1, "chat.py: no terminal to ask the password on: give "
                                          "--password-file FILE (or - for standard input)\n"))
        # A server on that file: the listed name without an account is warned about.
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0", "--db",
                                    db, "--operators", "boss,ghost"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port, log = wait_until_listening(self, proc.stderr)
        self.assertNotIn("--operators boss", log)
        self.assertIn("warning: --operators ghost: there is no account ghost yet, and nobody "
                      "can take that nick until it is made: chat.py account add ghost", log)
        boss = Peer(port)
        self.addCleanup(boss.close)
        boss.send_line("/login boss battery staple")
        boss.wait_for("*** boss joined (1 online)")
        boss.wait_for("*** boss is now an operator")


class JsonTest(ServerTestCase):
    """docs/protocol.md, "JSON mode"."""

    def setUp(self):
        self.start_server(op_password="0p", rate=0)

    def read(self, peer):
        """The next object; its time checked and removed."""
        obj = json.loads(peer.read_line())
        self.assertRegex(obj.pop("time"), ISO_TIME)
        return obj

    def json_peer(self, nick):
        peer = self.greeted()
        peer.send_line("/format json")
        self.assertEqual(self.read(peer), {"type": "notice", "text": "format: json"})
        peer.send_line(nick)
        return peer

    def test_format_before_registering_and_back(self):
        alice = self.json_peer("alice")
        self.assertEqual(self.read(alice), {"type": "joined", "nick": "alice", "room": "#lobby",
                                            "count": 1})
        alice.send_line("/format text")
        alice.expect("*** format: text")
        alice.send_line("/format yaml")
        alice.expect("!!! usage: /format json|text")

    def test_every_type_and_its_fields(self):
        alice = self.json_peer("alice")
        self.read(alice)
        bob = self.join("bob")
        self.assertEqual(self.read(alice), {"type": "joined", "nick": "bob", "room": "#lobby",
                                            "count": 2})
        bob.send_line("hi")
        message = self.read(alice)
        self.assertIsInstance(message.pop("id"), int)
        self.assertEqual(message, {"type": "message", "room": "#lobby", "nick": "bob",
                                   "text": "hi"})
        bob.send_line("/me waves")
        self.assertEqual(self.read(alice)["type"], "action")
        bob.send_line("/msg alice psst")
        self.assertEqual(self.read(alice), {"type": "private", "from": "bob", "to": "alice",
                                            "text": "psst"})
        alice.send_line("/msg bob back")
        self.assertEqual(self.read(alice), {"type": "private", "from": "alice", "to": "bob",
                                            "text": "back"})
        alice.send_line("/who")
        self.assertEqual(self.read(alice), {"type": "who", "room": "#lobby",
                                            "nicks": ["alice", "bob"], "operators": [],
                                            "away": []})
        alice.send_line("/rooms")
        self.assertEqual(self.read(alice), {"type": "rooms", "count": 2,
                                            "rooms": [{"name": "#lobby", "count": 2}]})
        alice.send_line("/ping tok")
        self.assertEqual(self.read(alice), {"type": "pong", "token": "tok"})
        alice.send_line("/topic")
        self.assertEqual(self.read(alice), {"type": "topic", "room": "#lobby", "text": None,
                                            "nick": None})
        bob.send_line("/topic all about chat")
        self.assertEqual(self.read(alice), {"type": "topic", "room": "#lobby",
                                            "text": "all about chat", "nick": "bob"})
        bob.send_line("/topic -")
        self.assertEqual(self.read(alice), {"type": "topic", "room": "#lobby", "text": None,
                                            "nick": "bob"})
        bob.send_line("/nick robert")
        self.assertEqual(self.read(alice), {"type": "renamed", "old": "bob", "new": "robert",
                                            "room": "#lobby"})
        alice.send_line("/op 0p")
        self.assertEqual(self.read(alice), {"type": "opped", "nick": "alice", "room": "#lobby",
                                            "by": "alice"})
        alice.send_line("/mute robert")
        self.assertEqual(self.read(alice), {"type": "muted", "nick": "robert", "room": "#lobby",
                                            "by": "alice"})
        alice.send_line("/kick robert spam")
        self.assertEqual(self.read(alice), {"type": "kicked", "nick": "robert",
                                            "room": "#lobby", "by": "alice", "reason": "spam"})
        alice.send_line("/help")
        self.assertEqual(self.read(alice)["type"], "notice")

    def test_errors_have_codes(self):
        alice = self.json_peer("alice")
        self.read(alice)
        for line, code in (("/nosuch", "unknown_command"), ("/msg", "usage"),
                           ("/msg nobody hi", "no_such_user"), ("/join #a b", "room_invalid"),
                           ("/join #lobby", "already"), ("/kick x", "operators_only"),
                           ("/nick -x", "nick_invalid"), ("/register short", "password_too_short"),
                           ("x" * 5000, "line_too_long")):
            alice.send_line(line)
            obj = self.read(alice)
            self.assertEqual((obj["type"], obj["code"]), ("error", code), line)

    def test_history_items_ids_and_history_end(self):
        alice = self.join("alice")
        for i in range(3):
            alice.send_line("m%d" % i)
        alice.sync()
        bob = self.json_peer("bob")
        self.assertEqual(self.read(bob)["type"], "joined")
        items = [self.read(bob) for _ in range(3)]
        self.assertEqual([(item["type"], item["text"], item["history"]) for item in items],
                         [("message", "m%d" % i, True) for i in range(3)])
        ids = [item["id"] for item in items]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(self.read(bob), {"type": "history_end", "room": "#lobby", "count": 3})
        bob.send_line("/join #empty")
        self.assertEqual(self.read(bob)["type"], "joined")
        bob.send_line("/history")
        self.assertEqual(self.read(bob), {"type": "history_end", "room": "#empty", "count": 0})
        bob.send_line("/search nothing")
        self.assertEqual(self.read(bob), {"type": "history_end", "room": "#empty", "count": 0})

    def test_history_after_an_id_exact_and_bounded(self):
        alice = self.join("alice")
        for i in range(510):
            alice.send_line("n%d" % i)
        alice.sync()
        bob = self.json_peer("bob")
        self.read(bob)
        while self.read(bob)["type"] != "history_end":
            pass  # the replay
        bob.send_line("/history 1")
        last = self.read(bob)
        self.read(bob)
        first_id = last["id"] - 509
        bob.send_line("/history after %d" % (first_id - 1))
        page = [self.read(bob) for _ in range(500)]
        self.assertEqual([item["text"] for item in page], ["n%d" % i for i in range(500)])
        self.assertEqual(self.read(bob), {"type": "history_end", "room": "#lobby", "count": 500})
        bob.send_line("/history after %d" % page[-1]["id"])
        rest = [self.read(bob) for _ in range(10)]
        self.assertEqual([item["text"] for item in rest], ["n%d" % i for i in range(500, 510)])
        self.assertEqual(self.read(bob)["count"], 10)
        alice.send_line("/history after %d" % last["id"])
        alice.wait_for("*** no messages in #lobby after %d" % last["id"])
        alice.send_line("/history after %d" % (last["id"] - 2))
        alice.wait_for("*** 2 messages in #lobby after %d (times in UTC):" % (last["id"] - 2))
        alice.send_line("/history after x")
        alice.wait_for("!!! usage: /history after ID")

    def test_offline_messages_are_private_objects(self):
        alice = self.join("alice")
        alice.send_line("/register correct horse")
        alice.wait_for("*** alice is now your account: next time, /login alice PASSWORD")
        alice.close()
        bob = self.join("bob")
        bob.send_line("/msg alice later")
        bob.wait_for("*** alice is offline: they will get it when they log in")
        again = self.greeted()
        again.send_line("/format json")
        self.read(again)
        again.send_line("/login alice correct horse")
        self.assertEqual(self.read(again)["type"], "joined")
        while True:
            obj = self.read(again)
            if obj["type"] == "private":
                break
        self.assertEqual(obj, {"type": "private", "from": "bob", "to": "alice", "text": "later",
                               "offline": True})


class StoreTest(unittest.TestCase):
    """The SQLite file: its schema, what survives a restart, and a bad file."""

    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.db = os.path.join(self.folder, "chat.db")

    def start(self, *args):
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0"]
                             + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=self.folder, env=dict(os.environ, CHAT_OP_PASSWORD="0p"))
        port, _ = wait_until_listening(self, proc.stderr)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # never a full pipe
        return proc, port

    def talk(self, port, nick, *lines):
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.send_line(nick)
        peer.wait_for("*** %s joined (1 online)" % nick)
        for line in lines:
            peer.send_line(line)
            peer.wait_for("<%s> %s" % (nick, line))  # relayed
        return peer

    def history(self, port):
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.send_line("reader")
        peer.wait_for("*** reader joined (1 online)")
        peer.sync()  # past the replay
        peer.send_line("/history 500")
        return [re.sub(STAMP, "", line) for line in peer.sync()]

    def test_the_default_file_is_chat_db_in_the_working_directory(self):
        proc, port = self.start()
        self.talk(port, "alice", "kept")
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 4)
            self.assertEqual(db.execute("SELECT nick, kind, text FROM messages").fetchall(),
                             [("alice", "message", "kept")])

    def test_what_was_relayed_survives_sigterm_and_sigkill(self):
        proc, port = self.start("--db", self.db)
        self.talk(port, "alice", "before term")
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        proc, port = self.start("--db", self.db, "--rate", "0")
        self.talk(port, "alice", *["before kill %d" % i for i in range(50)])
        proc.kill()
        proc.wait(TIMEOUT)
        proc, port = self.start("--db", self.db)
        lines = self.history(port)
        self.assertEqual(lines, ["*** the last 51 messages in #lobby (times in UTC):",
                                 "<alice> before term"]
                         + ["<alice> before kill %d" % i for i in range(50)]
                         + ["*** end of history"])

    def test_memory_keeps_nothing_and_keep_trims(self):
        proc, port = self.start("--db", ":memory:")
        self.talk(port, "alice", "gone")
        proc.kill()
        proc.wait(TIMEOUT)
        proc, port = self.start("--db", ":memory:")
        self.assertEqual(self.history(port), ["*** no messages in #lobby yet"])
        self.assertFalse(os.path.exists(self.db))
        proc.kill()
        proc.wait(TIMEOUT)
        proc, port = self.start("--db", self.db, "--keep", "3")
        self.talk(port, "alice", *["k%d" % i for i in range(10)])
        proc.terminate()
        proc.wait(TIMEOUT)
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            kept = [text for (text,) in db.execute("SELECT text FROM messages ORDER BY id")]
        self.assertLessEqual(len(kept), 3 + 2)  # trimmed as it grows
        self.assertEqual(kept[-3:], ["k7", "k8", "k9"])

    def test_topics_and_bans_survive_a_restart(self):
        proc, port = self.start("--db", self.db)
        alice = self.talk(port, "alice")
        alice.send_line("/topic still here")
        alice.wait_for("*** alice set the topic: still here")
        try:
            mallory = Peer(port, source="127.0.0.2")
        except OSError:
            self.skipTest("127.0.0.2 is not a local address here")
        self.addCleanup(mallory.close)
        mallory.send_line("mallory")
        alice.wait_for("*** mallory joined (2 online)")
        alice.send_line("/op 0p")
        alice.send_line("/ban mallory")
        alice.wait_for("*** mallory was banned by alice (no reason given)")
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        proc, port = self.start("--db", self.db)
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.send_line("bob")
        peer.expect("*** welcome to chat.py (0 online)",
                    "*** choose a nickname: 1-24 letters, digits, _ or -",
                    "*** bob joined (1 online)",
                    "*** topic of #lobby: still here (set by alice)")
        again = Peer(port, source="127.0.0.2")
        self.addCleanup(again.close)
        self.assertEqual(again.expect_closed(), ["!!! you are banned"])

    def test_a_version_1_file_is_migrated_and_keeps_its_history(self):
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            for statement in chat.SQLiteStore.SCHEMA[:4]:  # what version 1 made
                db.execute(statement)
            db.execute("INSERT INTO rooms VALUES ('#lobby', '#lobby', NULL, NULL)")
            db.execute("INSERT INTO messages VALUES (7, '#lobby', 0, 'old', 'message',"
                       " 'said in version one')")
            db.execute("PRAGMA user_version=1")
            db.commit()
        proc, port = self.start("--db", self.db)
        self.assertEqual(self.history(port), [
            "*** the last 1 message in #lobby (times in UTC):", "<old> said in version one",
            "*** end of history"])
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.send_line("searcher")
        peer.sync()
        peer.send_line("/search VERSION one")
        self.assertEqual([re.sub(STAMP, "", line) for line in peer.sync()], [
            '*** 1 message in #lobby matching "VERSION one" (times in UTC):',
            "<old> said in version one", "*** end of history"])

    def test_the_search_index_and_what_it_has_not_reached(self):
        store = chat.SQLiteStore(self.db, keep=0)
        self.addCleanup(store.close)
        self.addCleanup(store.close_reader)
        if not store.indexed:
            self.skipTest("this SQLite has no FTS5 trigram tokenizer")
        for i in range(30):
            store.append("#lobby", "a", "message", "École number %d" % i, 0.0)
        store.flush()
        while store.index_some(7):
            pass
        for i in range(30, 33):
            store.append("#lobby", "a", "message", "école number %d" % i, 0.0)
        store.append("#other", "a", "message", "école elsewhere", 0.0)
        store.flush()
        found = store.reader().search("#lobby", "ÉCOLE NUMBER", 5)
        self.assertEqual([row[4] for row in found],
                         ["École number 28", "École number 29", "école number 30",
                          "école number 31", "école number 32"])
        self.assertEqual(len(store.reader().search("#lobby", "number 1", 20)), 11)
        self.assertEqual(store.reader().search("#lobby", "zebra", 20), [])

    def test_a_search_finds_the_same_whether_the_index_has_caught_up_or_not(self):
        store = chat.SQLiteStore(self.db, keep=0)
        self.addCleanup(store.close)
        self.addCleanup(store.close_reader)
        if not store.indexed:
            self.skipTest("this SQLite has no FTS5 trigram tokenizer")
        store.append("#lobby", "a", "message", "die Straße ist lang", 0.0)
        store.append("#lobby", "a", "message", "ΣΊΣΥΦΟΣ rolls", 0.0)
        store.flush()
        for caught_up in (False, True):
            if caught_up:
                while store.index_some():
                    pass
            for needle, want in (("STRASSE", "die Straße ist lang"),
                                 ("straße", "die Straße ist lang"),
                                 ("σίσυφος", "ΣΊΣΥΦΟΣ rolls")):
                found = store.reader().search("#lobby", needle, 5)
                self.assertEqual([row[4] for row in found], [want], (needle, caught_up))

    def test_trimming_takes_messages_out_of_the_index_too(self):
        store = chat.SQLiteStore(self.db, keep=5)
        self.addCleanup(store.close)
        self.addCleanup(store.close_reader)
        if not store.indexed:
            self.skipTest("this SQLite has no FTS5 trigram tokenizer")
        for i in range(5):
            store.append("#lobby", "a", "message", "first%d" % i, 0.0)
        store.flush()
        while store.index_some():
            pass
        for i in range(5):
            store.append("#lobby", "a", "message", "second%d" % i, 0.0)
        store.flush()  # trims the five first, which were indexed
        self.assertEqual(store.db.execute(
            "SELECT COUNT(*) FROM search WHERE search MATCH '\"first\"'").fetchone()[0], 0)
        self.assertEqual([row[4] for row in store.reader().search("#lobby", "second", 20)],
                         ["second%d" % i for i in range(5)])

    def assert_refused(self, path, why):
        code, out, err = run_chat("server", "--port", "0", "--db", path)
        self.assertEqual((code, len(err.splitlines())), (1, 1), err)
        self.assertTrue(err.startswith("chat.py: cannot use the database %s: " % path), err)
        self.assertIn(why, err)

    def test_a_database_that_cannot_be_used_is_one_line_and_exit_1(self):
        with open(self.db, "wb") as f:
            f.write(b"this is not a database, just some bytes" * 100)
        self.assert_refused(self.db, "not a database")
        self.assert_refused(os.path.join(self.folder, "no", "such", "folder", "chat.db"),
                            "unable to open")

    def test_another_program_s_tables_are_refused_not_a_traceback(self):
        for name, schema in (("messages", "id INTEGER PRIMARY KEY, room TEXT, text TEXT"),
                             ("accounts", "user TEXT, pw TEXT")):
            path = os.path.join(self.folder, name + ".db")
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute("CREATE TABLE %s (%s)" % (name, schema))
                db.commit()
            self.assert_refused(path, "its table %s is not chat.py's" % name)

    def test_a_damaged_page_is_refused_not_a_traceback(self):
        store = chat.SQLiteStore(self.db)
        for number in range(200):
            store.add_room("#r%d" % number, "#r%d" % number)
            store.append("#lobby", "bob", "message", "hello %d" % number, 1.0)
        store.flush()
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            pages = dict(db.execute("SELECT name, rootpage FROM sqlite_master"))
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
        for name in ("sqlite_autoindex_rooms_1", "messages_by_room"):  # an index, a table's key
            damaged = os.path.join(self.folder, name + ".db")
            shutil.copy(self.db, damaged)
            with open(damaged, "r+b") as f:
                f.seek((pages[name] - 1) * page_size)
                f.write(b"\xde\xad" * (page_size // 2))
            self.assert_refused(damaged, "damaged")

    def full_filesystem(self):
        """A small filesystem of its own (tmpfs), or the test is skipped."""
        mount = tempfile.mkdtemp(prefix="chat-full-", dir=WORK_DIR)
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if made.returncode != 0:
            self.skipTest("can't make a full filesystem here (mounting a tmpfs needs root)")
        self.addCleanup(subprocess.run, ["umount", "-l", mount])
        return mount

    @staticmethod
    def fill(folder):
        """Take what space is left there."""
        filler = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"x" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(filler)

    def test_ids_of_messages_a_full_disk_lost_are_not_given_again(self):
        folder = self.full_filesystem()
        db = os.path.join(folder, "chat.db")
        proc, port = self.start("--db", db)
        alice = self.talk(port, "alice", "stored")
        alice.send_line("/format json")
        while '"format: json"' not in alice.read_line():
            pass
        self.fill(folder)
        seen = []
        for number in range(3):
            alice.send_line("lost %d" % number)
            said = json.loads(alice.read_line())
            self.assertEqual((said["type"], said["text"]), ("message", "lost %d" % number))
            seen.append(said["id"])
            self.assertEqual(json.loads(alice.read_line())["type"], "error")  # not stored
        proc.terminate()
        proc.wait(TIMEOUT)
        os.remove(os.path.join(folder, "filler"))
        proc, port = self.start("--db", db)
        again = self.talk(port, "alice")
        again.send_line("/format json")
        while '"format: json"' not in again.read_line():
            pass
        again.send_line("after the restart")
        self.assertGreater(json.loads(again.read_line())["id"], max(seen))

    def test_a_full_disk_tells_who_set_a_topic_or_a_ban(self):
        folder = self.full_filesystem()
        db = os.path.join(folder, "chat.db")
        proc, port = self.start("--db", db, "--op-password-file",
                                write_file(self, "op.txt", "0p\n"))
        op = self.talk(port, "op")
        op.send_line("/op 0p")
        op.wait_for("*** op is now an operator")
        victim = Peer(port, source="127.0.0.2")
        self.addCleanup(victim.close)
        victim.send_line("victim")
        op.wait_for("*** victim joined (2 online)")
        self.fill(folder)
        op.send_line("/topic " + "lasting? " * 100)
        op.wait_for("*** op set the topic: " + ("lasting? " * 100).rstrip())
        self.assertRegex(op.read_line(), r"^!!! the topic was not stored \(.*\): it is gone at "
                                         r"the next restart$")
        op.send_line("/ban victim")
        op.wait_for("*** victim was banned by op (no reason given)")
        self.assertRegex(op.read_line(), r"^!!! the ban was not stored \(.*\): it is gone at "
                                         r"the next restart$")

    def test_two_servers_on_one_file_the_second_is_refused(self):
        proc, port = self.start("--db", self.db)
        self.assert_refused(self.db, "another chat.py server is using it")
        code, out, err = run_chat("account", "add", "zed", "--db", self.db,
                                  "--password-file", "-", stdin=b"correct horse\n")
        self.assertEqual(code, 0, err)  # the administrator's tool may use it meanwhile

    def test_a_file_deleted_while_running_is_noticed_and_said(self):
        proc, port = self.start("--db", self.db)
        alice = self.talk(port, "alice", "stored")
        for name in os.listdir(self.folder):
            os.remove(os.path.join(self.folder, name))
        alice.send_line("lost")
        alice.expect("<alice> lost", "!!! your message was not stored (the database file %s "
                                     "was deleted or replaced while the server ran)" % self.db)


class GuaranteeTest(ServerTestCase):

    def test_concurrent_senders_everyone_sees_one_order_nothing_lost(self):
        self.start_server(rate=0)
        senders = self.join_all("s1", "s2", "s3", "s4")
        watchers = [self.join("w1"), self.join("w2")]
        for peer in senders + watchers:
            peer.sync("ready")
        count = 200

        def send_all(peer, nick):
            peer.send_raw(b"".join(b"%s %d\n" % (nick.encode(), i) for i in range(count)))
        threads = [threading.Thread(target=send_all, args=(peer, "s%d" % (i + 1)))
                   for i, peer in enumerate(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        transcripts = []
        for peer in senders + watchers:
            lines = [peer.read_line() for _ in range(count * len(senders))]
            transcripts.append(lines)
        self.assertTrue(all(t == transcripts[0] for t in transcripts))
        for i in range(len(senders)):
            mine = [line for line in transcripts[0] if line.startswith("<s%d>" % (i + 1))]
            self.assertEqual(mine, ["<s%d> s%d %d" % (i + 1, i + 1, n) for n in range(count)])

    def test_a_newcomer_gets_nothing_from_before_it_joined(self):
        self.start_server(rate=0)
        alice = self.join("alice")
        newcomer = self.greeted()
        alice.send_raw(b"one\ntwo\n")
        newcomer.send_line("carol")
        lines = newcomer.sync()
        self.assertEqual(lines[0], "*** carol joined (2 online)")
        alice.wait_for("*** carol joined (2 online)")



# --- Version 3: several rooms at once, away, the message of the day ---------------

class SeveralRoomsRules:
    """docs/protocol.md, "Several rooms at once" and "Away": every rule, in
    text and JSON. Run on one server (SeveralRoomsTest) and across two on a
    real Redis (SeveralRoomsRedisTest): alice and carol on the first,
    bob and dan on the last."""

    HOME = {"alice": 0, "carol": 0, "bob": -1, "dan": -1}

    def start_servers(self, **limits):
        """Start the servers; return their ports."""
        raise NotImplementedError

    def setUp(self):
        self.ports = self.start_servers(max_joined=3, rate=0)
        self.online = []

    def person(self, nick, json_mode=False):
        """nick, registered on its server; everyone before it has seen it join."""
        peer = Peer(self.ports[self.HOME.get(nick, 0)])
        self.addCleanup(peer.close)
        if json_mode:
            peer.send_line("/format json")
            while not peer.read_line().startswith('{"type": "notice", "text": "format: json"'):
                pass  # (the greeting came as text)
        peer.send_line(nick)
        self.online.append(peer)
        joined = "*** %s joined (%d online)" % (nick, len(self.online))
        if json_mode:
            while self.read_json(peer).get("type") != "joined":
                pass
        else:
            peer.wait_for(joined)
        for earlier in self.online[:-1]:
            if getattr(earlier, "json_mode", False):
                while self.read_json(earlier) != {"type": "joined", "nick": nick,
                                                  "room": "#lobby", "count": len(self.online)}:
                    pass
            else:  # (marked #lobby if that is not its current room)
                while not earlier.read_line().endswith(joined):
                    pass
        peer.json_mode = json_mode
        return peer

    @staticmethod
    def read_json(peer):
        obj = json.loads(peer.read_line())
        obj.pop("time")
        return obj

    @staticmethod
    def wait_for_each(peer, *lines):
        """Skip lines until each of these has come, in any order (between
        rooms there is none); return the others."""
        waiting, others = list(lines), []
        while waiting:
            got = peer.read_line()
            if got in waiting:
                waiting.remove(got)
            else:
                others.append(got)
        return others

    def until_answered(self, peer, command, answer):
        """Ask until the answer is this one (another server hears of a
        change through Redis a moment after the server it was made on)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            peer.send_line(command)
            got = peer.read_line()
            if got == answer:
                return
            self.assertLess(time.monotonic(), deadline, "%r: still %r" % (command, got))
            time.sleep(0.02)  # asking again, bounded by the deadline

    def opened(self, peer, nick, room, here, *others):
        """peer (nick) opens room, where others are: all see its join line."""
        peer.send_line("/open " + room)
        for someone in (peer,) + others:  # (by kind and fields: the wording is not the point)
            someone.wait_for_kind("joined_room", nick=nick, room=room, count=here)

    def test_open_enters_a_room_and_stays_in_the_others(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#rust", 1)
        alice.send_line("hi lobby")
        alice.expect("<alice> hi lobby")
        bob.expect("#lobby <alice> hi lobby")  # still in the lobby, not its current room
        self.opened(alice, "alice", "#rust", 2, bob)
        alice.send_line("hi rust")
        alice.expect("<alice> hi rust")
        bob.expect("<alice> hi rust")
        bob.send_line("/open lobby")  # in it already: it only becomes current
        bob.expect("*** talking in #lobby now")
        alice.send_line("again")
        alice.expect("<alice> again")
        bob.expect("#rust <alice> again")
        bob.send_line("/open #rust")
        bob.expect("*** talking in #rust now")
        alice.send_line("/open #lobby")
        alice.expect("*** talking in #lobby now")
        alice.send_line("/me waves")
        alice.expect("* alice waves")
        bob.expect("#lobby * alice waves")
        bob.send_line("/open")
        bob.expect("!!! usage: /open ROOM")
        bob.send_line("/open #no spaces")
        self.assertTrue(bob.read_line().startswith("!!! invalid room name: #no spaces"))

    def test_the_first_spelling_of_a_room_stays(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#Rust", 1)
        self.opened(alice, "alice", "#Rust", 2, bob)
        alice.send_line("/open #RUST")
        alice.expect("*** talking in #Rust now")

    def test_open_gives_the_topic_and_the_history_as_join_does(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#rust", 1)
        bob.send_line("/topic ownership")
        bob.expect("*** bob set the topic: ownership")
        bob.send_line("borrow")
        bob.expect("<bob> borrow")
        alice.send_line("/open #rust")
        alice.expect("*** alice joined #rust (2 here)",
                     "*** topic of #rust: ownership (set by bob)",
                     "*** the last 1 message in #rust (times in UTC):")
        self.assertRegex(alice.read_line(), r"^\[\d{4}-\d\d-\d\d \d\d:\d\d\] <bob> borrow$")
        alice.expect("*** end of history")
        bob.expect("*** alice joined #rust (2 here)")

    def test_max_joined_rooms(self):
        alice = self.person("alice")
        self.opened(alice, "alice", "#a", 1)
        self.opened(alice, "alice", "#b", 1)
        alice.send_line("/open #c")
        alice.expect("!!! you are in 3 rooms: /part one first")
        alice.send_line("/open #a")  # one of its own: not refused
        alice.expect("*** talking in #a now")
        alice.send_line("/join #c")  # /join leaves one for another
        alice.expect("*** alice joined #c (1 here)")
        alice.send_line("/rooms")
        alice.expect("*** 1 online in 3 rooms: #b (1), #c (1), #lobby (1)")

    def test_part_leaves_one_room_and_the_last_entered_is_current(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#go", 1)
        self.opened(alice, "alice", "#rust", 1)
        self.opened(alice, "alice", "#go", 2, bob)
        alice.send_line("/part")  # the current room, #go
        alice.expect("*** alice left (parted)", "*** talking in #rust now")
        bob.expect("*** alice left (parted)")
        alice.send_line("/part #lobby")  # not the current room: marked
        alice.expect("#lobby *** alice left (parted)", "*** talking in #rust now")
        bob.expect("#lobby *** alice left (parted)")
        alice.send_line("/part #lobby")
        alice.expect("!!! you are not in #lobby")
        alice.send_line("/part bad!name")
        self.assertTrue(alice.read_line().startswith("!!! invalid room name: #bad!name"))
        alice.send_line("/part rust")
        alice.expect("*** alice left (parted)", "*** you are in no room: /join ROOM")
        for line in ("hello?", "/me waits", "/topic", "/who", "/history", "/search x", "/part"):
            alice.send_line(line)
            alice.expect("!!! you are in no room: /join ROOM")
        alice.send_line("/msg bob still here")  # private messages need no room
        alice.expect("-> *bob* still here")
        bob.expect("*alice* still here")
        alice.send_line("/rooms")
        alice.expect("*** 2 online in 2 rooms: #go (1), #lobby (1)")
        alice.send_line("/join go")  # in no room: /join just enters
        alice.expect("*** alice joined #go (2 here)")
        bob.expect("*** alice joined #go (2 here)")

    def test_join_keeps_its_v2_meaning(self):
        alice, bob, carol = self.person("alice"), self.person("bob"), self.person("carol")
        self.opened(bob, "bob", "#rust", 1)
        self.opened(alice, "alice", "#rust", 2, bob)
        alice.send_line("/join #go")  # leaves #rust (current), stays in the lobby
        alice.expect("*** alice joined #go (1 here)")
        bob.expect("*** alice left (went to #go)")
        carol.send_line("still lobby")
        carol.expect("<carol> still lobby")
        alice.expect("#lobby <carol> still lobby")
        bob.expect("#lobby <carol> still lobby")
        alice.send_line("/join #lobby")  # one of its rooms: it only becomes current
        alice.expect("*** talking in #lobby now")  # (and it left #go, where nobody was)
        alice.send_line("/who #go")
        alice.expect("*** 0 in #go:")
        carol.send_line("/join #lobby")
        carol.expect("!!! you are already in #lobby")

    def test_msg_to_a_room_says_it_there(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(alice, "alice", "#rust", 1)
        alice.send_line("/msg #lobby from rust")
        alice.expect("#lobby <alice> from rust")
        bob.expect("<alice> from rust")
        alice.send_line("/msg #go hi")
        alice.expect("!!! you are not in #go")
        alice.send_line("/msg lobby hi")  # without #: a nick
        alice.expect("!!! no such user: lobby")

    def test_history_of_any_of_its_rooms(self):
        alice, bob = self.person("alice"), self.person("bob")
        bob.send_line("one")
        bob.expect("<bob> one")
        alice.wait_for("<bob> one")
        self.opened(alice, "alice", "#rust", 1)
        alice.send_line("/history #lobby 1")
        alice.expect("*** the last 1 message in #lobby (times in UTC):")
        self.assertTrue(alice.read_line().endswith("<bob> one"))
        alice.expect("*** end of history")
        alice.send_line("/history #lobby after 999999")
        alice.expect("*** no messages in #lobby after 999999")
        alice.send_line("/history #rust")
        alice.expect("*** no messages in #rust yet")
        alice.send_line("/history")
        alice.expect("*** no messages in #rust yet")
        alice.send_line("/history #go")
        alice.expect("!!! you are not in #go")
        alice.send_line("/history #lobby x")
        alice.expect("!!! usage: /history [N]")
        alice.send_line("/history #lobby after x")
        alice.expect("!!! usage: /history after ID")

    def test_a_line_about_a_person_reaches_each_connection_once(self):
        alice, bob, carol = self.person("alice"), self.person("bob"), self.person("carol")
        for peer, nick, here in ((alice, "alice", 1), (bob, "bob", 2), (carol, "carol", 3)):
            self.opened(peer, nick, "#rust", here, *[p for p in (alice, bob) if p is not peer
                                                     and here > 1][:here - 1])
        alice.send_line("/nick al")
        alice.expect("*** alice is now known as al")  # once, unmarked
        alice.send_line("/msg #lobby mark")  # after the rename in both rooms' order
        alice.send_line("/msg #rust mark")
        for peer in (bob, carol, alice):
            seen = self.wait_for_each(peer, "#lobby <al> mark", "<al> mark")
            self.assertEqual(seen, [] if peer is alice else ["*** alice is now known as al"])
        alice.send_line("/quit bye")
        carol.expect("*** al left (bye)")  # carol shares both rooms with al: once
        carol.send_line("/msg #lobby mark2")
        carol.send_line("/msg #rust mark2")
        seen = self.wait_for_each(bob, "#lobby <carol> mark2", "<carol> mark2")
        self.assertEqual(seen, ["*** al left (bye)"])

    def test_a_rename_then_a_part_in_one_packet_is_still_told_once(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#a", 1)
        bob.send_line("/open #lobby")
        bob.expect("*** talking in #lobby now")
        bob.send_raw(b"/nick bob2\n/part #lobby\n")  # in one pass: the rename's copies, a part
        bob.expect("*** bob is now known as bob2", "*** bob2 left (parted)",
                   "*** talking in #a now")
        bob.send_line("/nick bob3")  # in one room now, unmarked; and in none: itself
        bob.expect("*** bob2 is now known as bob3")
        bob.send_line("/part")
        bob.expect("*** bob3 left (parted)", "*** you are in no room: /join ROOM")
        bob.send_line("/nick bob4")
        bob.expect("*** bob3 is now known as bob4")

    def test_quitting_with_a_reason_that_looks_like_a_part_still_leaves_the_chat(self):
        alice, bob = self.person("alice"), self.person("bob")
        bob.send_line("/quit parted")
        alice.wait_for("*** bob left (parted)")
        self.until_answered(alice, "/rooms", "*** 1 online in 1 room: #lobby (1)")
        again = Peer(self.ports[-1])
        self.addCleanup(again.close)
        again.send_line("bob")  # the nick is free again, on every server
        again.wait_for("*** bob joined (2 online)")

    def test_who_and_rooms_work_for_any_room_and_count_people(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#rust", 1)
        self.opened(alice, "alice", "#go", 1)
        alice.send_line("/who #rust")
        alice.expect("*** 1 in #rust: bob")
        alice.send_line("/who rust")
        alice.expect("*** 1 in #rust: bob")
        alice.send_line("/who")
        alice.expect("*** 1 in #go: alice")
        alice.send_line("/who #nobody")
        alice.expect("*** 0 in #nobody:")
        alice.send_line("/who #no way")
        self.assertTrue(alice.read_line().startswith("!!! invalid room name"))
        alice.send_line("/rooms")
        alice.expect("*** 2 online in 3 rooms: #lobby (2), #go (1), #rust (1)")
        carol = self.person("carol")
        carol.send_line("/rooms")
        carol.expect("*** 3 online in 3 rooms: #lobby (3), #go (1), #rust (1)")

    def test_json_objects_carry_their_room(self):
        alice = self.person("alice")
        bob = self.person("bob", json_mode=True)
        bob.send_line("/open #rust")
        self.assertEqual(self.read_json(bob), {"type": "joined", "nick": "bob", "room": "#rust",
                                               "count": 1})
        alice.send_line("in the lobby")
        alice.expect("<alice> in the lobby")
        obj = self.read_json(bob)
        self.assertEqual((obj["type"], obj["room"], obj["text"]),
                         ("message", "#lobby", "in the lobby"))
        bob.send_line("/open #lobby")
        self.assertEqual(self.read_json(bob), {"type": "notice", "text": "talking in #lobby now",
                                               "room": "#lobby"})
        bob.send_line("/open #a")
        self.read_json(bob)
        bob.send_line("/open #b")
        self.assertEqual(self.read_json(bob), {"type": "error", "code": "too_many_rooms",
                                               "text": "you are in 3 rooms: /part one first"})
        bob.send_line("/part #nope")
        self.assertEqual(self.read_json(bob), {"type": "error", "code": "not_in_room",
                                               "text": "you are not in #nope"})
        bob.send_line("/part #a")
        self.assertEqual(self.read_json(bob), {"type": "left", "nick": "bob", "room": "#a",
                                               "reason": "parted"})
        self.assertEqual(self.read_json(bob), {"type": "notice", "text": "talking in #rust now",
                                               "room": "#rust"})
        alice.send_line("/nick al")  # about a person: once, in a room they share
        alice.expect("*** alice is now known as al")
        alice.send_line("/msg bob mark")
        self.assertEqual(self.read_json(bob), {"type": "renamed", "old": "alice", "new": "al",
                                               "room": "#lobby"})
        self.assertEqual(self.read_json(bob)["type"], "private")
        bob.send_line("/part #lobby")
        self.read_json(bob)
        self.read_json(bob)
        bob.send_line("/part")
        self.assertEqual(self.read_json(bob), {"type": "left", "nick": "bob", "room": "#rust",
                                               "reason": "parted"})
        self.assertEqual(self.read_json(bob), {"type": "notice", "room": None,
                                               "text": "you are in no room: /join ROOM"})
        bob.send_line("hello")
        self.assertEqual(self.read_json(bob), {"type": "error", "code": "not_in_room",
                                               "text": "you are in no room: /join ROOM"})

    def test_away(self):
        alice, bob = self.person("alice"), self.person("bob")
        alice.send_line("/away lunch, back at 2")
        alice.expect("*** you are marked away: lunch, back at 2")
        alice.send_line("/who")
        alice.expect("*** 2 in #lobby: alice (away), bob")
        self.until_answered(bob, "/who", "*** 2 in #lobby: alice (away), bob")
        bob.send_line("/msg alice are you there?")
        bob.expect("-> *alice* are you there?", "*** alice is away: lunch, back at 2")
        alice.expect("*bob* are you there?")
        bob.send_line("/who")
        bob.expect("*** 2 in #lobby: alice (away), bob")
        alice.send_line("/away")
        alice.expect("*** you are back")
        alice.send_line("/who")
        alice.expect("*** 2 in #lobby: alice, bob")
        self.until_answered(bob, "/who", "*** 2 in #lobby: alice, bob")
        bob.send_line("/msg alice now?")
        bob.expect("-> *alice* now?")
        alice.expect("*bob* now?")
        self.assertEqual(bob.sync(), [])

    def test_away_in_json_and_it_ends_with_the_connection(self):
        alice = self.person("alice")
        bob = self.person("bob", json_mode=True)
        alice.send_line("/away gone fishing")
        alice.expect("*** you are marked away: gone fishing")
        alice.send_line("/who")
        alice.expect("*** 2 in #lobby: alice (away), bob")
        bob.send_line("/format text")
        bob.expect("*** format: text")
        self.until_answered(bob, "/who", "*** 2 in #lobby: alice (away), bob")
        bob.send_line("/format json")
        self.assertEqual(self.read_json(bob), {"type": "notice", "text": "format: json"})
        bob.send_line("/who")
        self.assertEqual(self.read_json(bob), {"type": "who", "room": "#lobby",
                                               "nicks": ["alice", "bob"], "operators": [],
                                               "away": ["alice"]})
        bob.send_line("/msg alice hi")
        self.assertEqual(self.read_json(bob)["type"], "private")
        self.assertEqual(self.read_json(bob), {"type": "notice", "nick": "alice",
                                               "away": "gone fishing",
                                               "text": "alice is away: gone fishing"})
        bob.send_line("/away brb")
        self.assertEqual(self.read_json(bob), {"type": "notice", "away": "brb",
                                               "text": "you are marked away: brb"})
        bob.send_line("/away")
        self.assertEqual(self.read_json(bob), {"type": "notice", "away": None,
                                               "text": "you are back"})
        alice.send_line("/quit")
        self.assertEqual(self.read_json(bob)["type"], "left")
        self.online.remove(alice)
        again = Peer(self.ports[0])
        self.addCleanup(again.close)
        again.send_line("alice")
        again.wait_for("*** alice joined (2 online)")
        again.send_line("/who")
        again.wait_for("*** 2 in #lobby: alice, bob")


class SeveralRoomsTest(SeveralRoomsRules, ServerTestCase):

    def start_servers(self, **limits):
        self.start_server(op_password="0p", **limits)
        return [self.port]

    def test_a_kicked_member_of_several_rooms_sees_its_kick_once(self):
        alice, bob = self.person("alice"), self.person("bob")
        self.opened(bob, "bob", "#a", 1)
        alice.send_line("/op 0p")
        alice.expect("*** alice is now an operator")
        alice.send_line("/kick bob spam")
        alice.expect("*** bob was kicked by alice (spam)")
        lines = bob.expect_closed()
        self.assertEqual(lines.count("*** bob was kicked by alice (spam)"), 1, lines)

    def test_moderation_of_someone_in_several_rooms_is_told_once(self):
        alice, bob, carol = self.person("alice"), self.person("bob"), self.person("carol")
        self.opened(bob, "bob", "#rust", 1)
        self.opened(carol, "carol", "#rust", 2, bob)
        alice.send_line("/op 0p")
        alice.expect("*** alice is now an operator")
        alice.send_line("/mute bob")  # alice shares #lobby with bob: she sees it there
        alice.expect("*** bob was muted by alice")
        self.assertEqual(bob.wait_for("*** bob was muted by alice"),  # about a person:
                         ["*** alice is now an operator"])  # unmarked, once
        carol.send_line("/msg #lobby mark")
        carol.send_line("/msg #rust mark")
        seen = self.wait_for_each(carol, "#lobby <carol> mark", "<carol> mark")
        self.assertEqual(seen, ["*** alice is now an operator",  # about a person
                                "*** bob was muted by alice"])
        bob.send_line("/part")
        bob.wait_for("*** bob left (parted)")  # (after carol's marks)
        bob.expect("*** talking in #lobby now")
        bob.send_line("/part")
        bob.expect("*** bob left (parted)", "*** you are in no room: /join ROOM")
        alice.wait_for("*** bob left (parted)")
        alice.send_line("/kick bob")  # in no room: bob and the operator are told
        alice.expect("*** bob was kicked by alice (no reason given)")
        self.assertEqual(bob.expect_closed(), ["*** bob was kicked by alice (no reason given)"])


class ListenerTest(ServerTestCase):
    """The server accepts on a list of listeners, each with the codec its
    connections start with: one chat on all of them."""

    def test_a_second_listener_whose_connections_start_in_json(self):
        extra = chat.Listener("127.0.0.1", 0, codec=chat.JSON_CODEC)
        server = serve_in_thread(self, listeners=[extra])
        self.port = server.address[1]
        self.assertNotEqual(extra.address[1], self.port)
        alice = self.join("alice")
        bot = Peer(extra.address[1])
        self.addCleanup(bot.close)
        greeting = json.loads(bot.read_line())
        self.assertEqual((greeting["type"], greeting["text"]),
                         ("notice", "welcome to chat.py (1 online)"))
        # (the nickname question follows, as JSON)
        self.assertEqual(json.loads(bot.read_line())["type"], "notice")
        bot.send_line("bot")
        self.assertEqual(json.loads(bot.read_line())["type"], "joined")
        alice.expect("*** bot joined (2 online)")
        alice.send_line("hello bot")
        alice.expect("<alice> hello bot")
        said = json.loads(bot.read_line())
        self.assertEqual((said["type"], said["nick"], said["text"]), ("message", "alice",
                                                                      "hello bot"))
        bot.send_line("/format text")  # a codec like any other: /format changes it
        bot.expect("*** format: text")


# --- The web: HTTP and WebSocket ------------------------------------------------

def http_get(port, path, method="GET", headers=(), raw=None):
    """(status, headers dict, body) of one request to the server at port."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(raw if raw is not None else (
            "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (
                method, path, port, "".join("%s: %s\r\n" % h for h in headers))).encode())
        data = b""
        while True:  # to the close, or (a server that keeps it open) Content-Length
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if _ and found and len(body) >= int(found.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), fields, body


class WsPeer:
    """A WebSocket client (RFC 6455), written here with the standard library,
    as a browser speaks to the server."""

    def __init__(self, port, origin=None, host=None, path="/ws", protocols=None,
                 first_frames=()):
        import base64
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        host = host or "127.0.0.1:%d" % port
        request = ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                   "Sec-WebSocket-Version: 13\r\n%s%s\r\n"
                   % (path, host, key, "Origin: %s\r\n" % origin if origin else "",
                      "Sec-WebSocket-Protocol: %s\r\n" % protocols if protocols else ""))
        self.sock.sendall(request.encode() + b"".join(
            self.frame(line.encode()) for line in first_frames))
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1])
        self.headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:]
                            if ": " in line)
        self.accept = self.headers.get("Sec-WebSocket-Accept")
        self.expected_accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()

    def close(self):
        self.sock.close()

    def send_frame(self, payload, opcode=0x1, fin=True, masked=True):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.sock.sendall(self.frame(payload, opcode, fin, masked))

    @staticmethod
    def frame(payload, opcode=0x1, fin=True, masked=True):
        head = bytes([(0x80 if fin else 0) | opcode])
        size = len(payload)
        mark = 0x80 if masked else 0
        if size < 126:
            head += bytes([mark | size])
        elif size < 65536:
            head += bytes([mark | 126]) + struct.pack(">H", size)
        else:
            head += bytes([mark | 127]) + struct.pack(">Q", size)
        if masked:
            mask = os.urandom(4)
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            head += mask
        return head + payload

    def send_line(self, text):
        self.send_frame(text)

    def _need(self, size):
        while len(self.buf) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk

    def read_message(self):
        """(opcode, payload) of the next message, its fragments joined."""
        opcode, payload = self.read_frame()
        while opcode is not None and not self.fin:
            more, rest = self.read_frame()
            payload += rest
        return opcode, payload

    def read_frame(self):
        """(opcode, payload) of the next frame; (None, b"") when closed."""
        try:
            self._need(2)
            size, start = self.buf[1] & 0x7F, 2
            if size == 126:
                self._need(4)
                size, start = struct.unpack(">H", self.buf[2:4])[0], 4
            elif size == 127:
                self._need(10)
                size, start = struct.unpack(">Q", self.buf[2:10])[0], 10
            self.assert_unmasked = not self.buf[1] & 0x80
            self._need(start + size)
        except (EOFError, ConnectionResetError):
            return None, b""
        opcode, payload = self.buf[0] & 0x0F, self.buf[start:start + size]
        self.fin = bool(self.buf[0] & 0x80)
        self.buf = self.buf[start + size:]
        return opcode, payload

    def read_json(self):
        opcode, payload = self.read_frame()
        if opcode != 0x1:
            raise AssertionError("expected a text frame, got %r %r" % (opcode, payload))
        obj = json.loads(payload)
        obj.pop("time", None)
        return obj

    def wait_for(self, **fields):
        """Skip objects until one with these fields; return it."""
        while True:
            obj = self.read_json()
            if all(obj.get(name) == value for name, value in fields.items()):
                return obj


class WebTest(ServerTestCase):
    """docs/protocol.md, "The web": HTTP answers, and a WebSocket that is a
    chat connection like any other."""

    def setUp(self):
        self.web = chat.Listener("127.0.0.1", 0, codec=chat.WEB_CODEC)
        server = serve_in_thread(self, listeners=[self.web], limits=chat.Limits(max_line=64))
        self.server, self.port = server, server.address[1]
        self.web_port = self.web.address[1]

    def ws(self, nick=None, **options):
        peer = WsPeer(self.web_port, **options)
        self.addCleanup(peer.close)
        if nick is not None:
            self.assertEqual(peer.status, 101)
            peer.wait_for(type="notice", text="choose a nickname: 1-24 letters, digits, _ or -")
            peer.send_line(nick)
            peer.wait_for(type="joined", nick=nick)
        return peer

    def test_the_ircv3_subprotocol_speaks_irc_a_line_a_frame(self):
        bob = self.join("bob")
        bob.send_line("/join #rust")
        bob.expect("*** bob joined #rust (1 here)")
        wendy = self.ws(protocols="binary.ircv3.net, text.ircv3.net")
        self.assertEqual(wendy.status, 101)
        self.assertEqual(wendy.headers.get("Sec-WebSocket-Protocol"), "text.ircv3.net")

        def irc_frame(pattern):
            while True:
                opcode, payload = wendy.read_frame()
                self.assertEqual(opcode, 0x1, payload)
                line = payload.decode()
                self.assertNotIn("\n", line)
                if re.search(pattern, line):
                    return line
        for line in ("CAP LS 302", "NICK wendy", "USER wendy 0 * :Wendy", "CAP END"):
            wendy.send_line(line)
        sent_at_once = WsPeer(self.web_port, protocols="text.ircv3.net", first_frames=[
            "NICK early", "USER early 0 * :Early"])  # frames in the handshake's own write
        self.addCleanup(sent_at_once.close)
        while b" 001 early " not in sent_at_once.read_frame()[1]:
            pass
        self.assertIn("draft/chathistory", irc_frame(r"^:chat\.py CAP \* LS :"))
        irc_frame(r"^:chat\.py 001 wendy :")
        wendy.send_line("JOIN #rust\r\n")  # (a line end is forgiven)
        irc_frame(r"^:chat\.py 353 wendy = #rust :(bob wendy|wendy bob)$")
        bob.expect("*** wendy joined #rust (2 here)")
        bob.send_line("hi wendy")
        irc_frame(r"^:bob!bob@chat\.py PRIVMSG #rust :hi wendy$")
        wendy.send_line("PRIVMSG #rust :" + "long " * 30)  # past --max-line 64: refused
        irc_frame(r"^:chat\.py 417 wendy :line too long \(max 64 bytes\)$")
        wendy.send_line("PRIVMSG #rust :short")
        bob.expect("<bob> hi wendy", "<wendy> short")
        wendy.send_line("PING :web")
        irc_frame(r"^:chat\.py PONG chat\.py :web$")
        wendy.send_line("QUIT :bye")
        bob.expect("*** wendy left (bye)")

    def test_the_page_health_metrics_and_the_other_answers(self):
        status, headers, body = http_get(self.web_port, "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        self.assertIn("default-src 'none'", headers["content-security-policy"])
        self.assertIn(b'aria-label="message"', body)
        self.assertNotIn(b"http://", body.replace(b"http://www.w3.org", b""))  # nothing fetched
        status, headers, body = http_get(self.web_port, "/", method="HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(headers["content-length"]), 1000)
        self.assertEqual(http_get(self.web_port, "/health")[::2], (200, b"ok"))
        status, headers, body = http_get(self.web_port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b'chat_connections{kind="web"}', body)
        self.assertIn(b"chat_messages_relayed_total", body)
        self.assertEqual(http_get(self.web_port, "/nope")[0], 404)
        status, headers, _ = http_get(self.web_port, "/", method="POST")
        self.assertEqual((status, headers["x-content-type-options"]), (405, "nosniff"))
        self.assertEqual(http_get(self.web_port, "/", raw=b"GET / HTTP/1.1\r\nX: " +
                                  b"y" * 9000 + b"\r\n\r\n")[0], 431)

    def test_a_websocket_user_and_an_nc_user_talk_in_one_room(self):
        bob = self.ws()
        self.assertEqual((bob.status, bob.accept), (101, bob.expected_accept))
        self.assertEqual(bob.read_json(), {"type": "notice", "text": "welcome to chat.py (0 online)"})
        bob.read_json()
        bob.send_line("bob")
        self.assertEqual(bob.read_json(), {"type": "joined", "nick": "bob", "room": "#lobby",
                                           "count": 1})
        self.assertTrue(bob.assert_unmasked)  # the server's frames are not masked
        alice = self.join("alice")
        bob.wait_for(type="joined", nick="alice")
        alice.send_line("hi web")
        alice.expect("<alice> hi web")
        said = bob.wait_for(type="message")
        self.assertEqual((said["nick"], said["text"], said["room"]), ("alice", "hi web", "#lobby"))
        bob.send_line("hi nc")
        alice.expect("<bob> hi nc")
        bob.send_line("/format text")
        self.assertEqual(bob.wait_for(type="error"), {"type": "error", "code": "usage",
                                                      "text": "the web connection speaks JSON"})
        bob.send_frame(b"", opcode=0x8)  # the browser closes the page
        self.assertEqual(bob.read_frame()[0], 0x8)
        alice.expect("*** bob left (connection closed)")

    def test_frames_fragments_pings_and_limits(self):
        bob = self.ws("bob")
        alice = self.join("alice")
        bob.wait_for(type="joined", nick="alice")
        bob.send_frame("frag", fin=False)
        bob.send_frame("mented", opcode=0x0)
        alice.expect("<bob> fragmented")
        bob.send_frame(b"are you there", opcode=0x9)
        frame = bob.read_frame()
        while frame[0] == 0x1:  # (its own line's echo first)
            frame = bob.read_frame()
        self.assertEqual(frame, (0xA, b"are you there"))
        bob.send_line("x" * 65)  # over --max-line (64 here), as a long line is
        self.assertEqual(bob.wait_for(type="error")["code"], "line_too_long")
        bob.send_frame("y" * 40, fin=False)
        bob.send_frame("y" * 40, opcode=0x0)  # fragments together over the limit
        self.assertEqual(bob.wait_for(type="error")["code"], "line_too_long")
        bob.send_line("still here")
        alice.expect("<bob> still here")

    def test_binary_and_unmasked_frames_close_and_others_are_not_disturbed(self):
        alice = self.join("alice")
        bob = self.ws("bob")
        alice.wait_for("*** bob joined (2 online)")
        bob.send_frame(b"\x00\x01", opcode=0x2)
        while True:
            opcode, payload = bob.read_frame()
            if opcode != 0x1:
                break
        self.assertEqual((opcode, struct.unpack(">H", payload[:2])[0]), (0x8, 1003))
        alice.expect("*** bob left (connection closed)")
        carol = self.ws("carol")
        alice.wait_for("*** carol joined (2 online)")
        carol.send_frame("unmasked", masked=False)
        while True:
            opcode, payload = carol.read_frame()
            if opcode != 0x1:
                break
        self.assertEqual((opcode, struct.unpack(">H", payload[:2])[0]), (0x8, 1002))
        alice.expect("*** carol left (connection closed)")
        alice.send_line("/ping fine")
        alice.expect("*** pong fine")

    def test_an_origin_of_another_site_is_refused(self):
        self.assertEqual(self.ws(origin="http://evil.example").status, 403)
        self.assertEqual(self.ws(origin="http://127.0.0.1:%d" % self.web_port).status, 101)
        self.assertEqual(self.ws(origin="http://127.0.0.1:1").status, 403)

    def test_a_silent_websocket_is_pinged_and_a_slow_request_is_closed(self):
        shorten(self, WS_PING_S=0.2)
        bob = self.ws("bob")
        frame = bob.read_frame()
        while frame[0] == 0x1:
            frame = bob.read_frame()
        self.assertEqual(frame, (0x9, b""))  # silent for WS_PING_S: pinged
        self.server.limits.register_timeout = 0.3
        with socket.create_connection(("127.0.0.1", self.web_port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
            self.assertEqual(sock.recv(100), b"")  # closed, bounded by the timeout

    def test_web_origin_allows_a_named_site(self):
        web = chat.Listener("127.0.0.1", 0, codec=chat.WEB_CODEC)
        serve_in_thread(self, listeners=[web], web_origins=["https://chat.example.org"])
        peer = WsPeer(web.address[1], origin="https://chat.example.org")
        self.addCleanup(peer.close)
        self.assertEqual(peer.status, 101)
        other = WsPeer(web.address[1], origin="https://elsewhere.example.org")
        self.addCleanup(other.close)
        self.assertEqual(other.status, 403)

    def test_a_handshake_that_is_not_one_gets_400(self):
        self.assertEqual(http_get(self.web_port, "/ws")[0], 400)


class WebTlsTest(ServerTestCase):
    """--web with the server's certificate: HTTPS (the same loop's TLS)."""

    def test_https_with_the_servers_certificate(self):
        context, _ = chat.server_tls_context(write_file(self, "cert.pem", TEST_CERT),
                                             write_file(self, "key.pem", TEST_KEY))
        web = chat.Listener("127.0.0.1", 0, context, chat.WEB_CODEC)
        server = serve_in_thread(self, listeners=[web])
        client = ssl.create_default_context(cadata=TEST_CERT)
        with socket.create_connection(("127.0.0.1", web.address[1]), timeout=TIMEOUT) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                data = b""
                while not data.endswith(b"\r\n\r\nok"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertIn(b"\r\nX-Content-Type-Options: nosniff\r\n", data)


CHROMIUM = next((path for path in (shutil.which(name) for name in (
    "chromium", "chromium-browser", "google-chrome")) if path), None)
NO_CHROMIUM = ("no chromium (Debian: apt-get install chromium; .ci/run installs it): "
               "the browser tests are skipped")


class Browser:
    """A headless Chromium, driven over its DevTools protocol with the
    WebSocket client above: navigate, evaluate JavaScript, wait for the page."""

    def __init__(self, case, width=1024, height=768):
        folder = tempfile.mkdtemp(prefix="chat-chromium-")
        case.addCleanup(shutil.rmtree, folder, True)
        args = [CHROMIUM, "--headless=new", "--remote-debugging-port=0",
                "--user-data-dir=" + folder, "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--window-size=%d,%d" % (width, height), "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # (as root it refuses to start with its sandbox)
        self.proc = start_process(case, args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port = self._devtools_port(case)
        status, _, body = http_get(port, "/json/list")
        page = next(target for target in json.loads(body) if target["type"] == "page")
        path = urllib.parse.urlsplit(page["webSocketDebuggerUrl"]).path
        self.devtools = WsPeer(port, path=path)
        case.addCleanup(self.devtools.close)
        self.next_id = 0

    def _devtools_port(self, case):
        deadline = time.monotonic() + 30
        seen = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stderr, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(deadline - time.monotonic()):
                    chunk = os.read(self.proc.stderr.fileno(), 65536)
                    if not chunk:
                        break
                    seen += chunk
                    found = re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", seen)
                    if found:
                        return int(found.group(1))
        case.fail("chromium did not start: %r" % seen[-500:])

    def call(self, method, **params):
        self.next_id += 1
        self.devtools.send_line(json.dumps({"id": self.next_id, "method": method,
                                            "params": params}))
        while True:
            opcode, payload = self.devtools.read_message()
            if opcode is None:
                raise AssertionError("chromium closed its DevTools connection")
            answer = json.loads(payload)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise AssertionError("%s: %s" % (method, answer["error"]))
                return answer["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_until(self, expression, timeout=TIMEOUT):
        """Evaluate until it is true (the page works on its own time); return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("never true: %s; the log: %r" % (
                    expression, self.evaluate("document.getElementById('log') && "
                                              "document.getElementById('log').innerText")))
            time.sleep(0.05)  # polling the page, bounded by the deadline

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait_until("document.readyState === 'complete' && !!document.getElementById('enter')")

    def enter(self, nick, password="", room_password=""):
        self.evaluate("document.getElementById('nickname').value = %s;"
                      "document.getElementById('password').value = %s;"
                      "document.getElementById('roompassword').value = %s;"
                      "document.getElementById('enter').requestSubmit()"
                      % (json.dumps(nick), json.dumps(password), json.dumps(room_password)))
        self.wait_until("document.getElementById('app').classList.contains('on')")

    def type(self, text):
        self.evaluate("document.getElementById('message').value = %s;"
                      "document.getElementById('say').requestSubmit()" % json.dumps(text))

    def log_has(self, text):
        return self.wait_until("document.getElementById('log').innerText.includes(%s)"
                               % json.dumps(text))


class BrowserTest(ServerTestCase):
    """The web page in a real headless Chromium (docs/protocol.md, "The web")."""

    @classmethod
    def setUpClass(cls):
        if CHROMIUM is None:
            raise unittest.SkipTest(NO_CHROMIUM)

    def serve(self, web_port=0, db=None):
        self.web = chat.Listener("127.0.0.1", web_port, codec=chat.WEB_CODEC)
        store = chat.SQLiteStore(db) if db else None
        server = serve_in_thread(self, port=getattr(self, "port_fixed", 0),
                                 listeners=[self.web], store=store)
        self.server, self.port = server, server.address[1]
        self.url = "http://127.0.0.1:%d/" % self.web.address[1]
        return server

    def test_a_nick_talk_with_an_nc_user_history_and_hostile_text(self):
        self.serve()
        alice = self.join("alice")
        alice.send_line("said before")
        alice.expect("<alice> said before")
        browser = Browser(self)
        browser.open(self.url)
        browser.enter("ann")
        alice.expect("*** ann joined (2 online)")
        browser.log_has("said before")  # the replay on joining, marked
        self.assertTrue(browser.evaluate(
            "[...document.querySelectorAll('#log li.history')].some("
            "li => li.innerText.includes('said before') && li.innerText.includes('earlier'))"))
        browser.type("hello from the web")
        alice.expect("<ann> hello from the web")
        alice.send_line('<img src=x onerror="window.pwned=1"> & <b>bold</b>')
        browser.log_has('<img src=x onerror="window.pwned=1"> & <b>bold</b>')
        self.assertEqual(browser.evaluate(
            "[document.querySelectorAll('#log img, #log b').length, typeof window.pwned]"),
            [0, "undefined"])

    def test_a_second_room_its_unread_count_and_a_private_message(self):
        self.serve()
        alice = self.join("alice")
        browser = Browser(self)
        browser.open(self.url)
        browser.enter("ann")
        alice.expect("*** ann joined (2 online)")
        browser.type("/open #rust")
        browser.wait_until("document.getElementById('title').innerText === '#rust'")
        alice.send_line("in the lobby, while ann reads #rust")
        alice.expect("<alice> in the lobby, while ann reads #rust")
        browser.wait_until("[...document.querySelectorAll('#mine button')].some("
                           "b => b.innerText.includes('#lobby') && b.innerText.includes('1'))")
        alice.send_line("/msg ann psst")
        alice.expect("-> *ann* psst")
        browser.wait_until("document.getElementById('privs').innerText.includes('alice')")
        browser.evaluate("[...document.querySelectorAll('#privs button')][0].click()")
        browser.log_has("psst")
        browser.type("back at you")  # in a private conversation: a /msg
        alice.expect("*ann* back at you")

    def test_no_horizontal_scrolling_at_360_pixels(self):
        self.serve()
        alice = self.join("alice")
        browser = Browser(self, width=360, height=740)
        browser.call("Emulation.setDeviceMetricsOverride", width=360, height=740,
                     deviceScaleFactor=1, mobile=True)
        browser.open(self.url)
        browser.enter("ann")
        alice.send_line("x" * 300 + " a long line without a break, and " + "y" * 50)
        browser.log_has("a long line without a break")
        self.assertLessEqual(browser.evaluate("document.documentElement.scrollWidth"), 360)

    def test_it_reconnects_after_a_restart_and_shows_what_was_missed_once(self):
        db = os.path.join(tempfile.mkdtemp(prefix="chat-web-"), "chat.db")
        self.addCleanup(shutil.rmtree, os.path.dirname(db), True)
        server = self.serve(db=db)
        web_port, self.port_fixed = self.web.address[1], self.port
        alice = self.join("alice")
        browser = Browser(self)
        browser.open(self.url)
        browser.enter("ann")
        alice.expect("*** ann joined (2 online)")
        alice.send_line("before the restart")
        browser.log_has("before the restart")
        alice.close()
        server.shutdown()
        browser.wait_until("document.getElementById('state').innerText.includes('reconnecting')")
        self.serve(web_port=web_port, db=db)
        bob = self.join("bob")
        bob.send_line("said while ann was away")
        bob.wait_for("<bob> said while ann was away")  # (after the lobby's replay)
        bob.wait_for("*** ann joined (2 online)")
        bob.send_line("after she came back")
        browser.log_has("after she came back")
        text = browser.evaluate("document.getElementById('log').innerText")
        self.assertEqual(text.count("said while ann was away"), 1, text)
        self.assertEqual(text.count("before the restart"), 1, text)
        self.assertLess(text.index("said while ann was away"), text.index("after she came back"))


class WebProcessTest(unittest.TestCase):

    def test_the_server_prints_the_pages_address(self):
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0", "--web",
                                    "0", "--db", ":memory:"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = []
        while True:
            line = proc.stderr.readline().decode()
            self.assertTrue(line, log)
            log.append(line)
            found = re.search(r"the web page: (http://127\.0\.0\.1:(\d+)/)$", line.strip())
            if found:
                break
        self.assertEqual(http_get(int(found.group(2)), "/health")[::2], (200, b"ok"))
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)


# --- IRC ---------------------------------------------------------------------------

class IrcPeer(Peer):
    """A raw IRC client: CRLF lines; lines read are IRC lines."""

    def send_line(self, text):
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def read_line(self, timeout=TIMEOUT):
        line = super().read_line(timeout)
        return None if line is None else line.rstrip("\r")

    def wait_for_irc(self, pattern):
        """Skip lines until one matching the regular expression; return it."""
        while True:
            line = self.read_line()
            if line is None:
                raise AssertionError("closed before %r; saw %r" % (pattern, self.seen[-10:]))
            if re.search(pattern, line):
                return line


class IrcTest(ServerTestCase):
    """docs/protocol.md, "IRC" (a first part): registration, channels,
    messages, and nc and IRC users in one room."""

    def setUp(self):
        self.irc = chat.Listener("127.0.0.1", 0, codec=chat.IRC_CODEC)
        server = serve_in_thread(self, listeners=[self.irc], op_password="0p",
                                 motd=["Be kind."])
        self.server, self.port = server, server.address[1]

    def irc_user(self, nick, caps=False):
        peer = IrcPeer(self.irc.address[1])
        self.addCleanup(peer.close)
        if caps:
            peer.send_line("CAP LS 302")
        peer.send_line("NICK " + nick)
        peer.send_line("USER %s 0 * :%s" % (nick, nick))
        if caps:
            peer.wait_for_irc(r"^:chat\.py CAP \* LS :")
            peer.send_line("CAP END")
        peer.wait_for_irc(r"^:chat\.py 001 %s :" % nick)
        return peer

    def test_registration_welcome_isupport_motd_and_ping(self):
        ann = self.irc_user("ann", caps=True)
        isupport = ann.wait_for_irc(r"^:chat\.py 005 ann ")
        for token in ("CASEMAPPING=rfc8265", "CHANTYPES=#", "NICKLEN=24", "CHANNELLEN=",
                      "TOPICLEN="):
            self.assertIn(token, isupport)
        ann.wait_for_irc(r"^:chat\.py 375 ann ")
        self.assertEqual(ann.read_line(), ":chat.py 372 ann :- Be kind.")
        ann.wait_for_irc(r"^:chat\.py 376 ann ")
        ann.send_line("PING :lag-1")
        ann.wait_for_irc(r"^:chat\.py PONG chat\.py :lag-1$")
        bob = self.join("bob")  # an IRC user is in no room: not announced in the lobby
        bob.send_line("/who")
        bob.expect("*** 1 in #lobby: bob")
        bob.send_line("/rooms")
        bob.expect("*** 2 online in 1 room: #lobby (1)")

    def test_irc_and_nc_users_in_one_channel(self):
        ann = self.irc_user("ann")
        bob = self.join("bob")
        bob.send_line("/join #rust")
        bob.expect("*** bob joined #rust (1 here)")
        bob.send_line("said before")
        bob.expect("<bob> said before")
        ann.send_line("JOIN #rust,#go")
        ann.wait_for_irc(r"^:ann!ann@chat\.py JOIN #rust$")
        bob.expect("*** ann joined #rust (2 here)")
        ann.wait_for_irc(r"^:chat\.py 353 ann = #rust :(ann bob|bob ann)$")
        ann.wait_for_irc(r"^:chat\.py NOTICE #rust :\[\d{4}-\d\d-\d\d \d\d:\d\d\] <bob> said before$")
        ann.wait_for_irc(r"^:ann!ann@chat\.py JOIN #go$")
        ann.send_line("PRIVMSG #rust :hello from irc")
        bob.expect("<ann> hello from irc")
        ann.send_line("PRIVMSG #rust :\x01ACTION waves\x01")
        bob.expect("* ann waves")
        ann.send_line("PRIVMSG #rust :\x02bold\x02 \x0304,01red\x03 \x1dit\x1d\x0f \x1b[2J")
        bob.expect("<ann> bold red it [2J")  # formatting out whole; an escape is not one
        bob.send_line("hi ann")
        bob.expect("<bob> hi ann")
        ann.wait_for_irc(r"^:bob!bob@chat\.py PRIVMSG #rust :hi ann$")
        bob.send_line("/msg ann psst")
        ann.wait_for_irc(r"^:bob!bob@chat\.py PRIVMSG ann :psst$")
        ann.send_line("PRIVMSG bob :back")
        bob.expect("-> *ann* psst", "*ann* back")
        ann.send_line("TOPIC #rust :ownership")
        bob.expect("*** ann set the topic: ownership")
        bob.send_line("/away lunch")
        bob.expect("*** you are marked away: lunch")
        ann.send_line("WHO #rust")
        ann.wait_for_irc(r"^:chat\.py 352 ann #rust ann chat\.py chat\.py ann H :0 ann$")
        ann.wait_for_irc(r"^:chat\.py 352 ann #rust bob chat\.py chat\.py bob G :0 bob$")
        ann.wait_for_irc(r"^:chat\.py 315 ann #rust :End of /WHO list$")
        ann.send_line("NICK ann2")
        bob.expect("*** ann is now known as ann2")
        ann.wait_for_irc(r"^:ann!ann@chat\.py NICK :ann2$")
        ann.send_line("PART #rust :bye")
        bob.expect("*** ann2 left (parted)")
        ann.send_line("QUIT :gone")
        self.assertTrue(ann.expect_closed() is not None)
        bob.send_line("/ping p")
        bob.expect("*** pong p")

    def test_capabilities_tags_echo_and_the_replay_in_a_batch(self):
        bob = self.join("bob")
        bob.send_line("/join #rust")
        bob.expect("*** bob joined #rust (1 here)")
        bob.send_line("old one")
        bob.expect("<bob> old one")
        ann = IrcPeer(self.irc.address[1])
        self.addCleanup(ann.close)
        ann.send_line("CAP LS 302")
        ann.send_line("NICK ann")
        ann.send_line("USER ann 0 * :ann")
        caps = ann.wait_for_irc(r"^:chat\.py CAP \* LS :")
        for cap in ("server-time", "message-tags", "echo-message", "batch"):
            self.assertIn(cap, caps.split(":", 2)[2].split())
        ann.send_line("CAP REQ :server-time message-tags echo-message batch")
        ann.wait_for_irc(r"^:chat\.py CAP ann ACK :server-time message-tags echo-message batch$")
        ann.send_line("CAP REQ :no-such-cap")
        ann.wait_for_irc(r"^:chat\.py CAP ann NAK :no-such-cap$")
        ann.send_line("CAP END")
        ann.wait_for_irc(r"^:chat\.py 001 ann ")
        ann.send_line("JOIN #rust")
        ann.wait_for_irc(r"^:chat\.py BATCH \+history chathistory #rust$")
        ann.wait_for_irc(r"^@time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z;msgid=1;batch=history "
                         r":bob!bob@chat\.py PRIVMSG #rust :old one$")
        ann.wait_for_irc(r"^:chat\.py BATCH -history$")
        cy = self.irc_user("cy")  # without capabilities: the same line, without tags
        cy.send_line("JOIN #rust")
        ann.wait_for_irc(r"^:cy!cy@chat\.py JOIN #rust$")
        ann.send_line("PRIVMSG #rust :echoed")
        cy.wait_for_irc(r"^:ann!ann@chat\.py PRIVMSG #rust :echoed$")
        ann.wait_for_irc(r"^@time=[^;]+;msgid=2 :ann!ann@chat\.py PRIVMSG #rust :echoed$")
        bob.expect("*** ann joined #rust (2 here)", "*** cy joined #rust (3 here)",
                   "<ann> echoed")

    def test_nickserv_registers_and_identifies(self):
        ann = self.irc_user("ann")
        ann.send_line("PRIVMSG NickServ :REGISTER sekrit-password")
        ann.wait_for_irc(r"^:NickServ!NickServ@chat\.py NOTICE ann :ann is now your account")
        ann.send_line("PRIVMSG NickServ :HELP")
        ann.wait_for_irc(r"^:NickServ!NickServ@chat\.py NOTICE ann :IDENTIFY \[NICK\] PASSWORD")
        ann.send_line("QUIT")
        ann.expect_closed()
        bob = self.join("bob")
        bob.send_line("/msg ann while you were out")
        bob.expect("-> *ann* while you were out",
                   "*** ann is offline: they will get it when they log in")
        again = IrcPeer(self.irc.address[1])  # as a client does: ann is taken, so ann_
        self.addCleanup(again.close)
        again.send_line("NICK ann")
        again.send_line("USER ann 0 * :ann")
        self.assertEqual(again.read_line(), ":chat.py 433 * ann :ann is registered: log in by "
                         "SASL, or /msg NickServ IDENTIFY ann PASSWORD")  # (no nc greeting)
        again.send_line("NICK guest")
        again.wait_for_irc(r"^:chat\.py 001 guest ")
        again.send_line("PRIVMSG NickServ :IDENTIFY wrong-password")
        again.wait_for_irc(r"^:NickServ!NickServ@chat\.py NOTICE guest :wrong nick or password$")
        again.send_line("NS IDENTIFY sekrit-password")  # (the nick it asked for first)
        again.wait_for_irc(r"^:guest!guest@chat\.py NICK :ann$")
        again.wait_for_irc(r"^:NickServ!NickServ@chat\.py NOTICE ann :You are now identified")
        again.wait_for_irc(r"^:chat\.py NOTICE ann :\[\d{4}-\d\d-\d\d \d\d:\d\d\] "
                           r"\*bob\* while you were out$")  # offline messages, the v2 form

    def test_sasl_plain_logs_in_to_an_account_and_a_wrong_password_falls_back(self):
        import base64
        owner = self.join("ann")
        owner.send_line("/register sekrit-password")
        owner.expect("*** ann is now your account: next time, /login ann PASSWORD")
        owner.send_line("/quit")
        owner.expect_closed()
        for password, nick_after in (("wrong-password", "guest"), ("sekrit-password", "ann")):
            peer = IrcPeer(self.irc.address[1])
            self.addCleanup(peer.close)
            peer.send_line("CAP LS 302")
            peer.send_line("NICK guest")
            peer.send_line("USER guest 0 * :guest")
            self.assertIn("sasl=PLAIN", peer.wait_for_irc(r"^:chat\.py CAP \* LS :"))
            peer.send_line("CAP REQ :sasl")
            peer.wait_for_irc(r"^:chat\.py CAP guest ACK :sasl$")
            peer.send_line("AUTHENTICATE PLAIN")
            peer.wait_for_irc(r"^AUTHENTICATE \+$")
            peer.send_line("AUTHENTICATE " + base64.b64encode(
                ("\0ann\0" + password).encode()).decode())
            if nick_after == "ann":
                peer.wait_for_irc(r"^:chat\.py 900 ann ann!ann@chat\.py ann :")
                peer.wait_for_irc(r"^:chat\.py 903 ann :SASL authentication successful$")
                peer.send_line("NICK guest2")  # (registering still: the account's nick stays)
                peer.send_line("PING :before-cap-end")  # no welcome before CAP END
                self.assertEqual(peer.wait_for_irc(r" PONG | 001 "),
                                 ":chat.py PONG chat.py :before-cap-end")
            else:
                peer.wait_for_irc(r"^:chat\.py 904 \* :SASL authentication failed$")
            peer.send_line("CAP END")
            peer.wait_for_irc(r"^:chat\.py 001 %s :" % nick_after)

    def test_a_sasl_client_may_join_before_cap_end_and_cap_ls_later_is_no_stop(self):
        import base64
        owner = self.join("ann")
        owner.send_line("/register sekrit-password")
        owner.expect("*** ann is now your account: next time, /login ann PASSWORD")
        owner.send_line("/quit")
        owner.expect_closed()
        peer = IrcPeer(self.irc.address[1])
        self.addCleanup(peer.close)
        for line in ("CAP LS 302", "NICK guest", "USER guest 0 * :guest", "CAP REQ :sasl",
                     "AUTHENTICATE PLAIN"):
            peer.send_line(line)
        peer.wait_for_irc(r"^AUTHENTICATE \+$")
        peer.send_line("AUTHENTICATE " + base64.b64encode(b"\0ann\0sekrit-password").decode())
        peer.wait_for_irc(r"^:chat\.py 903 ann :")
        peer.send_line("JOIN #early")  # before CAP END: its answers wait for it
        peer.send_line("CAP END")
        peer.wait_for_irc(r"^:chat\.py 001 ann :")
        peer.wait_for_irc(r"^:ann!ann@chat\.py JOIN #early$")
        peer.send_line("CAP LS 302")  # registered: a later CAP LS holds nothing up
        peer.send_line("NICK ann2")
        peer.wait_for_irc(r"^:ann!ann@chat\.py NICK :ann2$")
        peer.send_line("TOPIC")
        peer.wait_for_irc(r"^:chat\.py 461 ann2 TOPIC :")
        peer.send_line("CHATHISTORY LATEST #early garbage 2")
        peer.wait_for_irc(r"^FAIL CHATHISTORY INVALID_PARAMS LATEST :")
        peer.send_line("WHOIS")
        peer.wait_for_irc(r"^:chat\.py 431 ann2 :")
        peer.send_line("FORMAT json")
        peer.wait_for_irc(r"^:chat\.py 421 ann2 FORMAT :")
        peer.send_line("IN #early /format json")
        peer.wait_for_irc(r"^:chat\.py 421 ann2 FORMAT :")

    def test_errors_are_numerics(self):
        ann = self.irc_user("ann")
        other = IrcPeer(self.irc.address[1])
        self.addCleanup(other.close)
        other.send_line("NICK ann")
        other.send_line("USER x 0 * :x")
        other.wait_for_irc(r"^:chat\.py 433 \* ann :nickname ann is taken$")
        other.send_line("NICK bad!nick")
        other.wait_for_irc(r"^:chat\.py 432 \* bad!nick :")
        ann.send_line("PRIVMSG #nowhere :hi")  # (not one of its channels: cannot send)
        ann.wait_for_irc(r"^:chat\.py 404 ann #nowhere :Cannot send to channel")
        ann.send_line("PRIVMSG nobody :hi")
        ann.wait_for_irc(r"^:chat\.py 401 ann nobody :")
        ann.send_line("PRIVMSG #lobby")
        ann.wait_for_irc(r"^:chat\.py 412 ann :No text to send$")
        ann.send_line("PRIVMSG")
        ann.wait_for_irc(r"^:chat\.py 411 ann :")
        ann.send_line("PING")
        ann.wait_for_irc(r"^:chat\.py 461 ann PING :")
        ann.send_line("CAP FROB")
        ann.wait_for_irc(r"^:chat\.py 410 ann FROB :")
        ann.send_line("FROB x")
        ann.wait_for_irc(r"^:chat\.py 421 ann FROB :Unknown command$")
        ann.send_line("KICK #lobby bob")  # no channel operators: chat.py's, or 482
        ann.wait_for_irc(r"^:chat\.py 482 ann #lobby :")
        ann.send_line("MUTE bob")  # the other operators' commands: 481
        ann.wait_for_irc(r"^:chat\.py 481 ann :operators only$")
        ann.send_line("JOIN #bad!name")
        ann.wait_for_irc(r"^:chat\.py 403 ann #bad!name :")
        ann.send_line("TOPIC #elsewhere :not joined by this")  # 442, and still not in it
        ann.wait_for_irc(r"^:chat\.py 442 ann #elsewhere :")
        ann.send_line("PRIVMSG #elsewhere :\x01ACTION waves\x01")
        ann.wait_for_irc(r"^:chat\.py 404 ann #elsewhere :")
        ann.send_line("NAMES #elsewhere")
        ann.wait_for_irc(r"^:chat\.py 353 ann = #elsewhere :$")
        ann.send_line("CAP REQ userhost-in-names")
        ann.send_line("JOIN #full")
        ann.wait_for_irc(r"^:chat\.py 353 ann = #full :ann!ann@chat\.py$")
        ann.send_line("PRIVMSG #lobby :" + "x" * 500)  # IRC's 510 bytes: refused, 417
        ann.wait_for_irc(r"^:chat\.py 417 ann :")
        ann.send_line("@" + "a" * 8200 + " PING :tags")  # tags past 8191 bytes: 417 too
        ann.wait_for_irc(r"^:chat\.py 417 ann :")
        ann.send_line("@" + "a=b;" * 2000 + " PING :tags")  # 8001 bytes of tags: taken
        ann.wait_for_irc(r"^:chat\.py PONG chat\.py :tags$")

    def test_names_of_a_big_channel_come_in_lines_of_at_most_512_bytes(self):
        nicks = ["member%02d-%s" % (number, "x" * 12) for number in range(60)]
        for nick in nicks:
            peer = self.irc_user(nick)
            peer.send_line("JOIN #big")
            peer.wait_for_irc(r"^:%s!\S+ JOIN #big$" % nick)
        ann = self.irc_user("ann")
        ann.send_line("JOIN #big")
        seen = []
        while True:
            line = ann.wait_for_irc(r"^:chat\.py (353|366) ann ")
            if " 366 " in line:
                break
            self.assertLessEqual(len(line.encode()) + 2, 512)
            self.assertTrue(line.startswith(":chat.py 353 ann = #big :"), line)
            seen += line.split(" :", 1)[1].split()
        self.assertEqual(sorted(seen), sorted(nicks + ["ann"]))
        self.assertGreater(len(seen), 0)

    def test_whois_and_away_notify(self):
        ann = IrcPeer(self.irc.address[1])
        self.addCleanup(ann.close)
        ann.send_line("CAP REQ :away-notify")
        ann.send_line("NICK ann")
        ann.send_line("USER ann 0 * :ann")
        ann.wait_for_irc(r"^:chat\.py CAP \* ACK :away-notify$")
        ann.send_line("CAP END")
        ann.send_line("JOIN #rust")
        ann.wait_for_irc(r"^:chat\.py 366 ann #rust ")
        bob = self.join("bob")
        bob.send_line("/join #rust")
        ann.wait_for_irc(r"^:bob!bob@chat\.py JOIN #rust$")
        bob.send_line("/away lunch")
        ann.wait_for_irc(r"^:bob!bob@chat\.py AWAY :lunch$")
        ann.send_line("WHOIS ann")  # (USER's name and real name)
        self.assertEqual(ann.wait_for_irc(r"^:chat\.py 311 "),
                         ":chat.py 311 ann ann ann chat.py * :ann")
        ann.send_line("WHOIS bob")
        self.assertEqual(ann.wait_for_irc(r"^:chat\.py 311 "),
                         ":chat.py 311 ann bob bob chat.py * :bob")
        self.assertEqual(ann.read_line(), ":chat.py 319 ann bob :#rust")
        self.assertEqual(ann.read_line(), ":chat.py 312 ann bob chat.py :chat.py")
        self.assertEqual(ann.read_line(), ":chat.py 301 ann bob :lunch")
        self.assertEqual(ann.read_line(), ":chat.py 318 ann bob :End of /WHOIS list")
        bob.send_line("/away")
        ann.wait_for_irc(r"^:bob!bob@chat\.py AWAY$")
        cy = self.join("cy")
        cy.send_line("/away zzz")
        cy.expect("*** you are marked away: zzz")
        cy.send_line("/join #rust")  # an away user joins: JOIN, then AWAY
        self.assertEqual(ann.wait_for_irc(r"^:cy!"), ":cy!cy@chat.py JOIN #rust")
        self.assertEqual(ann.read_line(), ":cy!cy@chat.py AWAY :zzz")
        ann.send_line("WHO bob")  # a nick's WHO: 352 (G: away; its first channel), 315
        self.assertEqual(ann.wait_for_irc(r"^:chat\.py (352|315) "),
                         ":chat.py 352 ann #rust bob chat.py chat.py bob H :0 bob")
        self.assertEqual(ann.read_line(), ":chat.py 315 ann bob :End of /WHO list")
        ann.send_line("WHO nobody")
        self.assertEqual(ann.wait_for_irc(r"^:chat\.py (352|315) "),
                         ":chat.py 315 ann nobody :End of /WHO list")
        ann.send_line("WHOIS nobody")
        ann.wait_for_irc(r"^:chat\.py 401 ann nobody :")
        ann.wait_for_irc(r"^:chat\.py 318 ann nobody :")


class ChathistoryRules:
    """draft/chathistory on the rooms' history (docs/protocol.md, "IRC"):
    every subcommand, by msgid and by timestamp, its errors, and no replay
    on JOIN for a client that asks instead. Run on a file (ChathistoryTest)
    and on Redis (ChathistoryRedisTest)."""

    CAPS = "server-time message-tags batch draft/chathistory"

    def irc_with_history(self, irc_port, nick):
        peer = IrcPeer(irc_port)
        self.addCleanup(peer.close)
        peer.send_line("CAP LS 302")
        peer.send_line("NICK " + nick)
        peer.send_line("USER %s 0 * :%s" % (nick, nick))
        self.assertIn("draft/chathistory", peer.wait_for_irc(r"^:chat\.py CAP \* LS :"))
        peer.send_line("CAP REQ :" + self.CAPS)
        peer.wait_for_irc(r"^:chat\.py CAP %s ACK :" % nick)
        peer.send_line("CAP END")
        isupport = peer.wait_for_irc(r"^:chat\.py 005 %s " % nick)
        self.assertIn(" CHATHISTORY=500 ", isupport)
        self.assertIn(" MSGREFTYPES=msgid,timestamp ", isupport)
        return peer

    def batch(self, peer, request):
        """CHATHISTORY request: [(msgid, time, text)] of its batch, in order."""
        peer.send_line("CHATHISTORY " + request)
        opening = peer.wait_for_irc(r"^:chat\.py BATCH \+")
        reference, kind, target = opening.split()[2:]
        self.assertEqual((kind, target), ("chathistory", request.split()[1]))
        found = []
        while True:
            line = peer.read_line()
            if line == ":chat.py BATCH -" + reference[1:]:
                return found
            tags, _, rest = line.partition(" ")
            tags = dict(tag.split("=", 1) for tag in tags[1:].split(";"))
            self.assertEqual(tags["batch"], reference[1:], line)
            self.assertRegex(rest, r"^:bob!bob@chat\.py PRIVMSG #rust :")
            found.append((int(tags["msgid"]), tags["time"], rest.split(" :", 1)[1]))

    def test_every_subcommand_by_msgid_and_by_timestamp(self):
        irc_port, tcp_port = self.start_chat_with_irc()
        bob = Peer(tcp_port)
        self.addCleanup(bob.close)
        bob.send_line("bob")
        bob.wait_for_kind("joined")
        bob.send_line("/join #rust")
        bob.expect("*** bob joined #rust (1 here)")
        for number in range(1, 7):
            bob.send_line("m%d" % number)
            bob.expect("<bob> m%d" % number)
        ann = self.irc_with_history(irc_port, "ann")
        ann.send_line("JOIN #rust")
        ann.wait_for_irc(r"^:chat\.py 366 ann #rust ")
        ann.send_line("PING :after-join")  # no replay: ann asks for what it wants
        self.assertEqual(ann.wait_for_irc(r"PRIVMSG|PONG"),
                         ":chat.py PONG chat.py :after-join")
        every = self.batch(ann, "LATEST #rust * 100")
        self.assertEqual([text for _, _, text in every], ["m1", "m2", "m3", "m4", "m5", "m6"])
        ids = [msgid for msgid, _, _ in every]
        self.assertEqual(ids, sorted(ids))

        def texts(request):
            return [text for _, _, text in self.batch(ann, request)]
        self.assertEqual(texts("LATEST #rust * 2"), ["m5", "m6"])
        self.assertEqual(texts("LATEST #rust msgid=%d 100" % ids[0]),
                         ["m2", "m3", "m4", "m5", "m6"])
        self.assertEqual(texts("BEFORE #rust msgid=%d 100" % ids[2]), ["m1", "m2"])
        self.assertEqual(texts("AFTER #rust msgid=%d 1" % ids[3]), ["m5"])
        self.assertEqual(texts("AROUND #rust msgid=%d 3" % ids[2]), ["m2", "m3", "m4"])
        self.assertEqual(texts("BETWEEN #rust msgid=%d msgid=%d 2" % (ids[0], ids[4])),
                         ["m2", "m3"])
        self.assertEqual(texts("BETWEEN #rust msgid=%d msgid=%d 2" % (ids[5], ids[0])),
                         ["m4", "m5"])
        # By timestamp, to the millisecond server-time shows (some may share one).
        stamp = every[2][1]
        later = [text for _, when, text in every if when > stamp]
        earlier = [text for _, when, text in every if when < stamp]
        self.assertEqual(texts("AFTER #rust timestamp=%s 100" % stamp), later)
        self.assertEqual(texts("BEFORE #rust timestamp=%s 100" % stamp), earlier)
        self.assertEqual(texts("LATEST #rust timestamp=%s 100" % stamp), later)
        self.assertEqual(texts("BETWEEN #rust timestamp=2000-01-01T00:00:00.000Z "
                               "timestamp=%s 100" % stamp), earlier)
        self.assertEqual(texts("AFTER #rust timestamp=2999-01-01T00:00:00.000Z 100"), [])

    def test_errors_an_unjoined_channel_and_a_nick(self):
        irc_port, _ = self.start_chat_with_irc()
        ann = self.irc_with_history(irc_port, "ann")
        ann.send_line("JOIN #rust")
        ann.wait_for_irc(r"^:chat\.py 366 ann #rust ")
        ann.send_line("CHATHISTORY FROB #rust * 5")
        ann.wait_for_irc(r"^FAIL CHATHISTORY UNKNOWN_COMMAND FROB :")
        ann.send_line("CHATHISTORY LATEST #rust")
        ann.wait_for_irc(r"^FAIL CHATHISTORY NEED_MORE_PARAMS LATEST :")
        ann.send_line("CHATHISTORY BEFORE #rust * 5")
        ann.wait_for_irc(r"^FAIL CHATHISTORY INVALID_PARAMS BEFORE :")
        ann.send_line("CHATHISTORY AFTER #rust msgid=1 0")
        ann.wait_for_irc(r"^FAIL CHATHISTORY INVALID_PARAMS AFTER :")
        ann.send_line("CHATHISTORY LATEST #go * 5")
        ann.wait_for_irc(r"^FAIL CHATHISTORY INVALID_TARGET LATEST #go :")
        self.assertEqual(self.batch(ann, "LATEST bob * 5"), [])
        self.assertEqual(self.batch(ann, "LATEST #rust * 5"), [])


class ChathistoryTest(ChathistoryRules, ServerTestCase):

    def start_chat_with_irc(self):
        folder = tempfile.mkdtemp(prefix="chat-history-", dir=WORK_DIR)
        irc = chat.Listener("127.0.0.1", 0, codec=chat.IRC_CODEC)
        store = chat.SQLiteStore(os.path.join(folder, "chat.db"))
        server = serve_in_thread(self, listeners=[irc], store=store)
        self.port = server.address[1]
        return irc.address[1], self.port

    def test_a_text_client_does_not_have_the_command(self):
        self.start_chat_with_irc()
        bob = self.join("bob")
        bob.send_line("/chathistory LATEST #lobby * 5")
        bob.expect("!!! unknown command /chathistory (try /help)")


IRSSI = shutil.which("irssi")


class IrssiTest(ServerTestCase):
    """A real IRC client: irssi (Debian's), on a pseudo-terminal, talks with
    an nc user in one channel."""

    @classmethod
    def setUpClass(cls):
        if IRSSI is None:
            raise unittest.SkipTest("no irssi (Debian: apt-get install irssi; .ci/run "
                                    "installs it): the irssi test is skipped")

    def test_irssi_logs_in_by_sasl_joins_two_channels_and_talks_with_an_nc_user(self):
        import pty
        irc = chat.Listener("127.0.0.1", 0, codec=chat.IRC_CODEC)
        server = serve_in_thread(self, listeners=[irc])
        self.port = server.address[1]
        owner = self.join("ann")  # ann's account, which irssi logs in to (the README's way)
        owner.send_line("/register sekrit-password")
        owner.expect("*** ann is now your account: next time, /login ann PASSWORD")
        owner.send_line("/quit")
        owner.expect_closed()
        bob = self.join("bob")
        bob.send_line("/join #rust")
        bob.expect("*** bob joined #rust (1 here)")
        bob.send_line("said before irssi came")
        bob.expect("<bob> said before irssi came")
        bob.send_line("/open #go")
        bob.expect("*** bob joined #go (1 here)")
        home = tempfile.mkdtemp(prefix="chat-irssi-")
        self.addCleanup(shutil.rmtree, home, True)
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        import fcntl, termios  # Unix only, like the pseudo-terminal itself
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        proc = start_process(self, [IRSSI, "--home=" + home, "-n", "guest"],
                             stdin=slave, stdout=slave, stderr=slave,
                             env=dict(os.environ, TERM="xterm"), start_new_session=True)
        os.close(slave)
        screen = bytearray()

        def until(wanted):
            deadline = time.monotonic() + TIMEOUT
            while wanted not in screen:
                self.assertLess(time.monotonic(), deadline, "%r not on irssi's screen" % wanted)
                if select.select([master], [], [], 0.1)[0]:
                    screen.extend(os.read(master, 65536))

        def type_line(text):
            os.write(master, text.encode() + b"\r")

        until(b"Irssi")
        type_line("/set cmd_queue_speed 0")  # (irssi paces its lines past five: 2.2 s each)
        type_line("/network add -sasl_mechanism PLAIN -sasl_username ann "
                  "-sasl_password sekrit-password chatpy")
        type_line("/server add -network chatpy 127.0.0.1 %d" % irc.address[1])
        type_line("/connect chatpy")
        until(b"You are now logged in as ann")
        until(b"Welcome to the chat.py network, ann")
        type_line("/join #rust")
        bob.expect("#rust *** ann joined #rust (2 here)")  # (bob talks in #go, opened last)
        until(b"said before irssi came")  # the replay (with server-time: bob's PRIVMSG)
        type_line("/join #go")
        bob.expect("*** ann joined #go (2 here)")
        type_line("hello from irssi")  # (in #go, the window it joined last)
        bob.expect("<ann> hello from irssi")
        bob.send_line("hi irssi user")
        bob.expect("<bob> hi irssi user")
        until(b"hi irssi user")
        bob.send_line("/msg #rust over in rust")
        bob.expect("#rust <bob> over in rust")
        type_line("/window goto #rust")
        until(b"over in rust")
        type_line("/quit leaving now")
        bob.expect("*** ann left (leaving now)")
        proc.wait(TIMEOUT)


class IrcPasswordTest(ServerTestCase):

    def test_a_missing_password_gets_464_and_the_connection_is_closed(self):
        irc = chat.Listener("127.0.0.1", 0, codec=chat.IRC_CODEC)
        serve_in_thread(self, listeners=[irc], password="s3cret")
        peer = IrcPeer(irc.address[1])
        self.addCleanup(peer.close)
        peer.send_line("NICK ann")
        peer.send_line("USER ann 0 * :ann")
        lines = peer.expect_closed()
        self.assertTrue(any(re.match(r":chat\.py 464 \* :", line) for line in lines), lines)
        good = IrcPeer(irc.address[1])
        self.addCleanup(good.close)
        good.send_line("PASS s3cret")
        good.send_line("NICK ann")
        good.send_line("USER ann 0 * :ann")
        good.wait_for_irc(r"^:chat\.py 001 ann ")


class MotdTest(ServerTestCase):
    """docs/protocol.md, "Away, and the message of the day": --motd-file."""

    def test_the_motd_follows_the_greeting_before_the_nickname_prompt(self):
        self.start_server(motd=["Be kind.", "Rules: /help"])
        peer = self.connect()
        peer.expect("*** welcome to chat.py (0 online)", "*** Be kind.", "*** Rules: /help",
                    "*** choose a nickname: 1-24 letters, digits, _ or -")

    def test_with_a_room_password_the_password_line_comes_last_but_one(self):
        self.start_server(motd=["Be kind."], password="pw")
        peer = self.connect()
        peer.expect("*** welcome to chat.py (0 online)", "*** Be kind.",
                    "*** " + chat.PASSWORD_GREETING,
                    "*** choose a nickname: 1-24 letters, digits, _ or -")

    def test_the_file_is_read_at_start_cleaned_and_a_missing_one_is_exit_1(self):
        path = write_file(self, "motd.txt", "Welcome \x1b[31mred\x1b[0m\n\nsee you\n")
        self.assertEqual(chat.read_motd(path), ["Welcome red", "", "see you"])
        code, out, err = run_chat("server", "--port", "0", "--db", ":memory:",
                                  "--motd-file", path + ".missing")
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("motd.txt.missing", err)
        self.assertNotIn("Traceback", err)
        with open(path, "wb") as f:
            f.write(b"caf\xe9\n")
        code, out, err = run_chat("server", "--port", "0", "--db", ":memory:",
                                  "--motd-file", path)
        self.assertEqual((code, err.count("\n")), (1, 1), err)
        self.assertIn("not UTF-8", err)

# --- Server: limits ---------------------------------------------------------------

class LimitTest(ServerTestCase):

    def test_flood_control_slows_the_sender_and_loses_nothing(self):
        self.start_server(rate=20, burst=5)
        alice, bob = self.join_all("alice", "bob")
        started = time.monotonic()
        alice.send_raw(b"".join(b"line %d\n" % i for i in range(35)))
        for i in range(35):
            bob.expect("<alice> line %d" % i)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 1.2)  # (35 - 5) lines at 20/s is 1.5 s

    def test_flood_control_charges_long_lines_more(self):
        self.start_server(rate=10, burst=1)
        alice = self.join("alice")
        started = time.monotonic()
        alice.send_raw((b"x" * 2048 + b"\n") * 3)  # 5 tokens each: 1 s for three
        for _ in range(3):
            alice.read_line()
        self.assertGreaterEqual(time.monotonic() - started, 0.8)

    def test_a_slow_consumer_is_evicted_and_the_others_get_everything(self):
        # A generous sendq: the readers here are threads sharing the CPU with
        # the server; the slow one's tiny window still overflows it.
        self.start_server(rate=0, max_sendq=1 << 20)
        alice, bob = self.join_all("alice", "bob")
        slow = self.join("slow", rcvbuf=4096)  # and it never reads again
        alice.wait_for("*** slow joined (3 online)")
        bob.wait_for("*** slow joined (3 online)")
        payload = "p" * 100
        lines = 24000  # 2.6 MB: far past the slow one's sendq and kernel buffers
        expected = ["<alice> %d %s" % (i, payload) for i in range(lines)]
        transcripts = {}

        def read_all(peer):
            try:
                got = peer.wait_for("<alice> %d %s" % (lines - 1, payload)) + peer.sync()
                if "*** slow left (too slow)" not in got:  # (a second after it stopped)
                    got += peer.wait_for("*** slow left (too slow)") + [
                        "*** slow left (too slow)"]
                transcripts[peer] = got
            except AssertionError as exc:
                transcripts[peer] = exc
        readers = [threading.Thread(target=read_all, args=(peer,)) for peer in (alice, bob)]
        for reader in readers:
            reader.start()
        alice.send_raw(b"".join(b"%d %s\n" % (i, payload.encode()) for i in range(lines)))
        for reader in readers:
            reader.join(TIMEOUT * 3)
        for peer in (alice, bob):
            self.assertIsInstance(transcripts.get(peer), list, transcripts.get(peer))
            got = transcripts[peer] + [expected[-1]]
            self.assertEqual([line for line in got if line.startswith("<")], expected)
            self.assertIn("*** slow left (too slow)", got)
        slow.expect_closed()  # what it was owed until eviction, then the end

    def test_a_room_that_reads_slowly_slows_the_sender_and_nobody_is_evicted(self):
        self.start_server(rate=0, max_sendq=65536)
        alice = self.join("alice")
        bob = self.join("bob", rcvbuf=4096)
        carol = self.join("carol", rcvbuf=4096)
        alice.wait_for("*** carol joined (3 online)")
        bob.wait_for("*** carol joined (3 online)")
        lines = 8000  # 1.1 MB: far more than the sendq and the kernel's buffers
        payload = "q" * 130
        expected = ["<alice> %d %s" % (i, payload) for i in range(lines)]
        got = {}

        def read(peers, pause_every):
            """Read the peers in turn, line by line: they lag alike."""
            try:
                for peer in peers:
                    got[peer] = []
                for i in range(lines):
                    for peer in peers:
                        line = peer.read_line()
                        if line is None or line.endswith("(too slow)"):
                            return
                        got[peer].append(line)
                    if pause_every and i % pause_every == 0:
                        time.sleep(0.001)  # a slow link, not a synchronisation
            except AssertionError as exc:
                got[peers[0]] = exc
        readers = [threading.Thread(target=read, args=([alice], 0)),
                   threading.Thread(target=read, args=([bob, carol], 40))]
        for reader in readers:
            reader.start()
        alice.send_raw(b"".join(b"%d %s\n" % (i, payload.encode()) for i in range(lines)))
        for reader in readers:
            reader.join(TIMEOUT * 3)
        for peer in (alice, bob, carol):
            self.assertEqual(got.get(peer), expected)

    def flood_and_read(self, sender, readers, lines, payload, laggards=(), then=None):
        """Send lines from sender while each reader reads at the pace its
        function sets; return {peer: the lines it got, or the AssertionError}.
        The laggards stop reading once the others have everything; the others
        then read on until the line then (an eviction that may come later)."""
        expected_last = "<alice> %d %s" % (lines - 1, payload)
        got = {}
        done = threading.Event()

        def read(peer, pace):
            lines_read = []
            try:
                while not (peer in laggards and done.is_set()):
                    line = peer.read_line()
                    if line is None:
                        break
                    lines_read.append(line)
                    if line == expected_last:
                        lines_read.extend(peer.sync())
                        if then is not None and then not in lines_read:
                            lines_read.extend(peer.wait_for(then) + [then])
                        break
                    pace()
            except AssertionError as exc:
                lines_read = exc
            got[peer] = lines_read
        threads = {peer: threading.Thread(target=read, args=(peer, pace))
                   for peer, pace in readers.items()}
        for thread in threads.values():
            thread.start()
        sender.send_raw(b"".join(b"%d %s\n" % (i, payload.encode()) for i in range(lines)))
        for peer, thread in threads.items():
            if peer not in laggards:
                thread.join(TIMEOUT * 3)
        done.set()
        for thread in threads.values():
            thread.join(TIMEOUT)
        return got

    @staticmethod
    def in_bursts(every, pause):
        """A reader's pace: a pause after every so many lines."""
        count = [0]

        def pace():
            count[0] += 1
            if count[0] % every == 0:
                time.sleep(pause)  # the reader's own rhythm, not a synchronisation
        return pace

    def test_a_reader_that_reads_in_bursts_keeps_up_and_a_stopped_one_is_evicted(self):
        self.start_server(rate=0, max_sendq=32768)
        alice, fast, quick = self.join_all("alice", "fast", "quick")
        bursty = self.join("bursty", rcvbuf=4096)
        stopped = self.join("stopped", rcvbuf=4096)  # and it never reads again
        for peer in (alice, fast, quick, bursty):
            peer.wait_for("*** stopped joined (5 online)")
        lines, payload = 16000, "b" * 100  # 1.8 MB: far past every buffer
        started = time.monotonic()
        got = self.flood_and_read(alice, {
            alice: lambda: None, fast: lambda: None, quick: lambda: None,
            bursty: self.in_bursts(4000, 0.4)}, lines, payload,
            then="*** stopped left (too slow)")
        expected = ["<alice> %d %s" % (i, payload) for i in range(lines)]
        for peer in (alice, fast, quick, bursty):
            self.assertIsInstance(got.get(peer), list, got.get(peer))
            self.assertEqual([line for line in got[peer] if line.startswith("<")], expected)
            self.assertIn("*** stopped left (too slow)", got[peer])
            self.assertNotIn("*** bursty left (too slow)", got[peer])
        self.assertLess(time.monotonic() - started, TIMEOUT * 2)
        stopped.expect_closed()

    def test_a_trickling_reader_holds_nobody_and_goes_after_max_lag_behind(self):
        self.start_server(rate=0, max_sendq=16384, max_lag=1.0)
        alice, bob = self.join_all("alice", "bob")
        trickle = self.join("trickle", rcvbuf=4096)
        for peer in (alice, bob):
            peer.wait_for("*** trickle joined (3 online)")
        lines, payload = 12000, "t" * 100
        got = self.flood_and_read(alice, {
            alice: lambda: None, bob: lambda: None,
            trickle: self.in_bursts(5, 0.05)}, lines, payload, laggards=[trickle],
            then="*** trickle left (too slow)")
        expected = ["<alice> %d %s" % (i, payload) for i in range(lines)]
        for peer in (alice, bob):
            self.assertIsInstance(got.get(peer), list, got.get(peer))
            self.assertEqual([line for line in got[peer] if line.startswith("<")], expected)
            self.assertIn("*** trickle left (too slow)", got[peer])

    def test_a_stopped_reader_holds_nobody(self):
        # v3: its lines wait in its backlog; it is evicted a second after it
        # stopped, by which time the room has long had everything.
        server = self.start_server(rate=0, max_sendq=16384)
        alice, bob = self.join_all("alice", "bob")
        stopped = self.join("stopped", rcvbuf=4096)  # and it never reads again
        bob.wait_for("*** stopped joined (3 online)")
        lines, payload = 12000, "s" * 100  # 1.3 MB: past its kernel buffers too
        held = []

        def watch():  # does input ever wait for it?
            while len(held) < 1 and stopped.sock.fileno() != -1 and not done:
                if server.throttled:
                    held.append(True)
                time.sleep(0.0005)  # sampling the loop's state, not a synchronisation
        done = False
        watcher = threading.Thread(target=watch)
        watcher.start()
        got = self.flood_and_read(alice, {alice: lambda: None, bob: lambda: None}, lines,
                                  payload, then="*** stopped left (too slow)")
        done = True
        watcher.join(TIMEOUT)
        self.assertEqual(held, [])
        for peer in (alice, bob):
            self.assertIsInstance(got.get(peer), list, got.get(peer))
            self.assertEqual([line for line in got[peer] if line.startswith("<")],
                             ["<alice> %d %s" % (i, payload) for i in range(lines)])

    def test_own_replies_never_hold_anyone_else(self):
        server = self.start_server(rate=0, max_sendq=16384)
        alice = self.join("alice")
        mallory = self.connect(rcvbuf=4096)
        mallory.send_raw(b"mallory\n" + b"/help\n" * 5000)  # and never reads
        alice.wait_for("*** mallory joined (2 online)")
        deadline = time.monotonic() + TIMEOUT
        while not server.behind:  # until its own replies put it behind
            self.assertLess(time.monotonic(), deadline, "mallory never fell behind")
            time.sleep(0.001)  # polling the loop's state, bounded by the deadline
        alice.send_line("/ping innocent")
        skipped = alice.wait_for("*** pong innocent")
        self.assertNotIn("*** mallory left (too slow)", skipped)  # answered while it lags

    def test_all_backlogs_together_stay_within_max_output(self):
        server = self.start_server(rate=0, max_sendq=16384, max_backlog=65536,
                                   max_output=131072)
        alice = self.join("alice")
        for number in range(4):  # four readers that stopped: 4 x 64 KiB > max_output
            self.join("stopped%d" % number, rcvbuf=4096)
        alice.sync()
        lines, payload = 8000, "o" * 100
        alice.send_raw(b"".join(b"%d %s\n" % (i, payload.encode()) for i in range(lines)))
        biggest = 0
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and len(server.conns) > 1:
            biggest = max(biggest, server.backlog)
            time.sleep(0.0005)  # sampling the server's memory, not a synchronisation
        self.assertLessEqual(biggest, 131072 + 65536)  # max_output and one pass
        got = alice.wait_for("<alice> %d %s" % (lines - 1, payload))  # alice got it all
        self.assertEqual(len([line for line in got if line.startswith("<")]), lines - 1)

    def test_a_reader_the_kernel_sees_reading_is_not_taken_for_stopped(self):
        # A full send buffer is reported writable only once a third of it is
        # free: at 250 KB/s that can be a second without a send, while the
        # reader reads all along. The kernel's own count says it does.
        with socket.socket() as probe:
            if chat.kernel_unsent(probe) is None:
                self.skipTest("this system does not say what a socket still holds")
        server = self.start_server(rate=0)
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        ours = socket.create_connection(listener.getsockname())
        self.addCleanup(ours.close)
        theirs, _ = listener.accept()
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        try:
            while True:
                ours.send(b"x" * 65536)
        except BlockingIOError:
            pass  # the kernel holds all it will
        conn = chat.Connection(ours, ("127.0.0.1", 1), chat.Limits(), time.monotonic())
        now = time.monotonic()
        conn.behind_since, conn.drained_at = now - 1.5, now - 1.5  # no send for 1.5 s
        conn.kernel_unsent = chat.kernel_unsent(ours)
        self.assertTrue(server._too_slow(conn, now))  # nothing taken meanwhile: stopped
        theirs.recv(65536)  # the reader takes some
        deadline = time.monotonic() + TIMEOUT
        while chat.kernel_unsent(ours) >= conn.kernel_unsent:  # acknowledged
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.001)  # waiting on the kernel's count, bounded
        self.assertFalse(server._too_slow(conn, time.monotonic()))  # still reading

    def test_a_client_that_asks_more_than_it_reads_is_bounded_by_its_own_backlog(self):
        server = self.start_server(rate=0, max_sendq=16384)
        alice = self.join("alice")
        mallory = self.connect(rcvbuf=4096)
        mallory.send_raw(b"mallory\n" + b"/help\n" * 20000)  # and never reads
        biggest, seen = 0, False
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            conns = [c for c in list(server.conns) if c.nick == "mallory"]
            if seen and not conns:
                break  # evicted
            seen = seen or bool(conns)
            biggest = max([biggest] + [len(conn.outbuf) for conn in conns])
            time.sleep(0.0005)  # sampling the server's memory, not a synchronisation
        self.assertLessEqual(biggest, 16384 + 2048)  # max_sendq and one reply
        alice.wait_for("*** mallory left (too slow)")
        self.assertEqual(alice.sync(), [])

    def test_a_client_that_reads_its_replies_gets_all_of_them(self):
        self.start_server(rate=0, max_sendq=8192)
        mallory = self.join("mallory", rcvbuf=4096)
        mallory.send_raw(b"".join(b"/ping %d\n" % i for i in range(3000)))
        for i in range(3000):
            mallory.expect("*** pong %d" % i)

    def test_max_clients(self):
        self.start_server(max_clients=2)
        self.join("a")
        self.greeted()  # unregistered connections count too
        third = self.connect()
        self.assertEqual(third.expect_closed(), ["!!! server full"])

    def test_max_per_ip_exempts_loopback(self):
        self.start_server(max_per_ip=1)
        self.join("a")
        self.join("b")  # 127.0.0.1 is exempt
        try:
            first = self.connect(source="127.0.0.2")
        except OSError:
            self.skipTest("127.0.0.2 is not a local address here")
        first.read_line()
        second = self.connect(source="127.0.0.2")
        self.assertEqual(second.expect_closed(), ["!!! too many connections from your address"])

    def test_registration_timeout_however_slow_the_trickle(self):
        self.start_server(register_timeout=0.6)
        peer = self.greeted()
        started = time.monotonic()
        peer.send_raw(b"b")
        peer.send_raw(b"o")
        lines = peer.expect_closed()
        self.assertEqual(lines, ["!!! registration timed out"])
        self.assertLess(time.monotonic() - started, 3)

    def test_a_closed_connection_is_freed_before_its_timers_are_due(self):
        self.start_server(register_timeout=60)
        peer = self.greeted()
        peer.send_line("/ping")
        peer.expect("!!! choose a nickname first")  # the server has its record
        (conn,) = list(self.server.conns)
        record = weakref.ref(conn)
        del conn
        peer.close()
        deadline = time.monotonic() + TIMEOUT
        while self.server.conns and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the server's state, bounded
        gc.collect()
        self.assertIsNone(record(), "a closed connection is still referenced")

    def test_accepted_sockets_use_keepalive(self):
        self.start_server()
        peer = self.join("alice")
        peer.sync()
        (conn,) = list(self.server.conns)
        self.assertEqual(conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            self.assertLessEqual(idle, 300)

    def test_1500_concurrent_clients(self):
        chat.raise_open_files_limit()
        self.start_server(rate=0)
        count = 1500
        selector = selectors.DefaultSelector()
        self.addCleanup(selector.close)
        tails = {}  # peer number -> the last bytes it received
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(b"user%d\n" % i)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
            if i % 100 == 0:
                self._drain(selector, tails)
        last_join = b"*** user%d joined (%d online)\n" % (count - 1, count)
        self._drain_until(selector, tails, lambda: last_join in tails.get(0, b""))
        first = next(key.fileobj for key in selector.get_map().values() if key.data == 0)
        first.sendall(b"hello all\n")
        hello = b"<user0> hello all\n"
        self._drain_until(selector, tails, lambda: all(
            hello in tails.get(i, b"") for i in range(count)))

    def _drain_until(self, selector, tails, done, timeout=30):
        deadline = time.monotonic() + timeout
        while not done():
            self.assertLess(time.monotonic(), deadline, "timed out draining")
            self._drain(selector, tails)

    @staticmethod
    def _drain(selector, tails):
        """Read what arrived; keep each peer's last 64 bytes (enough for one line)."""
        for key, _ in selector.select(0.2):
            try:
                data = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            tails[key.data] = (tails.get(key.data, b"") + data)[-64:]


# --- Server: as a process ---------------------------------------------------------

class ServerProcessTest(unittest.TestCase):

    def start(self, *args, cwd=None):
        if "--db" not in args:
            args += ("--db", ":memory:")
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0"]
                             + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=cwd or WORK_DIR)
        port, _ = wait_until_listening(self, proc.stderr)
        return proc, port

    def test_sigterm_says_goodbye_and_exits_0(self):
        proc, port = self.start()
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.send_line("alice")
        peer.wait_for("*** alice joined (1 online)")
        lurker = Peer(port)
        self.addCleanup(lurker.close)
        lurker.wait_for("*** choose a nickname: 1-24 letters, digits, _ or -")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(peer.expect_closed(), ["*** server shutting down"])
        self.assertEqual(lurker.expect_closed(), ["*** server shutting down"])
        err = proc.stderr.read().decode()
        self.assertNotIn("Traceback", err)

    def test_sigint_exits_0_and_logs_without_message_text(self):
        proc, port = self.start()
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.send_line("alice")
        peer.send_line("my secret words")
        peer.wait_for("<alice> my secret words")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        err = proc.stderr.read().decode()
        self.assertIn("alice joined", err)
        self.assertNotIn("secret", err)
        self.assertNotIn("Traceback", err)

    def test_port_in_use_is_one_line_and_exit_2(self):
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_chat("server", "--port", str(port))
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines(), ["chat.py: cannot listen on 127.0.0.1:%d: %s"
                                            % (port, os.strerror(errno.EADDRINUSE))])

    def test_bad_host_is_one_line_and_exit_2(self):
        code, out, err = run_chat("server", "--host", "no.such.host.invalid", "--port", "0")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("chat.py: cannot listen on no.such.host.invalid:0: "), err)

    def test_ipv6_any_address(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        try:
            proc, port = self.start("--host", "::")
        except AssertionError:
            self.skipTest("cannot listen on ::")
        peer = Peer(port, host="::1")
        self.addCleanup(peer.close)
        peer.send_line("six")
        peer.wait_for("*** six joined (1 online)")
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)

    @unittest.skipUnless(hasattr(os, "fork") and sys.platform.startswith("linux"),
                         "RLIMIT_NOFILE and /proc: Linux")
    def test_out_of_descriptors_refuses_without_spinning(self):
        script = ("import resource, sys; sys.argv[1:] = ['server', '--port', '0', '-q'];"
                  "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40));"
                  "sys.path.insert(0, %r); import chat; sys.exit(chat.main(sys.argv[1:]))" % HERE)
        proc = start_process(self, [sys.executable, "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port, _ = wait_until_listening(self, proc.stderr)
        peers = []
        refused = 0
        for _ in range(60):
            peer = Peer(port)
            self.addCleanup(peer.close)
            first = peer.read_line()
            if first == "!!! server full":
                refused += 1
            else:
                peers.append(peer)
        self.assertGreater(refused, 0)
        self.assertGreater(len(peers), 20)

        def cpu_seconds():
            with open("/proc/%d/stat" % proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        before = cpu_seconds()
        waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        for sock in waiting:
            self.addCleanup(sock.close)
        time.sleep(1.0)  # measuring idle CPU over a fixed window, not a sync
        self.assertLess(cpu_seconds() - before, 0.5)
        peers[0].send_line("alice")
        peers[0].wait_for("*** alice joined (1 online)")


# --- Client -----------------------------------------------------------------------

class ClientTest(ServerTestCase):

    def start_client(self, *args):
        """The client as a subprocess with piped stdin, stdout and stderr."""
        return start_process(self, [sys.executable, CHAT_PY, "client"] + list(args),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)

    def setUp(self):
        self.start_server()

    def test_piped_lines_are_delivered_and_it_exits_by_itself(self):
        watcher = self.join("watcher")
        code, out, err = run_chat("client", "--name", "bot", "--port", str(self.port),
                                  stdin=b"a\nb\n")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("<bot> a\n<bot> b\n", out)
        watcher.wait_for("*** bot joined (2 online)")
        watcher.expect("<bot> a", "<bot> b", "*** bot left (quit)")

    def test_without_name_the_first_line_is_the_nickname(self):
        watcher = self.join("watcher")
        code, out, err = run_chat("client", "--port", str(self.port), stdin=b"robot\nbeep\n")
        self.assertEqual(code, 0, err)
        watcher.wait_for("*** robot joined (2 online)")
        watcher.expect("<robot> beep")

    def test_a_taken_name_prints_the_reason_and_exits_1(self):
        self.join("bot")
        code, out, err = run_chat("client", "--name", "BOT", "--port", str(self.port),
                                  stdin=b"never sent\n")
        self.assertEqual(code, 1)
        self.assertIn("!!! nickname BOT is taken", out)
        self.assertNotIn("never sent", out)

    def test_nothing_listening_is_one_line_and_exit_1(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        code, out, err = run_chat("client", "--name", "x", "--port", str(port))
        self.assertEqual(code, 1)
        self.assertEqual(err.strip().count("\n"), 0)
        self.assertIn("cannot connect to 127.0.0.1:%d" % port, err)

    def test_server_going_away_prints_disconnected_and_exits_1(self):
        proc = self.start_client("--name", "bot", "--port", str(self.port))
        watcher = self.join("watcher")
        watcher.wait_for("*** bot joined (2 online)")
        self.server.shutdown()
        self.assertEqual(proc.wait(TIMEOUT), 1)  # stdin stays open: not a quit
        out, err = proc.stdout.read(), proc.stderr.read()
        self.assertTrue(out.decode().endswith("*** disconnected from server\n"), out)
        self.assertNotIn(b"Traceback", err)

    def test_client_cleans_what_a_hostile_server_sends(self):
        fake = socket.socket()
        self.addCleanup(fake.close)
        fake.bind(("127.0.0.1", 0))
        fake.listen()

        def serve():
            conn, _ = fake.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"*** x joined (1 online)\n\x1b[2Jevil\x1b]0;t\x07\rline"
                             + "\u009b\u202e".encode("utf-8") + b"\x9b\n")
        thread = threading.Thread(target=serve)
        thread.start()
        code, out, err = run_chat("client", "--name", "x", "--port",
                                  str(fake.getsockname()[1]), stdin=b"")
        thread.join()
        self.assertIn("[2Jevil]0;tline\ufffd\n", out)
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\r", out)

    def test_reply_answers_the_last_private_message(self):
        watcher = self.join("watcher")
        proc = self.start_client("--name", "bot", "--port", str(self.port))
        proc.stdin.write(b"/reply too early\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        while not line.startswith(b"!!! no private message"):
            self.assertTrue(line)
            line = proc.stdout.readline()
        watcher.wait_for("*** bot joined (2 online)")
        watcher.send_line("/msg bot ping me back")
        while line != b"*watcher* ping me back\n":
            self.assertTrue(line)
            line = proc.stdout.readline()
        proc.stdin.write(b"/reply pong\n/timestamps\nstamped\n")
        proc.stdin.close()
        watcher.wait_for("*bot* pong")
        watcher.wait_for("<bot> stamped")
        out = proc.stdout.read().decode()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertIn("-> *watcher* pong", out)
        self.assertRegex(out, r"\n\d\d:\d\d <bot> stamped\n")

    def test_help_adds_the_clients_own_commands_after_the_servers(self):
        code, out, err = run_chat("client", "--name", "bot", "--port", str(self.port),
                                  stdin=b"/help\n")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        help_lines = [line for line in lines if line.startswith("*** /")]
        self.assertEqual(help_lines[-2:], ["*** " + text for text in chat.CLIENT_HELP])
        self.assertIn("*** /quit [REASON]       leave", help_lines)
        self.assertNotIn(chat.HELP_TOKEN, out)

    def test_json_pipe_for_programs(self):
        watcher = self.join("watcher")
        code, out, err = run_chat("client", "--json", "--name", "bot", "--port", str(self.port),
                                  stdin=b"hello\n/ping done\n")
        self.assertEqual(code, 0, err)
        objects = [json.loads(line) for line in out.splitlines()]  # JSON, every line
        types = [obj["type"] for obj in objects]
        self.assertIn({"type": "joined", "nick": "bot", "room": "#lobby", "count": 2},
                      [{k: v for k, v in obj.items() if k != "time"} for obj in objects])
        message = objects[types.index("message")]
        self.assertEqual((message["nick"], message["text"]), ("bot", "hello"))
        self.assertIn("pong", types)
        watcher.wait_for("<bot> hello")
        code, out, err = run_chat("client", "--json", "--name", "watcher", "--port",
                                  str(self.port), stdin=b"")
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out.splitlines()[-1])["code"], "nick_taken")

    def test_tls_to_a_plain_server_says_so(self):
        code, out, err = run_chat("client", "--tls", "--name", "x", "--port", str(self.port))
        self.assertEqual(code, 1)
        self.assertEqual(err, "chat.py: the server at 127.0.0.1:%d does not speak TLS "
                              "(drop --tls?)\n" % self.port)

    def test_colour_always_and_never(self):
        code, out, err = run_chat("client", "--name", "bot", "--port", str(self.port),
                                  "--color", "always", stdin=b"hi\n")
        self.assertIn("<\x1b[1m\x1b[%dmbot\x1b[0m\x1b[0m> hi" % chat.nick_color("bot"), out)
        code, out, err = run_chat("client", "--name", "bot", "--port", str(self.port),
                                  "--color", "never", stdin=b"hi\n")
        self.assertNotIn("\x1b", out)

    def test_reconnect_after_the_server_restarts_on_the_same_port(self):
        port = self.port
        watcher = self.join("watcher")
        proc = self.start_client("--name", "bot", "--port", str(port), "--reconnect")
        watcher.wait_for("*** bot joined (2 online)")
        self.server.shutdown()
        line = proc.stdout.readline()
        while b"reconnecting in" not in line:
            self.assertTrue(line, "the client gave up")
            line = proc.stdout.readline()
        self.assertIn(b"disconnected from server", line)
        serve_in_thread(self, port)  # the same port, as a restarted server would be
        self.port = port
        while line != b"*** reconnected\n":
            self.assertTrue(line, "the client gave up")
            line = proc.stdout.readline()
        again = self.connect()
        again.send_line("watcher")
        again.wait_for("*** watcher joined (2 online)")
        proc.stdin.write(b"back again\n")
        proc.stdin.close()
        again.expect("<bot> back again", "*** bot left (quit)")
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_ctrl_c_stops_reconnecting(self):
        watcher = self.join("watcher")
        proc = self.start_client("--name", "bot", "--port", str(self.port), "--reconnect")
        watcher.wait_for("*** bot joined (2 online)")
        self.server.shutdown()
        line = proc.stdout.readline()
        while b"reconnecting in" not in line:
            self.assertTrue(line, "the client gave up")
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertNotIn(b"Traceback", proc.stderr.read())

    def test_sigint_leaves_cleanly(self):
        watcher = self.join("watcher")
        proc = self.start_client("--name", "bot", "--port", str(self.port))
        watcher.wait_for("*** bot joined (2 online)")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0)
        self.assertNotIn(b"Traceback", err)
        watcher.expect("*** bot left (quit)")


def read_until(proc, wanted, timeout=TIMEOUT):
    """Read a process's stdout up to a line containing wanted; return the
    lines read (without their ends), the rest kept for the next call."""
    pending = READ_AHEAD.setdefault(proc, bytearray())
    lines, deadline = [], time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout.fileno(), selectors.EVENT_READ)
        while True:
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                lines.append(line.decode("utf-8", "replace"))
                if wanted in lines[-1]:
                    return lines
            left = deadline - time.monotonic()
            chunk = os.read(proc.stdout.fileno(), 65536) if left > 0 and selector.select(
                left) else b""
            if not chunk:
                raise AssertionError("no line with %r; read %r" % (wanted, lines))
            pending += chunk


READ_AHEAD = weakref.WeakKeyDictionary()  # a process's stdout read but not yet returned


class ClientResumeTest(ServerTestCase):
    """--reconnect comes back to its room and shows what was said while it
    was away, once and in order (JSON mode's ids and /history after ID)."""

    def setUp(self):
        self.start_server(op_password="sekrit")

    def operator_bob_and_a_reconnecting_alice(self, move="/join"):
        """bob, an operator in #rust (to kick alice), and alice, the bundled
        client with --reconnect, piped, just registered."""
        bob = self.join("bob")
        bob.send_line("/op sekrit")
        bob.send_line(move + " #rust")
        bob.wait_for("*** bob joined #rust (1 here)")
        alice = start_process(self, [sys.executable, CHAT_PY, "client", "--name", "alice",
                                     "--port", str(self.port), "--reconnect"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        read_until(alice, "*** alice joined (2 online)")
        return bob, alice

    def test_lines_said_while_away_are_shown_once_in_order(self):
        bob, alice = self.operator_bob_and_a_reconnecting_alice()
        bob.send_line("said before")
        alice.stdin.write(b"/join #rust\n")
        alice.stdin.flush()
        bob.wait_for("*** alice joined #rust (2 here)")
        bob.send_line("seen live")
        out = read_until(alice, "<bob> seen live")
        bob.send_line("/kick alice")
        bob.wait_for("*** alice was kicked by bob (no reason given)")
        for text in ("away 1", "away 2", "/me away 3"):
            bob.send_line(text)
        bob.wait_for("* bob away 3")
        out += read_until(alice, "*** reconnected")
        bob.wait_for("*** alice joined #rust (2 here)")  # back in the room it was in
        bob.send_line("back")
        out += read_until(alice, "<bob> back")
        alice.stdin.close()
        alice.wait(TIMEOUT)
        said = [line for line in out if re.search(r"(<bob>|\* bob) ", line)]
        self.assertEqual([re.sub(r"^\[[^]]*\] ", "", line) for line in said], [
            "<bob> said before", "<bob> seen live", "<bob> away 1", "<bob> away 2",
            "* bob away 3", "<bob> back"], out)
        self.assertRegex("\n".join(out), r"\*\*\* [34] messages in #rust while you were away ")

    def test_in_several_rooms_it_rejoins_every_room_and_catches_each_up(self):
        bob, alice = self.operator_bob_and_a_reconnecting_alice("/open")
        bob.wait_for("#lobby *** alice joined (2 online)")
        alice.stdin.write(b"/open #rust\n/open #go\n")
        alice.stdin.flush()
        bob.wait_for("*** alice joined #rust (2 here)")
        read_until(alice, "*** alice joined #go (1 here)")
        bob.send_line("/msg #lobby lobby live")
        read_until(alice, "#lobby <bob> lobby live")
        bob.send_line("/kick alice")
        bob.wait_for("*** alice was kicked by bob (no reason given)")
        bob.send_line("/msg #lobby lobby away")
        bob.send_line("rust away")
        bob.wait_for("<bob> rust away")
        out = read_until(alice, "*** reconnected")
        bob.wait_for("*** alice joined #rust (2 here)")  # back in each room it was in
        out += read_until(alice, "<bob> rust away")
        bob.send_line("/who #go")
        bob.wait_for("*** 1 in #go: alice")
        bob.send_line("rust back")
        out += read_until(alice, "#rust <bob> rust back")  # #go is current again
        alice.stdin.close()
        alice.wait(TIMEOUT)
        text = "\n".join(out)
        self.assertRegex(text, r"\*\*\* 1 message in #lobby while you were away ")
        self.assertRegex(text, r"\*\*\* 1 message in #rust while you were away ")
        self.assertEqual(len(re.findall("lobby away", text)), 1, out)


class ClientAccountTest(ServerTestCase):
    """The bundled client logs in to its account, again after a reconnect,
    and shows the messages that waited."""

    def setUp(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.db = os.path.join(folder, "chat.db")
        self.start_server(store=chat.SQLiteStore(self.db))
        alice = self.join("alice")
        alice.send_line("/register correct horse")
        alice.expect("*** alice is now your account: next time, /login alice PASSWORD")
        alice.close()

    def client(self, *args):
        env = dict(os.environ, CHAT_ACCOUNT_PASSWORD="correct horse")
        return start_process(self, [sys.executable, CHAT_PY, "client", "--port", str(self.port)]
                             + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)

    def test_it_logs_in_and_shows_what_waited_like_a_private_message(self):
        bob = self.join("bob")
        bob.send_line("/msg alice while you were out")
        bob.wait_for("*** alice is offline: they will get it when they log in")
        proc = self.client("--name", "alice", "--login")
        bob.wait_for("*** alice joined (2 online)")
        proc.stdin.close()
        out = proc.stdout.read().decode()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertIn("*** 1 message while you were away (local times):\n", out)
        self.assertRegex(out, STAMP + r"\*bob\* while you were out\n\*\*\* end of messages\n")

    def test_after_a_reconnect_it_logs_in_again(self):
        proc = self.client("--name", "alice", "--login", "--reconnect")
        watcher = self.join("watcher")
        line = proc.stdout.readline()
        while not line.startswith(b"*** alice joined"):
            self.assertTrue(line, "the client gave up")
            line = proc.stdout.readline()
        self.server.shutdown()
        while b"reconnecting in" not in line:
            self.assertTrue(line, "the client gave up")
            line = proc.stdout.readline()
        serve_in_thread(self, self.port, store=chat.SQLiteStore(self.db))
        again = Peer(self.port)
        self.addCleanup(again.close)
        again.send_line("bob")
        again.wait_for("*** alice joined (2 online)")  # logged in: the account is alice's
        proc.stdin.close()
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_login_needs_a_name(self):
        code, out, err = run_chat("client", "--login", "--port", str(self.port))
        self.assertEqual(code, 2)
        self.assertIn("--login needs --name", err)


class ClientLoopTest(unittest.TestCase):
    """The client in-process, its stdin a pipe, against fake servers; its
    waits are shortened so that the tests are quick."""

    def fake_server(self, script):
        """Listen; run script(conn, stop) for the one connection; return the port."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def serve():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                script(conn, stop)
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(stop.set)
        return listener.getsockname()[1]

    def run_client(self, port, stdin=b"", nick="bot"):
        """Run the client to its end; return (exit code, what it showed, stderr)."""
        stdin_r, stdin_w = os.pipe()
        os.write(stdin_w, stdin)
        os.close(stdin_w)
        out, err = io.StringIO(), io.StringIO()
        client = chat.ChatClient("127.0.0.1", port, nick, stdin_fd=stdin_r, out=out,
                                 interactive=False)
        result = {}

        def run():
            with contextlib.redirect_stderr(err):
                result["code"] = client.run()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive(), "the client did not exit; it showed %r"
                         % out.getvalue())
        os.close(stdin_r)
        return result["code"], out.getvalue(), err.getvalue()

    @staticmethod
    def greet_and_admit(conn):
        conn.sendall(b"*** welcome\n*** choose a nickname\n")
        data = b""
        while b"\n" not in data:
            data += conn.recv(100)
        nick = data.split(b"\n")[0]
        conn.sendall(b"*** " + nick + b" joined (1 online)\n")

    def test_reconnect_waits_for_a_server_down_at_start_saying_so_once(self):
        shorten(self, RECONNECT_FIRST_S=0.05)
        port = free_port()  # nothing listens there yet
        stdin_r, stdin_w = os.pipe()
        self.addCleanup(os.close, stdin_r)
        os.write(stdin_w, b"hi\n")
        os.close(stdin_w)
        out, err = io.StringIO(), io.StringIO()
        client = chat.ChatClient("127.0.0.1", port, "bot", stdin_fd=stdin_r, out=out,
                                 interactive=False, reconnect=True)
        result = {}

        def run():
            with contextlib.redirect_stderr(err):
                result["code"] = client.run()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while "trying again" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling its output, bounded
        self.assertIn("*** cannot connect to 127.0.0.1:%d: " % port, out.getvalue())
        time.sleep(0.4)  # not a wait for anything: attempts at 0.05, 0.1, 0.2 s fail
        serve_in_thread(self, port)
        thread.join(TIMEOUT)
        shown = out.getvalue()
        self.assertEqual(result.get("code"), 0, shown)
        self.assertIn("*** bot joined (1 online)\n<bot> hi\n", shown)
        self.assertEqual(shown.count("trying again until it answers"), 1, shown)
        self.assertNotIn("reconnecting", shown)

    def test_a_server_that_talks_on_does_not_keep_a_leaving_client(self):
        shorten(self, CLIENT_QUIT_WAIT_S=0.5)

        def talkative(conn, stop):
            self.greet_and_admit(conn)
            while not stop.wait(0.02):  # chatter, never closing
                conn.sendall(b"<x> chatter\n")
        port = self.fake_server(talkative)
        code, out, err = self.run_client(port, b"hello\n")
        self.assertEqual(code, 0)
        self.assertIn("<x> chatter", out)

    def test_a_nickname_never_answered_ends_a_piped_client(self):
        shorten(self, CLIENT_ANSWER_WAIT_S=0.5)

        def mute(conn, stop):
            conn.sendall(b"*** choose a nickname\n")
            stop.wait(TIMEOUT)
        port = self.fake_server(mute)
        code, out, err = self.run_client(port, b"never sent\n")
        self.assertEqual(code, 1)
        self.assertEqual(err, "chat.py: the server at 127.0.0.1:%d did not answer the "
                              "nickname in 0 s\n" % port)
        self.assertNotIn("said nothing", out)

    def test_a_server_that_never_greets_is_said_to_be_silent(self):
        shorten(self, CLIENT_GREETING_WAIT_S=0.2, CLIENT_ANSWER_WAIT_S=0.6)
        port = self.fake_server(lambda conn, stop: stop.wait(TIMEOUT))
        code, out, err = self.run_client(port, nick=None, stdin=b"bot\nhi\n")
        self.assertEqual(code, 1)
        self.assertIn("*** the server at 127.0.0.1:%d has said nothing in 0 s "
                      "(is it a chat server? one that needs --tls?)\n" % port, out)
        self.assertIn("did not answer the nickname in 1 s (does it need --tls?)", err)


class FakeShell:
    """What a ClientSession sees of the client around it, recording it all."""

    def __init__(self):
        self.sent, self.shown, self.asked, self.finished = b"", [], [], None

    def send(self, data):
        self.sent += data

    def show(self, text):
        self.shown.append(text)

    def ask(self, kind):
        self.asked.append(kind)

    def finish(self, code):
        self.finished = code

    def fail(self, message):
        self.finished = message

    def disconnect(self):
        pass

    def reconnect_at(self, when):
        pass

    def erase_input(self):
        pass


class ClientSessionTest(unittest.TestCase):
    """The client's decisions, with no socket, thread or terminal."""

    def session(self, **options):
        shell = FakeShell()
        return chat.ClientSession(shell, "127.0.0.1:9999", **options), shell

    def registered_in_json(self, **options):
        """A session that registered (as al) and heard that the server speaks JSON."""
        session, shell = self.session(nick="al", **options)
        session.connected()
        session.server_line("*** al joined (1 online)")
        self.assertIn(b"/format json\n", shell.sent)
        session.server_line(json.dumps({"type": "notice", "text": "format: json"}))
        self.assertTrue(shell.sent.endswith(b"/history 1\n"))  # the newest id, unshown
        session.server_line(json.dumps({"type": "history_end", "room": "#lobby", "count": 0}))
        del shell.shown[:]
        return session, shell

    def test_json_blocks_are_shown_as_text_mode_shows_them(self):
        session, shell = self.registered_in_json()
        item = {"type": "message", "id": 7, "room": "#lobby", "nick": "bob", "text": "x",
                "history": True, "time": "2026-12-01T14:03:05.123Z"}
        session.typed("line", "/search x")
        session.server_line(json.dumps(item))
        session.server_line(json.dumps({"type": "history_end", "room": "#lobby", "count": 1}))
        stamp = time.strftime(chat.HISTORY_TIME, time.localtime(
            calendar.timegm((2026, 12, 1, 14, 3, 0, 0, 0, 0))))
        self.assertEqual(shell.shown, [
            '*** 1 message in #lobby matching "x" (local times):',
            "[%s] <bob> x" % stamp, "*** end of history"])
        del shell.shown[:]
        session.typed("line", "/history after 7")
        session.server_line(json.dumps({"type": "history_end", "room": "#lobby", "count": 0}))
        self.assertEqual(shell.shown, ["*** no messages in #lobby after 7"])

    def test_offline_messages_are_one_block_and_own_privates_are_echoes(self):
        session, shell = self.registered_in_json()
        for text in ("one", "two"):
            session.server_line(json.dumps({"type": "private", "from": "bob", "to": "al",
                                            "text": text, "offline": True,
                                            "time": "2026-12-01T14:03:05.123Z"}))
        self.assertEqual(shell.shown, [])  # gathered: the block's count is not known yet
        session.server_line(json.dumps({"type": "private", "from": "al", "to": "bob",
                                        "text": "thanks"}))
        self.assertEqual(shell.shown[0], "*** 2 messages while you were away (local times):")
        self.assertEqual(shell.shown[3:], ["*** end of messages", "-> *bob* thanks"])
        del shell.shown[:]
        for _ in range(2):  # to ourselves: what we got, then the echo
            session.server_line(json.dumps({"type": "private", "from": "al", "to": "al",
                                            "text": "note"}))
        self.assertEqual(shell.shown, ["*al* note", "-> *al* note"])

    def test_a_password_room_on_a_terminal_asks_password_then_nick(self):
        session, shell = self.session(interactive=True)
        session.connected()
        for text in ["welcome to chat.py (1 online)", chat.PASSWORD_GREETING,
                     "choose a nickname: 1-24 letters, digits, _ or -"]:
            session.server_line("*** " + text)
        self.assertEqual((shell.asked, shell.sent), (["secret"], b""))
        session.typed("secret", "s3cret")
        self.assertEqual(shell.sent, b"/pass s3cret\n")
        session.server_line("*** " + chat.PASSWORD_ACCEPTED)
        self.assertEqual(shell.asked, ["secret", "nick"])
        session.typed("nick", " al ")
        session.server_line("*** al joined (2 online)")
        # In text until registered; then JSON, and the setup questions.
        self.assertEqual(shell.sent, b"/pass s3cret\nal\n/format json\n/who\n/rooms\n/help\n/ping "
                         + chat.SETUP_TOKEN.encode() + b"\n")
        self.assertEqual(shell.asked[-1], "nick")  # typing waits for /format json's answer
        session.server_line(json.dumps({"type": "notice", "text": "format: json"}))
        self.assertEqual(shell.asked[-1], "line")
        self.assertEqual(shell.shown, ["*** welcome to chat.py (1 online)",
                                       "*** choose a nickname: 1-24 letters, digits, _ or -",
                                       "*** al joined (2 online)"])

    def test_a_line_typed_at_once_after_joining_waits_for_json_mode(self):
        # /join typed before /format json was answered was itself answered
        # between it and the hidden /history 1: the join's replay was hidden
        # and the /history 1 answer shown instead.
        session, shell = self.session(nick="al")
        session.connected()
        session.server_line("*** al joined (2 online)")
        self.assertNotIn("line", shell.asked)
        session.server_line(json.dumps({"type": "notice", "text": "format: json"}))
        self.assertTrue(shell.sent.endswith(b"/history 1\n"))
        self.assertEqual(shell.asked[-1], "line")  # now: after the hidden question
        session, shell = self.session(nick="al")  # a server that never answers it
        session.connected()
        session.server_line("*** al joined (2 online)")
        session.check_deadlines(session.next_deadline())
        self.assertEqual(shell.asked[-1], "line")

    def test_the_answers_to_its_own_questions_are_not_shown(self):
        session, shell = self.session(nick="al", interactive=True)
        session.connected()
        session.server_line("*** al joined (2 online)")
        for line in ["*** 2 in #lobby: al, bob"] + ["*** " + text for text in chat.HELP] + [
                "*** bob joined (3 online)", "*** pong " + chat.SETUP_TOKEN]:
            session.server_line(line)
        self.assertEqual(shell.shown, ["*** al joined (2 online)", "*** bob joined (3 online)"])
        self.assertEqual(sorted(session.nicks.values()), ["al", "bob"])
        self.assertNotIn("/op", session.commands)

    def test_login_at_a_terminal_waits_for_the_typed_password(self):
        session, shell = self.session(nick="al", login=True, interactive=True)
        session.connected()
        for text in ["welcome to chat.py (1 online)",
                     "choose a nickname: 1-24 letters, digits, _ or -"]:
            session.server_line("*** " + text)
        self.assertEqual((shell.asked, shell.sent), (["account"], b""))  # not the bare nick
        self.assertEqual(shell.shown, ["*** welcome to chat.py (1 online)"])  # asked after it
        session.typed("account", "correct horse")
        self.assertEqual(shell.sent, b"/login al correct horse\n")
        session.server_line("!!! " + chat.WRONG_LOGIN)  # mistyped: asked again, nick kept
        self.assertEqual(shell.asked, ["account", "account"])
        session.typed("account", "battery staple")
        self.assertTrue(shell.sent.endswith(b"/login al battery staple\n"), shell.sent)

    def test_a_refused_catch_up_is_asked_again_then_given_up_without_freezing(self):
        session, shell = self.registered_in_json(reconnect=True)
        session.server_line(json.dumps({"type": "message", "id": 5, "room": "#lobby",
                                        "nick": "bob", "text": "seen"}))
        session.server_closed()
        self.assertEqual(session.resume, (["#lobby"], "#lobby", {"#lobby": 5}))
        session.connected()
        session.server_line(json.dumps({"type": "notice", "text": "format: json"}))
        session.server_line(json.dumps({"type": "joined", "nick": "al", "room": "#lobby",
                                        "count": 2}))
        session.server_line(json.dumps({"type": "pong", "token": chat.RESUME_TOKEN}))
        self.assertTrue(shell.sent.endswith(b"/history after 5\n"), shell.sent)
        session.typed("line", "typed while away")
        refusal = json.dumps({"type": "error", "code": "not_sent", "text":
                              "the history can't be read now (Redis closed the connection)"})
        shell.sent = b""
        for attempt in range(chat.CATCH_UP_TRIES):
            session.server_line(refusal)
            if attempt < chat.CATCH_UP_TRIES - 1:
                self.assertEqual(shell.sent, b"")  # asked again later, not at once
                session.check_deadlines(session.next_deadline())
                self.assertEqual(shell.sent, b"/history after 5\n")
                shell.sent = b""
        self.assertIn("*** what was said in #lobby while you were away can't be shown: "
                      "the history can't be read now (Redis closed the connection)", shell.shown)
        self.assertEqual(shell.sent, b"typed while away\n")  # not dropped
        session.server_line(json.dumps({"type": "message", "id": 9, "room": "#lobby",
                                        "nick": "bob", "text": "live again"}))
        self.assertEqual(shell.shown[-1], "<bob> live again")

    def test_several_rooms_lines_of_the_others_are_marked_and_the_prompt_follows(self):
        session, shell = self.registered_in_json()
        obj = lambda **fields: session.server_line(json.dumps(fields))
        session.typed("line", "/open #rust")
        obj(type="joined", nick="al", room="#rust", count=1)
        self.assertEqual((session.prompt(), session.joined), ("#rust> ", ["#lobby", "#rust"]))
        obj(type="message", id=3, room="#lobby", nick="bob", text="hi")
        obj(type="message", id=4, room="#rust", nick="cy", text="borrow")
        obj(type="renamed", old="bob", new="rob", room="#lobby")  # about a person: unmarked
        obj(type="left", nick="dan", room="#lobby", reason="parted")
        self.assertEqual(shell.shown, ["*** al joined #rust (1 here)", "#lobby <bob> hi",
                                       "<cy> borrow", "*** bob is now known as rob",
                                       "#lobby *** dan left (parted)"])
        self.assertEqual(session.last_ids, {"#lobby": 3, "#rust": 4})
        session.typed("line", "/open #lobby")
        obj(type="notice", text="talking in #lobby now", room="#lobby")
        self.assertEqual(session.prompt(), "#lobby> ")
        session.typed("line", "/part")
        obj(type="left", nick="al", room="#lobby", reason="parted")
        obj(type="notice", text="talking in #rust now", room="#rust")
        self.assertEqual((session.prompt(), session.joined), ("#rust> ", ["#rust"]))
        session.typed("line", "/join #go")  # leaves #rust: only its others are told
        obj(type="joined", nick="al", room="#go", count=1)
        self.assertEqual((session.prompt(), session.joined), ("#go> ", ["#go"]))
        session.typed("line", "/part")
        obj(type="left", nick="al", room="#go", reason="parted")
        obj(type="notice", text="you are in no room: /join ROOM", room=None)
        self.assertEqual((session.prompt(), session.joined), ("(no room)> ", []))

    def test_reconnecting_it_goes_back_to_every_room_and_catches_each_up(self):
        session, shell = self.registered_in_json(reconnect=True)
        obj = lambda **fields: session.server_line(json.dumps(fields))
        session.typed("line", "/open #rust")
        obj(type="joined", nick="al", room="#rust", count=1)
        obj(type="message", id=4, room="#rust", nick="cy", text="seen")
        obj(type="message", id=5, room="#lobby", nick="bob", text="seen")
        session.typed("line", "/open #lobby")
        obj(type="notice", text="talking in #lobby now", room="#lobby")
        session.server_closed()
        shell.sent = b""
        session.connected()
        obj(type="notice", text="format: json")
        obj(type="joined", nick="al", room="#lobby", count=2)
        self.assertTrue(shell.sent.endswith(
            b"/open #rust\n/open #lobby\n/ping " + chat.RESUME_TOKEN.encode() + b"\n"),
            shell.sent)
        obj(type="joined", nick="al", room="#rust", count=2)
        obj(type="notice", text="talking in #lobby now", room="#lobby")
        obj(type="message", id=9, room="#rust", nick="cy", text="live, held")
        obj(type="pong", token=chat.RESUME_TOKEN)
        self.assertTrue(shell.sent.endswith(b"/history after 5\n"), shell.sent)  # current
        obj(type="message", id=6, room="#lobby", nick="bob", text="missed", history=True,
            time="2026-12-01T14:03:05.123Z")
        obj(type="history_end", room="#lobby", count=1)
        self.assertTrue(shell.sent.endswith(b"/history #rust after 4\n"), shell.sent)
        obj(type="message", id=8, room="#rust", nick="cy", text="missed too", history=True,
            time="2026-12-01T14:03:05.123Z")
        obj(type="history_end", room="#rust", count=1)
        shown = [re.sub(r"^\[[^]]*\] ", "", line) for line in shell.shown]
        self.assertEqual(shown[-7:], [
            "*** 1 message in #lobby while you were away (local times):", "<bob> missed",
            "*** end of history",
            "*** 1 message in #rust while you were away (local times):", "<cy> missed too",
            "*** end of history", "#rust <cy> live, held"])
        self.assertEqual((session.prompt(), session.joined), ("#lobby> ", ["#lobby", "#rust"]))

    def test_piped_input_ending_while_it_catches_up_quits_after_what_was_typed(self):
        session, shell = self.registered_in_json(reconnect=True)
        session.server_closed()
        session.connected()
        session.server_line(json.dumps({"type": "notice", "text": "format: json"}))
        session.server_line(json.dumps({"type": "joined", "nick": "al", "room": "#lobby",
                                        "count": 2}))
        session.server_line(json.dumps({"type": "pong", "token": chat.RESUME_TOKEN}))
        self.assertTrue(shell.sent.endswith(b"/history after 0\n"), shell.sent)  # catching up
        session.typed("line", "back again")
        session.end_of_input()
        self.assertNotIn(b"/quit", shell.sent)  # not before what was typed
        session.server_line(json.dumps({"type": "history_end", "room": "#lobby", "count": 0}))
        self.assertTrue(shell.sent.endswith(b"back again\n/quit\n"), shell.sent)

    def test_its_own_join_back_to_the_lobby_is_a_move_and_a_reconnect_parts_first(self):
        session, shell = self.registered_in_json(reconnect=True)
        obj = lambda **fields: session.server_line(json.dumps(fields))
        session.typed("line", "/open #a")
        obj(type="joined", nick="al", room="#a", count=1)
        session.typed("line", "/part #lobby")
        obj(type="left", nick="al", room="#lobby", reason="parted")
        obj(type="notice", text="talking in #a now", room="#a")
        session.typed("line", "/open #lobby")
        obj(type="joined", nick="al", room="#lobby", count=2)  # (JSON: the registration's type)
        self.assertEqual(shell.shown[-1], "*** al joined #lobby (2 here)")
        self.assertEqual((session.prompt(), session.joined), ("#lobby> ", ["#a", "#lobby"]))
        self.assertEqual([a for a in session.awaited if a.kind == "move"], [])
        session.typed("line", "/part #lobby")
        obj(type="left", nick="al", room="#lobby", reason="parted")
        obj(type="notice", text="talking in #a now", room="#a")
        session.server_closed()
        shell.sent = b""
        session.connected()
        obj(type="notice", text="format: json")
        obj(type="joined", nick="al", room="#lobby", count=2)
        # The lobby is parted before anything is opened: at --max-joined, nothing is refused.
        self.assertTrue(shell.sent.endswith(b"/part #lobby\n/open #a\n/ping "
                                            + chat.RESUME_TOKEN.encode() + b"\n"), shell.sent)

    def test_its_own_commands_while_disconnected_and_piped_input_that_ends_then(self):
        session, shell = self.registered_in_json(reconnect=True)
        session.server_line(json.dumps({"type": "private", "from": "bob", "to": "al",
                                        "text": "there?"}))
        session.typed("line", "/format text")  # the client's: it shows text, speaks JSON
        self.assertIn("*** this client shows text; for JSON objects, run it with --json",
                      shell.shown)
        session.server_closed()
        shell.sent = b""
        session.typed("line", "/reply yes")  # while disconnected: a /msg once back
        session.typed("line", "/timestamps")
        session.end_of_input()  # piped input ends meanwhile: not yet the end
        self.assertIsNone(shell.finished)
        session.connected()
        session.server_line(json.dumps({"type": "notice", "text": "format: json"}))
        session.server_line(json.dumps({"type": "joined", "nick": "al", "room": "#lobby",
                                        "count": 2}))
        session.server_line(json.dumps({"type": "pong", "token": chat.RESUME_TOKEN}))
        session.server_line(json.dumps({"type": "history_end", "room": "#lobby", "count": 0}))
        self.assertTrue(shell.sent.endswith(b"/msg bob yes\n/quit\n"), shell.sent)
        self.assertNotIn(b"/timestamps", shell.sent)

    def test_tab_completes_the_new_commands_and_rooms_after_them(self):
        nicks = {"bob": "bob"}
        self.assertEqual(chat.completions("/op", "", nicks), ["/open"])
        self.assertEqual(chat.completions("/pa", "", nicks), ["/part", "/password"])
        self.assertEqual(chat.completions("/aw", "", nicks), ["/away"])
        for command in ("/open", "/part", "/join", "/who", "/history"):
            self.assertEqual(chat.completions("ru", command + " ", nicks,
                                              rooms={"#rust", "#ruby", "#go"}),
                             ["#ruby", "#rust"])
        self.assertEqual(chat.completions("#g", "/msg ", nicks, rooms={"#go"}), ["#go"])

    def test_history_lines_keep_their_own_time_and_reply_answers_offline_messages(self):
        session, shell = self.registered_in_json(timestamps=True)
        session.server_line(json.dumps({"type": "private", "from": "bob", "to": "al",
                                        "text": "while you slept", "offline": True,
                                        "time": "2026-12-01T14:03:05.123Z"}))
        session.received_all()
        self.assertEqual(len(shell.shown), 3, shell.shown)
        self.assertRegex(shell.shown[1], r"^\[2026-12-01 \d\d:\d\d\] \*bob\* while you slept$")
        self.assertRegex(shell.shown[0], r"^\d\d:\d\d \*\*\* 1 message while you were away")
        session.typed("line", "/reply got it")
        self.assertTrue(shell.sent.endswith(b"/msg bob got it\n"), shell.sent)

    def test_a_silent_server_gets_a_hint_about_tls(self):
        session, shell = self.session(nick="al")
        session.connected()
        session.check_deadlines(session.next_deadline())  # said nothing: the nick goes anyway
        self.assertIn("one that needs --tls?", shell.shown[-1])
        session.check_deadlines(session.next_deadline())
        self.assertRegex(shell.finished, r"did not answer the nickname in \d+ s "
                                         r"\(does it need --tls\?\)$")
        session, shell = self.session(nick="al")
        session.connected()
        session.speaks_tls()
        self.assertIn("speaks TLS: add --tls", shell.finished)

    def test_a_refused_nick_ends_a_piped_client_and_is_asked_again_on_a_terminal(self):
        session, shell = self.session(nick="bob")
        session.connected()
        session.server_line("!!! nickname bob is taken")
        self.assertEqual((shell.shown, shell.finished), (["!!! nickname bob is taken"], 1))
        session, shell = self.session(nick="bob", interactive=True)
        session.connected()
        session.server_line("!!! nickname bob is taken")
        self.assertEqual((shell.asked, shell.finished), (["nick"], None))


class TlsTest(ServerTestCase):

    def setUp(self):
        self.start_server(tls=True, rate=0)
        self.cert = write_file(self, "cert.pem", TEST_CERT)

    def test_tls_chat_end_to_end_with_the_bundled_client(self):
        watcher = self.join("watcher")
        code, out, err = run_chat("client", "--name", "bot", "--port", str(self.port),
                                  "--cafile", self.cert, stdin=b"over tls\n")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("<bot> over tls", out)
        watcher.wait_for("<bot> over tls")
        self.assertEqual(watcher.sock.version()[:4], "TLSv")

    def test_a_silent_connection_delays_no_one(self):
        silent = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(silent.close)
        started = time.monotonic()
        alice = self.join("alice")
        alice.send_line("quick")
        alice.expect("<alice> quick")
        self.assertLess(time.monotonic() - started, 1.0)

    def test_a_close_by_the_server_ends_with_close_notify(self):
        context = ssl.create_default_context(cafile=self.cert)
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        sock = context.wrap_socket(raw, server_hostname="localhost",
                                   suppress_ragged_eofs=False)  # a cut: SSLEOFError
        self.addCleanup(sock.close)
        sock.sendall(b"al\n/quit\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break  # a close_notify: the end the server meant
            data += chunk
        self.assertIn(b"*** al joined (1 online)", data)

    def test_plain_text_to_the_tls_port_is_closed_without_harm(self):
        alice = self.join("alice")
        plain = Peer(self.port)  # no TLS
        self.addCleanup(plain.close)
        plain.send_line("bob")
        plain.send_raw(b"hello\r\n" * 10)
        self.assertEqual(plain.expect_closed(), [])
        alice.send_line("still fine")
        alice.expect("<alice> still fine")
        self.assertEqual(alice.sync(), [])

    def test_a_large_burst_arrives_whole(self):
        alice, bob = self.join_all("alice", "bob")
        lines = ["%d %s" % (i, "z" * 300) for i in range(2000)]  # 600 kB: many records
        alice.send_raw("".join(line + "\n" for line in lines).encode())
        for line in lines:
            bob.expect("<alice> " + line)

    def test_a_slow_tls_reader_is_evicted_and_the_others_get_everything(self):
        self.start_server(tls=True, rate=0)
        alice, bob = self.join_all("alice", "bob")
        slow = self.join("slow", rcvbuf=4096)  # and it never reads again
        bob.wait_for("*** slow joined (3 online)")
        alice.wait_for("*** slow joined (3 online)")
        # Each peer's TLS socket is used by one thread only (OpenSSL wants
        # that): alice sends a chunk and reads it back; bob reads in a thread.
        sent, got_bob = [], []

        def read_bob():
            while not got_bob or got_bob[-1] != "<alice> done":
                line = bob.read_line()
                if line is None:
                    return
                got_bob.append(line)
        reader = threading.Thread(target=read_bob)
        reader.start()
        for chunk in range(60):  # 110 kB each: the slow one overflows after a few
            lines = ["%d.%d %s" % (chunk, i, "w" * 100) for i in range(1000)]
            alice.send_raw("".join(line + "\n" for line in lines).encode())
            sent.extend(lines)
            for line in lines:
                alice.wait_for("<alice> " + line)
            if "*** slow left (too slow)" in alice.seen:
                break
        alice.send_line("done")
        reader.join(TIMEOUT)
        self.assertIn("*** slow left (too slow)", alice.seen)
        self.assertIn("*** slow left (too slow)", got_bob)
        self.assertEqual([line for line in got_bob if line.startswith("<alice> ")],
                         ["<alice> " + line for line in sent] + ["<alice> done"])
        slow.expect_closed()

    def test_fingerprint_match_and_mismatch(self):
        code, out, err = run_chat("client", "--name", "pin", "--port", str(self.port),
                                  "--fingerprint", TEST_FINGERPRINT.lower(), stdin=b"x\n")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("<pin> x", out)
        wrong = "SHA256:" + "00" * 32
        code, out, err = run_chat("client", "--name", "pin", "--port", str(self.port),
                                  "--fingerprint", wrong, stdin=b"x\n")
        self.assertEqual(code, 1)
        self.assertIn("shows the certificate %s, not the pinned" % TEST_FINGERPRINT, err)
        self.assertNotIn("Traceback", err)

    def test_insecure_says_so_and_connects(self):
        code, out, err = run_chat("client", "--name", "yolo", "--port", str(self.port),
                                  "--insecure", stdin=b"x\n")
        self.assertEqual(code, 0)
        self.assertIn("--insecure", err)
        self.assertIn("<yolo> x", out)

    def test_an_unverifiable_server_is_one_line_and_exit_1(self):
        env = dict(os.environ, SSL_CERT_FILE=os.devnull, SSL_CERT_DIR=os.devnull)
        code, out, err = run_chat("client", "--name", "x", "--port", str(self.port),
                                  "--tls", env=env)
        self.assertEqual(code, 1)
        self.assertIn("cannot verify the server at 127.0.0.1:%d" % self.port, err)
        self.assertEqual(err.count("\n"), 1)

    def test_the_server_logs_its_fingerprint(self):
        key = write_file(self, "key.pem", TEST_KEY)
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0",
                                    "--tls-cert", self.cert, "--tls-key", key],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, log = wait_until_listening(self, proc.stderr)
        self.assertIn(TEST_FINGERPRINT, log)
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_a_bad_key_is_one_line_and_exit_2(self):
        code, out, err = run_chat("server", "--port", "0", "--tls-cert", self.cert,
                                  "--tls-key", self.cert)
        self.assertEqual(code, 2)
        self.assertIn("cannot use", err)
        self.assertNotIn("Traceback", err)
        code, out, err = run_chat("server", "--port", "0", "--tls-cert", self.cert)
        self.assertEqual(code, 2)


class PasswordTest(ServerTestCase):

    def setUp(self):
        shorten(self, GUESS_INTERVAL_S=0.01)  # (GuessTest measures it)
        self.start_server(password="open sesame")

    def test_the_greeting_asks_for_it_and_the_nick_must_wait(self):
        peer = self.connect()
        lines = [peer.read_line() for _ in range(3)]
        self.assertIn("*** " + chat.PASSWORD_GREETING, lines)
        self.assertTrue(lines[-1].startswith("*** choose a nickname"))
        peer.send_line("alice")
        peer.expect("!!! password required: send /pass SECRET first")
        peer.send_line("/pass open sesame")
        peer.expect("*** password accepted: choose a nickname")
        peer.send_line("alice")
        peer.expect("*** alice joined (1 online)")

    def test_a_wrong_password_is_closed_after_a_delay(self):
        peer = self.greeted()
        started = time.monotonic()
        peer.send_line("/pass guess")
        peer.send_line("/pass open sesame")  # too late: it is not read
        self.assertEqual(peer.expect_closed(), ["!!! wrong password"])
        self.assertGreaterEqual(time.monotonic() - started, 0.8)

    def test_the_client_sends_it_from_a_file_or_the_environment(self):
        path = write_file(self, "password", "open sesame\n")
        code, out, err = run_chat("client", "--name", "a", "--port", str(self.port),
                                  "--password-file", path, stdin=b"in\n")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("<a> in", out)
        env = dict(os.environ, CHAT_PASSWORD="open sesame")
        code, out, err = run_chat("client", "--name", "b", "--port", str(self.port),
                                  stdin=b"in\n", env=env)
        self.assertEqual(code, 0)
        self.assertIn("<b> in", out)

    def test_the_client_without_it_or_with_a_wrong_one_exits_1(self):
        code, out, err = run_chat("client", "--name", "a", "--port", str(self.port),
                                  stdin=b"in\n")
        self.assertEqual(code, 1)
        self.assertIn("!!! password required", out)
        env = dict(os.environ, CHAT_PASSWORD="nope")
        code, out, err = run_chat("client", "--name", "a", "--port", str(self.port),
                                  stdin=b"in\n", env=env)
        self.assertEqual(code, 1)
        self.assertIn("!!! wrong password", out)

    def test_the_server_reads_it_from_a_file_never_the_command_line(self):
        code, out, err = run_chat("server", "--port", "0", "--password-file",
                                  "/no/such/file")
        self.assertEqual(code, 2)
        self.assertIn("cannot read the password file", err)
        code, out, err = run_chat("server", "--port", "0", "--password", "x")
        self.assertEqual(code, 2)  # no such flag


class GuessTest(ServerTestCase):
    """Guessing secrets costs the guesser's address, however many
    connections it opens: one guess a GUESS_INTERVAL_S, and a bounded
    number of wrong ones a minute."""

    def test_an_address_guesses_one_at_a_time_then_not_at_all(self):
        shorten(self, GUESS_INTERVAL_S=0.1, WRONG_PASSWORD_DELAY_S=0.01)
        self.start_server(password="open sesame", op_password="0p")
        guessers = [self.connect() for _ in range(chat.WRONG_GUESSES_PER_MINUTE + 2)]
        for number, peer in enumerate(guessers):  # all at once, from one address
            peer.send_line("/pass wrong %d" % number)
        answered = []
        for peer in guessers:
            peer.wait_for("*** choose a nickname: 1-24 letters, digits, _ or -")
            line = peer.read_line()
            answered.append((time.monotonic(), line))
        answers = [line for _, line in answered]
        self.assertEqual(answers, ["!!! wrong password"] * chat.WRONG_GUESSES_PER_MINUTE
                         + ["!!! " + chat.TOO_MANY_GUESSES] * 2)
        times = sorted(when for when, line in answered if line == "!!! wrong password")
        self.assertGreaterEqual(times[-1] - times[0],
                                0.1 * (chat.WRONG_GUESSES_PER_MINUTE - 1) * 0.9)
        right = self.connect()  # the right one too, now, from that address
        right.send_line("/pass open sesame")
        right.wait_for("!!! " + chat.TOO_MANY_GUESSES)


class OperatorTest(ServerTestCase):

    def setUp(self):
        shorten(self, GUESS_INTERVAL_S=0.01)  # (GuessTest measures it)
        self.start_server(op_password="hunter2")
        self.alice, self.bob = self.join_all("alice", "bob")

    def make_op(self, peer, nick):
        peer.send_line("/op hunter2")
        peer.wait_for("*** %s is now an operator" % nick)

    def test_op_with_the_wrong_and_the_right_password(self):
        self.alice.send_line("/op guess")
        self.alice.expect("!!! wrong operator password")
        self.make_op(self.alice, "alice")
        self.bob.wait_for("*** alice is now an operator")
        self.bob.send_line("/who")
        self.bob.expect("*** 2 in #lobby: @alice, bob")

    def test_three_wrong_op_passwords_close_the_connection(self):
        for _ in range(3):
            self.bob.send_line("/op guess")
        lines = self.bob.expect_closed()
        self.assertEqual(lines[-1], "!!! too many wrong operator passwords")
        self.alice.wait_for("*** bob left (connection closed)")

    def test_operator_commands_are_refused_to_others(self):
        for command in ["/kick alice", "/ban alice", "/unban 1.2.3.4", "/bans",
                        "/mute alice", "/unmute alice"]:
            self.bob.send_line(command)
            self.bob.expect("!!! operators only")

    def test_help_lists_operator_commands_only_to_operators(self):
        self.bob.send_line("/help")
        text = "\n".join(self.bob.sync())
        self.assertIn("/op SECRET", text)
        self.assertNotIn("/kick", text)
        self.make_op(self.alice, "alice")
        self.alice.send_line("/help")
        text = "\n".join(self.alice.sync())
        for command in ["/kick", "/ban", "/unban", "/bans", "/mute", "/unmute"]:
            self.assertIn(command, text)

    def test_kick(self):
        self.make_op(self.alice, "alice")
        self.alice.send_line("/kick BOB spamming")
        self.alice.expect("*** bob was kicked by alice (spamming)")
        lines = self.bob.expect_closed()
        self.assertEqual(lines[-1], "*** bob was kicked by alice (spamming)")
        self.alice.send_line("/kick nobody")
        self.alice.expect("!!! no such user: nobody")
        carol = self.join("carol")
        self.alice.wait_for("*** carol joined (2 online)")
        self.alice.send_line("/kick carol")
        carol.wait_for("*** carol was kicked by alice (no reason given)")

    def test_ban_and_unban(self):
        self.make_op(self.alice, "alice")
        self.alice.send_line("/ban bob flooding")
        self.alice.expect("*** bob was banned by alice (flooding)")
        self.bob.expect_closed()
        self.alice.send_line("/bans")
        self.alice.expect("*** banned: 127.0.0.1 (bob)")
        again = self.connect()
        self.assertEqual(again.expect_closed(), ["!!! you are banned"])
        self.alice.send_line("/unban 10.0.0.1")
        self.alice.expect("!!! 10.0.0.1 is not banned")
        self.alice.send_line("/unban 127.0.0.1")
        self.alice.expect("*** 127.0.0.1 is no longer banned")
        self.join("bob")
        self.alice.send_line("/bans")
        self.alice.wait_for("*** no address is banned")

    def test_an_operator_cannot_ban_themselves(self):
        self.make_op(self.alice, "alice")
        self.alice.send_line("/ban ALICE oops")
        self.alice.expect("!!! you can't ban yourself")
        self.alice.send_line("/bans")
        self.alice.expect("*** no address is banned")
        self.assertEqual(self.bob.sync(), ["*** alice is now an operator"])

    def test_mute_and_unmute(self):
        self.make_op(self.alice, "alice")
        self.alice.send_line("/mute bob")
        self.alice.expect("*** bob was muted by alice")
        self.bob.wait_for("*** bob was muted by alice")
        for line in ["hello?", "/me waves", "/msg alice psst", "/nick you_all_suck"]:
            self.bob.send_line(line)
            self.bob.expect("!!! you are muted")
        self.assertEqual(self.alice.sync(), [])
        self.alice.send_line("/mute bob")
        self.alice.expect("!!! bob is muted already")
        self.alice.send_line("/unmute bob")
        self.alice.expect("*** bob was unmuted by alice")
        self.bob.send_line("back")
        self.alice.expect("<bob> back")

    def test_no_operator_password_no_operators(self):
        self.start_server()
        peer = self.join("x")
        peer.send_line("/op anything")
        peer.expect("!!! this server has no operators")


class TerminalCase(ServerTestCase):
    """The client on a pseudo-terminal, as a person at a keyboard runs it;
    bob is in the room already."""

    server_options = {}
    client_args = ["--color", "never"]
    client_env = {}
    command = [sys.executable, CHAT_PY]

    def setUp(self):
        if not hasattr(os, "openpty"):
            self.skipTest("no pseudo-terminals here")
        self.start_server(**self.server_options)
        self.bob = self.join_with_password("bob")
        master, slave = os.openpty()
        import fcntl, struct, termios  # Unix only, like the pseudo-terminal itself
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        env = dict(os.environ, TERM="xterm", COLUMNS="40", LINES="24", **self.client_env)
        env.pop("NO_COLOR", None)
        self.addCleanup(os.close, master)
        self.proc = start_process(
            self, self.command + ["client", "--port", str(self.port)] + self.client_args,
            stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.master = master
        self.screen = b""   # everything the client wrote
        self.matched = 0    # where the last read_until match ended

    def read_until(self, expected, timeout=TIMEOUT):
        """Read the terminal's output until expected appears after the previous
        match; return the output from there to the end of this match."""
        deadline = time.monotonic() + timeout
        start = self.matched
        selector = selectors.DefaultSelector()
        selector.register(self.master, selectors.EVENT_READ)
        with selector:
            while expected not in self.screen[start:]:
                self.assertLess(time.monotonic(), deadline,
                                "%r not in %r" % (expected, self.screen[start:]))
                if selector.select(0.1):
                    try:
                        self.screen += os.read(self.master, 4096)
                    except OSError:  # the client has exited
                        break
        if expected not in self.screen[start:]:
            raise AssertionError("the client exited; %r not in %r"
                                 % (expected, self.screen[start:]))
        self.matched = self.screen.index(expected, start) + len(expected)
        return self.screen[start:self.matched]

    def type(self, keys):
        os.write(self.master, keys)

    def client_sync(self):
        """Barrier: the client has had the answers to what it sent before
        (its silent /who and /help on joining among them)."""
        self.wait_until_reading()
        self.type(b"/ping client-sync\r")
        self.read_until(b"*** pong client-sync")
        self.wait_until_reading()

    def rendered(self, columns=40):
        """The screen's rows as a terminal would show them: enough of one
        for what the client writes (CR, LF, BS, cursor moves, erasing)."""
        rows, row, col = [[]], 0, 0
        for token in re.findall(r"\x1b\[\d*[A-Za-z]|.", self.screen.decode("utf-8", "replace"),
                                re.DOTALL):
            if token.startswith("\x1b"):
                count, op = int(token[2:-1] or 1), token[-1]
                if op == "A":
                    row = max(0, row - count)
                elif op in "CD":
                    col = max(0, col + (count if op == "C" else -count))
                elif op in "JK":
                    rows += [[] for _ in range(row + 1 - len(rows))]
                    del rows[row][col:]
                    if op == "J":
                        del rows[row + 1:]
            elif token == "\r":
                col = 0
            elif token == "\n":
                row += 1
            elif token == "\x08":
                col = max(0, col - 1)
            elif token >= " ":
                if col >= columns:
                    row, col = row + 1, 0
                rows += [[] for _ in range(row + 1 - len(rows))]
                line = rows[row]
                line += [" "] * (col + 1 - len(line))
                line[col] = token
                col += 1
        return ["".join(line) for line in rows]

    def drain_screen(self):
        """Whatever the client wrote lately, for a failure message."""
        try:
            self.read_until(b"\0 never written \0", timeout=1)
        except AssertionError:
            pass
        return self.screen[-2000:]

    def wait_until_reading(self):
        """Wait until readline reads the keyboard (echo off): keys typed before
        are echoed by the terminal itself, and readline shows them only later."""
        import termios
        deadline = time.monotonic() + TIMEOUT
        while termios.tcgetattr(self.master)[3] & termios.ECHO:
            self.assertLess(time.monotonic(), deadline, "readline never started")
            time.sleep(0.01)  # polling a condition, bounded by the deadline

    def join_with_password(self, nick):
        if "password" not in self.server_options:
            return self.join(nick)
        peer = self.greeted()
        peer.send_line("/pass " + self.server_options["password"])
        peer.send_line(nick)
        peer.wait_for("*** %s joined (1 online)" % nick)
        return peer


class TerminalClientTest(TerminalCase):

    def test_asks_for_the_nickname_again_then_chats_without_tearing(self):
        self.read_until(b"nickname: ")
        self.type(b"bob\r")
        self.read_until(b"!!! nickname bob is taken\r\nnickname: ")
        self.type(b"al\r")
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.bob.wait_for("*** al joined (2 online)")
        self.wait_until_reading()
        self.type(b"hel")
        self.read_until(b"hel")
        self.bob.send_line("hi there")
        # The typed line is erased, the message printed, the line redrawn.
        self.read_until(b"\r\x1b[J<bob> hi there\r\n#lobby> hel")
        self.type(b"lo\r")
        self.bob.expect("<bob> hi there", "<al> hello")
        long_input = b"x" * 50  # 58 columns with the prompt: two rows of 40
        self.wait_until_reading()
        self.type(long_input)
        self.read_until(long_input[-10:])
        self.bob.send_line("wrap")
        self.read_until(b"\r\x1b[1A\x1b[J<bob> wrap\r\n#lobby> " + long_input)
        self.type(b"\r")
        self.bob.expect("<bob> wrap", "<al> " + "x" * 50)
        self.bob.send_line("/msg al psst")  # a private message rings the bell
        self.read_until(b"*bob* psst\a")
        self.wait_until_reading()
        self.type(b"hi b\t")  # Tab completes the nick
        self.read_until(b"hi bob")
        self.type(b"\r\x04")  # Enter, then Ctrl-D: leave
        self.bob.expect("-> *al* psst", "<al> hi bob", "*** al left (quit)")
        self.assertEqual(self.proc.wait(TIMEOUT), 0)

    def test_wide_characters_and_a_cursor_moved_back_survive_a_message(self):
        self.read_until(b"nickname: ")
        self.wait_until_reading()
        self.type(b"al\r")
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.bob.wait_for("*** al joined (2 online)")
        self.wait_until_reading()
        typed = "日本語テキスト👍e\u0301"  # wide characters, an emoji, e + combining acute
        self.type(typed.encode("utf-8") + b"\x1b[D" * 3)  # back over é, 👍 and ト
        self.read_until(b"\x08" * 5)  # readline's echo: 1 + 2 + 2 columns back
        self.bob.send_line("hi")
        # Erase from the start of the input, print, redraw, and put the cursor
        # back after the prompt (8 columns) and six wide characters (12).
        self.read_until("\r\x1b[J<bob> hi\r\n#lobby> {}\r\x1b[20C".format(typed).encode("utf-8"))
        self.type(b"X\r")  # readline still knows where its cursor is
        self.bob.expect("<bob> hi", "<al> 日本語テキスXト👍e\u0301")
        long_line = "漢" * 25  # 58 columns with the prompt: the second row of 40
        self.wait_until_reading()
        self.type(long_line.encode("utf-8"))
        self.read_until(long_line[-3:].encode("utf-8"))
        self.bob.send_line("wrapped")
        self.read_until(("\r\x1b[1A\x1b[J<bob> wrapped\r\n#lobby> " + long_line).encode("utf-8"))
        self.type(b"\r")
        self.bob.expect("<bob> wrapped", "<al> " + long_line)

    def test_a_paste_of_many_lines_goes_out_in_order(self):
        self.read_until(b"nickname: ")
        self.wait_until_reading()
        self.type(b"al\r")
        self.bob.wait_for("*** al joined (2 online)")
        self.wait_until_reading()
        lines = ["pasted line %d" % i for i in range(16)]
        self.type("".join(line + "\r" for line in lines).encode())
        try:
            for line in lines:
                self.bob.wait_for("<al> " + line)
        except AssertionError as exc:
            raise AssertionError("%s; the terminal shows: %r" % (exc, self.drain_screen()))
        self.read_until(b"<al> pasted line 15\r\n")
        shown = self.rendered()
        # Each line once, as the server's echo on its own row (the typed ones
        # are taken off the screen when sent, as irssi does).
        self.assertEqual([row for row in shown if "pasted" in row],
                         ["<al> " + line for line in lines], shown)

    def test_ctrl_c_leaves_and_gives_the_terminal_back(self):
        import termios
        self.read_until(b"nickname: ")
        self.type(b"al\r")
        self.read_until(b"#lobby> ")
        self.wait_until_reading()
        self.type(b"half a line")
        self.read_until(b"half a line")
        self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground
        self.assertEqual(self.proc.wait(TIMEOUT), 0)
        self.bob.wait_for("*** al left (quit)")
        self.assertTrue(self.read_until(b"\x1b[J").endswith(b"\r\x1b[J"))
        modes = termios.tcgetattr(self.master)[3]
        self.assertTrue(modes & termios.ECHO and modes & termios.ICANON, "modes not restored")
        self.read_until(b"*** leaving...")  # said at once, whatever the server does

    def test_ctrl_d_on_an_empty_line_leaves_a_clean_line(self):
        self.read_until(b"nickname: ")
        self.wait_until_reading()
        self.type(b"al\r")
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.wait_until_reading()
        self.type(b"\x04")
        # The prompt's line is cleared first: nothing is left after "#lobby> ".
        self.assertEqual(self.read_until(b"*** leaving..."), b"\r\x1b[K*** leaving...")
        self.assertEqual(self.proc.wait(TIMEOUT), 0)
        self.bob.wait_for("*** al left (quit)")

    def test_tab_knows_who_was_here_first_adds_a_space_and_no_operator_commands(self):
        self.read_until(b"nickname: ")
        self.wait_until_reading()
        self.type(b"al\r")
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.bob.wait_for("*** al joined (2 online)")
        self.client_sync()
        self.type(b"/msg b\t")  # bob never spoke: known from the client's silent /who
        self.read_until(b"/msg bob ")
        self.type(b"hi\r")
        self.bob.expect("*al* hi")
        self.wait_until_reading()
        self.type(b"/ba\tX\r")  # no operators here: /ba is not completed to /ban
        self.read_until(b"!!! unknown command /bax (try /help)")
        self.assertNotIn(b"online:", self.screen)  # the silent /who was not shown


class TerminalOperatorTest(TerminalCase):
    """Tab offers /op where the server has operators, and their commands once opped."""

    server_options = {"op_password": "0p"}
    client_args = ["--color", "never", "--name", "al"]

    def test_tab_offers_op_then_the_operator_commands(self):
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.bob.wait_for("*** al joined (2 online)")
        self.client_sync()
        self.type(b"/op\t\t")  # two candidates now: the second Tab lists them
        self.read_until(b"/op     /open")
        self.type(b" 0p\r")
        self.read_until(b"*** al is now an operator")
        self.assertFalse([row for row in self.rendered() if "0p" in row], self.rendered())
        self.wait_until_reading()
        self.type(b"\x1b[A")  # Up: the line before /op (kept out of the history)
        self.assertNotIn(b"0p", self.read_until(b"/ping client-sync"))
        self.type(b"\x15")    # Ctrl-U: nothing sent
        self.type(b"/ki\t")
        self.read_until(b"/kick ")
        self.type(b"bob\r")
        self.bob.wait_for("*** bob was kicked by al (no reason given)")
        self.assertNotIn(b"choose a nickname", self.screen)  # --name answered it


class TerminalReconnectTest(TerminalCase):
    """With --reconnect, what is typed while disconnected is edited as usual
    and sent once, in order, when the client is back."""

    client_args = ["--color", "never", "--name", "al", "--reconnect"]

    def test_typing_while_disconnected_keeps_line_editing(self):
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.bob.wait_for("*** al joined (2 online)")
        port = self.port
        self.server.shutdown()
        self.read_until(b"reconnecting in")
        self.wait_until_reading()
        self.type(b"one\r")
        self.read_until(b"one")
        self.wait_until_reading()  # readline reads the next line too, not the raw terminal
        self.type(b"twX\x1b[Do\r")  # Left: the o goes before the X
        self.read_until(b"twX\x08oX\x08")  # readline's own echo of the edit
        serve_in_thread(self, port)
        bob = Peer(port)
        self.addCleanup(bob.close)
        bob.send_line("bob")
        bob.wait_for("*** al joined (2 online)")
        bob.expect("<al> one", "<al> twoX")
        self.read_until(b"*** reconnected")
        self.assertNotIn(b"^[", self.screen)


class TerminalRoomTest(TerminalCase):
    """The prompt names the room, Tab completes rooms after /join, and history
    is shown in local time."""

    client_env = {"TZ": "Etc/GMT-3"}  # three hours east of UTC, all year

    def test_prompt_tab_and_history_in_local_time(self):
        self.read_until(b"nickname: ")
        self.bob.send_line("before al came")
        self.bob.sync()
        said = time.time()
        self.wait_until_reading()
        self.type(b"al\r")
        shown = self.read_until(b"*** end of history")
        self.assertIn(b"*** the last 1 message in #lobby (local times):", shown)
        stamp = re.search(rb"\[(\d{4}-\d\d-\d\d \d\d:\d\d)\] <bob> before al came", shown)
        local = calendar.timegm(time.strptime(stamp.group(1).decode(), "%Y-%m-%d %H:%M"))
        self.assertLess(abs(local - (said + 3 * 3600)), 90)  # shown 3 hours ahead of UTC
        self.read_until(b"#lobby> ")
        self.bob.send_line("/join #rust")
        self.read_until(b"*** bob left (went to #rust)")
        self.client_sync()
        self.type(b"/join #r\t")  # known from bob's leaving
        self.read_until(b"/join #rust ")
        self.type(b"\r")
        self.read_until(b"*** al joined #rust (2 here)")
        self.read_until(b"#rust> ")  # the next prompt names the room


class TerminalAccountTest(TerminalCase):
    """A typed /register or /login: masked on the screen, not in the history."""

    client_args = ["--color", "never", "--name", "al"]

    def test_a_password_is_masked_and_kept_out_of_the_history(self):
        self.read_until(b"*** al joined (2 online)\r\n#lobby> ")
        self.wait_until_reading()
        self.type(b"hello\r")
        self.bob.wait_for("<al> hello")
        self.read_until(b"<al> hello")  # shown: no line is on its way while Enter is pressed
        self.wait_until_reading()
        self.type(b"/register correct horse\r")
        self.read_until(b"*** al is now your account")
        shown = self.rendered()
        self.assertFalse([row for row in shown if "/register" in row or "correct" in row], shown)
        self.assertEqual([row for row in shown if "hello" in row], ["<al> hello"], shown)
        self.wait_until_reading()
        self.type(b"\x1b[A\r")  # Up, Enter: the line before it goes again
        self.bob.wait_for("<al> hello")


class TerminalOptionsTest(TerminalCase):
    """--no-bell, --timestamps and colours on a terminal."""

    client_args = ["--name", "al", "--no-bell", "--timestamps", "--color", "always"]

    def test_no_bell_timestamps_and_colours(self):
        self.read_until(b"*** al joined (2 online)")
        self.bob.wait_for("*** al joined (2 online)")
        self.bob.send_line("/msg al psst")
        shown = self.read_until(b"*bob* psst")
        self.bob.send_line("al: are you there?")
        shown += self.read_until(b"are you there?")
        self.assertNotIn(b"\a", shown)
        self.assertRegex(shown, rb"\x1b\[2m\d\d:\d\d\x1b\[0m \x1b\[1;35m\*bob\* psst")
        self.assertIn(b"\x1b[1;7mal: are you there?", shown)
        self.assertNotIn(b"choose a nickname", self.screen)  # --name answered it


class TerminalWithoutReadlineTest(TerminalCase):
    """Where Python has no readline (Windows): plain input() still chats."""

    command = [sys.executable, "-c",
               "import sys; sys.modules['readline'] = None; sys.path.insert(0, %r); "
               "import chat; sys.exit(chat.main(sys.argv[1:]))" % HERE]

    def test_plain_input_still_chats(self):
        self.read_until(b"nickname: ")
        self.type(b"al\r")
        self.read_until(b"*** al joined (2 online)")
        self.bob.wait_for("*** al joined (2 online)")
        self.read_until(b"#lobby> ")
        self.bob.send_line("hello")
        self.read_until(b"<bob> hello\r\n#lobby> ")  # above a fresh prompt
        self.type(b"hi\r\x04")
        self.bob.expect("<bob> hello", "<al> hi", "*** al left (quit)")
        self.assertEqual(self.proc.wait(TIMEOUT), 0)


class TerminalPasswordTest(TerminalCase):
    """Asked for on the terminal, without echo, when the room needs one."""

    server_options = {"password": "s3cret"}

    def test_asks_for_the_password_first_and_again_when_it_is_wrong(self):
        self.read_until(b"room password: ")
        self.type(b"nope\r")
        self.read_until(b"!!! wrong password")
        self.read_until(b"room password: ")  # on a new connection
        self.type(b"s3cret\r")
        self.read_until(b"nickname: ")
        self.wait_until_reading()
        self.type(b"al\r")
        self.read_until(b"*** al joined (2 online)")
        self.bob.wait_for("*** al joined (2 online)")
        self.assertNotIn(b"s3cret", self.screen)  # not echoed
        self.assertNotIn(b"nope", self.screen)
        self.assertNotIn(b"password required", self.screen)


class TerminalNamedPasswordTest(TerminalCase):
    """With --name: the password is asked for, then the nick goes again."""

    server_options = {"password": "s3cret"}
    client_args = ["--color", "never", "--name", "al"]

    def test_asks_for_the_password_without_an_error_first(self):
        self.read_until(b"room password: ")
        self.type(b"s3cret\r")
        self.read_until(b"*** al joined (2 online)")
        self.bob.wait_for("*** al joined (2 online)")
        for unwanted in (b"password required", b"choose a nickname", b"nickname: "):
            self.assertNotIn(unwanted, self.screen)

    def test_ctrl_d_at_the_password_prompt_leaves_without_sending_one(self):
        self.read_until(b"room password: ")
        self.type(b"\x04")
        self.assertEqual(self.proc.wait(TIMEOUT), 0)
        self.assertNotIn(b"wrong password", self.drain_screen())


class BenchTest(unittest.TestCase):
    """A short smoke run of `chat.py bench`; the long workloads are not tests."""

    def bench(self, *args, timeout=60):
        code, out, err = run_chat("bench", "--json", *args, timeout=timeout)
        self.assertNotIn("Traceback", err)
        return code, out, err

    def test_a_small_flood_is_delivered_whole_and_in_one_order(self):
        code, out, err = self.bench("--clients", "30", "--senders", "5", "--messages", "50")
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        self.assertEqual(result["registered"], 30)
        self.assertEqual(result["deliveries_expected"], 30 * 5 * 50)
        self.assertEqual(result["deliveries_received"], 30 * 5 * 50)
        self.assertIs(result["same_order"], True)
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertLessEqual(result["latency_ms"]["p50"], result["latency_ms"]["max"])
        self.assertGreater(result["server_cpu_s"], 0)
        self.assertGreater(result["server_peak_rss"], 1e6)

    def test_websocket_clients_and_a_half_json_room(self):
        for flags in (("--web",), ("--web", "--rooms", "2"), ("--json-share", "0.5")):
            code, out, err = self.bench("--clients", "12", "--senders", "3", "--messages", "20",
                                        *flags)
            self.assertEqual(code, 0, (flags, err))
            result = json.loads(out)
            rooms = 2 if "--rooms" in flags else 1
            self.assertEqual(result["deliveries_received"], 12 * 3 * 20 // rooms, flags)
            self.assertIs(result["same_order"], True)
            self.assertEqual(result["json_clients"], 12 if "--web" in flags else 6)

    def test_irc_clients_and_a_room_of_a_third_each(self):
        for flags in (("--irc",), ("--irc", "--rooms", "2"), ("--mix", "text,json,irc")):
            code, out, err = self.bench("--clients", "12", "--senders", "3", "--messages", "20",
                                        *flags)
            self.assertEqual(code, 0, (flags, err))
            result = json.loads(out)
            rooms = 2 if "--rooms" in flags else 1
            # IRC has no echo: an IRC sender gets the other senders' messages alone.
            irc_senders = 3 if "--irc" in flags else 1  # (--mix: client 2 of 0, 1, 2)
            self.assertEqual(result["deliveries_received"],
                             12 * 3 * 20 // rooms - irc_senders * 20, flags)
            self.assertIs(result["same_order"], True)
            self.assertEqual(result["irc_clients"], 12 if "--irc" in flags else 4)
            self.assertEqual(result["json_clients"], 0 if "--irc" in flags else 4)
        code, out, err = run_chat("bench", "--mix", "text,irc", "--web")
        self.assertEqual(code, 2)
        self.assertIn("--irc and --mix are not for --web", err)

    def test_rooms_spread_the_clients_and_each_gets_its_rooms_lines(self):
        code, out, err = self.bench("--clients", "12", "--senders", "4", "--messages", "20",
                                    "--rooms", "3")
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        # Rooms 0, 1, 2 hold 4 clients each and 2, 1, 1 of the senders.
        self.assertEqual(result["deliveries_expected"], 4 * 2 * 20 + 4 * 20 + 4 * 20)
        self.assertEqual(result["deliveries_received"], result["deliveries_expected"])
        self.assertIs(result["same_order"], True)
        self.assertIn("messages stored in", result["server_store"])

    def test_history_fills_the_lobby_and_times_the_queries(self):
        code, out, err = self.bench("--clients", "5", "--senders", "1", "--messages", "5",
                                    "--history", "2000")
        self.assertEqual(code, 0, err)
        history = json.loads(out)["history"]
        for name in ("history_500_ms", "search_found_ms", "search_absent_ms", "loop_held_ms"):
            self.assertGreater(history[name], 0, name)
        code, out, err = self.bench("--port", "1", "--history", "10")
        self.assertEqual(code, 2)
        self.assertIn("--history fills the server the bench starts", err)

    def test_logins_at_once_are_answered_without_holding_the_loop(self):
        code, out, err = self.bench("--clients", "3", "--senders", "1", "--messages", "2",
                                    "--logins", "3")
        self.assertEqual(code, 0, err)
        logins = json.loads(out)["logins"]
        self.assertEqual(logins["count"], 3)
        self.assertGreaterEqual(logins["all_answered_ms"], 900)  # the second's wait
        self.assertIsNotNone(logins["loop_held_ms"])

    def test_rate_mode_and_a_slow_client_evicted(self):
        code, out, err = self.bench("--clients", "6", "--senders", "4", "--slow", "1",
                                    "--messages", "400", "--size", "1500", "--rate", "400")
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        self.assertEqual(result["slow_evicted"], 1)
        self.assertEqual(result["others_evicted"], [])
        self.assertEqual(result["deliveries_received"], 5 * 4 * 400)

    def test_the_table_names_every_number(self):
        code, out, err = run_chat("bench", "--clients", "3", "--senders", "1",
                                  "--messages", "2", timeout=60)
        self.assertEqual(code, 0, err)
        self.assertIn("bench: 0/3 registered\n", err)
        self.assertIn("bench: 6/6 delivered\n", err)
        for row in ["clients registered", "registrations/s", "deliveries", "deliveries/s",
                    "latency ms", "same order", "slow evicted", "server CPU s",
                    "server peak RSS MB"]:
            self.assertIn(row, out)

    def test_a_server_that_goes_away_mid_run(self):
        server = serve_in_thread(self, limits=chat.Limits(rate=0))
        proc = start_process(self, [sys.executable, CHAT_PY, "bench", "--port",
                                    str(server.address[1]), "--clients", "5", "--senders",
                                    "1", "--rate", "2", "--messages", "100"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stderr.readline()
        while b"delivered" not in line:  # registered: the messages are under way
            self.assertTrue(line, "the bench ended early")
            line = proc.stderr.readline()
        server.shutdown()
        self.assertEqual(proc.wait(TIMEOUT), 1)
        err = proc.stderr.read().decode()
        self.assertIn("closed every connection", err)
        self.assertNotIn("Traceback", err)

    def serve(self, **limits):
        return serve_in_thread(self, limits=chat.Limits(**limits)).address[1]

    def test_on_a_server_with_users_only_its_own_lines_count(self):
        port = self.serve(rate=0)
        users = [Peer(port) for _ in range(3)]
        for i, user in enumerate(users):
            self.addCleanup(user.close)
            user.send_line("user%d" % i)
            user.wait_for("*** user%d joined (%d online)" % (i, i + 1))
        stop = threading.Event()

        def chatter():  # someone talks all through the run
            while not stop.wait(0.01):
                users[0].send_line("noise")
        thread = threading.Thread(target=chatter)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        code, out, err = self.bench("--port", str(port), "--clients", "20", "--senders", "2",
                                    "--messages", "30")
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        self.assertEqual(result["deliveries_received"], 20 * 2 * 30)
        self.assertEqual(result["deliveries_expected"], 20 * 2 * 30)
        self.assertIs(result["same_order"], True)

    def test_bursty_readers_get_everything_slow_readers_are_evicted(self):
        port = self.serve(rate=0, max_sendq=65536, max_lag=1.5)  # (bursty ones keep up)
        code, out, err = self.bench("--port", str(port), "--clients", "12", "--senders", "8",
                                    "--messages", "150", "--size", "1000", "--slow", "2",
                                    "--slow-read", "20000", "--bursty", "2",
                                    "--burst-pause", "0.3")
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        self.assertEqual(result["slow_evicted"], 2)
        self.assertEqual(result["others_evicted"], [])
        self.assertEqual(result["deliveries_received"], 10 * 8 * 150)

    def test_bad_flags_nothing_listening_and_a_silent_server(self):
        code, out, err = self.bench("--clients", "2", "--senders", "3")
        self.assertEqual(code, 2)
        self.assertIn("--senders", err)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        code, out, err = self.bench("--port", str(port), "--clients", "2", "--senders", "1")
        self.assertEqual(code, 1)
        self.assertIn("cannot connect", err)
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        code, out, err = self.bench("--port", str(silent.getsockname()[1]), "--clients", "2",
                                    "--senders", "1", "--timeout", "0.5")
        self.assertEqual(code, 1)
        self.assertIn("no progress", err)


# --- Command line and the design card ---------------------------------------------

class CommandLineTest(unittest.TestCase):

    def test_a_wrong_flag_is_a_usage_error(self):
        code, out, err = run_chat("server", "--rate", "fast")
        self.assertEqual(code, 2)
        self.assertIn("--rate", err)
        self.assertNotIn("Traceback", err)
        code, out, err = run_chat("server", "--port", "70000")
        self.assertEqual(code, 2)
        code, out, err = run_chat()
        self.assertEqual(code, 2)

    def test_a_flag_error_uses_the_subcommands_usage_and_plain_words(self):
        code, out, err = run_chat("server", "--prot", "1")
        self.assertEqual(code, 2)
        self.assertIn("usage: chat.py server", err)
        self.assertIn("chat.py server: error: unrecognized arguments: --prot 1", err)
        code, out, err = run_chat("server", "--port", "abc")
        self.assertEqual(code, 2)
        self.assertIn("usage: chat.py server", err)
        self.assertIn("argument --port: expected a port number from 0 to 65535, not 'abc'", err)
        self.assertNotIn("port_number", err)
        code, out, err = run_chat("client", "--port", "99999")
        self.assertIn("chat.py client: error: argument --port: expected a port number", err)

    def test_bench_senders_default_to_the_clients_there_are(self):
        args = chat.build_parser().parse_args(["bench", "--clients", "5"])
        self.assertIsNone(chat.bench_flags_problem(args))
        self.assertEqual(args.senders, 5)
        args = chat.build_parser().parse_args(["bench", "--clients", "50", "--slow", "1"])
        chat.bench_flags_problem(args)
        self.assertEqual(args.senders, 10)

    def test_bytes_that_are_not_utf8_in_flags_or_the_environment_are_one_line(self):
        for args, env in (([b"client", b"--port", b"9", b"--name", b"ren\xe9"], {}),
                          ([b"client", b"--host", b"h\xff", b"--name", b"x"], {}),
                          ([b"server", b"--port", b"0"], {b"CHAT_PASSWORD": b"a\xff"}),
                          ([b"client", b"--port", b"9", b"--name", b"zed"],
                           {b"CHAT_ACCOUNT_PASSWORD": b"a\xffbcdefgh"})):
            environ = dict(os.environb)
            environ.update(env)
            proc = subprocess.run([sys.executable.encode(), CHAT_PY.encode()] + args,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=environ, timeout=TIMEOUT,
                                  cwd=WORK_DIR)
            err = proc.stderr.decode("utf-8", "replace")
            self.assertIn(proc.returncode, (1, 2), (args, err))
            self.assertRegex(err, r"^chat.py: .* is not valid UTF-8\n$", args)

    def test_an_old_python_is_told_in_one_line(self):
        olds = glob.glob(os.path.expanduser("~/.pyenv/versions/3.[67].*/bin/python3"))
        if not olds:
            self.skipTest("no Python 3.6 or 3.7 here to try")
        for old in olds:
            proc = subprocess.run([old, CHAT_PY, "server"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=TIMEOUT)
            self.assertEqual(proc.returncode, 1)
            self.assertRegex(proc.stderr.decode(),
                             r"^chat.py needs Python 3.8 or newer; this is Python 3\.[67]\.\d+\n$")

    def test_fingerprints_in_every_form_openssl_and_the_server_print(self):
        digits = TEST_FINGERPRINT[len("SHA256:"):]
        for given in (TEST_FINGERPRINT, digits.lower(), digits.replace(":", ""),
                      "sha256 Fingerprint=" + digits, "SHA256 Fingerprint=" + digits):
            self.assertEqual(chat.normalize_fingerprint(given), TEST_FINGERPRINT, given)
        with self.assertRaises(ValueError):
            chat.normalize_fingerprint("sha1 Fingerprint=" + digits)

    def test_imports_are_standard_library_only(self):
        stdlib = getattr(sys, "stdlib_module_names", None)
        for name in ("chat.py", "test_chat.py"):
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                for root in roots:
                    if root == "chat":
                        continue
                    if stdlib is not None:
                        self.assertIn(root, stdlib, "%s imports %s" % (name, root))
                    else:  # Python < 3.10: the module must come from the stdlib dir
                        module = __import__(root)
                        origin = getattr(module, "__file__", None) or ""
                        self.assertNotIn("site-packages", origin, root)


# --- Several servers, one chat: RESP, and real redis-server processes ----------

REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = ("redis-server is not installed (Debian: apt-get install redis-server; "
            ".ci/run does it): the several-servers tests are skipped")


class RespTest(unittest.TestCase):
    """Redis's wire protocol, both ways, with no Redis."""

    def test_a_command_is_an_array_of_bulk_strings(self):
        self.assertEqual(chat.resp_command("SET", "k", 5, b"\r\n"),
                         b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$2\r\n\r\n\r\n")

    def test_replies_are_parsed_however_the_bytes_are_cut(self):
        data = (b"+OK\r\n-ERR wrong\r\n:42\r\n$-1\r\n$5\r\nhe\r\no\r\n"
                b"*2\r\n*1\r\n:1\r\n$0\r\n\r\n*-1\r\n")
        reader, replies = chat.RespReader(), []
        for i in range(len(data)):
            reader.feed(data[i:i + 1])
            replies += reader.replies()
        self.assertEqual(replies[0], "OK")
        self.assertIsInstance(replies[1], chat.RedisError)
        self.assertEqual(str(replies[1]), "ERR wrong")
        self.assertEqual(replies[2:], [42, None, b"he\r\no", [[1], b""], None])

    def test_a_broken_link_answers_each_waiting_command_with_an_error(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        lost, answers = [], []
        link = chat.RedisLink(ours, False, lost.append)
        self.addCleanup(link.close)
        link.call(answers.append, "PING")
        link.call(answers.append, "PING")
        self.assertFalse(link.flush())  # all written
        self.assertEqual(theirs.recv(100), chat.resp_command("PING") * 2)
        theirs.sendall(b"+PONG\r\n")
        link.on_ready()
        theirs.close()
        link.on_ready()
        self.assertEqual(answers[0], "PONG")
        self.assertIsInstance(answers[1], chat.RedisError)  # e.g. a message: "not sent"
        self.assertEqual(lost, ["Redis closed the connection"])

    def test_urls(self):
        address = chat.RedisAddress("rediss://:p%40ss@example.org:6380/2")
        self.assertEqual((address.host, address.port, address.db, address.tls,
                          address.password), ("example.org", 6380, 2, True, "p@ss"))
        self.assertEqual(address.hello(), chat.resp_command("AUTH", "p@ss")
                         + chat.resp_command("SELECT", 2))
        self.assertEqual(chat.RedisAddress("redis://127.0.0.1").port, 6379)
        for bad in ("http://x", "redis://", "redis://h:port", "redis://h/db"):
            with self.assertRaises(ValueError, msg=bad):
                chat.RedisAddress(bad)

    def test_a_redis_that_never_answers_is_said_to_be_so(self):
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # connects, never answers
        address = chat.RedisAddress("redis://127.0.0.1:%d" % silent.getsockname()[1])
        with self.assertRaisesRegex(chat.RedisError, r"did not answer in"):
            chat.BlockingRedis(address, timeout=0.3).connect()

    def test_unreachable_at_start_is_one_line_exit_1_and_never_listening(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # free once closed: nothing listens there
        started = time.monotonic()
        code, out, err = run_chat("server", "--port", "0", "--db", ":memory:", "--redis",
                                  "redis://127.0.0.1:%d" % port)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(code, 1)
        self.assertEqual(err, "chat.py: cannot reach Redis at 127.0.0.1:%d: "
                              "Connection refused\n" % port)


def free_port():
    """A free port below the kernel's ephemeral range (where it takes the local
    ports of outgoing connections), so that a test can close it and listen
    on it again: with the suite run under several Pythons at once, a freed
    ephemeral port can become another run's connection's at any moment."""
    for _ in range(200):
        port = random.randint(LOW_PORTS[0], LOW_PORTS[1])
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: another
            return port
    raise AssertionError("no free port in %d-%d" % LOW_PORTS)


LOW_PORTS = (20000, 32000)  # below Linux's ephemeral ports (32768-60999) and macOS's (49152-)


class FeedCopyTest(unittest.TestCase):
    """A server's copy of what the feed says, without Redis (RedisNetwork.heard)."""

    def entry(self, message_id, text, room="#rust"):
        return {"o": "other", "s": 1, "r": chat.nick_key(room), "m": room, "k": "message",
                "f": {"nick": "bob", "text": text}, "x": {"when": 1.0}, "id": message_id}

    def test_a_message_its_history_read_had_already_got_is_kept_once(self):
        network = chat.RedisNetwork(chat.RedisAddress("redis://127.0.0.1:1"))
        key = chat.nick_key("#rust")
        # The room's history was read (it had id 5), and the feed, running
        # behind that read, brings id 5 again: kept once; 6 is new.
        network.recents[key] = collections.deque([(5, 1.0, "bob", "message", "borrow")],
                                                 maxlen=20)
        network.heard(self.entry(5, "borrow"))
        network.heard(self.entry(6, "own"))
        self.assertEqual([item[0] for item in network.recents[key]], [5, 6])


class RedisCase(unittest.TestCase):
    """Real redis-server processes on free ports, in a temporary folder, and
    chat.py servers on them. Skipped, in one line, where there is no redis-server."""

    @classmethod
    def setUpClass(cls):
        if REDIS_SERVER is None:
            raise unittest.SkipTest(NO_REDIS)

    def start_redis(self, *options, port=None):
        """A redis-server (no snapshots; options such as --requirepass); its URL."""
        folder = tempfile.mkdtemp(prefix="chat-redis-", dir=WORK_DIR)
        if "--dir" in options:  # the same data again: a restart
            folder = options[options.index("--dir") + 1]
            options = options[:options.index("--dir")] + options[options.index("--dir") + 2:]
        # A free port may be taken before redis-server binds it (.ci/run runs
        # the suite under several Pythons at once): then another one, unless
        # the port was asked for.
        for attempt in range(1 if port else 5):
            proc, chosen = self._redis_on(port or free_port(), folder, options)
            if proc is not None:
                break
        self.assertIsNotNone(proc, "redis-server did not start on %d" % chosen)
        self.redis_proc, self.redis_folder = proc, folder
        return "redis://127.0.0.1:%d" % chosen

    def _redis_on(self, port, folder, options):
        """(redis-server on port, port), or (None, port) if it could not bind it."""
        proc = start_process(self, [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                                    "--save", "", "--dir", folder] + list(options),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                return None, port
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    if "--tls-port" in options:
                        return proc, port  # TLS only: the port was asked for, not chosen
                    probe.sendall(b"INFO server\r\n")  # ours, not another run's?
                    reply = b""
                    while not reply.endswith(b"\r\n") or not (
                            b"process_id:" in reply or reply.startswith(b"-")):
                        chunk = probe.recv(65536)
                        if not chunk:
                            break
                        reply += chunk
                if ("process_id:%d\r\n" % proc.pid).encode() in reply:
                    return proc, port
                if b"NOAUTH" not in reply:
                    proc.kill()
                    proc.wait()
                    return None, port
                return proc, port  # --requirepass: it answers only after AUTH
            except OSError:
                self.assertLess(time.monotonic(), deadline, "redis-server never listened")
                time.sleep(0.05)  # polling a starting process, bounded by the deadline

    def serve_on_redis(self, url, **limits):
        """A server in this process on that Redis (its waits can be shortened)."""
        network = chat.RedisNetwork(chat.RedisAddress(url))
        network.load()
        self.server = serve_in_thread(self, network=network, store=chat.RedisStore(
            network, chat.SQLiteStore(":memory:")), limits=chat.Limits(**limits))
        return self.server.address[1]

    def alice_on(self, port):
        """alice, registered on the server at port, the first one online."""
        alice = Peer(port)
        self.addCleanup(alice.close)
        alice.send_line("alice")
        alice.wait_for("*** alice joined (1 online)")
        return alice

    def quick_outages(self):
        shorten(self, REDIS_ANSWER_S=0.5, REDIS_HEARTBEAT_S=0.2, REDIS_RETRY_S=0.2,
                     REDIS_RETRY_TIMEOUT_S=0.5, REDIS_READ_BLOCK_MS=200, REDIS_ALIVE_TTL_S=1)

    def start_chat(self, url, *args):
        """A chat.py server on that Redis; (process, port) once it listens."""
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0",
                                    "--db", ":memory:", "--redis", url] + list(args),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port, _ = wait_until_listening(self, proc.stderr)
        return proc, port


class RedisStartTest(RedisCase):

    def test_rediss_verifies_the_certificate(self):
        port = free_port()
        cert = write_file(self, "cert.pem", TEST_CERT)
        try:
            self.start_redis("--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                             "--tls-key-file", write_file(self, "key.pem", TEST_KEY),
                             "--tls-auth-clients", "no", port=port)
        except AssertionError:
            self.skipTest("this redis-server does not start with TLS (built without it?)")
        url = "rediss://localhost:%d" % port
        code, out, err = run_chat("server", "--port", "0", "--db", ":memory:", "--redis", url)
        self.assertEqual((code, err), (1, "chat.py: cannot verify Redis at localhost:%d: "
                                          "self-signed certificate\n" % port))
        env = dict(os.environ, SSL_CERT_FILE=cert)  # trusted: one chat over TLS
        proc = start_process(self, [sys.executable, CHAT_PY, "server", "--port", "0", "--db",
                                    ":memory:", "--redis", url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        chat_port, _ = wait_until_listening(self, proc.stderr)
        peer = Peer(chat_port)
        self.addCleanup(peer.close)
        peer.send_line("al")
        peer.send_line("over TLS")
        peer.wait_for("<al> over TLS")

    def test_a_wrong_password_is_one_line_and_exit_1(self):
        url = self.start_redis("--requirepass", "right")
        code, out, err = run_chat("server", "--port", "0", "--db", ":memory:", "--redis",
                                  url.replace("//", "//:wrong@"))
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertRegex(err, r"^chat.py: Redis at 127.0.0.1:\d+ refused us: WRONGPASS")
        proc, port = self.start_chat(url.replace("//", "//:right@"))  # and the right one
        self.assertIsNone(proc.poll())
        # Kept out of the command line, which ps shows: a file, or the environment.
        proc, port = self.start_chat(url, "--redis-password-file",
                                     write_file(self, "redis.txt", "right\n"))
        self.assertIsNone(proc.poll())
        code, out, err = run_chat("server", "--port", "0", "--db", ":memory:", "--redis", url,
                                  env=dict(os.environ, CHAT_REDIS_PASSWORD="wrong"))
        self.assertEqual(code, 1, err)



class SeveralServersTest(RedisCase):
    """Two chat.py servers on one Redis are one chat."""

    def setUp(self):
        self.url = url = self.start_redis()
        self.a, self.port_a = self.start_chat(url)
        self.b, self.port_b = self.start_chat(url)

    def peer(self, port, nick=None, json_mode=False):
        peer = Peer(port)
        self.addCleanup(peer.close)
        peer.wait_for("*** choose a nickname: 1-24 letters, digits, _ or -")
        if json_mode:
            peer.send_line("/format json")
            peer.read_line()
        if nick is not None:
            peer.send_line(nick)
            if not json_mode:
                self.assertRegex(peer.read_line(), r"^\*\*\* %s joined \(\d+ online\)$" % nick)
        return peer

    def test_what_nc_sends_before_closing_is_all_answered(self):
        # printf 'nick\n/who\n/ping x\n/quit\n' | nc -q 3 HOST PORT: the lines and
        # the end of input arrive before the join line is back from the feed.
        for nick, ending in (("carol", "/quit\n"), ("dave", "")):
            peer = Peer(self.port_a)
            self.addCleanup(peer.close)
            peer.send_raw(("%s\nhello\n/who\n/ping x\n%s" % (nick, ending)).encode())
            peer.sock.shutdown(socket.SHUT_WR)  # what nc does once its input ends
            got = peer.expect_closed()
            for line in ("*** %s joined (1 online)" % nick, "<%s> hello" % nick,
                         "*** 1 in #lobby: %s" % nick, "*** pong x"):
                self.assertIn(line, got, (nick, got))

    def test_ordinary_disconnects_log_no_socket_errors(self):
        code, out, err = run_chat("bench", "--port", str(self.port_a), "--clients", "30",
                                  "--senders", "10", "--messages", "15", "--flood")  # (a burst)
        self.assertEqual(code, 0, err)
        self.a.terminate()
        log = self.a.stderr.read().decode()
        self.assertIn("left (connection closed)", log)
        self.assertNotIn("Errno", log)

    def test_rooms_who_and_private_messages_span_the_servers(self):
        alice = self.peer(self.port_a, "alice")
        bob = self.peer(self.port_b, "bob")
        alice.wait_for("*** bob joined (2 online)")
        alice.send_line("hi from A")
        bob.expect("<alice> hi from A")
        bob.send_line("/me waves from B")
        alice.expect("<alice> hi from A", "* bob waves from B")
        bob.expect("* bob waves from B")
        bob.send_line("/who")
        bob.expect("*** 2 in #lobby: alice, bob")
        bob.send_line("/msg alice psst")
        bob.expect("-> *alice* psst")
        alice.expect("*bob* psst")
        alice.send_line("/join #rust")
        alice.expect("*** alice joined #rust (1 here)")
        bob.expect("*** alice left (went to #rust)")
        bob.send_line("/rooms")
        bob.expect("*** 2 online in 2 rooms: #lobby (1), #rust (1)")
        alice.send_line("/topic rusty")
        alice.expect("*** alice set the topic: rusty")
        bob.send_line("/join #rust")
        bob.expect("*** bob joined #rust (2 here)", "*** topic of #rust: rusty (set by alice)")
        alice.expect("*** bob joined #rust (2 here)")
        bob.send_line("/nick robert")
        alice.expect("*** bob is now known as robert")
        carol = self.peer(self.port_a)
        carol.send_line("robert")
        carol.expect("!!! nickname robert is taken")

    def test_history_and_ids_are_the_same_on_every_server(self):
        alice = self.peer(self.port_a, "alice", json_mode=True)
        joined = json.loads(alice.read_line())
        self.assertEqual((joined["type"], joined["nick"]), ("joined", "alice"))
        for text in ("one", "two", "three"):
            alice.send_line(text)
        ids = [json.loads(alice.read_line())["id"] for _ in range(3)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 3)
        bob = self.peer(self.port_b, "bob", json_mode=True)
        lines = [json.loads(bob.read_line()) for _ in range(5)]  # joined, 3 items, end
        self.assertEqual([(o["type"], o.get("id"), o.get("text")) for o in lines[1:4]],
                         [("message", i, t) for i, t in zip(ids, ("one", "two", "three"))])
        self.assertEqual(lines[4], dict(lines[4], type="history_end", count=3))
        bob.send_line("/history after %d" % ids[0])
        after = [json.loads(bob.read_line()) for _ in range(3)]
        self.assertEqual([o.get("id") for o in after[:2]], ids[1:])
        bob.send_line("/search TWO")
        found = json.loads(bob.read_line())
        self.assertEqual((found["id"], found["text"]), (ids[1], "two"))

    def test_every_member_everywhere_gets_one_order(self):
        watchers = [self.peer(self.port_a, "wa"), self.peer(self.port_b, "wb")]
        senders = [self.peer(port, "s%d" % i)
                   for i, port in enumerate((self.port_a, self.port_b) * 2)]
        for watcher in watchers:
            watcher.wait_for("*** s3 joined (6 online)")
        for n in range(25):
            for i, sender in enumerate(senders):
                sender.send_line("m%d-%d" % (i, n))
        seen = []
        for watcher in watchers:
            lines = [watcher.read_line() for _ in range(100)]
            self.assertEqual(len([l for l in lines if l.startswith("<s")]), 100)
            seen.append(lines)
        self.assertEqual(seen[0], seen[1])
        for i in range(4):  # each sender's own lines in the order sent
            mine = [l for l in seen[0] if l.startswith("<s%d>" % i)]
            self.assertEqual(mine, ["<s%d> m%d-%d" % (i, i, n) for n in range(25)])

    def test_the_bench_spreads_its_clients_over_the_servers(self):
        hosts = "127.0.0.1:%d,127.0.0.1:%d" % (self.port_a, self.port_b)
        code, out, err = run_chat("bench", "--json", "--hosts", hosts, "--clients", "20",
                                  "--senders", "4", "--messages", "10", "--rooms", "2",
                                  timeout=60)
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        # 2 rooms of 10 readers, each room 2 senders x 10 messages
        self.assertEqual(result["deliveries_received"], 2 * 10 * 2 * 10)
        self.assertIs(result["same_order"], True)
        code, out, err = run_chat("bench", "--hosts", hosts, "--port", "1")
        self.assertEqual((code, err), (2, "chat.py bench: --hosts names every server: "
                                          "not with --host or --port\n"))

    def test_accounts_and_mailboxes_span_the_servers(self):
        alice = self.peer(self.port_a, "alice")
        alice.send_line("/register sesame-open")
        alice.wait_for("*** " + chat.ACCOUNT_MADE.format(nick="alice"))
        alice.send_line("/quit")
        alice.expect_closed()
        bob = self.peer(self.port_b, "bob")
        bob.send_line("/msg alice are you there?")
        bob.expect("-> *alice* are you there?",
                   "*** " + chat.OFFLINE_KEPT.format(nick="alice"))
        taker = self.peer(self.port_b)
        taker.send_line("alice")  # the account is known on the other server too
        taker.expect("!!! " + chat.NICK_REGISTERED.format(nick="alice"))
        back = self.peer(self.port_b)
        back.send_line("/login alice sesame-open")
        back.expect("*** alice joined (2 online)",  # once
                    "*** 1 message while you were away (times in UTC):")
        self.assertRegex(back.wait_for("*** end of messages")[-1],
                         r"^\[[\d: -]+\] \*bob\* are you there\?$")
        back.send_line("/msg bob thanks")
        bob.wait_for("*alice* thanks")

    def test_a_login_on_another_server_takes_the_nick_over_at_once(self):
        alice = self.peer(self.port_a, "alice")
        alice.send_line("/register sesame-open")
        alice.wait_for("*** " + chat.ACCOUNT_MADE.format(nick="alice"))
        bob = self.peer(self.port_b, "bob")
        alice.wait_for("*** bob joined (2 online)")
        again = self.peer(self.port_b)
        again.send_line("/login alice sesame-open")
        again.wait_for("*** alice joined (2 online)")
        self.assertEqual(alice.expect_closed()[-1:], ["!!! " + chat.LOGGED_IN_ELSEWHERE])
        skipped = bob.wait_for("*** alice joined (2 online)")
        bob.send_line("/who")
        skipped += bob.wait_for("*** 2 in #lobby: alice, bob")
        bob.sync()
        self.assertEqual(skipped.count("*** alice left (logged in elsewhere)"), 1, skipped)
        self.assertNotIn("*** alice left (server lost)", bob.seen)

    def test_a_login_that_renames_says_the_old_one_left_first(self):
        alice = self.peer(self.port_b, "alice")
        alice.send_line("/register sesame-open")
        alice.wait_for("*** " + chat.ACCOUNT_MADE.format(nick="alice"))
        for number, port in enumerate((self.port_a, self.port_a)):  # from B, then from A
            again = self.peer(port, "x%d" % number)
            again.send_line("/login alice sesame-open")
            again.send_line("/ping done")
            self.assertEqual(again.wait_for("*** pong done")[-2:], [
                "*** alice left (logged in elsewhere)", "*** x%d is now known as alice" % number])
            again.send_line("still here")
            again.expect("<alice> still here")
        bob = self.peer(self.port_a, "bob")
        for port in (self.port_b, self.port_b):  # before registering: from A, then from B
            again = self.peer(port)
            again.send_line("/login alice sesame-open")
            again.send_line("/ping done")
            self.assertEqual([line for line in again.wait_for("*** pong done")
                              if "alice" in line and not line.startswith("[")],
                             ["*** alice joined (2 online)"])  # a left before it: not its room yet
            self.assertEqual(bob.wait_for("*** alice joined (2 online)")[-1:],
                             ["*** alice left (logged in elsewhere)"])

    def operator_on_a_third_server(self):
        """A server with operators on the same Redis, and "op" opped there."""
        _, port = self.start_chat(self.url, "--op-password-file",
                                  write_file(self, "op.txt", "sekrit\n"))
        op = self.peer(port, "op")
        op.send_line("/op sekrit")
        op.wait_for("*** op is now an operator")
        return op

    def test_an_operator_keeps_its_at_sign_on_the_other_servers(self):
        op = self.operator_on_a_third_server()
        bob = self.peer(self.port_b, "bob")
        bob.send_line("/join #rust")
        bob.wait_for("*** bob joined #rust (1 here)")
        op.send_line("/join #rust")  # moved rooms: still an operator
        while not bob.read_line().startswith("*** op joined #rust ("):
            pass  # (its count is its server's: it may not have heard of bob's join yet)
        bob.send_line("/who")
        bob.expect("*** 2 in #rust: bob, @op")
        later, later_port = self.start_chat(self.url)  # started after: knows it too
        carol = self.peer(later_port, "carol")
        carol.send_line("/join #rust")
        carol.wait_for("*** carol joined #rust (3 here)")
        carol.send_line("/who")
        carol.expect("*** 3 in #rust: bob, carol, @op")

    def test_chat_py_account_reaches_the_running_servers(self):
        code, out, err = run_chat("account", "add", "dora", "--redis", self.url,
                                  "--password-file", "-", stdin=b"explorer-pw\n")
        self.assertEqual(code, 0, err)
        for port in (self.port_a, self.port_b):
            dora = self.peer(port)
            dora.send_line("/login dora explorer-pw")
            dora.wait_for("*** dora joined (1 online)")
            dora.close()
        self.assertEqual(run_chat("account", "list", "--redis", self.url)[1], "dora\n")
        code, out, err = run_chat("account", "delete", "dora", "--redis", self.url)
        self.assertEqual(code, 0, err)
        self.assertEqual(run_chat("account", "list", "--redis", self.url)[1], "")

    def test_an_operator_acts_on_a_user_of_another_server(self):
        op = self.operator_on_a_third_server()
        bob = self.peer(self.port_b, "bob")
        op.wait_for("*** bob joined (2 online)")
        op.send_line("/mute bob")
        bob.wait_for("*** bob was muted by op")
        bob.send_line("can you hear me")
        bob.expect("!!! you are muted")
        op.send_line("/kick bob enough")
        self.assertEqual(bob.expect_closed()[-1], "*** bob was kicked by op (enough)")
        op.wait_for("*** bob was kicked by op (enough)")
        op.send_line("/who")
        op.wait_for("*** 1 in #lobby: @op")

    def test_bans_span_the_servers(self):
        redis = chat.BlockingRedis(chat.RedisAddress(self.url)).connect()
        self.addCleanup(redis.close)
        redis.call("HSET", chat.REDIS_BANS, "10.0.0.9", "mallory")
        op_file = write_file(self, "op.txt", "sekrit\n")
        ops = []
        for nick in ("op3", "op4"):
            proc, port = self.start_chat(self.url, "--op-password-file", op_file)
            op = self.peer(port, nick)
            op.send_line("/op sekrit")
            op.send_line("/bans")
            op.wait_for("*** banned: 10.0.0.9 (mallory)")
            ops.append(op)
        ops[0].send_line("/unban 10.0.0.9")
        ops[0].sync()
        deadline = time.monotonic() + TIMEOUT
        while redis.call("HGET", chat.REDIS_BANS, "10.0.0.9") is not None:
            # (the answer and the HDEL leave in the same pass; Redis may be a moment behind)
            self.assertLess(time.monotonic(), deadline, "the ban stayed in Redis")
            time.sleep(0.01)  # polling Redis, bounded by the deadline
        deadline = time.monotonic() + TIMEOUT
        while True:  # the other server's copy follows, through the feed
            ops[1].send_line("/bans")
            answer = ops[1].read_line()
            if answer == "*** no address is banned" or time.monotonic() > deadline:
                break
        self.assertEqual(answer, "*** no address is banned")

    def test_another_database_number_is_another_chat(self):
        alice = self.peer(self.port_a, "alice")
        proc, port = self.start_chat(self.url + "/1")
        other = self.peer(port, "alice")  # free there: another chat
        other.send_line("/who")
        other.expect("*** 1 in #lobby: alice")
        other.send_line("hello?")
        other.expect("<alice> hello?")
        alice.send_line("/who")
        alice.expect("*** 1 in #lobby: alice")  # nothing of the other chat came

    def test_two_servers_racing_for_one_nick_cannot_both_win(self):
        for round_ in range(8):
            nick = "racer%d" % round_
            pair = [self.peer(self.port_a), self.peer(self.port_b)]
            for peer in pair:
                peer.send_line(nick)
            answers = sorted(peer.read_line() for peer in pair)
            self.assertEqual(answers[0], "!!! nickname %s is taken" % nick, answers)
            self.assertRegex(answers[1], r"^\*\*\* %s joined \(\d+ online\)$" % nick)

    def test_a_stopped_server_s_users_leave_the_others_and_free_their_nicks(self):
        alice = self.peer(self.port_a, "alice")
        bob = self.peer(self.port_b, "bob")
        alice.wait_for("*** bob joined (2 online)")
        self.a.send_signal(signal.SIGTERM)
        self.assertEqual(self.a.wait(TIMEOUT), 0)
        bob.expect("*** alice left (server shutting down)")
        again = self.peer(self.port_b, "alice")
        bob.expect("*** alice joined (2 online)")
        again.send_line("/who")
        again.wait_for("*** 2 in #lobby: alice, bob")



class SeveralRoomsRedisTest(SeveralRoomsRules, RedisCase):
    """The rules of several rooms and /away across two servers on one Redis:
    alice and carol on one, bob and dan on the other."""

    def start_servers(self, **limits):
        url = self.start_redis()
        return [self.serve_on_redis(url, **limits), self.serve_on_redis(url, **limits)]


class ChathistoryRedisTest(ChathistoryRules, RedisCase):

    def start_chat_with_irc(self):
        return serve_irc_on_redis(self, self.start_redis())


def serve_irc_on_redis(case, url):
    """A server in this process on that Redis, with an IRC listener: (its IRC
    port, its TCP port)."""
    network = chat.RedisNetwork(chat.RedisAddress(url))
    network.load()
    irc = chat.Listener("127.0.0.1", 0, codec=chat.IRC_CODEC)
    server = serve_in_thread(case, network=network, listeners=[irc], store=chat.RedisStore(
        network, chat.SQLiteStore(":memory:")))
    return irc.address[1], server.address[1]


class IrcRedisTest(RedisCase):
    """IRC users on one server, others on another: away-notify and WHOIS."""

    def irc_here_and_bob_there(self):
        """(the IRC port of one server, bob registered on another) on one Redis."""
        url = self.start_redis()
        irc_port, _ = serve_irc_on_redis(self, url)
        return irc_port, self.alice_on(self.serve_on_redis(url))  # (named alice by the helper)

    def test_away_notify_and_whois_of_a_user_of_another_server(self):
        irc_port, bob = self.irc_here_and_bob_there()
        bob.send_line("/join #rust")
        bob.wait_for("*** alice joined #rust (1 here)")
        ann = IrcPeer(irc_port)
        self.addCleanup(ann.close)
        for line in ("CAP REQ :away-notify", "NICK ann", "USER ann 0 * :ann", "CAP END",
                     "JOIN #rust"):
            ann.send_line(line)
        ann.wait_for_irc(r"^:chat\.py 353 ann = #rust :(ann alice|alice ann)$")
        bob.wait_for("*** ann joined #rust (2 here)")
        bob.send_line("/away lunch")
        ann.wait_for_irc(r"^:alice!alice@chat\.py AWAY :lunch$")
        ann.send_line("WHOIS alice")
        ann.wait_for_irc(r"^:chat\.py 319 ann alice :#rust$")  # (/join: the lobby left)
        ann.wait_for_irc(r"^:chat\.py 301 ann alice :lunch$")
        bob.send_line("/away")
        ann.wait_for_irc(r"^:alice!alice@chat\.py AWAY$")

    def test_an_irc_user_in_no_channel_is_known_to_the_other_servers(self):
        irc_port, bob = self.irc_here_and_bob_there()
        ann = IrcPeer(irc_port)
        self.addCleanup(ann.close)
        for line in ("NICK ann", "USER ann 0 * :ann"):
            ann.send_line(line)
        ann.wait_for_irc(r"^:chat\.py 001 ann ")

        def until_answered(line, answer, meanwhile):
            """Send line until answer comes, not meanwhile: what ann's server did
            reaches bob's through Redis (polled, bounded)."""
            deadline = time.monotonic() + TIMEOUT
            while True:
                bob.send_line(line)
                got = bob.read_line()
                if got == answer:
                    return
                self.assertEqual(got, meanwhile)
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.05)  # polling another server's copy, bounded
        until_answered("/msg ann hello", "-> *ann* hello", "!!! no such user: ann")
        ann.wait_for_irc(r"^:alice!alice@chat\.py PRIVMSG ann :hello$")
        ann.send_line("NICK ann2")
        ann.wait_for_irc(r"^:ann!ann@chat\.py NICK :ann2$")
        until_answered("/msg ann2 again", "-> *ann2* again", "!!! no such user: ann2")
        ann.wait_for_irc(r"^:alice!alice@chat\.py PRIVMSG ann2 :again$")
        ann.send_line("QUIT :bye")
        ann.expect_closed()
        until_answered("/nick ann2", "*** alice is now known as ann2",  # its nick: free again
                       "!!! nickname ann2 is taken")


class LostServerTest(RedisCase):

    def test_a_sigkilled_server_s_users_are_announced_lost_and_their_nicks_freed(self):
        url = self.start_redis()
        redis = chat.BlockingRedis(chat.RedisAddress(url)).connect()
        self.addCleanup(redis.close)
        doomed, port_a = self.start_chat(url)
        deadline = time.monotonic() + TIMEOUT
        while not redis.call("KEYS", chat.REDIS_ALIVE + "*") and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for its first heartbeat, bounded
        (doomed_id,) = [key[len(chat.REDIS_ALIVE):] for key in
                        redis.call("KEYS", chat.REDIS_ALIVE + "*")]
        self.assertTrue(0 < redis.call("TTL", chat.REDIS_ALIVE + doomed_id.decode())
                        <= chat.REDIS_ALIVE_TTL_S)
        proc, port_b = self.start_chat(url)
        alice, bob = Peer(port_a), Peer(port_b)
        for peer, nick, count in ((alice, "alice", 1), (bob, "bob", 2)):
            self.addCleanup(peer.close)
            peer.send_line(nick)
            peer.wait_for("*** %s joined (%d online)" % (nick, count))
        doomed.kill()  # SIGKILL: it says nothing
        doomed.wait()
        taker = Peer(port_b)
        self.addCleanup(taker.close)
        taker.send_line("alice")
        taker.wait_for("!!! nickname alice is taken")  # until it is found lost
        # Its heartbeat's key would expire within 10 s; gone now, the next
        # heartbeat of the other server (within 3 s) finds it lost.
        redis.call("DEL", chat.REDIS_ALIVE + doomed_id.decode())
        self.assertEqual(bob.read_line(timeout=chat.REDIS_HEARTBEAT_S + TIMEOUT),
                         "*** alice left (server lost)")
        taker.send_line("alice")
        taker.wait_for("*** alice joined (2 online)")
        self.assertEqual(redis.call("SCARD", chat.REDIS_SERVERS), 1)

    def test_a_starting_server_finds_the_lost_ones_at_once(self):
        url = self.start_redis()
        redis = chat.BlockingRedis(chat.RedisAddress(url)).connect()
        self.addCleanup(redis.close)
        proc, chat_port = self.start_chat(url)
        bob = Peer(chat_port)
        self.addCleanup(bob.close)
        bob.send_line("bob")
        bob.wait_for("*** bob joined (1 online)")
        # A server that died: in the chat's set, a user online, no heartbeat.
        redis.call("SADD", chat.REDIS_SERVERS, "dead")
        redis.call("HSET", chat.REDIS_PRESENCE, "ghost",
                   json.dumps({"nick": "ghost", "room": "#lobby", "server": "dead"}))
        self.start_chat(url)
        self.assertEqual(bob.read_line(timeout=chat.REDIS_HEARTBEAT_S + TIMEOUT),
                         "*** ghost left (server lost)")
        self.assertEqual(redis.call("SCARD", chat.REDIS_SERVERS), 2)  # "dead" is out
        self.assertIsNone(redis.call("HGET", chat.REDIS_PRESENCE, "ghost"))


class RedisOutageTest(RedisCase):

    def test_a_redis_that_stops_answering_is_unreachable_until_it_answers(self):
        self.quick_outages()
        url = self.start_redis()
        alice = self.alice_on(self.serve_on_redis(url))
        self.redis_proc.send_signal(signal.SIGSTOP)  # connected, silent
        resumed = lambda: self.redis_proc.send_signal(signal.SIGCONT)
        self.addCleanup(resumed)
        alice.wait_for("*** " + chat.NETWORK_DOWN)
        alice.send_line("anyone?")
        alice.wait_for("!!! " + chat.NOT_SENT_NETWORK)
        resumed()
        alice.wait_for("*** " + chat.NETWORK_BACK)
        alice.send_line("hello again")
        alice.wait_for("<alice> hello again")

    def test_an_outage_longer_than_a_heartbeat_loses_nobody(self):
        self.quick_outages()
        url = self.start_redis()
        alice = Peer(self.serve_on_redis(url))
        bob = Peer(self.serve_on_redis(url))
        for peer, nick, count in ((alice, "alice", 1), (bob, "bob", 2)):
            self.addCleanup(peer.close)
            peer.send_line(nick)
            peer.wait_for("*** %s joined (%d online)" % (nick, count))
        # Bob's server comes back half a second after Redis does (alice's at once).
        back_after = [float("inf")]
        open_sockets = self.server.network.open_sockets

        def slowly(timeout):  # in the worker thread
            if time.monotonic() < back_after[0]:
                raise OSError("not yet")
            return open_sockets(timeout)
        self.server.network.open_sockets = slowly
        self.redis_proc.send_signal(signal.SIGSTOP)
        self.addCleanup(self.redis_proc.send_signal, signal.SIGCONT)
        for peer in (alice, bob):
            peer.wait_for("*** " + chat.NETWORK_DOWN)
        time.sleep(1.5)  # not a wait for anything: every heartbeat key expires meanwhile
        back_after[0] = time.monotonic() + 0.5
        self.redis_proc.send_signal(signal.SIGCONT)
        for peer in (alice, bob):
            peer.wait_for("*** " + chat.NETWORK_BACK)
        time.sleep(1.5)  # past the grace after coming back, when lost servers are looked for
        alice.send_line("/who")
        self.assertNotIn("*** bob left (server lost)",
                         alice.wait_for("*** 2 in #lobby: alice, bob"))

    def test_memory_follows_the_rooms_with_members_here_not_every_room(self):
        url = self.start_redis()
        alice = Peer(self.serve_on_redis(url, rate=0))
        self.addCleanup(alice.close)
        first = self.server
        alice.send_line("alice")
        alice.wait_for("*** alice joined (1 online)")
        for number in range(30):  # rooms used once, then left
            alice.send_line("/join #r%d" % number)
            alice.send_line("said in r%d" % number)
            alice.wait_for("<alice> said in r%d" % number)
        alice.send_line("/join #lobby")
        alice.wait_for("*** alice joined #lobby (1 here)")
        alice.sync()
        self.assertEqual(sorted(first.network.recents), ["#lobby"])
        self.assertEqual(sorted(first.chat.rooms), ["#lobby"])
        bob = Peer(self.serve_on_redis(url, rate=0))  # a server started later
        self.addCleanup(bob.close)
        self.assertEqual(sorted(self.server.network.recents), ["#lobby"])
        bob.send_line("bob")
        bob.wait_for("*** bob joined (2 online)")
        bob.send_line("/join #r7")  # its last messages are read when it is entered
        bob.expect("*** bob joined #r7 (1 here)", "*** the last 1 message in #r7 (times in UTC):")
        self.assertRegex(bob.read_line(), "^" + STAMP + "<alice> said in r7$")
        alice.send_line("/join #r7")
        while not bob.read_line().startswith("*** alice joined #r7 ("):
            pass  # (its count is alice's server's: it may not have heard of bob's join yet)
        alice.send_line("live")
        bob.expect("<alice> live")

    def test_the_first_history_read_after_an_outage_succeeds(self):
        self.quick_outages()
        port = free_port()
        url = self.start_redis("--appendonly", "yes", "--appendfsync", "always", port=port)
        folder = self.redis_folder
        alice = self.alice_on(self.serve_on_redis(url))
        alice.send_line("kept")
        alice.send_line("/history 1")  # the history reader is connected now
        alice.wait_for("*** end of history")
        self.redis_proc.kill()
        self.redis_proc.wait()
        alice.wait_for("*** " + chat.NETWORK_DOWN)
        self.start_redis("--appendonly", "yes", "--dir", folder, port=port)
        alice.wait_for("*** " + chat.NETWORK_BACK)
        alice.send_line("/history 1")
        alice.expect("*** the last 1 message in #lobby (times in UTC):")

    def test_a_redis_back_without_its_data_never_sends_ids_back(self):
        port = free_port()
        url = self.start_redis(port=port)  # no persistence: a restart forgets all
        proc, chat_port = self.start_chat(url)
        alice = Peer(chat_port)
        self.addCleanup(alice.close)
        alice.send_line("/format json")
        alice.send_line("alice")
        for text in ("one", "two", "three"):
            alice.send_line(text)
        def event():  # the next JSON object (the greeting comes before /format json)
            line = alice.read_line()
            while not line.startswith("{"):
                line = alice.read_line()
            return json.loads(line)
        ids = []
        while len(ids) < 3:
            said = event()
            if said.get("type") == "message":
                ids.append(said["id"])
        self.redis_proc.kill()
        self.redis_proc.wait()
        self.start_redis(port=port)
        while event().get("text") != chat.NETWORK_BACK:
            pass
        alice.send_line("after")
        said = event()
        while said.get("type") != "message":
            said = event()
        event = said
        self.assertGreater(event["id"], max(ids))
        proc.terminate()
        log = proc.stderr.read().decode()
        self.assertEqual(log.count("Redis came back WITHOUT THE CHAT'S DATA"), 1, log)

    def test_redis_killed_and_restarted_loses_nothing_accepted(self):
        port = free_port()
        url = self.start_redis("--appendonly", "yes", "--appendfsync", "always", port=port)
        folder = self.redis_folder
        a, port_a = self.start_chat(url)
        b, port_b = self.start_chat(url)
        alice, carol, bob = Peer(port_a), Peer(port_a), Peer(port_b)
        for count, (peer, nick) in enumerate(((alice, "alice"), (carol, "carol"),
                                              (bob, "bob")), 1):
            self.addCleanup(peer.close)
            peer.send_line(nick)
            peer.wait_for("*** %s joined (%d online)" % (nick, count))
        alice.send_line("before")
        bob.wait_for("<alice> before")
        self.redis_proc.kill()
        self.redis_proc.wait()
        for peer in (alice, bob):
            peer.wait_for("*** " + chat.NETWORK_DOWN)
        alice.send_line("during")
        alice.wait_for("!!! " + chat.NOT_SENT_NETWORK)
        alice.send_line("/msg carol same server")  # needs no one else
        carol.wait_for("*alice* same server")
        carol.send_line("/quit")
        alice.wait_for("*** carol left (quit)")  # her own server's users see it at once
        self.start_redis("--appendonly", "yes", "--dir", folder, port=port)
        for peer in (alice, bob):
            peer.wait_for("*** " + chat.NETWORK_BACK)
        bob.wait_for("*** carol left (quit)")  # the others, once it is back
        alice.send_line("after")
        skipped = bob.wait_for("<alice> after")
        self.assertNotIn("<alice> during", skipped)
        bob.send_line("/history")
        lines = bob.wait_for("*** end of history")
        said = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
        self.assertEqual(said, ["<alice> before", "<alice> after"])


class RedisProxy:
    """Between chat.py and a real redis-server: passes bytes both ways, and
    can hand chat.py bytes of its own (a hostile or broken Redis)."""

    def __init__(self, case, redis_port):
        self.redis_port = redis_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients = []
        self.lock = threading.Lock()
        case.addCleanup(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.redis_port))
            with self.lock:
                self.clients.append(client)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source, target):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_RDWR)  # the other thread's recv ends too
        except OSError:
            pass
        source.close()

    def inject(self, data):
        """Send data to every chat.py connection, as if Redis had said it."""
        with self.lock:
            for client in self.clients:
                try:
                    client.sendall(data)
                except OSError:
                    pass

    def close(self):
        self.listener.close()
        with self.lock:
            for client in self.clients:
                client.close()


class RedisFaultTest(RedisCase):
    """Redis misbehaving for real: bad bytes, lost scripts, a freeze under
    load. Every line is delivered or its sender told; the servers live on."""

    def test_bytes_that_are_not_a_reply_are_an_outage_not_a_crash(self):
        self.quick_outages()
        url = self.start_redis()
        proxy = RedisProxy(self, int(url.rsplit(":", 1)[1]))
        alice = Peer(self.serve_on_redis("redis://127.0.0.1:%d" % proxy.port))
        self.addCleanup(alice.close)
        alice.send_line("alice")
        alice.wait_for("*** alice joined (1 online)")
        for garbage in (b"?garbage\r\n", b":12x\r\n", b"$abc\r\n", b"+OK\r\n"):
            proxy.inject(garbage)
            alice.wait_for("*** " + chat.NETWORK_DOWN)
            alice.wait_for("*** " + chat.NETWORK_BACK)
            alice.send_line("after %r" % garbage)
            alice.wait_for("<alice> after %r" % garbage)

    def test_scripts_flushed_from_redis_are_loaded_again(self):
        self.quick_outages()
        url = self.start_redis()
        alice = self.alice_on(self.serve_on_redis(url))
        flusher = chat.BlockingRedis(chat.RedisAddress(url))
        flusher.call("SCRIPT", "FLUSH")
        flusher.close()
        alice.send_line("lost?")
        alice.wait_for("!!! " + chat.NOT_SENT_NETWORK)  # told, then back with the scripts
        alice.wait_for("*** " + chat.NETWORK_BACK)
        alice.send_line("found")
        alice.wait_for("<alice> found")

    def test_a_frozen_redis_under_load_leaves_no_line_untold(self):
        self.quick_outages()
        url = self.start_redis()
        senders = []
        for number in range(3):
            peer = Peer(self.serve_on_redis(url, rate=0) if number < 2
                        else self.server.address[1])
            self.addCleanup(peer.close)
            peer.send_line("s%d" % number)
            peer.wait_for("*** s%d joined (%d online)" % (number, number + 1))
            senders.append(peer)
        for peer in senders:
            peer.sync("ready")
        outcome = {}

        def send_and_count(peer, nick):  # every line: its echo, or "not sent"
            sent = 0
            for sent in range(1, 201):
                peer.send_line("%s %d" % (nick, sent))
                if sent == 50:
                    self.redis_proc.send_signal(signal.SIGSTOP) if nick == "s0" else None
            echoed = told = 0
            while echoed + told < sent:
                line = peer.read_line()
                if line is None:
                    break
                if line.startswith("<%s> " % nick):
                    echoed += 1
                elif line == "!!! " + chat.NOT_SENT_NETWORK:
                    told += 1
                elif line == "*** " + chat.NETWORK_DOWN:
                    self.redis_proc.send_signal(signal.SIGCONT)
            outcome[nick] = (sent, echoed, told)
        self.addCleanup(self.redis_proc.send_signal, signal.SIGCONT)
        threads = [threading.Thread(target=send_and_count, args=(peer, "s%d" % n))
                   for n, peer in enumerate(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 3)
        for nick, (sent, echoed, told) in outcome.items():
            self.assertEqual(echoed + told, sent, (nick, outcome))
        self.assertEqual(len(outcome), 3)
        self.assertTrue(any(told for _, _, told in outcome.values()), outcome)

if __name__ == "__main__":
    unittest.main()
