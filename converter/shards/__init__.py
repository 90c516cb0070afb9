"""safetensors shards: header validation, per-tensor reading, atomic byte-exact writing, the index."""
from .digest import sha256_file
from .header import Entry, Header, TensorInfo, build_header, dtype_to_name, file_order
from .index import INDEX_NAME, read_index, shard_name
from .reader import SafetensorsFile, read_header
from .writer import ShardWriter, save_file

__all__ = [
    "Entry", "Header", "INDEX_NAME", "SafetensorsFile", "ShardWriter", "TensorInfo", "build_header",
    "dtype_to_name", "file_order", "read_header", "read_index", "save_file", "sha256_file", "shard_name",
]
