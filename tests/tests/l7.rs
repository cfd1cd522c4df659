//! Privileged tests of stream mediation with real curl, real TLS and the seeds' resources:
//! HTTP allowed by Host, HTTPS by SNI without decrypting, TCP by address, VirtualService
//! timeouts and retries, DestinationRule TLS origination, and the access log of each.
//!
//! External names are mapped to stand-ins on 127.50.0.0/16: curl with `--resolve`, the agent
//! (which resolves `resolution: DNS` entries itself) with a hosts file of its own.

use std::{net::SocketAddr, time::Duration};

use egress_tests::{
    Agent, AgentOpts, Cgroup, ConnLine, Servers,
    configs::MY_HTTPBIN,
    l7::{Curl, StandIns, TestCa, curl},
    privileged, probe,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const HEAD: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: MODE}
  interception: {includeOutboundIPRanges: \"127.50.0.0/16\"}
";

/// The seeds' ServiceEntries, verbatim.
const SEEDS: &str = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin-ext
  namespace: default
spec:
  hosts:
  - httpbin.org
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: google-ext
  namespace: default
spec:
  hosts:
  - www.google.com
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
  location: MESH_EXTERNAL
";

fn config(mode: &str, extra: &str) -> String {
    format!("{}{SEEDS}{extra}", HEAD.replace("MODE", mode))
}

fn start(config: &str, cg: &Cgroup, hosts: &str, extra: &[&str]) -> Agent {
    Agent::start_resolving(
        AgentOpts {
            config,
            cgroup: cg,
            inside: false,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        },
        Some(hosts),
    )
}

/// The access-log record of the request curl made for `path` (curl's connection is the
/// record's peer; the path is unique within a test).
fn request(agent: &Agent, path: &str) -> ConnLine {
    agent.wait_record("request", path, |r| r.get("path") == path)
}

fn assert_ok(c: &Curl, what: &str) {
    assert_eq!((c.code, c.status), (Some(0), 200), "{what}: {c:?}");
}

#[test]
fn http_by_host_with_timeout_and_registry_only() {
    if !privileged("http_by_host_with_timeout_and_registry_only") {
        return;
    }
    let cg = Cgroup::new("l7-http");
    let stand = StandIns::new();
    let httpbin = stand.http(sa("127.50.1.10:80"));
    let agent = start(
        &config("REGISTRY_ONLY", ""),
        &cg,
        "127.50.1.10 httpbin.org\n",
        &[],
    );
    // The client resolves httpbin.org elsewhere (127.50.1.99); the entry's resolution is DNS,
    // so the agent connects to the address it resolves itself.
    let resolve = "httpbin.org:80:127.50.1.99";
    let c = curl(&cg, &["--resolve", resolve, "http://httpbin.org/headers"]);
    assert_ok(&c, "GET /headers");
    assert!(c.body.contains("host: httpbin.org"), "{c:?}");
    let hit = &stand.hits_for("/headers")[0];
    assert_eq!((hit.local, hit.host.as_str()), (httpbin, "httpbin.org"));
    let r = request(&agent, "/headers");
    for (k, v) in [
        ("method", "GET"),
        ("host", "httpbin.org"),
        ("status", "200"),
        ("verdict", "allow"),
        ("policy", "registered"),
        ("matched", "ServiceEntry default/httpbin-ext"),
        ("orig_dst", "127.50.1.99:80"),
        ("upstream", "127.50.1.10:80"),
        ("protocol", "http"),
        ("result", "ok"),
        ("uid", "0"),
        ("attempts", "1"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }
    assert_eq!(r.get("bytes_down"), c.body.len().to_string());
    assert!(
        r.get("cgroup")
            .ends_with(cg.path.file_name().unwrap().to_str().unwrap())
    );
    assert!(r.get("pid").parse::<u32>().unwrap() > 1);
    assert!(r.get("time").ends_with('Z'), "{:?}", r.fields);
    // The connection's own record, once curl closed it.
    let conn = agent.wait_conn("curl's connection", |c| c.get("peer") == r.get("peer"));
    assert_eq!(
        (conn.get("protocol"), conn.get("result")),
        ("http", "ok"),
        "{:?}",
        conn.fields
    );

    // Without a VirtualService the slow call completes.
    let c = curl(&cg, &["--resolve", resolve, "http://httpbin.org/delay/5"]);
    assert_ok(&c, "/delay/5 without a timeout");
    assert!(c.elapsed >= Duration::from_secs(5), "{c:?}");

    // With `timeout: 3s` the same call is cut with a 504 after 3 s.
    let n = agent.logs().len();
    agent.write_config(&config(
        "REGISTRY_ONLY",
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin-timeout, namespace: default}
spec:
  hosts: [httpbin.org]
  http:
  - timeout: 3s
    route:
    - destination: {host: httpbin.org}
",
    ));
    agent.wait_log(n, "applied configuration generation 2");
    let c = curl(&cg, &["--resolve", resolve, "http://httpbin.org/delay/6"]);
    assert_eq!((c.code, c.status), (Some(0), 504), "{c:?}");
    assert_eq!(c.body, "upstream request timeout");
    assert!(
        c.elapsed >= Duration::from_millis(2900) && c.elapsed < Duration::from_millis(4500),
        "504 after {:?}, not about 3 s",
        c.elapsed
    );
    let r = request(&agent, "/delay/6");
    for (k, v) in [
        ("status", "504"),
        ("result", "timeout"),
        ("route", "VirtualService default/httpbin-timeout"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }

    // An unregistered host gets a 502 that names it and the reason.
    let c = curl(
        &cg,
        &[
            "--resolve",
            "unregistered.example:80:127.50.1.10",
            "http://unregistered.example/",
        ],
    );
    assert_eq!((c.code, c.status), (Some(0), 502), "{c:?}");
    assert!(
        c.body
            .contains("\"unregistered.example\" is not registered")
            && c.body.contains("REGISTRY_ONLY"),
        "{c:?}"
    );
    assert!(
        stand
            .hits()
            .iter()
            .all(|h| h.host != "unregistered.example")
    );
    let r = agent.wait_record("request", "the unregistered request", |r| {
        r.get("host") == "unregistered.example"
    });
    for (k, v) in [
        ("status", "502"),
        ("verdict", "deny"),
        ("policy", "not-registered"),
        ("result", "denied"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }

    // Every request of a keep-alive connection is matched: the second one, with a Host
    // nobody registered, is refused on the same connection.
    let c = curl(
        &cg,
        &[
            "--resolve",
            resolve,
            "http://httpbin.org/keepalive-1",
            "--next",
            "--resolve",
            resolve,
            "-H",
            "Host: other.example",
            "http://httpbin.org/keepalive-2",
        ],
    );
    assert_eq!(c.code, Some(0), "{c:?}");
    let first = request(&agent, "/keepalive-1");
    let second = request(&agent, "/keepalive-2");
    assert_eq!(first.get("peer"), second.get("peer"), "one connection");
    assert_eq!((first.get("status"), second.get("status")), ("200", "502"));
    assert_eq!(second.get("host"), "other.example");
}

#[test]
fn tls_by_sni_and_tcp_by_address() {
    if !privileged("tls_by_sni_and_tcp_by_address") {
        return;
    }
    let cg = Cgroup::new("l7-tls");
    let ca = TestCa::new("tls");
    let stand = StandIns::new();
    let google = stand.https(sa("127.50.2.20:443"), ca.server_config(&["www.google.com"]));
    stand.https(sa("127.50.3.5:443"), ca.server_config(&["tcp.example"]));
    let tcp_entry = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-ext, namespace: default}
spec:
  hosts: [tcp.example]
  addresses: [127.50.3.0/24]
  ports: [{number: 443, name: tcp, protocol: TCP}]
  resolution: NONE
";
    let agent = start(
        &config("REGISTRY_ONLY", tcp_entry),
        &cg,
        "127.50.2.20 www.google.com\n",
        &["--header-timeout", "1s"],
    );
    let cacert = ca.path().to_str().unwrap();

    // Registered SNI: the bytes pass untouched; the client verifies the stand-in's own
    // certificate, which only the stand-in's key can present (the agent has none).
    let c = curl(
        &cg,
        &[
            "--cacert",
            cacert,
            "--resolve",
            "www.google.com:443:127.50.2.99",
            "https://www.google.com/sni-ok",
        ],
    );
    assert_ok(&c, "https://www.google.com");
    let hit = &stand.hits_for("/sni-ok")[0];
    assert_eq!(
        (hit.local, hit.tls, hit.sni.as_deref()),
        (google, true, Some("www.google.com"))
    );
    let r = agent.wait_conn("the google connection", |r| {
        r.get("sni") == "www.google.com"
    });
    for (k, v) in [
        ("protocol", "tls"),
        ("verdict", "allow"),
        ("matched", "ServiceEntry default/google-ext"),
        ("orig_dst", "127.50.2.99:443"),
        ("upstream", "127.50.2.20:443"),
        ("result", "ok"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }
    assert!(
        r.get("bytes_up").parse::<u64>().unwrap() > 200,
        "{:?}",
        r.fields
    );

    // Unregistered SNI: reset before any byte reaches the stand-in.
    let c = curl(
        &cg,
        &[
            "--cacert",
            cacert,
            "--resolve",
            "unregistered.example:443:127.50.2.20",
            "https://unregistered.example/",
        ],
    );
    assert_ne!(c.code, Some(0), "{c:?}");
    let r = agent.wait_conn("the unregistered TLS connection", |r| {
        r.get("sni") == "unregistered.example"
    });
    for (k, v) in [
        ("verdict", "deny"),
        ("policy", "not-registered"),
        ("result", "denied"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }
    assert!(
        stand
            .hits()
            .iter()
            .all(|h| h.sni.as_deref() != Some("unregistered.example"))
    );

    // A TCP entry with a CIDR on 443 lets any TLS client through to that range.
    let c = curl(
        &cg,
        &[
            "--cacert",
            cacert,
            "--resolve",
            "tcp.example:443:127.50.3.5",
            "https://tcp.example/by-address",
        ],
    );
    assert_ok(&c, "https://tcp.example by address");
    let r = agent.wait_conn("the TCP entry's connection", |r| {
        r.get("orig_dst") == "127.50.3.5:443"
    });
    assert_eq!(
        (r.get("protocol"), r.get("matched"), r.get("verdict")),
        ("tcp", "ServiceEntry default/tcp-ext", "allow")
    );

    // Malformed and truncated ClientHellos: refused (reset) after at most --header-timeout,
    // never a stall or a crash; the agent goes on serving.
    let hello_start = "160301002001000030"; // record and handshake headers, then stops
    for (hex, hold_ms, why) in [
        ("1603010005020000010000", 0, "not a ClientHello"),
        ("16030100ff01", 0, "truncated, client closes"),
        (hello_start, 3000, "truncated, client waits"),
        ("160301000000", 0, "zero-length record"),
    ] {
        let before = agent.conns().len();
        let r = probe(
            Some(&cg),
            &["raw", "127.50.2.20:443", hex, &hold_ms.to_string()],
        );
        assert_eq!(r.get("received").as_deref(), Some("0"), "{why}: {r:?}");
        let rec = agent.wait_conn(why, |c| c.get("peer") == r.local().to_string());
        assert!(agent.conns().len() > before);
        assert_ne!(rec.get("verdict"), "allow", "{why}: {:?}", rec.fields);
    }
    let c = curl(
        &cg,
        &[
            "--cacert",
            cacert,
            "--resolve",
            "www.google.com:443:127.50.2.20",
            "https://www.google.com/still-serving",
        ],
    );
    assert_ok(&c, "after malformed ClientHellos");
}

#[test]
fn retries_as_configured() {
    if !privileged("retries_as_configured") {
        return;
    }
    let cg = Cgroup::new("l7-retry");
    let stand = StandIns::new();
    stand.http(sa("127.50.4.10:80"));
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin-retries, namespace: default}
spec:
  hosts: [httpbin.org]
  http:
  - match: [{uri: {prefix: /once}}]
    retries: {attempts: 0}
    route: [{destination: {host: httpbin.org}}]
  - retries: {attempts: 2, perTryTimeout: 2s, retryOn: 5xx}
    route: [{destination: {host: httpbin.org}}]
";
    let agent = start(
        &config("REGISTRY_ONLY", vs),
        &cg,
        "127.50.4.10 httpbin.org\n",
        &[],
    );
    let resolve = "httpbin.org:80:127.50.4.10";
    // The upstream fails the first attempt (503) and answers the second.
    let c = curl(&cg, &["--resolve", resolve, "http://httpbin.org/flaky/a"]);
    assert_ok(&c, "a retried request");
    assert_eq!(c.body, "attempt 2 succeeds\n");
    assert_eq!(stand.hits_for("/flaky/a").len(), 2);
    let r = request(&agent, "/flaky/a");
    assert_eq!(
        (r.get("attempts"), r.get("status"), r.get("route")),
        ("2", "200", "VirtualService default/httpbin-retries")
    );
    // The route with `attempts: 0` passes the first 503 on.
    let c = curl(
        &cg,
        &["--resolve", resolve, "http://httpbin.org/once/flaky/b"],
    );
    assert_eq!((c.code, c.status), (Some(0), 503), "{c:?}");
    assert_eq!(stand.hits_for("/once/flaky/b").len(), 1);
    assert_eq!(request(&agent, "/once/flaky/b").get("attempts"), "1");
    // A request body is sent again with the retry.
    let c = curl(
        &cg,
        &[
            "--resolve",
            resolve,
            "-d",
            "payload",
            "http://httpbin.org/flaky/c",
        ],
    );
    assert_ok(&c, "a retried POST");
    let r = request(&agent, "/flaky/c");
    assert_eq!((r.get("method"), r.get("bytes_up")), ("POST", "7"));
    assert_eq!(stand.hits_for("/flaky/c").len(), 2);
}

#[test]
fn tls_origination_verifies_the_upstream() {
    if !privileged("tls_origination_verifies_the_upstream") {
        return;
    }
    let cg = Cgroup::new("l7-origination");
    let ca = TestCa::new("origination");
    let other_ca = TestCa::new("other");
    let stand = StandIns::new();
    let secure = stand.https(
        sa("127.50.5.10:8443"),
        ca.server_config(&["secure.example"]),
    );
    let resources = |ca_path: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure-ext, namespace: default}}
spec:
  hosts: [secure.example]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure-tls, namespace: default}}
spec:
  host: secure.example
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE, caCertificates: {ca_path}}}
"
        )
    };
    let agent = start(
        &config("REGISTRY_ONLY", &resources(ca.path().to_str().unwrap())),
        &cg,
        "127.50.5.10 secure.example\n",
        &[],
    );
    let resolve = "secure.example:80:127.50.5.99";
    // Plain HTTP from the application; TLS with the right SNI at the stand-in.
    let c = curl(
        &cg,
        &["--resolve", resolve, "http://secure.example/originated"],
    );
    assert_ok(&c, "http://secure.example/");
    let hit = &stand.hits_for("/originated")[0];
    assert_eq!(
        (hit.local, hit.tls, hit.sni.as_deref(), hit.host.as_str()),
        (secure, true, Some("secure.example"), "secure.example")
    );
    let r = request(&agent, "/originated");
    for (k, v) in [
        ("tls_origination", "DestinationRule default/secure-tls"),
        ("upstream", "127.50.5.10:8443"),
        ("orig_dst", "127.50.5.99:80"),
        ("status", "200"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }

    // With a CA that did not sign the stand-in's certificate the request fails.
    let n = agent.logs().len();
    agent.write_config(&config(
        "REGISTRY_ONLY",
        &resources(other_ca.path().to_str().unwrap()),
    ));
    agent.wait_log(n, "applied configuration generation 2");
    let c = curl(
        &cg,
        &["--resolve", resolve, "http://secure.example/wrong-ca"],
    );
    assert_eq!((c.code, c.status), (Some(0), 503), "{c:?}");
    assert!(stand.hits_for("/wrong-ca").is_empty());
    let r = request(&agent, "/wrong-ca");
    assert_eq!(r.get("result"), "connect-failed", "{:?}", r.fields);
    assert!(r.get("error").contains("UnknownIssuer"), "{:?}", r.fields);
}

/// The second half of Istio's "Kubernetes Services for Egress Traffic" task: an ExternalName
/// Service whose port 443 is named `http` and a DestinationRule for its name that originates
/// TLS (`SIMPLE`, with the target's SNI): the application speaks plain HTTP to port 443.
#[test]
fn an_external_name_service_with_tls_origination_speaks_tls_to_its_target() {
    if !privileged("an_external_name_service_with_tls_origination_speaks_tls_to_its_target") {
        return;
    }
    let cg = Cgroup::new("l7-extname-tls");
    let ca = TestCa::new("wikipedia");
    let stand = StandIns::new();
    let wikipedia = stand.https(
        sa("127.50.8.11:443"),
        ca.server_config(&["www.wikipedia.org"]),
    );
    let resources = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: my-wikipedia, namespace: default}}
spec:
  type: ExternalName
  externalName: www.wikipedia.org
  ports:
  - name: http
    port: 443
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: my-wikipedia, namespace: default}}
spec:
  host: my-wikipedia.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: SIMPLE
      sni: www.wikipedia.org
      caCertificates: {}
",
        ca.path().display()
    );
    for mode in ["ALLOW_ANY", "REGISTRY_ONLY"] {
        let agent = start(
            &format!("{}{resources}", HEAD.replace("MODE", mode)),
            &cg,
            "127.50.8.11 www.wikipedia.org\n",
            &[],
        );
        let path = format!("/wiki/Main_Page-{mode}");
        let c = curl(
            &cg,
            &[
                "--resolve",
                "my-wikipedia.default.svc.cluster.local:443:127.50.8.98",
                &format!("http://my-wikipedia.default.svc.cluster.local:443{path}"),
            ],
        );
        assert_ok(&c, &format!("{mode}: GET my-wikipedia"));
        let hit = &stand.hits_for(&path)[0];
        assert_eq!(
            (hit.local, hit.tls, hit.sni.as_deref()),
            (wikipedia, true, Some("www.wikipedia.org")),
            "{mode}: TLS with the DestinationRule's SNI at the target"
        );
        assert_eq!(
            hit.host, "my-wikipedia.default.svc.cluster.local:443",
            "{mode}: the client's Host"
        );
        let r = request(&agent, &path);
        for (k, v) in [
            ("status", "200"),
            ("matched", "Service default/my-wikipedia"),
            ("tls_origination", "DestinationRule default/my-wikipedia"),
            ("upstream", "127.50.8.11:443"),
        ] {
            assert_eq!(r.get(k), v, "{mode}: {k} in {:?}", r.fields);
        }
    }
}

#[test]
fn undeclared_ports_pass_and_are_logged_with_their_host() {
    if !privileged("undeclared_ports_pass_and_are_logged_with_their_host") {
        return;
    }
    let cg = Cgroup::new("l7-sniff");
    let stand = StandIns::new();
    let web = stand.http(sa("127.50.6.10:8080"));
    let servers = Servers::new();
    let greeter = servers.whoami(sa("127.50.6.11:2222"));
    // A long sniff: a server-first protocol must not have to wait it out.
    let agent = start(
        &config("ALLOW_ANY", ""),
        &cg,
        "",
        &["--sniff-timeout", "60s"],
    );
    // ALLOW_ANY on a port no entry declares: through, and the log names the Host.
    let c = curl(
        &cg,
        &[
            "--resolve",
            "anything.example:8080:127.50.6.10",
            "http://anything.example:8080/sniffed",
        ],
    );
    assert_ok(&c, "ALLOW_ANY passthrough");
    assert_eq!(stand.hits_for("/sniffed")[0].local, web);
    let r = agent.wait_conn("the sniffed connection", |r| {
        r.get("orig_dst") == web.to_string()
    });
    for (k, v) in [
        ("protocol", "passthrough"),
        ("host", "anything.example"),
        ("policy", "allow-any"),
        ("result", "ok"),
    ] {
        assert_eq!(r.get(k), v, "{k} in {:?}", r.fields);
    }
    // A server-first protocol: the client sends nothing and still gets the greeting, long
    // before the sniff would have ended (the probe gives up reading after 30 s).
    let p = probe(Some(&cg), &["raw", &greeter.to_string(), "", "0"]);
    assert_eq!(
        p.get("text").as_deref(),
        Some(format!("\"{greeter}\\n\"").as_str()),
        "{p:?}"
    );
    let r = agent.wait_conn("the server-first connection", |c| {
        c.get("peer") == p.local().to_string()
    });
    assert_eq!((r.get("result"), r.get("host")), ("ok", ""));

    // An upstream slow to accept (its accept queue full: the agent's SYN is retried after a
    // second), and a client that sends nothing and half-closes at once: the sniff ends
    // before the upstream connection is made, and the greeting still comes through.
    let slow = sa("127.50.6.12:2222");
    let listener = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&slow.into()).unwrap();
        s.listen(1).unwrap();
        std::net::TcpListener::from(s)
    };
    let fillers: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(slow).unwrap())
        .collect();
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        listener.set_nonblocking(false).unwrap();
        // The two fillers, then the agent's connection.
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            let _ = std::io::Write::write_all(&mut s, format!("{slow}\n").as_bytes());
        }
    });
    let p = probe(Some(&cg), &["raw", &slow.to_string(), "", "0"]);
    server.join().unwrap();
    drop(fillers);
    assert_eq!(
        p.get("text").as_deref(),
        Some(format!("\"{slow}\\n\"").as_str()),
        "{p:?}"
    );
    let r = agent.wait_conn("the connection to the slow upstream", |c| {
        c.get("peer") == p.local().to_string()
    });
    assert_eq!(
        (r.get("result"), r.get("upstream")),
        ("ok", slow.to_string().as_str())
    );
}

#[test]
fn upstream_connections_are_kept_for_the_next_request() {
    if !privileged("upstream_connections_are_kept_for_the_next_request") {
        return;
    }
    let cg = Cgroup::new("l7-kept");
    let stand = StandIns::new();
    let kept = stand.http_kept(sa("127.50.7.10:80"));
    stand.http(sa("127.50.7.20:80"));
    let entries = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: kept, namespace: default}
spec:
  hosts: [kept.example, closing.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
";
    let agent = start(
        &config("REGISTRY_ONLY", entries),
        &cg,
        "127.50.7.10 kept.example\n127.50.7.20 closing.example\n",
        &[],
    );
    let get = |host: &str, path: &str| {
        let url = format!("http://{host}{path}");
        let resolve = format!("{host}:80:127.50.7.99");
        curl(&cg, &["--resolve", &resolve, &url])
    };
    // Two client connections, one after the other: the second request goes on the upstream
    // connection the first one opened.
    for path in ["/one", "/two"] {
        assert_ok(&get("kept.example", path), path);
    }
    let (one, two) = (&stand.hits_for("/one")[0], &stand.hits_for("/two")[0]);
    assert_eq!((one.local, two.local), (kept, kept));
    assert_eq!(one.peer, two.peer, "one upstream connection for both");
    let (r1, r2) = (request(&agent, "/one"), request(&agent, "/two"));
    assert_ne!(r1.get("peer"), r2.get("peer"), "two client connections");
    assert_eq!(r1.get("upstream_local"), one.peer.to_string());
    assert_eq!(r2.get("upstream_local"), one.peer.to_string());

    // The upstream closes its idle connection just as the next request arrives: a GET is sent
    // again on a new connection, and the client sees only the answer.
    assert_ok(&get("kept.example", "/drop-next"), "/drop-next");
    let c = get("kept.example", "/again");
    assert_ok(&c, "a GET on a connection the upstream dropped");
    let again = stand.hits_for("/again");
    assert_eq!(again.len(), 2, "dropped once, answered once: {again:?}");
    assert_eq!(again[0].peer, one.peer);
    assert_ne!(again[1].peer, one.peer);
    let r = request(&agent, "/again");
    assert_eq!(
        (r.get("status"), r.get("attempts"), r.get("upstream_local")),
        ("200", "1", again[1].peer.to_string().as_str())
    );
    // A POST is never sent twice: the client gets the failure.
    assert_ok(&get("kept.example", "/drop-next"), "/drop-next again");
    let url = "http://kept.example/post";
    let c = curl(
        &cg,
        &["--resolve", "kept.example:80:127.50.7.99", "-d", "x=1", url],
    );
    assert_eq!((c.code, c.status), (Some(0), 503), "{c:?}");
    assert!(
        c.body.contains("upstream reset before the response"),
        "{c:?}"
    );
    assert_eq!(stand.hits_for("/post").len(), 1);
    let r = request(&agent, "/post");
    assert_eq!((r.get("method"), r.get("result")), ("POST", "reset"));

    // An upstream that answers `connection: close` gets a new connection per request.
    for path in ["/c1", "/c2"] {
        assert_ok(&get("closing.example", path), path);
    }
    assert_ne!(stand.hits_for("/c1")[0].peer, stand.hits_for("/c2")[0].peer);
}

#[test]
fn an_istio_0_7_external_service_lets_tls_through_to_its_range() {
    if !privileged("an_istio_0_7_external_service_lets_tls_through_to_its_range") {
        return;
    }
    let cg = Cgroup::new("l7-extsvc");
    let ca = TestCa::new("extsvc");
    let stand = StandIns::new();
    let wiki = stand.https(
        sa("127.50.4.5:443"),
        ca.server_config(&["en.wikipedia.org"]),
    );
    let outside = stand.https(
        sa("127.50.5.5:443"),
        ca.server_config(&["en.wikipedia.org"]),
    );
    // As Istio 0.7's "Control Egress TCP Traffic" wrote it, the range moved to the stand-in's.
    let external_service = "---
apiVersion: networking.istio.io/v1alpha3
kind: ExternalService
metadata:
  name: wikipedia-ext
spec:
  hosts:
  - 127.50.4.0/24
  ports:
  - number: 443
    protocol: tcp
    name: tcp
  discovery: none
";
    // Alone: the seeds' HTTPS entry would register every address on 443 for its SNI.
    let mesh = format!(
        "{}{external_service}",
        HEAD.replace("MODE", "REGISTRY_ONLY")
    );
    let agent = start(&mesh, &cg, "", &[]);
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("ExternalService (Istio 0.7) is read as the ServiceEntry")),
        "{}",
        agent.logs().join("\n")
    );
    let cacert = ca.path().to_str().unwrap();
    let get = |addr: SocketAddr| {
        curl(
            &cg,
            &[
                "--cacert",
                cacert,
                "--resolve",
                &format!("en.wikipedia.org:443:{}", addr.ip()),
                "https://en.wikipedia.org/wiki/Main_Page",
            ],
        )
    };
    let c = get(wiki);
    assert_ok(
        &c,
        "https://en.wikipedia.org in the ExternalService's range",
    );
    let hit = &stand.hits_for("/wiki/Main_Page")[0];
    assert_eq!((hit.local, hit.tls), (wiki, true));
    let r = agent.wait_conn("the ExternalService's connection", |r| {
        r.get("orig_dst") == wiki.to_string()
    });
    assert_eq!(
        (r.get("matched"), r.get("verdict")),
        ("ServiceEntry default/wikipedia-ext", "allow"),
        "{:?}",
        r.fields
    );
    // Outside its range, REGISTRY_ONLY refuses the connect: curl cannot connect (7).
    let c = get(outside);
    assert_eq!(c.code, Some(7), "{c:?}");
    assert_eq!(stand.hits_for("/wiki/Main_Page").len(), 1);
}

/// A TCP entry by host and its allocated address, with the allocation ranges in loopback.
const DB_BY_HOST: &str = "apiVersion: egress/v1alpha1
kind: EgressConfig
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  interception: {includeOutboundIPRanges: \"127.50.0.0/16\"}
  autoAllocate: {ipv4Range: 127.240.0.0/16, ipv6Range: \"2001:db8:240::/48\"}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example]
  ports: [{number: PORT, name: tcp, protocol: TCP}]
  resolution: DNS
";

#[test]
fn a_tcp_entry_by_host_gets_an_address_that_reloads_and_restarts_keep() {
    if !privileged("a_tcp_entry_by_host_gets_an_address_that_reloads_and_restarts_keep") {
        return;
    }
    let cg = Cgroup::new("l7-alloc");
    let servers = Servers::new();
    let port = egress_tests::free_port();
    let db = servers.echo(sa(&format!("127.50.6.6:{port}")));
    let config = DB_BY_HOST.replace("PORT", &port.to_string());
    let mut agent = start(&config, &cg, "127.50.6.6 db.example\n", &[]);
    let allocated = |agent: &Agent| -> Vec<String> {
        let dump = agent.config_dump();
        dump["allocated"]["ServiceEntry default/db"]
            .as_array()
            .unwrap_or_else(|| panic!("no allocation for default/db: {dump}"))
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let first = allocated(&agent);
    let v4: std::net::Ipv4Addr = first[0].parse().unwrap();
    assert_eq!(&v4.octets()[..2], &[127, 240], "{first:?}");
    assert!(first[1].starts_with("2001:db8:240:"), "{first:?}");

    // A connection to the allocated address reaches the host's own address, through the agent,
    // which knows the entry by it.
    let vip = SocketAddr::from((v4, port));
    let r = probe(Some(&cg), &["echo", &vip.to_string(), "1000"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
    let rec = agent.wait_conn("the connection to the allocated address", |c| {
        c.get("peer") == r.local().to_string()
    });
    assert_eq!(
        (rec.get("matched"), rec.get("upstream")),
        ("ServiceEntry default/db", db.to_string().as_str()),
        "{:?}",
        rec.fields
    );
    assert_eq!(rec.get("orig_dst"), vip.to_string());
    // A port the entry does not declare: refused at connect under REGISTRY_ONLY.
    let other = SocketAddr::from((v4, egress_tests::free_port()));
    let r = probe(Some(&cg), &["echo", &other.to_string(), "10"]);
    assert_eq!(r.get("errno").as_deref(), Some("1"), "{r:?}");

    // Fifty more entries by host: the first keeps its addresses.
    let mut more = config.clone();
    for i in 0..50 {
        more.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: more{i}, namespace: default}}\n\
             spec: {{hosts: [more{i}.example], ports: [{{number: 5432, name: tcp, protocol: TCP}}], \
             resolution: DNS}}\n"
        ));
    }
    let n = agent.logs().len();
    agent.write_config(&more);
    agent.wait_log(n, "applied configuration generation 2");
    assert_eq!(allocated(&agent), first, "after a reload");
    // Kept on disk (`--allocations-file`), for the next agent.
    let kept = std::fs::read_to_string(agent.config_path().with_extension("addresses")).unwrap();
    assert!(
        kept.contains(&first[0]) && kept.contains("default/more49"),
        "{kept}"
    );
    // And a restart.
    agent.terminate();
    agent.start_again();
    assert_eq!(allocated(&agent), first, "after a restart");
    let r = probe(Some(&cg), &["echo", &vip.to_string(), "1000"]);
    assert_eq!(r.get("match").as_deref(), Some("true"), "{r:?}");
}

#[test]
fn an_external_name_service_reaches_its_target_with_the_clients_host() {
    if !privileged("an_external_name_service_reaches_its_target_with_the_clients_host") {
        return;
    }
    let cg = Cgroup::new("l7-extname");
    let stand = StandIns::new();
    let httpbin = stand.http(sa("127.50.8.10:80"));
    for mode in ["ALLOW_ANY", "REGISTRY_ONLY"] {
        // Only the Service names httpbin.org here: no ServiceEntry for it.
        let mesh = format!("{}{MY_HTTPBIN}", HEAD.replace("MODE", mode));
        let agent = start(&mesh, &cg, "127.50.8.10 httpbin.org\n", &[]);
        let path = format!("/headers-{mode}");
        // The client reached the name somewhere in the intercepted range.
        let c = curl(
            &cg,
            &[
                "--resolve",
                "my-httpbin.default.svc.cluster.local:80:127.50.8.99",
                &format!("http://my-httpbin.default.svc.cluster.local{path}"),
            ],
        );
        assert_ok(&c, &format!("{mode}: GET my-httpbin"));
        let hit = &stand.hits_for(&path)[0];
        assert_eq!(
            (hit.local, hit.host.as_str()),
            (httpbin, "my-httpbin.default.svc.cluster.local"),
            "{mode}: the stand-in saw the client's Host"
        );
        let r = request(&agent, &path);
        for (k, v) in [
            ("status", "200"),
            ("policy", "registered"),
            ("matched", "Service default/my-httpbin"),
            ("upstream", "127.50.8.10:80"),
        ] {
            assert_eq!(r.get(k), v, "{mode}: {k} in {:?}", r.fields);
        }
    }
}
