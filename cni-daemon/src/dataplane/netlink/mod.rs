//! The real dataplane: rtnetlink, ipset over netlink, iptables-restore, /proc/sys.
