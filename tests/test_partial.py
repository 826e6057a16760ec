"""Partial progress (issue 25 item 3): a failed tick may carry the cursor
it reached and the items it fetched (``PollerError.Transient/Permanent(...,
next_cursor=, deliver=)``; on the wire the error's ``data.next_cursor`` and
``data.deliver``, a TickReply's shapes).  They are committed with the error,
in the same transaction, and the error policy applies as before.  Every
lifecycle: tests/test_conformance_lifecycle.py."""

import os
import random
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as tests.x or x
from support import FakePoller  # noqa: E402
from test_runner import T0, RunnerCase  # noqa: E402

import nexo_poller as nx  # noqa: E402
from nexo_poller import (DaemonConfig, Delivery, JobState, PollerError, Schedule,  # noqa: E402
                         TickAck, TickOutcome, plan_tick)

ITEM = Delivery("telegram", "42", {"text": "item 1"})


class _NoJitter(random.Random):
    def uniform(self, a, b):
        return a


class ErrorTests(unittest.TestCase):

    def test_transient_and_permanent_carry_partial_progress(self):
        t = PollerError.Transient("boom", retry_after=5, next_cursor=b"c1", deliver=[ITEM])
        self.assertEqual((t.next_cursor, t.deliver, t.retry_after), (b"c1", (ITEM,), 5))
        p = PollerError.Permanent("gone", next_cursor=bytearray(b"c2"))
        self.assertEqual((p.next_cursor, p.deliver), (b"c2", ()))
        plain = PollerError.Config("j", "bad")
        self.assertEqual((plain.next_cursor, plain.deliver), (None, ()))

    def test_bad_types_are_type_errors_naming_the_argument(self):
        with self.assertRaisesRegex(TypeError, "Transient: next_cursor must be bytes"):
            PollerError.Transient("x", next_cursor="c1")
        with self.assertRaisesRegex(TypeError, "Permanent: deliver must be a list of Delivery"):
            PollerError.Permanent("x", deliver={"channel": "t"})


class WireTests(unittest.TestCase):

    def envelope(self, code, data):
        return {"jsonrpc": "2.0", "id": 1,
                "error": {"code": code, "message": "failed", "data": data}}

    def test_an_error_reply_reads_next_cursor_and_deliver_from_its_data(self):
        data = {"retry_after_secs": 9, "next_cursor": "YzE",
                "deliver": [ITEM.to_dict()]}
        with self.assertRaises(PollerError.Transient) as cm:
            nx._parse_reply_envelope(self.envelope(nx.ERROR_TRANSIENT, data), "j")
        e = cm.exception
        self.assertEqual((e.next_cursor, e.deliver, e.retry_after), (b"c1", (ITEM,), 9))
        with self.assertRaises(PollerError.Permanent) as cm:
            nx._parse_reply_envelope(self.envelope(nx.ERROR_PERMANENT, data), "j")
        self.assertEqual(cm.exception.next_cursor, b"c1")

    def test_malformed_partial_progress_is_dropped_as_a_whole_and_said(self):
        for data in ({"next_cursor": "!!not_b64!!", "deliver": [ITEM.to_dict()]},
                     {"next_cursor": "YzE", "deliver": [{"channel": "t"}]},
                     {"next_cursor": 5}):
            with self.subTest(data=data):
                with self.assertRaises(PollerError.Transient) as cm:
                    nx._parse_reply_envelope(self.envelope(nx.ERROR_TRANSIENT, data), "j")
                e = cm.exception
                self.assertEqual((e.next_cursor, e.deliver), (None, ()))
                self.assertIn("(partial progress ignored: ", str(e))

    def test_the_sdk_sends_it_as_the_errors_data(self):
        def handler(ctx):
            raise PollerError.Transient("rate limited", retry_after=3, next_cursor=b"c1",
                                        deliver=[ITEM])
        params = {"kind": "k", "job_id": "j", "agent_id": "a", "cursor": None, "config": {},
                  "now": "2026-05-17T10:00:00+00:00", "interval_hint_secs": 60}
        answer = nx._plugin_dispatch({"k": handler}, {"jsonrpc": "2.0", "id": 1,
                                                      "method": "poll_tick", "params": params})
        self.assertEqual(answer["error"], {
            "code": nx.ERROR_TRANSIENT, "message": "rate limited",
            "data": {"retry_after_secs": 3, "next_cursor": "YzE", "deliver": [ITEM.to_dict()]}})

        def bad(ctx):
            raise PollerError.Permanent("gone", next_cursor=b"c1", deliver=["not a delivery"])
        answer = nx._plugin_dispatch({"k": bad}, {"jsonrpc": "2.0", "id": 2,
                                                  "method": "poll_tick", "params": params})
        self.assertEqual(answer["error"]["code"], nx.ERROR_PERMANENT)
        self.assertNotIn("data", answer["error"], "nothing half sent")
        self.assertIn("partial progress dropped: TickAck.deliver holds Delivery items",
                      answer["error"]["message"])


class PlanTests(unittest.TestCase):

    def plan(self, status, ack, state=None):
        cfg = DaemonConfig(default_jitter_ms=0)
        state = state or JobState("a", cursor=b"c0", consecutive_errors=1)
        outcome = TickOutcome("a", "mem", status, error="boom", ack=ack)
        return plan_tick(state, outcome, schedule=Schedule(every_secs=60), slot=T0,
                         started=T0, finished=T0, config=cfg, rng=_NoJitter())

    def test_an_errors_cursor_is_committed_and_the_policy_is_unchanged(self):
        p = self.plan("transient", TickAck(b"c1", deliver=(ITEM,)))
        self.assertEqual((p.state.cursor, p.state.consecutive_errors), (b"c1", 2))
        self.assertEqual(p.run_at, T0 + 60, "the backoff of a second error")
        p = self.plan("permanent", TickAck(b"c1"))
        self.assertEqual((p.state.cursor, p.state.paused), (b"c1", True))
        p = self.plan("transient", TickAck(deliver=(ITEM,)))
        self.assertEqual(p.state.cursor, b"c0", "no cursor given: the stored one stays")


class RunnerTests(RunnerCase):

    def test_an_in_process_pollers_partial_progress_is_committed_with_the_error(self):
        def fail(ctx):
            raise PollerError.Transient("page 2 failed", next_cursor=b"page-2", deliver=[ITEM])
        p = FakePoller(script={"a": [fail]}, default=lambda ctx: TickAck(ctx.cursor + b"+"))
        r = self.runner(self.config([self.job(every=10)],
                                    agents={"default": {"telegram": "bot"}}), p)
        self.fire(r)
        state = r.state.load(["a"])["a"]
        self.assertEqual((state.cursor, state.last_status, state.consecutive_errors),
                         (b"page-2", "transient", 1))
        items = [i for i in r.state.outbox() if i.job == "a"]
        delivered = state.delivered_total
        self.assertEqual(len(items) + delivered, 1, "the item is in the same commit")
        self.go_to_next(r)                      # after the backoff
        self.fire(r)
        self.assertEqual(p.calls[1].cursor, b"page-2", "not fetched again")
        self.assertEqual(r.state.load(["a"])["a"].cursor, b"page-2+")

    def test_a_bad_delivery_drops_the_partial_progress_and_says_so(self):
        p = FakePoller(script={"a": [PollerError.Transient("x", next_cursor=b"c",
                                                           deliver=[{"channel": "t"}])]})
        r = self.runner(self.config([self.job(every=10)]), p)
        self.fire(r)
        state = r.state.load(["a"])["a"]
        self.assertIsNone(state.cursor)
        self.assertIn("partial progress dropped", state.last_error)


if __name__ == "__main__":
    unittest.main()
