pub mod http;
pub mod listener;
pub mod upstream;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

pub use listener::{LISTEN_BACKLOG, PipePool, Proxy};

/// What the proxy sends on: requests to their upstream, responses to the client.
pub type OutBody = BoxBody<Bytes, hyper::Error>;
