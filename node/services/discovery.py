"""Finding other nodes: mDNS (`_pinkybrain._tcp.local.`, advertise + browse) and Tailscale peers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import ifaddr

# zeroconf (~13 MiB resident) is imported when mDNS starts: a node with p2p.mdns off, or one only asking
# Tailscale, never loads it, and one with it on loads it after its API answers.
if TYPE_CHECKING:
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger("pinkybrain.discovery")
SERVICE_TYPE = "_pinkybrain._tcp.local."


def _local_ipv4_addresses() -> list[str]:
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("169.254."):
                out.append(ip.ip)
    return out or ["127.0.0.1"]


def advertised_addresses(bind_host: str) -> list[str]:
    """The addresses a bind host is reachable on: itself, or every local IPv4 for a wildcard bind."""
    if bind_host in ("0.0.0.0", "", "::"):
        return _local_ipv4_addresses()
    try:
        return [str(ipaddress.ip_address(bind_host))]
    except ValueError:
        return [socket.gethostbyname(bind_host)]


def zeroconf_interfaces(bind_host: str):
    # A node bound to loopback speaks mDNS on loopback only, so tests and single-host setups stay local.
    if bind_host.startswith("127."):
        return ["127.0.0.1"]
    from zeroconf import InterfaceChoice

    return InterfaceChoice.All


class MdnsService:
    """Advertises this node (unless stealth) and keeps a live list of the other nodes it hears."""

    def __init__(self, *, node_id: str, name: str, version: str, bind_host: str, port: int, advertise: bool):
        self.node_id, self.name, self.version = node_id, name, version
        self.bind_host, self.port, self.advertise = bind_host, port, advertise
        self.found: dict[str, dict] = {}
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        self._zc = AsyncZeroconf(interfaces=zeroconf_interfaces(self.bind_host), ip_version=IPVersion.V4Only)
        if self.advertise:
            label = f"{self.name[:30]}-{self.node_id[:7]}".replace(".", "-")
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{label}.{SERVICE_TYPE}",
                port=self.port,
                parsed_addresses=advertised_addresses(self.bind_host),
                properties={"id": self.node_id, "version": self.version, "api": "/api"},
                server=f"{label}.local.",
            )
            await self._zc.async_register_service(self._info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            self.found.pop(name, None)
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        props = {k.decode(): (v.decode() if v else "") for k, v in info.properties.items()}
        if props.get("id") == self.node_id:
            return
        self.found[name] = {
            "source": "mdns",
            "name": name.removesuffix("." + SERVICE_TYPE),
            "node_id": props.get("id"),
            "version": props.get("version"),
            "addresses": info.parsed_addresses(),
            "port": info.port,
            "urls": [f"http://{a}:{info.port}" for a in info.parsed_addresses()],
            "seen_at": time.time(),
        }

    async def stop(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()


def tailscale_peers(timeout: float = 3.0) -> dict:
    """Peers of this machine's tailnet from `tailscale status --json` (absent binary: empty answer)."""
    binary = shutil.which("tailscale")
    if binary is None:
        return {"available": False, "peers": [], "detail": "tailscale is not installed"}
    try:
        proc = subprocess.run([binary, "status", "--json"], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "peers": [], "detail": f"tailscale status failed: {exc}"}
    if proc.returncode != 0:
        return {
            "available": False,
            "peers": [],
            "detail": f"tailscale status exited {proc.returncode}: {proc.stderr.decode(errors='replace')[:200]}",
        }
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return {"available": False, "peers": [], "detail": "tailscale status printed invalid JSON"}
    peers = []
    for peer in (data.get("Peer") or {}).values():
        peers.append(
            {
                "source": "tailscale",
                "name": peer.get("HostName") or peer.get("DNSName"),
                "addresses": [ip for ip in peer.get("TailscaleIPs") or [] if ":" not in ip],
                "online": bool(peer.get("Online")),
            }
        )
    return {"available": True, "peers": peers}
