"""A real deployment: certificates, the Flower app fedcare runs, and the Flower processes.

fedcare starts Flower's own programs and writes their configuration; its one
addition on the network path is the SuperLink's request filter:

* the coordinator runs ``flower-superlink`` (behind `fedcare.runtime.superlink`:
  only the Fleet API for other machines; TLS, ``--enable-supernode-auth``),
  registers each site's public key under the site's name (``flwr supernode
  register``) and submits the run (``flwr run``) of the app `write_app` makes:
  its components are `fedcare.runtime.flower.server_app` and
  `fedcare.runtime.flower_client.client_app`, and
  its run configuration carries the federation's `RunConfig`;
* each hospital runs ``flower-supernode`` with the federation's CA (to check
  the SuperLink's certificate), its own private key (its node identity) and
  its node configuration (site name, data file, own privacy cap, CKKS keys).

`make_certificates` (``fedcare certs DIR``) makes a test deployment's PKI: a
CA, the aggregator's TLS certificate, and per site an EC P-384 key pair (the
Flower node identity) with a certificate binding the site's name to that
key. `check_site_certificate` refuses, saying why, a certificate that is not
the CA's, has expired, names another site or does not match the key; the
coordinator registers only public keys whose certificate passes, so a node
without one is refused by the SuperLink.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.protection.identity import load_certificate
from fedcare.runtime.flower_server import ServerSettings
from fedcare.runtime.flower_site import RUN_CONFIG_KEY

CA_CERT, CA_KEY = "ca.crt", "ca.key"
AGGREGATOR_CERT, AGGREGATOR_KEY = "aggregator.crt", "aggregator.key"
CONNECTION = "fedcare"
"""Name of the SuperLink connection in the coordinator's Flower configuration."""
_VALIDITY = datetime.timedelta(days=365)


def site_files(directory: str | os.PathLike[str], site: str) -> tuple[Path, Path]:
    """(certificate, private key) of `site` in a `fedcare certs` directory."""
    return Path(directory) / f"{site}.crt", Path(directory) / f"{site}.key"


# --------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class CertificateFiles:
    ca: Path
    aggregator: tuple[Path, Path]
    sites: dict[str, tuple[Path, Path]]


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 hosts: Sequence[str] = (), usage: x509.ObjectIdentifier | None = None
                 ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + _VALIDITY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_names(sites: Sequence[str]) -> None:
    if not sites or len(set(sites)) != len(sites) or not all(
            s and s.replace("-", "").replace("_", "").isalnum() for s in sites):
        raise ConfigError(f"fedcare certs needs distinct site names of letters, digits, '-' "
                          f"and '_'; got {list(sites)}.")


def make_certificates(directory: str | os.PathLike[str], sites: Sequence[str], *,
                      hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                      overwrite: bool = False) -> CertificateFiles:
    """Write a test deployment's CA, aggregator certificate and one key pair per site.

    Parameters
    ----------
    directory : path
        Created if missing. Gets ``ca.crt`` / ``ca.key`` (keep the key offline),
        ``aggregator.crt`` / ``aggregator.key`` (TLS of the SuperLink, valid for
        `hosts`), and per site ``NAME.crt`` / ``NAME.key`` (the site's node
        identity: an EC P-384 key in OpenSSH format, as Flower reads it, and
        the CA's certificate binding it to the site's name). Keys are mode 0600.
        The CA's name carries a random id (``fedcare federation CA 3f9c1a2b``),
        so a certificate from another federation's CA is told apart by name.
    sites : sequence of str
        Site names, as in each site's ``--node-config site=...``.
    hosts : sequence of str
        DNS names and IP addresses the aggregator is reached at.
    overwrite : bool
        Replace existing files.
    """
    _check_names(sites)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    targets = [folder / CA_CERT, folder / AGGREGATOR_CERT,
               *(site_files(folder, s)[0] for s in sites)]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{folder} already holds {existing}; pass --overwrite to replace "
                          "them (every party then needs its new files), or add a site to "
                          "this federation with `fedcare certs add-site NAME --certs DIR`.")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    subject = f"fedcare federation CA {secrets.token_hex(4)}"
    ca = _certificate(subject, ca_key.public_key(), _name(subject), ca_key, ca=True)
    _write(folder / CA_KEY, _private_pem(ca_key), 0o600)
    _write(folder / CA_CERT, _pem(ca), 0o644)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate("fedcare aggregator", server_key.public_key(), ca.subject, ca_key,
                          hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    _write(folder / AGGREGATOR_KEY, _private_pem(server_key), 0o600)
    _write(folder / AGGREGATOR_CERT, _pem(server), 0o644)
    written = {site: _issue_site(folder, site, ca, ca_key) for site in sites}
    return CertificateFiles(folder / CA_CERT, (folder / AGGREGATOR_CERT,
                                               folder / AGGREGATOR_KEY), written)


def add_site(directory: str | os.PathLike[str], site: str) -> tuple[Path, Path]:
    """Issue one more site's key pair and certificate with the CA in `directory`.

    Needs ``ca.crt`` and ``ca.key`` (on the machine that keeps the CA key);
    the other parties' files do not change. Refuses a site that already has a
    certificate there.
    """
    _check_names([site])
    folder = Path(directory)
    if site_files(folder, site)[0].exists():
        raise ConfigError(f"{site_files(folder, site)[0]} exists: site {site!r} already has "
                          "a certificate in this federation.")
    ca = load_certificate(folder / CA_CERT, "The federation's CA certificate")
    try:
        ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"{folder / CA_KEY} does not exist: adding a site needs the CA's "
                          "key (run this where the CA key is kept).") from None
    except ValueError as exc:
        raise ConfigError(f"{folder / CA_KEY} is not a PEM private key ({exc}).") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or \
            ca_key.public_key() != ca.public_key():
        raise ConfigError(f"{folder / CA_KEY} is not the key of {folder / CA_CERT}.")
    return _issue_site(folder, site, ca, ca_key)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue_site(folder: Path, site: str, ca: x509.Certificate,
                ca_key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = site_files(folder, site)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(site, key.public_key(), ca.subject, ca_key,
                        usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), 0o600)
    _write(cert_path, _pem(cert), 0o644)
    return cert_path, key_path


def _common_name(name: x509.Name) -> str:
    return ", ".join(str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME))


def check_site_certificate(ca_path: Path, cert_path: Path, site: str,
                           key_path: Path | None = None) -> ec.EllipticCurvePublicKey:
    """The site's public key, if its certificate is valid for `site`; `ConfigError` saying why not.

    Checks: signed by the federation's CA, within its validity period, issued
    to `site` (common name), holding an EC key, and (with `key_path`) matching
    the site's private key.
    """
    ca = load_certificate(ca_path, "The federation's CA certificate")
    cert = load_certificate(cert_path, f"Site {site!r}'s certificate")
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{ca_path} does not hold an EC CA key.")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"certificate {cert_path} was not issued by the federation's CA "
                          f"{ca_path} (it names issuer {_common_name(cert.issuer)!r}; the "
                          f"federation's CA is {_common_name(ca.subject)!r}); site {site!r} "
                          "is refused. Ask the coordinator for a certificate made with "
                          "`fedcare certs`.") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(f"certificate {cert_path} is valid from {cert.not_valid_before_utc} "
                          f"to {cert.not_valid_after_utc}, not now ({now:%Y-%m-%d %H:%M} UTC); "
                          f"site {site!r} is refused.")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [site]:
        raise ConfigError(f"certificate {cert_path} is issued to {names}, not to site "
                          f"{site!r}; refused.")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ConfigError(f"certificate {cert_path} holds no EC key; Flower node identities "
                          "are EC keys.")
    if key_path is not None:
        try:
            private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
        except FileNotFoundError:
            raise ConfigError(f"site {site!r}'s private key {key_path} does not exist.") from None
        except ValueError as exc:
            raise ConfigError(f"{key_path} is not an OpenSSH private key ({exc}).") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey) or \
                private.public_key().public_numbers() != public.public_numbers():
            raise ConfigError(f"private key {key_path} does not belong to certificate "
                              f"{cert_path}; site {site!r} is refused.")
    return public


def ssh_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


# --------------------------------------------------------------------------- the Flower app
def write_app(directory: str | os.PathLike[str], config: RunConfig,
              settings: ServerSettings) -> Path:
    """Write the Flower app (``pyproject.toml``) that ``flwr run`` submits; return its folder."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    values = {RUN_CONFIG_KEY: config.to_toml(), **settings.to_run_config()}
    # JSON strings and numbers are valid TOML values.
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())
    (folder / "pyproject.toml").write_text(f"""\
# Written by fedcare serve: the Flower app of one fedcare federation.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedcare-federation"
version = "1.0.0"
description = "fedcare: federated training across hospitals"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedcare"

[tool.flwr.app.components]
serverapp = "fedcare.runtime.flower:server_app"
clientapp = "fedcare.runtime.flower_client:client_app"

[tool.flwr.app.config]
{lines}
""", encoding="utf-8")
    return folder


def write_flower_home(directory: str | os.PathLike[str], address: str,
                      ca: Path | None) -> Path:
    """A Flower configuration home whose default connection is this SuperLink (`CONNECTION`)."""
    home = Path(directory)
    home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {json.dumps(str(ca.resolve()))}" if ca else "insecure = true"
    (home / "config.toml").write_text(f"""\
[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "{address}"
{security}
""", encoding="utf-8")
    return home


# --------------------------------------------------------------------------- commands
def flower_program(name: str) -> str:
    """Path of one of Flower's programs, next to this Python's (a venv need not be on PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} was not found; install Flower with `pip install "
                          "flwr==1.42.0` (fedcare depends on it).")
    return found


SUPEREXEC_TASK_POLL_INTERVAL = 0.25
"""Seconds between a SuperExec's looks for a new task (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).

Every fedcare message is one task, so Flower's default (1 s) adds 0.5 s on average
to each message. Each look is a local HTTP call that costs CPU while the node is
idle: measured for a SuperLink and 4 SuperNodes on 2 vCPUs, 25 % of one core in
all at 0.1 s, 10 % at 0.25 s, 4.5 % at 1 s. 0.25 s adds 0.125 s per message and
leaves the CPU to the ClientApp processes, which are CPU-bound.
"""


def flower_environment(home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's processes: its programs on PATH, quick task polling, no
    telemetry, no update check.

    Flower 1.42 sends usage events to Flower's servers unless ``FLWR_TELEMETRY_ENABLED``
    is ``0`` (`flwr.supercore.telemetry`; every Flower process waits up to 4 s for that
    event when it exits) and asks for a newer release when a SuperLink or SuperNode
    starts unless ``FLWR_DISABLE_UPDATE_CHECK`` is ``1``: a hospital's machine sends
    nothing it was not asked to. Values already in the environment are kept.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_TASK_POLL_INTERVAL))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def superlink_command(*, host: str, port: int, certs: Path | None,
                      database: Path | None = None) -> list[str]:
    """``flower-superlink`` with TLS and node authentication (or neither, `certs` None).

    It runs through `fedcare.runtime.superlink`, which serves only the Fleet API
    to other machines: node registration, run control and logs stay on the
    coordinator's machine. With `database`, the SuperLink keeps its state
    (registered nodes, runs) in that SQLite file, so SuperNodes keep their node
    ids across a restart of the aggregator and reconnect by themselves.
    """
    command = [sys.executable, "-m", "fedcare.runtime.superlink", "--host", host,
               "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certs / CA_CERT),
                    "--ssl-certfile", str(certs / AGGREGATOR_CERT),
                    "--ssl-keyfile", str(certs / AGGREGATOR_KEY), "--enable-supernode-auth"]
    if database is not None:
        command += ["--database", str(database)]
    return command


def node_config_text(site: str, *, data_file: str = "", keys: str = "", policy: str = "",
                     identity: tuple[Path, Path, Path] | None = None) -> str:
    """The SuperNode's ``--node-config`` (`fedcare.runtime.flower_site.NodeSettings`).

    `identity`: (``ca.crt``, ``NAME.crt``, ``NAME.key``), with which the site signs its
    secagg keys and checks the other sites'.
    """
    parts = [f"site={json.dumps(site)}"]
    if policy:
        parts.append(f"policy={json.dumps(str(Path(policy).resolve()))}")
    if identity is not None:
        for key, path in zip(("ca", "certificate", "identity-key"), identity, strict=True):
            parts.append(f"{key}={json.dumps(str(Path(path).resolve()))}")
    if data_file:
        parts.append(f"data-file={json.dumps(str(Path(data_file).resolve()))}")
    if keys:
        parts.append(f"keys={json.dumps(str(Path(keys).resolve()))}")
    return " ".join(parts)


def supernode_command(*, superlink: str, site: str, port: int, ca: Path | None,
                      key: Path | None, node_config: str) -> list[str]:
    """``flower-supernode`` for one site: TLS against `ca`, identity `key` (or insecure).

    It runs through `fedcare.runtime.supernode`: warm ClientApp processes, a
    quicker poll of the SuperLink, and a heartbeat short enough that the
    aggregator learns within seconds that a site is gone.
    """
    command = [sys.executable, "-m", "fedcare.runtime.supernode", "--superlink", superlink,
               "--port", str(port), "--node-config", node_config]
    if ca is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(ca)]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    return command


def register_sites(home: Path, public_keys: Mapping[str, ec.EllipticCurvePublicKey],
                   timeout: float = 120.0) -> None:
    """Register each site's node key with the SuperLink under the site's name.

    One ``flwr supernode register`` per site, all at once: each spends seconds
    importing Flower's CLI, so one after the other kept the last site waiting.
    """
    running = {}
    for site, public_key in public_keys.items():
        key_file = home / f"{site}.pub"
        key_file.write_bytes(ssh_public_key(public_key) + b"\n")
        running[site] = subprocess.Popen(
            [flower_program("flwr"), "supernode", "register", str(key_file), CONNECTION,
             "--name", site], env=flower_environment(home), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
    refused = []
    for site, process in running.items():
        try:
            said, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            said = f"no answer within {timeout:g} s"
        if process.returncode != 0 and "already" not in said.lower():
            refused.append(f"{site}: {said.strip()[-300:]}")
    if refused:
        raise ConfigError("the SuperLink refused to register " + "; ".join(refused))


def register_site(home: Path, public_key: ec.EllipticCurvePublicKey, site: str,
                  timeout: float = 120.0) -> None:
    """Register one site's node key with the SuperLink under the site's name."""
    register_sites(home, {site: public_key}, timeout)


def run_command(app: Path) -> list[str]:
    """``flwr run`` of the fedcare app on the coordinator's SuperLink, streaming its log."""
    return [flower_program("flwr"), "run", str(app), CONNECTION, "--stream"]
