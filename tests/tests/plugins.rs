//! Plugins against Kong's documented behaviour: status codes, headers, bodies, and
//! which instance runs when several scopes configure the same plugin.
//!
//! This run: on the direct path where it applies (the default).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Direct;

include!("suites/plugins.rs");
include!("suites/plugins_signed.rs");
