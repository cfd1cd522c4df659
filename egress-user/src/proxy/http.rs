//! HTTP/1.1 mediation of a redirected connection on a port a ServiceEntry declares HTTP: every
//! request of the keep-alive connection is matched by Host, routed (VirtualService timeout,
//! retries, destination), sent upstream (in TLS when a DestinationRule originates it) and
//! logged. Under REGISTRY_ONLY an unregistered Host gets a 502 that says why.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    config::Mode,
    proxy::{
        OutBody, Proxy,
        upstream::{self, Upstream},
    },
    registry::{self, Origination, Route, Target},
    sniff,
    telemetry::accesslog::{self, Conn, Record},
};

/// Request bodies up to this size are kept so that the request can be retried; larger or
/// chunked ones stream through, and the request is tried once.
const RETRY_BUFFER: u64 = 1 << 20;
/// Pause before a retry (Envoy's base retry interval).
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Serve one client connection until it closes; then log the connection.
pub async fn serve(px: Arc<Proxy>, conn: Conn, client: TcpStream) {
    let counts = Arc::new(Counts::default());
    let io = TokioIo::new(Counted {
        inner: client,
        counts: counts.clone(),
    });
    let state = Arc::new(State {
        px: px.clone(),
        conn,
    });
    let svc_state = state.clone();
    let svc = hyper::service::service_fn(move |req| {
        let st = svc_state.clone();
        async move { Ok::<_, Infallible>(st.request(req).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(px.header_timeout)
        .serve_connection(io, svc)
        .await;
    let mut rec = state.conn.record("connection", "http");
    rec.verdict = "allow";
    rec.policy = "per-request";
    rec.bytes_up = counts.read.load(Ordering::Relaxed);
    rec.bytes_down = counts.written.load(Ordering::Relaxed);
    rec.duration_ms = state.conn.start.elapsed().as_millis() as u64;
    match result {
        Ok(()) => rec.result = "ok",
        Err(e) => {
            rec.result = "error";
            rec.error = Some(e.to_string());
        }
    }
    px.log.write(&rec);
}

struct State {
    px: Arc<Proxy>,
    conn: Conn,
}

/// Why an attempt produced no response.
enum Failure {
    Connect(String),
    /// The upstream reset or closed before its response head.
    Reset(String),
    PerTryTimeout(Duration),
}

impl Failure {
    fn text(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Reset(e) => format!("upstream reset before the response: {e}"),
            Failure::PerTryTimeout(d) => format!("no response within perTryTimeout {d:?}"),
        }
    }
}

impl State {
    async fn request(&self, req: Request<Incoming>) -> Response<OutBody> {
        let started = Instant::now();
        let dst = self.conn.dst;
        let mut rec = self.conn.record("request", "http");
        rec.time = SystemTime::now();
        rec.method = Some(req.method().to_string());
        rec.path = Some(
            req.uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
        );
        let host = request_host(&req);
        rec.host = host.clone();
        let host = host.unwrap_or_else(|| dst.ip().to_string());
        let reg = registry::load(&self.px.registry);
        let reg = reg.view(&self.conn.workload.namespace);
        let registered = reg
            .by_host(&host, dst.port())
            .or_else(|| reg.by_address(dst));
        rec.matched = registered.map(|m| m.entry.id.clone());
        rec.service = registered.map(|m| m.entry.service(Some(&host)).to_owned());
        if registered.is_none() && reg.mode == Mode::RegistryOnly {
            rec.verdict = "deny";
            rec.policy = "not-registered";
            rec.result = "denied";
            let why = format!(
                "egress: host {host:?} is not registered: no ServiceEntry declares it on port {} \
                 and the outbound traffic policy is REGISTRY_ONLY\n",
                dst.port()
            );
            rec.error = Some(why.trim_end().to_owned());
            return self.local_reply(rec, StatusCode::BAD_GATEWAY, why, started);
        }
        rec.verdict = "allow";
        rec.policy = if registered.is_some() {
            "registered"
        } else {
            "allow-any"
        };
        let route = reg.route(
            &host,
            req.method().as_str(),
            rec.path.as_deref().unwrap_or("/"),
        );
        rec.route = route.id.clone();
        // A route to another host goes where that host's entry says.
        let (up_host, up_match) = match &route.destination {
            Some((h, port)) => (h.clone(), reg.by_name(h, port.unwrap_or(dst.port()))),
            None => (host.clone(), registered),
        };
        let target = match up_match {
            Some(m) => m.entry.target(m.port, Some(&up_host), dst),
            None => Some(Target::Addr(dst)),
        };
        let Some(target) = target else {
            rec.result = "error";
            rec.error = Some("the ServiceEntry has no endpoints".into());
            return self.local_reply(
                rec,
                StatusCode::SERVICE_UNAVAILABLE,
                "egress: no healthy upstream: the ServiceEntry has no endpoints\n".into(),
                started,
            );
        };
        let tls = up_match.and_then(|m| reg.origination(&up_host, m.port.number).cloned());
        rec.tls_origination = tls.as_ref().map(|t| t.id.clone());
        let (parts, body) = req.into_parts();
        let small = body.size_hint().exact().is_some_and(|n| n <= RETRY_BUFFER);
        let (buffered, mut streamed) = if small {
            match body.collect().await {
                Ok(b) => (Some(b.to_bytes()), None),
                Err(e) => {
                    rec.result = "error";
                    rec.error = Some(format!("reading the request body: {e}"));
                    return self.local_reply(
                        rec,
                        StatusCode::BAD_REQUEST,
                        "egress: could not read the request body\n".into(),
                        started,
                    );
                }
            }
        } else {
            (None, Some(body))
        };
        let up_bytes = Arc::new(AtomicU64::new(0));
        let max_attempts = 1 + if buffered.is_some() {
            route.retry.attempts
        } else {
            0
        };
        let attempts = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let body: OutBody = match (&buffered, streamed.take()) {
                    (Some(b), _) => {
                        up_bytes.store(b.len() as u64, Ordering::Relaxed);
                        full(b.clone())
                    }
                    (None, Some(s)) => CountedBody {
                        inner: s,
                        count: up_bytes.clone(),
                    }
                    .boxed(),
                    (None, None) => unreachable!("a streamed body is sent once"),
                };
                let upstream_req = upstream_request(&parts, &up_host, body);
                let replay = || {
                    let b = buffered.as_ref()?;
                    Some(upstream_request(&parts, &up_host, full(b.clone())))
                };
                let outcome = self
                    .attempt(
                        upstream_req,
                        &replay,
                        &target,
                        &up_host,
                        tls.as_ref(),
                        &route,
                    )
                    .await;
                let again = attempt < max_attempts;
                match outcome {
                    Ok((resp, addrs)) => {
                        if again && route.retry.retries_status(resp.status().as_u16()) {
                            tokio::time::sleep(RETRY_BACKOFF).await;
                            continue;
                        }
                        return (attempt, Ok((resp, addrs)));
                    }
                    Err(f) => {
                        let retry = match &f {
                            Failure::Connect(_) => route.retry.on_connect_failure,
                            Failure::Reset(_) => route.retry.on_reset,
                            Failure::PerTryTimeout(_) => route.retry.retries_status(504),
                        };
                        if again && retry {
                            tokio::time::sleep(RETRY_BACKOFF).await;
                            continue;
                        }
                        return (attempt, Err(f));
                    }
                }
            }
        };
        let outcome = match route.timeout {
            Some(t) => tokio::time::timeout(t, attempts).await.ok(),
            None => Some(attempts.await),
        };
        rec.upstream_ms = Some(started.elapsed().as_millis() as u64);
        let (attempts, outcome) = match outcome {
            Some(o) => o,
            None => {
                rec.result = "timeout";
                rec.error = Some(format!(
                    "no response within the route timeout {:?}",
                    route.timeout.unwrap_or_default()
                ));
                rec.bytes_up = up_bytes.load(Ordering::Relaxed);
                // Envoy's words, so that clients and dashboards recognise them.
                return self.local_reply(
                    rec,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout".into(),
                    started,
                );
            }
        };
        rec.attempts = Some(attempts);
        match outcome {
            Ok((resp, (remote, local))) => {
                rec.upstream = Some(remote);
                rec.upstream_local = Some(local);
                rec.status = Some(resp.status().as_u16());
                rec.result = "ok";
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let logged = Logged {
                    inner: CountedBody {
                        inner: body,
                        count: Arc::default(),
                    },
                    up: up_bytes,
                    started,
                    log: self.px.log.clone(),
                    rec: Some(rec),
                };
                Response::from_parts(parts, logged.boxed())
            }
            Err(f) => {
                rec.bytes_up = up_bytes.load(Ordering::Relaxed);
                rec.result = match f {
                    Failure::Connect(_) => "connect-failed",
                    Failure::Reset(_) => "reset",
                    Failure::PerTryTimeout(_) => "timeout",
                };
                let (status, text) = match f {
                    Failure::PerTryTimeout(_) => (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout".into(),
                    ),
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("egress: upstream {}: {}\n", target_text(&target), f.text()),
                    ),
                };
                rec.error = Some(f.text());
                self.local_reply(rec, status, text, started)
            }
        }
    }

    /// One try: on an idle connection to the same upstream if the pool has one, else on a new
    /// one (connect, TLS); send; wait for the response head.
    async fn attempt(
        &self,
        req: Request<OutBody>,
        replay: &(dyn Fn() -> Option<Request<OutBody>> + Sync),
        target: &Target,
        host: &str,
        tls: Option<&Origination>,
        route: &Route,
    ) -> Result<(Response<Incoming>, (SocketAddr, SocketAddr)), Failure> {
        let per_try = route.retry.per_try_timeout;
        let tls = tls.map(|o| (o, o.sni.as_deref().unwrap_or(host).to_owned()));
        let key = upstream::Key::new(
            self.conn.workload.cookie,
            target,
            tls.as_ref().map(|(o, sni)| (o.config.clone(), sni.clone())),
        );
        let pool = &self.px.upstreams;
        let work = async {
            let mut req = req;
            if let Some(mut up) = pool.take(&key) {
                // The upstream may have closed its idle connection just now. A request the
                // connection never carried goes on a new one; so does an idempotent request
                // that got no answer (RFC 9110 §9.2.2), if its body was kept.
                let idempotent = is_idempotent(req.method());
                match up.sender.try_send_request(req).await {
                    Ok(resp) => {
                        let addrs = up.addrs;
                        pool.give(key, up);
                        return Ok((resp, addrs));
                    }
                    Err(mut e) => {
                        req = match e
                            .take_message()
                            .or_else(|| idempotent.then(replay).flatten())
                        {
                            Some(r) => r,
                            None => return Err(Failure::Reset(e.into_error().to_string())),
                        };
                    }
                }
            }
            let tcp = self
                .px
                .connect_target(&self.conn, target)
                .await
                .map_err(|e| Failure::Connect(e.to_string()))?;
            let addrs = (
                tcp.peer_addr()
                    .map_err(|e| Failure::Connect(e.to_string()))?,
                tcp.local_addr()
                    .map_err(|e| Failure::Connect(e.to_string()))?,
            );
            let sender = match &tls {
                Some((o, sni)) => {
                    let name = rustls_pki_types::ServerName::try_from(sni.clone())
                        .map_err(|e| Failure::Connect(format!("TLS server name {sni:?}: {e}")))?;
                    let stream = tokio_rustls::TlsConnector::from(o.config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| Failure::Connect(format!("TLS to {}: {e}", addrs.0)))?;
                    handshake(stream).await?
                }
                None => handshake(tcp).await?,
            };
            let mut up = Upstream { sender, addrs };
            let resp = up
                .sender
                .send_request(req)
                .await
                .map_err(|e| Failure::Reset(e.to_string()))?;
            pool.give(key, up);
            Ok((resp, addrs))
        };
        match per_try {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .unwrap_or(Err(Failure::PerTryTimeout(t))),
            None => work.await,
        }
    }

    /// An answer of the agent's own, logged at once.
    fn local_reply(
        &self,
        mut rec: Box<Record>,
        status: StatusCode,
        text: String,
        started: Instant,
    ) -> Response<OutBody> {
        rec.status = Some(status.as_u16());
        rec.bytes_down = text.len() as u64;
        rec.duration_ms = started.elapsed().as_millis() as u64;
        self.px.log.write(&rec);
        let mut resp = Response::new(full(Bytes::from(text)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Addr(a) => a.to_string(),
        Target::Name(n, p) => format!("{n}:{p}"),
    }
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own until it closes.
async fn handshake<S>(io: S) -> Result<SendRequest<OutBody>, Failure>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Reset(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Methods a client may repeat after a connection failure without changing the outcome
/// (RFC 9110 §9.2.2).
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A body held in memory.
fn full(b: Bytes) -> OutBody {
    Full::new(b).map_err(|e| match e {}).boxed()
}

/// The request's host: the authority of an absolute-form target, else the Host header.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return sniff::authority_host(a.as_str().as_bytes());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| sniff::authority_host(h.as_bytes()))
}

/// The request to send upstream: origin-form target, the client's headers without the
/// hop-by-hop ones, a Host header.
fn upstream_request(parts: &http::request::Parts, host: &str, body: OutBody) -> Request<OutBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts
        .uri
        .path_and_query()
        .and_then(|p| Uri::try_from(p.as_str()).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    if !headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        headers.insert(header::HOST, v);
    }
    *req.headers_mut() = headers;
    req
}

/// Remove the headers that concern one connection only (RFC 9110 §7.6.1).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in listed {
        h.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
}

/// Wire bytes of the client connection.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
}

struct Counted {
    inner: TcpStream,
    counts: Arc<Counts>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counts.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A streamed request body, counted on its way upstream.
struct CountedBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body on its way to the client; the request's access-log line is
/// written when it ends (or the client goes away).
struct Logged {
    inner: CountedBody,
    up: Arc<AtomicU64>,
    started: Instant,
    log: accesslog::Log,
    rec: Option<Box<Record>>,
}

impl Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                if let Some(rec) = self.rec.as_mut() {
                    rec.result = "error";
                    rec.error = Some(format!("response body: {e}"));
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Logged {
    fn finish(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.bytes_down = self.inner.count.load(Ordering::Relaxed);
            rec.bytes_up = self.up.load(Ordering::Relaxed);
            rec.duration_ms = self.started.elapsed().as_millis() as u64;
            self.log.write(&rec);
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(rec) = self.rec.as_mut()
            && rec.result == "ok"
            && !self.inner.is_end_stream()
        {
            rec.result = "error";
            rec.error = Some("client went away before the end of the response".into());
        }
        self.finish();
    }
}
