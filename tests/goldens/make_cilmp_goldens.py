"""Generate the tiny tokenizers and the transformers parity goldens used by the CILMP tests.

This script is NOT part of the runtime. It needs `transformers` (only available in the golden venv):

    /work/venv-gold/bin/python tests/goldens/make_cilmp_goldens.py

It writes, deterministically (fixed seeds, no downloads):
  common/tokenizers/clip_tiny.json     a CLIP-format byte-level BPE with "</w>" word ends (~1.5k tokens)
  common/tokenizers/llama_tiny.json    a Llama-3-style byte-level BPE with the chat special tokens
  tests/goldens/clip_tiny/             tiny random CLIPModel (HF naming) + io.safetensors
  tests/goldens/llama_tiny/            tiny random Llama-3-style model (GQA, llama3 RoPE scaling, sharded)
  tests/goldens/llama_tiny_mha/        tiny random Llama-2-style model (MHA, plain RoPE, tied embeddings)
  tests/goldens/llama_tiny_v5/         tiny random Llama-3-style model as transformers 5 saves it (config.json
                                       `rope_parameters` with rope_theta 500000 and llama3 scaling inside; head_dim
                                       24 != hidden / heads = 16)
  tests/goldens/llama_tiny_v5_bare/    the same weights saved as a bare LlamaModel (keys without "model.", no
                                       lm_head); its hidden states are llama_tiny_v5/io.safetensors'

Our own code never imports transformers; the tests load these folders with safetensors only and compare
against the tensors in io.safetensors. See tests/goldens/README.md for what each tensor is.
"""

import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.modules["torchvision"] = None  # a torchvision built for another torch breaks `import transformers`; unused here
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[2]
TOK_DIR = ROOT / "common" / "tokenizers"
GOLD_DIR = ROOT / "tests" / "goldens"

CLIP_VOCAB_SIZE = 1200       # 512 byte symbols + merges + 2 specials (the specials are the two last ids)
LLAMA_BPE_SIZE = 1075        # 256 byte symbols + merges; the 5 special tokens follow (ids 1075..1079)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# CLIP's word regex (openai/CLIP simple_tokenizer.py, as in HF's CLIPConverter) and Llama-3's (tiktoken cl100k-like).
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ----------------------------------------------------------------------------------------------------------------
# corpus

CLASSNAMES = [
    # CILMP datasets (the class names of usr922/cilmp cilmp/datasets/*.py)
    "Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Actinic keratosis", "Benign keratosis",
    "Dermatofibroma", "Vascular lesion",
    "normal fundus", "fundus with age-related macular degeneration",
    "carcinoma", "keratosis", "melanoma", "miscellaneous", "nevus",
    "no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
    "severe diabetic retinopathy", "proliferative diabetic retinopathy",
    "dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum", "normal pylorus", "normal z-line",
    "polyps", "ulcerative colitis",
    "normal", "diabetes", "glaucoma", "cataract", "age related macular degeneration", "hypertension",
    "pathological myopia", "other diseases or abnormalities",
    "malignant", "benign", "pneumonia", "bacteria pneumonia", "virus pneumonia",
    "Fetal brain", "Fetal femur", "Fetal abdomen", "Fetal thorax", "Maternal cervix", "Other planes",
    "basophil", "eosinophil", "erythroblast", "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
    "lymphocyte", "monocyte", "neutrophil", "platelet",
    "actinic keratoses and intraepithelial carcinoma", "benign keratosis-like lesions", "melanocytic nevi",
    "vascular lesions", "covid", "serrated", "adenocarcinoma", "adenoma",
    # demo dataset
    "nevus", "basal cell carcinoma", "seborrheic keratosis", "dermatofibroma", "vascular lesion",
]
CHEXPERT_FINDINGS = [
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
    "No Finding",
]
COLOURS = ["dark", "brown", "black", "pink", "red", "tan", "blue"]
BORDERS = ["irregular", "smooth", "well-defined", "ragged"]
SIZES = ["large", "small"]
TEXTURES = ["speckled", "uniform", "mottled"]
DEMO_CLASSES = ["melanoma", "nevus", "basal cell carcinoma", "seborrheic keratosis", "dermatofibroma",
                "vascular lesion"]

PARAGRAPHS = """
A dermoscopic image shows a pigmented skin lesion with an asymmetric shape and several colours.
Melanoma is a malignant tumour of melanocytes; it often shows an irregular border, multiple colours and a diameter
larger than six millimetres. A benign nevus is usually small, round, uniform in colour and has a smooth border.
Basal cell carcinoma appears as a pearly papule with arborizing vessels, ulceration and blue-grey ovoid nests.
Seborrheic keratosis looks waxy and stuck-on, with milia-like cysts, comedo-like openings and a cerebriform pattern.
Dermatofibroma is a firm nodule with a central white scar-like patch and a delicate peripheral pigment network.
A vascular lesion such as a haemangioma or angiokeratoma shows red, purple or blue lacunae.
Actinic keratosis presents as a rough, scaly patch on sun-damaged skin, with a strawberry pattern.
The chest radiograph shows cardiomegaly, a small left pleural effusion and bibasilar atelectasis.
There is no pneumothorax. The lungs are clear. The heart size is normal. Support devices are in place.
Consolidation in the right lower lobe is consistent with pneumonia. Pulmonary edema is mild.
An enlarged cardiomediastinum may indicate a mediastinal mass or aortic injury.
Lung opacity and a lung lesion are seen in the upper zone; a rib fracture is healing.
The fundus photograph shows the optic disc, macula and retinal vessels. Drusen suggest age-related macular
degeneration. Microaneurysms, haemorrhages, hard exudates and cotton wool spots grade diabetic retinopathy.
Glaucoma enlarges the optic cup; cataract makes the fundus image hazy; pathological myopia thins the retina.
The endoscopic image shows the cecum, the pylorus and the z-line. Polyps are lifted with dye before resection.
Esophagitis shows mucosal breaks; ulcerative colitis shows ulcers, loss of vascular pattern and bleeding.
Breast ultrasound shows a hypoechoic mass with an irregular margin, which is suspicious of malignancy.
A fetal ultrasound plane shows the brain, femur, abdomen or thorax; the maternal cervix is measured in length.
In a blood smear, a neutrophil has a segmented nucleus, an eosinophil has red granules and a basophil has dark
blue granules. A lymphocyte is small and round, a monocyte is large with a folded nucleus, and platelets are tiny.
Histopathology of the colon shows normal glands, serrated lesions, adenoma and adenocarcinoma.
A computed tomography volume of the chest shows ground-glass opacities, nodules and emphysema.
This is a breast 2d full-field digital mammogram of a patient with birads score 1: negative.
The breast tissue density is almost entirely fat, scattered fibroglandular densities, heterogeneously dense or
extremely dense. Additional imaging is required. The finding is probably benign. A suspicious abnormality is
highly suggestive of malignancy. This is a known biopsy-proven malignancy.
You are a helpful medical assistant. Answer the question of the user in a few sentences.
The model learns prompts from the large language model and the image, and the vision language model compares
the image embedding with the text embedding of every class.
Clinical history: a sixty-year-old woman presents with a changing mole on her back that has grown over three months.
Examination reveals an asymmetric plaque with blue-white veil, atypical network, regression structures and dots.
Differential diagnosis includes melanoma in situ, dysplastic nevus, pigmented basal cell carcinoma and lentigo.
Management: excision biopsy with two millimetre margins, followed by histopathological examination.
Findings: the cardiac silhouette is enlarged. Interstitial markings are increased bilaterally, suggesting edema.
Impression: moderate cardiomegaly with pulmonary vascular congestion; no focal consolidation or effusion.
Comparison with the previous radiograph shows interval improvement of the right basilar opacity.
Tubes and lines: the endotracheal tube terminates above the carina; a central venous catheter is present.
Degenerative changes of the thoracic spine are noted. The osseous structures are otherwise unremarkable.
Retinal photography demonstrates neovascularization, venous beading and intraretinal microvascular anomalies.
Optical coherence tomography confirms subretinal fluid and thickening of the central macular region.
Colonoscopy revealed a pedunculated polyp in the sigmoid colon, removed by snare polypectomy without complications.
Ultrasound examination demonstrates a solid oval mass, parallel orientation, circumscribed margin and posterior
acoustic enhancement, features that favour a benign fibroadenoma over an invasive ductal carcinoma.
Peripheral blood film: anaemia with target cells, reticulocytosis and occasional nucleated red blood cells.
Cytoplasmic granules, nuclear lobes, chromatin texture and cell diameter distinguish the leukocyte types.
Whole-slide images are tiled into patches; each patch is stained with haematoxylin and eosin.
Parameter-efficient fine-tuning adapts a frozen pretrained encoder with low-rank updates, prompts or adapters.
Contrastive learning pulls matching image and report embeddings together and pushes mismatched pairs apart.
Temperature scaling sharpens the softmax over cosine similarities between normalised embeddings.
Radiologists describe size, shape, margin, density, location, laterality, calcification and interval change.
Patient demographics such as age, sex, smoking status and family history modulate the prior probability.
Sensitivity, specificity, accuracy, balanced accuracy, area under the curve and kappa summarise performance.
""".split("\n")


def corpus() -> list[str]:
    """A small, fixed medical corpus: class names, finding names, prompt templates, the demo vocabulary, prose."""
    rng = random.Random(0)
    lines = [p.strip() for p in PARAGRAPHS if p.strip()]
    for name in CLASSNAMES:
        lines.append(f"a photo of a {name}.")
        lines.append(f"a photo of a h h h h {name.lower()}.")
        lines.append(f"In an image, describe the distinctive visual features of {name}.")
        lines.append(f"The image shows {name.lower()}, which is a typical finding.")
    for f in CHEXPERT_FINDINGS:
        lines.append(f"This is a chest X ray of a patient with {f}")
        lines.append(f"this is a chest x ray of a patient with {f.lower()}")
    for _ in range(300):  # the demo's attribute captions, sampled so that frequent words become whole tokens
        lines.append(f"a photo of a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(TEXTURES)} lesion with a "
                     f"{rng.choice(BORDERS)} border, a {rng.choice(DEMO_CLASSES)}.")
    for _ in range(100):
        k = rng.randint(1, 3)
        lines.append("this is a chest x ray of a patient with " + " ".join(rng.sample(CHEXPERT_FINDINGS, k)).lower())
    for role in ["system", "user", "assistant"]:
        lines.append(f"{role}\n\nIn an image, describe the distinctive visual features of melanoma.\n")
    lines += [f"score {i}, grade {i}, {i}0 mm, {i}.5 cm" for i in range(10)]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# tokenizers

def bytes_to_unicode_order() -> list[str]:
    """The 256 byte symbols in openai/CLIP's order (printable bytes first, then the rest shifted to 256+)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def train_merges(words: Counter, n_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Plain BPE training on {word (tuple of symbols): count}; ties go to the smallest pair, so it is deterministic.

    (tokenizers' BpeTrainer breaks ties in hash order, so it gives different merges from run to run.)"""
    words = {w: c for w, c in sorted(words.items())}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def word_counts(tok: Tokenizer, lines: list[str], suffix: str = "") -> Counter:
    """Normalise and pre-tokenise lines with tok's own pipeline; words as symbol tuples (suffix on the last one)."""
    counts = Counter()
    for line in lines:
        text = tok.normalizer.normalize_str(line) if tok.normalizer is not None else line
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text):
            counts[tuple(piece[:-1]) + (piece[-1] + suffix,)] += 1
    return counts


def merges_to_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], size: int) -> list[tuple[str, str]]:
    """Append merge results to vocab (in place) until it holds `size` tokens; return the merges used."""
    kept = []
    for a, b in merges:
        if len(vocab) == size:
            break
        kept.append((a, b))
        if a + b not in vocab:  # two merges can spell the same string; keep ids dense
            vocab[a + b] = len(vocab)
    assert len(vocab) == size, f"corpus too small: only {len(vocab)} tokens"
    return kept


def build_clip_tokenizer(lines: list[str]) -> Tokenizer:
    """CLIP pipeline; vocab laid out like openai/CLIP: bytes, bytes+</w>, merge results, then SOT, EOT (last ids)."""
    def pipeline(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        return tok

    base = bytes_to_unicode_order()
    vocab = {s: i for i, s in enumerate(base + [s + "</w>" for s in base])}
    merges = train_merges(word_counts(pipeline(models.BPE()), lines, suffix="</w>"), CLIP_VOCAB_SIZE)
    kept = merges_to_vocab(vocab, merges, CLIP_VOCAB_SIZE - 2)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    tok = pipeline(models.BPE(vocab=vocab, merges=kept, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=CLIP_EOS))
    tok.add_special_tokens([AddedToken(CLIP_BOS, special=True, normalized=True),
                            AddedToken(CLIP_EOS, special=True, normalized=False)])
    tok.post_processor = processors.RobertaProcessing((CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def build_llama_tokenizer(lines: list[str]) -> Tokenizer:
    """Llama-3 pipeline (regex split, byte-level BPE, ignore_merges) plus the chat special tokens at the end."""
    def pipeline(model):
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        return tok

    vocab = {s: i for i, s in enumerate(bytes_to_unicode_order())}
    merges = train_merges(word_counts(pipeline(models.BPE()), lines), LLAMA_BPE_SIZE)
    merges = merges_to_vocab(vocab, merges, LLAMA_BPE_SIZE)
    tok = pipeline(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no BOS
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA_SPECIALS])
    return tok


def check_tokenizers(clip_path: Path, llama_path: Path) -> None:
    """Compare the saved files against transformers' tokenizer classes and the properties the code relies on."""
    clip = Tokenizer.from_file(str(clip_path))
    hf = transformers.CLIPTokenizerFast(tokenizer_file=str(clip_path))
    n = clip.get_vocab_size()
    assert n == CLIP_VOCAB_SIZE and clip.token_to_id(CLIP_BOS) == n - 2 and clip.token_to_id(CLIP_EOS) == n - 1
    assert hf.bos_token_id == n - 2 and hf.eos_token_id == n - 1, (hf.bos_token_id, hf.eos_token_id)
    for s in ["a photo of a melanoma.", "a photo of a H H H H Basal cell carcinoma.",
              "this is a chest x ray of a patient with pleural effusion",
              "A  dark-brown, ragged (well-defined?) lesion: 12 mm; it's  speckled!", "Ünïcödé  café 42",
              "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "zebra xylophone qu'il"]:
        ids = clip.encode(s).ids
        assert ids == hf(s)["input_ids"], (s, ids, hf(s)["input_ids"])
        assert ids[0] == n - 2 and ids[-1] == n - 1 and max(ids[1:-1]) < n - 2
    assert clip.encode("h", add_special_tokens=False).tokens == ["h</w>"]
    assert clip.encode("H H H", add_special_tokens=False).tokens == ["h</w>"] * 3

    llama = Tokenizer.from_file(str(llama_path))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(llama_path))
    base = LLAMA_BPE_SIZE
    for i, s in enumerate(LLAMA_SPECIALS):
        assert llama.token_to_id(s) == base + i
    chat = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIn an image, describe the distinctive "
            "visual features of Melanocytic nevus.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = llama.encode(chat, add_special_tokens=False).ids
    assert ids[:2] == [base + 0, base + 2] and ids.count(base + 4) == 1 and ids.count(base + 3) == 2
    assert llama.decode(ids, skip_special_tokens=False) == chat
    for s in [chat, "Ünïcödé  café 12345\n\n  x", "The lungs are clear.  No pneumothorax."]:
        assert llama.encode(s, add_special_tokens=False).ids == hf(s, add_special_tokens=False)["input_ids"]
        assert llama.encode(s).ids == llama.encode(s, add_special_tokens=False).ids  # no BOS added


# ----------------------------------------------------------------------------------------------------------------
# models

@torch.no_grad()
def randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves norm weights at 1 and biases at 0, which would hide swapped keys; perturb them all."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        is_norm = "LayerNorm" in type(owner).__name__ or "RMSNorm" in type(owner).__name__
        if is_norm and leaf == "weight":
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif leaf == "bias":
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def folder_size(path: Path) -> int:
    """Total bytes of the files directly in path."""
    return sum(f.stat().st_size for f in path.iterdir())


def make_clip_golden(tok_path: Path, out: Path) -> None:
    """Tiny random CLIPModel -> config.json, model.safetensors, tokenizer.json, io.safetensors."""
    tok = Tokenizer.from_file(str(tok_path))
    n = tok.get_vocab_size()
    text = dict(vocab_size=n, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                bos_token_id=n - 2, eos_token_id=2, pad_token_id=0, projection_dim=40)  # eos 2 = legacy: pool at argmax(input_ids)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=40)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=40)
    torch.manual_seed(1234)
    model = transformers.CLIPModel(config).eval()
    randomise_norms_and_biases(model, seed=1235)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # exp(3) = 20.09; HF default is log(1/0.07) = 2.659

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tok_path, out / "tokenizer.json")

    sentences = ["a photo of a h h h h melanoma.", "this is a chest x ray of a patient with pleural effusion",
                 "a photo of a large dark speckled lesion with a ragged border, a xanthelasma-like carcinoma."]
    input_ids = torch.zeros(3, 77, dtype=torch.int64)  # pad id 0, like openai clip.tokenize (the EOT is the max id)
    for i, s in enumerate(sentences):
        ids = tok.encode(s).ids
        input_ids[i, :len(ids)] = torch.tensor(ids)
    g = torch.Generator().manual_seed(1236)
    pixel_values = torch.randn(3, 3, 32, 32, generator=g)

    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixel_values)
        txt = model.get_text_features(input_ids=input_ids)
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
        vout = model.vision_model(pixel_values=pixel_values)
        tout = model.text_model(input_ids=input_ids)
        full = model(input_ids=input_ids, pixel_values=pixel_values)
    eot = input_ids.argmax(dim=-1)
    assert torch.allclose(tout.pooler_output, tout.last_hidden_state[torch.arange(3), eot])
    assert torch.allclose(txt, model.text_projection(tout.pooler_output))
    assert torch.allclose(img, model.visual_projection(model.vision_model.post_layernorm(vout.last_hidden_state[:, 0])))
    io = {
        "pixel_values": pixel_values, "input_ids": input_ids,
        "image_features": img, "text_features": txt,
        "vision_last_hidden_state": vout.last_hidden_state, "vision_pooled": vout.pooler_output,
        "text_last_hidden_state": tout.last_hidden_state, "text_pooled": tout.pooler_output,
        "eot_index": eot, "logits_per_image": full.logits_per_image,
    }
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")


def legacy_rope_config(out: Path) -> None:
    """Rewrite config.json's v5 'rope_parameters' into the 'rope_theta'/'rope_scaling' keys that hub checkpoints use."""
    cfg = json.loads((out / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def make_llama_golden(tok_path: Path, out: Path, seed: int, shard: str | None, legacy_rope: bool = True,
                      bare: Path | None = None, **cfg) -> None:
    """Tiny random LlamaForCausalLM -> config.json, (sharded) safetensors, tokenizer.json, io.safetensors.
    legacy_rope: rewrite config.json into transformers 4.x's rope keys (else keep transformers 5's rope_parameters).
    bare: also save model.model (a LlamaModel: no "model." prefix, no lm_head) into that folder."""
    tok = Tokenizer.from_file(str(tok_path))
    n = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    config = transformers.LlamaConfig(vocab_size=n, bos_token_id=bos, eos_token_id=eos, rms_norm_eps=1e-5,
                                      max_position_embeddings=256, attention_bias=False, hidden_act="silu",
                                      initializer_range=0.3, attn_implementation="eager", **cfg)
    # initializer_range 0.3 (not 0.02) spreads the logits (std ~2.5) so greedy decoding has no near-ties
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    randomise_norms_and_biases(model, seed=seed + 1)

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    if legacy_rope:
        legacy_rope_config(out)
    else:
        assert "rope_parameters" in json.loads((out / "config.json").read_text())
    if bare is not None:
        if bare.exists():
            shutil.rmtree(bare)
        model.model.save_pretrained(bare, safe_serialization=True)
        assert not any(k.startswith(("model.", "lm_head")) for k in load_file(bare / "model.safetensors"))
    shutil.copy(tok_path, out / "tokenizer.json")

    g = torch.Generator().manual_seed(seed + 2)
    input_ids = torch.randint(0, n, (2, 11), generator=g)
    prompt = [bos] + tok.encode("In an image, describe the", add_special_tokens=False).ids
    prompt_ids = torch.tensor([prompt[:7]])
    assert prompt_ids.shape == (1, 7)

    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, a, o: captured.update(pre=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out_lm = model(input_ids=input_ids, output_hidden_states=True)
        out_base = model.model(input_ids=input_ids, output_hidden_states=True)
        hook.remove()
        gen = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12,
                             do_sample=False, pad_token_id=eos)
        # margin between the best and second-best logit at each greedy step: big margins keep the golden robust
        step_logits = model(input_ids=gen).logits[0, prompt_ids.shape[1] - 1:-1]
    hidden = torch.stack(out_lm.hidden_states)  # (n_layers + 1, B, T, D)
    assert torch.equal(hidden, torch.stack(out_base.hidden_states))
    assert torch.allclose(hidden[-1], model.model.norm(captured["pre"]))  # HF: final norm on the last entry
    assert torch.allclose(out_lm.logits, model.lm_head(hidden[-1]), atol=1e-5)
    assert gen.shape == (1, 7 + 12), gen.shape
    assert torch.equal(step_logits.argmax(-1), gen[0, 7:])
    top2 = step_logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > 0.02, f"greedy near-tie ({margin}); pick another seed"

    # the checkpoint we wrote must reload to the same model
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, out_lm.logits)
        assert torch.equal(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)

    io = {
        "input_ids": input_ids, "hidden_states": hidden, "last_layer_prenorm": captured["pre"],
        "logits": out_lm.logits, "prompt_ids": prompt_ids, "generated_ids": gen.to(torch.int64),
        "rope_inv_freq": model.model.rotary_emb.inv_freq.float(),
    }
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors")
    if bare is not None:
        base = transformers.LlamaModel.from_pretrained(bare, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(torch.stack(base(input_ids=input_ids, output_hidden_states=True).hidden_states), hidden)
    print(f"{out.name}: greedy min top1-top2 logit margin {margin:.4f}")


def check_outputs(folders: list[Path]) -> None:
    """Every golden loads with plain safetensors, holds only finite numbers and stays small."""
    total = 0
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            for k, v in load_file(f).items():
                assert torch.isfinite(v.float()).all(), (f, k)
        size = folder_size(folder)
        total += size
        assert size < 2_000_000, (folder, size)
        print(f"{folder.relative_to(ROOT)}: {size / 1e6:.2f} MB, files {sorted(p.name for p in folder.iterdir())}")
    assert total < 8_000_000, total


def main() -> None:
    torch.use_deterministic_algorithms(True)
    lines = corpus()
    TOK_DIR.mkdir(parents=True, exist_ok=True)
    clip_path, llama_path = TOK_DIR / "clip_tiny.json", TOK_DIR / "llama_tiny.json"
    build_clip_tokenizer(lines).save(str(clip_path), pretty=True)
    build_llama_tokenizer(lines).save(str(llama_path), pretty=True)
    check_tokenizers(clip_path, llama_path)

    make_clip_golden(clip_path, GOLD_DIR / "clip_tiny")
    make_llama_golden(llama_path, GOLD_DIR / "llama_tiny", seed=100, shard="400KB",
                      hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=112, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    make_llama_golden(llama_path, GOLD_DIR / "llama_tiny_mha", seed=200, shard=None,
                      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=112, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    make_llama_golden(llama_path, GOLD_DIR / "llama_tiny_v5", seed=300, shard=None, legacy_rope=False,
                      bare=GOLD_DIR / "llama_tiny_v5_bare",
                      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      intermediate_size=112, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    assert len(list((GOLD_DIR / "llama_tiny").glob("model-*.safetensors"))) >= 2, "llama_tiny must be sharded"
    check_outputs([GOLD_DIR / n for n in ("clip_tiny", "llama_tiny", "llama_tiny_mha", "llama_tiny_v5",
                                          "llama_tiny_v5_bare")])
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; "
          f"clip vocab {CLIP_VOCAB_SIZE}, llama vocab {LLAMA_BPE_SIZE + len(LLAMA_SPECIALS)}")


if __name__ == "__main__":
    main()
