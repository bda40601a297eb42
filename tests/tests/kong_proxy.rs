//! Kong's proxy and plugin behaviour replayed from Kong's specs (each case cites its
//! spec file and line).
//!
//! This run: on the direct path where it applies (the default).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Direct;

include!("suites/kong_proxy.rs");
