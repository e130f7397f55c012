"""The packed model (packed_model.py), which the engine runs on every step, against model.py's
reference layers; and the engine really running it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from apex_mini import LLM, SamplingParams, packed_linear
from apex_mini.packed_model import PackedLayer, PackedModel
from apex_mini.weights import MODEL_SHAPES, random_model

from conftest import mixed_prompts

COPIED_LAYOUTS = [packed_linear.TRANSPOSED,
                  pytest.param(packed_linear.ONEDNN, marks=pytest.mark.skipif(
                      not packed_linear.available(), reason="needs oneDNN"))]


def _run_both(model, net, rows: int = 7):
    """Embed, each layer's two halves (a random attention output between them, the same for
    both) and the logits, side by side: yields (what, reference, packed) pairs."""
    cfg = model.config
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, cfg.vocab_size, (rows,), generator=g)
    positions = torch.randint(0, cfg.max_position_embeddings, (rows,), generator=g)
    with torch.inference_mode():
        h_ref, cos_ref, sin_ref = model.embed(ids, positions)
        h, cos, sin = net.embed(ids, positions)
        yield "embed", h_ref, h
        for ref_layer, layer in zip(model.layers, net.layers):
            for what, a, b in zip("qkv", ref_layer.pre_attention(h_ref, cos_ref, sin_ref),
                                  layer.pre_attention(h, cos, sin)):
                yield f"layer {layer.layer_idx} {what}", a, b
            attn = torch.randn(rows, cfg.num_attention_heads, cfg.head_dim,
                               generator=g).to(h.dtype)
            h_ref, h = ref_layer.post_attention(h_ref, attn), layer.post_attention(h, attn)
            yield f"layer {layer.layer_idx} out", h_ref, h
        yield "logits", model.logits(h_ref), net.logits(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain_packed_model_gives_the_models_bits(dtype):
    """On the model's own weights (the GPU's layout) every stage equals model.py's bit for bit:
    the stacked product is the three products side by side, RoPE's roll is a sign flip away
    from rotate_half, the norms are the same ops (torch's fused one in fp32). (On the CPU this
    needs an MLP width that is a multiple of 32, as here: SiLU over gate, a view into the
    stacked gate/up rows, runs row by row, and a row's last width % 32 elements take the scalar
    tail of the vector loop, which rounds differently; the next test covers such a width.)"""
    model = random_model("tiny", dtype, "cpu", seed=1)
    assert model.config.intermediate_size % 32 == 0
    net = PackedModel(model, packed_linear.PLAIN)
    assert len(net.layers) == model.config.num_hidden_layers
    for what, ref, packed in _run_both(model, net):
        assert ref.shape == packed.shape and ref.dtype == packed.dtype, what
        assert torch.equal(ref, packed), what


@pytest.mark.parametrize("layout", [packed_linear.PLAIN, *COPIED_LAYOUTS])
def test_packed_model_agrees_with_the_model_in_fp32(layout):
    """The shipped model's shape (MLP width 688): on a laid-out copy of the weights the
    products' summation order differs, and SiLU's vector-loop tail rounds the last 16 of each
    row differently: fp32 rounding, far below any token decision."""
    shape = dataclasses.replace(MODEL_SHAPES["tiny"], hidden_size=256, intermediate_size=688,
                                num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    model = random_model(shape, torch.float32, "cpu", seed=2)
    net = PackedModel(model, layout)
    for what, ref, packed in _run_both(model, net, rows=17):
        scale = ref.abs().max().item()
        assert (ref - packed).abs().max().item() <= 1e-5 * max(1.0, scale), what


def test_engine_layer_loop_runs_the_packed_model_and_matches_the_reference(gqa_llama3_ckpt):
    """Prefill chunks and host rows go through the layer loop, which runs the decode step's
    packed model; with the fast path off it runs model.py's layers. Static placement over
    mixed lengths (prefill chunked across steps, half the requests on the host tier) gives the
    reference's tokens, and the packed layers really ran."""
    prompts = mixed_prompts(384, (5, 17, 33, 2, 48, 9))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for fast in (True, False):
        llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="static",
                  cpu_fraction=0.5, max_num_batched_tokens=32)
        runner = llm.engine.runner
        if fast:
            assert runner.net is runner.decode_step.loop_model
            assert all(isinstance(layer, PackedLayer) for layer in runner.net.layers)
            calls = []
            layer0 = runner.net.layers[0]
            original = layer0.pre_attention
            layer0.pre_attention = lambda *a: calls.append(a[0].shape[0]) or original(*a)
        else:
            runner.decode_step = None
            assert runner.net is llm.engine.model
        outputs[fast] = [o.token_ids for o in llm.generate(prompts, params)]
        llm.close()
    assert calls and max(calls) > 1            # the loop ran it, prefill chunks included
    assert outputs[True] == outputs[False]
