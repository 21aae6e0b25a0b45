"""Grammar-constrained sampling at the cost of plain sampling, for llama-cpp-python's `Llama`.

llama-cpp-python puts a grammar in the sampler chain before top-k, so every token checks the whole
vocabulary against the grammar: over Gemma's 262k tokens that is 0.4 to 2 seconds per token on two cores
(bench/tool_calls.py), so a tool call of 40 tokens took up to a minute. llama.cpp's own sampler (common/sampling.cpp) does what
`GrammarSampler` does here: sample without the grammar, check only the token drawn against it, and only
when the grammar refuses it, apply the grammar to the whole vocabulary and sample again. The output
matches the grammar exactly as before; the full check runs only on the few tokens that need it.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

# llama_token_data: {int32 id; float logit; float p}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class GrammarSampler:
    """What `Llama.generate` calls `.sample(ctx, idx)` on: the plain chain (penalties, top-k/p, temperature,
    the seeded draw) plus a grammar sampler kept apart from it."""

    def __init__(self, llm, chain, grammar):
        import llama_cpp

        self._lib = llama_cpp
        self.chain = chain  # llama_cpp._internals.LlamaSampler, built without the grammar
        self.grammar = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
        if not self.grammar:
            raise ValueError("llama.cpp refused the grammar")
        self.n_vocab = llm.n_vocab()
        self._data = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()

    def _candidates(self, ctx, idx: int):
        logits = self._lib.llama_get_logits_ith(ctx.ctx, idx)
        self._data["id"] = self._ids
        self._data["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self._data["p"] = 0.0
        data = self._data.ctypes.data_as(ctypes.POINTER(self._lib.llama_token_data))
        return self._lib.llama_token_data_array(data=data, size=self.n_vocab, selected=-1, sorted=False)

    def _draw(self, ctx, idx: int, constrained: bool) -> int:
        cur = self._candidates(ctx, idx)
        if constrained:
            self._lib.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        self._lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(cur))
        return int(cur.data[cur.selected].id)

    def _grammar_allows(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        single = self._lib.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._lib.llama_sampler_apply(self.grammar, ctypes.byref(single))
        return not math.isinf(self._one[0].logit)

    def sample(self, ctx, idx: int = -1) -> int:
        token = self._draw(ctx, idx, constrained=False)
        if not self._grammar_allows(token):
            token = self._draw(ctx, idx, constrained=True)
        self._lib.llama_sampler_accept(self.grammar, token)
        self._lib.llama_sampler_accept(self.chain.sampler, token)
        return token

    def __del__(self):
        if getattr(self, "grammar", None):
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None


def grammar_llama_class():
    """`llama_cpp.Llama` with grammars sampled as above (imported lazily: llama.cpp may be missing)."""
    from llama_cpp import Llama

    class GrammarLlama(Llama):
        def _init_sampler(self, *args, grammar=None, **kwargs):
            chain = super()._init_sampler(*args, grammar=None, **kwargs)
            return chain if grammar is None else GrammarSampler(self, chain, grammar)

    return GrammarLlama
