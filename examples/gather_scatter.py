"""scatter hands out a batch from rank 0; each rank works on its part; gather collects the results.

Parts may differ in length: gather concatenates along axis 0 in rank order.
Run: ringlet run -n 3 examples/gather_scatter.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    batch = np.arange(4 * comm.size, dtype=np.float32).reshape(-1, 2) if comm.rank == 0 else None
    part = comm.scatter(batch, root=0)  # rank i gets rows [2i, 2i+2)
    outputs = np.tile(part.sum(axis=1), (comm.rank + 1, 1))  # uneven: rank i returns i+1 rows
    collected = comm.gather(outputs, root=0)
    if comm.rank == 0:
        assert collected.shape[0] == sum(r + 1 for r in range(comm.size))
        print(f"rank 0 gathered {collected.shape[0]} rows:\n{collected}")
