//! The clock seam. The node reads wall-clock time only through [`Clock`], and only to
//! stamp commands; the simulation supplies its own.

/// Wall-clock seconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_s(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_s(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
    }
}
