#!/usr/bin/env python3
"""nexo-poller: a poller daemon and library in one standard-library file.

Out-of-process plugins, written in any language, serve poller *kinds* (rss,
gmail, a CRM).  The daemon schedules jobs from ``pollers.json``, routes each
tick to the plugin owning the job's kind, and keeps every job's cursor safe
across crashes.  It is a port of the plugin poller of nexo, a Rust
multi-agent daemon, and speaks the same wire format.

Run it::

    python nexo_poller.py --config pollers.json

or, starting faster (from cached bytecode, not compiled from source each
time), ``python -m nexo_poller ...`` or the checkout's ``./nexo-poller ...``.

The sections of this file, in dependency order:

    Errors      NexoPollerError (the root), PollerError, PluginPollerForwardError,
                ManifestError, ConfigError, StateError, InputError, ...;
                the broker's error codes (BROKER_*)
    Helpers     small private functions and constants every later section
                uses (_log_safe, _dumps, _loads, _seconds, _backoff,
                _broker_error, _Combiner: write combining, once)
    Wire        encode_cursor, decode_cursor, TickRequest, TickReply, TickAck,
                build_tick_request; nexo's Event envelopes (nexo_event,
                nexo_unwrap)
    Manifest    Lifecycle, PluginPollerHandle, load_manifest
    Router      PluginPollerRouter
    Processes   spawn_ephemeral_tick (process groups, bounded pipes, reaping)
    Broker      BrokerServer (the selector loop: sockets, lines, deadlines)
                over _BrokerRoutes (subscriptions, requests in flight, the
                JSON-RPC methods), BrokerClient, _ClientBase (the contract)
    NATS        NatsClient over _NatsDial (which server, the handshake),
                _NatsSubscriptions, _NatsRequests (one inbox) and
                _JetStreamCapture; connect_broker
    Proxies     PollContext, EphemeralPollerProxy, PluginPollerProxy,
                StdioPollerProxy, forward_tick, PluginSupervisor
    SDK         run_plugin
    Built-in kinds  CommandPoller (the command kind), RssPoller, WebhookPoller
                (one bounded HTTP fetch: _http_fetch), MailPoller and
                GmailPoller (imap, gmail: a mailbox over IMAP), BUILTIN_KINDS,
                builtin_pollers: kinds served with no plugin
    State       JobState, TickStatus, OutboxItem, StateStore (the one owner of
                job state: leases, commits, commands, the outbox), open_state;
                _GroupCommit (one writer thread, batches); SqliteStateStore
                over _SqliteFile and _SqliteOutbox; JetStreamStateStore over
                _KvBucket (the KV client), _KvLeases (the spreading policy), _KvDaemons
                (heartbeats), _KvCommands, _KvOutbox and _KvRuns (the run
                history); RunRecord (one run of a job, kept with its commit)
    Schedule    Schedule, CronExpr (Vixie cron, or nexo's: the cron crate's)
    YAML        the reader of YAML configuration files (_read_yaml): the
                subset configuration files use, refusing the rest
    Config      load_config, config_from_dict, DaemonConfig, JobConfig,
                JobPolicy (a job's effective timeout, backoff, breaker, alert
                cooldown, jitter, and where each came from); nexo's ${...}
                placeholders resolved, their secrets hidden
    Runner      plan_tick, next_run (the pure error policy and catch-up rule);
                Runner, a facade (life cycle, operator verbs, the read API the
                HTTP face, metrics and the CLI use) over its collaborators:
                _JobBook (the jobs, the lock, the timer heap), _Plugins (the
                one table of routes: kind -> poller, lane, budget; supervised
                plugins), _Workers (lanes and tick threads), _Ticks (one
                tick and its effects), _Commands (operator commands),
                _Scheduler (the scheduler thread), _Reload, _Signals (the
                wake-up pipe); the outbox publisher and its sinks, metrics
    HTTP        /metrics, the admin API (nexo's routes), /healthz, /readyz and
                the status page: one route table (_HTTP_ROUTES) of small
                handlers, on one bounded http.server
    CLI         main over one verb table (_VERBS: help, arguments, local and
                remote implementation of each verb)

A section uses its own names, the public ones of earlier sections, and the
private names an earlier section lists under ``# Shares:`` in its banner;
tests/test_structure.py keeps it so (no class over 400 lines either).

A tick travels: _Scheduler pops it off the one timer heap (_JobBook) ->
the kind's route (_Plugins) gives poller, lane and budget -> _Workers runs
it when its lane has a slot -> _Ticks: ``poller.tick(ctx) -> TickAck``, then
``plan_tick`` decides the new state and effects -> the state store commits
cursor, counters and outbox in one transaction (group commit, only while the
lease is held) -> the scheduler thread carries out the effects: log, alert,
next slot -> the outbox publisher delivers what the commit stored.  Errors
travel as ``PollerError`` variants and only _Ticks (the runner's error
policy) decides what they mean.
"""

from __future__ import annotations

import array
import base64
import binascii
import bisect
import dataclasses
import enum
import errno
import functools
import gc
import heapq
import io
import itertools
import json
import logging
import math
import operator
import os
import queue
import random
import re
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import types
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Container, Iterable, Iterator, Mapping

# sqlite3, http.server, argparse, zoneinfo, concurrent.futures, tomllib and
# tempfile are imported where first needed: a plugin importing this module for
# run_plugin (a fresh process per ephemeral tick) should not pay for the
# daemon's parts.

__version__ = "0.1.0"

__all__ = [
    # errors
    "NexoPollerError", "ErrorClass", "PollerError", "PluginPollerForwardError",
    "PollerRouteRegistrationError", "ManifestError", "ConfigError", "StateError",
    "InputError",
    # wire
    "encode_cursor", "decode_cursor", "TickMetrics", "TickRequest", "TickReply",
    "TickAck", "Delivery", "build_tick_request", "tick_topic_for",
    "ERROR_TRANSIENT", "ERROR_PERMANENT", "ERROR_CONFIG", "ERROR_INTERNAL",
    # manifest and router
    "Lifecycle", "PluginPollerHandle", "load_manifest", "PluginPollerRouter",
    # processes and proxies
    "PollContext", "spawn_ephemeral_tick", "EphemeralPollerProxy",
    "PluginPollerProxy", "forward_tick", "PluginSupervisor", "StdioPollerProxy",
    "DEFAULT_MAX_REPLY_BYTES", "STDIO_INIT_WAIT_SECS", "STDIO_SHUTDOWN_WAIT_SECS",
    # broker
    "BrokerServer", "BrokerClient", "BROKER_MAX_LINE_BYTES",
    # nats
    "NatsClient", "connect_broker", "nexo_event", "nexo_request_event", "nexo_unwrap",
    "nexo_reply_payload", "tick_reply_envelope",
    # sdk
    "run_plugin", "NEXO_PYTHON", "entrypoint_problems",
    # built-in kinds
    "CommandPoller", "RssPoller", "WebhookPoller", "BUILTIN_KINDS", "builtin_pollers",
    "DEFAULT_MAX_OUTPUT_BYTES", "MailPoller", "GmailPoller", "DEFAULT_MAX_MESSAGE_BYTES",
    # daemon
    "StateStore", "SqliteStateStore", "JetStreamStateStore", "open_state", "JobState",
    "Command", "TickStatus", "apply_command", "COMMAND_VERBS", "CursorChange",
    "cursor_command_arg", "pause_command_arg", "PAUSE_NOTE_MAX_CHARS", "CURSOR_HISTORY_KEEP",
    "RunRecord", "RUN_HISTORY_KEEP", "Schedule", "CronExpr", "JobConfig",
    "JobPolicy", "DaemonConfig",
    "load_config", "config_from_dict", "Runner", "TickOutcome", "TickPlan", "plan_tick",
    "next_run", "catch_up", "OutboxItem", "outbound_topic", "main",
]

log = logging.getLogger("nexo_poller")
# A library says nothing until its application configures logging (the CLI
# does, for the daemon); without this, Python's last-resort handler would
# print warnings of an embedded Runner to stderr.
log.addHandler(logging.NullHandler())


# ============================================================================
# Errors
# All exceptions the module raises on purpose, under one root.  Each enum of
# the original is a base class whose variants hang off it.
#
# The policy (tests/test_errors.py keeps it): every error the module raises,
# private ones included, is a NexoPollerError subclass.  The exceptions are
# Python's own TypeError for an argument of the wrong type at an API boundary,
# NotImplementedError from StateStore's abstract methods, and TimeoutError
# from the socket wrapper a webhook sink reads through (http.client expects
# it).  A refused value is an InputError, which is also a ValueError (an
# unknown job also a KeyError), so callers written for those keep working.
# ============================================================================

class NexoPollerError(Exception):
    """The root of every error this module raises on purpose: an embedding
    application catches them all with ``except NexoPollerError``."""


class ErrorClass(enum.Enum):
    """What the runner does with a failed tick."""
    TRANSIENT = "transient"   # back off and retry
    PERMANENT = "permanent"   # pause the job until an operator resumes it
    CONFIG = "config"         # the job's configuration is wrong: pause it


class PollerError(NexoPollerError):
    """A tick failed.  Variants: ``Transient``, ``Permanent``, ``Config``."""

    error_class: ErrorClass = ErrorClass.TRANSIENT
    # Partial progress: what the tick got done before it failed, committed
    # with the error (the cursor so far, the items fetched so far).
    next_cursor: bytes | None = None
    deliver: tuple = ()

    def classify(self) -> ErrorClass:
        return self.error_class


def _partial_progress(err: PollerError, next_cursor: Any, deliver: Any) -> None:
    """Keep a Transient's or Permanent's partial progress on ``err``:
    ``next_cursor`` bytes or None, ``deliver`` Delivery items (each checked
    where the error is read: the runner, the SDK)."""
    if next_cursor is not None and not isinstance(next_cursor, (bytes, bytearray)):
        raise TypeError(f"{type(err).__qualname__}: next_cursor must be bytes or None, "
                        f"not {type(next_cursor).__name__}")
    if isinstance(deliver, (str, bytes, dict)):
        raise TypeError(f"{type(err).__qualname__}: deliver must be a list of Delivery, "
                        f"not {type(deliver).__name__}")
    err.next_cursor = None if next_cursor is None else bytes(next_cursor)
    err.deliver = tuple(deliver or ())


# A retry_after beyond this means "a century" (as a next_interval_secs does).
_RETRY_AFTER_MAX_SECS = 100 * 366 * 86400


class _PollerTransient(PollerError):
    """Worth retrying later: a timeout, a crash, a network blip.

    ``retry_after`` (seconds, >= 0, or None) is a "not before": the job's
    next attempt is no earlier than that, whatever the backoff says (a
    rate limit's Retry-After).  Beyond a century it is a century."""
    error_class = ErrorClass.TRANSIENT

    def __init__(self, *args: Any, retry_after: int | float | None = None,
                 next_cursor: bytes | None = None, deliver: Iterable[Any] = ()):
        super().__init__(*args)
        _partial_progress(self, next_cursor, deliver)
        if retry_after is not None:
            if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
                raise TypeError("PollerError.Transient: retry_after must be a number of "
                                f"seconds or None, not {type(retry_after).__name__}")
            if not retry_after >= 0:        # NaN too
                raise InputError(f"PollerError.Transient: retry_after must be >= 0 seconds, "
                                 f"got {retry_after!r}")
            retry_after = min(retry_after, _RETRY_AFTER_MAX_SECS)
        self.retry_after = retry_after


class _PollerPermanent(PollerError):
    """Will not get better by retrying: revoked credentials, a gone feed."""
    error_class = ErrorClass.PERMANENT

    def __init__(self, *args: Any, next_cursor: bytes | None = None,
                 deliver: Iterable[Any] = ()):
        super().__init__(*args)
        _partial_progress(self, next_cursor, deliver)


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


class PluginPollerForwardError(NexoPollerError):
    """Reaching a plugin failed.  Variants: ``Broker``, ``ParseReply``."""


class _ForwardBroker(PluginPollerForwardError):
    """The broker could not deliver the request or its reply."""


class _ForwardParseReply(PluginPollerForwardError):
    """The plugin answered something that is not a valid reply."""


PluginPollerForwardError.Broker = _ForwardBroker
PluginPollerForwardError.ParseReply = _ForwardParseReply
_ForwardBroker.__qualname__ = "PluginPollerForwardError.Broker"
_ForwardParseReply.__qualname__ = "PluginPollerForwardError.ParseReply"


class PollerRouteRegistrationError(NexoPollerError):
    """Registering a plugin with the router failed.  Variant: ``DuplicateKind``."""


class _DuplicateKind(PollerRouteRegistrationError):
    def __init__(self, kind: str, existing_plugin: str, new_plugin: str):
        super().__init__(
            f"kind `{kind}` already owned by plugin `{existing_plugin}` — "
            f"`{new_plugin}` cannot register")
        self.kind, self.existing_plugin, self.new_plugin = kind, existing_plugin, new_plugin


PollerRouteRegistrationError.DuplicateKind = _DuplicateKind
_DuplicateKind.__qualname__ = "PollerRouteRegistrationError.DuplicateKind"


class ManifestError(NexoPollerError):
    """A ``nexo-plugin.toml`` is unreadable or breaks a rule; names file and key."""

    def __init__(self, path: Any, message: str, key: str | None = None):
        where = f"{path}: " + (f"[{key}] " if key else "")
        super().__init__(where + message)
        self.path, self.key, self.detail = str(path), key, message


class ConfigError(NexoPollerError):
    """``pollers.json`` is invalid.  ``problems`` lists every (json path, message)."""

    def __init__(self, source: Any, problems: list[tuple[str, str]]):
        self.source, self.problems = str(source), list(problems)
        lines = [f"{p}: {m}" if p else m for p, m in self.problems]
        head = f"{source}: " if source else ""
        if len(lines) == 1:
            super().__init__(head + lines[0])
        else:
            super().__init__(head + f"{len(lines)} problems:\n  " + "\n  ".join(lines))


class StateError(NexoPollerError):
    """The state database cannot be used (corrupt, foreign schema, locked)."""


class InputError(NexoPollerError, ValueError):
    """A value given to the module is refused: a cron expression, an
    instant, a command verb or its argument (a cursor an operator typed), a
    state capability or location.  The message names the value and what is
    allowed.  Also a ``ValueError``, which the module raised for these before.
    Variant: ``UnknownJob``."""


class _UnknownJob(InputError, KeyError):
    """No job of that id (the message lists the known ones).  Also a
    ``KeyError``, which ``Runner`` raised for it before."""

    __str__ = BaseException.__str__         # the message, not KeyError's repr of it


InputError.UnknownJob = _UnknownJob
_UnknownJob.__qualname__ = "InputError.UnknownJob"

# The broker's error codes (JSON-RPC 2.0's, then ours), the ``code`` of a
# PluginPollerForwardError.Broker whichever broker raised it.
BROKER_PARSE_ERROR = -32700
BROKER_INVALID_REQUEST = -32600
BROKER_METHOD_NOT_FOUND = -32601
BROKER_INVALID_PARAMS = -32602
BROKER_NO_RESPONDERS = -32010
BROKER_TIMEOUT = -32011
BROKER_RESPONDER_GONE = -32012
BROKER_RESPONDER_ERROR = -32013
BROKER_CLOSED = -32014
BROKER_AUTH_FAILED = -32015             # the NATS server refused the credentials
BROKER_PAYLOAD_TOO_LARGE = -32016       # over the server's max_payload; nothing was sent


# ============================================================================
# Helpers
# Small private functions and constants every later section may use: safe
# log text, strict JSON, durations and backoff, the cancel-poll wait.
# ============================================================================

_UNSAFE_IN_LOG = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _log_safe(text: Any, limit: int | None = None) -> str:
    """Text a plugin controls, made safe for one log line: control
    characters (newline, carriage return, escape, ...) become ``\\xNN`` /
    ``\\uNNNN`` escapes, so a plugin can neither forge a log line nor
    drive a terminal; ``limit`` cuts it to that many characters."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return _UNSAFE_IN_LOG.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


# ASCII output: a lone surrogate in a string becomes a \udXXX escape rather
# than an encoding error, and NaN/Infinity (not JSON) are refused.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _reject_constant(name: str):
    raise InputError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InputError(f"number {text[:40]} is out of range")
    return value


_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode


def _loads(data: bytes | str) -> Any:
    """Strict JSON: UTF-8 only, no NaN or Infinity (1e999 included)."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    return _decode(data)


def _seconds(value: timedelta | int | float, what: str = "duration") -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a timedelta or a number of seconds, "
                        f"got {type(value).__name__}")
    return float(value)


def _backoff(initial: float, maximum: float, attempt: int) -> float:
    """The wait before retry ``attempt`` (1: the first): ``initial``, doubled
    for each retry after the first, never more than ``maximum``.  The one
    backoff rule: ``_backoff(wait, maximum, 2)`` is the wait after ``wait``."""
    return min(maximum, initial * 2 ** min(max(attempt, 1) - 1, 60))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_MISSING = object()
_CANCEL_POLL_SECS = 0.05             # how often a wait looks at a cancel Event


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class _Waiter:
    """A one-shot result slot; a pre-acquired lock is CPython's cheapest wake-up."""
    __slots__ = ("_lock", "_unset", "result", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._unset = [True]
        self.result: Any = None
        self.error: dict | None = None

    def set(self, result: Any = None, error: dict | None = None) -> None:
        """Answer it; the first answer wins (a reply read just before the
        connection was lost is not overwritten by "connection lost")."""
        try:
            self._unset.pop()           # atomic: exactly one caller gets past
        except IndexError:
            return
        self.result, self.error = result, error
        self._lock.release()

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


class _Combiner:
    """Write combining for one connection, the one place of its rule: bytes
    are queued by many threads, and whichever finds nobody writing becomes
    the writer and sends all that piled up meanwhile in one system call.
    ``lock`` may also guard its owner's connection state, so that a check of
    it and a queueing are one step."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock
        self._buf = bytearray()
        self._writing = False

    def __len__(self) -> int:
        return len(self._buf)

    def queue(self, data: bytes) -> bool:
        """Queue ``data`` (``lock`` held); True when the caller is now the
        writer and must send until ``next_chunk`` says done."""
        self._buf += data
        if self._writing:
            return False
        self._writing = True
        return True

    def next_chunk(self, give_up: Callable[[], bool] | None = None) -> bytes | None:
        """The writer's next chunk, all that is queued; None when nothing is
        (or ``give_up()``), the writer's role then given up."""
        with self.lock:
            if not self._buf or (give_up is not None and give_up()):
                self._writing = False
                return None
            chunk = bytes(self._buf)
            self._buf.clear()
            return chunk

    def unsent(self, rest: bytes) -> None:
        """Put back what a partial send left; the writer keeps its role."""
        with self.lock:
            self._buf[:0] = rest

    def abandon(self) -> None:
        """A send failed: drop what is queued and give up the writer's role."""
        with self.lock:
            self._buf.clear()
            self._writing = False

    def discard(self) -> None:
        """Drop what is queued (``lock`` held); a writer at work stops at its next chunk."""
        self._buf.clear()


_NEXO_SOURCE = "plugin.poller"          # the ``source`` of the nexo Events clients publish
# A log record's ``extra`` key for a line a plugin wrote: (plugin id, the line),
# so a dry run collects its plugin's output without reading log formats.
_PLUGIN_LINE = "nexo_plugin_line"


def _uuid4() -> str:
    """A random (version 4) UUID as text, as nexo's Event ids are."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _broker_error(code: int, message: str) -> PluginPollerForwardError:
    """A ``PluginPollerForwardError.Broker`` carrying a broker error ``code``."""
    exc = PluginPollerForwardError.Broker(message)
    exc.code = code
    return exc


def _raise_broker_error(error: dict, topic: str):
    """Raise a broker's JSON-RPC ``error`` object as the client's error."""
    raise _broker_error(error.get("code", BROKER_RESPONDER_ERROR),
                        f"{topic}: {error.get('message', 'broker error')}")


def _request_outcome(waiter: "_Waiter", answered: bool, topic: str, secs: float,
                     cancel: threading.Event | None) -> Any:
    """A client request's reply payload, or the Broker error it ended in."""
    if not answered:
        what = "cancelled" if cancel is not None and cancel.is_set() else \
            f"timed out after {secs:g}s"
        raise _broker_error(BROKER_TIMEOUT, f"request to {topic!r} {what}")
    if waiter.error is not None:
        _raise_broker_error(waiter.error, topic)
    return waiter.result


# ============================================================================
# Wire
# The shapes that cross a process boundary, exactly as the original sends
# them: cursors as unpadded URL-safe base64, ``now`` as RFC 3339 +00:00.
# Shares: _cursor_line, _cursor_view, _format_now, _json_type, _parse_reply_envelope,
#   _partial_ack, _reply_to_ack, _TOPIC_TOKEN_RE, _unparsable
# ============================================================================

ERROR_TRANSIENT = -32001
ERROR_PERMANENT = -32002
ERROR_CONFIG = -32602
ERROR_INTERNAL = -32603
_MAX_INTERVAL_SECS = 100 * 366 * 86400     # a longer next_interval_secs means "a century"

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
    problem = "not URL-safe base64"
    if len(body) % 4 != 1 and _B64_CHARS.fullmatch(body):
        try:
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, binascii.Error) as exc:
            problem = str(exc)
    shown = text if len(text) <= 40 else text[:37] + "..."
    raise PluginPollerForwardError.ParseReply(f"invalid cursor {shown!r}: {problem}")


_B64_CHARS = re.compile(r"[A-Za-z0-9_\-]*")


def _cursor_view(cursor: bytes | None) -> dict:
    """A cursor for people: base64 as on the wire, and text when it is printable."""
    if cursor is None:
        return {"cursor": None, "text": None, "bytes": 0}
    try:
        text = cursor.decode("utf-8")
        text = text if text.isprintable() else None
    except UnicodeDecodeError:
        text = None
    return {"cursor": encode_cursor(cursor), "text": text, "bytes": len(cursor)}


def _cursor_line(cursor: bytes | None) -> str:
    v = _cursor_view(cursor)
    if v["cursor"] is None:
        return "(none)"
    shown = json.dumps(v["text"], ensure_ascii=False) if v["text"] is not None else "(binary)"
    return f"{shown}  base64 {v['cursor'] or '(empty)'}  {v['bytes']} bytes"


def _format_now(now: datetime) -> str:
    """RFC 3339 in UTC with a ``+00:00`` offset, as chrono's to_rfc3339 does."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).isoformat()


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
    # this port's optional field (nexo's plugins ignore it): the time of
    # the slot the tick stands for, RFC 3339 as ``now``; None: not sent
    scheduled_at: str | None = None

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "job_id": self.job_id, "agent_id": self.agent_id,
             "cursor": self.cursor, "config": self.config, "now": self.now,
             "interval_hint_secs": self.interval_hint_secs}
        if self.scheduled_at is not None:
            d["scheduled_at"] = self.scheduled_at
        return d

    def envelope(self, request_id: Any = None) -> dict:
        """The JSON-RPC request object both lifecycles carry."""
        msg = {"jsonrpc": "2.0", "method": "poll_tick", "params": self.to_dict()}
        if request_id is not None:
            msg["id"] = request_id
        return msg


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One item a tick hands on: ``payload`` goes to ``recipient`` on ``channel``
    (nexo's ``deliver`` entries)."""
    channel: str
    recipient: str
    payload: Any = None

    def to_dict(self) -> dict:
        return {"channel": self.channel, "recipient": self.recipient, "payload": self.payload}

    @classmethod
    def from_dict(cls, d: Any, where: str = "deliver") -> "Delivery":
        """Parse one ``deliver`` entry; a malformed one raises ``ParseReply`` naming it."""
        if not isinstance(d, dict):
            raise PluginPollerForwardError.ParseReply(
                f"{where} must be an object, got {_json_type(d)}")
        for name in ("channel", "recipient"):
            value = d.get(name)
            if not isinstance(value, str) or not value:
                raise PluginPollerForwardError.ParseReply(
                    f"{where}.{name} must be a non-empty string, got {_json_type(value)}")
        if not _TOPIC_TOKEN_RE.fullmatch(d["channel"]):
            raise PluginPollerForwardError.ParseReply(
                f"{where}.channel {d['channel']!r:.60} is not a topic token "
                "(letters, digits, '_' and '-')")
        return cls(d["channel"], d["recipient"], d.get("payload"))


_TOPIC_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]{1,128}")


@dataclasses.dataclass(frozen=True, slots=True)
class TickAck:
    """What a tick returns to the runner (the in-process poller trait's shape).

    ``deliver`` lists the items to hand on; they are stored with the cursor
    and published after the commit (see the Runner's outbox).
    """
    next_cursor: bytes | None = None
    next_interval_hint: timedelta | None = None
    metrics: TickMetrics | None = None
    deliver: tuple[Delivery, ...] = ()

    def __post_init__(self) -> None:
        deliver = tuple(self.deliver or ())
        for d in deliver:
            if not isinstance(d, Delivery):
                raise TypeError(f"TickAck.deliver holds Delivery items, not {type(d).__name__}")
        object.__setattr__(self, "deliver", deliver)


@dataclasses.dataclass(slots=True)
class TickReply:
    """The plugin-to-daemon reply of one tick, in wire form."""
    next_cursor: str | None = None
    next_interval_secs: int | None = None
    metrics: TickMetrics | None = None
    deliver: tuple[Delivery, ...] = ()

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
        deliver = d.get("deliver")
        if deliver is None:
            deliver = ()
        elif not isinstance(deliver, list):
            raise PluginPollerForwardError.ParseReply(
                f"deliver must be an array, got {_json_type(deliver)}")
        else:
            deliver = tuple(Delivery.from_dict(e, f"deliver[{i}]") for i, e in enumerate(deliver))
        return cls(cursor, interval, metrics, deliver)

    def to_dict(self) -> dict:
        d: dict = {}
        if self.next_cursor is not None:
            d["next_cursor"] = self.next_cursor
        if self.next_interval_secs is not None:
            d["next_interval_secs"] = self.next_interval_secs
        if self.metrics is not None:
            d["metrics"] = {"items_seen": self.metrics.items_seen,
                            "items_dispatched": self.metrics.items_dispatched}
        if self.deliver:
            d["deliver"] = [e.to_dict() for e in self.deliver]
        return d

    def into_tick_ack(self) -> TickAck:
        """Decode the cursor to bytes; a bad cursor raises ``ParseReply``."""
        cursor = None if self.next_cursor is None else decode_cursor(self.next_cursor)
        hint = (None if self.next_interval_secs is None
                else timedelta(seconds=min(self.next_interval_secs, _MAX_INTERVAL_SECS)))
        return TickAck(cursor, hint, self.metrics, self.deliver)

    @classmethod
    def from_ack(cls, ack: TickAck | None) -> "TickReply":
        if ack is None:
            return cls()
        secs = ack.next_interval_hint
        return cls(None if ack.next_cursor is None else encode_cursor(ack.next_cursor),
                   None if secs is None else max(0, int(_seconds(secs))),
                   ack.metrics, tuple(ack.deliver))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


def build_tick_request(kind: str, job_id: str, agent_id: str, cursor: bytes | None,
                       config: Any, now: datetime,
                       interval_hint: timedelta | int | float, *,
                       scheduled_at: datetime | None = None) -> TickRequest:
    """Build the wire request of one tick from runner inputs (pure)."""
    return TickRequest(kind, job_id, agent_id,
                       None if cursor is None else encode_cursor(cursor),
                       config, _format_now(now), int(_seconds(interval_hint, "interval_hint")),
                       None if scheduled_at is None else _format_now(scheduled_at))


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
        code, message, retry_after = ERROR_INTERNAL, "plugin returned an error", None
        cursor, deliver, problem = None, (), None
        if isinstance(error, dict):
            if _is_int(error.get("code")):
                code = error["code"]
            if isinstance(error.get("message"), str):
                message = error["message"]
            retry_after = _retry_after_secs(error.get("data"))
            cursor, deliver, problem = _partial_of(error.get("data"))
        elif isinstance(error, str):
            message = error
        message = _log_safe(message, 2048)      # it reaches the log and the state
        if code == ERROR_CONFIG:
            raise PollerError.Config(job, message)
        text = f"{message} (code {code})" + (f" (partial progress ignored: {problem})"
                                              if problem else "")
        cls = _CODE_TO_CLASS.get(code, PollerError.Transient)
        if cls is PollerError.Transient:
            raise cls(text, retry_after=retry_after, next_cursor=cursor, deliver=deliver)
        raise cls(text, next_cursor=cursor, deliver=deliver)
    if "result" not in envelope:
        raise PluginPollerForwardError.ParseReply("reply has neither `result` nor `error`")
    result = envelope["result"]
    return TickReply.from_dict({} if result is None else result)


def _retry_after_secs(data: Any) -> float | None:
    """An error's ``data.retry_after_secs``: a number >= 0 (a huge one is
    clamped by PollerError.Transient), else None: a plugin's bad value is
    ignored, its error still a plain Transient."""
    value = data.get("retry_after_secs") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    return value


def _partial_of(data: Any) -> tuple[bytes | None, tuple[Delivery, ...], str | None]:
    """An error's ``data.next_cursor`` and ``data.deliver`` (a TickReply's
    shapes): ``(cursor, deliveries, None)``; both dropped, with why, when
    either is malformed, so a cursor never advances past deliveries lost."""
    if not isinstance(data, dict):
        return None, (), None
    try:
        reply = TickReply.from_dict({k: data[k] for k in ("next_cursor", "deliver")
                                     if k in data})
        cursor = None if reply.next_cursor is None else decode_cursor(reply.next_cursor)
    except PluginPollerForwardError as exc:
        return None, (), _log_safe(exc, 200)
    return cursor, reply.deliver, None


def _partial_ack(exc: PollerError) -> TickAck | None:
    """A failed tick's partial progress as a TickAck (None: none); a
    ``deliver`` item that is not a Delivery raises TypeError."""
    if exc.next_cursor is None and not exc.deliver:
        return None
    return TickAck(exc.next_cursor, deliver=exc.deliver)


def _reply_to_ack(envelope: Any, job: str) -> TickAck:
    """A reply envelope as a TickAck; anything unparsable is Transient."""
    try:
        return _parse_reply_envelope(envelope, job).into_tick_ack()
    except PluginPollerForwardError as exc:
        raise _unparsable(exc) from None


def _unparsable(exc: PluginPollerForwardError) -> PollerError:
    """What a reply that cannot be parsed is, whichever lifecycle carried it."""
    return PollerError.Transient(f"unparsable reply: {exc}")


# -- nexo's Event envelopes, on every broker ---------------------------------------

def _nexo_timestamp(now: float | None = None) -> str:
    when = datetime.now(timezone.utc) if now is None else datetime.fromtimestamp(now, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def nexo_event(topic: str, payload: Any, *, source: str = _NEXO_SOURCE,
               event_id: str | None = None, now: float | None = None) -> dict:
    """nexo's broker ``Event`` around ``payload`` (pure but for id and clock):
    id (a uuid4 unless given), timestamp (RFC 3339, Z), topic, source, payload."""
    return {"id": event_id or _uuid4(), "timestamp": _nexo_timestamp(now), "topic": topic,
            "source": source, "session_id": None, "payload": payload}


def nexo_request_event(topic: str, payload: Any, reply_to: str | None, *,
                       source: str = _NEXO_SOURCE) -> dict:
    """A request as nexo's plugins read it: ``Event(Message(reply_to, payload))``."""
    return nexo_event(topic, {"id": _uuid4(), "topic": topic, "reply_to": reply_to,
                              "payload": payload}, source=source)


_RPC_KEYS = ("jsonrpc", "method", "result", "error")


def _is_nexo_envelope(obj: Any) -> bool:
    return (isinstance(obj, dict) and "payload" in obj and "topic" in obj
            and not any(k in obj for k in _RPC_KEYS))


def nexo_unwrap(obj: Any) -> tuple[Any, str | None, str | None]:
    """Open a body that may be a nexo ``Event``, ``Message`` or ``Event(Message)``.

    Returns ``(inner payload, Message.reply_to, shape)`` with shape
    ``"event"``, ``"message"`` or None (not an envelope: returned as is).
    """
    if not _is_nexo_envelope(obj):
        return obj, None, None
    shape = "event" if ("source" in obj or "timestamp" in obj) else "message"
    inner, reply_to = obj["payload"], obj.get("reply_to")
    if shape == "event" and _is_nexo_envelope(inner) and "source" not in inner:
        inner, reply_to = inner["payload"], inner.get("reply_to")
    return inner, reply_to if isinstance(reply_to, str) and reply_to else None, shape


def nexo_reply_payload(answer: Any) -> Any:
    """A reply's payload for nexo readers: ``{"result": R}`` also carries R's
    fields beside ``result``, so nexo's daemon, which decodes the payload
    directly as a TickReply, reads them, while ``error`` keeps its code."""
    if isinstance(answer, dict) and isinstance(answer.get("result"), dict):
        return {**answer["result"], **answer}
    return answer


_TICK_REPLY_KEYS = ("next_cursor", "next_interval_secs", "metrics", "items_seen",
                    "items_dispatched")


def tick_reply_envelope(reply: Any) -> Any:
    """Any reply shape a plugin sends, as ``{"result": ...}``/``{"error": ...}``:
    a nexo envelope is opened, and a bare TickReply (an object with a
    TickReply field and no JSON-RPC member) becomes its ``result``."""
    inner, _, _ = nexo_unwrap(reply)
    if (isinstance(inner, dict) and not any(k in inner for k in _RPC_KEYS)
            and any(k in inner for k in _TICK_REPLY_KEYS)):
        return {"result": inner}
    return inner



# ============================================================================
# Manifest
# A plugin's ``nexo-plugin.toml`` turned into a PluginPollerHandle, with the
# original's validation rules; every error names the file, key and rule.
# Shares: _CRASH_LIMIT_RANGE, _CRASH_WINDOW_RANGE
# ============================================================================

class Lifecycle(str, enum.Enum):
    """How a plugin process lives: one per daemon reached through the broker,
    one per tick, or one per daemon reached through its stdin/stdout."""
    LONG_LIVED = "long_lived"
    EPHEMERAL = "ephemeral"
    STDIO = "stdio"


_KIND_RE = re.compile(r"[a-z][a-z0-9_]+")
# The job id pattern: an id is written into log lines, metrics labels and
# thread names, so it may hold no space, quote or control character.
_PLUGIN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")
_POLLER_KEYS = {"kinds", "broker_topic_prefix", "lifecycle", "max_concurrent_ticks",
                "tick_timeout_secs", "stdio_bridge", "publish_allow", "max_ticks_per_minute",
                "crash_limit", "crash_window_secs"}     # the last three: _OPTIONAL_LIMITS
_ENTRYPOINT_KEYS = {"command", "args", "env"}
NEXO_PYTHON = "$NEXO_PYTHON"      # an entrypoint command meaning the daemon's own interpreter
MAX_CONCURRENT_TICKS = 64
MAX_TICK_TIMEOUT_SECS = 3600
MAX_TICKS_PER_MINUTE = 60_000        # a rate limit keeps this many start times at most
# A supervised plugin's crash loop: so many exits within so many seconds
# and it is given up (``crash_limit``, ``crash_window_secs``).  The ranges
# of the manifest's keys and of the config's global ones.
_CRASH_LIMIT_RANGE = (1, 1000)
_CRASH_WINDOW_RANGE = (1, 86400 * 7)


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


class _PluginHealth:
    """What a long-lived plugin's supervisor knows of its process, shared
    with the plugin's proxy through the handle: while the process is down a
    tick fails at once, with the plugin's last output lines, instead of
    waiting out its timeout for a subscriber that is not coming."""
    TAIL_LINES = 10                  # output lines kept for the error message
    TAIL_CHARS = 240                 # characters kept per line

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self.down: str | None = None            # why no process runs, or None
        self.restart_at: float | None = None    # monotonic time of the next start
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)
        self._watchers: set[threading.Event] = set()
        self._ended = False                     # the supervisor knows how the run ended

    def snapshot(self) -> tuple[str | None, float | None, list[str]]:
        """(why it is down or None, when it restarts, its last output lines), at once."""
        with self._lock:
            return self.down, self.restart_at, list(self.tail)

    def starting(self) -> None:
        with self._lock:
            self.down, self.restart_at, self._ended = None, None, False
            self.tail.clear()

    def output(self, line: str) -> None:
        """One relayed output line (already made log-safe)."""
        with self._lock:
            self.tail.append(line[:self.TAIL_CHARS])

    def went_down(self, why: str, restart_at: float | None = None, ended: bool = True) -> None:
        """The process is gone (``ended``: reaped, ``why`` says how it ended)
        or going (its stdout closed: not ``ended`` yet)."""
        with self._lock:
            self.down, self.restart_at = why, restart_at
            self._ended = self._ended or ended
            self._lock.notify_all()
            watchers = list(self._watchers)
        for event in watchers:
            event.set()

    def wait_ended(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the supervisor has reaped a process
        that is going, so ``describe()`` says how it ended."""
        with self._lock:
            self._lock.wait_for(lambda: self._ended, timeout)

    def watch(self) -> threading.Event:
        """An Event set when the process goes down (already set if it is)."""
        event = threading.Event()
        with self._lock:
            self._watchers.add(event)
            if self.down is not None:
                event.set()
        return event

    def unwatch(self, event: threading.Event) -> None:
        with self._lock:
            self._watchers.discard(event)

    def describe(self) -> str:
        with self._lock:
            why, at, tail = self.down or "went down", self.restart_at, list(self.tail)
        if at is not None:
            why += f"; restarting in {max(0.0, at - time.monotonic()):.1f}s"
        return why + ("; last output: " + " | ".join(tail) if tail else "; no output")


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
    stdio_bridge: bool = False           # stdio: ticks as broker.event, publishes allowed
    publish_allow: tuple[str, ...] = ()  # stdio bridge: topics the plugin may publish to
    max_ticks_per_minute: int | None = None  # tick starts in any 60 s, all kinds (None: any)
    crash_limit: int | None = None       # supervised: exits in crash_window_secs that fail it
    crash_window_secs: float | None = None   # (None: the config's plugin_crash_* keys)
    slots: _Slots = dataclasses.field(init=False, repr=False)
    health: _PluginHealth = dataclasses.field(init=False, repr=False)
    stdio: Any = dataclasses.field(init=False, repr=False)   # Proxies: _stdio_of(handle)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.entrypoint_args = tuple(self.entrypoint_args)
        self.publish_allow = tuple(self.publish_allow)
        self.lifecycle = Lifecycle(self.lifecycle)
        if not isinstance(self.tick_timeout, timedelta):
            self.tick_timeout = timedelta(seconds=_seconds(self.tick_timeout, "tick_timeout"))
        # One limiter per plugin: every kind it serves shares max_concurrent_ticks.
        self.slots = _Slots(self.max_concurrent_ticks)
        self.health = _PluginHealth()
        self.stdio = None                    # the stdio lifecycle's channel, made on first use

    def tick_topic(self) -> str:
        return tick_topic_for(self.broker_topic_prefix)

    def same_spec(self, other: "PluginPollerHandle") -> bool:
        """True when a reload would change nothing about this plugin."""
        fields = [f.name for f in dataclasses.fields(self) if f.init]
        return all(getattr(self, f) == getattr(other, f) for f in fields)


def _read_toml(path: str) -> dict:
    import tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from None
    except RecursionError:
        raise ManifestError(path, "invalid TOML: nested too deeply") from None
    except ValueError as exc:            # a path with NUL, an integer too long to convert
        raise ManifestError(path, f"cannot read: {exc}") from None


def _toml_table(path: str, parent: dict, key: str, name: str, required: bool) -> dict:
    value = parent.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(path, "missing table" if value is None
                            else f"must be a table, got {_toml_type(value)}", name)
    return value


def _toml_typed(path: str, tbl: dict, key: str, name: str, kind: type,
                default: Any = _MISSING) -> Any:
    """``tbl[key]`` checked against ``kind``; absent means ``default``,
    and no default means the key is required."""
    if key not in tbl:
        if default is _MISSING:
            raise ManifestError(path, f"missing; must be {_toml_name(kind)}", name)
        return default
    value = tbl[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(path, f"must be {_toml_name(kind)}, got {_toml_type(value)}", name)
    return value


def _manifest_id(path: str, plugin: dict) -> str:
    plugin_id = _toml_typed(path, plugin, "id", "plugin.id", str)
    if not plugin_id.strip():
        raise ManifestError(path, "must not be empty", "plugin.id")
    if not _PLUGIN_ID_RE.fullmatch(plugin_id):
        raise ManifestError(path, f"{_log_safe(plugin_id)!r} must be 1-128 letters, digits "
                            "or `_ . : -`, starting with a letter or digit", "plugin.id")
    return plugin_id


def _manifest_kinds(path: str, tbl: dict, key: str, name: str) -> list:
    kinds = _toml_typed(path, tbl, key, name, list, [])
    if not kinds:
        raise ManifestError(path, "must list at least one kind", name)
    seen: set[str] = set()
    for i, kind in enumerate(kinds):
        where = f"{name}[{i}]"
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise ManifestError(path, f"{kind!r} must match ^[a-z][a-z0-9_]+$", where)
        if kind in seen:
            raise ManifestError(path, f"duplicate kind {kind!r}", where)
        seen.add(kind)
    return kinds


def _manifest_prefix(path: str, prefix: str, where: str) -> str:
    if not prefix:
        raise ManifestError(path, "must not be empty", where)
    if prefix.endswith("."):
        raise ManifestError(path, f"{prefix!r} must not end with '.'", where)
    if any(c.isspace() for c in prefix):
        raise ManifestError(path, f"{prefix!r} must not contain spaces", where)
    return prefix


def _manifest_limits(path: str, tbl: dict, name: str) -> tuple[int, int]:
    """``max_concurrent_ticks`` and ``tick_timeout_secs`` of a table, checked."""
    limit = _toml_typed(path, tbl, "max_concurrent_ticks", f"{name}.max_concurrent_ticks",
                        int, 1)
    if not 1 <= limit <= MAX_CONCURRENT_TICKS:
        raise ManifestError(path, f"{limit} is outside 1..={MAX_CONCURRENT_TICKS}",
                            f"{name}.max_concurrent_ticks")
    timeout = _toml_typed(path, tbl, "tick_timeout_secs", f"{name}.tick_timeout_secs", int, 60)
    if not 1 <= timeout <= MAX_TICK_TIMEOUT_SECS:
        raise ManifestError(path, f"{timeout} is outside 1..={MAX_TICK_TIMEOUT_SECS}",
                            f"{name}.tick_timeout_secs")
    return limit, timeout


# The optional integer keys of [plugin.poller] (and nexo's [transport]):
# absent, no rate limit (max_ticks_per_minute) or the configuration's
# plugin_crash_limit / plugin_crash_window_secs.
_OPTIONAL_LIMITS = {"max_ticks_per_minute": (1, MAX_TICKS_PER_MINUTE),
                    "crash_limit": _CRASH_LIMIT_RANGE, "crash_window_secs": _CRASH_WINDOW_RANGE}


def _manifest_optional(path: str, tbl: dict, name: str, key: str) -> int | None:
    """An optional integer key of ``_OPTIONAL_LIMITS`` in a table, checked."""
    low, high = _OPTIONAL_LIMITS[key]
    value = _toml_typed(path, tbl, key, f"{name}.{key}", int, None)
    if value is not None and not low <= value <= high:
        raise ManifestError(path, f"{value} is outside {low}..={high}", f"{name}.{key}")
    return value


def _manifest_entry(path: str, entry: dict, name: str) -> tuple[str | None, list, dict]:
    """``command``, ``args`` and ``env`` of an entrypoint (or transport) table."""
    command = _toml_typed(path, entry, "command", f"{name}.command", str, None)
    if command is not None and not command.strip():
        raise ManifestError(path, "must not be empty", f"{name}.command")
    if command is not None and "\0" in command:
        raise ManifestError(path, "must not contain a NUL character", f"{name}.command")
    args = _toml_typed(path, entry, "args", f"{name}.args", list, [])
    for i, arg in enumerate(args):
        if not isinstance(arg, str) or "\0" in arg:
            raise ManifestError(path, "must be a string without NUL characters, got "
                                f"{_toml_type(arg)}", f"{name}.args[{i}]")
    env = _toml_table(path, entry, "env", f"{name}.env", False)
    for key, value in env.items():
        if not isinstance(value, str) or "=" in key or "\0" in key + value:
            raise ManifestError(path, "must be a string (and the name free of '=')",
                                f"{name}.env.{key}")
    if command == NEXO_PYTHON:
        command = sys.executable or "python3"      # the daemon's own interpreter (its venv)
    elif command is not None and "/" in command and not os.path.isabs(command):
        command = os.path.normpath(os.path.join(os.path.dirname(path), command))
    return command, args, env


class _ManifestProblems:
    """Every problem of one manifest, reported at once: ``check`` runs one
    rule, keeps its ManifestError and gives ``default`` back instead."""

    def __init__(self, path: str):
        self.path, self.items = path, []

    def check(self, fn: Callable, *args, default: Any = None) -> Any:
        try:
            return fn(*args)
        except ManifestError as exc:
            self.items.append((exc.key, exc.detail))
            return default

    def unknown_keys(self, tbl: dict, allowed: set[str], name: str) -> None:
        for key in sorted(set(tbl) - allowed):
            self.items.append((name, f"unknown key {key!r} (allowed: "
                                     f"{', '.join(sorted(allowed))})"))

    def raise_any(self) -> None:
        if len(self.items) == 1:
            raise ManifestError(self.path, self.items[0][1], self.items[0][0])
        if self.items:
            raise ManifestError(self.path, f"{len(self.items)} problems: " + "; ".join(
                f"[{key}] {message}" if key else message for key, message in self.items))


def _manifest_bridge(path: str, tbl: dict, name: str) -> tuple[bool, tuple[str, ...]]:
    """The stdio broker bridge switch and its publish allowlist."""
    bridge = _toml_typed(path, tbl, "stdio_bridge", f"{name}.stdio_bridge", bool, False)
    allow = _toml_typed(path, tbl, "publish_allow", f"{name}.publish_allow", list, [])
    for i, topic in enumerate(allow):
        if not isinstance(topic, str) or not topic or any(c.isspace() for c in topic):
            raise ManifestError(path, f"{topic!r} must be a topic without spaces (a trailing "
                                "`>` matches any rest)", f"{name}.publish_allow[{i}]")
    return bridge, tuple(allow)


def load_manifest(path: str | os.PathLike) -> PluginPollerHandle:
    """Read a ``nexo-plugin.toml`` (or nexo's ``plugin.toml``) and return its
    poller handle.

    Raises ``ManifestError`` naming the file, the key and the broken rule.
    A relative entrypoint command containing ``/`` resolves against the
    manifest's folder, which is also the plugin's working directory.  A
    file named ``plugin.toml``, or one with ``[transport]`` and no
    ``[plugin.poller]``, is read as nexo's stdio extension manifest.
    """
    path = os.path.abspath(os.fspath(path))
    doc = _read_toml(path)
    plugin = _toml_table(path, doc, "plugin", "plugin", True)
    if os.path.basename(path) == "plugin.toml" or ("transport" in doc and "poller" not in plugin):
        return _load_extension(path, doc, plugin)
    p = _ManifestProblems(path)
    plugin_id = p.check(_manifest_id, path, plugin)
    poller = _toml_table(path, plugin, "poller", "plugin.poller", True)
    p.unknown_keys(poller, _POLLER_KEYS, "plugin.poller")
    kinds = p.check(_manifest_kinds, path, poller, "kinds", "plugin.poller.kinds", default=[])
    where = "plugin.poller.broker_topic_prefix"
    prefix = p.check(_toml_typed, path, poller, "broker_topic_prefix", where, str)
    if prefix is not None:
        prefix = p.check(_manifest_prefix, path, prefix, where)
    lifecycle = p.check(_toml_typed, path, poller, "lifecycle", "plugin.poller.lifecycle", str,
                        "long_lived")
    if lifecycle is not None and lifecycle not in {m.value for m in Lifecycle}:
        p.items.append(("plugin.poller.lifecycle", f"{lifecycle!r} must be \"long_lived\", "
                        "\"ephemeral\" or \"stdio\""))
    limit, timeout = p.check(_manifest_limits, path, poller, "plugin.poller", default=(1, 60))
    bridge, allow = p.check(_manifest_bridge, path, poller, "plugin.poller", default=(False, ()))
    optional = {key: p.check(_manifest_optional, path, poller, "plugin.poller", key)
                for key in _OPTIONAL_LIMITS}
    entry = _toml_table(path, plugin, "entrypoint", "plugin.entrypoint", False)
    p.unknown_keys(entry, _ENTRYPOINT_KEYS, "plugin.entrypoint")
    command, args, env = p.check(_manifest_entry, path, entry, "plugin.entrypoint",
                                 default=(None, [], {}))
    p.raise_any()
    return PluginPollerHandle(
        plugin_id=plugin_id, kinds=tuple(kinds), broker_topic_prefix=prefix,
        lifecycle=Lifecycle(lifecycle), max_concurrent_ticks=limit,
        tick_timeout=timedelta(seconds=timeout), entrypoint_command=command,
        entrypoint_args=tuple(args), entrypoint_env=dict(env),
        working_dir=os.path.dirname(path), manifest_path=path,
        stdio_bridge=bridge, publish_allow=allow, **optional)


def _load_extension(path: str, doc: dict, plugin: dict) -> PluginPollerHandle:
    """nexo's ``plugin.toml`` as written: ``[plugin] id``, ``[capabilities]
    pollers``, ``[transport] kind = "stdio"``, ``command``, ``args``, ``env``.
    Other sections and keys are nexo's business and ignored; ``[transport]``
    may add this daemon's ``max_concurrent_ticks``, ``tick_timeout_secs``,
    ``broker_topic_prefix``, ``stdio_bridge``, ``publish_allow``,
    ``max_ticks_per_minute``, ``crash_limit`` and ``crash_window_secs``."""
    plugin_id = _manifest_id(path, plugin)
    caps = _toml_table(path, doc, "capabilities", "capabilities", True)
    kinds = _manifest_kinds(path, caps, "pollers", "capabilities.pollers")
    transport = _toml_table(path, doc, "transport", "transport", True)
    kind = _toml_typed(path, transport, "kind", "transport.kind", str)
    if kind != "stdio":
        raise ManifestError(path, f"{_log_safe(kind)!r} is not supported (only \"stdio\")",
                            "transport.kind")
    command, args, env = _manifest_entry(path, transport, "transport")
    if command is None:
        raise ManifestError(path, "missing; must be a string", "transport.command")
    prefix = _manifest_prefix(path, _toml_typed(
        path, transport, "broker_topic_prefix", "transport.broker_topic_prefix", str,
        f"plugin.poller.{plugin_id}"), "transport.broker_topic_prefix")
    limit, timeout = _manifest_limits(path, transport, "transport")
    bridge, allow = _manifest_bridge(path, transport, "transport")
    optional = {key: _manifest_optional(path, transport, "transport", key)
                for key in _OPTIONAL_LIMITS}
    return PluginPollerHandle(
        plugin_id=plugin_id, kinds=tuple(kinds), broker_topic_prefix=prefix,
        lifecycle=Lifecycle.STDIO, max_concurrent_ticks=limit,
        tick_timeout=timedelta(seconds=timeout), entrypoint_command=command,
        entrypoint_args=tuple(args), entrypoint_env=dict(env),
        working_dir=os.path.dirname(path), manifest_path=path,
        stdio_bridge=bridge, publish_allow=allow, **optional)


def entrypoint_problems(handle: PluginPollerHandle) -> list[str]:
    """What keeps a plugin's entrypoint from starting, each with its fix
    (``validate`` reports them): a missing file, a bare name not on PATH,
    no execute bit, neither a ``#!`` interpreter line nor a binary."""
    command = handle.entrypoint_command
    if command is None:
        return []
    if "/" not in command:
        path = handle.entrypoint_env.get("PATH", os.environ.get("PATH", os.defpath))
        import shutil
        if shutil.which(command, path=path) is None:
            return [f"command {command!r} is not found on PATH; install it, or give its "
                    "path (relative to the manifest's folder, e.g. \"./plugin.py\")"]
        return []
    if not os.path.exists(command):
        return [f"command {command} does not exist; fix the path (a relative one starts "
                "from the manifest's folder)"]
    if os.path.isdir(command):
        return [f"command {command} is a directory; name the program inside it"]
    if not os.access(command, os.X_OK):
        return [f"command {command} is not executable; run `chmod +x {command}`"]
    try:
        with open(command, "rb") as fh:
            head = fh.readline(256)
    except OSError as exc:
        return [f"command {command} cannot be read: {exc.strerror or exc}"]
    if head.startswith(b"\x7fELF"):
        return []
    if not head.startswith(b"#!"):
        return [f"command {command} has no '#!' interpreter line and is not a binary; "
                "make its first line e.g. `#!/usr/bin/env python3`, or set command to the "
                f"interpreter (\"{NEXO_PYTHON}\" for the daemon's Python) and put the script "
                "in args"]
    words = head[2:].decode("utf-8", "replace").split()
    if not words or not os.access(words[0], os.X_OK):
        return [f"command {command}: its interpreter "
                f"{words[0] if words else '(none)'!r} in the '#!' line does not exist"]
    return []


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
# Shares: _plugin_for
# ============================================================================

class PluginPollerRouter:
    """Thread-safe map from kind to the plugin handle that serves it: the one
    answer to "who serves kind K", one owner per kind.  Kinds served in
    process (``claim_in_process``) have an owner and no handle.

    Built-in kinds (``offer_builtin``) are the one exception to "one owner":
    they are owned only while nothing else claims them, so a plugin or an
    in-process poller serving the same kind replaces the built-in (the rule
    lives in ``_claimed`` and ``owner``)."""

    IN_PROCESS = "(in-process)"             # the owner of a kind served by Runner.register
    BUILT_IN = "(built-in)"                 # the owner of a built-in kind nothing else claims

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_plugin: dict[str, PluginPollerHandle] = {}
        self._by_kind: dict[str, PluginPollerHandle] = {}
        self._in_process: set[str] = set()
        self._builtin: frozenset[str] = frozenset()

    # Writers change entries in an order that never lets a lock-free reader
    # miss a kind that stays registered: new entries first, stale ones last.

    def register(self, handle: PluginPollerHandle) -> None:
        """Add a plugin; the same plugin id again replaces its entry (hot restart).

        Raises ``PollerRouteRegistrationError.DuplicateKind`` when a kind is
        owned by another plugin; nothing changes then.
        """
        with self._lock:
            for kind in handle.kinds:
                owner = self._claimed(kind)
                if owner is not None and owner != handle.plugin_id:
                    raise PollerRouteRegistrationError.DuplicateKind(
                        kind, owner, handle.plugin_id)
            old = self._by_plugin.get(handle.plugin_id)
            self._by_plugin[handle.plugin_id] = handle
            for kind in handle.kinds:
                self._by_kind[kind] = handle
            if old is not None:
                self._drop_kinds(old, keep=set(handle.kinds))

    def unregister(self, plugin_id: str) -> bool:
        """Remove a plugin and its kinds; True when something was removed."""
        with self._lock:
            old = self._by_plugin.pop(plugin_id, None)
            if old is None:
                return False
            self._drop_kinds(old, keep=set())
            return True

    def _drop_kinds(self, old: PluginPollerHandle, keep: set[str]) -> None:
        for kind in old.kinds:
            if kind not in keep and self._by_kind.get(kind) is old:
                del self._by_kind[kind]

    def claim_in_process(self, kinds: Iterable[str]) -> None:
        """Own ``kinds`` for pollers served in process; raises ``DuplicateKind``
        when one has an owner already (nothing changes then)."""
        kinds = list(kinds)
        with self._lock:
            for kind in kinds:
                owner = self._claimed(kind)
                if owner is not None:
                    raise PollerRouteRegistrationError.DuplicateKind(kind, owner, self.IN_PROCESS)
            self._in_process.update(kinds)

    def offer_builtin(self, kinds: Iterable[str]) -> None:
        """Serve ``kinds`` built in: each is owned by ``"(built-in)"`` while
        no plugin or in-process poller claims it."""
        with self._lock:
            self._builtin = self._builtin | frozenset(kinds)

    def _claimed(self, kind: str) -> str | None:
        """Who claimed ``kind`` (a plugin id or ``"(in-process)"``), built-ins aside."""
        handle = self._by_kind.get(kind)
        if handle is not None:
            return handle.plugin_id
        return self.IN_PROCESS if kind in self._in_process else None

    def owner(self, kind: str) -> str | None:
        """Who serves ``kind``: a plugin id, ``"(in-process)"``,
        ``"(built-in)"`` (only when nothing claimed it), or None."""
        owner = self._claimed(kind)
        if owner is None and kind in self._builtin:
            return self.BUILT_IN
        return owner

    def handle_for_kind(self, kind: str) -> PluginPollerHandle | None:
        # A single dict read is atomic under the GIL; no lock on the hot path.
        return self._by_kind.get(kind)

    def handles_for_plugin(self, plugin_id: str) -> PluginPollerHandle | None:
        return self._by_plugin.get(plugin_id)

    def handles(self) -> list[PluginPollerHandle]:
        with self._lock:
            return list(self._by_plugin.values())

    def kinds(self) -> list[str]:
        """Every kind with an owner, in-process and built-in ones included."""
        with self._lock:
            return sorted(set(self._by_kind) | self._in_process | self._builtin)

    def is_empty(self) -> bool:
        return not self._by_plugin

    def len(self) -> int:
        """Number of plugins (not kinds)."""
        return len(self._by_plugin)

    __len__ = len


def _plugin_for(kind: str, plugins: Iterable[PluginPollerHandle]) -> PluginPollerHandle | None:
    """The plugin among ``plugins`` (a configuration's, a reload's) that
    serves ``kind``, else None: the lookup a ``PluginPollerRouter`` makes,
    for a list no router holds yet."""
    return next((h for h in plugins if kind in h.kinds), None)


# ============================================================================
# Processes
# One tick in a fresh process: its own process group, every pipe watched by
# one selector under one deadline, the whole group killed and reaped after.
# Shares: _become_subreaper, _child_env, _exit_status, _Failure, _kill_group,
#   _Lines, _pidfd, _popen, _reap, _run_reaped, _run_to_exit,
#   _STDERR_KEEP_BYTES, _sweep_orphans, _UNHEALING_ERRNOS, _wait_exit,
#   _with_stderr
# ============================================================================

DEFAULT_MAX_REPLY_BYTES = 1 << 20    # longest reply line an ephemeral plugin may send
_STDERR_KEEP_BYTES = 8192            # stderr kept per tick (the newest) for the debug log
_STDERR_TAIL_LINES = 10              # of which the last lines go into a failed tick's error
_STDERR_TAIL_BYTES = 2048
_UNHEALING_ERRNOS = {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR}


def _child_env(plugin_id: str, extra: Mapping[str, str] | None, **nexo: str) -> dict:
    """The daemon's environment, plus the manifest's env, plus NEXO_* variables;
    the folder of this module leads ``PYTHONPATH``, so a Python plugin
    anywhere can ``import nexo_poller``.  The daemon's NEXO_POLLER_ADMIN_*
    (the admin API's token) stay out: with it a plugin could pause or reset
    any job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXO_POLLER_ADMIN_")}
    env.update(extra or {})
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    env["NEXO_PYTHON"] = sys.executable or "python3"
    env["NEXO_POLLER_PLUGIN_ID"] = plugin_id
    env.update(nexo)
    return env


def _stderr_tail(stderr: bytes | bytearray) -> str:
    """The last lines of a plugin's stderr, bounded and on one line, or ''."""
    lines = [_log_safe(x.strip()) for x in bytes(stderr[-_STDERR_TAIL_BYTES:])
             .decode("utf-8", "replace").splitlines() if x.strip()]
    return " | ".join(lines[-_STDERR_TAIL_LINES:])


def _with_stderr(exc: PollerError, stderr: bytes | bytearray) -> PollerError:
    """``exc`` with the plugin's last stderr lines appended to its message."""
    tail = _stderr_tail(stderr)
    if tail:
        exc.args = (f"{exc}; stderr: {tail}",)
    return exc


def _spawn_error(job_id: str, plugin_id: str, command: str, what: str,
                 exc: OSError) -> PollerError:
    """A plugin that cannot be started: a missing file, no execute bit or no
    interpreter line will not heal by retrying (Config: the job pauses)."""
    text = f"plugin {plugin_id!r}: cannot start {command!r}: {what}: {exc.strerror or exc}"
    if exc.errno in _UNHEALING_ERRNOS:
        return PollerError.Config(job_id, text + " (check the manifest's [plugin.entrypoint] "
                                  "command; `validate` names the fix)")
    return PollerError.Transient(text)


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
    with _CHILDREN.lock:
        _CHILDREN.pids.discard(proc.pid)


# -- escaped descendants ------------------------------------------------------
# A descendant that calls setsid() leaves its plugin's process group, so
# killing the group misses it.  The daemon's ``run`` makes itself a child
# subreaper (Linux): such orphans are then re-parented to the daemon instead
# of init, and _sweep_orphans finds them among its children, kills and reaps
# them.  It only ever waits for a pid that no Popen of this module owns, so
# it never takes the exit status a subprocess.Popen.wait() is waiting for.
# Elsewhere (not Linux, or a library user's process) an escaped descendant
# outlives its plugin: the documented limit.

class _Children:
    """The processes this module started and has not reaped yet."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: set[int] = set()
        self.spawning = 0             # Popen calls whose child may not be listed yet
        self.subreaper = False
        self.sweeping = threading.Lock()   # one sweep at a time: no kill after a reap


_CHILDREN = _Children()
_PR_SET_CHILD_SUBREAPER = 36


def _popen(argv: list, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, with the child recorded as ours until _reap."""
    with _CHILDREN.lock:
        _CHILDREN.spawning += 1
    proc = None
    try:
        proc = subprocess.Popen(argv, **kwargs)
        return proc
    finally:
        with _CHILDREN.lock:
            _CHILDREN.spawning -= 1
            if proc is not None:
                _CHILDREN.pids.add(proc.pid)


def _become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux
    ``prctl(PR_SET_CHILD_SUBREAPER)``), and sweep them at exit.  Only the
    daemon's ``run`` calls it: it makes every child that no Popen of this
    module owns fair game for _sweep_orphans.  False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError, ImportError) as exc:
        log.warning("cannot become a child subreaper: %s", exc)
        return False
    if not _CHILDREN.subreaper:
        _CHILDREN.subreaper = True
        import atexit
        atexit.register(_sweep_orphans)
    return True


def _child_pids() -> set[int]:
    """This process's children, from /proc (every thread's list, or a scan)."""
    me, out = os.getpid(), set()
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children", "rb") as f:
                out.update(int(p) for p in f.read().split())
        return out
    except (OSError, ValueError):
        pass                             # no CONFIG_PROC_CHILDREN, or a thread ended
    for entry in os.listdir("/proc"):
        st = _proc_stat(int(entry)) if entry.isdigit() else None
        if st is not None and st[1] == me:
            out.add(int(entry))
    return out


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def _sweep_orphans(marker: bytes | None = None) -> int:
    """Kill and reap the escaped descendants this subreaper adopted: children
    no Popen of ours owns.  With ``marker`` (``b"NAME=value"``) only those
    whose environment holds it are killed; zombies are always reaped.
    Returns how many it killed or reaped; 0 unless _become_subreaper ran."""
    if not _CHILDREN.subreaper:
        return 0
    with _CHILDREN.sweeping:
        return _sweep_locked(marker)


def _sweep_locked(marker: bytes | None) -> int:
    done = 0
    for _ in range(32):                  # a killed leader's children come to us next
        kids = _child_pids()
        with _CHILDREN.lock:
            if _CHILDREN.spawning:       # a child not listed yet: leave it for next time
                return done
            kids -= _CHILDREN.pids
        swept = 0
        for pid in sorted(kids):
            st = _proc_stat(pid)
            if st is None:
                continue
            if st[0] != "Z" and marker is not None:
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        if marker not in f.read().split(b"\0"):
                            continue
                except OSError:
                    continue
            if st[0] != "Z":
                try:                     # unreaped, so neither pid nor group id is reused
                    if st[2] == pid:
                        os.killpg(pid, signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.waitpid(pid, 0)
                swept += 1
            except ChildProcessError:
                pass
        done += swept
        if not swept:
            return done
    return done


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
    try:
        payload = (_dumps(request.envelope(1)) + "\n").encode()
    except (ValueError, TypeError) as exc:
        raise PollerError.Config(request.job_id, f"config is not JSON: {exc}") from None
    try:
        proc = _popen(
            [command, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=cwd, start_new_session=True, bufsize=0,
            env=_child_env(plugin_id, env, NEXO_POLLER_EPHEMERAL="1"))
    except ValueError as exc:            # NUL bytes and the like: nothing was started
        raise PollerError.Transient(f"plugin {plugin_id!r}: cannot start {command!r}: "
                                    f"{exc}") from None
    except OSError as exc:
        what = exc.filename if exc.filename == cwd and cwd else command
        raise _spawn_error(request.job_id, plugin_id, command, what, exc) from None
    stderr = bytearray()

    def exchange() -> bytes:
        line = _exchange(proc, payload, budget, cancel, max_reply_bytes, stderr)
        if line is None:
            raise _Failure(f"closed stdout before replying ({_exit_status(proc)})")
        return line
    try:
        line = _run_reaped(proc, f"plugin {plugin_id!r}", plugin_id, stderr, exchange)
    finally:
        if stderr and log.isEnabledFor(logging.DEBUG):
            for text in stderr.decode("utf-8", "replace").splitlines():
                said = _log_safe(text)          # not ``line``: that is the reply
                log.debug("plugin %s stderr: %s", _log_safe(plugin_id), said,
                          extra={_PLUGIN_LINE: (_log_safe(plugin_id), said)})
    try:
        if not line.strip():
            raise PollerError.Transient(f"plugin {plugin_id!r} replied with an empty line")
        try:
            envelope = _loads(line)
        except (ValueError, RecursionError) as exc:
            raise PollerError.Transient(
                f"plugin {plugin_id!r} replied with a line that is not JSON: {exc}") from None
        return _reply_to_ack(envelope, request.job_id)
    except PollerError as exc:
        raise _with_stderr(exc, stderr) from None


class _Failure(NexoPollerError):
    """Internal: why an exchange with a child process ended without a reply."""


def _run_reaped(proc: subprocess.Popen, who: str, marker: str, stderr: bytearray,
                run: Callable[[], Any]) -> Any:
    """``run()`` against the started child ``proc``; a ``_Failure`` becomes a
    Transient naming ``who``, with the stderr tail.  Whatever happens, the
    group is killed and reaped and the escaped descendants whose environment
    holds ``NEXO_POLLER_PLUGIN_ID=marker`` swept before this returns."""
    try:
        return run()
    except _Failure as exc:
        raise _with_stderr(PollerError.Transient(f"{who}: {exc}"), stderr) from None
    finally:
        _reap(proc)
        _sweep_orphans(f"NEXO_POLLER_PLUGIN_ID={marker}".encode())


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
                    else:                       # keep the newest bytes: the error is last
                        stderr += chunk
                        del stderr[:-_STDERR_KEEP_BYTES]
                    continue
                if not chunk:
                    return None
                end = chunk.find(b"\n")
                reply += chunk if end < 0 else chunk[:end]
                if len(reply) > max_reply:
                    raise _Failure(f"reply line longer than {max_reply} bytes")
                if end >= 0:
                    return bytes(reply)


def _run_to_exit(proc: subprocess.Popen, budget: float, cancel: threading.Event | None,
                 max_out: int, stderr: bytearray) -> bytes:
    """Read the child's whole stdout and wait for it to exit, all within
    ``budget`` seconds (stdin is the caller's: give it none).

    Returns stdout once the child has exited (what it wrote before, drained;
    a descendant still holding the pipe is not waited for: _reap kills the
    group).  The child stays unreaped, so _reap may still signal its group.
    Raises ``_Failure`` on timeout, cancel or stdout over ``max_out`` bytes.
    """
    outfd, errfd = proc.stdout.fileno(), proc.stderr.fileno()
    for fd in (outfd, errfd):
        os.set_blocking(fd, False)
    out = bytearray()
    deadline = time.monotonic() + budget
    pidfd = _pidfd(proc.pid)

    def exited() -> bool:
        try:
            return os.waitid(os.P_PID, proc.pid,
                             os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
        except ChildProcessError:
            return True

    def drain(fd: int) -> bool:                 # False at end of file
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            if fd == errfd:                     # keep the newest bytes: the error is last
                stderr.extend(chunk)
                del stderr[:-_STDERR_KEEP_BYTES]
            else:
                out.extend(chunk)
                if len(out) > max_out:
                    raise _Failure(f"wrote more than {max_out} bytes to stdout")

    try:
        with selectors.DefaultSelector() as sel:
            sel.register(outfd, selectors.EVENT_READ)
            sel.register(errfd, selectors.EVENT_READ)
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Failure(f"timed out after {budget:g}s")
                if cancel is not None and cancel.is_set():
                    raise _Failure("tick cancelled")
                if pidfd is None or cancel is not None:
                    left = min(left, _CANCEL_POLL_SECS)
                for key, _ in sel.select(left):
                    if key.fd != pidfd and not drain(key.fd):
                        sel.unregister(key.fd)
                if exited():
                    for key in list(sel.get_map().values()):
                        if key.fd != pidfd:
                            drain(key.fd)
                    return bytes(out)
    finally:
        if pidfd is not None:
            os.close(pidfd)


class _Lines:
    """Split a byte stream into lines of at most ``limit`` bytes: each line
    goes to ``on_line``; the head of a longer one to ``on_overflow`` and the
    rest, up to its newline, is skipped (memory stays bounded)."""
    __slots__ = ("limit", "on_line", "on_overflow", "buf", "skipping")

    def __init__(self, limit: int, on_line: Callable[[bytes], None],
                 on_overflow: Callable[[bytes], None]) -> None:
        self.limit, self.on_line, self.on_overflow = limit, on_line, on_overflow
        self.buf, self.skipping = bytearray(), False

    def feed(self, chunk: bytes) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self.skipping:
                self.buf += piece
                if len(self.buf) > self.limit:
                    self.on_overflow(bytes(self.buf[:4096]))
                    self.buf.clear()
                    self.skipping = True
                elif end >= 0:
                    line = bytes(self.buf)
                    self.buf.clear()
                    self.on_line(line)
            if end < 0:
                return
            self.skipping = False
            start = end + 1


def _pidfd(pid: int) -> int | None:
    """A descriptor that turns readable when ``pid`` exits (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_exit(proc: subprocess.Popen) -> None:
    """Block until the child exits, leaving it unreaped (its pid and group id
    stay ours until _reap)."""
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    except (ChildProcessError, AttributeError):     # reaped already; no waitid
        proc.wait()


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
#
# Who reads each socket, at every moment (BENCHMARKS.md, "A busy plugin"):
# - The broker's end of every connection: the loop thread (``_serve``),
#   alone, from accept to close.  It runs no handler and never blocks on a
#   peer: sockets are non-blocking; a line to a peer is sent by whichever
#   thread finds nobody sending on that socket (``_Combiner``), and what a
#   full socket leaves over by the loop once it is writable.  A bug met on
#   one connection closes that connection, never the loop.
# - A client's end (BrokerClient: every plugin, every external client):
#   whichever of its serving threads holds ``_leader``, the reading role.
#   The holder settles responses itself.  Meeting a message for a handler,
#   it first makes sure a successor exists (a thread idle on ``_leader``,
#   else it starts one, up to ``max_workers``), then releases the role and
#   runs the handler; more messages from the same read go to the pool.
# How a reply reaches its waiter: every caller waits on its own ``_Waiter``,
# a lock taken in advance; the reader that meets the answer releases it: one
# wake-up, no Condition, the first answer wins (a reply racing a timeout, a
# cancel or a lost connection).  On the daemon path (``_LocalClient``) the
# requester writes its message to the plugin's socket itself (the payload's
# JSON text made once) and the loop thread reads the reply; the loop gives
# the answers of one wake-up just before it blocks again (``_complete``),
# so a requester does not wake only to wait for the GIL.  An external
# client's reply comes back through the loop to that client's reader.
# Why no reader can be lost: the role is a lock released in a ``finally``,
# and a serving thread ends only with its connection, because nothing else
# can end it: a handler's failure, of any kind or size, becomes its error
# reply (``_failure_text`` cannot fail), a line that cannot be handled
# costs only itself, a thread the system refuses to start leaves the role
# to those there are.  So at every moment one thread reads, or one waits
# for the role or is being started -- or every serving thread runs a
# handler (``max_workers`` of them, or all the system gave), and the first
# to finish reads on: that cap is the only pause, and it lasts as long as
# the handlers it waits for.  tests/test_broker_stress.py tries to lose one.
# Shares: _ClientBase
# ============================================================================

BROKER_MAX_LINE_BYTES = 1 << 20       # longest line a client may send
BROKER_MAX_OUTBUF_BYTES = 8 << 20     # unsent bytes a connection may pile up
BROKER_MAX_TIMEOUT_MS = 3_600_000     # longest request timeout accepted
_ACCEPT_BACKOFF_MIN_SECS = 0.05       # first pause of accepting when fds run out
_ACCEPT_BACKOFF_MAX_SECS = 1.0
_ACCEPT_LOG_EVERY_SECS = 10.0         # one log line per interval while it lasts
_NO_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
BROKER_DEFAULT_TIMEOUT_MS = 30_000
_RECV_BYTES = 262144                  # one read from a broker socket, at most

# What identifies an over-long line's request, looked for in its first bytes.
_LINE_HEAD_BYTES = 4096
_HEAD_METHOD = re.compile(rb'"method"\s*:\s*"([a-z_]{1,32})"')
_HEAD_INBOX = re.compile(rb'"inbox"\s*:\s*([0-9]{1,18})\b')
_HEAD_ID = re.compile(rb'"id"\s*:\s*(-?[0-9]{1,18}\b|"[A-Za-z0-9_.:\-]{1,64}")')


class _LineTooLong(PluginPollerForwardError.Broker):
    """A message too long for one broker line; nothing was sent."""
    code = BROKER_INVALID_REQUEST


class _NotJson(PluginPollerForwardError.Broker, ValueError):
    """A message that is not JSON; nothing was sent.  (A ValueError too, as
    every client's reply path treats one.)"""
    code = BROKER_INVALID_PARAMS


def _socket_path(url: str) -> str:
    if not isinstance(url, str) or not url.startswith("unix://") or len(url) <= 7:
        raise _broker_error(BROKER_INVALID_PARAMS,
                            f"broker URL must look like unix:///path/to.sock, got {url!r}")
    return url[7:]


class _Pending:
    """One request in flight through the broker."""
    __slots__ = ("inbox", "requester", "req_id", "topic", "payload", "responders",
                 "deadline", "encoded")

    def __init__(self, inbox, requester, req_id, topic, payload, deadline, encoded=None):
        self.inbox, self.requester, self.req_id = inbox, requester, req_id
        self.topic, self.payload, self.deadline = topic, payload, deadline
        self.encoded = encoded              # the payload's JSON text, when the requester made it
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
        self.skipping = False               # dropping the rest of an over-long line
        self.out = _Combiner(threading.Lock())
    # When the socket is full the loop thread takes the writer's role.

    def send(self, obj: Any) -> None:
        self._send_line(_dumps(obj))

    def _send_line(self, line: str) -> None:
        data = line.encode() + b"\n"
        with self.out.lock:
            if self.closed:
                return
            if len(self.out) + len(data) > BROKER_MAX_OUTBUF_BYTES:
                self.server._schedule_close(self, "slow consumer: output buffer full")
                return
            if not self.out.queue(data):
                return
        if self._write_out():
            return
        self.server._want_write(self)       # socket full: the loop finishes the job

    def flush(self) -> bool:
        """The loop thread's turn as writer; True once everything is sent."""
        return self._write_out()

    def _write_out(self) -> bool:
        """Send what is queued (writer only); True when done, False when the
        socket is full and the rest must wait for it to become writable."""
        while True:
            chunk = self.out.next_chunk(lambda: self.closed)
            if chunk is None:
                return True
            try:
                n = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:                 # the peer went away with replies unread
                self.out.abandon()
                self.server._schedule_close(self, "write failed")
                return True
            if n < len(chunk):
                self.out.unsent(chunk[n:])
                return False

    def deliver(self, sid, topic, payload, inbox, encoded=None) -> None:
        if encoded is not None:             # the same line as below, the payload not encoded twice
            sid_text = str(sid) if type(sid) is int else _dumps(sid)   # str(): no encoder call
            self._send_line(f'{{"jsonrpc":"2.0","method":"message","params":{{"sid":'
                            f'{sid_text},"topic":{_dumps(topic)},"payload":{encoded},'
                            f'"inbox":{inbox:d}}}}}')
            return
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

    def deliver(self, sid, topic, payload, inbox, encoded=None) -> None:
        self.client._dispatch(sid, payload, inbox)

    def answer(self, req_id, result=None, error=None) -> None:
        self.client._server._complete(req_id, result, error)   # the id is its _Waiter


class _BrokerRoutes:
    """The broker's routing and its JSON-RPC methods, free of any transport:
    subscriptions by topic (queue groups take turns), requests in flight
    and those parked until a subscriber comes, and who answers whom."""

    def __init__(self, track: Callable[[float, int], None]):
        self.lock = threading.Lock()        # guards everything below
        self.stopping = False
        self._track = track                 # a socket request's deadline, to the loop's timer
        self._topics: dict[str, _Topic] = {}
        self._pending: dict[int, _Pending] = {}
        self._parked: dict[str, list[_Pending]] = {}     # requests waiting for a subscriber
        self._inboxes = itertools.count(1)

    def stats(self) -> dict:
        with self.lock:
            return {"pending": len(self._pending),
                    "parked": sum(map(len, self._parked.values())),
                    "topics": len(self._topics),
                    "subscriptions": sum(len(t.plain) + sum(map(len, t.groups.values()))
                                         for t in self._topics.values())}

    def has_subscriber(self, topic: str) -> bool:
        with self.lock:
            return topic in self._topics

    def in_flight(self) -> int:
        return len(self._pending)

    def still_pending(self, entries: list[tuple[float, int]]) -> list[tuple[float, int]]:
        """The (deadline, inbox) entries whose request is still in flight."""
        with self.lock:
            return [entry for entry in entries if entry[1] in self._pending]

    def take(self, inbox: int) -> _Pending | None:
        """Forget a request everywhere; it, or None when it was not in flight."""
        with self.lock:
            return self._take_pending(inbox)

    def take_reply(self, peer: _Peer, inbox: int) -> _Pending | None:
        """Forget the request ``peer`` answers; None when ``peer`` was not
        asked (late, unknown, or someone else's)."""
        with self.lock:
            p = self._pending.get(inbox)
            if p is None or peer not in p.responders:
                return None
            return self._take_pending(inbox)

    def forget(self, peer: _Peer, why: str) -> list:
        """``forget_peer`` under the lock: the requests that failed with it."""
        with self.lock:
            return self.forget_peer(peer, why)

    def close(self) -> None:
        """Fail every request in flight; forget every subscription."""
        with self.lock:
            self.stopping = True
            pending = list(self._pending.values())
            self._pending.clear()
            self._parked.clear()
            self._topics.clear()
        for p in pending:
            self.answer(p, error={"code": BROKER_CLOSED, "message": "broker closed"})

    def handle(self, peer: _Peer, msg: dict) -> None:
        """Act on one client message; reply only to those that carry an id."""
        req_id = msg.get("id")
        method = msg.get("method")
        params = msg.get("params", {})
        has_id = "id" in msg and not isinstance(req_id, (dict, list))
        if not isinstance(method, str):
            if has_id and "result" not in msg and "error" not in msg:
                self.fail(peer, req_id, BROKER_INVALID_REQUEST, "`method` must be a string")
            return                          # notifications and stray responses get no answer
        if not isinstance(params, dict):
            if has_id:
                self.fail(peer, req_id, BROKER_INVALID_PARAMS, "`params` must be an object")
            return
        handler = self._methods.get(method)
        if handler is None:
            if has_id:
                self.fail(peer, req_id, BROKER_METHOD_NOT_FOUND, f"unknown method {method!r}")
            return
        try:
            result = handler(self, peer, params, req_id if has_id else None)
        except _ParamError as exc:
            return self.fail(peer, req_id, BROKER_INVALID_PARAMS, str(exc)) if has_id else None
        if has_id and result is not _NO_ANSWER:
            peer.answer(req_id, result=result)

    def fail(self, peer: _Peer, req_id, code: int, message: str) -> None:
        peer.answer(req_id, error={"code": code, "message": message})

    def _m_ping(self, peer, params, req_id):
        return "pong"

    def _m_subscribe(self, peer, params, req_id):
        topic, sid = _param_topic(params), _param_sid(params)
        queue = params.get("queue")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise _ParamError("`queue` must be a non-empty string or null")
        with self.lock:
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
        with self.lock:
            return self._drop_sub(peer, sid)

    def _m_publish(self, peer, params, req_id):
        topic = _param_topic(params)
        payload = params.get("payload")
        with self.lock:
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
        p = self.open_request(peer, req_id, topic, params.get("payload"), deadline, wait)
        if p is not None and not peer.local:
            self._track(deadline, p.inbox)      # the loop thread's timer
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
            error = {"code": BROKER_RESPONDER_ERROR, "message": _log_safe(
                message, 2048) if isinstance(message, str) else "responder failed"}
        p = self.take_reply(peer, inbox)
        if p is None:
            return False                     # late, unknown, or not asked: dropped
        self.answer(p, result=params.get("payload"), error=error)
        return True

    def open_request(self, peer, req_id, topic, payload, deadline, wait,
                     encoded: str | None = None) -> _Pending | None:
        """Register a request and deliver it; None when it failed at once.
        ``encoded``: the payload's JSON text, if the requester has it."""
        with self.lock:
            if peer.closed or self.stopping:
                p, send = None, None
            else:
                p = _Pending(next(self._inboxes), peer, req_id, topic, payload, deadline,
                             encoded)
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
        try:
            self._send_all([send])
        except (ValueError, TypeError) as exc:     # only an in-process caller can get here
            with self.lock:
                self._take_pending(p.inbox)
            raise _broker_error(BROKER_INVALID_PARAMS, f"payload is not JSON: {exc}") from None
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
                target.deliver(sid, p.topic, p.payload, p.inbox, p.encoded)

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

    def answer(self, p: _Pending, result=None, error=None) -> None:
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

    def forget_peer(self, peer: _Peer, why: str) -> list:
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

    _methods = {"ping": _m_ping, "subscribe": _m_subscribe, "unsubscribe": _m_unsubscribe,
                "publish": _m_publish, "request": _m_request, "reply": _m_reply}


class BrokerServer:
    """The daemon's broker: line-delimited JSON-RPC 2.0 on a Unix socket.

    ``start()`` binds and serves on one background thread; ``client()``
    gives an in-process client; ``close()`` stops and removes the socket.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self._own_dir = None
        if path is None:
            import tempfile
            self._own_dir = tempfile.mkdtemp(prefix="nexo-poller-")   # mode 0700
            path = os.path.join(self._own_dir, "broker.sock")
        self.path = os.path.abspath(os.fspath(path))
        self.url = "unix://" + self.path
        self._lock = threading.Lock()             # the peers and the lists of work for the loop
        self.routes = _BrokerRoutes(self._track)
        self._deadlines: list[tuple[float, int]] = []   # socket requesters only
        self._peers: dict[int, _SocketPeer] = {}
        self._to_close: list[tuple[_SocketPeer, str]] = []
        self._to_write: list[_SocketPeer] = []
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._rbuf = bytearray(_RECV_BYTES)   # the loop thread's recv_into target
        self._loop_ident: int | None = None   # the loop thread, while it runs
        self._completions: list = []          # (waiter, result, error) it answers before it blocks
        self._stopping = False
        self._uid = os.getuid()
        # Out of file descriptors: accepting pauses (the listener leaves the
        # selector) and backs off; failures are logged once per interval.
        self._accept_paused_until: float | None = None
        self._accept_backoff = _ACCEPT_BACKOFF_MIN_SECS
        self._accept_failures = 0             # since the last log line
        self._accept_failing_since: float | None = None
        self._accept_logged_at = -math.inf

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
        self._stopping = self.routes.stopping = True
        if self._thread is not None:
            self._wake()
            self._thread.join(10)
        self.routes.close()
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

    def stats(self) -> dict:
        with self._lock:
            connections = len(self._peers)
        return {"connections": connections, "deadlines": len(self._deadlines),
                **self.routes.stats()}

    def has_subscriber(self, topic: str) -> bool:
        return self.routes.has_subscriber(topic)

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
        self._loop_ident = threading.get_ident()
        try:
            while not self._stopping:
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
                if self._accept_paused_until is not None:
                    left = max(0.0, self._accept_paused_until - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
                self._wake_waiters()
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
                        self._serve_peer(key.data, mask)
                self._housekeeping()
        except Exception:                   # pragma: no cover - a bug, never silent
            log.exception("broker loop crashed")
        finally:
            for peer in list(self._peers.values()):
                self._close_peer(peer, "broker closing")
            self._loop_ident = None         # from here on every answer is given at once
            self._wake_waiters()
            sel.close()
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _complete(self, waiter: _Waiter, result, error) -> None:
        """Answer an in-process requester.  The loop thread answers just
        before it next blocks (``_wake_waiters``): a requester woken while
        the loop still works would wake only to wait for the GIL, one more
        hand-off, and many replies read at once would each contend."""
        if threading.get_ident() == self._loop_ident:
            self._completions.append((waiter, result, error))
        else:
            waiter.set(result, error)

    def _wake_waiters(self) -> None:
        """Give the answers the loop gathered (loop thread)."""
        if self._completions:
            done, self._completions = self._completions, []
            for waiter, result, error in done:
                waiter.set(result, error)

    def _serve_peer(self, peer: _SocketPeer, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not peer.closed:
                self._read(peer)
            if mask & selectors.EVENT_WRITE and not peer.closed and peer.flush() \
                    and not peer.closed:
                self._sel.modify(peer.sock, selectors.EVENT_READ, peer)
        except Exception:                   # a bug must cost one connection, not the broker
            log.exception("broker: dropping a connection after an internal error")
            self._close_peer(peer, "internal error")

    def _housekeeping(self) -> None:
        if self._to_close or self._to_write:
            self._drain_requests()
        if self._deadlines:
            self._expire()
            self._compact_deadlines()
        if self._accept_paused_until is not None \
                and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = None
            self._sel.register(self._listener, selectors.EVENT_READ, "accept")

    def _drain_requests(self) -> None:
        with self._lock:
            closing, self._to_close = self._to_close, []
            writing, self._to_write = self._to_write, []
        for peer in writing:
            if not peer.closed:
                self._sel.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
        for peer, why in closing:
            self._close_peer(peer, why)

    def _compact_deadlines(self) -> None:
        """Drop the deadlines of answered requests once they are half the
        heap (loop thread): memory follows what is in flight, not request
        rate x timeout, at amortised O(1) per request."""
        heap = self._deadlines
        if len(heap) <= 64 or len(heap) <= 2 * self.routes.in_flight():
            return
        live = self.routes.still_pending(heap)
        heapq.heapify(live)
        self._deadlines = live

    def _track(self, deadline: float, inbox: int) -> None:
        """Time a socket requester's request out at ``deadline`` (loop thread only)."""
        heapq.heappush(self._deadlines, (deadline, inbox))
        self._compact_deadlines()

    def _expire(self) -> None:
        """Answer requests whose timeout passed (socket requesters; loop thread)."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, inbox = heapq.heappop(self._deadlines)
            p = self.routes.take(inbox)
            if p is not None:
                self.routes.answer(p, error={"code": BROKER_TIMEOUT,
                                       "message": f"request to {p.topic!r} timed out"})

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _NO_FDS:    # keep serving the connections we have
                    self._pause_accepting(exc)
                elif exc.errno != errno.ECONNABORTED:
                    log.warning("broker: accept failed: %s", exc)
                return
            if self._accept_failing_since is not None:
                log.warning("broker: accepting connections again after %.1fs without file "
                            "descriptors (%d more failed accepts)",
                            time.monotonic() - self._accept_failing_since,
                            self._accept_failures)
                self._accept_failing_since = None
                self._accept_failures = 0
                self._accept_backoff = _ACCEPT_BACKOFF_MIN_SECS
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

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of fds: stop watching the listener for a while (pending
        connections wait in its backlog), doubling the pause while it lasts."""
        now = time.monotonic()
        self._accept_failures += 1
        if self._accept_failing_since is None:
            self._accept_failing_since = now
        if now - self._accept_logged_at >= _ACCEPT_LOG_EVERY_SECS:
            log.warning("broker: cannot accept connections: %s; %d failed accepts, pausing "
                        "accepts for up to %gs at a time until descriptors free up",
                        exc.strerror or exc, self._accept_failures, _ACCEPT_BACKOFF_MAX_SECS)
            self._accept_logged_at = now
            self._accept_failures = 0
        self._accept_paused_until = now + self._accept_backoff
        self._accept_backoff = _backoff(self._accept_backoff, _ACCEPT_BACKOFF_MAX_SECS, 2)
        self._sel.unregister(self._listener)

    def _read(self, peer: _SocketPeer) -> None:
        rbuf = self._rbuf                    # reused: recv(n) would allocate n bytes each time
        try:
            n = peer.sock.recv_into(rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._close_peer(peer, "disconnected")
            return
        start = 0
        if peer.skipping:                    # the rest of an over-long line: drop it
            end = rbuf.find(b"\n", 0, n)
            if end < 0:
                return
            peer.skipping = False
            start = end + 1
        buf = peer.inbuf
        buf += memoryview(rbuf)[start:n]
        if rbuf.find(b"\n", start, n) < 0:
            if len(buf) > BROKER_MAX_LINE_BYTES:
                self._line_too_long(peer, buf, ended=False)
            return
        lines = buf.split(b"\n")
        peer.inbuf = bytearray(lines.pop())
        for line in lines:
            if len(line) > BROKER_MAX_LINE_BYTES:
                self._line_too_long(peer, line, ended=True)
            elif line.strip():
                self._handle_line(peer, line)
            if peer.closed:
                return
        if len(peer.inbuf) > BROKER_MAX_LINE_BYTES:
            self._line_too_long(peer, peer.inbuf, ended=False)

    def _line_too_long(self, peer: _SocketPeer, line: bytearray | bytes, ended: bool) -> None:
        """An over-long line fails the one request it belongs to, and the
        connection goes on: its head names the request (a ``reply``'s inbox,
        a call's id) and the rest, up to the newline, is dropped unread.  A
        line whose head names nothing closes the connection, as before."""
        head = bytes(line[:_LINE_HEAD_BYTES])
        if not ended:
            peer.inbuf = bytearray()
            peer.skipping = True
        method = _HEAD_METHOD.search(head)
        inbox = _HEAD_INBOX.search(head)
        req_id = _HEAD_ID.search(head)
        limit = f"longer than the broker's line limit ({BROKER_MAX_LINE_BYTES} bytes)"
        answered = None
        is_reply = bool(method and method[1] == b"reply" and inbox)
        if is_reply:
            answered = self.routes.take_reply(peer, int(inbox[1]))
            if answered is not None:
                self.routes.answer(answered, error={"code": BROKER_RESPONDER_ERROR,
                                              "message": f"the reply was {limit}"})
        if is_reply or req_id:
            self.routes.fail(peer, _loads(req_id[1]) if req_id else None, BROKER_INVALID_REQUEST,
                       f"line {limit}; dropped")
            return
        peer.send({"jsonrpc": "2.0", "id": None, "error": {
            "code": BROKER_INVALID_REQUEST, "message": f"line {limit}; closing"}})
        self._close_peer(peer, "over-long line")

    def _handle_line(self, peer: _SocketPeer, line: bytes) -> None:
        try:
            msg = _loads(line)                         # strict: no encoding guesses
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
        self.routes.handle(peer, msg)


    def _close_peer(self, peer: _SocketPeer, why: str) -> None:
        if peer.closed:
            return
        failed = self.routes.forget(peer, why)
        with self._lock:
            self._peers.pop(peer.fd, None)
        with peer.out.lock:
            peer.out.discard()
        try:
            self._sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        log.debug("broker: connection closed (%s)", why)
        for p in failed:
            self.routes.answer(p, error={"code": BROKER_RESPONDER_GONE, "message":
                                         f"responder on {p.topic!r} disconnected ({why})"})


class _ParamError(NexoPollerError):
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
    """The broker-client contract, one for every broker (README "Broker
    clients"): ``subscribe -> int``, ``unsubscribe``, ``publish``,
    ``publish_event``, ``deliver``, ``request -> reply payload``,
    ``wait_closed -> bool``, ``close``; and what its clients share: handler
    dispatch, requests on a pool, published messages in order per subscription."""

    source = _NEXO_SOURCE                    # the Event ``source`` of what it publishes
    networked = False                        # True: a server others reach over the network

    def __init__(self, max_workers: int) -> None:
        self._handlers: dict[Any, Callable[[Any], Any]] = {}
        self._sids = itertools.count(1)
        self._pool = None
        self._pool_lock = threading.Lock()
        self._max_workers = max_workers
        self.closed = threading.Event()
        self._running = 0                    # handlers running, their replies not yet sent
        self._ran = threading.Condition(threading.Lock())
        self._queued: dict[Any, deque] = {}  # sid -> published messages not handled yet
        self._queued_lock = threading.Lock()

    # -- what a subclass provides: subscribe, unsubscribe, request, close,
    #    _publish_event(topic, event, confirm) and _send_reply(inbox, result, error)

    def publish(self, topic: str, payload: Any) -> None:
        """Fire and forget ``payload`` in a fresh nexo Event."""
        self._publish_event(topic, nexo_event(topic, payload, source=self.source), False)

    def publish_event(self, topic: str, event: dict) -> None:
        """Fire and forget a nexo Event made by the caller, as it is (its id kept)."""
        self._publish_event(topic, event, False)

    def deliver(self, topic: str, event: dict) -> None:
        """Hand on a made Event and return once it was taken; raises
        ``PluginPollerForwardError.Broker`` when it was not (-32010: nobody took it)."""
        self._publish_event(topic, event, True)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the client is closed (close(), or its connection ended)."""
        return self.closed.wait(timeout)

    # -- dispatch --------------------------------------------------------------------

    def _dispatch(self, sid, payload, inbox) -> None:
        handler = self._handlers.get(sid)
        if handler is None:
            if inbox is not None:
                self._send_reply(inbox, None, {"message": "no handler for this subscription"})
            return
        if inbox is None:
            self._in_order(sid, handler, payload)
        else:
            self._submit(self._run_handler, handler, payload, inbox)

    def _in_order(self, sid, handler, payload) -> None:
        """A published message: handled after those before it on its
        subscription, one at a time (requests run side by side instead)."""
        with self._queued_lock:
            waiting = self._queued.get(sid)
            if waiting is not None:
                waiting.append((handler, payload))
                return
            self._queued[sid] = deque([(handler, payload)])
        self._submit(self._drain, sid)

    def _drain(self, sid) -> None:
        while True:
            with self._queued_lock:
                waiting = self._queued[sid]
                if not waiting:
                    del self._queued[sid]
                    return
                handler, payload = waiting.popleft()
            self._run_handler(handler, payload, None)

    def _submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the pool."""
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor
                    self._pool = ThreadPoolExecutor(self._max_workers,
                                                    thread_name_prefix="nexo-handler")
        try:
            self._pool.submit(fn, *args)
        except RuntimeError:                 # pool shut down: the client is closing
            pass

    def _run_handler(self, handler, payload, inbox) -> None:
        with self._ran:
            self._running += 1
        try:
            self._answer_handler(handler, payload, inbox)
        finally:
            with self._ran:
                self._running -= 1
                self._ran.notify_all()

    def handlers_done(self, timeout: float) -> bool:
        """Wait until no handler runs (each one's reply sent); False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._ran:
            while self._running and time.monotonic() < deadline:
                self._ran.wait(deadline - time.monotonic())
            return not self._running

    def _answer_handler(self, handler, payload, inbox) -> None:
        try:
            result = handler(payload)
        except BaseException as exc:         # report it to the requester, keep serving
            # (SystemExit too: in a handler's thread it would end only that
            # thread, which may be the one reading the connection.)
            log.debug("broker handler failed", exc_info=True)
            if inbox is not None:
                self._send_reply(inbox, None, {"message": _failure_text(exc)})
            return
        if inbox is not None:
            try:
                self._send_reply(inbox, result, None)
            except (ValueError, TypeError) as exc:      # NaN, a set, an object...
                self._send_reply(inbox, None, {"message": f"handler returned a value that "
                                                          f"is not JSON: {exc}"})
            except _LineTooLong as exc:     # fail this request; the connection goes on
                self._send_reply(inbox, None, {"message": str(exc)})

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _send_reply(self, inbox, result, error) -> None:
        params = {"inbox": inbox, "payload": result}
        if error is not None:
            params["error"] = error
        self._post_reply(params)



_FAILURE_TEXT_CHARS = 2048                # of a handler's failure, in its error reply


def _failure_text(exc: BaseException) -> str:
    """A handler's failure as its error reply says it: short enough for one
    broker line whatever the exception's text, and never a failure itself
    (an exception's ``__str__`` may raise)."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:
        text = f"{type(exc).__name__} (its message could not be read)"
    return text if len(text) <= _FAILURE_TEXT_CHARS else text[:_FAILURE_TEXT_CHARS] + "..."


def _json_payload(payload: Any) -> str:
    """Raise as a client whose payload must travel as JSON does, though an
    in-process one hands the object itself to in-process handlers; else the
    payload's JSON text, which a socket's line then reuses."""
    try:
        return _dumps(payload)
    except (ValueError, TypeError) as exc:
        raise _NotJson(f"payload is not JSON: {exc}") from None


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

    def _publish_event(self, topic: str, event: dict, confirm: bool) -> None:
        _json_payload(event)
        if not self._call("publish", {"topic": topic, "payload": event}) and confirm:
            raise _broker_error(BROKER_NO_RESPONDERS, f"no subscriber on {topic!r}")

    def request(self, topic: str, payload: Any, timeout: timedelta | float, *,
                wait: bool = False, cancel: threading.Event | None = None) -> Any:
        secs = _seconds(timeout, "timeout")
        encoded = _json_payload(payload)     # as a socket client would find, whoever answers
        waiter = _Waiter()
        p = self._server.routes.open_request(self._peer, waiter, topic, payload,
                                             time.monotonic() + secs, wait, encoded)
        answered = waiter.wait(secs, cancel)
        if not answered:
            if p is not None:
                self._server.routes.take(p.inbox)
            answered = waiter.wait(0)       # it may have come in meanwhile
        return _request_outcome(waiter, answered, topic, secs, cancel)

    def _post_reply(self, params: dict) -> None:
        self._server.routes.handle(self._peer, {"method": "reply", "params": params})

    def _call(self, method: str, params: dict) -> Any:
        if self.closed.is_set():
            raise _broker_error(BROKER_CLOSED, "client is closed")
        waiter = _Waiter()
        try:
            self._server.routes.handle(self._peer, {"id": waiter, "method": method,
                                                    "params": params})
        except (ValueError, TypeError) as exc:
            raise _broker_error(BROKER_INVALID_PARAMS, f"payload is not JSON: {exc}") from None
        waiter.wait(0)
        if waiter.error is not None:
            _raise_broker_error(waiter.error, method)
        return waiter.result

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            failed = self._server.routes.forget(self._peer, "client closed")
            for p in failed:
                self._server.routes.answer(p, error={"code": BROKER_RESPONDER_GONE,
                                                     "message": "responder closed"})
            self._shutdown_pool()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BrokerClient(_ClientBase):
    """A client of a BrokerServer over its Unix socket; thread-safe.

    Many requests may be in flight at once.  Reading follows the
    leader/follower pattern: one thread reads; when it meets a message for
    a handler it passes the reading role to an idle thread and runs the
    handler itself, so handlers never block reading and a tick's reply
    costs no thread hand-off.
    """

    def __init__(self, sock: socket.socket, url: str, max_workers: int = 32):
        super().__init__(max_workers)
        self.url = url
        self._sock = sock
        self._wlock = threading.Lock()        # the lines waiting, and ``closed``
        self._out = _Combiner(self._wlock)
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._leader = threading.Lock()       # held by the one thread that reads
        self._buf = bytearray()
        self._rbuf = bytearray(_RECV_BYTES)   # recv_into target, reused
        self._eof = False
        self._tlock = threading.Lock()
        self._threads = self._idle = 0
        self._spawn()

    def _spawn(self) -> None:
        """Start one more serving thread (``_tlock`` held or not yet shared).
        When none can be started, those there are serve on: the leader
        gives up the role and runs its handler as at the thread cap."""
        self._threads += 1
        try:
            threading.Thread(target=self._serve, name="nexo-broker-client", daemon=True).start()
        except RuntimeError as exc:          # "can't start new thread"
            self._threads -= 1
            if not self._threads:
                self._sock.close()
                raise _broker_error(BROKER_CLOSED, f"cannot start a thread to read the "
                                                   f"broker connection: {exc}") from None
            log.warning("broker client: cannot start one more thread (%s); %d serve on",
                        exc, self._threads)

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
        """Queue one line; the first thread to find nobody writing sends every
        line queued meanwhile in one system call (write combining)."""
        try:
            data = _dumps(obj).encode() + b"\n"
        except (ValueError, TypeError) as exc:
            raise _NotJson(f"payload is not JSON: {exc}") from None
        if len(data) > BROKER_MAX_LINE_BYTES + 1:
            raise _LineTooLong(f"{obj.get('method', 'message')} of {len(data) - 1} bytes is "
                               f"longer than the broker's line limit "
                               f"({BROKER_MAX_LINE_BYTES} bytes)")
        with self._wlock:
            if self.closed.is_set():
                raise _broker_error(BROKER_CLOSED, "connection to broker is closed")
            if not self._out.queue(data):
                return
        try:
            while (chunk := self._out.next_chunk()) is not None:
                self._sock.sendall(chunk)
        except OSError as exc:
            self._out.abandon()
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
            _raise_broker_error(waiter.error, params.get("topic", method))
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

    def _publish_event(self, topic: str, event: dict, confirm: bool) -> None:
        params = {"topic": topic, "payload": event}
        if not confirm:
            self._send({"jsonrpc": "2.0", "method": "publish", "params": params})
        elif not self._call("publish", params, 10.0):     # how many took it
            raise _broker_error(BROKER_NO_RESPONDERS, f"no subscriber on {topic!r}")

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
            answered = waiter.wait(secs + 1.0, cancel)
        finally:
            self._pending.pop(req_id, None)
        return _request_outcome(waiter, answered, topic, secs, cancel)

    def _post_reply(self, params: dict) -> None:
        try:
            self._send({"jsonrpc": "2.0", "method": "reply", "params": params})
        except (_LineTooLong, _NotJson):
            raise
        except PluginPollerForwardError:
            pass                             # the connection is gone; so is the requester's wait

    def _serve(self) -> None:
        while True:
            with self._tlock:
                self._idle += 1
            self._leader.acquire()
            with self._tlock:
                self._idle -= 1
            try:
                work = self._read_until_work()
                if work is not None:
                    with self._tlock:        # make sure someone goes on reading
                        if self._idle == 0 and self._threads < self._max_workers:
                            self._spawn()
            finally:
                self._leader.release()
            if work is None:
                return
            try:
                self._run_handler(*work)
            except Exception:                # a bug: this thread must not end with it
                log.exception("broker client: a handler's reply failed")

    def _read_until_work(self):
        """Read and settle responses until a handler has work (leader only).

        Returns ``(handler, payload, inbox)`` for the caller to run, or None
        once the connection is gone.  When one read brings several messages
        for handlers, all but the last go to the pool.
        """
        while not self._eof:
            try:
                n = self._sock.recv_into(self._rbuf)   # recv(n) would allocate n bytes
            except OSError:
                n = 0
            if not n:
                self._eof = True
                self._lost()
                return None
            self._buf += memoryview(self._rbuf)[:n]
            if self._rbuf.find(b"\n", 0, n) < 0:
                continue
            lines = self._buf.split(b"\n")
            self._buf = bytearray(lines.pop())
            work = None
            for line in lines:
                try:
                    item = self._on_line(line) if line else None
                except Exception:            # a bug: the lines after it still count
                    log.exception("broker client: a line could not be handled")
                    item = None
                if item is not None:
                    if work is not None:
                        self._submit(self._run_handler, *work)
                    work = item
            if work is not None:
                return work
        return None

    def _on_line(self, line: bytes):
        """Settle a response, or return a handler's work for a message."""
        try:
            msg = _loads(line)
        except ValueError:
            log.warning("broker sent a line that is not JSON; ignored")
            return None
        if not isinstance(msg, dict):
            return None
        if msg.get("method") == "message":
            params = msg.get("params") or {}
            handler = self._handlers.get(params.get("sid"))
            inbox = params.get("inbox")
            if handler is not None and inbox is None:
                self._in_order(params.get("sid"), handler, params.get("payload"))
                return None
            if handler is not None:
                return handler, params.get("payload"), inbox
            if inbox is not None:
                self._send_reply(inbox, None, {"message": "no handler for this subscription"})
            return None
        waiter = self._pending.get(msg.get("id")) if _is_int(msg.get("id")) else None
        if waiter is not None:
            error = msg.get("error")
            waiter.set(msg.get("result"), error if isinstance(error, dict) else None)
        elif "error" in msg:
            log.warning("broker error: %s", msg["error"])
        return None

    def _lost(self) -> None:
        with self._wlock:
            self.closed.set()
        for waiter in list(self._pending.values()):
            waiter.set(None, {"code": BROKER_CLOSED, "message": "connection to broker lost"})
        self._shutdown_pool()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.closed.wait(5)                  # the reading thread saw the end
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ============================================================================
# NATS
# A NATS core client (text protocol over TCP or TLS) with BrokerClient's
# interface, nexo's Event/Message envelopes, and connect_broker choosing one.
# Shares: _is_nats, _nats_parse_headers, _nats_servers, _nats_url_as
# ============================================================================

NATS_DEFAULT_PORT = 4222
NATS_MAX_CONTROL_LINE = 64 * 1024       # a longer line from the server is a protocol error
NATS_MAX_OUTAGE_BUFFER = 8 << 20        # bytes of publishes kept during an outage
_NATS_ERROR_HEADER = "Nexo-Error"       # a responder's handler failed: {"message": ...}
_JS_STREAM_CACHE_SECS = 30.0            # how long "does a stream capture this topic" holds


class _NatsProtocolError(NexoPollerError):
    """The server sent bytes that are not the NATS protocol."""


class _NatsParser:
    """Split the server's byte stream into operations, however it was cut.

    ``feed`` takes any chunk and calls ``sink.on_msg(subject, sid, reply,
    headers, payload)`` (headers: raw bytes for HMSG, else None),
    ``on_info(dict)``, ``on_ping()``, ``on_pong()``, ``on_err(text)`` for
    each complete operation; a partial one waits in the buffer.
    """
    __slots__ = ("buf", "sink", "_msg")

    def __init__(self, sink) -> None:
        self.buf = bytearray()
        self.sink = sink
        self._msg = None              # (subject, sid, reply, header bytes, total bytes)

    def feed(self, data) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        try:
            while pos < end:
                if self._msg is not None:
                    subject, sid, reply, hlen, total = self._msg
                    stop = pos + total
                    if end < stop + 2:
                        break
                    if buf[stop:stop + 2] != b"\r\n":
                        raise _NatsProtocolError("message payload not followed by CRLF")
                    headers = bytes(buf[pos:pos + hlen]) if hlen >= 0 else None
                    payload = bytes(buf[pos + max(hlen, 0):stop])
                    pos = stop + 2
                    self._msg = None
                    self.sink.on_msg(subject, sid, reply, headers, payload)
                    continue
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > NATS_MAX_CONTROL_LINE:
                        raise _NatsProtocolError("control line too long")
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                self._control(line)
        finally:
            del buf[:pos]

    def _control(self, line: bytes) -> None:
        op, _, rest = line.partition(b" ")
        op = op.upper()
        if op == b"MSG" or op == b"HMSG":
            args = rest.split()
            want = 4 if op == b"MSG" else 5
            if len(args) not in (want - 1, want):
                raise _NatsProtocolError(f"bad {op.decode()} line {line[:80]!r}")
            reply = args[2].decode("latin-1") if len(args) == want else None
            try:
                total = int(args[-1])
                hlen = int(args[-2]) if op == b"HMSG" else -1
                sid = int(args[1])
            except ValueError:
                raise _NatsProtocolError(f"bad {op.decode()} line {line[:80]!r}") from None
            if total < 0 or hlen > total:
                raise _NatsProtocolError(f"bad sizes in {line[:80]!r}")
            self._msg = (args[0].decode("latin-1"), sid, reply, hlen, total)
        elif op == b"PING":
            self.sink.on_ping()
        elif op == b"PONG":
            self.sink.on_pong()
        elif op == b"+OK":
            pass
        elif op == b"-ERR":
            self.sink.on_err(rest.decode("utf-8", "replace").strip().strip("'"))
        elif op == b"INFO":
            try:
                info = _loads(rest)
            except ValueError:
                raise _NatsProtocolError("INFO is not JSON") from None
            self.sink.on_info(info if isinstance(info, dict) else {})
        else:
            raise _NatsProtocolError(f"unknown operation {line[:40]!r}")


def _nats_parse_headers(raw: bytes) -> tuple[int | None, str, dict[str, list[str]]]:
    """``NATS/1.0 503 No Responders\\r\\nK: v\\r\\n\\r\\n`` -> (503, "No Responders", {K: [v]})."""
    lines = raw.decode("utf-8", "replace").split("\r\n")
    first = lines[0].split(None, 2)
    if not first or not first[0].startswith("NATS/"):
        raise _NatsProtocolError(f"bad header block {raw[:40]!r}")
    status = int(first[1]) if len(first) > 1 and first[1].isdigit() else None
    description = first[2] if len(first) > 2 else ""
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip(), []).append(value.strip())
    return status, description, headers


def _nats_headers(pairs: Mapping[str, str]) -> bytes:
    return ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs.items())
            + "\r\n").encode()


@dataclasses.dataclass(frozen=True)
class _NatsServer:
    """One server of the list, with the credentials its URL carried."""
    host: str
    port: int
    tls: bool = False
    user: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


def _nats_servers(url: str) -> list[_NatsServer]:
    """Parse ``nats://[token@|user:pass@]host[:port]``, ``tls://...``, comma-separated."""
    from urllib.parse import unquote, urlsplit
    servers = []
    for part in str(url).split(","):
        part = part.strip()
        try:
            u = urlsplit(part if "://" in part else "nats://" + part)
            port = u.port or NATS_DEFAULT_PORT
        except ValueError as exc:
            raise _broker_error(BROKER_INVALID_PARAMS, f"bad NATS URL {part!r}: {exc}") from None
        if u.scheme not in ("nats", "tls") or not u.hostname:
            raise _broker_error(BROKER_INVALID_PARAMS, f"NATS URL must look like "
                                f"nats://host:4222 or tls://host:4222, got {part!r}")
        user = unquote(u.username) if u.username else None
        password = unquote(u.password) if u.password is not None else None
        token = None
        if user is not None and password is None:
            user, token = None, user
        servers.append(_NatsServer(u.hostname, port, u.scheme == "tls", user, password, token))
    return servers


def _nats_url_as(url: str, auth: Mapping[str, str]) -> str:
    """``url`` (every server of it) with the credentials of ``auth``
    (``{"user", "password"}`` or ``{"token"}``) instead of its own: what a
    plugin with a NATS user of its own connects with."""
    from urllib.parse import quote
    if "token" in auth:
        cred = quote(auth["token"], safe="")
    else:
        cred = f"{quote(auth['user'], safe='')}:{quote(auth['password'], safe='')}"
    return ",".join(f"{'tls' if s.tls else 'nats'}://{cred}@{s.host}:{s.port}"
                    for s in _nats_servers(url))


class _NatsDial:
    """Which NATS server to connect to, and one authenticated connection to
    it: TCP, TLS when asked for, the server's INFO, our CONNECT, its first PONG."""

    def __init__(self, servers: list[_NatsServer], name: str, connect_timeout: float,
                 tls_ca_file: str | None, tls_cert_file: str | None, tls_key_file: str | None):
        self.servers = list(servers)            # those given, then those INFO names
        self.name, self.connect_timeout = name, connect_timeout
        self.tls_ca_file, self.tls_cert_file, self.tls_key_file = \
            tls_ca_file, tls_cert_file, tls_key_file

    def _tls_context(self):
        import ssl
        ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx

    def handshake(self, server: _NatsServer):
        """Connect and authenticate to one server: (socket, INFO, leftover bytes)."""
        where = f"NATS server {server.name}"
        try:
            sock = socket.create_connection((server.host, server.port), self.connect_timeout)
        except OSError as exc:
            raise _broker_error(BROKER_CLOSED, f"{where}: cannot connect: "
                                f"{exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            line = self._read_line(sock, buf, where)
            if not line.startswith(b"INFO "):
                raise _broker_error(BROKER_CLOSED, f"{where}: not a NATS server "
                                    f"(first line {line[:40]!r})")
            info = _loads(line[5:])
            if not isinstance(info, dict):
                raise _broker_error(BROKER_CLOSED,
                                    f"{where}: handshake failed: INFO is not a JSON object")
            if server.tls or info.get("tls_required"):
                import ssl
                try:
                    sock = self._tls_context().wrap_socket(sock, server_hostname=server.host)
                except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                    raise _broker_error(BROKER_CLOSED, f"{where}: TLS failed: {exc}") from None
            if info.get("nonce") and not (server.token or server.user):
                raise _broker_error(BROKER_AUTH_FAILED, (
                    f"{where} asks for an nkey/JWT signature (Ed25519), which the "
                    "Python standard library cannot make; use a token or user/password"))
            sock.sendall(self._connect_line(server, hasattr(sock, "pending"))
                         + b"PING\r\n")
            while True:
                line = self._read_line(sock, buf, where)
                if line == b"PONG":
                    break
                if line == b"PING":
                    sock.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    text = line[4:].decode("utf-8", "replace").strip().strip("'")
                    code = (BROKER_AUTH_FAILED if "authoriz" in text.lower()
                            or "authentication" in text.lower() else BROKER_CLOSED)
                    raise _broker_error(code, f"{where} refused the connection: {text}")
                elif line.startswith(b"INFO "):
                    info = _loads(line[5:])
            sock.settimeout(None)
            return server, sock, info, bytes(buf)
        except PluginPollerForwardError:
            sock.close()
            raise
        except (OSError, ValueError) as exc:
            sock.close()
            raise _broker_error(BROKER_CLOSED, f"{where}: handshake failed: {exc}") from None

    @staticmethod
    def _read_line(sock, buf: bytearray, where: str) -> bytes:
        while True:
            eol = buf.find(b"\r\n")
            if eol >= 0:
                line = bytes(buf[:eol])
                del buf[:eol + 2]
                return line
            if len(buf) > NATS_MAX_CONTROL_LINE:
                raise _broker_error(BROKER_CLOSED, f"{where}: line too long in handshake")
            data = sock.recv(65536)
            if not data:
                raise _broker_error(BROKER_CLOSED, f"{where} closed the connection "
                                    "during the handshake")
            buf += data

    def _connect_line(self, server: _NatsServer, tls: bool) -> bytes:
        opts = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "tls_required": tls, "name": self.name, "lang": "python-stdlib",
                "version": __version__, "protocol": 1, "echo": True}
        if server.token:
            opts["auth_token"] = server.token
        if server.user:
            opts["user"], opts["pass"] = server.user, server.password or ""
        return b"CONNECT " + _dumps(opts).encode() + b"\r\n"


    def first(self, adopt: Callable[..., None]) -> None:
        """``adopt`` the first server that answers; raises the Broker error
        naming each server and its cause (a refused login stops the round)."""
        problems = []
        for server in self.servers:
            try:
                return adopt(*self.handshake(server))
            except PluginPollerForwardError as exc:
                problems.append(exc)
                if getattr(exc, "code", None) == BROKER_AUTH_FAILED:
                    break
        raise _broker_error(getattr(problems[0], "code", BROKER_CLOSED),
                            "; ".join(str(p) for p in problems))

    def pick(self, lost: _NatsServer | None, attempt: int) -> _NatsServer:
        """The server for reconnect ``attempt``: the others in turn, the lost
        one (maybe lame-duck) last."""
        order = [s for s in self.servers if s != lost] or self.servers
        if lost in self.servers and len(self.servers) > 1:
            order.append(lost)
        return order[attempt % len(order)]

    def learn(self, urls: Iterable[str]) -> None:
        """Add the servers an INFO names (``connect_urls``), with our credentials."""
        for url in urls:
            try:
                learned = _nats_servers(url)[0]
            except PluginPollerForwardError:
                continue
            if all(s.name != learned.name for s in self.servers):
                self.servers.append(dataclasses.replace(
                    self.servers[0], host=learned.host, port=learned.port))


class _NatsRequests:
    """Requests multiplexed on a client's one wildcard inbox: each gets a
    token and a waiter, many may be pipelined, and a reply is decoded (its
    nexo envelope opened, the error header raised) for its requester."""

    def __init__(self, client: "NatsClient", sid: int):
        self._client, self.sid = client, sid
        self.inbox = f"_INBOX.{_uuid4().replace('-', '')}."
        # Subscribed at the first request: a plugin that only answers needs
        # no permission to subscribe to an inbox (README "Trust on NATS").
        self.wanted = False
        self.pending: dict[str, _Waiter] = {}
        self._tokens = itertools.count(1)

    def sub_line(self) -> bytes:
        """The inbox's SUB, to send again on a new connection (b"": not wanted yet)."""
        return f"SUB {self.inbox}* {self.sid}\r\n".encode() if self.wanted else b""

    def settle(self, subject: str, headers: bytes | None, payload: bytes) -> None:
        """A message on the inbox: the reply its waiter waits for."""
        waiter = self.pending.pop(subject[len(self.inbox):], None)
        if waiter is None:
            return
        if headers is not None and not payload and _nats_parse_headers(headers)[0] == 503:
            waiter.set(None, {"code": BROKER_NO_RESPONDERS, "message": "no responders"})
            return
        waiter.set((headers, payload))

    def fail_all(self, error: dict) -> None:
        for token in list(self.pending):
            waiter = self.pending.pop(token, None)
            if waiter is not None:
                waiter.set(None, error)

    def request(self, topic: str, payload: Any, timeout: timedelta | float, *,
                wait: bool = False, cancel: threading.Event | None = None,
                raw: bool = False, headers: Mapping[str, str] | None = None) -> Any:
        """``NatsClient.request``."""
        secs = _seconds(timeout, "timeout")
        deadline = time.monotonic() + secs
        pause = 0.02
        while True:
            if wait and not self._client.connected.is_set():
                self._wait_for(self._client.connected, deadline, cancel)
            waiter, answered = self._request_once(topic, payload, deadline, cancel,
                                                  raw, headers)
            if (wait and answered and waiter.error is not None
                    and waiter.error.get("code") == BROKER_NO_RESPONDERS
                    and time.monotonic() + pause < deadline
                    and not (cancel is not None and cancel.is_set())):
                self._wait_for(threading.Event(), time.monotonic() + pause, cancel)
                pause = _backoff(pause, 0.25, 2)
                continue
            reply = _request_outcome(waiter, answered, topic, secs, cancel)
            return self._raw_reply(*reply) if raw else self._decode_reply(topic, *reply)

    @staticmethod
    def _raw_reply(headers: bytes | None, payload: bytes) -> tuple:
        if headers is None:
            return payload, {}, None
        status, _, fields = _nats_parse_headers(headers)
        return payload, fields, status

    def request_many(self, requests: Iterable[tuple[str, Any, Mapping[str, str] | None]],
                     timeout: timedelta | float) -> list:
        """``NatsClient.request_many``."""
        secs = _seconds(timeout, "timeout")
        deadline = time.monotonic() + secs
        sent, frames = [], []
        self._want_inbox()
        try:
            for topic, payload, headers in requests:
                token = str(next(self._tokens))
                waiter = _Waiter()
                self.pending[token] = waiter
                sent.append((topic, token, waiter))
                try:
                    frames.append(_nats_frame(topic, _nats_body(payload), self.inbox + token,
                                              _nats_headers(headers) if headers else None,
                                              self._client.max_payload))
                except PluginPollerForwardError as exc:     # this request only
                    waiter.set(None, {"code": getattr(exc, "code", BROKER_CLOSED),
                                      "message": str(exc)})
            # One write (one system call) per MiB or so, not one per request.
            try:
                chunk, size = [], 0
                for n, frame in enumerate(frames):
                    chunk.append(frame)
                    size += len(frame)
                    if size >= 1 << 20 or n + 1 == len(frames):
                        self._client._write(b"".join(chunk))
                        chunk, size = [], 0
            except PluginPollerForwardError as exc:
                for _, _, waiter in sent:
                    waiter.set(None, {"code": getattr(exc, "code", BROKER_CLOSED),
                                      "message": str(exc)})
            results = []
            for topic, token, waiter in sent:
                answered = waiter.wait(deadline - time.monotonic())
                try:
                    results.append(self._raw_reply(*_request_outcome(
                        waiter, answered or waiter.wait(0), topic, secs, None)))
                except PluginPollerForwardError as exc:
                    results.append(exc)
            return results
        finally:
            for _, token, _ in sent:
                self.pending.pop(token, None)

    def _want_inbox(self) -> None:
        """Subscribe to this client's reply inbox before its first request
        (the server takes the SUB before the request that follows it)."""
        if not self.wanted:
            self.wanted = True         # _adopt resubscribes it from now on
            self._client._write(f"SUB {self.inbox}* {self.sid}\r\n".encode(), quiet=True)

    def _request_once(self, topic, payload, deadline, cancel, raw=False, headers=None):
        self._want_inbox()
        token = str(next(self._tokens))
        reply = self.inbox + token
        if raw:
            data = _nats_body(payload)
        else:
            body = payload
            if self._client.nexo_envelopes:
                body = nexo_request_event(topic, payload, reply, source=self._client.source)
            data = _nats_json(body)
        waiter = _Waiter()
        self.pending[token] = waiter
        try:
            self._client._pub(topic, data, reply, _nats_headers(headers) if headers else None,
                      buffer=False)
            answered = waiter.wait(deadline - time.monotonic(), cancel)
        finally:
            self.pending.pop(token, None)    # a timeout forgets the request
        return waiter, answered or waiter.wait(0)

    @staticmethod
    def _wait_for(event: threading.Event, deadline: float, cancel) -> None:
        while not event.is_set() and not (cancel is not None and cancel.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            event.wait(min(left, _CANCEL_POLL_SECS))

    def _decode_reply(self, topic: str, headers: bytes | None, payload: bytes) -> Any:
        if headers is not None:
            _, _, fields = _nats_parse_headers(headers)
            if _NATS_ERROR_HEADER in fields:
                try:
                    error = _loads(fields[_NATS_ERROR_HEADER][0])
                except ValueError:
                    error = {"message": fields[_NATS_ERROR_HEADER][0]}
                _raise_broker_error(error if isinstance(error, dict) else {}, topic)
        if not payload:
            return None
        try:
            body = _loads(payload)
        except (ValueError, RecursionError) as exc:
            raise PluginPollerForwardError.ParseReply(
                f"reply from {topic!r} is not JSON: {exc}") from None
        return nexo_unwrap(body)[0] if self._client.nexo_envelopes else body

    def answer(self, inbox, result, error) -> None:
        """Answer a request in the shape it came in; a handler's error
        travels in a ``Nexo-Error`` header.  (Not JSON raises ValueError.)"""
        subject, shape = inbox
        if error is None and shape is not None:
            result = nexo_event(subject, nexo_reply_payload(result), source=self._client.source)
        body = b"" if error is not None else _dumps(result).encode()
        try:
            if error is not None:
                self._client._pub(subject, body, buffer=False, headers=_nats_headers(
                    {_NATS_ERROR_HEADER: _dumps({"code": BROKER_RESPONDER_ERROR, **error})}))
            else:
                self._client._pub(subject, body, buffer=False)
        except PluginPollerForwardError as exc:
            if getattr(exc, "code", None) == BROKER_PAYLOAD_TOO_LARGE and error is None:
                self.answer(inbox, None, {"message": str(exc)})
            else:
                log.debug("NATS reply not sent: %s", exc)


class _JetStreamCapture:
    """Whether a JetStream stream captures a subject (asked at most every
    ``_JS_STREAM_CACHE_SECS`` per subject), and a publish confirmed by the
    stream's ack."""

    def __init__(self, client: "NatsClient"):
        self._client = client
        self._streams: dict[str, tuple[float, bool]] = {}   # topic -> (asked at, captured)

    def captured(self, topic: str) -> bool:
        """Whether a JetStream stream captures ``topic`` (asked at most every
        ``_JS_STREAM_CACHE_SECS`` per topic); no JetStream means none does."""
        seen = self._streams.get(topic)
        if seen is not None and time.monotonic() - seen[0] < _JS_STREAM_CACHE_SECS:
            return seen[1]
        try:
            body, _, status = self._client.request("$JS.API.STREAM.NAMES", {"subject": topic}, 5.0,
                                           raw=True)
            found = status is None and bool((_loads(body) or {}).get("streams"))
        except PluginPollerForwardError as exc:
            if getattr(exc, "code", None) != BROKER_NO_RESPONDERS:
                raise _broker_error(getattr(exc, "code", BROKER_CLOSED),
                                    f"{topic}: JetStream lookup: {exc}") from None
            found = False                               # no JetStream on this server
        except ValueError:
            found = False
        self._streams[topic] = (time.monotonic(), found)
        return found

    def publish(self, topic: str, event: dict) -> None:
        """Publish ``event`` and wait for the stream's ack (``Nats-Msg-Id`` =
        the Event id, so a retry is not stored twice)."""
        try:
            body, _, status = self._client.request(topic, event, 10.0, raw=True,
                                                   headers={"Nats-Msg-Id": str(event["id"])})
            ack = _loads(body) if body else {}
        except ValueError as exc:
            raise _broker_error(BROKER_RESPONDER_ERROR,
                                f"{topic}: JetStream ack is not JSON: {exc}") from None
        if status is not None or not isinstance(ack, dict) or "error" in ack \
                or "seq" not in ack:
            raise _broker_error(BROKER_RESPONDER_ERROR,
                                f"{topic}: JetStream did not ack: {ack!r:.200}")


class _NatsSubscriptions:
    """A NATS client's subscriptions: each one's subject and queue group
    (sent again after every reconnect), the listeners that never answer,
    the server's refusals, and a message opened for its handler."""

    def __init__(self, client: "NatsClient", handlers: dict, sids: Iterator[int],
                 dispatch: Callable[[Any, Any, Any], None]):
        self._client = client                   # its envelopes, writes and flush
        self._handlers, self._sids, self._dispatch = handlers, sids, dispatch   # _ClientBase's
        self.specs: dict[int, tuple[str, str | None]] = {}    # sid -> (subject, queue)
        self._listeners: set[int] = set()     # sids that never answer (subscribe)
        self._refused: dict[str, str] = {}       # subject -> the server's refusal

    def lines(self) -> list[bytes]:
        """Every subscription's SUB, for a new connection."""
        return [_sub_line(sid, *spec) for sid, spec in list(self.specs.items())]

    def refused(self, text: str) -> None:
        """A ``-ERR`` line: a refused subscription is noted for ``add``."""
        found = _NATS_SUB_REFUSED.match(text)
        if found:
            self._refused[found[1]] = text

    def message(self, sid: int, reply, payload: bytes) -> None:
        """A message for subscription ``sid``, to its handler (a request's
        envelope opened: its handler gets the payload)."""
        if sid not in self.specs:
            return
        try:
            body = _loads(payload) if payload else None
        except (ValueError, RecursionError):
            body = payload                # not JSON: the handler gets the bytes
        shape = None
        if self._client.nexo_envelopes:
            inner, reply_to, shape = nexo_unwrap(body)
            reply = reply or reply_to
            if reply is not None:
                body = inner
        if sid in self._listeners:
            reply = None
        self._dispatch(sid, body, None if reply is None else (reply, shape))

    def add(self, topic: str, handler: Callable[[Any], Any], queue: str | None,
            answer: bool) -> int:
        """``NatsClient.subscribe``."""
        _nats_subject(topic)
        if queue is not None:
            _nats_subject(queue, "queue group")
        if self._client._closing:
            raise _broker_error(BROKER_CLOSED, "NATS client is closed")
        sid = next(self._sids)
        self._handlers[sid] = handler
        if not answer:
            self._listeners.add(sid)
        self.specs[sid] = (topic, queue)      # sent again after every reconnect
        # Disconnected, the SUB is dropped here and sent on reconnect; a SUB
        # sent twice for one sid is ignored by the server.
        self._refused.pop(topic, None)
        self._client._write(_sub_line(sid, topic, queue), quiet=True)
        try:
            self._client.flush()                      # a refusal comes before the PONG
        except PluginPollerForwardError:
            pass                              # an outage: the reconnect subscribes
        refused = self._refused.pop(topic, None)
        if refused is not None:
            self.specs.pop(sid, None)
            self._handlers.pop(sid, None)
            self._listeners.discard(sid)
            raise _broker_error(BROKER_AUTH_FAILED, f"NATS server refused the subscription "
                                f"to {topic!r}: {refused}")
        return sid

    def remove(self, sid: int) -> None:
        """``NatsClient.unsubscribe``."""
        self.specs.pop(sid, None)
        self._handlers.pop(sid, None)
        self._listeners.discard(sid)
        self._client._write(f"UNSUB {sid}\r\n".encode(), quiet=True)
        try:
            self._client.flush()
        except PluginPollerForwardError:
            pass                              # disconnected: nothing is subscribed there


class NatsClient(_ClientBase):
    """A NATS client with ``BrokerClient``'s interface; thread-safe.

    One reader thread parses the server's stream; writes are combined
    (``_Combiner``).  After a lost connection it reconnects with backoff
    and jitter across the servers (``_NatsDial``), resubscribes
    (``_NatsSubscriptions``), and sends the publishes buffered meanwhile
    (at most ``outage_buffer`` bytes).  Requests share one inbox
    (``_NatsRequests``).  With ``nexo_envelopes`` (the default) requests
    and publishes travel as nexo ``Event``s, opened on receipt for
    handlers and requesters; a published message reaches its handler as
    the Event it is.
    """
    networked = True

    def __init__(self, servers: list[_NatsServer], *, name: str = "nexo-poller",
                 connect_timeout: float = 5.0, max_workers: int = 32,
                 nexo_envelopes: bool = True, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 reconnect_wait: float = 0.1, reconnect_wait_max: float = 5.0,
                 max_reconnect_attempts: int = -1, ping_interval: float = 60.0,
                 outage_buffer: int = NATS_MAX_OUTAGE_BUFFER,
                 source: str = _NEXO_SOURCE) -> None:
        super().__init__(max_workers)
        if not servers:
            raise _broker_error(BROKER_INVALID_PARAMS, "no NATS server given")
        self.url = ",".join(f"{'tls' if s.tls else 'nats'}://{s.name}" for s in servers)
        self.name, self.nexo_envelopes = name, nexo_envelopes
        self._dial = _NatsDial(servers, name, connect_timeout, tls_ca_file, tls_cert_file,
                               tls_key_file)
        self.reconnect_wait, self.reconnect_wait_max = reconnect_wait, reconnect_wait_max
        self.max_reconnect_attempts, self.ping_interval = max_reconnect_attempts, ping_interval
        self.outage_buffer, self.source = outage_buffer, source
        self.server: _NatsServer | None = None   # the one connected to
        self.info: dict = {}
        self.max_payload = 1 << 20
        self.reconnects = 0
        self.lame_duck = False
        self.connected = threading.Event()
        self._sock = None                 # None while disconnected
        self._wlock = threading.Lock()
        self._out = _Combiner(self._wlock)    # the current connection's; a new one each
        self._outage = bytearray()        # publishes kept while disconnected
        self._closing = False
        self._subs = _NatsSubscriptions(self, self._handlers, self._sids, self._dispatch)
        self._requests = _NatsRequests(self, next(self._sids))
        self._pongs: deque = deque()      # waiters of our PINGs, in order
        self._unanswered_pings = 0
        self._rbuf = bytearray(1 << 16)
        self._rview = memoryview(self._rbuf)
        self._parser = _NatsParser(self)
        self._reader: threading.Thread | None = None
        self._wake = threading.Event()    # set by close(): stop waiting to reconnect
        self._io_lock: threading.Lock | None = None   # TLS only: one SSL call at a time
        self._poll = None
        self._capture = _JetStreamCapture(self)

    # ---------------------------------------------------------- connecting
    @classmethod
    def connect(cls, url: str, **opts) -> "NatsClient":
        """Connect to the first server of ``url`` that answers; raises
        ``PluginPollerForwardError.Broker`` naming each server and its cause."""
        client = cls(_nats_servers(url), **opts)
        client._dial.first(client._adopt)
        client._reader = threading.Thread(target=client._read_loop, daemon=True,
                                          name="nexo-nats-reader")
        client._reader.start()
        return client

    def _adopt(self, server: _NatsServer, sock, info: dict, leftover: bytes) -> None:
        """Make a fresh connection current: resubscribe, then send what waited."""
        self.on_info(info)
        self._parser = _NatsParser(self)
        self._io_lock = threading.Lock() if hasattr(sock, "pending") else None   # TLS
        if self._io_lock is None:
            # Blocking, with a kernel receive timeout for the PINGs: Python's own
            # timeout mode would add a poll() to every send and receive.
            sock.settimeout(None)
            secs = max(0.001, self.ping_interval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("@ll", int(secs), int(secs % 1 * 1e6)))
        else:
            sock.settimeout(self.ping_interval)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        with self._wlock:
            if self._closing:                 # close() came during the handshake
                sock.close()
                raise _broker_error(BROKER_CLOSED, "NATS client is closed")
            lines = [self._requests.sub_line()]
            lines += self._subs.lines()
            data = b"".join(lines) + self._outage
            self._outage.clear()
            self._out.discard()
            self._out = _Combiner(self._wlock)
            try:
                sock.sendall(data)
            except OSError as exc:
                sock.close()
                raise _broker_error(BROKER_CLOSED, f"NATS server {server.name}: "
                                    f"lost while resubscribing: {exc}") from None
            self._sock, self.server = sock, server
            self._unanswered_pings = 0
            self.lame_duck = False
        if leftover:
            self._parser.feed(leftover)
        self.connected.set()

    def on_info(self, info: dict) -> None:
        """The server's INFO: its limits, the cluster's servers, lame-duck mode."""
        self.info = info
        if _is_int(info.get("max_payload")) and info["max_payload"] > 0:
            self.max_payload = info["max_payload"]
        self._dial.learn(info.get("connect_urls") or ())
        if info.get("ldm"):
            self.lame_duck = True
            log.info("NATS server %s is entering lame-duck mode",
                     self.server.name if self.server else "?")

    # ------------------------------------------------------------- reading
    def _read_loop(self) -> None:
        while True:
            sock = self._sock
            if sock is None:
                if not self._reconnect():
                    return
                continue
            try:
                n = self._recv(sock)
            except (socket.timeout, BlockingIOError):     # no data for ping_interval
                if self._unanswered_pings >= 2:
                    self._lose(sock, "the server stopped answering PINGs")
                else:
                    self._unanswered_pings += 1
                    self._ping(None, quiet=True)
                continue
            except OSError as exc:
                self._lose(sock, str(exc))
                continue
            if not n:
                self._lose(sock, "the server closed the connection")
                continue
            try:
                self._parser.feed(self._rview[:n])
            except Exception as exc:          # a protocol error (or a bug): start afresh
                self._lose(sock, f"{type(exc).__name__}: {exc}")

    def _recv(self, sock) -> int:
        """Read into the reused buffer.  An SSL object must not read and write
        at once, so over TLS the read waits for data unlocked, then reads
        under the lock the writers take."""
        if self._io_lock is None:
            return sock.recv_into(self._rbuf)
        if not sock.pending() and not self._poll.poll(self.ping_interval * 1000):
            raise socket.timeout
        with self._io_lock:
            return sock.recv_into(self._rbuf)

    def on_msg(self, subject: str, sid: int, reply, headers, payload: bytes) -> None:
        if sid == self._requests.sid:
            self._requests.settle(subject, headers, payload)
            return
        self._subs.message(sid, reply, payload)

    def on_ping(self) -> None:
        self._write(b"PONG\r\n", quiet=True)

    def on_pong(self) -> None:
        self._unanswered_pings = 0
        if self._pongs:
            (self._pongs.popleft() or _Waiter()).set(True)   # None: a keep-alive PING

    def on_err(self, text: str) -> None:
        self._subs.refused(text)              # read by subscribe(), which waits for it
        log.warning("NATS server %s: %s", self.server.name if self.server else "?", text)

    def _lose(self, sock, why: str) -> None:
        """The connection died: fail what was in flight; the loop reconnects."""
        with self._wlock:
            if self._sock is not sock:
                return
            self._sock = None
            self._out.discard()                 # its writer stops at its next chunk
            self._out = _Combiner(self._wlock)
            self.connected.clear()
        _close_socket(sock)
        if not self._closing:
            log.warning("NATS server %s: connection lost: %s", self.server.name, why)
        self._fail_in_flight("connection to NATS lost" if not self._closing
                             else "client closed")

    def _fail_in_flight(self, why: str) -> None:
        self._requests.fail_all({"code": BROKER_CLOSED, "message": why})
        while self._pongs:
            (self._pongs.popleft() or _Waiter()).set(False)

    def _reconnect(self) -> bool:
        """Try the servers in turn until one answers; False when giving up."""
        attempt = 0
        while not self._closing:
            delay = _backoff(self.reconnect_wait, self.reconnect_wait_max, attempt + 1)
            if self._wake.wait(delay * (0.5 + random.random())) or self._closing:
                break
            server = self._dial.pick(self.server, attempt)
            attempt += 1
            try:
                self._adopt(*self._dial.handshake(server))
            except PluginPollerForwardError as exc:
                log.info("NATS reconnect attempt %d: %s", attempt, exc)
                if 0 <= self.max_reconnect_attempts <= attempt:
                    break
                continue
            self.reconnects += 1
            log.info("NATS: reconnected to %s", server.name)
            return True
        self._finish_close()
        return False

    # ------------------------------------------------------------- writing
    def _write(self, data: bytes, *, buffer: bool = False, quiet: bool = False) -> None:
        """Send ``data`` in order with everything queued; while disconnected
        keep it (``buffer``) within the outage bound, or fail."""
        with self._wlock:
            if self._closing:
                if quiet:
                    return
                raise _broker_error(BROKER_CLOSED, "NATS client is closed")
            sock = self._sock
            if sock is None:
                if quiet:
                    return
                if not buffer:
                    raise _broker_error(BROKER_CLOSED, "not connected to NATS (reconnecting)")
                if len(self._outage) + len(data) > self.outage_buffer:
                    raise _broker_error(BROKER_CLOSED, (
                        f"not connected to NATS and the outage buffer "
                        f"({self.outage_buffer} bytes) is full"))
                self._outage += data
                return
            out = self._out
            if not out.queue(data):
                return
        try:
            # A connection lost meanwhile has a new combiner: this one ends empty.
            while (chunk := out.next_chunk()) is not None:
                if self._io_lock is None:
                    sock.sendall(chunk)
                else:
                    with self._io_lock:
                        sock.sendall(chunk)
        except OSError as exc:
            out.abandon()
            try:
                sock.shutdown(socket.SHUT_RDWR)      # the reader notices and reconnects
            except OSError:
                pass
            if not quiet:
                raise _broker_error(BROKER_CLOSED, f"NATS connection lost: {exc}") from None

    def _pub(self, subject: str, body: bytes, reply: str | None = None,
             headers: bytes | None = None, *, buffer: bool = True) -> None:
        self._write(_nats_frame(subject, body, reply, headers, self.max_payload), buffer=buffer)

    # ------------------------------------------------------ the interface
    def subscribe(self, topic: str, handler: Callable[[Any], Any],
                  queue: str | None = None, *, answer: bool = True) -> int:
        """Run ``handler(payload)`` for each message; its return value answers
        requests.  Returns once the server has the subscription.

        ``answer=False`` makes a listener that never replies: a message it
        sees may carry a reply subject meant for someone else's answer (a
        KV put awaits JetStream's ack)."""
        return self._subs.add(topic, handler, queue, answer)

    def unsubscribe(self, sid: int) -> None:
        """Returns once the server has it (or at once during an outage)."""
        self._subs.remove(sid)

    def publish(self, topic: str, payload: Any, *, raw: bool = False,
                headers: Mapping[str, str] | None = None) -> None:
        """Fire and forget; buffered (within ``outage_buffer``) during an outage.
        ``raw`` sends ``payload`` as it is (bytes, or JSON of anything else)
        with no nexo envelope, and ``headers`` as NATS headers."""
        if raw:
            headers_ = _nats_headers(headers) if headers else None
            return self._pub(topic, _nats_body(payload), headers=headers_)
        if self.nexo_envelopes:
            payload = nexo_event(topic, payload, source=self.source)
        self._pub(topic, _nats_json(payload))

    def _publish_event(self, topic: str, event: dict, confirm: bool) -> None:
        """Sent as it is; confirmed, it counts as taken once the JetStream
        stream that captures ``topic`` acked it (``Nats-Msg-Id`` = the Event
        id, so a retry is not stored twice), or, with no such stream, once
        published: plain NATS has no receipt."""
        if confirm and self._capture.captured(topic):
            self._capture.publish(topic, event)
            return
        self._pub(topic, _nats_body(event))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the server has processed everything sent so far."""
        waiter = _Waiter()
        self._ping(waiter)
        if not waiter.wait(timeout) or not waiter.result:
            raise _broker_error(BROKER_TIMEOUT, f"NATS flush: no PONG within {timeout:g}s")

    def _ping(self, waiter: _Waiter | None, quiet: bool = False) -> None:
        """Send a PING whose PONG settles ``waiter`` (PONGs come in order)."""
        with self._wlock:
            if self._sock is None or self._closing:
                if quiet:
                    return
                raise _broker_error(BROKER_CLOSED, "not connected to NATS")
            self._pongs.append(waiter)
        self._write(b"PING\r\n", quiet=quiet)

    def request(self, topic: str, payload: Any, timeout: timedelta | float, *,
                wait: bool = False, cancel: threading.Event | None = None,
                raw: bool = False, headers: Mapping[str, str] | None = None) -> Any:
        """Send a request and return its one reply's payload.

        No responders fails at once (code ``BROKER_NO_RESPONDERS``) unless
        ``wait``: then it retries, and waits out an outage, within the timeout.
        ``raw`` (JetStream's API, for one) sends ``payload`` as it is (bytes,
        or JSON of anything else) with ``headers``, and returns the reply
        undecoded: ``(payload bytes, headers {name: [values]}, status or None)``.
        """
        return self._requests.request(topic, payload, timeout, wait=wait, cancel=cancel,
                                      raw=raw, headers=headers)

    def request_many(self, requests: Iterable[tuple[str, Any, Mapping[str, str] | None]],
                     timeout: timedelta | float) -> list:
        """Raw requests ``(topic, payload, headers)`` all sent before any reply
        is awaited (pipelined: one round trip for the lot).  Returns, in order,
        each reply as ``request(raw=True)`` does, or the Broker error it ended in."""
        return self._requests.request_many(requests, timeout)

    @property
    def servers(self) -> list[_NatsServer]:
        """The servers it may connect to: those given, then those the cluster named."""
        return self._dial.servers

    def _send_reply(self, inbox, result, error) -> None:
        self._requests.answer(inbox, result, error)

    def requests_in_flight(self) -> int:
        """Requests sent and not yet answered, timed out or failed."""
        return len(self._requests.pending)

    # ------------------------------------------------------------- closing
    def close(self) -> None:
        """Send what is queued, close the connection, stop the reader thread."""
        with self._wlock:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
            sock = self._sock
        if not already:
            self._wake.set()
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(10)
        elif reader is None:
            self._finish_close()

    def _finish_close(self) -> None:
        with self._wlock:
            sock, self._sock = self._sock, None
            self.connected.clear()
        if sock is not None:
            _close_socket(sock)
        self._fail_in_flight("client closed")
        self._shutdown_pool()
        self.closed.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _nats_frame(subject: str, body: bytes, reply: str | None, headers: bytes | None,
                max_payload: int) -> bytes:
    """One PUB (or HPUB with ``headers``) as it goes on the wire; a Broker
    error when the subject is bad or the message exceeds ``max_payload``."""
    _nats_subject(subject)
    size = len(body) + (len(headers) if headers else 0)
    if size > max_payload:
        raise _broker_error(BROKER_PAYLOAD_TOO_LARGE, (
            f"message of {size} bytes to {subject!r} exceeds the NATS server's "
            f"max_payload of {max_payload} bytes; not sent"))
    r = f" {reply}" if reply else ""
    if headers:
        return f"HPUB {subject}{r} {len(headers)} {size}\r\n".encode() + headers + body + b"\r\n"
    return f"PUB {subject}{r} {size}\r\n".encode() + body + b"\r\n"


def _nats_json(payload: Any) -> bytes:
    """``payload`` as the JSON a message carries (a Broker error when it is not JSON)."""
    try:
        return _dumps(payload).encode()
    except (ValueError, TypeError) as exc:
        raise _broker_error(BROKER_INVALID_PARAMS, f"payload is not JSON: {exc}") from None


def _nats_body(payload: Any) -> bytes:
    """A raw message's body: bytes as they are, anything else as JSON."""
    return bytes(payload) if isinstance(payload, (bytes, bytearray)) else _nats_json(payload)


def _sub_line(sid: int, subject: str, queue: str | None) -> bytes:
    return f"SUB {subject} {queue + ' ' if queue else ''}{sid}\r\n".encode()


def _close_socket(sock) -> None:
    """Shut down first, so a thread blocked on it returns, then close."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


_NATS_SPACE = re.compile(r"\s")
_NATS_SUB_REFUSED = re.compile(r'Permissions Violation for Subscription to "([^"]+)"')


def _nats_subject(subject: Any, what: str = "subject") -> str:
    if not isinstance(subject, str) or not subject or len(subject) > 1024 or \
            _NATS_SPACE.search(subject):
        raise _broker_error(BROKER_INVALID_PARAMS,
                            f"NATS {what} must be a non-empty string without spaces, "
                            f"got {subject!r:.60}")
    return subject


def _broker_client_class(url: Any) -> type:
    """The one place a broker URL's scheme is read: the client class that
    serves it.  Callers ask the class what it can do (``networked``), never
    the scheme.  Raises ``PluginPollerForwardError.Broker``."""
    scheme = url.split("://", 1)[0] if isinstance(url, str) and "://" in url else None
    cls = {"unix": BrokerClient, "nats": NatsClient, "tls": NatsClient}.get(scheme)
    if cls is None:
        raise _broker_error(BROKER_INVALID_PARAMS, f"broker URL must start with unix://, "
                            f"nats:// or tls://, got {url!r:.80}")
    return cls


def _is_nats(broker: str | None) -> bool:
    """True for a networked broker URL (``nats://``, ``tls://``): plugins may
    run on other hosts, TLS options apply, JetStream may hold the state."""
    try:
        return bool(broker) and _broker_client_class(broker).networked
    except PluginPollerForwardError:
        return False


def connect_broker(url: str, **opts) -> "BrokerClient | NatsClient":
    """A broker client for ``url``: ``unix:///path`` (the daemon's embedded
    broker) or ``nats://``/``tls://`` (comma-separated for several servers).

    Every client keeps one contract (see ``_ClientBase``); options go to
    ``BrokerClient.connect`` or ``NatsClient.connect``.  Raises
    ``PluginPollerForwardError.Broker``.
    """
    return _broker_client_class(url).connect(url, **opts)


# ============================================================================
# Proxies
# Pollers that live in another process, with the same ``tick(ctx)`` as an
# in-process one; plus the supervisor that keeps long-lived plugins running.
# Shares: _lifecycle_rules, _proxy_for
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
    # The job's own tick timeout (its ``timeout_secs``); None: the plugin's.
    timeout: timedelta | None = None
    # The time of the slot this tick stands for (a missed slot's, a
    # backfill's, a retry's); None given: ``now`` (an operator's tick).
    scheduled_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.scheduled_at is None:
            self.scheduled_at = self.now

    def to_request(self) -> TickRequest:
        return build_tick_request(self.kind, self.job_id, self.agent_id, self.cursor,
                                  self.config, self.now, self.interval_hint,
                                  scheduled_at=self.scheduled_at)


def _tick_timeout(handle: PluginPollerHandle, ctx: PollContext) -> timedelta:
    """How long this tick may take: the job's own timeout, else the plugin's."""
    return handle.tick_timeout if ctx.timeout is None else ctx.timeout


class _SlotGuard:
    """Hold one of a plugin's ``max_concurrent_ticks`` slots for a tick; a
    no-op for a proxy whose caller already bounds its ticks (the Runner's
    lanes do: one place enforces the limit)."""

    def __init__(self, handle: PluginPollerHandle, ctx: PollContext, enabled: bool = True):
        self.handle, self.ctx, self.enabled = handle, ctx, enabled

    def __enter__(self) -> None:
        if not self.enabled:
            return
        secs = self.handle.tick_timeout.total_seconds()
        if not self.handle.slots.acquire(secs, self.ctx.cancel):
            why = "cancelled" if self.ctx.cancel.is_set() else f"none free within {secs:g}s"
            raise PollerError.Transient(
                f"plugin {self.handle.plugin_id!r}: waiting for a tick slot: {why} "
                f"(max_concurrent_ticks={self.handle.max_concurrent_ticks})")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.handle.slots.release()


class EphemeralPollerProxy:
    """A poller that runs each tick in a fresh plugin process."""

    def __init__(self, kind: str, handle: PluginPollerHandle, broker=None, *,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, limit: bool = True):
        # ``broker`` is not used (a process per tick needs none): every
        # proxy is made the same way (``_LifecycleRules.proxy``).
        self.kind, self.handle, self.max_reply_bytes = kind, handle, max_reply_bytes
        self.limit = limit              # enforce max_concurrent_ticks here

    def tick(self, ctx: PollContext) -> TickAck:
        h = self.handle
        if not h.entrypoint_command:
            raise PollerError.Config(ctx.job_id, f"plugin {h.plugin_id!r} has no "
                                     "[plugin.entrypoint] command to run")
        with _SlotGuard(h, ctx, self.limit):
            return spawn_ephemeral_tick(
                h.entrypoint_command, h.plugin_id, ctx.to_request(), _tick_timeout(h, ctx),
                ctx.cancel, args=h.entrypoint_args, env=h.entrypoint_env,
                cwd=h.working_dir, max_reply_bytes=self.max_reply_bytes)


def forward_tick(broker, handle: PluginPollerHandle, request: TickRequest, *,
                 wait: bool = True, cancel: threading.Event | None = None,
                 timeout: timedelta | None = None) -> TickReply:
    """Send one tick to a long-lived plugin through the broker.

    Returns the parsed reply; an error reply raises the matching
    ``PollerError``; transport and parse failures raise
    ``PluginPollerForwardError``.  With ``wait`` the request waits (within
    the tick timeout: ``timeout``, else the plugin's) for a plugin that has
    not subscribed yet.
    """
    envelope = broker.request(handle.tick_topic(), request.envelope(),
                              handle.tick_timeout if timeout is None else timeout,
                              wait=wait, cancel=cancel)
    return _parse_reply_envelope(tick_reply_envelope(envelope), request.job_id)


class PluginPollerProxy:
    """A poller whose ticks go to a long-lived plugin through the broker."""

    def __init__(self, kind: str, handle: PluginPollerHandle, broker, *, limit: bool = True):
        self.kind, self.handle, self.broker, self.limit = kind, handle, broker, limit

    def tick(self, ctx: PollContext) -> TickAck:
        def send(cancel) -> TickAck:
            try:
                return forward_tick(self.broker, self.handle, ctx.to_request(), cancel=cancel,
                                    timeout=_tick_timeout(self.handle, ctx)).into_tick_ack()
            except PluginPollerForwardError.ParseReply as exc:
                raise _unparsable(exc) from None
        return _watched_tick(self.handle, ctx, PluginPollerForwardError, send, self.limit)


_EXIT_GRACE_SECS = 2.0      # how long a failed tick waits to learn how its plugin ended


def _watched_tick(handle: PluginPollerHandle, ctx: PollContext, failures,
                  send: Callable[[Any], TickAck], limit: bool = True) -> TickAck:
    """One tick of a supervised plugin, in a slot: ``send(cancel)`` with a
    cancel that is also set when the plugin's process goes down, which then
    fails the tick at once with the plugin's last output."""
    health = handle.health
    with _SlotGuard(handle, ctx, limit):
        down = health.watch()            # set when the plugin's process goes down
        try:
            if not down.is_set():
                return send(_AnyEvent(ctx.cancel, down))
        except failures as exc:
            if not ctx.cancel.is_set() and (down.is_set() or getattr(
                    exc, "code", None) == BROKER_RESPONDER_GONE):
                # The process is gone or going (its stdout closed, its broker
                # connection dropped): a crash reads the same whatever noticed
                # it first, with how it ended, once its supervisor reaped it.
                health.wait_ended(_EXIT_GRACE_SECS)
            if not down.is_set() or ctx.cancel.is_set():
                raise PollerError.Transient(f"plugin {handle.plugin_id!r}: {exc}") from None
        finally:
            health.unwatch(down)
        raise PollerError.Transient(f"plugin {handle.plugin_id!r} is down: {health.describe()}")


class _AnyEvent:
    """Looks like a set Event as soon as any of its events is set."""
    __slots__ = ("events",)

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


# -- the stdio lifecycle: one process, JSON-RPC lines on its stdin/stdout ---------

STDIO_INIT_WAIT_SECS = 10.0     # an unanswered `initialize` is logged after this, not fatal
STDIO_SHUTDOWN_WAIT_SECS = 2.0  # on stop: how long `shutdown` may take before SIGTERM
_STDIO_WRITE_SECS = 5.0         # how long a broker.event may wait for room in the stdin pipe
_STDIO_ID_RE = re.compile(rb'"id"\s*:\s*(-?\d+)')


def _topic_allowed(topic: str, patterns: Iterable[str]) -> bool:
    """NATS-style: ``a.b`` exactly, ``a.*`` one token, ``a.>`` any rest."""
    parts = topic.split(".")
    for pattern in patterns:
        pat = pattern.split(".")
        if pat[-1] == ">" and len(parts) >= len(pat) and all(
                p in ("*", t) for p, t in zip(pat[:-1], parts)):
            return True
        if len(pat) == len(parts) and all(p in ("*", t) for p, t in zip(pat, parts)):
            return True
    return False


class _StdioChannel:
    """A stdio plugin's JSON-RPC 2.0 line channel, shared by its supervisor
    (which attaches each new process and feeds it the stdout lines) and its
    proxies (which send requests and wait for the replies, matched by id).

    A request waits at most its deadline; then it is forgotten and a late
    reply is dropped (logged).  When the process goes, every request in
    flight fails at once.  Writes to stdin share one lock and never block
    past their deadline; a line cut short by a deadline kills the process
    (its stream is broken) and the supervisor restarts it.
    """

    def __init__(self, handle: PluginPollerHandle) -> None:
        self.handle = handle
        self._name = _log_safe(handle.plugin_id)
        self._lock = threading.Condition(threading.Lock())
        self._wlock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._gen = 0                            # bumped when the process goes
        self._pending: dict[Any, _Waiter] = {}   # id (or bridge reply topic) -> waiter
        self._ids = itertools.count(1)
        self._init_deadline: float | None = None
        self.broker = None                       # where bridge publishes go
        self.pid: int | None = None
        self.dropped = 0                         # replies nobody waited for
        self._bye_id: int | None = None          # the id of `shutdown`, once sent

    # -- the supervisor's side ----------------------------------------------------

    def attach(self, proc: subprocess.Popen) -> None:
        os.set_blocking(proc.stdin.fileno(), False)
        with self._lock:
            self._proc, self.pid = proc, proc.pid
            self._pending[0] = _Waiter()
            self._init_deadline = time.monotonic() + STDIO_INIT_WAIT_SECS
            gen = self._gen
            self._lock.notify_all()
        init = {"jsonrpc": "2.0", "method": "initialize", "id": 0,
                "params": {"agent_version": __version__, "extension_id": self.handle.plugin_id}}
        try:
            self._write(init, gen, time.monotonic() + _STDIO_WRITE_SECS, None)
        except _Failure as exc:
            log.warning("plugin %s: initialize not sent: %s", self._name, exc)

    def detach(self, why: str) -> None:
        """The process is gone (or its stdout closed): fail what is in flight."""
        with self._lock:
            self._proc, self._gen = None, self._gen + 1
            pending, self._pending = self._pending, {}
        self.handle.health.went_down(why, ended=False)   # its supervisor reaps it, then says
        for waiter in pending.values():
            waiter.set(error={"why": why})
        with self._wlock:                # a writer notices the new generation and lets go
            pass

    def idle(self) -> float | None:
        """Called by the relay loop when it wakes: time out ``initialize``.
        Returns the seconds until it wants to be called again, or None."""
        with self._lock:
            if self._init_deadline is None:
                return None
            left = self._init_deadline - time.monotonic()
            if left > 0:
                return left
            self._init_deadline = None
            unanswered = self._pending.pop(0, None) is not None
        if unanswered:
            log.warning("plugin %s: no answer to initialize within %gs; serving it anyway",
                        self._name, STDIO_INIT_WAIT_SECS)
        return None

    def line(self, line: bytes) -> None:
        """One line the plugin wrote on stdout."""
        try:
            msg = _loads(line)
        except (ValueError, RecursionError):
            msg = None
        if not isinstance(msg, dict):
            if line.strip():
                text = _log_safe(line[:4096].decode("utf-8", "replace").rstrip())
                self.handle.health.output(text)
                log.info("plugin %s stdout (not JSON-RPC): %s", self._name, text)
            return
        method = msg.get("method")
        if method == "broker.publish":
            self._bridge_publish(msg.get("params"))
            return
        if method is not None:
            log.info("plugin %s: ignoring %s from the plugin", self._name,
                     _log_safe(str(method), 80))
            return
        rid = msg.get("id")
        with self._lock:
            waiter = self._pending.pop(rid, None) if _is_int(rid) else None
            if rid == 0:
                self._init_deadline = None
        if rid == 0:
            if waiter is not None:
                waiter.set(msg)
            if "error" in msg:
                log.info("plugin %s: answered initialize with an error; serving it anyway",
                         self._name)
            else:
                log.info("plugin %s: initialized: %s", self._name,
                         _log_safe(_dumps(msg.get("result")), 400))
            return
        if rid is not None and rid == self._bye_id:
            log.info("plugin %s: acknowledged shutdown", self._name)
            return
        self._resolve(waiter, rid, msg)

    def overflow(self, head: bytes) -> None:
        """A line longer than the bound: fail the request it answers, when its
        id can be read before the result."""
        head = head[:4096]
        cut = min((i for i in (head.find(b"{", 1), head.find(b"[")) if i >= 0),
                  default=len(head))
        match = _STDIO_ID_RE.search(head[:cut])
        limit = DEFAULT_MAX_REPLY_BYTES
        with self._lock:
            waiter = self._pending.pop(int(match.group(1)), None) if match else None
        if waiter is not None:
            waiter.set(error={"why": f"reply line longer than {limit} bytes"})
        log.warning("plugin %s: dropped a stdout line longer than %d bytes%s", self._name,
                    limit, f" (reply to request {match.group(1).decode()})" if match else "")

    def shutdown(self) -> bool:
        """Send ``shutdown`` and close stdin (the plugin reads until then);
        False when no process runs."""
        rid = self._bye_id = next(self._ids)
        with self._lock:
            proc, gen = self._proc, self._gen
            if proc is None:
                return False
        try:
            self._write({"jsonrpc": "2.0", "method": "shutdown", "id": rid}, gen,
                        time.monotonic() + 0.5, None)
        except _Failure:
            pass
        with self._wlock:                # not once detach has begun: _reap closes it then
            with self._lock:
                current = self._gen == gen
            if current:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        return True

    # -- the proxies' side -----------------------------------------------------------

    def call(self, method: str, params: Any, timeout: float, cancel) -> Any:
        """Send a request and return its reply envelope; raises ``_Failure``."""
        return self._request(lambda rid: {"jsonrpc": "2.0", "method": method,
                                          "params": params, "id": rid},
                             next(self._ids), timeout, cancel)

    def bridge_call(self, topic: str, payload: Any, timeout: float, cancel) -> Any:
        """A request as a ``broker.event`` on ``topic``; the answer is the
        payload the plugin publishes to the event's ``reply_to``."""
        reply_to = f"_INBOX.stdio.{self.handle.plugin_id}.{next(self._ids)}"

        def message(_rid):
            event = nexo_request_event(topic, payload, reply_to)
            return {"jsonrpc": "2.0", "method": "broker.event",
                    "params": {"topic": topic, "event": event}}
        return self._request(message, reply_to, timeout, cancel)

    def _request(self, message: Callable[[Any], dict], key: Any, timeout: float, cancel) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._proc is None:       # not started yet, or between restarts
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Failure(f"no process within {timeout:g}s")
                if cancel is not None and cancel.is_set():
                    raise _Failure("tick cancelled")
                self._lock.wait(min(left, _CANCEL_POLL_SECS))
            waiter = self._pending[key] = _Waiter()
            gen = self._gen
        try:
            self._write(message(key), gen, deadline, cancel)
            if not waiter.wait(deadline - time.monotonic(), cancel):
                raise _Failure("tick cancelled" if cancel is not None and cancel.is_set()
                               else f"timed out after {timeout:g}s (no reply)")
        finally:
            with self._lock:
                if self._pending.get(key) is waiter:
                    del self._pending[key]
        if waiter.error is not None:
            raise _Failure(waiter.error["why"])
        return waiter.result

    def event(self, topic: str, event: Any) -> None:
        """A broker message for the plugin, as a ``broker.event`` notification."""
        with self._lock:
            gen = self._gen if self._proc is not None else None
        if gen is None:
            return
        try:
            self._write({"jsonrpc": "2.0", "method": "broker.event",
                         "params": {"topic": topic, "event": event}}, gen,
                        time.monotonic() + _STDIO_WRITE_SECS, None)
        except _Failure as exc:
            log.warning("plugin %s: broker.event on %s dropped: %s", self._name,
                        _log_safe(topic, 200), exc)

    def _write(self, message: dict, gen: int, deadline: float, cancel) -> None:
        try:
            data = (_dumps(message) + "\n").encode()
        except (ValueError, TypeError) as exc:
            raise _Failure(f"request is not JSON: {exc}") from None
        view, sent = memoryview(data), 0
        with self._wlock:
            while sent < len(view):
                with self._lock:
                    proc = self._proc if self._gen == gen else None
                if proc is None or proc.stdin.closed:
                    raise _Failure("the plugin's process went away")
                try:
                    sent += os.write(proc.stdin.fileno(), view[sent:])
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _Failure(f"cannot write to its stdin: {exc.strerror or exc}") from None
                left = deadline - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()):
                    if sent:                # half a line: the stream is broken
                        log.warning("plugin %s: stdin full mid-line; killing it", self._name)
                        _kill_group(proc)
                    raise _Failure("its stdin stayed full (it reads no requests)")
                poller = select.poll()
                poller.register(proc.stdin.fileno(), select.POLLOUT)
                poller.poll(int(min(left, _CANCEL_POLL_SECS) * 1000) + 1)

    def _resolve(self, waiter: _Waiter | None, key: Any, msg: Any) -> None:
        if waiter is not None:
            waiter.set(msg)
            return
        self.dropped += 1
        log.warning("plugin %s: reply for unknown id %s dropped (timed out or never sent)",
                    self._name, _log_safe(_dumps(key), 80))

    def _bridge_publish(self, params: Any) -> None:
        topic = params.get("topic") if isinstance(params, dict) else None
        if not isinstance(topic, str) or "event" not in params:
            log.warning("plugin %s: broker.publish without topic and event dropped", self._name)
            return
        if topic.startswith("_INBOX.stdio."):
            with self._lock:
                waiter = self._pending.pop(topic, None)
            self._resolve(waiter, topic, tick_reply_envelope(params["event"]))
            return
        if not self.handle.stdio_bridge or not _topic_allowed(topic, self.handle.publish_allow):
            log.warning("plugin %s: publish to %s refused (not in publish_allow) and dropped",
                        self._name, _log_safe(topic, 200))
            return
        broker = self.broker
        if broker is None:
            log.warning("plugin %s: publish to %s dropped: no broker", self._name,
                        _log_safe(topic, 200))
            return
        try:
            broker.publish_event(topic, params["event"])   # already an Event: as it is
        except PluginPollerForwardError as exc:
            log.warning("plugin %s: publish to %s failed: %s", self._name,
                        _log_safe(topic, 200), exc)


_STDIO_CHANNELS = threading.Lock()      # makes each handle's channel once


def _stdio_of(handle: PluginPollerHandle) -> _StdioChannel:
    """The stdio channel of ``handle``'s plugin (one per plugin, kept on its handle)."""
    channel = handle.stdio
    if channel is None:
        with _STDIO_CHANNELS:
            if handle.stdio is None:
                handle.stdio = _StdioChannel(handle)
            channel = handle.stdio
    return channel


class StdioPollerProxy:
    """A poller whose ticks go to a stdio plugin: ``poll_tick`` requests on
    its stdin (or ``broker.event`` messages on its tick topic, with the
    bridge), replies read from its stdout by the plugin's supervisor."""

    def __init__(self, kind: str, handle: PluginPollerHandle, broker=None, *,
                 limit: bool = True):
        self.kind, self.handle, self.limit = kind, handle, limit
        if broker is not None:
            _stdio_of(handle).broker = broker

    def tick(self, ctx: PollContext) -> TickAck:
        h = self.handle
        request, secs = ctx.to_request(), _tick_timeout(h, ctx).total_seconds()

        def send(cancel) -> TickAck:
            if h.stdio_bridge:
                reply = _stdio_of(h).bridge_call(h.tick_topic(), request.envelope(), secs, cancel)
            else:
                reply = _stdio_of(h).call("poll_tick", request.to_dict(), secs, cancel)
            return _reply_to_ack(reply, ctx.job_id)
        return _watched_tick(h, ctx, _Failure, send, self.limit)


@dataclasses.dataclass(frozen=True)
class _LifecycleRules:
    """What a plugin lifecycle means to the daemon.  ``_lifecycle_rules`` is
    the one place a manifest's lifecycle is read to decide anything; every
    lifecycle keeps the same poller contract (tests/test_conformance_lifecycle.py)."""
    proxy: Callable[..., Any]       # (kind, handle, broker, *, limit) -> its poller
    supervised: bool                # the daemon keeps one process running (PluginSupervisor)
    stdio: bool                     # ... and speaks to it on its stdin/stdout, not the broker
    remote_on_nats: bool            # may run elsewhere (no entrypoint) on a NATS broker


_LIFECYCLE_RULES = {
    Lifecycle.EPHEMERAL: _LifecycleRules(EphemeralPollerProxy, supervised=False, stdio=False,
                                         remote_on_nats=False),
    Lifecycle.LONG_LIVED: _LifecycleRules(PluginPollerProxy, supervised=True, stdio=False,
                                          remote_on_nats=True),
    Lifecycle.STDIO: _LifecycleRules(StdioPollerProxy, supervised=True, stdio=True,
                                     remote_on_nats=False),
}


def _lifecycle_rules(handle: PluginPollerHandle) -> _LifecycleRules:
    """The rules of ``handle``'s lifecycle (its manifest's)."""
    return _LIFECYCLE_RULES[handle.lifecycle]


def _proxy_for(kind: str, handle: PluginPollerHandle, broker, *, limit: bool = True):
    """The proxy of ``handle``'s lifecycle; ``limit=False`` when the caller
    bounds the plugin's ticks itself (the Runner's lane)."""
    return _lifecycle_rules(handle).proxy(kind, handle, broker, limit=limit)


class PluginSupervisor:
    """Keeps one long-lived plugin process running.

    The process gets its own process group and ``NEXO_BROKER_URL``,
    ``NEXO_POLLER_PLUGIN_ID`` and ``NEXO_POLLER_TICK_TOPIC``, and a stdin
    pipe held open as its lifeline (``NEXO_POLLER_LIFELINE=stdin``); its output is
    relayed to the log line by line.  When it exits it is restarted after
    ``backoff_initial`` seconds, doubling up to ``backoff_max``; a run that
    lasted ``stable_after`` seconds resets the backoff.

    A crash loop ends: with ``crash_limit``, the ``crash_limit``-th exit (or
    failure to start) within ``crash_window`` seconds gives the plugin up.
    ``failed`` then says why, no process runs, ``on_failed(self)`` is called
    once, and nothing restarts it until ``resume()`` (or ``stop()``).
    """

    def __init__(self, handle: PluginPollerHandle, broker_url: str, *,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 stable_after: float = 30.0, stop_grace: float = 5.0,
                 crash_limit: int | None = None, crash_window: float = 600.0,
                 on_failed: Callable[["PluginSupervisor"], None] | None = None):
        self.handle, self.broker_url = handle, broker_url
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stable_after, self.stop_grace = stable_after, stop_grace
        self.crash_limit, self.crash_window, self.on_failed = crash_limit, crash_window, on_failed
        self.failed: str | None = None           # why it was given up (a crash loop), or None
        self._crashes: deque[float] = deque()    # when its recent runs ended (monotonic)
        self._resume = threading.Event()
        self.restarts = 0
        self.last_exit: str | None = None        # why the last run ended, kept across restarts
        self.last_output: list[str] = []         # and its last output lines
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plock = threading.Lock()
        self._name = _log_safe(handle.plugin_id)
        self._stdio = _lifecycle_rules(handle).stdio
        self._bye = False                       # stdio: `shutdown` sent, stdin closed

    def start(self) -> "PluginSupervisor":
        if not self.handle.entrypoint_command:
            raise ManifestError(self.handle.manifest_path or self.handle.plugin_id,
                                "a long-lived plugin needs a command", "plugin.entrypoint")
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"nexo-plugin-{self.handle.plugin_id}")
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen | str:
        """The started process, or why it could not start."""
        h = self.handle
        nexo = {"NEXO_POLLER_TICK_TOPIC": h.tick_topic()}
        if self._stdio:                  # reached through its stdin/stdout, not the broker
            nexo["NEXO_POLLER_LIFECYCLE"] = "stdio"
            if h.stdio_bridge:
                nexo["NEXO_BROKER_KIND"] = "stdio_bridge"
        else:
            nexo["NEXO_BROKER_URL"] = self.broker_url
            # Its stdin is a pipe only this process writes to (never, in fact):
            # end-of-file on it tells the plugin the daemon is gone, however it
            # died.  A NATS connection outlives a SIGKILLed daemon; this does not.
            nexo["NEXO_POLLER_LIFELINE"] = "stdin"
        try:
            return _popen(
                [h.entrypoint_command, *h.entrypoint_args], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE if self._stdio else subprocess.STDOUT,
                cwd=h.working_dir, start_new_session=True,
                env=_child_env(h.plugin_id, h.entrypoint_env, **nexo))
        except (OSError, ValueError) as exc:
            why = f"cannot start {h.entrypoint_command!r}: {exc.strerror or exc}"
            log.error("plugin %s: %s", self._name, _log_safe(why),
                      extra={_PLUGIN_LINE: (self._name, _log_safe(why))})
            return why

    def _run(self) -> None:
        delay = self.backoff_initial
        health = self.handle.health
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                with self._plock:
                    if self._stop.is_set():
                        return
                    health.starting()
                    proc = self._spawn()
                    self.proc = proc if isinstance(proc, subprocess.Popen) else None
                if isinstance(proc, str):
                    why = proc
                else:
                    log.info("plugin %s: started (pid %d)", self._name, proc.pid)
                    if self._stdio:
                        _stdio_of(self.handle).attach(proc)
                    self._relay(proc)
                    if self._stop.is_set():
                        return
                    why = f"exited ({_exit_status(proc)})"
                self.last_exit, self.last_output = why, list(health.tail)
                if self._crash_looped(why):
                    self._resume.wait()          # resume() or stop()
                    if self._stop.is_set():
                        return
                    delay = self.backoff_initial
                    self.restarts += 1
                    continue
                if not isinstance(proc, str):   # a start that failed is logged already
                    log.warning("plugin %s: %s; restarting in %.1fs", self._name, why, delay)
                health.went_down(why, time.monotonic() + delay)
                if time.monotonic() - started >= self.stable_after:
                    delay = self.backoff_initial
                if self._stop.wait(delay):
                    return
                self.restarts += 1
                delay = _backoff(delay, self.backoff_max, 2)
        finally:
            health.went_down("stopped")

    def _crash_looped(self, why: str) -> bool:
        """Count a run's end; True when it ends the crash loop (the plugin is
        given up: ``failed`` set, ``on_failed`` told, once)."""
        now = time.monotonic()
        with self._plock:
            self._crashes.append(now)
            while self._crashes and self._crashes[0] <= now - self.crash_window:
                self._crashes.popleft()
            # Cleared before stop is looked at: a stop after the look sets it again.
            self._resume.clear()
            if self.crash_limit is None or len(self._crashes) < self.crash_limit \
                    or self._stop.is_set():
                return False
            self.failed = (f"crashed {len(self._crashes)} times within "
                           f"{self.crash_window:g}s (last: {why})")
        self.handle.health.went_down(f"failed: {self.failed}")
        log.error("plugin %s: %s; not restarting it until one of its jobs is resumed or "
                  "the configuration is reloaded", self._name, _log_safe(self.failed))
        if self.on_failed is not None:
            try:
                self.on_failed(self)
            except Exception:
                log.exception("plugin %s: handling its crash loop failed", self._name)
        return True

    def resume(self) -> bool:
        """Start a plugin given up after a crash loop again, its count from
        zero; False when it was not given up."""
        with self._plock:
            if self.failed is None:
                return False
            self.failed = None
            self._crashes.clear()
        log.info("plugin %s: resumed after its crash loop; starting it", self._name)
        self._resume.set()
        return True

    def _relay(self, proc: subprocess.Popen) -> None:
        """Log the plugin's output until it exits; then clear its whole group.
        A stdio plugin's stdout lines go to its channel instead.

        End-of-file on the output pipe is not an exit: a plugin may redirect
        its own output (``exec >>log 2>&1``) and go on serving.  Only the
        process's exit ends its run."""
        channel = _stdio_of(self.handle) if self._stdio else None
        streams = {proc.stdout.fileno(): _Lines(65536, self._output, self._output)}
        if channel is not None:
            streams = {proc.stdout.fileno(): _Lines(DEFAULT_MAX_REPLY_BYTES, channel.line,
                                                    channel.overflow),
                       proc.stderr.fileno(): _Lines(65536, self._output, self._output)}
        poller = select.poll()               # not select(): fds past 1024 are fine
        for fd in streams:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
        # A pidfd turns readable when the process exits, so the loop sleeps
        # until output or the exit; without one it looks every 500 ms.
        exit_fd = _pidfd(proc.pid)
        if exit_fd is not None:
            poller.register(exit_fd, select.POLLIN)
        exited = False
        why = "its stdout closed"
        try:
            while streams:
                wait = channel.idle() if channel is not None else None
                if exited:
                    wait = 0.0               # only drain what is already written
                elif exit_fd is None:
                    wait = 0.5 if wait is None else min(wait, 0.5)
                ready = poller.poll(None if wait is None else math.ceil(wait * 1000))
                output = False
                for fd, _ in ready:
                    if fd == exit_fd:
                        exited = True
                        poller.unregister(fd)
                        continue
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    output = True
                    if chunk:
                        streams[fd].feed(chunk)
                        continue
                    poller.unregister(fd)
                    del streams[fd]
                    if channel is not None and fd == proc.stdout.fileno():
                        channel.detach(why)         # no reply can come any more
                if not output and (exited or exit_fd is None) and proc.poll() is not None:
                    break                   # exited; a grandchild may still hold the pipe
            else:
                _wait_exit(proc)             # output closed; the process may go on
        finally:
            if exit_fd is not None:
                os.close(exit_fd)
            if channel is not None:
                why = f"exited ({_exit_status(proc)})" if proc.poll() is not None else why
                channel.detach(why)
            _reap(proc)
            _sweep_orphans(f"NEXO_POLLER_PLUGIN_ID={self.handle.plugin_id}".encode())

    def _output(self, line: bytes) -> None:
        text = _log_safe(line[:4096].decode("utf-8", "replace").rstrip())
        self.handle.health.output(text)
        log.info("plugin %s: %s", self._name, text, extra={_PLUGIN_LINE: (self._name, text)})

    def stop(self) -> None:
        """SIGTERM the plugin's group, SIGKILL after the grace; wait for it."""
        self.request_stop()
        self.join()

    def request_stop(self) -> None:
        """Stop restarting and SIGTERM the plugin's group; returns at once."""
        self._stop.set()
        self._resume.set()                      # a plugin given up waits on it
        with self._plock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            if self._stdio:                  # `shutdown` first; SIGTERM comes in join
                self._bye = _stdio_of(self.handle).shutdown()
            else:
                _kill_group(proc, signal.SIGTERM)

    def join(self, deadline: float | None = None) -> None:
        """Wait for the plugin until ``deadline`` (monotonic; default: the
        grace from now), SIGKILL its group, and reap it."""
        if deadline is None:
            deadline = time.monotonic() + self.stop_grace
        with self._plock:
            proc = self.proc
        if proc is not None and self._bye:    # stdio: a plugin exits when its stdin closes
            try:
                proc.wait(max(0.0, min(STDIO_SHUTDOWN_WAIT_SECS, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGTERM)
        if proc is not None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("plugin %s: ignored SIGTERM; killing", self._name)
            _kill_group(proc)
        if self._thread is not None:
            self._thread.join(5)


# ============================================================================
# SDK
# Write a plugin in a few lines: ``run_plugin({"rss": tick})``.  The same
# file serves ticks over stdio (ephemeral) or the broker (long-lived).
# ============================================================================

def _plugin_dispatch(handlers: Mapping[str, Callable], envelope: Any) -> dict:
    """Answer one ``poll_tick`` envelope: the dispatcher of both lifecycles."""
    req_id = envelope.get("id") if isinstance(envelope, dict) else None

    def answer(code: int | None, payload: Any, data: dict | None = None) -> dict:
        out: dict = {"jsonrpc": "2.0", "id": req_id}
        if code is None:
            out["result"] = payload
        else:
            out["error"] = {"code": code, "message": str(payload)}
            if data:                        # JSON-RPC's ``data``: readers not knowing it skip it
                out["error"]["data"] = data
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
    except PollerError as exc:
        code = {ErrorClass.PERMANENT: ERROR_PERMANENT,
                ErrorClass.CONFIG: ERROR_CONFIG}.get(exc.classify(), ERROR_TRANSIENT)
        return answer(code, *_error_text_and_data(exc))
    except Exception as exc:                 # a bug in the handler: retry later, keep serving
        return answer(ERROR_TRANSIENT, _report_bug(exc))
    if ack is not None and not isinstance(ack, TickAck):
        return answer(ERROR_TRANSIENT,
                      f"TypeError: tick handler returned {type(ack).__name__}, not TickAck")
    return answer(None, TickReply.from_ack(ack).to_dict())


def _error_text_and_data(exc: PollerError) -> tuple[str, dict]:
    """A handler's PollerError as an error reply's message and ``data``:
    ``retry_after_secs``, and the partial progress (``next_cursor``,
    ``deliver``, as a TickReply's), dropped with a note when malformed."""
    text = str(getattr(exc, "reason", exc))     # Config's text without "job 'x':"
    data: dict = {}
    if getattr(exc, "retry_after", None) is not None:
        data["retry_after_secs"] = exc.retry_after
    try:
        partial = _partial_ack(exc)
    except TypeError as bad:
        return f"{text} (partial progress dropped: {bad})", data
    if partial is not None:
        data.update(TickReply.from_ack(partial).to_dict())
    return text, data


_TRACEBACK_FRAMES = 8                        # innermost frames a handler's traceback keeps


def _report_bug(exc: BaseException) -> str:
    """A handler's unexpected exception: its traceback goes to stderr (the
    innermost frames, bounded), which the daemon relays to its log and
    appends to an ephemeral tick's error; the returned text says what and where."""
    import traceback
    try:
        sys.stderr.write("".join(traceback.format_exception(
            type(exc), exc, exc.__traceback__, limit=-_TRACEBACK_FRAMES))[-_STDERR_KEEP_BYTES:])
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass                                 # no stderr, or nobody reads it
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        where = frames[-1]
        text += f" (at {os.path.basename(where.filename)}:{where.lineno} in {where.name})"
    return text


def _context_from_params(params: dict) -> PollContext:
    def text(key: str) -> str:
        value = params.get(key)
        if not isinstance(value, str):
            raise PluginPollerForwardError.ParseReply(f"{key} must be a string")
        return value
    cursor = params.get("cursor")
    hint = params.get("interval_hint_secs", 0)
    if not (_is_int(hint) or isinstance(hint, float)) or hint < 0:
        raise PluginPollerForwardError.ParseReply(
            "interval_hint_secs must be a non-negative number")
    scheduled = params.get("scheduled_at")      # absent from nexo's daemon: ``now``
    return PollContext(
        job_id=text("job_id"), agent_id=text("agent_id"), kind=text("kind"),
        cursor=None if cursor is None else decode_cursor(cursor),
        config=params.get("config"), now=datetime.fromisoformat(text("now")),
        interval_hint=timedelta(seconds=hint),
        scheduled_at=None if scheduled is None else datetime.fromisoformat(
            text("scheduled_at")))


def run_plugin(handlers: Mapping[str, Callable[[PollContext], TickAck | None]],
               *, env: Mapping[str, str] | None = None) -> int:
    """Serve ticks for ``handlers`` (kind -> ``tick(ctx)``) until the daemon goes.

    With ``NEXO_POLLER_EPHEMERAL=1`` (ephemeral) or ``NEXO_POLLER_LIFECYCLE=stdio``
    (stdio; also ``NEXO_BROKER_KIND=stdio_bridge``) it answers request lines
    on stdin until stdin closes, ``initialize``, ``shutdown`` and bridged
    ``broker.event`` ticks included; otherwise it subscribes to ``NEXO_POLLER_TICK_TOPIC`` on
    ``NEXO_BROKER_URL`` (``unix://``, or ``nats://``/``tls://`` through
    ``connect_broker``) and returns when that connection ends; a NATS
    connection reconnects through outages.  With ``NEXO_POLLER_LIFELINE=stdin``
    (set by the daemon) it leaves once stdin reaches end-of-file: the daemon
    is gone.  Returns an exit status for ``sys.exit``.
    """
    env = os.environ if env is None else env
    handlers = dict(handlers)
    if (env.get("NEXO_POLLER_EPHEMERAL") == "1" or env.get("NEXO_POLLER_LIFECYCLE") == "stdio"
            or env.get("NEXO_BROKER_KIND") == "stdio_bridge"):
        return _serve_stdio(handlers)
    url, topic = env.get("NEXO_BROKER_URL"), env.get("NEXO_POLLER_TICK_TOPIC")
    if not url or not topic:
        print("nexo-poller plugin: NEXO_BROKER_URL and NEXO_POLLER_TICK_TOPIC must be set "
              "(or NEXO_POLLER_EPHEMERAL=1); start me from the daemon", file=sys.stderr)
        return 2
    try:
        client = connect_broker(url)
        serving = _Serving(client)
        # Plugin instances of one id share the work, NATS queue-group style.
        serving.sid = client.subscribe(topic, lambda payload: serving.tick(handlers, payload),
                                       queue=env.get("NEXO_POLLER_PLUGIN_ID") or topic)
    except PluginPollerForwardError as exc:
        print(f"nexo-poller plugin: {exc}", file=sys.stderr)
        return 1
    if env.get("NEXO_POLLER_LIFELINE") == "stdin":
        _watch_lifeline(serving.leave)
    client.wait_closed()
    return 0


_LEAVING_GRACE_SECS = 3.0   # ticks in flight a plugin that lost its daemon may finish


class _Serving:
    """A long-lived plugin's subscription, and its leaving once its daemon
    is gone: a plugin whose daemon died must not go on answering ticks
    (another daemon's, over NATS) with a dead stderr pipe."""

    def __init__(self, client) -> None:
        self.client, self.sid = client, None
        self._leaving = threading.Lock()

    def tick(self, handlers: Mapping[str, Callable], payload: Any) -> dict:
        reply = _plugin_dispatch(handlers, payload)
        if "error" in reply and _output_broken():
            self.leave()                 # nobody reads its output: its daemon is gone
        return reply

    def leave(self) -> None:
        """Stop taking ticks, let those in flight finish and answer (their
        output going to /dev/null), close the connection; exit the process
        if a tick still runs after the grace.  Safe from any thread, once."""
        if self._leaving.acquire(blocking=False):
            threading.Thread(target=self._leave, name="nexo-plugin-leaving",
                             daemon=True).start()

    def _leave(self) -> None:
        _silence_output()
        if self.sid is not None:
            try:
                self.client.unsubscribe(self.sid)
            except PluginPollerForwardError:
                pass                         # the connection is gone already
        idle = self.client.handlers_done(_LEAVING_GRACE_SECS)
        self.client.close()
        if not idle:                         # a stuck handler would hold the exit
            os._exit(0)


def _watch_lifeline(on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` when stdin reaches end-of-file: the daemon that
    started this plugin held its other end, so it is gone."""
    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass                         # the daemon writes nothing; ignore it
        except OSError:
            pass
        on_gone()
    threading.Thread(target=watch, name="nexo-plugin-lifeline", daemon=True).start()


def _output_broken() -> bool:
    """True when nobody reads this process's stderr any more: a pipe whose
    reader closed polls as an error."""
    poller = select.poll()
    poller.register(2, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _silence_output() -> None:
    """Point stdout and stderr at /dev/null: with the reader gone, a print
    would raise BrokenPipeError in whatever handler made it."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def _serve_stdio(handlers: Mapping[str, Callable]) -> int:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            envelope = _loads(line)
        except (ValueError, RecursionError) as exc:
            reply = {"jsonrpc": "2.0", "id": None,
                     "error": {"code": BROKER_PARSE_ERROR, "message": f"invalid JSON: {exc}"}}
        else:
            reply = _stdio_answer(handlers, envelope)
        if reply is not None:
            out.write(_dumps(reply).encode() + b"\n")
            out.flush()
    return 0


def _stdio_answer(handlers: Mapping[str, Callable], envelope: Any) -> dict | None:
    """The line to write for one line read on stdin (None: nothing)."""
    method = envelope.get("method") if isinstance(envelope, dict) else None
    if method in ("initialize", "shutdown"):
        result = None if method == "shutdown" else {
            "name": "nexo-poller-sdk", "version": __version__, "pollers": list(handlers)}
        return {"jsonrpc": "2.0", "id": envelope.get("id"), "result": result}
    if method == "broker.event":         # the stdio bridge: a tick on the tick topic
        params = envelope.get("params")
        payload, reply_to, _ = nexo_unwrap(params.get("event") if isinstance(params, dict)
                                           else None)
        if reply_to is None:
            return None
        answer = nexo_reply_payload(_plugin_dispatch(handlers, payload))
        return {"jsonrpc": "2.0", "method": "broker.publish",
                "params": {"topic": reply_to, "event": nexo_event(reply_to, answer)}}
    if method != "poll_tick" and isinstance(envelope, dict) and "id" not in envelope:
        return None                      # a notification gets no answer
    return _plugin_dispatch(handlers, envelope)


# ============================================================================
# Built-in kinds
# Kinds every Runner serves in process with no plugin to install (command,
# rss, webhook_poll); config validation knows them too.  A plugin serving
# the same kind wins.
# Shares: _builtin_config_problem, _DeadlineSocket, _IN_PROCESS_BUDGET_SECS
# ============================================================================

DEFAULT_MAX_OUTPUT_BYTES = 10 << 20  # stdout (an answer) a built-in kind reads, unless set
_COMMAND_KEYS = {"argv", "env", "cwd", "timeout_secs", "message_template", "deliver",
                 "max_output_bytes"}
_COMMAND_TIMEOUT_SECS = 30.0
_EX_TEMPFAIL = 75                    # sysexits.h: "try again later"
_TEMPLATE_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _render(template: str, fields: Mapping[str, Any]) -> str:
    """``template`` with each ``{name}`` of ``fields`` filled in; any other
    brace stays as written (a template is data, not a format string)."""
    def fill(m: re.Match) -> str:
        if m.group(1) not in fields:
            return m.group(0)
        value = fields[m.group(1)]
        return value if isinstance(value, str) else _dumps(value)
    return _TEMPLATE_FIELD_RE.sub(fill, template)


def _deliver_to(job_id: str, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """A built-in job's ``deliver {channel, to}`` (``recipient`` for ``to``,
    as nexo reads it too), checked; None without one."""
    deliver = config.get("deliver")
    if deliver is None:
        return None
    if isinstance(deliver, dict) and set(deliver) == {"channel", "recipient"}:
        deliver = {"channel": deliver["channel"], "to": deliver["recipient"]}  # nexo's alias
    if not isinstance(deliver, dict) or set(deliver) != {"channel", "to"}:
        raise PollerError.Config(job_id, 'config.deliver must be {"channel": ..., "to": ...}')
    try:
        Delivery.from_dict({"channel": deliver["channel"], "recipient": deliver["to"]},
                           "config.deliver")
    except PluginPollerForwardError as exc:
        raise PollerError.Config(job_id, str(exc).replace(".recipient", ".to")) from None
    return deliver["channel"], deliver["to"]


class _CommandJob:
    """A ``command`` job's config, checked: each problem is a
    ``PollerError.Config`` naming its key."""

    def __init__(self, job_id: str, config: Any) -> None:
        def bad(key: str, what: str) -> PollerError:
            return PollerError.Config(job_id, f"config.{key} must be {what}")
        if not isinstance(config, dict):
            raise PollerError.Config(job_id, "config must be an object with argv")
        unknown = sorted(set(config) - _COMMAND_KEYS)
        if unknown:
            raise PollerError.Config(job_id, f"config.{unknown[0]}: unknown key (allowed: "
                                             f"{', '.join(sorted(_COMMAND_KEYS))})")
        argv = config.get("argv")
        if not isinstance(argv, list) or not argv or not all(
                isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
            raise bad("argv", 'a non-empty array of strings (no shell: ["/bin/sh", "-c", '
                              '"..."] for one)')
        env = config.get("env", {})
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and k and "=" not in k and "\0" not in k
                and isinstance(v, str) and "\0" not in v for k, v in env.items()):
            raise bad("env", "an object of variable name -> string")
        cwd = config.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
            raise bad("cwd", "a directory path")
        timeout = config.get("timeout_secs", _COMMAND_TIMEOUT_SECS)
        if not _is_int(timeout) and not isinstance(timeout, float) \
                or not 0 < timeout <= 86400:
            raise bad("timeout_secs", "a number of seconds in (0, 86400]")
        limit = config.get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
        if not _is_int(limit) or limit < 1:
            raise bad("max_output_bytes", "a positive integer")
        template = config.get("message_template", "{line}")
        if not isinstance(template, str):
            raise bad("message_template", 'a string (default "{line}")')
        self.job_id, self.argv, self.env, self.cwd = job_id, argv, env, cwd
        self.timeout, self.max_output, self.template = float(timeout), limit, template
        self.deliver = _deliver_to(job_id, config)


class CommandPoller:
    """The ``command`` kind: run ``argv`` (no shell) each tick.  The cursor
    goes in as ``NEXO_CURSOR`` (text, empty at first); stdout's last line
    ``cursor: ...`` (or ``{"cursor": ..., "items": [...]}`` as the whole of
    stdout) brings the next one back, and each other non-empty line (or
    item) is delivered as ``message_template`` (``{line}``).  Exit status 0
    is ok, 75 (EX_TEMPFAIL) transient, anything else permanent.

    The child runs in its own process group with stdin closed; stdout is
    read up to ``max_output_bytes``, stderr's newest 8 KiB kept for the
    error; at ``timeout_secs``, on cancel or when the tick ends, the whole
    group is killed and reaped (``_run_to_exit``, ``_reap``)."""

    kind = "command"
    check = _CommandJob                 # check(job_id, config): raises PollerError.Config

    def tick(self, ctx: PollContext) -> TickAck:
        job = _CommandJob(ctx.job_id, ctx.config)
        cursor = (ctx.cursor or b"").decode("utf-8", "surrogateescape")
        if "\0" in cursor:
            raise PollerError.Permanent(f"job {ctx.job_id!r}: its cursor holds a NUL byte, "
                                        "which NEXO_CURSOR cannot carry (set another cursor)")
        marker = f"command:{ctx.job_id}"
        try:
            proc = _popen(job.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=job.cwd, start_new_session=True,
                          bufsize=0, env=_child_env(marker, job.env, NEXO_CURSOR=cursor,
                                                    NEXO_JOB_ID=ctx.job_id,
                                                    NEXO_SCHEDULED_AT=_format_now(
                                                        ctx.scheduled_at or ctx.now)))
        except OSError as exc:
            key, what = (("cwd", job.cwd) if job.cwd and exc.filename == job.cwd
                         else ("argv[0]", job.argv[0]))
            text = f"config.{key}: cannot start {what!r}: {exc.strerror or exc}"
            if exc.errno in _UNHEALING_ERRNOS:
                raise PollerError.Config(ctx.job_id, text) from None
            raise PollerError.Transient(text) from None
        stderr = bytearray()
        out = _run_reaped(proc, f"command {job.argv[0]!r}", marker, stderr,
                          lambda: _run_to_exit(proc, job.timeout, ctx.cancel,
                                               job.max_output, stderr))
        code = proc.returncode
        if code != 0:
            how = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
            exc = (PollerError.Transient if code == _EX_TEMPFAIL else PollerError.Permanent)(
                f"command {job.argv[0]!r}: {how}")
            raise _with_stderr(exc, stderr)
        try:
            items, next_cursor = _command_output(out)
        except PollerError as exc:
            raise _with_stderr(exc, stderr) from None
        deliver = ()
        if job.deliver is not None:
            channel, to = job.deliver
            deliver = tuple(Delivery(channel, to, {"text": _render(job.template, fields)})
                            for fields in items)
        return TickAck(next_cursor=next_cursor, deliver=deliver,
                       metrics=TickMetrics(len(items), len(deliver)))


def _command_output(out: bytes) -> tuple[list[dict], bytes | None]:
    """A command's stdout read: (each item's template fields, the next
    cursor or None for unchanged).  The whole of stdout one JSON object with
    ``cursor`` or ``items`` is the JSON form; else it is lines."""
    text = out.decode("utf-8", "replace")
    doc = None
    if text.strip().startswith("{"):
        try:
            doc = _loads(text)
        except (ValueError, RecursionError):
            doc = None
    if isinstance(doc, dict) and ("cursor" in doc or "items" in doc):
        items = doc.get("items", [])
        if not isinstance(items, list):
            raise PollerError.Permanent(f'the JSON on stdout: "items" must be an array, '
                                        f"got {_json_type(items)}")
        cursor = doc.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            cursor = _dumps(cursor)         # an object cursor (nexo's shape) kept as JSON text
        fields = [{**(item if isinstance(item, dict) else {}),
                   "line": item if isinstance(item, str) else _dumps(item)} for item in items]
        return fields, None if cursor is None else cursor.encode("utf-8", "surrogateescape")
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    cursor = None
    if lines and lines[-1].startswith("cursor:"):
        cursor = lines.pop()[len("cursor:"):].strip().encode()
    return [{"line": line} for line in lines], cursor


# -- the HTTP kinds (rss, webhook_poll): one bounded fetch -------------------------

_IN_PROCESS_BUDGET_SECS = 5.0        # an in-process kind's tick, unless its job sets timeout_secs
_HTTP_MAX_REDIRECTS = 5
_HTTP_REDIRECTS = {301, 302, 303, 307, 308}
_HTTP_MAX_PAGES = 5                  # webhook_poll pages per tick, unless max_pages says
_HTTP_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LINK_RE = re.compile(r'<([^>]*)>((?:\s*;\s*[^;,]*)*)')
_LINK_REL_RE = re.compile(r';\s*rel\s*=\s*"?([^";,]*)"?', re.I)


class _DeadlineSocket(io.RawIOBase):
    """A connected socket whose sends and reads share one deadline: each may
    wait only what is left of it, so a peer trickling a byte at a time is cut
    off when the deadline passes, not when it pauses for a whole timeout.
    With a ``cancel`` Event, reads (and ``call``) look at it between short
    waits and end as a cancelled tick.  Has what ``http.client`` uses of its
    socket."""

    def __init__(self, sock, deadline: float, cancel: threading.Event | None = None) -> None:
        super().__init__()
        self.sock, self.deadline, self.cancel = sock, deadline, cancel

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)
        return left

    def call(self, op: Callable, *args) -> Any:
        """``op(*args)``, a socket operation safe to retry after a timeout
        (a read, a TLS handshake), within the deadline and the cancel."""
        while True:
            left = self._left()
            if self.cancel is None:
                return op(*args)
            if self.cancel.is_set():
                raise PollerError.Transient("tick cancelled")
            self.sock.settimeout(min(left, _CANCEL_POLL_SECS))
            try:
                return op(*args)
            except TimeoutError:
                continue

    def sendall(self, data) -> None:        # not retried: a timeout may have sent a part
        self._left()
        self.sock.sendall(data)

    def readinto(self, buf) -> int:
        return self.call(self.sock.recv_into, buf)

    def readable(self) -> bool:
        return True

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(self)

    def close(self) -> None:         # the socket only: its reader may still be flushed
        self.sock.close()


def _refused_address(text: str) -> bool:
    """Whether a job without ``allow_private_networks`` may not connect to
    the address ``text``: loopback, private, link-local (the metadata
    service), shared, reserved, multicast or unspecified; an IPv4 address
    mapped into IPv6 counts as itself."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return True
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or ip.is_unspecified


def _url_problem(url: Any, allow_private: bool) -> str | None:
    """What makes ``url`` unusable for an HTTP kind, or None: an http(s) URL
    with a host (a literal private address refused unless allowed)."""
    from urllib.parse import urlsplit
    if not isinstance(url, str) or not url or any(c.isspace() or ord(c) < 32 for c in url):
        return "an http:// or https:// URL (no spaces)"
    try:
        parts = urlsplit(url)
        parts.port                  # noqa: B018 -- raises for a port out of range
    except ValueError as exc:
        return f"an http:// or https:// URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL with a host"
    host = parts.hostname
    if not allow_private and (host == "localhost" or host.endswith(".localhost")
                              or (re.fullmatch(r"[0-9.]+|[0-9a-fA-F:.%]*:[0-9a-fA-F:.%]*", host)
                                  and _refused_address(host))):
        return (f"an address this job may reach: {host} is loopback/private/link-local "
                "(set allow_private_networks: true to allow it)")
    return None


@dataclasses.dataclass
class _HttpAnswer:
    url: str                        # where it came from, after redirects
    status: int
    headers: Any                    # http.client.HTTPMessage
    body: bytes = b""


class _HttpJob:
    """The keys every HTTP kind has, checked (each problem a
    ``PollerError.Config`` naming its key): its URL, ``max_per_tick``,
    ``message_template``, ``deliver``, ``allow_private_networks``,
    ``max_response_bytes``."""

    url_key = "url"
    keys = {"max_per_tick", "message_template", "deliver", "allow_private_networks",
            "max_response_bytes"}
    max_per_tick = 20
    template = "{json}"

    def __init__(self, job_id: str, config: Any) -> None:
        if not isinstance(config, dict):
            raise PollerError.Config(job_id, f"config must be an object with {self.url_key}")
        allowed = self.keys | {self.url_key}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise PollerError.Config(job_id, f"config.{unknown[0]}: unknown key (allowed: "
                                             f"{', '.join(sorted(allowed))})")
        self.job_id, self.config = job_id, config
        self.allow_private = self.get("allow_private_networks", False, "true or false",
                                      lambda v: isinstance(v, bool))
        problem = _url_problem(config.get(self.url_key), self.allow_private)
        if problem:
            raise self.bad(self.url_key, problem)
        self.url = config[self.url_key]
        self.most = self.get("max_per_tick", self.max_per_tick, "a positive integer",
                             lambda v: _is_int(v) and v >= 1)
        self.limit = self.get("max_response_bytes", DEFAULT_MAX_OUTPUT_BYTES,
                              "a positive integer", lambda v: _is_int(v) and v >= 1)
        self.template = self.get("message_template", self.template,
                                 f"a string (default {_dumps(self.template)})",
                                 lambda v: isinstance(v, str))
        self.deliver = _deliver_to(job_id, config)

    def bad(self, key: str, what: str) -> PollerError:
        return PollerError.Config(self.job_id, f"config.{key} must be {what}")

    def get(self, key: str, default: Any, what: str, ok: Callable[[Any], bool]) -> Any:
        value = self.config.get(key, default)
        if not ok(value):
            raise self.bad(key, what)
        return value

    def start(self, ctx: PollContext) -> tuple[dict, bool]:
        """Start a tick: its one deadline is the job's ``timeout_secs`` when
        it sets one, else the in-process budget (what the runner's lease
        assumes); ``ctx.cancel`` ends it sooner.  Returns the cursor read
        (``_seen_ring``); ``self.conditional`` has its ETag as ``If-None-Match``."""
        self.budget = (_IN_PROCESS_BUDGET_SECS if ctx.timeout is None
                       else ctx.timeout.total_seconds())
        self.budget_of = ("the job's timeout_secs" if ctx.timeout is not None
                          else "the in-process tick budget: set the job's timeout_secs")
        self.deadline, self.cancel = time.monotonic() + self.budget, ctx.cancel
        state, had = _seen_ring(ctx.cursor)
        etag = state.get("etag")
        self.conditional = {"If-None-Match": etag} if isinstance(etag, str) else {}
        return state, had

    def deliveries(self, items: list[dict]) -> tuple[Delivery, ...]:
        if self.deliver is None:
            return ()
        channel, to = self.deliver
        return tuple(Delivery(channel, to, {"text": _render(self.template, fields)})
                     for fields in items)


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds from now (delta or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _http_status_error(answer: _HttpAnswer) -> PollerError | None:
    """nexo's rule: a 2xx is fine; 408, 429 and 5xx are Transient (with the
    answer's ``Retry-After`` as the "not before"); anything else Permanent."""
    status = answer.status
    if 200 <= status < 300:
        return None
    text = f"{answer.url}: HTTP {status}"
    if status in (408, 429) or status >= 500:
        after = _retry_after(answer.headers.get("Retry-After"))
        if after is not None:
            text += f" (Retry-After {after:g}s)"
        return PollerError.Transient(text, retry_after=after)
    if status in (401, 403):
        text += " (credentials may need rotation)"
    return PollerError.Permanent(text)


def _http_fetch(job: _HttpJob, url: str, *, method: str = "GET",
                headers: Mapping[str, str] | None = None, body: bytes | None = None,
                extra: Mapping[str, str] | None = None) -> _HttpAnswer:
    """One request of a job, redirects followed (at most 5, http(s) only,
    each hop's address checked): its final answer with the body read.
    ``headers`` (the job's own) go only to the first URL's origin; ``extra``
    (conditional ones) to every hop.  Everything, from the first connect to
    the last byte, must fit before the tick's deadline (``job.start``)."""
    from urllib.parse import urljoin, urlsplit

    def origin(u: str) -> tuple:
        p = urlsplit(u)
        return p.scheme, p.hostname, p.port
    first, hops = origin(url), 0
    while True:
        sent = {**(extra or {}), **((headers or {}) if origin(url) == first else {})}
        answer = _http_once(job, url, method, sent, body)
        location = answer.headers.get("Location")
        if answer.status not in _HTTP_REDIRECTS or not location:
            return answer
        hops += 1
        if hops > _HTTP_MAX_REDIRECTS:
            raise PollerError.Permanent(f"{job.url}: more than {_HTTP_MAX_REDIRECTS} redirects")
        target = urljoin(url, location.strip())
        problem = _url_problem(target, job.allow_private)
        if problem:
            raise PollerError.Permanent(f"{url}: redirect to {_log_safe(target, 200)} refused: "
                                        f"the target must be {problem}")
        if answer.status == 303 or (answer.status in (301, 302) and method == "POST"):
            method, body = "GET", None
        url = target


def _resolve(job: _HttpJob, url: str, host: str, port: int) -> list[tuple]:
    """The addresses ``host`` resolves to that the job may connect to
    (connect to these, not the name: no second lookup to race)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise PollerError.Transient(f"{url}: cannot resolve {host}: {exc}") from None
    usable = [(family, addr) for family, _, _, _, addr in found
              if family in (socket.AF_INET, socket.AF_INET6)
              and (job.allow_private or not _refused_address(addr[0]))]
    if not usable:
        what = ", ".join(sorted({a[0] for *_, a in found})) or "nothing"
        raise PollerError.Permanent(
            f"{url}: {host} resolves to {what}: loopback/private/link-local, refused "
            "(set allow_private_networks: true to allow it)")
    return usable


def _http_once(job: _HttpJob, url: str, method: str, headers: Mapping[str, str],
               body: bytes | None) -> _HttpAnswer:
    """One request, no redirect followed: the answer (its body read, up to
    ``max_response_bytes``, unless it is a redirect)."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    host, tls = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(host, port)     # never connects: given its socket
    resp = None
    try:
        conn.sock = _http_connect(job, url, host, port, tls)
        hostport = host if ":" not in host else f"[{host}]"
        if parts.port:
            hostport += f":{parts.port}"
        conn.request(method, path, body, {
            "Host": hostport, "User-Agent": f"nexo-poller/{__version__}",
            "Accept": "*/*", "Connection": "close",
            **({"Content-Type": "application/json"} if body is not None else {}), **headers})
        # Not conn.getresponse(): it closes the socket under the answer's reader.
        resp = http.client.HTTPResponse(conn.sock, method=method)
        resp.begin()
        answer = _HttpAnswer(url, resp.status, resp.headers)
        if resp.status not in _HTTP_REDIRECTS and resp.status != 304:
            answer.body = _read_bounded(resp, job.limit, url)
        return answer
    except TimeoutError:
        raise PollerError.Transient(f"{url}: no complete answer within {job.budget:g}s "
                                    f"({job.budget_of})") from None
    except (http.client.HTTPException, OSError) as exc:
        raise PollerError.Transient(f"{url}: {_log_safe(str(exc) or type(exc).__name__, 200)}"
                                    ) from None
    finally:
        if resp is not None:
            resp.close()
        conn.close()


def _http_connect(job: _HttpJob, url: str, host: str, port: int, tls: bool
                  ) -> _DeadlineSocket:
    """A socket to one of the host's checked addresses (TLS when ``tls``),
    connected within the deadline."""
    error: OSError | None = None
    for family, addr in _resolve(job, url, host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            wrapped = _DeadlineSocket(sock, job.deadline, job.cancel)
            wrapped._left()                 # the connect may wait what is left
            sock.connect(addr)
            if tls:
                import ssl
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=host, do_handshake_on_connect=False)
                wrapped = _DeadlineSocket(sock, job.deadline, job.cancel)
                wrapped.call(sock.do_handshake)
            return wrapped
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
    raise PollerError.Transient(f"{url}: cannot connect: {error}")


def _read_bounded(resp, limit: int, url: str) -> bytes:
    """An answer's body, refused past ``limit`` bytes (before reading it
    when its Content-Length says so)."""
    def too_big() -> PollerError:
        return PollerError.Permanent(f"{url}: the response is larger than max_response_bytes "
                                     f"({limit} bytes)")
    length = resp.getheader("Content-Length", "")
    if length.strip().isdigit() and int(length) > limit:
        raise too_big()
    chunks, size = [], 0
    while True:
        chunk = resp.read(min(1 << 16, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_big()


def _seen_ring(cursor: bytes | None) -> tuple[dict, bool]:
    """A cursor of nexo's shape (``{"seen_ids": [...], ...}``) read, and
    whether there was one; an unreadable one counts as empty (as nexo)."""
    if cursor is None:
        return {"seen_ids": []}, False
    try:
        doc = _loads(cursor)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("seen_ids"), list):
        return {"seen_ids": []}, True
    doc["seen_ids"] = [i for i in doc["seen_ids"] if isinstance(i, str)]
    return doc, True


def _pick_new(items: list[tuple[str, dict]], seen: list[str], cap: int, most: int,
              first_run: bool) -> tuple[list[dict], list[str]]:
    """Which items to deliver and the next ring of seen ids.  ``items`` are
    (id, fields) in the source's order; only the first ``cap`` are looked
    at (the ring can remember no more).  At most ``most`` unseen ones are
    delivered; the others wait for the next tick, except on a job's first
    run, which starts from now (the rest are marked seen).  The ring keeps
    every id still in the window, so none comes back while it is listed;
    oldest first, as nexo writes it."""
    window, known, fresh, listed = items[:cap], set(seen), [], {}
    for item_id, fields in window:
        if item_id in listed:
            continue
        listed[item_id] = True              # an ordered set
        if item_id not in known:
            fresh.append((item_id, fields))
    send = fresh[:most]
    marked = known | {i for i, _ in (fresh if first_run else send)}
    keep = [i for i in listed if i in marked]
    kept = set(keep)
    ring = [i for i in seen if i not in kept] + keep[::-1]
    return [fields for _, fields in send], ring[-cap:]


# -- rss -------------------------------------------------------------------------

_RSS_SEEN_CAP = 200
_ATOM_NS = "{http://www.w3.org/2005/Atom}"
_RSS1_NS = "{http://purl.org/rss/1.0/}"
_RDF_NS = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_DC_NS = "{http://purl.org/dc/elements/1.1/}"
_XML_BASE = "{http://www.w3.org/XML/1998/namespace}base"


class _RssJob(_HttpJob):
    url_key = "feed_url"
    max_per_tick = 5
    template = "{title}\n{link}"


class _FeedPrologDone(NexoPollerError):
    """The root element began: a feed's prolog was read (internal)."""


def _refuse_entities(data: bytes, url: str) -> None:
    """Refuse a feed whose DOCTYPE declares entities (entity expansion,
    external entities), reading only its prolog, before it is parsed."""
    import xml.parsers.expat

    def entity(*_args) -> None:
        raise PollerError.Permanent(f"{url}: the feed's DOCTYPE declares entities: refused "
                                    "(entity expansion, external entities)")

    def root(*_args) -> None:
        raise _FeedPrologDone()
    parser = xml.parsers.expat.ParserCreate()
    parser.EntityDeclHandler = entity
    parser.UnparsedEntityDeclHandler = entity
    parser.StartElementHandler = root
    try:
        parser.Parse(data, True)
    except _FeedPrologDone:
        return
    except xml.parsers.expat.ExpatError as exc:
        raise PollerError.Transient(f"{url}: not a well-formed feed: {exc}") from None


def _feed_items(data: bytes, url: str) -> list[tuple[str, dict]]:
    """An RSS 2.0, Atom 1.0 or RSS 1.0 (RDF) feed's items in its order:
    (id, template fields); links resolved against the feed URL and
    ``xml:base``; the id is the guid/id (rdf:about), else the link."""
    import xml.etree.ElementTree as ET
    from urllib.parse import urljoin
    _refuse_entities(data, url)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise PollerError.Transient(f"{url}: not a well-formed feed: {exc}") from None

    def text(el, *paths: str) -> str:
        for path in paths:
            found = el.find(path)
            if found is not None:
                return "".join(found.itertext()).strip()
        return ""
    base = urljoin(url, root.get(_XML_BASE, ""))
    out = []
    if root.tag == _ATOM_NS + "feed":
        feed_author = text(root, f"{_ATOM_NS}author/{_ATOM_NS}name")
        for entry in root.iter(_ATOM_NS + "entry"):
            ebase = urljoin(base, entry.get(_XML_BASE, ""))
            link = ""
            for el in entry.findall(_ATOM_NS + "link"):
                if el.get("rel", "alternate") == "alternate" and el.get("href"):
                    link = urljoin(urljoin(ebase, el.get(_XML_BASE, "")), el.get("href").strip())
                    break
            out.append((text(entry, _ATOM_NS + "id") or link, {
                "title": text(entry, _ATOM_NS + "title"), "link": link,
                "summary": text(entry, _ATOM_NS + "summary", _ATOM_NS + "content"),
                "published": text(entry, _ATOM_NS + "published", _ATOM_NS + "updated"),
                "author": text(entry, f"{_ATOM_NS}author/{_ATOM_NS}name") or feed_author}))
    elif root.tag in ("rss", _RDF_NS + "RDF"):
        ns = "" if root.tag == "rss" else _RSS1_NS
        for item in root.iter(ns + "item"):
            link = text(item, ns + "link")
            link = urljoin(base, link) if link else ""
            item_id = text(item, "guid") if not ns else item.get(_RDF_NS + "about", "").strip()
            out.append((item_id or link, {
                "title": text(item, ns + "title"), "link": link,
                "summary": text(item, ns + "description"),
                "published": text(item, "pubDate", _DC_NS + "date"),
                "author": text(item, "author", _DC_NS + "creator")}))
    else:
        raise PollerError.Transient(f"{url}: not an RSS or Atom feed (its root element is "
                                    f"<{_log_safe(root.tag, 100)}>)")
    return [(item_id, {**fields, "id": item_id}) for item_id, fields in out if item_id]


class RssPoller:
    """The ``rss`` kind: fetch ``feed_url`` (RSS 2.0, Atom 1.0, RSS 1.0)
    each tick and deliver its new items, newest first as the feed lists
    them, at most ``max_per_tick``.  The cursor is nexo's
    ``{"seen_ids": [...], "etag": ...}`` (ids of the last 200 items
    delivered or listed) plus ``last_modified``; both go back as
    ``If-None-Match`` / ``If-Modified-Since``, and a 304 is a tick with
    nothing new.  Bounds: see ``_http_fetch``."""

    kind = "rss"
    check = _RssJob

    def tick(self, ctx: PollContext) -> TickAck:
        job = _RssJob(ctx.job_id, ctx.config)
        state, had = job.start(ctx)
        extra = dict(job.conditional)
        if isinstance(state.get("last_modified"), str):
            extra["If-Modified-Since"] = state["last_modified"]
        answer = _http_fetch(job, job.url, extra=extra)
        if answer.status == 304:
            return TickAck(metrics=TickMetrics(0, 0))
        error = _http_status_error(answer)
        if error is not None:
            raise error
        items = _feed_items(answer.body, answer.url)
        send, ring = _pick_new(items, state["seen_ids"], _RSS_SEEN_CAP, job.most, not had)
        cursor = {"seen_ids": ring, "etag": answer.headers.get("ETag"),
                  "last_modified": answer.headers.get("Last-Modified")}
        deliver = job.deliveries(send)
        return TickAck(next_cursor=_dumps(cursor).encode(), deliver=deliver,
                       metrics=TickMetrics(len(items), len(deliver)))


# -- webhook_poll ----------------------------------------------------------------

_WEBHOOK_POLL_SEEN_CAP = 500


class _WebhookPollJob(_HttpJob):
    keys = _HttpJob.keys | {"method", "headers", "body", "items_path", "id_field",
                            "next_path", "max_pages"}

    def __init__(self, job_id: str, config: Any) -> None:
        super().__init__(job_id, config)
        method = self.get("method", "GET", '"GET" or "POST"',
                          lambda v: isinstance(v, str) and v.upper() in ("GET", "POST"))
        self.method = method.upper()
        self.headers = self.get(
            "headers", {}, "an object of header name -> string value (no line breaks)",
            lambda v: isinstance(v, dict) and all(
                isinstance(k, str) and _HTTP_TOKEN_RE.fullmatch(k) and isinstance(s, str)
                and not any(c in s for c in "\r\n\0") for k, s in v.items()))
        self.body = None if self.method == "GET" or config.get("body") is None \
            else _dumps(config["body"]).encode()
        self.items_path = self.get("items_path", "", 'a dotted path ("data.items"; "" for '
                                   "the answer itself)", lambda v: isinstance(v, str))
        self.next_path = self.get("next_path", "", 'a dotted path ("links.next")',
                                  lambda v: isinstance(v, str))
        self.id_field = self.get("id_field", "id", "a field name (default \"id\")",
                                 lambda v: isinstance(v, str) and v != "")
        self.max_pages = self.get("max_pages", _HTTP_MAX_PAGES, "an integer in [1, 100]",
                                  lambda v: _is_int(v) and 1 <= v <= 100)


def _dotted(doc: Any, path: str) -> Any:
    """``doc`` at the dotted ``path`` (``""``: ``doc``; a digit segment
    indexes an array), or None when it is not there."""
    for seg in path.split(".") if path else ():
        if isinstance(doc, dict):
            doc = doc.get(seg)
        elif isinstance(doc, list) and seg.isdigit() and int(seg) < len(doc):
            doc = doc[int(seg)]
        else:
            return None
    return doc


def _link_next(headers) -> str | None:
    """The ``rel="next"`` target of an answer's ``Link`` headers, or None."""
    for value in headers.get_all("Link") or ():
        for target, params in _LINK_RE.findall(value):
            for rel in _LINK_REL_RE.findall(params):
                if "next" in rel.lower().split():
                    return target.strip()
    return None


class WebhookPoller:
    """The ``webhook_poll`` kind: request ``url`` (GET, or POST with
    ``body``) each tick, take the array at ``items_path`` of the JSON answer
    and deliver the items whose ``id_field`` is new, at most
    ``max_per_tick``.  Pages: a ``rel="next"`` ``Link`` header or the URL
    at ``next_path`` in the answer is fetched next (GET), up to
    ``max_pages``.  The cursor is nexo's ``{"seen_ids": [...]}`` (the last
    500), plus the first page's ``etag`` sent back as ``If-None-Match`` (a
    304 is a tick with nothing new).  A 429 or 503 is Transient with its
    ``Retry-After`` as the "not before".  Bounds: see ``_http_fetch``."""

    kind = "webhook_poll"
    check = _WebhookPollJob

    def tick(self, ctx: PollContext) -> TickAck:
        from urllib.parse import urljoin
        job = _WebhookPollJob(ctx.job_id, ctx.config)
        state, had = job.start(ctx)
        extra = {"Accept": "application/json", **job.conditional}
        url, method, body, visited, items, etag = job.url, job.method, job.body, set(), [], None
        while url is not None and len(visited) < job.max_pages:
            visited.add(url)
            answer = _http_fetch(job, url, method=method,
                                 headers=job.headers, body=body, extra=extra)
            if answer.status == 304 and len(visited) == 1:
                return TickAck()
            error = _http_status_error(answer)
            if error is not None:
                raise error
            try:
                doc = _loads(answer.body)
            except (ValueError, RecursionError, UnicodeDecodeError) as exc:
                raise PollerError.Transient(f"{answer.url}: the answer is not JSON: "
                                            f"{_log_safe(exc, 200)}") from None
            found = _dotted(doc, job.items_path)
            if found is not None and not isinstance(found, list):
                raise PollerError.Permanent(
                    f"{answer.url}: items_path {job.items_path!r} is not an array (it is "
                    f"{_json_type(found)})")
            items.extend(found or ())
            if len(visited) == 1:
                etag = answer.headers.get("ETag")
            nxt = _link_next(answer.headers)
            if nxt is None and job.next_path:
                nxt = _dotted(doc, job.next_path)
            url = urljoin(answer.url, nxt) if isinstance(nxt, str) and nxt else None
            if url in visited:
                url = None
            problem = None if url is None else _url_problem(url, job.allow_private)
            if problem:
                raise PollerError.Permanent(f"{answer.url}: next page {_log_safe(url, 200)} "
                                            f"refused: it must be {problem}")
            method, body, extra = "GET", None, {"Accept": "application/json"}
        keyed = []
        for item in items:
            value = item.get(job.id_field) if isinstance(item, dict) else None
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                continue
            fields = {"json": _dumps(item), **item}
            keyed.append((value if isinstance(value, str) else _dumps(value), fields))
        send, ring = _pick_new(keyed, state["seen_ids"], _WEBHOOK_POLL_SEEN_CAP, job.most,
                               not had)
        cursor = {"seen_ids": ring, **({"etag": etag} if etag else {})}
        deliver = job.deliveries(send)
        return TickAck(next_cursor=_dumps(cursor).encode(), deliver=deliver,
                       metrics=TickMetrics(len(items), len(deliver)))


# ---------------------------------------------------------------------------
# The imap and gmail kinds: a mailbox read over IMAP (imaplib), each tick
# under one deadline; ``gmail`` is nexo's gmail job keys served over IMAP.

DEFAULT_MAX_MESSAGE_BYTES = 10 << 20  # an IMAP message or response line, unless set
_MAIL_KEYS = {"host", "port", "tls", "ca_file", "username", "password", "password_file",
              "mailbox", "timeout_secs", "max_message_bytes", "max_per_tick",
              "sender_allowlist", "extract", "require_fields", "message_template",
              "mark_read_on_dispatch", "deliver"}
_MAIL_TIMEOUT_SECS = 60.0
_MAIL_SCAN_PER_TICK = 200     # messages a tick looks at, at most: a mailbox of
#                               filtered-out mail still moves the cursor each tick
_MAIL_SNIPPET_CHARS = 200
_IMAP_ATOM_RE = re.compile(r"[\x20-\x7e]*")          # what a search/mailbox may hold
_ONE_LINE_RE = re.compile(r"[^\x00-\x1f\x7f]*")       # a path, a Gmail query
_NEWER_THAN_RE = re.compile(r"(\d{1,6})([hdmy])")
_NEWER_THAN_UNIT = {"h": 3600, "d": 86400, "m": 30 * 86400, "y": 365 * 86400}
_GMAIL_TERM_RE = re.compile(r'(-?)(?:([a-z_]+):)?("[^"]*"|[^\s"]+)')
_GMAIL_HEADER_OPS = {"from": "FROM", "to": "TO", "cc": "CC", "bcc": "BCC",
                     "subject": "SUBJECT"}
_GMAIL_FLAG_OPS = {"unread": "UNSEEN", "read": "SEEN", "starred": "FLAGGED"}
_INTERNALDATE_RE = re.compile(rb'INTERNALDATE "([^"]+)"')
# Response codes (RFC 5530) of a refusal that may pass: the tick is transient.
_TEMPORARY_IMAP_CODES = ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]",
                         "[EXPUNGEISSUED]")


class _MailJob:
    """An ``imap`` or ``gmail`` job's config, checked: each problem is a
    ``PollerError.Config`` naming its key (unknown keys refused, as nexo's
    ``deny_unknown_fields``)."""

    kind = "imap"
    own_keys = frozenset({"search"})
    mark_read_default = False

    def __init__(self, job_id: str, config: Any) -> None:
        def bad(key: str, what: str) -> PollerError:
            return PollerError.Config(job_id, f"config.{key} must be {what}")

        def text(key: str, default: Any = None, *, required: bool = False,
                 ascii: bool = True) -> Any:
            value = config.get(key, default)
            if (value is None and required) or value is not None and (
                    not isinstance(value, str) or not value
                    or not (_IMAP_ATOM_RE if ascii else _ONE_LINE_RE).fullmatch(value)):
                raise bad(key, "a non-empty string of printable ASCII" if ascii
                          else "a non-empty string (one line)")
            return value

        def strings(key: str) -> list[str]:
            value = config.get(key, [])
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                raise bad(key, "an array of non-empty strings")
            return value

        def number(key: str, default: Any, low: float, high: float, what: str) -> Any:
            value = config.get(key, default)
            if not (_is_int(value) or isinstance(value, float) and what != "an integer") \
                    or not low <= value <= high:
                raise bad(key, f"{what} in [{low}, {high}]")
            return value
        if not isinstance(config, dict):
            raise PollerError.Config(job_id, "config must be an object with host and username")
        allowed = _MAIL_KEYS | self.own_keys
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise PollerError.Config(job_id, f"config.{unknown[0]}: unknown key (allowed: "
                                             f"{', '.join(sorted(allowed))})")
        if self.kind == "gmail" and "host" not in config:     # a nexo gmail job as it was
            raise PollerError.Config(job_id, (
                "config.host is required: the built-in gmail kind reads the mail over IMAP "
                "(host imap.gmail.com, username, an app password), not through Google's "
                "API; or name a plugin serving gmail"))
        self.job_id, self.host = job_id, text("host", required=True)
        if " " in self.host:
            raise bad("host", "a host name or address")
        self.tls = config.get("tls", "implicit")
        if self.tls not in ("implicit", "starttls"):
            raise bad("tls", '"implicit" (TLS from the first byte, port 993) or "starttls" '
                             "(port 143); plain text is not offered")
        self.port = number("port", 993 if self.tls == "implicit" else 143, 1, 65535,
                           "an integer")
        self.ca_file = text("ca_file", ascii=False)
        self.username = config.get("username")
        if not isinstance(self.username, str) or not self.username \
                or any(c in self.username for c in "\r\n\0"):
            raise bad("username", "a non-empty string (no line break)")
        self.password = config.get("password")
        self.password_file = text("password_file", ascii=False)
        if (self.password is None) == (self.password_file is None):
            raise PollerError.Config(job_id, "config needs one of password (a ${file:...} or "
                                             "${VAR} placeholder) or password_file")
        if self.password is not None and (not isinstance(self.password, str) or any(
                c in self.password for c in "\r\n\0")):
            raise bad("password", "a string (no line break)")
        self.mailbox = text("mailbox", "INBOX")
        self.timeout = float(number("timeout_secs", _MAIL_TIMEOUT_SECS, 0.001, 3600,
                                    "a number of seconds"))
        self.max_bytes = number("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, 1024,
                                1 << 30, "an integer")
        self.max_per_tick = number("max_per_tick", 20, 1, 1000, "an integer")
        self.allow = [s.lower() for s in strings("sender_allowlist")]
        self.required = strings("require_fields")
        extract = config.get("extract", {})
        if not isinstance(extract, dict):
            raise bad("extract", "an object of field name -> regular expression")
        self.extract = {}
        for name, pattern in extract.items():
            if not _TEMPLATE_FIELD_RE.fullmatch("{" + name + "}") or not isinstance(pattern, str):
                raise bad(f"extract.{name}", "a regular expression (string) under a name "
                                             "usable as {name} in the template")
            try:
                self.extract[name] = re.compile(pattern)
            except re.error as exc:
                raise bad(f"extract.{name}", f"a valid regular expression ({exc})") from None
        self.template = config.get("message_template", "{from}: {subject}")
        if not isinstance(self.template, str):
            raise bad("message_template", 'a string (default "{from}: {subject}")')
        self.mark_read = config.get("mark_read_on_dispatch", self.mark_read_default)
        if not isinstance(self.mark_read, bool):
            raise bad("mark_read_on_dispatch", "true or false")
        self.deliver = _deliver_to(job_id, config)
        self.search = text("search", "ALL")
        self.query, self.newer_than = text("query", ascii=False), text("newer_than")
        self._check_kind(config, bad)

    def _check_kind(self, config: dict, bad: Callable[[str, str], PollerError]) -> None:
        """The kind's own keys (``imap``: ``search``, checked above)."""

    def where(self) -> str:
        return f"{self.kind} {self.host}:{self.port}"

    def secret(self) -> str:
        """The password: ``password`` as written (the config loader resolved
        its placeholders), or ``password_file``'s first line."""
        if self.password is not None:
            return self.password
        try:
            with open(self.password_file, "rb") as f:
                data = f.read(65536)
        except OSError as exc:
            raise PollerError.Config(self.job_id, f"config.password_file: cannot read "
                                     f"{self.password_file!r}: {exc.strerror or exc}") from None
        return data.decode("utf-8", "replace").split("\n")[0].rstrip("\r")

    def tls_context(self) -> Any:
        """A verifying TLS context: the system's CAs, or only ``ca_file``'s."""
        import ssl
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise PollerError.Config(self.job_id, f"config.ca_file: cannot load "
                                     f"{self.ca_file!r}: {exc}") from None


class _GmailJob(_MailJob):
    """nexo's ``gmail`` job keys (``query``, ``newer_than``, ...) over IMAP."""

    kind = "gmail"
    own_keys = frozenset({"query", "newer_than", "dispatch_delay_ms"})
    mark_read_default = True            # nexo's default

    def _check_kind(self, config: dict, bad: Callable[[str, str], PollerError]) -> None:
        if self.query is None:
            raise bad("query", 'a Gmail search (nexo\'s, e.g. "is:unread subject:lead")')
        if self.newer_than is not None and not _NEWER_THAN_RE.fullmatch(self.newer_than):
            raise bad("newer_than", 'an age such as "2h", "1d", "3m" or "1y"')
        # Accepted for nexo's files; deliveries leave through the outbox,
        # which paces them, so a pause between them inside a tick buys nothing.
        delay = config.get("dispatch_delay_ms", 0)
        if not _is_int(delay) or delay < 0:
            raise bad("dispatch_delay_ms", "a non-negative integer")


def _imap_refusal(text: str) -> PollerError:
    """A server's NO as a tick's error: transient when its response code
    says it may pass, else permanent (a refused login, a missing mailbox)."""
    transient = any(code in text for code in _TEMPORARY_IMAP_CODES)
    return (PollerError.Transient if transient else PollerError.Permanent)(text)


def _imap_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _imap_date(when: datetime) -> str:
    return f"{when.day}-{when.strftime('%b')}-{when.year}"


def _age_secs(text: str) -> int:
    count, unit = _NEWER_THAN_RE.fullmatch(text).groups()
    return int(count) * _NEWER_THAN_UNIT[unit]


def _gmail_as_search(job: _GmailJob, now: datetime) -> tuple[str, datetime | None]:
    """A Gmail ``query`` as IMAP SEARCH criteria, for a server without
    Gmail's X-GM-RAW: the operators IMAP can say (``is:unread``, ``from:``,
    ``subject:``, ``newer_than:`` ...; a bare word searches the text), and
    the oldest INTERNALDATE a ``newer_than`` allows (SINCE counts whole days)."""
    out, cutoff = [], None
    terms = job.query + (f" newer_than:{job.newer_than}" if job.newer_than else "")
    for neg, op, value in _GMAIL_TERM_RE.findall(terms):
        value = value.strip('"')
        if not value.isascii():
            raise PollerError.Config(job.job_id, f"config.query: {value!r}: a term beyond "
                                     "ASCII needs Gmail's X-GM-RAW (this server lacks "
                                     "X-GM-EXT-1)")
        if op in _GMAIL_HEADER_OPS:
            term = f"{_GMAIL_HEADER_OPS[op]} {_imap_quote(value)}"
        elif op == "is" and value in _GMAIL_FLAG_OPS:
            term = _GMAIL_FLAG_OPS[value]
        elif op in ("newer_than", "older_than") and _NEWER_THAN_RE.fullmatch(value):
            edge = now - timedelta(seconds=_age_secs(value))
            if op == "newer_than" and not neg:
                cutoff = edge if cutoff is None else max(cutoff, edge)
            # a day's margin: SINCE and BEFORE read dates in the server's zone
            day = edge - timedelta(days=1) if op == "newer_than" else edge + timedelta(days=1)
            term = f"{'SINCE' if op == 'newer_than' else 'BEFORE'} {_imap_date(day)}"
        elif op in ("after", "before") and re.fullmatch(r"\d{4}/\d{1,2}/\d{1,2}", value):
            try:
                day = datetime.strptime(value, "%Y/%m/%d")
            except ValueError:
                raise PollerError.Config(job.job_id, f"config.query: {op}:{value} is not a "
                                                     "date") from None
            term = f"{'SINCE' if op == 'after' else 'BEFORE'} {_imap_date(day)}"
        elif not op and value.upper() not in ("OR", "AND") and value[:1] not in "({":
            term = f"TEXT {_imap_quote(value)}"
        else:
            raise PollerError.Config(job.job_id, (
                f"config.query: {neg}{op + ':' if op else ''}{value} needs Gmail's X-GM-RAW "
                f"(this server lacks X-GM-EXT-1); over plain IMAP the query may use "
                "is:unread/read/starred, from:, to:, cc:, bcc:, subject:, newer_than:, "
                "older_than:, after:, before:, words and -"))
        out.append(f"NOT {term}" if neg else term)
    if cutoff is not None and cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=timezone.utc)    # a library caller's naive now
    return " ".join(out) or "ALL", cutoff


@functools.cache
def _imap_conn_class() -> type:
    """imaplib.IMAP4 under one deadline and a size bound, made on first use
    (imaplib and ssl are loaded only by a daemon with a mail job)."""
    import imaplib

    class _ImapConn(imaplib.IMAP4):
        """Every read and write is bounded by what is left of the tick (a
        server trickling a byte a second cannot hold it) and by the cancel
        Event; every line and literal by ``max_message_bytes`` (imaplib's
        own bounds: 1 MB a line, nothing on a literal)."""

        def __init__(self, job: _MailJob, deadline: float, cancel: threading.Event,
                     tls: Any) -> None:
            self.job, self.deadline, self.cancel, self.tls = job, deadline, cancel, tls
            self.buf, self.what = bytearray(), "a response"
            super().__init__(job.host, job.port, timeout=self.left())

        def left(self) -> float:
            if self.cancel.is_set():
                raise PollerError.Transient(f"{self.job.where()}: tick cancelled")
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise PollerError.Transient(f"{self.job.where()}: the tick's deadline "
                                            f"passed (timeout_secs={self.job.timeout:g})")
            return left

        def _create_socket(self, timeout: Any) -> socket.socket:
            sock = socket.create_connection((self.host, self.port), self.left())
            if self.job.tls == "implicit":
                try:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                except BaseException:
                    sock.close()
                    raise
            return sock

        def too_big(self, size: int, what: str) -> PollerError:
            return PollerError.Permanent(
                f"{self.job.where()}: {what} is {size} bytes, over config.max_message_bytes="
                f"{self.job.max_bytes}")

        def fill(self, want: int) -> None:
            while True:
                left = self.left()
                self.sock.settimeout(min(left, _CANCEL_POLL_SECS))
                try:
                    data = self.sock.recv(max(65536, min(want, 1 << 20)))
                except TimeoutError:
                    continue                    # left() ends it at the deadline or on cancel
                finally:
                    # A handshake (STARTTLS) runs under the socket's timeout:
                    # give it what is left, which Python counts as a total.
                    self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
                if not data:
                    raise self.abort("the server closed the connection")
                self.buf += data
                return

        def readline(self) -> bytes:
            start = 0
            while (end := self.buf.find(b"\n", start)) < 0:
                if len(self.buf) > self.job.max_bytes:
                    raise self.too_big(len(self.buf), "a response line")
                start = len(self.buf)
                self.fill(65536)
            line = bytes(self.buf[:end + 1])
            del self.buf[:end + 1]
            return line

        def read(self, size: int) -> bytes:
            if size > self.job.max_bytes:
                raise self.too_big(size, self.what)
            while len(self.buf) < size:
                self.fill(size - len(self.buf))
            data = bytes(self.buf[:size])
            del self.buf[:size]
            return data

        def send(self, data: bytes) -> None:
            self.sock.settimeout(self.left())
            try:
                self.sock.sendall(data)
            except TimeoutError:
                self.left()
                raise

    return _ImapConn


class _MailCursor:
    """An imap/gmail job's cursor: the mailbox's UIDVALIDITY, the highest UID
    looked at, and the UIDs this tick delivered that the next tick marks as
    read (only once the cursor naming them is committed)."""

    def __init__(self, uidvalidity: int | None = None, last_uid: int = 0,
                 to_mark: Iterable[int] = ()) -> None:
        self.uidvalidity, self.last_uid, self.to_mark = uidvalidity, last_uid, list(to_mark)

    @classmethod
    def parse(cls, raw: bytes | None, job_id: str, kind: str) -> "_MailCursor":
        if not raw:
            return cls()
        try:
            doc = _loads(raw)
            if kind == "gmail" and isinstance(doc, list):
                return cls()    # nexo's gmail cursor: Gmail message ids, no use over IMAP
            cursor = cls(doc["uidvalidity"], doc["last_uid"], doc.get("to_mark", ()))
            if all(_is_int(n) and n >= 0 for n in
                   (cursor.uidvalidity, cursor.last_uid, *cursor.to_mark)):
                return cursor
        except (ValueError, RecursionError, KeyError, TypeError):
            pass
        raise PollerError.Permanent(f"job {job_id!r}: its cursor is not a mail cursor "
                                    '({"uidvalidity": N, "last_uid": N, "to_mark": [...]}); '
                                    "set one or clear it to start over")

    def encode(self) -> bytes:
        return _dumps({"uidvalidity": self.uidvalidity, "last_uid": self.last_uid,
                       "to_mark": self.to_mark}).encode()


def _mail_fields(raw: bytes, uid: int) -> dict[str, str]:
    """A message's template fields: uid, subject, from, to, date, message_id,
    body (its text, HTML's tags dropped) and snippet (the body's start)."""
    import email
    import email.policy
    import html
    msg = email.message_from_bytes(raw, policy=email.policy.default)

    def header(name: str) -> str:
        try:
            return str(msg.get(name, "") or "")
        except Exception:       # noqa: BLE001 -- a malformed header of a stranger's mail
            return ""
    body = ""
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is not None:
            body = part.get_content()
            if part.get_content_subtype() == "html":
                body = html.unescape(re.sub(r"(?s)<(script|style).*?</\1>|<[^>]+>", " ", body))
    except Exception:           # noqa: BLE001 -- an unknown charset, a broken MIME tree
        body = ""
    return {"uid": str(uid), "subject": header("Subject"), "from": header("From"),
            "to": header("To"), "date": header("Date"), "message_id": header("Message-ID"),
            "body": body, "snippet": " ".join(body.split())[:_MAIL_SNIPPET_CHARS]}


class _MailTick:
    """One tick over an open, logged-in IMAP connection."""

    def __init__(self, job: _MailJob, ctx: PollContext, conn: Any) -> None:
        self.job, self.ctx, self.conn = job, ctx, conn

    def check(self, what: str, answer: tuple) -> list:
        typ, data = answer
        if typ != "OK":
            said = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
            raise _imap_refusal(f"{self.job.where()}: {what}: {typ} {_log_safe(said, 300)}")
        return data

    def run(self, cursor: _MailCursor) -> TickAck:
        job, conn = self.job, self.conn
        self.check(f"select {job.mailbox!r}",
                   conn.select(_imap_quote(job.mailbox), readonly=not job.mark_read))
        uidvalidity, uidnext = self.numbers()
        if cursor.uidvalidity is not None and cursor.uidvalidity != uidvalidity:
            # The mailbox was recreated: its UIDs name other mails now.  Start
            # over from its current end, delivering nothing already there.
            return TickAck(next_cursor=_MailCursor(uidvalidity, uidnext - 1).encode(),
                           metrics=TickMetrics(0, 0))
        if cursor.to_mark and job.mark_read:
            self.check("mark as read", conn.uid(
                "STORE", ",".join(map(str, cursor.to_mark)), "+FLAGS.SILENT", "(\\Seen)"))
        found, cutoff = self.search(cursor.last_uid)
        uids = sorted(n for n in (int(w) for w in b" ".join(found).split())
                      if n > cursor.last_uid)
        last, deliver, delivered, seen = cursor.last_uid, [], [], 0
        for uid in uids[:_MAIL_SCAN_PER_TICK]:
            if len(deliver) == job.max_per_tick:
                break
            last, seen = uid, seen + 1
            item = self.message(uid, cutoff)
            if item is not None and job.deliver is not None:
                deliver.append(Delivery(*job.deliver, {"text": _render(job.template, item)}))
                delivered.append(uid)
        if last == (uids[-1] if uids else last):
            last = max(last, uidnext - 1)   # everything up to the end was looked at
        to_mark = delivered if job.mark_read else []
        return TickAck(next_cursor=_MailCursor(uidvalidity, last, to_mark).encode(),
                       deliver=tuple(deliver), metrics=TickMetrics(seen, len(deliver)))

    def numbers(self) -> tuple[int, int]:
        """The selected mailbox's UIDVALIDITY and UIDNEXT."""
        found = {}
        for key in ("UIDVALIDITY", "UIDNEXT"):
            _, data = self.conn.response(key)
            if data and data[0]:
                found[key] = int(data[0])
        if len(found) < 2:
            data = self.check("status", self.conn.status(_imap_quote(self.job.mailbox),
                                                         "(UIDVALIDITY UIDNEXT)"))
            for key, value in re.findall(rb"(UIDVALIDITY|UIDNEXT) (\d+)", data[0] or b""):
                found[key.decode()] = int(value)
        return found["UIDVALIDITY"], found["UIDNEXT"]

    def search(self, last_uid: int) -> tuple[list, datetime | None]:
        """The UIDs after ``last_uid`` that the job's search matches (SEARCH's
        answer), and the oldest INTERNALDATE a ``newer_than`` lets through."""
        import imaplib
        job, conn, cutoff = self.job, self.conn, None
        criteria, key = job.search, "search"
        if job.kind == "gmail":
            key = "query"
            if "X-GM-EXT-1" in conn.capabilities:
                query = job.query + (f" newer_than:{job.newer_than}" if job.newer_than else "")
                conn.literal = query.encode()       # UTF-8, sent as a literal
                criteria = "X-GM-RAW"
            else:
                criteria, cutoff = _gmail_as_search(job, self.ctx.now)
        charset = "CHARSET UTF-8 " if conn.literal else ""
        try:
            answer = conn.uid("SEARCH", f"{charset}UID {last_uid + 1}:* {criteria}")
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:      # BAD: the criteria, not the network
            raise PollerError.Config(job.job_id, f"config.{key}: the server refused the "
                                     f"search: {_log_safe(exc, 300)}") from None
        return self.check("search", answer), cutoff

    def message(self, uid: int, cutoff: datetime | None) -> dict[str, str] | None:
        """A message's template fields, or None when a filter drops it."""
        job = self.job
        self.conn.what = f"message UID {uid}"
        data = self.check(f"fetch UID {uid}",
                          self.conn.uid("FETCH", str(uid), "(INTERNALDATE BODY.PEEK[])"))
        parts = [d for d in data if isinstance(d, tuple)]
        if not parts:
            return None                     # expunged meanwhile
        meta, raw = parts[0]
        if cutoff is not None and (m := _INTERNALDATE_RE.search(meta)):
            try:
                when = datetime.strptime(m.group(1).decode().strip(), "%d-%b-%Y %H:%M:%S %z")
            except ValueError:
                when = None
            if when is not None and when < cutoff:
                return None
        fields = _mail_fields(raw, uid)
        if job.allow and not any(s in fields["from"].lower() for s in job.allow):
            return None
        for name, regex in job.extract.items():
            m = regex.search(fields["body"]) or regex.search(fields["snippet"])
            fields[name] = "" if m is None else (
                (m.group(1) if regex.groups else m.group(0)) or "").strip()
        if any(not fields.get(name) for name in job.required):
            return None
        return fields


class MailPoller:
    """The ``imap`` kind: new mail in ``mailbox`` (matching ``search``), each
    delivered once as ``message_template``; the cursor is the mailbox's
    UIDVALIDITY and the last UID looked at.  ``mark_read_on_dispatch`` sets
    \\Seen on delivered mail at the start of the next tick, for the UIDs the
    committed cursor names: never before the deliveries are stored.

    One deadline (``timeout_secs``, and the job's own) bounds the whole
    tick; a message or line over ``max_message_bytes`` fails it.  A refused
    login or certificate is permanent, the network transient."""

    kind = "imap"
    check = _MailJob                    # check(job_id, config): raises PollerError.Config

    def tick(self, ctx: PollContext) -> TickAck:
        import imaplib
        import ssl
        job = self.check(ctx.job_id, ctx.config)
        cursor = _MailCursor.parse(ctx.cursor, ctx.job_id, job.kind)
        password, tls = job.secret(), job.tls_context()
        budget = job.timeout if ctx.timeout is None else min(
            job.timeout, ctx.timeout.total_seconds())
        conn, ok = None, False
        try:
            conn = _imap_conn_class()(job, time.monotonic() + budget, ctx.cancel, tls)
            if job.tls == "starttls":
                if "STARTTLS" not in conn.capabilities:
                    raise PollerError.Permanent(f"{job.where()}: the server does not offer "
                                                "STARTTLS (tls: \"implicit\" for port 993?)")
                conn.starttls(tls)
            self._login(job, conn, password)
            ack = _MailTick(job, ctx, conn).run(cursor)
            ok = True
            return ack
        except ssl.SSLCertVerificationError as exc:
            raise PollerError.Permanent(
                f"{job.where()}: TLS certificate verification failed: "
                f"{exc.verify_message or exc} (a private CA: set config.ca_file)") from None
        except (imaplib.IMAP4.error, OSError) as exc:
            raise PollerError.Transient(f"{job.where()}: {_log_safe(exc, 300)}") from None
        finally:
            if conn is not None:
                self._close(conn, ok)

    @staticmethod
    def _close(conn: Any, polite: bool) -> None:
        """LOGOUT after a tick that went well (its failure changes nothing),
        then the socket closed in any case."""
        import imaplib
        try:
            if polite:
                conn.logout()                   # which closes the socket
                return
        except (PollerError, imaplib.IMAP4.error, OSError):
            pass
        try:
            conn.shutdown()
        except OSError:
            pass

    @staticmethod
    def _login(job: _MailJob, conn: Any, password: str) -> None:
        """AUTHENTICATE PLAIN when offered (UTF-8 names and passwords pass
        as they are), else LOGIN."""
        import imaplib
        try:
            if "AUTH=PLAIN" in conn.capabilities:
                conn.authenticate("PLAIN",
                                  lambda _: f"\0{job.username}\0{password}".encode())
            else:
                conn.login(job.username, password)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            raise _imap_refusal(f"{job.where()}: login as {job.username!r} refused: "
                                f"{_log_safe(exc, 300)}") from None


class GmailPoller(MailPoller):
    """The ``gmail`` kind: nexo's gmail job (``query``, ``newer_than``,
    ``sender_allowlist``, ``extract``, ``require_fields``,
    ``mark_read_on_dispatch``, default true) over IMAP: ``query`` goes as
    Gmail's X-GM-RAW when the server has it (X-GM-EXT-1), else as the IMAP
    SEARCH its operators translate to."""

    kind = "gmail"
    check = _GmailJob


# The one registry of built-in kinds: kind -> the poller class serving it.
_BUILTIN_POLLERS: dict[str, type] = {
    cls.kind: cls for cls in (CommandPoller, RssPoller, WebhookPoller, MailPoller, GmailPoller)}
BUILTIN_KINDS = tuple(sorted(_BUILTIN_POLLERS))


def builtin_pollers() -> list:
    """A fresh poller for each built-in kind (what every Runner serves)."""
    return [cls() for cls in _BUILTIN_POLLERS.values()]


def _builtin_config_problem(kind: str, config: Any) -> str | None:
    """What is wrong with a job's ``config`` for built-in ``kind`` (naming
    the key), or None: the check each tick makes, made by ``validate`` too."""
    try:
        _BUILTIN_POLLERS[kind].check("", config)
    except PollerError.Config as exc:
        return exc.reason
    return None


# ============================================================================
# State
# Every job's durable state has one owner: a StateStore.  The Runner and the
# CLI speak to it in JobState records; only the backend speaks SQL.
# Shares: _command_source, _DAEMON_TTL_SECS, _new_owner, _no_history,
#   _NoStateYet, _outbox_share, _pid_alive, _state_backend, _storable, _wake_owner
# ============================================================================

class TickStatus(str, enum.Enum):
    """What one tick came to.  A ``str`` so ``status == "ok"`` still reads."""
    OK = "ok"
    TRANSIENT = "transient"   # failed; back off and retry
    PERMANENT = "permanent"   # failed; the job pauses
    CONFIG = "config"         # failed; the job's configuration is wrong, it pauses
    LEASED = "leased"         # not run: another daemon holds the job's lease
    CANCELLED = "cancelled"   # not run or not kept: the daemon is stopping, or the job was removed
    BUSY = "busy"             # not run: a tick of the job was already running
    UNSTORED = "unstored"     # ran, but its outcome could not be stored

    def __str__(self) -> str:
        return self.value


_ERROR_TEXT_LIMIT = 4096        # bytes of an error message that are stored


def _storable(text: str | None, limit: int = _ERROR_TEXT_LIMIT) -> str | None:
    """Text any backend can store: lone surrogates escaped, length bounded."""
    if text is None:
        return None
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _storable_result(text: str | None, limit: int) -> str | None:
    """A command's result (JSON, a tick's outcome) that a backend keeps in at
    most ``limit`` characters, still JSON: what does not fit (a big cursor, a
    long error) is null, its length in ``omitted``, never cut mid-string."""
    text = _storable(text, 1 << 62)
    if text is None or len(text) <= limit:
        return text
    try:
        result = json.loads(text)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return json.dumps({"error": f"result of {len(text)} characters not kept "
                                    f"(over {limit})"})
    omitted: dict[str, int] = {}            # field -> characters left out
    for key in sorted((k for k, v in result.items() if isinstance(v, str) and len(v) > 256),
                      key=lambda k: -len(result[k])):
        omitted[key], result[key] = len(result[key]), None
        out = json.dumps({**result, "omitted": omitted})
        if len(out) <= limit:
            return out
    return json.dumps({k: result.get(k) for k in ("job", "kind", "outcome")}
                      | {"omitted": {"result": len(text)}})


@dataclasses.dataclass(slots=True)
class JobState:
    """Everything durable about one job: one record per job in any backend.

    ``revision`` is the backend's compare-and-set token; ``lease_owner`` and
    ``lease_until`` say which daemon may tick the job and until when.
    ``next_run_at`` is the next slot as planned under ``schedule_key``; a
    different schedule in the configuration makes it void.
    """
    id: str
    cursor: bytes | None = None
    paused: bool = False
    last_status: str | None = None
    last_error: str | None = None
    consecutive_errors: int = 0
    last_run_at: float | None = None
    next_run_at: float | None = None
    items_seen_total: int = 0
    items_dispatched_total: int = 0
    last_alert_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    schedule_key: str | None = None
    revision: int = 0
    delivered_total: int = 0        # written only by the outbox, never by a commit
    # an operator's pause (pause_command_arg): who, when (wall time), why
    paused_by: str | None = None
    paused_at: float | None = None
    pause_note: str | None = None
    # replace(**changes): a copy with ``changes``; written out below (_state_replacer)


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobState))
_JOB_FIELD_SET = frozenset(_JOB_FIELDS)


class _Unchanged:
    """The default of each argument of ``JobState.replace``: keep the field."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "unchanged"


def _state_replacer() -> Callable[..., JobState]:
    """``JobState.replace``, written out field by field.  A tick makes several
    copies of its job's state; a copy through ``__init__`` (what
    ``dataclasses.replace`` does) costs twice this, and slots (no ``__dict__``
    to copy) keep 100,000 jobs' states 120 bytes each smaller."""
    lines = [f"def replace(self, *, {', '.join(f'{f}=_unset' for f in _JOB_FIELDS)}):",
             '    """A copy with the fields given changed (TypeError for an unknown one)."""',
             "    new = _new(JobState)"]
    lines += [f"    new.{f} = self.{f} if {f} is _unset else {f}" for f in _JOB_FIELDS]
    lines.append("    return new")
    scope = {"_unset": _Unchanged(), "_new": object.__new__, "JobState": JobState}
    exec("\n".join(lines), scope)
    return scope["replace"]


JobState.replace = _state_replacer()

COMMAND_VERBS = ("pause", "resume", "reset", "tick", "cursor")


def cursor_command_arg(cursor: bytes | None, source: str) -> str:
    """The argument of a ``cursor`` command: the new cursor and why (for the history)."""
    return json.dumps({"cursor": None if cursor is None else encode_cursor(cursor),
                       "source": source})


PAUSE_NOTE_MAX_CHARS = 500     # the longest note a pause keeps (and its "by": 200)
_PAUSED_BY_MAX_CHARS = 200


def pause_command_arg(note: str | None, by: str | None, at: float | None = None) -> str:
    """The argument of a ``pause`` command: why (``note``), who (``by``) and
    when (``at``, wall time; default now).  Raises ``InputError`` for a note
    over ``PAUSE_NOTE_MAX_CHARS`` characters or a ``by`` over 200."""
    for what, value, limit in (("note", note, PAUSE_NOTE_MAX_CHARS),
                               ("by", by, _PAUSED_BY_MAX_CHARS)):
        if value is not None and not isinstance(value, str):
            raise InputError(f"a pause {what} must be a string, got {_json_type(value)}")
        if value is not None and len(value) > limit:
            raise InputError(f"a pause {what} is {len(value)} characters; at most {limit} "
                             "characters")
    return json.dumps({"note": note, "by": by, "at": time.time() if at is None else at})


def _command_source(verb: str, arg: str | None) -> str:
    """How a command names itself in the cursor history."""
    if verb == "cursor" and arg:
        try:
            return str(json.loads(arg).get("source") or "set")
        except (ValueError, AttributeError):
            pass
    return verb


def apply_command(state: JobState, verb: str, arg: str | None = None) -> JobState:
    """An operator command applied to a job's state (pure).

    ``tick`` changes nothing here: the owner runs the tick.  ``resume``
    leaves the next slot to the owner's schedule (see ``Runner``).
    ``cursor`` sets the cursor its ``arg`` (``cursor_command_arg``) carries.
    """
    if verb == "cursor":
        try:
            text = json.loads(arg or "")["cursor"]
            return state.replace(cursor=None if text is None else decode_cursor(text))
        except (ValueError, TypeError, KeyError, PluginPollerForwardError) as exc:
            raise InputError(f"bad cursor command argument: {exc}") from None
    if verb == "pause":
        if arg is None:
            return state.replace(paused=True)
        try:
            doc = json.loads(arg)
            pause_command_arg(doc["note"], doc["by"], float(doc["at"]))   # bounded
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"bad pause command argument: {exc}") from None
        return state.replace(paused=True, pause_note=doc["note"], paused_by=doc["by"],
                             paused_at=float(doc["at"]))
    if verb == "resume":
        return state.replace(paused=False, consecutive_errors=0, pause_note=None,
                             paused_by=None, paused_at=None)
    if verb == "reset":
        return state.replace(cursor=None)
    if verb == "tick":
        return state
    raise InputError(f"unknown command {verb!r} (known: {', '.join(COMMAND_VERBS)})")


@dataclasses.dataclass(frozen=True)
class OutboxItem:
    """One message waiting in the outbox: an Event (``body``, JSON) for a topic.

    ``id`` is the Event's id, stable across retries, so a receiver can drop
    a repeat; ``what`` is ``delivery`` or ``alert``.
    """
    id: str
    job: str
    what: str
    topic: str
    body: str
    created_at: float
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None


_OUTBOX_FIELDS = tuple(f.name for f in dataclasses.fields(OutboxItem))


@dataclasses.dataclass(frozen=True)
class Command:
    """An operator command waiting for the daemon that owns its job."""
    seq: int
    job: str
    verb: str
    arg: str | None = None


@dataclasses.dataclass(frozen=True)
class CursorChange:
    """One committed change of a job's cursor, as the state keeps it:
    ``source`` is ``tick``, ``set``, ``rollback N`` or ``reset``."""
    job: str
    cursor: bytes | None
    at: float
    source: str


CURSOR_HISTORY_KEEP = 20        # committed cursors kept per job
RUN_HISTORY_KEEP = 100          # runs kept per job unless run_history says otherwise


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One committed tick of a job, as its run history keeps it.

    ``scheduled_at`` is the slot it ran for (None: an operator's tick,
    ``trigger`` "operator"; a slot's is "schedule", a past slot's that
    ``backfill`` ran "backfill"), ``started_at`` the wall
    clock at its start, ``duration`` the poll's seconds.  A cursor is
    ``{"bytes": n}``, with ``"text"`` when it is short printable text
    (``_run_cursor``), or None for no cursor: never its bytes whole.
    ``stderr`` is the plugin's stderr tail a failed tick's error carries."""
    job: str
    scheduled_at: float | None
    started_at: float
    duration: float
    outcome: str
    error: str | None = None
    items_seen: int = 0
    items_dispatched: int = 0
    cursor_before: dict | None = None
    cursor_after: dict | None = None
    stderr: str | None = None
    trigger: str = "schedule"

    def to_dict(self) -> dict:
        """As ``history --json`` and ``GET /admin/pollers/<id>/runs`` show it."""
        doc = self.stored()
        doc["scheduled_at"], doc["started_at"] = _iso(self.scheduled_at), _iso(self.started_at)
        doc["duration_ms"] = round(doc.pop("duration") * 1000, 3)
        return doc

    def stored(self) -> dict:
        """The record as a backend stores it (JSON; times as epoch seconds).
        Not ``dataclasses.asdict``: it deep-copies, and this runs every tick."""
        return {f: getattr(self, f) for f in _RUN_FIELDS}

    @classmethod
    def from_stored(cls, doc: Mapping[str, Any]) -> "RunRecord":
        return cls(**{f: doc[f] for f in _RUN_FIELDS if f in doc})


_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _new_owner(token: str | None = None) -> str:
    """A new owner id, ``host:pid:token`` (a random token unless given):
    what a daemon's leases and commands carry, and ``_owner_pid`` reads."""
    return f"{socket.gethostname()}:{os.getpid()}:{token or os.urandom(4).hex()}"


def _owner_pid(owner: str | None) -> int | None:
    """The pid of an owner string (``_new_owner``) on this host, else None."""
    if not owner:
        return None
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def _wake_owner(owner: str | None) -> bool:
    """SIGUSR1 to the daemon ``owner`` when it runs on this host: it looks at
    its queued commands and its outbox now (an idle daemon does not poll).
    False when it could not be signalled."""
    pid = _owner_pid(owner)
    # Never this process: a Runner here is poked directly, and SIGUSR1 would
    # end a process that has no handler for it.
    if pid is None or pid == os.getpid() or not hasattr(signal, "SIGUSR1"):
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True


class _NoStateYet(StateError):
    """A read-only open found no state at the location: nothing has run there."""


# A daemon on a shared state is live while its heartbeat is younger than
# this (``daemon_ttl_secs`` in pollers.json): the take-over time after a crash.
_DAEMON_TTL_SECS = 20.0


class StateStore:
    """The one owner of every job's durable state; the interface of a backend.

    Callers (the Runner, the CLI, the admin API) use only these methods.  A
    backend keeps one record per job and must be able to do each write below
    as one compare-and-set of that record: the sqlite backend does it in a
    transaction, the JetStream one on the key's revision.

    Leases: ``claim`` grants a job to this store's ``owner`` and returns the
    state *as committed*, read in the same step that grants it, so a daemon
    that takes a job over ticks from the last committed cursor.  ``commit``
    writes a tick's new state only while the lease is still this owner's.
    Commands: the CLI calls ``command``; when a live daemon holds the job it
    is queued for that daemon (``pending_commands``), otherwise applied at
    once.  Every failure is a ``StateError``; a read-only open of a location
    where nothing ran yet raises it too, saying "no state yet".

    A backend author implements (each raises NotImplementedError here):
    ``from_location`` and ``resolve_location`` (how ``open_state`` and the
    config reach it: add the class to ``_state_backend``), ``load``,
    ``claim``, ``commit``, ``run_history``, ``release``, ``command``,
    ``pending_commands``,
    ``finish_command``, ``command_result``, ``outbox_pending``,
    ``outbox_settle``, ``outbox``, ``outbox_retry``, ``outbox_drop``,
    ``import_states``, ``register_daemon``, ``set_running``, ``daemons``,
    ``unregister_daemon``, ``changed``, ``set_deadline``, ``close``.

    The base provides ``commit_now``, ``outbox_counts`` (override to count
    without reading bodies), ``handed_over`` (never), ``lease_is_stale``,
    ``broker_problem`` (none: override when the backend lives on the broker),
    ``supports``, and a default for each optional capability below.

    Optional capabilities, declared in ``capabilities`` (callers ask
    ``supports(name)``, never for a class; one a backend lacks is reported
    only when it is asked for):

    ``cursor_history``  ``cursor_history`` returns the last committed
                        cursors (``cursor --history``, ``--rollback``);
                        without it the method raises a StateError saying so.
    ``command_watch``   ``watch_commands`` calls ``wake`` when a command is
                        queued from anywhere; without it the call does
                        nothing and the CLI's SIGUSR1 wakes a daemon on
                        this host.
    ``file_identity``   ``check_file`` raises when the storage was deleted
                        or replaced under the store; without it, a no-op.

    ``heartbeat_secs`` (None: no upkeep) says how often ``changed()`` must
    be called to keep this owner's leases live.
    """

    #: Every optional capability a backend may declare (see the docstring).
    CAPABILITIES = frozenset({"cursor_history", "command_watch", "file_identity"})
    #: The ones this backend has.
    capabilities: frozenset[str] = frozenset()

    owner: str
    location: str

    @classmethod
    def supports(cls, capability: str) -> bool:
        """True when this backend declares ``capability`` (one of
        ``CAPABILITIES``); ask the class to know before opening a store."""
        if capability not in cls.CAPABILITIES:
            raise InputError(f"unknown state capability {capability!r} "
                             f"(known: {', '.join(sorted(cls.CAPABILITIES))})")
        return capability in cls.capabilities

    @classmethod
    def resolve_location(cls, text: str, base_dir: str) -> str:
        """``state_db`` as a config gives it, relative to the config's folder,
        as the location to open; ValueError says what is wrong with it."""
        raise NotImplementedError

    @classmethod
    def from_location(cls, location: str, *, readonly: bool = False, owner: str | None = None,
                      broker_url: str | None = None,
                      broker_opts: Mapping[str, Any] | None = None,
                      daemon_ttl: float = _DAEMON_TTL_SECS) -> "StateStore":
        """Open the store at ``location`` (``open_state`` calls it);
        ``daemon_ttl`` is the take-over time where the backend needs one."""
        raise NotImplementedError

    @classmethod
    def broker_problem(cls, broker_url: str | None) -> str | None:
        """What is wrong with ``broker_url`` for this backend (None: nothing;
        the config reports it with the config's other problems)."""
        return None

    def load(self, ids: Iterable[str] | None = None) -> dict[str, JobState]:
        """The committed states of ``ids`` (or of every job); none is created."""
        raise NotImplementedError

    def claim(self, wanted: Mapping[str, float], now: float, *,
              paused_on_boot: Iterable[str] = ()) -> dict[str, JobState]:
        """Take the leases of ``wanted`` (job id -> lease expiry) that are free,
        ours, expired or held by a dead daemon; create missing jobs (paused
        when in ``paused_on_boot``).  Returns the granted jobs' states."""
        raise NotImplementedError

    def commit(self, state: JobState, done: Callable[[Any], None] | None = None, *,
               command: tuple[int, str | None] | None = None,
               outbox: Iterable[OutboxItem] = (), source: str | None = None,
               run: RunRecord | None = None, run_keep: int = RUN_HISTORY_KEEP) -> None:
        """Queue ``state`` for the next durable write, while this owner holds
        the lease.  ``done`` gets True, False (the lease was lost) or a
        StateError.  ``command`` (seq, result) is marked done and ``outbox``
        items are stored in the same write: all of it or none.  ``source``
        says why a changed cursor changed (the history), default: the
        command's verb, else ``tick``.  ``run`` joins the job's run history
        in the same write, which keeps the newest ``run_keep`` (0: none)."""
        raise NotImplementedError

    def commit_now(self, state: JobState, *, command: tuple[int, str | None] | None = None,
                   outbox: Iterable[OutboxItem] = (), source: str | None = None,
                   run: RunRecord | None = None, run_keep: int = RUN_HISTORY_KEEP) -> bool:
        """``commit`` and wait for it: True when stored, False when the lease was lost."""
        box: list = []
        ready = threading.Event()
        self.commit(state, lambda result: (box.append(result), ready.set()), command=command,
                    outbox=outbox, source=source, run=run, run_keep=run_keep)
        ready.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def release(self, ids: Iterable[str] | None = None) -> None:
        """Give up this owner's leases (of ``ids``, or all) so others may take them."""
        raise NotImplementedError

    def command(self, job_id: str, verb: str, *, paused_on_boot: bool = False,
                arg: str | None = None) -> tuple[str | None, int | None]:
        """An operator command: ``(owner, seq)`` when queued for the live daemon
        holding the job, ``(None, None)`` when applied here and now.  ``arg``
        is the verb's argument (``cursor``: ``cursor_command_arg``).  A
        command applied here wakes the live daemons on this state, so one
        that has the job in its configuration re-reads it (``resume``)."""
        raise NotImplementedError

    def pending_commands(self) -> list[Command]:
        """Commands for the jobs this owner holds, oldest first."""
        raise NotImplementedError

    def finish_command(self, seq: int, result: str | None = None) -> None:
        """Mark a command done without a state change (``result`` for the CLI)."""
        raise NotImplementedError

    def command_result(self, seq: int) -> tuple[bool, str | None]:
        """``(done, result)`` of a queued command."""
        raise NotImplementedError

    def outbox_pending(self, limit: int = 500, now: float | None = None) -> list[OutboxItem]:
        """Undelivered items of the jobs this owner holds, for the publisher:
        the head of each job's queue, in order, up to its first item not due
        at ``now`` (default: the time; nothing behind that one may go first),
        jobs with a due head first.  At most ``limit`` in all, shared evenly
        among the jobs, so a job whose queue is long and stuck never hides
        another's due items.  A backend reads ``_outbox_share`` items of each
        job's queue and returns ``_outbox_heads`` of them."""
        raise NotImplementedError

    def unstorable(self, items: Iterable[OutboxItem]) -> str | None:
        """Why one of ``items`` could never be stored (too large for this
        backend), or None.  The runner fails such a tick for good instead of
        retrying a commit that cannot succeed."""
        return None

    def outbox_settle(self, delivered: Iterable[OutboxItem] = (),
                      retry: Iterable[tuple[str, float, str]] = (),
                      dead: Iterable[tuple[OutboxItem, str]] = (), now: float = 0.0) -> None:
        """One write after a publishing pass: remove ``delivered`` (counting
        deliveries into their jobs' ``delivered_total``), reschedule ``retry``
        (id, next attempt, error), move ``dead`` (item, error) to the dead letters."""
        raise NotImplementedError

    def outbox(self, *, dead: bool = False) -> list[OutboxItem]:
        """Every item in the outbox (or among the dead letters), oldest first."""
        raise NotImplementedError

    def outbox_counts(self) -> dict[str, tuple[int, float]]:
        """Undelivered items per job: (how many, the oldest one's
        ``created_at``), for metrics and status, which need no bodies.  A
        backend that can count without reading the items overrides it."""
        counts: dict[str, tuple[int, float]] = {}
        for item in self.outbox():
            n, oldest = counts.get(item.job, (0, item.created_at))
            counts[item.job] = (n + 1, min(oldest, item.created_at))
        return counts

    def outbox_retry(self, ids: Iterable[str] | None = None) -> int:
        """Make items due now, and bring dead letters back (all, or ``ids``)."""
        raise NotImplementedError

    def outbox_drop(self, ids: Iterable[str] | None = None, *, dead: bool = False) -> int:
        """Delete items (all, or ``ids``) from the outbox or the dead letters."""
        raise NotImplementedError

    def import_states(self, states: Iterable[JobState],
                      outbox: Iterable[OutboxItem] = ()) -> tuple[list[str], list[str]]:
        """Copy jobs' states (another store's, say) in with no lease, each with
        its undelivered ``outbox`` items; a job this store has already is left
        alone.  Returns (copied ids, skipped ids)."""
        raise NotImplementedError

    def register_daemon(self, now: float) -> list[str]:
        """Say this owner runs a daemon; returns the other live daemons."""
        raise NotImplementedError

    def set_running(self, ids: Iterable[str]) -> None:
        """Publish which jobs this daemon is ticking right now (for ``status``)."""
        raise NotImplementedError

    def daemons(self) -> dict[str, list[str]]:
        """Live daemons on this state: owner -> the jobs it is ticking."""
        raise NotImplementedError

    def unregister_daemon(self) -> None:
        """Say this owner's daemon has stopped (a clean stop)."""
        raise NotImplementedError

    def leases(self) -> dict[str, tuple[str | None, float | None]]:
        """Every job's lease, ``(owner, until)``.  A backend that can read
        them without the rest of each record overrides it."""
        return {i: (s.lease_owner, s.lease_until) for i, s in self.load().items()}

    def holders(self, now: float) -> dict[str, str]:
        """Which owner holds each job now (job id -> owner): a lease not yet
        expired whose owner is not stale.  A job nobody holds is left out."""
        stale: dict[str, bool] = {}             # one look per owner, not per job
        out = {}
        for job_id, (owner, until) in self.leases().items():
            if not owner or (until or 0) < now:
                continue
            if owner not in stale:
                stale[owner] = self.lease_is_stale(owner)
            if not stale[owner]:
                out[job_id] = owner
        return out

    def changed(self) -> bool:
        """True when another process wrote since the last call: at least
        whenever a command was queued (the Runner then looks at them)."""
        raise NotImplementedError

    #: Seconds between the calls of ``changed()`` this store needs for its
    #: own upkeep (a heartbeat that keeps its leases live), or None.
    heartbeat_secs: float | None = None

    def watch_commands(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (from any thread) whenever another process may have
        queued a command for this owner, so an idle daemon need not poll.  A
        backend that cannot notify does nothing: the CLI wakes the daemon
        with SIGUSR1 instead (sqlite, one host)."""

    def check_file(self) -> None:
        """Raise StateError when the state's storage was deleted or replaced
        under this store (a backend without such a file has nothing to check)."""

    def set_deadline(self, deadline: float | None) -> None:
        """From now on, give up waiting for a locked state at ``deadline``
        (a ``time.monotonic()``): shutdown is bounded."""
        raise NotImplementedError

    def close(self, deadline: float | None = None) -> None:
        """Write what is queued (until ``deadline``, a ``time.monotonic()``), then close."""
        raise NotImplementedError

    def handed_over(self, job_id: str) -> bool:
        """True once after a commit that stored the job's state but gave its
        lease back, so another daemon takes it (spreading jobs); the caller
        must claim the job again before its next tick."""
        return False

    @staticmethod
    def lease_is_stale(owner: str | None) -> bool:
        """True for no owner, or an owner that is a dead process on this host."""
        pid = _owner_pid(owner)
        return not owner or (pid is not None and not _pid_alive(pid))

    def run_history(self, job_id: str, limit: int | None = None) -> list[RunRecord]:
        """A job's last runs, newest first (``limit`` of them, default all
        kept): each stored by the commit of its tick's outcome (``run``)."""
        raise NotImplementedError

    def run_histories(self, job_ids: Iterable[str], limit: int | None = None
                      ) -> dict[str, list[RunRecord]]:
        """``run_history`` of several jobs (the status page's); a backend
        that reads them in fewer round trips overrides it."""
        return {job_id: self.run_history(job_id, limit) for job_id in job_ids}

    def cursor_history(self, job_id: str, limit: int = CURSOR_HISTORY_KEEP
                       ) -> list[CursorChange]:
        """The last committed cursors of a job, newest first (at most
        ``CURSOR_HISTORY_KEEP`` are kept); every commit that changes a cursor
        adds one in the same write.  Capability ``cursor_history``."""
        raise StateError(_no_history(self.location))


def _outbox_share(limit: int, jobs: int) -> int:
    """How many items of each of ``jobs`` queues ``outbox_pending`` reads:
    ``limit`` split evenly, at least the head of each."""
    return max(1, limit // max(1, jobs))


def _outbox_heads(items: Iterable[OutboxItem], now: float, limit: int) -> list[OutboxItem]:
    """What ``outbox_pending`` returns, from ``items`` (each job's in queue
    order): each job's first ``_outbox_share`` items up to and including its
    first one not due at ``now``; the jobs whose head is due first (the
    oldest head first), then the others (the soonest due first); cut at
    ``limit``, which only drops whole jobs' heads when there are more jobs
    than ``limit``."""
    queues: dict[str, list[OutboxItem]] = {}
    for item in items:
        queues.setdefault(item.job, []).append(item)
    share = _outbox_share(limit, len(queues))
    heads = []
    for queue in queues.values():
        queue = queue[:share]
        waiting = next((n for n, i in enumerate(queue) if i.next_attempt_at > now), None)
        heads.append(queue if waiting is None else queue[:waiting + 1])
    heads.sort(key=lambda q: (q[0].next_attempt_at > now, max(q[0].next_attempt_at, now),
                              q[0].created_at))
    return [item for queue in heads for item in queue][:limit]


def _no_history(location: str) -> str:
    """What is said when a cursor history is asked of a state that keeps none."""
    return (f"{location} keeps no cursor history (each job's current record only); "
            "a sqlite state_db keeps one")


class _WriteFailed(NexoPollerError):
    """A write of a batch failed: run the batch again, each write on its own."""


STATE_SCHEMA_VERSION = 2
# The outbox and its dead letters have one shape (a dead letter also has died_at).
_OUTBOX_TABLES = """
CREATE TABLE outbox (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job TEXT NOT NULL,
    what TEXT NOT NULL,
    topic TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT{dead}
);"""
_OUTBOX_SCHEMA = (_OUTBOX_TABLES.format(dead="")
                  + "\nCREATE INDEX outbox_by_job ON outbox (job, n);"
                  + _OUTBOX_TABLES.format(dead=",\n    died_at REAL").replace(
                      "TABLE outbox", "TABLE dead_letters"))
_CURSOR_HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor_history (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    cursor BLOB,
    at REAL NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cursor_history_by_job ON cursor_history (job, n);"""
# The run history (issue 25 item 7): a ring of ``run_history`` rows per job,
# each a run (its RunRecord as JSON) at ``slot`` = its ``seq`` (the job's
# ``runs_next`` when it was written) modulo the ring's size.  A commit
# rewrites one row in place, among its job's own (clustered by job): the
# cheapest bounded write, where an INSERT and a DELETE touch two pages.
_RUNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    job TEXT NOT NULL,
    slot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (job, slot)
) WITHOUT ROWID;"""
# Who paused a job, when, why (JobState.paused_by...).
_PAUSE_NOTE_COLUMNS = ("paused_by TEXT", "paused_at REAL", "pause_note TEXT")
# The tables and columns added to version 2 since it came out: made in place,
# at open, in an older version 2 file (which a version without them still reads).
_ADDED_TABLES = {"cursor_history": _CURSOR_HISTORY_SCHEMA, "runs": _RUNS_SCHEMA}
_ADDED_COLUMNS = {"jobs": ("runs_next INTEGER NOT NULL DEFAULT 0", *_PAUSE_NOTE_COLUMNS),
                  "commands": ("arg TEXT",)}
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    cursor BLOB,
    paused INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_error TEXT,
    consecutive_errors INTEGER NOT NULL DEFAULT 0,
    last_run_at REAL,
    next_run_at REAL,
    items_seen_total INTEGER NOT NULL DEFAULT 0,
    items_dispatched_total INTEGER NOT NULL DEFAULT 0,
    last_alert_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    schedule_key TEXT,
    revision INTEGER NOT NULL DEFAULT 0,
    delivered_total INTEGER NOT NULL DEFAULT 0,
    runs_next INTEGER NOT NULL DEFAULT 0,
    {pause_note_columns}
);
CREATE TABLE commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    verb TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    arg TEXT
);
CREATE TABLE daemons (
    owner TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    running TEXT NOT NULL DEFAULT '[]'
);
""".replace("{pause_note_columns}", ",\n    ".join(_PAUSE_NOTE_COLUMNS)) \
    + _OUTBOX_SCHEMA + "".join(_ADDED_TABLES.values())
# What version 1 lacks; applied in place when a daemon opens an old file
# (then, as in any version 2 file, _add_missing adds _ADDED_TABLES/_COLUMNS).
_MIGRATE_1_TO_2 = """
ALTER TABLE jobs ADD COLUMN schedule_key TEXT;
ALTER TABLE jobs ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN delivered_total INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN result TEXT;
CREATE TABLE daemons (owner TEXT PRIMARY KEY, started_at REAL NOT NULL,
                      running TEXT NOT NULL DEFAULT '[]');
DELETE FROM meta WHERE key='daemon';
UPDATE meta SET value='2' WHERE key='schema_version';
""" + _OUTBOX_SCHEMA
_BUSY_SLICE_MS = 200            # one wait inside sqlite for a lock; we retry around it
_WRITE_PATIENCE_SECS = 30.0     # how long a write waits for a locked database
_READ_PATIENCE_SECS = 2.0       # how long a read waits before it is reported
# Writes per transaction at most: one commit (and its fsync) stays short however
# far the queue has grown, so a reader or another process never waits long for
# the lock, and the ticks that queued first are stored first.
_COMMIT_BATCH_MAX = 256
_SQLITE_RESULT_MAX = 1 << 20    # characters of a command's result kept


class _GroupCommit:
    """Writes queued by many threads and stored by one writer thread in
    batches (group commit): ``write(payloads) -> results`` stores a batch,
    then each write's ``done(result)`` runs; ``stop`` drains it by a deadline.

    A batch is at most ``limit`` writes, with ``key`` at most one per key
    (the rest wait for the next round, in order)."""

    def __init__(self, location: str, name: str, write: Callable[[list], list], *,
                 limit: int = _COMMIT_BATCH_MAX, key: Callable[[Any], Any] | None = None):
        self._location, self._name, self._write = location, name, write
        self._limit, self._key = limit, key
        self._queue: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closing = False

    def put(self, payload: Any, done: Callable[[Any], None] | None) -> None:
        """Queue one write; ``done(True/False/StateError)`` runs once it is stored."""
        with self._cond:
            if self._closing:
                raise StateError(f"{self._location}: state store is closed")
            self._queue.append((payload, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=self._name)
                self._thread.start()
            self._cond.notify()

    def _take(self) -> list:
        """The next batch off the queue (``_cond`` held)."""
        if self._key is None:
            return [self._queue.popleft() for _ in range(min(len(self._queue), self._limit))]
        batch, seen, rest = [], set(), deque()
        # Only the first ``limit`` queued are looked at: a backlog of many
        # commits per key is not scanned whole at every round (quadratic).
        for _ in range(min(len(self._queue), self._limit)):
            item = self._queue.popleft()
            key = self._key(item[0])
            (rest if key in seen else batch).append(item)
            seen.add(key)
        self._queue.extendleft(reversed(rest))
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
            try:
                results = self._write([payload for payload, _ in batch])
            except Exception as exc:                   # never let the writer die
                err = exc if isinstance(exc, StateError) else StateError(
                    f"{self._location}: commit failed: {type(exc).__name__}: {exc}")
                log.error("%s", err)
                results = [err] * len(batch)
            for (_, done), result in zip(batch, results):
                if done is not None:
                    try:
                        done(result)
                    except Exception:
                        log.exception("state callback failed")
            # not kept while waiting for the next: a claim's batch holds every job
            batch = results = done = result = None

    def stop(self, deadline: float | None) -> bool:
        """Store what is queued and stop; wait for the writer until
        ``deadline``.  False (logged) when it is still writing."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            writer = self._thread
        if writer is not None:
            writer.join(None if deadline is None else max(0.0, deadline - time.monotonic()) + 1.0)
            if writer.is_alive():
                log.error("%s: writes still pending at the shutdown deadline are not stored",
                          self._location)
                return False
        return True


class _SqliteFile:
    """One sqlite3 connection to a state file: opened as ours (made, or
    migrated, as needed), watched for being deleted or replaced, a busy or
    locked database retried, and every sqlite error made a StateError."""

    def __init__(self, path: str, readonly: bool):
        self.path, self.readonly = path, readonly
        self.deadline: float | None = None  # retries give up here (shutdown)
        self._lock = threading.Lock()        # the connection is shared by threads
        self._db = self._open()
        self._identity = self.identity()

    def _open(self):
        import sqlite3
        try:
            if self.readonly:
                if not os.path.exists(self.path):
                    raise _NoStateYet(f"{self.path}: no state yet (no daemon has run "
                                     "with this state_db)")
                from urllib.parse import quote
                uri = "file:" + quote(self.path) + "?mode=ro"
                db = sqlite3.connect(uri, uri=True, timeout=_BUSY_SLICE_MS / 1000,
                                     isolation_level=None, check_same_thread=False)
            else:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
                db = sqlite3.connect(self.path, timeout=_BUSY_SLICE_MS / 1000,
                                     isolation_level=None, check_same_thread=False)
        except (OSError, ValueError, sqlite3.Error) as exc:
            raise StateError(f"{self.path}: cannot open state database: {exc}") from None
        try:
            self.retry(lambda: self._prepare(db), _WRITE_PATIENCE_SECS)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db) -> None:
        import sqlite3
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables and not self.readonly:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if not {r[0] for r in db.execute("SELECT name FROM sqlite_master")}:
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                db.execute(statement)
                        db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                   (str(STATE_SCHEMA_VERSION),))
                        db.execute("INSERT INTO meta VALUES ('app', 'nexo-poller')")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                tables = {"meta", *_ADDED_TABLES}
            if "meta" not in tables:
                raise StateError(f"{self.path}: not a nexo-poller state database "
                                 f"(tables: {', '.join(sorted(tables)) or 'none'})")
            version = self._schema_version(db)
            if version == "1" and not self.readonly:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if self._schema_version(db) == "1":
                        for statement in _MIGRATE_1_TO_2.split(";"):
                            if statement.strip():
                                db.execute(statement)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                version = self._schema_version(db)
            if version not in (str(STATE_SCHEMA_VERSION), "1" if self.readonly else None):
                raise StateError(f"{self.path}: unknown state schema version "
                                 f"{version or 'none'} (this nexo-poller reads "
                                 f"version {STATE_SCHEMA_VERSION})")
            if not self.readonly and version == "2":
                self._add_missing(db)               # a version 2 file from before some
            if not self.readonly:
                # Only now that the file is known to be ours may its journal change.
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
        except sqlite3.OperationalError:
            raise                                   # busy or locked: _retry decides
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: corrupt or not a state database: {exc}") from None

    @staticmethod
    def _schema_version(db) -> str | None:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return row[0] if row else None

    def identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def retry(self, fn: Callable, patience: float) -> Any:
        """Run ``fn`` (holding nothing), retrying while the database is busy
        or locked, until ``patience`` seconds or the close deadline pass."""
        import sqlite3
        started = time.monotonic()
        give_up = started + patience
        pause, said = 0.01, False
        while True:
            try:
                return fn()
            except StateError:
                raise
            except sqlite3.OperationalError as exc:
                text = str(exc)
                transient = ("locked" in text or "busy" in text or "locking protocol" in text)
                limit = give_up if self.deadline is None else min(give_up, self.deadline)
                if not transient or time.monotonic() >= limit:
                    raise StateError(f"{self.path}: {text}") from None
                if not said and time.monotonic() - started >= 1.0:
                    said = True             # say so while still trying, not only at the end
                    log.warning("state: %s: %s; retrying for up to %.0fs", self.path, text,
                                limit - started)
                time.sleep(min(pause, max(0.0, limit - time.monotonic())))
                pause = min(pause * 2, 0.2)
            except (sqlite3.Error, ValueError, OverflowError) as exc:
                raise StateError(f"{self.path}: {exc}") from None

    def read_with(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(conn)`` under the connection's lock, retried as a read is."""
        def locked():
            with self._lock:
                return fn(self._db)
        return self.retry(locked, _READ_PATIENCE_SECS)

    def read(self, sql: str, args: tuple = ()) -> list:
        return self.read_with(lambda db: db.execute(sql, args).fetchall())

    def pragma(self, name: str, wait: bool = True):
        """The pragma's value; with ``wait`` False, None at once while a
        transaction holds the connection (a commit batch's fsync can take
        hundreds of ms)."""
        if not wait:
            if not self._lock.acquire(blocking=False):
                return None
            self._lock.release()            # a transaction may start in between: then it waits
        return self.read(f"PRAGMA {name}")[0][0]

    def write_batch(self, batch: list) -> list:
        """One transaction for ``batch``.  A write that fails must not take
        the others with it, but a savepoint around every write costs two
        statements each: so the batch runs plainly, and only when a write
        fails is it rolled back and run again with each write in a savepoint."""
        try:
            return self._transaction(batch, isolated=False)
        except _WriteFailed:
            return self._transaction(batch, isolated=True)

    def _transaction(self, batch: list, isolated: bool) -> list:
        import sqlite3
        results = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for fn in batch:
                    if not isolated:
                        try:
                            results.append(fn(db))
                        except sqlite3.OperationalError as exc:
                            if "locked" in str(exc) or "busy" in str(exc):
                                raise                   # the whole batch is retried
                            raise _WriteFailed from exc
                        except Exception as exc:
                            raise _WriteFailed from exc
                        continue
                    db.execute("SAVEPOINT one")
                    try:
                        results.append(fn(db))
                        db.execute("RELEASE one")
                    except sqlite3.OperationalError as exc:
                        if "locked" in str(exc) or "busy" in str(exc):
                            raise                       # the whole batch is retried
                        db.execute("ROLLBACK TO one")
                        db.execute("RELEASE one")
                        results.append(StateError(f"{self.path}: {exc}"))
                    except Exception as exc:            # this write only; the batch goes on
                        db.execute("ROLLBACK TO one")
                        db.execute("RELEASE one")
                        results.append(exc if isinstance(exc, StateError)
                                       else StateError(f"{self.path}: {exc}"))
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
        return results

    def schema_version_now(self) -> str | None:
        with self._lock:
            return self._schema_version(self._db)

    def table_names(self) -> set[str]:
        return {r[0] for r in self.read("SELECT name FROM sqlite_master WHERE type='table'")}

    @staticmethod
    def _add_missing(db) -> None:
        """Give a version 2 file made before the cursor history, the run
        history or pause notes their tables and columns (idempotent, and
        nothing written when nothing is missing; an older reader ignores them)."""
        def missing() -> list[str]:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type='table'")}
            todo = [sql for name, sql in _ADDED_TABLES.items() if name not in tables]
            for table, columns in _ADDED_COLUMNS.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                todo += [f"ALTER TABLE {table} ADD COLUMN {column}"
                         for column in columns if column.split()[0] not in have]
            return todo

        if not missing():
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql in missing():           # again: another process may have added some
                for statement in sql.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def check_file(self) -> None:
        """Raise StateError when the file was deleted or replaced under us:
        writes to an unlinked file would look durable and be lost."""
        now = self.identity()
        if now != self._identity:
            what = "deleted" if now is None else "replaced by another file"
            raise StateError(f"{self.path}: the state file was {what} while in use; "
                             "nothing written from now on is durable (restart the daemon)")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _sqlite_prune(db, table: str, job_id: str, keep: int) -> None:
    """Keep a job's newest ``keep`` rows of a history ``table``: one bounded
    DELETE (the index on (job, n) finds the cut)."""
    db.execute(f"DELETE FROM {table} WHERE job=? AND n <= (SELECT n FROM {table} "
               "WHERE job=? ORDER BY n DESC LIMIT 1 OFFSET ?)", (job_id, job_id, keep))


def _sqlite_keep_run(db, job_id: str, seq: int, record: str, keep: int) -> None:
    """A run (its RunRecord as JSON, the job's ``runs_next`` its ``seq``)
    into the job's ring of ``keep``, in the commit's transaction; the ring's
    end goes when ``keep`` shrank (0: every run)."""
    if keep > 0:
        db.execute("INSERT OR REPLACE INTO runs (job, slot, seq, record) VALUES (?, ?, ?, ?)",
                   (job_id, seq % keep, seq, record))
        db.execute("UPDATE jobs SET runs_next=? WHERE id=?", (seq + 1, job_id))
    db.execute("DELETE FROM runs WHERE job=? AND slot >= ?", (job_id, keep))


def _sql_outbox_row(item: OutboxItem) -> tuple:
    """An outbox item as the sqlite state's row (long strings bounded)."""
    return tuple(_storable(v, 1 << 24) if isinstance(v, str) else v
                 for v in dataclasses.astuple(item))


def _sql_id_filter(ids: Iterable[str] | None) -> tuple[str, tuple]:
    """A WHERE clause and its arguments for ``ids`` (None: every row)."""
    if ids is None:
        return "", ()
    ids = tuple(ids)
    return f"WHERE id IN ({', '.join('?' * len(ids))})" if ids else "WHERE 0", ids


class _SqliteOutbox:
    """A sqlite state's outbox and dead letters: listed, settled, retried and
    dropped, reading through the file and writing through the store's writer."""

    def __init__(self, file: "_SqliteFile", owner: str, run: Callable[[Callable], Any]):
        self.file, self.owner, self.run = file, owner, run

    def outbox_pending(self, limit: int = 500, now: float | None = None) -> list[OutboxItem]:
        def fn(db):
            jobs = [r[0] for r in db.execute(
                "SELECT id FROM jobs j WHERE lease_owner=? AND "
                "EXISTS (SELECT 1 FROM outbox o WHERE o.job=j.id)", (self.owner,))]
            share = _outbox_share(limit, len(jobs))
            return [row for job in jobs for row in db.execute(
                f"SELECT {', '.join(_OUTBOX_FIELDS)} FROM outbox WHERE job=? "
                "ORDER BY n LIMIT ?", (job, share))]
        rows = self.file.read_with(fn)
        return _outbox_heads([OutboxItem(*r) for r in rows],
                             time.time() if now is None else now, limit)

    def outbox_settle(self, delivered: Iterable[OutboxItem] = (),
                      retry: Iterable[tuple[str, float, str]] = (),
                      dead: Iterable[tuple[OutboxItem, str]] = (), now: float = 0.0) -> None:
        delivered, retry, dead = list(delivered), list(retry), list(dead)
        counts: dict[str, int] = {}
        for item in delivered:
            if item.what == "delivery":
                counts[item.job] = counts.get(item.job, 0) + 1
        fields = ", ".join(_OUTBOX_FIELDS)

        def fn(db):
            db.executemany("DELETE FROM outbox WHERE id=?", [(i.id,) for i in delivered])
            db.executemany("UPDATE jobs SET delivered_total = delivered_total + ? WHERE id=?",
                           [(n, job) for job, n in counts.items()])
            db.executemany("UPDATE outbox SET attempts = attempts + 1, next_attempt_at=?, "
                           "last_error=? WHERE id=?",
                           [(at, _storable(err), i) for i, at, err in retry])
            for item, err in dead:
                db.execute(f"INSERT OR REPLACE INTO dead_letters ({fields}, died_at) "
                           f"SELECT {fields.replace('attempts', 'attempts + 1')}, ? "
                           "FROM outbox WHERE id=?", (now, item.id))
                db.execute("UPDATE dead_letters SET last_error=? WHERE id=?",
                           (_storable(err), item.id))
                db.execute("DELETE FROM outbox WHERE id=?", (item.id,))
        if delivered or retry or dead:
            self.run(fn)

    def outbox(self, *, dead: bool = False) -> list[OutboxItem]:
        table = "dead_letters" if dead else "outbox"
        try:
            rows = self.file.read(f"SELECT {', '.join(_OUTBOX_FIELDS)} FROM {table} ORDER BY n")
        except StateError:
            if self.file.schema_version_now() == "1":
                return []                       # a version 1 file has no outbox
            raise
        return [OutboxItem(*r) for r in rows]

    def outbox_counts(self) -> dict[str, tuple[int, float]]:
        try:
            rows = self.file.read("SELECT job, COUNT(*), MIN(created_at) FROM outbox GROUP BY job")
        except StateError:
            if self.file.schema_version_now() == "1":
                return {}                       # a version 1 file has no outbox
            raise
        return {job: (n, oldest) for job, n, oldest in rows}

    def outbox_retry(self, ids: Iterable[str] | None = None) -> int:
        fields = ", ".join(_OUTBOX_FIELDS)
        where, args = _sql_id_filter(ids)

        def fn(db):
            n = db.execute(f"UPDATE outbox SET next_attempt_at=0 {where}", args).rowcount
            cols = fields.replace("attempts", "0").replace("next_attempt_at", "0")
            n += db.execute(f"INSERT OR IGNORE INTO outbox ({fields}) SELECT {cols} "
                            f"FROM dead_letters {where} ORDER BY n", args).rowcount
            db.execute(f"DELETE FROM dead_letters {where}", args)
            return n
        return self.run(fn)

    def outbox_drop(self, ids: Iterable[str] | None = None, *, dead: bool = False) -> int:
        where, args = _sql_id_filter(ids)
        table = "dead_letters" if dead else "outbox"
        return self.run(lambda db: db.execute(f"DELETE FROM {table} {where}", args).rowcount)


class SqliteStateStore(StateStore):
    """The default backend: one sqlite3 file, WAL, ``synchronous=FULL``.

    Writes from many ticks are grouped into one durable transaction by a
    writer thread; each ``done`` runs after the commit.  A locked database is
    retried in short slices, so ``close(deadline)`` bounds shutdown whatever
    another process does.  ``readonly`` opens an existing file for reading
    only and never creates one (``status``).
    """

    capabilities = frozenset({"cursor_history", "file_identity"})

    @classmethod
    def resolve_location(cls, text: str, base_dir: str) -> str:
        return os.path.normpath(os.path.join(base_dir, text))

    @classmethod
    def from_location(cls, location: str, *, readonly: bool = False, owner: str | None = None,
                      broker_url: str | None = None,
                      broker_opts: Mapping[str, Any] | None = None,
                      daemon_ttl: float = _DAEMON_TTL_SECS) -> "SqliteStateStore":
        return cls(location, readonly=readonly, owner=owner)

    def __init__(self, path: str | os.PathLike, *, owner: str | None = None,
                 readonly: bool = False):
        self.path = self.location = os.path.abspath(os.fspath(path))
        self.owner = owner or _new_owner()
        self.readonly = readonly
        self.file = _SqliteFile(self.path, readonly)
        self._writes = _GroupCommit(self.path, "nexo-state-writer", self._commit_batch)
        self.sql_outbox = _SqliteOutbox(self.file, self.owner, self.run)
        self._data_version = self.file.pragma("data_version")
        self._changed_seen = 0.0            # time.monotonic() of changed()'s last look

    def check_file(self) -> None:
        self.file.check_file()

    def submit(self, fn: Callable, done: Callable | None = None) -> None:
        """Queue ``fn(conn)``; ``done(result_or_StateError)`` runs after the commit.

        The backend's own primitive: callers outside this section use the
        StateStore methods, which are built on it.
        """
        if self.readonly:
            raise StateError(f"{self.path}: opened read-only")
        self._writes.put(fn, done)

    def run(self, fn: Callable) -> Any:
        """Run ``fn(conn)`` in the next transaction and return its result."""
        box: list = []
        ready = threading.Event()
        self.submit(fn, lambda result: (box.append(result), ready.set()))
        ready.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _commit_batch(self, fns: list) -> list:
        """The writer's batch: one transaction (``_SqliteFile.write_batch``)."""
        try:
            self.file.check_file()
            return self.file.retry(lambda: self.file.write_batch(fns), _WRITE_PATIENCE_SECS)
        except StateError as exc:
            raise StateError(f"commit failed: {exc}") from None

    def close(self, deadline: float | None = None) -> None:
        self.file.deadline = deadline
        if not self._writes.stop(deadline):
            return              # the writer thread owns the connection; it is a daemon thread
        self.file.close()

    @staticmethod
    def _states(cur) -> Iterator[JobState]:
        """The JobStates of a ``SELECT * FROM jobs`` as it is read (an older
        file's table may lack columns: they keep their defaults)."""
        columns = [d[0] for d in cur.description]
        known = [(i, f) for i, f in enumerate(columns) if f in _JOB_FIELD_SET]
        for row in cur:
            values = {f: row[i] for i, f in known}
            values["paused"] = bool(values.get("paused"))
            values["revision"] = values.get("revision") or 0
            yield JobState(**values)

    def _rows(self, db, where: str = "", args: tuple = ()) -> dict[str, JobState]:
        return {s.id: s for s in self._states(db.execute(f"SELECT * FROM jobs {where}", args))}

    def _each_row(self, db, ids: Container[str]) -> Iterator[JobState]:
        """The states of the jobs in ``ids``, one at a time, as the table is read."""
        return (s for s in self._states(db.execute("SELECT * FROM jobs")) if s.id in ids)

    @staticmethod
    def _write_state(db, state: JobState, source: str = "tick",
                     old_cursor: Any = _MISSING) -> None:
        """Write a job's record (its row exists); ``delivered_total`` is the outbox's.
        A changed cursor goes into the job's history in the same transaction;
        ``old_cursor`` is the stored one when the caller has just read it."""
        s = state
        if old_cursor is _MISSING:
            old = db.execute("SELECT cursor FROM jobs WHERE id=?", (s.id,)).fetchone()
            old_cursor = s.cursor if old is None else old[0]
        if old_cursor != s.cursor:
            SqliteStateStore._remember_cursor(db, s.id, s.cursor, source)
        db.execute(
            "UPDATE jobs SET cursor=?, paused=?, last_status=?, last_error=?, "
            "consecutive_errors=?, last_run_at=?, next_run_at=?, items_seen_total=?, "
            "items_dispatched_total=?, last_alert_at=?, lease_owner=?, lease_until=?, "
            "schedule_key=?, revision=?, paused_by=?, paused_at=?, pause_note=? WHERE id=?",
            (s.cursor, int(s.paused), _storable(s.last_status), _storable(s.last_error),
             s.consecutive_errors, s.last_run_at, s.next_run_at, s.items_seen_total,
             s.items_dispatched_total, s.last_alert_at, s.lease_owner, s.lease_until,
             s.schedule_key, s.revision, s.paused_by, s.paused_at, s.pause_note, s.id))

    def load(self, ids: Iterable[str] | None = None) -> dict[str, JobState]:
        rows = self.file.read_with(self._rows)
        return rows if ids is None else {i: rows[i] for i in ids if i in rows}

    def claim(self, wanted: Mapping[str, float], now: float, *,
              paused_on_boot: Iterable[str] = ()) -> dict[str, JobState]:
        owner, paused = self.owner, set(paused_on_boot)

        def fn(db):
            db.executemany("INSERT OR IGNORE INTO jobs (id, paused) VALUES (?, ?)",
                           ((i, int(i in paused)) for i in wanted))
            # Row by row: at start every job is claimed, and a table of them
            # all read first would hold every job's state twice at the peak.
            granted = {}
            for s in self._each_row(db, wanted):
                if (s.lease_owner not in (None, owner) and (s.lease_until or 0) >= now
                        and not self.lease_is_stale(s.lease_owner)):
                    continue
                granted[s.id] = s.replace(lease_owner=owner, lease_until=wanted[s.id],
                                          revision=s.revision + 1)
            db.executemany("UPDATE jobs SET lease_owner=?, lease_until=?, revision=? WHERE id=?",
                           ((owner, s.lease_until, s.revision, i) for i, s in granted.items()))
            return granted
        return self.run(fn)

    def commit(self, state: JobState, done: Callable[[Any], None] | None = None, *,
               command: tuple[int, str | None] | None = None,
               outbox: Iterable[OutboxItem] = (), source: str | None = None,
               run: RunRecord | None = None, run_keep: int = RUN_HISTORY_KEEP) -> None:
        owner, items = self.owner, [_sql_outbox_row(i) for i in outbox]
        record = None if run is None else _dumps(run.stored())

        def fn(db):
            row = db.execute("SELECT lease_owner, revision, cursor, runs_next FROM jobs "
                             "WHERE id=?", (state.id,)).fetchone()
            if row is None or row[0] != owner:
                return False                    # another daemon took the job over
            why = source or "tick"
            if command is not None and source is None:
                cmd = db.execute("SELECT verb, arg FROM commands WHERE seq=?",
                                 (command[0],)).fetchone()
                why = _command_source(*cmd) if cmd else why
            self._write_state(db, state.replace(lease_owner=owner, revision=row[1] + 1), why,
                              row[2])
            if command is not None:
                db.execute("UPDATE commands SET done=1, result=? WHERE seq=?",
                           (_storable_result(command[1], _SQLITE_RESULT_MAX), command[0]))
            if items:
                db.executemany(f"INSERT INTO outbox ({', '.join(_OUTBOX_FIELDS)}) "
                               f"VALUES ({', '.join('?' * len(_OUTBOX_FIELDS))})", items)
            if record is not None:
                _sqlite_keep_run(db, state.id, row[3], record, run_keep)
            return True
        self.submit(fn, done)

    def outbox_pending(self, limit: int = 500, now: float | None = None) -> list[OutboxItem]:
        return self.sql_outbox.outbox_pending(limit, now)

    def outbox_settle(self, delivered: Iterable[OutboxItem] = (),
                      retry: Iterable[tuple[str, float, str]] = (),
                      dead: Iterable[tuple[OutboxItem, str]] = (), now: float = 0.0) -> None:
        self.sql_outbox.outbox_settle(delivered, retry, dead, now)

    def outbox(self, *, dead: bool = False) -> list[OutboxItem]:
        return self.sql_outbox.outbox(dead=dead)

    def outbox_counts(self) -> dict[str, tuple[int, float]]:
        return self.sql_outbox.outbox_counts()

    def outbox_retry(self, ids: Iterable[str] | None = None) -> int:
        return self.sql_outbox.outbox_retry(ids)

    def outbox_drop(self, ids: Iterable[str] | None = None, *, dead: bool = False) -> int:
        return self.sql_outbox.outbox_drop(ids, dead=dead)

    def import_states(self, states: Iterable[JobState],
                      outbox: Iterable[OutboxItem] = ()) -> tuple[list[str], list[str]]:
        states, items = list(states), list(outbox)

        def fn(db):
            copied, skipped = [], []
            for s in states:
                if not db.execute("INSERT OR IGNORE INTO jobs (id) VALUES (?)",
                                  (s.id,)).rowcount:
                    skipped.append(s.id)
                    continue
                copied.append(s.id)
                self._write_state(db, s.replace(lease_owner=None, lease_until=None),
                                  "import")
                db.execute("UPDATE jobs SET delivered_total=? WHERE id=?",
                           (s.delivered_total, s.id))
            fresh = set(copied)
            db.executemany(f"INSERT OR IGNORE INTO outbox ({', '.join(_OUTBOX_FIELDS)}) "
                           f"VALUES ({', '.join('?' * len(_OUTBOX_FIELDS))})",
                           [_sql_outbox_row(i) for i in items if i.job in fresh])
            return copied, skipped
        return self.run(fn)

    def release(self, ids: Iterable[str] | None = None) -> None:
        owner = self.owner
        if ids is None:
            self.run(lambda db: db.execute(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=?",
                (owner,)))
        else:
            self.run(lambda db: db.executemany(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL "
                "WHERE id=? AND lease_owner=?", [(i, owner) for i in ids]))

    def command(self, job_id: str, verb: str, *, paused_on_boot: bool = False,
                arg: str | None = None) -> tuple[str | None, int | None]:
        apply_command(JobState(job_id), verb, arg)      # an unknown verb fails here

        def fn(db):
            db.execute("INSERT OR IGNORE INTO jobs (id, paused) VALUES (?, ?)",
                       (job_id, int(paused_on_boot)))
            state = self._rows(db, "WHERE id=?", (job_id,))[job_id]
            holder = state.lease_owner
            if holder and not self.lease_is_stale(holder) and self._daemon_alive(db, holder):
                cur = db.execute("INSERT INTO commands (job, verb, arg) VALUES (?, ?, ?)",
                                 (job_id, verb, arg))
                return holder, cur.lastrowid
            if verb == "tick":
                return None, None                       # nobody to tick it: the caller does
            self._write_state(db, apply_command(state, verb, arg).replace(
                revision=state.revision + 1), _command_source(verb, arg))
            return None, None
        owner, seq = self.run(fn)
        if seq is None and verb != "tick":
            for other in self.daemons():    # sqlite has no notification: a signal each
                if other != self.owner:
                    _wake_owner(other)
        return owner, seq

    def _daemon_alive(self, db, owner: str) -> bool:
        """A lease holder counts as a live daemon while its daemons row exists
        (a clean stop removes it) and, on this host, its process lives."""
        return db.execute("SELECT 1 FROM daemons WHERE owner=?", (owner,)).fetchone() is not None

    def pending_commands(self) -> list[Command]:
        rows = self.file.read("SELECT c.seq, c.job, c.verb, c.arg FROM commands c "
                          "JOIN jobs j ON j.id=c.job "
                          "WHERE c.done=0 AND j.lease_owner=? ORDER BY c.seq", (self.owner,))
        return [Command(*r) for r in rows]

    def finish_command(self, seq: int, result: str | None = None) -> None:
        self.submit(lambda db: db.execute("UPDATE commands SET done=1, result=? WHERE seq=?",
                                          (_storable_result(result, _SQLITE_RESULT_MAX), seq)))

    def command_result(self, seq: int) -> tuple[bool, str | None]:
        rows = self.file.read("SELECT done, result FROM commands WHERE seq=?", (seq,))
        return (True, "command lost") if not rows else (bool(rows[0][0]), rows[0][1])

    def register_daemon(self, now: float) -> list[str]:
        owner = self.owner

        def fn(db):
            others = [r[0] for r in db.execute("SELECT owner FROM daemons WHERE owner != ?",
                                               (owner,))]
            dead = [o for o in others if self.lease_is_stale(o)]
            db.executemany("DELETE FROM daemons WHERE owner=?", [(o,) for o in dead])
            db.execute("INSERT OR REPLACE INTO daemons (owner, started_at) VALUES (?, ?)",
                       (owner, now))
            return [o for o in others if o not in dead]
        return self.run(fn)

    def unregister_daemon(self) -> None:
        owner = self.owner
        self.run(lambda db: db.execute("DELETE FROM daemons WHERE owner=?", (owner,)))

    def set_running(self, ids: Iterable[str]) -> None:
        text, owner = json.dumps(sorted(ids)), self.owner
        self.submit(lambda db: db.execute("UPDATE daemons SET running=? WHERE owner=?",
                                          (text, owner)))

    def leases(self) -> dict[str, tuple[str | None, float | None]]:
        return {i: (o, u) for i, o, u in self.file.read("SELECT id, lease_owner, lease_until "
                                                      "FROM jobs")}

    def daemons(self) -> dict[str, list[str]]:
        try:
            rows = self.file.read("SELECT owner, running FROM daemons")
        except StateError:
            return {}                           # a version 1 file has no daemons table
        return {o: json.loads(r) for o, r in rows if not self.lease_is_stale(o)}

    def changed(self) -> bool:
        # The scheduler asks twice a second while ticks run, and must not wait
        # behind a commit: busy, it looks next time (waiting, after a second).
        version = self.file.pragma("data_version", time.monotonic() - self._changed_seen >= 1)
        if version is None:
            return False                    # what changed is still there next time
        self._changed_seen = time.monotonic()
        changed, self._data_version = version != self._data_version, version
        return changed

    def set_deadline(self, deadline: float | None) -> None:
        self.file.deadline = deadline

    @staticmethod
    def _remember_cursor(db, job_id: str, cursor: bytes | None, source: str) -> None:
        db.execute("INSERT INTO cursor_history (job, cursor, at, source) VALUES (?, ?, ?, ?)",
                   (job_id, cursor, time.time(), _storable(source, 200)))
        _sqlite_prune(db, "cursor_history", job_id, CURSOR_HISTORY_KEEP)

    def run_history(self, job_id: str, limit: int | None = None) -> list[RunRecord]:
        try:
            rows = self.file.read("SELECT record FROM runs WHERE job=? ORDER BY seq DESC "
                                  "LIMIT ?", (job_id, -1 if limit is None else limit))
        except StateError:
            if "runs" in self.file.table_names():
                raise
            return []                       # a file from before the run history: none yet
        return [RunRecord.from_stored(_loads(r[0])) for r in rows]

    def cursor_history(self, job_id: str, limit: int = CURSOR_HISTORY_KEEP
                       ) -> list[CursorChange]:
        try:
            rows = self.file.read("SELECT job, cursor, at, source FROM cursor_history WHERE job=? "
                              "ORDER BY n DESC LIMIT ?", (job_id, limit))
        except StateError:
            if "cursor_history" in self.file.table_names():
                raise
            return []                       # a file from before the history: none yet
        return [CursorChange(*r) for r in rows]


_KV_KEY_SAFE = re.compile(r"[A-Za-z0-9-]")
_KV_KEY_ALL_SAFE = re.compile(r"[A-Za-z0-9-]*")      # a token as it is (one match, per commit)
_JS_WRONG_LAST_SEQUENCE = 10071         # JetStream: the compare-and-set failed
_JS_STREAM_NOT_FOUND = 10059
_JS_NO_MESSAGE = 10037
_KV_DELETED = ("DEL", "PURGE")
_KV_PATIENCE_SECS = 30.0                # how long a write waits out a NATS outage
_KV_CAS_ROUNDS = 8                      # re-reads of a record changed under a write
_KV_COMMANDS_KEPT = 32                  # command results kept in a job's record
_KV_RESULT_MAX = 1 << 16                # characters of each result kept
_KV_RESULTS_BUDGET = 1 << 18            # bytes of results a job's record keeps in all
_KV_COMMAND_KEEP_SECS = 600.0           # a done command's key is removed after this
_KV_OUT_HEADROOM = 1024                 # bytes of an outbox item's publish besides its JSON


_JETSTREAM = "jetstream://"     # the scheme of a JetStream state location
_BUCKET_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _kv_token(text: str) -> str:
    """A job id or owner as one NATS subject token, reversibly: letters,
    digits and ``-`` stay, anything else becomes ``_XX`` (its hex code), so
    ``rss.news:1`` is the key token ``rss_2Enews_3A1``."""
    if _KV_KEY_ALL_SAFE.fullmatch(text):
        return text
    return "".join(c if _KV_KEY_SAFE.fullmatch(c) else
                   "".join(f"_{b:02X}" for b in c.encode()) for c in text)


def _kv_untoken(token: str) -> str:
    return re.sub(rb"_([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  token.encode()).decode("utf-8", "replace")


_RECORD_FIELDS = tuple(f for f in _JOB_FIELDS if f not in ("revision", "cursor"))   # as they are


def _state_record(state: JobState) -> dict:
    rec = {f: getattr(state, f) for f in _RECORD_FIELDS}
    rec["cursor"] = None if state.cursor is None else encode_cursor(state.cursor)
    rec["last_status"], rec["last_error"] = _storable(state.last_status), _storable(state.last_error)
    return rec


def _new_record(state: JobState) -> dict:
    """The KV record of a job the bucket does not hold yet: its state, no commands."""
    return {**_state_record(state), "commands": {}}


def _record_state(job_id: str, rec: Mapping[str, Any], revision: int) -> JobState:
    values = {f: rec.get(f) for f in _JOB_FIELDS if f in rec and f not in ("id", "revision")}
    values["cursor"] = None if rec.get("cursor") is None else decode_cursor(rec["cursor"])
    for f in ("consecutive_errors", "items_seen_total", "items_dispatched_total",
              "delivered_total"):
        values[f] = int(values.get(f) or 0)
    values["paused"] = bool(values.get("paused"))
    return JobState(id=job_id, revision=revision, **values)


def _kept_results(commands: Mapping[str, str | None]) -> dict[str, str | None]:
    """The newest of a job record's command results (seq -> result, oldest
    first) that it keeps: at most ``_KV_COMMANDS_KEPT``, and no more than
    ``_KV_RESULTS_BUDGET`` bytes in all, so that with the rest of the record
    it stays well under a NATS message's max_payload (1 MiB by default)
    and the job's commits go on.  The newest is always kept (at most
    ``_KV_RESULT_MAX`` characters).  The record's copy covers the moment
    between a commit and its command's own key being marked done (with the
    result), which follows the commit."""
    kept, size = [], 0
    for seq, result in reversed(list(commands.items())[-_KV_COMMANDS_KEPT:]):
        size += len(_dumps(seq)) + len(_dumps(result)) + 2
        if kept and size > _KV_RESULTS_BUDGET:
            break
        kept.append((seq, result))
    return dict(reversed(kept))


def _out_key(job_id: str, seq: int, span: str) -> str:
    return f"out.{_kv_token(job_id)}.{seq}.{span}"


def _out_place(key: str) -> tuple[str, int, str] | None:
    """(job token, seq, span) of an ``out.`` key, None for another key."""
    parts = key.split(".")
    if len(parts) != 4 or parts[0] != "out" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2]), parts[3]


def _out_committed(rec: Mapping[str, Any], seq: int, span: str, field: str = "out") -> bool:
    """True when the job record ``rec`` says the outbox item ``seq`` written
    by ``span`` is committed: below the record's next seq, and in the range
    the record gives that writer.  Anything else is an orphan of a commit
    that did not land (a lost lease, a crash before the record's write).
    ``field`` "runs": the same for a run of the run history (``_KvRuns``)."""
    out = rec.get(field) or {}
    if seq >= int(out.get("next") or 0):
        return False
    spans = out.get("spans") or ()
    at = bisect.bisect_right([start for start, _ in spans], seq) - 1
    return at >= 0 and spans[at][1] == span


def _requeued(raw: Mapping[str, Any]) -> dict:
    """A dead letter as an outbox item again: due now, its attempts from 0."""
    return {**{f: raw.get(f) for f in _OUTBOX_FIELDS}, "attempts": 0, "next_attempt_at": 0}


class _KvBucket:
    """A JetStream key-value bucket over a NatsClient: bound or created,
    keys read, listed, written by compare-and-set and purged, each batch
    pipelined and waiting out an outage up to its patience."""

    def __init__(self, bucket: str, client: Any, *, readonly: bool, timeout: float):
        self.bucket, self.location = bucket, f"{_JETSTREAM}{bucket}"
        self.client, self.readonly, self.timeout = client, readonly, timeout
        self.stream, self.prefix = f"KV_{bucket}", f"$KV.{bucket}."
        self.deadline: float | None = None      # no request waits past it (shutdown)

    def api(self, subject: str, body: Any = b"") -> dict:
        """One JetStream API request; its JSON answer (errors included)."""
        deadline = time.monotonic() + _KV_PATIENCE_SECS
        while True:
            try:
                payload, _, status = self.client.request(subject, body, self._wait_secs(),
                                                         raw=True)
                break
            except PluginPollerForwardError as exc:
                if (getattr(exc, "code", None) == BROKER_NO_RESPONDERS
                        and subject.startswith("$JS.API.")):
                    raise StateError(f"{self.location}: JetStream is not enabled on the NATS "
                                     "server (start nats-server with -js)") from None
                if self._give_up(exc, deadline):
                    raise StateError(f"{self.location}: {exc}") from None
        try:
            answer = _loads(payload) if payload else {}
        except ValueError:
            raise StateError(f"{self.location}: JetStream answered {payload[:80]!r}") from None
        return answer if isinstance(answer, dict) else {}

    def _wait_secs(self) -> float:
        """How long one request may wait for its answer: ``timeout``, and
        never past the shutdown deadline (``set_deadline``)."""
        if self.deadline is None:
            return self.timeout
        return max(0.05, min(self.timeout, self.deadline - time.monotonic()))

    def _give_up(self, exc: Exception, deadline: float) -> bool:
        """A failed request: wait for the connection and say retry, or give up."""
        if getattr(exc, "code", None) not in (BROKER_CLOSED, BROKER_TIMEOUT) or self.client.closed.is_set():
            return True
        limit = deadline if self.deadline is None else min(deadline, self.deadline)
        if time.monotonic() >= limit:
            return True
        self.client.connected.wait(max(0.0, min(1.0, limit - time.monotonic())))
        return False

    def bind(self, history: int, replicas: int, max_age: float) -> None:
        """Bind to the bucket, creating it when missing (not when read-only)."""
        info = self.api(f"$JS.API.STREAM.INFO.{self.stream}")
        err = info.get("error")
        if not err:
            return
        if err.get("err_code") != _JS_STREAM_NOT_FOUND:
            raise StateError(f"{self.location}: {err.get('description', err)}")
        if self.readonly:
            raise _NoStateYet(f"{self.location}: no state yet (no bucket {self.bucket!r} "
                             "on the NATS server)")
        config = {"name": self.stream, "subjects": [self.prefix + ">"],
                  "max_msgs_per_subject": int(history), "max_msgs": -1, "max_bytes": -1,
                  "max_age": int(max_age * 1e9), "max_msg_size": -1, "storage": "file",
                  "retention": "limits", "discard": "new", "num_replicas": int(replicas),
                  "duplicate_window": int(min(max_age or 120.0, 120.0) * 1e9),
                  "allow_rollup_hdrs": True, "deny_delete": True, "deny_purge": False,
                  "allow_direct": True}
        answer = self.api(f"$JS.API.STREAM.CREATE.{self.stream}", config)
        err = answer.get("error")
        if err and "already in use" not in str(err.get("description")):   # lost a race: fine
            raise StateError(f"{self.location}: cannot create the bucket: "
                             f"{err.get('description', err)}")

    def _pipelined(self, requests: list, names: list[str], doing: str) -> list[bytes]:
        """Raw requests ``(subject, body, headers)`` sent all before any answer
        is awaited; the answers, in order.  One lost to an outage is sent
        again (a write with the same ``Nats-Msg-Id``: the server drops the
        repeat) until the connection is back or patience runs out."""
        answers: list = [None] * len(requests)
        todo = list(range(len(requests)))
        deadline = time.monotonic() + _KV_PATIENCE_SECS
        while todo:
            replies = self.client.request_many([requests[i] for i in todo], self._wait_secs())
            retry = []
            for i, reply in zip(todo, replies):
                if isinstance(reply, Exception):
                    if self._give_up(reply, deadline):
                        raise StateError(f"{self.location}: {doing} {names[i]}: {reply}")
                    retry.append(i)
                    continue
                answers[i] = reply[0]
            todo = retry
        return answers

    def get_many(self, keys: list[str]) -> dict[str, tuple[dict | None, int]]:
        """The last value of each key (read after write): key -> (JSON or None
        when absent or deleted, revision; 0 when never written)."""
        subject = f"$JS.API.STREAM.MSG.GET.{self.stream}"
        keys = list(keys)
        answers = self._pipelined([(subject, {"last_by_subj": self.prefix + k}, None)
                                   for k in keys], keys, "reading")
        return {key: self._decode_get(key, payload) for key, payload in zip(keys, answers)}

    def _decode_get(self, key: str, payload: bytes) -> tuple[dict | None, int]:
        try:
            answer = _loads(payload)
            err = answer.get("error")
            if err:
                if err.get("err_code") == _JS_NO_MESSAGE or err.get("code") == 404:
                    return None, 0
                raise StateError(f"{self.location}: reading {key}: {err.get('description')}")
            msg = answer["message"]
            seq = int(msg["seq"])
            if msg.get("hdrs"):
                _, _, fields = _nats_parse_headers(base64.b64decode(msg["hdrs"]))
                if fields.get("KV-Operation", [""])[0] in _KV_DELETED:
                    return None, seq
            value = _loads(base64.b64decode(msg.get("data") or b""))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise StateError(f"{self.location}: {key} holds a bad record: {exc}") from None
        if not isinstance(value, dict):
            raise StateError(f"{self.location}: {key} holds a bad record")
        return value, seq

    def keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (deleted ones included: they read as absent).
        STREAM.INFO lists at most a page of subjects (100,000 on nats-server),
        sorted, and says how many match (``total``): read page after page."""
        keys: set[str] = set()
        while True:
            info = self.api(f"$JS.API.STREAM.INFO.{self.stream}",
                             {"subjects_filter": f"{self.prefix}{prefix}>",
                              "offset": len(keys)})
            if info.get("error"):
                raise StateError(f"{self.location}: {info['error'].get('description')}")
            page = (info.get("state") or {}).get("subjects") or {}
            before = len(keys)
            keys.update(s[len(self.prefix):] for s in page)
            # A key removed between two pages shifts the rest one place back:
            # a page that adds nothing new ends the listing.
            if len(keys) == before or len(keys) >= int(info.get("total") or 0):
                return sorted(keys)

    def purge(self, keys: Iterable[str], upto: Mapping[str, int] | None = None) -> None:
        """Remove keys with their history (daemons gone, old commands, outbox
        items done with), pipelined: a delete marker would stay a subject
        that every listing reads.  A key in ``upto`` loses only its revisions
        up to the one given (the one read): a value another process wrote
        since stays."""
        keys = list(keys)
        upto = upto or {}
        subject = f"$JS.API.STREAM.PURGE.{self.stream}"
        if self.readonly and keys:
            raise StateError(f"{self.location}: opened read-only")
        # "seq" purges the filtered messages below it.
        answers = self._pipelined([(subject, {"filter": self.prefix + k, "seq": upto[k] + 1}
                                    if k in upto else {"filter": self.prefix + k}, None)
                                   for k in keys], keys, "removing")
        for key, payload in zip(keys, answers):
            try:
                err = (_loads(payload) or {}).get("error")
            except (ValueError, AttributeError):
                err = {"description": repr(payload[:80])}
            if err:
                raise StateError(f"{self.location}: removing {key}: "
                                 f"{err.get('description', err)}")

    def put_many(self, writes: list[tuple[str, dict | None, int | None]]) -> list:
        """Compare-and-set writes ``(key, value or None to delete, expected
        revision or None for any)``, pipelined: each is its new revision, or
        False when the key's revision was not the expected one."""
        if not writes:
            return []
        if self.readonly:
            raise StateError(f"{self.location}: opened read-only")
        requests = []
        for key, value, expected in writes:
            headers = {"Nats-Msg-Id": _uuid4()}
            if expected is not None:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
            if value is None:
                headers["KV-Operation"] = "DEL"
            requests.append((self.prefix + key, b"" if value is None else
                             _dumps(value).encode(), headers))
        results: list = []
        answers = self._pipelined(requests, [w[0] for w in writes], "writing")
        for (key, _, _), payload in zip(writes, answers):
            try:
                ack = _loads(payload)
            except ValueError:
                raise StateError(f"{self.location}: JetStream answered "
                                 f"{payload[:80]!r}") from None
            err = ack.get("error") if isinstance(ack, dict) else {"description": ack}
            if err:
                if err.get("err_code") == _JS_WRONG_LAST_SEQUENCE:
                    results.append(False)
                    continue
                raise StateError(f"{self.location}: writing {key}: "
                                 f"{err.get('description', err)}")
            results.append(int(ack["seq"]))
        return results

    def update(self, key: str, change: Callable[[dict | None], dict | None | bool],
                seen: tuple[dict | None, int] | None = None) -> tuple[Any, int]:
        """Read-modify-write one key until its compare-and-set holds.  ``change``
        gets the current value and returns the new one (None deletes it), or
        False to write nothing, or (the new one, writes to make before it).
        Returns (the new value or False, revision)."""
        for _ in range(_KV_CAS_ROUNDS):
            value, rev = seen if seen is not None else self.get_many([key])[key]
            new = change(None if value is None else json.loads(json.dumps(value)))
            if new is False:
                return False, rev
            if isinstance(new, tuple):
                new, first = new
                self.put_many(first)
            got = self.put_many([(key, new, rev)])[0]
            if got is not False:
                return new, got
            seen = None
        raise StateError(f"{self.location}: {key} keeps changing; gave up after "
                         f"{_KV_CAS_ROUNDS} attempts")

    def last_revision(self, prefix: str) -> int:
        """The newest revision of any key under ``prefix`` (0: none)."""
        answer = self.api(f"$JS.API.STREAM.MSG.GET.{self.stream}",
                          {"last_by_subj": self.prefix + prefix + ">"})
        return (answer.get("message") or {}).get("seq", 0)

    def key_at(self, seq: int) -> str:
        """The key written at revision ``seq`` ("" when gone)."""
        answer = self.api(f"$JS.API.STREAM.MSG.GET.{self.stream}", {"seq": int(seq)})
        subject = (answer.get("message") or {}).get("subject") or ""
        return subject[len(self.prefix):] if subject.startswith(self.prefix) else ""

    def watch(self, prefix: str, wake: Callable[[], None]) -> None:
        """Call ``wake()`` at each write under ``prefix``: a KV put is a
        publish on the key's subject, so a plain subscription sees it."""
        self.client.subscribe(self.prefix + prefix + ">", lambda _body: wake(), answer=False)


class _KvOutbox:
    """A JetStream state's outbox: each undelivered item one key beside its
    job's record, which says which of them are committed; listed, settled,
    retried and dropped, and dead letters under their own keys."""

    def __init__(self, kv: _KvBucket, *, held: Callable[[], list[str]],
                 note_revision: Callable[[str, int], None]):
        self._kv = kv
        self._held, self._note_revision = held, note_revision    # the leases'
        self._span = os.urandom(4).hex()         # this store's outbox seqs are out.*.<seq>.<span>
        self._lock = threading.Lock()            # the listing below
        self._out_seen: dict[str, tuple] = {}    # item id -> (key, revision, value) as listed

    def forget_listed(self) -> None:
        """Forget what was listed (items settled by other processes): the next
        settle of an item lists its job again."""
        with self._lock:
            self._out_seen.clear()

    def _committed(self, ids: Iterable[str] | None) -> tuple[dict[str, dict], dict[str, list]]:
        """The records of the jobs ``ids`` (or of every job) by key token, and
        the keys of their committed outbox items, ``[(seq, key)]`` in seq
        order, by job token."""
        job_keys = self._kv.keys("job.") if ids is None else ["job." + _kv_token(i) for i in ids]
        records = {key[4:]: rec for key, (rec, _) in self._kv.get_many(job_keys).items()
                   if rec is not None}
        found: dict[str, list] = {}
        for key in self._kv.keys("out.") if records else ():
            place = _out_place(key)
            if place and place[0] in records and _out_committed(records[place[0]], *place[1:]):
                found.setdefault(place[0], []).append((place[1], key))
        for items in found.values():
            items.sort()
        return records, found

    def outbox_counts(self) -> dict[str, tuple[int, float]]:
        # Counted from the key listing: only each job's first item is read,
        # for its created_at, so a long sink outage does not make status and
        # metrics read every body.
        records, found = self._committed(None)
        firsts = self._kv.get_many([items[0][1] for items in found.values()])
        counts = {}
        for token, rec in records.items():
            old = rec.get("outbox") or ()  # an older version's record, not claimed since
            items = found.get(token, ())
            if not old and not items:
                continue
            first = firsts[items[0][1]][0] if items else None
            # None: delivered since the listing; the next look has it right
            times = [float(raw["created_at"]) for raw in old[:1]] + (
                [float(first["created_at"]) if first else time.time()] if items else [])
            counts[_kv_untoken(token)] = (len(old) + len(items), min(times))
        return counts

    def _outbox_entries(self, ids: Iterable[str] | None = None,
                        limit: int | None = None) -> list[OutboxItem]:
        """The committed outbox items of the jobs ``ids`` (or of every job), in
        order per job (their seq), interleaved oldest first; with ``limit``,
        only the first ``_outbox_share`` of each job's.  Each is remembered
        as listed (key, revision, value) for the writes that settle it."""
        records, found = self._committed(ids)
        per_job = None if limit is None else _outbox_share(limit, len(found))
        chosen = []
        for token in found:
            chosen.extend(found[token][:per_job])
        values = self._kv.get_many([key for _, key in chosen])
        rows = []                            # (job token, seq, key, revision, value)
        for token, rec in records.items():
            old = rec.get("outbox") or ()    # an older version's record, not claimed since
            rows.extend((token, n - len(old), None, 0, raw) for n, raw in enumerate(old))
        for seq, key in chosen:
            value, rev = values[key]
            if value is not None:            # None: delivered or dropped since the listing
                rows.append((key.split(".")[1], seq, key, rev, value))
        rows.sort(key=lambda r: (r[0], r[1]))
        # Oldest first across jobs, never out of seq order within one: an
        # item sorts by the latest created_at of its job's items up to it.
        ordered, latest = [], {}
        for token, seq, key, rev, value in rows:
            latest[token] = max(latest.get(token, float("-inf")), float(value["created_at"]))
            ordered.append((latest[token], token, seq, key, rev, value))
        ordered.sort(key=lambda r: r[:3])
        with self._lock:
            if len(self._out_seen) > 100_000:
                self._out_seen.clear()       # forget items settled by other processes

            for *_, key, rev, value in ordered:
                self._out_seen[value["id"]] = (key, rev, value)
        return [OutboxItem(**{f: r[5].get(f) for f in _OUTBOX_FIELDS}) for r in ordered]

    def outbox_pending(self, limit: int = 500, now: float | None = None) -> list[OutboxItem]:
        held = self._held()
        if not held:
            return []
        return _outbox_heads(self._outbox_entries(held, limit),
                             time.time() if now is None else now, limit)

    def _listed(self, items: Iterable[OutboxItem]) -> list[tuple]:
        """(key, revision, value) of outbox items as last listed (an older
        version's record: no key); the jobs of items not listed yet are."""
        items = list(items)
        with self._lock:
            unseen = {i.job for i in items if i.id not in self._out_seen}
        if unseen:
            self._outbox_entries(unseen)
        with self._lock:
            return [self._out_seen[i.id] for i in items if i.id in self._out_seen]

    def outbox_settle(self, delivered: Iterable[OutboxItem] = (),
                      retry: Iterable[tuple[str, float, str]] = (),
                      dead: Iterable[tuple[OutboxItem, str]] = (), now: float = 0.0) -> None:
        delivered, retry, dead = list(delivered), list(retry), list(dead)
        # A dead letter is written before its item leaves the outbox: a
        # failure in between leaves it in both (the next pass moves it again,
        # onto the same key), never in neither.
        self._kv.put_many([("dead." + _kv_token(item.id),
                         {**dataclasses.asdict(item), "attempts": item.attempts + 1,
                          "last_error": _storable(error), "died_at": now}, None)
                        for item, error in dead])
        # A retry rewrites its item on the revision listed: an item delivered
        # or dropped since is not brought back.  One the store forgot (past
        # 100,000 remembered items) is looked up again in the jobs held, as
        # _listed does: else its backoff would be lost.
        with self._lock:
            forgotten = any(i not in self._out_seen for i, _, _ in retry)
        held = self._held()
        if forgotten and held:
            self._outbox_entries(held)
        with self._lock:
            later = [(*self._out_seen[i], at, err) for i, at, err in retry if i in self._out_seen]
        rewrites = [(key, {**value, "attempts": int(value.get("attempts") or 0) + 1,
                           "next_attempt_at": at, "last_error": _storable(err)}, rev)
                    for key, rev, value, at, err in later if key]
        for (key, value, _), rev in zip(rewrites, self._kv.put_many(rewrites)):
            if rev is not False:
                with self._lock:
                    self._out_seen[value["id"]] = (key, rev, value)
        gone = delivered + [item for item, _ in dead]
        self._kv.purge(key for key, _, _ in self._listed(gone) if key)
        with self._lock:
            for item in gone:
                self._out_seen.pop(item.id, None)
        counted: dict[str, int] = {}
        for item in delivered:
            counted[item.job] = counted.get(item.job, 0) + (item.what == "delivery")
        for job_id in sorted({item.job for item in gone}):
            token, orphans = _kv_token(job_id), []

            def change(rec):
                if rec is None:
                    return False
                out = rec.get("out") or {}
                spans, nxt = out.get("spans") or [], int(out.get("next") or 0)
                keep = spans
                if len(spans) > 1:
                    # The writer changed (a take-over, a retry): forget the
                    # spans below the oldest item left, and remove the orphans
                    # below the next seq (commits that did not land; a commit
                    # in flight writes at or past it).
                    places = [(key, p) for key in self._kv.keys(f"out.{token}.")
                              for p in [_out_place(key)] if p]
                    left = [p[1] for _, p in places if _out_committed(rec, *p[1:])]
                    orphans[:] = [key for key, p in places
                                  if p[1] < nxt and not _out_committed(rec, *p[1:])]
                    head = min(left, default=nxt)
                    keep = [span for n, span in enumerate(spans)
                            if n + 1 == len(spans) or spans[n + 1][0] > head]
                if not counted.get(job_id) and keep == spans:
                    return False
                return {**rec, "out": {**out, "spans": keep},
                        "delivered_total": int(rec.get("delivered_total") or 0)
                        + counted.get(job_id, 0)}
            new, rev = self._kv.update("job." + token, change)
            self._kv.purge(orphans)
            if new is not False:
                self._note_revision(job_id, new, rev)

    def outbox(self, *, dead: bool = False) -> list[OutboxItem]:
        if not dead:
            return self._outbox_entries()
        recs = [r for r, _ in self._kv.get_many(self._kv.keys("dead.")).values() if r]
        return sorted((OutboxItem(**{f: r.get(f) for f in _OUTBOX_FIELDS}) for r in recs),
                      key=lambda i: (i.created_at, i.id))

    def _dead_letters(self, want: set[str] | None) -> dict[str, tuple[dict, int]]:
        """The dead letters (all, or those with an id in ``want``) by key,
        with their revisions."""
        keys = self._kv.keys("dead.") if want is None else ["dead." + _kv_token(i) for i in want]
        return {key: (rec, rev) for key, (rec, rev) in self._kv.get_many(keys).items()
                if rec and (want is None or rec.get("id") in want)}

    def outbox_retry(self, ids: Iterable[str] | None = None) -> int:
        want = None if ids is None else set(ids)
        pending = self._outbox_entries()
        due = [(key, {**value, "next_attempt_at": 0}, rev)
               for key, rev, value in self._listed(pending)
               if key and (want is None or value["id"] in want)]
        count = sum(rev is not False for rev in self._kv.put_many(due))
        # A dead letter is queued again (at the end of its job's outbox)
        # before its key is removed: an interruption leaves it in both places
        # at worst, and a retry after that does not queue it twice.
        have = {item.id for item in pending}
        letters: dict[str, list] = {}
        read = self._dead_letters(want)
        for key, (rec, _) in read.items():
            letters.setdefault(rec.get("job") or "", []).append((key, rec))
        done = []
        for job_id, found in sorted(letters.items()):
            found.sort(key=lambda kr: (kr[1].get("created_at") or 0, kr[1]["id"]))
            fresh = [_requeued(rec) for _, rec in found if rec["id"] not in have]

            def change(rec, fresh=fresh, job_id=job_id):
                if rec is None:
                    return False             # no such job any more: the letters stay
                out, first = self.with_out(rec, job_id, fresh)
                return {**rec, "out": out}, first
            if fresh and self._kv.update("job." + _kv_token(job_id), change)[0] is False:
                continue
            done.extend(key for key, _ in found)
            count += len(found)
        # Only the letters read: the daemon may deliver a re-queued item at
        # once, and should it die again, its new letter must stay.
        self._kv.purge(done, upto={key: read[key][1] for key in done})
        return count

    def outbox_drop(self, ids: Iterable[str] | None = None, *, dead: bool = False) -> int:
        want = None if ids is None else set(ids)
        if dead:
            gone = list(self._dead_letters(want))
        else:
            gone = [key for key, _, value in self._listed(self._outbox_entries())
                    if key and (want is None or value["id"] in want)]
        self._kv.purge(gone)
        return len(gone)

    def with_out(self, rec: Mapping[str, Any], job_id: str, items: list[dict]
                  ) -> tuple[dict, list]:
        """``items`` appended to a job's outbox: the record's new ``out`` and
        the writes of the items' own keys, to be made before the record's
        compare-and-set.  An item too large for one NATS message is a
        StateError naming the job: retrying could never store it."""
        out = rec.get("out") or {}
        nxt = int(out.get("next") or 0)
        spans = [list(span) for span in out.get("spans") or ()]
        if items and (not spans or spans[-1][1] != self._span):
            spans.append([nxt, self._span])
        writes = []
        for n, item in enumerate(items):
            value = {**item, "seq": nxt + n}
            problem = self._too_large(value)
            if problem:
                raise StateError(f"{self._kv.location}: {problem}")
            writes.append((_out_key(job_id, nxt + n, self._span), value, None))
        return {"next": nxt + len(items), "spans": spans}, writes

    def _too_large(self, value: Mapping[str, Any]) -> str | None:
        """Why the outbox item ``value`` cannot be one NATS message, or None."""
        most = getattr(self._kv.client, "max_payload", 1 << 20)
        size = len(_dumps(value))
        if size <= most - _KV_OUT_HEADROOM:
            return None
        return (f"job {value.get('job')}: {value.get('what')} {value.get('id')} is {size} "
                f"bytes, over what one NATS message holds (the server's max_payload of "
                f"{most} bytes, less {_KV_OUT_HEADROOM} for its key): it cannot be stored")

    def unstorable(self, items: Iterable[OutboxItem]) -> str | None:
        for item in items:
            problem = self._too_large({**dataclasses.asdict(item), "seq": 0})
            if problem:
                return problem
        return None


def _run_key(job_id: str, slot: int) -> str:
    return f"run.{_kv_token(job_id)}.{slot}"


class _KvRuns:
    """A JetStream state's run history: a ring of ``run_keep`` keys per job,
    ``run.<id>.<seq % run_keep>``, each a run with its seq and its writer's
    span, as the outbox's items have.  The job record's ``runs`` (the next
    seq, the keep, the writers' spans) says which are committed: a run key
    is written in the same pipelined round as its job's record, so the run
    history costs a tick no extra round trip, and the ring is its pruning."""

    def __init__(self, kv: _KvBucket, span: str):
        self._kv, self._span = kv, span

    def with_run(self, rec: Mapping[str, Any], job_id: str, run: RunRecord, keep: int
                 ) -> tuple[dict, list, list[str]]:
        """``run`` added to a job's history: the record's new ``runs``, the
        write of the run's key, and the keys to remove once the record is
        written (the ring's end when ``keep`` shrank).  A run past a
        shrunk or grown ring may take the place of one still in it."""
        runs = rec.get("runs") or {}
        nxt, was = int(runs.get("next") or 0), int(runs.get("keep") or 0)
        gone = [_run_key(job_id, slot) for slot in range(max(keep, 0), was)]
        if keep <= 0:
            return {"next": nxt, "keep": 0, "spans": []}, [], gone
        spans = [list(span) for span in runs.get("spans") or ()]
        if not spans or spans[-1][1] != self._span:
            spans.append([nxt, self._span])
        low = nxt + 1 - keep                 # the oldest seq the ring holds after this run
        spans = [span for n, span in enumerate(spans)
                 if n + 1 == len(spans) or spans[n + 1][0] > low]
        value = {**run.stored(), "seq": nxt, "span": self._span}
        return ({"next": nxt + 1, "keep": keep, "spans": spans},
                [(_run_key(job_id, nxt % keep), value, None)], gone)

    def histories(self, job_ids: Iterable[str], limit: int | None
                  ) -> dict[str, list[RunRecord]]:
        """The runs of each job, newest first: two pipelined rounds in all
        (the records, then the runs' keys they name)."""
        job_ids = list(job_ids)
        records = self._kv.get_many(["job." + _kv_token(j) for j in job_ids])
        wanted: dict[str, list[tuple[int, str]]] = {}       # job -> [(seq, key)]
        for job_id in job_ids:
            runs = (records["job." + _kv_token(job_id)][0] or {}).get("runs") or {}
            nxt, keep = int(runs.get("next") or 0), int(runs.get("keep") or 0)
            wanted[job_id] = [(seq, _run_key(job_id, seq % keep)) for seq in
                              range(nxt - 1, max(nxt - keep, 0) - 1, -1)][:limit]
        got = self._kv.get_many([key for pairs in wanted.values() for _, key in pairs])
        out: dict[str, list[RunRecord]] = {}
        for job_id, pairs in wanted.items():
            rec = records["job." + _kv_token(job_id)][0]
            # Not this seq's, or not its committed writer's: an orphan, or overwritten.
            out[job_id] = [RunRecord.from_stored(value) for seq, key in pairs
                           for value in [got[key][0]]
                           if value and value.get("seq") == seq
                           and _out_committed(rec, seq, value.get("span"), "runs")]
        return out


class _KvDaemons:
    """The daemons sharing a JetStream state: this one's heartbeat record
    (with the jobs it runs), which are live, and whose leases went stale
    with their daemon's heartbeat."""

    def __init__(self, kv: _KvBucket, owner: str, ttl: float):
        self._kv, self._owner, self.ttl = kv, owner, ttl
        self.registered = False
        self.live = 0                            # live daemons at the last look (0: not one)
        self._last_beat = 0.0
        self._running: list[str] = []
        self._started_at = 0.0
        self._seen: tuple[float, dict] | None = None    # (monotonic, records)

    def records(self, max_age: float = 0.0) -> dict[str, dict]:
        """Every daemon's record; one read at most ``max_age`` seconds old will do."""
        cached = self._seen
        if cached is not None and time.monotonic() - cached[0] <= max_age:
            return cached[1]
        got = self._kv.get_many(self._kv.keys("daemon."))
        records = {_kv_untoken(k[len("daemon."):]): v for k, (v, _) in got.items()
                   if v is not None}
        self._seen = (time.monotonic(), records)
        return records

    def fresh(self, rec: Mapping[str, Any] | None) -> bool:
        return rec is not None and time.time() - float(rec.get("heartbeat") or 0) <= self.ttl

    def stale_owners(self, daemons: Mapping[str, dict]) -> Callable[[str | None], bool]:
        """``lease_is_stale`` for this backend: no owner, or an owner whose
        daemon heartbeat went stale.  An owner with no daemon record (a CLI
        ``tick``, or a daemon that stopped cleanly and released) is left to
        its lease's expiry."""
        return lambda owner: not owner or (owner in daemons and not self.fresh(daemons[owner]))

    def lease_is_stale(self, owner: str | None) -> bool:
        if not owner:
            return True
        return self.stale_owners(self.records())(owner)

    def beat(self) -> None:
        rec = {"owner": self._owner, "started_at": self._started_at, "heartbeat": time.time(),
               "running": self._running}
        self._kv.put_many([("daemon." + _kv_token(self._owner), rec, None)])
        self._last_beat = time.monotonic()
        daemons = self.records()
        self.live = max(1, sum(1 for r in daemons.values() if self.fresh(r)))

    def register(self, now: float) -> list[str]:
        daemons = self.records()
        stale = [o for o, r in daemons.items() if o != self._owner and not self.fresh(r)]
        self._kv.purge("daemon." + _kv_token(o) for o in stale)
        self._started_at, self.registered = now, True
        self.beat()
        return sorted(o for o, r in daemons.items() if o != self._owner and self.fresh(r))

    def unregister(self) -> None:
        self.registered = False
        self._kv.purge(["daemon." + _kv_token(self._owner)])

    def set_running(self, ids: Iterable[str]) -> None:
        self._running = sorted(ids)
        if self.registered:
            self.beat()

    def running(self) -> dict[str, list[str]]:
        return {o: list(r.get("running") or []) for o, r in self.records().items()
                if self.fresh(r)}

    def beat_due(self) -> bool:
        """A registered daemon's heartbeat is a quarter of ``ttl`` old."""
        return self.registered and time.monotonic() - self._last_beat >= self.ttl / 4

    def count_live(self, daemons: Mapping[str, dict]) -> None:
        """Note how many of ``daemons`` (a fresh read) are live."""
        if self.registered:
            self.live = max(1, sum(1 for r in daemons.values() if self.fresh(r)))


class _KvCommands:
    """Operator commands on a JetStream state: queued under ``cmd.`` keys
    for a live holder, else applied to the job's record at once; a result
    is read back from the job record that carries it."""

    def __init__(self, kv: _KvBucket, peers: _KvDaemons, owner: str,
                 held: Callable[[], list[str]]):
        self._kv, self._peers, self._owner, self._held = kv, peers, owner, held

    def key_of(self, seq: int) -> str:
        """The key of command ``seq`` (its creating revision): the stream says."""
        key = self._kv.key_at(seq)
        return key[4:] if key.startswith("cmd.") else ""

    def command(self, job_id: str, verb: str, *, paused_on_boot: bool = False,
                arg: str | None = None) -> tuple[str | None, int | None]:
        apply_command(JobState(job_id), verb, arg)      # an unknown verb fails here
        key = "job." + _kv_token(job_id)
        seen = self._kv.get_many([key])[key]
        rec = seen[0]
        holder = None if rec is None else rec.get("lease_owner")
        if holder:
            daemons = self._peers.records()
            if holder in daemons and self._peers.fresh(daemons[holder]):
                token = os.urandom(8).hex()
                seq = self._kv.put_many([("cmd." + token, {"job": job_id, "verb": verb, "arg": arg,
                                                        "done": False, "result": None}, 0)])[0]
                return holder, seq
        if verb == "tick":
            return None, None                           # nobody to tick it: the caller does

        def change(rec):
            if rec is None:
                rec = _new_record(JobState(job_id, paused=paused_on_boot))
            state = apply_command(_record_state(job_id, rec, 0), verb, arg)
            # Applied here, the command takes the lease from a holder that is
            # not live (a daemon stalled past daemon_ttl, a CLI tick): should
            # it wake up, its next commit finds the lease gone and is dropped,
            # instead of writing its paused flag and cursor back over this.
            return {**rec, **_state_record(state), "delivered_total": rec.get("delivered_total", 0),
                    "lease_owner": None, "lease_until": None}
        self._kv.update(key, change, seen)
        # Stored done, it wakes every daemon watching the command keys (a
        # daemon that has the job re-reads it) and is removed as any done one.
        self._kv.put_many([("cmd." + os.urandom(8).hex(), {
            "job": job_id, "verb": verb, "arg": arg, "done": True, "result": "applied",
            "done_at": time.time()}, 0)])
        return None, None

    def pending(self) -> list[Command]:
        keys = self._kv.keys("cmd.")
        if not keys:
            return []
        held = set(self._held())
        cmds, old = [], []
        for key, (rec, rev) in self._kv.get_many(keys).items():
            if rec and not rec.get("done") and rec.get("job") in held:
                cmds.append((rec["job"], rev, rec))
            elif rec is None or (rec.get("done") and time.time() - float(
                    rec.get("done_at") or 0) > _KV_COMMAND_KEEP_SECS):
                old.append(key)              # done long ago: nobody waits for its result
        if old and self._peers.registered:
            self._kv.purge(old)
        if not cmds:
            return []
        records = self._kv.get_many(sorted({"job." + _kv_token(c[0]) for c in cmds}))
        out = []
        for job_id, seq, rec in cmds:
            # Not done yet, so written once: its revision is the seq it was created with.
            done = (records.get("job." + _kv_token(job_id), (None, 0))[0] or {}).get("commands") or {}
            if str(seq) not in done:
                out.append(Command(seq, job_id, rec["verb"], rec.get("arg")))
        return sorted(out, key=lambda c: c.seq)

    def finish(self, seq: int, result: str | None) -> None:
        key = self.key_of(seq)
        if not key:
            return
        self._kv.update("cmd." + key, lambda rec: False if rec is None else
                     {**rec, "done": True, "result": _storable_result(result, _KV_RESULT_MAX),
                      "done_at": time.time()})

    def result(self, seq: int) -> tuple[bool, str | None]:
        key = self.key_of(seq)
        if not key:
            return True, "command lost"
        rec, _ = self._kv.get_many(["cmd." + key])["cmd." + key]
        if rec is None:
            return True, "command lost"
        if rec.get("done"):
            return True, rec.get("result")
        job = "job." + _kv_token(rec.get("job") or "")
        done = (self._kv.get_many([job])[job][0] or {}).get("commands") or {}
        return (True, done[str(seq)]) if str(seq) in done else (False, None)


class _KvLeases:
    """Which jobs' leases this daemon holds in a JetStream state, spread
    across the live daemons: claimed while under its share, released, and
    the surplus handed back one commit at a time."""

    def __init__(self, kv: _KvBucket, peers: _KvDaemons, outbox: _KvOutbox, owner: str):
        self._kv, self._peers, self._outbox, self._owner = kv, peers, outbox, owner
        self._lock = threading.Lock()            # the sets below
        # job id -> (record, revision) as this owner last wrote or read it: a
        # commit sets its compare-and-set on it without reading first.
        self._seen: dict[str, tuple[dict, int]] = {}
        self._held: set[str] = set()             # jobs whose lease this owner holds
        self._handed: set[str] = set()           # committed with the lease handed back
        self._known: set[str] = set()            # every job id claimed here (for the cap)

    def _cap(self) -> int | None:
        """How many jobs this daemon may hold (None: no cap, one daemon)."""
        live = self._peers.live
        if not self._peers.registered or live <= 1:
            return None
        return math.ceil(len(self._known) / live) + 1

    def claim(self, wanted: Mapping[str, float], now: float, *,
              paused_on_boot: Iterable[str] = ()) -> dict[str, JobState]:
        paused = set(paused_on_boot)
        with self._lock:
            self._known.update(wanted)
        # Heartbeats go stale after daemon_ttl: a look an eighth of that old will do,
        # which saves two round trips on the claim a runner makes for each slot
        # of a job another daemon holds.
        daemons = self._peers.records(self._peers.ttl / 8)
        stale = self._peers.stale_owners(daemons)
        self._peers.count_live(daemons)
        keys = {i: "job." + _kv_token(i) for i in wanted}
        got = self._kv.get_many(list(keys.values()))
        cap = self._cap()
        order = list(wanted)
        random.shuffle(order)                # a random order: daemons do not collide
        order.sort(key=lambda i: (got[keys[i]][0] or {}).get("lease_owner") != self._owner)
        held = len(self._held - set(wanted))
        granted: dict[str, JobState] = {}
        # A record changed between the read and the write (this daemon's own
        # publisher settling a delivery, another daemon's claim) is read
        # again and tried once more, a few rounds: a lease still free or ours
        # is not given up for a slot; one another daemon took is skipped.
        for _ in range(_KV_CAS_ROUNDS):
            writes, moved = [], []
            for job_id in order:
                rec, rev = got[keys[job_id]]
                holder = None if rec is None else rec.get("lease_owner")
                if holder != self._owner:
                    if holder and (rec.get("lease_until") or 0) >= now and not stale(holder):
                        continue
                    if cap is not None and held >= cap:
                        continue
                if rec is None:
                    rec = _new_record(JobState(job_id, paused=job_id in paused))
                rec = {**rec, "lease_owner": self._owner, "lease_until": wanted[job_id]}
                if "outbox" in rec:          # an older version kept the items in the record
                    rec["out"], first = self._outbox.with_out(rec, job_id, rec.pop("outbox") or [])
                    moved.extend(first)
                writes.append((keys[job_id], rec, rev))
                held += 1
            self._kv.put_many(moved)
            results = self._kv.put_many(writes)
            order = []
            with self._lock:
                for (key, rec, _), rev in zip(writes, results):
                    job_id = rec["id"]
                    if rev is False:         # changed since read: read again
                        order.append(job_id)
                        held -= 1
                        continue
                    self._seen[job_id] = (rec, rev)
                    self._held.add(job_id)
                    self._handed.discard(job_id)
                    granted[job_id] = _record_state(job_id, rec, rev)
            if not order:
                break
            got.update(self._kv.get_many([keys[i] for i in order]))
        return granted

    def handed_over(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._handed:
                self._handed.discard(job_id)
                return True
        return False

    def release(self, ids: Iterable[str] | None = None) -> None:
        with self._lock:
            mine = set(self._held) if ids is None else set(ids) & self._held
        # Every lease in one pipelined round (read all, then compare-and-set
        # all), not a read-modify-write per job: at shutdown a thousand jobs
        # on a NATS 10 ms away would take 20 s.  A record changed in between
        # (a commit, the outbox) is read again, in the next round, until the
        # deadline; what is left then expires on its own.
        keys = {"job." + _kv_token(i): i for i in mine}
        for _ in range(_KV_CAS_ROUNDS):
            if not keys:
                break
            got = self._kv.get_many(sorted(keys))
            writes = [(key, {**rec, "lease_owner": None, "lease_until": None}, rev)
                      for key, (rec, rev) in got.items()
                      if rec is not None and rec.get("lease_owner") == self._owner]
            results = self._kv.put_many(writes)
            with self._lock:
                for (key, _, _), rev in zip(writes, results):
                    if rev is not False:
                        self._held.discard(keys[key])
                for key, (rec, _) in got.items():
                    if rec is None or rec.get("lease_owner") != self._owner:
                        self._held.discard(keys[key])       # not ours any more
            keys = {w[0]: keys[w[0]] for w, rev in zip(writes, results) if rev is False}
            if self._kv.deadline is not None and time.monotonic() >= self._kv.deadline:
                break
        if keys:
            raise StateError(f"{self._kv.location}: {len(keys)} leases not released "
                             "(their records kept changing)")

    def held(self) -> list[str]:
        """The jobs whose lease this store holds, sorted."""
        with self._lock:
            return sorted(self._held)

    def note_revision(self, job_id: str, rec: dict, rev: int) -> None:
        """A held job's record was rewritten (the outbox settled): ``rec`` at ``rev``."""
        with self._lock:
            if job_id in self._held:
                self._seen[job_id] = (rec, rev)

    def seen(self, job_id: str) -> tuple[dict, int] | None:
        """A held job's record and revision as this owner last wrote or read
        them (None: not known).  Maybe stale: a compare-and-set on it fails
        if the record changed since, and the caller reads it then."""
        with self._lock:
            return self._seen.get(job_id) if job_id in self._held else None

    def holds(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._held

    def surplus(self) -> int:
        """How many more leases than its share this daemon holds (0: none)."""
        cap = self._cap()
        with self._lock:
            return 0 if cap is None else max(0, len(self._held) - cap)

    def committed(self, job_id: str, rec: dict, rev: int, kept: bool) -> None:
        """A commit of ``job_id`` landed (``rec`` at ``rev``), the lease ``kept``
        or handed back."""
        with self._lock:
            self._seen[job_id] = (rec, rev)
            if not kept:
                self._held.discard(job_id)
                self._handed.add(job_id)
        if not kept:
            log.info("job %s handed back for another daemon to take "
                     "(this one holds more than its share)", job_id)

    def lost(self, job_id: str) -> None:
        """Another daemon holds ``job_id``'s lease now."""
        with self._lock:
            self._held.discard(job_id)
            self._seen.pop(job_id, None)


class JetStreamStateStore(StateStore):
    """Job state in a JetStream key-value bucket, for daemons on several machines.

    The bucket is the stream ``KV_<bucket>`` on ``$KV.<bucket>.>``, created
    when missing (``history`` revisions kept per key, ``replicas``,
    ``max_age``; discard new, rollups allowed, direct get) or bound to as it
    is.  Keys (a job id or owner is one subject token, see ``_kv_token``):

    ``job.<id>``      one record per job: the JobState (cursor base64), the
                      results of the last commands applied to it
                      (``commands``) and which outbox items are committed
                      (``out``: the next seq, and the spans of seqs each
                      writer was given).  One compare-and-set on this key's
                      revision commits a tick's cursor, its command and its
                      outbox items.
    ``out.<id>.<seq>.<span>`` one undelivered outbox item of a job: seqs run
                      on per job, in tick order and in order within a tick;
                      ``span`` is the writing store's random token.  A
                      commit writes its items' keys first and the record
                      second (KV has no multi-key transaction): an item
                      whose seq and span the record does not cover is an
                      orphan of a commit that did not land, ignored, and
                      overwritten by the writer's next commit.  Outside the
                      record, the outbox is bounded by the bucket, not by a
                      record's ``max_payload``.
    ``cmd.<token>``   an operator command queued for the owner; its seq is
                      the revision that created it.  Marked done after the
                      job record that carries its result (a crash between
                      the two leaves it done in the record, never run twice).
    ``daemon.<owner>`` a daemon's heartbeat and running jobs.  A pid on
                      another host cannot be checked: a daemon is live
                      while its heartbeat (``daemon_ttl``) is fresh, and a
                      lease whose owner's heartbeat went stale is free.
    ``dead.<item id>`` a dead letter; written before its item leaves the
                      outbox, and removed only after a retry queued it again.
    ``run.<id>.<n>``  one run of the job's run history, a ring of
                      ``run_keep`` keys (``_KvRuns``); the record's ``runs``
                      says which are committed.

    Deletes are ``KV-Operation: DEL`` markers, read as absent.  Writes are
    publishes to ``$KV.<bucket>.<key>`` with ``Nats-Expected-Last-Subject-
    Sequence`` (compare-and-set; 0 = only if absent) and a ``Nats-Msg-Id``
    (a retry after a lost connection is deduplicated by the server), read
    back from the PubAck, whose ``seq`` is the key's new revision.  Commits
    are grouped: a writer thread sends every queued commit's compare-and-set
    before awaiting any ack, each on the revision the store last wrote or
    read (``_KvLeases.seen``): a record is read only when that write fails.

    Spreading: a daemon takes a free or expired job only while it holds
    fewer than ``ceil(jobs / live daemons) + 1``, visiting candidates in a
    random order; a daemon holding more than that hands the surplus back
    with the commit of their next tick (the state is stored, the lease left
    free), so a daemon that joins gets its share as slots come, without a
    stampede.
    """

    capabilities = frozenset({"command_watch"})

    @classmethod
    def resolve_location(cls, text: str, base_dir: str) -> str:
        if not _BUCKET_NAME.fullmatch(text[len(_JETSTREAM):]):
            raise InputError(f"a JetStream state is {_JETSTREAM}<bucket>, the bucket name of "
                             "letters, digits, '-' and '_'")
        return text                              # a bucket, not a path

    @classmethod
    def from_location(cls, location: str, *, readonly: bool = False, owner: str | None = None,
                      broker_url: str | None = None,
                      broker_opts: Mapping[str, Any] | None = None,
                      daemon_ttl: float = _DAEMON_TTL_SECS) -> "JetStreamStateStore":
        problem = cls.broker_problem(broker_url)
        if problem:
            raise StateError(f"{location}: {problem}, got {broker_url or 'none'}")
        return cls(location[len(_JETSTREAM):], broker_url, readonly=readonly, owner=owner,
                   broker_opts=broker_opts, daemon_ttl=daemon_ttl)

    @classmethod
    def broker_problem(cls, broker_url: str | None) -> str | None:
        return None if _is_nats(broker_url) else \
            'a jetstream:// state needs a NATS broker ("broker": "nats://host:4222")'

    def __init__(self, bucket: str, broker_url: str | None = None, *, client=None,
                 owner: str | None = None, readonly: bool = False, history: int = 5,
                 replicas: int = 1, max_age: float = 0.0, timeout: float = 5.0,
                 daemon_ttl: float = _DAEMON_TTL_SECS,
                 broker_opts: Mapping[str, Any] | None = None):
        if not _BUCKET_NAME.fullmatch(bucket or ""):
            raise StateError(f"{_JETSTREAM}{bucket}: a bucket name is letters, digits, "
                             "'-' and '_'")
        self.bucket, self.location = bucket, f"{_JETSTREAM}{bucket}"
        self.owner = owner or _new_owner()
        self.readonly, self.daemon_ttl = readonly, daemon_ttl
        self._own_client = client is None
        if client is None:
            if not broker_url:
                raise StateError(f"{self.location}: a JetStream state needs a NATS broker "
                                 "(broker_url nats://...)")
            try:
                client = NatsClient.connect(broker_url, **{"name": "nexo-poller-state",
                                                           **dict(broker_opts or {})})
            except PluginPollerForwardError as exc:
                raise StateError(f"{self.location}: {exc}") from None
        self.client = client
        self.kv = _KvBucket(bucket, client, readonly=readonly, timeout=timeout)
        # The outbox lists the jobs this daemon holds; leases migrate old outboxes.
        self.kv_outbox = _KvOutbox(self.kv, held=lambda: self.claims.held(),
                                   note_revision=lambda *a: self.claims.note_revision(*a))
        self.peers = _KvDaemons(self.kv, self.owner, daemon_ttl)
        self.claims = _KvLeases(self.kv, self.peers, self.kv_outbox, self.owner)
        self.commands = _KvCommands(self.kv, self.peers, self.owner, self.claims.held)
        self.kv_runs = _KvRuns(self.kv, os.urandom(4).hex())
        self._seen_cmd_seq: int | None = None
        # One commit per job per round: two commits of one job never race.
        self._writes = _GroupCommit(self.location, "nexo-state-kv-writer", self._commit_batch,
                                    key=lambda payload: payload[0].id)
        try:
            self.kv.bind(history, replicas, max_age)
        except BaseException:
            if self._own_client:
                self.client.close()
            raise


    @property
    def heartbeat_secs(self) -> float | None:
        return self.daemon_ttl / 4 if self.peers.registered else None

    def watch_commands(self, wake: Callable[[], None]) -> None:
        # Every command queued, from any host, as it is queued.
        self.kv.watch("cmd.", wake)

    def load(self, ids: Iterable[str] | None = None) -> dict[str, JobState]:
        keys = (self.kv.keys("job.") if ids is None else ["job." + _kv_token(i) for i in ids])
        got = self.kv.get_many(keys)
        out = {}
        for key, (rec, rev) in got.items():
            if rec is not None:
                job_id = _kv_untoken(key[4:])
                out[job_id] = _record_state(job_id, rec, rev)
        return out

    def commit(self, state: JobState, done: Callable[[Any], None] | None = None, *,
               command: tuple[int, str | None] | None = None,
               outbox: Iterable[OutboxItem] = (), source: str | None = None,
               run: RunRecord | None = None, run_keep: int = RUN_HISTORY_KEEP) -> None:
        self._writes.put((state, command, [dataclasses.asdict(i) for i in outbox],
                          None if run is None else (run, run_keep)), done)

    def run_history(self, job_id: str, limit: int | None = None) -> list[RunRecord]:
        return self.kv_runs.histories([job_id], limit)[job_id]

    def run_histories(self, job_ids: Iterable[str], limit: int | None = None
                      ) -> dict[str, list[RunRecord]]:
        return self.kv_runs.histories(job_ids, limit)

    def _commit_record(self, rec: dict | None, state: JobState, command, items: list,
                       run: tuple[RunRecord, int] | None, hand_back: bool = False
                       ) -> tuple[dict, list, list, list] | bool:
        """The job record a commit writes on top of ``rec`` (with the lease
        left free when ``hand_back``), the writes of its outbox items, which
        go first, of its run, which go with the record, and the run keys to
        remove after; False when the lease is no longer this owner's."""
        if rec is None or rec.get("lease_owner") != self.owner:
            return False
        new = {**rec, **_state_record(state), "lease_owner": self.owner,
               "delivered_total": int(rec.get("delivered_total") or 0)}
        new["out"], first = self.kv_outbox.with_out(rec, state.id, list(new.pop("outbox", None) or ())
                                           + items)
        beside, gone = [], []
        if run is not None:
            new["runs"], beside, gone = self.kv_runs.with_run(rec, state.id, *run)
        commands = dict(rec.get("commands") or {})
        if command is not None:
            commands[str(command[0])] = _storable_result(command[1], _KV_RESULT_MAX)
            commands = _kept_results(commands)
        new["commands"] = commands
        if hand_back:
            new["lease_owner"] = new["lease_until"] = None
        return new, first, beside, gone

    def _commit_batch(self, batch: list) -> list:
        keys = ["job." + _kv_token(s.id) for s, *_ in batch]
        # Each record is compare-and-set on the revision this store last
        # wrote or read (its outbox and command results are kept), so a
        # daemon that took a job over since, or any other write, makes the
        # write fail instead of being overwritten; a failed one is read and
        # tried again below.  Only records not known here are read first,
        # in one pipelined round: one round trip a batch, not two.
        got = {key: self.claims.seen(s.id) for (s, *_), key in zip(batch, keys)}
        got.update(self.kv.get_many([key for key, seen in got.items() if seen is None]))
        results: list = [None] * len(batch)
        writes, index, first, beside, gone = [], [], [], [], []
        surplus = self.claims.surplus()                 # hand back, one a commit
        hand_back = set()
        for n, ((state, command, items, run), key) in enumerate(zip(batch, keys)):
            rec, rev = got[key]
            if surplus > 0 and self.claims.holds(state.id):
                hand_back.add(n)
                surplus -= 1
            try:
                made = self._commit_record(rec, state, command, items, run, n in hand_back)
            except StateError as exc:        # an item too large: this job's commit fails
                results[n] = exc
                continue
            if made is False:
                results[n] = False
                continue
            writes.append((key, made[0], rev))
            first.extend(made[1])
            beside.extend(made[2])
            gone.extend(made[3])
            index.append(n)
        # The outbox items' keys first, the records after: a record never
        # names an item that is not written.  The runs' keys go in the
        # records' round, before them: a run whose record does not land is
        # an orphan its record never names.
        self.kv.put_many(first)
        for n, write, rev in zip(index, writes, self.kv.put_many(beside + writes)[len(beside):]):
            state, command, items, run = batch[n]
            if rev is False:                 # changed since this store wrote or read it
                def change(r, state=state, command=command, items=items, run=run, n=n):
                    made = self._commit_record(r, state, command, items, run, n in hand_back)
                    if made is not False:
                        gone.extend(made[3])
                    return made if made is False else (made[0], made[1] + made[2])
                try:
                    new, rev = self.kv.update(keys[n], change)
                except StateError as exc:
                    results[n] = exc
                    continue
                if new is False:
                    results[n] = False
                    continue
            else:
                new = write[1]
            results[n] = True
            self.claims.committed(state.id, new, rev, kept=new.get("lease_owner") == self.owner)
        for n, result in enumerate(results):
            if result is False:
                self.claims.lost(batch[n][0].id)
                log.warning("job %s: commit dropped, another daemon holds its lease now",
                            batch[n][0].id)
        for (_, command, *_), result in zip(batch, results):
            if result is True and command is not None:
                try:                         # its result is in the job record already
                    self.commands.finish(*command)
                except StateError as exc:
                    log.warning("command %s: not marked done (%s)", command[0], exc)
        if gone:                             # a ring shrunk: its end, past every record
            try:
                self.kv.purge(sorted(set(gone)))
            except StateError as exc:
                log.warning("run history: old runs not removed (%s)", exc)
        return results

    def import_states(self, states: Iterable[JobState],
                      outbox: Iterable[OutboxItem] = ()) -> tuple[list[str], list[str]]:
        """Copy jobs' states (another backend's, say) into the bucket with no
        lease, each with its undelivered ``outbox`` items; a job the bucket
        has already is left alone.  Returns (copied ids, skipped ids)."""
        states = list(states)
        boxes: dict[str, list] = {}
        for item in outbox:
            boxes.setdefault(item.job, []).append(dataclasses.asdict(item))
        # The items' keys are written before their job's record: only for
        # jobs the bucket does not have (a skipped job's items would be
        # orphans no listing reaches), and removed again for a job created
        # between the look and the write.
        have = self.kv.get_many(["job." + _kv_token(s.id) for s in states])
        new = [s for s in states if have["job." + _kv_token(s.id)][0] is None]
        writes, first, keys_of = [], [], {}
        for s in new:
            rec = _new_record(s.replace(lease_owner=None, lease_until=None))
            rec["out"], items = self.kv_outbox.with_out(rec, s.id, boxes.get(s.id, []))
            first.extend(items)
            keys_of[s.id] = [key for key, _, _ in items]
            writes.append(("job." + _kv_token(s.id), rec, 0))
        self.kv.put_many(first)
        results = self.kv.put_many(writes)
        copied = [s.id for s, r in zip(new, results) if r is not False]
        self.kv.purge(key for s, r in zip(new, results) if r is False for key in keys_of[s.id])
        return copied, [s.id for s in states if s.id not in copied]

    def finish_command(self, seq: int, result: str | None = None) -> None:
        self.commands.finish(seq, result)

    def changed(self) -> bool:
        """True when a command was queued or marked since the last call (the
        newest ``cmd.`` revision moved); also the daemon's heartbeat."""
        if self.peers.beat_due():
            self.peers.beat()
        seq = self.kv.last_revision("cmd.")
        changed, self._seen_cmd_seq = seq != self._seen_cmd_seq, seq
        return changed

    def set_deadline(self, deadline: float | None) -> None:
        self.kv.deadline = deadline

    def close(self, deadline: float | None = None) -> None:
        self.kv.deadline = deadline
        self._writes.stop(deadline)
        if self._own_client:
            self.client.close()

    def lease_is_stale(self, owner: str | None) -> bool:
        return self.peers.lease_is_stale(owner)

    def register_daemon(self, now: float) -> list[str]:
        return self.peers.register(now)

    def unregister_daemon(self) -> None:
        self.peers.unregister()

    def set_running(self, ids: Iterable[str]) -> None:
        self.peers.set_running(ids)

    def daemons(self) -> dict[str, list[str]]:
        return self.peers.running()

    def command(self, job_id: str, verb: str, *, paused_on_boot: bool = False,
                arg: str | None = None) -> tuple[str | None, int | None]:
        return self.commands.command(job_id, verb, paused_on_boot=paused_on_boot, arg=arg)

    def pending_commands(self) -> list[Command]:
        return self.commands.pending()

    def claim(self, wanted: Mapping[str, float], now: float, *,
              paused_on_boot: Iterable[str] = ()) -> dict[str, JobState]:
        return self.claims.claim(wanted, now, paused_on_boot=paused_on_boot)

    def release(self, ids: Iterable[str] | None = None) -> None:
        self.claims.release(ids)

    def handed_over(self, job_id: str) -> bool:
        return self.claims.handed_over(job_id)

    def command_result(self, seq: int) -> tuple[bool, str | None]:
        return self.commands.result(seq)

    def unstorable(self, items: Iterable[OutboxItem]) -> str | None:
        return self.kv_outbox.unstorable(items)

    def outbox_counts(self) -> dict[str, tuple[int, float]]:
        return self.kv_outbox.outbox_counts()

    def outbox_pending(self, limit: int = 500, now: float | None = None) -> list[OutboxItem]:
        return self.kv_outbox.outbox_pending(limit, now)

    def outbox_settle(self, delivered: Iterable[OutboxItem] = (),
                      retry: Iterable[tuple[str, float, str]] = (),
                      dead: Iterable[tuple[OutboxItem, str]] = (), now: float = 0.0) -> None:
        self.kv_outbox.outbox_settle(delivered, retry, dead, now)

    def outbox(self, *, dead: bool = False) -> list[OutboxItem]:
        return self.kv_outbox.outbox(dead=dead)

    def outbox_retry(self, ids: Iterable[str] | None = None) -> int:
        return self.kv_outbox.outbox_retry(ids)

    def outbox_drop(self, ids: Iterable[str] | None = None, *, dead: bool = False) -> int:
        return self.kv_outbox.outbox_drop(ids, dead=dead)


def _state_backend(location: str) -> type[StateStore]:
    """The one place that maps a state location to its backend:
    ``jetstream://<bucket>`` is a JetStream key-value bucket, anything else
    a sqlite file path."""
    if isinstance(location, str) and location.startswith(_JETSTREAM):
        return JetStreamStateStore
    return SqliteStateStore


def open_state(location: str, *, readonly: bool = False, owner: str | None = None,
               broker_url: str | None = None,
               broker_opts: Mapping[str, Any] | None = None,
               daemon_ttl: float = _DAEMON_TTL_SECS) -> StateStore:
    """The state store for a ``state_db`` location: ``jetstream://<bucket>``
    (a JetStream key-value bucket on the NATS broker ``broker_url``), else a
    file path (sqlite).  ``daemon_ttl``: see ``JetStreamStateStore`` (a
    sqlite state's daemons share one host, where a dead pid is seen at once)."""
    return _state_backend(location).from_location(location, readonly=readonly, owner=owner,
                                                  broker_url=broker_url,
                                                  broker_opts=broker_opts,
                                                  daemon_ttl=daemon_ttl)


# ============================================================================
# Schedule
# When a job runs next: every N seconds, a cron expression (5 or 6 fields,
# in a time zone; or nexo's dialect), or once at an instant.  Pure functions
# of a given time.
# Shares: _CRON_DIALECTS, _fire_times, _nexo_cron_as_vixie, _parse_instant
# ============================================================================

_MONTHS = {m: i for i, m in enumerate(
    "jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# name, low, high, names
_CRON_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
                ("day of month", 1, 31, None), ("month", 1, 12, _MONTHS),
                ("day of week", 0, 7, _DAYS))


_CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}

# nexo's dialect is the one of the Rust ``cron`` crate nexo schedules with:
# seconds first, an optional year last (1970-2100), a week of 1 = Sunday ..
# 7 = Saturday, long names too, '?' only in the day fields, and a day fires
# when day of month AND day of week match.
_CRON_DIALECTS = ("vixie", "nexo")
_NEXO_MONTHS = {**_MONTHS, **{m: i for i, m in enumerate(
    "january february march april may june july august september october november "
    "december".split(), 1)}}
_NEXO_DAYS = {name: i for i, names in enumerate(
    ("sun sunday", "mon monday", "tue tues tuesday", "wed wednesday", "thu thurs thursday",
     "fri friday", "sat saturday"), 1) for name in names.split()}
_NEXO_CRON_FIELDS = _CRON_FIELDS[:4] + (("month", 1, 12, _NEXO_MONTHS),
                                        ("day of week", 1, 7, _NEXO_DAYS),
                                        ("year", 1970, 2100, None))
_NEXO_CRON_ALIASES = {"@yearly": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
                      "@weekly": "0 0 0 * * 1", "@daily": "0 0 0 * * *", "@hourly": "0 0 * * * *"}


class CronExpr:
    """A cron expression: ``sec min hour dom month dow`` or the 5-field form,
    or a Vixie cron alias (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``,
    ``@yearly``/``@annually``, ``@midnight``).

    Ranges (``1-5``), steps (``*/15``, ``10-50/10``), lists (``1,15``),
    month and day names, ``?`` for "any".  When both day of month and day
    of week are restricted a day matching either runs, as in Vixie cron.

    ``dialect="nexo"`` reads it as nexo does (the Rust ``cron`` crate):
    ``sec min hour dom month dow [year]``, day of week 1 = Sunday .. 7 =
    Saturday (``sun``/``sunday`` .. ``sat``/``saturday``), years 1970-2100,
    ``?`` in the day fields only, and a day runs only when day of month AND
    day of week match; aliases ``@hourly``, ``@daily``, ``@weekly``,
    ``@monthly``, ``@yearly``.
    """

    def __init__(self, text: str, dialect: str = "vixie"):
        if dialect not in _CRON_DIALECTS:
            raise InputError(f"cron dialect {dialect!r} is not one of {', '.join(_CRON_DIALECTS)}")
        if not isinstance(text, str):
            raise InputError("a cron expression must be a string")
        nexo = dialect == "nexo"
        label, aliases = ("nexo cron", _NEXO_CRON_ALIASES) if nexo else ("cron", _CRON_ALIASES)
        # the crate matches its aliases as written; Vixie in any case
        key = text.strip() if nexo else text.strip().lower()
        alias = aliases.get(key) if key.startswith("@") else None
        if key.startswith("@") and alias is None:
            raise InputError(f"{label} {text!r} is not one of {', '.join(aliases)}")
        parts = (alias or text).split()
        if not nexo and len(parts) == 5:
            parts = ["0"] + parts
        if nexo and len(parts) not in (6, 7):
            raise InputError(f"nexo cron {text!r} has {len(parts)} fields; expected 6 "
                             "(sec min hour dom month dow) or 7 (and a year)")
        if not nexo and len(parts) != 6:
            raise InputError(f"cron {text!r} has {len(parts)} fields; expected 5 "
                             "(minute first) or 6 (seconds first)")
        self.text, self.dialect = text, dialect
        sets = []
        for part, (name, low, high, names) in zip(parts, _NEXO_CRON_FIELDS if nexo
                                                  else _CRON_FIELDS):
            sets.append(self._field(part, name, low, high, names, label, nexo))
        self.seconds, self.minutes, self.hours, self.days, self.months, dows = (
            sorted(s) for s in sets[:6])
        # 0 = Sunday, as (weekday() + 1) % 7: Vixie's 7 is Sunday too, nexo's 1 is
        self.dows = {(d - nexo) % 7 for d in dows}
        self.years = sorted(sets[6]) if len(sets) == 7 else list(range(1970, 2101))
        self.dom_any = parts[3] in ("*", "?")
        self.dow_any = parts[5] in ("*", "?")
        if nexo and next(self._days_from(datetime(1970, 1, 1).date()), None) is None:
            raise InputError(f"nexo cron {text!r} never fires (no such day in those months, "
                             "weekdays and years)")
        if not any(d <= _MAX_MONTH_DAYS[m] for m in self.months for d in self.days) \
                and self.dow_any:
            raise InputError(f"cron {text!r} never fires (no such day in those months)")

    @staticmethod
    def _field(part: str, name: str, low: int, high: int, names, label: str = "cron",
               nexo: bool = False) -> set[int]:
        values: set[int] = set()
        # the crate takes '?' in the day fields only, and no step beyond the field
        any_marks = ("*", "?") if not nexo or name.startswith("day") else ("*",)
        max_step = high if nexo else None

        def number(tok: str) -> int:
            tok_l = tok.lower()
            if names and tok_l in names:
                return names[tok_l]
            if not (tok.isascii() and tok.isdigit()):
                raise InputError(f"{label} {name} field: {tok!r} is not a number"
                                 + (" or a name" if names else ""))
            n = int(tok)
            if not low <= n <= high:
                raise InputError(f"{label} {name} field: {n} is outside {low}-{high}")
            return n

        for item in part.split(","):
            rng, _, step_s = item.partition("/")
            step = 1
            if "/" in item:
                if not (step_s.isascii() and step_s.isdigit()) or int(step_s) == 0 \
                        or (max_step is not None and int(step_s) > max_step):
                    raise InputError(f"{label} {name} field: bad step {step_s!r}"
                                     + (f" (1-{max_step})" if max_step else ""))
                step = int(step_s)
            if rng in any_marks:
                a, b = low, high
            elif "-" in rng:
                a_s, _, b_s = rng.partition("-")
                a, b = number(a_s), number(b_s)
                if a > b:
                    raise InputError(f"{label} {name} field: range {rng!r} runs backwards")
            else:
                a = number(rng)
                b = high if "/" in item else a
            values.update(range(a, b + 1, step))
        return values

    def _day_matches(self, d) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.dows
        if self.dom_any and self.dow_any:
            return True
        if self.dom_any:
            return dow
        if self.dow_any:
            return dom
        return dom or dow

    def _days_from(self, day):
        """The days that fire, in order, from ``day`` on."""
        if self.dialect == "vixie":
            for _ in range(366 * 8):
                if self._day_matches(day):
                    yield day
                day += timedelta(days=1)
            return
        # nexo: candidates come from the fields (every one must match), so a
        # rare day decades away (29 February on a Monday) is found quickly.
        for y in self.years[bisect.bisect_left(self.years, day.year):]:
            for m in self.months:
                if (y, m) < (day.year, day.month):
                    continue
                for d in self.days:
                    try:
                        found = datetime(y, m, d).date()
                    except ValueError:      # past the month's end
                        break
                    if found >= day and (found.weekday() + 1) % 7 in self.dows:
                        yield found

    def next_after(self, after: datetime, tz=timezone.utc) -> datetime | None:
        """The first firing strictly after ``after`` (aware), in UTC.

        Wall times skipped by a DST change do not fire; a wall time that
        happens twice fires once, at its first occurrence.
        """
        after_utc = after.astimezone(timezone.utc)
        wall = (after_utc + timedelta(seconds=1)).astimezone(tz).replace(
            tzinfo=None, microsecond=0)
        first = wall.date()
        for day in self._days_from(first):
            start = (wall.hour, wall.minute, wall.second) if day == first else (0, 0, 0)
            for h in self.hours[bisect.bisect_left(self.hours, start[0]):]:
                m0 = start[1] if h == start[0] else 0
                for m in self.minutes[bisect.bisect_left(self.minutes, m0):]:
                    s0 = start[2] if (h, m) == start[:2] else 0
                    for s in self.seconds[bisect.bisect_left(self.seconds, s0):]:
                        local = datetime(day.year, day.month, day.day, h, m, s)
                        found = _wall_to_utc(local, tz)
                        if found is not None and found > after_utc:
                            return found
        return None


def _nexo_cron_as_vixie(expr: CronExpr) -> tuple[str | None, str]:
    """A nexo cron rewritten as the Vixie cron that fires at the same times
    (as ``CronExpr`` reads Vixie: 5 fields, or 6 with seconds first), and
    why each field changed; or None and why no Vixie cron can (a year, or
    day of month AND day of week both restricted: Vixie fires on either).
    A field that means the same in Vixie is kept as written."""
    text = expr.text.strip()
    if text.startswith("@"):                # nexo's aliases mean the same (@weekly: Sunday)
        return text, ""
    parts, why = text.split(), []
    if len(parts) == 7:
        if expr.years != list(range(1970, 2101)):
            return None, f"its year field {parts[6]!r} (Vixie cron has none)"
        parts = parts[:6]
        why.append("the year field '*' dropped")
    dom_any = expr.dom_any or expr.days == list(range(1, 32))
    dow_any = expr.dow_any or len(expr.dows) == 7
    if not (dom_any or dow_any):
        return None, ("day of month AND day of week both restricted (nexo fires when both "
                      "match, Vixie when either does)")
    wanted = (expr.seconds, expr.minutes, expr.hours, expr.days, expr.months,
              sorted(expr.dows))
    out = []
    for i, (part, (name, low, high, names)) in enumerate(zip(parts, _CRON_FIELDS)):
        if (i == 3 and dom_any) or (i == 5 and dow_any):
            new = "*"                       # Vixie's "any" is the literal *
        else:
            try:
                values = CronExpr._field(part, name, low, high, names)
            except InputError:
                values = None
            if i == 5 and values is not None:
                values = {v % 7 for v in values}
            new = part if values == set(wanted[i]) else _cron_list(wanted[i])
        if new != part:
            why.append(f"{name} {part!r} is {new!r}" + (
                " (nexo counts 1 = Sunday, Vixie 0)" if i == 5 and new != "*" else ""))
        out.append(new)
    if out[0] == "0":
        out = out[1:]
        why.append("seconds '0' is Vixie's 5-field form")
    return " ".join(out), "; ".join(why)


def _cron_list(values) -> str:
    """Numbers as a cron list, runs written as ranges: ``1-5,7``."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


_MAX_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30,
                   10: 31, 11: 30, 12: 31}


def _wall_to_utc(local: datetime, tz) -> datetime | None:
    """A naive wall time in ``tz`` as a UTC instant; None if DST skipped it."""
    aware = local.replace(tzinfo=tz, fold=0)
    utc = aware.astimezone(timezone.utc)
    if utc.astimezone(tz).replace(tzinfo=None) != local:
        return None
    return utc


def _parse_instant(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset) to an aware UTC datetime."""
    if not isinstance(text, str):
        raise InputError("must be an RFC 3339 string")
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise InputError(f"{text!r} needs a time zone offset (e.g. Z or +02:00)")
    return value.astimezone(timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """When a job runs: ``every_secs``, ``cron`` (with ``tz``) or ``at``.

    Immutable: the jobs of one configuration written with the same schedule
    share one ``Schedule`` (100,000 jobs on a handful of schedules hold a
    handful).  ``key`` is what identifies it in a stored state
    (``_schedule_key``), set by the config loader from the file's text."""
    every_secs: float | None = None
    cron: CronExpr | None = None
    tz: Any = timezone.utc
    at: datetime | None = None
    stagger_jitter_ms: int | None = None
    key: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def nominal_interval(self) -> float:
        """The interval hint sent to plugins: N, 60 for cron, 0 for a one-shot."""
        if self.every_secs is not None:
            return self.every_secs
        return 60.0 if self.cron is not None else 0.0

    def first_after(self, now: float) -> float | None:
        """The first slot of a job that never ran."""
        if self.at is not None:
            return self.at.timestamp()
        if self.cron is not None:
            return self.next_after(now, now)
        return now

    def next_after(self, slot: float, now: float) -> float | None:
        """The first slot after ``slot`` that is later than ``now``.

        Slots missed while a tick ran (or the daemon was down) are skipped
        here: the run at ``now`` stood in for all of them.  ``every_secs``
        keeps its phase (``slot + k * N``).
        """
        if self.at is not None:
            return None
        if self.every_secs is not None:
            n = self.every_secs
            return slot + n * (max(0, math.floor((now - slot) / n)) + 1)
        found = self.cron.next_after(datetime.fromtimestamp(max(slot, now), timezone.utc),
                                     self.tz)
        return None if found is None else found.timestamp()

    def slots_in(self, start: float, end: float, limit: int = 10_000) -> list[float]:
        """The slots from ``start`` to ``end`` (both included), in order:
        an ``every_secs`` schedule's are ``start``, ``start + N``, ...; a
        cron's its firings; an ``at``'s its instant.  More than ``limit``
        raises ``InputError``."""
        if end < start:
            raise InputError(f"the range ends ({_iso(end)}) before it starts "
                             f"({_iso(start)})")
        if self.at is not None:
            slots = [self.at.timestamp()] if start <= self.at.timestamp() <= end else []
        elif self.every_secs is not None:
            count = math.floor((end - start) / self.every_secs) + 1
            if count > limit:
                raise InputError(f"{count} slots from {_iso(start)} to {_iso(end)}; "
                                 f"at most {limit} at once: narrow the range")
            slots = [start + k * self.every_secs for k in range(count)]
        else:
            slots, at = [], self.next_after(start - 1, start - 1)
            while at is not None and at <= end:
                if at >= start:
                    if len(slots) == limit:
                        raise InputError(f"more than {limit} slots from {_iso(start)} to "
                                         f"{_iso(end)}: narrow the range")
                    slots.append(at)
                at = self.next_after(at, at)
        return slots


def _fire_times(schedule: Schedule, start: float, n: int) -> list[float]:
    """The first ``n`` slots of a job that never ran, from ``start`` (fewer
    when its schedule fires no more)."""
    times: list[float] = []
    at = start
    while len(times) < n:
        nxt = schedule.first_after(at) if not times else schedule.next_after(at, at)
        if nxt is None:
            break
        times.append(nxt)
        at = nxt
    return times


# ============================================================================
# YAML
# The YAML that configuration files use, read with the standard library: a
# small reader that refuses, with file:line:column, what it does not support.
# Shares: _read_yaml
# ============================================================================

# The YAML 1.2 core schema: what a plain scalar means (on/yes/off stay strings).
_YAML_NULL = re.compile(r"~|null|Null|NULL|")
_YAML_BOOL = {"true": True, "True": True, "TRUE": True,
              "false": False, "False": False, "FALSE": False}
_YAML_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n",
                 "v": "\v", "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"',
                 "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0", "L": "\u2028",
                 "P": "\u2029"}
_YAML_BLANKS = re.compile(r"[ \t]*")
_YAML_HEX = {"x": 2, "u": 4, "U": 8}
# What a plain scalar may not start with, and why it is refused rather than read.
_YAML_REFUSED = {"&": "anchors are not supported", "*": "aliases are not supported",
                 "!": "tags are not supported", "@": "'@' is reserved in YAML (quote it)",
                 "`": "'`' is reserved in YAML (quote it)",
                 "%": "'%' may not start a plain value (quote it)"}


class _YamlError(NexoPollerError):
    """Where (a character offset) and why the YAML reader stopped; it leaves
    the section as a ConfigError with file:line:column."""

    def __init__(self, pos: int, reason: str):
        super().__init__(reason)
        self.pos, self.reason = pos, reason


def _yaml_scalar(text: str, pos: int) -> Any:
    """A plain scalar's value under the core schema."""
    if _YAML_NULL.fullmatch(text):
        return None
    if text in _YAML_BOOL:
        return _YAML_BOOL[text]
    if _YAML_INT.fullmatch(text):
        base = {"0o": 8, "0x": 16}.get(text[:2])
        return int(text[2:], base) if base else int(text)
    if _YAML_FLOAT.fullmatch(text):
        if "inf" in text.lower() or "nan" in text.lower():
            raise _YamlError(pos, "infinite and NaN numbers are not supported (JSON has none)")
        return float(text.lower().replace(".inf", "inf").replace(".nan", "nan"))
    return text


class _YamlReader:
    """One document: block mappings and sequences, flow collections, plain,
    quoted and block scalars.  ``pos`` is an index into ``text``; columns are
    counted from the start of its line.  ``where`` maps each node's path
    (keys and indexes) to its position, so later errors can point at it."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0
        self.where: dict[tuple, int] = {}

    # -- positions and whitespace -------------------------------------------
    def col(self, pos: int | None = None) -> int:
        pos = self.pos if pos is None else pos
        return pos - (self.text.rfind("\n", 0, pos) + 1)

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.text[i] if i < len(self.text) else ""

    def at_break(self, k: int = 0) -> bool:
        """Whether the char at pos+k ends a token: space, tab, line end or EOF."""
        return self.peek(k) in ("", " ", "\t", "\n", "\r")

    def skip_inline(self) -> None:
        """Spaces and tabs, then a comment (only after a space, as YAML says)."""
        start = self.pos
        while self.peek() in (" ", "\t"):
            self.pos += 1
        if self.peek() == "#" and (self.pos > start or self.col() == 0):
            while self.peek() not in ("", "\n"):
                self.pos += 1

    def skip_lines(self) -> None:
        """Blank lines and comment lines; stops at the next content character.
        Tabs may not indent (YAML forbids them: their width is unknown)."""
        while True:
            self.skip_inline()
            if self.peek() == "\r":
                self.pos += 1
            if self.peek() != "\n":
                return
            self.pos += 1
            lead = _YAML_BLANKS.match(self.text, self.pos).group()
            after = self.text[self.pos + len(lead):self.pos + len(lead) + 1]
            if "\t" in lead and after not in ("", "\n", "\r", "#"):
                raise _YamlError(self.pos + lead.index("\t"),
                                 "a tab in indentation (YAML allows only spaces)")

    def end_of_line(self) -> None:
        self.skip_inline()
        if self.peek() not in ("", "\n", "\r"):
            raise _YamlError(self.pos, f"unexpected {self.peek()!r} after a value")

    # -- the document ----------------------------------------------------------
    def document(self) -> Any:
        self.skip_lines()
        if self.peek() == "%":
            raise _YamlError(self.pos, "directives are not supported")
        if self.col() == 0 and self.text.startswith("---", self.pos) and self.at_break(3):
            self.pos += 3
        value = self.node((), -1, inline=self.col() > 0)
        self.skip_lines()
        if self.col() == 0 and self.text.startswith("...", self.pos) and self.at_break(3):
            self.pos += 3
            self.skip_lines()
            if self.pos < len(self.text):
                raise _YamlError(self.pos, "several documents are not supported")
        if self.pos < len(self.text):
            several = self.text.startswith("---", self.pos) and self.at_break(3)
            raise _YamlError(self.pos, "several documents are not supported" if several
                             else "unexpected content (is it indented as its parent?)")
        return value

    def node(self, path: tuple, indent: int, *, inline: bool = False,
             seq_at_indent: bool = False) -> Any:
        """The node after ``indent`` columns: on this line (``inline``) or on
        the next lines, more indented than its parent, or a block sequence at
        the parent key's own indent (``seq_at_indent``)."""
        if inline:
            self.skip_inline()
            if self.peek() not in ("", "\n", "\r"):
                return self.inline_node(path, indent)
        self.skip_lines()
        col = self.col()
        if self.pos >= len(self.text) or col < indent or (col == indent and not (
                seq_at_indent and self.peek() == "-" and self.at_break(1))):
            self.where.setdefault(path, self.pos)
            return None
        return self.block(path, col, indent)

    def block(self, path: tuple, col: int, parent: int) -> Any:
        """A collection or scalar starting here, at column ``col``, inside a
        parent indented ``parent`` columns."""
        if self.peek() == "-" and self.at_break(1):
            return self.sequence(path, col)
        start = self.pos
        if self.peek() == "?" and self.at_break(1):
            raise _YamlError(self.pos, "complex keys ('?') are not supported")
        if self.key_here() is not None:
            self.pos = start
            return self.mapping(path, col)
        return self.inline_node(path, parent)

    def key_here(self) -> Any:
        """Reads ``key:`` here and returns the key, or None (position kept)."""
        start = self.pos
        ch = self.peek()
        if ch in "[{":
            where, self.where = self.where, {}            # a trial read: positions not kept
            try:
                self.flow(())
            except _YamlError:
                self.pos = start
                return None
            finally:
                self.where = where
            self.skip_inline()
            if self.peek() == ":" and self.at_break(1):
                raise _YamlError(start, "complex keys (a collection as key) are not supported")
            self.pos = start
            return None
        if ch in "\"'":
            key = self.quoted()
            while self.peek() in (" ", "\t"):
                self.pos += 1
        else:
            key = self.plain(flow=False, key=True)
            if key is None:
                return None
            key = _yaml_scalar(key, start)
        if self.peek() == ":" and self.at_break(1):
            self.pos += 1
            return (key,)
        self.pos = start
        return None

    def mapping(self, path: tuple, col: int) -> dict:
        result: dict = {}
        while True:
            start = self.pos
            if self.peek() == "?" and self.at_break(1):
                raise _YamlError(self.pos, "complex keys ('?') are not supported")
            found = self.key_here()
            if found is None:
                raise _YamlError(self.pos, "expected 'key: value' in this mapping")
            key = found[0]
            self.check_key(start, key, result)
            self.where[path + (key,)] = start
            result[key] = self.node(path + (key,), col, inline=True, seq_at_indent=True)
            self.skip_lines()
            if self.pos >= len(self.text) or self.col() < col:
                return result
            if self.col() > col:
                raise _YamlError(self.pos, "this line is indented more than its mapping")
            if self.peek() == "-" and self.at_break(1):
                raise _YamlError(self.pos, "a sequence entry where a mapping key was expected")
            if self.text.startswith(("---", "..."), self.pos) and col == 0 and self.at_break(3):
                return result

    def sequence(self, path: tuple, col: int) -> list:
        result: list = []
        while True:
            self.where[path + (len(result),)] = self.pos
            self.pos += 1                                  # the '-'
            item_path = path + (len(result),)
            self.skip_inline()
            if self.peek() in ("", "\n", "\r"):
                result.append(self.node(item_path, col))
            else:                                          # "- a: 1" or "- - x": a block here
                result.append(self.block(item_path, self.col(), col))
            self.skip_lines()
            if self.pos >= len(self.text) or self.col() < col:
                return result
            if self.col() > col or not (self.peek() == "-" and self.at_break(1)):
                if self.col() == col:
                    return result                          # the sequence at its key's indent ended
                raise _YamlError(self.pos, "expected a '- ' sequence entry at this indentation")

    # -- nodes on one line: scalars, block scalars, flow collections ------------
    def inline_node(self, path: tuple, indent: int) -> Any:
        self.where.setdefault(path, self.pos)
        if self.peek() in "|>":
            return self.block_scalar(indent)
        if self.peek() == "-" and self.at_break(1):
            raise _YamlError(self.pos, "a block sequence may not start on its key's line")
        value = self.flow_item(path, flow=False, indent=indent)
        self.skip_inline()
        if self.peek() == ":" and self.at_break(1):
            raise _YamlError(self.pos, "a mapping may not start on its key's line")
        self.end_of_line()
        return value

    def plain(self, *, flow: bool, key: bool = False, indent: int = -1) -> str | None:
        """A plain scalar; in block context it may continue on more-indented
        lines (folded: a line break reads as a space, an empty line as one)."""
        stops = ",[]{}" if flow else ""
        first = self.peek()
        # '-', '?' and ':' start a plain scalar only when glued to what follows.
        glued = first in "-?:" and not self.at_break(1) and not (flow and self.peek(1) in stops)
        if not glued and (first in ("", "\n", "\r") or first in "#,[]{}\"'|>&*!%@`-?:"):
            if key:
                return None
            raise _YamlError(self.pos, f"a value may not start with {first!r}" if first
                             else "a value is missing")
        parts: list[str] = []
        breaks = 0
        while True:
            start = self.pos
            while True:
                ch = self.peek()
                if ch in ("", "\n", "\r") or ch in stops:
                    break
                if ch == ":" and (self.at_break(1) or (flow and self.peek(1) in stops)):
                    break
                if ch == "#" and self.text[self.pos - 1] in " \t":
                    break
                self.pos += 1
            line = self.text[start:self.pos].rstrip(" \t")
            self.pos = start + len(line)
            if line:
                parts.append(("\n" * (breaks - 1) if breaks > 1 else " " if breaks else "") + line)
            if key or self.peek() not in ("\n", "\r"):
                return "".join(parts)
            # A continuation line: the next non-empty one, more indented, not a comment.
            save, breaks = self.pos, 0
            while self.peek() in (" ", "\t", "\r", "\n"):
                breaks += self.peek() == "\n"
                self.pos += 1
            if (self.pos >= len(self.text) or self.peek() == "#" or
                    (not flow and self.col() <= indent) or
                    (self.peek() == "-" and self.at_break(1) and not flow) or
                    (self.col() == 0 and self.text.startswith(("---", "..."), self.pos))):
                self.pos = save
                return "".join(parts)
            if not flow and self.peek() in ":?" and self.at_break(1):
                self.pos = save
                return "".join(parts)

    def quoted(self) -> str:
        """A single- or double-quoted scalar; line breaks fold as in plain ones."""
        quote, start = self.peek(), self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == "":
                raise _YamlError(start, "a quoted value is not closed")
            if ch == quote:
                if quote == "'" and self.peek(1) == "'":
                    out.append("'")
                    self.pos += 2
                    continue
                self.pos += 1
                return "".join(out)
            if ch == "\\" and quote == '"':
                piece, self.pos = _yaml_escape(self.text, self.pos)
                out.append(piece)
            elif ch in ("\n", "\r"):
                while out and out[-1] in (" ", "\t"):
                    out.pop()
                breaks = 0
                while self.peek() in (" ", "\t", "\n", "\r"):
                    breaks += self.peek() == "\n"
                    self.pos += 1
                out.append("\n" * (breaks - 1) if breaks > 1 else " ")
            else:
                out.append(ch)
                self.pos += 1

    def block_scalar(self, indent: int) -> str:
        """``|`` (literal) or ``>`` (folded), with chomping (``-`` strip, ``+``
        keep, clip otherwise) and an indentation indicator 1-9, either order."""
        folded = self.peek() == ">"
        self.pos += 1
        chomp, explicit = "", 0
        for _ in range(2):
            ch = self.peek()
            if ch in "-+" and not chomp:
                chomp = ch
            elif ch in "123456789" and not explicit:
                explicit = int(ch)
            else:
                break
            self.pos += 1
        if not self.at_break():
            raise _YamlError(self.pos, "a block scalar header is '|' or '>', then "
                                       "'-' or '+' and an indentation digit 1-9")
        self.end_of_line()
        self.pos += self.peek() == "\r"                     # now at the header's line break
        width = max(indent, 0) + explicit if explicit else 0
        body: list[str] = []
        while self.pos + 1 < len(self.text):              # self.pos: at a line break
            end = self.text.find("\n", self.pos + 1)
            end = len(self.text) if end < 0 else end
            line = self.text[self.pos + 1:end].rstrip("\r")
            spaces = len(line) - len(line.lstrip(" "))
            if not width and line.strip(" "):
                if spaces <= indent:
                    break
                width = spaces
            if line.strip(" ") and spaces < (width or indent + 1):
                break
            if not line.strip(" ") and width and len(line) < width:
                body.append("")
            else:
                body.append(line[width:] if width else "")
            self.pos = end
        # A last line with no line break (the file's end) keeps none.
        unbroken = self.pos >= len(self.text) and not self.text.endswith("\n")
        return _yaml_block_text(body, folded, chomp, unbroken)

    def flow(self, path: tuple) -> Any:
        """``[...]`` or ``{...}``; may span lines; keys are scalars."""
        opener = self.peek()
        start = self.pos
        self.pos += 1
        closer = "]" if opener == "[" else "}"
        result: Any = [] if opener == "[" else {}
        while True:
            self.skip_flow()
            if self.peek() == closer:
                self.pos += 1
                return result
            if self.peek() == "":
                raise _YamlError(start, f"{opener!r} is not closed")
            here = self.pos
            if self.peek() == "?" and self.at_break(1):
                raise _YamlError(self.pos, "complex keys ('?') are not supported")
            sub = path + ((len(result),) if opener == "[" else ())
            item = self.flow_item(sub)
            self.skip_flow()
            if self.peek() == ":":
                if isinstance(item, (list, dict)):
                    raise _YamlError(here, "complex keys (a collection as key) are not supported")
                self.pos += 1
                self.skip_flow()
                key = item
                self.check_key(here, key, result if opener == "{" else {})
                self.where[path + (key,) if opener == "{" else sub] = here
                value = None if self.peek() in (",", closer) else self.flow_item(
                    path + (key,) if opener == "{" else sub)
                item = {key: value} if opener == "[" else (key, value)
            elif opener == "{":
                self.check_key(here, item, result)
                item = (item, None)
            if opener == "[":
                self.where.setdefault(sub, here)
                result.append(item)
            else:
                self.where.setdefault(path + (item[0],), here)
                result[item[0]] = item[1]
            self.skip_flow()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != closer:
                if not self.peek():
                    raise _YamlError(start, f"{opener!r} is not closed")
                raise _YamlError(self.pos, f"expected ',' or {closer!r}")

    def check_key(self, pos: int, key: Any, seen: dict) -> None:
        # Keys are strings, as in JSON: ``1: x`` would be a number key.
        if isinstance(key, (list, dict)):
            raise _YamlError(pos, "complex keys (a collection as key) are not supported")
        if not isinstance(key, str):
            raise _YamlError(pos, f"a key must be a string, got {json.dumps(key)} (quote it)")
        if key in seen:
            raise _YamlError(pos, f"duplicate key {key!r}")

    def skip_flow(self) -> None:
        while True:
            self.skip_inline()
            if self.peek() not in ("\n", "\r"):
                return
            self.pos += 1

    def flow_item(self, path: tuple, *, flow: bool = True, indent: int = -1) -> Any:
        """A flow collection or a scalar (``flow``: inside a flow collection)."""
        ch, start = self.peek(), self.pos
        if ch in _YAML_REFUSED:
            raise _YamlError(self.pos, _YAML_REFUSED[ch])
        if ch in "[{":
            return self.flow(path)
        if ch in "\"'":
            return self.quoted()
        return _yaml_scalar(self.plain(flow=flow, indent=indent), start)


def _yaml_escape(text: str, pos: int) -> tuple[str, int]:
    """The backslash escape at ``pos`` of a double-quoted scalar: its text and
    the position after it."""
    code = text[pos + 1:pos + 2]
    if code in _YAML_ESCAPES:
        return _YAML_ESCAPES[code], pos + 2
    if code in _YAML_HEX:
        digits = text[pos + 2:pos + 2 + _YAML_HEX[code]]
        if len(digits) != _YAML_HEX[code] or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise _YamlError(pos, f"\\{code} needs {_YAML_HEX[code]} hex digits")
        value = int(digits, 16)
        if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            raise _YamlError(pos, f"\\{code}{digits} is not a character")
        return chr(value), pos + 2 + len(digits)
    if code in ("\n", "\r"):             # an escaped line break: the lines join, no space
        pos += 1
        while text[pos:pos + 1] in (" ", "\t", "\n", "\r"):
            pos += 1
        return "", pos
    raise _YamlError(pos, f"unknown escape \\{code}" if code else "a quoted value is not closed")


def _yaml_block_text(body: list[str], folded: bool, chomp: str, unbroken: bool) -> str:
    """A block scalar's value from its lines, their indentation removed:
    folded or literal, then chomped (``-`` strip, ``+`` keep, clip otherwise)."""
    trail = 0
    while body and body[-1] == "":
        body.pop()
        trail += 1
    if folded:
        # A break between two lines reads as a space, empty lines as line
        # breaks; lines indented further ("more-indented") keep theirs.
        text, prev_more, empties = "", False, 0
        for line in body:
            more = line[:1] in (" ", "\t")
            if line == "":
                empties += 1
                continue
            if text and (more or prev_more):
                text += "\n" * (empties + 1)
            else:
                text += "\n" * empties if empties or not text else " "
            text += line
            prev_more, empties = more, 0
    else:
        text = "\n".join(body)
    if chomp == "-" or (unbroken and not trail):
        return text
    if chomp == "+":
        return text + "\n" * (trail + (1 if body else 0))
    return text + "\n" if body else ""


def _read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, tuple[int, int]]]:
    """One YAML document's data and where each node starts: path -> (line,
    column), 1-based.  Raises ``ConfigError`` ``source:line:column: reason``."""
    text = text.removeprefix("\ufeff")              # a byte-order mark is no content
    starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_col(pos: int) -> tuple[int, int]:
        line = bisect.bisect_right(starts, pos)
        return line, pos - starts[line - 1] + 1

    reader = _YamlReader(text)
    try:
        data = reader.document()
    except _YamlError as exc:
        line, col = line_col(exc.pos)
        raise ConfigError(f"{source}:{line}:{col}", [("", exc.reason)]) from None
    except RecursionError:
        raise ConfigError(source, [("", "nested too deeply")]) from None
    return data, {p: line_col(pos) for p, pos in reader.where.items()}


# ============================================================================
# Config
# ``pollers.json`` read and checked as a whole before anything starts: every
# problem is reported at once, each with its JSON path.
# Shares: _config_state, _convert_nexo_config, _hide_secrets, _host_name,
#   _JOB_POLICY_KEYS, _jitter_ms, _redact_url, _schedule_text_key
# ============================================================================

_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")
# What a job does with the slots it missed (daemon down, paused, a long
# tick): "one" run now stands for them all, "all" runs each in order,
# "none" skips them to the next future slot.
_CATCHUP_MODES = ("one", "all", "none")
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def _host_name(name: str) -> str:
    """A host as compared with a request's ``Host``: lower case, no brackets."""
    return name.strip("[]").lower()
# A job's own policy keys, each over its global fallback (``JobPolicy``):
# key -> (the top-level key it overrides or None, low, high, integer).  The
# global keys are checked against the same ranges.
_JOB_POLICY_KEYS = {
    "timeout_secs": (None, 0.001, MAX_TICK_TIMEOUT_SECS, False),
    "backoff_initial_secs": ("backoff_initial_secs", 0.001, 86400, False),
    "backoff_max_secs": ("backoff_max_secs", 0.001, 86400 * 7, False),
    "breaker_threshold": ("breaker_threshold", 1, 10 ** 6, True),
    "failure_alert_cooldown_secs": ("failure_alert_cooldown_secs", 0, 10 ** 9, False),
    "jitter_ms": ("default_jitter_ms", 0, 86_400_000, True),
    # catch-up of missed slots: a mode (low holds the choices), and a window
    # (null: no bound, every missed slot counts)
    "catchup": ("catchup", _CATCHUP_MODES, None, None),
    "catchup_window_secs": ("catchup_window_secs", 0, 86400 * 3660, False),
    "run_history": ("run_history", 0, 100_000, True),     # runs kept (RUN_HISTORY_KEEP)
}
_JOB_KEYS = {"id", "kind", "agent", "schedule", "config", "failure_to",
             "paused_on_boot", "repause_on_boot", "extra"} | set(_JOB_POLICY_KEYS)
_SCHEDULE_KEYS = {"every_secs", "cron", "tz", "at", "stagger_jitter_ms"}


# An empty mapping all jobs without ``extra`` or policy keys share (read-only).
_NO_KEYS: Mapping[str, Any] = types.MappingProxyType({})


def _compact_json(value: Any) -> str:
    """A job's entry as compact JSON text (a value JSON cannot hold: its repr)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


@dataclasses.dataclass(slots=True)
class JobConfig:
    """One configured job.  Kept for the daemon's whole life, once per job:
    small on purpose (slots, shared empty mappings and schedules, the entry
    as written kept as text)."""
    id: str
    kind: str
    agent: str
    schedule: Schedule
    config: Any = dataclasses.field(default_factory=dict)
    failure_to: dict | None = None
    paused_on_boot: bool = False
    # the file's repause_on_boot, by default true for paused_on_boot in nexo's
    # files (cron_dialect "nexo"): pause the job again at every start, as nexo
    # does; else only a new job starts paused
    repause_on_boot: bool = False
    # the job's entry as written, compact JSON (``raw`` parses it): a reload
    # keeps a job whose entry is unchanged
    raw_json: str = dataclasses.field(default="{}", repr=False)
    # nexo's free map for modules, not the runner: kept, passed to nothing
    extra: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _NO_KEYS)
    # The job's own policy keys (``_JOB_POLICY_KEYS`` but jitter_ms, which is
    # its schedule's stagger_jitter_ms): ``JobPolicy.of`` reads them.
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _NO_KEYS)

    @property
    def raw(self) -> dict:
        """The job's entry as written (a new dict each time)."""
        return json.loads(self.raw_json)

    @classmethod
    def every(cls, id: str, kind: str, every_secs: float, config: Any = None, *,
              agent: str = "default", jitter_ms: int = 0) -> "JobConfig":
        """A convenience for library users: a job that runs every N seconds."""
        raw = {"id": id, "kind": kind, "agent": agent, "config": config or {},
               "schedule": {"every_secs": every_secs, "stagger_jitter_ms": jitter_ms}}
        return cls(id, kind, agent, Schedule(every_secs=every_secs, stagger_jitter_ms=jitter_ms,
                                             key=_schedule_text_key(raw["schedule"])),
                   config or {}, raw_json=_compact_json(raw))


@dataclasses.dataclass
class DaemonConfig:
    """The whole of ``pollers.json``, validated, paths made absolute.  Its
    fields' defaults are the file's: declared here only (``_TOP_DEFAULTS``)."""
    enabled: bool = True
    state_db: str = "./data/poller.db"
    default_jitter_ms: int = 5000
    lease_ttl_factor: float = 2.0
    lease_min_secs: float = 30.0
    daemon_ttl_secs: float = _DAEMON_TTL_SECS
    failure_alert_cooldown_secs: float = 3600
    run_history: int = RUN_HISTORY_KEEP
    breaker_threshold: int = 5
    backoff_initial_secs: float = 30.0
    backoff_max_secs: float = 300.0
    max_workers: int = 64
    shutdown_grace_secs: float = 10.0
    plugin_crash_limit: int = 5                    # a supervised plugin exiting so often ...
    plugin_crash_window_secs: float = 600.0        # ... within so long is given up
    alert_topic: str = "nexo.poller.alert"
    broker: str | None = None
    broker_tls: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics_addr: tuple[str, int] | None = None
    admin_addr: tuple[str, int] | None = None
    admin_token_file: str | None = None
    admin_allowed_hosts: tuple[str, ...] = ()      # Host names served besides the listener's own
    agents: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    delivery_sink: str = "broker"
    delivery_max_attempts: int = 20
    delivery_max_age_secs: float = 86400.0
    delivery_retry_initial_secs: float = 1.0
    delivery_retry_max_secs: float = 60.0
    cron_dialect: str = "vixie"                    # or "nexo": how jobs' cron is read
    catchup: str = "one"                           # missed slots: "one", "all" or "none"
    catchup_window_secs: float | None = None       # missed slots older than this: skipped
    plugins: list[PluginPollerHandle] = dataclasses.field(default_factory=list)
    jobs: list[JobConfig] = dataclasses.field(default_factory=list)
    source: str | None = dataclasses.field(default=None, metadata={"file": False})
    # plugin id -> {"user", "password"} or {"token"}: its own NATS credentials
    plugin_broker_auth: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # (resolved value, its placeholder) of each ${...} the file's text had:
    # what every echo of the configuration hides (_hide_secrets)
    secrets: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False,
                                                          metadata={"file": False})


def _file_default(field: dataclasses.Field) -> Any:
    """A ``DaemonConfig`` field's default as ``pollers.json`` would spell it."""
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return list(value) if isinstance(value, tuple) else value


# The top-level keys of pollers.json and their defaults: DaemonConfig's fields.
_TOP_DEFAULTS = {f.name: _file_default(f) for f in dataclasses.fields(DaemonConfig)
                 if f.metadata.get("file", True)}      # not the file's: where it came from


def _jitter_ms(schedule: Schedule, config: DaemonConfig) -> tuple[int, str]:
    """The one jitter rule: a job's own (``jitter_ms``, or its schedule's
    ``stagger_jitter_ms``: the same setting), else ``default_jitter_ms``;
    with where it came from ("job", "config" or "default")."""
    if schedule.stagger_jitter_ms is not None:
        return schedule.stagger_jitter_ms, "job"
    return config.default_jitter_ms, _global_source(config, "default_jitter_ms")


def _global_source(config: DaemonConfig, key: str) -> str:
    """"config" when the top-level ``key`` sets a value other than the built-in one."""
    return "default" if getattr(config, key) == _TOP_DEFAULTS[key] else "config"


@dataclasses.dataclass(frozen=True)
class JobPolicy:
    """A job's effective policy: its own keys over the global ones.  The one
    place that decides them; ``sources`` says per key where each value came
    from: "job" (the job's key), "config" (the top-level key) or "default".
    ``timeout_secs`` None: the tick budget of the job's kind (the plugin's
    ``tick_timeout_secs``; 5 s in-process) applies."""
    timeout_secs: float | None
    backoff_initial_secs: float
    backoff_max_secs: float
    breaker_threshold: int
    failure_alert_cooldown_secs: float
    jitter_ms: int
    catchup: str
    catchup_window_secs: float | None
    run_history: int
    sources: Mapping[str, str]

    @classmethod
    def of(cls, config: DaemonConfig, job: JobConfig) -> "JobPolicy":
        # Asked at every tick: a policy worked out is kept under what it was
        # worked out from (the global values, the job's keys and jitter), so
        # 100,000 jobs on a few policies share a few, never out of date.
        key = (_policy_globals(config),
               tuple(sorted(job.overrides.items())), job.schedule.stagger_jitter_ms)
        try:
            policy = _POLICIES.get(key)
        except TypeError:               # an unhashable value set in code: not kept
            return cls._work_out(config, job)
        if policy is None:
            if len(_POLICIES) >= 1024:
                _POLICIES.clear()
            policy = _POLICIES[key] = cls._work_out(config, job)
        return policy

    @classmethod
    def _work_out(cls, config: DaemonConfig, job: JobConfig) -> "JobPolicy":
        """The rule (``of`` keeps what it gives); reads no more than ``of``'s key."""
        values, sources = {}, {}
        for key, (fallback, *_) in _JOB_POLICY_KEYS.items():
            if key == "jitter_ms":
                values[key], sources[key] = _jitter_ms(job.schedule, config)
            elif key in job.overrides:
                values[key], sources[key] = job.overrides[key], "job"
            elif fallback is None:
                values[key], sources[key] = None, "default"
            else:
                values[key], sources[key] = getattr(config, fallback), _global_source(
                    config, fallback)
        return cls(sources=types.MappingProxyType(sources), **values)


# The top-level keys a job's policy falls back to: with the job's own keys
# and jitter, all that JobPolicy.of's rule reads, so the key of its memo.
_POLICY_GLOBALS = tuple(sorted({f for f, *_ in _JOB_POLICY_KEYS.values() if f is not None}))
# Their values in one C call.  (With a generator expression here instead,
# figure 7's traced high-water mark grew 23-33 bytes a tick, not ~1.)
_policy_globals = operator.attrgetter(*_POLICY_GLOBALS)
_POLICIES: dict[tuple, JobPolicy] = {}


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


def _plugin_broker_auth(doc: Any, cfg: DaemonConfig, where: str, probs: _Problems) -> None:
    """``plugin_broker_auth``: each supervised plugin's own NATS credentials."""
    if not _check_type(probs, where, doc, dict, "an object: plugin id -> credentials"):
        return
    if doc and not _is_nats(cfg.broker):
        probs.add(where, "only a nats:// or tls:// broker takes per-plugin credentials")
        return
    ids = {h.plugin_id for h in cfg.plugins}
    for pid, auth in doc.items():
        at = f"{where}.{pid}"
        if pid not in ids:
            probs.add(at, f"no plugin {pid!r} in \"plugins\"")
        elif not _check_type(probs, at, auth, dict,
                             'an object: {"user", "password"} or {"token"}'):
            pass
        elif set(auth) not in ({"user", "password"}, {"token"}) or not all(
                isinstance(v, str) and v for v in auth.values()):
            probs.add(at, 'must be {"user": "...", "password": "..."} or {"token": "..."} '
                          "with non-empty strings")
        else:
            cfg.plugin_broker_auth[pid] = dict(auth)


def _check_policy_value(probs: _Problems, path: str, key: str, value: Any) -> bool:
    """A policy key's value (a job's or the global one) against its type and
    range in ``_JOB_POLICY_KEYS``; True when it is good."""
    _, low, high, integer = _JOB_POLICY_KEYS[key]
    if isinstance(low, tuple):                          # a choice
        if value not in low or not isinstance(value, str):
            probs.add(path, f"{value!r:.40} must be one of "
                            + ", ".join(f'"{c}"' for c in low))
            return False
        return True
    if value is None and key == "catchup_window_secs":  # no window
        return True
    if not _check_type(probs, path, value, int if integer else (int, float),
                       "an integer" if integer else "a number"):
        return False
    if not low <= value <= high:
        probs.add(path, f"{value} is outside {low}..{high}")
        return False
    return True


def _check_type(probs: _Problems, path: str, value: Any, kinds, what: str) -> bool:
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in (
        kinds if isinstance(kinds, tuple) else (kinds,)))
    if not ok:
        probs.add(path, f"must be {what}, got {_json_type(value)}")
    return ok


# ${...} placeholders, resolved on the file's text before it is parsed, as
# nexo's config loader does (crates/config/src/env.rs): ${VAR}, ${VAR:-default}
# (default when unset or empty), ${VAR-default} (default when unset) and
# ${file:path} (the file's content, trimmed).
_SECRETS_DIR_ENV = "CONFIG_SECRETS_DIR"
_SECRET_ROOTS = ("/run/secrets", "/var/run/secrets")
_SECRET_MIN_LEN = 4     # shorter values are not hidden: they would garble numbers


def _resolve_placeholders(text: str, source: str, *, syntax: str = "json"
                          ) -> tuple[str, list[tuple[str, str]]]:
    """``text`` with every placeholder replaced, and the (value, placeholder)
    pairs of the values that came from the environment or a file.

    ``syntax`` is the file's: "yaml" skips placeholders in ``#`` comments
    (a ``#`` outside quotes starts one, to the line's end, as nexo scans) and
    inserts values as they are; "json" has no comments (every placeholder is
    resolved) and escapes a value inserted inside a JSON string, so a secret
    holding ``"`` or ``\\`` stays that secret.  Raises ``ConfigError`` naming
    the placeholder, its line and ``source``."""
    if "${" not in text:                    # most files: no scan needed
        return text, []
    out: list[str] = []
    secrets: list[tuple[str, str]] = []
    comment = in_single = in_double = False
    i = last = 0
    while i + 1 < len(text):
        c = text[i]
        if c == "\n":
            comment = in_single = in_double = False
        elif comment:
            pass
        elif syntax == "json" and in_double and c == "\\":
            i += 1                          # an escaped character never ends the string
        elif c == "#" and syntax == "yaml" and not (in_single or in_double):
            comment = True
        elif c == "'" and syntax == "yaml" and not in_double:
            in_single = not in_single
        elif c == '"' and not in_single:
            in_double = not in_double
        elif c == "$" and text[i + 1] == "{":
            end, depth = i + 2, 1
            while end < len(text) and depth:            # braces nest: ${A:-{b}}
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            line = text.count("\n", 0, i) + 1
            if depth:
                raise ConfigError(source, [("", f"line {line}: {text[i:i + 40]!r}: a "
                                                "placeholder ${ without its closing }")])
            inner = text[i + 2:end - 1]
            value, secret = _placeholder_value(inner, f"{source}, line {line}")
            if secret and len(value) >= _SECRET_MIN_LEN:
                secrets.append((value, "${" + inner + "}"))
            if syntax == "json" and in_double:
                value = json.dumps(value, ensure_ascii=False)[1:-1]
            out += (text[last:i], value)
            i = last = end
            continue
        i += 1
    out.append(text[last:])
    return "".join(out), secrets


def _placeholder_value(inner: str, where: str) -> tuple[str, bool]:
    """One placeholder's value, and whether it came from outside the file."""
    def fail(message: str) -> ConfigError:
        return ConfigError(where, [("", "${" + inner + "}: " + message)])

    if inner.startswith("file:"):
        ref = inner[5:]
        problem = _secret_file_problem(ref)
        if problem:
            raise fail(f"refusing to read {ref!r}: {problem}")
        try:
            with open(ref, encoding="utf-8") as fh:
                return fh.read().strip(), True
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"cannot read file {ref!r}: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    colon = inner.find(":-")
    dash = colon if colon >= 0 else inner.find("-")
    if dash > 0 or colon == 0:              # ${VAR:-default} or ${VAR-default}
        skip = 2 if colon >= 0 else 1
        value = os.environ.get(inner[:dash].strip())
        if value is None or (colon >= 0 and not value):
            return inner[dash + skip:], False
        return value, True
    value = os.environ.get(inner.strip())
    if value is None:
        raise fail(f"environment variable {inner.strip()} is not set (give it, or a "
                   "default: ${" + inner.strip() + ":-default})")
    return value, True


def _secret_file_problem(ref: str) -> str | None:
    """Why ``${file:ref}`` may not be read, or None: no ``..``; an absolute
    path only under a secrets root (nexo's rule, so a config cannot read any
    file); a relative one is read from the working directory, as nexo does."""
    import pathlib
    path = pathlib.PurePosixPath(ref)
    if ".." in path.parts:
        return "`..` not allowed in file reference"
    if not path.is_absolute():
        return None
    roots = [*_SECRET_ROOTS, os.path.join(os.getcwd(), "secrets")]
    if os.environ.get(_SECRETS_DIR_ENV):    # empty: unset (nexo's "" would admit all)
        roots.append(os.environ[_SECRETS_DIR_ENV])
    if any(path.is_relative_to(root) for root in roots):
        return None
    return f"absolute paths must be under {', '.join(roots)} or ${_SECRETS_DIR_ENV}"


def _hide_secrets(value: Any, secrets: Iterable[tuple[str, str]]) -> Any:
    """``value`` (strings, lists, dicts, tuples of them) with every resolved
    secret shown as the placeholder it came from, as the file has it."""
    pairs = sorted(secrets, key=lambda p: -len(p[0]))
    if not pairs:
        return value

    def hide(v):
        if isinstance(v, str):
            for secret, placeholder in pairs:
                v = v.replace(secret, placeholder)
            return v
        if isinstance(v, dict):
            return {hide(k): hide(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(hide(x) for x in v)
        return v
    return hide(value)


def load_config(path: str | os.PathLike, *, extra_kinds: Iterable[str] = (),
                check_entrypoints: bool = False) -> DaemonConfig:
    """Read and validate ``pollers.json``; raises ``ConfigError`` listing every problem.

    A ``.yaml``/``.yml`` file is read as YAML (nexo's ``pollers.yaml``), its
    problems given at their line and column.  ``extra_kinds`` are kinds
    served in-process (registered with ``Runner.register``), so jobs may name
    them.  ``check_entrypoints`` also checks that every plugin's command can
    start (``validate``).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read: {exc.strerror or exc}")]) from None
    return _config_from_bytes(data, path, yaml=path.lower().endswith((".yaml", ".yml")),
                              extra_kinds=extra_kinds, check_entrypoints=check_entrypoints)


def _config_from_bytes(data: bytes, path: str, *, yaml: bool, extra_kinds: Iterable[str] = (),
                       check_entrypoints: bool = False) -> DaemonConfig:
    """``load_config`` of a file's bytes, read from ``path`` (its relative paths
    are relative to its folder)."""
    try:
        text = data.decode("utf-8")
        text, secrets = _resolve_placeholders(text, path, syntax="yaml" if yaml else "json")
        doc = None if yaml else json.loads(text, object_pairs_hook=_no_duplicate_keys,
                                           parse_constant=_reject_constant,
                                           parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [("", f"not UTF-8 text (byte {exc.start})")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(path, [("", f"invalid JSON at line {exc.lineno} column "
                                      f"{exc.colno}: {exc.msg}")]) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(path, [("", f"invalid JSON: {exc}")]) from None
    try:
        if yaml:
            cfg = _config_from_yaml(text, path, extra_kinds=extra_kinds,
                                    check_entrypoints=check_entrypoints)
        else:
            cfg = config_from_dict(doc, base_dir=os.path.dirname(path), source=path,
                                   extra_kinds=extra_kinds, check_entrypoints=check_entrypoints)
    except ConfigError as exc:          # a problem may quote a value: never a secret
        raise ConfigError(exc.source, _hide_secrets(exc.problems, secrets)) from None
    cfg.secrets = tuple(secrets)
    return cfg


def _config_from_yaml(text: str, path: str, **options: Any) -> DaemonConfig:
    """A YAML configuration: nexo's, so its cron is read as nexo reads it unless
    the file says ``cron_dialect``; each problem points at its YAML line."""
    doc, where = _read_yaml(text, path)
    top = doc.get("pollers") if isinstance(doc, dict) else None
    top = top if isinstance(top, dict) else doc
    if isinstance(top, dict) and "cron_dialect" not in top:
        top["cron_dialect"] = "nexo"
    lines: dict[str, tuple[int, int]] = {}
    for key_path, at in where.items():
        dotted = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in key_path)
        lines[dotted.lstrip(".")] = at
    try:
        return config_from_dict(doc, base_dir=os.path.dirname(path), source=path, **options)
    except ConfigError as exc:
        located = []
        for problem_path, message in exc.problems:
            # A missing key has no line: point at the nearest enclosing node.
            near = problem_path
            while near not in lines and near:
                near = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", near) if re.search(
                    r"[.\[]", near) else ""
            line, col = lines.get(near, (1, 1))
            located.append((f"{line}:{col}: {problem_path}" if problem_path
                            else f"{line}:{col}", message))
        if len(located) == 1:
            where_at, message = located[0]
            at, _, rest = where_at.partition(": ")
            raise ConfigError(f"{path}:{at}", [(rest, message)]) from None
        raise ConfigError(path, located) from None


# What _convert_nexo_config compares between the YAML and the JSON it writes:
# this many next fire times of each job, from now, before nexo's last year
# (its cron fires no more after 2100; Vixie's goes on).
_CONVERT_CHECK_FIRES = 50
_NEXO_CRON_END = datetime(2101, 1, 1, tzinfo=timezone.utc).timestamp()


def _convert_nexo_config(path: str) -> tuple[str, list[str]]:
    """``convert-config``: nexo's YAML config at ``path`` as the pollers.json
    that reads the same, and one line per change (job, key, before -> after,
    why) and per note.  Converted from the file's text as written, so every
    ${...} placeholder stays one (a value never appears); the YAML is loaded
    (placeholders resolved) and so is the result, and both must give the
    same jobs and fire times.  Raises ``ConfigError``."""
    path = os.path.abspath(path)
    if not path.lower().endswith((".yaml", ".yml")):
        raise ConfigError(path, [("", "convert-config reads a nexo YAML config (.yaml or "
                                      ".yml); this is not one")])
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:                                    # it loads as it is (a plugin serves each kind)
        config, kinds = _config_from_bytes(data, path, yaml=True), ()
    except ConfigError as first:            # or nexo built its kinds in (gmail, rss...)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise first from None
        kinds = _named_kinds(_read_yaml(_resolve_placeholders(text, path, syntax="yaml")[0],
                                        path)[0])
        config = _config_from_bytes(data, path, yaml=True, extra_kinds=kinds)
    try:
        raw = _read_yaml(data.decode("utf-8"), path)[0]
        resolved = _read_yaml(_resolve_placeholders(data.decode("utf-8"), path,
                                                    syntax="yaml")[0], path)[0]
    except ConfigError as exc:
        raise ConfigError(path, [("", f"its placeholders cannot be kept as written: {exc}")]
                          ) from None
    tokens: dict[str, str] = {}
    doc = _unquoted_placeholders(raw, resolved, "", tokens, path)
    changes = [f"note: job {jc.id}: kind {jc.kind!r}: no plugin in this file serves it "
               "(nexo built it in): list one under \"plugins\" before running the job"
               + (f" (or give it the built-in {jc.kind} kind's keys: "
                  f"{_builtin_config_problem(jc.kind, jc.config)})"
                  if jc.kind in BUILTIN_KINDS else "")
               for jc in config.jobs if jc.kind in kinds]
    out = _converted_doc(doc, config)
    changes = out.pop(None) + changes
    text = json.dumps(out, indent=2, ensure_ascii=False)
    for marker, token in tokens.items():
        text = text.replace(json.dumps(marker), token)
    target = os.path.join(os.path.dirname(path), "pollers.json")
    converted = _config_from_bytes(text.encode("utf-8"), target, yaml=False, extra_kinds=kinds)
    problem = _reads_differently(config, converted)
    if problem:
        raise ConfigError(path, [("", f"the converted pollers.json would read differently "
                                      f"({problem}); nothing written")])
    return text + "\n", changes


def _named_kinds(doc: Any) -> tuple[str, ...]:
    """The kinds a parsed config's jobs name that nothing built in serves as
    the job is written: not built in, or built in with other keys (nexo's
    gmail job reads Google's API; the built-in gmail kind reads IMAP)."""
    top = doc.get("pollers", doc) if isinstance(doc, dict) else None
    jobs = top.get("jobs") if isinstance(top, dict) else None
    if not isinstance(jobs, list):
        return ()
    return tuple(sorted({j["kind"] for j in jobs if isinstance(j, dict) and isinstance(
        j.get("kind"), str) and (j["kind"] not in BUILTIN_KINDS or _builtin_config_problem(
            j["kind"], j.get("config")) is not None)}))


def _unquoted_placeholders(raw: Any, resolved: Any, at: str, tokens: dict[str, str],
                           path: str) -> Any:
    """``raw`` (the YAML as written) with each placeholder that stands for a
    number, boolean or null (``breaker_threshold: ${N}``) replaced by a
    marker that ``tokens`` maps to the placeholder, unquoted in JSON."""
    if isinstance(raw, dict) and isinstance(resolved, dict):
        return {k: _unquoted_placeholders(v, resolved.get(k), f"{at}.{k}".lstrip("."),
                                          tokens, path) for k, v in raw.items()}
    if isinstance(raw, list) and isinstance(resolved, list) and len(raw) == len(resolved):
        return [_unquoted_placeholders(v, r, f"{at}[{i}]", tokens, path)
                for i, (v, r) in enumerate(zip(raw, resolved))]
    if not isinstance(raw, str) or "${" not in raw or isinstance(resolved, str):
        return raw
    if isinstance(resolved, (dict, list)) or not re.fullmatch(r"\$\{[^{}]*\}", raw):
        raise ConfigError(path, [(at, f"{raw!r} resolves to a YAML {_json_type(resolved)}"
                                      ": JSON cannot keep it as a placeholder "
                                      "(write the value, or a placeholder for a string)")])
    marker = f"\0placeholder {len(tokens)}\0"
    tokens[marker] = raw
    return marker


def _converted_doc(doc: Any, config: DaemonConfig) -> dict:
    """The pollers.json of nexo's parsed YAML ``doc`` (placeholders as written),
    loaded as ``config``; under the key None, the lines saying what changed."""
    said: list[str] = []

    def change(job: str | None, key: str, before: Any, after: Any, why: str) -> None:
        show = lambda v: v if isinstance(v, _Shown) else json.dumps(v, ensure_ascii=False)  # noqa
        said.append(f"{'job ' + job if job else 'file'}: {key}: {show(before)} → "
                    f"{show(after)}: {why}")

    gone = _Shown("(removed)")
    if "schema_version" in doc:
        change(None, "schema_version", doc["schema_version"], gone,
               "nexo's config version; pollers.json has none")
    if "pollers" in doc:
        change(None, "pollers", _Shown("{...}"), gone, "its keys are pollers.json's top level")
    top = dict(doc.get("pollers", {k: v for k, v in doc.items() if k != "schema_version"}))
    jobs = [dict(j, schedule=dict(j["schedule"])) for j in top.get("jobs", [])]
    # cron: nexo's dialect rewritten as Vixie when every cron has a Vixie twin;
    # else the file keeps nexo's dialect and every cron as written
    if config.cron_dialect == "nexo":
        rewritten, kept, crons = {}, None, False
        for raw, jc in zip(jobs, config.jobs):
            cron = raw["schedule"].get("cron")
            if cron is None:
                continue
            crons = True
            if raw["schedule"].get("tz") not in (None, "UTC", "Etc/UTC"):
                said.append(f"note: job {jc.id}: schedule.tz {raw['schedule']['tz']!r} kept: "
                            "nexo ignored it (ran in UTC), nexo-poller honours it in both "
                            "files (drop it to fire as nexo did)")
            vixie, why = (None, "it is a placeholder (its value is not known until it "
                                "loads)") if "${" in cron else _nexo_cron_as_vixie(
                jc.schedule.cron)
            if vixie is None:
                kept = kept or f"job {jc.id}'s cron {cron!r} has no Vixie equivalent: {why}"
            elif vixie != cron:
                rewritten[jc.id] = (vixie, why)
        before = top.pop("cron_dialect", _Shown("(none: nexo, a YAML file's default)"))
        if kept:
            change(None, "cron_dialect", before, "nexo", f"kept, so every cron fires as in "
                   f"nexo ({kept}); every cron is left as written")
            jobs_at = list(top).index("jobs") if "jobs" in top else len(top)
            top = dict([*list(top.items())[:jobs_at], ("cron_dialect", "nexo"),
                        *list(top.items())[jobs_at:]])
        elif crons or before == "nexo":
            change(None, "cron_dialect", before, _Shown("(none: vixie, pollers.json's "
                                                         "default)"),
                   "the crons below are rewritten to fire at the same times")
            for raw, jc in zip(jobs, config.jobs):
                if jc.id in rewritten:
                    vixie, why = rewritten[jc.id]
                    change(jc.id, "schedule.cron", raw["schedule"]["cron"], vixie, why)
                    raw["schedule"]["cron"] = vixie
    for raw, jc in zip(jobs, config.jobs):
        if jc.repause_on_boot and "repause_on_boot" not in raw:
            change(jc.id, "repause_on_boot", _Shown("(none)"), True, "nexo pauses a paused_on_boot "
                   "job again at every start; in pollers.json only with this key")
            at = list(raw).index("paused_on_boot") + 1
            items = list(raw.items())
            raw.clear()
            raw.update(items[:at] + [("repause_on_boot", True)] + items[at:])
    if "jobs" in top:
        top["jobs"] = jobs
    top[None] = said
    return top


class _Shown(str):
    """A value a change line shows as it is, not as JSON."""


def _reads_differently(a: DaemonConfig, b: DaemonConfig) -> str | None:
    """What differs between two loaded configurations (cron by fire times,
    not text), or None."""
    for key in _TOP_DEFAULTS:
        if key not in ("jobs", "plugins", "cron_dialect") and getattr(a, key) != getattr(b, key):
            return key
    if [h.plugin_id for h in a.plugins] != [h.plugin_id for h in b.plugins]:
        return "plugins"
    if len(a.jobs) != len(b.jobs):
        return "jobs"
    now = time.time()
    for x, y in zip(a.jobs, b.jobs):
        plain = [dataclasses.replace(j, raw_json="{}", schedule=dataclasses.replace(
            j.schedule, cron=None)) for j in (x, y)]
        if plain[0] != plain[1]:
            return f"job {x.id}"
        fires = [[t for t in _fire_times(j.schedule, now, _CONVERT_CHECK_FIRES)
                  if t < _NEXO_CRON_END] for j in (x, y)]
        if fires[0] != fires[1]:
            return f"job {x.id}'s fire times"
    return None


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise InputError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _config_state(config: "DaemonConfig", *, readonly: bool = False,
                  location: str | None = None) -> StateStore:
    """The state store a configuration names (a file, or a bucket on its NATS
    broker), or the one at ``location`` reached the same way."""
    tls = {f"tls_{k}": v for k, v in config.broker_tls.items()}
    return open_state(location or config.state_db, readonly=readonly,
                      broker_url=config.broker if _is_nats(config.broker) else None,
                      broker_opts=tls or None, daemon_ttl=config.daemon_ttl_secs)


def _redact_url(url: str | None) -> str | None:
    """A broker URL fit for a log line: credentials replaced by ``***``."""
    return None if url is None else re.sub(r"://[^@/,]*@", "://***@", url)


def config_from_dict(doc: Any, *, base_dir: str = ".", source: str | None = None,
                     extra_kinds: Iterable[str] = (), check_entrypoints: bool = False
                     ) -> DaemonConfig:
    """Validate an already-parsed configuration (see ``load_config``)."""
    probs = _Problems()
    prefix = ""
    if isinstance(doc, dict) and "schema_version" in doc:
        doc = _without_schema_version(doc, source)
    if isinstance(doc, dict) and set(doc) == {"pollers"}:
        doc, prefix = doc["pollers"], "pollers."
    if not isinstance(doc, dict):
        raise ConfigError(source, [("", f"must be a JSON object, got {_json_type(doc)}")])
    for key in sorted(set(doc) - set(_TOP_DEFAULTS)):
        probs.add(prefix + key, f"unknown key (allowed: {', '.join(sorted(_TOP_DEFAULTS))})")
    cfg = DaemonConfig(source=source)
    get = lambda key: doc.get(key, _TOP_DEFAULTS[key])  # noqa: E731

    def number(key, low, high, integer=False):
        value = get(key)
        kinds = int if integer else (int, float)
        if _check_type(probs, prefix + key, value, kinds,
                       "an integer" if integer else "a number"):
            if not low <= value <= high:
                probs.add(prefix + key, f"{value} is outside {low}..{high}")
            else:
                setattr(cfg, key, value)

    if _check_type(probs, prefix + "enabled", get("enabled"), bool, "true or false"):
        cfg.enabled = get("enabled")
    if _check_type(probs, prefix + "state_db", get("state_db"), str, "a file path") and \
            (not get("state_db").strip() or "\0" in get("state_db")):
        probs.add(prefix + "state_db", "must be a non-empty path without NUL characters")
    elif isinstance(get("state_db"), str):
        try:
            cfg.state_db = _state_backend(get("state_db")).resolve_location(get("state_db"),
                                                                           base_dir)
        except ValueError as exc:
            probs.add(prefix + "state_db", str(exc))
    number("default_jitter_ms", *_JOB_POLICY_KEYS["jitter_ms"][1:])
    number("lease_ttl_factor", 1.0, 100.0)
    number("lease_min_secs", 5, 86400)
    number("daemon_ttl_secs", 1, 3600)
    for key in ("failure_alert_cooldown_secs", "breaker_threshold", "backoff_initial_secs",
                "backoff_max_secs", "run_history"):
        number(key, *_JOB_POLICY_KEYS[key][1:])
    for key in ("catchup", "catchup_window_secs"):
        if _check_policy_value(probs, prefix + key, key, get(key)):
            setattr(cfg, key, get(key))
    number("max_workers", 1, 4096, integer=True)
    number("plugin_crash_limit", *_CRASH_LIMIT_RANGE, integer=True)
    number("plugin_crash_window_secs", *_CRASH_WINDOW_RANGE)
    number("shutdown_grace_secs", 0.1, 3600)
    number("delivery_max_attempts", 1, 10 ** 6, integer=True)
    number("delivery_max_age_secs", 1, 86400 * 365)
    number("delivery_retry_initial_secs", 0.001, 3600)
    number("delivery_retry_max_secs", 0.001, 86400)
    agents = get("agents")
    if _check_type(probs, prefix + "agents", agents, dict, "an object of agent -> channels"):
        for agent, channels in agents.items():
            where = f"{prefix}agents.{agent}"
            if not _check_type(probs, where, channels, dict, "an object of channel -> instance"):
                continue
            for channel, instance in channels.items():
                if not _TOPIC_TOKEN_RE.fullmatch(channel):
                    probs.add(f"{where}.{channel}", "a channel name is a topic token "
                                                    "(letters, digits, '_' and '-')")
                elif _check_type(probs, f"{where}.{channel}", instance, str,
                                 "an instance name") and not _TOPIC_TOKEN_RE.fullmatch(instance):
                    probs.add(f"{where}.{channel}", f"{instance!r} is not a topic token "
                                                    "(letters, digits, '_' and '-')")
            cfg.agents[agent] = dict(channels)
    sink = get("delivery_sink")
    if _check_type(probs, prefix + "delivery_sink", sink, str, '"broker" or an http(s) URL'):
        if sink != "broker" and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", sink):
            probs.add(prefix + "delivery_sink",
                      f"{sink!r} must be \"broker\" or an http:// or https:// URL")
        else:
            cfg.delivery_sink = sink
    dialect = get("cron_dialect")
    if not _check_type(probs, prefix + "cron_dialect", dialect, str, '"vixie" or "nexo"'):
        pass                                # said: not a string
    elif dialect in _CRON_DIALECTS:
        cfg.cron_dialect = dialect
    else:
        probs.add(prefix + "cron_dialect", f"{dialect!r} must be \"vixie\" or \"nexo\" "
                  "(Vixie cron, the default; or cron as nexo reads it: seconds first, an "
                  "optional year, 1 = Sunday, day of month AND day of week)")
    if _check_type(probs, prefix + "alert_topic", get("alert_topic"), str, "a topic string"):
        cfg.alert_topic = get("alert_topic")
    broker = get("broker")
    if broker is not None and _check_type(probs, prefix + "broker", broker, str,
                                          "a unix://, nats:// or tls:// URL, or null"):
        if _is_nats(broker):
            try:
                _nats_servers(broker)
                cfg.broker = broker
            except PluginPollerForwardError as exc:
                probs.add(prefix + "broker", str(exc))
        elif not broker.startswith("unix://") or len(broker) <= 7 or "\0" in broker:
            probs.add(prefix + "broker", f"{broker!r} must look like unix:///path/broker.sock, "
                                         "nats://host:4222 or tls://host:4222")
        else:
            cfg.broker = "unix://" + os.path.normpath(os.path.join(base_dir, broker[7:]))
    tls = get("broker_tls")
    if tls is not None and _check_type(probs, prefix + "broker_tls", tls, dict,
                                       "an object with ca_file, cert_file, key_file"):
        for key in sorted(set(tls) - {"ca_file", "cert_file", "key_file"}):
            probs.add(f"{prefix}broker_tls.{key}", "unknown key (allowed: ca_file, cert_file, "
                                                   "key_file)")
        for key in ("ca_file", "cert_file", "key_file"):
            value = tls.get(key)
            if value is not None and _check_type(probs, f"{prefix}broker_tls.{key}", value, str,
                                                 "a file path"):
                full = os.path.normpath(os.path.join(base_dir, value))
                if not os.path.isfile(full):
                    probs.add(f"{prefix}broker_tls.{key}", f"{full}: no such file")
                cfg.broker_tls[key] = full
        if tls and not _is_nats(cfg.broker):
            probs.add(prefix + "broker_tls", "only a nats:// or tls:// broker uses TLS options")
    broker_problem = _state_backend(cfg.state_db).broker_problem(cfg.broker)
    if broker_problem:
        probs.add(prefix + "state_db", broker_problem)
    for key, example in (("metrics_addr", "127.0.0.1:9464"), ("admin_addr", "127.0.0.1:9091")):
        addr = get(key)
        if addr is not None and _check_type(probs, prefix + key, addr, str,
                                            "\"host:port\" or null"):
            host, _, port = addr.rpartition(":")
            if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
                probs.add(prefix + key, f"{addr!r} must look like {example}")
            else:
                setattr(cfg, key, (host.strip("[]"), int(port)))
    token_file = get("admin_token_file")
    if token_file is not None and _check_type(probs, prefix + "admin_token_file", token_file,
                                              str, "a file path or null"):
        if not token_file.strip() or "\0" in token_file:
            probs.add(prefix + "admin_token_file", "must be a non-empty path without NUL "
                                                   "characters (the token itself never goes here)")
        else:
            cfg.admin_token_file = os.path.normpath(os.path.join(base_dir, token_file))
    hosts = get("admin_allowed_hosts")
    if _check_type(probs, prefix + "admin_allowed_hosts", hosts, list,
                   'an array of host names (["nexo.example.com"])'):
        for i, name in enumerate(hosts):
            if not isinstance(name, str) or not _HOST_NAME_RE.fullmatch(name):
                probs.add(f"{prefix}admin_allowed_hosts[{i}]",
                          f"{name!r} must be a host name or address as a proxy sends it in "
                          "Host, without a port (nexo.example.com, 10.0.0.5, [fd00::5])")
        cfg.admin_allowed_hosts = tuple(_host_name(n) for n in hosts if isinstance(n, str))

    owners = PluginPollerRouter()               # the one rule: one owner per kind
    owners.offer_builtin(BUILTIN_KINDS)
    owners.claim_in_process(extra_kinds)
    plugins = get("plugins")
    if _check_type(probs, prefix + "plugins", plugins, list, "an array of paths"):
        for i, entry in enumerate(plugins):
            where = f"{prefix}plugins[{i}]"
            if not _check_type(probs, where, entry, str, "a path"):
                continue
            full = os.path.normpath(os.path.join(base_dir, entry))
            if os.path.isdir(full):         # nexo's stdio extensions have a plugin.toml
                toml = os.path.join(full, "nexo-plugin.toml")
                nexo = os.path.join(full, "plugin.toml")
                full = nexo if not os.path.exists(toml) and os.path.exists(nexo) else toml
            try:
                handle = load_manifest(full)
            except ManifestError as exc:
                probs.add(where, str(exc))
                continue
            for problem in entrypoint_problems(handle) if check_entrypoints else ():
                probs.add(where, f"{full}: [plugin.entrypoint] {problem}")
            # A stdio plugin is always ours to start; a long-lived one may run
            # elsewhere when the broker is NATS.
            rules = _lifecycle_rules(handle)
            if rules.supervised and not handle.entrypoint_command \
                    and not (rules.remote_on_nats and _is_nats(cfg.broker)):
                what = handle.lifecycle.value.replace("_", "-")
                probs.add(where, f"{full}: [plugin.entrypoint] command is required for a "
                                 f"{what} plugin (the daemon starts it at boot; only a "
                                 "long-lived plugin on a NATS broker may run elsewhere)")
                continue
            if any(h.plugin_id == handle.plugin_id for h in cfg.plugins):
                probs.add(where, f"plugin id {handle.plugin_id!r} is listed twice")
                continue
            try:
                owners.register(handle)
            except PollerRouteRegistrationError.DuplicateKind as exc:
                owner = exc.existing_plugin
                probs.add(where, f"kind {exc.kind!r} is claimed by "
                                 f"{owner if owner == owners.IN_PROCESS else f'plugin {owner!r}'} "
                                 f"and by plugin {handle.plugin_id!r}")
            cfg.plugins.append(handle)
    _plugin_broker_auth(get("plugin_broker_auth"), cfg, prefix + "plugin_broker_auth", probs)

    jobs = get("jobs")
    ids: set[str] = set()
    schedules: dict[tuple, Schedule] = {}      # the jobs' shared schedules
    if _check_type(probs, prefix + "jobs", jobs, list, "an array of jobs"):
        for i, raw in enumerate(jobs):
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            duplicate = isinstance(raw_id, str) and raw_id in ids
            if duplicate:                   # said even when the job has other problems
                probs.add(f"{prefix}jobs[{i}].id", f"duplicate job id {raw_id!r}")
            elif isinstance(raw_id, str):
                ids.add(raw_id)
            job = _job_from_dict(raw, f"{prefix}jobs[{i}]", probs, owners, cfg.cron_dialect,
                                 schedules)
            if job is not None and not duplicate:
                cfg.jobs.append(job)
    if probs.items:
        raise ConfigError(source, probs.items)
    return cfg


# The versions of nexo's config files (its LATEST_SCHEMA_VERSION in
# crates/config/src/migrations.rs; 0 = before versioning).  Nothing in
# pollers.yaml changed meaning across them, so each reads the same.
_NEXO_SCHEMA_VERSIONS = range(0, 12)


def _without_schema_version(doc: dict, source: str | None) -> dict:
    """The document without its top-level ``schema_version`` (what ``nexo
    setup migrate`` writes), once the version is known to be one we read."""
    version = doc["schema_version"]
    known = _NEXO_SCHEMA_VERSIONS
    if not isinstance(version, int) or isinstance(version, bool) or version < known.start:
        raise ConfigError(source, [("schema_version", f"must be an integer {known.start}.."
                                    f"{known.stop - 1} (nexo's config versions), got "
                                    f"{json.dumps(version, default=str)}")])
    if version not in known:
        raise ConfigError(source, [("schema_version", f"{version} is newer than the "
                                    f"versions this nexo-poller reads ({known.start}.."
                                    f"{known.stop - 1}): a newer nexo wrote this file")])
    return {k: v for k, v in doc.items() if k != "schema_version"}


def _job_from_dict(raw: Any, where: str, probs: _Problems, owners: PluginPollerRouter,
                   cron_dialect: str = "vixie",
                   schedules: dict[tuple, Schedule] | None = None) -> JobConfig | None:
    """One job of the file, checked (its problems go to ``probs``).
    ``schedules``: the Schedules made so far for this file, by their text:
    a job written with one of them shares it."""
    if not _check_type(probs, where, raw, dict, "an object"):
        return None
    before = len(probs.items)
    for key in sorted(set(raw) - _JOB_KEYS):
        probs.add(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(_JOB_KEYS))})")
    job_id, kind, agent = raw.get("id"), raw.get("kind"), raw.get("agent", "default")
    if _check_type(probs, f"{where}.id", job_id, str, "a string"):
        if not _JOB_ID_RE.fullmatch(job_id):
            probs.add(f"{where}.id", f"{job_id!r} must be 1-128 letters, digits or _.:- "
                                     "starting with a letter or digit")
    if _check_type(probs, f"{where}.kind", kind, str, "a string") \
            and owners.owner(kind) is None:
        known = ", ".join(owners.kinds()) or "none"
        probs.add(f"{where}.kind", f"no plugin or in-process poller serves kind {kind!r} "
                                   f"(known kinds: {known})")
    _check_type(probs, f"{where}.agent", agent, str, "a string")
    failure_to = raw.get("failure_to")
    if failure_to is not None and _check_type(probs, f"{where}.failure_to", failure_to, dict,
                                              "an object {channel, to}"):
        for key in sorted(set(failure_to) - {"channel", "to"}):
            probs.add(f"{where}.failure_to.{key}", "unknown key (allowed: channel, to)")
        channel = failure_to.get("channel")
        if isinstance(channel, str) and not _TOPIC_TOKEN_RE.fullmatch(channel):
            probs.add(f"{where}.failure_to.channel", f"{channel!r} is not a topic token "
                                                     "(letters, digits, '_' and '-')")
        for key in ("channel", "to"):
            _check_type(probs, f"{where}.failure_to.{key}", failure_to.get(key), str, "a string")
    if _check_type(probs, f"{where}.config", raw.get("config", {}), dict, "an object") \
            and isinstance(kind, str) and owners.owner(kind) == owners.BUILT_IN:
        problem = _builtin_config_problem(kind, raw.get("config", {}))
        if problem:                         # a plugin serving the kind checks its own
            probs.add(f"{where}.config", problem)
    _check_type(probs, f"{where}.extra", raw.get("extra", {}), dict, "an object")
    paused = raw.get("paused_on_boot", False)
    _check_type(probs, f"{where}.paused_on_boot", paused, bool, "true or false")
    repause = raw.get("repause_on_boot", paused is True and cron_dialect == "nexo")
    if _check_type(probs, f"{where}.repause_on_boot", repause, bool, "true or false") \
            and repause and paused is not True:
        probs.add(f"{where}.repause_on_boot", "needs paused_on_boot: true (it makes "
                                              "paused_on_boot pause the job at every start)")
    overrides = {}
    for key in _JOB_POLICY_KEYS:
        if key in raw and _check_policy_value(probs, f"{where}.{key}", key, raw[key]):
            overrides[key] = raw[key]
    jitter = overrides.pop("jitter_ms", None)     # one setting: the schedule's jitter
    if jitter is not None and isinstance(raw.get("schedule"), dict) \
            and "stagger_jitter_ms" in raw["schedule"]:
        probs.add(f"{where}.jitter_ms", "give one of jitter_ms and schedule.stagger_jitter_ms "
                                        "(the same setting)")
    schedule = _shared_schedule(raw.get("schedule"), f"{where}.schedule", probs, cron_dialect,
                                jitter, {} if schedules is None else schedules)
    if len(probs.items) > before:
        return None
    return JobConfig(job_id, sys.intern(kind), agent, schedule,
                     raw.get("config", {}), failure_to, paused, repause_on_boot=repause,
                     raw_json=_compact_json(raw), extra=raw.get("extra") or _NO_KEYS,
                     overrides=overrides or _NO_KEYS)


def _schedule_text_key(raw: Mapping[str, Any], dialect: str = "vixie") -> str:
    """The schedule key of a schedule as written (its jitter aside)."""
    key = {k: v for k, v in raw.items() if k != "stagger_jitter_ms"}
    if dialect != "vixie":              # Vixie keys stay as they were: no slot voided
        key["cron_dialect"] = dialect
    # Interned: thousands of jobs on one schedule share one key (and the
    # states committed with it), not a copy each.
    return sys.intern(json.dumps(key, sort_keys=True, default=str))


def _shared_schedule(raw: Any, where: str, probs: _Problems, cron_dialect: str,
                     jitter_ms: int | None, schedules: dict[tuple, Schedule]
                     ) -> Schedule | None:
    """The Schedule of a job's ``schedule`` entry (its ``jitter_ms`` key
    given apart), the one already made for the same text if there is one:
    parsing a cron once, not once per job, and holding it once."""
    try:
        text = json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):     # not JSON: nothing to share; the parse says why
        text = None
    memo = (text, cron_dialect, jitter_ms)
    if text is not None and memo in schedules:
        return schedules[memo]
    before = len(probs.items)
    schedule = _schedule_from_dict(raw, where, probs, cron_dialect)
    if schedule is None or len(probs.items) > before:
        return None                     # (never shared: each job says its problems)
    schedule = dataclasses.replace(
        schedule, key=_schedule_text_key(raw, getattr(schedule.cron, "dialect", "vixie")),
        **({} if jitter_ms is None else {"stagger_jitter_ms": jitter_ms}))
    if text is not None:
        schedules[memo] = schedule
    return schedule


def _schedule_from_dict(raw: Any, where: str, probs: _Problems,
                        cron_dialect: str = "vixie") -> Schedule | None:
    if not _check_type(probs, where, raw, dict, "an object like {\"every_secs\": 60}"):
        return None
    for key in sorted(set(raw) - _SCHEDULE_KEYS):
        probs.add(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(_SCHEDULE_KEYS))})")
    chosen = [k for k in ("every_secs", "cron", "at") if k in raw]
    if len(chosen) != 1:
        probs.add(where, "needs exactly one of every_secs, cron, at"
                  + (f" (got {', '.join(chosen)})" if chosen else ""))
        return None
    sched: dict[str, Any] = {}          # Schedule's fields
    jitter = raw.get("stagger_jitter_ms")
    if jitter is not None and _check_type(probs, f"{where}.stagger_jitter_ms", jitter, int,
                                          "an integer"):
        if not 0 <= jitter <= 86_400_000:
            probs.add(f"{where}.stagger_jitter_ms", f"{jitter} is outside 0..86400000")
        sched["stagger_jitter_ms"] = jitter
    if "tz" in raw and "cron" not in raw:
        probs.add(f"{where}.tz", "only a cron schedule takes a time zone")
    kind = chosen[0]
    value = raw[kind]
    if kind == "every_secs":
        if _check_type(probs, f"{where}.every_secs", value, (int, float), "a number"):
            if not 0.001 <= value <= 366 * 86400:
                probs.add(f"{where}.every_secs", f"{value} is outside 0.001..31622400")
            else:
                sched["every_secs"] = float(value)
    elif kind == "cron":
        if _check_type(probs, f"{where}.cron", value, str, "a cron string"):
            try:
                sched["cron"] = CronExpr(value, dialect=cron_dialect)
            except ValueError as exc:
                probs.add(f"{where}.cron", str(exc))
        tz = raw.get("tz")
        if tz is not None and _check_type(probs, f"{where}.tz", tz, str, "a zone name"):
            try:
                from zoneinfo import ZoneInfo
                sched["tz"] = ZoneInfo(tz)
            except (ValueError, OSError, LookupError) as exc:     # ZoneInfoNotFoundError too
                probs.add(f"{where}.tz", f"cannot load time zone {tz!r}: {exc}")
    else:
        try:
            sched["at"] = _parse_instant(value)
        except ValueError as exc:
            probs.add(f"{where}.at", f"bad RFC 3339 instant: {exc}")
    return Schedule(**sched)


# ============================================================================
# Runner
# One timer heap for every job, one table of routes (kind -> poller, lane,
# budget), and the error policy: the only place a PollerError gets a meaning.
# Shares: _policy_view, _status_dict, _tick_budget
# ============================================================================

_COMMAND_POLL_SECS = 0.5             # the running set is published at most this often
# What the scheduler thread does in one pass at most: due slots dispatched,
# committed outcomes carried out.  Between passes it looks at the heap again,
# so a slot never waits behind a whole burst or a big commit batch's effects.
_SCHEDULER_PASS = 128
# Outcomes between their commit and their effects, at most (_JobBook.outcomes):
# several commit batches' worth, so the writer is never short of work.
_OUTCOMES_IN_FLIGHT = 1024
_WALL_CLOCK_LOOK_SECS = 60.0         # how soon a wall-clock step moves cron/at slots
_STATE_RETRY_MAX_SECS = 5.0


def _tick_budget(kind: str, plugins: Iterable[PluginPollerHandle] = (),
                 timeout_secs: float | None = None) -> float:
    """How long a tick of ``kind`` may take: a job's own ``timeout_secs``
    when it sets one (it wins, longer or shorter than the plugin's: bounded
    by nothing else), else the tick timeout of the plugin in ``plugins``
    serving it, else ``_IN_PROCESS_BUDGET_SECS`` (in-process).  The one
    rule: the runner's routes, its lease TTLs and the CLI's wait for a
    daemon's tick all ask it."""
    if timeout_secs is not None:
        return timeout_secs
    handle = _plugin_for(kind, plugins)
    return handle.tick_timeout.total_seconds() if handle is not None else _IN_PROCESS_BUDGET_SECS


def _has_wall_clock_jobs(config: "DaemonConfig") -> bool:
    """Whether some job's slots follow the wall clock (cron, at)."""
    return any(j.schedule.every_secs is None for j in config.jobs)


def _schedule_key(cfg: JobConfig) -> str:
    """What identifies a job's schedule: a stored slot planned under another
    key is void (the configuration is the truth for the schedule).  The
    loader sets it from the file's schedule (``_schedule_text_key``); a
    Schedule built in code gets one from its fields."""
    s = cfg.schedule
    if s.key is not None:
        return s.key
    return _schedule_text_key({"every_secs": s.every_secs,
                               "cron": s.cron.text if s.cron else None, "tz": str(s.tz),
                               "at": s.at.isoformat() if s.at else None},
                              getattr(s.cron, "dialect", "vixie"))


def _jitter(schedule: Schedule, config: DaemonConfig, rng) -> float:
    ms = _jitter_ms(schedule, config)[0]
    return rng.uniform(0, ms / 1000) if ms else 0.0


def _policy_view(config: DaemonConfig, cfg: JobConfig, memo: dict | None = None) -> dict:
    """A job's effective policy as ``validate --policy`` and ``status`` show
    it: key -> {"value", "source"}; the tick timeout is the budget the job's
    ticks get (``_tick_budget``): its own, or "plugin" / "default" (in-process).
    ``memo``, a dict kept for one read of one ``config``, shares the view of
    the jobs the view cannot tell apart (same kind, own keys and jitter): a
    status of 100,000 jobs works out a few policies, not one per job."""
    if memo is not None:
        key = (cfg.kind, tuple(sorted(cfg.overrides.items())), cfg.schedule.stagger_jitter_ms)
        view = memo.get(key)
        if view is None:
            view = memo[key] = _policy_view(config, cfg)
        return {k: dict(v) for k, v in view.items()}      # each row its own
    policy = JobPolicy.of(config, cfg)
    view = {key: {"value": getattr(policy, key), "source": policy.sources[key]}
            for key in _JOB_POLICY_KEYS}
    if policy.timeout_secs is None:
        view["timeout_secs"] = {"value": _tick_budget(cfg.kind, config.plugins),
                                "source": "plugin" if _plugin_for(cfg.kind, config.plugins)
                                else "default"}
    return view


@dataclasses.dataclass
class TickOutcome:
    """What one tick of one job came to, as logged and stored."""
    job_id: str
    kind: str
    status: TickStatus
    error: str | None = None
    duration: float = 0.0
    ack: TickAck | None = None
    next_run_at: float | None = None
    retry_after: float | None = None    # a Transient's "not before", in seconds

    def __post_init__(self) -> None:
        self.status = TickStatus(self.status)

    def to_dict(self) -> dict:
        m = self.ack.metrics if self.ack and self.ack.metrics else TickMetrics()
        return {"job": self.job_id, "kind": self.kind, "outcome": self.status.value,
                "error": self.error, "duration_ms": round(self.duration * 1000, 3),
                "items_seen": m.items_seen, "items_dispatched": m.items_dispatched,
                "next_cursor": None if not self.ack or self.ack.next_cursor is None
                else encode_cursor(self.ack.next_cursor),
                "next_run_at": _iso(self.next_run_at)}


@dataclasses.dataclass(frozen=True)
class TickPlan:
    """What the error policy made of one tick: the state to commit, when the
    job runs next (``run_at`` with jitter, ``slot`` without) and an alert."""
    state: JobState
    run_at: float | None
    slot: float | None
    alert: str | None = None
    skipped: int = 0            # missed slots older than the catch-up window, not run


def plan_tick(state: JobState, outcome: TickOutcome, *, schedule: Schedule,
              slot: float | None, started: float, finished: float, config: DaemonConfig,
              rng: Any, schedule_key: str | None = None,
              policy: JobPolicy | None = None) -> TickPlan:
    """The error policy as a pure function: state + outcome + time -> plan.

    ``slot`` is the scheduled slot the tick stood for; None for an
    off-schedule tick (an operator's), which keeps the planned next slot.
    Ok: new cursor and totals, next slot (or the plugin's hint).
    Transient: back off ``initial * 2^(n-1)`` up to the maximum, plus up to
    10 % jitter, and no earlier than the error's ``retry_after``; once the
    streak reaches the breaker threshold it alerts, and again after each
    cooldown while it keeps failing (as nexo does).
    Permanent and config: the job pauses with an alert.  Alerts repeat no
    sooner than ``failure_alert_cooldown_secs``.  ``policy`` gives the job's
    backoff, breaker threshold and cooldown (``JobPolicy``); None: the
    global ones of ``config``.
    """
    pol = config if policy is None else policy      # the same attribute names
    status, skipped = outcome.status, 0
    new = state.replace(last_run_at=started, last_status=status.value, last_error=outcome.error,
                        schedule_key=schedule_key)
    alert = None
    if status is TickStatus.OK:
        ack = outcome.ack or TickAck()
        m = ack.metrics or TickMetrics()
        # Items handed on through ``deliver`` count when delivered (the
        # outbox counts them); a plugin that dispatches by itself reports them.
        new = new.replace(cursor=state.cursor if ack.next_cursor is None else ack.next_cursor,
                          consecutive_errors=0,
                          items_seen_total=state.items_seen_total + m.items_seen,
                          items_dispatched_total=state.items_dispatched_total
                          + (0 if ack.deliver else m.items_dispatched))
        if ack.next_interval_hint is not None:
            nxt = finished + ack.next_interval_hint.total_seconds()
        elif slot is None and state.next_run_at is not None and state.next_run_at > finished:
            nxt = state.next_run_at                 # an extra tick keeps the planned slot
        elif slot is not None and pol.catchup == "all":     # the next slot, even a missed one
            nxt, skipped = catch_up(schedule, schedule.next_after(slot, slot), finished,
                                    pol.catchup, pol.catchup_window_secs)
        else:
            nxt = schedule.next_after(started if slot is None else slot, started)
        if schedule.at is not None:
            new, nxt = new.replace(paused=True), None   # a one-shot stays paused after it fired
    elif status is TickStatus.TRANSIENT:
        errors = state.consecutive_errors + 1
        delay = _backoff(pol.backoff_initial_secs, pol.backoff_max_secs, errors)
        nxt = finished + delay * rng.uniform(1.0, 1.1)
        if outcome.retry_after is not None:         # the poller's "not before" (Retry-After)
            nxt = max(nxt, finished + outcome.retry_after)
        new = new.replace(consecutive_errors=errors)
        if errors >= pol.breaker_threshold:         # again after each cooldown
            alert = f"circuit breaker open after {errors} consecutive errors"
    elif status in (TickStatus.PERMANENT, TickStatus.CONFIG):
        new = new.replace(paused=True, consecutive_errors=state.consecutive_errors + 1)
        alert, nxt = f"job paused after a {status.value} error", None
    else:
        raise InputError(f"a {status.value!r} outcome is not planned: nothing ran")
    partial = outcome.ack if status is not TickStatus.OK else None
    if partial is not None and partial.next_cursor is not None:
        new = new.replace(cursor=partial.next_cursor)   # what it got before it failed
    if alert and state.last_alert_at is not None and \
            started - state.last_alert_at < pol.failure_alert_cooldown_secs:
        alert = None
    if alert:
        new = new.replace(last_alert_at=started)
    run_at = None if nxt is None else nxt + (
        _jitter(schedule, config, rng) if status is TickStatus.OK else 0.0)
    if status is TickStatus.TRANSIENT and slot is not None and pol.catchup == "all":
        nxt = slot                                  # the retry stands for the failed slot
    return TickPlan(new.replace(next_run_at=run_at), run_at, nxt, alert, skipped)


def catch_up(schedule: Schedule, slot: float | None, now: float, mode: str = "one",
             window: float | None = None) -> tuple[float | None, int]:
    """The catch-up rule for a job's next ``slot`` at ``now`` (pure):
    ``(the slot to run, how many missed slots are skipped)``.

    A slot not in the past is no catch-up: it stands.  ``mode`` "none"
    skips every missed slot to the first future one.  "one" and "all" run
    the missed slot (once now; "all" then each next one in order, see
    ``plan_tick``), but the slots older than ``window`` seconds before
    ``now`` are skipped: the first slot within the window runs instead (or
    the first future one when none is).  ``window`` None: no bound.
    """
    if slot is None or slot >= now:
        return slot, 0
    if mode == "none":
        target = schedule.next_after(slot, now)
    elif window is None or slot >= now - window:
        return slot, 0
    else:
        target = schedule.next_after(slot, now - window)
    return target, _slots_between(schedule, slot, target)


_SKIP_COUNT_MAX = 10_000            # beyond this, skipped slots are counted as this many


def _slots_between(schedule: Schedule, first: float, end: float | None) -> int:
    """How many of ``schedule``'s slots lie in ``[first, end)`` (``first``
    being one); every slot after ``first`` when ``end`` is None."""
    if schedule.every_secs is not None and end is not None:
        return min(_SKIP_COUNT_MAX, max(1, round((end - first) / schedule.every_secs)))
    n, at = 0, first
    while at is not None and (end is None or at < end) and n < _SKIP_COUNT_MAX:
        n, at = n + 1, schedule.next_after(at, at)
    return n


def _caught_up(config: DaemonConfig, cfg: JobConfig, slot: float | None,
               now: float) -> float | None:
    """``catch_up`` under the job's policy, the skipped slots logged."""
    policy = JobPolicy.of(config, cfg)
    target, skipped = catch_up(cfg.schedule, slot, now, policy.catchup,
                               policy.catchup_window_secs)
    if skipped:
        _log_skipped(cfg.id, skipped, policy, target)
    return target


def _log_skipped(job_id: str, skipped: int, policy: JobPolicy, target: float | None) -> None:
    window = policy.catchup_window_secs
    log.warning("job %s: %s%d missed slot(s) skipped (catchup=%s%s); next slot %s",
                job_id, "at least " if skipped >= _SKIP_COUNT_MAX else "", skipped,
                policy.catchup,
                "" if window is None else f", catchup_window_secs={window:g}",
                _iso(target) or "none")


def next_run(state: JobState, schedule: Schedule, schedule_key: str | None,
             now: float) -> tuple[float | None, bool]:
    """Where a job stands on its schedule at start, take-over, resume or
    reload (pure): ``(slot, fresh)``.

    The stored slot holds while the schedule is the one it was planned
    under; otherwise the configured schedule decides from the last run.  A
    slot in the past means "run now, once" (the catch-up rule).  ``fresh``
    is True when the slot was not stored (the caller adds jitter).
    """
    if state.paused:
        return None, False
    if state.next_run_at is not None and state.schedule_key == schedule_key:
        return state.next_run_at, False
    if state.last_run_at is not None and schedule.at is None:
        return schedule.next_after(state.last_run_at, state.last_run_at), True
    return schedule.first_after(now), True


def _status_dict(cfg: JobConfig, state: JobState, config: DaemonConfig, running: bool,
                 next_run_at: float | None = None, delivered: int = 0,
                 undelivered: int = 0, holder: str | None = None,
                 memo: dict | None = None) -> dict:
    """A job as ``status`` shows it (one shape for the Runner and the CLI);
    ``next_run_at`` is the live slot where one is known, else the stored one;
    ``delivered`` counts deliveries made since ``state`` was read; ``holder``
    is the daemon (or CLI) holding the job's lease (``StateStore.holders``);
    ``policy``: the job's effective policy and its sources (``_policy_view``,
    sharing ``memo`` across one read's jobs)."""
    policy = _policy_view(config, cfg, memo)
    threshold = policy["breaker_threshold"]["value"]
    if next_run_at is None:
        next_run_at = state.next_run_at
    return {"id": cfg.id, "kind": cfg.kind, "agent": cfg.agent, "paused": state.paused,
            "cursor": None if state.cursor is None else encode_cursor(state.cursor),
            "last_status": state.last_status, "last_error": state.last_error,
            "consecutive_errors": state.consecutive_errors,
            "breaker_open": state.consecutive_errors >= threshold,
            "last_run_at": _iso(state.last_run_at),
            "next_run_at": None if state.paused else _iso(next_run_at),
            "items_seen_total": state.items_seen_total,
            "items_dispatched_total": state.items_dispatched_total + state.delivered_total
            + delivered,
            "undelivered": undelivered,
            "running": running, "holder": holder, "policy": policy,
            "pause": {"by": state.paused_by, "at": _iso(state.paused_at),
                      "note": state.pause_note}
            if state.paused and state.paused_at is not None else None}


class _Job:
    """A job inside the runner: its configuration, its committed state, and
    what only this process knows (running, lease held, heap entry)."""
    __slots__ = ("cfg", "key", "state", "leased", "running", "generation", "next_run_at",
                 "cancel", "removed", "unstored", "delivered", "commanding", "missed",
                 "command", "commands_wait", "scheduled_for")

    def __init__(self, cfg: JobConfig, state: JobState | None = None):
        self.cfg = cfg
        self.key = _schedule_key(cfg)
        self.state = state or JobState(cfg.id, paused=cfg.paused_on_boot)
        self.leased = False          # this daemon holds the lease (state.lease_until says until)
        self.running = False
        self.generation = -1         # seq of the job's live heap entry
        self.next_run_at: float | None = None    # when that entry fires
        self.cancel: threading.Event | None = None
        self.removed = False
        self.unstored = 0            # outcomes in a row that could not be stored
        self.delivered = 0           # deliveries made since ``state`` was read
        self.commanding = False      # ``running`` is an operator command being applied
        self.missed: float | None = None     # the slot that came meanwhile (runs after it)
        self.command: int | None = None      # the last ``tick`` command dispatched
        self.commands_wait = False   # commands for it wait for the running tick's end
        self.scheduled_for: float | None = None  # an operator's tick's slot time (backfill)


class _WorkerPool:
    """Daemon threads started on demand up to a bound; a stuck tick cannot
    keep the process alive at exit the way executor threads would."""

    def __init__(self, limit: int):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._limit, self._threads, self._idle = limit, 0, 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1              # an idle thread will take it
            elif self._threads < self._limit:
                self._threads += 1
                threading.Thread(target=self._work, daemon=True, name="nexo-tick").start()
        self._q.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self._q.get()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:
                log.exception("tick worker failed")
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        for _ in range(self._threads):
            self._q.put((None, ()))


class _RateWindow:
    """At most ``limit`` tick starts in any 60 seconds: the start times of
    the last minute, kept.  A sliding log rather than a token bucket, whose
    burst after an idle spell could put twice the limit into one minute."""
    SPAN = 60.0
    __slots__ = ("limit", "starts")

    def __init__(self, limit: int):
        self.limit, self.starts = limit, deque()

    def ready_at(self, now: float) -> float:
        """When the next start may be: ``now``, or when the oldest leaves the window."""
        while self.starts and self.starts[0] <= now - self.SPAN:
            self.starts.popleft()
        return now if len(self.starts) < self.limit else self.starts[0] + self.SPAN


class _Lane:
    """At most ``limit`` ticks of one plugin (or in-process kind) at once,
    and at most ``rate.limit`` starts a minute when it has a ``rate``; the
    rest wait in order.  ``held_until``: the rate limit holds its next tick
    until then (a monotonic time; None: it does not)."""
    __slots__ = ("key", "limit", "running", "waiting", "rate", "held_until")

    def __init__(self, key: str, limit: int):
        self.key, self.limit, self.running, self.waiting = key, limit, 0, deque()
        self.rate: _RateWindow | None = None
        self.held_until: float | None = None


@dataclasses.dataclass(eq=False)
class _Route:
    """How one kind is served: the poller, the lane its ticks queue in (one
    per plugin), the time a tick may take, and the plugin (None in-process)."""
    kind: str
    poller: Any
    lane: _Lane
    budget: float
    plugin_id: str | None = None


class _Routes:
    """How each kind is served (its ``_Route``: poller, lane, budget); which
    kinds may be served, one owner each, is the router's rule
    (``PluginPollerRouter``), asked first: a built-in kind's route serves
    only while the router says the built-in owns the kind."""

    def __init__(self, router: PluginPollerRouter):
        self._table: dict[str, _Route] = {}
        self._builtin: dict[str, Callable[[], _Route]] = {}
        self._router = router

    def get(self, kind: str) -> _Route | None:
        route = self._table.get(kind)
        if route is None and self._router.owner(kind) == PluginPollerRouter.BUILT_IN:
            return self._builtin[kind]()
        return route

    def add_builtin(self, kind: str, route: Callable[[], _Route]) -> None:
        """Serve ``kind`` built in, until a plugin or poller claims it;
        ``route`` makes its route (and lane) when first asked, once."""
        self._router.offer_builtin((kind,))
        self._builtin[kind] = functools.cache(route)

    def add(self, route: _Route) -> None:
        self._table[route.kind] = route

    def drop_plugin(self, plugin_id: str) -> None:
        """Forget every kind ``plugin_id`` served."""
        for kind in [k for k, r in self._table.items() if r.plugin_id == plugin_id]:
            del self._table[kind]

    def in_process_kinds(self) -> list[str]:
        return [k for k, r in self._table.items() if r.plugin_id is None]

    def budget(self, kind: str) -> float:
        """How long a tick of ``kind`` may take as routed now (``_tick_budget``)."""
        route = self._table.get(kind)
        return route.budget if route is not None else _tick_budget(kind)


class _Lanes:
    """The tick slots: each lane (a plugin, or an in-process kind) runs at
    most its limit of ticks at once (and starts at most its rate a minute)
    and queues the rest in order, and each idle lane keeps one worker in
    reserve; the Runner's lock (``book.cond``) guards it.  A tick the rate
    holds waits in its lane, holding no worker, no lease renewal and no
    other lane: the scheduler starts it when the window lets it."""

    def __init__(self, workers: Callable[[], int], book: "_JobBook"):
        self._lanes: dict[str, _Lane] = {}
        self._workers = workers             # how many worker threads ticks share
        self._book = book                   # its clock, lock and whether it is stopping
        self._idle = 0                      # lanes with nothing running
        self._busy = 0                      # ticks holding a worker thread

    def get(self, key: str, limit: int, rate: int | None = None) -> _Lane:
        """The lane ``key`` (made when new), bounded by ``limit`` and ``rate``
        (starts a minute) from now on; the starts already made still count."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key, limit)
            self._idle += 1
        lane.limit = limit
        if rate is None:
            lane.rate = None
        elif lane.rate is None:
            lane.rate = _RateWindow(rate)
        else:
            lane.rate.limit = rate
        return lane

    def queue(self, lane: _Lane, job: _Job, slot: float | None, command: int | None) -> list:
        """Queue a due tick in ``lane``; the ticks that may start now."""
        lane.waiting.append((job, slot, command))
        return self._start_ready((lane,))

    def _start_ready(self, lanes: Iterable[_Lane]) -> list:
        """Take queued ticks that may start now: (job, slot, command, lane) each.

        A lane runs at most its limit; and every lane with nothing running
        keeps one worker in reserve, so a plugin hung at its limit cannot
        take the threads other plugins need.
        """
        starts, cap = [], self._workers()
        for lane in lanes:
            lane.held_until = None
            while lane.waiting and lane.running < lane.limit:
                reserve = min(self._idle - (lane.running == 0), cap - 1)
                if self._busy >= cap - reserve:
                    break
                # A tick that will not poll (stopping, job removed) needs no room.
                if lane.rate is not None and not (self._book.stopping
                                                  or lane.waiting[0][0].removed):
                    wait = self.rate_wait(lane)
                    if wait > 0:
                        lane.held_until = self._book.monotonic() + wait
                        self._book.cond.notify_all()    # the scheduler's next wake moved
                        break
                job, slot, command = lane.waiting.popleft()
                self.take(lane)
                self._busy += 1
                starts.append((job, slot, command, lane))
        return starts

    def rate_wait(self, lane: _Lane) -> float:
        """Seconds until ``lane``'s rate limit lets a tick start (0: now)."""
        if lane.rate is None:
            return 0.0
        now = self._book.monotonic()
        return max(0.0, lane.rate.ready_at(now) - now)

    def held_wait(self) -> float | None:
        """Seconds until a tick the rate limit holds may start (0: now; None:
        none is held)."""
        held = [lane.held_until for lane in self._lanes.values() if lane.held_until is not None]
        return None if not held else max(0.0, min(held) - self._book.monotonic())

    def start_held(self) -> list:
        """The held ticks whose rate (or, stopping, no rate) lets them start now."""
        now = self._book.monotonic()
        return self._start_ready([ln for ln in self._lanes.values() if ln.waiting and (
            self._book.stopping or ln.held_until is None or ln.held_until <= now)])

    def take(self, lane: _Lane) -> None:
        """A tick takes a slot of ``lane`` (an operator's: no worker thread),
        one of its rate's starts too."""
        if lane.running == 0:
            self._idle -= 1
        lane.running += 1
        if lane.rate is not None:
            lane.rate.starts.append(self._book.monotonic())

    def _free(self, lane: _Lane) -> None:
        lane.running -= 1
        if lane.running == 0:
            self._idle += 1

    def leave(self, lane: _Lane) -> list:
        """An operator's tick frees its slot: the ticks that may start now."""
        self._free(lane)
        return self._start_ready([lane])

    def finished(self, lane: _Lane) -> list:
        """A worker's tick in ``lane`` ended: the ticks that may start now,
        its own lane's first (the worker runs that one itself)."""
        self._busy -= 1
        self._free(lane)
        return self._start_ready([lane] + [ln for ln in self._lanes.values()
                                           if ln.waiting and ln is not lane])

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Every lane: key -> (ticks running, ticks waiting for a slot, of
        those the ones its rate limit holds back)."""
        return {k: (lane.running, len(lane.waiting),
                    len(lane.waiting) if lane.held_until is not None else 0)
                for k, lane in self._lanes.items()}


class _TimerHeap:
    """The jobs' next runs ordered by monotonic deadline, one live entry per
    job (its ``generation``), re-based when the wall clock steps; the
    Runner's lock guards it."""

    def __init__(self, jobs: Mapping[str, _Job], clock: Callable[[], float],
                 monotonic: Callable[[], float]):
        self._jobs, self._clock, self._monotonic = jobs, clock, monotonic
        self._offset = clock() - monotonic()        # wall - monotonic, as last seen
        # (monotonic deadline, seq, job id, nominal wall-clock slot)
        self._heap: list[tuple[float, int, str, float]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, job: _Job, when: float, nominal: float | None = None) -> bool:
        """Put a job's next run at wall time ``when``; True when what the
        scheduler waits for changed (it is the earliest now, or the clock stepped).

        ``nominal`` is the schedule's slot without jitter; the slot after
        it is computed from it, so jitter never accumulates into drift.
        """
        stepped = self.watch_clock()        # ``when`` is wall time: convert at today's offset
        seq = next(self._seq)
        job.generation = seq               # older entries of this job are now stale
        job.next_run_at = when
        heapq.heappush(self._heap, (when - self._offset, seq, job.cfg.id,
                                    when if nominal is None else nominal))
        if len(self._heap) > 2 * len(self._jobs) + 1024:
            self._compact()
        return stepped or self._heap[0][1] == seq

    def _compact(self) -> None:
        """Drop superseded entries (rescheduled, resumed, removed jobs)."""
        self._heap = [e for e in self._heap if self._live(e) is not None]
        heapq.heapify(self._heap)

    def _live(self, entry: tuple[float, int, str, float]) -> _Job | None:
        """The job of ``entry`` while the entry is its current one."""
        job = self._jobs.get(entry[2])
        return job if job is not None and job.generation == entry[1] else None

    def watch_clock(self) -> bool:
        """Notice a wall clock step and re-base the heap on it; True when it did.

        Interval jobs keep their monotonic deadlines (their nominal slots
        move with the step, so the slot after stays one interval away);
        cron and ``at`` jobs are about wall time, so their deadlines move.
        """
        offset = self._clock() - self._monotonic()
        step = offset - self._offset
        if abs(step) < 1.0:
            return False
        self._offset = offset
        log.warning("wall clock stepped by %+.1fs; interval jobs keep their pace, "
                    "cron and at jobs move to their wall-clock slots", step)
        heap = []
        for entry in self._heap:
            job = self._live(entry)
            if job is None:
                continue
            mono, seq, job_id, nominal = entry
            if job.cfg.schedule.every_secs is not None:
                heap.append((mono, seq, job_id, nominal + step))
                job.next_run_at = mono + offset
            else:
                jitter = (job.next_run_at or nominal) - nominal
                heap.append((nominal + jitter - offset, seq, job_id, nominal))
        heapq.heapify(heap)
        self._heap = heap
        return True

    def pop_due(self, now: float, limit: int | None = None) -> list[tuple[_Job, float]]:
        """Take the entries due by monotonic ``now`` (the first ``limit`` of
        them; None: all): (job, nominal slot) of the live ones."""
        due = []
        heap = self._heap
        left = len(heap) if limit is None else limit
        while heap and heap[0][0] <= now and left > 0:
            left -= 1
            entry = heapq.heappop(heap)
            job = self._live(entry)
            if job is not None:
                due.append((job, entry[3]))
        return due

    def next_deadline(self) -> float | None:
        """The earliest entry's monotonic deadline (None: empty)."""
        return self._heap[0][0] if self._heap else None

    def holds(self, job: _Job) -> bool:
        """``job``'s current entry still waits (was not popped)."""
        return job.generation >= 0 and any(e[1] == job.generation for e in self._heap)


def _open_broker(cfg: DaemonConfig, owner: str) -> tuple[BrokerServer | None, Any, str]:
    """The daemon's broker: (the embedded server or None, a client, the URL
    plugins are given) -- NATS when ``broker`` is a nats URL, else a Unix
    socket served here."""
    if _is_nats(cfg.broker):
        tls = {f"tls_{k}": v for k, v in cfg.broker_tls.items()}
        return None, connect_broker(cfg.broker, name=f"nexo-poller {owner}", **tls), cfg.broker
    server = BrokerServer(cfg.broker[7:] if cfg.broker else None).start()
    try:
        return server, server.client(), server.url
    except BaseException:
        server.close()
        raise


class _JobBook:
    """The daemon's jobs and the one lock over their live state: which run,
    their next runs on the timer heap, the committed outcomes waiting for
    their effects, and whether the daemon has started or is stopping."""

    def __init__(self, clock: Callable[[], float], monotonic: Callable[[], float],
                 policy: Callable[[], tuple[DaemonConfig, Any]]):
        self.cond = threading.Condition(threading.Lock())   # guards all below and the jobs
        self.jobs: dict[str, _Job] = {}
        self.heap = _TimerHeap(self.jobs, clock, monotonic)
        self.running: set[_Job] = set()     # the jobs whose tick or command is under way
        self.effects: deque = deque()       # committed outcomes waiting for their effects
        # An outcome takes one from its commit to its effects (``_Ticks``): a
        # worker waits for room rather than queue ever more.  In a burst the
        # writer is the slowest step; unbounded, its queue grew by ten
        # thousands of outcomes, every object of which each full garbage
        # collection walked again, slowing all the rest.
        self.outcomes = threading.BoundedSemaphore(_OUTCOMES_IN_FLIGHT)
        self.started = False
        self.stopping = False
        self.commands_due = False           # commands queued for this daemon: look now
        self.monotonic = monotonic          # what deadlines and rate limits count on
        self._policy = policy               # () -> (the config, the rng): jitter, catch-up

    def get(self, job_id: str) -> _Job:
        """The job ``job_id``; ``InputError.UnknownJob`` when there is none."""
        job = self.jobs.get(job_id)
        if job is None:
            raise InputError.UnknownJob(
                f"no job {job_id!r} (known: {', '.join(sorted(self.jobs))})")
        return job

    def mark_running(self, job: _Job) -> None:
        """The start of a tick or a command of ``job`` (lock held)."""
        job.running = True
        self.running.add(job)

    def not_running(self, job: _Job) -> None:
        """The end of a tick or a command of ``job`` (lock held)."""
        job.running = job.commanding = False
        self.running.discard(job)
        if job.commands_wait:               # queued while it ran: the scheduler looks now
            job.commands_wait, self.commands_due = False, True

    def push(self, job: _Job, when: float, nominal: float | None = None) -> None:
        """Put a job's next run on the heap (``_TimerHeap.push``; lock held),
        waking the scheduler when what it waits for changed."""
        if self.heap.push(job, when, nominal):
            self.cond.notify_all()

    def watch_clock(self) -> None:
        """Re-base the heap on a wall clock step (lock held)."""
        if self.heap.watch_clock():
            self.cond.notify_all()

    def schedule_first(self, job: _Job, now: float) -> None:
        """Put a job on the heap where it stands on its schedule (lock held)."""
        if job.removed or job.state.paused or job.running:
            return
        slot, fresh = next_run(job.state, job.cfg.schedule, job.key, now)
        config, rng = self._policy()
        slot = _caught_up(config, job.cfg, slot, now)
        if slot is None:
            job.generation = -1
            return
        when = max(slot, now)            # missed while down or paused: now (catch-up)
        if fresh and slot >= now:
            when += _jitter(job.cfg.schedule, config, rng)
        self.push(job, when, slot)

    def release(self, job: _Job, next_run_at: float | None, slot: float | None = None, *,
                keep: bool = False) -> None:
        """The end of a tick: the job's next run at ``next_run_at`` (None:
        off the schedule).  ``keep`` (an off-schedule tick, which stands for
        no slot): the job's entry on the heap stays when it is still there,
        and ``next_run_at`` only replaces one the scheduler passed by
        (skipped: the job was running)."""
        with self.cond:
            self.not_running(job)
            job.cancel = None
            live = not job.state.paused and not job.removed and not self.stopping
            if live and keep and self.heap.holds(job):
                pass                        # an operator's tick is rare: the scan is cheap
            elif live and next_run_at is not None:
                self.push(job, next_run_at, slot)
            else:
                job.generation = -1
            self.cond.notify_all()

    def status(self, config: DaemonConfig, holders: Mapping[str, str] | None,
               owner: str) -> list[dict]:
        """Every job as ``status`` shows it; ``holders`` None: ``owner``'s leases."""
        with self.cond:
            if holders is None:
                holders = self.own_holds(owner)
            memo: dict = {}                 # under the lock: keep it short
            return [_status_dict(j.cfg, j.state, config, j.running and not j.commanding,
                                 j.next_run_at if j.generation >= 0 else None, j.delivered,
                                 holder=holders.get(j.cfg.id), memo=memo)
                    for j in self.jobs.values()]

    def own_holds(self, owner: str) -> dict[str, str]:
        """The jobs this daemon holds the leases of: job id -> ``owner`` (lock held)."""
        return {i: owner for i, j in self.jobs.items() if j.leased}

    def note_delivered(self, items: list[OutboxItem]) -> None:
        """The publisher delivered these: count them into their jobs (live view)."""
        with self.cond:
            for item in items:
                job = self.jobs.get(item.job)
                if job is not None:
                    job.delivered += 1

    def lease(self, store: StateStore, jobs: list[_Job], now: float,
              ttl: Callable[[JobConfig], float]) -> dict[str, JobState]:
        """Lease ``jobs`` in ``store`` for ``ttl(cfg)`` seconds each; each
        granted job takes the state the claim read (paused again first when
        its config says ``repause_on_boot``: the one place that rule lives)."""
        untils: dict[float, float] = {}     # one float per distinct ttl, not one per job
        wanted = {j.cfg.id: untils.setdefault(t, now + t) for j in jobs for t in (ttl(j.cfg),)}
        granted = store.claim(wanted, now, paused_on_boot=[
            j.cfg.id for j in jobs if j.cfg.paused_on_boot])
        for job in jobs:                    # a job starting here: nexo pauses it again
            state = granted.get(job.cfg.id)
            if job.cfg.repause_on_boot and state is not None and not state.paused:
                state = state.replace(paused=True)
                if store.commit_now(state, source="paused_on_boot"):
                    granted[job.cfg.id] = state.replace(revision=state.revision + 1)
        with self.cond:
            for job in jobs:
                state = granted.get(job.cfg.id)
                if state is not None:
                    if state.id is not job.cfg.id:      # the config's string, not a copy a job
                        state = granted[job.cfg.id] = state.replace(id=job.cfg.id)
                    job.state, job.leased, job.delivered = state, True, 0
        return granted


def _crash_policy(handle: PluginPollerHandle, config: DaemonConfig) -> dict[str, Any]:
    """A supervised plugin's crash-loop policy: its manifest's keys, else the config's."""
    return {"crash_limit": handle.crash_limit or config.plugin_crash_limit,
            "crash_window": handle.crash_window_secs or config.plugin_crash_window_secs}


class _Plugins:
    """The kinds this daemon serves and how: in-process pollers and plugins
    routed (one owner per kind), the supervised plugins started and stopped,
    and each kind's tick budget and lease length."""

    def __init__(self, runner: "Runner", lanes: _Lanes, cond: threading.Condition):
        self._runner = runner               # its config, broker and broker URL
        self._lanes, self._cond = lanes, cond
        self.router = PluginPollerRouter()          # plugins by id (the manifests)
        self.routes = _Routes(self.router)          # kinds: the one answer to "who serves it"
        self.supervisors: dict[str, PluginSupervisor] = {}
        self.commands: "_Commands | None" = None    # set by _Commands (pause, resume)
        self._failed_jobs: dict[str, list[str]] = {}   # plugin id -> jobs its crash loop paused
        for poller in builtin_pollers():
            self.routes.add_builtin(poller.kind, functools.partial(self._route, poller))

    def lane(self, key: str, limit: int, rate: int | None = None) -> _Lane:
        """The lane ``key``, bounded by ``limit`` (and ``rate`` starts a minute)."""
        with self._cond:
            return self._lanes.get(key, limit, rate)

    def register(self, poller: Any) -> None:
        """Serve ``poller.kind`` in-process (``Runner.register``)."""
        kind = getattr(poller, "kind", None)
        if not isinstance(kind, str) or not callable(getattr(poller, "tick", None)):
            raise TypeError("a poller needs a `kind` string and a `tick(ctx)` method")
        self.router.claim_in_process((kind,))
        self.routes.add(self._route(poller))

    def _route(self, poller: Any) -> _Route:
        """The route of an in-process poller: its own lane, the in-process budget."""
        limit = getattr(poller, "max_concurrent_ticks", None) or self._runner.config.max_workers
        lane = self.lane(f"kind:{poller.kind}", limit, getattr(poller, "max_ticks_per_minute",
                                                               None))
        return _Route(poller.kind, poller, lane, _tick_budget(poller.kind))

    def install(self, handles: Iterable[PluginPollerHandle],
                auth_by_plugin: Mapping[str, Mapping[str, str]] | None = None,
                config: DaemonConfig | None = None) -> None:
        """Route the plugins' kinds and start the supervised ones, each with
        its own NATS credentials when ``plugin_broker_auth`` names it and
        its crash-loop policy (of ``config``: the running one by default)."""
        r = self._runner
        for handle in handles:
            self.router.register(handle)        # one owner per kind, or DuplicateKind
            lane = self.lane(handle.plugin_id, handle.max_concurrent_ticks,
                             handle.max_ticks_per_minute)
            for kind in handle.kinds:
                self.routes.add(_Route(kind, _proxy_for(kind, handle, r.broker, limit=False),
                                       lane, _tick_budget(kind, (handle,)), handle.plugin_id))
            if _lifecycle_rules(handle).supervised and handle.entrypoint_command:
                # long-lived and stdio; without a command (NATS only) the plugin
                # runs elsewhere: not ours to start.
                auth = (auth_by_plugin if auth_by_plugin is not None else
                        r.config.plugin_broker_auth).get(handle.plugin_id)
                self.supervisors[handle.plugin_id] = PluginSupervisor(
                    handle, _nats_url_as(r.broker_url, auth) if auth else r.broker_url,
                    on_failed=self._crash_loop, **_crash_policy(handle, config or r.config)
                ).start()

    def _crash_loop(self, sup: PluginSupervisor) -> None:
        """A supervised plugin given up after a crash loop (its supervisor's
        thread): pause its jobs, the reason in their pause note, and send
        ONE alert naming it, with its last output lines."""
        r, pid, kinds = self._runner, sup.handle.plugin_id, set(sup.handle.kinds)
        # `status` shows a long error's end: the plugin is named there too.
        why = (f"plugin {pid} failed: {sup.failed}; plugin {pid} stays down until one of "
               "its jobs is resumed")
        # The jobs this daemon holds: another daemon's run on its own copy of the plugin.
        paused = [row["id"] for row in r.status() if row["kind"] in kinds
                  and not row["paused"] and row["holder"] is not None]
        self._failed_jobs[pid] = paused
        for job_id in paused:
            try:
                self.commands.send(job_id, "pause", pause_command_arg(
                    why[:PAUSE_NOTE_MAX_CHARS], f"nexo-poller (plugin {pid})"))
            except NexoPollerError as exc:
                log.error("plugin %s: job %s not paused: %s", pid, job_id, exc)
        payload = {"plugin": pid, "kinds": sorted(kinds), "reason": "plugin crash loop",
                   "error": sup.failed, "last_output": list(sup.last_output), "jobs": paused,
                   "at": _iso(r.clock())}
        log.warning("alert: plugin %s: %s; jobs paused: %s", pid, sup.failed,
                    ", ".join(paused) or "none")
        try:
            r.broker.publish(r.config.alert_topic, payload)
        except PluginPollerForwardError as exc:
            log.error("alert for plugin %s not published: %s", pid, exc)

    def job_resumed(self, job_id: str, kind: str) -> None:
        """A job was resumed: when a crash loop gave its plugin up, the
        plugin starts again and the other jobs the crash loop paused resume."""
        handle = self.router.handle_for_kind(kind)
        sup = self.supervisors.get(handle.plugin_id) if handle is not None else None
        if sup is not None and sup.resume():
            self._resume_jobs(handle.plugin_id, skip=job_id)

    def _resume_jobs(self, plugin_id: str, skip: str | None = None) -> None:
        """Resume the jobs the crash loop of ``plugin_id`` paused (but ``skip``)."""
        for job_id in self._failed_jobs.pop(plugin_id, []):
            if job_id != skip:
                try:
                    self.commands.send(job_id, "resume")
                except NexoPollerError as exc:
                    log.error("plugin %s: job %s not resumed: %s", plugin_id, job_id, exc)

    def remove(self, plugin_id: str) -> None:
        sup = self.supervisors.pop(plugin_id, None)
        if sup is not None:
            sup.stop()
        if self.router.unregister(plugin_id):
            self.routes.drop_plugin(plugin_id)

    def reconcile(self, new: "DaemonConfig") -> list[str]:
        """Stop the plugins ``new`` drops or changes, start the ones it adds
        or changes; the ids of those restarted."""
        old_plugins = {h.plugin_id: h for h in self.router.handles()}
        new_plugins = {h.plugin_id: h for h in new.plugins}
        old_auth, new_auth = self._runner.config.plugin_broker_auth, new.plugin_broker_auth

        def same(pid: str) -> bool:         # a plugin a crash loop gave up starts again
            return (pid in old_plugins and pid in new_plugins
                    and old_plugins[pid].same_spec(new_plugins[pid])
                    and old_auth.get(pid) == new_auth.get(pid)
                    and not getattr(self.supervisors.get(pid), "failed", None))
        keep = {pid for pid in old_plugins if same(pid)}
        for pid in old_plugins:
            if pid not in keep:
                self.remove(pid)
        changed = [h for pid, h in new_plugins.items() if pid not in keep]
        self.install(changed, new_auth, new)
        for sup in self.supervisors.values():           # the global keys may have changed
            policy = _crash_policy(sup.handle, new)
            sup.crash_limit, sup.crash_window = policy["crash_limit"], policy["crash_window"]
        for pid in [p for p in list(self._failed_jobs) if p not in keep]:
            if pid in new_plugins:          # started again: the jobs it paused resume
                self._resume_jobs(pid)
            else:
                del self._failed_jobs[pid]
        return [h.plugin_id for h in changed if h.plugin_id in old_plugins]

    def stop_supervised(self) -> None:
        """SIGTERM every supervised plugin at once; they share one grace period."""
        sups, self.supervisors = list(self.supervisors.values()), {}
        for sup in sups:
            sup.request_stop()
        plugin_deadline = time.monotonic() + max((s.stop_grace for s in sups), default=0)
        for sup in sups:
            sup.join(plugin_deadline)

    def budget(self, kind: str, plugins: Iterable[PluginPollerHandle] | None = None,
               timeout_secs: float | None = None) -> float:
        """How long a tick of ``kind`` may take (``_tick_budget``): as routed
        now, or as ``plugins`` (a reload's) would route it; a job's own
        ``timeout_secs`` wins."""
        if plugins is not None or timeout_secs is not None:
            return _tick_budget(kind, plugins or (), timeout_secs)
        return self.routes.budget(kind)

    def lease_ttl(self, cfg: JobConfig, plugins: Iterable[PluginPollerHandle] | None = None
                  ) -> float:
        """factor x interval, at least ``lease_min_secs``, and at least a
        plugin's tick timeout (or the job's own ``timeout_secs``) +
        ``lease_min_secs``."""
        config = self._runner.config
        least = config.lease_min_secs
        ttl = max(least, config.lease_ttl_factor * cfg.schedule.nominal_interval)
        handle = _plugin_for(cfg.kind, plugins or ())
        route = self.routes.get(cfg.kind) if plugins is None else None
        timeout = cfg.overrides.get("timeout_secs")
        if handle is not None or (route is not None and route.plugin_id is not None) \
                or timeout is not None:
            ttl = max(ttl, self.budget(cfg.kind, plugins, timeout) + least)
        return ttl

    def lane_of(self, kind: str) -> _Lane:
        """The lane ticks of ``kind`` queue in."""
        route = self.routes.get(kind)
        return route.lane if route is not None else self.lane("(unrouted)", 1)


class _Commands:
    """Operator commands (pause, resume, reset, cursor, tick): applied at once
    to a job this daemon holds and is not ticking, else queued in the state
    for its owner, and the queued ones carried out when the scheduler looks."""

    def __init__(self, runner: "Runner", book: _JobBook, plugins: "_Plugins",
                 dispatch: Callable[[_Job, float | None, int | None], None]):
        self._runner = runner               # its state and clock
        self._book = book
        self._plugins = plugins             # told of a resume: a crash loop's end
        plugins.commands = self             # the pauses and resumes a crash loop gives
        self._dispatch = dispatch           # _Workers.dispatch

    def send(self, job_id: str, verb: str, arg: str | None = None) -> None:
        """Apply a command now when this runner owns the idle job; otherwise
        queue it for the owner (this runner, after the running tick, or the
        daemon holding the lease)."""
        r = self._runner
        book = self._book
        job = book.get(job_id)
        if self.apply_held(job, verb, arg=arg):
            return
        owner, seq = r.state.command(job_id, verb, paused_on_boot=job.cfg.paused_on_boot,
                                     arg=arg)
        if seq is None:                     # nobody holds it: applied in the state
            self.refresh_unheld([job_id])
        elif owner == r.state.owner:
            with book.cond:
                book.commands_due = True
                book.cond.notify_all()
        else:
            _wake_owner(owner)              # another daemon on this state; it does not poll

    def apply_held(self, job: _Job, verb: str, seq: int | None = None,
                   arg: str | None = None) -> bool:
        """``apply`` to a job this runner holds and is not ticking,
        the job held as running meanwhile: a command and a tick of one job
        are serialised, so no tick that read the state before the command
        commits over it.  A slot that comes meanwhile runs right after.
        False when a tick runs, or the lease is not (or no longer) held."""
        r = self._runner
        book = self._book
        with book.cond:
            if not job.leased or job.running or job.removed:
                return False
            book.mark_running(job)
            job.commanding = True
        try:
            return self.apply(job, verb, seq, arg)
        finally:
            with book.cond:
                book.not_running(job)
                missed, job.missed = job.missed, None
                if book.started and not book.stopping and not job.removed \
                        and not job.state.paused:
                    if missed is not None:
                        book.push(job, r.clock(), missed)
                    elif verb == "resume" and job.generation < 0:
                        book.schedule_first(job, r.clock())
                book.cond.notify_all()

    def apply(self, job: _Job, verb: str, seq: int | None = None,
              arg: str | None = None) -> bool:
        """Apply a pause/resume/reset/cursor to a job this runner owns, in one
        commit with the command's completion (``running`` held by the caller).
        False when the lease was lost."""
        r = self._runner
        book = self._book
        now = r.clock()
        new = apply_command(job.state, verb, arg)
        if verb == "resume" and job.state.paused:
            slot, _ = next_run(new.replace(next_run_at=job.state.next_run_at), job.cfg.schedule,
                               job.key, now)
            new = new.replace(next_run_at=slot, schedule_key=job.key)
        if not r.state.commit_now(new, command=None if seq is None else (seq, None),
                                  source=_command_source(verb, arg)):
            with book.cond:
                job.leased = False
            return False
        with book.cond:
            job.state = new.replace(revision=new.revision + 1)
            if verb == "pause":
                job.generation = -1
        if verb == "resume":
            self._plugins.job_resumed(job.cfg.id, job.cfg.kind)
        return True

    def apply_pending(self) -> int:
        """Carry out the operator commands queued for the jobs this daemon owns."""
        r = self._runner
        book = self._book
        n = 0
        for cmd in r.state.pending_commands():
            job = book.jobs.get(cmd.job)
            if job is None or job.removed:
                r.state.finish_command(cmd.seq, json.dumps(
                    {"job": cmd.job, "error": "this daemon has no such job"}))
            elif cmd.verb == "tick":
                with book.cond:
                    if job.command == cmd.seq:      # dispatched at an earlier look
                        continue
                if not self._tick_soon(job, cmd.seq, _backfill_slot(cmd.arg)):
                    r.state.finish_command(cmd.seq, json.dumps(TickOutcome(
                        job.cfg.id, job.cfg.kind, TickStatus.BUSY,
                        "a tick of this job is running").to_dict()))
            elif not self.apply_held(job, cmd.verb, cmd.seq, cmd.arg):
                with book.cond:
                    if job.running:             # after the tick's commit
                        job.commands_wait = True
                continue
            log.info("operator: %s %s", cmd.verb, cmd.job)
            n += 1
        return n

    def take_over(self, job: _Job) -> bool:
        """Before the first tick of a job taken over (``running`` held): apply
        the pause/resume/reset/cursor commands queued for its last owner, so
        none comes after a tick it should have preceded.  False when the
        lease was lost meanwhile."""
        r = self._runner
        for cmd in r.state.pending_commands():
            if cmd.job == job.cfg.id and cmd.verb != "tick":
                if not self.apply(job, cmd.verb, cmd.seq, cmd.arg):
                    return False
                log.info("operator: %s %s (queued for the last owner)", cmd.verb, cmd.job)
        return True

    def refresh_unheld(self, ids: Iterable[str] | None = None) -> None:
        """Re-read jobs this runner has but does not hold: ``ids``, or every
        paused one, so a ``resume`` applied to the state while no daemon held
        the job reaches the daemon that has it in its configuration.  (An
        unpaused one needs no look: its next slot claims it, reading the state.)"""
        r = self._runner
        book = self._book
        with book.cond:
            ids = [j.cfg.id for j in book.jobs.values()
                   if (j.state.paused if ids is None else j.cfg.id in ids)
                   and not j.leased and not j.running and not j.removed]
        stored = r.state.load(ids) if ids else {}
        now = r.clock()
        with book.cond:
            for job_id, state in stored.items():
                job = book.jobs.get(job_id)
                if job is None or job.leased or job.running or job.removed:
                    continue
                was_paused, job.state, job.delivered = job.state.paused, state, 0
                if was_paused and not state.paused and book.started:
                    book.schedule_first(job, now)

    def _tick_soon(self, job: _Job, command: int | None = None,
                   scheduled_at: float | None = None) -> bool:
        """Dispatch a job now, off schedule, unless a tick of it is running;
        ``scheduled_at``: the slot it stands for (a backfill's; None: now)."""
        book = self._book
        with book.cond:
            if job.running or job.removed:
                return False
            book.mark_running(job)
            job.scheduled_for = scheduled_at
            if command is not None:
                job.command = command
        self._dispatch(job, None, command)
        return True


def _backfill_slot(arg: str | None) -> float | None:
    """A queued ``tick`` command's slot time (``backfill``): its argument,
    epoch seconds; None when it has none (an operator's ``tick``)."""
    try:
        value = float(arg) if arg else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _context(cfg: JobConfig, cursor: bytes | None, now: float, cancel: threading.Event,
             timeout_secs: float | None, scheduled_at: float | None = None) -> PollContext:
    """What a poller is given for one tick of ``cfg`` (a real one or a dry
    run); ``scheduled_at``: its slot's time (None: ``now``)."""
    return PollContext(cfg.id, cfg.agent, cfg.kind, cursor, cfg.config,
                       datetime.fromtimestamp(now, timezone.utc),
                       timedelta(seconds=cfg.schedule.nominal_interval), cancel,
                       None if timeout_secs is None else timedelta(seconds=timeout_secs),
                       None if scheduled_at is None
                       else datetime.fromtimestamp(scheduled_at, timezone.utc))


_RUN_CURSOR_TEXT_MAX = 64       # bytes of a cursor a run record shows as text


def _run_cursor(cursor: bytes | None, secrets: Iterable[tuple[str, str]]) -> dict | None:
    """A cursor as a run record keeps it: its size, and its text when short
    and printable (a resolved secret in it shown as its placeholder)."""
    if cursor is None:
        return None
    doc: dict[str, Any] = {"bytes": len(cursor)}
    if len(cursor) <= _RUN_CURSOR_TEXT_MAX:
        try:
            text = cursor.decode("utf-8")
        except UnicodeDecodeError:
            return doc
        if text.isprintable():
            doc["text"] = _hide_secrets(text, secrets)
    return doc


def _run_record(cfg: JobConfig, slot: float | None, scheduled_at: float | None,
                started: float, outcome: TickOutcome, before: bytes | None,
                after: bytes | None, secrets: Iterable[tuple[str, str]]) -> RunRecord:
    """The run history's record of a tick about to be committed: ``slot`` is
    the live schedule's (None: off schedule), ``scheduled_at`` the slot the
    tick ran for (a backfill's too); the plugin's stderr tail that a failed
    tick's error ends with is its own field."""
    m = outcome.ack.metrics if outcome.ack and outcome.ack.metrics else TickMetrics()
    error, _, stderr = (_hide_secrets(outcome.error, secrets) or "").partition("; stderr: ")
    trigger = "schedule" if slot is not None else (
        "operator" if scheduled_at is None else "backfill")
    return RunRecord(cfg.id, scheduled_at, started, outcome.duration, outcome.status.value,
                     _storable(error or None), m.items_seen, m.items_dispatched,
                     _run_cursor(before, secrets), _run_cursor(after, secrets),
                     _storable(stderr or None), trigger)


class _Ticks:
    """One tick of a job, from its lease to its committed outcome's effects:
    claim when needed, poll the route, plan, commit with the outbox, then
    log, metrics, alert and the next slot (the error policy lives here)."""

    def __init__(self, runner: "Runner", book: _JobBook, plugins: _Plugins,
                 commands: "_Commands"):
        self._runner = runner               # config, clock, rng, state, metrics, publisher
        self._book, self._plugins, self._commands = book, plugins, commands

    def tick(self, job: _Job, slot: float | None, *, command: int | None = None,
             commit_async: bool) -> TickOutcome:
        """Run one tick of a job (``running`` already set) and store its outcome.

        ``slot`` None is an off-schedule tick (an operator's): it runs even
        when the job is not due.
        """
        r, book, cfg = self._runner, self._book, job.cfg
        now = r.clock()
        started = time.monotonic()
        cancel = threading.Event()
        route = self._plugins.routes.get(cfg.kind)
        with book.cond:
            job.cancel = cancel
            scheduled_at, job.scheduled_for = (slot if slot is not None
                                               else job.scheduled_for), None
            if book.stopping or job.removed:
                cancel.set()
        outcome = TickOutcome(cfg.id, cfg.kind, TickStatus.OK)
        if cancel.is_set():                 # stop() or a reload came while it sat in the queue
            outcome.status, outcome.error = TickStatus.CANCELLED, "tick cancelled before it started"
            return self._finish_unplanned(job, slot, outcome, command)
        policy = JobPolicy.of(r.config, cfg)
        budget = self._plugins.budget(cfg.kind, timeout_secs=policy.timeout_secs)
        ttl = self._plugins.lease_ttl(cfg)
        # Claim only when the lease would not outlast this tick: in steady
        # state each commit renews it, so ticks make no extra round trip.
        if not job.leased or (job.state.lease_until or 0) < now + budget + 5.0:
            early = self._claim(job, slot, now, ttl, outcome, command)
            if early is not None:
                return early
        ctx = _context(cfg, job.state.cursor, now, cancel, policy.timeout_secs, scheduled_at)
        self._poll_within(job, route, ctx, outcome)
        outcome.duration = time.monotonic() - started
        if cancel.is_set():
            why = "job removed by a reload" if job.removed else "tick cancelled"
            outcome.status, outcome.error, outcome.ack = TickStatus.CANCELLED, why, None
            return self._finish_unplanned(job, slot, outcome, command)
        base = job.state
        if slot is None:                    # off schedule: the slot on the heap stays
            base = base.replace(next_run_at=job.next_run_at if job.generation >= 0 else None)
        planned = functools.partial(plan_tick, base, outcome, schedule=cfg.schedule, slot=slot,
                                    started=now, config=r.config, rng=r.rng,
                                    schedule_key=job.key, policy=policy)
        plan = planned(finished=r.clock())
        outbox = self._outbox_for(job, plan, outcome, now)
        problem = r.state.unstorable(outbox)
        if problem:
            # A commit that can never succeed would make the tick run again
            # forever: it fails for good instead, its cursor not advanced,
            # and the job pauses with the reason in its status.
            outcome.status, outcome.error, outcome.ack = TickStatus.PERMANENT, problem, None
            plan = planned(finished=r.clock())
            outbox = self._outbox_for(job, plan, outcome, now)
        outcome.next_run_at = plan.run_at
        new = plan.state.replace(lease_until=now + ttl)
        result_text = None if command is None else json.dumps(outcome.to_dict())
        done = functools.partial(self._committed, job, plan, new, outcome, slot, bool(outbox))
        stored = {"command": None if command is None else (command, result_text),
                  "outbox": outbox, "run_keep": policy.run_history, "run": _run_record(
                      cfg, slot, scheduled_at, now, outcome, job.state.cursor, new.cursor,
                      r.config.secrets)}
        book.outcomes.acquire()             # given back by _settle_one
        if commit_async:
            try:
                r.state.commit(new, done, **stored)
            except StateError as exc:
                done(exc)
            except BaseException:
                book.outcomes.release()     # no outcome will reach _settle_one
                raise
        else:
            try:
                result = r.state.commit_now(new, **stored)
            except StateError as exc:
                result = exc
            except BaseException:
                book.outcomes.release()
                raise
            self._settle_one(job, plan, new, outcome, slot, bool(outbox), result)
            if outbox and result is True and not book.started:
                try:                        # no daemon behind this runner: try once now
                    r.publisher.run_pass()
                except StateError as exc:
                    log.error("outbox: %s", exc)
        return outcome

    def _claim(self, job: _Job, slot: float | None, now: float, ttl: float,
               outcome: TickOutcome, command: int | None) -> TickOutcome | None:
        """Take (or renew) the job's lease before its tick; an outcome when
        the tick must not run (held elsewhere, taken over and not due), else None."""
        r, cfg = self._runner, job.cfg
        taking_over = not job.leased
        try:
            granted = r.state.claim({cfg.id: now + ttl}, now, paused_on_boot=(
                [cfg.id] if cfg.paused_on_boot else []))
        except StateError as exc:
            granted, outcome.error = {}, str(exc)
        if cfg.id not in granted:
            outcome.status, elsewhere = TickStatus.LEASED, outcome.error is None
            outcome.error = outcome.error or "another daemon holds this job's lease"
            return self._finish_unplanned(job, slot, outcome, command, elsewhere)
        with self._book.cond:
            job.state, job.leased, job.delivered = granted[cfg.id], True, 0
        if not taking_over:
            return None
        # The state is what the last owner committed, with the commands
        # queued for it applied: resume from it.
        try:
            kept = self._commands.take_over(job)
        except StateError as exc:
            kept, outcome.error = False, f"queued commands not read: {exc}"
        if not kept:
            with self._book.cond:
                job.leased = False      # the next tick claims and tries again
            outcome.status = TickStatus.LEASED
            outcome.error = outcome.error or "another daemon holds this job's lease"
            return self._finish_unplanned(job, slot, outcome, command)
        with self._book.cond:
            job.commands_wait = True    # its tick commands: after this tick
        resume_at = _caught_up(r.config, cfg, next_run(job.state, cfg.schedule, job.key,
                                                        now)[0], now)
        if slot is not None and (resume_at is None or resume_at > now):
            log.info("job %s taken over; its next slot is %s", cfg.id, _iso(resume_at))
            self._book.release(job, resume_at)
            outcome.status = TickStatus.CANCELLED
            outcome.error = "taken over; not due yet"
            return outcome
        return None

    def dry(self, job: _Job, cursor: bytes | None,
            on_request: Callable[[TickRequest], None] | None) -> TickOutcome:
        """A tick from ``cursor`` that stores nothing (``Runner.dry_run``)."""
        cfg = job.cfg
        ctx = _context(cfg, cursor, self._runner.clock(), threading.Event(),
                       cfg.overrides.get("timeout_secs"))
        if on_request is not None:
            on_request(ctx.to_request())
        outcome = TickOutcome(cfg.id, cfg.kind, TickStatus.OK)
        started = time.monotonic()
        self._poll_within(job, self._plugins.routes.get(cfg.kind), ctx, outcome)
        outcome.duration = time.monotonic() - started
        return outcome

    def _poll_within(self, job: _Job, route: _Route | None, ctx: PollContext,
                     outcome: TickOutcome) -> None:
        """``poll``, bounded by the job's own ``timeout_secs`` (``ctx.timeout``).
        A plugin's proxy enforces it; an in-process poller cannot be
        stopped, so at the deadline its tick is cancelled (``ctx.cancel``)
        and, when it returns, fails as a transient timeout."""
        if ctx.timeout is None or route is None or route.plugin_id is not None:
            self.poll(route, ctx, outcome)
            return
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            ctx.cancel.set()
        timer = threading.Timer(ctx.timeout.total_seconds(), expire)
        timer.daemon, timer.name = True, "nexo-tick-timeout"
        timer.start()
        try:
            self.poll(route, ctx, outcome)
        finally:
            timer.cancel()
        if expired.is_set():
            with self._book.cond:       # stop() and a reload cancel under the lock
                if self._book.stopping or job.removed:
                    return              # cancelled after all
                ctx.cancel.clear()
                outcome.status, outcome.ack = TickStatus.TRANSIENT, None
                outcome.error = (f"tick timed out after {ctx.timeout.total_seconds():g}s "
                                 "(the job's timeout_secs)")

    @staticmethod
    def poll(route: _Route | None, ctx: PollContext, outcome: TickOutcome) -> None:
        """Ask the route's poller for one tick; its ack or error goes into ``outcome``."""
        try:
            if route is None:
                raise PollerError.Config(ctx.job_id,
                                         f"no plugin or poller serves kind {ctx.kind!r}")
            ack = route.poller.tick(ctx)
            if ack is not None and not isinstance(ack, TickAck):
                raise PollerError.Transient(f"poller returned {type(ack).__name__}, not TickAck")
            outcome.ack = ack or TickAck()
        except PollerError as exc:
            outcome.status = TickStatus(exc.classify().value)
            outcome.error = str(exc)
            outcome.retry_after = getattr(exc, "retry_after", None)
            try:                            # committed with the error (plan_tick)
                outcome.ack = _partial_ack(exc)
            except TypeError as bad:
                outcome.error += f" (partial progress dropped: {bad})"
        except Exception as exc:            # a bug in an in-process poller: retry later
            log.debug("poller for %s raised", ctx.kind, exc_info=True)
            outcome.status = TickStatus.TRANSIENT
            outcome.error = f"{type(exc).__name__}: {exc}"

    def _outbox_for(self, job: _Job, plan: TickPlan, outcome: TickOutcome,
                    now: float) -> list[OutboxItem]:
        """What this tick hands on, stored with its state: the reply's
        deliveries, and the alert for the job's ``failure_to`` channel."""
        agents, cfg = self._runner.config.agents, job.cfg
        items = [_outbox_item(cfg.id, "delivery", outbound_topic(d.channel, cfg.agent, agents),
                              _addressed(d.payload, d.recipient), now)
                 for d in (outcome.ack.deliver if outcome.ack else ())]
        to = cfg.failure_to
        if plan.alert and to and to.get("channel") and to.get("to"):
            text = f"\u26a0 poller `{cfg.id}` (kind={cfg.kind}) failing: {outcome.error}"
            items.append(_outbox_item(cfg.id, "alert", outbound_topic(to["channel"], cfg.agent,
                                                                      agents),
                                      {"text": text, "to": to["to"]}, now))
        return items

    def _finish_unplanned(self, job: _Job, slot: float | None, outcome: TickOutcome,
                          command: int | None, elsewhere: bool = False) -> TickOutcome:
        """A tick that stored nothing (cancelled, leased): log it, free the job.

        A slot of a job ``elsewhere`` (another daemon holds its lease) is no
        tick of this daemon: no outcome line (debug only), no outcome in the
        metrics, only a counter.  An operator's tick still gets its line."""
        r = self._runner
        if elsewhere and slot is not None:
            log.debug("job %s: slot skipped, another daemon holds its lease", job.cfg.id)
            r.metrics.held_elsewhere(job.cfg.id, job.cfg.kind, job.cfg.agent)
        else:
            self._log_tick(outcome)
            r.metrics.observe(outcome, agent=job.cfg.agent)
        if command is not None:
            try:
                r.state.finish_command(command, json.dumps(outcome.to_dict()))
            except StateError as exc:
                log.error("%s", exc)
        nxt = None
        if not self._book.stopping and not job.removed:
            if slot is not None:
                nxt = job.cfg.schedule.next_after(slot, r.clock())
            elif job.generation >= 0:       # off schedule: in case its slot passed meanwhile
                now = r.clock()
                nxt = job.cfg.schedule.next_after(now, now)
        self._book.release(job, nxt, nxt, keep=slot is None)
        return outcome

    def _committed(self, job: _Job, plan: TickPlan, new: JobState, outcome: TickOutcome,
                   slot: float | None, queued: bool, result: Any) -> None:
        """The store's ``done`` callback (writer thread): hand over, do nothing else.

        A commit of many writes calls this once per write; whoever drains
        the effects takes them all, so only the first one needs a wake-up."""
        book = self._book
        with book.cond:
            book.effects.append((job, plan, new, outcome, slot, queued, result))
            if len(book.effects) == 1:
                book.cond.notify_all()

    def drain_effects(self, limit: int | None = None) -> None:
        """Carry out the committed outcomes' effects handed over so far (at
        most ``limit`` of them)."""
        book = self._book
        while limit is None or limit > 0:
            with book.cond:
                if not book.effects:
                    return
                item = book.effects.popleft()
            self._settle_one(*item)
            if limit is not None:
                limit -= 1

    def settle(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Carry out committed outcomes until ``done()`` (lock held) or the deadline."""
        book = self._book
        while True:
            self.drain_effects()
            with book.cond:
                if done():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if not book.effects:
                    book.cond.wait(left)

    def _settle_one(self, job: _Job, plan: TickPlan, new: JobState, outcome: TickOutcome,
                    slot: float | None, queued: bool, result: Any) -> None:
        """A commit's effects: live state, log, metrics, alert, the publisher
        woken for what was queued, next slot."""
        try:
            self._carry_out(job, plan, new, outcome, slot, queued, result)
        finally:
            self._book.outcomes.release()

    def _carry_out(self, job: _Job, plan: TickPlan, new: JobState, outcome: TickOutcome,
                   slot: float | None, queued: bool, result: Any) -> None:
        r, book = self._runner, self._book
        if result is True:
            with book.cond:
                job.state, job.unstored = new.replace(revision=new.revision + 1), 0
                if r.state.handed_over(job.cfg.id):
                    job.leased = False      # stored, and left for another daemon to take
            if queued and r.publisher is not None:
                r.publisher.wake()
            self._log_tick(outcome)         # before the release: wait_idle() sees it
            r.metrics.observe(outcome, new.last_run_at, job.cfg.agent)
            if plan.alert:
                self._send_alert(job, plan.alert, outcome)
            if plan.skipped:
                _log_skipped(job.cfg.id, plan.skipped, JobPolicy.of(r.config, job.cfg),
                             plan.slot)
            book.release(job, plan.run_at, plan.slot)
            return
        lost = result is False
        why = "lease lost: another daemon took this job over" if lost else str(result)
        log.error("job %s: tick result not stored (%s)", job.cfg.id, why)
        outcome.status, outcome.error, outcome.next_run_at = TickStatus.UNSTORED, why, None
        self._log_tick(outcome)
        r.metrics.observe(outcome, agent=job.cfg.agent)
        now = r.clock()
        with book.cond:
            job.unstored += 1
            if lost:
                job.leased = False
        if lost and slot is not None:
            nxt = job.cfg.schedule.next_after(slot, now)
        else:                               # never a tight loop: back off as for errors
            pol = JobPolicy.of(r.config, job.cfg)
            nxt = now + _backoff(pol.backoff_initial_secs, pol.backoff_max_secs, job.unstored)
        book.release(job, None if book.stopping else nxt, nxt)

    def _send_alert(self, job: _Job, reason: str, outcome: TickOutcome) -> None:
        payload = {"job": job.cfg.id, "kind": job.cfg.kind, "agent": job.cfg.agent,
                   "reason": reason, "error": outcome.error,
                   "consecutive_errors": job.state.consecutive_errors,
                   "failure_to": job.cfg.failure_to, "at": _iso(self._runner.clock())}
        log.warning("alert: job %s: %s: %s", job.cfg.id, reason, outcome.error)
        self._alert(payload, f"alert for job {job.cfg.id} not published")

    def dead_letter(self, item: OutboxItem, error: str) -> None:
        """The publisher gave ``item`` up: log it and alert the channel."""
        job = self._book.jobs.get(item.job)
        payload = {"job": item.job, "kind": job.cfg.kind if job else None,
                   "agent": job.cfg.agent if job else None,
                   "reason": f"{item.what} {item.id} moved to the dead letters",
                   "error": error, "topic": item.topic, "at": _iso(self._runner.clock())}
        log.error("outbox: %s %s for job %s dead-lettered: %s", item.what, item.id, item.job,
                  error)
        self._alert(payload, "alert not published")

    def _alert(self, payload: dict, failed: str) -> None:
        """Publish ``payload`` on the alert topic; log ``failed`` when the broker refuses."""
        r = self._runner
        try:
            r.broker.publish(r.config.alert_topic, payload)
        except PluginPollerForwardError as exc:
            log.error("%s: %s", failed, exc)

    @staticmethod
    def _log_tick(o: TickOutcome) -> None:
        level = logging.INFO if o.status in (TickStatus.OK, TickStatus.LEASED,
                                             TickStatus.CANCELLED) else logging.WARNING
        if not log.isEnabledFor(level):
            return
        m = o.ack.metrics if o.ack and o.ack.metrics else TickMetrics()
        log.log(level, "tick job=%s kind=%s outcome=%s duration_ms=%.1f items_seen=%d "
                "items_dispatched=%d%s", o.job_id, o.kind, o.status.value, o.duration * 1000,
                m.items_seen, m.items_dispatched, f" error={o.error}" if o.error else "",
                extra={"tick": o.to_dict()})


class _Workers:
    """The tick workers: a due job queues in its kind's lane and runs on a
    pool thread when the lane's capacity allows; an operator's tick takes a
    slot of the same lane."""

    def __init__(self, book: _JobBook, plugins: _Plugins, lanes: _Lanes, max_workers: int,
                 tick: Callable[..., Any]):
        self._book, self._plugins, self._lanes = book, plugins, lanes
        self._pool = _WorkerPool(max_workers)
        self._tick = tick                   # _Ticks.tick

    def dispatch(self, job: _Job, slot: float | None, command: int | None = None) -> None:
        """Queue a due job (marked running) in its lane; start what capacity allows."""
        lane = self._plugins.lane_of(job.cfg.kind)
        with self._book.cond:
            starts = self._lanes.queue(lane, job, slot, command)
        for args in starts:
            self._pool.submit(self._work, *args)

    def _work(self, job: _Job, slot: float | None, command: int | None, lane: _Lane) -> None:
        """Run a tick; then, on this same thread, the next tick the freed
        capacity lets start.  Under load a lane always has one waiting:
        handing it to the pool would wake another thread as this one goes idle."""
        while True:
            try:
                self._tick(job, slot, command=command, commit_async=True)
            except Exception:
                log.exception("tick worker failed")
            with self._book.cond:
                starts = self._lanes.finished(lane)
            if not starts:
                return
            for args in starts[1:]:
                self._pool.submit(self._work, *args)
            job, slot, command, lane = starts[0]

    def run_now(self, job: _Job, scheduled_at: float | None = None) -> TickOutcome:
        """An operator's tick of ``job`` on the caller's thread, committed
        before it returns (``Runner.run_once``); ``scheduled_at``: the time of
        the slot it stands for (a backfill's; None: now)."""
        book = self._book
        running = TickOutcome(job.cfg.id, job.cfg.kind, TickStatus.BUSY,
                              "a tick of this job is running")
        if job.running:
            return running
        lane, busy = self._enter(job)
        if lane is None:
            return TickOutcome(job.cfg.id, job.cfg.kind, TickStatus.BUSY, busy)
        try:
            with book.cond:
                if job.running:             # it started while this one waited for a slot
                    return running
                book.mark_running(job)
                job.scheduled_for = scheduled_at
            try:
                return self._tick(job, None, commit_async=False)
            finally:
                if job.running:             # interrupted (Ctrl-C) before it was released
                    book.release(job, None, keep=True)
        finally:
            self._leave(lane)

    def _enter(self, job: _Job) -> tuple[_Lane | None, str | None]:
        """An operator's tick takes a slot of the job's lane, as a scheduled
        one does (``max_concurrent_ticks`` holds for both), waiting at most
        the route's budget: ``(lane, None)``, or ``(None, why)`` when no
        slot came free by then."""
        lane = self._plugins.lane_of(job.cfg.kind)
        budget = self._plugins.budget(job.cfg.kind)
        deadline = time.monotonic() + budget
        book = self._book
        with book.cond:
            while not book.stopping:
                left = deadline - time.monotonic()
                rate = self._lanes.rate_wait(lane)      # an operator's tick counts too
                if lane.running < lane.limit and rate <= 0:
                    break
                if rate > max(left, 0.0):
                    return None, (f"the rate limit of {lane.key} ({lane.rate.limit} ticks a "
                                  f"minute) lets the next tick start in {rate:.1f}s")
                if left <= 0:
                    return None, (f"all {lane.limit} tick slots of {lane.key} stayed busy "
                                  f"for {budget:g}s")
                # A lane's worker frees its slot without a notify: look again soon.
                book.cond.wait(min(left, _CANCEL_POLL_SECS))
            self._lanes.take(lane)
        return lane, None

    def _leave(self, lane: _Lane) -> None:
        """Free an operator's slot; start the scheduled ticks it held back."""
        with self._book.cond:
            starts = self._lanes.leave(lane)
        for args in starts:
            self._pool.submit(self._work, *args)

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Every lane: key -> (running, waiting, waiting held by its rate limit)."""
        with self._book.cond:
            return self._lanes.snapshot()

    def held_wait(self) -> float | None:
        """Seconds until a tick a rate limit holds may start (lock held; None: none)."""
        return self._lanes.held_wait()

    def start_held(self) -> None:
        """Start the ticks a rate limit held whose time has come (all, when stopping)."""
        with self._book.cond:
            starts = self._lanes.start_held()
        for args in starts:
            self._pool.submit(self._work, *args)

    def close(self) -> None:
        self._pool.close()


class _Scheduler:
    """The scheduler thread: pops due jobs off the timer heap to the
    workers, carries out committed outcomes' effects, and looks at the
    state when a command, the running set or the store's heartbeat asks."""

    def __init__(self, runner: "Runner", book: _JobBook, ticks: _Ticks, workers: _Workers,
                 commands: "_Commands"):
        self._runner = runner               # its state, metrics, monotonic clock, config
        self._book, self._ticks, self._workers, self._commands = book, ticks, workers, commands
        self.wall_jobs = _has_wall_clock_jobs(runner.config)    # reload sets it anew
        self.state_error: str | None = None         # why the state cannot be used now
        self.thread: threading.Thread | None = None
        self._last_poll = 0.0                       # time.monotonic() of the last look at the state
        self._state_backoff = _COMMAND_POLL_SECS
        self._published_running: frozenset = frozenset()

    def start(self) -> None:
        # Every job is scheduled: what the daemon holds for its life (configs,
        # jobs, their states, the heap) leaves the cyclic garbage collector's
        # view.  With 100,000 jobs a full collection walks a million objects
        # for hundreds of milliseconds, and nothing runs meanwhile; frozen,
        # they are never walked again (nor freed, were they cyclic garbage).
        gc.freeze()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="nexo-scheduler")
        self.thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the thread (stopping); then the ticks a rate limit holds
        start, to be cancelled, rather than keep the stop waiting."""
        if self.thread is not None:
            self.thread.join(timeout)
            gc.unfreeze()                   # what start() froze is collectable again
        self._workers.start_held()

    @property
    def alive(self) -> bool:
        """The thread lives, or none was started (``fire_due`` drives)."""
        return self.thread is None or self.thread.is_alive()

    def _poll_at(self) -> float | None:
        """When the scheduler must look at the state unasked (a
        ``time.monotonic()``; lock held), or None when only a poke needs it to.

        An idle daemon does not poll: commands arrive as SIGUSR1 (the CLI),
        through the admin API or by the store's own notification
        (``StateStore.watch_commands``), each of which calls ``poke()``.
        Timers remain for a failing state (retried with backoff), for the
        running set while it settles (``status`` shows it) and for the
        store's heartbeat."""
        if self.state_error is not None:
            return self._last_poll + self._state_backoff
        if self._book.running or self._published_running:
            return self._last_poll + _COMMAND_POLL_SECS
        beat = self._runner.state.heartbeat_secs
        return None if beat is None else self._last_poll + beat

    def _poll_due(self) -> bool:
        at = self._poll_at()
        return self._book.commands_due or (at is not None and time.monotonic() >= at)

    def _next_wake(self, now: float) -> float | None:
        """Seconds until the scheduler has something to do (lock held); None
        when nothing will happen until somebody wakes it.  While cron or at
        jobs wait it looks at the wall clock now and then: a step of it moves
        their slots."""
        waits = []
        at = self._poll_at()
        if at is not None:
            waits.append(max(0.0, at - time.monotonic()))
        deadline = self._book.heap.next_deadline()
        if deadline is not None:
            waits.append(max(0.0, deadline - now))
            if self.wall_jobs:
                waits.append(_WALL_CLOCK_LOOK_SECS)
        held = self._workers.held_wait()
        if held is not None:
            waits.append(held)
        return min(waits) if waits else None

    def _loop(self) -> None:
        """Pop due jobs, carry out committed outcomes, pick up commands.

        Nothing raised here may end the thread: a state that cannot be read
        is retried with backoff and reported until it can.
        """
        book = self._book
        while True:
            try:
                with book.cond:
                    if book.stopping:
                        return
                    book.watch_clock()
                    now = self._runner.monotonic()
                    due = self._pop_due(now, _SCHEDULER_PASS)
                    held = self._workers.held_wait() == 0      # a rate limit lets one go
                    if not due and not held and not book.effects and not self._poll_due():
                        book.cond.wait(self._next_wake(now))
                        continue
                # Due slots first: the effects of outcomes already stored can wait a pass.
                for job, slot in due:
                    self._workers.dispatch(job, slot)
                if held:
                    self._workers.start_held()
                self._ticks.drain_effects(_SCHEDULER_PASS)
                if self._poll_due():
                    self._last_poll = time.monotonic()
                    self._poll_state()
            except StateError as exc:
                self._state_failed(exc)
            except Exception:
                log.exception("scheduler: unexpected error; carrying on")
                with book.cond:
                    book.cond.wait(1.0)

    def _poll_state(self) -> None:
        """Commands and the running set, each time the scheduler looks at the state."""
        store = self._runner.state
        store.check_file()
        due, self._book.commands_due = self._book.commands_due, False
        if store.changed() or due:
            self._commands.apply_pending()
            self._commands.refresh_unheld()
        # The running set, not every job: with 100,000 jobs a walk of them
        # all took ~3 ms twice a second, and due slots waited meanwhile.
        with self._book.cond:
            running = frozenset(j.cfg.id for j in self._book.running if not j.commanding)
        if running != self._published_running:
            store.set_running(running)
            self._published_running = running
        if self.state_error is not None:
            log.warning("state readable again after: %s", self.state_error)
            self.state_error, self._state_backoff = None, _COMMAND_POLL_SECS

    def _state_failed(self, exc: StateError) -> None:
        first = self.state_error is None
        self.state_error = str(exc)
        self._runner.metrics.state_error()
        if first:
            log.error("state: %s (retrying with backoff; ticks wait)", exc)
        else:
            log.debug("state still failing: %s", exc)
        self._state_backoff = _backoff(self._state_backoff, _STATE_RETRY_MAX_SECS, 2)

    def _pop_due(self, now: float, limit: int | None = None) -> list[tuple[_Job, float]]:
        """The due jobs that may run now (at most ``limit`` entries looked
        at), marked running (lock held)."""
        due = []
        for job, nominal in self._book.heap.pop_due(now, limit):
            if job.state.paused or job.running:
                if job.commanding:
                    job.missed = nominal
                continue
            self._book.mark_running(job)
            due.append((job, nominal))
        return due

    def fire_due(self) -> int:
        """Dispatch every job whose slot has come (for tests driving the clock)."""
        self._ticks.drain_effects()
        with self._book.cond:
            self._book.watch_clock()
            due = self._pop_due(self._runner.monotonic())
        for job, slot in due:
            self._workers.dispatch(job, slot)
        self._workers.start_held()
        return len(due)


class _Reload:
    """A new configuration applied to a running daemon: jobs added, replaced
    and removed, plugins restarted where their spec changed, all or nothing
    where it matters."""

    def __init__(self, runner: "Runner", book: _JobBook, plugins: _Plugins,
                 scheduler: _Scheduler):
        self._runner = runner               # its config (replaced), state and clock
        self._book, self._plugins, self._scheduler = book, plugins, scheduler

    def apply(self, new: DaemonConfig) -> dict[str, list[str]]:
        """Bring the running set in line with ``new`` (already validated).

        All or nothing where it matters: a change of ``state_db`` is refused,
        and the state is asked for the new jobs before anything changes, so a
        state that cannot be written leaves the old configuration running.
        Returns the diff: ``added``, ``replaced``, ``removed``, ``kept`` job
        ids and ``restarted`` plugin ids.
        """
        r, book = self._runner, self._book
        if os.path.abspath(new.state_db) != os.path.abspath(r.config.state_db):
            raise ConfigError(new.source, [("state_db", (
                f"changed from {r.config.state_db} to {new.state_db}: the state cannot "
                "move while the daemon runs; restart the daemon to use the new location"))])
        new_jobs = {j.id: j for j in new.jobs}
        added = [_Job(jc) for jc in new.jobs if jc.id not in book.jobs]
        now = r.clock()
        if added:                           # the state first: a failure here changes nothing
            stored = r.state.load([j.cfg.id for j in added])
            for job in added:
                job.state = stored.get(job.cfg.id, job.state)
            if book.started:
                book.lease(r.state, added, now,
                           lambda cfg: self._plugins.lease_ttl(cfg, new.plugins))
        # Jobs leave first, so no queued tick of theirs runs against a plugin that is gone.
        removed = []
        with book.cond:
            for job_id in [i for i in book.jobs if i not in new_jobs]:
                job = book.jobs.pop(job_id)
                job.removed, job.generation = True, -1
                if job.cancel is not None:
                    job.cancel.set()
                removed.append(job_id)
        if removed:
            try:
                r.state.release(removed)
            except StateError as exc:
                log.error("leases of removed jobs not released (they expire): %s", exc)
        restarted = self._plugins.reconcile(new)
        diff: dict[str, list[str]] = {
            "added": [j.cfg.id for j in added], "replaced": [], "removed": removed, "kept": [],
            "restarted": restarted}
        r.config = dataclasses.replace(new, jobs=list(new.jobs), plugins=list(new.plugins))
        with book.cond:
            self._scheduler.wall_jobs = _has_wall_clock_jobs(r.config)
            for job in added:
                book.jobs[job.cfg.id] = job
            for job in added:
                if book.started:
                    book.schedule_first(job, now)
            for job_id, jc in new_jobs.items():
                job = book.jobs[job_id]
                if job_id in diff["added"]:
                    continue
                if jc.raw_json == job.cfg.raw_json:
                    diff["kept"].append(job_id)
                    continue
                job.cfg, job.key = jc, _schedule_key(jc)
                diff["replaced"].append(job_id)
                if book.started and not job.running:
                    book.schedule_first(job, now)       # a new schedule voids the stored slot
        log.info("reloaded: %s", ", ".join(f"{k} {len(v)}" for k, v in diff.items()))
        return diff


class _Signals:
    """The signals ``wanted``, while installed, arrive as bytes on a wake-up
    pipe (``signal.set_wakeup_fd``) that ``receive`` reads: a handler that
    took a lock could deadlock against the very thread it interrupted."""

    def __init__(self, wanted: Iterable[int]):
        self._wanted = set(wanted)
        self._fds = (-1, -1)                # (read, write)
        self._previous: dict = {}
        self._old_wakeup = -1

    def __enter__(self) -> "_Signals":
        read_fd, write_fd = self._fds = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous = {s: signal.signal(s, lambda signum, frame: None) for s in self._wanted}
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        return self

    def receive(self) -> set[int]:
        """Wait for signals: the numbers of those that came."""
        return set(os.read(self._fds[0], 256))      # one byte per signal number

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        for fd in self._fds:
            os.close(fd)


class Runner:
    """The poller daemon: schedules jobs, ticks them, stores what they return.

    ``Runner(config)`` then ``register(poller)`` for in-process kinds, then
    ``start()``; ``stop()`` shuts everything down.  ``run_once(job_id)``
    ticks one job now.  ``state`` may be any ``StateStore`` (default: sqlite
    at ``state_db``).

    Time: ``clock`` is wall time (seconds since the epoch: what plugins are
    told, what cron and ``at`` mean); ``monotonic`` is what the timer heap
    waits on, so a wall clock stepped back or forth delays nothing.  A step
    is noticed as a change of ``clock() - monotonic()``: interval jobs keep
    their pace, cron and ``at`` jobs move to their new wall-clock slots.
    Inject both to drive time in tests; with only ``clock`` injected it
    serves as both (steps then cannot be told from time passing).

    Threads: the scheduler pops due jobs and carries out every committed
    outcome's effects (log, alert, next slot); workers run ticks; the state
    store's writer only writes; the publisher drains the outbox.

    Deliveries go, by precedence, to ``deliver(topic, event)`` (a callable:
    returning means delivered, raising means retry), to the configured
    ``delivery_sink`` webhook, or to the broker.

    A facade: life cycle, operator verbs and the read API are here; the
    work is its collaborators', each owning one thing: ``_JobBook`` (jobs,
    lock, timer heap), ``_Plugins`` (routes, supervised plugins),
    ``_Workers`` (lanes, tick threads), ``_Ticks`` (one tick and its
    effects), ``_Commands``, ``_Scheduler``, ``_Reload``, ``_Signals``.
    """

    def __init__(self, config: DaemonConfig, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None, rng: Any = None,
                 state: StateStore | None = None,
                 deliver: Callable[[str, dict], Any] | None = None):
        self.config = config
        self.clock = clock
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.rng = rng or random.Random()   # jitter, retry spread: one source
        self.state: StateStore | None = state
        self.broker_server: BrokerServer | None = None     # the embedded one, when used
        self.broker = None
        self.broker_url: str | None = None      # what long-lived plugins are given
        self.config_path: str | None = None         # what the admin API's reload re-reads
        self.reload_lock = threading.Lock()         # one reload at a time (SIGHUP, admin API)
        self.stopped = threading.Event()
        self._metrics = _Metrics()
        self._http_servers: tuple = (None, None)    # (metrics, admin): may be one server
        self._deliver_hook = deliver
        self._publisher: _Publisher | None = None
        self._opened = self._torn_down = False
        book = self._book = _JobBook(clock, self.monotonic, lambda: (self.config,
                                                                     self.rng))
        lanes = _Lanes(lambda: self.config.max_workers, book)
        self._plugins = _Plugins(self, lanes, book.cond)
        # Commands dispatch ticks; workers run them; a tick may apply commands first.
        self._commands = _Commands(self, book, self._plugins, lambda *a: self._workers.dispatch(*a))
        self._ticks = _Ticks(self, book, self._plugins, self._commands)
        self._workers = _Workers(book, self._plugins, lanes, config.max_workers,
                                 self._ticks.tick)
        self._scheduler = _Scheduler(self, book, self._ticks, self._workers, self._commands)
        self._reload = _Reload(self, book, self._plugins, self._scheduler)

    @property
    def router(self) -> PluginPollerRouter:
        """The plugins by id (their manifests)."""
        return self._plugins.router

    def register(self, poller: Any) -> None:
        """Serve ``poller.kind`` in-process with ``poller.tick(ctx) -> TickAck``;
        optional ``max_concurrent_ticks``, ``max_ticks_per_minute`` attributes bound it."""
        self._plugins.register(poller)

    # -- life cycle -------------------------------------------------------------------

    def open(self) -> "Runner":
        """Start the broker, the plugins and the state, but not the scheduler."""
        if self._opened:
            return self
        cfg = self.config
        if self.state is None:
            self.state = _config_state(cfg)
        try:
            self.broker_server, self.broker, self.broker_url = _open_broker(cfg, self.state.owner)
            self._plugins.install(cfg.plugins)
            stored = self.state.load([j.id for j in cfg.jobs])
            for jc in cfg.jobs:
                self._book.jobs[jc.id] = _Job(jc, stored.get(jc.id))
            if self._deliver_hook is not None:
                sink = self._deliver_hook
            elif cfg.delivery_sink != "broker":
                sink = _webhook_sink(cfg.delivery_sink)
            else:
                sink = _broker_sink(self.broker)
            self._publisher = _Publisher(self, sink)
        except BaseException:
            self._teardown(time.monotonic() + self.config.shutdown_grace_secs)
            raise
        self._opened = True
        return self

    def start(self, background: bool = True) -> "Runner":
        """Open, then schedule every job and serve until ``stop()``.

        With ``background=False`` no scheduler thread runs: the caller drives
        time through ``clock`` and calls ``fire_due()`` (tests do).
        """
        self.open()
        book = self._book
        now = self.clock()
        others = self.state.register_daemon(now)
        # One step leases every job up front, so a tick needs no round trip to
        # the state before it runs, only its commit after.
        granted = book.lease(self.state, list(book.jobs.values()), now, self._plugins.lease_ttl)
        if others:
            held = sorted(set(book.jobs) - set(granted))
            log.warning("another daemon runs on this state (%s); this one holds %d of %d jobs%s",
                        ", ".join(others), len(granted), len(book.jobs),
                        f"; held elsewhere: {', '.join(held)}" if held else "")
        self.apply_commands()
        with book.cond:
            for job in book.jobs.values():
                book.schedule_first(job, now)
        if self.config.metrics_addr or self.config.admin_addr:
            try:
                self._http_servers = _start_http(self)
            except ConfigError:
                self.stop()
                raise
        book.started = True
        self.state.watch_commands(self.poke)
        if background:
            self._scheduler.start()
        self._publisher.start()
        log.info("nexo-poller started: %d jobs, %d plugins, broker %s", len(book.jobs),
                 self.router.len(), _redact_url(self.broker_url))
        return self

    def stop(self) -> None:
        """Stop scheduling, cancel ticks in flight, stop plugins, flush state.

        Bounded: ``shutdown_grace_secs`` for ticks in flight, then the state
        gets what it can store within a few seconds more, whatever another
        process does to it; what it cannot store is logged.
        """
        book = self._book
        with book.cond:
            if book.stopping:
                return
            book.stopping = True
            for job in book.jobs.values():
                if job.cancel is not None:
                    job.cancel.set()
            book.cond.notify_all()
        grace = self.config.shutdown_grace_secs
        deadline = time.monotonic() + grace
        if self.state is not None:
            self.state.set_deadline(deadline + 2.0)
        self._scheduler.join(5)
        if not self._ticks.settle(lambda: not book.running, deadline):
            log.warning("%d ticks did not finish within %.1fs; their results are dropped",
                        len(book.running), grace)
        self._teardown(deadline + 2.0)
        self.stopped.set()
        if book.started:
            log.info("nexo-poller stopped")

    def _teardown(self, deadline: float) -> None:
        """Release what ``open`` took, once (a failed open, then stop())."""
        if self._torn_down:
            return
        self._torn_down = True
        if self._publisher is not None:
            self._publisher.stop(deadline)
        if self.state is not None:
            try:
                self.state.release()
                self.state.unregister_daemon()
            except StateError as exc:
                log.error("leases not released (they expire on their own): %s", exc)
        self._plugins.stop_supervised()
        for server in {id(s): s for s in self._http_servers if s is not None}.values():
            server.shutdown()
            server.server_close()
        if self.state is not None:
            self.state.close(deadline)
        if self.broker is not None:
            self.broker.close()
        if self.broker_server is not None:
            self.broker_server.close()
        self._workers.close()

    def __enter__(self) -> "Runner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no tick is running or committing; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._ticks.settle(lambda: not self._book.running, deadline)

    def fire_due(self) -> int:
        """Dispatch every job whose slot has come (for tests driving the clock)."""
        return self._scheduler.fire_due()

    # -- operator actions --------------------------------------------------------------

    def run_once(self, job_id: str, scheduled_at: float | None = None) -> TickOutcome:
        """Tick a job now and store the outcome; ``scheduled_at``: its slot (backfill)."""
        self.open()
        return self._workers.run_now(self._book.get(job_id), scheduled_at)

    def dry_run(self, job_id: str, cursor: bytes | None | object = _MISSING, *,
                on_request: Callable[[TickRequest], None] | None = None) -> TickOutcome:
        """Tick a job through its route and store nothing: no lease is taken,
        nothing is committed, delivered or alerted.  ``cursor`` (default: the
        stored one) is what the tick starts from; ``on_request`` sees the
        request before it is sent."""
        self.open()
        job = self._book.get(job_id)
        return self._ticks.dry(job, job.state.cursor if cursor is _MISSING else cursor,
                               on_request)

    def pause(self, job_id: str, note: str | None = None, by: str | None = None) -> None:
        self._commands.send(job_id, "pause", pause_command_arg(note, by))   # who, why, now

    def resume(self, job_id: str) -> None:
        """Put a paused job back on its schedule (a slot missed while paused runs once)."""
        self._commands.send(job_id, "resume")

    def reset(self, job_id: str) -> None:
        """Forget a job's cursor: its next tick starts from scratch."""
        self._commands.send(job_id, "reset")

    def set_cursor(self, job_id: str, cursor: bytes | None, source: str = "set") -> None:
        """Set a job's cursor (recorded in its history as ``source``)."""
        self._commands.send(job_id, "cursor", cursor_command_arg(cursor, source))

    def apply_commands(self) -> int:
        """Carry out the operator commands queued for the jobs this daemon owns."""
        return self._commands.apply_pending()

    def poke(self) -> None:
        """Look at the state's commands and the outbox now, not at the next poll."""
        with self._book.cond:
            self._book.commands_due = True
            self._book.cond.notify_all()
        if self._publisher is not None:
            self._publisher.wake()

    def note_delivered(self, items: list[OutboxItem]) -> None:
        """The publisher delivered these: count them into their jobs (live view)."""
        self._book.note_delivered(items)

    def dead_letter(self, item: OutboxItem, error: str) -> None:
        """The publisher gave ``item`` up: log it and alert the channel."""
        self._ticks.dead_letter(item, error)

    # -- the read API: what the HTTP face, metrics, the publisher and the CLI see ---------

    def status(self, holders: Mapping[str, str] | None = None) -> list[dict]:
        """Every job as ``status`` shows it, from this daemon's memory.  Its
        ``holder`` is this daemon for the jobs it holds, else None; pass
        ``holders()`` (a read of the state) for every daemon's."""
        return self._book.status(self.config, holders, self.state.owner)

    def holders(self) -> dict[str, str]:
        """Which daemon holds each job's lease (job id -> owner), read from
        the state: another daemon's leases are not in this one's memory.
        While the state cannot be read, only this daemon's own leases."""
        store = self.state
        if store is None:
            return {}
        try:
            return store.holders(self.clock())
        except StateError:
            with self._book.cond:
                return self._book.own_holds(store.owner)

    @property
    def started(self) -> bool:
        """``start()`` has run (the jobs are scheduled, the listeners up)."""
        return self._book.started

    @property
    def stopping(self) -> bool:
        """``stop()`` has begun."""
        return self._book.stopping

    @property
    def state_error(self) -> str | None:
        """Why the state cannot be used now (None: it can)."""
        return self._scheduler.state_error

    @property
    def scheduler_alive(self) -> bool:
        """The scheduler thread lives, or none was started (``fire_due`` drives)."""
        return self._scheduler.alive

    @property
    def metrics(self) -> "_Metrics":
        return self._metrics

    @property
    def publisher(self) -> "_Publisher | None":
        """The outbox publisher (None before ``open``)."""
        return self._publisher

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served, (host, port) (None: nowhere)."""
        server = self._http_servers[0]
        return None if server is None else server.server_address[:2]

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """Where the admin API is served, (host, port) (None: nowhere)."""
        server = self._http_servers[1]
        return None if server is None else server.server_address[:2]

    def timer_entries(self) -> int:
        """Entries on the timer heap, superseded ones included (bounded: it compacts)."""
        with self._book.cond:
            return len(self._book.heap)

    def outbox_counts(self) -> dict[str, tuple[int, float]]:
        """The outbox per job: (items, oldest created_at); nothing while the
        state cannot be read (the state gauges say so)."""
        try:
            return self.state.outbox_counts() if self.state is not None else {}
        except StateError:
            return {}

    def job_configs(self) -> dict[str, JobConfig]:
        """Every job this daemon runs: job id -> its configuration."""
        with self._book.cond:
            return {i: j.cfg for i, j in self._book.jobs.items()}

    def has_job(self, job_id: str) -> bool:
        return job_id in self._book.jobs

    def route_for(self, kind: str) -> _Route | None:
        """How ``kind`` is served now (None: no poller serves it)."""
        return self._plugins.routes.get(kind)

    def budget(self, kind: str) -> float:
        """How long a tick of ``kind`` may take, as routed now (``_tick_budget``)."""
        return self._plugins.budget(kind)

    def in_process_kinds(self) -> list[str]:
        """The kinds ``register`` serves in this process."""
        return self._plugins.routes.in_process_kinds()

    def lanes(self) -> dict[str, tuple[int, int, int]]:
        """Every lane: key -> (running, waiting, waiting held by its rate limit)."""
        return self._workers.snapshot()

    def supervisors(self) -> dict[str, PluginSupervisor]:
        """The supervised (long-lived) plugins: plugin id -> its supervisor."""
        return dict(self._plugins.supervisors)

    def reload(self, new: DaemonConfig) -> dict[str, list[str]]:
        """Bring the running set in line with ``new``: ``_Reload.apply``."""
        return self._reload.apply(new)

    # -- the daemon's main thread ------------------------------------------------------------

    def run_forever(self, config_path: str | None = None) -> None:
        """Start, then serve until SIGINT/SIGTERM; SIGHUP re-reads ``config_path``;
        SIGUSR1 makes the daemon look at queued operator commands at once.

        Call it from the main thread.  Signals arrive through a wake-up pipe
        (``signal.set_wakeup_fd``): a handler that took a lock could deadlock
        against the very thread it interrupted.
        """
        stops = {signal.SIGINT, signal.SIGTERM}
        reloads = {getattr(signal, "SIGHUP", None)} - {None}
        pokes = {getattr(signal, "SIGUSR1", None)} - {None}
        with _Signals(stops | reloads | pokes) as signals:
            self.config_path = config_path
            try:
                self.start()
                while True:
                    received = signals.receive()
                    if received & stops:
                        break
                    if received & pokes:
                        self.poke()
                    if received & reloads and config_path is not None:
                        try:
                            with self.reload_lock:
                                self.reload(load_config(config_path,
                                                        extra_kinds=self.in_process_kinds()))
                        except (ConfigError, ManifestError, PollerRouteRegistrationError,
                                StateError) as exc:
                            log.error("reload rejected, keeping the running config: %s", exc)
            finally:
                self.stop()                 # a second Ctrl-C meanwhile does not cut it short


# -- the outbox: deliveries and channel alerts, committed with the cursor ----------

_WEBHOOK_TIMEOUT_SECS = 10.0     # a whole attempt: connect, TLS, request, the answer's head
_WEBHOOK_CUT_GRACE_SECS = 2.0    # attempts cut at shutdown: for their retries to be stored
_WEBHOOK_PARALLEL = 8            # jobs whose webhook deliveries may be under way at once


def outbound_topic(channel: str, agent: str, agents: Mapping[str, Mapping[str, str]]) -> str:
    """Where a channel's messages for an agent go: ``plugin.outbound.<channel>.<instance>``
    with the agent's instance from ``agents``, else ``plugin.outbound.<channel>``."""
    instance = agents.get(agent, {}).get(channel)
    return f"plugin.outbound.{channel}.{instance}" if instance else f"plugin.outbound.{channel}"


def _addressed(payload: Any, recipient: str) -> dict:
    """nexo's rule: an object payload gets ``to``; anything else becomes ``text``."""
    if isinstance(payload, dict):
        return {**payload, "to": recipient}
    return {"text": payload, "to": recipient}


def _outbox_item(job_id: str, what: str, topic: str, payload: Any, now: float) -> OutboxItem:
    event = nexo_event(topic, payload, now=now)
    return OutboxItem(event["id"], job_id, what, topic, json.dumps(event, ensure_ascii=False),
                      now, 0, now)


class _Undelivered(NexoPollerError):
    """A sink could not hand a message on; the publisher retries it."""


def _broker_sink(broker) -> Callable[[str, dict], None]:
    """Hand each Event to the broker client's ``deliver``: it returns once the
    Event was taken (what that means is the client's: a subscriber took it
    on the embedded broker, JetStream acked it on NATS) and raises otherwise."""

    def send(topic: str, event: dict) -> None:
        try:
            broker.deliver(topic, event)
        except PluginPollerForwardError as exc:
            raise _Undelivered(str(exc)) from None
    return send


def _webhook_sink(url: str) -> Callable[[str, dict], None]:
    """POST the Event JSON to ``url``; a 2xx answer means delivered.  The
    whole attempt (connect, TLS, request, the answer's head) must finish
    within ``_WEBHOOK_TIMEOUT_SECS``.  A redirect is not followed: it is a
    failed attempt naming its Location (a GET of it would drop the Event)."""
    import http.client
    from urllib.parse import unquote, urlsplit
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    auth = None
    if parts.username is not None:
        auth = "Basic " + base64.b64encode(
            f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    base = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection

    live: set = set()                               # connections of attempts in flight
    live_lock = threading.Lock()

    class Connection(base):
        deadline = 0.0

        def connect(self) -> None:
            self.timeout = max(0.001, self.deadline - time.monotonic())  # connect and TLS
            super().connect()
            self.sock = _DeadlineSocket(self.sock, self.deadline)

    def send(topic: str, event: dict) -> None:
        headers = {"Content-Type": "application/json", "X-Nexo-Topic": topic,
                   "X-Nexo-Event-Id": event["id"], "Connection": "close"}
        if auth is not None:
            headers["Authorization"] = auth
        try:
            conn = Connection(parts.hostname or "", parts.port)
        except ValueError as exc:                   # a port out of range
            raise _Undelivered(f"{url}: {exc}") from None
        conn.deadline = time.monotonic() + _WEBHOOK_TIMEOUT_SECS
        with live_lock:
            live.add(conn)
        try:
            conn.request("POST", path, json.dumps(event).encode(), headers)
            resp = conn.getresponse()
            status, location = resp.status, resp.getheader("Location")
        except (http.client.HTTPException, OSError, ValueError) as exc:
            what = f"no answer within {_WEBHOOK_TIMEOUT_SECS:g}s" \
                if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
            raise _Undelivered(f"{url}: {what}") from None
        finally:
            with live_lock:
                live.discard(conn)
            conn.close()
        if 300 <= status < 400:
            raise _Undelivered(f"{url}: HTTP {status} redirect to {_log_safe(location, 200)} "
                               "(redirects are not followed: fix delivery_sink)")
        if not 200 <= status < 300:
            raise _Undelivered(f"{url}: HTTP {status}")

    def cut() -> None:
        """End the attempts in flight now (the daemon stops): each fails at
        once, to be retried, instead of outliving the state store."""
        with live_lock:
            conns = list(live)
        for conn in conns:
            sock = getattr(conn.sock, "sock", None)     # a _DeadlineSocket's, once connected
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    send.parallel = _WEBHOOK_PARALLEL
    send.cut = cut
    return send


_OUTBOX_PASS_MAX = 500          # outbox items the publisher looks at in one pass


class _Publisher:
    """Drains the outbox through one sink: in order per job, retried with
    backoff, dead-lettered past ``delivery_max_attempts`` or
    ``delivery_max_age_secs``, removed only once delivered.

    A sink with ``parallel = N`` (the webhook's) is given up to N jobs at
    once, each job's items in order on a thread of their own, while this
    loop goes on finding other jobs' due items: one slow receiver holds only
    its own job.  Other sinks are called from this loop alone, one at a time."""

    def __init__(self, runner: "Runner", sink: Callable[[str, dict], Any]):
        self.runner, self.sink = runner, sink
        self.parallel = max(1, int(getattr(sink, "parallel", 1)))
        self._cond = threading.Condition(threading.Lock())
        self._due = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._busy: dict[str, threading.Thread] = {}    # job -> the thread delivering it
        self.delivered = self.retried = self.dead = 0

    def start(self) -> "_Publisher":
        self._thread = threading.Thread(target=self._loop, daemon=True, name="nexo-outbox")
        self._thread.start()
        return self

    def wake(self) -> None:
        with self._cond:
            self._due = True
            self._cond.notify()

    def stop(self, deadline: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            # not one marked busy but not started yet (the loop between the two)
            busy = [t for t in self._busy.values() if t.ident is not None]
        for t in busy:                  # each attempt is bounded: see _WEBHOOK_TIMEOUT_SECS
            t.join(max(0.0, deadline - time.monotonic()))
        cut = getattr(self.sink, "cut", None)
        if cut is not None and any(t.is_alive() for t in busy):
            cut()                       # past the deadline: settled now, not against a closed store
            grace = time.monotonic() + _WEBHOOK_CUT_GRACE_SECS
            for t in busy:
                t.join(max(0.0, grace - time.monotonic()))

    def _loop(self) -> None:
        wait = None
        while True:
            with self._cond:
                if not self._due and not self._stopping:
                    self._cond.wait(wait)
                if self._stopping:
                    return
                self._due = False
            try:
                nxt = self._pass(background=self.parallel > 1)
                wait = None if nxt is None else max(0.05, nxt - self.runner.clock())
            except StateError as exc:
                log.error("outbox: %s", exc)
                wait = 5.0
            except Exception:
                log.exception("outbox: unexpected error; carrying on")
                wait = 5.0

    def run_pass(self) -> float | None:
        """Try every due item once, in order per job; returns when to look again."""
        return self._pass(background=False)

    def _pass(self, background: bool) -> float | None:
        r = self.runner
        with self._cond:                # before the read: a thread settles, then leaves busy
            blocked = set(self._busy)       # their thread has them (and the items after)
        now = r.clock()
        items = r.state.outbox_pending(_OUTBOX_PASS_MAX, now)
        chains: dict[str, list[OutboxItem]] = {}
        soonest = None
        for item in items:
            if item.job in blocked:
                continue
            if item.next_attempt_at > now:
                blocked.add(item.job)           # a later item never overtakes it
                soonest = item.next_attempt_at if soonest is None else min(soonest, item.next_attempt_at)
                continue
            chains.setdefault(item.job, []).append(item)
        if background:
            for job, chain in chains.items():
                with self._cond:
                    if len(self._busy) >= self.parallel or self._stopping:
                        break                   # a thread that ends wakes this loop
                    t = threading.Thread(target=self._deliver_job, args=(chain, now),
                                         daemon=True, name="nexo-outbox-job")
                    self._busy[job] = t
                try:
                    t.start()
                except RuntimeError as exc:     # out of threads: not busy, try again soon
                    with self._cond:
                        self._busy.pop(job, None)
                    log.warning("outbox: no thread for job %s (%s); trying again", job, exc)
                    return now + 1.0
            return soonest
        delivered, retry, dead = [], [], []
        for chain in chains.values():
            d, again, gone = self._attempt(chain, now)
            delivered += d
            retry += again
            dead += gone
            for _, at, _ in again:
                soonest = at if soonest is None else min(soonest, at)
        self._settle(delivered, retry, dead, now)
        # A job given its whole share may have more behind it: look again at once.
        share = _outbox_share(_OUTBOX_PASS_MAX, len({i.job for i in items}))
        if (delivered or dead) and (len(items) >= _OUTBOX_PASS_MAX
                                    or any(len(c) >= share for c in chains.values())):
            return now
        return soonest

    def _deliver_job(self, chain: list[OutboxItem], now: float) -> None:
        """One job's due items, on their own thread (a ``parallel`` sink)."""
        try:
            self._settle(*self._attempt(chain, now, background=True), self.runner.clock())
        except StateError as exc:
            log.error("outbox: %s", exc)
        except Exception:
            log.exception("outbox: unexpected error; carrying on")
        finally:
            with self._cond:
                self._busy.pop(chain[0].job, None)
                self._due = True
                self._cond.notify()

    def _attempt(self, chain: list[OutboxItem], now: float,
                 background: bool = False) -> tuple[list, list, list]:
        """Send one job's due items in order until one fails: (delivered,
        retry as (id, at, error), dead as (item, error))."""
        r, cfg = self.runner, self.runner.config
        delivered, retry, dead = [], [], []
        for item in chain:
            if background and self._stopping:
                break                           # stopping: the rest waits for the next daemon
            try:
                self.sink(item.topic, json.loads(item.body))
                delivered.append(item)
                continue
            except Exception as exc:            # _Undelivered, a hook's own error, ...
                error = str(exc) if isinstance(exc, _Undelivered) else f"{type(exc).__name__}: {exc}"
            attempts = item.attempts + 1
            if attempts >= cfg.delivery_max_attempts or \
                    now - item.created_at >= cfg.delivery_max_age_secs:
                dead.append((item, error))      # out of the way: the next item may go
                continue
            delay = _backoff(cfg.delivery_retry_initial_secs, cfg.delivery_retry_max_secs,
                             attempts)
            # from when the attempt ended: a slow one must not make its retry due at once
            at = max(now, r.clock()) + delay * r.rng.uniform(1.0, 1.1)
            retry.append((item.id, at, error))
            log.warning("outbox: %s %s for job %s not delivered (attempt %d): %s",
                        item.what, item.id, item.job, attempts, error)
            break
        return delivered, retry, dead

    def _settle(self, delivered: list, retry: list, dead: list, now: float) -> None:
        r = self.runner
        r.state.outbox_settle(delivered, retry, dead, now)
        with self._cond:
            self.delivered += len(delivered)
            self.retried += len(retry)
            self.dead += len(dead)
        r.note_delivered([i for i in delivered if i.what == "delivery"])
        for item, error in dead:
            r.dead_letter(item, error)


class _Histograms:
    """Prometheus histograms under keys (a kind, a job), all in one array of
    doubles, a row per key: [bucket counts..., sum, count].  nexo's latency
    has one per job for the daemon's life; as lists they were 100,000 more
    objects for every full garbage collection to walk, as rows they are none."""

    def __init__(self, bounds: tuple):
        self.bounds, self._width = bounds, len(bounds) + 2
        self._rows: dict[Any, int] = {}     # key -> where its row starts
        self._data = array.array("d")

    def observe(self, key: Any, value: float) -> None:
        """Count ``value`` into ``key``'s histogram (the caller holds the lock)."""
        at = self._rows.get(key)
        if at is None:
            at = self._rows[key] = len(self._data)
            self._data.extend((0.0,) * self._width)
        data = self._data
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                data[at + i] += 1
        data[at + self._width - 2] += value
        data[at + self._width - 1] += 1

    def items(self) -> list[tuple[Any, array.array]]:
        """(key, [bucket counts..., sum, count]) by key (counts exact to 2**53)."""
        return [(key, self._data[at:at + self._width]) for key, at in sorted(self._rows.items())]


class _Metrics:
    """Counters for the Prometheus endpoint; updated after each commit.

    Beside this project's ``nexo_poller_*`` families it always serves nexo's
    own (``poller_*``, as nexo's crates/poller telemetry names them), so a
    dashboard built on nexo works unchanged; the names do not collide."""
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    NEXO_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000)
    # nexo's status label has four values; "skipped" is a slot not run (nexo:
    # lease busy, breaker open).  An unstored tick ran and will be retried.
    NEXO_STATUS = {TickStatus.OK: "ok", TickStatus.TRANSIENT: "transient",
                   TickStatus.PERMANENT: "permanent", TickStatus.CONFIG: "permanent",
                   TickStatus.LEASED: "skipped", TickStatus.CANCELLED: "skipped",
                   TickStatus.BUSY: "skipped", TickStatus.UNSTORED: "transient"}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ticks: dict[tuple[str, str, str], int] = {}
        self.duration = _Histograms(self.BUCKETS)     # by kind
        self.state_errors = 0
        self.last_success: dict[str, float] = {}  # job -> wall time of its last ok tick
        self.elsewhere: dict[tuple[str, str], int] = {}  # (job, kind) -> slots held elsewhere
        self.nexo_ticks: dict[tuple[str, str, str, str], int] = {}  # (kind, agent, job, status)
        self.nexo_latency = _Histograms(self.NEXO_BUCKETS_MS)   # (kind, agent, job), in ms

    def observe(self, o: TickOutcome, at: float | None = None, agent: str = "") -> None:
        with self._lock:
            if o.status is TickStatus.OK and at is not None:
                self.last_success[o.job_id] = max(at, self.last_success.get(o.job_id, at))
            key = (o.job_id, o.kind, o.status.value)
            self.ticks[key] = self.ticks.get(key, 0) + 1
            self.duration.observe(o.kind, o.duration)
            status = self.NEXO_STATUS[o.status]
            self._nexo_tick(o.kind, agent, o.job_id, status)
            if status != "skipped":         # nexo times only the ticks it ran
                self.nexo_latency.observe((o.kind, agent, o.job_id), o.duration * 1000)

    def _nexo_tick(self, kind: str, agent: str, job: str, status: str) -> None:
        key = (kind, agent, job, status)
        self.nexo_ticks[key] = self.nexo_ticks.get(key, 0) + 1

    def state_error(self) -> None:
        with self._lock:
            self.state_errors += 1

    def held_elsewhere(self, job: str, kind: str, agent: str = "") -> None:
        with self._lock:
            self.elsewhere[(job, kind)] = self.elsewhere.get((job, kind), 0) + 1
            self._nexo_tick(kind, agent, job, "skipped")    # nexo: lease busy, skipped

    def render(self, runner: "Runner") -> str:
        out = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}")

        def lbl(**labels) -> str:
            return "{" + ",".join(f'{k}="{_prom_escape(v)}"' for k, v in labels.items()) + "}"

        with self._lock:
            family("nexo_poller_ticks_total", "counter", "Ticks by job, kind and outcome.")
            for (job, kind, status), n in sorted(self.ticks.items()):
                out.append(f"nexo_poller_ticks_total{lbl(job=job, kind=kind, outcome=status)} {n}")
            family("nexo_poller_tick_duration_seconds", "histogram", "Tick duration.")
            for kind, h in self.duration.items():
                for bound, n in zip(self.BUCKETS, h):
                    out.append(f"nexo_poller_tick_duration_seconds_bucket"
                               f"{lbl(kind=kind, le=bound)} {n:.0f}")
                out.append(f"nexo_poller_tick_duration_seconds_bucket"
                           f"{lbl(kind=kind, le='+Inf')} {h[-1]:.0f}")
                out.append(f"nexo_poller_tick_duration_seconds_sum{lbl(kind=kind)} {h[-2]:.6f}")
                out.append(f"nexo_poller_tick_duration_seconds_count{lbl(kind=kind)} {h[-1]:.0f}")
            family("nexo_poller_slots_held_elsewhere_total", "counter",
                   "Slots not ticked here because another daemon holds the job's lease.")
            for (job, kind), n in sorted(self.elsewhere.items()):
                out.append(f"nexo_poller_slots_held_elsewhere_total{lbl(job=job, kind=kind)} {n}")
        jobs = runner.status()
        for name, key, help_text in (
                ("nexo_poller_consecutive_errors", "consecutive_errors", "Consecutive errors."),
                ("nexo_poller_breaker_open", "breaker_open", "1 when the job's breaker is open."),
                ("nexo_poller_paused", "paused", "1 when the job is paused."),
                ("nexo_poller_items_seen_total", "items_seen_total", "Items seen."),
                ("nexo_poller_items_dispatched_total", "items_dispatched_total",
                 "Items dispatched: deliveries once delivered, plus what plugins that "
                 "dispatch by themselves report (the tick log line's figure is the "
                 "plugin's, before delivery).")):
            family(name, "counter" if name.endswith("_total") else "gauge", help_text)
            for j in jobs:
                out.append(f"{name}{lbl(job=j['id'], kind=j['kind'])} {int(j[key])}")
        self._render_nexo(out, family, lbl, jobs)
        family("nexo_poller_last_success_timestamp_seconds", "gauge",
               "Time of the job's last successful tick (absent until one succeeded).")
        for j in jobs:
            when = self.last_success.get(j["id"])
            if j["last_status"] == "ok" and j["last_run_at"]:
                stored = datetime.fromisoformat(j["last_run_at"]).timestamp()
                when = stored if when is None else max(when, stored)
            if when is not None:
                out.append(f"nexo_poller_last_success_timestamp_seconds"
                           f"{lbl(job=j['id'], kind=j['kind'])} {when:.3f}")
        pub = runner.publisher
        family("nexo_poller_deliveries_total", "counter",
               "Outbox messages by outcome: delivered, retried, dead (dead-lettered).")
        for outcome in ("delivered", "retried", "dead"):
            out.append(f"nexo_poller_deliveries_total{lbl(outcome=outcome)} "
                       f"{getattr(pub, outcome) if pub else 0}")
        pending = runner.outbox_counts()
        family("nexo_poller_outbox_depth", "gauge", "Messages waiting in the outbox.")
        out.append(f"nexo_poller_outbox_depth {sum(n for n, _ in pending.values())}")
        family("nexo_poller_outbox_oldest_age_seconds", "gauge",
               "Age of the oldest undelivered message (0 when none).")
        oldest = min((at for _, at in pending.values()), default=None)
        out.append("nexo_poller_outbox_oldest_age_seconds "
                   f"{0 if oldest is None else max(0.0, runner.clock() - oldest):.3f}")
        family("nexo_poller_state_errors_total", "counter",
               "Times the scheduler could not read or write the state.")
        out.append(f"nexo_poller_state_errors_total {self.state_errors}")
        family("nexo_poller_state_ok", "gauge", "1 while the state can be used, 0 when not.")
        out.append(f"nexo_poller_state_ok {int(runner.state_error is None)}")
        family("nexo_poller_plugin_restarts_total", "counter", "Long-lived plugin restarts.")
        for pid, sup in sorted(runner.supervisors().items()):
            out.append(f"nexo_poller_plugin_restarts_total{lbl(plugin=pid)} {sup.restarts}")
        # Saturation at a glance: due ticks that wait for a slot of their plugin
        # (or in-process kind).  Staying above zero means demand exceeds what it
        # can take: every job still ticks, each later than its slot.
        family("nexo_poller_ticks_waiting", "gauge",
               "Due ticks waiting for a free slot in their plugin's lane.")
        lanes = sorted(runner.lanes().items())
        for key, (_, n, _) in lanes:
            out.append(f"nexo_poller_ticks_waiting{lbl(lane=key)} {n}")
        family("nexo_poller_ticks_rate_limited", "gauge",
               "Of the waiting ticks, those the lane's max_ticks_per_minute holds back.")
        for key, (_, _, n) in lanes:
            out.append(f"nexo_poller_ticks_rate_limited{lbl(lane=key)} {n}")
        return "\n".join(out) + "\n"

    def _render_nexo(self, out: list, family: Callable, lbl: Callable, jobs: list) -> None:
        """nexo's families, its labels in its order (poller_lease_takeovers_total,
        which nexo never increments, is left out)."""
        with self._lock:
            family("poller_ticks_total", "counter", "Total poller ticks by kind/agent/job/status.")
            for (kind, agent, job, status), n in sorted(self.nexo_ticks.items()):
                labels = lbl(agent=agent, job_id=job, kind=kind, status=status)
                out.append(f"poller_ticks_total{labels} {n}")
            family("poller_latency_ms", "histogram", "Tick wall-clock duration histogram.")
            for (kind, agent, job), h in self.nexo_latency.items():
                for bound, n in zip((*self.NEXO_BUCKETS_MS, "+Inf"), (*h[:-2], h[-1])):
                    out.append(f"poller_latency_ms_bucket"
                               f"{lbl(agent=agent, job_id=job, kind=kind, le=bound)} {n:.0f}")
                labels = lbl(agent=agent, job_id=job, kind=kind)
                out.append(f"poller_latency_ms_sum{labels} {h[-2]:.3f}")
                out.append(f"poller_latency_ms_count{labels} {h[-1]:.0f}")
        for name, key, help_text in (
                ("poller_items_seen_total", "items_seen_total",
                 "Items the source returned (whether dispatched or not)."),
                ("poller_items_dispatched_total", "items_dispatched_total",
                 "Items published downstream.")):
            family(name, "counter", help_text)
            for j in jobs:
                out.append(f"{name}{lbl(agent=j['agent'], job_id=j['id'], kind=j['kind'])} "
                           f"{int(j[key])}")
        family("poller_consecutive_errors", "gauge", "Consecutive failures since last success.")
        for j in jobs:
            out.append(f"poller_consecutive_errors{lbl(job_id=j['id'])} {j['consecutive_errors']}")
        family("poller_breaker_state", "gauge", "0=closed,1=half-open,2=open per job.")
        for j in jobs:       # no half-open here: an open breaker's next tick is its trial
            state = 2 if j["breaker_open"] else 0
            out.append(f"poller_breaker_state{lbl(job_id=j['id'])} {state}")


def _prom_escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# ============================================================================
# HTTP
# The daemon's one small HTTP server: ``/metrics`` for Prometheus, the admin
# API (nexo's routes and JSON shapes), ``/healthz`` and ``/readyz``, and a
# status page at ``/``.  Bounded like every listener here: connections at
# once, time per read and per request, bytes per request.  What it serves is
# one table, ``_HTTP_ROUTES``: paths, methods, whether the token is needed,
# and a small handler each; ``_serve_http`` only reads, guards and dispatches.
# Shares: _admin_token, _ADMIN_TOKEN_ENV, _ADMIN_URL_ENV, _cursor_text,
#   _daemons_line, _job_status, _relative, _runs_limit
# ============================================================================

_METRICS_READ_TIMEOUT_SECS = 10.0     # a request (line, headers, body) arrives within it, in all
_METRICS_MAX_CONNECTIONS = 16         # whole requests handled at once (a thread each)
_METRICS_MAX_REQUEST_BYTES = 8192     # request line and headers together
_HTTP_REQUEST_DEADLINE_SECS = 30.0    # the client takes each write of its answer within it
_HTTP_MAX_ARRIVING = 256              # requests still arriving (no thread); past it the oldest goes
_HTTP_WORKER_IDLE_SECS = 5.0          # a handler thread with nothing to do ends
_HTTP_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HTTP_CONTENT_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*([0-9]{1,9})[ \t]*\r?$")
_HTTP_TRANSFER_ENCODING = re.compile(rb"(?im)^transfer-encoding[ \t]*:")
_ADMIN_MAX_BODY_BYTES = 4096          # a POST body: the actions take none
_ADMIN_TOKEN_ENV = "NEXO_POLLER_ADMIN_TOKEN"
_ADMIN_URL_ENV = "NEXO_POLLER_ADMIN_URL"
_ADMIN_ACTIONS = ("run", "pause", "resume", "reset")


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _foreign_host(host: str | None, own: Iterable[str], allowed: Iterable[str],
                  port: int) -> str | None:
    """Why a request's ``Host`` names another site, or None.  A loopback
    listener serves reads without a token, so a page whose name was made to
    resolve to 127.0.0.1 (DNS rebinding) must not be answered: only this
    listener's own names (with its port or none) and ``admin_allowed_hosts``
    (any port) are.  A request without Host is served: no browser sends one."""
    if host is None:
        return None
    m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?", host.strip().lower())
    if m is not None:
        name = _host_name(m[1])
        if name in allowed or (name in own and (m[2] is None or int(m[2]) == port)):
            return None
    return (f"Host {host[:100]!r} is not a name of this listener (a proxy's name goes in "
            "admin_allowed_hosts)")


def _request_arrived(buf: bytes | bytearray, limit: int) -> bool:
    """Whether a request read so far is whole: its head and the body its
    Content-Length announces, or so much that the handler refuses it anyway
    (over ``limit`` bytes with no end of head, a body over
    ``_ADMIN_MAX_BODY_BYTES`` or a chunked one)."""
    end = _HTTP_HEAD_END.search(buf)
    if end is None:
        return len(buf) > limit
    head = buf[:end.start()]
    length = _HTTP_CONTENT_LENGTH.search(head)
    if length is None or _HTTP_TRANSFER_ENCODING.search(head) is not None:
        return True
    n = int(length[1])
    return n > _ADMIN_MAX_BODY_BYTES or len(buf) - end.end() >= n


class _SocketWriter(io.BufferedIOBase):
    """A handler's ``wfile``: each write is sent whole, within the socket's timeout."""

    def __init__(self, sock) -> None:
        super().__init__()
        self.sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sock.sendall(data)
        return len(data)


def _admin_token(path: str | None) -> str | None:
    """The admin token, read by the daemon and the CLI alike: the file
    ``path`` (one token of 1..4096 characters), else the environment
    (blank means none); never the config file itself.  A file that cannot
    serve raises ``InputError`` naming it."""
    if not path:
        return os.environ.get(_ADMIN_TOKEN_ENV, "").strip() or None
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read(4097).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if not token or len(token) > 4096:
        raise InputError(f"{path} must hold one token of 1..4096 characters")
    return token


def _read_admin_token(config: DaemonConfig) -> str | None:
    """The daemon's admin token (``_admin_token``); a bad file is a ``ConfigError``."""
    try:
        return _admin_token(config.admin_token_file)
    except InputError as exc:
        raise ConfigError(config.source, [("admin_token_file", str(exc))]) from None


def _ms(iso: str | None) -> int | None:
    return None if iso is None else int(datetime.fromisoformat(iso).timestamp() * 1000)


def _schedule_text(s: Schedule) -> str:
    if s.every_secs is not None:
        return f"every {s.every_secs:g}s"
    if s.cron is not None:
        tz = getattr(s.tz, "key", None) or "UTC"
        return f"cron {getattr(s.cron, 'text', '')} {tz}".replace("  ", " ")
    return f"at {s.at.isoformat()}" if s.at is not None else "-"


def _plugin_states(runner: "Runner") -> list[dict]:
    """Every plugin with what its supervisor knows: up, restarting, down, or
    failed (a crash loop gave it up: ``failed`` says why)."""
    out = []
    sups = runner.supervisors()
    for h in sorted(runner.router.handles(), key=lambda h: h.plugin_id):
        sup = sups.get(h.plugin_id)
        doc = {"id": h.plugin_id, "kinds": list(h.kinds), "lifecycle": h.lifecycle.value,
               "state": "ephemeral", "pid": None, "restarts": 0, "last_exit": None,
               "restart_in_secs": None, "last_output": [],
               "max_ticks_per_minute": h.max_ticks_per_minute, "failed": None}
        if sup is not None:
            down, at, tail = h.health.snapshot()
            proc = sup.proc
            alive = proc is not None and proc.poll() is None and down is None
            failed = sup.failed                 # a crash loop gave it up: why
            doc.update(state="failed" if failed else "up" if alive else
                       "restarting" if at is not None else "down", failed=failed,
                       pid=proc.pid if alive else None, restarts=sup.restarts,
                       last_exit=down or sup.last_exit,
                       restart_in_secs=None if at is None or alive else
                       round(max(0.0, at - time.monotonic()), 1),
                       last_output=tail or list(sup.last_output))
        out.append(doc)
    return out


def _admin_jobs(runner: "Runner") -> list[dict]:
    """GET /admin/pollers: nexo's fields, then what this project adds."""
    undelivered = {job: n for job, (n, _) in runner.outbox_counts().items()}
    plugins = {p["id"]: p for p in _plugin_states(runner)}
    schedules = {i: _schedule_text(c.schedule) for i, c in runner.job_configs().items()}
    out = []
    for s in runner.status(runner.holders()):
        route = runner.route_for(s["kind"])
        plugin = route.plugin_id if route is not None else None
        doc = {"id": s["id"], "kind": s["kind"], "agent": s["agent"], "paused": s["paused"],
               "last_run_at_ms": _ms(s["last_run_at"]), "next_run_at_ms": _ms(s["next_run_at"]),
               "last_status": s["last_status"], "last_error": s["last_error"],
               "consecutive_errors": s["consecutive_errors"],
               "items_seen_total": s["items_seen_total"],
               "items_dispatched_total": s["items_dispatched_total"]}
        doc.update(cursor=s["cursor"], cursor_text=_cursor_text(s["cursor"]),
                   breaker_open=s["breaker_open"], running=s["running"],
                   holder=s["holder"], last_run_at=s["last_run_at"], next_run_at=s["next_run_at"],
                   schedule=schedules.get(s["id"]), undelivered=undelivered.get(s["id"], 0),
                   pause=s["pause"], plugin=plugin,
                   plugin_state=plugins[plugin]["state"] if plugin in plugins else None,
                   plugin_output=plugins[plugin]["last_output"] if plugin in plugins else [])
        out.append(doc)
    return out


def _cursor_text(b64: str | None) -> str | None:
    """A status cursor (base64) as text where it is printable, else None."""
    return None if b64 is None else _cursor_view(decode_cursor(b64))["text"]


def _admin_daemons(runner: "Runner", jobs: list[dict]) -> dict:
    """GET /admin/daemons: the live daemons on this state, each with the jobs
    it holds (of ``jobs``, ``_admin_jobs``) and the ones it is ticking; this
    daemon is ``self``.  Empty while the state cannot be read."""
    try:
        live = runner.state.daemons() if runner.state is not None else {}
    except StateError:
        live = {}
    me = runner.state.owner if runner.state is not None else None
    if runner.started and me is not None:
        live.setdefault(me, [])
    return {"self": me, "daemons": [
        {"owner": o, "self": o == me, "holds": [j["id"] for j in jobs if j["holder"] == o],
         "running": sorted(live[o])} for o in sorted(live)]}


def _daemons_line(doc: dict) -> str:
    """``status``'s first line: the live daemons (``_admin_daemons``' shape)
    and how many jobs each holds."""
    return "daemon: " + (", ".join(f"{d['owner']} (holds {len(d['holds'])})"
                                   + (" (this one)" if d.get("self") else "")
                                   for d in doc["daemons"]) or "none running")


def _health(runner: "Runner") -> tuple[bool, dict]:
    """/healthz: the process serves, the scheduler loop lives, the state works."""
    checks = {"process": "ok"}
    if runner.stopping:
        checks["scheduler"] = "stopping"
    elif not runner.started:
        checks["scheduler"] = "not started"
    elif not runner.scheduler_alive:
        checks["scheduler"] = "the scheduler loop is not running"
    else:
        checks["scheduler"] = "ok"
    checks["state"] = "ok" if runner.state_error is None else f"unusable: {runner.state_error}"
    return all(v == "ok" for v in checks.values()), checks


def _readiness(runner: "Runner") -> tuple[bool, dict]:
    """/readyz: healthy, every long-lived plugin up, the broker connected."""
    ok, checks = _health(runner)
    down = [p["id"] for p in _plugin_states(runner) if p["state"] not in ("up", "ephemeral")]
    checks["plugins"] = "ok" if not down else "not running: " + ", ".join(down)
    broker = runner.broker
    connected = getattr(broker, "connected", None)
    if broker is None:
        checks["broker"] = "not started"
    elif getattr(broker, "closed", None) is not None and broker.closed.is_set():
        checks["broker"] = "closed"
    elif isinstance(connected, threading.Event) and not connected.is_set():
        checks["broker"] = "disconnected"
    else:
        checks["broker"] = "ok"
    return all(v == "ok" for v in checks.values()), checks


class _Admin:
    """What the admin routes need besides the runner: the token, whether the
    listener is loopback, and how to reload (a callable; None: no config file)."""

    def __init__(self, runner: "Runner", token: str | None, loopback: bool,
                 reload: Callable[[], dict] | None = None):
        self.runner, self.token, self.loopback, self.reload = runner, token, loopback, reload

    def authorized(self, header: str | None) -> bool:
        import hmac
        if self.token is None or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    def action(self, job_id: str, verb: str, body: bytes | None = None,
               caller: str | None = None) -> tuple[int, dict]:
        """POST an action; ``pause`` takes ``{"note": WHY, "by": WHO}`` (both
        optional) from ``caller`` (its address)."""
        r = self.runner
        try:
            if verb == "run":
                o = r.run_once(job_id)
                if o.status is TickStatus.OK:
                    m = o.ack.metrics if o.ack and o.ack.metrics else TickMetrics()
                    return 200, {"ok": True, "items_seen": m.items_seen,
                                 "items_dispatched": m.items_dispatched,
                                 "deliveries": len(o.ack.deliver) if o.ack else 0,
                                 "outcome": o.to_dict()}
                code = 409 if o.status in (TickStatus.BUSY, TickStatus.LEASED) else 400
                return code, {"ok": False, "error": o.error or o.status.value,
                              "outcome": o.to_dict()}
            if verb == "pause":
                r.pause(job_id, *self._pause_note(body, caller))
            else:
                getattr(r, verb)(job_id)
        except StateError as exc:
            return 503, {"ok": False, "error": f"state: {exc}"}
        except InputError as exc:               # a pause note too long, or not a note
            return 400, {"ok": False, "error": str(exc)}
        log.info("operator (admin API): %s %s", verb, job_id)
        if verb == "reset":
            return 200, {"ok": True, "reset": True}
        return 200, {"ok": True, "paused": verb == "pause"}

    @staticmethod
    def _pause_note(body: bytes | None, caller: str | None) -> tuple[str | None, str]:
        """A pause's note and who paused: the API knows only the caller's
        address (one token, no identities), so a ``by`` the caller gives is
        kept beside it: ``alice@ops (admin API from 10.0.0.5)``."""
        try:
            doc = _loads(body) if body else {}
        except (ValueError, RecursionError) as exc:
            raise InputError(f"the body is not JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) - {"note", "by"} or not all(
                isinstance(v, str) for v in doc.values()):
            raise InputError('send {"note": "<why>", "by": "<who>"} (strings, both '
                             'optional), or no body')
        by = f"admin API from {caller}"
        return doc.get("note"), f"{doc['by']} ({by})" if "by" in doc else by

    def cursor(self, job_id: str, body: bytes | None) -> tuple[int, dict]:
        """GET: the cursor and its history; POST ``{"set": B64}``,
        ``{"set_text": TEXT}`` or ``{"set": null}``: set it through the owner."""
        r = self.runner
        if body is not None:
            try:
                doc = _loads(body or b"{}")
                if not isinstance(doc, dict) or len(doc) != 1 or \
                        next(iter(doc)) not in ("set", "set_text"):
                    raise InputError('send one of {"set": "<base64>"|null} or '
                                     '{"set_text": "<text>"}')
                value = doc.get("set", doc.get("set_text"))
                if "set_text" in doc:
                    if not isinstance(value, str):
                        raise InputError("set_text must be a string")
                    cursor = value.encode("utf-8")
                else:
                    if value is not None and not isinstance(value, str):
                        raise InputError("set must be a base64 string or null")
                    cursor = None if value is None else decode_cursor(value)
            except (ValueError, RecursionError, PluginPollerForwardError) as exc:
                return 400, {"ok": False, "error": str(exc)}
            try:
                r.set_cursor(job_id, cursor, "set (admin API)")
            except StateError as exc:
                return 503, {"ok": False, "error": f"state: {exc}"}
            log.info("operator (admin API): cursor %s", job_id)
        state, kept = None, r.state.supports("cursor_history")
        try:
            state = r.state.load([job_id]).get(job_id)
            history = r.state.cursor_history(job_id) if kept else []
        except StateError as exc:
            history = []
            if body is None and state is None:
                return 503, {"ok": False, "error": f"state: {exc}"}
        view = _cursor_view(None if state is None else state.cursor)
        return 200, {"ok": True, "job": job_id, **view, "history_kept": kept,
                     "history": [dict(_cursor_view(h.cursor), at=_iso(h.at), source=h.source)
                                 for h in history]}

    def runs(self, job_id: str, query: str) -> tuple[int, dict]:
        """``GET /admin/pollers/<id>/runs[?limit=N]``: the job's run history,
        newest first, and how many runs it keeps."""
        from urllib.parse import parse_qs
        r = self.runner
        text = (parse_qs(query).get("limit") or [None])[0]
        try:
            limit = _runs_limit(text)
            runs = r.state.run_history(job_id, limit)
        except InputError as exc:
            return 400, {"ok": False, "error": str(exc)}
        except StateError as exc:
            return 503, {"ok": False, "error": f"state: {exc}"}
        cfg = next((j for j in r.config.jobs if j.id == job_id), None)
        keep = RUN_HISTORY_KEEP if cfg is None else JobPolicy.of(r.config, cfg).run_history
        return 200, {"ok": True, "job": job_id, "keep": keep,
                     "runs": [run.to_dict() for run in runs]}

    def do_reload(self) -> tuple[int, dict]:
        if self.reload is None:
            return 400, {"ok": False, "error": "this daemon was not started from a config file"}
        with self.runner.reload_lock:
            try:
                diff = self.reload()
            except (ConfigError, ManifestError, PollerRouteRegistrationError,
                    StateError) as exc:
                log.error("reload (admin API) rejected, keeping the running config: %s", exc)
                return 400, {"ok": False, "error": str(exc)}
        return 200, {"ok": True, "add": diff["added"], "replace": diff["replaced"],
                     "remove": diff["removed"], "keep": diff["kept"],
                     "restarted": diff.get("restarted", [])}


def _runs_limit(text: str | int | None) -> int | None:
    """How many runs ``history --limit`` and ``?limit=`` ask for (None: all
    kept); InputError for anything but a whole number of 1 or more."""
    try:
        limit = None if text is None else int(text)
    except ValueError:
        limit = 0
    if limit is not None and limit < 1:
        raise InputError(f"limit {text!r}: give a number of runs, 1 or more")
    return limit


_PAGE_RUNS = 20                 # runs the status page shows per job


def _runs_bar(runs: list[RunRecord]) -> str:
    """A job's recent runs on the status page: a bar of outcomes, oldest
    left, whose details (a list, newest first) open on a click."""
    from html import escape
    if not runs:
        return ""
    e = lambda v: escape("-" if v is None else str(v), quote=True)  # noqa: E731
    cls = lambda run: "st-ok" if run.outcome == "ok" else (  # noqa: E731
        "st-failing" if run.outcome in ("transient", "permanent", "config") else "st-other")
    cursor = lambda c: "-" if c is None else c.get("text", f"{c['bytes']} bytes")  # noqa: E731
    marks = "".join(f'<i class="run {cls(run)}" title="{e(_iso(run.started_at))}: '
                    f'{e(run.outcome)}"></i>' for run in reversed(runs))
    # A list, not a table: the page's rows hold no nested rows.
    items = "".join(
        f'<li class="{cls(run)}"><time datetime="{e(_iso(run.started_at))}">'
        f'{e(_iso(run.started_at))}</time> {e(run.trigger)}: <b>{e(run.outcome)}</b> in '
        f'{e(round(run.duration * 1000, 1))} ms, seen {e(run.items_seen)}, sent '
        f'{e(run.items_dispatched)}, cursor <code>{e(cursor(run.cursor_before))}</code> → '
        f'<code>{e(cursor(run.cursor_after))}</code>'
        + (f'<br>{e(run.error)}' if run.error else "")
        + (f'<pre>{e(run.stderr)}</pre>' if run.stderr else "") + '</li>' for run in runs)
    return (f'<details class="runs"><summary><span class="vh">last {e(len(runs))} runs'
            f'</span>{marks}</summary><ol class="runlist">{items}</ol></details>')


def _relative(when: str | float | None, now: float, *, spaced: bool = False,
              never: str = "-") -> str:
    """A time (ISO text or epoch seconds) as an operator reads it: "in 4s",
    "3m ago", "now" within a second, ``never`` for none.  ``spaced`` spells
    the units as the status page does ("in 4 s", "3 min ago")."""
    if when is None or when == "":
        return never
    if isinstance(when, str):
        when = datetime.fromisoformat(when).timestamp()
    delta = when - now
    secs = abs(delta)
    if secs < 1:
        return "now"
    units = ("d", "h", "min", "s") if spaced else ("d", "h", "m", "s")
    for unit, size in zip(units, (86400, 3600, 60, 1)):
        if secs >= size or size == 1:
            text = f"{int(secs // size)}{' ' if spaced else ''}{unit}"
            return f"in {text}" if delta > 0 else f"{text} ago"
    return never


_PAGE_STATUSES = ("all", "failing", "ok", "paused", "breaker", "running", "never run")


def _job_status(j: dict) -> str:
    """A job's status label (a status dict's): running, paused, breaker, then
    never run, ok or failing.  The status page filters by it; the CLI's
    table shows the first three and says "active" for the others."""
    if j["running"]:
        return "running"
    if j["paused"]:
        return "paused"
    if j["breaker_open"]:
        return "breaker"
    if j["last_status"] is None:
        return "never run"
    return "ok" if j["last_status"] == "ok" else "failing"


def _render_page(runner: "Runner", authorized: bool, query: str, nonce: str) -> str:
    """The status page: every value escaped; no external asset."""
    from html import escape
    from urllib.parse import parse_qs
    e = lambda v: escape("-" if v is None else str(v), quote=True)  # noqa: E731
    wanted = (parse_qs(query).get("status") or ["all"])[0]
    wanted = wanted if wanted in _PAGE_STATUSES else "all"
    now = runner.clock()
    healthy, checks = _health(runner)
    jobs = _admin_jobs(runner) if authorized else []
    plugins = _plugin_states(runner) if authorized else []
    daemons = _admin_daemons(runner, jobs)["daemons"] if authorized else []
    shown = [j for j in jobs if wanted in ("all", _job_status(j))]
    try:
        runs = runner.state.run_histories([j["id"] for j in shown], _PAGE_RUNS)
    except StateError:
        runs = {}
    rows = []
    for j in shown:
        status = _job_status(j)
        mark = {"ok": "✓ ok", "failing": "✗ failing", "paused": "‖ paused",
                "breaker": "! breaker open", "running": "» running"}.get(status, "– never run")
        err = "-"
        if j["last_error"]:
            detail = j["last_error"] + ("\n\nplugin output:\n" + "\n".join(j["plugin_output"])
                                        if j["plugin_output"] else "")
            err = (f"<details><summary>{e(j['last_error'][:80])}</summary>"
                   f"<pre>{e(detail)}</pre></details>")
        toggle = "resume" if j["paused"] else "pause"
        p = j["pause"]
        pause = "" if not p else (
            f'<br><small class="pause">paused by {e(p["by"] or "(unknown)")}, '
            f'<time datetime="{e(p["at"])}">{e(_relative(p["at"], now, spaced=True))}</time>'
            + (f': {e(p["note"])}' if p["note"] else "") + "</small>")
        cursor = (f'<code title="base64 {e(j["cursor"])}">{e(j["cursor_text"])}</code>'
                  if j["cursor_text"] is not None else f'<code>{e(j["cursor"])}</code>'
                  + ("" if j["cursor"] is None else "<small> base64</small>"))
        rows.append(
            f'<tr data-job="{e(j["id"])}" data-status="{e(status)}">'
            f'<th scope="row">{e(j["id"])}</th><td>{e(j["kind"])}</td><td>{e(j["plugin"])}</td>'
            f'<td>{e(j["schedule"])}</td>'
            f'<td><time datetime="{e(j["last_run_at"])}">{e(_relative(j["last_run_at"], now, spaced=True, never="never"))}'
            f'</time>{_runs_bar(runs.get(j["id"], []))}</td><td class="st-{e(status.replace(" ", "-"))}">{e(mark)}'
            f'<br><small>last: {e(j["last_status"])}, errors in a row: '
            f'{e(j["consecutive_errors"])}</small>{pause}</td><td class="err">{err}</td>'
            f'<td><time datetime="{e(j["next_run_at"])}">'
            f'{e("paused" if j["paused"] else _relative(j["next_run_at"], now, spaced=True, never="never"))}</time></td>'
            f'<td>{cursor}</td><td>{e(j["undelivered"])}</td>'
            f'<td class="holder">{e(j["holder"])}</td>'
            f'<td><button type="button" data-action="{toggle}" data-job="{e(j["id"])}">'
            f'{toggle.capitalize()}<span class="vh"> {e(j["id"])}</span></button> '
            f'<button type="button" data-action="run" data-job="{e(j["id"])}">Run now'
            f'<span class="vh"> {e(j["id"])}</span></button></td></tr>')
    prow = []
    for p in plugins:
        out = ("<details><summary>" + e(len(p["last_output"])) + " lines</summary><pre>"
               + e("\n".join(p["last_output"])) + "</pre></details>") if p["last_output"] else "-"
        prow.append(f'<tr><th scope="row">{e(p["id"])}</th><td>{e(", ".join(p["kinds"]))}</td>'
                    f'<td>{e(p["lifecycle"])}</td><td>{e(p["state"])}</td><td>{e(p["pid"])}</td>'
                    f'<td>{e(p["restarts"])}</td><td>{e(p["last_exit"])}</td><td>{out}</td></tr>')
    drow = [f'<tr><th scope="row">{e(d["owner"])}{" (this one)" if d["self"] else ""}</th>'
            f'<td>{e(len(d["holds"]))}</td><td>{e(", ".join(d["running"]) or "-")}</td></tr>'
            for d in daemons]
    options = "".join(f'<option value="{e(s)}"{" selected" if s == wanted else ""}>{e(s)}'
                      f'</option>' for s in _PAGE_STATUSES)
    health = ("healthy" if healthy else "unhealthy: " + "; ".join(
        f"{k} {v}" for k, v in checks.items() if v != "ok"))
    locked = "" if authorized else (
        '<p id="locked" role="alert">This daemon listens beyond loopback: enter the admin '
        'token above to see its jobs.</p>')
    empty = ('<tr><td colspan="12">no job matches</td></tr>' if not rows else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nexo-poller status</title>
<style nonce="{nonce}">
body{{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#111;background:#fff}}
table{{border-collapse:collapse;width:100%;margin-bottom:1.5em}}
th,td{{border:1px solid #bbb;padding:.3em .5em;text-align:left;vertical-align:top}}
thead th{{background:#eee}} pre{{white-space:pre-wrap;max-width:40em;margin:.3em 0}}
.st-ok{{color:#064}} .st-failing,.st-breaker{{color:#a00;font-weight:bold}}
.st-paused{{color:#555}} .vh{{position:absolute;left:-9999px}}
button{{font:inherit;padding:.2em .6em;margin:.1em}} button:focus,select:focus,input:focus{{outline:3px solid #36c}}
#msg{{min-height:1.4em;font-weight:bold}} code{{word-break:break-all}}
i.run{{display:inline-block;width:.45em;height:1em;margin-right:1px;background:#888}}
i.st-ok{{background:#1a7f37}} i.st-failing{{background:#c00}}
.runlist{{margin:.3em 0;padding-left:1.2em;font-size:90%}}
</style></head><body>
<header><h1>nexo-poller</h1>
<p>Version {e(__version__)} · <span id="health">{e(health)}</span> ·
page rendered <time id="rendered" datetime="{e(_iso(now))}">{e(_iso(now))}</time></p>
<form id="auth" autocomplete="off"><label for="token">Admin token (kept in this tab only)</label>
<input id="token" type="password" size="30"> <button type="submit">Use token</button></form>
<form method="get" action="/"><label for="status">Show jobs</label>
<select id="status" name="status">{options}</select> <button type="submit">Filter</button></form>
<p id="msg" role="status" aria-live="polite"></p></header>
<main id="live">{locked}
<h2>Jobs</h2>
<table id="jobs"><caption>{e(len(rows))} of {e(len(jobs))} jobs (filter: {e(wanted)})</caption>
<thead><tr><th scope="col">Job</th><th scope="col">Kind</th><th scope="col">Plugin</th>
<th scope="col">Schedule</th><th scope="col">Last run</th><th scope="col">Outcome</th>
<th scope="col">Last error</th><th scope="col">Next run</th><th scope="col">Cursor</th>
<th scope="col">Undelivered</th><th scope="col">Held by</th><th scope="col">Actions</th>
</tr></thead>
<tbody>{"".join(rows)}{empty}</tbody></table>
<h2>Daemons</h2>
<table id="daemons"><caption>{e(len(daemons))} live daemons on this state</caption>
<thead><tr><th scope="col">Daemon</th><th scope="col">Jobs held</th>
<th scope="col">Ticking now</th></tr></thead>
<tbody>{"".join(drow) or '<tr><td colspan="3">none</td></tr>'}</tbody></table>
<h2>Plugins</h2>
<table id="plugins"><caption>{e(len(plugins))} plugins</caption>
<thead><tr><th scope="col">Plugin</th><th scope="col">Kinds</th><th scope="col">Lifecycle</th>
<th scope="col">State</th><th scope="col">PID</th><th scope="col">Restarts</th>
<th scope="col">Last exit</th><th scope="col">Last output</th></tr></thead>
<tbody>{"".join(prow) or '<tr><td colspan="8">no plugin</td></tr>'}</tbody></table>
</main>
<script nonce="{nonce}">
(function () {{
  var K = "nexo-poller-admin-token", tok = document.getElementById("token");
  var msg = document.getElementById("msg");
  tok.value = sessionStorage.getItem(K) || "";
  function hdrs() {{ var t = sessionStorage.getItem(K); return t ? {{"Authorization": "Bearer " + t}} : {{}}; }}
  function refresh() {{
    fetch(location.pathname + location.search, {{headers: hdrs(), cache: "no-store"}})
      .then(function (r) {{ return r.text(); }})
      .then(function (html) {{
        var doc = new DOMParser().parseFromString(html, "text/html");
        var open = Array.prototype.map.call(document.querySelectorAll("details[open]"),
          function (d) {{ var tr = d.closest("tr[data-job]");
                          return tr && [tr.dataset.job, d.className]; }});
        var active = document.activeElement;
        if (active && active.closest && active.closest("#live")) return;
        document.getElementById("live").innerHTML = doc.getElementById("live").innerHTML;
        document.getElementById("health").textContent = doc.getElementById("health").textContent;
        open.forEach(function (o) {{
          var row = o && document.querySelector('tr[data-job="' + CSS.escape(o[0]) + '"] details'
                                                + (o[1] ? "." + o[1] : ":not([class])"));
          if (row) row.open = true; }});
      }}).catch(function () {{ msg.textContent = "cannot reach the daemon; retrying"; }});
  }}
  document.getElementById("auth").addEventListener("submit", function (ev) {{
    ev.preventDefault(); sessionStorage.setItem(K, tok.value.trim());
    msg.textContent = "token kept for this tab"; refresh(); }});
  document.addEventListener("click", function (ev) {{
    var b = ev.target.closest("button[data-action]"); if (!b) return;
    if (!sessionStorage.getItem(K)) {{ msg.textContent = "enter the admin token first"; tok.focus(); return; }}
    var job = b.dataset.job, act = b.dataset.action;
    msg.textContent = act + " " + job + "…";
    fetch("/admin/pollers/" + encodeURIComponent(job) + "/" + act, {{method: "POST", headers: hdrs()}})
      .then(function (r) {{ return r.json().then(function (j) {{ return [r.status, j]; }}); }})
      .then(function (a) {{ msg.textContent = act + " " + job + ": " +
        (a[1].ok ? "done" : "failed (" + a[0] + "): " + (a[1].error || "")); refresh(); }})
      .catch(function (e) {{ msg.textContent = act + " " + job + ": " + e; }});
  }});
  setInterval(refresh, 5000);
}})();
</script></body></html>
"""


@dataclasses.dataclass(frozen=True)
class _HttpRoute:
    """One route of the HTTP face: the paths it answers (a regular expression
    matched whole), the methods it takes (None: any), who may ask (``guard``:
    None anyone; "token" the bearer token unless the listener is on loopback;
    "admin" nexo's admin rules, ``_admin_guard``), and its handler
    ``handler(request, method, match, query)``."""
    pattern: re.Pattern
    methods: tuple[str, ...] | None
    guard: str | None
    handler: Callable[[Any, str, re.Match, str], None]


def _admin_guard(req, method: str) -> bool:
    """nexo's admin rules, True when the request may go on (else answered):
    a POST comes with its body within limits, from this site, and with the
    token; a GET needs the token unless the listener is on loopback."""
    admin = req.server_admin
    mutation = method == "POST"
    if mutation and not req._body_ok():
        return False
    if mutation:
        why = req._cross_site()
        if why is not None:
            req._refuse(403, f"cross-site request refused ({why})")
            return False
    if mutation or not admin.loopback:
        if admin.token is None:
            req._refuse(403, "no admin token is configured (admin_token_file "
                             f"or {_ADMIN_TOKEN_ENV}): mutations are refused")
            return False
        if not req._authorized():
            req._refuse(401, "a valid bearer token is required")
            return False
    return True


def _wrong_method(req, methods: tuple[str, ...]) -> None:
    """405, as nexo answers it: a POST-only route with ``Allow``."""
    if methods == ("POST",):
        return req._json(405, {"error": "POST required"}, {"Allow": "POST"})
    return req._refuse(405, f"{' or '.join(methods)} required")


def _http_health(req, method: str, match: re.Match, query: str) -> None:
    check = _health if match[0] == "/healthz" else _readiness
    ok, checks = check(req.server_admin.runner)
    doc = {"ok": ok, "checks": checks}
    if not ok:
        doc["reason"] = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    req._json(200 if ok else 503, doc)


def _http_metrics(req, method: str, match: re.Match, query: str) -> None:
    runner = req.server_runner
    req._send(200, runner.metrics.render(runner).encode(),
              "text/plain; version=0.0.4; charset=utf-8")


def _http_page(req, method: str, match: re.Match, query: str) -> None:
    import secrets
    admin = req.server_admin
    nonce = secrets.token_urlsafe(12)
    authorized = admin.loopback or req._authorized()
    body = _render_page(admin.runner, authorized, query, nonce).encode()
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
           "base-uri 'none'; frame-ancestors 'none'")
    req._send(200, body, "text/html; charset=utf-8", {
        "Content-Security-Policy": csp, "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer"})


def _http_plugins(req, method: str, match: re.Match, query: str) -> None:
    req._json(200, _plugin_states(req.server_admin.runner))


def _http_daemons(req, method: str, match: re.Match, query: str) -> None:
    runner = req.server_admin.runner
    req._json(200, _admin_daemons(runner, _admin_jobs(runner)))


def _http_jobs(req, method: str, match: re.Match, query: str) -> None:
    req._json(200, _admin_jobs(req.server_admin.runner))


def _job_of(req, match: re.Match) -> tuple[str, bool]:
    """The job a path names (percent-decoded) and whether this daemon has it."""
    from urllib.parse import unquote
    job_id = unquote(match["job"])
    return job_id, req.server_admin.runner.has_job(job_id)


def _http_job(req, method: str, match: re.Match, query: str) -> None:
    """``/admin/pollers/JOB``: a job's status; ``/admin/pollers/reload``
    (unless a job has that name): reload the configuration."""
    admin = req.server_admin
    job_id, known = _job_of(req, match)
    if job_id == "reload" and not known:
        if method != "POST":
            return _wrong_method(req, ("POST",))
        return req._json(*admin.do_reload())
    if method != "GET":
        return _wrong_method(req, ("GET",))
    job = next((j for j in _admin_jobs(admin.runner) if j["id"] == job_id), None)
    if job is None:
        return req._json(404, {"error": f"job '{job_id}' not found"})
    req._json(200, job)


def _http_cursor(req, method: str, match: re.Match, query: str) -> None:
    job_id, known = _job_of(req, match)
    if not known:
        return _http_unknown_action(req, method, match, query)
    req._json(*req.server_admin.cursor(job_id, req.body if method == "POST" else None))


def _http_runs(req, method: str, match: re.Match, query: str) -> None:
    job_id, known = _job_of(req, match)
    if not known:
        return req._json(404, {"error": f"job '{job_id}' not found"})
    req._json(*req.server_admin.runs(job_id, query))


def _http_action(req, method: str, match: re.Match, query: str) -> None:
    job_id, known = _job_of(req, match)
    if not known:
        return req._json(404, {"error": f"job '{job_id}' not found"})
    try:
        code, doc = req.server_admin.action(job_id, match["action"], req.body,
                                            req.client_address[0])
    except KeyError:                        # removed meanwhile by a reload
        code, doc = 404, {"error": f"job '{job_id}' not found"}
    req._json(code, doc)


def _http_unknown_action(req, method: str, match: re.Match, query: str) -> None:
    from urllib.parse import unquote
    rest = "/".join(unquote(p) for p in match["rest"].split("/"))
    req._json(404, {"error": f"unknown action '{rest}'"})


# The HTTP face, first match wins.  A listener without the admin API serves
# only /metrics, and to anyone: it is meant for a scraper.
_POLLERS = r"/admin/pollers/(?P<job>[^/]*)"
_HTTP_ROUTES = tuple(_HttpRoute(re.compile(pattern, re.S), methods, guard, handler)
                     for pattern, methods, guard, handler in (
    (r"/healthz|/readyz", None, "token", _http_health),
    (r"/metrics", ("GET",), "token", _http_metrics),
    (r"/|/index\.html", ("GET",), None, _http_page),
    (r"/admin/plugins", ("GET",), "token", _http_plugins),
    (r"/admin/daemons", ("GET",), "token", _http_daemons),
    (r"/admin/pollers/?", ("GET",), "admin", _http_jobs),
    (_POLLERS, None, "admin", _http_job),
    (_POLLERS + r"/(?P<rest>cursor)", None, "admin", _http_cursor),
    (_POLLERS + r"/runs", ("GET",), "admin", _http_runs),
    (_POLLERS + r"/(?P<action>" + "|".join(_ADMIN_ACTIONS) + ")", ("POST",), "admin",
     _http_action),
    (_POLLERS + r"/(?P<rest>.*)", None, "admin", _http_unknown_action),
))
_METRICS_ONLY_ROUTES = (_HttpRoute(re.compile(r"/metrics"), ("GET",), None, _http_metrics),)


def _serve_http(runner: "Runner", addr: tuple[str, int], *, metrics: bool = True,
                admin: _Admin | None = None, key: str = "metrics_addr",
                read_timeout: float = _METRICS_READ_TIMEOUT_SECS,
                max_connections: int = _METRICS_MAX_CONNECTIONS,
                max_request_bytes: int = _METRICS_MAX_REQUEST_BYTES,
                request_deadline: float = _HTTP_REQUEST_DEADLINE_SECS,
                allowed_hosts: Iterable[str] = ()):
    """Serve ``/metrics`` and/or the admin routes on a background thread;
    returns the server.

    One thread reads every request as it arrives, without a thread per
    connection, and hands only whole requests to at most ``max_connections``
    handler threads: clients that trickle or idle cannot take the handlers
    from a probe.  Bounded: a request (line, headers, body) must arrive
    within ``read_timeout`` of its connection, in all; at most
    ``_HTTP_MAX_ARRIVING`` may be arriving at once (past that the oldest is
    closed); each write of an answer gets ``request_deadline``; a request's
    line and headers may be ``max_request_bytes`` long (a POST body
    ``_ADMIN_MAX_BODY_BYTES`` more).  On loopback, a request whose ``Host``
    is not the listener's own name or one of ``allowed_hosts`` gets 421."""
    from http.server import BaseHTTPRequestHandler, HTTPServer
    own_hosts = {"localhost", "127.0.0.1", "::1", _host_name(addr[0])} \
        if _is_loopback(addr[0]) else None
    allowed_hosts = frozenset(_host_name(h) for h in allowed_hosts)
    routes = [r for r in (_HTTP_ROUTES if admin is not None else _METRICS_ONLY_ROUTES)
              if metrics or r.handler is not _http_metrics]

    class Handler(BaseHTTPRequestHandler):
        server_version = "nexo-poller"
        sys_version = ""
        server_runner, server_admin = runner, admin     # what the route handlers serve

        def setup(self) -> None:            # the request arrived whole: see Server
            self.connection, data = self.request
            self.connection.setblocking(True)
            self.connection.settimeout(request_deadline)
            self.rfile = _CappedReader(data, max_request_bytes)
            self.wfile = _SocketWriter(self.connection)

        def parse_request(self) -> bool:
            if not self.raw_requestline.endswith(b"\n"):
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414, f"request longer than {max_request_bytes} bytes")
                return False
            if not super().parse_request():
                return False
            if self.rfile.budget <= 0:          # the headers ran past the limit
                self.close_connection = True
                self.send_error(431, f"request longer than {max_request_bytes} bytes")
                return False
            return True

        # -- answers ---------------------------------------------------------------

        def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, doc: Any, extra: dict | None = None) -> None:
            self._send(code, json.dumps(doc).encode(), "application/json", extra)

        def _refuse(self, code: int, error: str) -> None:
            extra = {"WWW-Authenticate": 'Bearer realm="nexo-poller"'} if code == 401 else None
            self._json(code, {"ok": False, "error": error}, extra)

        # -- the rules -------------------------------------------------------------

        def _authorized(self) -> bool:
            return admin is not None and admin.authorized(self.headers.get("Authorization"))

        def _cross_site(self) -> str | None:
            if (self.headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
                return "Sec-Fetch-Site: cross-site"
            origin = self.headers.get("Origin")
            if origin is None:
                return None
            host = (self.headers.get("Host") or "").lower()
            parts = origin.lower().split("://", 1)
            if len(parts) != 2 or parts[1].rstrip("/") != host:
                return f"Origin {origin[:100]!r} is not this host ({host[:100]!r})"
            return None

        def _body_ok(self) -> bool:
            """Read (and drop) a POST body within its limit; False once answered."""
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                self._refuse(411, "a body needs a Content-Length")
                return False
            try:
                n = int(length or 0)
            except ValueError:
                n = -1
            if n < 0 or n > _ADMIN_MAX_BODY_BYTES:
                self.close_connection = True
                self._refuse(413, f"a body may be at most {_ADMIN_MAX_BODY_BYTES} bytes")
                return False
            self.rfile.budget += n
            self.body = self.rfile.read(n)
            if len(self.body) != n:
                self.close_connection = True
                return False
            return True

        def _route(self, method: str) -> None:
            path, _, query = self.path.partition("?")
            if own_hosts is not None:
                why = _foreign_host(self.headers.get("Host"), own_hosts, allowed_hosts,
                                    self.server.server_address[1])
                if why is not None:
                    return self._refuse(421, why)
            for route in routes:
                match = route.pattern.fullmatch(path)
                if match is None:
                    continue
                if route.guard == "token" and not admin.loopback and not self._authorized():
                    return self._refuse(401, "a bearer token is required")
                if route.guard == "admin" and not _admin_guard(self, method):
                    return None
                if route.methods and method not in route.methods:
                    return _wrong_method(self, route.methods)
                return route.handler(self, method, match, query)
            if admin is None:
                return self.send_error(404, "only /metrics is served")
            return self._json(404, {"error": f"no route {path[:200]}"})

        def _safely(self, method: str) -> None:
            try:
                self._route(method)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            except Exception:
                log.exception("admin API: %s %s failed", method, _log_safe(self.path, 200))
                self.close_connection = True
                try:
                    self._json(500, {"ok": False, "error": "internal error (see the log)"})
                except OSError:
                    pass

        def do_GET(self) -> None:
            self._safely("GET")

        def do_HEAD(self) -> None:
            self._safely("GET")

        def do_POST(self) -> None:
            self._safely("POST")

        def _other(self) -> None:
            self.close_connection = True
            self._refuse(405, f"{self.command} is not served")

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other

        def log_message(self, *args) -> None:
            pass

    class _CappedReader(io.BytesIO):
        """A request's bytes, yielding at most ``budget`` in all."""

        def __init__(self, data: bytes, budget: int) -> None:
            super().__init__(data)
            self.budget = budget

        def readline(self, size: int = -1) -> bytes:
            size = self.budget if size is None or size < 0 else min(size, self.budget)
            line = super().readline(size) if size > 0 else b""
            self.budget -= len(line)
            return line

        def read(self, size: int = -1) -> bytes:
            size = self.budget if size is None or size < 0 else min(size, self.budget)
            data = super().read(size) if size > 0 else b""
            self.budget -= len(data)
            return data

    class Server(HTTPServer):
        address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        request_queue_size = 128            # a burst is accepted, not dropped
        _wake_r = _wake_w = None            # the pipe that ends serve_forever, once listening

        def server_activate(self) -> None:
            super().server_activate()
            self.socket.setblocking(False)
            self._closing = False
            self._stopped = threading.Event()
            self._wake_r, self._wake_w = os.pipe()
            # socket -> [bytes so far, deadline, address], oldest first
            self._arriving: dict[socket.socket, list] = {}
            self._whole: deque = deque()        # (socket, request, address) for a handler
            self._cond = threading.Condition(threading.Lock())
            self._workers = self._idle = 0
            self._starved = False               # out of descriptors: accepting paused

        # The loop sleeps until a connection, a request's bytes, the oldest
        # request's deadline or shutdown() comes, so an idle daemon stays asleep.
        def serve_forever(self, poll_interval=None) -> None:
            try:
                arriving, resume = self._arriving, None
                with selectors.DefaultSelector() as sel:
                    sel.register(self.socket, selectors.EVENT_READ, "accept")
                    sel.register(self._wake_r, selectors.EVENT_READ, "wake")
                    while not self._closing:
                        now = time.monotonic()
                        if resume is not None and now >= resume:
                            sel.register(self.socket, selectors.EVENT_READ, "accept")
                            resume = None
                        wake = [t for t in (resume, next(iter(arriving.values()))[1]
                                            if arriving else None) if t is not None]
                        for key, _ in sel.select(max(0.0, min(wake) - now) if wake else None):
                            if key.data == "accept" and not self._closing:
                                if not self._accept(sel):
                                    sel.unregister(self.socket)
                                    resume = time.monotonic() + 0.5
                            elif key.data is None and key.fileobj in arriving:
                                try:
                                    self._receive(sel, key.fileobj)
                                except Exception:   # one connection's failure, not the loop's
                                    log.exception("HTTP: a connection failed")
                                    if key.fileobj in arriving:
                                        self._drop(sel, key.fileobj)
                        now = time.monotonic()
                        while arriving:             # past its deadline: cut off
                            sock, (_, deadline, _) = next(iter(arriving.items()))
                            if deadline > now:
                                break
                            self._drop(sel, sock)
                    for sock in list(arriving):
                        self._drop(sel, sock)
            finally:                        # shutdown() waits on it
                self._stopped.set()

        def _accept(self, sel) -> bool:
            """Take what waits to be accepted; False when out of descriptors."""
            arriving = self._arriving
            for _ in range(64):
                try:
                    sock, client = self.socket.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                         errno.ENOMEM):
                        continue                # that client gave up: the next one
                    if arriving:                # make room: the oldest goes
                        self._drop(sel, next(iter(arriving)))
                        continue
                    if not self._starved:
                        log.warning("HTTP: cannot accept (%s); pausing", exc.strerror or exc)
                    self._starved = True
                    return False
                self._starved = False
                if len(arriving) >= _HTTP_MAX_ARRIVING:
                    self._drop(sel, next(iter(arriving)))
                sock.setblocking(False)
                arriving[sock] = [bytearray(), time.monotonic() + read_timeout, client]
                sel.register(sock, selectors.EVENT_READ, None)
            return True

        def _receive(self, sel, sock) -> None:
            try:
                chunk = sock.recv(16384)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                return self._drop(sel, sock)
            entry = self._arriving[sock]
            entry[0] += chunk
            if _request_arrived(entry[0], max_request_bytes):
                sel.unregister(sock)
                del self._arriving[sock]
                self._hand_over(sock, bytes(entry[0]), entry[2])

        def _drop(self, sel, sock) -> None:
            sel.unregister(sock)
            del self._arriving[sock]
            sock.close()

        def _hand_over(self, sock, data: bytes, client) -> None:
            with self._cond:
                if len(self._whole) >= _HTTP_MAX_ARRIVING:
                    sock.close()                # every handler far behind: shed
                    return
                self._whole.append((sock, data, client))
                if len(self._whole) > self._idle and self._workers < max_connections:
                    self._workers += 1
                    try:
                        threading.Thread(target=self._work, daemon=True,
                                         name="nexo-http-handler").start()
                    except RuntimeError as exc:     # out of threads
                        self._workers -= 1
                        if not self._workers:       # nobody to take it: this one is lost
                            self._whole.pop()
                            sock.close()
                        log.warning("HTTP: no new handler for a request from %s (%s)",
                                    client[0], exc)
                else:
                    self._cond.notify()

        def _work(self) -> None:
            while True:
                with self._cond:
                    self._idle += 1
                    self._cond.wait_for(lambda: self._whole or self._closing,
                                        _HTTP_WORKER_IDLE_SECS)
                    self._idle -= 1
                    if not self._whole or self._closing:
                        self._workers -= 1
                        return
                    sock, data, client = self._whole.popleft()
                try:
                    self.finish_request((sock, data), client)
                except Exception:
                    self.handle_error(sock, client)
                finally:
                    self.shutdown_request(sock)

        def handle_error(self, request, client_address) -> None:
            if isinstance(sys.exc_info()[1], OSError):  # the client went away mid-answer
                log.debug("HTTP: answer to %s not sent: %s", client_address[0],
                          sys.exc_info()[1])
                return
            log.exception("HTTP: a request from %s failed", client_address[0])

        def shutdown(self) -> None:
            self._closing = True
            os.write(self._wake_w, b"x")
            self._stopped.wait()
            with self._cond:
                left = list(self._whole)
                self._whole.clear()
                self._cond.notify_all()
            for sock, _, _ in left:
                sock.close()

        def server_close(self) -> None:
            super().server_close()              # also when binding failed: no pipe yet
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None

    try:
        server = Server(addr, Handler)
    except OSError as exc:
        where = f"cannot listen on {addr[0]}:{addr[1]}: {exc.strerror or exc}"
        raise ConfigError(runner.config.source, [(key, where)]) from None
    name = "nexo-admin" if admin is not None else "nexo-metrics"
    threading.Thread(target=server.serve_forever, daemon=True, name=name).start()
    host, port = server.server_address[:2]
    if metrics:
        log.info("metrics on http://%s:%d/metrics", host, port)
    if admin is not None:
        log.info("admin API and status page on http://%s:%d/", host, port)
    return server


def _serve_metrics(runner: "Runner", addr: tuple[str, int], **bounds):
    """Serve only ``/metrics`` (see ``_serve_http`` for the bounds)."""
    return _serve_http(runner, addr, **bounds)


def _start_http(runner: "Runner") -> tuple[Any, Any]:
    """The runner's listeners as configured: (metrics server, admin server);
    one server serves both when ``metrics_addr`` and ``admin_addr`` agree."""
    cfg = runner.config
    admin = None
    if cfg.admin_addr:
        token = _read_admin_token(cfg)
        loopback = _is_loopback(cfg.admin_addr[0])
        if not loopback and token is None:
            raise ConfigError(cfg.source, [("admin_addr", (
                f"{cfg.admin_addr[0]} is not a loopback address: serving beyond loopback needs "
                f"a token (admin_token_file or {_ADMIN_TOKEN_ENV})"))])
        path = runner.config_path
        reload = None if path is None else (lambda: runner.reload(
            load_config(path, extra_kinds=runner.in_process_kinds())))
        admin = _Admin(runner, token, loopback, reload)
    shared = cfg.admin_addr is not None and cfg.admin_addr == cfg.metrics_addr
    metrics_server = admin_server = None
    try:
        if admin is not None:
            admin_server = _serve_http(runner, cfg.admin_addr, metrics=shared, admin=admin,
                                       key="admin_addr", allowed_hosts=cfg.admin_allowed_hosts)
        if cfg.metrics_addr and not shared:
            metrics_server = _serve_http(runner, cfg.metrics_addr,
                                         allowed_hosts=cfg.admin_allowed_hosts)
    except BaseException:
        if admin_server is not None:
            admin_server.shutdown()
            admin_server.server_close()
        raise
    return (admin_server if shared else metrics_server), admin_server


# ============================================================================
# CLI
# ``python nexo_poller.py --config FILE [VERB]``: one clear line per user
# error, never a traceback, and documented exit codes.
# ============================================================================

EXIT_OK = 0
EXIT_TICK_FAILED = 1
EXIT_USAGE = 2        # bad arguments or an invalid config / manifest
EXIT_STATE = 3        # the state database cannot be used
EXIT_UNKNOWN_JOB = 4
EXIT_BUSY = 5         # the job is leased by another running daemon
EXIT_BROKER = 6       # the broker cannot be reached, refused the credentials, or TLS failed
EXIT_ADMIN = 7        # --admin: the daemon's admin API cannot be reached or refused us


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        tick = getattr(record, "tick", None)
        if tick is not None:
            doc.update(tick)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level.upper())         # a verb may lower a logger's level to capture
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser():
    import argparse
    # The options every verb takes, before or after the verb: the main parser
    # gives the defaults, each verb's parser only overrides what it was given.

    def options(p, suppress: bool) -> None:
        d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
        p.add_argument("--config", metavar="FILE", default=d(None),
                       help="pollers.json (before or after the verb)")
        p.add_argument("--log-level", default=d("info"), type=str.lower,
                       choices=["debug", "info", "warning", "error"],
                       help="debug, info (default), warning or error; any case")
        p.add_argument("--log-format", default=d("text"), choices=["text", "json"],
                       help="log lines as text (default) or one JSON object each")
    p = argparse.ArgumentParser(
        prog="nexo-poller", description="Poller daemon: schedules jobs and routes each tick "
        "to the plugin owning its kind.",
        epilog="exit codes: 0 ok, 1 tick failed, 2 usage or invalid config, "
               "3 state database error, 4 unknown job, 5 job busy in another daemon, "
               "6 broker unreachable or refused the credentials, "
               "7 admin API unreachable or refused; tick --dry-run: "
               "1 transient, 8 permanent, 9 config")
    options(p, False)
    p.add_argument("--admin", metavar="URL", default=os.environ.get(_ADMIN_URL_ENV),
                   help=", ".join(v.name for v in _VERBS.values() if v.remote)
                   + f" go to the daemon's admin API at URL (default: ${_ADMIN_URL_ENV}); "
                     "the token comes from "
                        f"--admin-token-file or ${_ADMIN_TOKEN_ENV}")
    p.add_argument("--admin-token-file", metavar="FILE", help="the admin API's bearer token")
    p.add_argument("--version", action="version", version=f"nexo-poller {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    for verb in _VERBS.values():
        v = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        options(v, True)
        verb.args(v)
    return p


class _UsageError(NexoPollerError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "verb", None) == "outbox" and \
            not any(e.startswith("-") for e in extra):
        args.ids += extra                   # ids after an option: `outbox drop --dead ID`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verb = _VERBS[args.verb or "run"]
    remote = bool(args.admin) and verb.remote is not None
    if not args.config and not remote:
        parser.error("the following arguments are required: --config")
    _setup_logging(args.log_level, args.log_format)
    try:
        return _through_admin(verb, args) if remote else _run_verb(verb, args)
    except _UsageError as exc:
        print(f"nexo-poller: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        busy = [m for p, m in exc.problems if p == "metrics_addr" and "cannot listen" in m]
        print(f"nexo-poller: metrics_addr: {busy[0]}" if busy else
              f"nexo-poller: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ManifestError, PollerRouteRegistrationError) as exc:
        print(f"nexo-poller: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"nexo-poller: state: {exc}", file=sys.stderr)
        return EXIT_STATE
    except PluginPollerForwardError as exc:
        print(f"nexo-poller: broker: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                 # `status | head`: the reader had enough
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_OK


def _run_verb(verb: "_Verb", args) -> int:
    """A verb on the configuration (no ``--admin``): load it, check the job
    named, run the verb's local implementation."""
    if verb.reads_file:
        return verb.local(None, args)
    config = load_config(args.config, check_entrypoints=verb.name == "validate")
    job_ids = {j.id for j in config.jobs}
    job = getattr(args, "job", None)
    if job is not None and job not in job_ids:
        raise _UsageError(f"no job {job!r} in {args.config} (jobs: "
                          f"{', '.join(sorted(job_ids)) or 'none'})", EXIT_UNKNOWN_JOB)
    return verb.local(config, args)


def _validate_local(config: DaemonConfig, args) -> int:
    print(f"{args.config}: ok ({len(config.jobs)} jobs, {len(config.plugins)} plugins)")
    for kind in BUILTIN_KINDS:
        handle = _plugin_for(kind, config.plugins)
        if handle is not None:              # the plugin wins: worth knowing
            print(f"  kind {kind!r} is served by plugin {handle.plugin_id!r}, "
                  "not the built-in")
    for h in config.plugins:
        if h.max_ticks_per_minute is not None:
            print(f"  plugin {h.plugin_id}: at most {h.max_ticks_per_minute} ticks a minute "
                  f"(max_ticks_per_minute), shared by its kinds {', '.join(h.kinds)}")
    for line in _nexo_tz_warnings(config, time.time()):
        print(line)
    for jc in config.jobs if args.policy else ():
        print(f"job {jc.id} (kind {jc.kind}):")
        _print_policy(_policy_view(config, jc))
    return EXIT_OK


def _nexo_tz_warnings(config: DaemonConfig, now: float) -> list[str]:
    """A nexo file's jobs whose ``tz`` nexo ignored (its cron-tz feature is
    off: every schedule ran in UTC) and how far their first fire moves here."""
    if config.cron_dialect != "nexo":
        return []
    out = []
    for jc in config.jobs:
        s = jc.schedule
        if s.cron is None or getattr(s.tz, "key", "UTC") in ("UTC", "Etc/UTC"):
            continue
        here = s.next_after(now, now)
        there = dataclasses.replace(s, tz=timezone.utc).next_after(now, now)
        moved = "cannot be compared (no next fire)" if here is None or there is None \
            else f"moves by {_signed_duration(here - there)}"
        out.append(f"  warning: job {jc.id}: nexo ran its cron in UTC (it ignores tz); here "
                   f"it runs in {s.tz.key}: the first fire after now {moved} "
                   f"({_iso(there)} in UTC, {_iso(here)} with tz)")
    return out


def _signed_duration(secs: float) -> str:
    """``secs`` as "+1d2h30m" or "-45m" (whole seconds; "0s" for none)."""
    n = round(secs)
    left, parts = abs(n), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return ("-" if n < 0 else "+") + "".join(parts) if parts else "0s"


def _validate_args(p) -> None:
    p.add_argument("--policy", action="store_true", help="print each job's effective "
                   "timeout, backoff, breaker, alert cooldown, jitter and catch-up, and where "
                   "each came from (job, config, plugin or default)")


def _print_policy(view: Mapping[str, Mapping[str, Any]]) -> None:
    """A job's effective policy (``_policy_view``), one key a line."""
    for key, entry in view.items():
        print(f"  {key:<28} {entry['value']!s:<10} {entry['source']}")


def _run_local(config: DaemonConfig, args) -> int:
    if not config.enabled:
        print("nexo-poller: disabled by \"enabled\": false in the config; nothing to do",
              file=sys.stderr)
        return EXIT_OK
    _check_metrics_addr(config)         # before any plugin starts
    _become_subreaper()                 # orphans of plugins come back to be killed
    mark = _mark_daemon(args.config, config)
    try:
        _notifying(Runner(config)).run_forever(args.config)
    finally:
        _unmark_daemon(mark)
    return EXIT_OK


def _status_local(config: DaemonConfig, args) -> int:
    if args.next is not None:
        if args.job is None or args.next < 1:
            raise _UsageError("status --next N needs a job and N >= 1: status JOB --next 5",
                              EXIT_USAGE)
        return _print_next(config, args.job, args.next, args.json)
    return _print_status(config, args.json, args.job)


def _tick_local(config: DaemonConfig, args) -> int:
    if args.dry_run:
        return _dry_run_verb(config, args)
    if args.cursor is not None or args.cursor_text is not None:
        raise _UsageError("--cursor and --cursor-text go with --dry-run", EXIT_USAGE)
    _refuse_if_daemon_elsewhere(args.config, config)
    job = args.job
    daemon_result = _tick_through_daemon(config, job)
    if daemon_result is not None:
        return daemon_result
    handle = _plugin_for(next(j.kind for j in config.jobs if j.id == job), config.plugins)
    runner = Runner(dataclasses.replace(     # start only what this one tick needs
        config, jobs=[j for j in config.jobs if j.id == job],
        plugins=[handle] if handle else []))
    try:
        outcome = runner.run_once(job)
    finally:
        runner.stop()
    print(json.dumps(outcome.to_dict(), indent=2))
    if outcome.status == "leased":
        return EXIT_BUSY
    return EXIT_OK if outcome.status == "ok" else EXIT_TICK_FAILED


def _operator_name() -> str:
    """Who the CLI says paused a job: the user it runs as, on this host."""
    import pwd
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:                        # a uid with no passwd entry (a container)
        user = str(os.geteuid())
    return f"{user}@{socket.gethostname()}"


def _pause_arg(args) -> str | None:
    """``pause [--note TEXT]``'s command argument (who, why, now); None for
    the other verbs.  A note too long is a usage error."""
    if args.verb != "pause":
        return None
    try:
        return pause_command_arg(args.note, _operator_name())
    except InputError as exc:
        raise _UsageError(f"pause --note: {exc}", EXIT_USAGE) from None


def _command_local(config: DaemonConfig, args) -> int:
    """``pause``/``resume``/``reset JOB``: through the state, to the daemon
    holding the job when one runs."""
    arg = _pause_arg(args)
    _refuse_if_daemon_elsewhere(args.config, config)
    verb, job = args.verb, args.job
    store = _config_state(config)
    try:
        jc = next(j for j in config.jobs if j.id == job)
        owner, seq = store.command(job, verb, paused_on_boot=jc.paused_on_boot, arg=arg)
        if seq is None:
            print(f"{verb} {job}: done")
            return EXIT_OK
        done, _ = _await_command(store, owner, seq, 10.0)
        print(f"{verb} {job}: " + (f"done (applied by daemon {owner})" if done else
                                   f"queued for daemon {owner}, which applies it next"))
        return EXIT_OK
    finally:
        store.close()


def _cursor_local(config: DaemonConfig, args) -> int:
    _refuse_if_daemon_elsewhere(args.config, config)
    return _cursor_verb(config, args)


def _migration_target(config: DaemonConfig, location: str, broker_arg: str | None
                      ) -> tuple[str, str | None]:
    """``migrate-state``'s target state, resolved, and the NATS broker it is
    reached through (None: a file)."""
    try:
        target = _state_backend(location).resolve_location(location, ".")
    except ValueError as exc:
        raise _UsageError(f"--to {location}: {exc}", EXIT_USAGE) from None
    broker = broker_arg or (config.broker if _is_nats(config.broker) else None)
    problem = _state_backend(target).broker_problem(broker)
    if problem:
        raise _UsageError(f"--to {target}: {problem}; or give --broker", EXIT_USAGE)
    return target, broker


def _import_into(config: DaemonConfig, target: str, broker_arg: str | None,
                 states: Iterable[JobState], outbox: Iterable[OutboxItem] = ()
                 ) -> tuple[list[str], list[str]]:
    dst = (open_state(target, broker_url=broker_arg) if broker_arg else
           _config_state(config, location=target))
    try:
        return dst.import_states(states, outbox)
    finally:
        dst.close()


def _migrate_state(config: DaemonConfig, args) -> int:
    """``migrate-state --to LOCATION [--broker URL]``: copy a stopped daemon's
    state into another one, of either backend; jobs it has are left alone.
    ``--from-nexo PATH``: import a stopped nexo daemon's poller.db instead."""
    if args.from_nexo is not None:
        return _migrate_from_nexo(config, args)
    if args.to is None:
        raise _UsageError("migrate-state needs --to LOCATION (the state to copy into) "
                          "or --from-nexo PATH (nexo's poller.db to import)", EXIT_USAGE)
    target, broker = _migration_target(config, args.to, args.broker)
    if os.path.abspath(target) == os.path.abspath(config.state_db) and \
            broker in (None, config.broker):
        raise _UsageError(f"the config's state_db is already {config.state_db}; --to names "
                          "the state to copy into", EXIT_USAGE)
    src = _read_state(config)
    if src is None:
        raise _UsageError(f"no state at {config.state_db} to copy", EXIT_USAGE)
    try:
        if src.daemons():
            raise _UsageError(f"a daemon runs on {config.state_db}: stop it first, so no "
                              "cursor moves after the copy", EXIT_BUSY)
        states, outbox = src.load(), src.outbox()
    finally:
        src.close()
    copied, skipped = _import_into(config, target, args.broker, states.values(), outbox)
    print(f"copied {len(copied)} jobs to {target}" + (
        f"; left alone (already there): {', '.join(sorted(skipped))}" if skipped else ""))
    return EXIT_OK


def _nexo_job_state(job, cursor, last_run, next_run, status, error, errors, seen,
                    dispatched, paused, alert) -> JobState:
    """One nexo ``poll_state`` row as a JobState; a value of a type nexo never
    writes there is an InputError naming the column."""
    def whole(column: str, value: Any, default: int | None = 0) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{column} is {value!r}, not a number")
        return int(value)

    def text(column: str, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise InputError(f"{column} is {value!r}, not text")
        return value
    if cursor is not None and not isinstance(cursor, (bytes, str)):
        raise InputError(f"cursor is {cursor!r}, not bytes")
    seconds = (lambda column, ms: None if ms is None else whole(column, ms) / 1000.0)
    return JobState(
        str(job),
        # The cursor is the plugin's bytes, as they are; a TEXT value (sqlite
        # types values, not columns) is its UTF-8 bytes.
        cursor=cursor.encode("utf-8") if isinstance(cursor, str) else cursor,
        paused=bool(whole("paused", paused)), last_status=text("last_status", status),
        last_error=text("last_error", error),
        consecutive_errors=whole("consecutive_errors", errors),
        # nexo's instants are milliseconds since the epoch.  No schedule_key:
        # the next slot is planned afresh from this config's schedule.
        last_run_at=seconds("last_run_at", last_run),
        next_run_at=seconds("next_run_at", next_run),
        items_seen_total=whole("items_seen_total", seen),
        items_dispatched_total=whole("items_dispatched_total", dispatched),
        last_alert_at=seconds("last_failure_alert_at", alert))


def _read_nexo_db(path: str) -> tuple[list[JobState], list[tuple[str, str, int]]]:
    """A nexo poller.db (crates/poller/migrations/001_init.sql) read without
    writing it: its ``poll_state`` rows as JobStates, and its ``poll_lease``
    rows (job, holder, running_until in ms).  Opened ``mode=ro``: sqlite
    refuses any write, and a read-only connection never checkpoints nexo's
    WAL into the file."""
    import sqlite3
    from urllib.parse import quote
    if not os.path.isfile(path):
        raise _UsageError(f"--from-nexo {path}: no such file", EXIT_USAGE)
    try:
        db = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True,
                             timeout=5)
    except sqlite3.Error as exc:
        raise _UsageError(f"--from-nexo {path}: cannot open: {exc}", EXIT_USAGE) from None
    try:
        rows = db.execute(
            "SELECT job_id, cursor, last_run_at, next_run_at, last_status, last_error, "
            "consecutive_errors, items_seen_total, items_dispatched_total, paused, "
            "last_failure_alert_at FROM poll_state ORDER BY job_id").fetchall()
        leases = db.execute("SELECT job_id, leaseholder, running_until FROM poll_lease "
                            "ORDER BY job_id").fetchall()
    except sqlite3.Error as exc:
        raise _UsageError(f"--from-nexo {path}: not a nexo poller state database "
                          f"(poll_state, poll_lease): {exc}", EXIT_USAGE) from None
    finally:
        db.close()
    states = []
    for row in rows:
        try:
            states.append(_nexo_job_state(*row))
        except (TypeError, ValueError) as exc:
            raise _UsageError(f"--from-nexo {path}: poll_state row of job {row[0]!r}: "
                              f"{exc}", EXIT_USAGE) from None
    return states, leases


def _migrate_from_nexo(config: DaemonConfig, args) -> int:
    """``migrate-state --from-nexo PATH [--to LOCATION]``: nexo's job states
    into this poller's state (the config's state_db unless ``--to``)."""
    target, _ = _migration_target(config, args.to or config.state_db, args.broker)
    states, leases = _read_nexo_db(args.from_nexo)
    now_ms = int(time.time() * 1000)
    # A row whose running_until is not a number is taken as live: refusing
    # is the safe side.
    live = [f"{job} (held by {holder})" for job, holder, until in leases
            if not isinstance(until, (int, float)) or until > now_ms]
    if live:
        raise _UsageError(f"--from-nexo {args.from_nexo}: a nexo daemon holds a live lease "
                          f"on {', '.join(live)}: stop it first, so no cursor moves after "
                          "the import", EXIT_BUSY)
    job_ids = {j.id for j in config.jobs}
    unknown = sorted(s.id for s in states if s.id not in job_ids)
    copied, skipped = _import_into(config, target, args.broker,
                                   [s for s in states if s.id in job_ids])
    print(f"imported {len(copied)} jobs from {args.from_nexo} to {target}" + (
        f"; left alone (already there): {', '.join(sorted(skipped))}" if skipped else "")
        + (f"; skipped (not in the config): {', '.join(unknown)}" if unknown else ""))
    return EXIT_OK


def _sd_notify(state: str) -> bool:
    """Tell systemd (``Type=notify``) the daemon's state over ``$NOTIFY_SOCKET``,
    a Unix datagram socket (``@name``: the abstract namespace).  False when
    there is none or it cannot be reached; never raises."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not hasattr(socket, "AF_UNIX"):
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), addr)
        return True
    except OSError as exc:
        log.debug("sd_notify %s: %s", state, exc)
        return False


def _notifying(runner: Runner) -> Runner:
    """``runner`` saying READY=1 once started and STOPPING=1 as it begins to
    stop (systemd ``Type=notify``), without the Runner knowing of systemd."""
    start, stop = runner.start, runner.stop

    def started(*args, **kwargs):
        result = start(*args, **kwargs)
        _sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={len(runner.config.jobs)} jobs")
        return result

    def stopping() -> None:
        _sd_notify("STOPPING=1")
        stop()
    runner.start, runner.stop = started, stopping
    return runner


def _mark_path(config_path: str, create: bool = False) -> str | None:
    """Where a daemon says which state it runs a config file on: a private
    per-user folder (made by the daemon, gone with the last mark), one file
    per config path."""
    import hashlib
    import tempfile
    folder = os.path.join(tempfile.gettempdir(), f"nexo-poller-{os.getuid()}")
    try:
        if create:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None                             # not ours alone: say nothing there
    digest = hashlib.sha256(os.path.abspath(config_path).encode()).hexdigest()[:16]
    return os.path.join(folder, f"daemon-{digest}.json")


def _mark_daemon(config_path: str, config: DaemonConfig) -> str | None:
    path = _mark_path(config_path, create=True)
    if path is not None:
        try:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump({"pid": os.getpid(), "state_db": config.state_db,
                           "config": os.path.abspath(config_path)}, fh)
        except OSError:
            return None
    return path


def _unmark_daemon(path: str | None) -> None:
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                if json.load(fh).get("pid") != os.getpid():
                    return
            os.unlink(path)
            os.rmdir(os.path.dirname(path))     # only when no other daemon's mark is left
        except (OSError, ValueError):
            pass


def _refuse_if_daemon_elsewhere(config_path: str, config: DaemonConfig) -> None:
    """A daemon runs this config file on another state (its ``state_db``
    changed since it started): the CLI must not act on the new one beside it."""
    path = _mark_path(config_path)
    try:
        with open(path or "", encoding="utf-8") as fh:
            mark = json.load(fh)
        pid, state_db = int(mark["pid"]), str(mark["state_db"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid != os.getpid() and _pid_alive(pid) and \
            os.path.abspath(state_db) != os.path.abspath(config.state_db):
        raise _UsageError(f"a daemon (pid {pid}) runs {config_path} on the state at {state_db}; "
                          f"the config now names {config.state_db}, which takes effect when "
                          "that daemon restarts", EXIT_BUSY)


def _outbox_verb(config: DaemonConfig, args) -> int:
    """``outbox [list|retry|drop] [ID ...] [--dead]``: look at and unstick the outbox."""
    if args.action == "list":
        items = []
        store = _read_state(config)
        if store is not None:
            try:
                items = store.outbox(dead=args.dead)
            finally:
                store.close()
        if args.json:
            print(json.dumps([dataclasses.asdict(i) | {"body": json.loads(i.body)}
                              for i in items], indent=2))
            return EXIT_OK
        print(f"{len(items)} {'dead letters' if args.dead else 'undelivered'}")
        for i in items:
            print(f"{i.id}  {i.job:<20} {i.what:<8} {i.topic:<32} attempts={i.attempts} "
                  f"created={_iso(i.created_at)} error={i.last_error or '-'}")
        return EXIT_OK
    what = ("these" if args.ids else "all") + (" dead letters" if args.dead else " items")
    if not args.yes:
        if not sys.stdin.isatty():
            raise _UsageError(f"outbox {args.action} {what}: confirm with --yes", EXIT_USAGE)
        if input(f"{args.action} {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing done")
            return EXIT_OK
    store = _config_state(config)
    try:
        ids = args.ids or None
        if args.action == "retry":
            n = store.outbox_retry(ids)
        else:
            n = store.outbox_drop(ids, dead=args.dead)
        for owner in store.daemons():
            _wake_owner(owner)                  # the publisher looks again now
    finally:
        store.close()
    print(f"outbox {args.action}: {n} {'item' if n == 1 else 'items'}")
    return EXIT_OK


def _await_command(store: StateStore, owner: str, seq: int, budget: float
                   ) -> tuple[bool, str | None]:
    """Wake the daemon that owns a queued command and wait for its result."""
    _wake_owner(owner)      # a JetStream daemon elsewhere sees the put itself
    deadline = time.monotonic() + budget
    pause = 0.002
    while True:
        done, result = store.command_result(seq)
        if done or time.monotonic() >= deadline:
            return done, result
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _tick_through_daemon(config: DaemonConfig, job: str) -> int | None:
    """When a daemon holds ``job``, ask it to tick the job and print the outcome.

    The daemon holds the job's lease, so it must be the one to tick; None
    means no daemon holds it and the caller ticks the job itself.
    """
    store = _config_state(config)
    try:
        outcome = _daemon_tick(store, config, job)
    finally:
        store.close()
    if outcome is None:
        return None
    print(json.dumps(outcome, indent=2))
    return _tick_exit(outcome)


def _tick_exit(outcome: Mapping[str, Any]) -> int:
    return EXIT_OK if outcome.get("outcome") == "ok" else (
        EXIT_BUSY if outcome.get("outcome") in ("busy", "leased") else EXIT_TICK_FAILED)


def _daemon_tick(store: StateStore, config: DaemonConfig, job: str,
                 scheduled_at: float | None = None) -> dict | None:
    """Ask the daemon holding ``job`` to tick it (standing for the slot at
    ``scheduled_at``: a backfill's) and wait for the outcome, as a dict with
    ``via``; None when no daemon holds the job."""
    jc = next(j for j in config.jobs if j.id == job)
    owner, seq = store.command(job, "tick", paused_on_boot=jc.paused_on_boot,
                               arg=None if scheduled_at is None else repr(scheduled_at))
    if seq is None:
        return None
    budget = _tick_budget(jc.kind, config.plugins, jc.overrides.get("timeout_secs")) + 15
    done, result = _await_command(store, owner, seq, budget)
    if not done:
        raise _UsageError(f"the running daemon ({owner}) did not tick {job!r} within "
                          f"{budget:g}s", EXIT_BUSY)
    try:
        outcome = json.loads(result) if result else {"job": job, "outcome": None}
    except ValueError:                  # an older daemon's result, cut short
        outcome = None
    if not isinstance(outcome, dict):
        outcome = {"job": job, "outcome": None, "error": f"unreadable result: {result[:200]}"}
    outcome["via"] = f"daemon {owner}"
    return outcome


_BACKFILL_MAX_SLOTS = 10_000


def _when_arg(text: str, what: str) -> float:
    """An instant on the command line: epoch seconds, or ISO 8601 (UTC when
    it has no offset)."""
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _UsageError(f"{what} {text!r} is neither epoch seconds nor ISO 8601 "
                              "(2026-05-17T10:00:00Z)", EXIT_USAGE) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    if not math.isfinite(value):
        raise _UsageError(f"{what} {text!r} is not a time", EXIT_USAGE)
    return value


def _backfill_local(config: DaemonConfig, args) -> int:
    """``backfill JOB --from T1 --to T2 [--yes]``: the job's slots in that
    range, listed; with ``--yes`` each run in order as a real tick (through
    the daemon holding the job when one runs), the live schedule untouched."""
    jc = next(j for j in config.jobs if j.id == args.job)
    start, end = _when_arg(args.start, "--from"), _when_arg(args.end, "--to")
    try:
        slots = jc.schedule.slots_in(start, end, _BACKFILL_MAX_SLOTS)
    except InputError as exc:
        raise _UsageError(f"backfill {jc.id}: {exc}", EXIT_USAGE) from None
    print(f"backfill {jc.id}: {len(slots)} slot(s) from {_iso(start)} to {_iso(end)}")
    for slot in slots:
        print(f"  {_iso(slot)}")
    if not args.yes:
        print("dry run: nothing ran (--yes runs these slots, in order)")
        return EXIT_OK
    _refuse_if_daemon_elsewhere(args.config, config)
    return _run_backfill(config, jc, slots)


def _daemon_tick_when_free(store: StateStore, config: DaemonConfig, jc: JobConfig,
                           slot: float) -> dict | None:
    """``_daemon_tick`` for a backfill's slot, asked again while the daemon
    is busy with the job (its previous tick committed, its effects not yet
    carried out; or a scheduled tick), for at most the job's tick budget."""
    deadline = time.monotonic() + _tick_budget(jc.kind, config.plugins,
                                               jc.overrides.get("timeout_secs"))
    while True:
        outcome = _daemon_tick(store, config, jc.id, slot)
        if outcome is None or outcome.get("outcome") != "busy" \
                or time.monotonic() >= deadline:
            return outcome
        time.sleep(0.05)


def _run_backfill(config: DaemonConfig, jc: JobConfig, slots: list[float]) -> int:
    """Tick ``jc`` once per slot, in order, each committed as usual; stop
    at the first permanent (or config) error, or a job busy elsewhere."""
    store, runner, failed = _config_state(config), None, 0
    try:
        for i, slot in enumerate(slots):
            outcome = None if runner is not None else _daemon_tick_when_free(store, config,
                                                                             jc, slot)
            if outcome is None:
                if runner is None:          # no daemon holds it: this process ticks
                    handle = _plugin_for(jc.kind, config.plugins)
                    runner = Runner(dataclasses.replace(config, jobs=[jc],
                                                        plugins=[handle] if handle else []))
                outcome = runner.run_once(jc.id, slot).to_dict()
            status, error = outcome.get("outcome"), outcome.get("error")
            print(f"{_iso(slot)}  {status}" + (f"  {error}" if error else ""))
            if status in ("permanent", "config", "busy", "leased", None):
                print(f"backfill {jc.id}: stopped at {_iso(slot)} ({status} error); "
                      f"{len(slots) - i - 1} later slot(s) not run", file=sys.stderr)
                return EXIT_BUSY if status in ("busy", "leased") else EXIT_TICK_FAILED
            failed += status != "ok"
    finally:
        if runner is not None:
            runner.stop()
        store.close()
    print(f"backfill {jc.id}: {len(slots)} slot(s) run, {failed} failed")
    return EXIT_OK if not failed else EXIT_TICK_FAILED


EXIT_TICK_PERMANENT = 8   # tick --dry-run: the tick failed permanently
EXIT_TICK_CONFIG = 9      # tick --dry-run: the job's configuration (or entrypoint) is wrong
_DRY_RUN_EXITS = {"ok": EXIT_OK, "permanent": EXIT_TICK_PERMANENT, "config": EXIT_TICK_CONFIG}


def _check_metrics_addr(config: DaemonConfig) -> None:
    """A busy ``metrics_addr`` is said before any plugin starts."""
    if not config.metrics_addr:
        return
    host, port = config.metrics_addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise _UsageError(f"metrics_addr: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}", EXIT_USAGE) from None


def _cursor_from_args(b64: str | None, text: str | None, what: str) -> bytes | None:
    """A cursor given on the command line as base64 or as text (None: neither)."""
    if text is not None:
        return text.encode("utf-8", "surrogateescape")
    if b64 is None:
        return None
    try:
        return decode_cursor(b64)
    except PluginPollerForwardError:        # a bad argument, not a broker's reply
        shown = b64 if len(b64) <= 40 else b64[:37] + "..."
        raise _UsageError(f"{what} {shown!r}: not URL-safe base64 (give text with "
                          f"{what}-text)", EXIT_USAGE) from None


def _read_state(config: DaemonConfig) -> StateStore | None:
    """The config's state opened read only; None where nothing has run yet
    (no file is created, no bucket either)."""
    try:
        return _config_state(config, readonly=True)
    except _NoStateYet:
        return None


def _stored_state(config: DaemonConfig, job: str, history: bool = False
                  ) -> tuple[JobState | None, list[CursorChange]]:
    """A job's committed state (None: no state yet), and its cursor history
    when asked for: a backend without one says so then, and only then."""
    if history and not _state_backend(config.state_db).supports("cursor_history"):
        raise _UsageError(_no_history(config.state_db), EXIT_USAGE)
    store = _read_state(config)
    if store is None:
        return None, []
    try:
        return store.load([job]).get(job), store.cursor_history(job) if history else []
    finally:
        store.close()


class _DryState(StateStore):
    """What ``tick --dry-run`` gives its Runner: the committed states, read
    once, and no way to store anything (no file is created either)."""

    def __init__(self, states: Mapping[str, JobState]):
        self.owner = _new_owner("dry-run")
        self.location = "(dry run)"
        self._states = dict(states)

    def load(self, ids: Iterable[str] | None = None) -> dict[str, JobState]:
        return {i: s for i, s in self._states.items() if ids is None or i in set(ids)}

    def release(self, ids: Iterable[str] | None = None) -> None:
        pass

    def unregister_daemon(self) -> None:
        pass

    def set_deadline(self, deadline: float | None) -> None:
        pass

    def close(self, deadline: float | None = None) -> None:
        pass


class _PluginOutput(logging.Handler):
    """Collects one plugin's output lines from the log while a dry run ticks."""

    def __init__(self, plugin_id: str | None):
        super().__init__(logging.DEBUG)
        self.name_, self.lines = _log_safe(plugin_id or ""), []

    def emit(self, record: logging.LogRecord) -> None:
        said = getattr(record, _PLUGIN_LINE, None)      # (plugin id, line)
        if said is not None and said[0] == self.name_:
            self.lines.append(said[1])


def _dry_run_verb(config: DaemonConfig, args) -> int:
    """``tick JOB --dry-run``: one tick through the job's route; nothing stored."""
    job = args.job
    cursor = _cursor_from_args(args.cursor, args.cursor_text, "--cursor")
    state, _ = _stored_state(config, job)
    given = args.cursor is not None or args.cursor_text is not None
    if not given:
        cursor = state.cursor if state else None
    kind = next(j.kind for j in config.jobs if j.id == job)
    handle = _plugin_for(kind, config.plugins)
    runner = Runner(dataclasses.replace(     # start only what this one tick needs, on a
        config, jobs=[j for j in config.jobs if j.id == job],   # broker of its own beside
        plugins=[handle] if handle else [],                      # a running daemon's
        broker=config.broker if _is_nats(config.broker) else None),
        state=_DryState({job: state} if state else {}))
    sent: list[TickRequest] = []
    output = _PluginOutput(handle.plugin_id if handle else None)
    level = log.level
    log.addHandler(output)
    log.setLevel(logging.DEBUG)              # an ephemeral plugin's stderr is a debug line
    try:
        outcome = runner.dry_run(job, cursor, on_request=sent.append)
    finally:
        runner.stop()                        # a long-lived plugin's last lines come first
        log.removeHandler(output)
        log.setLevel(level)
    ack = outcome.ack
    m = ack.metrics if ack and ack.metrics else TickMetrics()
    doc = {"dry_run": True, "job": job, "kind": kind, "outcome": outcome.status.value,
           "error": outcome.error, "duration_ms": round(outcome.duration * 1000, 3),
           "request": sent[0].to_dict() if sent else None,
           "reply": TickReply.from_ack(ack).to_dict() if ack else None,
           "from_cursor": _cursor_view(cursor),
           "next_cursor": _cursor_view(ack.next_cursor) if ack and ack.next_cursor is not None
           else None,
           "deliveries": [d.to_dict() for d in (ack.deliver if ack else ())],
           "metrics": dataclasses.asdict(m), "stderr": output.lines,
           "stored": False}
    # what the plugin got, with each resolved secret shown as its placeholder
    print(json.dumps(_hide_secrets(doc, config.secrets), indent=2, ensure_ascii=False))
    return _DRY_RUN_EXITS.get(outcome.status.value, EXIT_TICK_FAILED)


def _cursor_verb(config: DaemonConfig, args) -> int:
    """``cursor JOB [--history] [--set B64 | --set-text TEXT | --rollback N] [--yes]``."""
    job = args.job
    given = _cursor_from_args(args.set, args.set_text, "--set")
    state, history = _stored_state(config, job, args.history or args.rollback is not None)
    cursor = state.cursor if state else None
    changing = args.set is not None or args.set_text is not None or args.rollback is not None
    if not changing:
        if args.history:
            rows = [dict(_cursor_view(c.cursor), at=_iso(c.at), source=c.source)
                    for c in history]
            if args.json:
                print(json.dumps(rows, indent=2, ensure_ascii=False))
                return EXIT_OK
            print(f"{len(rows)} committed cursor{'s' if len(rows) != 1 else ''} of {job}, "
                  "newest first")
            now = time.time()
            for i, c in enumerate(history):
                print(f"{i:>3}  {_iso(c.at)}  {_relative(_iso(c.at), now):<9} "
                      f"{c.source:<12} {_cursor_line(c.cursor)}")
            return EXIT_OK
        if args.json:
            print(json.dumps(dict(_cursor_view(cursor), job=job), ensure_ascii=False))
        else:
            print(f"{job}: {_cursor_line(cursor)}" + ("" if state else "  (no state yet)"))
        return EXIT_OK
    if args.rollback is not None:
        n = args.rollback
        if n < 1 or n >= len(history):
            raise _UsageError(f"cursor {job} --rollback {n}: the history holds "
                              f"{len(history)} cursors; N must be 1..{len(history) - 1} "
                              "(see `cursor JOB --history`)", EXIT_USAGE)
        new, source = history[n].cursor, f"rollback {n}"
    else:
        new, source = given, "set"
    if not args.yes:
        if not sys.stdin.isatty():
            raise _UsageError(f"cursor {job}: confirm with --yes (no terminal to ask on)",
                              EXIT_USAGE)
        print(f"{job}: now  {_cursor_line(cursor)}\n{' ' * len(job)}  new  {_cursor_line(new)}")
        if input("set it? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing done")
            return EXIT_OK
    store = _config_state(config)
    try:
        jc = next(j for j in config.jobs if j.id == job)
        owner, seq = store.command(job, "cursor", paused_on_boot=jc.paused_on_boot,
                                   arg=cursor_command_arg(new, source))
        how = "done"
        if seq is not None:
            done, _ = _await_command(store, owner, seq, 10.0)
            how = (f"done (applied by daemon {owner})" if done else
                   f"queued for daemon {owner}, which applies it next")
    finally:
        store.close()
    print(f"cursor {job}: {source}: {_cursor_line(new)}: {how}")
    return EXIT_OK


def _print_status(config: DaemonConfig, as_json: bool, job: str | None = None) -> int:
    """Every job's state, or ``job``'s with its policy; read only: ``status``
    never creates a state file."""
    note, states, daemons, undelivered, holders = None, {}, {}, {}, {}
    store = _read_state(config)
    if store is None:
        note = f"no state yet at {config.state_db} (no daemon has run with this config)"
    else:
        try:
            states, daemons = store.load(), store.daemons()
            holders = store.holders(time.time())
            undelivered = {job: n for job, (n, _) in store.outbox_counts().items()}
        finally:
            store.close()
    running = set().union(*daemons.values()) if daemons else set()
    memo: dict = {}
    out = [_status_dict(jc, states.get(jc.id) or JobState(jc.id, paused=jc.paused_on_boot),
                        config, jc.id in running, undelivered=undelivered.get(jc.id, 0),
                        holder=holders.get(jc.id), memo=memo)
           for jc in config.jobs if job is None or jc.id == job]
    for row in out:                     # as the admin API's job objects have it
        row["cursor_text"] = _cursor_text(row["cursor"])
    if as_json:
        print(json.dumps(out[0] if job else out, indent=2))
        return EXIT_OK
    if note:
        print(note)
    print(_daemons_line({"daemons": [{"owner": o, "holds": [j for j, h in holders.items()
                                                            if h == o]}
                                     for o in sorted(daemons)]}))
    _print_status_table(out, config.enabled)
    _print_job_policy(out, job)
    return EXIT_OK


def _print_job_policy(rows: list[dict], job: str | None) -> None:
    """``status JOB``: under its row, the job's effective policy and sources."""
    if job is not None and rows and isinstance(rows[0].get("policy"), dict):
        print(f"policy of {job}:")
        _print_policy(rows[0]["policy"])


def _print_status_table(out: list[dict], enabled: bool = True) -> None:
    now = time.time()
    held = max([len("HELD BY")] + [len(s.get("holder") or "-") for s in out])
    print(f"{'JOB':<24} {'KIND':<16} {'STATE':<8} {'LAST':<10} {'LAST RUN':<9} {'ERRS':>4} "
          f"{'UNDELIV':>7}  {'NEXT RUN':<9} {'HELD BY':<{held}} ERROR")
    for s in out:
        state = "disabled" if not enabled else _job_status(s)
        state = state if state in ("disabled", "running", "paused", "breaker") else "active"
        print(f"{s['id']:<24} {s['kind']:<16} {state:<8} {s['last_status'] or '-':<10} "
              f"{_relative(s['last_run_at'], now):<9} {s['consecutive_errors']:>4} "
              f"{s['undelivered']:>7}  {_relative(s['next_run_at'], now):<9} "
              f"{s.get('holder') or '-':<{held}} {_error_cell(s['last_error'])}")
    for s in out:                           # who paused, when, why: until resume
        p = s.get("pause")
        if p:
            print(f"{s['id']}: paused by {_log_safe(p['by'] or '(unknown)')} at {p['at']} "
                  f"({_relative(p['at'], now)})"
                  + (f": {_log_safe(p['note'])}" if p["note"] else ""))


def _admin_call(url: str, method: str, path: str, token: str | None,
                timeout: float, body: bytes | None = None) -> tuple[int, Any]:
    """One request to a daemon's admin API (no redirects, no proxies: the
    token goes only where it was told to)."""
    import http.client
    from urllib.parse import quote, urlsplit
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _UsageError(f"--admin {url!r}: expected http://host:port or https://host:port",
                          EXIT_USAGE)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn = cls(parts.hostname, parts.port, timeout=timeout)
        try:
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, parts.path.rstrip("/") + quote(path), body=body,
                         headers=headers)
            resp = conn.getresponse()
            body = resp.read(1 << 24)
        finally:
            conn.close()
        return resp.status, json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _UsageError(f"admin API at {url}: {exc}", EXIT_ADMIN) from None


def _admin_cursor(args, token: str | None) -> int:
    """``cursor JOB [--history] [--set B64 | --set-text TEXT]`` through the admin API."""
    job = args.job
    if args.rollback is not None:
        raise _UsageError("cursor --rollback works on a local state only; with --admin, "
                          "read --history and --set the cursor you want", EXIT_USAGE)
    body = None
    _cursor_from_args(args.set, None, "--set")      # a bad argument is said here, exit 2
    if args.set is not None or args.set_text is not None:
        if not args.yes:
            raise _UsageError(f"cursor {job}: confirm with --yes", EXIT_USAGE)
        body = json.dumps({"set_text": args.set_text} if args.set_text is not None
                          else {"set": args.set}).encode()
    code, doc = _admin_call(args.admin, "POST" if body else "GET",
                            f"/admin/pollers/{job}/cursor", token, 60, body)
    error = doc.get("error") if isinstance(doc, dict) else None
    if code != 200 or not isinstance(doc, dict):
        raise _UsageError(f"admin API at {args.admin}: HTTP {code}: {error or doc!r}",
                          EXIT_UNKNOWN_JOB if code == 404 else EXIT_ADMIN)
    if args.history and not doc.get("history_kept", True):
        raise _UsageError(f"admin API at {args.admin}: "
                          + _no_history("the daemon's state"), EXIT_USAGE)
    if args.json:
        print(json.dumps(doc["history"] if args.history else doc, indent=2, ensure_ascii=False))
    elif args.history:
        for i, h in enumerate(doc["history"]):
            print(f"{i:>3}  {h['at']}  {h['source']:<16} "
                  f"{_cursor_line(_admin_cursor_bytes(h['cursor']))}")
    else:
        print(f"{job}: {_cursor_line(_admin_cursor_bytes(doc['cursor']))}"
              + (" (set)" if body else ""))
    return EXIT_OK


def _history_local(config: DaemonConfig, args) -> int:
    """``history JOB [--limit N] [--json]``: the job's run history, read only."""
    limit, store = _history_limit(args), _read_state(config)
    if store is None:
        return _print_runs(args.job, [], args.json)
    try:
        runs = store.run_history(args.job, limit)
    finally:
        store.close()
    return _print_runs(args.job, [run.to_dict() for run in runs], args.json)


def _history_remote(args, token: str | None) -> int:
    limit = _history_limit(args)
    code, doc = _admin_call(args.admin, "GET", f"/admin/pollers/{args.job}/runs", token, 60)
    error = _admin_error(args, code, doc)
    if code != 200 or not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise _UsageError(f"admin API at {args.admin}: HTTP {code}: {error or doc!r}",
                          EXIT_ADMIN)
    return _print_runs(args.job, doc["runs"][:limit], args.json)


def _history_limit(args) -> int | None:
    try:
        return _runs_limit(args.limit)
    except InputError as exc:
        raise _UsageError(f"--limit: {exc}", EXIT_USAGE) from None


def _print_runs(job: str, runs: list[dict], as_json: bool) -> int:
    """Runs (``RunRecord.to_dict``), newest first, as JSON or one line each."""
    if as_json:
        print(json.dumps(runs, indent=2, ensure_ascii=False))
        return EXIT_OK
    cursor = lambda c: "-" if not c else (json.dumps(c["text"], ensure_ascii=False)  # noqa: E731
                                          if "text" in c else f"{c['bytes']}B")
    print(f"{len(runs)} run{'s' if len(runs) != 1 else ''} of {job}, newest first")
    for r in runs:
        print(f"{r['started_at']}  {r['trigger']:<8} {r['outcome']:<9} "
              f"{r['duration_ms']:>9.1f} ms  seen {r['items_seen']:>4}  sent "
              f"{r['items_dispatched']:>4}  cursor {cursor(r['cursor_before'])} -> "
              f"{cursor(r['cursor_after'])}  {_error_cell(r['error'])}")
    return EXIT_OK


def _admin_cursor_bytes(b64: str | None) -> bytes | None:
    """A cursor as the admin API sends it (base64, null: none) back to bytes."""
    try:
        return None if b64 is None else decode_cursor(b64)
    except PluginPollerForwardError as exc:
        raise _UsageError(f"admin API: {exc}", EXIT_ADMIN) from None


def _through_admin(verb: "_Verb", args) -> int:
    """A verb through a daemon's admin API (``--admin URL``)."""
    try:
        token = _admin_token(args.admin_token_file)
    except InputError as exc:
        raise _UsageError(f"--admin-token-file: {exc}", EXIT_USAGE) from None
    return verb.remote(args, token)


def _admin_error(args, code: int, doc: Any) -> str | None:
    """Raise for the answers every verb reads alike (refused, no such job,
    state unusable); else the ``error`` the answer carries."""
    error = doc.get("error") if isinstance(doc, dict) else None
    if code in (401, 403):
        raise _UsageError(f"admin API at {args.admin} refused: {error}", EXIT_ADMIN)
    if code == 404:
        raise _UsageError(f"admin API at {args.admin}: {error}", EXIT_UNKNOWN_JOB)
    if code == 503:
        raise _UsageError(f"admin API at {args.admin}: {error}", EXIT_STATE)
    return error


def _status_remote(args, token: str | None) -> int:
    code, doc = _admin_call(args.admin, "GET", "/admin/pollers", token, 30)
    error = _admin_error(args, code, doc)
    if code != 200 or not isinstance(doc, list):
        raise _UsageError(f"admin API at {args.admin}: HTTP {code}: {error or doc!r}",
                          EXIT_ADMIN)
    if args.job is not None:
        doc = [row for row in doc if isinstance(row, dict) and row.get("id") == args.job]
        if not doc:
            raise _UsageError(f"no job {args.job!r} in the daemon at {args.admin}",
                              EXIT_UNKNOWN_JOB)
    if args.json:
        print(json.dumps(doc[0] if args.job else doc, indent=2))
        return EXIT_OK
    code, daemons = _admin_call(args.admin, "GET", "/admin/daemons", token, 30)
    if code == 200 and isinstance(daemons, dict):
        print(_daemons_line(daemons) + f"; asked through the admin API at {args.admin}")
    else:                                   # a daemon from before the route
        print(f"daemon: admin API at {args.admin}")
    _print_status_table(doc)
    _print_job_policy(doc, args.job)
    return EXIT_OK


def _tick_remote(args, token: str | None) -> int:
    code, doc = _admin_call(args.admin, "POST", f"/admin/pollers/{args.job}/run", token, 600)
    error = _admin_error(args, code, doc)
    if isinstance(doc, dict) and isinstance(doc.get("outcome"), dict):
        outcome = doc["outcome"] | {"via": f"admin API {args.admin}"}
        print(json.dumps(outcome, indent=2))
        return EXIT_OK if code == 200 else EXIT_BUSY if code == 409 else EXIT_TICK_FAILED
    raise _UsageError(f"admin API at {args.admin}: HTTP {code}: {error or doc!r}", EXIT_ADMIN)


def _command_remote(args, token: str | None) -> int:
    verb, job = args.verb, args.job
    body = None if _pause_arg(args) is None else json.dumps(      # checked here first
        {k: v for k, v in (("note", args.note), ("by", _operator_name())) if v is not None}
    ).encode()
    code, doc = _admin_call(args.admin, "POST", f"/admin/pollers/{job}/{verb}", token, 600,
                            body)
    error = _admin_error(args, code, doc)
    if code == 200 and isinstance(doc, dict) and doc.get("ok"):
        print(f"{verb} {job}: done (admin API at {args.admin})")
        return EXIT_OK
    raise _UsageError(f"admin API at {args.admin}: HTTP {code}: {error or doc!r}", EXIT_ADMIN)


_ERROR_CELL_CHARS = 60


def _error_cell(error: str | None) -> str:
    """A stored error for one table cell: one line, its end (where a plugin's
    last stderr line and the exception are) when too long."""
    if not error:
        return "-"
    text = " ".join(error.split())
    return text if len(text) <= _ERROR_CELL_CHARS else "…" + text[-(_ERROR_CELL_CHARS - 1):]


def _print_next(config: DaemonConfig, job: str, n: int, as_json: bool) -> int:
    """``status JOB --next N``: the next N fire times of a job's schedule."""
    jc = next(j for j in config.jobs if j.id == job)
    now = time.time()
    times = _fire_times(jc.schedule, now, n)
    if as_json:
        print(json.dumps([_iso(t) for t in times]))
        return EXIT_OK
    for t in times:
        print(f"{_iso(t)}  ({_relative(_iso(t), now)})")
    if len(times) < n:
        print(f"(the schedule of {job} fires no more after that)")
    return EXIT_OK


# -- the verbs: one entry each holds its help, arguments, local and remote run --------

def _job_arg(p) -> None:
    p.add_argument("job")


def _pause_args(p) -> None:
    p.add_argument("job")
    p.add_argument("--note", metavar="TEXT", help="why (kept with who and when, shown by "
                   f"status until resume; at most {PAUSE_NOTE_MAX_CHARS} characters)")


def _status_args(p) -> None:
    p.add_argument("job", nargs="?", help="show only this job, with its effective policy "
                   "(timeout, backoff, breaker, alert cooldown, jitter, catch-up) and their sources; "
                   "with --next: the job whose schedule to show")
    p.add_argument("--json", action="store_true", help="print JSON (times in ISO 8601)")
    p.add_argument("--next", type=int, metavar="N",
                   help="list the next N fire times of JOB's schedule")


def _tick_args(p) -> None:
    p.add_argument("job")
    p.add_argument("--dry-run", action="store_true",
                   help="run one tick and store nothing; print the request, the reply, "
                        "deliveries, metrics, duration and the plugin's stderr")
    p.add_argument("--cursor", metavar="B64", help="--dry-run: start from this cursor "
                   "(URL-safe base64, as `status` shows it)")
    p.add_argument("--cursor-text", metavar="TEXT", help="--dry-run: start from this "
                   "cursor given as UTF-8 text")


def _backfill_args(p) -> None:
    p.add_argument("job")
    p.add_argument("--from", dest="start", required=True, metavar="T1",
                   help="the first instant (ISO 8601, UTC without an offset, or epoch seconds)")
    p.add_argument("--to", dest="end", required=True, metavar="T2",
                   help="the last instant (included)")
    p.add_argument("--yes", action="store_true",
                   help="run the slots (without it: list them, run nothing)")


def _cursor_args(p) -> None:
    p.add_argument("job")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--history", action="store_true",
                   help=f"the last committed cursors (up to {CURSOR_HISTORY_KEEP}), newest first")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--set", metavar="B64", help="set the cursor (URL-safe base64)")
    how.add_argument("--set-text", metavar="TEXT", help="set the cursor to this UTF-8 text")
    how.add_argument("--rollback", type=int, metavar="N",
                     help="go back N committed cursors in the history")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _history_args(p) -> None:
    p.add_argument("job")
    p.add_argument("--limit", metavar="N", help="only the newest N runs (default: every run "
                   f"kept, the newest {RUN_HISTORY_KEEP} unless run_history says otherwise)")
    p.add_argument("--json", action="store_true", help="print a JSON array (times in ISO 8601)")


def _outbox_args(p) -> None:
    p.add_argument("action", nargs="?", default="list", choices=["list", "retry", "drop"])
    p.add_argument("ids", nargs="*", metavar="ID", help="event ids (default: all)")
    p.add_argument("--dead", action="store_true", help="the dead letters instead")
    p.add_argument("--json", action="store_true", help="list as a JSON array")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _migrate_args(p) -> None:
    p.add_argument("--to", metavar="PATH|jetstream://BUCKET",
                   help="the state to copy into: a sqlite file or a JetStream bucket "
                        "(with --from-nexo: default the config's state_db)")
    p.add_argument("--from-nexo", metavar="PATH", help="import a stopped nexo daemon's "
                   "poller.db (read only) instead of copying the config's state")
    p.add_argument("--broker", metavar="nats://HOST:4222",
                   help="the NATS server of a jetstream:// target (default: the config's "
                        "broker)")


@dataclasses.dataclass(frozen=True)
class _Verb:
    """One CLI verb: its help, its arguments, how it runs on the
    configuration (``local(config, args)``) and through a daemon's admin API
    (``remote(args, token)``; None: ``--admin`` does not apply); each
    returns the exit code."""
    name: str
    help: str
    args: Callable[[Any], None]
    local: Callable[[DaemonConfig, Any], int]
    remote: Callable[[Any, str | None], int] | None = None
    reads_file: bool = False        # local gets no config: it reads --config itself


def _convert_config(_config: None, args) -> int:
    """``convert-config FILE``: nexo's YAML config as pollers.json on stdout,
    each change on stderr."""
    text, changes = _convert_nexo_config(args.config)
    for line in changes:
        print(f"convert-config: {line}", file=sys.stderr)
    out = getattr(sys.stdout, "buffer", None)       # UTF-8 whatever the locale
    if out is None:
        sys.stdout.write(text)
    else:
        sys.stdout.flush()
        out.write(text.encode("utf-8"))
    sys.stdout.flush()
    return EXIT_OK


def _convert_args(p) -> None:
    p.add_argument("config", metavar="FILE", help="nexo's pollers.yaml (what --config names)")


_VERBS = {v.name: v for v in (
    _Verb("run", "run the daemon in the foreground (the default verb)",
          lambda p: None, _run_local),
    _Verb("validate", "check the config, every manifest and every plugin entrypoint; "
          "report every problem at once; --policy: each job's effective policy",
          _validate_args, _validate_local),
    _Verb("status", "show every job's state (read only), one job's with its policy, or a "
          "job's next fire times (--next N)", _status_args, _status_local, _status_remote),
    _Verb("tick", "tick a job now and store the outcome; --dry-run stores nothing",
          _tick_args, _tick_local, _tick_remote),
    _Verb("pause", "pause a job (through the daemon holding it, if one runs); --note: why",
          _pause_args, _command_local, _command_remote),
    _Verb("resume", "resume a paused job, clearing its error count",
          _job_arg, _command_local, _command_remote),
    _Verb("reset", "clear a job's cursor: its next tick starts from scratch",
          _job_arg, _command_local, _command_remote),
    _Verb("backfill", "list a job's slots from --from to --to; --yes runs each in order as "
          "a real tick (through the daemon holding the job, if one runs), the live schedule "
          "untouched, stopping at the first permanent error", _backfill_args, _backfill_local),
    _Verb("cursor", "show a job's cursor, its history, or set it (--set, --set-text, "
          "--rollback)", _cursor_args, _cursor_local, _admin_cursor),
    _Verb("history", "show a job's last runs, newest first: when, outcome, duration, error, "
          "items, cursor before and after", _history_args, _history_local, _history_remote),
    _Verb("outbox", "list, retry or drop undelivered deliveries and alerts",
          _outbox_args, _outbox_verb),
    _Verb("migrate-state", "copy a stopped daemon's state (cursors, pause states, "
          "counters, outbox) into another state, of either backend, or import a stopped "
          "nexo daemon's poller.db (--from-nexo); jobs already there are left alone",
          _migrate_args, _migrate_state),
    _Verb("convert-config", "print nexo's pollers.yaml as the pollers.json that fires the "
          "same (cron as Vixie, placeholders kept); each change on stderr",
          _convert_args, _convert_config, reads_file=True),
)}


if __name__ == "__main__":
    sys.exit(main())
