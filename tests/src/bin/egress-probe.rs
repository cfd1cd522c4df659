//! A plain std-socket client (and one tiny transparent-proxy stand-in) that the integration
//! tests run inside the intercepted cgroup. It prints `key=value` words for the test to read.
//!
//! Options: `--as-uid N` and `--as-gid N` drop to that user and group first; `--mark N` sets
//! SO_MARK on the sockets `echo` and `hold` connect (a root workload forging a mark);
//! `--pace MS` makes `echo` wait MS between its 64 KiB writes (a long transfer).
//!
//! egress-probe [--as-uid N] [--as-gid N] [--mark N] echo ADDR BYTES
//!     connect, send BYTES of the test pattern while reading the echo, check it.
//! egress-probe [...] hold COUNT ADDR...
//!     open COUNT connections at once over ADDRs (round robin) to `whoami` servers and check
//!     that each reached the address it dialled.
//! egress-probe many COUNT ADDR
//!     COUNT connections one after another to a `whoami` server: for each, print what
//!     getpeername() says and the address the server was reached at.
//! egress-probe load SECS RATE ADDR
//!     for SECS seconds open RATE connections a second (a NUL byte each way), count failures.
//! egress-probe pings COUNT ADDR
//!     COUNT connections (a NUL byte each way) over 4 threads, as fast as they go, stopping after
//!     60 s; count failures.
//! egress-probe watch SECS INTERVAL_MS ADDR...
//!     every INTERVAL_MS try to connect to each ADDR; print when (unix ms) and the outcome.
//! egress-probe raw ADDR HEX HOLD_MS
//!     connect, send the bytes HEX spells, wait HOLD_MS, half-close, read until the end
//!     (at most 30 s); print how many bytes came back, the text, and how the read ended.
//! egress-probe reconnect LOCAL FIRST SECOND
//!     from LOCAL (bound with SO_REUSEADDR) connect to FIRST and send one byte; from a second
//!     socket bound to LOCAL too, connect to FIRST (which fails before any packet: the
//!     connection exists) and then, on the same socket, to SECOND, a `whoami` server; print
//!     the errors, what getpeername() says and where the server was reached. The second socket
//!     closes first.
//! egress-probe origdst-server COUNT ADDR...
//!     listen on ADDRs; for COUNT accepted connections, ask getsockopt(SO_ORIGINAL_DST) and
//!     print and send back the answer.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
};

use egress_tests::{pattern, pattern_chunks, raise_nofile_limit};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take_opt = |name: &str| -> Option<u32> {
        let i = args.iter().position(|a| a == name)?;
        let v = args.get(i + 1)?.parse().ok()?;
        args.drain(i..i + 2);
        Some(v)
    };
    let (uid, gid) = (take_opt("--as-uid"), take_opt("--as-gid"));
    if let Some(m) = take_opt("--mark") {
        let _ = MARK.set(m);
    }
    let pace = std::time::Duration::from_millis(take_opt("--pace").unwrap_or(0).into());
    raise_nofile_limit();
    // Drop privileges after `egress exec` has put us in the cgroup as root.
    unsafe {
        if let Some(g) = gid {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setgid(g), 0, "setgid");
        }
        if let Some(u) = uid {
            assert_eq!(libc::setuid(u), 0, "setuid");
        }
    }
    let addr = |s: &String| {
        s.parse::<SocketAddr>()
            .unwrap_or_else(|_| panic!("{s}: not IP:PORT"))
    };
    match args.first().map(String::as_str) {
        Some("echo") => echo(addr(&args[1]), args[2].parse().expect("BYTES"), pace),
        Some("hold") => hold(
            args[1].parse().expect("COUNT"),
            &args[2..].iter().map(addr).collect::<Vec<_>>(),
        ),
        Some("many") => many(args[1].parse().expect("COUNT"), addr(&args[2])),
        Some("load") => load(
            args[1].parse().expect("SECS"),
            args[2].parse().expect("RATE"),
            addr(&args[3]),
        ),
        Some("pings") => pings(args[1].parse().expect("COUNT"), addr(&args[2])),
        Some("watch") => watch(
            args[1].parse().expect("SECS"),
            args[2].parse().expect("INTERVAL_MS"),
            &args[3..].iter().map(addr).collect::<Vec<_>>(),
        ),
        Some("reconnect") => reconnect(addr(&args[1]), addr(&args[2]), addr(&args[3])),
        Some("raw") => raw(addr(&args[1]), &args[2], args[3].parse().expect("HOLD_MS")),
        Some("origdst-server") => origdst_server(
            args[1].parse().expect("COUNT"),
            &args[2..].iter().map(addr).collect::<Vec<_>>(),
        ),
        _ => {
            eprintln!(
                "usage: egress-probe [--as-uid N] [--as-gid N] echo ADDR BYTES | hold COUNT ADDR... | raw ADDR HEX HOLD_MS | origdst-server COUNT ADDR..."
            );
            ExitCode::from(64)
        }
    }
}

/// `--mark`: SO_MARK for the sockets `connect` makes.
static MARK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn connect(dst: SocketAddr) -> Result<TcpStream, ExitCode> {
    let made = match MARK.get() {
        None => TcpStream::connect(dst),
        Some(m) => (|| {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            s.set_mark(*m)?;
            s.connect(&dst.into())?;
            Ok(s.into())
        })(),
    };
    made.map_err(|e| {
        println!(
            "connect_error errno={} kind={:?}",
            e.raw_os_error().unwrap_or(0),
            e.kind()
        );
        ExitCode::from(3)
    })
}

fn reconnect(local: SocketAddr, first: SocketAddr, second: SocketAddr) -> ExitCode {
    use socket2::{Domain, Socket, Type};
    let bound = || {
        let s = Socket::new(Domain::for_address(local), Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&local.into()).unwrap();
        s
    };
    let errno = |r: std::io::Result<()>| r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1));
    let held = bound();
    let e = errno(held.connect(&first.into()));
    if e != 0 {
        println!("held_errno={e}");
        return ExitCode::from(3);
    }
    let mut held = TcpStream::from(held);
    held.write_all(b"a").unwrap();
    let again = bound();
    let first_errno = errno(again.connect(&first.into()));
    let second_errno = errno(again.connect(&second.into()));
    if second_errno != 0 {
        println!("first_errno={first_errno} second_errno={second_errno}");
        return ExitCode::from(3);
    }
    let s = TcpStream::from(again);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    println!(
        "local={local} first_errno={first_errno} second_errno=0 peer={} reached={}",
        s.peer_addr().unwrap(),
        line.trim()
    );
    drop(s);
    std::thread::sleep(std::time::Duration::from_millis(200));
    ExitCode::SUCCESS
}

fn raw(dst: SocketAddr, hex: &str, hold_ms: u64) -> ExitCode {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("HEX"))
        .collect();
    let mut s = match connect(dst) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let sent = s.write_all(&bytes);
    std::thread::sleep(std::time::Duration::from_millis(hold_ms));
    let _ = s.shutdown(Shutdown::Write);
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let end = match s.read_to_end(&mut got) {
        Ok(_) => "eof".to_owned(),
        Err(e) => format!("{:?}", e.kind()),
    };
    println!(
        "local={} sent={} received={} end={end} text={:?}",
        s.local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string()),
        sent.is_ok(),
        got.len(),
        String::from_utf8_lossy(&got).replace(' ', "_")
    );
    ExitCode::SUCCESS
}

fn echo(dst: SocketAddr, n: u64, pace: std::time::Duration) -> ExitCode {
    let s = match connect(dst) {
        Ok(s) => s,
        Err(c) => return c,
    };
    println!(
        "local={} pid={}",
        s.local_addr().unwrap(),
        std::process::id()
    );
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        pattern_chunks(n, |c| {
            w.write_all(c)?;
            std::thread::sleep(pace);
            Ok::<(), std::io::Error>(())
        })?;
        w.shutdown(Shutdown::Write)
    });
    let mut r = s;
    let mut got = 0u64;
    let mut matched = true;
    let mut buf = vec![0u8; 64 * 1024];
    let read_err = loop {
        match r.read(&mut buf) {
            Ok(0) => break None,
            Ok(k) => {
                for (j, b) in buf[..k].iter().enumerate() {
                    matched &= *b == pattern(got + j as u64);
                }
                got += k as u64;
            }
            Err(e) => break Some(e),
        }
    };
    let write = writer.join().unwrap();
    println!("sent={n} received={got} match={}", matched && got == n);
    match (read_err, write) {
        (None, Ok(())) => ExitCode::SUCCESS,
        (e, w) => {
            let e = e.or(w.err()).unwrap();
            println!(
                "io_error kind={:?} errno={}",
                e.kind(),
                e.raw_os_error().unwrap_or(0)
            );
            ExitCode::from(4)
        }
    }
}

fn many(count: usize, dst: SocketAddr) -> ExitCode {
    for _ in 0..count {
        let s = match connect(dst) {
            Ok(s) => s,
            Err(c) => return c,
        };
        let mut line = String::new();
        let _ = BufReader::new(&s).read_line(&mut line);
        println!("peer={} reached={}", s.peer_addr().unwrap(), line.trim());
    }
    ExitCode::SUCCESS
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// One short connection: connect, one byte out, its echo back, close.
/// Connect, send `byte`, read its echo.
fn ping(dst: SocketAddr, byte: u8) -> std::io::Result<()> {
    let mut s = TcpStream::connect(dst)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(&[byte])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] != byte {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

fn load(secs: u64, rate: u64, dst: SocketAddr) -> ExitCode {
    use std::time::{Duration, Instant};
    const THREADS: u64 = 4;
    let start = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let every = Duration::from_nanos(1_000_000_000 * THREADS / rate);
                let (mut ok, mut failed) = (0u64, Vec::new());
                let mut next = start;
                while start.elapsed() < Duration::from_secs(secs) {
                    // A NUL cannot start HTTP or TLS: an undeclared port's sniff ends at once.
                    match ping(dst, 0) {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(format!("t={} error={:?}", unix_ms(), e.kind())),
                    }
                    next += every;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    report_pings(workers.into_iter().map(|w| w.join().unwrap()), start)
}

/// Sum the workers' (ok, failures) and print them: `failure ...` lines, then the counts.
fn report_pings(
    results: impl Iterator<Item = (u64, Vec<String>)>,
    start: std::time::Instant,
) -> ExitCode {
    let (mut ok, mut failed) = (0, Vec::new());
    for (o, f) in results {
        ok += o;
        failed.extend(f);
    }
    for f in &failed {
        println!("failure {f}");
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "attempts={} ok={ok} failed={} seconds={secs:.2}",
        ok + failed.len() as u64,
        failed.len()
    );
    ExitCode::SUCCESS
}

fn pings(count: u64, dst: SocketAddr) -> ExitCode {
    use std::{
        sync::atomic::{AtomicU64, Ordering},
        time::{Duration, Instant},
    };
    const THREADS: usize = 4;
    let start = Instant::now();
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    while next.fetch_add(1, Ordering::Relaxed) < count
                        && start.elapsed() < Duration::from_secs(60)
                    {
                        // A NUL cannot start HTTP or TLS: an undeclared port's sniff ends
                        // at once.
                        match ping(dst, 0) {
                            Ok(()) => ok += 1,
                            Err(e) => failed.push(format!("t={} error={:?}", unix_ms(), e.kind())),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        report_pings(workers.into_iter().map(|w| w.join().unwrap()), start)
    })
}

fn watch(secs: u64, interval_ms: u64, dsts: &[SocketAddr]) -> ExitCode {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        for d in dsts {
            let outcome = match TcpStream::connect(d) {
                Ok(_) => "allowed".to_owned(),
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => "denied".to_owned(),
                Err(e) => format!("error:{}", e.raw_os_error().unwrap_or(0)),
            };
            println!("watch t={} dst={d} outcome={outcome}", unix_ms());
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    ExitCode::SUCCESS
}

fn hold(count: usize, dsts: &[SocketAddr]) -> ExitCode {
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let dst = dsts[i % dsts.len()];
        match connect(dst) {
            Ok(s) => conns.push((dst, s)),
            Err(c) => return c,
        }
    }
    // Every connection is open now; each server announces the address it was reached at.
    let (mut ok, mut wrong) = (0, 0);
    for (dst, s) in &conns {
        let mut line = String::new();
        let mut r = BufReader::new(s);
        if r.read_line(&mut line).is_ok() && line.trim() == dst.to_string() {
            ok += 1;
        } else {
            wrong += 1;
            println!("mismatch dialled={dst} reached={:?}", line.trim());
        }
    }
    println!("open={} ok={ok} wrong={wrong}", conns.len());
    for (_, s) in &conns {
        let _ = s.shutdown(Shutdown::Both);
    }
    if wrong == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(5)
    }
}

fn origdst_server(count: usize, addrs: &[SocketAddr]) -> ExitCode {
    let listeners: Vec<TcpListener> = addrs
        .iter()
        .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("binding {a}: {e}")))
        .collect();
    for l in &listeners {
        l.set_nonblocking(true).unwrap();
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut served = 0;
    while served < count {
        let mut idle = true;
        for l in &listeners {
            match l.accept() {
                Ok((mut s, peer)) => {
                    idle = false;
                    served += 1;
                    s.set_nonblocking(false).unwrap();
                    let answer = match original_dst(&s, peer.is_ipv4()) {
                        Ok(a) => a.to_string(),
                        Err(e) => format!("error:{}", e.raw_os_error().unwrap_or(0)),
                    };
                    println!("origdst peer={peer} orig={answer}");
                    std::io::stdout().flush().unwrap();
                    let _ = s.write_all(format!("{answer}\n").as_bytes());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if idle {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    ExitCode::SUCCESS
}

/// getsockopt(SOL_IP, SO_ORIGINAL_DST) or getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), exactly as
/// a transparent proxy asks it.
fn original_dst(s: &TcpStream, v4: bool) -> std::io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = if v4 {
        std::mem::size_of::<libc::sockaddr_in>()
    } else {
        std::mem::size_of::<libc::sockaddr_in6>()
    } as libc::socklen_t;
    let level = if v4 { libc::SOL_IP } else { libc::SOL_IPV6 };
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match ss.ss_family as i32 {
        libc::AF_INET => {
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Ok(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        f => Err(std::io::Error::other(format!("family {f}"))),
    }
}
