"""The method (MMER), as pure functions on tensors: task vectors, trim/merge, masks, accumulators, fused kernels.

Also reconstruction (base + mask * merged), MergeParams, the working precision and 1-bit deltas; no files, no database.
May import only torch, numpy, numba, non-I/O standard modules, mmer_cl.errors and storage's pure kernels
(storage.jit, storage.kernels, storage.codecs); nothing else of mmer_cl (tests/test_import_rules.py holds this).
"""
