"""Real HTTP servers for the teacher tests: `transformers serve` with a tiny locally built causal LM
(benchmarks/teach_bench.py starts it, for the bench too), and a loopback proxy in front of it that counts the requests it relays and can answer errors, hold
requests or delay them. Nothing here mocks the `openai` client: it talks HTTP to these."""
from __future__ import annotations

import http.client
import http.server
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.teach_bench import TeacherServer, build_tiny_causal_lm  # noqa: F401  (the tests' too)
from tests.conftest import child_env



def teacher_server(model: Path, port: int) -> TeacherServer:
    """`transformers serve` (benchmarks/teach_bench.py) with a test process's environment."""
    return TeacherServer(model, port, child_env())


class FaultProxy:
    """A loopback HTTP proxy in front of a server. Counts the completion requests it relays (by
    request body, so a repeat shows), answers the next ones from ``script`` instead (``(status,
    headers)``), and with ``hold_after=N`` answers N requests then holds every later one until
    ``release()`` (``held`` is set when the first is held)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("//", 1)[1].split("/", 1)[0]
        self.script: list[tuple[int, dict]] = []
        self.bodies: Counter = Counter()
        self.log: list[tuple[float, int]] = []       # (time, status) of every completion request
        self.auth: set[str] = set()
        self.hold_after: int | None = None
        self._admitted = 0  # requests let through to the server
        self.held, self._release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._relay(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.auth.add(self.headers.get("Authorization", ""))
                with proxy._lock:
                    fault = proxy.script.pop(0) if proxy.script else None
                    # counted when let through, not when answered: concurrent requests all pass a
                    # count of answers that are still on their way
                    hold = proxy.hold_after is not None and proxy._admitted >= proxy.hold_after and fault is None
                    proxy._admitted += fault is None and not hold
                if hold:
                    proxy.held.set()
                    proxy._release.wait()
                if fault is not None:
                    status, headers = fault
                    proxy.log.append((time.monotonic(), status))
                    payload = json.dumps({"error": {"message": f"injected {status}", "type": "test"}}).encode()
                    self.send_response(status)
                    for k, v in {**headers, "Content-Type": "application/json",
                                 "Content-Length": str(len(payload))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                status = self._relay(body)
                with proxy._lock:
                    proxy.log.append((time.monotonic(), status))
                    if status == 200:
                        proxy.bodies[body] += 1

            def _relay(self, body):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                return resp.status

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)  # a killed client is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def relayed(self) -> int:
        return sum(self.bodies.values())

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
