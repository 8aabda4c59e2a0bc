from __future__ import annotations

from pathlib import Path

import pytest

from tests.files.helpers import CANARY


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The directory the service serves; its name holds the canary."""
    path = tmp_path / CANARY / "data"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the root, holding what no call may read or write."""
    path = tmp_path / CANARY / "outside"
    path.mkdir(parents=True)
    (path / "secret.txt").write_text("OUTSIDE SECRET")
    return path
