"""The ablation adapter as a llama.cpp LoRA GGUF (``export --format lora-gguf``).

llama.cpp scales an adapter per request by ``scale * lora_alpha / r``, so an adapter exported at
strength 1 and served with scale s is the ablation at strength s: a continuous strength per
request without abliserve. The tensors are the PEFT adapter's, named the way llama.cpp's own
``convert_lora_to_gguf.py`` names them (GGUF tensor names from the ``gguf`` package's map,
``.lora_a`` / ``.lora_b``; the embedding's A transposed, as llama.cpp's embedding path expects).
"""

from __future__ import annotations

from pathlib import Path

import gguf

from abliserve.directions.errors import DirectionError
from abliserve.directions.lora import PEFT_PREFIX, Adapter

# llama.cpp runs Mistral checkpoints as its llama architecture.
GGUF_ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
PEFT_SUFFIXES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_embedding_A": "lora_a",
    ".lora_embedding_B": "lora_b",
}


def check_gguf_strength(alpha: float) -> None:
    """llama.cpp reads ``lora_alpha`` 0 as "no alpha" (scale unchanged), not as strength 0."""
    if alpha == 0.0:
        raise DirectionError(
            "--strength 0 cannot be written as a GGUF adapter (llama.cpp reads lora_alpha 0 as "
            "'no alpha' and would apply the full adapter); export at --strength 1 and set the "
            "strength per request with llama.cpp's LoRA scale"
        )


def write_gguf(adapter: Adapter, alpha: float, path: Path) -> None:
    """Write ``adapter`` at strength ``alpha`` as a llama.cpp LoRA adapter file."""
    arch = GGUF_ARCHITECTURES[adapter.model_type]
    names = gguf.get_tensor_name_map(arch, adapter.num_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, tensor in adapter.tensors.items():
        suffix = next(s for s in PEFT_SUFFIXES if key.endswith(s))
        module = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
        base = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if base is None:
            raise DirectionError(f"no GGUF tensor name for {module} in {adapter.model_type}")
        data = tensor.T if key.endswith(".lora_embedding_A") else tensor
        writer.add_tensor(f"{base}.{PEFT_SUFFIXES[suffix]}", data.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
