"""Running an expansion on an existing distributed engine (Ray) instead of one process.

The driver plans, locks and commits; workers only read and write blobs. See
:mod:`mmer_cl.distributed.ray_expand`.
"""
