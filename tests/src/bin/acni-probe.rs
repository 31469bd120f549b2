//! `acni-probe`: the traffic end points of the tests and the demo, for IPv4 and IPv6.
//!
//! - `tproxy [PORT...]`: ztunnel's stand-in. Transparent listeners (default ports 15001 15006
//!   15008) on `127.0.0.1` (IP_TRANSPARENT, AF_INET) and on `[::]` (IPV6_TRANSPARENT, AF_INET6,
//!   IPV6_V6ONLY) that answer every connection with the port it was caught on and its original
//!   destination (`getsockname()` of a TPROXY'd socket), then close. IPv6 TPROXY delivers to the
//!   listener that matches `--on-ip` (`::1` or any other local address): the wildcard `[::]`
//!   matches all of them, so the stand-in does not depend on the daemon's choice.
//! - `echo PORT NAME`: answers `NAME peer=<client addr:port>`, on `0.0.0.0` and on `[::]`
//!   (IPV6_V6ONLY, so an IPv4 client is never seen as `::ffff:a.b.c.d`).
//! - `connect ADDR:PORT [--src IP] [--timeout-ms N]`: connects (with `--src`, from a transparent
//!   socket of the destination's family bound to that foreign address, as the real ztunnel does),
//!   prints what it is sent. IPv6 destinations are written `[addr]:port`.
//!
//! Sockets are made with socket2 (IPV6_TRANSPARENT, IPV6_V6ONLY and a bounded connect without
//! hand-written FFI).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// A TCP socket of `addr`'s family, SO_REUSEADDR, IPv6 ones V6ONLY; transparent if asked
/// (IP_TRANSPARENT or IPV6_TRANSPARENT by family).
fn tcp_socket(addr: &SocketAddr, transparent: bool) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => {
            if transparent {
                s.set_ip_transparent_v4(true)?;
            }
        }
        SocketAddr::V6(_) => {
            s.set_only_v6(true)?;
            if transparent {
                s.set_ip_transparent_v6(true)?;
            }
        }
    }
    Ok(s)
}

fn listen(addr: SocketAddr, transparent: bool) -> std::io::Result<TcpListener> {
    let s = tcp_socket(&addr, transparent)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

fn serve(l: TcpListener, answer: impl Fn(&TcpStream) -> String + Send + 'static) {
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let msg = answer(&c);
        let _ = c.write_all(msg.as_bytes());
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

fn addr_str(a: std::io::Result<SocketAddr>) -> String {
    a.map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"))
}

/// The listening addresses of both families on `port`.
fn both(port: u16, v4: Ipv4Addr, v6: Ipv6Addr) -> [SocketAddr; 2] {
    [
        SocketAddr::new(IpAddr::V4(v4), port),
        SocketAddr::new(IpAddr::V6(v6), port),
    ]
}

/// Binds every address; an IPv6 address that cannot be bound (IPv6 disabled in this namespace)
/// is reported on stderr and skipped, an IPv4 one is an error.
fn listen_all(
    addrs: &[SocketAddr],
    transparent: bool,
) -> Result<Vec<(SocketAddr, TcpListener)>, String> {
    let mut out = Vec::new();
    for a in addrs {
        match listen(*a, transparent) {
            Ok(l) => out.push((*a, l)),
            Err(e) if a.is_ipv6() => eprintln!("acni-probe: not listening on {a}: {e}"),
            Err(e) => {
                return Err(format!(
                    "listen {a}{}: {e}",
                    if transparent { " (transparent)" } else { "" }
                ))
            }
        }
    }
    Ok(out)
}

fn tproxy(ports: &[u16]) -> Result<(), String> {
    let mut addrs = Vec::new();
    for &port in ports {
        addrs.extend(both(port, Ipv4Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED));
    }
    let listeners = listen_all(&addrs, true)?;
    let mut threads = Vec::new();
    let bound: Vec<String> = listeners.iter().map(|(a, _)| a.to_string()).collect();
    for (a, l) in listeners {
        let port = a.port();
        threads.push(std::thread::spawn(move || {
            serve(l, move |c| {
                format!(
                    "ztunnel port={port} orig_dst={} peer={}\n",
                    addr_str(c.local_addr()),
                    addr_str(c.peer_addr())
                )
            })
        }));
    }
    println!("tproxy listening on {}", bound.join(" "));
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn echo(port: u16, name: String) -> Result<(), String> {
    let listeners = listen_all(
        &both(port, Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED),
        false,
    )?;
    let bound: Vec<String> = listeners.iter().map(|(a, _)| a.to_string()).collect();
    println!("echo {name} listening on {}", bound.join(" "));
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(_, l)| {
            let name = name.clone();
            std::thread::spawn(move || {
                serve(l, move |c| {
                    format!("{name} peer={}\n", addr_str(c.peer_addr()))
                })
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn connect(dst: SocketAddr, src: Option<IpAddr>, timeout: Duration) -> Result<String, String> {
    let mut stream = match src {
        None => {
            TcpStream::connect_timeout(&dst, timeout).map_err(|e| format!("connect {dst}: {e}"))?
        }
        Some(src) => {
            if src.is_ipv4() != dst.is_ipv4() {
                return Err(format!("--src {src} and {dst} are of different families"));
            }
            let s = tcp_socket(&dst, true).map_err(|e| format!("transparent socket: {e}"))?;
            s.bind(&SocketAddr::new(src, 0).into())
                .map_err(|e| format!("bind {src} (transparent): {e}"))?;
            s.connect_timeout(&dst.into(), timeout)
                .map_err(|e| format!("connect {dst} from {src}: {e}"))?;
            s.into()
        }
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    stream
        .read_to_string(&mut out)
        .map_err(|e| format!("read from {dst}: {e}"))?;
    Ok(out)
}

const USAGE: &str = "usage: acni-probe tproxy [PORT...] | echo PORT NAME | connect ADDR:PORT [--src IP] [--timeout-ms N]   (IPv6: [ADDR]:PORT)";

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("tproxy") => {
            let ports: Vec<u16> = if args.len() > 1 {
                args[1..]
                    .iter()
                    .map(|p| p.parse().map_err(|_| format!("bad port {p}")))
                    .collect::<Result<_, _>>()?
            } else {
                vec![15001, 15006, 15008]
            };
            tproxy(&ports)
        }
        Some("echo") => {
            let port = args
                .get(1)
                .and_then(|p| p.parse().ok())
                .ok_or("usage: echo PORT NAME")?;
            echo(port, args.get(2).cloned().unwrap_or_else(|| "echo".into()))
        }
        Some("connect") => {
            let dst: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).ok_or(
                "usage: connect ADDR:PORT ([ADDR]:PORT for IPv6) [--src IP] [--timeout-ms N]",
            )?;
            let mut src = None;
            let mut timeout = Duration::from_secs(3);
            let mut i = 2;
            while i < args.len() {
                match (args[i].as_str(), args.get(i + 1)) {
                    ("--src", Some(v)) => {
                        src = Some(v.parse().map_err(|_| format!("bad --src {v}"))?)
                    }
                    ("--timeout-ms", Some(v)) => {
                        timeout = Duration::from_millis(
                            v.parse().map_err(|_| format!("bad --timeout-ms {v}"))?,
                        )
                    }
                    (a, _) => return Err(format!("unknown argument {a}")),
                }
                i += 2;
            }
            print!("{}", connect(dst, src, timeout)?);
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acni-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
