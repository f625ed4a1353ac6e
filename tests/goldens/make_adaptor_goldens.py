"""Make the reference outputs that tests/test_adaptor.py checks adaptor.py against.

Run with the golden environment (the only place transformers is installed), after fetching the official code:

    cd /work/main && /work/venv-gold/bin/python tests/goldens/make_adaptor_goldens.py [OFFICIAL_GIT_DIR]

OFFICIAL_GIT_DIR is a git directory of holajoa/Adaptor-VL-SSL (default: the fetch tool's mirror); the files are
read at commit 2414548 with `git show`, nothing is installed. It writes

    tests/goldens/adaptor_dinov2/     tiny plain Dinov2Model (no registers; HF save_pretrained) + io.safetensors:
                                      last_hidden_state and pooler_output (CLS after the final norm) at the
                                      checkpoint's own grid and at two interpolated grids
    tests/goldens/adaptor_bert/       tiny BertModel with its pooler (save_pretrained: keys without "bert.") + io:
                                      last_hidden_state and pooler_output for a padded batch
    tests/goldens/adaptor_bert_mlm/   tiny BertForMaskedLM (keys "bert." + "cls.", no pooler: CXR-BERT's layout)
    tests/goldens/adaptor_official/   the official Adaptor (models/adaptor.py) with a tiny projection (48, 12 heads,
                                      FF 2048 as hard-coded there), its state_dict under the official key names,
                                      and in eval mode: the pre-training loss and embeddings, the image-only path
                                      (one pooled token and a sequence of patch tokens); plus MGCA's MixedLoss
                                      (10 x focal + "modified" dice) and the segmenter's get_dice on fixed inputs

The official module imports pytorch_lightning (not installed here): it is stubbed with LightningModule = nn.Module,
(save_hyperparameters a no-op), which only drops Lightning's
training plumbing. torchvision is hidden from transformers (the installed torchvision
does not match this torch build, and none of these models needs it). Every parameter is randomised (LayerNorms,
biases, LayerScale, pooler) so that a key-map bug cannot hide behind a default value. fp32, eval mode, CPU.
"""
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

import transformers.utils as _tu
import transformers.utils.import_utils as _iu

for _m in (_tu, _iu):  # transformers would import the broken torchvision for image utilities nobody uses here
    _m.is_torchvision_available = _m.is_torchvision_v2_available = lambda *a, **k: False
sys.modules["torchvision"] = None

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, BertModel, Dinov2Config, Dinov2Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GOLD = ROOT / "tests" / "goldens"
OFFICIAL = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/.mirror/holajoa+Adaptor-VL-SSL/repo")
COMMIT = "2414548"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__,
            "official": f"holajoa/Adaptor-VL-SSL@{COMMIT}"}


def randomise_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name or name.endswith("lambda1"):
                p.copy_(0.7 + 0.1 * torch.randn(p.shape, generator=g))
            elif "LayerNorm.weight" in name or "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def save_io(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "io.safetensors"),
              metadata={"versions": str(VERSIONS)})


def make_dinov2():
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=4,
                       image_size=16, layerscale_value=0.7, attn_implementation="eager")
    model = randomise_(Dinov2Model(cfg), 1).eval()
    out = fresh_dir(GOLD / "adaptor_dinov2")
    model.save_pretrained(out)
    g = torch.Generator().manual_seed(2)
    io = {}
    with torch.no_grad():
        for k, (h, w) in zip("abc", [(16, 16), (24, 24), (20, 28)]):  # 4x4 = the checkpoint's grid, 6x6, 5x7
            x = torch.randn(2, 3, h, w, generator=g)
            o = model(pixel_values=x)
            io |= {f"pixel_values_{k}": x, f"last_hidden_state_{k}": o.last_hidden_state,
                   f"pooler_output_{k}": o.pooler_output}
    save_io(out, io)


def bert_config():
    return BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
                      attn_implementation="eager")


def make_bert():
    model = randomise_(BertModel(bert_config()), 3).eval()
    out = fresh_dir(GOLD / "adaptor_bert")
    model.save_pretrained(out)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 100, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    ids[:, 0] = 2  # a [CLS]-like first token
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    save_io(out, {"input_ids": ids, "attention_mask": mask, "last_hidden_state": o.last_hidden_state,
                  "pooler_output": o.pooler_output})

    mlm = randomise_(BertForMaskedLM(bert_config()), 5).eval()
    out = fresh_dir(GOLD / "adaptor_bert_mlm")
    mlm.save_pretrained(out)
    with torch.no_grad():
        h = mlm.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    save_io(out, {"input_ids": ids, "attention_mask": mask, "last_hidden_state": h})


def official_source(path):
    return subprocess.run(["git", "--git-dir", str(OFFICIAL), "show", f"{COMMIT}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def make_official():
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = type("LightningModule", (nn.Module,), {"save_hyperparameters": lambda self, *a, **k: None})
    sys.modules["pytorch_lightning"] = pl
    ns = {"__name__": "official_adaptor"}
    exec(compile(official_source("models/adaptor.py"), "models/adaptor.py", "exec"), ns)
    seg = {"__name__": "official_seg_loss"}
    exec(compile(official_source("MGCA/mgca/utils/segmentation_loss.py"), "segmentation_loss.py", "exec"), seg)

    torch.manual_seed(6)
    model = ns["Adaptor"](vision_output_dim=40, text_output_dim=32, projection_dim=48, num_layers=2)
    model = randomise_(model, 7).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.6592)
    out = fresh_dir(GOLD / "adaptor_official")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(8)
    img, txt = torch.randn(6, 40, generator=g), torch.randn(6, 32, generator=g)
    patches = torch.randn(2, 5, 40, generator=g)
    with torch.no_grad():
        o = model(image_embeds_raw=img, text_embeds_raw=txt)
        img_only = model(image_embeds_raw=img)
        seq = model(image_embeds_raw=patches)
    logits = torch.randn(3, 8, 8, generator=g) * 2
    target = (torch.rand(3, 8, 8, generator=g) > 0.6).float()
    target[2] = 0  # an empty mask
    mixed = seg["MixedLoss"](alpha=10)(logits, target)
    mixed_orig = seg["MixedLoss"](alpha=10, modified_dice_loss=False)(logits, target)
    focal = seg["FocalLoss"](2.0)(logits, target)
    dice_official = official_get_dice(torch.sigmoid(logits), target)
    save_io(out, {"image_raw": img, "text_raw": txt, "loss": o.loss, "image_embeds": o.image_embeds,
                  "text_embeds": o.text_embeds, "logits_per_text": o.logits_per_text, "image_only": img_only,
                  "patches_raw": patches, "patches_out": seq, "seg_logits": logits, "seg_target": target,
                  "mixed_loss": mixed, "mixed_loss_original_dice": mixed_orig, "focal_loss": focal,
                  "dice_official": torch.tensor(dice_official)})


def official_get_dice(probability, truth, threshold=0.5):
    """models/segmenter.py AdaptorSegmenter.get_dice, whose class imports Lightning: the method body is taken from
    the official file and run on its own."""
    src = official_source("models/segmenter.py")
    start = src.index("    def get_dice(")
    end = src.index("    def configure_optimizers(")
    body = "\n".join(line[4:] for line in src[start:end].splitlines())
    ns = {"torch": torch}
    exec(body, ns)
    return ns["get_dice"](None, probability, truth, threshold)


if __name__ == "__main__":
    make_dinov2()
    make_bert()
    make_official()
    print("goldens written to", GOLD, VERSIONS)
