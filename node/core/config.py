"""pinkybrain.yaml: schema, lookup, validation and atomic edits.

Every key of the seed's configuration reference is here, plus a few of our own (marked), each with
its type, default and bounds. Unknown keys and wrong types are errors naming the key, never ignored.
"""

from __future__ import annotations

import difflib
import math
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILENAME = "pinkybrain.yaml"


class ConfigError(ValueError):
    """A configuration problem; str() names the key or file at fault."""


@dataclass(frozen=True)
class Key:
    path: str
    type: str  # str | int | float | bool | list | floats | path | choice
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False


SCHEMA: tuple[Key, ...] = (
    Key("node.name", "str", None, "name shown to peers (default: host name)"),
    Key("node.port", "int", 8080, "HTTP API and peer port", minimum=1, maximum=65535),
    Key("identity.ed25519_key", "path", None, "Ed25519 key file (default: $PINKYBRAIN_HOME/identity.key)"),
    Key("p2p.secret", "str", None, "network secret (P2P_SECRET overrides); must be strong", secret=True),
    Key("p2p.listen", "str", None, "bind address host[:port] (default: 0.0.0.0:<node.port>)"),
    Key("p2p.tracker", "str", "wss://tracker.pinkybrain.ai", "public-mesh tracker URL"),
    Key("p2p.peers", "list", [], "static peer URLs"),
    Key("p2p.mdns", "bool", True, "advertise and browse on the LAN with mDNS (ours)"),
    # ours: private-mesh links
    Key("p2p.heartbeat_secs", "float", 10.0, "seconds between peer heartbeats (ours)", minimum=0.05),
    Key("p2p.dead_after_secs", "float", 30.0, "drop a peer heard nothing from this long (ours)", minimum=0.1),
    Key(
        "p2p.max_frame_bytes",
        "int",
        1048576,
        "largest message on a peer link (ours)",
        minimum=65536,
        maximum=8388608,
    ),
    Key("p2p.rate_limit_frames", "float", 2000.0, "frames/s a peer may send (ours)", minimum=1),
    Key("p2p.rate_limit_bytes", "float", 67108864.0, "bytes/s a peer may send (ours)", minimum=65536),
    Key("p2p.max_peers", "int", 32, "most peer links at once (ours)", minimum=1, maximum=1024),
    Key("p2p.peer_exchange", "bool", True, "tell peers about other peers and dial the ones they name (ours)"),
    Key("p2p.remote_timeout_secs", "float", 300.0,
        "bound on a query run on peers, failovers included (ours)", minimum=1),
    Key("p2p.max_pending_handshakes", "int", 256, "inbound peer handshakes in progress at once (ours)",
        minimum=1, maximum=65536),
    Key("p2p.max_pending_handshakes_per_address", "int", 8,
        "inbound peer handshakes in progress from one address (ours)", minimum=1, maximum=1024),
    Key("p2p.handshake_first_message_secs", "float", 2.0,
        "time a new inbound link has to send its first handshake message (ours)", minimum=0.1, maximum=60),
    # ours: the HTTP port's connection guard (node/services/http_guard.py)
    Key("http.header_timeout_secs", "float", 10.0, "time a client has to send a request's headers (ours)",
        minimum=0.1, maximum=3600),
    Key("http.body_timeout_secs", "float", 30.0,
        "time a client has to send a request's body once its headers are in (ours)", minimum=0.1, maximum=3600),
    Key("http.idle_timeout_secs", "float", 5.0, "an idle keep-alive connection is closed after this (ours)",
        minimum=0.1, maximum=3600),
    Key("http.max_connections_per_address", "int", 64, "open connections one client address may hold (ours)",
        minimum=1, maximum=65536),
    Key("http.max_connections", "int", 2048, "open connections and requests in progress, all clients (ours)",
        minimum=1, maximum=1048576),
    Key("mesh.public", "bool", False, "join the public mesh at start"),
    # ours: HTTPS for OpenAI-compatible (/v1) clients, which cannot seal
    Key("api.tls", "bool", False, "also serve the API over HTTPS on api.tls_port, with a certificate whose key "
        "is the node's Ed25519 identity ($PINKYBRAIN_HOME/tls/cert.pem) (ours)"),
    Key("api.tls_port", "int", 8443, "HTTPS port when api.tls is on (ours)", minimum=1, maximum=65535),
    Key("api.tls_names", "list", [], "extra host names and IP addresses the certificate names (ours)"),
    # ours: CRDT memory
    Key("memory.max_key_bytes", "int", 256, "largest memory key, UTF-8 bytes (ours)", minimum=1, maximum=4096),
    Key("memory.max_value_bytes", "int", 65536, "largest memory value as JSON, bytes (ours)", minimum=1,
        maximum=4194304),
    Key("memory.sync_interval_secs", "float", 30.0, "seconds between anti-entropy syncs with each peer (ours)",
        minimum=0.1),
    Key("memory.max_depth", "int", 64, "deepest nesting of lists and objects in a memory value (ours)",
        minimum=1, maximum=256),
    Key("memory.penalty_limit", "int", 3, "invalid memory updates before a peer is dropped and banned (ours)",
        minimum=1),
    Key("memory.ban_secs", "float", 600.0, "how long such a peer is banned (ours)", minimum=0),
    Key("mesh.stealth", "bool", False, "hide this node from trackers, peer lists and mDNS"),
    # ours: the public mesh
    Key("p2p.public_url", "str", None,
        "URL public peers dial to reach this node (default: the bind address unless it is a wildcard) (ours)"),
    Key("mesh.announce_ttl_secs", "int", 300, "lifetime of this node's tracker record, re-announced at half (ours)",
        minimum=1, maximum=600),
    Key("mesh.public_peer_refresh_secs", "float", 30.0,
        "seconds between asking the tracker for peers and dialling them (ours)", minimum=0.1),
    Key("mesh.trust_refresh_secs", "float", 300.0,
        "seconds between Web of Trust exchanges with each public peer (ours)", minimum=0.1),
    Key("sharing.enabled", "bool", True, "share this node's compute and models with peers"),
    Key("sharing.shared_models_dir", "path", "./shared_models/", "the only folder the mesh may read"),
    Key("sharing.cloud_models", "bool", False, "allow cloud models to be shared (still needs force)"),
    Key("sharing.split", "bool", False, "lend memory and compute to private-mesh peers for split inference "
        "(llama.cpp's rpc-server on loopback, reached only through peer-link tunnels) (ours)"),
    Key("sharing.split_idle_secs", "float", 120.0, "stop a lent rpc-server unused this long (ours)", minimum=1),
    Key("sharing.split_public", "bool", False, "also lend for splits to public-mesh peers this node's Web of "
        "Trust finds valid, paid in credits (credit.earn_per_split); needs sharing.split (ours)"),
    Key(
        "resource_guard.cpu_threshold",
        "float",
        80.0,
        "pause sharing above this CPU %",
        minimum=0,
        maximum=100,
    ),
    Key(
        "resource_guard.ram_threshold",
        "float",
        85.0,
        "pause sharing above this RAM %",
        minimum=0,
        maximum=100,
    ),
    Key(
        "resource_guard.cooldown_secs",
        "float",
        300.0,
        "time back under thresholds before resuming",
        minimum=0,
    ),
    # ours: how long a threshold must be exceeded before pausing, and how often to sample
    Key("resource_guard.sustain_secs", "float", 10.0, "time over a threshold before pausing", minimum=0),
    Key("resource_guard.sample_secs", "float", 2.0, "seconds between CPU/RAM samples", minimum=0.05),
    Key("credit.earn_per_query", "float", 1.0, "credits earned per query served", minimum=0),
    Key("credit.earn_per_split", "float", 1.0, "credits a public-mesh borrower pays per split.rpc tunnel "
        "(one rpc-server connection) this node lends it (ours)", minimum=0),
    Key("trust.max_depth", "int", 5, "longest Web of Trust path accepted (ours)", minimum=1, maximum=10),
    Key("trust.marginals_needed", "int", 3, "marginal vouches that make a key valid (ours)", minimum=1,
        maximum=10),
    Key("credit.initial_balance", "float", 10.0, "starting credit balance", minimum=0),
    Key("conversations.storage", "path", "./conversations/", "conversation store folder"),
    Key(
        "conversations.default_privacy",
        "choice",
        "private",
        "privacy of new conversations",
        choices=("private", "peers-only", "public"),
    ),
    Key(
        "conversations.retention_days", "int", 90, "purge conversations older than this (0: keep)", minimum=0
    ),
    Key(
        "logging.public_mesh",
        "bool",
        False,
        "log operational public-mesh events (query text is never logged, whatever this says)",
    ),
    # ours
    Key("logging.level", "choice", "info", "log level", choices=("debug", "info", "warning", "error")),
    Key("logging.file", "path", None,
        "log file, mode 0600, rotated by size (default: stderr; serve --daemon: $PINKYBRAIN_HOME/pinkybrain.log) (ours)"),
    Key("logging.max_bytes", "int", 10485760, "rotate the log file at this size (ours)", minimum=65536,
        maximum=1073741824),
    Key("logging.backups", "int", 3, "rotated log files kept (ours)", minimum=1, maximum=100),
    # ours: signed self-update
    Key("dashboard.enabled", "bool", True,
        "serve the owner's dashboard (/dashboard); false: no dashboard pages, and `pinkybrain dashboard` says so (ours)"),
    Key("dashboard.allow_remote", "bool", False,
        "serve the owner's dashboard to other machines too (default: this machine only) (ours)"),
    Key("update.url", "str", None, "URL of the signed release manifest (default: no feed) (ours)"),
    Key(
        "update.public_key",
        "str",
        None,
        "Ed25519 release public key, hex or base64, for self-hosted feeds (default: the pinned key) (ours)",
    ),
    Key("update.allow_downgrade", "bool", False, "let `update apply` install an older version (ours)"),
    Key(
        "update.health_timeout_secs",
        "float",
        60.0,
        "time the new version has to answer before it is rolled back (ours)",
        minimum=1,
    ),
    # ours: the brain (inference, specialists, cloud models)
    Key("inference.n_ctx", "int", 0, "context window for local models; 0 = the model's trained context, bounded "
        "by free memory (ours)", minimum=0, maximum=1048576),
    Key("inference.n_gpu_layers", "int", None, "layers offloaded to the GPU; default: all when llama.cpp has a GPU "
        "backend, else 0; -1 = all (ours)", minimum=-1),
    Key("inference.main_gpu", "int", 0, "the GPU that holds the model (or its small tensors when split) (ours)",
        minimum=0),
    Key("inference.tensor_split", "floats", [], "share of the model per GPU, e.g. [3, 1] (ours)"),
    Key("inference.keep_alive_secs", "float", 300.0, "unload a local model idle this long; 0 keeps it loaded (ours)",
        minimum=0),
    Key("inference.n_threads", "int", 0, "CPU threads for local inference, 0 = all cores (ours)", minimum=0),
    Key("inference.max_loaded_models", "int", 2, "models kept warm at once (ours)", minimum=1),
    Key("inference.memory_limit_mb", "int", 0, "RAM this node's models may use, MiB (lent split shares "
        "included); 0 = all free memory. A model needing more is split over lending peers, or refused (ours)",
        minimum=0),
    Key("inference.default_model", "str", None, "model used when a specialist has no preference (ours)"),
    Key("specialists.profiles", "mapping", {}, "add or override specialist profiles: name -> fields (ours)"),
    Key("cloud.models", "mappings", [],
        "cloud models: [{name, provider: openai|anthropic, model, base_url, api_key_env}] (ours)"),
)
KEYS: dict[str, Key] = {k.path: k for k in SCHEMA}

# The seed's short forms (`pinkybrain config set stealth true`, `stealth: true` at the top of the file).
SHORT_FORMS: dict[str, str] = {
    "stealth": "mesh.stealth",
    "public": "mesh.public",
    "secret": "p2p.secret",
    "port": "node.port",
    "name": "node.name",
    "listen": "p2p.listen",
    "tracker": "p2p.tracker",
    "peers": "p2p.peers",
}


def pinkybrain_home() -> Path:
    return Path(os.environ.get("PINKYBRAIN_HOME") or "~/.pinkybrain").expanduser()


def find_config_file(explicit: str | os.PathLike | None = None) -> Path | None:
    """Lookup order: --config, PINKYBRAIN_CONFIG, ./pinkybrain.yaml, $PINKYBRAIN_HOME/pinkybrain.yaml."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from --config) does not exist")
        return path
    env = os.environ.get("PINKYBRAIN_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from PINKYBRAIN_CONFIG) does not exist")
        return path
    for candidate in (Path.cwd() / CONFIG_FILENAME, pinkybrain_home() / CONFIG_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def resolve_key(name: str) -> Key:
    path = SHORT_FORMS.get(name, name)
    key = KEYS.get(path)
    if key is None:
        close = difflib.get_close_matches(path, list(KEYS) + list(SHORT_FORMS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {name!r}{hint} (see `pinkybrain config show --keys`)")
    return key


def coerce(key: Key, value: Any) -> Any:
    """Check and convert one value for its key; raise ConfigError naming the key."""
    if value is None:
        if key.default is None:
            return None
        raise ConfigError(f"{key.path} must not be empty")

    def bad(expected: str) -> ConfigError:
        # A secret's value is never echoed, whatever its type: only what kind of value it was.
        got = f"a {type(value).__name__}" if key.secret else repr(value)
        return ConfigError(f"{key.path} must be {expected}, got {got}")

    if key.type in ("str", "path"):
        if isinstance(value, (bool, dict, list)):
            raise bad("a string")
        value = str(value)
    elif key.type == "choice":
        if str(value) not in key.choices:
            raise bad("one of " + ", ".join(key.choices))
        value = str(value)
    elif key.type == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif key.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
    elif key.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        try:
            value = float(value)
        except OverflowError:
            raise bad("a finite number") from None
        if not math.isfinite(value):  # .nan passes every bound check; .inf would never time out
            raise bad("a finite number")
    elif key.type == "mapping":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of names to settings")
    elif key.type == "mappings":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise bad("a list of mappings")
    elif key.type == "floats":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            try:
                value = [float(v) for v in value]
            except ValueError:
                raise bad("a list of numbers") from None
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value):
            raise bad("a list of numbers, none negative")
        value = [float(v) for v in value]
    elif key.type == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{key.path} must be at least {key.minimum:g}, got {value!r}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{key.path} must be at most {key.maximum:g}, got {value!r}")
    return value


def parse_cli_value(key: Key, text: str) -> Any:
    """`config set` values arrive as text: read them the way YAML would, then check the type."""
    if key.type in ("str", "path", "choice"):
        return coerce(key, text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return coerce(key, value)


def flatten(raw: dict, *, source: str) -> dict[str, Any]:
    """Nested YAML mapping -> {dotted key: value}, accepting the seed's top-level short forms."""
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for section, body in raw.items():
        if section in SHORT_FORMS and (not isinstance(body, dict) or resolve_key(section).secret):
            out[resolve_key(section).path] = body  # a secret is checked (and never echoed) by coerce
            continue
        if not isinstance(body, dict):
            if not any(k.startswith(f"{section}.") for k in KEYS):
                resolve_key(str(section))  # names the unknown key
            raise ConfigError(f"{source}: {section} must be a section (a mapping), got a {type(body).__name__}")
        for name, value in body.items():
            out[resolve_key(f"{section}.{name}").path] = value
    return out


def unflatten(values: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in values.items():
        section, name = path.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


@dataclass
class Config:
    """Validated settings. Index by dotted key: cfg["mesh.stealth"]."""

    values: dict[str, Any]
    file: Path | None
    home: Path
    secret_from_env: bool = False
    explicit: set[str] = field(default_factory=set)

    def __getitem__(self, path: str) -> Any:
        return self.values[KEYS[path].path]

    @property
    def base_dir(self) -> Path:
        return self.file.parent if self.file else self.home

    def path(self, key: str) -> Path:
        """A path-valued key, relative paths taken from the config file's folder."""
        value = self[key]
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def identity_path(self) -> Path:
        return (
            self.path("identity.ed25519_key") if self["identity.ed25519_key"] else self.home / "identity.key"
        )

    @property
    def node_name(self) -> str:
        return self["node.name"] or socket.gethostname()

    def listen_address(self) -> tuple[str, int]:
        """Bind address: p2p.listen's host; its port if given, else node.port (they may not disagree)."""
        port = self["node.port"]
        listen = self["p2p.listen"]
        if not listen:
            return "0.0.0.0", port
        host, sep, port_text = listen.rpartition(":")
        if not sep or host.endswith(":") or (listen.startswith("[") and not host.endswith("]")):
            host, port_text = listen, ""  # bare host, IPv6 included
        if port_text:
            try:
                listen_port = int(port_text)
            except ValueError:
                raise ConfigError(f"p2p.listen must be host[:port], got {listen!r}") from None
            if not 1 <= listen_port <= 65535:
                raise ConfigError(f"p2p.listen port must be 1-65535, got {listen_port}")
            if "node.port" in self.explicit and listen_port != port:
                raise ConfigError(
                    f"p2p.listen says port {listen_port} but node.port says {port}: make them agree"
                )
            port = listen_port
        return host.strip("[]") or "0.0.0.0", port

    def secret_file_problem(self) -> tuple[str, bool] | None:
        """(one line, refuse?) when the config file holding p2p.secret can be read by others (refuse) or
        by its group (warn: a service group may need it); None when it is private or holds no secret."""
        if self.file is None or "p2p.secret" not in self.explicit:
            return None
        try:
            mode = self.file.stat().st_mode & 0o777
        except OSError:
            return None
        if not mode & 0o044:
            return None
        who = "anyone on this machine" if mode & 0o004 else "its group"
        return (f"{self.file} holds p2p.secret and can be read by {who} (mode {mode:04o}); "
                f"run: chmod 600 {self.file}", bool(mode & 0o004))

    def redacted(self) -> dict:
        shown = dict(self.values)
        for key in SCHEMA:
            if key.secret and shown.get(key.path):
                origin = "from P2P_SECRET" if self.secret_from_env else "set"
                shown[key.path] = f"<{origin}, {len(shown[key.path])} characters, hidden>"
        return unflatten(shown)


def load_config(explicit: str | os.PathLike | None = None, *, env: dict | None = None) -> Config:
    env = os.environ if env is None else env
    file = find_config_file(explicit)
    raw_values: dict[str, Any] = {}
    if file is not None:
        raw_values = flatten(read_yaml(file), source=str(file))
    values = {}
    for key in SCHEMA:
        values[key.path] = coerce(key, raw_values[key.path]) if key.path in raw_values else key.default
    secret_from_env = bool(env.get("P2P_SECRET"))
    if secret_from_env:
        values["p2p.secret"] = env["P2P_SECRET"]
    cfg = Config(
        values=values,
        file=file,
        home=pinkybrain_home(),
        secret_from_env=secret_from_env,
        explicit=set(raw_values),
    )
    cfg.listen_address()  # validate the combination early
    return cfg


def read_yaml(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{file} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return data or {}


def write_config(file: Path, values: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename), mode 0600 since it may hold the secret."""
    for path, value in values.items():
        coerce(KEYS[path], value)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    text = "# PinkyBrain node configuration; `pinkybrain config show --keys` lists every key.\n"
    text += yaml.safe_dump(unflatten(values), sort_keys=False, default_flow_style=False)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()


def set_values(file: Path, updates: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Apply `config set` edits (textual values) to a file, validating each; returns what was set."""
    current = flatten(read_yaml(file), source=str(file)) if file.exists() else {}
    changed = {}
    for name, text in updates:
        key = resolve_key(name)
        current[key.path] = changed[key.path] = parse_cli_value(key, text)
    write_config(file, current)
    return changed
