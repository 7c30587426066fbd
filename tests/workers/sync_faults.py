"""torchrun worker (2 ranks, PP=2): the two pipeline bugs peers shipped in their live sync, injected into
ours, must be refused by its completeness check: (1) stage-local layer names (every stage calls its first
layer layers.0), (2) one stage's layers silently left out. Then the honest sync must complete. Rank 0
writes {fault: error message or None} to --out."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import megatron as rt  # noqa: E402
from rl.sync import layout, weight_sync  # noqa: E402
from rl.sync.layout import SyncError  # noqa: E402
from sync_helpers import CollectingEngine  # noqa: E402


def stage_local_names(chunk) -> int:
    return 0  # the bug: each stage numbers its layers from 0


def drop_stage_layers(chunk):
    from megatron.core import parallel_state as ps

    for name, t in HONEST_TENSORS(chunk):
        if ps.get_pipeline_model_parallel_rank() == 1 and name.startswith("decoder.layers."):
            continue  # the bug: the last stage's layers never reach the engine
        yield name, t


HONEST_OFFSET, HONEST_TENSORS = layout.layer_offset, layout.local_tensors
FAULTS = {"stage_local_names": ("layer_offset", stage_local_names),
          "drop_stage_layers": ("local_tensors", drop_stage_layers)}


def main():
    from convert.formats import checkpoint_dir
    from mapping.registry import family_for

    ap = argparse.ArgumentParser()
    ap.add_argument("--mcore", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rt.init_distributed(pp=2, seed=1)
    cfg = json.loads((Path(a.mcore) / "hf" / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    model = rt.build_from(m, pp=2)
    model.load_state_dict(rt.load_checkpoint(model, str(checkpoint_dir(a.mcore))))
    result = {}
    for fault, (attr, fn) in FAULTS.items():
        setattr(layout, attr, fn)
        setattr(weight_sync, attr, fn) if hasattr(weight_sync, attr) else None
        try:
            weight_sync.WeightSync(model, cfg)
            result[fault] = None
        except SyncError as err:
            result[fault] = str(err)
        finally:
            setattr(layout, attr, HONEST_OFFSET if attr == "layer_offset" else HONEST_TENSORS)
            setattr(weight_sync, attr, getattr(layout, attr)) if hasattr(weight_sync, attr) else None
    sync = weight_sync.WeightSync(model, cfg)
    engine = CollectingEngine(sync.engine_dtype) if torch.distributed.get_rank() == 0 else None
    sync.sync(engine)
    if engine is not None:
        result["honest_tensors"] = sorted(engine.tensors)
        Path(a.out).write_text(json.dumps(result))
    torch.distributed.barrier()
    rt.destroy_distributed()


if __name__ == "__main__":
    main()
