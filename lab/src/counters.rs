//! Per-interface counters, parsed from a host's `/proc/net/dev`.

/// Byte and packet counters of one interface, as the kernel counts them
/// (`rx` = received by the host, `tx` = sent by the host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets the interface dropped on receive.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
}

impl IfCounters {
    /// Counter growth since `earlier` (saturating, counters never go back).
    pub fn since(&self, earlier: &IfCounters) -> IfCounters {
        IfCounters {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
        }
    }
}

/// Finds `iface` in the text of `/proc/net/dev`.
pub(crate) fn parse_proc_net_dev(text: &str, iface: &str) -> Option<IfCounters> {
    text.lines().skip(2).find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        // Receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes packets errs drop fifo colls carrier compressed.
        if f.len() < 16 {
            return None;
        }
        Some(IfCounters {
            rx_bytes: f[0],
            rx_packets: f[1],
            rx_dropped: f[3],
            tx_bytes: f[8],
            tx_packets: f[9],
        })
    })
}

/// Whether the text of `/proc/net/tcp` shows a socket listening on `port`.
pub(crate) fn tcp_listening(text: &str, port: u16) -> bool {
    text.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        let port_hex = local.and_then(|l| l.split_once(':')).map(|(_, p)| p);
        state == Some("0A") && port_hex.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0: 1000000   20001    0    7    0     0          0        12   565656    3030    0    0    0     0       0          0
";

    #[test]
    fn parses_eth0_line() {
        let c = parse_proc_net_dev(DEV, "eth0").unwrap();
        assert_eq!(
            c,
            IfCounters {
                rx_bytes: 1_000_000,
                rx_packets: 20_001,
                rx_dropped: 7,
                tx_bytes: 565_656,
                tx_packets: 3030
            }
        );
        assert_eq!(parse_proc_net_dev(DEV, "lo").unwrap().rx_packets, 2);
        assert!(parse_proc_net_dev(DEV, "eth1").is_none());
        assert_eq!(c.since(&c), IfCounters::default());
    }

    #[test]
    fn finds_listening_port() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 05004D0A:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 05004D0A:0C39 0A004D0A:D431 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
";
        assert!(tcp_listening(tcp, 3128));
        assert!(!tcp_listening(tcp, 3129), "established, not listening");
        assert!(!tcp_listening(tcp, 80));
    }
}
