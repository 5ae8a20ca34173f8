"""Data-parallel training over MPI: runtime, communicators, DataParallel, SyncBatchNorm."""

from distprop.parallel.communicator import Communicator, MPICommunicator, SingleProcessCommunicator
from distprop.parallel.data_parallel import DataParallel, ModelMismatchError
from distprop.parallel.helpers import average_metrics, broadcast_state, clip_grad_norm_, sum_metrics
from distprop.parallel.runtime import current, init
from distprop.parallel.sync_batchnorm import SyncBatchNorm
