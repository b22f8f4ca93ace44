import math

import pytest
import torch

from longtrain.config import ModelConfig, RopeConfig
from longtrain.hf import hf_name
from longtrain.model.transformer import Transformer


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, **overrides})
    return Transformer(cfg, RopeConfig(theta=10000.0), vocab_size=97).double()


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_gqa_shapes_and_param_count(n_kv_heads):
    model = small_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 97, (2, 24))
    pos = torch.arange(24).expand(2, -1)
    assert model(ids, pos).shape == (2, 24, 97)
    assert model.layers[0].attention.wk.weight.shape == (n_kv_heads * 16, 64)


def test_matches_hf_qwen3_logits():
    """Independent reference: HF Qwen3 has the same architecture (GQA, per-head QK-norm, SwiGLU)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = small_model()
    hf_cfg = Qwen3Config(
        vocab_size=97, hidden_size=64, intermediate_size=model.cfg.resolved_ffn_dim(), num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
    )
    hf = Qwen3ForCausalLM(hf_cfg).double().eval()
    hf_sd = {hf_name(k): v for k, v in model.state_dict().items()}
    hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    hf.load_state_dict(hf_sd)
    ids = torch.randint(0, 97, (2, 40))
    pos = torch.arange(40).expand(2, -1)
    # HF's Qwen3RMSNorm computes in float32 even for float64 inputs, hence 1e-6, not 1e-10.
    torch.testing.assert_close(model(ids, pos), hf(ids).logits, rtol=1e-6, atol=1e-6)


def test_causal():
    model = small_model()
    ids = torch.randint(0, 97, (1, 30))
    pos = torch.arange(30)[None]
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1) % 97
    a, b = model(ids, pos), model(changed, pos)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_positions_are_explicit_and_relative():
    """Global positions come in explicitly: shifting all of them leaves RoPE attention unchanged,
    while permuting them changes it; NoPE layers ignore positions entirely."""
    ids = torch.randint(0, 97, (1, 16))
    pos = torch.arange(16)[None]
    model = small_model()
    # Angles are float32 (as in HF), so a large shift costs ~1e-7·shift radians: keep it small.
    torch.testing.assert_close(model(ids, pos), model(ids, pos + 100), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(ids, pos), model(ids, pos.flip(-1)))
    nope = small_model(nope_every=1)
    assert not any(block.attention.use_rope for block in nope.layers)
    torch.testing.assert_close(nope(ids, pos), nope(ids, pos.flip(-1)))
    every_2nd = small_model(n_layers=4, nope_every=2)
    assert [b.attention.use_rope for b in every_2nd.layers] == [True, False, True, False]


def test_logn_attention_changes_only_positions_past_the_original_length():
    """Queries at 1-based positions ≤ L keep scale 1: their outputs equal plain RoPE's exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, nope_every=2)
    plain = Transformer(cfg, RopeConfig(original_max_position_embeddings=16), vocab_size=97).double()
    logn = Transformer(cfg, RopeConfig(original_max_position_embeddings=16, logn_attention=True), vocab_size=97).double()
    logn.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (2, 40))
    pos = torch.arange(40)[None].expand(2, -1)
    a, b = plain(ids, pos), logn(ids, pos)
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=0, atol=0)
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_qk_norm_switch_and_untied_head():
    plain = small_model(qk_norm=False, tie_embeddings=False)
    attn = plain.layers[0].attention
    assert attn.q_norm is None and attn.k_norm is None
    assert plain.output is not None and plain.output_weight() is not plain.tok_embeddings.weight
    tied = small_model()
    assert tied.output_weight() is tied.tok_embeddings.weight
    assert "rotary.inv_freq" not in tied.state_dict()  # derived from config, never stored


def test_scaled_init():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, init_std=0.02)
    model = Transformer(cfg, RopeConfig(), vocab_size=300)
    wo = model.layers[0].attention.wo.weight
    wq = model.layers[0].attention.wq.weight
    assert wq.std().item() == pytest.approx(0.02, rel=0.05)
    assert wo.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_loss_path_equals_logits_path():
    model = small_model()
    ids = torch.randint(0, 97, (2, 33))
    labels = torch.randint(0, 97, (2, 33))
    pos = torch.arange(33).expand(2, -1)
    sums = model(ids, pos, labels, loss_chunk_size=10)
    ref = torch.nn.functional.cross_entropy(model(ids, pos).reshape(-1, 97), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(sums.ce.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nope_every", [0, 2])
def test_document_masking_isolates_packed_documents(nope_every):
    """With doc ids and per-document positions, a packed document's logits equal those of
    the document alone: nothing crosses a boundary, in any layer."""
    model = small_model(nope_every=nope_every)
    lengths = [7, 1, 12, 4]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    ids = torch.cat(docs, 1)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, positions, doc_ids=doc_ids)
    alone = torch.cat([model(d, torch.arange(d.shape[1])[None]) for d in docs], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    unmasked = model(ids, positions)
    assert not torch.allclose(unmasked[:, lengths[0] :], alone[:, lengths[0] :])  # masking is what isolates them
