"""ftprof: fine-tune Hugging Face transformers with DeepSpeed ZeRO, and measure what fits.

Packages, in the order imports run (each imports only those below it):

* :mod:`ftprof.cli`: one thin module per subcommand (parse, call one library function, print).
* :mod:`ftprof.sweep`: planning and running a grid of measured points, locally or on Slurm.
* :mod:`ftprof.report`: recommendations, tables, exports and plots of a sweep's records (and the estimate's).
* :mod:`ftprof.estimate`: predicting the per-rank peak from an architecture, and calibrating on sweeps.
* :mod:`ftprof.train`: the fine-tuning recipe (arguments, data, models, tokenizers, metrics, Trainer).
* :mod:`ftprof.profiler`: memory and throughput measured inside any Trainer run.
* :mod:`ftprof.runtime`: launchers, DeepSpeed configs and ops, shared memory.
* :mod:`ftprof.records`: the measured profile and the sweep record schema.
* Leaves: :mod:`ftprof.point` (the settings vocabulary), :mod:`ftprof.known_configs` (architectures known
  offline), :mod:`ftprof.hub`, :mod:`ftprof.units`, :mod:`ftprof.errors`.
"""

__version__ = "0.1.0"
