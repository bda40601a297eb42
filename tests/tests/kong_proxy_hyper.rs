//! Kong's proxy and plugin behaviour replayed from Kong's specs (each case cites its
//! spec file and line).
//!
//! This run: with every request through hyper (`--proxy-direct off`).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Hyper;

include!("suites/kong_proxy.rs");
