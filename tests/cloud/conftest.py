from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cloud.moto_aws import Moto, moto_server


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    # One per session: moto's backends are global to the process, a second server
    # would share (and collide with) the first one's users and buckets.
    yield from moto_server()
