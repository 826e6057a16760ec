"""Wire shapes of nexo_poller (section "Wire") against the original's test vectors."""

import os
import random
import unittest
from datetime import datetime, timedelta, timezone

import nexo_poller as np
from nexo_poller import (PluginPollerForwardError, PollerError, TickAck, TickMetrics,
                         TickReply, TickRequest, build_tick_request, decode_cursor,
                         encode_cursor)

ParseReply = PluginPollerForwardError.ParseReply
NOW = datetime(2026, 5, 17, 10, 0, 0, tzinfo=timezone.utc)


def request(**over):
    args = dict(kind="rss", job_id="job-1", agent_id="agent-1", cursor=b"prev-cursor",
                config={"url": "https://example.com/feed"}, now=NOW, interval_hint=300)
    args.update(over)
    return build_tick_request(**args)


class CursorTests(unittest.TestCase):

    def test_vectors(self):
        self.assertEqual(encode_cursor(b"hello"), "aGVsbG8")
        self.assertEqual(encode_cursor(b"prev-cursor"), "cHJldi1jdXJzb3I")
        self.assertEqual(decode_cursor("aGVsbG8"), b"hello")
        self.assertEqual(decode_cursor("cHJldi1jdXJzb3I"), b"prev-cursor")

    def test_encode_has_no_padding_and_is_url_safe(self):
        # 0xfb 0xff encodes to "+/8=" in standard base64.
        self.assertEqual(encode_cursor(b"\xfb\xff"), "-_8")
        self.assertEqual(encode_cursor(b""), "")
        self.assertIsInstance(encode_cursor(b"a"), str)

    def test_padded_and_unpadded_decode_the_same(self):
        self.assertEqual(decode_cursor("aGVsbG8="), b"hello")
        self.assertEqual(decode_cursor("aGVsbG8"), decode_cursor("aGVsbG8="))
        self.assertEqual(decode_cursor("YQ"), b"a")
        self.assertEqual(decode_cursor("YQ=="), b"a")
        self.assertEqual(decode_cursor("-_8="), b"\xfb\xff")
        # The nexo template pads with a fixed "==" whatever the length.
        self.assertEqual(decode_cursor("aGVsbG8=="), b"hello")

    def test_not_b64_is_parse_reply(self):
        with self.assertRaises(ParseReply) as cm:
            decode_cursor("!!not_b64!!")
        self.assertIn("!!not_b64!!", str(cm.exception))

    def test_other_invalid_cursors_are_parse_reply(self):
        for bad in ("a", "abcde", "aGV sbG8", "a=b", "h\u00e9llo"):
            with self.subTest(bad=bad), self.assertRaises(ParseReply):
                decode_cursor(bad)

    def test_non_string_cursor_is_parse_reply(self):
        for bad in (b"aGVsbG8", 5, None):
            with self.subTest(bad=bad), self.assertRaises(ParseReply):
                decode_cursor(bad)

    def test_round_trip_random_bytes(self):
        rng = random.Random(1234)
        samples = [b"", b"\x00", b"\xff" * 3, os.urandom(1), os.urandom(2)]
        samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
                    for _ in range(300)]
        for raw in samples:
            text = encode_cursor(raw)
            self.assertNotIn("=", text)
            self.assertNotIn("+", text)
            self.assertNotIn("/", text)
            self.assertEqual(decode_cursor(text), raw)

    def test_empty_round_trip(self):
        self.assertEqual(encode_cursor(b""), "")
        self.assertEqual(decode_cursor(""), b"")


class TickRequestTests(unittest.TestCase):

    def test_to_dict_exact_keys_and_values(self):
        d = request().to_dict()
        self.assertEqual(d, {
            "kind": "rss", "job_id": "job-1", "agent_id": "agent-1",
            "cursor": "cHJldi1jdXJzb3I", "config": {"url": "https://example.com/feed"},
            "now": "2026-05-17T10:00:00+00:00", "interval_hint_secs": 300})
        self.assertEqual(list(d), ["kind", "job_id", "agent_id", "cursor", "config", "now",
                                   "interval_hint_secs"])

    def test_first_run_cursor_is_null(self):
        self.assertIsNone(request(cursor=None).to_dict()["cursor"])

    def test_hello_cursor(self):
        self.assertEqual(request(cursor=b"hello").cursor, "aGVsbG8")

    def test_config_is_verbatim(self):
        cfg = {"nested": {"list": [1, 2.5, None, True]}, "s": "x"}
        self.assertEqual(request(config=cfg).to_dict()["config"], cfg)

    def test_now_utc(self):
        self.assertEqual(request().now, "2026-05-17T10:00:00+00:00")

    def test_now_from_non_utc_aware_datetime(self):
        cest = timezone(timedelta(hours=2))
        now = datetime(2026, 5, 17, 12, 0, 0, tzinfo=cest)
        self.assertEqual(request(now=now).now, "2026-05-17T10:00:00+00:00")
        behind = timezone(timedelta(hours=-5, minutes=-30))
        now = datetime(2026, 5, 17, 4, 30, 0, tzinfo=behind)
        self.assertEqual(request(now=now).now, "2026-05-17T10:00:00+00:00")

    def test_now_from_naive_datetime_is_utc(self):
        self.assertEqual(request(now=datetime(2026, 5, 17, 10, 0, 0)).now,
                         "2026-05-17T10:00:00+00:00")

    def test_interval_from_int_float_timedelta(self):
        for hint in (300, 300.0, timedelta(seconds=300), timedelta(minutes=5)):
            with self.subTest(hint=hint):
                req = request(interval_hint=hint)
                self.assertEqual(req.interval_hint_secs, 300)
                self.assertIs(type(req.interval_hint_secs), int)

    def test_envelope(self):
        req = request()
        env = req.envelope()
        self.assertEqual(env["method"], "poll_tick")
        self.assertEqual(env["params"], req.to_dict())
        self.assertNotIn("id", env)
        self.assertEqual(req.envelope(7)["id"], 7)

    def test_is_a_tick_request(self):
        self.assertIsInstance(request(), TickRequest)


class TickReplyFromDictTests(unittest.TestCase):

    def test_full_reply(self):
        r = TickReply.from_dict({"next_cursor": "aGVsbG8", "next_interval_secs": 120,
                                 "metrics": {"items_seen": 4, "items_dispatched": 2}})
        self.assertEqual(r.next_cursor, "aGVsbG8")
        self.assertEqual(r.next_interval_secs, 120)
        self.assertEqual(r.metrics, TickMetrics(4, 2))

    def test_empty_reply(self):
        r = TickReply.from_dict({})
        self.assertIsNone(r.next_cursor)
        self.assertIsNone(r.next_interval_secs)
        self.assertIsNone(r.metrics)

    def test_unknown_fields_ignored(self):
        r = TickReply.from_dict({"next_cursor": "YQ", "extra": None, "version": "9",
                                 "tools": [{"x": 1}]})
        self.assertEqual(r.next_cursor, "YQ")
        self.assertIsNone(r.metrics)

    def test_explicit_nulls(self):
        r = TickReply.from_dict({"next_cursor": None, "next_interval_secs": None,
                                 "metrics": None})
        self.assertEqual((r.next_cursor, r.next_interval_secs, r.metrics), (None, None, None))

    def test_partial_metrics_default_to_zero(self):
        self.assertEqual(TickReply.from_dict({"metrics": {"items_seen": 3}}).metrics,
                         TickMetrics(3, 0))
        self.assertEqual(TickReply.from_dict({"metrics": {}}).metrics, TickMetrics(0, 0))

    def test_nexo_template_top_level_metrics(self):
        r = TickReply.from_dict({"items_seen": 5, "items_dispatched": 1, "deliver": [],
                                 "next_cursor": "Mw", "next_interval_secs": 60})
        self.assertEqual(r.metrics, TickMetrics(5, 1))
        self.assertEqual(r.next_cursor, "Mw")
        self.assertEqual(r.next_interval_secs, 60)
        self.assertEqual(r.into_tick_ack().next_cursor, b"3")

    def test_nexo_template_only_items_seen(self):
        self.assertEqual(TickReply.from_dict({"items_seen": 2}).metrics, TickMetrics(2, 0))

    def test_not_an_object(self):
        for bad in ([], "x", 3, None, True):
            with self.subTest(bad=bad), self.assertRaises(ParseReply):
                TickReply.from_dict(bad)

    def test_next_cursor_not_string(self):
        for bad in (5, ["YQ"], {"c": 1}, True, 1.5):
            with self.subTest(bad=bad), self.assertRaises(ParseReply):
                TickReply.from_dict({"next_cursor": bad})

    def test_next_interval_invalid(self):
        for bad in (-1, True, False, 1.5, 300.0, "300", [300], 2**64):
            with self.subTest(bad=bad), self.assertRaises(ParseReply):
                TickReply.from_dict({"next_interval_secs": bad})

    def test_next_interval_zero_ok(self):
        self.assertEqual(TickReply.from_dict({"next_interval_secs": 0}).next_interval_secs, 0)

    def test_metrics_not_object(self):
        for bad in ([1, 2], "x", 3, True):
            with self.subTest(bad=bad), self.assertRaises(ParseReply):
                TickReply.from_dict({"metrics": bad})

    def test_metric_values_invalid(self):
        for name in ("items_seen", "items_dispatched"):
            for bad in (-1, 1.5, "3", True):
                with self.subTest(name=name, bad=bad), self.assertRaises(ParseReply):
                    TickReply.from_dict({"metrics": {name: bad}})
                with self.subTest(top_level=name, bad=bad), self.assertRaises(ParseReply):
                    TickReply.from_dict({name: bad})


class IntoTickAckTests(unittest.TestCase):

    def test_full(self):
        ack = TickReply.from_dict({"next_cursor": "cHJldi1jdXJzb3I", "next_interval_secs": 300,
                                   "metrics": {"items_seen": 2, "items_dispatched": 1}}
                                  ).into_tick_ack()
        self.assertIsInstance(ack, TickAck)
        self.assertEqual(ack.next_cursor, b"prev-cursor")
        self.assertEqual(ack.next_interval_hint, timedelta(seconds=300))
        self.assertIsInstance(ack.next_interval_hint, timedelta)
        self.assertEqual(ack.metrics, TickMetrics(2, 1))

    def test_none_fields(self):
        ack = TickReply.from_dict({}).into_tick_ack()
        self.assertEqual(ack, TickAck(None, None, None))

    def test_padded_cursor(self):
        self.assertEqual(TickReply.from_dict({"next_cursor": "aGVsbG8="}).into_tick_ack()
                         .next_cursor, b"hello")

    def test_empty_cursor_is_empty_bytes_not_none(self):
        self.assertEqual(TickReply.from_dict({"next_cursor": ""}).into_tick_ack().next_cursor,
                         b"")

    def test_bad_cursor_is_parse_reply(self):
        reply = TickReply.from_dict({"next_cursor": "!!not_b64!!"})
        with self.assertRaises(ParseReply):
            reply.into_tick_ack()


class FromAckTests(unittest.TestCase):

    def test_round_trip(self):
        ack = TickAck(b"\x00\xffcursor", timedelta(seconds=90), TickMetrics(7, 3))
        reply = TickReply.from_ack(ack)
        self.assertEqual(reply.next_cursor, encode_cursor(b"\x00\xffcursor"))
        self.assertEqual(reply.next_interval_secs, 90)
        self.assertEqual(reply.metrics, TickMetrics(7, 3))
        self.assertEqual(reply.into_tick_ack(), ack)
        self.assertEqual(TickReply.from_dict(reply.to_dict()).into_tick_ack(), ack)

    def test_none_ack(self):
        reply = TickReply.from_ack(None)
        self.assertEqual(reply.to_dict(), {})
        self.assertEqual(reply.into_tick_ack(), TickAck())

    def test_empty_ack(self):
        self.assertEqual(TickReply.from_ack(TickAck()).to_dict(), {})

    def test_to_dict_shape(self):
        d = TickReply.from_ack(TickAck(b"hello", timedelta(seconds=5), TickMetrics(1, 0))
                               ).to_dict()
        self.assertEqual(d, {"next_cursor": "aGVsbG8", "next_interval_secs": 5,
                             "metrics": {"items_seen": 1, "items_dispatched": 0}})


class EnvelopeTests(unittest.TestCase):

    def test_error_transient(self):
        with self.assertRaises(PollerError.Transient) as cm:
            np._parse_reply_envelope({"error": {"code": -32001, "message": "rate limited"}},
                                     "job-1")
        self.assertIn("rate limited", str(cm.exception))

    def test_error_data_retry_after_secs(self):
        # Issue 25 item 4: data.retry_after_secs was dropped.  Bad values are
        # ignored (the error stays a plain Transient); huge ones are clamped.
        cases = ((60, 60), (1.5, 1.5), (0, 0), (10 ** 400, np._RETRY_AFTER_MAX_SECS),
                 (float("inf"), np._RETRY_AFTER_MAX_SECS), (-1, None), (float("nan"), None),
                 ("60", None), (True, None), (None, None), ({"s": 1}, None))
        for value, want in cases:
            for code in (-32001, -32000, None):      # every code read as Transient
                err = {"message": "rate limited", "data": {"retry_after_secs": value}}
                if code is not None:
                    err["code"] = code
                with self.subTest(value=value, code=code), \
                        self.assertRaises(PollerError.Transient) as cm:
                    np._parse_reply_envelope({"error": err}, "job-1")
                self.assertEqual(cm.exception.retry_after, want)
                self.assertIn("rate limited", str(cm.exception))
        for data in ("60", [60], 60, None):
            with self.subTest(data=data), self.assertRaises(PollerError.Transient) as cm:
                np._parse_reply_envelope({"error": {"code": -32001, "message": "m",
                                                    "data": data}}, "j")
            self.assertIsNone(cm.exception.retry_after)

    def test_error_permanent(self):
        with self.assertRaises(PollerError.Permanent) as cm:
            np._parse_reply_envelope({"error": {"code": -32002, "message": "token revoked"}},
                                     "job-1")
        self.assertIn("token revoked", str(cm.exception))
        self.assertIs(cm.exception.classify(), np.ErrorClass.PERMANENT)

    def test_error_config(self):
        with self.assertRaises(PollerError.Config) as cm:
            np._parse_reply_envelope({"error": {"code": -32602, "message": "url missing"}},
                                     "rss-news")
        self.assertEqual(cm.exception.job, "rss-news")
        self.assertEqual(cm.exception.reason, "url missing")
        self.assertIs(cm.exception.classify(), np.ErrorClass.CONFIG)

    def test_error_other_code_is_transient(self):
        for code in (-32603, -32000, -32600, 1, 0):
            with self.subTest(code=code), self.assertRaises(PollerError.Transient):
                np._parse_reply_envelope({"error": {"code": code, "message": "x"}}, "j")

    def test_error_missing_or_bad_code_is_transient(self):
        for err in ({"message": "boom"}, {}, "boom", {"code": "-32002"},
                    {"code": True, "message": "m"}):
            with self.subTest(err=err), self.assertRaises(PollerError.Transient) as cm:
                np._parse_reply_envelope({"error": err}, "j")
            self.assertIs(type(cm.exception), PollerError.Transient)

    def test_reply_to_ack_maps_errors_too(self):
        with self.assertRaises(PollerError.Permanent):
            np._reply_to_ack({"error": {"code": -32002, "message": "gone"}}, "j")
        with self.assertRaises(PollerError.Config) as cm:
            np._reply_to_ack({"error": {"code": -32602, "message": "bad"}}, "job-9")
        self.assertEqual(cm.exception.job, "job-9")
        with self.assertRaises(PollerError.Transient):
            np._reply_to_ack({"error": {"message": "no code"}}, "j")

    def test_result_null_is_empty_ack(self):
        self.assertEqual(np._reply_to_ack({"result": None}, "j"), TickAck(None, None, None))
        reply = np._parse_reply_envelope({"result": None}, "j")
        self.assertEqual(reply.to_dict(), {})

    def test_result_parsed(self):
        ack = np._reply_to_ack({"result": {"next_cursor": "aGVsbG8", "next_interval_secs": 30,
                                           "metrics": {"items_seen": 1,
                                                       "items_dispatched": 1}}}, "j")
        self.assertEqual(ack, TickAck(b"hello", timedelta(seconds=30), TickMetrics(1, 1)))

    def test_jsonrpc_members_tolerated(self):
        ack = np._reply_to_ack({"jsonrpc": "2.0", "id": 42,
                                "result": {"next_cursor": "YQ"}}, "j")
        self.assertEqual(ack.next_cursor, b"a")
        ack = np._reply_to_ack({"jsonrpc": "2.0", "id": "abc", "error": None,
                                "result": {"items_seen": 3, "items_dispatched": 2}}, "j")
        self.assertEqual(ack.metrics, TickMetrics(3, 2))
        with self.assertRaises(PollerError.Permanent):
            np._reply_to_ack({"jsonrpc": "2.0", "id": 1,
                              "error": {"code": -32002, "message": "m", "data": {"x": 1}}},
                             "j")

    def test_nexo_template_reply(self):
        env = {"jsonrpc": "2.0", "id": 1,
               "result": {"items_seen": 2, "items_dispatched": 2, "deliver": [],
                          "next_cursor": encode_cursor(b"2"), "next_interval_secs": 60}}
        self.assertEqual(np._reply_to_ack(env, "j"),
                         TickAck(b"2", timedelta(seconds=60), TickMetrics(2, 2)))

    def test_neither_result_nor_error(self):
        with self.assertRaises(ParseReply):
            np._parse_reply_envelope({"jsonrpc": "2.0", "id": 1}, "j")
        with self.assertRaises(PollerError.Transient):
            np._reply_to_ack({"jsonrpc": "2.0", "id": 1}, "j")
        with self.assertRaises(PollerError.Transient):
            np._reply_to_ack({}, "j")

    def test_envelope_not_object(self):
        for bad in ([], "x", None, 3):
            with self.subTest(bad=bad):
                with self.assertRaises(ParseReply):
                    np._parse_reply_envelope(bad, "j")
                with self.assertRaises(PollerError.Transient):
                    np._reply_to_ack(bad, "j")

    def test_bad_cursor_in_reply_is_transient(self):
        with self.assertRaises(PollerError.Transient):
            np._reply_to_ack({"result": {"next_cursor": "!!not_b64!!"}}, "j")
        with self.assertRaises(ParseReply):
            np._parse_reply_envelope({"result": {"next_cursor": "!!not_b64!!"}},
                                     "j").into_tick_ack()

    def test_bad_result_types_are_transient(self):
        for result in ({"next_cursor": 1}, {"next_interval_secs": -5}, {"metrics": []},
                       [], "x"):
            with self.subTest(result=result), self.assertRaises(PollerError.Transient):
                np._reply_to_ack({"result": result}, "j")

    def test_huge_interval_is_not_an_unexpected_exception(self):
        # from_dict accepts any non-negative integer below 2**63; turning it
        # into a TickAck must either work or fail as a PollerError, never leak
        # an OverflowError out of the documented "anything unparsable is
        # Transient" contract of _reply_to_ack.
        for secs in (10**15, 2**63 - 1):
            with self.subTest(secs=secs):
                try:
                    ack = np._reply_to_ack({"result": {"next_interval_secs": secs}}, "j")
                except PollerError:
                    pass
                else:
                    self.assertIsInstance(ack.next_interval_hint, timedelta)


if __name__ == "__main__":
    unittest.main()
