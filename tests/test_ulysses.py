"""Ulysses sequence parallelism under torchrun (gloo, CPU): ranks that split every packed
row along the sequence train exactly as one process does; SP sizes that cannot split the
model or the world fail in one line before the model is loaded."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from test_distributed import ROWS, losses, run
from verlite import cli

SP2 = "ulysses_sequence_parallel_size=2"


def assert_same_curve(a: dict, b: dict, steps: int) -> None:
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert a[steps] != pytest.approx(a[1], rel=1e-3)  # it trained


def val_losses(run_dir) -> list[float]:
    return [r["val/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val/loss" in r]


@pytest.mark.slow  # ~21 s of two ranks on two cores; the split itself is tested by default (test_shard_micro_batch_*)
def test_two_ranks_sp2_full_finetune_follow_the_one_process_curve(tmp_path, tiny_model):
    val = write_jsonl(tmp_path / "val.jsonl", ROWS[:5])  # 5 samples: the last micro-batch holds one
    extra = ["model.lora_rank=0", f"data.val_files={val}", "trainer.test_freq=2"]
    run(tmp_path / "one", tiny_model, 1, 4, *extra)
    sp = run(tmp_path / "sp", tiny_model, 2, 4, *extra, SP2)
    assert_same_curve(losses(tmp_path / "one" / "run"), losses(tmp_path / "sp" / "run"), 4)
    assert sp.stdout.count("Step 3/4") == 1  # only rank 0 speaks
    va, vb = val_losses(tmp_path / "one" / "run"), val_losses(tmp_path / "sp" / "run")
    assert len(va) == len(vb) == 2 and vb == pytest.approx(va, rel=1e-5)
    # The exported weights are those of the one-process run.
    wa = load_file(tmp_path / "one" / "run" / "global_step_4" / "huggingface" / "model.safetensors")
    wb = load_file(tmp_path / "sp" / "run" / "global_step_4" / "huggingface" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        # atol 1e-4: Adam divides by sqrt(v), so on a weight whose gradient is almost zero
        # (an embedding row of a token seen once) float noise between the two layouts
        # becomes an lr-sized step; the loss curves above match to 1e-5.
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~21 s
def test_two_ranks_sp2_lora_follow_the_one_process_curve(tmp_path, tiny_model):
    extra = ["model.lora_rank=4", "model.target_modules=[q_proj,v_proj]", "optim.lr=1e-2"]
    run(tmp_path / "one", tiny_model, 1, 4, *extra)
    run(tmp_path / "sp", tiny_model, 2, 4, *extra, SP2)
    assert_same_curve(losses(tmp_path / "one" / "run"), losses(tmp_path / "sp" / "run"), 4)


@pytest.mark.slow
def test_token_budget_is_per_gpu(tmp_path, tiny_model, capsys):
    """data.max_token_len_per_gpu is per GPU, as in verl: an SP-2 group's micro-batch holds
    twice that, so SP 2 takes a budget below the longest sample and trains as one process
    with twice the budget."""
    import math
    import re

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert cli.main(["sft", f"data.train_files={data}", f"model.partial_pretrain={tiny_model}", "trainer.device=cpu",
                     "data.packing=true", "data.max_token_len_per_gpu=1"]) == 2
    longest = int(re.search(r"longest sample \((\d+) tokens\)", capsys.readouterr().err).group(1))
    half = math.ceil(longest / 2)
    run(tmp_path / "one", tiny_model, 1, 3, "model.lora_rank=0", "data.packing=true",
        f"data.max_token_len_per_gpu={2 * half}")
    run(tmp_path / "sp", tiny_model, 2, 3, "model.lora_rank=0", "data.packing=true",
        f"data.max_token_len_per_gpu={half}", SP2)
    assert_same_curve(losses(tmp_path / "one" / "run"), losses(tmp_path / "sp" / "run"), 3)


@pytest.mark.slow  # four processes
def test_four_ranks_dp2_sp2_follow_the_one_process_curve(tmp_path, tiny_model):
    run(tmp_path / "one", tiny_model, 1, 3, "model.lora_rank=0")
    run(tmp_path / "dpsp", tiny_model, 4, 3, "model.lora_rank=0", SP2)
    assert_same_curve(losses(tmp_path / "one" / "run"), losses(tmp_path / "dpsp" / "run"), 3)


@pytest.mark.slow
def test_four_ranks_sp4_repeat_kv_heads(tmp_path, tiny_model):
    """The tiny model has 2 KV heads for 4 query heads: SP 4 repeats each KV head to one per rank."""
    run(tmp_path / "one", tiny_model, 1, 3, "model.lora_rank=0")
    run(tmp_path / "sp4", tiny_model, 4, 3, "model.lora_rank=0", "ulysses_sequence_parallel_size=4")
    assert_same_curve(losses(tmp_path / "one" / "run"), losses(tmp_path / "sp4" / "run"), 3)


@pytest.fixture
def model_12_heads_4_kv(tmp_path_factory, tokenizer_chat):
    from verlite.models.tiny import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("h12") / "qwen2", tokenizer_chat, hidden_size=96, layers=1,
                       heads=12, kv_heads=4)


@pytest.mark.parametrize("sp, model, fragment", [
    (3, "tiny", "ulysses_sequence_parallel_size=3 does not divide the model's 4 attention heads"),
    (2, "tiny", "ulysses_sequence_parallel_size=2 does not divide the 1 process(es)"),
    (0, "tiny", "ulysses_sequence_parallel_size=0 must be 1 (off) or more"),
    (6, "h12", "ulysses_sequence_parallel_size=6 does not divide the model's 4 key/value heads"),
])
def test_bad_sp_size_one_line_before_model_load(sp, model, fragment, tiny_model, model_12_heads_4_kv, tmp_path,
                                                capsys, no_model_load):
    path = tiny_model if model == "tiny" else model_12_heads_4_kv
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    code = cli.main(["sft", f"data.train_files={data}", f"model.partial_pretrain={path}", "trainer.device=cpu",
                     f"trainer.default_local_dir={tmp_path / 'run'}", f"ulysses_sequence_parallel_size={sp}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("verlite: error: ") and "\n" not in err, err
    assert fragment in err, err
    assert not (tmp_path / "run").exists()


def test_bad_sp_size_real_process_exit_code(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = subprocess.run([sys.executable, "-m", "verlite.trainer.fsdp_sft_trainer", f"data.train_files={data}",
                             f"model.partial_pretrain={tiny_model}", "trainer.device=cpu", SP2,
                             f"trainer.default_local_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert "ulysses_sequence_parallel_size=2 does not divide the 1 process(es)" in result.stderr


def _plan_rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[2] == "GiB" and line.startswith("  "):
            rows[parts[0].strip()] = float(parts[1])
    return rows


def test_plan_knows_the_per_gpu_activation_share(tiny_model, capsys):
    """`plan --nproc 4` with SP 2: the same sharded weights, half the activations per GPU."""
    args = ["plan", f"model.partial_pretrain={tiny_model}", "data.micro_batch_size_per_gpu=64", "data.max_length=4096",
            "model.enable_gradient_checkpointing=false", "--gpu_mem_gb", "24", "--nproc", "4"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main([*args, SP2]) == 0
    out = capsys.readouterr().out
    a, b = _plan_rows(plain), _plan_rows(out)
    assert a["weights (fp32 master)"] == b["weights (fp32 master)"]
    assert b["activations"] == pytest.approx(a["activations"] / 2, rel=0.02) and a["activations"] > 1
    assert "split over 2 GPUs" in out and "2 data-parallel group(s)" in out
    assert cli.main([*args[:-2], "--nproc", "3", SP2]) == 2
    err = capsys.readouterr().err.strip()
    assert "ulysses_sequence_parallel_size=2 does not divide the 3 process(es)" in err and "\n" not in err


@pytest.mark.slow  # a bench smoke run
def test_bench_check_smoke():
    """bench/ulysses_check.py (the GPU check) in its CPU form: one row split over 2 ranks has
    the whole row's loss and summed gradients."""
    import os
    from pathlib import Path

    from test_distributed import free_port

    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                             str(root / "bench" / "ulysses_check.py"), "--smoke"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads([x for x in result.stdout.splitlines() if x.startswith("{")][-1])
    assert line["sp"] == 2 and line["loss_rel_err"] < 1e-5 and line["grad_rel_err"] < 1e-5, line


@pytest.mark.slow
def test_sp2_checkpoint_resumes_on_the_same_curve(tmp_path, tiny_model):
    import shutil

    run(tmp_path, tiny_model, 2, 4, "model.lora_rank=0", SP2)  # checkpoints at steps 2 and 4
    shutil.rmtree(tmp_path / "run" / "global_step_4")        # as if the job had died after step 2
    resumed = run(tmp_path, tiny_model, 2, 4, "model.lora_rank=0", SP2)
    assert "Resumed from" in resumed.stdout and "global_step_2" in resumed.stdout
    run(tmp_path / "ref", tiny_model, 1, 4, "model.lora_rank=0")
    assert_same_curve(losses(tmp_path / "ref" / "run"), losses(tmp_path / "run"), 4)


def test_shard_micro_batch_splits_a_packed_row_with_its_own_padding_segment():
    import numpy as np

    from verlite.data.batching import IGNORE_INDEX, collate
    from verlite.data.dataset import SFTDataset
    from verlite.data.formatting import Encoded
    from verlite.engine.distributed import DistInfo
    from verlite.engine.ulysses import shard_micro_batch

    ds = SFTDataset()
    for n in (5, 8, 4):  # 17 tokens: odd, so one padding token for 2 ranks
        ds.append(Encoded(list(range(10, 10 + n)), [0] * 2 + [1] * (n - 2)))
    row = collate(ds, [0, 1, 2], True, 0)
    shares = [shard_micro_batch(row, DistInfo(r, 4, r, torch.device("cpu"), sp_size=2)) for r in (2, 3)]
    assert [s.input_ids.shape[1] for s in shares] == [9, 9]
    joined = torch.cat([s.input_ids for s in shares], dim=1)
    assert torch.equal(joined[:, :17], row.input_ids)
    labels = torch.cat([s.labels for s in shares], dim=1)
    assert torch.equal(labels[:, :17], row.labels) and labels[0, 17] == IGNORE_INDEX
    positions = torch.cat([s.position_ids for s in shares], dim=1)[0].tolist()
    assert positions == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0]
    for s in shares:  # every rank keeps the whole row's boundaries, the padding as a segment of its own
        assert s.cu_seqlens.tolist() == [0, 5, 13, 17, 18] and s.max_seqlen == 8
        np.testing.assert_array_equal(s.loss_index.numpy(), np.flatnonzero(s.labels[0].numpy() != IGNORE_INDEX))
    assert sum(s.num_loss_tokens for s in shares) == row.num_loss_tokens > 0
    assert [s.num_tokens for s in shares] == [9, 8]
