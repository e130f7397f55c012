"""Tokenizer: Llama-2's sentencepiece `tokenizer.model`, or a Hugging Face `tokenizer.json`
(Llama-3) through the optional `tokenizers` package, behind one small interface.

The engine works in token ids; text appears only at the edges: `encode` a prompt, `decode` a
result, and `StreamDecoder` for printing tokens as they arrive.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .config import parse_eos_ids


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object of "
                         "fields; re-save the checkpoint")
    return data


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids. `bos_id` may be None (no BOS); `eos_ids` are all ids that end a
    generation: the tokenizer's own plus those in config.json and generation_config.json."""

    def __init__(self, backend: "_SentencePiece | _HFTokenizers", extra_eos_ids: Iterable[int] = ()):
        self._backend = backend
        self.bos_id: int | None = backend.bos_id
        eos = list(backend.eos_ids) + [i for i in extra_eos_ids if i is not None]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))   # ordered, no repeats
        self.vocab_size: int = backend.vocab_size

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, eos_ids: Iterable[int] = ()) -> "Tokenizer":
        """`tokenizer.model` (sentencepiece) if present, else `tokenizer.json`. EOS ids from the
        folder's config.json and generation_config.json are merged in, with `eos_ids`."""
        root = Path(model_dir)
        extra = list(eos_ids)
        for path in (root / "generation_config.json", root / "config.json"):
            extra += parse_eos_ids(_read_json(path).get("eos_token_id"), repr(str(path)))
        spm_file, json_file = root / "tokenizer.model", root / "tokenizer.json"
        if spm_file.is_file():
            try:
                return cls(_SentencePiece(spm_file), extra)
            except ValueError:
                # Meta's Llama-3 ships a tiktoken file under the same name; tokenizer.json
                # describes the same vocabulary.
                if not json_file.is_file():
                    raise
        if json_file.is_file():
            return cls(_HFTokenizers(root, json_file), extra)
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {str(root)!r}; copy the "
                                "tokenizer files that came with the checkpoint into that folder")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when the tokenizer uses one (never twice), and
        never EOS."""
        ids = self._backend.encode(text)
        if add_bos and self._backend.adds_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special tokens (and ids past the tokenizer's vocabulary,
        which a model with a padded embedding table can produce)."""
        return self._backend.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def stream(self, prompt_ids: Iterable[int] = ()) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids)

    def continuation(self, prompt_ids: Iterable[int], ids: Iterable[int]) -> str:
        """The text of `ids` as it continues the prompt (" world" after "Hello"): what
        `stream(prompt_ids)` emits for them, in one piece."""
        decoder = self.stream(prompt_ids)
        return "".join(decoder.push(i) for i in ids) + decoder.flush()


class StreamDecoder:
    """Turns generated ids, fed one at a time, into text deltas.

    Decoding one token alone is wrong in two ways: sentencepiece drops a piece's leading space
    at the start of a string, and a character split over several byte tokens decodes to
    U+FFFD halves. So each step decodes a short window that starts at an already-printed
    token, emits what the window gained, and holds text back while it ends in U+FFFD.

    Without `prompt_ids` the deltas join to exactly `decode(generated ids)` (so the first
    token loses its leading space, as there) whenever those ids decode to valid UTF-8. (Where
    a model samples byte tokens that do not, a tokenizer.json whose decoder replaces a whole
    invalid byte run may also replace bytes the stream has already printed.) With them, the
    last few prompt ids serve as context and the deltas are the text that continues the printed
    prompt (" world" after "Hello").
    """

    CONTEXT = 6   # prompt ids kept as context: enough to cover one multi-byte character

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self._ids: list[int] = [int(i) for i in prompt_ids][-self.CONTEXT:]
        self._prefix = 0               # window start: its text is already emitted
        self._read = len(self._ids)    # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Feed one id; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        done = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Text still held back at the end (an unfinished character shows as U+FFFD)."""
        done = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

class _SentencePiece:
    """Llama-2: BOS on every prompt, EOS never added (the model emits it)."""

    adds_bos = True

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{str(path)!r} is not a sentencepiece model ({e}); re-download "
                             "the tokenizer") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = (self.sp.eos_id(),) if self.sp.eos_id() >= 0 else ()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # sentencepiece drops control pieces (BOS, EOS, PAD) itself; UNK would print " ⁇ ".
        return self.sp.decode([i for i in ids if not self.sp.is_unknown(i)])


class _HFTokenizers:
    """A `tokenizer.json`. Encoding never runs the post-processor (it may add EOS, or BOS a
    second time); BOS is added by `Tokenizer.encode` when tokenizer_config.json's
    `add_bos_token` says so or, lacking that, when the post-processor would add it."""

    def __init__(self, root: Path, path: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError(f"{str(path)!r} needs the optional 'tokenizers' package; "
                             "pip install tokenizers") from None
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise ValueError(f"{str(path)!r} is not a valid tokenizer.json ({e}); re-download "
                             "the tokenizer") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        tcfg = _read_json(root / "tokenizer_config.json")
        mcfg = _read_json(root / "config.json")

        bare = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        post_bos = full[0] if len(full) > len(bare) and full[1:1 + len(bare)] == bare else None

        bos_text = _token_text(tcfg.get("bos_token"))
        self.bos_id = (self.tok.token_to_id(bos_text) if bos_text else None)
        if self.bos_id is None:
            self.bos_id = post_bos if post_bos is not None else mcfg.get("bos_token_id")
        self.adds_bos = bool(tcfg.get("add_bos_token", post_bos is not None))

        eos_text = _token_text(tcfg.get("eos_token"))
        eos_id = self.tok.token_to_id(eos_text) if eos_text else None
        self.eos_ids = (eos_id,) if eos_id is not None else ()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
