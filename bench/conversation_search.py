"""Conversation-search latency on a large history: the encrypted store vs a plaintext SQLite FTS5 baseline.

One run, in a throw-away folder:
  1. generates `--messages` messages (half prompts, half answers: `ConversationStore.record` writes two per
     exchange) from a seeded word-list generator: real common English words at the head of a Zipf
     distribution, a long tail of made-up words, so queries can hit many, few or no messages;
  2. fills a `ConversationStore` (AES-256-GCM bodies, blind HMAC index, WAL, synchronous=FULL, one
     transaction per exchange: the node's own code path) and, interleaved, a plaintext baseline: one
     unencrypted SQLite file (WAL, synchronous=FULL, one transaction per exchange too) with a sessions
     table and an FTS5 table holding the message text;
  3. times `--queries` searches of 1-3 words (common, rare and absent words) against both, alternating,
     through the Python API in this process (no HTTP: bench/api_load.py measures that layer), and
     `list_sessions` pages against the equivalent plain SELECT;
  4. prints p50/p99 per kind with the store / baseline ratio: the cost of encryption + the blind index.

    python bench/conversation_search.py [--messages 100000] [--queries 200] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pinkybrain.node.services.conversations import ConversationStore, terms

# Stand-ins for what people ask a node about; the head of the Zipf distribution, most frequent first.
COMMON = (
    "the to of and a in is it you that for on how what with can this be are i my do not as or if your we "
    "but from at by an have will about which when use there more one all so like should does why get make "
    "time way need work code data function file model python error example question answer explain write "
    "list value number first new other some each also then than into over only just any most these those "
    "because could would them their was were has had been may two step problem system user text name set "
    "run test using used different best good simple help know want find show give tell think difference "
    "between where who people world water energy history science language learn book story plan price "
    "market cost health food music travel city country year day week money computer network server memory "
    "process result table image version change method class string array loop"
).split()
ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
          "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
CODAS = ("", "", "", "n", "r", "s", "l", "m", "t", "nd", "st")
KINDS = ("common", "rare", "absent")
MODEL = "gemma3-270m-q4-k-m"
SPECIALISTS = ("teacher", "coder", "writer", "analyst", "factchecker", "translator")


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class TextGenerator:
    """Seeded, varied text: COMMON, then `tail` made-up words, drawn with Zipf weights (exponent 1)."""

    def __init__(self, seed: int, tail: int = 100_000):
        self.rng = random.Random(seed)
        words = list(COMMON)
        seen = set(words)
        while len(words) < len(COMMON) + tail:
            w = self.pseudo_word()
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.vocabulary = words
        self.known = seen
        total, cum = 0.0, []
        for rank in range(1, len(words) + 1):
            total += 1.0 / rank
            cum.append(total)
        self.cum = cum

    def pseudo_word(self) -> str:
        r = self.rng
        return "".join(r.choice(ONSETS) + r.choice(VOWELS) for _ in range(r.randint(1, 3))) + r.choice(CODAS)

    def absent_word(self) -> str:
        while True:
            w = "q" + self.pseudo_word()  # no vocabulary word starts with q
            if w not in self.known:
                return w

    def sentence(self, lo: int, hi: int, end: str = ".") -> str:
        words = self.rng.choices(self.vocabulary, cum_weights=self.cum, k=self.rng.randint(lo, hi))
        if self.rng.random() < 0.15:
            words.insert(self.rng.randrange(len(words)), str(self.rng.randint(2, 2048)))
        if len(words) > 8 and self.rng.random() < 0.5:
            i = self.rng.randrange(3, len(words) - 2)
            words[i] += ","
        return words[0].capitalize() + " " + " ".join(words[1:]) + end

    def exchange(self) -> tuple[str, str]:
        prompt = self.sentence(5, 22, "?")
        answer = " ".join(self.sentence(6, 22) for _ in range(self.rng.randint(1, 6)))
        return prompt, answer


# -- the plaintext baseline ---------------------------------------------------------------------------

PLAIN_SCHEMA = (
    "CREATE TABLE sessions (id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL, "
    "privacy TEXT NOT NULL, message_count INTEGER NOT NULL, title TEXT NOT NULL)",
    "CREATE INDEX sessions_updated ON sessions(updated_at)",
    "CREATE VIRTUAL TABLE messages USING fts5(text, session_id UNINDEXED, role UNINDEXED, created_at UNINDEXED)",
)


class PlainStore:
    """What the store would be without encryption or a blind index: text in the clear, FTS5 over it."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # the store's durability, so fill times compare
        for statement in PLAIN_SCHEMA:
            self.conn.execute(statement)

    def record(self, sid: str, prompt: str, answer: str) -> None:
        now = time.time()
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        if c.execute("UPDATE sessions SET updated_at = ?, message_count = message_count + 2 WHERE id = ?",
                     (now, sid)).rowcount == 0:
            c.execute("INSERT INTO sessions VALUES (?, ?, ?, 'private', 2, ?)",
                      (sid, now, now, " ".join(prompt.split())[:60]))
        c.executemany("INSERT INTO messages(text, session_id, role, created_at) VALUES (?, ?, ?, ?)",
                      [(prompt, sid, "user", now), (answer, sid, "assistant", now)])
        c.execute("COMMIT")

    def search(self, query: str, limit: int) -> list[tuple]:
        words = terms(query)  # the store's own word splitting, so both search the same words
        if not words:
            return []
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        return self.conn.execute(
            "SELECT m.rowid, m.session_id, m.role, m.created_at, snippet(messages, 0, '', '', '…', 24), "
            "s.privacy, m.rank FROM messages AS m JOIN sessions AS s ON s.id = m.session_id "
            "WHERE messages MATCH ? ORDER BY m.rank LIMIT ?", (match, limit)).fetchall()

    def list_sessions(self, limit: int, offset: int) -> list[tuple]:
        return self.conn.execute(
            "SELECT id, created_at, updated_at, privacy, message_count, title FROM sessions "
            "ORDER BY updated_at DESC, id LIMIT ? OFFSET ?", (limit, offset)).fetchall()

    def text_with(self, word: str) -> str | None:
        row = self.conn.execute("SELECT text FROM messages WHERE messages MATCH ? LIMIT 1",
                                (f'"{word}"',)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.conn.close()


# -- the run ------------------------------------------------------------------------------------------

def fill(store: ConversationStore, plain: PlainStore, gen: TextGenerator, args: argparse.Namespace) -> dict:
    exchanges = args.messages // 2
    df: Counter[str] = Counter()  # in how many messages each word occurs, to pick rare query words
    spent = {"store": 0.0, "plain": 0.0, "generate": 0.0}
    deadline = time.monotonic() + args.max_fill_seconds
    sid = None
    done = 0
    for i in range(exchanges):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        prompt, answer = gen.exchange()
        df.update(terms(prompt))
        df.update(terms(answer))
        t1 = time.perf_counter()
        new_session = i % args.per_session == 0
        rec = store.record(None if new_session else sid, prompt, answer, mode="single",
                           specialists=[SPECIALISTS[i % len(SPECIALISTS)]], model=MODEL, node_id="bench")
        sid = rec["session_id"]
        t2 = time.perf_counter()
        plain.record(sid, prompt, answer)
        t3 = time.perf_counter()
        spent["generate"] += t1 - t0
        spent["store"] += t2 - t1
        spent["plain"] += t3 - t2
        done += 1
        if not args.json and done % 10_000 == 0:
            print(f"  filled {done * 2} messages ({spent['store']:.0f} s store, {spent['plain']:.0f} s plain)",
                  file=sys.stderr, flush=True)
    return {"exchanges": done, "messages": done * 2, "seconds": spent, "df": df,
            "capped": done < exchanges}


def make_queries(gen: TextGenerator, df: Counter, plain: PlainStore, count: int) -> list[tuple[str, str]]:
    rng = random.Random(gen.rng.random())
    common = [w for w in COMMON[:40] if df[w]]
    rare = sorted(w for w, n in df.items() if 1 <= n <= 10 and not w.isdigit())
    queries: list[tuple[str, str]] = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        n = rng.randint(1, 3)
        if kind == "common":
            words = rng.sample(common, n)
        elif kind == "rare" and rare:
            word = rng.choice(rare)
            # Companions from a message holding the rare word, so a 2-3 word query still has a hit.
            context = [w for w in terms(plain.text_with(word) or word) if w != word]
            words = [word] + rng.sample(context, min(n - 1, len(context)))
            rng.shuffle(words)
        else:
            kind = "absent"
            words = rng.sample(common, n - 1) + [gen.absent_word()]
            rng.shuffle(words)
        queries.append((kind, " ".join(words)))
    return queries


def timed(fn, *a) -> tuple[float, int]:
    start = time.perf_counter()
    out = fn(*a)
    return (time.perf_counter() - start) * 1000, len(out)


def summarize(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"n": len(ms), "p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99),
            "mean_ms": sum(ms) / len(ms) if ms else math.nan}


def run_bench(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="pinkybrain-bench-"))
    store = plain = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        store = ConversationStore.open(folder / "store", secrets.token_bytes(32), retention_days=0)
        plain = PlainStore(folder / "plain.db")
        gen = TextGenerator(args.seed)
        if not args.json:
            print(f"filling {args.messages} messages ({args.messages // 2} exchanges, {args.per_session} per "
                  "session)...", file=sys.stderr, flush=True)
        filled = fill(store, plain, gen, args)
        queries = make_queries(gen, filled["df"], plain, args.queries)

        # Unmeasured pass: warms SQLite's page cache and the tokenizer for both.
        for _, q in queries[: min(20, len(queries))]:
            store.search(q, args.limit)
            plain.search(q, args.limit)
        results: dict[str, dict[str, list]] = {k: {"store": [], "plain": [], "store_hits": [], "plain_hits": []}
                                               for k in (*KINDS, "all")}
        for i, (kind, q) in enumerate(queries):
            # Alternate which side goes first, so neither always finds the other's pages in cache.
            sides = (("store", store.search), ("plain", plain.search))
            for side, fn in (sides if i % 2 == 0 else sides[::-1]):
                ms, hits = timed(fn, q, args.limit)
                for bucket in (kind, "all"):
                    results[bucket][side].append(ms)
                    results[bucket][f"{side}_hits"].append(hits)

        n_sessions = math.ceil(filled["exchanges"] / args.per_session)
        listing: dict[str, list] = {"store": [], "plain": []}
        rng = random.Random(args.seed)
        for i in range(args.list_calls):
            offset = 0 if i % 2 == 0 else rng.randrange(0, max(1, n_sessions - 50))  # page 1, or deep pages
            for side, fn in ((("store", store.list_sessions), ("plain", plain.list_sessions)) if i % 2 == 0
                             else (("plain", plain.list_sessions), ("store", store.list_sessions))):
                start = time.perf_counter()
                fn(50, offset) if side == "plain" else fn(limit=50, offset=offset)
                listing[side].append((time.perf_counter() - start) * 1000)

        store.close()
        plain.close()
        store = plain = None
        sizes = {"store": sum(f.stat().st_size for f in (folder / "store").iterdir()),
                 "plain": sum(f.stat().st_size for f in folder.glob("plain.db*"))}
        rows = []
        for bucket in (*KINDS, "all"):
            r = results[bucket]
            rows.append({"operation": f"search {bucket}", "queries": len(r["store"]),
                         "store": summarize(r["store"]), "plain": summarize(r["plain"]),
                         "store_hits": sum(r["store_hits"]) / max(1, len(r["store_hits"])),
                         "plain_hits": sum(r["plain_hits"]) / max(1, len(r["plain_hits"]))})
        rows.append({"operation": "list_sessions 50", "queries": len(listing["store"]),
                     "store": summarize(listing["store"]), "plain": summarize(listing["plain"]),
                     "store_hits": 50, "plain_hits": 50})
        report = {"messages": filled["messages"], "exchanges": filled["exchanges"], "sessions": n_sessions,
                  "fill_capped": filled["capped"],
                  "fill_seconds": {k: round(v, 2) for k, v in filled["seconds"].items()},
                  "bytes": sizes, "seed": args.seed, "limit": args.limit, "rows": rows,
                  "queries": [q for _, q in queries]}
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_table(report)
        return 0
    finally:
        if store is not None:
            store.close()
        if plain is not None:
            plain.close()
        shutil.rmtree(folder, ignore_errors=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_table(r: dict) -> None:
    head = (f"{'operation':<17} {'n':>4} {'store p50':>10} {'store p99':>10} {'plain p50':>10} {'plain p99':>10} "
            f"{'p50 ratio':>9} {'p99 ratio':>9} {'hits':>9}")
    print(head)
    print("-" * len(head))
    for row in r["rows"]:
        s, p = row["store"], row["plain"]
        hits = f"{row['store_hits']:.1f}/{row['plain_hits']:.1f}"
        print(f"{row['operation']:<17} {row['queries']:>4} {s['p50_ms']:>10.3f} {s['p99_ms']:>10.3f} "
              f"{p['p50_ms']:>10.3f} {p['p99_ms']:>10.3f} {_ratio(s['p50_ms'], p['p50_ms']):>9} "
              f"{_ratio(s['p99_ms'], p['p99_ms']):>9} {hits:>9}")
    secs = r["fill_seconds"]
    ex = r["exchanges"]
    print(f"\nfill: {r['messages']} messages ({ex} exchanges, one transaction each, synchronous=FULL): store "
          f"{secs['store']:.1f} s ({ex / secs['store']:.0f} exchanges/s), plain {secs['plain']:.1f} s "
          f"({ex / secs['plain']:.0f} exchanges/s), {_ratio(secs['store'], secs['plain'])}"
          + ("  (time cap hit: fewer messages than asked)" if r["fill_capped"] else ""))
    print(f"size on disk: store {r['bytes']['store'] / 2**20:.1f} MiB, plain {r['bytes']['plain'] / 2**20:.1f} "
          f"MiB. Times in ms, in-process API calls; hits: mean results returned (limit {r['limit']}), "
          "store/plain. ratio: store / plain.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages to store (2 per exchange)")
    parser.add_argument("--per-session", type=int, default=10, help="exchanges per conversation")
    parser.add_argument("--queries", type=int, default=200, help="measured searches per side")
    parser.add_argument("--list-calls", type=int, default=50, help="measured list_sessions calls per side")
    parser.add_argument("--limit", type=int, default=20, help="results per search (the API's default)")
    parser.add_argument("--seed", type=int, default=7, help="text generator seed")
    parser.add_argument("--max-fill-seconds", type=float, default=600.0,
                        help="stop filling after this long (fewer messages are reported)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.messages < 2 or args.per_session < 1 or args.queries < 1 or args.list_calls < 1 or args.limit < 1:
        parser.error("--messages >= 2; --per-session, --queries, --list-calls and --limit >= 1")
    sys.exit(run_bench(args))


if __name__ == "__main__":
    main()
