//! Generated configurations of a given size, shared by the benchmark (`egress-bench`) and the
//! criterion micro-benchmarks of the configuration pipeline.

use std::fmt::Write as _;

/// `n` excluded CIDRs: /32s in 10.0.0.0/8, configuration only (no traffic goes there).
pub fn filler_cidrs(n: u32) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255))
        .collect()
}

/// A REGISTRY_ONLY configuration of `n` TCP ServiceEntries, one address each in 10.0.0.0/8 on
/// port 443; `variant` changes the first entry's port (a one-entry change).
pub fn service_entries(n: usize, variant: u32) -> String {
    let mut s = String::from(
        "apiVersion: egress/v1alpha1\nkind: EgressConfig\nmetadata: {name: bench}\nspec:\n  \
         outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  interception: {includeOutboundIPRanges: [127.59.0.0/16]}\n",
    );
    for i in 0..n as u32 {
        let port = if i == 0 { 1000 + variant } else { 443 };
        write!(
            s,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se-{i}}}\nspec:\n  \
             hosts: [se-{i}.example]\n  addresses: [10.{}.{}.{}]\n  ports: [{{number: {port}, name: tcp, protocol: TCP}}]\n",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        )
        .unwrap();
    }
    s
}

/// Istio's "Kubernetes Services for Egress Traffic": an ExternalName Service for httpbin.org,
/// with a DestinationRule that sends plain HTTP.
pub const MY_HTTPBIN: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: my-httpbin
  namespace: default
spec:
  type: ExternalName
  externalName: httpbin.org
  ports:
  - name: http
    protocol: TCP
    port: 80
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: my-httpbin
  namespace: default
spec:
  host: my-httpbin.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: DISABLE
";
