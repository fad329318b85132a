"""The ablation maths on tiny random models of two architectures (docs/MATHS.md, Invariants):
alpha 0 is the untouched model, hooks at alpha equal weights orthogonalised at alpha, full
ablation leaves no component along the direction, and each writer is projected exactly once."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VARIANTS, model, random_directions

from abliserve.bank import DirectionBank
from abliserve.directions.export import orthogonalise_model
from abliserve.hooks import AblationHooks, decoder_of
from abliserve.projection import ablate, site_names

NUM_LAYERS, HIDDEN = 3, 32
SITES = len(site_names(NUM_LAYERS))
TOKENS = torch.tensor([[3, 4, 11, 12, 13, 14, 15, 2, 3, 5], [3, 4, 16, 17, 18, 19, 20, 2, 3, 5]])


def bank(directions: torch.Tensor, weights: torch.Tensor) -> DirectionBank:
    return DirectionBank(
        ["d"],
        torch.stack([torch.zeros_like(directions), directions]),
        torch.stack([torch.zeros_like(weights), weights]),
    )


def per_site_bank() -> DirectionBank:
    """A different direction and weight at every site (the per-layer case)."""
    weights = torch.linspace(0.2, 1.3, SITES)
    return bank(random_directions(SITES, HIDDEN), weights)


def single_bank(seed: int = 3) -> DirectionBank:
    """One direction at every site, weight 1 (Arditi et al.)."""
    direction = random_directions(1, HIDDEN, seed=seed).expand(SITES, HIDDEN).contiguous()
    return bank(direction, torch.ones(SITES))


def logits(net, hooks: AblationHooks | None = None, strengths: list[float] | None = None):
    if hooks is not None:
        hooks.set_rows(torch.ones(len(TOKENS), dtype=torch.long), torch.tensor(strengths))
    with torch.no_grad():
        return net(TOKENS).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_alpha_zero_is_exactly_the_model(variant: str) -> None:
    net = model(variant)
    reference = logits(net)
    with AblationHooks(net, per_site_bank()) as hooks:
        assert torch.equal(logits(net, hooks, [0.0, 0.0]), reference)
        # A zero-strength row in a batch whose other row is ablated is still untouched.
        mixed = logits(net, hooks, [0.0, 1.0])
    assert torch.equal(mixed[0], reference[0])
    assert not torch.allclose(mixed[1], reference[1])
    assert torch.equal(logits(net), reference)  # hooks removed on exit


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_hooks_equal_orthogonalised_weights(variant: str, alpha: float) -> None:
    net = model(variant)
    directions = per_site_bank()
    baked = copy.deepcopy(net)
    orthogonalise_model(baked, directions.directions[1], directions.weights[1], alpha)
    with AblationHooks(net, directions) as hooks:
        hooked = logits(net, hooks, [alpha, alpha])
    torch.testing.assert_close(logits(baked), hooked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(hooked, logits(net), atol=1e-3)


def residual_streams(net) -> list[torch.Tensor]:
    """The stream entering every decoder layer and the final norm, [batch, tokens, hidden]."""
    decoder = decoder_of(net)
    streams: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        streams.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [
        m.register_forward_pre_hook(capture, with_kwargs=True)
        for m in (*decoder.layers, decoder.norm)
    ]
    try:
        with torch.no_grad():
            net(TOKENS)
    finally:
        for handle in handles:
            handle.remove()
    return streams


@pytest.mark.parametrize("variant", ["llama-tied-bias", "qwen2"])
def test_full_ablation_leaves_no_component_along_the_direction(variant: str) -> None:
    net = model(variant)
    directions = single_bank()
    r = directions.directions[1, 0]
    with AblationHooks(net, directions) as hooks:
        hooks.set_uniform(1, 1.0, len(TOKENS))
        streams = residual_streams(net)
    assert len(streams) == NUM_LAYERS + 1
    for stream in streams:
        component = (stream @ r).abs()
        assert float(component.max()) <= 1e-5 * float(stream.norm(dim=-1).max())


def test_each_writer_is_projected_once() -> None:
    """At alpha 0.5, re-projecting the accumulated stream before every layer (the notebook
    mistake) compounds the strength; ours must match the baked weights and differ from it."""
    alpha = 0.5
    net = model("llama")
    directions = single_bank()
    r = directions.directions[1, 0]
    baked = copy.deepcopy(net)
    orthogonalise_model(baked, directions.directions[1], directions.weights[1], alpha)

    decoder = decoder_of(net)

    def reproject(module, args, kwargs):
        stream = args[0] if args else kwargs["hidden_states"]
        stream = ablate(stream, r, alpha)
        if args:
            return (stream, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": stream}

    handles = [
        m.register_forward_pre_hook(reproject, with_kwargs=True)
        for m in (*decoder.layers, decoder.norm)
    ]
    try:
        reprojected = logits(net)
    finally:
        for handle in handles:
            handle.remove()
    with AblationHooks(net, directions) as hooks:
        ours = logits(net, hooks, [alpha, alpha])
        # Hand-computed reference at the first writer: the embedding's r-component is halved.
        streams = residual_streams(net)
    embedded = decoder.embed_tokens(TOKENS)
    torch.testing.assert_close(streams[0] @ r, (1 - alpha) * (embedded @ r), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, logits(baked), rtol=1e-4, atol=1e-5)
    assert (ours - reprojected).abs().max() > 1e-2
