"""The architecture coverage table: every supported architecture checked on both engines and
by export, written into docs/ARCHITECTURES.md and README.md (between the table markers).

    .venv/bin/python bench/architecture_coverage.py            # all checks (vLLM: ~1 min/arch)
    .venv/bin/python bench/architecture_coverage.py --no-vllm  # transformers and export only

Per architecture, on the tiny random model of ``tests/tiny_models.py`` (hidden 64, 2 layers,
every norm gain random), one random unit direction at every site:

* transformers engine: the largest |h . r| / |h| of the residual stream after the embedding
  and every decoder layer at strength 1 (exact ablation leaves rounding, ~1e-7), strength 0
  bit-identical to no hooks, and a mixed batch equal to its rows run alone;
* vLLM engine: ``bench/vllm_architecture_check.py`` in its own process (greedy token ids equal
  to the transformers engine at strength 0 and 1, largest first-token log-probability gap), or
  the error line with which vLLM's CPU build refuses the architecture;
* export: exact (largest logit difference between the baked checkpoint and the hooks at
  strength 1) or approximate (post-norm writers: mean first-token KL(hooks || baked) over the
  probe prompts, the price of baking a serving-time ablation that weights cannot express).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import tiny_models  # noqa: E402
from vllm_architecture_check import PROMPTS, run_check  # noqa: E402

from abliserve.architectures import SUPPORTED_ARCHITECTURES, writer_layout  # noqa: E402
from abliserve.bank import DirectionBank  # noqa: E402
from abliserve.directions.export import orthogonalise_model  # noqa: E402
from abliserve.hooks import AblationHooks  # noqa: E402
from abliserve.selfcheck import residual_components  # noqa: E402

TARGETS = (ROOT / "docs" / "ARCHITECTURES.md", ROOT / "README.md")
TABLE_START, TABLE_END = "<!-- coverage table -->", "<!-- end coverage table -->"


@torch.no_grad()
def transformers_row(name: str) -> dict:
    model = tiny_models.architecture_model(name)
    layout = writer_layout(model)
    sites, hidden = len(layout.sites), model.get_input_embeddings().weight.shape[1]
    direction = tiny_models.random_directions(1, hidden, seed=7)[0]
    bank = DirectionBank(
        names=["d"],
        directions=torch.stack([torch.zeros(sites, hidden), direction.expand(sites, -1)]),
        weights=torch.stack([torch.zeros(sites), torch.ones(sites)]),
    )
    ids = torch.tensor([p[:3] for p in PROMPTS])

    def logits(net, slots, strengths, rows=slice(None)):
        with AblationHooks(net, bank) as hooks:
            hooks.set_rows(torch.tensor(slots), torch.tensor(strengths))
            return net(input_ids=ids[rows], use_cache=False).logits

    plain = model(input_ids=ids, use_cache=False).logits
    hooked = logits(model, [1, 1, 1], [1.0, 1.0, 1.0])
    mixed = logits(model, [1, 0, 1], [1.0, 0.0, 0.5])
    solo = [
        logits(model, [s], [a], slice(row, row + 1))[0]
        for row, (s, a) in enumerate(((1, 1.0), (0, 0.0), (1, 0.5)))
    ]
    baked = copy.deepcopy(model)
    approximate = orthogonalise_model(baked, bank.directions[1], bank.weights[1], 1.0)
    exported = baked(input_ids=ids, use_cache=False).logits
    serving, baked_lp = (torch.log_softmax(x[:, -1].double(), -1) for x in (hooked, exported))
    return {
        "architecture": type(model).__name__,
        "writers": _writers_label(layout),
        "leak": float(residual_components(model, direction, 1.0).max()),
        "zero_exact": torch.equal(logits(model, [1, 1, 1], [0.0] * 3), plain),
        "mixed_equal": all(
            torch.allclose(mixed[row], solo[row], atol=1e-4, rtol=1e-4) for row in range(3)
        ),
        "export_exact": not approximate,
        "export_gap": float((exported - hooked).abs().max()),
        "export_kl": float((serving.exp() * (serving - baked_lp)).sum(-1).mean()),
    }


def _writers_label(layout) -> str:
    embed = "+".join(n.rsplit(".", 1)[-1] for n in layout.sites[0].names)
    attn, mlp = (layout.sites[i].names[0].split(".", 3)[-1] for i in (1, 2))
    return f"`{embed}`, `{attn.replace('.0.', '.{i}.')}`, `{mlp.replace('.0.', '.{i}.')}`"


def vllm_cell(result: dict | None) -> str:
    if result is None:
        return "not checked (--no-vllm)"
    if not result["runs"]:
        return f"vLLM CPU cannot run it: `{result['reason']}`"
    equal = result["tokens_equal_0"] and result["tokens_equal_1"]
    gap = max(result["logprob_gap_0"], result["logprob_gap_1"])
    return f"{'**equal**' if equal else '**DIFFERS**'} (tokens at 0 and 1; logprob gap {gap:.0e})"


def table(rows: list[tuple[str, dict, dict | None]]) -> str:
    lines = [
        "| architecture | writers (site 0, attention, MLP) | transformers engine | vLLM engine "
        "| export |",
        "|---|---|---|---|---|",
    ]
    for _, row, vllm in rows:
        ok = row["leak"] <= 1e-5 and row["zero_exact"] and row["mixed_equal"]
        engine = (
            f"{'**exact**' if ok else '**FAILS**'} (leak {row['leak']:.0e}"
            f"{'' if row['mixed_equal'] else ', mixed batch differs'})"
        )
        export = (
            f"exact (logit gap {row['export_gap']:.0e})"
            if row["export_exact"]
            else f"approximate (first-token KL {row['export_kl']:.1e})"
        )
        lines.append(
            f"| {row['architecture']} | {row['writers']} | {engine} | {vllm_cell(vllm)} "
            f"| {export} |"
        )
    return "\n".join(lines)


def write(markdown_table: str) -> None:
    for target in TARGETS:
        head, _, rest = target.read_text().partition(TABLE_START)
        _, _, tail = rest.partition(TABLE_END)
        target.write_text(f"{head}{TABLE_START}\n{markdown_table}\n{TABLE_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine column")
    parser.add_argument("--only", nargs="*", help="architectures to check (default: all)")
    args = parser.parse_args()
    rows = []
    for name in args.only or tiny_models.ARCHITECTURE_CONFIGS:
        row = transformers_row(name)
        assert row["architecture"] in SUPPORTED_ARCHITECTURES, row["architecture"]
        vllm = None if args.no_vllm else run_check(name)
        rows.append((name, row, vllm))
        print(name, row, vllm, flush=True)
    markdown = table(rows)
    print(markdown)
    if not args.only:
        write(markdown)


if __name__ == "__main__":
    main()
