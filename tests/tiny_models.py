"""Tiny randomly initialised chat models (float32, CPU, milliseconds per forward) for the
directions tests: two architectures, plus the variants the exporter must get right (a tied
embedding, biases on the writers). A word-level tokenizer with a chat template makes them
usable by the CLI as ordinary checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "I",
    "As",
    "Sure",
    "Here",
    "how",
    "to",
    "make",
    "a",
    "cake",
    "bomb",
    "write",
    "poem",
    "hack",
    "bank",
    "steal",
    "money",
    "tell",
    "me",
    "about",
    "the",
    "weather",
    "explain",
    "photosynthesis",
    "please",
    "give",
    "instructions",
    "for",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }} {{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
SPECIALS = ("<unk>", "<pad>", "<|end|>", "<|start|>", "user", "assistant", "system")

VARIANTS = {
    "llama": {"tie_word_embeddings": False},
    "llama-tied-bias": {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    "qwen2": {"tie_word_embeddings": False},
    "qwen2-tied": {"tie_word_embeddings": True},
}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIALS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<|start|>", "<|end|>", "<pad>", "<unk>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|end|>",
        chat_template=CHAT_TEMPLATE,
    )


def model(variant: str, num_layers: int = 3, hidden: int = 32, seed: int = 0):
    """A random model of ``variant``; biases (where present) are random too, not zero."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = Qwen2Config if variant.startswith("qwen2") else LlamaConfig
    config = config_class(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
        eos_token_id=2,
        **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
            elif parameter.dim() == 2:
                parameter.normal_(0, 0.2)  # larger than the default init: a stream worth ablating
    return net


def checkpoint(folder: Path, variant: str = "llama", **kwargs) -> Path:
    """Save a tiny model and its tokenizer as a checkpoint folder the CLI accepts."""
    model(variant, **kwargs).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def random_directions(num_sites: int, hidden: int, seed: int = 1) -> torch.Tensor:
    """One random unit direction per site [num_sites, hidden]."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_sites, hidden, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True)


# One tiny config per architecture family the writer rule must get right (docs/ARCHITECTURES.md).
_DECODER = {
    "vocab_size": len(SPECIALS) + len(WORDS),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    # One head of 64: the smallest vLLM's CPU attention takes, and hidden / heads (vLLM's Qwen2
    # ignores head_dim).
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 128,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "bos_token_id": 3,
    "tie_word_embeddings": False,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
ARCHITECTURE_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": ("Gemma2Config", {"tie_word_embeddings": True}),  # as every Gemma (vLLM: must)
    "gemma3": ("Gemma3TextConfig", {"tie_word_embeddings": True}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {**_MOE, "num_experts": 4}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": ("GPT2Config", None),
    "gpt_neox": ("GPTNeoXConfig", {"use_parallel_residual": True, "rotary_pct": 0.5}),
}


def architecture_config(name: str):
    import transformers

    class_name, extra = ARCHITECTURE_CONFIGS[name]
    config_class = getattr(transformers, class_name)
    if extra is None:  # GPT-2's own field names
        return config_class(
            vocab_size=_DECODER["vocab_size"],
            n_embd=64,
            n_layer=2,
            n_head=1,
            n_positions=128,
            bos_token_id=3,
            eos_token_id=2,
            pad_token_id=1,
            tie_word_embeddings=False,
        )
    fields = dict(_DECODER)
    if name == "gpt_neox":
        fields.pop("head_dim")
        fields.pop("num_key_value_heads")
    return config_class(**{**fields, **extra})


def architecture_model(name: str, seed: int = 0):
    """A random float32 model of architecture ``name`` with EVERY parameter random, norm gains
    included: uniform gains would hide a writer hooked before a post-norm."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(
        architecture_config(name), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for parameter_name, parameter in net.named_parameters():
            if parameter.dim() == 1 and not parameter_name.endswith("bias"):
                parameter.uniform_(0.3, 1.7)  # norm gains (and Gemma's 1 + w offsets)
            elif parameter.dim() == 1:
                parameter.normal_(0, 0.1)
            else:
                parameter.normal_(0, 0.2)
    return net


def architecture_checkpoint(folder: Path, name: str, seed: int = 0) -> Path:
    """Save a tiny model of architecture ``name`` and the word-level tokenizer."""
    architecture_model(name, seed).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
