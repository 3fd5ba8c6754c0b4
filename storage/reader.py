"""Reading tensors from blobs by digest, resolving blobs coded against other blobs.

:class:`TensorReader` verifies every blob it reads (through the blob store),
decodes self-contained codecs directly and resolves ``delta`` / ``maskpack``
members by reading their parents and supports. A small byte-bounded cache
keeps decompressed mask packs and support maps, which several tensors or
masks of one version share. Thread-safe: the expansion decodes on a loader
thread while it computes on another.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from storage.blobstore import BlobStore
from storage.codecs import CodecError, decode_parts, decode_sparse, sparse_nonzero, sparse_parts, unpack
from storage.delta import (apply_mask_change, decode_delta, decode_support, decompress_pack, delta_values,
                           full_mask, linked_digests, member_bits, pack_members)

DEFAULT_CACHE_BYTES = 256 * 1024**2


class _LRU:
    def __init__(self, limit: int):
        self.limit, self.used, self.items = limit, 0, OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
        return None

    def put(self, key, value, size: int) -> None:
        if size > self.limit:
            return
        with self.lock:
            if key in self.items:
                return
            self.items[key] = (value, size)
            self.used += size
            while self.used > self.limit:
                _, (_, s) = self.items.popitem(last=False)
                self.used -= s


class TensorReader:
    """Decoded tensors by blob digest (and member key, for mask packs)."""

    def __init__(self, blobs: BlobStore, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.blobs = blobs
        self._cache = _LRU(cache_bytes)

    def header(self, digest: str) -> dict:
        return unpack(self.blobs.get(digest))[0]

    def tensor(self, digest: str, key: str | None = None) -> torch.Tensor:
        """The tensor stored in blob ``digest`` (member ``key`` of a mask pack)."""
        header, parts = unpack(self.blobs.get(digest))
        codec = header["codec"]
        if codec == "delta":
            return decode_delta(header, parts, self.tensor(header["parent"], key), reuse=True)  # a fresh decode
        if codec == "maskpack":
            if key is None:
                raise CodecError(f"blob {digest} packs several masks; name the tensor key to read")
            return self._mask(digest, header, parts, key)
        if codec == "sparse":  # its nonzero map is kept: the masks ordered by it read it next
            return decode_sparse(header, parts, self._sparse_nonzero(digest, header, parts))
        return decode_parts(header, parts)

    def sparse(self, digest: str) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        """A ``sparse`` blob's shape, packed nonzero bits (uint8) and values, without building the full
        tensor; None where the blob has another codec."""
        header, parts = unpack(self.blobs.get(digest))
        if header["codec"] != "sparse":
            return None
        packed, values = sparse_parts(header, parts)
        return header["shape"], torch.from_numpy(packed), values

    def mask_by_context(self, digest: str, key: str, context: str) -> torch.Tensor | None:
        """Member ``key``'s stored bits where it is stored whole and ordered by blob ``context``: first its
        bits where that tensor is nonzero, in position order, then the others; else None."""
        try:
            members = self.members(digest)
        except CodecError:  # a mask in a blob of its own (release 0.1): read it the dense way
            return None
        member = next((m for m in members if m["key"] == key), None)
        if member is None or "parent" in member or member.get("context") != context:
            return None
        return member_bits(members, self._pack_payload(digest), key)[1]

    def members(self, digest: str) -> list[dict]:
        """The members of a ``maskpack`` blob."""
        cached = self._cache.get(("members", digest))
        if cached is None:
            header, parts = unpack(self.blobs.get(digest))
            if header["codec"] != "maskpack":
                raise CodecError(f"blob {digest} is not a mask pack")
            cached = pack_members(parts)
            self._cache.put(("members", digest), cached, 200 * len(cached))
        return cached

    def links(self, digest: str) -> set[str]:
        """The blobs that reading this one also reads (parents, supports, contexts)."""
        return linked_digests(*unpack(self.blobs.get(digest)))

    def depth(self, digest: str, key: str | None = None) -> int:
        """How many parents a read of this blob (member) walks."""
        header = self.header(digest)
        if header["codec"] == "maskpack" and key is not None:
            member = next((m for m in self.members(digest) if m["key"] == key), {})
            return int(member.get("depth", 0))
        return int(header.get("depth", 0))

    def support(self, digest: str) -> torch.Tensor:
        """The changed-positions map of a ``delta`` blob (flat bool)."""
        cached = self._cache.get(("support", digest))
        if cached is not None:
            return cached
        header, parts = unpack(self.blobs.get(digest))
        if header["codec"] != "delta":
            raise CodecError(f"blob {digest} is not a delta blob and has no support map")
        sup = decode_support(header, parts)
        self._cache.put(("support", digest), sup, sup.numel())
        return sup

    def nonzero(self, digest: str) -> torch.Tensor:
        """Where the float tensor in blob ``digest`` is nonzero (flat bool), decoding as little as it can."""
        cached = self._cache.get(("nonzero", digest))
        if cached is not None:
            return cached
        header, parts = unpack(self.blobs.get(digest))
        if header["codec"] == "sparse":
            return self._sparse_nonzero(digest, header, parts)
        if header["codec"] == "delta":
            support = decode_support(header, parts)
            nz = self.nonzero(header["parent"]).clone()
            nz[support] = delta_values(header, parts, support) != 0
        else:
            nz = (self.tensor(digest) != 0).reshape(-1)
        self._cache.put(("nonzero", digest), nz, nz.numel())
        return nz

    def _sparse_nonzero(self, digest: str, header: dict, parts) -> torch.Tensor:
        nz = self._cache.get(("nonzero", digest))
        if nz is None:
            nz = sparse_nonzero(header, parts)
            self._cache.put(("nonzero", digest), nz, nz.numel())
        return nz

    def _pack_payload(self, digest: str, parts: list[memoryview] | None = None) -> bytes:
        """A mask pack's decompressed bits (cached: the masks of one pack are read one after another)."""
        payload = self._cache.get(("pack", digest))
        if payload is None:
            payload = decompress_pack(parts if parts is not None else unpack(self.blobs.get(digest))[1])
            self._cache.put(("pack", digest), payload, len(payload))
        return payload

    def _mask(self, digest: str, header: dict, parts, key: str) -> torch.Tensor:
        member, bits = member_bits(self.members(digest), self._pack_payload(digest, parts), key)
        if "parent" not in member:
            context = self.nonzero(member["context"]) if "context" in member else None
            return full_mask(bits, member["shape"], context)
        old = self.tensor(member["parent"], key)
        return apply_mask_change(old, self.support(member["support"]), bits, member["shape"], reuse=True)
