"""What a measurement leaves behind: a run's :class:`~ftprof.records.profile.Profile` (peaks per phase and rank,
throughput, spread) and a sweep's :class:`~ftprof.records.results.Record` (a point, its status, its profile and
the run's facts) in ``results.jsonl``, appended durably and read back strictly.

The schema every other package reads; imports only :mod:`ftprof.point`, :mod:`ftprof.errors` and the standard
library.
"""
