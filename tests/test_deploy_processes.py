"""`fedcare serve` and `fedcare site` as processes: stopped, restarted, resumed, refused.

Each test starts the real commands (``python -m fedcare.cli.main``) on 127.0.0.1,
marks each with an environment variable of its own (inherited by every process
Flower starts under it, in whatever session) to find all of them, and waits on
events (a log line, metrics.jsonl, summary.json, a process exit), never on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from loopback import free_port, rounds_done, three_site_config

from fedcare.runtime.supervise import marked_processes

SITES = ["site-0", "site-1", "site-2"]
TREE = "FEDCARE_TEST_TREE"
"""Environment variable marking one command and all its descendants in these tests."""


class Commands:
    """fedcare commands started as processes, each with its log and its process tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        self.home = root / "home"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)

    def start(self, name: str, *arguments: str) -> subprocess.Popen[bytes]:
        tree = uuid.uuid4().hex
        log = (self.root / "logs" / f"{name}.log").open("ab")
        # A home of their own: whatever Flower would put in ~/.flwr is seen.
        process = subprocess.Popen([sys.executable, "-m", "fedcare.cli.main", *arguments],
                                   env={**os.environ, TREE: tree, "HOME": str(self.home)},
                                   stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        self.processes[name] = (process, tree)
        return process

    def tree(self, name: str) -> list[int]:
        """Live processes of command `name` and every descendant (by the mark)."""
        return marked_processes(self.processes[name][1], TREE)

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-4000:]}" for name in self.processes)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 600
                   ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                     f"{self.logs()}")
            time.sleep(0.5)

    def wait_exit(self, name: str, timeout: float = 600) -> int:
        process = self.processes[name][0]
        self.wait_until(lambda: process.poll() is not None, f"{name} to exit", timeout)
        return int(process.returncode)

    def kill_all(self) -> None:
        for process, tree in self.processes.values():
            for pid in [process.pid, *marked_processes(tree, TREE)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[Commands]:
    started = Commands(tmp_path)
    yield started
    started.kill_all()


def write_config(path: Path, scheme: str = "plain", rounds: int = 2) -> Path:
    path.write_text(three_site_config(scheme, rounds).to_toml(), encoding="utf-8")
    return path


def serve(commands: Commands, name: str, config: Path, run_dir: Path, port: int,
          *extra: str) -> subprocess.Popen[bytes]:
    return commands.start(name, "serve", str(config), "--sites", ",".join(SITES),
                          "--run-dir", str(run_dir), "--address", f"127.0.0.1:{port}",
                          "--wait", "600", "--message-timeout", "300", *extra)


def site(commands: Commands, name: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return commands.start(name, "site", "--name", name, "--aggregator", f"127.0.0.1:{port}",
                          "--port", str(free_port()), "--state",
                          str(commands.root / f"state-{name}"), *extra)


def programs(commands: Commands, name: str) -> list[str]:
    """The programs running in command `name`'s tree: a script's name (``flwr-serverapp``)
    or a module's (``python -m fedcare.runtime.supernode``)."""
    found = []
    for pid in commands.tree(name):
        try:
            argv = [part.decode() for part in
                    Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        found.append(argv[2] if argv[1:2] == ["-m"] else Path(argv[min(1, len(argv) - 1)]).name)
    return found


# ----------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_a_signal_to_serve_or_site_stops_every_process_it_started(
        tmp_path: Path, commands: Commands) -> None:
    """SIGTERM and Ctrl-C (SIGINT) of a site, then Ctrl-C of `fedcare serve` (its SIGTERM:
    `test_an_aggregator_stopped_or_killed_mid_run_resumes_to_the_same_model`)."""
    port = free_port()
    serve(commands, "serve", write_config(tmp_path / "federation.toml", rounds=50),
          tmp_path / "run", port, "--insecure")
    for name in SITES:
        site(commands, name, port, "--insecure")
    # The whole tree is up: the SuperLink's detached SuperExec runs the ServerApp, which
    # has started rounds (a ClientApp per message at the sites).
    commands.wait_until(lambda: len(rounds_done(tmp_path / "run")) >= 1, "round 1")
    assert {"fedcare.runtime.superlink", "flower-superexec", "flwr-serverapp"} <= \
        set(programs(commands, "serve"))
    # The SuperNode and its SuperExec (with the warm ClientApp fork server).
    assert programs(commands, "site-0").count("fedcare.runtime.supernode") >= 2
    for name, signum in [("site-0", signal.SIGTERM), ("site-1", signal.SIGINT),
                         ("serve", signal.SIGINT)]:
        before = commands.tree(name)
        commands.processes[name][0].send_signal(signum)
        assert commands.wait_exit(name, timeout=120) == 128 + signum, commands.logs()
        commands.wait_until(lambda name=name: not commands.tree(name),  # type: ignore[misc]
                            f"every process of {name} to be gone", timeout=60)
        assert len(before) >= 3
    assert "are stopped" in commands.log("serve")


# ----------------------------------------------------------------------------- port, lock
def parse(*arguments: str) -> object:
    import argparse

    from fedcare.cli.deploy import add_deploy_parser

    parser = argparse.ArgumentParser()
    add_deploy_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(arguments))


def serve_args(run_dir: Path, port: int) -> object:
    return parse("serve", "--sites", ",".join(SITES), "--run-dir", str(run_dir),
                 "--address", f"127.0.0.1:{port}", "--insecure")


def test_serve_refuses_a_taken_port_before_starting_anything(tmp_path: Path) -> None:
    from fedcare.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = serve_args(tmp_path / "run", port)
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            args.handler(args)  # type: ignore[attr-defined]
    assert not (tmp_path / "run" / "flower" / "superlink.log").exists()


def test_serve_refuses_a_run_directory_another_aggregator_holds(tmp_path: Path) -> None:
    import fcntl

    from fedcare.errors import ConfigError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = (run_dir / "serve.lock").open("a+")
    holder.write(json.dumps({"pid": 4242, "token": "x", "started": "earlier"}))
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live `fedcare serve` holds it
    args = serve_args(run_dir, free_port())
    with pytest.raises(ConfigError, match="in use by another `fedcare serve` \\(pid 4242"):
        args.handler(args)  # type: ignore[attr-defined]
    holder.close()


def test_a_stale_lock_is_taken_over_and_what_its_holder_left_is_stopped(
        tmp_path: Path) -> None:
    from fedcare.runtime.supervise import MARK, RunDirectoryLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A SuperLink the killed aggregator left running (it carries the aggregator's mark).
    orphan = subprocess.Popen(["sleep", "600"], env={**os.environ, MARK: "deadbeef"})
    (run_dir / "serve.lock").write_text(json.dumps({"pid": dead.pid, "token": "deadbeef"}))
    said: list[str] = []
    lock = RunDirectoryLock(run_dir)
    lock.acquire("ours", log=said.append)
    try:
        assert orphan.wait(timeout=30) == -signal.SIGTERM
        assert said and "stopped 1 process(es) left running" in said[0]
        assert json.loads((run_dir / "serve.lock").read_text())["pid"] == os.getpid()
        second = RunDirectoryLock(run_dir)
        from fedcare.errors import ConfigError

        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            second.acquire("theirs", log=said.append)
    finally:
        lock.release()
    again = RunDirectoryLock(run_dir)  # released: free again
    again.acquire("again", log=said.append)
    again.release()


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_an_aggregator_stopped_or_killed_mid_run_resumes_to_the_same_model(
        tmp_path: Path, commands: Commands) -> None:
    """SIGTERM, then SIGKILL of `fedcare serve`, each time the documented restart (the same
    command): one model, every round once in the ledger, every round the hospital released
    in its own ledger, an intact audit log. (Ctrl-C takes SIGTERM's path: see
    `test_a_signal_to_serve_or_site_stops_every_process_it_started`.)"""
    from fedcare.cli.main import main
    from fedcare.data.datasets import build_federation
    from fedcare.privacy.ledger import PrivacyLedger
    from fedcare.runtime.local import LocalRuntime

    config = three_site_config("plain", rounds=3)
    config.privacy.level, config.privacy.secure = "record", False  # seeded noise: comparable
    # Room under the cap: a kill between a round's spend and its checkpoint has the
    # aggregator see that round twice.
    config.privacy.epsilon, config.privacy.noise_multiplier = 50.0, 1.5
    config_file = tmp_path / "federation.toml"
    config_file.write_text(config.to_toml(), encoding="utf-8")
    port = free_port()
    for name in SITES:  # seeded noise only in a loopback test (--insecure)
        policy = tmp_path / f"policy-{name}.toml"
        policy.write_text(f'seeded_noise = true\nledger = "ledger-{name}.jsonl"\n',
                          encoding="utf-8")
        site(commands, name, port, "--insecure", "--policy", str(policy))
    run_dir = tmp_path / "run"
    for attempt, signum in enumerate([signal.SIGTERM, signal.SIGKILL], 1):
        name = f"serve-{attempt}"
        serve(commands, name, config_file, run_dir, port, "--insecure")
        commands.wait_until(lambda n=attempt: len(rounds_done(run_dir)) >= n,  # type: ignore[misc]
                            f"round {attempt}")
        commands.processes[name][0].send_signal(signum)
        code = commands.wait_exit(name, timeout=120)
        assert code == (-signum if signum == signal.SIGKILL else 128 + signum), \
            commands.logs()
        # Killed outright, its children still go (the kernel's parent-death signal).
        commands.wait_until(lambda n=name: not commands.tree(n),  # type: ignore[misc]
                            f"every process of {name} to be gone", timeout=120)
    serve(commands, "serve-3", config_file, run_dir, port, "--insecure")
    assert commands.wait_exit("serve-3", timeout=900) == 0, commands.logs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert [r["round"] for r in rounds_done(run_dir)] == [1, 2, 3]
    final = torch.load(run_dir / "model.pt", weights_only=True)["params"]
    local = LocalRuntime(build_federation(config.data, private=True), config).run()
    assert torch.allclose(final, local, atol=1e-6, rtol=0)
    ledger = PrivacyLedger(None, delta=config.privacy.delta, accountant="pld", caps={})
    ledger.resume_from(run_dir / "privacy_ledger.jsonl", 3)
    for name in SITES:
        assert sorted(e.round for e in ledger.entries(name)) == [1, 2, 3]
        # The hospital's own ledger holds every round it released, a round the restarted
        # aggregator asked again included: the aggregator saw both.
        released = [json.loads(line)["round"] for line in
                    (tmp_path / f"ledger-{name}.jsonl").read_text().splitlines()]
        assert set(released) == {1, 2, 3} and len(released) >= 3
    assert main(["verify", str(run_dir)]) == 0
    assert "resuming" in commands.log("serve-3")


# ----------------------------------------------------------------------------- config paths
def test_relative_paths_in_a_config_are_relative_to_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_cli import SCHEMA_TOML, write_site_csvs

    from fedcare.cli.main import main
    from fedcare.config import RunConfig

    project = tmp_path / "project"
    write_site_csvs(project / "sites", {"north": 40, "south": 40})
    (project / "schema.toml").write_text(SCHEMA_TOML, encoding="utf-8")
    config = project / "federation.toml"
    config.write_text('out = "runs"\n[data]\ndata_dir = "sites"\nschema = "schema.toml"\n'
                      f'files = []\n[protection]\nkeys = "{tmp_path / "keys"}"\n',
                      encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = RunConfig.load(Path("..") / "project" / "federation.toml")
    assert loaded.data.data_dir == str(project / "sites")
    assert loaded.data.schema == str(project / "schema.toml")
    assert loaded.out == str(project / "runs")
    assert loaded.protection.keys == str(tmp_path / "keys")  # absolute: kept
    loaded.set("data.schema=other.toml")  # the command line: the working directory's
    assert loaded.data.schema == str(elsewhere / "other.toml")
    # `fedcare run` reads the same file from anywhere.
    assert main(["run", str(config), "--rounds", "1", "--no-baselines", "--quiet"]) == 0
    assert list((project / "runs").glob("*/summary.json"))
    assert not (elsewhere / "runs").exists()


# ----------------------------------------------------------------------------- refused sites
def test_a_refused_site_is_asked_again_once_it_reconnects() -> None:
    """A site refused for its data (the coordinator sees the category only) is let in once
    its operator fixed the file and restarted it: the SuperLink says it activated again."""
    import math

    from flwr.proto.node_pb2 import NodeInfo

    from fedcare.config import RunConfig
    from fedcare.errors import ProtocolError
    from fedcare.runtime.flower_server import FanOut, Roster, ServerSettings
    from fedcare.runtime.flower_site import SiteHello

    asked: list[int] = []
    fixed = {"data": False}

    class Grid:
        def __init__(self, activated: str) -> None:
            self.activated = activated

        def get_nodes(self) -> list[object]:
            return [NodeInfo(node_id=7, last_activated_at=self.activated)]

    class Messenger:
        def ask_many(self, requests: list[tuple[int, ...]]) -> dict[str, object]:
            asked.extend(int(r[0]) for r in requests)
            return {str(r[0]): SiteHello("site-0", 13, None, math.inf) if fixed["data"] else
                    ProtocolError("site 'site-0': its data do not match the federation's "
                                  "schema (SchemaError)") for r in requests}

    logged: list[str] = []
    roster = Roster(RunConfig(), ServerSettings(roster=("site-0",)), Messenger(),  # type: ignore[arg-type]
                    FanOut(Messenger(), lambda round_number: []),  # type: ignore[arg-type]
                    logged.append)
    roster.refresh(Grid("10:00"))  # type: ignore[arg-type]
    assert roster.connected() == [] and "(SchemaError)" in roster.refusals[7]
    roster.refresh(Grid("10:00"))  # type: ignore[arg-type]
    assert asked == [7]  # not asked again while it stays as it was
    fixed["data"] = True
    roster.refresh(Grid("10:05"))  # type: ignore[arg-type]  # restarted: activated again
    assert asked == [7, 7]
    assert roster.connected() == ["site-0"] and not roster.refusals


# ----------------------------------------------------------------------------- sites
def certs_args(directory: Path) -> tuple[str, ...]:
    return ("--certs", str(directory))


@pytest.mark.slow
def test_a_site_says_why_it_is_not_in_and_keeps_trying(
        tmp_path: Path, commands: Commands) -> None:
    """Before the coordinator: waiting. Then, with TLS: not registered, a certificate from
    another CA, a name the coordinator's certificate does not hold. Each site keeps trying."""
    from fedcare.runtime.flower_deploy import make_certificates

    ours = make_certificates(tmp_path / "certs", SITES, hosts=("127.0.0.1",))
    theirs = make_certificates(tmp_path / "theirs", SITES)
    port = free_port()
    site(commands, "site-0", port, *certs_args(ours.ca.parent))  # not registered below
    commands.start("site-1", "site", "--name", "site-1", "--aggregator", f"localhost:{port}",
                   "--port", str(free_port()), *certs_args(ours.ca.parent))
    site(commands, "site-2", port, *certs_args(theirs.ca.parent))
    for name in SITES:
        commands.wait_until(lambda n=name: f"site {n}: waiting for the coordinator at "  # type: ignore[misc]
                            in commands.log(n), f"{name} to say it waits")
    serve(commands, "serve", write_config(tmp_path / "federation.toml"), tmp_path / "run",
          port, "--certs", str(ours.ca.parent), "--sites", "site-1,site-2")
    commands.wait_until(lambda: "site site-0: the coordinator's SuperLink refused this "
                        "site's node key: it is not registered" in commands.log("site-0"),
                        "site-0 to say it is not registered")
    commands.wait_until(lambda: "not for 'localhost' (certificate name mismatch)"
                        in commands.log("site-1"), "site-1 to name the certificate's names")
    commands.wait_until(lambda: "was not issued by this site's CA" in commands.log("site-2"),
                        "site-2 to say the coordinator's certificate is another CA's")
    for name in SITES:
        assert commands.processes[name][0].poll() is None  # still trying
        assert "Connection attempt failed" not in commands.log(name)
        assert "\x1b[" not in commands.log(name)  # a file: no colour codes
    assert "\x1b[" not in (tmp_path / "run" / "flower" / "superlink.log").read_text()


@pytest.mark.slow
def test_sites_started_before_the_coordinator_join_and_stay_for_the_next_job(
        tmp_path: Path, commands: Commands) -> None:
    from fedcare.runtime.flower_deploy import make_certificates

    certs = make_certificates(tmp_path / "certs", SITES).ca.parent
    port = free_port()
    for name in SITES:  # before the coordinator; their keys get registered after it starts
        site(commands, name, port, *certs_args(certs))
    config = write_config(tmp_path / "federation.toml", rounds=1)
    for job in ("job-1", "job-2"):  # a new job: a new run directory, a new SuperLink state
        serve(commands, job, config, tmp_path / job, port, *certs_args(certs))
        assert commands.wait_exit(job, timeout=900) == 0, commands.logs()
        summary = json.loads((tmp_path / job / "summary.json").read_text())
        assert summary["status"] == "completed", summary.get("error")
        assert [r["participants"] for r in rounds_done(tmp_path / job)] == [SITES]
    for name in SITES:
        assert commands.processes[name][0].poll() is None, commands.log(name)
        log = commands.log(name)
        assert "Traceback" not in log, log[log.find("Traceback") - 1500:][:5000]
        assert commands.log(name).count("connected to the coordinator") >= 2
    # Flower's files stay in the run directory and the site's state, private.
    assert not (commands.home / ".flwr").exists()
    apps = tmp_path / "state-site-0" / "flower" / "apps"
    assert len(list(apps.iterdir())) <= 1  # this job's only, not one per job
    for job in ("job-1", "job-2"):
        assert stat.S_IMODE((tmp_path / job / "flower").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / job / "flower" / "superlink.db").stat().st_mode) \
            == 0o600


def test_a_site_says_each_reason_at_most_once_a_minute(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    from fedcare.runtime import site_link

    now = [0.0]
    monkeypatch.setattr(site_link.time, "monotonic", lambda: now[0])
    said: list[str] = []
    status = site_link.StatusLine(said.append)
    forwarded: list[str] = []
    watch = site_link.SupernodeWatch(forwarded.append)
    for second in range(0, 130, 5):  # Flower's line for every attempt, for two minutes
        now[0] = float(second)
        watch("\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 4.2 seconds")
        status(watch.reason("coordinator:9092", None, 0))
    assert forwarded == []  # none of them in the site's log
    assert said == ["waiting for the coordinator at coordinator:9092 (not answering); "
                    "retrying"] * 3  # at 0, 60 and 120 s
    status("something else")  # a new reason: at once
    assert said[-1] == "something else"
    watch("[code: 2004] Failed to activate SuperNode.")
    assert "not registered" in watch.reason("coordinator:9092", None, 1)
    # Flower's heartbeat thread dies with a traceback when a new SuperLink no longer knows
    # the node (HTTP 401): the status line says so instead. Any other traceback is kept.
    heartbeat = ["Exception in thread Thread-2 (_run):", "Traceback (most recent call last):",
                 '  File "flwr/supercore/heartbeat.py", line 98, in _run',
                 "INFO:     Shutting down",  # another thread's line, in between
                 "    self._retry_invoker.invoke(self._heartbeat)",
                 "httpx.HTTPStatusError: Client error '401 Unauthorized' for url 'https://x'",
                 "For more information check: https://developer.mozilla.org/401"]
    other = ["Exception in thread Thread-3 (_run):", "Traceback (most recent call last):",
             '  File "x.py", line 1, in f', "RuntimeError: something else"]
    interrupted = ["Traceback (most recent call last):", '  File "<frozen runpy>", line 198',
                   "KeyboardInterrupt"]  # the SuperExec, as its SuperNode ends
    for line in [*heartbeat, *interrupted, *other]:
        watch(line)
    assert forwarded == ["[code: 2004] Failed to activate SuperNode.",
                         "INFO:     Shutting down", *other]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_supervisor_stopped_or_killed_leaves_no_descendant(signum: int, tmp_path: Path
                                                             ) -> None:
    """Even a grandchild in a session of its own (as the SuperLink starts its SuperExec) and
    a wrapper killed outright (SIGKILL: no handler runs) leave nothing behind."""
    token = uuid.uuid4().hex
    script = tmp_path / "wrapper.py"
    script.write_text(f"""
import os, sys
from fedcare.runtime.supervise import Stopped, Supervisor, stop_signals
with Supervisor({token!r}) as supervisor:
    try:
        with stop_signals():
            supervisor.start("a", ["sleep", "600"], os.environ, on_line=print)
            supervisor.start("b", ["sh", "-c", "setsid sleep 601 & exec sleep 602"],
                             os.environ, on_line=print)
            print("started", flush=True)
            supervisor.children["a"].wait()
    except Stopped as stop:
        sys.exit(stop.exit_code)
""", encoding="utf-8")
    wrapper = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert wrapper.stdout is not None and wrapper.stdout.readline() == b"started\n"
    deadline = time.monotonic() + 60
    while len(marked_processes(token)) < 3:  # sleep 600, sleep 602, the detached sleep 601
        assert time.monotonic() < deadline, marked_processes(token)
        time.sleep(0.1)
    wrapper.send_signal(signum)
    assert wrapper.wait(timeout=60) == (-signum if signum == signal.SIGKILL else 128 + signum)
    while marked_processes(token):
        assert time.monotonic() < deadline + 60, marked_processes(token)
        time.sleep(0.1)
