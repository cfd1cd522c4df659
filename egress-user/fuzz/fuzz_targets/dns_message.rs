//! `Names::handle`, `Chase`, `fit_udp` and `question` on arbitrary bytes, and on well-formed
//! queries for the names of a small registry built from them.
//!
//! Besides never panicking:
//! - nothing is sent back for fewer bytes than a header or for a response;
//! - an answer parses as a response with the query's ID, opcode, RD and question, NOERROR,
//!   authoritative, within 65535 bytes; its records are CNAMEs and records of the asked type
//!   (A and AAAA for ANY); an answer that ends without one of those has the SOA of a name
//!   without that type;
//! - a refusal is a FORMERR with the query's ID;
//! - a chase asks for its target with the asked type, and its splice of any bytes parses as a
//!   response with the client's ID and question;
//! - `fit_udp` never returns more than the client's size, and what it cuts parses, with TC,
//!   the response's ID and its first answers, whole;
//! - `question` reads the question of every query that is answered.

#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::LazyLock,
};

use egress_user::{
    config::{MeshConfig, ServiceEntry, ServiceEntrySpec, k8s},
    dns::{Action, Names, fit_udp, question, udp_limit},
};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ns = NAMESPACES[data.first().map_or(0, |&b| b as usize) % NAMESPACES.len()];
    check(data, ns, data);
    if let Some(q) = built_query(data) {
        check(&q, ns, data);
    }
});

const NAMESPACES: [&str; 3] = ["default", "data", ""];

/// The registry: hosts with and without IPv6, a wildcard with allocated addresses, a host of
/// 60 addresses, a Service, and ExternalNames to a host, to a name outside, and in a loop.
static NAMES: LazyLock<Names> = LazyLock::new(|| {
    let entry = |host: &str, addrs: Vec<IpAddr>, allocated: Vec<IpAddr>| ServiceEntry {
        namespace: "default".into(),
        name: host.into(),
        spec: ServiceEntrySpec {
            hosts: vec![host.into()],
            ..Default::default()
        },
        addresses: addrs.into_iter().map(Into::into).collect(),
        allocated,
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let service = |ns: &str, name: &str, spec: k8s::ServiceSpec, ips: Vec<IpAddr>| k8s::Service {
        namespace: ns.into(),
        name: name.into(),
        spec,
        cluster_ips: ips,
    };
    let external = |target: &str| k8s::ServiceSpec {
        type_: Some("ExternalName".into()),
        external_name: Some(target.into()),
        ..Default::default()
    };
    let many = (0..60u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 9, i)))
        .collect();
    let config = MeshConfig {
        service_entries: vec![
            entry(
                "a.example",
                vec![ip("198.18.0.1"), ip("2001:db8::1")],
                vec![],
            ),
            entry("v4.example", vec![ip("198.18.0.2")], vec![]),
            entry("*.wild.example", vec![], vec![ip("240.240.0.1")]),
            entry("big.example", many, vec![]),
        ],
        services: vec![
            service("data", "db", Default::default(), vec![ip("10.96.0.10")]),
            service("default", "ext", external("a.example"), vec![]),
            service("default", "out", external("outside.example"), vec![]),
            service(
                "default",
                "loop",
                external("loop.default.svc.cluster.local"),
                vec![],
            ),
        ],
        ..Default::default()
    };
    Names::build(&config)
});

/// A query for a registry name (or one made of `data`'s bytes), with a type, RD, and maybe an
/// OPT, all chosen by `data`.
fn built_query(data: &[u8]) -> Option<Vec<u8>> {
    const NAMES: [&str; 13] = [
        "a.example.",
        "A.Example.",
        "v4.example.",
        "x.y.wild.example.",
        "big.example.",
        "db.",
        "db.data.",
        "db.data.svc.",
        "DB.data.svc.cluster.local.",
        "ext.",
        "out.default.svc.cluster.local.",
        "loop.default.",
        "outside.example.",
    ];
    const TYPES: [RecordType; 7] = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::CNAME,
        RecordType::TXT,
        RecordType::ANY,
        RecordType::SOA,
        RecordType::MX,
    ];
    let [a, b, c, d, e, rest @ ..] = data else {
        return None;
    };
    let made: String = rest
        .iter()
        .take(60)
        .map(|&x| b"abcdefghijklmnopqrstuvwxyz0123456789.-_"[x as usize % 39] as char)
        .collect();
    let name = match *a as usize % (NAMES.len() + 1) {
        i if i < NAMES.len() => Name::from_ascii(NAMES[i]),
        _ => Name::from_ascii(&made),
    }
    .ok()?;
    let mut m = Message::new(
        u16::from_be_bytes([*b, *c]),
        MessageType::Query,
        OpCode::Query,
    );
    m.metadata.recursion_desired = d & 1 != 0;
    m.queries
        .push(Query::query(name, TYPES[*d as usize % TYPES.len()]));
    if e & 1 != 0 {
        let mut edns = Edns::new();
        edns.set_max_payload(u16::from(*e) << 5);
        m.edns = Some(edns);
    }
    m.to_vec().ok()
}

fn check(query: &[u8], ns: &str, data: &[u8]) {
    let limit = udp_limit(query);
    assert!(limit >= 512);
    check_fit(query, data.to_vec(), limit);
    match NAMES.handle(query, ns) {
        Action::Ignore => assert!(
            query.len() < 12 || query[2] & 0x80 != 0,
            "nothing for a query with a header"
        ),
        Action::Forward => {}
        Action::Refuse(bytes) => {
            let m = Message::from_vec(&bytes).expect("a FORMERR parses");
            assert_eq!(m.id, id(query));
            assert_eq!(m.response_code, ResponseCode::FormErr);
            check_fit(query, bytes, limit);
        }
        Action::Answer(bytes) => {
            check_answer(query, &bytes);
            check_fit(query, bytes, limit);
        }
        Action::Chase(chase) => {
            let asked = Message::from_vec(query).expect("a chased query parses");
            let up_id = id(data);
            let up = Message::from_vec(&chase.query(up_id)).expect("the chase's query parses");
            assert_eq!(up.id, up_id);
            assert_eq!(up.queries.len(), 1);
            assert_eq!(up.queries[0].name(), chase.target());
            assert_eq!(up.queries[0].query_type(), asked.queries[0].query_type());
            // Any bytes as the upstream's response, and a well-formed empty one.
            let mut empty = up.clone();
            empty.metadata.message_type = MessageType::Response;
            for upstream in [data.to_vec(), empty.to_vec().unwrap()] {
                let spliced = chase.splice(&upstream);
                let m = Message::from_vec(&spliced).expect("a splice parses");
                assert_eq!(m.id, asked.id);
                assert_eq!(m.message_type, MessageType::Response);
                assert_eq!(m.queries, asked.queries);
                check_fit(query, spliced, limit);
            }
        }
    }
}

fn check_answer(query: &[u8], bytes: &[u8]) {
    let q = Message::from_vec(query).expect("an answered query parses");
    let m = Message::from_vec(bytes).expect("an answer parses");
    assert!(bytes.len() <= 65535);
    assert_eq!(m.id, q.id);
    assert_eq!(m.message_type, MessageType::Response);
    assert_eq!(m.op_code, OpCode::Query);
    assert_eq!(m.recursion_desired, q.recursion_desired);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.authoritative);
    assert_eq!(m.queries, q.queries, "the question is echoed");
    assert!(
        m.queries[0].name().eq_case(q.queries[0].name()),
        "the question's case is kept"
    );
    let qtype = q.queries[0].query_type();
    let wanted = |t: RecordType| {
        t == qtype || (qtype == RecordType::ANY && matches!(t, RecordType::A | RecordType::AAAA))
    };
    assert!(
        m.answers
            .iter()
            .all(|r| r.record_type() == RecordType::CNAME || wanted(r.record_type())),
        "records of another type in the answer"
    );
    let found = m.answers.iter().any(|r| wanted(r.record_type()));
    let soa = m
        .authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA);
    let chain_only = m
        .answers
        .last()
        .is_some_and(|r| r.record_type() == RecordType::CNAME);
    assert!(
        found || soa || chain_only || m.truncation,
        "an empty answer without an SOA"
    );
    assert!(!(found && soa), "an SOA with the answer");
    let (name, t) = question(query).expect("the question of an answered query reads");
    assert_eq!(t, qtype);
    assert_eq!(
        name,
        q.queries[0]
            .name()
            .to_lowercase()
            .to_ascii()
            .trim_end_matches('.')
    );
}

fn check_fit(query: &[u8], response: Vec<u8>, limit: usize) {
    let out = fit_udp(query, response.clone());
    assert!(
        out.len() <= limit,
        "{} bytes for a limit of {limit}",
        out.len()
    );
    if out != response {
        let m = Message::from_vec(&out).expect("a truncated response parses");
        assert!(m.truncation, "cut without TC");
        assert_eq!(m.id, id(&response));
        assert!(m.authorities.is_empty() && m.additionals.is_empty());
        // What is kept of the answers is the response's first ones, whole.
        match Message::from_vec(&response) {
            Ok(r) => assert_eq!(m.answers[..], r.answers[..m.answers.len()]),
            Err(_) => assert!(m.answers.is_empty()),
        }
    }
}

/// The ID of a message of at least two bytes (0 otherwise).
fn id(msg: &[u8]) -> u16 {
    msg.first_chunk::<2>().map_or(0, |b| u16::from_be_bytes(*b))
}
