"""``Reader.chunk_location`` finds a record's data from a parsed record of the same head
(``_data_start``): the same answers as parsing every record with ``torch.load``."""
from convert.formats.torch_dist import Reader
from tools.make_tiny import cached_tiny


def test_chunk_locations_from_record_heads_equal_parsed_ones(tmp_path):
    from convert import hf2mcore

    hf2mcore.run(str(cached_tiny("qwen3_moe", dtype="bf16")), str(tmp_path / "m"))
    chunks = [(k, tuple(c.offsets), tuple(c.sizes)) for k, md in Reader(tmp_path / "m/release").meta
              .state_dict_metadata.items() if hasattr(md, "chunks") for c in md.chunks]
    cached = Reader(tmp_path / "m/release")
    got = [cached.chunk_location(*c) for c in chunks]
    assert all(g is not None for g in got) and len(cached._heads) < len(chunks) / 4  # mostly from heads

    class NoHeads(dict):
        def get(self, key, default=()):
            return ()

        def setdefault(self, key, default=None):
            return []

    parsed = Reader(tmp_path / "m/release")
    parsed._heads = NoHeads()
    assert got == [parsed.chunk_location(*c) for c in chunks]
