// Command cnitool drives CNI plugins through libcni, the library container runtimes use.
//
// It is a drop-in for upstream cnitool (containernetworking/cni/cnitool), built offline against
// Debian's libcni (golang-github-appc-cni-dev 1.1.2, spec 1.0.0), with two additions for tests:
// CNI_CACHE_DIR (libcni result cache; default /var/lib/cni) and CNI_CONTAINERID (override the
// container ID derived from the netns path).
//
// Usage:
//
//	cnitool add|check|del NETWORK NETNS
//
// Environment:
//
//	NETCONFPATH     conf dir searched for NETWORK (default /etc/cni/net.d)
//	CNI_PATH        ':'-separated plugin dirs
//	CNI_IFNAME      interface name (default eth0)
//	CNI_ARGS        K=V;K=V, each pair with exactly one '=' and non-empty sides
//	CAP_ARGS        JSON object of capability args (runtimeConfig)
//	CNI_CACHE_DIR   libcni cache dir (default /var/lib/cni)
//	CNI_CONTAINERID container ID (default cnitool-<hex of SHA-512(abs netns)[:10]>)
//
// add prints the final result as JSON; check and del print nothing. Errors go to stderr with
// exit status 1.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

const defaultNetDir = "/etc/cni/net.d"

func usage() {
	exe := filepath.Base(os.Args[0])
	fmt.Fprintf(os.Stderr, "%s: add, check, or remove network interfaces from a network namespace\n", exe)
	fmt.Fprintf(os.Stderr, "  %s add   <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s check <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s del   <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "env: NETCONFPATH CNI_PATH CNI_IFNAME CNI_ARGS CAP_ARGS CNI_CACHE_DIR CNI_CONTAINERID\n")
	os.Exit(1)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "%s\n", err)
	os.Exit(1)
}

// parseArgs validates CNI_ARGS like upstream cnitool: every pair is K=V with exactly one '='
// and non-empty key and value. The pairs reach the plugins unchanged (no IgnoreUnknown added).
func parseArgs(s string) ([][2]string, error) {
	var out [][2]string
	for _, pair := range strings.Split(s, ";") {
		kv := strings.Split(pair, "=")
		if len(kv) != 2 || kv[0] == "" || kv[1] == "" {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", pair)
		}
		out = append(out, [2]string{kv[0], kv[1]})
	}
	return out, nil
}

func main() {
	if len(os.Args) < 4 {
		usage()
	}
	cmd, network, netns := os.Args[1], os.Args[2], os.Args[3]
	if cmd != "add" && cmd != "check" && cmd != "del" {
		usage()
	}

	netdir := os.Getenv("NETCONFPATH")
	if netdir == "" {
		netdir = defaultNetDir
	}
	conf, err := libcni.LoadConfList(netdir, network)
	if err != nil {
		fail(err)
	}

	var capArgs map[string]interface{}
	if v := os.Getenv("CAP_ARGS"); v != "" {
		if err := json.Unmarshal([]byte(v), &capArgs); err != nil {
			fail(fmt.Errorf("invalid CAP_ARGS: %w", err))
		}
	}

	var cniArgs [][2]string
	if v := os.Getenv("CNI_ARGS"); v != "" {
		if cniArgs, err = parseArgs(v); err != nil {
			fail(err)
		}
	}

	ifname, ok := os.LookupEnv("CNI_IFNAME")
	if !ok {
		ifname = "eth0"
	}

	netns, err = filepath.Abs(netns)
	if err != nil {
		fail(err)
	}
	containerID := os.Getenv("CNI_CONTAINERID")
	if containerID == "" {
		sum := sha512.Sum512([]byte(netns))
		containerID = fmt.Sprintf("cnitool-%x", sum[:10])
	}

	paths := filepath.SplitList(os.Getenv("CNI_PATH"))
	var cninet *libcni.CNIConfig
	if dir := os.Getenv("CNI_CACHE_DIR"); dir != "" {
		cninet = libcni.NewCNIConfigWithCacheDir(paths, dir, nil)
	} else {
		cninet = libcni.NewCNIConfig(paths, nil)
	}

	rt := &libcni.RuntimeConf{
		ContainerID:    containerID,
		NetNS:          netns,
		IfName:         ifname,
		Args:           cniArgs,
		CapabilityArgs: capArgs,
	}

	ctx := context.Background()
	switch cmd {
	case "add":
		result, err := cninet.AddNetworkList(ctx, conf, rt)
		if result != nil {
			if perr := result.Print(); perr != nil && err == nil {
				err = perr
			}
		}
		if err != nil {
			fail(err)
		}
	case "check":
		if err := cninet.CheckNetworkList(ctx, conf, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cninet.DelNetworkList(ctx, conf, rt); err != nil {
			fail(err)
		}
	}
}
