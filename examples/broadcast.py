"""Rank 0 decides the parameters; broadcast gives every rank the same copy, in place.

Run: ringlet run -n 3 examples/broadcast.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    params = np.random.default_rng(0).standard_normal(5) if comm.rank == 0 else np.empty(5)
    comm.broadcast(params, root=0)
    same = comm.all_gather(params[None, :])  # every rank's copy, one row each
    assert (same == same[0]).all()
    print(f"rank {comm.rank}: params[:3] = {params[:3].round(3).tolist()} (identical on all ranks)")
