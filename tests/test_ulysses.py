"""Ulysses sequence parallelism under torchrun (gloo, CPU): ranks that split every packed
row along the sequence train exactly as one process does."""

import pytest

from test_distributed import losses, run


def assert_same_curve(a: dict, b: dict, steps: int) -> None:
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert a[steps] != pytest.approx(a[1], rel=1e-3)  # it trained


@pytest.mark.parametrize("lora", [False, True])
def test_two_ranks_sp2_follow_the_one_process_curve(tmp_path, tiny_model, lora):
    extra = ["model.lora_rank=4", "model.target_modules=[q_proj,v_proj]", "optim.lr=1e-2"] if lora else \
        ["model.lora_rank=0"]
    run(tmp_path / "one", tiny_model, 1, 4, *extra)
    two = run(tmp_path / "sp", tiny_model, 2, 4, *extra, "ulysses_sequence_parallel_size=2")
    assert_same_curve(losses(tmp_path / "one" / "run"), losses(tmp_path / "sp" / "run"), 4)
    assert two.stdout.count("Step 3/4") == 1
