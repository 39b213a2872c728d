"""momjax.load: what it refuses before reading anything."""

from __future__ import annotations

import pytest

import momjax
import momjax.cli
import momjax.convert
from momjax.errors import InputError


def test_bad_weights_placements_are_refused_at_load(zoo):
    for bad in ("pinned_host", None, 1):
        with pytest.raises(InputError, match="weights must be 'device' or 'host'"):
            momjax.load(zoo.folder("llama-gqa"), weights=bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"path": None}, "path"), ({"path": 5}, "path"), ({"dtype": "int8"}, "dtype"), ({"progress": "no"}, "progress"),
])
def test_bad_load_arguments(zoo, kwargs, words):
    kwargs = {"path": zoo.folder("llama-gqa"), **kwargs}
    with pytest.raises(InputError, match=words):
        momjax.load(**kwargs)
