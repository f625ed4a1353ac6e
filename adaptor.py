"""Adaptor: frozen DINOv2 + frozen BERT, a small shared transformer trained contrastively, then task heads.

Paper: Qin, Liu, Cheng, Guo, Arcucci. "Freeze the backbones: a parameter-efficient contrastive approach to robust
medical vision-language pre-training" (ICASSP 2024, arXiv 2401.01179). Official code: holajoa/Adaptor-VL-SSL
(Lightning; read at commit 2414548). Hand-written here in plain PyTorch: DINOv2 (copied from cleft.py), BERT
(copied from medct_lora.py), the Adaptor, the classification and segmentation heads, all tested against
transformers and against the official module itself (tests/goldens/make_adaptor_goldens.py).

The model (12,207,617 trainable parameters with DINOv2-B, 11,912,705 with DINOv2-S, as the paper counts):
  g_img = DINOv2 CLS after the final norm (d_v = 768 / 384), g_txt = BERT pooler_output tanh(W h_CLS) (768)
  Eq. (1)  v = W_v g_img / |W_v g_img|,   u = W_t g_txt / |W_t g_txt|           W_v, W_t bias-free, to 768
  Eq. (2)  layer(s; q) = LN2(h + Drop(W2 Drop(ReLU(W1 h)))),  h = LN1(s + Drop(MHA(query=q, key=s, value=s)))
           2 layers (12 heads, FF 2048, dropout 0.1), the same weights for both modalities, in this order:
           for each layer: v <- layer(v; u), then u <- layer(u; v)
  Eq. (3)  S_ij = exp(tau) <u_i, v_j> / (|u_i| |v_j|),  tau learnable, init ln(1/0.07), not clamped
  Eq. (4)  L = 0.25 CE_dim0(S) + 0.75 CE_dim1(S)   (over texts for each image, over images for each text)
  Downstream the text is absent and each layer is self-attention: v <- layer(v; v).

What the official model really computes: ONE pooled token per modality, and attention over a single key has weight
1 whatever the query, so MHA(q=u, k=v, v=v) = out_proj(v_proj(v)) exactly (a test proves it). The "cross-attention"
fuses nothing: each modality goes through the same residual linear + FFN blocks on its own; the only cross-modal
signal is the contrastive loss. The query and key projections get a zero gradient and stay at their random init
(apart from weight decay, and float noise that Adam's normalisation turns into lr-sized steps). `--tokens` is the
paper's figure: the query is still the other modality's global vector, but the keys and values are the frozen patch
/ word tokens (projected and normalised like the global ones), so which tokens are read depends on the other
modality; they are computed on the fly under no_grad (a token cache for MIMIC-CXR would be ~80 GB).

Frozen features are computed once per (backbone, dataset, split), cached as safetensors with a manifest of ids
(cache/adaptor/<backbone>/<data>-<split>.{safetensors,json}); image and text rows are paired by id, never by
position (the official extraction sorts each batch by caption length, so two tokenizers can misalign the pairs).

Run it:
    python adaptor.py       # demo: pre-train, classify, segment; tiny models (pre-trained offline: demo_backbones),
        CPU; measured on a shared 2-core CPU, 30-54 s: pre-training val loss 3.77 vs ln 120 = 4.79, text->image top-1
        0.058 vs chance 0.008; 6-class accuracy 0.45 vs 0.17; Dice 0.68
    python adaptor.py --data mimic-cxr --vision dinov2-b --text biobert           # pre-training, paper setting
    python adaptor.py --task classify --data rsna --data-pct 0.01 --init runs/adaptor/mimic-cxr/<run>
    python adaptor.py --task classify --data covidx --data-pct 0.1 --init RUN
    python adaptor.py --task segment --data siim --data-pct 1 --init RUN          # or --data rsna-seg
    torchrun --nproc_per_node 2 adaptor.py --data mimic-cxr ...   # per-rank negatives as official; --gather: all
    python adaptor.py --resume RUN ; python adaptor.py --resume RUN --eval-only ; python adaptor.py --bench
Data: data/README.md and `python -m common.prepare mimic-cxr|rsna|covidx|siim|rsna-seg --src RAW`. Weights: HF
folders or repo ids in the HF cache (`python -m common.weights download facebook/dinov2-base`).

Where this file departs from the official code (each is also noted where it happens):
  - downstream, the official classifier passes the pooled (B, d) features to nn.MultiheadAttention, which reads a
    2-D input as one unbatched sequence: its "self-attention" mixes the images of a batch, so a prediction depends
    on the other images in the batch (a test shows it on the official module). Here each image is on its own;
  - classification trains on the frozen adaptor's output computed once per image with the centre crop (the
    official code re-runs the frozen backbone and adaptor every step); the head is AdamW + cosine per step (official:
    CosineAnnealingWarmRestarts with T_0 = 0.4 x total steps, stepped once per epoch, i.e. barely moving);
  - the pre-training schedule is stepped once per batch (official: per batch AND once more per epoch by
    Lightning); the validation loss is logged, but the last checkpoint is kept (official: W&B-only early stop);
  - MIMIC-CXR has one frontal image per study here (common.prepare's layout; MGCA keeps every frontal image);
  - per-image Dice is averaged over the whole split (official: the mean of per-batch means); the dice loss term is
    the official one, computed on the raw logits (--dice-on-probs: on probabilities);
  - the pre-training image crop is drawn once, at feature extraction (as official: no augmentation in effect);
  - CXR-BERT checkpoints have no trained pooler: the official code silently uses a random one; here that is an
    error unless --missing-pooler random (the official behaviour, seeded) or cls (the CLS hidden state).
"""
import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from common import metrics as M
from common import run as R
from common.data import (ClassificationDataset, DataError, Images, SegmentationDataset, dataset_root, fraction,
                         missing_dataset, read_pairs)
from common.features import (bert_tokenizer, cached, dice_per_image, extract, fingerprint, paired, tokenize,
                             word_tokenizer)
from common.transforms import PadCrop
from common.weights import WeightsError, load_config, load_mapped, read_safetensors, resolve, tensor_index

REPO = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
# Copied from cleft.py: DINOv2Config
class DINOv2Config:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    patch_size: int = 14
    pos_grid: int = 37             # the checkpoint's position-embedding grid (518 / 14); resized to the input's
    n_registers: int = 4           # 0 = plain DINOv2 (no register_tokens parameter at all)
    mlp_ratio: int = 4
    eps: float = 1e-6
    layerscale: float = 1.0        # LayerScale init (the pretrained values replace it)
    pos_antialias: bool = True     # resize the position grid with antialias: True with registers, False without


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


@dataclass
class AdaptorConfig:
    vision_dim: int = 768          # d_v: 768 DINOv2-B, 384 DINOv2-S
    text_dim: int = 768
    dim: int = 768                 # projection_dim
    n_layers: int = 2
    n_heads: int = 12
    ff: int = 2048
    dropout: float = 0.1           # attention weights, after the residual branches and inside the FFN
    image_weight: float = 0.75     # Eq. (4): 0.75 x CE over images + 0.25 x CE over texts
    tokens: bool = False           # --tokens: keys/values are the frozen token sequences


VISION_PRESETS = {  # real sizes written out so the parameter count and --bench need no download
    "dinov2-b": dict(repo="facebook/dinov2-base", config=DINOv2Config(n_registers=0, pos_antialias=False)),
    "dinov2-s": dict(repo="facebook/dinov2-small",
                     config=DINOv2Config(dim=384, n_heads=6, n_registers=0, pos_antialias=False)),
    "tiny": dict(repo=None, config=DINOv2Config(dim=64, n_layers=4, n_heads=4, patch_size=14, pos_grid=8,
                                                n_registers=0, pos_antialias=False)),
}
TEXT_PRESETS = {
    "bert": dict(repo="bert-base-uncased"), "biobert": dict(repo="dmis-lab/biobert-v1.1"),
    "pubmedbert": dict(repo="microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"),
    "cxrbert": dict(repo="microsoft/BiomedVLP-CXR-BERT-general"),
    "clinicalbert": dict(repo="emilyalsentzer/Bio_ClinicalBERT"), "tiny": dict(repo=None),
}
TINY_BERT = dict(dim=64, n_layers=2, n_heads=4, mlp_dim=128, max_positions=128)  # vocab: the demo's (word_tokenizer)
MAX_WORDS = 112  # official caption length in tokens
DEMO_BACKBONES = REPO / "common" / "demo_weights" / "adaptor_backbones.safetensors"  # both tiny presets, pre-trained

# ----------------------------------------------------------------------------------------------------------
# Attention helper and DINOv2 (copied from cleft.py)


# Copied from cleft.py: attention
def attention(q, k, v, scale: float, mask=None, causal: bool = False, dropout: float = 0.0):
    """softmax(q k^T * scale + mask) v through PyTorch's fused SDPA kernel (flash / memory-efficient on CUDA).
    q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs). mask (B or 1, 1, Tq, Tk) bool, True = may
    attend; causal=True instead of a mask for plain left-to-right attention; dropout on the attention weights
    (pass 0.0 in eval mode: SDPA does not look at module.training)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale)


# Copied from cleft.py: LayerScale
class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


# Copied from cleft.py: DINOv2Attention
class DINOv2Attention(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.nh = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # HF stores query, key, value apart; the key map stacks them
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hs)
        y = attention(q, k, v, scale=(C // self.nh) ** -0.5)                              # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


# Copied from cleft.py: DINOv2MLP
class DINOv2MLP(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as DINOv2 was trained


# Copied from cleft.py: DINOv2Block
class DINOv2Block(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = DINOv2Attention(cfg)
        self.ls1 = LayerScale(cfg.dim, cfg.layerscale)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = DINOv2MLP(cfg)
        self.ls2 = LayerScale(cfg.dim, cfg.layerscale)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# Copied from cleft.py: DINOv2
class DINOv2(nn.Module):
    """DINOv2 ViT (Oquab et al. 2023), optionally with register tokens (Darcet et al. 2024).

    forward(pixels (B, 3, H, W)) -> (tokens, prenorm), both (B, 1 + R + h*w, D) with h, w = H // p, W // p:
        tokens  = after the final LayerNorm: HF Dinov2Model / Dinov2WithRegistersModel last_hidden_state
        prenorm = the last block's output before it: HF hidden_states[-1] (the hub model's x_prenorm)
    laid out [CLS, R registers, patches in row-major (h, w) order], R = cfg.n_registers (0 without registers):
        CLS token       tokens[:, 0]                          (HF pooler_output)
        patch tokens    tokens[:, 1 + R:]  -> .view(B, h, w, D) for a feature map
    Any H, W that are multiples of the patch size work: the position grid is resized to (h, w)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # plain DINOv2 has no register parameter at all (its checkpoints have no such key)
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.n_registers, D)) if cfg.n_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, D))
        self.blocks = nn.ModuleList(DINOv2Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.eps)

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "DINOv2":
        """An HF facebook/dinov2-{small,base,large} or facebook/dinov2-with-registers-* folder (or repo id in the
        HF cache) -> DINOv2, built on the meta device, every key and shape checked."""
        folder = resolve(path)
        with torch.device("meta"):
            model = cls(dinov2_config_from_hf(load_config(folder)))
        return load_mapped(model, folder, DINOV2_MAP, dtype=dtype)

    def init_random(self, seed: int = 0):
        """Random weights for the demo / bench: trunc-normal(0.02) like DINOv2 / HF, LayerNorms at 1 / 0."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("gamma"):
                p.data.fill_(self.cfg.layerscale)
            elif "norm" in name:
                p.data.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias") or name == "register_tokens":
                p.data.zero_()
            else:
                p.data.copy_(torch.randn(p.shape, generator=g).clamp_(-2, 2) * 0.02)
        return self

    def pos_embed_for(self, h: int, w: int):
        """Position embeddings for an (h, w) patch grid: the checkpoint's (G, G) grid resized bicubic in fp32, with
        antialias when cfg.pos_antialias, to size=(h, w) exactly as HF does (the hub model with registers too)."""
        pos = self.pos_embed
        G = self.cfg.pos_grid
        if (h, w) == (G, G):
            return pos
        grid = pos[:, 1:].reshape(1, G, G, -1).permute(0, 3, 1, 2)                      # (1, D, G, G)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False,
                             antialias=self.cfg.pos_antialias)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)               # (1, h*w, D)
        return torch.cat([pos[:, :1], grid], 1)                                           # (1, 1 + h*w, D)

    def forward(self, pixels):
        B = pixels.shape[0]
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))                    # (B, D, h, w)
        h, w = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1)  # (B, 1 + h*w, D)
        x = x + self.pos_embed_for(h, w)
        if self.register_tokens is not None:  # after the position embedding (they have none), right after CLS
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], 1)  # (B, 1 + R + h*w, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), x

# ----------------------------------------------------------------------------------------------------------
# BERT (copied from medct_lora.py)


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


# ----------------------------------------------------------------------------------------------------------
# The Adaptor (Eqs. 1-4)


class AdaptorAttention(nn.Module):
    """nn.MultiheadAttention's math and parameter names (in_proj_weight / in_proj_bias / out_proj), so official
    checkpoints map one to one: query (B, Tq, D) attends over key = value (B, Tk, D) -> (B, Tq, D).
    pad (B, Tk) bool, True = a padding key to ignore."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.nh, self.dropout = n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)    # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, kv, pad=None):
        B, Tq, D = query.shape
        Tk, hs = kv.shape[1], D // self.nh
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is kv:  # self-attention: one fused D -> 3D matmul, as nn.MultiheadAttention (~8% faster than two)
            q, k, v = F.linear(kv, w, b).view(B, Tk, 3, self.nh, hs).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, Tk, hs)
        else:  # split, not sliced: backward concatenates the two gradients instead of zero-filling two copies
            (w_q, w_kv), (b_q, b_kv) = w.split([D, 2 * D]), b.split([D, 2 * D])
            q = F.linear(query, w_q, b_q).view(B, Tq, self.nh, hs).transpose(1, 2)              # (B, nh, Tq, hs)
            k, v = F.linear(kv, w_kv, b_kv).view(B, Tk, 2, self.nh, hs).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, Tk, hs)
        mask = None if pad is None else ~pad[:, None, None, :]                          # (B, 1, 1, Tk)
        y = attention(q, k, v, scale=hs ** -0.5, mask=mask, dropout=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, Tq, D))


class AdaptorLayer(nn.Module):
    """Eq. (2), post-LN: layer(src; query) = LN2(h + FFN(h)), h = LN1(src + MHA(query, src, src)).

    query=None is self-attention (downstream). memory (B, Tk, D) replaces src as keys/values (--tokens: src is
    the global vector (B, 1, D), memory its modality's token sequence). With a single key (Tk = 1, the official
    setting) MHA(query, src, src) = out_proj(v_proj(src)) for ANY query (module docstring)."""

    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.attn = AdaptorAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(cfg.dim, cfg.ff), nn.Linear(cfg.ff, cfg.dim)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)  # one module for the three dropouts of the official layer (same p)

    def forward(self, src, query=None, memory=None, pad=None):
        kv = src if memory is None else memory
        h = self.norm1(src + self.drop(self.attn(src if query is None else query, kv, pad)))      # (B, T, D)
        return self.norm2(h + self.drop(self.linear2(self.drop(F.relu(self.linear1(h))))))


class Adaptor(nn.Module):
    """Projections (Eq. 1), the shared layers (Eq. 2) and the logit scale (Eq. 3). Module names follow the
    official Lightning module (projection.visual_projection, ...; its adaptor_module.encoder.i is layers.i)."""

    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.cfg = cfg
        self.projection = nn.ModuleDict(dict(visual_projection=nn.Linear(cfg.vision_dim, cfg.dim, bias=False),
                                             text_projection=nn.Linear(cfg.text_dim, cfg.dim, bias=False)))
        self.layers = nn.ModuleList(AdaptorLayer(cfg) for _ in range(cfg.n_layers))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def project(self, x, which: str):
        return F.normalize(self.projection[which](x), dim=-1)

    def forward(self, img, txt, img_tokens=None, txt_tokens=None, txt_pad=None):
        """img (B, d_v), txt (B, d_t) pooled features [+ their token sequences with --tokens] -> the joint
        embeddings x_hat, t_hat (B, D), unit norm."""
        v, u = self.project(img, "visual_projection")[:, None], self.project(txt, "text_projection")[:, None]
        mv = None if img_tokens is None else self.project(img_tokens, "visual_projection")        # (B, N, D)
        mu = None if txt_tokens is None else self.project(txt_tokens, "text_projection")          # (B, T, D)
        for layer in self.layers:  # official order: the text path reads the image vector this layer produced
            v = layer(v, query=u, memory=mv)
            u = layer(u, query=v, memory=mu, pad=txt_pad if mu is not None else None)
        return F.normalize(v[:, 0], dim=-1), F.normalize(u[:, 0], dim=-1)

    def encode_image(self, img, img_tokens=None):
        """Downstream image path (no text): self-attention -> (B, D), unit norm. With tokens, the global vector
        queries the patch tokens (the --tokens pre-training's image path with the image as its own query)."""
        v = self.project(img, "visual_projection")[:, None]
        mv = None if img_tokens is None else self.project(img_tokens, "visual_projection")
        for layer in self.layers:
            v = layer(v, memory=mv) if mv is None else layer(v, query=v, memory=mv)
        return F.normalize(v[:, 0], dim=-1)

    def encode_patches(self, patches):
        """Segmentation path (official): the patch tokens (B, N, d_v) through the same layers as self-attention
        over the patches -> (B, N, D), each token unit norm."""
        x = self.project(patches, "visual_projection")
        for layer in self.layers:
            x = layer(x)
        return F.normalize(x, dim=-1)


def adaptor_loss(x_hat, t_hat, logit_scale, image_weight: float = 0.75, gather: bool = False):
    """Eq. (3)-(4) on logits_per_text (Bt, Bi) = exp(tau) t_hat x_hat^T. gather=False is the official per-rank batch;
    True gathers both sides from every rank, with gradients (R.gather_with_grad), so DDP = one big batch."""
    if gather:
        x_hat, t_hat = R.gather_with_grad(x_hat), R.gather_with_grad(t_hat)
    logits = logit_scale.exp() * t_hat @ x_hat.T                                          # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (1 - image_weight) * F.cross_entropy(logits.T, labels) + image_weight * F.cross_entropy(logits, labels)

# ----------------------------------------------------------------------------------------------------------
# Weight loading: HF safetensors -> our modules through literal key maps ("q"/"k"/"v": stacked on dim 0 into qkv)


# Copied from cleft.py: DINOV2_MAP
DINOV2_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.{}": "patch_embed.{}",
    "embeddings.mask_token": None,                   # only used by masked-image pre-training
    "encoder.layer.{}.norm1.{}": "blocks.{}.norm1.{}",
    "encoder.layer.{}.attention.attention.query.{}": ("blocks.{}.attn.qkv.{}", "q"),
    "encoder.layer.{}.attention.attention.key.{}": ("blocks.{}.attn.qkv.{}", "k"),
    "encoder.layer.{}.attention.attention.value.{}": ("blocks.{}.attn.qkv.{}", "v"),
    "encoder.layer.{}.attention.output.dense.{}": "blocks.{}.attn.proj.{}",
    "encoder.layer.{}.layer_scale1.lambda1": "blocks.{}.ls1.gamma",
    "encoder.layer.{}.norm2.{}": "blocks.{}.norm2.{}",
    "encoder.layer.{}.mlp.fc1.{}": "blocks.{}.mlp.fc1.{}",
    "encoder.layer.{}.mlp.fc2.{}": "blocks.{}.mlp.fc2.{}",
    "encoder.layer.{}.layer_scale2.lambda1": "blocks.{}.ls2.gamma",
    "layernorm.{}": "norm.{}",
}

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

OFFICIAL_MAP = {  # the official Lightning checkpoint's state_dict (python -m common.weights convert FILE.ckpt)
    "projection.visual_projection.weight": "projection.visual_projection.weight",
    "projection.text_projection.weight": "projection.text_projection.weight",
    "adaptor_module.encoder.{}.attn.in_proj_weight": "layers.{}.attn.in_proj_weight",
    "adaptor_module.encoder.{}.attn.in_proj_bias": "layers.{}.attn.in_proj_bias",
    "adaptor_module.encoder.{}.attn.out_proj.{}": "layers.{}.attn.out_proj.{}",
    "adaptor_module.encoder.{}.linear1.{}": "layers.{}.linear1.{}",
    "adaptor_module.encoder.{}.linear2.{}": "layers.{}.linear2.{}",
    "adaptor_module.encoder.{}.norm1.{}": "layers.{}.norm1.{}",
    "adaptor_module.encoder.{}.norm2.{}": "layers.{}.norm2.{}",
    "logit_scale": "logit_scale",
}


# Copied from cleft.py: dinov2_config_from_hf
def dinov2_config_from_hf(hf: dict) -> DINOv2Config:
    """HF Dinov2Config or Dinov2WithRegistersConfig (a config.json written by transformers 4.x or 5.x) ->
    DINOv2Config. Every field that would change what the model computes and is not implemented here is refused;
    drop_path_rate is ignored (stochastic depth, a training regulariser; 0 in the released checkpoints) and so
    are the Dinov2Backbone-only fields (out_features, out_indices, stage_names, apply_layernorm,
    reshape_hidden_states) and use_mask_token (the mask token is only used by masked-image pre-training)."""
    kind = hf.get("model_type", "dinov2")
    if kind not in ("dinov2", "dinov2_with_registers"):
        raise WeightsError(f"config.json has model_type {kind!r}: not a DINOv2 (dinov2, dinov2_with_registers)")
    dim, heads = hf.get("hidden_size", 768), hf.get("num_attention_heads", 12)
    image, patch = hf.get("image_size", 224), hf.get("patch_size", 14)
    image = image[0] if isinstance(image, (list, tuple)) and len(set(image)) == 1 else image
    patch = patch[0] if isinstance(patch, (list, tuple)) and len(set(patch)) == 1 else patch
    refused = []
    if hf.get("hidden_act", "gelu") != "gelu":
        refused.append(f"hidden_act {hf['hidden_act']!r} (implemented: exact GELU, 'gelu')")
    if hf.get("use_swiglu_ffn", False):
        refused.append("use_swiglu_ffn true (the SwiGLU MLP of ViT-g; implemented: the GELU MLP of ViT-S/B/L)")
    if not hf.get("qkv_bias", True):
        refused.append("qkv_bias false (implemented: q, k, v with biases)")
    if hf.get("num_channels", 3) != 3:
        refused.append(f"num_channels {hf['num_channels']} (implemented: 3)")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hf.get(key, 0.0):
            refused.append(f"{key} {hf[key]} (no dropout is implemented in the ViT)")
    if not isinstance(image, int) or not isinstance(patch, int):
        refused.append(f"non-square image_size {image} / patch_size {patch} (implemented: square)")
    if dim % heads:
        refused.append(f"hidden_size {dim} not divisible by num_attention_heads {heads}")
    mlp = hf.get("mlp_ratio", 4)
    if int(dim * mlp) != dim * mlp or int(mlp) != mlp:
        refused.append(f"mlp_ratio {mlp} (implemented: an integer ratio)")
    if refused:
        raise WeightsError("this DINOv2 config is not supported by cleft.py: " + "; ".join(refused))
    registers = kind == "dinov2_with_registers"  # plain Dinov2Model ignores num_register_tokens
    return DINOv2Config(dim=dim, n_layers=hf.get("num_hidden_layers", 12), n_heads=heads, patch_size=patch,
                        pos_grid=image // patch, n_registers=hf.get("num_register_tokens", 4) if registers else 0,
                        mlp_ratio=int(mlp), eps=hf.get("layer_norm_eps", hf.get("layer_norm_epsilon", 1e-6)),
                        layerscale=hf.get("layerscale_value", 1.0), pos_antialias=registers)


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


def load_bert(path, missing_pooler: str = "error", seed: int = 42, dtype=None) -> BERT:
    """An HF BERT folder -> BERT with its pooler (the official global text feature is pooler_output). Without trained
    pooler weights (CXR-BERT, MLM-only files): an error unless missing_pooler is "random" (official, seeded here:
    normal(0, 0.02) as transformers) or "cls" (the CLS hidden state is the global feature)."""
    folder = resolve(path)
    has_pooler = any(k.endswith("pooler.dense.weight") for k in tensor_index(folder))
    if not has_pooler and missing_pooler == "error":
        raise WeightsError(f"{folder} has no trained pooler (pooler.dense.*): the official code silently uses a "
                           "random one there. Pass --missing-pooler random (official, seeded) or cls (CLS state)")
    model = BERT.from_pretrained(folder, add_pooler=has_pooler, dtype=dtype)
    if not has_pooler and missing_pooler == "random":  # added after construction: the copied BERT stays as is
        g = torch.Generator().manual_seed(seed)
        dense = nn.Linear(model.cfg.dim, model.cfg.dim)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(dense.weight.shape, generator=g) * 0.02)
            dense.bias.zero_()
        model.pooler = nn.ModuleDict({"dense": dense.to(model.embeddings.word_embeddings.weight.dtype)})
    return model


# ----------------------------------------------------------------------------------------------------------
# Data (readers: common/data.py, PadCrop: common/transforms.py, feature cache: common/features.py), frozen features

# folder under data/; pairs = image-report CSVs per split; classify / segment = split JSONs (common.data's
# missing_dataset says where to download each and that `python -m common.prepare <dir>` writes it)
DATASETS = {
    "demo": dict(dir="demo", pairs="reports_{}.csv", splits=("train", "val"), classify="split_demo.json",
                 segment="split_seg_demo.json", size=112),
    "mimic-cxr": dict(dir="mimic-cxr", pairs="reports_{}.csv", splits=("train", "validate"), size=224),
    "rsna": dict(dir="rsna", classify="split_rsna.json", size=224),
    "covidx": dict(dir="covidx", classify="split_covidx.json", size=224),
    "siim": dict(dir="siim", segment="split_seg_siim.json", size=896),
    "rsna-seg": dict(dir="rsna-seg", segment="split_seg_rsna.json", size=224),
}


def data_root(args) -> Path:
    return dataset_root(args.data, DATASETS[args.data], args.data_dir)


def image_features(vision, pixels):
    """-> global (B, d_v) = CLS after the final norm, tokens (B, 1 + N, d_v) = all tokens after it (no registers
    in plain DINOv2; with registers they are dropped)."""
    out, R_ = vision(pixels)[0], vision.cfg.n_registers
    return out[:, 0], torch.cat([out[:, :1], out[:, 1 + R_:]], 1) if R_ else out


def text_features(bert, ids, mask):
    """-> global (B, 768) = pooler_output (or the CLS state without a pooler), tokens (B, T, 768), pad (B, T)."""
    hidden, pooled = bert(ids, attention_mask=mask)
    return (pooled if pooled is not None else hidden[:, 0]), hidden, mask == 0


def frozen(args, world, which: str, model, ids: list, split: str, batch) -> torch.Tensor:
    """Global features (N, d) of the frozen `which` ("vision" / "text") backbone, row i = ids[i]; batch(s, e)
    computes rows s..e-1. Computed once, cached in --cache-dir/adaptor/<preset>-<weights fingerprint>/."""
    key = f"{getattr(args, which)}-{fingerprint(model)}"

    def compute():
        with R.autocast(world.device, args.precision):
            return extract(batch, len(ids), args.eval_batch_size, f"{which} features {split}", world.is_main)
    return cached(Path(args.cache_dir) / "adaptor" / key / f"{args.data}-{split}", ids, compute, world,
                  dict(backbone=key, data=args.data, split=split))

# ----------------------------------------------------------------------------------------------------------
# Training: one step loop for pre-training and both heads


def linear_lr(step: int, total: int, warmup: int, lr: float) -> float:
    """get_linear_schedule_with_warmup (the official pre-training schedule): 0 -> lr over `warmup` steps, then
    linearly to 0 at `total`."""
    return lr * step / max(1, warmup) if step < warmup else lr * max(0.0, (total - step) / max(1, total - warmup))


def cosine_lr(step: int, total: int, lr: float, min_lr: float = 1e-8) -> float:
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def train_loop(args, world, folder: Path, model, opt, n: int, step_fn, lr_fn, total: int, ds=None, best=None,
               desc="train"):
    """`total` optimizer steps over n items (epochs as needed), resuming from folder/ckpt. step_fn(net, batch)
    -> loss, where batch is an index list, or the collated items of `ds` (a DataLoader with workers) when given.
    best (a Best) is evaluated at the end of every epoch and kept in the checkpoint with the trainable tensors,
    optimizer, RNG and step, so a killed run continues exactly where it stopped."""
    net, ckpts = R.wrap_model(model, world, compile=args.compile), R.Checkpoints(folder / "ckpt", world)
    scaler = R.make_scaler(args.precision, world.device)  # fp16 only; a no-op otherwise
    ck, step = ckpts.load(optimizer=opt, scaler=scaler, resuming=bool(args.resume)), 0
    trainable = lambda: {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if ck is not None:
        R.load_tensors(model, ck.tensors, f"checkpoint {ck.path}", required=list(trainable()))
        step = ck.step
        if best is not None:
            best.resume(ck.extra)
    log = R.JsonlLog(folder / "metrics.jsonl", world.is_main)
    prog = R.Progress(total, desc, world.is_main, every=args.print_every, start=step)
    nb = len(R.epoch_batches(n, args.batch_size, args.seed, 0, world))
    while step < total:
        net.train()
        epoch, skip = divmod(step, nb)
        batches = R.epoch_batches(n, args.batch_size, args.seed, epoch, world)[skip:]
        if ds is not None:
            batches = R.epoch_loader(ds, batches, world, args.num_workers, args.seed, epoch)
        for batch in batches:
            lr = lr_fn(step)
            for group in opt.param_groups:
                group["lr"] = lr
            with R.autocast(world.device, args.precision):
                loss = step_fn(net, batch)
            value = R.optimizer_step(loss, opt, scaler, world, step)
            step += 1
            if step % args.log_every == 0 or step == total:
                log.log(step=step, epoch=epoch, loss=value, lr=lr)
            prog.update(1, loss=value, lr=lr)
            if best is not None and (step % nb == 0 or step == total):
                log.log(step=step, epoch=epoch, **best(epoch))
            if step % args.ckpt_every == 0 or step == total:
                ckpts.save(step, trainable(), optimizer=opt, scaler=scaler,
                           extra=best.state() if best is not None else None)
            if step >= total:
                break


def total_steps(args, n: int, world) -> int:
    nb = len(R.epoch_batches(n, args.batch_size, args.seed, 0, world))
    return min(args.epochs * nb, args.steps) if args.steps else args.epochs * nb


STAGE = "weights.safetensors"  # a finished stage's tensors, beside its model.json (R.save_stage)


def fp32_state(model: nn.Module) -> dict:
    return {k: v.float() for k, v in model.state_dict().items()}

# ----------------------------------------------------------------------------------------------------------
# Pre-training


def pretrain(args, world, folder: Path, vision, bert, tok, size: int) -> Adaptor:
    """Eq. (4) over the MIMIC-CXR (or demo) pairs: cached pooled features, or with --tokens the token sequences."""
    root, (train_split, val_split), dev = data_root(args), DATASETS[args.data]["splits"], world.device
    cfg = AdaptorConfig(vision_dim=vision.cfg.dim, text_dim=bert.cfg.dim, n_layers=args.layers, dim=args.dim,
                        n_heads=args.heads, ff=args.ff, dropout=args.dropout, tokens=args.tokens)
    model = Adaptor(cfg).to(dev)
    sets, feats = {}, {}
    for split in (train_split, val_split):
        ids, caps = read_pairs(root / DATASETS[args.data]["pairs"].format(split))
        images = Images(root, ids, PadCrop(size, train=split == train_split))  # the crop: drawn once, as official
        sets[split] = ids, caps, images
        if not args.tokens:
            img = frozen(args, world, "vision", vision, ids, f"{split}-{size}",
                         lambda s, e: image_features(vision, images.batch(s, e).to(dev))[0])
            txt = frozen(args, world, "text", bert, ids, split, lambda s, e: text_features(
                bert, *(x.to(dev) for x in tokenize(tok, caps[s:e])))[0])
            feats[split] = paired(ids, img, ids, txt)
    ids, caps, images = sets[train_split]
    img, txt = (f.to(dev) for f in feats[train_split][1:]) if not args.tokens else (None, None)

    def step_fn(net, batch):
        if args.tokens:  # the frozen towers on the fly, their token sequences as keys / values
            words, mask = tokenize(tok, [caps[i] for i in batch])
            with torch.no_grad():
                g_img, t_img = image_features(vision, torch.stack([images[i] for i in batch]).to(dev))
                g_txt, t_txt, pad = text_features(bert, words.to(dev), mask.to(dev))
            x, t = net(g_img.float(), g_txt.float(), t_img.float(), t_txt.float(), pad)
        else:
            idx = torch.tensor(batch, device=dev)
            x, t = net(img[idx], txt[idx])
        return adaptor_loss(x, t, model.logit_scale, cfg.image_weight, args.gather)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = total_steps(args, len(ids), world)
    warmup = int(args.warmup_frac * total)
    if world.is_main:
        print(f"pre-training: {len(ids)} pairs, {total} steps of {args.batch_size} x {world.size}, "
              f"{sum(p.numel() for p in model.parameters()):,} trainable parameters")
    train_loop(args, world, folder, model, opt, len(ids), step_fn, lambda s: linear_lr(s, total, warmup, args.lr),
               total, desc="pretrain")
    if not args.tokens and world.is_main:
        model.eval()
        _, img, txt = feats[val_split]
        with torch.no_grad():
            x, t = model(img.to(dev), txt.to(dev))
            val = adaptor_loss(x, t, model.logit_scale, cfg.image_weight).item()
            top1 = (t @ x.T).argmax(1).eq(torch.arange(len(t), device=t.device)).float().mean().item()
        print(f"pre-training: {val_split} loss {val:.4f} (one batch of {len(x)}), text->image top-1 {top1:.3f}")
        R.JsonlLog(folder / "metrics.jsonl").log(split=val_split, val_loss=val, t2i_top1=top1)
    spec = dict(adaptor=asdict(cfg), vision=args.vision, vision_path=args.vision_path, text=args.text,
                text_path=args.text_path)
    R.save_stage(folder, fp32_state(model), spec, world, STAGE)  # what --init reads
    return model


# ----------------------------------------------------------------------------------------------------------
# Downstream: the classification head, the segmentation decoder and their losses


class ClassifierHead(nn.Module):
    """The official SSLEvaluator with hidden_dim 512: Linear(768, 512, no bias), BN, ReLU, Dropout 0.1, Linear."""

    def __init__(self, dim: int, n_out: int, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, z):
        return self.net(z)


def conv_bn_relu(cin: int, cout: int, padding: int = 1):
    return [nn.Conv2d(cin, cout, 3, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SegDecoder(nn.Module):
    """The official ViTDecoder: stage 0 brings the (g, g) patch grid to size / 16 (crop 224: a 3x3 valid conv,
    16 -> 14; otherwise a padded conv and a resize, as its 896 branch does), then 4 x (conv, BN, ReLU, 2x
    upsampling) and a 3x3 conv to the mask logits (B, 1, size, size)."""

    def __init__(self, dim: int, grid: int, size: int, features=(512, 256, 128, 64)):
        super().__init__()
        valid = grid == size // 16 + 2
        stage0 = conv_bn_relu(dim, dim, padding=0 if valid else 1)
        if not valid:
            stage0.append(nn.Upsample(size=(size // 16, size // 16)))
        ups = [nn.Sequential(*conv_bn_relu(cin, f), nn.Upsample(scale_factor=2))
               for cin, f in zip((dim, *features), features)]
        self.stages = nn.Sequential(nn.Sequential(*stage0), *ups)
        self.out = nn.Conv2d(features[-1], 1, 3, padding=1)
        for m in self.modules():  # the official init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, grid):
        return self.out(self.stages(grid))


class Segmenter(nn.Module):
    """Frozen DINOv2 patch tokens -> frozen adaptor self-attention over the patches -> trained decoder."""

    def __init__(self, vision: DINOv2, adaptor: Adaptor, size: int, width: int = 512):
        super().__init__()
        self.vision, self.adaptor = vision, adaptor
        g = size // vision.cfg.patch_size
        self.decoder = SegDecoder(adaptor.cfg.dim, g, size, features=(width, width // 2, width // 4, width // 8))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval(), self.adaptor.eval()  # frozen: no adaptor dropout, whatever the loop asks
        return self

    def forward(self, pixels):
        with torch.no_grad():
            _, tokens = image_features(self.vision, pixels)
            z = self.adaptor.encode_patches(tokens[:, 1:].float())                       # (B, g*g, D)
        B, N, D = z.shape
        g = int(N ** 0.5)
        return self.decoder(z.transpose(1, 2).reshape(B, D, g, g))                     # (B, 1, S, S)


def focal_loss(logits, target, gamma: float = 2.0):
    """Binary focal loss (MGCA's FocalLoss): BCE-with-logits x (1 - p_t)^gamma, mean over pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (torch.exp(gamma * F.logsigmoid(-logits * (2 * target - 1))) * bce).mean()


def dice_loss(x, target, smooth: float = 1.0):
    """MGCA's "modified" DiceLoss(p=2, reduction="sum"): sum over images of 1 - (sum x t + 1) / (sum x^2 + t^2 + 1).
    NOTE the official code passes the raw logits as x, not probabilities (kept; --dice-on-probs passes sigmoid)."""
    x, t = x.flatten(1), target.flatten(1)
    return (1 - ((x * t).sum(1) + smooth) / ((x.pow(2) + t.pow(2)).sum(1) + smooth)).sum()


def seg_loss(logits, target, alpha: float = 10.0, on_probs: bool = False):
    """MixedLoss: alpha x focal + dice."""
    return alpha * focal_loss(logits, target) + dice_loss(logits.sigmoid() if on_probs else logits, target)


class Best:
    """Tracks the best validation score and the head's tensors at that point (kept in the checkpoint)."""

    def __init__(self, head: nn.Module, evaluate, name: str):
        self.head, self.evaluate, self.name = head, evaluate, name
        self.score, self.epoch, self.tensors = -math.inf, -1, None

    def __call__(self, epoch: int) -> dict:
        score = self.evaluate()
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.tensors = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        return {f"val_{self.name}": score}

    def state(self) -> dict:
        return {"best_score": self.score, "best_epoch": self.epoch, "best_tensors": self.tensors}

    def resume(self, extra: dict):
        if extra.get("best_tensors") is not None:
            self.score, self.epoch, self.tensors = extra["best_score"], extra["best_epoch"], extra["best_tensors"]

    def restore(self):
        if self.tensors is not None:
            self.head.load_state_dict(self.tensors)


def fit_head(args, world, folder: Path, model, head, opt, n: int, step_fn, best: Best, desc: str, ds=None):
    """Train `head` inside `model` for the recipe's steps, cosine lr, the best on validation kept; with
    --resume RUN --eval-only, read back the head that run kept instead."""
    if args.eval_only:
        R.load_final(head, folder, world.device, required=list(head.state_dict()), name=STAGE)
        best.score = best.evaluate()
        return
    total = total_steps(args, n, world)
    if world.is_main:
        print(f"{desc} {args.data}: {n} training images ({args.data_pct:g} of the labels), {total} steps, "
              f"{sum(p.numel() for p in head.parameters()):,} trained parameters")
    train_loop(args, world, folder, model, opt, n, step_fn, lambda s: cosine_lr(s, total, args.lr), total, ds=ds,
               best=best, desc=desc)
    best.restore()


def report(args, world, folder: Path, rep: dict, best: Best, head: nn.Module, spec: dict) -> dict:
    rep |= {"val": best.score, "best_epoch": best.epoch, "data_pct": args.data_pct}
    if world.is_main:
        (folder / "metrics.json").write_text(json.dumps(rep, indent=2, default=float) + "\n")
        print(f"{folder.name} {args.data}: test {rep['metric']} "
              f"{rep['test']:.4f} (best val {best.score:.4f} at epoch {best.epoch + 1})")
    R.save_stage(folder, fp32_state(head), spec, world, STAGE)
    return rep


def classify(args, world, folder: Path, vision, adaptor: Adaptor, size: int) -> dict:
    """Frozen backbone -> frozen adaptor (image path) -> trained head, at --data-pct of the training labels;
    best on validation, then test. The frozen part is computed once per split (the same numbers every epoch)."""
    root, dev, z, y = data_root(args), world.device, {}, {}
    for split in ("train", "val", "test"):
        ds = ClassificationDataset(root, root / DATASETS[args.data]["classify"], split, PadCrop(size, train=False))
        images = Images(ds.root, [p for p, _, _ in ds.items], ds.transform)
        if adaptor.cfg.tokens:  # the global vector queries the patch tokens: computed on the fly, not cached
            z[split] = extract(lambda s, e: adaptor.encode_image(*(f.float() for f in image_features(
                vision, images.batch(s, e).to(dev)))), len(images), args.eval_batch_size, f"adaptor {split}").to(dev)
        else:
            g = frozen(args, world, "vision", vision, images.paths, f"cls-{split}-{size}",
                       lambda s, e: image_features(vision, images.batch(s, e).to(dev))[0])
            with torch.no_grad():
                z[split] = adaptor.encode_image(g.to(dev))                                  # (N, D)
        y[split] = torch.as_tensor(ds.labels, device=dev)
    keep = torch.as_tensor(fraction(y["train"].cpu().numpy(), args.data_pct, args.seed), device=dev)
    binary = len(ds.classnames) == 2
    head = ClassifierHead(adaptor.cfg.dim, 1 if binary else len(ds.classnames)).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def probs_of(split):
        head.eval()
        with torch.no_grad():
            out = head(z[split])
        return torch.cat([1 - out.sigmoid(), out.sigmoid()], 1) if binary else out.softmax(1)

    def score(split):
        p, t = probs_of(split).cpu().numpy(), y[split].cpu().numpy()
        return float(M.auroc(t, p[:, 1])) if binary else M.accuracy(t, p.argmax(1))

    def step_fn(net, batch):
        idx = keep[batch]
        out, t = net(z["train"][idx]), y["train"][idx]
        return F.binary_cross_entropy_with_logits(out[:, 0], t.float()) if binary else F.cross_entropy(out, t)
    metric = "auroc" if binary else "accuracy"
    best = Best(head, lambda: score("val"), metric)
    fit_head(args, world, folder, head, head, opt, len(keep), step_fn, best, "classify")
    rep = M.report_from_probs(y["test"].cpu().numpy(), probs_of("test").cpu().numpy(), ds.classnames)
    rep |= {"metric": metric, "test": score("test"), "train_items": len(keep)}
    return report(args, world, folder, rep, best, head, dict(head=dict(classes=ds.classnames)))


def segment(args, world, folder: Path, vision, adaptor: Adaptor) -> dict:
    """Trained decoder on the frozen patch-token path; 10 x focal + dice; per-image Dice at 0.5, best on val."""
    root, d, dev = data_root(args), DATASETS[args.data], world.device
    size = args.size or d["size"]
    sets = {s: SegmentationDataset(root, root / d["segment"], s, joint_transform=PadCrop(size, train=s == "train"))
            for s in ("train", "val", "test")}
    train = sets["train"]
    empty = np.array([not np.asarray(Image.open(train.root / m)).any() for _, m in train.items])
    idx = np.arange(len(train))
    if args.data == "siim":  # official: all positives + as many random negatives
        neg = np.flatnonzero(empty)
        neg = np.random.default_rng(args.seed).choice(neg, min(len(neg), (~empty).sum()), False)
        idx = np.sort(np.concatenate([np.flatnonzero(~empty), neg]))
    idx = idx[fraction(empty[idx], args.data_pct, args.seed)]
    model = Segmenter(vision, adaptor, size, args.decoder_width).to(dev)
    model.requires_grad_(False).decoder.requires_grad_(True)
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def dice_of(split):
        model.eval()
        out = []
        with torch.no_grad():
            for x, m in torch.utils.data.DataLoader(sets[split], args.eval_batch_size, num_workers=args.num_workers):
                with R.autocast(dev, args.precision):
                    logits = model(x.to(dev))
                out.append(dice_per_image(logits.float().sigmoid(), m.to(dev)).cpu())
        return float(torch.cat(out).mean())

    def step_fn(net, batch):
        x, m = batch
        return seg_loss(net(x.to(dev)).float(), m.to(dev), on_probs=args.dice_on_probs)
    best = Best(model.decoder, lambda: dice_of("val"), "dice")
    fit_head(args, world, folder, model, model.decoder, opt, len(idx), step_fn, best, "segment",
             ds=torch.utils.data.Subset(train, idx.tolist()))
    rep = {"metric": "dice", "test": dice_of("test"), "train_items": len(idx)}
    return report(args, world, folder, rep, best, model.decoder,
                  dict(decoder=dict(size=size, width=args.decoder_width)))

# ----------------------------------------------------------------------------------------------------------
# Benchmark: the adaptor step at batch 1024, ours vs torch.nn layers, and backbone throughput


class TorchLayer(nn.Module):
    """The official layer built from torch.nn.MultiheadAttention (its own code path): the reference for the
    parity test and the bench."""

    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(cfg.dim, cfg.ff), nn.Linear(cfg.ff, cfg.dim)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, src, query=None, memory=None, pad=None):
        kv = src if memory is None else memory
        h = self.norm1(src + self.drop(self.attn(src if query is None else query, kv, kv, key_padding_mask=pad,
                                                 need_weights=False)[0]))
        return self.norm2(h + self.drop(self.linear2(self.drop(F.relu(self.linear1(h))))))


def run_bench(args, world):
    """Real sizes, random weights: the adaptor's training step on pooled features at --batch-size (1024), ours and
    the same layers built from torch.nn (TorchLayer) timed in alternation (torch.nn, ours, ours, torch.nn, ...) so
    that a shared machine's load falls on both alike; then the frozen backbones' feature throughput."""
    dev, rows, B = world.device, [], args.batch_size
    print(R.BENCH_COLUMNS)
    # CPU: fp32 unless --precision bf16 is typed (bf16 matmuls are very slow on CPUs without bf16 units)
    precisions = [args.precision] if "precision" in args.given else (["bf16"] if dev.type == "cuda" else ["fp32"])
    vcfg = VISION_PRESETS[args.vision if args.vision != "tiny" else "dinov2-b"]["config"]
    cfg = AdaptorConfig(vision_dim=vcfg.dim)
    img, txt = torch.randn(B, vcfg.dim, device=dev), torch.randn(B, 768, device=dev)
    for prec in precisions:
        steps = {}
        for name, layer_cls in (("ours", AdaptorLayer), ("torch.nn", TorchLayer)):
            torch.manual_seed(0)
            model = Adaptor(cfg)
            model.layers = nn.ModuleList(layer_cls(cfg) for _ in range(cfg.n_layers))
            model = model.to(dev).train()
            opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

            def step(model=model, opt=opt, prec=prec):  # one pre-training step on pooled features
                with R.autocast(img.device, prec):
                    loss = adaptor_loss(*model(img, txt), model.logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            steps[name] = step
        rows += R.bench_alternating(steps, precision=prec, batch=B, device=dev, n_steps=args.bench_steps,
                                    unit="pair", label="adaptor step, {}")
        vision = DINOv2(vcfg).init_random(0).to(dev).eval()
        bert = BERT(BertConfig(), add_pooler=True).init_random(0).to(dev).eval()
        bs = 64 if dev.type == "cuda" else 8
        x, ids = torch.randn(bs, 3, 224, 224, device=dev), torch.randint(0, 30522, (bs, MAX_WORDS), device=dev)
        for what, unit, fn in ((f"DINOv2 ({vcfg.dim}) features at 224", "img", lambda: image_features(vision, x)),
                               (f"BERT-base features, {MAX_WORDS} tokens", "text",
                                lambda: text_features(bert, ids, torch.ones_like(ids)))):
            def fwd(fn=fn):
                with torch.no_grad(), R.autocast(dev, prec):
                    fn()
            rows.append(R.bench_step(what, fwd, precision=prec, batch=bs, device=dev, steps=args.bench_steps,
                                     unit=unit))
    return rows

# ----------------------------------------------------------------------------------------------------------
# main

RECIPES = {  # the official shell scripts (shell/*.sh) and the downstream settings
    "pretrain": dict(epochs=50, batch_size=1024, lr=2e-5, weight_decay=0.01),
    "classify-rsna": dict(epochs=100, batch_size=512, lr=5e-5, weight_decay=1e-4),
    "classify-covidx": dict(epochs=50, batch_size=128, lr=5e-4, weight_decay=0.05),
    "segment": dict(epochs=50, batch_size=4, lr=5e-4, weight_decay=1e-4),
}
DEMO_RECIPES = {  # tiny models on 600 demo images: short, larger steps, a narrower adaptor and decoder
    "pretrain": dict(epochs=30, batch_size=100, lr=1e-3, weight_decay=0.01, dim=128, heads=4, ff=256),
    "classify": dict(epochs=60, batch_size=100, lr=3e-3, weight_decay=1e-4),
    "segment": dict(epochs=5, batch_size=16, lr=3e-3, weight_decay=1e-4, decoder_width=32),
}


def recipe(args, task: str):
    """A copy of args with the flags not typed on the command line filled from the task's recipe."""
    key = task if task != "classify" or args.data == "demo" else \
        f"classify-{'rsna' if args.data == 'rsna' else 'covidx'}"
    fill = (DEMO_RECIPES if args.data == "demo" else RECIPES)[key].items()
    return argparse.Namespace(**vars(args) | {k: v for k, v in fill if k not in args.given})


def demo_backbones(args, world):
    """The demo's tiny DINOv2 and BERT play *pretrained* frozen backbones: frozen random ones give nearly the same
    global feature for every input, and the adaptor then learns nothing (pre-training loss pinned at ln B). They
    load DEMO_BACKBONES, pre-trained offline CLIP-style on the demo's training pairs (made by
    common/demo_weights/make_adaptor_backbones.py), with the tokenizer's vocabulary: the training captions' words."""
    from common.demo import ensure_demo
    if world.is_main:
        ensure_demo(Path(args.data_dir) if args.data_dir else REPO / "data" / "demo")
    R.barrier(world)
    with safe_open(str(DEMO_BACKBONES), "pt") as f:
        tok = word_tokenizer([f.metadata()["words"]], MAX_WORDS)
    tensors = read_safetensors(DEMO_BACKBONES, dtype=torch.float32)
    vision = DINOv2(VISION_PRESETS["tiny"]["config"])
    bert = BERT(BertConfig(vocab_size=tok.get_vocab_size(), **TINY_BERT), add_pooler=True)
    for prefix, model in (("vision.", vision), ("text.", bert)):
        R.load_tensors(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                       str(DEMO_BACKBONES), required=model.state_dict())
    return vision, bert, tok


def backbones(args, world):
    """-> (frozen DINOv2, frozen BERT, tokenizer), in eval mode, frozen weights in the compute dtype on CUDA."""
    if args.vision == "tiny" or args.text == "tiny":
        if not (args.vision == args.text == "tiny"):
            raise R.RunError("--vision tiny and --text tiny go together (the demo's backbones)")
        vision, bert, tok = demo_backbones(args, world)
    else:
        vision = DINOv2.from_pretrained(args.vision_path or VISION_PRESETS[args.vision]["repo"])
        folder = resolve(args.text_path or TEXT_PRESETS[args.text]["repo"])
        bert, tok = load_bert(folder, args.missing_pooler, args.seed), bert_tokenizer(folder, MAX_WORDS)
    for m in (vision, bert):
        m.requires_grad_(False).eval()
        if world.device.type == "cuda" and args.precision != "fp32":
            R.cast_frozen(m, R.PRECISIONS[args.precision])
    return vision.to(world.device), bert.to(world.device), tok


def load_adaptor(path: Path, device) -> Adaptor:
    """A finished pre-training (RUN or RUN/pretrain) -> the Adaptor, frozen."""
    folder = init_folder(path)
    model = Adaptor(AdaptorConfig(**json.loads((folder / "model.json").read_text())["adaptor"]))
    R.load_final(model, folder, "cpu", required=list(model.state_dict()), name=STAGE)  # every tensor, checked
    return model.requires_grad_(False).eval().to(device)


def init_folder(path: Path) -> Path:
    for folder in (path, path / "pretrain"):
        if (folder / "model.json").is_file() and (folder / STAGE).is_file():
            if "adaptor" in json.loads((folder / "model.json").read_text()):
                return folder
    raise DataError(f"--init {path}: no finished pre-training there (model.json + weights.safetensors in it or in "
                    "its pretrain/ folder). Is the run finished? Continue it with --resume.")


def preflight(args):
    """Before any work or run folder: every missing dataset file and weight folder, in one message."""
    problems, d, root = [], DATASETS[args.data], data_root(args)
    if args.data != "demo":
        wanted = [d["pairs"].format(s) for s in d["splits"]] if args.task == "pretrain" else [d.get(args.task)]
        if args.task != "pretrain" and not d.get(args.task):
            problems.append(f"--data {args.data} has no {args.task} split; use one of "
                            f"{[k for k, v in DATASETS.items() if v.get(args.task)]}")
        missing = (missing_dataset(args.data, d, root, w) for w in wanted if w)
        problems += [m for m in missing if m]
        for name, presets in (("vision", VISION_PRESETS), ("text", TEXT_PRESETS)):
            repo = getattr(args, f"{name}_path") or presets[getattr(args, name)]["repo"]
            if repo and (name == "vision" or args.task == "pretrain"):
                try:
                    resolve(repo)
                except WeightsError as e:
                    problems.append(f"--{name} {getattr(args, name)} weights: {e}")
    if args.task != "pretrain" and not args.init and args.data != "demo":
        problems.append(f"--task {args.task} needs --init RUN (a finished pre-training run)")
    if "tiny" in (args.vision, args.text) and not DEMO_BACKBONES.is_file():  # e.g. adaptor.py copied alone
        problems.append(f"{DEMO_BACKBONES}: the demo's pre-trained tiny DINOv2 + BERT are missing; copy "
                        "common/demo_weights/ with this file, or remake it: "
                        "python -m common.demo_weights.make_adaptor_backbones")
    if problems:
        raise DataError("\n\n".join(problems))


def run(args, world) -> dict:
    preflight(args)
    run_dir = Path(args.resume) if args.resume else R.new_run_dir("adaptor", args.data, args.out, vars(args), world)
    if world.device.type == "cpu" and args.vision == "tiny":
        torch.set_num_threads(1)  # tiny matrices: one thread is as fast as two and far faster on a busy CPU
    R.seed_everything(args.seed, world.rank)
    if args.init:  # the backbones the adaptor was pre-trained on, whatever today's defaults say
        spec = json.loads(init_folder(Path(args.init)).joinpath("model.json").read_text())
        for k in ("vision", "vision_path", "text", "text_path"):
            setattr(args, k, spec.get(k, getattr(args, k)))
    vision, bert, tok = backbones(args, world)
    size = args.size or DATASETS[args.data]["size"]
    tasks = ["pretrain", "classify", "segment"] if args.data == "demo" and args.task == "all" else [args.task]
    out, adaptor = {}, load_adaptor(Path(args.init), world.device) if args.init else None
    folder = run_dir / tasks[0]
    try:  # from here a non-finite loss or Ctrl-C exits 3 / 2 (R.Stopped), naming the task's last checkpoint
        for task in tasks:
            folder = run_dir / task
            folder.mkdir(parents=True, exist_ok=True)
            a = recipe(args, task)
            R.seed_everything(args.seed, world.rank)
            if task == "pretrain":
                if (folder / STAGE).is_file() or args.eval_only:
                    adaptor = load_adaptor(folder if not args.init else Path(args.init), world.device)
                    continue
                adaptor = pretrain(a, world, folder, vision, bert, tok, size).requires_grad_(False).eval()
            elif task == "classify":
                out[task] = classify(a, world, folder, vision, adaptor, size)
            else:
                out[task] = segment(a, world, folder, vision, adaptor)
    except (R.NonFiniteLoss, KeyboardInterrupt) as e:
        raise R.Stopped(e, run_dir, "python adaptor.py", folder / "ckpt") from None
    if world.is_main:
        print(f"run folder: {run_dir}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Adaptor: frozen DINOv2 + BERT, a shared transformer adaptor trained "
                                "contrastively, then classification / segmentation heads. Defaults are the paper's "
                                "pre-training; other tasks and the demo fill untyped flags from their recipe "
                                "(RECIPES / DEMO_RECIPES).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    R.add_common_args(p, datasets=DATASETS, data="demo", epochs=50, steps=0, batch_size=1024, lr=2e-5, seed=42,
                      eval_batch_size=64, ckpt_every=500,
                      help={"epochs": "paper: 50 pre-training, 100 RSNA, 50 COVIDx, 50 seg; demo: 30 / 60 / 5",
                            "batch_size": "paper: 1024 / 512 RSNA / 128 COVIDx / 4 seg; demo: 100 / 100 / 16",
                            "lr": "paper: 2e-5 / 5e-5 RSNA / 5e-4 COVIDx and seg; demo: 1e-3 / 3e-3 / 3e-3"})
    p.add_argument("--task", choices=["all", "pretrain", "classify", "segment"], default="all",
                   help="what to train; all = the demo's three in a row (on real data: pretrain)")
    p.add_argument("--data-pct", type=float, default=1.0, help="fraction of the training labels (stratified, "
                   "seeded): 0.01 / 0.1 / 1 in the paper")
    p.add_argument("--init", default=None, metavar="RUN", help="a finished pre-training run (classify / segment)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW (paper: 0.01 / 1e-4 RSNA / 0.05 COVIDx)")
    p.add_argument("--warmup-frac", type=float, default=0.02, help="pre-training linear warm-up, fraction of steps")
    p.add_argument("--cache-dir", default=str(REPO / "cache"), help="frozen feature cache")
    p.add_argument("--vision", choices=list(VISION_PRESETS), default="dinov2-b", help="vision backbone (demo: tiny)")
    p.add_argument("--vision-path", default=None, help="HF DINOv2 folder or repo id (overrides the preset's)")
    p.add_argument("--text", choices=list(TEXT_PRESETS), default="biobert", help="text backbone (demo: tiny)")
    p.add_argument("--text-path", default=None, help="HF BERT folder or repo id (overrides the preset's)")
    p.add_argument("--missing-pooler", choices=["error", "random", "cls"], default="error",
                   help="a BERT without a trained pooler (CXR-BERT): refuse, random (official), or use CLS")
    p.add_argument("--size", type=int, default=0, help="crop size; 0 = the dataset's (demo 112, 224, SIIM 896)")
    p.add_argument("--layers", type=int, default=2, help="adaptor layers")
    p.add_argument("--dim", type=int, default=768, help="adaptor width (projection_dim)")
    p.add_argument("--heads", type=int, default=12, help="adaptor attention heads")
    p.add_argument("--ff", type=int, default=2048, help="adaptor FFN width")
    p.add_argument("--dropout", type=float, default=0.1, help="adaptor dropout")
    p.add_argument("--decoder-width", type=int, default=512, help="segmentation decoder channels of its first stage "
                   "(then / 2, / 4, / 8; official 512; demo 32)")
    p.add_argument("--tokens", action="store_true", help="attend over the frozen patch / word tokens (the paper's "
                   "figure) instead of one pooled token (the official code)")
    p.add_argument("--gather", action="store_true", help="negatives from all ranks (official: per rank)")
    p.add_argument("--dice-on-probs", action="store_true", help="dice term on sigmoid probabilities (official: logits)")
    args = p.parse_args(argv)
    given = R.given_flags(p, argv)
    if args.resume:
        R.restore_run_args_or_exit(p, args, given)
        given |= set(json.loads((Path(args.resume) / "args.json").read_text()).get("given", []))
    demo = args.data == "demo"
    for k, v in (dict(vision="tiny", text="tiny") if demo else dict(task="pretrain")).items():
        if k not in given:
            setattr(args, k, v)
    args.given = sorted(given)
    R.finish_common_args(p, args)
    if args.task == "all" and not demo:
        p.error("--task all is the demo's; on real data run pretrain, then classify / segment with --init")
    R.check_flags(p, args, [("data_pct", 0 < args.data_pct <= 1, "in (0, 1]")])
    return args


def main(argv=None):
    args = parse_args(argv)
    # a user mistake or a run stopped early (R.Stopped) is a message and its exit code, not a traceback
    return R.run_main(lambda world: run_bench(args, world) if args.bench else run(args, world), args.device)


if __name__ == "__main__":
    sys.exit(main())
