"""Screenshot of a run's TensorBoard charts with headless Chromium (Debian: apt-get install chromium).

    python benchmarks/screenshot_tensorboard.py RUN_DIR OUT.png [--filter REGEX] [--size 1600,800]

Starts ``tensorboard --logdir RUN_DIR`` on a free loopback port, waits (bounded) until its HTTP data
API lists the run's throughput scalars, and has headless Chromium screenshot the SCALARS dashboard
filtered to REGEX (default: throughput and evaluation accuracy), then stops TensorBoard.

Chromium loads the page through a small same-origin proxy whose only addition is a first page
that sets one dashboard preference before TensorBoard starts: "Ignore outliers in chart scaling"
off (TensorBoard keeps it in the browser's localStorage, not in the URL; left on, it crops a
4-point accuracy curve). The dashboard is a single-page app: --virtual-time-budget gives its
scripts time to fetch the data and draw.
"""
from __future__ import annotations

import argparse
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from cotmi_ds.distributed import free_port

DEFAULT_FILTER = r"throughput/(samples|tokens)_per_s$|tflops|eval/.*accuracy"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def wait_for_scalars(base: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as resp:
                if b"throughput/" in resp.read():
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"TensorBoard at {base} listed no throughput/ scalars within {timeout_s:.0f} s")


def start_proxy(tensorboard: str, dashboard: str) -> http.server.ThreadingHTTPServer:
    """Forwards every request to TensorBoard; /_prefs sets the preference, then opens ``dashboard``."""
    prefs = ("<script>localStorage.setItem('_ignoreYOutliers', 'false');"
             f"location.replace({dashboard!r});</script>").encode()

    class Proxy(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, body: bytes | None) -> None:
            if self.path == "/_prefs":
                return self._reply(200, "text/html", prefs)
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            req = urllib.request.Request(tensorboard + self.path, data=body, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    self._reply(resp.status, resp.headers.get("Content-Type", "application/octet-stream"),
                                resp.read())
            except urllib.error.HTTPError as e:
                self._reply(e.code, e.headers.get("Content-Type", "text/plain"), e.read())

        def do_GET(self):
            self._forward(None)

        def do_POST(self):
            self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--filter", default=DEFAULT_FILTER, help="tag regex (default: %(default)s)")
    parser.add_argument("--size", default="1600,800", help="window WIDTH,HEIGHT (default: %(default)s)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()

    port = free_port()
    tensorboard = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.run_dir,
                                    "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        wait_for_scalars(f"http://127.0.0.1:{port}")
        dashboard = ("/#scalars&_smoothingWeight=0&tagFilter="
                     + urllib.parse.quote(args.filter, safe=""))
        proxy = start_proxy(f"http://127.0.0.1:{port}", dashboard)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                            f"--window-size={args.size}", "--virtual-time-budget=30000",
                            f"--screenshot={args.out}", f"http://127.0.0.1:{proxy.server_port}/_prefs"],
                           check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"wrote {args.out}")
    finally:
        if proxy is not None:
            proxy.shutdown()
        tensorboard.terminate()
        try:
            tensorboard.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tensorboard.kill()


if __name__ == "__main__":
    main()
