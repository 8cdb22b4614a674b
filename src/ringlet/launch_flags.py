"""`ringlet run`'s command line: ringlet's flags, torchrun's spellings of them, Kubeflow's PET_*.

Scripts and job specs written for torchrun pass `--nproc_per_node`, `--rdzv_endpoint`, `--nnodes
M:M` and friends, and Kubeflow's PyTorchJob sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT instead of flags. This module declares every spelling and
turns what was given (flag first, else the PET_* variable) into plain values, refusing what
ringlet run cannot honour (an elastic --nnodes range, a master without a port), so that
`ringlet.launch` sees only the numbers and the address it needs.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(run: argparse.ArgumentParser) -> None:
    """`ringlet run`'s options, in ringlet's and in torchrun's spellings (both `-` and `_`)."""
    run.add_argument(
        "-n", "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", metavar="N",
        help="ranks to start on this node; the job has --nnodes x N ranks, so on one node -n is"
        " the number of ranks, as in `ringlet bench -n` (default: PET_NPROC_PER_NODE)",
    )  # fmt: skip
    run.add_argument("--nnodes", metavar="M", help="nodes in the job: M, or torchrun's M:M"
                     " (default: PET_NNODES, else 1)")  # fmt: skip
    run.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, metavar="K",
                     help="this node's index, 0…M-1 (default: PET_NODE_RANK, else 0)")  # fmt: skip
    run.add_argument(
        "--master", metavar="HOST:PORT",
        help="the same as --master-addr HOST --master-port PORT",
    )  # fmt: skip
    run.add_argument("--master-addr", "--master_addr", dest="master_addr", metavar="HOST",
                     help="node 0's address, reachable from every node (PET_MASTER_ADDR)")  # fmt: skip
    run.add_argument("--master-port", "--master_port", dest="master_port", type=int,
                     metavar="PORT", help="torch's MASTER_PORT; ringlet's store takes the next one"
                     " (PET_MASTER_PORT; one node: a free port)")  # fmt: skip
    run.add_argument("--store-port", dest="store_port", type=int, metavar="PORT",
                     help="the port of ringlet's own store (default MASTER_PORT + 1)")  # fmt: skip
    run.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint",
                     metavar="HOST:PORT", help="torchrun's spelling of --master")  # fmt: skip
    run.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", metavar="ID",
                     help="the job's id, alike on every node (sets RINGLET_JOB_ID)")  # fmt: skip
    run.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend",
                     choices=["static", "c10d"], help="accepted for torchrun's command lines; the"
                     " rendezvous is always ringlet's static one")  # fmt: skip
    run.add_argument("--standalone", action="store_true",
                     help="one node, free ports (the default without --nnodes)")  # fmt: skip
    run.add_argument(
        "--no-prefix",
        dest="prefix",
        action="store_false",
        help="do not prefix each output line with [rRANK]",
    )
    run.add_argument(
        "--quiet-others", "--quiet_others", dest="quiet_others", action="store_true",
        help="show the first failure's traceback in full and one line for each rank that failed"
        " because of it (PeerError, CollectiveTimeout, ...) or with the same traceback",
    )  # fmt: skip
    run.add_argument(
        "--grace",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="after a failure or a signal, how long ranks get to finish, and again to exit "
        "after SIGTERM before SIGKILL (3.0)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long any blocking call may wait (sets RINGLET_TIMEOUT)",
    )
    run.add_argument(
        "--secret",
        help="the job's shared secret (default: RINGLET_SECRET, else a fresh one on one node); "
        "prefer RINGLET_SECRET, which other users cannot see in the process list",
    )
    run.add_argument("--transport", help="transport to use (sets RINGLET_TRANSPORT)")
    run.add_argument(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=int,
        default=0,
        metavar="N",
        help="restart a rank that fails by itself up to N times, alone (not rank 0, which hosts "
        "the store); it starts with RINGLET_RESTART_COUNT=k and rejoins the running job through "
        "ringlet.survive.init_or_rejoin() (0)",
    )
    run.add_argument(
        "command", nargs=argparse.REMAINDER, help="script.py and its arguments, or a command"
    )


def int_option(value: object, flag: str, pet: str) -> int | None:
    """The flag's value, else the PET_* variable Kubeflow sets, as an int; None if neither."""
    text = os.environ.get(pet, "").strip() if value is None else str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        source = pet if value is None else flag
        raise ValueError(f"ringlet run: {source}={text!r} is not an integer") from None


def nnodes_option(value: str | None) -> int:
    """--nnodes (or PET_NNODES) as a count: "M" or torchrun's "M:M"; an elastic range is refused."""
    text = (value if value is not None else os.environ.get("PET_NNODES", "")).strip() or "1"
    low, _, high = text.partition(":")
    if not low.isdigit() or (high and not high.isdigit()):
        raise ValueError(f"ringlet run: --nnodes must be M or M:M, got {text!r}")
    if high and int(high) != int(low):
        raise ValueError(
            f"ringlet run: --nnodes {text} is an elastic range; ringlet run starts a fixed number"
            " of nodes. Start elastic jobs with torchrun: ringlet.init() works under it (each"
            " restart is a new job)"
        )
    return int(low)


def master_option(args: argparse.Namespace) -> str | None:
    """torch's master as host:port from --master, --rdzv-endpoint, --master-addr/-port or PET_*."""
    addr = args.master_addr or os.environ.get("PET_MASTER_ADDR", "").strip() or None
    port = int_option(args.master_port, "--master-port", "PET_MASTER_PORT")
    endpoint = args.master or args.rdzv_endpoint
    if endpoint is not None:
        if args.master_addr or args.master_port is not None:
            raise ValueError("ringlet run: give --master (or --rdzv-endpoint) or"
                             " --master-addr/--master-port, not both")  # fmt: skip
        return str(endpoint)
    if addr is None and port is None:
        return None
    if addr is None or port is None:
        raise ValueError(
            f"ringlet run: the master needs both an address and a port; got"
            f" --master-addr {addr} --master-port {port} (PET_MASTER_ADDR/PET_MASTER_PORT count)"
        )
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
