"""A small byte-level BPE tokenizer for fabricated checkpoints, sized to the model's vocab.

Layout of the vocabulary (ids are stable, every fabricated model agrees on them):
- 0..4: special tokens ``<|begin_of_text|>`` (bos), ``<|endoftext|>`` (eos; the name
  ``Qwen2Tokenizer`` assumes, so it adds no token of its own), ``<|pad|>``,
  ``<|im_start|>``, ``<|im_end|>`` (chat turns);
- 5..260: the 256 byte-level symbols, so any UTF-8 text encodes and decodes losslessly;
- then merges built from a fixed list of pieces (English glue words, digits, LaTeX/math words,
  chat roles), applied left to right so every merge's inputs already exist;
- then ``<|reserved_K|>`` fillers up to exactly ``vocab_size`` (plain vocabulary entries that BPE
  never produces), so ``len(tokenizer) == config.vocab_size``.

The merges are written out, not trained: a trained BPE can break ties differently from run to run,
and fabricated checkpoints must be byte-identical for a given seed.

Files written: ``tokenizer.json`` (the ``tokenizers`` model) and ``tokenizer_config.json`` (special
tokens, ``PreTrainedTokenizerFast`` class, the ChatML chat template), which
``transformers.AutoTokenizer`` and vLLM load. Leaves out: any claim of linguistic quality.
Without it, fabricated models could not be served by vLLM or fed chat-formatted prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
MIN_VOCAB = len(SPECIAL_TOKENS) + 256

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pieces as the GPT-2 style pre-tokenizer cuts text: a word keeps its leading space.
_PIECES = (
    " the", " of", " and", " to", " is", " in", " a", " that", " it", " for", " be", " we", " by",
    " let", " Let", " think", " step", " answer", " final", " output", " within", " so", " then",
    " find", " Find", " what", " What", " how", " many", " value", " number", " numbers", " sum",
    " product", " integer", " integers", " positive", " real", " equation", " solve", " Compute",
    " compute", " if", " are", " The", " Therefore", " total", " each", " has", " can",
    "frac", "boxed", "sqrt", "cdot", "times", "left", "right", "pi", "dfrac", "begin", "end",
    "{", "}", "}{", "^{", "_{", " $", "$.", "$,", " =", " +", " -", "),", ").", " (",
    "00", "10", "12", "20", "25", "100", " 1", " 2", " 3", " 4", " 5", " 6", " 7", " 8", " 9",
    "user", "assistant", "system", "\n\n", " \\",
)


def _byte_symbols(text: str) -> str:
    """``text`` spelled in the byte-level alphabet (space -> 'Ġ', newline -> 'Ċ', ...)."""
    return ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def _vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, bytes, merges from ``_PIECES``, reserved fillers: exactly ``vocab_size`` entries."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer: need at "
                         f"least {MIN_VOCAB} ({len(SPECIAL_TOKENS)} special + 256 bytes)")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for piece in _PIECES:
        symbols = _byte_symbols(piece)
        left = symbols[0]
        for right in symbols[1:]:
            joined = left + right
            if joined not in vocab:
                if len(vocab) == vocab_size:
                    return vocab, merges
                vocab[joined] = len(vocab)
                merges.append((left, right))
            left = joined
    k = 0
    while len(vocab) < vocab_size:
        vocab[f"<|reserved_{k}|>"] = len(vocab)
        k += 1
    return vocab, merges


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids (see the module docstring)."""
    vocab, merges = _vocab_and_merges(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, "
                             f"wanted {vocab_size}")
    return tok


def save_tokenizer(out_dir: str | Path, vocab_size: int, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    tok_path, cfg_path = out / "tokenizer.json", out / "tokenizer_config.json"
    build_tokenizer(vocab_size).save(str(tok_path), pretty=False)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "additional_special_tokens": [SPECIAL_TOKENS[IM_START_ID], SPECIAL_TOKENS[IM_END_ID]],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    cfg_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    return [tok_path, cfg_path]
