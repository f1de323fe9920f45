"""Alias: `torchrun --standalone --nproc_per_node=2 -m benchmarks.save_sync` runs
`benchmarks.save_async throughput` with the synchronous methods only (the floors,
``torch_save``, ``dcp_save`` and ``engine_off``), into ``results/save_sync.*``."""

import sys

from benchmarks.save_async import main

if __name__ == "__main__":
    sys.argv[1:1] = ["throughput", "--name", "save_sync",
                     "--methods", "copy,raw_write,torch_save,dcp_save,engine_off"]  # fmt: skip
    main()
