//! Plugins against Kong's documented behaviour: status codes, headers, bodies, and
//! which instance runs when several scopes configure the same plugin.
//!
//! This run: with every request through hyper (`--proxy-direct off`).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Hyper;

include!("suites/plugins.rs");
include!("suites/plugins_signed.rs");
