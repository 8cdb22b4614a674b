"""reduce_scatter (each rank gets its slice of the sum) and all_to_all (a distributed transpose).

Run: ringlet run -n 3 examples/reduce_scatter_all_to_all.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    n, me = comm.size, comm.rank
    grads = np.arange(2 * n, dtype=np.float64) + me  # rank r: [r, r+1, …]
    shard = comm.reduce_scatter(grads, op="sum")  # rank i: sum over ranks of elements [2i, 2i+2)
    assert np.array_equal(shard, (np.arange(2 * n) * n + n * (n - 1) / 2)[2 * me : 2 * me + 2])
    row = np.arange(n) + 10 * me  # rank i holds row i of a matrix
    col = comm.all_to_all(row)  # rank i now holds column i
    assert col.tolist() == [me + 10 * r for r in range(n)]
    print(f"rank {me}: shard {shard.tolist()}, column {col.tolist()}")
