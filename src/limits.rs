//! Admission control: caps on open connections, on connections per client address and on
//! connections still waiting for their ClientHello. Each admitted slot is an RAII guard, so a
//! connection gives its slots back however it ends.

use crate::config::Limits;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicUsize,
    handshakes: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was not admitted; the label is its `sniplex_rejected_total` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Connections,
    PerIp,
    Handshakes,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Connections => "limit_connections",
            Refused::PerIp => "limit_per_ip",
            Refused::Handshakes => "limit_handshakes",
        }
    }
}

/// The key a client address is counted under: IPv4 as is, IPv6 by its /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[derive(Debug)]
pub struct OpenSlot(Arc<Gate>);
#[derive(Debug)]
pub struct HandshakeSlot(Arc<Gate>);
#[derive(Debug)]
pub struct IpSlot(Arc<Gate>, IpAddr);

fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// A slot among all open connections and one among pending handshakes.
    pub fn admit(self: &Arc<Self>, limits: &Limits) -> Result<(OpenSlot, HandshakeSlot), Refused> {
        if !take(&self.open, limits.max_connections) {
            return Err(Refused::Connections);
        }
        let open = OpenSlot(self.clone());
        if !take(&self.handshakes, limits.max_handshakes) {
            return Err(Refused::Handshakes);
        }
        Ok((open, HandshakeSlot(self.clone())))
    }

    /// A slot for one more connection from `ip`'s address group.
    pub fn admit_ip(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<IpSlot, Refused> {
        let key = ip_key(ip);
        let mut map = self.per_ip.lock().map_err(|_| Refused::PerIp)?;
        let n = map.entry(key).or_insert(0);
        if *n >= limits.max_connections_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        Ok(IpSlot(self.clone(), key))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.0.per_ip.lock() {
            if let Some(n) = map.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let g = Gate::new();
        let limits = Limits {
            max_connections: 2,
            max_connections_per_ip: 1,
            max_handshakes: 1,
        };
        let a = g.admit(&limits).unwrap();
        assert_eq!(g.admit(&limits).unwrap_err(), Refused::Handshakes);
        assert_eq!(g.open(), 1, "a refused handshake gives its open slot back");
        drop(a.1);
        let b = g.admit(&limits).unwrap();
        assert_eq!(g.admit(&limits).unwrap_err(), Refused::Connections);
        drop((a.0, b));
        assert_eq!((g.open(), g.handshakes()), (0, 0));

        let ip: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let s = g.admit_ip(ip, &limits).unwrap();
        assert_eq!(g.admit_ip(same64, &limits).unwrap_err(), Refused::PerIp);
        let o = g.admit_ip(other64, &limits).unwrap();
        drop(s);
        assert!(g.admit_ip(same64, &limits).is_ok());
        drop(o);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ip_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
