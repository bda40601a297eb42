//! The simulator's side of the node's environment seam: turmoil's simulated network
//! for listeners, dials and datagrams, ids drawn from the run's seed, the wall clock
//! read from simulated time (shifted by the offset the seed gave the host reading it),
//! and every node's database on a [`SimDisk`] of its own.
//!
//! Installed once per process ([`install`]), before the first run; each run then
//! reseeds what is per run ([`begin_run`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tollgate_node::env::{BoxFuture, Datagrams, Environment, Io, Listen};

use crate::disk::SimDisk;

/// Where simulated wall-clock time starts: 2026-01-01T00:00:00Z, so every run of a
/// seed sees the same dates.
pub const EPOCH: Duration = Duration::from_secs(1_767_225_600);

thread_local! {
    /// Ids and keys the nodes draw, from the run's seed.
    static RANDOM: RefCell<StdRng> = RefCell::new(StdRng::seed_from_u64(0));
    /// Each node's disk, by data directory; kept across the node's crashes.
    static DISKS: RefCell<BTreeMap<PathBuf, SimDisk>> = const { RefCell::new(BTreeMap::new()) };
    /// The node each booted host runs, by the id of the tokio runtime turmoil runs it
    /// on (a new one at every boot). Only looked up, never iterated, so the map's
    /// order cannot reach the trace.
    static RUNTIMES: RefCell<HashMap<tokio::runtime::Id, u64>> = RefCell::new(HashMap::new());
    /// Each node's wall-clock offset from simulated time, in milliseconds: set at the
    /// start, and changed by a clock jump.
    static OFFSETS: RefCell<BTreeMap<u64, i64>> = const { RefCell::new(BTreeMap::new()) };
}

/// Installs the simulator's environment, clock and storage for this process (once;
/// later calls do nothing).
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // Each fails only if something else installed first, which nothing in this
        // crate does.
        let _ = tollgate_node::env::install(Box::new(Simulated));
        let _ = tollgate_node::clock::install_wall_clock(wall_clock);
        let _ = tollgate_raft_store::store::install_storage(tollgate_raft_store::store::StorageSeam { open });
    });
}

/// Starts a run: the ids follow `seed`, the elections too, and every disk is new.
pub fn begin_run(seed: u64) {
    RANDOM.with(|random| *random.borrow_mut() = StdRng::seed_from_u64(seed ^ 0x1d5_u64));
    tollgate_raft_store::runtime::seed_elections(Some(seed ^ 0xe1ec7));
    DISKS.with(|disks| disks.borrow_mut().clear());
    OFFSETS.with(|offsets| offsets.borrow_mut().clear());
    RUNTIMES.with(|runtimes| runtimes.borrow_mut().clear());
}

/// Says that the host booting on the current runtime is `node`, whose wall clock
/// runs at the node's offset ([`set_clock_offset`]); called first thing in a node's
/// host, at every boot. turmoil runs every host on this one thread, so the host a
/// clock read comes from is told by the runtime it runs on.
pub fn set_clock_node(node: u64) {
    let runtime = tokio::runtime::Handle::current().id();
    RUNTIMES.with(|runtimes| runtimes.borrow_mut().insert(runtime, node));
}

/// Sets `node`'s wall clock `offset_ms` off simulated time, from its next read on
/// (a clock jump when the node runs).
pub fn set_clock_offset(node: u64, offset_ms: i64) {
    OFFSETS.with(|offsets| offsets.borrow_mut().insert(node, offset_ms));
}

/// The disk of the node whose data directory is `data_dir`.
pub fn disk(data_dir: &Path) -> SimDisk {
    DISKS.with(|disks| disks.borrow_mut().entry(data_dir.to_path_buf()).or_default().clone())
}

fn open(data_dir: &Path) -> Result<redb::Database, redb::Error> {
    Ok(redb::Database::builder().create_with_backend(disk(data_dir).backend())?)
}

fn wall_clock() -> Duration {
    let offset_ms = tokio::runtime::Handle::try_current()
        .ok()
        .and_then(|runtime| RUNTIMES.with(|runtimes| runtimes.borrow().get(&runtime.id()).copied()))
        .and_then(|node| OFFSETS.with(|offsets| offsets.borrow().get(&node).copied()))
        .unwrap_or(0);
    let now = EPOCH + turmoil::sim_elapsed().unwrap_or_default();
    if offset_ms >= 0 {
        now + Duration::from_millis(offset_ms as u64)
    } else {
        now.saturating_sub(Duration::from_millis(offset_ms.unsigned_abs()))
    }
}

struct Simulated;

impl Environment for Simulated {
    fn bind(&self, address: SocketAddr) -> BoxFuture<io::Result<Box<dyn Listen>>> {
        Box::pin(async move {
            let listener = turmoil::net::TcpListener::bind(address).await?;
            Ok(Box::new(SimListener(Arc::new(listener))) as Box<dyn Listen>)
        })
    }

    fn connect(&self, address: String) -> BoxFuture<io::Result<Box<dyn Io>>> {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(address).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }

    fn bind_udp(&self, address: SocketAddr) -> BoxFuture<io::Result<Box<dyn Datagrams>>> {
        Box::pin(async move {
            let socket = turmoil::net::UdpSocket::bind(address).await?;
            Ok(Box::new(SimDatagrams(Arc::new(socket))) as Box<dyn Datagrams>)
        })
    }

    fn random(&self) -> u128 {
        RANDOM.with(|random| {
            let mut random = random.borrow_mut();
            (u128::from(random.next_u64()) << 64) | u128::from(random.next_u64())
        })
    }

    fn resolve(&self, name: &str) -> io::Result<SocketAddr> {
        if let Ok(address) = name.parse() {
            return Ok(address);
        }
        let (host, port) = name
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: not host:port")))?;
        Ok(SocketAddr::new(turmoil::lookup(host), port))
    }
}

struct SimListener(Arc<turmoil::net::TcpListener>);

impl Listen for SimListener {
    fn accept(&self) -> BoxFuture<io::Result<(Box<dyn Io>, SocketAddr)>> {
        let listener = self.0.clone();
        Box::pin(async move {
            let (stream, peer) = listener.accept().await?;
            Ok((Box::new(stream) as Box<dyn Io>, peer))
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Largest datagram read.
const DATAGRAM_BYTES_MAX: usize = 65_507;

struct SimDatagrams(Arc<turmoil::net::UdpSocket>);

impl Datagrams for SimDatagrams {
    fn send_to(&self, datagram: Vec<u8>, to: SocketAddr) -> BoxFuture<io::Result<()>> {
        let socket = self.0.clone();
        Box::pin(async move { socket.send_to(&datagram, to).await.map(|_| ()) })
    }

    fn recv_from(&self) -> BoxFuture<io::Result<(Vec<u8>, SocketAddr)>> {
        let socket = self.0.clone();
        Box::pin(async move {
            let mut buffer = vec![0; DATAGRAM_BYTES_MAX];
            let (length, from) = socket.recv_from(&mut buffer).await?;
            buffer.truncate(length);
            Ok((buffer, from))
        })
    }
}
