//! DNS for the workloads: the datapath sends their queries (UDP and TCP to port 53, whatever
//! the nameserver) to the agent's DNS sockets in their own network namespace, where `server`
//! answers them or forwards them to the nameserver the client asked.

pub mod server;
