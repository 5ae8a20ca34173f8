"""Rank 1 is busy elsewhere (not in MPI) while rank 0 waits in an allreduce: the
watchdog must abort the job and say what each rank was doing."""
import time

import numpy as np

import distprop as dp

comm = dp.init(watchdog_timeout=2)
comm.allreduce_(np.ones(3))  # one collective that completes everywhere
if comm.rank == 1:
    time.sleep(120)
comm.allreduce_(np.ones(5))
