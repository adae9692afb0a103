#!/usr/bin/env bash
# What issues 10 and 14 still need measured on the GPU machine, in parts that each fit one
# 10-minute device call. Run from the repository root there, with the wheels of
# bench/wheels.sh in .whl/ and GSM8K train in $GSM8K (default .gsm8k/train.jsonl):
#
#   bash bench/gpu_runbook.sh A "$OUT"    # issue 14: gsm8k_cli defaults with TRL beside, then compiled
#   bash bench/gpu_runbook.sh B "$OUT"    # issue 10: 12 GiB cases with TRL beside, then 32k
#   bash bench/gpu_runbook.sh C "$OUT"    # issue 14: token cache on all cores, LoRA save pauses
#   bash bench/gpu_runbook.sh D "$OUT"    # attention kernels; gsm8k_cli defaults with TRL; 32k via SDPA
#   bash bench/gpu_runbook.sh E "$OUT"    # why 32k is 2x slower than TRL: traces of both attention paths, summarised
#   bash bench/gpu_runbook.sh F "$OUT"    # issue 10: 7B QLoRA at 12 GiB beside both TRL QLoRA settings
#   bash bench/gpu_runbook.sh G "$OUT"    # issue 10: 32k after the one-compile and cuDNN fixes, TRL beside
#   bash bench/gpu_runbook.sh H "$OUT"    # issue 10: what is live at the 7B QLoRA steps' memory peaks
#   bash bench/gpu_runbook.sh I "$OUT"    # issue 14: traces of a GSM8K-sized step, compiled and eager
#   bash bench/gpu_runbook.sh J "$OUT"    # issue 14: CUDA-graph steps: GPU tests, GSM8K-sized steps with and without
#   bash bench/gpu_runbook.sh K "$OUT"    # issue 14: eager graphed step: fused RMSNorm or not, and a trace of its kernels
#   bash bench/gpu_runbook.sh L "$OUT"    # what the sixth session left: graphs on token-budget micro-batches, lora vs TRL
#   bash bench/gpu_runbook.sh M "$OUT"    # issue 14: a launch's fixed costs (imports, fork after imports, fsync)
#   bash bench/gpu_runbook.sh N "$OUT"    # issue 14: lora vs TRL with one max_seqlen when compiled; final checkpoint's parts
#   bash bench/gpu_runbook.sh O "$OUT"    # issue 14: gsm8k_cli defaults (warm start, background pruning) with TRL beside
#   bash bench/gpu_runbook.sh P "$OUT"    # issue 14: O again (warm start's CUDA check fixed), then with pageable checkpoint buffers
#   bash bench/gpu_runbook.sh Q "$OUT"    # issue 14: warm start on the GPU (NVML during the helper's imports), TRL beside
#   bash bench/gpu_runbook.sh R "$OUT"    # issue 14: Q with checkpoint copies on the GPU, then host copies; a cold launch profiled
#   bash bench/gpu_runbook.sh S "$OUT"    # issue 14: start-up of a second launch without the helper (bytecode cache, import index)
#   bash bench/gpu_runbook.sh T "$OUT"    # issue 14: the eager step's activations in bf16, Liger's kernels; GPU tests
#   bash bench/gpu_runbook.sh U "$OUT"    # issue 14: gsm8k_cli defaults with TRL beside (after T's changes); warm, GPU tests
#   bash bench/gpu_runbook.sh V "$OUT"    # issue 14: defaults of the eleventh session (Liger auto, final fsync detached), TRL beside
#   bash bench/gpu_runbook.sh W "$OUT"    # issue 14: Liger auto under model.compile=true and with LoRA (short runs)
#   bash bench/gpu_runbook.sh X "$OUT"    # issue 14: a fresh machine's launch 1 with the kernel warm-up process; TRL with and without the bytecode prefix
#   TAR_TO=$OUT/Y.tgz bash bench/gpu_runbook.sh Y /tmp/Y
#                                         # issue 14: X's launches 1 and 2, the model read beside the data or not, both TRLs, GPU tests,
#                                         # no periodic saves, no import-index side process
#   bash bench/gpu_runbook.sh Z "$OUT"    # issue 14: X's first launch only (what a short device call can hold)
#
# Every step writes its full output under OUT (a device call returns only the tail of its
# output) and has its own time limit, so one slow step cannot cost the others.
set -uo pipefail
part=${1:?part A to Z}
out=${2:?output folder}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
gsm8k=${GSM8K:-$PWD/.gsm8k/train.jsonl}
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "rc=$?" >> "$out/$name.txt"
  grep -v '^{' "$out/$name.txt" | tail -8 | cut -c1-400
  # TAR_TO: the output folder tarred into this file after every step, so a call cut short
  # still brings back every finished step (a call returns 8 files at most).
  if [ -n "${TAR_TO:-}" ]; then
    tar czf "$TAR_TO.part" -C "$(dirname "$out")" "$(basename "$out")" && mv "$TAR_TO.part" "$TAR_TO"
  fi
}
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
case $part in
  A)  # launch to final checkpoint, both launches, TRL (bf16, its best) in the same call
      step gsm8k_default 330 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl --trl_dtypes bfloat16 \
          --out "$out/gsm8k_default.jsonl"
      # compiled, nothing recomputed: what compile `auto`'s SAVED_S_PER_PASS should be
      step gsm8k_compiled 230 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --set model.compile=true \
          --out "$out/gsm8k_compiled.jsonl" ;;
  B)  step small_12g 330 python bench/bench.py --cases full1.5b_12g,qlora7b_12g --warmup 2 --steps 4 --trl \
          --out "$out/small_12g.jsonl"
      step small_32k 230 python bench/bench.py --cases qlora7b_long32k_24g --warmup 1 --steps 3 --trl \
          --out "$out/small_32k.jsonl"
      python bench/plan_check.py "$out/small_12g.jsonl" --warmup 2 --steps 4 > "$out/plan_check.txt" 2>&1
      tail -6 "$out/plan_check.txt" ;;
  C)  step token_cache 120 python bench/token_cache.py --gsm8k "$gsm8k"
      step gsm8k_lora 300 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --lora --trl --out "$out/gsm8k_lora.jsonl" ;;
  D)  step attention 90 python bench/attention_check.py
      step gsm8k_default 330 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl --trl_dtypes bfloat16 \
          --out "$out/gsm8k_default.jsonl"
      VERLITE_BENCH_SDPA=cudnn,flash step long32k_sdpa 150 python bench/bench.py --cases qlora7b_long32k_24g \
          --warmup 1 --steps 3 --out "$out/long32k_sdpa.jsonl" ;;
  E)  # Which attention kernel runs inside training, and what else fills a 32k step: chrome traces
      # of both attention paths, summarised here (a 7B 32k trace is too big to bring back).
      step long32k_trace 200 python bench/bench.py --cases qlora7b_long32k_24g --warmup 1 --steps 2 \
          --trace /tmp/traces_E --out "$out/long32k_trace.jsonl"
      VERLITE_BENCH_SDPA=cudnn,flash VERLITE_BENCH_LABEL=_sdpa step long32k_sdpa_trace 200 python bench/bench.py \
          --cases qlora7b_long32k_24g --warmup 1 --steps 2 --trace /tmp/traces_E --out "$out/long32k_sdpa_trace.jsonl"
      for t in /tmp/traces_E/*.json; do
        python bench/trace_summary.py "$t" > "$out/$(basename "$t" .json)_summary.txt" 2>&1
        head -1 "$out/$(basename "$t" .json)_summary.txt"
      done ;;
  F)  # issue 10's 7B QLoRA at 12 GiB beside both TRL QLoRA settings (padded, and Liger + padding-free)
      step qlora_12g 400 python bench/bench.py --cases qlora7b_12g --warmup 2 --steps 4 --trl \
          --out "$out/qlora_12g.jsonl" ;;
  G)  # issue 10's 32k case after the fixes (one compile: fixed max_seqlen for one-sample rows;
      # cuDNN attention by default for one-sample rows of >= 16k tokens on Hopper), TRL beside,
      # then the varlen kernel for every row; recompiles logged
      TORCH_LOGS=recompiles step long32k 330 python bench/bench.py --cases qlora7b_long32k_24g --warmup 1 --steps 3 \
          --trl --out "$out/long32k.jsonl"
      VERLITE_BENCH_SDPA=none TORCH_LOGS=recompiles step long32k_varlen 160 python bench/bench.py \
          --cases qlora7b_long32k_24g --warmup 1 --steps 3 --out "$out/long32k_varlen.jsonl"
      grep -i -A3 "recompil" "$out"/long32k*.txt | head -20 ;;
  H)  # what is live at the step's peak (allocator history) for the two 7B QLoRA cases the plan
      # misses most: 32k (+31 %) and 12 GiB
      VERLITE_BENCH_MEMSNAP="$out" step mem_32k 200 python bench/bench.py --cases qlora7b_long32k_24g --warmup 1 \
          --steps 1 --out "$out/mem_32k.jsonl"
      VERLITE_BENCH_MEMSNAP="$out" step mem_12g 200 python bench/bench.py --cases qlora7b_12g --warmup 2 \
          --steps 1 --no_variants --out "$out/mem_12g.jsonl"
      head -12 "$out"/*_memory.txt ;;
  I)  # issue 14: where a GSM8K-sized step's time goes (0.5B full FT, batch 32 of <= 256-token
      # samples, ~7k tokens a step), compiled and eager, traced and summarised
      step short_trace 200 python bench/bench.py --cases full --max_length 256 --warmup 3 --steps 2 \
          --trace /tmp/traces_I --out "$out/short_trace.jsonl"
      VERLITE_BENCH_LABEL=_eager step short_trace_eager 150 python bench/bench.py --cases full --max_length 256 \
          --warmup 3 --steps 2 --trace /tmp/traces_I --out "$out/short_trace_eager.jsonl" model.compile=false
      for t in /tmp/traces_I/*.json; do
        python bench/trace_summary.py "$t" --top 15 > "$out/$(basename "$t" .json)_summary.txt" 2>&1
        head -1 "$out/$(basename "$t" .json)_summary.txt"
      done ;;
  J)  # issue 14: CUDA-graph steps. The GPU tests (graphed runs against eager ones), then the
      # GSM8K-sized step (0.5B full FT, batch 32 of <= 256-token samples) with graphs on and off,
      # compiled and eager; 24 warm-up steps so every step shape is captured before the timed ones.
      step graph_tests 280 python -m pytest -q -x -p no:cacheprovider tests/test_graph_step.py tests/test_loss_kernel.py
      for c in true false; do
        for g in auto false; do
          step "short_c${c}_g${g}" 150 python bench/bench.py --cases full --max_length 256 --warmup 24 --steps 20 \
              --no_variants --out "$out/short.jsonl" "model.compile=$c" "model.cuda_graphs=$g"
        done
      done
      python - "$out/short.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r.get("setting"), r.get("tokens_per_s"), r.get("step_s"), r.get("peak_gib"), r.get("cuda_graphs"), r.get("error", "")[:200])
PY
      ;;
  K)  # issue 14: what bounds the eager graphed step (compile auto keeps GSM8K's first launch eager):
      # torch.rms_norm against transformers' RMSNorm, then a trace of the replayed step's kernels
      step norm_tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_fused_norm.py tests/test_graph_step.py
      step eager_fused 150 python bench/bench.py --cases full --max_length 256 --warmup 24 --steps 20 --no_variants \
          --out "$out/eager_fused.jsonl" model.compile=false
      VERLITE_BENCH_NO_FUSED_NORM=1 step eager_unfused 150 python bench/bench.py --cases full --max_length 256 \
          --warmup 24 --steps 20 --no_variants --out "$out/eager_unfused.jsonl" model.compile=false
      step eager_trace 150 python bench/bench.py --cases full --max_length 256 --warmup 24 --steps 2 --no_variants \
          --trace /tmp/traces_K --out "$out/eager_trace.jsonl" model.compile=false
      for t in /tmp/traces_K/*.json; do
        python bench/trace_summary.py "$t" --top 25 > "$out/$(basename "$t" .json)_summary.txt" 2>&1
        head -40 "$out/$(basename "$t" .json)_summary.txt"
      done
      cat "$out"/eager_fused.jsonl "$out"/eager_unfused.jsonl | python -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print(r.get('setting'), r.get('tokens_per_s'), r.get('cuda_graphs'), r.get('step_times'))" ;;
  L)  # the sixth session's code, on the GPU: the graph tests (sample-count padding, rebuilt batches
      # after a fallback), the token-budget `full` case with graphs on and off (its sample counts
      # now padded to a few sizes), and the `lora` case beside TRL's padded + ckpt setting
      step graph_tests 200 python -m pytest -q -x -p no:cacheprovider tests/test_graph_step.py tests/test_fused_norm.py
      for g in auto false; do
        step "budget_g${g}" 150 python bench/bench.py --cases full --max_length 256 --warmup 24 --steps 20 \
            --no_variants --out "$out/budget_g${g}.jsonl" model.compile=false "model.cuda_graphs=$g"
      done
      step lora_trl 240 python bench/bench.py --cases lora --trl --out "$out/lora.jsonl" ;;
  M)  step startup_probe 150 python bench/startup_probe.py --gib 6 ;;
  N)  TORCH_LOGS=recompiles step lora_trl 280 python bench/bench.py --cases lora --trl --out "$out/lora.jsonl"
      step gsm8k_default 200 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --out "$out/gsm8k.jsonl" ;;
  O)  step gsm8k_default 400 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl --trl_dtypes bfloat16 \
          --out "$out/gsm8k_default.jsonl"
      cp /tmp/gsm8k_cli_*/cache/warm/helper.log "$out/" 2>/dev/null ;;
  P)  step gsm8k_default 300 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl --trl_dtypes bfloat16 \
          --out "$out/gsm8k_default.jsonl"
      cp "$(ls -td /tmp/gsm8k_cli_* | head -1)/cache/warm/helper.log" "$out/" 2>/dev/null
      VERLITE_CKPT_PIN=0 step gsm8k_pageable 150 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --out "$out/gsm8k_pageable.jsonl" ;;
  Q)  VERLITE_WARM_DEBUG=1 step gsm8k_default 330 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl \
          --trl_dtypes bfloat16 --out "$out/gsm8k_default.jsonl"
      cp "$(ls -td /tmp/gsm8k_cli_* | head -1)/cache/warm/helper.log" "$out/" 2>/dev/null
      step warm_tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_warm.py ;;
  R)  VERLITE_WARM_DEBUG=1 step gsm8k_default 330 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl \
          --trl_dtypes bfloat16 --out "$out/gsm8k_default.jsonl"
      cp "$(ls -td /tmp/gsm8k_cli_* | head -1)/cache/warm/helper.log" "$out/" 2>/dev/null
      step writes 60 python bench/startup_probe.py --writes_only --gib 6
      # A cold launch (fresh Triton and verlite caches, no helper), 12 steps logged one by one:
      # a cProfile of the whole run (where step 1's seconds go), then Python's import times.
      probe() {  # name, extra python flags...
        local name=$1; shift
        rm -rf /tmp/probe_run /tmp/probe_cache /tmp/probe_triton
        TRITON_CACHE_DIR=/tmp/probe_triton VERLITE_CACHE_DIR=/tmp/probe_cache VERLITE_WARM=0 \
          step "$name" 150 python "$@" sft data.train_files="$gsm8k" \
          model.partial_pretrain=/tmp/bench_models/qwen0.5b_gsm8k trainer.default_local_dir=/tmp/probe_run \
          data.micro_batch_size_per_gpu=32 trainer.total_training_steps=12 trainer.log_interval=1 trainer.save_freq=-1
        cp /tmp/probe_run/metrics.jsonl "$out/$name.metrics.jsonl" 2>/dev/null
      }
      probe cprofile bench/profile_cli.py "$out/cold12.prof"
      step warm_tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_warm.py
      # The checkpoint copies in pinned host memory, as before DeviceStaging (one cold launch)
      VERLITE_WARM=0 VERLITE_CKPT_STAGING=host step gsm8k_host 90 python bench/gsm8k_cli.py --gsm8k "$gsm8k" \
          --launches 1 --out "$out/gsm8k_host.jsonl"
      probe importtime -X importtime -m verlite.cli ;;
  S)  VERLITE_WARM=0 step startup_cached 160 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --steps 12 \
          --out "$out/startup_cached.jsonl"
      ls "$(ls -td /tmp/gsm8k_cli_* | head -1)/cache" >> "$out/startup_cached.txt" ;;
  T)  # The eager graphed step on GSM8K (120 steps, no periodic checkpoints, fresh Triton cache each):
      # fp32 residual stream (the code before) against bf16 (models/compute_dtype.py), then Liger's
      # RoPE + SwiGLU on top; the bf16 run launched twice without the helper (its second start-up
      # reads the bytecode cache and the import index); every first launch's start-up has the
      # bytecode compiled on the side but one (no_precompile).
      variant() {  # name, env assignments...
        local name=$1; shift
        rm -rf /tmp/triton_T; env TRITON_CACHE_DIR=/tmp/triton_T VERLITE_WARM=0 "$@" \
          timeout 200 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --steps "${N:-120}" --launches "${L:-1}" \
          --set trainer.save_freq=-1 --out "$out/$name.jsonl" > "$out/$name.txt" 2>&1
        echo "== $name rc=$?"; python - "$out/$name.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(r.get("wall_s"), r.get("first_step_s"), r.get("tokens_per_s"), r.get("logged_rates"), (r.get("done") or r.get("error", ""))[-420:])
PY
      }
      if [ "${T_EXTRAS:-0}" = 1 ]; then  # after part U, where the call has time left
        N=12 variant no_precompile VERLITE_PRECOMPILE_WORKERS=0
        N=12 L=2 variant cached_start VERLITE_LIGER_KERNELS=
        step gpu_tests 200 python -m pytest -q -x -p no:cacheprovider tests/test_graph_step.py \
            tests/test_fused_norm.py tests/test_compute_dtype.py tests/test_liger.py
        exit 0
      fi
      variant fp32_stream VERLITE_FP32_STREAM=1
      variant bf16_stream VERLITE_LIGER_KERNELS=
      variant liger_rope_swiglu VERLITE_LIGER_KERNELS=rope,swiglu
      # Which the next part runs with: Liger where it beat the bf16 stream alone by 3 % or more.
      python - "$out" > "$out/pick.txt" <<'PY'
import json, sys
rate = lambda n: json.loads(open(f"{sys.argv[1]}/{n}.jsonl").readline()).get("tokens_per_s") or 0
print("rope,swiglu" if rate("liger_rope_swiglu") >= 1.03 * rate("bf16_stream") else "")
PY
      echo "pick: liger=[$(cat "$out/pick.txt")]" ;;
  U)  VERLITE_WARM_DEBUG=1 step gsm8k_default 380 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --trl \
          --trl_dtypes bfloat16 --out "$out/gsm8k_default.jsonl"
      cp "$(ls -td /tmp/gsm8k_cli_* | head -1)/cache/warm/helper.log" "$out/" 2>/dev/null
      step warm_tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_warm.py ;;
  V)  # Defaults now: Liger's RoPE + SwiGLU (model.use_liger=auto), the final checkpoint's fsync
      # handed to a detached process, a one-process group left to the exit. TRL's best beside.
      # ENV_PYC=1: both sides read bytecode compiled beforehand, as after a normal pip install
      # (bench/compile_env.py); otherwise every process compiles from source what it imports.
      if [ "${ENV_PYC:-0}" = 1 ]; then
        export PYTHONPYCACHEPREFIX=/tmp/pycache_env
        python bench/compile_env.py | tee "$out/compile_env.txt"
      fi
      # Every second: the load and the busiest processes (was launch 1 on a fresh machine short of CPU?).
      (while :; do echo "-- $(date +%s.%N | cut -c1-14) $(cut -d' ' -f1-4 /proc/loadavg)"
         ps -eo pcpu,ni,etimes,args --sort=-pcpu | head -7 | cut -c1-150; sleep 1; done) > "$out/load.txt" 2>&1 &
      sampler=$!
      VERLITE_WARM_DEBUG=1 VERLITE_TRACE_EXIT=1 step gsm8k_default 420 python bench/gsm8k_cli.py --gsm8k "$gsm8k" \
          --trl --trl_dtypes bfloat16 --prime --out "$out/gsm8k_default.jsonl"
      kill $sampler
      tail -c 6000 "$(ls -td /tmp/gsm8k_cli_* | head -1)/cache/warm/helper.log" > "$out/helper_tail.log" 2>/dev/null
      [ "${V_TESTS:-1}" = 1 ] && step gpu_tests 150 python -m pytest -q -x -p no:cacheprovider -m '' tests/test_liger.py \
          tests/test_warm.py ;;
  X)  # Twelfth session. Launch 1 of a fresh machine with Liger's kernels compiled by a side
      # process (models/kernel_warmup.py); then on the same machine, without the helper and with
      # an empty Triton cache each, launch 1 without and with that process; TRL alone without and
      # with the bytecode prefix (106 s with it in V2/V3, 66-79 s without before); the GPU tests.
      python bench/page_cache_probe.py > "$out/page_cache_fresh.json" 2>&1; cat "$out/page_cache_fresh.json"
      export PYTHONPYCACHEPREFIX=/tmp/pycache_env
      python bench/compile_env.py > "$out/compile_env.txt" 2>&1; tail -2 "$out/compile_env.txt"
      VERLITE_TRACE_EXIT=1 step x1_launches 200 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --prime \
          --out "$out/x1_launches.jsonl"
      python bench/page_cache_probe.py > "$out/page_cache_after.json" 2>&1
      VERLITE_WARM=0 VERLITE_KERNEL_WARMUP=0 step x2_no_warmup 100 python bench/gsm8k_cli.py --gsm8k "$gsm8k" \
          --launches 1 --fresh_triton --out "$out/x2_no_warmup.jsonl"
      VERLITE_WARM=0 step x3_warmup 100 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --launches 1 --fresh_triton \
          --out "$out/x3_warmup.jsonl"
      unset PYTHONPYCACHEPREFIX
      [ "${X_TRL:-1}" = 1 ] && step x4_trl_plain 130 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --launches 0 --trl \
          --trl_dtypes bfloat16 --out "$out/x4_trl_plain.jsonl"
      [ "${X_TRL:-1}" = 1 ] && PYTHONPYCACHEPREFIX=/tmp/pycache_env step x5_trl_prefixed 150 python bench/gsm8k_cli.py \
          --gsm8k "$gsm8k" --launches 0 --trl --trl_dtypes bfloat16 --out "$out/x5_trl_prefixed.jsonl"
      [ "${X_TESTS:-1}" = 1 ] && step gpu_tests 150 python -m pytest -q -x -p no:cacheprovider -m '' \
          tests/test_kernel_warmup.py tests/test_liger.py tests/test_graph_step.py ;;
  Y)  # Thirteenth session: X's fresh-machine launches 1 and 2; TRL plain (as a user runs it);
      # the GPU tests (kernel warm-up, Liger, graph shapes captured the first time they come);
      # TRL under the bytecode prefix; then, on that machine without the helper, launch 1 with
      # the model read beside the data (default) and after it (VERLITE_EARLY_READ=0), and
      # without periodic saves. What the issue's targets need comes first, in case the call is
      # cut short. A call returns 8 files at most: run it with TAR_TO (see the header).
      export PYTHONPYCACHEPREFIX=/tmp/pycache_env
      python bench/compile_env.py > "$out/compile_env.txt" 2>&1; tail -1 "$out/compile_env.txt"
      VERLITE_TRACE_EXIT=1 step y1_launches 200 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --prime \
          --out "$out/y1_launches.jsonl"
      unset PYTHONPYCACHEPREFIX
      step y4_trl_plain 130 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --launches 0 --trl \
          --trl_dtypes bfloat16 --out "$out/y4_trl_plain.jsonl"
      [ "${Y_TESTS:-1}" = 1 ] && step gpu_tests 200 python -m pytest -q -p no:cacheprovider -m '' \
          tests/test_kernel_warmup.py tests/test_liger.py tests/test_graph_step.py
      PYTHONPYCACHEPREFIX=/tmp/pycache_env step y5_trl_prefixed 150 python bench/gsm8k_cli.py \
          --gsm8k "$gsm8k" --launches 0 --trl --trl_dtypes bfloat16 --out "$out/y5_trl_prefixed.jsonl"
      export PYTHONPYCACHEPREFIX=/tmp/pycache_env
      VERLITE_WARM=0 step y3_read_beside 100 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --launches 1 \
          --out "$out/y3_read_beside.jsonl"
      VERLITE_WARM=0 VERLITE_EARLY_READ=0 step y2_read_after 100 python bench/gsm8k_cli.py --gsm8k "$gsm8k" \
          --launches 1 --out "$out/y2_read_after.jsonl"
      # y3 without periodic saves: what the background writes cost the training (in X, ~0.56 s
      # of steps 21-30 during the first one that graph captures do not explain: RESULTS.md).
      VERLITE_WARM=0 step y6_no_periodic_saves 60 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --launches 1 \
          --set trainer.save_freq=-1 --out "$out/y6_no_periodic_saves.jsonl"
      # y3 without the side process that builds transformers' import index on a first launch
      # (fifteenth session): its share of the "transformers import" part of start-up.
      VERLITE_WARM=0 VERLITE_INDEX_BUILDER=0 step y7_no_index_builder 100 python bench/gsm8k_cli.py --gsm8k "$gsm8k" \
          --launches 1 --out "$out/y7_no_index_builder.jsonl" ;;
  Z)  export PYTHONPYCACHEPREFIX=/tmp/pycache_env
      python bench/compile_env.py > "$out/compile_env.txt" 2>&1; tail -1 "$out/compile_env.txt"
      VERLITE_TRACE_EXIT=1 step z1_launch 120 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --prime --launches 1 \
          --out "$out/z1_launch.jsonl"
      cat "$out/z1_launch.jsonl" | cut -c1-1500 ;;
  W)  # Liger auto where the default run does not go: compiled layers, and LoRA (with and without Liger)
      step compiled_liger 240 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --steps 40 --launches 1 \
          --set model.compile=true --out "$out/compiled_liger.jsonl"
      step lora_liger 120 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --lora --steps 120 --launches 1 \
          --set trainer.save_freq=-1 --out "$out/lora_liger.jsonl"
      VERLITE_LIGER_KERNELS= step lora_no_liger 120 python bench/gsm8k_cli.py --gsm8k "$gsm8k" --lora --steps 120 \
          --launches 1 --set trainer.save_freq=-1 --out "$out/lora_no_liger.jsonl" ;;
  *)  echo "unknown part $part (A to W)" >&2; exit 2 ;;
esac
