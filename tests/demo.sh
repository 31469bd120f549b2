#!/usr/bin/env bash
# `make demo`: a node, a remote host, a ztunnel and two pods, all in throw-away network namespaces
# (never linked to the machine's own), pods made through libcni (our cnitool driver) with Debian's
# ptp + host-local + ambient-cni, the daemon running inside the node namespace. Everything is dual
# stack (IPv4 and IPv6 ULA addresses; IPv6 without DAD inside our namespaces only). Prints, step by
# step, what is captured where on both families, and the kernel state the daemon made. Removes
# everything on exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
BIN=${AMBIENT_CNI_BIN_DIR:-$root/target/release}
CNITOOL=${CNITOOL:-$root/target/cnitool/cnitool}
for b in "$BIN/ambient-cni" "$BIN/ambient-cnid" "$BIN/acni-probe" "$CNITOOL"; do
  [ -x "$b" ] || { echo "missing $b: run 'make build cnitool' first" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "the demo needs root (it creates network namespaces)" >&2; exit 1; }

P=acni-demo-$$
NODE=$P-node REMOTE=$P-remote ZT=$P-ztunnel APP=$P-app OTHER=$P-other
TMP=$(mktemp -d /tmp/$P.XXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for ns in $APP $OTHER $ZT $REMOTE $NODE; do
    # Whatever still runs inside our namespaces goes too.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Shows a command and its output; a failing command is part of the story, not the end of it.
show() { printf '\033[36m$ %s\033[0m\n' "$*"; "$@" 2>&1 | sed 's/^/  /' || true; }
in_ns() { ip netns exec "$@"; }

bold "1. A node and a remote host (network namespaces $NODE and $REMOTE)"
for ns in $NODE $REMOTE $ZT $APP $OTHER; do
  ip netns add "$ns"
  # IPv6 on, no duplicate address detection: inside our namespaces only, never the root one.
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
    net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
  # lo up, as a runtime's loopback plugin leaves every pod (IPv6 routes on a down lo fail).
  ip netns exec "$ns" ip link set lo up
done
# Created inside the node namespace, the peer straight in the remote one: never in the root netns.
in_ns $NODE ip link add eth1 type veth peer name eth0 netns $REMOTE
in_ns $NODE ip addr add 198.51.100.1/24 dev eth1
in_ns $REMOTE ip addr add 198.51.100.2/24 dev eth0
in_ns $NODE ip link set eth1 up
in_ns $REMOTE ip link set eth0 up
in_ns $REMOTE ip route add 10.244.1.0/24 via 198.51.100.1
in_ns $NODE ip -6 addr add fd00:198:51:100::1/64 dev eth1 nodad
in_ns $REMOTE ip -6 addr add fd00:198:51:100::2/64 dev eth0 nodad
in_ns $REMOTE ip -6 route add fd10:244:1::/64 via fd00:198:51:100::1
in_ns $NODE sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
# Strict reverse-path filtering, as on many real nodes.
in_ns $NODE sysctl -qw net.ipv4.conf.all.rp_filter=1
echo "  node eth1 198.51.100.1 fd00:198:51:100::1  <->  remote eth0 198.51.100.2 fd00:198:51:100::2"
echo "  pods will be dual stack: 10.244.1.0/24 and fd10:244:1::/64"

bold "2. Install the plugin (the DaemonSet's installer) and start the node daemon inside the node namespace"
mkdir -p "$TMP/bin" "$TMP/net.d" "$TMP/cache" "$TMP/ipam"
for p in ptp host-local loopback; do ln -s /usr/lib/cni/$p "$TMP/bin/$p"; done
# The node's primary CNI config, as kind's kindnet writes it for a dual-stack cluster (ptp +
# host-local, one range set per family).
cat > "$TMP/net.d/10-demo.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "demo-net",
  "plugins": [
    {"type": "ptp", "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$TMP/ipam",
              "ranges": [[{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}],
                         [{"subnet": "fd10:244:1::/64", "gateway": "fd10:244:1::1"}]],
              "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}
  ]
}
JSON
echo "  the installer copies the plugin into the CNI bin dir and appends its entry to the primary config:"
printf '\033[36m$ ambient-cnid install --bin-dir %s --conf-dir %s --socket %s ...\033[0m\n' "$TMP/bin" "$TMP/net.d" "$TMP/run/cni.sock"
"$BIN/ambient-cnid" install --bin-src "$BIN/ambient-cni" --bin-dir "$TMP/bin" --conf-dir "$TMP/net.d" \
  --socket "$TMP/run/cni.sock" --plugin-log-file "$TMP/plugin.log" --wait-secs 5 2>&1 | sed 's/^/  /'
show cat "$TMP/net.d/10-demo.conflist"
ip netns exec $NODE "$BIN/ambient-cnid" run --socket "$TMP/run/cni.sock" --state-dir "$TMP/state" \
  --ambient-namespace default --ztunnel-namespace istio-system --resync-interval-ms 2000 \
  >"$TMP/daemon.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$TMP/run/cni.sock" ] && break; sleep 0.1; done
show in_ns $NODE "$BIN/ambient-cnid" status --socket "$TMP/run/cni.sock"

cni() { # cni VERB NETNS NAMESPACE NAME
  in_ns $NODE env NETCONFPATH="$TMP/net.d" CNI_PATH="$TMP/bin" CNI_CACHE_DIR="$TMP/cache" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=$3;K8S_POD_NAME=$4;K8S_POD_UID=uid-$4" \
    "$CNITOOL" "$1" demo-net "/var/run/netns/$2"
}
pod_ip() { in_ns "$1" ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1; }
pod_ip6() { in_ns "$1" ip -6 -o addr show eth0 scope global | awk '{print $4}' | cut -d/ -f1; }

bold "3. Pods through libcni: 'app' in ambient namespace 'default', 'other' in 'legacy'"
show cni add $APP default app
cni add $OTHER legacy other >/dev/null
APP_IP=$(pod_ip $APP) OTHER_IP=$(pod_ip $OTHER) APP_IP6=$(pod_ip6 $APP) OTHER_IP6=$(pod_ip6 $OTHER)
echo "  app=$APP_IP $APP_IP6 (enrolled before any ztunnel exists)  other=$OTHER_IP $OTHER_IP6"
in_ns $APP "$BIN/acni-probe" echo 8080 app >/dev/null & PIDS+=($!)
in_ns $OTHER "$BIN/acni-probe" echo 8080 other >/dev/null & PIDS+=($!)
in_ns $REMOTE "$BIN/acni-probe" echo 8080 remote >/dev/null & PIDS+=($!)
sleep 0.3

bold "4. No ztunnel yet: the enrolled pod's TCP is held closed (no bypass)"
show in_ns $APP "$BIN/acni-probe" connect 198.51.100.2:8080 --timeout-ms 1000 || true
show in_ns $APP "$BIN/acni-probe" connect [fd00:198:51:100::2]:8080 --timeout-ms 1000 || true

bold "5. The ztunnel pod arrives (istio-system/ztunnel-demo); the daemon builds its tunnels"
cni add $ZT istio-system ztunnel-demo >/dev/null
ZT_IP=$(pod_ip $ZT) ZT_IP6=$(pod_ip6 $ZT)
in_ns $ZT "$BIN/acni-probe" tproxy >/dev/null & PIDS+=($!)
sleep 0.3
echo "  ztunnel=$ZT_IP $ZT_IP6, TPROXY listeners on 15001/15006/15008 (127.0.0.1 and [::]) that"
echo "  answer with the port they caught the connection on"

bold "6. Traffic"
echo "  enrolled app -> remote:8080 (egress is captured to 15001, original destination kept):"
show in_ns $APP "$BIN/acni-probe" connect 198.51.100.2:8080
echo "  not enrolled other -> remote:8080 (goes direct):"
show in_ns $OTHER "$BIN/acni-probe" connect 198.51.100.2:8080
echo "  remote -> app:8080 (inbound is captured to 15006):"
show in_ns $REMOTE "$BIN/acni-probe" connect $APP_IP:8080
echo "  remote -> app:15008 (HBONE port is captured to 15008):"
show in_ns $REMOTE "$BIN/acni-probe" connect $APP_IP:15008
echo "  ztunnel -> app:8080 directly (no loop back into ztunnel):"
show in_ns $ZT "$BIN/acni-probe" connect $APP_IP:8080
echo "  ztunnel -> app:8080 spoofing the remote client's address (transparent socket, as ztunnel does):"
show in_ns $ZT "$BIN/acni-probe" connect $APP_IP:8080 --src 198.51.100.2
echo "  IPv6, the same dual-stack pod: app -> [remote]:8080 (captured to 15001, original destination kept):"
show in_ns $APP "$BIN/acni-probe" connect [fd00:198:51:100::2]:8080
echo "  IPv6: not enrolled other -> [remote]:8080 (goes direct):"
show in_ns $OTHER "$BIN/acni-probe" connect [fd00:198:51:100::2]:8080
echo "  IPv6: remote -> [app]:8080 (captured to 15006) and [app]:15008 (captured to 15008):"
show in_ns $REMOTE "$BIN/acni-probe" connect [$APP_IP6]:8080
show in_ns $REMOTE "$BIN/acni-probe" connect [$APP_IP6]:15008
echo "  IPv6: ztunnel -> [app]:8080 spoofing the remote client's address:"
show in_ns $ZT "$BIN/acni-probe" connect [$APP_IP6]:8080 --src fd00:198:51:100::2

bold "7. What the daemon programmed"
show in_ns $NODE ipset list ztunnel-pods-ips
show in_ns $NODE ip rule
for t in 100 101 102; do show in_ns $NODE ip route show table $t; done
show in_ns $NODE iptables-save -t mangle
show in_ns $NODE iptables-save -t nat
show in_ns $NODE iptables-save -t filter
show in_ns $ZT iptables-save -t mangle
show in_ns $ZT ip rule
show in_ns $ZT ip route show table 100
echo "  ... and their IPv6 mirrors:"
show in_ns $NODE ipset list ztunnel-pods-ips6
show in_ns $NODE ip -6 rule
for t in 100 101 102; do show in_ns $NODE ip -6 route show table $t; done
show in_ns $NODE ip6tables-save -t mangle
show in_ns $ZT ip6tables-save -t mangle
show in_ns $ZT ip -6 rule
show in_ns $ZT ip -6 route show table 100
show in_ns $NODE "$BIN/ambient-cnid" status --socket "$TMP/run/cni.sock"

bold "8. Drift: someone flushes the ipset; the daemon repairs it within its resync period"
show in_ns $NODE ipset flush ztunnel-pods-ips
sleep 2.5
show in_ns $NODE ipset list ztunnel-pods-ips -terse
show in_ns $APP "$BIN/acni-probe" connect 198.51.100.2:8080

bold "9. The same on native nftables: the daemon restarted with --firewall nftables"
echo "  it builds table inet ambient-cni (over netlink, no nft binary) in the node and the ztunnel"
echo "  netns, then removes the iptables chains and ipsets it left; the pods stay captured throughout"
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
ip netns exec $NODE "$BIN/ambient-cnid" run --socket "$TMP/run/cni.sock" --state-dir "$TMP/state" \
  --ambient-namespace default --ztunnel-namespace istio-system --resync-interval-ms 2000 \
  --firewall nftables >>"$TMP/daemon.log" 2>&1 &
PIDS[0]=$!
for _ in $(seq 50); do
  in_ns $NODE "$BIN/ambient-cnid" status --socket "$TMP/run/cni.sock" >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 0.5
echo "  (the sets and the mangle prerouting chains; every chain: nft list table inet ambient-cni)"
show in_ns $NODE nft list set inet ambient-cni pods4
show in_ns $NODE nft list set inet ambient-cni pods6
show in_ns $NODE nft list chain inet ambient-cni ip-mangle-prerouting
show in_ns $ZT nft list table inet ambient-cni
echo "  nothing of the iptables driver is left:"
show in_ns $NODE ipset list -n
show in_ns $NODE sh -c "iptables-save -t mangle | grep -c ztunnel- || true"
show in_ns $APP "$BIN/acni-probe" connect 198.51.100.2:8080
show in_ns $APP "$BIN/acni-probe" connect [fd00:198:51:100::2]:8080
echo "  someone deletes an element of our set: nf_tables notifications repair it at once"
show in_ns $NODE nft delete element inet ambient-cni pods4 "{ $APP_IP }"
sleep 0.2
show in_ns $NODE nft list set inet ambient-cni pods4
echo "  and explain evaluates our nft table (read back over netlink) for a packet:"
show in_ns $NODE "$BIN/ambient-cnid" explain $APP_IP 198.51.100.2:8080 --socket "$TMP/run/cni.sock"

bold "10. DEL of app: its entries of both families go, and its IPs are no longer steered into ztunnel"
show cni del $APP default app
show in_ns $NODE nft list set inet ambient-cni pods4
show in_ns $NODE nft list set inet ambient-cni pods6
show in_ns $NODE ip route show table 100
show in_ns $NODE ip -6 route show table 100
show in_ns $NODE ip route get $APP_IP from 198.51.100.2 iif eth1
show in_ns $NODE ip -6 route get $APP_IP6 from fd00:198:51:100::2 iif eth1

bold "11. The daemon's trace"
show in_ns $NODE "$BIN/ambient-cnid" trace --socket "$TMP/run/cni.sock" --limit 40

bold "12. cleanup removes every object of ours"
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
show in_ns $NODE "$BIN/ambient-cnid" cleanup --state-dir "$TMP/state" --firewall nftables
show in_ns $NODE ip rule
show in_ns $NODE ip -6 rule
show in_ns $NODE nft list tables
show in_ns $ZT nft list tables
echo
echo "Done. Daemon log: shown below (last 15 lines)."
tail -n 15 "$TMP/daemon.log" | sed 's/^/  /'
