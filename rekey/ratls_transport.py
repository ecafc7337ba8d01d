"""Attested TLS for the agent's HTTP: the server side of `rekey.http_guard` and a client connection.

The standard library's ``ssl`` has no verification callback, so the handshake runs in pyOpenSSL:
TLS 1.3 only, no session tickets, and ``set_verify`` with a callback that, at depth 0, takes the
peer's RA-TLS certificate (`attestation.ratls`), verifies its evidence with the platform verifier
at the current time, checks that the evidence binds the certificate's key and evaluates the
expected policy (`attestation.ratls.RatlsVerifier`, which caches verified certificates). The
callback returns True only then: OpenSSL's "self-signed certificate" verdict is replaced by the
attestation decision, never by switching verification off, and OpenSSL still checks the peer's
CertificateVerify (the peer holds the certificate's key). No host name is checked: the identity
is the evidence.

Server side (`RatlsHTTPServer`): the accepted socket is wrapped in an ``SSL.Connection`` and the
handshake runs under the guard's header deadline (``auth_timeout``: the watchdog drops the raw
socket, which ends the handshake); the handler reads and writes through `_TlsIO`, an
``io.RawIOBase`` over the TLS connection that keeps the idle timeout, so every limit of
`rekey.http_guard` still holds. The server asks for an optional client certificate: none is
fine (callers then authenticate with their HMAC tokens); a presented one must pass the server's
peer policy or the handshake fails and nothing reaches the handler. A connection refused as busy
is closed at once (a TLS client sees the handshake fail: the accept loop never runs a handshake).

Client side (`RatlsHTTPConnection`): an ``http.client.HTTPConnection`` whose ``connect`` runs
the handshake and refuses (`RatlsUntrusted`, a `RatlsRefused`, an OSError) a server whose
certificate does not pass; another failed handshake (cut off, an alert from the server) is a
plain `RatlsRefused`.

Renewal: a certificate lives `attestation.ratls.CERT_LIFETIME`. A server given ``renew`` (a
maker of fresh identities: new key, new evidence binding it, new certificate) replaces its
identity every ``renew_every`` seconds (default `RENEW_EVERY`, half the lifetime) in a thread of
its own; new handshakes use the new certificate, connections already open keep theirs. Clients
cache verified certificates by digest, so a new certificate is simply verified once. A failed
renewal keeps the current identity and is tried again within a minute.

Policies from generation manifests: `server_expectation` (a client that expects the agent of one
registered generation: its signer, product id, at least its SVN, its debug flag and exactly its
measurement) and `peer_policy` (an agent accepting other agents as clients: same signer and
product id, SVN not below its own, never debug). Their rules do not require a nonce: the TLS
binding proves who is talking; nonce-bound evidence still proves freshness for hand-offs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import logging
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from attestation.claims import Claims
from attestation.errors import AttestationError
from attestation.platform import PlatformVerifier
from attestation.policy import NO_SIGNER_WHEN_ZERO, TCB_STATUSES, Policy, format_duration, parse_policy
from attestation.ratls import CERT_LIFETIME, RatlsIdentity, RatlsVerifier
from attestation.sim import SimVerifier
from rekey.http_guard import GuardedHTTPServer, GuardLimits
from sealing.generation import GenerationManifest

__all__ = [
    "RENEW_EVERY",
    "RatlsHTTPConnection",
    "RatlsHTTPServer",
    "RatlsRefused",
    "RatlsSocket",
    "RatlsUntrusted",
    "open_socket",
    "peer_policy",
    "peer_verifier",
    "server_expectation",
    "sim_verifier_for",
]

log = logging.getLogger("rekey.ratls")

# X509 verification results a self-signed RA-TLS leaf provokes at depth 0; the attestation
# decision stands in for them. Any other error (expired, malformed, ...) refuses.
_SELF_SIGNED_ERRORS = frozenset({0, 18, 20, 21})  # ok, DEPTH_ZERO_SELF_SIGNED, NO_ISSUER, LEAF_SIG
MAX_EVIDENCE_AGE = CERT_LIFETIME + timedelta(minutes=5)
"""The certificate's evidence is made with it and lives as long as the certificate."""
RENEW_EVERY = CERT_LIFETIME / 2
"""How often a serving agent replaces its RA-TLS identity: well before the certificate ends."""
_RENEW_RETRY_SECONDS = 60.0


class RatlsRefused(ConnectionError):
    """The attested TLS handshake failed: the peer's certificate did not pass, or the peer
    refused ours. ``strerror`` says why, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, message)


class RatlsUntrusted(RatlsRefused):
    """The peer's certificate did not pass this side's check: the peer is not the attested
    party expected (another build, another host, no binding). Not an outage: retrying the same
    peer meets the same certificate."""


# ------------------------------------------------------------------------------ policies


def _rule(manifest: GenerationManifest, *, debug: bool) -> dict[str, Any]:
    """Signer, product id and SVN of ``manifest`` (its measurement where its signer is all zeros:
    evidence without a signer names no one), its details, debug as given."""
    statuses = sorted({"UpToDate", manifest.tcb} & TCB_STATUSES)
    rule: dict[str, Any] = {
        "platform": manifest.platform,
        "debug_allowed": debug,
        "tcb_statuses": statuses,
        "max_evidence_age": format_duration(MAX_EVIDENCE_AGE),
        "nonce_required": False,
    }
    if manifest.platform in NO_SIGNER_WHEN_ZERO and not manifest.signer.strip("0"):
        rule["measurements"] = [manifest.measurement]
    else:
        rule |= {"signer": manifest.signer, "product_id": manifest.product_id, "min_svn": manifest.svn}
    if manifest.details:
        rule["details"] = dict(manifest.details)
    return rule


def peer_policy(manifest: GenerationManifest) -> Policy:
    """What an agent of ``manifest`` accepts of a calling agent's certificate."""
    return parse_policy({"id": f"ratls-peer-{manifest.id}", "rules": [_rule(manifest, debug=False)]})


def sim_verifier_for(root_ca_pems: Iterable[bytes]) -> Callable[[str, bytes], PlatformVerifier]:
    """Sim evidence verified against whichever of these root CAs issued its platform key."""
    verifiers = [SimVerifier(pem) for pem in root_ca_pems]

    def verifier_for(platform: str, evidence: bytes) -> PlatformVerifier:
        if platform != "sim" or not verifiers:
            raise ValueError(f"no verifier for platform {platform}")
        now = datetime.now(UTC)
        for verifier in verifiers:
            with contextlib.suppress(AttestationError):
                verifier.verify_chain(evidence, now)
                return verifier
        return verifiers[0]  # its verification says why the chain fails

    return verifier_for


_SHARED: OrderedDict[tuple[str, ...], RatlsVerifier] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_MAX_SHARED = 64


def _shared(key: tuple[str, ...], make: Callable[[], RatlsVerifier]) -> RatlsVerifier:
    """One verifier (and so one cache of verified certificates) per policy and trust, process-wide."""
    with _SHARED_LOCK:
        found = _SHARED.get(key)
        if found is None:
            found = _SHARED[key] = make()
            while len(_SHARED) > _MAX_SHARED:
                _SHARED.popitem(last=False)
        _SHARED.move_to_end(key)
        return found


def _trust_id(root_ca_pems: Iterable[bytes]) -> str:
    return hashlib.sha256(b"\0".join(sorted(root_ca_pems))).hexdigest()


def server_expectation(manifest: GenerationManifest, root_ca_pems: Iterable[bytes]) -> RatlsVerifier:
    """A client's expectation of the agent of ``manifest`` on a host whose sim root CA is one of
    ``root_ca_pems``: that signer and product id, at least that SVN, debug only if the
    generation is a debug one, and exactly that measurement."""
    roots = list(root_ca_pems)
    policy = parse_policy(
        {"id": f"ratls-server-{manifest.id}", "rules": [_rule(manifest, debug=manifest.debug)]}
    )
    key = ("server", policy.digest, manifest.measurement, _trust_id(roots))
    return _shared(
        key, lambda: RatlsVerifier(policy, sim_verifier_for(roots), measurement=manifest.measurement)
    )


def peer_verifier(manifest: GenerationManifest, root_ca_pems: Iterable[bytes]) -> RatlsVerifier:
    """An agent's check of a calling agent's certificate (`peer_policy`)."""
    roots = list(root_ca_pems)
    policy = peer_policy(manifest)
    return _shared(
        ("peer", policy.digest, _trust_id(roots)), lambda: RatlsVerifier(policy, sim_verifier_for(roots))
    )


# ------------------------------------------------------------------------------ TLS plumbing


@dataclass
class _Handshake:
    """What the verification callback decided for one connection."""

    claims: Claims | None = None
    reason: str = ""
    decided: bool | None = None


def _verify_callback(verifier: RatlsVerifier) -> Callable[..., bool]:
    def callback(connection: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
        state = connection.get_app_data()
        if not isinstance(state, _Handshake):
            return False
        if depth != 0:
            state.reason = state.reason or "the peer sent a certificate chain, not one RA-TLS certificate"
            return False
        if state.decided is None:
            try:
                der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
            except Exception:  # a certificate the TLS library read but cryptography cannot
                state.decided, state.reason = False, "the peer's certificate cannot be read"
                return False
            try:
                state.claims, state.reason = verifier.try_verify(der)
            except Exception:  # a verifier bug must refuse, never escape into the TLS library
                log.exception("verifying an attested TLS peer failed")
                state.claims, state.reason = None, "the peer's certificate could not be verified"
            state.decided = state.claims is not None
            if not state.decided:
                log.info("attested TLS peer refused: %s", state.reason)
        if errnum not in _SELF_SIGNED_ERRORS:
            state.decided = False
            state.reason = state.reason or f"the peer's certificate failed X.509 check {errnum}"
            return False
        return bool(state.decided)

    return callback


def _context(*, server: bool, verifier: RatlsVerifier | None, identity: RatlsIdentity | None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if identity is not None:
        context.use_certificate(x509.load_der_x509_certificate(identity.cert_der))
        context.use_privatekey(identity.key)
        context.check_privatekey()
    if verifier is None:
        context.set_verify(SSL.VERIFY_NONE)
    else:
        mode = SSL.VERIFY_PEER if server else SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode, _verify_callback(verifier))
    return context


def _wait(sock: socket.socket, *, write: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out")
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT if write else select.POLLIN)
    if not poller.poll(remaining * 1000):
        raise TimeoutError("timed out")


def _ssl_reason(exc: SSL.Error) -> str:
    try:
        parts = [str(item[2]) for item in exc.args[0] if isinstance(item, tuple) and len(item) == 3]
    except (IndexError, TypeError):
        parts = []
    return "; ".join(parts) or type(exc).__name__


def _handshake(tls: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    while True:
        try:
            tls.do_handshake()
            return
        except SSL.WantReadError:
            _wait(sock, write=False, deadline=deadline)
        except SSL.WantWriteError:
            _wait(sock, write=True, deadline=deadline)
        except SSL.SysCallError as exc:
            raise RatlsRefused(f"the TLS handshake was cut off ({exc.args[-1]})") from None
        except SSL.Error as exc:
            state = tls.get_app_data()
            reason = state.reason if isinstance(state, _Handshake) and state.reason else _ssl_reason(exc)
            refused = (
                RatlsUntrusted if isinstance(state, _Handshake) and state.decided is False else RatlsRefused
            )
            raise refused(f"attested TLS handshake failed: {reason}") from None


class _TlsIO(io.RawIOBase):
    """A TLS connection as a raw stream; each read or write waits at most ``timeout`` seconds."""

    def __init__(self, tls: SSL.Connection, sock: socket.socket, timeout: float | None) -> None:
        super().__init__()
        self._tls, self._sock = tls, sock
        self._timeout = timeout if timeout is not None else 3600.0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return int(self._tls.recv_into(buffer))
            except SSL.WantReadError:
                _wait(self._sock, write=False, deadline=deadline)
            except SSL.WantWriteError:
                _wait(self._sock, write=True, deadline=deadline)
            except SSL.ZeroReturnError:
                return 0
            except SSL.SysCallError as exc:
                if exc.args and exc.args[0] == -1:  # the peer closed without close_notify
                    return 0
                raise ConnectionResetError(errno.ECONNRESET, "the TLS connection was reset") from None
            except SSL.Error as exc:
                raise RatlsRefused(f"the peer ended the TLS connection: {_ssl_reason(exc)}") from None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + self._timeout
        sent = 0
        while sent < len(view):
            try:
                sent += int(self._tls.send(view[sent : sent + 16384]))
            except SSL.WantReadError:
                _wait(self._sock, write=False, deadline=deadline)
            except SSL.WantWriteError:
                _wait(self._sock, write=True, deadline=deadline)
            except SSL.Error as exc:
                raise RatlsRefused(f"the TLS connection failed: {_ssl_reason(exc)}") from None
        return sent

    def shutdown_tls(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            self._tls.shutdown()


# ------------------------------------------------------------------------------ server


class RatlsHTTPServer(GuardedHTTPServer):
    """`GuardedHTTPServer` over attested TLS with ``identity``; ``peer_verifier``: the check of
    an optional client certificate (None: no client certificate is asked for)."""

    max_busy_answers = 4
    """Busy answers (503) in flight at once, each in its own short-lived thread with a one-second
    handshake deadline; past that a newcomer is just closed (the accept loop never waits)."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: Any,
        limits: GuardLimits,
        *,
        identity: RatlsIdentity,
        peer_verifier: RatlsVerifier | None = None,
        renew: Callable[[], RatlsIdentity] | None = None,
        renew_every: float = RENEW_EVERY.total_seconds(),
    ) -> None:
        if renew is not None and not renew_every > 0:
            raise ValueError("renew_every must be a positive number of seconds")
        self._peer_verifier = peer_verifier
        self._identity_lock = threading.Lock()
        self._identity, self._tls_context, self._busy_context = self._contexts(identity)
        self._renew, self._renew_every = renew, renew_every
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self.renewals = 0
        """Identities installed by `renew_identity` since the server started."""
        self._streams: dict[socket.socket, _TlsIO] = {}
        self._streams_lock = threading.Lock()
        self._busy_answers = threading.BoundedSemaphore(self.max_busy_answers)
        self.handshakes_refused = 0
        super().__init__(address, handler, limits)
        if renew is not None:
            self._renewer = threading.Thread(target=self._renewing, name="ratls-renew", daemon=True)
            self._renewer.start()

    def _contexts(self, identity: RatlsIdentity) -> tuple[RatlsIdentity, SSL.Context, SSL.Context]:
        return (
            identity,
            _context(server=True, verifier=self._peer_verifier, identity=identity),
            _context(server=True, verifier=None, identity=identity),
        )

    @property
    def identity(self) -> RatlsIdentity:
        """The identity new handshakes present."""
        with self._identity_lock:
            return self._identity

    def use_identity(self, identity: RatlsIdentity) -> None:
        """Present ``identity`` in every handshake from now on (open connections keep theirs)."""
        installed = self._contexts(identity)  # built outside the lock: a bad key fails here
        with self._identity_lock:
            self._identity, self._tls_context, self._busy_context = installed

    def renew_identity(self) -> RatlsIdentity:
        """Make a fresh identity with ``renew`` and present it from now on."""
        if self._renew is None:
            raise ValueError("this server was given no way to renew its identity")
        identity = self._renew()
        self.use_identity(identity)
        self.renewals += 1
        log.info("attested TLS identity renewed, valid until %s", identity.not_after.isoformat())
        return identity

    def _renewing(self) -> None:
        wait = self._renew_every
        while not self._stop_renewing.wait(wait):
            try:
                self.renew_identity()
                wait = self._renew_every
            except Exception as exc:  # the current identity stays; a later try may succeed
                wait = min(self._renew_every, _RENEW_RETRY_SECONDS)
                log.warning(
                    "renewing the attested TLS identity failed (%s); trying again in %.0f s",
                    type(exc).__name__,
                    wait,
                )

    def server_close(self) -> None:
        self._stop_renewing.set()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=5.0)
        super().server_close()

    def _current(self, *, busy: bool) -> SSL.Context:
        with self._identity_lock:
            return self._busy_context if busy else self._tls_context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.limits.idle_timeout)
        tls = SSL.Connection(self._current(busy=False), request)
        tls.set_accept_state()
        tls.set_app_data(_Handshake())
        try:
            _handshake(tls, request, time.monotonic() + self.limits.auth_timeout)
        except OSError as exc:  # RatlsRefused, a timeout, or the watchdog dropped it
            self.handshakes_refused += 1
            log.info("TLS handshake from %s failed: %s", client_address[0], exc.strerror or exc)
            return
        stream = _TlsIO(tls, request, self.limits.idle_timeout)
        with self._streams_lock:
            self._streams[request] = stream
        try:
            super().finish_request(request, client_address)
        finally:
            with self._streams_lock:
                self._streams.pop(request, None)
            stream.shutdown_tls()

    def refuse_busy(self, request: socket.socket) -> None:
        """Answer 503 over TLS in a thread of its own (at most `max_busy_answers` at once)."""
        if not self._busy_answers.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            threading.Thread(
                target=self._answer_busy, args=(request,), name="ratls-busy", daemon=True
            ).start()
        except BaseException:
            self._busy_answers.release()
            self.shutdown_request(request)
            raise

    def _answer_busy(self, request: socket.socket) -> None:
        try:
            request.settimeout(1.0)
            tls = SSL.Connection(self._current(busy=True), request)
            tls.set_accept_state()
            tls.set_app_data(_Handshake())
            _handshake(tls, request, time.monotonic() + 1.0)
            stream = _TlsIO(tls, request, 1.0)
            stream.write(self.busy)
            stream.shutdown_tls()
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
            self._busy_answers.release()

    def wrap_streams(self, connection: Any, rfile: Any, wfile: Any) -> tuple[Any, Any]:
        with self._streams_lock:
            stream = self._streams.get(connection)
        if stream is None:  # pragma: no cover - only handshaken connections reach a handler
            raise ConnectionError("no TLS stream for this connection")
        return io.BufferedReader(stream), stream

    def peer_claims(self, connection: Any) -> Claims | None:
        """The verified claims of the client certificate on ``connection`` (None: none shown)."""
        with self._streams_lock:
            stream = self._streams.get(connection)
        state = stream._tls.get_app_data() if stream is not None else None
        return state.claims if isinstance(state, _Handshake) else None


# ------------------------------------------------------------------------------ client


class _ClientStream(_TlsIO):
    """The response's stream: closing it releases its hold on the connection."""

    def __init__(self, owner: RatlsSocket) -> None:
        super().__init__(owner.tls, owner.raw, owner.timeout)
        self._owner = owner

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._owner.release()


class RatlsSocket:
    """A handshaken client TLS connection with what ``http.client`` uses of a socket (and
    ``recv``/``shutdown`` for raw use). As with a socket, the connection stays open until it and
    every file made from it are closed (``http.client`` closes its socket before the response
    body is read). ``peer_claims``: the server's verified claims."""

    peer_claims: Claims | None = None

    def __init__(self, tls: SSL.Connection, sock: socket.socket, timeout: float) -> None:
        self.tls, self.raw, self.timeout = tls, sock, timeout
        self._stream = _TlsIO(tls, sock, timeout)
        self._holds = 1
        self._closed = False
        self._lock = threading.Lock()

    def sendall(self, data: Any) -> None:
        self._stream.write(data)

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[: self._stream.readinto(buffer)])

    def shutdown(self, _how: int) -> None:
        """Send TLS close_notify (the peer reads end of stream); the socket stays open."""
        self._stream.shutdown_tls()

    def fileno(self) -> int:
        return self.raw.fileno()

    def __enter__(self) -> RatlsSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def makefile(self, mode: str = "rb", *_args: Any, **_kwargs: Any) -> io.BufferedReader:
        if "r" not in mode:
            raise ValueError("only a reading file is made")
        with self._lock:
            self._holds += 1
        return io.BufferedReader(_ClientStream(self))

    def release(self) -> None:
        with self._lock:
            self._holds -= 1
            last = self._holds == 0
        if last:
            self._stream.shutdown_tls()
            self.raw.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.release()


class RatlsHTTPConnection(http.client.HTTPConnection):
    """HTTP over attested TLS to ``host:port``; the server's certificate must pass ``verifier``.
    ``identity``: a client certificate to present (a calling agent's own)."""

    default_port = 443

    def __init__(
        self,
        host: str,
        port: int,
        *,
        verifier: RatlsVerifier,
        identity: RatlsIdentity | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._verifier = verifier
        self._identity = identity
        self.peer_claims: Claims | None = None

    def connect(self) -> None:
        timeout = self.timeout if isinstance(self.timeout, int | float) else 30.0
        sock = open_socket(
            self.host, self.port, verifier=self._verifier, identity=self._identity, timeout=timeout
        )
        self.peer_claims = sock.peer_claims
        self.sock = sock


def open_socket(
    host: str,
    port: int,
    *,
    verifier: RatlsVerifier,
    identity: RatlsIdentity | None = None,
    timeout: float = 30.0,
) -> RatlsSocket:
    """Connect and run the attested TLS handshake; `RatlsRefused` when the server's certificate
    does not pass ``verifier`` (or the handshake fails otherwise)."""
    sock = socket.create_connection((host, port), timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = SSL.Connection(_context(server=False, verifier=verifier, identity=identity), sock)
        tls.set_connect_state()
        state = _Handshake()
        tls.set_app_data(state)
        _handshake(tls, sock, time.monotonic() + timeout)
    except BaseException:
        sock.close()
        raise
    opened = RatlsSocket(tls, sock, timeout)
    opened.peer_claims = state.claims
    return opened
