"""ALTA: align through adapting a masked-record-modelling ViT and CXR-BERT, with temporal multi-view inputs.

Paper: Lian, Zhou, Liang, Qin, Wang. "Efficient Medical Vision-Language Alignment Through Adapting Masked Vision
Models" (arXiv 2506.08990). Official code: DopamineLcy/ALTA (commit 0f474b8), on top of RL4M/MRM-pytorch's MRM
checkpoint and microsoft/BiomedVLP-CXR-BERT-specialized. Hand-written in plain PyTorch, tested equal to timm (the
ViT), the official ALTA code (multi-view encoder, decoder, heads, losses), GLoRIA (the local loss) and transformers
(BERT + the official adapter formula): tests/goldens/make_alta_goldens.py.

The idea: an MRM ViT-B/16 is good at images but not aligned with text. Freeze it and CXR-BERT, put small
AIM-style adapters in every layer of both, train the adapters, norms, heads and a few tokens (18.3M of 242.2M
parameters, 7.57%) with four losses, on studies of up to four radiographs (current / prior x frontal / lateral):
  global  L_g = (CE(s v t^T) + CE(s t v^T)) / 2, v = norm(head(mean of the 4 CLS)), t = norm(head(text CLS)),
          s = exp(logit_scale) <= 100, features gathered over ranks with gradients;
  local   GLoRIA's word-region loss (local_loss), temperatures t1, t2, t3 learned (exp of logit scales, init 1/0.07);
  recon   MAE with 75% masking of each view; the decoder predicts the 448-px current frontal at p = 32 from the
          224-px input (super-resolution), per-patch normalised targets, MSE on the masked patches;
  MLM     a second copy of the report, 50% of its tokens masked, with bert_embed(image feature) added to every
          token embedding; cross-entropy of the tied MLM head.
  L = L_g + L_local + L_recon + L_MLM (unweighted), each logged. At inference one frontal image, no masking.

Run it:
    python alta.py                                            # demo: tiny ViT + BERT, multi-view demo data, CPU
        # 8 epochs; 6 classes, chance 0.167 for zero-shot ACC and image->report P@5 (AUROC: 0.5). Measured,
        #   --seed 0 / 1 / 2: ACC 0.421 / 0.417 / 0.446, AUROC 0.779 / 0.771 / 0.755, P@5 0.415 / 0.404 / 0.420;
        #   the frozen pre-trained towers alone (measured when they were made at run time, same recipe): ACC 0.392,
        #   AUROC 0.724, P@5 0.442. With OMP_NUM_THREADS=1: ~1 CPU-minute (66 s wall on a 2-core box).
    python -m common.weights convert MRM.pth MRM.safetensors --key model      # (and ALTA.pth alike)
    python alta.py --data mimic-cxr --init-vision MRM.safetensors --text <BiomedVLP-CXR-BERT-specialized folder>
    torchrun --nproc_per_node 4 alta.py --data mimic-cxr ...  # the paper's 4 x 24 studies
    python alta.py --eval chexpert5x200-retrieval --init ALTA.safetensors --text <CXR-BERT folder>
        # or chexpert5x200-zeroshot | chexpert8x200-img2img | chexpert8x200-txt2img | rsna-zeroshot; --init RUN
    python alta.py --resume runs/alta/mimic-cxr/<run> ; python alta.py --bench [--precision fp16]

Official behaviour kept so numbers are comparable, with the fix behind a flag (bugs that change results):
  - missing_token is created in fp16, zeros, and never trained; a missing view's CLS still enters the 4-way
    mean and its tokens enter the local loss: --fix-missing trains the token and leaves missing views out of both;
  - bert_embed (image feature -> BERT space for MLM) is neither loaded (MRM calls its own bert_mlp, 768 -> 384)
    nor trainable (no pattern of the training rule matches it): a frozen random projection. --train-bert-embed;
  - MLM turns every selected token into [MASK] although its docstring says 80/10/10: --mlm-8010.
Fixed here (no flag): the official local loss gathers caption lengths of the doubled (2B) text batch, so under
DDP every rank above 0 reads another sample's length; here the word masks are gathered with the words (a test
checks 2 processes = 1 process on the whole batch). Also different from the official code:
  - the 4 views of a study are encoded as one (B x 4)-image batch, as officially, but missing views are flagged
    by the data (present) instead of detecting all-zero images; MLM logits are computed for labelled tokens only
    (the same loss, a fraction of the vocabulary matmul); the local loss is batched over captions;
  - bf16 autocast by default on CUDA (official: fp16 + GradScaler, --precision fp16);
  - augmentation randomness comes from a generator per (seed, epoch, study), not by re-seeding global RNGs;
  - RSNA: common.prepare rsna makes seeded 70/15/15 splits of the labelled stage-2 training images (the official
    val/test lists are not reproduced); the ACC/F1 folds are ours, not scikit-learn's StratifiedKFold.
The recipe, as official: AdamW (0.9, 0.95), wd 0.05 except biases and 1-D tensors (the 3-D cls / view /
temporal tokens are decayed), lr = 1.5e-4 x global batch / 256, per-step warm-up for 10 epochs, then a
half-cosine defined over 100 epochs but stopped at 30 (the lr is still ~88% of its peak at the end), logit
scales clamped to [0, ln 100] after each step, model selection by RSNA validation zero-shot AUROC each epoch.
The demo has no MRM or CXR-BERT to adapt, and frozen random towers carry almost no class signal (zero-shot ACC
0.17-0.25 by seed, chance 0.167). So, as cilmp.py does for its CLIP, the tiny ViT + BERT come pre-trained in
DEMO_TOWERS (fp16, 1.2 MB; made by common/demo_weights/make_alta_towers.py: 200 steps of symmetric InfoNCE on the
current images and reports of reports_train.csv, every tower weight trained, seed 0): they play MRM and CXR-BERT,
frozen by the same rule as the real ones; only the adapters, norms, heads and tokens learn. Never used with real
weights; DEMO_RECIPE is demo-only. There the adapters raise zero-shot ACC and AUROC over the frozen towers but
not image->report P@5 (above): they are trained on the four-view mean against shuffled reports, and evaluated on
one frontal image against the whole report.
"""
import argparse
import itertools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import Dataset

from common import metrics as M
from common import retrieval as RV
from common import run as R
from common.augment import AffineJitter
from common.data import DataError, ImageReportDataset, dataset_root, load_image, missing_dataset
from common.text import SPECIALS, gloria_clean, shuffle_sentences, tokenize, wordpiece_tokenizer
from common.transforms import CenterCrop, Compose, Normalize, Resize, ToGray, ToRGB, ToTensor
from common.weights import WeightsError, load_config, load_mapped, map_key, read_safetensors, resolve, tensor_index

REPO = Path(__file__).resolve().parent
DEMO_TOWERS = REPO / "common" / "demo_weights" / "alta_towers.safetensors"   # the demo's pre-trained tiny towers

# ----------------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: int = 4
    eps: float = 1e-6              # MAE / MRM: LayerNorm(eps=1e-6) everywhere in the ViT and its decoder
    decoder_dim: int = 768
    decoder_layers: int = 4
    decoder_heads: int = 6

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class ALTAConfig:
    proj_dim: int = 128            # the joint space (CXR-BERT's projection_size)
    adapter_ratio: float = 0.25    # adapter bottleneck = 0.25 x width (768 -> 192)
    adapter_scale: float = 0.5     # the MLP adapter is added as 0.5 x beside the MLP / FFN
    mask_ratio: float = 0.75       # MAE masking of every view during pre-training
    fix_missing: bool = False      # official: frozen zero missing token, missing views' CLS in the mean
    train_bert_embed: bool = False  # official: bert_embed is never trained (a frozen random projection)


VIT_PRESETS = {
    "vit-b16": ViTConfig(),
    "tiny": ViTConfig(img_size=48, patch_size=8, dim=96, n_layers=4, n_heads=4, decoder_dim=64, decoder_layers=1,
                      decoder_heads=4),
}

# ----------------------------------------------------------------------------------------------------------
# ViT-B/16 in the MAE / MRM layout (timm names, so MRM.pth maps one to one) and the MAE decoder


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table of MRM / ALTA (1 + grid^2, dim): the first row (CLS) is zeros; the first half
    of the channels encodes the column (x), the second half the row (y), each as [sin | cos] of pos * omega_i.
    NOTE omega_i = 10000^(-i / dim) here (their `omega / embed_dim / 2.`), not MAE's 10000^(-4i / dim): the
    checkpoints store this table, so it is what the weights were trained with."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / dim)           # (dim/4,)
    ys, xs = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")
    x, y = (pos.reshape(-1, 1) * omega for pos in (xs, ys))                              # 2 x (grid^2, dim/4)
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)                            # (grid^2, dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x):                                   # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.nh = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)                   # qkv_bias=True
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)                                        # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))                 # exact (erf) GELU, timm's nn.GELU default


class Block(nn.Module):
    """Pre-LN transformer block (timm 0.6 Block without layer scale / drop path)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAEViT(nn.Module):
    """The MRM image encoder: patch embedding, fixed sin-cos positions, CLS, 12 pre-LN blocks, final norm; and
    the MAE decoder (decoder_embed, mask token, fixed positions, 4 blocks, decoder_norm, decoder_pred) whose
    output patch is twice the encoder's: 32 x 32 x 3 = 3072 values, the super-resolution target of MRM."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, Dd = cfg.dim, cfg.decoder_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, cfg.grid)[None], requires_grad=False)   # (1, 1 + N, D)
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(Dd, cfg.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.eps)
                                            for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.eps)
        self.decoder_pred = nn.Linear(Dd, (2 * cfg.patch_size) ** 2 * 3)

    def encode(self, x, *add):
        """(B, 3, H, W) -> all tokens after the final norm (B, 1 + N, D), no masking (MAE's plain forward). `add`:
        tensors added to every token, CLS included, before the blocks (ALTA's view and temporal embeddings)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)   # (B, 1 + N, D)
        for emb in add:
            x = x + emb
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decode(self, latent, ids_restore):
        """latent (B, 1 + n_keep, D) = [CLS, visible tokens in shuffled order], ids_restore (B, N) ->
        the predicted patches of the whole image (B, N, (2p)^2 * 3)."""
        x = self.decoder_embed(latent)                                                    # (B, 1 + n_keep, Dd)
        B, N = ids_restore.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, N + 1 - x.shape[1], -1)], 1)  # (B, N, Dd)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))      # back to image order
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def patchify(imgs, p: int):
    """(B, 3, H, W) -> (B, (H/p)(W/p), p*p*3), channels last inside a patch (MAE's layout)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def random_masking(n_items: int, n_tokens: int, ratio: float, device):
    """MAE's per-item random masking: -> ids_keep (n_items, n_keep), ids_restore (n_items, n_tokens), mask
    (n_items, n_tokens) with 1 = removed, all in image order. Uses torch's global RNG (restored on resume)."""
    n_keep = int(n_tokens * (1 - ratio))
    ids_shuffle = torch.rand(n_items, n_tokens, device=device).argsort(1)   # ascending: small noise is kept
    ids_restore = ids_shuffle.argsort(1)
    return ids_shuffle[:, :n_keep], ids_restore, (ids_restore >= n_keep).float()   # removed: shuffled past n_keep

# ----------------------------------------------------------------------------------------------------------
# CXR-BERT: the BERT encoder copied from medct_lora.py (HF module names), plus the two heads CXR-BERT and ALTA
# put on top of it: the tied MLM head and the 768 -> 128 projection heads


@dataclass
# Copied from medct_lora.py: BertConfig
class BertConfig:
    vocab_size: int = 30522
    dim: int = 768                 # hidden_size
    n_layers: int = 12
    n_heads: int = 12
    mlp_dim: int = 3072            # intermediate_size
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12             # layer_norm_eps
    dropout: float = 0.1           # hidden_dropout_prob (CXR-BERT: 0.25)
    attn_dropout: float = 0.1      # attention_probs_dropout_prob (CXR-BERT: 0.25)
    pad_id: int = 0


# Copied from medct_lora.py: BertEmbeddings
class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids, token_type_ids=None):
        """ids (B, T) -> LayerNorm(word + position + token type) (B, T, D); positions 0..T-1."""
        T = ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"{T} tokens > max_positions {self.position_embeddings.num_embeddings}")
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.word_embeddings(ids) + self.token_type_embeddings(types)
        x = x + self.position_embeddings(torch.arange(T, device=ids.device))
        return self.dropout(self.LayerNorm(x))


# Copied from medct_lora.py: BertSelfAttention
class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.nh, self.p = cfg.n_heads, cfg.attn_dropout
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, mask=None):
        """x (B, T, D), mask (B, 1, 1, T) bool (True = a real token) or None -> (B, T, D), before the output dense."""
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.nh, C // self.nh).transpose(1, 2) for f in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)                                        # (B, nh, T, hs) -> (B, T, D)


# Copied from medct_lora.py: BertSublayerOutput
class BertSublayerOutput(nn.Module):
    """The post-LN step closing each sublayer: LayerNorm(dropout(dense(hidden)) + input_tensor). It is both
    `attention.output` (dense D -> D) and `output` (dense mlp_dim -> D); HF calls them BertSelfOutput/BertOutput."""

    def __init__(self, cfg: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + input_tensor)


# Copied from medct_lora.py: BertAttention
class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)                 # HF's name: keys read attention.self.query.weight
        self.output = BertSublayerOutput(cfg, cfg.dim)

    def forward(self, x, mask=None):
        return self.output(self.self(x, mask), x)


# Copied from medct_lora.py: BertIntermediate
class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.mlp_dim)

    def forward(self, x):
        return F.gelu(self.dense(x))                       # exact (erf) GELU: HF hidden_act "gelu"


# Copied from medct_lora.py: BertLayer
class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSublayerOutput(cfg, cfg.mlp_dim)

    def forward(self, x, mask=None):
        x = self.attention(x, mask)                        # LN(x + attn(x))
        return self.output(self.intermediate(x), x)        # LN(x + W2 gelu(W1 x))


# Copied from medct_lora.py: BERT
class BERT(nn.Module):
    """BERT encoder. forward(ids, attention_mask, token_type_ids) -> (last hidden state (B, T, D), pooled (B, D)
    or None), equal to HF BertModel's last_hidden_state and pooler_output (the pooler is tanh(dense(h[:, 0])),
    built only with add_pooler=True: CT-CLIP uses the CLS hidden state and never the pooler)."""

    def __init__(self, cfg: BertConfig, add_pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layers))})  # HF keys
        self.pooler = nn.ModuleDict({"dense": nn.Linear(cfg.dim, cfg.dim)}) if add_pooler else None
        self.grad_ckpt = False     # recompute each layer in backward (activation memory / n_layers)

    def init_random(self, seed: int = 0, std: float = 0.02):
        """Random weights for the demo / bench: N(0, std) like HF's init, LayerNorms at 1 / 0, biases 0."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if "LayerNorm" in name:
                p.data.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                p.data.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, ids, attention_mask=None, token_type_ids=None):
        """ids (B, T), attention_mask (B, T) 1 = real token, 0 = padding (padded keys are masked out)."""
        x = self.embeddings(ids, token_type_ids)                                         # (B, T, D)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.encoder.layer:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        return x, pooled

    @classmethod
    def from_pretrained(cls, path, add_pooler: bool = False, dtype=None) -> "BERT":
        """HF BERT folder (BertModel, BertForMaskedLM or CXR-BERT layout; config.json + safetensors) -> BERT,
        built on the meta device, every key and shape checked. add_pooler=True needs trained pooler weights."""
        folder = resolve(path)
        cfg = bert_config_from_hf(load_config(folder))
        with torch.device("meta"):
            model = cls(cfg, add_pooler=add_pooler)
        has_pooler = any(k.endswith("pooler.dense.weight") for k in tensor_index(folder))
        if add_pooler and not has_pooler:
            raise WeightsError(f"{folder}: add_pooler=True but the checkpoint has no trained pooler (pooler.dense.*); "
                               f"a pooler filled with random weights would silently give meaningless features")
        key_map = BERT_MAP if add_pooler else BERT_MAP | {"pooler.dense.{}": None, "bert.pooler.dense.{}": None}
        return load_mapped(model, folder, key_map, dtype=dtype)


# Copied from medct_lora.py: bert_config_from_hf
def bert_config_from_hf(hf: dict) -> BertConfig:
    """BertConfig from an HF config.json (transformers 4 and 5 write the same BERT keys, except that 5 dropped
    position_embedding_type, which 4 wrote as "absolute"). Refuses what this BERT does not compute."""
    refuse = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        refuse.append(f"position_embedding_type {hf['position_embedding_type']!r} (only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        refuse.append("is_decoder / add_cross_attention (this is the bidirectional encoder only)")
    if hf.get("hidden_act", "gelu") != "gelu":
        refuse.append(f"hidden_act {hf['hidden_act']!r} (only 'gelu', the exact erf GELU)")
    if hf.get("embedding_size", hf["hidden_size"]) != hf["hidden_size"]:
        refuse.append(f"embedding_size {hf['embedding_size']} != hidden_size (an ALBERT/ELECTRA-style factorisation)")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        refuse.append(f"hidden_size {hf['hidden_size']} not divisible by num_attention_heads")
    if refuse:
        raise WeightsError("BERT config not supported: " + "; ".join(refuse))
    # chunk_size_feed_forward only splits the MLP computation into chunks (same result): ignored on purpose
    return BertConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                      n_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                      max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                      eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
                      attn_dropout=hf.get("attention_probs_dropout_prob", 0.1), pad_id=hf.get("pad_token_id") or 0)


# Copied from medct_lora.py: BERT_MAP
BERT_MAP = {  # HF BertModel keys -> ours (identity); "{}" = one dotted component, None = drop
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.{}": "embeddings.LayerNorm.{}",
    "embeddings.position_ids": None,                  # a buffer older transformers saved (CT-CLIP issue #47)
    "encoder.layer.{}.attention.self.query.{}": "encoder.layer.{}.attention.self.query.{}",
    "encoder.layer.{}.attention.self.key.{}": "encoder.layer.{}.attention.self.key.{}",
    "encoder.layer.{}.attention.self.value.{}": "encoder.layer.{}.attention.self.value.{}",
    "encoder.layer.{}.attention.output.dense.{}": "encoder.layer.{}.attention.output.dense.{}",
    "encoder.layer.{}.attention.output.LayerNorm.{}": "encoder.layer.{}.attention.output.LayerNorm.{}",
    "encoder.layer.{}.intermediate.dense.{}": "encoder.layer.{}.intermediate.dense.{}",
    "encoder.layer.{}.output.dense.{}": "encoder.layer.{}.output.dense.{}",
    "encoder.layer.{}.output.LayerNorm.{}": "encoder.layer.{}.output.LayerNorm.{}",
    "pooler.dense.{}": "pooler.dense.{}",
}
BERT_MAP |= {"bert." + k: v for k, v in BERT_MAP.items()} | {  # BertForMaskedLM / CXR-BERT files: "bert." prefix
    "cls.predictions.bias": None,                     # the MLM head (CXR-BERT also has a 128-d projection head)
    "cls.predictions.transform.dense.{}": None,
    "cls.predictions.transform.LayerNorm.{}": None,
    "cls.predictions.decoder.{}": None,
    "cls_projection_head.dense_to_hidden.{}": None,
    "cls_projection_head.LayerNorm.{}": None,
    "cls_projection_head.dense_to_output.{}": None,
}


CXR_BERT = BertConfig(dropout=0.25, attn_dropout=0.25)   # microsoft/BiomedVLP-CXR-BERT-specialized's config


class ProjectionHead(nn.Module):
    """CXR-BERT's projection head, used by ALTA on both sides: Linear(D, E), GELU, LayerNorm(E, 1e-12), Linear(E, E)."""

    def __init__(self, dim: int, proj_dim: int):
        super().__init__()
        self.dense_to_hidden = nn.Linear(dim, proj_dim)
        self.LayerNorm = nn.LayerNorm(proj_dim, eps=1e-12)
        self.dense_to_output = nn.Linear(proj_dim, proj_dim)

    def forward(self, x):
        return self.dense_to_output(self.LayerNorm(F.gelu(self.dense_to_hidden(x))))


class MLMHead(nn.Module):
    """HF BertLMPredictionHead (`cls.predictions`): dense, GELU, LayerNorm, then the decoder, whose weight is the
    word-embedding matrix (tied: passed in, not stored) and whose bias is `bias`."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = nn.ModuleDict({"dense": nn.Linear(cfg.dim, cfg.dim),
                                        "LayerNorm": nn.LayerNorm(cfg.dim, eps=cfg.eps)})
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h, word_embeddings):                 # (N, T, D) -> (N, T, vocab)
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return F.linear(h, word_embeddings, self.bias)


class CXRBert(nn.Module):
    """CXR-BERT-specialized as ALTA uses it (`bert_encoder.*` in ALTA.pth): BERT, the MLM head, the global
    projection head of CXR-BERT and ALTA's local projection head (initialised as a copy of the global one)."""

    def __init__(self, cfg: BertConfig, proj_dim: int):
        super().__init__()
        self.bert = BERT(cfg)
        self.cls = nn.ModuleDict({"predictions": MLMHead(cfg)})
        self.cls_projection_head = ProjectionHead(cfg.dim, proj_dim)
        self.local_projection_head = ProjectionHead(cfg.dim, proj_dim)

    def hidden(self, ids, attention_mask, add=None):
        """ids, attention_mask (N, T) -> last hidden state (N, T, D). add (n, D): a vector added to every token
        embedding of the LAST n rows (the MLM copy of the report gets the image feature, "half for reconstruction").
        The same loop as BERT.forward, opened here only to add that vector after the embeddings."""
        x = self.bert.embeddings(ids)                                                      # (N, T, D)
        if add is not None:
            x = torch.cat([x[:len(x) - len(add)], x[len(x) - len(add):] + add[:, None].to(x.dtype)])
        mask = attention_mask.bool()[:, None, None, :]                                     # (N, 1, 1, T)
        for layer in self.bert.encoder.layer:
            if self.bert.grad_ckpt and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def mlm_logits(self, h):
        return self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)

# ----------------------------------------------------------------------------------------------------------
# ALTA's adapters (AIM-style), inserted by replacing the ViT blocks and BERT layers after construction.
#   ViT block:  y = attn(norm1(x)); x = x + y + A_attn(y); xn = norm2(x); x = x + mlp(xn) + 0.5 A_mlp(xn)
#   BERT layer: h = attention(x) (post-LN); h = h + A_attn(h); out = output(intermediate(h), h) + 0.5 A_mlp(h)
# with A(z) = D_fc2(GELU(D_fc1(z))), D -> D/4 -> D, and D_fc2 zero-initialised: at init the model IS MRM / CXR-BERT.


class Adapter(nn.Module):
    def __init__(self, dim: int, ratio: float, skip: bool):
        super().__init__()
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, int(dim * ratio))
        self.D_fc2 = nn.Linear(int(dim * ratio), dim)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x):
        y = self.D_fc2(F.gelu(self.D_fc1(x)))
        return x + y if self.skip else y


class AdaptedBlock(nn.Module):
    """A ViT Block with ALTA's two adapters; takes over the block's own modules (same parameter names)."""

    def __init__(self, block: Block, ratio: float, scale: float):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        dim = block.norm1.normalized_shape[0]
        self.attn_adapter, self.mlp_adapter = Adapter(dim, ratio, skip=True), Adapter(dim, ratio, skip=False)
        self.scale = scale

    def forward(self, x):
        x = x + self.attn_adapter(self.attn(self.norm1(x)))
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.scale * self.mlp_adapter(xn)


class AdaptedBertLayer(nn.Module):
    """A BertLayer with ALTA's adapters after the post-LN sublayers (the FFN adapter added after the FFN's
    LayerNorm, x 0.5, as the official cxrbert.py); takes over the layer's modules (HF names kept)."""

    def __init__(self, layer: BertLayer, ratio: float, scale: float):
        super().__init__()
        self.attention, self.intermediate, self.output = layer.attention, layer.intermediate, layer.output
        dim = layer.output.dense.out_features
        self.attn_adapter, self.mlp_adapter = Adapter(dim, ratio, skip=True), Adapter(dim, ratio, skip=False)
        self.scale = scale

    def forward(self, x, mask=None):
        h = self.attn_adapter(self.attention(x, mask))
        return self.output(self.intermediate(h), h) + self.scale * self.mlp_adapter(h)

# ----------------------------------------------------------------------------------------------------------
# The method: four views through the adapted ViT, the report through the adapted BERT, four losses


VIEWS = ("current frontal", "current lateral", "prior frontal", "prior lateral")
VIEW_IDS = (0, 1, 0, 1)            # view embedding per view (frontal, lateral)
TIME_IDS = (0, 0, 1, 1)            # temporal embedding per view (current, prior)
TRAIN_RULE = ("head", "norm", "Norm", "adapter", "Adapter", "logit_scale", "cls_token", "temporal_embedding",
              "view_embedding", "decoder_embed", "bert_encoder.cls.predictions", "mask_token", "decoder_pred")


class ALTA(MAEViT):
    """The whole pre-training model, with the official parameter names (so ALTA.pth maps one to one): the MRM
    ViT and its decoder (inherited: patch_embed, blocks, norm, decoder_*), ALTA's extra tokens, the image heads,
    bert_embed (image feature -> BERT embedding space, for MLM), four logit scales and `bert_encoder` (CXRBert).
    forward(batch) -> dict of the four losses; encode_image / encode_text are the inference paths."""

    def __init__(self, vit_cfg: ViTConfig, bert_cfg: BertConfig, cfg: ALTAConfig):
        super().__init__(vit_cfg)
        self.alta_cfg = cfg
        D, N = vit_cfg.dim, vit_cfg.grid ** 2
        self.missing_token = nn.Parameter(torch.zeros(1, N, D))       # official: fp16, zeros, frozen (see top)
        self.temporal_embedding = nn.Parameter(torch.zeros(1, 2, D))
        self.view_embedding = nn.Parameter(torch.zeros(1, 2, D))
        self.bert_embed = nn.Linear(D, bert_cfg.dim)
        self.projection_head = ProjectionHead(D, cfg.proj_dim)
        self.local_projection_head = ProjectionHead(D, cfg.proj_dim)
        for name in ("logit_scale", "logit_scale_local1", "logit_scale_local2", "logit_scale_local3"):
            setattr(self, name, nn.Parameter(torch.tensor(math.log(1 / 0.07))))
        self.bert_encoder = CXRBert(bert_cfg, cfg.proj_dim)
        # every encoder block of the ViT (not the decoder) and every BERT layer becomes its adapted version
        self.blocks = nn.ModuleList(AdaptedBlock(b, cfg.adapter_ratio, cfg.adapter_scale) for b in self.blocks)
        enc = self.bert_encoder.bert.encoder
        enc.layer = nn.ModuleList(AdaptedBertLayer(layer, cfg.adapter_ratio, cfg.adapter_scale) for layer in enc.layer)
        for name, m in self.bert_encoder.named_modules():   # BERT's init for D_fc1 (HF _init_weights: N(0, 0.02))
            if name.endswith("D_fc1"):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.register_buffer("view_ids", torch.tensor(VIEW_IDS), persistent=False)
        self.register_buffer("time_ids", torch.tensor(TIME_IDS), persistent=False)

    def init_weights(self, seed: int = 0):
        """Random weights: the official initialize_weights for the vision side (xavier-uniform Linear and patch
        embedding, cls / mask tokens N(0, 0.02), adapter up-projections zero; LayerNorms keep their 1 / 0),
        xavier text heads and a random BERT (below). Real runs then load MRM and CXR-BERT over it; what those
        files do not hold (adapters, image heads, bert_embed, the extra tokens) keeps these values."""
        g = torch.Generator().manual_seed(seed)

        def xavier_(m):        # xavier-uniform weight from g, zero bias; fans from the shape (Linear and Conv2d alike)
            bound = math.sqrt(6 / (m.weight.shape[0] + m.weight[0].numel()))
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
            m.bias.zero_()

        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear) and not name.startswith("bert_encoder"):
                    xavier_(m)
            xavier_(self.patch_embed.proj)
            self.cls_token.copy_(torch.randn(self.cls_token.shape, generator=g) * 0.02)
            self.mask_token.copy_(torch.randn(self.mask_token.shape, generator=g) * 0.02)
            # A random BERT that is a usable frozen tower (the demo pre-trains from it; real runs load CXR-BERT
            # over it): HF's N(0, 0.02) everywhere gives every text the same CLS (each sublayer adds ~1% to the
            # residual; cosine 0.99 between demo reports); N(0, 0.2) with query / key kept at 0.02 makes
            # attention uniform and the sublayers count, so the CLS summarises the words (same-class minus
            # other-class cosine 0.19, vs 0.02 with query / key at 0.2 too: peaked random attention scrambles it).
            self.bert_encoder.bert.init_random(seed + 1, std=0.2)
            for name, p in self.bert_encoder.bert.named_parameters():
                if name.endswith(("query.weight", "key.weight")):
                    p.mul_(0.1)
            for m in self.bert_encoder.modules():
                if isinstance(m, ProjectionHead):     # the same xavier init as the image heads
                    xavier_(m.dense_to_hidden)
                    xavier_(m.dense_to_output)
                elif isinstance(m, MLMHead):
                    m.transform.dense.weight.copy_(torch.randn(m.transform.dense.weight.shape, generator=g) * 0.02)
                    m.transform.dense.bias.zero_()
                elif isinstance(m, Adapter):
                    m.D_fc1.weight.copy_(torch.randn(m.D_fc1.weight.shape, generator=g) * 0.02)
            for blk in list(self.blocks) + list(self.bert_encoder.bert.encoder.layer):
                for a in (blk.attn_adapter, blk.mlp_adapter):
                    nn.init.zeros_(a.D_fc2.weight)
                    nn.init.zeros_(a.D_fc2.bias)
        self.bert_encoder.local_projection_head.load_state_dict(self.bert_encoder.cls_projection_head.state_dict())
        return self

    # -- inference -----------------------------------------------------------------------------------------
    def encode_image(self, x, normalize: bool = True):
        """One frontal image per study, no masking (official forward_img_feature): (B, 3, H, W) -> (B, E)."""
        x = self.encode(x, self.temporal_embedding[:, :1], self.view_embedding[:, :1])   # current, frontal
        z = self.projection_head(x[:, 0])
        return F.normalize(z.float(), dim=-1) if normalize else z

    def encode_text(self, ids, attention_mask, normalize: bool = True):
        """(N, T) -> (N, E): CXR-BERT's projected CLS (unnormalised when prompts are averaged first)."""
        z = self.bert_encoder.cls_projection_head(self.bert_encoder.hidden(ids, attention_mask)[:, 0])
        return F.normalize(z.float(), dim=-1) if normalize else z

    # -- pre-training ----------------------------------------------------------------------------------------
    def encode_views(self, views, present, which: slice = slice(None)):
        """views (B, V=4, 3, H, W) in VIEWS order, present (B, V) bool -> CLS (B, V, D), visible tokens
        (B, V, n_keep, D), and the masking of each view: ids_restore, mask (B, V, N). Each image is its own
        sequence (B*V, 1 + n_keep, D): no attention across views, as the official code. `which`: the views given,
        when not all four (--bench encodes them one at a time)."""
        B, V = present.shape
        x = self.patch_embed(views.flatten(0, 1))                                        # (B*V, N, D)
        # a missing view (an all-zero image officially) becomes the missing token, then gets positions as usual
        x = torch.where(present.reshape(-1, 1, 1), x, self.missing_token.to(x.dtype))
        x = x + self.pos_embed[:, 1:]
        ids_keep, ids_restore, mask = random_masking(B * V, x.shape[1], self.alta_cfg.mask_ratio, x.device)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[2]))           # (B*V, n_keep, D)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
        vt = (self.view_embedding[0, self.view_ids] + self.temporal_embedding[0, self.time_ids])[which]  # (V, D)
        x = (x.view(B, V, *x.shape[1:]) + vt[:, None]).flatten(0, 1)                     # on every token, CLS too
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x).view(B, V, *x.shape[1:])                                        # (B, V, 1 + n_keep, D)
        return x[:, :, 0], x[:, :, 1:], ids_restore.view(B, V, -1), mask.view(B, V, -1)

    def forward(self, batch: dict, gather: bool = True) -> dict:
        """batch: big (B, 3, 2H, 2W) the current frontal at twice the size (the reconstruction target), views
        (B, 3, 3, H, W) the other three views, present (B, 4), ids / attention_mask (B, T) the report,
        mlm_ids / mlm_labels (B, T) its masked copy. -> {"global", "local", "recon", "mlm"} losses."""
        big, present = batch["big"], batch["present"]
        B, H = big.shape[0], big.shape[-1] // 2
        # official: torchvision Resize(224, bicubic, antialias) of the 448 crop, on the GPU in the forward
        small = F.interpolate(big, size=(H, H), mode="bicubic", align_corners=False, antialias=True)
        views = torch.cat([small[:, None], batch["views"]], 1)                           # (B, 4, 3, H, H)
        cls, tokens, ids_restore, mask = self.encode_views(views, present)
        if self.alta_cfg.fix_missing:          # mean over the views that exist (the current frontal always does)
            w = present.to(cls.dtype)[..., None]
            img_cls = (cls * w).sum(1) / w.sum(1)                                         # (B, D)
        else:                                   # official: the 4-way mean, missing views included
            img_cls = cls.mean(1)
        img_global = F.normalize(self.projection_head(img_cls).float(), dim=-1)          # (B, E)
        img_local = self.local_projection_head(tokens.flatten(1, 2)).float()             # (B, V*n_keep, E)
        regions = present if self.alta_cfg.fix_missing else torch.ones_like(present)    # official: every region
        regions = regions[:, :, None].expand(-1, -1, tokens.shape[2]).flatten(1)          # (B, V*n_keep)

        # text: the report and its MLM copy in one BERT pass; the copy gets bert_embed(image) on every token
        ids, am = batch["ids"], batch["attention_mask"]
        h = self.bert_encoder.hidden(torch.cat([ids, batch["mlm_ids"]]), torch.cat([am, am]),
                                     add=self.bert_embed(img_cls))                       # (2B, T, Dt)
        txt_global = F.normalize(self.bert_encoder.cls_projection_head(h[:B, 0]).float(), dim=-1)
        txt_local = self.bert_encoder.local_projection_head(h[:B, 1:]).float()            # (B, T-1, E)
        words = am[:, 1:].bool()               # the official cap_lens: real tokens after [CLS], [SEP] included

        # reconstruction of the current frontal only (the decoder sees its visible tokens)
        pred = self.decode(torch.cat([cls[:, :1], tokens[:, 0]], 1), ids_restore[:, 0])   # (B, N, (2p)^2 3)

        # MLM logits only where there is a label: the same mean cross-entropy, a fraction of the vocab matmul
        sel = batch["mlm_labels"] != -100
        logits = self.bert_encoder.mlm_logits(h[B:][sel])                                 # (n_sel, vocab)

        if gather:
            img_global, txt_global = R.gather_with_grad(img_global), R.gather_with_grad(txt_global)
            img_local, txt_local = R.gather_with_grad(img_local), R.gather_with_grad(txt_local)
            words = R.gather_with_grad(words.float()).bool()   # official bug: gathered 2B-long lengths, see top
            regions = R.gather_with_grad(regions.float()).bool()
        scales = [getattr(self, f"logit_scale_local{i}").exp() for i in (1, 2, 3)]
        return {"global": global_loss(img_global, txt_global, self.logit_scale.exp()),
                "local": local_loss(img_local, txt_local, words, *scales, regions=regions),
                "recon": recon_loss(pred.float(), big.float(), mask[:, 0], 2 * self.cfg.patch_size),
                "mlm": F.cross_entropy(logits.float(), batch["mlm_labels"][sel]) if sel.any()
                else logits.sum() * 0.0}


def mark_trainable(model: ALTA, cfg: ALTAConfig) -> list:
    """The official rule (util/trainable_params.py): a parameter trains iff its name holds one of TRAIN_RULE. Frozen:
    patch embedding, attention / MLP weights, decoder blocks, BERT embeddings, missing_token, bert_embed (see top)."""
    for name, p in model.named_parameters():
        p.requires_grad = (any(s in name for s in TRAIN_RULE) or (cfg.fix_missing and name == "missing_token")
                           or (cfg.train_bert_embed and name.startswith("bert_embed.")))
    return [name for name, p in model.named_parameters() if p.requires_grad]

# ----------------------------------------------------------------------------------------------------------
# Losses: global InfoNCE, GLoRIA's word-region loss, MAE reconstruction, MLM (inside ALTA.forward)


def global_loss(img, txt, scale):
    """Symmetric InfoNCE over the (gathered) batch: logits = scale img txt^T, the mean of both directions."""
    logits = scale * img @ txt.T                                                          # (N, N)
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def local_loss(img, words, word_mask, t1, t2, t3, regions=None, chunk: int = 16):
    """GLoRIA's word-region loss with learned temperatures (ALTA's LocalClipLoss), batched over captions.
    img (Ni, S, E) region features, words (Nt, L, E), word_mask (Nt, L) the words of each caption.
    For caption t and image i: a = softmax_words(img_i words_t^T) per region; a' = softmax_regions(t1 a^T) per
    word; c = a' img_i (each word's attended context); score_ti = log sum_w exp(t2 cos(word_w, c_w)).
    L = (CE(t3 score^T) + CE(t3 score)) / 2 over images and captions. The official code loops over captions
    one by one; here `chunk` captions at a time, padded words masked out (the same sums, computed once)."""
    if regions is None:
        regions = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
    scores = []
    for c in range(0, len(words), chunk):
        w, m = words[c:c + chunk], word_mask[c:c + chunk]                                # (n, L, E), (n, L)
        a = torch.einsum("ise,nle->nisl", img, w)                                        # (n, Ni, S, L)
        a = a.masked_fill(~m[:, None, None, :], float("-inf")).softmax(-1)               # over words
        a = (t1 * a).transpose(-1, -2)                                                   # (n, Ni, L, S)
        a = a.masked_fill(~regions[None, :, None, :], float("-inf")).softmax(-1)         # over regions
        ctx = torch.einsum("nils,ise->nile", a, img)                                     # (n, Ni, L, E)
        # GLoRIA's cosine: w.c / max(|w| |c|, 1e-8)
        cos = (w[:, None] * ctx).sum(-1) / (w.norm(dim=-1)[:, None] * ctx.norm(dim=-1)).clamp(min=1e-8)
        scores.append((t2 * cos).masked_fill(~m[:, None, :], float("-inf")).logsumexp(-1))  # (n, Ni)
    sim = t3 * torch.cat(scores).T                                                       # (Ni, Nt)
    labels = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def recon_loss(pred, big, mask, p: int):
    """MRM's target: the 2x image patchified at p = 2 x patch, each patch to zero mean / unit variance (norm_pix_loss);
    MSE averaged per patch, then over the masked patches only."""
    target = patchify(big, p)                                                             # (B, N, p*p*3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)                                          # (B, N)
    return (per_patch * mask).sum() / mask.sum()

# ----------------------------------------------------------------------------------------------------------
# Weight loading: safetensors -> our modules through literal key maps ("{}" = one dotted component, None = drop).
# Our names ARE the official ones, so the maps are identities that spell out the checkpoint layout; the .pth files
# convert as at the top (the pickled argparse.Namespace beside the weights is read without running code, dropped).

VISION_MAP = {  # MRM.pth ["model"] and the vision half of ALTA.pth
    "patch_embed.proj.{}": "patch_embed.proj.{}",
    "cls_token": "cls_token", "pos_embed": "pos_embed", "mask_token": "mask_token",
    "blocks.{}.norm1.{}": "blocks.{}.norm1.{}", "blocks.{}.norm2.{}": "blocks.{}.norm2.{}",
    "blocks.{}.attn.qkv.{}": "blocks.{}.attn.qkv.{}", "blocks.{}.attn.proj.{}": "blocks.{}.attn.proj.{}",
    "blocks.{}.mlp.fc1.{}": "blocks.{}.mlp.fc1.{}", "blocks.{}.mlp.fc2.{}": "blocks.{}.mlp.fc2.{}",
    "norm.{}": "norm.{}", "decoder_embed.{}": "decoder_embed.{}", "decoder_pos_embed": "decoder_pos_embed",
    "decoder_blocks.{}.norm1.{}": "decoder_blocks.{}.norm1.{}",
    "decoder_blocks.{}.norm2.{}": "decoder_blocks.{}.norm2.{}",
    "decoder_blocks.{}.attn.qkv.{}": "decoder_blocks.{}.attn.qkv.{}",
    "decoder_blocks.{}.attn.proj.{}": "decoder_blocks.{}.attn.proj.{}",
    "decoder_blocks.{}.mlp.fc1.{}": "decoder_blocks.{}.mlp.fc1.{}",
    "decoder_blocks.{}.mlp.fc2.{}": "decoder_blocks.{}.mlp.fc2.{}",
    "decoder_norm.{}": "decoder_norm.{}", "decoder_pred.{}": "decoder_pred.{}",
}
MRM_MAP = VISION_MAP | {  # MRM's own text side (a 6-layer 384-d BERT and its image->text layer) is not used
    "bert_mlp.{}": None,
    "bert_encoder.model.bert.embeddings.{}.{}": None, "bert_encoder.model.bert.embeddings.position_ids": None,
    "bert_encoder.model.bert.encoder.layer.{}.attention.self.{}.{}": None,
    "bert_encoder.model.bert.encoder.layer.{}.attention.output.{}.{}": None,
    "bert_encoder.model.bert.encoder.layer.{}.intermediate.dense.{}": None,
    "bert_encoder.model.bert.encoder.layer.{}.output.{}.{}": None, "bert_encoder.model.bert.pooler.dense.{}": None,
    "bert_encoder.model.cls.predictions.bias": None, "bert_encoder.model.cls.predictions.transform.{}.{}": None,
    "bert_encoder.model.cls.predictions.decoder.{}": None,
}
ALTA_MAP = VISION_MAP | {  # ALTA.pth ["model"]: everything
    "missing_token": "missing_token", "temporal_embedding": "temporal_embedding", "view_embedding": "view_embedding",
    "blocks.{}.attn_adapter.{}.{}": "blocks.{}.attn_adapter.{}.{}",
    "blocks.{}.mlp_adapter.{}.{}": "blocks.{}.mlp_adapter.{}.{}",
    "projection_head.{}.{}": "projection_head.{}.{}", "local_projection_head.{}.{}": "local_projection_head.{}.{}",
    "logit_scale": "logit_scale", "logit_scale_local1": "logit_scale_local1",
    "logit_scale_local2": "logit_scale_local2", "logit_scale_local3": "logit_scale_local3",
    "bert_embed.{}": "bert_embed.{}", "bert_encoder.bert.embeddings.{}.{}": "bert_encoder.bert.embeddings.{}.{}",
    "bert_encoder.bert.embeddings.position_ids": None,       # a buffer transformers < 4.31 saved
    "bert_encoder.bert.encoder.layer.{}.attention.self.{}.{}":
        "bert_encoder.bert.encoder.layer.{}.attention.self.{}.{}",
    "bert_encoder.bert.encoder.layer.{}.attention.output.{}.{}":
        "bert_encoder.bert.encoder.layer.{}.attention.output.{}.{}",
    "bert_encoder.bert.encoder.layer.{}.intermediate.dense.{}":
        "bert_encoder.bert.encoder.layer.{}.intermediate.dense.{}",
    "bert_encoder.bert.encoder.layer.{}.output.{}.{}": "bert_encoder.bert.encoder.layer.{}.output.{}.{}",
    "bert_encoder.bert.encoder.layer.{}.attn_adapter.{}.{}": "bert_encoder.bert.encoder.layer.{}.attn_adapter.{}.{}",
    "bert_encoder.bert.encoder.layer.{}.mlp_adapter.{}.{}": "bert_encoder.bert.encoder.layer.{}.mlp_adapter.{}.{}",
    "bert_encoder.cls.predictions.bias": "bert_encoder.cls.predictions.bias",
    "bert_encoder.cls.predictions.transform.{}.{}": "bert_encoder.cls.predictions.transform.{}.{}",
    "bert_encoder.cls.predictions.decoder.weight": None,     # tied: the word embeddings
    "bert_encoder.cls.predictions.decoder.bias": None,       # tied: cls.predictions.bias
    "bert_encoder.cls_projection_head.{}.{}": "bert_encoder.cls_projection_head.{}.{}",
    "bert_encoder.local_projection_head.{}.{}": "bert_encoder.local_projection_head.{}.{}",
}
CXRBERT_MAP = {  # microsoft/BiomedVLP-CXR-BERT-specialized (CXRBertModel = BertForMaskedLM + projection head)
    "bert.embeddings.{}.{}": "bert_encoder.bert.embeddings.{}.{}", "bert.embeddings.position_ids": None,
    "bert.encoder.layer.{}.attention.self.{}.{}": "bert_encoder.bert.encoder.layer.{}.attention.self.{}.{}",
    "bert.encoder.layer.{}.attention.output.{}.{}": "bert_encoder.bert.encoder.layer.{}.attention.output.{}.{}",
    "bert.encoder.layer.{}.intermediate.dense.{}": "bert_encoder.bert.encoder.layer.{}.intermediate.dense.{}",
    "bert.encoder.layer.{}.output.{}.{}": "bert_encoder.bert.encoder.layer.{}.output.{}.{}",
    "cls.predictions.bias": "bert_encoder.cls.predictions.bias",
    "cls.predictions.transform.{}.{}": "bert_encoder.cls.predictions.transform.{}.{}",
    "cls.predictions.decoder.weight": None, "cls.predictions.decoder.bias": None,       # tied
    "cls_projection_head.{}.{}": "bert_encoder.cls_projection_head.{}.{}",
}


def load_part(model: ALTA, path, key_map: dict, wanted):
    """Load the tensors with wanted(name) true from a safetensors file or folder, each required, every checkpoint
    key accounted for by key_map; the others keep their values. Floats as fp32 (ALTA.pth's missing token is fp16)."""
    others = [k for k in model.state_dict() if not wanted(k)]
    return load_mapped(model, path, key_map, dtype=torch.float32, drop_missing=others)


def is_vision_key(name: str) -> bool:   # what MRM holds: the model names VISION_MAP produces
    return map_key(name, VISION_MAP) is not False


def is_cxrbert_key(name: str) -> bool:  # what CXR-BERT holds: BERT, MLM head, its projection head
    return name.startswith("bert_encoder.") and "adapter" not in name and "local_projection_head" not in name


def build_model(vit_cfg: ViTConfig, bert_cfg: BertConfig, cfg: ALTAConfig, init=None, vision=None, text=None,
                seed: int = 0) -> ALTA:
    """The model, random (init_weights), then MRM (vision=...) and CXR-BERT (text=...) loaded over it, or a whole
    ALTA.safetensors (init=...). The local text head starts as a copy of the loaded global one."""
    model = ALTA(vit_cfg, bert_cfg, cfg).init_weights(seed)
    if vision is not None:
        load_part(model, vision, MRM_MAP, is_vision_key)
    if text is not None:
        load_part(model, text, CXRBERT_MAP, is_cxrbert_key)
        model.bert_encoder.local_projection_head.load_state_dict(model.bert_encoder.cls_projection_head.state_dict())
    if init is not None:
        load_part(model, init, ALTA_MAP, lambda name: True)
    return model


def is_tower_key(name: str) -> bool:
    """What DEMO_TOWERS holds: what MRM and CXR-BERT would give, plus the image head; not the MAE decoder (the
    demo's pre-training never reaches it) nor the fixed sin-cos tables (fp16 would round them)."""
    return ((is_vision_key(name) or is_cxrbert_key(name) or name.startswith("projection_head."))
            and not name.startswith(("decoder_", "mask_token", "pos_embed")))


def load_demo_towers(model: ALTA, tok):
    """The demo's stand-ins for MRM and CXR-BERT (DEMO_TOWERS: module docstring, is_tower_key). The file names the
    vocabulary it was made with, which must be the demo's."""
    with safe_open(str(DEMO_TOWERS), "pt") as f:
        made_for = f.metadata().get("vocab")
    if made_for != json.dumps(tok.get_vocab(), sort_keys=True):
        raise R.RunError(f"{DEMO_TOWERS}: made for another demo vocabulary (has data/demo changed?); remake it: "
                         "python -m common.demo_weights.make_alta_towers")
    R.load_tensors(model, read_safetensors(DEMO_TOWERS, dtype=torch.float32), str(DEMO_TOWERS),
                   required=[k for k in model.state_dict() if is_tower_key(k)])
    model.bert_encoder.local_projection_head.load_state_dict(model.bert_encoder.cls_projection_head.state_dict())

# ----------------------------------------------------------------------------------------------------------
# Data: studies of up to four views + a report (common.data reads the CSV, common.text the words); MLM masking


CXR_MEAN, CXR_STD = (0.4785,) * 3, (0.2834,) * 3      # the official Normalize(0.4785, 0.2834) on grayscale x 3
# what --data means: folder under data/, the reports CSVs, the text length, grayscale or not (common.data's
# missing_dataset says where to download each and that `python -m common.prepare <dir>` writes it)
DATASETS = {
    "demo": dict(dir="demo", train="reports_train.csv", test="reports_test.csv", max_len=64, gray=False),
    "mimic-cxr": dict(dir="mimic-cxr", train="reports_train.csv", test=None, max_len=128, gray=True),
}


def demo_tokenizer(root: Path):
    """The demo's WordPiece vocabulary: the words of its reports (both splits) and class descriptions."""
    corpus = [r["report"] for csv in ("reports_train.csv", "reports_test.csv")
              for r in RV.read_rows(root / csv, ["report"])]
    descriptions = json.loads((root / "classes.json").read_text())["descriptions"]
    return wordpiece_tokenizer(corpus=corpus + [t for ts in descriptions.values() for t in ts])


def mlm_mask(ids, tok, g: torch.Generator, prob: float = 0.5, mode_8010: bool = False):
    """-> (masked ids, labels with -100 where nothing is predicted). `prob` of the non-special tokens are
    selected; each becomes [MASK] (official, see top), or with mode_8010 80% [MASK], 10% random, 10% unchanged."""
    special = torch.isin(ids, torch.tensor([tok.token_to_id(s) for s in ("[PAD]", "[CLS]", "[SEP]")]))
    sel = (torch.rand(ids.shape, generator=g) < prob) & ~special
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    out = ids.clone()
    if not mode_8010:
        return out.masked_fill(sel, tok.token_to_id("[MASK]")), labels
    u = torch.rand(ids.shape, generator=g)
    out[sel & (u < 0.8)] = tok.token_to_id("[MASK]")
    rand = sel & (u >= 0.8) & (u < 0.9)
    out[rand] = torch.randint(len(SPECIALS), tok.get_vocab_size(), ids.shape, generator=g)[rand]
    return out, labels


def image_transform(size: int, gray: bool):
    """-> (geometry, to_tensor); the random affine + jitter goes between them when training. Geometry: shorter side
    to size x 8/7 (bicubic), centre crop `size` (the official 256 -> 224 and 512 -> 448). Then torchvision's
    Grayscale(3) for X-rays (luma, 3 channels; the demo's colour photos stay RGB), tensor, Normalize (CXR_*)."""
    geometry = Compose([ToRGB(), Resize(round(size * 8 / 7)), CenterCrop(size)])
    return geometry, Compose([*([ToGray(), ToRGB()] if gray else []), ToTensor(), Normalize(CXR_MEAN, CXR_STD)])


class StudyDataset(Dataset):
    """One study per CSV row (common.data.ImageReportDataset reads and checks the CSV): the current frontal at
    2 x size (the reconstruction target; the model resizes it to `size`), the three other views at `size`
    (zeros + present=False when missing), the report (sentences shuffled when training) and its MLM copy.
    Randomness comes from a generator seeded by (seed, epoch, index): any worker, any resume, same sample."""

    def __init__(self, csv_path, root, tok, size: int, max_len: int, gray: bool, train: bool, seed: int = 0,
                 mlm_8010: bool = False):
        self.table = ImageReportDataset(root, csv_path, multiview=True)
        self.tok, self.size, self.max_len, self.train = tok, size, max_len, train
        self.seed, self.mlm_8010, self.aug, self.epoch = seed, mlm_8010, AffineJitter(), 0
        self.geo_big, self.to_tensor = image_transform(2 * size, gray)
        self.geo_small, _ = image_transform(size, gray)
        for it in self.table.items:
            if not re.search(r"\w", it["report"]):
                raise DataError(f"{self.table.csv_path}: the report of {it['image_path']} is empty: every study needs "
                                "a report (drop the row, or write the findings)")

    def __len__(self):
        return len(self.table.items)

    def __getitem__(self, i):
        it = self.table.items[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        # one draw for both frontal images and one for both laterals: a study's views move alike
        frontal, lateral = (self.aug.sample(g), self.aug.sample(g)) if self.train else (None, None)
        load = lambda p: load_image(self.table.root / p)
        big = self.to_tensor(self.aug(self.geo_big(load(it["image_path"])), frontal))
        others = (("auxview_image_path", lateral), ("last_image_path", frontal), ("last_auxview_image_path", lateral))
        views = [torch.zeros(3, self.size, self.size) if it[col] is None else
                 self.to_tensor(self.aug(self.geo_small(load(it[col])), p)) for col, p in others]
        present = [True] + [it[col] is not None for col, _ in others]
        report = shuffle_sentences(it["report"], g) if self.train else it["report"]
        ids, am = tokenize(self.tok, [report], self.max_len)
        mlm_ids, labels = mlm_mask(ids, self.tok, g, mode_8010=self.mlm_8010)
        return {"big": big, "views": torch.stack(views), "present": torch.tensor(present), "ids": ids[0],
                "attention_mask": am[0], "mlm_ids": mlm_ids[0], "mlm_labels": labels[0]}

# ----------------------------------------------------------------------------------------------------------
# Training: the official recipe (module docstring)


def lr_at(epoch: float, args) -> float:
    """util/lr_sched.py: linear warm-up for warmup_epochs, then half-cosine to 0 at sched_epochs (cut at --epochs)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    t = (epoch - args.warmup_epochs) / max(1e-9, args.sched_epochs - args.warmup_epochs)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: ALTA, lr: float, wd: float = 0.05):
    """timm's param_groups_weight_decay; the 3-D tokens ARE decayed (the official code never calls no_weight_decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def trainable_tensors(model: ALTA) -> dict:
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(args, world, model: ALTA, ds: StudyDataset, run_dir: Path, select=None) -> dict:
    """Pre-train with the four losses. select(model) -> a number to maximise (model selection: RSNA validation
    zero-shot AUROC officially) or None; the best weights go to best.safetensors."""
    opt, scaler = make_optimizer(model, args.lr), R.make_scaler(args.precision, world.device)
    net = R.wrap_model(model, world, compile=args.compile)
    per_epoch = len(R.epoch_batches(len(ds), args.batch_size, args.seed, 0, world))
    total = args.epochs * per_epoch if not args.steps else min(args.steps, args.epochs * per_epoch)
    ckpts = R.Checkpoints(run_dir / "ckpt", world)
    step, best = 0, {"value": None, "epoch": None}
    ck = ckpts.load(optimizer=opt, scaler=scaler, resuming=bool(args.resume))
    if ck is not None:
        R.load_tensors(model, ck.tensors, str(ck.path))
        step, best = ck.step, ck.extra.get("best", best)
    log = R.JsonlLog(run_dir / "metrics.jsonl", world.is_main)
    prog = R.Progress(total, "pre-train", world.is_main, args.print_every, start=step)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        ds.epoch = epoch
        batches = R.epoch_batches(len(ds), args.batch_size, args.seed, epoch, world)[skip:]
        net.train()
        for batch in R.epoch_loader(ds, batches, world, args.num_workers, args.seed, epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step / per_epoch, args)
            with R.autocast(world.device, args.precision):
                losses = net(to_device(batch, world.device))
            value = R.optimizer_step(sum(losses.values()), opt, scaler, world, step)
            with torch.no_grad():   # official: all four scales clamped to [0, ln 100] after every step
                for name in ("logit_scale", "logit_scale_local1", "logit_scale_local2", "logit_scale_local3"):
                    getattr(model, name).clamp_(0, math.log(100))
            step += 1
            if step % args.log_every == 0 or step == total:
                parts = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
                log.log(step=step, epoch=epoch, lr=opt.param_groups[0]["lr"], loss=value, **parts)
            prog.update(loss=value)
            if step % args.ckpt_every == 0 and step % per_epoch and step < total:   # epoch ends: below
                ckpts.save(step, trainable_tensors(model), optimizer=opt, scaler=scaler, extra={"best": best})
            if step == total:
                break
        if step % per_epoch == 0 or step == total:   # end of an epoch: select, then checkpoint
            value = select(model) if select is not None and not args.no_select else None
            if value is not None and (best["value"] is None or value > best["value"]):
                best = {"value": value, "epoch": epoch}
                if world.is_main:
                    R.save_tensors(run_dir / "best.safetensors", trainable_tensors(model))
            if value is not None:
                log.log(step=step, epoch=epoch, select=value)
            ckpts.save(step, trainable_tensors(model), optimizer=opt, scaler=scaler, extra={"best": best})
    if world.is_main:
        R.save_tensors(run_dir / "trainable.safetensors", trainable_tensors(model))
    return best

# ----------------------------------------------------------------------------------------------------------
# Evaluation, as the official scripts: one frontal image per study (encode_image), CXR-BERT's projected CLS;
# the sets' readers, precision@K and the threshold protocol are common/retrieval.py


def embed_images(model: ALTA, paths, size: int, gray: bool, device, precision) -> torch.Tensor:   # (N, E)
    geo, to_tensor = image_transform(size, gray)
    model.eval()
    load = lambda ps: torch.stack([to_tensor(geo(load_image(p))) for p in ps]).to(device)
    return RV.embed(lambda ps: model.encode_image(load(ps)), paths, 64, device, precision)


def embed_texts(model: ALTA, tok, texts, length: int, device, precision, normalize=True) -> torch.Tensor:
    model.eval()
    encode = lambda ts: model.encode_text(*(t.to(device) for t in tokenize(tok, ts, length)), normalize)
    return RV.embed(encode, list(texts), 256, device, precision)


def class_embeddings(model, tok, prompts: dict, length: int, device, precision) -> torch.Tensor:
    """The 5x200 zero-shot rule: a class is the L2-normalised mean of its UNnormalised prompt embeddings."""
    return torch.stack([F.normalize(embed_texts(model, tok, p, length, device, precision, normalize=False)
                                    .mean(0), dim=-1) for p in prompts.values()])          # (C, E)


CHEXPERT_CLASS_PROMPTS = {  # GLoRIA's prompt parts (the 5x200 zero-shot script); every combination is used
    "Atelectasis": {"severity": ["", "mild", "minimal"],
                    "subtype": ["subsegmental atelectasis", "linear atelectasis", "trace atelectasis",
                                "bibasilar atelectasis", "retrocardiac atelectasis", "bandlike atelectasis",
                                "residual atelectasis"],
                    "location": ["at the mid lung zone", "at the upper lung zone", "at the right lung zone",
                                 "at the left lung zone", "at the lung bases", "at the right lung base",
                                 "at the left lung base", "at the bilateral lung bases", "at the left lower lobe",
                                 "at the right lower lobe"]},
    "Cardiomegaly": {"severity": [""],
                     "subtype": ["cardiac silhouette size is upper limits of normal", "cardiomegaly which is unchanged",
                                 "mildly prominent cardiac silhouette",
                                 "portable view of the chest demonstrates stable cardiomegaly",
                                 "portable view of the chest demonstrates mild cardiomegaly",
                                 "persistent severe cardiomegaly", "heart size is borderline enlarged",
                                 "cardiomegaly unchanged", "heart size is at the upper limits of normal",
                                 "redemonstration of cardiomegaly",
                                 "ap erect chest radiograph demonstrates the heart size is the upper limits of normal",
                                 "cardiac silhouette size is mildly enlarged",
                                 "mildly enlarged cardiac silhouette, likely left ventricular enlargement. other "
                                 "chambers are less prominent",
                                 "heart size remains at mildly enlarged",
                                 "persistent cardiomegaly with prominent upper lobe vessels"],
                     "location": [""]},
    "Consolidation": {"severity": ["", "increased", "improved", "apperance of"],
                      "subtype": ["bilateral consolidation", "reticular consolidation", "retrocardiac consolidation",
                                  "patchy consolidation", "airspace consolidation", "partial consolidation"],
                      "location": ["at the lower lung zone", "at the upper lung zone", "at the left lower lobe",
                                   "at the right lower lobe", "at the left upper lobe", "at the right uppper lobe",
                                   "at the right lung base", "at the left lung base"]},
    "Edema": {"severity": ["", "mild", "improvement in", "presistent", "moderate", "decreased"],
              "subtype": ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"],
              "location": [""]},
    "Pleural Effusion": {"severity": ["", "small", "stable", "large", "decreased", "increased"],   # NOTE the order:
                         "location": ["left", "right", "tiny"],                                    # severity, location,
                         "subtype": ["bilateral pleural effusion", "subpulmonic pleural effusion",  # subtype, as GLoRIA
                                     "bilateral pleural effusion"]},
}


def chexpert_prompts() -> dict:
    """All combinations (the official n = 10000 exceeds every pool: it samples them all): 210/15/192/18/54 prompts."""
    return {name: [gloria_clean(f"{x} {y} {z}".strip()) for x, y, z in itertools.product(*parts.values())]
            for name, parts in CHEXPERT_CLASS_PROMPTS.items()}


def evaluate(what: str, model: ALTA, tok, args, root: Path) -> dict:
    """One official evaluation; root is the dataset folder. Returns the metrics (printed by the caller)."""
    dev, prec, size = torch.device(args.device), args.precision, model.cfg.img_size
    images = lambda paths, gray=True: embed_images(model, paths, size, gray, dev, prec)
    texts = lambda ts, length: embed_texts(model, tok, ts, length, dev, prec)
    if what in ("demo", "demo-val"):   # demo: zero-shot and retrieval on the test split; demo-val: zero-shot on val
        split = json.loads((root / "split_demo.json").read_text())["val" if what == "demo-val" else "test"]
        img, y = images([root / p for p, _, _ in split], gray=False), np.array([label for _, label, _ in split])
        classes = json.loads((root / "classes.json").read_text())
        sim = img @ class_embeddings(model, tok, {c: classes["descriptions"][c] for c in classes["classnames"]},
                                     args.max_len, dev, prec).T
        zero_shot = {"ACC": M.accuracy(y, sim.argmax(1).numpy()), "AUROC": M.auroc(y, sim.softmax(1).numpy()),
                     "chance": 1 / sim.shape[1]}
        if what == "demo-val":
            return zero_shot
        rows = RV.read_rows(root / "reports_test.csv", ["image_path", "report"])
        reports = {r["image_path"]: r["report"] for r in rows}
        txt = texts([gloria_clean(reports[p]) for p, _, _ in split], args.max_len)
        return {"demo-zeroshot": zero_shot, "demo-retrieval": RV.precision_table(img, txt, y, y, (5, 10)) |
                {"chance": float(np.mean(np.bincount(y) / len(y)))}}
    if what.startswith("chexpert5x200"):
        paths, y, impressions = RV.chexpert5x200(root, impressions=what.endswith("retrieval"))
        if what == "chexpert5x200-zeroshot":
            sim = images(paths) @ class_embeddings(model, tok, chexpert_prompts(), 128, dev, prec).T
            return {"ACC": M.accuracy(y, sim.argmax(1).numpy())}
        return RV.precision_table(images(paths), texts([gloria_clean(t) for t in impressions], 256), y, y, (5, 10, 100))
    if what.startswith("chexpert8x200"):
        queries, q_label, cand, c_label = RV.chexpert8x200(root, "text" if what.endswith("txt2img") else "image")
        q = texts(queries, 20) if what.endswith("txt2img") else images(queries)
        return RV.precision_table(q, images(cand), q_label, c_label, (5, 10, 50))
    if what.startswith("rsna"):   # p = softmax over the two prompts' cosines, temperature 1
        paths, y = RV.rsna(root, "valid" if what == "rsna-val" else "test")
        pos, neg = texts(["There is pneumonia", "There is no pneumonia"], 10)
        img = images(paths)
        p_pos = torch.stack([img @ pos, img @ neg], 1).softmax(1)[:, 0].numpy()
        return {"AUROC": M.auroc(y, p_pos)} if what == "rsna-val" else RV.threshold_protocol(y, p_pos)
    raise ValueError(what)


EVALS = {  # --eval NAME: the dataset folder it reads, and how to prepare it
    "chexpert5x200-retrieval": ("data/chexpert", "python -m common.prepare chexpert --src <CheXpert-v1.0>; the "
                                "CSV with 'Report Impression' comes with DopamineLcy/ALTA"),
    "chexpert5x200-zeroshot": ("data/chexpert", "python -m common.prepare chexpert --src <CheXpert-v1.0>"),
    "chexpert8x200-img2img": ("data/chexpert8x200", "python -m common.prepare chexpert8x200 --src <folder with "
                              "ConVIRT's image-retrieval/, text-retrieval/ and CheXpert-v1.0-small/>"),
    "chexpert8x200-txt2img": ("data/chexpert8x200", "python -m common.prepare chexpert8x200 --src <same folder>"),
    "rsna-zeroshot": ("data/rsna", "python -m common.prepare rsna --src <rsna-pneumonia-detection-challenge>"),
}

# ----------------------------------------------------------------------------------------------------------
# Benchmark at the paper's size (random weights, no download)


def run_bench(args, world, vit_cfg: ViTConfig = ViTConfig(), bert_cfg: BertConfig = CXR_BERT):
    """A pre-training step with all four losses (B = --batch-size, four views each) and the inference path, at the
    real size; then the cost of encoding the four views one view at a time instead of as one (B x 4) batch."""
    dev, prec = world.device, args.precision
    model = ALTA(vit_cfg, bert_cfg, ALTAConfig()).to(dev)
    mark_trainable(model, model.alta_cfg)
    R.cast_frozen(model, R.PRECISIONS[prec])
    B, T, S = args.batch_size, min(128, bert_cfg.max_positions), vit_cfg.img_size
    ids = torch.randint(5, bert_cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    present = torch.rand(B, 4) < 0.8
    present[:, 0] = True
    batch = to_device({"big": torch.randn(B, 3, 2 * S, 2 * S), "views": torch.randn(B, 3, 3, S, S), "present": present,
                       "ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
                       "mlm_ids": ids.masked_fill(torch.rand(B, T) < 0.5, 4),
                       "mlm_labels": ids.masked_fill(torch.rand(B, T) < 0.5, -100)}, dev)
    views = torch.cat([batch["big"][:, None, :, :S, :S], batch["views"]], 1)                # (B, 4, 3, S, S)
    opt, scaler = make_optimizer(model, 1e-4), R.make_scaler(prec, dev)

    def step():
        with R.autocast(dev, prec):
            loss = sum(model(batch).values())
        R.optimizer_step(loss, opt, scaler, world, 0)

    def forward_only(fn):
        def run():
            with torch.no_grad(), R.autocast(dev, prec):
                fn()
        return run

    cases = [("pre-train step, 4 losses, 4 views", step),
             ("inference: encode_image", forward_only(lambda: model.encode_image(views[:, 0]))),
             # what forward does (one pass of B x 4 images) vs four passes of B images, one per view
             ("4 views as one (B x 4) batch, fwd", forward_only(lambda: model.encode_views(views, batch["present"]))),
             ("4 views one at a time, fwd", forward_only(lambda: [model.encode_views(
                 views[:, v:v + 1], batch["present"][:, v:v + 1], slice(v, v + 1)) for v in range(4)]))]
    print(R.BENCH_COLUMNS)
    return [R.bench_step(what, fn, precision=prec, batch=B, device=dev, steps=args.bench_steps, unit="study")
            for what, fn in cases]

# ----------------------------------------------------------------------------------------------------------
# main


# demo only (measured, 3 seeds: lr 3e-4 beats 1e-3 on zero-shot ACC 0.42-0.45 vs 0.31-0.40 and P@5 0.40-0.42 vs
# 0.35-0.40, with AUROC 0.76-0.78 vs 0.77-0.82: the smaller steps keep more of what the pre-trained towers align)
DEMO_RECIPE = dict(vit="tiny", epochs=8, batch_size=24, lr=3e-4, warmup_epochs=1.0, sched_epochs=8.0)
# no dropout in the demo's random BERT: its CLS is so sensitive to it that every step would see other text features
DEMO_BERT = dict(dim=64, n_layers=2, n_heads=4, mlp_dim=128, max_positions=64, dropout=0.0, attn_dropout=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="alta.py", description=__doc__.split("\n")[0])
    R.add_common_args(p, datasets=DATASETS, data="demo", epochs=30, batch_size=24, lr=5.625e-5, ckpt_every=1000,
                      help={"epochs": "paper: 30 (of a 100-epoch cosine), demo: 8",
                            "batch_size": "paper: 24 per GPU x 4, demo: 24",
                            "lr": "paper: 1.5e-4 x global batch / 256 = 5.625e-5, demo: 3e-4",
                            "ckpt_every": "also at every epoch end, after model selection"})
    p.add_argument("--vit", default="vit-b16", choices=list(VIT_PRESETS), help="ViT size (demo: tiny)")
    p.add_argument("--init-vision", default=None, metavar="MRM.safetensors", help="the MRM image encoder")
    p.add_argument("--text", default=None, metavar="FOLDER",
                   help="CXR-BERT-specialized folder (config.json, safetensors, vocab.txt)")
    p.add_argument("--init", default=None, metavar="RUN|ALTA.safetensors", help="start from a run's or ALTA's weights")
    p.add_argument("--eval", default=None, choices=list(EVALS), help="run one official evaluation and stop")
    p.add_argument("--warmup-epochs", type=float, default=10.0, help="linear warm-up (paper: 10, demo: 1)")
    p.add_argument("--sched-epochs", type=float, default=100.0, help="length of the half-cosine (paper: 100, demo: 8)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="MAE masking of every view")
    p.add_argument("--no-select", action="store_true", help="skip the per-epoch model-selection evaluation")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--mlm-8010", action="store_true", help="80/10/10 MLM corruption (official code: all [MASK])")
    p.add_argument("--fix-missing", action="store_true", help="train the missing token, leave missing views out")
    p.add_argument("--train-bert-embed", action="store_true", help="train bert_embed (official: frozen random)")
    p.add_argument("--train-all", action="store_true", help="train the towers too (random towers: no MRM to adapt)")
    argv = sys.argv[1:] if argv is None else argv
    args, given = p.parse_args(argv), R.given_flags(p, argv)
    if args.resume:
        R.restore_run_args_or_exit(p, args, given, free=("steps",))   # a longer --steps only runs further
    elif args.data == "demo" and not args.eval:
        vars(args).update({k: v for k, v in DEMO_RECIPE.items() if k not in given})
    elif "lr" not in given:              # official: lr = blr x effective batch / 256
        args.lr = 1.5e-4 * args.batch_size * int(os.environ.get("WORLD_SIZE", "1")) / 256
    args.max_len = DATASETS[args.data]["max_len"]
    R.check_flags(p, args, [("mask_ratio", 0 <= args.mask_ratio < 1, "in [0, 1)"),
                            ("warmup_epochs", args.warmup_epochs >= 0, "0 or more"),
                            ("sched_epochs", args.sched_epochs > 0, "above 0")])
    return R.finish_common_args(p, args)


def uses_demo_towers(args) -> bool:   # the tiny pair with no real or ALTA weights: the demo's MRM + CXR-BERT
    return args.vit == "tiny" and not args.text and not args.init_vision and not str(args.init).endswith(".safetensors")


def build(args, world, tok):
    """Model for these flags: the demo's tiny pair, or ViT-B/16 + CXR-BERT (random unless loaded)."""
    vit_cfg = VIT_PRESETS[args.vit]
    cfg = ALTAConfig(mask_ratio=args.mask_ratio, fix_missing=args.fix_missing, train_bert_embed=args.train_bert_embed)
    bert_cfg = (bert_config_from_hf(load_config(resolve(args.text))) if args.text else
                BertConfig(vocab_size=tok.get_vocab_size(), **DEMO_BERT) if args.vit == "tiny" else CXR_BERT)
    init = args.init if args.init and str(args.init).endswith(".safetensors") else None
    model = build_model(vit_cfg, bert_cfg, cfg, init=init, vision=args.init_vision, text=args.text, seed=args.seed)
    if uses_demo_towers(args):
        load_demo_towers(model, tok)         # the demo's MRM + CXR-BERT; a run's --init / checkpoints load over
    if args.init and init is None:          # a run folder of this script: its best (or last) trained tensors
        best = Path(args.init) / "best.safetensors"
        R.load_final(model, args.init, "cpu", name=best.name if best.is_file() else "trainable.safetensors")
    mark_trainable(model, cfg)
    if args.train_all:                       # everything but the fixed sin-cos tables
        for name, p in model.named_parameters():
            p.requires_grad = "pos_embed" not in name
    return model.to(world.device)


def preflight(args):
    """Everything missing, said at once, before any work."""
    problems, d = [], DATASETS[args.data]
    root = dataset_root(args.data, d, args.data_dir)
    missing = args.data != "demo" and not args.eval and missing_dataset(args.data, d, root, d["train"])
    problems += [missing] if missing else []
    for flag, path in (("--init-vision", args.init_vision), ("--text", args.text), ("--init", args.init)):
        if path and not Path(path).exists():
            problems.append(f"{flag} {path}: not found (download: see data/README.md and `python -m common.weights`)")
    if args.data != "demo" and not args.eval and (not args.init_vision or not args.text):
        problems.append("real pre-training needs --init-vision MRM.safetensors (convert MRM.pth with `python -m "
                        "common.weights convert MRM.pth MRM.safetensors --key model`) and --text <CXR-BERT folder>")
    if args.eval:
        folder = Path(args.data_dir or REPO / EVALS[args.eval][0])
        if not args.text:
            problems.append(f"--eval {args.eval} needs --text <CXR-BERT-specialized folder> (its tokenizer and config)")
        if not args.init:
            problems.append(f"--eval {args.eval} needs --init ALTA.safetensors or --init RUN_DIR")
        if not folder.is_dir():
            problems.append(f"--eval {args.eval}: {folder} not found; prepare it with `{EVALS[args.eval][1]}`")
    if uses_demo_towers(args) and not DEMO_TOWERS.is_file():   # e.g. alta.py copied without common/demo_weights
        problems.append(f"{DEMO_TOWERS}: the demo's pre-trained tiny ViT + BERT are missing; copy common/demo_weights/ "
                        "with this file, or remake it: python -m common.demo_weights.make_alta_towers")
    if problems:
        raise DataError("cannot start:\n  " + "\n  ".join(p.replace("\n", "\n  ") for p in problems))
    return root


def run(args, world) -> dict:
    if args.eval_only:                       # --resume RUN --eval-only: that run's best (or last) weights
        args.init = args.resume
    root = preflight(args)
    if args.data == "demo":
        from common.demo import ensure_demo
        ensure_demo(root)
    R.seed_everything(args.seed, world.rank)
    tok = wordpiece_tokenizer(args.text) if args.text else demo_tokenizer(root)   # without --text: the demo only
    model = build(args, world, tok)
    R.cast_frozen(model, R.PRECISIONS[args.precision])    # frozen Linear / Conv / Embedding weights in bf16 / fp16
    if args.eval:
        res = evaluate(args.eval, model, tok, args, Path(args.data_dir or REPO / EVALS[args.eval][0]))
        if world.is_main:
            print(json.dumps({args.eval: res}, indent=1))
        return res
    run_dir = Path(args.resume) if args.resume else R.new_run_dir("alta", args.data, args.out, vars(args), world)
    ds = StudyDataset(root / DATASETS[args.data]["train"], root, tok, model.cfg.img_size, args.max_len,
                      DATASETS[args.data]["gray"], train=True, seed=args.seed, mlm_8010=args.mlm_8010)
    rsna = REPO / "data" / "rsna" / "valid.csv"
    # model selection by validation zero-shot AUROC: the demo's own split, else RSNA's when it is prepared
    val_set, val_root = ("demo-val", root) if args.data == "demo" else ("rsna-val", rsna.parent)
    select = None
    if args.data == "demo" or rsna.is_file():
        select = lambda m: evaluate(val_set, m, tok, args, val_root)["AUROC"] if world.is_main else None
    if not args.eval_only:
        try:
            best = train(args, world, model, ds, run_dir, select)
        except (R.NonFiniteLoss, KeyboardInterrupt) as e:   # say what is on disk and how to continue
            raise R.Stopped(e, run_dir, "python alta.py") from None
        if world.is_main and best["value"] is not None:
            print(f"model selection: best {best['value']:.4f} at epoch {best['epoch']}; evaluating those weights")
    if (run_dir / "best.safetensors").is_file():   # as the official best_auroc checkpoint
        R.load_final(model, run_dir, world.device, name="best.safetensors")
    results = {}
    if world.is_main and args.data == "demo" and not args.no_eval:
        results = evaluate("demo", model, tok, args, root)
        for what, res in results.items():
            print(what, json.dumps(res))
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    # a user mistake or a run stopped early (R.Stopped) is a message and its exit code, not a traceback
    return R.run_main(lambda world: run_bench(args, world) if args.bench else run(args, world), args.device)


if __name__ == "__main__":
    sys.exit(main())
