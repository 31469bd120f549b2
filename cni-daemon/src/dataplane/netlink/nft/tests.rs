//! The driver's start-up checks, without a kernel.

use super::*;

fn message(e: NftError) -> String {
    match start_error("nftables firewall: talk to nf_tables", &e) {
        DpError::Netlink { msg, .. } => msg,
        other => panic!("not a netlink error: {other:?}"),
    }
}

#[test]
fn a_kernel_without_nf_tables_is_named_with_the_way_out() {
    let kernel = |code| NftError::Kernel { code, index: None };
    for e in [
        // nfnetlink there (ipset, conntrack), no nf_tables subsystem.
        kernel(libc::EINVAL),
        kernel(libc::EOPNOTSUPP),
        kernel(libc::ENOENT),
        // No nfnetlink at all: the socket cannot be made.
        NftError::Io(std::io::Error::from_raw_os_error(libc::EPROTONOSUPPORT)),
    ] {
        let m = message(e);
        assert!(
            m.contains("module nf_tables") && m.contains("modprobe nf_tables"),
            "{m}"
        );
        assert!(m.contains("--firewall iptables"), "{m}");
    }
}

#[test]
fn other_failures_are_not_blamed_on_a_missing_module() {
    for e in [
        NftError::Kernel {
            code: libc::EPERM,
            index: None,
        },
        NftError::Io(std::io::Error::from_raw_os_error(libc::EACCES)),
        NftError::Invalid("short answer".into()),
    ] {
        let m = message(e);
        assert!(!m.contains("nf_tables"), "{m}");
    }
}
