//! `egress-cni`: a chained CNI plugin (specification 1.0; 0.3.x and 0.4.0 configurations are
//! accepted too) that enrols each pod's network namespace with the node's egress agent.
//!
//! Chain it after the pod network's own plugins in the node's `.conflist`:
//!
//! ```json
//! {"type": "egress-cni", "adminSocket": "/var/run/egress/admin.sock"}
//! ```
//!
//! - ADD enrols `CNI_NETNS` with the identity from `CNI_ARGS` (`K8S_POD_NAMESPACE`,
//!   `K8S_POD_NAME`, `K8S_POD_UID`) and the pod's nameservers from `runtimeConfig.dns.servers`
//!   (the `dns` capability, `"capabilities": {"dns": true}` in the entry: the runtime passes
//!   the pod's DNS configuration there), and prints `prevResult` unchanged once interception is in
//!   force. When the agent cannot be reached or cannot enrol the pod, ADD fails (the pod does
//!   not start unmediated).
//! - DEL releases the pod; it succeeds when the pod, its namespace or the agent is gone.
//! - CHECK fails unless the agent has the pod enrolled.

use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use egress_user::workloads::api::{self, EnrollRequest, Selector};
use serde_json::{Value, json};

const SUPPORTED: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// CNI error codes (SPEC.md, "Error"): well-known ones, and 100+ for this plugin's own.
const E_INCOMPATIBLE_VERSION: u32 = 1;
const E_INVALID_ENV: u32 = 4;
const E_DECODE: u32 = 6;
const E_INVALID_CONFIG: u32 = 7;
const E_TRY_AGAIN: u32 = 11;
const E_NOT_ENROLLED: u32 = 100;
const E_REFUSED: u32 = 101;

struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    let conf: Value = if command == "VERSION" {
        Value::Null
    } else {
        match std::io::stdin().read_to_string(&mut stdin) {
            Ok(_) => match serde_json::from_str(&stdin) {
                Ok(v) => v,
                Err(e) => {
                    return report(
                        "1.0.0",
                        fail(
                            E_DECODE,
                            "egress-cni: the network configuration on stdin is not JSON",
                            e.to_string(),
                        ),
                    );
                }
            },
            Err(e) => {
                return report(
                    "1.0.0",
                    fail(
                        E_DECODE,
                        "egress-cni: reading the network configuration",
                        e.to_string(),
                    ),
                );
            }
        }
    };
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_owned();
    match run(&command, &conf, &version) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => report(&version, f),
    }
}

/// Print a CNI error on stdout, as the specification asks, and on stderr for the node's logs.
fn report(version: &str, f: Failure) -> ExitCode {
    eprintln!("egress-cni: {}: {}", f.msg, f.details);
    println!(
        "{}",
        json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details})
    );
    ExitCode::FAILURE
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn require(name: &str) -> Result<String, Failure> {
    env(name).ok_or_else(|| {
        fail(
            E_INVALID_ENV,
            format!("egress-cni: {name} is not set"),
            "the container runtime must set it for this command",
        )
    })
}

/// `K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;...`
fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

fn run(command: &str, conf: &Value, version: &str) -> Result<Option<String>, Failure> {
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string(),
        ));
    }
    if !SUPPORTED.contains(&version) {
        return Err(fail(
            E_INCOMPATIBLE_VERSION,
            format!("egress-cni: cniVersion {version:?} is not supported"),
            format!("supported: {}", SUPPORTED.join(", ")),
        ));
    }
    let socket = match conf.get("adminSocket") {
        None => PathBuf::from(api::DEFAULT_ADMIN_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(other) => {
            return Err(fail(
                E_INVALID_CONFIG,
                "egress-cni: adminSocket must be a path",
                format!("got {other}"),
            ));
        }
    };
    let container = require("CNI_CONTAINERID")?;
    match command {
        "ADD" => add(&socket, conf, version, container).map(Some),
        "DEL" => {
            del(&socket, container);
            Ok(None)
        }
        "CHECK" => check(&socket, container).map(|()| None),
        other => Err(fail(
            E_INVALID_ENV,
            format!("egress-cni: CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION"),
            "",
        )),
    }
}

/// The pod's nameservers from `runtimeConfig.dns.servers`; none when the runtime passed no
/// DNS configuration.
fn nameservers(conf: &Value) -> Result<Vec<IpAddr>, Failure> {
    let Some(servers) = conf.pointer("/runtimeConfig/dns/servers") else {
        return Ok(Vec::new());
    };
    let invalid = |details: String| {
        fail(
            E_INVALID_CONFIG,
            "egress-cni: runtimeConfig.dns.servers must be a list of IP addresses",
            details,
        )
    };
    match servers {
        Value::Null => Ok(Vec::new()),
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| invalid(format!("servers[{i}] is {v}")))
            })
            .collect(),
        other => Err(invalid(format!("got {other}"))),
    }
}

fn add(socket: &Path, conf: &Value, version: &str, container: String) -> Result<String, Failure> {
    let netns = require("CNI_NETNS")?;
    let args = env("CNI_ARGS").unwrap_or_default();
    let nameservers = nameservers(conf)?;
    let req = EnrollRequest {
        netns: PathBuf::from(netns),
        namespace: cni_arg(&args, "K8S_POD_NAMESPACE").unwrap_or_else(|| "default".to_owned()),
        name: cni_arg(&args, "K8S_POD_NAME").unwrap_or_else(|| container.clone()),
        uid: cni_arg(&args, "K8S_POD_UID").unwrap_or_default(),
        container_id: Some(container),
        nameservers,
    };
    match api::enroll(socket, &req) {
        Ok(_) => {}
        Err(api::Error::Unreachable(e)) => {
            return Err(fail(
                E_TRY_AGAIN,
                format!(
                    "egress-cni: the egress agent is not reachable at {}: pod {}/{} is not started unmediated",
                    socket.display(),
                    req.namespace,
                    req.name
                ),
                e,
            ));
        }
        Err(api::Error::Busy(e)) => {
            return Err(fail(
                E_TRY_AGAIN,
                format!(
                    "egress-cni: the egress agent is handing over to a new one: pod {}/{} is \
                     enrolled on the next attempt",
                    req.namespace, req.name
                ),
                e,
            ));
        }
        Err(api::Error::Refused(e)) => {
            return Err(fail(
                E_REFUSED,
                format!(
                    "egress-cni: the egress agent could not enrol pod {}/{}",
                    req.namespace, req.name
                ),
                e,
            ));
        }
    }
    // A chained plugin passes the result it was given on, unchanged.
    let mut result = conf.get("prevResult").cloned().unwrap_or_else(|| json!({}));
    if let Some(o) = result.as_object_mut() {
        o.insert("cniVersion".to_owned(), Value::String(version.to_owned()));
    }
    Ok(result.to_string())
}

/// DEL never fails: the pod is going away whatever the agent says. What could not be done is
/// logged on stderr; an agent that was down drops pods whose namespace is gone when it starts.
fn del(socket: &Path, container: String) {
    // The container id names the sandbox, whatever path its namespace had (or has no more).
    let sel = Selector {
        container_id: Some(container),
        ..Selector::default()
    };
    if let Err(e) = api::unenroll(socket, &sel) {
        eprintln!("egress-cni: DEL: {e}");
    }
}

fn check(socket: &Path, container: String) -> Result<(), Failure> {
    let sel = Selector {
        container_id: Some(container.clone()),
        ..Selector::default()
    };
    match api::check(socket, &sel) {
        Ok(true) => Ok(()),
        Ok(false) => Err(fail(
            E_NOT_ENROLLED,
            format!("egress-cni: container {container} is not enrolled with the egress agent"),
            "its connections are not mediated",
        )),
        Err(e) => Err(fail(
            E_TRY_AGAIN,
            format!(
                "egress-cni: the egress agent is not reachable at {}",
                socket.display()
            ),
            e.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_read_by_key() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=";
        assert_eq!(cni_arg(args, "K8S_POD_NAMESPACE").as_deref(), Some("shop"));
        assert_eq!(cni_arg(args, "K8S_POD_NAME").as_deref(), Some("web-0"));
        // Empty and missing values are absent.
        assert_eq!(cni_arg(args, "K8S_POD_UID"), None);
        assert_eq!(cni_arg(args, "K8S_POD_INFRA_CONTAINER_ID"), None);
        assert_eq!(cni_arg("", "K8S_POD_NAME"), None);
    }

    #[test]
    fn version_and_configuration_errors_answer_as_the_specification_asks() {
        let v = run("VERSION", &Value::Null, "1.0.0")
            .ok()
            .flatten()
            .unwrap();
        let v: Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED));
        let old = run("ADD", &json!({"cniVersion": "0.2.0"}), "0.2.0")
            .err()
            .unwrap();
        assert_eq!(old.code, E_INCOMPATIBLE_VERSION);
        let bad = json!({"cniVersion": "1.0.0", "adminSocket": 7});
        let e = run("ADD", &bad, "1.0.0").err().unwrap();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (E_INVALID_CONFIG, "egress-cni: adminSocket must be a path")
        );
    }

    #[test]
    fn nameservers_come_from_the_dns_capability() {
        let conf = |dns: Value| json!({"cniVersion": "1.0.0", "runtimeConfig": {"dns": dns}});
        let got = nameservers(&conf(json!({
            "servers": ["10.96.0.10", "2001:db8::53"],
            "searches": ["default.svc.cluster.local"],
            "options": ["ndots:5"]
        })))
        .ok()
        .unwrap();
        assert_eq!(
            got,
            vec![
                IpAddr::from([10, 96, 0, 10]),
                "2001:db8::53".parse::<IpAddr>().unwrap()
            ]
        );
        // No capability, no DNS configuration, no servers: none known.
        for c in [
            json!({"cniVersion": "1.0.0"}),
            json!({"cniVersion": "1.0.0", "runtimeConfig": {}}),
            conf(json!({})),
            conf(json!({"servers": null})),
            conf(json!({"servers": []})),
        ] {
            assert_eq!(nameservers(&c).ok().unwrap(), Vec::<IpAddr>::new(), "{c}");
        }
        for (bad, details) in [
            (
                json!({"servers": ["dns.example"]}),
                "servers[0] is \"dns.example\"",
            ),
            (json!({"servers": ["10.0.0.1", 53]}), "servers[1] is 53"),
            (json!({"servers": "10.0.0.1"}), "got \"10.0.0.1\""),
        ] {
            let e = nameservers(&conf(bad)).err().unwrap();
            assert_eq!(e.code, E_INVALID_CONFIG);
            assert_eq!(
                e.msg,
                "egress-cni: runtimeConfig.dns.servers must be a list of IP addresses"
            );
            assert_eq!(e.details, details);
        }
    }
}
