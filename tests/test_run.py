"""common/run.py: checkpoints that survive a kill, RNG round trips, precision guards, progress lines."""
import random

import numpy as np
import pytest
import torch

from common import run as R


def test_checkpoint_round_trip_keeps_the_newest_two(tmp_path):
    for step in (3, 6, 9):
        R.save_checkpoint(tmp_path, {"w": torch.full((2, 3), float(step))}, {"step": step, "epoch": step // 3})
    tensors, state = R.load_checkpoint(tmp_path)
    assert state["step"] == 9 and torch.equal(tensors["w"], torch.full((2, 3), 9.0))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000006", "step_0000009"]


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path, monkeypatch):
    R.save_checkpoint(tmp_path, {"w": torch.zeros(2)}, {"step": 1})

    def killed(*a, **k):  # the process dies while writing state.pt of the next checkpoint
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        R.save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"step": 2})
    monkeypatch.undo()
    tensors, state = R.load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.zeros(2))
    assert R.load_checkpoint(tmp_path / "nothing") is None


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    R.seed_everything(3)
    R.save_checkpoint(tmp_path, {}, {"step": 0, "rng": R.rng_state()})
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    R.set_rng_state(R.load_checkpoint(tmp_path)[1]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_precision_guards():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        R.autocast(cpu, "fp16")
    assert not R.make_scaler("bf16", cpu).is_enabled()
    with R.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with R.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_non_finite_loss_raises_with_advice():
    R.check_finite(torch.tensor(1.0), 5)
    with pytest.raises(R.NonFiniteLoss, match="step 7.*last good checkpoint"):
        R.check_finite(torch.tensor(float("nan")), 7)


def test_progress_prints_rate_and_eta(capsys):
    p = R.Progress(10, "train", every=0.0)
    p.update(5, loss=0.5)
    out = capsys.readouterr().out
    assert out.startswith("train 5/10 | loss 0.5 |") and "it/s" in out and "eta" in out


def test_gather_with_grad_is_the_identity_in_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    y = R.gather_with_grad(x)
    assert y is x


def test_jsonl_log_and_run_dir(tmp_path):
    d = R.make_run_dir("x", "demo", out=tmp_path / "run", args={"lr": 0.1})
    log = R.JsonlLog(d / "metrics.jsonl")
    log.log(step=1, loss=torch.tensor(0.25))
    assert (d / "args.json").exists() and (d / "env.json").exists()
    assert (d / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.25}\n'
