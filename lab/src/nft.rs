//! nftables scripts for fault injection inside one host: input loss and firewall profiles.
//!
//! Invariants: each feature lives in its own table (`inet lab_loss`, `inet lab_fw`), and every
//! script first replaces its table atomically (`nft -f` applies a script as one transaction),
//! so applying a profile twice or switching profiles never stacks rules.

use std::fmt::Write as _;
use std::net::SocketAddrV4;

/// Something a firewall rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// TCP, to this destination port (or any port).
    Tcp(Option<u16>),
    /// UDP, to this destination port (or any port).
    Udp(Option<u16>),
    /// ICMP (ping).
    Icmp,
    /// Any IPv4 multicast destination (224.0.0.0/4), e.g. the distribution stream.
    Multicast,
}

/// A firewall profile for one host. Blocked traffic is dropped silently (as most real
/// firewalls do) unless [`Action::Reject`] is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Profile {
    /// "Only TCP to these ports out": the host may open TCP connections to the listed
    /// destination ports and receive their replies; everything else, in or out, is blocked
    /// (no UDP, no multicast, no ICMP, no incoming connections).
    OnlyTcpOut(Vec<u16>),
    /// "Nothing out but the proxy": the host may open TCP connections to this one address and
    /// port and receive the replies; everything else is blocked.
    OnlyTo(SocketAddrV4),
    /// Everything is allowed except the listed traffic, which is blocked in both directions
    /// (as destination of packets the host sends and of packets it receives).
    Block(Vec<Match>),
}

/// What a firewall does with traffic it blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Action {
    /// Silently drop (connections hang until their timeout).
    #[default]
    Drop,
    /// Reject with an ICMP error / TCP reset (connections fail at once).
    Reject,
}

fn match_expr(m: Match) -> String {
    match m {
        Match::Tcp(Some(p)) => format!("tcp dport {p}"),
        Match::Tcp(None) => "meta l4proto tcp".into(),
        Match::Udp(Some(p)) => format!("udp dport {p}"),
        Match::Udp(None) => "meta l4proto udp".into(),
        Match::Icmp => "meta l4proto icmp".into(),
        Match::Multicast => "ip daddr 224.0.0.0/4".into(),
    }
}

fn verdict(action: Action) -> &'static str {
    match action {
        Action::Drop => "drop",
        Action::Reject => "reject",
    }
}

fn replace_table(name: &str) -> String {
    // `table` creates it if missing, so `delete` always succeeds; the whole file is one
    // transaction.
    format!("table inet {name}\ndelete table inet {name}\n")
}

/// Script that removes a lab table if present.
pub(crate) fn clear_script(table: &str) -> String {
    replace_table(table)
}

/// Script for [`crate::Host::firewall`].
pub(crate) fn firewall_script(profile: &Profile, action: Action) -> String {
    let v = verdict(action);
    let mut s = replace_table("lab_fw");
    s.push_str("table inet lab_fw {\n");
    match profile {
        Profile::OnlyTcpOut(_) | Profile::OnlyTo(_) => {
            let allow_out = match profile {
                Profile::OnlyTcpOut(ports) if ports.is_empty() => None,
                Profile::OnlyTcpOut(ports) => Some(format!(
                    "tcp dport {{ {} }}",
                    ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Profile::OnlyTo(a) => Some(format!("ip daddr {} tcp dport {}", a.ip(), a.port())),
                Profile::Block(_) => None,
            };
            // Reject on output would be answered to ourselves; a local reject is still the
            // quickest failure, so both chains use the chosen verdict.
            let _ = write!(
                s,
                "  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 iif lo accept\n    ct state established,related accept\n    {v}\n  }}\n"
            );
            let _ = write!(
                s,
                "  chain output {{\n    type filter hook output priority 0; policy accept;\n    \
                 oif lo accept\n    ct state established,related accept\n"
            );
            if let Some(allow) = allow_out {
                let _ = writeln!(s, "    {allow} ct state new accept");
            }
            let _ = write!(s, "    {v}\n  }}\n");
        }
        Profile::Block(matches) => {
            for (chain, hook) in [("input", "input"), ("output", "output")] {
                let _ = write!(
                    s,
                    "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n"
                );
                for m in matches {
                    let _ = writeln!(s, "    {} {v}", match_expr(*m));
                }
                s.push_str("  }\n");
            }
        }
    }
    s.push_str("}\n");
    s
}

/// Script for [`crate::Host::loss_in`]: drop `percent`% of incoming UDP datagrams to `ports`
/// (all UDP when `ports` is empty), chosen by the kernel's `numgen random`.
pub(crate) fn loss_script(ports: &[u16], percent: f64) -> String {
    // Resolution of 1/10000 (0.01%).
    let threshold = (percent.clamp(0.0, 100.0) * 100.0).round() as u32;
    let sel = if ports.is_empty() {
        "meta l4proto udp".to_string()
    } else {
        format!(
            "udp dport {{ {} }}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut s = replace_table("lab_loss");
    let _ = write!(
        s,
        "table inet lab_loss {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n    \
         {sel} numgen random mod 10000 < {threshold} counter drop\n  }}\n}}\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_script_uses_basis_points() {
        let s = loss_script(&[5000, 5001], 5.0);
        assert!(
            s.contains("udp dport { 5000, 5001 } numgen random mod 10000 < 500 counter drop"),
            "{s}"
        );
        let s = loss_script(&[], 0.25);
        assert!(
            s.contains("meta l4proto udp numgen random mod 10000 < 25 counter drop"),
            "{s}"
        );
    }

    #[test]
    fn only_tcp_out_allows_new_connections_to_listed_ports() {
        let s = firewall_script(&Profile::OnlyTcpOut(vec![443, 8443]), Action::Drop);
        assert!(
            s.contains("tcp dport { 443, 8443 } ct state new accept"),
            "{s}"
        );
        assert!(
            s.starts_with("table inet lab_fw\ndelete table inet lab_fw\n"),
            "{s}"
        );
        assert_eq!(s.matches("    drop\n").count(), 2, "{s}");
    }

    #[test]
    fn only_to_names_address_and_port() {
        let s = firewall_script(
            &Profile::OnlyTo("10.77.0.5:3128".parse().unwrap()),
            Action::Reject,
        );
        assert!(
            s.contains("ip daddr 10.77.0.5 tcp dport 3128 ct state new accept"),
            "{s}"
        );
        assert_eq!(s.matches("    reject\n").count(), 2, "{s}");
    }

    #[test]
    fn block_lists_each_match_in_both_chains() {
        let s = firewall_script(
            &Profile::Block(vec![Match::Udp(Some(53)), Match::Multicast]),
            Action::Drop,
        );
        assert_eq!(s.matches("udp dport 53 drop").count(), 2, "{s}");
        assert_eq!(s.matches("ip daddr 224.0.0.0/4 drop").count(), 2, "{s}");
    }
}
