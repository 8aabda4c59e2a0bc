"""Secret values: `${env:NAME}` and `${file:/path}` references, resolved at load time.

A resolved secret is a `Secret`: its repr, str and JSON form never show the
value, only where it came from, so printing a policy, logging a model or
dumping /config cannot leak it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_REF = re.compile(r"\$\{(env|file):([^}]*)\}")


@dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """A credential. `reveal()` is the only way to get at the text."""

    _value: str = field(compare=True)
    source: str = field(compare=False)
    # A reference left unread because only a service that never calls its upstream
    # (mode: mock, or replay without passthrough) uses it: its value is empty.
    unresolved: bool = field(default=False, compare=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.source})"

    def __str__(self) -> str:
        return self.source


class SecretResolver:
    """Resolves references during one load, recording which files were read.

    The watcher uses `files` to also watch the secrets' directories, so a
    rotated Kubernetes Secret (an atomic symlink swap) is picked up.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, check_only: bool = False) -> None:
        self.env = os.environ if env is None else env
        self.files: set[str] = set()
        # Of every secret file's content as read: a rotated secret changes the
        # policy version even when no policy file changed.
        self.digest = hashlib.sha256()
        # `sidecar validate` in CI checks the references, not the values: the
        # CI job rarely has the production secrets, and should not need them.
        self.check_only = check_only
        # `sidecar run --mode` and `sidecar replay --passthrough`, over each service's own.
        self.mode: str | None = None
        self.passthrough = False
        # True while a service that never calls its upstream is validated (mode: mock, or
        # replay without passthrough): a secret it cannot read is left unresolved, empty,
        # rather than refused, so the README's `sidecar replay ... --fast` needs no keys.
        self.offline = False

    def resolve(self, text: str) -> Secret:
        refs = list(_REF.finditer(text))
        if not refs:
            return Secret(text, "<redacted>")
        if self.offline and not self.check_only:
            try:
                return self._resolve(text)
            except ValueError:
                return Secret("", text, unresolved=True)
        return self._resolve(text)

    def calls_out(self, service: object) -> bool:
        """Whether a service (its raw mapping, templates expanded) may call its upstream."""
        if not isinstance(service, dict):
            return True
        own = service.get("mode")
        mode = own if self.mode is None or own == "mock" else self.mode
        if mode == "mock":
            return False
        if mode != "replay":
            return True
        cassettes = service.get("cassettes")
        on_missing = cassettes.get("on_missing") if isinstance(cassettes, dict) else None
        return self.passthrough or on_missing == "passthrough"

    def _resolve(self, text: str) -> Secret:
        def sub(m: re.Match[str]) -> str:
            kind, name = m.group(1), m.group(2).strip()
            if not name:
                raise ValueError(f"empty {kind} reference in '{m.group(0)}'")
            if self.check_only:
                if kind == "file" and not os.path.isabs(name):
                    raise ValueError(f"secret file path must be absolute: {name!r}")
                return "unresolved"
            if kind == "env":
                if name not in self.env:
                    raise ValueError(f"environment variable {name} is not set")
                return self.env[name]
            if not os.path.isabs(name):
                raise ValueError(f"secret file path must be absolute: {name!r}")
            self.files.add(name)
            try:
                with open(name, encoding="utf-8") as f:
                    content = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(f"cannot read secret file {name}: {reason}") from None
            self.digest.update(name.encode() + b"\0" + content.encode() + b"\0")
            # Secret files written by editors or kubectl often end in a newline.
            return content.rstrip("\r\n")

        return Secret(_REF.sub(sub, text), text)


def resolver_from_context(context: Any) -> SecretResolver:
    if isinstance(context, dict):
        resolver = context.get("secrets")
        if isinstance(resolver, SecretResolver):
            return resolver
    return SecretResolver()
