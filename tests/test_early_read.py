"""The model read beside the data (models/early_read.py): it overlaps the tokenizing workers,
no worker pool is ever forked while it runs, its errors reach the caller, and a run takes
its model from it."""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import write_jsonl
from test_trainer import config, rows
from verlite.config import load_config
from verlite.data.dataset import load_dataset
from verlite.engine.distributed import init_distributed, shutdown
from verlite.errors import VerliteError
from verlite.models.early_read import EarlyRead
from verlite.trainer.sft_trainer import Trainer

_forks: list[float] = []
os.register_at_fork(before=lambda: _forks.append(time.perf_counter()))


class Recorded(EarlyRead):
    """An EarlyRead whose work is a sleep, with when it ran."""

    def __init__(self, seconds: float):
        self.span: list[float] = []

        def work():
            self.span.append(time.perf_counter())
            time.sleep(seconds)
            self.span.append(time.perf_counter())
            return "model"

        super().__init__(work)


def test_result_runs_the_read_once_and_raises_its_error_in_the_caller():
    calls = []
    inline = EarlyRead(lambda: calls.append(threading.current_thread().name) or "m")
    assert inline.result() == "m" and not inline.beside  # never started: read in the caller's thread
    assert calls == [threading.current_thread().name]

    side = EarlyRead(lambda: calls.append(threading.current_thread().name) or "m")
    side.may_run()
    side.may_run()  # once
    assert side.result() == "m" and side.beside and calls[1:] == ["verlite-model-read"]

    def fail():
        raise VerliteError("model path /nowhere does not exist; check model.partial_pretrain")

    failing = EarlyRead(fail)
    failing.may_run()
    with pytest.raises(VerliteError, match="/nowhere"):
        failing.result()


def test_the_read_overlaps_the_workers_and_no_pool_forks_while_it_runs(tmp_path, tiny_model, monkeypatch):
    """Two files each large enough for a worker pool: the read starts once the first pool's
    workers exist (while they tokenize), and the second pool is forked only after it ended
    (the read lasts longer than the first file's tokenizing)."""
    from verlite.data import dataset
    from verlite.models.load import load_tokenizer

    n = 64
    monkeypatch.setattr(dataset, "PARALLEL_MIN_ROWS", n)  # small files still get a pool
    first = write_jsonl(tmp_path / "a.jsonl", rows(n))
    second = write_jsonl(tmp_path / "b.jsonl", rows(n)[::-1])
    cfg = load_config(None, [f"data.train_files=[{first},{second}]", f"model.partial_pretrain={tiny_model}"]).data
    tok = load_tokenizer(str(tiny_model), False)
    read = Recorded(seconds=1.0)
    _forks.clear()
    started = time.perf_counter()
    ds = load_dataset(cfg.train_files, cfg, tok, workers=2, cache=False, beside=read)
    done = time.perf_counter()
    assert len(ds) == 2 * n and read.result() == "model"
    begin, end = read.span
    assert len(_forks) >= 4, _forks  # two workers for each file
    assert not [t for t in _forks if begin <= t <= end], (begin, end, _forks)  # no fork inside the read
    assert started < begin < done  # it ran while the data loaded...
    assert [t for t in _forks if t < begin] and [t for t in _forks if t > end]  # ...after pool 1, before pool 2


@pytest.mark.parametrize("early", ["1", "0"])
def test_a_run_reads_its_model_beside_the_data(tmp_path, tiny_model, caplog, monkeypatch, early):
    """By default; VERLITE_EARLY_READ=0 (a bench knob) reads it after the data, as before."""
    monkeypatch.setenv("VERLITE_EARLY_READ", early)
    cfg = config(tmp_path, tiny_model, "trainer.total_training_steps=1")
    with caplog.at_level("INFO", logger="verlite"):
        trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        assert ("model: read beside the data in" in caplog.text) == (early == "1")
        assert trainer.model is not None
    finally:
        shutdown()


def test_a_model_read_failing_beside_the_data_is_one_line(tmp_path, tiny_model, capsys):
    """A model folder without weights fails on the side thread; the run reports it as the
    plain one-line error, exit code 2 (bad data's own line: tests/test_bad_inputs.py, where
    the read is made to fail too)."""
    from verlite import cli

    weights = tmp_path / "model"
    weights.mkdir()
    for f in tiny_model.iterdir():  # tokenizer and config, but no weights file
        if not f.name.endswith(".safetensors"):
            (weights / f.name).write_bytes(f.read_bytes())
    good = write_jsonl(tmp_path / "good.jsonl", rows(8))
    code = cli.main(["sft", f"data.train_files={good}", f"model.partial_pretrain={weights}", "trainer.device=cpu",
                     f"trainer.default_local_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("verlite: error: ") and "\n" not in err, err
    assert f"cannot load the weights of '{weights}'" in err, err
