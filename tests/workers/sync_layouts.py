"""torchrun worker: for each case (family, checkpoint, tp/pp/ep), build the MCore model at that
layout, load the checkpoint with MCore's own loader, run WeightSync into an in-memory engine on
rank 0 (twice) and save what arrived (tensors + bucket sizes) for the test to compare with mcore2hf."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import megatron as rt
from rl.sync.weight_sync import WeightSync  # noqa: E402
from sync_helpers import CollectingEngine  # noqa: E402


def run_case(case: dict) -> None:
    from convert.formats import checkpoint_dir
    from mapping.registry import family_for

    rt.init_distributed(tp=case["tp"], pp=case["pp"], ep=case["ep"], seed=4321)
    cfg = json.loads((Path(case["mcore"]) / "hf" / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    dtype = rt.DTYPES[case["dtype"]]
    model = rt.build_from(m, dtype=dtype, tp=case["tp"], pp=case["pp"], ep=case["ep"])
    ckpt = str(checkpoint_dir(case["mcore"]))
    model.load_state_dict(rt.load_checkpoint(model, ckpt))
    sync = WeightSync(model, cfg, engine_dtype=rt.DTYPES[case["engine_dtype"]],
                      bucket_bytes=case["bucket_bytes"], transport=case["transport"])
    engine = CollectingEngine(sync.engine_dtype) if torch.distributed.get_rank() == 0 else None
    for _ in range(2):  # the second sync reuses the kept buffers; its delivery is what gets saved
        stats = sync.sync(engine)
    if engine is not None:
        engine.save(Path(case["out"]))
        Path(case["out"]).with_suffix(".stats.json").write_text(json.dumps(dict(
            buckets=stats.buckets, max_bucket_bytes=stats.max_bucket_bytes, direct=sorted(sync.direct),
            peak_held_bytes=stats.peak_held_bytes, received_bytes=stats.received_bytes)))
        print(f"case {case['name']}: {len(engine.tensors)} tensors in {stats.buckets} buckets, "
              f"max cost {stats.max_bucket_bytes}, peak held {stats.peak_held_bytes}", flush=True)
    torch.distributed.barrier()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON file: list of case dicts")
    cases = json.loads(Path(ap.parse_args().cases).read_text())
    for case in cases:
        run_case(case)
    rt.destroy_distributed()
    print(f"rank done", flush=True)


if __name__ == "__main__":
    main()
