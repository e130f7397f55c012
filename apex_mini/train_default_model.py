"""Train the project's shipped default model, `weights/apex-tiny-llama`, from nothing.

Nothing is downloaded: a seeded generator writes simple children's stories (in the spirit of
TinyStories), a sentencepiece tokenizer is trained on them, and a few-million-parameter LLaMA
(`apex_mini.model.LlamaForCausalLM`, grouped-query attention, untied embeddings) learns them on
the CPU under a time budget. The result is saved in Hugging Face layout and checked against
transformers' own LlamaForCausalLM.

    python -m apex_mini.train_default_model                 # ~20 minutes on 2 CPU cores; rewrites
                                                            # the shipped weights/apex-tiny-llama
    python -m apex_mini.train_default_model --quick --out /tmp/tiny   # under a minute, for tests
                                                            # (--quick requires --out)

Every flag is checked before any work starts: bad input is one line on stderr and exit status 2.

The corpus generator is `stories.py`; this file is split by banner comments: tokenizer,
training, checkpoint, main.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cli import ArgumentParser, run_cli
from .config import DEFAULT_MODEL_DIR, ModelConfig
from .model import LlamaForCausalLM
from .stories import build_corpus

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
# The smallest vocabulary sentencepiece accepts for the full story corpus: the 3 specials, the
# 256 byte-fallback pieces and the 58 characters `stories.py` writes (character_coverage=1.0
# makes each one a piece). A smaller corpus may need fewer; sentencepiece's own complaint is
# still turned into a one-line error if the generator ever writes more characters.
MIN_VOCAB_SIZE = 3 + 256 + 58
# What a run writes into --out (the files it may overwrite).
OUT_FILES = ("config.json", "generation_config.json", "tokenizer.model", "model.safetensors",
             "README.md")
MODEL_CARD_TITLE = "# apex-tiny-llama"      # the first line of the README.md a run writes


# ============================================================================ options

def _opt(default, help: str, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainOptions:
    """Every option of this script; the command-line flags are generated from these fields."""

    out: str = _opt(DEFAULT_MODEL_DIR, "output folder for the Hugging Face checkpoint. A full run "
                    "writes the shipped model folder by default (retraining the shipped model is "
                    "its purpose); --quick requires an explicit --out, so that it can never "
                    "overwrite the shipped model. A folder holding a README.md, config.json, ... "
                    "of anything but a checkpoint this script wrote is refused, not overwritten")
    minutes: float = _opt(20.0, "wall-clock budget for the training loop, in minutes")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: only the time budget)")
    quick: bool = _opt(False, "tiny corpus, tiny model, a few seconds of training, for tests: "
                       "every size and step flag not given takes a small value; requires --out")
    seed: int = _opt(0, "seed for the corpus, the initial weights and the batch order")
    num_stories: int = _opt(40000, "stories to generate (about 550 characters each)")
    val_fraction: float = _opt(0.02, "share of stories held out for validation")
    vocab_size: int = _opt(2048, "sentencepiece vocabulary size, bytes and specials included "
                           f"(at least {MIN_VOCAB_SIZE})")
    hidden_size: int = _opt(256, "model width (a multiple of --num-attention-heads, with an even "
                            "quotient: the head size)")
    intermediate_size: int = _opt(688, "SwiGLU hidden width")
    num_hidden_layers: int = _opt(4, "decoder layers")
    num_attention_heads: int = _opt(8, "query heads")
    num_key_value_heads: int = _opt(4, "key/value heads (fewer than query heads: grouped-query; "
                                    "must divide --num-attention-heads)")
    max_position_embeddings: int = _opt(1024, "longest sequence the saved config allows, in tokens")
    seq_len: int = _opt(256, "training sequence length, in tokens (at most "
                        "--max-position-embeddings)")
    batch_size: int = _opt(8, "sequences per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _opt(50, "linear warm-up steps (0: none)")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value")
    amp: str = _opt("auto", "bfloat16 autocast while training: auto (when the CPU has native "
                    "bf16), on, off", choices=("auto", "on", "off"))
    save_dtype: str = _opt("auto", "dtype of the saved weights: auto (float32 if the checkpoint "
                           "fits --max-mb, else bfloat16), float32, bfloat16",
                           choices=("auto", "float32", "bfloat16"))
    max_mb: float = _opt(20.0, "size cap for model.safetensors plus tokenizer.model, in MB")
    eval_every: int = _opt(200, "steps between progress evaluations on a slice of the validation set")
    threads: int = _opt(2, "torch CPU threads")

    @classmethod
    def parser(cls, given_only: bool = False) -> argparse.ArgumentParser:
        """One flag per field. given_only: parse to the flags actually typed, no defaults."""
        p = ArgumentParser(prog="python -m apex_mini.train_default_model",
                           description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = argparse.SUPPRESS if given_only else f.default
            if f.type in ("bool", bool):
                p.add_argument(flag, action="store_true", default=default, help=f.metadata["help"])
            else:
                kind = {"int": int, "float": float}.get(str(f.type), str)
                p.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"],
                               help=f.metadata["help"])
        return p

    def with_quick_defaults(self, explicit: set[str]) -> "TrainOptions":
        """--quick shrinks everything the user did not set explicitly."""
        quick = dict(minutes=0.5, num_stories=1000, vocab_size=600, hidden_size=64,
                     intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, seq_len=128, batch_size=8, warmup_steps=10,
                     eval_every=20, max_steps=40)
        return dataclasses.replace(self, **{k: v for k, v in quick.items() if k not in explicit})

    def validate(self) -> None:
        """Raise ValueError, naming the flag, for any value that would fail later in the run."""
        def bad(name: str, need: str) -> ValueError:
            flag = "--" + name.replace("_", "-")
            return ValueError(f"{flag} {getattr(self, name)} {need}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
        at_least = dict(num_stories=2, vocab_size=MIN_VOCAB_SIZE, hidden_size=2, intermediate_size=1,
                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                        max_position_embeddings=1, seq_len=1, batch_size=1, eval_every=1,
                        threads=1, max_steps=0, warmup_steps=0, seed=0)
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise bad(name, f"must be at least {low}")
        if self.seed >= 2 ** 63:
            raise bad("seed", "must be below 2**63")
        for name in ("minutes", "lr", "grad_clip", "max_mb"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be greater than 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be at least 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be between 0 and 1")
        if not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "must be between 0 and 1 (exclusive), e.g. 0.02")
        n_val = max(1, round(self.num_stories * self.val_fraction))    # as stories.build_corpus
        if self.num_stories - n_val < 1:
            raise bad("num_stories", f"with --val-fraction {self.val_fraction} leaves no training "
                                     "stories; raise --num-stories or lower --val-fraction")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", "must divide --num-attention-heads "
                                             f"{self.num_attention_heads}")
        if self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", "must be a multiple of --num-attention-heads "
                                     f"{self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise bad("hidden_size", f"/ --num-attention-heads {self.num_attention_heads} = "
                                     f"{self.hidden_size // self.num_attention_heads} must be even "
                                     "(the head size, split in pairs by RoPE)")
        if self.seq_len > self.max_position_embeddings:
            raise bad("seq_len", "must be at most --max-position-embeddings "
                                 f"{self.max_position_embeddings}")


def check_out_folder(path: str) -> None:
    """Raise ValueError now, before the run, if the checkpoint folder `path` (made as needed)
    could not be written at the end, or holds files a run would overwrite that are not a
    checkpoint of this script (the shipped model's folder is one: retraining replaces it)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder")
    folder = out
    while not folder.exists():                        # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {path}: {folder} is a file, not a folder; give another path")
    unwritable = not os.access(folder, os.W_OK | os.X_OK) or any(
        (out / name).exists() and not os.access(out / name, os.W_OK) for name in OUT_FILES)
    if unwritable:
        raise ValueError(f"--out {path} cannot be written (permission denied); give another folder")
    held = [name for name in OUT_FILES if (out / name).exists()]
    if held and not holds_our_checkpoint(out):
        raise ValueError(f"--out {path} holds {', '.join(held)}, which a run would overwrite, "
                         "but no checkpoint this script wrote; give another folder (or delete "
                         "those files yourself)")


def holds_our_checkpoint(folder: Path) -> bool:
    """Does `folder` hold a checkpoint as this script saves it, which a new run may replace:
    model.safetensors, a config.json of model_type llama, and our model card as README.md (a
    folder from `save_pretrained` or a download has none, or its own)?"""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        card = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return ((folder / "model.safetensors").is_file() and isinstance(config, dict)
            and config.get("model_type") == "llama" and card.startswith(MODEL_CARD_TITLE))


def parse_options(argv: list[str]) -> TrainOptions:
    """The options of `argv`, --quick applied, every value checked (ValueError naming the flag)."""
    opts = TrainOptions(**vars(TrainOptions.parser().parse_args(argv)))
    explicit = set(vars(TrainOptions.parser(given_only=True).parse_args(argv)))
    if opts.quick:
        if "out" not in explicit:
            raise ValueError("--quick needs --out DIR (a scratch folder): without it the run would "
                             f"overwrite the shipped model in {DEFAULT_MODEL_DIR}")
        opts = opts.with_quick_defaults(explicit)
    try:
        opts.validate()
    except ValueError as e:
        if not opts.quick:
            raise
        raise ValueError(f"{e} (--quick gives small values to the flags not given)") from None
    check_out_folder(opts.out)
    return opts


# ============================================================================ tokenizer

def train_tokenizer(stories: list[str], vocab_size: int) -> bytes:
    """A Llama-style sentencepiece BPE model (serialized): byte fallback, so any text encodes;
    a dummy prefix space; no normalisation, so decode(encode(text)) == text."""
    import sentencepiece as spm

    # One paragraph per training sentence; "\n" itself is left to byte fallback, as in Llama.
    paragraphs = (p for story in stories for p in story.split("\n\n"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=paragraphs, model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=2, minloglevel=2)
    return model.getvalue()


def tokenizer_error(e: RuntimeError, vocab_size: int, num_train: int) -> ValueError | RuntimeError:
    """sentencepiece's complaint about the vocabulary size, as a one-line error naming the flag."""
    text = str(e)
    if m := re.search(r"Please set it to a value <= (\d+)", text):
        return ValueError(f"--vocab-size {vocab_size} is too large for {num_train} training stories: "
                          f"their text yields at most {m.group(1)} pieces; lower --vocab-size or "
                          "raise --num-stories")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", text):
        return ValueError(f"--vocab-size {vocab_size} is too small: this corpus needs at least "
                          f"{m.group(1)} (3 specials, 256 bytes and each character)")
    return e


def encode_documents(sp, stories: list[str]) -> list[list[int]]:
    """Each story as [BOS] + tokens + [EOS]: the EOS teaches the model to stop."""
    return [[BOS_ID, *ids, EOS_ID] for ids in sp.encode(stories)]


# ============================================================================ training

def init_weights(model: LlamaForCausalLM) -> None:
    """GPT-2 style: N(0, 0.02) everywhere, residual-branch outputs shrunk by sqrt(2 * layers)
    so the residual stream does not grow with depth at initialisation."""
    n_layers = model.config.num_hidden_layers
    residual_out = ("o_proj.weight", "down_proj.weight")
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(residual_out) else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)


class DocumentBatches:
    """Training windows of seq_len + 1 tokens that each start at a document's BOS, as prompts do
    at inference; the window runs on into the following documents."""

    def __init__(self, docs: list[list[int]], seq_len: int, batch_size: int, seed: int):
        self.tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long)   # [N]
        starts = torch.tensor([0] + [len(d) for d in docs[:-1]]).cumsum(0)
        self.starts = starts[starts + seq_len + 1 <= len(self.tokens)]                # [num_docs]
        self.offsets = torch.arange(seq_len + 1)                                       # [S+1]
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(self.starts), (self.batch_size,), generator=self.gen)
        window = self.tokens[self.starts[pick, None] + self.offsets]                   # [B, S+1]
        return window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, docs: list[list[int]], batch_size: int = 16) -> tuple[float, int]:
    """Mean negative log-likelihood per predicted token (nats) over whole documents, each read from
    its BOS alone: every token after BOS, the EOS included, is predicted. Returns (nll, tokens)."""
    model.eval()
    max_len = model.config.max_position_embeddings
    docs = sorted((d[:max_len + 1] for d in docs), key=len)
    total, count = 0.0, 0
    for i in range(0, len(docs), batch_size):
        group = docs[i:i + batch_size]
        width = max(len(d) for d in group)
        ids = torch.full((len(group), width), EOS_ID, dtype=torch.long)               # [B, S+1]
        mask = torch.zeros(len(group), width - 1, dtype=torch.bool)                    # [B, S]
        for row, d in enumerate(group):
            ids[row, :len(d)] = torch.tensor(d)
            mask[row, :len(d) - 1] = True
        logits = model.forward_dense(ids[:, :-1])                                      # [B, S, vocab]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")    # [B, S]
        total += nll[mask].sum().item()
        count += int(mask.sum())
    model.train()
    return total / count, count


def lr_at(opts: TrainOptions, step: int, progress: float) -> float:
    """Linear warm-up over steps, then a cosine over the run's progress (0..1): the schedule is
    tied to the clock, so it ends at the budget however fast this machine is."""
    warm = min(1.0, (step + 1) / max(1, opts.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return opts.lr * warm * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


def train(model: LlamaForCausalLM, batches: DocumentBatches, val_docs: list[list[int]],
          opts: TrainOptions, use_amp: bool) -> dict:
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    budget_s = opts.minutes * 60
    probe = val_docs[:64]
    step, clock, tokens, losses = 0, 0.0, 0, []
    bar = tqdm(total=round(budget_s), unit="s", desc="training", dynamic_ncols=True)
    while True:
        progress = clock / budget_s
        if opts.max_steps:
            progress = max(progress, step / opts.max_steps)
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(opts, step, progress)
        x, y = batches.next()                                                         # [B, S] each
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
            logits = model.forward_dense(x)                                           # [B, S, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        step += 1
        tokens += x.numel()
        losses.append(loss.item())  # one sync per step is fine here: the step is ~1 s of compute
        dt = time.perf_counter() - t0
        clock += dt
        bar.update(min(round(clock) - bar.n, bar.total - bar.n))
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        lr=f"{opt.param_groups[0]['lr']:.1e}", tok_s=f"{x.numel() / dt:.0f}")
        if step % opts.eval_every == 0:
            nll, _ = evaluate(model, probe)   # off the clock
            bar.write(f"step {step:5d}  train loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  "
                      f"val loss {nll:.3f} nats/token  ({clock:.0f} s, {tokens / 1e6:.2f} M tokens)")
    bar.close()
    return dict(steps=step, seconds=clock, tokens=tokens,
                final_train_loss=sum(losses[-50:]) / max(1, len(losses[-50:])))


@torch.no_grad()
def greedy(model: LlamaForCausalLM, sp, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation with the cache-free forward: slow in general, fine for a tiny model."""
    model.eval()
    ids = [BOS_ID, *sp.encode(prompt)]
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-model.config.max_position_embeddings:]])            # [1, S]
        nxt = int(model.forward_dense(x)[0, -1].argmax())
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    return sp.decode(ids[1:])


# ============================================================================ checkpoint

def hf_config(cfg: ModelConfig) -> dict:
    """config.json as transformers writes it for LlamaForCausalLM (classic field names)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "pad_token_id": None, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "torch_dtype": cfg.torch_dtype,
    }


def save_checkpoint(model: LlamaForCausalLM, sp_model: bytes, out: Path, dtype: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(model.config, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(sp_model)
    tensors = {k: v.detach().to(getattr(torch, dtype)).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_saved(out: Path) -> LlamaForCausalLM:
    """Our model, rebuilt from the files alone, in float32."""
    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf(out)
    model = LlamaForCausalLM(cfg)
    state = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def transformers_parity(out: Path, docs: list[list[int]]) -> float:
    """Max |logit difference| between transformers' LlamaForCausalLM and our forward_dense, both
    loaded from the saved files, on two held-out documents."""
    import transformers

    transformers.logging.set_verbosity_error()
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = load_saved(out)
    n = min(64, *(len(d) for d in docs[:2]))
    ids = torch.tensor([d[:n] for d in docs[:2]])                                    # [2, n]
    return (theirs(input_ids=ids).logits.float() - ours.forward_dense(ids)).abs().max().item()


def write_model_card(out: Path, report: dict) -> None:
    r = report
    parity = "not checked" if r["parity"] is None else f"{r['parity']:.1e}"
    (out / "README.md").write_text(f"""{MODEL_CARD_TITLE}

The default model of apex_mini: a {r['params'] / 1e6:.2f} M-parameter LLaMA that writes very
simple children's stories. It exists so that the engine, its tests and its benchmarks have a
real checkpoint to run with nothing downloaded: it is no good for anything else.

- Architecture: `LlamaForCausalLM`, {r['layers']} layers, hidden size {r['hidden']},
  {r['heads']} query heads sharing {r['kv_heads']} key/value heads (grouped-query attention),
  SwiGLU width {r['intermediate']}, RoPE theta 10000, untied embeddings, context {r['context']} tokens.
- Weights: {r['dtype']}, {r['weights_mb']:.1f} MB (`model.safetensors`).
- Tokenizer: sentencepiece BPE, {r['vocab']} pieces, byte fallback, BOS = 1, EOS = 2, UNK = 0.
- Corpus: {r['train_stories']} stories ({r['train_mb']:.1f} MB, {r['train_tokens'] / 1e6:.2f} M tokens)
  written by a seeded procedural generator in `apex_mini/stories.py` (TinyStories-like:
  named children and animals, places, objects, dialogue, a small plot, an ending or a moral).
  {r['val_stories']} further stories ({r['val_tokens']} tokens) are held out.
- Training: AdamW, cosine learning rate with warm-up, bfloat16 autocast: {r['amp']},
  {r['steps']} steps of {r['batch']} x {r['seq_len']} tokens ({r['seen_tokens'] / 1e6:.1f} M tokens)
  in {r['train_s'] / 60:.1f} min; the whole script took {r['total_s'] / 60:.1f} min.
- Held-out perplexity: **{r['ppl']:.3f}** per token ({r['nll']:.4f} nats/token).
- transformers parity: max |logit difference| {parity} against `transformers.LlamaForCausalLM`
  on held-out text, both loading these files in float32.
- Trained on: {r['machine']}, {r['date']}.

Reproduce (deterministic corpus and tokenizer; the weights depend on how many steps fit the
time budget):

    {r['command']}

Greedy samples:

""" + "\n".join(f"> {s}".replace("\n", "\n> ") + "\n" for s in r["samples"]))


# ============================================================================ main

PROMPTS = ("Once upon a time", "One day, a little", "Lily and Ben went to the park.")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when the model is saved; bad input is one line and status 2."""
    argv = sys.argv[1:] if argv is None else argv

    def run() -> int:
        train_default_model(parse_options(argv), argv)
        return 0
    return run_cli(run)


def train_default_model(opts: TrainOptions, argv: list[str]) -> dict:
    """Build the corpus, train the tokenizer and the model, save and check them (`opts` as
    `parse_options` returns them; `argv` is recorded in the model card). Returns the report."""
    import platform

    import sentencepiece as spm

    t_start = time.perf_counter()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    out = Path(opts.out)

    train_stories, val_stories = build_corpus(opts.num_stories, opts.val_fraction, opts.seed)
    train_mb = sum(len(s) for s in train_stories) / 1e6
    print(f"corpus: {len(train_stories)} training stories ({train_mb:.1f} MB), "
          f"{len(val_stories)} held out")
    try:
        sp_model = train_tokenizer(train_stories, opts.vocab_size)
    except RuntimeError as e:
        raise tokenizer_error(e, opts.vocab_size, len(train_stories)) from None
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    train_docs, val_docs = encode_documents(sp, train_stories), encode_documents(sp, val_stories)
    train_tokens = sum(len(d) for d in train_docs)
    print(f"tokenizer: {sp.vocab_size()} pieces; {train_tokens / 1e6:.2f} M training tokens "
          f"({train_mb * 1e6 / train_tokens:.2f} chars/token)")
    batches = DocumentBatches(train_docs, opts.seq_len, opts.batch_size, opts.seed)
    if len(batches.starts) == 0:
        raise ValueError(f"--seq-len {opts.seq_len} is longer than the whole training corpus "
                         f"({train_tokens} tokens); lower --seq-len or raise --num-stories")

    cfg = ModelConfig(
        vocab_size=sp.vocab_size(), hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size, num_hidden_layers=opts.num_hidden_layers,
        num_attention_heads=opts.num_attention_heads, num_key_value_heads=opts.num_key_value_heads,
        head_dim=opts.hidden_size // opts.num_attention_heads,
        max_position_embeddings=opts.max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = LlamaForCausalLM(cfg)
    init_weights(model)
    params = sum(p.numel() for p in model.parameters())
    use_amp = opts.amp == "on" or (opts.amp == "auto" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(f"model: {params / 1e6:.2f} M parameters; bf16 autocast {'on' if use_amp else 'off'}")

    stats = train(model, batches, val_docs, opts, use_amp)
    nll, val_tokens = evaluate(model, val_docs)
    ppl = math.exp(nll)
    print(f"held-out perplexity: {ppl:.3f} per token ({nll:.4f} nats/token over {val_tokens} tokens)")

    fits_fp32 = params * 4 + len(sp_model) <= opts.max_mb * 1e6
    dtype = opts.save_dtype if opts.save_dtype != "auto" else ("float32" if fits_fp32 else "bfloat16")
    save_checkpoint(model, sp_model, out, dtype)
    try:
        parity = transformers_parity(out, val_docs)
    except ImportError:   # transformers is an optional dependency of apex_mini
        parity = None
        print("transformers parity: skipped (transformers is not installed)")
    else:
        print(f"transformers parity: max |logit difference| {parity:.2e} (must be < 1e-4)")
        if parity >= 1e-4:
            raise SystemExit(f"saved checkpoint disagrees with transformers by {parity:.2e}")

    saved = load_saved(out)   # samples from the saved weights, as users will see them
    samples = [greedy(saved, sp, p, 60 if opts.quick else 250) for p in PROMPTS]
    for s in samples:
        print("-" * 72 + "\n" + s)
    report = dict(
        params=params, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        intermediate=cfg.intermediate_size, context=cfg.max_position_embeddings, dtype=dtype,
        weights_mb=(out / "model.safetensors").stat().st_size / 1e6, vocab=sp.vocab_size(),
        train_stories=len(train_stories), train_mb=train_mb, train_tokens=train_tokens,
        val_stories=len(val_stories), val_tokens=val_tokens, amp="on" if use_amp else "off",
        steps=stats["steps"], batch=opts.batch_size, seq_len=opts.seq_len,
        seen_tokens=stats["tokens"], train_s=stats["seconds"], ppl=ppl, nll=nll, parity=parity,
        machine=f"{platform.machine()} {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        date=time.strftime("%Y-%m-%d"), samples=samples,
        command="python -m apex_mini.train_default_model " + shlex.join(argv))
    report["total_s"] = time.perf_counter() - t_start
    write_model_card(out, report)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print("saved " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()) + f" in {out}")
    print(f"total time {report['total_s'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    sys.exit(main())
