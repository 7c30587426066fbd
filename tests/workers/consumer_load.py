"""torchrun worker: for each case, build the GPTModel Megatron-LM would build from the case's flags
(``convert/megatron_lm.py``: sizes from its config.json) at --tp/--ep, load the case's torch_dist
directory strictly, run the token batch (--ids) forward and save the fp32 logits ``[B, S, Vp]``
from rank 0 to the case's ``out``. A failing case writes ``out + ".err"`` (one line, the first
error of any rank) and the worker goes on with the next one, so one start-up checks many models.

--cases is a JSON file: ``[{"flags": path, "config": path, "ckpt": dir, "out": path,
"overrides": {config field: value} (optional)}, ...]``.
"""
import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import megatron_lm
from runtime import megatron as rt
from tools.shrink import with_sizes


def run_case(case: dict, tp: int, ep: int, ids_BS: torch.Tensor) -> None:
    config = json.loads(Path(case["config"]).read_text())
    args = megatron_lm.parse_flags(with_sizes(Path(case["flags"]).read_text(), config))
    model = megatron_lm.build_model(args, tp=tp, ep=ep, overrides=case.get("overrides"))
    megatron_lm.load(model, case["ckpt"])
    logits_BSV = megatron_lm.logits(model, ids_BS)
    if torch.distributed.get_rank() == 0:
        torch.save(logits_BSV, case["out"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON file: list of case dicts")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--ids", required=True, help=".pt file with the [B, S] token batch")
    a = ap.parse_args()
    cases = json.loads(Path(a.cases).read_text())
    ids_BS = torch.load(a.ids, weights_only=True)
    rt.init_distributed(tp=a.tp, ep=a.ep)
    rank = torch.distributed.get_rank()
    for case in cases:
        error = None
        try:
            run_case(case, a.tp, a.ep, ids_BS)
        except Exception as e:  # reported in the .err file and on stderr; the next case still runs
            traceback.print_exc()
            error = f"rank {rank}: {type(e).__name__}: {' '.join(str(e).split())}"
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)  # ranks stay in step and agree
        first = next((e for e in errors if e), None)
        if rank == 0:
            print(f"case {case['out']}: {'FAIL ' + first[:300] if first else 'OK'}", flush=True)
            if first:
                Path(case["out"] + ".err").write_text(first + "\n")
    rt.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
