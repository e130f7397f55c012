"""`python -m apex_mini.generate`: write text with the shipped model or any LLaMA checkpoint.

    python -m apex_mini.generate                                  # default model and prompt
    python -m apex_mini.generate --prompt "Once upon a time" --max-new-tokens 100
    python -m apex_mini.generate --model /path/to/Llama-2-7b-hf --prompts-file prompts.txt

One prompt streams its tokens as they come; several run as one continuous batch.
"""
from __future__ import annotations

import argparse
import sys
import time

from .cli import ArgumentParser, run_cli
from .config import DEFAULT_MODEL_DIR, EngineConfig
from .llm import LLM
from .sampling import SamplingParams

DEFAULT_PROMPT = "Once upon a time"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.generate",
                       description="Generate text with a LLaMA checkpoint.")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR,
                   help="model folder in Hugging Face layout (default: the shipped tiny model)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"a prompt; repeat for several (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompts-file", default=None, help="a UTF-8 text file with one prompt per "
                   "line (blank lines skipped; default: none)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens; 0 = off (default: %(default)s)")
    # The requests' seed. The engine's own --seed (the one unseeded requests derive theirs
    # from) is deliberately not a flag here: two flags of one name would be a puzzle.
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling, the same for every prompt (default: a fixed seed per "
                        "prompt, so runs repeat: give one to vary the text; the engine's own "
                        "--seed, which fixes those, stays at its default)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence "
                   "(default: off)")
    EngineConfig.add_cli_flags(p, skip=("seed",))
    return p


# generate's flag for each SamplingParams field, to name in its errors.
SAMPLING_FLAGS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature",
                  "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}


def sampling_params(args) -> SamplingParams:
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                              seed=args.seed)
    except ValueError as e:                  # "max_tokens=0 must be ..." -> "--max-new-tokens 0 ..."
        field, _, rest = str(e).partition("=")
        if field not in SAMPLING_FLAGS:
            raise
        raise ValueError(f"{SAMPLING_FLAGS[field]} {rest}") from None


def read_prompts(args) -> list[tuple[str, str]]:
    """(where it came from, for messages; text) of every prompt: the --prompt flags in order,
    then the lines of --prompts-file that hold any text."""
    given = args.prompt or []
    alone = len(given) == 1 and not args.prompts_file
    prompts = [("the prompt" if alone else f"--prompt number {i}", text)
               for i, text in enumerate(given, start=1)]
    if args.prompts_file:
        path = args.prompts_file
        try:
            with open(path, encoding="utf-8") as f:
                prompts += [(f"line {n} of {path}", line.rstrip("\n"))
                            for n, line in enumerate(f, start=1) if line.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(f"prompts file {path!r} not found") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts file {path!r} is not UTF-8 text (byte {e.start}); save "
                             "it as UTF-8") from None
        except OSError as e:                                      # a folder, no permission, ...
            raise ValueError(f"prompts file {path!r} cannot be read: {e.strerror}") from None
        if not prompts:
            raise ValueError(f"prompts file {args.prompts_file!r} holds no prompts")
    return prompts or [("the prompt", DEFAULT_PROMPT)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = sampling_params(args)
    labelled = read_prompts(args)
    llm = LLM(args.model, **vars(EngineConfig.from_cli(args)))
    prompts, token_ids = [text for _, text in labelled], []
    for where, text in labelled:             # each named as the user gave it, before any runs
        token_ids.append(llm.encode(text, where))
        llm.engine.check_request(token_ids[-1], params, where)
    start = time.perf_counter()
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        n_tokens = 0
        for token, piece in llm.stream(token_ids[0], params):
            n_tokens += token is not None
            print(piece, end="", flush=True)
        print()
    else:
        outs = llm.generate(token_ids, params, use_tqdm=True)
        for prompt, out in zip(prompts, outs):
            print(f"--- {prompt}{out.text}")
        n_tokens = sum(len(o.token_ids) for o in outs)
    seconds = time.perf_counter() - start
    print(f"[{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tok/s, "
          f"policy {llm.engine.policy_name}, {llm.engine.device}, {str(llm.engine.dtype)[6:]}]",
          file=sys.stderr)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
