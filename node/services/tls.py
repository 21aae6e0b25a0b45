"""`api.tls`: the certificate file ($PINKYBRAIN_HOME/tls/cert.pem, which clients pin) and the SSL context
that serves it. The key is the node's identity; it is written to disk only for the moment OpenSSL
reads it (ssl loads keys from files alone), in a 0600 file removed at once."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pinkybrain.node.core.config import Config
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.tls_cert import certificate_fits, make_certificate, private_key_pem

WILDCARDS = ("0.0.0.0", "::", "")


def certificate_names(cfg: Config, bind_host: str) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if bind_host not in WILDCARDS:
        names.append(bind_host)
    if cfg["p2p.public_url"]:
        names.append(urlsplit(cfg["p2p.public_url"]).hostname or "")
    return names + list(cfg["api.tls_names"])


def ensure_certificate(home: Path, identity: Identity, names: list[str]) -> Path:
    """The certificate file, (re)written atomically when missing or no longer fitting (key, names, expiry)."""
    path = home / "tls" / "cert.pem"
    if path.is_file() and certificate_fits(path.read_bytes(), identity, names):
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".cert.{os.getpid()}.tmp")
    tmp.write_bytes(make_certificate(identity, names))
    os.replace(tmp, path)
    return path


def server_context(cert_path: Path, identity: Identity) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    fd, key_path = tempfile.mkstemp(prefix=".key-", dir=cert_path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_key_pem(identity))
        context.load_cert_chain(cert_path, key_path)
    finally:
        os.unlink(key_path)
    return context
