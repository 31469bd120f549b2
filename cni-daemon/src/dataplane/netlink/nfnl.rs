//! What the two nfnetlink clients (the ipset codec and the nf_tables driver) share: the
//! attribute flag bits and the request socket.

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// `NLA_F_NESTED`: the attribute holds attributes.
pub(crate) const NLA_F_NESTED: u16 = 1 << 15;
/// `NLA_F_NET_BYTEORDER`: the attribute's integer is big-endian.
pub(crate) const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// The attribute type without the flag bits.
pub(crate) const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// A NETLINK_NETFILTER request socket in the calling thread's network namespace, bound and
/// connected to the kernel. The kernel answers every request at once; the 5 s receive timeout
/// only guards against a wedged socket.
pub(crate) fn request_socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let tv = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .map_err(io::Error::from)?;
    Ok(sock)
}
