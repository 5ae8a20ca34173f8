"""`distprop data ...`: convert public datasets, generate synthetic ones, inspect a dataset."""

from __future__ import annotations

import argparse
import os

from distprop.data import converters
from distprop.data.index import DatasetIndex
from distprop.data.synthetic import write_synthetic
from distprop.data.writer import PARQUET_COMPRESSIONS


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    def converter(name: str, action, help_line: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_line, description=help_line)
        command.set_defaults(_data_run=action)
        return command

    digits = converter("digits", _run_digits, "scikit-learn's UCI digits -> OUT/train and OUT/test")
    digits.add_argument("out", metavar="OUT")
    digits.add_argument("--test-fraction", type=float, default=0.2)
    _writer_options(digits, shuffle=False)

    mnist = converter("mnist", _run_mnist, "an MNIST pair of IDX files (optionally .gz) -> OUT")
    mnist.add_argument("images", metavar="IMAGES")
    mnist.add_argument("labels", metavar="LABELS")
    mnist.add_argument("out", metavar="OUT")
    _writer_options(mnist)

    cifar = converter("cifar10", _run_cifar10, "the CIFAR-10 python batches in DIR -> OUT/train and OUT/test")
    cifar.add_argument("directory", metavar="DIR")
    cifar.add_argument("out", metavar="OUT")
    _writer_options(cifar)

    npz = converter("npz", _run_npz, "every array of an .npz FILE becomes a column of OUT")
    npz.add_argument("file", metavar="FILE")
    npz.add_argument("out", metavar="OUT")
    _writer_options(npz)

    csv = converter("csv", _run_csv, "a CSV FILE -> OUT with float32 'features' and int64 'label'")
    csv.add_argument("file", metavar="FILE")
    csv.add_argument("out", metavar="OUT")
    csv.add_argument("--label-column", required=True, metavar="NAME")
    csv.add_argument("--feature-columns", type=_names, metavar="A,B,...", help="default: all other columns")
    _writer_options(csv)

    images = converter("images", _run_images, "a folder per class of image files (ROOT/<class>/...) -> OUT, "
                       "the encoded bytes kept as they are")
    images.add_argument("root", metavar="ROOT")
    images.add_argument("out", metavar="OUT")
    _writer_options(images, row_group_size=256)

    text = converter("text", _run_text, "text files tokenized into OUT's list<int32> column 'tokens'")
    text.add_argument("files", metavar="FILES", nargs="+", help=".txt files (one document each) or .jsonl")
    text.add_argument("out", metavar="OUT")
    text.add_argument("--tokenizer", required=True, metavar="NAME",
                      help="a tokenizer.json path (Hugging Face tokenizers), 'bytes', or a tiktoken encoding "
                           "(gpt2, cl100k_base: downloaded on first use)")
    text.add_argument("--by-line", action="store_true", help="each non-empty line of a .txt file is a document")
    text.add_argument("--text-field", default="text", help="the field of each .jsonl record (default: text)")
    _writer_options(text, shuffle=False)

    synthetic = converter("synthetic", _run_synthetic, "learnable random classification data of any size -> OUT")
    synthetic.add_argument("out", metavar="OUT")
    synthetic.add_argument("--samples", type=int, required=True)
    synthetic.add_argument("--shape", type=_shape, default=(3, 32, 32), metavar="C,H,W")
    synthetic.add_argument("--classes", type=int, default=10)
    synthetic.add_argument("--dtype", default="float32")
    _writer_options(synthetic, shuffle=False)

    info = converter("info", _run_info, "print a dataset's files, row groups, columns and fingerprint")
    info.add_argument("path", metavar="PATH_OR_URI")


def run(args) -> int:
    return args._data_run(args)


def _writer_options(command: argparse.ArgumentParser, shuffle: bool = True, row_group_size: int = 1024) -> None:
    group = command.add_argument_group("output")
    group.add_argument("--seed", type=int, default=0)
    if shuffle:
        group.add_argument("--keep-order", action="store_true",
                           help="keep the source's row order (default: a seeded random order)")
    group.add_argument("--rows-per-file", type=int, default=None, help="default: one file")
    group.add_argument("--row-group-size", type=int, default=row_group_size)
    group.add_argument("--compression", choices=PARQUET_COMPRESSIONS, default="none")
    group.add_argument("--format", choices=("parquet", "ipc"), default="parquet",
                       help="ipc: uncompressed Arrow IPC files, memory-mapped when read")
    group.add_argument("--overwrite", action="store_true", help="replace a dataset already at OUT")


def _write_options(args) -> dict:
    return {"rows_per_file": args.rows_per_file, "row_group_size": args.row_group_size,
            "compression": args.compression, "format": args.format, "overwrite": args.overwrite}


def _order_options(args) -> dict:
    return {"shuffle": not args.keep_order, "seed": args.seed}


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be integers separated by commas, not {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs positive dimensions, not {text!r}")
    return shape


def _report(*paths, sequences=()) -> int:
    for path in paths:
        index = DatasetIndex.open(path, sequences=sequences)
        columns = ", ".join(f"{s.name} ({s.describe()})" for s in index.columns.values())
        print(f"wrote {path}: {index.num_rows} samples in {len(index.files)} file(s); columns {columns}")
    return 0


def _run_digits(args) -> int:
    converters.convert_digits(args.out, test_fraction=args.test_fraction, seed=args.seed, **_write_options(args))
    return _report(os.path.join(args.out, "train"), os.path.join(args.out, "test"))


def _run_mnist(args) -> int:
    converters.convert_mnist(args.images, args.labels, args.out, **_order_options(args), **_write_options(args))
    return _report(args.out)


def _run_cifar10(args) -> int:
    converters.convert_cifar10(args.directory, args.out, **_order_options(args), **_write_options(args))
    return _report(os.path.join(args.out, "train"), os.path.join(args.out, "test"))


def _run_npz(args) -> int:
    converters.convert_npz(args.file, args.out, **_order_options(args), **_write_options(args))
    return _report(args.out)


def _run_csv(args) -> int:
    converters.convert_csv(args.file, args.out, label_column=args.label_column,
                           feature_columns=args.feature_columns, **_order_options(args), **_write_options(args))
    return _report(args.out)


def _run_images(args) -> int:
    from distprop.data.image_folder import convert_image_folder

    convert_image_folder(args.root, args.out, **_order_options(args), **_write_options(args))
    return _report(args.out)


def _run_text(args) -> int:
    from distprop.data.text_corpus import convert_text

    convert_text(args.files, args.out, tokenizer=args.tokenizer, by_line=args.by_line, text_field=args.text_field,
                 **_write_options(args))
    return _report(args.out, sequences=("tokens",))


def _run_synthetic(args) -> int:
    write_synthetic(args.out, args.samples, shape=args.shape, classes=args.classes, seed=args.seed,
                    dtype=args.dtype, **_write_options(args))
    return _report(args.out)


def _run_info(args) -> int:
    from distprop.data.outputs import variable_list_columns

    # Lists are shown as lists: whether they are tensors or token sequences is the loader's choice.
    index = DatasetIndex.open(args.path, sequences=variable_list_columns(args.path))
    print(f"dataset      {index.location.display}")
    print(f"samples      {index.num_rows}")
    print(f"files        {len(index.files)}")
    print(f"blocks       {len(index.blocks)} (rows per block: {int(index.block_rows.min())}.."
          f"{int(index.block_rows.max())})")
    print(f"fingerprint  {index.fingerprint}")
    for spec in index.columns.values():
        print(f"column       {spec.name}: {spec.describe()}")
    return 0
