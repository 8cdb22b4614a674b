"""Each rank computes a local loss; reduce sums them on rank 0 only (others keep theirs).

Run: ringlet run -n 3 examples/reduce.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    loss = np.array([0.5 * (comm.rank + 1)])
    comm.reduce(loss, root=0, op="sum")
    if comm.rank == 0:
        expected = sum(0.5 * (r + 1) for r in range(comm.size))
        assert np.isclose(loss[0], expected)
        print(f"rank 0: total loss {loss[0]} over {comm.size} ranks")
    comm.all_reduce(np.array([comm.rank]), op="max")  # ranks keep going together
