"""common/run.py: checkpoints that survive a kill and verify on load, the one resume rule, run folders that never
overwrite a run, the optimizer step, flags that refuse mistakes with a message."""
import argparse
import json
import os
import random
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from common import run as R


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _save(ckpts, step, value, **kw):
    return ckpts.save(step, {"w": torch.full((2, 3), float(value))}, **kw)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_keeps_the_newest_two_and_a_manifest(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    ckpts = R.Checkpoints(tmp_path / "ckpt")
    for step in (3, 6, 9):
        _save(ckpts, step, step, optimizer=opt, extra={"epoch": step // 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000006", "step_0000009"]
    manifest = json.loads((tmp_path / "ckpt" / "step_0000009" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "state.pt"} and manifest["step"] == 9
    state = torch.load(tmp_path / "ckpt/step_0000009/state.pt", weights_only=True)
    assert set(state) == {"step", "optimizer", "scheduler", "scaler", "rng", "extra"} and len(state["rng"]) == 1

    opt2 = torch.optim.AdamW(_model().parameters(), lr=0.1)
    ck = R.Checkpoints(tmp_path / "ckpt").load(optimizer=opt2)
    assert ck.step == 9 and ck.extra == {"epoch": 3} and torch.equal(ck.tensors["w"], torch.full((2, 3), 9.0))
    a, b = opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(a, b)
    said = []
    assert R.Checkpoints(tmp_path / "nothing").load(log=said.append, resuming=True) is None
    assert "no checkpoint" in said[0] and "step 0" in said[0]


def test_a_half_written_checkpoint_is_never_picked_up_and_leaves_no_folder(tmp_path, monkeypatch):
    ckpts = R.Checkpoints(tmp_path)
    _save(ckpts, 1, 0)

    def killed(*a, **k):  # the process dies while writing state.pt of the next checkpoint
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(ckpts, 2, 1)
    monkeypatch.undo()
    ck = R.Checkpoints(tmp_path).load()
    assert ck.step == 1 and torch.equal(ck.tensors["w"], torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]


@pytest.mark.parametrize("damage", ["truncate_state", "flip_tensor_byte", "delete_manifest"])
def test_a_damaged_latest_falls_back_to_the_newest_intact_one(tmp_path, damage):
    ckpts = R.Checkpoints(tmp_path, keep=3)
    _save(ckpts, 1, 1)
    _save(ckpts, 2, 2)
    bad = tmp_path / "step_0000002"
    if damage == "truncate_state":
        data = (bad / "state.pt").read_bytes()
        (bad / "state.pt").write_bytes(data[:len(data) // 2])
    elif damage == "flip_tensor_byte":
        data = bytearray((bad / "trainable.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (bad / "trainable.safetensors").write_bytes(bytes(data))
    else:
        (bad / "manifest.json").unlink()
    said = []
    ck = R.Checkpoints(tmp_path).load(log=said.append)
    assert ck.step == 1 and torch.equal(ck.tensors["w"], torch.ones(2, 3))
    assert any("step_0000002" in s and "step_0000001" in s for s in said), said


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _save(R.Checkpoints(tmp_path), 1, 1)
    (tmp_path / "step_0000001" / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(R.RunError, match="no intact checkpoint.*step_0000001"):
        R.Checkpoints(tmp_path).load(log=lambda s: None)


def test_pruning_never_deletes_checkpoints_another_run_wrote(tmp_path):
    _save(R.Checkpoints(tmp_path), 5, 5)             # an earlier process
    ckpts = R.Checkpoints(tmp_path, keep=1)          # the resumed one
    for step in (6, 7, 8):
        _save(ckpts, step, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000005", "step_0000008"]
    _save(ckpts, 5, 55)                              # the same step as someone else's: theirs is kept aside
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("step_0000005.old-")]
    assert len(kept) == 1 and (kept[0] / "trainable.safetensors").exists()


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    R.seed_everything(3)
    _save(R.Checkpoints(tmp_path), 0, 0)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    R.Checkpoints(tmp_path).load(log=lambda s: None)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_stop_message_says_what_is_true(tmp_path):
    msg = R.stop_message(R.NonFiniteLoss(7, float("nan")), tmp_path, command="python x.py")
    assert "step 7" in msg and "No checkpoint was written yet" in msg and "lower --lr" in msg
    _save(R.Checkpoints(tmp_path / "ckpt"), 4, 4)
    msg = R.stop_message(KeyboardInterrupt(), tmp_path, command="python x.py")
    assert msg.startswith("interrupted.") and "step_0000004" in msg and f"python x.py --resume {tmp_path}" in msg


def test_load_tensors_checks_names_and_shapes():
    model = _model()
    R.load_tensors(model, {"0.bias": torch.ones(4)}, "test")
    assert torch.equal(model[0].bias, torch.ones(4))
    with pytest.raises(R.WeightsError, match="Unexpected"):
        R.load_tensors(model, {"nope": torch.ones(4)}, "test")
    with pytest.raises(R.WeightsError, match="Wrong shape"):
        R.load_tensors(model, {"0.bias": torch.ones(5)}, "test")
    with pytest.raises(R.WeightsError, match="Missing"):
        R.load_tensors(model, {"0.bias": torch.ones(4)}, "test", required=["2.weight"])

# ---------------------------------------------------------------------------------------------------------
# the optimizer step


def test_optimizer_step_updates_clips_and_zeroes():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model[0].weight.detach().clone()
    loss = 1000 * model(torch.randn(8, 3)).pow(2).mean()
    value = R.optimizer_step(loss, opt, R.make_scaler("fp32", "cpu"), R.World(), 0, clip_grad=1e-3)
    assert value == pytest.approx(loss.item())
    moved = torch.cat([(p.detach() - q).flatten() for p, q in zip(model[0].parameters(), [before])])
    assert 0 < moved.norm() <= 1e-3 + 1e-6                   # clipped to the total norm
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_loss_stops_before_the_update():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(2, 3)).sum() * float("nan")
    with pytest.raises(R.NonFiniteLoss, match="step 12"):
        R.optimizer_step(loss, opt, None, R.World(), 12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    world = R.setup_distributed("cpu")
    try:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # rank 1 alone sees a NaN: both ranks must stop at the same step (else rank 0 hangs in the next collective)
        loss = model(torch.randn(2, 3)).sum() * (float("nan") if rank == 1 else 1.0)
        try:
            R.optimizer_step(loss, opt, None, world, 3)
            result = "went on"
        except R.NonFiniteLoss:
            result = "stopped"
        frozen = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        frozen[0].requires_grad_(False)
        frozen[0].register_buffer("codebook", torch.full((2,), float(rank)))    # a frozen module's buffer
        net = R.wrap_model(frozen, world)
        net(torch.randn(4, 3))
        ignored = sorted(net.parameters_to_ignore)
        x = torch.full((2, 1), float(rank), requires_grad=True)
        g = R.gather_with_grad(x)
        (g * torch.arange(4.0).view(4, 1)).sum().backward()
        torch.save({"result": result, "gathered": g.detach(), "grad": x.grad, "ignored": ignored,
                    "codebook": frozen[0].codebook}, f"{out}/rank{rank}.pt")
    finally:
        R.cleanup_distributed()


def test_two_processes_stop_together_and_gather_with_gradients(tmp_path):
    port = _free_port()
    torch.multiprocessing.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["result"] == r1["result"] == "stopped"
    # frozen weights and the buffers of frozen modules are not DDP's; a trained BatchNorm's statistics are
    assert r0["ignored"] == ["0.bias", "0.codebook", "0.weight"]
    assert r1["codebook"].tolist() == [1.0, 1.0]           # never overwritten by rank 0's
    assert torch.equal(r0["gathered"], torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
    # every rank's loss is sum_i i * g_i over the gathered rows; summed over the 2 ranks' losses
    assert torch.equal(r0["grad"], 2 * torch.tensor([[0.0], [1.0]])) and torch.equal(r1["grad"], 2 * torch.tensor([[2.0], [3.0]]))

# ---------------------------------------------------------------------------------------------------------
# run folders and resume


def test_run_folders_are_unique_and_a_run_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "REPO_ROOT", tmp_path)
    a, b = R.new_run_dir("x", "demo", None, {"lr": 1}), R.new_run_dir("x", "demo", None, {"lr": 2})
    assert a != b and a.parent == b.parent == tmp_path / "runs" / "x" / "demo"
    assert json.loads((a / "args.json").read_text()) == {"lr": 1} and (a / "env.json").exists()
    with pytest.raises(R.RunError, match=f"holds a run already.*--resume {a}"):
        R.new_run_dir("x", "demo", a, {"lr": 3})
    assert json.loads((a / "args.json").read_text()) == {"lr": 1}
    (tmp_path / "file").write_text("mine")
    with pytest.raises(R.RunError, match="is a file"):
        R.new_run_dir("x", "demo", tmp_path / "file", {})
    with pytest.raises(R.RunError, match="cannot write|is a file"):
        R.new_run_dir("x", "demo", tmp_path / "file" / "run", {})
    assert (tmp_path / "file").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.new_run_dir("x", "demo", empty, {}) == empty


def test_check_writable(tmp_path):
    assert R.check_writable(tmp_path / "new" / "deeper") is None
    (tmp_path / "f").write_text("")
    assert "is a file" in R.check_writable(tmp_path / "f" / "sub")


def _parser():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # as every script
    R.add_common_args(p, datasets=["demo", "isic"], epochs=100, batch_size=64, lr=2.5e-3)
    p.add_argument("--rank", type=int, default=8)
    return p


def _parse(argv):
    p = _parser()
    args = p.parse_args(argv)
    return p, args, R.given_flags(p, argv)


def test_resume_takes_the_runs_flags_and_refuses_ones_that_change_what_is_trained(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"data": "isic", "rank": 4, "lr": 0.1, "precision": "bf16",
                                                    "num_workers": 8}))
    p, args, given = _parse(["--resume", str(tmp_path), "--num-workers", "2"])
    R.restore_run_args(args, given)
    assert (args.data, args.rank, args.lr) == ("isic", 4, 0.1)            # from the run
    assert (args.precision, args.num_workers) == ("auto", 2)              # how to run: today's
    p, args, given = _parse(["--resume", str(tmp_path), "--data", "demo", "--rank=4", "--lr", "0.2"])
    with pytest.raises(R.RunError) as e:
        R.restore_run_args(args, given)
    assert "--data demo (the run has isic)" in str(e.value) and "--lr 0.2 (the run has 0.1)" in str(e.value)
    assert "--rank" not in str(e.value)                                    # typed, but equal to the run's
    p, args, given = _parse(["--resume", str(tmp_path / "typo")])
    with pytest.raises(R.RunError, match="not a run folder"):
        R.restore_run_args(args, given)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-3"], "--batch-size -3: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be above 0"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--steps", "-1"], "--steps -1: must be 0 or more"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--device", "cuda:3"], "not available"),
    (["--device", "tpu"], "unknown device"),
    (["--eval-only"], "--eval-only needs --resume"),
])
def test_user_mistakes_exit_2_with_a_message(argv, message, capsys):
    p, args, _ = _parse(argv)
    with pytest.raises(SystemExit) as e:
        R.finish_common_args(p, args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_optional_shared_flags_are_checked_and_free_on_resume(tmp_path, capsys):
    p = argparse.ArgumentParser()
    R.add_common_args(p, datasets=["demo"], eval_batch_size=256, ckpt_every=50, help={"ckpt_every": "demo: 10"})
    assert "demo: 10" in p.format_help() and "--eval-batch-size" in p.format_help()
    for argv, message in ((["--ckpt-every", "0"], "--ckpt-every 0: must be at least 1"),
                          (["--eval-batch-size", "-1"], "--eval-batch-size -1: must be at least 1")):
        with pytest.raises(SystemExit) as e:
            R.finish_common_args(p, p.parse_args(argv))
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(a.dest == "ckpt_every" for a in _parser()._actions)       # only where the script asks
    (tmp_path / "args.json").write_text(json.dumps({"data": "demo", "ckpt_every": 50, "eval_batch_size": 256}))
    argv = ["--resume", str(tmp_path), "--ckpt-every", "7", "--eval-batch-size", "8"]
    args = p.parse_args(argv)
    R.restore_run_args(args, R.given_flags(p, argv))                          # how often to save: not what trains
    assert (args.ckpt_every, args.eval_batch_size) == (7, 8)


def test_cached_tensors_compute_once_and_stages_are_found(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": torch.arange(3.0)}
    a = R.cached_tensors(tmp_path / "c" / "f.safetensors", R.World(), compute)
    b = R.cached_tensors(tmp_path / "c" / "f.safetensors", R.World(), compute)
    assert len(calls) == 1 and torch.equal(a["x"], b["x"]) and torch.equal(a["x"], torch.arange(3.0))
    R.save_stage(tmp_path / "run" / "stage1", {"w": torch.ones(2)}, {"dim": 4, "path": tmp_path}, R.World())
    assert R.find_stage(tmp_path / "run", subfolders=("stage1",)) == tmp_path / "run" / "stage1"
    assert json.loads((tmp_path / "run" / "stage1" / "model.json").read_text())["dim"] == 4
    with pytest.raises(R.RunError, match="no finished stage.*stage2/"):
        R.find_stage(tmp_path / "run", subfolders=("stage2",))


def test_run_seeds_runs_each_seed_in_its_folder_and_writes_mean_and_std(tmp_path, capsys):
    report = lambda acc: {"acc": acc, "f1_macro": acc, "auroc": acc, "kappa": acc, "kappa_quadratic": acc}
    seen = []
    run_one = lambda args, world: seen.append((args.seed, args.out)) or report(0.1 * args.seed)
    args = argparse.Namespace(seeds="1,3", seed=0, out=str(tmp_path))
    assert [r["acc"] for r in R.run_seeds(run_one, args, R.World())] == pytest.approx([0.1, 0.3])
    assert seen == [(1, str(tmp_path / "seed1")), (3, str(tmp_path / "seed3"))]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["acc"] == pytest.approx({"mean": 0.2, "std": 0.1})
    assert "over seeds 1, 3: acc 20.00 +- 10.00" in capsys.readouterr().out


def test_stopped_says_what_is_on_disk_and_picks_the_exit_code(tmp_path):
    nan = R.Stopped(R.NonFiniteLoss(7, float("nan")), tmp_path, command="python x.py")
    assert nan.code == 3 and "No checkpoint was written yet" in str(nan) and isinstance(nan, R.USER_ERRORS)
    stop = R.Stopped(KeyboardInterrupt(), tmp_path)
    assert stop.code == 2 and str(stop).startswith("interrupted")
    assert R.RunError("x").code == 2


def test_auto_flags_resolve_and_given_flags_sees_both_spellings():
    p, args, given = _parse(["--lr=0.5", "--seed", "3"])
    assert given == {"lr", "seed"}
    R.finish_common_args(p, args)
    if not torch.cuda.is_available():
        assert (args.device, args.precision, args.num_workers) == ("cpu", "fp32", 0)
    assert "training epochs (default: 100)" in " ".join(p.format_help().split())

# ---------------------------------------------------------------------------------------------------------
# precision, data order, logs


def test_cast_frozen_is_by_module_type():
    model = _model()
    model[2].weight.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    R.cast_frozen(model, torch.bfloat16)
    assert model[2].weight.dtype == torch.bfloat16                      # frozen Linear
    assert model[2].bias.dtype == model[0].weight.dtype == torch.float32  # trainables
    assert model[1].weight.dtype == torch.float32                       # frozen norm stays fp32


def test_precision_guards():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        R.autocast(cpu, "fp16")
    assert not R.make_scaler("bf16", cpu).is_enabled()
    with R.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with R.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_epoch_batches_replay_and_split_one_batch_over_ranks():
    one = R.epoch_batches(20, 4, seed=1, epoch=3, world=R.World())
    assert one == R.epoch_batches(20, 4, seed=1, epoch=3, world=R.World()) != R.epoch_batches(20, 4, 1, 4, R.World())
    r0, r1 = (R.epoch_batches(20, 2, 1, 3, R.World(rank=r, size=2)) for r in (0, 1))
    assert [a + b for a, b in zip(r0, r1)] == one
    with pytest.raises(R.DataError, match="fewer than one batch"):
        R.epoch_batches(3, 4, 0, 0, R.World())


def test_predict_covers_the_whole_set_in_order_under_autocast():
    x, y = torch.randn(10, 3), torch.arange(10)
    args = argparse.Namespace(eval_batch_size=4, num_workers=0, precision="bf16")
    dtypes = []

    def fn(batch):  # (b, 3) -> (b, 2), recording the dtype autocast gives the matmul
        out = batch @ torch.ones(3, 2)
        dtypes.append(out.dtype)
        return out

    out, labels = R.predict(fn, torch.utils.data.TensorDataset(x, y), args, torch.device("cpu"))
    assert dtypes == [torch.bfloat16] * 3                   # batches of 4, 4 and the last 2: nothing dropped
    assert out.dtype == torch.float32 and out.shape == (10, 2) and labels.tolist() == list(range(10))
    torch.testing.assert_close(out, (x @ torch.ones(3, 2)).bfloat16().float(), rtol=0, atol=0.05)


def test_bench_alternating_flips_the_order_every_round(monkeypatch, capsys):
    monkeypatch.setattr(R, "matmul_peak_flops", lambda device, dtype: 1e9)
    calls = []
    steps = {name: (lambda name=name: calls.append(name) or torch.ones(8, 8) @ torch.ones(8, 8)) for name in "ab"}
    rows = R.bench_alternating(steps, precision="fp32", batch=4, device="cpu", n_steps=3, label="step {}")
    assert calls[:8] == ["b", "a", "a", "b", "b", "a", "a", "b"]      # round 0 warms up; the FLOP count runs last
    assert [r["what"] for r in rows] == ["step a", "step b"] and all(r["step_ms"] > 0 for r in rows)
    assert "a / b step time: wall " in capsys.readouterr().out


def test_progress_prints_rate_and_eta(capsys):
    p = R.Progress(10, "train", every=0.0)
    p.update(5, loss=0.5)
    out = capsys.readouterr().out
    assert out.startswith("train 5/10 | loss 0.5 |") and "it/s" in out and "eta" in out


def test_jsonl_log(tmp_path):
    log = R.JsonlLog(tmp_path / "metrics.jsonl")
    log.log(step=1, loss=torch.tensor(0.25))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.25}\n'


def test_bench_row_has_the_same_columns_everywhere():
    r = {"step_ms": 12.5, "items_per_s": 80.0, "tflops": 0.01, "mfu": 0.25, "matmul_peak_tflops": 0.04,
         "peak_mem_mb": 100.0}
    row = R.bench_row("thing", "bf16", 8, r)
    assert "step      12.5 ms" in row and "80.00 img/s" in row and "MFU  25.0%" in row and "peak mem 100 MB" in row


def test_ci_gpu_reads_the_rows_bench_row_prints():
    import importlib.machinery
    import importlib.util
    from pathlib import Path
    loader = importlib.machinery.SourceFileLoader("ci_gpu", str(Path(__file__).parent.parent / ".ci" / "gpu"))
    gpu = importlib.util.module_from_spec(importlib.util.spec_from_loader("ci_gpu", loader))
    loader.exec_module(gpu)
    r = {"step_ms": 812.25, "items_per_s": 9.85, "tflops": 1.5, "mfu": 0.4321, "matmul_peak_tflops": 700.0,
         "peak_mem_mb": 20480.0}
    m = gpu.ROW.match(R.bench_row("CLIP ViT-B/16 vision + deep VPT", "fp16", 64, r, unit="vol"))
    assert m and (m["what"].strip(), m["prec"], m["batch"], m["ms"], m["unit"], m["mfu"], m["mem"]) == (
        "CLIP ViT-B/16 vision + deep VPT", "fp16", "64", "812.2", "vol", "43.2", "20480")


# ---------------------------------------------------------------------------------------------------------
# main() around a script's work, the final tensors, the bench step, resume errors as usage errors


def test_run_main_turns_user_errors_and_an_early_ctrl_c_into_messages(tmp_path, capsys):
    seen = []
    assert R.run_main(lambda world: seen.append(world.device.type), "cpu") == 0 and seen == ["cpu"]

    def bad(world):
        raise R.RunError("no such run")
    assert R.run_main(bad, "cpu") == 2 and "error: no such run" in capsys.readouterr().err

    def stopped(world):
        raise R.Stopped(R.NonFiniteLoss(3, float("nan")), tmp_path, "python x.py")
    assert R.run_main(stopped, "cpu") == 3

    def interrupted(world):
        raise KeyboardInterrupt
    assert R.run_main(interrupted, "cpu") == 2
    assert "interrupted before training started" in capsys.readouterr().err

    def bug(world):  # a programming error is not a user error: it keeps its traceback
        raise ZeroDivisionError
    with pytest.raises(ZeroDivisionError):
        R.run_main(bug, "cpu")


def test_load_final_refuses_an_unfinished_run_and_loads_a_finished_one(tmp_path):
    model = _model()
    with pytest.raises(R.RunError, match="has not finished"):
        R.load_final(model, tmp_path, "cpu")
    w = {"0.weight": torch.full((4, 3), 2.0)}
    R.save_tensors(tmp_path / "trainable.safetensors", w)
    R.load_final(model, tmp_path, "cpu", required=w)
    assert torch.equal(model[0].weight, w["0.weight"])
    with pytest.raises(Exception, match="2.weight"):     # a tensor the model needs is not in the file
        R.load_final(_model(), tmp_path, "cpu", required={**w, "2.weight": torch.zeros(2, 4)})


def test_bench_step_times_a_step_and_counts_its_flops(capsys):
    model = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    calls = []

    def step():
        calls.append(1)
        model(x).sum().backward()
    row = R.bench_step("linear", step, precision="fp32", batch=8, device="cpu", steps=2)
    assert row["what"] == "linear" and row["batch"] == 8 and row["step_ms"] > 0 and row["items_per_s"] > 0
    assert row["tflops"] > 0 and len(calls) >= 3            # flop count + warm-up + the timed steps
    assert "linear" in capsys.readouterr().out


def test_restore_run_args_or_exit_is_a_usage_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"lr": 0.1, "seed": 0}))
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume")
    args = p.parse_args(["--resume", str(run), "--lr", "0.5"])
    with pytest.raises(SystemExit) as e:
        R.restore_run_args_or_exit(p, args, {"lr", "resume"})
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err


def test_saved_activation_bytes_counts_each_saved_storage_once_and_leaves_the_weights_out():
    # Linear saves its input (5 x 8), ReLU its output (5 x 16), which the next Linear saves again: one storage
    torch.manual_seed(0)
    first, last = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), torch.nn.Linear(16, 4)
    model = torch.nn.Sequential(first, last)
    x = torch.randn(5, 8)
    r = R.saved_activation_bytes(lambda: model(x), model, [first, last])
    assert r["all"] == 4 * (5 * 8 + 5 * 16) and r["per_layer"] == [r["all"], 0]
    assert r["kept"] == 4 * (5 * 8 + 5 * 16)                  # each layer's input: x, and the ReLU output
    with torch.no_grad():
        assert R.saved_activation_bytes(lambda: model(x), model, [first, last])["all"] == 0


def test_time_call_gives_seconds_per_call_after_a_warm_up():
    calls = []
    t = R.time_call(lambda: calls.append(time.sleep(0.01)), torch.device("cpu"), reps=3)
    assert len(calls) == 4 and 0.009 < t < 0.5
