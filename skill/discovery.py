"""Find a node to talk to: the seed's order, first node that accepts our signed ping wins.

  1. PINKYBRAIN_URL                          (step "env"; when set, the only step: a URL the user
                                             named that does not answer is an error, not a fallback)
  2. http://localhost:8080/api/ping          (step "localhost:8080")
     If this machine's pinkybrain.yaml gives the local node another port (p2p.listen, else node.port),
     that address is probed first, just before 8080 (step "localhost:<port>", or "<host>:<port>" when
     the node is bound to one address rather than all), so a node on a custom port is found locally.
  3. http://localhost:8081/api/ping          (step "localhost:8081")
  4. Tailscale peers: `tailscale status --json`, this machine's and each online peer's IPv4
     TailscaleIPs, on the same ports (step "tailscale")
  5. mDNS: browse `_pinkybrain._tcp.local.` for a bounded time, resolve, probe (step "mdns")

A probe is a signed GET /api/ping with a short timeout. A node that answers 401 was found but does not
share our secret: it is remembered for the error message and discovery goes on. A responder whose answer
lacks a valid node proof (skill.signing.check_proof: it does not hold our secret, whatever it answers) is
skipped, and so is any node other than the pinned one (--node / PINKYBRAIN_NODE); --verbose says so on
stderr. Nothing is cached.

Advanced knobs (mostly for tests and unusual setups):
  PINKYBRAIN_DISCOVERY_PORTS="p1,p2"   ports for steps 2-4 instead of 8080,8081
  PINKYBRAIN_MDNS_INTERFACES="a,b"     IPv4 addresses to browse mDNS on (default: all interfaces)
  PINKYBRAIN_MDNS_TIMEOUT=secs         how long to browse mDNS (default 2.5)
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

import httpx

from pinkybrain.skill.client import SkillError, describe_refusal, normalize_url, unproven
from pinkybrain.skill.localconfig import LocalConfig
from pinkybrain.skill.signing import HmacAuth, ProofError, check_proof

SERVICE_TYPE = "_pinkybrain._tcp.local."
DEFAULT_PORTS = (8080, 8081)
LOCAL_PROBE_TIMEOUT = 0.75  # a refused localhost connection fails at once; this only bounds a hung one
REMOTE_PROBE_TIMEOUT = 1.0
ENV_PROBE_TIMEOUT = 3.0  # the user named this node explicitly: give it a little longer
TAILSCALE_TIMEOUT = 3.0
DEFAULT_MDNS_TIMEOUT = 2.5


@dataclass
class Probe:
    url: str
    # "ok" | "refused" (401) | "error" (a node's error answer) | "unreachable" | "foreign" (not a node)
    # | "unproven" (answers, but without a valid proof) | "other" (a proven node, not the pinned one)
    outcome: str
    info: dict = field(default_factory=dict)
    detail: str = ""


@dataclass
class Discovered:
    url: str
    via: str  # "url-flag", "env", "localhost:<port>", "<host>:<port>", "tailscale", "mdns"
    info: dict  # the node's /api/ping answer (empty for --url, which is not probed)
    node_id: str | None = None  # proven by the ping's answer


def probe(url: str, secret: str, timeout: float, pinned: str | None = None) -> Probe:
    try:
        auth = HmacAuth(secret)
        with httpx.Client(auth=auth, timeout=timeout) as http:
            response = http.get(f"{url}/api/ping")
    except httpx.ConnectError as exc:
        return Probe(url, "unreachable", detail="connection refused" if "refused" in str(exc).lower() else
                     "cannot connect")
    except httpx.TimeoutException:
        return Probe(url, "unreachable", detail=f"no answer in {timeout:g}s")
    except httpx.HTTPError as exc:
        return Probe(url, "unreachable", detail=type(exc).__name__)
    if response.status_code == 401:
        return Probe(url, "refused", detail=describe_refusal(url, response))
    try:
        node_id = check_proof(secret, response.request.headers["X-PinkyBrain-Nonce"], response.headers,
                              proof_key=auth.proof_key)
    except ProofError as exc:
        return Probe(url, "unproven", detail=unproven(url, str(exc)))
    if pinned is not None and node_id != pinned:
        return Probe(url, "other", info={"node_id": node_id},
                     detail=f"found node {node_id} at {url}, not the pinned node {pinned}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict) and body.get("pong") is True:
        return Probe(url, "ok", info={**body, "node_id": node_id})
    if isinstance(body, dict) and isinstance(body.get("detail"), str) and body.get("error"):
        # A node's error shape (e.g. 503 busy): it is a node, but it would not answer now.
        return Probe(url, "error", detail=f"found a node at {url}, but it answered: {body['detail']}")
    return Probe(url, "foreign", detail=f"HTTP {response.status_code}, not a PinkyBrain node")


def discovery_ports() -> list[int]:
    text = os.environ.get("PINKYBRAIN_DISCOVERY_PORTS", "").strip()
    if not text:
        return list(DEFAULT_PORTS)
    ports = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise SkillError(f"PINKYBRAIN_DISCOVERY_PORTS must be comma-separated ports, got {text!r}")
        ports.append(int(part))
    return ports


def _host_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def tailscale_addresses(timeout: float = TAILSCALE_TIMEOUT) -> tuple[list[str], str]:
    """IPv4 addresses of this machine and its online peers, and a note for the 'tried' list."""
    binary = shutil.which("tailscale")
    if binary is None:
        return [], "not installed"
    try:
        proc = subprocess.run([binary, "status", "--json"], capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], f"`tailscale status` took over {timeout:g}s"
    except OSError as exc:
        return [], f"cannot run tailscale: {exc.strerror}"
    if proc.returncode != 0:
        return [], f"`tailscale status` exited {proc.returncode}"
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return [], "`tailscale status --json` printed invalid JSON"
    if not isinstance(data, dict):
        return [], "`tailscale status --json` printed an unexpected shape"
    hosts: list[dict] = []
    if isinstance(data.get("Self"), dict):
        hosts.append(data["Self"])  # this machine's node may listen on its tailnet address only
    peers = data.get("Peer")
    if isinstance(peers, dict):
        hosts += [p for p in peers.values() if isinstance(p, dict) and p.get("Online")]
    addresses: list[str] = []
    for host in hosts:
        for ip in host.get("TailscaleIPs") or []:
            if isinstance(ip, str) and ":" not in ip and ip not in addresses:
                addresses.append(ip)
    return addresses, f"{len(addresses)} address(es)"


def _mdns_interfaces():
    text = os.environ.get("PINKYBRAIN_MDNS_INTERFACES", "").strip()
    if text:
        return [part.strip() for part in text.split(",") if part.strip()]
    from zeroconf import InterfaceChoice

    return InterfaceChoice.All


def mdns_timeout() -> float:
    text = os.environ.get("PINKYBRAIN_MDNS_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_MDNS_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise SkillError(f"PINKYBRAIN_MDNS_TIMEOUT must be seconds, got {text!r}") from None
    if not math.isfinite(value):
        raise SkillError(f"PINKYBRAIN_MDNS_TIMEOUT must be a finite number of seconds, got {text!r}")
    return max(0.0, value)


def mdns_candidates(timeout: float) -> Generator[list[str], None, None]:
    """Yield each advertised node's URLs as its service resolves, until `timeout` has passed.

    A generator, so the caller can stop at the first node that accepts instead of browsing on."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    deadline = time.monotonic() + timeout
    names: queue.Queue[str] = queue.Queue()

    def on_change(zeroconf, service_type, name, state_change) -> None:
        if state_change is ServiceStateChange.Added:
            names.put(name)

    zc = Zeroconf(interfaces=_mdns_interfaces(), ip_version=IPVersion.V4Only)
    browser = None
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        while (left := deadline - time.monotonic()) > 0:
            try:
                name = names.get(timeout=left)
            except queue.Empty:
                break
            wait_ms = max(100, int((deadline - time.monotonic()) * 1000))
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=wait_ms)
            if info is None or not info.port:
                continue
            yield [_host_url(a, info.port) for a in info.parsed_addresses(IPVersion.V4Only)]
    finally:
        if browser is not None:
            browser.cancel()
        zc.close()


class _Search:
    def __init__(self, secret: str, pinned: str | None, verbose: bool):
        self.secret = secret
        self.pinned = pinned
        self.verbose = verbose
        self.tried: list[str] = []
        self.refused: list[Probe] = []
        self.errored: list[Probe] = []
        self.skipped: list[Probe] = []  # unproven responders and other nodes than the pinned one
        self.seen: set[str] = set()
        self.last_detail = ""

    def one(self, url: str, via: str, timeout: float, label: str | None = None) -> Discovered | None:
        return self.first([url], via, timeout, label)

    def first(self, urls: list[str], via: str, timeout: float, label: str | None = None) -> Discovered | None:
        """Probe urls concurrently; the first in list order that accepts wins (not the fastest)."""
        urls = [u for u in urls if u not in self.seen]
        self.seen.update(urls)
        if not urls:
            return None
        if len(urls) == 1:
            results = [probe(urls[0], self.secret, timeout, self.pinned)]
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
                results = list(pool.map(lambda u: probe(u, self.secret, timeout, self.pinned), urls))
        for result in results:
            if result.outcome == "ok":
                return Discovered(result.url, via, result.info, result.info["node_id"])
            if result.outcome in ("unproven", "other"):
                self.skipped.append(result)
                if self.verbose:
                    print(f"pinkybrain: skipped {result.url} ({via}): {result.detail}", file=sys.stderr)
        self.last_detail = results[0].detail
        self.refused += [r for r in results if r.outcome == "refused"]
        self.errored += [r for r in results if r.outcome == "error"]
        if label is not None:
            self.tried.append(f"{label} ({results[0].detail})" if len(results) == 1 else label)
        return None

    def failure(self) -> SkillError:
        if self.refused:
            if len(self.refused) == 1:
                return SkillError(self.refused[0].detail)
            urls = ", ".join(p.url for p in self.refused)
            return SkillError(f"found nodes at {urls}, but the secret does not match (P2P_SECRET)")
        if self.errored:
            return SkillError(self.errored[0].detail)
        others = [p for p in self.skipped if p.outcome == "other"]
        if others:
            return SkillError(others[0].detail + (f" (and {len(others) - 1} other node(s))" if len(others) > 1 else "")
                              + "; unpin with --node / PINKYBRAIN_NODE")
        if self.skipped:
            return SkillError(self.skipped[0].detail + " (skipped; no node of your network found)")
        return SkillError("no PinkyBrain node found; tried: " + "; ".join(self.tried)
                          + ". Start one with `pinkybrain serve`, or set PINKYBRAIN_URL or pass --url")


def discover(local: LocalConfig, secret: str, pinned: str | None = None, verbose: bool = False) -> Discovered:
    """Run the steps in order; return the first node that accepts and proves itself (and is the pinned
    one, if any), else raise SkillError (see module doc)."""
    search = _Search(secret, pinned, verbose)
    ports = discovery_ports()

    env_url = os.environ.get("PINKYBRAIN_URL", "").strip()
    if env_url:
        # The user named this node: it answers or it is an error, never a quiet answer from another node.
        url = normalize_url(env_url)
        if found := search.one(url, "env", ENV_PROBE_TIMEOUT):
            return found
        if search.refused or search.errored:
            raise search.failure()
        raise SkillError(f"PINKYBRAIN_URL={url} does not answer ({search.last_detail}); it is used alone, "
                         "without discovery: start that node, fix the URL, or unset PINKYBRAIN_URL")

    local_targets: list[tuple[str, int]] = []
    if local.port is not None and not (local.host == "localhost" and local.port in ports):
        local_targets.append((local.host, local.port))
    local_targets += [("localhost", p) for p in ports]
    for host, port in local_targets:
        step = f"{host}:{port}"
        if found := search.one(_host_url(host, port), step, LOCAL_PROBE_TIMEOUT, step):
            return found

    addresses, note = tailscale_addresses()
    ts_ports = ports + ([local.port] if local.port is not None and local.port not in ports else [])
    urls = [_host_url(a, p) for a in addresses for p in ts_ports]
    if found := search.first(urls, "tailscale", REMOTE_PROBE_TIMEOUT):
        return found
    search.tried.append(f"tailscale ({note})")

    timeout = mdns_timeout()
    announced = 0
    if timeout > 0:
        try:
            # closing(): stop browsing (and close the sockets) as soon as a node accepts.
            with closing(mdns_candidates(timeout)) as candidates:
                for urls in candidates:
                    announced += 1
                    if found := search.first(urls, "mdns", REMOTE_PROBE_TIMEOUT):
                        return found
            search.tried.append(f"mDNS ({announced or 'no'} node(s) announced in {timeout:g}s)")
        except OSError as exc:  # no multicast (some containers): the step is skipped, not fatal
            search.tried.append(f"mDNS (unavailable: {exc.strerror or exc})")
    else:
        search.tried.append("mDNS (disabled: PINKYBRAIN_MDNS_TIMEOUT=0)")
    raise search.failure()
