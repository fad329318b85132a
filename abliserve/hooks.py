"""Ablation as forward hooks on a Hugging Face causal LM, one strength and slot per batch row.

Used by the transformers engine (mixed requests in one batch), by direction selection (every row
at one candidate) and by tests as the reference for the vLLM op. Each writer's output is
projected exactly once, at the writer, so strengths other than 1 keep their meaning
(docs/MATHS.md: re-projecting the stream at every layer would compound to (1 - alpha)^k). Which
modules are writers is :mod:`abliserve.architectures`' business.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from abliserve.architectures import WriterSpec, find_decoder, writer_layout
from abliserve.bank import DirectionBank
from abliserve.projection import ablate


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that owns the embedding and the decoder layers."""
    return find_decoder(model)[1]


class AblationHooks(AbstractContextManager):
    """Install per-row ablation on every writer of ``model``; removed on exit.

    Set the rows before each forward with :meth:`set_rows`: ``slots`` [batch] picks each row's
    direction from the bank (0 = none), ``strengths`` [batch] its alpha.
    """

    def __init__(
        self, model: nn.Module, bank: DirectionBank, writers: WriterSpec | None = None
    ) -> None:
        self.layout = writer_layout(model, writers)
        if bank.directions.shape[1] != len(self.layout.sites):
            raise ValueError(
                f"direction bank has {bank.directions.shape[1]} sites, "
                f"model has {len(self.layout.sites)}"
            )
        parameter = next(model.parameters())
        self.bank = bank.to(parameter.device)
        self._row_directions: torch.Tensor | None = None  # [batch, sites, hidden]
        self._row_alphas: torch.Tensor | None = None  # [batch, sites]
        self._handles = [
            module.register_forward_hook(self._hook(index))
            for index, site in enumerate(self.layout.sites)
            for module in site.modules
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
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._row_directions is None:
                return None
            assert self._row_alphas is not None
            # Attention modules (and MoE blocks in some versions) return (hidden, extras...).
            hidden = output[0] if isinstance(output, tuple) else output
            batch = self._row_directions.shape[0]
            if hidden.dim() != 3 or hidden.shape[0] not in (1, batch):
                raise RuntimeError(
                    f"ablation hook at site {site} got output {tuple(hidden.shape)}, expected "
                    f"[{batch}, tokens, hidden]"
                )
            direction = self._row_directions[:, site][:, None, :]  # [batch, 1, hidden]
            alpha = self._row_alphas[:, site][:, None]  # [batch, 1]
            # A [1, tokens, hidden] output shared by all rows (GPT-2's position embedding)
            # broadcasts to one ablated copy per row; the stream adds it per row either way.
            return _replace_first(output, ablate(hidden, direction, alpha))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _replace_first(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
