"""Regenerate tests/contracts/<family>.json: the torch_dist keys and global shapes that
Megatron-Core 0.16.1's ``GPTModel.sharded_state_dict()`` (local spec, TP=EP=PP=1) asks for,
for each family's tiny config. Review the diff by hand when MCore or a tiny config changes:
these files are the contract the converter is held to.

    python tests/make_contracts.py
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def contract(family: str) -> dict:
    from runtime import megatron as rt
    from convert.formats import layout
    from mapping.registry import family_for
    from tools.make_tiny import cached_tiny

    cfg = json.loads((cached_tiny(family) / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    rt.init_local()
    pieces, objects, _ = layout(rt.build_from(m, meta=True, dtype=torch.float32))
    keys = {p.key: list(p.global_shape) for ps in pieces.values() for p in ps}
    return {"tensors": dict(sorted(keys.items())), "objects": sorted(o.unique_key for o in objects)}


if __name__ == "__main__":
    from convert_helpers import FAMILIES

    for fam in FAMILIES:
        path = Path(__file__).with_name("contracts") / f"{fam}.json"
        c = contract(fam)
        rows = [f'  "{k}": {json.dumps(v)}' for k, v in c["tensors"].items()]
        objs = [f'  {json.dumps(o)}' for o in c["objects"]]
        path.write_text('{"tensors": {\n' + ",\n".join(rows) + '\n},\n"objects": [\n'
                        + ",\n".join(objs) + "\n]}\n")
        print("wrote", path)
