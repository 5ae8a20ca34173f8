"""Ring allreduce of host arrays over MPI point-to-point messages.

MPI libraries choose an allreduce algorithm by message size and rank count. For
large messages on a rank count that is not a power of two, Open MPI (as measured
below) and MPICH (Thakur, Rabenseifner & Gropp 2005) use recursive halving and
doubling: the ranks beyond the largest power of two p' first hand their whole
buffer to a partner and get the result back at the end, so the busiest links
carry 2 + 2(p'-1)/p' buffers where a ring carries 2(p-1)/p (on 3 ranks 3.0
against 1.33). Measured between 3 hosts over TCP (network namespaces,
links shaped to 1 Gb/s), a 7.45 MB allreduce took 273 ms through Open MPI's choice
and 103 ms as this ring (1.86 MB: 64 and 34 ms; at 10 Gb/s, 7.45 MB: 55 and 33 ms);
on 2 hosts the two took the same time. On a power of two the library's choice has
the ring's bandwidth with fewer steps, and small messages are latency, not
bandwidth: both stay with MPI (`prefers_ring`). The cost model
(distprop.scaling.allreduce) prices the same choice.

The ring: the buffer is cut into p chunks; in p-1 steps each rank passes a chunk
to its right neighbour and adds the one from its left (reduce-scatter), then in
p-1 more passes the summed chunks on (allgather). Each chunk is summed once, in
one order, and copied: every rank ends with bitwise the same values.
"""

from __future__ import annotations

import os

import numpy as np

# Below this many bytes per chunk the ring's 2(p-1) steps cost more in latency than
# it saves in bandwidth: 256 KiB takes about a TCP message's latency (~25 us) on
# 100 Gb/s Ethernet, and ten times that on 10 Gb/s.
MIN_CHUNK_BYTES = 256 * 1024
# 0 keeps every sum with the MPI library (whose collectives may be offloaded to the
# network, e.g. SHARP, or tuned for the machine); 1, the default, lets
# `prefers_ring` choose. Read when a communicator is made, agreed by its ranks.
VARIABLE = "DISTPROP_ALLREDUCE_RING"
# Messages of the ring, apart from any other point-to-point traffic on the
# communicator; below 32767, the least upper bound on tags that MPI guarantees.
TAG = 29_269


def ring_allowed() -> bool:
    """This process's $DISTPROP_ALLREDUCE_RING (see VARIABLE)."""
    text = os.environ.get(VARIABLE, "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"${VARIABLE} must be 1 (distprop's ring where it pays, the default) or 0 (MPI's "
                         f"allreduce only), got {text!r}")
    return text != "0"


def prefers_ring(size: int, nbytes: int) -> bool:
    """Whether the ring beats the MPI library's choice for a sum of `nbytes` over
    `size` ranks: 3 or more ranks that are not a power of two, and chunks of at least
    MIN_CHUNK_BYTES."""
    return size >= 3 and size & (size - 1) != 0 and nbytes // size >= MIN_CHUNK_BYTES


def takes_ring(size: int, array: np.ndarray) -> bool:
    """Whether a sum of host `array` over `size` ranks goes round the ring: floating
    point (the gradients; MPI keeps what else it reduces), where `prefers_ring`."""
    return array.dtype.kind == "f" and prefers_ring(size, array.nbytes)


def ring_allreduce_(comm, array: np.ndarray) -> np.ndarray:
    """Sum the C-contiguous host `array` over the mpi4py communicator `comm`, in place."""
    flat = array.reshape(-1)  # a view: the array is contiguous
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        return array
    bounds = [len(flat) * i // size for i in range(size + 1)]

    def chunk(i: int) -> slice:
        i %= size
        return slice(bounds[i], bounds[i + 1])

    right, left = (rank + 1) % size, (rank - 1) % size
    incoming = np.empty(bounds[1] - bounds[0] + 1, flat.dtype)  # chunks differ by at most one element
    for step in range(size - 1):  # after it, chunk rank+1 holds the sum over all ranks here
        send, receive = chunk(rank - step), chunk(rank - step - 1)
        part = incoming[:receive.stop - receive.start]
        comm.Sendrecv(flat[send], dest=right, sendtag=TAG, recvbuf=part, source=left, recvtag=TAG)
        flat[receive] += part
    for step in range(size - 1):
        send, receive = chunk(rank + 1 - step), chunk(rank - step)
        comm.Sendrecv(flat[send], dest=right, sendtag=TAG, recvbuf=flat[receive], source=left, recvtag=TAG)
    return array


def sum_in_place(comm, array: np.ndarray, MPI, ring: bool = True) -> None:
    """Sum `array` over `comm` in place, by the ring (where `ring` and `takes_ring`) or
    by MPI_Allreduce."""
    if ring and takes_ring(comm.Get_size(), array):
        ring_allreduce_(comm, array)
    else:
        comm.Allreduce(MPI.IN_PLACE, array)  # MPI_SUM, the default
