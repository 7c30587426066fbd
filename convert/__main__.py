"""``python -m convert {hf2mcore,mcore2hf,validate}``: checkpoint conversion between HF and
Megatron-Core, and validation of a conversion.

Run on one process, or on N ranks with identical flags:

    mpiexec -n 4 python -m convert hf2mcore --hf-dir IN --out OUT
    torchrun --nproc-per-node 4 -m convert hf2mcore --hf-dir IN --out OUT
"""
from __future__ import annotations

import argparse
import json
import sys

from convert.comm import from_launcher
from convert.formats.hf_checkpoint import CheckpointError
from convert.formats.outdir import OutputError
from convert.progress import human_bytes
from convert.formats.torch_dist import TorchDistError
from mapping.family import ConfigError
from mapping.entries import PlanError

USER_ERRORS = (CheckpointError, ConfigError, PlanError, OutputError, TorchDistError)

EPILOG = """\
examples:
  python -m convert hf2mcore --hf-dir Qwen3-8B --out ckpt/qwen3-8b
  mpiexec -n 8 python -m convert hf2mcore --hf-dir DeepSeek-V3 --out ckpt/dsv3   # FP8 input is dequantised
  python -m convert hf2mcore --hf-dir IN --out OUT --dry-run                     # print the plan only
  python -m convert mcore2hf --mcore-dir ckpt/qwen3-8b --out Qwen3-8B-rl --max-shard-size 5GB
  python -m convert validate --hf-dir Qwen3-8B --mcore-dir ckpt/qwen3-8b --layouts tp2 --vllm
  python -m convert families                                                    # what converts, tested how

supported families: {families}
(the mapping tables live in mapping/families/).
"""


def _families() -> str:
    from mapping.registry import FAMILIES

    return ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EPILOG.format(families=_families()))
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf2mcore", help="HF safetensors -> MCore torch_dist (OUT/release + OUT/hf)",
                       description="Stream an HF checkpoint into a Megatron-Core torch_dist checkpoint. "
                       "Writes OUT/release/ (torch_dist), OUT/hf/ (config + tokenizer) and, last, "
                       "OUT/latest_checkpointed_iteration.txt. The result loads at any TP/PP/EP.")
    a.add_argument("--hf-dir", required=True, help="HF checkpoint folder (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="output root (created; must be empty or ours)")
    a.add_argument("--spec", default="local", choices=["local", "te"],
                   help="MCore layer spec the checkpoint is for: local (CPU/default) or te "
                   "(Transformer Engine keys: fused norm names and TE _extra_state; written on any "
                   "machine, loaded by a TE-spec GPTModel on GPU)")
    a.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="stored dtype (auto = config.json torch_dtype; FP8 inputs become bf16)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    a.add_argument("--dry-run", action="store_true", help="print the plan (per-rank bytes and tensor "
                   "counts, imbalance, expected peak memory, output layout, predicted wall time per rank and "
                   "the critical path) from config + index; write nothing")
    a.add_argument("--ranks", type=_rank_list, default=None, metavar="N[,N...]",
                   help="with --dry-run: plan for this many ranks, or for each of several counts "
                   "(e.g. 8,64; default: the launcher's world size)")
    a.add_argument("--throughput-gbs", type=float, default=None, metavar="X",
                   help="with --dry-run: GB/s one rank converts (each byte read once and written once, "
                   "like cp), for the predicted wall time per rank; default: measured by a short probe "
                   "(64 MB of the input read cold and written beside --out, fsynced)")
    a.add_argument("--mtp", default="auto", choices=["auto", "require", "drop"],
                   help="multi-token-prediction layers config.json declares (DeepSeek-V3/R1: 1): auto = "
                   "convert them if their tensors are stored, else convert without and say so (copies saved "
                   "by transformers have none); require = refuse a checkpoint without them; drop = leave "
                   "them out. Partly stored MTP tensors are always an error")
    b = sub.add_parser("mcore2hf", help="MCore torch_dist -> HF safetensors shards + index",
                       description="Export a torch_dist checkpoint (ours or a trainer's, any TP/PP/EP "
                       "it was saved at) to HF safetensors loadable by transformers and vLLM.")
    b.add_argument("--mcore-dir", required=True, help="MCore root (with latest_checkpointed_iteration.txt) "
                   "or a torch_dist directory")
    b.add_argument("--out", required=True, help="output HF folder")
    b.add_argument("--hf-config", default=None, help="folder with config.json + tokenizer "
                   "(default: MCORE_DIR/hf)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    b.add_argument("--dtype", default="auto", choices=["auto", "fp8"],
                   help="auto: the checkpoint's dtype; fp8: DeepSeek's published block-scaled FP8 layout "
                   "(e4m3 weights + 128x128 *_scale_inv, quantization_config; families with a published "
                   "FP8 checkpoint only)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    lora = b.add_mutually_exclusive_group()
    lora.add_argument("--lora-only", action="store_true", help="a checkpoint rl/train.py wrote with model.lora: "
                      "write its adapters as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
                      "for peft.PeftModel.from_pretrained on the base model")
    lora.add_argument("--merge-lora", action="store_true", help="a checkpoint with LoRA adapters: write the full "
                      "model with each adapted weight W + lora_alpha/r * B @ A")
    from convert import validate

    validate.add_parser(sub)
    sub.add_parser("families", help="list the supported model families (the README's table)",
                   description="Print the supported families as a Markdown table: name, HF architecture, "
                   "the published checkpoints tests/test_zoo.py converts, notes. One file per family in "
                   "mapping/families/ is the whole list.")
    return p


def families_table() -> str:
    """The README's family table, from the registry (``tests/test_readme.py`` compares them)."""
    from mapping.registry import FAMILIES

    rows = ["| family | HF architecture | published models tested (`tests/test_zoo.py`) | notes |",
            "|---|---|---|---|"]
    for f in FAMILIES.values():
        rows.append(f"| `{f.name}` | {', '.join(f'`{a}`' for a in f.architectures)} | "
                    f"{', '.join(p.split('/')[-1] for p in f.published) or '-'} | {f.description} |")
    return "\n".join(rows)


def _rank_list(text: str) -> list[int]:
    try:
        ranks = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: expected N or N,N,... (e.g. 8,64)") from None
    if any(n < 1 for n in ranks):
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: rank counts must be >= 1")
    return ranks


def process_start() -> float:
    """When this process started (``time.time()`` clock, to a clock tick), so start-up before
    ``main`` counts in the fixed cost. From /proc's boot-relative start tick and uptime: psutil's
    ``create_time`` adds the boot time rounded to the second (up to 1 s off); it is the fallback
    where there is no /proc."""
    import os
    import time
    from pathlib import Path

    if not Path("/proc/self/stat").is_file():
        import psutil

        return psutil.Process().create_time()
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def print_prediction(res: dict) -> None:
    p, cp = res["prediction"], res["prediction"]["critical_path"]
    rate = p["throughput"]
    how = (f"probe: {human_bytes(rate['probe_bytes'])} read at {rate['read_gbs']:.2f} GB/s, written at "
           f"{rate['write_gbs']:.2f} GB/s" if rate["source"] == "probe" else rate["source"])
    print(f"predicted wall time {p['wall_seconds']:.1f}s at {p['throughput_gbs']:.2f} GB/s per rank ({how}) "
          f"= fixed {p['fixed_s']:.1f}s (start-up + plan) + data")
    for r, (sec, nb) in enumerate(zip(p["rank_seconds"], res["rank_bytes"])):
        print(f"  rank {r:>4}: {sec:9.1f}s  {human_bytes(nb):>9}  {res['rank_tensors'][r]} tensors")
    tensors = ", ".join(f"{t['name']} ({human_bytes(t['bytes'])}, {t['seconds']:.1f}s)" for t in cp["largest_tensors"])
    print(f"critical path: rank {cp['rank']}, {cp['seconds']:.1f}s, dominated by {cp['dominated_by']}; "
          f"its largest tensors: {tensors}")


def print_plan(res: dict) -> None:
    rb, rt_ = res["rank_bytes"], res["rank_tensors"]
    print(f"plan: {res['family']}, {res['tensors']} MCore tensors in {res['checkpoint_keys']} checkpoint "
          f"keys, {human_bytes(res['bytes'])}")
    print(f"ranks: {res['ranks']}; bytes per rank min {human_bytes(min(rb))}, max {human_bytes(max(rb))}; "
          f"tensors per rank {min(rt_)}..{max(rt_)}; imbalance (max/mean) {res['imbalance']:.4f}")
    print(f"largest tensor {human_bytes(res['largest_tensor_bytes'])}; expected peak memory per rank "
          f"~{human_bytes(res['expected_peak_bytes_per_rank'])} (3x the largest tensor) + runtime")
    print(f"output: {res['output']}/release/__<rank>_0.distcp x {res['ranks']}, .metadata, common.pt, "
          f"metadata.json ({res['layers']} layers); {res['output']}/hf/; "
          f"{res['output']}/latest_checkpointed_iteration.txt (last)")
    print_prediction(res)
    print(json.dumps(res))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "families":
        print(families_table())
        return 0
    if args.cmd == "validate":
        from convert import validate

        try:
            return validate.main(args)
        except USER_ERRORS + (validate.ValidateError,) as err:
            print(f"validate: error: {err}", file=sys.stderr)
            return 2
    comm = from_launcher()
    try:
        if args.cmd == "hf2mcore":
            from convert import hf2mcore

            if args.dry_run:
                plans = hf2mcore.dry_run(args.hf_dir, args.out, args.ranks or [comm.size], spec=args.spec,
                                         dtype=args.dtype, mtp=args.mtp, throughput_gbs=args.throughput_gbs,
                                         started=process_start())
                res = dict(plans[0], plans=plans)
            else:
                res = hf2mcore.run(args.hf_dir, args.out, spec=args.spec, dtype=args.dtype,
                                   overwrite=args.overwrite, comm=comm, mtp=args.mtp, started=process_start())
        else:
            from convert import mcore2hf

            res = mcore2hf.run(args.mcore_dir, args.out, hf_config=args.hf_config,
                               max_shard_size=args.max_shard_size, overwrite=args.overwrite, comm=comm,
                               dtype=args.dtype, lora="only" if args.lora_only else "merge" if args.merge_lora else "none")
    except USER_ERRORS as err:
        print(f"{args.cmd}: error: {err}", file=sys.stderr)
        return 2
    finally:
        comm.close()
    if comm.rank == 0:
        for note in res.get("notes", []):
            print(f"{args.cmd}: note: {note}", file=sys.stderr)
        if args.cmd == "hf2mcore" and args.dry_run:
            for plan in res["plans"]:
                print_plan(plan)
        else:
            first = f" (first byte {res['fixed_s']:.1f}s after start)" if "fixed_s" in res else ""
            print(f"{args.cmd}: {res['family']} {res['tensors']} tensors, {human_bytes(res['bytes'])} "
                  f"in {res['seconds']:.1f}s{first} -> {res['output']}")
    return 0


def exit_now(rc: int) -> None:
    """Leave without the interpreter's teardown: with torch and megatron loaded, finalisation
    spends ~0.8 s (measured) in cyclic garbage collection of module objects that the OS frees
    anyway. Output is flushed and atexit handlers run first (mpi4py's MPI_Finalize among them)."""
    import atexit
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(rc)


if __name__ == "__main__":
    exit_now(main())
