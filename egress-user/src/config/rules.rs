//! Istio's validation rules (its `pkg/config/validation`) as pure checks over the values
//! written: each says why a value is rejected, and `load` says where. Kept apart from the
//! loader so that every resource kind applies the same rule the same way.

use std::time::Duration;

use crate::config::istio::parse_duration;

/// A DNS-1123 label as Istio checks it: letters, digits and inner dashes, 63 at most.
pub fn dns1123_label(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The first label of a wildcard domain: `*`, or a label with a `*` or `*-` in front of it.
fn wildcard_label(l: &str) -> bool {
    if l == "*" {
        return true;
    }
    let rest = l
        .strip_prefix("*-")
        .or_else(|| l.strip_prefix('*'))
        .unwrap_or(l);
    l.len() <= 63 && dns1123_label(rest)
}

fn preconditions(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name is not a host".to_owned());
    }
    if name.len() > 255 {
        return Err(format!("{name:?} is longer than 255 characters"));
    }
    Ok(())
}

/// Labels after the first: DNS-1123 each, a trailing dot allowed, a top-level domain that is
/// not all digits.
fn labels(whole: &str, domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts[parts.len() - 1];
    if !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{whole:?} is not a host name (top-level domain {tld:?} is all digits)"
        ));
    }
    for (i, l) in parts.iter().enumerate() {
        if i == parts.len() - 1 && l.is_empty() {
            break;
        }
        if !dns1123_label(l) {
            return Err(format!("{whole:?} is not a host name (label {l:?})"));
        }
    }
    Ok(())
}

/// A fully qualified name: what Istio wants of a host resolved by DNS without endpoints, of
/// an endpoint's name and of a gateway's legacy name.
pub fn fqdn(name: &str) -> Result<(), String> {
    preconditions(name)?;
    labels(name, name)
}

/// A name whose first label may be a wildcard (`*`, `*.example.com`, `*foo.example.com`):
/// the hosts of ServiceEntries, VirtualServices, DestinationRules and route destinations.
pub fn wildcard_domain(name: &str) -> Result<(), String> {
    preconditions(name)?;
    let (first, rest) = match name.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    if !wildcard_label(first) {
        return Err(format!("{name:?} is not a host name (label {first:?})"));
    }
    match rest {
        Some(r) => labels(name, r),
        None => Ok(()),
    }
}

/// A wildcard anywhere but as the whole first label (`*foo.example.com`): Istio lets it
/// through with a warning that it is not allowed, and matches nothing with it.
pub fn partial_wildcard(name: &str) -> bool {
    name.contains('*') && name != "*" && !name.starts_with("*.")
}

/// A duration as Istio takes it for timeouts: 1ms or more, to the millisecond.
pub fn duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{s:?} is negative"));
    }
    let d = parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 3s, 1.5s or 100ms"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("{s:?} is shorter than 1ms"));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?} is finer than a millisecond"));
    }
    Ok(d)
}

/// Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` policies, the `retryOn` tokens
/// Istio accepts besides HTTP status codes.
const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// An HTTP status code with a name (Go's `net/http` has a text for it): the numbers `retryOn`
/// accepts.
fn status_code(c: u16) -> bool {
    matches!(c, 100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426
        | 428 | 429 | 431 | 451 | 500..=508 | 510 | 511)
}

/// Why a `retryOn` token is rejected, if it is. Istio splits the list at commas and takes each
/// token as written: a space is part of it.
pub fn retry_on(token: &str) -> Result<(), String> {
    if RETRY_ON.contains(&token) || token.parse::<u16>().is_ok_and(status_code) {
        return Ok(());
    }
    let hint = closest(token.trim(), &RETRY_ON)
        .map_or_else(String::new, |c| format!(" (did you mean {c:?}?)"));
    Err(format!(
        "{token:?} is not a retryOn policy: one of {} or an HTTP status code{hint}",
        RETRY_ON.join(", ")
    ))
}

/// The gRPC status names an abort fault may give (Go's gRPC codes).
pub const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A percentage as Istio's `Percent` takes it: 0, or from 0.0001 to 100.
pub fn percentage(v: f64) -> Result<(), String> {
    if (0.0..=100.0).contains(&v) && (v == 0.0 || v >= 0.0001) {
        Ok(())
    } else {
        Err(format!("{v} is neither 0 nor from 0.0001 to 100"))
    }
}

/// A header a route matches on: an HTTP header name as RFC 9110 defines a token, one of the
/// pseudo-headers `:method`, `:scheme`, `:authority`, `:path` and `:status`, or a JWT claim
/// (`@request.auth.claims...`).
pub fn header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty header name".to_owned());
    }
    if name.starts_with("@request.auth.claims") {
        return Ok(());
    }
    if matches!(
        name,
        ":method" | ":scheme" | ":authority" | ":path" | ":status"
    ) {
        return Ok(());
    }
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(tchar) {
        return Err(format!("{name:?} is not a header name"));
    }
    Ok(())
}

/// A header set or added on a request: not a pseudo-header other than `:authority` (the
/// authority is checked apart).
pub fn request_header_set(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty header name".to_owned());
    }
    if name.starts_with(':') && !name.eq_ignore_ascii_case(":authority") {
        return Err(format!("{name:?}: a header cannot start with \":\""));
    }
    Ok(())
}

/// A header removed from a request, or set, added or removed on a response: neither `Host`
/// nor a pseudo-header.
pub fn header_operation(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty header name".to_owned());
    }
    if name.eq_ignore_ascii_case("host") {
        return Err(format!("{name:?}: the Host header cannot be set this way"));
    }
    if name.starts_with(':') {
        return Err(format!("{name:?}: a header cannot start with \":\""));
    }
    Ok(())
}

/// A header value as Envoy takes it: no control character but tab, and every `%` doubled or
/// opening a `%VARIABLE%` or `%VARIABLE(args)%` (args: a JSON array of strings, or a bare
/// string) that is closed.
pub fn header_value(v: &str) -> Result<(), String> {
    #[derive(Clone, Copy, PartialEq)]
    enum S {
        Literal,
        Name,
        ArrayStart,
        StringStart,
        InString,
        DelimiterOrEnd,
        ArgsEnd,
        VariableEnd,
    }
    if v.chars().any(|c| c.is_ascii_control() && c != '\t') {
        return Err(format!("{v:?} holds a control character"));
    }
    let b = v.as_bytes();
    let mut state = S::Literal;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let unexpected = |what: &str| Err(format!("{v:?}: {what} expected at byte {i}"));
        state = match state {
            S::Literal if c == b'%' => match b.get(i + 1) {
                None => return Err(format!("{v:?}: a lone % at the end (%% is a percent sign)")),
                Some(b'%') => {
                    i += 1;
                    S::Literal
                }
                Some(_) => S::Name,
            },
            S::Literal => S::Literal,
            S::Name => match c {
                b'%' => S::Literal,
                b'(' => S::ArrayStart,
                _ => S::Name,
            },
            S::ArrayStart => match c {
                b'[' => S::StringStart,
                b' ' => S::ArrayStart,
                _ => S::InString,
            },
            S::StringStart => match c {
                b'"' => S::InString,
                b' ' => S::StringStart,
                _ => return unexpected("'\"'"),
            },
            S::InString => match c {
                b'\\' if i + 1 == b.len() => {
                    return Err(format!("{v:?}: a backslash at the end"));
                }
                b'\\' => {
                    i += 1;
                    S::InString
                }
                b')' => S::VariableEnd,
                b'"' => S::DelimiterOrEnd,
                _ => S::InString,
            },
            S::DelimiterOrEnd => match c {
                b',' => S::StringStart,
                b']' => S::ArgsEnd,
                b' ' => S::DelimiterOrEnd,
                _ => return unexpected("',' or ']'"),
            },
            S::ArgsEnd => match c {
                b')' => S::VariableEnd,
                b' ' => S::ArgsEnd,
                _ => return unexpected("')'"),
            },
            S::VariableEnd => match c {
                b'%' => S::Literal,
                b' ' => S::VariableEnd,
                _ => return unexpected("'%'"),
            },
        };
        i += 1;
    }
    if state != S::Literal {
        return Err(format!("{v:?}: a %VARIABLE% is not closed"));
    }
    Ok(())
}

/// Why a VirtualService's gateway reference is rejected (`namespace/name`, `mesh`, or a
/// legacy `name.namespace...` name), and a warning for the legacy form.
pub fn gateway_name(g: &str) -> (Result<(), String>, Option<String>) {
    let Some((ns, name)) = g.split_once('/') else {
        let warning = g.split_once('.').map(|(name, rest)| {
            let ns = rest.split('.').next().unwrap_or_default();
            format!("{g:?} is the legacy form of a gateway name: write \"{ns}/{name}\"")
        });
        return (fqdn(g).map_err(|e| format!("not a gateway: {e}")), warning);
    };
    let result = if ns.is_empty() || name.is_empty() {
        Err(format!("{g:?}: a gateway is namespace/name, both given"))
    } else if !dns1123_label(ns) {
        Err(format!("{g:?}: {ns:?} is not a namespace"))
    } else if !dns1123_label(name) {
        Err(format!("{g:?}: {name:?} is not a gateway name"))
    } else {
        Ok(())
    };
    (result, None)
}

/// Why a resource's `exportTo` is rejected: `.` (its own namespace), `*` (every one), `~` (no
/// one, ServiceEntries only) or namespaces, each once, `*` and `~` alone.
pub fn export_to(namespace: &str, list: &[String], service_entry: bool) -> Vec<(usize, String)> {
    let mut errors = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, e) in list.iter().enumerate() {
        let key = if e == "." { namespace } else { e.as_str() };
        if seen.contains(&key) {
            let what = if key == e {
                format!("{e:?} is listed twice")
            } else {
                format!("\".\" and {namespace:?} are the same namespace")
            };
            errors.push((i, what));
            continue;
        }
        let valid = key == "*" || (key == "~" && service_entry) || dns1123_label(key);
        if !valid {
            let what = if key == "~" {
                "\"~\" (no one) is for ServiceEntries only".to_owned()
            } else {
                format!("{e:?} is not a namespace, \".\" or \"*\"")
            };
            errors.push((i, what));
            continue;
        }
        seen.push(key);
    }
    for alone in ["*", "~"] {
        if list.len() > 1
            && let Some(i) = list.iter().position(|e| e == alone)
        {
            errors.push((
                i,
                format!("{alone:?} cannot be listed with other namespaces"),
            ));
        }
    }
    errors
}

/// The candidate nearest to `word` by edit distance (ASCII case ignored), if a reader would
/// take it for a typo: within a third of its length.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= c.len().div_ceil(3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_name_is_offered_only_for_a_likely_typo() {
        let names = ["includeOutboundIPRanges", "excludeOutboundPorts", "mode"];
        assert_eq!(
            closest("includeoutboundipranges", &names),
            Some("includeOutboundIPRanges")
        );
        assert_eq!(
            closest("excludeOutboundPort", &names),
            Some("excludeOutboundPorts")
        );
        assert_eq!(closest("mdoe", &names), Some("mode"));
        assert_eq!(closest("captureAll", &names), None);
        assert_eq!(closest("", &names), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn labels_wildcards_and_names() {
        assert!(dns1123_label("a-1") && dns1123_label("A") && !dns1123_label("a-"));
        assert!(!dns1123_label(&"a".repeat(64)) && dns1123_label(&"a".repeat(63)));
        for ok in [
            "*",
            "*.a.example",
            "*a.example",
            "*-a.example",
            "a.example.",
        ] {
            assert!(wildcard_domain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a*.example",
            "*.*.example",
            "**.example",
            "a.example..",
            ".a.example",
        ] {
            assert!(wildcard_domain(bad).is_err(), "{bad}");
        }
        assert!(fqdn("*.a.example").is_err() && fqdn("a.example").is_ok());
        assert!(partial_wildcard("*a.example") && !partial_wildcard("*.a.example"));
        assert!(!partial_wildcard("*"));
    }

    #[test]
    fn durations_status_codes_and_header_values() {
        assert_eq!(duration("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(duration("-5s"), Err("\"-5s\" is negative".to_owned()));
        assert!(duration("999us").is_err() && duration("1001us").is_err());
        for ok in ["200", "503", "418", "gateway-error", "reset-before-request"] {
            assert!(retry_on(ok).is_ok(), "{ok}");
        }
        for bad in ["306", "0", "600", "5XX", "connect_failure"] {
            assert!(retry_on(bad).is_err(), "{bad}");
        }
        for ok in [
            "",
            "plain",
            "a\tb",
            "100%%",
            "%A%%B%",
            "%REQ(x)%",
            "%F([\"a\", \"b\"])%",
        ] {
            assert!(header_value(ok).is_ok(), "{ok}");
        }
        for bad in [
            "%",
            "a%",
            "%A",
            "%F([a])%",
            "%F([\"a\"] x)%",
            "%F(x)y%",
            "a\nb",
            "\u{7f}",
        ] {
            assert!(header_value(bad).is_err(), "{bad}");
        }
    }
}
