"""What the skill needs from this machine's pinkybrain.yaml: the network secret and the local node's port.

Read with pyyaml directly (the skill never imports node code), following the node's lookup order:
PINKYBRAIN_CONFIG, ./pinkybrain.yaml, $PINKYBRAIN_HOME/pinkybrain.yaml (PINKYBRAIN_HOME defaults to
~/.pinkybrain). P2P_SECRET overrides the file's p2p.secret, as it does for the node. The node validates
the whole file; here only the three keys we use are read, and a broken file only matters when the secret
has to come from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pinkybrain.skill.client import SkillError

CONFIG_FILENAME = "pinkybrain.yaml"
DEFAULT_PORT = 8080
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]", "*")


@dataclass
class LocalConfig:
    file: Path | None
    secret: str | None
    # The local node's port when the file sets one (p2p.listen's, else node.port): None means the
    # default, which discovery probes anyway.
    port: int | None
    host: str  # where that node answers from this machine: localhost for wildcard binds
    problem: str | None = None  # why the file could not be used, if it could not

    def require_secret(self) -> str:
        if self.secret:
            return self.secret
        if self.problem:
            raise SkillError(f"no network secret: P2P_SECRET is not set and {self.problem}")
        where = f"{self.file} has no p2p.secret" if self.file else f"no {CONFIG_FILENAME} was found ({searched()})"
        raise SkillError(f"no network secret: set P2P_SECRET to your network's secret ({where})")


def pinkybrain_home() -> Path:
    return Path(os.environ.get("PINKYBRAIN_HOME") or "~/.pinkybrain").expanduser()


def searched() -> str:
    places = []
    if os.environ.get("PINKYBRAIN_CONFIG"):
        places.append(os.environ["PINKYBRAIN_CONFIG"])
    places += [str(Path.cwd() / CONFIG_FILENAME), str(pinkybrain_home() / CONFIG_FILENAME)]
    return "looked in " + ", ".join(places)


def find_config_file() -> Path | None:
    """The node's order without --config; a PINKYBRAIN_CONFIG naming a missing file is an error there too."""
    env = os.environ.get("PINKYBRAIN_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise SkillError(f"config file {path} (from PINKYBRAIN_CONFIG) does not exist")
        return path
    for candidate in (Path.cwd() / CONFIG_FILENAME, pinkybrain_home() / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def _split_listen(listen: str) -> tuple[str, int | None]:
    """host[:port] as the node reads p2p.listen (IPv6 in brackets); a bad port reads as none."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or host.endswith(":") or (listen.startswith("[") and not host.endswith("]")):
        return listen.strip("[]"), None
    try:
        port = int(port_text)
    except ValueError:
        return host.strip("[]"), None
    return host.strip("[]"), port if 1 <= port <= 65535 else None


def _section(data: dict, section: str, key: str, short: str):
    body = data.get(section)
    if isinstance(body, dict) and key in body:
        return body[key]
    value = data.get(short)  # the seed's top-level short forms: `secret: ...`, `port: ...`
    return None if isinstance(value, dict) else value


def _read(file: Path) -> dict:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SkillError(f"cannot read {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SkillError(f"{file} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SkillError(f"{file}: the top level must be a mapping of sections")
    return data


def load_local_config() -> LocalConfig:
    env_secret = os.environ.get("P2P_SECRET") or None
    file: Path | None = None
    data: dict = {}
    problem = None
    try:
        file = find_config_file()
        if file is not None:
            data = _read(file)
    except SkillError as exc:
        # Only fatal if the secret must come from the file: require_secret() reports it then.
        problem, data = exc.message, {}

    secret = env_secret
    if secret is None:
        value = _section(data, "p2p", "secret", "secret")
        if isinstance(value, str) and value:
            secret = value

    port_value = _section(data, "node", "port", "port")
    port = port_value if isinstance(port_value, int) and not isinstance(port_value, bool) else None
    host = "localhost"
    listen = _section(data, "p2p", "listen", "listen")
    if isinstance(listen, str) and listen.strip():
        listen_host, listen_port = _split_listen(listen.strip())
        port = listen_port or port
        # A node bound to one address answers only there; a wildcard bind answers on localhost.
        if listen_host not in WILDCARD_HOSTS:
            host = listen_host
    if port is None and host != "localhost":
        port = DEFAULT_PORT  # bound to one address on the default port: localhost:8080 would not reach it
    return LocalConfig(file=file, secret=secret, port=port, host=host, problem=problem)


# -- owner keys -------------------------------------------------------------------------------------
# The node writes $PINKYBRAIN_HOME/owner.key (its own owner key, mode 0600) at `identity init` or at start;
# `pinkybrain owner-key import` keeps the keys of nodes this user owns elsewhere in owner-keys.json (0600).
# The format is the node's (node/services/credentials.py); tests/test_principals.py keeps them in step.
OWNER_KEY_FILE = "owner.key"
IMPORTED_KEYS_FILE = "owner-keys.json"
OWNER_KEY_FORMAT = "pinkybrain-owner-key-v1"
EXPORT_PREFIX = "pbowner1"
CREDENTIAL_ENV = "PINKYBRAIN_CREDENTIAL"  # auto (default) | owner | mesh


def _is_key(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SkillError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def owner_keys() -> dict[str, str]:
    """node id -> owner key, for every node this user owns: this machine's node first, then imported ones."""
    keys: dict[str, str] = {}
    own = _read_json(pinkybrain_home() / OWNER_KEY_FILE)
    if own and own.get("format") == OWNER_KEY_FORMAT and _is_key(own.get("key")) and isinstance(own.get("node_id"), str):
        keys[own["node_id"]] = own["key"]
    imported = _read_json(pinkybrain_home() / IMPORTED_KEYS_FILE) or {}
    for node_id, key in (imported.get("keys") or {}).items():
        if _is_key(key):
            keys.setdefault(node_id, key)
    return keys


def credential_choice() -> str:
    choice = (os.environ.get(CREDENTIAL_ENV) or "auto").strip().lower()
    if choice not in ("auto", "owner", "mesh"):
        raise SkillError(f"{CREDENTIAL_ENV} must be auto, owner or mesh, got {choice!r}")
    return choice


def export_owner_key() -> str:
    """The token `owner-key import` takes on another machine: this machine's node id and owner key."""
    path = pinkybrain_home() / OWNER_KEY_FILE
    own = _read_json(path)
    if not own or not _is_key(own.get("key")):
        raise SkillError(f"no owner key at {path}: run `pinkybrain identity init` or start the node once")
    return f"{EXPORT_PREFIX}:{own['node_id']}:{own['key']}"


def import_owner_key(token: str) -> str:
    """Keep an exported owner key (0600, atomically); returns the node id it is for."""
    parts = token.strip().split(":")
    if len(parts) != 3 or parts[0] != EXPORT_PREFIX or not _is_key(parts[2]) or len(parts[1]) != 63:
        raise SkillError("not an owner key token: expected what `pinkybrain owner-key export` printed "
                         f"({EXPORT_PREFIX}:NODE-ID:KEY)")
    node_id, key = parts[1], parts[2]
    path = pinkybrain_home() / IMPORTED_KEYS_FILE
    data = _read_json(path) or {}
    keys = dict(data.get("keys") or {})
    keys[node_id] = key
    write_private(path, json.dumps({"keys": keys}, indent=2, sort_keys=True).encode())
    return node_id


def write_private(path: Path, data: bytes) -> None:
    """Create-then-rename with mode 0600, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
