"""The HTTPS certificate for `api.tls`: X.509, self-signed, whose key is the node's Ed25519 identity.

A client pins it by its file (cert.pem) or checks that the certificate's public key is the node id it
expects (the node id carries the whole public key), so the certificate is bound to the node's identity
with no CA and no second key. Pure logic: certificate bytes in, bytes out.
"""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from pinkybrain.node.core.identity import Identity, node_id_from_public_key

VALID_DAYS = 3650


def identity_key(identity: Identity) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(identity.signing_key))


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip().strip("[]") for n in names if n and n.strip()):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_certificate(identity: Identity, names: list[str], now: datetime.datetime | None = None) -> bytes:
    """PEM of a certificate for `names` (host names and IP addresses), self-signed by the identity key."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = identity_key(identity)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)  # Ed25519 signs without a separate hash
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_node_id(pem: bytes) -> str:
    """The node id whose key the certificate carries (ValueError if it is not an Ed25519 certificate)."""
    public = x509.load_pem_x509_certificate(pem).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return node_id_from_public_key(raw)


def certificate_fits(pem: bytes, identity: Identity, names: list[str],
                     now: datetime.datetime | None = None) -> bool:
    """Whether a stored certificate can be served again: same key, same names, not near its end."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return (certificate_node_id(pem) == identity.node_id and set(san) == set(_alt_names(names))
                and cert.not_valid_after_utc - now > datetime.timedelta(days=30))
    except (ValueError, x509.ExtensionNotFound):
        return False


def private_key_pem(identity: Identity) -> bytes:
    return identity_key(identity).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
