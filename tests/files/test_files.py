"""The files service through the real sidecar, with aiohttp: reads, writes, listings."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import requests

from tests.files.helpers import files_policy, refused, url


async def test_put_get_head_list_delete(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root))
    base = f"{sc.url}/docs"

    async with client.put(f"{base}/notes/today.md", data=b"# hello\n") as r:
        assert r.status == 201
        assert await r.json() == {"path": "/notes/today.md", "size": 8}
        created = r.headers["ETag"]
    assert (root / "notes" / "today.md").read_bytes() == b"# hello\n"

    async with client.get(f"{base}/notes/today.md") as r:
        assert r.status == 200
        assert await r.read() == b"# hello\n"
        assert r.headers["ETag"] == created
        assert r.headers["Content-Type"].startswith("text/markdown")
        assert r.headers["Accept-Ranges"] == "bytes"
        assert "Last-Modified" in r.headers
    async with client.head(f"{base}/notes/today.md") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "8"
        assert await r.read() == b""

    async with client.put(f"{base}/notes/today.md", data=b"# replaced\n") as r:
        assert r.status == 204
        assert r.headers["ETag"] != created
    async with client.get(f"{base}/notes/") as r:
        assert r.status == 200
        listing = await r.json()
    assert listing["path"] == "/notes/"
    assert listing["truncated"] is False
    [entry] = listing["entries"]
    assert entry["name"] == "today.md" and entry["type"] == "file" and entry["size"] == 11
    assert entry["mtime"].endswith("Z")
    async with client.get(f"{base}/") as r:
        assert [(e["name"], e["type"]) for e in (await r.json())["entries"]] == [
            ("notes", "directory")
        ]

    async with client.delete(f"{base}/notes/today.md") as r:
        assert r.status == 204
    assert not (root / "notes" / "today.md").exists()
    async with client.get(f"{base}/notes/today.md") as r:
        document = await refused(r, 404, "not_found", root)
        assert "/notes/today.md" in document["detail"]
    async with client.delete(f"{base}/notes/today.md") as r:
        await refused(r, 404, "not_found", root)
    async with client.get(f"{base}/nothing/") as r:
        await refused(r, 404, "not_found", root)


async def test_range_requests(start_sidecar, client, root):
    (root / "a.txt").write_bytes(b"0123456789")
    sc = await start_sidecar(files_policy(root))
    target = f"{sc.url}/docs/a.txt"
    cases = {
        "bytes=2-5": (206, b"2345", "bytes 2-5/10"),
        "bytes=7-": (206, b"789", "bytes 7-9/10"),
        "bytes=-3": (206, b"789", "bytes 7-9/10"),
        "bytes=8-100": (206, b"89", "bytes 8-9/10"),
        # Several ranges, or one this server does not understand: the whole file.
        "bytes=0-1,4-5": (200, b"0123456789", None),
        "items=0-1": (200, b"0123456789", None),
        "bytes=5-2": (200, b"0123456789", None),
    }
    for asked, (status, body, content_range) in cases.items():
        async with client.get(target, headers={"Range": asked}) as r:
            assert r.status == status, asked
            assert await r.read() == body, asked
            assert r.headers.get("Content-Range") == content_range, asked
    for asked in ("bytes=10-", "bytes=-0"):
        async with client.get(target, headers={"Range": asked}) as r:
            await refused(r, 416, "range_not_satisfiable", root)
            assert r.headers["Content-Range"] == "bytes */10"

    async with client.get(target) as r:
        tag = r.headers["ETag"]
    async with client.get(target, headers={"Range": "bytes=0-0", "If-Range": tag}) as r:
        assert (r.status, await r.read()) == (206, b"0")
    async with client.get(target, headers={"Range": "bytes=0-0", "If-Range": '"old"'}) as r:
        assert (r.status, await r.read()) == (200, b"0123456789")


async def test_etags_and_preconditions(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root))
    target = f"{sc.url}/docs/plan.txt"

    async with client.put(target, data=b"v1", headers={"If-None-Match": "*"}) as r:
        assert r.status == 201
        v1 = r.headers["ETag"]
    # Safe create: a second one finds the file there and changes nothing.
    async with client.put(target, data=b"other", headers={"If-None-Match": "*"}) as r:
        await refused(r, 412, "precondition_failed", root)
    assert (root / "plan.txt").read_bytes() == b"v1"

    async with client.get(target, headers={"If-None-Match": v1}) as r:
        assert r.status == 304
        assert r.headers["ETag"] == v1
        assert await r.read() == b""
    async with client.get(target, headers={"If-None-Match": '"other"'}) as r:
        assert r.status == 200
    async with client.get(target, headers={"If-Match": '"other"'}) as r:
        await refused(r, 412, "precondition_failed", root)

    # Update only the version read: a writer holding an old ETag is refused.
    async with client.put(target, data=b"v2", headers={"If-Match": v1}) as r:
        assert r.status == 204
        v2 = r.headers["ETag"]
    async with client.put(target, data=b"v3", headers={"If-Match": v1}) as r:
        await refused(r, 412, "precondition_failed", root)
    assert (root / "plan.txt").read_bytes() == b"v2"
    async with client.put(f"{sc.url}/docs/new.txt", data=b"x", headers={"If-Match": "*"}) as r:
        await refused(r, 412, "precondition_failed", root)
    assert not (root / "new.txt").exists()
    async with client.delete(target, headers={"If-Match": v1}) as r:
        await refused(r, 412, "precondition_failed", root)
    async with client.delete(target, headers={"If-Match": v2}) as r:
        assert r.status == 204


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for i in range(count):
        yield bytes([i % 251]) * size


async def test_a_large_upload_streams_and_lands_whole(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root, max_size="8MiB"))
    # Chunked (no Content-Length): the size is only known at the end.
    async with client.put(f"{sc.url}/docs/big.pdf", data=_chunks(48, 100_000)) as r:
        assert r.status == 201, await r.text()
    expected = hashlib.sha256(b"".join([bytes([i % 251]) * 100_000 for i in range(48)]))
    assert hashlib.sha256((root / "big.pdf").read_bytes()).digest() == expected.digest()
    async with client.get(f"{sc.url}/docs/big.pdf") as r:
        assert r.headers["Content-Type"] == "application/pdf"
        assert int(r.headers["Content-Length"]) == 4_800_000
        assert hashlib.sha256(await r.read()).digest() == expected.digest()
    async with client.get(f"{sc.url}/docs/big.pdf", headers={"Range": "bytes=4700000-"}) as r:
        assert r.status == 206
        assert await r.read() == bytes([47]) * 100_000
    assert _leftovers(root) == []


async def test_max_size_is_enforced_before_and_while_streaming(start_sidecar, client, root):
    (root / "keep.txt").write_bytes(b"old")
    sc = await start_sidecar(files_policy(root, max_size="1KiB"))
    async with client.put(f"{sc.url}/docs/keep.txt", data=b"x" * 1025) as r:
        await refused(r, 413, "request_too_large", root)
    # Without a Content-Length: refused when the 1025th byte arrives.
    async with client.put(f"{sc.url}/docs/keep.txt", data=_chunks(4, 300)) as r:
        await refused(r, 413, "request_too_large", root)
    assert (root / "keep.txt").read_bytes() == b"old"
    async with client.put(f"{sc.url}/docs/keep.txt", data=b"x" * 1024) as r:
        assert r.status == 204
    await _no_leftovers(root)


async def test_an_upload_cut_off_leaves_the_old_file_and_no_temporary(start_sidecar, root):
    (root / "report.txt").write_bytes(b"old report")
    sc = await start_sidecar(files_policy(root))
    host, port = sc.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PUT /docs/report.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        + b"n" * 300_000
    )
    await writer.drain()
    # The upload is under way once its temporary file is there.
    for _ in range(500):
        if _leftovers(root):
            break
        await asyncio.sleep(0.01)
    assert _leftovers(root)
    writer.close()
    await _no_leftovers(root)
    assert (root / "report.txt").read_bytes() == b"old report"
    async with aiohttp.ClientSession() as client, client.get(f"{sc.url}/docs/report.txt") as r:
        assert await r.read() == b"old report"


def _leftovers(root: Path) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names if name.startswith(".~")]


async def _no_leftovers(root: Path) -> None:
    # The temporary file is removed on the files pool once the call ends: bounded wait.
    for _ in range(500):
        if not _leftovers(root):
            return
        await asyncio.sleep(0.01)
    assert _leftovers(root) == []


async def test_read_only(start_sidecar, client, root):
    (root / "a.txt").write_text("hello")
    sc = await start_sidecar(files_policy(root, read_only=True))
    async with client.get(f"{sc.url}/docs/a.txt") as r:
        assert await r.text() == "hello"
    async with client.put(f"{sc.url}/docs/a.txt", data=b"changed") as r:
        await refused(r, 403, "forbidden", root)
        assert r.headers["Allow"] == "GET, HEAD"
    async with client.delete(f"{sc.url}/docs/a.txt") as r:
        await refused(r, 403, "forbidden", root)
    assert (root / "a.txt").read_text() == "hello"


async def test_only_the_allowed_extensions(start_sidecar, client, root):
    (root / "run.sh").write_text("rm -rf /")
    (root / "ok.TXT").write_text("fine")
    sc = await start_sidecar(files_policy(root, extensions=[".txt", ".md"]))
    async with client.get(f"{sc.url}/docs/run.sh") as r:
        await refused(r, 403, "forbidden", root)
    async with client.put(f"{sc.url}/docs/tool.exe", data=b"MZ") as r:
        await refused(r, 403, "forbidden", root)
    async with client.delete(f"{sc.url}/docs/run.sh") as r:
        await refused(r, 403, "forbidden", root)
    assert not (root / "tool.exe").exists() and (root / "run.sh").exists()
    async with client.get(f"{sc.url}/docs/ok.TXT") as r:
        assert await r.text() == "fine"
    async with client.get(f"{sc.url}/docs/") as r:
        assert [e["name"] for e in (await r.json())["entries"]] == ["ok.TXT"]


async def test_per_agent_directories(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root, per_agent=True))
    alice, bob = {"X-Agent-Id": "alice"}, {"X-Agent-Id": "bob"}
    async with client.get(f"{sc.url}/docs/", headers=alice) as r:
        assert (await r.json())["entries"] == []  # nothing written yet
    async with client.put(f"{sc.url}/docs/notes.txt", data=b"mine", headers=alice) as r:
        assert r.status == 201
    assert (root / "alice" / "notes.txt").read_bytes() == b"mine"
    async with client.get(f"{sc.url}/docs/notes.txt", headers=bob) as r:
        await refused(r, 404, "not_found", root)
    async with client.get(f"{sc.url}/docs/notes.txt", headers=alice) as r:
        assert await r.read() == b"mine"
    async with client.get(f"{sc.url}/docs/notes.txt") as r:
        await refused(r, 401, "unauthenticated", root)
    for name in ("..", "a b", ".hidden"):
        async with client.get(f"{sc.url}/docs/", headers={"X-Agent-Id": name}) as r:
            await refused(r, 403, "forbidden", root)


async def test_quota_per_agent(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root, per_agent=True, quota=100))
    alice, bob = {"X-Agent-Id": "alice"}, {"X-Agent-Id": "bob"}
    async with client.put(f"{sc.url}/docs/a.txt", data=b"a" * 60, headers=alice) as r:
        assert r.status == 201
    async with client.put(f"{sc.url}/docs/b.txt", data=b"b" * 60, headers=alice) as r:
        document = await refused(r, 507, "quota_exceeded", root)
        assert "100 bytes" in document["detail"]
    async with client.put(f"{sc.url}/docs/b.txt", data=_chunks(3, 20), headers=alice) as r:
        await refused(r, 507, "quota_exceeded", root)
    assert not (root / "alice" / "b.txt").exists()
    # Each agent has its own quota.
    async with client.put(f"{sc.url}/docs/b.txt", data=b"b" * 60, headers=bob) as r:
        assert r.status == 201
    # Replacing a file counts only the difference; deleting frees its bytes.
    async with client.put(f"{sc.url}/docs/a.txt", data=b"a" * 100, headers=alice) as r:
        assert r.status == 204
    async with client.delete(f"{sc.url}/docs/a.txt", headers=alice) as r:
        assert r.status == 204
    async with client.put(f"{sc.url}/docs/b.txt", data=b"b" * 90, headers=alice) as r:
        assert r.status == 201
    await _no_leftovers(root)


async def test_quota_counts_what_is_already_on_disk(start_sidecar, client, root):
    (root / "alice" / "old").mkdir(parents=True)
    (root / "alice" / "old" / "big.txt").write_bytes(b"x" * 90)
    sc = await start_sidecar(files_policy(root, per_agent=True, quota=100))
    async with client.put(
        f"{sc.url}/docs/new.txt", data=b"y" * 20, headers={"X-Agent-Id": "alice"}
    ) as r:
        await refused(r, 507, "quota_exceeded", root)


async def test_listing_is_bounded_and_shows_only_files_and_directories(start_sidecar, client, root):
    for i in range(5):
        (root / f"f{i}.txt").write_text("x" * i)
    (root / "sub").mkdir()
    sc = await start_sidecar(files_policy(root, list_limit=3))
    async with client.get(f"{sc.url}/docs/") as r:
        listing = await r.json()
    assert listing["truncated"] is True
    assert len(listing["entries"]) == 3
    async with client.head(f"{sc.url}/docs/sub/") as r:
        assert r.status == 200 and r.content_type == "application/json"
    async with client.get(f"{sc.url}/docs/f1.txt/") as r:
        await refused(r, 400, "bad_request", root)
    async with client.get(f"{sc.url}/docs/sub") as r:
        await refused(r, 400, "bad_request", root)


async def test_other_methods_and_directory_writes_are_refused(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root))
    async with client.post(f"{sc.url}/docs/a.txt", data=b"x") as r:
        await refused(r, 405, "method_not_allowed", root)
        assert r.headers["Allow"] == "GET, HEAD, PUT, DELETE"
    async with client.put(f"{sc.url}/docs/dir/", data=b"x") as r:
        await refused(r, 400, "bad_request", root)
    (root / "dir").mkdir()
    async with client.put(f"{sc.url}/docs/dir", data=b"x") as r:
        await refused(r, 400, "bad_request", root)
    async with client.delete(f"{sc.url}/docs/dir") as r:
        await refused(r, 400, "bad_request", root)
    async with client.get(url(sc.url, "/docs/%C3%A9t%C3%A9.txt")) as r:
        await refused(r, 404, "not_found", root)
    async with client.get(url(sc.url, "/docs/%FF.txt")) as r:
        await refused(r, 400, "bad_request", root)


async def test_requests_client_writes_and_reads_a_range(start_sidecar, root):
    sc = await start_sidecar(files_policy(root))
    target = f"{sc.url}/docs/été.json"

    def exchange() -> tuple[int, int, bytes, str]:
        with requests.Session() as session:
            put = session.put(target, data=iter([b'{"a": ', b"1}"]))  # chunked
            ranged = session.get(target, headers={"Range": "bytes=1-3"})
            return put.status_code, ranged.status_code, ranged.content, ranged.headers["ETag"]

    put, status, body, tag = await asyncio.to_thread(exchange)
    assert (put, status, body) == (201, 206, b'"a"')
    assert tag.startswith('"')
    assert (root / "été.json").read_bytes() == b'{"a": 1}'


async def test_concurrent_safe_creates_make_one_file(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root))

    async def create(i: int) -> int:
        headers = {"If-None-Match": "*"}
        async with client.put(
            f"{sc.url}/docs/once.txt", data=_chunks(8, 1000 + i), headers=headers
        ) as r:
            return r.status

    statuses = await asyncio.gather(*(create(i) for i in range(6)))
    assert sorted(statuses) == [201] + [412] * 5
    # The file is one upload whole, not a mix of several.
    data = (root / "once.txt").read_bytes()
    assert len(data) in {8 * (1000 + i) for i in range(6)}
    await _no_leftovers(root)


async def test_an_oversized_upload_is_refused_before_its_body_is_asked_for(start_sidecar, root):
    sc = await start_sidecar(files_policy(root, max_size=10))
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PUT /docs/a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 413 ")  # no "100 Continue" first
    assert not (root / "a.txt").exists()


async def test_a_range_with_digits_that_are_not_ascii_is_ignored(start_sidecar, root):
    # str.isdigit() is true of '²', which int() cannot read: such a
    # Range is bad syntax, ignored like any other (the whole file), never a 500.
    (root / "a.txt").write_bytes(b"0123456789")
    sc = await start_sidecar(files_policy(root))
    host, port = sc.url.removeprefix("http://").split(":")
    for spec in (b"\xb2-", b"0-\xb2", b"-\xb3", b"\xb9-2"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRange: bytes="
            + spec
            + b"\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), (spec, answer[:200])
        assert answer.endswith(b"\r\n\r\n0123456789"), spec


async def test_quota_holds_when_the_file_an_upload_replaces_is_deleted_meanwhile(
    start_sidecar, client, root
):
    # An upload replacing a 90-byte file was credited those 90 bytes when it began; the
    # file deleted and another written while it streams, that credit must not let the
    # agent end with 190 bytes under a quota of 100.
    sc = await start_sidecar(files_policy(root, per_agent=True, quota=100))
    alice = {"X-Agent-Id": "alice"}
    async with client.put(f"{sc.url}/docs/x.txt", data=b"x" * 90, headers=alice) as r:
        assert r.status == 201
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PUT /docs/x.txt HTTP/1.1\r\nHost: x\r\nX-Agent-Id: alice\r\nContent-Length: 100\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        assert (await reader.readline()).startswith(b"HTTP/1.1 100 ")  # the upload has begun
        await reader.readline()
    async with client.delete(f"{sc.url}/docs/x.txt", headers=alice) as r:
        assert r.status == 204
    async with client.put(f"{sc.url}/docs/y.txt", data=b"y" * 90, headers=alice) as r:
        assert r.status == 201
    writer.write(b"z" * 100)
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 507 "), answer[:300]
    assert b"quota_exceeded" in answer
    # The refused upload's temporary file goes once the call has ended: wait for it,
    # then count what the agent holds.
    await _no_leftovers(root)
    held = sum(p.stat().st_size for p in (root / "alice").rglob("*") if p.is_file())
    assert held <= 100


async def test_an_upload_in_flight_holds_few_descriptors_however_deep(start_sidecar, root):
    # An upload 60 directories deep must not hold a descriptor per directory while its
    # body streams: a few hundred slow uploads would exhaust the process's descriptors
    # (every socket of the sidecar included).
    sc = await start_sidecar(files_policy(root))
    host, port = sc.url.removeprefix("http://").split(":")
    deep = "/".join(f"d{i}" for i in range(60))
    before = len(os.listdir("/proc/self/fd"))
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PUT /docs/{deep}/a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    async with asyncio.timeout(10):
        assert (await reader.readline()).startswith(b"HTTP/1.1 100 ")  # the upload has begun
        await reader.readline()
    held = len(os.listdir("/proc/self/fd")) - before
    writer.write(b"abc")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert (root / deep / "a.txt").read_bytes() == b"abc"
    assert held < 10, held


async def test_an_html_file_is_served_sandboxed(start_sidecar, client, root):
    # Every service shares the egress origin: a page an agent wrote must not run scripts
    # there, where they could call the other services with the sidecar's credentials.
    sc = await start_sidecar(files_policy(root))
    page = b"<script>fetch('/github/user')</script>"
    async with client.put(f"{sc.url}/docs/page.txt", data=page) as r:
        assert r.status == 201
    async with client.get(f"{sc.url}/docs/page.txt") as r:
        assert r.status == 200
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Content-Security-Policy"].startswith("sandbox")
