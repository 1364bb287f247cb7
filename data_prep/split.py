"""Deterministic, grouped splits: every member of a group lands in the same split.

Groups come from the source (writer, document, form template) and are merged with
exact duplicates (same decoded pixels), so a page saved twice under two names can
never sit in train and test at once.
"""

from __future__ import annotations

import hashlib

from data_prep.errors import InputError


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(hashes: list[int], threshold: float, bits: int, bands: int = 64) -> list[tuple[int, int]]:
    """Index pairs whose edge signatures differ in at most `threshold` of their set bits.

    Candidates come from banding (the signature cut into `bands` slices; records that share
    a non-blank slice exactly are compared), so the work stays near-linear; pairs this close
    share many slices, so banding misses practically none of them. Blank slices (paper)
    are skipped: they would put every margin in one bucket.
    """
    if threshold <= 0:
        return []
    width = bits // bands
    mask = (1 << width) - 1
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, h in enumerate(hashes):
        for b in range(bands):
            value = (h >> (b * width)) & mask
            if value:
                buckets.setdefault((b, value), []).append(i)
    counts = [h.bit_count() for h in hashes]
    pairs = set()
    for members in buckets.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if (i, j) not in pairs and (hashes[i] ^ hashes[j]).bit_count() <= threshold * max(counts[i], counts[j], 1):
                    pairs.add((i, j))
    return sorted(pairs)


def merge_groups(groups: list[str], image_hashes: list[str], near: list[tuple[int, int]] = ()) -> list[str]:
    """Final group label per record: declared groups joined through identical images and
    through near-duplicate pairs (indices into the lists)."""
    uf = _UnionFind()
    for g, h in zip(groups, image_hashes):
        uf.union("g:" + g, "h:" + h)
    for i, j in near:
        uf.union("g:" + groups[i], "g:" + groups[j])
    return [uf.find("g:" + g) for g in groups]


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )


def _size_class(n: int) -> int:
    """Singletons, 2-9, 10-99, 100-999, ... records."""
    return 0 if n == 1 else len(str(n))


def assign_splits(groups: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """'train' / 'validation' / 'test' per record, decided per group from a seeded hash order.

    Groups of similar size (single pages; small, large and very large groups such as a
    writer's pages) are split separately, each class by the fractions: a small test split
    then holds its share of the big groups' records too, instead of whatever came first in
    hash order (in a 10,000-line render with 29 real-digit shards of ~90 lines and 7,000
    single lines, a 4% test split drawn from one hash order held no real digits for 43 of
    200 seeds). Within a class a group joins a split while that brings the split closer to its
    target, so a big group never doubles a small split.
    """
    check_fractions(val_fraction, test_fraction)
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    fractions = (("test", test_fraction), ("validation", val_fraction))
    split_of = dict.fromkeys(order, "train")
    for size_class in sorted({_size_class(n) for n in sizes.values()}):
        members = [g for g in order if _size_class(sizes[g]) == size_class]
        records = sum(sizes[g] for g in members)
        filled = dict.fromkeys(("test", "validation"), 0)
        for g in members:
            for name, frac in fractions:
                if filled[name] + sizes[g] / 2 <= frac * records:
                    split_of[g] = name
                    filled[name] += sizes[g]
                    break
    # A requested split is never silently empty when there are groups to spare: it takes
    # the smallest training group (first in hash order among equals).
    for name, frac in fractions:
        if frac > 0 and len(order) >= 3 and name not in split_of.values():
            spare = [g for g in order if split_of[g] == "train"]
            if len(spare) > 1:
                split_of[min(spare, key=lambda g: sizes[g])] = name
    return [split_of[g] for g in groups]
