#!/usr/bin/env bash
# Create .venv and install ftprof with its test extras. Safe to re-run.
#   bash launch/setup.sh            # CPU machines: torch 2.13.0 (CPU build where a local wheel exists)
#   FTPROF_TORCH=torch bash launch/setup.sh   # GPU machines: whatever CUDA torch pip resolves
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Run a step with its output in $log. On failure show all of it and stop (set -e alone would hide why);
# on success show only what isn't known noise (pip's "WARNING: Location" lines for user-site packages).
quiet() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup.sh: failed: $*" >&2
        exit 1
    fi
    grep -v '^WARNING: Location' "$log" || true  # grep exits 1 when nothing is left to show
}

# pip's own settings that say where packages come from and which versions may come (index, extra indexes and
# find-links, where a CPU torch wheel may lie; constraints), from every pip config file and PIP_* variable
# (`pip config list`), as uv options, one per line.
uv_options() {
    .venv/bin/python - <<'PY'
import subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
options: list[tuple[str, ...]] = []
for line in listed.splitlines():
    name, _, value = line.partition("=")
    key, value = name.rpartition(".")[2], value.strip().strip("'\"")
    if key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
        options.append(("--no-index",))
    elif key in flags:
        options += [(flags[key], v) for v in value.split()]
print("\n".join(part for option in dict.fromkeys(options) for part in option))
PY
}

# Install with uv (the same resolution as pip, several times faster), or with pip where uv can't be had or
# fails (FTPROF_PIP=1 forces pip). torch goes in the same call so that its pinned build is the one resolved.
# Both write each module's bytecode at install (uv only when asked: --compile-bytecode): where
# PYTHONDONTWRITEBYTECODE is set, Python never caches it itself and every process would compile torch's,
# transformers' and deepspeed's sources again on import (transformers.trainer: 12 s instead of 5 s here).
install() {
    if [ -z "${FTPROF_PIP:-}" ] && .venv/bin/python -m pip install -q uv >/dev/null 2>&1; then
        options=()
        while IFS= read -r option; do if [ -n "$option" ]; then options+=("$option"); fi; done < <(uv_options)
        if SSL_CERT_FILE=${SSL_CERT_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}} .venv/bin/uv pip install \
            -q --compile-bytecode --python .venv/bin/python --index-strategy unsafe-best-match ${options[@]+"${options[@]}"} "$@" \
            >"$log" 2>&1; then
            return
        fi
        echo "setup.sh: uv failed, installing with pip instead: $(tail -n 1 "$log")" >&2
    fi
    quiet .venv/bin/python -m pip install -q --upgrade pip
    quiet .venv/bin/python -m pip install -q "$@"
}

[ -x .venv/bin/python ] || quiet "$PYTHON" -m venv .venv
# torch pinned: a plain `torch` requirement would otherwise pull a multi-GB CUDA build onto CPU machines.
install "${FTPROF_TORCH:-torch==2.13.0}" -e '.[test]'
# bitsandbytes (--optim adamw_bnb_8bit) apart, in .venv/apart: peft imports it with every Trainer when it can,
# which would change every process the tests measure; tests/estimate/test_optimizers.py checks it in a
# subprocess that puts this folder on its path.
[ -d .venv/apart/bitsandbytes ] || install --no-deps --target .venv/apart 'bitsandbytes>=0.50,<0.51'
# torchao (--optim adamw_torch_8bit) beside it, for the same reason (transformers and peft look for it).
[ -d .venv/apart/torchao ] || install --no-deps --target .venv/apart 'torchao>=0.18,<0.19'
# DeepSpeed builds its CPU ops on first use (~2 min on 2 cores in all). Build them here, in one process with no
# timeout, into this venv (the tests use the same folder): a test timing out mid-build would leave a lock file
# that every later DeepSpeed run waits on forever. Re-runs only load them; stale locks are removed first.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
quiet .venv/bin/python -m ftprof.runtime.ds_ops >/dev/null
tail -n 1 "$log"
# Importing deepspeed logs its accelerator choice on stdout; keep only our summary line.
quiet .venv/bin/python -c "import ftprof, torch, deepspeed, transformers; print('ftprof', ftprof.__version__, '| torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" >/dev/null
tail -n 1 "$log"
