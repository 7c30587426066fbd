"""Everything the loop needs before its first step: the converted model (fabricated and converted
when the configured one is absent), an HF directory the rollout engine can start from, the
tokenizer and the encoded prompts.

Model: `model.path` must be an hf2mcore output (torch_dist + hf/). When it is absent and
`model.fabricate` names a family, `tools.make_tiny` writes a random checkpoint of that family next
to it (`<path>_hf`) and `convert.hf2mcore` converts it; a second run reuses both.
With `model.fabricate_warmup` the fabricated model is first warmed up on the training split
(rl.warmup), so that a tiny random model earns some reward.
Engine start-up weights: vLLM loads an HF checkpoint before the first live sync overwrites it. In
order of preference: safetensors beside the converted config (`<path>/hf`), the fabricated source,
else a one-time `convert.mcore2hf` export into `<path>_engine_init`.
Leaves out: downloading models. Without it the tiny config could not run from nothing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rl.batch import encode_prompts, load_rows


def _complete(model_dir: Path) -> bool:
    from convert.formats import OutputError, checkpoint_dir

    if not model_dir.exists():
        return False
    try:
        checkpoint_dir(model_dir)
    except OutputError:
        return False
    return (model_dir / "hf" / "config.json").is_file()


def _has_weights(hf_dir: Path) -> bool:
    return any(hf_dir.glob("*.safetensors"))


def prepare_model(cfg) -> tuple[Path, Path]:
    """(converted model dir, HF dir for the engine's start-up weights)."""
    from convert import hf2mcore

    m = cfg.model
    model_dir = Path(m.path)
    source = model_dir.with_name(model_dir.name + "_hf")
    if not _complete(model_dir):
        if m.fabricate is None:
            raise FileNotFoundError(f"model.path={model_dir}: no complete hf2mcore output there; convert a "
                                    "checkpoint first (python -m convert hf2mcore HF_DIR OUT) or set "
                                    "model.fabricate=FAMILY for a random tiny model")
        if not _has_weights(source):
            from tools.make_tiny import make_tiny

            shutil.rmtree(source, ignore_errors=True)
            print(f"fabricating a tiny {m.fabricate} model in {source}", flush=True)
            make_tiny(m.fabricate, source, dtype=m.dtype, seed=cfg.run.seed, **m.fabricate_overrides)
            if m.fabricate_warmup:
                from rl.warmup import WarmupConfig, warm_up_fabricated

                warm_up_fabricated(source, WarmupConfig(**m.fabricate_warmup),
                                   load_rows(cfg.data, Path(cfg.run.dir))[0], cfg.run.seed)
        print(f"converting {source} -> {model_dir} (hf2mcore)", flush=True)
        hf2mcore.run(str(source), str(model_dir), overwrite=True)
    return model_dir, engine_start_dir(model_dir, source)


def engine_start_dir(model_dir: Path, source: Path) -> Path:
    if _has_weights(model_dir / "hf"):
        return model_dir / "hf"
    if _has_weights(source):
        return source
    export = model_dir.with_name(model_dir.name + "_engine_init")
    if not (export / "model.safetensors.index.json").is_file() and not (export / "model.safetensors").is_file():
        from convert import mcore2hf

        print(f"exporting {model_dir} -> {export} once, for the rollout engine's start-up (mcore2hf)", flush=True)
        mcore2hf.run(str(model_dir), str(export), overwrite=True)
    return export


def prepare_prompts(cfg, model_dir: Path):
    """(tokenizer, train prompts, eval prompts, rows skipped for length)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "hf")
    train_rows, test_rows = load_rows(cfg.data, Path(cfg.run.dir))
    train, skipped = encode_prompts(train_rows, tokenizer, cfg.data.max_prompt_tokens)
    evals, skipped_eval = encode_prompts(test_rows[: cfg.data.eval_prompts], tokenizer, cfg.data.max_prompt_tokens)
    return tokenizer, train, evals, skipped + skipped_eval
