"""Warm server sessions for tests that each run on an event loop of their own.

pytest-asyncio gives every test a loop of its own unless told otherwise, and an asyncpg
connection belongs to the loop that opened it: each test then connects anew, and a new
server backend starts cold (its catalog caches empty, the app's enum and other types
introspected again by asyncpg): about 15 ms of every test on the bench's schema.

The relay keeps backends for the next test.  The plugin's async engine connects to a
Unix socket of the relay (in a private directory), which either hands the connection a
backend an earlier test used, its session reset by ``DISCARD ALL`` (settings, prepared
statements, temporary tables, listeners and advisory locks gone, caches kept), or opens
one and relays its start-up, authentication included, untouched.  A backend goes back
to the pool only when its session ended idle (no transaction open, no answer pending);
otherwise it is closed, as a direct connection would have been.  Cancel requests are
passed to the server.  Everything runs on a loop of its own, on a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import asyncpg
from sqlalchemy.engine import URL

from .db import TERMINATE, LoopThread

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
SETTLE_SECONDS = 5.0  # bound on waiting for sessions to come back, or for backends to end
MAX_PACKET = 1 << 30
CONNECT_SECONDS = 10.0  # bound on a client's start-up packet, and on reaching the server
POOL_SIZE = 2  # idle sessions kept per start-up (more only for tests that hold several at once)
READ_BODIES = frozenset({b"Z", b"S", b"K", b"Q", b"P"})  # the messages whose content matters here


def relayable(url: URL) -> bool:
    """Whether the relay may stand in for a direct connection: a server on this machine (a
    Unix socket directory or a loopback address: the relay speaks plain text to it, which
    never leaves the machine), named explicitly, nothing else in the URL's query (TLS
    settings, several hosts...), and a platform with Unix sockets."""
    host = _upstream_host(url)
    if not hasattr(socket, "AF_UNIX") or not set(url.query) <= {"host"} or not host:
        return False
    if host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream_host(url: URL) -> str | None:
    """The server's host as SQLAlchemy's asyncpg dialect passes it (the query's wins)."""
    host = url.query.get("host") or url.host
    return host if isinstance(host, str) and "," not in host else None


# A custom (dotted) setting stays defined for the rest of a server session: after RESET
# ALL, current_setting('app.tenant', true) is '' where a new session has NULL.  A session
# whose statements may set one is not handed on: SET of a dotted name, or set_config() of
# a dotted literal or of a parameter (asyncpg's own set_config('jit', ...) is no such).
CUSTOM_SETTING = re.compile(
    rb"\bset_config\s*\(\s*(?:'[^']*\.|\$|[a-z_])|\bset\s+(?:session\s+|local\s+)?\"?[a-z_][\w$]*\"?\s*\.",
    re.IGNORECASE)


@dataclass
class _Session:
    """What one client session's messages tell: whether the server is ready (its first
    ReadyForQuery came), whether the session is idle with no answer pending, and whether
    it may have set a custom setting (then it is not handed on)."""

    ready: bool = False
    pending: int = 0  # queries, syncs and function calls the server has not answered yet
    status: bytes = b"I"  # of the last ReadyForQuery
    custom: bool = False
    partial: bool = False  # the server's side stopped holding part of a message

    @property
    def reusable(self) -> bool:
        return (self.ready and self.pending == 0 and self.status == b"I" and not self.custom
                and not self.partial)

    def from_client(self, kind: bytes, body: bytes) -> bool:
        if kind == b"X":
            return False  # the goodbye is the relay's to say, or not
        if kind in (b"Q", b"S", b"F"):
            self.pending += 1
        if kind in (b"Q", b"P") and not self.custom and CUSTOM_SETTING.search(body):
            self.custom = True
        return True

    def from_server(self, backend: _Backend) -> Callable[[bytes, bytes], bool]:
        def seen(kind: bytes, body: bytes) -> bool:
            backend.note(kind, body)
            if kind == b"Z":
                self.status, self.ready = body, True
                self.pending = max(0, self.pending - 1)
            return True
        return seen


@dataclass(eq=False)
class _Backend:
    """One server session the relay keeps: its stream, and what a client is told at start."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    params: dict[bytes, bytes] = field(default_factory=dict)  # ParameterStatus, latest values
    key_data: bytes = b""  # the BackendKeyData message, as the server sent it
    watcher: asyncio.Task[None] | None = None  # reads while idle: the end of the session
    partial: bool = False  # the watcher holds part of a message: the stream is not whole

    @property
    def alive(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def note(self, kind: bytes, body: bytes) -> None:
        if kind == b"S":
            name, _, rest = body.partition(b"\0")
            self.params[name] = rest.rstrip(b"\0")
        elif kind == b"K":
            self.key_data = _message(b"K", body)

    def close(self) -> None:
        """Say goodbye (no log line on the server) and close, without waiting."""
        if self.watcher is not None:
            self.watcher.cancel()
        if not self.writer.is_closing():
            self.writer.write(TERMINATE)
            self.writer.close()

    async def end(self) -> None:
        """Say goodbye and wait (bounded) until the server closes the session: a backend
        closes its socket after it has left the server's list of sessions, so the database
        can be renamed or dropped right after."""
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
            self.watcher = None
        if not self.writer.is_closing():
            try:
                self.writer.write(TERMINATE)
                await asyncio.wait_for(self._until_eof(), SETTLE_SECONDS)
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                self.writer.close()

    async def _until_eof(self) -> None:
        while await self.reader.read(65536):
            pass


class Relay:
    """A pool of warm backends of one server behind a Unix socket (see module docstring)."""

    def __init__(self, url: URL) -> None:
        self._server_url = url
        self._loop = LoopThread()
        self._dir = tempfile.mkdtemp(prefix="pgt-relay-")  # 0700: only this user connects
        port = url.port or 5432
        self.url = url._replace(host=None).set(query={"host": self._dir})  # set() keeps a None host
        self._path = os.path.join(self._dir, f".s.PGSQL.{port}")
        self._idle: dict[bytes, list[_Backend]] = {}
        self._clients = 0  # client sessions not yet over (their backend back or closed)
        self._quiet: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self.opened = 0  # backends started
        self.reused = 0  # sessions served by a warm backend

    # -- the caller's side (blocking) ------------------------------------------------

    def start(self) -> None:
        """Listen, and check a session goes through (that leaves a warm backend); raises
        if the server cannot be reached this way."""
        try:
            self._loop.run(self._listen())
            self._loop.run(self._probe(), timeout=30)
        except BaseException:
            self.close()
            raise

    def settle(self) -> None:
        """Wait (bounded) until every client session has ended and its backend is back in
        the pool or closed: a reset must not find one half-way (``DISCARD ALL`` running)."""
        self._loop.run(self._settled(), timeout=SETTLE_SECONDS + 1)

    def clear(self) -> None:
        """End every pooled backend (the database is about to be dropped or renamed);
        bounded: a session that does not end in time is left to the drop's FORCE."""
        with contextlib.suppress(TimeoutError):
            self._loop.run(self._clear(), timeout=3 * SETTLE_SECONDS)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._shutdown(), timeout=3 * SETTLE_SECONDS)
        self._loop.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the relay's loop --------------------------------------------------------------

    async def _listen(self) -> None:
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._server = await asyncio.start_unix_server(self._serve, path=self._path)

    async def _probe(self) -> None:
        conn = await asyncpg.connect(host=self._dir, port=self._server_url.port or 5432,
                                     user=self._server_url.username, password=self._server_url.password,
                                     database=self._server_url.database, timeout=10)
        await conn.close(timeout=5)
        await self._settled()

    async def _settled(self) -> None:
        assert self._quiet is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), SETTLE_SECONDS)

    async def _clear(self) -> None:
        await self._settled()
        backends = [b for pool in self._idle.values() for b in pool]
        self._idle.clear()
        await asyncio.gather(*(backend.end() for backend in backends))

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._quiet is not None
        self._clients += 1
        self._quiet.clear()
        backend: _Backend | None = None
        reusable = False
        try:
            packet = await asyncio.wait_for(_packet(reader), CONNECT_SECONDS)
            while _code(packet) in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")  # no TLS on a local socket: go on in plain text
                packet = await asyncio.wait_for(_packet(reader), CONNECT_SECONDS)
            if _code(packet) == CANCEL_REQUEST:
                await self._pass_cancel(packet)
                return
            backend, warm = await self._backend_for(packet, writer)
            reusable = await self._relay(reader, writer, backend, ready=warm)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            reusable = False
        finally:
            writer.close()
            if backend is not None:
                if reusable and backend.alive and await self._discard(backend):
                    self._park(packet, backend)
                else:
                    backend.close()
            self._clients -= 1
            if not self._clients:
                self._quiet.set()

    async def _backend_for(self, startup: bytes, client: asyncio.StreamWriter) -> tuple[_Backend, bool]:
        """A warm backend for this start-up packet, its start told to the client (True); else
        a new one, sent the packet (its authentication is relayed with the rest)."""
        pool = self._idle.get(startup, [])
        while pool:
            backend = pool.pop()
            if backend.watcher is not None:
                backend.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await backend.watcher
                backend.watcher = None
            if not backend.alive or backend.partial:
                backend.close()
                continue
            self.reused += 1
            try:
                client.write(_message(b"R", struct.pack("!i", 0))
                             + b"".join(_message(b"S", k + b"\0" + v + b"\0")
                                        for k, v in backend.params.items())
                             + backend.key_data + _message(b"Z", b"I"))
                await client.drain()
            except BaseException:
                backend.close()  # the client went during the hand-out: the session ends with it
                raise
            return backend, True
        upstream_reader, upstream_writer = await asyncio.wait_for(self._open_upstream(), CONNECT_SECONDS)
        self.opened += 1
        upstream_writer.write(startup)  # the rest of the start (authentication) is relayed
        return _Backend(upstream_reader, upstream_writer), False

    async def _relay(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                     backend: _Backend, *, ready: bool) -> bool:
        """Pass bytes both ways, whole messages at a time, until the client says goodbye or
        goes: True if the session is then idle with nothing pending (its backend may serve
        again), False if not or if the server went.  Each direction forwards what it has
        read as one write: one read and one write per burst, not per message."""
        session = _Session(ready=ready)
        to_server = asyncio.ensure_future(self._pump(client_reader, backend.writer, session.from_client))
        to_client = asyncio.ensure_future(self._pump(backend.reader, client, session.from_server(backend),
                                                     session))
        try:
            done, _ = await asyncio.wait({to_server, to_client}, return_when=asyncio.FIRST_COMPLETED)
            if to_client in done or to_server.exception() is not None:
                return False  # the server went (or said no at the start), or the client broke off
            to_client.cancel()  # waiting between messages: nothing half-read is lost
            with contextlib.suppress(asyncio.CancelledError):
                await to_client
            return session.reusable
        finally:
            for task in (to_server, to_client):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    seen: Callable[[bytes, bytes], bool], session: _Session | None = None) -> None:
        """Forward whole messages from ``reader`` to ``writer``; ``seen`` is told each one
        first (the body of those the relay reads) and returns False to stop before it (the
        client's goodbye).  Returns at the end of the stream or on that stop.  With
        ``session``: whether part of a message is held when stopped from outside."""
        buf = bytearray()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buf += chunk
            pos, stop = 0, False
            for kind, start, end in _frames(buf):
                if not seen(kind, bytes(buf[start:end]) if kind in READ_BODIES else b""):
                    stop = True
                    break
                pos = end
            if pos:
                writer.write(bytes(buf[:pos]))
                del buf[:pos]
            if session is not None:
                session.partial = bool(buf)
            if pos:
                await writer.drain()
            if stop:
                return

    async def _discard(self, backend: _Backend) -> bool:
        """Reset the session for the next client; True if it ended idle and clean."""
        backend.writer.write(_message(b"Q", b"DISCARD ALL\0"))
        try:
            await backend.writer.drain()
            failed = False
            while True:
                kind, body = await asyncio.wait_for(_read_message(backend.reader), SETTLE_SECONDS)
                backend.note(kind, body)
                failed = failed or kind == b"E"
                if kind == b"Z":
                    return not failed and body == b"I"
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            return False

    def _park(self, startup: bytes, backend: _Backend) -> None:
        pool = self._idle.setdefault(startup, [])
        if len(pool) >= POOL_SIZE:
            backend.close()  # as a direct connection would be: no idle sessions pile up
            return
        pool.append(backend)
        backend.watcher = asyncio.ensure_future(self._watch(backend))

    async def _watch(self, backend: _Backend) -> None:
        """While pooled: the server may end the session (terminated, shut down, database
        dropped); note its last words and close it."""
        buf = bytearray()
        try:
            # Whole reads (read() loses nothing when the watch is called off at a hand-out);
            # a message still incomplete then makes the session unusable (``partial``).
            while chunk := await backend.reader.read(65536):
                buf += chunk
                pos = 0
                for kind, start, pos in _frames(buf):
                    backend.note(kind, bytes(buf[start:pos]))
                    if kind == b"E":
                        raise EOFError
                del buf[:pos]
                backend.partial = bool(buf)
        except (OSError, EOFError, ValueError):
            pass
        backend.watcher = None
        for pool in self._idle.values():
            if backend in pool:
                pool.remove(backend)
        backend.close()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        port = self._server_url.port or 5432
        host = _upstream_host(self._server_url)
        assert host is not None  # relayable()
        if host.startswith("/"):
            return await asyncio.open_unix_connection(os.path.join(host, f".s.PGSQL.{port}"))
        return await asyncio.open_connection(host, port)

    async def _pass_cancel(self, packet: bytes) -> None:
        """Pass a cancel request to the server, unless its session is idle in the pool: the
        statement it was meant for is over, and the next client's must not be cancelled."""
        if any(b.key_data[5:13] == packet[8:16] for pool in self._idle.values() for b in pool):
            return
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            _, writer = await asyncio.wait_for(self._open_upstream(), CONNECT_SECONDS)
            writer.write(packet)
            await writer.drain()
            writer.close()


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _frames(buf: bytearray) -> Iterator[tuple[bytes, int, int]]:
    """The whole messages at the start of ``buf``: each one's type, and where its body
    starts and ends (the end is where the next message starts)."""
    pos = 0
    while len(buf) - pos >= 5:
        end = pos + 1 + _length(buf[pos + 1:pos + 5])
        if end > len(buf):
            return
        yield bytes(buf[pos:pos + 1]), pos + 5, end
        pos = end


def _length(field: bytes | bytearray) -> int:
    """A message's length field (itself included), checked."""
    length = int.from_bytes(field, "big")
    if not 4 <= length <= MAX_PACKET:
        raise ValueError(f"bad message length {length}")
    return length


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    return header[:1], await reader.readexactly(_length(header[1:]) - 4)


async def _packet(reader: asyncio.StreamReader) -> bytes:
    """An untyped packet (start-up, SSL, cancel): its length first."""
    head = await reader.readexactly(4)
    (length,) = struct.unpack("!i", head)
    if not 8 <= length <= 10000:
        raise ValueError(f"bad start-up packet length {length}")
    return head + await reader.readexactly(length - 4)


def _code(packet: bytes) -> int:
    return int(struct.unpack("!i", packet[4:8])[0])
