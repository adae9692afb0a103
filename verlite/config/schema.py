"""Typed configuration: verl's `sft_trainer.yaml` sections plus the article's additions.

Defaults follow verl where verl has the key, except where spec.md decides otherwise
(train_batch_size defaults to micro batch x world size; checkpoints every 10 steps, as the
article's run prints `Checkpoint saved to ./checkpoints/global_step_10` without naming it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class MultiturnConfig:
    enable: bool = False
    messages_key: str = "messages"
    tools_key: str = "tools"  # column of tool definitions, rendered by the chat template
    enable_thinking_key: str = "enable_thinking"  # column passed to the template as enable_thinking


@dataclass
class CustomClsConfig:
    path: Optional[str] = None  # a .py file defining a verl-style dataset class
    name: Optional[str] = None


@dataclass
class DataConfig:
    train_files: Optional[Union[str, list[str]]] = None
    val_files: Optional[Union[str, list[str]]] = None
    prompt_key: str = "question"
    response_key: str = "answer"
    multiturn: MultiturnConfig = field(default_factory=MultiturnConfig)
    chat_template: Optional[str] = None  # a Jinja template (or a path to one) that replaces the tokenizer's
    max_length: int = 1024
    truncation: str = "error"  # error | left | right | drop
    micro_batch_size_per_gpu: Union[int, str] = 4  # or "auto": pick from the memory plan
    train_batch_size: Optional[int] = None  # samples per optimizer step; default micro x world
    packing: bool = False  # pack samples into rows, attention isolated per sample
    max_token_len_per_gpu: Optional[Union[int, str]] = None  # token budget per micro-batch, or "auto"
    num_workers: int = 0  # accepted for verl compatibility; data is pre-tokenized in memory
    # verl's nested dict fields: prompt = row[prompt_key][k1][k2]... (e.g. extra_info.question)
    prompt_dict_keys: Optional[list[str]] = None
    response_dict_keys: Optional[list[str]] = None
    train_max_samples: int = -1  # first N rows only; -1 = all
    val_max_samples: int = -1
    apply_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # A single-turn response ends with the chat template's own turn end ("template"), or, as
    # verl's SFTDataset builds it, with the response text followed by the tokenizer's eos ("eos").
    # "eos" (verl's entry points) also masks multi-turn data as verl's MultiTurnSFTDataset does:
    # the template's newline after an assistant turn's end carries loss; with "template" it does
    # not, since generation stops at the turn end and never produces it.
    response_end: str = "template"
    # Multi-turn: a template that does not render conversations as growing prefixes (Qwen3
    # thinking templates) is tokenized turn by turn instead of failing, as verl does.
    ignore_input_ids_mismatch: bool = False
    # The loss is already the mean over all loss tokens of the step across GPUs, which is
    # what verl's balance_dp_token asks for; kept so configs that set it load.
    balance_dp_token: bool = False
    custom_cls: CustomClsConfig = field(default_factory=CustomClsConfig)
    # Tokenized samples cached on disk (data/cache.py): true = $VERLITE_CACHE_DIR/tokens or
    # ~/.cache/verlite/tokens, false = off, or a folder.
    token_cache: Union[bool, str] = True


@dataclass
class MixedPrecisionConfig:
    param_dtype: str = "bf16"  # compute dtype on GPU (CPU always computes in fp32)
    reduce_dtype: str = "fp32"
    buffer_dtype: str = "fp32"


@dataclass
class FSDPConfig:
    cpu_offload: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True
    model_dtype: Optional[str] = None  # master weights; default fp32 for trained params
    # Only the optimizer state lives in host memory (verl: engine.optimizer_offload); the
    # parameters stay on the GPU. Owned by the small-cards work (issue 10).
    optimizer_offload: bool = False
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)


@dataclass
class ModelConfig:
    partial_pretrain: Optional[str] = None
    trust_remote_code: bool = False
    strategy: str = "fsdp2"  # fsdp2 | fsdp (treated as fsdp2) | none
    # true | false | auto: recompute the decoder layers in backward only when the step would
    # not fit the card otherwise (engine/memory.py plans it; off on CPU, where memory is no cap).
    enable_gradient_checkpointing: Union[bool, str] = "auto"
    checkpoint_layers: Optional[int] = None  # recompute only this many decoder layers (None: all)
    # Of the recomputed layers, the first N keep their attention output (and logsumexp), so
    # backward does not rerun attention forward (selective recompute; ~11% of a 32k-token
    # step). None: the planner picks under auto micro-batching for long samples; 0: none.
    keep_attention_layers: Optional[int] = None
    # verl's key: the one input a recomputed layer keeps waits in pinned host memory, not on
    # the GPU (28 layers x 32k tokens of a 7B model would hold 6 GiB there otherwise).
    enable_activation_offload: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    # verl's key: Liger's Triton kernels inside the decoder layers (models/liger.py). true: RoPE,
    # RMSNorm and SwiGLU (what verl's SFT trainer gets from it, its loss computed from logits);
    # auto (verlite's default): RoPE and SwiGLU wherever they can run (a CUDA GPU, liger-kernel
    # installed, a model type Liger knows), RMSNorm staying verlite's fused one; false: none
    # (verl commands keep verl's false). The loss stays verlite's own (model.fused_loss).
    use_liger: Union[bool, str] = "auto"
    fused_loss: bool = True  # chunked linear + cross-entropy: never builds [tokens x vocab] logits
    attn_implementation: str = "sdpa"
    # torch.compile each decoder layer (GPU only): true | false | auto (when the planned steps
    # repay the compile time; engine/compile.py holds the rule and its measured constants).
    compile: Union[bool, str] = "auto"
    # Replay each training step as CUDA graphs (engine/graph_step.py): true | false | auto (on
    # wherever they can run: one GPU, packed micro-batches, torch's fused AdamW).
    cuda_graphs: Union[bool, str] = "auto"
    # Frozen base weights stored quantized for QLoRA: None (off) or "nf4". Owned by issue 10.
    quantization: Optional[str] = None
    # verl's model.tiled_mlp: the MLP runs over the sequence in tiles so its intermediate
    # activations never exist for the whole sequence at once. Owned by issue 10.
    tiled_mlp: bool = False
    external_lib: Optional[str] = None  # a module imported before the model loads (registers custom models)
    lora_adapter_path: Optional[str] = None  # continue training this PEFT adapter (rank etc. from its config)
    exclude_modules: Optional[Union[str, list[str]]] = None  # modules LoRA leaves alone
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    # Keys under `model:` that are not fields above (e.g. rope_theta) land here and
    # override the model's Hugging Face config; they are checked against it at load time.
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    warmup_steps_ratio: float = 0.1
    warmup_steps: int = -1  # verl's lr_warmup_steps: when > 0 it wins over the ratio
    num_cycles: float = 0.5  # cosine: half a wave from lr down to min_lr_ratio x lr
    lr_scheduler: str = "cosine"  # cosine | constant | linear
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0
    # verl's optim.optimizer / optim.optimizer_impl: the optimizer class and the module it
    # comes from (e.g. AdamW from torch.optim, or an 8-bit AdamW from torchao.optim). Owned by issue 10.
    optimizer: str = "AdamW"
    optimizer_impl: str = "torch.optim"
    # Apply each weight's update inside backward, as soon as its gradient is complete, and free
    # that gradient (engine/fused_backward.py): no full gradient buffer, so more memory for
    # activations. true | false | auto (on when it lets a step run as one micro-batch that
    # would otherwise need several). One micro-batch per step; clip_grad uses the previous
    # step's global norm (README "Small cards").
    fused_backward: Union[bool, str] = "auto"


@dataclass
class CheckpointConfig:
    # verl's names. verlite's checkpoint always holds the Hugging Face model (hf_model) and,
    # with "optimizer"/"extra", the optimizer, schedule, step and RNG needed to resume.
    save_contents: list[str] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    load_contents: Optional[list[str]] = None  # default: save_contents


@dataclass
class TrainerConfig:
    total_epochs: int = 1
    total_training_steps: Optional[int] = None
    project_name: str = "verlite"
    experiment_name: str = "sft"
    default_local_dir: str = "./checkpoints"
    logger: Union[str, list[str]] = "console"  # console | tensorboard | jsonl | wandb, or a list
    log_interval: int = 10
    # steps between checkpoints; -1 = only at the end; verl's "after_each_epoch" = at each epoch's end
    save_freq: Union[int, str] = 10
    async_save: bool = True  # write checkpoints on a background thread (trainer/async_checkpoint.py)
    test_freq: Union[int, str] = -1  # steps between validations; -1 = only at the end; or "after_each_epoch"
    max_ckpt_to_keep: Optional[int] = None
    resume_mode: str = "auto"  # auto | disable | resume_path
    resume_from_path: Optional[str] = None
    seed: int = 42
    device: str = "auto"  # auto | cuda | cpu
    max_bad_steps: int = 5  # consecutive NaN/inf steps tolerated before the run stops
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    gpu_mem_gb: Optional[float] = None  # cap GPU memory (GiB) for this process; also what "auto" plans for


@dataclass
class SFTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # verl's legacy top-level key: split every packed sequence over this many ranks (Ulysses
    # sequence parallelism, all-to-all over attention heads). Owned by issue 11's SP work.
    ulysses_sequence_parallel_size: int = 1
