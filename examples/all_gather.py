"""all_gather: every rank gets every rank's rows (a global batch), first dimensions may differ.

Run: ringlet run -n 3 examples/all_gather.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    mine = np.full((comm.rank + 1, 2), comm.rank, dtype=np.int64)
    everyone = comm.all_gather(mine)
    expected = np.concatenate([np.full((r + 1, 2), r) for r in range(comm.size)])
    assert np.array_equal(everyone, expected)
    print(f"rank {comm.rank}: global batch of {everyone.shape[0]} rows, ranks {everyone[:, 0].tolist()}")
