"""Generate the tiny CXR-BERT-style WordPiece vocabulary and the transformers BERT goldens for medct_lora.py.

NOT part of the runtime; needs `transformers` (the golden venv only):

    /work/venv-gold/bin/python tests/goldens/make_medct_goldens.py

Writes, deterministically (fixed seeds, no downloads):
  common/tokenizers/bert_tiny_vocab.txt   lower-cased WordPiece vocabulary (the vocab.txt format of CXR-BERT)
  tests/goldens/medct_bert/               tiny random HF BertModel with pooler, saved by transformers 5
                                          (config.json without position_embedding_type) + io.safetensors
  tests/goldens/medct_bert_mlm/           the same encoder weights as a BertForMaskedLM ("bert." prefix, MLM head,
                                          NO pooler), with a transformers-4.x style config.json (the layout of
                                          microsoft/BiomedVLP-CXR-BERT-specialized: position_embedding_type etc.)
See tests/goldens/README.md for what each tensor is.
"""
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

# torchvision 0.28.0 (installed into the golden venv for another script) fails to load its compiled ops against
# this torch ("operator torchvision::nms does not exist"), and transformers imports it when it is present. BERT
# needs none of it: hide it.
sys.modules.setdefault("torchvision", None)
import transformers  # noqa: E402
from safetensors.torch import save_file
from tokenizers import BertWordPieceTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from common.demo import ct_report  # noqa: E402  (the demo's report writer: the words the demo will tokenize)

VOCAB = ROOT / "common" / "tokenizers" / "bert_tiny_vocab.txt"
GOLD = ROOT / "tests" / "goldens"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

CT_RATE_FINDINGS = [  # CT-CLIP's order (scripts/zero_shot.py)
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]
PROSE = """
Trachea and both main bronchi are patent. No occlusive pathology was detected in the lumen.
Mediastinal structures cannot be evaluated optimally because contrast material was not given.
Heart contour and size are normal. Pericardial effusion-thickening was not observed.
Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.
No lymph node was observed in the mediastinum and hilar regions in pathological size and appearance.
When examined in the lung parenchyma window, there are ground-glass opacities and reticulation in both lungs.
There are atelectatic changes and sequelae changes in both lungs. Nodules were observed in the upper lobes.
Interlobular septal thickening and peribronchial thickening are seen. Mosaic attenuation pattern is present.
Bronchiectasis is seen in the lower lobes. There is a hiatal hernia. Coronary artery calcifications are seen.
Upper abdominal organs included in the sections are normal. Bone structures are natural. No lytic lesion.
"""


def corpus() -> list[str]:
    """Lines the vocabulary is built from: demo CT reports of every kind, the CT-RATE findings, the zero-shot
    prompts of both CT-CLIP scripts, and some CT-RATE-style prose."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(400):
        labels = [int(b) for b in rng.integers(0, 2, 5)]
        info = dict(nodules=[(str(rng.choice(["left", "right"])), str(rng.choice(["upper", "lower"])),
                              float(rng.uniform(2, 6)))] * int(rng.integers(1, 3)),
                    consolidation=(str(rng.choice(["left", "right"])), str(rng.choice(["upper", "lower"]))),
                    effusion=(str(rng.choice(["left", "right", "bilateral"])), float(rng.uniform(5, 15))))
        lines += list(ct_report(labels, info, rng))
    for p in CT_RATE_FINDINGS + ["Lung nodule", "Pleural effusion", "Emphysema", "Consolidation", "Cardiomegaly"]:
        lines += [f"{p} is present.", f"{p} is not present.", f"There is {p}.", f"There is no {p}."]
    return lines + [s for s in PROSE.strip().splitlines()]


def build_vocab(lines: list[str]) -> list[str]:
    """Specials, every character (alone and as a ##continuation), then every word seen twice or more by frequency
    (ties alphabetical), so the WordPiece tokenizer never needs [UNK] on the corpus and whole words are 1 token."""
    pre = BertWordPieceTokenizer(lowercase=True)._tokenizer  # BERT's normaliser + pre-tokenizer, no vocab needed
    words = Counter()
    for line in lines:
        text = pre.normalizer.normalize_str(line)
        words.update(w for w, _ in pre.pre_tokenizer.pre_tokenize_str(text))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:-?!()%/"))
    frequent = sorted((w for w, n in words.items() if n >= 2 and len(w) > 1), key=lambda w: (-words[w], w))
    return SPECIALS + chars + ["##" + c for c in chars] + frequent


def tiny_bert_config(vocab_size: int) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                                   layer_norm_eps=1e-12, hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.25,
                                   pad_token_id=0)


def randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """LayerNorm weights 1 + 0.2 N(0,1), all biases 0.1 N(0,1): a swapped or dropped key then changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_bert_goldens() -> None:
    VOCAB.parent.mkdir(parents=True, exist_ok=True)
    VOCAB.write_text("\n".join(build_vocab(corpus())) + "\n")
    vocab = VOCAB.read_text().splitlines()
    ours = BertWordPieceTokenizer(str(VOCAB), lowercase=True)        # what medct_lora.py uses at run time
    # NOTE transformers 5 ignores BertTokenizer(vocab_file=...) without a word (every token becomes [UNK]);
    # from_pretrained on a folder holding vocab.txt is the path CT-CLIP takes with CXR-BERT's folder.
    tok_dir = GOLD / "medct_bert_mlm"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok_dir.mkdir(parents=True)
    shutil.copy(VOCAB, tok_dir / "vocab.txt")
    hf_tok = transformers.BertTokenizer.from_pretrained(tok_dir, do_lower_case=True)  # CT-CLIP's tokenizer class
    texts = ["Cardiomegaly is present.", "Pleural effusion is not present.",
             "A 4 mm solid nodule is seen in the upper lobe of the left lung. Xylophone?"]
    batch = hf_tok(texts[:2] + [(texts[2], "No emphysema.")], padding=True, return_tensors="pt")
    for i, t in enumerate(texts):
        ids = ours.encode(t).ids
        assert ids == hf_tok(t)["input_ids"], (t, ids)
    assert ours.encode(texts[2], "No emphysema.").ids == batch["input_ids"][2][batch["attention_mask"][2] == 1].tolist()
    assert int(batch["token_type_ids"].sum()) > 0 and int((batch["attention_mask"] == 0).sum()) > 0

    torch.manual_seed(1234)
    cfg = tiny_bert_config(len(vocab))
    cfg._attn_implementation = "eager"  # the reference math: additive mask + softmax (not SDPA, which ours uses)
    model = transformers.BertModel(cfg, add_pooling_layer=True).eval()
    randomise_norms_and_biases(model, 1235)
    out = GOLD / "medct_bert"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        o = model(**batch)
    io = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              token_type_ids=batch["token_type_ids"], last_hidden_state=o.last_hidden_state,
              pooler_output=o.pooler_output)
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")

    mlm_dir = GOLD / "medct_bert_mlm"  # same encoder, BertForMaskedLM layout, transformers-4.x style config
    mlm = transformers.BertForMaskedLM(cfg).eval()
    missing, unexpected = mlm.bert.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected == ["pooler.dense.weight", "pooler.dense.bias"], (missing, unexpected)
    mlm.save_pretrained(mlm_dir, safe_serialization=True)
    with torch.no_grad():
        assert torch.equal(mlm.bert(**batch).last_hidden_state, o.last_hidden_state)
    hf4 = {  # keys as transformers 4.x writes them (CXR-BERT's config.json has these plus its own extras)
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.25, "classifier_dropout": None,
        "gradient_checkpointing": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.25, "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
        "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0,
        "position_embedding_type": "absolute", "projection_size": 128, "torch_dtype": "float32",
        "transformers_version": "4.27.4", "type_vocab_size": 2, "use_cache": True, "vocab_size": len(vocab)}
    (mlm_dir / "config.json").write_text(json.dumps(hf4, indent=2) + "\n")
    v5 = json.loads((out / "config.json").read_text())
    assert "position_embedding_type" not in v5, "expected the transformers 5 layout"
    print(f"bert: vocab {len(vocab)}, keys {len(model.state_dict())}, transformers {transformers.__version__}")


if __name__ == "__main__":
    make_bert_goldens()
