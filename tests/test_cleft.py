"""Tests for cleft.py: parity with transformers / peft (goldens made by tests/goldens/make_cleft_goldens.py),
PEFT invariants, weight-loading errors, parameter counts, and end-to-end runs on the demo data (both stages,
kill + --resume, 2-process DDP, missing data)."""
import json
import math
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cleft  # noqa: E402
from common.weights import WeightsError  # noqa: E402

GOLD = REPO / "tests" / "goldens"
TOL = 1e-5


def io(name):
    return load_file(str(GOLD / name / "io.safetensors"))


def max_diff(a, b):
    return (a - b).abs().max().item()

# ----------------------------------------------------------------------------------------------------------
# parity with HF transformers 5.23 / peft 0.21 (fp32, eval mode)


def test_dinov2_matches_hf_including_pos_embed_interpolation():
    model = cleft.DINOv2.from_pretrained(GOLD / "cleft_dinov2").eval()
    g = io("cleft_dinov2")
    assert model.cfg.pos_grid == 4 and model.cfg.n_registers == 4 and model.cfg.layerscale == 0.7
    with torch.no_grad():
        for k in "abc":  # 24x24 -> 6x6 grid, 20x28 -> 5x7 (non-square), 16x16 = the checkpoint's 4x4 grid
            out, prenorm = model(g[f"pixel_values_{k}"])
            assert out.shape == g[f"last_hidden_state_{k}"].shape
            assert max_diff(out, g[f"last_hidden_state_{k}"]) < TOL
            assert max_diff(prenorm.mean(1), g[f"pooled_prenorm_mean_{k}"]) < TOL


def test_plain_dinov2_without_registers_matches_hf_dinov2model():
    """facebook/dinov2-small / -base are Dinov2Model: no register parameter at all, and HF resizes their position
    grid without antialias (down-sampling case c shows the difference)."""
    model = cleft.DINOv2.from_pretrained(GOLD / "cleft_dinov2_plain").eval()
    g = io("cleft_dinov2_plain")
    assert model.cfg.n_registers == 0 and model.register_tokens is None and not model.cfg.pos_antialias
    assert not any("register" in k for k in model.state_dict())
    with torch.no_grad():
        for k in "abc":  # 24x24 -> 6x6, 20x28 -> 5x7 (non-square), 12x8 -> 3x2 (down-sampled grid)
            out, prenorm = model(g[f"pixel_values_{k}"])
            assert out.shape == g[f"last_hidden_state_{k}"].shape
            assert max_diff(out, g[f"last_hidden_state_{k}"]) < TOL
            assert max_diff(out[:, 0], g[f"pooler_output_{k}"]) < TOL   # the CLS token, as documented
            assert max_diff(prenorm, g[f"prenorm_{k}"]) < TOL
        model.cfg.pos_antialias = True  # the registers model's resize: the golden tells them apart
        assert max_diff(model(g["pixel_values_c"])[0], g["last_hidden_state_c"]) > 1e-3


@pytest.mark.parametrize("name", ["cleft_gpt2", "cleft_gpt2_scaled"])
def test_gpt2_matches_hf(name):
    model = cleft.GPT2.from_pretrained(GOLD / name).eval()
    assert model.cfg.scale_by_inverse_layer == (name == "cleft_gpt2_scaled")
    g = io(name)
    with torch.no_grad():
        h = model(g["input_ids"], g["attention_mask"])
    assert max_diff(h, g["last_hidden_state"]) < TOL  # every position, padding included


def test_inverse_layer_scaling_matters():
    """The scaled golden is not reproduced without the 1/(layer+1) factor: the test above can tell them apart."""
    model = cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled").eval()
    for i, blk in enumerate(model.h):
        blk.attn.scale *= i + 1
    g = io("cleft_gpt2_scaled")
    with torch.no_grad():
        assert max_diff(model(g["input_ids"], g["attention_mask"]), g["last_hidden_state"]) > 1e-2


def peft_llm(method):
    llm = cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled")
    cleft.add_peft(llm, cleft.PEFTConfig(method))
    return cleft.load_adapter(llm, GOLD / f"cleft_{method}").eval()


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix"])
def test_peft_matches_peft_library(method):
    llm, g = peft_llm(method), io(f"cleft_{method}")
    base = cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled").eval()
    with torch.no_grad():
        h = cleft.run_llm(llm, g["input_ids"], g["attention_mask"])  # with the prefix for "prefix"
        assert max_diff(h, g["last_hidden_state"]) < TOL
        # and the adapter does change the output (non-zero lora_B, non-one IA3 vectors, a random prefix)
        assert max_diff(base(g["input_ids"], g["attention_mask"]), g["last_hidden_state"]) > 1e-2


def test_peft_parameter_names_and_shapes_are_pefts():
    llm = peft_llm("lora")
    sd = cleft.adapter_state_dict(llm)
    assert sorted(sd) == sorted(f"h.{i}.attn.c_attn.lora_{ab}.weight" for i in range(3) for ab in "AB")
    assert sd["h.0.attn.c_attn.lora_A.weight"].shape == (8, 48) and sd["h.0.attn.c_attn.lora_B.weight"].shape == (144, 8)
    ia3 = cleft.adapter_state_dict(peft_llm("ia3"))
    assert ia3["h.1.attn.c_attn.ia3_l"].shape == (144, 1) and ia3["h.1.mlp.c_proj.ia3_l"].shape == (1, 192)
    assert cleft.adapter_state_dict(peft_llm("prefix"))["prefix.embedding.weight"].shape == (20, 3 * 2 * 48)
    # our own format round-trips too
    other = cleft.add_peft(cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled"), cleft.PEFTConfig("lora"))
    cleft.load_adapter(other, sd)
    assert all(torch.equal(v, cleft.adapter_state_dict(other)[k]) for k, v in sd.items())


def test_adapters_are_identity_at_init():
    g = io("cleft_gpt2_scaled")
    base = cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled").eval()
    with torch.no_grad():
        ref = base(g["input_ids"], g["attention_mask"])
        for method in ("lora", "ia3"):
            llm = cleft.add_peft(cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled"), cleft.PEFTConfig(method)).eval()
            assert torch.equal(llm(g["input_ids"], g["attention_mask"]), ref)


def test_lora_merge_equals_peft_merge_and_unmerge_restores():
    llm, g = peft_llm("lora"), io("cleft_lora")
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    with torch.no_grad():
        unmerged = llm(g["input_ids"], g["attention_mask"])
        cleft.set_merged(llm, True)
        # peft merged the Conv1D weight (in, out); ours is nn.Linear (out, in)
        assert max_diff(llm.h[0].attn.c_attn.weight.t(), g["merged_c_attn_weight_0"]) < 1e-6
        merged = llm(g["input_ids"], g["attention_mask"])
        assert max_diff(merged, unmerged) < TOL and max_diff(merged, g["merged_last_hidden_state"]) < TOL
        with pytest.raises(RuntimeError, match="already merged"):
            llm.h[0].attn.c_attn.merge()
        cleft.set_merged(llm, False)
    assert all(max_diff(v, before[k]) < 1e-6 for k, v in llm.state_dict().items())
    with pytest.raises(RuntimeError, match="not merged"):
        llm.h[0].attn.c_attn.unmerge()


def test_ia3_merge_equals_unmerged():
    llm, g = peft_llm("ia3"), io("cleft_ia3")
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    with torch.no_grad():
        cleft.set_merged(llm, True)
        assert max_diff(llm(g["input_ids"], g["attention_mask"]), g["last_hidden_state"]) < TOL
        with pytest.raises(RuntimeError, match="already merged"):
            llm.h[0].attn.c_attn.merge()
        cleft.set_merged(llm, False)
    assert all(max_diff(v, before[k]) < 1e-5 for k, v in llm.state_dict().items())
    with pytest.raises(RuntimeError, match="not merged"):
        llm.h[0].mlp.c_proj.unmerge()


def reference_attention(q, k, v, scale, mask=None, causal=False):
    att = (q @ k.transpose(-2, -1)) * scale
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1) @ v


def test_attention_is_softmax_qk_v_with_mask_causal_and_scale():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    k2, v2 = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    assert max_diff(cleft.attention(q, k, v, 0.3, causal=True), reference_attention(q, k, v, 0.3, causal=True)) < 1e-6
    assert max_diff(cleft.attention(q, k2, v2, 0.7, mask=mask), reference_attention(q, k2, v2, 0.7, mask)) < 1e-6
    assert max_diff(cleft.attention(q, k, v, 0.5), reference_attention(q, k, v, 0.5)) < 1e-6

# ----------------------------------------------------------------------------------------------------------
# config readers: transformers 4.x and 5.x layouts, and refusals of what is not implemented

# config.json as transformers 4.x wrote it for these same tiny models (the layout of openai-community/gpt2 and
# facebook/dinov2-base on the hub: n_ctx, torch_dtype, no scale_attn_weights / add_cross_attention / use_mask_token)
GPT2_V4 = {"activation_function": "gelu_new", "architectures": ["GPT2Model"], "attn_pdrop": 0.1, "bos_token_id": 725,
           "embd_pdrop": 0.1, "eos_token_id": 725, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
           "model_type": "gpt2", "n_ctx": 64, "n_embd": 48, "n_head": 4, "n_layer": 3, "n_positions": 64,
           "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
           "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
           "torch_dtype": "float32", "transformers_version": "4.35.2", "vocab_size": 726}
DINOV2_V4 = {"architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
             "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 48, "image_size": 16,
             "initializer_range": 0.02, "layer_norm_eps": 1e-06, "layerscale_value": 0.7, "mlp_ratio": 4,
             "model_type": "dinov2", "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 2,
             "patch_size": 4, "qkv_bias": True, "torch_dtype": "float32", "transformers_version": "4.31.0.dev0",
             "use_swiglu_ffn": False}


def with_config(tmp_path, src, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    return tmp_path


def test_gpt2_reads_the_transformers_4_layout_and_the_aliases(tmp_path):
    g = io("cleft_gpt2")
    v5 = cleft.gpt2_config_from_hf(json.loads((GOLD / "cleft_gpt2" / "config.json").read_text()))
    assert cleft.gpt2_config_from_hf(GPT2_V4) == v5
    aliased = {k: v for k, v in GPT2_V4.items() if k not in ("n_embd", "n_head", "n_layer", "n_positions", "n_ctx",
                                                               "layer_norm_epsilon")}
    aliased |= {"hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 3, "max_position_embeddings": 64,
                "layer_norm_eps": 1e-5}
    assert cleft.gpt2_config_from_hf(aliased) == v5
    model = cleft.GPT2.from_pretrained(with_config(tmp_path, GOLD / "cleft_gpt2", GPT2_V4)).eval()
    with torch.no_grad():
        assert max_diff(model(g["input_ids"], g["attention_mask"]), g["last_hidden_state"]) < TOL


def test_gpt2_reorder_and_upcast_attn_matches_hf():
    model = cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_upcast").eval()
    assert model.cfg.upcast_attn and model.cfg.scale_by_inverse_layer
    g = io("cleft_gpt2_upcast")
    with torch.no_grad():
        assert max_diff(model(g["input_ids"], g["attention_mask"]), g["last_hidden_state"]) < TOL


def test_dinov2_reads_the_transformers_4_layout(tmp_path):
    g = io("cleft_dinov2_plain")
    v5 = cleft.dinov2_config_from_hf(json.loads((GOLD / "cleft_dinov2_plain" / "config.json").read_text()))
    assert cleft.dinov2_config_from_hf(DINOV2_V4) == v5
    model = cleft.DINOv2.from_pretrained(with_config(tmp_path, GOLD / "cleft_dinov2_plain", DINOV2_V4)).eval()
    with torch.no_grad():
        assert max_diff(model(g["pixel_values_b"])[0], g["last_hidden_state_b"]) < TOL
    reg = json.loads((GOLD / "cleft_dinov2" / "config.json").read_text())
    assert cleft.dinov2_config_from_hf(reg).n_registers == 4 and cleft.dinov2_config_from_hf(reg).pos_antialias


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"), ("activation_function", "gelu"), ("scale_attn_weights", False),
    ("add_cross_attention", True), ("n_inner", 100), ("attn_pdrop", 0.0), ("model_type", "gpt_neo"),
    ("n_embd", 50)])
def test_gpt2_config_refuses_what_is_not_implemented(field, value):
    with pytest.raises(WeightsError, match=field if field != "n_embd" else "not divisible"):
        cleft.gpt2_config_from_hf(GPT2_V4 | {field: value})


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "gelu_new"), ("use_swiglu_ffn", True), ("qkv_bias", False), ("num_channels", 1),
    ("hidden_dropout_prob", 0.1), ("attention_probs_dropout_prob", 0.1), ("image_size", [16, 32]),
    ("mlp_ratio", 2.5), ("model_type", "vit"), ("num_attention_heads", 5)])
def test_dinov2_config_refuses_what_is_not_implemented(field, value):
    match = {"image_size": "non-square", "num_attention_heads": "not divisible"}.get(field, field)
    with pytest.raises(WeightsError, match=match):
        cleft.dinov2_config_from_hf(DINOV2_V4 | {field: value})


# ----------------------------------------------------------------------------------------------------------
# weight loading errors name the tensor


def test_key_map_names_missing_and_misshaped_tensors(tmp_path):
    src = GOLD / "cleft_gpt2"
    sd = load_file(str(src / "model.safetensors"))
    del sd["h.1.mlp.c_fc.bias"]
    sd["h.2.attn.c_proj.weight"] = torch.zeros(48, 40)
    sd["h.0.attn.rotary.inv_freq"] = torch.zeros(3)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        cleft.GPT2.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "h.1.mlp.c_fc.bias" in msg                       # missing (our name)
    assert "h.2.attn.c_proj.weight" in msg and "(40, 48)" in msg  # transposed Conv1D, wrong shape
    assert "h.0.attn.rotary.inv_freq" in msg                # unexpected


def test_adapter_key_map_names_unknown_tensors():
    llm = cleft.add_peft(cleft.GPT2.from_pretrained(GOLD / "cleft_gpt2_scaled"), cleft.PEFTConfig("lora"))
    sd = load_file(str(GOLD / "cleft_lora" / "adapter_model.safetensors"))
    sd["base_model.model.transformer.h.0.attn.c_proj.lora_A.weight"] = torch.zeros(8, 48)
    with pytest.raises(WeightsError, match="c_proj.lora_A"):
        cleft.load_adapter(llm, sd)

# ----------------------------------------------------------------------------------------------------------
# sizes at the paper's configuration (meta device: no memory)


def test_trainable_parameters_biomedlm_lora():
    args = cleft.parse_args(["--data", "chexpert"])
    rows = {r[0]: r[1:] for r in cleft.count_params(args)}
    assert rows["text: PEFT adapter"] == (2_621_440, 2_621_440)  # 32 layers x 8 x (2560 + 7680)
    assert rows["text projection"][1] == 2560 * 512 + 512
    assert rows["image projection"][1] == 768 * 512 + 512
    assert rows["text: LLM (frozen)"] == (2_594_247_680, 0)
    # DINOv2-B/14 with registers as HF counts it (86,583,552) minus the unused mask token (768), and its final
    # norm (1,536) stays frozen: we pool before it
    assert rows["vision: DINOv2"] == (86_582_784, 86_582_784 - 1536)


def test_text_pooling_takes_first_pad_or_last_real_token():
    torch.manual_seed(0)
    vit = cleft.DINOv2(cleft.DINOv2Config(dim=16, n_layers=1, n_heads=2, patch_size=8, pos_grid=2))
    llm = cleft.GPT2(cleft.GPT2Config(vocab_size=10, n_positions=16, dim=16, n_layers=1, n_heads=2, dropout=0.0))
    model = cleft.CLEFT(vit, llm, emb_dim=8).eval()
    ids = torch.tensor([[3, 4, 9, 9], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        h = llm(ids, mask)
        want = torch.nn.functional.normalize(model.txt_proj(torch.stack([h[0, 2], h[1, 3]])), dim=-1)
        assert torch.allclose(model.encode_text(ids, mask), want, atol=1e-6)

# ----------------------------------------------------------------------------------------------------------
# end to end on the demo data


def demo_args(out, *extra):
    return ["--out", str(out), "--batch-size", "16", "--log-every", "1", "--print-every", "100", "--threads", "1", *extra]


def losses(path, key="loss"):
    return [r[key] for r in map(json.loads, Path(path).read_text().splitlines()) if key in r]


def test_demo_both_stages_end_to_end(tmp_path):
    assert cleft.main(demo_args(tmp_path, "--steps", "24")) == 0
    for stage in ("stage1", "stage2"):
        assert (tmp_path / stage / "trainable.safetensors").is_file()
        assert json.loads((tmp_path / stage / "model.json").read_text())["peft"]["method"] == "lora"
    l1 = losses(tmp_path / "stage1" / "metrics.jsonl")
    assert len(l1) == 24 and sum(l1[-6:]) / 6 < sum(l1[:6]) / 6  # the contrastive loss falls
    assert len(losses(tmp_path / "stage1" / "metrics.jsonl", "val_loss")) == 1
    for name in ("contrastive", "prompt"):
        rep = json.loads((tmp_path / f"metrics_zero-shot_after_{name}.json").read_text())
        assert sum(r["n"] for r in rep["per_class"]) == 240 and 0 <= rep["acc"] <= 1
    saved = load_file(str(tmp_path / "stage2" / "trainable.safetensors"))
    assert saved["ctx"].shape == (30, 64) and not any(k.startswith("llm.wte") for k in saved)


def test_ctrl_c_then_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-run: a message naming the last checkpoint and the --resume command, exit 2, no traceback;
    --resume then ends bit for bit where an uninterrupted run ends. The KeyboardInterrupt (what Python makes of
    SIGINT) comes right after the step-3 checkpoint, in this process: no race with a real signal's timing."""
    common = ["--stage", "contrastive", "--steps", "6", "--ckpt-every", "3"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    assert cleft.main(demo_args(ref, *common)) == 0
    save = cleft.R.Checkpoints.save

    def save_then_ctrl_c(self, step, *a, **kw):
        folder = save(self, step, *a, **kw)
        if step == 3:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(cleft.R.Checkpoints, "save", save_then_ctrl_c)
    capsys.readouterr()
    assert cleft.main(demo_args(stopped, *common)) == 2
    err = capsys.readouterr().err
    assert not (stopped / "stage1" / "trainable.safetensors").exists() and "Traceback" not in err
    assert "interrupted. The last good checkpoint is" in err and "step_0000003" in err
    assert f"python cleft.py --resume {stopped}" in err
    monkeypatch.undo()
    assert cleft.main(["--resume", str(stopped)]) == 0  # the other flags come from the run's args.json
    assert "resuming from" in capsys.readouterr().out
    a, b = (load_file(str(run / "stage1" / "trainable.safetensors")) for run in (ref, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def ddp_rank(rank: int, port: int, out: Path):
    """One of two gloo ranks, forked from this test process: the imports (torch, cleft and the torch._dynamo
    that DDP's constructor pulls in, ~10 s per process on a busy machine) are already done."""
    import torch.distributed as dist
    torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP team carried over from the parent
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    x, t, proj = torch.randn(8, 6), torch.randn(8, 5), torch.nn.Linear(6, 5)
    ddp = torch.nn.parallel.DistributedDataParallel(proj)
    n = 4
    img = torch.nn.functional.normalize(ddp(x[rank * n:(rank + 1) * n]), dim=-1)
    txt = torch.nn.functional.normalize(t[rank * n:(rank + 1) * n], dim=-1)
    loss = cleft.contrastive_loss(img, txt, torch.tensor(10.0))
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": proj.weight.grad}, out)
    dist.barrier()  # leave together: a rank tearing gloo down while the other still talks aborts
    dist.destroy_process_group()


def test_ddp_gathered_loss_equals_one_process_on_the_whole_batch(tmp_path):
    import multiprocessing
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401  (imported once, here, for both ranks)
    import torch._dynamo  # noqa: F401
    out = tmp_path / "out.pt"

    def launch():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        ranks = [ctx.Process(target=ddp_rank, args=(r, port, out)) for r in (0, 1)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(timeout=120)
        for p in ranks:
            if p.is_alive():  # a rank that hangs fails the test, it does not outlive it
                p.kill()
                p.join()
        return all(p.exitcode == 0 for p in ranks)

    # one retry: another process can take the free port before rank 0 binds it (a busy machine)
    assert launch() or launch(), "a DDP rank failed (its traceback is in the captured stderr)"
    got = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    x, t, proj = torch.randn(8, 6), torch.randn(8, 5), torch.nn.Linear(6, 5)
    loss = cleft.contrastive_loss(torch.nn.functional.normalize(proj(x), dim=-1),
                                  torch.nn.functional.normalize(t, dim=-1), torch.tensor(10.0))
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-5)
    assert torch.allclose(got["grad"], proj.weight.grad, atol=1e-5)


def test_missing_data_says_what_to_get(tmp_path, capsys):
    assert cleft.main(["--data", "rsna", "--data-dir", str(tmp_path), "--eval", "linear-probe", "--out",
                       str(tmp_path / "run"), "--vit", "tiny", "--llm", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "split_rsna.json" in err and "kaggle.com/c/rsna-pneumonia" in err and "common.prepare rsna" in err


def make_chexpert(root, n_train=40, n_valid=12, laterals=()):
    """A CheXpert folder as common.prepare writes it: train.csv / valid.csv (Path + metadata + 14 findings) and
    split_chexpert5x200.json (test only), with tiny grey PNGs. Train rows in `laterals` are lateral views."""
    import csv
    import numpy as np
    from PIL import Image
    from common.data import CHEXPERT_FINDINGS
    five = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_FINDINGS

    def rows(prefix, n):
        out = []
        for i in range(n):
            path = f"img/{prefix}{i}.png"
            Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(root / path)
            cells = [""] * len(CHEXPERT_FINDINGS)
            cells[CHEXPERT_FINDINGS.index(five[i % 5])] = "1.0"
            if i % 4 == 3:  # a second positive among the five: not a single-class row
                cells[CHEXPERT_FINDINGS.index(five[(i + 1) % 5])] = "1.0"
            if i % 3 == 0:
                cells[CHEXPERT_FINDINGS.index("Support Devices")] = "1.0"
            lateral = prefix == "train" and i in laterals
            out.append([path, "Male", "60", "Lateral" if lateral else "Frontal", "" if lateral else "PA"] + cells)
        return out

    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header] + rows(name, n))
    test = [[f"img/train{i}.png", k, five[k]] for k in range(5) for i in (k, k + 5)]  # 2 single-positive per class
    (root / "split_chexpert5x200.json").write_text(json.dumps({"train": [], "val": [], "test": test}))
    return five


def test_chexpert_captions_from_labels_then_zero_shot_and_linear_probe(tmp_path):
    data = tmp_path / "chexpert"
    five = make_chexpert(data)
    ds = cleft.caption_sets(cleft.parse_args(["--data", "chexpert", "--data-dir", str(data)]), 64)[0]
    assert ds.captions[3] == "this is a chest x ray of a patient with edema, pleural effusion, support devices"
    tiny = ["--vit", "tiny", "--llm", "tiny", "--data-dir", str(data), "--batch-size", "8", "--print-every", "100"]
    assert cleft.main(["--data", "chexpert", "--steps", "2", "--out", str(tmp_path / "run"), *tiny]) == 0
    rep = json.loads((tmp_path / "run" / "metrics_zero-shot_after_contrastive.json").read_text())
    assert [r["class"] for r in rep["per_class"]] == five and sum(r["n"] for r in rep["per_class"]) == 10
    prompts, words = cleft.class_texts(cleft.parse_args(["--data", "rsna"]), ["normal", "pneumonia"], data)
    assert prompts == [cleft.CXR_PREFIX + "no findings", cleft.CXR_PREFIX + "pneumonia"]
    args = ["--data", "chexpert5x200", "--eval", "linear-probe", "--init", str(tmp_path / "run"), "--epochs", "2",
            "--out", str(tmp_path / "lp"), *tiny]
    assert cleft.main(args) == 0
    train = cleft.class_sets(cleft.parse_args(args), 64)[0]
    # single-positive rows among the five (i % 4 != 3), labelled by that finding
    assert len(train) == 30 and [train.labels[j] for j in range(4)] == [0, 1, 2, 4]


def test_resume_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cleft.main(["--resume", str(tmp_path / "typo")])
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()

# ----------------------------------------------------------------------------------------------------------
# data and evaluation as the official code (issue 9 point 5)


def test_chexpert_is_frontal_only_unless_laterals(tmp_path):
    data = tmp_path / "chexpert"
    make_chexpert(data, laterals=(1, 2, 5))
    flags = ["--data", "chexpert", "--data-dir", str(data)]
    frontal = cleft.caption_sets(cleft.parse_args(flags), 64)[0]
    both = cleft.caption_sets(cleft.parse_args([*flags, "--laterals"]), 64)[0]
    assert len(both) == 40 and len(frontal) == 37 and not {1, 2, 5} & set(frontal.rows.tolist())
    five = cleft.class_sets(cleft.parse_args(flags), 64)[0]
    assert five.classnames == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert not {1, 2, 5} & set(five.rows.tolist()) and len(five) == 30 - 3  # rows 1, 2, 5 are single-positive
    assert len(cleft.class_sets(cleft.parse_args([*flags, "--laterals"]), 64)[0]) == 30


def test_weight_decay_groups_are_the_official_ones():
    vit = cleft.DINOv2(cleft.DINOv2Config(dim=16, n_layers=1, n_heads=2, patch_size=8, pos_grid=2))
    llm = cleft.GPT2(cleft.GPT2Config(vocab_size=10, n_positions=16, dim=16, n_layers=1, n_heads=2))
    model = cleft.CLEFT(vit, cleft.add_peft(llm, cleft.PEFTConfig("ia3")))
    model.add_context(torch.tensor([1, 2, 3]))
    cleft.set_trainable(model, ["vit.", "adapter", "img_proj", "txt_proj", "logit_scale", "ctx"])
    decay, plain = cleft.param_groups(model, 0.1)
    name = {id(p): k for k, p in model.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    # officially every tensor but the 1-dim ones: the 0-dim temperature, tokens, IA3 (out, 1) and the context too
    assert {"logit_scale", "vit.cls_token", "vit.register_tokens", "vit.pos_embed", "ctx",
            "llm.h.0.attn.c_attn.ia3_l", "vit.blocks.0.attn.qkv.weight"} <= decayed
    assert not any(k.endswith(("bias", "gamma")) or "norm" in k for k in decayed)


def test_embed_prompts_are_tokenised_as_officially():
    """Official EMBED prompts keep their punctuation ("4:", "biopsy-proven", "."): only lower-cased."""
    args = cleft.parse_args(["--data", "embed-birads"])
    prompts, words = cleft.class_texts(args, [f"BI-RADS {k}" for k in range(7)], REPO)
    assert prompts[4] == "this is a breast 2d full-field digital mammogram of a patient with birads score 4: " \
                         "suspicious abnormality."
    tok = Tokenizer.from_file(str(REPO / "common" / "tokenizers" / "gpt2_tiny.json"))
    ids, mask = cleft.tokenize(tok, prompts[4:5], 64, 725, as_captions=False)
    assert ids[0, :mask.sum()].tolist() == tok.encode(prompts[4]).ids
    assert cleft.tokenize(tok, prompts[4:5], 64, 725)[1].sum() < mask.sum()  # captions are cleaned: fewer tokens


def test_count_params_gives_the_papers_39_percent(capsys):
    cleft.count_params(cleft.parse_args(["--data", "chexpert"]))
    out = capsys.readouterr().out
    assert "149,620,737" in out and "39% fewer trainable (paper: 39%)" in out and "4.2% of its text encoder" in out
    assert "54% fewer" in out  # the other comparison: the same ViT with a trained BERT-base


def test_stage2_restarts_the_temperature_as_officially(tmp_path, capsys):
    out = tmp_path / "run"
    assert cleft.main(demo_args(out, "--steps", "2", "--eval-batch-size", "120")) == 0
    s1, s2 = (load_file(str(out / s / "trainable.safetensors"))["logit_scale"] for s in ("stage1", "stage2"))
    assert abs(s1.item() - math.log(1 / 0.07)) > 1e-4            # stage 1 trained it
    assert abs(s2.item() - math.log(1 / 0.07)) < 1e-6            # stage 2 starts again at 1/0.07 (frozen in ce)
    capsys.readouterr()
    assert cleft.main(["--resume", str(out), "--eval", "linear-probe"]) == 0  # evaluates the run's own weights
    assert f"loaded {out / 'stage2'}" in capsys.readouterr().out and (out / "metrics_linear-probe.json").is_file()

# ----------------------------------------------------------------------------------------------------------
# user mistakes: a message and exit 2, no traceback, nothing written (issue 9 point 2)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be above 0"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--steps", "-2"], "--steps -2: must be 0 or more"),
    (["--precision", "fp16"], "fp16 needs CUDA"),
    (["--device", "cuda:3"], "not available"),
    (["--device", "mps"], "not available"),
    (["--device", "tpu"], "unknown device"),
    (["--vit", "tiny", "--vit-path", "facebook/dinov2-base"], "--vit-path facebook/dinov2-base: must be given with a "
     "pretrained --vit (dinov2-reg-b14 or another): the tiny preset is random weights"),
    (["--llm", "tiny", "--llm-path", "some/folder"], "the tiny preset is random weights"),
    (["--data-pct", "0"], "--data-pct 0.0: must be in (0, 1]"),
    (["--eval", "zero-shot"], "needs --init"),
])
def test_user_mistakes_exit_2_with_a_message(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cleft.main(["--out", str(tmp_path / "run"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_or_unwritable_or_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        cleft.main(["--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "that is a file" in capsys.readouterr().err
    assert cleft.main(["--out", "/proc/cleft-run"]) == 2 and "cannot write" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "args.json").write_text("{}")
    assert cleft.main(["--out", str(tmp_path / "old"), "--steps", "1"]) == 2
    assert "holds a run already" in capsys.readouterr().err and (tmp_path / "old" / "args.json").read_text() == "{}"


def test_non_finite_loss_says_what_is_true(tmp_path, capsys):
    code = cleft.main(demo_args(tmp_path / "run", "--stage", "contrastive", "--steps", "4", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert code == 3 and "the loss is" in err and "No checkpoint was written yet" in err


def test_resume_refuses_flags_that_change_what_is_trained(tmp_path, capsys):
    run = tmp_path / "run"
    assert cleft.main(demo_args(run, "--stage", "contrastive", "--steps", "1")) == 0
    with pytest.raises(SystemExit) as e:
        cleft.main(["--resume", str(run), "--data", "chexpert", "--lora-r", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--data chexpert (the run has demo)" in err and "--lora-r 4" in err


def test_otsu_threshold_and_crop_on_hand_built_images():
    from PIL import Image
    from common import transforms as T
    two = np.zeros((20, 30), np.uint8)
    two[:, :12] = 50
    two[:, 12:] = 150
    assert T.otsu_threshold(two) == 50            # every t in [50, 150) separates them; cv2 keeps the first
    three = np.array([10] * 100 + [100] * 100 + [200] * 50, np.uint8)
    # by hand: t = 10 gives q1 q2 (mu1 - mu2)^2 = 0.4 * 0.6 * (10 - 133.3)^2 = 3651 > t = 100: 0.8 * 0.2 * 145^2 = 3364
    assert T.otsu_threshold(three) == 10
    img = np.full((60, 80), 8, np.uint8)           # dark border, a bright body with a darker inside
    img[10:41, 15:71] = 180
    img[20:30, 30:40] = 120
    crop = T.OtsuCrop()(Image.fromarray(img))
    assert crop.size == (56, 31) and np.asarray(crop)[0, 0] == 180
    blank = Image.fromarray(np.zeros((5, 7), np.uint8))
    assert T.OtsuCrop()(blank).size == (7, 5)


def test_official_image_pipeline_pads_crops_and_resizes():
    from PIL import Image
    from common import transforms as T
    wide = Image.fromarray(np.full((50, 100), 200, np.uint8))
    padded = np.asarray(T.LongestSidePad(256)(wide))
    assert padded.shape == (256, 256) and padded[:64].max() == 0 and padded[-64:].max() == 0
    assert padded[64:192].min() > 0                # 100 x 50 -> 256 x 128, zero rows above and below
    x = np.zeros((300, 200), np.uint8)
    x[40:260, 30:170] = np.random.default_rng(0).integers(100, 255, (220, 140))
    out = T.official_cleft_transform(224, train=False)(Image.fromarray(x))
    assert out.shape == (3, 224, 224) and torch.equal(out[0], out[1]) and out.min() >= -1 and out.max() <= 1
    assert out[:, :3].min() > -1                  # the Otsu crop removed the zero padding and the black border
    torch.manual_seed(0)
    a = T.official_cleft_transform(64, train=True)(Image.fromarray(x))
    torch.manual_seed(0)
    b = T.official_cleft_transform(64, train=True)(Image.fromarray(x))
    assert a.shape == (3, 64, 64) and torch.equal(a, b)


def test_resume_says_what_it_resumes_from_and_skips_a_damaged_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert cleft.main(demo_args(run, "--stage", "contrastive", "--steps", "4", "--ckpt-every", "2")) == 0
    (run / "stage1" / "trainable.safetensors").unlink()  # as if killed after its last checkpoint
    state = run / "stage1" / "ckpt" / "step_0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])         # a truncated latest checkpoint
    capsys.readouterr()
    assert cleft.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_0000004" in out and "resuming from" in out and "step_0000002" in out
    shutil.rmtree(run / "stage1")                       # killed before its first checkpoint
    (run / "stage1").mkdir()
    assert cleft.main(["--resume", str(run)]) == 0
    assert "no checkpoint in" in capsys.readouterr().out and (run / "stage1" / "trainable.safetensors").is_file()


def test_gpt2_config_without_its_sizes_is_a_clear_error():
    with pytest.raises(WeightsError, match="none of"):
        cleft.gpt2_config_from_hf({k: v for k, v in GPT2_V4.items() if k != "n_embd"})


def test_bench_times_both_towers_and_reports_every_figure(monkeypatch, capsys):
    """--bench with tiny towers in place of GPT-2 124M and DINOv2-B/14 (minutes on CPU): a LoRA step on the LLM,
    a full training step of the ViT, each with all the bench figures."""
    from dataclasses import replace
    monkeypatch.setitem(cleft.LLM_PRESETS, "gpt2", dict(cleft.LLM_PRESETS["gpt2"], config=replace(
        cleft.LLM_PRESETS["tiny"]["config"], vocab_size=50257)))
    monkeypatch.setitem(cleft.VIT_PRESETS, "dinov2-reg-b14", cleft.VIT_PRESETS["tiny"])
    peak = cleft.R.matmul_peak_flops  # the MFU denominator from a 256^3 matmul (2048^3 takes long on a busy CPU)
    monkeypatch.setattr(cleft.R, "matmul_peak_flops", lambda device, dtype: peak(device, dtype, n=256))
    args = cleft.parse_args(["--bench", "--bench-steps", "1", "--bench-batch", "2"])
    rows = cleft.run_bench(args, cleft.R.World())
    assert [r["what"] for r in rows] == ["GPT-2 124M + LoRA r8 (c_attn), T=64", "DINOv2-B/14 reg, full training, 224px"]
    assert all(r["batch"] == 2 and r["step_ms"] > 0 and r["items_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[0]["items_per_s"] > rows[1]["items_per_s"]  # tokens/s (2 x 64 per step) vs images/s (2 per step)
    out = capsys.readouterr().out
    assert out.count(" | B=2 ") == 2 and " tok/s " in out and " img/s " in out
