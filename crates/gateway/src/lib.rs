//! The meta-chat gateway: tenants with encrypted provider keys in SQLite or PostgreSQL,
//! managed from the command line (the HTTP API builds on the same modules).

pub mod alerts;
pub mod analytics;
pub mod api;
pub mod bootstrap;
pub mod cache;
pub mod config;
pub mod crypto;
pub mod dashboard;
pub mod limits;
pub mod metrics;
pub mod redis_conn;
pub mod routing;
pub mod server;
pub mod settings;
pub mod store;
pub mod tenant_cache;
pub mod tenants;
pub mod usage;
