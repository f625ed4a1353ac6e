"""Makes adaptor_backbones.safetensors: the demo's tiny DINOv2 and BERT for adaptor.py, pre-trained offline.

Why: the Adaptor trains between two frozen *pretrained* backbones. Frozen random ones give nearly the same global
feature for every input, and the adaptor then learns nothing (its pre-training loss pinned at ln B). This script
supplies the missing pre-training at demo scale: adaptor.py's tiny DINOv2 (the "tiny" preset, init_random(0)) and
tiny BERT (TINY_BERT, init_random(1), its vocabulary the words of the demo's training captions) learn a symmetric
InfoNCE between the DINOv2 CLS and the BERT pooler output, through two linear heads to 64 dimensions that are
thrown away, on the demo's training pairs (data/demo/reports_train.csv, built by common/demo.py; centre crops at
112, as adaptor.py's classifier sees them).

Both towers trained: AdamW (weight decay 0.1), lr 3e-4 after a 10-step linear warm-up, temperature 0.07, 200
steps of 64 pairs drawn with replacement: what adaptor.py used to run at run time (loss 4.27 -> 3.25). NOTE it
sits at ln(64) for ~90 steps before the collapsed random features separate; lr 1e-3 never leaves that plateau.
Measured, 400 steps (loss 2.57) gave a better adaptor pre-training and classifier (val loss 3.59, accuracy 0.51)
but a worse segmentation (Dice 0.59 vs 0.68), so 200 it stays. One CPU thread, seed 0: about 1 min, the same
tensors on a rerun with the same torch (the header may list its metadata in another order). Stored in fp16, with
the vocabulary in the file's metadata ("words", so the tokenizer always matches the embedding rows): 329k
parameters, 669 KB; adaptor.py reads it into fp32.

    python -m common.demo_weights.make_adaptor_backbones    # rewrites common/demo_weights/adaptor_backbones.safetensors
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import adaptor as A  # noqa: E402
from common import run as R  # noqa: E402
from common.data import Images, read_pairs  # noqa: E402
from common.demo import ensure_demo  # noqa: E402
from common.features import tokenize, word_tokenizer  # noqa: E402
from common.transforms import PadCrop  # noqa: E402

OUT = Path(__file__).with_name("adaptor_backbones.safetensors")
STEPS, BATCH = 200, 64


def main():
    torch.set_num_threads(1)
    root = ensure_demo(REPO / "data" / "demo")
    names, caps = read_pairs(root / "reports_train.csv")
    words = sorted({w for c in caps for w in c.split()})  # what word_tokenizer(caps) makes its vocabulary of
    tok = word_tokenizer(caps, A.MAX_WORDS)
    vision = A.DINOv2(A.VISION_PRESETS["tiny"]["config"]).init_random(seed=0)
    bert = A.BERT(A.BertConfig(vocab_size=tok.get_vocab_size(), **A.TINY_BERT), add_pooler=True).init_random(seed=1)
    print(f"pre-training the demo's tiny DINOv2 + BERT on {len(caps)} pairs ({STEPS} steps)", flush=True)
    torch.manual_seed(0)
    pixels = Images(root, names, PadCrop(112, train=False)).batch(0, len(names))             # (N, 3, 112, 112)
    ids, mask = tokenize(tok, caps)
    heads = nn.ModuleList([nn.Linear(vision.cfg.dim, 64), nn.Linear(bert.cfg.dim, 64)])
    opt = torch.optim.AdamW([*vision.parameters(), *bert.parameters(), *heads.parameters()], lr=3e-4,
                            weight_decay=0.1)
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = 3e-4 * min(1.0, (step + 1) / 10)
        idx = torch.randint(0, len(caps), (BATCH,))
        f = F.normalize(heads[0](A.image_features(vision, pixels[idx])[0]), dim=-1)         # (B, 64)
        t = F.normalize(heads[1](A.text_features(bert, ids[idx], mask[idx])[0]), dim=-1)   # (B, 64)
        logits = f @ t.T / 0.07
        labels = torch.arange(BATCH)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss_value = R.optimizer_step(loss, opt, None, R.World(), step)  # rank 0 alone, no scaler
        if step % 25 == 0 or step == STEPS - 1:
            print(f"step {step}: loss {loss_value:.4f}", flush=True)
    tensors = {"vision." + k: v for k, v in vision.state_dict().items()} | \
        {"text." + k: v for k, v in bert.state_dict().items()}
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(OUT),
              metadata={"made_by": "common/demo_weights/make_adaptor_backbones.py", "steps": str(STEPS),
                        "words": " ".join(words)})
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
