"""PluginPollerRouter (section "Router")."""

import sys
import threading
import unittest

from nexo_poller import PluginPollerHandle, PluginPollerRouter, PollerRouteRegistrationError

DuplicateKind = PollerRouteRegistrationError.DuplicateKind


def handle(plugin_id, *kinds, prefix=None):
    return PluginPollerHandle(plugin_id=plugin_id, kinds=kinds,
                              broker_topic_prefix=prefix or f"plugin.poller.{plugin_id}")


class RouterBasicsTests(unittest.TestCase):

    def test_new_router_is_empty(self):
        r = PluginPollerRouter()
        self.assertTrue(r.is_empty())
        self.assertEqual(r.len(), 0)
        self.assertEqual(len(r), 0)
        self.assertIsNone(r.handle_for_kind("rss"))
        self.assertIsNone(r.handles_for_plugin("feeds"))

    def test_register_and_lookup(self):
        r = PluginPollerRouter()
        feeds = handle("feeds", "rss", "atom")
        gcal = handle("gcal", "google_calendar")
        r.register(feeds)
        r.register(gcal)
        self.assertIs(r.handle_for_kind("rss"), feeds)
        self.assertIs(r.handle_for_kind("atom"), feeds)
        self.assertIs(r.handle_for_kind("google_calendar"), gcal)
        self.assertIsNone(r.handle_for_kind("gmail"))
        self.assertIs(r.handles_for_plugin("feeds"), feeds)
        self.assertIs(r.handles_for_plugin("gcal"), gcal)
        self.assertIsNone(r.handles_for_plugin("rss"))
        self.assertFalse(r.is_empty())

    def test_len_counts_plugins_not_kinds(self):
        r = PluginPollerRouter()
        r.register(handle("feeds", "rss", "atom", "json_feed"))
        self.assertEqual(r.len(), 1)
        self.assertEqual(len(r), 1)
        r.register(handle("gcal", "google_calendar"))
        self.assertEqual(r.len(), 2)
        self.assertEqual(sorted(r.kinds()), ["atom", "google_calendar", "json_feed", "rss"])
        self.assertEqual({h.plugin_id for h in r.handles()}, {"feeds", "gcal"})

    def test_unregister(self):
        r = PluginPollerRouter()
        r.register(handle("feeds", "rss", "atom"))
        r.register(handle("gcal", "google_calendar"))
        self.assertTrue(r.unregister("feeds"))
        self.assertIsNone(r.handle_for_kind("rss"))
        self.assertIsNone(r.handle_for_kind("atom"))
        self.assertIsNone(r.handles_for_plugin("feeds"))
        self.assertEqual(r.len(), 1)
        self.assertIsNotNone(r.handle_for_kind("google_calendar"))
        self.assertFalse(r.unregister("feeds"))
        self.assertFalse(r.unregister("never-registered"))
        self.assertTrue(r.unregister("gcal"))
        self.assertTrue(r.is_empty())
        self.assertEqual(r.len(), 0)
        self.assertEqual(r.kinds(), [])

    def test_kind_free_again_after_unregister(self):
        r = PluginPollerRouter()
        r.register(handle("gcal_a", "google_calendar"))
        r.unregister("gcal_a")
        gcal_b = handle("gcal_b", "google_calendar")
        r.register(gcal_b)
        self.assertIs(r.handle_for_kind("google_calendar"), gcal_b)


class DuplicateKindTests(unittest.TestCase):

    def test_duplicate_kind_from_other_plugin(self):
        r = PluginPollerRouter()
        r.register(handle("gcal_a", "google_calendar"))
        with self.assertRaises(DuplicateKind) as cm:
            r.register(handle("gcal_b", "google_calendar"))
        exc = cm.exception
        self.assertEqual((exc.kind, exc.existing_plugin, exc.new_plugin),
                         ("google_calendar", "gcal_a", "gcal_b"))
        self.assertEqual(
            str(exc),
            "kind `google_calendar` already owned by plugin `gcal_a` — `gcal_b` cannot register")

    def test_router_unchanged_after_failed_register(self):
        r = PluginPollerRouter()
        feeds = handle("feeds", "rss", "atom")
        r.register(feeds)
        # The clash is on the second kind: the first must not have been taken.
        with self.assertRaises(DuplicateKind) as cm:
            r.register(handle("other", "json_feed", "atom"))
        self.assertEqual(cm.exception.kind, "atom")
        self.assertEqual(r.len(), 1)
        self.assertIsNone(r.handle_for_kind("json_feed"))
        self.assertIsNone(r.handles_for_plugin("other"))
        self.assertIs(r.handle_for_kind("atom"), feeds)
        self.assertIs(r.handle_for_kind("rss"), feeds)
        self.assertEqual(r.kinds(), ["atom", "rss"])

    def test_failed_hot_restart_keeps_old_entry(self):
        # A plugin re-registering with a kind owned by someone else keeps its
        # old registration intact.
        r = PluginPollerRouter()
        feeds = handle("feeds", "rss")
        gcal = handle("gcal", "google_calendar")
        r.register(feeds)
        r.register(gcal)
        with self.assertRaises(DuplicateKind):
            r.register(handle("feeds", "rss", "google_calendar"))
        self.assertIs(r.handles_for_plugin("feeds"), feeds)
        self.assertIs(r.handle_for_kind("rss"), feeds)
        self.assertIs(r.handle_for_kind("google_calendar"), gcal)
        self.assertEqual(r.len(), 2)


class HotRestartTests(unittest.TestCase):

    def test_same_plugin_replaces_entry(self):
        r = PluginPollerRouter()
        old = handle("feeds", "rss")
        new = handle("feeds", "rss", prefix="plugin.poller.feeds_v2")
        r.register(old)
        r.register(new)
        self.assertEqual(r.len(), 1)
        self.assertIs(r.handle_for_kind("rss"), new)
        self.assertIs(r.handles_for_plugin("feeds"), new)
        self.assertEqual(r.handle_for_kind("rss").tick_topic(), "plugin.poller.feeds_v2.tick")

    def test_dropped_kinds_are_gone(self):
        r = PluginPollerRouter()
        r.register(handle("feeds", "rss", "atom"))
        r.register(handle("gcal", "google_calendar"))
        new = handle("feeds", "atom", "json_feed")
        r.register(new)
        self.assertEqual(r.len(), 2)
        self.assertIsNone(r.handle_for_kind("rss"))
        self.assertIs(r.handle_for_kind("atom"), new)
        self.assertIs(r.handle_for_kind("json_feed"), new)
        self.assertEqual(r.kinds(), ["atom", "google_calendar", "json_feed"])
        # The dropped kind can now go to another plugin.
        r.register(handle("rss_only", "rss"))
        self.assertEqual(r.handle_for_kind("rss").plugin_id, "rss_only")
        self.assertEqual(r.len(), 3)

    def test_same_handle_twice(self):
        r = PluginPollerRouter()
        h = handle("feeds", "rss")
        r.register(h)
        r.register(h)
        self.assertEqual(r.len(), 1)
        self.assertIs(r.handle_for_kind("rss"), h)
        self.assertTrue(r.unregister("feeds"))
        self.assertTrue(r.is_empty())
        self.assertIsNone(r.handle_for_kind("rss"))


class ThreadSafetyTests(unittest.TestCase):

    def setUp(self):
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)   # force many thread switches
        self.addCleanup(sys.setswitchinterval, old)

    def test_concurrent_register_unregister_and_lookups(self):
        r = PluginPollerRouter()
        writers, rounds, per_writer = 8, 300, 4
        start = threading.Barrier(writers + 3)
        done = threading.Event()
        errors = []

        def expected_owner(kind):
            # kinds are "k<writer>_<slot>_<n>", owned by plugin "p<writer>_<slot>".
            w, slot, _ = kind[1:].split("_")
            return f"p{w}_{slot}"

        def writer(w):
            try:
                start.wait()
                for i in range(rounds):
                    slot = i % per_writer
                    pid = f"p{w}_{slot}"
                    h = handle(pid, f"k{w}_{slot}_a", f"k{w}_{slot}_b")
                    r.register(h)
                    if r.handles_for_plugin(pid) is not h:
                        errors.append(f"{pid} not visible to its own writer")
                    if i % 3 == 2:
                        if not r.unregister(pid):
                            errors.append(f"unregister {pid} returned False")
                        if r.unregister(pid):
                            errors.append(f"second unregister {pid} returned True")
                # Final state: every slot registered.
                for slot in range(per_writer):
                    r.register(handle(f"p{w}_{slot}", f"k{w}_{slot}_a", f"k{w}_{slot}_b"))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(repr(exc))

        def reader():
            try:
                start.wait()
                n = 0
                while not done.is_set() or n < 1000:
                    w, slot = n % writers, (n // writers) % per_writer
                    kind = f"k{w}_{slot}_{'ab'[n % 2]}"
                    h = r.handle_for_kind(kind)
                    if h is not None and (h.plugin_id != expected_owner(kind)
                                          or kind not in h.kinds):
                        errors.append(f"{kind} routed to {h.plugin_id} {h.kinds}")
                    p = r.handles_for_plugin(f"p{w}_{slot}")
                    if p is not None and p.plugin_id != f"p{w}_{slot}":
                        errors.append(f"plugin lookup returned {p.plugin_id}")
                    r.len()
                    r.is_empty()
                    for hh in r.handles():
                        if hh.plugin_id != expected_owner(hh.kinds[0]):
                            errors.append(f"bad handle {hh.plugin_id}")
                    n += 1
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        threads += [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads[:writers]:
            t.join()
        done.set()
        for t in threads[writers:]:
            t.join()

        self.assertEqual(errors, [])
        self.assertEqual(r.len(), writers * per_writer)
        self.assertEqual(len(r.handles()), writers * per_writer)
        self.assertEqual(len(r.kinds()), writers * per_writer * 2)
        for w in range(writers):
            for slot in range(per_writer):
                pid = f"p{w}_{slot}"
                h = r.handles_for_plugin(pid)
                self.assertIsNotNone(h, pid)
                self.assertIs(r.handle_for_kind(f"k{w}_{slot}_a"), h)
                self.assertIs(r.handle_for_kind(f"k{w}_{slot}_b"), h)
        # by-kind and by-plugin views agree.
        self.assertEqual(sorted(k for h in r.handles() for k in h.kinds), r.kinds())

    def test_racing_claims_on_one_kind_have_one_winner(self):
        r = PluginPollerRouter()
        n = 8
        start = threading.Barrier(n)
        won, lost, errors = [], [], []

        def claim(i):
            try:
                start.wait()
                r.register(handle(f"p{i}", "shared", f"own_{i}"))
                won.append(i)
            except DuplicateKind as exc:
                lost.append((i, exc))
            except Exception as exc:  # pragma: no cover
                errors.append(repr(exc))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(won), 1)
        self.assertEqual(len(lost), n - 1)
        winner = f"p{won[0]}"
        for i, exc in lost:
            self.assertEqual((exc.kind, exc.existing_plugin, exc.new_plugin),
                             ("shared", winner, f"p{i}"))
            self.assertIsNone(r.handle_for_kind(f"own_{i}"))
        self.assertEqual(r.len(), 1)
        self.assertEqual(r.handle_for_kind("shared").plugin_id, winner)
        self.assertEqual(r.kinds(), sorted(["shared", f"own_{won[0]}"]))

    def test_hot_restart_is_atomic_for_readers(self):
        # Re-registering the same plugin (hot restart) replaces its entry; a
        # concurrent lookup of a kind it keeps serving must never see it
        # missing, as with the original's read-write lock.
        r = PluginPollerRouter()
        # Many kinds make a non-atomic replacement's gap wide enough to see.
        kinds = [f"stable_kind_{i}" for i in range(64)]
        versions = [handle("stable", *kinds), handle("stable", *kinds)]
        probe = kinds[-1]
        r.register(versions[0])
        start = threading.Barrier(2)
        stop = threading.Event()
        restarts = [0]
        misses = {"kind": 0, "plugin": 0, "len": 0}

        def restarter():
            start.wait()
            i = 0
            while not stop.is_set():
                r.register(versions[i % 2])
                i += 1
                restarts[0] = i

        def reader():
            start.wait()
            try:
                # Look up until the two threads have overlapped for a while:
                # at least 20 000 lookups and 2 000 restarts.
                n = 0
                while n < 20_000 or restarts[0] < 2_000:
                    if r.handle_for_kind(probe) is None:
                        misses["kind"] += 1
                    if r.handles_for_plugin("stable") is None:
                        misses["plugin"] += 1
                    if r.len() != 1:
                        misses["len"] += 1
                    n += 1
            finally:
                stop.set()

        threads = [threading.Thread(target=restarter), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertGreaterEqual(restarts[0], 2_000)
        self.assertEqual(misses, {"kind": 0, "plugin": 0, "len": 0})



class InProcessOwnerTests(unittest.TestCase):
    """One registry answers "who serves kind K" for plugins and in-process
    pollers alike (issue 22: three registries before)."""

    def test_an_in_process_kind_has_an_owner_and_no_handle(self):
        r = PluginPollerRouter()
        r.claim_in_process(["mem"])
        self.assertEqual(r.owner("mem"), PluginPollerRouter.IN_PROCESS)
        self.assertIsNone(r.handle_for_kind("mem"))
        self.assertIsNone(r.owner("rss"))
        r.register(handle("feeds", "rss"))
        self.assertEqual(r.owner("rss"), "feeds")
        self.assertEqual(r.kinds(), ["mem", "rss"])

    def test_a_plugin_cannot_take_an_in_process_kind_nor_the_reverse(self):
        r = PluginPollerRouter()
        r.claim_in_process(["mem"])
        with self.assertRaises(DuplicateKind) as cm:
            r.register(handle("feeds", "rss", "mem"))
        self.assertEqual((cm.exception.kind, cm.exception.existing_plugin),
                         ("mem", "(in-process)"))
        self.assertIsNone(r.owner("rss"), "a refused plugin changes nothing")
        r.register(handle("feeds", "rss"))
        with self.assertRaises(DuplicateKind) as cm:
            r.claim_in_process(["other", "rss"])
        self.assertEqual(cm.exception.existing_plugin, "feeds")
        self.assertIsNone(r.owner("other"), "a refused claim changes nothing")
        with self.assertRaises(DuplicateKind):
            r.claim_in_process(["mem"])             # one in-process poller per kind too

if __name__ == "__main__":
    unittest.main()
