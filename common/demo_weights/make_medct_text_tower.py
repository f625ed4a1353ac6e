"""Makes medct_text_tower.safetensors: the demo's tiny text tower for medct_lora.py, pre-trained offline.

Why: the demo's tiny CT-CLIP stands in for the real, pretrained one. The real text tower (CXR-BERT) comes from
language pre-training on radiology text and so links a finding's name to its status ("is not present", "No ...").
A tiny randomly initialised BERT trained only contrastively on the demo's reports never learns that link: every
finding's two-prompt score then follows one global "not" / report-length direction, zero-shot AUROC sits near
chance and LoRA cannot raise it (issue 10's measurements). This script supplies the missing language
pre-training at demo scale: medct_lora.py's tiny BERT (the "tiny" preset) learns to read, from its [CLS] state,
whether each of the demo's five findings is present or absent, in two kinds of text drawn fresh each step:

  - reports written by the demo's own generator (common/demo.py: ct_report) for random labels (seed 1000, not
    the demo data's seeds), where an unmentioned finding counts as absent, as in CT-RATE's labels;
  - the zero-shot prompts "{finding} is present." / "{finding} is not present." (30% of the texts), where only
    the named finding is scored.

A linear read-out (5 logits) on [CLS]; AdamW, lr 1e-3, 100 warm-up steps then cosine, batch 64, 600 steps,
one CPU thread, seed 0 (about a minute). The read-out is saved beside the tower (keys "readout.*") so that
tests/test_medct_lora.py can check what the tower reads; medct_lora.py loads only the "text.*" tensors.

    python -m common.demo_weights.make_medct_text_tower      # rewrites common/demo_weights/medct_text_tower.safetensors
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import medct_lora as ML  # noqa: E402
from common.demo import CT_FINDINGS, CT_PREVALENCE, ct_report  # noqa: E402

OUT = Path(__file__).with_name("medct_text_tower.safetensors")
STEPS, BATCH, LR, WARMUP, PROMPT_FRAC = 600, 64, 1e-3, 100, 0.3
SIDES, LOBES = ("right", "left"), ("upper", "middle", "lower")


def random_info(rng):
    """What make_ct would report about the drawn findings (sizes, sides, lobes), drawn without a volume."""
    return dict(nodules=[(str(rng.choice(SIDES)), str(rng.choice(LOBES)), float(rng.integers(3, 15)))
                         for _ in range(int(rng.integers(1, 3)))],
                consolidation=(str(rng.choice(SIDES)), str(rng.choice(LOBES))),
                effusion=(str(rng.choice(("right", "left", "bilateral"))), float(rng.integers(5, 30))))


def sample_texts(rng, n):
    """-> n texts, targets (n, 5) in {0: absent, 1: present}, mask (n, 5): which targets the text states."""
    texts, y, mask = [], torch.zeros(n, len(CT_FINDINGS)), torch.ones(n, len(CT_FINDINGS), dtype=torch.bool)
    for i in range(n):
        if rng.random() < PROMPT_FRAC:
            k, present = int(rng.integers(len(CT_FINDINGS))), bool(rng.random() < 0.5)
            texts.append(ML.prompts_for([CT_FINDINGS[k]])[0 if present else 1])
            y[i, k], mask[i] = float(present), False
            mask[i, k] = True
        else:
            labels = [int(rng.random() < p) for p in CT_PREVALENCE]
            texts.append(ct_report(labels, random_info(rng), rng)[0])
            y[i] = torch.tensor(labels, dtype=torch.float)
    return texts, y, mask


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(1000)
    spec = ML.PRESETS["tiny"]
    tok = ML.load_tokenizer(spec["tokenizer"])
    text = ML.BERT(spec["text"]).init_random(1)
    readout = nn.Linear(spec["text"].dim, len(CT_FINDINGS))
    params = [*text.parameters(), *readout.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    text.train()
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = ML.lr_at(step, STEPS, WARMUP, LR)
        texts, y, mask = sample_texts(rng, BATCH)
        ids, attn = ML.tokenize(tok, texts, spec["max_len"])
        logits = readout(text(ids, attn)[0][:, 0])                                      # (B, 5) from [CLS]
        loss = F.binary_cross_entropy_with_logits(logits[mask], y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    text.eval()
    with torch.no_grad():
        texts, y, mask = sample_texts(np.random.default_rng(2000), 1000)
        ids, attn = ML.tokenize(tok, texts, spec["max_len"])
        right = ((readout(text(ids, attn)[0][:, 0]) > 0).float() == y)[mask].float().mean().item()
    print(f"held-out texts: {100 * right:.1f}% of the stated statuses read right")
    tensors = {f"text.{k}": v for k, v in text.state_dict().items()}
    tensors |= {f"readout.{k}": v for k, v in readout.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT),
              metadata={"made_by": "common/demo_weights/make_medct_text_tower.py", "steps": str(STEPS)})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
