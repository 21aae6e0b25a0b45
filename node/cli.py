"""Node-local commands (they act on this machine's files and processes, not through the API):
`serve` (foreground, --daemon, --stop), `identity init/show`, `config init/set/show`, `openapi`,
`tracker serve`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", help="pinkybrain.yaml to use (else the lookup order)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def json_requested(argv: list[str] | None = None) -> bool:
    """Whether this command line asks for --json (before a `--`, after which words are arguments)."""
    args = (sys.argv if argv is None else argv)[1:]
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and exit `code`; under --json that line is {"error": ..., "exit_code": ...}."""
    if json_requested():
        typer.echo(json.dumps({"error": message, "exit_code": code}, ensure_ascii=False), err=True)
    else:
        typer.echo(f"pinkybrain: {message}", err=True)
    raise typer.Exit(code)


def emit(data, as_json: bool, human: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else human)


def _load(config: str | None):
    from pinkybrain.node.core.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        fail(str(exc))


# -- serve ------------------------------------------------------------------------------------------
def serve(
    config: ConfigOpt = None,
    host: Annotated[Optional[str], typer.Option(help="bind address (overrides p2p.listen)")] = None,
    port: Annotated[
        Optional[int], typer.Option(help="port (overrides node.port / p2p.listen)", min=1, max=65535)
    ] = None,
    daemon: Annotated[
        bool, typer.Option("--daemon", help="run in the background; returns once the API answers")
    ] = False,
    stop: Annotated[bool, typer.Option("--stop", help="stop the background node of this home")] = False,
    peer: Annotated[
        Optional[list[str]], typer.Option("--peer", help="static peer URL, e.g. http://host:8080 (repeatable)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the node (foreground by default)."""
    from pinkybrain.node.services.daemon import DaemonError, start_daemon, stop_daemon

    if daemon and stop:
        fail("--daemon and --stop exclude each other")
    cfg = _load(config)
    if stop:
        try:
            info = stop_daemon(cfg.home)
        except DaemonError as exc:
            fail(str(exc), 1)
        emit(info, as_json, f"stopped node (pid {info['pid']})")
        return
    if daemon:
        from pinkybrain.node.core.secrets import WeakSecretError, check_secret

        try:
            check_secret(cfg["p2p.secret"])
            bind_host, bind_port = cfg.listen_address()
            info = start_daemon(cfg, config, host or bind_host, port or bind_port, peers=tuple(peer or ()))
        except WeakSecretError as exc:
            fail(f"refusing to start: {exc}")
        except DaemonError as exc:
            fail(str(exc), 1)
        emit(
            info,
            as_json,
            f"node running in the background (pid {info['pid']}) at {info['url']}; log: {info['log_file']}",
        )
        return
    from pinkybrain.node.server import serve as run

    raise typer.Exit(run(config, host, port, tuple(peer or ())))


# -- identity ---------------------------------------------------------------------------------------
identity_app = typer.Typer(help="This node's Ed25519 identity.", no_args_is_help=True)


@identity_app.command("init")
def identity_init(
    config: ConfigOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing key (the node id changes)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the Ed25519 key and the owner key (both mode 0600); refuses to overwrite one without --force."""
    from pinkybrain.node.core.identity import Identity, IdentityError, save_identity
    from pinkybrain.node.services.credentials import OWNER_KEY_FILE, CredentialError, ensure_owner_key

    cfg = _load(config)
    identity = Identity.generate()
    try:
        save_identity(identity, cfg.identity_path, force=force)
        # The owner's credential: random, this machine's alone (never derived from the network secret).
        ensure_owner_key(cfg.home, identity.node_id, replace=force)
    except (IdentityError, CredentialError) as exc:
        fail(str(exc))
    owner_file = cfg.home / OWNER_KEY_FILE
    emit(
        {"node_id": identity.node_id, "key_file": str(cfg.identity_path), "owner_key_file": str(owner_file)},
        as_json,
        f"created identity {identity.node_id}\nkey: {cfg.identity_path}\nowner key: {owner_file}",
    )


@identity_app.command("show")
def identity_show(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Print this node's id (derived from its public key, with check characters)."""
    from pinkybrain.node.core.identity import IdentityError, load_identity

    cfg = _load(config)
    try:
        identity = load_identity(cfg.identity_path)
    except IdentityError as exc:
        fail(str(exc))
    emit(
        {
            "node_id": identity.node_id,
            "public_key": identity.public_key.hex(),
            "key_file": str(cfg.identity_path),
        },
        as_json,
        identity.node_id,
    )


# -- config -----------------------------------------------------------------------------------------
config_app = typer.Typer(help="pinkybrain.yaml: create, edit, show.", no_args_is_help=True)


def _target_file(config: str | None) -> Path:
    from pinkybrain.node.core.config import CONFIG_FILENAME, find_config_file, pinkybrain_home

    return find_config_file(config) or pinkybrain_home() / CONFIG_FILENAME


@config_app.command("init")
def config_init(
    path: Annotated[
        Optional[Path],
        typer.Option("--path", help="where to write (default: $PINKYBRAIN_HOME/pinkybrain.yaml)"),
    ] = None,
    secret: Annotated[
        Optional[str], typer.Option("--secret", help="network secret (default: generate a strong one)")
    ] = None,
    name: Annotated[Optional[str], typer.Option("--name")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=1, max=65535)] = None,
    listen: Annotated[Optional[str], typer.Option("--listen", help="bind host[:port]")] = None,
    shared_models_dir: Annotated[Optional[str], typer.Option("--shared-models-dir")] = None,
    public: Annotated[
        Optional[bool], typer.Option("--public/--private", help="join the public mesh at start")
    ] = None,
    stealth: Annotated[Optional[bool], typer.Option("--stealth/--no-stealth")] = None,
    peers: Annotated[Optional[list[str]], typer.Option("--peer", help="static peer URL (repeatable)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
    interactive: Annotated[
        Optional[bool],
        typer.Option("--interactive/--no-interactive", help="ask questions (default: when on a terminal)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a new pinkybrain.yaml; asks on a terminal, takes flags otherwise. Generates a strong secret."""
    from pinkybrain.node.core.config import (
        CONFIG_FILENAME,
        KEYS,
        ConfigError,
        coerce,
        pinkybrain_home,
        write_config,
    )
    from pinkybrain.node.core.secrets import WeakSecretError, check_secret, generate_secret

    target = path or pinkybrain_home() / CONFIG_FILENAME
    if target.exists() and not force:
        fail(f"{target} exists; edit it with `pinkybrain config set` or pass --force to overwrite")
    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
    values: dict = {}
    # An exported P2P_SECRET is the network's secret (every command signs with it): the file gets the same
    # one, never a different generated one that the node would then ignore in favour of the environment.
    source = "--secret" if secret is not None else None
    env_secret = os.environ.get("P2P_SECRET", "").strip()
    if secret is None and env_secret:
        secret, source = env_secret, "P2P_SECRET"
    if interactive:
        import socket

        name = name or typer.prompt("Node name", default=socket.gethostname())
        port = port or typer.prompt("API port", default=8080, type=int)
        if secret is None:
            entered = typer.prompt(
                "Network secret (empty: generate a strong one)",
                default="",
                hide_input=True,
                show_default=False,
            )
            secret = entered or None
            source = "prompt" if secret else None
        if public is None:
            public = typer.confirm("Join the public mesh at start?", default=False)
        if stealth is None:
            stealth = typer.confirm("Stealth (hidden from trackers and peer lists)?", default=False)
    generated = secret is None
    secret = secret or generate_secret()
    try:
        check_secret(secret)
    except WeakSecretError as exc:
        fail(f"{exc} (from the exported P2P_SECRET)" if source == "P2P_SECRET" else str(exc))
    values["p2p.secret"] = secret
    for key, value in (
        ("node.name", name),
        ("node.port", port),
        ("p2p.listen", listen),
        ("sharing.shared_models_dir", shared_models_dir),
        ("mesh.public", public),
        ("mesh.stealth", stealth),
        ("p2p.peers", peers or None),
    ):
        if value is not None:
            try:
                values[key] = coerce(KEYS[key], value)
            except ConfigError as exc:
                fail(str(exc))
    write_config(target, values)
    how = {
        "P2P_SECRET": " (with the secret from the exported P2P_SECRET)",
        None: " (with a newly generated secret: no --secret given and P2P_SECRET is not set)",
    }.get(source, "")
    emit(
        {"path": str(target), "secret_generated": generated, "secret_source": source or "generated"},
        as_json,
        f"wrote {target}{how}",
    )


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="dotted key (mesh.stealth) or short form (stealth)")],
    value: Annotated[str, typer.Argument(help="new value (true/false, numbers, text, a,b lists)")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set one key in pinkybrain.yaml (validated; the file is rewritten atomically)."""
    from pinkybrain.node.core.config import ConfigError, set_values

    target = _target_file(config)
    try:
        changed = set_values(target, [(key, value)])
    except ConfigError as exc:
        fail(str(exc))
    shown = {k: ("<hidden>" if k == "p2p.secret" else v) for k, v in changed.items()}
    emit(
        {"path": str(target), "set": shown},
        as_json,
        "\n".join(f"{k} = {json.dumps(v)}" for k, v in shown.items()) + f"  ({target})",
    )


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="list every key with its type and default")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the effective configuration (the secret is never printed)."""
    import yaml

    from pinkybrain.node.core.config import SCHEMA, SHORT_FORMS

    if keys:
        rows = [
            {
                "key": k.path,
                "type": k.type if not k.choices else "|".join(k.choices),
                "default": k.default,
                "help": k.help,
            }
            for k in SCHEMA
        ]
        if as_json:
            emit({"keys": rows, "short_forms": SHORT_FORMS}, True, "")
        else:
            for r in rows:
                typer.echo(f"{r['key']:<34} {r['type']:<22} {json.dumps(r['default']):<30} {r['help']}")
        return
    cfg = _load(config)
    data = {"file": str(cfg.file) if cfg.file else None, "home": str(cfg.home), "config": cfg.redacted()}
    if as_json:
        emit(data, True, "")
    else:
        typer.echo(f"# file: {data['file'] or '(none: defaults)'}\n# home: {data['home']}")
        typer.echo(yaml.safe_dump(data["config"], sort_keys=False).rstrip())


# -- openapi ----------------------------------------------------------------------------------------
def openapi(
    as_json: Annotated[bool, typer.Option("--json", help="accepted for uniformity: the output is JSON")] = False,
) -> None:
    """Print the OpenAPI description of the node API."""
    from pinkybrain.node.api.app import describe_api

    typer.echo(json.dumps(describe_api(), indent=2, sort_keys=True))


# -- service ----------------------------------------------------------------------------------------
service_app = typer.Typer(help="The node as an operating-system service (systemd unit, launchd job).",
                          no_args_is_help=True)


@service_app.command("status")
def service_status(as_json: JsonOpt = False) -> None:
    """How systemd (Linux) or launchd (macOS) sees the node: installed, running, pid, last exit status."""
    from pinkybrain.node.services.service_status import describe, status

    info = status()
    emit(info, as_json, describe(info))


# -- tracker ----------------------------------------------------------------------------------------
tracker_app = typer.Typer(
    help="Run a tracker: signed peer records, peer lists and an encrypted-frame relay.", no_args_is_help=True
)


@tracker_app.command("serve")
def tracker_serve(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free one)", min=0, max=65535)] = 8090,
    public_url: Annotated[
        Optional[str],
        typer.Option("--public-url", help="URL clients dial and sign, e.g. wss://tracker.example.org"),
    ] = None,
    max_records: Annotated[int, typer.Option("--max-records", help="records held at most", min=1)] = 100_000,
    max_sessions: Annotated[
        int, typer.Option("--max-sessions", help="open sessions at most", min=1)
    ] = 10_000,
    max_sessions_per_ip: Annotated[
        int, typer.Option("--max-sessions-per-ip", help="open sessions per client address", min=1)
    ] = 32,
    auth_timeout: Annotated[
        float, typer.Option("--auth-timeout", help="seconds a client has to prove its node id", min=0.1)
    ] = 5.0,
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", help="seconds of client silence before closing", min=1)
    ] = 300.0,
    announce_rate: Annotated[
        float, typer.Option("--announce-rate", help="announces per second per session", min=0.01)
    ] = 1.0,
    ip_new_record_rate: Annotated[
        float,
        typer.Option("--ip-new-record-rate", help="new node ids per second per client address range (/24, /48)",
                     min=0.001),
    ] = 1.0,
    max_records_per_range: Annotated[
        int, typer.Option("--max-records-per-range", help="records one address range (/24, /48) may hold", min=1)
    ] = 1024,
    list_rate: Annotated[
        float, typer.Option("--list-rate", help="lists per second per session", min=0.01)
    ] = 5.0,
    relay_rate: Annotated[
        float, typer.Option("--relay-rate", help="relayed frames per second per session", min=1)
    ] = 1000.0,
    relay_bytes_rate: Annotated[
        float, typer.Option("--relay-bytes-rate", help="relayed bytes per second per session", min=1024)
    ] = 8 * 1024 * 1024,
    tls_cert: Annotated[
        Optional[str], typer.Option("--tls-cert", help="PEM certificate: serve wss directly")
    ] = None,
    tls_key: Annotated[
        Optional[str], typer.Option("--tls-key", help="PEM private key for --tls-cert")
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error (payloads are never logged)")
    ] = "info",
    as_json: Annotated[
        bool, typer.Option("--json", help="once listening, print one JSON line: address, URL, pid")
    ] = False,
) -> None:
    """Run a tracker in the foreground until SIGTERM or Ctrl-C."""
    from pinkybrain.node.services.tracker import TrackerSettings, run_tracker

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail(f"--log-level {log_level!r}: use debug, info, warning or error")
    if bool(tls_cert) != bool(tls_key):
        fail("--tls-cert and --tls-key go together")
    settings = TrackerSettings(
        host=host,
        port=port,
        public_url=public_url,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_records=max_records,
        max_sessions=max_sessions,
        max_sessions_per_ip=max_sessions_per_ip,
        auth_timeout=auth_timeout,
        idle_timeout=idle_timeout,
        announce_rate=announce_rate,
        ip_new_record_rate=ip_new_record_rate,
        max_records_per_range=max_records_per_range,
        list_rate=list_rate,
        relay_rate=relay_rate,
        relay_bytes_rate=relay_bytes_rate,
    )
    if public_url:
        try:
            settings.advertised_url()
        except ValueError as exc:
            fail(f"--public-url: {exc}")
    def ready(info: dict) -> None:
        typer.echo(json.dumps(info))

    raise typer.Exit(run_tracker(settings, log_level=log_level.lower(), on_ready=ready if as_json else None))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(identity_app, name="identity")
    app.add_typer(config_app, name="config")
    app.command("openapi", hidden=True)(openapi)
    from pinkybrain.node import release_cli

    app.add_typer(release_cli.release_app, name="release", help="Maintainers: release keys and signed manifests.")
    app.add_typer(tracker_app, name="tracker")
    app.add_typer(service_app, name="service")


def main() -> None:
    app = typer.Typer(help="PinkyBrain node.", no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False)
    register(app)
    app()
