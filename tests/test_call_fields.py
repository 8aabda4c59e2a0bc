"""Call.pop_all: the same values and the same fields left as through `headers`, without
decoding the other fields (the identity step reads the agent's credential with it)."""

from __future__ import annotations

import pytest

from sidecar.core.call import Call

RAW = [
    (b"Host", b"api.test"),
    (b"X-Agent-Token", b"first"),
    (b"Accept", b"*/*"),
    (b"x-agent-token", b"second"),
    (b"X-Agent-Tokens", b"other"),
]


def _call() -> Call:
    return Call(service="s", method="GET", target="/", body=None, agent=None, raw_headers=RAW)


@pytest.mark.parametrize("name", ["X-Agent-Token", "x-AGENT-token", "Missing"])
def test_pop_all_on_raw_fields_is_popall_on_the_decoded_ones(name: str) -> None:
    raw, decoded = _call(), _call()
    decoded.headers  # noqa: B018 - decode first: the multidict path
    assert raw.pop_all(name) == decoded.pop_all(name)
    assert raw.raw_headers is not None  # still undecoded
    assert list(raw.headers.items()) == list(decoded.headers.items())


def test_pop_all_returns_values_in_order_and_leaves_the_rest() -> None:
    call = _call()
    assert call.pop_all("x-agent-token") == ["first", "second"]
    assert call.raw_headers == [RAW[0], RAW[2], RAW[4]]
    assert call.pop_all("x-agent-token") == []
