"""The public converters' method, for ``tools.bench_convert`` to compare against: build the whole
Megatron-Core model with real weights, load every HF tensor into memory, copy them in, and
``dist_checkpointing.save``. Uses our rules for the names (the method, not the mapping, is what
is measured). Not a conversion tool: memory grows with the model size.
"""
from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_convert_naive", description=__doc__)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import time

    from megatron.core import dist_checkpointing

    from runtime import megatron as rt
    from convert.formats import HFCheckpoint
    from mapping import rules as R
    from mapping.entries import expand
    from mapping.registry import family_for

    t0 = time.time()
    ck = HFCheckpoint(a.hf_dir)
    fam = family_for(ck.config)
    m = fam.read_config(ck.config)
    rt.init_distributed()
    dtype = rt.DTYPES[m.hf_dtype]
    model = rt.build_from(m, dtype=dtype)                        # the whole model, real storage
    hf = {}
    for f in sorted({i.file for i in ck.tensors.values()}):      # every HF tensor in memory
        hf.update(load_file(str(ck.dir / f)))
    state = model.state_dict()
    with torch.no_grad():
        for e in expand(fam.rules(m), m):
            state[e.mcore].copy_(R.to_mcore(e.rule, [hf[h] for h in e.hf], m.shapes))
    import os

    os.makedirs(a.out, exist_ok=True)
    dist_checkpointing.save(rt.sharded_state_dict(model), a.out)
    print(f"naive: saved {len(state)} tensors -> {a.out} in {time.time() - t0:.1f}s")
    rt.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
