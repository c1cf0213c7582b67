"""Fixtures of the labeling tests (helpers live in labeling_helpers.py)."""
from labeling_helpers import FakeClock, write_source
import pytest


@pytest.fixture
def source(tmp_path):
    """A folder with train.jsonl (8 items) and eval.jsonl (2 items), K = 3, with gold."""
    folder = tmp_path / "to_label"
    recs = write_source(folder)
    return folder, recs


@pytest.fixture
def clock():
    return FakeClock()
