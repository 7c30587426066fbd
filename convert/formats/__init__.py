"""Checkpoint formats: the one public API for reading and writing what conversion and RL move.

* Hugging Face safetensors: ``HFCheckpoint`` reads a folder lazily (index first, tensors on
  demand, DeepSeek FP8 weights dequantised on ``get``); ``StreamingSafetensors`` writes a shard
  tensor by tensor with a bounded footprint; ``transformers_config`` builds transformers' config
  object for a config.json without remote code.
* Megatron-Core ``torch_dist``: ``layout`` asks a (meta) model for its keys, shapes and chunks;
  ``Writer`` appends chunks to a rank's ``.distcp`` file and ``finalize`` writes the metadata and
  ``common.pt``; ``Reader`` assembles any region from whatever chunks a checkpoint holds.
  ``te_layout`` derives the Transformer Engine spec's layout from the local spec's.
* The Megatron root around it: ``checkpoint_dir`` resolves ``latest_checkpointed_iteration.txt``
  to the ``iter_XXXXXXX`` / ``release`` directory and refuses unfinished conversions; ``outdir``
  keeps output folders from looking complete before they are.
* The fast path: ``copy_ranges`` copies byte ranges file to file (``copy_file_range``), and
  ``hf_ranges`` / ``mcore_ranges`` say which byte ranges a converted tensor is made of.

Everything above the formats (``convert`` commands, ``rl``, ``tools``) imports from here, never
from the modules behind it.
"""
from convert.formats import outdir
from convert.formats import byte_ranges
from convert.formats.byte_ranges import close_all, hf_ranges, mcore_ranges
from convert.formats.filecopy import copy_ranges
from convert.formats.hf_checkpoint import (INDEX, SCALE_SUFFIX, SINGLE, CheckpointError, HFCheckpoint, TensorInfo,
                                           transformers_config)
from convert.formats.outdir import MARKER, OWNER, OutputError, checkpoint_dir, record
from convert.formats.safetensors_stream import ST_NAMES, StreamingSafetensors, nbytes
from convert.formats.te_layout import TE_MARKER, te_layout
from convert.formats.torch_dist import ObjectPiece, Piece, Reader, TorchDistError, layout, piece_of
from convert.formats.torch_dist_writer import Writer, finalize

__all__ = ["outdir", "byte_ranges", "close_all", "hf_ranges", "mcore_ranges", "copy_ranges", "INDEX", "SCALE_SUFFIX", "SINGLE",
           "CheckpointError", "HFCheckpoint", "TensorInfo", "transformers_config", "MARKER", "OWNER",
           "OutputError", "checkpoint_dir", "record", "ST_NAMES", "StreamingSafetensors", "nbytes", "TE_MARKER",
           "te_layout", "ObjectPiece", "Piece", "Reader", "TorchDistError", "Writer", "finalize", "layout",
           "piece_of"]
