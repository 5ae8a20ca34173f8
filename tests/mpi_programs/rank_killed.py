"""Rank 1 is killed with SIGKILL while the others wait in a collective."""
import os
import signal

import numpy as np

import distprop as dp

comm = dp.init()
comm.barrier()
if comm.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
comm.allreduce_(np.ones(4))
