#!/bin/sh
# Entrypoint of the Ray nodes of docker/compose.yaml: runs its arguments (`ray start ...`) with
#   --object-store-memory  80 % of /dev/shm (compose's shm_size, set by RAY_SHM_SIZE), unless given: Ray's
#                          default, 30 % of the host's RAM, is more than /dev/shm on any host above ~13 GiB, and
#                          Ray then silently moves the store to disk (/tmp);
#   --num-cpus             $RAY_WORKER_CPUS, when set (several workers on one host share its cores).
# POSIX sh: Compose v1 has no ${VAR:+...} interpolation, so the optional flags are added here.
set -eu
extra=""
case " $* " in
  *" --object-store-memory"*) ;;
  *)
    shm_kb=$(df -kP /dev/shm | awk 'NR == 2 {print $2}')
    extra="--object-store-memory=$((shm_kb * 1024 / 10 * 8))"
    ;;
esac
if [ -n "${RAY_WORKER_CPUS:-}" ]; then
  extra="$extra --num-cpus=$RAY_WORKER_CPUS"
fi
# shellcheck disable=SC2086 # $extra holds whole options
exec "$@" $extra
