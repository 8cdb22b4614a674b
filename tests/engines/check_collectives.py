"""One rank of a job an MPI launcher started (run as a script, not collected by pytest).

``ringlet.init()`` from whatever the launcher set, all_reduce and all_gather checked against NumPy,
then one ``RESULT {"rank", "size", "host"}`` line. LATE_RANK=r makes rank r come to init() a
minute late (Hydra's PMI_RANK, or PMI_ID under ``mpiexec -pmi-port``), so that the others give up.
"""

import json
import os
import socket
import time

import numpy as np

import ringlet

late = os.environ.get("LATE_RANK")
if late is not None and late == (os.environ.get("PMI_RANK") or os.environ.get("PMI_ID")):
    time.sleep(60)  # this rank comes to init() long after the others gave up
comm = ringlet.init()
r, n = comm.rank, comm.size
table = np.arange(n * 1000, dtype=np.float64).reshape(n, 1000) * 0.5  # alike on every rank
x = table[r].copy()
comm.all_reduce(x)
assert (x == table.sum(axis=0)).all(), "all_reduce"
got = comm.all_gather(np.full(2, r, dtype=np.int32))
assert (got == np.repeat(np.arange(n), 2)).all(), "all_gather"
pmi_port = "PMI_PORT" in os.environ and "PMI_RANK" not in os.environ  # mpiexec -pmi-port
result = {"rank": r, "size": n, "host": socket.gethostname(), "pmi_port": pmi_port}
print("RESULT " + json.dumps(result), flush=True)
comm.close()
