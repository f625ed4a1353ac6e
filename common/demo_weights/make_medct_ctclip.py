"""Makes medct_ctclip.safetensors: the demo's tiny CT-CLIP for medct_lora.py, pre-trained offline.

Why: MedCT-VLM adds LoRA to a *pretrained* CT-CLIP. LoRA on a frozen random network has nothing to adapt, so the
demo's tiny CT-CLIP (medct_lora.py's "tiny" preset) gets a short CT-CLIP training of its own here, once:

  - the text tower starts from medct_text_tower.safetensors (make_medct_text_tower.py: language pre-training at
    demo scale, so that each finding's two prompts differ along a direction of its own) and stays locked, as LiT
    locks a pretrained tower. Trained along, 200 steps of report-level contrast pull the findings' prompt
    directions together again (largest cosine between two findings 0.93 instead of 0.29) and the baseline reads
    less (zero-shot mean AUROC 0.616 instead of 0.731, cardiomegaly 0.59 instead of 1.00; issue 10);
  - everything else trains: the CTViT (init_random(0)), both latent projections and the temperature (from CLIP's
    1/0.07), with CT-CLIP's symmetric InfoNCE on the demo's 225 training pairs (Findings, data/demo/ct from
    common/demo.py; the validation share medct_lora.py holds out for thresholds is left out), and the codebook
    moved by the official train-mode EMA rule (vector-quantize-pytorch 1.1.2: decay 0.8, dead codes replaced by
    random batch vectors), as CT-CLIP itself was trained. medct_lora.py never moves the codebook (CosineVQ);
  - Adam, lr 2e-3, 20 warm-up steps then cosine, batch 16, 200 steps: brief on purpose, so that the zero-shot
    baseline leaves LoRA room (mean AUROC 0.731 before LoRA; pleural effusion and cardiomegaly 1.00, the other
    three 0.47-0.67).

One CPU thread, seed 0, about 15 s; stored in fp32 (the VQ's argmax is sensitive to rounding). Committing the
result, rather than pre-training at run time, gives every machine the same "pretrained" model: with two threads
instead of one the same recipe gave a baseline of 0.716 instead of 0.731.

    python -m common.demo_weights.make_medct_ctclip      # rewrites common/demo_weights/medct_ctclip.safetensors
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import medct_lora as ML  # noqa: E402
from common import run as R  # noqa: E402

TOWER = Path(__file__).with_name("medct_text_tower.safetensors")
STEPS, BATCH, LR = 200, 16, 2e-3


@torch.no_grad()
def ema_update_(codebook: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, decay: float = 0.8):
    """The official train-mode codebook update, in place on codebook (K, D): each used code moves toward the
    normalised mean of its vectors, e <- lerp(e, mean, 1 - decay); codes no vector chose are replaced by random
    batch vectors (the official dead-code expiry)."""
    flat = F.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)                     # (n, D)
    onehot = F.one_hot(ids.reshape(-1), codebook.shape[0]).float()                       # (n, K)
    bins = onehot.sum(0)
    mean = F.normalize(onehot.T @ flat / bins.clamp(min=1)[:, None], dim=-1)           # (K, D)
    codebook.lerp_(torch.where((bins == 0)[:, None], codebook, mean), 1 - decay)
    dead = bins == 0
    codebook[dead] = flat[torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)]


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = ML.parse_args([])                                # the demo recipe: its data and validation share
    spec = ML.PRESETS["tiny"]
    tok = ML.load_tokenizer(spec["tokenizer"])
    train_ds = ML.build_data(args)[0]
    model = ML.CTCLIP(spec["vision"], spec["text"], spec["latent"])
    model.visual.init_random(0)
    tower = load_file(str(TOWER))
    R.load_tensors(model.text, {k[5:]: v for k, v in tower.items() if k.startswith("text.")}, str(TOWER),
                   required=model.text.state_dict())
    model.temperature.data.fill_(math.log(1 / 0.07))
    model.text.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    world, step = R.World(), 0
    print(f"pre-training the tiny demo CT-CLIP on {len(train_ds)} volume-report pairs ({STEPS} steps)")
    progress = R.Progress(STEPS, "ct-clip pretrain", every=10.0)
    model.train()
    model.text.eval()                                                   # locked: no dropout either
    while step < STEPS:
        for idx in R.epoch_batches(len(train_ds), BATCH, 0, step, world):
            for g in opt.param_groups:
                g["lr"] = ML.lr_at(step, STEPS, STEPS // 10, LR)
            items = [train_ds[i] for i in idx]
            ids, mask = ML.tokenize(tok, [it["report"] for it in items], spec["max_len"])
            vol = torch.stack([it["volume"] for it in items])
            tokens = model.visual.encode(model.visual.patch_embed(vol))                  # (B, t, h, w, D)
            q, codes = model.visual.vq(tokens)
            img = F.normalize(model.to_visual_latent(q.mean(1).flatten(1)), dim=-1)
            loss = ML.contrastive_loss(img, model.encode_text(ids, mask), model.temperature.exp(), gather=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update_(model.visual.vq.embed[0], tokens.detach(), codes)
            step += 1
            progress.update(1, loss=loss.item())
            if step == STEPS:
                break
    out = Path(__file__).with_name("medct_ctclip.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"made_by": "common/demo_weights/make_medct_ctclip.py", "steps": str(STEPS)})
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
