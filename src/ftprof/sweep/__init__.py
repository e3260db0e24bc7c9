"""Measuring a grid of settings: the plan (:mod:`~ftprof.sweep.plan`), one point measured in its own process
(:mod:`~ftprof.sweep.measure`, forked from :mod:`~ftprof.sweep.worker` or started fresh by
:mod:`~ftprof.sweep.point_run`), the executors that run points (one at a time, side by side, Slurm jobs), the
order they run in (:mod:`~ftprof.sweep.schedule`), re-measuring (:mod:`~ftprof.sweep.remeasure`), the sweep
folder's manifest, and :mod:`~ftprof.sweep.driver`, which runs a whole sweep for ``ftprof sweep``.
"""
