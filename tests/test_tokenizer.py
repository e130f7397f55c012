"""tokenizer.py: sentencepiece and tokenizer.json backends, BOS/EOS rules, streaming decode."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apex_mini.tokenizer import StreamDecoder, Tokenizer

from conftest import BOS_ID, EOS_ID, VOCAB_SIZE, corpus_lines

TEXTS = ["Hello world.", "héllo 世界 🙂", "  two  spaces and a\nnewline\t tab", "café 42 über",
         "Kalo mishi, the anding!", "a"]


def _stream(tok: Tokenizer, ids, prompt_ids=()) -> list[str]:
    dec = StreamDecoder(tok, prompt_ids)
    deltas = [dec.push(i) for i in ids]
    return deltas + [dec.flush()]


@pytest.fixture(scope="module")
def spm_tok(spm_model_path, tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("spm_dir")
    shutil.copy(spm_model_path, d / "tokenizer.model")
    return Tokenizer.from_dir(d)


# --- sentencepiece (Llama-2) -----------------------------------------------------------------

def test_spm_ids(spm_tok):
    assert spm_tok.bos_id == BOS_ID and spm_tok.eos_ids == (EOS_ID,)
    assert spm_tok.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize("text", TEXTS)
def test_spm_round_trip_bos_first_no_eos(spm_tok, text):
    ids = spm_tok.encode(text)
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:] and EOS_ID not in ids
    assert spm_tok.encode(text, add_bos=False) == ids[1:]
    assert spm_tok.decode(ids) == text


def test_spm_decode_skips_specials_and_out_of_vocab_ids(spm_tok):
    ids = spm_tok.encode("Hello world.", add_bos=False)
    assert spm_tok.decode([BOS_ID] + ids + [EOS_ID, VOCAB_SIZE + 5, 0]) == "Hello world."


def test_spm_multibyte_uses_byte_fallback(spm_tok):
    ids = spm_tok.encode("🙂", add_bos=False)
    assert len(ids) >= 4          # the emoji is not in the tiny vocabulary: 4 byte pieces
    assert spm_tok.decode(ids) == "🙂"


@pytest.mark.parametrize("text", TEXTS)
def test_spm_stream_joins_to_decode_and_never_splits_characters(spm_tok, text):
    ids = spm_tok.encode(text, add_bos=False)
    deltas = _stream(spm_tok, ids)
    assert "".join(deltas) == spm_tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_spm_stream_holds_back_partial_characters(spm_tok):
    ids = spm_tok.encode("a🙂", add_bos=False)
    deltas = _stream(spm_tok, ids)
    assert deltas[-1] == ""                       # nothing left at flush
    assert deltas[-2] == "🙂"                      # emitted whole, by its last byte
    assert deltas[-3] == deltas[-4] == deltas[-5] == ""   # ...and nothing before that


def test_spm_stream_after_prompt_keeps_the_leading_space(spm_tok):
    prompt = spm_tok.encode("Hello")
    generated = spm_tok.encode("Hello world and 世界", add_bos=False)[len(prompt) - 1:]
    text = "".join(_stream(spm_tok, generated, prompt_ids=prompt))
    assert text == " world and 世界"
    assert "".join(_stream(spm_tok, generated)) == "world and 世界"   # decode() drops it


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdeklmnoprst .,!?\n0123456789") +
                                        ["é", "ü", "世", "界", "🙂", "ß", "ж"]), max_size=40))
def test_spm_stream_property(spm_model_path, text):
    tok = Tokenizer.from_dir(spm_model_path.parent)
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert "".join(_stream(tok, ids)) == text


def test_eos_ids_merge_config_and_generation_config(spm_model_path, tmp_path):
    shutil.copy(spm_model_path, tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    tok = Tokenizer.from_dir(tmp_path, eos_ids=[11])
    assert tok.eos_ids == (2, 11, 7, 9)


def test_checkpoint_fixture_folder_has_a_tokenizer(mha_ckpt):
    tok = Tokenizer.from_dir(mha_ckpt)
    assert tok.bos_id == BOS_ID and tok.eos_ids == (EOS_ID,) and tok.vocab_size == VOCAB_SIZE


# --- tokenizer.json (Llama-3 style byte-level BPE) -------------------------------------------

BOT, EOT = "<|begin_of_text|>", "<|end_of_text|>"


def _train_bpe_json(path, with_post_processor: bool = True):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=400, special_tokens=[BOT, EOT],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    if with_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOT} $A", pair=f"{BOT} $A {BOT} $B", special_tokens=[(BOT, 0)])
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    _train_bpe_json(d / "tokenizer.json")
    return d


def test_tokenizer_json_adds_bos_once_via_post_processor(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    assert tok.bos_id == 0 and tok.vocab_size == 400
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 0 and 0 not in ids[1:] and 1 not in ids
        assert tok.decode(ids) == text
    assert tok.encode(BOT + "Hello") == tok.encode("Hello")      # BOS already there: not doubled
    assert tok.encode("Hello", add_bos=False)[0] != 0


def test_tokenizer_json_config_names_bos_and_eos(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": BOT}, "eos_token": EOT}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == 0 and tok.eos_ids == (1, 5)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOT,
                                                                 "add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path).encode("Hello")[0] != 0


def test_tokenizer_json_without_post_processor_adds_no_bos(tmp_path):
    _train_bpe_json(tmp_path / "tokenizer.json", with_post_processor=False)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello") == tok.encode("Hello", add_bos=False)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_json_stream(bpe_dir, text):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode(text, add_bos=False)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_prefers_sentencepiece_and_falls_back_to_json(bpe_dir, spm_model_path, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model (tiktoken, say)")
    assert Tokenizer.from_dir(tmp_path).vocab_size == 400
    shutil.copy(spm_model_path, tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path).vocab_size == VOCAB_SIZE


# --- errors ----------------------------------------------------------------------------------

def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_bad_sentencepiece_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizers_package_missing(bpe_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)     # makes `import tokenizers` fail
    with pytest.raises(ValueError, match="pip install tokenizers"):
        Tokenizer.from_dir(bpe_dir)
