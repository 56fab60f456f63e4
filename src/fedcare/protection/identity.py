"""A site's certified identity, with which it signs what it says in a protocol round.

Secure aggregation against an honest-but-curious aggregator needs no
signatures; against one that substitutes keys it does. An aggregator relaying
the key roster of a secagg round could put its own public keys in place of a
site's (then read the shares meant for that site and rebuild its masks), or
add fake sites of its own to reach the threshold (Sybils). Bonawitz et al.
(CCS 2017, section 4, the malicious-model variant) close both with a PKI: each
site signs its advertised keys, and every site checks each signature against
a certificate of the federation's CA before it shares anything.

fedcare reuses the deployment's identities: each site's node key and the
certificate `fedcare certs` issued for it (``NAME.key``, ``NAME.crt``,
``ca.crt``). A signature is ECDSA with SHA-384 over a domain-separated message
(`signed_message`); a certificate is accepted if the CA issued it, it is within
its validity period, it is a client (site) certificate, and it names one site.
The aggregator's own certificate is a server certificate and is refused.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.errors import ConfigError, ProtocolError

_SIGNATURE = ec.ECDSA(hashes.SHA384())


def signed_message(domain: bytes, parts: Sequence[bytes]) -> bytes:
    """`parts` under `domain`, each length-prefixed: no two messages sign the same bytes."""
    out = struct.pack(">H", len(domain)) + domain
    for part in parts:
        out += struct.pack(">Q", len(part)) + part
    return out


@dataclass(frozen=True)
class SiteIdentity:
    """A site's signing key and certificate, and the CA it checks the others' against.

    Attributes
    ----------
    name : str
        The site's name (its certificate's common name).
    certificate : bytes
        Its certificate, DER.
    """

    name: str
    certificate: bytes
    _key: ec.EllipticCurvePrivateKey
    _ca: x509.Certificate

    @classmethod
    def load(cls, *, ca: str | Path, certificate: str | Path, key: str | Path) -> SiteIdentity:
        """From ``ca.crt``, ``NAME.crt`` and ``NAME.key`` (OpenSSH or PEM); `ConfigError` naming
        the file that is wrong."""
        ca_cert = load_certificate(Path(ca), "the federation's CA certificate")
        cert = load_certificate(Path(certificate), "this site's certificate")
        try:
            raw = Path(key).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read this site's key {key}: "
                              f"{exc.strerror or exc}.") from None
        try:
            private = (serialization.load_ssh_private_key(raw, None) if b"OPENSSH" in raw
                       else serialization.load_pem_private_key(raw, None))
        except ValueError as exc:
            raise ConfigError(f"{key} is not a private key ({exc}).") from None
        public = cert.public_key()
        if not isinstance(private, ec.EllipticCurvePrivateKey) or \
                not isinstance(public, ec.EllipticCurvePublicKey) or \
                private.public_key().public_numbers() != public.public_numbers():
            raise ConfigError(f"private key {key} does not belong to certificate {certificate}.")
        identity = cls("", cert.public_bytes(serialization.Encoding.DER), private, ca_cert)
        try:
            name = identity.verify_certificate(identity.certificate, where=str(certificate))
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        return cls(name, identity.certificate, private, ca_cert)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, _SIGNATURE)

    def verify_certificate(self, certificate: bytes, *, where: str) -> str:
        """The site a certificate names, if it is a valid site certificate of our CA."""
        try:
            cert = x509.load_der_x509_certificate(certificate)
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ProtocolError(f"{where}: the certificate was not issued by the federation's "
                                "CA.") from None
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ProtocolError(f"{where}: the certificate is not valid now.")
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise ProtocolError(f"{where}: the certificate is not a site's (no client "
                                "authentication usage): the aggregator's own certificate, or "
                                "another party's.")
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if len(names) != 1 or not isinstance(names[0], str) or not names[0]:
            raise ProtocolError(f"{where}: the certificate names no single site.")
        return names[0]

    def verify(self, certificate: bytes, signature: bytes, message: bytes, *,
               where: str) -> str:
        """The signer's site name if `certificate` is a site certificate of our CA and
        `signature` its signature of `message`; `ProtocolError` saying which check failed."""
        name = self.verify_certificate(certificate, where=where)
        public = x509.load_der_x509_certificate(certificate).public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ProtocolError(f"{where}: the certificate holds no EC key.")
        try:
            public.verify(signature, message, _SIGNATURE)
        except InvalidSignature:
            raise ProtocolError(f"{where}: the signature does not match site {name!r}'s "
                                "certificate (keys substituted or altered).") from None
        return name


def load_certificate(path: Path, what: str) -> x509.Certificate:
    """A PEM certificate; `ConfigError` naming `what` and `path` if missing or not one."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist.") from None
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not a PEM certificate ({exc}).") from None
