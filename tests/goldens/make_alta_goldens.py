"""Goldens for alta.py from the reference implementations: timm, the official ALTA code, GLoRIA and transformers.

NOT part of the runtime; needs timm, einops and transformers (the golden venv only):

    /work/venv-gold/bin/python tests/goldens/make_alta_goldens.py [ALTA_GIT_DIR] [GLORIA_GIT_DIR]

The official files are read with `git archive` from DopamineLcy/ALTA at commit 0f474b8399f17a90add61c16a1906ae22ee0b4fd
and marshuang80/gloria at 416466af1036294301a872e4da169fefc137a192 (default: the fetch tool's mirrors) into a
temporary folder and imported from there, patched only to run on CPU without its data:
  - `cxrbert` (which loads a tokenizer folder at import) is replaced by a stub: the official ALTA class is built
    for its vision side only; the text side is checked against transformers' BERT with the official adapter formula;
  - the fp16 missing token is cast to fp32 (CPU has no fp16 autocast to match it with);
  - `Tensor.cuda` is the identity while forward_img_feature runs (it hard-codes .cuda());
  - timm.models.layers.helpers (timm 0.6) is aliased to timm.layers.helpers (timm 1.0);
  - a one-process gloo group is started because the official local loss always calls torch.distributed.
Everything is CPU fp32, seeded, tiny and random (no pretrained weights). Writes:
  tests/goldens/alta_vit/        timm VisionTransformer (MAE layout) weights + io: the plain ViT with no adapters
  tests/goldens/alta_official/   the official ALTA vision side (adapted blocks, random NON-zero adapters, missing
                                 views, masking) + io of forward_encoder / forward_decoder / forward_loss /
                                 the projection heads / forward_img_feature, and the official sin-cos tables
  tests/goldens/alta_bert/       transformers BertForMaskedLM + official Adapter modules wired by the formula
                                 of the official cxrbert.py, with ALTA.pth key names (bert_encoder.*) + io
  tests/goldens/alta_loss/       the official ClipLoss / LocalClipLoss and GLoRIA's local_loss on random
                                 features: values and input gradients
  tests/goldens/alta_augment/    torchvision's functional affine (nearest, zero fill) + adjust_brightness /
                                 adjust_contrast on a PIL image, for two parameter sets (common/augment.py)
"""
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.library

# The golden venv's torchvision wheel is a CUDA build next to a CPU torch: its compiled ops do not load and its
# import fails while registering fake kernels for them. timm imports torchvision; none of those ops is used here,
# so skip the registrations that fail.
_register_fake = torch.library.register_fake


def _tolerant_register_fake(name, *a, **k):
    try:
        dec = _register_fake(name, *a, **k)
    except Exception:
        return lambda f: f

    def apply(f):
        try:
            return dec(f)
        except Exception:
            return f
    return apply


torch.library.register_fake = _tolerant_register_fake
import timm  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GOLD = ROOT / "tests" / "goldens"
ALTA_COMMIT = "0f474b8399f17a90add61c16a1906ae22ee0b4fd"
GLORIA_COMMIT = "416466af1036294301a872e4da169fefc137a192"
ALTA_GIT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/.mirror/DopamineLcy+ALTA/repo")
GLORIA_GIT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/work/.mirror/marshuang80+gloria/repo")
# 56 / 4 = 14 x 14 patches: the official missing token is hard-coded to 196 patches
TINY = dict(img_size=56, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4)


def checkout(git_dir: Path, commit: str, into: Path) -> Path:
    data = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(data)).extractall(into, filter="data")
    return into


def fresh_dir(name: str) -> Path:
    out = GOLD / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def save(path: Path, tensors: dict):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"made_by": "tests/goldens/make_alta_goldens.py", "timm": timm.__version__,
                        "torch": torch.__version__, "alta": ALTA_COMMIT, "gloria": GLORIA_COMMIT})


def randomise_(module: nn.Module, seed: int, std: float = 0.1):
    """Every float tensor N(0, std) (LayerNorm weights around 1), so no term of a formula can hide at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_((1 + noise) if ("norm" in name.lower() and name.endswith("weight")) else noise)


def make_vit():
    """timm's VisionTransformer in the MAE configuration (qkv bias, LN eps 1e-6, CLS token, no head)."""
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        **TINY, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="token")
    randomise_(m, 1)
    m.eval()
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = m.forward_features(x)                     # (B, 1 + N, D) after the final norm
    out = fresh_dir("alta_vit")
    save(out / "model.safetensors", m.state_dict())
    save(out / "io.safetensors", {"x": x, "tokens": tokens})
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def import_official(root: Path):
    sys.path.insert(0, str(root))

    class _StubBert(nn.Module):   # stands in for CXRBertModel: only its two heads are touched in __init__
        def __init__(self):
            super().__init__()
            self.cls_projection_head = nn.Linear(2, 2)
            self.local_projection_head = nn.Linear(2, 2)

    stub = types.ModuleType("cxrbert")
    stub.CXRBertModel = types.SimpleNamespace(from_pretrained=lambda *_a, **_k: _StubBert())
    sys.modules["cxrbert"] = stub
    # adapter_block.py was written for timm 0.6, whose helpers module moved to timm.layers.helpers in timm 1.0
    import timm.layers.helpers
    sys.modules["timm.models.layers.helpers"] = timm.layers.helpers
    import adapter_block  # noqa: F401
    import loss_functions
    import model as official
    from util import pos_embed
    return official, loss_functions, pos_embed


def make_official(official, pos_embed):
    torch.manual_seed(0)
    m = official.ALTA(**TINY, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True, args=None)
    del m.bert_encoder
    randomise_(m, 3)
    # the official missing token is fp16 (it meets fp16 patch embeddings under CUDA autocast); fp32 on CPU.
    # It is random here (officially zeros) so that the replacement of missing views is visible in the outputs.
    m.missing_token.data = m.missing_token.data.float()
    with torch.no_grad():   # the fixed tables as the official code makes them (randomise_ touched them)
        m.pos_embed.copy_(torch.from_numpy(pos_embed.get_2d_sincos_pos_embed(64, 14, cls_token=True)).float()[None])
        m.decoder_pos_embed.copy_(m.pos_embed)
    m.eval()
    g = torch.Generator().manual_seed(4)
    img_big = torch.randn(4, 3, 112, 112, generator=g)
    a_img, l_img, la_img = (torch.randn(4, 3, 56, 56, generator=g) for _ in range(3))
    a_img[1] = 0          # sample 1 has no lateral, sample 2 no prior study, sample 3 no prior lateral
    l_img[2] = la_img[2] = 0
    la_img[3] = 0
    img = official.torchvision.transforms.Resize([56, 56], interpolation=official.InterpolationMode.BICUBIC,
                                                 antialias=True)(img_big)
    with torch.no_grad():
        torch.manual_seed(5)
        cls_embed, others, latent, mask, ids_restore = m.forward_encoder(img, a_img, l_img, la_img, 0.75)
        pred = m.forward_decoder(latent, ids_restore)
        recon = m.forward_loss(img_big, pred, mask)
        img_global = torch.nn.functional.normalize(m.projection_head(cls_embed.mean(dim=1)), dim=-1)
        img_local = m.local_projection_head(others)
        img_feature = m.bert_embed(cls_embed.mean(dim=1))
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            inference = m.forward_img_feature(img, 1)
        finally:
            torch.Tensor.cuda = cuda
    out = fresh_dir("alta_official")
    sd = {k: v for k, v in m.state_dict().items()}
    save(out / "model.safetensors", sd)
    present = torch.stack([torch.ones(4, dtype=torch.bool)] + [v.flatten(1).abs().sum(1) > 0
                                                               for v in (a_img, l_img, la_img)], 1)
    save(out / "io.safetensors", {
        "img_big": img_big, "views": torch.stack([a_img, l_img, la_img], 1), "present": present, "small": img,
        "cls_embed": cls_embed, "others": others, "latent": latent, "mask": mask, "ids_restore": ids_restore,
        "pred": pred, "recon": recon, "img_global": img_global, "img_local": img_local,
        "img_feature": img_feature, "inference": inference,
        "pos_embed_64_14": torch.from_numpy(pos_embed.get_2d_sincos_pos_embed(64, 14, cls_token=True)),
        "pos_embed_768_14": torch.from_numpy(pos_embed.get_2d_sincos_pos_embed(768, 14, cls_token=True))})


def make_bert(adapter_block):
    """transformers' BertForMaskedLM (tiny) with the official Adapter class per layer, run by the official
    cxrbert.py formula: the image feature added to the embeddings of the second half of the batch, each layer
    h = attn_adapter(BertAttention(x)); out = BertOutput(BertIntermediate(h), h) + 0.5 mlp_adapter(h); the MLM
    logits of the second half, the projection heads on the first half."""
    sys.modules.setdefault("torchvision", None)
    import transformers
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(cfg).eval()
    attn_ad = nn.ModuleList(adapter_block.Adapter(48, skip_connect=True) for _ in range(2))
    mlp_ad = nn.ModuleList(adapter_block.Adapter(48, skip_connect=False) for _ in range(2))
    heads = nn.ModuleDict({k: nn.Sequential(nn.Linear(48, 16), nn.GELU(), nn.LayerNorm(16, eps=1e-12),
                                            nn.Linear(16, 16)) for k in ("cls", "local")})
    for i, mod in enumerate((mlm, attn_ad, mlp_ad, heads)):
        randomise_(mod, 10 + i)
    mlm.tie_weights()
    g = torch.Generator().manual_seed(20)
    B, T = 3, 12
    ids = torch.randint(5, 120, (B, T), generator=g)
    ids[:, 0] = 2
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 8:] = 0
    am[2, 5:] = 0
    ids[am == 0] = 0
    mlm_ids = ids.clone()
    mlm_ids[:, 2:4] = 4
    img_feature = torch.randn(B, 48, generator=g)
    all_ids, all_am = torch.cat([ids, mlm_ids]), torch.cat([am, am])
    with torch.no_grad():
        x = mlm.bert.embeddings(input_ids=all_ids)
        x[B:] = x[B:] + img_feature[:, None]
        # the additive padding mask HF's eager attention takes, (2B, 1, 1, T)
        ext = (1.0 - all_am[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i, layer in enumerate(mlm.bert.encoder.layer):
            h = layer.attention(x, attention_mask=ext)[0]
            h = attn_ad[i](h)
            x = layer.output(layer.intermediate(h), h) + 0.5 * mlp_ad[i](h)
        logits = mlm.cls(x[B:])
        cls_proj = heads["cls"](x[:B, 0])
        local_proj = heads["local"](x[:B, 1:])
    sd = {"bert_encoder." + k: v for k, v in mlm.state_dict().items()}
    for i in range(2):
        for name, mods in (("attn_adapter", attn_ad), ("mlp_adapter", mlp_ad)):
            for k, v in mods[i].state_dict().items():
                sd[f"bert_encoder.bert.encoder.layer.{i}.{name}.{k}"] = v
    for head, key in (("cls", "cls_projection_head"), ("local", "local_projection_head")):
        for j, part in ((0, "dense_to_hidden"), (2, "LayerNorm"), (3, "dense_to_output")):
            for k, v in heads[head][j].state_dict().items():
                sd[f"bert_encoder.{key}.{part}.{k}"] = v
    out = fresh_dir("alta_bert")
    save(out / "model.safetensors", sd)
    save(out / "io.safetensors", {"ids": ids, "attention_mask": am, "mlm_ids": mlm_ids, "img_feature": img_feature,
                                  "hidden": x, "mlm_logits": logits, "cls_proj": cls_proj, "local_proj": local_proj})


def make_losses(loss_functions, gloria_loss):
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    g = torch.Generator().manual_seed(30)
    B, S, L, E = 5, 12, 9, 16
    img_local = torch.randn(B, S, E, generator=g).requires_grad_()
    words = torch.randn(B, E, L, generator=g).requires_grad_()    # the official layout: (B, E, words)
    cap_lens = torch.tensor([9, 3, 6, 1, 7])
    temps = torch.tensor([2.5, 3.0, 4.5]).requires_grad_()
    loss, _ = loss_functions.LocalClipLoss(gather_with_grad=True, rank=0, world_size=1)(
        img_local, words, cap_lens, temps[0], temps[1], temps[2])
    g_img, g_words, g_temps = torch.autograd.grad(loss, (img_local, words, temps))
    # GLoRIA's original: fixed temperatures 4, 5, 10, image regions as a (B, E, h, w) map
    ctx = img_local.detach().transpose(1, 2).reshape(B, E, 3, 4)
    gl, _ = _gloria_local(gloria_loss, ctx, words.detach(), cap_lens.tolist())
    img_g = torch.nn.functional.normalize(torch.randn(B, E, generator=g), dim=-1).requires_grad_()
    txt_g = torch.nn.functional.normalize(torch.randn(B, E, generator=g), dim=-1).requires_grad_()
    glob = loss_functions.ClipLoss(gather_with_grad=True, rank=0, world_size=1)(img_g, txt_g, torch.tensor(14.0))
    out = fresh_dir("alta_loss")
    save(out / "io.safetensors", {
        "img_local": img_local, "words": words, "cap_lens": cap_lens, "temps": temps, "local": loss,
        "grad_img_local": g_img, "grad_words": g_words, "grad_temps": g_temps, "gloria_local": gl,
        "img_global": img_g, "txt_global": txt_g, "global": glob})
    dist.destroy_process_group()


def _gloria_local(gloria_loss, ctx, words, cap_lens):
    loss0, loss1, att = gloria_loss.local_loss(ctx, words, cap_lens)
    return (loss0 + loss1) / 2, att


AUG_PARAMS = [  # angle, translate (fractions), scale, shear, brightness, contrast, brightness first
    (13.0, (0.05, -0.08), 1.03, 7.0, 1.1, 0.9, True), (-17.5, (-0.1, 0.02), 0.96, -9.0, 0.85, 1.15, False)]


def make_augment():
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    img = np.random.default_rng(40).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    out = {"image": torch.from_numpy(img)}
    for i, (angle, (fx, fy), scale, shear, bright, contrast, bright_first) in enumerate(AUG_PARAMS):
        x = TF.affine(Image.fromarray(img), angle=angle, translate=[round(fx * 52), round(fy * 40)], scale=scale,
                      shear=[shear, 0.0], interpolation=InterpolationMode.NEAREST, fill=0)
        ops = [lambda z: TF.adjust_brightness(z, bright), lambda z: TF.adjust_contrast(z, contrast)]
        for op in (ops if bright_first else ops[::-1]):
            x = op(x)
        out[f"out{i}"] = torch.from_numpy(np.asarray(x).copy())
    save(fresh_dir("alta_augment") / "io.safetensors", out)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        alta_root = checkout(ALTA_GIT, ALTA_COMMIT, Path(tmp) / "alta")
        gloria_root = checkout(GLORIA_GIT, GLORIA_COMMIT, Path(tmp) / "gloria")
        make_vit()
        make_augment()
        official, loss_functions, pos_embed = import_official(alta_root)
        make_official(official, pos_embed)
        import adapter_block
        make_bert(adapter_block)
        sys.path.insert(0, str(gloria_root / "gloria" / "loss"))
        import gloria_loss
        make_losses(loss_functions, gloria_loss)
    print("wrote", ", ".join(sorted(p.name for p in GOLD.glob("alta_*"))))


if __name__ == "__main__":
    main()
