"""Make the reference outputs that tests/test_cleft.py checks cleft.py against.

Run with the golden environment (the only place transformers and peft are installed):

    cd /work/main && /work/venv-gold/bin/python tests/goldens/make_cleft_goldens.py

It writes
    common/tokenizers/gpt2_tiny.json   byte-level BPE trained on a small medical corpus, <|endoftext|> = bos = eos = pad
    tests/goldens/cleft_dinov2/        tiny Dinov2WithRegistersModel (HF save_pretrained) + io.safetensors
    tests/goldens/cleft_dinov2_plain/  tiny Dinov2Model (no registers; pos-embed resize without antialias) + io
    tests/goldens/cleft_gpt2/          tiny GPT2Model, plain attention scaling, saved with the legacy attn.bias
                                       buffers that the OpenAI-converted `gpt2` files still carry
    tests/goldens/cleft_gpt2_scaled/   tiny GPT2LMHeadModel with scale_attn_by_inverse_layer_idx=True (BioMedLM's
                                       setting), keys prefixed "transformer." as in BioMedLM's files
    tests/goldens/cleft_gpt2_upcast/   tiny GPT2Model with reorder_and_upcast_attn=True (HF's fp32-score path)
    tests/goldens/cleft_{lora,ia3,prefix}/  peft adapters (peft save_pretrained) on top of cleft_gpt2_scaled + io

Everything is fp32, eval mode (dropout off), eager attention, fixed seeds. Every parameter is randomised
(LayerNorm weights and biases, LayerScale, biases, register tokens, LoRA B, IA3 vectors, prefix) so that a key-map
bug cannot hide behind a default value of 0 or 1. The versions used are stored in each io.safetensors' metadata (key "versions").
"""
import json
import os
import shutil
import sys
from pathlib import Path

sys.modules.setdefault("torchvision", None)  # not needed; a torchvision built for another torch breaks transformers
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[2]
GOLD = ROOT / "tests" / "goldens"
TOKENIZER_PATH = ROOT / "common" / "tokenizers" / "gpt2_tiny.json"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
EOS = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------------------
# tokenizer


def corpus():
    """A few hundred lines of the text the demo and tests feed the tiny GPT-2: CheXpert captions, EMBED prompts, the
    skin-lesion demo vocabulary. Built from fixed lists so the trained merges are reproducible."""
    findings = ["no finding", "enlarged cardiomediastinum", "cardiomegaly", "lung opacity", "lung lesion", "edema",
                "consolidation", "pneumonia", "atelectasis", "pneumothorax", "pleural effusion", "pleural other",
                "fracture", "support devices"]
    lines = []
    for i, f in enumerate(findings):
        lines.append(f"this is a chest x ray of a patient with {f}")
        lines.append(f"This is a chest X ray of a patient with {f} and {findings[(i + 3) % len(findings)]}")
        lines.append(f"Findings: {f}. Impression: {findings[(i + 5) % len(findings)]}.")
    lines += ["no acute cardiopulmonary process.", "heart size is normal. lungs are clear.",
              "there is a small left pleural effusion with adjacent atelectasis.",
              "mild pulmonary edema and cardiomegaly.", "right lower lobe consolidation concerning for pneumonia.",
              "no pneumothorax. support devices in place.", "this is a chest x ray of a patient with no findings"]
    birads = [(0, "additional imaging required"), (1, "negative"), (2, "benign finding"),
              (3, "probably benign finding"), (4, "suspicious abnormality"), (5, "highly suggestive of malignancy"),
              (6, "known biopsy-proven malignancy")]
    for k, d in birads:
        lines.append(f"this is a breast 2d full-field digital mammogram of a patient with birads score {k}: {d}.")
    density = ["almost entirely fat", "scattered fibroglandular densities", "heterogeneously dense", "extremely dense"]
    for k, d in enumerate(density, 1):
        lines.append(f"this is a breast 2d full-field digital mammogram of a patient with breast tissue density {k}: {d}.")
    colours = ["dark", "brown", "black", "pink", "red", "tan"]
    borders = ["irregular", "smooth"]
    sizes = ["large", "small"]
    textures = ["speckled", "uniform"]
    lesions = ["melanoma", "nevus", "basal cell carcinoma", "seborrheic keratosis", "dermatofibroma", "vascular lesion",
               "actinic keratosis"]
    for i, les in enumerate(lesions):
        for j, c in enumerate(colours):
            b, s, t = borders[(i + j) % 2], sizes[(i * j) % 2], textures[(i + 2 * j) % 2]
            lines.append(f"a {s} {c} {t} lesion with {b} borders, a photo of {les}.")
        lines.append(f"a dermoscopy image of {les}")
    # the demo's reports and class descriptions (common/demo.py), so demo captions stay short in tokens
    heads = ["Clinical photograph shows", "There is", "Image demonstrates"]
    sizes2 = ["large", "moderately large", "small", "medium-sized"]
    colours2 = ["black", "dark brown", "brown", "tan", "pink", "red", "purple"]
    what = ["lesion", "pigmented lesion", "skin lesion"]
    borders2 = ["with an irregular, notched border", "with a possibly irregular border",
                "with a smooth, well-defined border"]
    textures2 = ["and a speckled, variegated texture", "and a slightly mottled texture", "and a uniform texture"]
    vessels = ["Red branching vessels are visible.", "Possible fine red vessels.", "No vessels are seen."]
    impress = ["Appearance is most consistent with {}.", "Findings suggest {}.", "Impression: {}."]
    for i in range(84):
        les = lesions[i % 6]
        line = (f"{heads[i % 3]} a {sizes2[i % 4]}, {colours2[i % 7]} {what[(i // 3) % 3]}"
                + (f" measuring about {4 + i % 5} mm " if i % 2 else " ") + f"{borders2[(i // 2) % 3]} "
                + f"{textures2[(i // 5) % 3]}. {vessels[(i // 7) % 3]}")
        if i % 4 == 0:
            line += f" Compared with the prior image the lesion has enlarged by about {10 + i % 30}%"
            line += " and its border has become more irregular." if i % 8 == 0 else "."
        lines.append(line + " " + impress[i % 3].format(les))
    lines += ["a large dark brown or black lesion, an irregular, notched border, a speckled, variegated texture "
              "with several shades", "a small, round brown lesion, a smooth, regular border, a uniform texture",
              "a pink, pearly lesion, visible red branching vessels, a fairly smooth border",
              "a tan to brown, stuck-on lesion, a speckled, crumbly texture, a moderately irregular border",
              "a small pink or brown nodule, a smooth border, a uniform texture",
              "a red or purple lesion, a smooth, round border, a small to medium size"]
    return lines


def train_tokenizer(path, vocab_size=1024):
    """Byte-level BPE exactly in GPT-2's format (ByteLevel pre-tokenizer, decoder and post-processor, no unk), then
    <|endoftext|> appended as the LAST id, as in GPT-2 (50256) and BioMedLM (28895)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([EOS])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


# ----------------------------------------------------------------------------------------------------------
# helpers


def randomise_(model, seed):
    """Overwrite every parameter with non-trivial random values: LayerNorm weight ~ 1 +- 0.2, LayerScale ~ 0.5 +- 0.3,
    everything else (weights, biases, tokens, embeddings) ~ N(0, 0.15^2) -- large enough that attention is peaked,
    so a wrong mask or position shows up well above 1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "lambda1" in name:
                p.copy_(0.5 + 0.3 * r)
            elif p.ndim == 1 and any(s in name for s in ("norm", "ln_", "layernorm")) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.15 * r)


def fresh_dir(path):
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_io(path, tensors):
    # one metadata entry: safetensors writes a multi-key metadata dict in hash order, which changes run to run
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path / "io.safetensors"),
              metadata={"versions": json.dumps(VERSIONS, sort_keys=True)})


def gpt2_inputs(tok, T=16):
    """Right-padded token ids + mask, the way cleft.py tokenises captions: no bos, pad = eos. The last caption is cut
    to fill all T tokens (no pad at all), the edge case of CLEFT's pooling."""
    eos = tok.token_to_id(EOS)
    texts = ["this is a chest x ray of a patient with edema",
             "a small pink speckled lesion with smooth borders, a photo of nevus.",
             "cardiomegaly",
             "this is a breast 2d full-field digital mammogram of a patient with birads score 4: suspicious abnormality."]
    ids = torch.full((len(texts), T), eos, dtype=torch.long)
    mask = torch.zeros((len(texts), T), dtype=torch.long)
    for i, t in enumerate(texts):
        e = tok.encode(t).ids[:T]
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    assert mask[-1].all() and not mask[2].all()
    return ids, mask


# ----------------------------------------------------------------------------------------------------------
# DINOv2 with registers


def make_dinov2():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                    patch_size=4, image_size=16, num_register_tokens=4, layerscale_value=0.7,
                                    layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                                    attn_implementation="eager")
    model = Dinov2WithRegistersModel(cfg).eval()
    randomise_(model, seed=1)
    out = fresh_dir(GOLD / "cleft_dinov2")
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(2)
    io = {}
    # 24x24 -> 6x6 grid (checkpoint grid 4x4) and 20x28 -> 5x7 (non-square: catches an h/w swap); 16x16 = no resize
    for name, shape in [("a", (2, 3, 24, 24)), ("b", (1, 3, 20, 28)), ("c", (1, 3, 16, 16))]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            o = model(pixel_values=x, output_hidden_states=True)
        prenorm = o.hidden_states[-1]  # output of the last block, before the final LayerNorm
        assert torch.allclose(model.layernorm(prenorm), o.last_hidden_state, atol=1e-6)
        io[f"pixel_values_{name}"] = x
        io[f"last_hidden_state_{name}"] = o.last_hidden_state
        io[f"pooled_prenorm_mean_{name}"] = prenorm.mean(dim=1)  # CLEFT's --pool_feat image feature
    save_io(out, io)
    print("dinov2:", {k: tuple(v.shape) for k, v in io.items()})


def make_dinov2_plain():
    """Plain DINOv2 (facebook/dinov2-small / -base are Dinov2Model): no register tokens, and HF resizes its
    position grid WITHOUT antialias (Dinov2WithRegistersModel resizes with it)."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=4,
                       image_size=16, layerscale_value=0.7, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                       attn_implementation="eager")
    model = Dinov2Model(cfg).eval()
    randomise_(model, seed=5)
    out = fresh_dir(GOLD / "cleft_dinov2_plain")
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(6)
    io = {}
    # 24x24 -> 6x6 (upsampled), 20x28 -> 5x7 (non-square), 12x8 -> 3x2 (downsampled: where antialias matters)
    for name, shape in [("a", (2, 3, 24, 24)), ("b", (1, 3, 20, 28)), ("c", (1, 3, 12, 8))]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            o = model(pixel_values=x, output_hidden_states=True)
        io[f"pixel_values_{name}"] = x
        io[f"last_hidden_state_{name}"] = o.last_hidden_state
        io[f"pooler_output_{name}"] = o.pooler_output.clone()  # a view of last_hidden_state otherwise
        io[f"prenorm_{name}"] = o.hidden_states[-1]
    save_io(out, io)
    print("dinov2 plain:", {k: tuple(v.shape) for k, v in io.items()})


# ----------------------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config(vocab, scaled):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      scale_attn_by_inverse_layer_idx=scaled, reorder_and_upcast_attn=False,
                      bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="eager")


def add_legacy_buffers(folder, n_layer, n_pos):
    """The OpenAI-converted `gpt2` safetensors carry h.{i}.attn.bias (the causal tril buffer, (1,1,P,P)) and older
    ones h.{i}.attn.masked_bias; current transformers no longer saves them. Put them back so the loader's
    'drop these keys' entries are exercised against the real layout."""
    from safetensors.torch import load_file
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    for i in range(n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(f), metadata={"format": "pt"})


def make_gpt2(tok):
    from transformers import GPT2LMHeadModel, GPT2Model
    vocab = tok.get_vocab_size()
    ids, mask = gpt2_inputs(tok)
    for folder, scaled, cls in [("cleft_gpt2", False, GPT2Model), ("cleft_gpt2_scaled", True, GPT2LMHeadModel)]:
        torch.manual_seed(0)
        model = cls(gpt2_config(vocab, scaled)).eval()
        randomise_(model, seed=3 if scaled else 4)
        out = fresh_dir(GOLD / folder)
        model.save_pretrained(out, safe_serialization=True)
        if not scaled:
            add_legacy_buffers(out, 3, 64)
        base = model.transformer if scaled else model
        with torch.no_grad():
            h = base(input_ids=ids, attention_mask=mask).last_hidden_state
        save_io(out, {"input_ids": ids, "attention_mask": mask, "last_hidden_state": h})
        print(folder, "vocab", vocab, "hidden", tuple(h.shape))


def make_gpt2_upcast(tok):
    """reorder_and_upcast_attn=True with the inverse-layer scaling: HF then computes the scores in fp32 with the
    scale folded into the matmul (_upcast_and_reordered_attn), a different code path from the two above."""
    from transformers import GPT2Model
    ids, mask = gpt2_inputs(tok)
    cfg = gpt2_config(tok.get_vocab_size(), True)
    cfg.reorder_and_upcast_attn = True
    torch.manual_seed(0)
    model = GPT2Model(cfg).eval()
    randomise_(model, seed=7)
    out = fresh_dir(GOLD / "cleft_gpt2_upcast")
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    save_io(out, {"input_ids": ids, "attention_mask": mask, "last_hidden_state": h})
    print("cleft_gpt2_upcast hidden", tuple(h.shape))


# ----------------------------------------------------------------------------------------------------------
# peft adapters on the scaled tiny GPT-2 (CLEFT's setting: task CAUSAL_LM on a GPT2LMHeadModel)


def transformer_output(peft_model, ids, mask):
    """The post-ln_f hidden states of the inner GPT2Model, which is what CLEFT uses (it sets lm_head = Identity)."""
    got = {}
    hook = peft_model.get_base_model().transformer.register_forward_hook(
        lambda m, a, o: got.__setitem__("h", o.last_hidden_state))
    with torch.no_grad():
        peft_model(input_ids=ids, attention_mask=mask)
    hook.remove()
    return got["h"]


def make_peft(tok):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    ids, mask = gpt2_inputs(tok)
    configs = {
        "cleft_lora": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                                 target_modules=["c_attn"], fan_in_fan_out=True),
        "cleft_ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                               feedforward_modules=["mlp.c_proj"]),
        "cleft_prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    }
    for seed, (folder, pcfg) in enumerate(configs.items(), 10):
        base = GPT2LMHeadModel.from_pretrained(GOLD / "cleft_gpt2_scaled", attn_implementation="eager").eval()
        torch.manual_seed(seed)
        model = get_peft_model(base, pcfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))  # B = 0 at init would test nothing
                elif "ia3_l" in name:
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))  # so would IA3 vectors of one
                elif "prompt_encoder" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        model.eval()
        io = {"input_ids": ids, "attention_mask": mask, "last_hidden_state": transformer_output(model, ids, mask)}
        if folder == "cleft_lora":
            # peft's own merge, as a reference for our merge(): Conv1D weight (in, out) + (B A)^T * alpha/r
            model.merge_adapter()
            io["merged_c_attn_weight_0"] = model.get_base_model().transformer.h[0].attn.c_attn.base_layer.weight.clone()
            io["merged_last_hidden_state"] = transformer_output(model, ids, mask)
            model.unmerge_adapter()
        out = fresh_dir(GOLD / folder)
        model.save_pretrained(out, safe_serialization=True)
        if (out / "README.md").exists():
            os.remove(out / "README.md")  # peft's auto-generated model card, noise here
        cfg_path = out / "adapter_config.json"  # peft writes the absolute base path; keep the file machine-neutral
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = "cleft_gpt2_scaled"
        for k in ("target_modules", "feedforward_modules"):  # peft stores these sets in hash order
            if isinstance(acfg.get(k), list):
                acfg[k] = sorted(acfg[k])
        cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        save_io(out, io)
        print(folder, "trainable", sum(p.numel() for p in model.parameters() if p.requires_grad))


if __name__ == "__main__":
    # no arguments: everything (the tokenizer too); or name the parts to remake, e.g. `dinov2_plain`. BpeTrainer is
    # not guaranteed to give the same merges on another machine, so remaking one part keeps the committed tokenizer.
    parts = sys.argv[1:] or ["tokenizer", "dinov2", "dinov2_plain", "gpt2", "gpt2_upcast", "peft"]
    torch.use_deterministic_algorithms(True)
    if "tokenizer" in parts:
        tok = train_tokenizer(TOKENIZER_PATH)
        print("tokenizer:", TOKENIZER_PATH, "vocab", tok.get_vocab_size(), "eos id", tok.token_to_id(EOS))
    else:
        tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    for part, fn in [("dinov2", make_dinov2), ("dinov2_plain", make_dinov2_plain)]:
        if part in parts:
            fn()
    for part, fn in [("gpt2", make_gpt2), ("gpt2_upcast", make_gpt2_upcast), ("peft", make_peft)]:
        if part in parts:
            fn(tok)
    print("versions:", json.dumps(VERSIONS))
