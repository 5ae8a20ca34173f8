"""`distprop data text FILES OUT --tokenizer NAME`: text files tokenized into a
dataset with one ``list<int32>`` column, ``tokens``, one document per row.

Documents: each ``.txt`` file is one document (``by_line=True``: each non-empty line
is one); each line of a ``.jsonl`` file is a JSON object whose `text_field` holds
one. Documents keep their order (the loader shuffles windows of them); no end
token is added here, the loader appends one (``eos_token=``) where asked, so one
corpus serves packed and unpacked training.

Tokenizers (`load_tokenizer`), all working without a network when their files are
at hand:

* a path to a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library, the
  ``text`` extra): what ``transformers`` saves, or trains with ``tokenizers``;
* ``bytes``: the UTF-8 bytes (ids 0-255, end token 256), no dependency;
* a tiktoken encoding name (``gpt2``, ``cl100k_base``, ``o200k_base``; the ``text``
  extra): tiktoken fetches its files on first use and caches them (``TIKTOKEN_CACHE_DIR``),
  so offline it needs that cache filled beforehand.

The schema metadata records the tokenizer's name, vocabulary size and end token
(`tokenizer_info` reads it), so training can pass ``vocab_size`` and ``eos_token``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distprop.data.storage import first_line
from distprop.data.writer import DatasetWriter
from distprop.errors import ConfigError, DataError

TOKENIZER_KEY = "distprop.tokenizer"
_CHUNK_DOCUMENTS = 512
_END_TOKEN_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")


@dataclass
class Tokenizer:
    """A named tokenizer: `encode_batch(texts) -> list of id lists`."""

    name: str
    vocab_size: int
    eos_token: int | None
    encode_batch: object


def load_tokenizer(name: str) -> Tokenizer:
    if name == "bytes":
        return Tokenizer("bytes", 257, 256, lambda texts: [list(t.encode("utf-8")) for t in texts])
    if name.endswith(".json") or os.path.sep in name:
        return _hugging_face(name)
    return _tiktoken(name)


def _hugging_face(path: str) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ConfigError(f"tokenizer {path}: needs the 'tokenizers' package (pip install 'distprop[text]')") \
            from None
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer {path}: no such file (a Hugging Face tokenizer.json)")
    try:
        tokenizer = HFTokenizer.from_file(path)
    except Exception as error:  # the library raises its own exception types for a bad file
        raise ConfigError(f"tokenizer {path}: not a readable tokenizer.json ({first_line(error)})") from None
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    eos = next((vocabulary[n] for n in _END_TOKEN_NAMES if n in vocabulary), None)

    def encode(texts):
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(os.path.basename(path), tokenizer.get_vocab_size(with_added_tokens=True), eos, encode)


def _tiktoken(name: str) -> Tokenizer:
    try:
        import tiktoken
    except ImportError:
        raise ConfigError(f"tokenizer {name!r}: needs the 'tiktoken' package (pip install 'distprop[text]'), or "
                          "pass a tokenizer.json path or 'bytes'") from None
    try:
        encoding = tiktoken.get_encoding(name)
    except ValueError as error:
        raise ConfigError(f"tokenizer {name!r}: {first_line(error)} (or pass a tokenizer.json path or "
                          "'bytes')") from None
    except Exception as error:  # network or cache failures, in whatever type the HTTP stack raises
        raise ConfigError(f"tokenizer {name!r}: tiktoken could not load its files ({first_line(error)}); they are "
                          "downloaded on first use, so offline point TIKTOKEN_CACHE_DIR at a filled cache, or "
                          "pass a tokenizer.json path or 'bytes'") from None
    return tokenizer_from_tiktoken(encoding)


def tokenizer_from_tiktoken(encoding) -> Tokenizer:
    """A Tokenizer from a ``tiktoken.Encoding`` (built-in or constructed from local files)."""
    eos = encoding.eot_token if "<|endoftext|>" in encoding.special_tokens_set else None
    return Tokenizer(encoding.name, encoding.n_vocab, eos,
                     lambda texts: encoding.encode_ordinary_batch(texts, num_threads=1))


def read_documents(path: str, by_line: bool, text_field: str):
    """Yield the documents of one file, with where each comes from."""
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as file:
                for number, line in enumerate(file, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record[text_field]
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{path}:{number}: not a JSON object with a {text_field!r} string") \
                            from None
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{number}: {text_field!r} is {type(text).__name__}, not a string")
                    yield text, f"{path}:{number}"
        elif by_line:
            with open(path, encoding="utf-8") as file:
                for number, line in enumerate(file, 1):
                    if line.strip():
                        yield line.rstrip("\n"), f"{path}:{number}"
        else:
            with open(path, encoding="utf-8") as file:
                yield file.read(), path
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None


def convert_text(files, out, *, tokenizer, by_line: bool = False, text_field: str = "text",
                 row_group_size: int = 1024, **write_options) -> list[str]:
    """Tokenize `files` (paths) into a dataset at `out`; `tokenizer` is a name for
    `load_tokenizer` or a `Tokenizer`. Empty documents are left out (the loader
    refuses them). Returns the files written."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    files = [os.fspath(f) for f in files]
    if not files:
        raise ConfigError("no text files given")
    if tokenizer.vocab_size > np.iinfo(np.int32).max:
        raise ConfigError(f"tokenizer {tokenizer.name}: {tokenizer.vocab_size} ids do not fit int32")
    info = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_token": tokenizer.eos_token}
    written = 0
    with DatasetWriter(out, row_group_size=row_group_size, metadata={TOKENIZER_KEY: json.dumps(info)},
                       **write_options) as writer:
        texts: list[str] = []

        def flush():
            nonlocal written
            ids = [np.asarray(d, np.int32) for d in tokenizer.encode_batch(texts) if len(d)]
            if ids:
                offsets = np.concatenate([[0], np.cumsum([len(d) for d in ids])]).astype(np.int32)
                writer.write({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(ids)))})
                written += len(ids)
            texts.clear()

        for path in files:
            for text, _ in read_documents(path, by_line, text_field):
                texts.append(text)
                if len(texts) >= _CHUNK_DOCUMENTS:
                    flush()
        flush()
    if not written:
        raise DataError(f"{', '.join(files)}: no non-empty document to write")
    return writer.files


def tokenizer_info(schema: pa.Schema) -> dict | None:
    """``{name, vocab_size, eos_token}`` as `convert_text` recorded it, or None."""
    raw = (schema.metadata or {}).get(TOKENIZER_KEY.encode())
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None
