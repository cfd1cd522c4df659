pub mod accesslog;
pub mod admin;
pub mod direct;
pub mod health;
pub mod metrics;
