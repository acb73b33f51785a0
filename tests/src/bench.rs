//! What the benchmark examples share: arguments, percentiles, and waiting for a device's first
//! sync.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::Node;

/// The value of `--name N` on the command line, else `default`.
pub fn arg(name: &str, default: u64) -> Result<u64> {
    let args: Vec<String> = std::env::args().collect();
    Ok(match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).context("a value")?.parse()?,
        None => default,
    })
}

/// The `p` quantile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits until `device` holds (nearly) every document `central` holds, or holds more than
/// `at_least` and has received nothing for 15 s (its scope may be less than everything);
/// fails after `limit`. Returns the documents it holds.
pub fn receive_scope(device: &Node, central: &Node, at_least: u64, limit: Duration) -> Result<u64> {
    let t = Instant::now();
    let want = central.documents()?;
    let mut last = (0, Instant::now());
    loop {
        let n = device.documents()?;
        if n != last.0 {
            last = (n, Instant::now());
        }
        if n + 5 >= want || (n > at_least && last.1.elapsed() > Duration::from_secs(15)) {
            return Ok(n);
        }
        ensure!(t.elapsed() < limit, "the device did not receive its scope");
        std::thread::sleep(Duration::from_millis(500));
    }
}
