"""A small HTTP server that security tests run as a component, over plain TCP or TLS.

It listens on $OSVM_ADDRESS:$OSVM_PORT_HTTP. With SERVE_TLS=1 it serves TLS with the instance's own
certificate ($OSVM_TLS_CERT and $OSVM_TLS_KEY), loaded at start and loaded again on SIGHUP, so a
test can check that a renewed certificate reaches clients without a restart. Clients need no
certificate of their own.

GET /health returns "ok". Any other GET returns JSON with the component, the instance and the
serial (lowercase hexadecimal) of the certificate the server presents.
"""

import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler

SERVE_TLS = os.environ.get("SERVE_TLS") == "1"
HANDSHAKE_TIMEOUT = 10.0


def certificate_serial(path: str) -> str:
    """Return the serial of the first certificate in a PEM file, in lowercase hexadecimal."""
    # The ssl module has no public parser for a certificate file, so openssl reads it.
    output = subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", path], capture_output=True, text=True, check=True
    ).stdout
    return format(int(output.strip().split("=", 1)[1], 16), "x")


def load_context() -> tuple[ssl.SSLContext, str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.environ["OSVM_TLS_CERT"], os.environ["OSVM_TLS_KEY"])
    return context, certificate_serial(os.environ["OSVM_TLS_CERT"])


class Server(socketserver.ThreadingTCPServer):
    """A threading TCP server that runs the TLS handshake in each connection's thread."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        # TCPServer, not HTTPServer: HTTPServer.server_bind() looks the host name up with DNS,
        # which a network namespace cannot reach.
        super().__init__(address, Handler)
        self.lock = threading.Lock()
        self.context: ssl.SSLContext | None = None
        self.serial = ""
        if SERVE_TLS:
            self.reload()

    def reload(self) -> None:
        context, serial = load_context()
        with self.lock:
            self.context, self.serial = context, serial
        print(f"serving certificate {serial}", flush=True)

    def finish_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        with self.lock:
            context = self.context
        if context is not None:
            request.settimeout(HANDSHAKE_TIMEOUT)
            try:
                request = context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as error:
                print(f"TLS handshake with {client_address} failed: {error}", flush=True)
                return
            request.settimeout(None)
        self.RequestHandlerClass(request, client_address, self)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            body = b"ok"
            content_type = "text/plain"
        else:
            facts = {
                "component": os.environ["OSVM_COMPONENT"],
                "instance": os.environ["OSVM_INSTANCE"],
                "serial": self.server.serial,
            }
            body = json.dumps(facts).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def reload_on_signal(server: Server) -> None:
    try:
        server.reload()
    except (ssl.SSLError, OSError, subprocess.CalledProcessError) as error:
        print(f"reloading the certificate failed, so the previous one stays in use: {error}", flush=True)


def main() -> None:
    address = (os.environ["OSVM_ADDRESS"], int(os.environ["OSVM_PORT_HTTP"]))
    server = Server(address)
    if SERVE_TLS:
        # Python runs the handler in the main thread, where serve_forever() waits for connections.
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_on_signal(server))
    print(f"listening on {address[0]}:{address[1]}, TLS {'on' if SERVE_TLS else 'off'}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
