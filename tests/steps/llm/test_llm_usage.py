"""The usage scanner on whole answers cut every way a network could cut them."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from sidecar.steps.llm.llm_usage import Scanner, kind_of
from sidecar.telemetry.metrics import MAX_LLM_AGENTS, Metrics
from tests.steps.llm_upstream import anthropic_json, anthropic_stream, openai_json, openai_stream


def scan(kind: str, data: bytes, *, cuts: list[int] = (), encoding: str | None = None):
    scanner = Scanner(kind, encoding=encoding)  # type: ignore[arg-type]
    start = 0
    for cut in [*cuts, len(data)]:
        scanner.feed(data[start:cut])
        start = cut
    usage = scanner.finish()
    return usage.input, usage.output, usage.model


OPENAI_SSE = b"".join(
    openai_stream("gpt-4o", ["a", "b"], {"prompt_tokens": 9, "completion_tokens": 4})
)
ANTHROPIC_SSE = b"".join(anthropic_stream("claude-x", 25, 15))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (OPENAI_SSE, (9, 4, "gpt-4o")),
        (ANTHROPIC_SSE, (25, 15, "claude-x")),
    ],
)
def test_an_sse_stream_cut_at_every_byte_reads_the_same(data: bytes, expected: tuple) -> None:
    assert scan("sse", data) == expected
    for cut in range(1, len(data)):
        assert scan("sse", data, cuts=[cut]) == expected, cut
    assert scan("sse", data, cuts=list(range(1, len(data)))) == expected  # a byte at a time


def test_crlf_lines_multi_line_data_and_a_missing_last_blank_line() -> None:
    event = b'data: {"model": "m",\r\ndata: "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    assert scan("sse", b": comment\r\n" + event) == (3, 2, "m")


def test_a_stream_without_usage_reports_none() -> None:
    data = b"".join(openai_stream("gpt-4o", ["a"], None))
    assert scan("sse", data) == (None, None, None)


def test_json_answers_openai_anthropic_responses_gemini() -> None:
    assert scan("json", json.dumps(openai_json("gpt-4o", 12, 5)).encode(), cuts=[7]) == (
        12,
        5,
        "gpt-4o",
    )
    anthropic = anthropic_json(
        "claude-x", {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 10}
    )
    assert scan("json", json.dumps(anthropic).encode()) == (13, 4, "claude-x")
    responses = {"model": "gpt-5", "usage": {"input_tokens": 8, "output_tokens": 2}}
    assert scan("json", json.dumps(responses).encode()) == (8, 2, "gpt-5")
    gemini = [
        {
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1},
            "modelVersion": "gemini-2.5-flash",
        },
        {
            "usageMetadata": {
                "promptTokenCount": 4,
                "candidatesTokenCount": 6,
                "thoughtsTokenCount": 10,
            }
        },
    ]
    assert scan("json", json.dumps(gemini).encode()) == (4, 16, "gemini-2.5-flash")


def test_ollama_ndjson() -> None:
    lines = [
        {"model": "llama3.2", "message": {"content": "Hi"}, "done": False},
        {"model": "llama3.2", "done": True, "prompt_eval_count": 26, "eval_count": 290},
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    assert scan("ndjson", data, cuts=[5, 40, 90]) == (26, 290, "llama3.2")


def test_gzip_and_deflate_answers_are_inflated_for_reading() -> None:
    data = json.dumps(openai_json("gpt-4o", 12, 5)).encode()
    packed = gzip.compress(data)
    assert scan("json", packed, cuts=[3, 20], encoding="gzip") == (12, 5, "gpt-4o")
    assert scan("json", zlib.compress(data), encoding="deflate") == (12, 5, "gpt-4o")
    assert scan("sse", gzip.compress(OPENAI_SSE), cuts=[10], encoding="gzip") == (9, 4, "gpt-4o")
    assert scan("json", b"not gzip at all", encoding="gzip") == (None, None, None)


def test_a_json_answer_over_the_cap_is_not_read() -> None:
    doc = openai_json("gpt-4o", 12, 5)
    doc["padding"] = "x" * 2000
    data = json.dumps(doc).encode()
    scanner = Scanner("json", cap=1000)
    scanner.feed(data[:900])
    scanner.feed(data[900:])
    assert not scanner.finish().known


def test_garbage_reads_as_nothing() -> None:
    for kind in ("json", "sse", "ndjson"):
        assert scan(kind, b'\xff\xfe{"usage": {"prompt_tokens": 1\n\n') == (None, None, None)
        assert scan(kind, b'{"usage": {"prompt_tokens": true, "completion_tokens": -1}}\n\n') == (
            None,
            None,
            None,
        )


def test_media_types() -> None:
    assert kind_of("application/json; charset=utf-8") == "json"
    assert kind_of("text/event-stream") == "sse"
    assert kind_of("application/x-ndjson") == "ndjson"
    assert kind_of("text/html") is None and kind_of(None) is None


def test_agent_and_model_labels_are_bounded_per_service() -> None:
    metrics = Metrics()
    for n in range(MAX_LLM_AGENTS + 20):
        metrics.on_llm_usage("svc", f"agent-{n}", "m" * 500, 1, 1)
    agents = {s.labels["agent"] for family in metrics.llm_tokens.collect() for s in family.samples}
    assert len(agents) == MAX_LLM_AGENTS + 1 and "_other" in agents
    models = {s.labels["model"] for family in metrics.llm_tokens.collect() for s in family.samples}
    assert models == {"m" * 128}
    # Another service has bounds of its own.
    metrics.on_llm_usage("other", "agent-x", "m", 1, None)
    assert any(
        s.labels["agent"] == "agent-x" and s.labels["service"] == "other"
        for family in metrics.llm_tokens.collect()
        for s in family.samples
    )
