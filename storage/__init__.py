"""Content-addressed, checksummed blob storage and tensor codecs. Knows nothing of models."""

from storage.backends import Backend, BackendError, open_backend, scrub_url
from storage.blobstore import Batch, BlobError, BlobStore, GcResult, sha256
from storage.codecs import CodecError, decode, encode, encode_with, header_of
from storage.reader import TensorReader

__all__ = ["Backend", "BackendError", "Batch", "BlobError", "BlobStore", "CodecError", "GcResult", "TensorReader",
           "decode", "encode", "encode_with", "header_of", "open_backend", "scrub_url", "sha256"]
