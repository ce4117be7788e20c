# Sourced by the deployment scripts: the project's venv on PATH and the
# environment every Flower process of this project runs with.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REGTOPK_VENV:-$REPO/.venv}"
if [ -x "$VENV/bin/flower-superlink" ]; then
    export PATH="$VENV/bin:$PATH"   # flower-superexec / flwr-serverapp / flwr-clientapp are found by name
fi
# never pip/uv-install the app's dependencies per run (the venv already has them)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
# SuperExec polls for new ServerApp/ClientApp tasks every 1 s by default
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"
