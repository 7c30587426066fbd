"""LoRA adapters out of a Megatron-Core checkpoint the trainer wrote (``rl.lora``: tensors keyed
``lora.<MCore linear>.<HF part>.A|B``, how they were trained in ``common.pt``'s ``lora_config``):

* ``mcore2hf --lora-only``: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors,
  PEFT's tensor names) that ``peft.PeftModel.from_pretrained`` loads onto the base model;
* ``mcore2hf --merge-lora``: the full HF model with every adapted weight replaced by
  W + (lora_alpha / r) B A (computed in fp32, stored in the weight's dtype).
Which HF weight an adapter belongs to comes from the same plan that names the base tensors (the MCore
linear's rule lists its HF parts), so nothing here is written per family; every adapter in the
checkpoint must find its weight, or the export stops naming it.
Leaves out: MoE expert adapters stacked per PEFT's 3-D layout (written per expert, as trained).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from convert.formats.torch_dist import TorchDistError
from convert.fp8_export import Export
from mapping.lora import peft_key

PREFIX = "lora."


def lora_keys(reader) -> list[str]:
    return sorted(k for k in reader.keys() if k.startswith(PREFIX))


def lora_config(ckpt: Path) -> dict:
    """How the adapters were trained (adapter_config.json's fields), from the checkpoint's common.pt."""
    common = Path(ckpt) / "common.pt"
    state = torch.load(common, map_location="cpu", weights_only=False) if common.is_file() else {}
    if not isinstance(state, dict) or "lora_config" not in state:
        raise TorchDistError(f"{common}: no lora_config; the adapters' rank and alpha are unknown (was it written "
                             "by rl/train.py with model.lora?)")
    return dict(state["lora_config"])


def adapters(plan, reader) -> dict[str, tuple[str, str]]:
    """HF module (weight name without ``.weight``) -> (A key, B key) of every adapter in the checkpoint."""
    keys = set(lora_keys(reader))
    out = {}
    for e in plan.entries:
        if not e.mcore.endswith(".weight"):
            continue
        for hf in e.hf:
            module = hf[: -len(".weight")]
            base = f"{PREFIX}{e.mcore[: -len('.weight')]}.{module.rsplit('.', 1)[-1]}"
            if f"{base}.A" in keys:
                out[module] = (f"{base}.A", f"{base}.B")
    left = keys - {k for pair in out.values() for k in pair}
    if left:
        raise TorchDistError(f"{reader.dir}: {len(left)} LoRA tensors belong to no weight of the "
                             f"{plan.family.name} plan, e.g. {sorted(left)[:2]}; wrong --hf-config?")
    return out


def _whole(reader, key: str) -> torch.Tensor:
    size = tuple(reader.tensor_meta(key).size)
    return reader.read_region(key, (0,) * len(size), size)


def write_peft(plan, reader, config: dict, out: Path) -> dict:
    """adapter_config.json, then adapter_model.safetensors (last: its presence means complete)."""
    from safetensors.torch import save_file

    found = adapters(plan, reader)
    tensors = {}
    for module, (a, b) in sorted(found.items()):
        tensors[peft_key(module, "A")] = _whole(reader, a).contiguous()
        tensors[peft_key(module, "B")] = _whole(reader, b).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


class MergeLoRA(Export):
    """The base export with every adapted HF weight replaced by W + (alpha / r) B A."""

    def __init__(self, base: Export, plan, reader, config: dict):
        self.base, self.reader = base, reader
        self.found = adapters(plan, reader)
        self.scale = float(config["lora_alpha"]) / int(config["r"])

    def _adapted(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.found

    def quantises(self, outputs) -> bool:  # adapted weights must be computed, not copied byte for byte
        return self.base.quantises(outputs) or any(self._adapted(n) for n, _, _ in outputs)

    def specs(self, outputs):
        return self.base.specs(outputs)

    def write(self, w, name: str, tensor: torch.Tensor) -> None:
        if self._adapted(name):
            a, b = (_whole(self.reader, k).float() for k in self.found[name[: -len(".weight")]])
            tensor = (tensor.float() + self.scale * (b @ a)).to(tensor.dtype)
        self.base.write(w, name, tensor)

    def config(self, cfg: dict) -> dict:
        return self.base.config(cfg)
