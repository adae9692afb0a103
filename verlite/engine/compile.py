"""Whether to torch.compile the decoder layers, and where PyTorch keeps what it compiled.

`model.compile: auto` (the default) compiles only on a GPU and only when the planned run
is long enough to repay the compile time:

    compile  <=>  steps x micro_batches x layer passes x SAVED_S_PER_PASS  >=  compile cost + SETUP_S

Compiling removes per-kernel launch overhead, which is what limits short samples (a GSM8K
step of 32 x ~205 tokens leaves an H100 waiting on the host), so the saving is counted per
pass of a layer (its forward, its backward, and its forward again when gradient
checkpointing recomputes it) per micro-batch, not per token: the passes come from the
planned steps and micro-batches and from the model as built (how many layers recompute). The compile cost is COLD_S the first time a layer
shape is compiled on this machine and WARM_S once PyTorch's caches hold it (dynamo still
traces; inductor and AOTAutograd read their results from the FX-graph / autograd caches).
Each compiled run records what compiling cost it (its first steps' time above a steady
step's) beside the caches: a later run of the same shape decides from this machine's own
warm figure, and a new shape's cold cost is scaled by how this machine's cold compiles
compared with the reference GPU's (compile_cost).
The constants below come from `bench/gsm8k_cli.py` on the H200 (2026-12-01): 0.5B shape,
batch 32, GSM8K one epoch (233 steps, one micro-batch each, 24 layers, none recomputed).
Training took 45.1 s / 41.5 s eager and 28.6 s / 23.1 s compiled in one call (two launches
each: 1.5-1.6 ms saved per layer pass) and 33.8 s / 27.2 s compiled in another (1.0-1.3 ms
against the first call's eager runs): SAVED_S_PER_PASS is 1.3 ms. One compile of the layer
cost 15.4-19.4 s cold and 3.6-4.8 s with the caches filled, and a compiled run also spent
3-5 s more loading the model (the first torch.compile call imports torch's compiler stack:
AOTAutograd, inductor, Triton), counted as SETUP_S on top of either. (The H100 run of issue
14, every layer recomputed, had given ~1 ms a pass, 15.8 s and 4.3 s.) At these figures the
benchmark's own 233-step run stays eager on a first launch (14.5 s saved < 18.9 s): compiled,
it had taken 74.2 s and 91.7 s against 73.9 s eager.

Lengths: every packed micro-batch has another length. Left to PyTorch ("automatic
dynamic"), the first length compiles static and the first change recompiles with the token
dimension symbolic: two compiles, the first one wasted on SFT data. verlite marks the token
dimension dynamic from the first call instead (on the embedding and rotary outputs that
enter layer 0; later layers reuse the same graph), and passes the varlen kernel a fixed
max_seqlen (data.max_length, an upper bound the kernel accepts) so that no Python int
changes either: one compile per layer shape. Only that dimension is symbolic, as in
automatic dynamic's steady state; `dynamic=True` (every dimension) measured 1-5 % slower
once warm (bench/RESULTS.md). Compiling pads nothing; CUDA graphs
(engine/graph_step.py) pad to a few sizes because a graph replays fixed shapes, and the one
dynamic compile serves them all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from verlite.cache_dir import cache_root
from verlite.errors import VerliteError

log = logging.getLogger("verlite.engine")

SAVED_S_PER_PASS = 0.0013  # host time compiling saves per layer pass (fwd, bwd or recompute) per micro-batch
# With the step replayed as CUDA graphs (engine/graph_step.py) launches cost nothing and
# compiling saves only GPU time (fused element-wise kernels): H200, 2026-12-02, the 0.5B
# shape at ~7.9k tokens a step (bench.py full --max_length 256), replayed steps 82 ms eager
# (with models/fused_norm.py; 92 ms without) and 60 ms compiled, 48 layer passes.
SAVED_S_PER_PASS_GRAPHED = 0.00046
# Measured on the H200 (bench/gsm8k_cli.py, 2026-12-01): one compile of the 0.5B shape's
# layer, the token dimension dynamic from the start, cold and with the caches filled.
COLD_S = 15.4  # first compile of a layer shape on this machine (0.5B shape, H200)
WARM_S = 3.6  # the same shape again, with the caches below filled
SETUP_S = 3.5  # importing and setting up torch's compiler, paid by every compiled run (not cached)
FIXED_MAX_SEQLEN_UP_TO = 4096  # data.max_length up to which max_seqlen is passed fixed (see above)
SHAPES_FILE = "verlite_compiled_shapes.json"  # which layer shapes this cache folder has compiled



def compile_cache_dir() -> Path:
    """PyTorch's compile caches: $TORCHINDUCTOR_CACHE_DIR when the user set it, else <cache_root>/compile.
    Importing torch._dynamo (which verlite's attention does) sets that variable to torch's /tmp
    default: that value is not the user's choice, and /tmp does not outlive a reboot."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch sets the variable only through this module (cache_dir()), so it is loaded by then.
    default = getattr(sys.modules.get("torch._inductor.runtime.cache_dir_utils"), "default_cache_dir", None)
    if chosen and default is not None and chosen == default():
        chosen = None
    return Path(chosen or cache_root() / "compile").expanduser()


def use_persistent_cache() -> Path:
    """Point inductor's FX-graph, AOTAutograd and dynamic-shape caches at a folder that
    outlives /tmp. Must run before the first compile of the process (inductor reads the
    variables then)."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    # Triton keeps its compiled kernels apart (~/.triton by default): one folder holds everything.
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return folder


@dataclass
class CompileChoice:
    enabled: bool
    reason: str
    signature: str = ""  # the compiled layer shape (layer_signature)
    warm: bool = False  # whether this machine's caches held it before this run


def layer_signature(model) -> str:
    """What makes one compiled layer reusable: its code and shapes, the dtype and the software."""
    cfg = model.causal_lm.config
    layer = model.decoder_layers()[0]
    lora = any("lora_" in n for n, _ in layer.named_parameters())
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    keys = [type(layer).__name__, getattr(cfg, "hidden_size", "?"), getattr(cfg, "intermediate_size", "?"),
            getattr(cfg, "num_attention_heads", "?"), getattr(cfg, "num_key_value_heads", "?"),
            f"lora={lora}", torch.__version__, dev]
    return "/".join(map(str, keys))


def _known_shapes(folder: Path) -> dict[str, dict]:
    """signature -> {"cold_s": seconds, "warm_s": seconds} as measured here (either may be absent)."""
    try:
        known = json.loads((folder / SHAPES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(known, list):  # written before costs were recorded: shapes only
        return {sig: {} for sig in known if isinstance(sig, str)}
    return {k: v for k, v in known.items() if isinstance(v, dict)} if isinstance(known, dict) else {}


def _write_shapes(folder: Path, shapes: dict[str, dict]) -> None:
    # A cache, not a result: no fsync (a file lost in a crash only costs the next run its warm
    # estimate), but renamed into place so a reader never sees half of it.
    tmp = folder / (SHAPES_FILE + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(shapes, indent=1))
        os.replace(tmp, folder / SHAPES_FILE)
    except OSError as e:  # a read-only cache only costs the next run its warm estimate
        log.debug("could not record the compiled shape in %s: %s", folder, e)


def remember_shape(folder: Path, signature: str) -> None:
    shapes = _known_shapes(folder)
    if signature not in shapes:
        _write_shapes(folder, {**shapes, signature: {}})


def record_cost(signature: str, seconds: float, warm: bool, folder: Path | None = None) -> None:
    """What compiling this shape cost this run, measured (cold: the caches did not hold it)."""
    folder = folder or compile_cache_dir()
    shapes = _known_shapes(folder)
    entry = dict(shapes.get(signature, {}))
    entry["warm_s" if warm else "cold_s"] = round(float(seconds), 2)
    _write_shapes(folder, {**shapes, signature: entry})


def compile_seconds(first_steps_s: list[float]) -> float:
    """The first steps' host time above a steady step's: compiling happens inside them (and
    a recompile may come in one of the next). The steady step is the median of the first ten."""
    if len(first_steps_s) < 2:
        return 0.0
    typical = statistics.median(first_steps_s)
    return sum(max(0.0, t - typical) for t in first_steps_s)


def _seconds(value) -> float | None:
    """A recorded duration, if it is one (the file may be hand-edited or from another version)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def compile_cost(known: dict | None, shapes: dict[str, dict] | None = None) -> tuple[float, str]:
    """(seconds, where the figure comes from) for compiling a shape with this cache entry
    (None: a shape this cache has not compiled). `shapes`: every entry of this cache, whose
    measured cold compiles say how fast this machine compiles next to the H200 the constants
    come from. Measurements are clamped to 1/4..4x the constants: one bad figure (a first
    step slowed by something else) must not keep `auto` off for good, since a run that does
    not compile records nothing new."""
    colds = [x for e in (shapes or {}).values() if (x := _seconds(e.get("cold_s")))]
    factor = min(4.0, max(0.25, statistics.median(colds) / COLD_S)) if colds else None
    scaled = "scaled by the cold compiles measured here" if factor else "assumed from an H200 0.5B run"
    if known is None:
        return COLD_S * (factor or 1.0), f"a new shape, {scaled}"
    warm = _seconds(known.get("warm_s"))
    if warm is not None:
        return min(4 * WARM_S, max(WARM_S / 4, warm)), "a cached shape, measured here"
    return WARM_S * (factor or 1.0), f"a cached shape, {scaled}"


def parse_setting(setting, key: str = "model.compile") -> bool | str:
    """A true | false | auto key (model.compile by default) as True, False or "auto";
    anything else is the user's error, named by `key`."""
    if isinstance(setting, str) and setting.lower() in ("true", "false", "auto"):
        return setting.lower() == "true" if setting.lower() != "auto" else "auto"
    if isinstance(setting, bool):
        return setting
    raise VerliteError(f"{key} is {setting!r}; use true, false or auto")


def decide(setting, device: torch.device, steps: int, micro_batches: int, layers: int, warm: bool,
           recomputed: int = 0, known: dict | None = None, shapes: dict[str, dict] | None = None,
           graphs: bool = False) -> CompileChoice:
    """model.compile (true | false | auto) to a yes/no and the reason, for the log.
    `recomputed`: layers that gradient checkpointing runs forward twice. `known`: this
    machine's cache entry for the shape (its measured compile costs), when it has one;
    `shapes`: all of this cache's entries (see compile_cost). `graphs`: the steps replay as
    CUDA graphs, so compiling saves GPU time only."""
    setting = parse_setting(setting)
    if setting is True:
        if device.type != "cuda":
            return CompileChoice(False, "model.compile=true, but compiling runs only on a GPU (this run: CPU)")
        return CompileChoice(True, "model.compile=true")
    if setting is False:
        return CompileChoice(False, "model.compile=false")
    if device.type != "cuda":
        return CompileChoice(False, "model.compile=auto: off on CPU (compiling pays only on a GPU)")
    passes = 2 * layers + recomputed
    per_pass = SAVED_S_PER_PASS_GRAPHED if graphs else SAVED_S_PER_PASS
    saving = steps * micro_batches * passes * per_pass
    cost, source = compile_cost((known if known is not None else {}) if warm else None, shapes)
    cost += SETUP_S
    verdict = "on" if saving >= cost else "off"
    return CompileChoice(saving >= cost, f"model.compile=auto: {verdict} ({steps} steps x {micro_batches} micro-batch(es) "
                                         f"x {passes} layer passes ({layers} layers, {recomputed} recomputed) x "
                                         f"~{per_pass * 1000:g} ms{' (CUDA graphs)' if graphs else ''} would save ~{saving:.0f} s against ~{cost:.0f} s "
                                         f"to compile {source})")


def _mark_tokens_dynamic(module, args, output) -> None:
    for t in output if isinstance(output, tuple) else (output,):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(t, 1)  # [batch, tokens, ...]; never raises


def _mark_samples_dynamic(module, args, kwargs) -> None:
    # A packed row's sample count (cu_seqlens' length) changes from one micro-batch to the
    # next: dynamic from the start, not after a recompile of every layer at the second count.
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(t, 0)


def compile_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place (same module objects, so FSDP hooks stay)."""
    decoder = model.causal_lm.get_decoder()
    decoder.register_forward_pre_hook(_mark_samples_dynamic, with_kwargs=True)
    for name in ("embed_tokens", "rotary_emb"):
        source = getattr(decoder, name, None)
        if isinstance(source, torch.nn.Module):
            source.register_forward_hook(_mark_tokens_dynamic)
    for layer in model.decoder_layers():
        layer.compile(backend=backend)


def steady_max_seqlen(max_seqlen: int, max_length: int, num_samples: int) -> int:
    """The max_seqlen handed to the compiled varlen kernel: fixed (one compile) for short
    samples, and for a row of one sample at any length. A changing int recompiles the layer
    once (the 7B 32k trace showed a 1-4 s recompile inside the second step); passing the
    bound costs the kernel only the blocks past the row's end, which exit at once: few when the
    row is one sample, but one set per sample in a row of many short ones, hence
    FIXED_MAX_SEQLEN_UP_TO for those."""
    fixed = max_length <= FIXED_MAX_SEQLEN_UP_TO or num_samples == 1
    return max(max_seqlen, max_length) if fixed else max_seqlen


def measured_cost(choice: CompileChoice, first_steps_s: list[float], record: bool = True) -> float:
    """Seconds compiling cost this run (0 when it did not compile), from its first steps;
    recorded beside the caches (`record`: rank 0) for the next run of the shape here."""
    if not choice.enabled:
        return 0.0
    seconds = compile_seconds(first_steps_s)
    if record and len(first_steps_s) >= 3 and choice.signature:  # fewer steps show no steady step to compare
        record_cost(choice.signature, seconds, choice.warm)
    return seconds


def maybe_compile(model, setting, device: torch.device, steps: int, micro_batches: int,
                  graphs: bool = False) -> CompileChoice:
    """Decide, log the decision in one line, and compile with the persistent caches. The
    choice carries the shape's signature and whether the caches held it, for `record_cost`."""
    folder = compile_cache_dir()
    signature = layer_signature(model)
    shapes = _known_shapes(folder)
    known = shapes.get(signature)
    layers = model.decoder_layers()
    recomputed = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
    choice = decide(setting, device, steps, micro_batches, len(layers), known is not None, recomputed, known, shapes,
                    graphs)
    choice.signature, choice.warm = signature, known is not None
    log.info("compile: %s", choice.reason)
    if choice.enabled:
        folder = use_persistent_cache()
        compile_layers(model)
        remember_shape(folder, signature)
    return choice
