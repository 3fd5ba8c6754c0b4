"""The blob store and the tensor codecs."""

import pytest
import torch

from storage import BlobError, BlobStore, CodecError, decode, encode, encode_with, header_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("codec", ["raw", "planes", "sparse"])
def test_float_codecs_round_trip_bit_exact(dtype, codec):
    t = torch.randn(33, 7).to(dtype)
    t[t.abs() < 0.5] = 0
    assert torch.equal(decode(encode_with(t, codec)), t)


def test_masks_cost_about_one_bit_per_entry_or_less():
    mask = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) < 0.5
    blob = encode(mask)
    assert header_of(blob)["codec"] == "bits"
    assert torch.equal(decode(blob), mask)
    assert len(blob) * 8 / mask.numel() < 1.02


def test_byte_planes_beat_plain_zstd_on_bf16_weights():
    w = (torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    assert len(encode_with(w, "planes")) < len(encode_with(w, "raw"))


def test_encode_picks_sparse_for_mostly_zero_vectors():
    t = torch.zeros(10_000)
    t[::10] = torch.randn(1000)
    blob = encode(t)
    assert header_of(blob)["codec"] == "sparse"
    assert torch.equal(decode(blob), t)
    assert header_of(encode(torch.randn(1000)))["codec"] == "planes"


def test_integers_and_scalars_round_trip():
    for t in [torch.arange(10, dtype=torch.int32), torch.tensor(3.5), torch.zeros(0, 4)]:
        assert torch.equal(decode(encode(t)), t)


def test_bad_blob_bytes_are_refused():
    with pytest.raises(CodecError):
        decode(b"nope")


def test_blobs_are_content_addressed_and_deduplicated(tmp_path):
    store = BlobStore(tmp_path)
    a = store.put(b"hello")
    assert store.put(b"hello") == a
    assert len(list(store.digests())) == 1
    assert store.get(a) == b"hello"


def test_damaged_or_missing_blobs_are_detected(tmp_path):
    store = BlobStore(tmp_path)
    a, b = store.put(b"one"), store.put(b"two")
    store.path(a).write_bytes(b"evil")
    store.path(b).unlink()
    assert store.verify(a) == "damaged" and store.verify(b) == "missing"
    with pytest.raises(BlobError, match="damaged"):
        store.get(a)


def test_failed_batch_removes_only_the_blobs_it_created(tmp_path):
    store = BlobStore(tmp_path)
    old = store.put(b"old")
    with pytest.raises(RuntimeError):
        with store.batch() as batch:
            batch.put(b"old")
            batch.put(b"new")
            raise RuntimeError("crash mid-operation")
    assert list(store.digests()) == [old]


def test_a_damaged_blob_of_the_right_size_is_rewritten_by_the_next_put(tmp_path):
    blobs = BlobStore(tmp_path)
    data = b"weights" * 100
    digest = blobs.put(data)
    path = blobs.path(digest)
    flipped = bytearray(data)
    flipped[10] ^= 0x5A
    path.write_bytes(bytes(flipped))  # same size, other content
    assert blobs.verify(digest) == "damaged"
    assert blobs.put(data) == digest
    assert blobs.verify(digest) is None and path.read_bytes() == data
    path.write_bytes(bytes(flipped))
    with blobs.batch() as batch:  # through a batch too: repaired, and not counted as the batch's own
        assert batch.put(data) == digest and batch.created == []
    assert blobs.get(digest) == data
    path.write_bytes(data[:5])  # and one of another size
    blobs.put(data)
    assert blobs.get(digest) == data


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_blob_files_follow_the_umask(tmp_path, umask):
    import os

    old = os.umask(umask)
    try:
        blobs = BlobStore(tmp_path)
        digest = blobs.put(f"under umask {umask:o}".encode())
        blobs.write_marker(b'{"store_id": "x"}')
    finally:
        os.umask(old)
    assert os.stat(blobs.path(digest)).st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(blobs.objects / "mmer-store.json").st_mode & 0o777 == 0o666 & ~umask


def test_a_batch_that_records_nothing_discards_the_blobs_it_created(tmp_path):
    blobs = BlobStore(tmp_path)
    kept = blobs.put(b"there before")
    with blobs.batch() as batch:
        batch.put(b"there before")
        new = batch.put(b"new")
        assert batch.discard() == 1
    assert not blobs.exists(new) and blobs.exists(kept)


def test_gc_removes_unreferenced_blobs_and_temp_files(tmp_path):
    store = BlobStore(tmp_path)
    keep, drop = store.put(b"keep"), store.put(b"drop")
    (store.path(keep).parent / ".tmp-crash").write_bytes(b"x")
    result = store.gc([keep])
    assert (result.removed, result.freed_bytes, result.temp_files) == (1, 4, 1)
    assert list(store.digests()) == [keep] and not store.exists(drop)


def test_digest_names_are_validated(tmp_path):
    with pytest.raises(BlobError, match="not a sha256"):
        BlobStore(tmp_path).path("../../etc/passwd")


def _reader_with(tmp_path):
    from storage import TensorReader

    blobs = BlobStore(tmp_path)
    return blobs, TensorReader(blobs)


def test_a_changed_tensor_is_stored_as_its_changes_to_the_parent(tmp_path):
    from storage.delta import encode_delta

    blobs, reader = _reader_with(tmp_path)
    old = torch.randn(1000, dtype=torch.float32)
    new = old.clone()
    new[::10] = torch.randn(100)
    parent = blobs.put(encode(old))
    blob, support = encode_delta(new, old, parent, 0)
    assert header_of(blob)["codec"] == "delta" and header_of(blob)["parent"] == parent
    assert int(support.sum()) == 100
    digest = blobs.put(blob)
    assert torch.equal(reader.tensor(digest), new)
    assert len(blob) < len(encode(new)) / 3


def test_a_tensor_that_changed_almost_everywhere_is_stored_whole():
    from storage.delta import encode_delta

    old = torch.randn(1000)
    assert encode_delta(old + 1, old, "0" * 64, 0) is None


def test_chains_stop_at_the_maximum_depth():
    from storage.delta import MAX_DEPTH, encode_delta

    old = torch.randn(100)
    new = old.clone()
    new[0] = 5.0
    assert encode_delta(new, old, "0" * 64, MAX_DEPTH - 1) is not None
    assert encode_delta(new, old, "0" * 64, MAX_DEPTH) is None


def test_mask_packs_hold_full_masks_and_changes_confined_to_a_support(tmp_path):
    from storage.delta import MaskPackBuilder, encode_delta

    blobs, reader = _reader_with(tmp_path)
    gen = torch.Generator().manual_seed(0)
    masks = {f"t{i}": torch.rand(8, 8, generator=gen) < 0.7 for i in range(3)}
    first = MaskPackBuilder()
    for key, m in masks.items():
        first.add(key, m)
    pack1 = blobs.put(first.finish())
    assert all(torch.equal(reader.tensor(pack1, k), m) for k, m in masks.items())

    merged_old, merged_new = torch.randn(64), torch.randn(64)
    merged_new[16:] = merged_old[16:]  # only the first quarter of the merged vector changed
    blob, support = encode_delta(merged_new, merged_old, blobs.put(encode(merged_old)), 0)
    merged_digest = blobs.put(blob)
    second = MaskPackBuilder()
    changed = {}
    for key, m in masks.items():
        new = m.clone().reshape(-1)
        new[:16] = ~new[:16]  # changes only inside the support
        changed[key] = new.reshape(8, 8)
        second.add(key, changed[key], parent=(pack1, m, 0), support=(merged_digest, support))
    assert all("parent" in member for member in second.members)
    assert second.numel == 3 * 16  # only the bits inside the support are stored
    pack2 = blobs.put(second.finish())
    assert all(torch.equal(reader.tensor(pack2, k), m) for k, m in changed.items())


def test_a_mask_change_outside_the_support_is_stored_whole():
    from storage.delta import MaskPackBuilder

    old = torch.zeros(16, dtype=torch.bool)
    new = old.clone()
    new[15] = True
    support = torch.zeros(16, dtype=torch.bool)
    support[:4] = True
    pack = MaskPackBuilder()
    pack.add("t", new, parent=("0" * 64, old, 0), support=("1" * 64, support))
    assert "parent" not in pack.members[0] and pack.numel == 16


def test_a_whole_mask_ordered_by_its_context_costs_little_where_the_context_predicts_it(tmp_path):
    from storage.delta import MaskPackBuilder

    blobs, reader = _reader_with(tmp_path)
    gen = torch.Generator().manual_seed(0)
    merged = torch.randn(200_000, generator=gen)
    merged[torch.rand(200_000, generator=gen) < 0.5] = 0
    mask = (torch.rand(200_000, generator=gen) < 0.5) | (merged == 0)  # always kept where merged is 0
    merged_digest = blobs.put(encode(merged))
    plain, ordered = MaskPackBuilder(), MaskPackBuilder()
    plain.add("t", mask)
    ordered.add("t", mask, context=(merged_digest, merged != 0))
    blob = ordered.finish()
    assert torch.equal(reader.tensor(blobs.put(blob), "t"), mask)
    assert len(blob) * 8 / mask.numel() < 0.53  # one random bit where merged != 0, about nothing elsewhere
    assert len(blob) < 0.65 * len(plain.finish())
