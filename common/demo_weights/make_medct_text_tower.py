"""Makes medct_text_tower.safetensors: the demo's tiny text tower for medct_lora.py, pre-trained offline.

Why: the demo's tiny CT-CLIP stands in for the real, pretrained one. The real text tower (CXR-BERT) comes from
language pre-training on radiology text and so links a finding's name to its status ("is not present", "No ...").
A tiny BERT trained only contrastively on the demo's reports never learns that link, and CT-CLIP's zero-shot
score depends on it: finding c is scored along t("c is present.") - t("c is not present."). Measured (issue 10):

  - a random tower: every finding's prompt pair differs along one global "not" / report-length direction, so all
    five findings get the same score, the zero-shot AUROC sits near chance and LoRA cannot raise it;
  - a tower trained with a linear read-out of the five statuses (binary cross-entropy on [CLS]): it read 100% of
    the statuses right, yet the five prompt differences still shared one or two directions (cosine 0.97-0.99),
    because a read-out constrains [CLS] only along its five weight vectors; LoRA then traded one finding for
    another (pleural effusion 1.00 -> 0.32 while cardiomegaly rose).

So the tower learns to place a text's [CLS] state at the sum of its findings' status codes, sum_c E[c, status_c],
with E (5 findings x {absent, present} x D) fixed random vectors: the whole state is pinned, and "c is present."
minus "c is not present." is E[c, 1] - E[c, 0], a direction of finding c's own. Texts are drawn fresh each step:

  - reports written by the demo's own generator (common/demo.py: ct_report) for random labels (seed 1000, not
    the demo data's seeds), where an unmentioned finding counts as absent, as in CT-RATE's labels;
  - the zero-shot prompts "{finding} is present." / "{finding} is not present." (30% of the texts), the other
    findings absent, as a report that does not mention them.

Mean squared error (summed over the D dimensions); AdamW, lr 2e-3, 100 warm-up steps then cosine, batch 64,
1200 steps, one CPU thread, seed 0 (about two minutes). The codes are saved beside the tower (key "status_codes")
so that tests/test_medct_lora.py can check what the tower reads; make_medct_ctclip.py, the next step, loads only
the "text.*" tensors into the demo's tiny CT-CLIP.

    python -m common.demo_weights.make_medct_text_tower      # rewrites common/demo_weights/medct_text_tower.safetensors
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import medct_lora as ML  # noqa: E402
from common.demo import CT_FINDINGS, CT_PREVALENCE, ct_report  # noqa: E402

OUT = Path(__file__).with_name("medct_text_tower.safetensors")
STEPS, BATCH, LR, WARMUP, PROMPT_FRAC = 1200, 64, 2e-3, 100, 0.3
SIDES, LOBES = ("right", "left"), ("upper", "middle", "lower")


def random_info(rng):
    """What make_ct would report about the drawn findings (sizes, sides, lobes), drawn without a volume."""
    return dict(nodules=[(str(rng.choice(SIDES)), str(rng.choice(LOBES)), float(rng.integers(3, 15)))
                         for _ in range(int(rng.integers(1, 3)))],
                consolidation=(str(rng.choice(SIDES)), str(rng.choice(LOBES))),
                effusion=(str(rng.choice(("right", "left", "bilateral"))), float(rng.integers(5, 30))))


def sample_texts(rng, n):
    """-> n texts and their statuses (n, 5) in {0: absent, 1: present}."""
    texts, y = [], torch.zeros(n, len(CT_FINDINGS))
    for i in range(n):
        if rng.random() < PROMPT_FRAC:
            k, present = int(rng.integers(len(CT_FINDINGS))), bool(rng.random() < 0.5)
            texts.append(ML.prompts_for([CT_FINDINGS[k]])[0 if present else 1])
            y[i, k] = float(present)
        else:
            labels = [int(rng.random() < p) for p in CT_PREVALENCE]
            texts.append(ct_report(labels, random_info(rng), rng)[0])
            y[i] = torch.tensor(labels, dtype=torch.float)
    return texts, y


def status_codes(dim: int) -> torch.Tensor:
    """E (5, 2, dim): one fixed random code per finding and status, about unit norm."""
    return torch.randn(len(CT_FINDINGS), 2, dim, generator=torch.Generator().manual_seed(5)) / math.sqrt(dim)


def target(codes: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_c E[c, y_c]: statuses (B, 5) -> the [CLS] state the tower should reach (B, D)."""
    return (codes[:, 0] * (1 - y)[..., None] + codes[:, 1] * y[..., None]).sum(1)


def read_statuses(codes: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """[CLS] states (N, D) -> the statuses (N, 5) whose target is nearest (all 32 combinations tried)."""
    combos = torch.tensor([[(j >> c) & 1 for c in range(len(CT_FINDINGS))] for j in range(2 ** len(CT_FINDINGS))],
                          dtype=torch.float)                                              # (32, 5)
    return combos[torch.cdist(cls, target(codes, combos)).argmin(1)]


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(1000)
    spec = ML.PRESETS["tiny"]
    tok = ML.load_tokenizer(spec["tokenizer"])
    text = ML.BERT(spec["text"]).init_random(1)
    codes = status_codes(spec["text"].dim)
    opt = torch.optim.AdamW(text.parameters(), lr=LR, weight_decay=0.01)
    text.train()
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = ML.lr_at(step, STEPS, WARMUP, LR)
        texts, y = sample_texts(rng, BATCH)
        ids, attn = ML.tokenize(tok, texts, spec["max_len"])
        cls = text(ids, attn)[0][:, 0]                                                 # (B, D)
        loss = (cls - target(codes, y)).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    text.eval()
    with torch.no_grad():
        texts, y = sample_texts(np.random.default_rng(2000), 1000)
        ids, attn = ML.tokenize(tok, texts, spec["max_len"])
        right = (read_statuses(codes, text(ids, attn)[0][:, 0]) == y).float().mean().item()
    print(f"held-out texts: {100 * right:.1f}% of the statuses read right")
    tensors = {f"text.{k}": v for k, v in text.state_dict().items()}
    tensors["status_codes"] = codes
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT),
              metadata={"made_by": "common/demo_weights/make_medct_text_tower.py", "steps": str(STEPS)})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
