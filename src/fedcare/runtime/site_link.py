"""Keeping a site connected: its SuperNode restarted until stopped, and why it is not in.

``flower-supernode`` gives up, exiting, when the SuperLink refuses its key
(not registered yet: `fedcare serve` registers keys a few seconds apart after
it starts), when the TLS handshake fails, and when a new SuperLink no longer
knows its node (a new job: HTTP 401, then it stops itself); while the
SuperLink is unreachable it retries forever, logging every attempt.
`keep_site_connected` runs it under a `Supervisor` and

* restarts it with backoff (1 s doubling to `MAX_BACKOFF`, back to 1 s once
  it was connected) until the site's operator stops ``fedcare site``;
* says, at most once a minute for the same reason, what is going on in the
  operator's words (`SupernodeWatch.reason`, `tls_problem`): waiting for the
  coordinator, not registered, the coordinator's certificate from another CA
  or for another name;
* keeps Flower's per-attempt "Connection attempt failed" lines out of the
  site's log, and strips colour codes when the log is a file.

A job the site refuses (its data fail the schema, its policy refuses the
job) does not stop the SuperNode: the refusal with its details is in the
site's log (`fedcare.runtime.flower_site.error_reply`), the coordinator gets
its category, and once the operator has fixed the cause and restarted
``fedcare site`` the node activates again and the coordinator asks it again.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedcare.runtime.supervise import Supervisor

MAX_BACKOFF = 30.0
"""Seconds, at most, between two starts of the SuperNode."""
STATUS_INTERVAL = 60.0
"""Seconds, at least, between two lines giving the same reason."""

_RETRY_LINE = "Connection attempt failed"
_NOT_REGISTERED = "Failed to activate SuperNode"
_TLS_MARKS = ("SSL/TLS handshake error", "CERTIFICATE_VERIFY_FAILED", "SSLError")
_CONNECTED = "SuperNode ID:"
_RECONNECTED = "Connection successful after"
_THREAD_FAILED = "Exception in thread"
_UNAUTHORIZED = "401 Unauthorized"
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_]\w*\.)*\w*(Error|Exception|Interrupt|Exit)(: |$)")
"""The last line of a traceback (``httpx.HTTPStatusError: ...``)."""


@dataclass
class SupernodeWatch:
    """What one ``flower-supernode`` process said, read line by line (``on_line``)."""

    forward: Callable[[str], None]
    connected: bool = False
    retrying_since: float | None = None
    not_registered: bool = False
    tls_failed: bool = False
    last_lines: list[str] = field(default_factory=list)
    _traceback: list[str] = field(default_factory=list)
    _skip_note: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, line: str) -> None:
        with self._lock:
            if _RETRY_LINE in line:  # every attempt: summarised by the status line instead
                if self.retrying_since is None:
                    self.retrying_since = time.monotonic()
                return
            if _CONNECTED in line or _RECONNECTED in line:
                self.connected, self.retrying_since = True, None
            self.not_registered |= _NOT_REGISTERED in line
            self.tls_failed |= any(mark in line for mark in _TLS_MARKS)
            self.last_lines = [*self.last_lines[-5:], line]
            if self._skip_note and line.startswith("For more information check:"):
                self._skip_note = False
                return
            if self._traceback or line.startswith((_THREAD_FAILED, "Traceback")):
                lines = self._held(line)
            else:
                lines = [line]
        for held in lines:
            self.forward(held)

    def _held(self, line: str) -> list[str]:
        """Hold a traceback until its last line. Two are expected and left out: Flower's
        heartbeat thread dies with one when a new SuperLink answers 401 (it no longer
        knows the node), which `reason` says in words, and the SuperNode's SuperExec,
        interrupted by Flower's parent watch when the SuperNode ends (KeyboardInterrupt);
        any other traceback is passed on whole."""
        if not line.strip() or line.startswith(
                (_THREAD_FAILED, "Traceback", " ", "During handling", "The above exception")):
            self._traceback.append(line)
            return []
        if not _EXCEPTION_LINE.match(line):
            return [line]  # another thread's line in between
        block, self._traceback = [*self._traceback, line], []
        if _UNAUTHORIZED in line:
            self._skip_note = True  # httpx's second line of the message
            return []
        if line.strip() == "KeyboardInterrupt":  # its SuperExec, stopped as it ends
            return []
        return block

    def flush(self) -> None:
        """Pass on a traceback still held when the SuperNode exited."""
        with self._lock:
            block, self._traceback = self._traceback, []
        for line in block:
            self.forward(line)

    def reason(self, aggregator: str, ca: Path | None, exit_code: int) -> str:
        """Why the SuperNode exited, for the site's operator."""
        if self.not_registered:
            return ("the coordinator's SuperLink refused this site's node key: it is not "
                    "registered (yet). `fedcare serve` registers every site's key from its "
                    "certificate a few seconds after it starts; if this goes on, the "
                    "coordinator's --sites or certificate for this site is not the one this "
                    "site holds. Retrying")
        if self.tls_failed and ca is not None:
            problem = tls_problem(aggregator, ca)
            if problem:
                return f"refused because {problem} Retrying"
        if not self.connected:
            return _waiting(aggregator)
        if exit_code in (0, -2, 130):  # Flower stops itself (SIGINT) on HTTP 401
            return ("the coordinator's SuperLink ended this node's connection (it no longer "
                    "knows the node: started again with a new state, e.g. for a new job); "
                    "reconnecting")
        tail = " | ".join(line.strip() for line in self.last_lines[-2:] if line.strip())
        return f"the SuperNode stopped (exit code {exit_code}: {tail}); restarting"


def _waiting(aggregator: str) -> str:
    return f"waiting for the coordinator at {aggregator} (not answering); retrying"


def tls_problem(aggregator: str, ca: Path) -> str:
    """What is wrong with the coordinator's TLS certificate, seen from this site ('' if
    nothing or it cannot be reached)."""
    host, _, port = aggregator.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                ssl.create_default_context(cafile=str(ca)).wrap_socket(
                    raw, server_hostname=host):
            return ""
    except ssl.SSLCertVerificationError as exc:
        failure = exc
    except (OSError, ValueError):
        return ""
    seen = _peer_certificate(host, int(port))
    names: list[str] = []
    issuer = "?"
    if seen is not None:
        issuer = ", ".join(str(a.value) for a in seen.issuer.get_attributes_for_oid(
            NameOID.COMMON_NAME)) or seen.issuer.rfc4514_string()
        try:
            alt = seen.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n) for n in alt.get_values_for_type(x509.DNSName)] + \
                    [str(n) for n in alt.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            pass
    if failure.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return (f"the coordinator's certificate is valid for {names}, not for {host!r} "
                "(certificate name mismatch): give --aggregator one of those names, or ask "
                f"the coordinator for an aggregator certificate made with --host {host}.")
    ours = x509.load_pem_x509_certificate(ca.read_bytes()).subject.rfc4514_string()
    if failure.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"the coordinator's certificate has expired ({failure.verify_message})."
    return (f"the coordinator's certificate (issued by {issuer!r}) was not issued by this "
            f"site's CA {ca} ({ours}): wrong CA, e.g. files of another `fedcare certs`; ask "
            f"the coordinator for the federation's ca.crt ({failure.verify_message}).")


def _peer_certificate(host: str, port: int) -> x509.Certificate | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    return None if der is None else x509.load_der_x509_certificate(der)


class StatusLine:
    """Says a reason at once when it changes, and again at most every `interval` s."""

    def __init__(self, say: Callable[[str], None], interval: float = STATUS_INTERVAL) -> None:
        self.say, self.interval = say, interval
        self._last: tuple[str, float] | None = None

    def __call__(self, reason: str) -> None:
        now = time.monotonic()
        if self._last is None or self._last[0] != reason or now - self._last[1] >= self.interval:
            self.say(reason)
            self._last = (reason, now)


def keep_site_connected(command: list[str], env: Mapping[str, str], *, aggregator: str,
                        ca: Path | None, flower_home: Path, say: Callable[[str], None],
                        forward: Callable[[str], None]) -> None:
    """Run ``flower-supernode`` (`command`) until the caller is stopped (`Stopped`).

    Parameters
    ----------
    command, env
        The SuperNode's command and environment (``FLWR_HOME`` is set to `flower_home`).
    aggregator : str
        HOST:PORT of the coordinator, for the messages and the TLS check.
    ca : Path or None
        The federation's CA certificate (None: insecure loopback test).
    flower_home : Path
        Where the ClientApps unpack each job's app (``apps/``): emptied before every
        start, so it does not grow a folder per job.
    say, forward
        Where the status lines, and the SuperNode's own output, go.
    """
    status = StatusLine(say)
    backoff = 1.0
    env = {**env, "FLWR_HOME": str(flower_home)}
    while True:
        shutil.rmtree(flower_home / "apps", ignore_errors=True)
        watch = SupernodeWatch(forward)
        announced = False
        with Supervisor() as supervisor:
            node = supervisor.start("supernode", command, env, on_line=watch)
            while True:
                try:
                    exit_code = node.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if watch.connected and not announced:
                    say(f"connected to the coordinator at {aggregator}")
                    announced, backoff = True, 1.0
                if watch.retrying_since is not None:
                    status(_waiting(aggregator))
            # Its SuperExec and ClientApps follow it (Flower's parent watch): a signal now
            # would interrupt their own orderly exit, with a traceback in the site's log.
            supervisor.wait_for_exit(None, timeout=15.0)
        watch.flush()
        status(watch.reason(aggregator, ca, exit_code))
        time.sleep(backoff)
        backoff = min(2 * backoff, MAX_BACKOFF)
