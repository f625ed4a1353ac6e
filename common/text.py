"""Report text for BERT-style text towers: WordPiece tokenizers, fixed-length tokenization, report cleaning.

    tok = wordpiece_tokenizer("path/to/model")        # the model folder's vocab.txt, lower-cased (BERT, CXR-BERT)
    tok = wordpiece_tokenizer(corpus=reports)         # demo: the specials, single characters and every whole word
    ids, attention_mask = tokenize(tok, texts, 64)    # (N, 64) each: [CLS] words [SEP] [PAD]..., truncated
    shuffle_sentences(report, generator)              # ALTA's sentence split, the sentences in a random order
    gloria_clean(report)                              # GLoRIA's cleaning (its and ALTA's CheXpert 5x200 scripts)
"""
import re

import torch

from common.weights import WeightsError, resolve

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_tokenizer(folder=None, corpus=None):
    """A model's WordPiece (vocab.txt in its folder or HF cache entry), or for the demo a deterministic
    vocabulary built from `corpus`: SPECIALS (ids 0-4), each character alone and as ##continuation, whole words."""
    from tokenizers import BertWordPieceTokenizer
    if folder is not None:
        vocab = resolve(folder) / "vocab.txt"
        if not vocab.is_file():
            raise WeightsError(f"{vocab.parent}: no vocab.txt (the text model's tokenizer) next to the weights")
        return BertWordPieceTokenizer(str(vocab), lowercase=True)
    words = sorted({w for t in corpus for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIALS) + chars + ["##" + c for c in chars] + [w for w in words if w not in chars]
    return BertWordPieceTokenizer({w: i for i, w in enumerate(vocab)}, lowercase=True)


def tokenize(tok, texts, length: int):
    """texts -> ids, attention_mask (N, length) long tensors: [CLS] words [SEP] [PAD]..., truncated to `length`."""
    tok.enable_truncation(length)
    tok.enable_padding(length=length, pad_id=tok.token_to_id("[PAD]"))
    enc = tok.encode_batch(list(texts))
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


# ALTA's training splitter: at whitespace after "." or "?", except after "e.g."-like or "Dr."-like dots
SENTENCE_SPLIT = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s")


def shuffle_sentences(text: str, g: torch.Generator) -> str:
    sentences = SENTENCE_SPLIT.split(text)
    return " ".join(sentences[j] for j in torch.randperm(len(sentences), generator=g).tolist())


def gloria_clean(text: str) -> str:
    """GLoRIA's report cleaning: split at "N." and ".", lower-case \\w+ tokens, ASCII only, drop sentences of
    <= 1 token, join with spaces."""
    out = []
    for sent in (s for part in re.split(r"[0-9]+\.", text.replace("\n", " ")) for s in part.split(".")):
        words = re.findall(r"\w+", sent.replace("\ufffd\ufffd", " ").lower())
        words = [w.encode("ascii", "ignore").decode("ascii") for w in words]
        if len(words) > 1:
            out.append(" ".join(w for w in words if w))
    return " ".join(out)
