"""Linux cross-memory attach: copy straight between two processes' memory with one kernel copy.

process_vm_readv / process_vm_writev (through ctypes from libc) move bytes between this process and
a peer's address space, given the peer's pid and a virtual address it published. The kernel checks
ptrace access: same user, and under Yama's ptrace_scope=1 the target must have allowed it with
prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY), which :func:`allow_peers` does. Containers may forbid
the calls (EPERM / ENOSYS); :meth:`CrossMemory.probe` finds that out once so the caller falls back.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

import numpy as np

from ringlet.errors import PeerError, RingletError

from .shm_wait import process_start_time

_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1 & 0xFFFFFFFFFFFFFFFF)
_YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def enabled() -> bool:
    """False when RINGLET_SHM_CMA is 0, false or no: never copy between ranks' memory directly."""
    return os.environ.get("RINGLET_SHM_CMA", "1").lower() not in ("0", "false", "no")


def allow_peers() -> None:
    """Under Yama ptrace_scope 1, let processes of this user read this one's memory.

    This widens, for the life of the process, who may ptrace it to any process of the same user
    (what scope 0 allows everywhere anyway). Nothing happens when Yama is absent or stricter.
    """
    try:
        with open(_YAMA_SCOPE) as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if scope == 1:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)


class CrossMemory:
    """Reads and writes other processes' memory by (pid, address)."""

    def __init__(self, rank: int, pids: list[int]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._readv = libc.process_vm_readv
        self._writev = libc.process_vm_writev
        for fn in (self._readv, self._writev):
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [
                ctypes.c_int,
                ctypes.POINTER(_Iovec),
                ctypes.c_ulong,
                ctypes.POINTER(_Iovec),
                ctypes.c_ulong,
                ctypes.c_ulong,
            ]
        self.rank = rank
        self.pids = pids
        self._local = _Iovec()
        self._remote = _Iovec()

    def probe(self, peer: int, address: int, nbytes: int) -> str | None:
        """Try reading ``nbytes`` at ``address`` in ``peer``; None if it works, else why not."""
        scratch = np.empty(nbytes, np.uint8)
        try:
            self.read(peer, address, scratch)
        except OSError as exc:
            return f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"
        except RingletError as exc:
            return str(exc)
        return None

    def read(self, peer: int, address: int, into: np.ndarray) -> None:
        """Copy ``into.nbytes`` bytes from ``address`` in ``peer``'s memory into ``into``."""
        self._move(self._readv, peer, into.ctypes.data, address, into.nbytes)

    def write(self, peer: int, address: int, data: np.ndarray) -> None:
        """Copy ``data`` to ``address`` in ``peer``'s memory."""
        self._move(self._writev, peer, data.ctypes.data, address, data.nbytes)

    def _move(self, fn: Any, peer: int, local: int, remote: int, nbytes: int) -> None:
        done = 0
        lo, re = self._local, self._remote
        while done < nbytes:
            lo.base, lo.len = local + done, nbytes - done
            re.base, re.len = remote + done, nbytes - done
            n = fn(self.pids[peer], ctypes.byref(lo), 1, ctypes.byref(re), 1, 0)
            if n > 0:
                done += n  # a partial transfer stops at a page boundary; carry on from there
                continue
            err = ctypes.get_errno()
            if n < 0 and err == errno.EINTR:
                continue
            if (n < 0 and err == errno.ESRCH) or process_start_time(self.pids[peer]) is None:
                raise PeerError(
                    f"rank {self.rank}: rank {peer} (pid {self.pids[peer]}) exited during a "
                    "shared-memory copy from its memory",
                    rank=peer,
                )
            if n == 0 or err == errno.EFAULT:
                raise RingletError(
                    f"rank {self.rank}: rank {peer}'s buffer at {remote + done:#x} is not mapped "
                    "any more; was it freed or resized during the collective?"
                )
            raise OSError(
                err, f"process_vm_{'readv' if fn is self._readv else 'writev'}: {os.strerror(err)}"
            )
