"""Where the job secret comes from when no ``RINGLET_SECRET`` is given.

The secret keys every handshake (:mod:`ringlet.auth`); whoever knows it can join the job, forge
errors and make ranks unpickle what it sends. So it is never derived from public facts (ports, job
ids, host names: any local user reads those with ``ss`` or ``ps``). Instead:

- ``RINGLET_SECRET_FILE``: a file only this user can read (checked like ssh checks its keys), for
  example on a filesystem every host mounts. :func:`read_secret_file`.
- one host, nothing given: rank 0 makes 32 random bytes and publishes them in a file in a private
  per-user directory (``$XDG_RUNTIME_DIR/ringlet`` or ``<tmp>/ringlet-<uid>``, mode 0700, owned
  by us, no symlinks), named after a digest of the job's id and master address; the other ranks,
  all on this host, read it. :class:`LocalSecret`.
- several hosts, nothing given: refuse to start, saying how to pass a secret (:func:`refusal`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import stat
import tempfile
import time
from pathlib import Path

from ringlet.auth import secret_from_str
from ringlet.errors import RingletError

MAX_SECRET_FILE_BYTES = 4096
_POLL = 0.02


class SecretError(RingletError):
    """No usable secret: a secret file that others can read, a hijacked directory, several hosts."""


def _check_private(st: os.stat_result, what: str, fix: str) -> None:
    """Raise SecretError unless ``st`` belongs to this user and no one else may read or write it."""
    if st.st_uid != os.geteuid():
        raise SecretError(
            f"{what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); another"
            f" user may be trying to read or plant ringlet secrets. {fix}"
        )
    if st.st_mode & 0o077:
        raise SecretError(
            f"{what} has mode {stat.filemode(st.st_mode)}: other users may read it. {fix}"
        )


def read_secret_file(path: str) -> bytes:
    """The secret held in ``path`` (RINGLET_SECRET_FILE), surrounding whitespace stripped.

    Raises SecretError if the file is not ours, is readable by group or others, is empty, or is
    over 4 KiB; OSError if it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SecretError(f"RINGLET_SECRET_FILE={path!r} cannot be read: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        _check_private(
            os.fstat(f.fileno()),
            f"RINGLET_SECRET_FILE={path!r}",
            f"Run `chmod 600 {path}` as its owner.",
        )
        data = f.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretError(f"RINGLET_SECRET_FILE={path!r} is over {MAX_SECRET_FILE_BYTES} bytes")
    try:
        return secret_from_str(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SecretError(f"RINGLET_SECRET_FILE={path!r} holds no usable secret: {exc}") from exc


def private_dir() -> Path:
    """This user's 0700 directory for generated secrets, created if missing; checked every time.

    ``$XDG_RUNTIME_DIR/ringlet`` when XDG_RUNTIME_DIR is ours and private, else
    ``<tempdir>/ringlet-<uid>``. Raises SecretError if the directory is a symlink, is not ours or
    is open to others (someone may have made it first to catch our secrets).
    """
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    path = Path(tempfile.gettempdir()) / f"ringlet-{os.geteuid()}"
    if base:
        with contextlib.suppress(OSError):
            st = os.stat(base)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                path = Path(base) / "ringlet"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    fix = f"Remove {path} (it is not ringlet's) or set RINGLET_SECRET on every rank."
    if not stat.S_ISDIR(st.st_mode):
        raise SecretError(f"{path} is not a directory (a symlink?). {fix}")
    _check_private(st, str(path), fix)
    return path


class LocalSecret:
    """A secret for a job on one host, shared through a private file named after the job.

    ``job`` identifies the job to every rank alike (the launcher's job id and the master address):
    it picks the file, it is not the secret.
    """

    def __init__(self, job: str) -> None:
        digest = hashlib.sha256(f"ringlet-local-secret\0{job}".encode()).hexdigest()[:32]
        self.path = private_dir() / f"secret-{digest}"

    def create(self) -> bytes:
        """A fresh random secret, not yet published (rank 0 binds the store first)."""
        return secrets.token_hex(32).encode("ascii")

    def publish(self, secret: bytes) -> None:
        """Write ``secret`` to the file atomically (0600, O_EXCL, O_NOFOLLOW), replacing any old one."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secret + b"\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read(self, deadline: float, previous: bytes | None = None) -> bytes:
        """The published secret, waiting until ``deadline`` for rank 0 to write one != ``previous``.

        Raises SecretError if the file is not private or never appears in time.
        """
        while True:
            secret = self._try_read()
            if secret is not None and secret != previous:
                return secret
            if time.monotonic() >= deadline:
                what = "a new secret" if secret is not None else "the job secret"
                raise SecretError(
                    f"rank 0 did not publish {what} in {self.path} in time; is rank 0 running on"
                    " this host as this user? (set RINGLET_SECRET on every rank to skip this)"
                )
            time.sleep(_POLL)

    def _try_read(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            _check_private(os.fstat(f.fileno()), str(self.path), f"Remove {self.path}.")
            data = f.read(MAX_SECRET_FILE_BYTES).strip()
        return data or None

    def remove(self, secret: bytes) -> None:
        """Delete the file if it still holds ``secret`` (a later job may have replaced it)."""
        with contextlib.suppress(OSError):
            if self._try_read() == secret:
                os.unlink(self.path)


def is_local_address(host: str) -> bool:
    """True if ``host`` names an address of this machine (a socket can bind to it)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        with contextlib.suppress(OSError), socket.socket(family, kind, proto) as probe:
            probe.bind((address[0], 0, *address[2:]))
            return True
    return False


def refusal(source: str, world_size: int, local_size: int | None, master: str) -> SecretError:
    """The error for a job that spans hosts (or may) and was given no secret."""
    where = (
        f"{local_size} of {world_size} ranks on this host"
        if local_size is not None and local_size != world_size
        else f"the master {master} is not an address of this host"
    )
    return SecretError(
        f"ringlet.init(): no secret for a job that spans hosts (started by {source}; {where})."
        " Without one, any user who can reach the ports could join the job and run code in it."
        " Give every rank the same secret: export RINGLET_SECRET=$(python -c 'import secrets;"
        " print(secrets.token_hex(32))') before launching (srun, mpirun -x RINGLET_SECRET and"
        " torchrun pass the environment on), or point RINGLET_SECRET_FILE at a file only you can"
        " read (chmod 600) on a filesystem every host mounts, or launch with `ringlet run`, which"
        " makes one for you."
    )
