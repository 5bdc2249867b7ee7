#!/usr/bin/env bash
# mpirun's remote shell for namespace "hosts" (see netns-hosts.sh), in place of ssh:
#   mpirun --mca plm_rsh_agent scripts/mpi/netns-rsh.sh --host 10.251.X.11,... ...
# Open MPI calls it as `netns-rsh.sh HOST COMMAND...`, like ssh. Host 10.251.X.(10+i) is
# namespace ${MP_NETNS_PREFIX}i; the command runs there, with that name as its host name
# (its own UTS namespace), through a shell as ssh would.
set -euo pipefail
while [[ $# -gt 0 && $1 == -* ]]; do shift; done # ssh-style options, if any
host=$1
shift
i=$(( ${host##*.} - 10 ))
ns="${MP_NETNS_PREFIX:?MP_NETNS_PREFIX is not set}$i"
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0"; exec sh -c "$1"' "$ns" "$*"
