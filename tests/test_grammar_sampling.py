"""The engine's grammar sampling (node/services/grammar_sampling.py) on the real default model: it checks only
the token drawn and falls back to the whole-vocabulary grammar when that token is refused, so what it must
show is that every answer still matches the grammar, including where the model on its own would say
something else, and that a seed still gives the same answer."""

import json

import pytest

from model import default_model_file
from pinkybrain.node.services.grammar_sampling import GrammarSampler, grammar_llama_class


@pytest.fixture(scope="module")
def llm():
    model = grammar_llama_class()(model_path=str(default_model_file()), n_ctx=1024, n_threads=2, flash_attn=True,
                                  verbose=False)
    yield model
    model.close()


def chat(llm, text: str) -> list[int]:
    prompt = f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
    return llm.tokenize(prompt.encode(), add_bos=True, special=True)


def generate(llm, tokens, grammar=None, seed=1, max_tokens=40) -> str:
    out = llm.create_completion(prompt=tokens, max_tokens=max_tokens, temperature=0.8, seed=seed, grammar=grammar)
    return out["choices"][0]["text"]


def test_an_answer_the_model_would_not_give_still_matches_the_grammar(llm):
    from llama_cpp import LlamaGrammar

    tokens = chat(llm, "Write a short poem about the sea.")
    grammar = LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    counted = {"fallbacks": 0}
    draw = GrammarSampler._draw

    def counting(self, ctx, idx, constrained):
        counted["fallbacks"] += constrained
        return draw(self, ctx, idx, constrained)

    GrammarSampler._draw = counting
    try:
        answers = [generate(llm, tokens, grammar, seed) for seed in (1, 2, 3)]
    finally:
        GrammarSampler._draw = draw
    assert set(answers) <= {"yes", "no"}, answers
    # Unconstrained, the model writes a poem: the first token was refused and drawn again under the grammar.
    assert all(generate(llm, tokens, None, seed, 8) not in ("yes", "no") for seed in (1, 2, 3))
    assert counted["fallbacks"] >= 3


def test_a_json_schema_answer_parses_and_follows_the_schema(llm):
    from llama_cpp import LlamaGrammar

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
              "required": ["colour", "count"]}
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    tokens = chat(llm, "Pick a colour and a number. Answer in JSON.")
    for seed in (1, 2, 3):
        data = json.loads(generate(llm, tokens, grammar, seed, max_tokens=60))
        assert set(data) == {"colour", "count"} and data["colour"] in ("red", "green", "blue")
        assert isinstance(data["count"], int)


def test_a_seed_gives_the_same_grammar_bound_answer(llm):
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_json_schema(json.dumps({"type": "object", "properties": {"name": {"type": "string"}},
                                                        "required": ["name"]}), verbose=False)
    tokens = chat(llm, "Invent a name for a cat. Answer in JSON.")
    first = generate(llm, tokens, grammar, seed=7)
    llm.reset()
    assert generate(llm, tokens, grammar, seed=7) == first
