"""The Python API, in vLLM's shape:

    llm = LLM("weights/apex-tiny-llama", device="auto", dtype="auto", policy="static")
    outs = llm.generate(["Once upon a time", [1, 450, 2]], SamplingParams(temperature=0.0))
    outs[0].text, outs[0].token_ids          # the generated part only
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence as Seq

from tqdm import tqdm

from .config import DEFAULT_MODEL_DIR, EngineConfig
from .engine import Engine, load_engine
from .sampling import SamplingParams
from .sequence import Sequence, Status

Prompt = str | list[int]


@dataclass
class RequestOutput:
    """One request's result. `text` is the generated part as it continues the prompt: printed
    after the prompt it reads right (its first word keeps its leading space)."""
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_preemptions: int = 0
    num_swaps: int = 0


def _is_token_id(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def as_prompt_list(prompts) -> list:
    """One prompt (text, or token ids as a list, tuple, tensor or array) or a list of them ->
    a list of prompts."""
    if hasattr(prompts, "tolist"):                    # a tensor or array: one row of ids, or rows
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and _is_token_id(prompts[0])):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be text, a list of token ids, or a list of those; got "
                         f"{type(prompts).__name__}")
    return list(prompts)


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

    def encode(self, prompt: Prompt, what: str = "the prompt") -> list[int]:
        """Text (or token ids: a list, tuple, tensor or array) -> token ids; the ids themselves
        are checked by `Engine.check_request`. `what` names the prompt in errors."""
        if hasattr(prompt, "tolist"):                 # a torch tensor or numpy array of ids
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"{what} is empty; give some text or token ids")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"{what} is {type(prompt).__name__}; give text or a list of "
                             "token ids")
        return [int(t) if _is_token_id(t) else t for t in prompt]   # numpy ints -> int

    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams)
                                                             for p in params):
            raise ValueError("sampling_params must be a SamplingParams or a list of them, one "
                             f"per prompt; got {params!r}")
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one "
                             "per prompt")
        return list(params)

    # ---------------------------------------------------------------- generation

    def submit(self, prompts: Prompt | Seq[Prompt], sampling_params=None) -> list[Sequence]:
        prompts = as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, (t, p) in enumerate(zip(ids, params)):                # check all before adding any
            self.engine.check_request(t, p, f"prompt {i}")
        return [self.engine.add_request(t, p) for t, p in zip(ids, params)]

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params=None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        text_prompts = as_prompt_list(prompts)
        seqs = self.submit(text_prompts, sampling_params)
        with self._aborted_on_error(seqs), tqdm(total=len(seqs), desc="requests",
                                                 disable=not use_tqdm) as bar:
            # Until this call's requests finish (others in the engine, a stream's, say, step
            # along with them and keep their tokens for their own caller).
            while not all(s.status is Status.FINISHED for s in seqs):
                _, finished = self.engine.step()
                bar.update(sum(s in seqs for s in finished))
        return [self._output(p, s) for p, s in zip(text_prompts, seqs)]

    @contextlib.contextmanager
    def _aborted_on_error(self, seqs: list[Sequence]):
        """An exception, Ctrl-C or an abandoned stream drops these requests, so that they do
        not run, unreturned, in the next call."""
        try:
            yield
        finally:
            for seq in seqs:
                self.engine.abort(seq)

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
        with self._aborted_on_error([seq]):
            # Until the request has finished and every token of it is yielded: other calls
            # made while this stream is paused (a generate(), another stream) step it too.
            while seen < seq.num_output or seq.status is not Status.FINISHED:
                if seen == seq.num_output:
                    self.engine.step()
                    continue
                token = seq.output_ids[seen]
                seen += 1
                yield token, (decoder.push(token) if decoder else f"{token} ")
        if decoder:
            yield None, decoder.flush()

    def _output(self, prompt: Prompt, seq: Sequence) -> RequestOutput:
        out_ids = seq.output_ids
        prompt_ids = seq.token_ids[:seq.prompt_len]
        text = self.tokenizer.continuation(prompt_ids, out_ids) if self.tokenizer is not None else ""
        return RequestOutput(prompt if isinstance(prompt, str) else None,
                             prompt_ids, text, out_ids, seq.finish_reason,
                             seq.num_preemptions, seq.num_swaps)

    def close(self) -> None:
        self.engine.close()
