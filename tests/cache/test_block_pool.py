from __future__ import annotations

import pytest

from radixserve.cache.block_pool import BlockPool
from radixserve.errors import NoFreeBlocksError


def test_fresh_pool_is_all_free() -> None:
    pool = BlockPool(8)
    assert pool.num_blocks == 8
    assert pool.num_free() == 8
    assert pool.num_used() == 0
    assert all(pool.ref_count(b) == 0 and pool.is_free(b) for b in range(8))


def test_allocate_gives_distinct_blocks_with_ref_one() -> None:
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert a == [0, 1, 2]  # a fresh pool hands out ids in order
    assert len(set(a + b)) == 8
    assert all(pool.ref_count(x) == 1 for x in a + b)
    assert pool.num_free() == 0
    assert pool.allocate(0) == []


def test_allocate_too_many_raises_and_takes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free() == 1
    assert len(pool.allocate(1)) == 1
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_allocate_negative_is_an_error() -> None:
    with pytest.raises(ValueError):
        BlockPool(4).allocate(-1)


def test_decref_to_zero_frees_and_block_is_reused_first() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.decref(blocks[2])
    assert pool.num_free() == 1 and pool.is_free(blocks[2])
    # Free list is a stack: the most recently freed block comes back first.
    pool.decref(blocks[0])
    assert pool.allocate(1) == [blocks[0]]
    assert pool.allocate(1) == [blocks[2]]


def test_shared_block_needs_every_owner_to_let_go() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.incref(b)  # e.g. the tree adopts it
    pool.incref(b)  # and a second request shares it
    assert pool.ref_count(b) == 3
    pool.decref(b)
    pool.decref(b)
    assert pool.ref_count(b) == 1 and pool.num_free() == 1
    pool.decref(b)
    assert pool.ref_count(b) == 0 and pool.num_free() == 2


def test_bulk_incref_and_decref_match_one_by_one() -> None:
    pool, twin = BlockPool(6), BlockPool(6)
    blocks, same = pool.allocate(5), twin.allocate(5)
    assert blocks == same
    pool.incref_all(blocks[:3])
    for b in same[:3]:
        twin.incref(b)
    pool.decref_all(blocks)
    for b in same:
        twin.decref(b)
    assert [pool.ref_count(b) for b in range(6)] == [twin.ref_count(b) for b in range(6)]
    assert pool.allocate(3) == twin.allocate(3)  # the free lists are in the same order


@pytest.mark.parametrize("bad", [-1, 6])
def test_bulk_ops_reject_bad_ids_like_single_ones(bad: int) -> None:
    def pool_with_one():
        pool = BlockPool(6)
        return pool, pool.allocate(1)[0]

    pool, b = pool_with_one()
    with pytest.raises(IndexError):
        pool.incref_all([bad])
    with pytest.raises(RuntimeError):
        pool.incref_all([b, 3])  # block 3 is free
    pool, b = pool_with_one()
    with pytest.raises(IndexError):
        pool.decref_all([bad])
    pool.decref_all([b])
    with pytest.raises(RuntimeError):
        pool.decref_all([b])  # double free


def test_double_free_is_a_bug() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.decref(b)
    with pytest.raises(RuntimeError):
        pool.decref(b)
    assert pool.num_free() == 2  # the failed call changed nothing


def test_incref_of_free_block_is_a_bug() -> None:
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.incref(0)
    assert pool.ref_count(0) == 0


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_out_of_range_ids_are_rejected(bad: int) -> None:
    pool = BlockPool(4)
    pool.allocate(4)
    for op in (pool.incref, pool.decref, pool.ref_count):
        with pytest.raises(IndexError):
            op(bad)


def test_empty_pool() -> None:
    pool = BlockPool(0)
    assert pool.num_free() == 0
    assert pool.allocate(0) == []
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_many_cycles_never_leak() -> None:
    pool = BlockPool(16)
    held: list[int] = []
    for i in range(200):
        if i % 3 == 2 or pool.num_free() == 0:
            for b in held[: len(held) // 2]:
                pool.decref(b)
            held = held[len(held) // 2 :]
        else:
            held += pool.allocate(min(pool.num_free(), 1 + i % 4))
        assert len(set(held)) == len(held)
        assert pool.num_free() + len(held) == 16
