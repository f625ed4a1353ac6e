"""Makes cilmp_clip.safetensors: the demo's tiny CLIP for cilmp.py, pre-trained offline.

Why: CILMP prompt-tunes a frozen *pretrained* CLIP. Prompt tuning a frozen random one learns nothing: a random ViT
maps every image to nearly the same feature (mean cosine 0.999 between demo images). This script supplies the
missing pre-training at demo scale: cilmp.py's tiny CLIP (the "tiny" preset, init_random(0)) learns CLIP's own
symmetric InfoNCE on the demo's image-report pairs (data/demo/reports_train.csv, built by common/demo.py; training
patients only), so the frozen tiny CLIP knows that "dark, irregular" looks dark and irregular, as a real CLIP
roughly does.

AdamW (weight decay 0.1), one-cycle schedule to lr 3e-4 with 10% warm-up, batch 64 (the last partial batch of an
epoch dropped, epochs back to back), 400 steps, reports cut at 48 tokens, CILMP's training augmentation, the
temperature learned from 1/0.07 and clamped at 100, then set to 100 (what real CLIP ends at; CILMP keeps it
frozen). One CPU thread, seed 0: about 1.5 min, the same bytes on a rerun with the same torch. Stored in fp16
(230k parameters, 470 KB); cilmp.py reads it into fp32.

    python -m common.demo_weights.make_cilmp_clip      # rewrites common/demo_weights/cilmp_clip.safetensors
"""
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import cilmp  # noqa: E402
from common import run as R  # noqa: E402
from common.data import ImageReportDataset, bpe_tokenizer, make_loader  # noqa: E402
from common.demo import ensure_demo  # noqa: E402
from common.transforms import CLIP_MEAN, CLIP_STD, train_transform  # noqa: E402

OUT = Path(__file__).with_name("cilmp_clip.safetensors")
STEPS, BATCH, LR, REPORT_LEN = 400, 64, 3e-4, 48


def tokenize(tok, texts, context_length: int):
    """CLIP-style: [SOS] ... [EOT], truncated to context_length (EOT kept last), zero-padded -> (N, T)."""
    ids = [e.ids[:context_length - 1] + e.ids[-1:] if len(e.ids) > context_length else e.ids
           for e in tok.encode_batch(list(texts))]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
    return out


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = bpe_tokenizer(REPO / "common" / "tokenizers" / "clip_tiny.json")
    clip = cilmp.CLIP(replace(cilmp.CLIP_PRESETS["tiny"]["config"], vocab_size=tok.get_vocab_size())).init_random(0)
    root = ensure_demo(REPO / "data" / "demo")
    ds = ImageReportDataset(root, root / "reports_train.csv", train_transform(clip.cfg.image_size, CLIP_MEAN, CLIP_STD))
    loader = make_loader(ds, BATCH, shuffle=True, drop_last=True, seed=0)
    clip.logit_scale.data.fill_(math.log(1 / 0.07))
    # NOTE lr 1e-3 without warm-up collapses both towers to one constant feature within 5 steps (loss pinned at
    # ln B); 3e-4 with a short warm-up does not.
    opt = torch.optim.AdamW(clip.parameters(), lr=LR, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    batches = (b for _ in itertools.count() for b in loader)  # epochs back to back, STEPS batches in all
    for step, b in zip(range(STEPS), batches):
        f = F.normalize(clip.encode_image(b["image"]), dim=-1)                              # (B, E)
        t = F.normalize(clip.encode_text(tokenize(tok, b["report"], REPORT_LEN)), dim=-1)   # (B, E)
        logits = clip.logit_scale.exp() * f @ t.T
        labels = torch.arange(len(f))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss_value = R.optimizer_step(loss, opt, None, R.World(), step)
        sched.step()
        clip.logit_scale.data.clamp_(max=math.log(100))
        if step % 25 == 0 or step == STEPS - 1:
            print(f"step {step}: loss {loss_value:.4f}", flush=True)
    clip.logit_scale.data.fill_(math.log(100))
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, str(OUT),
              metadata={"made_by": "common/demo_weights/make_cilmp_clip.py", "steps": str(STEPS)})
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
