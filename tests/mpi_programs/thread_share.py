"""Print what init() decided about this rank's threads, and what it had to go on."""
import os

from threadpoolctl import threadpool_info

import distprop as dp

comm = dp.init()
blas = [entry["num_threads"] for entry in threadpool_info() if entry["user_api"] == "blas"]
print(f"rank {comm.rank} local_size {comm.local_size} blas {blas[0]} "
      f"allowed {len(os.sched_getaffinity(0))} cores {os.cpu_count()}", flush=True)
