"""Starting jobs: `distprop launch` and the pieces it is built from.

mpi      which mpiexec, Open MPI or MPICH
hosts    hostfiles and host lists, in either MPI's syntax
slurm    a Slurm allocation's nodes, and whether srun speaks PMIx
node     this machine's cores and GPUs
command  the mpiexec / srun command line for a job
plan     the decisions between a request and its command line
process  running it: signals passed on, nothing left running if we are killed
check    the preflight program each rank runs (`--check`)
cli      the `distprop launch` command
"""

from distprop.launcher.mpi import find_mpiexec, is_open_mpi, job_environment, mpiexec_command

__all__ = ["find_mpiexec", "is_open_mpi", "job_environment", "mpiexec_command"]
