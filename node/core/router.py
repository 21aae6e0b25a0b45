"""The specialist router: cheap hint-based routing, and the six query modes as a model-agnostic orchestrator.

Nothing here runs a model. `run_query` is given an `answer` coroutine (the node's answerer) that takes a
specialist and OpenAI-style chat messages and returns an `Answer`; the modes only decide who is asked what,
in which order, and how the answers combine.

Routing: every hint (see specialists.py) that matches adds its weight; a profile's matched weights are
combined strongest first with halving weights (w1 + w2/2 + w3/4 ...), so the clearest signal decides and a
pile of topical words in pasted text cannot outvote an explicit request. The total t is reported normalised
as t / (t + 3), in [0, 1). Ties go to the lower `priority`, then the name. The `fallback` profile
(conversationalist) never scores below FALLBACK_SCORE, so it wins when nothing matches.

Modes (all return "mode", "answer", "specialist", "finish_reason", "answers", "errors", "elapsed_ms"):
  single      the best-routed specialist (among `requested` when given) answers.
  vote        2+ specialists (requested, else the top 3 routed) answer; majority by VOTE_RULE.
  chain       specialists run in turn, each seeing the earlier steps; the last step is the answer. With 0 or
              1 requested: X drafts, the reviewer (skeptic) critiques, X writes the final answer, where X is
              the requested specialist or the best routed.
  fuse        2+ specialists (requested, else top 3) answer; the fuser (reasoner, with FUSE_SYSTEM_PROMPT)
              merges them.
  compare     specialists (requested, else top 3) answer side by side; nothing is merged.
  specialist  the named specialists (1+) answer; the answer is the first successful one's.
A failed answer (error set, empty text, or the answerer raised) is reported in "errors" and left out of
votes and fusion; when none succeeds, NoAnswer is raised.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pinkybrain.node.core.specialists import MAX_TOKENS_LIMIT, Specialist, generation_settings, with_role

__all__ = [
    "FALLBACK_SCORE", "FUSE_SYSTEM_PROMPT", "MODES", "VOTE_INSTRUCTION", "VOTE_RULE", "Answer", "Answerer",
    "NoAnswer", "RouteScore", "RouterError", "generation_settings", "normalise_vote", "route", "run_query",
]

log = logging.getLogger(__name__)

MODES = ("single", "vote", "chain", "fuse", "compare", "specialist")
FALLBACK_SCORE = 0.05
DEFAULT_PICK = 3  # vote, fuse and compare ask the top 3 routed when nothing is requested
_SCALE = 3.0  # total weight at which the normalised score reaches 0.5
# Routing reads the head and tail of huge prompts only: the request is almost always there, and scanning
# 200k characters with a few hundred regexes would cost more than it tells.
_ROUTE_HEAD, _ROUTE_TAIL = 8000, 2000

VOTE_INSTRUCTION = (
    "\n\nEnd your reply with a final line 'Answer: ...' giving your answer in one short sentence; for a "
    "yes/no or true/false question, start that line with Yes, No, True, False or Partly, then a period."
)
VOTE_RULE = (
    "Each successful answer is reduced to a key: take the text after its last line starting with 'Answer:' "
    "(or 'Final answer:') if there is one, else the whole text; remove markdown; if it then starts with a "
    "verdict word followed by punctuation or the end, the key is the verdict (yes/true/correct/right/accurate "
    "-> yes; no/false/incorrect/wrong/inaccurate -> no; partly/partially/mostly true/mostly false/half true "
    "-> partly; unverifiable/unclear/uncertain/unknown -> unsure); otherwise the key is its first sentence, "
    "lowercased, punctuation removed (except inside numbers), whitespace collapsed. Equal keys form a group "
    "and the largest group wins; a tie goes to the group whose specialists' routing scores sum highest, then "
    "to the group whose first member comes first in the voter order. The winning answer is the full text of "
    "the winning group's first member in voter order. Failed answers do not vote."
)
FUSE_SYSTEM_PROMPT = (
    "You merge several answers to the same request into one best answer. Keep what they agree on; where "
    "they conflict, reason about which is right and say so briefly; keep unique details that are correct; "
    "drop errors and repetition. Answer the original request directly, in the form it asks for, without "
    "describing the individual answers unless a disagreement matters."
)
_REVIEW_INSTRUCTION = (
    "Review the previous step critically: point out errors, gaps and risky assumptions, and say exactly what "
    "to fix. Do not rewrite it in full."
)
_FINAL_AFTER_REVIEW = (
    "Write the final answer to the original request: improve on the draft and fix the issues the review "
    "raised that you agree with."
)
_BUILD_ON = (
    "Build on the previous steps from your own speciality: correct, improve or extend them, and answer the "
    "original request."
)
_LAST_STEP = "This is the last step: give the final answer to the original request, keeping what is right above."


class RouterError(ValueError):
    """A query the router cannot run: unknown mode or specialist, too few specialists, bad arguments."""


class NoAnswer(RouterError):
    """Every specialist asked failed; `errors` lists {"specialist", "error"} for each."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        detail = "; ".join(f"{e['specialist']}: {e['error']}" for e in errors) or "nobody was asked"
        super().__init__(f"no specialist answered ({detail})")


@dataclass(frozen=True)
class Answer:
    specialist: str
    text: str
    model: str
    node: str | None
    elapsed_ms: float
    tokens: int | None
    error: str | None = None
    finish_reason: str | None = None  # stop, or length when max_tokens cut the answer (None: not known)
    prompt_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Answerer = Callable[[Specialist, list[dict]], Awaitable[Answer]]


@dataclass(frozen=True)
class RouteScore:
    name: str
    score: float
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score, "reasons": list(self.reasons)}


# -- routing -------------------------------------------------------------------------------------------
def _keyword_regex(text: str) -> str:
    prefix = text.endswith("*")
    words = re.split(r"[\s-]+", text.rstrip("*").strip())
    body = r"[\s-]+".join(re.escape(w) for w in words)
    end = r"\w*" if prefix else r"(?!\w)"
    return r"(?<!\w)" + body + end


@functools.lru_cache(maxsize=512)
def _compiled(keywords: tuple[tuple[str, float], ...], patterns: tuple[tuple[str, float], ...]):
    flags = re.IGNORECASE | re.MULTILINE
    out = [(f"keyword {text!r}", re.compile(_keyword_regex(text), flags), w) for text, w in keywords]
    for text, w in patterns:
        label = text if len(text) <= 40 else text[:37] + "..."
        out.append((f"pattern /{label}/", re.compile(text, flags), w))
    return out


def _routing_text(prompt: str) -> str:
    text = prompt.replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    if len(text) > _ROUTE_HEAD + _ROUTE_TAIL:
        text = text[:_ROUTE_HEAD] + "\n" + text[-_ROUTE_TAIL:]
    return text


def _score(text: str, spec: Specialist) -> tuple[float, list[str]]:
    hits = [(w, label) for label, rx, w in _compiled(spec.keywords, spec.patterns) if rx.search(text)]
    hits.sort(key=lambda h: -h[0])
    total = sum(w * 0.5**i for i, (w, _) in enumerate(hits))
    return total / (total + _SCALE), [f"{label} +{w:g}" for w, label in hits]


def route(prompt: str, specialists: Mapping[str, Specialist]) -> list[RouteScore]:
    """Score every specialist for `prompt`, best first. No model is called."""
    text = _routing_text(prompt)
    fallback = with_role(specialists, "fallback")
    scored = []
    for spec in specialists.values():
        score, reasons = _score(text, spec)
        if fallback is not None and spec.name == fallback.name and score < FALLBACK_SCORE:
            score = FALLBACK_SCORE
            reasons = reasons + [f"fallback profile: floor score {FALLBACK_SCORE:g}"]
        scored.append((score, spec.priority, spec.name, reasons))
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))
    return [RouteScore(name, round(score, 4), reasons) for score, _, name, reasons in scored]


# -- vote normalisation ----------------------------------------------------------------------------------
_VERDICTS = (
    ("partly", ("partly true", "partially true", "mostly true", "mostly false", "half true", "partly",
                "partially")),
    ("yes", ("yes", "true", "correct", "right", "accurate")),
    ("no", ("no", "false", "incorrect", "wrong", "inaccurate")),
    ("unsure", ("unverifiable", "unclear", "uncertain", "unknown")),
)
_VERDICT_RE = re.compile(
    r"^(" + "|".join(re.escape(w) for _, words in _VERDICTS for w in words) + r")(?=\s*(?:[.,;:!?)\-–—]|$))"
)
_VERDICT_OF = {w: key for key, words in _VERDICTS for w in words}
_ANSWER_LINE_RE = re.compile(r"^\s*(?:final\s+)?answer\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def _strip_markdown(text: str) -> str:
    text = re.sub(r"[*`~]+", "", text)
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # emphasis underscores, not snake_case ones
    return re.sub(r"^\s*(?:#{1,6}|>|[-+•])\s+", "", text, flags=re.MULTILINE)


def normalise_vote(text: str) -> str:
    """The key an answer votes with (see VOTE_RULE)."""
    text = _strip_markdown(text)
    lines = _ANSWER_LINE_RE.findall(text)
    text = (lines[-1] if lines else text).strip().lower()
    verdict = _VERDICT_RE.match(text)
    if verdict:
        return _VERDICT_OF[verdict.group(1)]
    first = next((line for line in text.splitlines() if line.strip()), "")
    first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]
    first = re.sub(r"(?<=\d),(?=\d{3}\b)", "", first)  # 1,000 and 1000 are the same number
    # drop punctuation unless it sits inside a number (3.14) or signs one (-5)
    first = re.sub(r"[^\w\s](?!(?<=\d[.,])\d)(?!(?<=[-+−])\d)", "", first)
    return " ".join(first.split())


# -- orchestration -----------------------------------------------------------------------------------------
def _messages(spec: Specialist, user: str) -> list[dict]:
    return [{"role": "system", "content": spec.system_prompt}, {"role": "user", "content": user}]


async def _ask(answer: Answerer, spec: Specialist, user: str) -> Answer:
    start = time.perf_counter()
    try:
        result = await answer(spec, _messages(spec, user))
    except Exception as exc:  # noqa: BLE001 - one failing model must not sink a multi-specialist query
        log.warning("specialist %s failed: %s: %s", spec.name, type(exc).__name__, exc)
        elapsed = (time.perf_counter() - start) * 1000
        return Answer(spec.name, "", "", None, round(elapsed, 1), None, f"{type(exc).__name__}: {exc}")
    if not isinstance(result, Answer):
        elapsed = (time.perf_counter() - start) * 1000
        return Answer(spec.name, "", "", None, round(elapsed, 1), None,
                      f"answerer returned {type(result).__name__}, not Answer")
    if result.specialist != spec.name:
        result = replace(result, specialist=spec.name)
    if result.error is None and not result.text.strip():
        result = replace(result, error="empty answer")
    return result


def _errors(answers: list[Answer]) -> list[dict[str, str]]:
    return [{"specialist": a.specialist, "error": a.error} for a in answers if a.error is not None]


def _ok_or_raise(answers: list[Answer]) -> list[Answer]:
    ok = [a for a in answers if a.ok]
    if not ok:
        raise NoAnswer(_errors(answers))
    return ok


def _unknown(name: str, specialists: Mapping[str, Specialist]) -> RouterError:
    return RouterError(f"unknown specialist {name!r}; valid specialists: {', '.join(sorted(specialists))}")


def _pick(requested: list[str], routes: list[RouteScore], specialists: Mapping[str, Specialist],
          mode: str, minimum: int) -> tuple[list[Specialist], str]:
    names = requested or [r.name for r in routes[:DEFAULT_PICK]]
    if len(names) < minimum:
        raise RouterError(
            f"{mode} mode needs at least {minimum} different specialists, got {len(names)} "
            f"({', '.join(names) or 'none'}); valid specialists: {', '.join(sorted(specialists))}"
        )
    return [specialists[n] for n in names], "request" if requested else "router"


async def _gather(answer: Answerer, specs: list[Specialist], user: str) -> list[Answer]:
    # Independent calls run concurrently; the answerer queues per model if it must.
    return list(await asyncio.gather(*(_ask(answer, s, user) for s in specs)))


async def run_query(prompt: str, mode: str, *, specialists: Mapping[str, Specialist], requested: list[str] | None,
                    answer: Answerer, max_tokens: int | None = None,
                    temperature: float | None = None) -> dict[str, Any]:
    """Run `prompt` in `mode`; see the module docstring for what each mode returns.

    The answerer receives a Specialist whose max_tokens and temperature already carry the overrides (use
    `generation_settings(specialist)`); its system prompt is already the first message.
    """
    if mode not in MODES:
        raise RouterError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RouterError("prompt must be a non-empty string")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise RouterError(f"max_tokens must be a whole number between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens!r}")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2
    ):
        raise RouterError(f"temperature must be a number between 0 and 2, got {temperature!r}")
    if not specialists:
        raise RouterError("no specialists are configured")
    requested = list(dict.fromkeys(requested or []))  # a name asked twice counts once
    for name in requested:
        if name not in specialists:
            raise _unknown(name, specialists)
    if max_tokens is not None:
        specialists = {n: replace(s, max_tokens=max_tokens) for n, s in specialists.items()}
    if temperature is not None:
        specialists = {n: replace(s, temperature=float(temperature)) for n, s in specialists.items()}

    start = time.perf_counter()
    routes = route(prompt, specialists)
    handler = _MODES[mode]
    result = await handler(prompt, specialists, requested, routes, answer)
    result["elapsed_ms"] = round((time.perf_counter() - start) * 1000, 1)
    return result


def _response(mode: str, final: Answer, answers: list[Answer], **extra) -> dict[str, Any]:
    return {
        "mode": mode,
        "answer": final.text,
        "specialist": final.specialist,
        "finish_reason": final.finish_reason,
        **extra,
        "answers": [a.to_dict() for a in answers],
        "errors": _errors(answers),
    }


async def _single(prompt, specialists, requested, routes, answer) -> dict[str, Any]:
    if requested:  # the best fit among the ones the caller allows
        routes = [r for r in routes if r.name in requested]
    chosen = routes[0]
    result = await _ask(answer, specialists[chosen.name], prompt)
    final = _ok_or_raise([result])[0]
    routing = {
        "chosen": chosen.name,
        "score": chosen.score,
        "reasons": chosen.reasons,
        "candidates": [r.to_dict() for r in routes[:DEFAULT_PICK]],
    }
    return _response("single", final, [result], routing=routing)


async def _vote(prompt, specialists, requested, routes, answer) -> dict[str, Any]:
    voters, picked_by = _pick(requested, routes, specialists, "vote", 2)
    score_of = {r.name: r.score for r in routes}
    # Ask for a final 'Answer:' line so free-form answers reduce to comparable keys.
    asked = [replace(s, system_prompt=s.system_prompt + VOTE_INSTRUCTION) for s in voters]
    answers = await _gather(answer, asked, prompt)
    ok = _ok_or_raise(answers)
    order = {s.name: i for i, s in enumerate(voters)}
    votes = {a.specialist: normalise_vote(a.text) for a in ok}
    members: dict[str, list[Answer]] = {}
    for a in ok:
        members.setdefault(votes[a.specialist], []).append(a)
    groups = [
        {
            "key": key,
            "count": len(group),
            "specialists": [a.specialist for a in group],
            "score": round(sum(score_of[a.specialist] for a in group), 4),
        }
        for key, group in members.items()
    ]
    groups.sort(key=lambda g: (-g["count"], -g["score"], order[g["specialists"][0]]))
    winner = groups[0]
    final = members[winner["key"]][0]
    return _response(
        "vote", final, answers,
        votes=votes, groups=groups, winner=winner, unanimous=len(groups) == 1 and len(ok) > 1,
        rule=VOTE_RULE, routing={"selected_by": picked_by, "candidates": [r.to_dict() for r in routes[:3]]},
    )


def _chain_plan(specialists, requested, routes) -> list[tuple[Specialist, str, str]]:
    """(specialist, role, instruction) per step."""
    if len(requested) >= 2:
        last = len(requested) - 1
        return [
            (specialists[n], "step", "" if i == 0 else (_LAST_STEP if i == last else _BUILD_ON))
            for i, n in enumerate(requested)
        ]
    # One or no specialist: draft, independent review, final answer by the drafter.
    lead = specialists[requested[0] if requested else routes[0].name]
    reviewer = with_role(specialists, "reviewer", exclude=lead.name) or with_role(
        specialists, "fuser", exclude=lead.name
    )
    if reviewer is None:
        return [(lead, "draft", "")]
    return [(lead, "draft", ""), (reviewer, "review", _REVIEW_INSTRUCTION), (lead, "final", _FINAL_AFTER_REVIEW)]


def _chain_message(prompt: str, done: list[Answer], instruction: str) -> str:
    if not done:
        return prompt
    parts = [f"Original request:\n{prompt}"]
    for i, step in enumerate(done, 1):
        parts.append(f"Previous step {i} by {step.specialist}:\n{step.text}")
    if instruction:
        parts.append(instruction)
    return "\n\n".join(parts)


async def _chain(prompt, specialists, requested, routes, answer) -> dict[str, Any]:
    plan = _chain_plan(specialists, requested, routes)
    answers: list[Answer] = []
    steps = []
    for i, (spec, role, instruction) in enumerate(plan, 1):
        done = [a for a in answers if a.ok]  # a failed step is skipped; the next builds on what worked
        result = await _ask(answer, spec, _chain_message(prompt, done, instruction))
        answers.append(result)
        steps.append({"step": i, "role": role, **result.to_dict()})
    ok = _ok_or_raise(answers)
    return _response("chain", ok[-1], answers, chain=[spec.name for spec, _, _ in plan], steps=steps)


def _fuse_message(prompt: str, sources: list[Answer]) -> str:
    parts = [f"Original request:\n{prompt}"]
    for i, a in enumerate(sources, 1):
        parts.append(f"Answer {i} (from {a.specialist}):\n{a.text}")
    parts.append("Merge these answers into one best answer to the original request.")
    return "\n\n".join(parts)


async def _fuse(prompt, specialists, requested, routes, answer) -> dict[str, Any]:
    specs, picked_by = _pick(requested, routes, specialists, "fuse", 2)
    answers = await _gather(answer, specs, prompt)
    sources = _ok_or_raise(answers)
    fuser = with_role(specialists, "fuser")
    routing = {"selected_by": picked_by, "candidates": [r.to_dict() for r in routes[:3]]}
    extra = {"sources": [a.to_dict() for a in sources], "routing": routing}
    if len(sources) < 2 or fuser is None:
        # Nothing to merge (or nobody to merge it): return the best source as it is.
        note = "only one source answered" if len(sources) < 2 else "no profile has the fuser role"
        return _response("fuse", sources[0], answers, fused=False, fuser=None, note=note, **extra)
    fused = await _ask(answer, replace(fuser, system_prompt=FUSE_SYSTEM_PROMPT), _fuse_message(prompt, sources))
    answers.append(fused)
    if not fused.ok:
        return _response("fuse", sources[0], answers, fused=False, fuser=fuser.name,
                         note="the fuser failed; the first source is returned unmerged", **extra)
    return _response("fuse", fused, answers, fused=True, fuser=fuser.name, **extra)


async def _compare(prompt, specialists, requested, routes, answer) -> dict[str, Any]:
    specs, picked_by = _pick(requested, routes, specialists, "compare", 1)
    answers = await _gather(answer, specs, prompt)
    ok = _ok_or_raise(answers)
    # "answer" is only the first successful one so every mode has one; compare merges nothing.
    return _response(
        "compare", ok[0], answers,
        fastest=min(ok, key=lambda a: a.elapsed_ms).specialist,
        routing={"selected_by": picked_by, "candidates": [r.to_dict() for r in routes[:3]]},
    )


async def _specialist(prompt, specialists, requested, routes, answer) -> dict[str, Any]:
    if not requested:
        raise RouterError(
            f"specialist mode needs at least one specialist; valid specialists: {', '.join(sorted(specialists))}"
        )
    answers = await _gather(answer, [specialists[n] for n in requested], prompt)
    ok = _ok_or_raise(answers)
    return _response("specialist", ok[0], answers)


_MODES = {
    "single": _single, "vote": _vote, "chain": _chain, "fuse": _fuse, "compare": _compare,
    "specialist": _specialist,
}
