"""Options of the ``duckdb://`` store URI."""

from __future__ import annotations

from pathlib import Path

import pytest

from stitchwork.data._base import open_store
from stitchwork.errors import ConfigError


def _threshold(store: object) -> str:
    rows = store.query("SELECT current_setting('checkpoint_threshold') AS v")  # type: ignore[attr-defined]
    return str(rows[0]["v"])


@pytest.mark.parametrize(("query", "expected"), [("", "256.0 MiB"), ("?checkpoint_mb=64", "64.0 MiB")])
def test_checkpoint_threshold_comes_from_the_uri(tmp_path: Path, query: str, expected: str) -> None:
    store = open_store(f"duckdb://{tmp_path}/s.duckdb{query}")
    try:
        assert _threshold(store) == expected
        assert (tmp_path / "s.duckdb").exists()  # the option is not part of the file name
    finally:
        store.close()


@pytest.mark.parametrize("bad", ["0", "-5", "lots"])
def test_a_bad_checkpoint_option_is_a_config_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="checkpoint_mb"):
        open_store(f"duckdb://{tmp_path}/s.duckdb?checkpoint_mb={bad}")
