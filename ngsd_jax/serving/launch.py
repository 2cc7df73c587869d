"""`python -m ngsd_jax.serve` as a child process, for scripts, notebooks, benchmarks and tests: a
free loopback port, its stderr in a log file, ready once /health answers ok (every program
compiled), SIGTERM at the end (the server drains and exits) and --exit-after as a backstop, so
that no server outlives the process that started it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The server on 127.0.0.1 with `flags` (serve's own), and small JSON helpers to talk to it."""

    def __init__(self, log: Path, *flags, lifetime: float = 900, ready_timeout: float = 300, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "ngsd_jax.serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--exit-after", str(lifetime), *map(str, flags)]
        self._log_file = open(log, "w")  # noqa: SIM115  (the server's stderr, closed in stop)
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=self._log_file)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if self.get("/health")["status"] == "ok":
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start in {ready_timeout} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def post(self, path: str, body, timeout: float = 120) -> tuple[int, dict]:
        """(status, JSON body); `body` is sent as is when bytes, else as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics (0 when absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.get("/metrics").splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log_file.close()
