"""Where each architecture writes into its residual stream: the one description of writers.

An artifact has 2L + 1 logical sites (docs/ARCHITECTURES.md): site 0 is the embedding, then an
attention site and an MLP site per decoder layer. Each site maps to the module(s) whose OUTPUT is
added to the stream, found by one rule that holds on transformers' and vLLM's module trees alike:

* the **decoder** is the first module holding both an embedding and the list of decoder layers;
* **site 0** is every embedding child of the decoder (``embed_tokens``; GPT-2's ``wte`` and
  ``wpe``): each one's output is added, so each is projected (projection is linear). A scalar
  applied afterwards (Gemma's sqrt(hidden)) commutes with the projection;
* **attention / MLP sites** are found in each layer's attention and MLP branch: a sparse MoE
  block (a branch with ``experts``) is hooked whole, since its output (routed experts plus any
  shared expert, after gating) is linear in the experts' outputs; a dense branch's writer is its
  output projection (``o_proj``, ``down_proj``, GPT-2's ``c_proj``, GPT-NeoX's ``dense``...), bias
  included since outputs are projected. Parallel attention/MLP blocks (GPT-NeoX, GPT-J) simply
  have both branches writing;
* unless the branch output passes through a **post-norm** first (Gemma 2/3, OLMo 2: a per-channel
  gain sits between the projection and the add), in which case the post-norm's output is the
  writer. ``post_attention_layernorm`` means a post-norm only in layers that also have a
  ``post_feedforward_layernorm``; elsewhere (Llama naming) it is the MLP's input norm.

The rule is checked at start by :mod:`abliserve.selfcheck` on every model, so a layout it gets
wrong is refused, never served silently. Operators can name writers themselves
(:class:`WriterSpec`, the ``--writers`` flag) for architectures outside
:data:`SUPPORTED_ARCHITECTURES`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from abliserve.errors import UserError

# Checkpoint ``architectures`` entries whose layout the rule resolves and that the coverage
# table (docs/ARCHITECTURES.md) checks; anything else needs --writers.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "GptOssForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
)
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
# Last path component of the linear maps that write a dense branch's output.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "w2")
SPARSE_BLOCK_CHILD = "experts"
MLP_POST_NORM = "post_feedforward_layernorm"
ATTENTION_POST_NORM = "post_attention_layernorm"
KINDS = ("embed", "attn", "mlp")


class ArchitectureError(UserError):
    """The model's residual-stream writers cannot be resolved (or were named wrongly)."""


@dataclass(frozen=True)
class WriterSite:
    """One logical site: the modules whose outputs are added to the stream for it."""

    kind: str  # "embed", "attn" or "mlp"
    layer: int  # decoder layer, -1 for the embedding
    names: tuple[str, ...]  # module paths from the model root
    modules: tuple[nn.Module, ...]
    # Where the writer is a post-norm: the branch it normalises (what export can edit).
    normalised_branch: nn.Module | None = None


@dataclass(frozen=True)
class WriterLayout:
    """All 2L + 1 sites of a model in canonical order, and its decoder layers (the residual
    stream is each layer's output)."""

    sites: tuple[WriterSite, ...]
    layers: tuple[nn.Module, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class WriterSpec:
    """Writers named by the operator: module paths from the model root, ``{i}`` the layer;
    several embedding writers joined by ``+``. Text form: ``embed=a+b,attn=...,mlp=...``."""

    embed: tuple[str, ...]
    attn: str
    mlp: str

    @classmethod
    def parse(cls, text: str) -> WriterSpec:
        parts = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in KINDS or not value or key in parts:
                raise ArchitectureError(
                    f"--writers must be embed=PATH[+PATH],attn=PATH,mlp=PATH with {{i}} for the "
                    f"layer, got {text!r}"
                )
            parts[key] = value
        if set(parts) != set(KINDS) or not all("{i}" in parts[k] for k in ("attn", "mlp")):
            raise ArchitectureError(
                f"--writers needs embed=, attn= and mlp= (attn and mlp with {{i}}), got {text!r}"
            )
        return cls(tuple(parts["embed"].split("+")), parts["attn"], parts["mlp"])

    def __str__(self) -> str:
        return f"embed={'+'.join(self.embed)},attn={self.attn},mlp={self.mlp}"


def add_writers_flag(parser: argparse.ArgumentParser) -> None:
    """``--writers``, shared by ``serve`` and the ``directions`` commands."""
    parser.add_argument(
        "--writers",
        type=_parse_writers_flag,
        metavar="embed=PATH[+PATH],attn=PATH,mlp=PATH",
        help="residual-stream writer modules (paths from the model root, {i} = layer) for an "
        "architecture abliserve does not know; checked at start",
    )


def _parse_writers_flag(text: str) -> WriterSpec:
    try:
        return WriterSpec.parse(text)
    except ArchitectureError as error:  # argparse reports its own errors (usage, exit 2)
        raise argparse.ArgumentTypeError(str(error)) from None


def check_supported(architectures: Sequence[str], spec: WriterSpec | None) -> None:
    """Refuse, in one line, a checkpoint whose architecture the rule is not checked on, unless
    the operator named its writers."""
    if spec is not None or any(name in SUPPORTED_ARCHITECTURES for name in architectures):
        return
    raise ArchitectureError(
        f"architecture {', '.join(architectures) or '(none in config.json)'} is not supported "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); name its residual-stream writers "
        "with --writers embed=PATH,attn=PATH{i},mlp=PATH{i}"
    )


def check_checkpoint(checkpoint: Path, spec: WriterSpec | None) -> None:
    """:func:`check_supported` for a checkpoint folder (its config.json ``architectures``)."""
    config = json.loads((checkpoint / "config.json").read_text())
    check_supported(config.get("architectures") or [], spec)


def writer_layout(model: nn.Module, spec: WriterSpec | None = None) -> WriterLayout:
    """The writers of a transformers or vLLM model, by the rule or by ``spec``."""
    if spec is not None:
        return _named_layout(model, spec)
    decoder_name, decoder, layers_name, layers = find_decoder(model)
    prefix = f"{decoder_name}." if decoder_name else ""
    embeddings = [name for name, child in decoder.named_children() if _is_embedding(child)]
    sites = [
        WriterSite(
            "embed",
            -1,
            tuple(prefix + name for name in embeddings),
            tuple(decoder.get_submodule(name) for name in embeddings),
        )
    ]
    for index, layer in enumerate(layers):
        layer_prefix = f"{prefix}{layers_name}.{index}."
        for kind, names in (("attn", ATTENTION_NAMES), ("mlp", MLP_NAMES)):
            name, branch = _branch_writer(layer, kind, names, type(model).__name__)
            module = layer.get_submodule(name)
            normalised = layer.get_submodule(branch) if branch is not None else None
            sites.append(WriterSite(kind, index, (layer_prefix + name,), (module,), normalised))
    return WriterLayout(tuple(sites), tuple(layers))


def find_decoder(model: nn.Module) -> tuple[str, nn.Module, str, nn.ModuleList]:
    """(path, decoder, layer-list name, layers): the first module with an embedding child and a
    list of decoder layers (language model first in multimodal checkpoints)."""
    found = []
    for path, module in model.named_modules():
        lists = [(n, c) for n, c in module.named_children() if isinstance(c, nn.ModuleList)]
        if lists and any(_is_embedding(child) for child in module.children()):
            name, layers = max(lists, key=lambda item: len(item[1]))
            found.append((path, module, name, layers))
    if not found:
        raise ArchitectureError(
            f"{type(model).__name__} has no decoder (a module holding an embedding and a list of "
            "layers); name its writers with --writers"
        )
    return next((f for f in found if "language_model" in f[0]), found[0])


def residual_layers(model: nn.Module) -> tuple[nn.Module, ...]:
    """Decoder layers in order: the residual stream enters each and is each one's output."""
    return tuple(find_decoder(model)[3])


def _is_embedding(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    is_embedding_class = isinstance(module, nn.Embedding) or type(module).__name__.endswith(
        "Embedding"
    )
    return is_embedding_class and isinstance(weight, nn.Parameter) and weight.dim() == 2


def _branch_writer(
    layer: nn.Module, kind: str, names: Sequence[str], model_name: str
) -> tuple[str, str | None]:
    """(writer path in the layer, the branch a post-norm writer normalises, else None)."""
    children = dict(layer.named_children())
    branch = next((name for name in names if name in children), None)
    if branch is None:
        raise ArchitectureError(
            f"{model_name}: decoder layer {type(layer).__name__} has no {kind} branch named "
            f"{' / '.join(names)}; name its writers with --writers"
        )
    post_norm = {"attn": ATTENTION_POST_NORM, "mlp": MLP_POST_NORM}[kind]
    if MLP_POST_NORM in children and post_norm in children:
        return post_norm, branch
    branch_children = dict(children[branch].named_children())
    if SPARSE_BLOCK_CHILD in branch_children:
        return branch, None
    projection = next((n for n in OUTPUT_PROJECTIONS if n in branch_children), None)
    if projection is None:
        raise ArchitectureError(
            f"{model_name}: {branch} of {type(layer).__name__} has no output projection named "
            f"{' / '.join(OUTPUT_PROJECTIONS)} and no {SPARSE_BLOCK_CHILD}; name its writers "
            "with --writers"
        )
    return f"{branch}.{projection}", None


def _named_layout(model: nn.Module, spec: WriterSpec) -> WriterLayout:
    def resolve(path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise ArchitectureError(
                f"--writers names {path!r}, which {type(model).__name__} does not have"
            ) from None

    sites = [WriterSite("embed", -1, spec.embed, tuple(resolve(p) for p in spec.embed))]
    layers = residual_layers(model)
    for index in range(len(layers)):
        for kind, template in (("attn", spec.attn), ("mlp", spec.mlp)):
            path = template.replace("{i}", str(index))
            sites.append(WriterSite(kind, index, (path,), (resolve(path),)))
    return WriterLayout(tuple(sites), layers)
