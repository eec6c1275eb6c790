#!/usr/bin/env bash
# Run the hot-swap benchmark as root: blue-green swaps of ganache through the osvm endpoint under
# load, naive stop-and-start swaps on a fixed port, and proxy overhead against HAProxy. With the
# defaults it took 25.5 minutes on the 2-CPU machine in docs/benchmarks.md. It prints a summary
# and writes bench/results/hotswap.json.
# Arguments are passed to bench/hotswap/run.py (see --help), such as --swaps 5 for a short run.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $EUID -ne 0 ]]; then
    echo "bench/hotswap/run.sh: the benchmark starts isolated instances: run it as root" >&2
    exit 1
fi
python=.venv/bin/python
if [[ ! -x $python ]]; then
    echo "bench/hotswap/run.sh: $python not found: run scripts/setup first" >&2
    exit 1
fi
for tool in /usr/sbin/haproxy /usr/bin/wrk; do
    if [[ ! -x $tool ]]; then
        echo "bench/hotswap/run.sh: $tool not found: apt-get install haproxy wrk" >&2
        exit 1
    fi
done

exec "$python" bench/hotswap/run.py "$@"
