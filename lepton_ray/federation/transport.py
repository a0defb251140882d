"""gRPC over mutually authenticated TLS between the coordinator and the sites.

Sites dial **out** to the coordinator (an organisation opens no inbound port) and hold one
bidirectional stream, ``/lepton.Federation/Connect``, down which the coordinator pushes
:class:`~lepton_ray.federation.wire.Call` messages and up which the site sends
:class:`~lepton_ray.federation.wire.Reply` messages. Every gRPC message on the stream is one
wire frame (:mod:`~lepton_ray.federation.wire`), so vectors of any size stream in 1 MiB chunks.

Authentication, both ways, from the kits alone:

- TLS with client authentication (``require_client_auth=True``): the handshake fails unless the
  site presents a certificate chaining to the federation CA, and the site refuses a server
  whose certificate does not chain to that CA or does not carry the coordinator's name
  (``coordinator.<federation>.lepton``, which the CA puts only in the coordinator's
  certificate). gRPC's BoringSSL negotiates TLS 1.3 with a TLS 1.3 peer (checked by a test);
  the Python API exposes no minimum-version setting.
- Pinning: a CA-valid certificate is still refused unless its SHA-256 fingerprint is one the
  signed roster lists (a certificate the CA issued to someone outside the roster, or an old
  one, gets nothing), and the site's :class:`Hello` must name the roster entry of that
  certificate and the same roster hash. The coordinator's :class:`Welcome` echoes the roster
  hash so the site checks it too.

Liveness: HTTP/2 keepalive pings both ways (20 s, 10 s timeout), a per-call timeout on every
stage (:class:`CallTimeout`), and the site reconnects with capped backoff after network
failures or a coordinator restart (:meth:`SiteClient.run`). A site that disconnects fails every
pending call with :class:`SiteGone` (the driver's dropout).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from lepton_ray.errors import FederationError
from lepton_ray.federation import wire
from lepton_ray.federation.provision import COORDINATOR, Kit, fingerprint, server_name

log = logging.getLogger("lepton_ray.federation")

METHOD = "/lepton.Federation/Connect"
_SERVICE, _NAME = "lepton.Federation", "Connect"
_END = object()

KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_time_between_pings_ms", 10_000),
    ("grpc.max_receive_message_length", wire.MAX_FRAME_BYTES + 1024),
    ("grpc.max_send_message_length", wire.MAX_FRAME_BYTES + 1024),
]


class SiteGone(FederationError):
    """The site's stream ended (network failure, site killed): its parties drop out."""


class CallTimeout(FederationError):
    """A site did not answer a stage within its timeout: its parties drop out."""


class RemoteError(FederationError):
    """The site answered a call with an error (its message is kept)."""


# --------------------------------------------------------------------------- coordinator side
@dataclass
class SiteSession:
    """One authenticated site on the coordinator: send calls, await replies."""

    site: str
    index: int
    session: str
    _out: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _pending: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ids: Any = field(default_factory=lambda: itertools.count(1), repr=False)
    closed: threading.Event = field(default_factory=threading.Event, repr=False)
    bytes_out: int = 0
    bytes_in: int = 0
    inbox: queue.Queue = field(default_factory=queue.Queue, repr=False)  # non-reply messages

    @property
    def alive(self) -> bool:
        return not self.closed.is_set()

    def send(self, message: Any) -> None:
        if self.closed.is_set():
            raise SiteGone(f"site {self.site!r} is disconnected")
        self._out.put(message)

    def call_async(self, method: str, *args: Any) -> futures.Future:
        """Send ``Call(method, args)``; the future resolves to the reply's value, or fails with
        :class:`RemoteError` / :class:`SiteGone`."""
        fut: futures.Future = futures.Future()
        with self._lock:
            if self.closed.is_set():
                fut.set_exception(SiteGone(f"site {self.site!r} is disconnected"))
                return fut
            call_id = next(self._ids)
            self._pending[call_id] = fut
        self._out.put(wire.Call(id=call_id, method=method, args=tuple(args)))
        return fut

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        fut = self.call_async(method, *args)
        try:
            return fut.result(timeout=timeout)
        except futures.TimeoutError:
            raise CallTimeout(f"site {self.site!r}: {method} did not answer within {timeout} s") from None

    def _resolve(self, reply: wire.Reply) -> None:
        with self._lock:
            fut = self._pending.pop(reply.id, None)
        if fut is None:
            log.warning("site %s: reply to unknown call %s dropped", self.site, reply.id)
        elif reply.error:
            fut.set_exception(RemoteError(f"site {self.site!r}: {reply.error}"))
        else:
            fut.set_result(reply.value)

    def close(self, why: str = "disconnected") -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(SiteGone(f"site {self.site!r} {why}"))
        self._out.put(_END)


class CoordinatorServer:
    """The coordinator's gRPC endpoint. ``sessions`` maps site id -> its live
    :class:`SiteSession`; a reconnecting site replaces its old session."""

    def __init__(self, kit: Kit, *, host: str | None = None, port: int | None = None,
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES, max_workers: int = 64):
        if kit.site != COORDINATOR:
            raise FederationError(f"kit {kit.path}: a coordinator needs the coordinator kit, "
                                  f"not {kit.site!r}'s")
        self.kit = kit
        self.max_message_bytes = max_message_bytes
        self.sessions: dict[str, SiteSession] = {}
        self.refused: list[str] = []  # why connections were refused (recorded, not fatal)
        self._changed = threading.Condition()
        self._counter = itertools.count(1)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                   options=KEEPALIVE)
        handler = grpc.stream_stream_rpc_method_handler(self._connect)  # raw bytes both ways
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, {_NAME: handler}),))
        creds = grpc.ssl_server_credentials([(kit.key_pem, kit.cert_pem)],
                                            root_certificates=kit.ca_pem, require_client_auth=True)
        address = f"{host or '0.0.0.0'}:{kit.port if port is None else port}"
        self.port = self._server.add_secure_port(address, creds)
        if not self.port:
            raise FederationError(f"coordinator: cannot listen on {address}")

    def start(self) -> CoordinatorServer:
        self._server.start()
        return self

    def stop(self, grace: float = 0.5) -> None:
        for s in list(self.sessions.values()):
            s.close("coordinator stopped")
        self._server.stop(grace).wait()

    def wait_for(self, sites: int, timeout: float) -> dict[str, SiteSession]:
        """Block until ``sites`` sites are connected (or ``timeout``); the live sessions."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.live()) < sites:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        return self.live()

    def live(self) -> dict[str, SiteSession]:
        return {s: v for s, v in self.sessions.items() if v.alive}

    # the stream handler: runs on a server thread per connected site
    def _connect(self, requests: Iterator[bytes], context) -> Iterator[bytes]:
        entry, why = authenticate_peer(context.auth_context(), self.kit.roster)
        if entry is None:
            self._refuse(context, why, context.peer())
        decoder = wire.Decoder(max_message_bytes=self.max_message_bytes)
        hello = _read_one(requests, decoder)
        if not isinstance(hello, wire.Hello):
            self._refuse(context, f"{entry.id}: first message is not Hello", context.peer())
        if hello.site != entry.id or hello.federation != self.kit.federation:
            self._refuse(context, f"certificate of {entry.id!r} says Hello from {hello.site!r} of "
                                  f"{hello.federation!r}", context.peer())
        if hello.roster_hash != self.kit.roster.roster_hash:
            self._refuse(context, f"{entry.id}: pinned roster {hello.roster_hash[:16]}... differs "
                                  f"from the coordinator's {self.kit.roster.roster_hash[:16]}...",
                         context.peer())
        session = SiteSession(site=entry.id, index=entry.index, session=f"{entry.id}-{next(self._counter)}")
        session.bytes_in = decoder.bytes_in
        with self._changed:
            old = self.sessions.get(entry.id)
            self.sessions[entry.id] = session
            self._changed.notify_all()
        if old is not None:
            old.close("reconnected (old stream replaced)")
        reader = threading.Thread(target=self._read, args=(session, requests, decoder, context),
                                  daemon=True, name=f"fed-read-{entry.id}")
        reader.start()
        yield from _frames(wire.Welcome(session=session.session,
                                        roster_hash=self.kit.roster.roster_hash), session)
        while True:
            message = session._out.get()
            if message is _END:
                return
            yield from _frames(message, session)

    def _read(self, session: SiteSession, requests, decoder: wire.Decoder, context) -> None:
        try:
            for frame in requests:
                message = decoder.feed(frame)
                session.bytes_in = decoder.bytes_in
                if message is None:
                    continue
                if isinstance(message, wire.Reply):
                    session._resolve(message)
                else:
                    session.inbox.put(message)
            session.close("disconnected")
        except FederationError as exc:  # a malformed stream: drop the site, keep the reason
            self.refused.append(f"{session.site}: {exc}")
            session.close(f"sent a malformed message ({exc})")
            context.cancel()
        except grpc.RpcError:
            session.close("disconnected")
        except Exception as exc:  # a transport error: the site is gone
            session.close(f"disconnected ({type(exc).__name__})")
        finally:
            with self._changed:
                self._changed.notify_all()

    def _refuse(self, context, why: str, peer: str) -> None:
        self.refused.append(f"{peer}: {why}")
        log.warning("coordinator refused %s: %s", peer, why)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, why)


def authenticate_peer(auth: dict, roster) -> tuple[Any, str]:
    """The roster entry of the TLS peer, or ``(None, why)``. gRPC has already checked that the
    peer's certificate chains to the federation CA; here: TLS 1.3 (gRPC's Python API cannot set
    a minimum version, so a TLS 1.2 session is refused before any message is read) and the
    certificate's fingerprint pinned in the signed roster."""
    version = (auth.get("ssl_tls_version") or [b"?"])[0]
    if version != b"TLSv1.3":
        return None, f"TLS version {version.decode(errors='replace')}, the federation requires TLSv1.3"
    pem = (auth.get("x509_pem_cert") or [b""])[0]
    if not pem:
        return None, "no client certificate"
    sha = fingerprint(pem)
    entry = roster.by_fingerprint(sha)
    if entry is None:
        return None, f"certificate {sha[:16]}... is not in the roster"
    return entry, ""


def _frames(message: Any, session: SiteSession | None = None) -> Iterator[bytes]:
    for frame in wire.encode(message):
        if session is not None:
            session.bytes_out += len(frame)
        yield frame


def _read_one(requests: Iterator[bytes], decoder: wire.Decoder) -> Any:
    for frame in requests:
        message = decoder.feed(frame)
        if message is not None:
            return message
    raise SiteGone("stream ended before a complete message")


# --------------------------------------------------------------------------- site side
Handler = Callable[[Any], Any]


class SiteClient:
    """A site's outbound connection. ``handler(message)`` is called for each
    :class:`~lepton_ray.federation.wire.Call` (its return value, or its exception's message,
    goes back as the :class:`Reply`) and for every other message (return value ignored)."""

    def __init__(self, kit: Kit, handler: Handler, *, address: str | None = None,
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES):
        if kit.identity is None:
            raise FederationError(f"kit {kit.path}: a site needs a party kit, not the coordinator's")
        self.kit = kit
        self.handler = handler
        self.address = address or f"{kit.host}:{kit.port}"
        self.max_message_bytes = max_message_bytes
        self.session: str | None = None
        self.connected = threading.Event()
        self.bytes_out = 0
        self.bytes_in = 0
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.kit.ca_pem,
                                            private_key=self.kit.key_pem,
                                            certificate_chain=self.kit.cert_pem)

    def connect_once(self, *, connect_timeout: float = 10.0) -> None:
        """One connection: handshake, then serve calls until the stream ends. Raises
        :class:`FederationError` if the coordinator refuses this site (final), or
        :class:`SiteGone` when the connection fails or ends (retry)."""
        options = KEEPALIVE + [("grpc.ssl_target_name_override", server_name(self.kit.federation))]
        channel = grpc.secure_channel(self.address, self._credentials(), options=options)
        self._channel = channel
        out: queue.Queue = queue.Queue()
        out.put(wire.Hello(federation=self.kit.federation, site=self.kit.site,
                           roster_hash=self.kit.roster.roster_hash))

        def requests():
            while True:
                message = out.get()
                if message is _END:
                    return
                for frame in wire.encode(message):
                    self.bytes_out += len(frame)
                    yield frame

        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            raise SiteGone(f"cannot reach the coordinator at {self.address} (TLS handshake or "
                           f"network failed within {connect_timeout} s)") from None
        stream = channel.stream_stream(METHOD)(requests())
        decoder = wire.Decoder(max_message_bytes=self.max_message_bytes)
        try:
            for frame in stream:
                message = decoder.feed(frame)
                self.bytes_in = decoder.bytes_in
                if message is None:
                    continue
                if isinstance(message, wire.Welcome):
                    if message.roster_hash != self.kit.roster.roster_hash:
                        raise FederationError(f"coordinator's roster {message.roster_hash[:16]}... "
                                              "is not the one this site pinned")
                    self.session = message.session
                    self.connected.set()
                    continue
                if self.session is None:
                    raise FederationError("coordinator sent a message before Welcome")
                if isinstance(message, wire.Call):
                    out.put(self._answer(message))
                else:
                    reply = self.handler(message)
                    if reply is not None:
                        out.put(reply)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise FederationError(f"coordinator refused site {self.kit.site!r}: {exc.details()}") from None
            raise SiteGone(f"connection to the coordinator lost ({code})") from None
        finally:
            self.connected.clear()
            self.session = None
            out.put(_END)
            channel.close()
        raise SiteGone("the coordinator ended the stream")

    def _answer(self, call: wire.Call) -> wire.Reply:
        try:
            return wire.Reply(id=call.id, value=self.handler(call))
        except Exception as exc:  # the site's own refusal or failure: reported, not fatal
            return wire.Reply(id=call.id, error=f"{type(exc).__name__}: {exc}")

    def run(self, *, max_backoff: float = 10.0, connect_timeout: float = 10.0) -> None:
        """Serve until :meth:`stop`, reconnecting after network failures and coordinator
        restarts (backoff 0.5 s doubling to ``max_backoff``). A refusal is final."""
        backoff = 0.5
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.connect_once(connect_timeout=connect_timeout)
            except SiteGone as exc:
                log.info("site %s: %s; reconnecting in %.1f s", self.kit.site, exc, backoff)
            if time.monotonic() - started > 30:
                backoff = 0.5
            self._stop.wait(backoff)
            backoff = min(max_backoff, backoff * 2)

    def stop(self) -> None:
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
