"""Command line: `sidecar run | record | replay | validate | check | schema | templates |
import | inject`.

Every flag has an environment variable (SIDECAR_<FLAG>), so a container can be
configured without a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import filecmp
import gc
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .policy.testing import CassetteOverride
    from .runtime import Sidecar

log = logging.getLogger("sidecar")


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SIDECAR_{name}", default)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _policies_option(parser: argparse.ArgumentParser) -> None:
    """--policies DIR, required unless SIDECAR_POLICIES gives it."""
    parser.add_argument(
        "--policies",
        default=_env("POLICIES"),
        required=_env("POLICIES") is None,
        metavar="DIR",
        help="policy directory (env SIDECAR_POLICIES)",
    )


def _optional_hostport(value: str | None) -> tuple[str, int] | None:
    return parse_hostport(value) if value else None


def _serving_options() -> argparse.ArgumentParser:
    """The options of every command that serves agents (run, record, replay), defined once."""
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument(
        "--listen",
        type=parse_hostport,
        default=parse_hostport(_env("LISTEN", "127.0.0.1:15000") or ""),
        metavar="HOST:PORT",
        help="egress listener (env SIDECAR_LISTEN, default 127.0.0.1:15000)",
    )
    serving.add_argument(
        "--admin",
        type=parse_hostport,
        default=parse_hostport(_env("ADMIN", "127.0.0.1:15001") or ""),
        metavar="HOST:PORT",
        help="admin listener and console (env SIDECAR_ADMIN, default 127.0.0.1:15001); "
        "any non-loopback address needs an admin token (admin.token, SIDECAR_ADMIN_TOKEN)",
    )
    serving.add_argument(
        "--probes",
        type=parse_hostport,
        default=_optional_hostport(_env("PROBES")),
        metavar="HOST:PORT",
        help="a listener that answers only /healthz and /readyz, for kubelet probes over "
        "the pod IP while the admin port stays on loopback (env SIDECAR_PROBES; default off)",
    )
    serving.add_argument(
        "--ingress",
        type=parse_hostport,
        default=parse_hostport(_env("INGRESS", "0.0.0.0:15002") or ""),
        metavar="HOST:PORT",
        help="inbound webhook listener, opened only when the policy declares inbound "
        "webhooks (env SIDECAR_INGRESS, default 0.0.0.0:15002)",
    )
    serving.add_argument(
        "--data-dir",
        default=_env("DATA_DIR", "sidecar-data"),
        metavar="DIR",
        help="durable state: the webhook queue and LLM budgets, SQLite (env SIDECAR_DATA_DIR, "
        "default ./sidecar-data)",
    )
    serving.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="env SIDECAR_LOG_LEVEL",
    )
    serving.add_argument(
        "--drain",
        type=float,
        default=float(_env("DRAIN", "10") or 10),
        metavar="SECONDS",
        help="on SIGTERM, let calls in flight finish for this long (env SIDECAR_DRAIN)",
    )
    serving.add_argument(
        "--access-log",
        action="store_true",
        default=_flag(_env("ACCESS_LOG")),
        help="one JSON line per request on stdout (env SIDECAR_ACCESS_LOG=1); "
        "tracing is configured by the standard OTEL_* variables",
    )
    return serving


def _discovery_parsers(sub: Any) -> None:
    """`sidecar discover` and `sidecar learn`; their code is imported only when they run."""
    disc = sub.add_parser(
        "discover", help="probe a live API and draft its service policy (OpenAPI, GraphQL, MCP)"
    )
    disc.add_argument("url", metavar="URL", help="the API's base URL")
    disc.add_argument("--name", help="service name (default: from the host)")
    disc.add_argument("--out", "-o", metavar="FILE", help="write the policy here (default: stdout)")
    disc.add_argument(
        "--header",
        "-H",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header sent with every probe; ${env:NAME} in VALUE is read from the environment",
    )
    disc.add_argument(
        "--max-requests", type=int, default=40, help="probes sent at most (default 40)"
    )
    disc.add_argument(
        "--timeout", type=float, default=20.0, help="seconds for the whole run (default 20)"
    )

    learn = sub.add_parser(
        "learn",
        help="an OpenAPI document and least-privilege allow rules from recorded traffic",
    )
    learn.add_argument("--cassettes", action="append", default=[], metavar="DIR")
    learn.add_argument("--access-log", action="append", default=[], metavar="FILE")
    learn.add_argument(
        "--observed",
        action="append",
        default=[],
        metavar="DIR",
        help="the --data-dir of a sidecar with services in mode: observe",
    )
    learn.add_argument("--service", action="append", default=[], metavar="NAME")
    learn.add_argument("--out", "-o", metavar="DIR", help="where to write (default ./learned)")
    learn.add_argument("--upstream", metavar="URL", help="the upstream of the written policy")
    learn.add_argument("--since", metavar="24h|DATE", help="only calls since then")
    learn.add_argument(
        "--diff", action="store_true", help="list calls the policy does not cover; exit 1 if any"
    )
    learn.add_argument("--policies", metavar="DIR", help="the policy in force (for --diff)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar", description="Egress proxy for AI agents, steered by YAML policies."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serving = _serving_options()
    run = sub.add_parser(
        "run", parents=[serving], help="serve agents' calls with the policies in DIR"
    )
    _policies_option(run)
    run.add_argument(
        "--mode",
        choices=("live", "record", "replay", "observe"),
        default=_env("MODE"),
        help="answer every service this way, whatever its policy's mode (mock services "
        "stay mocked): record saves exchanges to cassettes, replay answers from them "
        "(env SIDECAR_MODE)",
    )

    # `sidecar run --mode record|replay` with the policy directory as its argument, and
    # the flags a test run wants (sidecar/policy/testing.py CassetteOverride).
    record = sub.add_parser(
        "record",
        parents=[serving],
        help="run with every service in mode record: each exchange saved to its cassettes",
        description="`sidecar run --policies DIR --mode record`: every service but mocked "
        "ones calls its upstream and saves each exchange, redacted, as a JSON file of its "
        "cassette directory.",
    )
    replay = sub.add_parser(
        "replay",
        parents=[serving],
        help="run with every service in mode replay: answered from its cassettes, "
        "no upstream contacted",
        description="`sidecar run --policies DIR --mode replay`: every service but mocked "
        "ones answers from its cassettes; a call with no recording gets 501 no_recording "
        "(or, with --passthrough, goes to the upstream).",
    )
    for mode, shortcut in (("record", record), ("replay", replay)):
        shortcut.add_argument(
            "policies",
            nargs="?",
            default=_env("POLICIES"),
            metavar="DIR",
            help="policy directory (env SIDECAR_POLICIES)",
        )
        shortcut.add_argument(
            "--cassettes",
            default=_env("CASSETTES"),
            metavar="DIR",
            help="cassettes of every service in DIR/<service>/, instead of where each "
            "service's cassettes.dir says (env SIDECAR_CASSETTES)",
        )
        shortcut.set_defaults(mode=mode)
    replay.add_argument(
        "--fast",
        action="store_true",
        default=_flag(_env("FAST")),
        help="SSE answers at once, not at their recorded pace, for every service "
        "(env SIDECAR_FAST=1)",
    )
    replay.add_argument(
        "--passthrough",
        action="store_true",
        default=_flag(_env("PASSTHROUGH")),
        help="a call with no recording goes to the upstream (not recorded) instead of "
        "a 501 no_recording, for every service (env SIDECAR_PASSTHROUGH=1)",
    )

    validate = sub.add_parser("validate", help="check a policy directory; exit 1 on errors")
    validate.add_argument("dir", metavar="DIR")
    validate.add_argument(
        "--resolve-secrets",
        action="store_true",
        help="also read every ${env:} and ${file:} secret (by default only their form is checked)",
    )

    check = sub.add_parser(
        "check", help="probe each service: DNS, TCP, TLS and its credential; exit 1 on a failure"
    )
    check.add_argument("services", nargs="*", metavar="SERVICE", help="default: every service")
    _policies_option(check)
    check.add_argument("--json", action="store_true", help="one JSON document on stdout")

    sub.add_parser("schema", help="print the policy JSON Schema")

    templates = sub.add_parser(
        "templates", help="list service templates; `templates show NAME` prints one expanded"
    )
    templates.add_argument(
        "--policies",
        default=_env("POLICIES"),
        metavar="DIR",
        help="also list the templates in DIR/templates/ (env SIDECAR_POLICIES)",
    )
    templates_sub = templates.add_subparsers(dest="templates_command")
    show = templates_sub.add_parser("show", help="print a template as a policy file")
    show.add_argument("name", metavar="NAME")
    show.add_argument(
        "--policies",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="also look in DIR/templates/",
    )

    imp = sub.add_parser("import", help="write a service policy from an API description")
    kinds = imp.add_subparsers(dest="kind", required=True)
    oa = kinds.add_parser("openapi", help="from an OpenAPI 3.0/3.1 document (JSON or YAML)")
    oa.add_argument("spec", metavar="SPEC", help="the OpenAPI document")
    oa.add_argument("--name", help="service name (default: from the document's title)")
    oa.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the policy here (default: stdout); `openapi:` is then relative to FILE, "
        "and a document outside FILE's directory is copied beside it",
    )
    oa.add_argument(
        "--upstream", metavar="URL", help="upstream URL instead of the document's first server"
    )

    _discovery_parsers(sub)

    inject = sub.add_parser("inject", help="serve the Kubernetes sidecar-injection webhook")
    try:
        from . import inject as inject_mod
    except ImportError:
        inject_mod = None  # type: ignore[assignment]
    if inject_mod is not None:
        inject_mod.configure_parser(inject)
    return parser


def cmd_validate(directory: str, *, resolve_secrets: bool) -> int:
    from .policy.loader import PolicyError, load_policy

    # The listeners `sidecar run` would open here (SIDECAR_* or the defaults): a
    # webhook delivered to one of them is refused now, not at the first delivery.
    listeners = []
    for name, default in (
        ("LISTEN", "127.0.0.1:15000"),
        ("ADMIN", "127.0.0.1:15001"),
        ("INGRESS", "0.0.0.0:15002"),
    ):
        with contextlib.suppress(argparse.ArgumentTypeError):
            listeners.append(parse_hostport(_env(name, default) or default))
    try:
        policy = load_policy(directory, resolve_secrets=resolve_secrets, listeners=tuple(listeners))
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"ok: {len(policy.services)} services from {len(policy.files)} files")
    return 0


def cmd_import_openapi(args: argparse.Namespace) -> int:
    from .discovery.importer import policy_yaml, service_name, upstream_url
    from .openapi import OpenAPIError, load
    from .policy.base import _service_name
    from .policy.models import Service

    try:
        # Compiled, not only parsed: a document the sidecar could not load is refused here.
        spec = load(os.path.abspath(args.spec))
        document = spec.document
    except OpenAPIError as exc:
        print(f"sidecar import: {exc}", file=sys.stderr)
        return 1
    stem = os.path.splitext(os.path.basename(args.spec))[0]
    name = args.name or service_name(document, stem, upstream_url(document, args.upstream, []))
    try:
        _service_name(name)
        if args.upstream is not None:
            Service.model_validate({"upstream": args.upstream})
    except ValueError as exc:
        print(f"sidecar import: {str(exc).splitlines()[-1].strip()}", file=sys.stderr)
        return 2
    base = os.path.dirname(os.path.abspath(args.output)) if args.output else os.getcwd()
    source = os.path.abspath(args.spec)
    ref = os.path.relpath(source, base)
    if args.output and (ref == os.pardir or ref.startswith(os.pardir + os.sep)):
        # A policy directory travels alone (a ConfigMap, a container image): the document
        # goes beside the policy, never referred to outside it.
        ref = os.path.basename(source)
        beside = os.path.join(base, ref)
        if os.path.exists(beside) and not filecmp.cmp(source, beside, shallow=False):
            print(
                f"sidecar import: {beside} exists and is another document; move it, or "
                "import from a copy of the document inside the output's directory",
                file=sys.stderr,
            )
            return 1
        shutil.copyfile(source, beside)
        print(f"copied {args.spec} beside the policy, to {beside}", file=sys.stderr)
    text = policy_yaml(document, spec_ref=ref, name=name, upstream=args.upstream, source=args.spec)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote service '{name}' ({spec.count} operations) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import format_lines, run_checks

    # Quiet: the sidecar's own log lines (policy loaded...) are not the report.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Load errors are printed below, once.
    logging.getLogger("sidecar").setLevel(logging.CRITICAL)
    results, errors = asyncio.run(run_checks(args.policies, args.services))
    for error in errors:
        print(f"sidecar check: {error}", file=sys.stderr)
    ok = not errors and all(r.ok for r in results)
    if args.json:
        # Always a JSON document, also when the policy is refused: CI parses it.
        report: dict[str, Any] = {"ok": ok, "services": [r.as_dict() for r in results]}
        if errors:
            report["errors"] = errors
        print(json.dumps(report, indent=2))
    elif not errors:
        for line in format_lines(results, colour=sys.stdout.isatty()):
            print(line)
    return 0 if ok else 1


def cmd_schema() -> int:
    from .policy.models import PolicyFile

    schema = PolicyFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    print(json.dumps(schema, indent=2))
    return 0


def cmd_templates(policies: str | None, show: str | None) -> int:
    from .policy.base import _did_you_mean
    from .policy.templates import catalog, expanded_policy

    found = catalog(policies)
    for problem in found.problems:
        print(problem, file=sys.stderr)
    if show is None:
        rows = sorted(found.templates.values(), key=lambda t: t.name)
        width = max((len(t.name) for t in rows), default=4)
        for t in rows:
            print(f"{t.name:<{width}}  {t.description}  [{t.source}]")
        return 1 if found.problems else 0
    template = found.templates.get(show)
    if template is None:
        hint = _did_you_mean(show, list(found.templates))
        print(f"sidecar: unknown template '{show}'{hint}", file=sys.stderr)
        return 1
    print(expanded_policy(template), end="")
    return 0


def _cassette_override(args: argparse.Namespace) -> CassetteOverride | None:
    """`sidecar record|replay` flags; None for `sidecar run`, whose cassettes are the policy's."""
    if args.command == "run":
        return None
    from .policy.testing import CassetteOverride

    return CassetteOverride(
        # Resolved here: relative to where the command was typed, like DIR.
        root=os.path.abspath(args.cassettes) if args.cassettes else None,
        pacing="fast" if getattr(args, "fast", False) else None,
        on_missing="passthrough" if getattr(args, "passthrough", False) else None,
    )


async def _run(args: argparse.Namespace) -> int:
    from .app import compose
    from .policy.child import load_in_child
    from .runtime import Sidecar
    from .telemetry import Telemetry, access

    telemetry = Telemetry.from_env(access_log=args.access_log)
    access_writer = access.configure() if telemetry.access_log else None
    sidecar = compose(
        Sidecar(
            args.policies,
            telemetry=telemetry,
            data_dir=args.data_dir,
            mode=args.mode,
            cassettes=_cassette_override(args),
            listeners=(args.listen, args.admin, args.ingress),
            load=load_in_child,
        )
    )
    try:
        return await _serve(sidecar, args)
    finally:
        await sidecar.close()
        if access_writer is not None:
            access_writer.stop()  # writes out the lines still queued


async def _serve(sidecar: Sidecar, args: argparse.Namespace) -> int:
    from .app import ListenError, serve

    if not (await sidecar.reload("startup")).ok:
        return 1  # the reload logged each error, once
    try:
        runners = await serve(
            sidecar,
            listen=args.listen,
            admin=args.admin,
            drain=args.drain,
            ingress=args.ingress,
            probes=args.probes,
        )
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    sidecar.start_watching()
    _announce_cassettes(sidecar)
    from .core import memory

    # Everything made so far lives as long as the process: move it out of the
    # collector's sight, so the full collections that interrupt serving are short.
    # What loading left behind goes back to the system first (RSS at idle).
    memory.release()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    # The bound addresses, not the asked-for ones: port 0 picks a free port.
    egress, admin = (runner.addresses[0][:2] for runner in runners[:2])
    log.info("egress on http://%s:%d, admin on http://%s:%d", *egress, *admin)
    for runner in runners[2:]:
        what = "ingress (inbound webhooks)" if runner.name == "ingress" else "probes"
        log.info("%s on http://%s:%d", what, *runner.addresses[0][:2])

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        task = loop.create_task(sidecar.reload("signal"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_stop(signum: int) -> None:
        if stop.is_set():
            # The operator asked twice: do not make them wait for the drain.
            log.warning(
                "%s again: exiting now, calls in flight are cut", signal.Signals(signum).name
            )
            sys.stderr.flush()
            os._exit(128 + signum)
        # Not ready from this moment, so Kubernetes stops sending calls while we drain.
        sidecar.begin_drain()
        stop.set()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    await stop.wait()
    log.info("stopping: letting calls in flight finish (up to %gs)", args.drain)
    # The admin and probes ports close last: while calls drain, /readyz keeps
    # answering 503 (draining) to new probes instead of refusing them.
    last = ("admin", "probes")
    serving = [runner for runner in runners if runner.name not in last]
    await asyncio.gather(*(runner.shutdown(args.drain) for runner in serving))
    for runner in (*serving, *(runner for runner in runners if runner.name in last)):
        await runner.cleanup()
    if sidecar.policy is not None:
        from .steps.answers.cassette import written_summary

        for line in written_summary(list(sidecar.policy.services.values())):
            log.info("%s", line)
    return 0


def _announce_cassettes(sidecar: Sidecar) -> None:
    """Record and replay say where their cassettes are (and, at exit, how many were written)."""
    policy = sidecar.policy
    if policy is None:
        return
    services = [s for s in policy.services.values() if s.spec.mode in ("record", "replay")]
    if services:
        from .steps.answers.cassette import announce

        announce(services)


def _event_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Flushed here, so a reader that left early is seen inside this try.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`sidecar schema | head`): no traceback for that. Python
        # would try to flush stdout again at exit; it goes to /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        return cmd_validate(args.dir, resolve_secrets=args.resolve_secrets)
    if args.command == "schema":
        return cmd_schema()
    if args.command == "check":
        return cmd_check(args)
    if args.command == "templates":
        name = args.name if args.templates_command == "show" else None
        return cmd_templates(args.policies, name)
    if args.command == "import":
        return cmd_import_openapi(args)
    if args.command == "learn":
        from .learn.command import main as learn_main

        return learn_main(
            cassettes=args.cassettes,
            access_logs=args.access_log,
            observed=args.observed,
            services=args.service,
            out=args.out,
            upstream=args.upstream,
            since=args.since,
            diff=args.diff,
            policies=args.policies,
        )
    if args.command == "discover":
        from .discovery.command import run as discover_run

        return discover_run(args)
    if args.command in ("record", "replay") and args.policies is None:
        parser.error(f"{args.command}: give the policy directory DIR (or SIDECAR_POLICIES)")
    logging.basicConfig(
        level=getattr(args, "log_level", _env("LOG_LEVEL", "info") or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "inject":
        from . import inject as inject_mod

        return inject_mod.run(args)
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
