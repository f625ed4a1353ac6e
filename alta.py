"""ALTA: align through adapting a masked-record-modelling ViT and CXR-BERT, with temporal multi-view inputs.

DOCSTRING_PLACEHOLDER
"""
import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import run as R
from common.weights import (WeightsError, check_keys, load_config, load_mapped, map_key, read_safetensors, resolve,
                            tensor_index)

REPO = Path(__file__).resolve().parent

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
    n_views: int = 4               # current frontal, current lateral, prior frontal, prior lateral
    fix_missing: bool = False      # official: frozen zero missing token, missing views' CLS in the mean
    train_bert_embed: bool = False  # official: bert_embed is never trained (a frozen random projection)


VIT_PRESETS = {
    "vit-b16": ViTConfig(),
    "tiny": ViTConfig(img_size=32, patch_size=4, dim=64, n_layers=2, n_heads=4, decoder_dim=64, decoder_layers=1,
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
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def one(pos):  # (grid^2,) -> (grid^2, dim/2)
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    table = torch.cat([one(xs), one(ys)], 1)                                                # (grid^2, dim)
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
        D, N = cfg.dim, cfg.grid ** 2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, cfg.grid)[None], requires_grad=False)   # (1, 1 + N, D)
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        Dd = cfg.decoder_dim
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(Dd, cfg.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.eps)
                                            for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.eps)
        self.decoder_pred = nn.Linear(Dd, (2 * cfg.patch_size) ** 2 * 3)

    def encode(self, x):
        """(B, 3, H, W) -> all tokens after the final norm (B, 1 + N, D), no masking (MAE's plain forward)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
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
    mask = torch.ones(n_items, n_tokens, device=device)
    mask[:, :n_keep] = 0
    return ids_shuffle[:, :n_keep], ids_restore, torch.gather(mask, 1, ids_restore)

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
        self.attn_adapter = Adapter(dim, ratio, skip=True)
        self.mlp_adapter = Adapter(dim, ratio, skip=False)
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
        self.attn_adapter = Adapter(dim, ratio, skip=True)
        self.mlp_adapter = Adapter(dim, ratio, skip=False)
        self.scale = scale

    def forward(self, x, mask=None):
        h = self.attn_adapter(self.attention(x, mask))
        return self.output(self.intermediate(h), h) + self.scale * self.mlp_adapter(h)


def add_adapters(model: "ALTA", cfg: ALTAConfig):
    """Swap every encoder block of the ViT (not the decoder) and every BERT layer for its adapted version."""
    model.blocks = nn.ModuleList(AdaptedBlock(b, cfg.adapter_ratio, cfg.adapter_scale) for b in model.blocks)
    layers = model.bert_encoder.bert.encoder.layer
    model.bert_encoder.bert.encoder.layer = nn.ModuleList(
        AdaptedBertLayer(l, cfg.adapter_ratio, cfg.adapter_scale) for l in layers)
    for name, m in model.bert_encoder.named_modules():   # BERT's init for D_fc1 (HF _init_weights: N(0, 0.02))
        if name.endswith("D_fc1"):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model

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
        # the official missing token is created in fp16, zeros, and never trained: see fix_missing
        self.missing_token = nn.Parameter(torch.zeros(1, N, D))
        self.temporal_embedding = nn.Parameter(torch.zeros(1, 2, D))
        self.view_embedding = nn.Parameter(torch.zeros(1, 2, D))
        self.bert_embed = nn.Linear(D, bert_cfg.dim)
        self.projection_head = ProjectionHead(D, cfg.proj_dim)
        self.local_projection_head = ProjectionHead(D, cfg.proj_dim)
        for name in ("logit_scale", "logit_scale_local1", "logit_scale_local2", "logit_scale_local3"):
            setattr(self, name, nn.Parameter(torch.tensor(math.log(1 / 0.07))))
        self.bert_encoder = CXRBert(bert_cfg, cfg.proj_dim)
        add_adapters(self, cfg)
        self.register_buffer("view_ids", torch.tensor(VIEW_IDS), persistent=False)
        self.register_buffer("time_ids", torch.tensor(TIME_IDS), persistent=False)

    def init_weights(self, seed: int = 0):
        """The official initialize_weights for the vision side (xavier-uniform Linear and patch embedding, LN 1/0,
        cls / mask tokens N(0, 0.02), adapter up-projections zero) and BERT's N(0, 0.02) for the text side. Real
        runs then load MRM and CXR-BERT over it; what they do not hold (adapters, heads, bert_embed) keeps this."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, m in self.named_modules():
                if name.startswith("bert_encoder"):
                    continue
                if isinstance(m, nn.Linear):
                    bound = math.sqrt(6 / (m.in_features + m.out_features))
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            w = self.patch_embed.proj.weight
            bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
            w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
            nn.init.zeros_(self.patch_embed.proj.bias)
            self.cls_token.copy_(torch.randn(self.cls_token.shape, generator=g) * 0.02)
            self.mask_token.copy_(torch.randn(self.mask_token.shape, generator=g) * 0.02)
            self.bert_encoder.bert.init_random(seed + 1)
            for m in self.bert_encoder.modules():
                if isinstance(m, ProjectionHead) or isinstance(m, MLMHead):
                    for p_name, p in m.named_parameters():
                        if "LayerNorm" in p_name:
                            p.fill_(1.0 if p_name.endswith("weight") else 0.0)
                        elif p.ndim == 1:
                            p.zero_()
                        else:
                            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
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
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
        x = x + self.temporal_embedding[:, :1] + self.view_embedding[:, :1]       # current, frontal
        for blk in self.blocks:
            x = blk(x)
        z = self.projection_head(self.norm(x)[:, 0])
        return F.normalize(z.float(), dim=-1) if normalize else z

    def encode_text(self, ids, attention_mask, normalize: bool = True):
        """(N, T) -> (N, E): CXR-BERT's projected CLS (unnormalised when prompts are averaged first)."""
        z = self.bert_encoder.cls_projection_head(self.bert_encoder.hidden(ids, attention_mask)[:, 0])
        return F.normalize(z.float(), dim=-1) if normalize else z

    # -- pre-training ----------------------------------------------------------------------------------------
    def encode_views(self, views, present):
        """views (B, V=4, 3, H, W) in VIEWS order, present (B, V) bool -> CLS (B, V, D), visible tokens
        (B, V, n_keep, D), and the masking of each view: ids_restore, mask (B, V, N). Each image is its own
        sequence (B*V, 1 + n_keep, D): no attention across views, as the official code."""
        B, V = present.shape
        x = self.patch_embed(views.flatten(0, 1))                                        # (B*V, N, D)
        # a missing view (an all-zero image officially) becomes the missing token, then gets positions as usual
        x = torch.where(present.reshape(-1, 1, 1), x, self.missing_token.to(x.dtype))
        x = x + self.pos_embed[:, 1:]
        ids_keep, ids_restore, mask = random_masking(B * V, x.shape[1], self.alta_cfg.mask_ratio, x.device)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[2]))           # (B*V, n_keep, D)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
        vt = self.view_embedding[0, self.view_ids] + self.temporal_embedding[0, self.time_ids]  # (V, D)
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
        regions = present[:, :, None].expand(-1, -1, tokens.shape[2]).flatten(1)          # (B, V*n_keep)
        if not self.alta_cfg.fix_missing:
            regions = torch.ones_like(regions)

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
    """The official rule (util/trainable_params.py): a parameter trains iff its name contains one of TRAIN_RULE.
    Frozen: patch embedding, attention / MLP weights, decoder blocks, BERT embeddings, missing_token, bert_embed
    (the last two are official bugs, fixed by --fix-missing / --train-bert-embed). Returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad = (any(s in name for s in TRAIN_RULE) or (cfg.fix_missing and name == "missing_token")
                           or (cfg.train_bert_embed and name.startswith("bert_embed.")))
        if p.requires_grad:
            names.append(name)
    return names

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
        s = (t2 * cos).masked_fill(~m[:, None, :], float("-inf")).logsumexp(-1)          # (n, Ni)
        scores.append(s)
    sim = t3 * torch.cat(scores).T                                                       # (Ni, Nt)
    labels = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def recon_loss(pred, big, mask, p: int):
    """MRM's super-resolution target: the 2x-size image patchified at p = 2 x patch, each patch normalised to
    zero mean / unit variance (norm_pix_loss), MSE averaged per patch, then over the masked patches only."""
    target = patchify(big, p)                                                             # (B, N, p*p*3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)                                          # (B, N)
    return (per_patch * mask).sum() / mask.sum()

# ----------------------------------------------------------------------------------------------------------
# Weight loading: safetensors -> our modules through literal key maps ("{}" = one dotted component, None = drop).
# Our names ARE the official ones, so the maps are identities that spell out the checkpoint layout; the .pth
# files convert with `python -m common.weights convert ALTA.pth ALTA.safetensors --key model` (the pickled
# argparse.Namespace beside the weights is read without running code and dropped).

VISION_MAP = {  # MRM.pth ["model"] and the vision half of ALTA.pth
    "patch_embed.proj.{}": "patch_embed.proj.{}",
    "cls_token": "cls_token", "pos_embed": "pos_embed", "mask_token": "mask_token",
    "blocks.{}.norm1.{}": "blocks.{}.norm1.{}", "blocks.{}.norm2.{}": "blocks.{}.norm2.{}",
    "blocks.{}.attn.qkv.{}": "blocks.{}.attn.qkv.{}", "blocks.{}.attn.proj.{}": "blocks.{}.attn.proj.{}",
    "blocks.{}.mlp.fc1.{}": "blocks.{}.mlp.fc1.{}", "blocks.{}.mlp.fc2.{}": "blocks.{}.mlp.fc2.{}",
    "norm.{}": "norm.{}",
    "decoder_embed.{}": "decoder_embed.{}", "decoder_pos_embed": "decoder_pos_embed",
    "decoder_blocks.{}.norm1.{}": "decoder_blocks.{}.norm1.{}", "decoder_blocks.{}.norm2.{}": "decoder_blocks.{}.norm2.{}",
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
    "bert_encoder.model.bert.encoder.layer.{}.output.{}.{}": None,
    "bert_encoder.model.bert.pooler.dense.{}": None,
    "bert_encoder.model.cls.predictions.bias": None, "bert_encoder.model.cls.predictions.transform.{}.{}": None,
    "bert_encoder.model.cls.predictions.decoder.{}": None,
}
ALTA_MAP = VISION_MAP | {  # ALTA.pth ["model"]: everything
    "missing_token": "missing_token", "temporal_embedding": "temporal_embedding", "view_embedding": "view_embedding",
    "blocks.{}.attn_adapter.{}.{}": "blocks.{}.attn_adapter.{}.{}", "blocks.{}.mlp_adapter.{}.{}": "blocks.{}.mlp_adapter.{}.{}",
    "projection_head.{}.{}": "projection_head.{}.{}", "local_projection_head.{}.{}": "local_projection_head.{}.{}",
    "logit_scale": "logit_scale", "logit_scale_local1": "logit_scale_local1",
    "logit_scale_local2": "logit_scale_local2", "logit_scale_local3": "logit_scale_local3",
    "bert_embed.{}": "bert_embed.{}",
    "bert_encoder.bert.embeddings.{}.{}": "bert_encoder.bert.embeddings.{}.{}",
    "bert_encoder.bert.embeddings.position_ids": None,       # a buffer transformers < 4.31 saved
    "bert_encoder.bert.encoder.layer.{}.attention.self.{}.{}": "bert_encoder.bert.encoder.layer.{}.attention.self.{}.{}",
    "bert_encoder.bert.encoder.layer.{}.attention.output.{}.{}":
        "bert_encoder.bert.encoder.layer.{}.attention.output.{}.{}",
    "bert_encoder.bert.encoder.layer.{}.intermediate.dense.{}": "bert_encoder.bert.encoder.layer.{}.intermediate.dense.{}",
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
    "bert.embeddings.{}.{}": "bert_encoder.bert.embeddings.{}.{}",
    "bert.embeddings.position_ids": None,
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
    """Load the model tensors for which wanted(name) is true from a safetensors file or folder, each of them
    required, every checkpoint key accounted for by key_map; the other tensors keep their values. Floats are
    read as fp32 (ALTA.pth stores the missing token in fp16)."""
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
