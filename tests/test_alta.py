"""alta.py: parity with timm / the official ALTA code / GLoRIA / transformers (goldens made by
tests/goldens/make_alta_goldens.py), real-size parameter counts, losses, data, evaluation, end to end."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import alta
from common import retrieval as RV
from common.text import gloria_clean, tokenize, wordpiece_tokenizer
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


def test_the_copied_bert_loads_an_hf_folder_on_its_own():
    """The BERT block copied into this file (with its key map) loads an HF BertModel folder and matches it, so
    a reader who copies alta.py alone can use BERT.from_pretrained (golden: tests/goldens/medct_bert)."""
    g = load_file(str(GOLD / "medct_bert" / "io.safetensors"))
    model = alta.BERT.from_pretrained(GOLD / "medct_bert", add_pooler=True).eval()
    with torch.no_grad():
        h, pooled = model(g["input_ids"], g["attention_mask"], g["token_type_ids"])
    close(h, g["last_hidden_state"])
    close(pooled, g["pooler_output"])


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


# -- losses, masking, targets, missing views -----------------------------------------------------------------

DDP_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import alta
from tests.test_alta import ddp_case
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
model, batch = ddp_case()
n = len(batch["ids"]) // w
out = model({k: v[r * n:(r + 1) * n] for k, v in batch.items()}, gather=True)
(out["global"] + out["local"]).backward()
grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
for g in grads.values():                 # what DDP does: the mean over ranks
    dist.all_reduce(g)
    g /= w
if r == 0:
    torch.save({"global": out["global"].detach(), "local": out["local"].detach(), "grads": grads}, sys.argv[2])
dist.barrier()
dist.destroy_process_group()
"""


def ddp_case():
    """A tiny model in eval mode with no masking (so each rank's half equals the same rows of the whole batch)
    and captions of very different lengths on the two ranks (where the official gathered lengths go wrong)."""
    torch.manual_seed(0)
    model = tiny_alta(alta.ALTAConfig(proj_dim=16, mask_ratio=0.0))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    B, T = 6, 12
    ids = torch.randint(5, 120, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([12, 11, 10, 4, 3, 5]):   # rank 0: long reports, rank 1: short ones
        am[i, n:] = 0
    batch = {"big": torch.randn(B, 3, 112, 112, generator=g), "views": torch.randn(B, 3, 3, 56, 56, generator=g),
             "present": torch.rand(B, 4, generator=g) < 0.7, "ids": ids.masked_fill(am == 0, 0), "attention_mask": am,
             "mlm_ids": ids, "mlm_labels": ids.masked_fill(am == 0, -100)}
    batch["present"][:, 0] = True
    return model, batch


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    script, out = tmp_path / "ddp.py", tmp_path / "out.pt"
    script.write_text(DDP_SCRIPT)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script),
           str(alta.REPO), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(alta.REPO))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=alta.REPO)
    if r.returncode != 0:   # the standalone rendezvous can lose a port race on a busy machine
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=alta.REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    model, batch = ddp_case()
    ref = model(batch, gather=False)
    (ref["global"] + ref["local"]).backward()
    close(got["global"], ref["global"])
    close(got["local"], ref["local"])
    for k, p in model.named_parameters():
        if p.grad is not None:
            # sums over ranks in another order: relative to the largest entry of each gradient
            close(got["grads"][k], p.grad, 1e-5 * max(1.0, p.grad.abs().max().item()))


def test_mlm_masking_statistics():
    tok = wordpiece_tokenizer(corpus=["the lesion is small and brown with a smooth border"])
    ids, am = tokenize(tok, ["the lesion is small and brown with a smooth border"] * 400, 16)
    special = (ids == tok.token_to_id("[CLS]")) | (ids == tok.token_to_id("[SEP]")) | (am == 0)
    masked, labels = alta.mlm_mask(ids, tok, torch.Generator().manual_seed(0))
    sel = labels != -100
    assert not sel[special].any()
    assert abs(sel[~special].float().mean().item() - 0.5) < 0.02
    assert (masked[sel] == tok.token_to_id("[MASK]")).all() and torch.equal(masked[~sel], ids[~sel])
    assert torch.equal(labels[sel], ids[sel])
    masked, labels = alta.mlm_mask(ids, tok, torch.Generator().manual_seed(0), mode_8010=True)
    sel = labels != -100
    is_mask = (masked == tok.token_to_id("[MASK]"))[sel].float().mean().item()
    kept = (masked == ids)[sel].float().mean().item()
    assert abs(is_mask - 0.8) < 0.03 and 0.07 < kept < 0.16   # 10% kept + random picks of the same token


def test_reconstruction_target_shapes_and_normalisation():
    big = torch.randn(2, 3, 448, 448)
    target = alta.patchify(big, 32)
    assert target.shape == (2, 196, 3072)
    # patch (row 1, col 2), channels last inside the patch
    assert torch.equal(target[0, 14 + 2].view(32, 32, 3), big[0, :, 32:64, 64:96].permute(1, 2, 0))
    mask = torch.zeros(2, 196)
    mask[:, :147] = 1
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert alta.recon_loss(t, big, mask, 32).item() < 1e-10          # a perfect prediction of the normalised patch
    pred = t.clone()
    pred[:, 150:] += 5                                                # errors on visible patches do not count
    assert alta.recon_loss(pred, big, mask, 32).item() < 1e-10
    ids_keep, ids_restore, m = alta.random_masking(3, 196, 0.75, "cpu")
    assert ids_keep.shape == (3, 49) and m.sum(1).eq(147).all()
    assert torch.equal(torch.gather(m, 1, ids_keep), torch.zeros(3, 49))


def test_missing_views_become_the_missing_token_and_fix_leaves_them_out():
    model, batch = ddp_case()
    model.eval()
    out = model(batch, gather=False)
    other = {k: v.clone() for k, v in batch.items()}
    missing = ~batch["present"][:, 1:]
    other["views"][missing] = torch.randn_like(other["views"][missing])  # pixels of a missing view never matter
    again = model(other, gather=False)
    for k in ("global", "local"):   # equal up to summation order (other rows of the batch changed)
        close(out[k], again[k], 1e-4)
    fixed = tiny_alta(alta.ALTAConfig(proj_dim=16, mask_ratio=0.0, fix_missing=True))
    fixed.load_state_dict(model.state_dict())
    with torch.no_grad():
        fixed.missing_token.add_(1.0)      # trained missing token: the present views alone decide the CLS mean
        model.missing_token.add_(1.0)
        views = torch.cat([torch.randn(6, 1, 3, 56, 56), batch["views"]], 1)
        cls, *_ = fixed.encode_views(views, batch["present"])
    w = batch["present"].float()[..., None]
    assert not torch.allclose((cls * w).sum(1) / w.sum(1), cls.mean(1))
    assert not torch.allclose(fixed(batch, gather=False)["global"], model(batch, gather=False)["global"])


def test_paired_augmentation_moves_both_images_alike():
    from PIL import Image
    from common.augment import AffineJitter
    aug = AffineJitter()
    p = aug.sample(torch.Generator().manual_seed(3))
    assert p == aug.sample(torch.Generator().manual_seed(3))
    assert -20 <= p.angle <= 20 and 0.95 <= p.scale <= 1.05 and 0.8 <= p.brightness <= 1.2
    a = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
    big, small = a.resize((128, 128), Image.NEAREST), a
    out_big, out_small = aug(big, p), aug(small, p)
    # the same motion at both sizes: the big result, halved, is close to the small one
    px = lambda im: torch.from_numpy(__import__("numpy").asarray(im, dtype="float32"))
    diff = (px(out_big.resize((64, 64), Image.NEAREST)) - px(out_small)).abs().mean()
    unrelated = aug(small, aug.sample(torch.Generator().manual_seed(4)))
    assert diff < (px(unrelated) - px(out_small)).abs().mean() / 2
    assert torch.equal(px(aug(a, replace_params(p))), px(a))   # identity parameters: the image unchanged


def replace_params(p):
    from dataclasses import replace
    return replace(p, angle=0.0, translate=(0.0, 0.0), scale=1.0, shear=0.0, brightness=1.0, contrast=1.0)


# -- evaluation metrics on hand-built cases ----------------------------------------------------------------


def test_retrieval_precision_and_prompt_averaging():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.05], [0.1, 1.0], [0.0, 1.0]]), dim=-1)
    res = RV.precision_table(img, txt, [0, 0, 1], [0, 1, 1], (1, 2))
    assert res == {"P@1": 1.0, "P@2": pytest.approx((0.5 + 0.5 + 1.0) / 3)}
    assert tuple(alta.CHEXPERT_CLASS_PROMPTS) == RV.CHEXPERT5       # prompts in the reader's label order
    prompts = alta.chexpert_prompts()
    assert [len(v) for v in prompts.values()] == [210, 15, 192, 18, 54]
    assert "small left bilateral pleural effusion" in prompts["Pleural Effusion"]
    assert gloria_clean("1. No acute disease.  2. Mild edema, unchanged. A.") == "no acute disease mild edema unchanged"


def test_threshold_protocol_on_a_hand_built_case():
    y = [0] * 10 + [1] * 10
    p = [0.1 * (i % 5) for i in range(10)] + [0.6 + 0.03 * i for i in range(10)]
    res = RV.threshold_protocol(y, p)
    assert res["AUROC"] == 1.0 and res["ACC"] == 1.0 and res["F1"] == 1.0
    res = RV.threshold_protocol([0, 1] * 20, [0.5] * 40)       # no information: F1 is maximised by calling all positive
    assert res["AUROC"] == 0.5 and res["ACC"] == 0.5 and res["F1"] == pytest.approx(2 / 3)


# -- weights and converters --------------------------------------------------------------------------------


def test_an_alta_pth_with_a_namespace_converts_without_running_code(tmp_path):
    import argparse
    from common import weights
    sd = {"blocks.0.attn_adapter.D_fc1.weight": torch.randn(3, 4), "missing_token": torch.zeros(1, 2, 4).half()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 29, "args": argparse.Namespace(blr=1.5e-4, model="alta")},
               tmp_path / "ALTA.pth")
    with pytest.raises(Exception):
        torch.load(tmp_path / "ALTA.pth", weights_only=True)          # what the converter must get past
    weights.convert(tmp_path / "ALTA.pth", tmp_path / "ALTA.safetensors", key="model")
    got = load_file(str(tmp_path / "ALTA.safetensors"))
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    evil = tmp_path / "evil.pth"
    torch.save({"model": sd, "args": print}, evil)                    # a global outside the allow-list
    with pytest.raises(weights.WeightsError):
        weights.convert(evil, tmp_path / "evil.safetensors", key="model")


# -- end to end, resume, user mistakes ---------------------------------------------------------------------

FAST = ["--epochs", "1", "--batch-size", "8", "--no-select", "--log-every", "1"]


def test_demo_end_to_end_and_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    """4 steps straight vs a run whose loss turns NaN at step 3 (it stops, keeping the step-2 checkpoint), then
    --resume to 4: the same trainable tensors, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert alta.main([*FAST, "--steps", "4", "--out", str(a)]) == 0
    metrics = __import__("json").loads((a / "metrics.json").read_text())
    assert {"demo-zeroshot", "demo-retrieval"} <= set(metrics)
    assert 0 <= metrics["demo-zeroshot"]["ACC"] <= 1 and 0 <= metrics["demo-retrieval"]["P@5"] <= 1
    rows = [__import__("json").loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    assert {"global", "local", "recon", "mlm", "lr"} <= set(rows[0]) and len(rows) == 4
    calls, recon = [], alta.recon_loss

    def nan_at_step_3(*a):
        calls.append(1)
        return recon(*a) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(alta, "recon_loss", nan_at_step_3)
    capsys.readouterr()
    assert alta.main([*FAST, "--steps", "4", "--ckpt-every", "2", "--no-eval", "--out", str(b)]) == 3
    err = capsys.readouterr().err
    assert re.search(r"last good checkpoint is \S*step_0*2\b", err) and f"python alta.py --resume {b}" in err
    monkeypatch.undo()
    assert alta.main(["--resume", str(b)]) == 0   # --no-eval comes from the run's args.json
    x, y = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_committed_demo_towers_are_the_tiny_presets_pretrained():
    """common/demo_weights/alta_towers.safetensors (made by make_alta_towers.py): fp16, small enough to commit,
    every tower tensor of the tiny presets (R.load_tensors checks keys and shapes) and nothing of the adapters or the
    decoder, made for the demo's vocabulary, and pre-trained: the demo's test images no longer share one feature,
    and each finds its own report among 64 far above chance."""
    from safetensors import safe_open
    from common.data import load_image
    from common.demo import ensure_demo
    assert alta.DEMO_TOWERS.stat().st_size < 1_400_000                                # 1.23 MB
    with safe_open(str(alta.DEMO_TOWERS), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert not any("adapter" in k or k.startswith(("decoder_", "pos_embed")) for k in f.keys())
    root = ensure_demo(alta.REPO / "data" / "demo")
    tok = alta.demo_tokenizer(root)
    bert = alta.BertConfig(vocab_size=tok.get_vocab_size(), **alta.DEMO_BERT)
    init = alta.ALTA(alta.VIT_PRESETS["tiny"], bert, alta.ALTAConfig()).init_weights(0)
    model = copy.deepcopy(init)
    alta.load_demo_towers(model, tok)
    towers, init = model.state_dict(), init.state_dict()
    assert torch.equal(init["pos_embed"], towers["pos_embed"])
    for k in ("blocks.0.attn.qkv.weight", "bert_encoder.bert.encoder.layer.0.attention.self.query.weight",
              "projection_head.dense_to_hidden.weight", "bert_encoder.cls_projection_head.dense_to_hidden.weight"):
        assert not torch.equal(init[k], towers[k]), k                     # the contrastive steps moved them
    assert torch.equal(towers["bert_encoder.local_projection_head.dense_to_output.weight"],
                       towers["bert_encoder.cls_projection_head.dense_to_output.weight"])
    rows = RV.read_rows(root / "reports_test.csv", ["image_path", "report"])[:64]
    geo, to_tensor = alta.image_transform(model.cfg.img_size, False)
    ids, am = tokenize(tok, [r["report"] for r in rows], 64)
    with torch.no_grad():
        f = model.eval().encode_image(torch.stack([to_tensor(geo(load_image(root / r["image_path"]))) for r in rows]))
        t = model.encode_text(ids, am)                                                   # (64, E) both
    assert (f @ f.T)[~torch.eye(64, dtype=torch.bool)].mean() < 0.6       # measured 0.44; the random init 0.72
    top5 = ((f @ t.T).topk(5, 1).indices == torch.arange(64)[:, None]).any(1).float().mean()
    assert top5 > 0.25                        # measured 0.375; the random init 0.09; chance 5/64 = 0.08
    with pytest.raises(alta.R.RunError, match="another demo vocabulary.*make_alta_towers"):
        alta.load_demo_towers(model, wordpiece_tokenizer(corpus=[r["report"] for r in rows[:3]]))


def test_a_missing_demo_towers_file_is_one_message_naming_the_command_that_remakes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(alta, "DEMO_TOWERS", tmp_path / "alta_towers.safetensors")
    assert alta.main(["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "python -m common.demo_weights.make_alta_towers" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_input_gives_a_message_not_a_traceback(tmp_path, capsys):
    import csv
    from PIL import Image
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "a.png")
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "auxview_image_path", "last_image_path", "last_auxview_image_path", "report"])
        w.writerow(["a.png", "-1", "gone.png", "-1", "Small effusion."])
        w.writerow(["a.png", "-1", "-1", "-1", "  ...  "])
    tok = wordpiece_tokenizer(corpus=["small effusion"])
    with pytest.raises(alta.DataError, match="report of a.png is empty"):
        alta.StudyDataset(tmp_path / "train.csv", tmp_path, tok, 32, 16, True, True)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "auxview_image_path", "last_image_path", "last_auxview_image_path", "report"])
        w.writerow(["a.png", "-1", "gone.png", "-1", "Small effusion."])
    ds = alta.StudyDataset(tmp_path / "train.csv", tmp_path, tok, 32, 16, True, True)
    with pytest.raises(alta.DataError, match="gone.png"):
        ds[0]
    assert alta.main(["--data", "mimic-cxr", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "common.prepare mimic-cxr" in err and "MRM.safetensors" in err and "Traceback" not in err
    assert "download: MIMIC-CXR-JPG" in err
    assert not (tmp_path / "r").exists()
    assert alta.main(["--eval", "rsna-zeroshot", "--init", str(tmp_path / "ALTA.safetensors"), "--text", str(tmp_path),
                      "--out", str(tmp_path / "r")]) == 2                       # a mistyped --init: said before any work
    assert f"--init {tmp_path / 'ALTA.safetensors'}: not found" in capsys.readouterr().err
    for bad in (["--mask-ratio", "1"], ["--warmup-epochs", "-1"], ["--sched-epochs", "0"]):
        with pytest.raises(SystemExit) as e:      # usage + message, exit 2, before anything is built
            alta.parse_args(bad)
        assert e.value.code == 2
    assert "--mask-ratio 1.0: must be in [0, 1)" in capsys.readouterr().err


def test_official_evaluations_run_on_mock_layouts(tmp_path):
    """The five --eval readers on folders laid out as common.prepare (and the ALTA repo's 5x200 CSV) write them."""
    import argparse
    import csv
    import numpy as np
    from PIL import Image
    from common.data import CHEXPERT_FINDINGS
    rng = np.random.default_rng(0)

    def img(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 26), dtype=np.uint8)).save(path)

    def write(path, header, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    five = list(alta.CHEXPERT_CLASS_PROMPTS)
    rows = []
    for i in range(105):          # P@100 needs 100 texts
        img(tmp_path / "cx" / f"{i}.png")
        rows.append([f"{i}.png", *[("1.0" if k == i % 5 else "0.0") for k in range(5)], f"1. {five[i % 5]} seen. 2. ok"])
    write(tmp_path / "cx" / "chexpert_5x200.csv", ["Path", *five, "Report Impression"], rows)
    eight = list(RV.CHEXPERT8)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    cand = []
    for i in range(56):           # P@50 needs 50 candidates
        img(tmp_path / "c8" / "img" / f"{i}.png")
        cells = ["0.0"] * len(CHEXPERT_FINDINGS)
        cells[CHEXPERT_FINDINGS.index(eight[i % 8])] = "1.0"
        cand.append([f"img/{i}.png", "F", "50", "Frontal", "AP", *cells])
    for sub in ("image-retrieval", "text-retrieval"):
        write(tmp_path / "c8" / sub / "candidate.csv", header, cand)
    write(tmp_path / "c8" / "image-retrieval" / "query.csv", ["Variable", "Path"], [[eight[i % 8], f"img/{i}.png"] for i in range(8)])
    write(tmp_path / "c8" / "text-retrieval" / "query.csv", ["Variable", "Text"], [[n, f"findings of {n}"] for n in eight])
    for name in ("valid.csv", "test.csv"):
        write(tmp_path / "rsna" / name, ["Path", "Pneumonia"], [[f"{i}.png", i % 2] for i in range(20)])
    for i in range(20):
        img(tmp_path / "rsna" / f"{i}.png")
    model = tiny_alta(alta.ALTAConfig(proj_dim=16), alta.BertConfig(vocab_size=400, dim=48, n_layers=1, n_heads=4,
                                                                   mlp_dim=96, max_positions=256))
    tok = wordpiece_tokenizer(corpus=[t for ps in alta.chexpert_prompts().values() for t in ps] + eight +
                              ["there is no pneumonia findings of seen ok"])
    assert tok.get_vocab_size() <= 400
    args = argparse.Namespace(device="cpu", precision="fp32", max_len=32)
    res = {w: alta.evaluate(w, model, tok, args, tmp_path / d) for w, d in (
        ("chexpert5x200-retrieval", "cx"), ("chexpert5x200-zeroshot", "cx"), ("chexpert8x200-img2img", "c8"),
        ("chexpert8x200-txt2img", "c8"), ("rsna-zeroshot", "rsna"), ("rsna-val", "rsna"))}
    assert set(res["chexpert5x200-retrieval"]) == {"P@5", "P@10", "P@100"}
    assert set(res["chexpert8x200-img2img"]) == {"P@5", "P@10", "P@50"} and set(res["rsna-zeroshot"]) == {"AUROC", "ACC", "F1"}
    assert all(0 <= v <= 1 for r in res.values() for v in r.values())


def test_bench_reports_every_figure_at_a_tiny_size(monkeypatch):
    import argparse
    monkeypatch.setattr(alta.R, "matmul_peak_flops", lambda *a, **k: 1e12)   # measuring it takes ~10 s per row here
    args = argparse.Namespace(precision="fp32", batch_size=2, bench_steps=1)
    rows = alta.run_bench(args, alta.R.World(), TINY_VIT, TINY_BERT)
    assert rows[0]["what"].startswith("pre-train step") and len(rows) == 4
    for r in rows:
        assert r["step_ms"] > 0 and r["items_per_s"] > 0 and r["tflops"] > 0 and r["peak_mem_mb"] > 0


def test_paired_augmentation_equals_torchvision():
    """common/augment.py against torchvision's functional affine + brightness / contrast (golden)."""
    import numpy as np
    from PIL import Image
    from common.augment import AffineJitter, AffineJitterParams
    io = load_file(str(GOLD / "alta_augment" / "io.safetensors"))
    params = [(13.0, (0.05, -0.08), 1.03, 7.0, 1.1, 0.9, True), (-17.5, (-0.1, 0.02), 0.96, -9.0, 0.85, 1.15, False)]
    img = Image.fromarray(io["image"].numpy())
    for i, p in enumerate(params):
        out = np.asarray(AffineJitter()(img, AffineJitterParams(*p)))
        assert np.array_equal(out, io[f"out{i}"].numpy()), i
