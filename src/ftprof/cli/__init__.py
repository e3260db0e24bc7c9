"""Command-line entry points: one module per subcommand, wired together in :mod:`ftprof.cli.main`."""
