"""CILMP: Conditional Intervention of Large Language Models for Prompt tuning, in one file.

Paper: Du, Yu, Wang. "Conditional Intervention of Large Language Models for Prompt Tuning" (IEEE TMI 2025,
arXiv 2511.12639). Official code: github.com/usr922/cilmp (a PromptSRC/Dassl fork). Re-implemented from the paper
plus the facts of the official code, hand-written in PyTorch: CLIP ViT-B/16, a Llama decoder, LoReFT.

The idea in four lines:
  1. Ask an LLM "In an image, describe the distinctive visual features of {class}." and keep, for every layer,
     the hidden state of the last token of its answer: P_c in R^{L x D_L} (L = 32 layers, D_L = 4096). Once.
  2. Edit P_c inside a rank-r subspace with interventions conditioned on the image (Eq. 11-13):
        v  = image feature,  u = W2 W1 v,  rd = u (.) h             relationship descriptor, Eq. (12)
        I(h) = h + (W_s [h ; rd] + b - R^T h) R                       conditional LoReFT, Eq. (13)
     on the first p and last s positions of P_c, and project all L positions to CLIP's width (Eq. 10).
  3. Insert them as tokens into CLIP's text prompt "[SOS] [ctx x4] [LLM x L] {class} . [EOT]", with deep
     prompts in both towers (text ctx and vision VPT replaced at blocks 1..11, LLM slots re-written at every
     block by that block's own interventions).
  4. Classify with CLIP's frozen logit scale x cosine, cross-entropy. Only prompts + interventions train (3.85M).

Run it:
    python cilmp.py                                         # demo: synthetic lesions, tiny CLIP + tiny Llama, CPU
    python cilmp.py --data isic --llm llama3-8b             # the paper's setting (data/README.md for the data)
    python cilmp.py --data isic --seeds 1,2,3               # mean +- std over seeds, as reported
    torchrun --nproc_per_node 4 cilmp.py --data isic        # DDP
    python cilmp.py --resume runs/cilmp/isic/<run>          # continue a killed run (its own flags)
    python cilmp.py --eval-only --resume runs/cilmp/isic/<run>
    python cilmp.py --bench                                 # real-size step time / MFU with random weights
Ablations and the paper's other experiments: --no-rd, --no-conditional (plain LoReFT, Eq. 11), --no-intervention
(projection only); --prompt-mode text (Sec. 4.5.2: the LLM's description as a plain text prompt); --llm none
(deep vision-language prompting without LLM tokens); --label-ratio 0.1 | 0.3 (Sec. 5.2); sizes: --prefix-len
--suffix-len --rank --n-ctx --n-vpt.

Where this file departs from the paper or the official code (each also noted where it happens):
  - loss: the paper's Eq. (14) is a supervised contrastive loss with a learned temperature; the official code
    (and this file) use cross-entropy over CLIP's frozen logit scale.
  - the LLM representations are computed here (the official repo ships neither them nor the code), with our
    choices (the paper gives none): the Instruct checkpoint, its chat template, greedy decoding, at most 128 new
    tokens, the end-of-turn token appended when the answer is cut.
  - frozen CLIP runs under bf16 autocast on CUDA with fp32 trainables; the official code is pure fp16 SGD without
    loss scaling (its fp32/amp paths crash). fp16 + GradScaler is offered with --precision fp16.
  - Gaussian prompt aggregation (GPA) averages the prompt tensors only; the official code also scales and sums
    the frozen fp16 CLIP weights every epoch (a no-op up to rounding). Both keep the last epoch's interventions.
  - text sequences are cut at the longest EOT + 1 instead of padded to 77 (exact: the text tower is causal).
As the official code (Dassl): the last partial training batch of an epoch is dropped; --n-ctx below 4 keeps
the rest of "a photo of a" as fixed words, above 4 starts the whole context at N(0, 0.02).
"""
import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import metrics as M
from common import run as R
from common.data import DataError, bpe_tokenizer, dataset_root, missing_dataset, train_test_sets
from common.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform
from common.weights import WeightsError, load_config, load_mapped, read_safetensors, resolve, tensor_index

REPO = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
class CLIPConfig:
    embed_dim: int = 512          # joint image-text space
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    eps: float = 1e-5


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8           # grouped-query attention: 4 query heads share one key/value head
    head_dim: int = 128           # usually dim / n_heads; config.json may set another value
    ffn_dim: int = 14336
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False


@dataclass
class CILMPConfig:
    n_ctx: int = 4                # text context tokens (paper: 4, initialised from "a photo of a")
    n_vpt: int = 4                # vision prompt tokens
    depth: int = 12               # prompt depth in both towers (input + blocks 1..11)
    prefix_len: int = 4           # p: LLM positions edited by the prefix intervention
    suffix_len: int = 4           # s: LLM positions edited by the suffix intervention
    rank: int = 8                 # r: LoReFT subspace and projection rank
    dropout: float = 0.1          # on the whole intervention output, as in the official code
    mode: str = "conditional"     # conditional | no-rd | plain (Eq. 11) | none (projection only)


CLIP_PRESETS = {
    "vit-b16": dict(repo="openai/clip-vit-base-patch16", config=CLIPConfig()),
    "tiny": dict(repo=None, config=CLIPConfig(embed_dim=48, image_size=64, patch_size=8, vision_width=48,
                                              vision_layers=4, vision_heads=4, vision_mlp=96, vocab_size=None,
                                              text_width=48, text_layers=4, text_heads=4, text_mlp=96)),
}
DEMO_CLIP = REPO / "common" / "demo_weights" / "cilmp_clip.safetensors"  # the tiny preset's pre-trained weights

LLM_PRESETS = {  # the four LLMs of the paper's LLM table, plus a random tiny one for the demo
    "llama3-8b": dict(repo="meta-llama/Meta-Llama-3-8B-Instruct", chat="llama3"),
    "llama2-7b": dict(repo="meta-llama/Llama-2-7b-chat-hf", chat="llama2"),
    "openbiollm-8b": dict(repo="aaditya/Llama3-OpenBioLLM-8B", chat="llama3"),
    "medllama3-8b": dict(repo="ProbeMedicalYonseiMAILab/medllama3-v20", chat="llama3"),
    "tiny": dict(repo=None, chat="llama3", config=LlamaConfig(dim=64, n_layers=10, n_heads=4, n_kv_heads=2,
                                                              head_dim=16, ffn_dim=176, vocab_size=None,
                                                              max_seq_len=512)),
}

# --data NAME reads data/NAME/split_NAME.json, written by `python -m common.prepare NAME` (common.data.SOURCES says
# where to download it). The file's class names (its third column) are the prompts' words and name the cached LLM
# representations: the converters spell them as the official code's dataset classes (usr922/cilmp
# cilmp/datasets/*.py; common.prepare.CLASSNAMES), and a file that differs is used with a note.
DATASETS = {name: dict(split=f"split_{name}.json") for name in ("demo", "isic", "dermamnist", "derm7pt", "adam",
                                                                 "aptos2019", "odir", "kvasir", "pneumonia",
                                                                 "cpn-x-ray", "chaoyang", "fetal-us")}
DATASETS["pneumonia2"] = dict(dir="pneumonia", split="split_pneumonia2.json")  # the official 2-class split

QUESTION = "In an image, describe the distinctive visual features of {}."
CTX_INIT = "a photo of a"          # the text context's initial words (paper Sec. 4.2)

# ----------------------------------------------------------------------------------------------------------
# Model blocks: CLIP (OpenAI layout: pre-LN, QuickGELU, fused qkv) and Llama


class QuickGELU(nn.Module):
    # CLIP was trained with x * sigmoid(1.702 x), not exact GELU; swapping them costs accuracy silently.
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)      # HF stores q, k, v separately; the key map concatenates
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), QuickGELU(), nn.Linear(mlp, width))

    def attn(self, x, causal: bool):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)                            # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x, causal: bool = False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class CLIP(nn.Module):
    """OpenAI CLIP ViT (both towers). encode_image / encode_text return projected, unnormalised features
    (= HF get_image_features / get_text_features). A method that adds prompt tokens runs the blocks itself:
    embed_image / embed_text give the input tokens, pool_image / pool_text the features (CILMP.encode_image)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        W, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, W, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(W))
        self.vision_pos = nn.Parameter(torch.zeros(grid * grid + 1, W))
        self.ln_pre = nn.LayerNorm(W, eps=cfg.eps)
        self.vision_blocks = nn.ModuleList(ResidualAttentionBlock(W, cfg.vision_heads, cfg.vision_mlp, cfg.eps)
                                           for _ in range(cfg.vision_layers))
        self.ln_post = nn.LayerNorm(W, eps=cfg.eps)
        self.visual_proj = nn.Parameter(torch.zeros(W, cfg.embed_dim))
        d = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, d)
        self.text_pos = nn.Parameter(torch.zeros(cfg.context_length, d))
        self.text_blocks = nn.ModuleList(ResidualAttentionBlock(d, cfg.text_heads, cfg.text_mlp, cfg.eps)
                                         for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(d, eps=cfg.eps)
        self.text_proj = nn.Parameter(torch.zeros(d, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))  # pretrained value ~ln(100); frozen here

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "CLIP":
        """HF CLIPModel folder or repo id in the HF cache (config.json + *.safetensors), built on the meta
        device, every key and shape checked."""
        folder = resolve(path)
        with torch.device("meta"):
            model = cls(clip_config_from_hf(load_config(folder)))
        return load_mapped(model, folder, CLIP_MAP, dtype)

    def init_random(self, seed: int = 0):
        """Random weights for the demo / bench, with OpenAI CLIP's init scales (width^-0.5 for embeddings and
        attention, depth-scaled output projections). NOTE a flat std 0.02 everywhere collapses a small ViT: every
        image then maps to nearly the same feature (cosine 0.999) and contrastive pre-training stalls at ln(B)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name == "logit_scale":
                continue
            width = p.shape[-1] if p.ndim > 1 else p.shape[0]
            if name.endswith("bias") or name == "class_embedding":  # a zero CLS starts as pure image content (NOTE)
                p.data.zero_()
            elif ("ln" in name or "norm" in name) and p.ndim == 1:
                p.data.fill_(1.0)
            elif "out_proj" in name or "mlp.2" in name:  # residual outputs: shrink with depth
                layers = self.cfg.vision_layers if name.startswith("vision") else self.cfg.text_layers
                p.data.normal_(0, width ** -0.5 * (2 * layers) ** -0.5, generator=g)
            elif name == "conv1.weight":
                p.data.normal_(0, (p[0].numel()) ** -0.5, generator=g)
            else:
                p.data.normal_(0, width ** -0.5 if name != "token_embedding.weight" else 0.02, generator=g)
        return self

    def embed_image(self, pixels):
        """pixels (B, 3, H, W) -> (B, 1 + N, W): [CLS] + patch tokens, position embedding added (before ln_pre)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, W, g, g) -> (B, N, W)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        return torch.cat([cls, x], 1) + self.vision_pos.to(x.dtype)       # (B, 1 + N, W)

    def pool_image(self, x):
        """(B, T, W) output of the last vision block -> (B, E): CLS pooling."""
        return self.ln_post(x[:, 0]) @ self.visual_proj.to(x.dtype)

    def encode_image(self, pixels):
        x = self.ln_pre(self.embed_image(pixels))
        for blk in self.vision_blocks:
            x = blk(x)
        return self.pool_image(x)

    def embed_text(self, x):
        """(N, T, d) token embeddings -> + position embedding (the input of text block 0)."""
        return x + self.text_pos[:x.shape[1]].to(x.dtype)

    def pool_text(self, x, eot):
        """(N, T, d) output of the last text block, eot (N,) -> (N, E), pooled at the EOT position."""
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_proj.to(x.dtype)

    def encode_text(self, token_ids):
        """token_ids (N, T) with SOS ... EOT, any padding after EOT -> (N, E), pooled at argmax(ids) = EOT,
        exactly as OpenAI CLIP (EOT has the largest id in CLIP's vocabulary)."""
        x = self.embed_text(self.token_embedding(token_ids))
        for blk in self.text_blocks:
            x = blk(x, causal=True)
        return self.pool_text(x, token_ids.argmax(-1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 then cast back before the weight, the order HF Llama uses (matters in bf16)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(cfg: LlamaConfig, device=None):
    """Inverse frequencies of the rotary embedding, with the Llama-3.1 style frequency-dependent scaling
    ("rope_type": "llama3") or plain "linear" scaling when config.json asks for it."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi, old = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"], \
            sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)      # long wavelengths: fully scaled
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)               # in between: interpolate
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise WeightsError(f"rope_scaling type {kind!r} is not supported by this file (default, linear, llama3)")
    return inv


def apply_rope(x, cos, sin):
    # HF "half-split" layout: rotate (x1, x2) = (first half, second half) of each head. HF safetensors are stored
    # for this layout, so q/k need no permutation (gpt-fast's interleaved layout would need one).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, self.nh * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, self.nkv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, self.nkv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.nh, self.hd).transpose(1, 2)         # (B, nh, T, hd)
        k = self.wk(h).view(B, T, self.nkv, self.hd).transpose(1, 2)        # (B, nkv, T, hd)
        v = self.wv(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this chunk into the preallocated cache, attend over everything so far
            cache[0][:, :, pos:pos + T], cache[1][:, :, pos:pos + T] = k, v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
        rep = self.nh // self.nkv  # grouped-query attention: each kv head serves `rep` query heads
        k, v = (t[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.nh, -1, self.hd) for t in (k, v))
        # with a cache and T > 1 (prefill at pos > 0) is_causal would align wrongly; we only prefill at pos 0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))     # SwiGLU


class Llama(nn.Module):
    """A Llama-2/3 decoder that returns every layer's hidden states, with a KV cache for greedy generation."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.setup_rope()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu") -> "Llama":
        """HF LlamaForCausalLM folder or repo id in the HF cache (sharded or not) -> our Llama in `dtype`, one
        copy in memory (meta + assign). A bare LlamaModel (keys without "model.", no lm_head) loads too: hidden
        states only, generate() refuses."""
        folder = resolve(path)
        cfg, keys = llama_config_from_hf(load_config(folder)), tensor_index(folder)
        bare = not any(k.startswith("model.") for k in keys)
        key_map = {k.removeprefix("model."): v for k, v in LLAMA_MAP.items()} if bare else dict(LLAMA_MAP)
        if cfg.tie_embeddings:  # some exports still write lm_head.weight (a copy of the embedding): drop it
            key_map["lm_head.weight"] = None
        with torch.device("meta"):
            model = cls(cfg)
        if "lm_head.weight" not in keys and not cfg.tie_embeddings:
            model.lm_head = None
        load_mapped(model, folder, key_map, dtype, drop_missing=("lm_head.weight",) if cfg.tie_embeddings else ())
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.setup_rope("cpu")
        return model.to(device).eval()

    def setup_rope(self, device=None):
        # NOTE footgun: built on the meta device this buffer holds no data; from_pretrained re-runs this after loading
        self.register_buffer("inv_freq", rope_frequencies(self.cfg, device), persistent=False)

    def rope(self, pos: int, T: int, dtype):
        t = torch.arange(pos, pos + T, device=self.inv_freq.device, dtype=torch.float32)
        f = torch.outer(t, self.inv_freq)                                   # (T, hd/2)
        emb = torch.cat([f, f], -1)                                         # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids, cache=None, pos=0, all_hidden=False):
        """ids (B, T) -> the last hidden states (B, T, D); all_hidden: (n_layers + 1, B, T, D), equal to HF
        LlamaModel(output_hidden_states=True).hidden_states."""
        x = self.embed(ids)                                                 # (B, T, D)
        cos, sin = self.rope(pos, ids.shape[1], x.dtype)
        hidden = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i], pos)
            hidden.append(x)
        hidden[-1] = x = self.norm(x)  # HF convention: the last entry of hidden_states is AFTER the final norm
        return torch.stack(hidden) if all_hidden else x

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int, stop_ids=()):
        """Greedy decoding of one prompt (1, T) with a KV cache. Returns the new token ids (list)."""
        if self.lm_head is None:
            raise WeightsError("this Llama checkpoint is a bare LlamaModel (no lm_head.weight): it gives hidden "
                               "states but cannot generate the class descriptions; use the LlamaForCausalLM "
                               "checkpoint (e.g. meta-llama/Meta-Llama-3-8B-Instruct)")
        p, shape = self.embed.weight, (1, self.cfg.n_kv_heads, ids.shape[1] + max_new_tokens, self.cfg.head_dim)
        cache = [torch.zeros(2, *shape, dtype=p.dtype, device=p.device) for _ in self.layers]   # (k, v) per layer
        out, pos, x = [], 0, ids
        for _ in range(max_new_tokens):
            nxt = int(self.lm_head(self(x, cache=cache, pos=pos)[:, -1]).argmax(-1))
            pos += x.shape[1]
            out.append(nxt)
            if nxt in stop_ids:
                break
            x = torch.tensor([[nxt]], device=ids.device)
        return out

# ----------------------------------------------------------------------------------------------------------
# The method: conditional LoReFT interventions on LLM representations, turned into deep CLIP prompts


class Intervention(nn.Module):
    """Conditional LoReFT on one segment of the LLM representation (paper Eq. 11-13).

        plain (Eq. 11):           I(h) = h + (W h + b - h R) R^T
        conditional (Eq. 12-13):  u = W2 (W1 v),  rd = u (.) h,   I(h) = h + (W_s [h ; rd] + b - h R) R^T
        no-rd (ablation):         the same with u in place of rd (image-conditioned, no matching prior)

    R (D, r) starts orthogonal but is a free parameter, as in the official code (pyreft instead keeps it
    orthogonal with a parametrisation). W1: 512 -> r and W2: r -> D have no activation in between. Dropout hits
    the whole output, residual h included (official behaviour; it makes the intervention noisy at train time).
    Official names: rotate_layer = R, learned_source = W_s, image_feature_learned_weight = (W1, W2).
    """

    def __init__(self, d_llm: int, d_img: int, rank: int, dropout: float, mode: str):
        super().__init__()
        self.mode = mode
        self.R = nn.Parameter(nn.init.orthogonal_(torch.empty(d_llm, rank)))
        self.W_s = nn.Linear(d_llm if mode == "plain" else 2 * d_llm, rank)
        if mode != "plain":
            self.W1, self.W2 = nn.Linear(d_img, rank), nn.Linear(rank, d_llm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, v):
        """h (C, n, D) raw LLM states of n positions, v (B, d_img) normalised image features -> (B, C, n, D)."""
        D = h.shape[-1]
        s = h @ self.W_s.weight[:, :D].T + self.W_s.bias                     # (C, n, r)
        if self.mode == "plain":  # plain LoReFT does not see the image: compute once per class, share across the batch
            return self.dropout(h + (s - h @ self.R) @ self.R.T).expand(v.shape[0], -1, -1, -1)
        u = self.W2(self.W1(v))                                               # (B, D)
        if self.mode == "conditional":  # W_rd (u (.) h) without materialising rd (B, C, n, D): fold u into the weight
            s = s + torch.einsum("cnd,brd->bcnr", h, u[:, None, :] * self.W_s.weight[None, :, D:])
        else:  # no-rd: u in place of rd
            s = s + (u @ self.W_s.weight[:, D:].T)[:, None, None, :]          # (B, 1, 1, r)
        return self.dropout(h + (s - h @ self.R) @ self.R.T)                  # (B, C, n, D)


class LowRankProj(nn.Module):
    """Eq. (10): D_L -> d as a rank-r factorisation, y = x A^T B^T. Both factors kaiming-uniform and no alpha/r
    scale: the official "LoRA projection" is a plain factorised linear map, not a LoRA delta."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.A, self.B = nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False)

    def forward(self, x):
        return self.B(self.A(x))


class LLMTokens(nn.Module):
    """One set of (prefix intervention, suffix intervention, projection): the L LLM prompt tokens of one layer."""

    def __init__(self, d_llm: int, d_txt: int, d_img: int, cfg: CILMPConfig):
        super().__init__()
        self.p, self.s = cfg.prefix_len, cfg.suffix_len
        if cfg.mode != "none":
            self.prefix, self.suffix = (Intervention(d_llm, d_img, cfg.rank, cfg.dropout, cfg.mode) for _ in range(2))
        self.proj = LowRankProj(d_llm, d_txt, cfg.rank)

    def forward(self, P, v):
        """P (C, L, D_L) raw representations, v (B, d_img) -> (B, C, L, d) prompt tokens."""
        B, L, p, s = v.shape[0], P.shape[1], self.p, self.s
        if not hasattr(self, "prefix"):  # --no-intervention: projection only, the same for every image
            return self.proj(P).expand(B, -1, -1, -1)
        mid = self.proj(P[:, p:L - s]).expand(B, -1, -1, -1)                 # untouched positions (B, C, m, d)
        return torch.cat([self.proj(self.prefix(P[:, :p], v)), mid, self.proj(self.suffix(P[:, L - s:], v))], 2)


class CILMP(nn.Module):
    """Frozen CLIP + the trainable prompt learner. forward(pixels) -> logits (B, C). Text prompt per class:
    [SOS] [ctx x n_ctx] [LLM x L] [leftover init words] {class} . [EOT]. reps None gives L = 0: the deep
    vision-language prompting baseline (--llm none) and the plain-text prompts (--prompt-mode text, whose
    description tokens sit in suffix_ids)."""

    def __init__(self, clip: CLIP, reps: torch.Tensor | None, suffix_ids: torch.Tensor, eot: torch.Tensor,
                 ctx_init_ids: torch.Tensor, cfg: CILMPConfig):
        super().__init__()
        self.clip, self.cfg = clip, cfg
        clip.requires_grad_(False)  # frozen: no weight grads, no optimizer state (activations still backprop)
        self.L = L = 0 if reps is None else reps.shape[1]
        assert reps is None or L >= cfg.prefix_len + cfg.suffix_len, \
            f"LLM representations have {L} positions < prefix + suffix"
        # deep prompts go into every block of both towers (paper: depth 12 = all of ViT-B/16's blocks)
        assert cfg.depth == clip.cfg.text_layers == clip.cfg.vision_layers, "prompt depth must equal both towers' depth"
        d, W, E = clip.cfg.text_width, clip.cfg.vision_width, clip.cfg.embed_dim
        # fixed inputs as buffers (so .to(device) moves them and checkpoints don't need them)
        self.register_buffer("reps", None if reps is None else reps.float(), persistent=False)  # (C, L, D_L)
        emb = clip.token_embedding.weight  # frozen above; indexing copies the rows
        self.register_buffer("sos", emb[ctx_init_ids[:1]].float(), persistent=False)              # (1, d)
        self.register_buffer("suffix", emb[suffix_ids].float(), persistent=False)                 # (C, S, d)
        words = emb[ctx_init_ids[1:]].float()                                                     # (4, d)
        self.register_buffer("eot", eot, persistent=False)                                        # (C,)
        # layer-0 text context (n_ctx, d), official rule: n_ctx <= 4 takes the first n_ctx words of "a photo of a"
        # (the rest stay as fixed words in suffix_ids), more than 4 are all N(0, 0.02); deeper layers N(0, 0.02)
        self.ctx = nn.Parameter(words[:cfg.n_ctx] if cfg.n_ctx <= len(words) else torch.randn(cfg.n_ctx, d) * 0.02)
        self.deep_ctx = nn.Parameter(torch.randn(cfg.depth - 1, cfg.n_ctx, d) * 0.02)
        self.vpt = nn.Parameter(torch.randn(cfg.n_vpt, W) * 0.02)
        self.deep_vpt = nn.Parameter(torch.randn(cfg.depth - 1, cfg.n_vpt, W) * 0.02)
        self.llm_tokens = nn.ModuleList(LLMTokens(reps.shape[2], d, E, cfg) for _ in range(cfg.depth)
                                        if reps is not None)

    def trainable_state(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def encode_image(self, pixels):
        """pixels (B, 3, H, W) -> (B, E). The vision prompts (n_vpt, W) go after the patches, after the position
        embedding (prompt tokens carry no position); before block i >= 1 they are replaced by deep_vpt[i - 1]:
        the MaPLe / PromptSRC "IVLP" deep prompting CILMP inherits."""
        clip, n = self.clip, self.cfg.n_vpt
        x = clip.embed_image(pixels)                                                        # (B, 1 + N, W)
        x = clip.ln_pre(torch.cat([x, self.vpt.to(x.dtype).expand(x.shape[0], -1, -1)], 1))  # (B, 1 + N + n, W)
        for i, blk in enumerate(clip.vision_blocks):
            if i > 0 and n:  # (n = 0: nothing to replace; x[:, :-0] would be empty)
                x = torch.cat([x[:, :-n], self.deep_vpt[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)], 1)
            x = blk(x)
        return clip.pool_image(x)

    def text_inputs(self, v, T: int):
        """Layer-0 text tokens for every (image, class) pair: v (B, E) -> (B*C, T, d)."""
        B, C, n = v.shape[0], self.suffix.shape[0], self.cfg.n_ctx
        parts = [self.sos.expand(B, C, 1, -1), self.ctx.expand(B, C, n, -1)]
        if self.L:
            parts.append(self.llm_tokens[0](self.reps, v))                                  # (B, C, L, d)
        parts.append(self.suffix[None, :, :T - 1 - n - self.L].expand(B, -1, -1, -1))
        return torch.cat(parts, 2).flatten(0, 1)                                            # (B*C, T, d)

    def encode_text(self, x, v):
        """x (B*C, T, d) from text_inputs -> (B*C, E). Before block i >= 1: new ctx in slots 1..n and this
        block's own LLM tokens (its own interventions on the same raw representations) in the next L slots.
        Deep tokens get no position embedding: only the input layer adds it."""
        clip, n, L = self.clip, self.cfg.n_ctx, self.L
        x = clip.embed_text(x)
        for i, blk in enumerate(clip.text_blocks):
            if i > 0:
                new = [self.deep_ctx[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)]
                if L:
                    new.append(self.llm_tokens[i](self.reps, v).flatten(0, 1).to(x.dtype))  # (B*C, L, d)
                x = torch.cat([x[:, :1], *new, x[:, 1 + n + L:]], 1)
            x = blk(x, causal=True)
        return clip.pool_text(x, self.eot.repeat(v.shape[0]))

    def forward(self, pixels):
        v = F.normalize(self.encode_image(pixels).float(), dim=-1)                          # (B, E)
        # every image gets its own C prompts: B*C sequences, cut after the longest EOT. Exact, as the text tower is
        # causal: no token before an EOT sees what follows it (45 of 77 positions remain at the paper's size)
        x = self.text_inputs(v, int(self.eot.max()) + 1)
        t = F.normalize(self.encode_text(x, v).float(), dim=-1).view(v.shape[0], -1, v.shape[1])  # (B, C, E)
        return self.clip.logit_scale.exp() * torch.einsum("be,bce->bc", v, t)               # (B, C)


def gpa_weights(epochs: int, sigma_frac: float = 0.3):
    """Gaussian prompt aggregation weights (PromptSRC): w_e ~ N(e; mu=E, sigma=0.3 E), e = 1..E, sum 1.
    The official config is mu=100, sigma=30 for 100 epochs; we scale sigma with E so short runs behave alike."""
    e = np.arange(1, epochs + 1)
    w = np.exp(-0.5 * ((e - epochs) / (sigma_frac * epochs)) ** 2)
    return (w / w.sum()).tolist()


GPA_KEYS = ("ctx", "deep_ctx", "vpt", "deep_vpt")  # prompt tensors only; interventions keep their last value

# ----------------------------------------------------------------------------------------------------------
# Weight loading: HF safetensors -> our modules through explicit key maps

# HF openai/clip-vit-base-patch16 -> ours (common.weights.load_mapped). "{}" stands for one dotted component (a
# layer index, or weight/bias). ("name", "T"): transpose (HF keeps projections as nn.Linear weights, OpenAI CLIP
# as x @ P). ("name", "q"|"k"|"v"): one third of our fused qkv. None: a key we drop on purpose.
CLIP_MAP = {
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.position_embedding.weight": "vision_pos",
    "vision_model.pre_layrnorm.{}": "ln_pre.{}",          # sic: HF's spelling
    "vision_model.encoder.layers.{}.self_attn.q_proj.{}": ("vision_blocks.{}.qkv.{}", "q"),
    "vision_model.encoder.layers.{}.self_attn.k_proj.{}": ("vision_blocks.{}.qkv.{}", "k"),
    "vision_model.encoder.layers.{}.self_attn.v_proj.{}": ("vision_blocks.{}.qkv.{}", "v"),
    "vision_model.encoder.layers.{}.self_attn.out_proj.{}": "vision_blocks.{}.out_proj.{}",
    "vision_model.encoder.layers.{}.layer_norm1.{}": "vision_blocks.{}.ln_1.{}",
    "vision_model.encoder.layers.{}.layer_norm2.{}": "vision_blocks.{}.ln_2.{}",
    "vision_model.encoder.layers.{}.mlp.fc1.{}": "vision_blocks.{}.mlp.0.{}",
    "vision_model.encoder.layers.{}.mlp.fc2.{}": "vision_blocks.{}.mlp.2.{}",
    "vision_model.post_layernorm.{}": "ln_post.{}",
    "visual_projection.weight": ("visual_proj", "T"),
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text_pos",
    "text_model.encoder.layers.{}.self_attn.q_proj.{}": ("text_blocks.{}.qkv.{}", "q"),
    "text_model.encoder.layers.{}.self_attn.k_proj.{}": ("text_blocks.{}.qkv.{}", "k"),
    "text_model.encoder.layers.{}.self_attn.v_proj.{}": ("text_blocks.{}.qkv.{}", "v"),
    "text_model.encoder.layers.{}.self_attn.out_proj.{}": "text_blocks.{}.out_proj.{}",
    "text_model.encoder.layers.{}.layer_norm1.{}": "text_blocks.{}.ln_1.{}",
    "text_model.encoder.layers.{}.layer_norm2.{}": "text_blocks.{}.ln_2.{}",
    "text_model.encoder.layers.{}.mlp.fc1.{}": "text_blocks.{}.mlp.0.{}",
    "text_model.encoder.layers.{}.mlp.fc2.{}": "text_blocks.{}.mlp.2.{}",
    "text_model.final_layer_norm.{}": "ln_final.{}",
    "text_projection.weight": ("text_proj", "T"),
    "logit_scale": "logit_scale",
    "vision_model.embeddings.position_ids": None,         # a buffer some exports include
    "text_model.embeddings.position_ids": None,
}

# HF LlamaForCausalLM -> ours. A bare LlamaModel has the same keys without "model." (Llama.from_pretrained).
LLAMA_MAP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.w_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.w_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.w_down.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,   # old exports saved the buffer; we recompute it
}


# transformers' defaults: config.json files written by transformers 4.x leave out every field equal to them
HF_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_LLAMA = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048, hidden_act="silu",
                tie_word_embeddings=False)
ROPE_KEYS = {"default": set(), "linear": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def refuse(what: str, problems: list):
    if problems:
        raise WeightsError(f"{what} sets what this file does not implement (loading it would compute something "
                           "else): " + "; ".join(problems))


def clip_config_from_hf(hf: dict) -> CLIPConfig:
    """HF CLIPModel config.json -> CLIPConfig. Reads the towers from text_config / vision_config (transformers 4.x
    and 5.x) or the older text_config_dict / vision_config_dict (which win, as in transformers)."""
    kind = hf.get("model_type", "clip")
    missing = [f"{tower}_config" for tower in ("vision", "text")
               if hf.get(f"{tower}_config") is None and hf.get(f"{tower}_config_dict") is None]
    if kind != "clip" or missing:
        raise WeightsError(f"config.json (model_type {kind!r}) has no {' / '.join(missing) or 'CLIP towers'}: CILMP "
                           "needs a full CLIPModel with both towers (e.g. openai/clip-vit-base-patch16), not a "
                           "CLIPVisionModel / CLIPTextModel or another model family")
    t = HF_CLIP_TEXT | (hf.get("text_config") or {}) | (hf.get("text_config_dict") or {})
    v = HF_CLIP_VISION | (hf.get("vision_config") or {}) | (hf.get("vision_config_dict") or {})
    problems = [f"{tower}.hidden_act {c['hidden_act']!r} (only OpenAI's quick_gelu)"
                for tower, c in (("text", t), ("vision", v)) if c["hidden_act"] != "quick_gelu"]
    if v["num_channels"] != 3:
        problems.append(f"vision num_channels {v['num_channels']} (RGB only)")
    if t["layer_norm_eps"] != v["layer_norm_eps"]:
        problems.append(f"different LayerNorm eps per tower ({t['layer_norm_eps']} / {v['layer_norm_eps']})")
    eos = t.get("eos_token_id", 2)
    if eos not in (2, t["vocab_size"] - 1):  # 2 = legacy: HF pools at argmax(ids) like OpenAI, as we do
        problems.append(f"text eos_token_id {eos} is not the last id: we pool at argmax(ids), HF at that token")
    refuse("this CLIP config.json", problems)
    return CLIPConfig(embed_dim=hf.get("projection_dim", 512), image_size=v["image_size"], patch_size=v["patch_size"],
                      vision_width=v["hidden_size"], vision_layers=v["num_hidden_layers"],
                      vision_heads=v["num_attention_heads"], vision_mlp=v["intermediate_size"],
                      context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                      text_width=t["hidden_size"], text_layers=t["num_hidden_layers"],
                      text_heads=t["num_attention_heads"], text_mlp=t["intermediate_size"], eps=v["layer_norm_eps"])


def rope_from_hf(hf: dict, problems: list) -> tuple[float, dict | None]:
    """-> (theta, scaling). transformers 5 writes rope_parameters = {rope_type, rope_theta, factor, ...}; 4.x
    writes top-level rope_theta and rope_scaling = {type | rope_type, factor, ...} (or null)."""
    if hf.get("rope_parameters") is not None:
        rope = dict(hf["rope_parameters"])
        if any(isinstance(x, dict) for x in rope.values()):  # one set per layer type (sliding / full attention)
            problems.append(f"per-layer-type rope_parameters {sorted(rope)}")
            return 10000.0, None
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        theta, rope = hf.get("rope_theta", 10000.0), dict(hf.get("rope_scaling") or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1 (rotary on part of each head)")
    if kind not in ROPE_KEYS:
        problems.append(f"rope type {kind!r} (implemented: {', '.join(ROPE_KEYS)})")
    elif set(rope) != ROPE_KEYS[kind]:
        problems.append(f"rope type {kind!r} with fields {sorted(rope)} (expected {sorted(ROPE_KEYS[kind])})")
    return float(theta), (rope | {"rope_type": kind}) if kind != "default" else None


def llama_config_from_hf(hf: dict) -> LlamaConfig:
    """HF Llama config.json (transformers 4.x or 5.x) -> LlamaConfig, refusing what LlamaBlock does not compute."""
    hf, problems = HF_LLAMA | hf, []
    if hf.get("model_type", "llama") != "llama":
        problems.append(f"model_type {hf['model_type']!r} (this file implements Llama)")
    if hf["hidden_act"] != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU with silu only)")
    problems += [f"{k}: true (no biases in Llama's projections here)" for k in ("attention_bias", "mlp_bias")
                 if hf.get(k)]
    if hf.get("sliding_window") is not None or hf.get("use_sliding_window"):
        problems.append(f"sliding_window {hf.get('sliding_window')} (full causal attention only)")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        problems.append(f"layer_types {sorted(set(hf['layer_types']))} (full attention only)")
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    if heads % kv:
        problems.append(f"{heads} attention heads do not split into {kv} key/value groups")
    theta, scaling = rope_from_hf(hf, problems)
    refuse("this Llama config.json", problems)
    # pretraining_tp > 1 only slices the same matmuls in transformers 4.x (no change to the result): ignored
    return LlamaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=kv,
                       head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_dim=hf["intermediate_size"],
                       vocab_size=hf["vocab_size"], norm_eps=hf["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
                       max_seq_len=hf["max_position_embeddings"], tie_embeddings=hf["tie_word_embeddings"])


# ----------------------------------------------------------------------------------------------------------
# LLM representations (paper Sec. 3.2.1): ask, answer greedily, keep every layer's last token; details ours (departures)


def chat_ids(tok, question: str, chat: str) -> list[int]:
    """The instruct models' own chat formats, written out (no jinja): the user turn, then the assistant header."""
    if chat == "llama3":
        text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n")
        return tok.encode(text, add_special_tokens=False).ids
    if chat == "llama2":  # "<s>[INST] q [/INST]"; the sentencepiece tokenizer adds <s> itself
        return tok.encode(f"[INST] {question.strip()} [/INST]", add_special_tokens=True).ids
    raise ValueError(f"unknown chat format {chat!r}")


def stop_ids(tok, chat: str) -> list[int]:
    names = ["<|eot_id|>", "<|end_of_text|>"] if chat == "llama3" else ["</s>"]
    return [i for i in (tok.token_to_id(n) for n in names) if i is not None]


@torch.no_grad()
def llm_representations(llm: Llama, tok, classnames, chat: str, max_new_tokens: int = 128, verbose=True):
    """-> (C, n_layers, D) float32 tensor and the C generated descriptions. For each class: chat-format the
    question, generate greedily, append the end-of-turn token if the answer was cut at max_new_tokens, re-run the
    whole sequence and keep the last token's hidden state after every layer (hidden_states[1:], the last one after
    the final norm as HF returns it). One class at a time: C is small and this runs once per (LLM, dataset,
    prompt), never during training."""
    dev, stops, reps, texts = llm.embed.weight.device, stop_ids(tok, chat), [], []
    progress = R.Progress(len(classnames), "  LLM answers", verbose, every=0.0)  # a line per class, with an ETA
    for name in classnames:
        ids = torch.tensor([chat_ids(tok, QUESTION.format(name), chat)], device=dev)
        new = llm.generate(ids, max_new_tokens, stops)
        if stops and (not new or new[-1] not in stops):
            new.append(stops[0])
        full = torch.cat([ids, torch.tensor([new], device=dev)], 1)
        reps.append(llm(full, all_hidden=True)[1:, 0, -1].float().cpu())       # (n_layers, D)
        texts.append(tok.decode(new, skip_special_tokens=True).strip())
        progress.update(1, answered=name, tokens=len(new))
    return torch.stack(reps), texts


def tiny_llm() -> tuple[Llama, object]:
    """The demo's "LLM": a fixed random tiny Llama (seed 0, weight matrices N(0, 0.5))."""
    tok = bpe_tokenizer(REPO / "common" / "tokenizers" / "llama_tiny.json")
    with torch.random.fork_rng():  # a cold cache must not shift the run's RNG
        torch.manual_seed(0)
        llm = Llama(replace(LLM_PRESETS["tiny"]["config"], vocab_size=tok.get_vocab_size())).eval()
        for p in llm.parameters():  # default init is too tame for a random LLM to say different things
            if p.ndim > 1:
                nn.init.normal_(p, 0, 0.5)
    return llm, tok


def get_representations(args, classnames, world: R.World):
    """-> (reps (C, L, D_L), descriptions), or (None, None) for --llm none. Cached per (LLM, dataset classes,
    question, answer length) in cache/llm_reps/<llm>/<data>-<key>.safetensors + .json (the descriptions).
    Rank 0 computes, the others wait and read."""
    if args.llm == "none":
        return None, None
    key = hashlib.sha1(json.dumps([args.llm, args.llm_path, classnames, QUESTION, args.max_new_tokens]).encode()
                       ).hexdigest()[:12]
    path = Path(args.cache_dir) / "llm_reps" / args.llm / f"{args.data}-{key}.safetensors"
    json_path = path.with_suffix(".json")

    def compute():  # rank 0, once; R.cached_tensors writes the .safetensors last: it marks the entry complete
        print(f"LLM representations: {args.llm} on {len(classnames)} classes (once; cached at {path})")
        if args.llm == "tiny":
            llm, tok = tiny_llm()
        else:
            folder = resolve(args.llm_path or LLM_PRESETS[args.llm]["repo"])
            tok = bpe_tokenizer(folder / "tokenizer.json")
            dtype = torch.bfloat16 if world.device.type != "cpu" or args.llm_dtype == "bf16" else torch.float32
            llm = Llama.from_pretrained(folder, dtype=dtype, device=world.device)
        reps, texts = llm_representations(llm, tok, classnames, LLM_PRESETS[args.llm]["chat"], args.max_new_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"llm": args.llm, "question": QUESTION, "classes": classnames,
                                         "descriptions": texts}, indent=2) + "\n")
        for name, text in list(zip(classnames, texts))[:3]:
            print(f"  {name!r}: {text[:200]!r}{'...' if len(text) > 200 else ''}")
        print(f"  (all descriptions: {json_path})")
        return {"reps": reps}

    return R.cached_tensors(path, world, compute)["reps"], json.loads(json_path.read_text())["descriptions"]


def prompt_tokens(tok, classnames, n_ctx: int, L: int, context_length: int, descriptions=None):
    """Token ids of the fixed parts of "[SOS] [ctx x n_ctx] [LLM x L] [leftover] {class}. [description] [EOT]":
    ctx_init_ids = [SOS] + the ids of CTX_INIT; suffix_ids (C, S) = the init words the context does not cover
    (n_ctx < 4: the official code keeps "a photo of a" whole in the text and overwrites only its first n_ctx
    words), "{class}.", with descriptions (--prompt-mode text) the LLM's description cut to fit CLIP's context,
    [EOT], padded with EOT; eot (C,) = the EOT position in the full sequence."""
    init = tok.encode(CTX_INIT).ids                             # [SOS] a photo of a [EOT]
    words, eot_id = init[1:-1], init[-1]
    leftover, suffix = words[n_ctx:], []
    for i, name in enumerate(classnames):
        body = leftover + tok.encode(name.replace("_", " ") + ".").ids[1:-1]
        if descriptions is not None:  # ours: the paper (Sec. 4.5.2) does not give the template
            room = context_length - 2 - n_ctx - L - len(body)
            body += tok.encode(descriptions[i]).ids[1:-1][:max(room, 0)]
        suffix.append(body + [eot_id])
    S = max(len(s) for s in suffix)
    eot = torch.tensor([n_ctx + L + len(s) for s in suffix])
    if int(eot.max()) + 1 > context_length:
        raise DataError(f"prompt for class {classnames[int(eot.argmax())]!r} needs {int(eot.max()) + 1} tokens > "
                        f"CLIP's {context_length}: shorten the class name or use fewer LLM positions")
    suffix_ids = torch.tensor([s + [eot_id] * (S - len(s)) for s in suffix])
    return torch.tensor(init[:-1]), suffix_ids, eot


# ----------------------------------------------------------------------------------------------------------
# Data, the frozen CLIP and the model


def preflight(args):
    """Check data, weights and the places we write before any work, and report every problem in one message."""
    entry = DATASETS[args.data]
    missing = args.data != "demo" and missing_dataset(args.data, entry, dataset_root(args.data, entry, args.data_dir))
    problems = [missing] if missing else []
    if args.clip != "tiny":
        try:
            clip_config_from_hf(load_config(resolve(args.clip_path or CLIP_PRESETS[args.clip]["repo"])))
        except WeightsError as e:
            problems.append(f"CLIP weights ({args.clip}): {e}")
    cached = list((Path(args.cache_dir) / "llm_reps" / args.llm).glob(f"{args.data}-*.safetensors"))
    if args.llm not in ("tiny", "none") and not cached:
        try:
            llama_config_from_hf(load_config(resolve(args.llm_path or LLM_PRESETS[args.llm]["repo"])))
        except WeightsError as e:
            problems.append(f"LLM weights ({args.llm}, needed once to compute the class representations): {e}")
    problems += [f"--cache-dir {p}" for p in [R.check_writable(args.cache_dir)] if p]
    if args.clip == "tiny" and not DEMO_CLIP.is_file():  # e.g. cilmp.py copied without common/demo_weights
        problems.append(f"{DEMO_CLIP}: the demo's pre-trained tiny CLIP is missing; copy common/demo_weights/ with "
                        "this file, or remake it: python -m common.demo_weights.make_cilmp_clip")
    if problems:
        raise DataError("\n\n".join(problems))


def build_data(args, image_size: int):
    """(train, test) of --data with CLIP's transforms; --label-ratio keeps a stratified part of the training set
    (paper Sec. 5.2: 10% / 30% of the labels, drawn with --seed)."""
    root = dataset_root(args.data, DATASETS[args.data], args.data_dir)
    if args.data == "demo":
        from common.demo import ensure_demo
        ensure_demo(root)
    return train_test_sets(args.data, DATASETS[args.data], root, train_transform(image_size, CLIP_MEAN, CLIP_STD),
                           eval_transform(image_size, CLIP_MEAN, CLIP_STD), label_ratio=args.label_ratio,
                           seed=args.seed)


def build_clip(args):
    """-> (frozen CLIP, CLIP tokenizer). Real runs load HF weights. The demo's tiny CLIP must play a *pretrained*
    CLIP (prompt tuning a frozen random network learns nothing: a random ViT maps every image to nearly the same
    feature), so it loads DEMO_CLIP, pre-trained offline on the demo's image-report pairs (make_cilmp_clip.py)."""
    if args.clip != "tiny":  # the file, not the folder: bpe_tokenizer(folder) would fall back to GPT-2's rules
        folder = resolve(args.clip_path or CLIP_PRESETS[args.clip]["repo"])
        return CLIP.from_pretrained(folder), bpe_tokenizer(folder / "tokenizer.json")
    tok = bpe_tokenizer(REPO / "common" / "tokenizers" / "clip_tiny.json")
    clip = CLIP(replace(CLIP_PRESETS["tiny"]["config"], vocab_size=tok.get_vocab_size()))
    R.load_tensors(clip, read_safetensors(DEMO_CLIP, dtype=torch.float32), str(DEMO_CLIP), required=clip.state_dict())
    return clip, tok


def build_model(args, clip, tok, classnames, reps, descriptions) -> CILMP:
    """The one place the method's flags become its config. --prompt-mode text puts the descriptions into the
    text prompt instead of the LLM representations."""
    text_mode = args.prompt_mode == "text"
    reps = None if text_mode else reps
    mode = ("none" if args.no_intervention else "plain" if args.no_conditional else
            "no-rd" if args.no_rd else "conditional")
    cfg = CILMPConfig(n_ctx=args.n_ctx, n_vpt=args.n_vpt, depth=clip.cfg.text_layers, prefix_len=args.prefix_len,
                      suffix_len=args.suffix_len, rank=args.rank, dropout=args.dropout, mode=mode)
    ctx_ids, suffix_ids, eot = prompt_tokens(tok, classnames, cfg.n_ctx, 0 if reps is None else reps.shape[1],
                                             clip.cfg.context_length, descriptions if text_mode else None)
    torch.manual_seed(args.seed)  # trainable init depends on the seed only (not on what ran before)
    return CILMP(clip, reps, suffix_ids, eot, ctx_ids, cfg)


# ----------------------------------------------------------------------------------------------------------
# Training


def lr_at(epoch: int, args) -> float:
    """Dassl's schedule as the official config sets it: `warmup_epochs` at a constant warmup_lr, then cosine
    decay stepped once per epoch, lr * (1 + cos(pi (e - w) / E)) / 2 for epoch e >= w. The period is all E epochs
    (Dassl's T_max = MAX_EPOCH), not E - w, so the last epoch still has a small non-zero lr, as officially."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


def train(args, world: R.World, run_dir: Path, model: CILMP, train_ds):
    """SGD on the prompts and interventions, epoch by epoch; checkpoint after every epoch; GPA at the end."""
    params = [p for p in model.parameters() if p.requires_grad]
    # SGD on every trainable tensor with the same weight decay (Dassl's defaults: momentum 0.9, wd 5e-4)
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scaler, net = R.make_scaler(args.precision, world.device), R.wrap_model(model, world, compile=args.compile)
    n_batches = len(R.epoch_batches(len(train_ds), args.batch_size, args.seed, 0, world))  # last partial dropped
    gpa_w, gpa = gpa_weights(args.epochs), {k: torch.zeros_like(getattr(model, k)) for k in GPA_KEYS}
    ckpts = R.Checkpoints(run_dir / "ckpt", world)
    ck = ckpts.load(optimizer=opt, scaler=scaler, resuming=bool(args.resume))
    if ck is not None:
        R.load_tensors(model, {k: v for k, v in ck.tensors.items() if not k.startswith("gpa.")}, str(ck.path),
                       required=model.trainable_state())
        gpa = {k: ck.tensors["gpa." + k].to(world.device) for k in GPA_KEYS}
    step = 0 if ck is None else ck.step
    total = args.epochs * n_batches if not args.steps else min(args.steps, args.epochs * n_batches)
    log = R.JsonlLog(run_dir / "metrics.jsonl", world.is_main)
    progress = R.Progress(total, "train", world.is_main, every=args.print_every, start=step)
    while step < total:
        epoch, skip = divmod(step, n_batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, args)
        batches = R.epoch_batches(len(train_ds), args.batch_size, args.seed, epoch, world)[skip:]
        net.train()
        for x, y in R.epoch_loader(train_ds, batches, world, args.num_workers, args.seed, epoch):
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            with R.autocast(world.device, args.precision):
                logits = net(x)                                                          # (B, C)
            # the official cross-entropy, not the paper's supervised contrastive Eq. (14): see the departures
            loss = F.cross_entropy(logits.float(), y)
            loss_value = R.optimizer_step(loss, opt, scaler, world, step)
            step += 1
            if step % args.log_every == 0 or step == total:
                log.log(step=step, epoch=epoch, loss=loss_value, lr=opt.param_groups[0]["lr"])
            progress.update(1, epoch=epoch, loss=loss_value, lr=opt.param_groups[0]["lr"])
            if step >= total:
                break
        if step % n_batches == 0:  # a whole epoch: Gaussian prompt aggregation, then a checkpoint
            for k in GPA_KEYS:
                gpa[k] += gpa_w[epoch] * getattr(model, k).detach()
            ckpts.save(step, model.trainable_state() | {"gpa." + k: v for k, v in gpa.items()},
                       optimizer=opt, scaler=scaler, extra={"epoch": epoch + 1})
    if step == args.epochs * n_batches:  # GPA only for a complete schedule (its weights sum to 1)
        for k in GPA_KEYS:
            getattr(model, k).data.copy_(gpa[k])
    if world.is_main:
        R.save_tensors(run_dir / "trainable.safetensors", model.trainable_state())
    return model


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: CILMP, ds, args, device) -> dict:
    """Test-set logits -> ACC, macro-F1, AUROC (one-vs-rest macro on softmax), Cohen's kappa (unweighted and
    quadratic), per-class table and confusion matrix, all from common/metrics."""
    model.eval()
    logits, y = R.predict(model, ds, args, device)                                      # (N, C), (N,)
    p = logits.softmax(-1).numpy()
    return M.classification_report(y.numpy(), p.argmax(1), p, ds.classnames)


# ----------------------------------------------------------------------------------------------------------
# Benchmark: real-size models with random weights


BENCH_SIZE = dict(clip=CLIPConfig(), llm_layers=32, llm_dim=4096, classes=7)  # the paper's (tests shrink it)


def run_bench(args, world: R.World, precisions):
    """One CILMP train step at the paper's size (ViT-B/16 CLIP, 32 x 4096 LLM representations, C = 7)."""
    size, dev, B = BENCH_SIZE, world.device, args.batch_size
    C, L = size["classes"], size["llm_layers"]
    ctx_ids = torch.tensor([49406, 320, 1125, 539, 320])                  # SOS "a photo of a" in CLIP's vocab
    suffix_ids = torch.randint(1000, 40000, (C, 6))
    suffix_ids[:, 4:] = 49407                                             # "{3-token name} ." then EOT
    eot, rows = torch.full((C,), 4 + L + 4), []
    for precision in precisions:
        torch.manual_seed(0)
        clip = CLIP(size["clip"]).init_random(0)
        model = CILMP(clip, torch.randn(C, L, size["llm_dim"]), suffix_ids, eot, ctx_ids,
                      CILMPConfig(depth=size["clip"].text_layers)).to(dev)
        R.cast_frozen(model, R.PRECISIONS[precision])
        params = [p for p in model.parameters() if p.requires_grad]
        opt, scaler = torch.optim.SGD(params, lr=1e-3, momentum=0.9), R.make_scaler(precision, dev)
        res = size["clip"].image_size
        x, y = torch.randn(B, 3, res, res, device=dev), torch.randint(0, C, (B,), device=dev)

        def step():  # the training step: autocast forward, then R.optimizer_step as train() calls it
            with R.autocast(dev, precision):
                loss = F.cross_entropy(model(x).float(), y)
            R.optimizer_step(loss, opt, scaler, world, 0)

        rows.append(R.bench_step("CILMP train step", step, precision=precision, batch=B, device=dev,
                                 steps=args.bench_steps, label="CILMP train step (ViT-B/16, 32 x 4096 LLM)"))
        print(f"trainable parameters at this size: {sum(p.numel() for p in params):,}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# main


# The paper's recipe (Sec. 4.2 + the official vit_b16.yaml) is the flags' defaults. The demo's values are ours,
# picked so tiny models learn in ~12 CPU epochs: higher lr and warm-up lr, tiny CLIP and LLM.
DEMO_RECIPE = dict(epochs=12, batch_size=32, lr=0.01, warmup_lr=1e-3, clip="tiny", llm="tiny", max_new_tokens=24)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CILMP: conditional intervention of LLM representations for prompt "
                                "tuning of CLIP. Defaults are the paper's recipe; --data demo (the default) "
                                "applies the demo recipe to every flag not typed.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    R.add_common_args(p, datasets=DATASETS, data="demo", epochs=100, batch_size=64, lr=0.0025, seed=1, help={
        "epochs": "paper: 100, demo: 12", "batch_size": "paper: 64, demo: 32; --bench: 8",
        "lr": "SGD; paper: 0.0025, demo: 0.01"}, eval_batch_size=100)  # 100: the official evaluation batch
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="the warm-up's constant lr (paper: 1e-5, demo: 1e-3)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="constant-lr warm-up epochs before the cosine")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 1,2,3: one run each, then mean +- std")
    p.add_argument("--label-ratio", type=float, default=1.0,
                   help="train on this stratified fraction of the training labels (paper Sec. 5.2: 0.1, 0.3)")
    # models
    p.add_argument("--clip", choices=list(CLIP_PRESETS), default="vit-b16", help="CLIP preset (demo: tiny)")
    p.add_argument("--clip-path", default=None, help="HF CLIP folder or repo id for the vit-b16 preset")
    p.add_argument("--llm", choices=[*LLM_PRESETS, "none"], default="llama3-8b",
                   help="LLM preset (demo: tiny); none = deep vision-language prompting without LLM tokens")
    p.add_argument("--llm-path", default=None, help="HF Llama folder or repo id for a real LLM preset")
    p.add_argument("--llm-dtype", choices=["bf16", "fp32"], default="bf16", help="LLM weights dtype on CPU")
    p.add_argument("--max-new-tokens", type=int, default=128, help="LLM answer length (ours; demo: 24)")
    p.add_argument("--cache-dir", default=str(REPO / "cache"), help="where LLM representations are cached")
    # method
    p.add_argument("--prompt-mode", choices=["representations", "text"], default="representations",
                   help="text: the paper's Sec. 4.5.2 baseline, the LLM's description + class name as a text prompt")
    p.add_argument("--n-ctx", type=int, default=4, help="learnable text context tokens (<= 4: from 'a photo of a')")
    p.add_argument("--n-vpt", type=int, default=4, help="learnable vision prompt tokens per layer")
    p.add_argument("--prefix-len", type=int, default=4, help="LLM positions edited by the prefix intervention (p)")
    p.add_argument("--suffix-len", type=int, default=4, help="LLM positions edited by the suffix intervention (s)")
    p.add_argument("--rank", type=int, default=8, help="LoReFT subspace / projection rank (r)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the intervention output")
    p.add_argument("--no-rd", action="store_true", help="ablation: image-conditioned, no relationship descriptor")
    p.add_argument("--no-conditional", action="store_true", help="ablation: plain LoReFT (Eq. 11)")
    p.add_argument("--no-intervention", action="store_true", help="ablation: project the LLM representations only")
    return p


def parse_args(argv=None):
    """Flags -> args: --resume fills what is not typed from the run; else the demo recipe fills --data demo."""
    p = parser()
    args, given = p.parse_args(argv), R.given_flags(p, argv)
    for preset, path in (("clip", "clip_path"), ("llm", "llm_path")):
        if path in given and getattr(args, preset) == "tiny" and preset in given:
            p.error(f"--{path.replace('_', '-')} is for a real model; the tiny {preset} preset takes no weights path")
    if args.resume:
        if args.seeds:
            p.error("--seeds starts new runs; --resume continues one")
        R.restore_run_args_or_exit(p, args, given, free=("cache_dir", "llm_dtype"))
        args.seeds = None  # a run of --seeds is resumed on its own
    elif args.data == "demo":
        for k, v in DEMO_RECIPE.items():
            # --clip-path / --llm-path name a real model: they keep the real preset instead of the demo's tiny one
            if k not in given and not (k in ("clip", "llm") and f"{k}_path" in given):
                setattr(args, k, v)
    if args.bench and "batch_size" not in given:
        args.batch_size = 8
    R.finish_common_args(p, args)
    R.check_flags(p, args, [
        ("n_vpt", args.n_vpt >= 0, "0 or more"), ("prefix_len", args.prefix_len >= 0, "0 or more"),
        ("suffix_len", args.suffix_len >= 0, "0 or more"), ("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
        ("rank", args.rank >= 1, "at least 1"), ("dropout", 0 <= args.dropout < 1, "in [0, 1)"),
        ("label_ratio", 0 < args.label_ratio <= 1, "in (0, 1]"), ("warmup_lr", args.warmup_lr > 0, "above 0"),
        ("warmup_epochs", args.warmup_epochs >= 0, "0 or more"), ("n_ctx", args.n_ctx >= 1, "at least 1"),
        ("seeds", not args.seeds or all(x.strip().lstrip("-").isdigit() for x in args.seeds.split(",")),
         "comma-separated integers, e.g. 1,2,3")])
    if args.prompt_mode == "text" and args.llm == "none":
        p.error("--prompt-mode text puts the LLM's descriptions into the prompt: it needs an LLM (not --llm none)")
    return args


def run_one(args, world: R.World) -> dict:
    """Frozen CLIP, data, LLM representations, the model; train it (--eval-only: load its weights); evaluate."""
    preflight(args)
    run_dir = Path(args.resume) if args.resume else R.new_run_dir("cilmp", args.data, args.out, vars(args), world)
    try:  # from here a non-finite loss or Ctrl-C exits 3 / 2 (R.Stopped), saying which checkpoint is on disk
        R.seed_everything(args.seed, world.rank)
        clip, tok = build_clip(args)
        train_ds, test_ds = build_data(args, clip.cfg.image_size)
        reps, descriptions = get_representations(args, train_ds.classnames, world)       # (C, L, D_L)
        model = build_model(args, clip, tok, train_ds.classnames, reps, descriptions).to(world.device)
        R.cast_frozen(model, R.PRECISIONS[args.precision])  # frozen CLIP in the compute dtype; trainables fp32
        if world.is_main:
            print(f"CILMP: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters "
                  f"({model.cfg}, L {model.L}); CLIP frozen ({sum(p.numel() for p in model.clip.parameters()):,})")
        if args.eval_only:
            R.load_final(model, run_dir, world.device, required=model.trainable_state())
        else:
            train(args, world, run_dir, model, train_ds)
    except (R.NonFiniteLoss, KeyboardInterrupt) as e:
        raise R.Stopped(e, run_dir, "python cilmp.py") from None
    if not world.is_main:
        return {}
    report = evaluate(model, test_ds, args, world.device)
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(M.format_table(report))
    print(f"run folder: {run_dir}")
    return report


def main(argv=None):
    args = parse_args(argv)

    def work(world: R.World):
        if args.bench:
            given = R.given_flags(parser(), argv)
            run_bench(args, world, [args.precision] if "precision" in given else
                      ["bf16"] if world.device.type == "cuda" else ["fp32", "bf16"])
        else:
            R.run_seeds(run_one, args, world) if args.seeds else run_one(args, world)  # mean +- std, as reported

    # a user mistake or a run stopped early (R.Stopped) is a message and its exit code, not a traceback
    return R.run_main(work, args.device, tf32=True)


if __name__ == "__main__":
    sys.exit(main())
