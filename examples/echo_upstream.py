"""A local upstream for the example policy: answers with what it received.

`make run` starts it on 127.0.0.1:15080 beside the sidecar, so the README's
first call answers on a fresh machine, offline and without keys:

    curl -H 'X-Agent-Id: research-bot' http://127.0.0.1:15000/example/hello

The answer shows the request as the upstream got it: the path without the
service's prefix, and the headers the sidecar added (policies/example.yaml).
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": dict(request.headers),
            "body": body.decode("utf-8", "replace"),
        },
        dumps=lambda value: json.dumps(value, indent=2) + "\n",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=15080)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda _: print(f"echo upstream on http://{args.host}:{args.port}", flush=True),
    )


if __name__ == "__main__":
    main()
