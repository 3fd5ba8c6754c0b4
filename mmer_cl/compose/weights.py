"""Per-route LLM weights held as one dense tensor plus a few compact vectors.

For an LLM tensor with base ``theta_0``, merged vector ``tau_*`` and masks
``m_r``, route ``r`` runs on ``theta_0 + scale_r * m_r * tau_*`` (route 0 is the
base, route 1 the merged LLM ``theta_0 + tau_*``, routes 2.. the entries).
Only where ``tau_* != 0`` can two routes differ, so a :class:`RoutedTensor`
holds:

* ``working``: ONE dense tensor in the base dtype, currently equal to some
  route's weights (the *resident* route), which the LLM module uses directly;
* ``nz``: a bitmap of ``tau_* != 0`` (1 bit per parameter);
* ``flip``: at those positions, the XOR of the bit patterns of ``theta_0`` and
  of ``reconstruct(theta_0, 1, tau_*)`` (the merged-applied weight, computed by
  :func:`mmer_cl.reconstruct.reconstruct`), so toggling a position between its
  base and its merged value is an exact, reversible XOR;
* each route's mask restricted to those positions (1 bit per nonzero);
* ``tau`` values at those positions, only when some route has ``scale != 1``
  (the ``emr`` rule): those routes are materialised with the exact float math.

With ``scale == 1`` a route's weights equal :func:`reconstruct` bit for bit:
where ``m_r = 1`` the value is the merged-applied one, elsewhere it is
``theta_0`` (``theta_0 + 0`` rounds back to ``theta_0``). Switching the
resident route XORs the positions where the two masks differ; other routes
are materialised as dense copies into a bounded :class:`WeightCache`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from mmer_cl.compose.bits import int_view_dtype, pack_bits, unpack_bits
from mmer_cl.reconstruct import reconstruct

BASE, MERGED = 0, 1
CHUNK = 1 << 20  # elements per step when building or toggling (a multiple of 8)


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


class RoutedTensor:
    """One LLM tensor, servable as any route's weights; see the module docstring."""

    def __init__(self, name: str, base: torch.Tensor, merged: torch.Tensor, masks: list[torch.Tensor | None],
                 scales: list[float], extras: list[torch.Tensor | None] | None = None):
        """``masks[i]`` / ``scales[i]`` / ``extras[i]`` describe entry route ``i + 2`` (``None`` mask = all ones);
        ``extras`` are rows an entry appends (a grown vocabulary), kept verbatim."""
        if base.shape != merged.shape:
            raise ValueError(f"{name}: base {tuple(base.shape)} and merged {tuple(merged.shape)} differ in shape")
        self.name = name
        self.shape = base.shape
        self.dtype = base.dtype
        self.numel = base.numel()
        self.working = base.detach().contiguous().clone() if base.requires_grad else base.contiguous()
        flat_b, flat_m = self.working.view(-1), merged.reshape(-1)
        nz = flat_m != 0
        self.nz = pack_bits(nz)
        self.nnz = int(nz.sum())
        self.scales = [1.0, 1.0] + [float(s) for s in scales]
        keep_tau = any(s != 1.0 for s in self.scales)
        iv = int_view_dtype(self.dtype)
        flips, taus, sels = [], [], [[] for _ in masks]
        for start in range(0, self.numel, CHUNK):  # in chunks: the temporaries stay small
            sl = slice(start, start + CHUNK)
            nzc = nz[sl]
            b, t = flat_b[sl][nzc], flat_m[sl][nzc]
            applied = reconstruct(b, torch.ones_like(b, dtype=torch.bool), t, 1.0, dtype=self.dtype)
            flips.append(b.view(iv) ^ applied.view(iv))
            if keep_tau:
                taus.append(t.clone())
            for i, m in enumerate(masks):
                sels[i].append(torch.ones(len(b), dtype=torch.bool) if m is None else m.reshape(-1)[sl][nzc].bool())
        self.flip = torch.cat(flips) if flips else torch.empty(0, dtype=iv)
        self.tau = torch.cat(taus) if keep_tau and taus else None
        self.route_bits = [pack_bits(torch.zeros(self.nnz, dtype=torch.bool)),
                           pack_bits(torch.ones(self.nnz, dtype=torch.bool))]
        self.route_bits += [pack_bits(torch.cat(sel)) if sel else pack_bits(torch.zeros(0, dtype=torch.bool))
                            for sel in sels]
        self.extras = [None, None] + list(extras or [None] * len(masks))
        self.resident = BASE

    # ---- sizes ----------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes this tensor holds: the working tensor, the bitmaps and the compact vectors."""
        n = self.working.numel() * self.working.element_size() + self.nz.numel() + self.flip.numel() * \
            self.flip.element_size() + sum(b.numel() for b in self.route_bits)
        if self.tau is not None:
            n += self.tau.numel() * self.tau.element_size()
        return n + sum(e.numel() * e.element_size() for e in self.extras if e is not None)

    def can_reside(self, route: int) -> bool:
        """Whether ``route`` can live in the working tensor (exact toggling needs scale 1, no extra rows)."""
        return self.scales[route] == 1.0 and self.extras[route] is None

    # ---- toggling -------------------------------------------------------------------------
    def _positions(self) -> torch.Tensor:
        return unpack_bits(self.nz, self.numel).nonzero().squeeze(1)

    def _sel(self, route: int) -> torch.Tensor:
        return unpack_bits(self.route_bits[route], self.nnz)

    def _toggle(self, target: torch.Tensor, src: int, dst: int) -> None:
        """Turn ``target`` (holding route ``src``, resident-able) into route ``dst`` in place.

        Chunk by chunk, the XOR patterns of the positions where the two routes'
        masks differ are scattered densely (no index arrays) and XORed in.
        """
        if src == dst or self.nnz == 0:
            return
        diff = self._sel(src) ^ self._sel(dst)
        flip = torch.where(diff, self.flip, torch.zeros((), dtype=self.flip.dtype))
        flat = target.view(-1).view(self.flip.dtype)
        offset = 0
        for start in range(0, self.numel, CHUNK):
            stop = min(start + CHUNK, self.numel)
            nzc = unpack_bits(self.nz[start // 8:(stop + 7) // 8], stop - start)
            count = int(nzc.sum())
            if count:
                dense = torch.zeros(stop - start, dtype=flip.dtype).masked_scatter_(nzc, flip[offset:offset + count])
                flat[start:stop].bitwise_xor_(dense)
            offset += count

    def make_resident(self, route: int) -> torch.Tensor:
        """Switch the working tensor to ``route`` (exact, in place) and return it."""
        self._toggle(self.working, self.resident, route)
        self.resident = route
        return self.working

    def materialise(self, route: int) -> torch.Tensor:
        """A new dense tensor holding ``route``'s weights (the working tensor is left as it is)."""
        if self.can_reside(route):
            out = self.working.clone()
            self._toggle(out, self.resident, route)
            return out
        out = self.working.clone()
        self._toggle(out, self.resident, BASE)
        if self.nnz:
            sel = self._sel(route)
            pos = self._positions()[sel]
            flat = out.view(-1)
            if self.scales[route] == 1.0:
                flat.view(self.flip.dtype)[pos] ^= self.flip[sel]
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
