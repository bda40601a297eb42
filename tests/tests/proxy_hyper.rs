//! The data path against a real upstream (`tollgate echo`).
//!
//! This run: with every request through hyper (`--proxy-direct off`).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Hyper;

include!("suites/proxy.rs");
