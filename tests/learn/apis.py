"""Three real-shaped APIs for `sidecar learn`, as aiohttp apps, and the traffic agents send.

- `github_app`: nested resources (`/repos/{owner}/{repo}/issues/{number}`), a bearer
  token it checks, JSON answers with dates, nullable fields and enums.
- `openai_app`: an OpenAI-compatible API (`/v1/models/{model}`, chat completions).
- `ledger_app`: a paginated list API with UUIDs and prefixed ids (`inv_...`).
Each `*_traffic` is the list of calls two agents make: (agent, method, path, json body).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

TOKEN = "ghp-canary-learn-7c1d"  # the service's credential: must never be learned
AGENT_SECRET = "agent-canary-9f8e"  # what an agent put in a body or a query

Call = tuple[str, str, str, Any]


def github_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        parts = [p for p in request.path.split("/") if p]
        if parts[0] == "repos" and len(parts) == 3:
            return web.json_response(
                {
                    "id": 7,
                    "full_name": f"{parts[1]}/{parts[2]}",
                    "private": False,
                    "visibility": "public",
                    "created_at": "2020-01-01T00:00:00Z",
                    "homepage": None,
                }
            )
        if parts[0] == "repos" and len(parts) == 4 and request.method == "POST":
            body = await request.json()
            return web.json_response(
                {"number": 12, "title": body["title"], "state": "open"}, status=201
            )
        if parts[0] == "repos" and len(parts) == 4:
            state = request.query.get("state", "open")
            return web.json_response([{"number": 1, "state": state, "title": "t", "labels": []}])
        if parts[0] == "repos" and len(parts) == 5:
            return web.json_response(
                {
                    "number": int(parts[4]),
                    "state": "closed",
                    "title": "x",
                    "labels": [{"name": "bug"}],
                }
            )
        if parts[0] == "users":
            return web.json_response({"login": parts[1], "id": 1, "type": "User"})
        if parts[0] == "orgs":
            return web.json_response([{"id": 1, "name": "r"}])
        return web.json_response({"message": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


github_traffic: list[Call] = [
    ("research-bot", "GET", "/repos/python/cpython", None),
    ("research-bot", "GET", "/repos/psf/black", None),
    ("research-bot", "GET", "/repos/python/cpython/issues?state=open&per_page=5", None),
    ("research-bot", "GET", "/repos/psf/black/issues?state=closed", None),
    ("research-bot", "GET", "/repos/python/cpython/issues/101", None),
    ("research-bot", "GET", "/repos/psf/black/issues/7", None),
    ("research-bot", "GET", "/users/octocat", None),
    ("research-bot", "GET", "/users/gvanrossum", None),
    ("research-bot", "GET", "/orgs/python/repos", None),
    (
        "triage-bot",
        "POST",
        "/repos/psf/black/issues",
        {"title": "crash", "body": AGENT_SECRET, "labels": ["bug"]},
    ),
    (
        "triage-bot",
        "POST",
        "/repos/python/cpython/issues",
        {"title": "slow", "body": "details", "labels": []},
    ),
    ("triage-bot", "GET", "/repos/python/cpython/issues/101", None),
]
github_expected = {
    ("GET", "/repos/{owner}/{repo}"),
    ("GET", "/repos/{owner}/{repo}/issues"),
    ("POST", "/repos/{owner}/{repo}/issues"),
    ("GET", "/repos/{owner}/{repo}/issues/{issue_id}"),
    ("GET", "/users/{user}"),
    ("GET", "/orgs/{org}/repos"),
}


def openai_app() -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "id": "chatcmpl-" + uuid.uuid4().hex[:12],
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

    async def model(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["model"], "object": "model"})

    async def embeddings(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"embedding": [0.1, 0.2], "index": 0}]}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def _chat(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0}


openai_traffic: list[Call] = [
    ("research-bot", "POST", "/v1/chat/completions", _chat("gpt-4o", "hello")),
    ("research-bot", "POST", "/v1/chat/completions", _chat("gpt-4o-mini", AGENT_SECRET)),
    ("research-bot", "GET", "/v1/models", None),
    ("research-bot", "GET", "/v1/models/gpt-4o", None),
    ("research-bot", "GET", "/v1/models/gpt-4o-mini", None),
    ("embed-bot", "POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
]
openai_expected = {
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/v1/embeddings"),
}

ITEMS = [str(uuid.UUID(int=i + 1)) for i in range(4)]


def ledger_app() -> web.Application:
    async def items(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        return web.json_response(
            {
                "items": [{"id": i, "amount": 5, "currency": "EUR"} for i in ITEMS],
                "page": page,
                "next": None,
            }
        )

    async def item(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.json_response({"id": request.match_info["id"], "amount": 5, "currency": "USD"})

    async def invoices(request: web.Request) -> web.Response:
        return web.json_response([{"id": "inv_8f7d6c5b4a", "due": "2026-01-31"}])

    async def invoice(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": request.match_info["inv"], "due": "2026-01-31", "paid": True}
        )

    app = web.Application()
    app.router.add_get("/items", items)
    app.router.add_route("*", "/items/{id}", item)
    app.router.add_get("/accounts/{account}/invoices", invoices)
    app.router.add_get("/accounts/{account}/invoices/{inv}", invoice)
    return app


ledger_traffic: list[Call] = [
    ("billing-bot", "GET", "/items?page=1&limit=50", None),
    ("billing-bot", "GET", "/items?page=2&limit=50&api_key=" + AGENT_SECRET, None),
    ("billing-bot", "GET", f"/items/{ITEMS[0]}", None),
    ("billing-bot", "GET", f"/items/{ITEMS[1]}", None),
    ("billing-bot", "DELETE", f"/items/{ITEMS[2]}", None),
    ("billing-bot", "GET", "/accounts/1042/invoices", None),
    ("billing-bot", "GET", "/accounts/2077/invoices/inv_8f7d6c5b4a", None),
    ("billing-bot", "GET", "/accounts/1042/invoices/inv_1a2b3c4d5e", None),
]
ledger_expected = {
    ("GET", "/items"),
    ("GET", "/items/{item_id}"),
    ("DELETE", "/items/{item_id}"),
    ("GET", "/accounts/{account_id}/invoices"),
    ("GET", "/accounts/{account_id}/invoices/{invoice_id}"),
}

APIS = {
    "github": (github_app, github_traffic, github_expected),
    "openai": (openai_app, openai_traffic, openai_expected),
    "ledger": (ledger_app, ledger_traffic, ledger_expected),
}
