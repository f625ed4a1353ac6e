"""alta.py: parity with timm / the official ALTA code / GLoRIA / transformers (goldens made by
tests/goldens/make_alta_goldens.py), real-size parameter counts, losses, data, evaluation, end to end."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import alta
from common.weights import load_mapped

GOLD = alta.REPO / "tests" / "goldens"
TINY_VIT = alta.ViTConfig(img_size=56, patch_size=4, dim=64, n_layers=2, n_heads=4, decoder_dim=64,
                          decoder_layers=1, decoder_heads=4)
TINY_BERT = alta.BertConfig(vocab_size=120, dim=48, n_layers=2, n_heads=4, mlp_dim=96, max_positions=40,
                            dropout=0.0, attn_dropout=0.0)


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err < tol, err
    return err


def tiny_alta(cfg=None, bert=TINY_BERT):
    torch.manual_seed(0)
    return alta.ALTA(TINY_VIT, bert, cfg or alta.ALTAConfig(proj_dim=16)).init_weights(0).eval()


# -- parity ------------------------------------------------------------------------------------------------


def test_sincos_tables_equal_the_official_ones():
    io = load_file(str(GOLD / "alta_official" / "io.safetensors"))
    close(alta.sincos_pos_embed(64, 14), io["pos_embed_64_14"])    # they compute in float32, we in float64
    close(alta.sincos_pos_embed(768, 14), io["pos_embed_768_14"])


def test_vit_equals_timm_and_zero_adapters_change_nothing():
    folder = GOLD / "alta_vit"
    io = load_file(str(folder / "io.safetensors"))
    vit = alta.MAEViT(TINY_VIT)
    decoder = [k for k in vit.state_dict() if k.startswith(("decoder_", "mask_token"))]
    load_mapped(vit, folder / "model.safetensors", alta.VISION_MAP, drop_missing=decoder)
    vit.eval()
    with torch.no_grad():
        close(vit.encode(io["x"]), io["tokens"])
        vit.blocks = torch.nn.ModuleList(alta.AdaptedBlock(b, 0.25, 0.5) for b in vit.blocks)  # D_fc2 = 0
        close(vit.encode(io["x"]), io["tokens"])


def official_vision():   # the official bert_embed maps to the ViT width: a BERT as wide as the tiny ViT
    model = tiny_alta(alta.ALTAConfig(), alta.BertConfig(vocab_size=50, dim=64, n_layers=1, n_heads=4, mlp_dim=64))
    load_mapped(model, GOLD / "alta_official" / "model.safetensors", alta.ALTA_MAP,
                drop_missing=[k for k in model.state_dict() if k.startswith("bert_encoder.")])
    return model.eval(), load_file(str(GOLD / "alta_official" / "io.safetensors"))


def test_multiview_encoder_decoder_and_heads_equal_the_official_code():
    """Random non-zero adapters, a random missing token, three kinds of missing view, the same masking noise."""
    model, io = official_vision()
    with torch.no_grad():
        small = F.interpolate(io["img_big"], size=(56, 56), mode="bicubic", align_corners=False, antialias=True)
        close(small, io["small"])
        torch.manual_seed(5)
        cls, tokens, ids_restore, mask = model.encode_views(torch.cat([small[:, None], io["views"]], 1),
                                                            io["present"])
        close(cls, io["cls_embed"])
        close(tokens.flatten(1, 2), io["others"])
        assert torch.equal(ids_restore[:, 0], io["ids_restore"]) and torch.equal(mask[:, 0], io["mask"])
        latent = torch.cat([cls[:, :1], tokens[:, 0]], 1)
        close(latent, io["latent"])
        pred = model.decode(latent, ids_restore[:, 0])
        close(pred, io["pred"])
        close(alta.recon_loss(pred, io["img_big"], mask[:, 0], 8), io["recon"])
        close(F.normalize(model.projection_head(cls.mean(1)), dim=-1), io["img_global"])
        close(model.local_projection_head(tokens.flatten(1, 2)), io["img_local"])
        close(model.bert_embed(cls.mean(1)), io["img_feature"])
        close(model.encode_image(io["small"]), io["inference"])


def test_adapted_bert_and_heads_equal_transformers_with_the_official_formula():
    model = tiny_alta()
    load_mapped(model, GOLD / "alta_bert" / "model.safetensors", alta.ALTA_MAP,
                drop_missing=[k for k in model.state_dict() if not k.startswith("bert_encoder.")])
    io = load_file(str(GOLD / "alta_bert" / "io.safetensors"))
    B = len(io["ids"])
    enc = model.bert_encoder.eval()
    with torch.no_grad():
        h = enc.hidden(torch.cat([io["ids"], io["mlm_ids"]]), torch.cat([io["attention_mask"]] * 2),
                       add=io["img_feature"])
        real = torch.cat([io["attention_mask"]] * 2).bool()          # padded positions are not compared
        close(h[real], io["hidden"][real])
        close(enc.mlm_logits(h[B:])[real[B:]], io["mlm_logits"][real[B:]])
        close(enc.cls_projection_head(h[:B, 0]), io["cls_proj"])
        close(enc.local_projection_head(h[:B, 1:])[real[:B, 1:]], io["local_proj"][real[:B, 1:]])


def test_losses_equal_official_and_gloria():
    io = load_file(str(GOLD / "alta_loss" / "io.safetensors"))
    img = io["img_local"].clone().requires_grad_()
    words = io["words"].transpose(1, 2).clone().requires_grad_()            # ours: (B, L, E)
    temps = io["temps"].clone().requires_grad_()
    word_mask = torch.arange(words.shape[1])[None] < io["cap_lens"][:, None]
    loss = alta.local_loss(img, words, word_mask, *temps, chunk=2)
    close(loss, io["local"])
    g_img, g_words, g_t = torch.autograd.grad(loss, (img, words, temps))
    close(g_img, io["grad_img_local"])
    close(g_words, io["grad_words"].transpose(1, 2))
    close(g_t, io["grad_temps"])
    with torch.no_grad():
        close(alta.local_loss(img, words, word_mask, 4.0, 5.0, 10.0), io["gloria_local"])
        close(alta.global_loss(io["img_global"], io["txt_global"], torch.tensor(14.0)), io["global"])


# -- sizes and what trains ---------------------------------------------------------------------------------


def test_real_size_counts_on_meta():
    with torch.device("meta"):
        model = alta.ALTA(alta.ViTConfig(), alta.CXR_BERT, alta.ALTAConfig())
    alta.mark_trainable(model, model.alta_cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == (242_177_854, 18_333_502)
    assert round(100 * trainable / total, 2) == 7.57
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for name in ("missing_token", "bert_embed.weight", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                 "decoder_blocks.0.mlp.fc1.weight", "bert_encoder.bert.embeddings.word_embeddings.weight"):
        assert name in frozen
    cfg = alta.ALTAConfig(fix_missing=True, train_bert_embed=True)
    names = alta.mark_trainable(model, cfg)
    assert "missing_token" in names and "bert_embed.weight" in names


def test_adapted_model_equals_the_base_at_init():
    model = tiny_alta()
    plain = alta.BERT(TINY_BERT).eval()
    plain.load_state_dict({k[len("bert."):]: v for k, v in model.bert_encoder.state_dict().items()
                           if k.startswith("bert.") and "adapter" not in k})
    ids = torch.randint(5, 120, (2, 9))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    with torch.no_grad():
        close(model.bert_encoder.hidden(ids, am)[am.bool()], plain(ids, am)[0][am.bool()])
        x = torch.randn(2, 3, 56, 56)
        base = alta.MAEViT(TINY_VIT).eval()
        base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
        ours = model.norm(model.blocks[1](model.blocks[0](base.patch_embed(x) + base.pos_embed[:, 1:])))
        ref = base.norm(base.blocks[1](base.blocks[0](base.patch_embed(x) + base.pos_embed[:, 1:])))
        close(ours, ref)
