"""Every way out of the root a files call could try, each through the real sidecar.

The links, FIFOs, sockets and device files are real ones made in tmp_path. Each
test checks that nothing outside the root was read or written, and that the
refusal names no place on disk (`refused` looks for the root's canary).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from sidecar.core.problems import ProblemError
from sidecar.files import paths
from tests.files.helpers import files_policy, refused, url


async def test_dot_dot_segments(start_sidecar, client, root, outside):
    sc = await start_sidecar(files_policy(root))
    for path in (
        "/docs/../outside/secret.txt",
        "/docs/sub/../../outside/secret.txt",
        "/docs/..",
        "/docs/a/./b.txt",
    ):
        async with client.get(url(sc.url, path)) as r:
            await refused(r, 400, "bad_request", root)


async def test_encoded_dot_dot_and_encoded_separators(start_sidecar, client, root, outside):
    sc = await start_sidecar(files_policy(root))
    for path in (
        "/docs/%2e%2e/outside/secret.txt",
        "/docs/%2E%2E/outside/secret.txt",
        "/docs/.%2e/outside/secret.txt",
        "/docs/..%2Foutside%2Fsecret.txt",
        "/docs/%2e%2e%2foutside%2fsecret.txt",
        "/docs/a%2Fb.txt",
        "/docs/a%5Cb.txt",
    ):
        for method in ("GET", "PUT", "DELETE"):
            async with client.request(method, url(sc.url, path), data=b"x") as r:
                await refused(r, 400, "bad_request", root)
    assert (outside / "secret.txt").read_text() == "OUTSIDE SECRET"
    assert sorted(os.listdir(root)) == []


async def test_backslashes(start_sidecar, client, root, outside):
    sc = await start_sidecar(files_policy(root))
    for path in ("/docs/..\\outside\\secret.txt", "/docs/a\\b.txt", "/docs/%5C..%5Csecret.txt"):
        async with client.get(url(sc.url, path)) as r:
            await refused(r, 400, "bad_request", root)


async def test_absolute_paths(start_sidecar, client, root):
    sc = await start_sidecar(files_policy(root))
    async with client.get(url(sc.url, "/docs/etc/hostname")) as r:
        await refused(r, 404, "not_found", root)  # relative to the root: simply not there
    for method, path in (
        ("GET", "/docs//etc/hostname"),  # '//': an empty segment
        ("GET", "/docs/%2Fetc%2Fhostname"),
        ("PUT", "/docs//tmp/written.txt"),
        ("PUT", "/docs/%2Ftmp%2Fwritten.txt"),
    ):
        async with client.request(method, url(sc.url, path), data=b"x") as r:
            await refused(r, 400, "bad_request", root)
    assert "written.txt" not in os.listdir("/tmp")


async def test_names_with_nul_and_control_characters(start_sidecar, client, root):
    (root / "a.txt").write_text("a")
    sc = await start_sidecar(files_policy(root))
    for path in ("/docs/a.txt%00.pdf", "/docs/a%00", "/docs/a%0A.txt", "/docs/%00/a.txt"):
        for method in ("GET", "PUT"):
            async with client.request(method, url(sc.url, path), data=b"x") as r:
                await refused(r, 400, "bad_request", root)
    assert os.listdir(root) == ["a.txt"]


async def test_a_symlink_pointing_out(start_sidecar, client, root, outside):
    (root / "link.txt").symlink_to(outside / "secret.txt")
    sc = await start_sidecar(files_policy(root))
    async with client.get(f"{sc.url}/docs/link.txt") as r:
        await refused(r, 403, "forbidden", root)
    async with client.head(f"{sc.url}/docs/link.txt") as r:
        assert r.status == 403
    # Writing through it, or replacing it, is refused too: the file outside is untouched.
    async with client.put(f"{sc.url}/docs/link.txt", data=b"pwned") as r:
        await refused(r, 403, "forbidden", root)
    async with client.delete(f"{sc.url}/docs/link.txt") as r:
        await refused(r, 403, "forbidden", root)
    assert (outside / "secret.txt").read_text() == "OUTSIDE SECRET"
    assert (root / "link.txt").is_symlink()
    async with client.get(f"{sc.url}/docs/") as r:
        assert (await r.json())["entries"] == []  # a symlink is not listed


async def test_a_symlinked_directory_in_the_middle_of_the_path(
    start_sidecar, client, root, outside
):
    (root / "a").mkdir()
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    sc = await start_sidecar(files_policy(root))
    for method, path in (
        ("GET", "/docs/a/b/secret.txt"),
        ("GET", "/docs/a/b/"),
        ("PUT", "/docs/a/b/new.txt"),
        ("PUT", "/docs/a/b/deeper/new.txt"),
        ("DELETE", "/docs/a/b/secret.txt"),
    ):
        async with client.request(method, f"{sc.url}{path}", data=b"pwned") as r:
            document = await refused(r, 403, "forbidden", root)
            assert "symbolic link" in document["detail"]
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "OUTSIDE SECRET"


async def test_the_root_of_an_agent_as_a_symlink(start_sidecar, client, root, outside):
    (root / "alice").symlink_to(outside, target_is_directory=True)
    sc = await start_sidecar(files_policy(root, per_agent=True))
    alice = {"X-Agent-Id": "alice"}
    async with client.get(f"{sc.url}/docs/secret.txt", headers=alice) as r:
        await refused(r, 403, "forbidden", root)
    async with client.put(f"{sc.url}/docs/new.txt", data=b"x", headers=alice) as r:
        await refused(r, 403, "forbidden", root)
    assert sorted(os.listdir(outside)) == ["secret.txt"]


async def test_a_symlink_swapped_in_during_requests(start_sidecar, client, root, outside):
    """A directory turned into a symlink to the outside and back, over and over, while
    the same file is read through it: every answer is the inside file or a refusal.
    A resolve-then-open check (realpath, then open the string) loses this race."""
    inside = root / "a"
    inside.mkdir()
    (inside / "secret.txt").write_text("inside")
    sc = await start_sidecar(files_policy(root))
    stop = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        moved = root / "a-real"
        link = root / "a-link"
        link.symlink_to(outside, target_is_directory=True)
        while not stop.is_set():
            os.rename(inside, moved)  # a moment with no 'a' at all
            put_in_place(link)  # 'a' is the symlink (rename(2) is atomic)
            os.rename(inside, link)
            put_in_place(moved)
            flips += 1

    def put_in_place(source: Path) -> None:
        while True:
            try:
                os.rename(source, inside)
                return
            except OSError:
                # A PUT made 'a' while it was missing: set that one aside.
                with contextlib.suppress(OSError):
                    os.rename(inside, root / f"made-{flips}-{len(os.listdir(root))}")

    flipper = threading.Thread(target=flip)
    flipper.start()
    seen: dict[int, int] = {}
    try:
        for _ in range(300):
            async with client.get(f"{sc.url}/docs/a/secret.txt") as r:
                body = await r.text()
                seen[r.status] = seen.get(r.status, 0) + 1
                assert "OUTSIDE" not in body
                if r.status == 200:
                    assert body == "inside"
                else:
                    assert r.status in (403, 404), body
                    await refused(r, r.status, "forbidden" if r.status == 403 else "not_found")
            async with client.put(f"{sc.url}/docs/a/put.txt", data=b"from a call") as r:
                assert r.status in (201, 204, 403, 404), await r.text()
    finally:
        stop.set()
        flipper.join()
    assert flips > 0
    assert seen.get(200, 0) > 0
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "OUTSIDE SECRET"


async def test_a_hard_link_to_a_file_outside(start_sidecar, client, root, outside):
    os.link(outside / "secret.txt", root / "linked.txt")
    sc = await start_sidecar(files_policy(root))
    async with client.get(f"{sc.url}/docs/linked.txt") as r:
        document = await refused(r, 403, "forbidden", root)
        assert "hard link" in document["detail"]
    async with client.get(f"{sc.url}/docs/linked.txt", headers={"Range": "bytes=0-5"}) as r:
        await refused(r, 403, "forbidden", root)
    async with client.get(f"{sc.url}/docs/") as r:
        assert (await r.json())["entries"] == []
    # Replacing it replaces the name inside the root only (rename): the outside file stays.
    async with client.put(f"{sc.url}/docs/linked.txt", data=b"new") as r:
        assert r.status == 204
    assert (outside / "secret.txt").read_text() == "OUTSIDE SECRET"
    assert (root / "linked.txt").read_text() == "new"


async def test_a_fifo_is_never_opened(start_sidecar, client, root):
    os.mkfifo(root / "pipe.txt")
    sc = await start_sidecar(files_policy(root))
    # Opened for reading, a FIFO with no writer would hold the call forever.
    async with asyncio.timeout(10):
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            async with client.request(method, f"{sc.url}/docs/pipe.txt", data=b"x") as r:
                assert r.status == 403
                if method != "HEAD":
                    await refused(r, 403, "forbidden", root)
    assert stat.S_ISFIFO(os.lstat(root / "pipe.txt").st_mode)
    async with client.get(f"{sc.url}/docs/") as r:
        assert (await r.json())["entries"] == []


async def test_a_socket_is_never_opened(start_sidecar, client, root):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "s.txt"))
        server.listen()
        sc = await start_sidecar(files_policy(root))
        async with client.get(f"{sc.url}/docs/s.txt") as r:
            await refused(r, 403, "forbidden", root)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs CAP_MKNOD")
async def test_a_device_file_is_never_opened(start_sidecar, client, root):
    # /dev/zero's numbers: opened and read, it would never end.
    os.mknod(root / "zero.txt", 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    sc = await start_sidecar(files_policy(root))
    async with asyncio.timeout(10):
        async with client.get(f"{sc.url}/docs/zero.txt") as r:
            document = await refused(r, 403, "forbidden", root)
            assert "not a regular file" in document["detail"]
        async with client.put(f"{sc.url}/docs/zero.txt", data=b"x") as r:
            await refused(r, 403, "forbidden", root)
    assert stat.S_ISCHR(os.lstat(root / "zero.txt").st_mode)


async def test_prefix_match_escape_cve_2025_53110(tmp_path, start_sidecar, client):
    """The MCP filesystem server allowed /data-evil/x with root /data: a string-prefix
    check. Here no form of the path reaches the sibling directory."""
    base = tmp_path / "srv"
    data = base / "data"
    evil = base / "data-evil"
    data.mkdir(parents=True)
    evil.mkdir()
    (evil / "x.txt").write_text("EVIL")
    (data / "mine.txt").write_text("mine")
    sc = await start_sidecar(files_policy(data))
    for path in (
        "/docs/../data-evil/x.txt",
        "/docs/%2e%2e/data-evil/x.txt",
        "/docs/..%2Fdata-evil%2Fx.txt",
        "/docs/-evil/x.txt",
        "/docs" + str(evil / "x.txt"),
        "/docs/" + str(evil / "x.txt"),
    ):
        async with client.get(url(sc.url, path)) as r:
            assert r.status in (400, 404), path
            assert "EVIL" not in await r.text()
        async with client.put(url(sc.url, path), data=b"pwned") as r:
            assert r.status in (400, 404, 201), path
    assert (evil / "x.txt").read_text() == "EVIL"
    assert sorted(os.listdir(evil)) == ["x.txt"]
    # The same with per-agent roots: alice never reaches alice-evil's files.
    (data / "alice-evil").mkdir()
    (data / "alice-evil" / "x.txt").write_text("EVIL")
    sc = await start_sidecar(files_policy(data, per_agent=True))
    for path in ("/docs/../alice-evil/x.txt", "/docs/%2e%2e/alice-evil/x.txt", "/docs/-evil/x.txt"):
        async with client.get(url(sc.url, path), headers={"X-Agent-Id": "alice"}) as r:
            assert r.status in (400, 404), path
            assert "EVIL" not in await r.text()


async def test_symlink_escape_cve_2025_53109(start_sidecar, client, root, outside):
    """The MCP filesystem server checked the path as written, then followed a symlink
    inside the allowed directory to any file (reading or writing it). Here a symlink
    is never followed: to a file, to a directory, or to a file not yet created."""
    (root / "passwd.txt").symlink_to(outside / "secret.txt")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "dangling.txt").symlink_to(outside / "created-by-agent.txt")
    sc = await start_sidecar(files_policy(root))
    for method, path in (
        ("GET", "/docs/passwd.txt"),
        ("PUT", "/docs/passwd.txt"),
        ("GET", "/docs/escape/secret.txt"),
        ("PUT", "/docs/escape/secret.txt"),
        ("PUT", "/docs/dangling.txt"),
        ("GET", "/docs/escape/"),
    ):
        async with client.request(method, f"{sc.url}{path}", data=b"pwned") as r:
            body = await r.text()
            assert "OUTSIDE" not in body
            await refused(r, 403, "forbidden", root)
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "OUTSIDE SECRET"


async def test_refusals_never_name_the_root(start_sidecar, client, root, outside):
    """The canary is part of the root's path: no refusal's body or headers hold it."""
    (root / "link.txt").symlink_to(outside / "secret.txt")
    os.link(outside / "secret.txt", root / "hard.txt")
    os.mkfifo(root / "fifo.txt")
    (root / "dir").mkdir()
    (root / "short.txt").write_text("abc")
    sc = await start_sidecar(files_policy(root, max_size=4, extensions=[".txt"]))
    for method, path, headers in (
        ("GET", "/docs/missing.txt", {}),
        ("GET", "/docs/missing/", {}),
        ("GET", "/docs/link.txt", {}),
        ("GET", "/docs/hard.txt", {}),
        ("GET", "/docs/fifo.txt", {}),
        ("GET", "/docs/dir", {}),
        ("GET", "/docs/x.exe", {}),
        ("GET", "/docs/short.txt", {"Range": "bytes=9-"}),
        ("GET", "/docs/short.txt", {"If-Match": '"x"'}),
        ("PUT", "/docs/short.txt", {"If-None-Match": "*"}),
        ("PUT", "/docs/big.txt", {}),
        ("PUT", "/docs/dir", {}),
        ("GET", "/docs/%2e%2e/x.txt", {}),
        ("GET", "/docs/a%00.txt", {}),
        ("POST", "/docs/short.txt", {}),
    ):
        async with client.request(method, url(sc.url, path), data=b"12345", headers=headers) as r:
            assert r.status >= 400, path
            await refused(r, r.status, r.headers["X-Sidecar-Error"], root)


async def test_root_gone_is_an_internal_error_without_its_path(tmp_path, start_sidecar, client):
    root = tmp_path / "root-canary-5c0ffee-gone"
    sc = await start_sidecar(files_policy(root))
    async with client.get(f"{sc.url}/docs/a.txt") as r:
        document = await refused(r, 500, "internal_error", root)
        assert "root directory" in document["detail"]


@pytest.mark.parametrize(
    "target",
    [
        "/../x",
        "/%2e%2e/x",
        "/a/%2E./x",
        "/..%2fx",
        "/a\\..\\x",
        "//etc/passwd",
        "/%2Fetc",
        "/a%00b",
        "/a%5cb",
        "/a/./b",
    ],
)
def test_parse_refuses_escapes_on_its_own(target):
    """The egress refuses most of these first; the files service does not rely on it."""
    with pytest.raises(ProblemError) as caught:
        paths.parse(target)
    assert caught.value.reason == "bad_request"


def test_parse_keeps_plain_names():
    parsed = paths.parse("/notes/%C3%A9t%C3%A9%20x.md?download=1")
    assert parsed.parts == ("notes", "été x.md")
    assert not parsed.directory
    assert paths.parse("/").parts == ()
    assert paths.parse("/a/b/").directory


def test_beneath_refuses_a_symlink_anywhere(root: Path, outside: Path):
    (root / "a").mkdir()
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    beneath = paths.Beneath(str(root), None, create=False)
    try:
        with pytest.raises(ProblemError) as caught:
            beneath.directory(("a", "b"))
        assert caught.value.reason == "forbidden"
        with pytest.raises(ProblemError):
            beneath.directory(("a", "b", "c"), create=True)
    finally:
        beneath.close()
    assert sorted(os.listdir(outside)) == ["secret.txt"]
