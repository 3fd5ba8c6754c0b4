"""An expansion in three steps, so that it runs on one machine or spread over workers.

1. :func:`plan_expansion` (the driver, which reads the registry): the
   members in merge order, and for every LLM tensor the blobs a worker will
   read (task vectors, the previous version's merged vector and masks) and
   the cached trims. The plan is plain picklable data.
2. :func:`expand_group` (anywhere the blob store is reachable): for one group
   of tensors, decode the task vectors, merge, mask, code the results
   against the previous version and write the blobs. It needs only the blob
   store, never the registry. :func:`run_plan` runs every group here, reading
   the next tensor's blobs on a second thread while it computes.
3. :func:`commit_expansion` (the driver): the version, its members, its blob
   rows and the new trims in one registry transaction.

Groups: a large tensor alone, consecutive small ones together, so that the
masks of small tensors share one blob (see :mod:`storage.delta`).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from mmer_cl.store.derived_masks import DERIVED, derivable
from mmer_cl.checkpoints.dtypes import is_float_code
from mmer_cl.errors import MmerError
from mmer_cl.method.expansion import expand_tensor, expand_tensor_streamed
from mmer_cl.method.masks import emr_rescale
from mmer_cl.runtime.interrupts import raise_if_interrupted
from mmer_cl.method.merging import TrimThreshold
from mmer_cl.method.params import MergeParams
from mmer_cl.runtime.prefetch import prefetched
from mmer_cl.checkpoints.references import TensorReference, is_reference, read_task_vector
from mmer_cl.runtime.threads import torch_single_threaded
from mmer_cl.runtime.write_behind import write_behind
from registry import BaseTensor, BlobRef, EntryRecord, Member, Registry, Trim, VersionRecord
from storage import BlobStore, TensorReader, delta, encode
from storage.codecs import count_true, int_view, split_nonzero
from storage.delta import MaskPackBuilder, code_masks, encode_delta

PACK_TARGET = 1 << 22  # parameters per group of small tensors
DEFAULT_MEMORY_BUDGET = 3 << 29  # 1.5 GiB: see memory_budget


def memory_budget() -> int:
    """Bytes an expansion may spend on decoded task vectors (``MMER_EXPAND_MEMORY``, default 1.5 GiB).

    A tensor whose members' float32 task vectors would together exceed a quarter of it (the current
    tensor's and the next one's, read ahead, then each with its temporaries) is streamed: its task
    vectors are decoded one at a time and folded in (:func:`mmer_cl.method.expansion.expand_tensor_streamed`).
    What stays in memory then grows with the largest tensor (about 14 bytes per parameter: the fold and
    one task vector) but not with the number of entries.
    """
    text = os.environ.get("MMER_EXPAND_MEMORY", "").strip().upper()
    if not text:
        return DEFAULT_MEMORY_BUDGET
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise MmerError(f"MMER_EXPAND_MEMORY={text!r} is not a size; give bytes or a number with K, M or G "
                        "(e.g. 1.5G)") from None
    if value <= 0:
        raise MmerError(f"MMER_EXPAND_MEMORY must be positive, got {text!r}")
    return int(value)


def _streams(numel: int, members: int, params: MergeParams, budget: int) -> bool:
    """Whether one tensor's task vectors are decoded one at a time (see :func:`memory_budget`)."""
    return (params.incremental and params.mask_rule in ("mmer", "emr") and members > 1
            and 4 * numel * members > budget // 4)
Put = Callable[[bytes], str]
Progress = Callable[[int, int, str], None]


def llm_shapes(tensors: Iterable[BaseTensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of the base's float tensors, in base order: the ones merging works on."""
    return {t.name: t.shape for t in tensors if is_float_code(t.dtype)}


@dataclass(frozen=True)
class PlanMember:
    entry_id: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """One LLM tensor: the blobs to read, per member in merge order."""

    key: str
    numel: int
    task_vectors: tuple[str, ...]  # blob digests, or reference specs (mmer_cl.checkpoints.references)
    thresholds: tuple[tuple[int, int] | None, ...]
    prev_merged: str | None
    prev_masks: tuple[str | None, ...]
    rebase: bool = False  # written whole, not coded against the previous version (see rebase_phases)
    streamed: bool = False  # its task vectors decoded one at a time, not all at once (see memory_budget)


@dataclass(frozen=True)
class ExpansionPlan:
    base_id: int
    params: MergeParams
    members: tuple[PlanMember, ...]
    groups: tuple[tuple[TensorJob, ...], ...]
    previous: int | None
    incremental: bool
    new_members: tuple[str, ...]
    # the earlier members' masks can change only where the merged vector does, so the previous
    # version's masks are not read: each is coded against its parent at the merged vector's changes
    masks_follow_merged: bool = False
    # per member: its masks are not written, readers compute them from its task vector and the merged vector
    # (see mmer_cl.store.derived_masks); entries registered by reference keep stored masks, which need no source
    derive_masks: tuple[bool, ...] = ()

    @property
    def jobs(self) -> list[TensorJob]:
        return [job for group in self.groups for job in group]


@dataclass
class GroupResult:
    refs: list[BlobRef] = field(default_factory=list)
    trims: list[Trim] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    abs_sums: list[list[float]] = field(default_factory=list)
    numel: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: read, merge_and_masks, code

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def _spaced(groups: Sequence[tuple[TensorJob, ...]]) -> tuple[tuple[TensorJob, ...], ...]:
    """The groups reordered largest, smallest, second largest, second smallest, ...

    The read-ahead thread decodes the next group's task vectors while the main thread still holds the
    current one's, so two large groups side by side (a checkpoint's alphabetical order puts ``lm_head``
    next to ``model.embed_tokens``) set the peak memory. Deterministic: ties go by the first key.
    """
    by_size = sorted(groups, key=lambda g: (-sum(j.numel for j in g), g[0].key))
    order, low, high = [], 0, len(by_size) - 1
    while low <= high:
        order.append(by_size[low])
        low += 1
        if low <= high:
            order.append(by_size[high])
            high -= 1
    return tuple(order)


def _groups(jobs: Sequence[TensorJob]) -> tuple[tuple[TensorJob, ...], ...]:
    groups: list[list[TensorJob]] = []
    size = PACK_TARGET
    for job in jobs:
        if job.numel >= PACK_TARGET or size >= PACK_TARGET:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.numel
    return tuple(tuple(g) for g in groups)


def rebase_phases(shapes: dict[str, tuple[int, ...]], period: int) -> dict[str, int]:
    """Per tensor, which versions write it whole: those whose number is its phase modulo ``period``.

    Chains of deltas are cut so that a read never walks more than ``period`` links, but never all at
    once (a whole version costs more than a copy once it holds many masks): the tensors are spread
    over the phases with about the same number of parameters in each, largest first, each to the
    lightest phase so far (ties: the lowest phase, then the tensor name). A function of the base's
    shapes alone, so every version of a store agrees on it.
    """
    load = [0] * period
    phases = {}
    for key, numel in sorted(((k, int(torch.Size(s).numel())) for k, s in shapes.items()),
                             key=lambda kv: (-kv[1], kv[0])):
        phase = min(range(period), key=lambda p: (load[p], p))
        phases[key] = phase
        load[phase] += numel
    return phases


def task_vector_sources(registry: Registry, blobs: BlobStore | None, base_id: int,
                         entry: EntryRecord) -> dict[str, str]:
    """Per base tensor: the digest of the entry's task vector blob, or the reference spec to rebuild it."""
    if not entry.stats.get("referenced"):
        return {r.key: r.digest for r in registry.entry_blobs(entry.id, "task_vector")}
    if blobs is None:
        raise MmerError(f"entry {entry.name!r} is registered by reference; planning needs the blob store")
    [ref] = registry.entry_blobs(entry.id, "reference")
    sources = json.loads(blobs.get(ref.digest))
    base = next(b for b in registry.bases() if b.id == base_id)
    shas = {t.name: t.sha256 for t in registry.base_tensors(base_id)}
    return {key: TensorReference(entry.source_path, s["key"], s["sha256"], s["rows"], base.source_path, key,
                                 shas[key]).spec() for key, s in sources.items()}


def plan_expansion(registry: Registry, base_id: int, entries: Sequence[EntryRecord], params: MergeParams,
                   previous: VersionRecord | None, blobs: BlobStore | None = None, store_masks: bool = False
                   ) -> ExpansionPlan:
    """Decide the merge order and name every blob the expansion reads.

    When the previous version merged a subset of ``entries`` with the same
    merge parameters, its members keep their order and the new entries
    follow, so their cached trims apply (``incremental``). Results are coded
    against ``previous`` wherever that is smaller, whatever the parameters.
    Masks of the ``mmer`` and ``emr`` rules are not stored (readers derive
    them) unless ``store_masks``.
    """
    prev_ids = [m.entry_id for m in previous.members] if previous else []
    ids = {e.id for e in entries}
    incremental = bool(previous and params.incremental and prev_ids and set(prev_ids) <= ids
                       and MergeParams.from_dict(previous.params).merge_key() == params.merge_key())
    if incremental:
        by_id = {e.id: e for e in entries}
        entries = [by_id[i] for i in prev_ids] + [e for e in entries if e.id not in set(prev_ids)]
    task_vectors = {e.id: task_vector_sources(registry, blobs, base_id, e) for e in entries}
    derive = tuple(derivable(params.mask_rule) and not store_masks and not e.stats.get("referenced")
                   for e in entries)
    trims = registry.trims([e.id for e in entries], params.density) if params.incremental else {}
    prev_merged = {r.key: r.digest for r in registry.version_blobs(previous.id, "merged")} if previous else {}
    prev_masks = {(r.entry_id, r.key): r.digest for r in registry.version_blobs(previous.id, "mask")} \
        if previous and not all(derive) else {}
    jobs = []
    shapes = llm_shapes(registry.base_tensors(base_id))
    period = delta.MAX_DEPTH  # so a chain is cut by its phase before the encoders' own limit
    budget = memory_budget()
    phases = rebase_phases(shapes, period)
    number = previous.number + 1 if previous else 1  # the phase this version is at (a rollback repeats one)
    for key, shape in shapes.items():
        missing = [e.name for e in entries if key not in task_vectors[e.id]]
        if missing:
            raise MmerError(f"entries {missing} have no task vector for {key}; run `mmer audit`")
        cached = [trims.get((e.id, key)) for e in entries]
        jobs.append(TensorJob(
            key=key, numel=int(torch.Size(shape).numel()),
            task_vectors=tuple(task_vectors[e.id][key] for e in entries),
            thresholds=tuple((t.bits, t.ties) if t else None for t in cached),
            prev_merged=prev_merged.get(key),
            prev_masks=tuple(None if d else prev_masks.get((e.id, key)) for e, d in zip(entries, derive)),
            rebase=phases[key] == number % period,
            streamed=_streams(int(torch.Size(shape).numel()), len(entries), params, budget)))
    new = tuple(e.name for e in entries if e.id not in set(prev_ids)) if incremental else ()
    follow = incremental and _masks_follow_merged(MergeParams.from_dict(previous.params), params,
                                                  [m.entry_name for m in previous.members])
    return ExpansionPlan(base_id, params, tuple(PlanMember(e.id, e.name) for e in entries), _spaced(_groups(jobs)),
                         previous.number if previous else None, incremental, new, follow, derive)


def _masks_follow_merged(before: MergeParams, now: MergeParams, earlier: Sequence[str]) -> bool:
    """Whether each earlier member's mask is a function of its own task vector and the merged vector at the
    same position, with the same parameters as before: then it changes only where the merged vector changes.
    (``consensus`` masks count every member's votes, so a new member changes them anywhere.)"""
    return (now.mask_rule in ("mmer", "emr") and before.mask_rule == now.mask_rule and before.alpha == now.alpha
            and all(before.lam_for(name) == now.lam_for(name) for name in earlier))


@dataclass
class _Inputs:
    taus: list[torch.Tensor]  # empty for a streamed job: ``stream`` decodes them one at a time
    stream: Callable[[], Iterator[torch.Tensor]] | None
    prev_merged: tuple[torch.Tensor, int] | None
    prev_masks: list[tuple[torch.Tensor | None, int] | None]  # (mask or None where not read, depth)
    read_seconds: float = 0.0  # spent reading and decoding these (on the loader thread)


def task_vector_from_spec(reader: TensorReader, spec: str, device: torch.device, checkpoints: dict) -> torch.Tensor:
    if is_reference(spec):
        return read_task_vector(TensorReference.from_spec(spec), checkpoints, device)
    return reader.tensor(spec).to(device)


def _decoded(reader: TensorReader, digest: str, key: str | None = None, read: bool = True
             ) -> tuple[torch.Tensor | None, int]:
    return reader.tensor(digest, key) if read else None, reader.depth(digest, key)


def decoder_count() -> int:
    """Blobs decoded at once: one per core this process may use, at most 4 (each holds a decode's scratch
    memory). ``MMER_DECODERS``, where set, caps it (a Ray task sets it to its own CPUs)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    allowed = os.environ.get("MMER_DECODERS", "").strip()
    if allowed.isdigit() and int(allowed) > 0:
        cores = min(cores, int(allowed))
    return max(1, min(4, cores))


def _gathered(futures: Sequence[Future | None]) -> list:
    """The futures' results in order; on a failure, the ones not yet started are cancelled first."""
    try:
        return [f.result() if f is not None else None for f in futures]
    except BaseException:
        for f in futures:
            if f is not None:
                f.cancel()
        raise


def _load(reader: TensorReader, job: TensorJob, device: torch.device, checkpoints: dict,
          pool: ThreadPoolExecutor, read_masks: bool) -> _Inputs:
    """Decode one job's blobs, several at once: zstd, sha256 and the compiled plane joins release the GIL.
    Without ``read_masks`` the previous masks are only located (their depth), not decoded."""
    started = time.perf_counter()
    specs = () if job.streamed else job.task_vectors
    taus = [pool.submit(task_vector_from_spec, reader, spec, device, checkpoints) for spec in specs]
    prev = pool.submit(_decoded, reader, job.prev_merged) if job.prev_merged else None
    masks = [pool.submit(_decoded, reader, d, job.key, read_masks) if d else None for d in job.prev_masks]
    done = _gathered([*taus, prev, *masks])
    n = len(taus)
    stream = None
    if job.streamed:
        def stream() -> Iterator[torch.Tensor]:  # one decoding ahead of the one being folded
            return prefetched(task_vector_from_spec(reader, spec, device, checkpoints) for spec in job.task_vectors)
    return _Inputs(done[:n], stream, done[n], done[n + 1:], time.perf_counter() - started)


def _with_inputs(reader: TensorReader, jobs: Sequence[TensorJob], device: torch.device, read_masks: bool
                 ) -> Iterator[tuple[TensorJob, _Inputs]]:
    """The jobs with their decoded inputs, the next one decoding on other threads meanwhile."""
    checkpoints: dict = {}  # referenced checkpoints, opened once (each read opens its file: thread-safe)
    pool = ThreadPoolExecutor(max_workers=decoder_count(), thread_name_prefix="mmer-decode")
    try:
        yield from prefetched((job, _load(reader, job, device, checkpoints, pool, read_masks)) for job in jobs)
    finally:  # no waiting: a decode still running ends on its own, its result unused
        pool.shutdown(wait=False, cancel_futures=True)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (merged vectors and masks alike; -0.0 differs from 0.0)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and bool(np.array_equal(int_view(a.reshape(-1)), int_view(b.reshape(-1)))))


class _GroupWriter:
    """Codes one group's results against the previous version and writes them through ``put``."""

    def __init__(self, plan: ExpansionPlan, put: Put):
        self.plan, self.put = plan, put
        n = len(plan.members)
        self.result = GroupResult(kept=[0] * n, abs_sums=[[0.0, 0.0] for _ in range(n)])
        self.packs = [MaskPackBuilder() for _ in range(n)]
        self.lams = [plan.params.lam_for(m.name) for m in plan.members]

    def add(self, job: TensorJob, inputs: _Inputs) -> None:
        plan, result = self.plan, self.result
        thresholds = [TrimThreshold(*t) if t else None for t in job.thresholds]
        started = time.perf_counter()
        if job.streamed:
            out = expand_tensor_streamed(inputs.stream, len(job.task_vectors), plan.params, tensor_name=job.key,
                                         thresholds=thresholds, lams=self.lams,
                                         keep_masks=not all(plan.derive_masks))
        else:
            out = expand_tensor(inputs.taus, plan.params, tensor_name=job.key, thresholds=thresholds,
                                lams=self.lams)
        inputs.taus.clear()  # the masks are computed: free the task vectors before coding the results
        computed = time.perf_counter()
        result.add_seconds("read", inputs.read_seconds)
        result.add_seconds("merge_and_masks", computed - started)
        for member, known, found in zip(plan.members, thresholds, out.thresholds):
            if known is None and found is not None:
                result.trims.append(Trim(member.entry_id, plan.params.density, job.key, found.bits, found.ties))
        merged = out.merged.cpu()
        coded = None
        if inputs.prev_merged is not None and not job.rebase:
            parent, depth = inputs.prev_merged
            coded = encode_delta(merged, parent, job.prev_merged, depth)
        raw = merged.numel() * merged.element_size()
        split = split_nonzero(merged.reshape(-1))
        nonzero = split[0]  # masks are ordered by it (see MaskPackBuilder.add)
        if coded is not None:
            unchanged = not count_true(coded[1])
        else:  # not coded against it (a chain at its longest, or too many changes): compare directly
            unchanged = inputs.prev_merged is not None and _identical(merged, inputs.prev_merged[0])
        if unchanged:  # the previous blob serves again (a pointer: no longer chain to read)
            digest, support = job.prev_merged, None
            result.refs.append(BlobRef("merged", job.key, digest, 0, raw))
        else:
            blob, support = coded if coded is not None else (encode(merged, split), None)
            digest = self.put(blob)
            result.refs.append(BlobRef("merged", job.key, digest, len(blob), raw))
        masks = [m.cpu() if m is not None else None for m in out.masks]
        for i, mask in enumerate(masks):
            result.kept[i] += out.kept[i] if out.kept is not None else int(np.count_nonzero(mask.numpy()))
            result.abs_sums[i][0] += out.abs_sums[i][0]
            result.abs_sums[i][1] += out.abs_sums[i][1]
        if not all(plan.derive_masks):
            self._add_masks(job, inputs, masks, unchanged, digest, support, nonzero)
        result.numel += job.numel
        result.add_seconds("code", time.perf_counter() - computed)

    def _add_masks(self, job: TensorJob, inputs: _Inputs, masks: list, unchanged: bool, digest: str, support,
                   nonzero) -> None:
        """Code every member's mask against its previous one and add it to the member's pack."""
        plan, result = self.plan, self.result
        parents = []
        masks = [None if derived else m for m, derived in zip(masks, plan.derive_masks)]
        for i, mask in enumerate(masks):
            if mask is None:  # derived on read
                parents.append(None)
                continue
            prev = inputs.prev_masks[i]
            if prev is not None and (unchanged if prev[0] is None else _identical(prev[0], mask)):
                # unchanged: point at the previous pack
                result.refs.append(BlobRef("mask", job.key, job.prev_masks[i], 0, mask.numel(),
                                           plan.members[i].entry_id))
                parents.append(None)
                masks[i] = None
            else:
                parents.append((job.prev_masks[i], prev[0], prev[1]) if prev is not None else None)
        changed = [i for i, m in enumerate(masks) if m is not None]
        coded = code_masks(job.key, [masks[i] for i in changed], [parents[i] for i in changed],
                           (digest, support) if support is not None else None, (digest, nonzero))
        for i, (member, bits) in zip(changed, coded):
            self.packs[i].add_coded(member, bits)

    def finish(self) -> GroupResult:
        for member, pack in zip(self.plan.members, self.packs):
            if not len(pack):
                continue
            blob = pack.finish()
            digest = self.put(blob)
            total, left = pack.numel, len(blob)
            for n, m in enumerate(pack.members):
                share = left if n == len(pack.members) - 1 else len(blob) * m["nbits"] // max(total, 1)
                left -= share
                numel = int(torch.Size(m["shape"]).numel())
                self.result.refs.append(BlobRef("mask", m["key"], digest, share, numel, member.entry_id))
        return self.result


def expand_group(reader: TensorReader, put: Put, plan: ExpansionPlan, group: Sequence[TensorJob],
                 device: torch.device | str = "cpu") -> GroupResult:
    """Expand one group of tensors; every blob is written through ``put``. Needs no registry."""
    return run_plan(reader, put, plan, device, groups=[group])[0]


def run_plan(reader: TensorReader, put: Put, plan: ExpansionPlan, device: torch.device | str = "cpu",
             progress: Progress | None = None,
             groups: Sequence[Sequence[TensorJob]] | None = None) -> list[GroupResult]:
    """Expand ``groups`` (default: all of the plan's) here, one tensor at a time, decoding ahead."""
    groups = plan.groups if groups is None else groups
    device = torch.device(device)
    jobs = [job for g in groups for job in g]
    ends = set()
    count = 0
    for g in groups:
        count += len(g)
        ends.add(count)
    results = []
    with torch_single_threaded(), write_behind(put, depth=1) as put_behind:
        writer = _GroupWriter(plan, put_behind)
        for step, (job, inputs) in enumerate(_with_inputs(reader, jobs, device, not plan.masks_follow_merged),
                                                start=1):
            raise_if_interrupted()
            writer.add(job, inputs)
            if step in ends:
                results.append(writer.finish())
                writer = _GroupWriter(plan, put_behind)
            if progress:
                progress(step, len(jobs), job.key)
    return results


def commit_expansion(registry: Registry, plan: ExpansionPlan, results: Sequence[GroupResult], actor: str,
                     started: float, remove: str | None = None, **annotations) -> VersionRecord:
    """Record the version, in one transaction, once every group has succeeded.

    ``annotations`` (recipe, description, tags) are stored with it.
    """
    n = len(plan.members)
    kept = [sum(r.kept[i] for r in results) for i in range(n)]
    sums = [[sum(r.abs_sums[i][j] for r in results) for j in (0, 1)] for i in range(n)]
    total = max(sum(r.numel for r in results), 1)
    emr = plan.params.mask_rule == "emr"
    members = [Member(m.entry_id, m.name, i, emr_rescale(*sums[i]) if emr else 1.0, kept[i] / total)
               for i, m in enumerate(plan.members)]
    trims = [t for r in results for t in r.trims]
    trimmed = sorted({m.name for m in plan.members for t in trims if t.entry_id == m.entry_id})
    details = {
        "incremental": plan.incremental,
        "new_entries": list(plan.new_members),
        "merge_read": [f"task vector of {m.name}" for m in plan.members],
        "trimmed": [m.name for m in plan.members if m.name in trimmed],
        "coded_against": f"v{plan.previous}" if plan.previous else None,
        "masks": DERIVED if any(plan.derive_masks) else "stored",
        "seconds": round(time.perf_counter() - started, 3),
        # where the time went, summed over tensors (reading runs on a second thread, beside the rest)
        "phase_seconds": {p: round(sum(r.seconds.get(p, 0.0) for r in results), 3)
                          for p in ("read", "merge_and_masks", "code")},
    }
    refs = [ref for r in results for ref in r.refs]
    return registry.add_version(plan.base_id, plan.params.to_dict(), details, members, refs, actor,
                                remove_entry=remove, trims=trims, **annotations)
