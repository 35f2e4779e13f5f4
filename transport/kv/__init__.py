"""KV transfer: moving a finished prefill's KV blocks from the exporter's memory to a decode worker.

- ``region``: the shared-memory export region a prefill worker owns (header, per-block tickets, data).
- ``leases``: the region's block allocator and lease table (pure; owner only).
- ``base``: the reader interface every backend implements (``KVReader.read``) and its errors.
- ``shm``: the same-host reader (seqlock on tickets, optional crc32).
- ``copy``: the block copies themselves (the one place KV bytes move).
"""
