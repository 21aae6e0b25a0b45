"""Specialist profiles: what each specialist is for, how it is prompted and sampled, and how to route to it.

A profile is plain data. `builtin_specialists()` gives the twelve built-ins; `load_specialists()` merges the
user's `specialists.profiles` mapping from the config over them, validating every field and naming the
dotted path of anything wrong. Routing itself lives in router.py; this module only describes profiles.

Routing hints:
  keywords  ((text, weight), ...): matched case-insensitively as whole words; a space or hyphen in the text
            matches any run of spaces or hyphens ("fact check" also finds "fact-check"); a trailing `*`
            matches any word ending ("summar*" finds summary, summarise, summarize).
  patterns  ((regex, weight), ...): Python regexes, searched with IGNORECASE and MULTILINE
            (use `(?-i:...)` for a case-sensitive part).
Each hint counts once. Weights are in (0, 10]; in user overrides a weight of 0 removes a built-in hint.

Roles say which profile a mode uses for a job: `fuser` merges answers in fuse mode, `reviewer` critiques the
draft in a one-specialist chain, `fallback` answers when no hint matches. When several profiles hold a role,
the first by (priority, name) is used.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

NAME_RE = re.compile(r"[a-z0-9_-]{1,40}")
ROLES = ("fuser", "reviewer", "fallback")
PROFILES_PATH = "specialists.profiles"
MAX_TOKENS_LIMIT = 32768  # the API's own bound on a query's max_tokens
USER_PRIORITY = 100  # user profiles lose exact routing ties to the built-ins (10-99)


@dataclass(frozen=True)
class Specialist:
    name: str
    description: str
    system_prompt: str
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    # fnmatch patterns (case-insensitive) for model names, tried in order; empty means any model
    preferred_models: tuple[str, ...] = ()
    keywords: tuple[tuple[str, float], ...] = ()
    patterns: tuple[tuple[str, float], ...] = ()
    roles: tuple[str, ...] = ()
    # lower wins exact routing-score ties (then name), so ties never depend on dict order
    priority: int = USER_PRIORITY


def generation_settings(specialist: Specialist, max_tokens: int | None = None) -> dict[str, Any]:
    """Sampling settings for a model call; `max_tokens`, when given, overrides the profile's."""
    return {
        "temperature": specialist.temperature,
        "top_p": specialist.top_p,
        "max_tokens": specialist.max_tokens if max_tokens is None else max_tokens,
    }


def choose_model(specialist: Specialist, available: Iterable[str], *, strict: bool = False) -> str | None:
    """The first available model matching the profile's preferences, in preference order.

    With no preferences, or none matching and not `strict`, the first available model is used: a
    specialist answering on a non-preferred model beats no answer.
    """
    models = list(available)
    for pattern in specialist.preferred_models:
        for model in models:
            if fnmatch.fnmatchcase(model.lower(), pattern.lower()):
                return model
    if specialist.preferred_models and strict:
        return None
    return models[0] if models else None


def _h(hints: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple((text, float(weight)) for text, weight in hints.items())


# Natural languages, shared by the translator's keywords and its "into <language>" pattern.
_LANGUAGES = (
    "english", "french", "spanish", "german", "italian", "portuguese", "dutch", "swedish", "norwegian",
    "danish", "finnish", "polish", "czech", "russian", "ukrainian", "greek", "turkish", "arabic", "hebrew",
    "persian", "hindi", "urdu", "bengali", "chinese", "mandarin", "cantonese", "japanese", "korean",
    "vietnamese", "thai", "indonesian", "malay", "swahili", "latin", "romanian", "hungarian", "catalan",
)
_LANG_ALT = "|".join(_LANGUAGES)

# Hint weights follow one scale: 4-5 an explicit request for this kind of work ("translate", "TL;DR",
# "prove"), 2-3 strong domain evidence (a stack trace, an integral), 1-1.5 topical vocabulary. The router
# lets the strongest hint dominate, so piles of topical words in pasted text don't outvote the request.
_BUILTINS: tuple[Specialist, ...] = (
    Specialist(
        name="translator",
        description="Translates text between languages and explains foreign words and idioms.",
        system_prompt=(
            "You are a professional translator. Translate faithfully into the requested language (English "
            "if none is named), keeping meaning, tone, register, formatting and names. Give the translation "
            "first; add brief notes only for idioms, ambiguity or useful alternatives. When asked what a "
            "foreign word means, give its meaning, literal sense and typical usage."
        ),
        temperature=0.2,
        top_p=0.9,
        max_tokens=1024,
        keywords=_h({
            "translate*": 5, "translation*": 4, "how do you say": 4, "how do i say": 4, "how would you say": 4,
            "in english": 1.5, "word for": 1, "traduc*": 4, "traduire": 4, "traduzir": 4, "tradurre": 4,
            "übersetz*": 4, "idiom*": 1.5,
            **{lang: 1 for lang in _LANGUAGES},
        }),
        patterns=_h({
            rf"\b(?:into|to|in)\s+(?:{_LANG_ALT})\b": 2.5,
            r"\bwhat\s+does\s+['\"“‘][^'\"”’]{1,60}['\"”’]\s+mean\b": 3,
            rf"\b(?:{_LANG_ALT})\s+(?:text|phrase|sentence|word|expression)\b": 2,
            r"[àâçéèêëîïôûùüÿñæœßäöåøąćęłńśźżčřšž¿¡]": 1,
            r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af\u0400-\u04ff\u0600-\u06ff]": 2,
        }),
        priority=10,
    ),
    Specialist(
        name="summarizer",
        description="Summarises text, articles, notes and well-known works into their key points.",
        system_prompt=(
            "You summarise. Capture the main points, decisions, numbers and conclusions of the given text "
            "faithfully, adding nothing. Follow any requested length or format (bullets, one sentence, "
            "TL;DR); by default give a one-line summary followed by at most five bullets. If a well-known "
            "work or topic is named instead of text, summarise it from knowledge and say so."
        ),
        temperature=0.2,
        top_p=0.9,
        max_tokens=768,
        keywords=_h({
            "summar*": 5, "tl;dr": 5, "tldr": 5, "sum up": 4, "sum it up": 4, "condense": 4, "recap": 3.5,
            "gist": 3, "key points": 3, "main points": 3, "key takeaways": 3, "takeaways": 2.5,
            "in a nutshell": 2.5, "shorten": 2, "in a few sentences": 2, "in one sentence": 2,
            "one sentence": 1.5, "bullet points": 1.5, "main arguments": 2, "meeting notes": 1.5,
            "this article": 1.5, "the following": 0.5, "overview": 1,
        }),
        patterns=_h({
            r"\bboil\w*\b.{0,30}\bdown\b": 4,
            # a long pasted text is weak evidence on its own (long code goes to the coder)
            r"\A[\s\S]{600}": 1.5,
        }),
        priority=20,
    ),
    Specialist(
        name="factchecker",
        description="Checks whether claims are true, with a verdict and the evidence.",
        system_prompt=(
            "You are a careful fact-checker. Begin with the verdict as one word or phrase followed by a "
            "period: True, False, Partly true, or Unverifiable. Then restate the claim, give the key evidence, "
            "separate established facts from common myths, and say what kind of reliable source settles it. "
            "Never invent citations or numbers; say when you are unsure."
        ),
        temperature=0.1,
        top_p=0.9,
        max_tokens=768,
        keywords=_h({
            "fact check*": 5, "is it true": 4, "is that true": 4, "is this true": 4, "true or false": 4,
            "is it a fact": 4, "accurate": 3, "inaccurate": 3, "claim": 2, "claims": 1.5, "fact": 2,
            "facts": 2, "verify": 3, "myth": 3, "misconception*": 3, "debunk*": 2.5, "hoax": 2,
            "really": 1, "actually true": 3, "urban legend": 3, "someone told me": 2, "i heard": 2,
            "i read that": 2, "correct that": 2,
        }),
        patterns=_h({
            # "Did Napoleon really ...", "Was it really ..."
            r"\b(?:did|was|were|is|are|does|do|has|have)\b[^.?!\n]{0,80}\breally\b": 2.5,
        }),
        priority=30,
    ),
    Specialist(
        name="skeptic",
        description="Stress-tests claims, plans and arguments: assumptions, weak evidence, failure modes.",
        system_prompt=(
            "You are a constructive skeptic. Find the weakest points of the claim, plan or argument: hidden "
            "assumptions, missing or weak evidence, alternative explanations, confounders, incentives and "
            "failure modes. Rank the issues by importance, say what evidence would change your mind, and end "
            "with what does hold up. Be direct, not dismissive."
        ),
        temperature=0.5,
        top_p=0.9,
        max_tokens=1024,
        keywords=_h({
            "poke holes": 5, "holes in": 3, "devil's advocate": 5, "weakness*": 3.5, "weak spot*": 3.5,
            "weak point*": 3.5, "critique": 4, "critici*": 3.5, "skeptic*": 4, "sceptic*": 4,
            "too good to be true": 4, "what's the catch": 4, "the catch": 3, "can we trust": 3,
            "trust it": 2, "flaw*": 3, "counterargument*": 3.5, "counter argument*": 3.5,
            "what could go wrong": 4, "argue against": 4, "stress test": 3, "red flag*": 3, "scam": 2.5,
            "doubt*": 2, "cherry pick*": 2, "prove me wrong": 3, "challenge my": 3, "my argument": 2,
            "this argument": 2, "my plan": 1.5, "assumption*": 1.5, "bias": 1.5, "biased": 1.5,
            "risks": 1, "against": 0.5,
        }),
        roles=("reviewer",),
        priority=40,
    ),
    Specialist(
        name="mathematician",
        description="Solves maths problems, calculations and proofs step by step, and checks the result.",
        system_prompt=(
            "You are a mathematician. Set up the problem, show the key steps, and check the result "
            "(substitute back, test a special case or compare magnitudes). Use one notation consistently. "
            "For proofs, state what is assumed and what is shown. End with a line 'Answer: ...' when there "
            "is a final value."
        ),
        temperature=0.1,
        top_p=0.9,
        max_tokens=1536,
        preferred_models=("*math*", "*qwen*", "*deepseek*"),
        keywords=_h({
            "prove": 4, "proof": 4, "theorem": 4, "lemma": 4, "integral": 4, "integrate": 4,
            "derivative": 4, "differentiate": 4, "equation*": 3.5, "solve for": 4, "eigenvalue*": 4,
            "eigenvector*": 4, "matrix": 2.5, "matrices": 2.5, "irrational": 3, "rational number*": 3,
            "prime number*": 3, "prime": 2, "probability": 2.5, "calculate": 2, "compute": 2, "limit": 1.5,
            "algebra*": 3, "geometry": 3, "calculus": 3.5, "trigonometry": 3, "factorial": 3,
            "combinatorics": 3.5, "how many ways": 4, "permutation*": 3, "combination*": 1.5,
            "square root": 3, "logarithm*": 3, "polynomial*": 3.5, "divisible": 3, "modulo": 2,
            "infinity": 1, "infinite series": 3, "converge*": 2, "diverge*": 1.5, "percent of": 2,
            "show your work": 2, "vector space": 3, "arithmetic": 2, "fraction*": 2,
        }),
        patterns=_h({
            r"[\dxyz)]\s*[-+*/^=×÷]\s*[\dxyz(]": 2,
            r"\b\d+(?:\.\d+)?\s*%\s*of\b": 3,
            r"\b(?:sin|cos|tan|log|ln|exp|sqrt)\s*\(": 3,
            r"\^\s*\d|\b[a-z]\s*\^": 2,
            r"\bd[xyt]\b": 2,
            r"\b\d*[a-z]\s*[-+]\s*\d+\s*=\s*-?\d+": 3,
            r"\[\s*\[[^\]]*\]\s*,": 2,
            r"[∫∑∏√∞≤≥≠π]": 3,
        }),
        priority=50,
    ),
    Specialist(
        name="coder",
        description="Writes, explains, reviews and debugs code in any programming language.",
        system_prompt=(
            "You are a senior software engineer. Give working, idiomatic code with a brief explanation. When "
            "debugging, name the root cause first, then the fix. Put code in fenced blocks with a language "
            "tag. Mention assumptions, edge cases and security concerns. Do not invent APIs or library "
            "functions; say when you are unsure one exists."
        ),
        temperature=0.2,
        top_p=0.9,
        max_tokens=1536,
        preferred_models=("*coder*", "*code*", "*starcoder*", "*deepseek*", "*qwen*"),
        keywords=_h({
            "code": 2, "debug*": 4, "bug": 2.5, "bugs": 2.5, "function": 1.5, "compile*": 2.5,
            "compiler": 2.5, "exception": 2.5, "stack trace": 4, "traceback": 4, "segfault*": 4,
            "segmentation fault": 4, "refactor*": 4, "regex": 3, "unit test*": 3, "syntax": 2.5,
            "variable*": 1.5, "array*": 1.5, "linked list": 3, "hash map": 2.5, "algorithm*": 1.5,
            "implement*": 1.5, "script": 1.5, "recursion": 2.5, "recursive": 2, "infinite loop": 3,
            "null pointer": 3, "component": 1.5, "re render*": 3, "endpoint": 1.5, "frontend": 1.5,
            "backend": 1.5, "undefined": 1.5, "programming": 2, "program": 1.5, "subquery": 2.5,
            "json": 1.5, "class": 1, "method": 1, "library": 1, "never terminates": 2.5,
            "python": 2, "javascript": 2.5, "typescript": 2.5, "java": 2, "rust": 2, "golang": 2.5,
            "c++": 2.5, "c#": 2.5, "ruby": 1.5, "php": 2.5, "kotlin": 2.5, "swift": 1.5, "react": 2.5,
            "node.js": 2.5, "nodejs": 2.5, "django": 2.5, "flask": 2, "bash": 1.5, "html": 2, "css": 2,
            "sql": 2.5, "haskell": 2.5, "scala": 2, "vector": 1, "pointer*": 1.5,
        }),
        patterns=_h({
            r"```": 4,
            r"^\s*(?:def|class|import|from\s+\S+\s+import|function|const|let|var|public|private|#include|fn|"
            r"func|package|using)\b": 3,
            r"\bdef\s+\w+\s*\(": 3,
            r"Traceback \(most recent call last\)": 4,
            r"\b(?-i:[A-Z][A-Za-z]*(?:Error|Exception))\b": 3,
            r"\bline \d+, in\b": 2,
            r"\b\w+\.(?:py|js|ts|tsx|jsx|rs|go|java|cpp|hpp|c|h|rb|php|cs|kt|swift)\b": 2,
            r"\w+\([^()\n]*\)\s*(?:\{|=>|->)": 2,
            r"^\s*(?:SELECT|INSERT|UPDATE|DELETE)\b.+\b(?:FROM|INTO|SET|WHERE)\b": 3,
        }),
        priority=60,
    ),
    Specialist(
        name="planner",
        description="Plans tool use: shell commands, API calls and multi-step tasks, with exact syntax.",
        system_prompt=(
            "You plan tool use. Break the task into numbered steps; for each, give the tool, command or API "
            "call with exact syntax in a code block, what it does and what to check. Prefer safe, standard "
            "tools; flag destructive or privileged commands and suggest a dry run. State the assumed OS or "
            "shell when it matters. Never claim to have run anything."
        ),
        temperature=0.2,
        top_p=0.9,
        max_tokens=1024,
        keywords=_h({
            "command*": 3.5, "shell": 3, "terminal": 3, "cli": 2, "curl": 3.5, "wget": 3, "git": 3,
            "docker": 2.5, "kubectl": 3, "ssh": 2.5, "cron": 3, "crontab": 3, "tool call*": 5,
            "tools": 2, "tool": 2, "plan": 2, "planning": 2, "workflow": 2, "automate*": 2.5,
            "install": 2, "set up": 2, "setup": 2, "deploy*": 2, "migrat*": 2, "back up": 2, "backup*": 2,
            "virtualenv": 2, "venv": 2, "pip": 2, "npm": 2, "apt": 2.5, "brew": 2.5, "roadmap": 2.5,
            "checklist": 2, "milestone*": 2, "schedule": 1.5, "step by step": 1, "steps": 1.5,
            "directory": 1.5, "folder": 1, "files": 1, "s3": 1.5, "aws": 1.5, "api": 1, "port": 1,
            "powershell": 3, "systemctl": 3, "chmod": 3,
        }),
        patterns=_h({
            r"\bbreak\b.{0,40}\binto\b.{0,20}\bsteps\b": 3.5,
            r"\bevery\s+(?:day|night|hour|morning|week|month|minute)\b": 2,
            r"\bover\s+(?:the\s+next\s+)?(?:\w+\s+)?(?:days|weeks|months)\b": 2,
            r"^\s*\$\s+\w+": 3,
        }),
        priority=70,
    ),
    Specialist(
        name="analyst",
        description="Analyses data and compares options: trends, metrics, pros and cons, recommendations.",
        system_prompt=(
            "You are a data and decision analyst. Structure comparisons as criteria by option (a table when "
            "useful), quantify where the data allows and show the calculation, and separate observations from "
            "interpretation. Call out missing data, small samples and confounders. End with a clear "
            "recommendation and what it depends on."
        ),
        temperature=0.3,
        top_p=0.9,
        max_tokens=1024,
        keywords=_h({
            "compare": 3.5, "comparison": 3.5, "versus": 3, "vs": 3, "pros and cons": 4, "trade off*": 3,
            "tradeoff*": 3, "trend*": 3.5, "data": 1.5, "dataset": 3, "csv": 3.5, "analy*": 3.5,
            "statistic*": 3, "metric*": 3, "kpi*": 3, "revenue": 2, "sales": 2, "churn": 2, "growth": 1.5,
            "survey": 3, "results": 1.5, "interpret*": 3, "chart": 2, "graph": 1.5, "spreadsheet": 3,
            "better value": 3.5, "which is better": 3.5, "which is cheaper": 3.5, "cost*": 1.5, "price": 1.5,
            "budget": 1.5, "benchmark*": 2, "correlation": 2, "average": 2, "median": 2, "forecast*": 3,
            "roi": 3, "underperform*": 3, "outperform*": 3, "quarter": 1.5, "conversion rate": 3,
            "a/b test*": 3, "evaluate": 2, "dashboard": 1.5, "monthly": 1, "yearly": 1,
        }),
        patterns=_h({
            r"\b\d+(?:\.\d+)?\s*%": 1.5,
            r"^\s*\w+(?:\s*,\s*\w+){1,}\s*$(?:\n\s*\w+(?:\s*,\s*[\w.]+){1,}\s*$){2,}": 3,
            r"(?:\b\d+(?:\.\d+)?[km%]?\b[^\d\n]{1,15}){4,}": 1.5,
        }),
        priority=80,
    ),
    Specialist(
        name="reasoner",
        description="Works through logic puzzles, deductions and multi-step reasoning carefully.",
        system_prompt=(
            "You reason carefully. Restate what is given, break the problem into steps, check each step, and "
            "consider alternatives and edge cases before concluding. Keep the reasoning tight and end with a "
            "line 'Answer: ...' stating the conclusion."
        ),
        temperature=0.3,
        top_p=0.9,
        max_tokens=1536,
        keywords=_h({
            "logic*": 3, "riddle": 4, "puzzle": 4, "brain teaser": 4, "deduce": 4, "deduction": 3.5,
            "syllogism": 4, "think step by step": 3, "step by step": 1.5, "reason it out": 3,
            "reason carefully": 3, "follows": 1.5, "conclude": 2, "conclusion": 1.5, "therefore": 2,
            "infer*": 2, "paradox": 3, "premise*": 3, "valid": 1, "definitely": 1, "must be": 1,
            "lateral thinking": 4, "logically": 3,
        }),
        patterns=_h({
            r"\b(?:all|some|no)\s+(?:\w+\s+){1,2}(?:are|is)\b": 2,
            r"\b(?:older|younger|taller|shorter|faster|slower|heavier|lighter)\s+than\b": 2,
            r"\byou\s+(?:may|can)\s+(?:only\s+)?(?:take|ask|pick|choose|open|weigh|move|flip)\b": 3,
            r"\bwho\s+is\s+(?:the\s+)?(?:youngest|oldest|tallest|shortest|lying|telling)\b": 2,
        }),
        roles=("fuser",),
        priority=85,
    ),
    Specialist(
        name="writer",
        description="Writes and edits prose: emails, letters, stories, poems, copy and rewrites.",
        system_prompt=(
            "You are a skilled writer and editor. Match the requested form, length, audience and tone "
            "exactly. Prefer concrete, vivid, plain language; avoid cliches and filler. When rewriting, keep "
            "the meaning and the author's voice unless asked otherwise. Return only the text asked for, with "
            "at most a one-line note."
        ),
        temperature=0.8,
        top_p=0.95,
        max_tokens=1536,
        keywords=_h({
            "poem": 4, "poetry": 4, "haiku": 4, "limerick": 4, "sonnet": 4, "verse": 2, "story": 3,
            "short story": 4, "essay": 2, "email": 2.5, "letter": 2.5, "cover letter": 4, "draft": 2.5,
            "tagline": 4, "slogan": 4, "catchy": 2.5, "rewrite": 3.5, "rephrase": 3.5, "reword": 3.5,
            "proofread": 3.5, "edit my": 3, "blog post": 4, "toast": 3, "speech": 3, "lyrics": 4,
            "song": 2, "headline": 3, "caption": 3, "bio": 2, "tone": 2, "sound more": 3, "compose": 2.5,
            "creative": 2, "wording": 3, "copywriting": 4, "product description": 3, "eulogy": 4,
            "invitation": 2.5, "write": 1,
        }),
        patterns=_h({
            r"\b(?:write|compose|draft|pen)\s+(?:me\s+)?(?:a|an|the|my|some)\b": 2,
        }),
        priority=90,
    ),
    Specialist(
        name="teacher",
        description="Explains concepts step by step at the learner's level, with analogies and examples.",
        system_prompt=(
            "You are a patient teacher. Explain at the learner's level (a curious beginner unless told "
            "otherwise): give the core idea in one or two sentences, build it up with a concrete analogy or "
            "example, define any jargon, and end with a short check-your-understanding question or next "
            "step. Simplify without saying anything false."
        ),
        temperature=0.5,
        top_p=0.9,
        max_tokens=1024,
        keywords=_h({
            "explain like": 5, "eli5": 5, "like i'm five": 5, "teach me": 5, "help me understand": 4,
            "in simple terms": 3.5, "simple terms": 3, "simply": 1.5, "for a beginner": 3.5, "beginner": 3,
            "basics": 3, "explain": 2.5, "explanation": 2, "how does": 2, "why does": 1.5, "why do": 1,
            "what is": 0.5, "difference between": 2, "understand": 1.5, "learn": 2, "lesson": 3,
            "tutorial": 2, "concept": 2, "intuition": 2, "student": 2, "students": 2, "high school": 2,
            "for kids": 3, "child": 1, "quiz me": 4, "study": 1.5, "walk me through": 3,
        }),
        patterns=_h({
            r"\bhow\s+(?:does|do|did)\s+(?:an?\s+|the\s+)?[\w' -]{1,60}\s+work\b": 3,
        }),
        priority=95,
    ),
    Specialist(
        name="conversationalist",
        description="Friendly general conversation; the fallback when no other specialist fits.",
        system_prompt=(
            "You are a friendly, concise conversational assistant. Reply naturally and warmly, match the "
            "user's tone, keep replies short unless asked for more, and ask a brief follow-up question when "
            "it helps. Be honest that you are an AI when it matters."
        ),
        temperature=0.8,
        top_p=0.95,
        max_tokens=512,
        keywords=_h({
            "hi": 3, "hello": 3, "hey": 3, "good morning": 4, "good afternoon": 4, "good evening": 4,
            "good night": 3, "how are you": 4, "how's your day": 4, "what's up": 4, "how have you been": 4,
            "nice to meet you": 4, "chat": 3, "bored": 3, "joke": 4, "favourite": 3, "favorite": 3,
            "thanks": 3, "thank you": 2.5, "you": 0.5, "your": 0.5, "do you": 1.5, "are you": 1.5,
            "yourself": 2, "lonely": 3, "feeling": 2, "let's talk": 3, "bye": 3, "goodbye": 3, "lol": 3,
            "cheers": 2, "fun fact": 2,
        }),
        roles=("fallback",),
        priority=99,
    ),
)

_FIELD_NAMES = tuple(f.name for f in fields(Specialist) if f.name != "name")


def builtin_specialists() -> dict[str, Specialist]:
    """The twelve built-in profiles, by name."""
    return {s.name: s for s in _BUILTINS}


# -- user overrides ----------------------------------------------------------------------------------
def _number(path: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        lower = f"greater than {lo:g} and at most" if lo_open else f"between {lo:g} and"
        raise ValueError(f"{path} must be a number {lower} {hi:g}, got {value!r}")
    return float(value)


def _whole(path: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{path} must be a whole number between {lo} and {hi}, got {value!r}")
    return value


def _text(path: str, value: Any, limit: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ValueError(f"{path} must be a non-empty string of at most {limit} characters, got {value!r}")
    return value


def _str_list(path: str, value: Any, limit: int) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{path} must be a list of strings, got {value!r}")
    for i, item in enumerate(value):
        _text(f"{path}[{i}]", item, limit)
    return tuple(value)


def _weights(path: str, value: Any, *, regex: bool) -> dict[str, float]:
    if not isinstance(value, Mapping):
        kind = "regex" if regex else "keyword"
        raise ValueError(f"{path} must be a mapping of {kind} -> weight, got {value!r}")
    out: dict[str, float] = {}
    for text, weight in value.items():
        where = f"{path}[{text!r}]"
        _text(where, text, 200)
        if regex:
            try:
                re.compile(text)
            except re.error as exc:
                raise ValueError(f"{where} is not a valid regular expression: {exc}") from None
        out[text] = _number(where, weight, 0, 10)
    return out


def _roles(path: str, value: Any) -> tuple[str, ...]:
    roles = _str_list(path, value, 40)
    for i, role in enumerate(roles):
        if role not in ROLES:
            raise ValueError(f"{path}[{i}] must be one of {', '.join(ROLES)}, got {role!r}")
    return tuple(dict.fromkeys(roles))


def _check_field(path: str, field: str, value: Any) -> Any:
    if field == "description":
        return _text(path, value, 300)
    if field == "system_prompt":
        return _text(path, value, 8000)
    if field == "temperature":
        return _number(path, value, 0, 2)
    if field == "top_p":
        return _number(path, value, 0, 1, lo_open=True)
    if field == "max_tokens":
        return _whole(path, value, 1, MAX_TOKENS_LIMIT)
    if field == "priority":
        return _whole(path, value, 0, 1000)
    if field == "preferred_models":
        return _str_list(path, value, 200)
    if field in ("keywords", "patterns"):
        return _weights(path, value, regex=field == "patterns")
    if field == "roles":
        return _roles(path, value)
    raise AssertionError(field)  # _FIELD_NAMES and this function list the same fields


def _merge_hints(base: tuple[tuple[str, float], ...], user: dict[str, float]) -> tuple[tuple[str, float], ...]:
    # Merge rather than replace, so adding one keyword to a built-in keeps the rest; weight 0 removes.
    merged = dict(base)
    merged.update(user)
    return tuple((text, weight) for text, weight in merged.items() if weight > 0)


def load_specialists(overrides: Mapping[str, Any] | None = None) -> dict[str, Specialist]:
    """Built-ins merged with the config's `specialists.profiles` mapping (name -> partial profile).

    An existing name overrides only the fields given (keywords and patterns are merged, weight 0
    removing one); a new name needs at least `description` and `system_prompt`. Raises ValueError naming
    the dotted path of the first problem.
    """
    profiles = builtin_specialists()
    if overrides is None:
        return profiles
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{PROFILES_PATH} must be a mapping of profile name -> settings, got {overrides!r}")
    for raw_name, entry in overrides.items():
        name = str(raw_name)
        path = f"{PROFILES_PATH}.{name}"
        if not isinstance(raw_name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"{PROFILES_PATH}: profile name {name!r} must match [a-z0-9_-]{{1,40}}")
        entry = {} if entry is None else entry
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path} must be a mapping of field -> value, got {entry!r}")
        values: dict[str, Any] = {}
        for field, value in entry.items():
            if field not in _FIELD_NAMES:
                close = difflib.get_close_matches(str(field), _FIELD_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"{path}.{field} is not a known field (valid: {', '.join(_FIELD_NAMES)}){hint}"
                )
            values[field] = _check_field(f"{path}.{field}", field, value)
        base = profiles.get(name)
        if base is None:
            for required in ("description", "system_prompt"):
                if required not in values:
                    raise ValueError(f"{path}.{required} is required for a new profile")
            base = Specialist(name=name, description=values["description"],
                              system_prompt=values["system_prompt"])
        for hint_field in ("keywords", "patterns"):
            if hint_field in values:
                values[hint_field] = _merge_hints(getattr(base, hint_field), values[hint_field])
        profiles[name] = replace(base, **values)
    return profiles


def with_role(specialists: Mapping[str, Specialist], role: str, *, exclude: str | None = None) -> Specialist | None:
    """The profile holding `role`, first by (priority, name); None when no profile holds it."""
    holders = [s for s in specialists.values() if role in s.roles and s.name != exclude]
    return min(holders, key=lambda s: (s.priority, s.name)) if holders else None
