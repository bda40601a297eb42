//! `tollgate certs init`: a CA and node certificates for the cluster port, for people
//! without a PKI of their own.
//!
//! Writes into `--out`: `ca.pem` and `ca-key.pem` (the CA), and for each node id
//! `node-<id>.pem` and `node-<id>-key.pem`. A node certificate names
//! `node-<id>.tollgate` (the identity the cluster port checks, see
//! `cluster::tls`) and each of `--hosts` (for tools that check host names), and may
//! be used as a server and as a client. When `--out` already holds the CA, it signs
//! the new node certificates, so nodes can be added later (`--nodes 4`) to a running
//! cluster. Keys are written readable by their owner only; an existing node file is
//! never overwritten.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::cluster::tls::node_name;
use crate::NodeId;

/// The CA's name: node certificates name it as their issuer.
const CA_NAME: &str = "Tollgate cluster CA";
/// Years a CA and a node certificate are valid.
const CA_VALID_YEARS: i32 = 10;
const NODE_VALID_YEARS: i32 = 3;
/// Most node certificates one call makes.
pub const NODES_MAX: usize = 1024;

/// The current year (UTC), for validity periods.
fn current_year() -> i32 {
    let seconds = crate::clock::wall().as_secs();
    // Days to a civil date (Howard Hinnant's algorithm), enough for the year.
    let days = (seconds / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let year = year_of_era + era * 400 + i64::from(month_index >= 10);
    year as i32
}

fn ca_params(year: i32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + CA_VALID_YEARS, 1, 1);
    params
}

/// Writes `contents` to `path`, readable by everyone (`public`) or by the owner only.
fn write(path: &Path, contents: &str, public: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if public { 0o644 } else { 0o600 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {} (an existing file is never overwritten)", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Makes (or reuses) the CA in `out` and a certificate for each of `nodes`; returns
/// the files written.
pub fn init(out: &Path, nodes: &[NodeId], hosts: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(!nodes.is_empty(), "--nodes: name at least one node id (1,2,3)");
    anyhow::ensure!(nodes.len() <= NODES_MAX, "--nodes: at most {NODES_MAX} at once");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let year = current_year();
    let mut written = Vec::new();
    let (ca_cert_path, ca_key_path) = (out.join("ca.pem"), out.join("ca-key.pem"));
    let ca_key = if ca_cert_path.exists() && ca_key_path.exists() {
        let pem =
            std::fs::read_to_string(&ca_key_path).with_context(|| format!("reading {}", ca_key_path.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("{}: not a usable key", ca_key_path.display()))?
    } else {
        let key = KeyPair::generate().context("generating the CA key")?;
        let certificate = ca_params(year).self_signed(&key).context("making the CA certificate")?;
        write(&ca_cert_path, &certificate.pem(), true)?;
        write(&ca_key_path, &key.serialize_pem(), false)?;
        written.extend([ca_cert_path, ca_key_path]);
        key
    };
    let issuer = Issuer::new(ca_params(year), ca_key);
    for &id in nodes {
        let key = KeyPair::generate().context("generating a node key")?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("tollgate node {id}"));
        params.distinguished_name = name;
        let mut names = vec![SanType::DnsName(node_name(id).try_into().context("node name")?)];
        for host in hosts {
            names.push(match host.parse::<IpAddr>() {
                Ok(address) => SanType::IpAddress(address),
                Err(_) => SanType::DnsName(host.clone().try_into().with_context(|| format!("--hosts: {host}"))?),
            });
        }
        params.subject_alt_names = names;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = rcgen::date_time_ymd(year, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + NODE_VALID_YEARS, 1, 1);
        let certificate = params.signed_by(&key, &issuer).context("signing a node certificate")?;
        let (cert_path, key_path) = (out.join(format!("node-{id}.pem")), out.join(format!("node-{id}-key.pem")));
        write(&cert_path, &certificate.pem(), true)?;
        write(&key_path, &key.serialize_pem(), false)?;
        written.extend([cert_path, key_path]);
    }
    Ok(written)
}

/// Parses `1,2,3`.
pub fn parse_nodes(text: &str) -> anyhow::Result<Vec<NodeId>> {
    let mut ids = Vec::new();
    for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
        let id: NodeId = part.parse().with_context(|| format!("--nodes: '{part}' is not a node id"))?;
        anyhow::ensure!(!ids.contains(&id), "--nodes: node id {id} appears twice");
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tls::{ClusterTls, TlsFiles};

    #[test]
    fn a_ca_and_node_certificates_load_and_name_their_nodes() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[1, 2], &["10.0.0.1".into(), "node1.example".into()]).unwrap();
        // A later call reuses the CA for a new node, and never overwrites.
        let added = init(dir.path(), &[3], &[]).unwrap();
        assert_eq!(added.len(), 2, "only node 3's files: {added:?}");
        assert!(init(dir.path(), &[3], &[]).is_err(), "node 3's files exist");
        let files = |id: u64| TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join(format!("node-{id}.pem")),
            key: dir.path().join(format!("node-{id}-key.pem")),
        };
        for id in [1, 2, 3] {
            ClusterTls::load(id, files(id)).unwrap();
        }
        // Node 2's files do not make node 1.
        let error = ClusterTls::load(1, files(2)).unwrap_err().to_string();
        assert!(error.contains("does not name this node"), "{error}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node-1-key.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(parse_nodes("1, 2,3").unwrap(), [1, 2, 3]);
        assert!(parse_nodes("1,1").is_err() && parse_nodes("x").is_err());
    }

    #[test]
    fn changed_certificate_files_are_loaded_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[1], &[]).unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("node-1.pem"),
            key: dir.path().join("node-1-key.pem"),
        };
        let tls = ClusterTls::load(1, files.clone()).unwrap();
        assert!(!tls.reload_if_changed(), "nothing changed yet");
        let before = tls.client_config();
        // A new CA and certificate in place of the old (a rotation).
        let other = tempfile::tempdir().unwrap();
        init(other.path(), &[1], &[]).unwrap();
        for name in ["ca.pem", "node-1.pem", "node-1-key.pem"] {
            std::fs::copy(other.path().join(name), dir.path().join(name)).unwrap();
        }
        assert!(tls.reload_if_changed(), "the new files are loaded");
        assert!(!std::sync::Arc::ptr_eq(&before, &tls.client_config()));
        // Files that do not load (a key of another node) leave the current ones.
        std::fs::copy(dir.path().join("ca.pem"), dir.path().join("node-1-key.pem")).unwrap();
        let current = tls.client_config();
        assert!(!tls.reload_if_changed());
        assert!(std::sync::Arc::ptr_eq(&current, &tls.client_config()));
    }

    #[test]
    fn the_year_is_now() {
        let year = current_year();
        assert!((2024..2200).contains(&year), "{year}");
    }
}
