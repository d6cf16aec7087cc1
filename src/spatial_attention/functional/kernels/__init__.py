"""Hand-written kernels: custom autograd and CPU-tuned paths, each behind a contract.

Every kernel here states what it computes, names its plain reference twin, and is held
equal to it by the tests. Layers never call a kernel for the paper math directly: they
go through :func:`spatial_attention.functional.attention` (or the functional they
belong to), whose ``impl`` switch picks the kernel.

* :mod:`.kept_probs`: attention over many short blocks, probabilities kept for backward.
* :mod:`.lean_bias`: attention with a learned float bias on the CPU, in four kernels.
* :mod:`.equal_width`: SDPA for queries/keys narrower or wider than the values.
* :mod:`.cbam_gates`: CBAM's gate product with a one-buffer backward.
* :mod:`.leaf_gather`: BOAT's leaf gather and scatter, with a backward that gathers.
* :mod:`.halo_attention`: neighbourhood attention's query tiles against gathered key
  halos, chunked, with a backward that scatters once.
"""
