"""Checkpoints on disk: reading them (confined to their directory, or the local Hub cache), key maps, dtypes, LoRA.

Writing: sharded safetensors written atomically (writer), exports of a merged vector and a mask (export), and what
an export may replace (export_guard). May import mmer_cl.method, mmer_cl.runtime, mmer_cl.errors and storage;
never the store, compose or the command line.
"""
