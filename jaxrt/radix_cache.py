"""Radix tree over page-aligned token prefixes (RadixAttention-style prefix reuse). No jax here.

Each edge holds a token run whose length is a multiple of ``page_size`` and the KV pages of those tokens.
The tree holds one allocator reference on every page it stores; requests hold their own references, so a page
is free only when neither needs it. Nodes on a running request's path are locked (never evicted); unlocked
leaves are evicted least-recently-used first.
"""

from __future__ import annotations

import heapq
import itertools
import time

from jaxrt.page_table import PageAllocator

_counter = itertools.count()


class RadixNode:
    __slots__ = ("children", "parent", "key", "pages", "lock_ref", "last_access", "uid")

    def __init__(self, parent: RadixNode | None, key: tuple[int, ...], pages: list[int]) -> None:
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.key = key
        self.pages = pages
        self.lock_ref = 0
        self.last_access = time.monotonic()
        self.uid = next(_counter)

    def __lt__(self, other: RadixNode) -> bool:  # heap order: LRU first
        return (self.last_access, self.uid) < (other.last_access, other.uid)


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, disabled: bool = False) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.disabled = disabled
        self.root = RadixNode(None, (), [])
        self.root.lock_ref = 1  # the root is never evicted
        self.num_cached_pages = 0

    # ----------------------------------------------------------------------------------------- queries

    def _first_page(self, tokens: tuple[int, ...] | list[int], start: int = 0) -> tuple[int, ...]:
        return tuple(tokens[start : start + self.page_size])

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], RadixNode]:
        """Longest cached page-aligned prefix of ``token_ids``: (its pages, the deepest matched node).

        The node can be passed to :meth:`lock`. Touching the path refreshes its LRU time.
        """
        if self.disabled:
            return [], self.root
        ps = self.page_size
        n_full = len(token_ids) // ps * ps
        tokens = tuple(token_ids[:n_full])
        node, pos, pages = self.root, 0, []
        now = time.monotonic()
        while pos < n_full:
            child = node.children.get(self._first_page(tokens, pos))
            if child is None:
                break
            matched = self._match_len(child.key, tokens, pos)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = now
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
        return pages, node

    def _match_len(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """Matched length of ``key`` against ``tokens[pos:]``, in whole pages."""
        ps = self.page_size
        limit = min(len(key), (len(tokens) - pos) // ps * ps)
        if key[:limit] == tokens[pos : pos + limit]:  # the usual case, one comparison: the node matches whole
            return limit
        n = 0
        while n < limit and key[n : n + ps] == tokens[pos + n : pos + n + ps]:
            n += ps
        return n

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Split ``node`` after ``at`` tokens; returns the new upper node (which keeps the lock count)."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key) and at % self.page_size == 0
        upper = RadixNode(parent, node.key[:at], node.pages[: at // self.page_size])
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        parent.children[self._first_page(node.key)] = upper
        node.key = node.key[at:]
        node.pages = node.pages[at // self.page_size :]
        node.parent = upper
        upper.children[self._first_page(node.key)] = node
        return upper

    # ----------------------------------------------------------------------------------------- updates

    def insert(self, token_ids: list[int], page_ids: list[int]) -> int:
        """Cache the full pages of ``token_ids`` (whose KV is in ``page_ids``).

        The tree takes its own reference on pages it did not already hold; the caller keeps (and must
        release) its references. Returns how many tokens were already cached.
        """
        if self.disabled:
            return 0
        ps = self.page_size
        n_full = min(len(token_ids) // ps, len(page_ids)) * ps
        tokens = tuple(token_ids[:n_full])
        node, pos = self.root, 0
        now = time.monotonic()
        while pos < n_full:
            key = self._first_page(tokens, pos)
            child = node.children.get(key)
            if child is None:
                new_pages = list(page_ids[pos // ps : n_full // ps])
                leaf = RadixNode(node, tokens[pos:], new_pages)
                node.children[key] = leaf
                self.allocator.incref(new_pages)
                self.num_cached_pages += len(new_pages)
                leaf.last_access = now
                return pos
            matched = self._match_len(child.key, tokens, pos)
            if matched < len(child.key):
                child = self._split(child, matched)
            child.last_access = now
            pos += len(child.key)
            node = child
        return pos

    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("unlock of an unlocked radix node")
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Drop unlocked leaves, LRU first, until ``num_pages`` pages became free. Returns pages freed."""
        if self.disabled or num_pages <= 0:
            return 0
        heap = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._first_page(leaf.key)]
            self.num_cached_pages -= len(leaf.pages)
            freed += self.allocator.decref(leaf.pages)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    def evictable_pages(self) -> int:
        """Pages that eviction could free now (unlocked and held by the tree alone)."""
        if self.disabled:
            return 0
        return sum(
            1
            for n in self._iter_nodes()
            if n.lock_ref == 0
            for p in n.pages
            if self.allocator.refcount(p) == 1
        )

    def reset(self) -> int:
        """Evict everything that is not locked; returns pages freed."""
        return self.evict(self.allocator.num_pages)

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def check_invariants(self) -> None:
        count = 0
        for n in self._iter_nodes():
            assert len(n.key) == len(n.pages) * self.page_size and n.key, "edge/page length mismatch"
            assert n.parent is not None and n.parent.children[self._first_page(n.key)] is n
            for p in n.pages:
                assert self.allocator.refcount(p) >= 1, f"cached page {p} is free"
            if n.lock_ref > 0:
                assert n.parent.lock_ref >= n.lock_ref or n.parent is self.root
            count += len(n.pages)
        assert count == self.num_cached_pages, (count, self.num_cached_pages)
