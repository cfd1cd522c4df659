//! DNS for the workloads: the datapath sends their queries (UDP and TCP to port 53, whatever
//! the nameserver) to the agent's DNS sockets in their own network namespace, where `server`
//! answers them or forwards them to the nameserver the client asked. What to answer is decided
//! on the messages alone, without sockets:
//!
//! [`Names`] holds the names the mesh configuration gives: ServiceEntry hosts and Kubernetes
//! Service names (see there for which addresses each one has). [`Names::handle`] reads a
//! client's query and says what to do ([`Action`]):
//!
//! - a name the registry owns is answered at once, authoritatively, with TTL [`TTL`]: its A or
//!   AAAA records; NOERROR with no answer and an SOA when it has none of the asked type (never
//!   NXDOMAIN, which clients take for the name's absence in every type); an ExternalName
//!   Service's name as a CNAME followed within the registry, so that the client gets addresses
//!   in one answer;
//! - an ExternalName whose target the registry does not own is [`Action::Chase`]: the server
//!   asks the upstream for the target ([`Chase::query`]) and answers the client with
//!   [`Chase::splice`] of the upstream's response, CNAME and addresses together;
//! - every other query is forwarded as it arrived (ID, flags, EDNS and all sections; messages
//!   that are forwarded are never decoded and encoded again), and so is the upstream's
//!   response; when the nameserver refuses it or does not answer, the client gets
//!   [`servfail`] and tries its next nameserver at once;
//! - a query whose header reads but whose body does not is refused with FORMERR; shorter than a
//!   header, or a response, it gets nothing.
//!
//! The answers the agent forwards or chases teach the workload the addresses of TCP
//! ServiceEntry hosts ([`Learner`]): the kernel lets it connect to those straight out.
//!
//! A response for a UDP client, answered or forwarded, goes through [`fit_udp`]: at most the
//! payload size of the query's EDNS, 512 bytes without EDNS; a longer one becomes its header
//! with TC set, its question and its OPT, and the client asks again over TCP, where messages
//! go whole. [`question`] reads a message's question for the access log.
//!
//! [`Names`]: crate::dns::Names
//! [`Names::handle`]: crate::dns::Names::handle
//! [`Action`]: crate::dns::Action
//! [`Action::Chase`]: crate::dns::Action::Chase
//! [`Chase::query`]: crate::dns::Chase::query
//! [`Chase::splice`]: crate::dns::Chase::splice
//! [`TTL`]: crate::dns::TTL
//! [`fit_udp`]: crate::dns::fit_udp
//! [`question`]: crate::dns::question
//! [`servfail`]: crate::dns::servfail
//! [`Learner`]: crate::dns::Learner

mod answer;
pub mod learn;
mod names;
pub mod server;
mod wire;

pub use answer::{Action, Chase, EDNS_PAYLOAD, TTL, servfail};
pub use learn::Learner;
pub use names::{CLUSTER_DOMAIN, Names};
pub use wire::{UDP_MIN, fit_udp, question, udp_limit};

#[cfg(test)]
mod tests;
