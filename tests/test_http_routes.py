"""The HTTP face as a route table (issue 22 item 3): the edges of nexo's
/admin/pollers routes, answered by the table's rows and guards."""

import http.client
import json
import unittest

import nexo_poller as nx

TOKEN = "t0ken-for-route-tests"


class FakeRunner:
    """Just enough of a Runner for routes that refuse before doing anything."""
    config = nx.DaemonConfig(state_db=":memory:")

    def has_job(self, job_id):
        return job_id == "a"


class RouteTableTests(unittest.TestCase):

    def setUp(self):
        runner = FakeRunner()
        server = nx._serve_http(runner, ("127.0.0.1", 0), metrics=False,
                                admin=nx._Admin(runner, TOKEN, True))
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        self.port = server.server_address[1]

    def call(self, method, path, token=TOKEN):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {token}"}
                         if token else {})
            resp = conn.getresponse()
            raw = resp.read()
            is_json = (resp.getheader("Content-Type") or "").startswith("application/json")
            return resp.status, json.loads(raw) if is_json else raw, resp.getheader("Allow")
        finally:
            conn.close()

    def test_the_edges_of_the_pollers_routes(self):
        cases = [
            ("POST", "/admin/pollers", 405, {"ok": False, "error": "GET required"}, None),
            ("GET", "/admin/pollers/a/run", 405, {"error": "POST required"}, "POST"),
            ("GET", "/admin/pollers/reload", 405, {"error": "POST required"}, "POST"),
            ("POST", "/admin/pollers/a", 405, {"ok": False, "error": "GET required"}, None),
            ("POST", "/admin/pollers/nope/run", 404, {"error": "job 'nope' not found"}, None),
            ("GET", "/admin/pollers/nope/cursor", 404, {"error": "unknown action 'cursor'"},
             None),
            ("GET", "/admin/pollers/a/run/x", 404, {"error": "unknown action 'run/x'"}, None),
            ("POST", "/admin/pollers/a/runs", 405, {"ok": False, "error": "GET required"},
             None),
            ("GET", "/admin/pollers/nope/runs", 404, {"error": "job 'nope' not found"}, None),
            ("GET", "/admin/pollers//", 404, {"error": "unknown action ''"}, None),
            ("GET", "/admin/pollersX", 404, {"error": "no route /admin/pollersX"}, None),
            ("POST", "/admin/plugins", 405, {"ok": False, "error": "GET required"}, None),
        ]
        for method, path, code, doc, allow in cases:
            with self.subTest(method=method, path=path):
                self.assertEqual(self.call(method, path), (code, doc, allow))

    def test_a_post_needs_the_token_before_any_route_answers(self):
        status, doc, _ = self.call("POST", "/admin/pollers/a/run", token=None)
        self.assertEqual((status, doc["error"]), (401, "a valid bearer token is required"))

    def test_every_row_is_reachable(self):
        # a row shadowed by an earlier one would be dead code
        paths = {"/healthz", "/metrics", "/", "/admin/plugins", "/admin/daemons",
                 "/admin/pollers", "/admin/pollers/a", "/admin/pollers/a/cursor",
                 "/admin/pollers/a/runs", "/admin/pollers/a/run", "/admin/pollers/a/x"}
        first = {next(r for r in nx._HTTP_ROUTES if r.pattern.fullmatch(p)).handler
                 for p in paths}
        self.assertEqual(first, {r.handler for r in nx._HTTP_ROUTES})


if __name__ == "__main__":
    unittest.main()
