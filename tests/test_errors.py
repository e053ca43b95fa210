"""One base for every user-facing fault (hawor_tune.errors), kept compatible with what callers caught before."""

from __future__ import annotations

import pytest

from hawor_tune.checkpoint import CheckpointError
from hawor_tune.cli import UsageError
from hawor_tune.config import ConfigError
from hawor_tune.data import DatasetError
from hawor_tune.data.cache import CacheError
from hawor_tune.errors import HaworTuneError, MissingFileError
from hawor_tune.results import RecordError
from hawor_tune.retrain import SelectionError
from hawor_tune.search_space import SearchSpaceError


@pytest.mark.parametrize("error", [ConfigError, SearchSpaceError, DatasetError, CacheError, CheckpointError,
                                   SelectionError, RecordError])
def test_user_faults_share_one_base_and_stay_value_errors(error):
    assert issubclass(error, HaworTuneError) and issubclass(error, ValueError)


def test_missing_file_and_usage_errors_are_user_faults():
    assert issubclass(MissingFileError, HaworTuneError) and issubclass(MissingFileError, FileNotFoundError)
    assert str(MissingFileError("weights file 'x.pt' does not exist")) == "weights file 'x.pt' does not exist"
    assert issubclass(UsageError, HaworTuneError)
