"""Tests for common/weights.py: finding weights, lazy sharded reading, peak memory, key checks, the converter.
No network: the Hugging Face cache is faked under tmp, and downloads go through a fake huggingface_hub module."""

import argparse
import json
import os
import pathlib
import runpy
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import common.weights as W
from common.weights import (WeightsError, check_keys, load_config, main, read_safetensors, resolve,
                            safetensors_files, tensor_index)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIP = "openai/clip-vit-base-patch16"


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """Every test starts with an empty HF cache under tmp and no importable huggingface_hub, so an
    accidental download attempt fails loudly instead of touching the network."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` -> ImportError


def write_model(folder, tensors, config=None):
    """A model folder: config.json + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"hidden_size": 4}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_sharded(folder, shards):
    """A sharded checkpoint: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def fake_hf_snapshot(cache, repo_id, commit, tensors):
    """The real HF cache layout: blobs/ hold the bytes, snapshots/<commit>/ holds symlinks, refs/main the hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no trailing newline, as the hub writes it
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(tensors, str(repo / "blobs" / "aaa"))
    (repo / "blobs" / "bbb").write_text(json.dumps({"model_type": "clip"}))
    (snap / "model.safetensors").symlink_to(repo / "blobs" / "aaa")
    (snap / "config.json").symlink_to(repo / "blobs" / "bbb")
    return snap


# -----------------------------------------------------------------------------
# resolve / load_config / safetensors_files

def test_resolve_local_folder_and_single_file(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    folder = write_model(tmp_path / "m", {"w": w})
    assert resolve(folder) == folder
    assert resolve(str(folder)) == folder
    # a single file resolves to its folder, where config.json lives
    assert resolve(folder / "model.safetensors") == folder
    assert load_config(resolve(folder / "model.safetensors")) == {"hidden_size": 4}
    assert torch.equal(read_safetensors(folder / "model.safetensors")["w"], w)


def test_resolve_hf_cache(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    w = torch.tensor([1.0, 2.0, 3.0])
    snap = fake_hf_snapshot(tmp_path / "hub", CLIP, commit, {"w": w})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve(CLIP) == snap
    assert resolve(CLIP, revision=commit) == snap  # a commit hash names the snapshot folder directly
    assert load_config(resolve(CLIP)) == {"model_type": "clip"}
    assert torch.equal(read_safetensors(resolve(CLIP))["w"], w)
    # HF_HOME is honoured when HF_HUB_CACHE is not set: the cache is $HF_HOME/hub
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve(CLIP) == snap
    # the default is ~/.cache/huggingface/hub (via XDG_CACHE_HOME when set)
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fake_hf_snapshot(tmp_path / "xdg" / "huggingface" / "hub", CLIP, commit, {"w": w})
    assert resolve(CLIP) == tmp_path / "xdg" / "huggingface" / "hub" / f"models--openai--clip-vit-base-patch16/snapshots/{commit}"


def test_resolve_not_found_says_where_and_how(tmp_path):
    with pytest.raises(WeightsError) as e:
        resolve(CLIP)  # download=False by default: huggingface_hub is not even importable here
    msg = str(e.value)
    assert str(tmp_path / "empty_hub_cache" / "models--openai--clip-vit-base-patch16") in msg
    assert f"python -m common.weights download {CLIP}" in msg
    assert f'hf download {CLIP} --include "*.json" "*.safetensors" "*.txt"' in msg
    assert "HF_TOKEN" not in msg  # not gated
    with pytest.raises(WeightsError) as e:
        resolve("meta-llama/Llama-3.1-8B", revision="v1")
    msg = str(e.value)
    assert "python -m common.weights download meta-llama/Llama-3.1-8B --revision v1" in msg
    assert "licence" in msg and "HF_TOKEN" in msg
    with pytest.raises(WeightsError, match="no such file or folder"):
        resolve(tmp_path / "nope" / "model.safetensors")


def test_resolve_folder_with_only_a_pickle_suggests_convert(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="python -m common.weights convert .*pytorch_model.bin"):
        resolve(tmp_path / "m")
    with pytest.raises(WeightsError, match="not a .safetensors file"):
        resolve(tmp_path / "m" / "pytorch_model.bin")


def fake_hub(monkeypatch, snapshot_download):
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))


def test_download_uses_snapshot_download_with_patterns_and_token(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(write_model(tmp_path / "dl", {"w": torch.zeros(2)}))

    fake_hub(monkeypatch, snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(WeightsError):
        resolve(CLIP)  # still no download unless asked
    assert calls == []
    assert resolve(CLIP, download=True, revision="main") == tmp_path / "dl"
    (repo_id, kw), = calls
    assert repo_id == CLIP and kw["revision"] == "main" and kw["token"] == "hf_test"
    assert kw["cache_dir"] == str(tmp_path / "empty_hub_cache")
    assert {"*.json", "*.safetensors", "*.txt"} <= set(kw["allow_patterns"])
    assert not any(p.endswith((".bin", ".pt", ".h5")) for p in kw["allow_patterns"])


@pytest.mark.parametrize("exc, expect", [
    (type("GatedRepoError", (Exception,), {}), "accept its licence"),
    (type("RepositoryNotFoundError", (Exception,), {}), "no such repo"),
    (ConnectionError, "not reachable"),
    (type("LocalEntryNotFoundError", (FileNotFoundError,), {}), "not reachable"),
])
def test_download_errors_are_explained(monkeypatch, exc, expect):
    def snapshot_download(repo_id, **kw):
        raise exc("boom")

    fake_hub(monkeypatch, snapshot_download)
    with pytest.raises(WeightsError, match=expect):
        resolve("meta-llama/Llama-3.1-8B", download=True)


def test_load_config_errors(tmp_path):
    with pytest.raises(WeightsError, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="JSON object"):
        load_config(tmp_path)


def test_safetensors_files_choices(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    with pytest.raises(WeightsError, match="no .safetensors"):
        safetensors_files(a)
    save_file({"x": torch.ones(1)}, str(a / "open_clip_model.safetensors"))
    assert safetensors_files(a) == [a / "open_clip_model.safetensors"]  # the only one there is
    save_file({"y": torch.ones(1)}, str(a / "other.safetensors"))
    with pytest.raises(WeightsError, match="holds 2 .safetensors files"):
        safetensors_files(a)
    save_file({"z": torch.ones(1)}, str(a / "model.safetensors"))
    assert safetensors_files(a) == [a / "model.safetensors"]


# -----------------------------------------------------------------------------
# sharded reading

def test_sharded_read_filter_cast_and_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    s1 = {"emb.weight": torch.randn(10, 4, generator=g), "pos_ids": torch.arange(7).view(1, 7)}
    s2 = {"head.weight": torch.randn(3, 4, generator=g), "head.bias": torch.randn(3, generator=g)}
    folder = write_sharded(tmp_path / "m", [s1, s2])
    ref = {**s1, **s2}
    assert [p.name for p in safetensors_files(folder)] == ["model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"]
    sd = read_safetensors(folder)
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) and sd[k].dtype == ref[k].dtype for k in ref)
    # keys as a collection (across both shards) and as a predicate
    assert read_safetensors(folder, keys=["head.bias", "emb.weight"]).keys() == {"head.bias", "emb.weight"}
    assert read_safetensors(folder, keys="pos_ids").keys() == {"pos_ids"}
    assert read_safetensors(folder, keys=lambda k: k.startswith("head.")).keys() == {"head.weight", "head.bias"}
    with pytest.raises(WeightsError, match="head.nope"):
        read_safetensors(folder, keys=["head.bias", "head.nope"])
    # dtype casts floating point tensors only; the integer position ids stay int64
    sd = read_safetensors(folder, dtype=torch.bfloat16)
    assert sd["emb.weight"].dtype == torch.bfloat16 and sd["pos_ids"].dtype == torch.int64
    assert torch.equal(sd["emb.weight"], ref["emb.weight"].to(torch.bfloat16))
    assert torch.equal(sd["pos_ids"], ref["pos_ids"])
    assert read_safetensors(folder, dtype="float16")["head.bias"].dtype == torch.float16
    # headers only
    assert tensor_index(folder) == {"emb.weight": ((10, 4), "F32"), "pos_ids": ((1, 7), "I64"),
                                    "head.weight": ((3, 4), "F32"), "head.bias": ((3,), "F32")}
    # a shard listed in the index but missing on disk
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        read_safetensors(folder)


def test_truncated_file_is_a_weights_error(tmp_path):
    folder = write_model(tmp_path / "m", {"w": torch.ones(100)})
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-50])
    with pytest.raises(WeightsError, match="model.safetensors is not a readable safetensors file"):
        read_safetensors(folder)


# -----------------------------------------------------------------------------
# peak memory: an fp32 checkpoint loaded into a meta-device model must cost one copy, not two

D, LAYERS, PER_SHARD = 2048, 12, 3  # 12 x (2048 x 2048) fp32 = 201 MB in 4 shards

PEAK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from common.weights import read_safetensors

folder, mode = sys.argv[1], sys.argv[2]
D, L = %d, %d

def status(field):  # bytes, from /proc/self/status (kB there)
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def build(dtype):
    return torch.nn.ModuleList(torch.nn.Linear(D, D, dtype=dtype) for _ in range(L))

# warm up: the first ops page in torch's kernels and thread pools, which is not the checkpoint's memory
warm = torch.nn.Linear(64, 64)
float(warm.weight.sum(dtype=torch.float64)) + float(warm.weight.to(torch.bfloat16).sum(dtype=torch.float64))
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to the current RSS
except OSError:
    pass
base = status("VmRSS:")
if mode == "lazy":
    with torch.device("meta"):
        model = build(torch.float32)
    model.load_state_dict(read_safetensors(folder), assign=True)
elif mode == "lazy_bf16":
    with torch.device("meta"):
        model = build(torch.bfloat16)
    model.load_state_dict(read_safetensors(folder, dtype=torch.bfloat16), assign=True)
else:  # naive: a real model, then the state dict copied into it -> two copies
    model = build(torch.float32)
    sd = read_safetensors(folder)
    model.load_state_dict(sd)
# touches every byte; weighted by position so that swapped tensors would show. (Summing in fp32 on purpose:
# sum(dtype=torch.float64) makes a float64 copy of each tensor, which would count in the peak.)
torch.set_num_threads(1)  # a bf16 sum depends on the reduction order: one thread, as the fixture sums
checksum = sum((i + 1) * float(p.sum()) for i, p in enumerate(model.parameters()))
print(json.dumps({"increase": status("VmHWM:") - base, "checksum": checksum,
                  "meta": any(p.is_meta for p in model.parameters()),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
""" % (D, LAYERS)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~200 MB sharded fp32 checkpoint, with the checksums the loaded models must reproduce."""
    folder = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    shards, fp32_sum, bf16_sum, nbytes, position = [], 0.0, 0.0, 0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bf16 sums depend on the reduction order: the load script sums on one thread too
    for start in range(0, LAYERS, PER_SHARD):
        shard = {}
        for i in range(start, start + PER_SHARD):
            shard[f"{i}.weight"] = torch.randn(D, D, generator=g)
            shard[f"{i}.bias"] = torch.randn(D, generator=g)
        for t in shard.values():  # same order as model.parameters(): 0.weight, 0.bias, 1.weight, ...
            position += 1
            fp32_sum += position * float(t.sum())
            bf16_sum += position * float(t.to(torch.bfloat16).sum())
            nbytes += t.numel() * 4
        shards.append(shard)
    torch.set_num_threads(threads)
    write_sharded(folder, shards)
    return folder, nbytes, fp32_sum, bf16_sum


def peak_increase(folder, mode):
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), mode, str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="reads peak RSS from Linux /proc")
def test_meta_device_load_costs_one_copy(big_checkpoint):
    folder, nbytes, fp32_sum, bf16_sum = big_checkpoint
    assert len(safetensors_files(folder)) == 4
    lazy = peak_increase(folder, "lazy")
    naive = peak_increase(folder, "naive")
    bf16 = peak_increase(folder, "lazy_bf16")
    ratios = {k: r["increase"] / nbytes for k, r in (("lazy", lazy), ("naive", naive), ("bf16", bf16))}
    print(f"checkpoint {nbytes / 2**20:.0f} MiB, peak RSS increase / checkpoint size: {ratios}")
    for r in (lazy, naive):
        assert r["checksum"] == pytest.approx(fp32_sum, rel=1e-5, abs=1.0) and not r["meta"]
    assert lazy["dtypes"] == ["torch.float32"] and bf16["dtypes"] == ["torch.bfloat16"]
    assert bf16["checksum"] == pytest.approx(bf16_sum, rel=1e-5, abs=1.0) and not bf16["meta"]
    # the measurement can see a second copy: the naive path costs two
    assert ratios["naive"] > 1.8
    # the meta-device path costs one (memory-mapped pages count in RSS once touched)
    assert 0.9 < ratios["lazy"] < 1.3
    # casting fp32 -> bf16: the bf16 copy (0.5) plus about one source tensor (16 MiB = 0.08), not a whole shard
    assert ratios["bf16"] < 0.7


# -----------------------------------------------------------------------------
# check_keys

def test_check_keys_names_each_problem():
    expected = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 2), "c.weight": (5,)}
    found = {"a.weight": torch.Size([4, 3]), "a.bias": (3,), "b.weight": (2, 2), "x.weight": (7, 7)}
    with pytest.raises(WeightsError) as e:
        check_keys(expected, found, source="CLIP checkpoint")
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 with the wrong shape" in msg
    assert "c.weight (5,)" in msg
    assert "x.weight (7, 7)" in msg
    assert "a.bias: (4,) vs (3,)" in msg
    assert "CLIP checkpoint" in msg
    assert "a.weight" not in msg and "b.weight" not in msg
    # all good: no exception; tensors (also meta) and tensor_index() entries are accepted as shapes
    with torch.device("meta"):
        lin = torch.nn.Linear(3, 4)
    assert check_keys(lin.state_dict(), {"weight": ((4, 3), "F32"), "bias": ((4,), "BF16")}) is None


def test_check_keys_truncates_long_lists():
    expected = {f"layer.{i}.weight": (8,) for i in range(50)}
    with pytest.raises(WeightsError) as e:
        check_keys(expected, {}, limit=10)
    msg = str(e.value)
    assert "50 missing, 0 unexpected, 0 with the wrong shape" in msg
    assert "... and 40 more" in msg
    assert len(msg.splitlines()) == 1 + 1 + 10 + 1 + 1  # summary, title, 10 names, "and 40 more", hint


# -----------------------------------------------------------------------------
# converter CLI

def test_convert_lightning_style_checkpoint(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(6, 4, generator=g)
    conv = torch.randn(4, 4, generator=g).t()  # non-contiguous
    ckpt = {
        "epoch": 3,
        "state_dict": {"model.emb.weight": emb, "model.lm_head.weight": emb,  # tied: one storage
                       "model.conv.weight": conv, "model.bn.num_batches_tracked": torch.tensor(7),
                       "model.note": "not a tensor", "criterion.pos_weight": torch.tensor([2.0])},
        "hyper_parameters": {"args": argparse.Namespace(lr=1e-3, data=pathlib.Path("/data/isic")),
                             "best": np.float64(0.875), "class_weights": np.array([0.5, 2.0]),
                             "steps": np.int64(100), "tags": frozenset({"a"})},
    }
    src, dst = tmp_path / "last.ckpt", tmp_path / "out" / "model.safetensors"
    torch.save(ckpt, src)
    assert main(["convert", str(src), str(dst), "--key", "state_dict", "--prefix", "model."]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 non-tensor entries: model.note (str)" in out
    assert "lm_head.weight = emb.weight" in out
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert sd.keys() == {"emb.weight", "lm_head.weight", "conv.weight", "bn.num_batches_tracked",
                         "criterion.pos_weight"}
    assert torch.equal(sd["emb.weight"], emb) and torch.equal(sd["lm_head.weight"], emb)
    assert torch.equal(sd["conv.weight"], conv) and sd["bn.num_batches_tracked"].item() == 7
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.safetensors"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' own 0600
    # without --key the state_dict entry is found on its own
    assert main(["convert", str(src), str(tmp_path / "auto.safetensors")]) == 0
    assert "model.emb.weight" in tensor_index(tmp_path / "auto.safetensors")


def test_inspect_prints_shapes_and_count(tmp_path, capsys):
    folder = write_model(tmp_path / "m", {"w": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)})
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "w  [2, 3]" in out and "F32" in out and "BF16" in out
    assert "2 tensors, 10 parameters" in out  # 2*3 + 4


class NotAllowed:
    """A harmless but unknown class: the converter must still refuse to build it."""

    def __init__(self):
        self.x = 1


class RunsCode:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipfile", [True, False])  # new zip format (static scan) and the legacy format
def test_convert_refuses_unsafe_pickles(tmp_path, capsys, zipfile):
    marker = tmp_path / "pwned"
    evil, odd = tmp_path / "evil.pt", tmp_path / "odd.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": RunsCode(marker)}, evil,
               _use_new_zipfile_serialization=zipfile)
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": NotAllowed()}, odd, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(WeightsError, match="posix.system|nt.system") as e:
        from common.weights import convert
        convert(evil, tmp_path / "evil.safetensors")
    assert "trusted" in str(e.value)
    assert main(["convert", str(odd), str(tmp_path / "odd.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "NotAllowed" in err and "Traceback" not in err
    assert main(["convert", str(evil), str(tmp_path / "evil.safetensors")]) == 2
    assert not marker.exists()  # the command in the pickle never ran
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "odd.safetensors").exists()


def test_module_entry_point_exits_2_without_traceback(tmp_path, monkeypatch, capsys):
    # `python -m common.weights ...` in-process (a new interpreter would cost seconds of torch import)
    monkeypatch.setattr(sys, "argv", ["weights", "inspect", str(tmp_path / "missing.safetensors")])
    monkeypatch.delitem(sys.modules, "common.weights")  # run a fresh copy, as `python -m` would
    with pytest.raises(SystemExit) as e:
        runpy.run_module("common.weights", run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or folder" in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# load_mapped: one key-mapped loader for every method script

class _Fused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)
        self.kv = torch.nn.Linear(4, 8, bias=False)
        self.proj = torch.nn.Linear(3, 4, bias=False)
        self.norm = torch.nn.LayerNorm(4)


def _fused_checkpoint(tmp_path, **extra):
    g = torch.Generator().manual_seed(0)
    t = {f"enc.{n}_proj.{p}": torch.randn(4, 4, generator=g) if p == "weight" else torch.randn(4, generator=g)
         for n in "qkv" for p in ("weight", "bias")}
    t |= {"enc.k2.weight": torch.randn(4, 4, generator=g), "enc.v2.weight": torch.randn(4, 4, generator=g),
          "conv1d.weight": torch.randn(3, 4, generator=g), "ln.weight": torch.randn(4, generator=g),
          "ln.bias": torch.randn(4, generator=g), "enc.position_ids": torch.arange(4)} | extra
    save_file(t, str(tmp_path / "model.safetensors"))
    return t


KEY_MAP = {"enc.q_proj.{}": ("qkv.{}", "q"), "enc.k_proj.{}": ("qkv.{}", "k"), "enc.v_proj.{}": ("qkv.{}", "v"),
           "enc.k2.weight": ("kv.weight", "kv_k"), "enc.v2.weight": ("kv.weight", "kv_v"),
           "conv1d.weight": ("proj.weight", "T"), "ln.{}": "norm.{}", "enc.position_ids": None}


def test_load_mapped_renames_fuses_transposes_and_drops(tmp_path):
    t = _fused_checkpoint(tmp_path)
    with torch.device("meta"):
        model = _Fused()
    W.load_mapped(model, tmp_path, KEY_MAP)
    assert torch.equal(model.qkv.weight, torch.cat([t["enc.q_proj.weight"], t["enc.k_proj.weight"], t["enc.v_proj.weight"]]))
    assert torch.equal(model.qkv.bias, torch.cat([t["enc.q_proj.bias"], t["enc.k_proj.bias"], t["enc.v_proj.bias"]]))
    assert torch.equal(model.kv.weight, torch.cat([t["enc.k2.weight"], t["enc.v2.weight"]]))
    assert torch.equal(model.proj.weight, t["conv1d.weight"].T) and torch.equal(model.norm.bias, t["ln.bias"])


def test_load_mapped_refuses_unknown_missing_and_partial_fusions(tmp_path):
    _fused_checkpoint(tmp_path, **{"enc.extra.weight": torch.zeros(2)})
    with pytest.raises(W.WeightsError, match=r"Unexpected[\s\S]*enc\.extra\.weight"):
        W.load_mapped(_Fused(), tmp_path, KEY_MAP)
    t = _fused_checkpoint(tmp_path)
    del t["enc.v_proj.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(W.WeightsError, match="qkv.weight needs q, k, v"):
        W.load_mapped(_Fused(), tmp_path, KEY_MAP)
    t = _fused_checkpoint(tmp_path)
    del t["ln.bias"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(W.WeightsError, match=r"Missing[\s\S]*norm\.bias"):
        W.load_mapped(_Fused(), tmp_path, KEY_MAP)
    model = _Fused()
    W.load_mapped(model, tmp_path, KEY_MAP, drop_missing=("norm.bias",))  # e.g. a tied lm_head


def test_map_key_templates_take_one_component_each():
    m = {"layers.{}.attn.{}": "blocks.{}.a.{}", "lm_head.weight": "head.weight", "x.{}.drop": None}
    assert W.map_key("layers.3.attn.weight", m) == ("blocks.3.a.weight", None)
    assert W.map_key("layers.3.4.attn.weight", m) is False        # {} never spans a dot
    assert W.map_key("lm_head.weight", m) == ("head.weight", None)
    assert W.map_key("x.7.drop", m) == (None, None)
    assert W.map_key("layers.3.attn.weight.extra", m) is False
