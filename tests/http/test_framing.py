"""How a message's body is framed, decided by two pure functions: `body_framing` for
what the sidecar reads (agents' requests, upstreams' answers) and `send_framing` for
what it writes. Every outcome and every refused combination, without a socket."""

from __future__ import annotations

import pytest

from sidecar.http.http1 import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    FramingError,
    body_framing,
    framing_field,
    send_framing,
)

REQUEST = 0  # body_framing's status for a request


@pytest.mark.parametrize(
    ("lengths", "codings", "framing"),
    [
        (None, None, NO_BODY),
        (b"0", None, 0),
        (b"42", None, 42),
        (b"42, 42", None, 42),  # repeated fields that agree (RFC 9110 8.6)
        (b"42,42", None, 42),
        (None, b"chunked", CHUNKED),
        (None, b"Chunked ", CHUNKED),
    ],
)
def test_a_request_is_framed_by_its_fields(
    lengths: bytes | None, codings: bytes | None, framing: int
) -> None:
    assert body_framing("POST", REQUEST, lengths, codings) == framing


@pytest.mark.parametrize(
    ("lengths", "codings", "framing"),
    [
        (b"5", None, 5),
        (None, b"chunked", CHUNKED),
        (None, None, UNTIL_CLOSE),  # neither field: the connection's end is the body's
    ],
)
def test_an_answer_is_framed_by_its_fields(
    lengths: bytes | None, codings: bytes | None, framing: int
) -> None:
    assert body_framing("GET", 200, lengths, codings) == framing


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
@pytest.mark.parametrize(
    ("lengths", "codings"), [(b"5", None), (None, b"chunked"), (None, None), (None, b"gzip")]
)
def test_head_204_and_304_answers_have_no_body_whatever_their_fields_say(
    method: str, status: int, lengths: bytes | None, codings: bytes | None
) -> None:
    assert body_framing(method, status, lengths, codings) == NO_BODY


@pytest.mark.parametrize("status", [100, 101, 103])
def test_interim_answers_have_no_body(status: int) -> None:
    assert body_framing("GET", status, b"5", None) == NO_BODY


@pytest.mark.parametrize("status", [REQUEST, 200, 304])
@pytest.mark.parametrize(
    ("lengths", "codings", "error"),
    [
        (b"3", b"chunked", "Content-Length and Transfer-Encoding together"),
        (b"3, 4", None, "Content-Length fields that disagree"),
        (b"3,4", None, "Content-Length fields that disagree"),
        (b"3x", None, "Content-Length is not a number"),
        (b"-3", None, "Content-Length is not a number"),
        (b"+3", None, "Content-Length is not a number"),
        (b"", None, "Content-Length is not a number"),
        (b"3,", None, "Content-Length is not a number"),
    ],
)
def test_conflicting_or_invalid_lengths_are_refused_whatever_the_status(
    status: int, lengths: bytes, codings: bytes | None, error: str
) -> None:
    with pytest.raises(FramingError, match=error):
        body_framing("GET", status, lengths, codings)


@pytest.mark.parametrize("status", [REQUEST, 200])
@pytest.mark.parametrize(
    "codings", [b"gzip", b"gzip, chunked", b"chunked, gzip", b"chunked, chunked", b"identity"]
)
def test_a_transfer_coding_other_than_chunked_is_refused(status: int, codings: bytes) -> None:
    # De-chunked, "gzip, chunked" would be relayed still gzipped with the coding dropped.
    with pytest.raises(FramingError, match="other than chunked"):
        body_framing("POST", status, None, codings)


def test_the_error_names_no_field_value() -> None:
    with pytest.raises(FramingError) as caught:
        body_framing("POST", REQUEST, b"12345, 67890", None)
    assert "12345" not in str(caught.value) and "67890" not in str(caught.value)


@pytest.mark.parametrize(
    ("method", "status", "length", "http10", "framing"),
    [
        ("GET", 200, 5, False, 5),
        ("GET", 200, 0, False, 0),
        ("GET", 200, None, False, CHUNKED),
        ("GET", 200, None, True, UNTIL_CLOSE),  # an HTTP/1.0 agent cannot read chunked
        ("HEAD", 200, 5, False, 5),  # the length the GET's body would have
        ("HEAD", 200, None, False, NO_BODY),
        ("GET", 204, 5, False, NO_BODY),
        ("GET", 304, 5, False, NO_BODY),
        ("GET", 304, None, True, NO_BODY),
        ("GET", 101, None, False, NO_BODY),
    ],
)
def test_an_answer_is_sent_framed_by_what_is_known_of_its_body(
    method: str, status: int, length: int | None, http10: bool, framing: int
) -> None:
    assert send_framing(method, status, length, False, http10) == framing


@pytest.mark.parametrize(
    ("method", "length", "streamed", "framing"),
    [
        ("POST", 3, False, 3),
        ("POST", 0, False, 0),  # an empty POST says so
        ("GET", 0, False, NO_BODY),  # an empty GET goes without a Content-Length: 0
        ("GET", None, False, NO_BODY),
        ("POST", None, True, CHUNKED),
        ("POST", 7, True, 7),  # a stream of known size keeps its Content-Length
    ],
)
def test_a_call_is_sent_framed_by_its_body(
    method: str, length: int | None, streamed: bool, framing: int
) -> None:
    assert send_framing(method, 0, length, streamed, False) == framing


@pytest.mark.parametrize(
    ("framing", "field"),
    [
        (12, b"Content-Length: 12\r\n"),
        (0, b"Content-Length: 0\r\n"),
        (CHUNKED, b"Transfer-Encoding: chunked\r\n"),
        (NO_BODY, b""),
        (UNTIL_CLOSE, b""),
    ],
)
def test_the_field_that_says_each_framing(framing: int, field: bytes) -> None:
    assert framing_field(framing) == field


@pytest.mark.parametrize("length", [None, 0, 9])
@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_what_is_sent_reads_back_as_sent(method: str, length: int | None, streamed: bool) -> None:
    """The field a call is sent with, read back by the next hop, frames it the same way."""
    sent = send_framing(method, 0, length, streamed, False)
    field = framing_field(sent)
    lengths = field[16:-2] if field.startswith(b"Content-Length") else None
    codings = b"chunked" if sent == CHUNKED else None
    read = body_framing(method, 0, lengths, codings)
    assert read == sent or (read == NO_BODY and sent == NO_BODY)
