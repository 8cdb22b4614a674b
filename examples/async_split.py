"""Asynchronous all_reduce overlapping local compute, and split into sub-communicators.

Run: ringlet run -n 4 examples/async_split.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    grads = np.ones(1_000_000, np.float32) * comm.rank
    work = comm.all_reduce(grads, op="mean", async_op=True)  # runs on the progress thread
    local = np.tanh(np.random.default_rng(comm.rank).standard_normal((300, 300))).sum()  # meanwhile
    work.wait()
    assert np.allclose(grads, (comm.size - 1) / 2)
    row = comm.split(color=comm.rank // 2, key=comm.rank)  # pairs: {0,1}, {2,3}, …
    assert row is not None
    pair_sum = row.all_reduce(np.array([comm.rank]))[0]
    print(f"rank {comm.rank}: mean grad {grads[0]}, in pair {comm.rank // 2} as rank {row.rank}, "
          f"pair sum {pair_sum}, local {local:.1f}")
