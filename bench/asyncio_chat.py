#!/usr/bin/env python3
"""asyncio_chat.py: the chat server a Python programmer would write with asyncio streams.

A reference that `chat.py bench` is measured against, not a product: it
shows what the straightforward asyncio version of the same protocol costs
on the same machine. It speaks the registration and broadcast part of
version 1 of the chat protocol (docs/protocol.md) and nothing more: two
greeting notices, the first non-empty line (or "/nick NAME") as the
nickname, "*** NICK joined (N online)" to everyone, each line a member sends
as "<NICK> TEXT" to everyone, the sender included ("//TEXT" says "/TEXT",
any other "/..." is an unknown command), and "*** NICK left (connection
closed)". Text is cleaned as the protocol says; lines over 4096 bytes are
refused. Not here: /me /msg /who /ping /quit, rooms, history, --rate,
telnet filtering, the registration timeout, a client limit.

The shape is the usual one: asyncio.start_server(), one task per
connection, a set of writers, writer.write() to each member for a
broadcast, and await drain() on the connection's own writer after each line
it sent. Nothing evicts a reader that stopped reading: its writer buffers
without limit (fine for a benchmark's short runs, and only for those).

    python3 bench/asyncio_chat.py --host 127.0.0.1 --port 9999   (--port 0: any free port)

Standard library only; Python 3.8 or newer.
"""

import argparse
import asyncio
import signal
import sys

try:
    import resource
except ImportError:  # not on Windows: the default limit on open files stays
    resource = None

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999
MAX_LINE_BYTES = 4096      # a longer line is refused (docs/protocol.md)
STREAM_LIMIT = 1 << 16     # StreamReader's buffer: a line past it closes the connection
LISTEN_BACKLOG = 4096      # the bench connects a hundred at a time
SHUTDOWN_WAIT_S = 2.0      # at exit, how long the connections' tasks get to end
MAX_NICK_CHARS = 24
ENCODING = "utf-8"

# Made safe before relaying: controls (C0, DEL, C1) and the invisible format
# characters that can reorder or hide text go; TAB, U+2028, U+2029 become spaces.
REMOVED = ([*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200B, 0x200E, 0x200F, 0xFEFF]
           + [*range(0x202A, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x206A)])
SAFE = dict.fromkeys(REMOVED)
SAFE.update({0x09: " ", 0x2028: " ", 0x2029: " "})

GREETING = ("*** welcome to asyncio_chat ({count} online)\n"
            "*** choose a nickname: 1-24 letters, digits, _ or -\n")


def nick_problem(nick):
    """Say what is wrong with a nickname, or return None."""
    if len(nick) > MAX_NICK_CHARS:
        return "nickname too long (max %d characters)" % MAX_NICK_CHARS
    if nick.startswith("-"):
        return "invalid nickname: it may not start with -"
    if not all(ch.isalnum() or ch in "_-" for ch in nick):
        return "invalid nickname: use letters, digits, _ or -"
    return None


class Chat:
    """Who is in, by nick and by writer, and the broadcast."""

    def __init__(self):
        self.connections = set()   # every connection's StreamWriter, registered or not
        self.writers = set()       # the registered ones: who gets the broadcasts
        self.nicks = {}            # casefolded nick -> nick

    def broadcast(self, text):
        data = (text + "\n").encode(ENCODING)
        for writer in self.writers:
            if not writer.is_closing():  # a peer already gone: it would only log warnings
                writer.write(data)

    def join(self, nick, writer):
        self.nicks[nick.casefold()] = nick
        self.writers.add(writer)
        self.broadcast("*** %s joined (%d online)" % (nick, len(self.writers)))

    def leave(self, nick, writer, reason):
        if writer in self.writers:
            self.writers.discard(writer)
            del self.nicks[nick.casefold()]
            self.broadcast("*** %s left (%s)" % (nick, reason))

    def close_all(self):
        """At shutdown: forget everyone first, so nobody is told of the others
        leaving, then drop every connection: each task reads its end and returns."""
        self.writers.clear()
        self.nicks.clear()
        for writer in list(self.connections):
            writer.transport.abort()

    # -- one connection's lines --

    def choose_nick(self, writer, text):
        """A line before registering; return the nick once one is accepted."""
        nick = text.strip()
        if nick[:6].lower() == "/nick ":
            nick = nick[6:].strip()
        elif nick.startswith("/"):
            writer.write(b"!!! choose a nickname first\n")
            return None
        if not nick:
            return None
        problem = nick_problem(nick)
        if problem is None and nick.casefold() in self.nicks:
            problem = "nickname %s is taken" % nick
        if problem is not None:
            writer.write(("!!! %s\n" % problem).encode(ENCODING))
            return None
        self.join(nick, writer)
        return nick

    def say(self, nick, writer, text):
        """A line from a member: a message to everyone, or an unknown command."""
        text = text.rstrip()
        if not text:
            return  # blank: nothing
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            writer.write(("!!! unknown command %s\n" % text.split()[0]).encode(ENCODING))
            return
        self.broadcast("<%s> %s" % (nick, text))


async def read_text(reader, writer):
    """The next line as safe text; None at the end of the connection."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # past STREAM_LIMIT with no line end: give up on this peer
            writer.write(b"!!! line too long (max %d bytes)\n" % MAX_LINE_BYTES)
            return None
        if not line:
            return None
        if line.endswith(b"\n"):
            line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES:
            writer.write(b"!!! line too long (max %d bytes)\n" % MAX_LINE_BYTES)
            continue
        return line.decode(ENCODING, "replace").translate(SAFE)


async def serve(chat, reader, writer):
    """One connection, from the greeting to its close."""
    nick = None
    chat.connections.add(writer)
    try:
        writer.write(GREETING.format(count=len(chat.writers)).encode(ENCODING))
        while True:
            text = await read_text(reader, writer)
            if text is None:
                break
            if nick is None:
                nick = chat.choose_nick(writer, text)
            else:
                chat.say(nick, writer, text)
            await writer.drain()  # this client's own output first: its reads wait
    except ConnectionError:
        pass  # the peer is gone: it leaves below like any other
    finally:
        if nick is not None:
            chat.leave(nick, writer, "connection closed")
        chat.connections.discard(writer)
        writer.close()


def raise_open_files_limit():
    """Many clients need many descriptors: take all the hard limit allows."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # some systems cap it lower than they say: keep the soft limit


async def run(host, port):
    chat = Chat()
    server = await asyncio.start_server(lambda r, w: serve(chat, r, w), host, port,
                                        limit=STREAM_LIMIT, backlog=LISTEN_BACKLOG)
    address = server.sockets[0].getsockname()
    where = ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]
    print("asyncio_chat listening on %s" % where, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:
            pass  # Windows: Ctrl-C raises KeyboardInterrupt instead
    await stop.wait()
    server.close()
    chat.close_all()
    # Let the connections' tasks end by themselves rather than be cancelled
    # by asyncio.run(): Python 3.12.1's streams log a traceback for each
    # cancelled one.
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    if tasks:
        await asyncio.wait(tasks, timeout=SHUTDOWN_WAIT_S)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="TCP port (default %(default)s; 0 picks a free one)")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    try:
        asyncio.run(run(args.host, args.port))
    except OSError as exc:
        sys.stderr.write("asyncio_chat: cannot listen on %s port %d: %s\n"
                         % (args.host, args.port, exc.strerror or exc))
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
