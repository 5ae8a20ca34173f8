"""Rank 1 raises while the others wait in a collective: the job must end promptly."""
import numpy as np

import distprop as dp

comm = dp.init()
comm.barrier()
if comm.rank == 1:
    raise ValueError("deliberate failure on rank 1")
comm.allreduce_(np.ones(4))  # the other ranks would wait here forever
