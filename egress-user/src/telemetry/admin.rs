//! The admin endpoint on 127.0.0.1 (`--admin-port`, default 15000):
//! `GET /status` (generation, summary, last rejected configuration) and `POST /reload`.
//! `egress status` and `egress reload` are its clients.

use std::{
    io::{Read as _, Write as _},
    sync::{Arc, Mutex, mpsc::Sender},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use log::warn;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::datapath::reload::{Msg, Status};

const MAX_HEAD: usize = 8 * 1024;

pub async fn serve(listener: TcpListener, tx: Sender<Msg>, status: Arc<Mutex<Status>>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (tx, status) = (tx.clone(), status.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(sock, tx, status).await {
                warn!("admin request: {e:#}");
            }
        });
    }
}

async fn handle(mut sock: TcpStream, tx: Sender<Msg>, status: Arc<Mutex<Status>>) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let (method, path) = loop {
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
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_owned(),
                    req.path.unwrap_or("").to_owned(),
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                respond(&mut sock, 431, "request head too large\n").await?;
                return Ok(());
            }
            Err(e) => {
                respond(&mut sock, 400, &format!("bad request: {e}\n")).await?;
                return Ok(());
            }
        }
    };
    match (method.as_str(), path.as_str()) {
        ("GET", "/status") => {
            let body = status.lock().map(|s| s.render()).unwrap_or_default();
            respond(&mut sock, 200, &body).await
        }
        ("POST", "/reload") => {
            let (reply, rx) = tokio::sync::oneshot::channel();
            tx.send(Msg::Reload {
                why: "admin request",
                reply: Some(reply),
            })
            .context("the reloader has stopped")?;
            match rx.await.context("the reloader has stopped")? {
                Ok(line) => respond(&mut sock, 200, &format!("{line}\n")).await,
                Err(errors) => respond(&mut sock, 422, &format!("{errors}\n")).await,
            }
        }
        (_, "/status" | "/reload") => respond(&mut sock, 405, "method not allowed\n").await,
        _ => respond(&mut sock, 404, "not found: GET /status, POST /reload\n").await,
    }
}

async fn respond(sock: &mut TcpStream, code: u16, body: &str) -> Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
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

/// Send one request to a running agent's admin endpoint; the body on success.
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
