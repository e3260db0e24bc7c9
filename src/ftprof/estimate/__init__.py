"""Predicting the per-rank peak before running: architecture facts read from a config on torch's meta device
(:mod:`~ftprof.estimate.architecture`), the itemised arithmetic (:mod:`~ftprof.estimate.estimator`: model
states under ZeRO 0-3 and offload, saved activations, transients, runtime) and its calibration on measured
sweeps (:mod:`~ftprof.estimate.calibration`), LoRA adapters' counts (:mod:`~ftprof.estimate.adapters`), what
``ftprof estimate`` computes for its flags (:mod:`~ftprof.estimate.request`), a traced training step on fake
tensors (:mod:`~ftprof.estimate.trace`) and a replay model of PyTorch's CUDA caching allocator
(:mod:`~ftprof.estimate.allocator`: reserved bytes from an allocation sequence).
"""
