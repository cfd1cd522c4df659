//! Queries as resolvers send them, encoded with hickory, against registries written as YAML.

use std::net::{IpAddr, Ipv6Addr};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, SOA, TXT, opt::EdnsOption},
    },
};

use super::*;
use crate::config::{self, MeshConfig};

const MESH: &str = r#"
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.org, HTTPBIN.example]
  addresses: [198.18.0.10, 2001:db8::10, 198.18.4.0/24]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: v4-only, namespace: default}
spec:
  hosts: [v4.example]
  addresses: [198.18.0.20]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: ranges, namespace: default}
spec:
  hosts: [range.example]
  addresses: [198.18.8.0/24]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: NONE
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: by-dns, namespace: default}
spec:
  hosts: [api.dns.example]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: wild, namespace: default}
spec:
  hosts: ["*.wild.example"]
  addresses: [198.18.1.1]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: deep, namespace: default}
spec:
  hosts: ["*.deep.wild.example", exact.wild.example]
  addresses: [198.18.1.2]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: private, namespace: team-a}
spec:
  hosts: [private.example]
  addresses: [198.18.2.1]
  exportTo: ["."]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
kind: Service
apiVersion: v1
metadata: {name: db, namespace: data}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 5432, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: my-wikipedia, namespace: default}
spec:
  ports: [{port: 443, protocol: TCP, name: tls}]
---
kind: Endpoints
apiVersion: v1
metadata: {name: my-wikipedia, namespace: default}
subsets:
- addresses: [{ip: 198.35.26.96}, {ip: 208.80.153.224}]
  ports: [{port: 443, name: tls}]
---
kind: Service
apiVersion: v1
metadata: {name: in-cluster, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{port: 80, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: my-httpbin, namespace: default}
spec:
  type: ExternalName
  externalName: httpbin.org
  ports: [{port: 80, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: my-external, namespace: default}
spec:
  type: ExternalName
  externalName: www.google.com
  ports: [{port: 443, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: my-db, namespace: default}
spec:
  type: ExternalName
  externalName: db.data.svc.cluster.local
  ports: [{port: 5432, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: hop, namespace: default}
spec:
  type: ExternalName
  externalName: my-db.default.svc.cluster.local
  ports: [{port: 5432, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: loop-a, namespace: default}
spec:
  type: ExternalName
  externalName: loop-b.default.svc.cluster.local
  ports: [{port: 80, protocol: TCP}]
---
kind: Service
apiVersion: v1
metadata: {name: loop-b, namespace: default}
spec:
  type: ExternalName
  externalName: loop-a.default.svc.cluster.local
  ports: [{port: 80, protocol: TCP}]
"#;

const ID: u16 = 0x4a7e;

fn mesh() -> MeshConfig {
    config::parse_str("mesh.yaml", MESH).expect("valid").config
}

fn names() -> Names {
    Names::build(&mesh())
}

/// A query as stub resolvers send it: recursion desired, one question.
fn query_msg(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(ID, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    query_msg(name, qtype).to_vec().unwrap()
}

/// The query with an OPT of `payload` bytes, DO set.
fn query_edns(name: &str, qtype: RecordType, payload: u16) -> Vec<u8> {
    let mut m = query_msg(name, qtype);
    let mut edns = Edns::new();
    edns.set_max_payload(payload).set_dnssec_ok(true);
    m.edns = Some(edns);
    m.to_vec().unwrap()
}

#[track_caller]
fn answer(action: Action) -> Message {
    match action {
        Action::Answer(bytes) => Message::from_vec(&bytes).expect("the answer parses"),
        other => panic!("not answered: {other:?}"),
    }
}

#[track_caller]
fn ask(names: &Names, name: &str, qtype: RecordType, namespace: &str) -> Message {
    answer(names.handle(&query(name, qtype), namespace))
}

/// A section as `name type data` lines, TTLs aside.
fn lines(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
        .collect()
}

/// A response that answers the query: its ID and question, QR, RD kept, RA.
#[track_caller]
fn check_reply(m: &Message, name: &str, qtype: RecordType) {
    assert_eq!(m.id, ID);
    assert_eq!(m.message_type, MessageType::Response);
    assert!(m.recursion_desired && m.recursion_available);
    assert_eq!(m.queries.len(), 1);
    assert!(
        m.queries[0]
            .name()
            .eq_case(&Name::from_ascii(name).unwrap()),
        "question {} for {name}",
        m.queries[0].name()
    );
    assert_eq!(m.queries[0].query_type(), qtype);
}

/// An authoritative NOERROR whose answer is `want`, every record with TTL 30.
#[track_caller]
fn check_answer(m: &Message, want: &[&str]) {
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.authoritative);
    assert_eq!(lines(&m.answers), want);
    assert!(m.answers.iter().all(|r| r.ttl == TTL));
    assert!(m.authorities.is_empty());
}

/// NOERROR, no answer, the SOA of `owner` whose minimum is the TTL: the name exists without
/// records of the asked type.
#[track_caller]
fn check_no_data(m: &Message, owner: &str) {
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.authoritative);
    assert!(m.answers.is_empty(), "answers: {:?}", lines(&m.answers));
    let [soa] = &m.authorities[..] else {
        panic!("authority: {:?}", lines(&m.authorities));
    };
    assert_eq!(soa.name.to_ascii(), owner);
    match &soa.data {
        RData::SOA(s) => assert_eq!((s.minimum, soa.ttl), (TTL, TTL)),
        other => panic!("not an SOA: {other:?}"),
    }
}

#[test]
fn service_entry_hosts_answer_their_single_addresses() {
    let n = names();
    let m = ask(&n, "httpbin.org.", RecordType::A, "default");
    check_reply(&m, "httpbin.org.", RecordType::A);
    check_answer(&m, &["httpbin.org. A 198.18.0.10"]);
    assert!(m.edns.is_none(), "an OPT for a query without one");
    let m = ask(&n, "httpbin.org.", RecordType::AAAA, "default");
    check_answer(&m, &["httpbin.org. AAAA 2001:db8::10"]);
    // ANY gets both families.
    let m = ask(&n, "httpbin.org.", RecordType::ANY, "default");
    check_answer(
        &m,
        &[
            "httpbin.org. A 198.18.0.10",
            "httpbin.org. AAAA 2001:db8::10",
        ],
    );
    // Hosts are matched ignoring case, and answered in the case the client asked (resolvers
    // that randomise it check that).
    let m = ask(&n, "HttpBin.EXAMPLE.", RecordType::A, "default");
    check_reply(&m, "HttpBin.EXAMPLE.", RecordType::A);
    assert!(
        m.answers[0]
            .name
            .eq_case(&Name::from_ascii("HttpBin.EXAMPLE.").unwrap())
    );
    check_answer(&m, &["HttpBin.EXAMPLE. A 198.18.0.10"]);
    // Seen from every namespace.
    let m = ask(&n, "httpbin.org.", RecordType::A, "other");
    check_answer(&m, &["httpbin.org. A 198.18.0.10"]);
}

#[test]
fn a_registered_name_without_the_type_asked_is_no_data_never_nxdomain() {
    let n = names();
    let m = ask(&n, "v4.example.", RecordType::AAAA, "default");
    check_reply(&m, "v4.example.", RecordType::AAAA);
    check_no_data(&m, "v4.example.");
    for qtype in [
        RecordType::MX,
        RecordType::TXT,
        RecordType::HTTPS,
        RecordType::CNAME,
    ] {
        let m = ask(&n, "httpbin.org.", qtype, "default");
        check_no_data(&m, "httpbin.org.");
    }
}

#[test]
fn entries_without_single_addresses_answer_their_allocated_ones_or_are_forwarded() {
    let mut c = mesh();
    let n = Names::build(&c);
    for host in ["range.example.", "api.dns.example."] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
            assert!(matches!(
                n.handle(&query(host, qtype), "default"),
                Action::Forward
            ));
        }
    }
    let allocated: [IpAddr; 2] = ["240.240.0.7".parse().unwrap(), "2001:2::7".parse().unwrap()];
    for se in &mut c.service_entries {
        if se.name == "by-dns" || se.name == "ranges" {
            se.allocated = allocated.to_vec();
        }
    }
    let n = Names::build(&c);
    let m = ask(&n, "api.dns.example.", RecordType::A, "default");
    check_answer(&m, &["api.dns.example. A 240.240.0.7"]);
    let m = ask(&n, "range.example.", RecordType::AAAA, "default");
    check_answer(&m, &["range.example. AAAA 2001:2::7"]);
    // An entry with a single address keeps it; its range is not an answer.
    let m = ask(&n, "httpbin.org.", RecordType::A, "default");
    check_answer(&m, &["httpbin.org. A 198.18.0.10"]);
}

#[test]
fn wildcards_answer_names_below_them_the_longest_first() {
    let n = names();
    for name in ["a.wild.example.", "a.b.wild.example.", "deep.wild.example."] {
        let m = ask(&n, name, RecordType::A, "default");
        check_answer(&m, &[&format!("{name} A 198.18.1.1")]);
    }
    for name in ["x.deep.wild.example.", "exact.wild.example."] {
        let m = ask(&n, name, RecordType::A, "default");
        check_answer(&m, &[&format!("{name} A 198.18.1.2")]);
    }
    let m = ask(&n, "a.wild.example.", RecordType::AAAA, "default");
    check_no_data(&m, "a.wild.example.");
    // The wildcard's own name is not below it, and no entry claims another domain.
    for name in ["wild.example.", "example.org."] {
        assert!(matches!(
            n.handle(&query(name, RecordType::A), "default"),
            Action::Forward
        ));
    }
}

#[test]
fn entries_are_answered_where_they_are_exported() {
    let n = names();
    let m = ask(&n, "private.example.", RecordType::A, "team-a");
    check_answer(&m, &["private.example. A 198.18.2.1"]);
    for ns in ["default", ""] {
        assert!(matches!(
            n.handle(&query("private.example.", RecordType::A), ns),
            Action::Forward
        ));
    }
}

#[test]
fn service_names_in_every_form_answer_directly() {
    let n = names();
    // From anywhere: the qualified forms, which also are what the search domains
    // (`ns.svc.cluster.local`, `svc.cluster.local`, `cluster.local`) make of `db`, `db.data`
    // and `db.data.svc`.
    for ns in ["default", "data", ""] {
        for name in [
            "db.data.svc.cluster.local.",
            "db.data.svc.",
            "db.data.",
            "DB.Data.Svc.Cluster.Local.",
        ] {
            let m = ask(&n, name, RecordType::A, ns);
            check_reply(&m, name, RecordType::A);
            check_answer(&m, &[&format!("{name} A 10.96.0.10")]);
        }
    }
    // The bare name from the Service's own namespace only.
    let m = ask(&n, "db.", RecordType::A, "data");
    check_answer(&m, &["db. A 10.96.0.10"]);
    for ns in ["default", ""] {
        assert!(matches!(
            n.handle(&query("db.", RecordType::A), ns),
            Action::Forward
        ));
    }
    let m = ask(&n, "db.data.svc.cluster.local.", RecordType::AAAA, "data");
    check_no_data(&m, "db.data.svc.cluster.local.");
    // Other names in the cluster domain are the cluster's DNS's.
    for name in [
        "db.default.svc.cluster.local.",
        "db.data.cluster.local.",
        "x.db.data.svc.cluster.local.",
    ] {
        assert!(matches!(
            n.handle(&query(name, RecordType::A), "data"),
            Action::Forward
        ));
    }
}

#[test]
fn headless_services_answer_their_endpoints_and_the_clusters_own_are_forwarded() {
    let n = names();
    let m = ask(&n, "my-wikipedia.", RecordType::A, "default");
    check_answer(
        &m,
        &[
            "my-wikipedia. A 198.35.26.96",
            "my-wikipedia. A 208.80.153.224",
        ],
    );
    assert!(matches!(
        n.handle(
            &query("in-cluster.default.svc.cluster.local.", RecordType::A),
            "default"
        ),
        Action::Forward
    ));
}

#[test]
fn external_names_are_cnames_followed_within_the_registry() {
    let n = names();
    // To a ServiceEntry host.
    let m = ask(&n, "my-httpbin.", RecordType::A, "default");
    check_reply(&m, "my-httpbin.", RecordType::A);
    check_answer(
        &m,
        &[
            "my-httpbin. CNAME httpbin.org.",
            "httpbin.org. A 198.18.0.10",
        ],
    );
    // Through another ExternalName to a Service.
    let m = ask(&n, "hop.default.svc.cluster.local.", RecordType::A, "data");
    check_answer(
        &m,
        &[
            "hop.default.svc.cluster.local. CNAME my-db.default.svc.cluster.local.",
            "my-db.default.svc.cluster.local. CNAME db.data.svc.cluster.local.",
            "db.data.svc.cluster.local. A 10.96.0.10",
        ],
    );
    // A target without the type asked: the chain, then the target's SOA.
    let mut m = ask(&n, "my-db.default.", RecordType::AAAA, "default");
    let chain = std::mem::take(&mut m.answers);
    assert_eq!(
        lines(&chain),
        ["my-db.default. CNAME db.data.svc.cluster.local."]
    );
    check_no_data(&m, "db.data.svc.cluster.local.");
    // A CNAME query gets the CNAME alone.
    let m = ask(&n, "my-db.default.", RecordType::CNAME, "default");
    check_answer(&m, &["my-db.default. CNAME db.data.svc.cluster.local."]);
    // A loop stops where it comes back.
    let m = ask(&n, "loop-a.default.", RecordType::A, "default");
    check_answer(
        &m,
        &[
            "loop-a.default. CNAME loop-b.default.svc.cluster.local.",
            "loop-b.default.svc.cluster.local. CNAME loop-a.default.svc.cluster.local.",
        ],
    );
}

/// The upstream's response to `q`: its answers and authorities, with `rcode`.
fn upstream(q: &[u8], rcode: ResponseCode, answers: Vec<Record>, soa: bool) -> Vec<u8> {
    let q = Message::from_vec(q).unwrap();
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries = q.queries.clone();
    m.answers = answers;
    if soa {
        let google = Name::from_ascii("google.com.").unwrap();
        let data = SOA::new(google.clone(), google.clone(), 7, 900, 900, 1800, 60);
        m.authorities
            .push(Record::from_rdata(google, 60, RData::SOA(data)));
    }
    m.edns = q.edns.clone();
    m.to_vec().unwrap()
}

fn a(name: &str, ttl: u32, ip: &str) -> Record {
    let name = Name::from_ascii(name).unwrap();
    Record::from_rdata(name, ttl, RData::A(A(ip.parse().unwrap())))
}

#[test]
fn an_external_name_outside_the_registry_is_chased_upstream_and_spliced() {
    let n = names();
    let client = query_edns(
        "my-external.default.svc.cluster.local.",
        RecordType::A,
        4096,
    );
    let Action::Chase(chase) = n.handle(&client, "kube-system") else {
        panic!("not chased");
    };
    assert_eq!(chase.target().to_ascii(), "www.google.com.");
    let asked = chase.query(0x1111);
    let q = Message::from_vec(&asked).unwrap();
    assert_eq!(q.id, 0x1111);
    assert_eq!(q.message_type, MessageType::Query);
    assert!(q.recursion_desired);
    assert_eq!(lines_q(&q), ["www.google.com. A"]);
    assert_eq!(q.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));

    // The upstream's answer, itself through a CNAME, after the registry's.
    let records = vec![
        Record::from_rdata(
            Name::from_ascii("www.google.com.").unwrap(),
            300,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(
                Name::from_ascii("www.l.google.com.").unwrap(),
            )),
        ),
        a("www.l.google.com.", 120, "142.250.1.1"),
        a("www.l.google.com.", 120, "142.250.1.2"),
    ];
    let m =
        Message::from_vec(&chase.splice(&upstream(&asked, ResponseCode::NoError, records, false)))
            .unwrap();
    check_reply(&m, "my-external.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(
        lines(&m.answers),
        [
            "my-external.default.svc.cluster.local. CNAME www.google.com.",
            "www.google.com. CNAME www.l.google.com.",
            "www.l.google.com. A 142.250.1.1",
            "www.l.google.com. A 142.250.1.2",
        ]
    );
    let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
    assert_eq!(ttls, [TTL, 300, 120, 120]);
    assert!(!m.authoritative, "part of the answer is the upstream's");
    assert!(m.edns.is_some(), "the client's OPT is answered");

    // NXDOMAIN for the target: the CNAME, the code and the upstream's SOA.
    let m =
        Message::from_vec(&chase.splice(&upstream(&asked, ResponseCode::NXDomain, vec![], true)))
            .unwrap();
    assert_eq!(m.response_code, ResponseCode::NXDomain);
    assert_eq!(
        lines(&m.answers),
        ["my-external.default.svc.cluster.local. CNAME www.google.com."]
    );
    assert_eq!(
        lines(&m.authorities),
        ["google.com. SOA google.com. google.com. 7 900 900 1800 60"]
    );

    // REFUSED passes on, without records.
    let m =
        Message::from_vec(&chase.splice(&upstream(&asked, ResponseCode::Refused, vec![], false)))
            .unwrap();
    assert_eq!(m.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());

    // A truncated upstream response makes the client ask again over TCP.
    let mut tc =
        Message::from_vec(&upstream(&asked, ResponseCode::NoError, vec![], false)).unwrap();
    tc.metadata.truncation = true;
    let m = Message::from_vec(&chase.splice(&tc.to_vec().unwrap())).unwrap();
    assert!(m.truncation);

    // Not a response to the chase: SERVFAIL.
    let other = query("www.google.com.", RecordType::AAAA);
    for bad in [
        upstream(&other, ResponseCode::NoError, vec![], false),
        asked.clone(),
        b"\x11\x11\x81\x80garbage".to_vec(),
    ] {
        let m = Message::from_vec(&chase.splice(&bad)).unwrap();
        check_reply(&m, "my-external.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty());
    }
}

fn lines_q(m: &Message) -> Vec<String> {
    m.queries
        .iter()
        .map(|q| format!("{} {}", q.name(), q.query_type()))
        .collect()
}

#[test]
fn everything_else_is_forwarded() {
    let n = names();
    let mut chaos = query_msg("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    let mut notify = query_msg("httpbin.org.", RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    let mut edns1 = query_msg("httpbin.org.", RecordType::A);
    let mut e = Edns::new();
    e.set_version(1);
    edns1.edns = Some(e);
    let forwarded = [
        query("example.org.", RecordType::A),
        query(".", RecordType::NS),
        query("httpbin.org.example.", RecordType::A),
        chaos.to_vec().unwrap(),
        notify.to_vec().unwrap(),
        edns1.to_vec().unwrap(),
    ];
    for q in forwarded {
        let action = n.handle(&q, "default");
        assert!(matches!(action, Action::Forward), "{action:?} for {q:?}");
    }
}

#[test]
fn malformed_queries_get_formerr_and_garbage_nothing() {
    let n = names();
    let good = query("httpbin.org.", RecordType::A);
    let mut two = query_msg("httpbin.org.", RecordType::A);
    two.queries.push(Query::query(
        Name::from_ascii("v4.example.").unwrap(),
        RecordType::A,
    ));
    let mut none = query_msg("httpbin.org.", RecordType::A);
    none.queries.clear();
    for bad in [
        good[..good.len() - 1].to_vec(),
        good[..12].iter().copied().chain([0xc0]).collect(),
        two.to_vec().unwrap(),
        none.to_vec().unwrap(),
    ] {
        let Action::Refuse(bytes) = n.handle(&bad, "default") else {
            panic!("not refused: {bad:?}");
        };
        let m = Message::from_vec(&bytes).expect("FORMERR parses");
        assert_eq!(m.id, ID);
        assert_eq!(m.message_type, MessageType::Response);
        assert!(m.recursion_desired);
        assert_eq!(m.response_code, ResponseCode::FormErr);
        assert!(m.queries.is_empty() && m.answers.is_empty());
    }
    // Shorter than a header, or a response: no reply at all.
    let mut response = Message::from_vec(&good).unwrap();
    response.metadata.message_type = MessageType::Response;
    for ignored in [vec![], good[..11].to_vec(), response.to_vec().unwrap()] {
        assert!(matches!(n.handle(&ignored, "default"), Action::Ignore));
    }
}

#[test]
fn answers_carry_an_opt_when_the_query_did() {
    let n = names();
    let m = answer(n.handle(&query_edns("httpbin.org.", RecordType::A, 4096), "default"));
    let opt = m.edns.expect("an OPT");
    assert_eq!(opt.max_payload(), EDNS_PAYLOAD);
    assert_eq!(opt.version(), 0);
    assert!(opt.flags().dnssec_ok, "the DO bit is copied");
    assert_eq!(udp_limit(&query("a.example.", RecordType::A)), 512);
    assert_eq!(
        udp_limit(&query_edns("a.example.", RecordType::A, 4096)),
        4096
    );
    assert_eq!(
        udp_limit(&query_edns("a.example.", RecordType::A, 100)),
        512
    );
    assert_eq!(udp_limit(b"\x00\x01"), 512);
}

/// A registry with a host of `count` IPv4 and IPv6 addresses.
fn big_host(count: u16) -> Names {
    let mut c = MeshConfig::default();
    let mut se = mesh().service_entries.remove(0);
    se.spec.hosts = vec!["many.example".into()];
    se.addresses = (0..count)
        .flat_map(|i| {
            let [hi, lo] = i.to_be_bytes();
            let v4 = IpAddr::from([198, 18, hi, lo]);
            let v6 = IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i));
            [v4.into(), v6.into()]
        })
        .collect();
    c.service_entries.push(se);
    Names::build(&c)
}

#[test]
fn a_large_answer_is_whole_over_tcp_and_truncated_to_the_udp_clients_size() {
    let n = big_host(200);
    let plain = query("many.example.", RecordType::A);
    let Action::Answer(whole) = n.handle(&plain, "default") else {
        panic!("not answered");
    };
    let m = Message::from_vec(&whole).unwrap();
    assert_eq!(m.answers.len(), 200);
    assert!(!m.truncation);
    assert!(whole.len() > 3000);

    // Without EDNS: 512 bytes at most, TC, the question, the first answers that fit whole
    // (a client that never asks over TCP still gets addresses), nothing else.
    let cut = fit_udp(&plain, whole.clone());
    assert!(cut.len() <= 512);
    let m = Message::from_vec(&cut).expect("the truncated response parses");
    check_reply(&m, "many.example.", RecordType::A);
    assert!(m.truncation && m.authoritative);
    let first = Message::from_vec(&whole).unwrap().answers;
    assert!(m.answers.len() > 20, "{} answers", m.answers.len());
    assert_eq!(m.answers[..], first[..m.answers.len()]);
    let one_more = {
        let mut more = m.clone();
        more.answers.push(first[m.answers.len()].clone());
        more.to_vec().unwrap().len()
    };
    assert!(one_more > 512, "as many as fit");
    assert!(m.authorities.is_empty() && m.additionals.is_empty());
    assert!(m.edns.is_none());

    // With EDNS: as much as the client said; its OPT stays. (hickory stops compressing names
    // after the first hundred or so: 200 records take a little over 4096 bytes.)
    let big = query_edns("many.example.", RecordType::A, 8192);
    let Action::Answer(whole) = n.handle(&big, "default") else {
        panic!("not answered");
    };
    assert!(
        fit_udp(&big, whole.clone()) == whole,
        "it fits in 8192 bytes"
    );
    let small = query_edns("many.example.", RecordType::A, 1232);
    let cut = fit_udp(&small, whole);
    assert!(cut.len() <= 1232);
    let m = Message::from_vec(&cut).unwrap();
    assert!(m.truncation && m.answers.len() > 60);
    assert_eq!(m.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));

    // Over a DNS message's 65535 bytes even over TCP: what fits, and TC.
    let n = big_host(3000);
    let Action::Answer(capped) = n.handle(&query("many.example.", RecordType::AAAA), "default")
    else {
        panic!("not answered");
    };
    assert!(capped.len() <= 65535);
    let m = Message::from_vec(&capped).unwrap();
    check_reply(&m, "many.example.", RecordType::AAAA);
    assert!(m.truncation);
    assert!(
        (1000..3000).contains(&m.answers.len()),
        "{} answers",
        m.answers.len()
    );
}

#[test]
fn forwarded_responses_are_cut_to_a_valid_message() {
    // An upstream's large TXT answer with an OPT carrying an option and the DO bit.
    let q = query_edns("big.example.", RecordType::TXT, 1232);
    let mut r = Message::from_vec(&upstream(&q, ResponseCode::NoError, vec![], false)).unwrap();
    let txt = TXT::new(vec!["x".repeat(200); 10]);
    r.answers.push(Record::from_rdata(
        Name::from_ascii("big.example.").unwrap(),
        60,
        RData::TXT(txt),
    ));
    let mut opt = Edns::new();
    opt.set_max_payload(4096).set_dnssec_ok(true);
    opt.options_mut()
        .insert(EdnsOption::Unknown(10, vec![7; 24]));
    r.edns = Some(opt);
    let bytes = r.to_vec().unwrap();
    assert!(bytes.len() > 1232);
    let cut = fit_udp(&q, bytes.clone());
    assert!(cut.len() <= 1232);
    let m = Message::from_vec(&cut).unwrap();
    check_reply(&m, "big.example.", RecordType::TXT);
    assert!(m.truncation && m.recursion_available && m.answers.is_empty());
    let opt = m.edns.expect("the OPT is kept");
    assert_eq!(opt.max_payload(), 4096);
    assert!(opt.flags().dnssec_ok);
    assert!(opt.options().as_ref().is_empty());
    // A client that sent no OPT gets none back.
    let plain = query("big.example.", RecordType::TXT);
    let m = Message::from_vec(&fit_udp(&plain, bytes.clone())).unwrap();
    assert!(m.truncation && m.edns.is_none());
    // What fits is not touched, even when it does not parse.
    let odd = b"\x4a\x7e\x81\x80 not a message".to_vec();
    assert_eq!(fit_udp(&plain, odd.clone()), odd);
    // A large response that does not parse keeps its header and takes the client's question.
    let mut garbage = bytes[..12].to_vec();
    garbage.extend([0xff; 600]);
    let m = Message::from_vec(&fit_udp(&plain, garbage)).unwrap();
    check_reply(&m, "big.example.", RecordType::TXT);
    assert!(m.truncation);
}

#[test]
fn the_question_reads_for_the_access_log() {
    let q = query("HttpBin.ORG.", RecordType::AAAA);
    assert_eq!(
        question(&q),
        Some(("httpbin.org".to_owned(), RecordType::AAAA))
    );
    assert_eq!(
        question(&query(".", RecordType::NS)),
        Some((".".to_owned(), RecordType::NS))
    );
    assert_eq!(question(&q[..14]), None);
    assert_eq!(question(b""), None);
}

/// (netns, address, port) → until.
type Entries = std::collections::BTreeMap<(u64, IpAddr, u16), u64>;

/// The kernel's `LEARNED` map in memory.
#[derive(Clone, Default)]
struct FakeKernel(std::sync::Arc<std::sync::Mutex<Entries>>);

impl learn::Kernel for FakeKernel {
    fn set(&self, netns: u64, addr: IpAddr, port: u16, until: Option<u64>) {
        let mut m = self.0.lock().unwrap();
        match until {
            Some(u) => m.insert((netns, addr, port), u),
            None => m.remove(&(netns, addr, port)),
        };
    }
    fn sweep(&self, now: u64) -> u64 {
        let mut m = self.0.lock().unwrap();
        let before = m.len();
        m.retain(|_, u| *u > now);
        (before - m.len()) as u64
    }
}

impl FakeKernel {
    fn entries(&self) -> Vec<(u64, IpAddr, u16, u64)> {
        let m = self.0.lock().unwrap();
        m.iter().map(|((n, a, p), u)| (*n, *a, *p, *u)).collect()
    }
}

const TCP_HOSTS: &str = r#"
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: db, namespace: team-a}
spec:
  hosts: [db.example]
  ports: [{number: 5432, name: pg, protocol: TCP}, {number: 5433, name: pg2, protocol: TCP}]
  resolution: DNS
  exportTo: ["."]
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: pg, namespace: team-a}
spec:
  hosts: ["*.pg.example"]
  ports: [{number: 5432, name: pg, protocol: TCP}, {number: 5433, name: pg2, protocol: TCP}]
  resolution: DNS
  endpoints: [{address: pg.example}]
  exportTo: ["."]
---
kind: ServiceEntry
apiVersion: networking.istio.io/v1
metadata: {name: web, namespace: team-a}
spec:
  hosts: [web.example]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 5432, name: pg, protocol: TCP}]
  resolution: DNS
---
kind: Service
apiVersion: v1
metadata: {name: my-httpbin, namespace: default}
spec:
  type: ExternalName
  externalName: httpbin.org
  ports: [{port: 80, protocol: TCP}]
"#;

const SEC: u64 = 1_000_000_000;

/// The nameserver the answers come from.
const NS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 53));

fn learning_names(yaml: &str) -> Names {
    let mut c = config::parse_str("mesh.yaml", yaml).expect("valid").config;
    let mut alloc = crate::config::alloc::Allocator::load(None).learning(true);
    alloc.assign(&mut c).unwrap();
    Names::build(&c)
}

/// The upstream's answer to `name`'s A query: a CNAME chain (owner, target, ttl) then A records.
fn answered(name: &str, cnames: &[(&str, &str, u32)], addrs: &[(&str, &str, u32)]) -> Vec<u8> {
    let q = query(name, RecordType::A);
    let mut records: Vec<Record> = cnames
        .iter()
        .map(|(owner, target, ttl)| {
            let t = RData::CNAME(hickory_proto::rr::rdata::CNAME(
                Name::from_ascii(target).unwrap(),
            ));
            Record::from_rdata(Name::from_ascii(owner).unwrap(), *ttl, t)
        })
        .collect();
    records.extend(addrs.iter().map(|(owner, ip, ttl)| a(owner, *ttl, ip)));
    upstream(&q, ResponseCode::NoError, records, false)
}

#[test]
fn tcp_hosts_are_learnt_per_workload_on_their_ports_until_ttl_and_grace() {
    let names = learning_names(TCP_HOSTS);
    // A TCP-only entry by host is answered by its nameserver, not with its allocated address.
    assert!(matches!(
        names.handle(&query("db.example", RecordType::A), "team-a"),
        Action::Forward
    ));
    let kernel = FakeKernel::default();
    let learner = Learner::new(kernel.clone(), std::time::Duration::from_secs(5));
    let now = 1000 * SEC;
    let ip: IpAddr = "198.18.7.7".parse().unwrap();
    learner.observe(
        (1, "team-a"),
        &names,
        NS,
        &answered("db.example", &[], &[("db.example", "198.18.7.7", 30)]),
        now,
    );
    let until = now + 35 * SEC;
    assert_eq!(
        kernel.entries(),
        vec![(1, ip, 5432, until), (1, ip, 5433, until)]
    );
    // Another namespace does not see the entry (exportTo "."): nothing learnt.
    learner.observe(
        (2, "team-b"),
        &names,
        NS,
        &answered("db.example", &[], &[("db.example", "198.18.7.8", 30)]),
        now,
    );
    assert_eq!(kernel.entries().len(), 2);
    // Through a CNAME to a wildcard host, the least TTL of the chain counts.
    learner.observe(
        (1, "team-a"),
        &names,
        NS,
        &answered(
            "alias.example",
            &[("alias.example", "x.pg.example", 10)],
            &[("x.pg.example", "198.18.7.9", 300)],
        ),
        now,
    );
    let wild: IpAddr = "198.18.7.9".parse().unwrap();
    assert!(kernel.entries().contains(&(1, wild, 5432, now + 15 * SEC)));
    // A host of a mixed entry (HTTP too) is allocated instead, and opens nothing; nor does
    // a name no entry declares.
    learner.observe(
        (1, "team-a"),
        &names,
        NS,
        &answered(
            "other.example",
            &[],
            &[("other.example", "198.18.7.10", 30)],
        ),
        now,
    );
    assert_eq!(kernel.entries().len(), 4);
    assert_eq!(learner.counts().entries, 4);
    // The workload was answered these; a proxy may connect to them for the name.
    assert!(learner.answered(1, "db.example", ip, now));
    assert!(!learner.answered(2, "db.example", ip, now));
    // Past the TTL and grace: gone from the kernel and the books.
    learner.sweep(now + 16 * SEC, |_| true);
    assert_eq!(
        kernel.entries(),
        vec![(1, ip, 5432, until), (1, ip, 5433, until)]
    );
    learner.sweep(until, |_| true);
    assert!(kernel.entries().is_empty());
    assert!(!learner.answered(1, "db.example", ip, until));
    assert_eq!(learner.counts().expired, 4);
}

#[test]
fn learning_is_capped_per_host_and_per_address_and_follows_reloads() {
    let names = learning_names(TCP_HOSTS);
    let kernel = FakeKernel::default();
    let learner = Learner::new(kernel.clone(), std::time::Duration::ZERO);
    // S3-like churn: each answer a new address; the one refreshed longest ago goes first.
    for i in 0..(learn::MAX_PER_HOST + 10) {
        let ip = format!("198.18.{}.{}", 100 + i / 250, i % 250 + 1);
        let now = (i as u64 + 1) * SEC;
        learner.observe(
            (1, "team-a"),
            &names,
            NS,
            &answered("db.example", &[], &[("db.example", &ip, 60)]),
            now,
        );
    }
    let c = learner.counts();
    assert_eq!(c.host_cap, 10);
    assert_eq!(c.entries, 2 * learn::MAX_PER_HOST as u64);
    assert!(!learner.answered(1, "db.example", "198.18.100.1".parse().unwrap(), 0));
    // Many hosts behind one address: only the first few are recorded.
    let shared = "198.18.200.1";
    for i in 0..(learn::MAX_NAMES_PER_ADDRESS + 3) {
        let host = format!("h{i}.pg.example");
        learner.observe(
            (1, "team-a"),
            &names,
            NS,
            &answered(&host, &[], &[(&host, shared, 60)]),
            SEC,
        );
    }
    assert_eq!(learner.counts().address_cap, 3);
    // A reload that drops the entry closes what it opened; a workload that left loses its own.
    learner.retarget(&learning_names(""));
    assert!(kernel.entries().is_empty(), "{:?}", kernel.entries());
    learner.observe(
        (3, "team-a"),
        &names,
        NS,
        &answered("db.example", &[], &[("db.example", "198.18.9.9", 60)]),
        SEC,
    );
    assert_eq!(kernel.entries().len(), 2);
    learner.sweep(2 * SEC, |netns| netns != 3);
    assert!(kernel.entries().is_empty());
}

#[test]
fn external_name_targets_are_remembered_without_opening_anything() {
    let names = learning_names(TCP_HOSTS);
    let kernel = FakeKernel::default();
    let learner = Learner::new(kernel.clone(), std::time::Duration::ZERO);
    let chased = answered(
        "my-httpbin.default.svc.cluster.local",
        &[("my-httpbin.default.svc.cluster.local", "httpbin.org", 30)],
        &[("httpbin.org", "198.19.0.80", 60)],
    );
    learner.observe((1, "default"), &names, NS, &chased, SEC);
    assert!(learner.answered(1, "httpbin.org", "198.19.0.80".parse().unwrap(), 2 * SEC));
    assert!(!learner.answered(1, "httpbin.org", "198.19.0.81".parse().unwrap(), 2 * SEC));
    assert!(kernel.entries().is_empty());
}

#[test]
fn only_the_nameservers_learn_from_names_teach_anything() {
    let yaml = format!(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {{name: m}}\n\
         spec: {{dns: {{learnFrom: [198.18.0.53/32, \"2001:db8::53\"]}}}}\n---\n{TCP_HOSTS}"
    );
    let names = learning_names(&yaml);
    let kernel = FakeKernel::default();
    let learner = Learner::new(kernel.clone(), std::time::Duration::ZERO);
    let answer = answered("db.example", &[], &[("db.example", "198.18.7.7", 30)]);
    // A nameserver of the workload's own choosing (its loopback, one it runs elsewhere).
    for other in ["127.0.0.53", "198.18.0.54"] {
        learner.observe((1, "team-a"), &names, other.parse().unwrap(), &answer, SEC);
        assert!(kernel.entries().is_empty(), "learnt from {other}");
    }
    learner.observe((1, "team-a"), &names, NS, &answer, SEC);
    assert_eq!(kernel.entries().len(), 2);
    // A list that does not read is an error naming the field.
    let bad = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: m}\n\
               spec: {dns: {learnFrom: [kube-dns]}}\n";
    let e = config::parse_str("mesh.yaml", bad).unwrap_err().to_string();
    assert!(e.contains("spec.dns.learnFrom[0]"), "{e}");
    let unknown = "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: m}\n\
                   spec: {dns: {learnfrom: [10.96.0.10]}}\n";
    let e = config::parse_str("mesh.yaml", unknown)
        .unwrap_err()
        .to_string();
    assert!(e.contains("learnfrom"), "{e}");
}
