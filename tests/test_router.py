"""Specialist profiles, routing accuracy, and the six query modes with a fake deterministic answerer."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pinkybrain.node.core.router import (
    FALLBACK_SCORE,
    FUSE_SYSTEM_PROMPT,
    MODES,
    VOTE_INSTRUCTION,
    VOTE_RULE,
    Answer,
    NoAnswer,
    RouterError,
    normalise_vote,
    route,
    run_query,
)
from pinkybrain.node.core.specialists import (
    Specialist,
    builtin_specialists,
    choose_model,
    generation_settings,
    load_specialists,
    with_role,
)

SPECS = builtin_specialists()
ROUTING_SET = yaml.safe_load((Path(__file__).parent / "routing_set.yaml").read_text(encoding="utf-8"))


class FakeAnswerer:
    """Canned text per specialist name; an Exception instance is raised, ("error", msg) is a failed Answer."""

    def __init__(self, canned: dict[str, object] | None = None, default: str = "Default answer."):
        self.canned = canned or {}
        self.default = default
        self.calls: list[tuple[Specialist, list[dict]]] = []

    async def __call__(self, spec: Specialist, messages: list[dict]) -> Answer:
        self.calls.append((spec, messages))
        await asyncio.sleep(0)
        reply = self.canned.get(spec.name, self.default)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, tuple):
            return Answer(spec.name, "", f"model-{spec.name}", "node-1", 5.0, None, error=reply[1])
        elapsed = 10.0 + len(spec.name)  # deterministic, different per specialist
        return Answer(spec.name, str(reply), f"model-{spec.name}", "node-1", elapsed, len(str(reply).split()))

    def user_message(self, i: int) -> str:
        return self.calls[i][1][1]["content"]


def run(prompt: str, mode: str, answerer: FakeAnswerer, requested: list[str] | None = None, **kw) -> dict:
    return asyncio.run(run_query(prompt, mode, specialists=kw.pop("specialists", SPECS),
                                 requested=requested or [], answer=answerer, **kw))


# -- profiles -------------------------------------------------------------------------------------------
def test_twelve_builtins_with_roles():
    assert set(SPECS) == {
        "coder", "factchecker", "skeptic", "reasoner", "mathematician", "writer", "translator", "summarizer",
        "teacher", "planner", "conversationalist", "analyst",
    }
    for spec in SPECS.values():
        assert spec.description and spec.system_prompt and spec.keywords
        assert 0 <= spec.temperature <= 2 and 0 < spec.top_p <= 1 and spec.max_tokens > 0
    assert with_role(SPECS, "fuser").name == "reasoner"
    assert with_role(SPECS, "reviewer").name == "skeptic"
    assert with_role(SPECS, "fallback").name == "conversationalist"
    assert len({s.priority for s in SPECS.values()}) == 12  # built-in ties never fall through to names


def test_generation_settings_and_model_choice():
    coder = SPECS["coder"]
    assert generation_settings(coder) == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 1536}
    assert generation_settings(coder, 64)["max_tokens"] == 64
    models = ["gemma3-270m-q4", "Qwen2.5-Coder-7B.gguf"]
    assert choose_model(coder, models) == "Qwen2.5-Coder-7B.gguf"  # case-insensitive, preference order
    assert choose_model(SPECS["writer"], models) == "gemma3-270m-q4"  # no preference: any
    assert choose_model(SPECS["mathematician"], ["gemma"]) == "gemma"
    assert choose_model(SPECS["mathematician"], ["gemma"], strict=True) is None
    assert choose_model(coder, []) is None


def test_override_existing_field_keeps_the_rest():
    specs = load_specialists({"coder": {"temperature": 0.5, "preferred_models": ["*mycoder*"]}})
    coder = specs["coder"]
    assert coder.temperature == 0.5 and coder.preferred_models == ("*mycoder*",)
    assert coder.system_prompt == SPECS["coder"].system_prompt and coder.keywords == SPECS["coder"].keywords
    assert specs["writer"] == SPECS["writer"] and len(specs) == 12
    assert load_specialists(None) == SPECS and load_specialists({}) == SPECS


def test_new_profile_routes_and_hints_merge():
    specs = load_specialists({
        "lawyer": {
            "description": "Legal questions.",
            "system_prompt": "You explain law carefully and say you are not a lawyer.",
            "keywords": {"contract": 4, "lawsuit": 4},
            "temperature": 0.3,
        },
        "coder": {"keywords": {"verilog": 4, "python": 0}, "patterns": {r"\bmodule\s+\w+\s*\(": 3}},
    })
    lawyer = specs["lawyer"]
    assert lawyer.priority == 100 and lawyer.max_tokens == 1024 and lawyer.roles == ()
    assert route("Can my landlord break the contract early?", specs)[0].name == "lawyer"
    keywords = dict(specs["coder"].keywords)
    assert keywords["verilog"] == 4 and "python" not in keywords and keywords["traceback"] == 4
    assert route("verilog: module counter(input clk);", specs)[0].name == "coder"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mycoder": {"description": "d", "system_prompt": "s", "temperature": "hot"}},
         "specialists.profiles.mycoder.temperature must be a number between 0 and 2, got 'hot'"),
        ({"coder": {"temprature": 0.1}},
         "specialists.profiles.coder.temprature is not a known field (valid: description, system_prompt, "
         "temperature, top_p, max_tokens, preferred_models, keywords, patterns, roles, priority); "
         "did you mean 'temperature'?"),
        ({"mycoder": {"description": "d"}},
         "specialists.profiles.mycoder.system_prompt is required for a new profile"),
        ({"My Coder": {"description": "d", "system_prompt": "s"}},
         "specialists.profiles: profile name 'My Coder' must match [a-z0-9_-]{1,40}"),
        ({"coder": {"top_p": 0}}, "specialists.profiles.coder.top_p must be a number greater than 0 and at most 1"),
        ({"coder": {"max_tokens": 1.5}}, "specialists.profiles.coder.max_tokens must be a whole number"),
        ({"coder": {"max_tokens": True}}, "specialists.profiles.coder.max_tokens must be a whole number"),
        ({"coder": {"keywords": {"x": "high"}}}, "specialists.profiles.coder.keywords['x'] must be a number"),
        ({"coder": {"keywords": ["x"]}}, "specialists.profiles.coder.keywords must be a mapping"),
        ({"coder": {"patterns": {"(": 1}}},
         "specialists.profiles.coder.patterns['('] is not a valid regular expression"),
        ({"coder": {"roles": ["boss"]}},
         "specialists.profiles.coder.roles[0] must be one of fuser, reviewer, fallback"),
        ({"coder": {"description": ""}}, "specialists.profiles.coder.description must be a non-empty string"),
        ({"coder": {"preferred_models": [3]}},
         "specialists.profiles.coder.preferred_models[0] must be a non-empty string"),
        ({"coder": "fast"}, "specialists.profiles.coder must be a mapping of field -> value"),
        (["coder"], "specialists.profiles must be a mapping of profile name -> settings"),
    ],
)
def test_invalid_overrides_name_the_path(overrides, message):
    with pytest.raises(ValueError) as exc:
        load_specialists(overrides)
    assert str(exc.value).startswith(message)


# -- routing --------------------------------------------------------------------------------------------
def _misses(items: list[dict]) -> list[str]:
    misses = []
    for item in items:
        got = route(item["prompt"], SPECS)[0].name
        if got != item["expect"]:
            misses.append(f"{item['expect']} -> {got}: {item['prompt'][:60]!r}")
    return misses


def test_routing_set_is_large_and_covers_every_specialist():
    labelled, held_out = ROUTING_SET["labelled"], ROUTING_SET["held_out"]
    assert len(labelled) >= 60 and len(held_out) >= 20
    counts = Counter(item["expect"] for item in labelled)
    assert set(counts) == set(SPECS) and min(counts.values()) >= 5
    assert set(item["expect"] for item in held_out) == set(SPECS)
    prompts = [item["prompt"] for item in labelled + held_out]
    assert len(set(prompts)) == len(prompts)


def test_labelled_routing_is_exact():
    assert _misses(ROUTING_SET["labelled"]) == []


def test_held_out_routing_generalises():
    held_out = ROUTING_SET["held_out"]
    misses = _misses(held_out)
    accuracy = 1 - len(misses) / len(held_out)
    assert accuracy >= 0.8, misses


def test_route_reports_reasons_and_normalised_scores():
    routes = route("Traceback (most recent call last):\nKeyError: 'x'", SPECS)
    assert [r.name for r in routes][0] == "coder" and len(routes) == 12
    best = routes[0]
    assert 0 < best.score < 1 and any("Traceback" in r for r in best.reasons)
    assert [r.score for r in routes] == sorted((r.score for r in routes), reverse=True)


def test_fallback_when_nothing_matches():
    best, *rest = route("zxqv plorp", SPECS)
    assert best.name == "conversationalist" and best.score == FALLBACK_SCORE
    assert "fallback" in best.reasons[-1] and all(r.score == 0 for r in rest)
    # zero scores are ordered by the fixed priority, not dict order
    assert [r.name for r in rest][:2] == ["translator", "summarizer"]


def test_ties_break_by_priority_then_name_whatever_the_dict_order():
    def spec(name, priority):
        return Specialist(name, "d", "s", keywords=(("widget", 2.0),), priority=priority)

    profiles = [spec("bravo", 5), spec("alpha", 5), spec("zulu", 1)]
    for ordering in (profiles, profiles[::-1], profiles[1:] + profiles[:1]):
        names = [r.name for r in route("a widget", {s.name: s for s in ordering})]
        assert names == ["zulu", "alpha", "bravo"]


def test_huge_prompt_routes_quickly_on_head_and_tail():
    prompt = "TL;DR please:\n" + "Plain sentence about the weather today. " * 6000
    routes = route(prompt, SPECS)
    assert routes[0].name == "summarizer"


# -- vote normalisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("Yes, it is visible.", "yes"),
        ("**No.** It is a myth.", "no"),
        ("True", "yes"),
        ("False - he passed maths.", "no"),
        ("Partly true. Some of it holds.", "partly"),
        ("Unverifiable.", "unsure"),
        ("No one knows for sure.", "no one knows for sure"),  # "No" used as a word, not a verdict
        ("Let me think.\nStep 1...\n**Final answer:** Yes.", "yes"),
        ("Working...\nAnswer: The ball costs 5 cents. Because...", "the ball costs 5 cents"),
        ("# The Answer is 3.14!\nMore text.", "the answer is 3.14"),
        ("It is -5, about 1,000 units. Then more.", "it is -5 about 1000 units"),
    ],
)
def test_normalise_vote(text, key):
    assert normalise_vote(text) == key


# -- modes ----------------------------------------------------------------------------------------------
def test_unknown_mode_and_specialist_list_the_valid_ones():
    fake = FakeAnswerer()
    with pytest.raises(RouterError, match="valid modes: single, vote, chain, fuse, compare, specialist"):
        run("hi", "debate", fake)
    with pytest.raises(RouterError) as exc:
        run("hi", "specialist", fake, ["coder", "wizard"])
    assert "unknown specialist 'wizard'" in str(exc.value)
    assert "valid specialists: analyst, coder, conversationalist, factchecker" in str(exc.value)
    with pytest.raises(RouterError, match="specialist mode needs at least one specialist; valid specialists"):
        run("hi", "specialist", fake)
    with pytest.raises(RouterError, match="max_tokens must be a whole number"):
        run("hi", "single", fake, max_tokens=0)
    assert isinstance(RouterError("x"), ValueError) and fake.calls == []
    assert MODES == ("single", "vote", "chain", "fuse", "compare", "specialist")


def test_single_routes_and_reports():
    fake = FakeAnswerer({"coder": "Use d.get('x')."})
    prompt = "Why does d['x'] raise KeyError in my Python code?"
    out = run(prompt, "single", fake, max_tokens=77)
    assert out["mode"] == "single" and out["answer"] == "Use d.get('x')." and out["specialist"] == "coder"
    routing = out["routing"]
    assert routing["chosen"] == "coder" and routing["score"] > 0 and routing["reasons"]
    assert len(routing["candidates"]) == 3 and routing["candidates"][0]["name"] == "coder"
    assert [a["specialist"] for a in out["answers"]] == ["coder"] and out["errors"] == []
    spec, messages = fake.calls[0]
    assert messages == [{"role": "system", "content": SPECS["coder"].system_prompt},
                        {"role": "user", "content": prompt}]
    assert generation_settings(spec)["max_tokens"] == 77 and spec.temperature == 0.2


def test_single_among_requested_only():
    fake = FakeAnswerer()
    out = run("Prove that there are infinitely many primes.", "single", fake, ["writer", "teacher"])
    assert out["specialist"] in ("writer", "teacher") and out["routing"]["chosen"] == out["specialist"]
    assert {c["name"] for c in out["routing"]["candidates"]} == {"writer", "teacher"}


def test_vote_majority_with_stated_rule():
    fake = FakeAnswerer({
        "factchecker": "False. The wall is far too narrow to see.",
        "skeptic": "Reasoning about width...\nAnswer: No.",
        "coder": "Yes, astronauts see it.",
    })
    prompt = "Is it true the Great Wall is visible from space?"
    out = run(prompt, "vote", fake, ["coder", "factchecker", "skeptic"])
    assert out["votes"] == {"coder": "yes", "factchecker": "no", "skeptic": "no"}
    assert out["winner"]["key"] == "no" and out["winner"]["count"] == 2
    assert out["winner"]["specialists"] == ["factchecker", "skeptic"]
    assert [(g["key"], g["count"]) for g in out["groups"]] == [("no", 2), ("yes", 1)]
    assert out["answer"] == "False. The wall is far too narrow to see." and out["specialist"] == "factchecker"
    assert out["rule"] == VOTE_RULE and out["unanimous"] is False
    assert all(spec.system_prompt.endswith(VOTE_INSTRUCTION) for spec, _ in fake.calls)
    assert all(msgs[1]["content"] == prompt for _, msgs in fake.calls)


def test_vote_tie_goes_to_higher_routing_score_whatever_the_order():
    fake = FakeAnswerer({"factchecker": "Answer: False.", "writer": "Answer: True."})
    prompt = "Fact-check this claim: is it true that goldfish have a three-second memory?"
    results = [run(prompt, "vote", fake, order) for order in (["writer", "factchecker"], ["factchecker", "writer"])]
    results.append(run(prompt, "vote", fake, ["writer", "factchecker"]))
    for out in results:
        assert [g["count"] for g in out["groups"]] == [1, 1]
        assert out["winner"]["specialists"] == ["factchecker"] and out["answer"] == "Answer: False."
        assert out["groups"][0]["score"] > out["groups"][1]["score"]


def test_vote_tie_with_equal_scores_goes_to_voter_order_deterministically():
    fake = FakeAnswerer({"writer": "Blue.", "teacher": "Green."})
    prompt = "zxqv plorp"  # neither profile matches: equal (zero) routing scores
    first = [run(prompt, "vote", fake, ["writer", "teacher"])["winner"]["specialists"] for _ in range(2)]
    swapped = run(prompt, "vote", fake, ["teacher", "writer"])["winner"]["specialists"]
    assert first == [["writer"], ["writer"]] and swapped == ["teacher"]


def test_vote_defaults_to_top_three_and_needs_two():
    fake = FakeAnswerer()
    out = run("Translate 'good night' into French.", "vote", fake)
    assert out["routing"]["selected_by"] == "router" and len(fake.calls) == 3
    assert fake.calls[0][0].name == "translator" and out["unanimous"] is True
    with pytest.raises(RouterError, match="vote mode needs at least 2 different specialists, got 1"):
        run("x", "vote", fake, ["coder", "coder"])


def test_failed_answers_are_reported_and_excluded_from_votes():
    fake = FakeAnswerer({
        "coder": ("error", "model timed out"),
        "skeptic": RuntimeError("node unreachable"),
        "factchecker": "No.",
        "analyst": "   ",
    })
    out = run("Is it true?", "vote", fake, ["coder", "skeptic", "factchecker", "analyst"])
    assert out["votes"] == {"factchecker": "no"} and out["answer"] == "No."
    assert out["errors"] == [
        {"specialist": "coder", "error": "model timed out"},
        {"specialist": "skeptic", "error": "RuntimeError: node unreachable"},
        {"specialist": "analyst", "error": "empty answer"},
    ]
    assert len(out["answers"]) == 4


def test_all_failing_raises_no_answer_with_the_errors():
    fake = FakeAnswerer({"coder": ("error", "out of memory"), "writer": ValueError("bad model")})
    for mode in ("vote", "fuse", "compare", "specialist", "chain"):
        with pytest.raises(NoAnswer) as exc:
            run("x", mode, fake, ["coder", "writer"])
        assert exc.value.errors == [{"specialist": "coder", "error": "out of memory"},
                                    {"specialist": "writer", "error": "ValueError: bad model"}]
        assert "coder: out of memory" in str(exc.value)
    with pytest.raises(NoAnswer):
        run("x", "single", fake, ["coder"])


def test_chain_passes_each_previous_output_in_order():
    fake = FakeAnswerer({"coder": "DRAFT-CODE", "skeptic": "REVIEW-NOTES", "writer": "POLISHED"})
    prompt = "Write a retry helper."
    out = run(prompt, "chain", fake, ["coder", "skeptic", "writer"])
    assert [spec.name for spec, _ in fake.calls] == ["coder", "skeptic", "writer"]
    assert fake.user_message(0) == prompt
    second, third = fake.user_message(1), fake.user_message(2)
    assert prompt in second and "Previous step 1 by coder:\nDRAFT-CODE" in second
    assert "DRAFT-CODE" in third and "Previous step 2 by skeptic:\nREVIEW-NOTES" in third
    assert "last step" in third
    assert out["chain"] == ["coder", "skeptic", "writer"] and out["answer"] == "POLISHED"
    assert [s["step"] for s in out["steps"]] == [1, 2, 3] and out["steps"][1]["text"] == "REVIEW-NOTES"


def test_chain_default_is_draft_review_final():
    fake = FakeAnswerer({"coder": "FIRST-DRAFT", "skeptic": "FIX-THE-EDGE-CASE"})
    out = run("Debug this code", "chain", fake, ["coder"])
    assert out["chain"] == ["coder", "skeptic", "coder"]
    assert [s["role"] for s in out["steps"]] == ["draft", "review", "final"]
    assert "FIRST-DRAFT" in fake.user_message(1) and "Review the previous step" in fake.user_message(1)
    final = fake.user_message(2)
    assert "FIRST-DRAFT" in final and "FIX-THE-EDGE-CASE" in final and "final answer" in final
    # nothing requested: the best-routed specialist leads
    fake2 = FakeAnswerer()
    assert run("Solve for x: 2x + 1 = 5", "chain", fake2)["chain"] == ["mathematician", "skeptic", "mathematician"]
    # the reviewer alone is reviewed by the fuser instead of by itself
    assert run("x", "chain", FakeAnswerer(), ["skeptic"])["chain"] == ["skeptic", "reasoner", "skeptic"]


def test_chain_skips_a_failed_step():
    fake = FakeAnswerer({"coder": "STEP-ONE", "skeptic": ("error", "down"), "writer": "DONE"})
    out = run("x", "chain", fake, ["coder", "skeptic", "writer"])
    assert out["answer"] == "DONE" and out["errors"] == [{"specialist": "skeptic", "error": "down"}]
    assert "STEP-ONE" in fake.user_message(2) and "skeptic" not in fake.user_message(2)


def test_fuse_merges_all_sources_through_the_fuser():
    fake = FakeAnswerer({"coder": "SRC-A", "analyst": "SRC-B", "teacher": "SRC-C", "reasoner": "MERGED"})
    out = run("Explain caching", "fuse", fake, ["coder", "analyst", "teacher"])
    assert out["answer"] == "MERGED" and out["fused"] is True and out["fuser"] == "reasoner"
    assert [s["specialist"] for s in out["sources"]] == ["coder", "analyst", "teacher"]
    fuser_spec, fuser_messages = fake.calls[-1]
    assert fuser_spec.name == "reasoner" and fuser_messages[0]["content"] == FUSE_SYSTEM_PROMPT
    for text in ("Explain caching", "SRC-A", "SRC-B", "SRC-C", "from analyst"):
        assert text in fuser_messages[1]["content"]
    assert len(fake.calls) == 4


def test_fuse_excludes_failures_and_survives_a_failed_fuser():
    fake = FakeAnswerer({"coder": "SRC-A", "analyst": ("error", "boom"), "teacher": "SRC-C",
                         "reasoner": ("error", "fuser down")})
    out = run("q", "fuse", fake, ["coder", "analyst", "teacher"])
    assert "SRC-A" in fake.user_message(3) and "boom" not in fake.user_message(3)
    assert [s["specialist"] for s in out["sources"]] == ["coder", "teacher"]
    assert out["fused"] is False and out["answer"] == "SRC-A" and len(out["errors"]) == 2
    single = run("q", "fuse", FakeAnswerer({"coder": "ONLY", "analyst": ("error", "x")}), ["coder", "analyst"])
    assert single["fused"] is False and single["answer"] == "ONLY" and "only one source" in single["note"]


def test_compare_shows_timing_and_model_per_answer_without_merging():
    fake = FakeAnswerer({"coder": "A", "writer": "B", "analyst": "C"})
    out = run("Compare REST and GraphQL", "compare", fake, ["writer", "coder", "analyst"])
    assert [a["specialist"] for a in out["answers"]] == ["writer", "coder", "analyst"]
    for a in out["answers"]:
        assert a["model"] == f"model-{a['specialist']}" and a["elapsed_ms"] > 0 and a["node"] == "node-1"
    assert out["fastest"] == "coder" and out["answer"] == "B" and len(fake.calls) == 3
    assert "fused" not in out and "sources" not in out


def test_specialist_mode_answers_with_each_named():
    fake = FakeAnswerer({"coder": "C1", "skeptic": "S1"})
    out = run("Review my code", "specialist", fake, ["skeptic", "coder"])
    assert out["answer"] == "S1" and out["specialist"] == "skeptic"
    assert [a["text"] for a in out["answers"]] == ["S1", "C1"]


def test_independent_calls_run_concurrently():
    in_flight = 0
    peak = 0

    async def answer(spec, messages):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return Answer(spec.name, "ok.", "m", None, 10.0, 1)

    for mode in ("vote", "fuse", "compare", "specialist"):
        peak = 0
        asyncio.run(run_query("q", mode, specialists=SPECS, requested=["coder", "writer", "teacher"],
                              answer=answer))
        assert peak == 3, mode
