"""``fedcare certs``, ``fedcare serve`` and ``fedcare site``: a deployment across machines.

Flower is the network engine (`fedcare.runtime.flower_deploy`): ``serve``
starts Flower's SuperLink with TLS and node authentication, registers the
sites' node keys and submits the federation's run; ``site`` checks the
site's certificate and starts Flower's SuperNode with the site's identity
and node configuration; ``certs`` makes a test deployment's CA and keys.
docs/deployment.md walks through a three-site deployment.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from fedcare.cli.keys import warn_if_in_git_work_tree
from fedcare.errors import ConfigError, FedcareError
from fedcare.privacy.policy import SitePolicy
from fedcare.runtime.supervise import (
    RunDirectoryLock,
    Stopped,
    Supervisor,
    check_port_free,
    console_writer,
    file_writer,
    stop_signals,
    wait_for_port,
)


def add_deploy_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``certs``, ``serve`` and ``site`` under `commands`.

    Each sets ``handler`` (``Namespace -> int``, the exit code) on the parsed
    arguments; a handler raises `fedcare.errors.FedcareError` for a bad input.
    """
    certs = commands.add_parser(
        "certs", help="make a CA, the aggregator's certificate and one key pair per site",
        description="Write DIR/ca.crt and ca.key (keep the key offline), aggregator.crt and "
                    "aggregator.key (the SuperLink's TLS), and NAME.crt / NAME.key per site "
                    "(the site's node identity). For a test deployment; a production one "
                    "uses the hospitals' own PKI the same way. `fedcare certs add-site NAME "
                    "--certs DIR` issues one more site's key pair and certificate with the "
                    "CA in DIR (ca.key needed) and changes nothing else.")
    certs.add_argument("directory", metavar="DIR | add-site")
    certs.add_argument("site", nargs="?", metavar="NAME", help="with add-site: the new site")
    certs.add_argument("--sites", metavar="A,B,C", help="site names")
    certs.add_argument("--certs", dest="certs_dir", metavar="DIR",
                       help="with add-site: the fedcare certs directory holding ca.key")
    certs.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="a name or address the aggregator is reached at (repeatable; "
                            "default localhost and 127.0.0.1)")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")
    certs.set_defaults(handler=cmd_certs)

    serve = commands.add_parser(
        "serve", help="run the aggregator: Flower SuperLink, site registration, the run",
        description="Start flower-superlink (TLS with DIR/aggregator.crt, SuperNode "
                    "authentication), register every site whose certificate the CA signed, "
                    "and run the federation of CONFIG; checkpoints go to RUN_DIR, and "
                    "running the same command again resumes after the last completed round.")
    serve.add_argument("config", nargs="?", help="TOML config file (as for fedcare run)")
    serve.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config key")
    serve.add_argument("--certs", metavar="DIR", help="fedcare certs directory (ca.crt, "
                       "aggregator.crt/.key, NAME.crt per site; site keys are not needed)")
    serve.add_argument("--sites", required=True, metavar="A,B,C",
                       help="the federation's sites, in order (fixes their random streams)")
    serve.add_argument("--run-dir", required=True, metavar="RUN_DIR",
                       help="run directory (resumed if it holds "
                       "a checkpoint)")
    serve.add_argument("--address", default="0.0.0.0:9092", metavar="HOST:PORT",
                       help="where the SuperLink listens (default 0.0.0.0:9092)")
    serve.add_argument("--insecure", action="store_true",
                       help="no TLS, no node authentication (loopback tests only)")
    serve.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                       help="how long to wait for the sites before the first round")
    serve.add_argument("--message-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="how long a site has to answer one message")
    serve.set_defaults(handler=cmd_serve)

    site = commands.add_parser(
        "site", help="run a site: check its certificate, start its Flower SuperNode",
        description="Check NAME.crt against the federation's CA and NAME.key, then start "
                    "flower-supernode with that identity. The site's data, its own privacy "
                    "cap and its CKKS keys stay on this machine: only protected updates "
                    "leave it.")
    site.add_argument("--name", required=True, help="this site's name (as in its certificate)")
    site.add_argument("--aggregator", metavar="HOST:PORT",
                      help="the coordinator's SuperLink (not needed with --budget)")
    site.add_argument("--certs", metavar="DIR",
                      help="directory with ca.crt, NAME.crt and NAME.key")
    site.add_argument("--data", default="", metavar="FILE",
                      help="this site's CSV/Parquet file (default: the bundled dataset's site)")
    site.add_argument("--policy", metavar="FILE",
                      help="this hospital's privacy policy (TOML, fedcare.privacy.policy): "
                           "minimum privacy level, epsilon caps, delta, limits, ledger; "
                           "the flags below override its keys")
    site.add_argument("--min-privacy", choices=("none", "record", "site"), default=None,
                      help="the weakest privacy.level this site runs (policy min_level; "
                           "default none)")
    site.add_argument("--epsilon-cap", type=float, default=None, metavar="EPSILON",
                      help="the most one job may spend at this site (policy epsilon)")
    site.add_argument("--lifetime-epsilon", type=float, default=None, metavar="EPSILON",
                      help="the most every job together may spend at this site, ever "
                           "(policy lifetime_epsilon)")
    site.add_argument("--state", default="", metavar="DIR",
                      help="where the site keeps its resolved policy and, unless the policy "
                           "names one, its ledger (default ./fedcare-site-NAME)")
    site.add_argument("--budget", action="store_true",
                      help="print what this site's ledger has spent and what is left, then exit")
    site.add_argument("--keys", default="", metavar="DIR", help="directory with site.ckks")
    site.add_argument("--port", type=int, default=9094,
                      help="local port of the SuperNode's own runtime API (default 9094)")
    site.add_argument("--insecure", action="store_true",
                      help="no TLS, no identity (loopback tests only)")
    site.set_defaults(handler=cmd_site)


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_certs(args: argparse.Namespace) -> int:
    from fedcare.runtime.flower_deploy import add_site, make_certificates

    if args.directory == "add-site":
        if not args.site or not args.certs_dir:
            raise ConfigError("usage: fedcare certs add-site NAME --certs DIR")
        cert, key = add_site(args.certs_dir, args.site)
        print(f"Wrote {cert} and {key}: site {args.site}'s identity (the key to that site "
              "only, the certificate to the site and the coordinator). Add the site to "
              "`fedcare serve --sites`; no other party's files changed.")
        warn_if_in_git_work_tree(args.certs_dir, "private keys (TLS)")
        return 0
    if not args.sites or args.site:
        raise ConfigError("usage: fedcare certs DIR --sites A,B,C (a new federation), or "
                          "fedcare certs add-site NAME --certs DIR (one more site).")
    files = make_certificates(args.directory, _names(args.sites),
                              hosts=args.host or ("localhost", "127.0.0.1"),
                              overwrite=args.overwrite)
    print(f"Wrote to {args.directory}:")
    print(f"  {files.ca.name}  the federation's CA: give it to every party "
          "(ca.key: keep it offline)")
    print(f"  {files.aggregator[0].name}, {files.aggregator[1].name}  the aggregator's TLS "
          "certificate and key: for the coordinator only")
    for site, (cert, key) in files.sites.items():
        print(f"  {cert.name}, {key.name}  site {site}'s identity: the key to that site only, "
              f"the certificate to the site and the coordinator")
    warn_if_in_git_work_tree(args.directory, "private keys (ca.key and the TLS keys)")
    return 0


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be HOST:PORT, e.g. 0.0.0.0:9092; got {address!r}.")
    return host, int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    from fedcare.config import RunConfig
    from fedcare.runtime.flower_deploy import (
        CA_CERT,
        check_site_certificate,
        flower_environment,
        register_sites,
        run_command,
        site_files,
        superlink_command,
        write_app,
        write_flower_home,
    )
    from fedcare.runtime.flower_server import ServerSettings, node_key_fingerprint

    config = RunConfig.load(args.config) if args.config else RunConfig()
    for assignment in args.overrides:
        config.set(assignment)
    config.check_settings()
    sites = _names(args.sites)
    if args.insecure == bool(args.certs):
        raise ConfigError("fedcare serve needs --certs DIR (TLS and node authentication), or "
                          "--insecure for a loopback test.")
    host, port = _split_address(args.address)
    run_dir = Path(args.run_dir).resolve()
    work = run_dir / "flower"
    certs = None if args.insecure else Path(args.certs).resolve()
    keys = {}
    if certs is not None:
        for site in sites:  # refuse before anything starts
            keys[site] = check_site_certificate(certs / CA_CERT, site_files(certs, site)[0], site)
    supervisor = Supervisor(stop_first=("flwr-serverapp",))
    lock = RunDirectoryLock(run_dir)
    lock.acquire(supervisor.token, log=_say)
    try:
        check_port_free(host, port)
        # The SuperLink's database holds the run's configuration and in-flight messages.
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        work.chmod(0o700)
        database = work / "superlink.db"
        database.touch(mode=0o600)
        database.chmod(0o600)  # SQLite keeps the mode; its -wal/-shm files copy it
        connect = f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        home = write_flower_home(work / "home", connect,
                                 None if certs is None else certs / CA_CERT)
        app = write_app(work / "app", config, ServerSettings(
            run_dir=str(run_dir), roster=tuple(sites), wait_timeout=args.wait,
            message_timeout=args.message_timeout,
            node_keys=tuple((site, node_key_fingerprint(key)) for site, key in keys.items())))
        env = flower_environment(home)  # FLWR_HOME: the ServerApp unpacks the app under it
        with stop_signals(), supervisor:
            # A persistent state: SuperNodes keep their node ids when the aggregator restarts.
            superlink = supervisor.start(
                "superlink", superlink_command(host=host, port=port, certs=certs,
                                               database=database),
                env, on_line=file_writer(work / "superlink.log"))
            wait_for_port(host, port, timeout=60.0, process=superlink)
            security = "insecure" if certs is None else "TLS, SuperNode authentication"
            _say(f"SuperLink listening on {args.address} ({security}); log: "
                 f"{work / 'superlink.log'}")
            if keys:
                register_sites(home, keys)
                _say(f"registered sites {', '.join(keys)}")
            run = supervisor.start("run", run_command(app), env, on_line=console_writer())
            code = run.wait()
            # `flwr run --stream` returns when the SuperLink ends the log stream; the
            # ServerApp may still be writing the run's last artefacts.
            supervisor.wait_for_exit("flwr-serverapp", timeout=120.0)
            summary = run_dir / "summary.json"
            if summary.is_file():
                from fedcare.report.rundir import result_line

                _say(result_line(run_dir))
                if json.loads(summary.read_text(encoding="utf-8")).get("status") != "completed":
                    return code or 1  # the run failed, whatever `flwr run` says
            return code
    except Stopped as stop:
        _say(f"fedcare serve: {stop} received; the SuperLink, the ServerApp and `flwr run` "
             "are stopped. Run the same command again to resume after the last "
             "checkpointed round.")
        return stop.exit_code
    finally:
        lock.release()


def _say(text: str) -> None:
    print(text, flush=True)


def cmd_site(args: argparse.Namespace) -> int:
    from fedcare.runtime.flower_deploy import (
        CA_CERT,
        check_site_certificate,
        flower_environment,
        node_config_text,
        site_files,
        supernode_command,
    )
    from fedcare.runtime.site_link import keep_site_connected

    policy_file = site_policy_file(args)
    if args.budget:
        return print_budget(SitePolicy.load(policy_file))
    if not args.aggregator:
        raise ConfigError("fedcare site needs --aggregator HOST:PORT (the coordinator's "
                          "SuperLink).")
    if args.insecure == bool(args.certs):
        raise ConfigError("fedcare site needs --certs DIR (ca.crt, NAME.crt, NAME.key), or "
                          "--insecure for a loopback test.")
    policy = SitePolicy.load(policy_file)
    if policy.seeded_noise and not args.insecure:
        raise ConfigError("the site policy allows seeded noise (seeded_noise = true), which "
                          "the coordinator can regenerate and subtract; only a loopback test "
                          "(--insecure) may run it. Remove it from the policy.")
    print(f"site {args.name}: {policy.describe()}", flush=True)
    print(f"privacy ledger: {policy.ledger} (`fedcare site --name {args.name} --budget` shows "
          "what is spent)", flush=True)
    ca = key = None
    identity = None
    if not args.insecure:
        certs = Path(args.certs)
        ca = certs / CA_CERT
        cert, key = site_files(certs, args.name)
        check_site_certificate(ca, cert, args.name, key)
        identity = (ca, cert, key)
        print(f"certificate {cert} is the CA's and names site {args.name}", flush=True)
    if args.data and not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data} is not a file.")
    command = supernode_command(
        superlink=args.aggregator, site=args.name, port=args.port, ca=ca, key=key,
        node_config=node_config_text(args.name, data_file=args.data, keys=args.keys,
                                     policy=str(policy_file), identity=identity))
    say = console_writer()
    try:
        with stop_signals():
            keep_site_connected(command, flower_environment(), aggregator=args.aggregator,
                                ca=ca, flower_home=policy_file.parent / "flower",
                                say=lambda text: say(f"site {args.name}: {text}"),
                                forward=say)
    except Stopped as stop:
        say(f"site {args.name}: {stop} received; its SuperNode and ClientApps are stopped.")
        return stop.exit_code
    return 0  # pragma: no cover - keep_site_connected returns only when stopped


def site_policy_file(args: argparse.Namespace) -> Path:
    """The site's resolved policy (file plus flags), written to its state folder (0600).

    The SuperNode's ClientApp processes read this file for every job; the ledger
    defaults to ``ledger.jsonl`` beside it.
    """
    from fedcare.privacy.policy import SitePolicy

    state = Path(args.state or f"fedcare-site-{args.name}").resolve()
    policy = SitePolicy.load(args.policy) if args.policy else SitePolicy()
    flags = {"min_level": args.min_privacy, "epsilon": args.epsilon_cap,
             "lifetime_epsilon": args.lifetime_epsilon}
    changes = {key: value for key, value in flags.items() if value is not None}
    if not policy.ledger:
        changes["ledger"] = str(state / "ledger.jsonl")
    policy = SitePolicy.from_dict({**asdict(policy), **changes},
                                  source="fedcare site flags")
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / "policy.toml"
    path.touch(mode=0o600)
    path.write_text(policy.to_toml(), encoding="utf-8")
    return path


def print_budget(policy: SitePolicy) -> int:
    """``fedcare site --budget``: the site ledger's spend per job and over its lifetime."""
    from fedcare.privacy.site_ledger import SiteLedger

    summary = SiteLedger(Path(policy.ledger), policy).summary()
    print(f"site ledger {policy.ledger} (epsilon at delta {summary['delta']:g}, "
          f"{summary['accountant']})")
    for job in summary["jobs"]:
        print(f"  job {job['job']}: {job['releases']} release(s), epsilon {job['epsilon']:.4g} "
              f"({job['first']} .. {job['last']})")
    if not summary["jobs"]:
        print("  nothing released yet")
    cap = summary["lifetime_cap"]
    left = "no lifetime cap" if summary["left"] is None else (
        f"cap {cap:g}, left {summary['left']:.4g}")
    print(f"lifetime: epsilon {summary['lifetime_epsilon']:.4g} spent; {left}; one job at "
          f"most {summary['job_cap']:g}")
    return 0


__all__ = ["FedcareError", "add_deploy_parser"]
