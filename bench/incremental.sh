#!/usr/bin/env bash
# kiln against the linear, Dockerfile-style reference build
# (shared/bench/seed-baseline.sh trixie), every scenario side by side in one
# run, on the agent-ready image for Debian trixie
# (recipes/agent-ready-debian.yaml, 2 GiB image).
#
#   sudo env "PATH=$PATH" bench/incremental.sh [WORKDIR] [BASELINE_SCRIPT]
#
# WORKDIR (default /tmp/kiln-bench) is wiped and refilled; BASELINE_SCRIPT
# defaults to ../shared/bench/seed-baseline.sh, from the repository root.
# Needs root; installs bc, time, jq, curl, e2fsprogs, debootstrap, npm and
# docker-registry when missing. Builds target/release/kiln first. Prints a
# markdown table and writes it to bench/results-<date>.md; numbers go into
# BENCHMARKS.md by hand. Takes 10-20 minutes on two cores, using both.
#
# Every run starts after an untimed `sync`, so that none pays for writing back
# what the one before it wrote, and is timed with `/usr/bin/time -f '%e %M'`:
# wall seconds, and the peak RSS of the process (Linux counts the largest of
# it and the children it waited for, e.g. the mkfs.ext4 kiln runs), shown in
# MiB. Each run's stderr is kept in WORKDIR/logs/<run>.log and its stdout in
# WORKDIR/logs/<run>.out (for kiln builds, the `--json` report the step
# figures below are read from).
#
# Scenarios, in the order they run, and what is cached in each row. "cache A"
# is the cache the cold kiln build fills; "images-dev" its output dir, which
# later rows keep building into as a developer would.
#
#  1 cold             nothing cached. Baseline from scratch (WORKDIR/seed
#                     empty) vs kiln with an empty cache A and no remote (the
#                     baseline publishes nothing either). Both download
#                     everything, so a slow spell of the network can decide
#                     one pair: the pair is run again after row 7 (WORKDIR/
#                     seed-2, an empty cache deleted afterwards), and row 1
#                     and the rows measured against kiln cold use the means
#                     of the two (each pair is printed too). Then, not a row:
#                     the same cold build with an empty cache P that pushes
#                     every step, signed, to the directory remote
#                     WORKDIR/shared (keys from `kiln key generate`), timed
#                     and printed as "cold, pushing".
#  2 second machine, directory remote
#                     an empty cache reading WORKDIR/shared (trusting the key,
#                     --no-push): every step pulled, none built. Ratio vs kiln
#                     cold.
#  3 second machine, OCI registry
#                     Debian's docker-registry on a free 127.0.0.1 port, storage
#                     in WORKDIR/registry, filled by `kiln cache push` from
#                     cache A (timed, printed, not a row); then an empty cache
#                     pulling every step from oci+http://127.0.0.1:PORT/kiln.
#                     Ratio vs kiln cold. The registry is stopped afterwards
#                     (and on any exit).
#  4 no change        cache A, the same recipe into images-dev again: every step
#                     cached and the outputs up to date, nothing written.
#  5 assembly only    cache A, every step cached, a NEW output dir: merging the
#                     layers, writing and checking the image, kernel, initrd,
#                     digests. Reference: `mkfs.ext4 -q -F -d TREE IMG 2G` of
#                     the same merged tree (the finished image mounted
#                     read-only and copied with cp -a, untimed) into a fresh
#                     file.
#  6 add one package  baseline --reuse-base --extra-package jq (its base.tar
#                     from row 1 reused, everything after re-run) vs kiln
#                     building plus-jq.yaml (agent-ready-debian.yaml whose
#                     `packages` step also installs jq) with cache A into
#                     images-dev: `packages` and the steps that need it are
#                     built, the rest cached. Then, not a row: a clean build of
#                     plus-jq.yaml (empty cache, own output dir) whose image
#                     must be byte-identical to the add-one image.
#  7 unit file        cache A; unit-restart7.yaml extends agent-ready-debian.yaml
#                     and replaces the `opencode-unit` step with one reading a
#                     copy of opencode@.service with RestartSec=7: that step is
#                     built, the rest cached, the image reassembled into
#                     images-dev. Ratio vs kiln cold.
#  8 one small file over a big fresh layer
#                     the `ssh-config` step's own seconds in row 6's build (a
#                     `file` step over the just-built `packages` layer).
#
# Row 9 is the largest peak RSS of all kiln runs as /usr/bin/time sees it
# (kiln or any program it waited for, such as dpkg or mkfs.ext4); row 10 is
# kiln's own, from its --json report.
#
# Targets, printed next to each row: cold ≤ 0.9× baseline cold; second machine
# ≤ 0.25× (directory) and ≤ 0.35× (OCI) kiln cold; no change ≤ 0.5 s; assembly
# ≤ 1.0× mkfs -d; add one package ≤ 0.35× baseline add-one; unit file ≤ 0.05×
# kiln cold; ssh-config ≤ 0.5 s; kiln's own peak memory ≤ 300 MiB.
#
# The functions can be sourced (nothing runs unless the script is executed), to
# try them on a small recipe: set work, recipes, kiln, baseline, recipe, image.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin LC_ALL=C

recipe=agent-ready-debian.yaml
image=agent-rootfs.ext4          # the recipe's output.rootfs
rows=()                          # table rows by number, filled as scenarios finish
registry_pid=""                  # the running docker-registry, if any
mounted=""                       # the image mounted for the mkfs reference, if any

# ---------------------------------------------------------------- helpers

die() { echo "incremental.sh: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }

# timed RUN CMD...: runs CMD under /usr/bin/time; stdout to logs/RUN.out,
# stderr to logs/RUN.log, "SECONDS KIB" to time/RUN, after an untimed `sync`.
# A failure ends the bench.
timed() {
  local run=$1; shift
  say "$run"
  sync   # untimed: no run pays for writing back what the one before wrote
  if ! /usr/bin/time -f '%e %M' -o "$work/time/$run" "$@" \
      >"$work/logs/$run.out" 2>"$work/logs/$run.log"; then
    tail -n 30 "$work/logs/$run.log" >&2
    die "$run failed (log: $work/logs/$run.log)"
  fi
  echo "   $(secs "$run") s, peak RSS $(rss "$run") MiB" >&2
}
secs() { tail -n 1 "$work/time/$1" | cut -d' ' -f1; }
rss() { echo "scale=1; $(tail -n 1 "$work/time/$1" | cut -d' ' -f2) / 1024" | bc; }

# kiln_build RUN RECIPE CACHE OUT [options]: kiln build --json of
# $recipes/RECIPE with the cache and output dir WORKDIR/CACHE, WORKDIR/OUT.
kiln_build() {
  local run=$1 file=$2 cache=$3 out=$4; shift 4
  timed "$run" "$kiln" build "$recipes/$file" --cache "$work/$cache" -o "$work/$out" --json "$@"
}

# From a kiln build's --json report: one step's seconds, the steps with one
# outcome, a one-line summary.
step_secs() {
  local s
  s=$(jq -r --arg id "$2" '.steps[] | select(.id == $id) | .seconds' "$work/logs/$1.out")
  if [ -n "$s" ]; then printf '%.2f' "$s"; else echo –; fi
}
step_outcome() { jq -r --arg id "$2" '.steps[] | select(.id == $id) | .outcome' "$work/logs/$1.out"; }
steps_with() { jq -r --arg o "$2" '[.steps[] | select(.outcome == $o) | .id] | join(", ")' "$work/logs/$1.out"; }
outcomes() { jq -r '"\(.built) built, \(.pulled) pulled, \(.cached) cached of \(.steps | length) steps"' "$work/logs/$1.out"; }

# ratio A B: A / B to three decimals ("–" when B is 0); at_most A B: yes or NO.
ratio() {
  [ "$(echo "$2 == 0" | bc)" = 1 ] && { echo –; return; }
  printf '%.3f\n' "$(echo "scale=6; $1 / $2" | bc)"
}
at_most() {
  case $1$2 in *–*) echo –; return ;; esac
  if [ "$(echo "$1 <= $2" | bc -l)" = 1 ]; then echo yes; else echo NO; fi
}

# row_vs N NAME REF_S REF_NAME RUN MAX_RATIO TARGET: table row N, comparing
# kiln's RUN with a reference time; row_abs N NAME SECONDS RSS MAX_S: row N,
# with an absolute target in seconds.
row_vs() {
  local n=$1 name=$2 ref=$3 ref_name=$4 run=$5 max=$6 target=$7 kiln_s met
  kiln_s=$(secs "$run")
  met=$(at_most "$kiln_s" "$(echo "$max * $ref" | bc -l)")
  rows[n]="| $n $name | $ref${ref_name:+ ($ref_name)} | $kiln_s | $(ratio "$kiln_s" "$ref") | $(rss "$run") | ≤ $max× $target | $met |"
}
row_abs() {
  rows[$1]="| $1 $2 | – | $3 | – | $4 | ≤ $5 s | $(at_most "$3" "$5") |"
}

# ---------------------------------------------------------------- setup

# need_tools: installs what the bench and the baseline use, when missing.
need_tools() {
  local missing=() pair
  command -v cargo >/dev/null || die "cargo is not on PATH (sudo env \"PATH=\$PATH\" …)"
  for pair in bc:bc /usr/bin/time:time jq:jq curl:curl ss:iproute2 sha256sum:coreutils \
              mkfs.ext4:e2fsprogs debootstrap:debootstrap mmdebstrap:mmdebstrap npm:npm \
              /usr/bin/docker-registry:docker-registry; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} = 0 ] && return
  say "installing ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-remove "${missing[@]}" >/dev/null
}

# unmount_under DIR: lazily unmounts what a killed earlier run left under DIR
# (the baseline bind-mounts /dev into its root), so wiping DIR is safe.
unmount_under() {
  local m
  awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m"; done
}

# fresh_workdir: empties WORKDIR (only one this script made, or an empty one).
fresh_workdir() {
  case $work in /|"$repo"|"$repo"/*|"$HOME") die "refusing to use $work as WORKDIR" ;; esac
  if [ -d "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -e "$work/.kiln-bench" ]; then
    die "$work is not empty and not a kiln bench dir; pick another WORKDIR"
  fi
  unmount_under "$work"
  rm -rf --one-file-system "$work"
  mkdir -p "$work"/{logs,time}
  touch "$work/.kiln-bench"
}

# make_recipes: copies recipes/ into WORKDIR (relative `source:` paths keep
# working) and writes the two variants next to agent-ready-debian.yaml.
make_recipes() {
  local packages unit
  cp -r "$repo/recipes" "$recipes"
  # plus-jq.yaml: the `packages` step of agent-ready.yaml, with jq added.
  packages=$(awk '/^  packages:$/ { f = 1 } f && !NF { exit } f' "$recipes/agent-ready.yaml")
  printf 'extends: %s\nsteps:\n%s\n        - jq\n' "$recipe" "$packages" >"$recipes/plus-jq.yaml"
  # unit-restart7.yaml: the `opencode-unit` step reading a changed unit file.
  sed 's/^RestartSec=5$/RestartSec=7/' "$recipes/files/opencode@.service" >"$recipes/files/opencode-restart7@.service"
  ! cmp -s "$recipes/files/opencode@.service" "$recipes/files/opencode-restart7@.service" ||
    die "opencode@.service has no RestartSec=5 line to change"
  unit=$(awk '/^  opencode-unit:$/ { f = 1 } f && !NF { exit } f' "$recipes/agent-ready.yaml")
  grep -q 'source: files/opencode@.service' <<<"$unit" || die "opencode-unit step not found in agent-ready.yaml"
  printf 'extends: %s\nsteps:\n%s\n' "$recipe" \
    "${unit//files\/opencode@.service/files\/opencode-restart7@.service}" >"$recipes/unit-restart7.yaml"
  # Mistakes in the generated recipes show up now, not ten minutes in.
  local f
  for f in "$recipe" plus-jq.yaml unit-restart7.yaml; do
    "$kiln" plan "$recipes/$f" --cache "$work/plan-cache" >/dev/null || die "kiln plan $f failed"
  done
  rm -rf "$work/plan-cache"
}

# ---------------------------------------------------------------- OCI registry

# start_registry: Debian's docker-registry on a free loopback port (a few
# tries, as another process may take the port first); sets registry_url.
start_registry() {
  local port try
  for try in 1 2 3 4 5; do
    port=$(free_port)
    printf '%s\n' 'version: 0.1' 'log:' '  level: error' '  accesslog:' '    disabled: true' \
      'storage:' '  filesystem:' "    rootdirectory: $work/registry" '  delete:' '    enabled: true' \
      'http:' "  addr: 127.0.0.1:$port" '  secret: kiln-bench' >"$work/registry.yml"
    /usr/bin/docker-registry serve "$work/registry.yml" </dev/null >/dev/null 2>>"$work/logs/registry.log" &
    registry_pid=$!
    if registry_answers "$port"; then
      registry_url=oci+http://127.0.0.1:$port/kiln
      say "registry on 127.0.0.1:$port (pid $registry_pid, try $try)"
      return
    fi
    stop_registry
  done
  die "docker-registry did not start: $(tail -n 5 "$work/logs/registry.log")"
}

# free_port: a random high port nothing on 127.0.0.1 listens on.
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

# registry_answers PORT: waits up to 15 s for our registry to listen on PORT
# and GET /v2/ to answer 200 or 401; fails at once if the registry exits.
registry_answers() {
  local _ code
  for _ in $(seq 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$1/v2/" || true)
    case $code in
      200|401) ss -Hltnp "sport = :$1" | grep -q "pid=$registry_pid," && return 0 ;;
    esac
    kill -0 "$registry_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

stop_registry() {
  [ -n "$registry_pid" ] || return 0
  kill "$registry_pid" 2>/dev/null || true
  wait "$registry_pid" 2>/dev/null || true
  registry_pid=""
}

cleanup() {
  stop_registry
  if [ -n "$mounted" ]; then umount "$mounted" || umount -l "$mounted" || true; fi
}

# ---------------------------------------------------------------- scenarios

# 1: both cold builds; kiln fills cache-a and the directory remote.
bench_cold() {
  timed baseline-cold bash "$baseline" trixie "$work/seed"
  kiln_build cold "$recipe" cache-a images-dev
  kiln_build cold-push "$recipe" cache-p images-push --remote "$work/shared" --signing-key "$work/bench.key"
}

# 1 again, last (the other rows keep their place after the first pair), then
# the rows measured against the cold builds (1, 2, 3 and 7 are written here),
# with the means of the pairs. The second cold image must be the one row 5
# assembled from cache A.
bench_cold_again() {
  timed baseline-cold-2 bash "$baseline" trixie "$work/seed-2"
  kiln_build cold-2 "$recipe" cache-cold-2 images-cold-2
  sum_cold=$(sha256sum <"$work/images-assembly/$image" | cut -d' ' -f1)
  sum_cold_2=$(sha256sum <"$work/images-cold-2/$image" | cut -d' ' -f1)
  unmount_under "$work/seed-2"
  rm -rf --one-file-system "$work/seed-2" "$work/cache-cold-2" "$work/images-cold-2"
  mean_of baseline-cold-mean baseline-cold baseline-cold-2
  mean_of cold-mean cold cold-2
  cold=$(secs cold-mean)
  row_vs 1 "cold (nothing cached), mean of two pairs" "$(secs baseline-cold-mean)" "" cold-mean 0.9 "baseline cold"
  row_vs 2 "second machine, directory remote (empty cache)" "$cold" "kiln cold" second-dir 0.25 "kiln cold"
  row_vs 3 "second machine, OCI registry (empty cache)" "$cold" "kiln cold" second-oci 0.35 "kiln cold"
  row_vs 7 "opencode unit file changed" "$cold" "kiln cold" unit-change 0.05 "kiln cold"
}

# mean_of RUN A B: records RUN as the mean seconds of runs A and B, with
# the larger peak RSS.
mean_of() {
  local a b
  a=$(tail -n 1 "$work/time/$2")
  b=$(tail -n 1 "$work/time/$3")
  printf '%.2f %s\n' "$(echo "scale=4; (${a% *} + ${b% *}) / 2" | bc)" \
    "$(printf '%s\n' "${a#* }" "${b#* }" | sort -g | tail -n 1)" >"$work/time/$1"
}

# 2: an empty cache pulling from the directory remote.
bench_second_dir() {
  kiln_build second-dir "$recipe" cache-dir images-dir --remote "$work/shared" --trusted-key "$work/bench.pub" --no-push
}

# 3: push cache-a to a local registry, then an empty cache pulling from it.
bench_second_oci() {
  start_registry
  timed oci-push "$kiln" cache push "$recipes/$recipe" --cache "$work/cache-a" \
    --remote "$registry_url" --signing-key "$work/bench.key"
  kiln_build second-oci "$recipe" cache-oci images-oci --remote "$registry_url" --trusted-key "$work/bench.pub" --no-push
  stop_registry
}

# 4: nothing changed, same output dir.
bench_no_change() {
  kiln_build no-change "$recipe" cache-a images-dev
  row_abs 4 "no change (all cached, outputs up to date)" "$(secs no-change)" "$(rss no-change)" 0.5
}

# 5: all cached into a new output dir, against mkfs.ext4 -d of the same tree.
bench_assembly() {
  kiln_build assembly "$recipe" cache-a images-assembly
  mkfs_reference "$work/images-assembly/$image" 2G
  row_vs 5 "assembly only (all cached, new output dir)" "$(secs mkfs-d)" "mkfs -d" assembly 1.0 "mkfs -d"
}

# mkfs_reference IMAGE SIZE: copies IMAGE's tree out (untimed), then times
# mkfs.ext4 -d of it into a fresh file (run mkfs-d).
mkfs_reference() {
  local mnt=$work/mnt tree=$work/merged-tree
  rm -rf "$tree"
  mkdir -p "$mnt"
  mount -o loop,ro "$1" "$mnt"
  mounted=$mnt
  cp -a "$mnt/." "$tree"
  umount "$mnt"
  mounted=""
  rm -f "$work/mkfs-d.ext4"
  timed mkfs-d mkfs.ext4 -q -F -d "$tree" "$work/mkfs-d.ext4" "$2"
  # Not a target: the same without metadata checksums, which mke2fs computes
  # in software (what any writer of this ext4 pays beyond the copy).
  rm -f "$work/mkfs-d.ext4"
  timed mkfs-d-nocsum mkfs.ext4 -q -F -O ^metadata_csum -d "$tree" "$work/mkfs-d.ext4" "$2"
  rm -rf "$tree" "$work/mkfs-d.ext4"
}

# 6 and 8: one more apt package, then the same recipe from nothing.
bench_add_one() {
  timed baseline-add-one bash "$baseline" trixie "$work/seed" --reuse-base --extra-package jq
  kiln_build add-one plus-jq.yaml cache-a images-dev
  row_vs 6 "add one apt package (jq)" "$(secs baseline-add-one)" "" add-one 0.35 "baseline add-one"
  row_abs 8 "one small file over a fresh layer (ssh-config step, $(step_outcome add-one ssh-config))" \
    "$(step_secs add-one ssh-config)" – 0.5
  kiln_build add-one-clean plus-jq.yaml cache-clean images-clean
  sum_add=$(sha256sum <"$work/images-dev/$image" | cut -d' ' -f1)
  sum_clean=$(sha256sum <"$work/images-clean/$image" | cut -d' ' -f1)
  identical=NO
  [ "$sum_add" != "$sum_clean" ] || identical=yes
}

# 7: only the opencode unit file changed.
bench_unit() {
  kiln_build unit-change unit-restart7.yaml cache-a images-dev
}

# ---------------------------------------------------------------- report

# largest_own_rss: the largest peak memory of kiln itself (MiB), from the
# `peak_rss_kib` of each kiln build's --json report (VmHWM, without the
# programs kiln ran).
largest_own_rss() {
  local run
  for run in cold cold-push second-dir second-oci no-change assembly add-one add-one-clean unit-change cold-2; do
    jq -r '.peak_rss_kib' "$work/logs/$run.out"
  done | sort -g | tail -n 1 | awk '{ printf "%.1f\n", $1 / 1024 }'
}

# largest_rss: the largest peak RSS (MiB) of the kiln runs.
largest_rss() {
  local run
  for run in cold cold-push second-dir oci-push second-oci no-change assembly add-one add-one-clean unit-change cold-2; do
    rss "$run"
  done | sort -g | tail -n 1
}

# kiln_step_times RUN: the steps of a kiln build that took a second or
# more, with their seconds, from its --json report.
kiln_step_times() {
  jq -r '[.steps[] | select(.seconds >= 1) | "\(.id) \(.seconds * 10 | round / 10) s"] | join(", ")' "$work/logs/$1.out"
}

# baseline_phases RUN: the baseline's per-phase seconds on one line.
baseline_phases() { tr -s ' ' <"$work/logs/$1.out" | paste -sd, - | sed 's/,/, /g'; }

report() {
  local max own
  max=$(largest_rss)
  echo "# kiln incremental benchmark, $(date '+%Y-%m-%d %H:%M')"
  echo
  echo "$recipe against \`$(basename "$baseline") trixie\`; kiln $commit;"
  echo "$(nproc) CPUs, $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM, Linux $(uname -r). Ratio = kiln / the baseline column."
  echo
  echo "| scenario | baseline (s) | kiln (s) | ratio | kiln peak RSS (MiB) | target | met |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"                 # in index order
  echo "| 9 peak RSS, largest of the kiln runs, with the programs they ran | – | – | – | $max | – | – |"
  own=$(largest_own_rss)
  echo "| 10 kiln's own peak memory (VmHWM), largest of the builds | – | – | – | $own | ≤ 300 MiB | $(at_most "$own" 300) |"
  echo
  echo "- cold, pair by pair: first (before every other row) baseline $(secs baseline-cold) s, kiln $(secs cold) s = $(ratio "$(secs cold)" "$(secs baseline-cold)"); second (after row 7) baseline $(secs baseline-cold-2) s, kiln $(secs cold-2) s = $(ratio "$(secs cold-2)" "$(secs baseline-cold-2)"); kiln's steps in the first: $(kiln_step_times cold)"
  echo "- the second cold image vs row 5's (cache A): byte-identical: $([ "$sum_cold" = "$sum_cold_2" ] && echo yes || echo NO) (sha256 ${sum_cold:0:16}…, ${sum_cold_2:0:16}…)"
  echo "- cold, pushing every step to the directory remote as it builds (empty cache P): $(secs cold-push) s = $(ratio "$(secs cold-push)" "$(secs baseline-cold)")× the first baseline cold"
  echo "- add-one image vs a clean build of plus-jq.yaml: byte-identical: $identical (sha256 ${sum_add:0:16}…, ${sum_clean:0:16}…); the clean build took $(secs add-one-clean) s, peak RSS $(rss add-one-clean) MiB"
  echo "- add one package: $(outcomes add-one) ($(steps_with add-one built)); packages $(step_secs add-one packages) s, ssh-config $(step_secs add-one ssh-config) s, hosts $(step_secs add-one hosts) s"
  echo "- unit file changed: $(outcomes unit-change) ($(steps_with unit-change built))"
  echo "- no change: $(outcomes no-change); outputs rewritten: $(jq -r .assembled "$work/logs/no-change.out")"
  echo "- second machine, directory remote: $(outcomes second-dir); OCI registry: $(outcomes second-oci); \`kiln cache push\` to the registry took $(secs oci-push) s"
  echo "- mkfs -d reference: peak RSS $(rss mkfs-d) MiB; the same without metadata_csum: $(secs mkfs-d-nocsum) s"
  echo "- assembly only, kiln's phases: $(grep -h '^assembled in' "$work/logs/assembly.log" | sed 's/ (kernel.*//')"
  echo "- baseline phases, cold: $(baseline_phases baseline-cold); second cold: $(baseline_phases baseline-cold-2); add-one: $(baseline_phases baseline-add-one)"
  echo "- logs: $work/logs/<run>.log (stderr), <run>.out (stdout, kiln's --json report)"
}

main() {
  local caller=$PWD
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  work=${1:-/tmp/kiln-bench}
  baseline=${2:-$repo/../shared/bench/seed-baseline.sh}
  case $work in /*) ;; *) work=$caller/$work ;; esac
  case $baseline in /*) ;; *) baseline=$caller/$baseline ;; esac
  [ "$(id -u)" = 0 ] || die "run as root"
  [ -f "$baseline" ] || die "baseline script not found: $baseline"
  work=$(realpath -m "$work")
  baseline=$(realpath "$baseline")
  recipes=$work/recipes
  kiln=$repo/target/release/kiln
  trap cleanup EXIT
  trap 'exit 130' INT TERM

  need_tools
  # Before anything is written: the results file is in the repository.
  commit=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo '(commit unknown)')
  (cd "$repo" && cargo build --release -q)
  fresh_workdir
  cd "$work"                     # no stray ./kiln.toml is read
  make_recipes
  "$kiln" key generate "$work/bench" >/dev/null

  bench_cold
  bench_second_dir
  bench_second_oci
  bench_no_change
  bench_assembly
  bench_add_one
  bench_unit
  bench_cold_again

  local out
  out=$repo/bench/results-$(date +%Y-%m-%d).md
  report | tee "$out"
  say "written to $out"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
