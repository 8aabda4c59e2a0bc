"""Redirects from an upstream keep the agent on the sidecar (issue 7, item 2)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.http.redirects import RedirectRewriter
from tests.helpers import sidecar_process

TOKEN = "redirect-test-token"


class Redirecting:
    """An upstream with httpbin's redirects; it records the path and credential of each hit."""

    def __init__(self) -> None:
        self.base = ""  # its own URL, known once started
        self.seen: list[tuple[str, str | None]] = []
        self.location = ""  # what /fixed answers with

    def app(self) -> web.Application:
        async def relative(request: web.Request) -> web.Response:
            n = int(request.match_info["n"])
            to = "/get" if n <= 1 else f"/relative-redirect/{n - 1}"
            return self._redirect(request, 302, to)

        async def moved(request: web.Request) -> web.Response:
            # GitHub's answer for a renamed repository: the new name, as an absolute URL.
            tail = request.match_info["tail"]
            return self._redirect(request, 301, f"{self.base}/renamed/{tail}?per_page=5")

        async def fixed(request: web.Request) -> web.Response:
            return self._redirect(request, 302, self.location)

        async def final(request: web.Request) -> web.Response:
            self.seen.append((request.path_qs, request.headers.get("Authorization")))
            return web.json_response({"path": request.path_qs})

        app = web.Application()
        app.router.add_get("/relative-redirect/{n}", relative)
        app.router.add_get("/api/v1/relative-redirect/{n}", relative)
        app.router.add_get("/old/{tail:.*}", moved)
        app.router.add_get("/fixed", fixed)
        app.router.add_get("/api/v1/fixed", fixed)
        app.router.add_get("/{tail:.*}", final)
        return app

    def _redirect(self, request: web.Request, status: int, location: str) -> web.Response:
        self.seen.append((request.path_qs, request.headers.get("Authorization")))
        return web.Response(status=status, headers={"Location": location})


def policy(base: str, extra: str = "") -> str:
    return f"""
    version: 1
    services:
      svc:
        upstream: {base}
        auth: {{type: bearer, token: {TOKEN}}}
        {extra}
    """


@pytest.fixture
async def redirecting(upstream) -> Redirecting:
    server = Redirecting()
    server.base = await upstream(server.app())
    return server


async def test_a_followed_relative_redirect_stays_on_the_sidecar(
    redirecting, start_sidecar, client
):
    sc = await start_sidecar(policy(redirecting.base))
    async with client.get(f"{sc.url}/svc/relative-redirect/2") as r:
        assert r.status == 200, await r.text()
        assert r.url == URL(f"{sc.url}/svc/get")
        assert [str(h.url) for h in r.history] == [
            f"{sc.url}/svc/relative-redirect/2",
            f"{sc.url}/svc/relative-redirect/1",
        ]
    # Every hop went through the sidecar: the credential was injected each time.
    assert redirecting.seen == [
        ("/relative-redirect/2", f"Bearer {TOKEN}"),
        ("/relative-redirect/1", f"Bearer {TOKEN}"),
        ("/get", f"Bearer {TOKEN}"),
    ]


async def test_an_absolute_location_naming_the_upstream_points_at_the_sidecar(
    redirecting, start_sidecar, client
):
    sc = await start_sidecar(policy(redirecting.base))
    async with client.get(f"{sc.url}/svc/old/repo", allow_redirects=False) as r:
        assert r.status == 301
        assert r.headers["Location"] == f"{sc.url}/svc/renamed/repo?per_page=5"
    async with client.get(f"{sc.url}/svc/old/repo") as r:
        assert r.status == 200
        assert await r.json() == {"path": "/renamed/repo?per_page=5"}
    assert redirecting.seen[-1] == ("/renamed/repo?per_page=5", f"Bearer {TOKEN}")


async def test_the_agents_host_name_is_kept(redirecting, start_sidecar, client):
    sc = await start_sidecar(policy(redirecting.base))
    port = URL(sc.url).port
    headers = {"Host": f"localhost:{port}"}
    async with client.get(f"{sc.url}/svc/old/r", headers=headers, allow_redirects=False) as r:
        assert r.headers["Location"] == f"http://localhost:{port}/svc/renamed/r?per_page=5"


async def test_locations_elsewhere_are_left_alone(redirecting, upstream, start_sidecar, client):
    other = await upstream(web.Application())  # the same host, another port
    sc = await start_sidecar(policy(redirecting.base))
    for location in (
        "https://example.org/login",
        f"{other}/x",
        redirecting.base.replace("http://", "https://") + "/x",
    ):
        redirecting.location = location
        async with client.get(f"{sc.url}/svc/fixed", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == location


async def test_redirects_pass_leaves_location_as_sent(redirecting, start_sidecar, client):
    sc = await start_sidecar(policy(redirecting.base, "redirects: pass"))
    async with client.get(f"{sc.url}/svc/old/repo", allow_redirects=False) as r:
        assert r.headers["Location"] == f"{redirecting.base}/renamed/repo?per_page=5"
    async with client.get(f"{sc.url}/svc/relative-redirect/1", allow_redirects=False) as r:
        assert r.headers["Location"] == "/get"


async def test_a_base_path_is_mapped_onto_the_prefix(redirecting, start_sidecar, client):
    sc = await start_sidecar(policy(f"{redirecting.base}/api/v1", "prefix: /gh"))
    cases = {
        f"{redirecting.base}/api/v1/users/2": f"{sc.url}/gh/users/2",
        f"{redirecting.base}/api/v1": f"{sc.url}/gh",
        "/api/v1/users/2?x=1#top": "/gh/users/2?x=1#top",
        "next?page=2": "/gh/next?page=2",  # resolved against /api/v1/fixed
        "../v1/users": "/gh/users",
        "/api/v1/../v2/users": "/api/v1/../v2/users",  # leaves the base path: untouched
        "/api/v2/users": "/api/v2/users",
        f"{redirecting.base}/api/v10": f"{redirecting.base}/api/v10",
    }
    for location, expected in cases.items():
        redirecting.location = location
        async with client.get(f"{sc.url}/gh/fixed", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == expected, location
    async with client.get(f"{sc.url}/gh/relative-redirect/1") as r:
        # /api/v1/relative-redirect/1 sends /get, outside the base path: the agent's
        # client lands on the sidecar's /get, which no service serves.
        assert r.status == 404
        assert r.headers["X-Sidecar-Error"] == "no_route"


async def test_content_location_is_rewritten_too(upstream, start_sidecar, client):
    async def created(request: web.Request) -> web.Response:
        base = f"http://{request.host}"
        return web.Response(
            status=201,
            headers={"Location": f"{base}/items/7", "Content-Location": f"{base}/items/7"},
        )

    app = web.Application()
    app.router.add_post("/items", created)
    base = await upstream(app)
    sc = await start_sidecar(policy(base))
    async with client.post(f"{sc.url}/svc/items", data=b"{}") as r:
        assert r.status == 201
        assert r.headers["Location"] == f"{sc.url}/svc/items/7"
        assert r.headers["Content-Location"] == f"{sc.url}/svc/items/7"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("HTTP://API.example.com:443/v1/a", "HTTP://API.example.com:443/v1/a"),  # port 443 on http
        ("https://API.example.com:443/v1/a", "http://sidecar:15000/ex/a"),
        ("//api.example.com/v1/a", "http://sidecar:15000/ex/a"),
        ("https://user@api.example.com/v1/a", "https://user@api.example.com/v1/a"),
        ("https://api.example.com:bad/v1/a", "https://api.example.com:bad/v1/a"),
        ("https://api.example.com/v1/a/../../x", "https://api.example.com/v1/a/../../x"),
        ("https://api.example.com/v1/a/./b/..", "http://sidecar:15000/ex/a/"),
        ("https://api.example.com", "https://api.example.com"),
        ("?page=2", "?page=2"),
        ("", ""),
    ],
)
def test_rewriter_edges(location: str, expected: str) -> None:
    rewriter = RedirectRewriter(upstream="https://api.example.com/v1", prefix="/ex")
    assert rewriter.rewrite(location, host="sidecar:15000", path="/ex/a/b") == expected


def test_rewriter_without_a_usable_host_answers_a_path() -> None:
    rewriter = RedirectRewriter(upstream="http://[::1]:8080", prefix="/")
    for host in (None, "evil.example/x", "a@b"):
        assert rewriter.rewrite("http://[::1]:8080/a", host=host, path="/z") == "/a"
    assert rewriter.rewrite("http://[::1]:8080/a", host="[::1]:1", path="/z") == "http://[::1]:1/a"


@pytest.mark.process
async def test_the_real_process_keeps_a_followed_redirect_on_the_sidecar(
    tmp_path: Path, redirecting
):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(textwrap.dedent(policy(redirecting.base)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    async with (
        sidecar_process(policies, env=env) as proc,
        aiohttp.ClientSession() as session,
        session.get(f"{proc.url}/svc/relative-redirect/2") as r,
    ):
        assert r.status == 200, await r.text()
        assert r.url == URL(f"{proc.url}/svc/get")
        async with session.get(f"{proc.url}/svc/old/repo") as moved:
            assert moved.status == 200
            assert moved.url == URL(f"{proc.url}/svc/renamed/repo?per_page=5")
    assert [auth for _, auth in redirecting.seen] == [f"Bearer {TOKEN}"] * 5
