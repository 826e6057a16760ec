#!/usr/bin/env python3
"""The floor of a tick round trip: a bare JSON-line echo over a Unix socket.

``echo_floor.py PATH`` listens on PATH and, for every connection, answers
each line with the same JSON value (parsed, then encoded again), on one
plain blocking thread per connection: no broker, no pool, no envelope
checks.  It prints ``ready`` once listening.  Standard library only.
"""
import json
import os
import socket
import sys
import threading

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def serve_conn(conn: socket.socket) -> None:
    with conn, conn.makefile("rb") as rfile:
        for line in rfile:
            conn.sendall(_dumps(json.loads(line)).encode() + b"\n")


def main() -> int:
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
