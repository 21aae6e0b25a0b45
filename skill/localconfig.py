"""What the skill needs from this machine's pinkybrain.yaml: the network secret and the local node's port.

Read with pyyaml directly (the skill never imports node code), following the node's lookup order:
PINKYBRAIN_CONFIG, ./pinkybrain.yaml, $PINKYBRAIN_HOME/pinkybrain.yaml (PINKYBRAIN_HOME defaults to
~/.pinkybrain). P2P_SECRET overrides the file's p2p.secret, as it does for the node. The node validates
the whole file; here only the three keys we use are read, and a broken file only matters when the secret
has to come from it.
"""

from __future__ import annotations

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
