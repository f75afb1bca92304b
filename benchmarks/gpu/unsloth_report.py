"""Real Unsloth on the machine's transformers 5.x: what graph_moe.install reports for Unsloth's Qwen3-MoE blocks.

Unsloth's import patches transformers' classes (unsloth_zoo.temporary_patches: on 5.x, Qwen3MoeExperts.forward and a
compiler-disabled Qwen3MoeSparseMoeBlock.forward); FastLanguageModel then loads a model saved from a config."""

import json
import os
import tempfile

import unsloth  # noqa: F401  (first: its patches apply at import)
import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import graph_moe

config = Qwen3MoeConfig(vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        num_experts=8, num_experts_per_tok=2)
torch.manual_seed(0)
model = Qwen3MoeForCausalLM(config).to("cuda", torch.bfloat16)
experts = model.model.layers[0].mlp.experts
print("transformers", transformers.__version__, "| experts forward:", type(experts).forward.__module__,
      type(experts).forward.__qualname__)
print("block forward:", type(model.model.layers[0].mlp).forward.__module__)
report = graph_moe.install(model)
print(report)
result = {"transformers": transformers.__version__, "lines": [(b.path, b.class_name, b.status) for b in report.blocks]}

try:  # the way Unsloth users load: FastLanguageModel on a saved model (its compiled-module regeneration included)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from unsloth import FastLanguageModel

    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2").save_pretrained(folder)
    loaded, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=False, dtype=torch.bfloat16)
    report = graph_moe.install(loaded)
    print(report)
    result["fast_language_model"] = [(b.path, b.class_name, b.status) for b in report.blocks]
except Exception as e:  # noqa: BLE001 (a report of what happened, not a test)
    print("FastLanguageModel path failed:", type(e).__name__, e)
    result["fast_language_model_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(result))
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "unsloth_tf517.json"), "w") as f:
        json.dump(result, f, indent=1)
