//! The data path against a real upstream (`tollgate echo`).
//!
//! This run: on the direct path where it applies (the default).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Direct;

include!("suites/proxy.rs");
