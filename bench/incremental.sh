#!/usr/bin/env bash
# kiln against the linear, Dockerfile-style reference build
# (shared/bench/seed-baseline.sh), side by side in one run, on the agent-ready
# image for Debian trixie. Needs root. Prints a table and writes it to
# bench/results-<date>.md; numbers go into BENCHMARKS.md by hand.
#
#   bench/incremental.sh [WORKDIR] [BASELINE_SCRIPT]
#
# Scenarios (each timed with /usr/bin/time, whole process):
#   cold         nothing cached: baseline from scratch vs kiln with an empty cache
#   add-package  one more apt package (jq): baseline with --reuse-base (Docker's
#                layer cache keeps FROM, re-runs everything after the apt line)
#                vs kiln with its cache (re-runs the apt step and what needs it)
#   no-change    the same recipe again into the same output dir (kiln only:
#                every step cached, the outputs up to date)
#   re-assemble  the same recipe into a new output dir (kiln only: every step
#                cached; merging, writing, checking and hashing the image)
#   second-machine  an empty cache pulling every step from a shared-directory
#                remote that the cold build pushed to (kiln only; compared
#                with kiln's own cold build)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/kiln-bench}
baseline=${2:-../shared/bench/seed-baseline.sh}
[ -f "$baseline" ] || { echo "baseline script not found: $baseline" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
command -v bc >/dev/null || apt-get install -y -q bc >/dev/null

cargo build --release -q
kiln=$PWD/target/release/kiln
rm -rf "$work"; mkdir -p "$work"
cp -r recipes "$work/recipes"
packages=$(awk '/^  packages:$/{f=1} f&&/^$/{exit} f' recipes/agent-ready.yaml)
printf 'extends: agent-ready-debian.yaml\nsteps:\n%s\n        - jq\n' "$packages" > "$work/recipes/plus-jq.yaml"

secs() { /usr/bin/time -f %e -o "$work/t" "$@" >"$work/last.log" 2>&1 || { cat "$work/last.log" >&2; exit 1; }; cat "$work/t"; }
ratio() { echo "scale=2; $1 / $2" | bc; }

kb() { secs "$kiln" build "$work/recipes/$1" --cache "$work/cache" -o "$work/images-$2"; }
"$kiln" key generate "$work/bench" >/dev/null

echo "running: cold baseline"; cold_base=$(secs bash "$baseline" trixie "$work/seed")
echo "running: cold kiln";     cold_kiln=$(secs "$kiln" build "$work/recipes/agent-ready-debian.yaml" --cache "$work/cache" -o "$work/images-a" --remote "$work/shared" --signing-key "$work/bench.key")
echo "running: second machine"; second=$(secs "$kiln" build "$work/recipes/agent-ready-debian.yaml" --cache "$work/cache-b" -o "$work/images-s" --remote "$work/shared" --trusted-key "$work/bench.pub" --no-push)
pulled=$(grep -cE '^[a-z0-9_-]+ +[a-z]+ +pulled +[0-9.]+s$' "$work/last.log" || true)
echo "running: no-change kiln"; same_kiln=$(kb agent-ready-debian.yaml a)
echo "running: re-assemble kiln"; assemble_kiln=$(kb agent-ready-debian.yaml b)
echo "running: add-package baseline"; add_base=$(secs bash "$baseline" trixie "$work/seed" --reuse-base --extra-package jq)
echo "running: add-package kiln";     add_kiln=$(kb plus-jq.yaml c)
built=$(grep -cE '^[a-z0-9_-]+ +[a-z]+ +built +[0-9.]+s$' "$work/last.log" || true)
steps=$(grep -cE '^[a-z0-9_-]+ +[a-z]+ +(built|pulled|cached) +[0-9.]+s$' "$work/last.log" || true)

out="bench/results-$(date +%Y-%m-%d).md"
{
  echo "| scenario | baseline (s) | kiln (s) | kiln / baseline |"
  echo "|---|---|---|---|"
  echo "| cold | $cold_base | $cold_kiln | $(ratio "$cold_kiln" "$cold_base") |"
  echo "| add one apt package | $add_base | $add_kiln | $(ratio "$add_kiln" "$add_base") |"
  echo "| no change | – | $same_kiln | – |"
  echo "| no change, new output dir (assembly only) | – | $assemble_kiln | – |"
  echo
  echo "| kiln: second machine (empty cache, shared remote) vs kiln cold | cold (s) | second machine (s) | ratio |"
  echo "|---|---|---|---|"
  echo "| agent-ready-debian | $cold_kiln | $second | $(ratio "$second" "$cold_kiln") |"
  echo
  echo "kiln steps re-run for the added package: $built of $steps; steps pulled by the second machine: $pulled of $steps"
} | tee "$out"
