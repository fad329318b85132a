"""Ablation as forward hooks on a Hugging Face causal LM, one strength and slot per batch row.

Used by the transformers engine (mixed requests in one batch), by direction selection (every row
at one candidate) and by tests as the reference for the vLLM op. Each writer's output is
projected exactly once, at the writer, so strengths other than 1 keep their meaning
(docs/MATHS.md: re-projecting the stream at every layer would compound to (1 - alpha)^k).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from abliserve.bank import DirectionBank
from abliserve.projection import ablate, site_names


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that owns ``embed_tokens`` and ``layers`` (Llama, Qwen2/3, Mistral, Gemma)."""
    for candidate in (getattr(model, "model", None), model):
        if candidate is None:
            continue
        language_model = getattr(candidate, "language_model", None)
        for module in (language_model, candidate):
            if module is not None and hasattr(module, "embed_tokens") and hasattr(module, "layers"):
                return module
    raise ValueError(f"{type(model).__name__} has no decoder with embed_tokens and layers")


def writer_modules(model: nn.Module) -> list[nn.Module]:
    """The residual-stream writers of ``model`` in canonical site order."""
    decoder = decoder_of(model)
    names = site_names(len(decoder.layers))
    try:
        return [decoder.get_submodule(name) for name in names]
    except AttributeError as error:
        raise ValueError(
            f"{type(model).__name__} does not have the writer modules abliserve ablates "
            f"(embed_tokens, self_attn.o_proj, mlp.down_proj): {error}"
        ) from None


class AblationHooks(AbstractContextManager):
    """Install per-row ablation on every writer of ``model``; removed on exit.

    Set the rows before each forward with :meth:`set_rows`: ``slots`` [batch] picks each row's
    direction from the bank (0 = none), ``strengths`` [batch] its alpha.
    """

    def __init__(self, model: nn.Module, bank: DirectionBank) -> None:
        self.modules = writer_modules(model)
        if bank.directions.shape[1] != len(self.modules):
            raise ValueError(
                f"direction bank has {bank.directions.shape[1]} sites, "
                f"model has {len(self.modules)}"
            )
        parameter = next(model.parameters())
        self.bank = bank.to(parameter.device)
        self._row_directions: torch.Tensor | None = None  # [batch, sites, hidden]
        self._row_alphas: torch.Tensor | None = None  # [batch, sites]
        self._handles = [
            module.register_forward_hook(self._hook(index))
            for index, module in enumerate(self.modules)
        ]

    def set_rows(self, slots: torch.Tensor, strengths: torch.Tensor) -> None:
        slots = slots.to(self.bank.directions.device, torch.long)
        strengths = strengths.to(self.bank.directions.device, torch.float32)
        if bool((strengths == 0).all()):
            self._row_directions = self._row_alphas = None  # baseline batch: hooks are no-ops
            return
        self._row_directions = self.bank.directions[slots]
        self._row_alphas = strengths[:, None] * self.bank.weights[slots]

    def set_uniform(self, slot: int, strength: float, batch_size: int) -> None:
        self.set_rows(torch.full((batch_size,), slot), torch.full((batch_size,), strength))

    def _hook(self, site: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._row_directions is None:
                return None
            assert self._row_alphas is not None
            if output.dim() != 3 or output.shape[0] != self._row_directions.shape[0]:
                raise RuntimeError(
                    f"ablation hook at site {site} got output {tuple(output.shape)}, expected "
                    f"[{self._row_directions.shape[0]}, tokens, hidden]"
                )
            direction = self._row_directions[:, site][:, None, :]  # [batch, 1, hidden]
            alpha = self._row_alphas[:, site][:, None]  # [batch, 1]
            return ablate(output, direction, alpha)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
