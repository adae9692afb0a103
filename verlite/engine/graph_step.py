"""Training steps replayed as CUDA graphs (model.cuda_graphs).

Why: a step of short samples leaves the GPU waiting on the host. On the H200 a GSM8K-sized
step (0.5B model, 32 samples of ~205 tokens, ~7k tokens) launched ~1,800 kernels and took
127 ms compiled with the GPU busy for 52 ms, 269 ms eager with 84 ms busy (bench/RESULTS.md,
"Where a GSM8K-sized step goes"): launches cost 7-10 us each there. A captured graph replays
all of them with one launch.

How, decided here once:
- Shapes. A graph replays fixed shapes, and every step has another token count. Each packed
  micro-batch is padded (data/batching.py pad_packed) to a token count on a grid of
  TOKENS_PER_OCTAVE sizes per power of two, its loss rows to LOSS_ROWS_PER_OCTAVE and its
  sample count to SAMPLES_PER_OCTAVE (token-budget micro-batches hold varying counts). The
  padding is samples of their own whose loss rows weigh 0, so loss and gradients are those
  of the unpadded micro-batch. Eight sizes per octave keep the padding at 1/8 at most (~5 %
  on GSM8K, where the 233 steps of one epoch fall on about 9 shapes); loss rows only feed
  the vocabulary projection, so four per octave cost little more and halve the shapes.
- Graphs. One per micro-batch shape (forward and backward, accumulating into gradient
  buffers that live as long as the run) and one for the rest of the step (clip, NaN guard,
  AdamW, zeroing): a step of any number of micro-batches replays the same graphs.
- Warm-up. The first shapes run eagerly the first time they come (the warm-up CUDA asks for
  before a capture: lazy initialisation, Triton and compiled kernels, the optimizer's state)
  and are captured the second time. Once a shape is captured, a new shape whose sizes fall in
  its kernel class (`kernel_class`) is captured the first time it comes: Triton specialises a
  kernel's integer arguments only on being 1 and on divisibility by 16, so such a shape needs
  no new kernel, and the lazy set-up is done. That saves an eager run per shape (~0.2 s of
  host time for the 0.5B GSM8K step; about 9 shapes an epoch). Compiled layers keep the
  eager first run (a new shape may recompile them), and so do models with Triton kernels
  whose integers the shape does not give (Liger's RMSNorm backward takes the rows per SM:
  AT_ONCE_LIGER_KINDS lists the Liger kernels the class covers). All of it runs on one side
  stream, as captures must.
- Host values. What changes per step enters through device tensors filled before the
  replays: the loss tokens behind the mean, and the learning rate (torch's fused AdamW reads a
  tensor lr when captured; the param groups keep floats for the schedule and checkpoints).
- Memory. All graphs share one pool: nothing a graph allocates is read after another graph
  replays (the step's results are copied into tensors made outside the pool). The gradients
  stay allocated between steps (the eager step frees them): a step's forward holds them too.
- Exactness. The update is the eager step's: same clip, same skip of a NaN/inf step (fused
  AdamW's found_inf on the device), same mean over loss tokens. Numbers differ only by the
  kernels' own rounding at another length.

What it needs: one GPU without FSDP, packed micro-batches (the GPU default), torch's fused
AdamW on the GPU, the plain optimizer step (not optim.fused_backward), no offload, no Liger
loss, no NF4 base (`why_not` says which is missing); `auto` also leaves them off where layers
are recomputed or the MLP is tiled (`why_not_auto`). A capture that fails, or running out of
memory, turns them off for the rest of the run (logged once) and the step runs again eagerly
from freshly built micro-batches: a capture runs no kernel, and no weight moves before the
step's last graph. Any other error ends the run, as it would eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import fields

import torch

from verlite.data.batching import MicroBatch, bucket, bucket_step, pad_packed
# A packed row of many short samples gets data.max_length as max_seqlen up to this bound, as
# in compiled runs (the varlen kernel only needs an upper bound); longer bounds round the
# row's own longest sample up instead.
from verlite.engine.compile import FIXED_MAX_SEQLEN_UP_TO
from verlite.engine.compile import parse_setting as parse_true_false_auto
from verlite.engine.step import StepResult, clip_grad_norm, no_retry_after_oom
from verlite.errors import VerliteError

log = logging.getLogger("verlite.engine")

TOKENS_PER_OCTAVE = 8
# Liger kernels (models/liger.py) whose integer arguments are sizes of the shape key or the
# model's constants, so that `kernel_class` covers them: RoPE's sequence length, SwiGLU's
# strides. RMSNorm's backward also takes ceil(rows / SMs), which the class does not see.
AT_ONCE_LIGER_KINDS = ("rope", "swiglu")
LOSS_ROWS_PER_OCTAVE = 4
SAMPLES_PER_OCTAVE = 4


class GraphsOff(Exception):
    """The graphs cannot run this step (a capture failed): the caller reruns it eagerly."""


def parse_setting(setting) -> bool | str:
    """model.cuda_graphs as True, False or "auto" (engine/compile.py's reading of such keys)."""
    return parse_true_false_auto(setting, "model.cuda_graphs")


def _refusal(reason: str) -> VerliteError:
    return VerliteError(f"model.cuda_graphs=true cannot run here: {reason}; set model.cuda_graphs=auto or false")


def check_before_loading(cfg, device: torch.device) -> None:
    """A bad model.cuda_graphs value, or `true` off a GPU, fails before anything is loaded
    (what else they need is known only once the model and optimizer exist: `build`)."""
    if parse_setting(cfg.model.cuda_graphs) is True and device.type != "cuda":
        raise _refusal(_no_gpu(device))


def _no_gpu(device: torch.device) -> str:
    return f"they need a GPU (this run: {device.type})"


def why_not(cfg, device: torch.device, fsdp: bool, sp_size: int, packed: bool, optimizer,
            world_size: int = 1) -> str | None:
    """What keeps this run from CUDA graphs, or None when they can run."""
    m = cfg.model
    checks = [
        (device.type != "cuda", _no_gpu(device)),
        # The graphed step has none of the eager step's all-reduces (loss, token count), and a
        # rank that fell back alone would wait in a collective the others never join.
        (world_size > 1, f"the run has {world_size} processes (graphs run on one)"),
        (fsdp, "the model is sharded with FSDP (several processes or offload)"),
        (sp_size > 1, "sequence parallelism splits the rows"),
        (not packed, "micro-batches are padded rows, not packed ones"),
        (getattr(optimizer, "fused_backward", None) is not None, "optim.fused_backward updates inside backward"),
        (not optimizer.defaults.get("fused"), f"optimizer {cfg.optim.optimizer_impl}.{cfg.optim.optimizer} is not "
                                              "torch's fused AdamW on the GPU"),
        (m.enable_activation_offload, "model.enable_activation_offload copies to host memory"),
        (m.quantization is not None, "an NF4 base is not measured with graphs yet"),
    ]
    return next((why for bad, why in checks if bad), None)


def why_not_auto(cfg) -> str | None:
    """What keeps `auto` from CUDA graphs where they could run: they keep the gradients and a
    memory pool between steps, which a run already short of memory should not pay, and a
    long-sample step is not bound by launches anyway."""
    m = cfg.model
    checks = [
        (m.enable_gradient_checkpointing is True, "layers are recomputed to save memory, and graphs keep more"),
        (m.tiled_mlp, "model.tiled_mlp is for long samples, whose steps are not bound by kernel launches"),
    ]
    return next((why for bad, why in checks if bad), None)


def build(cfg, model, optimizer, params, device: torch.device, autocast: bool, pad_id: int, fsdp: bool,
          sp_size: int, packed: bool, world_size: int = 1, varying_counts: bool = False,
          liger_kinds: tuple[str, ...] = ()) -> "GraphedSteps | None":
    """GraphedSteps when model.cuda_graphs allows it here, else None; the choice is logged.
    model.cuda_graphs=true on a run that cannot use them is an error (it names what is missing).
    `liger_kinds`: the Liger kernels patched into the model (first-time captures need them
    covered by the kernel class)."""
    setting = parse_setting(cfg.model.cuda_graphs)
    if setting is False:
        log.info("cuda graphs: off (model.cuda_graphs=false)")
        return None
    reason = why_not(cfg, device, fsdp, sp_size, packed, optimizer, world_size)
    if reason is None and setting == "auto":
        reason = why_not_auto(cfg)
    if reason is not None:
        if setting is True:
            raise _refusal(reason)
        log.info("cuda graphs: off (%s)", reason)
        return None
    at_once = set(liger_kinds) <= set(AT_ONCE_LIGER_KINDS)
    log.info("cuda graphs: on (model.cuda_graphs=%s): steps padded to %d token sizes per octave, each shape "
             "captured the second time it comes%s", cfg.model.cuda_graphs, TOKENS_PER_OCTAVE,
             " (the first time once a shape of its kernel class is captured)" if at_once else "")
    return GraphedSteps(model, optimizer, params, cfg.optim.clip_grad, device, autocast, pad_id, cfg.data.max_length,
                        varying_counts, at_once)


def shape_key(mb: MicroBatch) -> tuple[int, int, int, int]:
    """A padded micro-batch's shape: one graph per key."""
    return (mb.input_ids.shape[1], len(mb.loss_index), len(mb.cu_seqlens), mb.max_seqlen)


def kernel_class(key: tuple[int, ...]) -> tuple[tuple[bool, bool], ...]:
    """What Triton sees of a shape's sizes when it picks a kernel variant: for each integer,
    whether it is 1 and whether 16 divides it."""
    return tuple((n == 1, n % 16 == 0) for n in key)


class _Shape:
    """One micro-batch shape: its input buffers on the GPU and, from its second run, its graph."""

    def __init__(self, inputs: MicroBatch):
        self.inputs = inputs
        self.graph: torch.cuda.CUDAGraph | None = None


class GraphedSteps:
    compiled_max_seqlen: int | None = None  # set by fix_max_seqlen when the layers are compiled

    def __init__(self, model, optimizer, params, clip_grad: float, device: torch.device, autocast: bool,
                 pad_id: int, max_length: int, varying_counts: bool = False, capture_at_once: bool = True):
        self.model, self.optimizer, self.params, self.clip = model, optimizer, params, clip_grad
        self.device, self.pad_id, self.max_length = device, pad_id, max_length
        self.varying_counts = varying_counts  # micro-batches by token budget: their sample counts vary
        self.autocast = autocast
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.shapes: dict[tuple, _Shape] = {}
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        self.grads: list[torch.Tensor] | None = None  # the gradient buffers the graphs accumulate into
        self.captures, self.capture_s, self.replays = 0, 0.0, 0
        self.warm_classes: set[tuple] = set()  # kernel classes of the shapes captured so far
        self.captured_at_once = 0  # shapes captured the first time they came (no eager run)
        self.capture_at_once = capture_at_once  # False: every shape runs eagerly the first time
        with torch.cuda.stream(self.stream):  # made outside any graph's pool
            self.scale = torch.zeros((), device=device)  # 1 / the step's loss tokens
            self.count = torch.zeros((), device=device)
            self.loss_sum = torch.zeros((), device=device)
            self.out = torch.zeros(3, device=device)  # mean loss, grad norm, skipped
            self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]

    def fix_max_seqlen(self, largest_tokens: int) -> None:
        """Compiled layers specialise on max_seqlen (a Python int): a new value recompiles every
        layer (~10 s for the 0.5B LoRA bench step, inside a timed step). So when compiled, every
        shape of the run gets one bound: the largest pad() can need for micro-batches of up to
        `largest_tokens` real tokens (two grid sizes up, as pad's loop may go). The varlen kernel
        pays for a larger bound only in blocks that exit at once."""
        top = bucket(bucket(largest_tokens + 1, TOKENS_PER_OCTAVE), TOKENS_PER_OCTAVE)
        longest = self.max_length if self.max_length <= FIXED_MAX_SEQLEN_UP_TO else bucket(self.max_length, 4)
        self.compiled_max_seqlen = max(longest, 2 * bucket_step(top, TOKENS_PER_OCTAVE), top - largest_tokens + 1)

    # ---- on the prefetch thread ------------------------------------------------------------
    def pad(self, mb: MicroBatch) -> MicroBatch:
        """`mb` grown to its shape's fixed size (a packed micro-batch, on the host)."""
        real, samples = mb.input_ids.shape[1], mb.num_samples
        # The sample count too where it changes from one micro-batch to the next (token-budget
        # micro-batches: data.max_token_len_per_gpu, micro batch `auto`); a fixed micro batch
        # size keeps its count and gets one padding sample.
        segments = bucket(samples, SAMPLES_PER_OCTAVE) if self.varying_counts else samples + 1
        tokens = bucket(real, TOKENS_PER_OCTAVE)
        while tokens - real < segments - samples:  # each padding sample needs a token
            tokens = bucket(tokens, TOKENS_PER_OCTAVE)
        rows = bucket(len(mb.loss_index), LOSS_ROWS_PER_OCTAVE)
        longest = self.max_length if self.max_length <= FIXED_MAX_SEQLEN_UP_TO else bucket(mb.max_seqlen, 4)
        # The last padding sample can be longer than any real one. Bounded by the grid's spacing
        # (twice where the padding samples may have needed one more size up), not by its own
        # length, max_seqlen stays one value per shape; the varlen kernel pays for a larger
        # bound in blocks per sample, so a fixed count keeps the single spacing.
        span = bucket_step(tokens, TOKENS_PER_OCTAVE) * (2 if self.varying_counts else 1)
        last = tokens - real - (segments - samples) + 1
        max_seqlen = max(longest, mb.max_seqlen, span, last, self.compiled_max_seqlen or 0)
        return pad_packed(mb, tokens, rows, self.pad_id, max_seqlen, segments)

    # ---- one step ----------------------------------------------------------------------------
    def step(self, micro_batches: list[MicroBatch], scheduler) -> StepResult:
        """The optimizer step over `micro_batches` (each from `pad`), then the schedule's."""
        local = sum(mb.num_loss_tokens for mb in micro_batches)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            # Kernel arguments, not copies: nothing here waits for the GPU.
            self.count.fill_(float(local))
            self.scale.fill_(1.0 / max(local, 1))
            for lr, group in zip(self.lrs, self.optimizer.param_groups):
                lr.fill_(float(group["lr"]))
            for mb in micro_batches:
                self._forward_backward(mb)
            if self.grads is None:
                self._keep_gradients()
            if self.step_graph is not None:
                self.step_graph.replay()
                self.replays += 1
            elif self.steps >= 1:
                self.step_graph = self._capture(self._update, optimizer_step=True)
                self.step_graph.replay()
            else:
                with no_retry_after_oom("the optimizer step"):
                    self._update()
            self.steps += 1
            with no_retry_after_oom("copying the step's results"):  # the weights have moved: no rerun
                out = self.out.clone()
        caller.wait_stream(self.stream)
        scheduler.step()
        return StepResult(out[0], out[1], out[2])

    def _forward_backward(self, mb: MicroBatch) -> None:
        key = shape_key(mb)
        shape = self.shapes.get(key)
        first_time = shape is None
        if first_time:  # into new input buffers; eager unless its kernels are warm
            shape = self.shapes[key] = _Shape(mb.to(self.device))
            if self.grads is None or not self.capture_at_once or self.compiled_max_seqlen is not None \
                    or kernel_class(key) not in self.warm_classes:
                self._accumulate(shape.inputs)
                return
        else:
            for f in fields(mb):
                value = getattr(mb, f.name)
                if isinstance(value, torch.Tensor):
                    getattr(shape.inputs, f.name).copy_(value, non_blocking=True)
            if shape.graph is None and self.grads is None:
                # Still the first step: which weights get a gradient is not checked yet, and a
                # weight whose gradient first appears inside a capture would own pool memory.
                self._accumulate(shape.inputs)
                return
        if shape.graph is None:
            shape.graph = self._capture(lambda: self._accumulate(shape.inputs))
            self.warm_classes.add(kernel_class(key))
            self.captured_at_once += first_time
        shape.graph.replay()
        self.replays += 1

    def _accumulate(self, inputs: MicroBatch) -> None:
        """Forward and backward of one micro-batch: gradients add up, as does the loss sum."""
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with amp:
            loss = self.model(inputs)
        (loss * self.scale).backward()
        self.loss_sum += loss.detach().reshape(())

    def _keep_gradients(self) -> None:
        """After the first backward: its gradients are the buffers every later step adds into."""
        missing = [p for p in self.params if p.grad is None]
        if missing:
            raise GraphsOff(f"{len(missing)} trained weight(s) got no gradient in the first step (a graph would "
                            "update them with a zero gradient where the eager step leaves them alone)")
        self.grads = [p.grad for p in self.params]

    def _update(self) -> None:
        """Clip, NaN guard, AdamW, zeroing: the end of train_step, without host reads."""
        grad_norm = clip_grad_norm(self.params, self.clip).reshape(())
        mean_loss = (self.loss_sum / self.count.clamp(min=1.0)).reshape(())
        bad = (~(torch.isfinite(mean_loss) & torch.isfinite(grad_norm))).float()
        self.optimizer.found_inf = bad  # fused AdamW skips the update on the device where it is set
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # the buffers stay: the graphs add into them
        self.out.copy_(torch.stack([mean_loss, grad_norm.to(mean_loss.dtype), bad]))
        self.loss_sum.zero_()

    def _capture(self, fn, optimizer_step: bool = False) -> torch.cuda.CUDAGraph:
        """`fn`'s kernels as a graph (run nothing). `optimizer_step`: fn is the update, whose lr
        must be a device tensor and whose groups must say capturable while it is recorded."""
        if self.grads is not None and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise GraphsOff("the gradient buffers were replaced outside the graphs")
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        torch.cuda.synchronize(self.device)  # the GPU work queued before is training, not capturing
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            if optimizer_step:
                for g, lr in zip(groups, self.lrs):
                    g["lr"], g["capturable"] = lr, True
            # thread_local: the prefetch thread pins host memory meanwhile, which a global
            # capture would forbid; this thread and autograd's record into the capture stream.
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                fn()
        except torch.OutOfMemoryError as e:
            raise GraphsOff(f"out of GPU memory while capturing ({str(e).splitlines()[0][:120]})") from e
        except RuntimeError as e:
            raise GraphsOff(f"capture failed: {str(e).splitlines()[0][:200]}") from e
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        self.captures += 1
        self.capture_s += time.perf_counter() - start
        return graph

    def release(self) -> None:
        """Drop every graph and buffer (graphs off for the rest of the run)."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.shapes.clear()
        self.step_graph = None
        self.grads = None
        self.loss_sum.zero_()

    def summary(self) -> str:
        return (f"{len(self.shapes)} micro-batch shape(s) ({self.captured_at_once} captured the first time they "
                f"came), {self.captures} capture(s) in {self.capture_s:.1f} s, {self.replays} replay(s)")
