"""The processes `fedcare serve` and `fedcare site` start: stopped together, never orphaned.

Flower's programs start their own children: the SuperLink starts a SuperExec
in a session of its own (``get_popen_detach_kwargs``), which starts the
ServerApp; a SuperNode starts a SuperExec, which starts one ClientApp per
message. Killing the first process alone leaves the rest running. A
`Supervisor` therefore

* marks every process it starts, and so all their descendants, with an
  environment variable (``FEDCARE_SUPERVISOR=<token>``): they are found by
  that mark in ``/proc`` even after their parent died and they were
  re-parented, in whatever session they run;
* starts each child in a session of its own (Ctrl-C in the terminal reaches
  the wrapper only, which stops the rest in order) with ``PR_SET_PDEATHSIG``:
  if the wrapper itself is killed (SIGKILL), its children get SIGTERM from the
  kernel;
* starts a watchdog (``python -m fedcare.runtime.supervise TOKEN``) that
  waits for the end of a pipe only the wrapper holds: when the wrapper is
  gone, however it went, the watchdog stops every marked process. Flower's
  own parent watches (``--parent-pid``) are not enough: a ServerApp whose
  SuperLink is gone hangs in its exit handler (seen with Flower 1.42);
* stops them all (`Supervisor.stop`): SIGTERM to every marked process, then
  SIGKILL to what is still there after a grace period;
* pipes their output through `Supervisor.start`'s ``on_line``, without
  Flower's colour codes when it goes to a file or a pipe.

`stop_signals` turns SIGTERM and SIGINT into `Stopped`, so the wrapper's
``finally`` blocks run (Python's default for SIGTERM ends the process at once).
`RunDirectoryLock` lets one aggregator at a time drive a run directory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from types import FrameType
from typing import IO

from fedcare.errors import ConfigError

MARK = "FEDCARE_SUPERVISOR"
"""Environment variable holding a supervisor's token in every process it started."""

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not load it


class Stopped(BaseException):
    """The wrapper was asked to stop (SIGTERM or SIGINT); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number."""
        return 128 + self.signum


@contextmanager
def stop_signals() -> Iterator[None]:
    """Raise `Stopped` in the main thread on the first SIGTERM or SIGINT (restored after)."""

    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:  # a second signal must not interrupt the stop under way
            stopping = True
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def strip_colour(text: str) -> str:
    """`text` without ANSI colour codes (Flower's log levels are coloured)."""
    return _COLOUR.sub("", text)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def marked_processes(token: str, variable: str = MARK) -> list[int]:
    """Ids of the live processes whose environment holds ``variable=token``
    (default ``FEDCARE_SUPERVISOR=token``)."""
    needle = f"{variable}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def stop_marked(token: str, grace: float = 15.0,
                which: Callable[[list[int]], list[int]] = lambda pids: pids) -> int:
    """SIGTERM every process marked with `token` (of those, `which`), SIGKILL what is left
    after `grace` s.

    Returns how many there were. Repeats until none is left, since a process
    may start another (a SuperExec its next task) while being stopped.
    """
    stopped: set[int] = set()
    deadline = time.monotonic() + grace
    while pids := which(marked_processes(token)):
        fresh = [pid for pid in pids if pid not in stopped]
        _signal_all(fresh, signal.SIGTERM)
        stopped.update(fresh)
        if time.monotonic() > deadline:
            _signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)
    return len(stopped)


class Supervisor:
    """Starts Flower's programs as marked children and stops them and their descendants.

    Parameters
    ----------
    token : str, optional
        The mark (default: a fresh random one). `RunDirectoryLock` records it so
        that the next aggregator on the same run directory can stop what a killed
        one left behind.
    stop_first : sequence of str
        Programs stopped before the others (`running`): the ServerApp, whose exit
        handler reports to the SuperLink, while the SuperLink still runs.
    """

    def __init__(self, token: str | None = None, stop_first: Sequence[str] = ()) -> None:
        self.token = token or secrets.token_hex(8)
        self.stop_first = tuple(stop_first)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._pumps: list[threading.Thread] = []
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None

    def _start_watchdog(self) -> None:
        """The watchdog reads a pipe whose writing end only this process holds (pipes are
        not inherited): end of file means this process is gone."""
        read, self._lifeline = os.pipe()
        env = {key: value for key, value in os.environ.items() if key != MARK}
        self._watchdog = subprocess.Popen([sys.executable, "-m", __name__, self.token],
                                          stdin=read, env=env, start_new_session=True)
        os.close(read)

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        return {**env, MARK: self.token}

    def start(self, name: str, command: list[str], env: Mapping[str, str], *,
              on_line: Callable[[str], None]) -> subprocess.Popen[bytes]:
        """Start `command` as child `name`; each line of its output goes to `on_line`."""
        if self._watchdog is None:
            self._start_watchdog()
        process = subprocess.Popen(command, env=self.environment(env), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        self.children[name] = process
        assert process.stdout is not None
        pump = threading.Thread(target=_pump, args=(process.stdout, on_line), daemon=True,
                                name=f"output of {name}")
        pump.start()
        self._pumps.append(pump)
        return process

    def running(self, program: str, among: list[int] | None = None) -> list[int]:
        """Marked processes (or those of `among`) running `program` (the name of their
        executable or script)."""
        found = []
        for pid in marked_processes(self.token) if among is None else among:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(part.decode(errors="replace")).name == program for part in argv[:2]):
                found.append(pid)
        return found

    def _among(self, program: str, pids: list[int]) -> list[int]:
        return self.running(program, among=pids)

    def wait_for_exit(self, program: str | None, timeout: float) -> None:
        """Wait up to `timeout` s for every marked process running `program` (None: every
        marked process) to end by itself."""
        deadline = time.monotonic() + timeout
        while (self.running(program) if program else marked_processes(self.token)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self, grace: float = 15.0) -> int:
        """Stop every child and descendant; return how many processes there were."""
        count = 0
        for program in self.stop_first:
            count += stop_marked(self.token, grace, partial(self._among, program))
        count += stop_marked(self.token, grace)
        for process in self.children.values():
            process.wait()
        for pump in self._pumps:
            pump.join(timeout=5)
        self.children.clear()
        self._pumps.clear()
        if self._lifeline is not None and self._watchdog is not None:
            os.close(self._lifeline)  # nothing left to stop: the watchdog ends
            self._watchdog.wait()
            self._lifeline = self._watchdog = None
        return count

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _pump(stream: IO[bytes], on_line: Callable[[str], None]) -> None:
    with stream:
        for raw in stream:
            on_line(raw.decode("utf-8", errors="replace").rstrip("\n"))


def console_writer(stream: IO[str] | None = None) -> Callable[[str], None]:
    """An ``on_line`` that prints to `stream` (stdout), keeping colours only on a terminal."""
    out = stream or sys.stdout
    plain = not out.isatty()
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            out.write((strip_colour(line) if plain else line) + "\n")
            out.flush()

    return write


def file_writer(path: Path) -> Callable[[str], None]:
    """An ``on_line`` that appends to `path` (mode 0600), without colour codes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    out = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            out.write(strip_colour(line) + "\n")

    return write


# --------------------------------------------------------------------------- ports
def check_port_free(host: str, port: int) -> None:
    """`ConfigError` naming the port if something already listens on (host, port)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}.") from None
            raise ConfigError(
                f"port {port} on {host} is already in use (another `fedcare serve`, or a "
                f"flower-superlink left running?). See what holds it with `ss -ltnp "
                f"'sport = :{port}'`, stop it, or choose another --address.") from None


def wait_for_port(host: str, port: int, timeout: float,
                  process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something listens on (host, port); `ConfigError` after `timeout` seconds
    or as soon as `process` (the program that should listen) exits."""
    deadline = time.monotonic() + timeout
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ConfigError(f"the SuperLink exited (code {process.returncode}) before "
                              f"listening on {host}:{port}; see its log.")
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((target, port)) == 0:
                return
        time.sleep(0.2)
    raise ConfigError(f"the SuperLink did not start listening on {host}:{port} within "
                      f"{timeout:g} s; see its log.")


# --------------------------------------------------------------------------- run directory
LOCK_FILE = "serve.lock"


class RunDirectoryLock:
    """One aggregator at a time on a run directory: an exclusive ``flock`` on ``serve.lock``.

    The kernel releases the lock when its holder dies, however it dies, so a
    lock is never stale in the sense of blocking forever; the file keeps the
    last holder's pid and supervisor token. Taking over from a holder that is
    gone (killed), `acquire` first stops the processes it left behind (its
    SuperLink and ServerApp, found by the token), so two aggregators never
    drive one run directory.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, token: str, log: Callable[[str], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise ConfigError(
                f"run directory {self.path.parent} is in use by another `fedcare serve` "
                f"(pid {holder.get('pid', '?')}, started {holder.get('started', '?')}): one "
                "aggregator at a time. Stop it first (kill PID; it stops its SuperLink and "
                "ServerApp), or use another --run-dir.") from None
        previous = self._read(fd)
        if previous.get("token"):
            left = stop_marked(str(previous["token"]))
            if left:
                log(f"stopped {left} process(es) left running by the previous aggregator on "
                    f"this run directory (pid {previous.get('pid')}, no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "token": token,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, object]:
        try:
            content = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
        return content if isinstance(content, dict) else {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file keeps the last holder
            self._fd = None


def _watch(token: str) -> None:
    """The watchdog's body: wait for the supervisor's end, then stop what it left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    stop_marked(token)


if __name__ == "__main__":
    _watch(sys.argv[1])
