"""Alias: `torchrun --standalone --nproc_per_node=2 -m benchmarks.save_throughput` runs
`benchmarks.save_async throughput` (see there)."""

import sys

from benchmarks.save_async import main

if __name__ == "__main__":
    sys.argv.insert(1, "throughput")
    main()
