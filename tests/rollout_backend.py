"""A small JSON-RPC and HTTP server that rollout tests run as a component.

Behaviour comes from environment variables, so each revision of a component can differ:
VERSION (returned by the "version" method and GET /version), SLOT (returned by getSlot),
FAIL_HEALTH=1 (GET /health returns 503), CRASH_AFTER=seconds (exit 1 after that long),
IGNORE_TERM=1 (ignore SIGTERM). It listens on 127.0.0.1:$OSVM_PORT_HTTP.
"""

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ.get("VERSION", "1")
SLOT = int(os.environ.get("SLOT", "100"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            if os.environ.get("FAIL_HEALTH") == "1":
                self._reply(503, b"unhealthy", "text/plain")
            else:
                self._reply(200, b"ok", "text/plain")
        elif self.path == "/version":
            self._reply(200, VERSION.encode(), "text/plain")
        elif self.path.startswith("/slow"):
            time.sleep(float(self.path.rsplit("/", 1)[-1]))
            self._reply(200, VERSION.encode(), "text/plain")
        else:
            self._reply(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        method = request.get("method")
        if method == "version":
            result: object = VERSION
        elif method == "getSlot":
            result = SLOT
        elif method == "getHealth":
            result = "ok"
        else:
            result = None
        body = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": result}).encode()
        self._reply(200, body)


def main() -> None:
    if os.environ.get("IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    crash_after = os.environ.get("CRASH_AFTER")
    if crash_after:
        threading.Timer(float(crash_after), lambda: os._exit(1)).start()
    port = int(os.environ["OSVM_PORT_HTTP"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"version {VERSION} listening on {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
