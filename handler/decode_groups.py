"""Splits a step's decoding sequences into a few groups of similar context length.

Decode attention gathers each sequence's K/V blocks into one padded tensor and attends over it, so a
batch mixing 30- and 250-token contexts moves and attends over every short one padded to 250. Cutting
the batch (sorted by length) into up to three groups, at the points that minimise the blocks gathered
plus a fixed cost per extra group, removed most of that padding on bench_engine's workload.
"""

from __future__ import annotations

MAX_GROUPS = 3
# One more group costs two gathers and one attention call per layer: about as much as gathering this
# many blocks (measured on a 2-core CPU with 64 KB blocks); below that saving a split is not worth it.
BLOCKS_PER_EXTRA_GROUP = 8
# Cut points are searched among at most this many distinct lengths, which bounds the host time per step.
MAX_CANDIDATE_CUTS = 32


def plan_decode_groups(block_counts: list[int]) -> list[list[int]]:
    """Rows (indices into block_counts) of each group, shortest group first.

    When no split pays, the one group keeps the given order, so its tokens need no reordering.
    """
    order = sorted(range(len(block_counts)), key=block_counts.__getitem__)
    if not order:
        return []
    # Runs of equal length, coarsened to at most MAX_CANDIDATE_CUTS runs: a group ends only at a run's end.
    run_ends: list[int] = [i + 1 for i in range(len(order) - 1)
                           if block_counts[order[i]] != block_counts[order[i + 1]]] + [len(order)]
    if len(run_ends) > MAX_CANDIDATE_CUTS:
        stride = -(-len(run_ends) // MAX_CANDIDATE_CUTS)
        run_ends = run_ends[stride - 1 :: stride] + ([run_ends[-1]] if len(run_ends) % stride else [])

    def cost(start: int, end: int) -> int:  # rows order[start:end] padded to the longest, in blocks
        return (end - start) * block_counts[order[end - 1]]

    # best[j] = (cost, cuts) covering rows order[:run_ends[j]] with the groups used so far.
    best = [(cost(0, end), [end]) for end in run_ends]
    for _ in range(MAX_GROUPS - 1):
        best = [
            min(
                [best[j]]
                + [
                    (best[i][0] + BLOCKS_PER_EXTRA_GROUP + cost(run_ends[i], run_ends[j]), best[i][1] + [run_ends[j]])
                    for i in range(j)
                ],
                key=lambda option: option[0],
            )
            for j in range(len(run_ends))
        ]
    cuts = best[-1][1]
    if len(cuts) == 1:
        return [list(range(len(block_counts)))]
    groups, start = [], 0
    for end in cuts:
        groups.append(order[start:end])
        start = end
    return groups
