"""Helpers for tests that start a real server on 127.0.0.1 (MLflow, Prefect, Chromium's DevTools)."""

import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    """Poll `url` until it answers; fail with the server's output if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read()[-3000:] if process.stdout else ""
            raise AssertionError(f"the server exited early:\n{output}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


class FailingProxy:
    """A reverse proxy on 127.0.0.1 in front of a real server: it passes every request on, except that while
    `failing` is set it answers the requests `fails(method, path)` picks with a 503, as an overloaded server would;
    with `after`, only once a request `after(method, path)` picks has gone through (the server falls over mid-way)."""

    def __init__(self, upstream: str, fails, after=None) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.failing, self.failed = False, []
        self._armed = after is None

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.failing and not proxy._armed and after(self.command, self.path):
                    proxy._armed = True
                elif proxy.failing and proxy._armed and fails(self.command, self.path):
                    proxy.failed.append(f"{self.command} {self.path}")
                    self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "overloaded"}', "application/json")
                    return
                request = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() in ("content-type", "accept", "authorization")})
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        self._answer(response.status, response.read(), response.headers.get("Content-Type"))
                except urllib.error.HTTPError as error:
                    self._answer(error.code, error.read(), error.headers.get("Content-Type"))

            def _answer(self, status: int, body: bytes, kind: str | None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
