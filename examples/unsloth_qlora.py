"""QLoRA fine-tuning of a Qwen3-MoE model through Unsloth, with graph_moe (needs a CUDA GPU and `unsloth`).

The model is built from a config with random weights and saved with a small local tokenizer, then loaded the
way Unsloth users load a checkpoint: `FastLanguageModel.from_pretrained(..., load_in_4bit=True)`, LoRA on the
attention and on every expert projection with `FastLanguageModel.get_peft_model`. One call,
`graph_moe.integrations.unsloth.enable()`, made before loading, puts graph_moe on every MoE block after each
Unsloth load. `--no-graph-moe` runs the same steps with Unsloth alone.

    python examples/unsloth_qlora.py --steps 6 --json unsloth_graph_moe.json
    python examples/unsloth_qlora.py --steps 6 --no-graph-moe --json unsloth_alone.json
"""

import argparse
import json
import logging
import os
import tempfile
import time


def save_model_and_tokenizer(path, args):
    """A Qwen3-MoE causal LM from a config (random weights) and a WordLevel tokenizer, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from graph_moe.tools.model_zoo import build_model

    model = build_model("qwen3_moe", layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                        intermediate=args.intermediate, vocab=args.vocab, dtype=torch.bfloat16, seed=0)
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, args.vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-graph-moe", action="store_true", help="Unsloth alone (its own grouped forward where it applies)")
    p.add_argument("--whole-4bit-stacks", action="store_true",
                   help="graph_moe dequantizes all 4-bit experts of a projection at once (low_memory_4bit=False)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-on", default="all", choices=["all", "attention"],
                   help="all: attention and every expert projection; attention: frozen 4-bit experts (where "
                        "Unsloth alone uses its own grouped forward)")
    p.add_argument("--json", default=None, help="write the losses and step times here")
    p.add_argument("--profile", default=None,
                   help="after the steps, profile one more and write torch.profiler's table (by GPU time) here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    if not args.no_graph_moe:
        from graph_moe.integrations import unsloth as graph_moe_unsloth

        # before loading: Unsloth's loaders now end with graph_moe's install
        graph_moe_unsloth.enable(low_memory_4bit=not args.whole_4bit_stacks)
    from unsloth import FastLanguageModel  # noqa: E402  (Unsloth wants to be imported before transformers)
    import torch

    import graph_moe

    with tempfile.TemporaryDirectory() as path:
        save_model_and_tokenizer(path, args)
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=args.seq, load_in_4bit=True,
                                                     dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, random_state=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        + (["gate_proj", "up_proj", "down_proj"] if args.lora_on == "all" else []),
        use_gradient_checkpointing="unsloth")
    report = getattr(model, "_graph_moe_install_report", None)
    if report is not None:
        print(report)

    torch.manual_seed(0)
    ids = torch.randint(2, args.vocab, (args.batch, args.seq), device="cuda")
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    model.train()
    losses, times = [], []
    for step in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"step {step}: loss {losses[-1]:.5f}, {times[-1] * 1e3:.1f} ms", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90))
    steady = sorted(times[2:])[len(times[2:]) // 2] if len(times) > 2 else times[-1]
    result = {"graph_moe": not args.no_graph_moe, "losses": losses, "step_s": times, "steady_step_ms": steady * 1e3,
              "counters": graph_moe.counter_snapshot(), "card": torch.cuda.get_device_name(),
              "torch": torch.__version__, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
              "cache_dir_exists": os.path.isdir("unsloth_compiled_cache"), "args": vars(args)}
    import transformers
    import unsloth

    result.update(transformers=transformers.__version__, unsloth=unsloth.__version__)
    print("graph_moe counters:", result["counters"])
    print(f"steady step {result['steady_step_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
