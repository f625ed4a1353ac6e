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


BERT_HF_FIELDS_CHECKED = ("position_embedding_type", "is_decoder", "add_cross_attention", "hidden_act",
                          "embedding_size", "chunk_size_feed_forward")


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

