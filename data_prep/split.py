"""Deterministic, grouped splits: every member of a group lands in the same split.

Groups come from the source (writer, document, form template) and are merged with
exact duplicates (same decoded pixels), so a page saved twice under two names can
never sit in train and test at once.
"""

from __future__ import annotations

import hashlib


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


def merge_groups(groups: list[str], image_hashes: list[str]) -> list[str]:
    """Final group label per record: declared groups joined through shared images."""
    uf = _UnionFind()
    for g, h in zip(groups, image_hashes):
        uf.union("g:" + g, "h:" + h)
    return [uf.find("g:" + g) for g in groups]


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )


def assign_splits(groups: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """'train' / 'validation' / 'test' per record, decided per group from a seeded hash order."""
    check_fractions(val_fraction, test_fraction)
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n = len(groups)
    want = {}
    for name, frac in (("test", test_fraction), ("validation", val_fraction)):
        k = round(frac * n)
        if frac > 0 and k == 0 and len(order) >= 3:
            k = 1  # a requested split is never silently empty when there are groups to spare
        want[name] = k
    split_of: dict[str, str] = {}
    filled = {"test": 0, "validation": 0}
    for g in order:
        for name in ("test", "validation"):
            if filled[name] < want[name]:
                split_of[g] = name
                filled[name] += sizes[g]
                break
        else:
            split_of[g] = "train"
    return [split_of[g] for g in groups]
