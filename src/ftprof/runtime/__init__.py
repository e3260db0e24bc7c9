"""The processes a run lives in: the world on any launcher (deepspeed, torchrun, srun, one process), DeepSpeed
config files checked before DeepSpeed sees them, and DeepSpeed's JIT-built CPU ops and shared-memory buffers.

Imports nothing of ftprof's but :mod:`ftprof.point` and :mod:`ftprof.errors`.
"""
