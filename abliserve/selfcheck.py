"""The start-up self-check: at strength 1 the residual stream keeps no component along the
direction, at any layer — on every model, whichever way its writers were found.

One random unit direction at every site, one short probe prompt, hooks on the decoder layers'
outputs. Exact ablation of every writer leaves only rounding (float32: ~1e-7 of |h|); a writer
the layout missed (a projection hooked before a norm with per-channel gains, say) leaves a
component as large as an unablated stream's, ~1/sqrt(hidden). The check compares the two, so one
tolerance serves every width; 16-bit models round more, and get a looser one.
"""

from __future__ import annotations

import torch
from torch import nn

from abliserve.architectures import ArchitectureError, WriterSpec, writer_layout
from abliserve.bank import DirectionBank
from abliserve.hooks import AblationHooks

PROBE_TOKENS = 12
# Largest allowed ablated / unablated |h . r| / |h| at any layer.
TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 0.1


@torch.inference_mode()
def residual_components(
    model: nn.Module, direction: torch.Tensor, strength: float, writers: WriterSpec | None = None
) -> torch.Tensor:
    """Largest |h . r| / |h| over probe tokens of the stream after the embedding and after each
    decoder layer [L + 1], with ``direction`` ablated at every site at ``strength``."""
    layout = writer_layout(model, writers)
    parameter = next(model.parameters())
    sites = len(layout.sites)
    bank = DirectionBank(
        names=["probe"],
        directions=torch.stack(
            [torch.zeros(sites, direction.numel()), direction.expand(sites, -1)]
        ),
        weights=torch.tensor([[0.0] * sites, [1.0] * sites]),
    )
    streams: list[torch.Tensor] = []

    def entering(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not streams:
            streams.append(args[0] if args else kwargs["hidden_states"])

    def leaving(module: nn.Module, args: tuple, output: object) -> None:
        streams.append(output[0] if isinstance(output, tuple) else output)

    handles = [layout.layers[0].register_forward_pre_hook(entering, with_kwargs=True)]
    handles += [layer.register_forward_hook(leaving) for layer in layout.layers]
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator).to(parameter.device)
    try:
        with AblationHooks(model, bank, writers) as hooks:
            hooks.set_uniform(1, strength, 1)
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    r = direction.to(parameter.device, torch.float64)
    return torch.stack(
        [((h.double() @ r).abs() / h.double().norm(dim=-1)).max() for h in streams]
    ).cpu()


def check_writers(model: nn.Module, writers: WriterSpec | None = None) -> None:
    """Refuse a model whose writers, ablated at strength 1, leave the direction in its stream."""
    hidden = model.get_input_embeddings().weight.shape[1]
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    direction = direction / direction.norm()
    ablated = residual_components(model, direction, 1.0, writers)
    baseline = residual_components(model, direction, 0.0, writers)
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    ratio = ablated / baseline.clamp_min(1e-12)
    for index, value in enumerate(ratio.tolist()):
        if value > tolerance:
            where = "the embedding" if index == 0 else f"decoder layer {index - 1}"
            layout = writer_layout(model, writers)
            site = layout.sites[0 if index == 0 else 2 * index]
            raise ArchitectureError(
                f"self-check failed: after {where} the residual stream keeps "
                f"{float(ablated[index]):.2g} of |h| along the ablated direction (unablated "
                f"{float(baseline[index]):.2g}); the writers up to {', '.join(site.names)} do "
                "not capture everything added to the stream; fix --writers"
            )
