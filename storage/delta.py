"""Blobs coded against earlier blobs: a version's tensors stored as changes to the previous version's.

An expansion changes the merged vector only where a new entry's trimmed
vector (or a removed one's) is nonzero, and each mask only where the merged
vector changed. So a version is stored as:

* ``delta`` (float tensors): ``parent`` names the blob of the same tensor in
  an earlier version; part 0 is the *support*, a bit map of the positions
  whose value changed; part 1 holds the new values there (byte planes).
* ``maskpack`` (masks): the masks of one entry for one or more tensors in
  one zstd stream, so small tensors do not each pay a blob's overhead. A
  member is either a full mask (every bit) or a change to an earlier mask
  (``parent``, the pack holding that mask under the same key), holding only
  the bits at the positions of ``support`` (the ``delta`` blob of the merged
  vector whose support map it shares).

Each coded member records its ``depth`` (its parent's plus one); encoders
start afresh beyond :data:`MAX_DEPTH`, so a read never walks a long chain.
These functions are pure: parents and supports arrive as tensors, and
:class:`storage.reader.TensorReader` fetches them by digest when decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from storage import jit, kernels
from storage.codecs import (bits_payload, count_true, dtype_name, dtype_of, from_words, int_view, numel_of, pack,
                            scatter_into, unbits, unplanes, unzstd, values_payload, zstd)

MAX_DEPTH = 8
MAX_SUPPORT_FRACTION = 0.3  # beyond this a whole blob is about as small and needs no parent


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (so -0.0 differs from 0.0 and NaN equals itself)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.contiguous().view(ints) == b.contiguous().view(ints)


def encode_delta(new: torch.Tensor, parent: torch.Tensor, parent_digest: str,
                 parent_depth: int) -> tuple[bytes, torch.Tensor] | None:
    """A ``delta`` blob of ``new`` against ``parent`` and its support, or None where a full blob is better."""
    if parent_depth >= MAX_DEPTH or new.shape != parent.shape or new.dtype != parent.dtype or not new.numel():
        return None
    flat = new.detach().to("cpu").reshape(-1)
    support, values = changed(flat, parent.detach().to("cpu").reshape(-1))
    if values.numel() > MAX_SUPPORT_FRACTION * flat.numel():
        return None
    header = {"codec": "delta", "dtype": dtype_name(new.dtype), "shape": list(new.shape), "parent": parent_digest,
              "depth": parent_depth + 1}
    payload, fields = values_payload(values)
    return pack(dict(header, **fields), bits_payload(support), payload), support


def changed(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where two flat tensors differ bitwise, and ``new``'s values there, in order."""
    if not jit.enabled() or new.element_size() not in (1, 2, 4, 8):
        support = ~same_bits(new, old)
        return support, new[support]
    words = int_view(new)
    where = np.empty(new.numel(), dtype=np.bool_)
    picked = np.empty(new.numel() + 1, dtype=words.dtype)  # one spare slot (see kernels.changed_values)
    count = kernels.changed_values(words, int_view(old), where, picked)
    return torch.from_numpy(where), from_words(picked[:count].copy(), new.dtype)


def decode_support(header: dict, parts: list[memoryview]) -> torch.Tensor:
    return unbits(parts[0], numel_of(header["shape"]))


def decode_delta(header: dict, parts: list[memoryview], parent: torch.Tensor, reuse: bool = False
                 ) -> torch.Tensor:
    """The tensor a ``delta`` blob holds, from its parent's. ``reuse``: the caller hands ``parent`` over (a
    fresh decode nobody else holds), so the changes are written into it instead of into a copy."""
    support = decode_support(header, parts)
    return scatter_into(_writable_flat(parent, reuse), support,
                        delta_values(header, parts, support)).reshape(header["shape"])


def _writable_flat(t: torch.Tensor, reuse: bool) -> torch.Tensor:
    flat = t.detach().to("cpu").reshape(-1)
    return flat if reuse and flat.is_contiguous() and flat.data_ptr() == t.data_ptr() else flat.clone()


def _np_bool(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").reshape(-1).numpy().astype(np.bool_, copy=False)


def _joined(chunk: list[np.ndarray]) -> np.ndarray:
    """Up to 8 bool arrays as one byte per position, array ``j`` in bit ``j``."""
    comb = chunk[0].view(np.uint8).copy()
    for j, m in enumerate(chunk[1:], start=1):
        comb |= m.view(np.uint8) << j
    return comb


def _unjoined(picked: np.ndarray, count: int) -> list[np.ndarray]:
    return [((picked >> j) & 1).view(np.bool_) for j in range(count)]


def _select_jointly(masks: list[np.ndarray], where: np.ndarray) -> list[np.ndarray]:
    """``[m[where] for m in masks]`` with one selection pass per 8 masks (bits of a uint8 each)."""
    out = []
    for start in range(0, len(masks), 8):
        chunk = masks[start:start + 8]
        if jit.enabled():
            picked = np.empty(int(np.count_nonzero(where)) + 1, dtype=np.uint8)  # one spare slot
            kernels.select(_joined(chunk), where, picked)
            picked = picked[:-1]
        else:
            picked = _joined(chunk)[where]
        out += _unjoined(picked, len(chunk))
    return out


def _split_jointly(masks: list[np.ndarray], where: np.ndarray) -> list[np.ndarray]:
    """``[concat(m[where], m[~where]) for m in masks]``: each mask's bits, those at ``where`` first."""
    if not jit.enabled():
        inside, outside = _select_jointly(masks, where), _select_jointly(masks, ~where)
        return [np.concatenate([a, b]) for a, b in zip(inside, outside)]
    out = []
    for start in range(0, len(masks), 8):
        chunk = masks[start:start + 8]
        both = np.empty(where.size, dtype=np.uint8)
        kernels.split_by(_joined(chunk), where, both)
        out += _unjoined(both, len(chunk))
    return out


def _changes_outside(new: np.ndarray, old: np.ndarray, support: np.ndarray) -> bool:
    """Whether two bool maps differ anywhere ``support`` is false."""
    if jit.enabled():
        return bool(kernels.differs_outside(new, old, support))
    return bool(((new != old) & ~support).any())


def code_masks(key: str, masks: list[torch.Tensor], parents: list[tuple[str, torch.Tensor | None, int] | None],
               support: tuple[str, torch.Tensor] | None = None,
               context: tuple[str, torch.Tensor] | None = None) -> list[tuple[dict, np.ndarray]]:
    """Members (entry, stored bits) for the masks of several entries on one tensor.

    A mask is coded against its ``parent`` (pack digest, mask, depth) where
    its change lies inside ``support`` (delta blob digest, its support map):
    only the bits at support positions are kept. A parent given without its
    mask (``None``) is taken on the caller's word to differ only inside
    ``support``, and is not checked. Otherwise it is stored
    whole; with a ``context`` (blob digest, a bool map the decoder rebuilds,
    such as where the merged vector is nonzero) its bits are ordered by the
    context, so that a mask predictable on one side costs almost nothing
    there. Selections are shared by all masks, since they cost more than
    the rest.
    """
    flats = [_np_bool(m) for m in masks]
    sup = _np_bool(support[1]) if support is not None else None
    ctx = _np_bool(context[1]) if context is not None else None
    members: list[dict | None] = [None] * len(masks)
    deltas, wholes = [], []
    for i, (mask, parent) in enumerate(zip(masks, parents)):
        members[i] = {"key": key, "shape": list(mask.shape)}
        if parent is not None and sup is not None and parent[2] < MAX_DEPTH and flats[i].size == sup.size:
            if parent[1] is None or (parent[1].numel() == sup.size
                                     and not _changes_outside(flats[i], _np_bool(parent[1]), sup)):
                members[i].update(parent=parent[0], support=support[0], depth=parent[2] + 1)
                deltas.append(i)
                continue
        wholes.append(i)
    bits: list[np.ndarray | None] = [None] * len(masks)
    for i, b in zip(deltas, _select_jointly([flats[i] for i in deltas], sup) if deltas else []):
        bits[i] = b
    if wholes and ctx is not None and ctx.size == flats[wholes[0]].size:
        for i, ordered in zip(wholes, _split_jointly([flats[i] for i in wholes], ctx)):
            members[i]["context"] = context[0]
            bits[i] = ordered
    else:
        for i in wholes:
            bits[i] = flats[i]
    return [(m, b) for m, b in zip(members, bits)]


@dataclass
class MaskPackBuilder:
    """Collects one entry's masks for several tensors and writes them as one ``maskpack`` blob."""

    members: list[dict] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)

    def add_coded(self, member: dict, bits: np.ndarray) -> None:
        """Add a member made by :func:`code_masks`."""
        self.members.append(dict(member, nbits=int(bits.size)))
        self.chunks.append(np.packbits(bits))

    def add(self, key: str, mask: torch.Tensor, parent: tuple[str, torch.Tensor, int] | None = None,
            support: tuple[str, torch.Tensor] | None = None, context: tuple[str, torch.Tensor] | None = None,
            ) -> None:
        """Add one mask, coded as :func:`code_masks` says."""
        [(member, bits)] = code_masks(key, [mask], [parent], support, context)
        self.add_coded(member, bits)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def numel(self) -> int:
        return sum(m["nbits"] for m in self.members)

    def finish(self) -> bytes:
        """The blob: part 0 the members (JSON, zstd), part 1 every member's bits in one zstd stream."""
        payload = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.uint8)
        members = json.dumps(self.members, separators=(",", ":")).encode()
        return pack({"codec": "maskpack", "count": len(self.members)}, zstd(members), zstd(payload.data))


def pack_members(parts: list[memoryview]) -> list[dict]:
    """The member list of a ``maskpack`` blob (key, shape, nbits and, where coded, parent/support/context)."""
    return json.loads(unzstd(parts[0]))


def linked_digests(header: dict, parts: list[memoryview]) -> set[str]:
    """Blobs that decoding this one reads: parents, supports and contexts."""
    out = {header["parent"]} if "parent" in header else set()
    if header.get("codec") == "maskpack":
        for m in pack_members(parts):
            out |= {m[f] for f in ("parent", "support", "context") if f in m}
    return out


def member_bits(members: list[dict], payload: bytes, key: str) -> tuple[dict, torch.Tensor]:
    """One member's entry and its stored bits, from a decompressed ``maskpack`` payload."""
    offset = 0
    for m in members:
        nbytes = (m["nbits"] + 7) // 8
        if m["key"] == key:
            raw = np.frombuffer(payload, dtype=np.uint8, count=nbytes, offset=offset)
            return m, torch.from_numpy(np.unpackbits(raw, count=m["nbits"]).view(np.bool_))
        offset += nbytes
    raise KeyError(key)


def decompress_pack(parts: list[memoryview]) -> bytes:
    return unzstd(parts[1])


def apply_mask_change(old: torch.Tensor, support: torch.Tensor, bits: torch.Tensor, shape: list[int],
                      reuse: bool = False) -> torch.Tensor:
    """A mask from its parent's and the bits that changed at ``support`` (``reuse``: as in :func:`decode_delta`)."""
    return scatter_into(_writable_flat(old, reuse), support, bits).reshape(shape)


def full_mask(bits: torch.Tensor, shape: list[int], context: torch.Tensor | None = None) -> torch.Tensor:
    if bits.numel() != numel_of(shape):
        raise ValueError("mask member size does not match its shape")
    if context is None:
        return bits.reshape(shape)
    out = torch.empty_like(bits)
    inside = count_true(context)
    if jit.enabled():
        flat = bits.numpy().view(np.uint8)
        kernels.merge_by(flat[:inside], flat[inside:], context.numpy(), out.numpy().view(np.uint8))
    else:
        out[context] = bits[:inside]
        out[~context] = bits[inside:]
    return out.reshape(shape)


def delta_values(header: dict, parts: list[memoryview], support: torch.Tensor) -> torch.Tensor:
    """The new values a ``delta`` blob holds, in support order."""
    return unplanes(parts[1], dtype_of(header["dtype"]), [count_true(support)], header.get("layout"))
