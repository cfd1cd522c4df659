//! Stand-ins for external HTTP and HTTPS services, a test certificate authority, and curl run
//! inside an intercepted cgroup.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::{Cgroup, egress_bin, unique};

/// A certificate authority made for one test, with its certificate in a PEM file.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub pem_path: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("egress test CA {name}"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let pem_path = std::env::temp_dir().join(format!("{}.pem", unique(name)));
        std::fs::write(&pem_path, issuer.pem()).unwrap();
        TestCa { issuer, pem_path }
    }

    /// A TLS server configuration with a certificate for `names`, signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
        Arc::new(config)
    }

    pub fn path(&self) -> &Path {
        &self.pem_path
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pem_path);
    }
}

/// One request a stand-in answered.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The address the stand-in was reached at, and the connecting socket.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Over TLS, with this server name.
    pub tls: bool,
    pub sni: Option<String>,
    pub method: String,
    pub path: String,
    pub host: String,
}

/// HTTP/1.1 stand-ins, in clear or TLS, that answer like httpbin:
/// - `/delay/N`: 200 after N seconds;
/// - `/status/N`: status N;
/// - any path containing `/flaky/`: 503 the first time that path is asked for, then 200;
/// - `/headers`: 200 with the request headers as `name: value` lines;
/// - anything else: 200 with `hello from ADDR`.
///
/// Each answers one request per connection (`connection: close`), except the keep-alive
/// ones (`http_kept`), which answer every request of a connection and know one more path:
/// - `/drop-next`: 200, and the next request on this connection is read, then the connection
///   closed unanswered (an upstream closing an idle connection just as a request arrives).
pub struct StandIns {
    rt: tokio::runtime::Runtime,
    hits: Arc<Mutex<Vec<Hit>>>,
    flaky: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl Default for StandIns {
    fn default() -> Self {
        Self::new()
    }
}

impl StandIns {
    pub fn new() -> StandIns {
        StandIns {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            hits: Arc::default(),
            flaky: Arc::default(),
        }
    }

    /// Plain HTTP on `addr`.
    pub fn http(&self, addr: SocketAddr) -> SocketAddr {
        self.listen(addr, None, false)
    }

    /// Plain HTTP on `addr`, keeping connections open between requests.
    pub fn http_kept(&self, addr: SocketAddr) -> SocketAddr {
        self.listen(addr, None, true)
    }

    /// HTTPS (TLS only) on `addr`.
    pub fn https(&self, addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> SocketAddr {
        self.listen(addr, Some(tls), false)
    }

    /// Plain HTTP on a listener bound elsewhere (in another network namespace).
    pub fn http_on(&self, l: std::net::TcpListener) -> SocketAddr {
        self.serve(l, None, false)
    }

    /// HTTPS on a listener bound elsewhere.
    pub fn https_on(&self, l: std::net::TcpListener, tls: Arc<rustls::ServerConfig>) -> SocketAddr {
        self.serve(l, Some(tls), false)
    }

    fn listen(
        &self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        keep: bool,
    ) -> SocketAddr {
        self.serve(crate::bind(addr), tls, keep)
    }

    fn serve(
        &self,
        l: std::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        keep: bool,
    ) -> SocketAddr {
        l.set_nonblocking(true).unwrap();
        let bound = l.local_addr().unwrap();
        let hits = self.hits.clone();
        let flaky = self.flaky.clone();
        self.rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                let (hits, flaky, tls) = (hits.clone(), flaky.clone(), tls.clone());
                tokio::spawn(async move {
                    let local = s.local_addr().unwrap();
                    let hit = Hit {
                        local,
                        peer,
                        tls: tls.is_some(),
                        sni: None,
                        method: String::new(),
                        path: String::new(),
                        host: String::new(),
                    };
                    match tls {
                        Some(cfg) => {
                            let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                                return;
                            };
                            let sni = s.get_ref().1.server_name().map(str::to_owned);
                            answer(s, Hit { sni, ..hit }, hits, flaky, keep).await
                        }
                        None => answer(s, hit, hits, flaky, keep).await,
                    }
                });
            }
        });
        bound
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Requests whose path is `path`.
    pub fn hits_for(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }
}

/// Read a request head (its body, if it has a length, is skipped) and answer it; close, or
/// with `keep` go on with the next request of the connection.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    hit: Hit,
    hits: Arc<Mutex<Vec<Hit>>>,
    flaky: Arc<Mutex<BTreeMap<String, u32>>>,
    keep: bool,
) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    let mut drop_next = false;
    while let Some(head) = crate::read_head(&mut s, &mut pending).await {
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let mut hit = hit.clone();
        hit.method = first.next().unwrap_or("").to_owned();
        hit.path = first.next().unwrap_or("").to_owned();
        let headers: Vec<(String, String)> = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        hit.host = header("host").unwrap_or_default();
        let mut body_left: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body_left > 0 {
            if pending.is_empty() {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            let k = body_left.min(pending.len());
            pending.drain(..k);
            body_left -= k;
        }
        let path = hit.path.clone();
        let local = hit.local;
        hits.lock().unwrap().push(hit.clone());
        if drop_next {
            return;
        }
        drop_next = keep && path == "/drop-next";
        let (status, body) = if let Some(n) = path.strip_prefix("/delay/") {
            let secs: u64 = n.parse().unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(secs)).await;
            (200, format!("delayed {secs}s\n"))
        } else if let Some(n) = path.strip_prefix("/status/") {
            (n.parse().unwrap_or(500), format!("status {n}\n"))
        } else if path.contains("/flaky/") {
            let mut f = flaky.lock().unwrap();
            let seen = f.entry(path.clone()).or_insert(0);
            *seen += 1;
            if *seen == 1 {
                (503, "first attempt fails\n".to_owned())
            } else {
                (200, format!("attempt {seen} succeeds\n"))
            }
        } else if path == "/headers" {
            let lines: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            (200, lines.join("\n") + "\n")
        } else {
            (200, format!("hello from {local}\n"))
        };
        let close = if keep { "" } else { "connection: close\r\n" };
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{close}\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).await.is_err() || !keep {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// What curl did.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code (0: a response; 35: TLS handshake failed; 56: receive failed ...).
    pub code: Option<i32>,
    /// The HTTP status of the last response (0 without one).
    pub status: u16,
    pub body: String,
    pub stderr: String,
    /// Wall time of the whole call.
    pub elapsed: Duration,
}

/// Run `curl ARGS` inside `cgroup` (through `egress exec`), silent, at most 30 s.
pub fn curl(cgroup: &Cgroup, args: &[&str]) -> Curl {
    let mut c = Command::new(egress_bin());
    c.arg("exec")
        .arg("--cgroup")
        .arg(&cgroup.path)
        .args(["--", "curl"]);
    curl_with(c, args)
}

/// Run curl (`c`, a command that runs it somewhere: a cgroup, a pod) with `ARGS`, silent, at
/// most 30 s.
pub fn curl_with(mut c: Command, args: &[&str]) -> Curl {
    let start = Instant::now();
    let o = c
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("running curl");
    let elapsed = start.elapsed();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    Curl {
        code: o.status.code(),
        status: status.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        elapsed,
    }
}
