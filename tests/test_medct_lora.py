"""Tests for medct_lora.py: BERT parity with transformers (goldens by tests/goldens/make_medct_goldens.py), CTViT
parity with CT-CLIP's own code (goldens by tests/goldens/make_ctclip.py), LoRA invariants, real-size counts and
key map on the meta device, zero-shot scoring and metrics, and end-to-end runs on the demo CT data."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import medct_lora as mc  # noqa: E402
from common.weights import WeightsError  # noqa: E402

GOLD = REPO / "tests" / "goldens"
TOL = 1e-5


def io(name):
    return load_file(str(GOLD / name / "io.safetensors"))


def max_diff(a, b):
    return (a - b).abs().max().item()

# ----------------------------------------------------------------------------------------------------------
# BERT vs HF BertModel (transformers 5.23, fp32, eval)


def test_bert_matches_hf_with_padding_token_types_and_pooler():
    g = io("medct_bert")
    assert (g["attention_mask"] == 0).any() and (g["token_type_ids"] == 1).any()  # the golden exercises both
    model = mc.BERT.from_pretrained(GOLD / "medct_bert", add_pooler=True).eval()
    with torch.no_grad():
        h, pooled = model(g["input_ids"], g["attention_mask"], g["token_type_ids"])
    assert max_diff(h, g["last_hidden_state"]) < TOL          # every position, padded ones included
    assert max_diff(pooled, g["pooler_output"]) < TOL
    assert model.cfg.eps == 1e-12 and model.cfg.dropout == 0.25


def test_bert_from_mlm_layout_and_transformers4_config():
    """BertForMaskedLM file ("bert." prefix, MLM head, no pooler) with a 4.x config.json, as CXR-BERT ships."""
    g = io("medct_bert")
    assert "position_embedding_type" in json.loads((GOLD / "medct_bert_mlm" / "config.json").read_text())
    model = mc.BERT.from_pretrained(GOLD / "medct_bert_mlm").eval()
    assert model.pooler is None
    with torch.no_grad():
        h, pooled = model(g["input_ids"], g["attention_mask"], g["token_type_ids"])
    assert pooled is None and max_diff(h, g["last_hidden_state"]) < TOL


def test_bert_pooler_requested_without_trained_pooler_is_refused():
    with pytest.raises(WeightsError, match="no trained pooler"):
        mc.BERT.from_pretrained(GOLD / "medct_bert_mlm", add_pooler=True)


def test_bert_sdpa_padding_mask_equals_dropping_the_padding():
    """The CLS state of a padded sentence equals that of the same sentence alone (padding is fully masked)."""
    g = io("medct_bert")
    model = mc.BERT.from_pretrained(GOLD / "medct_bert").eval()
    n = int(g["attention_mask"][0].sum())
    assert n < g["input_ids"].shape[1]
    with torch.no_grad():
        alone, _ = model(g["input_ids"][:1, :n])
        padded, _ = model(g["input_ids"][:1], g["attention_mask"][:1])
    assert max_diff(alone, padded[:, :n]) < TOL


@pytest.mark.parametrize("field,value", [("position_embedding_type", "relative_key"), ("is_decoder", True),
                                         ("add_cross_attention", True), ("hidden_act", "gelu_new"),
                                         ("embedding_size", 16)])
def test_bert_config_refuses_what_it_does_not_compute(field, value):
    hf = json.loads((GOLD / "medct_bert" / "config.json").read_text())
    mc.bert_config_from_hf(hf)
    with pytest.raises(WeightsError, match=field):
        mc.bert_config_from_hf(hf | {field: value})


def test_bert_blocks_can_be_replaced_after_construction():
    """Other method files wrap a sublayer (ALTA: an adapter after each post-LN sublayer) by assignment; the
    keys stay HF's."""
    cfg = mc.BertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, mlp_dim=32, max_positions=16)
    model = mc.BERT(cfg).init_random(0).eval()
    ids = torch.randint(0, 50, (2, 7))
    ref, _ = model(ids)

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden, input_tensor):
            return 2 * self.inner(hidden, input_tensor)

    model.encoder.layer[1].output = Doubled(model.encoder.layer[1].output)
    out, _ = model(ids)
    assert torch.allclose(out, 2 * ref, atol=1e-6)
    assert "encoder.layer.1.output.inner.dense.weight" in model.state_dict()

# ----------------------------------------------------------------------------------------------------------
# CTViT and CT-CLIP vs CT-CLIP's own code (commit a2a155c6, tiny sizes, fp32, eval; t = 6 != h = w = 4)


def tiny_ctclip():
    c = json.loads((GOLD / "ctclip_tiny" / "config.json").read_text())
    vcfg = mc.CTViTConfig(dim=c["dim"], image_size=c["image_size"], frames=c["frames"], patch_size=c["patch_size"],
                          temporal_patch_size=c["temporal_patch_size"], spatial_depth=c["spatial_depth"],
                          temporal_depth=c["temporal_depth"], heads=c["heads"], dim_head=c["dim_head"],
                          codebook_size=c["codebook_size"])
    tcfg = mc.bert_config_from_hf(json.loads((GOLD / "medct_bert" / "config.json").read_text()))
    return mc.CTCLIP.from_pretrained(GOLD / "ctclip_tiny" / "model.safetensors", vcfg, tcfg, c["dim_latent"]).eval()


def test_ctvit_blocks_match_official():
    model, g = tiny_ctclip(), io("ctclip_tiny")
    vit = model.visual
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o)) for layer in [*vit.spatial, *vit.temporal]]
    with torch.no_grad():
        assert max_diff(vit.patch_embed(g["video"]), g["patch_emb"]) < TOL
        assert max_diff(vit.rel_pos_bias(4, 4), g["rel_pos_bias"]) < TOL
        encoded = vit.encode(g["patch_emb"])
    for i, out in enumerate(outs[:2]):
        assert max_diff(out, g[f"spatial_layer_{i}"]) < TOL, f"spatial layer {i}"
    for i, out in enumerate(outs[2:]):
        assert max_diff(out, g[f"temporal_layer_{i}"]) < TOL, f"temporal layer {i}"   # PEG axis quirk included
    assert max_diff(encoded, g["encoded"]) < TOL
    for h in hooks:
        h.remove()


def test_vq_lookup_and_latents_match_official():
    model, g = tiny_ctclip(), io("ctclip_tiny")
    with torch.no_grad():
        q, ids = model.visual.vq(model.visual.encode(g["patch_emb"]))
        assert torch.equal(ids.reshape(2, -1), g["vq_ids"].reshape(2, -1))
        assert max_diff(q, g["vq_tokens"]) < TOL              # the stored (not re-normalised) codebook row
        assert max_diff(model.encode_volume(g["video"]), g["image_latents"]) < TOL
        assert max_diff(model.encode_text(g["text_ids"], g["text_mask"]), g["text_latents"]) < TOL


def test_vq_never_changes_its_codebook_and_passes_gradients_straight_through():
    model = tiny_ctclip().train()
    before = model.visual.vq.embed.clone()
    x = torch.randn(3, 5, 32, requires_grad=True)
    q, _ = model.visual.vq(x)
    q.sum().backward()
    assert torch.equal(model.visual.vq.embed, before)        # no EMA update in train mode (the official footgun)
    assert torch.allclose(x.grad, torch.ones_like(x))         # straight-through: d q / d x = identity
    with torch.no_grad():
        assert torch.allclose(model.visual.vq(x)[0], model.eval().visual.vq(x)[0], atol=1e-6)
