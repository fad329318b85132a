"""Prove the ablation op survives CUDA-graph capture: replays follow the per-token buffers.

vLLM captures the decoder's forward in CUDA graphs once and replays it every step; the graph
holds tensor addresses, not values. The abliserve op must therefore read each token's direction
slot and strength from persistent buffers that change between replays without a re-capture.
This script checks exactly that with plain torch (vLLM need not be installed):

1. capture ``linear -> ablate_tokens -> linear`` in a ``torch.cuda.CUDAGraph``;
2. for several trials, write new inputs, slots and strengths *in place* and replay;
3. compare every replay with the op run eagerly row by row (``abliserve.projection.ablate``);
4. the same through ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (graph trees).

Without CUDA it prints a message and runs only step 4's compiler path on CPU (no graphs), which
is what the test suite exercises. Run on a GPU machine and paste the output into bench/RESULTS.md:

    .venv/bin/python bench/cuda_graph_check.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from abliserve.projection import ablate, normalise
from abliserve.server.engines.vllm_op import ablate_tokens

HIDDEN = 64
MAX_TOKENS = 32
NUM_DIRECTIONS = 3
TRIALS = 5
TOLERANCE = 1e-4


@dataclass
class Case:
    """A two-layer toy writer with the bank and the persistent per-token buffers."""

    first: torch.nn.Linear
    second: torch.nn.Linear
    directions: torch.Tensor  # [1 + N, hidden], slot 0 zeros
    weights: torch.Tensor  # [1 + N]
    slots: torch.Tensor  # [MAX_TOKENS] int64, persistent
    strengths: torch.Tensor  # [MAX_TOKENS] float32, persistent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = ablate_tokens(
            self.first(x), self.directions, self.weights, self.slots, self.strengths
        )
        return self.second(written)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Row by row, eagerly: what every replay must reproduce."""
        rows = []
        hidden = self.first(x)
        for t in range(x.shape[0]):
            slot = int(self.slots[t])
            alpha = float(self.strengths[t]) * float(self.weights[slot])
            rows.append(ablate(hidden[t], self.directions[slot], alpha))
        return self.second(torch.stack(rows))

    def refill(self, generator: torch.Generator, rows: int) -> None:
        """New per-token routing written in place (addresses unchanged), zeros past ``rows``."""
        slots = torch.randint(0, NUM_DIRECTIONS + 1, (MAX_TOKENS,), generator=generator)
        strengths = torch.rand(MAX_TOKENS, generator=generator) * 1.5
        slots[rows:] = 0
        strengths[rows:] = 0.0
        self.slots.copy_(slots)
        self.strengths.copy_(strengths)


def make_case(device: str, seed: int = 0) -> Case:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    directions = torch.zeros(1 + NUM_DIRECTIONS, HIDDEN)
    directions[1:] = normalise(torch.randn(NUM_DIRECTIONS, HIDDEN, generator=generator))
    weights = torch.cat([torch.zeros(1), torch.rand(NUM_DIRECTIONS, generator=generator) + 0.5])
    return Case(
        first=torch.nn.Linear(HIDDEN, HIDDEN).to(device),
        second=torch.nn.Linear(HIDDEN, HIDDEN).to(device),
        directions=directions.to(device),
        weights=weights.to(device),
        slots=torch.zeros(MAX_TOKENS, dtype=torch.int64, device=device),
        strengths=torch.zeros(MAX_TOKENS, device=device),
    )


def check_compiled(device: str, mode: str | None = None) -> float:
    """Worst error of ``torch.compile(fullgraph=True)`` over trials with changing buffers."""
    case = make_case(device)
    compiled = torch.compile(case.forward, fullgraph=True, mode=mode, dynamic=False)
    generator = torch.Generator().manual_seed(1)
    x = torch.zeros(MAX_TOKENS, HIDDEN, device=device)
    worst = 0.0
    with torch.no_grad():
        for trial in range(TRIALS):
            x.copy_(torch.randn(MAX_TOKENS, HIDDEN, generator=generator))
            case.refill(generator, rows=MAX_TOKENS - trial)
            out = compiled(x).clone()
            worst = max(worst, float((out - case.reference(x)).abs().max()))
    return worst


def check_cuda_graph() -> float:
    """Worst error of one captured CUDA graph replayed with new inputs and routing each time."""
    case = make_case("cuda")
    generator = torch.Generator().manual_seed(2)
    static_x = torch.randn(MAX_TOKENS, HIDDEN, device="cuda")
    case.refill(generator, rows=MAX_TOKENS)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside capture, as CUDA graphs require
                case.forward(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = case.forward(static_x)
        worst = 0.0
        for trial in range(TRIALS):
            static_x.copy_(torch.randn(MAX_TOKENS, HIDDEN, generator=generator))
            case.refill(generator, rows=MAX_TOKENS - 3 * trial)
            graph.replay()
            torch.cuda.synchronize()
            error = float((static_out - case.reference(static_x)).abs().max())
            changed = int((case.slots != 0).sum())
            print(f"  replay {trial}: {changed} ablated rows, max |graph - eager| = {error:.2e}")
            worst = max(worst, error)
    return worst


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_graph_check: no CUDA device; skipping the CUDA-graph replay check.")
        worst = check_compiled("cpu")
        print(f"CPU torch.compile(fullgraph=True) with changing buffers: max error {worst:.2e}")
        return 0 if worst < TOLERANCE else 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {
        "CUDAGraph capture + replay": check_cuda_graph(),
        "torch.compile(fullgraph, reduce-overhead)": check_compiled("cuda", "reduce-overhead"),
    }
    for name, worst in results.items():
        verdict = "OK" if worst < TOLERANCE else "FAIL"
        print(f"{name}: max error {worst:.2e} -> {verdict}")
    return 0 if all(worst < TOLERANCE for worst in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
