# Placeholder keys, so the example policies (policies/) load on a machine without
# real ones; a key already exported is kept. `make run` reads this file; by hand:
#   . examples/placeholder-keys.sh && .venv/bin/sidecar run --policies policies
export OPENAI_API_KEY="${OPENAI_API_KEY:-sk-example-placeholder}"
export GITHUB_TOKEN="${GITHUB_TOKEN:-ghp-example-placeholder}"
