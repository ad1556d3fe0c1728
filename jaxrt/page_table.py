"""Page allocator for the paged KV pool, with reference counts. Pure Python: no jax here.

Page 0 is reserved as the null page: padding rows of the page table point at it, so kernels may read it
but nothing real is ever stored there. Pages ``1 .. num_pages - 1`` are handed out.
"""

from __future__ import annotations

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Hands out KV pages; a page returns to the free list when its last holder releases it.

    Holders are requests (the pages of their sequence) and the radix cache (pages it keeps for reuse).
    Invariant: ``num_free + len(in_use) == num_pages - 1`` and every page in use has refcount >= 1.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        # Stack: pop() hands out low page ids first, which keeps small pools easy to read in tests.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._refcount: list[int] = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def alloc(self, n: int) -> list[int]:
        """``n`` fresh pages with refcount 1; raises OutOfPagesError (allocating nothing) if short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            if self._refcount[p] <= 0:
                raise RuntimeError(f"incref of free page {p}")
            self._refcount[p] += 1

    def decref(self, pages: list[int]) -> int:
        """Release one reference on each page; returns how many pages became free."""
        freed = 0
        for p in pages:
            if p == NULL_PAGE or self._refcount[p] <= 0:
                raise RuntimeError(f"double free of page {p}")
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def check_invariants(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        if NULL_PAGE in free:
            raise AssertionError("the null page is on the free list")
        for p in range(1, self.num_pages):
            if (p in free) != (self._refcount[p] == 0):
                raise AssertionError(f"page {p}: free={p in free} refcount={self._refcount[p]}")
