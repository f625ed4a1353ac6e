"""MedCT-VLM: LoRA in both towers of CT-CLIP, zero-shot multi-label classification of 18 chest-CT findings.

Paper: Alzubaidi, Nezami, Behzad. "Scaling Down to Scale Up: Towards Operationally-Efficient and Deployable
Clinical Models via Cross-Modal Low-Rank Adaptation for Medical Vision-Language Models" (arXiv 2512.00597).
No code was released. The model it adapts is CT-CLIP v2 (Hamamci et al., ibrahimethemhamamci/CT-CLIP).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.weights import WeightsError, load_config, load_mapped, resolve, tensor_index

REPO = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------
# BERT (post-LN encoder, absolute positions, token types). Module names are HF's key names, so a checkpoint
# maps one to one, and a method can swap a sublayer after construction (`layer.output = MyOutput(...)`).


@dataclass
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


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)                 # HF's name: keys read attention.self.query.weight
        self.output = BertSublayerOutput(cfg, cfg.dim)

    def forward(self, x, mask=None):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.mlp_dim)

    def forward(self, x):
        return F.gelu(self.dense(x))                       # exact (erf) GELU: HF hidden_act "gelu"


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSublayerOutput(cfg, cfg.mlp_dim)

    def forward(self, x, mask=None):
        x = self.attention(x, mask)                        # LN(x + attn(x))
        return self.output(self.intermediate(x), x)        # LN(x + W2 gelu(W1 x))


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

# ----------------------------------------------------------------------------------------------------------
# CTViT, the image tower of CT-CLIP v2 (transformer_maskgit/ctvit.py + attention.py): tubelet embedding, a
# spatial then a temporal transformer, and the vector quantiser that CT-CLIP leaves inside its "encoder".


@dataclass
class CTViTConfig:
    dim: int = 512
    image_size: int = 480          # H = W of the input
    frames: int = 240              # D, the axial (z) extent of the input
    patch_size: int = 20
    temporal_patch_size: int = 10
    spatial_depth: int = 4
    temporal_depth: int = 4
    heads: int = 8
    dim_head: int = 32
    ff_mult: int = 4               # GEGLU inner size int(ff_mult * 2/3 * dim) = 1365
    codebook_size: int = 8192
    channels: int = 1

    @property
    def grid(self):                # token grid (t, h, w) = (24, 24, 24) for CT-CLIP v2
        return self.frames // self.temporal_patch_size, *(self.image_size // self.patch_size,) * 2


class PEG(nn.Module):
    """Position-generating conv: depthwise Conv3d(3) over the token volume, zero padding (2, 0) on its first axis
    (causal) and (1, 1) on the other two; added to x by the layer.

    FOOTGUN (reproduced on purpose): the official PEG reshapes its input to (b, t, h, w, d) with a plain reshape.
    In the temporal stage the input is laid out (b h w, t, d), so the "t, h, w" axes the conv sees are really
    (h, w, t): the causal padding runs along image rows, and the kernel's last axis along z. The pretrained
    kernels were learned that way, so we do the very same reshape."""

    def __init__(self, dim: int):
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x, shape):
        """x (N, L, D) tokens of one stage; shape (b, t, h, w) of the whole token volume."""
        y = x.reshape(*shape, -1).permute(0, 4, 1, 2, 3)                                 # (b, D, t, h, w), see above
        y = self.dsconv(F.pad(y, (1, 1, 1, 1, 2, 0)))
        return y.permute(0, 2, 3, 4, 1).reshape(x.shape)


class CTAttention(nn.Module):
    """Cosine-similarity attention: q = W_q LN(x) but k, v = W_kv x from the UN-normalised input (the official
    code takes kv_input before applying its norm), q and k L2-normalised and scaled per channel by learned
    q_scale / k_scale, logits = 8 q.k^T (+ a relative position bias in the spatial stage), softmax, out."""

    def __init__(self, cfg: CTViTConfig):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.nh = cfg.heads
        self.norm = nn.LayerNorm(cfg.dim, bias=False)     # official LayerNorm: gamma, beta a zero buffer
        self.to_q = nn.Linear(cfg.dim, inner, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim, bias=False)
        self.q_scale = nn.Parameter(torch.ones(cfg.dim_head))
        self.k_scale = nn.Parameter(torch.ones(cfg.dim_head))

    def forward(self, x, bias=None):
        """x (N, L, D), bias (nh, L, L) or None -> (N, L, D)."""
        N, L, _ = x.shape
        k, v = self.to_kv(x).chunk(2, -1)                  # before the norm, as the official code
        q, k, v = (t.view(N, L, self.nh, -1).transpose(1, 2) for t in (self.to_q(self.norm(x)), k, v))  # (N, nh, L, hs)
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=8.0)
        return self.to_out(y.transpose(1, 2).reshape(N, L, -1))


class GEGLUFeedForward(nn.Module):
    def __init__(self, cfg: CTViTConfig):
        super().__init__()
        inner = int(cfg.ff_mult * 2 / 3 * cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj_in = nn.Linear(cfg.dim, 2 * inner, bias=False)
        self.proj_out = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x):
        h, gate = self.proj_in(self.norm(x)).chunk(2, -1)
        return self.proj_out(F.gelu(gate) * h)            # GEGLU: the SECOND half is the gate


class CTViTLayer(nn.Module):
    def __init__(self, cfg: CTViTConfig):
        super().__init__()
        self.peg = PEG(cfg.dim)
        self.attn = CTAttention(cfg)
        self.ff = GEGLUFeedForward(cfg)

    def forward(self, x, shape, bias=None):
        x = self.peg(x, shape) + x
        x = self.attn(x, bias) + x
        return self.ff(x) + x


class RelPosBias(nn.Module):
    """Continuous relative position bias over the h x w grid (Swin v2 style): an MLP 2 -> D -> D -> heads
    (LeakyReLU 0.1) of the log-signed offsets sign(d) log(1 + |d|), giving (heads, hw, hw). Evaluated on the
    (2h-1)(2w-1) distinct offsets and then gathered: the official code runs the MLP on all (hw)^2 pairs (88 GFLOP
    per forward at 24 x 24) for the same numbers."""

    def __init__(self, cfg: CTViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(2, cfg.dim)
        self.fc2 = nn.Linear(cfg.dim, cfg.dim)
        self.fc3 = nn.Linear(cfg.dim, cfg.heads)

    def forward(self, h: int, w: int):
        dev = self.fc1.weight.device
        dy, dx = torch.meshgrid(torch.arange(-h + 1, h, device=dev), torch.arange(-w + 1, w, device=dev), indexing="ij")
        rel = torch.stack([dy, dx], -1).reshape(-1, 2).float()                            # (2h-1)(2w-1), 2
        rel = rel.sign() * torch.log1p(rel.abs())
        act = lambda t: F.leaky_relu(t, 0.1)
        table = self.fc3(act(self.fc2(act(self.fc1(rel.to(self.fc1.weight.dtype))))))   # (offsets, nh)
        ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()                                               # query i = (y, x)
        idx = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        return table[idx].permute(2, 0, 1)                                               # (nh, hw, hw)


class CosineVQ(nn.Module):
    """The frozen cosine-similarity codebook lookup of vector-quantize-pytorch 1.1.2 (VectorQuantize with
    use_cosine_sim=True), in eval semantics: code c* = argmax_c cos(x, e_c), output = e_c* (the stored row).
    Training uses the straight-through estimator x + (e_c* - x).detach() (as the official train-mode forward),
    so the encoder below gets gradients; without it no gradient reaches the CTViT's LoRA at all.

    FOOTGUN: the official module in train mode ALSO moves its codebook by EMA (decay 0.8) on every forward, and
    replaces "dead" codes with random batch vectors. Fine-tuning with it in train mode silently rewrites the
    pretrained codebook. Here the codebook is a buffer that no forward ever changes."""

    def __init__(self, cfg: CTViTConfig):
        super().__init__()
        self.register_buffer("embed", torch.randn(1, cfg.codebook_size, cfg.dim))       # the checkpoint's shape

    def forward(self, x):
        """x (..., D) -> (quantised (..., D), code ids (...)), computed in fp32 as the official (autocast off)."""
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            codes = self.embed[0].float()                                                # (K, D)
            sim = F.normalize(xf, dim=-1) @ F.normalize(codes, dim=-1).T                 # (..., K)
            ids = sim.argmax(-1)
            q = codes[ids]                                                               # (..., D)
        if self.training and torch.is_grad_enabled():
            q = xf + (q - xf).detach()                                                   # straight-through
        return q.to(x.dtype), ids


class CTViT(nn.Module):
    """forward(volume (B, C, D, H, W)) -> quantised tokens (B, t, h, w, dim), equal to the official
    CTViT(..., return_encoded_tokens=True). Shapes below for CT-CLIP v2: (B, 1, 240, 480, 480) -> (B, 24, 24, 24, 512)."""

    def __init__(self, cfg: CTViTConfig):
        super().__init__()
        self.cfg = cfg
        patch = cfg.channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_norm_in = nn.LayerNorm(patch)                                         # LayerNorm(4000)
        self.patch_proj = nn.Linear(patch, cfg.dim)
        self.patch_norm_out = nn.LayerNorm(cfg.dim)
        self.rel_pos_bias = RelPosBias(cfg)
        self.spatial = nn.ModuleList(CTViTLayer(cfg) for _ in range(cfg.spatial_depth))
        self.spatial_norm = nn.LayerNorm(cfg.dim, bias=False)
        self.temporal = nn.ModuleList(CTViTLayer(cfg) for _ in range(cfg.temporal_depth))
        self.temporal_norm = nn.LayerNorm(cfg.dim, bias=False)
        self.vq = CosineVQ(cfg)
        self.grad_ckpt = False

    def init_random(self, seed: int = 0, std: float = 0.02):
        """Random weights for the demo / bench: N(0, std) linears and convs, norms 1 / 0, a unit-norm codebook."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name or name.endswith("_scale"):
                p.data.fill_(0.0 if name.endswith("bias") else 1.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                p.data.copy_(torch.randn(p.shape, generator=g) * std)
        self.vq.embed.copy_(F.normalize(torch.randn(self.vq.embed.shape, generator=g), dim=-1))
        return self

    def patch_embed(self, video):
        """(B, C, t*pt, h*p, w*p) -> (B, t, h, w, C*pt*p*p) flattened in (c, pt, p1, p2) order -> LN -> Linear -> LN."""
        B, C, D, H, W = video.shape
        pt, p = self.cfg.temporal_patch_size, self.cfg.patch_size
        if (D % pt) or (H % p) or (W % p):
            raise ValueError(f"volume (D, H, W) = {(D, H, W)} is not divisible into {pt} x {p} x {p} tubelets")
        x = video.reshape(B, C, D // pt, pt, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(B, D // pt, H // p, W // p, -1)                                   # (B, t, h, w, 4000)
        return self.patch_norm_out(self.patch_proj(self.patch_norm_in(x)))              # (B, t, h, w, D)

    def _run(self, layer, x, shape, bias=None):
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, x, shape, bias, use_reentrant=False)
        return layer(x, shape, bias)

    def encode(self, tokens):
        """(B, t, h, w, D) -> (B, t, h, w, D): spatial layers over each slice's h*w grid, then temporal layers
        over the t slices at each (h, w) position (no position bias, no causal mask)."""
        B, t, h, w, D = tokens.shape
        shape = (B, t, h, w)
        bias = self.rel_pos_bias(h, w)                                                   # (nh, hw, hw)
        x = tokens.reshape(B * t, h * w, D)
        for layer in self.spatial:
            x = self._run(layer, x, shape, bias)
        x = self.spatial_norm(x)
        x = x.view(B, t, h, w, D).permute(0, 2, 3, 1, 4).reshape(B * h * w, t, D)        # (B h w, t, D)
        for layer in self.temporal:
            x = self._run(layer, x, shape)                                               # PEG axis quirk inside
        x = self.temporal_norm(x)
        return x.view(B, h, w, t, D).permute(0, 3, 1, 2, 4)                              # (B, t, h, w, D)

    def forward(self, video):
        x = self.encode(self.patch_embed(video))
        return self.vq(x)[0]                                                             # (B, t, h, w, D)

# ----------------------------------------------------------------------------------------------------------
# CT-CLIP: the two towers, their latent heads and the temperature (CT_CLIP/ct_clip/ct_clip.py)


class CTCLIP(nn.Module):
    """image: CTViT tokens (B, t, h, w, D) -> mean over the axial axis t -> flatten h*w*D (294,912) -> Linear -> 512;
    text: BERT CLS hidden state (B, 768) -> Linear -> 512 (not the pooler); both L2-normalised. Logit scale exp(T),
    T learned from 1.0 and never clamped (CT-CLIP)."""

    def __init__(self, vcfg: CTViTConfig, tcfg: BertConfig, dim_latent: int = 512):
        super().__init__()
        _, h, w = vcfg.grid
        self.visual = CTViT(vcfg)
        self.text = BERT(tcfg)
        self.to_visual_latent = nn.Linear(h * w * vcfg.dim, dim_latent, bias=False)  # 151M of CT-CLIP's 438M
        self.to_text_latent = nn.Linear(tcfg.dim, dim_latent, bias=False)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def encode_volume(self, video):
        """(B, 1, D, H, W) -> (B, L) unit vectors. The axial mean keeps each in-plane position apart (CT-CLIP
        issue #39: intended), so the latent head sees where in the slice a feature is."""
        tokens = self.visual(video)                                                     # (B, t, h, w, D)
        return F.normalize(self.to_visual_latent(tokens.mean(1).flatten(1)), dim=-1)

    def encode_text(self, ids, mask):
        hidden, _ = self.text(ids, mask)                                                # (B, T, 768)
        return F.normalize(self.to_text_latent(hidden[:, 0]), dim=-1)

    @classmethod
    def from_pretrained(cls, path, vcfg: CTViTConfig, tcfg: BertConfig, dim_latent: int = 512, dtype=None):
        """CT-CLIP safetensors (CT-CLIP_v2.pt converted by `python -m common.weights convert`) -> CTCLIP on the
        meta device, every key and shape checked. The checkpoint carries no config: the sizes come from the preset."""
        with torch.device("meta"):
            model = cls(vcfg, tcfg, dim_latent)
        return load_mapped(model, path, CTCLIP_MAP, dtype=dtype)


_VIT = "visual_transformer."
CTCLIP_MAP = {  # CT-CLIP_v2 state-dict keys -> ours; "{}" = one dotted component, None = dropped on purpose
    "temperature": "temperature",
    "to_visual_latent.weight": "to_visual_latent.weight",
    "to_text_latent.weight": "to_text_latent.weight",
    "to_visual_latent_extra.weight": None,            # CLOOB copies, unused (extra_latent_projection=False)
    "to_text_latent_extra.weight": None,
    _VIT + "to_patch_emb.1.{}": "visual.patch_norm_in.{}",
    _VIT + "to_patch_emb.2.{}": "visual.patch_proj.{}",
    _VIT + "to_patch_emb.3.{}": "visual.patch_norm_out.{}",
    _VIT + "to_patch_emb_first_frame.{}.{}": None,    # first-frame path, commented out in the official forward
    _VIT + "to_pixels.0.{}": None,                    # VQ-VAE decoder heads
    _VIT + "to_pixels_first_frame.0.{}": None,
    _VIT + "spatial_rel_pos_bias.net.0.0.{}": "visual.rel_pos_bias.fc1.{}",
    _VIT + "spatial_rel_pos_bias.net.1.0.{}": "visual.rel_pos_bias.fc2.{}",
    _VIT + "spatial_rel_pos_bias.net.2.{}": "visual.rel_pos_bias.fc3.{}",
    _VIT + "vq._codebook.embed": "visual.vq.embed",
    _VIT + "vq._codebook.cluster_size": None,         # EMA statistics: only the (disabled) codebook update reads them
    _VIT + "vq._codebook.initted": None,
    # the two transformers; layers.{j}.{0: PEG, 1: self-attention, 2: cross-attention (None), 3: feed-forward}
    _VIT + "enc_spatial_transformer.layers.{}.0.dsconv.{}": "visual.spatial.{}.peg.dsconv.{}",
    _VIT + "enc_spatial_transformer.layers.{}.1.norm.gamma": "visual.spatial.{}.attn.norm.weight",
    _VIT + "enc_spatial_transformer.layers.{}.1.norm.beta": None,          # a zero buffer
    _VIT + "enc_spatial_transformer.layers.{}.1.context_norm.{}": None,    # cross-attention only
    _VIT + "enc_spatial_transformer.layers.{}.1.null_kv": None,            # (heads, 0, dim_head): empty
    _VIT + "enc_spatial_transformer.layers.{}.1.q_scale": "visual.spatial.{}.attn.q_scale",
    _VIT + "enc_spatial_transformer.layers.{}.1.k_scale": "visual.spatial.{}.attn.k_scale",
    _VIT + "enc_spatial_transformer.layers.{}.1.to_q.weight": "visual.spatial.{}.attn.to_q.weight",
    _VIT + "enc_spatial_transformer.layers.{}.1.to_kv.weight": "visual.spatial.{}.attn.to_kv.weight",
    _VIT + "enc_spatial_transformer.layers.{}.1.to_out.weight": "visual.spatial.{}.attn.to_out.weight",
    _VIT + "enc_spatial_transformer.layers.{}.3.0.{}": "visual.spatial.{}.ff.norm.{}",
    _VIT + "enc_spatial_transformer.layers.{}.3.1.weight": "visual.spatial.{}.ff.proj_in.weight",
    _VIT + "enc_spatial_transformer.layers.{}.3.4.weight": "visual.spatial.{}.ff.proj_out.weight",
    _VIT + "enc_spatial_transformer.norm_out.gamma": "visual.spatial_norm.weight",
    _VIT + "enc_spatial_transformer.norm_out.beta": None,
    _VIT + "enc_temporal_transformer.layers.{}.0.dsconv.{}": "visual.temporal.{}.peg.dsconv.{}",
    _VIT + "enc_temporal_transformer.layers.{}.1.norm.gamma": "visual.temporal.{}.attn.norm.weight",
    _VIT + "enc_temporal_transformer.layers.{}.1.norm.beta": None,
    _VIT + "enc_temporal_transformer.layers.{}.1.context_norm.{}": None,
    _VIT + "enc_temporal_transformer.layers.{}.1.null_kv": None,
    _VIT + "enc_temporal_transformer.layers.{}.1.q_scale": "visual.temporal.{}.attn.q_scale",
    _VIT + "enc_temporal_transformer.layers.{}.1.k_scale": "visual.temporal.{}.attn.k_scale",
    _VIT + "enc_temporal_transformer.layers.{}.1.to_q.weight": "visual.temporal.{}.attn.to_q.weight",
    _VIT + "enc_temporal_transformer.layers.{}.1.to_kv.weight": "visual.temporal.{}.attn.to_kv.weight",
    _VIT + "enc_temporal_transformer.layers.{}.1.to_out.weight": "visual.temporal.{}.attn.to_out.weight",
    _VIT + "enc_temporal_transformer.layers.{}.3.0.{}": "visual.temporal.{}.ff.norm.{}",
    _VIT + "enc_temporal_transformer.layers.{}.3.1.weight": "visual.temporal.{}.ff.proj_in.weight",
    _VIT + "enc_temporal_transformer.layers.{}.3.4.weight": "visual.temporal.{}.ff.proj_out.weight",
    _VIT + "enc_temporal_transformer.norm_out.gamma": "visual.temporal_norm.weight",
    _VIT + "enc_temporal_transformer.norm_out.beta": None,
}
CTCLIP_MAP |= {"text_transformer." + k: v and "text." + v for k, v in BERT_MAP.items() if not k.startswith(("bert.", "cls"))}
CTCLIP_MAP["text_transformer.pooler.dense.{}"] = None   # in the checkpoint (randomly initialised by BertModel), unused
