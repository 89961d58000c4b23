#!/bin/sh
# Start a throwaway local server, run a short headless Locust scenario against it, write reports
# under results/locust/<timestamp>-swarm-<scenario>/, stop the server. Arguments: see
#   loadtest/swarm.sh --help      (everything after -- goes to Locust)
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
cd "$here" && exec "$py" -m wsfan.loadtest.swarm "$@"
