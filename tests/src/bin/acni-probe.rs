//! `acni-probe`: the traffic end points of the tests and the demo.
//!
//! - `tproxy [PORT...]`: ztunnel's stand-in. Transparent (IP_TRANSPARENT) listeners on 127.0.0.1
//!   (default 15001 15006 15008) that answer every connection with the port it was caught on and
//!   its original destination (`getsockname()` of a TPROXY'd socket), then close.
//! - `echo PORT NAME`: answers `NAME peer=<client addr:port>`.
//! - `connect ADDR:PORT [--src IP] [--timeout-ms N]`: connects (with `--src`, from a transparent
//!   socket bound to that foreign address, as the real ztunnel does), prints what it is sent.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

fn transparent_socket() -> nix::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::IpTransparent, &true)?;
    Ok(fd)
}

fn listen_transparent(port: u16) -> nix::Result<TcpListener> {
    let fd = transparent_socket()?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    )?;
    socket::listen(&fd, socket::Backlog::new(128)?)?;
    // SAFETY: `fd` is a valid, owned, listening TCP socket; ownership moves into the listener.
    Ok(unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) })
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

fn tproxy(ports: &[u16]) -> Result<(), String> {
    let mut threads = Vec::new();
    for &port in ports {
        let l = listen_transparent(port)
            .map_err(|e| format!("listen 127.0.0.1:{port} (transparent): {e}"))?;
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
    println!("tproxy listening on {ports:?}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn echo(port: u16, name: String) -> Result<(), String> {
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listen :{port}: {e}"))?;
    println!("echo {name} listening on {port}");
    serve(l, move |c| {
        format!("{name} peer={}\n", addr_str(c.peer_addr()))
    });
    Ok(())
}

fn connect(dst: SocketAddr, src: Option<Ipv4Addr>, timeout: Duration) -> Result<String, String> {
    let mut stream = match src {
        None => {
            TcpStream::connect_timeout(&dst, timeout).map_err(|e| format!("connect {dst}: {e}"))?
        }
        Some(src) => {
            let fd = transparent_socket().map_err(|e| format!("transparent socket: {e}"))?;
            socket::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn::from(SocketAddrV4::new(src, 0)),
            )
            .map_err(|e| format!("bind {src} (transparent): {e}"))?;
            let SocketAddr::V4(d) = dst else {
                return Err("IPv4 only".into());
            };
            // A blocking connect bounded by SO_SNDTIMEO.
            socket::setsockopt(
                &fd,
                sockopt::SendTimeout,
                &nix::sys::time::TimeVal::new(timeout.as_secs() as i64, 0),
            )
            .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
            socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(d))
                .map_err(|e| format!("connect {dst} from {src}: {e}"))?;
            // SAFETY: `fd` is a valid, owned, connected TCP socket; ownership moves into the stream.
            unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
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

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("tproxy") => {
            let ports: Vec<u16> = if args.len() > 1 {
                args[1..].iter().map(|p| p.parse().map_err(|_| format!("bad port {p}"))).collect::<Result<_, _>>()?
            } else {
                vec![15001, 15006, 15008]
            };
            tproxy(&ports)
        }
        Some("echo") => {
            let port = args.get(1).and_then(|p| p.parse().ok()).ok_or("usage: echo PORT NAME")?;
            echo(port, args.get(2).cloned().unwrap_or_else(|| "echo".into()))
        }
        Some("connect") => {
            let dst: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).ok_or("usage: connect IP:PORT [--src IP] [--timeout-ms N]")?;
            let mut src = None;
            let mut timeout = Duration::from_secs(3);
            let mut i = 2;
            while i < args.len() {
                match (args[i].as_str(), args.get(i + 1)) {
                    ("--src", Some(v)) => src = Some(v.parse().map_err(|_| format!("bad --src {v}"))?),
                    ("--timeout-ms", Some(v)) => timeout = Duration::from_millis(v.parse().map_err(|_| format!("bad --timeout-ms {v}"))?),
                    (a, _) => return Err(format!("unknown argument {a}")),
                }
                i += 2;
            }
            print!("{}", connect(dst, src, timeout)?);
            Ok(())
        }
        _ => Err("usage: acni-probe tproxy [PORT...] | echo PORT NAME | connect IP:PORT [--src IP] [--timeout-ms N]".into()),
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
