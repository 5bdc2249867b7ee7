#!/usr/bin/env bash
# Three (or N) "hosts" on one machine for MPI tests: network namespaces PREFIX1..PREFIXN,
# each with a veth on one bridge. The bridge (in the calling namespace, where mpirun
# runs) is 10.251.X.1; host i is 10.251.X.(10+i). Needs root and iproute2.
#
#   netns-hosts.sh up PREFIX NET N     # NET: the third octet, 0-255
#   netns-hosts.sh down PREFIX N
#
# netns-rsh.sh is the matching `--mca plm_rsh_agent`.
set -euo pipefail
cmd=$1 prefix=$2
bridge="${prefix}br"
case "$cmd" in
up)
  net=$3 n=$4
  ip link add "$bridge" type bridge
  ip addr add "10.251.$net.1/24" dev "$bridge"
  ip link set "$bridge" up
  for i in $(seq 1 "$n"); do
    ns="$prefix$i"
    ip netns add "$ns"
    ip link add "${prefix}v$i" type veth peer name "${prefix}p$i"
    ip link set "${prefix}p$i" netns "$ns"
    ip link set "${prefix}v$i" master "$bridge"
    ip link set "${prefix}v$i" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.251.$net.$((10 + i))/24" dev "${prefix}p$i"
    ip -n "$ns" link set "${prefix}p$i" up
  done
  ;;
down)
  n=$3
  for i in $(seq 1 "$n"); do
    ip netns del "$prefix$i" 2>/dev/null || true
    ip link del "${prefix}v$i" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  ;;
*)
  echo "usage: $0 up PREFIX NET N | down PREFIX N" >&2
  exit 2
  ;;
esac
