"""Turning measurements into answers: recommendations as pure rules over records
(:mod:`~ftprof.report.recommend`), the command lines they print (:mod:`~ftprof.report.commands`), rich tables
and exports (:mod:`~ftprof.report.tables`) and PNG plots (:mod:`~ftprof.report.plots`).
"""
