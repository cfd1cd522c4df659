//! The admin endpoints.
//!
//! - TCP on 127.0.0.1 (`--admin-port`, default 15000): `GET /status` (generation, summary,
//!   last rejected configuration), `POST /reload`, `GET /workloads`, `GET /config_dump` (the
//!   configuration in force by resource, the workloads, the maps' fill, as JSON). `egress status` and
//!   `egress reload` are its clients.
//! - A Unix socket reachable by root only (`--admin-socket`): the same, and enrolment
//!   (`POST /workloads/enroll`, `/workloads/unenroll`, `/workloads/check`, see
//!   `workloads::api`), since whoever enrols or releases a namespace decides whether its
//!   connections are mediated. `egress enroll`, `egress unenroll`, `egress workloads` and
//!   `egress-cni` are its clients.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex, mpsc::Sender},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use log::{info, warn};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, UnixListener},
};

use crate::datapath::reload::{Msg, Status};

const MAX_HEAD: usize = 8 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// What an endpoint may do: the TCP one cannot change enrolments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Tcp,
    Unix,
}

/// Where admin requests arrive.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

pub async fn serve(listener: Listener, tx: Sender<Msg>, status: Arc<Mutex<Status>>) {
    loop {
        let (tx, status) = (tx.clone(), status.clone());
        let served = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(sock, _)| {
                tokio::spawn(async move { handle(sock, Access::Tcp, tx, status).await })
            }),
            Listener::Unix(l) => l.accept().await.map(|(sock, _)| {
                tokio::spawn(async move { handle(sock, Access::Unix, tx, status).await })
            }),
        };
        match served {
            Ok(request) => {
                tokio::spawn(async move {
                    if let Ok(Err(e)) = request.await {
                        warn!("admin request: {e:#}");
                    }
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Listen on the Unix socket at `path`, mode 0600 in a directory of mode 0700. A socket left
/// by an agent that is gone is replaced; one an agent answers on is not, unless `replace` (that
/// agent handed its workloads over to this one).
pub fn bind_unix(path: &Path, replace: bool) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    if path.exists() {
        if !replace && std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{}: another agent answers there (pass another --admin-socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    info!("admin socket {}", path.display());
    Ok(l)
}

/// The status of a refused enrolment: 503 while handing over (try again), else 422.
fn refused(e: &str) -> u16 {
    if e == crate::datapath::reload::HANDING_OVER {
        503
    } else {
        422
    }
}

/// A request head and body, read within a few seconds.
pub(crate) async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
) -> Result<Option<(String, String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let (method, path, head_len, body_len) = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .context("request head timed out")??;
        if n == 0 {
            bail!("connection closed before a complete request head");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let body_len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0usize);
                break (
                    req.method.unwrap_or("").to_owned(),
                    req.path.unwrap_or("").to_owned(),
                    len,
                    body_len,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                respond(sock, 431, "request head too large\n").await?;
                return Ok(None);
            }
            Err(e) => {
                respond(sock, 400, &format!("bad request: {e}\n")).await?;
                return Ok(None);
            }
        }
    };
    if body_len > MAX_BODY {
        respond(sock, 413, "request body too large\n").await?;
        return Ok(None);
    }
    let mut body = buf.split_off(head_len.min(buf.len()));
    while body.len() < body_len {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .context("request body timed out")??;
        if n == 0 {
            bail!("connection closed before the whole request body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(body_len);
    Ok(Some((method, path, body)))
}

/// Send a message to the control thread and wait for its answer.
async fn ask<T>(
    tx: &Sender<Msg>,
    msg: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Msg,
) -> Result<T> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    tx.send(msg(reply))
        .context("the control thread has stopped")?;
    rx.await.context("the control thread has stopped")
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("request body: {e}\n"))
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    access: Access,
    tx: Sender<Msg>,
    status: Arc<Mutex<Status>>,
) -> Result<()> {
    let Some((method, path, body)) = read_request(&mut sock).await? else {
        return Ok(());
    };
    let s = &mut sock;
    match (method.as_str(), path.as_str()) {
        ("GET", "/status") => {
            let body = status.lock().map(|s| s.render()).unwrap_or_default();
            respond(s, 200, &body).await
        }
        ("POST", "/reload") => {
            let out = ask(&tx, |reply| Msg::Reload {
                why: "admin request",
                reply: Some(reply),
            })
            .await?;
            match out {
                Ok(line) => respond(s, 200, &format!("{line}\n")).await,
                Err(errors) => respond(s, 422, &format!("{errors}\n")).await,
            }
        }
        ("GET", "/workloads") => respond(s, 200, &ask(&tx, Msg::List).await?).await,
        ("GET", "/config_dump") => {
            let dump = ask(&tx, Msg::Dump).await?;
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default() + "\n";
            respond(s, 200, &body).await
        }
        ("GET", p) if p.starts_with("/workloads/lookup/") => {
            let label = &p["/workloads/lookup/".len()..];
            match ask(&tx, |r| Msg::Lookup(label.to_owned(), r)).await? {
                Some((cookie, slot)) => respond(s, 200, &format!("{cookie} {slot}\n")).await,
                None => respond(s, 404, &format!("{label} is not enrolled\n")).await,
            }
        }
        ("POST", "/workloads/enroll" | "/workloads/unenroll" | "/workloads/check")
            if access == Access::Tcp =>
        {
            respond(
                s,
                403,
                "enrolment is served on the admin socket only (--admin-socket)\n",
            )
            .await
        }
        ("POST", "/workloads/enroll") => match json(&body) {
            Ok(req) => match ask(&tx, |r| Msg::Enroll(req, r)).await? {
                Ok(line) => respond(s, 200, &format!("{line}\n")).await,
                Err(e) => respond(s, refused(&e), &format!("{e}\n")).await,
            },
            Err(e) => respond(s, 400, &e).await,
        },
        ("POST", "/workloads/unenroll") => match json(&body) {
            Ok(sel) => match ask(&tx, |r| Msg::Unenroll(sel, r)).await? {
                Ok(line) => respond(s, 200, &format!("{line}\n")).await,
                Err(e) => respond(s, refused(&e), &format!("{e}\n")).await,
            },
            Err(e) => respond(s, 400, &e).await,
        },
        ("POST", "/workloads/check") => match json(&body) {
            Ok(sel) => {
                if ask(&tx, |r| Msg::Check(sel, r)).await? {
                    respond(s, 200, "enrolled\n").await
                } else {
                    respond(s, 404, "not enrolled\n").await
                }
            }
            Err(e) => respond(s, 400, &e).await,
        },
        (_, "/status" | "/reload" | "/workloads") => respond(s, 405, "method not allowed\n").await,
        _ => {
            respond(
                s,
                404,
                "not found: GET /status, POST /reload, GET /workloads, GET /config_dump, \
                 POST /workloads/enroll, POST /workloads/unenroll, POST /workloads/check\n",
            )
            .await
        }
    }
}

pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    sock: &mut S,
    code: u16,
    body: &str,
) -> Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        422 => "Unprocessable Entity",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await?;
    Ok(())
}

/// Send one request to a running agent's TCP admin endpoint; the body on success.
pub fn request(port: u16, method: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).with_context(|| {
        format!(
            "connecting to the agent's admin endpoint 127.0.0.1:{port} (is `egress run` running?)"
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("malformed response")?;
    let code = head.split(' ').nth(1).unwrap_or("");
    if code != "200" {
        bail!("{}", body.trim_end());
    }
    Ok(body.to_owned())
}
