"""MoE causal LMs built from transformers configs with random weights (nothing is downloaded).

Used by the demo, `graph-moe dump/explain`, the benchmark and the tests.
"""

from __future__ import annotations

import json
import os

import torch

FAMILIES = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral")


def make_config(family: str, *, layers=2, experts=8, top_k=2, hidden=64, intermediate=128, vocab=256, **extra):
    """A transformers config of `family` at the given sizes (a config.json path works too)."""
    import transformers as tf

    if os.path.exists(family):
        with open(family) as f:
            data = json.load(f)
        return tf.AutoConfig.for_model(data.pop("model_type"), **data)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)
    if family == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=intermediate, num_experts=experts,
                              num_experts_per_tok=top_k, **extra)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=intermediate, moe_intermediate_size=intermediate,
                                 num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
                                 head_dim=hidden // 4, **extra)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=intermediate, moe_intermediate_size=intermediate,
                                 shared_expert_intermediate_size=intermediate, num_experts=experts,
                                 num_experts_per_tok=top_k, decoder_sparse_step=1, **extra)
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts,
                                num_experts_per_tok=top_k, **extra)
    raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES} or a config.json path")


def add_shape_arguments(parser) -> None:
    """The benchmarks' model-shape options, Qwen3-30B-A3B's dims by default: --layers --num-experts --top-k --hidden
    --intermediate --vocab (read back by `shape_config`)."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=4096)


def shape_config(args):
    """The Qwen3-MoE config of the options `add_shape_arguments` added."""
    return make_config("qwen3_moe", layers=args.layers, experts=args.num_experts, top_k=args.top_k,
                       hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)


def expert_lora_targets() -> dict:
    """`LoraConfig` keywords that put LoRA on every expert projection of the installed transformers: its modules on
    4.x, its 3D expert parameters (PEFT target_parameters) on 5.x."""
    import transformers as tf

    if int(tf.__version__.split(".")[0]) >= 5:
        return dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return dict(target_modules=["gate_proj", "up_proj", "down_proj"])


def build_model(family: str = "olmoe", *, dtype=torch.bfloat16, seed: int = 0, device="cpu", **sizes):
    """A causal LM of `family` with random weights, in `dtype`, on `device`."""
    import transformers as tf

    torch.manual_seed(seed)
    config = make_config(family, **sizes)
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype)


def word_tokenizer(vocab: int = 256):
    """A word-level tokenizer over a `vocab`-token model: words "w0" ... "w{vocab-4}", then pad, eos, unk (built here,
    nothing downloaded), for trainers that want a tokenizer (TRL)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 3)} | {"<pad>": vocab - 3, "<eos>": vocab - 2, "<unk>": vocab - 1}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                      unk_token="<unk>")


def word_texts(count: int, words: int, vocab: int = 256, generator: torch.Generator | None = None) -> list[str]:
    """`count` random texts of `words` words of `word_tokenizer(vocab)`."""
    ids = torch.randint(0, vocab - 3, (count, words), generator=generator)
    return [" ".join(f"w{i}" for i in row) for row in ids.tolist()]
