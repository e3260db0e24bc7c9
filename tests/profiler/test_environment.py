"""What a measurement records about the machine, without side effects in the sweep's driver."""

import json
import subprocess
import sys
from importlib.metadata import version


def test_environment_names_deepspeeds_version_without_importing_it():
    """``import deepspeed`` detects the accelerator and, without CUDA, logs "Setting accelerator to CPU" into the
    sweep's console; the driver records the version only, so it must not import it."""
    child = (
        "import json, sys\n"
        "from ftprof.profiler.environment import environment\n"
        "env = environment()\n"
        "print(json.dumps({'deepspeed': env['deepspeed'], 'imported': 'deepspeed' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(proc.stdout.splitlines()[-1]) == {"deepspeed": version("deepspeed"), "imported": False}
    assert "Setting accelerator" not in proc.stdout + proc.stderr
