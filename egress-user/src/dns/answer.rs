//! A query → what to do with it: an answer from the registry, a forward, or a CNAME whose target
//! the upstream must resolve.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, SOA},
    },
};

use super::names::{Data, MAX_CHAIN, Names};

/// The TTL of the records the agent answers with, and of its negative answers: short, so that
/// a reload is seen soon.
pub const TTL: u32 = 30;

/// The EDNS payload size the agent announces in its answers and asks for when it chases a
/// CNAME (DNS Flag Day 2020's, which avoids IP fragmentation).
pub const EDNS_PAYLOAD: u16 = 1232;

/// What the DNS server does with a message from a client.
#[derive(Debug)]
pub enum Action {
    /// Send this response: the registry's answer.
    Answer(Vec<u8>),
    /// Send the query as it is to the nameserver the client asked, and its response back as
    /// it is (through [`fit_udp`](super::fit_udp) for a UDP client).
    Forward,
    /// The name is an alias of a name the registry does not own: ask the upstream for the
    /// target ([`Chase::query`]) and answer with [`Chase::splice`] of its response.
    Chase(Box<Chase>),
    /// Send this error response (FORMERR: a query whose header reads but whose body does not,
    /// or that has other than one question).
    Refuse(Vec<u8>),
    /// Send nothing: shorter than a header, or a response rather than a query.
    Ignore,
}

/// A CNAME chain from the registry that ends at a name only the upstream knows.
#[derive(Clone, Debug)]
pub struct Chase {
    /// The client's query.
    query: Message,
    /// From the client's name to `target`, in order.
    cnames: Vec<Record>,
    target: Name,
}

impl Chase {
    /// The name the upstream is asked for.
    pub fn target(&self) -> &Name {
        &self.target
    }

    /// The query for the target, with the client's query type, recursion desired and EDNS
    /// (payload [`EDNS_PAYLOAD`]), under message ID `id`.
    pub fn query(&self, id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.checking_disabled = self.query.checking_disabled;
        m.queries
            .push(Query::query(self.target.clone(), self.qtype()));
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.edns = Some(edns);
        encode(&m)
    }

    /// The client's answer from the upstream's response to [`Chase::query`]: the CNAME chain,
    /// then the upstream's answer records, its authority records (the SOA of a negative
    /// answer) and its response code (NOERROR or NXDOMAIN; another code is passed on without
    /// records). SERVFAIL when `upstream` is not a response to that query. Truncated when the
    /// upstream's was: the client then asks again over TCP.
    pub fn splice(&self, upstream: &[u8]) -> Vec<u8> {
        let up = match Message::from_vec(upstream) {
            Ok(up) if self.answers_chase(&up) => up,
            _ => return encode(&response(&self.query, ResponseCode::ServFail)),
        };
        let rcode = match up.response_code {
            c if c.high() != 0 => ResponseCode::ServFail,
            c => c,
        };
        let mut m = response(&self.query, rcode);
        m.metadata.truncation = up.truncation;
        if matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            m.answers = self.cnames.clone();
            m.answers.extend(up.answers);
            m.authorities = up.authorities;
        }
        encode(&m)
    }

    fn qtype(&self) -> RecordType {
        self.query.queries[0].query_type()
    }

    fn answers_chase(&self, up: &Message) -> bool {
        up.message_type == MessageType::Response
            && matches!(&up.queries[..], [q] if q.name() == &self.target
                && q.query_type() == self.qtype()
                && q.query_class() == DNSClass::IN)
    }
}

impl Names {
    /// What to do with `query`, a message from a client in Kubernetes namespace `namespace`
    /// (empty for a workload outside Kubernetes: it sees only what every namespace sees).
    ///
    /// A standard query (class IN, EDNS version 0 or none) for a name the registry owns is
    /// answered authoritatively: its A or AAAA records (both for ANY), or NOERROR with no
    /// answer and an SOA in the authority section when it has none of the asked type (never
    /// NXDOMAIN). An alias is a CNAME followed within the registry: the target's records are
    /// in the same answer, or, for a target the registry does not own, [`Action::Chase`].
    /// Anything else is forwarded untouched.
    pub fn handle(&self, query: &[u8], namespace: &str) -> Action {
        let Some(header) = query.first_chunk::<12>() else {
            return Action::Ignore;
        };
        if header[2] & 0x80 != 0 {
            return Action::Ignore;
        }
        if header[2] & 0x78 != 0 {
            // Not a standard query (NOTIFY, UPDATE, ...): the upstream's business.
            return Action::Forward;
        }
        let msg = match Message::from_vec(query) {
            Ok(m) if m.queries.len() == 1 => m,
            _ => return Action::Refuse(formerr(header)),
        };
        if msg.edns.as_ref().is_some_and(|e| e.version() != 0) {
            return Action::Forward;
        }
        let q = &msg.queries[0];
        if q.query_class() != DNSClass::IN {
            return Action::Forward;
        }
        let Some(key) = host_key(q.name()) else {
            return Action::Forward;
        };
        let Some((key, mut data)) = self.lookup(&key, namespace, true) else {
            return Action::Forward;
        };
        let qtype = q.query_type();
        let mut owner = q.name().clone();
        // The names the chain has reached, as registered.
        let mut seen = vec![key];
        let mut answers = Vec::new();
        loop {
            match data {
                Data::Addrs(addrs) => {
                    let found = address_records(&owner, &addrs, qtype);
                    let no_data = found.is_empty().then(|| soa(owner));
                    answers.extend(found);
                    return Action::Answer(authoritative(&msg, answers, no_data));
                }
                Data::Alias(target) => {
                    let cname = RData::CNAME(CNAME(target.clone()));
                    answers.push(Record::from_rdata(owner, TTL, cname));
                    // A CNAME query gets the CNAME alone; a loop or a long chain stops.
                    let go_on = qtype != RecordType::CNAME && answers.len() < MAX_CHAIN;
                    let next = host_key(&target).filter(|k| go_on && !seen.contains(k));
                    let Some(next) = next else {
                        return Action::Answer(authoritative(&msg, answers, None));
                    };
                    let Some((key, d)) = self.lookup(&next, namespace, false) else {
                        return Action::Chase(Box::new(Chase {
                            query: msg,
                            cnames: answers,
                            target,
                        }));
                    };
                    seen.push(key);
                    owner = target;
                    data = d;
                }
            }
        }
    }
}

/// The registry's answer to `query`: NOERROR, authoritative, `answers`, and `authority` (the
/// SOA of an answer without the type asked).
fn authoritative(query: &Message, answers: Vec<Record>, authority: Option<Record>) -> Vec<u8> {
    let mut m = response(query, ResponseCode::NoError);
    m.metadata.authoritative = true;
    m.answers = answers;
    m.authorities.extend(authority);
    encode(&m)
}

/// A name as the registry keys it: lower case, labels of letters, digits, `-` and `_`, joined
/// by dots, without the root's; `None` for the root and for names with other bytes.
fn host_key(name: &Name) -> Option<String> {
    let mut key = String::new();
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return None;
        }
        if !key.is_empty() {
            key.push('.');
        }
        key.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
    }
    (!key.is_empty()).then_some(key)
}

/// `owner`'s records of type `qtype` among `addrs` (A, AAAA, or both for ANY).
fn address_records(owner: &Name, addrs: &[IpAddr], qtype: RecordType) -> Vec<Record> {
    addrs
        .iter()
        .filter_map(|a| match (a, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|d| Record::from_rdata(owner.clone(), TTL, d))
        .collect()
}

/// The SOA of a negative answer for `owner`, whose minimum (how long the absence is cached) is
/// [`TTL`]. The server names are under `.invalid`: no one is to ask them.
fn soa(owner: Name) -> Record {
    let server = |n: &str| Name::from_ascii(n).expect("a valid name");
    let data = SOA::new(
        server("egress.invalid."),
        server("hostmaster.egress.invalid."),
        1,
        TTL as i32,
        TTL as i32,
        TTL as i32,
        TTL,
    );
    Record::from_rdata(owner, TTL, RData::SOA(data))
}

/// The response to `query` with `rcode` and no records: its ID, question, RD and CD, recursion
/// available, and an OPT (payload [`EDNS_PAYLOAD`], the query's DO bit) when the query had one.
fn response(query: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::response(query.id, OpCode::Query);
    m.metadata.recursion_desired = query.recursion_desired;
    m.metadata.checking_disabled = query.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries = query.queries.clone();
    if let Some(asked) = &query.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_dnssec_ok(asked.flags().dnssec_ok);
        m.edns = Some(edns);
    }
    m
}

/// `m` in wire format; records past the 65535 bytes of a DNS message are left out, with TC set
/// (hickory's encoder does that), and a message that does not encode at all is SERVFAIL.
pub(super) fn encode(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap_or_else(|_| {
        let flags = 0x80 | (u8::from(m.op_code) << 3 & 0x78) | u8::from(m.recursion_desired);
        header_only(m.id, flags, ResponseCode::ServFail.low())
    })
}

/// SERVFAIL for `query`, which was forwarded and got no response (the nameserver refused it,
/// or did not answer in time): its ID, question, RD and CD, and an OPT when it had one; a
/// header alone when it does not parse. The client tries its next nameserver at once rather
/// than waiting out its timeout.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.first_chunk::<12>()?;
    Some(match Message::from_vec(query) {
        Ok(q) => encode(&response(&q, ResponseCode::ServFail)),
        Err(_) => header_only(
            u16::from_be_bytes([header[0], header[1]]),
            0x80 | (header[2] & 0x79),
            ResponseCode::ServFail.low(),
        ),
    })
}

/// FORMERR for a query whose header reads: its ID, opcode and RD, no records.
fn formerr(header: &[u8; 12]) -> Vec<u8> {
    let rcode = ResponseCode::FormErr.low();
    header_only(
        u16::from_be_bytes([header[0], header[1]]),
        0x80 | (header[2] & 0x79),
        rcode,
    )
}

/// A message of a header alone, with flags byte `flags` and recursion available.
fn header_only(id: u16, flags: u8, rcode: u8) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend([flags, 0x80 | rcode]);
    out.extend([0; 8]);
    out
}
