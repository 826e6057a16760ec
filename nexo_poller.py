#!/usr/bin/env python3
"""nexo-poller: a poller daemon and library in one standard-library file.

Out-of-process plugins, written in any language, serve poller *kinds* (rss,
gmail, a CRM).  The daemon schedules jobs from ``pollers.json``, routes each
tick to the plugin owning the job's kind, and keeps every job's cursor safe
across crashes.  It is a port of the plugin poller of nexo, a Rust
multi-agent daemon, and speaks the same wire format.

Run it::

    python nexo_poller.py --config pollers.json

The sections of this file, in dependency order:

    Errors      PollerError, PluginPollerForwardError, ManifestError, ...
    Wire        encode_cursor, decode_cursor, TickRequest, TickReply, TickAck,
                build_tick_request
    Manifest    Lifecycle, PluginPollerHandle, load_manifest
    Router      PluginPollerRouter
    Processes   spawn_ephemeral_tick (process groups, bounded pipes, reaping)
    Broker      BrokerServer, BrokerClient (line-delimited JSON-RPC, Unix socket)
    Proxies     PollContext, EphemeralPollerProxy, PluginPollerProxy,
                forward_tick, PluginSupervisor
    SDK         run_plugin
    State       StateStore (sqlite3, batched durable commits, leases)
    Schedule    Schedule, CronExpr
    Runner      Runner (timer heap, lanes, error policy, alerts, reload)
    CLI         main

A tick travels: scheduler -> runner picks the poller for the job's kind ->
``poller.tick(ctx) -> TickAck`` -> state store commits cursor and counters ->
scheduler sets the next slot.  Errors travel as ``PollerError`` variants and
only the runner decides what they mean.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import errno
import heapq
import itertools
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping

__version__ = "0.1.0"

__all__ = [
    # errors
    "ErrorClass", "PollerError", "PluginPollerForwardError",
    "PollerRouteRegistrationError", "ManifestError", "ConfigError", "StateError",
    # wire
    "encode_cursor", "decode_cursor", "TickMetrics", "TickRequest", "TickReply",
    "TickAck", "build_tick_request", "tick_topic_for",
    "ERROR_TRANSIENT", "ERROR_PERMANENT", "ERROR_CONFIG", "ERROR_INTERNAL",
    # manifest and router
    "Lifecycle", "PluginPollerHandle", "load_manifest", "PluginPollerRouter",
    # processes and proxies
    "PollContext", "spawn_ephemeral_tick", "EphemeralPollerProxy",
    "PluginPollerProxy", "forward_tick", "PluginSupervisor",
    "DEFAULT_MAX_REPLY_BYTES",
    # broker
    "BrokerServer", "BrokerClient", "BROKER_MAX_LINE_BYTES",
    # sdk
    "run_plugin",
    # daemon
    "StateStore", "Schedule", "CronExpr", "JobConfig", "DaemonConfig",
    "load_config", "Runner", "main",
]

log = logging.getLogger("nexo_poller")


# ============================================================================
# Errors
# All exceptions the module raises on purpose.  Each enum of the original is
# a base class whose variants hang off it: ``except PollerError.Transient``.
# ============================================================================

class ErrorClass(enum.Enum):
    """What the runner does with a failed tick."""
    TRANSIENT = "transient"   # back off and retry
    PERMANENT = "permanent"   # pause the job until an operator resumes it
    CONFIG = "config"         # the job's configuration is wrong: pause it


class PollerError(Exception):
    """A tick failed.  Variants: ``Transient``, ``Permanent``, ``Config``."""

    error_class: ErrorClass = ErrorClass.TRANSIENT

    def classify(self) -> ErrorClass:
        return self.error_class


class _PollerTransient(PollerError):
    """Worth retrying later: a timeout, a crash, a network blip."""
    error_class = ErrorClass.TRANSIENT


class _PollerPermanent(PollerError):
    """Will not get better by retrying: revoked credentials, a gone feed."""
    error_class = ErrorClass.PERMANENT


class _PollerConfig(PollerError):
    """The job's configuration is wrong; the job pauses, siblings go on."""
    error_class = ErrorClass.CONFIG

    def __init__(self, job: str, reason: str):
        super().__init__(f"job {job!r}: {reason}")
        self.job, self.reason = job, reason


PollerError.Transient = _PollerTransient
PollerError.Permanent = _PollerPermanent
PollerError.Config = _PollerConfig
for _cls, _name in ((_PollerTransient, "Transient"), (_PollerPermanent, "Permanent"),
                    (_PollerConfig, "Config")):
    _cls.__qualname__ = f"PollerError.{_name}"


class PluginPollerForwardError(Exception):
    """Reaching a plugin failed.  Variants: ``Broker``, ``ParseReply``."""


class _ForwardBroker(PluginPollerForwardError):
    """The broker could not deliver the request or its reply."""


class _ForwardParseReply(PluginPollerForwardError):
    """The plugin answered something that is not a valid reply."""


PluginPollerForwardError.Broker = _ForwardBroker
PluginPollerForwardError.ParseReply = _ForwardParseReply
_ForwardBroker.__qualname__ = "PluginPollerForwardError.Broker"
_ForwardParseReply.__qualname__ = "PluginPollerForwardError.ParseReply"


class PollerRouteRegistrationError(Exception):
    """Registering a plugin with the router failed.  Variant: ``DuplicateKind``."""


class _DuplicateKind(PollerRouteRegistrationError):
    def __init__(self, kind: str, existing_plugin: str, new_plugin: str):
        super().__init__(
            f"kind `{kind}` already owned by plugin `{existing_plugin}` — "
            f"`{new_plugin}` cannot register")
        self.kind, self.existing_plugin, self.new_plugin = kind, existing_plugin, new_plugin


PollerRouteRegistrationError.DuplicateKind = _DuplicateKind
_DuplicateKind.__qualname__ = "PollerRouteRegistrationError.DuplicateKind"


class ManifestError(Exception):
    """A ``nexo-plugin.toml`` is unreadable or breaks a rule; names file and key."""

    def __init__(self, path: Any, message: str, key: str | None = None):
        where = f"{path}: " + (f"[{key}] " if key else "")
        super().__init__(where + message)
        self.path, self.key, self.detail = str(path), key, message


class ConfigError(Exception):
    """``pollers.json`` is invalid.  ``problems`` lists every (json path, message)."""

    def __init__(self, source: Any, problems: list[tuple[str, str]]):
        self.source, self.problems = str(source), list(problems)
        lines = [f"{p}: {m}" if p else m for p, m in self.problems]
        head = f"{source}: " if source else ""
        if len(lines) == 1:
            super().__init__(head + lines[0])
        else:
            super().__init__(head + f"{len(lines)} problems:\n  " + "\n  ".join(lines))


class StateError(Exception):
    """The state database cannot be used (corrupt, foreign schema, locked)."""


# ============================================================================
# Wire
# The shapes that cross a process boundary, exactly as the original sends
# them: cursors as unpadded URL-safe base64, ``now`` as RFC 3339 +00:00.
# ============================================================================

ERROR_TRANSIENT = -32001
ERROR_PERMANENT = -32002
ERROR_CONFIG = -32602
ERROR_INTERNAL = -32603

_CODE_TO_CLASS = {ERROR_TRANSIENT: PollerError.Transient,
                  ERROR_PERMANENT: PollerError.Permanent}


def encode_cursor(raw: bytes) -> str:
    """Encode cursor bytes as URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str) -> bytes:
    """Decode a cursor sent padded or unpadded; bad input raises ``ParseReply``."""
    if not isinstance(text, str):
        raise PluginPollerForwardError.ParseReply(
            f"cursor must be a base64 string, got {type(text).__name__}")
    body = text.rstrip("=")
    try:
        if len(body) % 4 == 1 or not _B64_CHARS.fullmatch(body):
            raise ValueError("not URL-safe base64")
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, binascii.Error) as exc:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise PluginPollerForwardError.ParseReply(
            f"invalid cursor {shown!r}: {exc}") from None


_B64_CHARS = re.compile(r"[A-Za-z0-9_\-]*")


def _format_now(now: datetime) -> str:
    """RFC 3339 in UTC with a ``+00:00`` offset, as chrono's to_rfc3339 does."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).isoformat()


def _seconds(value: timedelta | int | float, what: str = "duration") -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a timedelta or a number of seconds, "
                        f"got {type(value).__name__}")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, slots=True)
class TickMetrics:
    """What one tick saw and passed on."""
    items_seen: int = 0
    items_dispatched: int = 0


@dataclasses.dataclass(slots=True)
class TickRequest:
    """The daemon-to-plugin payload of one tick, in wire form."""
    kind: str
    job_id: str
    agent_id: str
    cursor: str | None
    config: Any
    now: str
    interval_hint_secs: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "job_id": self.job_id, "agent_id": self.agent_id,
                "cursor": self.cursor, "config": self.config, "now": self.now,
                "interval_hint_secs": self.interval_hint_secs}

    def envelope(self, request_id: Any = None) -> dict:
        """The JSON-RPC request object both lifecycles carry."""
        msg = {"jsonrpc": "2.0", "method": "poll_tick", "params": self.to_dict()}
        if request_id is not None:
            msg["id"] = request_id
        return msg


@dataclasses.dataclass(frozen=True, slots=True)
class TickAck:
    """What a tick returns to the runner (the in-process poller trait's shape)."""
    next_cursor: bytes | None = None
    next_interval_hint: timedelta | None = None
    metrics: TickMetrics | None = None


@dataclasses.dataclass(slots=True)
class TickReply:
    """The plugin-to-daemon reply of one tick, in wire form."""
    next_cursor: str | None = None
    next_interval_secs: int | None = None
    metrics: TickMetrics | None = None

    @classmethod
    def from_dict(cls, d: Any) -> "TickReply":
        """Parse a reply's ``result``; unknown fields are ignored.

        nexo's Python template puts ``items_seen``/``items_dispatched`` at the
        top level instead of under ``metrics``; both spellings are read.
        """
        if not isinstance(d, dict):
            raise PluginPollerForwardError.ParseReply(
                f"tick reply must be a JSON object, got {_json_type(d)}")
        cursor = d.get("next_cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise PluginPollerForwardError.ParseReply(
                f"next_cursor must be a string or null, got {_json_type(cursor)}")
        interval = d.get("next_interval_secs")
        if interval is not None and not (_is_int(interval) and 0 <= interval < 2**63):
            raise PluginPollerForwardError.ParseReply(
                f"next_interval_secs must be a non-negative integer, got {interval!r:.40}")
        raw = d.get("metrics")
        if raw is None and ("items_seen" in d or "items_dispatched" in d):
            raw = d
        metrics = None
        if raw is not None:
            if not isinstance(raw, dict):
                raise PluginPollerForwardError.ParseReply(
                    f"metrics must be an object, got {_json_type(raw)}")
            values = []
            for name in ("items_seen", "items_dispatched"):
                v = raw.get(name, 0)
                if v is None:
                    v = 0
                if not (_is_int(v) and 0 <= v < 2**63):
                    raise PluginPollerForwardError.ParseReply(
                        f"metrics.{name} must be a non-negative integer, got {v!r:.40}")
                values.append(v)
            metrics = TickMetrics(*values)
        return cls(cursor, interval, metrics)

    def to_dict(self) -> dict:
        d: dict = {}
        if self.next_cursor is not None:
            d["next_cursor"] = self.next_cursor
        if self.next_interval_secs is not None:
            d["next_interval_secs"] = self.next_interval_secs
        if self.metrics is not None:
            d["metrics"] = {"items_seen": self.metrics.items_seen,
                            "items_dispatched": self.metrics.items_dispatched}
        return d

    def into_tick_ack(self) -> TickAck:
        """Decode the cursor to bytes; a bad cursor raises ``ParseReply``."""
        cursor = None if self.next_cursor is None else decode_cursor(self.next_cursor)
        hint = (None if self.next_interval_secs is None
                else timedelta(seconds=self.next_interval_secs))
        return TickAck(cursor, hint, self.metrics)

    @classmethod
    def from_ack(cls, ack: TickAck | None) -> "TickReply":
        if ack is None:
            return cls()
        secs = ack.next_interval_hint
        return cls(None if ack.next_cursor is None else encode_cursor(ack.next_cursor),
                   None if secs is None else max(0, int(_seconds(secs))),
                   ack.metrics)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


def build_tick_request(kind: str, job_id: str, agent_id: str, cursor: bytes | None,
                       config: Any, now: datetime,
                       interval_hint: timedelta | int | float) -> TickRequest:
    """Build the wire request of one tick from runner inputs (pure)."""
    return TickRequest(kind, job_id, agent_id,
                       None if cursor is None else encode_cursor(cursor),
                       config, _format_now(now), int(_seconds(interval_hint, "interval_hint")))


def tick_topic_for(prefix: str) -> str:
    """The broker topic a plugin's ticks travel on."""
    return f"{prefix}.tick"


def _parse_reply_envelope(envelope: Any, job: str) -> TickReply:
    """Read a plugin's reply envelope, ``{"result": ...}`` or ``{"error": ...}``.

    Shared by both lifecycles; JSON-RPC 2.0 members are allowed.  An error
    reply raises the matching ``PollerError``; a malformed one raises
    ``PluginPollerForwardError.ParseReply``.
    """
    if not isinstance(envelope, dict):
        raise PluginPollerForwardError.ParseReply(
            f"reply is not a JSON object ({_json_type(envelope)})")
    error = envelope.get("error")
    if error is not None:
        code, message = ERROR_INTERNAL, "plugin returned an error"
        if isinstance(error, dict):
            if _is_int(error.get("code")):
                code = error["code"]
            if isinstance(error.get("message"), str):
                message = error["message"]
        elif isinstance(error, str):
            message = error
        if code == ERROR_CONFIG:
            raise PollerError.Config(job, message)
        raise _CODE_TO_CLASS.get(code, PollerError.Transient)(f"{message} (code {code})")
    if "result" not in envelope:
        raise PluginPollerForwardError.ParseReply("reply has neither `result` nor `error`")
    result = envelope["result"]
    return TickReply.from_dict({} if result is None else result)


def _reply_to_ack(envelope: Any, job: str) -> TickAck:
    """A reply envelope as a TickAck; anything unparsable is Transient."""
    try:
        return _parse_reply_envelope(envelope, job).into_tick_ack()
    except PluginPollerForwardError as exc:
        raise PollerError.Transient(f"unparsable reply: {exc}") from None


# ============================================================================
# Manifest
# A plugin's ``nexo-plugin.toml`` turned into a PluginPollerHandle, with the
# original's validation rules; every error names the file, key and rule.
# ============================================================================

class Lifecycle(str, enum.Enum):
    """How a plugin process lives: one per daemon, or one per tick."""
    LONG_LIVED = "long_lived"
    EPHEMERAL = "ephemeral"


_KIND_RE = re.compile(r"[a-z][a-z0-9_]+")
_POLLER_KEYS = {"kinds", "broker_topic_prefix", "lifecycle",
                "max_concurrent_ticks", "tick_timeout_secs"}
MAX_CONCURRENT_TICKS = 64
MAX_TICK_TIMEOUT_SECS = 3600


class _Slots:
    """A counting limiter whose waits are bounded and cancellable."""

    def __init__(self, limit: int):
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used >= self.limit:
                left = deadline - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()):
                    return False
                # A cancel Event cannot wake a Condition, so look again soon.
                self._cond.wait(left if cancel is None else min(left, 0.05))
            self._used += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._used -= 1
            self._cond.notify()


@dataclasses.dataclass(eq=False)
class PluginPollerHandle:
    """One registered plugin's poller capability."""
    plugin_id: str
    kinds: tuple[str, ...]
    broker_topic_prefix: str
    lifecycle: Lifecycle = Lifecycle.LONG_LIVED
    max_concurrent_ticks: int = 1
    tick_timeout: timedelta = timedelta(seconds=60)
    entrypoint_command: str | None = None
    entrypoint_args: tuple[str, ...] = ()
    entrypoint_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    working_dir: str | None = None
    manifest_path: str | None = None
    slots: _Slots = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.entrypoint_args = tuple(self.entrypoint_args)
        self.lifecycle = Lifecycle(self.lifecycle)
        if not isinstance(self.tick_timeout, timedelta):
            self.tick_timeout = timedelta(seconds=_seconds(self.tick_timeout, "tick_timeout"))
        # One limiter per plugin: every kind it serves shares max_concurrent_ticks.
        self.slots = _Slots(self.max_concurrent_ticks)

    def tick_topic(self) -> str:
        return tick_topic_for(self.broker_topic_prefix)

    def same_spec(self, other: "PluginPollerHandle") -> bool:
        """True when a reload would change nothing about this plugin."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "slots"]
        return all(getattr(self, f) == getattr(other, f) for f in fields)


def load_manifest(path: str | os.PathLike) -> PluginPollerHandle:
    """Read a ``nexo-plugin.toml`` and return its poller handle.

    Raises ``ManifestError`` naming the file, the key and the broken rule.
    A relative entrypoint command containing ``/`` resolves against the
    manifest's folder, which is also the plugin's working directory.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from None

    def table(parent: dict, key: str, name: str, required: bool) -> dict:
        value = parent.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise ManifestError(path, "missing table" if value is None
                                else f"must be a table, got {_toml_type(value)}", name)
        return value

    def typed(tbl: dict, key: str, name: str, kind: type, default: Any = None) -> Any:
        value = tbl.get(key, default)
        if value is None and default is None and kind is not _REQUIRED:
            return None
        want = str if kind is _REQUIRED else kind
        if value is None or not isinstance(value, want) or (
                want is int and isinstance(value, bool)):
            got = "nothing" if value is None else _toml_type(value)
            raise ManifestError(path, f"must be {_toml_name(want)}, got {got}", name)
        return value

    plugin = table(doc, "plugin", "plugin", True)
    plugin_id = typed(plugin, "id", "plugin.id", _REQUIRED)
    if not plugin_id.strip():
        raise ManifestError(path, "must not be empty", "plugin.id")
    poller = table(plugin, "poller", "plugin.poller", True)
    unknown = sorted(set(poller) - _POLLER_KEYS)
    if unknown:
        raise ManifestError(path, f"unknown key {unknown[0]!r} (allowed: "
                            f"{', '.join(sorted(_POLLER_KEYS))})", "plugin.poller")
    kinds = typed(poller, "kinds", "plugin.poller.kinds", list, [])
    if not kinds:
        raise ManifestError(path, "must list at least one kind", "plugin.poller.kinds")
    seen: set[str] = set()
    for i, kind in enumerate(kinds):
        where = f"plugin.poller.kinds[{i}]"
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise ManifestError(path, f"{kind!r} must match ^[a-z][a-z0-9_]+$", where)
        if kind in seen:
            raise ManifestError(path, f"duplicate kind {kind!r}", where)
        seen.add(kind)
    prefix = typed(poller, "broker_topic_prefix", "plugin.poller.broker_topic_prefix", _REQUIRED)
    where = "plugin.poller.broker_topic_prefix"
    if not prefix:
        raise ManifestError(path, "must not be empty", where)
    if prefix.endswith("."):
        raise ManifestError(path, f"{prefix!r} must not end with '.'", where)
    if any(c.isspace() for c in prefix):
        raise ManifestError(path, f"{prefix!r} must not contain spaces", where)
    lifecycle = typed(poller, "lifecycle", "plugin.poller.lifecycle", str, "long_lived")
    if lifecycle not in {m.value for m in Lifecycle}:
        raise ManifestError(path, f"{lifecycle!r} must be \"long_lived\" or \"ephemeral\"",
                            "plugin.poller.lifecycle")
    limit = typed(poller, "max_concurrent_ticks", "plugin.poller.max_concurrent_ticks", int, 1)
    if not 1 <= limit <= MAX_CONCURRENT_TICKS:
        raise ManifestError(path, f"{limit} is outside 1..={MAX_CONCURRENT_TICKS}",
                            "plugin.poller.max_concurrent_ticks")
    timeout = typed(poller, "tick_timeout_secs", "plugin.poller.tick_timeout_secs", int, 60)
    if not 1 <= timeout <= MAX_TICK_TIMEOUT_SECS:
        raise ManifestError(path, f"{timeout} is outside 1..={MAX_TICK_TIMEOUT_SECS}",
                            "plugin.poller.tick_timeout_secs")

    entry = table(plugin, "entrypoint", "plugin.entrypoint", False)
    command = typed(entry, "command", "plugin.entrypoint.command", str)
    if command is not None and not command.strip():
        raise ManifestError(path, "must not be empty", "plugin.entrypoint.command")
    args = typed(entry, "args", "plugin.entrypoint.args", list, [])
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            raise ManifestError(path, f"must be a string, got {_toml_type(arg)}",
                                f"plugin.entrypoint.args[{i}]")
    env = table(entry, "env", "plugin.entrypoint.env", False)
    for key, value in env.items():
        if not isinstance(value, str) or "=" in key or "\0" in key + value:
            raise ManifestError(path, "must be a string (and the name free of '=')",
                                f"plugin.entrypoint.env.{key}")
    folder = os.path.dirname(path)
    if command is not None and "/" in command and not os.path.isabs(command):
        command = os.path.normpath(os.path.join(folder, command))
    return PluginPollerHandle(
        plugin_id=plugin_id, kinds=tuple(kinds), broker_topic_prefix=prefix,
        lifecycle=Lifecycle(lifecycle), max_concurrent_ticks=limit,
        tick_timeout=timedelta(seconds=timeout), entrypoint_command=command,
        entrypoint_args=tuple(args), entrypoint_env=dict(env),
        working_dir=folder, manifest_path=path)


class _Required:
    """Marker: a manifest string key that must be present."""


_REQUIRED = _Required


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a float", list: "an array",
            dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def _toml_name(kind: type) -> str:
    return {str: "a string", int: "an integer", list: "an array"}.get(kind, str(kind))


# ============================================================================
# Router
# Which plugin owns which kind.  Built empty at boot and filled once the
# manifests are loaded; lookups are one dict access under a lock.
# ============================================================================

class PluginPollerRouter:
    """Thread-safe map from kind to the plugin handle that serves it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_plugin: dict[str, PluginPollerHandle] = {}
        self._by_kind: dict[str, PluginPollerHandle] = {}

    def register(self, handle: PluginPollerHandle) -> None:
        """Add a plugin; the same plugin id again replaces its entry (hot restart).

        Raises ``PollerRouteRegistrationError.DuplicateKind`` when a kind is
        owned by another plugin; nothing changes then.
        """
        with self._lock:
            for kind in handle.kinds:
                owner = self._by_kind.get(kind)
                if owner is not None and owner.plugin_id != handle.plugin_id:
                    raise PollerRouteRegistrationError.DuplicateKind(
                        kind, owner.plugin_id, handle.plugin_id)
            self._drop(handle.plugin_id)
            self._by_plugin[handle.plugin_id] = handle
            for kind in handle.kinds:
                self._by_kind[kind] = handle

    def unregister(self, plugin_id: str) -> bool:
        """Remove a plugin and its kinds; True when something was removed."""
        with self._lock:
            return self._drop(plugin_id) is not None

    def _drop(self, plugin_id: str) -> PluginPollerHandle | None:
        old = self._by_plugin.pop(plugin_id, None)
        if old is not None:
            for kind in old.kinds:
                if self._by_kind.get(kind) is old:
                    del self._by_kind[kind]
        return old

    def handle_for_kind(self, kind: str) -> PluginPollerHandle | None:
        # A single dict read is atomic under the GIL; no lock on the hot path.
        return self._by_kind.get(kind)

    def handles_for_plugin(self, plugin_id: str) -> PluginPollerHandle | None:
        return self._by_plugin.get(plugin_id)

    def handles(self) -> list[PluginPollerHandle]:
        with self._lock:
            return list(self._by_plugin.values())

    def kinds(self) -> list[str]:
        with self._lock:
            return sorted(self._by_kind)

    def is_empty(self) -> bool:
        return not self._by_plugin

    def len(self) -> int:
        """Number of plugins (not kinds)."""
        return len(self._by_plugin)

    __len__ = len


# ============================================================================
# Processes
# One tick in a fresh process: its own process group, every pipe watched by
# one selector under one deadline, the whole group killed and reaped after.
# ============================================================================

DEFAULT_MAX_REPLY_BYTES = 1 << 20    # longest reply line an ephemeral plugin may send
_STDERR_KEEP_BYTES = 8192            # stderr kept per tick for the debug log
_CANCEL_POLL_SECS = 0.05             # how often a wait looks at a cancel Event


def _child_env(plugin_id: str, extra: Mapping[str, str] | None, **nexo: str) -> dict:
    """The daemon's environment, plus the manifest's env, plus NEXO_* variables."""
    env = dict(os.environ)
    env.update(extra or {})
    env["NEXO_POLLER_PLUGIN_ID"] = plugin_id
    env.update(nexo)
    return env


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group; the leader is unreaped, so the
    group id cannot have been reused."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(proc: subprocess.Popen) -> None:
    """Kill the group, reap the leader, close every pipe: nothing outlives a tick."""
    _kill_group(proc)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
    proc.wait()


def spawn_ephemeral_tick(command: str, plugin_id: str, request: TickRequest,
                         timeout: timedelta | float, cancel: threading.Event | None = None,
                         *, args: Iterable[str] = (), env: Mapping[str, str] | None = None,
                         cwd: str | None = None,
                         max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> TickAck:
    """Run one tick in a fresh process over stdin/stdout and classify the reply.

    The spawn, the request write and the reply read all share one deadline.
    stderr is drained as it comes.  Whatever happens, the child's process
    group is killed and reaped before this returns.  Raises ``PollerError``.
    """
    budget = _seconds(timeout, "timeout")
    payload = (json.dumps(request.envelope(1), separators=(",", ":")) + "\n").encode()
    try:
        proc = subprocess.Popen(
            [command, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=cwd, start_new_session=True, bufsize=0,
            env=_child_env(plugin_id, env, NEXO_POLLER_EPHEMERAL="1"))
    except OSError as exc:
        raise PollerError.Transient(
            f"plugin {plugin_id!r}: cannot start {command!r}: "
            f"{exc.strerror or exc}") from None
    stderr = bytearray()
    try:
        line = _exchange(proc, payload, budget, cancel, max_reply_bytes, stderr)
        if line is None:
            raise _Failure(f"closed stdout before replying ({_exit_status(proc)})")
    except _Failure as exc:
        raise PollerError.Transient(f"plugin {plugin_id!r}: {exc}") from None
    finally:
        _reap(proc)
        if stderr and log.isEnabledFor(logging.DEBUG):
            for text in stderr.decode("utf-8", "replace").splitlines():
                log.debug("plugin %s stderr: %s", plugin_id, text)
    if not line.strip():
        raise PollerError.Transient(f"plugin {plugin_id!r} replied with an empty line")
    try:
        envelope = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise PollerError.Transient(
            f"plugin {plugin_id!r} replied with a line that is not JSON: {exc}") from None
    return _reply_to_ack(envelope, request.job_id)


class _Failure(Exception):
    """Internal: why an exchange with a child process ended without a reply."""


def _exchange(proc: subprocess.Popen, payload: bytes, budget: float,
              cancel: threading.Event | None, max_reply: int,
              stderr: bytearray) -> bytes | None:
    """Write the request and read one reply line, all within ``budget`` seconds.

    Returns the line (without its newline), or None when stdout closed
    first; raises ``_Failure`` on timeout, cancel or an over-long line.
    """
    stdin, stdout, errfd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    for fd in (stdin, stdout, errfd):
        os.set_blocking(fd, False)
    view, sent = memoryview(payload), 0
    reply = bytearray()
    deadline = time.monotonic() + budget
    with selectors.DefaultSelector() as sel:
        sel.register(stdin, selectors.EVENT_WRITE)
        sel.register(stdout, selectors.EVENT_READ)
        sel.register(errfd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failure(f"tick timed out after {budget:g}s")
            if cancel is not None:
                if cancel.is_set():
                    raise _Failure("tick cancelled")
                left = min(left, _CANCEL_POLL_SECS)
            for key, _ in sel.select(left):
                fd = key.fd
                if fd == stdin:
                    try:
                        sent += os.write(fd, view[sent:sent + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        sent = len(view)    # the child does not want its input
                    if sent >= len(view):
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if fd == errfd:
                    if not chunk:
                        sel.unregister(fd)
                    elif len(stderr) < _STDERR_KEEP_BYTES:
                        stderr += chunk[:_STDERR_KEEP_BYTES - len(stderr)]
                    continue
                if not chunk:
                    return None
                end = chunk.find(b"\n")
                reply += chunk if end < 0 else chunk[:end]
                if len(reply) > max_reply:
                    raise _Failure(f"reply line longer than {max_reply} bytes")
                if end >= 0:
                    return bytes(reply)


def _exit_status(proc: subprocess.Popen) -> str:
    try:
        code = proc.wait(0.5)
    except subprocess.TimeoutExpired:
        return "still running"
    return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"


# ============================================================================
# Broker
# A minimal line-delimited JSON-RPC 2.0 broker over a Unix socket, served by
# the daemon: subscribe (with queue groups), publish, request/reply.
# ============================================================================

BROKER_MAX_LINE_BYTES = 1 << 20       # longest line a client may send
BROKER_MAX_OUTBUF_BYTES = 8 << 20     # unsent bytes a connection may pile up
BROKER_MAX_TIMEOUT_MS = 3_600_000     # longest request timeout accepted
BROKER_DEFAULT_TIMEOUT_MS = 30_000

BROKER_PARSE_ERROR = -32700
BROKER_INVALID_REQUEST = -32600
BROKER_METHOD_NOT_FOUND = -32601
BROKER_INVALID_PARAMS = -32602
BROKER_NO_RESPONDERS = -32010
BROKER_TIMEOUT = -32011
BROKER_RESPONDER_GONE = -32012
BROKER_RESPONDER_ERROR = -32013
BROKER_CLOSED = -32014

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _broker_error(code: int, message: str) -> PluginPollerForwardError:
    exc = PluginPollerForwardError.Broker(message)
    exc.code = code
    return exc


def _socket_path(url: str) -> str:
    if not isinstance(url, str) or not url.startswith("unix://") or len(url) <= 7:
        raise _broker_error(BROKER_INVALID_PARAMS,
                            f"broker URL must look like unix:///path/to.sock, got {url!r}")
    return url[7:]


class _Waiter:
    """A one-shot result slot; a pre-acquired lock is CPython's cheapest wake-up."""
    __slots__ = ("_lock", "result", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.result: Any = None
        self.error: dict | None = None

    def set(self, result: Any = None, error: dict | None = None) -> None:
        self.result, self.error = result, error
        try:
            self._lock.release()
        except RuntimeError:        # already set: the first answer wins
            pass

    def wait(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        if cancel is None:
            return self._lock.acquire(timeout=max(0.0, timeout))
        deadline = time.monotonic() + timeout
        while not cancel.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._lock.acquire(timeout=min(left, _CANCEL_POLL_SECS)):
                return True
        return False


class _Pending:
    """One request in flight through the broker."""
    __slots__ = ("inbox", "requester", "req_id", "topic", "payload", "responders",
                 "deadline")

    def __init__(self, inbox, requester, req_id, topic, payload, deadline):
        self.inbox, self.requester, self.req_id = inbox, requester, req_id
        self.topic, self.payload, self.deadline = topic, payload, deadline
        self.responders: set = set()


class _Topic:
    """The subscribers of one topic: plain ones, and queue groups taking turns."""
    __slots__ = ("plain", "groups")

    def __init__(self) -> None:
        self.plain: list = []                 # [(peer, sid)]
        self.groups: dict[str, list] = {}     # name -> [(peer, sid)], rotated per pick

    def pick(self) -> list:
        targets = list(self.plain)
        for members in self.groups.values():
            members.append(members.pop(0))    # round robin
            targets.append(members[-1])
        return targets

    def empty(self) -> bool:
        return not self.plain and not self.groups


class _Peer:
    """Broker-side end of a client: delivers messages and replies to it."""
    local = False

    def __init__(self) -> None:
        self.subs: dict[Any, tuple[str, str | None]] = {}   # sid -> (topic, queue)
        self.serving: set[int] = set()      # inboxes this peer was asked to answer
        self.asking: set[int] = set()       # inboxes this peer is waiting on
        self.closed = False


class _SocketPeer(_Peer):
    """A client connected over the socket; writes never block the broker."""

    def __init__(self, server: "BrokerServer", sock: socket.socket):
        super().__init__()
        self.server, self.sock, self.fd = server, sock, sock.fileno()
        self.inbuf = bytearray()
        self.out = bytearray()
        self.out_lock = threading.Lock()

    def send(self, obj: Any) -> None:
        data = _dumps(obj).encode() + b"\n"
        with self.out_lock:
            if self.closed:
                return
            if not self.out:
                try:
                    n = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    self.server._schedule_close(self, "write failed")
                    return
                if n == len(data):
                    return
                data = data[n:]
                self.out += data
                self.server._want_write(self)
                return
            self.out += data
            if len(self.out) > BROKER_MAX_OUTBUF_BYTES:
                self.server._schedule_close(self, "slow consumer: output buffer full")

    def flush(self) -> bool:
        """Write what is queued; True when the buffer is empty (loop thread)."""
        with self.out_lock:
            while self.out:
                try:
                    n = self.sock.send(self.out)
                except (BlockingIOError, InterruptedError):
                    return False
                del self.out[:n]
            return True

    def deliver(self, sid, topic, payload, inbox) -> None:
        params = {"sid": sid, "topic": topic, "payload": payload}
        if inbox is not None:
            params["inbox"] = inbox
        self.send({"jsonrpc": "2.0", "method": "message", "params": params})

    def answer(self, req_id, result=None, error=None) -> None:
        if error is not None:
            self.send({"jsonrpc": "2.0", "id": req_id, "error": error})
        else:
            self.send({"jsonrpc": "2.0", "id": req_id, "result": result})


class _LocalPeer(_Peer):
    """The daemon's own client: replies wake a waiter, messages run a handler."""
    local = True

    def __init__(self, client: "_LocalClient"):
        super().__init__()
        self.client = client

    def deliver(self, sid, topic, payload, inbox) -> None:
        self.client._dispatch(sid, payload, inbox)

    def answer(self, req_id, result=None, error=None) -> None:
        req_id.set(result, error)         # for a local peer the id is its _Waiter


class BrokerServer:
    """The daemon's broker: line-delimited JSON-RPC 2.0 on a Unix socket.

    ``start()`` binds and serves on one background thread; ``client()``
    gives an in-process client; ``close()`` stops and removes the socket.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self._own_dir = None
        if path is None:
            self._own_dir = tempfile.mkdtemp(prefix="nexo-poller-")   # mode 0700
            path = os.path.join(self._own_dir, "broker.sock")
        self.path = os.path.abspath(os.fspath(path))
        self.url = "unix://" + self.path
        self._lock = threading.Lock()
        self._topics: dict[str, _Topic] = {}
        self._pending: dict[int, _Pending] = {}
        self._parked: dict[str, list[_Pending]] = {}     # requests waiting for a subscriber
        self._inboxes = itertools.count(1)
        self._deadlines: list[tuple[float, int]] = []   # socket requesters only
        self._peers: dict[int, _SocketPeer] = {}
        self._to_close: list[tuple[_SocketPeer, str]] = []
        self._to_write: list[_SocketPeer] = []
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._uid = os.getuid()

    # -- life cycle ---------------------------------------------------------

    def start(self) -> "BrokerServer":
        """Bind the socket (replacing a stale one) and serve in the background."""
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self._clear_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o600)
            listener.listen(512)
        except OSError as exc:
            listener.close()
            raise _broker_error(BROKER_CLOSED, f"cannot listen on {self.path}: "
                                f"{exc.strerror or exc}") from None
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="nexo-broker", daemon=True)
        self._thread.start()
        return self

    def _clear_stale_socket(self) -> None:
        if not os.path.lexists(self.path):
            return
        import stat
        if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
            raise _broker_error(BROKER_CLOSED, f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)           # nobody listens: a dead daemon's leftover
            return
        finally:
            probe.close()
        raise _broker_error(BROKER_CLOSED, f"a live broker already listens on {self.path}")

    def close(self) -> None:
        """Stop serving, fail requests in flight, remove the socket file."""
        if self._stopping:
            return
        self._stopping = True
        if self._thread is not None:
            self._wake()
            self._thread.join(10)
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            self._parked.clear()
            self._topics.clear()
        for p in pending:
            self._answer(p, error={"code": BROKER_CLOSED, "message": "broker closed"})
        if self._listener is not None:
            try:
                if os.path.exists(self.path):
                    os.unlink(self.path)
            except OSError:
                pass
        if self._own_dir is not None:
            try:
                os.rmdir(self._own_dir)
            except OSError:
                pass

    def __enter__(self) -> "BrokerServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def client(self) -> "_LocalClient":
        """An in-process client, same interface as BrokerClient, no socket hop."""
        return _LocalClient(self)

    # -- introspection (tests and metrics) ----------------------------------

    def stats(self) -> dict:
        with self._lock:
            return {"connections": len(self._peers), "pending": len(self._pending),
                    "parked": sum(map(len, self._parked.values())),
                    "topics": len(self._topics),
                    "subscriptions": sum(len(t.plain) + sum(map(len, t.groups.values()))
                                         for t in self._topics.values())}

    def has_subscriber(self, topic: str) -> bool:
        with self._lock:
            return topic in self._topics

    # -- the loop -----------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass                           # a wake-up is already pending

    def _schedule_close(self, peer: _SocketPeer, why: str) -> None:
        with self._lock:
            self._to_close.append((peer, why))
        self._wake()

    def _want_write(self, peer: _SocketPeer) -> None:
        with self._lock:
            self._to_write.append(peer)
        self._wake()

    def _serve(self) -> None:
        sel = self._sel
        try:
            while not self._stopping:
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
                for key, mask in sel.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        peer = key.data
                        if mask & selectors.EVENT_READ and not peer.closed:
                            self._read(peer)
                        if mask & selectors.EVENT_WRITE and not peer.closed:
                            if peer.flush():
                                sel.modify(peer.sock, selectors.EVENT_READ, peer)
                self._housekeeping()
        except Exception:                   # pragma: no cover - a bug, never silent
            log.exception("broker loop crashed")
        finally:
            for peer in list(self._peers.values()):
                self._close_peer(peer, "broker closing")
            sel.close()
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _housekeeping(self) -> None:
        with self._lock:
            closing, self._to_close = self._to_close, []
            writing, self._to_write = self._to_write, []
        for peer in writing:
            if not peer.closed:
                self._sel.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
        for peer, why in closing:
            self._close_peer(peer, why)
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, inbox = heapq.heappop(self._deadlines)
            with self._lock:
                p = self._take_pending(inbox)
            if p is not None:
                self._answer(p, error={"code": BROKER_TIMEOUT,
                                       "message": f"request to {p.topic!r} timed out"})

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and friends: keep serving the rest
                log.warning("broker: accept failed: %s", exc)
                return
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
            except OSError:
                uid = -1
            if uid != self._uid:
                log.warning("broker: refused a connection from uid %s", uid)
                sock.close()
                continue
            sock.setblocking(False)
            peer = _SocketPeer(self, sock)
            self._peers[peer.fd] = peer
            self._sel.register(sock, selectors.EVENT_READ, peer)

    def _read(self, peer: _SocketPeer) -> None:
        try:
            data = peer.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_peer(peer, "disconnected")
            return
        buf = peer.inbuf
        start = len(buf)
        buf += data
        if data.find(b"\n") < 0:
            if len(buf) > BROKER_MAX_LINE_BYTES:
                self._reject_line(peer)
            return
        lines = buf.split(b"\n")
        peer.inbuf = bytearray(lines.pop())
        del start
        for line in lines:
            if len(line) > BROKER_MAX_LINE_BYTES:
                self._reject_line(peer)
                return
            if line.strip():
                self._handle_line(peer, line)
            if peer.closed:
                return
        if len(peer.inbuf) > BROKER_MAX_LINE_BYTES:
            self._reject_line(peer)

    def _reject_line(self, peer: _SocketPeer) -> None:
        peer.send({"jsonrpc": "2.0", "id": None, "error": {
            "code": BROKER_INVALID_REQUEST,
            "message": f"line longer than {BROKER_MAX_LINE_BYTES} bytes; closing"}})
        peer.flush()
        self._close_peer(peer, "over-long line")

    def _handle_line(self, peer: _SocketPeer, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except UnicodeDecodeError:
            peer.answer(None, error={"code": BROKER_PARSE_ERROR, "message": "line is not UTF-8"})
            return
        except (ValueError, RecursionError) as exc:
            peer.answer(None, error={"code": BROKER_PARSE_ERROR, "message": f"invalid JSON: {exc}"})
            return
        if not isinstance(msg, dict):
            peer.answer(None, error={"code": BROKER_INVALID_REQUEST,
                                     "message": "a message must be a JSON object"})
            return
        self._handle(peer, msg)

    # -- protocol ------------------------------------------------------------

    def _handle(self, peer: _Peer, msg: dict) -> None:
        """Act on one client message; reply only to those that carry an id."""
        req_id = msg.get("id")
        method = msg.get("method")
        params = msg.get("params", {})
        has_id = "id" in msg and not isinstance(req_id, (dict, list))
        if not isinstance(method, str):
            if "result" in msg or "error" in msg:
                return                      # a stray response: nothing to do
            return self._fail(peer, req_id, BROKER_INVALID_REQUEST, "`method` must be a string")
        if not isinstance(params, dict):
            return self._fail(peer, req_id, BROKER_INVALID_PARAMS, "`params` must be an object")
        handler = self._methods.get(method)
        if handler is None:
            if has_id:
                self._fail(peer, req_id, BROKER_METHOD_NOT_FOUND, f"unknown method {method!r}")
            return
        try:
            result = handler(self, peer, params, req_id if has_id else None)
        except _ParamError as exc:
            return self._fail(peer, req_id, BROKER_INVALID_PARAMS, str(exc)) if has_id else None
        if has_id and result is not _NO_ANSWER:
            peer.answer(req_id, result=result)

    def _fail(self, peer: _Peer, req_id, code: int, message: str) -> None:
        peer.answer(req_id, error={"code": code, "message": message})

    def _m_ping(self, peer, params, req_id):
        return "pong"

    def _m_subscribe(self, peer, params, req_id):
        topic, sid = _param_topic(params), _param_sid(params)
        queue = params.get("queue")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise _ParamError("`queue` must be a non-empty string or null")
        with self._lock:
            if peer.closed:
                return _NO_ANSWER
            if sid in peer.subs:
                raise _ParamError(f"sid {sid!r} is already in use on this connection")
            peer.subs[sid] = (topic, queue)
            entry = self._topics.setdefault(topic, _Topic())
            if queue is None:
                entry.plain.append((peer, sid))
            else:
                entry.groups.setdefault(queue, []).append((peer, sid))
            parked = self._parked.pop(topic, [])
            sends = [self._route(p) for p in parked]
        self._send_all(sends)
        return True

    def _m_unsubscribe(self, peer, params, req_id):
        sid = _param_sid(params)
        with self._lock:
            return self._drop_sub(peer, sid)

    def _m_publish(self, peer, params, req_id):
        topic = _param_topic(params)
        payload = params.get("payload")
        with self._lock:
            entry = self._topics.get(topic)
            targets = entry.pick() if entry else []
        for target, sid in targets:
            target.deliver(sid, topic, payload, None)
        return len(targets)

    def _m_request(self, peer, params, req_id):
        if req_id is None:
            raise _ParamError("`request` needs an id")
        topic = _param_topic(params)
        timeout_ms = params.get("timeout_ms", BROKER_DEFAULT_TIMEOUT_MS)
        if not _is_int(timeout_ms) or not 0 < timeout_ms <= BROKER_MAX_TIMEOUT_MS:
            raise _ParamError(f"`timeout_ms` must be an integer in 1..{BROKER_MAX_TIMEOUT_MS}")
        wait = params.get("wait", False)
        if not isinstance(wait, bool):
            raise _ParamError("`wait` must be a boolean")
        deadline = time.monotonic() + timeout_ms / 1000
        p = self._open_request(peer, req_id, topic, params.get("payload"), deadline, wait)
        if p is not None and not peer.local:
            heapq.heappush(self._deadlines, (deadline, p.inbox))   # loop thread only
        return _NO_ANSWER

    def _m_reply(self, peer, params, req_id):
        inbox = params.get("inbox")
        if not _is_int(inbox):
            raise _ParamError("`inbox` must be an integer")
        error = params.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise _ParamError("`error` must be an object")
            message = error.get("message")
            error = {"code": BROKER_RESPONDER_ERROR,
                     "message": message if isinstance(message, str) else "responder failed"}
        with self._lock:
            p = self._take_pending(inbox)
        if p is None:
            return False                     # late or unknown: dropped
        self._answer(p, result=params.get("payload"), error=error)
        return True

    _methods = {"ping": _m_ping, "subscribe": _m_subscribe, "unsubscribe": _m_unsubscribe,
                "publish": _m_publish, "request": _m_request, "reply": _m_reply}

    # -- routing (callers hold no lock unless said) ---------------------------

    def _open_request(self, peer, req_id, topic, payload, deadline, wait) -> _Pending | None:
        """Register a request and deliver it; None when it failed at once."""
        with self._lock:
            if peer.closed or self._stopping:
                p, send = None, None
            else:
                p = _Pending(next(self._inboxes), peer, req_id, topic, payload, deadline)
                send = self._route(p)
                if send is None and wait:
                    self._parked.setdefault(topic, []).append(p)
                    self._pending[p.inbox] = p
                    peer.asking.add(p.inbox)
                    return p
        if p is None:
            peer.answer(req_id, error={"code": BROKER_CLOSED, "message": "broker closed"})
            return None
        if send is None:
            peer.answer(req_id, error={"code": BROKER_NO_RESPONDERS,
                                       "message": f"no responders on {topic!r}"})
            return None
        self._send_all([send])
        return p

    def _route(self, p: _Pending):
        """Pick responders for ``p`` and record it (lock held); returns the sends."""
        entry = self._topics.get(p.topic)
        if entry is None:
            return None
        targets = entry.pick()
        self._pending[p.inbox] = p
        p.requester.asking.add(p.inbox)
        for target, _ in targets:
            p.responders.add(target)
            target.serving.add(p.inbox)
        return p, targets

    def _send_all(self, sends) -> None:
        for p, targets in sends:
            for target, sid in targets:
                target.deliver(sid, p.topic, p.payload, p.inbox)

    def _take_pending(self, inbox: int) -> _Pending | None:
        """Forget a request everywhere (lock held)."""
        p = self._pending.pop(inbox, None)
        if p is None:
            return None
        p.requester.asking.discard(inbox)
        for r in p.responders:
            r.serving.discard(inbox)
        if not p.responders:
            parked = self._parked.get(p.topic)
            if parked and p in parked:
                parked.remove(p)
                if not parked:
                    del self._parked[p.topic]
        return p

    def _answer(self, p: _Pending, result=None, error=None) -> None:
        if not p.requester.closed:
            p.requester.answer(p.req_id, result=result, error=error)

    def _drop_sub(self, peer: _Peer, sid) -> bool:
        """Remove one subscription (lock held)."""
        entry = peer.subs.pop(sid, None)
        if entry is None:
            return False
        topic, queue = entry
        t = self._topics.get(topic)
        if t is not None:
            if queue is None:
                t.plain.remove((peer, sid))
            else:
                members = t.groups[queue]
                members.remove((peer, sid))
                if not members:
                    del t.groups[queue]
            if t.empty():
                del self._topics[topic]
        return True

    def _forget_peer(self, peer: _Peer, why: str) -> list:
        """Drop a peer's subscriptions and requests (lock held); returns failures."""
        peer.closed = True
        for sid in list(peer.subs):
            self._drop_sub(peer, sid)
        for inbox in list(peer.asking):
            self._take_pending(inbox)
        failed = []
        for inbox in list(peer.serving):
            p = self._pending.get(inbox)
            if p is None:
                continue
            p.responders.discard(peer)
            if not p.responders:
                failed.append(self._take_pending(inbox))
        peer.serving.clear()
        return failed

    def _close_peer(self, peer: _SocketPeer, why: str) -> None:
        if peer.closed:
            return
        with self._lock:
            failed = self._forget_peer(peer, why)
            self._peers.pop(peer.fd, None)
        with peer.out_lock:
            peer.out.clear()
        try:
            self._sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        log.debug("broker: connection closed (%s)", why)
        for p in failed:
            self._answer(p, error={"code": BROKER_RESPONDER_GONE,
                                   "message": f"responder on {p.topic!r} disconnected ({why})"})


class _ParamError(Exception):
    pass


_NO_ANSWER = object()


def _param_topic(params: dict) -> str:
    topic = params.get("topic")
    if not isinstance(topic, str) or not topic or len(topic) > 1024 or any(
            c.isspace() for c in topic):
        raise _ParamError("`topic` must be a non-empty string without spaces")
    return topic


def _param_sid(params: dict):
    sid = params.get("sid")
    if not (_is_int(sid) or (isinstance(sid, str) and sid)):
        raise _ParamError("`sid` must be an integer or a non-empty string")
    return sid


class _ClientBase:
    """What BrokerClient and the in-process client share: handler dispatch."""

    def __init__(self, max_workers: int) -> None:
        self._handlers: dict[Any, Callable[[Any], Any]] = {}
        self._sids = itertools.count(1)
        self._pool = None
        self._pool_lock = threading.Lock()
        self._max_workers = max_workers
        self.closed = threading.Event()

    def _dispatch(self, sid, payload, inbox) -> None:
        handler = self._handlers.get(sid)
        if handler is None:
            if inbox is not None:
                self._send_reply(inbox, None, {"message": "no handler for this subscription"})
            return
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor
                    self._pool = ThreadPoolExecutor(self._max_workers,
                                                    thread_name_prefix="nexo-handler")
        try:
            self._pool.submit(self._run_handler, handler, payload, inbox)
        except RuntimeError:                 # pool shut down: the client is closing
            pass

    def _run_handler(self, handler, payload, inbox) -> None:
        try:
            result = handler(payload)
        except Exception as exc:             # report it to the requester, keep serving
            log.debug("broker handler failed", exc_info=True)
            if inbox is not None:
                self._send_reply(inbox, None, {"message": f"{type(exc).__name__}: {exc}"})
            return
        if inbox is not None:
            self._send_reply(inbox, result, None)

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _raise_error(error: dict, topic: str):
        raise _broker_error(error.get("code", BROKER_RESPONDER_ERROR),
                            f"{topic}: {error.get('message', 'broker error')}")


class _LocalClient(_ClientBase):
    """The daemon's in-process client (``BrokerServer.client()``)."""

    def __init__(self, server: BrokerServer, max_workers: int = 16):
        super().__init__(max_workers)
        self._server = server
        self._peer = _LocalPeer(self)
        self.url = server.url

    def subscribe(self, topic: str, handler: Callable[[Any], Any],
                  queue: str | None = None) -> int:
        sid = next(self._sids)
        self._handlers[sid] = handler
        self._call("subscribe", {"topic": topic, "sid": sid, "queue": queue})
        return sid

    def unsubscribe(self, sid: int) -> None:
        self._handlers.pop(sid, None)
        self._call("unsubscribe", {"sid": sid})

    def publish(self, topic: str, payload: Any) -> None:
        self._call("publish", {"topic": topic, "payload": payload})

    def request(self, topic: str, payload: Any, timeout: timedelta | float, *,
                wait: bool = False, cancel: threading.Event | None = None) -> Any:
        secs = _seconds(timeout, "timeout")
        waiter = _Waiter()
        p = self._server._open_request(self._peer, waiter, topic, payload,
                                       time.monotonic() + secs, wait)
        if not waiter.wait(secs, cancel):
            with self._server._lock:
                self._server._take_pending(p.inbox) if p is not None else None
            if not waiter.wait(0):
                what = "cancelled" if cancel is not None and cancel.is_set() else \
                    f"timed out after {secs:g}s"
                raise _broker_error(BROKER_TIMEOUT, f"request to {topic!r} {what}")
        if waiter.error is not None:
            self._raise_error(waiter.error, topic)
        return waiter.result

    def _send_reply(self, inbox, result, error) -> None:
        params = {"inbox": inbox, "payload": result}
        if error is not None:
            params["error"] = error
        self._server._handle(self._peer, {"method": "reply", "params": params})

    def _call(self, method: str, params: dict) -> Any:
        if self.closed.is_set():
            raise _broker_error(BROKER_CLOSED, "client is closed")
        waiter = _Waiter()
        self._server._handle(self._peer, {"id": waiter, "method": method, "params": params})
        waiter.wait(0)
        if waiter.error is not None:
            self._raise_error(waiter.error, method)
        return waiter.result

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            with self._server._lock:
                failed = self._server._forget_peer(self._peer, "client closed")
            for p in failed:
                self._server._answer(p, error={"code": BROKER_RESPONDER_GONE,
                                               "message": "responder closed"})
            self._shutdown_pool()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BrokerClient(_ClientBase):
    """A client of a BrokerServer over its Unix socket; thread-safe.

    Many requests may be in flight at once; subscription handlers run on a
    small pool so they never block the connection's reader.
    """

    def __init__(self, sock: socket.socket, url: str, max_workers: int = 32):
        super().__init__(max_workers)
        self.url = url
        self._sock = sock
        self._wlock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read_loop, name="nexo-broker-client",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, url: str, timeout: float = 5.0, max_workers: int = 32) -> "BrokerClient":
        """Connect to ``unix:///path``; raises ``PluginPollerForwardError.Broker``."""
        path = _socket_path(url)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise _broker_error(BROKER_CLOSED, f"cannot connect to broker at {path}: "
                                f"{exc.strerror or exc}") from None
        return cls(sock, url, max_workers)

    def _send(self, obj: dict) -> None:
        data = _dumps(obj).encode() + b"\n"
        with self._wlock:
            if self.closed.is_set():
                raise _broker_error(BROKER_CLOSED, "connection to broker is closed")
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise _broker_error(BROKER_CLOSED, f"broker connection lost: {exc}") from None

    def _call(self, method: str, params: dict, timeout: float) -> Any:
        req_id = next(self._ids)
        waiter = _Waiter()
        self._pending[req_id] = waiter
        try:
            self._send({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
            if not waiter.wait(timeout):
                raise _broker_error(BROKER_TIMEOUT, f"{method} timed out after {timeout:g}s")
        finally:
            self._pending.pop(req_id, None)
        if waiter.error is not None:
            self._raise_error(waiter.error, params.get("topic", method))
        return waiter.result

    def subscribe(self, topic: str, handler: Callable[[Any], Any],
                  queue: str | None = None) -> int:
        """Run ``handler(payload)`` for each message; its return value answers requests."""
        sid = next(self._sids)
        self._handlers[sid] = handler      # before the broker can deliver to it
        try:
            self._call("subscribe", {"topic": topic, "sid": sid, "queue": queue}, 10.0)
        except BaseException:
            self._handlers.pop(sid, None)
            raise
        return sid

    def unsubscribe(self, sid: int) -> None:
        self._call("unsubscribe", {"sid": sid}, 10.0)
        self._handlers.pop(sid, None)

    def publish(self, topic: str, payload: Any) -> None:
        """Fire and forget."""
        self._send({"jsonrpc": "2.0", "method": "publish",
                    "params": {"topic": topic, "payload": payload}})

    def request(self, topic: str, payload: Any, timeout: timedelta | float, *,
                wait: bool = False, cancel: threading.Event | None = None) -> Any:
        """Send a request and return its one reply's payload."""
        secs = _seconds(timeout, "timeout")
        ms = max(1, min(BROKER_MAX_TIMEOUT_MS, int(secs * 1000)))
        req_id = next(self._ids)
        waiter = _Waiter()
        self._pending[req_id] = waiter
        try:
            self._send({"jsonrpc": "2.0", "id": req_id, "method": "request",
                        "params": {"topic": topic, "payload": payload, "timeout_ms": ms,
                                   "wait": wait}})
            # The broker answers a timeout itself; the grace covers a wedged broker.
            if not waiter.wait(secs + 1.0, cancel):
                what = "cancelled" if cancel is not None and cancel.is_set() else \
                    f"timed out after {secs:g}s"
                raise _broker_error(BROKER_TIMEOUT, f"request to {topic!r} {what}")
        finally:
            self._pending.pop(req_id, None)
        if waiter.error is not None:
            self._raise_error(waiter.error, topic)
        return waiter.result

    def _send_reply(self, inbox, result, error) -> None:
        params = {"inbox": inbox, "payload": result}
        if error is not None:
            params["error"] = error
        try:
            self._send({"jsonrpc": "2.0", "method": "reply", "params": params})
        except PluginPollerForwardError:
            pass                             # the connection is gone; so is the requester's wait

    def _read_loop(self) -> None:
        sock = self._sock
        buf = bytearray()
        try:
            while True:
                data = sock.recv(262144)
                if not data:
                    break
                buf += data
                if b"\n" not in data:
                    continue
                lines = buf.split(b"\n")
                buf = bytearray(lines.pop())
                for line in lines:
                    if line:
                        self._on_line(line)
        except OSError:
            pass
        finally:
            self._lost()

    def _on_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("broker sent a line that is not JSON; ignored")
            return
        if not isinstance(msg, dict):
            return
        if msg.get("method") == "message":
            params = msg.get("params") or {}
            self._dispatch(params.get("sid"), params.get("payload"), params.get("inbox"))
            return
        waiter = self._pending.get(msg.get("id")) if _is_int(msg.get("id")) else None
        if waiter is not None:
            error = msg.get("error")
            waiter.set(msg.get("result"), error if isinstance(error, dict) else None)
        elif "error" in msg:
            log.warning("broker error: %s", msg["error"])

    def _lost(self) -> None:
        with self._wlock:
            self.closed.set()
        for waiter in list(self._pending.values()):
            waiter.set(None, {"code": BROKER_CLOSED, "message": "connection to broker lost"})
        self._shutdown_pool()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection ends (the daemon went away or close())."""
        return self.closed.wait(timeout)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ============================================================================
# Proxies
# Pollers that live in another process, with the same ``tick(ctx)`` as an
# in-process one; plus the supervisor that keeps long-lived plugins running.
# ============================================================================

@dataclasses.dataclass
class PollContext:
    """Everything one tick of one job needs to know."""
    job_id: str
    agent_id: str
    kind: str
    cursor: bytes | None
    config: Any
    now: datetime
    interval_hint: timedelta
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    def to_request(self) -> TickRequest:
        return build_tick_request(self.kind, self.job_id, self.agent_id, self.cursor,
                                  self.config, self.now, self.interval_hint)


class _SlotGuard:
    """Hold one of a plugin's ``max_concurrent_ticks`` slots for a tick."""

    def __init__(self, handle: PluginPollerHandle, ctx: PollContext):
        self.handle, self.ctx = handle, ctx

    def __enter__(self) -> None:
        secs = self.handle.tick_timeout.total_seconds()
        if not self.handle.slots.acquire(secs, self.ctx.cancel):
            why = "cancelled" if self.ctx.cancel.is_set() else f"none free within {secs:g}s"
            raise PollerError.Transient(
                f"plugin {self.handle.plugin_id!r}: waiting for a tick slot: {why} "
                f"(max_concurrent_ticks={self.handle.max_concurrent_ticks})")

    def __exit__(self, *exc) -> None:
        self.handle.slots.release()


class EphemeralPollerProxy:
    """A poller that runs each tick in a fresh plugin process."""

    def __init__(self, kind: str, handle: PluginPollerHandle, *,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES):
        self.kind, self.handle, self.max_reply_bytes = kind, handle, max_reply_bytes

    def tick(self, ctx: PollContext) -> TickAck:
        h = self.handle
        if not h.entrypoint_command:
            raise PollerError.Config(ctx.job_id, f"plugin {h.plugin_id!r} has no "
                                     "[plugin.entrypoint] command to run")
        with _SlotGuard(h, ctx):
            return spawn_ephemeral_tick(
                h.entrypoint_command, h.plugin_id, ctx.to_request(), h.tick_timeout,
                ctx.cancel, args=h.entrypoint_args, env=h.entrypoint_env,
                cwd=h.working_dir, max_reply_bytes=self.max_reply_bytes)


def forward_tick(broker, handle: PluginPollerHandle, request: TickRequest, *,
                 wait: bool = True, cancel: threading.Event | None = None) -> TickReply:
    """Send one tick to a long-lived plugin through the broker.

    Returns the parsed reply; an error reply raises the matching
    ``PollerError``; transport and parse failures raise
    ``PluginPollerForwardError``.  With ``wait`` the request waits (within
    the tick timeout) for a plugin that has not subscribed yet.
    """
    envelope = broker.request(handle.tick_topic(), request.envelope(), handle.tick_timeout,
                              wait=wait, cancel=cancel)
    return _parse_reply_envelope(envelope, request.job_id)


class PluginPollerProxy:
    """A poller whose ticks go to a long-lived plugin through the broker."""

    def __init__(self, kind: str, handle: PluginPollerHandle, broker):
        self.kind, self.handle, self.broker = kind, handle, broker

    def tick(self, ctx: PollContext) -> TickAck:
        with _SlotGuard(self.handle, ctx):
            try:
                reply = forward_tick(self.broker, self.handle, ctx.to_request(),
                                     cancel=ctx.cancel)
                return reply.into_tick_ack()
            except PluginPollerForwardError as exc:
                raise PollerError.Transient(f"plugin {self.handle.plugin_id!r}: {exc}") from None


def _proxy_for(kind: str, handle: PluginPollerHandle, broker):
    if handle.lifecycle is Lifecycle.EPHEMERAL:
        return EphemeralPollerProxy(kind, handle)
    return PluginPollerProxy(kind, handle, broker)


class PluginSupervisor:
    """Keeps one long-lived plugin process running.

    The process gets its own process group and ``NEXO_BROKER_URL``,
    ``NEXO_POLLER_PLUGIN_ID`` and ``NEXO_POLLER_TICK_TOPIC``; its output is
    relayed to the log line by line.  When it exits it is restarted after
    ``backoff_initial`` seconds, doubling up to ``backoff_max``; a run that
    lasted ``stable_after`` seconds resets the backoff.
    """

    def __init__(self, handle: PluginPollerHandle, broker_url: str, *,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 stable_after: float = 30.0, stop_grace: float = 5.0):
        self.handle, self.broker_url = handle, broker_url
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stable_after, self.stop_grace = stable_after, stop_grace
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plock = threading.Lock()

    def start(self) -> "PluginSupervisor":
        if not self.handle.entrypoint_command:
            raise ManifestError(self.handle.manifest_path or self.handle.plugin_id,
                                "a long-lived plugin needs a command", "plugin.entrypoint")
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"nexo-plugin-{self.handle.plugin_id}")
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen | None:
        h = self.handle
        try:
            return subprocess.Popen(
                [h.entrypoint_command, *h.entrypoint_args], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=h.working_dir,
                start_new_session=True,
                env=_child_env(h.plugin_id, h.entrypoint_env, NEXO_BROKER_URL=self.broker_url,
                               NEXO_POLLER_TICK_TOPIC=h.tick_topic()))
        except OSError as exc:
            log.error("plugin %s: cannot start %r: %s", h.plugin_id, h.entrypoint_command,
                      exc.strerror or exc)
            return None

    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stop.is_set():
            started = time.monotonic()
            with self._plock:
                if self._stop.is_set():
                    return
                self.proc = proc = self._spawn()
            if proc is not None:
                log.info("plugin %s: started (pid %d)", self.handle.plugin_id, proc.pid)
                self._relay(proc)
                code = proc.returncode
                if self._stop.is_set():
                    return
                log.warning("plugin %s: exited with status %s; restarting in %.1fs",
                            self.handle.plugin_id, code, delay)
            if time.monotonic() - started >= self.stable_after:
                delay = self.backoff_initial
            if self._stop.wait(delay):
                return
            self.restarts += 1
            delay = min(self.backoff_max, delay * 2)

    def _relay(self, proc: subprocess.Popen) -> None:
        """Log the plugin's output until it exits; then clear its whole group."""
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = bytearray()
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    buf += chunk
                    *lines, rest = buf.split(b"\n")
                    buf = bytearray(rest[-65536:])      # bound a newline-free flood
                    for line in lines:
                        log.info("plugin %s: %s", self.handle.plugin_id,
                                 line[:4096].decode("utf-8", "replace").rstrip())
                elif proc.poll() is not None:
                    break                   # exited; a grandchild may still hold the pipe
        finally:
            _reap(proc)

    def stop(self) -> None:
        """SIGTERM the plugin's group, SIGKILL after the grace; wait for it."""
        self._stop.set()
        with self._plock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning("plugin %s: ignored SIGTERM; killing", self.handle.plugin_id)
        if proc is not None:
            _kill_group(proc)
        if self._thread is not None:
            self._thread.join(self.stop_grace + 5)


# ============================================================================
# SDK
# Write a plugin in a few lines: ``run_plugin({"rss": tick})``.  The same
# file serves ticks over stdio (ephemeral) or the broker (long-lived).
# ============================================================================

def _plugin_dispatch(handlers: Mapping[str, Callable], envelope: Any) -> dict:
    """Answer one ``poll_tick`` envelope: the dispatcher of both lifecycles."""
    req_id = envelope.get("id") if isinstance(envelope, dict) else None

    def answer(code: int | None, payload: Any) -> dict:
        out: dict = {"jsonrpc": "2.0", "id": req_id}
        if code is None:
            out["result"] = payload
        else:
            out["error"] = {"code": code, "message": str(payload)}
        return out

    if not isinstance(envelope, dict) or envelope.get("method") != "poll_tick":
        method = envelope.get("method") if isinstance(envelope, dict) else None
        return answer(BROKER_METHOD_NOT_FOUND, f"unknown method {method!r}")
    params = envelope.get("params")
    if not isinstance(params, dict):
        return answer(ERROR_CONFIG, "params must be an object")
    kind = params.get("kind")
    handler = handlers.get(kind) if isinstance(kind, str) else None
    if handler is None:
        return answer(ERROR_CONFIG, f"unknown kind {kind!r} (serving: {', '.join(handlers)})")
    try:
        ctx = _context_from_params(params)
    except (ValueError, TypeError, PluginPollerForwardError) as exc:
        return answer(ERROR_CONFIG, f"bad tick request: {exc}")
    try:
        ack = handler(ctx)
        if ack is not None and not isinstance(ack, TickAck):
            raise TypeError(f"tick handler returned {type(ack).__name__}, not TickAck")
    except PollerError as exc:
        code = {ErrorClass.PERMANENT: ERROR_PERMANENT,
                ErrorClass.CONFIG: ERROR_CONFIG}.get(exc.classify(), ERROR_TRANSIENT)
        return answer(code, exc)
    except Exception as exc:                 # a bug in the handler: retry later, keep serving
        return answer(ERROR_TRANSIENT, f"{type(exc).__name__}: {exc}")
    return answer(None, TickReply.from_ack(ack).to_dict())


def _context_from_params(params: dict) -> PollContext:
    def text(key: str) -> str:
        value = params.get(key)
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string")
        return value
    cursor = params.get("cursor")
    hint = params.get("interval_hint_secs", 0)
    if not (_is_int(hint) or isinstance(hint, float)) or hint < 0:
        raise TypeError("interval_hint_secs must be a non-negative number")
    return PollContext(
        job_id=text("job_id"), agent_id=text("agent_id"), kind=text("kind"),
        cursor=None if cursor is None else decode_cursor(cursor),
        config=params.get("config"), now=datetime.fromisoformat(text("now")),
        interval_hint=timedelta(seconds=hint))


def run_plugin(handlers: Mapping[str, Callable[[PollContext], TickAck | None]],
               *, env: Mapping[str, str] | None = None) -> int:
    """Serve ticks for ``handlers`` (kind -> ``tick(ctx)``) until the daemon goes.

    With ``NEXO_POLLER_EPHEMERAL=1`` it answers request lines on stdin until
    stdin closes; otherwise it subscribes to ``NEXO_POLLER_TICK_TOPIC`` on
    ``NEXO_BROKER_URL`` and returns when that connection ends.  Returns an
    exit status for ``sys.exit``.
    """
    env = os.environ if env is None else env
    handlers = dict(handlers)
    if env.get("NEXO_POLLER_EPHEMERAL") == "1":
        return _serve_stdio(handlers)
    url, topic = env.get("NEXO_BROKER_URL"), env.get("NEXO_POLLER_TICK_TOPIC")
    if not url or not topic:
        print("nexo-poller plugin: NEXO_BROKER_URL and NEXO_POLLER_TICK_TOPIC must be set "
              "(or NEXO_POLLER_EPHEMERAL=1); start me from the daemon", file=sys.stderr)
        return 2
    try:
        client = BrokerClient.connect(url)
        # Plugin instances of one id share the work, NATS queue-group style.
        client.subscribe(topic, lambda payload: _plugin_dispatch(handlers, payload),
                         queue=env.get("NEXO_POLLER_PLUGIN_ID") or topic)
    except PluginPollerForwardError as exc:
        print(f"nexo-poller plugin: {exc}", file=sys.stderr)
        return 1
    client.wait_closed()
    return 0


def _serve_stdio(handlers: Mapping[str, Callable]) -> int:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            envelope = json.loads(line)
        except (ValueError, RecursionError) as exc:
            reply = {"jsonrpc": "2.0", "id": None,
                     "error": {"code": BROKER_PARSE_ERROR, "message": f"invalid JSON: {exc}"}}
        else:
            reply = _plugin_dispatch(handlers, envelope)
        out.write(_dumps(reply).encode() + b"\n")
        out.flush()
    return 0
