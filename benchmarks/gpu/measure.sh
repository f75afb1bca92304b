#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, docs/transformers5.md and the README, one phase an argument; each
# writes its records under $OUT (default: ./gpu_out). Wheels the GPU machine lacks travel in .whl/ (tf4: transformers
# 4.57.6; tf524: transformers 5.24; bnb: bitsandbytes; unsloth: Unsloth, TRL, datasets and what they need), each
# installed into its own target; ../shared/gpu/fetch-wheels on the CPU machine downloads them.
#   step517 / step524   4 Qwen3-30B-A3B-shaped layers, full fine-tuning, 4096 tokens, the model as loaded:
#                       torch.compile (transformers' grouped_mm) against graph_moe.compile; machine's 5.17 / 5.24
#   qlora517            LoRA r=16 on the 3D experts, bf16 experts against NF4 experts (quantize_experts_4bit), peaks
#   layer_before_after  the layer bench at 4096 tokens on this commit and on the one named by .whl/before.tar
#   unsloth517          real Unsloth on 5.17: what graph_moe.install reports for its Qwen3-MoE blocks
#   routing524          the full step at 4096 tokens with skewed routing (zipf, one hot expert) and at 16384 tokens
#   lora524             LoRA r=16 on every expert: PEFT target_parameters under torch.compile against graph_moe
#   decode524           a decode step at batch 1, 16, 64: graph_moe against eager and transformers' grouped_mm /
#                       batched_mm with a static cache (generate compiles them)
#   sft457              TRL SFTTrainer, LoRA on the experts, tokens per second with and without graph_moe (4.57.6)
#   profile524          the step524 step again, a torch.profiler table of two steps of each variant (where the time goes)
#   unsloth457          real Unsloth on 4.57.6, QLoRA: with graph_moe, LoRA on attention only and on every expert
#                       projection too (each with a torch.profiler table of one step), and Unsloth alone with LoRA on
#                       every expert projection
#   unsloth517_steps    the same three runs on the machine's 5.17, Unsloth's own compiled MoE blocks there
#   chart               docs/step.png from the step records of this run
# The records name the commit of $GRAPH_MOE_COMMIT where set (the tree copied to a GPU machine may carry no .git, or a
# stale one): run as `GRAPH_MOE_COMMIT=<hash> bash benchmarks/gpu/measure.sh ...`.
# SMOKE=1 runs every phase at a tiny shape on the CPU (aot_eager after the pass; the Unsloth phases and the layer
# bench need CUDA and are left out): a check, before a GPU call, that each phase's command still runs.
# Results and each phase's log gather in $RESULTS; after every phase $OUT/results.tar holds them all (one file: a
# machine that returns few files, or a run cut off by its time limit, still returns what is done).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
FINAL=$OUT; OUT=${RESULTS:-/tmp/gpu_results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site() { local dir=/tmp/site_$1; if [ ! -d "$dir" ]; then mkdir -p "$dir"
  ls .whl/$1/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target "$dir" .whl/$1/*.whl
  for t in .whl/$1/*-src.tgz; do [ -f "$t" ] && tar xzf "$t" -C "$dir"; done; fi; echo "$dir"; }
with() { local path=$PWD; for s in "$@"; do path=$(site "$s"):$path; done; echo "$path"; }
STEP="-m graph_moe bench step --layers 4 --tokens 4096 --qwen3-attention --steps 5"
TINY=""  # appended to every bench command: argparse keeps an option's last value
if [ -n "${SMOKE:-}" ]; then
  TINY="--layers 2 --num-experts 8 --top-k 2 --hidden 64 --intermediate 64 --vocab 128 --inner aot_eager"
  STEP="$STEP --tokens 64 --steps 1 --device cpu"
fi
for phase in "$@"; do
  echo "=== $phase"
  exec 3>&1 4>&2 > >(tee "$OUT/$phase.log") 2>&1
  case $phase in
    step517) PYTHONPATH=$(with bnb) python3 $STEP --experts full --variants torch_compile graph_moe \
               --json "$OUT/step_full_tf517.json" $TINY ;;
    step524) PYTHONPATH=$(with bnb tf524) python3 $STEP --experts full --variants torch_compile graph_moe \
               --json "$OUT/step_full_tf524.json" $TINY ;;
    qlora517) PYTHONPATH=$(with bnb) python3 $STEP --experts lora --bf16-adapters --variants graph_moe \
                --json "$OUT/step_lora_bf16_experts_tf517.json" $TINY
              PYTHONPATH=$(with bnb) python3 $STEP --experts lora --bf16-adapters --four-bit-experts --variants graph_moe \
                --json "$OUT/step_lora_nf4_experts_tf517.json" $TINY ;;
    layer_before_after)
      if [ -n "${SMOKE:-}" ]; then echo "skipped: the layer bench times CUDA events"
      else
        tf4=$(site tf4); out=$(cd "$OUT" && pwd)
        rm -rf /tmp/before && mkdir -p /tmp/before && tar xf .whl/before.tar -C /tmp/before
        (cd /tmp/before && PYTHONPATH=$tf4:/tmp/before python3 -m graph_moe bench --no-loop --tokens 4096 \
           --json "$out/layer_before.json")
        PYTHONPATH=$(with tf4) python3 -m graph_moe bench layer --no-loop --tokens 4096 --json "$OUT/layer_after.json"
      fi ;;
    routing524)
      for routing in zipf hot; do PYTHONPATH=$(with bnb tf524) python3 $STEP --experts full --routing $routing \
        --variants torch_compile graph_moe --json "$OUT/step_full_${routing}_tf524.json" $TINY; done
      PYTHONPATH=$(with bnb tf524) python3 ${STEP/--tokens 4096/--tokens 16384} --experts full \
        --variants torch_compile graph_moe --json "$OUT/step_full_16k_tf524.json" $TINY ;;
    lora524) PYTHONPATH=$(with bnb tf524) python3 $STEP --experts lora --bf16-adapters \
               --variants torch_compile graph_moe --json "$OUT/step_lora_tf524.json" $TINY ;;
    decode524) PYTHONPATH=$(with bnb tf524) python3 -m graph_moe bench decode --layers 4 --batches 1 16 64 \
                 --variants eager graph_moe graph_moe_reduce_overhead torch_compile_grouped_mm torch_compile_batched_mm \
                 --json "$OUT/decode_tf524.json" $TINY ${SMOKE:+--batches 1 2 --prompt 8 --new-tokens 2 --device cpu} ;;
    sft457) PYTHONPATH=$(with bnb unsloth tf4) python3 -m graph_moe bench sft --layers 4 --batch 4 --length 1024 \
              --json "$OUT/sft_tf457.json" $TINY ${SMOKE:+--batch 2 --length 32 --steps 3 --warmup 1} ;;
    profile524) PYTHONPATH=$(with bnb tf524) python3 ${STEP/--steps 5/--steps 3} --experts full \
                  --variants torch_compile graph_moe --profile "$OUT/profile_step_full_tf524" \
                  --json "$OUT/step_full_profiled_tf524.json" $TINY ;;
    chart) python3 -m graph_moe bench chart "$OUT"/step_full_tf5*.json "$OUT"/step_full_*_tf524.json \
             --out "$OUT/step.png" ;;
    unsloth457|unsloth517_steps)
      if [ -n "${SMOKE:-}" ]; then echo "skipped: Unsloth needs CUDA"
      else
        sets="bnb unsloth tf4"; tag=tf457; [ "$phase" = unsloth517_steps ] && sets="bnb unsloth" && tag=tf517
        for on in attention all; do PYTHONPATH=$(with $sets) python3 examples/unsloth_qlora.py --steps 5 \
          --lora-on $on --json "$OUT/unsloth_qlora_${on}_$tag.json" --profile "$OUT/unsloth_qlora_${on}_${tag}_profile.txt"
        done
        PYTHONPATH=$(with $sets) python3 examples/unsloth_qlora.py --steps 5 --lora-on all --no-graph-moe \
          --json "$OUT/unsloth_alone_qlora_all_$tag.json"
      fi ;;
    unsloth517) if [ -n "${SMOKE:-}" ]; then echo "skipped: Unsloth needs CUDA"; else
                  PYTHONPATH=$(with bnb unsloth) python3 benchmarks/gpu/unsloth_report.py > "$OUT/unsloth_tf517.txt" 2>&1
                  tail -20 "$OUT/unsloth_tf517.txt"; fi ;;
    *) echo "unknown phase: $phase" ;;
  esac
  exec 1>&3 2>&4
  tar cf "$FINAL/results.tar" -C "$OUT" .
done
