#!/bin/sh
# Builds the cnitool-compatible driver offline, in GOPATH mode, against Debian's libcni
# (apt-get install golang-go golang-github-appc-cni-dev).
# Usage: tests/cnitool/build.sh [OUTPUT]   (default: <workspace>/target/cnitool/cnitool)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/cnitool/cnitool}
case $out in /*) ;; *) out=$(pwd)/$out ;; esac
gocode=/usr/share/gocode
if [ ! -d "$gocode/src/github.com/containernetworking/cni/libcni" ]; then
    echo "libcni sources missing: apt-get install golang-github-appc-cni-dev" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")" "$root/target/cnitool/gopath" "$root/target/cnitool/gocache"
cd "$here"
# A private GOPATH entry and build cache inside target/: nothing is written to $HOME or /root.
GO111MODULE=off GOFLAGS= GOPATH="$root/target/cnitool/gopath:$gocode" \
    GOCACHE="$root/target/cnitool/gocache" CGO_ENABLED=0 \
    go build -o "$out.tmp.$$" .
mv -f "$out.tmp.$$" "$out"
echo "$out"
