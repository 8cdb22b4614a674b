"""Mutual HMAC-SHA256 challenge-response: both ends of a connection prove they know the job secret.

The exchange, on a connected blocking socket (``I`` = initiator, ``A`` = acceptor)::

    I -> A   HELLO = MAGIC (8 bytes, carries the version) + nonce_I (32 bytes)
    A -> I   HELLO = MAGIC + nonce_A                      (sent at once, without waiting)
    I -> A   HMAC(secret, LABEL + b"I" + context + nonce_A + nonce_I)
    A -> I   HMAC(secret, LABEL + b"A" + context + nonce_I + nonce_A)   only if I's proof was good

The roles are inside the MAC, so an answer reflected back at its author never verifies, and the
acceptor proves nothing to a peer that has not proved itself first. Every read has a fixed size:
nothing the peer sends decides how much is allocated or read. The secret never crosses the wire.
This authenticates a connection; it does not encrypt it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time

from ringlet.errors import AuthenticationError

MAGIC = b"RINGLET\x01"  # the last byte is the protocol version
LABEL = b"ringlet-auth-v1"
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
_INITIATOR_ROLE = b"I"
_ACCEPTOR_ROLE = b"A"


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


def _proof(secret: bytes, role: bytes, context: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, LABEL + role + context + first + second, hashlib.sha256).digest()


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
                f" of its {what}); it probably uses a different secret or is not a ringlet process"
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
    sock: socket.socket, secret: bytes, *, initiator: bool, timeout: float, context: bytes = b""
) -> None:
    """Prove to the peer that we know ``secret`` and check that it does too; return on success.

    ``initiator`` is True on the side that connected and False on the side that accepted; the two
    ends must disagree. ``context`` (e.g. the service name) must be equal on both ends. The whole
    exchange must finish within ``timeout`` seconds. The socket's previous timeout is restored.

    Raises AuthenticationError on a wrong secret, wrong magic or version, a closed connection or a
    timeout; the caller should then close the socket and act on nothing the peer sent.
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
    own_nonce = secrets.token_bytes(NONCE_BYTES)
    try:
        _send_all(sock, MAGIC + own_nonce, deadline, "hello")
        hello = _recv_exact(sock, len(MAGIC) + NONCE_BYTES, deadline, "hello")
        magic, peer_nonce = hello[: len(MAGIC)], hello[len(MAGIC) :]
        if magic != MAGIC:
            if magic[:-1] == MAGIC[:-1]:
                raise AuthenticationError(
                    f"peer speaks ringlet authentication version {magic[-1]}, this process"
                    f" version {MAGIC[-1]}; run the same ringlet version everywhere"
                )
            raise AuthenticationError(
                "peer did not answer with the ringlet handshake; it is not a ringlet process"
                " (check the host and port)"
            )
        own_proof = _proof(secret, own_role, context, peer_nonce, own_nonce)
        expected_peer_proof = _proof(secret, peer_role, context, own_nonce, peer_nonce)
        if initiator:
            _send_all(sock, own_proof, deadline, "proof")
        peer_proof = _recv_exact(sock, MAC_BYTES, deadline, "proof")
        if not hmac.compare_digest(peer_proof, expected_peer_proof):
            raise AuthenticationError(
                "peer failed to prove it knows the job secret (wrong RINGLET_SECRET, or a"
                " process from another job)"
            )
        if not initiator:
            _send_all(sock, own_proof, deadline, "proof")
    finally:
        try:
            sock.settimeout(previous_timeout)
        except OSError:
            pass  # the socket was closed under us; the error above says why
