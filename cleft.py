"""CLEFT: language-image contrastive learning with an efficient LLM and prompt fine-tuning, in one file.

Paper: Du, Chang, Dvornek. "CLEFT: Language-Image Contrastive Learning with Efficient Large Language Model and
Prompt Fine-Tuning" (MICCAI 2024, arXiv 2407.21011). Official code: XYPB/CLEFT (Lightning + peft + torch.hub).
Hand-written here in plain PyTorch: DINOv2 ViT-B/14 with registers, a GPT-2 family decoder (BioMedLM 2.7B), and
the three PEFT methods the paper compares (LoRA, IA3, prefix tuning), all tested equal to transformers / peft.

The idea:
  1. Stage 1, contrastive pre-training. Image -> DINOv2 -> mean of all tokens before the final norm -> Linear(768,
     512); caption -> frozen LLM + PEFT (LoRA r 8 on c_attn: 2.6M parameters) -> hidden state at the first pad
     (EOS) token -> Linear(D, 512). Symmetric InfoNCE with a learnable temperature t:
        logits_ij = exp(t) cos(img_i, txt_j),   L = CE(logits, arange) + CE(logits^T, arange)
  2. Stage 2, context prompts: 30 learnable input embeddings, initialised from the tokens of "this is a chest
     x ray of a patient with ", go in front of each class name; the encoders are frozen and the context learns
     from the zero-shot classification cross-entropy (the paper's text).
  3. Evaluation: zero-shot with class prompts, linear probe and full fine-tune of the ViT at 1 / 10 / 100 % of the
     training data; ACC, AUROC, macro-F1, kappa.

Run it:
    python cleft.py                                            # demo: both stages + zero-shot, tiny models, CPU
    python cleft.py --data chexpert --llm biomedlm --peft lora                 # stage 1, the paper's setting
    python cleft.py --data embed                                # stage 1 on EMBED mammograms + metadata captions
    python cleft.py --stage prompt --init runs/cleft/chexpert/<run> --data chexpert           # stage 2
    python cleft.py --eval zero-shot --init runs/cleft/chexpert/<run> --data chexpert5x200    # or rsna,
    python cleft.py --eval linear-probe --init RUN --data rsna --data-pct 0.01    # embed-birads, embed-density
    torchrun --nproc_per_node 4 cleft.py --data chexpert --grad-ckpt            # DDP, the paper's 4 GPUs
    python cleft.py --resume runs/cleft/chexpert/<run>                          # continue a stopped run
    python cleft.py --count-params --data chexpert ; python cleft.py --bench
Data: data/README.md and `python -m common.prepare chexpert|rsna|embed`. Weights: `python -m common.weights
download stanford-crfm/BioMedLM` (and facebook/dinov2-with-registers-base); `--vit-path/--llm-path` take folders.

As the official code: frontal CheXpert views only (--laterals adds the lateral ones); its image pipeline (pad
to a square, Otsu foreground crop, resize, and in training jitter / blur / affine / flip: image_transform);
captions cleaned to \\w+ words, prompts only lower-cased; stage 2 restarts the temperature at 1/0.07; weight
decay on every tensor but the 1-dim ones. Where this file departs from it (each is noted where it happens):
  - negatives are gathered from all ranks (official: the per-GPU batch of 72 only), so DDP = one big batch;
  - a caption that fills all 64 tokens is pooled at its last token (official: token 0, an indexing bug);
  - stage 2 follows the paper (frozen encoders, cross-entropy over class prompts); the official code trains the
    ViT with InfoNCE on captions in this stage: --prompt-objective infonce --train-vit;
  - the temperature is clamped at 100; trainables stay fp32 under bf16 autocast (official: bf16-true weights);
    the RSNA zero-shot prompt says "pneumonia" (official: "pneumothorax");
  - CheXpert stage-2 / probe sets are the single-positive rows of train.csv (official: the authors' unreleased
    five-class CSVs); the linear-probe and fine-tune recipes are ours (the official README gives none).
"""
import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from common import metrics as M
from common import run as R
from common.data import (CaptionDataset, DataError, bpe_tokenizer, classification_sets, dataset_file, dataset_root,
                         missing_dataset, right_padded)
from common import transforms as T
from common.demo import ensure_demo
from common.weights import WeightsError, load_config, load_mapped, resolve

REPO = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
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
                                   # (as HF Dinov2WithRegistersModel / Dinov2Model and the hub models do)


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    eps: float = 1e-5
    scale_by_inverse_layer: bool = False  # HF scale_attn_by_inverse_layer_idx (BioMedLM): scores also / (layer + 1)
    upcast_attn: bool = False             # HF reorder_and_upcast_attn: attention in fp32 under bf16 / fp16
    dropout: float = 0.1                   # embd / attn / resid pdrop, all 0.1 in gpt2 and BioMedLM
    eos_id: int = 50256                    # bos = eos = pad in GPT-2 and BioMedLM


@dataclass
class PEFTConfig:
    method: str = "lora"           # lora | ia3 | prefix | none
    r: int = 8                     # LoRA rank
    alpha: int = 32                # LoRA scaling = alpha / r = 4
    dropout: float = 0.1           # LoRA dropout on the adapter input
    n_prefix: int = 20             # prefix tuning: virtual tokens per layer


VIT_PRESETS = {
    "dinov2-reg-b14": dict(repo="facebook/dinov2-with-registers-base", config=DINOv2Config()),  # the paper's
    "dinov2-b14": dict(repo="facebook/dinov2-base", config=DINOv2Config(n_registers=0, pos_antialias=False)),
    "tiny": dict(repo=None, config=DINOv2Config(dim=64, n_layers=4, n_heads=4, patch_size=8, pos_grid=8)),
}
LLM_PRESETS = {  # real sizes written out so --count-params / --bench need no download
    "biomedlm": dict(repo="stanford-crfm/BioMedLM", config=GPT2Config(
        vocab_size=28896, dim=2560, n_layers=32, n_heads=20, scale_by_inverse_layer=True, eos_id=28895)),
    "gpt2": dict(repo="openai-community/gpt2", config=GPT2Config()),
    "gpt2-medium": dict(repo="openai-community/gpt2-medium", config=GPT2Config(dim=1024, n_layers=24, n_heads=16)),
    "tiny": dict(repo=None, tokenizer=REPO / "common" / "tokenizers" / "gpt2_tiny.json", config=GPT2Config(
        vocab_size=726, n_positions=128, dim=64, n_layers=4, n_heads=4, dropout=0.0, eos_id=725)),
}

# ----------------------------------------------------------------------------------------------------------
# Attention, shared by both towers


def attention(q, k, v, scale: float, mask=None, causal: bool = False, dropout: float = 0.0):
    """softmax(q k^T * scale + mask) v through PyTorch's fused SDPA kernel (flash / memory-efficient on CUDA).
    q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs). mask (B or 1, 1, Tq, Tk) bool, True = may
    attend; causal=True instead of a mask for plain left-to-right attention; dropout on the attention weights
    (pass 0.0 in eval mode: SDPA does not look at module.training)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale)

# ----------------------------------------------------------------------------------------------------------
# DINOv2 ViT, with or without registers: the official torch.hub model's module names (HF checkpoints: DINOV2_MAP)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


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


class DINOv2MLP(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as DINOv2 was trained


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
# GPT-2 (pre-LN decoder, learned positions) with HF's module names; nn.Linear (out, in) for HF's Conv1D (in, out)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.nh, self.dropout, self.upcast = cfg.n_heads, cfg.dropout, cfg.upcast_attn
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)   # fused q, k, v: LoRA and IA3 attach here, as in peft
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.scale = (cfg.dim // cfg.n_heads) ** -0.5 / ((layer + 1) if cfg.scale_by_inverse_layer else 1)

    def forward(self, x, mask, past=None):
        """x (B, T, D); mask (B, 1, T, P + T) bool or None for plain causal; past = (k, v), each (B, nh, P, hs),
        prepended to this layer's keys and values (HF's past_key_values; a prefix for prefix tuning)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(v.dtype), v], 2)  # (B, nh, P+T, hs)
        p = self.dropout if self.training else 0.0
        if self.upcast:  # HF reorder_and_upcast_attn: scores and softmax in fp32 even under bf16 / fp16 autocast
            with torch.autocast(x.device.type, enabled=False):
                y = attention(q.float(), k.float(), v.float(), self.scale, mask, mask is None, p).to(v.dtype)
        else:
            y = attention(q, k, v, self.scale, mask, mask is None, p)                        # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.c_proj = nn.Linear(4 * cfg.dim, cfg.dim)   # IA3 scales this layer's INPUT (peft "feedforward")
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, mask, past=None):
        x = x + self.attn(self.ln_1(x), mask, past)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 / BioMedLM body without the LM head. forward -> hidden states after ln_f (B, T, D), equal to HF
    GPT2Model(...).last_hidden_state (CLEFT replaces the LM head by identity, so these ARE its "logits")."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.grad_ckpt = False    # --grad-ckpt: recompute each block in backward (activation memory / n_layers)

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "GPT2":
        """An HF gpt2 / gpt2-medium / stanford-crfm/BioMedLM folder (or repo id in the HF cache) -> GPT2 without
        its LM head, built on the meta device, every key and shape checked (no adapter yet: add_peft after)."""
        folder = resolve(path)
        with torch.device("meta"):
            model = cls(gpt2_config_from_hf(load_config(folder)))
        return load_mapped(model, folder, GPT2_MAP, dtype=dtype)

    def init_random(self, seed: int = 0, std: float = 0.02):
        """Random weights for the demo / bench: N(0, std), residual projections / sqrt(2 n_layers) (GPT-2)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if "ln" in name or name.endswith("bias"):  # LayerNorms at 1 / 0, biases at 0
                p.data.fill_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
            else:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith("c_proj.weight") else std
                p.data.copy_(torch.randn(p.shape, generator=g) * s)
        return self

    def forward(self, ids=None, attention_mask=None, embeds=None, past=None):
        """ids (B, T) or embeds (B, T, D) (stage-2 prompts), attention_mask (B, T) 1 = real token; past: one (k, v)
        per layer, as GPT2Attention.forward takes it. Right padding assumed (pad = eos), so position ids are 0..T-1,
        shifted by P when there is a past (HF GPT-2 starts positions at the past length)."""
        x = self.wte(ids) if embeds is None else embeds                                  # (B, T, D)
        B, T = x.shape[:2]
        P = past[0][0].shape[2] if past is not None else 0
        if P + T > self.cfg.n_positions:
            raise ValueError(f"sequence of {P + T} tokens > n_positions {self.cfg.n_positions}")
        x = self.drop(x + self.wpe(torch.arange(P, P + T, device=x.device)))
        mask = None  # None = plain causal; padding or a prefix need an explicit (B, 1, T, P + T) mask
        if attention_mask is not None or P:
            keys = torch.ones(B, P + T, dtype=torch.bool, device=x.device)
            if attention_mask is not None:
                keys[:, P:] = attention_mask.bool()
            causal = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)      # query t sees keys <= P+t
            mask = causal[None, None] & keys[:, None, None, :]
        recompute = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for blk, layer_past in zip(self.h, past if past is not None else [None] * len(self.h)):
            x = checkpoint(blk, x, mask, layer_past, use_reentrant=False) if recompute else blk(x, mask, layer_past)
        return self.ln_f(x)

# ----------------------------------------------------------------------------------------------------------
# PEFT layers, one class each. Parameter names and shapes are peft's (minus its "base_model.model." prefix and
# ".default" adapter name), so a peft adapter loads one to one through ADAPTER_MAP below.


class LoRALinear(nn.Linear):
    """LoRA (Hu et al. 2021) on a frozen linear layer:

        y = W x + b + (alpha / r) * B A dropout(x),    A (r, in) kaiming-uniform, B (out, r) = 0

    so the layer equals the pretrained one at step 0. merge() folds W <- W + (alpha/r) B A for inference."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: we take the pretrained W, b as they are (no copy)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)  # adapters stay fp32 under bf16
        self.lora_A = nn.Linear(base.in_features, r, **kw)                     # init kaiming-uniform(a=sqrt 5)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.merged = False

    def delta(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling                  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                                          # W x + b
        if self.merged:
            return y
        a = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))              # A dropout(x)  (..., r)
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)                           # + (alpha/r) B A x

    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("LoRA already merged; merging twice would add B A twice")
        self.weight += self.delta().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("LoRA is not merged")
        self.weight -= self.delta().to(self.weight.dtype)
        self.merged = False


class IA3Linear(nn.Linear):
    """(IA)^3 (Liu et al. 2022) on a frozen linear layer, as peft does it, l initialised to ones (the layer equals
    the pretrained one at step 0):
        attention (c_attn):        y = (W x + b) * l,   l (out, 1)   -- q, k AND v are scaled (the paper: k, v)
        feed-forward (mlp.c_proj): y = W (x * l) + b,   l (1, in)"""

    def __init__(self, base: nn.Linear, feedforward: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.feedforward, self.merged = feedforward, False
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device))

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        l = self.ia3_l.flatten()
        if self.feedforward:
            return F.linear((x * l).to(x.dtype), self.weight, self.bias)                # W (x * l) + b
        y = F.linear(x, self.weight, self.bias)
        return (y * l).to(y.dtype)                                                       # (W x + b) * l

    @torch.no_grad()
    def merge(self, undo: bool = False):
        """Fold l into W: (1, in) scales W's columns, (out, 1) its rows and then b too, as
        W (x * l) = (W * l_row) x  and  (W x + b) * l = (l_col * W) x + l * b.  undo=True divides it out again."""
        if self.merged != undo:
            raise RuntimeError("IA3 is not merged" if undo else "IA3 already merged")
        l = self.ia3_l.to(self.weight.dtype) + (1e-8 if undo else 0.0)  # peft's guard against dividing by zero
        apply = torch.Tensor.div_ if undo else torch.Tensor.mul_
        apply(self.weight, l)
        if not self.feedforward and self.bias is not None:
            apply(self.bias, l.flatten())
        self.merged = not undo

    def unmerge(self):
        self.merge(undo=True)


class PrefixKV(nn.Module):
    """Prefix tuning (Li & Liang 2021) without the reparametrisation MLP (peft prefix_projection=False):
        every layer i attends to [K_i^prefix ; K_i] and [V_i^prefix ; V_i],  K/V^prefix learned (P, D) each
    stored as one embedding table (P, n_layers * 2 * D) laid out [layer0 k, layer0 v, layer1 k, ...], peft's
    layout; N(0, 1) init like peft's nn.Embedding. forward(B) is GPT2's `past` argument (the real tokens' positions
    then start at P); add_peft puts it on the LLM as llm.prefix, run_llm passes it."""

    def __init__(self, n: int, cfg: GPT2Config, device=None):
        super().__init__()
        self.n, self.L, self.nh, self.hs = n, cfg.n_layers, cfg.n_heads, cfg.dim // cfg.n_heads
        self.embedding = nn.Embedding(n, cfg.n_layers * 2 * cfg.dim, device=device)

    def forward(self, B: int):
        kv = self.embedding.weight.view(self.n, 2 * self.L, self.nh, self.hs).permute(1, 2, 0, 3)  # (2L, nh, P, hs)
        kv = kv.unsqueeze(1).expand(-1, B, -1, -1, -1)                                             # (2L, B, nh, P, hs)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.L)]


def add_peft(llm: GPT2, cfg: PEFTConfig) -> GPT2:
    """Put the PEFT method into a (loaded) GPT2, in place, with the targets of the official code (peft's
    defaults for gpt2): LoRA on attn.c_attn; IA3 on attn.c_attn (output) and mlp.c_proj (input); a prefix."""
    for blk in llm.h:
        if cfg.method == "lora":
            blk.attn.c_attn = LoRALinear(blk.attn.c_attn, cfg.r, cfg.alpha, cfg.dropout)
        elif cfg.method == "ia3":
            blk.attn.c_attn = IA3Linear(blk.attn.c_attn, feedforward=False)
            blk.mlp.c_proj = IA3Linear(blk.mlp.c_proj, feedforward=True)
    if cfg.method == "prefix":
        llm.prefix = PrefixKV(cfg.n_prefix, llm.cfg, device=llm.wte.weight.device)
    elif cfg.method not in ("lora", "ia3", "none"):
        raise ValueError(f"unknown PEFT method {cfg.method!r} (lora, ia3, prefix, none)")
    return llm


def run_llm(llm: GPT2, ids=None, attention_mask=None, embeds=None):
    """The LLM's hidden states (N, T, D), with the prefix of prefix tuning when add_peft put one on it."""
    n = (ids if embeds is None else embeds).shape[0]
    prefix = getattr(llm, "prefix", None)
    return llm(ids, attention_mask, embeds=embeds, past=prefix(n) if prefix is not None else None)


def is_adapter(name: str) -> bool:
    """The filter that says which parameters are the PEFT method's (the only LLM tensors stage 1 trains)."""
    return "lora_" in name or "ia3_l" in name or "prefix." in name


def adapter_state_dict(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def set_merged(model: nn.Module, merged: bool):
    """Merge (or unmerge) every LoRA / IA3 layer of the model, e.g. to evaluate without the adapter overhead."""
    for m in model.modules():
        if isinstance(m, (LoRALinear, IA3Linear)) and m.merged != merged:
            m.merge() if merged else m.unmerge()

# ----------------------------------------------------------------------------------------------------------
# The method: two towers, projections, a learnable temperature, and the stage-2 context prompt


class CLEFT(nn.Module):
    """forward(pixels, ids, mask) -> (image embeddings (B, E), text embeddings (N, E), exp(temperature)), both
    L2-normalised; the logits of the contrastive loss are scale * img @ txt^T."""

    def __init__(self, vit: DINOv2, llm: GPT2, emb_dim: int = 512):
        super().__init__()
        self.vit, self.llm = vit, llm
        self.img_proj = nn.Linear(vit.cfg.dim, emb_dim)   # official --linear_proj (the README runs use it)
        self.txt_proj = nn.Linear(llm.cfg.dim, emb_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.ctx = None  # stage 2: (n_ctx, D) learned input embeddings put in front of every class name

    def add_context(self, init_ids: torch.Tensor):
        """Stage 2: learnable context embeddings initialised from the LLM's embeddings of init_ids (n_ctx,)."""
        self.ctx = nn.Parameter(self.llm.wte.weight.detach()[init_ids].float().clone())     # (n_ctx, D)

    def image_features(self, pixels):
        """CLEFT's --pool_feat: the mean of ALL tokens (CLS, registers, patches) before the final LayerNorm.
        The official comment says "following FLIP, patch features"; CLS and registers are in the mean too."""
        return self.vit(pixels)[1].mean(1)                                                # (B, Dv)

    def encode_image(self, pixels):
        return F.normalize(self.img_proj(self.image_features(pixels)).float(), dim=-1)   # (B, E)

    def encode_text(self, ids, mask):
        """ids, mask (N, T), right-padded with eos. The text embedding is the hidden state at the first pad, right
        after the last real token (pad = eos: its query sees exactly the real tokens); a caption filling all T
        tokens pools its last token (official: index -k for k trailing pads, so token 0)."""
        emb = None
        if self.ctx is not None:  # [ctx_1 .. ctx_n, name tokens, pads]: positions run over the whole sequence
            N = ids.shape[0]
            emb = torch.cat([self.ctx.to(self.llm.wte.weight.dtype).expand(N, -1, -1), self.llm.wte(ids)], 1)
            mask = torch.cat([mask.new_ones(N, self.ctx.shape[0]), mask], 1)
        h = run_llm(self.llm, ids if emb is None else None, mask, embeds=emb)            # (N, T', D)
        last = mask.sum(1).clamp(max=h.shape[1] - 1)                                      # first pad, or last token
        pooled = h[torch.arange(h.shape[0], device=h.device), last]                      # (N, D)
        return F.normalize(self.txt_proj(pooled).float(), dim=-1)                        # (N, E)

    def forward(self, pixels, ids, mask):
        return self.encode_image(pixels), self.encode_text(ids, mask), self.logit_scale.exp()


def contrastive_loss(img, txt, scale, gather: bool = True):
    """Symmetric InfoNCE (the module docstring's L) over the batch of ALL ranks: features are gathered with gradient,
    so DDP gives the loss and update of one process on the whole batch (official: the per-GPU batch of 72 only).
    Summed, not averaged, as officially (CLIP averages: only the scale differs)."""
    if gather:
        img, txt = R.gather_with_grad(img), R.gather_with_grad(txt)                      # (N, E) all ranks
    logits = scale * img @ txt.t()                                                        # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


def build_model(spec: dict, device="cpu", llm_dtype=None) -> CLEFT:
    """A CLEFT from a model spec (model_spec: the --vit/--llm/--peft choices; saved as model.json in every run).
    Pretrained towers come from their HF folders (the frozen LLM read directly in llm_dtype, e.g. bf16: 5 GB for
    BioMedLM instead of 10); "tiny" towers get fixed random weights (seed 0, independent of --seed: they play the
    pretrained model). Built on `device` ("meta" for counting parameters without memory)."""
    vit_preset, llm_preset = VIT_PRESETS[spec["vit"]], LLM_PRESETS[spec["llm"]]
    dev = torch.device(device)
    meta = dev.type == "meta"
    if spec["vit"] == "tiny" or meta:
        with dev:
            vit = DINOv2(vit_preset["config"])
        vit = vit if meta else vit.init_random(0)
    else:
        vit = DINOv2.from_pretrained(spec["vit_path"] or vit_preset["repo"])
    if spec["llm"] == "tiny" or meta:
        cfg = llm_preset["config"]
        if spec["llm"] == "tiny":  # the vocabulary comes from the tokenizer file
            cfg = replace(cfg, vocab_size=load_tokenizer(spec).get_vocab_size())
        with dev:
            llm = GPT2(cfg)
        # the tiny stand-in "pretrained" LLM gets std 1/sqrt(dim), so its random attention actually mixes tokens
        llm = llm if meta else llm.init_random(0, cfg.dim ** -0.5)
    else:
        llm = GPT2.from_pretrained(spec["llm_path"] or llm_preset["repo"], dtype=llm_dtype)
    torch.manual_seed(spec["seed"])  # adapter / projection init depends on the seed only
    add_peft(llm, PEFTConfig(**spec["peft"]))
    with dev:
        return CLEFT(vit, llm, spec["emb_dim"])

# ----------------------------------------------------------------------------------------------------------
# Weight loading: HF safetensors -> our modules through literal key maps. "{}" is one dotted component (a layer
# index, or weight/bias); None drops a key; "T" transposes Conv1D (in, out) into nn.Linear (out, in); "q"/"k"/"v"
# are stacked on dim 0 into one fused qkv tensor.

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

GPT2_MAP = {  # keys of `gpt2` files (GPT2Model names)
    "wte.weight": "wte.weight", "wpe.weight": "wpe.weight",
    "h.{}.ln_1.{}": "h.{}.ln_1.{}",
    "h.{}.attn.c_attn.weight": ("h.{}.attn.c_attn.weight", "T"), "h.{}.attn.c_attn.bias": "h.{}.attn.c_attn.bias",
    "h.{}.attn.c_proj.weight": ("h.{}.attn.c_proj.weight", "T"), "h.{}.attn.c_proj.bias": "h.{}.attn.c_proj.bias",
    "h.{}.ln_2.{}": "h.{}.ln_2.{}",
    "h.{}.mlp.c_fc.weight": ("h.{}.mlp.c_fc.weight", "T"), "h.{}.mlp.c_fc.bias": "h.{}.mlp.c_fc.bias",
    "h.{}.mlp.c_proj.weight": ("h.{}.mlp.c_proj.weight", "T"), "h.{}.mlp.c_proj.bias": "h.{}.mlp.c_proj.bias",
    "ln_f.{}": "ln_f.{}",
    "h.{}.attn.bias": None,                          # the causal-mask buffer old checkpoints saved
    "h.{}.attn.masked_bias": None,
    "lm_head.weight": None,                          # tied to wte, and CLEFT drops the LM head anyway
}
GPT2_MAP |= {"transformer." + k: v for k, v in GPT2_MAP.items()}  # BioMedLM's files: GPT2LMHeadModel names

ADAPTER_MAP = {  # peft adapter_model.safetensors -> ours (task CAUSAL_LM on GPT2LMHeadModel, the official setup)
    "base_model.model.transformer.h.{}.attn.c_attn.lora_A.weight": "h.{}.attn.c_attn.lora_A.weight",
    "base_model.model.transformer.h.{}.attn.c_attn.lora_B.weight": "h.{}.attn.c_attn.lora_B.weight",
    "base_model.model.transformer.h.{}.attn.c_attn.ia3_l": "h.{}.attn.c_attn.ia3_l",
    "base_model.model.transformer.h.{}.mlp.c_proj.ia3_l": "h.{}.mlp.c_proj.ia3_l",
    "prompt_embeddings": "prefix.embedding.weight",
}


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


def gpt2_config_from_hf(hf: dict) -> GPT2Config:
    """HF GPT2Config (config.json of transformers 4.x or 5.x; n_embd / n_layer / n_head / n_positions or their
    aliases hidden_size / num_hidden_layers / num_attention_heads / max_position_embeddings) -> GPT2Config.
    Fields that change the computation and are not implemented are refused; the GPT2DoubleHeadsModel summary_*
    fields, tie_word_embeddings (CLEFT drops the LM head) and use_cache do not matter here."""
    kind = hf.get("model_type", "gpt2")
    if kind != "gpt2":
        raise WeightsError(f"config.json has model_type {kind!r}: cleft.py implements GPT-2 (model_type gpt2)")

    def field(*names, default=None):
        value = next((hf[n] for n in names if hf.get(n) is not None), default)
        if value is None:
            raise WeightsError(f"GPT-2 config.json has none of {names}")
        return value

    dim, heads = field("n_embd", "hidden_size"), field("n_head", "num_attention_heads")
    act = hf.get("activation_function", "gelu_new")
    drops = {k: hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    refused = [why for bad, why in (  # gelu_new and gelu_pytorch_tanh are both the tanh approximation of GELU
        (act not in ("gelu_new", "gelu_pytorch_tanh"), f"activation_function {act!r} (implemented: gelu_new)"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights false (implemented: scores / sqrt(head size))"),
        (hf.get("add_cross_attention", False), "add_cross_attention true (implemented: decoder-only)"),
        (hf.get("n_inner") not in (None, 4 * dim), f"n_inner {hf.get('n_inner')} (implemented: 4 x n_embd)"),
        (len(set(drops.values())) > 1, f"different dropouts {drops} (implemented: one rate for all three)"),
        (dim % heads, f"n_embd {dim} not divisible by n_head {heads}")) if bad]
    if refused:
        raise WeightsError("this GPT-2 config is not supported by cleft.py: " + "; ".join(refused))
    eos = hf.get("eos_token_id", hf.get("vocab_size", 50257) - 1)
    vocab, n_positions = field("vocab_size"), field("n_positions", "max_position_embeddings", "n_ctx")
    return GPT2Config(vocab_size=vocab, n_positions=n_positions, dim=dim,
                      n_layers=field("n_layer", "num_hidden_layers"), n_heads=heads,
                      eps=field("layer_norm_epsilon", "layer_norm_eps", default=1e-5),
                      scale_by_inverse_layer=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                      upcast_attn=bool(hf.get("reorder_and_upcast_attn", False)),
                      dropout=drops["resid_pdrop"], eos_id=eos if isinstance(eos, int) else eos[0])


def load_adapter(llm: GPT2, path_or_tensors, source: str = "adapter"):
    """Load adapter tensors saved by peft (adapter_model.safetensors, or the folder holding it) or by us
    (adapter_state_dict) into an LLM that already has the matching add_peft layers. Adapters stay fp32."""
    if isinstance(path_or_tensors, dict):  # our own names
        R.load_tensors(llm, path_or_tensors, source, required=adapter_state_dict(llm))
        return llm
    path = Path(path_or_tensors)
    path = path / "adapter_model.safetensors" if path.is_dir() else path
    return load_mapped(llm, path, ADAPTER_MAP, dtype=torch.float32,
                       drop_missing=[k for k in llm.state_dict() if not is_adapter(k)])

# ----------------------------------------------------------------------------------------------------------
# Data: datasets, captions, prompts, tokens

CXR_PREFIX = "this is a chest x ray of a patient with "
MAMMO_PREFIX = "this is a breast 2d full-field digital mammogram of a patient with "
BIRADS = ["additional imaging required", "negative", "benign finding", "probably benign finding",
          "suspicious abnormality", "highly suggestive of malignancy", "known biopsy-proven malignancy"]
DENSITY = ["almost entirely fat", "scattered fibroglandular densities", "heterogeneously dense", "extremely dense"]
# folder under data/; image-text CSVs (stage 1); class split (stage 2 / evaluation); CheXpert CSVs whose
# one-positive rows train stage 2 / the probes; the zero-shot prompts; the official image pipeline or the demo's;
# (common.data.missing_dataset says where to download it and that `python -m common.prepare <dir>` writes it)
CXR = dict(prompts="cxr", prefix=CXR_PREFIX, pipeline="official")
CHEXPERT = dict(CXR, dir="chexpert", split="split_chexpert5x200.json", class_csvs=("train.csv", "valid.csv"))
EMBED = dict(dir="embed", prefix=MAMMO_PREFIX, pipeline="official")
DATASETS = {
    "demo": dict(dir="demo", pairs=("reports_train.csv", "reports_val.csv"), split="split_demo.json",
                 prompts="demo", prefix="", pipeline="demo"),
    "chexpert": dict(CHEXPERT, pairs=("train.csv", "valid.csv")),
    "chexpert5x200": CHEXPERT,
    "rsna": dict(CXR, dir="rsna", split="split_rsna.json"),
    "embed": dict(EMBED, pairs=("captions_train.csv", "captions_valid.csv"), split="split_embed-birads.json",
                  prompts="birads", classes=7),
    "embed-birads": dict(EMBED, split="split_embed-birads.json", prompts="birads", classes=7),
    "embed-density": dict(EMBED, split="split_embed-density.json", prompts="density", classes=4),
}


def data_root(args) -> Path:
    return dataset_root(args.data, DATASETS[args.data], args.data_dir)


def data_file(args, name: str) -> Path:
    """data_root/name, or a DataError saying what to download and which command prepares it."""
    return dataset_file(args.data, DATASETS[args.data], data_root(args), name)


def image_transform(args, size: int, train: bool):
    """The official CLEFT pipeline (datasets/utils.py get_imgs + datasets/transforms.py Moco2Transform) for CheXpert,
    RSNA and EMBED, scaled to `size` (224 at real size; 256 below is size * 256 / 224):
        gray; longest side to 256, zero padding to 256 x 256 (centred); Otsu foreground crop; resize to size x size
        (bilinear, the aspect ratio is not kept); train only: colour jitter (brightness, contrast 0.2, p 0.4),
        Gaussian blur (7 x 7, sigma 0.1-2, p 0.4), random affine (10 degrees, scale 0.8-1.1, translate 1/16),
        horizontal flip; grey RGB; Normalize(0.5, 0.5).
    Still different: PIL reads the images (a colour file -> luma), not cv2.imread, and its box filter stands in for
    cv2 INTER_AREA when shrinking to 256 (both average areas; pixel values can differ by a rounding step); the
    official RandomGrayscale(p=1) and RandomCrop(224) of a 224 image change nothing and are left out.
    --simple-transforms, and --data demo (colour pictures, tiny ViT): a plain resize + centre crop, and a mild
    random resized crop + flip in training."""
    if DATASETS[args.data]["pipeline"] == "official" and not args.simple_transforms:
        return T.official_cleft_transform(size, train)
    if not train:
        return T.eval_transform(size, T.HALF_MEAN, T.HALF_STD)
    return T.Compose([T.ToRGB(), T.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.9, 1.1)),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(T.HALF_MEAN, T.HALF_STD)])


def caption_sets(args, size: int):
    """Stage-1 image-text pairs (train, val) of --data: the report column of an image-report CSV (the demo;
    EMBED, whose captions common/prepare/embed.py builds from the metadata as the official dataset does), or,
    for CheXpert (no reports in CLEFT), CXR_PREFIX + its positive findings, uncertain (-1) and blank counted as
    negative, frontal views only unless --laterals: all as the official code (common.data.CaptionDataset)."""
    d = DATASETS[args.data]
    if "pairs" not in d:
        raise DataError(f"--data {args.data} has no image-text pairs for contrastive pre-training; use --data "
                        f"chexpert or embed (or demo), or evaluate with --eval")
    files = [data_file(args, f) for f in d["pairs"]]
    return tuple(CaptionDataset(data_root(args), f, image_transform(args, size, train), frontal_only=not args.laterals)
                 for f, train in zip(files, (True, False)))


def class_sets(args, size: int, train_transform=True):
    """(train, val, test) classification sets of --data, each with .labels and .classnames. CheXpert: the test
    set is CheXpert-5x200, train / val are the (frontal unless --laterals) rows of train.csv / valid.csv whose
    only positive among the five classes is one of them: our stand-in for the official (unreleased)
    train_cheXbert_95_five_classes.csv (common.data.classification_sets). --data-pct takes a fixed subset of
    train with seed 42, as the official df.sample(frac, random_state=42) (not pandas' own draw)."""
    d = DATASETS[args.data]
    split = data_file(args, d["split"])
    csvs = [data_file(args, f) for f in d["class_csvs"]] if "class_csvs" in d else None
    return classification_sets(data_root(args), split, image_transform(args, size, train_transform),
                               image_transform(args, size, False), csvs, frontal_only=not args.laterals,
                               frac=args.data_pct, seed=42, n_classes=d.get("classes"))


def class_texts(args, classnames, root: Path):
    """-> (zero-shot prompts, class words). The prompts are the official ones (but RSNA's positive one says "pneumonia",
    not "pneumothorax", for a pneumonia dataset), lower-cased and tokenised as they are (punctuation kept, as the
    official EMBED dataset does); the class words, what stage 2 puts after its context, lack their fixed prefix."""
    d = DATASETS[args.data]
    if d["prompts"] == "birads":
        words = [f"birads score {k}: {desc}." for k, desc in enumerate(BIRADS)]
    elif d["prompts"] == "density":
        words = [f"breast tissue density {k + 1}: {desc}." for k, desc in enumerate(DENSITY)]
    elif d["prompts"] == "demo":  # the demo's class names are rare in its reports: describe the class instead
        desc = json.loads((root / "classes.json").read_text())["descriptions"]   # (data/demo/classes.json)
        words = [", ".join(desc[c]) for c in classnames]
    else:
        words = ["no findings" if c.lower() in ("normal", "no finding") else c.lower() for c in classnames]
    return [d["prefix"] + w for w in words], words


def load_tokenizer(spec: dict):
    """The LLM's byte-level BPE: the tiny preset's file, else the tokenizer.json (or vocab.json + merges.txt, as
    older GPT-2 repos ship it) next to the weights (common.data.bpe_tokenizer)."""
    preset = LLM_PRESETS[spec["llm"]]
    if preset.get("tokenizer") and not spec["llm_path"]:
        return bpe_tokenizer(preset["tokenizer"])
    return bpe_tokenizer(resolve(spec["llm_path"] or preset["repo"]))


def clean(text: str) -> str:
    """Lower-case words only, as the official code prepares captions (regex \\w+)."""
    return " ".join(re.findall(r"\w+", text.lower()))


def tokenize(tok, texts, length: int, eos: int, space: bool = False, as_captions: bool = True):
    """texts -> ids, mask (N, length): no bos, no eos appended, right-padded with eos = pad; an empty text is just
    eos. as_captions cleans the text as the official code cleans captions; prompts (False) are only lower-cased.
    space=True puts a leading space so words get their mid-sentence tokens (stage 2: they follow the context)."""
    texts = [(" " if space else "") + (clean(t) if as_captions else t.lower()) for t in texts]
    return right_padded(tok, texts, length, eos)

# ----------------------------------------------------------------------------------------------------------
# Training: one step loop shared by both stages and the fine-tune evaluation


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """CosineAnnealingWarmupRestarts (katsura-jp, one cycle) as the official code steps it: linear warm-up from
    min_lr to lr, then cosine down to min_lr at `total`."""
    if step < warmup:
        return min_lr + (lr - min_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """The official groups (utils_mae/lr_decay.py param_groups_lrd_moco): every trainable tensor is decayed
    except the 1-dim ones (biases, norms, LayerScale). So the 0-dim temperature, the CLS / register tokens, the
    position embedding, the (out, 1) IA3 vectors and the stage-2 context ARE decayed, as officially. (Its
    layer-wise lr scales are overwritten by the scheduler, so there are none here either.)"""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in named if p.ndim != 1], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.ndim == 1], "weight_decay": 0.0}]


def set_trainable(model: nn.Module, names: list):
    """requires_grad on the parameters whose name starts with one of `names` (or is an adapter, for "adapter").
    The ViT's final norm stays frozen: CLEFT pools BEFORE it, so it gets no gradient (and DDP would complain)."""
    for k, p in model.named_parameters():
        p.requires_grad_((any(k.startswith(n) for n in names) or ("adapter" in names and is_adapter(k)))
                         and not k.startswith("vit.norm."))


def stage1_trainable(model: CLEFT, args):
    """Stage 1 trains the ViT (unless --freeze-vit), the PEFT adapter, both projections and the temperature."""
    set_trainable(model, ([] if args.freeze_vit else ["vit."]) + ["adapter", "img_proj", "txt_proj", "logit_scale"])


def train_steps(args, world, stage_dir: Path, model, opt, ds, loss_fn, warmup: int, after_step=None, desc="train"):
    """Run --steps optimizer steps (or --epochs over `ds` when --steps is 0) with lr_at from args.lr to args.min_lr,
    resuming from stage_dir/ckpt if a checkpoint is there. Checkpoints every --ckpt-every steps and at the end hold
    the trainable tensors, optimizer, scaler, RNG and step: a killed run continues exactly where it stopped."""
    n_batches = len(R.epoch_batches(len(ds), args.batch_size, args.seed, 0, world))
    total = args.steps or args.epochs * n_batches
    net = R.wrap_model(model, world, compile=args.compile)
    scaler = R.make_scaler(args.precision, world.device)
    ckpts = R.Checkpoints(stage_dir / "ckpt", world)
    resumed = ckpts.load(optimizer=opt, scaler=scaler, resuming=bool(args.resume))
    if resumed is not None:
        R.load_tensors(model, resumed.tensors, str(resumed.path))
    step = resumed.step if resumed is not None else 0
    if world.is_main:
        print(f"{desc}: {len(ds)} training items, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
              f"trainable parameters, {total} steps of {args.batch_size} x {world.size}")
    log = R.JsonlLog(stage_dir / "metrics.jsonl", world.is_main)
    progress = R.Progress(total, desc, world.is_main, every=args.print_every, start=step)
    net.train()
    while step < total:
        epoch, skip = divmod(step, n_batches)
        batches = R.epoch_batches(len(ds), args.batch_size, args.seed, epoch, world)[skip:]
        for batch in R.epoch_loader(ds, batches, world, args.num_workers, args.seed, epoch):
            lr = lr_at(step, total, warmup, args.lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with R.autocast(world.device, args.precision):
                loss = loss_fn(net, batch)
            loss_value = R.optimizer_step(loss, opt, scaler, world, step)  # the step's one host sync
            if after_step is not None:
                after_step()
            step += 1
            if step % args.log_every == 0 or step == total:
                log.log(step=step, epoch=epoch, loss=loss_value, lr=lr)
            progress.update(1, loss=loss_value, lr=lr)
            if step % args.ckpt_every == 0 or step == total:
                trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
                ckpts.save(step, trainable, optimizer=opt, scaler=scaler, extra={"epoch": epoch})
            if step >= total:
                break
    return step


def to_device(world, *tensors):
    return [t.to(world.device) for t in tensors]


def stage_contrastive(args, world, stage_dir: Path, model: CLEFT, tok, size: int):
    """Stage 1: InfoNCE between images and captions (stage1_trainable), with AdamW + warm-up + cosine; logit
    scale clamped at 100. Then the validation loss, which the official code picks checkpoints by (we report it)."""
    train_ds, val_ds = caption_sets(args, size)
    stage1_trainable(model, args)
    R.cast_frozen(model, R.PRECISIONS[args.precision])
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))

    def loss_fn(net, batch, gather=True):
        x, captions = batch
        ids, mask = tokenize(tok, captions, args.max_len, model.llm.cfg.eos_id)
        return contrastive_loss(*net(*to_device(world, x, ids, mask)), gather)

    step = train_steps(args, world, stage_dir, model, opt, train_ds, loss_fn, args.warmup, desc="stage 1 (contrastive)",
                       after_step=lambda: model.logit_scale.data.clamp_(max=math.log(100)))  # CLIP's cap, every step
    if world.is_main:
        model.eval()
        with torch.no_grad(), R.autocast(world.device, args.precision):
            val = torch.utils.data.DataLoader(val_ds, args.eval_batch_size, num_workers=args.num_workers,
                                              drop_last=True)  # whole batches: the loss's chance level is 2 ln B
            losses = [loss_fn(model, b, gather=False).item() for b in val]
        if losses:
            B, loss = args.eval_batch_size, float(np.mean(losses))
            print(f"stage 1 validation loss {loss:.4f} ({len(val_ds)} pairs, batches of {B}; chance 2 ln {B} = "
                  f"{2 * math.log(B):.2f})")
            R.JsonlLog(stage_dir / "metrics.jsonl").log(step=step, val_loss=loss)


def stage_prompt(args, world, stage_dir: Path, model: CLEFT, tok, size: int):
    """Stage 2: learn n_ctx context embeddings in front of the class words with SGD + warm-up + cosine, by the
    paper's objective (--prompt-objective ce) or the official code's (infonce --train-vit; module docstring). As
    officially, the temperature restarts at 1/0.07 (its --pretrained_encoder loads the encoders only)."""
    if model.ctx is None:  # peft PromptTuningInit.TEXT: the init text's tokens, repeated then cut to n_ctx
        e = tok.encode(args.ctx_init or DATASETS[args.data]["prefix"] or "a photo of a").ids or [0]
        model.add_context(torch.tensor((e * (args.n_ctx // len(e) + 1))[:args.n_ctx]).to(model.llm.wte.weight.device))
    model.logit_scale.data.fill_(math.log(1 / 0.07))
    set_trainable(model, ["ctx"] + (["vit.", "img_proj", "logit_scale"] if args.train_vit else []))
    R.cast_frozen(model, R.PRECISIONS[args.precision])
    opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9)
    eos = model.llm.cfg.eos_id
    if args.prompt_objective == "ce":
        train_ds = class_sets(args, size)[0]
        words = class_texts(args, train_ds.classnames, data_root(args))[1]
        length = max(len(tok.encode(" " + w.lower()).ids) for w in words) + 1
        ids, mask = to_device(world, *tokenize(tok, words, length, eos, space=True, as_captions=False))

        def loss_fn(net, batch):
            x, y = to_device(world, *batch)
            img, txt, scale = net(x, ids, mask)                                          # (B, E), (C, E)
            return F.cross_entropy(scale * img @ txt.t(), y)                             # (B, C) logits
    else:
        train_ds = caption_sets(args, size)[0]
        prefix = clean(DATASETS[args.data]["prefix"])

        def loss_fn(net, batch):  # official: the caption's label words only, after the learned context
            x, captions = batch
            ids, mask = tokenize(tok, [clean(c).removeprefix(prefix) for c in captions], args.max_len - 1, eos,
                                 space=True)
            return contrastive_loss(*net(*to_device(world, x, ids, mask)))

    train_steps(args, world, stage_dir, model, opt, train_ds, loss_fn, args.warmup,
                desc=f"stage 2 (context prompt, {args.prompt_objective})")

# ----------------------------------------------------------------------------------------------------------
# Evaluation: zero-shot, linear probe, fine-tune; ACC / AUROC / macro-F1 / kappa from common/metrics


@torch.no_grad()
def zero_shot(args, world, model: CLEFT, tok, ds) -> dict:
    """Classify by the most similar class prompt: stage-2 context + class words, else the dataset's fixed prompts."""
    model.eval()
    prompts, words = class_texts(args, ds.classnames, data_root(args))
    texts, space = (words, True) if model.ctx is not None else (prompts, False)
    ids, mask = tokenize(tok, texts, args.max_len, model.llm.cfg.eos_id, space, as_captions=False)
    with R.autocast(world.device, args.precision):
        txt = model.encode_text(*to_device(world, ids, mask))                            # (C, E)
    scale = model.logit_scale.exp()
    logits, y = R.predict(lambda x: scale * model.encode_image(x) @ txt.t(), ds, args, world.device)    # (N, C)
    return M.report_from_probs(y, logits.softmax(-1), ds.classnames)


class Classifier(nn.Module):
    """The ViT's pooled feature -> Linear(D, K): the official fine-tune / linear probe head, replacing img_proj."""

    def __init__(self, model: CLEFT, k: int):
        super().__init__()
        self.vit, self.head = model.vit, nn.Linear(model.vit.cfg.dim, k)

    def forward(self, x):
        return self.head(self.vit(x)[1].mean(1))


def linear_probe(args, world, model: CLEFT, train, test) -> dict:
    """Frozen ViT, features computed once (no augmentation), a linear head trained with AdamW on them (the
    official code trains the head with the ViT frozen but recomputes the features every epoch)."""
    model.eval()
    X, y = to_device(world, *R.predict(model.image_features, train, args, world.device))  # (N, Dv), (N,)
    X_test, y_test = R.predict(model.image_features, test, args, world.device)
    head = nn.Linear(X.shape[1], len(train.classnames)).to(world.device)
    opt = torch.optim.AdamW(param_groups(head, args.weight_decay), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(X), generator=g).split(args.batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(X[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return M.report_from_probs(y_test, head(X_test.to(world.device)).softmax(-1).cpu(), test.classnames)


def finetune(args, world, model: CLEFT, train, test, run_dir: Path) -> dict:
    """The whole ViT + a linear head, cross-entropy, AdamW + warm-up + cosine over --epochs."""
    clf = Classifier(model, len(train.classnames)).to(world.device)
    set_trainable(clf, ["vit.", "head."])
    opt = torch.optim.AdamW(param_groups(clf, args.weight_decay), lr=args.lr)

    def loss_fn(net, batch):
        x, y = to_device(world, *batch)
        return F.cross_entropy(net(x), y)

    total = args.steps or args.epochs * len(R.epoch_batches(len(train), args.batch_size, args.seed, 0, world))
    train_steps(args, world, run_dir / "finetune", clf, opt, train, loss_fn, min(args.warmup, total // 10),
                desc="fine-tune")
    clf.eval()
    logits, y = R.predict(clf, test, args, world.device)
    return M.report_from_probs(y, logits.softmax(-1), test.classnames)

# ----------------------------------------------------------------------------------------------------------
# Parameter count and benchmark at the paper's size (random weights, no download)

BERT_BASE = 109_482_240    # bert-base-uncased BertModel with pooler: the text encoder of most medical CLIPs
CLIP_B16 = 149_620_737     # OpenAI CLIP ViT-B/16 (both towers, projections, logit scale): "vanilla CLIP"
CLIP_B16_TEXT = 63_165_952  # its text transformer (token + position embeddings included)


def count_params(args):
    """--count-params: stage-1 trainables at the chosen presets, built on the meta device (no memory), and the
    paper's two comparisons. "39% fewer trainable parameters" is against vanilla OpenAI CLIP ViT-B/16 trained
    in full (149.6M); "4% of the trainable language model parameters" is the adapter against its text encoder.
    -> [(component, total, trainable)]"""
    spec = model_spec(args)
    model = build_model(spec, device="meta")
    stage1_trainable(model, args)
    rows = []
    for name, prefix, adapters in (("vision: DINOv2", "vit.", None), ("text: LLM (frozen)", "llm.", False),
                                   ("text: PEFT adapter", "llm.", True), ("image projection", "img_proj", None),
                                   ("text projection", "txt_proj", None), ("temperature", "logit_scale", None)):
        ps = [p for k, p in model.named_parameters() if k.startswith(prefix) and adapters in (None, is_adapter(k))]
        rows.append((name, sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    print(f"CLEFT stage 1, --vit {spec['vit']} --llm {spec['llm']} --peft {spec['peft']['method']}")
    print(f"{'component':<22}{'total':>16}{'trainable':>14}")
    print("\n".join(f"{name:<22}{total:>16,}{trainable:>14,}" for name, total, trainable in rows))
    trained = {r[0]: r[2] for r in rows}
    ours, adapter = trained["total"], trained["text: PEFT adapter"]
    same_vit_bert = trained["vision: DINOv2"] + trained["image projection"] + BERT_BASE + 768 * 512 + 512
    print(f"vs vanilla CLIP ViT-B/16 ({CLIP_B16:,} trainable): {100 * (1 - ours / CLIP_B16):.0f}% fewer trainable "
          f"(paper: 39%); adapter = {100 * adapter / CLIP_B16_TEXT:.1f}% of its text encoder (paper: 4%)")
    print(f"vs this ViT with a fully trained BERT-base text encoder ({same_vit_bert:,}): "
          f"{100 * (1 - ours / same_vit_bert):.0f}% fewer; adapter = {100 * adapter / BERT_BASE:.1f}% of BERT-base")
    return rows


def run_bench(args, world):
    """Train-step time at real size with random weights: GPT-2 124M + LoRA r8 on c_attn (B 8, T 64, dropout 0.1 on,
    LoRA dropout 0, AdamW, loss = mean square of the hidden states), DINOv2-B/14 trained in full (B 8, 224 px)."""
    dev, B = world.device, args.bench_batch
    torch.manual_seed(0)
    llm = add_peft(GPT2(LLM_PRESETS["gpt2"]["config"]).init_random(0), PEFTConfig("lora", dropout=0.0)).to(dev)
    set_trainable(llm, ["adapter"])
    vit = DINOv2(VIT_PRESETS["dinov2-reg-b14"]["config"]).init_random(0).to(dev)
    ids, x = torch.randint(0, 50257, (B, 64), device=dev), torch.randn(B, 3, 224, 224, device=dev)
    print(R.BENCH_COLUMNS)
    rows = []
    for name, net, fn, items, unit in (("GPT-2 124M + LoRA r8 (c_attn), T=64", llm, lambda: llm(ids), B * 64, "tok"),
                                       ("DINOv2-B/14 reg, full training, 224px", vit, lambda: vit(x)[0], B, "img")):
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        net.train()

        def step():
            with R.autocast(dev, args.precision):
                out = fn()
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        rows.append(R.bench_step(name, step, precision=args.precision, batch=B, device=dev, steps=args.bench_steps,
                                 items=items, unit=unit))
    return rows

# ----------------------------------------------------------------------------------------------------------
# main

# What each part trains with, where a flag is not typed: stages 1 and 2 the official README's, the linear probe and
# fine-tune OURS (module docstring); the demo shortens and speeds them up for tiny random models.
RECIPES = {
    "contrastive": dict(steps=40000, batch_size=72, lr=4e-5, weight_decay=0.1, warmup=4000, min_lr=1e-8),
    "prompt": dict(steps=8000, batch_size=72, lr=1e-4, weight_decay=1e-3, warmup=100, min_lr=1e-5),
    "linear-probe": dict(epochs=50, batch_size=256, lr=1e-3, weight_decay=0.0),
    "finetune": dict(steps=0, epochs=10, batch_size=72, lr=1e-5, weight_decay=0.05, warmup=100, min_lr=1e-8),
}
DEMO_RECIPES = {
    "contrastive": dict(steps=150, batch_size=32, lr=5e-3, weight_decay=0.1, warmup=15, min_lr=1e-5),
    "prompt": dict(steps=100, batch_size=32, lr=0.05, weight_decay=1e-3, warmup=10, min_lr=1e-4),
    "linear-probe": dict(epochs=30, batch_size=128, lr=1e-2, weight_decay=0.0),
    "finetune": dict(steps=0, epochs=3, batch_size=32, lr=1e-3, weight_decay=0.05, warmup=10, min_lr=1e-5),
}
# --data demo, where not typed: tiny models, both stages, one CPU thread (tiny matrices: the threads of a team
# would only wait for each other, 10-30x slower on a busy machine)
DEMO_DEFAULTS = dict(vit="tiny", llm="tiny", stage="all", threads=1)


def recipe(args, what: str):
    """A copy of args, untyped flags filled from the recipe of `what` (typed flags apply to every stage that runs)."""
    chosen = (DEMO_RECIPES if args.data == "demo" else RECIPES)[what]
    return argparse.Namespace(**vars(args) | {k: v for k, v in chosen.items() if k not in args.typed})


def model_spec(args) -> dict:
    """The architecture from the flags, in one place (saved as model.json; --init reads it back instead)."""
    if args.init:
        return json.loads((R.find_stage(args.init, ("stage2", "stage1")) / "model.json").read_text())  # stage 2 first
    peft = PEFTConfig(args.peft, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      n_prefix=args.n_prefix)
    return dict(vit=args.vit, vit_path=args.vit_path, llm=args.llm, llm_path=args.llm_path, peft=asdict(peft),
                emb_dim=args.emb_dim, seed=args.seed)


def load_stage(model: CLEFT, folder: Path, world, message=None):
    """Load a finished stage's tensors (everything but the frozen pretrained LLM) into a fresh model."""
    tensors = load_file(str(folder / "trainable.safetensors"))
    if "ctx" in tensors and model.ctx is None:
        model.add_context(torch.zeros(tensors["ctx"].shape[0], dtype=torch.long, device=model.llm.wte.weight.device))
    R.load_tensors(model, tensors, str(folder / "trainable.safetensors"))
    if world.is_main:
        print(message or f"loaded {folder}")


def evaluate(args, world, model: CLEFT, tok, run_dir: Path, what: str, size: int, tag: str = "") -> dict:
    """Zero-shot, linear probe or fine-tune on the test set of --data -> run_dir/metrics_<what><tag>.json."""
    a = recipe(args, what) if what != "zero-shot" else args
    train, val, test = class_sets(a, size, train_transform=what == "finetune")
    result = (zero_shot(a, world, model, tok, test) if what == "zero-shot" else
              linear_probe(a, world, model, train, test) if what == "linear-probe" else
              finetune(a, world, model, train, test, run_dir))
    if world.is_main:
        name = f"{what}{tag}" + (f"_{args.data_pct:g}" if args.data_pct < 1 else "")
        (run_dir / f"metrics_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n{what}{tag} on {args.data} test ({len(test)} images, {len(test.classnames)} classes"
              f"{f', {len(train)} training images' if what != 'zero-shot' else ''}):")
        print(M.format_table(result))
    return result


def preflight(args):
    """Before any work or run folder: every missing dataset file, weight folder and unwritable output at once."""
    problems = []
    if args.data != "demo" and not args.init and not args.resume:
        d = DATASETS[args.data]
        wanted = d["split"] if "pairs" not in d or args.stage == "prompt" or args.eval else d["pairs"][0]
        missing = missing_dataset(args.data, d, data_root(args), wanted)
        problems += [missing] if missing else []
        for name, presets in (("vit", VIT_PRESETS), ("llm", LLM_PRESETS)):
            repo = getattr(args, f"{name}_path") or presets[getattr(args, name)]["repo"]
            try:
                if repo:
                    resolve(repo)
            except WeightsError as e:
                problems.append(f"--{name} {getattr(args, name)} weights: {e}")
    problem = None if args.resume else R.check_writable(Path(args.out) if args.out else REPO / "runs" / "cleft")
    if problems or problem:
        raise DataError("\n\n".join(problems + ([f"--out {problem}"] if problem else [])))


def run(args, world) -> dict:
    """Preflight, the run folder, then --eval: that evaluation of the --init (or --resume) model; else the stages of
    --stage in order, each followed by a zero-shot evaluation (a stage a resumed run had finished is loaded, not
    trained again). A non-finite loss (exit 3) or Ctrl-C (exit 2) ends saying what is on disk and how to continue."""
    preflight(args)
    if args.data == "demo":  # the built-in demo data is made once, here (a few seconds)
        ensure_demo(data_root(args))
    run_dir = Path(args.resume) if args.resume else R.new_run_dir("cleft", args.data, args.out, vars(args), world)
    if args.eval_only or (args.resume and args.eval):  # evaluate what --resume RUN_DIR trained
        args.eval = args.eval or "zero-shot"
        if any((run_dir / s / "trainable.safetensors").is_file() for s in ("stage1", "stage2")):
            args.init = str(run_dir)  # (a resumed --eval run keeps the --init it evaluates)
    try:
        spec = model_spec(args)
        R.seed_everything(args.seed, world.rank)
        model = build_model(spec, llm_dtype=R.PRECISIONS[args.precision]).to(world.device)
        model.llm.grad_ckpt = args.grad_ckpt
        tok, size = load_tokenizer(spec), 224 if spec["vit"] != "tiny" else 64
        if args.init:
            load_stage(model, R.find_stage(args.init, ("stage2", "stage1")), world)
        if args.eval:
            return evaluate(args, world, model, tok, run_dir, args.eval, size)
        results = {}
        has_classes = (data_root(args) / DATASETS[args.data]["split"]).is_file()
        for stage in (["contrastive", "prompt"] if args.stage == "all" else [args.stage]):
            folder = run_dir / ("stage1" if stage == "contrastive" else "stage2")
            if (folder / "trainable.safetensors").is_file():  # finished before a --resume
                load_stage(model, folder, world, f"{stage}: already finished in {folder}, loaded")
            else:
                folder.mkdir(exist_ok=True)  # inside this run's own folder
                R.seed_everything(args.seed, world.rank)
                train_stage = stage_contrastive if stage == "contrastive" else stage_prompt
                train_stage(recipe(args, stage), world, folder, model, tok, size)
                spec = spec | ({"n_ctx": int(model.ctx.shape[0])} if model.ctx is not None else {})
                # what the stage changed (all but the frozen LLM) + model.json: what --init / --resume read
                R.save_stage(folder, {k: v.float() for k, v in model.state_dict().items()
                                      if not k.startswith("llm.") or is_adapter(k)}, spec, world)
            if has_classes and world.is_main:  # the other ranks wait at the barrier
                results[stage] = evaluate(args, world, model, tok, run_dir, "zero-shot", size, tag=f"_after_{stage}")
            elif world.is_main:
                print(f"(no class split {DATASETS[args.data]['split']} for --data {args.data}: zero-shot skipped)")
            R.barrier(world)
    except (R.NonFiniteLoss, KeyboardInterrupt) as e:
        ckpts = [run_dir / s / "ckpt" for s in ("stage1", "stage2", "finetune") if (run_dir / s / "ckpt").is_dir()]
        newest = max(ckpts, key=lambda p: p.stat().st_mtime, default=run_dir / "stage1" / "ckpt")
        raise R.Stopped(e, run_dir, "python cleft.py", newest) from None
    if world.is_main:
        print(f"run folder: {run_dir}")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CLEFT: contrastive image-text pre-training with a PEFT-tuned LLM, then "
                                "context-prompt learning. Schedule defaults are the official recipe of the stage "
                                "that runs (--data demo: a short demo recipe); typed flags apply to every stage.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    R.add_common_args(p, datasets=DATASETS, data="demo", epochs=50, steps=40000, batch_size=72, lr=4e-5,
                      eval_batch_size=64, ckpt_every=500, help={
        "steps": "per stage; 0 = --epochs over the data; paper: 40000 stage 1 / 8000 stage 2, demo: 150 / 100",
        "epochs": "linear probe / fine-tune, or a stage with --steps 0; ours: 50 / 10, demo: 30 / 3",
        "batch_size": "paper: 72 per GPU in both stages, probe 256 / fine-tune 72 (ours), demo: 32, probe 128",
        "lr": "paper: 4e-5 stage 1 (AdamW), 1e-4 stage 2 (SGD); ours: probe 1e-3, fine-tune 1e-5; demo: 5e-3 / "
              "0.05 / 1e-2 / 1e-3"})
    p.add_argument("--weight-decay", type=float, default=0.1, help="paper: 0.1 stage 1, 1e-3 stage 2; ours: probe 0, "
                   "fine-tune 0.05; decays every tensor but the 1-dim ones, as officially")
    p.add_argument("--warmup", type=int, default=4000, help="linear warm-up steps; paper: 4000 / 100, demo: 15 / 10")
    p.add_argument("--min-lr", type=float, default=1e-8, help="cosine's end; paper: 1e-8 / 1e-5, demo: 1e-5 / 1e-4")
    p.add_argument("--data-pct", type=float, default=1.0, help="fraction of the training set (linear probe, "
                   "fine-tune, stage 2 ce): 0.01 / 0.1 / 1 in the paper")
    p.add_argument("--laterals", action="store_true", help="CheXpert: the lateral views too (official: frontal only)")
    p.add_argument("--simple-transforms", action="store_true", help="resize + centre crop instead of the official "
                   "pad / Otsu crop / augmentation pipeline (the demo always uses these)")
    p.add_argument("--stage", choices=["all", "contrastive", "prompt"], default="contrastive",
                   help="what to train; demo: all")
    p.add_argument("--init", default=None, metavar="RUN_DIR", help="start from a finished run (its stage2/ or stage1/)")
    p.add_argument("--eval", choices=["zero-shot", "linear-probe", "finetune"], default=None,
                   help="evaluate the --init model on --data instead of training it")
    p.add_argument("--bench-batch", type=int, default=8, help="batch of --bench")
    p.add_argument("--count-params", action="store_true", help="print the parameter table (meta device) and exit")
    # models
    p.add_argument("--vit", choices=list(VIT_PRESETS), default="dinov2-reg-b14", help="vision preset; demo: tiny")
    p.add_argument("--vit-path", default=None, help="HF DINOv2 folder or repo id (overrides the preset's repo)")
    p.add_argument("--llm", choices=list(LLM_PRESETS), default="biomedlm", help="LLM preset; demo: tiny")
    p.add_argument("--llm-path", default=None, help="HF GPT-2 folder or repo id (overrides the preset's repo)")
    p.add_argument("--peft", choices=["lora", "ia3", "prefix", "none"], default="lora", help="PEFT method on the LLM")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout")
    p.add_argument("--n-prefix", type=int, default=20, help="prefix tuning: virtual tokens")
    p.add_argument("--emb-dim", type=int, default=512, help="joint embedding size")
    p.add_argument("--max-len", type=int, default=64, help="caption tokens (official: 64)")
    p.add_argument("--freeze-vit", action="store_true", help="stage 1: keep the ViT frozen (official: trained)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the LLM blocks")
    # stage 2
    p.add_argument("--n-ctx", type=int, default=30, help="stage 2: learned context tokens")
    p.add_argument("--ctx-init", default=None, help="stage 2: init text (default: the dataset's prompt prefix)")
    p.add_argument("--prompt-objective", choices=["ce", "infonce"], default="ce",
                   help="stage 2 loss: ce = zero-shot cross-entropy (paper), infonce on captions (official code)")
    p.add_argument("--train-vit", action="store_true", help="stage 2: also train the ViT (official code)")
    args = p.parse_args(argv)
    given = R.given_flags(p, argv)
    args.typed = sorted(given)  # saved in args.json: --resume applies the recipes exactly as the run did
    if args.resume:
        # flags a resumed run may change although they are not runtime flags: they say what to do with the run,
        # not what it computes
        R.restore_run_args_or_exit(p, args, given, free=("eval", "bench_batch", "count_params"))
        args.typed = sorted(set(args.typed) | given)
    if args.data == "demo":
        vars(args).update({k: v for k, v in DEMO_DEFAULTS.items() if k not in args.typed})
    R.finish_common_args(p, args)
    R.check_flags(p, args, [("n_ctx", args.n_ctx >= 1, "at least 1"), ("max_len", args.max_len >= 2, "at least 2"),
                            ("data_pct", 0 < args.data_pct <= 1, "in (0, 1]")]
                  + [(f, getattr(args, f) >= 0, "0 or more") for f in ("warmup", "weight_decay", "min_lr")]
                  + [(f"{t}_path", not getattr(args, f"{t}_path") or getattr(args, t) != "tiny", f"given with a "
                      f"pretrained --{t} ({pre} or another): the tiny preset is random weights")
                     for t, pre in (("vit", "dinov2-reg-b14"), ("llm", "biomedlm"))])
    if args.eval == "zero-shot" and not args.init and not args.eval_only:
        p.error("--eval zero-shot needs --init RUN_DIR (a trained CLEFT run)")
    return args


def main(argv=None):
    args = parse_args(argv)
    work = run_bench if args.bench else run
    # a user mistake or a run stopped early (R.Stopped) is a message and its exit code, not a traceback
    return R.run_main(lambda world: count_params(args) if args.count_params else work(args, world), args.device)


if __name__ == "__main__":
    sys.exit(main())
