"""CT-CLIP goldens for medct_lora.py, computed by CT-CLIP's OWN code (ibrahimethemhamamci/CT-CLIP) at tiny sizes.

NOT part of the runtime. Run in the golden venv (einops and vector-quantize-pytorch==1.1.2 installed there):

    /work/venv-gold/bin/python tests/goldens/make_ctclip.py [--repo PATH_TO_CT-CLIP_GIT]

CT-CLIP commit used: a2a155c601987820433c01db69b64d701d3d229d (2025-07-18, "Merge pull request #52").
The official files are read from that commit with `git show` (a bare clone or a checkout both work) into a
temporary folder and imported from there. Patches applied to make them run on CPU, and nothing else:
  - every `torch.device('cuda')` (hard-coded in ctvit.py and attention.py) -> `torch.device('cpu')`;
  - `beartype` is not installed: a stub whose `beartype` decorator returns the function unchanged
    (it only type-checks arguments);
  - `torchvision` is stubbed (it is imported at module level for the discriminator / VGG loss, never used by
    the encoder; the golden venv's torchvision build does not load against its torch);
  - CTCLIP.__init__ loads the CXR-BERT tokenizer from the Hub for a helper method the forward never calls:
    ct_clip.ct_clip.BertTokenizer is pointed at the tiny local vocabulary instead (no network).
The model code itself (CTViT, Transformer, PEG, Attention, ContinuousPositionBias, VectorQuantize 1.1.2,
CTCLIP) runs unmodified.

Writes tests/goldens/ctclip_tiny/: model.safetensors (the official CTCLIP state_dict, keys exactly as
CT-CLIP_v2.pt names them, incl. the *_extra copies and the VQ buffers), config.json (our tiny sizes), and
io.safetensors (see tests/goldens/ctclip_tiny/README.md).
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

COMMIT = "a2a155c601987820433c01db69b64d701d3d229d"
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "goldens" / "ctclip_tiny"
FILES = {  # path in the CT-CLIP repo -> module path in the temporary import folder
    "transformer_maskgit/transformer_maskgit/attention.py": "transformer_maskgit/attention.py",
    "transformer_maskgit/transformer_maskgit/ctvit.py": "transformer_maskgit/ctvit.py",
    "CT_CLIP/ct_clip/ct_clip.py": "ct_clip/ct_clip.py",
    "CT_CLIP/ct_clip/mlm.py": "ct_clip/mlm.py",
    "CT_CLIP/ct_clip/visual_ssl.py": "ct_clip/visual_ssl.py",
}
TINY = dict(dim=32, codebook_size=64, image_size=32, patch_size=8, temporal_patch_size=4, spatial_depth=2,
            temporal_depth=2, dim_head=8, heads=4)
FRAMES = 24          # 6 token slices x 4 x 4: t != h on purpose, so the temporal PEG reshape is not a relabelling


def stub_modules():
    bt = types.ModuleType("beartype")
    bt.beartype = lambda fn: fn
    sys.modules["beartype"] = bt
    tv = types.ModuleType("torchvision")
    tv.transforms, tv.utils = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.utils")
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.utils": tv.utils})


def import_official(repo: Path, tmp: Path):
    for src, dst in FILES.items():
        text = subprocess.run(["git", "--git-dir", str(repo), "show", f"{COMMIT}:{src}"], check=True,
                              capture_output=True, text=True).stdout
        text, n = re.subn(r"torch\.device\(\s*'cuda'\s*\)", "torch.device('cpu')", text)
        (tmp / dst).parent.mkdir(parents=True, exist_ok=True)
        (tmp / dst).write_text(text)
        print(f"{src}: {n} cuda device(s) patched to cpu")
    for pkg in ("transformer_maskgit", "ct_clip"):
        (tmp / pkg / "__init__.py").write_text("")  # the official __init__s import the whole training stack
    sys.path.insert(0, str(tmp))
    import ct_clip.ct_clip as official
    from transformers import BertTokenizer
    tiny = BertTokenizer.from_pretrained(ROOT / "tests" / "goldens" / "medct_bert_mlm")
    official.BertTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tiny)
    from ct_clip.ct_clip import CTCLIP
    from transformer_maskgit.ctvit import CTViT
    return CTViT, CTCLIP


def randomise(model: torch.nn.Module, seed: int):
    """Default init, then norm gains 1 + 0.2 N, biases and q/k scales perturbed, codebook rows rescaled (so the
    raw stored row differs from its normalised copy): a dropped, swapped or mis-normalised tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (".3.0.weight" in name) or re.search(r"to_patch_emb\.[13]\.weight", name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("q_scale", "k_scale")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "temperature":
                p.fill_(1.3)
        emb = model.visual_transformer.vq._codebook.embed
        emb.mul_(torch.rand(emb.shape[:-1] + (1,), generator=g) + 0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default="/work/.mirror/ibrahimethemhamamci+CT-CLIP/repo",
                    help="git dir of a CT-CLIP clone that has commit " + COMMIT)
    args = ap.parse_args()
    sys.modules["torchvision"] = None          # hidden while transformers probes for it (see the docstring)
    import transformers
    from transformers import BertModel, BertTokenizer  # noqa: F401  (resolve the lazy imports now)
    stub_modules()
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        CTViT, CTCLIP = import_official(Path(args.repo), Path(tmp))
        torch.manual_seed(0)
        vit = CTViT(**TINY)
        bert_dir = ROOT / "tests" / "goldens" / "medct_bert"      # the tiny HF BERT of make_medct_goldens.py
        bert = transformers.BertModel.from_pretrained(bert_dir)
        bert.config._attn_implementation = "eager"
        h = TINY["image_size"] // TINY["patch_size"]
        clip = CTCLIP(image_encoder=vit, text_encoder=bert, dim_image=h * h * TINY["dim"], dim_text=32,
                      dim_latent=16, extra_latent_projection=False, use_mlm=False,
                      downsample_image_embeds=False, use_all_token_embeds=False)
        randomise(clip, 1)
        clip.eval()

        g = torch.Generator().manual_seed(2)
        video = torch.randn(2, 1, FRAMES, TINY["image_size"], TINY["image_size"], generator=g)
        io = {"video": video}
        ff_io = []
        hooks = [layer[3].register_forward_hook(lambda m, i, o: ff_io.append(i[0] + o))
                 for tr in (vit.enc_spatial_transformer, vit.enc_temporal_transformer) for layer in tr.layers]
        with torch.no_grad():
            tokens = vit.to_patch_emb(video)                                     # (2, 6, 4, 4, 32)
            io["patch_emb"] = tokens
            io["rel_pos_bias"] = vit.spatial_rel_pos_bias(h, h)
            io["encoded"] = vit.encode(tokens)                                   # before the VQ
            for i, t in enumerate(ff_io[:TINY["spatial_depth"]]):
                io[f"spatial_layer_{i}"] = t                                     # ((b t), (h w), d)
            for i, t in enumerate(ff_io[TINY["spatial_depth"]:]):
                io[f"temporal_layer_{i}"] = t                                    # ((b h w), t, d)
            ff_io.clear()
            io["vq_tokens"] = vit(video, return_encoded_tokens=True)             # (2, 6, 4, 4, 32)
            io["vq_ids"] = vit(video, return_only_codebook_ids=True)             # (2, 96)
            for hk in hooks:
                hk.remove()

            tok = transformers.BertTokenizer.from_pretrained(ROOT / "tests" / "goldens" / "medct_bert_mlm")
            reports = ["Cardiomegaly is present. No pleural effusion.", "A 4 mm solid nodule is seen."]
            text = tok(reports, return_tensors="pt", padding="max_length", truncation=True, max_length=24)
            text_lat, image_lat, _ = clip(text, video, device=torch.device("cpu"), return_latents=True)
            io.update(text_ids=text["input_ids"], text_mask=text["attention_mask"], text_latents=text_lat,
                      image_latents=image_lat)
            io["loss"] = clip(text, video, device=torch.device("cpu"), return_loss=True).reshape(1)
            prompts = tok(["Cardiomegaly is present.", "Cardiomegaly is not present."], return_tensors="pt",
                          padding="max_length", truncation=True, max_length=24)
            io["prompt_ids"], io["prompt_mask"] = prompts["input_ids"], prompts["attention_mask"]
            io["zero_shot_logits"] = clip(prompts, video[:1], device=torch.device("cpu"))   # exp(T) cos, (2,)
        OUT.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
        save_file(sd, OUT / "model.safetensors")
        save_file({k: v.contiguous() for k, v in io.items()}, OUT / "io.safetensors")
        (OUT / "config.json").write_text(json.dumps(dict(TINY, frames=FRAMES, dim_latent=16, commit=COMMIT),
                                                    indent=1) + "\n")
        print(f"{len(sd)} keys; io: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in io.items()))


if __name__ == "__main__":
    main()
