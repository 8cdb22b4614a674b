"""Every rank contributes its own numbers; all_reduce sums them; each rank checks against NumPy.

Run: ringlet run -n 4 examples/all_reduce.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    mine = np.arange(8, dtype=np.float64) * (comm.rank + 1)  # rank r holds (r+1) * [0..7]
    total = comm.all_reduce(mine.copy(), op="sum")
    expected = np.arange(8, dtype=np.float64) * sum(r + 1 for r in range(comm.size))
    assert np.array_equal(total, expected), (total, expected)
    gathered = comm.all_gather(np.array([comm.rank]))
    print(
        f"rank {comm.rank}/{comm.size} (local {comm.local_rank}/{comm.local_size}): "
        f"sum = {total.tolist()}, ranks seen = {gathered.tolist()} — matches NumPy"
    )
