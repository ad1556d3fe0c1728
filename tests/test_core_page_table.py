import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.page_table import NULL_PAGE, OutOfPagesError, PageAllocator
from jaxrt.radix_cache import RadixCache


def test_alloc_free_refcount():
    a = PageAllocator(5)
    assert a.num_free == 4
    pages = a.alloc(3)
    assert NULL_PAGE not in pages and len(set(pages)) == 3
    a.incref(pages[:1])
    assert a.decref(pages) == 2  # the incref'd page survives
    assert a.refcount(pages[0]) == 1
    assert a.decref(pages[:1]) == 1
    assert a.num_free == 4
    a.check_invariants()


def test_alloc_too_many_allocates_nothing():
    a = PageAllocator(3)
    with pytest.raises(OutOfPagesError):
        a.alloc(3)
    assert a.num_free == 2


def test_double_free_is_caught():
    a = PageAllocator(3)
    p = a.alloc(1)
    a.decref(p)
    with pytest.raises(RuntimeError):
        a.decref(p)


def _fill(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Allocate pages for tokens, insert them, release the caller's refs (like a finished request)."""
    n = len(tokens) // cache.page_size
    pages = cache.allocator.alloc(n)
    cache.insert(tokens, pages)
    cache.allocator.decref(pages)
    return pages


def test_radix_match_split_and_reuse():
    a = PageAllocator(64)
    c = RadixCache(a, page_size=2)
    pages = _fill(c, [1, 2, 3, 4, 5, 6])
    got, node = c.match_prefix([1, 2, 3, 4, 9, 9, 9])
    assert got == pages[:2]
    # The split created a node ending after 4 tokens, with the rest below it.
    assert node.key == (1, 2, 3, 4) and [c.key for c in node.children.values()] == [(5, 6)]
    assert c.match_prefix([7, 8])[0] == []
    assert c.match_prefix([1])[0] == []  # shorter than a page
    c.check_invariants()


def test_radix_insert_existing_prefix_returns_cached_len():
    a = PageAllocator(64)
    c = RadixCache(a, page_size=2)
    _fill(c, [1, 2, 3, 4])
    pages = a.alloc(3)
    assert c.insert([1, 2, 3, 4, 5, 6], pages) == 4
    a.decref(pages)  # the duplicate first two pages become free, the new one stays cached
    assert c.num_cached_pages == 3
    assert a.num_used == 3
    c.check_invariants()
    a.check_invariants()


def test_radix_lock_prevents_eviction_and_lru_order():
    a = PageAllocator(64)
    c = RadixCache(a, page_size=1)
    _fill(c, [1, 2])
    _fill(c, [3, 4])
    _, node = c.match_prefix([1, 2])
    c.lock(node)
    assert c.evict(100) == 2  # only the unlocked [3, 4] branch goes
    assert c.match_prefix([1, 2])[0] != []
    c.unlock(node)
    c.match_prefix([1, 2])
    _fill(c, [5])
    c.match_prefix([1, 2])  # [1, 2] is now more recent than [5]
    assert c.evict(1) == 1
    assert c.match_prefix([5])[0] == [] and c.match_prefix([1, 2])[0] != []
    c.check_invariants()


def test_disabled_radix_cache_caches_nothing():
    a = PageAllocator(16)
    c = RadixCache(a, page_size=1, disabled=True)
    pages = a.alloc(2)
    assert c.insert([1, 2], pages) == 0
    a.decref(pages)
    assert a.num_free == 15 and c.match_prefix([1, 2])[0] == []


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "match_lock", "unlock", "evict"]),
            st.lists(st.integers(0, 3), max_size=12),
        ),
        max_size=40,
    ),
)
def test_radix_random_operations_keep_invariants(page_size, ops):
    a = PageAllocator(200)
    c = RadixCache(a, page_size=page_size)
    locked = []
    for op, tokens in ops:
        if op == "insert":
            n = len(tokens) // page_size
            if n > a.num_free:
                c.evict(n - a.num_free)
            if n > a.num_free:
                continue
            pages = a.alloc(n)
            cached = c.insert(tokens, pages)
            assert cached % page_size == 0
            a.decref(pages)
            got, _ = c.match_prefix(tokens)
            assert len(got) == n  # everything just inserted is found again
        elif op == "match_lock":
            got, node = c.match_prefix(tokens)
            assert len(got) * page_size <= len(tokens)
            c.lock(node)
            locked.append(node)
        elif op == "unlock" and locked:
            c.unlock(locked.pop())
        elif op == "evict":
            c.evict(len(tokens))
        c.check_invariants()
        a.check_invariants()
        assert a.num_used == c.num_cached_pages
    for node in locked:
        c.unlock(node)
    c.reset()
    assert a.num_free == a.num_usable
