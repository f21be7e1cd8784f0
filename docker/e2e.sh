#!/usr/bin/env bash
# The compose cluster for real, end to end, on this host's Docker engine:
#   builds the image (from BASE_IMAGE), brings up a head, 2 workers and the control plane, and runs the README's
#   "Run on a cluster" section as written (secrets with their modes, dataset, a REST PAA run, results, checkpoint,
#   `ray job submit` from the host); then a LAD run on the Ray engine whose Train worker's container is killed
#   (the run must show `recovering` and succeed), a stop, `down`/`up` with the registry intact, and checks that
#   the image holds no secret or .git and that Ray's object stores are in /dev/shm. Prints a summary with timings.
#
#   docker/e2e.sh                                         # Compose v2, python:3.11-slim base
#   BASE_IMAGE=local/bookworm-python COMPOSE=docker-compose docker/e2e.sh      # no Docker Hub, Compose v1
#
# It works in a copy of this checkout (its own secrets, compose project `lad-e2e`, image `lad:e2e`), and removes
# the project's containers and volumes at the end (KEEP=1 keeps them). Needs: docker, Compose, curl, openssl,
# python3, and `ray` on the host for `ray job submit` (the project's own install has it).
{ # the whole script is one compound command: bash reads it all before running, so editing it mid-run is safe
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export COMPOSE="${COMPOSE:-docker compose}"
export LAD_BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}" LAD_IMAGE="${LAD_IMAGE:-lad:e2e}"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-lad-e2e}" RAY_WORKER_CPUS="${RAY_WORKER_CPUS:-2}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"   # the legacy builder: the one that reads only the root .dockerignore
WORK="$(mktemp -d /tmp/lad-e2e.XXXXXX)"
SUMMARY=()
T0=$SECONDS
LAP=$SECONDS

say() { printf '\n== %s\n' "$*"; }
lap() { SUMMARY+=("$(printf '%-58s %5d s' "$1" $((SECONDS - LAP)))"); LAP=$SECONDS; }
fail() { echo "e2e FAILED: $*" >&2; exit 1; }
dc() { $COMPOSE -f docker/compose.yaml "$@"; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || fail "$what: not within ${limit} s"
    sleep 2
  done
}
run_field() { curl -sf "$H/runs/$1" | python3 -c "import json, sys; d = json.load(sys.stdin); print($2)"; }
run_is() { [ "$(run_field "$1" 'd["state"]')" = "$2" ]; }
run_final() {  # run_final ID SECONDS: waits until the run ends; prints its state
  local end=$((SECONDS + $2)) state
  while :; do
    state=$(run_field "$1" 'd["state"]')
    case "$state" in succeeded|failed|stopped) echo "$state"; return;; esac
    [ $SECONDS -lt $end ] || fail "run $1 still $state after $2 s"
    sleep 3
  done
}
cleanup() {
  local rc=$?
  cd "$WORK/repo" 2>/dev/null || return
  [ $rc -eq 0 ] || { echo "--- logs (tail) ---"; dc logs --tail 40 2>/dev/null | tail -120; }
  if [ "${KEEP:-0}" != 1 ]; then
    dc down -v --remove-orphans >/dev/null 2>&1 || dc down -v --remove-orphans || echo "e2e: down -v failed" >&2
    cd / && rm -rf "$WORK"   # its secrets and the copy of .git go too
  fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------------------------
say "copy of the checkout in $WORK/repo (.git included: the image must not take it)"
mkdir -p "$WORK/repo"
tar -C "$REPO" --exclude=./docker/secrets --exclude=./runs --exclude=./data --exclude=./.whl -cf - . \
  | tar -C "$WORK/repo" -xf -
cd "$WORK/repo"
# The README's blocks, one file each; the only change: COMPOSE as this run asks.
python3 - "$WORK" <<'EOF'
import re, sys
from pathlib import Path
text = Path("README.md").read_text()
section = text[text.index("## Run on a cluster"):]
section = section[:section.index("\n## ", 3)]
blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
assert len(blocks) >= 4, f"the README's cluster section has {len(blocks)} bash blocks"
for i, block in enumerate(blocks, 1):
    block = re.sub(r'^COMPOSE="docker compose".*$', 'COMPOSE="${COMPOSE}"', block, flags=re.M)
    Path(sys.argv[1], f"block{i}.sh").write_text(block)
print(f"{len(blocks)} blocks")
EOF
lap "copy and README blocks"

say "README block 1: secrets, build, up, dataset"
source "$WORK/block1.sh"
[ "$(stat -c %a docker/secrets)" = 700 ] || fail "docker/secrets is not mode 700"
[ "$(stat -c %a docker/secrets/api_token)" = 644 ] || fail "the api_token secret is not mode 644"
lap "block 1: secrets, image build, up, dataset"
dc up -d --scale ray-worker=2 >/dev/null 2>&1
H=http://127.0.0.1:8000
wait_for 300 "the control plane" curl -sf $H/healthz
for c in $(dc ps -q ray-head ray-worker); do
  wait_for 180 "container $c healthy" sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' $c)\" = healthy ]"
done
[ "$(dc ps -q ray-worker | wc -l)" -eq 2 ] || fail "not 2 workers"
for c in $(dc ps -q ray-head ray-worker); do  # Ray's object store in shared memory, not on disk
  docker exec "$c" python -m services.healthcheck --raylet || fail "container $c: object store not in /dev/shm"
done
SHM=$(docker exec "$(dc ps -q ray-worker | head -1)" df -h /dev/shm | awk 'NR == 2 {print $2}')
lap "2 workers healthy, object stores in /dev/shm ($SHM)"

say "README block 2: a REST PAA run"
source "$WORK/block2.sh"
echo
[ -n "$ID" ] || fail "no run id from POST /runs"
[ "$(run_final "$ID" 900)" = succeeded ] || fail "paa-1: $(run_field "$ID" 'd.get("error")')"
lap "block 2: REST PAA run (2 epochs, 256 images) succeeded"

say "README block 3: results and the checkpoint"
source "$WORK/block3.sh"
[ -s paa-1-best.pt ] || fail "docker cp gave no checkpoint"
lap "block 3: stats, docker cp of best.pt, lad eval on the cluster"

say "README block 4: ray job submit from the host"
command -v ray >/dev/null || fail "ray is not installed on the host"
source "$WORK/block4.sh"
lap "block 4: ray job submit (paa-2) succeeded"

say "a LAD run on the Ray engine; the container of its Train worker is killed"
LAD=$(curl -sf -X POST $H/runs -H "$AUTH" -H 'Content-Type: application/json' -d '{"name": "lad-1", "mode": "lad",
  "output_dir": "/runs", "teacher": {"checkpoint": "/runs/paa-1/checkpoints/best.pt"},
  "data": {"train": "/data/digits/train.json", "val": "/data/digits/val.json"},
  "train": {"max_steps": 40, "checkpoint_every": 5, "log_every": 1},
  "pipeline": {"engine": "ray", "max_failures": 2}}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
wait_for 600 "lad-1 at step 8" sh -c "[ \"\$(curl -sf $H/runs/$LAD | python3 -c 'import json, sys; print((json.load(sys.stdin).get(\"progress\") or {}).get(\"step\") or 0)')\" -ge 8 ]"
VICTIM=""
for c in $(dc ps -q ray-worker); do
  if docker top "$c" -eo pid,args | grep -q RayTrainWorker; then VICTIM=$c; fi
done
[ -n "$VICTIM" ] || fail "no worker container holds the Train worker"
docker kill "$VICTIM" >/dev/null
KILLED=$SECONDS
wait_for 300 "lad-1 recovering" sh -c "curl -sf $H/runs/$LAD | grep -q '\"recovering\"'"
SEEN=$((SECONDS - KILLED))
REASON=$(run_field "$LAD" 'd["progress"]["recovery"]["reason"]')
[ "$(run_final "$LAD" 900)" = succeeded ] || fail "lad-1 after the kill: $(run_field "$LAD" 'd.get("error")')"
[ "$(run_field "$LAD" 'd["progress"]["step"]')" = 40 ] || fail "lad-1 did not reach step 40"
lap "LAD on Ray: worker container killed, 'recovering' after ${SEEN} s, succeeded"
dc up -d --scale ray-worker=2 >/dev/null 2>&1

say "stop a run"
ID=$(curl -sf -X POST $H/runs -H "$AUTH" -H 'Content-Type: application/json' -d '{"name": "paa-stop", "mode": "paa",
  "output_dir": "/runs", "data": {"train": "/data/digits/train.json", "val": null},
  "train": {"epochs": 50, "log_every": 1}}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
wait_for 600 "paa-stop training" sh -c "curl -sf $H/runs/$ID | grep -q '\"step\": *[1-9]'"
curl -s -X POST $H/runs/$ID/stop -H "$AUTH" >/dev/null
[ "$(run_final "$ID" 300)" = stopped ] || fail "paa-stop did not stop"
lap "stop: a running run stopped"

say "down / up: the registry is kept"
BEFORE=$(curl -sf $H/runs -H "$AUTH" | python3 -c 'import json, sys; print(sorted((r["name"], r["state"]) for r in json.load(sys.stdin)["runs"]))')
dc down >/dev/null 2>&1
dc up -d --scale ray-worker=2 >/dev/null 2>&1
wait_for 300 "the control plane after up" curl -sf $H/healthz
AFTER=$(curl -sf $H/runs -H "$AUTH" | python3 -c 'import json, sys; print(sorted((r["name"], r["state"]) for r in json.load(sys.stdin)["runs"]))')
[ "$BEFORE" = "$AFTER" ] || fail "registry changed across down/up: $BEFORE -> $AFTER"
lap "down/up: registry intact"

say "the image holds no secret and no .git"
(umask 077 && printf 'T1=%s\nT2=%s\n' "$(cat docker/secrets/api_token)" "$(cat docker/secrets/ray_token)" \
  > "$WORK/tokens.env")   # in a file, not on a command line that `ps` shows
docker run --rm --entrypoint sh --env-file "$WORK/tokens.env" \
  "$LAD_IMAGE" -c 'test ! -e /app/.git && test ! -e /app/docker/secrets && ! grep -rqsF -e "$T1" -e "$T2" /app /home' \
  || fail "a secret or .git is in the image"
SIZE=$(docker image inspect -f '{{.Size}}' "$LAD_IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
lap "image: no secret, no .git"

echo
echo "=== docker/e2e.sh summary ($($COMPOSE version --short 2>/dev/null | head -1 | sed 's/^/Compose /'), base $LAD_BASE_IMAGE)"
echo "image $LAD_IMAGE: $SIZE; runs: $AFTER"
echo "recovery reason: $REASON"
printf '%s\n' "${SUMMARY[@]}"
printf '%-58s %5d s\n' "total" $((SECONDS - T0))
echo "e2e PASSED"
exit 0
}
