"""The Python API, in vLLM's shape:

    llm = LLM("weights/apex-tiny-llama", device="auto", dtype="auto", policy="static")
    outs = llm.generate(["Once upon a time", [1, 450, 2]], SamplingParams(temperature=0.0))
    outs[0].text, outs[0].token_ids          # the generated part only
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence as Seq

from tqdm import tqdm

from .config import DEFAULT_MODEL_DIR, EngineConfig
from .engine import Engine, load_engine
from .sampling import SamplingParams
from .sequence import Sequence

Prompt = str | list[int]


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_preemptions: int = 0
    num_swaps: int = 0


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL_DIR, **engine_options):
        self.config = EngineConfig.from_kwargs(**engine_options)
        self.engine: Engine = load_engine(str(model), self.config)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: Engine) -> "LLM":
        llm = cls.__new__(cls)
        llm.config, llm.engine, llm.tokenizer = engine.cfg, engine, engine.tokenizer
        return llm

    # ---------------------------------------------------------------- input checks

    def encode(self, prompt: Prompt, index: int = 0) -> list[int]:
        """Text (or a token-id list) -> token ids; `Engine.check_request` checks the ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"prompt {index} is empty; give some text or token ids")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one "
                             "per prompt")
        return params

    # ---------------------------------------------------------------- generation

    def submit(self, prompts: Seq[Prompt], sampling_params=None) -> list[Sequence]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = self._params_list(sampling_params, len(prompts))
        ids = [self.encode(p, i) for i, p in enumerate(prompts)]
        for i, (t, p) in enumerate(zip(ids, params)):                # check all before adding any
            self.engine.check_request(t, p, f"prompt {i}")
        return [self.engine.add_request(t, p) for t, p in zip(ids, params)]

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params=None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        text_prompts = [prompts] if single else list(prompts)
        seqs = self.submit(text_prompts, sampling_params)
        bar = tqdm(total=len(seqs), desc="requests", disable=not use_tqdm)
        while self.engine.has_work():
            _, finished = self.engine.step()
            bar.update(len(finished))
        bar.close()
        return [self._output(p, s) for p, s in zip(text_prompts, seqs)]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None
               ) -> Iterator[tuple[int | None, str]]:
        """Yield (token id, new text) for one request as tokens come; a last (None, text) flushes
        any bytes still held back (an unfinished multi-byte character). The texts continue the
        prompt: printed after it, they read as the decoded prompt + output."""
        (seq,) = self.submit([prompt], sampling_params)
        # The prompt's last ids as context: the first piece keeps its leading space (" was"
        # after "Lily and Ben"), which decoding it alone would drop.
        decoder = (self.tokenizer.stream(seq.token_ids[:seq.prompt_len])
                   if self.tokenizer is not None else None)
        seen = 0
        while self.engine.has_work():
            self.engine.step()
            for token in seq.output_ids[seen:]:
                yield token, (decoder.push(token) if decoder else f"{token} ")
            seen = seq.num_output
        if decoder:
            yield None, decoder.flush()

    def _output(self, prompt: Prompt, seq: Sequence) -> RequestOutput:
        out_ids = seq.output_ids
        text = self.tokenizer.decode(out_ids) if self.tokenizer is not None else ""
        return RequestOutput(prompt if isinstance(prompt, str) else None,
                             seq.token_ids[:seq.prompt_len], text, out_ids, seq.finish_reason,
                             seq.num_preemptions, seq.num_swaps)

    def close(self) -> None:
        self.engine.close()
