"""The body of one data worker process (``python -m distprop.data.worker_process``).

Started by `distprop.data.worker_pool` with two inherited file descriptors: one
end of a socket pair for small messages (task descriptions in, "done"/"error"
replies out) and the shared batch slots. It reads the blocks its batches need
itself (keeping a few decoded), builds each batch straight into its slot, and
replies. It ignores Ctrl-C (the loader stops it) and exits on its own when the
loader's process is gone, so none is ever left behind.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import OrderedDict
from multiprocessing.connection import Connection

import numpy as np

from distprop.data.batch import BatchBuilder, BatchRows, prepare_block, prepare_head
from distprop.data.reader import BlockReader
from distprop.data.shared_slots import SharedSlots
from distprop.errors import UserError

_PARENT_CHECK_S = 1.0


def serve(connection: Connection, slots_fd: int, parent: int) -> None:
    setup = connection.recv()
    spec, cache_blocks = setup["spec"], setup["cache_blocks"]
    offsets, outputs = setup["offsets"], spec.outputs
    slots = SharedSlots(setup["slots"], setup["slot_bytes"], fd=slots_fd)
    reader = BlockReader(spec.index, spec.read_columns, lambda table, block: prepare_block(spec, table, block))
    cache: OrderedDict[int, dict] = OrderedDict()
    heads: OrderedDict[int, dict] = OrderedDict()  # the first tokens of blocks (packed)

    def block_of(block: int) -> dict:
        if block in cache:
            cache.move_to_end(block)
            return cache[block]
        prepared = cache[block] = reader.read(block)
        if len(cache) > cache_blocks:
            cache.popitem(last=False)
        return prepared

    def head_of(block: int) -> dict:  # packed tokens: a block that windows run on into
        if block in cache:
            return cache[block]
        head = heads.get(block)
        if head is None:
            head = heads[block] = prepare_head(spec, reader, block)
            if len(heads) > cache_blocks:
                heads.popitem(last=False)
        return head

    builder = None
    while True:
        while not connection.poll(_PARENT_CHECK_S):
            if os.getppid() != parent:  # the loader's process died without stopping us
                return
        try:
            message = connection.recv()
        except EOFError:
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "epoch":
            builder = BatchBuilder(spec, message[1])
            cache.clear()
            heads.clear()
            continue
        _, generation, batch, slot, blocks, bounds, local = message
        rows = BatchRows(np.asarray(blocks, np.int64), np.asarray(bounds, np.int64), np.asarray(local, np.int64))
        try:
            out = slots.arrays(slot, offsets, outputs, len(rows))
            result = builder.build(rows, block_of, out, head_of)
            del out
            reply = ("done", generation, batch, slot, result.size, result.skipped)
        except UserError as error:
            reply = ("error", generation, batch, slot, type(error).__name__, str(error), True)
        except Exception as error:  # reported, with its type, in the loader's process
            reply = ("error", generation, batch, slot, type(error).__name__, str(error), False)
        connection.send(reply)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the loader, which stops the workers
    connection_fd, slots_fd, parent = (int(a) for a in argv)
    connection = Connection(connection_fd)
    try:
        serve(connection, slots_fd, parent)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the loader went away
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
