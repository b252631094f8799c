"""Data: readers → canonical records → cleaning → chat templates → token ids + label masks → packed rows.

Public names are re-exported lazily (importing this package imports neither torch nor transformers).
"""

from __future__ import annotations

from tuneforge.utils import lazy_exports

_EXPORTS = {
    "read_records": "tuneforge.data.readers",
    "record_text": "tuneforge.data.readers",
    "clean_records": "tuneforge.data.clean",
    "CleanReport": "tuneforge.data.clean",
    "ChatTemplate": "tuneforge.data.templates",
    "resolve_template": "tuneforge.data.templates",
    "get_template": "tuneforge.data.templates",
    "TEMPLATE_NAMES": "tuneforge.data.templates",
    "encode_chat": "tuneforge.data.tokenize",
    "encode_chat_samples": "tuneforge.data.tokenize",
    "pretrain_blocks": "tuneforge.data.tokenize",
    "pack_rows": "tuneforge.data.packing",
    "PackedCollator": "tuneforge.data.packing",
    "PaddingCollator": "tuneforge.data.packing",
    "padding_share": "tuneforge.data.packing",
    "length_grouped_order": "tuneforge.data.packing",
    "packing_supported": "tuneforge.data.packing",
    "build_datasets": "tuneforge.data.build",
    "load_records": "tuneforge.data.build",
    "tokenizer_texts": "tuneforge.data.build",
    "DataBundle": "tuneforge.data.samples",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
