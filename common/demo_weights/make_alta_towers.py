"""Makes alta_towers.safetensors: the demo's tiny ViT + BERT for alta.py, pre-trained offline.

Why: ALTA adapts a frozen *pretrained* MRM ViT and CXR-BERT. The demo has neither, and frozen random towers carry
almost no class signal (zero-shot ACC 0.17-0.19 by seed, chance 0.167), so the adapters would have nothing to
adapt. This script supplies the missing pre-training at demo scale: alta.py's tiny ViT + BERT (ALTA.init_weights(0)
with the "tiny" ViT preset and DEMO_BERT) learn symmetric InfoNCE between encode_image (the current frontal) and
encode_text (the projected CLS) on the demo's image-report pairs (data/demo/reports_train.csv, built by
common/demo.py; training patients only), every tower weight trained; the adapters stay at zero, outside it.

AdamW (weight decay 0.1), lr 3e-4 with a 20-step linear warm-up, batch 32 drawn at random, 200 steps (the steps
alta.py used when it pre-trained them at run time), temperature fixed at 1/0.07. One CPU thread, seed 0: about
30 s, the same tensors on a rerun with the same torch (the header may list its metadata in another order). NOTE
better-aligned towers leave the adapters nothing to add: with a 64-wide ViT, 500 steps gave frozen towers of
zero-shot ACC / AUROC / P@5 0.35 / 0.79 / 0.52, and the demo's adapter training then never beat its first epoch.

Stored in fp16, only what the pre-training trains and alta.py loads: the two encoders and their global projection
heads (plus the untouched MLM head). The MAE decoder is never reached by this loss, so it is left out and alta.py
keeps its random init; the fixed sin-cos table is recomputed, not stored (fp16 would round it). The demo's
WordPiece vocabulary is built from its texts (alta.demo_tokenizer): it is stored in the metadata, and alta.py
refuses the file if the demo's vocabulary differs.

    python -m common.demo_weights.make_alta_towers      # rewrites common/demo_weights/alta_towers.safetensors
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import alta  # noqa: E402
from common import retrieval as RV  # noqa: E402
from common import run as R  # noqa: E402
from common.data import load_image  # noqa: E402
from common.demo import ensure_demo  # noqa: E402
from common.text import tokenize  # noqa: E402

OUT = alta.DEMO_TOWERS
STEPS, BATCH, LR, WARMUP = 200, 32, 3e-4, 20


def pretrain_demo_towers(model: alta.ALTA, tok, root: Path, steps: int = STEPS, max_len: int = 64,
                         batch: int = BATCH):
    """Symmetric InfoNCE between encode_image (current frontal) and encode_text (projected CLS) on
    reports_train.csv, every tower weight trained (adapters stay at zero, outside it). NOTE lr 3e-4 with a short
    warm-up, as for cilmp.py's tiny CLIP (make_cilmp_clip.py): higher rates collapse both towers to one feature."""
    print(f"pre-training the demo's tiny ViT + BERT on {root / 'reports_train.csv'} ({steps} steps)", flush=True)
    torch.manual_seed(0)
    rows = RV.read_rows(root / "reports_train.csv", ["image_path", "report"])
    geo, to_tensor = alta.image_transform(model.cfg.img_size, False)
    loaded = {}

    def pixels(idx):                        # (n, 3, H, W); each image loaded the first time a step draws it
        for i in idx.tolist():
            if i not in loaded:
                loaded[i] = to_tensor(geo(load_image(root / rows[i]["image_path"])))
        return torch.stack([loaded[i] for i in idx.tolist()])

    ids, am = tokenize(tok, [r["report"] for r in rows], max_len)                             # (N, T)
    params = [p for k, p in model.named_parameters() if "adapter" not in k and "pos_embed" not in k]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    prog = R.Progress(steps, "demo towers", every=10.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        idx = torch.randint(0, len(rows), (batch,))
        loss = alta.global_loss(model.encode_image(pixels(idx)), model.encode_text(ids[idx], am[idx]), 1 / 0.07)
        prog.update(1, loss=R.optimizer_step(loss, opt, None, R.World(), step))  # rank 0 alone, no scaler
    return model.eval()


def main():
    torch.set_num_threads(1)
    root = ensure_demo(REPO / "data" / "demo")
    tok = alta.demo_tokenizer(root)
    bert = alta.BertConfig(vocab_size=tok.get_vocab_size(), **alta.DEMO_BERT)
    towers = alta.ALTA(alta.VIT_PRESETS["tiny"], bert, alta.ALTAConfig()).init_weights(0)
    pretrain_demo_towers(towers, tok, root, max_len=alta.DATASETS["demo"]["max_len"])
    tensors = {k: v.half().contiguous() for k, v in towers.state_dict().items() if alta.is_tower_key(k)}
    save_file(tensors, str(OUT), metadata={"made_by": "common/demo_weights/make_alta_towers.py", "steps": str(STEPS),
                                           "vocab": json.dumps(tok.get_vocab(), sort_keys=True)})
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes, {sum(v.numel() for v in tensors.values()):,} parameters)")


if __name__ == "__main__":
    main()
