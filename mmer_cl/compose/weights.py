"""Per-route LLM weights held as one dense tensor plus a few compact vectors.

For an LLM tensor with base ``theta_0``, merged vector ``tau_*`` and masks
``m_r``, route ``r`` runs on ``theta_0 + scale_r * m_r * tau_*`` (route 0 is the
base, route 1 the merged LLM ``theta_0 + tau_*``, routes 2.. the entries).
Only where ``theta_0`` and ``theta_0 + tau_*`` differ can two routes differ, so
a :class:`RoutedTensor` holds:

* ``working``: ONE dense tensor in the base dtype, currently equal to some
  route's weights (the *resident* route), which the LLM module uses directly;
* ``nz``: a bitmap of the positions where the base and the merged-applied
  weight (:func:`mmer_cl.method.reconstruct.reconstruct` with mask 1) differ in their
  bit patterns (1 bit per parameter; where ``tau_*`` is nonzero when some route
  has ``scale != 1``);
* at those positions, the XOR of the two bit patterns, split in halves: the low
  half of every XOR (1 byte each for bf16/fp16), and the high half only where
  it is nonzero (a bitmap over the positions, then the values): a ``tau_*``
  small against the weight changes only its low bits, not its sign or exponent
  (32% of positions need the high half in the benchmark, whose perturbations
  are ~10% of a weight; fewer for a typical fine-tune);
* each ENTRY route's mask restricted to those positions (1 bit per position;
  the base's and the merged route's are all zeros / all ones, never stored);
* ``tau`` values at those positions, only when some route has ``scale != 1``
  (the ``emr`` rule): those routes are materialised with the exact float math.

With ``scale == 1`` a route's weights equal :func:`reconstruct` bit for bit:
where ``m_r = 1`` the value is the merged-applied one, elsewhere it is
``theta_0`` (``theta_0 + 0`` rounds back to ``theta_0``). Switching the
resident route XORs the positions where the two masks differ, in place and
exactly; a mixed input switches the working tensor route by route (the per-token
routing in :mod:`mmer_cl.compose.routing`), so no second dense copy is made.
Routes that cannot live in the working tensor (``scale != 1``, or rows an entry
appends) are materialised as dense copies into a bounded :class:`WeightCache`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from mmer_cl.compose.bits import int_view_dtype, pack_bits, unpack_bits
from mmer_cl.method.reconstruct import reconstruct

BASE, MERGED = 0, 1
CHUNK = 1 << 18  # elements per step when building or toggling (a multiple of 8); temporaries ~ 10 x CHUNK bytes
_HALF = {torch.int16: torch.uint8, torch.int32: torch.int16, torch.int64: torch.int32}


def bit_slice(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Booleans ``start:start+count`` of the bits packed in ``packed`` (unpacking only the bytes that hold them)."""
    lo = start // 8
    return unpack_bits(packed[lo:(start + count + 7) // 8], start - 8 * lo + count)[start - 8 * lo:]


def expand(where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A dense tensor holding ``values`` in order at the True positions of the 1-D bool ``where``, zeros elsewhere
    (``zeros.masked_scatter_(where, values)``, about four times faster: a running count then a gather)."""
    rank = where.cumsum(0, dtype=torch.int32)  # at a True position: 1 + the index of its value
    padded = torch.cat([values.new_zeros(1), values])
    return padded.index_select(0, rank) * where


class WeightCache:
    """Least-recently-used dense weights, bounded in bytes (0 disables it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[int, int]) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return t

    def put(self, key: tuple[int, int], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = t
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class RoutedTensor:
    """One LLM tensor, servable as any route's weights; see the module docstring.

    Built in two steps, so that only one full-size input is alive at a time:
    ``RoutedTensor(name, base, merged)`` (then ``merged`` can be freed), then
    :meth:`add_route` once per entry, in entry order (each mask freed after).
    """

    def __init__(self, name: str, base: torch.Tensor, merged: torch.Tensor,
                 masks: list[torch.Tensor | None] | None = None, scales: list[float] | None = None,
                 extras: list[torch.Tensor | None] | None = None, *, keep_tau: bool = False):
        """``keep_tau``: some entry route will have ``scale != 1`` (keep ``tau_*`` where it is nonzero).
        ``masks`` / ``scales`` / ``extras``, if given, are added as entry routes at once (see :meth:`add_route`)."""
        if base.shape != merged.shape:
            raise ValueError(f"{name}: base {tuple(base.shape)} and merged {tuple(merged.shape)} differ in shape")
        if scales is not None:
            keep_tau = keep_tau or any(float(s) != 1.0 for s in scales)
        self.name = name
        self.shape = base.shape
        self.dtype = base.dtype
        self.numel = base.numel()
        self.working = base.detach().contiguous().clone() if base.requires_grad else base.contiguous()
        flat_b, flat_m = self.working.view(-1), merged.reshape(-1)
        iv = self.iv = int_view_dtype(self.dtype)
        half = _HALF[iv]
        nz_parts, lows, high_bits, highs, taus, self._chunk_nnz, self._chunk_high = [], [], [], [], [], [], []
        for start in range(0, self.numel, CHUNK):  # in chunks: the temporaries stay small
            sl = slice(start, start + CHUNK)
            b, t = flat_b[sl], flat_m[sl]
            applied = reconstruct(b, torch.ones_like(b, dtype=torch.bool), t, 1.0, dtype=self.dtype)
            flip = b.view(iv) ^ applied.view(iv)
            keep = (t != 0) if keep_tau else ((flip != 0) & (t != 0))
            del applied
            nz_parts.append(pack_bits(keep))
            halves = flip[keep].view(half).view(-1, 2)  # (low, high) halves, little-endian
            lows.append(halves[:, 0].clone())
            hnz = halves[:, 1] != 0
            high_bits.append(hnz)
            highs.append(halves[:, 1][hnz].clone())
            self._chunk_nnz.append(int(keep.sum()))
            self._chunk_high.append(int(hnz.sum()))
            if keep_tau:
                taus.append(t[keep].clone())
        self.nz = torch.cat(nz_parts) if nz_parts else torch.empty(0, dtype=torch.uint8)
        self.nnz = sum(self._chunk_nnz)
        self.low = torch.cat(lows) if lows else torch.empty(0, dtype=half)
        self.high_nz = pack_bits(torch.cat(high_bits)) if high_bits else torch.empty(0, dtype=torch.uint8)
        self.high = torch.cat(highs) if highs else torch.empty(0, dtype=half)
        self.tau = torch.cat(taus) if keep_tau and taus else None
        self.keep_tau = keep_tau
        self.scales = [1.0, 1.0]
        self.route_bits: list[torch.Tensor | None] = [None, None]  # base: all zeros, merged: all ones (implicit)
        self.extras: list[torch.Tensor | None] = [None, None]
        self.resident = BASE
        for i, m in enumerate(masks or []):
            self.add_route(m, scales[i] if scales else 1.0, extras[i] if extras else None)

    def add_route(self, mask: torch.Tensor | None, scale: float = 1.0, extra: torch.Tensor | None = None) -> int:
        """Add the next entry route (``None`` mask = all ones); ``extra``: rows the entry appends. Returns its id."""
        if float(scale) != 1.0 and not self.keep_tau:
            raise ValueError(f"{self.name}: a route with scale {scale} needs keep_tau=True at construction")
        if mask is None:
            bits = pack_bits(torch.ones(self.nnz, dtype=torch.bool))
        else:
            flat = mask.reshape(-1)
            sel = []
            for i, start in enumerate(range(0, self.numel, CHUNK)):
                if self._chunk_nnz[i]:
                    nzc = unpack_bits(self.nz[start // 8:(start + CHUNK) // 8], min(CHUNK, self.numel - start))
                    sel.append(flat[start:start + CHUNK][nzc].bool())
            bits = pack_bits(torch.cat(sel) if sel else torch.zeros(0, dtype=torch.bool))
        self.route_bits.append(bits)
        self.scales.append(float(scale))
        self.extras.append(extra)
        return len(self.route_bits) - 1

    # ---- sizes ----------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        """Bytes held, by part: the working tensor, the merged vector (bitmap, XOR halves, tau), masks, extra rows."""
        return {"working": _nbytes(self.working),
                "merged": _nbytes(self.nz) + _nbytes(self.low) + _nbytes(self.high_nz) + _nbytes(self.high)
                + _nbytes(self.tau),
                "masks": sum(_nbytes(b) for b in self.route_bits),
                "extras": sum(_nbytes(e) for e in self.extras)}

    def held_bytes(self) -> int:
        """Bytes this tensor holds: the working tensor, the bitmaps and the compact vectors."""
        return sum(self.sizes().values())

    def can_reside(self, route: int) -> bool:
        """Whether ``route`` can live in the working tensor (exact toggling needs scale 1, no extra rows)."""
        return self.scales[route] == 1.0 and self.extras[route] is None

    # ---- toggling -------------------------------------------------------------------------
    def _flip(self) -> torch.Tensor:
        """The XOR patterns at the ``nz`` positions (nnz integers of the weights' width)."""
        return self._flip_part(0, self.nnz, 0, self.high.numel())

    def _flip_part(self, start: int, count: int, hstart: int, hcount: int) -> torch.Tensor:
        """XOR patterns ``start:start+count`` (their high halves are ``high[hstart:hstart+hcount]``)."""
        low = self.low[start:start + count]
        if hcount:
            high = expand(bit_slice(self.high_nz, start, count), self.high[hstart:hstart + hcount])
        else:
            high = torch.zeros_like(low)
        return torch.stack([low, high], dim=1).view(self.iv).view(-1)

    def _diff(self, src: int, dst: int, start: int = 0, count: int | None = None) -> torch.Tensor | None:
        """Where routes ``src`` and ``dst`` differ, among the ``nz`` positions ``start:start+count`` (default:
        all); None: everywhere."""
        count = self.nnz - start if count is None else count
        a, b = self.route_bits[src], self.route_bits[dst]
        if a is None and b is None:  # base <-> merged
            return None if src != dst else torch.zeros(count, dtype=torch.bool)
        lo, hi = start // 8, (start + count + 7) // 8  # only the bytes holding these bits
        if a is None:
            bits = b[lo:hi] if src == BASE else torch.bitwise_not(b[lo:hi])
        elif b is None:
            bits = a[lo:hi] if dst == BASE else torch.bitwise_not(a[lo:hi])
        else:
            bits = torch.bitwise_xor(a[lo:hi], b[lo:hi])
        return bit_slice(bits, start % 8, count)

    def _toggle(self, target: torch.Tensor, src: int, dst: int) -> None:
        """Turn ``target`` (holding route ``src``, resident-able) into route ``dst`` in place.

        Chunk by chunk (every temporary is chunk-sized), the XOR patterns of
        the positions where the two routes' masks differ are scattered densely
        (no index arrays) and XORed in.
        """
        if src == dst or self.nnz == 0:
            return
        flat = target.view(-1).view(self.iv)
        offset = hoffset = 0
        for i, start in enumerate(range(0, self.numel, CHUNK)):
            count, hcount = self._chunk_nnz[i], self._chunk_high[i]
            if count:
                stop = min(start + CHUNK, self.numel)
                flip = self._flip_part(offset, count, hoffset, hcount)
                diff = self._diff(src, dst, offset, count)
                if diff is not None:
                    flip *= diff
                nzc = unpack_bits(self.nz[start // 8:(stop + 7) // 8], stop - start)
                flat[start:stop].bitwise_xor_(expand(nzc, flip))
            offset += count
            hoffset += hcount

    def make_resident(self, route: int) -> torch.Tensor:
        """Switch the working tensor to ``route`` (exact, in place) and return it."""
        self._toggle(self.working, self.resident, route)
        self.resident = route
        return self.working

    def _positions(self) -> torch.Tensor:
        return unpack_bits(self.nz, self.numel).nonzero().squeeze(1)

    def _sel(self, route: int) -> torch.Tensor:
        bits = self.route_bits[route]
        if bits is None:
            return torch.full((self.nnz,), route == MERGED, dtype=torch.bool)
        return unpack_bits(bits, self.nnz)

    def materialise(self, route: int) -> torch.Tensor:
        """A new dense tensor holding ``route``'s weights (the working tensor is left as it is)."""
        out = self.working.clone()
        if self.can_reside(route):
            self._toggle(out, self.resident, route)
            return out
        self._toggle(out, self.resident, BASE)
        if self.nnz:
            sel = self._sel(route)
            pos = self._positions()[sel]
            flat = out.view(-1)
            if self.scales[route] == 1.0:
                flat.view(self.iv)[pos] ^= self._flip()[sel]
            else:
                vals = flat[pos]
                flat[pos] = reconstruct(vals, torch.ones_like(vals, dtype=torch.bool), self.tau[sel],
                                        self.scales[route], dtype=self.dtype)
        extra = self.extras[route]
        if extra is not None:
            out = torch.cat([out, extra.to(out.dtype)])
        return out

    def get(self, route: int, cache: WeightCache) -> torch.Tensor:
        """``route``'s weights: the working tensor when resident there, else a cached dense copy."""
        if route == self.resident:
            return self.working
        key = (id(self), route)
        t = cache.get(key)
        if t is None:
            t = self.materialise(route)
            cache.put(key, t)
        return t
