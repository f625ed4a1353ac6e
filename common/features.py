"""Plumbing for methods that train on top of frozen backbones: image-report pairs and tokenized text in, frozen
features out, computed once and cached with the ids of their rows.

    ids, captions = read_pairs(csv_path)              # (common/data.py) an image-report CSV, MGCA's cleaning
    images = Images(root, ids, transform)             # (common/data.py) images by relative path (the cache's ids)
    tok = bert_tokenizer(folder); ids, mask = tokenize(tok, texts)   # padded to the longest text of the batch
    feats = cached(path, ids, compute, world, meta)   # (N, d), row i = ids[i]; computed once by rank 0
    ids, a, b = paired(ids_a, a, ids_b, b)            # two feature tables joined by id, never by position
    name = fingerprint(model)                         # changes whenever the weights or the config change
    keep = fraction(labels, 0.01, seed)               # (common/data.py) a stratified, seeded 1% of the labels
    dice = dice_per_image(probs, masks)               # (B,) Dice at 0.5; an empty mask scores 1 iff predicted empty
"""
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import run as R
from common.data import DataError
from common.weights import WeightsError

# ----------------------------------------------------------------------------------------------------------
# text for BERT-style towers


def bert_tokenizer(folder: Path, max_len: int):
    """tokenizer.json when the folder has one, else WordPiece from vocab.txt (BioBERT, ClinicalBERT), lower-cased
    as tokenizer_config.json says. Either way: [CLS] ... [SEP], truncated to max_len."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file():
        conf = folder / "tokenizer_config.json"
        lower = json.loads(conf.read_text()).get("do_lower_case", True) if conf.is_file() else True
        tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
    else:
        raise WeightsError(f"{folder}: no tokenizer.json or vocab.txt")
    tok.enable_truncation(max_len)
    return tok


def word_tokenizer(texts: list, max_len: int):
    """A WordPiece tokenizer with one entry per word of `texts` (sorted: the vocabulary is a function of the texts
    only), [CLS] ... [SEP], truncated to max_len: the tokenizer of a demo's tiny BERT."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    words = sorted({w for c in texts for w in c.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_truncation(max_len)
    return tok


def tokenize(tok, texts) -> tuple:
    """-> ids (N, T), attention mask (N, T), padded with id 0 to the longest text of the batch (padding to a fixed
    length gives the same outputs through the attention mask, at more cost)."""
    enc = tok.encode_batch(list(texts))
    ids = torch.zeros(len(enc), max(len(e.ids) for e in enc), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)], mask[i, :len(e.ids)] = torch.tensor(e.ids), 1
    return ids, mask

# ----------------------------------------------------------------------------------------------------------
# the cache


def fingerprint(model: torch.nn.Module) -> str:
    """10 hex digits from the first weight tensor and model.cfg: a changed checkpoint or config is a new cache."""
    first = next(iter(model.state_dict().values())).detach().float().cpu().numpy().tobytes()
    return hashlib.sha1(first + repr(getattr(model, "cfg", "")).encode()).hexdigest()[:10]


@torch.no_grad()
def extract(fn, n: int, batch: int, desc: str, enabled=True) -> torch.Tensor:
    """Stack fn(start, end) over [0, n) in batches, as fp32 on the CPU, with an ETA."""
    prog, out = R.Progress(math.ceil(n / batch), desc, enabled), []
    for s in range(0, n, batch):
        out.append(fn(s, min(n, s + batch)).float().cpu())
        prog.update()
    return torch.cat(out)


def cached(path: Path, ids: list, compute, world, meta: dict) -> torch.Tensor:
    """Features (N, d) for `ids`, rows in that order: read from path if its manifest lists exactly these ids, else
    compute() by rank 0 and written atomically (path.safetensors + path.json); the other ranks wait and read.
    compute() runs in a forked RNG, so a cold cache draws the same random numbers afterwards as a warm one."""
    st, man = path.with_suffix(".safetensors"), path.with_suffix(".json")
    fresh = man.is_file() and st.is_file() and json.loads(man.read_text()).get("ids") == list(ids)
    if not fresh and world.is_main:
        with torch.random.fork_rng():
            feats = compute()
        st.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": feats.contiguous()}, str(st) + ".tmp")
        man.with_suffix(".json.tmp").write_text(json.dumps(meta | {"n": len(ids), "dim": feats.shape[1],
                                                                   "ids": list(ids)}) + "\n")
        os.replace(str(st) + ".tmp", st)
        os.replace(man.with_suffix(".json.tmp"), man)
    R.barrier(world)
    feats = load_file(str(st))["features"]
    if json.loads(man.read_text())["ids"] != list(ids) or len(feats) != len(ids):
        raise DataError(f"{st}: the cache does not match its manifest {man}; delete both to recompute")
    return feats


def paired(img_ids, img_feats, txt_ids, txt_feats) -> tuple:
    """Pair image and text rows by id (never by position): -> (ids, img (N, d_v), txt (N, d_t)) in img order."""
    row = {k: i for i, k in enumerate(txt_ids)}
    ids = [k for k in img_ids if k in row]
    if not ids:
        raise DataError("no image id has a caption: the image and text caches do not describe the same pairs")
    at = {k: i for i, k in enumerate(img_ids)}
    return ids, img_feats[[at[k] for k in ids]], txt_feats[[row[k] for k in ids]]

# ----------------------------------------------------------------------------------------------------------
# label fractions and the per-image Dice of a segmentation head (requested for common/data.py / metrics.py)


def dice_per_image(probs, target, threshold: float = 0.5) -> torch.Tensor:
    """(B,) Dice of (probs > threshold) against target > 0.5; an empty target scores 1 if the prediction is empty
    and 0 otherwise (the rule of the Adaptor / MGCA segmentation code)."""
    p, t = (probs.flatten(1) > threshold).float(), (target.flatten(1) > 0.5).float()
    dice = 2 * (p * t).sum(1) / (p + t).sum(1).clamp_min(1e-12)
    return torch.where(t.sum(1) == 0, (p.sum(1) == 0).float(), dice)
