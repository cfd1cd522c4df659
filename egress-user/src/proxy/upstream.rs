//! Upstream HTTP/1.1 connections kept open after their response, for the next request to the
//! same place: a workload's short connections then cost one connection each (to the agent),
//! not two, and a TLS-originated request does not pay a handshake every time.
//!
//! A connection goes back to the pool only when hyper says it can carry another request (the
//! response was read to its end, neither side asked to close), and leaves it when it has been
//! idle for the pool's idle timeout, or when the upstream closes it.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::http1::SendRequest;

use crate::{proxy::OutBody, registry::Target};

/// Idle connections kept per upstream at most; more are closed when their response is done.
const MAX_IDLE_PER_UPSTREAM: usize = 128;

/// Where a connection leads: requests may share it only if they would have opened the same,
/// from the same network namespace (a workload's upstream connections carry its address).
#[derive(Clone)]
pub struct Key {
    netns: u64,
    target: Target,
    /// TLS origination: the client configuration (by identity: a reload builds a new one)
    /// and the server name sent.
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

impl Key {
    pub fn new(
        netns: u64,
        target: &Target,
        tls: Option<(Arc<rustls::ClientConfig>, String)>,
    ) -> Key {
        Key {
            netns,
            target: target.clone(),
            tls,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.netns == other.netns
            && self.target == other.target
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some((a, s)), Some((b, t))) => Arc::ptr_eq(a, b) && s == t,
                _ => false,
            }
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.netns.hash(h);
        self.target.hash(h);
        if let Some((config, sni)) = &self.tls {
            Arc::as_ptr(config).hash(h);
            sni.hash(h);
        }
    }
}

/// An open upstream connection: the handle to send on and its (remote, local) addresses.
pub struct Upstream {
    pub sender: SendRequest<OutBody>,
    pub addrs: (SocketAddr, SocketAddr),
}

struct Idle {
    up: Upstream,
    since: Instant,
}

pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// Zero: no connection is kept.
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::default(),
            idle_timeout,
        }
    }

    /// The most recently used idle connection to `key` that is still open.
    pub fn take(&self, key: &Key) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        let mut found = None;
        while let Some(i) = list.pop() {
            if self.usable(&i) {
                found = Some(i.up);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Keep `up` for the next request to `key` once its current response is done, unless the
    /// response or the upstream ends the connection.
    pub fn give(self: &Arc<Self>, key: Key, mut up: Upstream) {
        if self.idle_timeout.is_zero() {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if up.sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(key).or_default();
            if list.len() < MAX_IDLE_PER_UPSTREAM {
                list.push(Idle {
                    up,
                    since: Instant::now(),
                });
            }
        });
    }

    fn usable(&self, i: &Idle) -> bool {
        i.since.elapsed() < self.idle_timeout && i.up.sender.is_ready()
    }

    /// Close the connections idle for longer than the idle timeout, and forget the ones the
    /// upstream closed, every half timeout.
    pub async fn sweep(self: Arc<Self>) {
        if self.idle_timeout.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.idle_timeout / 2);
        loop {
            tick.tick().await;
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|_, list| {
                list.retain(|i| self.usable(i));
                !list.is_empty()
            });
        }
    }

    /// Close every idle connection opened from the network namespace `netns` (its workload
    /// was released: the sockets would keep the namespace alive).
    pub fn forget(&self, netns: u64) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|k, _| k.netns != netns);
    }

    /// Idle connections now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.lock().unwrap().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, tls: Option<(Arc<rustls::ClientConfig>, &str)>) -> Key {
        Key::new(
            1,
            &Target::Addr(SocketAddr::from(([127, 0, 0, 1], port))),
            tls.map(|(c, s)| (c, s.to_owned())),
        )
    }

    fn client_config() -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    #[test]
    fn keys_differ_by_target_tls_configuration_and_server_name() {
        let (a, b) = (client_config(), client_config());
        assert!(key(80, None) == key(80, None));
        assert!(key(80, None) != key(81, None));
        assert!(key(80, None) != key(80, Some((a.clone(), "x"))));
        assert!(key(80, Some((a.clone(), "x"))) == key(80, Some((a.clone(), "x"))));
        // A reloaded DestinationRule (a new configuration, perhaps another CA) starts afresh.
        assert!(key(80, Some((a.clone(), "x"))) != key(80, Some((b, "x"))));
        assert!(key(80, Some((a.clone(), "x"))) != key(80, Some((a, "y"))));
        // Another workload's namespace: its own connections, from its own address.
        let mut other = key(80, None);
        other.netns = 2;
        assert!(key(80, None) != other);
    }

    /// A real connection to a real HTTP/1.1 server: kept after a keep-alive response, reused,
    /// and dropped from the pool once the server closes it.
    #[tokio::test]
    async fn a_connection_returns_after_its_response_and_leaves_when_the_server_closes() {
        use http_body_util::{BodyExt as _, Empty};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Two keep-alive answers on one connection, then close when told.
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for _ in 0..2 {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    head.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            let _ = closing.await;
        });
        let pool = Arc::new(Pool::new(Duration::from_secs(60)));
        let k = key(addr.port(), None);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let addrs = (tcp.peer_addr().unwrap(), tcp.local_addr().unwrap());
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let get = || {
            http::Request::get("/")
                .header("host", "x")
                .body(Empty::new().map_err(|e| match e {}).boxed())
                .unwrap()
        };
        let mut up = Upstream { sender, addrs };
        for round in 0..2 {
            let resp = up.sender.send_request(get()).await.unwrap();
            pool.give(k.clone(), up);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            let mut waited = 0;
            up = loop {
                if let Some(u) = pool.take(&k) {
                    break u;
                }
                waited += 1;
                assert!(
                    waited < 1000,
                    "round {round}: the connection never came back"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            assert_eq!(up.addrs, addrs, "round {round}: the same connection");
        }
        // The server closes; once hyper has seen it, the connection is not kept.
        close.send(()).unwrap();
        server.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("hyper sees the close")
            .unwrap()
            .unwrap();
        pool.give(k.clone(), up);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(pool.take(&k).is_none());
        assert_eq!(pool.len(), 0);
    }
}
