// The mesh as an SVG graph: this node in the middle, private peers on an inner ring, public peers on an
// outer one; edges carry the link type and latency. Stealth peers are never drawn, only counted.
const NS = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const short = (id) => (id || "?").slice(0, 7);

export function drawMesh(svg, self, privatePeers, publicPeers, linkType) {
  svg.querySelectorAll("g").forEach((g) => g.remove());
  const edges = el("g", { class: "edges" });
  const nodes = el("g", { class: "nodes" });
  const place = (peers, radius, cls) => peers.forEach((peer, i) => {
    const angle = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 3;  // two peers: not in one line
    const x = Math.round(radius * Math.cos(angle)), y = Math.round(radius * Math.sin(angle));
    const type = linkType(peer);
    edges.append(el("line", { x1: 0, y1: 0, x2: x, y2: y, class: `edge ${type}` }));
    const latency = peer.latency_ms == null ? "" : `${peer.latency_ms} ms`;
    edges.append(el("text", { x: x / 2, y: y / 2 - 4, class: "edge-label" }, `${type} ${latency}`.trim()));
    const g = el("g", { class: `peer ${cls}`, "data-node-id": peer.node_id || "", tabindex: "0" });
    g.append(el("title", {}, `${peer.name || ""} ${peer.node_id || ""}`));
    g.append(el("circle", { cx: x, cy: y, r: 18 }));
    g.append(el("text", { x, y: y + 32, class: "label" }, peer.name || short(peer.node_id)));
    nodes.append(g);
  });
  place(privatePeers, 110, "private");
  place(publicPeers, 175, "public");
  const me = el("g", { class: "peer self", "data-node-id": self.node_id || "" });
  me.append(el("circle", { cx: 0, cy: 0, r: 24 }));
  me.append(el("text", { x: 0, y: 40, class: "label" }, self.name || short(self.node_id)));
  nodes.append(me);
  svg.append(edges, nodes);
}
