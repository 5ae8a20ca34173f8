"""Reading one block (a Parquet row group or an IPC record batch) into numpy arrays.

A `BlockReader` keeps its files open between blocks. pyarrow's file readers are
not safe to share between threads (two threads reading row groups through one
`ParquetFile` deadlocked on the development machine), so each reader thread owns
its own `BlockReader`.
"""

from __future__ import annotations

from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from distprop.data.format import column_to_numpy
from distprop.data.index import DatasetIndex
from distprop.data.storage import first_line, open_input
from distprop.errors import DataError


class BlockReader:
    """Decodes blocks of a DatasetIndex's files into ``{column: ndarray}``.

    Reads run with pyarrow's own thread pool off (``use_threads=False``): the loader
    parallelises over blocks with its own threads, and several ranks share a node,
    so nested pools would only oversubscribe the cores.
    """

    _OPEN_FILES = 4  # handles kept per reader; blocks come mostly from one or two files at a time

    def __init__(self, index: DatasetIndex, columns: list[str] | None = None, prepare=None):
        self.index = index
        self.names = list(index.columns) if columns is None else list(columns)
        self.prepare = prepare  # (table, block number) -> dict; default: every column to numpy
        self._open: OrderedDict[int, object] = OrderedDict()

    def read(self, block_number: int) -> dict:
        block = self.index.blocks[block_number]
        where = block.describe(self.index)
        try:
            table = self._read_part(block.file, block.part)
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as error:
            raise DataError(f"{where}: cannot read ({first_line(error)})") from None
        if table.num_rows != block.num_rows:
            raise DataError(f"{where}: holds {table.num_rows} rows but its footer says {block.num_rows} "
                            "(was the file changed after the loader was built?)")
        if self.prepare is not None:
            return self.prepare(table, block_number)
        return {name: column_to_numpy(table.column(name), self.index.columns[name], where) for name in self.names}

    def read_rows(self, block_number: int, batch_rows: int):
        """The block's rows from its start, `batch_rows` at a time, as tables: for a
        caller that needs only its first rows (Parquet decodes a row group page by
        page, so stopping early leaves the rest undecoded; its bytes are fetched
        all the same)."""
        block = self.index.blocks[block_number]
        data_file = self.index.files[block.file]
        where = block.describe(self.index)
        try:
            reader = self._reader(block.file)
            if data_file.kind == "parquet":
                batches = reader.iter_batches(batch_size=batch_rows, row_groups=[block.part], columns=self.names,
                                              use_threads=False)
            else:  # memory-mapped: the whole record batch costs nothing to open
                whole = reader.get_batch(block.part).select(self.names)
                batches = (whole.slice(start, batch_rows) for start in range(0, whole.num_rows, batch_rows))
            for batch in batches:
                yield pa.Table.from_batches([batch])
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as error:
            raise DataError(f"{where}: cannot read ({first_line(error)})") from None

    def close(self) -> None:
        for _, source in self._open.values():
            source.close()
        self._open.clear()

    def _read_part(self, file_number: int, part: int):
        data_file = self.index.files[file_number]
        reader = self._reader(file_number)
        if data_file.kind == "parquet":
            return reader.read_row_group(part, columns=self.names, use_threads=False)
        return reader.get_batch(part).select(self.names)

    def _reader(self, file_number: int):
        if file_number in self._open:
            self._open.move_to_end(file_number)
            return self._open[file_number][0]
        data_file = self.index.files[file_number]
        if data_file.kind == "parquet":
            source = open_input(data_file.location)
            # The footer parsed when the index was built is reused, not read again;
            # object stores get coalesced reads (pre_buffer), local disks don't need them.
            reader = pq.ParquetFile(source, metadata=data_file.metadata,
                                    pre_buffer=not data_file.location.is_local)
        else:
            source = open_input(data_file.location, memory_map=True)
            reader = pa.ipc.open_file(source)
        self._open[file_number] = (reader, source)
        if len(self._open) > self._OPEN_FILES:
            self._open.popitem(last=False)[1][1].close()
        return reader
