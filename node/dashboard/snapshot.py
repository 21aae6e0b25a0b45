"""What the dashboard's live stream sends every few seconds: values the node already keeps up to date
(no disk or SQLite read), so an open page costs next to nothing."""

from __future__ import annotations


def live_snapshot(runtime) -> dict:
    mesh = runtime.mesh
    public = runtime.public.peers() if runtime.public is not None else {"peers": [], "stealth_peers": 0}
    return {
        "node": {"node_id": runtime.identity.node_id, "name": runtime.cfg.node_name, "version": runtime.version,
                 "uptime_secs": runtime.uptime()},
        "resource_guard": runtime.guard_state(),
        "mesh": runtime.mesh_state(),
        "peers": mesh.peers() if mesh is not None else [],
        "public_peers": public["peers"],
        "public_stealth_peers": public["stealth_peers"],
    }
