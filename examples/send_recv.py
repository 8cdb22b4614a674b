"""A pipeline: rank 0 produces, each rank transforms and passes on with send/recv.

Run: ringlet run -n 3 examples/send_recv.py
"""

import numpy as np

import ringlet

with ringlet.init() as comm:
    # rank 0 produces; the others receive from the previous rank (recv allocates the array)
    x = np.arange(4, dtype=np.float32) if comm.rank == 0 else comm.recv(None, src=comm.rank - 1, tag=7)
    x = x * 2
    if comm.rank + 1 < comm.size:
        comm.send(x, dst=comm.rank + 1, tag=7)
    else:
        assert np.array_equal(x, np.arange(4) * 2**comm.size)
        print(f"rank {comm.rank}: pipeline output {x.tolist()}")
    comm.barrier()
