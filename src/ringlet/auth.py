"""Mutual HMAC-SHA256 challenge-response: both ends of a connection prove they know the job secret.

The exchange (``I`` = initiator, ``A`` = acceptor)::

    I -> A   HELLO = MAGIC (8 bytes, carries the version) + nonce_I (32) + job_I (64)
    A -> I   HELLO = MAGIC + nonce_A + job_A               (sent at once, without waiting)
    I -> A   HMAC(secret, LABEL + b"I" + context + job + nonce_A + nonce_I)
    A -> I   HMAC(secret, LABEL + b"A" + context + job + nonce_I + nonce_A)   only if I's proof was good

``job`` is the job id (``RINGLET_JOB_ID``, torchrun's run id, SLURM's job and step, ...) padded to
64 bytes. Two ends that name different jobs stop right after the hellos with a
:class:`JobMismatchError` naming both ids, so a second job started on the same port and secret is
refused with a message that says so, not with an unexplained failure. The job is also inside the
MAC, so a proof made for one job never passes for another.

The roles are inside the MAC, so an answer reflected back at its author never verifies, and the
acceptor proves nothing to a peer that has not proved itself first. Every read has a fixed size:
nothing the peer sends decides how much is allocated or read. The secret never crosses the wire.
This authenticates a connection; it does not encrypt it.

:func:`authenticate` runs either side on a blocking socket; :class:`AcceptorHandshake` is the
acceptor side without I/O, for servers that handshake many connections on one selector thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time

from ringlet.errors import AuthenticationError

MAGIC = b"RINGLET\x02"  # the last byte is the protocol version
LABEL = b"ringlet-auth-v2"
NONCE_BYTES = 32
JOB_BYTES = 64
HELLO_BYTES = len(MAGIC) + NONCE_BYTES + JOB_BYTES
MAC_BYTES = hashlib.sha256().digest_size
_INITIATOR_ROLE = b"I"
_ACCEPTOR_ROLE = b"A"


class JobMismatchError(AuthenticationError):
    """The peer belongs to another job (same address and secret, different job id)."""


def job_secret() -> bytes:
    """A fresh secret for one job: 32 random bytes, hex-encoded as ASCII (so it fits an env var)."""
    return secrets.token_hex(32).encode("ascii")


def secret_from_str(s: str) -> bytes:
    """The secret bytes for a secret given as text (``RINGLET_SECRET``, ``init(secret=...)``).

    Raises ValueError for an empty or blank secret, which would authenticate anyone.
    """
    if not isinstance(s, str):
        raise TypeError(f"secret must be a str, got {type(s).__name__}")
    stripped = s.strip()
    if not stripped:
        raise ValueError("the ringlet secret is empty; set RINGLET_SECRET to a non-empty string")
    return stripped.encode("utf-8")


def job_field(job: str) -> bytes:
    """``job`` as the fixed 64-byte hello field: UTF-8 padded with NULs, hashed when longer."""
    raw = job.encode("utf-8")
    if len(raw) > JOB_BYTES or b"\0" in raw:
        raw = b"sha256:" + hashlib.sha256(raw).hexdigest()[: JOB_BYTES - 7].encode("ascii")
    return raw.ljust(JOB_BYTES, b"\0")


def _job_name(field: bytes) -> str:
    text = field.rstrip(b"\0").decode("utf-8", "replace")
    return repr(text) if text else "(none)"


def _proof(
    secret: bytes, role: bytes, context: bytes, job: bytes, first: bytes, second: bytes
) -> bytes:
    return hmac.new(secret, LABEL + role + context + job + first + second, hashlib.sha256).digest()


def _check_magic(magic: bytes) -> None:
    """Raise AuthenticationError naming what the first 8 bytes say when they are not our MAGIC."""
    if magic == MAGIC:
        return
    if magic[:-1] == MAGIC[:-1]:
        raise AuthenticationError(
            f"peer speaks ringlet authentication version {magic[-1]}, this process"
            f" version {MAGIC[-1]}; run the same ringlet version everywhere"
        )
    raise AuthenticationError(
        "peer did not answer with the ringlet handshake; it is not a ringlet process"
        " (check the host and port)"
    )


def _check_job(own: bytes, peer: bytes) -> None:
    if own != peer:
        raise JobMismatchError(
            f"job mismatch: this process belongs to job {_job_name(own)} but the peer to job"
            f" {_job_name(peer)}; two jobs share the master address and port (give each job its"
            " own --master port), or the ranks were started with different job ids"
        )


_BAD_PROOF = (
    "peer failed to prove it knows the job secret (wrong RINGLET_SECRET, or a process from"
    " another job)"
)


class AcceptorHandshake:
    """The acceptor's side of the exchange as a state machine, for a non-blocking server.

    Feed it what the socket delivers (:meth:`received`, at most :meth:`wanted` bytes at a time, so
    the memory a connection can make us hold before it authenticates is this object plus under
    200 bytes) and send what :attr:`outgoing` holds. When :attr:`done`, :attr:`extra` holds the
    ``extra`` fixed bytes the initiator sent after authenticating (e.g. its rank).
    """

    def __init__(self, secret: bytes, *, context: bytes = b"", job: str = "", extra: int = 0):
        self._secret = bytes(secret)
        self._context = context
        self._job = job_field(job)
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._extra = extra
        self._buf = bytearray()
        self._stage = 0  # 0: peer's hello, 1: peer's proof, 2: extra bytes, 3: done
        self._peer_nonce = b""
        self.outgoing = bytearray(MAGIC + self._nonce + self._job)
        self.extra = b""

    @property
    def done(self) -> bool:
        """True once the peer has authenticated and sent its extra bytes."""
        return self._stage == 3

    @property
    def started(self) -> bool:
        """True once the peer has sent anything (a peer that only holds the connection has not)."""
        return self._stage > 0 or bool(self._buf)

    def wanted(self) -> int:
        """How many more bytes the current stage needs (0 when done)."""
        need = (HELLO_BYTES, MAC_BYTES, self._extra, 0)[self._stage]
        return need - len(self._buf)

    def received(self, data: bytes) -> None:
        """Take bytes from the peer; raises AuthenticationError when they prove it is not one of us."""
        if len(data) > self.wanted():
            raise AuthenticationError("peer sent more than the handshake allows")
        self._buf += data
        if self._stage == 0 and len(self._buf) >= len(MAGIC):
            _check_magic(bytes(self._buf[: len(MAGIC)]))
        while self._stage < 3 and self.wanted() == 0:
            self._advance(bytes(self._buf))
            self._buf.clear()

    def _advance(self, part: bytes) -> None:
        if self._stage == 0:
            _check_job(self._job, part[len(MAGIC) + NONCE_BYTES :])
            self._peer_nonce = part[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        elif self._stage == 1:
            expected = _proof(
                self._secret, _INITIATOR_ROLE, self._context, self._job, self._nonce,
                self._peer_nonce,
            )  # fmt: skip
            if not hmac.compare_digest(part, expected):
                raise AuthenticationError(_BAD_PROOF)
            self.outgoing += _proof(
                self._secret, _ACCEPTOR_ROLE, self._context, self._job, self._peer_nonce,
                self._nonce,
            )  # fmt: skip
        else:
            self.extra = part
        self._stage += 1


def _recv_exact(sock: socket.socket, nbytes: int, deadline: float, what: str) -> bytes:
    """Read exactly ``nbytes`` (a constant of this protocol) before ``deadline``."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AuthenticationError(f"authentication timed out waiting for the peer's {what}")
        sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise AuthenticationError(
                f"authentication timed out waiting for the peer's {what}"
            ) from None
        except OSError as exc:
            raise AuthenticationError(
                f"connection failed during authentication while reading the peer's {what}: {exc}"
            ) from exc
        if n == 0:
            raise AuthenticationError(
                f"peer closed the connection during authentication (after {got} of {nbytes} bytes"
                f" of its {what}); it probably uses a different secret, belongs to another job, is"
                " overloaded, or is not a ringlet process"
            )
        got += n
    return bytes(buf)


def _send_all(sock: socket.socket, data: bytes, deadline: float, what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AuthenticationError(f"authentication timed out before sending our {what}")
    sock.settimeout(remaining)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise AuthenticationError(f"authentication timed out sending our {what}") from None
    except OSError as exc:
        raise AuthenticationError(
            f"connection failed during authentication while sending our {what} ({exc}); the peer"
            " closed or reset it"
        ) from exc


def authenticate(
    sock: socket.socket,
    secret: bytes,
    *,
    initiator: bool,
    timeout: float,
    context: bytes = b"",
    job: str = "",
) -> None:
    """Prove to the peer that we know ``secret`` and check that it does too; return on success.

    ``initiator`` is True on the side that connected and False on the side that accepted; the two
    ends must disagree. ``context`` (e.g. the service name) and ``job`` (the job id) must be equal
    on both ends. The whole exchange must finish within ``timeout`` seconds. The socket's previous
    timeout is restored.

    Raises JobMismatchError when the peer names another job; AuthenticationError on a wrong secret,
    wrong magic or version, a closed connection or a timeout; the caller should then close the
    socket and act on nothing the peer sent.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    if timeout <= 0:
        raise ValueError(f"authentication timeout must be positive, got {timeout}")
    secret = bytes(secret)
    deadline = time.monotonic() + timeout
    previous_timeout = sock.gettimeout()
    own_role, peer_role = (
        (_INITIATOR_ROLE, _ACCEPTOR_ROLE) if initiator else (_ACCEPTOR_ROLE, _INITIATOR_ROLE)
    )
    own_job = job_field(job)
    own_nonce = secrets.token_bytes(NONCE_BYTES)
    try:
        _send_all(sock, MAGIC + own_nonce + own_job, deadline, "hello")
        _check_magic(_recv_exact(sock, len(MAGIC), deadline, "hello"))
        rest = _recv_exact(sock, HELLO_BYTES - len(MAGIC), deadline, "hello")
        peer_nonce, peer_job = rest[:NONCE_BYTES], rest[NONCE_BYTES:]
        _check_job(own_job, peer_job)
        own_proof = _proof(secret, own_role, context, own_job, peer_nonce, own_nonce)
        expected_peer_proof = _proof(secret, peer_role, context, own_job, own_nonce, peer_nonce)
        if initiator:
            _send_all(sock, own_proof, deadline, "proof")
        peer_proof = _recv_exact(sock, MAC_BYTES, deadline, "proof")
        if not hmac.compare_digest(peer_proof, expected_peer_proof):
            raise AuthenticationError(_BAD_PROOF)
        if not initiator:
            _send_all(sock, own_proof, deadline, "proof")
    finally:
        try:
            sock.settimeout(previous_timeout)
        except OSError:
            pass  # the socket was closed under us; the error above says why
