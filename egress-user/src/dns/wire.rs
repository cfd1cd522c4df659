//! What the sockets need from a message without answering it: the size a UDP client takes,
//! truncation to it, and the question for the access log.

use hickory_proto::{
    op::{Header, Message, Query},
    rr::RecordType,
    serialize::binary::{BinDecodable, BinDecoder},
};

use super::answer::encode;

/// What a UDP client without EDNS takes (RFC 1035 §4.2.1).
pub const UDP_MIN: usize = 512;

/// The largest response a UDP client sending `query` takes: its EDNS payload size, at least
/// [`UDP_MIN`]; `UDP_MIN` without EDNS, and for a query that does not parse.
pub fn udp_limit(query: &[u8]) -> usize {
    Message::from_vec(query)
        .ok()
        .and_then(|m| m.edns)
        .map_or(UDP_MIN, |e| usize::from(e.max_payload()).max(UDP_MIN))
}

/// `response` as a UDP client sending `query` may receive it: as it is when it fits
/// [`udp_limit`]; else its header with TC set, its question (the query's when the response
/// does not parse), as many of its answer records, whole and in order, as fit (RFC 2181 §9:
/// clients that never ask over TCP, such as older musl, still get addresses), and, when both
/// the query and the response have one, the response's OPT without options (its payload size,
/// extended response code and flags kept). Other clients ask again over TCP.
pub fn fit_udp(query: &[u8], response: Vec<u8>) -> Vec<u8> {
    let limit = udp_limit(query);
    if response.len() <= limit {
        return response;
    }
    truncated(query, &response, limit).unwrap_or(response)
}

/// `response` (longer than a header) cut to `limit` bytes as [`fit_udp`] says.
fn truncated(query: &[u8], response: &[u8], limit: usize) -> Option<Vec<u8>> {
    let asked = Message::from_vec(query).ok();
    let mut answers = Vec::new();
    let mut m = match Message::from_vec(response) {
        Ok(r) => {
            answers.clone_from(&r.answers);
            r.truncate()
        }
        Err(_) => {
            let header = Header::read(&mut BinDecoder::new(response)).ok()?;
            let mut m = Message::new(header.id, header.message_type, header.op_code);
            m.metadata = header.metadata;
            m.metadata.truncation = true;
            m
        }
    };
    m.queries.truncate(1);
    if m.queries.is_empty() {
        m.queries
            .extend(asked.as_ref().and_then(|q| q.queries.first().cloned()));
    }
    match (&asked, &mut m.edns) {
        (Some(q), Some(opt)) if q.edns.is_some() => opt.options_mut().as_mut().clear(),
        _ => m.edns = None,
    }
    // The most answers that fit: fewer always fit when more do.
    let with = |m: &mut Message, n: usize| {
        m.answers = answers[..n].to_vec();
        encode(m)
    };
    let (mut fits, mut over) = (0, answers.len() + 1);
    while over - fits > 1 {
        let mid = (fits + over) / 2;
        if with(&mut m, mid).len() <= limit {
            fits = mid;
        } else {
            over = mid;
        }
    }
    Some(with(&mut m, fits))
}

/// A message's first question: the name in lower case without the trailing dot (`.` for the
/// root), and the type. `None` when its header and first question do not read.
pub fn question(msg: &[u8]) -> Option<(String, RecordType)> {
    let mut d = BinDecoder::new(msg);
    let header = Header::read(&mut d).ok()?;
    if header.counts.queries == 0 {
        return None;
    }
    let q = Query::read(&mut d).ok()?;
    let name = q.name().to_lowercase().to_ascii();
    let name = match name.strip_suffix('.') {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => name,
    };
    Some((name, q.query_type()))
}
