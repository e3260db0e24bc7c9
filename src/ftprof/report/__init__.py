"""Turning measurements into answers: recommendations as pure rules over records
(:mod:`~ftprof.report.recommend`), the command lines they print (:mod:`~ftprof.report.commands`), rich
renderables (:mod:`~ftprof.report.tables`), md/json/csv exports (:mod:`~ftprof.report.exports`), a sweep folder
loaded and printed (:mod:`~ftprof.report.sweep_report`), ``ftprof estimate``'s tables
(:mod:`~ftprof.report.estimate_tables`) and PNG plots (:mod:`~ftprof.report.plots`).
"""
