"""KV transfer: moving a finished prefill's KV blocks from the exporter's memory to a decode worker.

- ``region``: the shared-memory export region a prefill worker owns (header, per-block tickets, data).
- ``leases``: the region's block allocator and lease table (pure; owner only).
- ``base``: the reader interface every backend implements (``KVReader.read``) and its errors.
- ``shm``: same host, maps the region (seqlock on tickets, optional crc32): the fastest path here.
- ``cma``: same host, ``process_vm_readv`` from the owner's mapping (for readers that cannot map it).
- ``tcp`` / ``tcp_server``: any two hosts; the block server runs in the exporter's event loop.
- ``cuda_ipc``: GPUs on one node (CUDA IPC handles, cuda-python; optional).
- ``nixl``: NVIDIA NIXL (UCX, RDMA across nodes; optional extra).
- ``fetch``: backend negotiation and fall-through; ``metrics``: the ``kvrelay_kv_transfer_*`` metrics.
- ``copy``: the block copies between caches and regions.
"""
