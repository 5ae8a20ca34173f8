"""A saved loader position restored into a loader of token sequences: the settings
that define a sample (sequence_length, pack, eos_token) must match the saved ones."""

import numpy as np
import pytest
from media_helpers import write_documents

from distprop.data import ArrowLoader
from distprop.errors import ConfigError


@pytest.fixture
def documents_path(tmp_path):
    rng = np.random.default_rng(4)
    docs = [rng.integers(1, 500, int(rng.integers(1, 30))).tolist() for _ in range(40)]
    write_documents(tmp_path / "t.parquet", docs, row_group_size=8)
    return tmp_path


def saved_state(path, **options):
    loader = ArrowLoader(path, 2, seed=3, **options)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    iterator.close()
    return state


PADDED = dict(pack=False, truncate=True)


@pytest.mark.parametrize("saved, restored, key, values", [
    (dict(sequence_length=8, eos_token=0), dict(sequence_length=8, eos_token=0, **PADDED), "pack", (True, False)),
    (dict(sequence_length=8, **PADDED), dict(sequence_length=8), "pack", (False, True)),
    (dict(sequence_length=8, eos_token=0), dict(sequence_length=8), "eos_token", (0, None)),
    (dict(sequence_length=8, eos_token=0), dict(sequence_length=6, eos_token=0), "sequence_length", (8, 6)),
])
def test_a_position_saved_under_other_sample_settings_is_refused(documents_path, saved, restored, key, values):
    state = saved_state(documents_path, **saved)
    loader = ArrowLoader(documents_path, 2, seed=3, **restored)
    message = (f"loader state has {key}={values[0]!r} but this loader has {key}={values[1]!r}; "
               "the samples would differ")
    with pytest.raises(ConfigError, match=f"^{message}$"):
        loader.load_state_dict(state)


def test_a_position_saved_under_the_same_sample_settings_continues(documents_path):
    options = dict(sequence_length=8, eos_token=0, **PADDED)
    whole = [batch["input_ids"].tolist() for batch in ArrowLoader(documents_path, 2, seed=3, **options)]
    state = saved_state(documents_path, **options)
    resumed = ArrowLoader(documents_path, 2, seed=3, **options)
    resumed.load_state_dict(state)
    assert [batch["input_ids"].tolist() for batch in resumed] == whole[1:]
