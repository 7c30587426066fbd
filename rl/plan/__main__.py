"""python -m rl.plan: will this GRPO run fit the cluster, and how long is a step? From the trainer config
and the model's config.json alone, in seconds, without a GPU or the model's weights.

It prints one trainer rank of every pipeline stage (weights, fp32 gradients, optimizer state, activations
at the micro-batch, sequence length and recompute mode, logits, R3 routing indices, the reference model,
the live-sync buffers), one rollout-engine GPU (vLLM weights at its TP, KV cache, what sleep frees), the
host memory of the busiest node, a step-time estimate, and last a verdict: "fits: ..." (exit 0) or
"does not fit: stage S rank R needs X GB of G; try ..." (exit 1) with the changes that re-plan as
fitting. A config it cannot plan (unknown override, layers that do not split into the stages, ep not
dividing the experts, tp not dividing the heads) is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rl.plan.assume import Cluster, Speed, add_flags, from_args

EPILOG = """\
examples:
  python -m rl.plan --config rl/configs/deepseek_v3_671b.yaml --gpus 128 --rollout-tp 32 \\
      --model-config tests/fixtures/published/DeepSeek-V3/config.json
  python -m rl.plan --config rl/configs/deepseek_v3_671b.yaml --gpus 128 --rollout-tp 32 optim.cpu_offload=false
  python -m rl.plan --config rl/configs/qwen3_235b_a22b.yaml run.micro_batch_size=2 --gpu-gb 96 --json

what the numbers rest on (rl/plan/*.py docstrings say more):
  parameters   exact, by formula from config.json (tests/test_rl_plan.py holds them to Megatron-Core meta
               models); MTP layers are left out, as RL training leaves them out
  bytes/param  Megatron-LM's: bf16 2 + fp32 grad 4 + optimizer 12 (fp32 master, Adam m, v) divided over the
               ranks sharing the parameter with the distributed optimizer (dp*cp dense, expert-dp experts)
  activations  Korthikanti et al. 2022 (Table 2), adapted: no dropout, flash attention, GQA/MLA, SwiGLU, MoE
  time         2 x active parameters per token and attention FLOPs at --train-mfu; decode bound by memory
               bandwidth at --rollout-mbu (every assumption is printed with the estimate)
exit status: 0 fits, 1 does not fit, 2 the config cannot be planned
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rl.plan", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="the trainer config rl/train.py would run")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides exactly as rl/train.py takes them (e.g. model.pp=8 run.micro_batch_size=1)")
    p.add_argument("--model-config", metavar="PATH",
                   help="the model's HF config.json, or a folder holding it (an HF checkpoint, or an hf2mcore output "
                        "with hf/config.json); default: model.path's hf/config.json")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of text")
    add_flags(p, Cluster)
    add_flags(p, Speed)
    return p.parse_intermixed_args(argv)


def model_config(arg, cfg_path, overrides) -> tuple[dict, str]:
    """(config.json dict, its path) from --model-config or model.path."""
    from rl.config import load_config

    if arg is None:
        path = Path(load_config(cfg_path, overrides).model.path) / "hf" / "config.json"
        if not path.is_file():
            raise ValueError(f"{path} not found (model.path is not a converted checkpoint here); pass --model-config "
                             "CONFIG.json, the model's HF config (e.g. tests/fixtures/published/DeepSeek-V3/config.json)")
    else:
        path = Path(arg)
        if path.is_dir():
            path = next((p for p in (path / "config.json", path / "hf" / "config.json") if p.is_file()), path)
        if not path.is_file():
            raise ValueError(f"--model-config {arg}: no config.json there; give the file or its folder")
    return json.loads(path.read_text()), str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rl.plan import advice
    from rl.plan.core import load, make_plan
    from rl.plan.report import render

    cl, sp = from_args(args, Cluster), from_args(args, Speed)
    try:
        hf, source = model_config(args.model_config, args.config, args.overrides)
        name = Path(source).parent.name if Path(source).name == "config.json" else source

        def replan(extra, changes):
            return make_plan(args.config, [*args.overrides, *extra], hf, dataclasses.replace(cl, **changes), sp,
                             source, name)

        plan = replan([], {})
        cfg = load(args.config, args.overrides, cl)
    except (ValueError, FileNotFoundError) as err:  # PlanError, rl.config's and mapping's errors are ValueErrors
        print(f"python -m rl.plan: error: {err}", file=sys.stderr)
        return 2
    hints = advice.suggest(cfg, plan, replan)
    if args.json:
        print(json.dumps({**dataclasses.asdict(plan), "suggestions": hints}, indent=1, default=str))
    else:
        print(render(plan, hints))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
