"""Alias: `torchrun --standalone --nproc_per_node=2 -m benchmarks.save_stall` runs
`benchmarks.save_async stall` (see there)."""

import sys

from benchmarks.save_async import main

if __name__ == "__main__":
    sys.argv.insert(1, "stall")
    main()
