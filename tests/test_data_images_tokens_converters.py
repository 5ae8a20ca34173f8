"""`distprop data images` and `distprop data text`: class folders and text files into
datasets the loader reads; the references are the files themselves and the
tokenizer libraries' own encodings."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from media_helpers import encode, photo

from distprop.cli import main
from distprop.data import ArrowLoader
from distprop.data.image_folder import class_names, convert_image_folder
from distprop.data.text_corpus import convert_text, load_tokenizer, tokenizer_from_tiktoken, tokenizer_info
from distprop.data.transforms import Resize, ToTensor
from distprop.errors import ConfigError, DataError


def make_tree(root, per_class=(3, 2, 4)):
    rng = np.random.default_rng(0)
    files = {}
    for label, (name, count) in enumerate(zip(("cat", "dog", "eel"), per_class)):
        for i in range(count):
            path = root / name / ("nested" if i % 2 else "") / f"{i}.{'png' if i == 1 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = encode(photo(rng, 20, 24), "PNG" if i == 1 else "JPEG")
            path.write_bytes(data)
            files[data] = label
    (root / "cat" / "notes.txt").write_text("not an image")
    return files


def test_image_folder_keeps_the_bytes_and_labels_by_sorted_class(tmp_path):
    files = make_tree(tmp_path / "tree")
    assert main(["data", "images", str(tmp_path / "tree"), str(tmp_path / "out")]) == 0
    table = pq.read_table(tmp_path / "out")
    assert class_names(table.schema) == ["cat", "dog", "eel"]
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    stored = {row["image"]["bytes"]: row["label"] for row in table.to_pylist()}
    assert stored == files  # every file once, bytes untouched, its folder's label
    assert {row["image"]["path"].split("/")[0] for row in table.to_pylist()} == {"cat", "dog", "eel"}
    batch = next(iter(ArrowLoader(tmp_path / "out", 9, image_transforms=[Resize((16, 16)), ToTensor()])))
    assert batch["image"].shape == (9, 3, 16, 16) and sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        convert_image_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "tree" / "empty").mkdir(parents=True)
    with pytest.raises(DataError, match="empty: class folder without image files"):
        convert_image_folder(tmp_path / "tree", tmp_path / "out")
    (tmp_path / "tree" / "empty" / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match="bad.jpg: is a corrupt or truncated JPEG"):
        convert_image_folder(tmp_path / "tree", tmp_path / "out")


def trained_tokenizer(tmp_path):
    """A small byte-level BPE trained here with Hugging Face tokenizers (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return tokenizer, path


TEXTS = ["the quick brown fox", "jumps over the lazy dog", "", "fox dog fox dog the end"]


def test_text_with_a_tokenizer_json(tmp_path):
    tokenizer, path = trained_tokenizer(tmp_path)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["data", "text", str(tmp_path / "a.jsonl"), str(tmp_path / "out"), "--tokenizer", str(path)]) == 0
    table = pq.read_table(tmp_path / "out")
    expected = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS if t]  # the empty one is left out
    assert table.column("tokens").to_pylist() == expected
    assert table.schema.field("tokens").type.value_type == "int32"  # a list<int32>
    info = tokenizer_info(table.schema)
    assert info == {"name": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size(),
                    "eos_token": tokenizer.token_to_id("<|endoftext|>")}
    loader = ArrowLoader(tmp_path / "out", 1, sequence_length=4, eos_token=info["eos_token"],
                         vocab_size=info["vocab_size"], shuffle=False)
    stream = [t for doc in expected for t in doc + [info["eos_token"]]]
    assert next(iter(loader))["input_ids"].tolist() == [stream[:4]]


def test_text_files_as_documents_or_lines_with_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\nworld\n\n")
    convert_text([tmp_path / "a.txt"], tmp_path / "whole", tokenizer="bytes")
    assert pq.read_table(tmp_path / "whole").column("tokens").to_pylist() == [list("héllo\nworld\n\n".encode())]
    convert_text([tmp_path / "a.txt"], tmp_path / "lines", tokenizer="bytes", by_line=True)
    assert pq.read_table(tmp_path / "lines").column("tokens").to_pylist() == [list("héllo".encode()), list(b"world")]


def test_text_through_tiktoken(tmp_path):
    """tiktoken's encoding files are downloaded on first use; an encoding built here
    from byte ranks stands in for them and exercises the same calls."""
    tiktoken = pytest.importorskip("tiktoken")
    encoding = tiktoken.Encoding("bytes-test", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    (tmp_path / "a.txt").write_text("a b")
    convert_text([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tokenizer_from_tiktoken(encoding))
    table = pq.read_table(tmp_path / "out")
    assert table.column("tokens").to_pylist() == [encoding.encode_ordinary("a b")]
    assert tokenizer_info(table.schema)["eos_token"] == 256


def test_text_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not a JSON object with a 'text' string"):
        convert_text([tmp_path / "bad.jsonl"], tmp_path / "out", tokenizer="bytes")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8 text"):
        convert_text([tmp_path / "latin.txt"], tmp_path / "out2", tokenizer="bytes")
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
