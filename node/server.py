"""Running a node: check the secret, take the pid lock, serve the API with uvicorn, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

import uvicorn

from pinkybrain.node.core.config import Config, ConfigError, load_config
from pinkybrain.node.core.identity import Identity, IdentityError, load_identity, save_identity
from pinkybrain.node.core.release import RESTART_EXIT_CODE, RESTART_SIGNAL
from pinkybrain.node.core.secrets import WeakSecretError, check_secret, release_estimator
from pinkybrain.node.services.process import AlreadyRunning, PidFile, sd_notify

log = logging.getLogger("pinkybrain.node")


class StartupError(RuntimeError):
    """The node cannot start; str() is one line saying why and how to fix it."""


class NodeServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would kill the process before
    our own clean-up (stores, pid file). Here the signals only ask for a graceful exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def prepare(cfg: Config, secret_check=None) -> Identity:
    """The start-up checks, then the identity. `secret_check`: a services.secret_check.SecretCheck already
    running for cfg's secret (its verdict is awaited here); without one the secret is checked here."""
    try:
        if secret_check is not None:
            secret_check.result()
        else:
            check_secret(cfg["p2p.secret"])
    except WeakSecretError as exc:
        raise StartupError(f"refusing to start: {exc}") from None
    exposed = cfg.secret_file_problem()
    if exposed is not None:
        message, refuse = exposed
        if refuse:
            raise StartupError(f"refusing to start: {message}")
        log.warning("%s", message)
    path = cfg.identity_path
    if not path.exists():
        identity = Identity.generate()
        save_identity(identity, path)
        log.info("created identity %s at %s", identity.node_id, path)
        return identity
    try:
        return load_identity(path)
    except IdentityError as exc:
        raise StartupError(f"refusing to start: {exc}") from None


LOG_FILE_ENV = "PINKYBRAIN_LOG_FILE"  # set by `serve --daemon`: log there, with stdout and stderr


def configure_logging(cfg: Config) -> None:
    """One safe handler (escaped, capped lines; see services/node_log.py): the daemon's log file, else
    logging.file, else stderr. A file is 0600 and rotated by size."""
    from pathlib import Path

    from pinkybrain.node.services.node_log import configure

    daemon_file = os.environ.get(LOG_FILE_ENV)
    file = Path(daemon_file) if daemon_file else (cfg.path("logging.file") if cfg["logging.file"] else None)
    configure(cfg["logging.level"], file=file, max_bytes=cfg["logging.max_bytes"], backups=cfg["logging.backups"],
              own_stdio=bool(daemon_file))


async def _serve(
    cfg: Config, identity: Identity, host: str, port: int, config_source: str | None, peers: tuple[str, ...] = ()
) -> int:
    from pinkybrain.node.api.front import NodeFront
    from pinkybrain.node.services.http_guard import ConnectionLimits, guarded_protocol, websocket_protocol
    from pinkybrain.node.services.runtime import NodeRuntime

    runtime = NodeRuntime(cfg, identity, bind_host=host, port=port, extra_peers=peers)
    # The credentials the front checks requests against are read before the port is bound; the stores, the
    # mesh and the rest start once it is (a ping answers meanwhile; other requests wait: api/front.py). A
    # damaged store still stops the node with its own message (what is wrong, how to recover).
    try:
        await runtime.start_front()
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)
        await runtime.stop()
        raise StartupError(f"refusing to start: {exc}") from None

    def build_api():
        from pinkybrain.node.api.app import create_app

        return create_app(runtime, manage_lifecycle=False, layers=False)

    app = NodeFront(runtime, build_api)  # FastAPI is imported on the first request that needs it
    server = NodeServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,  # uvicorn's own records go through our handler: escaped, capped, rotated
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=20,
            # Slow or idle clients cannot hold connections (or the memory behind them): the guard times
            # out headers and bodies and caps connections per address; uvicorn closes idle keep-alives and
            # answers 503 past the total.
            http=guarded_protocol(ConnectionLimits.from_config(cfg)),
            timeout_keep_alive=cfg["http.idle_timeout_secs"],
            limit_concurrency=cfg["http.max_connections"],
            # Peer links (/p2p): a frame is at most p2p.max_frame_bytes plus a small header, and ciphertext
            # does not compress.
            ws=websocket_protocol,  # websockets is imported at the first peer link
            ws_max_size=cfg["p2p.max_frame_bytes"] + 1024,
            ws_per_message_deflate=False,
        )
    )
    tls_server = _tls_server(cfg, identity, app, host) if cfg["api.tls"] else None
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            runtime.reload_guard(load_config(config_source))
        except ConfigError as exc:
            log.error("reload refused, keeping the running settings: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    restart = {"requested": False}

    def request_restart() -> None:
        # The updater switched `current` to a new release: stop gracefully and exit RESTART_EXIT_CODE,
        # on which the systemd unit starts the node again (RestartForceExitStatus=).
        log.info("restarting into a new release (exit status %d)", RESTART_EXIT_CODE)
        restart["requested"] = True
        server.handle_exit(RESTART_SIGNAL, None)

    loop.add_signal_handler(RESTART_SIGNAL, request_restart)

    failed: list[BaseException] = []

    async def start_services() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            await runtime.start_services()
        except Exception as exc:
            log.debug("start-up failed", exc_info=True)
            failed.append(exc)
            server.should_exit = True

    async def announce_ready() -> None:
        await asyncio.shield(services_task)  # cancelling this task leaves a services start to finish
        if failed:
            return
        log.info("node %s (%s) listening on %s:%d", identity.node_id, cfg.node_name, host, port)
        # An update that restarted into this version is settled. In a thread, with the updater's imports:
        # the requests that waited for the services are answered meanwhile, not after them.
        await asyncio.to_thread(_confirm_update, cfg.home, runtime.version)
        sd_notify("READY=1\nSTATUS=serving")
        # Only now: what the first requests do not need.
        release_start_up_memory()
        try:
            await runtime.start_discovery()
        except Exception as exc:  # noqa: BLE001 - the API is up and keeps serving; say why discovery is off
            log.error("discovery did not start (%s: %s); peers are found by address only", type(exc).__name__, exc)

    services_task = asyncio.create_task(start_services())
    ready_task = asyncio.create_task(announce_ready())
    tls_task = asyncio.create_task(_serve_tls(tls_server, cfg["api.tls_port"])) if tls_server is not None else None
    try:
        await server.serve()
    finally:
        sd_notify("STOPPING=1")
        ready_task.cancel()
        if server.started and not services_task.done():
            # The stores are opening: let them (bounded), so stop() closes everything that was opened.
            await asyncio.wait({services_task}, timeout=30)
        services_task.cancel()
        await asyncio.gather(ready_task, services_task, return_exceptions=True)
        if tls_task is not None:
            tls_server.should_exit = True
            await asyncio.gather(tls_task, return_exceptions=True)
        await runtime.stop()
    if failed:
        raise StartupError(f"refusing to start: {failed[0]}")
    if not server.started:
        raise StartupError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    return RESTART_EXIT_CODE if restart["requested"] else 0


def _confirm_update(home, version: str) -> None:
    from pinkybrain.node.services.updater import confirm_running  # imported once the node has started

    confirm_running(home, version)


def release_start_up_memory() -> None:
    """Once the API answers, give start-up garbage back to the system: zxcvbn's dictionaries (the secret
    was checked), the temporaries of FastAPI's schema building. gc.collect() frees the cycles (modules are
    cycles); glibc's malloc_trim returns the freed heap pages, where there is one (not macOS, not musl).
    What survives start-up lives as long as the node: gc.freeze() takes it out of the collector's
    generations, so the collections that every request's garbage triggers no longer walk it."""
    release_estimator()
    gc.collect()
    gc.freeze()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _QuietServer(uvicorn.Server):
    """A second listener: the main server handles the signals and tells this one to exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _tls_server(cfg: Config, identity: Identity, app, host: str) -> uvicorn.Server:
    """`api.tls`: the same app over HTTPS on api.tls_port, for clients that cannot seal (OpenAI's, on /v1)."""
    from pinkybrain.node.services.http_guard import ConnectionLimits, guarded_protocol
    from pinkybrain.node.services.tls import certificate_names, ensure_certificate, server_context

    cert = ensure_certificate(cfg.home, identity, certificate_names(cfg, host))
    config = uvicorn.Config(app, host=host, port=cfg["api.tls_port"], log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=20,
                            # the same connection guard and limits as the plain port
                            http=guarded_protocol(ConnectionLimits.from_config(cfg)),
                            timeout_keep_alive=cfg["http.idle_timeout_secs"],
                            limit_concurrency=cfg["http.max_connections"])
    config.load()
    config.ssl = server_context(cert, identity)  # uvicorn would read the key from a file it keeps
    log.info("serving HTTPS on %s:%d with %s (its key is this node's identity)", host, cfg["api.tls_port"], cert)
    return _QuietServer(config)


async def _serve_tls(server: uvicorn.Server, port: int) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn's way of saying it cannot bind; the plain API goes on serving
        log.error("api.tls: could not listen for HTTPS on port %d (in use?); HTTPS is off", port)


def event_loop_factory():
    """uvloop's event loop where the platform has it (its I/O loop is C, a third less CPU per request here),
    else asyncio's own. PINKYBRAIN_EVENT_LOOP=asyncio chooses asyncio's (a fallback, and for comparison)."""
    if os.environ.get("PINKYBRAIN_EVENT_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def foreground_args(args: list[str]) -> tuple[str | None, str | None, int | None, tuple[str, ...]] | None:
    """(config, host, port, peers) of a plain foreground `serve` command line (the words after `serve`), or
    None when it asks for anything else (--daemon, --stop, --json, --help, a repeated or odd value): the
    typer CLI then handles it. The node process is started this way (systemd, `serve --daemon`, updates),
    and building the CLI (typer, every command's module) would add ~0.3 s and ~5 MiB to every start."""
    values: dict[str, str] = {}
    peers: list[str] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in ("--config", "--host", "--port", "--peer"):
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            i += 1
            value = args[i]
        i += 1
        if not value or value.startswith("-"):
            return None
        if name == "--peer":
            peers.append(value)
        elif name in values:
            return None
        else:
            values[name] = value
    port = values.get("--port")
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return values.get("--config"), values.get("--host"), int(port) if port else None, tuple(peers)


def _import_serve_path() -> None:
    """What _serve() imports before the port is bound, imported while the secret check runs beside it
    (imports only: nothing is created or opened before the check's verdict)."""
    import pinkybrain.node.api.front  # noqa: F401
    import pinkybrain.node.services.credentials  # noqa: F401
    import pinkybrain.node.services.http_guard  # noqa: F401
    import pinkybrain.node.services.runtime  # noqa: F401

    event_loop_factory()  # imports uvloop where installed


def serve(config_source: str | None, host: str | None, port: int | None, peers: tuple[str, ...] = ()) -> int:
    """Run a node in the foreground until SIGTERM/SIGINT; returns the exit status."""
    try:
        cfg = load_config(config_source)
        bind_host, bind_port = cfg.listen_address()
        host, port = host or bind_host, port or bind_port
        configure_logging(cfg)
        from pinkybrain.node.services.secret_check import SecretCheck

        secret_check = SecretCheck.start(cfg["p2p.secret"])  # on the other core while the imports run
        _import_serve_path()
        identity = prepare(cfg, secret_check)
        pid_file = PidFile(cfg.home / "pinkybrain.pid")
        pid_file.acquire()
    except (ConfigError, StartupError, AlreadyRunning, IdentityError) as exc:
        print(f"pinkybrain: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            code = runner.run(_serve(cfg, identity, host, port, config_source, peers))
    except StartupError as exc:
        print(f"pinkybrain: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        if exc.code in (0, None):
            return 0
        print(
            f"pinkybrain: could not listen on {host}:{port} (in use, or not an address of this machine)",
            file=sys.stderr,
        )
        return 1
    finally:
        pid_file.release()
    return code
