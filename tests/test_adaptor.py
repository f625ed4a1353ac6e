"""Tests for adaptor.py: parity with transformers (plain DINOv2, BERT with pooler) and with the official Adaptor
module itself (goldens by tests/goldens/make_adaptor_goldens.py), the single-token identity, parity of the layer
with torch.nn.MultiheadAttention, trainable counts on the meta device, feature-cache alignment, label fractions,
the segmentation loss and Dice, end-to-end runs on the demo (resume, 2-process DDP, bad input) and the demo's
committed backbones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import adaptor as A  # noqa: E402
from common import run as R  # noqa: E402
from common.data import clean_caption  # noqa: E402
from common.weights import WeightsError, load_mapped  # noqa: E402

GOLD = REPO / "tests" / "goldens"
TOL = 1e-5


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def io(name):
    return load_file(str(GOLD / name / "io.safetensors"))


def max_diff(a, b):
    return (a - b).abs().max().item()

# ----------------------------------------------------------------------------------------------------------
# parity: transformers 5.23 and the official module (fp32, eval mode)


def test_plain_dinov2_matches_hf_cls_after_norm():
    model = A.DINOv2.from_pretrained(GOLD / "adaptor_dinov2").eval()
    g = io("adaptor_dinov2")
    assert model.cfg.n_registers == 0 and model.register_tokens is None
    with torch.no_grad():
        for k in "abc":  # the checkpoint's 4x4 grid, 6x6 and 5x7 (interpolated position embeddings)
            cls, tokens = A.image_features(model, g[f"pixel_values_{k}"])
            assert max_diff(tokens, g[f"last_hidden_state_{k}"]) < TOL
            assert max_diff(cls, g[f"pooler_output_{k}"]) < TOL


def test_the_copied_dinov2_loads_the_register_variant_too():
    model = A.DINOv2.from_pretrained(GOLD / "cleft_dinov2").eval()  # cleft.py's golden: Dinov2WithRegistersModel
    g = io("cleft_dinov2")
    assert model.cfg.n_registers == 4
    with torch.no_grad():
        cls, tokens = A.image_features(model, g["pixel_values_a"])
    assert max_diff(cls, g["last_hidden_state_a"][:, 0]) < TOL
    assert tokens.shape[1] == g["last_hidden_state_a"].shape[1] - 4                 # registers dropped


def test_bert_pooler_output_matches_hf():
    model = A.load_bert(GOLD / "adaptor_bert").eval()
    g = io("adaptor_bert")
    with torch.no_grad():
        pooled, hidden, pad = A.text_features(model, g["input_ids"], g["attention_mask"])
    keep = g["attention_mask"].bool()
    assert max_diff(hidden[keep], g["last_hidden_state"][keep]) < TOL
    assert max_diff(pooled, g["pooler_output"]) < TOL
    assert torch.equal(pad, g["attention_mask"] == 0)


def test_bert_without_a_trained_pooler_is_reported_not_random():
    with pytest.raises(WeightsError, match="no trained pooler"):
        A.load_bert(GOLD / "adaptor_bert_mlm")
    g = io("adaptor_bert_mlm")
    cls_model = A.load_bert(GOLD / "adaptor_bert_mlm", missing_pooler="cls").eval()
    with torch.no_grad():
        pooled, hidden, _ = A.text_features(cls_model, g["input_ids"], g["attention_mask"])
    keep = g["attention_mask"].bool()
    assert max_diff(hidden[keep], g["last_hidden_state"][keep]) < TOL and torch.equal(pooled, hidden[:, 0])
    r1, r2 = (A.load_bert(GOLD / "adaptor_bert_mlm", missing_pooler="random", seed=42) for _ in range(2))
    assert torch.equal(r1.pooler.dense.weight, r2.pooler.dense.weight)  # the official random pooler, but seeded


def official_adaptor():
    g = io("adaptor_official")
    cfg = A.AdaptorConfig(vision_dim=40, text_dim=32, dim=48, n_heads=12, ff=2048)
    with torch.device("meta"):
        model = A.Adaptor(cfg)
    return load_mapped(model, GOLD / "adaptor_official" / "model.safetensors", A.OFFICIAL_MAP).eval(), g


def test_adaptor_matches_the_official_module():
    model, g = official_adaptor()
    with torch.no_grad():
        x, t = model(g["image_raw"], g["text_raw"])
        loss = A.adaptor_loss(x, t, model.logit_scale)
        assert max_diff(x, g["image_embeds"]) < TOL and max_diff(t, g["text_embeds"]) < TOL
        assert max_diff(model.logit_scale.exp() * t @ x.T, g["logits_per_text"]) < 1e-4
        assert abs(loss.item() - g["loss"].item()) < TOL
        # the official downstream path feeds (B, d) to nn.MultiheadAttention, which reads a 2-D input as ONE
        # unbatched sequence: self-attention across the images of the batch. Ours is per image (batch-independent)
        assert max_diff(model.encode_patches(g["image_raw"][None])[0], g["image_only"]) < TOL
        one = torch.stack([model.encode_patches(r[None, None])[0, 0] for r in g["image_raw"]])
        assert max_diff(model.encode_image(g["image_raw"]), one) < TOL
        assert max_diff(model.encode_image(g["image_raw"]), g["image_only"]) > 1e-3
        assert max_diff(model.encode_patches(g["patches_raw"]), g["patches_out"]) < TOL


def test_segmentation_loss_and_dice_match_the_official_code():
    g = io("adaptor_official")
    logits, target = g["seg_logits"], g["seg_target"]
    assert abs(A.focal_loss(logits, target).item() - g["focal_loss"].item()) < 1e-6
    assert abs(A.seg_loss(logits, target).item() - g["mixed_loss"].item()) < 1e-4
    assert abs(A.dice_per_image(logits.sigmoid(), target).mean().item() - g["dice_official"].item()) < 1e-6

# ----------------------------------------------------------------------------------------------------------
# the layer


def test_one_pooled_token_the_query_changes_nothing():
    """MHA over one key: out_proj(v_proj(x)) whatever the query. So the official "cross-attention" fuses nothing,
    and the query / key projections get no gradient."""
    torch.manual_seed(0)
    layer = A.AdaptorLayer(A.AdaptorConfig(dim=48, n_heads=12, ff=64)).eval()
    x = torch.randn(5, 1, 48)
    w, b = layer.attn.in_proj_weight, layer.attn.in_proj_bias
    expected = layer.attn.out_proj(F.linear(x, w[96:], b[96:]))                    # out_proj(v_proj(x))
    for q in (torch.randn(5, 1, 48), torch.randn(5, 1, 48) * 10, None):
        got = layer.attn(x if q is None else q, x)
        assert max_diff(got, expected) < 1e-6
    a = layer(x, query=torch.randn(5, 1, 48))
    assert max_diff(a, layer(x, query=torch.randn(5, 1, 48))) < 1e-6
    a.sum().backward()
    assert layer.attn.in_proj_weight.grad[:96].abs().max() == 0  # query and key rows: exactly zero gradient
    assert layer.attn.in_proj_weight.grad[96:].abs().max() > 0


def test_layer_equals_torch_multihead_attention_layer():
    torch.manual_seed(1)
    cfg = A.AdaptorConfig(dim=48, n_heads=4, ff=96)
    ours, ref = A.AdaptorLayer(cfg).eval(), A.TorchLayer(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    src, q, mem = torch.randn(3, 1, 48), torch.randn(3, 1, 48), torch.randn(3, 7, 48)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        assert max_diff(ours(src, query=q), ref(src, query=q)) < 1e-5                         # official setting
        assert max_diff(ours(src, query=q, memory=mem, pad=pad), ref(src, query=q, memory=mem, pad=pad)) < 1e-5
        seq = torch.randn(2, 9, 48)
        assert max_diff(ours(seq), ref(seq)) < 1e-5                                           # segmentation path


def test_tokens_mode_reads_the_other_modality():
    torch.manual_seed(2)
    model = A.Adaptor(A.AdaptorConfig(vision_dim=16, text_dim=24, dim=48, n_heads=4, ff=64, tokens=True)).eval()
    img, txt, it, tt = torch.randn(4, 16), torch.randn(4, 24), torch.randn(4, 6, 16), torch.randn(4, 5, 24)
    pad = torch.zeros(4, 5, dtype=torch.bool)
    x1, _ = model(img, txt, it, tt, pad)
    x2, _ = model(img, torch.randn(4, 24), it, tt, pad)
    assert max_diff(x1, x2) > 1e-3  # with several keys the text query changes the image embedding
    x3, _ = model(img, txt)
    x4, _ = model(img, torch.randn(4, 24))
    assert max_diff(x3, x4) < 1e-6  # the official pooled setting: it does not


@pytest.mark.parametrize("vision,count", [(768, 12_207_617), (384, 11_912_705)])
def test_trainable_count_at_the_papers_setting(vision, count):
    with torch.device("meta"):
        model = A.Adaptor(A.AdaptorConfig(vision_dim=vision))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert A.VISION_PRESETS["dinov2-b" if vision == 768 else "dinov2-s"]["config"].dim == vision

# ----------------------------------------------------------------------------------------------------------
# data, cache, losses


def test_pairs_are_matched_by_id_never_by_position(tmp_path):
    world = R.World()
    ids = [f"img{i}.png" for i in range(6)]
    img = torch.arange(6.)[:, None].repeat(1, 3)                           # row i describes image i
    order = [3, 0, 5, 1, 4, 2]  # text features written in another order, e.g. sorted by caption length
    txt_ids, txt = [ids[i] for i in order], torch.tensor(order, dtype=torch.float)[:, None].repeat(1, 2)
    got_ids, gi, gt = A.paired(ids, img, txt_ids, txt)
    assert got_ids == ids and torch.equal(gi[:, 0], gt[:, 0])
    # the cache refuses a file whose ids are not the ones asked for: recomputed, never read misaligned
    calls = []
    path = tmp_path / "c" / "feat"
    A.cached(path, ids, lambda: calls.append(1) or img, world, {})
    A.cached(path, ids, lambda: calls.append(1) or img, world, {})
    assert len(calls) == 1
    out = A.cached(path, ids[::-1], lambda: calls.append(1) or img.flip(0), world, {})
    assert len(calls) == 2 and torch.equal(out[:, 0], torch.arange(6.).flip(0))
    assert json.loads(path.with_suffix(".json").read_text())["ids"] == ids[::-1]
    # computing a cold cache (random crops, dropout-free towers...) leaves the run's random numbers as a warm one
    after = []
    for _ in range(2):  # cold, then warm
        torch.manual_seed(0)
        A.cached(tmp_path / "rng" / "feat", ids, lambda: torch.rand(6, 3), world, {})
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[1])


def test_data_fraction_is_stratified_and_seeded():
    labels = np.array([0] * 500 + [1] * 100 + [2] * 10)
    a, b, c = A.fraction(labels, 0.1, 42), A.fraction(labels, 0.1, 42), A.fraction(labels, 0.1, 7)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert [int((labels[a] == k).sum()) for k in range(3)] == [50, 10, 1]
    assert [int((labels[A.fraction(labels, 0.01, 0)] == k).sum()) for k in range(3)] == [5, 1, 1]
    assert len(A.fraction(labels, 1.0, 0)) == len(labels)


def test_dice_and_focal_by_hand():
    probs = torch.tensor([[[0.9, 0.2], [0.7, 0.1]], [[0.1, 0.2], [0.3, 0.4]], [[0.6, 0.1], [0.1, 0.1]]])
    target = torch.tensor([[[1., 1.], [0., 0.]], [[0., 0.], [0., 0.]], [[0., 0.], [0., 0.]]])
    # image 0: pred {00, 10}, truth {00, 01}: 2*1/(2+2) = 0.5; image 1: both empty -> 1; image 2: FP on empty -> 0
    assert A.dice_per_image(probs, target).tolist() == [0.5, 1.0, 0.0]
    x, t = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    p = torch.sigmoid(x)
    want = (-(1 - p) ** 2 * torch.log(p)).mean()                      # gamma 2: -(1-p)^2 log p for positives
    assert abs(A.focal_loss(x, t).item() - want.item()) < 1e-6
    d = 1 - ((x * t).sum() + 1) / ((x ** 2 + t ** 2).sum() + 1)       # "modified" dice on logits, one image
    assert abs(A.dice_loss(x[None], t[None]).item() - d.item()) < 1e-6


def test_caption_cleaning_as_official():
    assert clean_caption("1. No acute process. 2. Heart size is NORMAL.\nLungs: clear!") == \
        "no acute process heart size is normal lungs clear"
    assert clean_caption("Normal. OK.") == ""  # fewer than 3 tokens after dropping one-token sentences

# ----------------------------------------------------------------------------------------------------------
# end to end on the demo (short schedules)

SHORT = ["--epochs", "2", "--batch-size", "50", "--dim", "32", "--heads", "4", "--ff", "64"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One cold feature cache for the session (the committed tiny backbones' features) and one shortened adaptor
    pre-training (run folder) that the downstream tests start from."""
    root = tmp_path_factory.mktemp("adaptor")
    cache = ["--cache-dir", str(root / "cache")]
    assert run_main(["--task", "pretrain", *SHORT, *cache, "--out", root / "pre"]) == 0
    return cache, root / "pre"


def run_main(args):
    """adaptor.main in this process (no interpreter start-up); -> its exit code."""
    return A.main([str(a) for a in args])


def run_script(args, timeout=300, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
           if torchrun else [sys.executable]) + [str(REPO / "adaptor.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_demo_end_to_end_above_chance(tmp_path, demo):
    """The demo's three tasks, shortened: pre-training (the session's), then the two heads on the frozen adaptor."""
    cache, run = demo
    assert run_main(["--task", "classify", "--init", run, "--epochs", "30", *cache, "--out", tmp_path / "cls"]) == 0
    assert run_main(["--task", "segment", "--init", run, "--epochs", "2", "--decoder-width", "16", *cache,
                     "--out", tmp_path / "seg"]) == 0
    cls = json.loads((tmp_path / "cls" / "classify" / "metrics.json").read_text())
    seg = json.loads((tmp_path / "seg" / "segment" / "metrics.json").read_text())
    assert cls["test"] > 0.35, cls["test"]            # measured 0.50; 6 balanced classes: chance 0.17
    assert seg["test"] > 0.4, seg["test"]             # measured 0.53; every image has a lesion: an empty mask 0
    assert run_main(["--resume", tmp_path / "cls", "--eval-only"]) == 0  # the kept head, evaluated again
    again = json.loads((tmp_path / "cls" / "classify" / "metrics.json").read_text())
    assert again["test"] == cls["test"] and again["val"] == cls["val"]


def test_resume_continues_bit_identically(tmp_path, demo, monkeypatch, capsys):
    """24 steps straight vs a run whose loss turns NaN at step 22 (it stops with exit 3, keeping its step-20
    checkpoint and saying so), then --resume to 24: the same weights, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main(["--task", "pretrain", *SHORT, *demo[0], "--ckpt-every", "5", "--out", a]) == 0  # 24 steps
    assert sorted(p.name for p in (a / "pretrain" / "ckpt").glob("step_*")) == ["step_0000020", "step_0000024"]
    calls, loss = [], A.adaptor_loss

    def nan_at_step_22(*args, **kw):
        calls.append(1)
        return loss(*args, **kw) * (float("nan") if len(calls) == 22 else 1.0)
    monkeypatch.setattr(A, "adaptor_loss", nan_at_step_22)
    capsys.readouterr()
    assert run_main(["--task", "pretrain", *SHORT, *demo[0], "--ckpt-every", "5", "--out", b]) == 3
    err = capsys.readouterr().err
    assert "last good checkpoint is " in err and "step_0000020" in err and f"python adaptor.py --resume {b}" in err
    assert not (b / "pretrain" / "weights.safetensors").exists()
    monkeypatch.undo()
    assert run_main(["--resume", b]) == 0  # in this process: the checkpoint alone must carry the RNG and step
    assert "step_0000020 (step 20)" in capsys.readouterr().out
    wa, wb = load_file(str(a / "pretrain" / "weights.safetensors")), load_file(str(b / "pretrain" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_processes_equal_one_with_gathered_negatives(tmp_path, demo):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--task", "pretrain", *SHORT, *demo[0], "--dropout", "0", "--steps", "3"]
    assert run_main([*common, "--batch-size", "100", "--out", one]) == 0
    r = run_script([*common, "--batch-size", "50", "--gather", "--out", str(two)], torchrun=True)
    if r.returncode != 0:  # one retry: the standalone rendezvous can lose a port race on a busy machine
        r = run_script([*common, "--batch-size", "50", "--gather", "--out", str(two) + "b"], torchrun=True)
        two = Path(str(two) + "b")
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = load_file(str(one / "pretrain" / "weights.safetensors")), load_file(str(two / "pretrain" / "weights.safetensors"))
    # the query / key rows of in_proj have a zero gradient in exact arithmetic (one key per softmax); what reaches
    # them is float noise that Adam's normalisation blows up to lr-sized steps, so they are not compared
    cut = lambda k, v: v[64:] if "in_proj" in k else v                                    # 2 x dim (32)
    assert max(max_diff(cut(k, wa[k]), cut(k, wb[k])) for k in wa) < 1e-6


def test_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    assert run_main(["--data", "rsna", "--task", "classify", "--data-dir", tmp_path, "--out", tmp_path / "x"]) == 2
    err = capsys.readouterr().err
    assert "split_rsna.json" in err and "common.prepare rsna" in err and "--init RUN" in err
    assert "download: RSNA Pneumonia Detection" in err  # what to download, then the command that prepares it
    for bad in (["--batch-size", "0"], ["--data-pct", "2"], ["--precision", "fp16", "--device", "cpu"],
                ["--data", "rsna", "--task", "all"]):
        with pytest.raises(SystemExit) as e:
            A.parse_args(bad)
        assert e.value.code == 2
    assert not (tmp_path / "x").exists()  # nothing written before the checks


def test_the_committed_demo_backbones_are_the_tiny_presets_pretrained():
    """common/demo_weights/adaptor_backbones.safetensors (made by make_adaptor_backbones.py): every tensor of the
    tiny DINOv2 and BERT, in fp16, small enough to commit, with the vocabulary of the demo's training captions, and
    pre-trained: the demo's test images and reports no longer share one global feature."""
    from safetensors import safe_open
    from common.demo import ensure_demo
    assert A.DEMO_BACKBONES.stat().st_size < 800_000                                  # 669 KB
    with safe_open(str(A.DEMO_BACKBONES), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    vision, bert, tok = A.demo_backbones(A.parse_args([]), R.World())  # R.load_tensors: every key and shape
    root = ensure_demo(REPO / "data" / "demo")
    assert tok.get_vocab() == A.word_tokenizer(A.read_pairs(root / "reports_train.csv")[1], A.MAX_WORDS).get_vocab()
    ids, caps = (x[:64] for x in A.read_pairs(root / "reports_test.csv"))
    off = ~torch.eye(64, dtype=torch.bool)
    with torch.no_grad():
        f = F.normalize(A.image_features(vision, A.Images(root, ids, A.PadCrop(112, False)).batch(0, 64))[0], dim=-1)
        t = F.normalize(A.text_features(bert, *A.tokenize(tok, caps))[0], dim=-1)         # (64, 64)
    assert (f @ f.T)[off].mean() < 0.7           # mean cosine of two images: measured 0.60, random tiny ViT 0.76
    assert (t @ t.T)[off].mean() < 0.8           # of two reports: measured 0.59, random tiny BERT 1.00


def test_a_missing_demo_backbones_file_is_one_message_naming_the_command_that_remakes_it(tmp_path, capsys,
                                                                                            monkeypatch):
    monkeypatch.setattr(A, "DEMO_BACKBONES", tmp_path / "adaptor_backbones.safetensors")
    assert run_main(["--out", tmp_path / "run", "--cache-dir", tmp_path / "cache"]) == 2
    err = capsys.readouterr().err
    assert "python -m common.demo_weights.make_adaptor_backbones" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_wrong_size_mask_or_corrupt_image_is_a_message(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32)).save(root / "images" / f"{i}.png")
        Image.new("L", (32, 32) if i else (16, 16)).save(root / "images" / f"{i}_mask.png")
    (root / "images" / "2.png").write_bytes(b"not a png")
    entries = [[f"images/{i}.png", f"images/{i}_mask.png"] for i in range(3)]
    (root / "split_seg_demo.json").write_text(json.dumps({"train": entries, "val": entries, "test": entries}))
    ds = A.SegmentationDataset(root, root / "split_seg_demo.json", "train", joint_transform=A.PadCrop(28, True))
    for i, what in ((0, "size"), (2, "cannot read image")):
        with pytest.raises(A.DataError, match=what):
            ds[i]


def test_bench_times_ours_against_torch_nn_in_alternation(monkeypatch, capsys):
    """--bench with tiny backbones (the real ones take minutes on CPU): the adaptor step, ours and torch.nn timed
    in alternation with the ratio of their step times, then both backbones' feature throughput, every figure."""
    from functools import partial
    monkeypatch.setitem(A.VISION_PRESETS, "dinov2-b", dict(A.VISION_PRESETS["dinov2-b"],
                                                           config=A.VISION_PRESETS["tiny"]["config"]))
    monkeypatch.setattr(A, "BertConfig", partial(A.BertConfig, dim=32, n_layers=2, n_heads=2, mlp_dim=64))
    peak = R.matmul_peak_flops  # the MFU denominator from a 256^3 matmul (2048^3 takes long on a busy CPU)
    monkeypatch.setattr(R, "matmul_peak_flops", lambda device, dtype: peak(device, dtype, n=256))
    rows = A.run_bench(A.parse_args(["--bench", "--bench-steps", "2", "--batch-size", "16"]), R.World())
    assert [r["what"] for r in rows] == ["adaptor step, ours", "adaptor step, torch.nn",
                                         "DINOv2 (64) features at 224", f"BERT-base features, {A.MAX_WORDS} tokens"]
    assert all(r["precision"] == "fp32" and r["step_ms"] > 0 and r["items_per_s"] > 0 and r["mfu"] > 0
               and r["peak_mem_mb"] > 0 for r in rows)
    assert [r["batch"] for r in rows] == [16, 16, 8, 8]
    out = capsys.readouterr().out
    assert "ours / torch.nn step time: wall " in out and "(medians of 2 alternating steps)" in out
    assert out.count(" | fp32  | B=") == 4
