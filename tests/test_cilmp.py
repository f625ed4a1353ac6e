"""cilmp.py: parity with HF goldens, the method's invariants, and the script end to end on the demo data."""
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cilmp  # noqa: E402
from common import prepare  # noqa: E402
from common.data import SOURCES, missing_dataset, stratified_subset  # noqa: E402
from common.weights import WeightsError  # noqa: E402

G = REPO / "tests" / "goldens"


# ---------------------------------------------------------------------------------------------------------
# parity with transformers (goldens made by tests/goldens/make_cilmp_goldens.py)


def test_clip_matches_hf_image_and_text_features():
    io = load_file(str(G / "clip_tiny" / "io.safetensors"))
    clip = cilmp.CLIP.from_pretrained(G / "clip_tiny").eval()
    with torch.no_grad():
        img = clip.encode_image(io["pixel_values"])
        txt = clip.encode_text(io["input_ids"])
    torch.testing.assert_close(img, io["image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, io["text_features"], atol=1e-5, rtol=1e-5)
    assert abs(clip.logit_scale.item() - 3.0) < 1e-6  # the golden's non-default value: the key really loaded


def test_clip_tokenizer_matches_golden_ids():
    io = load_file(str(G / "clip_tiny" / "io.safetensors"))
    tok = cilmp.bpe_tokenizer(G / "clip_tiny" / "tokenizer.json")
    ids = io["input_ids"][0]
    n = int(io["eot_index"][0]) + 1
    text = tok.decode(ids[:n].tolist(), skip_special_tokens=True).replace("</w>", " ")
    assert tok.encode(" ".join(text.split())).ids == ids[:n].tolist()


@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_mha", "llama_tiny_v5"])
def test_llama_hidden_states_and_greedy_generation_match_hf(name):
    io = load_file(str(G / name / "io.safetensors"))
    llm = cilmp.Llama.from_pretrained(G / name, dtype=torch.float32)
    hs = llm(io["input_ids"], all_hidden=True)
    assert hs.shape == io["hidden_states"].shape  # (n_layers + 1, B, T, D)
    # the goldens use a wide init (std 0.3) so greedy decoding has no near-ties; activations reach ~80, so
    # compare each layer at 1e-5 of its own scale (fp32 rounding of sums that size is ~1e-5 absolute)
    for ours, ref in zip(hs, io["hidden_states"]):
        scale = ref.abs().max()
        torch.testing.assert_close(ours / scale, ref / scale, atol=1e-5, rtol=0)
    prompt = io["prompt_ids"]
    new = llm.generate(prompt, max_new_tokens=io["generated_ids"].shape[1] - prompt.shape[1])
    assert new == io["generated_ids"][0, prompt.shape[1]:].tolist()


def test_transformers5_llama_config_gives_its_rope_and_head_dim():
    """llama_tiny_v5 is saved by transformers 5 as is: rope_parameters (theta 500000, llama3 scaling) and
    head_dim 24 != 64 / 4. Read as the 4.x layout, theta would fall back to 10000."""
    hf = json.loads((G / "llama_tiny_v5" / "config.json").read_text())
    assert "rope_parameters" in hf and "rope_theta" not in hf and "rope_scaling" not in hf
    cfg = cilmp.llama_config_from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.head_dim == 24
    io = load_file(str(G / "llama_tiny_v5" / "io.safetensors"))
    torch.testing.assert_close(cilmp.rope_frequencies(cfg), io["rope_inv_freq"], atol=0, rtol=1e-6)


def test_llama_config_reads_the_4x_and_5x_rope_layouts_alike():
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=112, vocab_size=100, rms_norm_eps=1e-5)
    v4 = cilmp.llama_config_from_hf(base | {"rope_theta": 500000.0, "rope_scaling": rope | {"rope_type": "llama3"}})
    v4_old = cilmp.llama_config_from_hf(base | {"rope_theta": 500000.0, "rope_scaling": rope | {"type": "llama3"}})
    v5 = cilmp.llama_config_from_hf(base | {"rope_parameters": rope | {"rope_type": "llama3", "rope_theta": 500000.0}})
    assert v4 == v4_old == v5 and v5.head_dim == 16
    plain4 = cilmp.llama_config_from_hf(base | {"rope_theta": 10000.0, "rope_scaling": None})
    plain5 = cilmp.llama_config_from_hf(base | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert plain4 == plain5 and plain5.rope_scaling is None
    # fields equal to transformers' defaults are left out of 4.x files: they come back as those defaults
    minimal = cilmp.llama_config_from_hf({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 112})
    assert (minimal.n_layers, minimal.vocab_size, minimal.norm_eps, minimal.n_kv_heads, minimal.rope_theta) == \
        (32, 32000, 1e-6, 4, 10000.0)


@pytest.mark.parametrize("change, words", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "expected"),   # llama3 without its fields
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}, "sliding_attention": {"rope_theta": 1e4}}},
     "per-layer-type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"num_key_value_heads": 3}, "key/value groups"),
])
def test_llama_config_refuses_what_it_does_not_implement(change, words):
    base = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=112, vocab_size=100, rms_norm_eps=1e-5)
    cilmp.llama_config_from_hf(base)  # the base itself is fine
    with pytest.raises(WeightsError, match="does not implement") as e:
        cilmp.llama_config_from_hf(base | change)
    assert words in str(e.value)


def test_bare_llama_model_gives_hidden_states_and_refuses_to_generate():
    """A LlamaModel checkpoint (keys without "model.", no lm_head) loads for hidden states only."""
    io = load_file(str(G / "llama_tiny_v5" / "io.safetensors"))
    llm = cilmp.Llama.from_pretrained(G / "llama_tiny_v5_bare", dtype=torch.float32)
    for ours, ref in zip(llm(io["input_ids"], all_hidden=True), io["hidden_states"]):
        scale = ref.abs().max()
        torch.testing.assert_close(ours / scale, ref / scale, atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="cannot generate the class descriptions"):
        llm.generate(io["prompt_ids"], 4)


def _clip_hf_config():
    return json.loads((G / "clip_tiny" / "config.json").read_text())


def test_clip_config_reads_every_layout(tmp_path):
    """transformers 5 / 4.x (text_config, vision_config), older 4.x (text_config_dict, vision_config_dict, which
    win), and 4.x diff-style files that leave out fields equal to transformers' defaults."""
    hf = _clip_hf_config()
    ref = cilmp.clip_config_from_hf(hf)
    old = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}
    old |= {"text_config_dict": hf["text_config"], "vision_config_dict": hf["vision_config"],
            "text_config": {"hidden_size": 999}, "vision_config": {}}
    assert cilmp.clip_config_from_hf(old) == ref
    diff = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}
    diff["text_config"] = {k: v for k, v in hf["text_config"].items() if k not in ("hidden_act", "layer_norm_eps",
                                                                                    "max_position_embeddings")}
    diff["vision_config"] = {k: v for k, v in hf["vision_config"].items() if k not in ("hidden_act", "num_channels")}
    assert cilmp.clip_config_from_hf(diff) == ref
    vit_b16 = cilmp.clip_config_from_hf({"model_type": "clip", "projection_dim": 512, "text_config": {},
                                         "vision_config": {"patch_size": 16}})
    assert vit_b16 == cilmp.CLIPConfig()
    folder = tmp_path / "clip"  # and the weights load under the old layout
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(old))
    (folder / "model.safetensors").symlink_to(G / "clip_tiny" / "model.safetensors")
    io = load_file(str(G / "clip_tiny" / "io.safetensors"))
    with torch.no_grad():
        img = cilmp.CLIP.from_pretrained(folder).encode_image(io["pixel_values"])
    torch.testing.assert_close(img, io["image_features"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("vision_config"), "has no vision_config"),
    (lambda c: c.update(model_type="clip_vision_model"), "not a CLIPVisionModel"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "vision.hidden_act 'gelu'"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "text.hidden_act 'gelu'"),
    (lambda c: c["vision_config"].update(num_channels=1), "num_channels 1"),
    (lambda c: c["vision_config"].update(layer_norm_eps=1e-6), "LayerNorm eps"),
    (lambda c: c["text_config"].update(eos_token_id=7), "eos_token_id 7"),
])
def test_clip_config_refuses_what_it_does_not_implement(change, words):
    hf = _clip_hf_config()
    change(hf)
    with pytest.raises(WeightsError) as e:
        cilmp.clip_config_from_hf(hf)
    assert words in str(e.value)


def test_llama_sharded_loader_reads_every_shard():
    idx = json.loads((G / "llama_tiny" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) >= 2
    llm = cilmp.Llama.from_pretrained(G / "llama_tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in llm.parameters())


def test_key_map_names_missing_and_misshaped_tensors(tmp_path):
    sd = load_file(str(G / "clip_tiny" / "model.safetensors"))
    del sd["text_model.final_layer_norm.bias"]
    sd["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    sd["something.extra"] = torch.zeros(1)
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((G / "clip_tiny" / "config.json").read_text())
    with pytest.raises(WeightsError) as e:
        cilmp.CLIP.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "ln_final.bias" in msg and "vision_blocks.1.mlp.0.weight" in msg and "something.extra" in msg


# ---------------------------------------------------------------------------------------------------------
# the method


def _tiny_model(mode="conditional", dropout=0.0, L=10, D_L=64, C=3):
    tok = cilmp.bpe_tokenizer(REPO / "common" / "tokenizers" / "clip_tiny.json")
    cfg = replace(cilmp.CLIP_PRESETS["tiny"]["config"], vocab_size=tok.get_vocab_size())
    clip = cilmp.CLIP(cfg).init_random(0)
    names = ["melanoma", "nevus", "vascular lesion"][:C]
    ctx, suf, eot = cilmp.prompt_tokens(tok, names, 4, L, cfg.context_length)
    torch.manual_seed(0)
    return cilmp.CILMP(clip, torch.randn(C, L, D_L), suf, eot, ctx,
                       cilmp.CILMPConfig(dropout=dropout, mode=mode, depth=cfg.text_layers))


def test_intervention_is_identity_when_its_learned_parts_are_zero():
    # h + (W_s[h; rd] + b - hR) R^T = h when W_s = 0, b = 0 and R = 0 ... and for any R when s = hR,
    # e.g. W_s = [R^T, 0], b = 0: then s - hR = 0 exactly.
    torch.manual_seed(0)
    h, v = torch.randn(3, 4, 32), torch.randn(5, 16)
    for mode in ("conditional", "no-rd", "plain"):
        it = cilmp.Intervention(32, 16, 8, 0.0, mode)
        with torch.no_grad():
            it.W_s.weight.zero_()
            it.W_s.weight[:, :32] = it.R.T
            it.W_s.bias.zero_()
        out = it(h, v)
        assert out.shape == (5, 3, 4, 32)
        torch.testing.assert_close(out, h.expand(5, -1, -1, -1), atol=1e-5, rtol=0)
        with torch.no_grad():
            it.W_s.bias.fill_(1.0)  # and not the identity otherwise
        assert (it(h, v) - h).abs().max() > 0.1


def test_conditional_intervention_formula():
    torch.manual_seed(0)
    it = cilmp.Intervention(32, 16, 8, 0.0, "conditional")
    h, v = torch.randn(3, 4, 32), torch.randn(5, 16)
    u = it.W2(it.W1(v))                                            # (B, D)
    rd = u[:, None, None] * h[None]                                # (B, C, n, D)
    s = it.W_s(torch.cat([h[None].expand_as(rd), rd], -1))        # (B, C, n, r)
    ref = h + (s - h @ it.R) @ it.R.T
    torch.testing.assert_close(it(h, v), ref, atol=1e-5, rtol=1e-5)


def test_eot_cut_is_exact():
    """Cutting the prompts at the longest EOT + 1 gives the same logits as padding them to 77 tokens."""
    model = _tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cut = model(x)
        S = 77 - 1 - 4 - model.L
        pad = model.suffix[:, -1:].expand(-1, S - model.suffix.shape[1], -1)   # more EOT-padding up to 77
        model.suffix = torch.cat([model.suffix, pad], 1)
        assert int(model.eot.max()) + 1 < 77
        v = F.normalize(model.encode_image(x), dim=-1)
        xs = model.text_inputs(v, 77)
        assert xs.shape == (2 * 3, 77, 48)
        t = F.normalize(model.encode_text(xs, v), dim=-1).view(2, 3, -1)
        ref = model.clip.logit_scale.exp() * torch.einsum("be,bce->bc", v, t)
    torch.testing.assert_close(cut, ref, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_at_paper_size_on_meta_device():
    with torch.device("meta"):
        clip = cilmp.CLIP(cilmp.CLIPConfig())
        ctx = torch.tensor([49406, 320, 1125, 539, 320])
        suf = torch.full((7, 6), 49407)
        model = cilmp.CILMP(clip, torch.zeros(7, 32, 4096), suf, torch.full((7,), 42), ctx, cilmp.CILMPConfig())
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per set: 2 x (R 32,768 + W_s 65,544 + W1 4,104 + W2 36,864) + projection 36,864 = 315,424; 12 sets
    # + ctx 4x512 + deep ctx 11x4x512 + VPT 4x768 + deep VPT 11x4x768
    assert n == 12 * 315_424 + 2_048 + 22_528 + 3_072 + 33_792 == 3_846_528
    assert abs(sum(p.numel() for p in clip.parameters()) - 149.6e6) < 0.5e6  # the paper's "149.6M" CLIP


def test_ablation_modes_change_the_parameter_count():
    counts = {m: sum(p.numel() for p in _tiny_model(m).parameters() if p.requires_grad)
              for m in ("conditional", "no-rd", "plain", "none")}
    assert counts["conditional"] == counts["no-rd"] > counts["plain"] > counts["none"]


def _tiny_tok_and_clip_cfg():
    tok = cilmp.bpe_tokenizer(REPO / "common" / "tokenizers" / "clip_tiny.json")
    return tok, replace(cilmp.CLIP_PRESETS["tiny"]["config"], vocab_size=tok.get_vocab_size())


def test_n_ctx_below_4_keeps_the_leftover_words_and_above_4_starts_random():
    """Official rule: n_ctx <= 4 learns the first n_ctx words of "a photo of a" and keeps the rest as fixed words
    after the LLM slots; n_ctx > 4 starts the whole context at N(0, 0.02)."""
    tok, cfg = _tiny_tok_and_clip_cfg()
    words = tok.encode("a photo of a").ids[1:-1]
    name = tok.encode("nevus.").ids[1:-1]
    for n_ctx in (1, 2, 4, 6):
        ctx_ids, suffix, eot = cilmp.prompt_tokens(tok, ["nevus"], n_ctx, 10, 77)
        body = suffix[0].tolist()
        assert body[:len(words[n_ctx:]) + len(name)] == words[n_ctx:] + name
        assert body[eot[0] - 1 - n_ctx - 10] == tok.token_to_id("<|endoftext|>")  # EOT where pooling reads
        clip = cilmp.CLIP(cfg).init_random(0)
        model = cilmp.CILMP(clip, torch.randn(1, 10, 64), suffix, eot, ctx_ids,
                            cilmp.CILMPConfig(n_ctx=n_ctx, depth=4, dropout=0.0))
        emb = clip.token_embedding.weight
        if n_ctx <= 4:
            torch.testing.assert_close(model.ctx.data, emb[words[:n_ctx]])
        else:
            assert model.ctx.shape == (6, 48) and 0.01 < model.ctx.std() < 0.03
            assert (model.ctx[:, None] - emb[None, words]).abs().amax(-1).min() > 1e-3  # no word init
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1)


def test_n_vpt_sets_the_vision_prompts_and_0_leaves_the_vision_tower_as_is():
    tok, cfg = _tiny_tok_and_clip_cfg()
    ctx_ids, suffix, eot = cilmp.prompt_tokens(tok, ["nevus", "melanoma"], 4, 10, 77)
    x = torch.randn(2, 3, 64, 64)
    for n_vpt in (0, 2, 7):
        clip = cilmp.CLIP(cfg).init_random(0)
        model = cilmp.CILMP(clip, torch.randn(2, 10, 64), suffix, eot, ctx_ids,
                            cilmp.CILMPConfig(n_vpt=n_vpt, depth=4, dropout=0.0)).eval()
        assert model.vpt.shape == (n_vpt, 48) and model.deep_vpt.shape == (3, n_vpt, 48)
        with torch.no_grad():
            same = torch.allclose(model.encode_image(x), clip.encode_image(x), atol=1e-6)
        assert same == (n_vpt == 0)
        assert model(x).shape == (2, 2)


def test_label_ratio_subset_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [100, 30, 9, 1])
    for ratio in (0.1, 0.3):
        keep = stratified_subset(labels, ratio, seed=1)
        counts = np.bincount(labels[keep], minlength=4)
        assert counts.tolist() == [max(1, round(ratio * n)) for n in (100, 30, 9, 1)]
        assert np.array_equal(keep, stratified_subset(labels, ratio, seed=1))     # seeded
        assert not np.array_equal(keep, stratified_subset(labels, ratio, seed=2))
        assert np.all(np.diff(keep) > 0)


def test_a_missing_dataset_names_its_download_and_the_prepare_command_of_its_folder(tmp_path):
    entry = cilmp.DATASETS["pneumonia2"]
    msg = missing_dataset("pneumonia2", entry, tmp_path)
    assert str(tmp_path / "split_pneumonia2.json") in msg and SOURCES["pneumonia"] in msg
    assert "python -m common.prepare pneumonia --src" in msg      # its split file lives in data/pneumonia
    (tmp_path / "split_pneumonia2.json").write_text("{}")
    assert missing_dataset("pneumonia2", entry, tmp_path) is None


def test_text_prompt_mode_puts_the_description_into_the_prompt_without_llm_tokens():
    """--prompt-mode text (Sec. 4.5.2): "[SOS] [ctx] {class}. {description} [EOT]", cut to CLIP's 77 tokens."""
    tok, cfg = _tiny_tok_and_clip_cfg()
    names = ["nevus", "melanoma"]
    descr = ["a small round brown lesion.", "dark irregular lesion " * 40]   # the second one is too long
    ctx_ids, suffix, eot = cilmp.prompt_tokens(tok, names, 4, 0, 77, descriptions=descr)
    first = tok.encode("nevus.").ids[1:-1] + tok.encode(descr[0]).ids[1:-1]
    assert suffix[0, :len(first)].tolist() == first
    assert int(eot[1]) == 76 and suffix.shape[1] == 77 - 1 - 4      # cut to fit, EOT kept last
    model = cilmp.CILMP(cilmp.CLIP(cfg).init_random(0), None, suffix, eot, ctx_ids,
                        cilmp.CILMPConfig(depth=4, dropout=0.0))
    assert model.L == 0 and len(model.llm_tokens) == 0 and model.reps is None
    assert {k.split(".")[0] for k in model.trainable_state()} == {"ctx", "deep_ctx", "vpt", "deep_vpt"}
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)


def test_llm_none_is_deep_vision_language_prompting_without_llm_tokens():
    args = cilmp.parse_args(["--llm", "none"])
    assert args.llm == "none" and args.clip == "tiny"
    tok, cfg = _tiny_tok_and_clip_cfg()
    ctx_ids, suffix, eot = cilmp.prompt_tokens(tok, ["nevus"], 4, 0, 77)
    assert int(eot[0]) == 1 + 4 + len(tok.encode("nevus.").ids[1:-1])   # [SOS] ctx nevus . [EOT]
    model = cilmp.build_model(args, cilmp.CLIP(cfg).init_random(0), tok, ["nevus", "melanoma"], None, None)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.L == 0 and n == 4 * 48 + 3 * 4 * 48 + 4 * 48 + 3 * 4 * 48
    with pytest.raises(SystemExit):
        cilmp.parse_args(["--llm", "none", "--prompt-mode", "text"])


def test_gpa_weights():
    w = cilmp.gpa_weights(100)
    assert abs(sum(w) - 1) < 1e-12 and w[-1] == max(w) and w[0] < w[-1] / 100


# ---------------------------------------------------------------------------------------------------------
# the script


def _run(args, timeout=int(os.environ.get("CILMP_TEST_TIMEOUT", 600)), env=None):  # raise it on a crowded machine
    return subprocess.run([sys.executable, str(REPO / "cilmp.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


# The user-mistake tests call main() in this process (main() is what the command line runs: sys.exit(main())):
# a subprocess would add ~3 s of CPU for importing torch, and ~30 s of wall time on a crowded 2-core machine.
def test_resume_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:   # argparse's error: usage + message, exit 2
        cilmp.main(["--resume", str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err


def test_missing_real_data_prints_help_not_traceback(tmp_path, capsys):
    assert cilmp.main(["--data", "isic", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "python -m common.prepare isic" in err and "ISIC 2018" in err and not (tmp_path / "run").exists()


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """2 gloo ranks x 4 images, DDP-averaged gradients, one SGD step == 1 process x 8 images."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp.safetensors")), nprocs=2, join=True)
    model, params, opt = _one_step_setup()
    x, y = _fixed_batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    single = model.trainable_state()
    assert ddp.keys() == single.keys()
    moved = 0.0
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4)  # summation order only
        moved += (single[k] - _one_step_setup()[0].trainable_state()[k]).abs().sum().item()
    assert moved > 0  # the step really changed the weights


def _fixed_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 3, (8,), generator=g)


def _one_step_setup():
    model = _tiny_model(dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, params, opt = _one_step_setup()
    from common import run as R
    net = R.wrap_model(model, R.World(rank=rank, size=world))   # DDP over the trainables, CLIP ignored
    assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
    x, y = _fixed_batch()
    n = x.shape[0] // world
    F.cross_entropy(net(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
    opt.step()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (the tiny LLM's class representations) shared by the script tests below."""
    return tmp_path_factory.mktemp("cilmp_cache")


# Shortened runs for the tests (`python cilmp.py` alone runs the full demo): a few epochs, and for the tests of run
# mechanics (resume, Ctrl-C, DDP, errors) 10% of the labels (60 images) where they train for several epochs.
def _fast(cache, *more):
    return ["--cache-dir", str(cache), *more]


def test_demo_end_to_end_and_eval_only(cache, tmp_path):
    """The demo on a shortened schedule (3 epochs at batch 64): trains, evaluates, writes the run folder."""
    out = tmp_path / "run"
    r = _run(_fast(cache, "--epochs", "3", "--batch-size", "64", "--out", str(out)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    # 6 classes, chance 0.167 / AUROC 0.5 / kappa 0; this shortened run measured ACC 0.383, AUROC 0.712, kappa 0.26
    # (the full demo trains the prompts 12 epochs: see the README)
    assert m["acc"] > 0.28 and m["auroc"] > 0.62 and m["kappa"] > 0.15, (m["acc"], m["auroc"], m["kappa"])
    assert len(m["per_class"]) == 6 and len(m["confusion"]) == 6
    for f in ("args.json", "env.json", "metrics.jsonl", "trainable.safetensors"):
        assert (out / f).exists(), f
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]                 # 9 steps an epoch (600 // 64), it learned
    assert "kappa" in r.stdout and "melanoma" in r.stdout    # the per-class table was printed
    w = load_file(str(out / "trainable.safetensors"))
    assert w and not any(k.startswith("clip.") for k in w)   # only trainable tensors are saved
    descr = list((cache / "llm_reps" / "tiny").glob("*.json"))
    assert descr and len(json.loads(descr[0].read_text())["descriptions"]) == 6

    assert cilmp.main(["--eval-only", "--resume", str(out)]) == 0   # in this process: no second torch import
    again = json.loads((out / "metrics.json").read_text())
    assert again["acc"] == m["acc"] and again["confusion"] == m["confusion"]


def test_ctrl_c_says_where_the_checkpoint_is_and_resume_reaches_the_same_weights(cache, tmp_path, capsys):
    """Ctrl-C after the first checkpoint: exit 2 with the checkpoint and the --resume command; --resume RUN then
    ends bit-identical to an uninterrupted run (data order, RNG, optimizer, GPA all restored). The stopped run
    is a real process that gets a real SIGINT; the reference and the resumed run run in this process."""
    import signal
    common = _fast(cache, "--epochs", "3", "--batch-size", "16", "--label-ratio", "0.1")   # 3 x 3 steps
    ref = tmp_path / "ref"
    assert cilmp.main(common + ["--out", str(ref)]) == 0
    assert "label ratio 0.1: 60 training images" in capsys.readouterr().out
    run = tmp_path / "stopped"
    # SIGINT's default action in the child even when pytest runs as a background job (`... &` in a script),
    # which starts every child with SIGINT ignored: the signal would then never reach the run
    p = subprocess.Popen([sys.executable, str(REPO / "cilmp.py"), *common, "--out", str(run)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not (run / "ckpt" / "latest").exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "interrupted" in err and "last good checkpoint is" in err and f"--resume {run}" in err
    assert not (run / "trainable.safetensors").exists(), "the run finished before it could be stopped"
    assert cilmp.main(["--resume", str(run)]) == 0   # the run's own args.json supplies every other flag
    assert "resuming from" in capsys.readouterr().out
    a, b = load_file(str(ref / "trainable.safetensors")), load_file(str(run / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(SystemExit) as e:   # a flag that changes what is trained is refused
        cilmp.main(["--resume", str(run), "--data", "isic"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "would change what the run trains" in err and "--data isic" in err


def test_torchrun_two_cpu_processes(cache, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        port, str(REPO / "cilmp.py"), *_fast(cache, "--epochs", "1", "--batch-size", "32",
                                                             "--steps", "4", "--out", str(out))],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "train 4/4" in r.stdout                        # 4 steps of 2 x 32 images
    m = json.loads((out / "metrics.json").read_text())
    assert sum(c["n"] for c in m["per_class"]) == 240     # rank 0 evaluated the whole test set, once
    assert (out / "args.json").exists() and len(list(out.parent.iterdir())) == 1   # one run folder for both ranks


def test_runs_on_a_mock_converted_isic_in_text_prompt_mode(cache, tmp_path):
    """`python -m common.prepare isic` on a mock of the official layout, then cilmp.py --data isic with the
    paper's plain-text baseline (--prompt-mode text) and non-default prompt sizes, no other step."""
    from test_prepare import make_isic
    src = make_isic(tmp_path / "raw", per_class=(3, 1, 2))
    from common import prepare
    assert prepare.main(["isic", "--src", str(src), "--out", str(tmp_path / "isic")]) == 0   # in this process
    r = _run(_fast(cache, "--data", "isic", "--data-dir", str(tmp_path / "isic"), "--clip", "tiny", "--llm", "tiny",
                   "--max-new-tokens", "24", "--prompt-mode", "text", "--n-ctx", "2", "--n-vpt", "2",
                   "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "run")))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [c["class"] for c in m["per_class"]] == prepare.CLASSNAMES["isic"]
    assert sum(c["n"] for c in m["per_class"]) == 14
    w = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert w["ctx"].shape == (2, 48) and w["vpt"].shape == (2, 48) and not any("llm" in k for k in w)
    assert len(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])) > 0
    assert "train 4/4" in r.stdout                        # 21 images // 8 = 2 steps an epoch: the partial batch dropped


def test_llama3_and_llama2_chat_formats():
    tok = cilmp.bpe_tokenizer(REPO / "common" / "tokenizers" / "llama_tiny.json")
    ids = cilmp.chat_ids(tok, "Q?", "llama3")
    specials = [tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>")]
    assert ids[0] == specials[0] and ids.count(specials[1]) == 2 and ids.count(specials[3]) == 1
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert cilmp.stop_ids(tok, "llama3") == [specials[3], tok.token_to_id("<|end_of_text|>")]
    assert "[INST] Q? [/INST]" in tok.decode(cilmp.chat_ids(tok, " Q? ", "llama2"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    out = tmp_path / "run"
    # epoch 0 is the warm-up at a sane lr; epoch 1 at lr 1e30 blows up
    common = _fast(cache, "--epochs", "3", "--batch-size", "16", "--label-ratio", "0.1", "--lr", "1e30")
    r = _run(common + ["--out", str(out)])
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "loss is" in r.stderr and "last good checkpoint is" in r.stderr and "--resume" in r.stderr
    assert (out / "ckpt" / "latest").read_text().strip() == "step_0000003"   # 60 images // 16 = 3 steps
    ck = load_file(str(out / "ckpt" / "step_0000003" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in ck.values())
    assert not (out / "trainable.safetensors").exists()
    # without a warm-up the first step blows up: nothing to resume, and the message says so
    r = _run(common + ["--warmup-epochs", "0", "--out", str(tmp_path / "run0")])
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "No checkpoint was written yet" in r.stderr and "last good" not in r.stderr


def test_seeds_report_mean_and_std(cache, tmp_path):
    r = _run(_fast(cache, "--seeds", "1,2", "--epochs", "1", "--steps", "1", "--batch-size", "16",
                   "--out", str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    accs = [json.loads((tmp_path / f"seed{k}" / "metrics.json").read_text())["acc"] for k in (1, 2)]
    assert abs(s["acc"]["mean"] - sum(accs) / 2) < 1e-12 and abs(s["acc"]["std"] - abs(accs[0] - accs[1]) / 2) < 1e-12
    assert "over seeds 1, 2" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# user mistakes: a message and exit 2, nothing written


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be above 0"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--steps", "-1"], "--steps -1"),
    (["--precision", "fp16"], "fp16 needs CUDA"),
    (["--device", "cuda"], "--device cuda: not available"),
    (["--device", "cuda:3"], "--device cuda:3: not available"),
    (["--device", "mps"], "--device mps: not available"),
    (["--device", "tpu"], "--device tpu: unknown device"),
    (["--clip", "tiny", "--clip-path", "openai/clip-vit-base-patch16"], "--clip-path is for a real model"),
    (["--llm", "tiny", "--llm-path", "some/llama"], "--llm-path is for a real model"),
    (["--n-ctx", "0"], "--n-ctx 0"), (["--label-ratio", "0"], "--label-ratio 0.0"),
    (["--label-ratio", "1.5"], "--label-ratio 1.5"), (["--warmup-epochs", "-1"], "--warmup-epochs -1"),
    (["--eval-only"], "--eval-only needs --resume"), (["--seeds", "1,a"], "--seeds 1,a: must be comma-separated"),
])
def test_user_mistakes_exit_2_with_a_message(argv, words, tmp_path, capsys):
    if torch.cuda.is_available() and argv[0] in ("--device", "--precision"):
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cilmp.parse_args(argv + ["--out", str(out)])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not out.exists()   # nothing written (no args.json left behind)


def test_eval_only_loads_the_finished_weights_and_refuses_an_unfinished_run(tmp_path):
    """--eval-only goes through R.load_final: the run's trainable.safetensors, every trainable tensor required."""
    from common import run as R
    model = _tiny_model()
    with pytest.raises(R.RunError, match="has not finished"):
        R.load_final(model, tmp_path, "cpu", required=model.trainable_state())
    R.save_tensors(tmp_path / "trainable.safetensors", {"ctx": torch.ones_like(model.ctx)})
    with pytest.raises(WeightsError, match="deep_ctx"):   # a tensor the run must have saved is missing
        R.load_final(model, tmp_path, "cpu", required=model.trainable_state())
    R.save_tensors(tmp_path / "trainable.safetensors", {k: v + 1 for k, v in model.trainable_state().items()})
    want = model.ctx + 1
    assert torch.equal(R.load_final(model, tmp_path, "cpu", required=model.trainable_state()).ctx, want)


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("mine")
    with pytest.raises(SystemExit) as e:
        cilmp.parse_args(["--out", str(f)])
    assert e.value.code == 2 and "that is a file" in capsys.readouterr().err and f.read_text() == "mine"


def test_clip_path_selects_the_real_clip():
    args = cilmp.parse_args(["--clip-path", "/some/clip"])   # on the demo data: the real model, not the tiny one
    assert args.clip == "vit-b16" and args.llm == "tiny"


def test_clip_config_without_vision_config_is_a_message_before_any_work(tmp_path, capsys):
    folder = tmp_path / "clip"
    folder.mkdir()
    hf = _clip_hf_config()
    del hf["vision_config"]
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "model.safetensors").symlink_to(G / "clip_tiny" / "model.safetensors")
    argv = ["--clip-path", str(folder), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    assert cilmp.main(argv) == 2
    assert "has no vision_config" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_bf16_autocast_with_half_frozen_weights_matches_fp32():
    """--precision bf16: frozen matmul weights stored in bf16, trainables fp32, under autocast (CPU here)."""
    from common import run as R
    model = _tiny_model()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    R.cast_frozen(model, torch.bfloat16)
    assert model.clip.conv1.weight.dtype == torch.bfloat16 and model.clip.ln_pre.weight.dtype == torch.float32
    assert model.ctx.dtype == torch.float32
    with R.autocast(torch.device("cpu"), "bf16"):
        out = model(x)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()   # bf16 keeps ~3 significant digits
    out.float().sum().backward()
    assert model.ctx.grad is not None and model.ctx.grad.dtype == torch.float32


def test_llm_representations_are_the_last_token_of_every_layer():
    """Sec. 3.2.1: answer greedily, append the end-of-turn token if cut, re-run, keep hidden_states[1:] at the
    last position -> (n_layers, D) per class (checked against a direct forward of the same sequence)."""
    llm = cilmp.Llama.from_pretrained(G / "llama_tiny", dtype=torch.float32)
    tok = cilmp.bpe_tokenizer(G / "llama_tiny" / "tokenizer.json")
    reps, texts = cilmp.llm_representations(llm, tok, ["melanoma", "nevus"], "llama3", max_new_tokens=6,
                                            verbose=False)
    assert reps.shape == (2, 3, 64) and len(texts) == 2 and reps.dtype == torch.float32
    ids = cilmp.chat_ids(tok, cilmp.QUESTION.format("nevus"), "llama3")
    stops = cilmp.stop_ids(tok, "llama3")
    new = llm.generate(torch.tensor([ids]), 6, stops)
    full = torch.tensor([ids + new + ([] if new[-1] in stops else [tok.token_to_id("<|eot_id|>")])])
    torch.testing.assert_close(reps[1], llm(full, all_hidden=True)[1:, 0, -1])
    assert not torch.allclose(reps[0], reps[1])


def test_bench_runs_and_reports_every_figure(monkeypatch, capsys):
    """--bench at a tiny size (the real one takes minutes): both precisions, both steps, all the figures."""
    tiny = replace(cilmp.CLIP_PRESETS["tiny"]["config"], vocab_size=49408)
    monkeypatch.setattr(cilmp, "BENCH_SIZE", dict(clip=tiny, llm_layers=10, llm_dim=64, classes=3))
    peak = cilmp.R.matmul_peak_flops  # the MFU denominator from a 256^3 matmul (2048^3 in bf16 takes minutes on CPU)
    monkeypatch.setattr(cilmp.R, "matmul_peak_flops", lambda device, dtype: peak(device, dtype, n=256))
    args = cilmp.parse_args(["--bench", "--bench-steps", "1"])
    assert args.batch_size == 8
    rows = cilmp.run_bench(args, cilmp.R.World(), ["fp32", "bf16"])
    assert [(r["what"], r["precision"]) for r in rows] == [("CILMP train step", "fp32"), ("CILMP train step", "bf16")]
    for r in rows:
        assert r["step_ms"] > 0 and r["items_per_s"] > 0 and 0 < r["mfu"] and r["peak_mem_mb"] > 0
    out = capsys.readouterr().out
    assert "MFU" in out and out.count(" | B=8 ") == 2


def test_the_committed_demo_clip_is_the_tiny_preset_pretrained():
    """common/demo_weights/cilmp_clip.safetensors (made by make_cilmp_clip.py): every tensor of the tiny preset, in
    fp16, small enough to commit, and a pre-trained CLIP: the demo's test images no longer share one feature, and
    each finds its own report among 64 far above chance."""
    from safetensors import safe_open
    from common.data import ImageReportDataset
    from common.demo import ensure_demo
    from common.demo_weights.make_cilmp_clip import REPORT_LEN, tokenize
    from common.transforms import CLIP_MEAN, CLIP_STD, eval_transform
    assert cilmp.DEMO_CLIP.stat().st_size < 600_000                                  # 470 KB
    with safe_open(str(cilmp.DEMO_CLIP), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    clip, tok = cilmp.build_clip(cilmp.parse_args([]))    # R.load_tensors: every key and shape of the tiny preset
    assert abs(clip.logit_scale.item() - np.log(100)) < 1e-2
    root = ensure_demo(REPO / "data" / "demo")
    ds = ImageReportDataset(root, root / "reports_test.csv", eval_transform(clip.cfg.image_size, CLIP_MEAN, CLIP_STD))
    b = next(iter(torch.utils.data.DataLoader(ds, 64)))
    with torch.no_grad():
        f = F.normalize(clip.encode_image(b["image"]), dim=-1)                            # (64, E)
        t = F.normalize(clip.encode_text(tokenize(tok, b["report"], REPORT_LEN)), dim=-1)  # (64, E)
    assert (f @ f.T)[~torch.eye(64, dtype=torch.bool)].mean() < 0.6        # measured 0.33; a random tiny ViT 0.95
    top5 = ((f @ t.T).topk(5, 1).indices == torch.arange(64)[:, None]).any(1).float().mean()
    assert top5 > 0.3                                                      # measured 0.48; chance 5/64 = 0.08


def test_a_missing_demo_clip_is_one_message_naming_the_command_that_remakes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cilmp, "DEMO_CLIP", tmp_path / "cilmp_clip.safetensors")
    assert cilmp.main(["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "python -m common.demo_weights.make_cilmp_clip" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_an_unwritable_cache_dir_is_reported_before_any_work(tmp_path, capsys):
    # the preflight lists it with missing data/weights, before any LLM pass
    assert cilmp.main(["--cache-dir", "/proc/cilmp-cache", "--out", str(tmp_path / "run")]) == 2
    assert "--cache-dir /proc/cilmp-cache: cannot write there" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
