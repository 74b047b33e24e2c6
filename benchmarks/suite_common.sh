# Sourced by the multi-part GPU suites (h100x2_suite.sh, h100_image_suite.sh) after
# they set OUT and RUN: the log, the plugin's install, and `step`.
LOG="$RUN/suite.log"
mkdir -p "$OUT" "$RUN/logs"
# vLLM finds our plugin through its entry point: install the checkout once.
python3 -m pip show vllm-omni > /dev/null 2>&1 ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$RUN/logs/pip.log" 2>&1
step() {  # name, seconds, command...: its output to RUN/logs/name.log, its exit to LOG
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$RUN/logs/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
