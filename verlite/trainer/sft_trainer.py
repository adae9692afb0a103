"""The SFT recipe: set up, loop, evaluate, checkpoint. Read it top to bottom.

Everything it calls is a small builder elsewhere: data/ makes samples and micro-batches,
models/ loads the HF model, engine/ shards it and does one optimizer step, checkpoint.py
and metrics.py write what the run leaves behind, run_lock.py keeps a second run out of the
directory and resume_check.py refuses a checkpoint that does not fit the config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from verlite.config import SFTConfig, loggers
from verlite.data.batching import StepBatches, StepPlan, collate, split_evenly
from verlite.data.cache import TokenCache
from verlite.data.dataset import SFTDataset, load_dataset
from verlite.data.formatting import apply_chat_template_override
from verlite.engine import gpu_warmup, graph_step, ulysses
from verlite.engine.memory import GIB, apply_memory_cap, gpu_capacity_gib, oom_recompute
from verlite.engine.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown
from verlite.engine.optim import build_optimizer, build_scheduler
from verlite.engine.prefetch import prefetch
from verlite.engine.compile import maybe_compile, measured_cost, parse_setting, steady_max_seqlen
from verlite.engine.sharding import offloads, reshard_all, shard_model, uses_fsdp
from verlite.engine.step import StepResult, train_step
from verlite import import_index
from verlite.errors import VerliteError
from verlite.models import lean_imports
from verlite.models.attention import pick_single_sequence_backends, supports_varlen
from verlite.models.compute_dtype import stream_in_compute_dtype
from verlite.models.fused_norm import use_fused_rms_norm
from verlite.models import kernel_warmup, liger
from verlite.models.early_read import EarlyRead
from verlite.models.load import (load_hf_config, load_tokenizer, master_dtype, prepare_model, read_ahead_weights,
                                 read_model)
from verlite.models.sft_model import SFTModel
from verlite.trainer import checkpoint as ckpt
from verlite.trainer import async_checkpoint
from verlite.trainer.metrics import MetricsLogger, Throughput, format_line, gpu_mem_gb
from verlite.trainer.resume_check import check_resume, run_settings
from verlite.trainer.run_lock import hold_run_dir
from verlite.trainer.signals import StopRequest, TrainingInterrupted
from verlite.trainer import timeline
from verlite.trainer.timeline import Timeline, launch_time

log = logging.getLogger("verlite.trainer")


def run_sft(cfg: SFTConfig, after_setup: Optional[Callable[[], None]] = None, exiting: bool = False) -> dict:
    """Train as `cfg` says; returns the run summary. Safe to call more than once per process.
    `exiting`: the process ends right after (the CLI), so a one-process run leaves its process
    group to the exit (engine/distributed.shutdown says why)."""
    dist_info = init_distributed(cfg.trainer.device)
    timeline.note("device init")  # CUDA's context (torch.cuda.set_device), the process group
    try:
        run_dir = Path(cfg.trainer.default_local_dir).expanduser()
        with hold_run_dir(run_dir, dist_info):
            if dist_info.is_main:
                ckpt.discard_leftovers(run_dir)  # folders a killed run had renamed aside to delete
            try:
                trainer = Trainer(cfg, dist_info)
                if after_setup is not None:
                    after_setup()  # the model is loaded: e.g. the CLI's warm-start helper (verlite/warm.py)
                return trainer.fit()
            finally:
                # No half-deleted folder left behind by a run that failed; one that ended handed
                # its last deletions (and its final checkpoint's fsync) to a detached process (ckpt.hand_off).
                timeline.trace("run over")
                ckpt.wait_for_discards()
                timeline.trace("deletions waited for")
    finally:
        timeline.trace("run folder released")
        shutdown(exiting)
        timeline.trace("process group left")


class StepHealth:
    """NaN/inf bookkeeping kept on the device: skipped steps, the current run of them, and
    the loss of the last good step. `check` reads it (one sync) and stops a run gone bad."""

    def __init__(self, device: torch.device, fused_step: bool = False):
        # With the update fused into backward, a NaN loss is caught before any weight moves, but
        # a gradient that turns non-finite in backward is found bucket by bucket: updates of
        # earlier buckets are already done (engine/fused_backward.py).
        self.untouched = ("weights untouched" if not fused_step else "weights untouched for a NaN/inf loss; for a "
                          "NaN/inf gradient the fused step zeroed or skipped the bad weights' update and applied the rest")
        self.streak_t = torch.zeros((), device=device)
        self.skipped_t = torch.zeros((), device=device)
        self.good_loss_t = torch.full((), float("nan"), device=device)
        self.skipped = 0
        self._reported = 0

    def add(self, result: StepResult) -> None:
        bad = result.skipped
        self.streak_t = (self.streak_t + bad) * bad  # consecutive bad steps, 0 after a good one
        self.skipped_t += bad
        self.good_loss_t = torch.where(bad > 0, self.good_loss_t, result.loss)

    def check(self, global_step: int, max_bad: int, run_dir: Path, settle=None) -> None:
        """`settle` lets a checkpoint still being written land before the error names the last good one."""
        streak, self.skipped = (int(v) for v in torch.stack([self.streak_t, self.skipped_t]).tolist())
        if self.skipped > self._reported:
            log.warning("by step %d: %d step(s) with a NaN/inf loss or gradient were skipped, %s (%d in a row now)",
                        global_step, self.skipped - self._reported, self.untouched, streak)
            self._reported = self.skipped
        if streak >= max_bad:
            if settle is not None:
                settle()
            good = ckpt.latest_checkpoint(run_dir)
            raise VerliteError(f"step {global_step}: {streak} NaN/inf steps in a row (trainer.max_bad_steps="
                               f"{max_bad}); last good checkpoint: {good or 'none'}; lower optim.lr or check the data")

    def last_good_loss(self) -> float:
        return self.good_loss_t.item()


class Trainer:
    def __init__(self, cfg: SFTConfig, dist_info: DistInfo, train_ds: Optional[SFTDataset] = None):
        """`train_ds` replaces data.train_files with samples already tokenized (the benchmark's)."""
        hidden = lean_imports.unused_by(cfg.model, cfg.optim.optimizer_impl, bool(cfg.data.custom_cls.path))
        with lean_imports.without(hidden):
            self._set_up(cfg, dist_info, train_ds)

    def _set_up(self, cfg: SFTConfig, dist_info: DistInfo, train_ds: Optional[SFTDataset]) -> None:
        self.cfg = cfg
        self.timeline = Timeline(launch_time())  # where the time goes, for the closing summary
        sp = cfg.ulysses_sequence_parallel_size
        if sp != 1:  # a bad SP size fails now, before data or weights are read
            ulysses.check_sp_size(sp, dist_info.world_size, load_hf_config(cfg.model), cfg.model.strategy)
        self.dist = dist_info = ulysses.setup(sp, dist_info)
        self.device = dist_info.device
        self.is_lora = cfg.model.lora_rank > 0
        self.run_dir = Path(cfg.trainer.default_local_dir).expanduser()
        parse_setting(cfg.model.compile)  # a bad value fails before any loading
        graph_step.check_before_loading(cfg, self.device)
        random.seed(cfg.trainer.seed)
        torch.manual_seed(cfg.trainer.seed)
        apply_memory_cap(cfg.trainer.gpu_mem_gb, self.device)
        # On GPUs every micro-batch is laid out padding-free (one packed row, varlen attention):
        # the same numbers as padded rows without computing on padding. data.packing decides
        # only how samples are grouped (by token budget rather than by count).
        # Sequence parallelism splits packed rows, so it always packs.
        self.packed_layout = cfg.data.packing or sp > 1 or (self.device.type == "cuda" and supports_varlen(self.device))

        liger_kinds = liger.wanted_kinds(cfg.model.use_liger, self.device)
        # Liger's Triton kernels compile in a side process on a machine that has not yet
        # (models/kernel_warmup.py), while this one imports, reads the data and the weights.
        self.kernel_warmup = kernel_warmup.start_for_run(
            cfg.model, liger_kinds, self.device, dist_info.local_rank, uses_fsdp(cfg.model, dist_info.world_size),
            self.packed_layout, cfg.data.micro_batch_size_per_gpu, sp)
        # Data first: a bad file fails before the model is taken (the weights' files are read
        # ahead by the kernel meanwhile, and the model itself beside the tokenizing below).
        read_ahead_weights(cfg.model.partial_pretrain)
        # Timed apart from the import below: on a GPU the kernel warm-up's start makes this
        # process's CUDA context first (call X: "transformers import" 3.5 s with the warm-up
        # against 2.6 s without, when both were one part).
        timeline.note("run set-up")
        from transformers import AutoTokenizer  # noqa: F401 -- its import, timed apart from the tokenizer's load

        timeline.note("transformers import")
        self.tokenizer = load_tokenizer(cfg.model.partial_pretrain, cfg.model.trust_remote_code)
        apply_chat_template_override(self.tokenizer, cfg.data.chat_template)
        timeline.note("tokenizer")
        # Start-up: imports, config, distributed set-up and the tokenizer, from the launch on.
        now = time.perf_counter()
        self.timeline.add("start-up", now - self.timeline.launch)
        split = timeline.start_up_split(self.timeline.launch, now)
        if split:
            log.info("start-up: %.1f s since launch (%s)", now - self.timeline.launch,
                     ", ".join(f"{k} {v:.1f} s" for k, v in split.items()))
        self.start_up_split = split
        if import_index.waited_s >= 0.05:
            log.info("transformers import: %.1f s of it waited for the side process that indexed transformers "
                     "(first launch with this cache folder: verlite/import_index.py)", import_index.waited_s)
        # On a side thread while the data is read (models/liger.py). Unlike the model read, it may
        # still be importing when the tokenizer's workers fork: a child inherits its module locks
        # held, but the workers import nothing Liger imports (checked on CPU: tokenizing in a
        # worker imported encodings.unicode_escape only).
        liger.start_import(liger_kinds)
        # The weights are read on another side thread while the workers tokenize: nothing the
        # data decides changes that part (models/early_read.py; the memory plan comes after).
        model_read = EarlyRead(lambda: self._read_model(liger_kinds))
        beside = model_read if os.environ.get("VERLITE_EARLY_READ", "1") != "0" else None  # 0: a bench knob
        with self.timeline.phase("data"):
            cache = TokenCache.for_config(cfg.data, self.tokenizer) if not cfg.data.custom_cls.path else None
            if train_ds is not None and beside is not None:
                beside.may_run()
            self.train_ds = train_ds if train_ds is not None else \
                load_dataset(cfg.data.train_files, cfg.data, self.tokenizer, "data.train_files", cache=cache,
                             beside=beside)
            self.val_ds = (load_dataset(cfg.data.val_files, cfg.data, self.tokenizer, "data.val_files", cache=cache,
                                        beside=beside)
                           if cfg.data.val_files else None)
            self.plan = self._build_plan()
        self.total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * self.plan.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.plan.steps_per_epoch)
        for key in ("save_freq", "test_freq"):  # verl's "after_each_epoch": known now, from the plan
            if getattr(cfg.trainer, key) == "after_each_epoch":
                setattr(cfg.trainer, key, self.plan.steps_per_epoch)

        resume_from = self._resume_point()
        started = time.perf_counter()
        # What gives this run's weights their meaning; checked against the checkpoint before
        # any weights are used, and saved with every checkpoint.
        self.settings = run_settings(cfg, self.tokenizer, self.train_ds)
        resume_state = ckpt.load_trainer_state(resume_from) if resume_from is not None else None
        if resume_state is not None:
            check_resume(resume_state, self.settings, cfg, resume_from, self.plan.steps_per_epoch)
        hf_model = prepare_model(model_read.result(), cfg.model)  # the plan's checkpointing, LoRA, ...
        if model_read.beside:
            log.info("model: read beside the data in %.1f s (%.1f s of it waited for after the data)",
                     model_read.seconds, model_read.waited)
        pick_single_sequence_backends(self.device, hf_model.config)  # before anything compiles
        if self.device.type == "cuda":
            if "rms_norm" not in liger_kinds:
                use_fused_rms_norm(hf_model)  # one kernel instead of five a norm (models/fused_norm.py)
            stream_in_compute_dtype(hf_model)  # bf16 between layers, as under FSDP (models/compute_dtype.py)
        if sp > 1:
            ulysses.use_ulysses_attention(hf_model, dist_info.sp_group)
        if resume_from is not None and self._load_contents() & {"model", "hf_model"}:
            ckpt.load_weights_into(hf_model, resume_from, self.is_lora)
        self.model = shard_model(SFTModel(hf_model, cfg.model.fused_loss), cfg.model, dist_info)
        # from_pretrained returns eval mode, where HF skips gradient checkpointing (and dropout).
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim, self.device, offloads(cfg.model),
                                         cfg.model.fsdp_config.optimizer_offload,
                                         buckets=[list(layer.parameters()) for layer in self.model.decoder_layers()])
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.optim)
        self.start_step = 0
        if resume_state is not None:
            self._restore(resume_from, resume_state)
        # Without FSDP on a GPU, bf16 compute comes from autocast instead of FSDP's policy.
        fsdp = uses_fsdp(cfg.model, dist_info.world_size)
        self.autocast = not fsdp and self.device.type == "cuda"
        # Steps replayed as CUDA graphs where they can run (None: eager steps). `graph_stats`
        # keeps the runner for the closing summary after graphs are turned off mid-run.
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.graphs = graph_step.build(cfg, self.model, self.optimizer, self.params, self.device, self.autocast,
                                       pad_id, fsdp, sp, self.packed_layout, dist_info.world_size,
                                       varying_counts=self.plan.token_budget is not None, liger_kinds=liger_kinds)
        self.graph_stats = self.graphs
        micro_batches = len(self.plan.rank_micro_batches(0, dist_info.dp_rank))
        self.compile_choice = maybe_compile(self.model, cfg.model.compile, self.device,
                                            max(0, self.total_steps - self.start_step), micro_batches,
                                            graphs=self.graphs is not None)
        self.compiled = self.compile_choice.enabled
        if self.compiled and self.graphs is not None:  # one max_seqlen for every padded shape
            largest = self.plan.largest_step_tokens(max(1, self.total_steps))
            self.graphs.fix_max_seqlen(min(largest, self.plan.token_budget or largest))
        self.timeline.add("model loading", time.perf_counter() - started)
        capacity = gpu_capacity_gib(cfg, self.device) * GIB if self.device.type == "cuda" else 0.0
        self.saver = async_checkpoint.Checkpointer(
            cfg.trainer.async_save, dist_info.is_main,
            async_checkpoint.checkpoint_buffers(self.model, dist_info.world_size, capacity)
            if cfg.trainer.async_save and 0 < cfg.trainer.save_freq < self.total_steps - self.start_step else None,
            self._on_saved)  # copy buffers only when a periodic (background) save will come
        self.oom_splits = 0  # each OOM halves every micro-batch from then on
        # The final checkpoint, written without fsync, and what is deleted once it is flushed.
        self.final_path: Optional[Path] = None
        self.unflushed: Optional[Path] = None
        self.after_flush: list[Path] = []

    # ---- set-up helpers -------------------------------------------------------------
    def _read_model(self, liger_kinds: tuple[str, ...]):
        """The weights into the HF model on the host (models/load.read_model), with cuBLAS and
        autograd set up on the GPU meanwhile (engine/gpu_warmup.py); no fork crosses it."""
        warming = gpu_warmup.start(self.device)
        try:
            liger.finish_import()  # before transformers imports the model's modules here: one importer at a time
            return read_model(self.cfg.model, master_dtype(self.cfg.model, self.device), liger_kinds)
        finally:
            gpu_warmup.finish(warming)

    def _build_plan(self) -> StepPlan:
        d = self.cfg.data
        from verlite.engine.memory import resolve_auto_memory  # auto micro-batching, checkpointing, fused step

        self.ckpt_auto = resolve_auto_memory(self.cfg, self.device, self.dist.world_size, self.train_ds.lengths,
                                             padding_free=self.packed_layout)
        world = self.dist.dp_size  # an SP group shares its samples: it counts as one data-parallel rank
        mb = d.micro_batch_size_per_gpu
        global_batch = d.train_batch_size or mb * world
        budget = d.max_token_len_per_gpu
        if budget is not None:  # per GPU, as in verl: an SP group's micro-batch holds sp times that
            budget *= self.dist.sp_size
        if budget is None and d.packing:
            budget = mb * d.max_length  # packing with no budget: as many tokens as a padded micro-batch holds
        if budget is None and mb * world > global_batch:
            raise VerliteError(f"data.micro_batch_size_per_gpu={mb} x {world} process(es) is larger than "
                               f"data.train_batch_size={global_batch}; lower the micro batch or raise train_batch_size")
        plan = StepPlan(self.train_ds.lengths, global_batch, world, self.cfg.trainer.seed,
                        mb if budget is None else None, budget, packed=d.packing)
        log.info("data: %d samples, %d steps per epoch (train_batch_size=%d, %s per GPU, %d process(es))",
                 len(self.train_ds), plan.steps_per_epoch, global_batch,
                 f"micro batch {mb}" if budget is None else f"{budget} tokens per micro-batch", world)
        return plan

    def _resume_point(self) -> Optional[Path]:
        t = self.cfg.trainer
        if t.resume_mode == "disable":
            return None
        if t.resume_mode == "resume_path":
            path = Path(t.resume_from_path).expanduser()
            if not (path / ckpt.STATE).is_file():
                raise VerliteError(f"trainer.resume_from_path {t.resume_from_path} is not a complete checkpoint "
                                   f"(no {ckpt.STATE}); point it at a global_step_N folder")
            return path
        return ckpt.latest_checkpoint(self.run_dir)

    def _restore(self, path: Path, state: dict) -> None:
        """The step always; the rest as verl's trainer.checkpoint.load_contents lists it."""
        contents = self._load_contents()
        if "optimizer" in contents:
            ckpt.restore_optimizer(self.model, self.optimizer, state["optimizer"])
        if "extra" in contents:  # verl's "extra": the LR schedule and the RNG states
            self.scheduler.load_state_dict(state["scheduler"])
            ckpt.set_rng_state(state["rng"])
        else:
            self.scheduler.last_epoch = int(state["global_step"]) - 1
            self.scheduler.step()  # the schedule continues from the checkpoint's step
        self.start_step = int(state["global_step"])
        skipped = sorted({"model", "optimizer", "extra"} - contents)
        log.info("Resumed from %s at step %d/%d%s", path, self.start_step, self.total_steps,
                 f" (not loaded, per trainer.checkpoint.load_contents: {', '.join(skipped)})" if skipped else "")

    def _load_contents(self) -> set[str]:
        ck = self.cfg.trainer.checkpoint
        return set(ck.load_contents if ck.load_contents is not None else ck.save_contents)

    # ---- the loop ---------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        metrics = MetricsLogger(str(self.run_dir), loggers(cfg), self.total_steps, self.start_step,
                                enabled=self.dist.is_main, project=t.project_name, experiment=t.experiment_name,
                                config=dataclasses.asdict(cfg))
        speed = Throughput()
        last_saved = self.start_step if self.start_step else None
        save_late = False  # a periodic checkpoint put off until the previous write ends
        health = StepHealth(self.device, fused_step=getattr(self.optimizer, "fused_backward", None) is not None)
        # Reading a step's numbers waits for the GPU, so it happens only at log steps and
        # every few steps for the NaN guard and stop requests; other steps queue up freely.
        check_every = max(1, min(t.log_interval, t.max_bad_steps))
        if self.start_step >= self.total_steps:
            log.info("nothing to do: the checkpoint is already at step %d of %d", self.start_step, self.total_steps)
        log.info("Training %d steps (%d epoch(s)) from step %d on %s", self.total_steps, self.total_epochs,
                 self.start_step, self.device)
        kernel_warmup.finish(self.kernel_warmup)  # waited for or stopped: never beside training
        batches = prefetch(self._micro_batches, range(self.start_step, self.total_steps))
        self.first_steps_s: list[float] = []  # host time of the first steps: compiling shows there
        tl = self.timeline
        loop_start = time.perf_counter()
        with StopRequest() as stop:
            try:
                for step, micro_batches in zip(range(self.start_step, self.total_steps), batches):
                    global_step = step + 1
                    step_start, captured = time.perf_counter(), self._capture_s()
                    result = self._step(micro_batches)
                    if len(self.first_steps_s) < 10:  # capturing graphs is not compiling
                        self.first_steps_s.append(time.perf_counter() - step_start - (self._capture_s() - captured))
                    health.add(result)
                    speed.add(int(self.train_ds.lengths[self.plan.step_indices(step)].sum()))
                    metrics.advance()
                    log_now = global_step % t.log_interval == 0 or global_step in (1, self.total_steps)
                    check_now = log_now or global_step % check_every == 0
                    if check_now:
                        health.check(global_step, t.max_bad_steps, self.run_dir, settle=self.saver.close)
                    if log_now:
                        loss, grad_norm = result.loss.item(), result.grad_norm.item()
                        m = {"train/loss": loss, "lr": self.scheduler.get_last_lr()[0],
                             "grad_norm": grad_norm, "tokens/s": speed.rate_since_mark(),
                             "gpu_mem": gpu_mem_gb(), "skipped_steps": health.skipped,
                             "epoch": step // self.plan.steps_per_epoch}
                        log.info(format_line(m["epoch"], self.total_epochs, global_step, self.total_steps, m))
                        metrics.write(global_step, m)
                    if self.val_ds is not None and t.test_freq > 0 and global_step % t.test_freq == 0:
                        with tl.phase("validation"):
                            self._validate_or_free_graphs(global_step, metrics)
                    due = t.save_freq > 0 and global_step % t.save_freq == 0 and global_step < self.total_steps
                    if (due or save_late) and global_step < self.total_steps:
                        # On a GPU, a checkpoint due while the previous one is still being
                        # written waits for that write to end; training does not wait for the disk.
                        save_late = self.device.type in async_checkpoint.DEFER_WHEN_BUSY_ON and self.saver.busy()
                        if save_late:
                            log.debug("step %d: previous checkpoint still being written; saving after it", global_step)
                        else:
                            with tl.phase("checkpoint pauses"):
                                self._save(global_step)
                            last_saved = global_step
                    if (check_now or self.dist.world_size == 1) and self._stop_requested(stop):
                        path = self._save(global_step, wait=True) if last_saved != global_step else self.run_dir
                        raise TrainingInterrupted(
                            f"stopped at step {global_step}/{self.total_steps}; checkpoint: {path}. Run the same "
                            "command again to resume (trainer.resume_mode=auto)", stop.signum)
                loop_s = time.perf_counter() - loop_start
                final_step = max(self.start_step, self.total_steps)
                validated = t.test_freq > 0 and final_step % t.test_freq == 0
                if self.val_ds is not None and self.total_steps > self.start_step and not validated:
                    with tl.phase("validation"):
                        self._validate_or_free_graphs(final_step, metrics)
                with tl.phase("final checkpoint"):  # its copy, then the wait for every write still going
                    saving = time.perf_counter()
                    final = self._save(final_step, final=True) if last_saved != final_step else \
                        self.run_dir / f"global_step_{final_step}"
                    closing = time.perf_counter()
                    self.saver.close()
                    released = time.perf_counter()
                    # Its fsync, and old checkpoints still being deleted: a detached process ends them.
                    ckpt.hand_off(self.unflushed, self.after_flush)
                    if self.dist.is_main:  # where the phase's seconds went
                        log.info("final checkpoint: saved in %.2f s, checkpoint copy buffers released in %.2f s, then %.2f s "
                                 "handing its fsync and old checkpoints' deletion over", closing - saving,
                                 released - closing, time.perf_counter() - released)
            except torch.OutOfMemoryError:
                raise VerliteError(self._oom_advice()) from None
            finally:
                self.saver.close()
                metrics.close()
        compile_s = measured_cost(self.compile_choice, self.first_steps_s, record=self.dist.is_main)
        tl.add("compiling", compile_s)
        tl.add("capturing graphs", self._capture_s())
        if self.graph_stats is not None:
            log.info("cuda graphs: %s%s", self.graph_stats.summary(), "" if self.graphs is not None else " (then off)")
        tl.add("training", loop_s - compile_s - self._capture_s() - tl.parts.get("checkpoint pauses", 0.0)
               - tl.parts.get("validation", 0.0))
        health.check(self.total_steps, t.max_bad_steps, self.run_dir)
        return self._summary(speed, health.last_good_loss(), final, health.skipped)

    def _micro_batches(self, step: int) -> StepBatches:
        pin = self.device.type == "cuda"
        splits = self.oom_splits
        out = []
        for indices, placeholder in self.plan.rank_micro_batches(step, self.dist.dp_rank):
            for part in split_evenly(indices, 2 ** splits):
                mb = collate(self.train_ds, part, self.packed_layout, self.tokenizer.pad_token_id, placeholder)
                if self.compiled and mb.cu_seqlens is not None:  # no recompile for a new longest sample
                    fixed = steady_max_seqlen(mb.max_seqlen, self.cfg.data.max_length, mb.num_samples)
                    mb = dataclasses.replace(mb, max_seqlen=fixed)
                mb = ulysses.shard_micro_batch(mb, self.dist)
                graphs = self.graphs  # read once: the training thread may turn graphs off meanwhile
                if graphs is not None and mb.cu_seqlens is not None:
                    mb = graphs.pad(mb)  # one of a few fixed shapes
                out.append(mb.pin_memory() if pin else mb)
        return StepBatches(step, splits, out)

    def _step(self, batches: StepBatches) -> StepResult:
        """One optimizer step. On one GPU, running out of memory halves the micro-batches and
        retries the step (gradient accumulation keeps the effective batch) instead of dying."""
        while True:
            if self.graphs is not None:
                try:
                    return self.graphs.step(batches.micro_batches, self.scheduler)
                except graph_step.GraphsOff as e:
                    reason, oom = str(e), isinstance(e.__cause__, torch.OutOfMemoryError)
                except torch.OutOfMemoryError:
                    reason, oom = "out of GPU memory with graphs on (they keep the gradients between steps)", True
                # Outside the except block: the failed attempt's frames (and tensors) are gone.
                if oom and self.saver.release_device_copies():
                    # The checkpoint copies were in the way: the graphs start over (each shape
                    # eager once, then captured), the step runs again; no weight has moved.
                    self.graphs.release()
                    self.optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    continue
                self._graphs_off(reason)
                batches = self._micro_batches(batches.step)  # without the graphs' padding
                continue
            try:
                return train_step(self.model, self.optimizer, self.scheduler, batches.micro_batches, self.device,
                                  self.params, self.cfg.optim.clip_grad, self.autocast, self.dist.world_size)
            except torch.OutOfMemoryError:
                if self.dist.world_size == 1 and self.saver.release_device_copies():
                    self.optimizer.zero_grad(set_to_none=True)  # a half-done backward left partial gradients
                    torch.cuda.empty_cache()
                    continue  # the checkpoint copies kept on the GPU were in the way: host copies from now on
                # With several ranks the others already wait in a collective: no retry is possible.
                single = all(mb.num_samples == 1 for mb in batches.micro_batches)
                if self.dist.world_size == 1 and self.ckpt_auto and oom_recompute(self.model, self.optimizer, self.cfg):
                    continue  # auto checkpointing: recompute every layer before splitting anything
                if self.dist.world_size > 1 or (single and batches.splits == self.oom_splits):
                    raise
                self.optimizer.zero_grad(set_to_none=True)  # a half-done backward left partial gradients
                torch.cuda.empty_cache()
                if batches.splits == self.oom_splits:  # batches prefetched before an earlier split are only rebuilt
                    self.oom_splits += 1
                    log.warning("out of GPU memory: micro-batches halved (1/%d of the planned size) and the step "
                                "retried; set a lower data.micro_batch_size_per_gpu or max_token_len_per_gpu "
                                "to avoid the retry", 2 ** self.oom_splits)
                batches = self._micro_batches(batches.step)

    def _graphs_off(self, reason: str, rerun: str = "the step runs again without them") -> None:
        """CUDA graphs off for the rest of the run, their memory freed; a step that failed
        runs again eagerly (no weight has moved: graph_step.py says why)."""
        log.warning("cuda graphs: off from here on (%s); %s", reason, rerun)
        self.graphs.release()
        self.graphs = None
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()

    def _capture_s(self) -> float:
        return self.graph_stats.capture_s if self.graph_stats is not None else 0.0

    def _stop_requested(self, stop: StopRequest) -> bool:
        if self.dist.world_size == 1:
            return stop.signum is not None
        flag = torch.tensor([1.0 if stop.signum else 0.0], device=self.device)
        all_reduce_sum(flag)
        if flag.item() > 0 and stop.signum is None:
            stop.signum = 15  # another rank was told to stop (torchrun forwards SIGTERM)
        return flag.item() > 0

    def _validate_or_free_graphs(self, global_step: int, metrics: MetricsLogger) -> float:
        """Validation; out of memory, it frees the checkpoint copies kept on the GPU, then the CUDA
        graphs (their pool and the gradients they keep), and validates again instead of ending
        a run that fits without them."""
        for attempt in range(2):
            try:
                return self._validate(global_step, metrics)
            except torch.OutOfMemoryError:
                if attempt == 0 and self.saver.release_device_copies():
                    continue  # outside the except block: the failed attempt's tensors are freed first
                if self.graphs is None:
                    raise
            break
        self._graphs_off("out of GPU memory in validation", "validating again without them")
        return self._validate(global_step, metrics)

    @torch.no_grad()
    def _validate(self, global_step: int, metrics: MetricsLogger) -> float:
        self.model.eval()
        ds: SFTDataset = self.val_ds
        world, rank = self.dist.dp_size, self.dist.dp_rank
        mb = self.cfg.data.micro_batch_size_per_gpu if isinstance(self.cfg.data.micro_batch_size_per_gpu, int) else 1
        mine = list(range(rank, len(ds), world))
        chunks = [mine[i:i + mb] for i in range(0, len(mine), mb)]
        rounds = math.ceil(math.ceil(len(ds) / world) / mb)
        totals = torch.zeros(2, device=self.device)
        for i in range(rounds):  # every rank runs the same number of forwards (FSDP collectives)
            indices, placeholder = (chunks[i], False) if i < len(chunks) else ([0], True)
            batch = collate(ds, indices, self.cfg.data.packing or self.dist.sp_size > 1, self.tokenizer.pad_token_id,
                            placeholder)
            batch = ulysses.shard_micro_batch(batch, self.dist)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.model(batch.to(self.device))
            totals += torch.stack([loss.float().reshape(()), torch.tensor(float(batch.num_loss_tokens),
                                                                          device=self.device)])
        all_reduce_sum(totals)
        val_loss = (totals[0] / totals[1].clamp(min=1)).item()
        reshard_all(self.model)
        self.model.train()
        log.info("Step %d/%d | val/loss=%.3f", global_step, self.total_steps, val_loss)
        metrics.write(global_step, {"val/loss": val_loss})
        return val_loss

    def _save(self, global_step: int, final: bool = False, wait: bool = False) -> Path:
        """Checkpoint `global_step`. The write goes on in the background unless this is the
        final save or `wait` is set (the process is about to exit). The final save is written
        without fsync (async_checkpoint.Snapshot.durable): the run hands its flush to a detached
        process at the end. One before an exit on a stop request (a preempted job, Ctrl-C)
        stays durable: the machine may be going down; so does every save with
        trainer.async_save=false (saves in line, as the user asked)."""
        extra = {"global_step": global_step, "config": dataclasses.asdict(self.cfg), "settings": self.settings,
                 "data": {"samples": len(self.train_ds), "steps_per_epoch": self.plan.steps_per_epoch}}
        keep = self.cfg.trainer.max_ckpt_to_keep
        # The last save's surplus checkpoints go before it is written: all but keep-1 (the one
        # being written is the keep-th), so at least one complete checkpoint stays throughout
        # (never with keep=1, which waits for the new one to land). Before an exit on a stop
        # request they are deleted meanwhile; before the final save, set aside and left to the
        # detached process of the run's end, so that no deletion holds up this process's exit.
        early = (final or wait) and keep and keep > 1 and self.dist.is_main

        def prune_early() -> None:
            surplus = ckpt.prune_checkpoints(self.run_dir, keep - 1, below=global_step, defer=final)
            if final:
                self.after_flush.extend(map(ckpt.set_aside, surplus))

        before_write = prune_early if early else None
        if final and self.cfg.trainer.async_save:
            self.final_path = self.run_dir / f"global_step_{global_step}"
        if not self.saver.save(self.run_dir, global_step, self.model, self.tokenizer, self.optimizer, self.scheduler,
                               extra, self.is_lora, in_line=final or wait, before_write=before_write,
                               durable=not (final and self.cfg.trainer.async_save)):  # False: NaN/inf weights (logged)
            return ckpt.latest_checkpoint(self.run_dir) or self.run_dir
        path = self.run_dir / f"global_step_{global_step}"
        if final or wait:
            if self.saver.wait() is None:
                if final:
                    raise VerliteError(f"the final checkpoint could not be written under {self.run_dir}; "
                                       "free disk space or fix permissions, then run again to resume")
                return ckpt.latest_checkpoint(self.run_dir) or self.run_dir
        return path

    def _on_saved(self, path: Path, paused_s: float, write_s: float) -> None:
        """Rank 0, once a checkpoint is in place (on the writer thread when saving in the background)."""
        how = "in the background" if self.cfg.trainer.async_save else "in line"
        log.info("Checkpoint saved to %s (training paused %.2f s; written in %.1f s %s)", path, paused_s, write_s, how)
        keep = self.cfg.trainer.max_ckpt_to_keep
        if path == self.final_path:  # written without fsync: flushed by ckpt.hand_off at the end
            self.unflushed = path
            if keep == 1:  # the checkpoint before stays until that flush is done
                self.after_flush.extend(ckpt.prune_checkpoints(self.run_dir, keep, defer=True))
                return
        ckpt.prune_checkpoints(self.run_dir, keep)

    def _oom_advice(self) -> str:
        d, m = self.cfg.data, self.cfg.model
        peak = gpu_mem_gb() or 0.0
        return (f"out of GPU memory (peak {peak:.1f} GB) with micro_batch_size_per_gpu={d.micro_batch_size_per_gpu}, "
                f"max_length={d.max_length}, enable_gradient_checkpointing={m.enable_gradient_checkpointing}, "
                f"lora_rank={m.lora_rank}, cpu_offload={m.fsdp_config.cpu_offload}; try, in this order: "
                f"data.micro_batch_size_per_gpu={max(1, (d.micro_batch_size_per_gpu if isinstance(d.micro_batch_size_per_gpu, int) else 2) // 2)}"
                f" (train_batch_size keeps the effective batch), model.enable_gradient_checkpointing=true, "
                f"model.enable_activation_offload=true (long samples), a lower data.max_length, "
                f"model.fsdp_config.cpu_offload=true, or `verlite plan` to size it")

    # The closing line's parts, in this order (timeline.py says what each holds).
    PARTS = ("start-up", "data", "model loading", "compiling", "capturing graphs", "training", "checkpoint pauses",
             "validation", "final checkpoint", "other")

    def _summary(self, speed: Throughput, last_loss: float, final: Path, skipped: int) -> dict:
        """The closing line: the whole time since launch, split into parts that add up to it."""
        saves = self.saver.times
        wall, parts = self.timeline.closed()
        parts = {k: parts.get(k, 0.0) for k in self.PARTS}
        train_s = max(parts["training"], 1e-9)
        summary = {"steps": self.total_steps, "start_step": self.start_step, "tokens": speed.tokens,
                   "wall_time_s": round(speed.elapsed, 2), "tokens_per_s": round(speed.tokens / max(speed.elapsed, 1e-9), 1),
                   "peak_gpu_mem_gb": gpu_mem_gb(), "final_loss": last_loss, "skipped_steps": skipped,
                   "checkpoint": str(final), "train_s": parts["training"],
                   "train_tokens_per_s": round(speed.tokens / train_s, 1), "compile_s": parts["compiling"], "graph_capture_s": parts["capturing graphs"],
                   "data_s": parts["data"], "data_cache": self.train_ds.cache, "model_load_s": parts["model loading"],
                   "saves": saves.saves, "save_stall_s": parts["checkpoint pauses"],
                   "final_save_s": parts["final checkpoint"], "save_write_s": round(saves.write_s, 2),
                   "since_launch_s": wall, "time_parts": parts, "start_up_parts": self.start_up_split}
        mem = f", peak gpu_mem {summary['peak_gpu_mem_gb']:.1f}GB" if summary["peak_gpu_mem_gb"] is not None else ""
        shown = {"data": f"data {parts['data']:.1f} s ({self.train_ds.cache or 'given'})",
                 "compiling": f"compiling {parts['compiling']:.1f} s (measured)" if self.compiled else "compiling off",
                 "training": f"training {parts['training']:.1f} s ({summary['train_tokens_per_s']:.0f} tokens/s)",
                 "checkpoint pauses": f"{saves.saves} checkpoint(s): training paused {parts['checkpoint pauses']:.1f} s"}
        text = ", ".join(shown.get(k, f"{k} {v:.1f} s") for k, v in parts.items() if v or k in shown)
        where = "in the background" if self.cfg.trainer.async_save else "in line"
        log.info("Done: %d steps, %s tokens in %.1f s (%.0f tokens/s)%s, final train/loss=%.3f | %.1f s since launch: "
                 "%s; checkpoints written in %.1f s %s",
                 self.total_steps - self.start_step, f"{speed.tokens:,}", speed.elapsed, summary["tokens_per_s"],
                 mem, last_loss, wall, text, saves.write_s, where)
        log.info("Final checkpoint: %s", final)
        return summary


if __name__ == "__main__":  # verl >= 0.8's `python -m verl.trainer.sft_trainer` (sft_trainer_engine.yaml)
    import sys

    from verlite.verl_cli import main

    main(sys.argv[1:], "verl_engine")
