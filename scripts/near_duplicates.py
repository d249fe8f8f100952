"""Near-duplicate slices of a site without patient ids, and what grouping by pseudo-patients does to its splits.

    python scripts/near_duplicates.py ../shared/data/sars_cov2_ct [--folds 4] [--seed 0]

Prints the bit distances between the hashes of a COVID and a non-COVID slice (pairs of different patients, which
set the thresholds of `crosssite.data.groups`), the groups the splits use, and per fold the near-duplicate pairs
between training and test parts for random stratified folds (what crosssite did before grouping) and for the
grouped folds that `crosssite.data.splits.make_folds` makes now.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.model_selection import StratifiedKFold

from crosssite.data import load_site
from crosssite.data.groups import NEAR_DUPLICATE_BITS, RUN_BITS, group_sizes, hamming, near_duplicate_pairs, \
    site_hashes, straddling_pairs
from crosssite.data.splits import groups_of, make_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", help="NAME=PATH[:LAYOUT] or a folder")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    site = load_site(args.site if "=" in args.site else f"site={args.site}")
    hashes, labels = site_hashes(site), site.labels
    cross = np.concatenate([hamming(row[None, :], hashes[labels == 0]) for row in hashes[labels == 1]])
    print(f"{site.name}: {len(site)} slices; COVID x non-COVID hash distances (bits of 256): min {cross.min()}, "
          "percentiles 0.1/1/5: " + " / ".join(f"{v:.0f}" for v in np.percentile(cross, [0.1, 1, 5])))
    print(f"thresholds: near-duplicate <= {NEAR_DUPLICATE_BITS}, run link <= {RUN_BITS} "
          f"({100 * (cross <= RUN_BITS).mean():.2f}% of cross-class pairs are that close)")
    sizes = group_sizes(groups_of(site))
    print(f"near-duplicate pairs within the site: {len(near_duplicate_pairs(hashes))}; groups: {len(sizes)}, "
          f"largest {sizes.max()}, single slices {(sizes == 1).sum()}")
    everything = np.arange(len(site))
    random = [test for _, test in StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(
        labels, labels)]
    print("fold | random folds: train/test pairs, test slices with a twin in train | grouped folds: the same")
    for fold, (rand, grouped) in enumerate(zip(random, make_folds(site, args.folds, args.seed))):
        row = [f"{fold}"]
        for test in (rand, grouped):
            train = np.setdiff1d(everything, test)
            pairs = near_duplicate_pairs(hashes[test], NEAR_DUPLICATE_BITS, other=hashes[train])
            n = straddling_pairs(hashes, {"train": train, "test": test})["train/test"]
            row.append(f"{n} pairs, {len(np.unique(pairs[:, 0]))} of {len(test)} test slices")
        print(" | ".join(row))


if __name__ == "__main__":
    main()
