//! Health for kubelet probes (`--health-port`, default 15021, every address, as Istio's):
//! `GET /healthz/ready` answers 200 only once the agent serves (maps programmed, listeners up,
//! every enrolled workload replayed), else 503 naming what is pending; `GET /healthz/live`
//! answers 200 while the control thread, which owns the maps, keeps answering.
//!
//! It is served from a thread of its own, bound before anything else is done, so that a probe
//! during start-up gets a 503 with the reason instead of a refused connection.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use crate::datapath::reload::Status;

/// How long the control thread may go without handling a message before the agent is not
/// live: it gets one every 5 s (the sweep) and a reload of 100,000 CIDRs takes well under one.
const CONTROL_SILENCE: Duration = Duration::from_secs(30);

pub struct Health {
    /// What the agent is still doing before it serves; `None` once it does.
    pending: Mutex<Option<String>>,
    /// The control thread's status, once it runs: when it last handled a message.
    control: OnceLock<Arc<Mutex<Status>>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            pending: Mutex::new(Some("starting".to_owned())),
            control: OnceLock::new(),
        })
    }

    /// What start-up is doing now.
    pub fn pending(&self, what: impl Into<String>) {
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = Some(what.into());
    }

    pub fn ready(&self) {
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub fn control(&self, status: Arc<Mutex<Status>>) {
        let _ = self.control.set(status);
    }

    /// (status code, body) for a path.
    fn answer(&self, path: &str) -> (u16, String) {
        match path {
            "/healthz/ready" => match &*self.pending.lock().unwrap_or_else(PoisonError::into_inner)
            {
                None => (200, "ready\n".to_owned()),
                Some(what) => (503, format!("not ready: {what}\n")),
            },
            "/healthz/live" => {
                let last = self.control.get().map(|s| {
                    s.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .handled
                        .elapsed()
                });
                match last {
                    Some(quiet) if quiet > CONTROL_SILENCE => (
                        503,
                        format!(
                            "the control thread has handled nothing for {}s\n",
                            quiet.as_secs()
                        ),
                    ),
                    _ => (200, "live\n".to_owned()),
                }
            }
            _ => (404, "/healthz/ready or /healthz/live\n".to_owned()),
        }
    }
}

/// Serve probes on `listener` from a thread of its own, for as long as the agent runs.
pub fn serve(listener: TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            for sock in listener.incoming().flatten() {
                let _ = probe(sock, &health);
            }
        })?;
    Ok(())
}

/// One probe: a GET, answered and closed. Anything else gets 405; a client that sends
/// nothing for a second is dropped, so that one cannot hold the thread.
fn probe(mut sock: TcpStream, health: &Health) -> std::io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    let started = Instant::now();
    let path = loop {
        let n = sock.read(&mut buf[len..])?;
        if n == 0 || started.elapsed() > Duration::from_secs(1) {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) if req.method == Some("GET") => {
                break req.path.unwrap_or("").to_owned();
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut sock, 405, "GET /healthz/ready or /healthz/live\n"),
        }
    };
    let (code, body) = health.answer(&path);
    respond(&mut sock, code, &body)
}

fn respond(sock: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let out = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(out.as_bytes())
}
