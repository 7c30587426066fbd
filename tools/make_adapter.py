"""Fabricate a PEFT LoRA adapter for an HF checkpoint (random A and B, PEFT's names and layout), as an SFT
run would leave one: for tests and benchmarks of LoRA import, export and serving.

    python -m tools.make_adapter --hf-dir tiny-hf --out adapter --targets q_proj,v_proj [--rank 4] [--alpha 8]

Which weights get adapters comes from the family's LoRA sites (mapping.lora), their shapes from the
checkpoint's safetensors headers (nothing else is read). A ~ N(0, 0.1^2), B ~ N(0, 0.1^2) from --seed: unlike
PEFT's own init (B = 0) the adapter changes the model, so tests can see it applied.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def make_adapter(hf_dir: Path, targets, out: Path, rank: int = 4, alpha: float = 8.0, seed: int = 5) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mapping import lora as L
    from mapping.registry import family_for

    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    fam = family_for(cfg, source=str(hf_dir / "config.json"))
    sites = L.lora_sites(fam, fam.read_config(cfg), tuple(targets))
    shapes = {}
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            shapes.update({k: h.get_slice(k).get_shape() for k in h.keys()})
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for part in L.targeted_parts(sites):
        o, i = shapes[part + ".weight"]
        tensors[L.peft_key(part, "A")] = torch.randn(rank, i, generator=g) * 0.1
        tensors[L.peft_key(part, "B")] = torch.randn(o, rank, generator=g) * 0.1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(L.peft_config(sites, rank, alpha, 0.0), indent=2) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.make_adapter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", required=True, help="HF checkpoint the adapter is for")
    ap.add_argument("--out", required=True, help="adapter directory to write")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated HF linear names")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args(argv)
    out = make_adapter(Path(a.hf_dir), a.targets.split(","), Path(a.out), a.rank, a.alpha, a.seed)
    print(f"wrote {out} (rank {a.rank}, targets {a.targets})")


if __name__ == "__main__":
    main()
